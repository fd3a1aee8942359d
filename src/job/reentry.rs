//! Re-entrancy: which jobs the current thread is working for right now.
//!
//! A thread is *inside* job N while it runs job N's code that can call back into the
//! host: the job's own threads (`cowbackup-<id>`, workers, hook helpers) for their whole
//! life, and a host thread while it is in the slow path of job N's hook or in a trace
//! callback of job N. From there, a call that waits for job N to end (`wait`, freeing
//! the job) could never return, and freeing the job under a running hook would free
//! memory still in use: those calls are refused with `EDEADLK` instead (see
//! capi/README.md, "Callbacks and re-entrancy").

use std::cell::RefCell;

use crate::error::{Error, ErrorKind};

thread_local! {
    /// Ids of the jobs this thread is inside, innermost last.
    static INSIDE: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// This thread is inside job `.0` until the guard drops.
pub(crate) struct Inside(u64);

/// Mark the current thread as inside job `job` until the returned guard drops.
pub(crate) fn enter(job: u64) -> Inside {
    // A thread that is exiting has no thread-locals left: nothing to record then.
    let _ = INSIDE.try_with(|s| s.borrow_mut().push(job));
    Inside(job)
}

impl Drop for Inside {
    fn drop(&mut self) {
        let _ = INSIDE.try_with(|s| {
            let mut s = s.borrow_mut();
            if let Some(i) = s.iter().rposition(|&j| j == self.0) {
                s.remove(i);
            }
        });
    }
}

/// True when the current thread is inside job `job` (see the module doc).
pub(crate) fn inside(job: u64) -> bool {
    INSIDE.try_with(|s| s.borrow().contains(&job)).unwrap_or(false)
}

/// The error of a call that cannot work from inside the job's own callbacks.
pub(crate) fn deadlock(job: u64, call: &str) -> Error {
    Error::new(
        ErrorKind::Deadlock,
        libc::EDEADLK,
        format!(
            "{call} of job {job} called from inside one of that job's callbacks or driver operations \
             (a library thread of the job, or the job's hook or trace callback on this thread): \
             it would wait for itself; call it from outside the job's callbacks"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_per_thread() {
        assert!(!inside(7));
        let a = enter(7);
        {
            let _b = enter(8);
            assert!(inside(7) && inside(8));
            std::thread::spawn(|| assert!(!inside(7))).join().unwrap();
        }
        assert!(inside(7) && !inside(8));
        drop(a);
        assert!(!inside(7));
        assert_eq!(deadlock(7, "wait").errno(), libc::EDEADLK);
    }
}
