//! The copy-before-write hook: `Job::cow_before_write`.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use super::copy::{Copied, Copier};
use super::cowbuf::Saved;
use super::{panic_error, reentry, Job, JobShared};
use crate::error::{Error, ErrorKind, Result};
use crate::job::CbwErrorAction;
use crate::trace::{TraceAction, TraceEvent};

/// What a hook did with one claimed run.
enum HookCopy {
    /// Copied into the target.
    Copied(Copied),
    /// Old data read into memory, for a worker to write.
    Saved(Arc<Saved>),
}

impl Job {
    /// Call before writing `[offset, offset + len)` of the source. Returns when the old
    /// data of every cluster the range touches is in the target (or, with
    /// [`crate::BackupOptions::cow_buffer`] and room left, safe in the job's memory, for a
    /// worker to write); then the write may go ahead. Any byte range is accepted
    /// (unaligned, many clusters, the partial last cluster); `len == 0` is a no-op.
    ///
    /// Fast path: when every touched cluster is already copied this costs a few atomic
    /// loads and takes no lock. Otherwise the calling thread copies the dirty clusters
    /// itself (taking priority over background copy), or waits for the thread already
    /// copying them. After the job has ended or been cancelled, this is a no-op.
    ///
    /// # Errors
    /// `InvalidInput` when the range overflows or ends past the device. When the copy
    /// fails (or waits longer than `cbw_timeout`: `TimedOut`), `on_cbw_error` decides:
    /// `BreakGuestWrite` returns the error (the host must fail its write; the clusters
    /// stay dirty, so the snapshot stays valid and a later call retries them);
    /// `BreakSnapshot` returns `Ok` and fails the job.
    #[inline]
    pub fn cow_before_write(&self, offset: u64, len: u64) -> Result<()> {
        self.shared.cow_before_write(offset, len)
    }
}

impl JobShared {
    #[inline]
    pub(crate) fn cow_before_write(self: &Arc<Self>, offset: u64, len: u64) -> Result<()> {
        let size = self.geo.size;
        let end = match offset.checked_add(len) {
            Some(end) if end <= size => end,
            _ => {
                return Err(Error::invalid(format!(
                    "cow_before_write range {offset}+{len} is past the end of the device ({size} bytes)"
                )))
            }
        };
        if len == 0 || self.hook_off.load(Ordering::Acquire) {
            return Ok(());
        }
        let clusters = self.geo.clusters_of(offset, end);
        if self.claims.is_clean(clusters.clone()) {
            return Ok(());
        }
        self.cow_slow(offset, len, clusters)
    }

    #[cold]
    fn cow_slow(self: &Arc<Self>, offset: u64, len: u64, clusters: Range<u64>) -> Result<()> {
        if reentry::inside(self.id) {
            // From a driver op or trace callback of this job: the clusters may be claimed
            // by this very thread, and a wait for them would never end.
            return Err(reentry::deadlock(self.id, "cow_before_write of uncopied clusters"));
        }
        let _inside = reentry::enter(self.id);
        self.pace.host_wrote();
        let start = Instant::now();
        self.trace(|| TraceEvent::HookBegin { job: self.id, offset, len });
        let result = match self.cbw_timeout {
            None => self.cow_copy(clusters),
            Some(t) => self.cow_copy_timed(clusters, t),
        };
        let result = match result {
            Ok(copied) => Ok(copied),
            Err(e) => self.on_cbw_error(e).map(|()| 0),
        };
        self.trace(|| TraceEvent::HookEnd {
            job: self.id,
            offset,
            len,
            waited: start.elapsed(),
            copied: *result.as_ref().unwrap_or(&0),
            errno: result.as_ref().err().map_or(0, |e| e.errno()),
        });
        result.map(|_| ())
    }

    /// The copy failed or timed out: apply `on_cbw_error`.
    fn on_cbw_error(&self, e: Error) -> Result<()> {
        let action = match self.on_cbw_error {
            CbwErrorAction::BreakSnapshot => TraceAction::BreakSnapshot,
            _ => TraceAction::BreakGuestWrite,
        };
        self.trace(|| TraceEvent::Error { job: self.id, error: e.clone(), action });
        if action == TraceAction::BreakGuestWrite {
            return Err(e);
        }
        // BreakSnapshot: later hooks are no-ops; the job ends Failed.
        self.hook_off.store(true, Ordering::Release);
        self.fail(e);
        Ok(())
    }

