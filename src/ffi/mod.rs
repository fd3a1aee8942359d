//! The C ABI of cowbackup: the `cowbackup_*` functions and `COWBACKUP_*` constants of
//! `include/cowbackup.h` (generated from this module by cbindgen; see `capi/README.md`).
//!
//! Rust users do not need this module; it is public so that the header test and Rust
//! programs that test the ABI can call it.
//!
//! Conventions, the same for every function:
//! - every exported function is `#[no_mangle] pub extern "C"`; those taking raw pointers
//!   are `unsafe extern "C"` (their `# Safety` section says what the caller guarantees);
//! - the body runs inside `ffi_panic_boundary!`: a panic becomes `-EIO` (or NULL) and a
//!   message, never an unwind into C;
//! - `int` results are 0 or a negative errno, with a message for `cowbackup_last_error()`;
//! - out-parameters come last, are checked for NULL first and written only on success;
//! - enum-like arguments are `uint32_t` constants, validated (`-EINVAL` otherwise).

#![allow(non_camel_case_types)]

#[macro_use]
mod macros;
// Declaration order is the header's order: errors, drivers, options, jobs.
pub mod bitmap;
pub mod driver;
pub mod error;
pub mod job;
pub mod nbd;
pub mod nbd_client;
pub mod options;
pub mod rbd;
pub mod repo;
pub mod trace;

pub use bitmap::*;
pub use driver::*;
pub use error::*;
pub use job::*;
pub use nbd::*;
pub use nbd_client::*;
pub use options::*;
pub use rbd::*;
pub use repo::*;
pub use trace::*;

/// Sync mode `FULL` (the default): copy every cluster of the source.
pub const COWBACKUP_SYNC_FULL: u32 = 0;
/// Sync mode `TOP`: copy only the clusters the source's block_status reports as allocated
/// (`COWBACKUP_STATUS_DATA`); the rest are skipped (and written as zeroes unless the target is
/// known to read zeroes).
pub const COWBACKUP_SYNC_TOP: u32 = 1;
/// Sync mode `NONE`: no background copy; the job only serves copy-before-write until it is
/// cancelled (fleecing: the target is a scratch image).
pub const COWBACKUP_SYNC_NONE: u32 = 2;
/// Sync mode `BITMAP`: copy only the clusters overlapping granules dirty in the job's dirty
/// bitmap when it starts (an incremental backup; `cowbackup_options_set_bitmap` is required).
pub const COWBACKUP_SYNC_BITMAP: u32 = 3;

/// Bitmap mode `ON_SUCCESS` (the default): after a successful job the bitmap holds only the
/// writes made during the job; after a failure or cancel, everything again.
pub const COWBACKUP_BITMAP_MODE_ON_SUCCESS: u32 = 0;
/// Bitmap mode `ALWAYS`: as `ON_SUCCESS` after a success; after a failure or cancel the
/// bitmap holds the new writes plus the clusters the job did not copy.
pub const COWBACKUP_BITMAP_MODE_ALWAYS: u32 = 1;
/// Bitmap mode `NEVER`: the bitmap is never cleared (only with `COWBACKUP_SYNC_BITMAP` or
/// `COWBACKUP_SYNC_NONE`).
pub const COWBACKUP_BITMAP_MODE_NEVER: u32 = 2;

/// Error action `REPORT` (the default): the job fails with the error.
pub const COWBACKUP_ERROR_REPORT: u32 = 0;
/// Error action `IGNORE`: record the failed clusters as not copied and go on; the job copies
/// everything else, then ends FAILED with the first error (`bytes_failed` says how much is
/// missing): a rescue copy of a failing disk.
pub const COWBACKUP_ERROR_IGNORE: u32 = 1;
/// Error action `STOP`: pause the job with the error in `cowbackup_job_info.error`;
/// `cowbackup_job_resume` retries.
pub const COWBACKUP_ERROR_STOP: u32 = 2;
/// Error action `ENOSPC`: `STOP` on ENOSPC (the operator can make room), `REPORT` otherwise.
pub const COWBACKUP_ERROR_ENOSPC: u32 = 3;

