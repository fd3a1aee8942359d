//! `WorkerPool`: background copy threads shared by many jobs (one pool per process, or
//! per storage tier), instead of `workers` threads of each job's own.
//!
//! A job started with [`crate::BackupOptions::pool`] attaches itself to the pool when
//! its job thread would start its workers, and waits until the pool is done with it.
//! Each pool thread goes round the attached jobs and copies one chunk of the first one
//! that can go now: jobs of a higher [`crate::WorkerPriority`] class first (`Normal`,
//! then `Low`, then `Idle`), jobs of one class in turn, so every job gets its share of
//! the threads. A job that is paused, over its speed limit, or whose dirty clusters are
//! all being copied by someone else is passed over, not waited for. At most `workers`
//! pool threads copy for one job at once. A pool thread sleeps when no job can go: until
//! the earliest speed-limited job may go again, a hook queues saved old data, or at
//! most [`IDLE_POLL`] (a resume or cancel is seen within that).
//!
//! What a job no longer has: its own worker threads (the job thread `cowbackup-<id>`
//! stays, asleep until the copy is done), their copy buffers (each pool thread has one,
//! grown to the largest chunk it has copied), and the night shift of `cow_buffer`
//! (priority.rs): the pool's threads run at the pool's priority.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::options::WorkerPriority;
use super::worker::{self, Step};
use super::JobShared;
use crate::buf::AlignedBuf;
use crate::error::{Error, ErrorKind, Result};

/// Longest a pool thread sleeps with jobs attached before it looks at them again.
pub(crate) const IDLE_POLL: Duration = Duration::from_millis(10);

/// Most threads in a pool.
pub const MAX_POOL_THREADS: usize = 256;

static NEXT_POOL: AtomicU64 = AtomicU64::new(1);

/// Background copy threads shared by the jobs started with it (see the module doc of
/// `job/pool.rs`, and PERFORMANCE.md for what it saves: 1 000 jobs in one process hold
/// 3 001 threads and 2 GiB of copy buffers with their own workers).
///
/// Threads: `cowbackup-p<P>-<n>`, started by [`WorkerPool::new`], running until the
/// pool is dropped. The drivers' `read_at`/`write_at`/... of every job in the pool are
/// called from them (instead of the job's `cowbackup-<id>-<n>` workers). A request
/// that hangs holds its pool thread: the other jobs share the rest.
///
/// Dropping the last reference (the jobs started with the pool hold one each) stops the
/// threads and joins them, except the calling thread when it is one of them.
/// `Send + Sync`.
pub struct WorkerPool {
    inner: Arc<PoolInner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool").field("id", &self.inner.id).field("threads", &self.inner.threads).finish()
    }
}

pub(crate) struct PoolInner {
    id: u64,
    threads: usize,
    state: Mutex<PoolState>,
    cv: Condvar,
    /// Pool threads asleep in `cv` (only then does a hook's saved data wake one).
    sleeping: AtomicUsize,
}

struct PoolState {
    jobs: Vec<Arc<JobShared>>,
    /// Where the next round starts (round robin within a priority class).
    next: usize,
    shutdown: bool,
}

/// A job's attachment to its pool: pool threads copying for it now, and whether the
/// pool is done with it. Protected by this mutex in [`JobShared`].
#[derive(Default)]
pub(crate) struct Attachment {
    active: usize,
    finished: bool,
}

impl WorkerPool {
    /// A pool of `threads` threads (1 to [`MAX_POOL_THREADS`]) at CPU and I/O priority
    /// `priority` (best effort, as for a job's own workers).
    ///
    /// Errors: `InvalidInput` (EINVAL) for a thread count out of range; `Io` (EAGAIN)
    /// when a thread cannot be started (those started are stopped again).
    pub fn new(threads: usize, priority: WorkerPriority) -> Result<Arc<WorkerPool>> {
        if threads == 0 || threads > MAX_POOL_THREADS {
            return Err(Error::invalid(format!(
                "pool threads {threads} is invalid: it must be from 1 to {MAX_POOL_THREADS}"
            )));
        }
        let inner = Arc::new(PoolInner {
            id: NEXT_POOL.fetch_add(1, Ordering::Relaxed),
            threads,
            state: Mutex::new(PoolState { jobs: Vec::new(), next: 0, shutdown: false }),
            cv: Condvar::new(),
            sleeping: AtomicUsize::new(0),
        });
        let pool = WorkerPool { inner: Arc::clone(&inner), threads: Mutex::new(Vec::with_capacity(threads)) };
        for n in 1..=threads {
            let i = Arc::clone(&inner);
            let h = std::thread::Builder::new()
                .name(format!("cowbackup-p{}-{n}", inner.id))
                .spawn(move || i.run(priority))
                .map_err(|e| Error::new(ErrorKind::Io, libc::EAGAIN, format!("cannot start pool thread: {e}")))?;
            pool.threads.lock().unwrap_or_else(|e| e.into_inner()).push(h);
        }
        Ok(Arc::new(pool))
    }

