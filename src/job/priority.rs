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
//! **The CPU**, with `cow_buffer` set (the host's latency first): while the host is
//! writing clusters not yet copied (a hook took its slow path in the last
//! [`HOST_ACTIVE`]), at most one worker fewer than the CPUs copies ([`HostPace`]): on a
//! 2-CPU machine one worker goes on and the other rests, so a host thread that wakes up
//! to write finds a free CPU instead of queueing behind two busy workers (the scheduler
//! may let a running worker finish its slice first: milliseconds). When the host stops
//! writing, every worker copies again. Without `cow_buffer` every worker always copies:
//! under a host writing without pause (the gate above already holds each chunk back up
//! to 2 ms) resting workers would slow the backup down 2-3×. Workers can also lower
//! their own CPU and I/O priority at start ([`WorkerPriority`], not the default).

use std::time::Duration;

use crossbeam_utils::CachePadded;

use super::options::WorkerPriority;
use crate::sync::{AtomicUsize, Condvar, Instant, Mutex, Ordering};

/// Longest a worker waits for hook copies at one time.
pub(crate) const MAX_YIELD: Duration = Duration::from_millis(2);

/// The same with `cow_buffer`, where a hook's slow path is a source read (tens of µs).
pub(crate) const MAX_YIELD_BUFFERED: Duration = Duration::from_micros(200);

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

/// A hook slow path this recent means the host is writing: pace the workers.
pub(crate) const HOST_ACTIVE: Duration = Duration::from_millis(500);

/// Longest a resting worker sleeps before it looks again (at the job's state too: a
/// cancel waits for it at most this long).
const MAX_REST: Duration = Duration::from_millis(20);

/// When the host last needed the hook's slow path, and how many workers may copy
/// meanwhile (see the module doc).
pub(crate) struct HostPace {
    epoch: std::time::Instant,
    /// Nanoseconds after `epoch` of the last hook slow path, + 1 (0: never).
    last: CachePadded<std::sync::atomic::AtomicU64>,
    /// Workers numbered above this rest while the host writes.
    busy_workers: usize,
}

impl HostPace {
    /// Pacing for a machine with `cpus` CPUs available to this process.
    pub fn new(cpus: usize) -> HostPace {
        HostPace {
            epoch: std::time::Instant::now(),
            last: CachePadded::new(std::sync::atomic::AtomicU64::new(0)),
            busy_workers: if cpus == usize::MAX { usize::MAX } else { cpus.saturating_sub(1).max(1) },
        }
    }

    /// For this process, from `available_parallelism` (cgroup quota and affinity
    /// included); `enabled` false: every worker always copies.
    pub fn for_this_machine(enabled: bool) -> HostPace {
        let cpus = if enabled { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { usize::MAX };
        HostPace::new(cpus)
    }

    /// A hook takes its slow path (one clock read; never on the fast path).
    pub fn host_wrote(&self) {
        let now = self.epoch.elapsed().as_nanos() as u64 + 1;
        self.last.store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Worker number `n` (from 1) should rest now: the host wrote within `HOST_ACTIVE`
    /// and `n` is above the number of workers that may copy meanwhile.
    pub fn should_rest(&self, n: usize) -> bool {
        if n <= self.busy_workers {
            return false;
        }
        let last = self.last.load(std::sync::atomic::Ordering::Relaxed);
        last != 0 && (self.epoch.elapsed().as_nanos() as u64 + 1).saturating_sub(last) < HOST_ACTIVE.as_nanos() as u64
    }

    /// A resting worker's sleep: until `HOST_ACTIVE` after the host's last slow path
    /// (then it looks again: at the host, and at the job's state), at most `MAX_REST`.
    pub fn rest(&self) {
        let last = Duration::from_nanos(self.last.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(1));
        let left = (last + HOST_ACTIVE).saturating_sub(self.epoch.elapsed());
        std::thread::sleep(left.clamp(Duration::from_millis(1), MAX_REST));
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
    fn workers_above_the_cpus_less_one_rest_while_the_host_writes() {
        let two = HostPace::new(2);
        assert!(!two.should_rest(2), "no host write yet");
        two.host_wrote();
        assert!(!two.should_rest(1), "the first worker always copies");
        assert!(two.should_rest(2));
        let four = HostPace::new(4);
        four.host_wrote();
        assert!(!four.should_rest(3));
        assert!(four.should_rest(4));
        let one = HostPace::new(1);
        one.host_wrote();
        assert!(!one.should_rest(1), "one CPU: the one worker still copies");
        let off = HostPace::for_this_machine(false);
        off.host_wrote();
        assert!(!off.should_rest(64), "pacing off: every worker copies");
        std::thread::sleep(HOST_ACTIVE + Duration::from_millis(50));
        assert!(!two.should_rest(2), "the host went quiet: every worker copies");
    }

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
