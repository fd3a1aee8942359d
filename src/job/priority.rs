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
//! **The CPU**, with `cow_buffer` set (the host's latency first) and the default
//! [`WorkerPriority::Normal`]: the job runs two shifts of workers ([`HostPace`]).
//! The day shift (`cowbackup-<id>-1` to `-<workers>`) keeps the priority of the thread
//! that started the job and copies while the host is quiet. The night shift
//! (`-<workers + 1>` on: one fewer than the CPUs, at least 1, at most `workers`, so one
//! CPU stays free of the backup even for the host's thread hops, e.g. an NBD server's
//! wake-ups: with both CPUs of this machine running night workers the NBD guest's
//! p99 was 12-22×, with one 1.0-1.5×) runs at `SCHED_IDLE` and copies while the host
//! is writing clusters not yet copied (a hook took its slow path within [`HOST_ACTIVE`]).
//! A host thread that wakes up to write so always finds a CPU: the scheduler preempts an
//! idle-policy thread at once, where two busy normal workers would make it wait for the
//! end of a time slice (milliseconds). Each shift rests while the other works, and looks
//! again at least every [`MAX_REST`]. The day shift rests only while the night shift
//! shows it gets CPU time: it finished a chunk in the last [`NIGHT_FRESH`] and spent
//! less than half of that chunk's time waiting for a CPU ([`RunDelay`], the kernel's
//! schedstat). A night worker that was starved so stops for [`NIGHT_COOLDOWN`] (it
//! would hold its claim, and the target's file lock, while waiting for a CPU: a hook
//! needing either would wait with it). On a machine whose CPUs are all busy with other
//! work the day shift so copies on, and the backup never waits for the host to pause. A thread cannot leave `SCHED_IDLE` without
//! `CAP_SYS_NICE` (or an `RLIMIT_NICE` of 20), hence two sets of threads instead of one
//! that switches. The cost: a hook that needs a cluster a night worker is copying waits
//! for that worker, which on a machine whose CPUs are all busy gets little time; and on
//! such a machine the host's threads queue for a CPU anyway (PERFORMANCE.md).
//! Without `cow_buffer` every worker always copies: under a host writing without pause
//! (the gate above already holds each chunk back up to 2 ms) fewer workers would slow
//! the backup down 2-3×. Workers can also lower their own CPU and I/O priority for the
//! whole job ([`WorkerPriority`], not the default; then there is one shift).

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

/// A hook slow path this recent means the host is writing: the night shift copies.
pub(crate) const HOST_ACTIVE: Duration = Duration::from_millis(500);

/// Longest a resting worker sleeps before it looks again (at the host, and at the
/// job's state: a cancel waits for it at most this long).
pub(crate) const MAX_REST: Duration = Duration::from_millis(20);

/// The night shift finished no chunk (that it did not mostly spend waiting for a CPU)
/// for this long: it is starved, the day shift copies.
pub(crate) const NIGHT_FRESH: Duration = Duration::from_millis(100);

/// A night chunk that waited this long for a CPU, and more than half its time, was
/// starved (a few host wake-ups preempting it are not).
pub(crate) const NIGHT_STARVED_WAIT: Duration = Duration::from_millis(10);

/// A night chunk that took `took` and waited `waited_ns` of it for a CPU was starved.
pub(crate) fn starved(waited_ns: u64, took: Duration) -> bool {
    waited_ns >= NIGHT_STARVED_WAIT.as_nanos() as u64 && waited_ns > took.as_nanos() as u64 / 2
}

/// How long a starved night worker stops before it tries again.
pub(crate) const NIGHT_COOLDOWN: Duration = Duration::from_secs(10);

/// When the host last needed the hook's slow path, and which shift copies meanwhile
/// (see the module doc).
pub(crate) struct HostPace {
    epoch: std::time::Instant,
    /// Nanoseconds after `epoch` of the last hook slow path, + 1 (0: never).
    last: CachePadded<std::sync::atomic::AtomicU64>,
    /// The same for the night shift's last chunk not starved of CPU (0: none since the
    /// last starved one).
    night: CachePadded<std::sync::atomic::AtomicU64>,
    /// Nanoseconds after `epoch` of the last starved night chunk, + 1 (0: never).
    starved: std::sync::atomic::AtomicU64,
    /// Workers in the night shift; 0: one shift, which always copies.
    night_workers: usize,
}

impl HostPace {
    /// Pacing with two shifts of workers (`shifts`), a night shift of one, or none.
    #[cfg(test)]
    pub fn new(shifts: bool) -> HostPace {
        HostPace::with_night(usize::from(shifts))
    }

    /// Pacing for a job of `workers` workers: with `shifts`, a night shift of one worker
    /// fewer than the CPUs available to this process (cgroup quota and affinity
    /// included), at least 1, at most `workers`.
    pub fn for_job(shifts: bool, workers: usize) -> HostPace {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        HostPace::with_night(if shifts { cpus.saturating_sub(1).clamp(1, workers.max(1)) } else { 0 })
    }

    fn with_night(night_workers: usize) -> HostPace {
        HostPace {
            epoch: std::time::Instant::now(),
            last: CachePadded::new(std::sync::atomic::AtomicU64::new(0)),
            night: CachePadded::new(std::sync::atomic::AtomicU64::new(0)),
            starved: std::sync::atomic::AtomicU64::new(0),
            night_workers,
        }
    }

