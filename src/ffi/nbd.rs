//! NBD: `cowbackup_nbd_server_*`, an NBD server exporting drivers (snapshot views) and
//! dirty bitmaps (`crate::nbd::Server`).

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int};

use super::bitmap::cowbackup_bitmap;
use super::driver::cowbackup_driver;
use super::error::{fail, invalid, result, set_last_error};
use crate::nbd::{Server, ServerOptions};

/// `cowbackup_nbd_server_add` flag: clients may write (WRITE, WRITE_ZEROES, TRIM, FLUSH).
/// Without it the export is read-only (writes fail with EPERM on the client) and advertises
/// multi-conn.
pub const COWBACKUP_NBD_WRITABLE: u32 = 1;

/// An NBD server (opaque), made by `cowbackup_nbd_server_start`.
///
/// It runs a thread `cowbackup-nbd-accept` and one thread `cowbackup-nbd-<n>` per connected
/// client; the exported drivers' ops are called on those threads, concurrently (one per
/// client). Every function on the handle may be called from any thread, concurrently, except
/// `cowbackup_nbd_server_stop`, which must be the last call on it.
pub struct cowbackup_nbd_server {
    server: Server,
    address: CString,
}

/// A UTF-8 string argument (NBD names are UTF-8), or `None` with the error recorded.
///
/// # Safety
/// `s` is non-NULL and NUL-terminated.
unsafe fn utf8<'a>(s: *const c_char, function: &str, arg: &str) -> Option<&'a str> {
    // SAFETY: the caller's guarantee.
    match unsafe { CStr::from_ptr(s) }.to_str() {
        Ok(s) => Some(s),
        Err(_) => {
            set_last_error(format!("{function}: {arg} is not UTF-8"));
            None
        }
    }
}

/// Start an NBD server listening on `address`: `"unix:PATH"` (a Unix socket created at
/// `PATH`; an existing file that is not a socket is never removed: -EEXIST; a stale socket
/// nobody listens on is replaced) or `"tcp:HOST:PORT"` (`PORT` 0 picks a free port; read it
/// back with `cowbackup_nbd_server_address`). The server exports nothing until
/// `cowbackup_nbd_server_add`. Protocol: fixed newstyle NBD with structured replies,
/// metadata contexts `base:allocation` and `qemu:dirty-bitmap:NAME`; at most 16 clients at a
/// time, 32 MiB requests, 5 minutes idle timeout; a misbehaving client gets an NBD error or
/// is disconnected. No TLS: a TCP address that is not loopback is refused (-EPERM); use
/// `cowbackup_nbd_server_start_with` for TLS, client authorization, limits, or to serve
/// plaintext beyond loopback on purpose. The Unix socket file is created mode 0600 (the
/// caller may chmod it afterwards to let others in).
///
/// On success `*out` is the server (stop and free it with `cowbackup_nbd_server_stop`).
/// Errors: -EINVAL (NULL argument, malformed address); -EPERM (non-loopback TCP address);
/// -EADDRINUSE (a server listens there); -EEXIST; other socket errors as -errno.
///
/// # Safety
/// `address` is NULL or a NUL-terminated string; `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_nbd_server_start(
    address: *const c_char,
    out: *mut *mut cowbackup_nbd_server,
) -> c_int {
    ffi_panic_boundary!("cowbackup_nbd_server_start", {
        check_out!(out, "cowbackup_nbd_server_start", "out");
        let _ = try_ref!(address, "cowbackup_nbd_server_start", "address");
        // SAFETY: non-NULL (checked); NUL-terminated (caller's guarantee).
        let Some(address) = (unsafe { utf8(address, "cowbackup_nbd_server_start", "address") }) else {
            return -libc::EINVAL;
        };
        // SAFETY: `out` was checked non-NULL; the caller guarantees it is writable.
        unsafe { start(address, ServerOptions::default(), out, "cowbackup_nbd_server_start") }
    })
}

