//! `cowbackup_options`: the options of `cowbackup_backup_start`, each setter validating its
//! value at once.

use std::os::raw::{c_int, c_void};
use std::sync::Arc;
use std::time::Duration;

use super::error::{invalid, neg_errno};
use super::*;
use crate::{
    BackupOptions, BitmapMode, CbwErrorAction, ErrorAction, Result, SyncMode, WorkerPriority, MAX_CHUNK_LIMIT,
    MAX_CLUSTER_SIZE, MAX_WORKERS, MIN_CLUSTER_SIZE,
};

/// Options of a backup job (opaque): cluster size, sync mode, workers, speed, error
/// policies, completion callback. Made by `cowbackup_options_new` with the defaults, changed
/// by the `cowbackup_options_set_*` functions (each validates its value: a failed setter
/// changes nothing), read by `cowbackup_backup_start` (which copies them: the options may be
/// changed or freed afterwards, and reused for other jobs). Not thread-safe: do not change
/// one options object from two threads at once.
pub struct cowbackup_options {
    pub(crate) inner: BackupOptions,
}

/// New options with the defaults: cluster size 65536, `COWBACKUP_SYNC_FULL`, 2 workers at
/// `COWBACKUP_WORKER_PRIORITY_NORMAL`, max chunk 1 MiB, no speed limit, `COWBACKUP_ERROR_REPORT` for source and target errors,
/// `COWBACKUP_CBW_BREAK_GUEST_WRITE`, no copy-before-write timeout, target not known to read
/// zeroes, no completion callback. Free with `cowbackup_options_free`. Returns NULL only on an
/// internal error. Thread-safe.
#[no_mangle]
pub extern "C" fn cowbackup_options_new() -> *mut cowbackup_options {
    ffi_panic_boundary!("cowbackup_options_new", {
        Box::into_raw(Box::new(cowbackup_options { inner: BackupOptions::default() }))
    })
}

/// Free options made by `cowbackup_options_new`. NULL: nothing. Jobs started with them are
/// not affected.
///
/// # Safety
/// `o` is NULL or a live options object, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_free(o: *mut cowbackup_options) {
    ffi_panic_boundary!("cowbackup_options_free", {
        if !o.is_null() {
            // SAFETY: made by Box::into_raw in cowbackup_options_new, freed once (caller's guarantee).
            drop(unsafe { Box::from_raw(o) });
        }
    })
}

/// Set the cluster size: the granularity of copy-before-write and of the copy bitmap, a power
/// of two from 4096 (4 KiB) to 67108864 (64 MiB). Default 65536.
/// Errors: -EINVAL (NULL `o`, size out of range or not a power of two).
///
/// # Safety
/// `o` is NULL or a live options object.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_cluster_size(o: *mut cowbackup_options, bytes: u64) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_cluster_size", {
        let o = try_mut!(o, "cowbackup_options_set_cluster_size", "o");
        if !bytes.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&bytes) {
            return invalid(format!(
                "cowbackup_options_set_cluster_size: {bytes} is invalid: it must be a power of two from {MIN_CLUSTER_SIZE} to {MAX_CLUSTER_SIZE}"
            ));
        }
        o.inner.cluster_size = bytes;
        0
    })
}

/// Set the sync mode: `COWBACKUP_SYNC_FULL` (default), `COWBACKUP_SYNC_TOP`,
/// `COWBACKUP_SYNC_NONE` or `COWBACKUP_SYNC_BITMAP` (needs `cowbackup_options_set_bitmap`;
/// checked by `cowbackup_backup_start`). Errors: -EINVAL (NULL `o`, unknown mode).
///
/// # Safety
/// `o` is NULL or a live options object.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_sync(o: *mut cowbackup_options, mode: u32) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_sync", {
        let o = try_mut!(o, "cowbackup_options_set_sync", "o");
        o.inner.sync = match mode {
            COWBACKUP_SYNC_FULL => SyncMode::Full,
            COWBACKUP_SYNC_TOP => SyncMode::Top,
            COWBACKUP_SYNC_NONE => SyncMode::None,
            COWBACKUP_SYNC_BITMAP => SyncMode::Bitmap,
            _ => return invalid(format!("cowbackup_options_set_sync: unknown sync mode {mode}")),
        };
        0
    })
}

