//! The Ceph RBD driver in C: `cowbackup_rbd_open`.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int};

use super::driver::cowbackup_driver;
use super::error::invalid;
use super::COWBACKUP_OPEN_WRITE;

/// Open an image of a Ceph RBD pool through librbd and use it as a block device: a backup
/// target in a Ceph cluster, or a source whose host writes go through the job's hook and then
/// into this driver.
///
/// `spec` names the image: `"rbd:POOL/IMAGE"` or `"rbd:POOL/NAMESPACE/IMAGE"`, optionally
/// followed by `"@SNAPSHOT"` (a snapshot, always read-only) and then by `":id=NAME"` (the cephx
/// user `client.NAME`; default `admin`), as in QEMU's `rbd:` file names (QEMU's `:conf=` is
/// the `conf` argument here, its other options are not accepted). `conf` is the path of the
/// cluster's conf file (monitors, keyring), or NULL for librados's search (`$CEPH_CONF`,
/// `/etc/ceph/ceph.conf`, `~/.ceph/config`, `./ceph.conf`). `flags`: 0 (read-only) or
/// `COWBACKUP_OPEN_WRITE`.
///
/// Each handle has its own cluster connection. Connecting and every request to a monitor or
/// OSD time out after 30 s (`client_mount_timeout`, `rados_mon_op_timeout`,
/// `rados_osd_op_timeout`), so a job against a cluster that went away fails or pauses (per
/// its error policy) instead of hanging; librbd's write-back cache is off (a write that
/// returned is on the OSDs). Block status comes from `rbd_diff_iterate2` (allocated extents;
/// the rest reads as zeroes), zeroing from `rbd_write_zeroes`, discard from `rbd_discard`,
/// flush from `rbd_flush`. The size is the image's when opened.
///
/// On success `*out` is a new handle (free with `cowbackup_driver_free`; the image, I/O context
/// and cluster connection close with the last reference, e.g. when a job using it ends).
/// Errors: -EINVAL (NULL spec, unknown flags, a spec that does not parse: the message says
/// why); -EROFS (`COWBACKUP_OPEN_WRITE` with a snapshot); -ENOTSUP (the library was built
/// without librbd: cargo feature `rbd`); otherwise librados's or librbd's errno: -ENOENT (no
/// conf file, pool or image), -EACCES/-EPERM (cephx refused the user), -ETIMEDOUT (no monitor
/// answered), ... The message names the image and the step that failed. I/O errors of the
/// driver keep librbd's errno too (-ETIMEDOUT, -EBLOCKLISTED, -EROFS...) and name the image
/// and operation. Thread-safe; the driver is thread-safe (librbd image handles are).
///
/// # Safety
/// `spec` is NULL or a NUL-terminated string; `conf` is NULL or a NUL-terminated string; `out`
/// is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_rbd_open(
    spec: *const c_char,
    conf: *const c_char,
    flags: u32,
    out: *mut *mut cowbackup_driver,
) -> c_int {
    ffi_panic_boundary!("cowbackup_rbd_open", {
        check_out!(out, "cowbackup_rbd_open", "out");
        if spec.is_null() {
            return invalid("cowbackup_rbd_open: spec is NULL");
        }
        if flags & !COWBACKUP_OPEN_WRITE != 0 {
            return invalid(format!("cowbackup_rbd_open: unknown flags {flags:#x} (only COWBACKUP_OPEN_WRITE)"));
        }
        // SAFETY: non-NULL, NUL-terminated (caller's guarantee).
        let spec = unsafe { CStr::from_ptr(spec) };
        let Ok(spec) = spec.to_str() else {
            return invalid("cowbackup_rbd_open: the spec is not UTF-8");
        };
        let conf = if conf.is_null() {
            None
        } else {
            // SAFETY: non-NULL, NUL-terminated (caller's guarantee).
            Some(unsafe { CStr::from_ptr(conf) })
        };
        // SAFETY: `out` was checked above and the caller guarantees it is writable.
        unsafe { open(spec, conf, flags & COWBACKUP_OPEN_WRITE != 0, out) }
    })
}

/// # Safety
/// `out` is non-NULL and valid for writes.
#[cfg(feature = "rbd")]
unsafe fn open(spec: &str, conf: Option<&CStr>, write: bool, out: *mut *mut cowbackup_driver) -> c_int {
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;
    use std::sync::Arc;

    use super::driver::new_handle;
    use super::error::fail_io;
    use crate::{RbdDriver, RbdSpec};

    if let Err(e) = RbdSpec::parse(spec) {
        return invalid(format!("cowbackup_rbd_open: {e}"));
    }
    let conf = conf.map(|c| Path::new(std::ffi::OsStr::from_bytes(c.to_bytes())));
    match RbdDriver::open(spec, conf, write) {
        // SAFETY: `out` is valid for writes (this function's contract).
        Ok(d) => unsafe { new_handle(Arc::new(d), out) },
        Err(e) => fail_io("cowbackup_rbd_open", &e),
    }
}

/// # Safety
/// Nothing to uphold: `out` is never written.
#[cfg(not(feature = "rbd"))]
unsafe fn open(spec: &str, conf: Option<&CStr>, write: bool, out: *mut *mut cowbackup_driver) -> c_int {
    let _ = (conf, write, out);
    super::error::fail_with(
        libc::ENOTSUP,
        format!(
            "cowbackup_rbd_open: {}: this libcowbackup was built without the RBD driver (cargo feature \
             \"rbd\", needs librbd-dev)",
            spec.escape_debug()
        ),
    )
}