/// Start the server and write the handle to `out`.
///
/// # Safety
/// `out` is non-NULL and valid for writes.
unsafe fn start(address: &str, opts: ServerOptions, out: *mut *mut cowbackup_nbd_server, function: &str) -> c_int {
    match Server::start_with(address, opts) {
        Ok(server) => {
            let address = CString::new(server.address()).unwrap_or_default();
            let handle = Box::into_raw(Box::new(cowbackup_nbd_server { server, address }));
            // SAFETY: non-NULL and writable (this function's contract).
            unsafe { out.write(handle) };
            0
        }
        Err(e) => fail(function, &e),
    }
}

/// Options of an NBD server (opaque): TLS credentials, client authorization, the insecure
/// switch, limits. Made by `cowbackup_nbd_server_options_new` with the defaults (no TLS,
/// loopback/Unix only, 16 connections, 5 minutes idle timeout), changed by the setters (each
/// validates at once; a failed setter changes nothing), read by
/// `cowbackup_nbd_server_start_with` (which copies them: they may be freed or reused
/// afterwards). Not thread-safe: do not change one options object from two threads at once.
pub struct cowbackup_nbd_server_options {
    inner: ServerOptions,
    /// Allowed client identities (checked for syntax when added, applied by start_with).
    allow: Vec<String>,
}

/// New server options with the defaults. Free with `cowbackup_nbd_server_options_free`.
/// Returns NULL only on an internal error. Thread-safe.
#[no_mangle]
pub extern "C" fn cowbackup_nbd_server_options_new() -> *mut cowbackup_nbd_server_options {
    ffi_panic_boundary!("cowbackup_nbd_server_options_new", {
        Box::into_raw(Box::new(cowbackup_nbd_server_options { inner: ServerOptions::default(), allow: Vec::new() }))
    })
}

/// Free server options. NULL: nothing. Servers started with them are not affected.
///
/// # Safety
/// `o` is NULL or a live options object, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_nbd_server_options_free(o: *mut cowbackup_nbd_server_options) {
    ffi_panic_boundary!("cowbackup_nbd_server_options_free", {
        if !o.is_null() {
            // SAFETY: made by Box::into_raw in cowbackup_nbd_server_options_new, freed once
            // (caller's guarantee).
            drop(unsafe { Box::from_raw(o) });
        }
    })
}

/// A path argument (any bytes but NUL).
///
/// # Safety
/// `s` is non-NULL and NUL-terminated.
#[cfg(feature = "tls")]
unsafe fn path<'a>(s: *const c_char) -> &'a std::path::Path {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: the caller's guarantee.
    std::path::Path::new(std::ffi::OsStr::from_bytes(unsafe { CStr::from_ptr(s) }.to_bytes()))
}

/// Serve NBD over TLS (`NBD_OPT_STARTTLS`, TLS 1.3 or 1.2) with the server certificate
/// chain `cert_pem` (PEM file, leaf first) and its private key `key_pem` (PEM: PKCS#8,
/// PKCS#1 or SEC1). `ca_pem`: NULL (clients need no certificate) or a PEM file of the CA
/// that signs client certificates: then every client must present a certificate that
/// chains to it, and, when identities were allowed with `cowbackup_nbd_server_options_allow`,
/// is one of them. With TLS, a client that sends any option but STARTTLS (or ABORT) first
/// gets `NBD_REP_ERR_TLS_REQD` and learns nothing (no export names, sizes or flags); after
/// STARTTLS everything is encrypted, with no way back. The files are read now. Setting TLS
/// again replaces the credentials (the allow-list stays).
///
/// Errors: -EINVAL (NULL `o`, `cert_pem` or `key_pem`; a file that is not PEM or holds no
/// certificate / key; a key that does not match the certificate; the message names the
/// file); the file's errno (-ENOENT, -EACCES); -ENOTSUP (built without the `tls` feature).
///
/// # Safety
/// `o` is NULL or a live options object; the paths are NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_nbd_server_options_set_tls(
    o: *mut cowbackup_nbd_server_options,
    cert_pem: *const c_char,
    key_pem: *const c_char,
    ca_pem: *const c_char,
) -> c_int {
    ffi_panic_boundary!("cowbackup_nbd_server_options_set_tls", {
        let o = try_mut!(o, "cowbackup_nbd_server_options_set_tls", "o");
        let _ = try_ref!(cert_pem, "cowbackup_nbd_server_options_set_tls", "cert_pem");
        let _ = try_ref!(key_pem, "cowbackup_nbd_server_options_set_tls", "key_pem");
        #[cfg(feature = "tls")]
        {
            // SAFETY: non-NULL (checked) or NULL-checked here; NUL-terminated (caller's guarantee).
            let (cert, key) = unsafe { (path(cert_pem), path(key_pem)) };
            // SAFETY: as above.
            let ca = if ca_pem.is_null() { None } else { Some(unsafe { path(ca_pem) }) };
            match crate::nbd::ServerTls::from_pem_files(cert, key, ca) {
                Ok(t) => {
                    o.inner.tls = Some(t);
                    0
                }
                Err(e) => fail("cowbackup_nbd_server_options_set_tls", &e),
            }
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = (o, ca_pem);
            set_last_error("cowbackup_nbd_server_options_set_tls: built without TLS (cargo feature tls)");
            -libc::ENOTSUP
        }
    })
}

