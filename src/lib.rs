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
//! use cowbackup::{backup_start, BackupOptions, BlockDriver, MemDriver};
//!
//! let source = Arc::new(MemDriver::from_bytes(&[0x42; 1 << 20]).unwrap());
//! let target = Arc::new(MemDriver::new(1 << 20).unwrap());
//! let job = backup_start(source.clone(), target.clone(), BackupOptions::default()).unwrap();
//! // The host's write path: hook first, then the write.
//! job.cow_before_write(4096, 512).unwrap();
//! source.write_at(&[0x23; 512], 4096).unwrap();
//! job.wait().unwrap();
//! assert_eq!(target.to_vec(), vec![0x42; 1 << 20]); // the point in time
//! ```
//!
//! Threads: a job runs a thread `cowbackup-<id>` and workers `cowbackup-<id>-<n>`; the
//! hook runs on (and blocks) the caller's thread. Driver methods and the completion
//! callback are called from any of these threads, concurrently.

#![warn(missing_docs)]

pub mod bitmap;
mod buf;
mod dirty;
mod driver;
pub mod drivers;
mod error;
#[cfg(feature = "capi")]
pub mod ffi;
mod job;
pub mod nbd;
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
pub use job::{
    backup_start, backup_start_group, BackupOptions, BitmapMode, CbwErrorAction, CompletionFn, ErrorAction,
    GroupMember, Job, JobInfo, JobState, SnapshotView, SyncMode, WorkerPriority, MAX_CHUNK_LIMIT, MAX_CLUSTER_SIZE,
    MAX_WORKERS, MIN_CLUSTER_SIZE,
};
pub use trace::{TraceAction, TraceEvent, TraceFn};
pub use zero::buffer_is_zero;
