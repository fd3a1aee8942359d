//! The job's state machine, in one place: states, pause and stop errors, fatal errors,
//! cancel, and the end-of-job rule.
//!
//! ```text
//! Created ─► Running ⇄ Paused ─► Completed | Failed | Cancelled
//! ```
//!
//! Rules:
//! - A **pause error** (policy `Stop`) pauses the job; `resume` clears it and retries.
//! - A **fatal error** (policy `Report`, a hook under `BreakSnapshot`, a panic, a failed
//!   flush) is final: it stops the job, switches the hook off, and nothing clears it. The
//!   first fatal error wins, also over an earlier pause error.
//! - **Cancel** and a fatal error: whichever comes first decides. A cancel after a fatal
//!   error changes nothing; an error after a cancel (a chunk or a flush failing because
//!   the job is stopping) leaves the job `Cancelled`.
//! - The job ends `Completed` only when no fatal error and no cancel happened, the target
//!   was flushed after the last write, and **no cluster of the copy set is dirty** —
//!   checked in every build, not only in debug builds. Otherwise it ends `Failed`.
//! - Every way of ending (normal, error, panic) goes through [`JobShared::finish`]: the
//!   result is stored, waiters are woken and the completion callback runs exactly once.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;

use super::policy::Reaction;
use super::{panic_error, reentry, worker, BitmapMode, JobShared, JobState, SyncMode};
use crate::dirty::EndOfJob;
use crate::error::{Error, ErrorKind, Op, Result, Side};
use crate::trace::{TraceAction, TraceEvent};

/// Everything about a job's control that changes over its life. Protected by
/// `JobShared::control`, which is never held across I/O or a user callback.
pub(crate) struct ControlState {
    /// The state callers see.
    pub state: JobState,
    /// Background copy paused (by `pause`, or by a `Stop` error: then `pause_error` is set).
    pub paused: bool,
    /// `cancel` was called before any fatal error.
    pub cancel: bool,
    /// The error that paused the job under policy `Stop`; `resume` clears it.
    pub pause_error: Option<Error>,
    /// The first fatal error. Final: never cleared.
    pub fatal: Option<Error>,
    /// The first error given up on under policy `Ignore`: the job's result at the end.
    pub ignored: Option<Error>,
    /// The target was flushed after the last background write.
    pub flushed: bool,
    /// `complete` was called (sync = None: end as Completed).
    pub complete: bool,
    /// The job thread has done its set-up writes (Top: zeroing the target); snapshot
    /// views wait for it before reading the target.
    pub prepared: bool,
    /// The end-of-job rule has been applied: the result is decided (set just before
    /// `result`, which waits for the bitmap's end-of-job update).
    pub finishing: bool,
    /// The job's consistency group has decided that every member completes (every one
    /// finished copying, none failed or was cancelled; group.rs): from then on `cancel`,
    /// `pause`, `resume` and fatal errors change nothing.
    pub group_committed: bool,
    /// Set once, when the job ends.
    pub result: Option<Result<()>>,
    /// The completion callback has returned (or there is none).
    pub callback_done: bool,
    /// The job's pool (pool.rs) is done with its background copy.
    pub pool_done: bool,
}

impl ControlState {
    pub fn new() -> ControlState {
        ControlState {
            state: JobState::Running,
            paused: false,
            cancel: false,
            pause_error: None,
            fatal: None,
            ignored: None,
            flushed: false,
            complete: false,
            prepared: false,
            finishing: false,
            group_committed: false,
            result: None,
            callback_done: false,
            pool_done: false,
        }
    }

    /// Why `pause`/`resume` no longer apply: the job has ended or is ending.
    fn ending(&self) -> Option<Error> {
        let why = if self.state.is_terminal() || self.finishing || self.group_committed {
            "the job has ended".to_string()
        } else if let Some(e) = &self.fatal {
            format!("the job is failing: {e}")
        } else if self.cancel {
            "the job is being cancelled".to_string()
        } else {
            return None;
        };
        Some(Error::new(ErrorKind::Busy, libc::EBUSY, why))
    }

    /// The error `info()` shows: the failure, or the error that paused the job.
    pub fn shown_error(&self) -> Option<Error> {
        match &self.result {
            Some(Err(e)) if self.state == JobState::Failed => Some(e.clone()),
            Some(_) => None,
            None => self.fatal.clone().or_else(|| self.pause_error.clone()),
        }
    }
}