/// Allow one client identity (TLS with a CA must be set by the time the server starts;
/// `cowbackup_nbd_server_start_with` fails with -EINVAL otherwise): a
/// certificate subject DN, most specific attribute first as GnuTLS and QEMU's `tls-authz`
/// print it (`"CN=alice,O=Example"`; the reverse order `"O=Example,CN=alice"` that
/// `openssl x509 -subject` prints matches too; attribute names case-insensitive, values
/// exact, `\` escapes `,` `+` `=`), or the SHA-256 fingerprint of the certificate's DER
/// (`"sha256:HEX"`, 64 hex digits, `:` separators allowed). Call once per identity; a
/// client whose verified certificate matches none is refused after the TLS handshake. No
/// call: every certificate the CA signed is accepted.
///
/// Errors: -EINVAL (NULL argument, malformed identity); -ENOTSUP (built without TLS).
///
/// # Safety
/// `o` is NULL or a live options object; `identity` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_nbd_server_options_allow(
    o: *mut cowbackup_nbd_server_options,
    identity: *const c_char,
) -> c_int {
    ffi_panic_boundary!("cowbackup_nbd_server_options_allow", {
        let o = try_mut!(o, "cowbackup_nbd_server_options_allow", "o");
        let _ = try_ref!(identity, "cowbackup_nbd_server_options_allow", "identity");
        // SAFETY: non-NULL (checked); NUL-terminated (caller's guarantee).
        let Some(identity) = (unsafe { utf8(identity, "cowbackup_nbd_server_options_allow", "identity") }) else {
            return -libc::EINVAL;
        };
        #[cfg(feature = "tls")]
        {
            if let Err(e) = crate::nbd::tls::check_identity(identity) {
                return fail("cowbackup_nbd_server_options_allow", &e);
            }
            o.allow.push(identity.to_owned());
            0
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = (o, identity);
            set_last_error("cowbackup_nbd_server_options_allow: built without TLS (cargo feature tls)");
            -libc::ENOTSUP
        }
    })
}

/// Allow (`true`) a TCP address that is not loopback without TLS. Default `false`: such a
/// server refuses to start (-EPERM), since anyone who reaches the port could read every
/// export and write the writable ones. Errors: -EINVAL (NULL `o`).
///
/// # Safety
/// `o` is NULL or a live options object.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_nbd_server_options_set_insecure(
    o: *mut cowbackup_nbd_server_options,
    insecure: bool,
) -> c_int {
    ffi_panic_boundary!("cowbackup_nbd_server_options_set_insecure", {
        let o = try_mut!(o, "cowbackup_nbd_server_options_set_insecure", "o");
        o.inner.insecure = insecure;
        0
    })
}

