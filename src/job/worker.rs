//! The background copy: each worker thread claims the next run of dirty clusters,
//! copies it, releases it, and reports progress, until nothing is left.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{panic_error, JobShared};
use crate::buf::AlignedBuf;
use crate::error::Result;

/// Body of a worker thread `cowbackup-<id>-<n>`. A failure or a panic fails the job.
pub(crate) fn run(job: &JobShared) {
    let mut buf = AlignedBuf::new();
    match catch_unwind(AssertUnwindSafe(|| work(job, &mut buf))) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => job.fail(e),
        Err(p) => job.fail(panic_error("worker", p)),
    }
}

fn work(job: &JobShared, buf: &mut AlignedBuf) -> Result<()> {
    let copier = job.copier();
    loop {
        if !job.wait_runnable() {
            return Ok(());
        }
        // Hook copies first: no new chunk while one is copying (bounded, see priority.rs).
        job.hook_gate.yield_to_hooks(super::priority::MAX_YIELD);
        let Some(claim) = job.claims.claim_next(job.cursor.load(Ordering::Relaxed), job.geo.max_run) else {
            if job.claims.dirty() == 0 {
                return Ok(());
            }
            // Everything left is being copied by others (hooks, workers): wait for a
            // release; a failed copy leaves its clusters dirty for us to retry.
            job.claims.wait_release(Duration::from_millis(100));
            continue;
        };
        job.cursor.store(claim.range().end, Ordering::Relaxed);
        // On error the claim is dropped: released with its clusters still dirty.
        let done = copier.copy(claim.range(), buf)?;
        claim.done();
        job.stats.add(done);
        job.ratelimit.account(done.data + done.zero);
    }
}
