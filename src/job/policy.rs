//! Error policies: what a job does when a copy fails (QEMU's BlockdevOnError and
//! copy-before-write's on-cbw-error).

use crate::error::{Error, ErrorKind};

/// What the background copy does on an I/O error (per side: source reads, target writes).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ErrorAction {
    /// The job fails with the error (`Failed`).
    #[default]
    Report,
    /// Record the failed clusters and go on; the job copies everything else and ends
    /// `Failed` with the first error; `bytes_failed` and `Job::failed_ranges` say what is
    /// missing (a rescue copy of a failing disk).
    Ignore,
    /// Pause the job with the error recorded in `info().error`; `resume` retries.
    Stop,
    /// `Stop` on ENOSPC (the operator can make room), `Report` otherwise.
    Enospc,
}

/// What happens when the copy inside `cow_before_write` fails.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CbwErrorAction {
    /// The hook returns the error, the host fails its write; the snapshot stays valid
    /// (the clusters stay dirty and are retried).
    #[default]
    BreakGuestWrite,
    /// The hook returns `Ok` so the host write goes on; the job fails with the error
    /// and later hooks are no-ops.
    BreakSnapshot,
}

/// What to do with one background copy error, after applying the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reaction {
    Report,
    Ignore,
    Stop,
}

impl ErrorAction {
    /// The reaction to `err` under this policy.
    pub(crate) fn react(self, err: &Error) -> Reaction {
        if err.kind() == ErrorKind::InvalidInput {
            return Reaction::Report;
        }
        match self {
            ErrorAction::Report => Reaction::Report,
            ErrorAction::Ignore => Reaction::Ignore,
            ErrorAction::Stop => Reaction::Stop,
            ErrorAction::Enospc if err.errno() == libc::ENOSPC => Reaction::Stop,
            ErrorAction::Enospc => Reaction::Report,
        }
    }
}
