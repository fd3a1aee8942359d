//! Where a job starts: validation of the inputs, the start-up scan of the source (the
//! point in time), the workers' buffers, and the job thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use crossbeam_utils::CachePadded;

use super::claims::Claims;
use super::group::Group;
use super::lifecycle::ControlState;
use super::priority::HookGate;
use super::ratelimit::RateLimit;
use super::{push_merged, BackupOptions, Geometry, Helpers, Job, JobShared, Stats, SyncMode, NEXT_ID};
use crate::bitmap::Bitmap;
use crate::buf::AlignedBuf;
use crate::dirty::{DirtyBitmap, EndOfJob};
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
    prepare(source, target, opts)?.launch()
}

/// One job of a consistency group: source, target, options.
pub type GroupMember = (Arc<dyn BlockDriver>, Arc<dyn BlockDriver>, BackupOptions);

/// Start several backups at **one point in time**, with one outcome (a consistency group).
///
/// Every job is set up (inputs checked, bitmaps frozen, sources scanned) before any starts
/// copying; when one input is bad, nothing starts and every bitmap is left as it was. No
/// job of the group reaches `Completed` before all have finished copying; when one fails
/// or is cancelled, the others are cancelled, and every bitmap goes back as for a failure.
/// The outcome is decided atomically when the last job finishes copying: from then on
/// (every job copied, none failed or cancelled) the group is committed, and
/// [`Job::cancel`] or dropping a member changes nothing (every job completes); a cancel
/// before that cancels them all. Members never end split. Each job's [`Job::wait`] reports
/// its own result (the first failure, `Cancelled` for the others). The jobs are returned
/// in the order given.
///
/// # Errors
/// As [`backup_start`], for the first entry that fails (the message names its index);
/// `InvalidInput` for an empty list, or the same bitmap or target given twice.
pub fn backup_start_group(jobs: Vec<GroupMember>) -> Result<Vec<Job>> {
    if jobs.is_empty() {
        return Err(Error::invalid("backup_start_group: no jobs"));
    }
    for (i, (_, ti, oi)) in jobs.iter().enumerate() {
        for (j, (_, tj, oj)) in jobs.iter().enumerate().take(i) {
            if std::ptr::eq(Arc::as_ptr(ti) as *const u8, Arc::as_ptr(tj) as *const u8)
                || matches!((ti.storage_id(), tj.storage_id()), (Some(a), Some(b)) if a == b)
            {
                return Err(Error::invalid(format!("backup_start_group: jobs {j} and {i} have the same target")));
            }
            if let (Some(a), Some(b)) = (&oi.bitmap, &oj.bitmap) {
                if Arc::ptr_eq(a, b) {
                    return Err(Error::invalid(format!("backup_start_group: jobs {j} and {i} have the same bitmap")));
                }
            }
        }
    }
    let n = jobs.len();
    let mut prepared = Vec::with_capacity(n);
    for (i, (source, target, opts)) in jobs.into_iter().enumerate() {
        // On error the jobs prepared so far are dropped: their bitmaps go back unchanged.
        let p = prepare(source, target, opts)
            .map_err(|e| Error::new(e.kind(), e.errno(), format!("backup_start_group: job {i}: {e}")))?;
        prepared.push(p);
    }
    let group = Group::new(n);
    for p in &mut prepared {
        p.set_group(&group);
    }
    for p in &prepared {
        group.add(&p.shared());
    }
    let mut started = Vec::with_capacity(n);
    for p in prepared {
        match p.launch() {
            Ok(job) => started.push(job),
            // No thread to be had: the jobs started so far are cancelled (group failure).
            Err(e) => {
                for job in &started {
                    job.cancel();
                }
                return Err(e);
            }
        }
    }
    Ok(started)
}

/// A job set up (bitmap frozen, source scanned) but not running yet. Dropped without
/// [`Prepared::launch`], it gives its bitmap back unchanged.
pub(super) struct Prepared(Option<Arc<JobShared>>);

