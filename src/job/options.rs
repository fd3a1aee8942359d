//! `BackupOptions`: everything a job can be told at start, and their validation.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use super::policy::{CbwErrorAction, ErrorAction};

use crate::dirty::DirtyBitmap;
use crate::error::{Error, Result};
use crate::trace::TraceFn;

/// Which clusters the background copy processes.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncMode {
    /// Every cluster of the source.
    Full,
    /// Only clusters the source's `block_status` reports allocated (`DATA`); the rest
    /// are skipped (and written as zeroes on a target not known to read zeroes).
    Top,
    /// No background copy: the job only serves copy-before-write until cancelled
    /// (fleecing; the target is a scratch image). With a bitmap: the hook copies only
    /// clusters dirty in the frozen bitmap (pull-mode incremental).
    None,
    /// Only clusters overlapping granules dirty in [`BackupOptions::bitmap`] when the job
    /// starts (an incremental backup); the others count as skipped.
    Bitmap,
}

/// What a job does with its dirty bitmap at the end (QEMU's `BitmapSyncMode`). The bitmap
/// is frozen while the job runs; new writes are recorded in a successor.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BitmapMode {
    /// After a successful job the bitmap holds only the writes made during the job (the
    /// next incremental starts from this one); after a failure or cancel it holds
    /// everything again (frozen ∪ new writes).
    #[default]
    OnSuccess,
    /// As `OnSuccess` after a success; after a failure or cancel the bitmap holds the new
    /// writes plus the clusters the job did not copy (what it did copy is kept).
    Always,
    /// The bitmap is never cleared: frozen ∪ new writes (only with `Bitmap` or `None`).
    Never,
}

/// CPU (and I/O) priority of a job's background copy threads (`cowbackup-<id>-<n>`).
/// Copy-before-write runs on the host's own threads and is never lowered.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WorkerPriority {
    /// As the thread that started the job (inherited, unchanged). The default: on a
    /// machine busy with other work a lowered worker is preempted while it holds the
    /// target file's lock, and a hook waiting for that lock waits longer (PERFORMANCE.md).
    #[default]
    Normal,
    /// `SCHED_BATCH` at nice 19 and best-effort I/O priority 7 (the lowest): a host thread
    /// that wakes up gets a CPU before the workers, and the workers still get their
    /// small fair share (about 1.5 % of a CPU against each busy normal thread) when every
    /// CPU is busy, so the backup always moves.
    Low,
    /// `SCHED_IDLE` and the idle I/O class: the workers run only on a CPU (and a disk)
    /// that nothing else wants. Fastest for the host; the backup can stall for as long as
    /// other work keeps every CPU busy.
    Idle,
}

/// Called once when a job ends, with its result, on a library thread.
pub type CompletionFn = Arc<dyn Fn(&Result<()>) + Send + Sync>;