/// What a worker does next ([`JobShared::wait_runnable`]).
pub(super) enum Next {
    /// Stop: the job is ending.
    Stop,
    /// Write old data a hook saved in memory.
    Saved,
    /// Copy the next background chunk.
    Chunk,
}

impl JobShared {
    /// Change the state under the lock; the trace event follows once the caller unlocks.
    pub(super) fn set_state(&self, c: &mut ControlState, to: JobState) -> Option<TraceEvent> {
        let from = std::mem::replace(&mut c.state, to);
        (from != to && self.trace.is_some()).then_some(TraceEvent::StateChanged { job: self.id, from, to })
    }

    pub(super) fn emit(&self, event: Option<TraceEvent>) {
        if let Some(e) = event {
            self.trace(|| e);
        }
    }

    /// The resume count, for [`JobShared::stop_on_error`]: read before an I/O starts.
    pub(super) fn resume_epoch(&self) -> u64 {
        self.resumes.load(Ordering::Acquire)
    }

    /// Policy `Stop`: pause the job with the error; `resume` retries. No effect on a
    /// job that is ending, nor for an I/O that began (at resume count `since`) before
    /// the operator's latest resume: that resume already asked for the retry, and the
    /// fault this I/O met may be the one the operator has just fixed (two workers'
    /// writes failing together must not leave the job paused again after one resume).
    pub(super) fn stop_on_error(&self, e: Error, since: Option<u64>) {
        let mut c = self.lock();
        if c.ending().is_some() {
            return;
        }
        if since.is_some_and(|s| s != self.resumes.load(Ordering::Acquire)) {
            return;
        }
        c.paused = true;
        c.pause_error = Some(e);
        let ev = self.set_state(&mut c, JobState::Paused);
        drop(c);
        self.control_cv.notify_all();
        self.emit(ev);
    }

    /// Policy `Ignore`: clusters given up. The job goes on and ends `Failed` with the first such error.
    pub(super) fn record_failed(&self, off: u64, len: u64, e: Error) {
        self.stats.failed.fetch_add(len, Ordering::Relaxed);
        super::push_merged(&mut self.failed.lock().unwrap_or_else(|e| e.into_inner()), off, len);
        self.lock().ignored.get_or_insert(e);
    }

    /// A fatal error: the job stops and ends `Failed` with the first such error, unless
    /// it was cancelled first (then it ends `Cancelled`). Final: `resume` does not clear it.
    pub(super) fn fail(&self, e: Error) {
        let mut c = self.lock();
        if !c.cancel && c.fatal.is_none() && !c.state.is_terminal() && !c.finishing && !c.group_committed {
            c.fatal = Some(e);
        }
        self.hook_off.store(true, Ordering::Release);
        self.stop.store(true, Ordering::Release);
        drop(c);
        self.control_cv.notify_all();
        self.claims.wake_all();
    }

    /// Pause the background copy. `Busy` when the job has ended or is ending.
    pub(super) fn pause(&self) -> Result<()> {
        let mut c = self.lock();
        if let Some(e) = c.ending() {
            return Err(e);
        }
        c.paused = true;
        let ev = self.set_state(&mut c, JobState::Paused);
        drop(c);
        self.emit(ev);
        Ok(())
    }

    /// Resume a paused job; a pause error is cleared (and retried), a fatal error never.
    pub(super) fn resume(&self) -> Result<()> {
        let mut c = self.lock();
        if let Some(e) = c.ending() {
            return Err(e);
        }
        c.paused = false;
        c.pause_error = None;
        self.resumes.fetch_add(1, Ordering::AcqRel);
        let ev = self.set_state(&mut c, JobState::Running);
        drop(c);
        self.control_cv.notify_all();
        self.emit(ev);
        Ok(())
    }

    /// Cancel: no effect on a job that has ended or already failed, nor on a member of a
    /// consistency group whose members have all finished copying (the group completes).
    pub(super) fn cancel(&self) {
        let mut c = self.lock();
        if c.state.is_terminal() || c.finishing || c.cancel || c.fatal.is_some() || c.group_committed {
            return;
        }
        c.cancel = true;
        self.hook_off.store(true, Ordering::Release);
        self.stop.store(true, Ordering::Release);
        drop(c);
        self.control_cv.notify_all();
        self.claims.wake_all();
    }