/// Set the background copy speed limit in bytes per second; 0 (default) = unlimited. Never
/// slows the copy-before-write hook. Any value is valid. Errors: -EINVAL (NULL `o`).
///
/// # Safety
/// `o` is NULL or a live options object.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_speed(o: *mut cowbackup_options, bytes_per_sec: u64) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_speed", {
        let o = try_mut!(o, "cowbackup_options_set_speed", "o");
        o.inner.speed = bytes_per_sec;
        0
    })
}

/// Set the number of background copy threads, 1 to 64. Default 2.
/// Errors: -EINVAL (NULL `o`, `n` out of range).
///
/// # Safety
/// `o` is NULL or a live options object.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_workers(o: *mut cowbackup_options, n: u32) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_workers", {
        let o = try_mut!(o, "cowbackup_options_set_workers", "o");
        if n == 0 || n as usize > MAX_WORKERS {
            return invalid(format!(
                "cowbackup_options_set_workers: {n} is invalid: it must be from 1 to {MAX_WORKERS}"
            ));
        }
        o.inner.workers = n as usize;
        0
    })
}

/// Set the CPU and I/O priority of the background copy threads:
/// `COWBACKUP_WORKER_PRIORITY_NORMAL` (default: as the thread that starts the job),
/// `COWBACKUP_WORKER_PRIORITY_LOW` (`SCHED_BATCH`, nice 19, best-effort I/O priority 7: host
/// threads get a CPU before the workers) or `COWBACKUP_WORKER_PRIORITY_IDLE` (`SCHED_IDLE`,
/// idle I/O class: only CPU time nothing else wants; can stall on a busy machine). On a
/// machine busy with other work, lowered workers are preempted while holding the target
/// file's lock, which lengthens the hook's waits (see PERFORMANCE.md). Copy-before-write
/// runs on the caller's thread and is never lowered. Best effort: a setting the system
/// refuses leaves the workers as they are. Errors: -EINVAL (NULL `o`, unknown priority).
///
/// # Safety
/// `o` is NULL or a live options object.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_worker_priority(o: *mut cowbackup_options, priority: u32) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_worker_priority", {
        let o = try_mut!(o, "cowbackup_options_set_worker_priority", "o");
        o.inner.worker_priority = match priority {
            COWBACKUP_WORKER_PRIORITY_NORMAL => WorkerPriority::Normal,
            COWBACKUP_WORKER_PRIORITY_LOW => WorkerPriority::Low,
            COWBACKUP_WORKER_PRIORITY_IDLE => WorkerPriority::Idle,
            _ => return invalid(format!("cowbackup_options_set_worker_priority: unknown priority {priority}")),
        };
        0
    })
}

/// Set the largest background copy request in bytes, 4096 to 1073741824 (1 GiB); the job
/// rounds it down to whole clusters, at least one cluster. Default 1 MiB.
/// Errors: -EINVAL (NULL `o`, out of range).
///
/// # Safety
/// `o` is NULL or a live options object.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_max_chunk(o: *mut cowbackup_options, bytes: u64) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_max_chunk", {
        let o = try_mut!(o, "cowbackup_options_set_max_chunk", "o");
        if !(MIN_CLUSTER_SIZE..=MAX_CHUNK_LIMIT).contains(&bytes) {
            return invalid(format!(
                "cowbackup_options_set_max_chunk: {bytes} is invalid: it must be from {MIN_CLUSTER_SIZE} to {MAX_CHUNK_LIMIT}"
            ));
        }
        o.inner.max_chunk = bytes;
        0
    })
}

fn error_action(function: &str, action: u32) -> std::result::Result<ErrorAction, c_int> {
    Ok(match action {
        COWBACKUP_ERROR_REPORT => ErrorAction::Report,
        COWBACKUP_ERROR_IGNORE => ErrorAction::Ignore,
        COWBACKUP_ERROR_STOP => ErrorAction::Stop,
        COWBACKUP_ERROR_ENOSPC => ErrorAction::Enospc,
        _ => return Err(invalid(format!("{function}: unknown error action {action}"))),
    })
}

