//! Hook priority over background copy, on the CPU and on the target.
//!
//! **The gate**: while a `cow_before_write` call is copying, workers start no new chunk.
//!
//! Why: on a file target every write takes the inode's write lock. Two workers writing
//! chunk after chunk hand that lock to each other (a running task that asks again
//! steals it from a sleeping waiter), so a hook waiting to write its cluster could
//! wait for the kernel's anti-starvation handoff (4 ms on this machine) and for a CPU.
//! With the gate, a hook waits at most for the chunks already in flight.
//!
//! **The CPU**: workers lower their own CPU and I/O priority at start
//! ([`WorkerPriority`]), so a host thread that wakes up to write (or to copy in the
//! hook) gets a CPU at once instead of queueing behind two busy workers.

use std::time::Duration;

use crossbeam_utils::CachePadded;

use super::options::WorkerPriority;
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

/// `ioprio_set` classes and target (linux/ioprio.h).
const IOPRIO_CLASS_BE: libc::c_int = 2;
const IOPRIO_CLASS_IDLE: libc::c_int = 3;
const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
const IOPRIO_WHO_PROCESS: libc::c_int = 1;

/// Give the calling thread (a worker, at its start) CPU and I/O priority `p`. Best
/// effort: a setting the system refuses leaves the thread as it was. Only the calling
/// thread changes (on Linux, scheduling policy, nice and I/O priority are per thread).
pub(crate) fn lower_this_thread(p: WorkerPriority) {
    if cfg!(miri) {
        // Miri (scripts/miri.sh) has none of these syscalls; priority is not what it checks.
        return;
    }
    let (policy, nice, io) = match p {
        WorkerPriority::Normal => return,
        WorkerPriority::Low => (libc::SCHED_BATCH, 19, (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | 7),
        WorkerPriority::Idle => (libc::SCHED_IDLE, 0, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT),
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for the call.
    unsafe { libc::sched_setscheduler(0, policy, &param) };
    if nice != 0 {
        // After the policy: sched_setscheduler keeps the nice value it finds. Who 0 is
        // the calling thread.
        // SAFETY: plain syscall with integer arguments.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    }
    // SAFETY: ioprio_set(IOPRIO_WHO_PROCESS, 0 = the calling thread, prio): integers only.
    unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, io) };
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
