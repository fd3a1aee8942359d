//! Trace events: what a job does, as it does it, for a sink set in the options
//! (QEMU's trace events). With no sink, nothing is built or called. With
//! `COWBACKUP_TRACE=1` in the environment and no sink set, events are printed to
//! stderr, one line each (QEMU's `log` trace backend).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Error;
use crate::job::JobState;

/// What a job did about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TraceAction {
    /// The job fails with the error.
    Report,
    /// The clusters are recorded as failed; the job goes on.
    Ignore,
    /// The job pauses with the error; `resume` retries.
    Stop,
    /// The hook returns the error to the host.
    BreakGuestWrite,
    /// The hook returns Ok; the job fails.
    BreakSnapshot,
}

/// One event of a job. Offsets and lengths are in bytes.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub enum TraceEvent {
    /// The job's state changed.
    StateChanged {
        /// Job id.
        job: u64,
        /// Old state.
        from: JobState,
        /// New state.
        to: JobState,
    },
    /// A run of clusters was copied to the target.
    ChunkCopied {
        /// Job id.
        job: u64,
        /// Start of the run.
        offset: u64,
        /// Length of the run.
        len: u64,
        /// Bytes of it written as data (the rest read as zero).
        data: u64,
        /// Copied by the hook (true) or by a background worker.
        hook: bool,
    },
    /// A run of clusters read as zero: written as zeroes, or left alone in a target
    /// that already reads zeroes.
    ZeroClusters {
        /// Job id.
        job: u64,
        /// Start of the run.
        offset: u64,
        /// Length of the run.
        len: u64,
    },
    /// A hook call found dirty clusters and starts copying or waiting (slow path only).
    HookBegin {
        /// Job id.
        job: u64,
        /// The write's offset.
        offset: u64,
        /// The write's length.
        len: u64,
    },
    /// That hook call returns.
    HookEnd {
        /// Job id.
        job: u64,
        /// The write's offset.
        offset: u64,
        /// The write's length.
        len: u64,
        /// How long the call took (copying and waiting for other copies).
        waited: Duration,
        /// Bytes this call copied itself.
        copied: u64,
        /// 0, or the positive errno the call returns.
        errno: i32,
    },
    /// A copy failed, and what the job did about it.
    Error {
        /// Job id.
        job: u64,
        /// The error.
        error: Error,
        /// The action taken.
        action: TraceAction,
    },
}

/// A trace sink. Called on the thread that caused the event (a library thread or the
/// hook's caller), possibly concurrently, never with a library lock held.
pub type TraceFn = Arc<dyn Fn(&TraceEvent) + Send + Sync>;

impl fmt::Display for TraceEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TraceEvent::StateChanged { job, from, to } => write!(f, "backup_state job={job} from={from:?} to={to:?}"),
            TraceEvent::ChunkCopied { job, offset, len, data, hook } => {
                write!(f, "backup_chunk_copied job={job} offset={offset} len={len} data={data} hook={hook}")
            }
            TraceEvent::ZeroClusters { job, offset, len } => {
                write!(f, "backup_zero_clusters job={job} offset={offset} len={len}")
            }
            TraceEvent::HookBegin { job, offset, len } => write!(f, "cbw_begin job={job} offset={offset} len={len}"),
            TraceEvent::HookEnd { job, offset, len, waited, copied, errno } => write!(
                f,
                "cbw_end job={job} offset={offset} len={len} waited_us={} copied={copied} errno={errno}",
                waited.as_micros()
            ),
            TraceEvent::Error { job, error, action } => {
                write!(f, "backup_error job={job} errno={} action={action:?} error=\"{error}\"", error.errno())
            }
        }
    }
}

/// Deliver one event to a sink, inside job `job` (see job/reentry.rs), never letting a
/// panicking sink unwind into the library.
pub(crate) fn deliver(sink: &TraceFn, job: u64, event: &TraceEvent) {
    let _inside = crate::job::enter_job(job);
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink(event)));
}

/// The sink of `COWBACKUP_TRACE=1`: one line per event on stderr.
pub(crate) fn from_env() -> Option<TraceFn> {
    match std::env::var_os("COWBACKUP_TRACE") {
        // Never `eprintln!`: it panics when stderr is gone (a closed pipe in a daemon
        // that ignores SIGPIPE). A trace line that cannot be written is dropped.
        Some(v) if v == "1" => Some(Arc::new(|e: &TraceEvent| {
            use std::io::Write;
            let _ = writeln!(std::io::stderr().lock(), "cowbackup: {e}");
        })),
        _ => None,
    }
}