/// Set what the background copy does when reading the source fails: `COWBACKUP_ERROR_REPORT`
/// (default), `COWBACKUP_ERROR_IGNORE`, `COWBACKUP_ERROR_STOP` or `COWBACKUP_ERROR_ENOSPC`.
/// Errors: -EINVAL (NULL `o`, unknown action).
///
/// # Safety
/// `o` is NULL or a live options object.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_on_source_error(o: *mut cowbackup_options, action: u32) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_on_source_error", {
        let o = try_mut!(o, "cowbackup_options_set_on_source_error", "o");
        match error_action("cowbackup_options_set_on_source_error", action) {
            Ok(a) => o.inner.on_source_error = a,
            Err(e) => return e,
        }
        0
    })
}

/// Set what the background copy does when writing, zeroing or flushing the target fails:
/// `COWBACKUP_ERROR_REPORT` (default), `COWBACKUP_ERROR_IGNORE`, `COWBACKUP_ERROR_STOP` or
/// `COWBACKUP_ERROR_ENOSPC`. Errors: -EINVAL (NULL `o`, unknown action).
///
/// # Safety
/// `o` is NULL or a live options object.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_on_target_error(o: *mut cowbackup_options, action: u32) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_on_target_error", {
        let o = try_mut!(o, "cowbackup_options_set_on_target_error", "o");
        match error_action("cowbackup_options_set_on_target_error", action) {
            Ok(a) => o.inner.on_target_error = a,
            Err(e) => return e,
        }
        0
    })
}

/// Set what happens when the copy inside `cowbackup_cow_before_write` fails:
/// `COWBACKUP_CBW_BREAK_GUEST_WRITE` (default: the hook returns the error and the host fails
/// its write) or `COWBACKUP_CBW_BREAK_SNAPSHOT` (the hook returns 0, the job fails).
/// Errors: -EINVAL (NULL `o`, unknown action).
///
/// # Safety
/// `o` is NULL or a live options object.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_on_cbw_error(o: *mut cowbackup_options, action: u32) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_on_cbw_error", {
        let o = try_mut!(o, "cowbackup_options_set_on_cbw_error", "o");
        o.inner.on_cbw_error = match action {
            COWBACKUP_CBW_BREAK_GUEST_WRITE => CbwErrorAction::BreakGuestWrite,
            COWBACKUP_CBW_BREAK_SNAPSHOT => CbwErrorAction::BreakSnapshot,
            _ => return invalid(format!("cowbackup_options_set_on_cbw_error: unknown action {action}")),
        };
        0
    })
}

/// Set the longest time in milliseconds a `cowbackup_cow_before_write` call may take to get
/// the old data of its clusters into the target, whether it copies them itself or waits for
/// another thread copying them. Past it the call returns -ETIMEDOUT (then the `on_cbw_error`
/// action applies) while the copy goes on in the background on a library thread
/// (`cowbackup-<id>-h`); the clusters stay protected, so a later call for them succeeds once
/// the copy is done. With a limit set, a hook call that has to copy runs the copy on such a
/// thread (QEMU's cbw-timeout). 0 (default) = no limit: the copy runs on the calling thread.
/// Errors: -EINVAL (NULL `o`).
///
/// # Safety
/// `o` is NULL or a live options object.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_cbw_timeout(o: *mut cowbackup_options, ms: u64) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_cbw_timeout", {
        let o = try_mut!(o, "cowbackup_options_set_cbw_timeout", "o");
        o.inner.cbw_timeout = (ms != 0).then(|| Duration::from_millis(ms));
        0
    })
}

/// Tell whether the target is known to read zeroes (1) or not (0, default): with 1, clusters
/// that read as zero are not written to the target at all. (Without it the job asks the target
/// at start: a regular file with no data extent (`SEEK_DATA` finds none, e.g. just made by
/// `cowbackup_file_create` and not written since, through any handle) and an unwritten
/// `cowbackup_memory_new` device are detected by themselves.) Use 1 only when it is true:
/// otherwise the backup is wrong where the target held data.
/// Errors: -EINVAL (NULL `o`, a value other than 0 or 1).
///
/// # Safety
/// `o` is NULL or a live options object.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_target_is_zero(o: *mut cowbackup_options, is_zero: u32) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_target_is_zero", {
        let o = try_mut!(o, "cowbackup_options_set_target_is_zero", "o");
        o.inner.target_is_zero = match is_zero {
            0 => false,
            1 => true,
            _ => return invalid(format!("cowbackup_options_set_target_is_zero: {is_zero} is not 0 or 1")),
        };
        0
    })
}

