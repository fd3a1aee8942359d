//! Jobs: `cowbackup_backup_start`, the copy-before-write hook, control, progress and free.

use std::os::raw::c_int;

use std::sync::Arc;

use super::driver::cowbackup_driver;
use super::error::{neg_errno, result};
use super::options::cowbackup_options;
use super::*;
use crate::{backup_start, BackupOptions, BlockDriver, Job, JobState};

/// A running backup job (opaque). Made by `cowbackup_backup_start`, freed by
/// `cowbackup_job_free`. Every function on a job may be called from any thread, concurrently
/// (the hook from many host threads at once), except `cowbackup_job_free`, which must be the
/// last call.
pub struct cowbackup_job {
    job: Job,
}

/// State and progress of a job (`cowbackup_job_query`). A plain struct owned by the caller.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct cowbackup_job_info {
    /// `COWBACKUP_JOB_CREATED`, `_RUNNING`, `_PAUSED`, `_COMPLETED`, `_FAILED` or `_CANCELLED`.
    pub state: u32,
    /// -errno of the failure, or of the error that paused the job; 0 otherwise.
    pub error: i32,
    /// Bytes to process: the device size.
    pub len: u64,
    /// Bytes done: `bytes_copied + bytes_zero + bytes_skipped + bytes_failed`.
    pub offset: u64,
    /// Data read from the source and written to the target (background copy and hook).
    pub bytes_copied: u64,
    /// Clusters that read as zero: written as zeroes, or left alone in a target reading zeroes.
    pub bytes_zero: u64,
    /// Clusters the sync mode leaves out (unallocated under `COWBACKUP_SYNC_TOP`).
    pub bytes_skipped: u64,
    /// Clusters that could not be copied (`COWBACKUP_ERROR_IGNORE`).
    pub bytes_failed: u64,
    /// Calls of `cowbackup_cow_before_write` that had to copy something.
    pub cow_requests: u64,
    /// Bytes those calls copied.
    pub cow_bytes: u64,
    /// Current background speed limit in bytes/s (0 = unlimited).
    pub speed: u64,
    /// Reserved for future fields; set to 0.
    pub reserved: [u64; 8],
}

/// Start a point-in-time backup of `source` into `target`.
///
/// When the job completes, the target holds the source exactly as it was when this function
/// returned, provided the host calls `cowbackup_cow_before_write` before every write to the
/// source. The job takes its own references to both drivers: the caller may free its handles
/// at once. `opts` is copied (NULL: the defaults of `cowbackup_options_new`). The job copies
/// on its own threads; on success `*out` is the job (free with `cowbackup_job_free`).
///
/// Errors (nothing is written to the target): -EINVAL (NULL `source`, `target` or `out`;
/// source and target are the same device; sizes differ; invalid options); the source's -errno
/// when its block_status fails during setup (`COWBACKUP_SYNC_TOP`, or a target reading
/// zeroes); -EAGAIN when the job's thread cannot be started. Thread-safe.
///
/// # Safety
/// `source`, `target` are NULL or live driver handles; `opts` is NULL or a live options
/// object; `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_backup_start(
    source: *mut cowbackup_driver,
    target: *mut cowbackup_driver,
    opts: *const cowbackup_options,
    out: *mut *mut cowbackup_job,
) -> c_int {
    ffi_panic_boundary!("cowbackup_backup_start", {
        check_out!(out, "cowbackup_backup_start", "out");
        let source = try_ref!(source, "cowbackup_backup_start", "source");
        let target = try_ref!(target, "cowbackup_backup_start", "target");
        let opts = if opts.is_null() {
            BackupOptions::default()
        } else {
            // SAFETY: non-NULL; the caller guarantees a live options object.
            unsafe { &*opts }.inner.clone()
        };
        match backup_start(source.inner.clone(), target.inner.clone(), opts) {
            Ok(job) => {
                let handle = Box::into_raw(Box::new(cowbackup_job { job }));
                // SAFETY: checked non-NULL above; the caller guarantees it is writable.
                unsafe { out.write(handle) };
                0
            }
            Err(e) => super::error::fail("cowbackup_backup_start", &e),
        }
    })
}

