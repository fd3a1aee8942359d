//! The snapshot view: a read-only [`BlockDriver`] of a running job's point-in-time image
//! (QEMU's snapshot-access node; fleecing and pull mode).
//!
//! - A cluster already copied is read from the target. A cluster not yet copied is read
//!   from the source under a **read hold** (claims.rs): the hook waits for the hold to
//!   go, then copies. A view read never copies and never writes the target, and never
//!   waits for a copy in flight: a worker stuck on a slow or hung target does not stall
//!   readers (the host's write to those clusters waits for the readers instead).
//! - Clusters outside the job's bitmap (sync `Bitmap`, pull mode) and clusters the reader
//!   discarded are not served: a read touching any of them fails whole with `EACCES`.
//! - `discard` = "the reader is done with this range": its whole clusters leave the copy
//!   set (the hook and the workers skip them) and their space in the target is released.
//! - Writes fail with `EROFS`. Once the job ends, reads fail: with the job's error if it
//!   failed, `ESTALE` if it completed or was cancelled. The view keeps the job's shared
//!   state (and so its drivers) alive: dropping the `Job` first is safe.

use std::io;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::claims::Hold;
use super::{reentry, Job, JobShared, JobState};
use crate::driver::{BlockDriver, BlockStatus, StatusFlags};
use crate::error::{Error, ErrorKind, Result};

/// A read-only view of a job's point-in-time image ([`Job::snapshot`]).
pub struct SnapshotView {
    job: Arc<JobShared>,
}

fn io_err(errno: i32, msg: String) -> io::Error {
    io::Error::new(io::Error::from_raw_os_error(errno).kind(), Error::new(ErrorKind::Io, errno, msg))
}

impl Job {
    /// A read-only view of the point-in-time image, served while the job runs (any sync
    /// mode). Many views may exist; each is a [`BlockDriver`] usable from many threads.
    ///
    /// # Errors
    /// `Busy` (ESTALE) when the job has ended.
    pub fn snapshot(&self) -> Result<Arc<SnapshotView>> {
        let c = self.shared.lock();
        if c.state.is_terminal() || c.finishing {
            return Err(Error::new(ErrorKind::Busy, libc::ESTALE, "the job has ended: no snapshot view"));
        }
        drop(c);
        Ok(Arc::new(SnapshotView { job: Arc::clone(&self.shared) }))
    }

    /// End a `sync = None` job (fleecing, pull mode) as `Completed`: the reader has what
    /// it needs. The target is flushed, the job's bitmap (if any) is handled as for a
    /// successful job, and views go stale. Returns at once; [`Job::wait`] waits.
    ///
    /// # Errors
    /// `InvalidInput` for other sync modes (they complete by themselves); `Busy` when the
    /// job has ended or is ending.
    pub fn complete(&self) -> Result<()> {
        self.shared.complete()
    }
}

impl SnapshotView {
    /// Size of the image in bytes (the job's device size).
    pub fn len(&self) -> u64 {
        self.job.geo.size
    }

    /// Always false: a job's devices have a non-zero size.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The error of a view whose job has ended (or is ending): the job's error if it
    /// failed, else ESTALE.
    fn stale(&self) -> io::Error {
        let c = self.job.lock();
        let failed = match &c.result {
            Some(Err(e)) if c.state == JobState::Failed => Some(e.clone()),
            Some(_) => None,
            None => c.fatal.clone(),
        };
        drop(c);
        match failed {
            Some(e) => io::Error::from(e),
            None => io_err(libc::ESTALE, "the backup job has ended: the snapshot view is stale".into()),
        }
    }

    fn ended(&self) -> bool {
        self.job.hook_off.load(Ordering::Acquire)
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.job.geo.size => Ok(end),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                Error::invalid(format!(
                    "snapshot view range {offset}+{len} is past the end of the image ({} bytes)",
                    self.job.geo.size
                )),
            )),
        }
    }

    /// Fail with EACCES when any cluster of `r` is not served.
    fn check_served(&self, r: Range<u64>) -> io::Result<()> {
        if let Some(c) = self.job.unservable.next_set(r.start, r.end) {
            let (off, _) = self.job.geo.byte_range(c..c + 1);
            return Err(io_err(
                libc::EACCES,
                format!(
                    "snapshot view: cluster at offset {off} is not part of the point-in-time image served \
                     (outside the job's bitmap, or discarded by the reader)"
                ),
            ));
        }
        Ok(())
    }

    /// Take a read hold on `clusters` for a read or a status query: fails when the job has
    /// ended (or ends while waiting), with `EACCES` when a cluster is not served (checked
    /// again once held: a concurrent discard marks its clusters unserved before it waits
    /// for holds, so a read either sees that or keeps the discard waiting until it is
    /// done), and with `EDEADLK` from inside the job's own callbacks or driver operations
    /// (the hook there may be holding these very clusters, and the hold would wait for it).
    fn hold(&self, clusters: Range<u64>) -> io::Result<Hold<'_>> {
        let job = &*self.job;
        if self.ended() {
            return Err(self.stale());
        }
        if reentry::inside(job.id) {
            return Err(io::Error::from(reentry::deadlock(job.id, "a read of the job's snapshot view")));
        }
        self.check_served(clusters.clone())?;
        job.wait_prepared();
        let Some(hold) = job.claims.hold(clusters.clone(), || job.hook_off.load(Ordering::Acquire)) else {
            return Err(self.stale());
        };
        self.check_served(clusters)?;
        Ok(hold)
    }
}

