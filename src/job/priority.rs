//! Hook priority over background copy: while a `cow_before_write` call is copying,
//! workers start no new chunk.
//!
//! Why: on a file target every write takes the inode's write lock. Two workers writing
//! chunk after chunk hand that lock to each other (a running task that asks again
//! steals it from a sleeping waiter), so a hook waiting to write its cluster could
//! wait for the kernel's anti-starvation handoff (4 ms on this machine) and for a CPU.
//! With the gate, a hook waits at most for the chunks already in flight.

use std::time::Duration;

use crossbeam_utils::CachePadded;

use crate::sync::{AtomicUsize, Condvar, Instant, Mutex, Ordering};

/// Longest a worker waits for hook copies at one time.
pub(crate) const MAX_YIELD: Duration = Duration::from_millis(2);

/// Counts hook calls in their copying (slow) path; workers wait for it to be zero.
#[derive(Default)]
pub(crate) struct HookGate {
    /// Hook calls in the slow path now. Changed without a lock.
    active: CachePadded<AtomicUsize>,
    /// Only for the condvar: taken by the last hook leaving and by waiting workers.
    lock: Mutex<()>,
    idle: Condvar,
}

/// A hook call in its slow path; leaving (drop) lets the workers go on.
pub(crate) struct HookPass<'a>(&'a HookGate);

impl Drop for HookPass<'_> {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            drop(self.0.lock.lock().unwrap_or_else(|e| e.into_inner()));
            self.0.idle.notify_all();
        }
    }
}

impl HookGate {
    /// A hook enters its slow path.
    pub fn enter(&self) -> HookPass<'_> {
        self.active.fetch_add(1, Ordering::AcqRel);
        HookPass(self)
    }

    /// A worker, holding no claim, before it claims its next chunk: wait while hooks
    /// are copying, at most `max` (so a stream of hook calls cannot stall the backup).
    /// A hook holds its pass only while copying its own claims, never while waiting
    /// for a worker's claim (and a yielding worker holds none), so this cannot deadlock.
    pub fn yield_to_hooks(&self, max: Duration) {
        if self.active.load(Ordering::Acquire) == 0 {
            return;
        }
        let deadline = Instant::now() + max;
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        while self.active.load(Ordering::Acquire) > 0 {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            g = self.idle.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_wait_for_hooks_but_not_forever() {
        let g = HookGate::default();
        let t = Instant::now();
        g.yield_to_hooks(Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(1));
        let pass = g.enter();
        let t = Instant::now();
        g.yield_to_hooks(Duration::from_millis(20));
        assert!(t.elapsed() >= Duration::from_millis(20));
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                drop(pass);
            });
            let t = Instant::now();
            g.yield_to_hooks(Duration::from_secs(10));
            assert!(t.elapsed() < Duration::from_secs(5));
        });
    }
}