/// `opaque` of a completion callback, only passed back to it.
pub(crate) struct CallbackOpaque(pub(crate) *mut c_void);

// SAFETY: never dereferenced by the library, only passed to the callback, which the caller of
// cowbackup_options_set_completion promises may run on any thread.
unsafe impl Send for CallbackOpaque {}
// SAFETY: as above; the callback gets the pointer by value.
unsafe impl Sync for CallbackOpaque {}

impl CallbackOpaque {
    /// The pointer. A method, so that closures capture the whole (Send) wrapper.
    pub(crate) fn get(&self) -> *mut c_void {
        self.0
    }
}

/// Set the completion callback of the jobs started with these options: `cb(opaque, ret)` is
/// called exactly once per job, when it ends, with what `cowbackup_job_wait` returns (0,
/// -ECANCELED, or the job's -errno), after the final state is set. It runs on the job's own
/// thread `cowbackup-<id>`, not the thread that started the job; it must not block for long
/// and must not longjmp out. `cowbackup_job_wait` in other threads and `cowbackup_job_free`
/// return only after it has returned. It is also called, with -ECANCELED, when a running job
/// is freed, inside that `cowbackup_job_free`. A job that fails to start never calls it. `cb`
/// NULL removes the callback. Errors: -EINVAL (NULL `o`).
///
/// Re-entrancy (capi/README.md, "Callbacks and re-entrancy"): the callback is inside its job,
/// which has ended. It may call any function on the job: `cowbackup_job_query`,
/// `cowbackup_job_wait` (the job's result, at once), `cowbackup_job_cancel` (0, no effect),
/// `cowbackup_job_set_speed` (0), `cowbackup_cow_before_write` (0: the job has ended),
/// `cowbackup_job_pause`/`_resume` (-EBUSY: the job has ended).
/// `cowbackup_job_free` is refused: the job is not freed and `cowbackup_last_error()` says
/// EDEADLK; free the job from outside, after the callback (e.g. after `cowbackup_job_wait`).
/// It must not wait for something that waits for the job (a lock held by a thread calling
/// `cowbackup_job_wait` or `cowbackup_job_free` on this job).
///
/// # Safety
/// `o` is NULL or a live options object. `cb`, when not NULL, is safe to call from any thread
/// with `opaque`, until every job started with these options has ended.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_completion(
    o: *mut cowbackup_options,
    cb: Option<unsafe extern "C" fn(opaque: *mut c_void, ret: c_int)>,
    opaque: *mut c_void,
) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_completion", {
        let o = try_mut!(o, "cowbackup_options_set_completion", "o");
        o.inner.on_complete = cb.map(|cb| {
            let opaque = CallbackOpaque(opaque);
            Arc::new(move |r: &Result<()>| {
                let ret = match r {
                    Ok(()) => 0,
                    Err(e) => neg_errno(e),
                };
                // SAFETY: the caller's callback with its own opaque pointer; it may run on any
                // thread (caller's guarantee).
                unsafe { cb(opaque.get(), ret) }
            }) as crate::CompletionFn
        });
        0
    })
}

