//! Trace events for C: `cowbackup_options_set_trace` and the flat `cowbackup_trace_event`.

use std::ffi::CString;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::Arc;

use super::error::neg_errno;
use super::job::state_code;
use super::options::{cowbackup_options, CallbackOpaque};
use crate::{TraceAction, TraceEvent};

/// Event kind: the job's state changed (`from_state` → `to_state`).
pub const COWBACKUP_TRACE_STATE: u32 = 0;
/// Event kind: a run of clusters was copied (`offset`, `len`, `data` bytes of it written as
/// data, `hook` 1 when the hook copied it).
pub const COWBACKUP_TRACE_CHUNK: u32 = 1;
/// Event kind: a run of clusters read as zero (`offset`, `len`).
pub const COWBACKUP_TRACE_ZERO: u32 = 2;
/// Event kind: a hook call starts copying or waiting (`offset`, `len` of the write).
pub const COWBACKUP_TRACE_HOOK_BEGIN: u32 = 3;
/// Event kind: that hook call returns (`wait_ns`, `data` = bytes it copied, `error`).
pub const COWBACKUP_TRACE_HOOK_END: u32 = 4;
/// Event kind: a copy failed (`error`, `offset`, `len`, `action`).
pub const COWBACKUP_TRACE_ERROR: u32 = 5;

/// Action of an error event: the job fails.
pub const COWBACKUP_TRACE_ACTION_REPORT: u32 = 0;
/// Action of an error event: the clusters are given up, the job goes on.
pub const COWBACKUP_TRACE_ACTION_IGNORE: u32 = 1;
/// Action of an error event: the job pauses with the error.
pub const COWBACKUP_TRACE_ACTION_STOP: u32 = 2;
/// Action of an error event: the hook returns the error to the host.
pub const COWBACKUP_TRACE_ACTION_BREAK_GUEST_WRITE: u32 = 3;
/// Action of an error event: the hook returns 0 and the job fails.
pub const COWBACKUP_TRACE_ACTION_BREAK_SNAPSHOT: u32 = 4;

/// One trace event (`cowbackup_options_set_trace`). Fields a kind does not use are 0.
/// The struct and `message` are valid only during the callback.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct cowbackup_trace_event {
    /// `COWBACKUP_TRACE_*`.
    pub kind: u32,
    /// `-errno` of a failed hook call or of an error event; 0 otherwise.
    pub error: i32,
    /// The job's id (as in its thread names `cowbackup-<id>-<n>`).
    pub job: u64,
    /// Byte offset of the run or of the write.
    pub offset: u64,
    /// Length in bytes of the run or of the write.
    pub len: u64,
    /// CHUNK: bytes written as data; HOOK_END: bytes the call copied.
    pub data: u64,
    /// HOOK_END: how long the call took, in nanoseconds.
    pub wait_ns: u64,
    /// STATE: old and new `COWBACKUP_JOB_*` state.
    pub from_state: u32,
    /// STATE: the new state.
    pub to_state: u32,
    /// ERROR: `COWBACKUP_TRACE_ACTION_*`.
    pub action: u32,
    /// CHUNK: 1 when copied by the hook, 0 by a background worker.
    pub hook: u32,
    /// The event as one line of text (what `COWBACKUP_TRACE=1` prints); never NULL.
    pub message: *const c_char,
}