/// Worker priority `NORMAL` (the default): the background copy threads keep the CPU and I/O
/// priority of the thread that started the job.
pub const COWBACKUP_WORKER_PRIORITY_NORMAL: u32 = 0;
/// Worker priority `LOW`: `SCHED_BATCH` at nice 19 and best-effort I/O
/// priority 7. A host thread that wakes up gets a CPU before the workers; the workers
/// still get a small share when every CPU is busy, so the backup always moves.
pub const COWBACKUP_WORKER_PRIORITY_LOW: u32 = 1;
/// Worker priority `IDLE`: `SCHED_IDLE` and the idle I/O class: the workers run only on a
/// CPU (and a disk) that nothing else wants; the backup can stall while other work keeps
/// every CPU busy.
pub const COWBACKUP_WORKER_PRIORITY_IDLE: u32 = 2;

/// Copy-before-write error action `BREAK_GUEST_WRITE` (the default): the hook returns the
/// error, the host must fail its write; the snapshot stays valid (the clusters are retried).
pub const COWBACKUP_CBW_BREAK_GUEST_WRITE: u32 = 0;
/// Copy-before-write error action `BREAK_SNAPSHOT`: the hook returns 0 so the host write goes
/// on; the job fails with the error and later hook calls are no-ops.
pub const COWBACKUP_CBW_BREAK_SNAPSHOT: u32 = 1;

/// Job state: set up, not yet running (seen only for an instant).
pub const COWBACKUP_JOB_CREATED: u32 = 0;
/// Job state: copying in the background (or, with `COWBACKUP_SYNC_NONE`, serving the hook).
pub const COWBACKUP_JOB_RUNNING: u32 = 1;
/// Job state: background copy paused (by `cowbackup_job_pause` or by an error under a `STOP`
/// policy); the hook keeps working.
pub const COWBACKUP_JOB_PAUSED: u32 = 2;
/// Job state: ended with an exact point-in-time image in the target.
pub const COWBACKUP_JOB_COMPLETED: u32 = 3;
/// Job state: ended with an error; the target is not a valid image.
pub const COWBACKUP_JOB_FAILED: u32 = 4;
/// Job state: ended by `cowbackup_job_cancel` (or `cowbackup_job_free` of a running job).
pub const COWBACKUP_JOB_CANCELLED: u32 = 5;

/// Block status bit: the range is allocated (has data of its own).
pub const COWBACKUP_STATUS_DATA: u32 = 1;
/// Block status bit: the range reads as zeroes. A hole of a sparse file is ZERO without DATA.
pub const COWBACKUP_STATUS_ZERO: u32 = 2;

/// `cowbackup_file_open` / `cowbackup_nbd_open` / `cowbackup_rbd_open` flag: open for writing too
/// (default: read-only).
pub const COWBACKUP_OPEN_WRITE: u32 = 1;
/// `cowbackup_file_open` / `cowbackup_file_create` flag: use `O_DIRECT` for aligned requests.
pub const COWBACKUP_OPEN_DIRECT: u32 = 2;
/// `cowbackup_file_create` flag: replace an existing regular file (a new file is renamed over
/// it: it is never written through, truncated or followed; a symlink at the path is refused
/// with `-ELOOP`), or open an existing block device (never replaced). Without it,
/// `cowbackup_file_create` on an existing path fails with `-EEXIST` and changes nothing.
/// `cowbackup_file_open` refuses it (`-EINVAL`).
pub const COWBACKUP_CREATE_OVERWRITE: u32 = 4;

/// The mode of every file the library creates (backups, bitmap files) unless the caller passes
/// another to `cowbackup_file_create_mode` or `cowbackup_bitmap_create_mode`: 0600, read and
/// write for the owner only, whatever the umask.
pub const COWBACKUP_FILE_MODE_DEFAULT: u32 = 0o600;

/// `cowbackup_driver_new` flag: the library calls this driver's ops one at a time (under a
/// mutex of the driver), for ops that are not thread-safe.
pub const COWBACKUP_DRIVER_SERIALIZE: u32 = 1;
