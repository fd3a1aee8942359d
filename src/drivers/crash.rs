//! `CrashDriver`: an in-memory block device with a volatile write cache, to test what
//! survives a power loss. For the library's tests and for users testing their own
//! crash safety (a journal, a metadata file, a persistent [`DirtyBitmap`](crate::DirtyBitmap)).

use std::io;
use std::sync::Mutex;

use crate::driver::{BlockDriver, BlockStatus, StatusFlags};
use crate::drivers::memory::MemDriver;

/// The unit a disk writes atomically: a write is torn only at these boundaries.
pub const CRASH_SECTOR: u64 = 512;

/// What [`CrashDriver::crash`] did with the writes that were not yet flushed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CrashReport {
    /// Writes that reached the disk whole.
    pub kept: u64,
    /// Writes of which only some sectors reached the disk.
    pub torn: u64,
    /// Writes lost entirely.
    pub dropped: u64,
}

/// Operation counts of a [`CrashDriver`] since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CrashStats {
    /// `write_at` and `write_zeroes_at` calls that succeeded.
    pub writes: u64,
    /// `flush` calls that succeeded.
    pub flushes: u64,
    /// Power losses so far.
    pub crashes: u64,
}

/// A write since the last flush: it may or may not survive a crash.
struct Pending {
    offset: u64,
    len: u64,
    /// `None`: write_zeroes.
    data: Option<Vec<u8>>,
}

/// Everything of a `CrashDriver`. Protected by its mutex.
struct State {
    /// What reads see: durable contents plus every write since the last flush.
    current: MemDriver,
    /// What survives a power loss.
    durable: MemDriver,
    /// The writes since the last flush, in order.
    volatile: Vec<Pending>,
    /// splitmix64 state.
    rng: u64,
    /// False between a crash and `restart`: every operation fails with EIO.
    online: bool,
    /// Operations (writes, write_zeroes, flushes) left before an armed crash.
    crash_after: Option<u64>,
    last_crash: Option<CrashReport>,
    stats: CrashStats,
}

/// An in-memory block device that models a disk's write cache: data written since the last
/// [`flush`](BlockDriver::flush) is volatile, a flush makes everything written before it
/// durable, and [`crash`](CrashDriver::crash) is a power loss.
///
/// At a crash, each volatile write independently (from a seedable pseudo-random sequence)
/// reaches the disk whole, is lost, or is *torn*: only some of its 512-byte sectors
/// ([`CRASH_SECTOR`]) reach the disk. Writes to the same place land in their order, so any
/// mix of old and new sectors a real disk could leave is possible; a sector itself is never
/// half written. After the crash the device is off: every operation fails with EIO (the
/// threads of the "dead" system cannot touch the disk) until [`restart`](CrashDriver::restart),
/// after which it holds exactly the durable contents.
///
/// [`crash_after`](CrashDriver::crash_after) arms a crash at a chosen operation, to lose power
/// in the middle of a sequence of writes and flushes.
///
/// `write_zeroes_at` is a volatile write of zeroes (torn like any write); `block_status`
/// reports what reads see now (data, or zero for never-written and zeroed 4 KiB blocks).
/// Thread-safe: operations are serialized by one mutex (it is a test device, not a fast one).
pub struct CrashDriver {
    size: u64,
    state: Mutex<State>,
}

/// The error of every operation while the device is off: EIO.
fn off_line() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn check(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} is past the end of the device ({size} bytes)"),
        )),
    }
}

