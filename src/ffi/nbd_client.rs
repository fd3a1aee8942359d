//! The NBD client driver in C: `cowbackup_nbd_open`.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int};
use std::sync::Arc;

use super::driver::{cowbackup_driver, new_handle};
use super::error::{fail_io, invalid};
use super::COWBACKUP_OPEN_WRITE;
use crate::{NbdDriver, NbdOptions};

/// Connect to an export of an NBD server (`qemu-nbd`, `nbdkit`, `nbd-server`, a
/// `cowbackup_nbd_server`) and use it as a block device: a backup target on remote storage
/// or in any image format the server understands (a qcow2 image behind `qemu-nbd`).
///
/// `uri` is an NBD URI: `"nbd://HOST[:PORT]/EXPORT"` (TCP, port 10809 by default) or
/// `"nbd+unix:///EXPORT?socket=PATH"` (Unix socket); the export name is the path after the
/// first `/`, percent-decoded, and may be empty (the server's default export). TLS URIs
/// (`nbds://`) are not supported. `flags`: 0 (read-only) or `COWBACKUP_OPEN_WRITE` (writable
/// when the export is). An export the server marks read-only opens read-only whatever the
/// flags: its writes, zeroing and discards then fail with -EROFS.
///
/// The driver negotiates structured replies and `base:allocation` (block status reports the
/// export's holes and zeroes), splits requests to the server's maximum (at most 32 MiB), and
/// opens up to 4 connections on demand when the server allows several (`CAN_MULTI_CONN`), so
/// a job's workers write in parallel. Every send and receive times out after 30 s. A lost
/// connection fails its request (-ECONNRESET, -EPIPE, -ETIMEDOUT...) and the next request
/// reconnects; a flush after a connection was lost with unflushed writes fails with -EIO.
/// Server errors come back as their errno with the server's message.
///
/// On success `*out` is a new handle (free with `cowbackup_driver_free`; the connections close
/// with the last reference, e.g. when a job using it ends).
/// Errors: -EINVAL (NULL argument, unknown flags, a URI that is not a valid NBD URI: the
/// message says why); the connection's errno (-ENOENT: no socket, -ECONNREFUSED,
/// -ETIMEDOUT...); -ENOENT (no such export); -EIO (the peer is not an NBD server or broke the
/// protocol). The message names the URI. Thread-safe; the driver is thread-safe.
///
/// # Safety
/// `uri` is NULL or a NUL-terminated string; `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_nbd_open(uri: *const c_char, flags: u32, out: *mut *mut cowbackup_driver) -> c_int {
    ffi_panic_boundary!("cowbackup_nbd_open", {
        check_out!(out, "cowbackup_nbd_open", "out");
        if uri.is_null() {
            return invalid("cowbackup_nbd_open: uri is NULL");
        }
        if flags & !COWBACKUP_OPEN_WRITE != 0 {
            return invalid(format!("cowbackup_nbd_open: unknown flags {flags:#x} (only COWBACKUP_OPEN_WRITE)"));
        }
        // SAFETY: non-NULL, NUL-terminated (caller's guarantee).
        let uri = unsafe { CStr::from_ptr(uri) };
        let Ok(uri) = uri.to_str() else {
            return invalid("cowbackup_nbd_open: the URI is not UTF-8");
        };
        let opts = NbdOptions { write: flags & COWBACKUP_OPEN_WRITE != 0, ..Default::default() };
        match NbdDriver::connect_with(uri, &opts) {
            // SAFETY: `out` was checked above and the caller guarantees it is writable.
            Ok(d) => unsafe { new_handle(Arc::new(d), out) },
            Err(e) => fail_io("cowbackup_nbd_open", &e),
        }
    })
}