/// Options of [`crate::backup_start`]. Build with `..Default::default()` so new
/// fields do not break your code.
#[derive(Clone)]
pub struct BackupOptions {
    /// Granularity of copy-before-write and of the copy bitmap: a power of two from
    /// 4 KiB to 64 MiB. Default 64 KiB.
    pub cluster_size: u64,
    /// Which clusters are copied in the background. Default [`SyncMode::Full`].
    pub sync: SyncMode,
    /// Background copy threads, 1 to 64. Default 2 (the benchmark's best on 2 cores).
    pub workers: usize,
    /// CPU and I/O priority of the background copy threads. Default
    /// [`WorkerPriority::Normal`]. `Low` lets host threads take a CPU from the workers
    /// at once, for hosts whose CPUs are not busy with other work. Best effort: where the
    /// system refuses a setting, the workers run as they are.
    pub worker_priority: WorkerPriority,
    /// Largest background copy request in bytes, 4 KiB to 1 GiB; rounded down to
    /// whole clusters, at least one cluster. Default 1 MiB.
    pub max_chunk: u64,
    /// The target is known to read zeroes: zero clusters are not written at all. Also
    /// assumed when the target driver says so ([`crate::BlockDriver::reads_as_zero`]).
    pub target_is_zero: bool,
    /// Background copy speed limit in bytes/s; 0 = unlimited. Never slows the hook.
    pub speed: u64,
    /// What a background copy does when reading the source fails. Default `Report`.
    pub on_source_error: ErrorAction,
    /// What a background copy does when writing (or zeroing, or flushing) the target
    /// fails. Default `Report`.
    pub on_target_error: ErrorAction,
    /// What happens when the copy inside `cow_before_write` fails. Default
    /// `BreakGuestWrite`.
    pub on_cbw_error: CbwErrorAction,
    /// Longest time a `cow_before_write` call may take to get the old data of its clusters
    /// into the target (copying them itself, or waiting for another thread copying them).
    /// Past it the call fails with `TimedOut` (then `on_cbw_error` applies) while the copy
    /// goes on in the background on a helper thread `cowbackup-<id>-h`; the clusters stay
    /// protected. With a limit set, hook copies run on such helper threads (QEMU's
    /// cbw-timeout). `None` (default): no limit, the copy runs on the calling thread.
    pub cbw_timeout: Option<Duration>,
    /// Called once, from a library thread, after the job's final state is set.
    pub on_complete: Option<CompletionFn>,
    /// Trace sink (see [`crate::TraceEvent`]); `None`: no tracing, unless
    /// `COWBACKUP_TRACE=1` is in the environment (then events go to stderr).
    pub trace: Option<TraceFn>,
    /// Dirty bitmap of the source: required by [`SyncMode::Bitmap`], optional with `Full`
    /// and `Top` (to start a new chain) and with `None` (pull mode). The job freezes it
    /// at start (busy until the end) and applies `bitmap_mode` at the end.
    pub bitmap: Option<Arc<DirtyBitmap>>,
    /// What happens to `bitmap` at the end. Default [`BitmapMode::OnSuccess`].
    pub bitmap_mode: BitmapMode,
    /// After each background chunk is copied, discard it on the source (advisory). Meant
    /// for a source that is a snapshot view ([`crate::Job::snapshot`]): a push from a
    /// fleecing view that leaves the scratch image empty at the end. Default false.
    pub discard_source: bool,
    /// Memory in bytes in which `cow_before_write` may keep old data instead of writing
    /// it to the target itself; 0 (default) = none. With room left, the hook reads the
    /// old data of its clusters into memory and returns: the host's write waits for a
    /// source read only, never for the target (its lock behind a worker's write, its
    /// disk). A worker writes the data to the target soon after, before any background
    /// chunk; failures of that write follow `on_target_error` (the host's write has
    /// gone ahead, so it cannot be broken any more), and the job completes only when
    /// every saved byte is in the target. A hook whose data does not fit copies into the
    /// target as without the buffer. Snapshot views read saved clusters from memory.
    /// Needs background workers: not with [`SyncMode::None`].
    /// With [`WorkerPriority::Normal`] (the default) the job also runs a second set of
    /// threads at `SCHED_IDLE`, the night shift (one fewer than the CPUs, at least 1, at
    /// most `workers`): while the host writes clusters
    /// not yet copied (a hook needed a copy in the last 0.5 s) they copy and the others
    /// rest, so a host thread always finds a CPU; when the host is quiet, or the night
    /// shift gets no CPU time (no copy finished in 50 ms: every CPU busy with other
    /// work), the normal workers copy. Suggested: 16 MiB (what a few hundred 64 KiB host writes touch),
    /// for low host write latency during a backup (PERFORMANCE.md).
    pub cow_buffer: u64,
    /// Write a manifest of the backup to this path when the job completes (and only
    /// then): what the target holds (the copy set), a BLAKE3 digest of each copied
    /// cluster's point-in-time data computed from the buffers the job read, the disk id,
    /// the bitmap's uuid and generations, the parent's root digest for an incremental,
    /// times and byte counts (layout: docs/manifest.md). Written atomically (temporary
    /// file, fsync, rename without replacing, fsync of the directory), mode 0600. The
    /// path must not exist when the job starts (`EEXIST`), its directory must. Not with
    /// [`SyncMode::None`]. A file target is named in the manifest relative to the
    /// manifest's directory (absolute when it is elsewhere), so the two can move together.
    /// A manifest write that fails fails the job. Default `None`.
    pub manifest: Option<std::path::PathBuf>,
    /// The host's identity of the source disk (1 to 128 bytes). With a dirty bitmap: a
    /// bitmap that has no disk id adopts this one (durably, for a persistent bitmap); a
    /// bitmap of another disk id fails the start with `InvalidInput` (EINVAL). Recorded
    /// in the manifest; a chain only links backups of one disk id. Default `None`.
    pub disk_id: Option<String>,
    /// The previous backup's manifest, for an incremental's manifest: its root digest
    /// becomes the parent link (checked to be of the same size and disk id). When `None`,
    /// an incremental ([`SyncMode::Bitmap`]) links to the last manifest written in this
    /// process with the same bitmap; the bitmap's uuid and generation link it in any case.
    pub parent_manifest: Option<std::path::PathBuf>,
    /// Copy in the background with the threads of this pool, shared with the other jobs
    /// started with it, instead of threads of the job's own (for hosts that run many
    /// jobs at once: see [`crate::WorkerPool`]). Then `workers` is the most pool threads
    /// that copy for this job at once, and `worker_priority` orders the jobs inside the
    /// pool (`Normal` before `Low` before `Idle`; the threads themselves run at the
    /// pool's priority); `speed` and the error policies hold as without a pool; there is
    /// no night shift with `cow_buffer`. The job keeps its own job thread `cowbackup-<id>`,
    /// asleep while the pool copies. Default `None`.
    pub pool: Option<Arc<super::pool::WorkerPool>>,
}

