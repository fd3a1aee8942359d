//! `FaultDriver`: error and delay injection around any driver, like QEMU's blkdebug.
//! For the library's tests and for users testing their integration.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::driver::{BlockDriver, BlockStatus};

/// Which operation a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultOp {
    /// `read_at`
    Read,
    /// `write_at`
    Write,
    /// `write_zeroes_at`
    WriteZeroes,
    /// `flush`
    Flush,
    /// Every operation above.
    Any,
}

/// A fault rule: for operations `op` that overlap `range`, after the first `after`
/// matching operations, the next `count` ones (or all, with `forever`) wait `delay`
/// and then fail with `errno` (or, with errno 0, go through after the delay).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    op: FaultOp,
    range: Option<Range<u64>>,
    errno: i32,
    count: Option<u64>,
    after: u64,
    delay: Duration,
}

impl FaultRule {
    /// A rule failing every `op` once with EIO; refine it with the builder methods.
    pub fn new(op: FaultOp) -> FaultRule {
        FaultRule { op, range: None, errno: libc::EIO, count: Some(1), after: 0, delay: Duration::ZERO }
    }
    /// Only operations overlapping `[offset, offset + len)` (flush has no range and never matches a ranged rule).
    pub fn range(mut self, offset: u64, len: u64) -> FaultRule {
        self.range = Some(offset..offset.saturating_add(len));
        self
    }
    /// The errno to fail with; 0 injects only the delay.
    pub fn errno(mut self, errno: i32) -> FaultRule {
        self.errno = errno;
        self
    }
    /// Fire `n` times (default once).
    pub fn times(mut self, n: u64) -> FaultRule {
        self.count = Some(n);
        self
    }
    /// Fire on every matching operation.
    pub fn forever(mut self) -> FaultRule {
        self.count = None;
        self
    }
    /// Let the first `n` matching operations through.
    pub fn after(mut self, n: u64) -> FaultRule {
        self.after = n;
        self
    }
    /// Wait this long before failing (or before going through, with errno 0).
    pub fn delay(mut self, d: Duration) -> FaultRule {
        self.delay = d;
        self
    }
}

/// Handle of a rule added to a [`FaultDriver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleId(u64);

struct Active {
    id: u64,
    rule: FaultRule,
    seen: u64,
    fired: u64,
}

/// Wraps a driver and injects errors and delays by rule. Thread-safe; the rule table
/// is never locked during a delay or the inner driver's I/O.
pub struct FaultDriver<D> {
    inner: D,
    /// Rules in the order added. Protected by this mutex.
    rules: Mutex<Vec<Active>>,
    next_id: AtomicU64,
    injected: AtomicU64,
}

impl<D: BlockDriver> FaultDriver<D> {
    /// Wrap `inner`, with no rules.
    pub fn new(inner: D) -> FaultDriver<D> {
        FaultDriver { inner, rules: Mutex::new(Vec::new()), next_id: AtomicU64::new(1), injected: AtomicU64::new(0) }
    }

    /// The wrapped driver.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Add a rule; the first matching rule that fires decides.
    pub fn add(&self, rule: FaultRule) -> RuleId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().push(Active { id, rule, seen: 0, fired: 0 });
        RuleId(id)
    }

    /// Remove a rule (no effect if already gone).
    pub fn remove(&self, id: RuleId) {
        self.lock().retain(|a| a.id != id.0);
    }

    /// Remove every rule.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// How often rule `id` fired (0 for an unknown rule).
    pub fn fired(&self, id: RuleId) -> u64 {
        self.lock().iter().find(|a| a.id == id.0).map_or(0, |a| a.fired)
    }

    /// Faults injected so far, all rules together.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Active>> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Apply the rules to one operation: Ok to go on to the inner driver.
    fn check(&self, op: FaultOp, range: Option<Range<u64>>) -> io::Result<()> {
        let mut hit = None;
        for a in self.lock().iter_mut() {
            if a.rule.op != FaultOp::Any && a.rule.op != op {
                continue;
            }
            let overlaps = match (&a.rule.range, &range) {
                (None, _) => true,
                (Some(r), Some(q)) => r.start < q.end.max(q.start + 1) && q.start < r.end,
                (Some(_), None) => false,
            };
            if !overlaps {
                continue;
            }
            a.seen += 1;
            if a.seen <= a.rule.after || a.rule.count.is_some_and(|c| a.fired >= c) {
                continue;
            }
            a.fired += 1;
            hit = Some((a.rule.delay, a.rule.errno));
            break;
        }
        let Some((delay, errno)) = hit else { return Ok(()) };
        self.injected.fetch_add(1, Ordering::Relaxed);
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        if errno != 0 {
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok(())
    }
}

impl<D: BlockDriver> BlockDriver for FaultDriver<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(FaultOp::Read, Some(offset..offset + buf.len() as u64))?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(FaultOp::Write, Some(offset..offset + buf.len() as u64))?;
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(FaultOp::WriteZeroes, Some(offset..offset.saturating_add(len)))?;
        self.inner.write_zeroes_at(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.check(FaultOp::Flush, None)?;
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.inner.block_status(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn reads_as_zero(&self) -> bool {
        self.inner.reads_as_zero()
    }
    fn storage_id(&self) -> Option<(u64, u64)> {
        self.inner.storage_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDriver;

    #[test]
    fn rules_fire_by_op_range_count_and_after() {
        let d = FaultDriver::new(MemDriver::new(1 << 20).unwrap());
        let r = d.add(FaultRule::new(FaultOp::Read).range(4096, 4096).errno(libc::EIO).times(2).after(1));
        let mut b = [0u8; 512];
        d.read_at(&mut b, 0).unwrap(); // outside the range
        d.read_at(&mut b, 4096).unwrap(); // the first match passes (after 1)
        assert_eq!(d.read_at(&mut b, 4096 + 100).unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(d.read_at(&mut b, 8191).unwrap_err().raw_os_error(), Some(libc::EIO));
        d.read_at(&mut b, 4096).unwrap(); // fired twice: spent
        d.write_at(&b, 4096).unwrap(); // other op
        assert_eq!(d.fired(r), 2);
        let w = d.add(FaultRule::new(FaultOp::Any).errno(libc::ENOSPC).forever());
        assert_eq!(d.flush().unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(d.write_zeroes_at(0, 10).unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        d.remove(w);
        d.flush().unwrap();
        let t = std::time::Instant::now();
        d.add(FaultRule::new(FaultOp::Write).errno(0).delay(Duration::from_millis(50)));
        d.write_at(&b, 0).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert_eq!(d.injected(), 5);
    }
}