impl Prepared {
    fn shared(&self) -> Arc<JobShared> {
        Arc::clone(self.0.as_ref().expect("prepared job"))
    }

    fn set_group(&mut self, group: &Arc<Group>) {
        // No other reference exists yet (the group takes its Weak ones afterwards).
        let s = self.0.as_mut().and_then(Arc::get_mut).expect("a prepared job is not shared yet");
        s.group = Some(Arc::clone(group));
    }

    /// Start the job thread.
    fn launch(mut self) -> Result<Job> {
        let shared = self.shared();
        let s = Arc::clone(&shared);
        let handle = thread::Builder::new()
            .name(format!("cowbackup-{}", shared.id))
            .spawn(move || s.run())
            .map_err(|e| Error::new(ErrorKind::Io, libc::EAGAIN, format!("cannot start job thread: {e}")))?;
        self.0 = None;
        Ok(Job { shared, thread: Mutex::new(Some(handle)), creator_pid: std::process::id() })
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Some(bm) = self.0.take().and_then(|s| s.dirty.clone()) {
            let _ = bm.unfreeze(EndOfJob::Merge);
        }
    }
}

/// Gives a frozen bitmap back unchanged unless disarmed (errors while preparing).
struct Thaw(Option<Arc<DirtyBitmap>>);

impl Drop for Thaw {
    fn drop(&mut self) {
        if let Some(bm) = self.0.take() {
            let _ = bm.unfreeze(EndOfJob::Merge);
        }
    }
}