    /// `Job::complete`: end a `sync = None` job as Completed.
    pub(super) fn complete(&self) -> Result<()> {
        if self.sync != SyncMode::None {
            return Err(Error::invalid(
                "complete() applies to sync mode None only: other jobs complete when their copy is done",
            ));
        }
        let mut c = self.lock();
        if let Some(e) = c.ending() {
            return Err(e);
        }
        c.complete = true;
        drop(c);
        self.control_cv.notify_all();
        Ok(())
    }

    /// Wait until the job thread's set-up writes are done (or the job stops).
    pub(super) fn wait_prepared(&self) {
        let mut c = self.lock();
        while !c.prepared && !self.stop.load(Ordering::Acquire) {
            c = self.control_cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Change the speed limit. Under the control lock, so a worker between computing
    /// its delay and waiting cannot miss the wake-up.
    pub(super) fn set_speed(&self, bytes_per_sec: u64) {
        let c = self.lock();
        self.ratelimit.set_speed(bytes_per_sec);
        drop(c);
        self.control_cv.notify_all();
    }

    /// Paused (by `pause` or a `Stop` error) and not stopping.
    pub(super) fn is_paused(&self) -> bool {
        self.lock().paused && !self.stop.load(Ordering::Acquire)
    }

    /// Wait while paused (e.g. by `Stop`); false when the job is stopping instead.
    pub(super) fn wait_resumed(&self) -> bool {
        let mut c = self.lock();
        while c.paused && !self.stop.load(Ordering::Acquire) {
            c = self.control_cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        !self.stop.load(Ordering::Acquire)
    }

    /// Block a worker while the job is paused or over its speed limit, and say what it
    /// does next. The delay is computed and waited for under the control lock, so
    /// `set_speed`, `resume`, `cancel` and a hook saving old data always wake it.
    /// Saved old data (cowbuf.rs) is the hooks' work: written before any chunk, neither
    /// throttled nor held back by `pause`; only a job paused by an error (its retry
    /// waits for `resume`) leaves it queued.
    pub(super) fn wait_runnable(&self) -> Next {
        let _waiting = super::Waiting::new(&self.waiting_workers);
        let mut c = self.lock();
        loop {
            c = match self.runnable(&c) {
                Ok(next) => return next,
                Err(None) => self.control_cv.wait(c).unwrap_or_else(|e| e.into_inner()),
                Err(Some(d)) => self.control_cv.wait_timeout(c, d).unwrap_or_else(|e| e.into_inner()).0,
            };
        }
    }

    /// For a pool thread: what [`JobShared::wait_runnable`] would return now, without
    /// waiting: `Err(Some(d))` over the speed limit for `d` more, `Err(None)` paused.
    pub(super) fn runnable_now(&self) -> std::result::Result<Next, Option<std::time::Duration>> {
        self.runnable(&self.lock())
    }

    /// What a worker does next, decided under the control lock `c` (the rule of
    /// [`JobShared::wait_runnable`]): `Err(None)` paused, `Err(Some(d))` over the speed
    /// limit for `d` more.
    fn runnable(&self, c: &ControlState) -> std::result::Result<Next, Option<std::time::Duration>> {
        if self.stop.load(Ordering::Acquire) {
            return Ok(Next::Stop);
        }
        if c.pause_error.is_none() && self.cowbuf.pending() {
            return Ok(Next::Saved);
        }
        if c.paused {
            return Err(None);
        }
        let d = self.ratelimit.delay();
        if d.is_zero() {
            Ok(Next::Chunk)
        } else {
            Err(Some(d))
        }
    }

    /// The pool is done with this job (pool.rs): its job thread goes on.
    pub(super) fn pool_done(&self) {
        self.lock().pool_done = true;
        self.control_cv.notify_all();
    }

    /// Run one target-side operation of the job thread (zeroing, flush) under the
    /// target policy: `Stop` pauses and retries on resume, anything else fails the job.
    fn target_op(&self, mut op: impl FnMut() -> Result<()>) -> Result<()> {
        loop {
            match op() {
                Ok(()) => return Ok(()),
                Err(e) => match self.reaction(&e) {
                    Reaction::Stop => {
                        self.stop_on_error(e.clone(), None);
                        if !self.wait_resumed() {
                            return Err(e);
                        }
                    }
                    _ => return Err(e),
                },
            }
        }
    }

    /// The job thread `cowbackup-<id>`: prepare, run the workers, flush, end.
    pub(super) fn run(self: &Arc<Self>) {
        let _inside = reentry::enter(self.id);
        match catch_unwind(AssertUnwindSafe(|| self.run_inner())) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.fail(e),
            Err(p) => self.fail(panic_error("job thread", p)),
        }
        if let Some(group) = &self.group {
            let ok = self.outcome(&self.lock()).is_ok();
            group.arrive(self, ok);
        }
        self.finish();
    }

    /// `cancel` was called (and counted: before any fatal error).
    pub(super) fn cancel_requested(&self) -> bool {
        self.lock().cancel
    }

    /// Returns `Ok` when there is nothing more to do; whether the job completed is
    /// decided by [`JobShared::outcome`].
    fn run_inner(self: &Arc<Self>) -> Result<()> {
        let zero_target = std::mem::take(&mut *self.zero_target.lock().unwrap_or_else(|e| e.into_inner()));
        for (off, len) in zero_target {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            self.target_op(|| {
                self.target
                    .write_zeroes_at(off, len)
                    .map_err(|e| Error::io(Side::Target, Op::WriteZeroes, off, len, &e))
            })?;
        }
        self.lock().prepared = true;
        self.control_cv.notify_all();
        if self.sync == SyncMode::None {
            // Serve the hook until completed, cancelled, or failed by a hook under BreakSnapshot.
            let mut c = self.lock();
            while !c.cancel && c.fatal.is_none() && !c.complete {
                c = self.control_cv.wait(c).unwrap_or_else(|e| e.into_inner());
            }
            if !c.complete || c.cancel || c.fatal.is_some() {
                return Ok(());
            }
            drop(c);
            // Completed: no more copies; make what the hook wrote durable.
            self.hook_off.store(true, Ordering::Release);
            self.claims.wake_all();
            self.claims.wait_idle(); // hook copies in flight land before the flush
            return self.flush_target();
        }
        if let Some(pool) = &self.pool {
            // The pool's threads copy (pool.rs); this thread waits until they are done.
            pool.inner().attach(self);
            let mut c = self.lock();
            while !c.pool_done {
                c = self.control_cv.wait(c).unwrap_or_else(|e| e.into_inner());
            }
        } else {
            self.run_workers();
        }
        if self.stop.load(Ordering::Acquire) {
            // Cancelled or failed: outcome() says which.
            return Ok(());
        }
        self.flush_target()
    }

    /// The job's own worker threads `cowbackup-<id>-<n>` (day and night shift), joined.
    fn run_workers(self: &Arc<Self>) {
        thread::scope(|scope| {
            let count = self.workers + self.pace.night_workers();
            let mut workers = Vec::with_capacity(count);
            for n in 1..=count {
                let buf = self.worker_bufs.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
                let r = thread::Builder::new()
                    .name(format!("cowbackup-{}-{}", self.id, n))
                    .spawn_scoped(scope, move || worker::run(self, n, buf));
                match r {
                    Ok(h) => workers.push(h),
                    Err(e) => {
                        self.fail(Error::new(ErrorKind::Io, libc::EAGAIN, format!("cannot start worker thread: {e}")));
                        break;
                    }
                }
            }
            // Join each worker thread itself: the scope alone waits only for the closures,
            // and a worker would still be running (its thread-local destructors, the host's
            // too) after the job, and so `Job` drop / `cowbackup_job_free`, had returned.
            for h in workers {
                if let Err(p) = h.join() {
                    self.fail(panic_error("worker", p));
                }
            }
        });
    }

    /// The job's final flush of the target (under the target policy); `outcome` requires it.
    fn flush_target(&self) -> Result<()> {
        self.target_op(|| self.target.flush().map_err(|e| Error::io(Side::Target, Op::Flush, 0, self.geo.size, &e)))?;
        self.lock().flushed = true;
        Ok(())
    }

    /// The end-of-job rule (see the module doc).
    fn outcome(&self, c: &ControlState) -> Result<()> {
        if let Some(e) = &c.fatal {
            return Err(e.clone());
        }
        if c.cancel {
            return Err(Error::cancelled());
        }
        // sync = None copies only what the hook needs: its clusters stay dirty by design.
        let dirty = if self.sync == SyncMode::None { 0 } else { self.claims.dirty() };
        if dirty != 0 {
            return Err(Error::new(
                ErrorKind::Io,
                libc::EIO,
                format!(
                    "internal error: the job ended with {dirty} of {} clusters not copied; \
                     the target is not a point-in-time image",
                    self.geo.clusters
                ),
            ));
        }
        // A reader discarded clusters of a job whose target is the backup: it lacks them.
        let discarded = self.stats.discarded.load(Ordering::Relaxed);
        if self.sync != SyncMode::None && discarded > 0 {
            return Err(Error::new(
                ErrorKind::Io,
                libc::EIO,
                format!(
                    "{discarded} clusters were discarded through a snapshot view: \
                     the target is not a complete point-in-time image"
                ),
            ));
        }
        if !c.flushed {
            return Err(Error::new(
                ErrorKind::Io,
                libc::EIO,
                "internal error: the job ended without flushing the target",
            ));
        }
        // Under `Ignore`, clusters were given up: not a point-in-time image.
        match &c.ignored {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// The bitmap's end of job (QEMU's `backup_cleanup_sync_bitmap`):
    /// `sync = (completed || mode == Always) && mode != Never`. If `sync`, the bitmap
    /// becomes the successor (the writes made during the job), plus, after a failure or
    /// cancel under `Always`, the clusters not copied; else frozen ∪ successor.
    ///
    /// A cluster leaves the bitmap only once its copy is durable in the target: a job
    /// that completed has flushed it (`outcome` requires it); after a failure or cancel
    /// under `Always` the target is flushed here first, and if that flush fails nothing
    /// leaves the bitmap (frozen ∪ successor, as for `Never`).
    fn give_back_bitmap(&self, completed: bool) {
        let Some(bm) = &self.dirty else { return };
        let mode = self.bitmap_mode;
        let sync = (completed || mode == BitmapMode::Always) && mode != BitmapMode::Never;
        let end = if !sync {
            EndOfJob::Merge
        } else if completed {
            EndOfJob::Replace { add_back: Vec::new() }
        } else {
            // The clusters not copied, read *before* the flush: a cluster seen clean here
            // had its target write finished, so the flush below makes it durable (a hook
            // still copying has its bits set, and goes back into the bitmap).
            let mut add_back = Vec::new();
            for run in self.claims.dirty_runs(0..self.geo.clusters) {
                let (off, len) = self.geo.byte_range(run);
                super::push_merged(&mut add_back, off, len);
            }
            // Given up under Ignore: not copied either.
            add_back.extend(self.failed.lock().unwrap_or_else(|e| e.into_inner()).iter().copied());
            match self.target.flush() {
                Ok(()) => EndOfJob::Replace { add_back },
                Err(e) => {
                    let e = Error::io(Side::Target, Op::Flush, 0, self.geo.size, &e);
                    self.trace(|| TraceEvent::Error { job: self.id, error: e.clone(), action: TraceAction::Report });
                    EndOfJob::Merge
                }
            }
        };
        if let Err(e) = bm.unfreeze(end) {
            // The bitmap is not busy any more and lost nothing (it was merged back, or
            // the switch completes with its next write); the backup's result stands.
            self.trace(|| TraceEvent::Error { job: self.id, error: e.clone(), action: TraceAction::Report });
        }
    }

    /// End the job: store the result, wake every waiter, run the completion callback
    /// once. Nothing here can unwind: user code (trace, callback) runs under
    /// `catch_unwind`, and only after the result is stored.
    fn finish(&self) {
        self.hook_off.store(true, Ordering::Release);
        self.stop.store(true, Ordering::Release);
        let mut c = self.lock();
        let mut result = self.outcome(&c);
        c.finishing = true;
        drop(c);
        self.give_back_bitmap(result.is_ok());
        if let (Ok(()), Some(m)) = (&result, &self.manifest) {
            let st = &self.stats;
            result = m.write(st.copied.load(Ordering::Relaxed), st.zero.load(Ordering::Relaxed));
        }
        let mut c = self.lock();
        let state = match &result {
            Ok(()) => JobState::Completed,
            Err(e) if e.kind() == ErrorKind::Cancelled => JobState::Cancelled,
            Err(_) => JobState::Failed,
        };
        c.paused = false;
        c.pause_error = None;
        let ev = self.set_state(&mut c, state);
        c.result = Some(result.clone());
        drop(c);
        // The final state's trace event comes before waiters wake: when `wait` returns,
        // every event has been delivered. The sink cannot unwind (see `trace`).
        self.emit(ev);
        self.control_cv.notify_all();
        self.claims.wake_all();
        if let Some(cb) = &self.on_complete {
            // A panicking callback must not take the library thread down with it.
            let _ = catch_unwind(AssertUnwindSafe(|| cb(&result)));
        }
        // Only now may `wait` return: the final trace event and the callback are done.
        self.lock().callback_done = true;
        self.control_cv.notify_all();
    }
}
