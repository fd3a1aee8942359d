//! The backup job: `backup_start`, the `Job` handle, its states and progress.
//!
//! Data flow (see DESIGN.md):
//! ```text
//! host write path ─► Job::cow_before_write ─► claims.rs: claim ─► copy.rs: read, zero?, write ─► claims.rs: release (bits cleared) ─► host writes
//! worker.rs      ─► claims.rs: next dirty run, claim ─► copy.rs ─► claims.rs: release ─► progress
//! ```

mod claims;
mod copy;
mod cow;
mod options;
mod policy;
mod priority;
mod ratelimit;
mod worker;

pub use options::{
    BackupOptions, CbwErrorAction, CompletionFn, ErrorAction, SyncMode, MAX_CHUNK_LIMIT, MAX_CLUSTER_SIZE, MAX_WORKERS,
    MIN_CLUSTER_SIZE,
};

use std::any::Any;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::bitmap::Bitmap;
use crate::buf::AlignedBuf;
use crate::driver::{BlockDriver, StatusFlags};
use crate::error::{Error, ErrorKind, Op, Result, Side};
use crate::trace::{TraceAction, TraceEvent, TraceFn};
use claims::Claims;
use copy::{Copied, Copier};
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
}

impl Stats {
    fn add(&self, c: Copied) {
        self.copied.fetch_add(c.data, Ordering::Relaxed);
        self.zero.fetch_add(c.zero, Ordering::Relaxed);
    }
}