/// The C view of an event (without `message`).
fn flatten(e: &TraceEvent) -> cowbackup_trace_event {
    let mut c = cowbackup_trace_event {
        kind: 0,
        error: 0,
        job: 0,
        offset: 0,
        len: 0,
        data: 0,
        wait_ns: 0,
        from_state: 0,
        to_state: 0,
        action: 0,
        hook: 0,
        message: std::ptr::null(),
    };
    match e {
        TraceEvent::StateChanged { job, from, to } => {
            c.kind = COWBACKUP_TRACE_STATE;
            c.job = *job;
            c.from_state = state_code(*from);
            c.to_state = state_code(*to);
        }
        TraceEvent::ChunkCopied { job, offset, len, data, hook } => {
            c.kind = COWBACKUP_TRACE_CHUNK;
            (c.job, c.offset, c.len, c.data, c.hook) = (*job, *offset, *len, *data, u32::from(*hook));
        }
        TraceEvent::ZeroClusters { job, offset, len } => {
            c.kind = COWBACKUP_TRACE_ZERO;
            (c.job, c.offset, c.len) = (*job, *offset, *len);
        }
        TraceEvent::HookBegin { job, offset, len } => {
            c.kind = COWBACKUP_TRACE_HOOK_BEGIN;
            (c.job, c.offset, c.len) = (*job, *offset, *len);
        }
        TraceEvent::HookEnd { job, offset, len, waited, copied, errno } => {
            c.kind = COWBACKUP_TRACE_HOOK_END;
            (c.job, c.offset, c.len, c.data) = (*job, *offset, *len, *copied);
            c.wait_ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
            c.error = -*errno;
        }
        TraceEvent::Error { job, error, action } => {
            c.kind = COWBACKUP_TRACE_ERROR;
            c.job = *job;
            c.error = neg_errno(error);
            if let Some(ctx) = error.context() {
                (c.offset, c.len) = (ctx.offset, ctx.len);
            }
            c.action = match action {
                TraceAction::Report => COWBACKUP_TRACE_ACTION_REPORT,
                TraceAction::Ignore => COWBACKUP_TRACE_ACTION_IGNORE,
                TraceAction::Stop => COWBACKUP_TRACE_ACTION_STOP,
                TraceAction::BreakGuestWrite => COWBACKUP_TRACE_ACTION_BREAK_GUEST_WRITE,
                TraceAction::BreakSnapshot => COWBACKUP_TRACE_ACTION_BREAK_SNAPSHOT,
            };
        }
        // A newer event kind this C view does not know yet: not passed on.
        #[allow(unreachable_patterns)]
        _ => c.kind = u32::MAX,
    }
    c
}

/// Set the trace callback of the jobs started with these options: `cb(opaque, event)` is
/// called for every event of a job (state changes, chunks copied, zero runs, hook calls
/// that copy or wait, errors with the action taken). It runs on the thread that caused the
/// event, possibly concurrently, never with a library lock held: a job's workers
/// `cowbackup-<id>-<n>` and job thread `cowbackup-<id>`, a host thread inside
/// `cowbackup_cow_before_write`, a thread calling `cowbackup_job_pause`/`_resume` (the state
/// change), the thread calling `cowbackup_backup_start` (zero runs found at start, before the
/// job handle exists). `event` and its `message` are valid only during the call. It must be
/// thread-safe and quick, and must not longjmp out. The hook's fast path (clusters already
/// copied) emits nothing. `cb` NULL removes the callback (then `COWBACKUP_TRACE=1` in the
/// environment prints events to stderr). Errors: -EINVAL (NULL `o`).
///
/// Re-entrancy (capi/README.md, "Callbacks and re-entrancy"): the callback is inside its job,
/// on any thread. It may call the job's `cowbackup_job_query`, `_pause`, `_resume`, `_cancel`,
/// `_set_speed` (pause and resume emit a state event on this thread: the callback is called
/// again, nested); `cowbackup_cow_before_write` of clusters not yet copied and
/// `cowbackup_job_wait` return -EDEADLK, and `cowbackup_job_free` is refused (the job is
/// cancelled, not freed: free it from outside).
///
/// # Safety
/// `o` is NULL or a live options object. `cb`, when not NULL, is safe to call from any thread
/// with `opaque`, until every job started with these options has been freed.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_trace(
    o: *mut cowbackup_options,
    cb: Option<unsafe extern "C" fn(opaque: *mut c_void, event: *const cowbackup_trace_event)>,
    opaque: *mut c_void,
) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_trace", {
        let o = try_mut!(o, "cowbackup_options_set_trace", "o");
        o.inner.trace = cb.map(|cb| {
            let opaque = CallbackOpaque(opaque);
            Arc::new(move |e: &TraceEvent| {
                let mut c = flatten(e);
                if c.kind == u32::MAX {
                    return;
                }
                let text = CString::new(e.to_string().replace('\0', " ")).unwrap_or_default();
                c.message = text.as_ptr();
                // SAFETY: the caller's callback with its own opaque pointer (callable from any
                // thread: caller's guarantee); `c` and `text` outlive the call.
                unsafe { cb(opaque.get(), &c) }
            }) as crate::TraceFn
        });
        0
    })
}
