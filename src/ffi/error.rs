//! The thread-local last error message and the version string.

use std::cell::RefCell;
use std::ffi::CString;
use std::io;
use std::os::raw::{c_char, c_int};

use crate::error::{errno_of, Error};

thread_local! {
    /// The message of the last failure of a `cowbackup_*` call on this thread.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Remember `msg` as this thread's last error (NUL bytes are replaced).
pub(crate) fn set_last_error(msg: impl Into<String>) {
    let mut bytes = msg.into().into_bytes();
    for b in &mut bytes {
        if *b == 0 {
            *b = b'?';
        }
    }
    let msg = CString::new(bytes).unwrap_or_default();
    // A thread that is exiting has no thread-locals left: the message is lost, nothing else.
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = msg);
}

/// Record a bad-input message and return `-EINVAL`.
pub(crate) fn invalid(msg: impl Into<String>) -> c_int {
    set_last_error(msg);
    -libc::EINVAL
}

/// Record `msg` and return `-errno`.
pub(crate) fn fail_with(errno: c_int, msg: impl Into<String>) -> c_int {
    set_last_error(msg);
    -errno
}

/// The negative errno of a cowbackup error (never 0 or positive).
pub(crate) fn neg_errno(e: &Error) -> c_int {
    if e.errno() > 0 {
        -e.errno()
    } else {
        -libc::EIO
    }
}

/// `function: msg`, without saying the operation twice: a Rust message that starts with the
/// function's own name ("cow_before_write range 4096+512 is past the end ...", from
/// `Job::cow_before_write`) loses that word after the C name
/// ("cowbackup_cow_before_write: range 4096+512 is past the end ...").
pub(crate) fn prefixed(function: &str, msg: &str) -> String {
    let short = function.strip_prefix("cowbackup_").unwrap_or(function);
    let rest = msg.strip_prefix(short).and_then(|r| r.strip_prefix(' ')).filter(|r| !r.is_empty());
    format!("{function}: {}", rest.unwrap_or(msg))
}

/// Record a cowbackup error (prefixed with the function) and return its `-errno`.
pub(crate) fn fail(function: &str, e: &Error) -> c_int {
    set_last_error(prefixed(function, &e.to_string()));
    neg_errno(e)
}

/// Record an I/O error (prefixed with the function) and return its `-errno`.
pub(crate) fn fail_io(function: &str, e: &io::Error) -> c_int {
    set_last_error(prefixed(function, &e.to_string()));
    -errno_of(e)
}

/// 0, or the recorded error's `-errno`.
pub(crate) fn result(function: &str, r: crate::Result<()>) -> c_int {
    match r {
        Ok(()) => 0,
        Err(e) => fail(function, &e),
    }
}

/// The message of the last failed `cowbackup_*` call on the calling thread: what failed,
/// where and why (for example "cowbackup_driver_read: range 4096+512 is past the end of the
/// device (4096 bytes)"). Returns "" (never NULL) when no call has failed on this thread.
///
/// Successful calls do not clear the message; check the return value first, then read the
/// message. The string is owned by the library and stays valid until the next `cowbackup_*`
/// call fails on this thread or the thread exits; copy it to keep it. Thread-safe: each
/// thread has its own message.
#[no_mangle]
pub extern "C" fn cowbackup_last_error() -> *const c_char {
    ffi_panic_boundary!("cowbackup_last_error", {
        LAST_ERROR.try_with(|e| e.borrow().as_ptr()).unwrap_or(b"\0".as_ptr().cast())
    })
}

/// The version of the library, "MAJOR.MINOR.PATCH" (for example "0.1.0"): the same numbers as
/// the header's `COWBACKUP_VERSION_MAJOR`/`_MINOR`/`_PATCH` when header and library match.
/// The string is static: never free it. Thread-safe.
#[no_mangle]
pub extern "C" fn cowbackup_version() -> *const c_char {
    ffi_panic_boundary!("cowbackup_version", { concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast() })
}

#[cfg(test)]
mod tests {
    use super::prefixed;

    #[test]
    fn the_function_is_named_once() {
        assert_eq!(
            prefixed("cowbackup_cow_before_write", "cow_before_write range 1+2 is past the end"),
            "cowbackup_cow_before_write: range 1+2 is past the end"
        );
        assert_eq!(
            prefixed("cowbackup_job_wait", "source read at offset 0"),
            "cowbackup_job_wait: source read at offset 0"
        );
        // Only a whole word is dropped, and never the whole message.
        assert_eq!(prefixed("cowbackup_x", "xylophone"), "cowbackup_x: xylophone");
        assert_eq!(prefixed("cowbackup_x", "x"), "cowbackup_x: x");
    }
}
