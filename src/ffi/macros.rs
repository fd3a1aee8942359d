//! The panic boundary and the argument checks used inside every exported function.
//!
//! The macros are used *inside* plain `#[no_mangle] pub unsafe extern "C" fn` bodies, so
//! cbindgen reads the signatures without expanding anything (rustls-ffi's
//! `ffi_panic_boundary!`).

use std::any::Any;
use std::os::raw::c_int;

use super::error::set_last_error;

/// The value an exported function returns when its body panicked.
pub(crate) trait PanicValue {
    /// `-EIO` for `int` functions, NULL for pointers, nothing for `void`.
    fn panic_value() -> Self;
}

impl PanicValue for c_int {
    fn panic_value() -> Self {
        -libc::EIO
    }
}

impl PanicValue for () {
    fn panic_value() -> Self {}
}

impl<T> PanicValue for *mut T {
    fn panic_value() -> Self {
        std::ptr::null_mut()
    }
}

impl<T> PanicValue for *const T {
    fn panic_value() -> Self {
        std::ptr::null()
    }
}

/// Turn a caught panic into the function's error value, with a message for
/// `cowbackup_last_error()`.
pub(crate) fn caught_panic<T: PanicValue>(function: &str, payload: Box<dyn Any + Send>) -> T {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    set_last_error(format!("{function}: internal error (panic): {msg}"));
    T::panic_value()
}

/// Run the body of an exported function, catching any panic: a panic never unwinds into
/// C; it becomes the function's error value (`-EIO`, NULL, or nothing) and a message.
/// `return` inside the body returns from the exported function.
macro_rules! ffi_panic_boundary {
    ($function:literal, $body:block) => {
        match ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(move || $body)) {
            Ok(ret) => ret,
            Err(payload) => $crate::ffi::macros::caught_panic($function, payload),
        }
    };
}

/// `&T` from a `*const T`/`*mut T` argument, or return `-EINVAL` ("<function>: <arg> is NULL").
macro_rules! try_ref {
    ($ptr:expr, $function:literal, $arg:literal) => {{
        let ptr = $ptr;
        if ptr.is_null() {
            return $crate::ffi::error::invalid(concat!($function, ": ", $arg, " is NULL"));
        }
        // SAFETY: not NULL; the caller guarantees (the function's `# Safety`) that a non-NULL
        // argument points to a live object of this type for the duration of the call.
        unsafe { &*ptr }
    }};
}

/// `&mut T` from a `*mut T` argument, or return `-EINVAL` ("<function>: <arg> is NULL").
macro_rules! try_mut {
    ($ptr:expr, $function:literal, $arg:literal) => {{
        let ptr = $ptr;
        if ptr.is_null() {
            return $crate::ffi::error::invalid(concat!($function, ": ", $arg, " is NULL"));
        }
        // SAFETY: not NULL; the caller guarantees (the function's `# Safety`) that a non-NULL
        // argument points to a live, writable object of this type, not used by anyone else
        // during the call.
        unsafe { &mut *ptr }
    }};
}

/// Check that an out-parameter is not NULL (before any work), or return `-EINVAL`.
/// It is written with `write_out` only on success.
macro_rules! check_out {
    ($ptr:expr, $function:literal, $arg:literal) => {
        if $ptr.is_null() {
            return $crate::ffi::error::invalid(concat!($function, ": ", $arg, " (out-parameter) is NULL"));
        }
    };
}