impl State {
    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Count an operation against an armed crash; crash now when it is due.
    fn tick(&mut self) -> io::Result<()> {
        if !self.online {
            return Err(off_line());
        }
        match self.crash_after {
            Some(0) => {
                self.power_loss();
                Err(off_line())
            }
            Some(n) => {
                self.crash_after = Some(n - 1);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn apply(dev: &MemDriver, p: &Pending, start: u64, end: u64) {
        // In range by construction: pieces of writes that were range-checked.
        let r = match &p.data {
            Some(d) => dev.write_at(&d[(start - p.offset) as usize..(end - p.offset) as usize], start),
            None => dev.write_zeroes_at(start, end - start),
        };
        r.expect("in-range write to a memory device");
    }

    /// Resolve the volatile writes as a power loss would, and turn the device off.
    fn power_loss(&mut self) -> CrashReport {
        let mut report = CrashReport::default();
        let volatile = std::mem::take(&mut self.volatile);
        for p in &volatile {
            let first = p.offset / CRASH_SECTOR;
            let last = (p.offset + p.len).div_ceil(CRASH_SECTOR);
            let sectors = last - first;
            let choice = self.next() % 3;
            if choice == 0 || (choice == 2 && sectors == 1 && self.next() % 2 == 0) {
                State::apply(&self.durable, p, p.offset, p.offset + p.len);
                report.kept += 1;
            } else if choice == 1 || sectors == 1 {
                report.dropped += 1;
            } else {
                let mut kept = 0;
                for s in first..last {
                    if self.next() % 2 == 0 {
                        let start = (s * CRASH_SECTOR).max(p.offset);
                        let end = ((s + 1) * CRASH_SECTOR).min(p.offset + p.len);
                        State::apply(&self.durable, p, start, end);
                        kept += 1;
                    }
                }
                match kept {
                    0 => report.dropped += 1,
                    k if k == sectors => report.kept += 1,
                    _ => report.torn += 1,
                }
            }
        }
        // Reads see the durable contents again where volatile writes went.
        for p in &volatile {
            let mut pos = p.offset;
            let end = p.offset + p.len;
            while pos < end {
                let st = self.durable.block_status(pos, end - pos).expect("in-range status of a memory device");
                if st.flags.contains(StatusFlags::DATA) {
                    let mut buf = vec![0u8; st.len as usize];
                    self.durable.read_at(&mut buf, pos).expect("in-range read of a memory device");
                    self.current.write_at(&buf, pos).expect("in-range write to a memory device");
                } else {
                    self.current.write_zeroes_at(pos, st.len).expect("in-range write to a memory device");
                }
                pos += st.len;
            }
        }
        self.online = false;
        self.crash_after = None;
        self.stats.crashes += 1;
        self.last_crash = Some(report);
        report
    }
}

impl CrashDriver {
    /// A device of `size` bytes (non-zero) reading as zeroes, with crash decisions seeded by 1.
    pub fn new(size: u64) -> io::Result<CrashDriver> {
        CrashDriver::with_seed(size, 1)
    }

    /// A device whose crash decisions come from `seed`: the same seed and the same sequence
    /// of operations give the same post-crash contents.
    pub fn with_seed(size: u64, seed: u64) -> io::Result<CrashDriver> {
        Ok(CrashDriver {
            size,
            state: Mutex::new(State {
                current: MemDriver::new(size)?,
                durable: MemDriver::new(size)?,
                volatile: Vec::new(),
                rng: seed,
                online: true,
                crash_after: None,
                last_crash: None,
                stats: CrashStats::default(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lose power now: each write not yet flushed is kept, torn at sector boundaries or
    /// dropped (see the type), and the device is off (every operation fails with EIO) until
    /// [`restart`](CrashDriver::restart). Crashing a device that is already off does nothing
    /// more and reports nothing lost.
    pub fn crash(&self) -> CrashReport {
        let mut st = self.lock();
        if !st.online {
            return CrashReport::default();
        }
        st.power_loss()
    }

    /// Lose power when the `ops`-th write, write_zeroes or flush from now is issued: that
    /// operation and every later one fail with EIO (`crash_after(0)`: the next one). Replaces
    /// an armed crash.
    pub fn crash_after(&self, ops: u64) {
        self.lock().crash_after = Some(ops);
    }

    /// Cancel an armed crash.
    pub fn disarm(&self) {
        self.lock().crash_after = None;
    }

    /// Turn the device back on after a crash: it holds exactly what was durable.
    /// Does nothing to a device that is on.
    pub fn restart(&self) {
        self.lock().online = true;
    }

    /// False between a crash and [`restart`](CrashDriver::restart).
    pub fn is_online(&self) -> bool {
        self.lock().online
    }

    /// What the last crash did, if there was one.
    pub fn last_crash(&self) -> Option<CrashReport> {
        self.lock().last_crash
    }

    /// Writes since the last flush (what a crash now could lose).
    pub fn volatile_writes(&self) -> usize {
        self.lock().volatile.len()
    }

    /// Operation counts.
    pub fn stats(&self) -> CrashStats {
        self.lock().stats
    }

    /// The durable contents: what the device would hold after a crash with every volatile
    /// write dropped.
    pub fn durable_to_vec(&self) -> Vec<u8> {
        self.lock().durable.to_vec()
    }
}

impl BlockDriver for CrashDriver {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check(self.size, offset, buf.len() as u64)?;
        let st = self.lock();
        if !st.online {
            return Err(off_line());
        }
        st.current.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check(self.size, offset, buf.len() as u64)?;
        let mut st = self.lock();
        st.tick()?;
        if buf.is_empty() {
            return Ok(());
        }
        st.current.write_at(buf, offset)?;
        st.volatile.push(Pending { offset, len: buf.len() as u64, data: Some(buf.to_vec()) });
        st.stats.writes += 1;
        Ok(())
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        check(self.size, offset, len)?;
        let mut st = self.lock();
        st.tick()?;
        if len == 0 {
            return Ok(());
        }
        st.current.write_zeroes_at(offset, len)?;
        st.volatile.push(Pending { offset, len, data: None });
        st.stats.writes += 1;
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut st = self.lock();
        st.tick()?;
        let volatile = std::mem::take(&mut st.volatile);
        for p in &volatile {
            State::apply(&st.durable, p, p.offset, p.offset + p.len);
        }
        st.stats.flushes += 1;
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        check(self.size, offset, len)?;
        let st = self.lock();
        if !st.online {
            return Err(off_line());
        }
        st.current.block_status(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector(d: &dyn BlockDriver, i: u64) -> Vec<u8> {
        let mut b = vec![0u8; CRASH_SECTOR as usize];
        d.read_at(&mut b, i * CRASH_SECTOR).unwrap();
        b
    }

    #[test]
    fn crash_keeps_flushed_data_and_tears_only_at_sectors() {
        // Fewer seeds under Miri (scripts/miri.sh): it interprets every step.
        for seed in 0..if cfg!(miri) { 4 } else { 200 } {
            let d = CrashDriver::with_seed(64 * 1024, seed).unwrap();
            d.write_at(&[1u8; 4096], 0).unwrap();
            d.flush().unwrap();
            d.write_at(&[2u8; 4096], 0).unwrap(); // volatile: 8 sectors of 2s over 1s
            d.write_zeroes_at(8192, 1024).unwrap();
            d.write_at(&[3u8; 100], 20000).unwrap(); // unaligned, inside one sector
            let mut now = vec![0u8; 4096];
            d.read_at(&mut now, 0).unwrap();
            assert_eq!(now, vec![2u8; 4096]);
            assert_eq!(d.volatile_writes(), 3);
            let r = d.crash();
            assert_eq!(r.kept + r.torn + r.dropped, 3);
            assert!(!d.is_online());
            assert_eq!(d.read_at(&mut now, 0).unwrap_err().raw_os_error(), Some(libc::EIO));
            assert!(d.write_at(&[0], 0).is_err());
            d.restart();
            for i in 0..8 {
                let s = sector(&d, i);
                assert!(s == vec![1u8; 512] || s == vec![2u8; 512], "seed {seed} sector {i} is mixed");
            }
            let mut small = [0u8; 100];
            d.read_at(&mut small, 20000).unwrap();
            assert!(small == [0u8; 100] || small == [3u8; 100]);
            assert_eq!(d.stats().crashes, 1);
        }
    }

    #[test]
    fn crash_outcomes_vary_and_are_seeded() {
        let run = |seed| {
            let d = CrashDriver::with_seed(1 << 20, seed).unwrap();
            for i in 0..64u64 {
                d.write_at(&[i as u8 + 1; 2048], i * 4096).unwrap();
            }
            let r = d.crash();
            d.restart();
            (r, d.durable_to_vec())
        };
        let (r1, v1) = run(7);
        let (r2, v2) = run(7);
        assert_eq!((r1, &v1), (r2, &v2));
        assert!(r1.kept > 0 && r1.torn > 0 && r1.dropped > 0, "{r1:?}");
        assert_ne!(run(8).1, v1);
    }

    #[test]
    fn crash_after_fails_the_chosen_operation() {
        let d = CrashDriver::new(1 << 16).unwrap();
        d.write_at(&[9u8; 512], 0).unwrap();
        d.crash_after(2);
        d.write_at(&[8u8; 512], 512).unwrap();
        d.flush().unwrap(); // both durable
        assert!(d.write_at(&[7u8; 512], 1024).is_err()); // the crash
        assert!(!d.is_online());
        assert_eq!(d.last_crash(), Some(CrashReport::default()));
        d.restart();
        assert_eq!(sector(&d, 0), vec![9u8; 512]);
        assert_eq!(sector(&d, 1), vec![8u8; 512]);
        assert_eq!(sector(&d, 2), vec![0u8; 512]);
        assert_eq!(d.block_status(8192, 512).unwrap().flags, StatusFlags::ZERO);
        assert_eq!(d.block_status(0, 512).unwrap().flags, StatusFlags::DATA);
        assert!(d.read_at(&mut [0u8; 2], (1 << 16) - 1).is_err());
    }
}
