//! cowbackup: point-in-time backups of live block devices with copy-before-write.
//!
//! A job copies a source device to a target in the background. Before the host writes
//! to the source it calls [`Job::cow_before_write`], which first copies the old
//! contents of the touched clusters to the target. When the job completes, the target
//! is the source exactly as it was when the job started. This is QEMU's backup block
//! job (block/backup.c, block-copy.c, copy-before-write.c) as an embeddable library:
//! plain threads, no async runtime, no global state, and a stable C ABI.
//!
//! ```
//! use std::sync::Arc;
//! use cowbackup::{backup_start, BackupOptions, BlockDriver, Job, MemDriver};
//!
//! // The host's write path: the hook first, then the write. `?` works both ways:
//! // cowbackup's errors convert into `io::Error` and `io::Error` into cowbackup's.
//! fn host_write(job: &Job, disk: &MemDriver, data: &[u8], offset: u64) -> std::io::Result<()> {
//!     job.cow_before_write(offset, data.len() as u64)?; // old data of those clusters is safe
//!     disk.write_at(data, offset)
//! }
//!
//! fn main() -> cowbackup::Result<()> {
//!     let source = Arc::new(MemDriver::from_bytes(&[0x42; 1 << 20])?);
//!     let target = Arc::new(MemDriver::new(1 << 20)?);
//!     // `Job` is Send + Sync: share it with the host's threads in an Arc.
//!     let job = Arc::new(backup_start(source.clone(), target.clone(), BackupOptions::default())?);
//!     let writer = {
//!         let (job, source) = (job.clone(), source.clone());
//!         std::thread::spawn(move || host_write(&job, &source, &[0x23; 512], 4096))
//!     };
//!     writer.join().expect("writer thread")?;
//!     job.wait()?;
//!     assert_eq!(target.to_vec(), vec![0x42; 1 << 20]); // the point in time
//!     Ok(())
//! }
//! ```
//!
//! Threads: a job runs a thread `cowbackup-<id>` and workers `cowbackup-<id>-<n>`; the
//! hook runs on (and blocks) the caller's thread. Driver methods and the completion
//! callback are called from any of these threads, concurrently. [`Job`],
//! [`DirtyBitmap`] and every driver are `Send + Sync`.
//!
//! Errors: one type, [`Error`], with a [`ErrorKind`] to match on and the errno the C API
//! returns; [`Result`] defaults to it (`Result<T, E>` still works after `use cowbackup::*`).
//! `MemDriver::new` and `from_bytes` return `io::Result` because they allocate the whole
//! device up front (a size too large for memory is an error, not an abort).

#![deny(missing_docs)]

pub mod bitmap;
mod buf;
mod dirty;
mod driver;
pub mod drivers;
mod error;
#[cfg(feature = "capi")]
pub mod ffi;
mod fs;
mod job;
pub mod nbd;
pub mod repo;
mod sync;
mod trace;
mod zero;

pub use buf::{AlignedBuf, IO_ALIGN};
pub use dirty::{BitmapFlags, BitmapInfo, DirtyBitmap, DEFAULT_GRANULARITY, MAX_GRANULARITY, MIN_GRANULARITY};
pub use driver::{write_zero_buffers, BlockDriver, BlockStatus, StatusFlags};
pub use drivers::crash::{CrashDriver, CrashReport, CrashStats, CRASH_SECTOR};
pub use drivers::fault::{FaultDriver, FaultOp, FaultRule, RuleId};
pub use drivers::file::{allocated_bytes, FileDriver, OpenFlags};
pub use drivers::memory::MemDriver;
pub use drivers::nbd::{NbdAddress, NbdDriver, NbdOptions, NbdUri};
#[cfg(feature = "rbd")]
pub use drivers::rbd::{RbdDriver, RbdOptions, RbdSpec, RBD_DEFAULT_TIMEOUT};
pub use error::{errno_of, Error, ErrorKind, IoContext, Op, Result, Side};
pub use fs::DEFAULT_FILE_MODE;
pub use job::{
    backup_start, backup_start_group, BackupOptions, BitmapMode, CbwErrorAction, CompletionFn, ErrorAction,
    GroupMember, Job, JobInfo, JobState, SnapshotView, SyncMode, WorkerPool, WorkerPriority, MAX_CHUNK_LIMIT,
    MAX_CLUSTER_SIZE, MAX_POOL_THREADS, MAX_WORKERS, MIN_CLUSTER_SIZE,
};
pub use trace::{TraceAction, TraceEvent, TraceFn};
pub use zero::buffer_is_zero;
