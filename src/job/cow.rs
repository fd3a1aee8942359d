//! The copy-before-write hook: `Job::cow_before_write`.

use std::sync::atomic::Ordering;

use super::claims::HookClaim;
use super::{Job, JobShared};
use crate::error::{Error, Result};

impl Job {
    /// Call before writing `[offset, offset + len)` of the source. Returns when the old
    /// data of every cluster the range touches is in the target; then the write may go
    /// ahead. Any byte range is accepted (unaligned, many clusters, the partial last
    /// cluster); `len == 0` is a no-op.
    ///
    /// Fast path: when every touched cluster is already copied this costs a few atomic
    /// loads and takes no lock. Otherwise the calling thread copies the dirty clusters
    /// itself (taking priority over background copy), or waits for the thread already
    /// copying them. After the job has ended or been cancelled, this is a no-op.
    ///
    /// # Errors
    /// `InvalidInput` when the range overflows or ends past the device. The I/O error
    /// of the copy otherwise: the host must then fail its write; the clusters stay
    /// dirty, so the snapshot stays valid and a later call retries them.
    #[inline]
    pub fn cow_before_write(&self, offset: u64, len: u64) -> Result<()> {
        self.shared.cow_before_write(offset, len)
    }
}

impl JobShared {
    #[inline]
    pub(crate) fn cow_before_write(&self, offset: u64, len: u64) -> Result<()> {
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
        self.cow_slow(clusters)
    }

    #[cold]
    fn cow_slow(&self, clusters: std::ops::Range<u64>) -> Result<()> {
        let copier = self.copier();
        let mut buf = self.take_buf();
        let mut copied = 0u64;
        let stop = || self.hook_off.load(Ordering::Acquire);
        let result = loop {
            match self.claims.claim_or_wait(clusters.clone(), self.geo.max_run, None, stop) {
                HookClaim::Clean | HookClaim::Stopped => break Ok(()),
                HookClaim::TimedOut => unreachable!("no deadline was given"),
                HookClaim::Claimed(mine) => {
                    // Hook copies first: workers start no new chunk while this copies.
                    // Not held while waiting for others' claims, so no worker waits for us.
                    let _pass = self.hook_gate.enter();
                    let mut failed = None;
                    for claim in mine {
                        // After a failure the remaining claims are dropped: released dirty.
                        if failed.is_some() {
                            continue;
                        }
                        match copier.copy(claim.range(), &mut buf) {
                            Ok(done) => {
                                claim.done();
                                self.stats.add(done);
                                copied += done.data + done.zero;
                            }
                            Err(e) => failed = Some(e),
                        }
                    }
                    if let Some(e) = failed {
                        break Err(e);
                    }
                }
            }
        };
        self.put_buf(buf);
        if copied > 0 {
            self.stats.cow_requests.fetch_add(1, Ordering::Relaxed);
            self.stats.cow_bytes.fetch_add(copied, Ordering::Relaxed);
        }
        result
    }
}
