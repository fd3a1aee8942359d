//! The NBD client driver in C: `cowbackup_nbd_open`.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int};
#[cfg(feature = "tls")]
use std::os::unix::ffi::OsStrExt;
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
/// (`nbds://`, `nbds+unix://`) work here when they carry `tls-certificates=DIR` (a directory
/// with `ca-cert.pem`, and optionally `client-cert.pem` + `client-key.pem`, as libnbd and
/// QEMU lay them out); `cowbackup_nbd_open_tls` takes the files as arguments. `flags`: 0 (read-only) or `COWBACKUP_OPEN_WRITE` (writable
/// when the export is). An export the server marks read-only opens read-only whatever the
/// flags: its writes, zeroing and discards then fail with -EROFS.
///
/// The driver negotiates structured replies and `base:allocation` (block status reports the
/// export's holes and zeroes), splits requests to the server's maximum (at most 32 MiB), and
/// opens up to 4 connections on demand when the server allows several (`CAN_MULTI_CONN`), so
/// a job's workers write in parallel. Connecting plus the whole handshake, and every request
/// with its whole reply, must finish within 30 s (-ETIMEDOUT otherwise, however the server
/// trickles its bytes): a job stuck on a dead or hostile NBD target notices a cancel within
/// 30 s. A lost
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

/// `cowbackup_nbd_open` over TLS: `uri` must be `nbds://HOST[:PORT]/EXPORT` or
/// `nbds+unix:///EXPORT?socket=PATH`. `ca_pem`: PEM file of the CA(s) that sign the server's
/// certificate (required). `cert_pem` + `key_pem`: the client certificate and its key, for
/// servers that require one (both NULL, or both set). The server's certificate must carry
/// the URI's host name or IP address (for `nbds+unix://`: `localhost`, as libnbd does); a
/// `tls-hostname=NAME` URI parameter names another. TLS 1.3 or 1.2; every connection of the
/// driver (several with multi-conn) uses TLS, and a server that refuses STARTTLS fails the
/// open (-ENOTSUP) instead of falling back to plaintext.
///
/// Errors: as `cowbackup_nbd_open`; -EINVAL also for a NULL `ca_pem`, a certificate without
/// its key, files that are not PEM or do not match, a plaintext `nbd://` URI; -EIO when the
/// TLS handshake fails (the server's certificate is not trusted or not for that name, or the
/// server refused our certificate; the message says which); -ENOTSUP (built without the
/// `tls` feature, or the server does not offer TLS). Thread-safe.
///
/// # Safety
/// `uri` and `ca_pem` are NULL or NUL-terminated; `cert_pem` and `key_pem` are NULL or
/// NUL-terminated; `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_nbd_open_tls(
    uri: *const c_char,
    flags: u32,
    ca_pem: *const c_char,
    cert_pem: *const c_char,
    key_pem: *const c_char,
    out: *mut *mut cowbackup_driver,
) -> c_int {
    ffi_panic_boundary!("cowbackup_nbd_open_tls", {
        check_out!(out, "cowbackup_nbd_open_tls", "out");
        if uri.is_null() {
            return invalid("cowbackup_nbd_open_tls: uri is NULL");
        }
        if ca_pem.is_null() {
            return invalid("cowbackup_nbd_open_tls: ca_pem is NULL");
        }
        if flags & !COWBACKUP_OPEN_WRITE != 0 {
            return invalid(format!("cowbackup_nbd_open_tls: unknown flags {flags:#x} (only COWBACKUP_OPEN_WRITE)"));
        }
        if cert_pem.is_null() != key_pem.is_null() {
            return invalid("cowbackup_nbd_open_tls: cert_pem and key_pem go together (both NULL or both set)");
        }
        // SAFETY: non-NULL, NUL-terminated (caller's guarantee).
        let Ok(uri) = unsafe { CStr::from_ptr(uri) }.to_str() else {
            return invalid("cowbackup_nbd_open_tls: the URI is not UTF-8");
        };
        #[cfg(feature = "tls")]
        {
            // SAFETY: NULL or NUL-terminated (caller's guarantee); NULL checked first.
            let path = |p: *const c_char| {
                (!p.is_null()).then(|| {
                    // SAFETY: as above.
                    let b = unsafe { CStr::from_ptr(p) }.to_bytes();
                    std::path::PathBuf::from(std::ffi::OsStr::from_bytes(b))
                })
            };
            let tls = crate::nbd::ClientTls {
                ca_pem: path(ca_pem),
                cert_pem: path(cert_pem),
                key_pem: path(key_pem),
                ..Default::default()
            };
            let opts = NbdOptions { write: flags & COWBACKUP_OPEN_WRITE != 0, tls: Some(tls), ..Default::default() };
            match NbdDriver::connect_with(uri, &opts) {
                // SAFETY: `out` was checked above and the caller guarantees it is writable.
                Ok(d) => unsafe { new_handle(Arc::new(d), out) },
                Err(e) => fail_io("cowbackup_nbd_open_tls", &e),
            }
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = (uri, NbdDriver::connect, NbdOptions::default);
            super::error::fail_with(libc::ENOTSUP, "cowbackup_nbd_open_tls: built without TLS (cargo feature tls)")
        }
    })
}