/// Start `n` backups at one point in time, with one outcome (a consistency group):
/// `sources[i]` into `targets[i]` with `opts[i]` (`opts` NULL, or an entry NULL: defaults).
/// Every job is set up before any starts copying; no job reaches `COWBACKUP_JOB_COMPLETED`
/// before all have finished copying; when one fails or is cancelled the others are cancelled
/// and every bitmap goes back as for a failure. The outcome is decided atomically when the
/// last job finishes copying: from then on (every job copied, none failed or cancelled) the
/// group is committed, and `cowbackup_job_cancel` or `cowbackup_job_free` of a member changes
/// nothing (every job ends `COWBACKUP_JOB_COMPLETED`); a cancel before that cancels them all.
/// Each job's `cowbackup_job_wait` reports its own result. On success `jobs_out[0..n]` are
/// the jobs (free each with `cowbackup_job_free`).
///
/// All or none: on any error nothing is started, no bitmap changes and `jobs_out` is not
/// written. Errors: -EINVAL (`n` 0, a NULL array or entry, the same target or bitmap twice,
/// or any error of `cowbackup_backup_start` for an entry: the message names its index),
/// -EBUSY (a bitmap in use by another job), the source's -errno, -ENOMEM, -EAGAIN.
///
/// # Safety
/// `sources`, `targets` (and `opts` unless NULL) hold `n` entries of live handles (`opts`
/// entries may be NULL); `jobs_out` is NULL or valid for `n` writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_backup_start_group(
    n: usize,
    sources: *const *mut cowbackup_driver,
    targets: *const *mut cowbackup_driver,
    opts: *const *const cowbackup_options,
    jobs_out: *mut *mut cowbackup_job,
) -> c_int {
    ffi_panic_boundary!("cowbackup_backup_start_group", {
        check_out!(jobs_out, "cowbackup_backup_start_group", "jobs_out");
        if n == 0 {
            return super::error::invalid("cowbackup_backup_start_group: n is 0");
        }
        if sources.is_null() || targets.is_null() {
            return super::error::invalid("cowbackup_backup_start_group: sources or targets is NULL");
        }
        let mut list = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: i < n and the caller guarantees n entries in each array.
            let (s, t) = unsafe { (*sources.add(i), *targets.add(i)) };
            if s.is_null() || t.is_null() {
                return super::error::invalid(format!(
                    "cowbackup_backup_start_group: sources[{i}] or targets[{i}] is NULL"
                ));
            }
            // SAFETY: non-NULL entries are live driver handles (caller's guarantee).
            let (s, t) = unsafe { (&*s, &*t) };
            // SAFETY: i < n entries when `opts` is not NULL (caller's guarantee).
            let o = if opts.is_null() { std::ptr::null() } else { unsafe { *opts.add(i) } };
            let o = if o.is_null() {
                BackupOptions::default()
            } else {
                // SAFETY: a non-NULL entry is a live options object (caller's guarantee).
                unsafe { &*o }.inner.clone()
            };
            list.push((s.inner.clone(), t.inner.clone(), o));
        }
        match crate::backup_start_group(list) {
            Ok(jobs) => {
                for (i, job) in jobs.into_iter().enumerate() {
                    let handle = Box::into_raw(Box::new(cowbackup_job { job }));
                    // SAFETY: checked non-NULL; the caller guarantees n writable entries.
                    unsafe { jobs_out.add(i).write(handle) };
                }
                0
            }
            Err(e) => super::error::fail("cowbackup_backup_start_group", &e),
        }
    })
}

/// The copy-before-write hook: call it in the host's write path before writing
/// `[offset, offset + bytes)` of the source, and write only when it returns 0.
///
/// Returns when the old contents of every cluster the range touches are in the target. Any
/// range is accepted (unaligned, many clusters); `bytes == 0` is a no-op. Fast when the
/// clusters are already copied (a few atomic loads, no lock); otherwise the calling thread
/// copies them itself, or waits for the thread copying them. It runs on, and blocks, the
/// calling thread; it keeps working while the job is paused; after the job has ended or was
/// cancelled it is a no-op returning 0. Thread-safe: call it from every writing thread.
///
/// Errors: -EINVAL (NULL `job`, range past the end of the device or overflowing); with
/// `COWBACKUP_CBW_BREAK_GUEST_WRITE` the copy's -errno (-EIO, -ENOSPC, -ETIMEDOUT): fail the
/// guest write; the snapshot stays valid and a later call retries.
///
/// From inside the job's own callbacks (a driver op or trace callback on one of the job's
/// threads or inside this hook, the completion callback; see capi/README.md, "Callbacks and
/// re-entrancy"): a range whose clusters are all copied returns 0 at once, as does any range
/// once the job has ended or was cancelled; a range with clusters not yet copied returns
/// -EDEADLK (the calling thread may be the one copying them), whatever the `on_cbw_error`
/// policy, and the job is not affected: do not write that range then. Called from an op of a
/// `COWBACKUP_DRIVER_SERIALIZE` driver that this job reads, the copy fails with -EDEADLK
/// (the op holds the driver's lock the copy needs).
///
/// # Safety
/// `job` is NULL or a live job handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_cow_before_write(job: *mut cowbackup_job, offset: u64, bytes: u64) -> c_int {
    ffi_panic_boundary!("cowbackup_cow_before_write", {
        let job = try_ref!(job, "cowbackup_cow_before_write", "job");
        result("cowbackup_cow_before_write", job.job.cow_before_write(offset, bytes))
    })
}