/// Give the job a dirty bitmap of the source and say what happens to it at the end: `mode` is
/// `COWBACKUP_BITMAP_MODE_ON_SUCCESS`, `_ALWAYS` or `_NEVER`. Required by
/// `COWBACKUP_SYNC_BITMAP` (an incremental backup); with `COWBACKUP_SYNC_FULL`/`_TOP` it starts
/// a new chain (`_NEVER` is refused there by `cowbackup_backup_start`); with
/// `COWBACKUP_SYNC_NONE` it makes a pull-mode job. The options take their own reference to the
/// bitmap (the caller may free its handle); a job started with them freezes the bitmap
/// (busy) until it ends. `bm` NULL: no bitmap (`mode` ignored). Errors: -EINVAL (NULL `o`,
/// unknown mode).
///
/// # Safety
/// `o` is NULL or a live options object; `bm` is NULL or a live bitmap handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_bitmap(
    o: *mut cowbackup_options,
    bm: *mut super::bitmap::cowbackup_bitmap,
    mode: u32,
) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_bitmap", {
        let o = try_mut!(o, "cowbackup_options_set_bitmap", "o");
        if bm.is_null() {
            o.inner.bitmap = None;
            return 0;
        }
        let mode = match mode {
            COWBACKUP_BITMAP_MODE_ON_SUCCESS => BitmapMode::OnSuccess,
            COWBACKUP_BITMAP_MODE_ALWAYS => BitmapMode::Always,
            COWBACKUP_BITMAP_MODE_NEVER => BitmapMode::Never,
            _ => return invalid(format!("cowbackup_options_set_bitmap: unknown bitmap mode {mode}")),
        };
        // SAFETY: non-NULL; the caller guarantees a live bitmap handle.
        let bm = unsafe { &*bm };
        o.inner.bitmap = Some(Arc::clone(&bm.inner));
        o.inner.bitmap_mode = mode;
        0
    })
}

/// Push mode from a snapshot view: when `enable` is 1, after each chunk of the background copy
/// is in the target, the job discards it on its source (`cowbackup_driver_discard`). Meant for a
/// job whose source is a snapshot view (`cowbackup_job_snapshot`) of a fleecing job: each range
/// leaves the fleecing job's copy set and its space in the scratch image is released as soon
/// as it is backed up, so the scratch image stays small. On any other source it discards the
/// source's data: only for sources that are to be thrown away. Discard is advisory: a failed
/// discard does not fail the job. `enable` 0 (the default): no discard. Errors: -EINVAL (NULL
/// `o`, `enable` not 0 or 1).
///
/// # Safety
/// `o` is NULL or a live options object.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_discard_source(o: *mut cowbackup_options, enable: u32) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_discard_source", {
        let o = try_mut!(o, "cowbackup_options_set_discard_source", "o");
        o.inner.discard_source = match enable {
            0 => false,
            1 => true,
            _ => return invalid(format!("cowbackup_options_set_discard_source: {enable} is not 0 or 1")),
        };
        0
    })
}

/// Memory, in bytes, in which `cowbackup_cow_before_write` may keep old data instead of writing
/// it to the target itself. 0 (the default): none, the hook returns once the old data is in the
/// target. With room left, the hook reads the old data of its clusters into memory and returns:
/// the host's write then waits for a source read only, never for the target (its file lock
/// behind a worker's write, its disk). A worker writes the data to the target soon after,
/// before any background chunk and even while the job is paused; a failure of that write
/// follows the target error policy (`cowbackup_options_set_on_target_error`: the host's write
/// has gone ahead, it cannot be failed any more), and the job completes only when every saved
/// byte is in the target. Old data that does not fit is copied by the hook as without a
/// buffer. Snapshot views read saved clusters from memory. A job with
/// `COWBACKUP_SYNC_NONE` has no workers to write the data: `cowbackup_backup_start` then
/// rejects a non-zero buffer with -EINVAL. With a buffer and `COWBACKUP_WORKER_PRIORITY_NORMAL`
/// (the default) the job also runs a second set of workers, `cowbackup-<id>-<workers + 1>` and
/// on, one fewer than the CPUs (at least 1, at most `workers`), at `SCHED_IDLE` (the night shift): while the host writes clusters not yet
/// copied (a hook needed a copy in the last 0.5 s) they copy and the first set rests, so host
/// threads always find a CPU; when the host is quiet, or the night shift gets no CPU time (no
/// copy finished in 50 ms: every CPU busy with other work), the first set copies. Suggested: 16 MiB, for low
/// host write latency during a backup. Errors: -EINVAL (NULL `o`).
///
/// # Safety
/// `o` is NULL or a live options object.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_cow_buffer(o: *mut cowbackup_options, bytes: u64) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_cow_buffer", {
        let o = try_mut!(o, "cowbackup_options_set_cow_buffer", "o");
        o.inner.cow_buffer = bytes;
        0
    })
}