/// Smallest and largest cluster sizes.
pub const MIN_CLUSTER_SIZE: u64 = 4096;
/// Largest cluster size.
pub const MAX_CLUSTER_SIZE: u64 = 64 << 20;
/// Most worker threads.
pub const MAX_WORKERS: usize = 64;
/// Largest `max_chunk`.
pub const MAX_CHUNK_LIMIT: u64 = 1 << 30;

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            cluster_size: 65536,
            sync: SyncMode::Full,
            workers: 2,
            worker_priority: WorkerPriority::Normal,
            max_chunk: 1 << 20,
            target_is_zero: false,
            speed: 0,
            on_source_error: ErrorAction::Report,
            on_target_error: ErrorAction::Report,
            on_cbw_error: CbwErrorAction::BreakGuestWrite,
            cbw_timeout: None,
            on_complete: None,
            trace: None,
            bitmap: None,
            bitmap_mode: BitmapMode::OnSuccess,
            discard_source: false,
            cow_buffer: 0,
            manifest: None,
            disk_id: None,
            parent_manifest: None,
            pool: None,
        }
    }
}

impl fmt::Debug for BackupOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackupOptions")
            .field("cluster_size", &self.cluster_size)
            .field("sync", &self.sync)
            .field("workers", &self.workers)
            .field("worker_priority", &self.worker_priority)
            .field("max_chunk", &self.max_chunk)
            .field("target_is_zero", &self.target_is_zero)
            .field("speed", &self.speed)
            .field("on_source_error", &self.on_source_error)
            .field("on_target_error", &self.on_target_error)
            .field("on_cbw_error", &self.on_cbw_error)
            .field("cbw_timeout", &self.cbw_timeout)
            .field("on_complete", &self.on_complete.as_ref().map(|_| "Fn"))
            .field("trace", &self.trace.as_ref().map(|_| "Fn"))
            .field("bitmap", &self.bitmap.as_ref().map(|b| b.info()))
            .field("bitmap_mode", &self.bitmap_mode)
            .field("discard_source", &self.discard_source)
            .field("cow_buffer", &self.cow_buffer)
            .field("manifest", &self.manifest)
            .field("disk_id", &self.disk_id)
            .field("parent_manifest", &self.parent_manifest)
            .field("pool", &self.pool)
            .finish()
    }
}

impl BackupOptions {
    /// Check every field; the error names the field and the problem.
    pub fn validate(&self) -> Result<()> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cs) {
            return Err(Error::invalid(format!(
                "cluster_size {cs} is invalid: it must be a power of two from {MIN_CLUSTER_SIZE} to {MAX_CLUSTER_SIZE}"
            )));
        }
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return Err(Error::invalid(format!(
                "workers {} is invalid: it must be from 1 to {MAX_WORKERS}",
                self.workers
            )));
        }
        if !(MIN_CLUSTER_SIZE..=MAX_CHUNK_LIMIT).contains(&self.max_chunk) {
            return Err(Error::invalid(format!(
                "max_chunk {} is invalid: it must be from {MIN_CLUSTER_SIZE} to {MAX_CHUNK_LIMIT}",
                self.max_chunk
            )));
        }
        if self.cow_buffer > 0 && self.sync == SyncMode::None {
            return Err(Error::invalid(
                "cow_buffer needs background workers to write the saved data, and sync mode None has none: \
                 set cow_buffer to 0 (the hook writes the scratch target itself)",
            ));
        }
        if let Some(id) = &self.disk_id {
            if id.is_empty() || id.len() > 128 {
                return Err(Error::invalid(format!("disk_id must be 1 to 128 bytes, got {}", id.len())));
            }
        }
        if self.manifest.is_some() && self.sync == SyncMode::None {
            return Err(Error::invalid(
                "a manifest needs a job that makes a backup: sync mode None leaves a scratch target",
            ));
        }
        if self.cbw_timeout == Some(Duration::ZERO) {
            return Err(Error::invalid("cbw_timeout must be positive (None: no limit)"));
        }
        match (self.sync, &self.bitmap, self.bitmap_mode) {
            (SyncMode::Bitmap, None, _) => {
                return Err(Error::invalid("sync mode Bitmap needs a dirty bitmap (options.bitmap)"))
            }
            (SyncMode::Full | SyncMode::Top, Some(_), BitmapMode::Never) => {
                return Err(Error::invalid(
                    "bitmap mode Never has no meaning with sync mode Full or Top: the job copies everything \
                     and would leave the bitmap unchanged; use OnSuccess or Always",
                ))
            }
            _ => {}
        }
        Ok(())
    }
}
