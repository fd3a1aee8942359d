//! The background copy: each worker thread claims the next run of dirty clusters,
//! copies it, releases it, and reports progress, until nothing is left. A failed copy
//! goes through the error policy (policy.rs): fail the job, pause it, or give up the
//! bad clusters and go on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::claims::Claim;
use super::copy::{Copied, Copier};
use super::lifecycle::Next;
use super::policy::Reaction;
use super::{panic_error, JobShared};
use crate::buf::AlignedBuf;
use crate::error::{Error, Result};
use crate::trace::TraceEvent;

/// Body of worker thread `cowbackup-<id>-<n>`, with its copy buffer (allocated at
/// start for the longest run). Workers numbered above `workers` are the night shift
/// (priority.rs). A failure or a panic fails the job.
pub(crate) fn run(job: &JobShared, n: usize, mut buf: AlignedBuf) {
    let _inside = super::reentry::enter(job.id);
    let night = n > job.workers;
    if night {
        super::priority::night_shift_this_thread();
    } else {
        super::priority::lower_this_thread(job.worker_priority);
    }
    match catch_unwind(AssertUnwindSafe(|| work(job, night, &mut buf))) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => job.fail(e),
        Err(p) => job.fail(panic_error("worker", p)),
    }
}

fn work(job: &JobShared, night: bool, buf: &mut AlignedBuf) -> Result<()> {
    let copier = job.copier();
    // The night shift watches how long it waits for a CPU (priority.rs).
    let delay = if night { Some(super::priority::RunDelay::open()) } else { None };
    loop {
        match job.wait_runnable() {
            Next::Stop => return Ok(()),
            Next::Saved => {
                write_saved(job, &copier)?;
                continue;
            }
            Next::Chunk => {}
        }
        // The other shift's time (priority.rs): the host is writing and this worker
        // would take its CPU, or the host is quiet and this one is the night shift.
        if job.pace.should_rest(night) {
            if job.claims.dirty() == 0 {
                return Ok(()); // nothing left for either shift
            }
            job.pace.rest(night);
            continue;
        }
        let Some(claim) = next_claim(job) else {
            if job.claims.dirty() == 0 {
                return Ok(());
            }
            // Everything left is being copied by others (hooks, workers): wait for a
            // release; a failed copy leaves its clusters dirty for us to retry.
            let _waiting = super::Waiting::new(&job.waiting_workers);
            if !job.cowbuf.pending() {
                job.claims.wait_release(Duration::from_millis(100));
            }
            continue;
        };
        // Paused since `wait_runnable` (by the operator, or by another worker's `Stop`
        // error, which pauses before it releases its clusters): copy nothing until resumed.
        let epoch = job.resume_epoch();
        if job.is_paused() {
            drop(claim);
            continue;
        }
        let start = delay.as_ref().map(|d| (std::time::Instant::now(), d.read()));
        if copy_claim(job, &copier, claim, buf, epoch)? {
            if let (Some(d), Some((t, waited))) = (&delay, start) {
                let waited = d.read().saturating_sub(waited);
                job.pace.night_worked(super::priority::starved(waited, t.elapsed()));
            }
        }
    }
}

/// Hook copies first: no new chunk while one is copying (bounded, see priority.rs); then
/// the next run of dirty clusters from the cursor. With a cow buffer hooks only read (they
/// write the target only when the buffer is full): a short yield, as the full 2 ms per
/// chunk under a host writing all the time cut the backup to a quarter (PERFORMANCE.md).
fn next_claim(job: &JobShared) -> Option<Claim<'_>> {
    let most = if job.cowbuf.enabled() { super::priority::MAX_YIELD_BUFFERED } else { super::priority::MAX_YIELD };
    job.hook_gate.yield_to_hooks(most);
    job.claims.claim_next(job.cursor.load(Ordering::Relaxed), job.geo.max_run)
}

/// Copy `claim` (taken while the job was not paused, at resume count `epoch`) into `buf`:
/// move the search cursor past it, read the copy set ahead (prefetch.rs), copy, and
/// release it, or apply the error policy. `Ok(true)`: copied; `Err` fails the job.
fn copy_claim(
    job: &JobShared,
    copier: &Copier<'_>,
    claim: Claim<'_>,
    buf: &mut AlignedBuf,
    epoch: u64,
) -> Result<bool> {
    job.cursor.store(claim.range().end, Ordering::Relaxed);
    let geo = &job.geo;
    job.prefetch.ahead(&job.claims, job.source.as_file_driver(), claim.range(), geo.shift, geo.clusters, &job.pace);
    match copier.copy(claim.range(), buf) {
        Ok(done) => {
            finish(job, claim, done);
            Ok(true)
        }
        Err(e) => on_error(job, copier, claim, e, buf, epoch).map(|()| false),
    }
}

/// What one turn of a pool thread at a job came to (pool.rs).
pub(crate) enum Step {
    /// A chunk copied, or saved data written.
    Worked,
    /// Nothing to do now: the job may go again after this long (its speed limit), or
    /// `None`: when something changes (paused, every dirty cluster being copied).
    Wait(Option<Duration>),
    /// The job's background copy is over: nothing left, or stopped (cancelled, failed).
    Finished,
}

/// One turn of a pool thread (pool.rs) at `job`: what one round of [`work`]'s loop does
/// for a worker of the day shift, except that it never waits (a paused or speed-limited
/// job, or one whose dirty clusters are all being copied, is passed over), and copies
/// with the pool thread's `buf`, grown to the chunk. A failure or a panic fails the job.
pub(crate) fn step(job: &JobShared, buf: &mut AlignedBuf) -> Step {
    let _inside = super::reentry::enter(job.id);
    match catch_unwind(AssertUnwindSafe(|| step_inner(job, buf))) {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            job.fail(e);
            Step::Finished
        }
        Err(p) => {
            job.fail(panic_error("pool thread", p));
            Step::Finished
        }
    }
}

