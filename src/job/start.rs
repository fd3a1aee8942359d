//! Where a job starts: validation of the inputs, the start-up scan of the source (the
//! point in time), the workers' buffers, and the job thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use crossbeam_utils::CachePadded;

use super::claims::Claims;
use super::lifecycle::ControlState;
use super::priority::HookGate;
use super::ratelimit::RateLimit;
use super::{push_merged, BackupOptions, Geometry, Helpers, Job, JobShared, Stats, SyncMode, NEXT_ID};
use crate::bitmap::Bitmap;
use crate::buf::AlignedBuf;
use crate::driver::{BlockDriver, StatusFlags};
use crate::error::{Error, ErrorKind, Op, Result, Side};
use crate::trace::{TraceEvent, TraceFn};

/// One buffer per worker, each the size of the longest background run, allocated now
/// so that a job that cannot get its memory fails to start (ENOMEM) instead of aborting
/// the host later.
fn alloc_worker_bufs(geo: &Geometry, workers: usize) -> Result<Vec<AlignedBuf>> {
    let run = (geo.max_run * geo.cluster_size).min(geo.size) as usize;
    (0..workers)
        .map(|_| {
            let mut b = AlignedBuf::new();
            b.try_reserve(run).map(|()| b).map_err(|_| {
                Error::new(
                    ErrorKind::OutOfMemory,
                    libc::ENOMEM,
                    format!("cannot allocate {workers} copy buffers of {run} bytes (workers x max_chunk)"),
                )
            })
        })
        .collect()
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
/// error when the source's `block_status` fails while the job sets up; `OutOfMemory`
/// (ENOMEM) when the copy bitmap or the workers' buffers (`workers` × `max_chunk`)
/// cannot be allocated; `Io` (EAGAIN) when the job thread cannot be started.
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
    let worker_bufs = alloc_worker_bufs(&geo, opts.workers)?;

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
        control: Mutex::new(ControlState::new()),
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
        helpers: Arc::new(Helpers::default()),
        worker_bufs: Mutex::new(worker_bufs),
        zero_target: Mutex::new(zero_target),
    });
    let s = Arc::clone(&shared);
    let handle = thread::Builder::new()
        .name(format!("cowbackup-{}", shared.id))
        .spawn(move || s.run())
        .map_err(|e| Error::new(ErrorKind::Io, libc::EAGAIN, format!("cannot start job thread: {e}")))?;
    Ok(Job { shared, thread: Mutex::new(Some(handle)), creator_pid: std::process::id() })
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