/// Check the inputs, freeze the bitmap, build the copy set (the point in time), scan the
/// source and allocate the buffers: everything that can fail, before any thread runs.
fn prepare(source: Arc<dyn BlockDriver>, target: Arc<dyn BlockDriver>, opts: BackupOptions) -> Result<Prepared> {
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
    if let Some(bm) = &opts.bitmap {
        if bm.size() != size {
            return Err(Error::invalid(format!(
                "the dirty bitmap covers {} bytes but the source has {size} bytes",
                bm.size()
            )));
        }
    }
    if let (Some(bm), Some(id)) = (&opts.bitmap, &opts.disk_id) {
        bm.adopt_disk_id(id)?;
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
    // Only the bitmap's clusters: incremental (Bitmap) and pull mode (None + bitmap).
    let restrict = opts.bitmap.is_some() && matches!(opts.sync, SyncMode::Bitmap | SyncMode::None);
    let bitmap = Bitmap::try_new(clusters, !restrict).ok_or_else(|| {
        Error::new(
            ErrorKind::OutOfMemory,
            libc::ENOMEM,
            format!("cannot allocate the copy bitmap of {clusters} clusters (device of {size} bytes)"),
        )
    })?;
    let stats = Stats::default();
    let unservable = Bitmap::try_new(clusters, restrict).ok_or_else(|| {
        Error::new(ErrorKind::OutOfMemory, libc::ENOMEM, format!("cannot allocate a bitmap of {clusters} clusters"))
    })?;
    // The point in time: from here on, marks go to the bitmap's successor.
    let mut thaw = Thaw(None);
    if let Some(bm) = &opts.bitmap {
        // A bitmap busy with another job stays that job's: thaw only what we froze.
        bm.freeze()?;
        thaw.0 = Some(bm.clone());
        if restrict {
            let mut from = 0;
            while let Some((off, len)) = bm.frozen_next_dirty(from) {
                bitmap.set_range(geo.clusters_of(off, off + len));
                unservable.clear_range(geo.clusters_of(off, off + len));
                from = off + len;
            }
            let to_copy: u64 = bitmap.runs().into_iter().map(|r| geo.byte_range(r).1).sum();
            stats.skipped.store(size - to_copy, Ordering::Relaxed);
        }
    }
    let manifest = crate::repo::ManifestPlan::prepare(&opts, &*target, size)?;
    let claims = Claims::new(bitmap);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let trace = opts.trace.or_else(crate::trace::from_env);
    let record = manifest.as_ref().map(|m| &m.rec);
    let scan = Scan {
        geo: &geo,
        sync: opts.sync,
        target_zero,
        claims: &claims,
        stats: &stats,
        trace: trace.as_ref(),
        id,
        record,
    };
    let zero_target = scan.run(&*source)?;
    // With `cow_buffer` and workers at normal priority, a night shift (priority.rs).
    // Not in a pool: its threads copy for every job at the pool's priority (pool.rs).
    let shifts =
        opts.cow_buffer > 0 && opts.worker_priority == super::options::WorkerPriority::Normal && opts.pool.is_none();
    let pace = super::priority::HostPace::for_job(shifts, opts.workers);
    let worker_bufs = match opts.sync {
        SyncMode::None => Vec::new(),
        _ if opts.pool.is_some() => Vec::new(),
        _ => alloc_worker_bufs(&geo, opts.workers + pace.night_workers())?,
    };
    let dirty = thaw.0.take();
    let prefetch = super::prefetch::Prefetch::new(source.as_file_driver());
    let offload_pays = super::copy::offload_pays(&*source, &*target);
    let exact_reader = source.as_file_driver().and_then(crate::FileDriver::exact_reader);
    let writeback = super::writeback::Writeback::for_job(&*source, &*target);

    Ok(Prepared(Some(Arc::new(JobShared {
        id,
        source,
        target,
        geo,
        sync: opts.sync,
        workers: opts.workers,
        worker_priority: opts.worker_priority,
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
        prefetch,
        offload_pays,
        exact_reader,
        writeback,
        pool: opts.pool.clone(),
        attachment: Mutex::new(Default::default()),
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
        dirty,
        bitmap_mode: opts.bitmap_mode,
        group: None,
        unservable,
        discard_source: opts.discard_source,
        cowbuf: super::cowbuf::CowBuffer::new(opts.cow_buffer),
        pace,
        waiting_workers: Default::default(),
        resumes: Default::default(),
        manifest,
    }))))
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
    /// The manifest's recorder: clusters settled as zero here are in the copy set.
    record: Option<&'a crate::repo::Recorder>,
}

impl Scan<'_> {
    /// Mark clusters `r` clean; returns the bytes of those that were still to copy.
    /// With `zero`, the target reads zeroes there (recorded as zero clusters).
    fn settle(&self, r: std::ops::Range<u64>, zero: bool) -> u64 {
        let runs = self.claims.dirty_runs(r.clone());
        if let Some(rec) = self.record.filter(|_| zero) {
            runs.iter().for_each(|run| rec.zero(run.clone()));
        }
        let bytes = runs.into_iter().map(|run| self.geo.byte_range(run).1).sum();
        self.claims.clear_unclaimed(r);
        bytes
    }

    /// Walk the source's block status once, at start (the point in time), and mark clean
    /// what needs no copy: unallocated clusters under `Top` (skipped), and zero clusters
    /// when the target already reads zeroes (traced as `ZeroClusters`). Only the copy set
    /// is asked about (under `Bitmap`, the bitmap's clusters: a 1 % incremental does not
    /// walk the whole source, and a pull-mode export that serves only those is never
    /// asked about the others). Returns byte ranges to zero in the target.
    fn run(&self, source: &dyn BlockDriver) -> Result<Vec<(u64, u64)>> {
        let (geo, sync, target_zero) = (self.geo, self.sync, self.target_zero);
        let mut zero_target = Vec::new();
        if sync != SyncMode::Top && !target_zero {
            return Ok(zero_target);
        }
        // An incremental from a file in memory: the scan would cost more than it saves. Its
        // dirty clusters are rarely holes, a hole reads as a zero page, the copy finds zero
        // clusters in the buffer anyway, and SEEK_HOLE walks the page cache to the next
        // hole (15 ms per 2 GiB of data on tmpfs, a quarter of a 1 % incremental).
        if sync == SyncMode::Bitmap && source.as_file_driver().and_then(|f| f.in_memory()) == Some(true) {
            return Ok(zero_target);
        }
        let mut c = 0;
        let mut known = None;
        while c < geo.clusters {
            let (dirty, e) = self.claims.run_from(c, geo.clusters);
            if dirty {
                self.run_range(source, c..e, &mut zero_target, &mut known)?;
            }
            c = e;
        }
        Ok(zero_target)
    }

    /// [`Scan::run`] over the clusters `run` of the copy set. `known`: the last extent a
    /// file source reported (start, end, flags), reused by the runs inside it.
    ///
    /// A file source is asked about the rest of the file, not only the run: `SEEK_HOLE`
    /// walks to the next hole whatever the length asked (on tmpfs page by page: 7 ms
    /// per call in a 2 GiB file), so one answer serves every run of the copy set inside
    /// the extent (a 10 % incremental of 2 GiB asked 3 000 times before). Other drivers
    /// (NBD: a pull-mode export may serve only the copy set) are asked about the run.
    fn run_range(
        &self,
        source: &dyn BlockDriver,
        run: std::ops::Range<u64>,
        zero_target: &mut Vec<(u64, u64)>,
        known: &mut Option<(u64, u64, StatusFlags)>,
    ) -> Result<()> {
        let (geo, sync, target_zero) = (self.geo, self.sync, self.target_zero);
        let size = geo.size;
        let (run_off, run_len) = geo.byte_range(run);
        let run_end = run_off + run_len;
        let mut off = run_off;
        let whole_file = source.as_file_driver().is_some();
        while off < run_end {
            let (len, flags) = match *known {
                Some((s, e, flags)) if s <= off && off < e => ((e - off).min(run_end - off), flags),
                _ => {
                    let ask = if whole_file { size - off } else { run_end - off };
                    let st = source
                        .block_status(off, ask)
                        .map_err(|e| Error::io(Side::Source, Op::BlockStatus, off, ask, &e))?;
                    if st.len == 0 {
                        // A driver that answers 0 bytes tells nothing: treat the rest as data.
                        (run_end - off, StatusFlags::DATA)
                    } else {
                        *known = Some((off, off + st.len.min(ask), st.flags));
                        (st.len.min(run_end - off), st.flags)
                    }
                }
            };
            let end = off + len;
            // Only clusters that lie wholly inside this extent.
            let first = off.div_ceil(geo.cluster_size);
            let last = if end == size { geo.clusters } else { end / geo.cluster_size };
            if first < last {
                let (b_off, b_len) = geo.byte_range(first..last);
                if sync == SyncMode::Top && !flags.contains(StatusFlags::DATA) {
                    // In the copy set only where the point in time reads zeroes: an
                    // unallocated range that is not ZERO (a backing file's data) is not held.
                    self.settle(first..last, flags.contains(StatusFlags::ZERO));
                    self.stats.skipped.fetch_add(b_len, Ordering::Relaxed);
                    if !target_zero && flags.contains(StatusFlags::ZERO) {
                        push_merged(zero_target, b_off, b_len);
                    }
                } else if target_zero && flags.contains(StatusFlags::ZERO) {
                    // Only clusters of the copy set count (under Bitmap, others are skipped).
                    let zero = self.settle(first..last, true);
                    self.stats.zero.fetch_add(zero, Ordering::Relaxed);
                    if let Some(sink) = self.trace.filter(|_| zero > 0) {
                        let e = TraceEvent::ZeroClusters { job: self.id, offset: b_off, len: b_len };
                        crate::trace::deliver(sink, self.id, &e);
                    }
                }
            }
            off = end;
        }
        Ok(())
    }
}