/// Pause the background copy: workers stop before their next chunk (chunks in flight finish).
/// The hook keeps working. Idempotent. Errors: -EINVAL (NULL `job`); -EBUSY (the job has
/// ended). Thread-safe.
///
/// # Safety
/// `job` is NULL or a live job handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_job_pause(job: *mut cowbackup_job) -> c_int {
    ffi_panic_boundary!("cowbackup_job_pause", {
        let job = try_ref!(job, "cowbackup_job_pause", "job");
        result("cowbackup_job_pause", job.job.pause())
    })
}

/// Resume a paused job (paused by `cowbackup_job_pause` or by an error under a STOP policy,
/// which is then retried). Idempotent. Errors: -EINVAL (NULL `job`); -EBUSY (the job has
/// ended). Thread-safe.
///
/// # Safety
/// `job` is NULL or a live job handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_job_resume(job: *mut cowbackup_job) -> c_int {
    ffi_panic_boundary!("cowbackup_job_resume", {
        let job = try_ref!(job, "cowbackup_job_resume", "job");
        result("cowbackup_job_resume", job.job.resume())
    })
}

/// Cancel the job: from now on the hook is a no-op, workers stop after their current chunk and
/// the job ends `COWBACKUP_JOB_CANCELLED`. Returns at once (`cowbackup_job_wait` waits for the
/// end). No effect, and 0, on a job that has ended, or on a member of a consistency group whose
/// members have all finished copying (the group is committed and completes). Errors: -EINVAL
/// (NULL `job`). Thread-safe.
///
/// # Safety
/// `job` is NULL or a live job handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_job_cancel(job: *mut cowbackup_job) -> c_int {
    ffi_panic_boundary!("cowbackup_job_cancel", {
        let job = try_ref!(job, "cowbackup_job_cancel", "job");
        job.job.cancel();
        0
    })
}

/// Change the background copy speed limit (bytes/s, 0 = unlimited) of a running job;
/// effective within 100 ms. Never slows the hook. Errors: -EINVAL (NULL `job`). Thread-safe.
///
/// # Safety
/// `job` is NULL or a live job handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_job_set_speed(job: *mut cowbackup_job, bytes_per_sec: u64) -> c_int {
    ffi_panic_boundary!("cowbackup_job_set_speed", {
        let job = try_ref!(job, "cowbackup_job_set_speed", "job");
        job.job.set_speed(bytes_per_sec);
        0
    })
}

/// Block until the job ends and return its result: 0 when it completed (the target is an exact
/// point-in-time image of the source), -ECANCELED when it was cancelled, or the -errno of the
/// error that failed it (message in `cowbackup_last_error()`). May be called several times
/// and from several threads; returns at once when the job has ended. -EINVAL: NULL `job`.
/// -EDEADLK: called before the job ended from inside one of its own callbacks (a driver op or
/// trace callback on one of the job's threads or inside its `cowbackup_cow_before_write`,
/// any trace callback of the job): it would wait for itself. From the completion callback it
/// returns the job's result at once. Elsewhere it returns only after the completion callback
/// has returned: do not call it while holding a lock that the job's callbacks take.
///
/// # Safety
/// `job` is NULL or a live job handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_job_wait(job: *mut cowbackup_job) -> c_int {
    ffi_panic_boundary!("cowbackup_job_wait", {
        let job = try_ref!(job, "cowbackup_job_wait", "job");
        result("cowbackup_job_wait", job.job.wait())
    })
}