/// Set the most connections served at once (default 16; more are disconnected at once) and
/// the idle timeout in milliseconds (default 300000): a connection past the handshake that
/// does not send a whole request (header and payload) within it is closed, so idle or
/// trickling clients cannot hold the connection slots. (The handshake has its own 30 s
/// limit.) Errors: -EINVAL (NULL `o`, either value 0, more than 65536 connections).
///
/// # Safety
/// `o` is NULL or a live options object.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_nbd_server_options_set_limits(
    o: *mut cowbackup_nbd_server_options,
    max_connections: u32,
    idle_timeout_ms: u32,
) -> c_int {
    ffi_panic_boundary!("cowbackup_nbd_server_options_set_limits", {
        let o = try_mut!(o, "cowbackup_nbd_server_options_set_limits", "o");
        if max_connections == 0 || max_connections > 65536 || idle_timeout_ms == 0 {
            return invalid(format!(
                "cowbackup_nbd_server_options_set_limits: max_connections {max_connections} (1..=65536) and \
                 idle_timeout_ms {idle_timeout_ms} (> 0)"
            ));
        }
        o.inner.max_connections = max_connections as usize;
        o.inner.idle_timeout = std::time::Duration::from_millis(u64::from(idle_timeout_ms));
        0
    })
}

/// `cowbackup_nbd_server_start` with options `o` (copied; NULL: the defaults). With TLS set,
/// any TCP address is allowed; without, a non-loopback TCP address needs
/// `cowbackup_nbd_server_options_set_insecure(o, true)`.
///
/// Errors: as `cowbackup_nbd_server_start` (-EPERM: non-loopback TCP without TLS or
/// insecure); -EINVAL also for an allow-list without TLS with a CA.
///
/// # Safety
/// `address` is NULL or NUL-terminated; `o` is NULL or a live options object; `out` is NULL
/// or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_nbd_server_start_with(
    address: *const c_char,
    o: *const cowbackup_nbd_server_options,
    out: *mut *mut cowbackup_nbd_server,
) -> c_int {
    ffi_panic_boundary!("cowbackup_nbd_server_start_with", {
        check_out!(out, "cowbackup_nbd_server_start_with", "out");
        let _ = try_ref!(address, "cowbackup_nbd_server_start_with", "address");
        // SAFETY: non-NULL (checked); NUL-terminated (caller's guarantee).
        let Some(address) = (unsafe { utf8(address, "cowbackup_nbd_server_start_with", "address") }) else {
            return -libc::EINVAL;
        };
        // SAFETY: NULL or a live options object (caller's guarantee).
        let (opts, allow) = if o.is_null() {
            (ServerOptions::default(), Vec::new())
        } else {
            // SAFETY: as above.
            let o = unsafe { &*o };
            (o.inner.clone(), o.allow.clone())
        };
        #[allow(unused_mut)]
        let mut opts = opts;
        #[cfg(feature = "tls")]
        if !allow.is_empty() {
            let Some(t) = opts.tls.as_mut() else {
                return invalid("cowbackup_nbd_server_start_with: an allow-list needs TLS with a CA");
            };
            for id in &allow {
                if let Err(e) = t.allow(id) {
                    return fail("cowbackup_nbd_server_start_with", &e);
                }
            }
        }
        #[cfg(not(feature = "tls"))]
        let _ = allow;
        // SAFETY: `out` was checked non-NULL; the caller guarantees it is writable.
        unsafe { start(address, opts, out, "cowbackup_nbd_server_start_with") }
    })
}

/// The address the server listens on, as bound: `"unix:PATH"` or `"tcp:IP:PORT"` (with the
/// real port when 0 was asked), e.g. `"tcp:127.0.0.1:41234"`. The string belongs to the
/// server and lives until `cowbackup_nbd_server_stop`. NULL when `s` is NULL.
///
/// # Safety
/// `s` is NULL or a live server handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_nbd_server_address(s: *const cowbackup_nbd_server) -> *const c_char {
    ffi_panic_boundary!("cowbackup_nbd_server_address", {
        if s.is_null() {
            set_last_error("cowbackup_nbd_server_address: s is NULL");
            return std::ptr::null();
        }
        // SAFETY: not NULL; a live handle (caller's guarantee).
        unsafe { &*s }.address.as_ptr()
    })
}