    /// The number of threads.
    pub fn threads(&self) -> usize {
        self.inner.threads
    }

    /// Jobs attached now (copying, or waiting for their turn).
    pub fn jobs(&self) -> usize {
        self.inner.lock().jobs.len()
    }

    pub(crate) fn inner(&self) -> &Arc<PoolInner> {
        &self.inner
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.inner.lock().shutdown = true;
        self.inner.cv.notify_all();
        let me = std::thread::current().id();
        for h in std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner())) {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }
}

/// Ordering class of a job's priority: lower goes first.
fn class(p: WorkerPriority) -> u8 {
    match p {
        WorkerPriority::Normal => 0,
        WorkerPriority::Low => 1,
        WorkerPriority::Idle => 2,
    }
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A job's thread hands its background copy to the pool.
    pub(crate) fn attach(&self, job: &Arc<JobShared>) {
        self.lock().jobs.push(Arc::clone(job));
        self.cv.notify_all();
    }

    /// Wake a sleeping pool thread: a job has work that did not wait for the clock (a
    /// hook queued saved data, a resume). Nothing when none sleeps.
    pub(crate) fn poke(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) > 0 {
            drop(self.lock());
            self.cv.notify_one();
        }
    }

    /// The jobs in the order this round tries them, or `None` when the pool stops.
    fn round(&self) -> Option<Vec<Arc<JobShared>>> {
        let mut st = self.lock();
        loop {
            // Jobs the pool is done with leave (their job thread has been told). They are
            // dropped with the lock released: the last reference to a job may be the
            // pool's, and the job's drop may drop the pool (whose drop takes the lock).
            if st.jobs.iter().any(|j| j.pool_attachment().finished) {
                let (gone, keep): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut st.jobs).into_iter().partition(|j| j.pool_attachment().finished);
                st.jobs = keep;
                drop(st);
                drop(gone);
                st = self.lock();
                continue;
            }
            if !st.jobs.is_empty() {
                break;
            }
            if st.shutdown {
                return None;
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let n = st.jobs.len();
        let k = st.next % n;
        st.next = st.next.wrapping_add(1);
        let mut order: Vec<Arc<JobShared>> = st.jobs[k..].iter().chain(&st.jobs[..k]).cloned().collect();
        order.sort_by_key(|j| class(j.worker_priority)); // stable: the turn within a class stays
        Some(order)
    }

    /// Body of pool thread `cowbackup-p<P>-<n>`.
    fn run(self: Arc<Self>, priority: WorkerPriority) {
        super::priority::lower_this_thread(priority);
        let mut buf = AlignedBuf::new();
        while let Some(order) = self.round() {
            let mut soonest: Option<Duration> = None;
            let mut worked = false;
            for job in &order {
                match self.turn(job, &mut buf) {
                    Step::Worked => {
                        worked = true;
                        break;
                    }
                    Step::Wait(d) => soonest = soonest.into_iter().chain(d).min(),
                    Step::Finished => {}
                }
            }
            drop(order);
            if !worked {
                self.sleep(soonest.map_or(IDLE_POLL, |d| d.min(IDLE_POLL)));
            }
        }
    }

    /// Sleep up to `d`, or until poked, attached to or stopped.
    fn sleep(&self, d: Duration) {
        if d.is_zero() {
            return;
        }
        let deadline = Instant::now() + d;
        let st = self.lock();
        self.sleeping.fetch_add(1, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if !st.shutdown {
            let left = deadline.saturating_duration_since(Instant::now());
            drop(self.cv.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()));
        }
        self.sleeping.fetch_sub(1, Ordering::SeqCst);
    }

    /// One turn at `job`: one chunk copied (or saved data written), or why not.
    fn turn(&self, job: &Arc<JobShared>, buf: &mut AlignedBuf) -> Step {
        {
            let mut a = job.pool_attachment();
            if a.finished {
                return Step::Finished;
            }
            if a.active >= job.workers {
                return Step::Wait(None);
            }
            a.active += 1;
        }
        let step = worker::step(job, buf);
        let mut a = job.pool_attachment();
        a.active -= 1;
        if matches!(step, Step::Finished) && !a.finished {
            // Nothing is left for the pool (or the job stopped): once the last pool
            // thread inside the job is out, the job thread goes on.
            a.finished = a.active == 0;
            if a.finished {
                drop(a);
                job.pool_done();
                return Step::Finished;
            }
            // Others still copy for it: the last of them sees Finished at its next turn.
            return Step::Wait(None);
        }
        step
    }
}