impl BlockDriver for SnapshotView {
    fn size(&self) -> u64 {
        self.job.geo.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = self.check(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let job = &*self.job;
        let clusters = job.geo.clusters_of(offset, end);
        let hold = self.hold(clusters.clone())?;
        let mut c = clusters.start;
        while c < clusters.end {
            // Old data a hook saved in memory (cowbuf.rs), not yet in the target. Looked up
            // before the bits. Under the hold, a cluster's data may arrive in the buffer (a
            // copier that was reading when the hold came saves it) or leave it (written to
            // the target): either way the source still holds the old data until the hold
            // goes (the claim is parked, claims.rs), so reading the source for a cluster whose
            // bit is set is right, and a cleared bit means the data is in the target.
            if let Some(saved) = job.cowbuf.find(c) {
                let e = saved.clusters.end.min(clusters.end);
                let (roff, rlen) = job.geo.byte_range(c..e);
                let (from, to) = (roff.max(offset), (roff + rlen).min(end));
                let base = saved.clusters.start << job.geo.shift;
                let data = saved.data();
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - base) as usize..(to - base) as usize]);
                c = e;
                continue;
            }
            let next_saved = job.cowbuf.next_start(c, clusters.end);
            // A run of clusters all dirty (read the source) or all copied (read the target).
            let (dirty, e) = job.claims.run_from(c, next_saved);
            let (roff, rlen) = job.geo.byte_range(c..e);
            let (from, to) = (roff.max(offset), (roff + rlen).min(end));
            let piece = &mut buf[(from - offset) as usize..(to - offset) as usize];
            let r = if dirty { job.source.read_at(piece, from) } else { job.target.read_at(piece, from) };
            r?;
            c = e;
        }
        // The job ended while we read: the hook may have let a host write through. Asked
        // before the hold goes: while it is there the job cannot complete (the dirty
        // clusters held keep their bits), so a job that ends right after (the host's
        // write to these clusters was waiting for this read) does not make a read that was
        // served in time stale.
        if self.ended() {
            return Err(self.stale());
        }
        drop(hold);
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io_err(libc::EROFS, "a snapshot view is read-only".into()))
    }

    fn write_zeroes_at(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io_err(libc::EROFS, "a snapshot view is read-only".into()))
    }

    /// The status of the point-in-time image: of the source for clusters not yet copied,
    /// of the target for the others, for the run of clusters starting at `offset` that are
    /// all one or the other, under a read hold (so a hook cannot copy them and let a host
    /// write, zeroes or a discard of the source, change the answer meanwhile). `EACCES`
    /// when the cluster at `offset` is not served; the answer stops before the next one
    /// that is not.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let end = self.check(offset, len)?;
        if len == 0 {
            return Ok(BlockStatus { len: 0, flags: StatusFlags::DATA });
        }
        let job = &*self.job;
        let all = job.geo.clusters_of(offset, end);
        self.check_served(all.start..all.start + 1)?;
        let served_end = job.unservable.next_set(all.start, all.end).unwrap_or(all.end);
        let clusters = all.start..served_end;
        let hold = self.hold(clusters.clone())?;
        if let Some(saved) = job.cowbuf.find(clusters.start) {
            // Old data in memory (cowbuf.rs): reported as data.
            let (roff, rlen) = job.geo.byte_range(clusters.start..saved.clusters.end.min(clusters.end));
            if self.ended() {
                return Err(self.stale());
            }
            drop(hold);
            return Ok(BlockStatus { len: (roff + rlen).min(end) - offset, flags: StatusFlags::DATA });
        }
        let next_saved = job.cowbuf.next_start(clusters.start, clusters.end);
        let (dirty, e) = job.claims.run_from(clusters.start, next_saved);
        let (roff, rlen) = job.geo.byte_range(clusters.start..e);
        let run_end = (roff + rlen).min(end);
        let st = if dirty {
            job.source.block_status(offset, run_end - offset)?
        } else {
            job.target.block_status(offset, run_end - offset)?
        };
        // Asked before the hold goes, as in read_at.
        if self.ended() {
            return Err(self.stale());
        }
        drop(hold);
        Ok(BlockStatus { len: st.len.clamp(1, run_end - offset), flags: st.flags })
    }

    /// Release the whole clusters inside the range: they leave the copy set (no copy
    /// will be made), their space in the target is released, later reads of them fail
    /// with EACCES. Partial clusters at either end are left alone.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = self.check(offset, len)?;
        let job = &*self.job;
        let geo = &job.geo;
        let first = offset.div_ceil(geo.cluster_size);
        let last = if end == geo.size { geo.clusters } else { end / geo.cluster_size };
        if first >= last {
            return Ok(());
        }
        if self.ended() {
            return Err(self.stale());
        }
        if reentry::inside(job.id) {
            return Err(io::Error::from(reentry::deadlock(job.id, "a discard on the job's snapshot view")));
        }
        job.wait_prepared();
        job.stats.discarded.fetch_add(last - first, Ordering::Relaxed);
        job.unservable.set_range(first..last);
        let stop = || job.hook_off.load(Ordering::Acquire);
        let Some(cleared) = job.claims.drop_from_copy_set(first..last, stop) else {
            return Err(self.stale());
        };
        if cleared > 0 {
            // Approximate for a partial last cluster; exact in clusters.
            let bytes = (cleared * geo.cluster_size).min(geo.byte_range(first..last).1);
            job.stats.skipped.fetch_add(bytes, Ordering::Relaxed);
        }
        let (boff, blen) = geo.byte_range(first..last);
        job.target.discard(boff, blen)
    }
}