/// Store the job's state and progress in `*info` (all fields, `reserved` zeroed). Errors:
/// -EINVAL (NULL argument). Thread-safe; does not block on I/O.
///
/// # Safety
/// `job` is NULL or a live job handle; `info` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_job_query(job: *const cowbackup_job, info: *mut cowbackup_job_info) -> c_int {
    ffi_panic_boundary!("cowbackup_job_query", {
        check_out!(info, "cowbackup_job_query", "info");
        let job = try_ref!(job, "cowbackup_job_query", "job");
        let i = job.job.info();
        let c = cowbackup_job_info {
            state: state_code(i.state),
            error: i.error.as_ref().map_or(0, neg_errno),
            len: i.len,
            offset: i.offset,
            bytes_copied: i.bytes_copied,
            bytes_zero: i.bytes_zero,
            bytes_skipped: i.bytes_skipped,
            bytes_failed: i.bytes_failed,
            cow_requests: i.cow_requests,
            cow_bytes: i.cow_bytes,
            speed: i.speed,
            reserved: [0; 8],
        };
        // SAFETY: checked non-NULL above; the caller guarantees it is writable.
        unsafe { info.write(c) };
        0
    })
}

/// The `COWBACKUP_JOB_*` code of a state.
pub(crate) fn state_code(s: JobState) -> u32 {
    match s {
        JobState::Created => COWBACKUP_JOB_CREATED,
        JobState::Running => COWBACKUP_JOB_RUNNING,
        JobState::Paused => COWBACKUP_JOB_PAUSED,
        JobState::Completed => COWBACKUP_JOB_COMPLETED,
        JobState::Failed => COWBACKUP_JOB_FAILED,
        JobState::Cancelled => COWBACKUP_JOB_CANCELLED,
    }
}

/// A byte range of a device.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct cowbackup_range {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// List the byte ranges the job gave up on under `COWBACKUP_ERROR_IGNORE` (what the target
/// lacks, e.g. the unreadable parts of a failing source): writes the first `max` ranges, in
/// order of failure with neighbours merged, into `ranges` and the total number of ranges into
/// `*count` (which may exceed `max`: call again with a larger array). `ranges` may be NULL
/// when `max` is 0, to ask for the count. Errors: -EINVAL (NULL `job` or `count`, or NULL
/// `ranges` with `max > 0`); nothing is written then. Thread-safe; the list only grows while
/// the job runs.
///
/// # Safety
/// `job` is NULL or a live job handle; `ranges` is NULL or valid for `max` writes; `count` is
/// NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_job_failed_ranges(
    job: *const cowbackup_job,
    ranges: *mut cowbackup_range,
    max: usize,
    count: *mut usize,
) -> c_int {
    ffi_panic_boundary!("cowbackup_job_failed_ranges", {
        check_out!(count, "cowbackup_job_failed_ranges", "count");
        let job = try_ref!(job, "cowbackup_job_failed_ranges", "job");
        if ranges.is_null() && max > 0 {
            return super::error::invalid("cowbackup_job_failed_ranges: ranges is NULL but max is not 0");
        }
        let failed = job.job.failed_ranges();
        for (i, &(offset, len)) in failed.iter().take(max).enumerate() {
            // SAFETY: i < max, and the caller guarantees `ranges` holds `max` writable elements.
            unsafe { ranges.add(i).write(cowbackup_range { offset, len }) };
        }
        // SAFETY: checked non-NULL above; the caller guarantees it is writable.
        unsafe { count.write(failed.len()) };
        0
    })
}

/// Free the job. A job still running is cancelled first, and this waits for its threads to
/// end (the completion callback, if any, runs before this returns). The job's references to
/// its drivers are dropped (a C driver whose last reference this was is released before this
/// returns). NULL: nothing. No other call on the job may run concurrently or follow.
///
/// Refused when called from inside one of this job's own callbacks (a driver op or trace
/// callback on one of the job's threads or inside its `cowbackup_cow_before_write`, any trace
/// callback of the job, the completion callback): the job is cancelled (if still running),
/// but not freed, and `cowbackup_last_error()` says why ("cowbackup_job_free: refused
/// (EDEADLK): ..."); the handle stays valid: free it from outside once the callback has
/// returned (e.g. after `cowbackup_job_wait`). When this call frees a running job, the
/// completion callback runs inside it (with -ECANCELED): a free from there is refused too,
/// and this call completes. Do not call it while holding a lock that the job's callbacks take.
/// In a `fork`ed child (where the job's threads do not exist) this does nothing and touches
/// none of the job's state; the parent still owns the job.
///
/// # Safety
/// `job` is NULL or a live job handle not used by any other call during this one (except by
/// the job's completion callback, which may run inside it) nor afterwards.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_job_free(job: *mut cowbackup_job) {
    ffi_panic_boundary!("cowbackup_job_free", {
        if job.is_null() {
            return;
        }
        // SAFETY: non-NULL; the caller guarantees a live job handle.
        if let Err(e) = unsafe { &*job }.job.check_free() {
            // The message is all a caller of this void function gets: it names the errno.
            super::error::set_last_error(format!(
                "cowbackup_job_free: refused (EDEADLK): {e}; the job was cancelled, not freed: \
                 free it once the callback has returned"
            ));
            return;
        }
        // Cancel and join through a shared reference first: the completion callback may
        // run meanwhile and look at the handle (query, or a refused free).
        // SAFETY: non-NULL; the caller guarantees a live job handle.
        unsafe { &*job }.job.shut_down();
        // SAFETY: made by Box::into_raw in cowbackup_backup_start, freed once (caller's guarantee).
        drop(unsafe { Box::from_raw(job) });
    })
}

