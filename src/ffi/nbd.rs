//! NBD: `cowbackup_nbd_server_*`, an NBD server exporting drivers (snapshot views) and
//! dirty bitmaps (`crate::nbd::Server`).

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int};

use super::bitmap::cowbackup_bitmap;
use super::driver::cowbackup_driver;
use super::error::{fail, invalid, result, set_last_error};
use crate::nbd::Server;

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
/// time, 32 MiB requests; a misbehaving client gets an NBD error or is disconnected.
///
/// On success `*out` is the server (stop and free it with `cowbackup_nbd_server_stop`).
/// Errors: -EINVAL (NULL argument, malformed address); -EADDRINUSE (a server listens there);
/// -EEXIST; other socket errors as -errno.
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
        match Server::start(address) {
            Ok(server) => {
                let address = CString::new(server.address()).unwrap_or_default();
                let handle = Box::into_raw(Box::new(cowbackup_nbd_server { server, address }));
                // SAFETY: checked non-NULL above; the caller guarantees it is writable.
                unsafe { out.write(handle) };
                0
            }
            Err(e) => fail("cowbackup_nbd_server_start", &e),
        }
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