/// Export the driver `d` under `name` (UTF-8, at most 4096 bytes; `""` is the default export,
/// also reached by clients that give no name when it is the only export). `flags`: 0
/// (read-only) or `COWBACKUP_NBD_WRITABLE`. The server takes its own reference to the driver:
/// the caller may free its handle at once. Typical: the snapshot view of a running job
/// (`cowbackup_job_snapshot`), for a pull-mode backup by `qemu-img convert` or `nbdcopy`.
///
/// Errors: -EINVAL (NULL argument, bad name, unknown flag bits); -EEXIST (`name` is already
/// exported). Nothing changes on error.
///
/// # Safety
/// `s` is NULL or a live server handle; `name` is NULL or NUL-terminated; `d` is NULL or a
/// live driver handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_nbd_server_add(
    s: *mut cowbackup_nbd_server,
    name: *const c_char,
    d: *mut cowbackup_driver,
    flags: u32,
) -> c_int {
    ffi_panic_boundary!("cowbackup_nbd_server_add", {
        let s = try_ref!(s, "cowbackup_nbd_server_add", "s");
        let _ = try_ref!(name, "cowbackup_nbd_server_add", "name");
        let d = try_ref!(d, "cowbackup_nbd_server_add", "d");
        if flags & !COWBACKUP_NBD_WRITABLE != 0 {
            return invalid(format!("cowbackup_nbd_server_add: unknown flags {flags:#x}"));
        }
        // SAFETY: non-NULL (checked); NUL-terminated (caller's guarantee).
        let Some(name) = (unsafe { utf8(name, "cowbackup_nbd_server_add", "name") }) else {
            return -libc::EINVAL;
        };
        result("cowbackup_nbd_server_add", s.server.add(name, d.inner.clone(), flags & COWBACKUP_NBD_WRITABLE != 0))
    })
}

/// Serve the dirty bitmap `bm` on export `export_name` as the metadata context
/// `qemu:dirty-bitmap:<bitmap_name>`, as QEMU does: block status extents with flag 1 are
/// dirty, 0 clean (`nbdinfo --map=qemu:dirty-bitmap:NAME`). The bitmap is read live (while a
/// job uses it: its frozen bits plus the marks since). The server takes its own reference.
///
/// Errors: -EINVAL (NULL argument, bad name, a bitmap whose size differs from the export's);
/// -ENOENT (no such export); -EEXIST (the export already has a bitmap of that name).
///
/// # Safety
/// `s` is NULL or a live server handle; the names are NULL or NUL-terminated; `bm` is NULL
/// or a live bitmap handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_nbd_server_add_bitmap(
    s: *mut cowbackup_nbd_server,
    export_name: *const c_char,
    bitmap_name: *const c_char,
    bm: *mut cowbackup_bitmap,
) -> c_int {
    ffi_panic_boundary!("cowbackup_nbd_server_add_bitmap", {
        let s = try_ref!(s, "cowbackup_nbd_server_add_bitmap", "s");
        let _ = try_ref!(export_name, "cowbackup_nbd_server_add_bitmap", "export_name");
        let _ = try_ref!(bitmap_name, "cowbackup_nbd_server_add_bitmap", "bitmap_name");
        let bm = try_ref!(bm, "cowbackup_nbd_server_add_bitmap", "bm");
        // SAFETY: non-NULL (checked); NUL-terminated (caller's guarantee).
        let Some(export) = (unsafe { utf8(export_name, "cowbackup_nbd_server_add_bitmap", "export_name") }) else {
            return -libc::EINVAL;
        };
        // SAFETY: as above.
        let Some(name) = (unsafe { utf8(bitmap_name, "cowbackup_nbd_server_add_bitmap", "bitmap_name") }) else {
            return -libc::EINVAL;
        };
        result("cowbackup_nbd_server_add_bitmap", s.server.add_bitmap(export, name, bm.inner.clone()))
    })
}

/// Stop exporting `name`: it is no longer listed or opened, and clients connected to it are
/// disconnected (a request in progress finishes first). The server's references to its driver
/// and bitmaps go when those connections have ended.
///
/// Errors: -EINVAL (NULL argument); -ENOENT (no such export).
///
/// # Safety
/// `s` is NULL or a live server handle; `name` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_nbd_server_remove(s: *mut cowbackup_nbd_server, name: *const c_char) -> c_int {
    ffi_panic_boundary!("cowbackup_nbd_server_remove", {
        let s = try_ref!(s, "cowbackup_nbd_server_remove", "s");
        let _ = try_ref!(name, "cowbackup_nbd_server_remove", "name");
        // SAFETY: non-NULL (checked); NUL-terminated (caller's guarantee).
        let Some(name) = (unsafe { utf8(name, "cowbackup_nbd_server_remove", "name") }) else {
            return -libc::EINVAL;
        };
        result("cowbackup_nbd_server_remove", s.server.remove(name))
    })
}