/// Open a read-only view of the job's **point-in-time image** (fleecing, pull mode): a driver
/// handle that reads the source as it was when the job started, while the job runs, in any
/// sync mode. Clusters already copied are read from the target; the others from the source,
/// while a hook on them waits for the read to finish (then copies). A view read never copies
/// and never writes the target.
///
/// Use it like any driver: `cowbackup_driver_read`, `cowbackup_driver_block_status` (the
/// image's DATA/ZERO status), `cowbackup_driver_discard` ("done with this range": its whole
/// clusters leave the copy set and their space in the target is released; later reads of
/// them fail -EACCES), `cowbackup_driver_size`, or as the source of another job (push mode,
/// with `cowbackup_options_set_discard_source`). Writes fail with -EROFS. A read touching a
/// cluster that is not served (outside the job's bitmap in pull mode or under
/// `COWBACKUP_SYNC_BITMAP`, or discarded) fails whole with -EACCES. Once the job has ended,
/// reads fail: with the job's -errno if it failed (e.g. -ENOSPC after
/// `COWBACKUP_CBW_BREAK_SNAPSHOT`), -ESTALE if it completed or was cancelled.
///
/// The handle is reference-counted like every driver handle and keeps what it needs alive: it
/// may be freed before or after the job (`cowbackup_job_free` first is safe; the view then
/// reads -ESTALE). Free it with `cowbackup_driver_free`. Many views of one job may exist.
///
/// On success `*out` is the new handle. Errors: -EINVAL (NULL argument); -ESTALE (the job has
/// ended or is ending). Thread-safe; the view may be used from many threads at once.
///
/// # Safety
/// `job` is NULL or a live job handle; `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_job_snapshot(job: *mut cowbackup_job, out: *mut *mut cowbackup_driver) -> c_int {
    ffi_panic_boundary!("cowbackup_job_snapshot", {
        check_out!(out, "cowbackup_job_snapshot", "out");
        let job = try_ref!(job, "cowbackup_job_snapshot", "job");
        match job.job.snapshot() {
            Ok(view) => {
                let inner: Arc<dyn BlockDriver> = view;
                let handle = Box::into_raw(Box::new(cowbackup_driver { inner }));
                // SAFETY: checked non-NULL above; the caller guarantees it is writable.
                unsafe { out.write(handle) };
                0
            }
            Err(e) => super::error::fail("cowbackup_job_snapshot", &e),
        }
    })
}

/// End a `COWBACKUP_SYNC_NONE` job (fleecing, pull mode) as COMPLETED: the reader has what it
/// needs. The job stops copying, waits for hook copies in flight, flushes the target and ends
/// COMPLETED (`cowbackup_job_wait` returns 0); a pull-mode job's bitmap is then handled as for
/// a successful job (with `COWBACKUP_BITMAP_MODE_ON_SUCCESS` it holds the writes made during
/// the job). Snapshot views go stale (-ESTALE). Returns at once; `cowbackup_job_wait` waits.
/// (Cancel instead counts as a failure: the bitmap comes back whole.)
///
/// Errors: -EINVAL (NULL `job`, or a job of another sync mode: those complete when their copy
/// is done); -EBUSY (the job has ended, or is failing or being cancelled). Thread-safe.
///
/// # Safety
/// `job` is NULL or a live job handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_job_complete(job: *mut cowbackup_job) -> c_int {
    ffi_panic_boundary!("cowbackup_job_complete", {
        let job = try_ref!(job, "cowbackup_job_complete", "job");
        result("cowbackup_job_complete", job.job.complete())
    })
}
