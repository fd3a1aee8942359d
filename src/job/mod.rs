//! The backup job: `backup_start`, the `Job` handle, its states and progress.
//!
//! Data flow (see DESIGN.md):
//! ```text
//! host write path ─► Job::cow_before_write ─► claims.rs: claim ─► copy.rs: read, zero?, write ─► claims.rs: release (bits cleared) ─► host writes
//! worker.rs      ─► claims.rs: next dirty run, claim ─► copy.rs ─► claims.rs: release ─► progress
//! ```
//!
//! With `cow_buffer` (cowbuf.rs, off by default) a hook with room in the buffer stops
//! after the read: the claim stays, marked saved, and the host writes at once; a worker
//! then writes the saved data (`worker.rs: write_saved`, before any chunk) and releases it.

mod claims;
mod copy;
mod cow;
mod cowbuf;
mod group;
mod lifecycle;
mod options;
mod policy;
mod pool;
mod prefetch;
mod priority;
mod ratelimit;
mod reentry;
mod snapshot;
mod start;
mod worker;
mod writeback;

pub use snapshot::SnapshotView;

pub use pool::{WorkerPool, MAX_POOL_THREADS};
pub(crate) use reentry::enter as enter_job;
pub use start::{backup_start, backup_start_group, GroupMember};

pub use options::{
    BackupOptions, BitmapMode, CbwErrorAction, CompletionFn, ErrorAction, SyncMode, WorkerPriority, MAX_CHUNK_LIMIT,
    MAX_CLUSTER_SIZE, MAX_WORKERS, MIN_CLUSTER_SIZE,
};

use std::any::Any;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::bitmap::Bitmap;
use crate::buf::AlignedBuf;
use crate::dirty::DirtyBitmap;
use crate::driver::BlockDriver;
use crate::error::{Error, ErrorKind, Result, Side};
use crate::trace::{TraceAction, TraceEvent, TraceFn};
use claims::Claims;
use copy::{Copied, Copier};
use lifecycle::ControlState;
use policy::Reaction;
use priority::HookGate;
use ratelimit::RateLimit;

/// The life of a job: `Created → Running ⇄ Paused → Completed | Failed | Cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Set up, not yet running (only seen for an instant).
    Created,
    /// Copying in the background (or, with [`SyncMode::None`], serving the hook).
    Running,
    /// Background copy paused; the hook keeps working.
    Paused,
    /// Ended with an exact point-in-time image in the target.
    Completed,
    /// Ended with an error; the target is not a valid image.
    Failed,
    /// Ended by `cancel`.
    Cancelled,
}

impl JobState {
    /// True for `Completed`, `Failed` and `Cancelled`.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Completed | JobState::Failed | JobState::Cancelled)
    }
}

/// A snapshot of a job's state and progress (`Job::info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// Current state.
    pub state: JobState,
    /// The failure, or the error that paused the job; `None` otherwise.
    pub error: Option<Error>,
    /// Bytes to process: the device size.
    pub len: u64,
    /// Bytes done: `bytes_copied + bytes_zero + bytes_skipped + bytes_failed`.
    pub offset: u64,
    /// Data read from the source and written to the target.
    pub bytes_copied: u64,
    /// Clusters that read as zero (written as zeroes, or left alone in a zero target).
    pub bytes_zero: u64,
    /// Clusters the sync mode leaves out (unallocated under `Top`).
    pub bytes_skipped: u64,
    /// Clusters that could not be copied.
    pub bytes_failed: u64,
    /// Hook calls that had to copy something.
    pub cow_requests: u64,
    /// Bytes those hook calls copied.
    pub cow_bytes: u64,
    /// Times a hook call waited for clusters another thread (a worker or another hook)
    /// was copying. Rust only (not in `cowbackup_job_info`).
    pub cow_waits: u64,
    /// Current speed limit in bytes/s (0 = unlimited).
    pub speed: u64,
}

/// Sizes in bytes and clusters of one job.
#[derive(Debug, Clone)]
pub(crate) struct Geometry {
    pub size: u64,
    pub cluster_size: u64,
    pub shift: u32,
    pub clusters: u64,
    /// Longest background run, in clusters.
    pub max_run: u64,
}

impl Geometry {
    /// The bytes of clusters `c`, clipped to the device: (offset, len).
    pub fn byte_range(&self, c: Range<u64>) -> (u64, u64) {
        let start = c.start << self.shift;
        let end = c.end.saturating_mul(self.cluster_size).min(self.size);
        (start, end - start)
    }