/// Stop the server and free it: close the listening socket (a Unix socket file it created is
/// removed), disconnect every client, join every server thread, drop its references to the
/// exported drivers and bitmaps. Blocks until a driver op in progress on a server thread has
/// returned. NULL: nothing. The handle must not be used afterwards, nor concurrently with
/// this call; do not call it from a driver op of an exported driver (it would wait for itself).
///
/// # Safety
/// `s` is NULL or a live server handle not used by any other call during this one nor
/// afterwards.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_nbd_server_stop(s: *mut cowbackup_nbd_server) {
    ffi_panic_boundary!("cowbackup_nbd_server_stop", {
        if !s.is_null() {
            // SAFETY: a handle made by Box::into_raw in cowbackup_nbd_server_start, freed once
            // (caller's guarantee). Dropping the server stops it.
            let handle = unsafe { Box::from_raw(s) };
            handle.server.stop();
            drop(handle);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::{cowbackup_driver_free, cowbackup_last_error, cowbackup_memory_new};

    fn last_error() -> String {
        // SAFETY: cowbackup_last_error returns a valid NUL-terminated thread-local string.
        unsafe { CStr::from_ptr(cowbackup_last_error()) }.to_string_lossy().into_owned()
    }

    #[test]
    #[cfg_attr(miri, ignore = "Unix sockets: not supported by Miri")]
    fn bad_input_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let addr = CString::new(format!("unix:{}", dir.path().join("s").display())).unwrap();
        let mut s: *mut cowbackup_nbd_server = std::ptr::null_mut();
        // SAFETY: valid arguments or NULLs, which the functions check.
        unsafe {
            assert_eq!(cowbackup_nbd_server_start(std::ptr::null(), &mut s), -libc::EINVAL);
            assert!(last_error().contains("address is NULL"), "{}", last_error());
            assert_eq!(cowbackup_nbd_server_start(addr.as_ptr(), std::ptr::null_mut()), -libc::EINVAL);
            let bad = CString::new("sctp:x").unwrap();
            assert_eq!(cowbackup_nbd_server_start(bad.as_ptr(), &mut s), -libc::EINVAL);
            assert!(s.is_null());
            assert_eq!(cowbackup_nbd_server_start(addr.as_ptr(), &mut s), 0);
            let got = CStr::from_ptr(cowbackup_nbd_server_address(s)).to_str().unwrap();
            assert_eq!(got, addr.to_str().unwrap());
            let mut d = std::ptr::null_mut();
            assert_eq!(cowbackup_memory_new(1 << 20, &mut d), 0);
            let name = CString::new("disk").unwrap();
            assert_eq!(cowbackup_nbd_server_add(s, name.as_ptr(), d, 2), -libc::EINVAL);
            assert_eq!(cowbackup_nbd_server_add(s, name.as_ptr(), std::ptr::null_mut(), 0), -libc::EINVAL);
            let not_utf8 = [0xffu8, 0xfe, 0];
            assert_eq!(cowbackup_nbd_server_add(s, not_utf8.as_ptr().cast(), d, 0), -libc::EINVAL);
            assert_eq!(cowbackup_nbd_server_add(s, name.as_ptr(), d, COWBACKUP_NBD_WRITABLE), 0);
            assert_eq!(cowbackup_nbd_server_add(s, name.as_ptr(), d, 0), -libc::EEXIST);
            cowbackup_driver_free(d);
            assert_eq!(cowbackup_nbd_server_remove(s, name.as_ptr()), 0);
            assert_eq!(cowbackup_nbd_server_remove(s, name.as_ptr()), -libc::ENOENT);
            assert!(cowbackup_nbd_server_address(std::ptr::null()).is_null());
            cowbackup_nbd_server_stop(s);
            cowbackup_nbd_server_stop(std::ptr::null_mut());
        }
        assert!(!dir.path().join("s").exists());
    }
}