struct ControlState {
    state: JobState,
    paused: bool,
    cancel: bool,
    /// The failure, or the error that paused the job (policy `Stop`).
    error: Option<Error>,
    /// The first error given up on under policy `Ignore`: the job's result at the end.
    ignored: Option<Error>,
    /// Set once, when the job ends.
    result: Option<Result<()>>,
    /// The completion callback has returned (or there is none).
    callback_done: bool,
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
    /// Spare hook buffers. Protected by this mutex.
    bufs: Mutex<Vec<AlignedBuf>>,
    on_complete: Option<CompletionFn>,
    on_source_error: ErrorAction,
    on_target_error: ErrorAction,
    on_cbw_error: CbwErrorAction,
    cbw_timeout: Option<Duration>,
    trace: Option<TraceFn>,
    /// Byte ranges given up under `Ignore`, merged, in order of failure. Protected by this mutex.
    failed: Mutex<Vec<(u64, u64)>>,
    /// Hook helper threads still running (with `cbw_timeout`). Protected by this mutex.
    helpers: Mutex<usize>,
    /// Signalled when `helpers` drops.
    helpers_cv: Condvar,
    /// Unallocated source ranges to write as zeroes to a non-zero target (`Top`), before copying.
    zero_target: Mutex<Vec<(u64, u64)>>,
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
        }
    }

    fn take_buf(&self) -> AlignedBuf {
        self.bufs.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default()
    }

    fn put_buf(&self, b: AlignedBuf) {
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        if bufs.len() < 16 {
            bufs.push(b);
        }
    }

    /// Emit a trace event; the event is built only when there is a sink.
    #[inline]
    fn trace(&self, event: impl FnOnce() -> TraceEvent) {
        if let Some(sink) = &self.trace {
            sink(&event());
        }
    }

    /// Change the state under the lock; the trace event follows once the caller unlocks.
    fn set_state(&self, c: &mut ControlState, to: JobState) -> Option<TraceEvent> {
        let from = std::mem::replace(&mut c.state, to);
        (from != to && self.trace.is_some()).then_some(TraceEvent::StateChanged { job: self.id, from, to })
    }

    fn emit(&self, event: Option<TraceEvent>) {
        if let Some(e) = event {
            self.trace(|| e);
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

    /// Policy `Stop`: pause the job with the error; `resume` retries.
    fn stop_on_error(&self, e: Error) {
        let mut c = self.lock();
        if c.cancel || c.state.is_terminal() {
            return;
        }
        c.paused = true;
        c.error = Some(e);
        let ev = self.set_state(&mut c, JobState::Paused);
        drop(c);
        self.emit(ev);
        self.control_cv.notify_all();
    }

    /// Policy `Ignore`: clusters given up. The job goes on and ends `Failed` with the first such error.
    fn record_failed(&self, off: u64, len: u64, e: Error) {
        self.stats.failed.fetch_add(len, Ordering::Relaxed);
        push_merged(&mut self.failed.lock().unwrap_or_else(|e| e.into_inner()), off, len);
        self.lock().ignored.get_or_insert(e);
    }

    /// Wait while paused (e.g. by `Stop`); false when the job is stopping instead.
    fn wait_resumed(&self) -> bool {
        let mut c = self.lock();
        while c.paused && !self.stop.load(Ordering::Acquire) {
            c = self.control_cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        !self.stop.load(Ordering::Acquire)
    }

    /// Run one target-side operation of the job thread (zeroing, flush) under the
    /// target policy: `Stop` pauses and retries on resume, anything else fails the job.
    fn target_op(&self, mut op: impl FnMut() -> Result<()>) -> Result<()> {
        loop {
            match op() {
                Ok(()) => return Ok(()),
                Err(e) => match self.reaction(&e) {
                    Reaction::Stop => {
                        self.stop_on_error(e.clone());
                        if !self.wait_resumed() {
                            return Err(e);
                        }
                    }
                    _ => return Err(e),
                },
            }
        }
    }

    /// Record a failure of the background copy: the job stops and ends `Failed`.
    fn fail(&self, e: Error) {
        let mut c = self.lock();
        c.error.get_or_insert(e);
        self.stop.store(true, Ordering::Release);
        drop(c);
        self.control_cv.notify_all();
        self.claims.wake_all();
    }

    /// Block a worker while the job is paused or over its speed limit. False when the
    /// worker must stop.
    fn wait_runnable(&self) -> bool {
        let mut c = self.lock();
        loop {
            if self.stop.load(Ordering::Acquire) {
                return false;
            }
            if c.paused {
                c = self.control_cv.wait(c).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let d = self.ratelimit.delay();
            if d.is_zero() {
                return true;
            }
            c = self.control_cv.wait_timeout(c, d).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The job thread: prepare, run the workers, flush, set the final state.
    fn run(self: &Arc<Self>) {
        let result = match catch_unwind(AssertUnwindSafe(|| self.run_inner())) {
            Ok(r) => r,
            Err(p) => Err(panic_error("job thread", p)),
        };
        self.finish(result);
    }

    fn run_inner(self: &Arc<Self>) -> Result<()> {
        let zero_target = std::mem::take(&mut *self.zero_target.lock().unwrap_or_else(|e| e.into_inner()));
        for (off, len) in zero_target {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            self.target_op(|| {
                self.target
                    .write_zeroes_at(off, len)
                    .map_err(|e| Error::io(Side::Target, Op::WriteZeroes, off, len, &e))
            })?;
        }
        if self.sync == SyncMode::None {
            // Serve the hook until cancelled, or failed by a hook under BreakSnapshot.
            let mut c = self.lock();
            while !c.cancel && c.error.is_none() {
                c = self.control_cv.wait(c).unwrap_or_else(|e| e.into_inner());
            }
            return Err(if c.cancel { Error::cancelled() } else { c.error.clone().expect("checked above") });
        }
        let spawn_error = thread::scope(|scope| {
            let mut spawn_error = None;
            for n in 1..=self.workers {
                let r = thread::Builder::new()
                    .name(format!("cowbackup-{}-{}", self.id, n))
                    .spawn_scoped(scope, || worker::run(self));
                if let Err(e) = r {
                    spawn_error =
                        Some(Error::new(ErrorKind::Io, libc::EAGAIN, format!("cannot start worker thread: {e}")));
                    self.fail(spawn_error.clone().unwrap());
                    break;
                }
            }
            spawn_error
        });
        let c = self.lock();
        if c.cancel {
            return Err(Error::cancelled());
        }
        if let Some(e) = c.error.clone().or(spawn_error) {
            return Err(e);
        }
        drop(c);
        debug_assert_eq!(self.claims.dirty(), 0);
        self.target_op(|| self.target.flush().map_err(|e| Error::io(Side::Target, Op::Flush, 0, self.geo.size, &e)))?;
        let c = self.lock();
        if c.cancel {
            return Err(Error::cancelled());
        }
        // Under `Ignore`, clusters were given up: not a point-in-time image.
        match c.ignored.clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn finish(&self, result: Result<()>) {
        self.hook_off.store(true, Ordering::Release);
        self.stop.store(true, Ordering::Release);
        let mut c = self.lock();
        let state = match &result {
            Ok(()) => JobState::Completed,
            Err(e) if e.kind() == ErrorKind::Cancelled => JobState::Cancelled,
            Err(_) => JobState::Failed,
        };
        c.error = match &result {
            Err(e) if state == JobState::Failed => Some(e.clone()),
            _ => None,
        };
        c.paused = false;
        let ev = self.set_state(&mut c, state);
        c.result = Some(result.clone());
        c.callback_done = self.on_complete.is_none();
        drop(c);
        self.emit(ev);
        self.control_cv.notify_all();
        self.claims.wake_all();
        if let Some(cb) = &self.on_complete {
            // A panicking callback must not take the library thread down with it.
            let _ = catch_unwind(AssertUnwindSafe(|| cb(&result)));
            self.lock().callback_done = true;
            self.control_cv.notify_all();
        }
    }
}

/// A running backup job. All methods take `&self` and may be called from any thread;
/// share the job with `Arc` or scoped threads. Dropping the job cancels it (if still
/// running) and waits for its threads.
pub struct Job {
    shared: Arc<JobShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    thread_id: ThreadId,
}

/// Start a point-in-time backup of `source` into `target`.
///
/// The image in the target, once the job completes, is the source as it was when this
/// function returned, provided the host calls [`Job::cow_before_write`] before every
/// write to the source. Copying runs on the job's own threads (`cowbackup-<id>` and
/// workers `cowbackup-<id>-<n>`).
///
/// # Errors
/// `InvalidInput` (nothing is written) when an option is out of range, the devices
/// differ in size or have size 0, or source and target are the same device; an I/O
/// error when the source's `block_status` fails while the job sets up; `Io` (EAGAIN)
/// when the job thread cannot be started.
pub fn backup_start(source: Arc<dyn BlockDriver>, target: Arc<dyn BlockDriver>, opts: BackupOptions) -> Result<Job> {
    opts.validate()?;
    if std::ptr::eq(Arc::as_ptr(&source) as *const u8, Arc::as_ptr(&target) as *const u8) {
        return Err(Error::invalid("source and target are the same device"));
    }
    if let (Some(a), Some(b)) = (source.storage_id(), target.storage_id()) {
        if a == b {
            return Err(Error::invalid("source and target are the same file or device"));
        }
    }
    let size = source.size();
    if size == 0 {
        return Err(Error::invalid("the source has size 0: nothing to back up"));
    }
    if target.size() != size {
        return Err(Error::invalid(format!(
            "source and target differ in size: source {} bytes, target {} bytes",
            size,
            target.size()
        )));
    }
    let cs = opts.cluster_size;
    let clusters = size.div_ceil(cs);
    let geo = Geometry {
        size,
        cluster_size: cs,
        shift: cs.trailing_zeros(),
        clusters,
        max_run: (opts.max_chunk / cs).max(1),
    };
    let target_zero = opts.target_is_zero || target.reads_as_zero();
    let bitmap = Bitmap::try_new(clusters, true).ok_or_else(|| {
        Error::new(
            ErrorKind::OutOfMemory,
            libc::ENOMEM,
            format!("cannot allocate the copy bitmap of {clusters} clusters (device of {size} bytes)"),
        )
    })?;
    let claims = Claims::new(bitmap);
    let stats = Stats::default();
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let trace = opts.trace.or_else(crate::trace::from_env);
    let scan =
        Scan { geo: &geo, sync: opts.sync, target_zero, claims: &claims, stats: &stats, trace: trace.as_ref(), id };
    let zero_target = scan.run(&*source)?;

    let shared = Arc::new(JobShared {
        id,
        source,
        target,
        geo,
        sync: opts.sync,
        workers: opts.workers,
        target_zero,
        claims,
        stats,
        hook_off: CachePadded::new(AtomicBool::new(false)),
        stop: AtomicBool::new(false),
        cursor: AtomicU64::new(0),
        ratelimit: RateLimit::new(opts.speed),
        control: Mutex::new(ControlState {
            state: JobState::Running,
            paused: false,
            cancel: false,
            error: None,
            ignored: None,
            result: None,
            callback_done: false,
        }),
        control_cv: Condvar::new(),
        hook_gate: HookGate::default(),
        bufs: Mutex::new(Vec::new()),
        on_complete: opts.on_complete,
        on_source_error: opts.on_source_error,
        on_target_error: opts.on_target_error,
        on_cbw_error: opts.on_cbw_error,
        cbw_timeout: opts.cbw_timeout,
        trace,
        failed: Mutex::new(Vec::new()),
        helpers: Mutex::new(0),
        helpers_cv: Condvar::new(),
        zero_target: Mutex::new(zero_target),
    });
    let s = Arc::clone(&shared);
    let handle = thread::Builder::new()
        .name(format!("cowbackup-{}", shared.id))
        .spawn(move || s.run())
        .map_err(|e| Error::new(ErrorKind::Io, libc::EAGAIN, format!("cannot start job thread: {e}")))?;
    let thread_id = handle.thread().id();
    Ok(Job { shared, thread: Mutex::new(Some(handle)), thread_id })
}

/// What the start-up scan of the source needs.
struct Scan<'a> {
    geo: &'a Geometry,
    sync: SyncMode,
    target_zero: bool,
    claims: &'a Claims,
    stats: &'a Stats,
    trace: Option<&'a TraceFn>,
    id: u64,
}

impl Scan<'_> {
    /// Walk the source's block status once, at start (the point in time), and mark clean
    /// what needs no copy: unallocated clusters under `Top` (skipped), and zero clusters
    /// when the target already reads zeroes (traced as `ZeroClusters`). Returns byte
    /// ranges to zero in the target.
    fn run(&self, source: &dyn BlockDriver) -> Result<Vec<(u64, u64)>> {
        let (geo, sync, target_zero) = (self.geo, self.sync, self.target_zero);
        let mut zero_target = Vec::new();
        if sync != SyncMode::Top && !target_zero {
            return Ok(zero_target);
        }
        let size = geo.size;
        let mut off = 0;
        while off < size {
            let st = source
                .block_status(off, size - off)
                .map_err(|e| Error::io(Side::Source, Op::BlockStatus, off, size - off, &e))?;
            // A driver that answers 0 bytes tells nothing: treat the rest as data.
            let (len, flags) =
                if st.len == 0 { (size - off, StatusFlags::DATA) } else { (st.len.min(size - off), st.flags) };
            let end = off + len;
            // Only clusters that lie wholly inside this extent.
            let first = off.div_ceil(geo.cluster_size);
            let last = if end == size { geo.clusters } else { end / geo.cluster_size };
            if first < last {
                let (b_off, b_len) = geo.byte_range(first..last);
                if sync == SyncMode::Top && !flags.contains(StatusFlags::DATA) {
                    self.claims.clear_unclaimed(first..last);
                    self.stats.skipped.fetch_add(b_len, Ordering::Relaxed);
                    if !target_zero && flags.contains(StatusFlags::ZERO) {
                        push_merged(&mut zero_target, b_off, b_len);
                    }
                } else if target_zero && flags.contains(StatusFlags::ZERO) {
                    self.claims.clear_unclaimed(first..last);
                    self.stats.zero.fetch_add(b_len, Ordering::Relaxed);
                    if let Some(sink) = self.trace {
                        sink(&TraceEvent::ZeroClusters { job: self.id, offset: b_off, len: b_len });
                    }
                }
            }
            off = end;
        }
        Ok(zero_target)
    }
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

    /// Pause the background copy: workers stop before their next chunk (chunks in
    /// flight finish). The hook keeps working. Idempotent.
    ///
    /// # Errors
    /// `Busy` when the job has ended.
    pub fn pause(&self) -> Result<()> {
        let mut c = self.shared.lock();
        if c.state.is_terminal() {
            return Err(Error::new(ErrorKind::Busy, libc::EBUSY, "the job has ended"));
        }
        c.paused = true;
        let ev = self.shared.set_state(&mut c, JobState::Paused);
        drop(c);
        self.shared.emit(ev);
        Ok(())
    }

    /// Resume a paused job, also one paused by an error under policy `Stop`: the error
    /// is cleared and the failed clusters are retried. Idempotent.
    ///
    /// # Errors
    /// `Busy` when the job has ended.
    pub fn resume(&self) -> Result<()> {
        let mut c = self.shared.lock();
        if c.state.is_terminal() {
            return Err(Error::new(ErrorKind::Busy, libc::EBUSY, "the job has ended"));
        }
        c.paused = false;
        c.error = None;
        let ev = self.shared.set_state(&mut c, JobState::Running);
        drop(c);
        self.shared.emit(ev);
        self.shared.control_cv.notify_all();
        Ok(())
    }

    /// Byte ranges `(offset, len)` given up under the `Ignore` policy: what the target
    /// lacks. Empty when nothing failed.
    pub fn failed_ranges(&self) -> Vec<(u64, u64)> {
        self.shared.failed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Cancel the job: from now on the hook is a no-op, workers stop after their current
    /// chunk, and the job ends `Cancelled`. Returns at once; [`Job::wait`] waits for the
    /// end. No effect on a job that has ended.
    pub fn cancel(&self) {
        let mut c = self.shared.lock();
        if c.state.is_terminal() || c.cancel {
            return;
        }
        c.cancel = true;
        self.shared.hook_off.store(true, Ordering::Release);
        self.shared.stop.store(true, Ordering::Release);
        drop(c);
        self.shared.control_cv.notify_all();
        self.shared.claims.wake_all();
    }

    /// Change the background speed limit (bytes/s, 0 = unlimited); effective within
    /// one 100 ms slice.
    pub fn set_speed(&self, bytes_per_sec: u64) {
        self.shared.ratelimit.set_speed(bytes_per_sec);
        self.shared.control_cv.notify_all();
    }

    /// Block until the job ends and return its result: `Ok` when it completed (the
    /// target is an exact point-in-time image), `Cancelled`, or the error that failed it.
    /// The completion callback has returned when this does (except when called from
    /// the callback itself).
    pub fn wait(&self) -> Result<()> {
        let mut c = self.shared.lock();
        loop {
            if let Some(r) = self.ended(&c) {
                return r;
            }
            c = self.shared.control_cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The result, once the job has ended and its callback has returned (or we are in it).
    fn ended(&self, c: &ControlState) -> Option<Result<()>> {
        let r = c.result.as_ref()?;
        (c.callback_done || thread::current().id() == self.thread_id).then(|| r.clone())
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

    /// State and progress.
    pub fn info(&self) -> JobInfo {
        let s = &self.shared;
        let c = s.lock();
        let (state, error) = (c.state, c.error.clone());
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

impl Drop for Job {
    fn drop(&mut self) {
        self.cancel();
        let handle = self.thread.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        // Dropped from its own completion callback: the thread ends by itself.
        if thread::current().id() != self.thread_id {
            if let Some(h) = handle {
                let _ = h.join();
            }
        }
        // Hook helpers (cbw_timeout) still copying hold the drivers: wait for them so no
        // driver call happens after the job is gone.
        let s = &self.shared;
        let mut n = s.helpers.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            n = s.helpers_cv.wait(n).unwrap_or_else(|e| e.into_inner());
        }
    }
}