    /// Workers in the night shift (0: one shift).
    pub fn night_workers(&self) -> usize {
        self.night_workers
    }

    /// The host needed the hook's slow path in the last [`HOST_ACTIVE`].
    pub fn host_active(&self) -> bool {
        self.within(&self.last, HOST_ACTIVE)
    }

    /// A hook takes its slow path (one clock read; never on the fast path).
    pub fn host_wrote(&self) {
        let now = self.epoch.elapsed().as_nanos() as u64 + 1;
        self.last.store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// A night-shift worker finished a chunk; `starved`: it waited for a CPU more than
    /// half the time.
    pub fn night_worked(&self, starved: bool) {
        let now = self.epoch.elapsed().as_nanos() as u64 + 1;
        self.night.store(if starved { 0 } else { now }, std::sync::atomic::Ordering::Relaxed);
        if starved {
            self.starved.store(now, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// `stamp` (0: never) is less than `d` ago.
    fn within(&self, stamp: &std::sync::atomic::AtomicU64, d: Duration) -> bool {
        let t = stamp.load(std::sync::atomic::Ordering::Relaxed);
        t != 0 && (self.epoch.elapsed().as_nanos() as u64 + 1).saturating_sub(t) < d.as_nanos() as u64
    }

    /// A worker of the night shift (`night`) or the day shift should rest now: it is
    /// the other shift's time. The night shift rests while the host is quiet; the day
    /// shift while the host writes and the night shift is not starved. Never with one
    /// shift.
    pub fn should_rest(&self, night: bool) -> bool {
        if self.night_workers == 0 {
            return false;
        }
        let host = self.within(&self.last, HOST_ACTIVE);
        match night {
            true => !host || self.within(&self.starved, NIGHT_COOLDOWN),
            false => host && self.within(&self.night, NIGHT_FRESH),
        }
    }

    /// A resting worker's sleep: the day shift until `HOST_ACTIVE` after the host's last
    /// slow path, the night shift `MAX_REST`; at least 1 ms, at most `MAX_REST`.
    pub fn rest(&self, night: bool) {
        let left = if night {
            MAX_REST
        } else {
            let last = Duration::from_nanos(self.last.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(1));
            (last + HOST_ACTIVE).saturating_sub(self.epoch.elapsed())
        };
        std::thread::sleep(left.clamp(Duration::from_millis(1), MAX_REST));
    }
}

/// Time the calling thread has spent runnable but waiting for a CPU (the second field
/// of `/proc/thread-self/schedstat`), for a night-shift worker to tell whether it is
/// starved. Without schedstat (kernel option, or no /proc) it reads 0: never starved.
pub(crate) struct RunDelay(Option<std::fs::File>);

impl RunDelay {
    /// For the calling thread.
    pub fn open() -> RunDelay {
        if cfg!(miri) {
            return RunDelay(None);
        }
        RunDelay(std::fs::File::open("/proc/thread-self/schedstat").ok())
    }

    /// Nanoseconds waited for a CPU so far.
    pub fn read(&self) -> u64 {
        use std::os::unix::fs::FileExt;
        let Some(f) = &self.0 else { return 0 };
        let mut b = [0u8; 96];
        let n = f.read_at(&mut b, 0).unwrap_or(0);
        let s = std::str::from_utf8(&b[..n]).unwrap_or("");
        s.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

/// A night-shift worker, at its start: `SCHED_IDLE` for the calling thread (its I/O
/// priority stays: on a disk the idle I/O class would wait behind the target's
/// writeback). Best effort: refused, the thread stays as it was.
pub(crate) fn night_shift_this_thread() {
    if cfg!(miri) {
        return;
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for the call.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
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
    fn the_night_shift_copies_while_the_host_writes_and_the_day_shift_otherwise() {
        let p = HostPace::new(true);
        assert!(!p.should_rest(false) && p.should_rest(true), "no host write yet: the day shift copies");
        p.host_wrote();
        assert!(!p.should_rest(true), "the host writes: the night shift copies");
        assert!(!p.should_rest(false), "until the night shift has copied, the day shift goes on");
        p.night_worked(false);
        assert!(p.should_rest(false), "the night shift copies: the day shift rests");
        p.night_worked(true);
        assert!(!p.should_rest(false), "the night shift waited for a CPU: the day shift copies");
        assert!(p.should_rest(true), "and the night shift stops for a while");
        p.starved.store(0, std::sync::atomic::Ordering::Relaxed);
        p.night_worked(false);
        assert!(p.should_rest(false));
        std::thread::sleep(NIGHT_FRESH + Duration::from_millis(20));
        p.host_wrote();
        assert!(!p.should_rest(false), "no chunk from the night shift for a while: the day shift copies");
        p.night_worked(false);
        let t = Instant::now();
        p.rest(false);
        assert!(t.elapsed() <= MAX_REST + Duration::from_millis(500), "a rest is short");
        let off = HostPace::new(false);
        off.host_wrote();
        assert!(!off.should_rest(false), "one shift: it always copies");
        std::thread::sleep(HOST_ACTIVE + Duration::from_millis(50));
        assert!(!p.should_rest(false) && p.should_rest(true), "the host went quiet: the day shift copies");
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