/// Background copy threads shared by many jobs (opaque): one pool per process, or per
/// storage tier, instead of `workers` threads of each job's own. Made by
/// `cowbackup_pool_new`, given to jobs with `cowbackup_options_set_pool`, freed with
/// `cowbackup_pool_free`. Every function on a handle may be called from any thread, except
/// `cowbackup_pool_free`, which must be the last call on it.
pub struct cowbackup_pool {
    pub(crate) inner: Arc<crate::WorkerPool>,
}

/// Start a pool of `threads` background copy threads (1 to 256), named
/// `cowbackup-p<P>-<n>`, at CPU and I/O priority `priority`
/// (`COWBACKUP_WORKER_PRIORITY_*`, as for a job's own workers; best effort). They copy for
/// every job started with the pool (`cowbackup_options_set_pool`): each thread goes round the
/// jobs and copies one chunk of the first that can go, jobs of priority `NORMAL` before `LOW`
/// before `IDLE`, jobs of one priority in turn; a paused or speed-limited job is passed over,
/// not waited for. The jobs' driver callbacks (`read`, `write`, ...) for background copies are
/// called from these threads. A request that hangs holds its thread; the other jobs share the
/// rest.
///
/// On success `*out` is a new handle (free with `cowbackup_pool_free`). Errors: -EINVAL (NULL
/// `out`, `threads` out of range, unknown priority); -EAGAIN (a thread cannot be started).
///
/// # Safety
/// `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_pool_new(threads: u32, priority: u32, out: *mut *mut cowbackup_pool) -> c_int {
    ffi_panic_boundary!("cowbackup_pool_new", {
        check_out!(out, "cowbackup_pool_new", "out");
        let priority = match priority {
            COWBACKUP_WORKER_PRIORITY_NORMAL => WorkerPriority::Normal,
            COWBACKUP_WORKER_PRIORITY_LOW => WorkerPriority::Low,
            COWBACKUP_WORKER_PRIORITY_IDLE => WorkerPriority::Idle,
            _ => return invalid(format!("cowbackup_pool_new: unknown priority {priority}")),
        };
        match crate::WorkerPool::new(threads as usize, priority) {
            Ok(inner) => {
                let handle = Box::into_raw(Box::new(cowbackup_pool { inner }));
                // SAFETY: `out` was checked above; the caller guarantees it is writable.
                unsafe { out.write(handle) };
                0
            }
            Err(e) => fail("cowbackup_pool_new", &e),
        }
    })
}

/// Drop the caller's reference to the pool and free the handle. Jobs started with the pool
/// keep it running until they end; once the last of them is freed too, its threads are
/// stopped and joined (from the thread that drops the last reference, unless that is a pool
/// thread: it ends by itself). NULL: nothing.
///
/// # Safety
/// `pool` is NULL or a live handle not used by any other call during this one nor afterwards.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_pool_free(pool: *mut cowbackup_pool) {
    ffi_panic_boundary!("cowbackup_pool_free", {
        if !pool.is_null() {
            // SAFETY: a handle made by Box::into_raw in cowbackup_pool_new, freed once.
            drop(unsafe { Box::from_raw(pool) });
        }
    })
}

/// Copy in the background with the threads of `pool` (shared with the other jobs started with
/// it) instead of threads of the job's own; NULL (the default): the job's own workers. With a
/// pool, `workers` is the most pool threads that copy for this job at once, the worker
/// priority orders the jobs inside the pool (the threads run at the pool's priority), the
/// speed limit and error policies hold as without a pool, and `cow_buffer` has no night
/// shift. The job keeps its job thread `cowbackup-<id>`, asleep while the pool copies. The
/// options (and each job started with them) hold their own reference: the pool handle may be
/// freed right after. Errors: -EINVAL (NULL `o`).
///
/// # Safety
/// `o` is NULL or a live options object; `pool` is NULL or a live pool handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_pool(o: *mut cowbackup_options, pool: *const cowbackup_pool) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_pool", {
        let o = try_mut!(o, "cowbackup_options_set_pool", "o");
        // SAFETY: NULL or a live handle (caller's guarantee).
        o.inner.pool = unsafe { pool.as_ref() }.map(|p| Arc::clone(&p.inner));
        0
    })
}