fn step_inner(job: &JobShared, buf: &mut AlignedBuf) -> Result<Step> {
    let copier = job.copier();
    match job.runnable_now() {
        Ok(Next::Stop) => return Ok(Step::Finished),
        Ok(Next::Saved) => {
            write_saved(job, &copier)?;
            return Ok(Step::Worked);
        }
        Ok(Next::Chunk) => {}
        Err(wait) => return Ok(Step::Wait(wait)),
    }
    let Some(claim) = next_claim(job) else {
        return Ok(if job.claims.dirty() == 0 { Step::Finished } else { Step::Wait(None) });
    };
    let epoch = job.resume_epoch();
    if job.is_paused() {
        drop(claim);
        return Ok(Step::Wait(None));
    }
    let (_, len) = job.geo.byte_range(claim.range());
    if buf.try_reserve(len as usize).is_err() {
        drop(claim);
        return Err(Error::new(
            crate::error::ErrorKind::OutOfMemory,
            libc::ENOMEM,
            format!("pool thread: cannot allocate a copy buffer of {len} bytes"),
        ));
    }
    copy_claim(job, &copier, claim, buf, epoch)?;
    Ok(Step::Worked)
}

/// Release a copied claim and count it.
fn finish(job: &JobShared, claim: Claim<'_>, done: Copied) {
    let (off, len) = job.geo.byte_range(claim.range());
    claim.done();
    if done.write_back {
        super::writeback::start(&*job.target, off, len);
    }
    if job.discard_source {
        // Advisory: a failure costs space, not correctness.
        let _ = job.source.discard(off, len);
    }
    job.stats.add(done);
    job.ratelimit.account(len);
    job.trace(|| TraceEvent::ChunkCopied { job: job.id, offset: off, len, data: done.data, hook: false });
}

/// Apply the error policy to a failed background copy, begun at resume count `epoch`.
/// `Err` fails the job.
fn on_error(
    job: &JobShared,
    copier: &Copier<'_>,
    claim: Claim<'_>,
    e: Error,
    buf: &mut AlignedBuf,
    epoch: u64,
) -> Result<()> {
    match job.reaction(&e) {
        // The claim is dropped: its clusters stay dirty.
        Reaction::Report => Err(e),
        // Pause first, then release: a worker waiting for these clusters must find the
        // job paused, not copy them again while the error is still there.
        Reaction::Stop => {
            job.stop_on_error(e, Some(epoch));
            drop(claim);
            Ok(())
        }
        Reaction::Ignore => {
            let r = claim.range();
            if r.end - r.start == 1 {
                let (off, len) = job.geo.byte_range(r);
                job.record_failed(off, len, e);
                claim.done();
                return Ok(());
            }
            // Retry cluster by cluster so only the bad clusters are lost. Counted only
            // once the whole claim is settled, so a non-Ignore error on a retry leaves
            // the claim dirty and the counts exact.
            let mut total = Copied::default();
            let mut lost = Vec::new();
            for c in r.clone() {
                match copier.copy(c..c + 1, buf) {
                    Ok(done) => {
                        total.data += done.data;
                        total.zero += done.zero;
                    }
                    Err(e) => match job.reaction(&e) {
                        Reaction::Ignore => lost.push((c, e)),
                        Reaction::Report => return Err(e),
                        Reaction::Stop => {
                            job.stop_on_error(e, Some(epoch));
                            drop(claim);
                            return Ok(());
                        }
                    },
                }
            }
            for (c, e) in lost {
                let (off, len) = job.geo.byte_range(c..c + 1);
                job.record_failed(off, len, e);
            }
            finish(job, claim, total);
            Ok(())
        }
    }
}

/// Write the oldest old data a hook saved in memory (cowbuf.rs) to the target and
/// release its claim clean. On failure the target policy applies, but the data must
/// never be lost while the job goes on (the source no longer holds it): `Stop` keeps
/// it queued for the retry after `resume`; `Report` fails the job *before* the claim
/// is released dirty, so no one copies the source's newer data in its place. The data
/// leaves the buffer only after its clusters are clean (views read it until then).
fn write_saved(job: &JobShared, copier: &Copier<'_>) -> Result<()> {
    let epoch = job.resume_epoch();
    let Some(saved) = job.cowbuf.pop() else {
        return Ok(());
    };
    let claim = job.claims.take_saved(saved.clusters.clone());
    let (off, len) = job.geo.byte_range(saved.clusters.clone());
    // Never by copy offload from the source: it holds newer data now.
    let result = match copier.put(saved.clusters.clone(), saved.data(), None) {
        Ok(done) => {
            claim.done();
            job.stats.add(done);
            job.trace(|| TraceEvent::ChunkCopied { job: job.id, offset: off, len, data: done.data, hook: true });
            Ok(())
        }
        Err(e) => match job.reaction(&e) {
            Reaction::Stop => {
                job.stop_on_error(e, Some(epoch));
                claim.keep_saved();
                job.cowbuf.push_front(saved);
                return Ok(());
            }
            Reaction::Ignore => {
                job.record_failed(off, len, e);
                claim.done();
                Ok(())
            }
            Reaction::Report => {
                job.fail(e.clone());
                drop(claim);
                Err(e)
            }
        },
    };
    if let Some(buf) = job.cowbuf.release(saved) {
        job.put_buf(buf);
    }
    result
}