    /// Copy (or wait for) every dirty cluster of `clusters`; returns the bytes this call
    /// copied (or saved in the cow buffer).
    fn cow_copy(&self, clusters: Range<u64>) -> Result<u64> {
        // The hook starts no writeback (writeback.rs: a worker's business), so its reads
        // skip the page-cache probe that only that rule needs.
        let copier = Copier { writeback: super::writeback::Writeback::Never, ..self.copier() };
        let run = (self.geo.max_run * self.geo.cluster_size).min(self.geo.size);
        let (first, last) = (clusters.start << self.geo.shift, clusters.end.saturating_mul(self.geo.cluster_size));
        let mut buf = self.take_buf(run.min(last - first))?;
        let mut copied = 0u64;
        let mut saved_any = false;
        let stop = || self.hook_off.load(Ordering::Acquire);
        // Hook copies first: workers start no new chunk while this copies (priority.rs).
        let result = self.claims.copy_before_write(
            clusters,
            self.geo.max_run,
            &self.hook_gate,
            stop,
            |r| match self.save_old_data(&copier, r.clone())? {
                // Visible to snapshot views before the claim is marked saved (claims.rs).
                Some(saved) => Ok((HookCopy::Saved(self.cowbuf.add(saved)), true)),
                None => copier.copy(r, &mut buf).map(|done| (HookCopy::Copied(done), false)),
            },
            |r, done| match done {
                HookCopy::Copied(done) => {
                    let (offset, len) = self.geo.byte_range(r);
                    self.stats.add(done);
                    copied += done.data + done.zero;
                    self.trace(|| TraceEvent::ChunkCopied { job: self.id, offset, len, data: done.data, hook: true });
                }
                HookCopy::Saved(saved) => {
                    copied += saved.len;
                    saved_any = true;
                    self.cowbuf.enqueue(saved);
                }
            },
        );
        if saved_any {
            self.wake_workers();
        }
        let result = result.map(|()| copied);
        self.put_buf(buf);
        if copied > 0 {
            self.stats.cow_requests.fetch_add(1, Ordering::Relaxed);
            self.stats.cow_bytes.fetch_add(copied, Ordering::Relaxed);
        }
        result
    }

    /// With room in the cow buffer: read the old data of the claimed clusters `r` into
    /// a buffer of its own, to be queued for a worker (cowbuf.rs). `None`: no room (or
    /// no memory), copy into the target as usual.
    fn save_old_data(&self, copier: &Copier<'_>, r: Range<u64>) -> Result<Option<Saved>> {
        let (_, len) = self.geo.byte_range(r.clone());
        if !self.cowbuf.reserve(len) {
            return Ok(None);
        }
        let Ok(mut buf) = self.take_buf(len) else {
            self.cowbuf.unreserve(len);
            return Ok(None);
        };
        match copier.read(r.clone(), &mut buf) {
            Ok(_) => Ok(Some(Saved { clusters: r, buf, len })),
            Err(e) => {
                self.cowbuf.unreserve(len);
                self.put_buf(buf);
                Err(e)
            }
        }
    }

    /// `cow_copy` on a helper thread `cowbackup-<id>-h`, waiting at most `timeout`. On
    /// time-out the copy goes on in the background (its claims stay valid); the caller
    /// gets `TimedOut`.
    fn cow_copy_timed(self: &Arc<Self>, clusters: Range<u64>, timeout: Duration) -> Result<u64> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job = Arc::clone(self);
        let helpers = Arc::clone(&self.helpers);
        let c = clusters.clone();
        helpers.enter();
        let spawned = thread::Builder::new().name(format!("cowbackup-{}-h", self.id)).spawn(move || {
            let inside = reentry::enter(job.id);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.cow_copy(c)))
                .unwrap_or_else(|p| Err(panic_error("copy-before-write helper", p)));
            let _ = tx.send(r);
            drop(inside);
            // The job (and so the drivers) must be let go of before the count drops:
            // freeing the job waits for the count, and then no driver may outlive it.
            drop(job);
            helpers.leave();
        });
        match spawned {
            Ok(h) => self.helpers.adopt(h),
            Err(_) => {
                // No thread to be had: copy here, without the time limit.
                self.helpers.leave();
                return self.cow_copy(clusters);
            }
        }
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let (off, len) = self.geo.byte_range(clusters);
                Err(Error::new(
                    ErrorKind::TimedOut,
                    libc::ETIMEDOUT,
                    format!("copy-before-write of {len} bytes at offset {off} did not finish within {timeout:?}"),
                ))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(Error::new(ErrorKind::Io, libc::EIO, "copy-before-write helper thread ended without a result"))
            }
        }
    }
}