    /// The clusters touched by bytes `[start, end)`, `start < end`.
    pub fn clusters_of(&self, start: u64, end: u64) -> Range<u64> {
        (start >> self.shift)..((end - 1) >> self.shift) + 1
    }
}

#[derive(Default)]
struct Stats {
    copied: AtomicU64,
    zero: AtomicU64,
    skipped: AtomicU64,
    failed: AtomicU64,
    cow_requests: AtomicU64,
    cow_bytes: AtomicU64,
    /// Clusters a snapshot view's reader discarded (they leave the target).
    discarded: AtomicU64,
}

impl Stats {
    fn add(&self, c: Copied) {
        self.copied.fetch_add(c.data, Ordering::Relaxed);
        self.zero.fetch_add(c.zero, Ordering::Relaxed);
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Append the byte range `(off, len)` to `ranges`, merged into the last one when it
/// follows it directly.
fn push_merged(ranges: &mut Vec<(u64, u64)>, off: u64, len: u64) {
    match ranges.last_mut() {
        Some((o, l)) if *o + *l == off => *l += len,
        _ => ranges.push((off, len)),
    }
}

/// Everything a job's threads share.
pub(crate) struct JobShared {
    id: u64,
    source: Arc<dyn BlockDriver>,
    target: Arc<dyn BlockDriver>,
    geo: Geometry,
    sync: SyncMode,
    workers: usize,
    /// CPU and I/O priority each worker gives itself at start (priority.rs).
    worker_priority: WorkerPriority,
    target_zero: bool,
    /// Copy bitmap and in-flight claims (own lock: see claims.rs).
    claims: Claims,
    stats: Stats,
    /// The hook is a no-op from now on (cancelled or ended). Read on every hook call.
    hook_off: CachePadded<AtomicBool>,
    /// Workers must stop at the next chunk (cancelled or failed).
    stop: AtomicBool,
    /// Where the next background search starts (a hint; workers race on it harmlessly).
    cursor: AtomicU64,
    ratelimit: RateLimit,
    /// State, pause and cancel requests, errors and the result. Protected by this
    /// mutex, which is never held across I/O or a user callback.
    control: Mutex<ControlState>,
    /// Signalled on every change of `control` and of the speed.
    control_cv: Condvar,
    /// Hook calls copying now: workers start no new chunk meanwhile (see priority.rs).
    hook_gate: HookGate,
    /// The source file without readahead, for the job's reads (copy.rs).
    exact_reader: Option<crate::FileDriver>,
    /// Copy offload pays from the source to the target (copy.rs), asked once at start.
    offload_pays: bool,
    /// Which copied runs have their target's writeback started at once (writeback.rs).
    writeback: writeback::Writeback,
    /// Read-ahead of a sparse copy set's next runs (prefetch.rs).
    prefetch: prefetch::Prefetch,
    /// The pool whose threads copy for this job instead of its own workers (pool.rs).
    pool: Option<Arc<pool::WorkerPool>>,
    /// Pool threads copying for this job now, and whether the pool is done with it.
    attachment: Mutex<pool::Attachment>,
    /// Spare hook buffers: at most 16, or with a cow buffer as many as its capacity
    /// holds (a saved claim's buffer comes back when a worker has written it; a fresh
    /// one would cost the hook a page fault per 4 KiB). Protected by this mutex.
    bufs: Mutex<Vec<AlignedBuf>>,
    on_complete: Option<CompletionFn>,
    on_source_error: ErrorAction,
    on_target_error: ErrorAction,
    on_cbw_error: CbwErrorAction,
    cbw_timeout: Option<Duration>,
    trace: Option<TraceFn>,
    /// Byte ranges given up under `Ignore`, merged, in order of failure. Protected by this mutex.
    failed: Mutex<Vec<(u64, u64)>>,
    /// Hook helper threads still running (with `cbw_timeout`). Its own `Arc`, so a
    /// helper leaves it only after dropping its reference to the job.
    helpers: Arc<Helpers>,
    /// The workers' copy buffers, allocated at start; each worker takes one.
    worker_bufs: Mutex<Vec<AlignedBuf>>,
    /// Unallocated source ranges to write as zeroes to a non-zero target (`Top`), before copying.
    zero_target: Mutex<Vec<(u64, u64)>>,
    /// The dirty bitmap frozen by this job, given back at the end (lifecycle.rs).
    dirty: Option<Arc<DirtyBitmap>>,
    bitmap_mode: BitmapMode,
    /// The consistency group, if started with `backup_start_group`.
    group: Option<Arc<group::Group>>,
    /// Clusters a snapshot view does not serve (outside the job's bitmap, or discarded).
    unservable: Bitmap,
    /// After copying a chunk, discard it on the source (a push from a snapshot view).
    discard_source: bool,
    /// Old data saved by hooks, waiting for a worker to write it (`cow_buffer`).
    cowbuf: cowbuf::CowBuffer,
    /// When the host last took the hook's slow path: workers beyond the CPUs less one rest.
    pace: priority::HostPace,
    /// Workers inside `wait_runnable` or waiting for a release: only then does a hook that
    /// saved old data wake anyone (see `wake_workers`).
    waiting_workers: AtomicUsize,
    /// Resumes so far. Changed under the control lock. A `Stop` error of an I/O that
    /// began before the latest resume does not pause the job again: the resume retries
    /// it (lifecycle.rs `stop_on_error`).
    resumes: std::sync::atomic::AtomicU64,
    /// The manifest to write on completion, and the digests recorded for it (repo/).
    manifest: Option<crate::repo::ManifestPlan>,
}

/// A worker counted in `JobShared::waiting_workers` while this lives.
pub(crate) struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    /// Count the calling worker as waiting; the fence orders the count before the
    /// worker's next look at the cow buffer (pairs with the one in `wake_workers`).
    fn new(n: &'a AtomicUsize) -> Waiting<'a> {
        n.fetch_add(1, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A count of running hook helper threads, and a condvar signalled when it drops; and
/// their handles, so that the job's end joins the threads themselves.
#[derive(Default)]
pub(crate) struct Helpers {
    /// Helper threads running. Protected by this mutex.
    running: Mutex<usize>,
    idle: Condvar,
    /// Handles of helper threads not joined yet. Protected by this mutex.
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Helpers {
    /// Keep a new helper's handle; join those that have finished (so a long job with many
    /// timed hook calls keeps few handles).
    fn adopt(&self, h: JoinHandle<()>) {
        let mut hs = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut *hs).into_iter().partition(|h| h.is_finished());
        *hs = running;
        hs.push(h);
        drop(hs);
        for h in done {
            let _ = h.join();
        }
    }

    /// Wait until no helper runs, then join every helper thread: none is left running
    /// (not even its thread-local destructors) when this returns.
    fn join_all(&self) {
        self.wait_idle();
        let hs = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|e| e.into_inner()));
        for h in hs {
            let _ = h.join();
        }
    }

    fn enter(&self) {
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    fn leave(&self) {
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.idle.notify_all();
    }

    fn wait_idle(&self) {
        let mut n = self.running.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn panic_error(what: &str, payload: Box<dyn Any + Send>) -> Error {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    Error::new(ErrorKind::Io, libc::EIO, format!("{what} panicked: {msg}"))
}

impl JobShared {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn copier(&self) -> Copier<'_> {
        Copier {
            source: &*self.source,
            target: &*self.target,
            geo: &self.geo,
            target_zero: self.target_zero,
            trace: self.trace.as_ref(),
            job: self.id,
            record: self.manifest.as_ref().map(|m| &m.rec),
            offload_pays: self.offload_pays,
            reader: self.exact_reader.as_ref(),
            pace: Some(&self.pace),
            writeback: self.writeback,
        }
    }

    /// A hook buffer of at least `len` bytes; `OutOfMemory` (ENOMEM) when it cannot be
    /// had: never an abort of the host in its write path.
    fn take_buf(&self, len: u64) -> Result<AlignedBuf> {
        let mut b = self.bufs.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        match b.try_reserve(len as usize) {
            Ok(()) => Ok(b),
            Err(_) => {
                self.put_buf(b);
                Err(Error::new(
                    ErrorKind::OutOfMemory,
                    libc::ENOMEM,
                    format!("copy-before-write: cannot allocate a copy buffer of {len} bytes"),
                ))
            }
        }
    }

    /// Wake workers waiting for a release, the speed limit or a resume: a hook has queued
    /// saved old data for them (cowbuf.rs). Nobody is woken when no worker waits (a busy
    /// worker looks at the buffer before its next chunk): no spurious wake-up of `wait`
    /// callers and hooks on every host write. The fence pairs with the one in
    /// [`Waiting::new`]: either this sees the worker counted, or the worker sees the data.
    fn wake_workers(&self) {
        if let Some(p) = &self.pool {
            p.inner().poke();
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.waiting_workers.load(Ordering::SeqCst) == 0 {
            return;
        }
        drop(self.lock());
        self.control_cv.notify_all();
        self.claims.wake_all();
    }

    /// The job's attachment to its pool (pool.rs).
    fn pool_attachment(&self) -> MutexGuard<'_, pool::Attachment> {
        self.attachment.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn put_buf(&self, b: AlignedBuf) {
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        if bufs.len() < 16
            || bufs.iter().map(|b| b.capacity() as u64).sum::<u64>() + b.capacity() as u64 <= self.cowbuf.capacity()
        {
            bufs.push(b);
        }
    }

    /// Emit a trace event; the event is built only when there is a sink. The sink runs
    /// inside the job (see reentry.rs) and can never unwind into the library.
    #[inline]
    fn trace(&self, event: impl FnOnce() -> TraceEvent) {
        if let Some(sink) = &self.trace {
            crate::trace::deliver(sink, self.id, &event());
        }
    }

    /// The background policy for an error: by the side it came from.
    fn reaction(&self, e: &Error) -> Reaction {
        let action = match e.context().map(|c| c.side) {
            Some(Side::Source) => self.on_source_error,
            _ => self.on_target_error,
        };
        let r = action.react(e);
        let t = match r {
            Reaction::Report => TraceAction::Report,
            Reaction::Ignore => TraceAction::Ignore,
            Reaction::Stop => TraceAction::Stop,
        };
        self.trace(|| TraceEvent::Error { job: self.id, error: e.clone(), action: t });
        r
    }
}

/// A running backup job. `Job` is `Send + Sync`: all methods take `&self` and may be
/// called from any thread at once; share it with `Arc<Job>` (the host's write path on
/// many threads, a control thread calling `pause`/`cancel`/`wait`) or scoped threads.
/// Dropping the job cancels it (if still running) and waits for its threads.
pub struct Job {
    shared: Arc<JobShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The process that started the job: in a `fork`ed child the job's threads do not exist.
    creator_pid: u32,
}

impl Job {
    /// The job's id, as in its thread names `cowbackup-<id>-<n>`.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// Size of the devices in bytes.
    pub fn len(&self) -> u64 {
        self.shared.geo.size
    }

    /// Always false: a job's devices have a non-zero size.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.shared.geo.cluster_size
    }

    /// The job's copy set as byte extents `(offset, len)`: in order, adjacent clusters
    /// merged, the last cluster clipped to the device. Set when the job starts; it does not
    /// shrink as clusters are copied, and stays available after the job's end. Only a
    /// `discard` through a snapshot view takes clusters out of it.
    ///
    /// - `Full`, `Top`, `None` without a bitmap: the whole device, `[(0, len)]`.
    /// - `Bitmap` (and `None` with a bitmap, pull mode): the clusters overlapping the
    ///   granules dirty in the bitmap at start.
    ///
    /// The **restore rule** of an incremental backup: once the job has completed, the
    /// target holds the point-in-time contents of exactly these extents, and nothing
    /// else is meant. A cluster of the copy set that read as zero may be a hole in the
    /// target (zeroes are not written to a target that reads as zero), so a restore
    /// applies every byte of these extents, holes as zeroes; bytes outside them come
    /// from the earlier backups of the chain. Keep this list with the backup:
    /// [`BackupOptions::manifest`] records it (with a digest per cluster), and
    /// [`crate::repo::Chain`] applies this rule.
    pub fn extents(&self) -> Vec<(u64, u64)> {
        // The copy set is what a snapshot view serves: the clear bits of `unservable`.
        let (geo, out) = (&self.shared.geo, &self.shared.unservable);
        let mut extents = Vec::new();
        let mut c = 0;
        while let Some(s) = out.next_clear(c, geo.clusters) {
            let e = out.next_set(s, geo.clusters).unwrap_or(geo.clusters);
            extents.push(geo.byte_range(s..e));
            c = e;
        }
        extents
    }

    /// Pause the background copy: workers stop before their next chunk (chunks in
    /// flight finish). The hook keeps working. Idempotent.
    ///
    /// # Errors
    /// `Busy` when the job has ended, or is ending (failed or cancelled).
    pub fn pause(&self) -> Result<()> {
        self.shared.pause()
    }

    /// Resume a paused job, also one paused by an error under policy `Stop`: the error
    /// is cleared and the failed clusters are retried. Idempotent. A fatal error (policy
    /// `Report`, a hook under `BreakSnapshot`) is final: resume does not undo it.
    ///
    /// # Errors
    /// `Busy` when the job has ended, or is ending (failed or cancelled).
    pub fn resume(&self) -> Result<()> {
        self.shared.resume()
    }

    /// Byte ranges `(offset, len)` given up under the `Ignore` policy: what the target
    /// lacks. Empty when nothing failed.
    pub fn failed_ranges(&self) -> Vec<(u64, u64)> {
        self.shared.failed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Cancel the job: from now on the hook is a no-op, workers stop after their current
    /// chunk, and the job ends `Cancelled`. Returns at once; [`Job::wait`] waits for the
    /// end. No effect on a job that has ended or has already failed (its result stays the
    /// failure), nor on a member of a consistency group once every member has finished
    /// copying (the group is committed: it completes, see [`crate::backup_start_group`]).
    pub fn cancel(&self) {
        self.shared.cancel()
    }

    /// Change the background speed limit (bytes/s, 0 = unlimited); a worker waiting
    /// under the old limit wakes at once and applies the new one.
    pub fn set_speed(&self, bytes_per_sec: u64) {
        self.shared.set_speed(bytes_per_sec)
    }

    /// Block until the job ends and return its result: `Ok` when it completed (the
    /// target is an exact point-in-time image), `Cancelled`, or the error that failed it.
    /// The completion callback has returned when this does (except when called from
    /// the callback itself).
    ///
    /// # Errors
    /// Besides the job's result: `Deadlock` (EDEADLK) when called, before the job has
    /// ended, from inside one of the job's own callbacks or driver operations (a worker,
    /// the hook, a trace callback): it would wait for itself.
    pub fn wait(&self) -> Result<()> {
        let mut c = self.shared.lock();
        loop {
            if let Some(r) = self.ended(&c) {
                return r;
            }
            if reentry::inside(self.shared.id) {
                return Err(reentry::deadlock(self.shared.id, "wait"));
            }
            c = self.shared.control_cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The result, once the job has ended and its callback has returned (or we are in
    /// one of the job's callbacks, e.g. the completion callback itself).
    fn ended(&self, c: &ControlState) -> Option<Result<()>> {
        let r = c.result.as_ref()?;
        (c.callback_done || reentry::inside(self.shared.id)).then(|| r.clone())
    }

    /// Like [`Job::wait`], but give up after `timeout`: `None` when still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<()>> {
        let deadline = Instant::now() + timeout;
        let mut c = self.shared.lock();
        loop {
            if let Some(r) = self.ended(&c) {
                return Some(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            c = self.shared.control_cv.wait_timeout(c, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Whether dropping this handle now can do what the C API's `cowbackup_job_free`
    /// promises: `Deadlock` when called from inside one of the job's own callbacks (the
    /// job is cancelled then, and must be freed later from elsewhere).
    #[cfg(feature = "capi")]
    pub(crate) fn check_free(&self) -> Result<()> {
        if std::process::id() == self.creator_pid && reentry::inside(self.shared.id) {
            self.cancel();
            return Err(reentry::deadlock(self.shared.id, "free"));
        }
        Ok(())
    }

    /// State and progress.
    pub fn info(&self) -> JobInfo {
        let s = &self.shared;
        let c = s.lock();
        let (state, error) = (c.state, c.shown_error());
        drop(c);
        let st = &s.stats;
        let copied = st.copied.load(Ordering::Relaxed);
        let zero = st.zero.load(Ordering::Relaxed);
        let skipped = st.skipped.load(Ordering::Relaxed);
        let failed = st.failed.load(Ordering::Relaxed);
        JobInfo {
            state,
            error,
            len: s.geo.size,
            offset: copied + zero + skipped + failed,
            bytes_copied: copied,
            bytes_zero: zero,
            bytes_skipped: skipped,
            bytes_failed: failed,
            cow_requests: st.cow_requests.load(Ordering::Relaxed),
            cow_bytes: st.cow_bytes.load(Ordering::Relaxed),
            cow_waits: s.claims.waits(),
            speed: s.ratelimit.speed(),
        }
    }
}

impl Job {
    /// What dropping the job does, through a shared reference (so a callback running
    /// meanwhile may still look at the job): cancel it and wait for its threads, so that
    /// no driver call happens after the job is gone. Two exceptions: from inside one of
    /// the job's own callbacks, the job's threads end by themselves (joining them would
    /// deadlock); in a `fork`ed child, where the job's threads do not exist, nothing is
    /// touched and the job's memory is left alone (its locks may be held by threads
    /// that are gone).
    pub(crate) fn shut_down(&self) {
        if std::process::id() != self.creator_pid {
            if let Ok(mut t) = self.thread.try_lock() {
                std::mem::forget(t.take());
            }
            std::mem::forget(Arc::clone(&self.shared));
            return;
        }
        self.cancel();
        if reentry::inside(self.shared.id) {
            return;
        }
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        // Hook helpers (cbw_timeout) still copying hold the drivers: wait for them.
        self.shared.helpers.join_all();
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.shut_down();
    }
}
