//! Manifests, verify and backup chains in C: `cowbackup_options_set_manifest`,
//! `cowbackup_options_set_disk_id`, `cowbackup_verify`, `cowbackup_chain_open`,
//! `cowbackup_chain_open_drivers`, `cowbackup_chain_consolidate`.

use std::ffi::{CStr, OsStr};
use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use super::driver::{cowbackup_driver, new_handle};
use super::error::{fail, fail_with, invalid};
use super::options::cowbackup_options;
use crate::repo::{verify_with, Chain};

/// Flag of `cowbackup_chain_open`: check every data cluster read against its digest
/// (a damaged cluster fails the read with -EBADMSG; the others still read).
pub const COWBACKUP_CHAIN_VERIFY: u32 = 1;

/// # Safety
/// `p` is non-NULL and a NUL-terminated string.
unsafe fn path_buf(p: *const c_char) -> PathBuf {
    // SAFETY: the caller's guarantee.
    PathBuf::from(OsStr::from_bytes(unsafe { CStr::from_ptr(p) }.to_bytes()))
}

/// Write a manifest of the backup to `path` when the job completes (and only then): the
/// copy set, a BLAKE3 digest of each copied cluster's point-in-time data (from the
/// buffers the job read), the disk id, the bitmap's uuid and generations, the parent's
/// root digest for an incremental, times and byte counts (layout: docs/manifest.md).
/// Written atomically (temporary file, fsync, rename that never replaces, fsync of the
/// directory), mode 0600. `cowbackup_backup_start` fails with -EEXIST when `path` exists,
/// and with -EINVAL under `COWBACKUP_SYNC_NONE`. A file target is named in the manifest
/// relative to the manifest's directory, an RBD image (`cowbackup_rbd_open`) by its spec
/// `rbd:POOL/IMAGE` (with `:id=NAME` when opened with one). NULL `path`: no manifest (the default).
/// Errors: -EINVAL (NULL `o`, empty path).
///
/// # Safety
/// `o` is NULL or a live options object; `path` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_manifest(o: *mut cowbackup_options, path: *const c_char) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_manifest", {
        let o = try_mut!(o, "cowbackup_options_set_manifest", "o");
        if path.is_null() {
            o.inner.manifest = None;
            return 0;
        }
        // SAFETY: not NULL; NUL-terminated (caller's guarantee).
        let p = unsafe { path_buf(path) };
        if p.as_os_str().is_empty() {
            return invalid("cowbackup_options_set_manifest: path is empty");
        }
        o.inner.manifest = Some(p);
        0
    })
}

/// Set the host's identity of the source disk (1 to 128 bytes of UTF-8; NULL: none, the
/// default). With a dirty bitmap, a bitmap without a disk id adopts it (durably for a
/// persistent bitmap), and `cowbackup_backup_start` fails with -EINVAL when the bitmap
/// belongs to another disk id. Recorded in the manifest; a chain links only backups of
/// one disk id. Errors: -EINVAL (NULL `o`, empty, too long or not UTF-8).
///
/// # Safety
/// `o` is NULL or a live options object; `disk_id` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_options_set_disk_id(o: *mut cowbackup_options, disk_id: *const c_char) -> c_int {
    ffi_panic_boundary!("cowbackup_options_set_disk_id", {
        let o = try_mut!(o, "cowbackup_options_set_disk_id", "o");
        if disk_id.is_null() {
            o.inner.disk_id = None;
            return 0;
        }
        // SAFETY: not NULL; NUL-terminated (caller's guarantee).
        let s = unsafe { CStr::from_ptr(disk_id) };
        match s.to_str() {
            Ok(s) if !s.is_empty() && s.len() <= 128 => {
                o.inner.disk_id = Some(s.to_string());
                0
            }
            _ => invalid("cowbackup_options_set_disk_id: disk_id must be 1 to 128 bytes of UTF-8"),
        }
    })
}

/// What `cowbackup_verify` checked. Pass `sizeof(cowbackup_verify_report)` as `out_size`:
/// a caller compiled against an older, shorter struct gets the fields it knows.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct cowbackup_verify_report {
    /// Clusters of the copy set checked (data and zero).
    pub clusters_checked: u64,
    /// Bytes of those clusters.
    pub bytes_checked: u64,
    /// Clusters that did not match the manifest.
    pub mismatched_clusters: u64,
}

/// Called by `cowbackup_verify` once per mismatching byte range (adjacent bad clusters
/// merged), on the calling thread; return 0 to go on, non-zero to stop the check.
pub type cowbackup_mismatch_fn = Option<unsafe extern "C" fn(opaque: *mut c_void, offset: u64, len: u64) -> c_int>;

/// Re-read the backup in `target` and check every cluster of the copy set of the
/// manifest at `manifest_path`: data clusters against their digests, zero clusters for
/// zeroes. Needs no source. `on_mismatch` (may be NULL) is called for each bad range;
/// `*out` (may be NULL; `out_size` bytes of it) gets the counts, also when clusters
/// mismatch. Returns 0 when everything matches, -EBADMSG when a cluster does not (or
/// when the manifest is damaged: then `*out` is not written), -EINVAL (NULL
/// arguments, a target of another size, `out_size` larger than the struct), the
/// manifest's or the target's -errno otherwise. Thread-safe.
///
/// # Safety
/// `manifest_path` is a NUL-terminated string; `target` a live driver handle; `out` NULL
/// or valid for `out_size` bytes; `on_mismatch` safe to call with `opaque`.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_verify(
    manifest_path: *const c_char,
    target: *mut cowbackup_driver,
    on_mismatch: cowbackup_mismatch_fn,
    opaque: *mut c_void,
    out: *mut cowbackup_verify_report,
    out_size: usize,
) -> c_int {
    ffi_panic_boundary!("cowbackup_verify", {
        if manifest_path.is_null() {
            return invalid("cowbackup_verify: manifest_path is NULL");
        }
        let t = try_ref!(target, "cowbackup_verify", "target");
        if out_size > std::mem::size_of::<cowbackup_verify_report>() {
            return invalid("cowbackup_verify: out_size is larger than cowbackup_verify_report");
        }
        // SAFETY: not NULL; NUL-terminated (caller's guarantee).
        let path = unsafe { path_buf(manifest_path) };
        let driver: Arc<dyn crate::BlockDriver> = t.inner.clone();
        let mut cb = |off: u64, len: u64| match on_mismatch {
            // SAFETY: the caller's guarantee on `on_mismatch` and `opaque`.
            Some(f) => (unsafe { f(opaque, off, len) }) == 0,
            None => true,
        };
        let r = match verify_with(&path, &*driver, &mut cb) {
            Ok(r) => r,
            Err(e) => return fail("cowbackup_verify", &e),
        };
        if !out.is_null() && out_size > 0 {
            let rep = cowbackup_verify_report {
                clusters_checked: r.clusters_checked,
                bytes_checked: r.bytes_checked,
                mismatched_clusters: r.mismatched_clusters,
            };
            // SAFETY: `out` is valid for `out_size` bytes (caller's guarantee), at most the struct's size.
            unsafe { std::ptr::copy_nonoverlapping(&rep as *const _ as *const u8, out as *mut u8, out_size) };
        }
        if r.mismatched_clusters > 0 {
            return fail_with(
                libc::EBADMSG,
                format!(
                    "cowbackup_verify: {} of {} clusters do not match manifest {}",
                    r.mismatched_clusters,
                    r.clusters_checked,
                    path.display()
                ),
            );
        }
        0
    })
}

/// Open the backup chain of the `n` manifests at `manifest_paths` (oldest first: the full
/// backup, then its incrementals) as a read-only driver of the newest point in time: each
/// cluster from the newest backup that holds it, zeroes where none does; block_status says
/// DATA or ZERO; writes fail with -EROFS. Each backup's target is found from its
/// manifest: a file (relative to the manifest's directory), or an RBD image (`rbd:` spec)
/// opened read-only with librados's default conf search (`$CEPH_CONF`, `/etc/ceph/ceph.conf`,
/// ...) and the spec's client id (default `admin`); -ENOTSUP for an RBD image when the
/// library was built without the RBD driver. A manifest naming no target, or targets
/// opened otherwise: `cowbackup_chain_open_drivers`. `flags`: 0 or `COWBACKUP_CHAIN_VERIFY`.
/// Restore = a backup job with this driver as the source; instant access = export it with
/// `cowbackup_nbd_server_add`. On success `*out` is a new handle (free with
/// `cowbackup_driver_free`).
///
/// Errors: -EINVAL naming the link for a broken chain (missing or reordered link, a
/// foreign disk, another size, an incremental first), NULL arguments, `n` = 0, unknown
/// flags; -EBADMSG for a damaged manifest; -ENOENT (or another -errno) for a missing
/// manifest or target. Thread-safe; the driver may be read from many threads.
///
/// # Safety
/// `manifest_paths` points to `n` NUL-terminated strings; `out` is valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_chain_open(
    manifest_paths: *const *const c_char,
    n: usize,
    flags: u32,
    out: *mut *mut cowbackup_driver,
) -> c_int {
    ffi_panic_boundary!("cowbackup_chain_open", {
        check_out!(out, "cowbackup_chain_open", "out");
        if manifest_paths.is_null() || n == 0 {
            return invalid("cowbackup_chain_open: manifest_paths is NULL or n is 0");
        }
        if flags & !COWBACKUP_CHAIN_VERIFY != 0 {
            return invalid(format!("cowbackup_chain_open: unknown flags {flags:#x}"));
        }
        let mut paths = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: `manifest_paths` has `n` elements (caller's guarantee).
            let p = unsafe { *manifest_paths.add(i) };
            if p.is_null() {
                return invalid(format!("cowbackup_chain_open: manifest_paths[{i}] is NULL"));
            }
            // SAFETY: not NULL; NUL-terminated (caller's guarantee).
            paths.push(unsafe { path_buf(p) });
        }
        match Chain::open(&paths, flags & COWBACKUP_CHAIN_VERIFY != 0) {
            // SAFETY: `out` checked non-NULL; valid for writes (caller's guarantee).
            Ok(c) => unsafe { new_handle(Arc::new(c), out) },
            Err(e) => fail("cowbackup_chain_open", &e),
        }
    })
}

/// Open the backup chain of the `n` manifests at `manifest_paths` (oldest first, as
/// `cowbackup_chain_open`) reading each backup from the driver the caller gives:
/// `targets[i]` holds the backup of `manifest_paths[i]` (one target per manifest, in the
/// same order). For backups whose targets a manifest cannot name as a file: RBD images
/// (`cowbackup_rbd_open`, read-only is enough), NBD exports, devices, or files moved away
/// from their manifests. The manifests' `target` fields are not looked at.
///
/// The same link checks as `cowbackup_chain_open`; each target must have its manifest's
/// size. Ownership as `cowbackup_backup_start`: the targets are borrowed for the call and
/// the chain takes its own references, so the caller may free its handles at once (a target
/// stays open until the chain's handle is freed). The chain only reads them. `flags`: 0 or
/// `COWBACKUP_CHAIN_VERIFY`. On success `*out` is a new read-only driver handle (free with
/// `cowbackup_driver_free`); on error `*out` is not written and nothing is kept.
///
/// Errors: -EINVAL for NULL `manifest_paths`, `targets` or `out`, a NULL element of either
/// array, `n` = 0, unknown flags, a target of another size than its manifest says, and a
/// broken chain (the message names the link); -EBADMSG for a damaged manifest; -ENOENT (or
/// another -errno) for a missing manifest. Thread-safe; the driver may be read from many
/// threads.
///
/// # Safety
/// `manifest_paths` points to `n` NUL-terminated strings (or NULLs); `targets` points to `n`
/// live driver handles (or NULLs); `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_chain_open_drivers(
    manifest_paths: *const *const c_char,
    targets: *const *mut cowbackup_driver,
    n: usize,
    flags: u32,
    out: *mut *mut cowbackup_driver,
) -> c_int {
    ffi_panic_boundary!("cowbackup_chain_open_drivers", {
        check_out!(out, "cowbackup_chain_open_drivers", "out");
        if manifest_paths.is_null() || targets.is_null() || n == 0 {
            return invalid("cowbackup_chain_open_drivers: manifest_paths or targets is NULL, or n is 0");
        }
        if flags & !COWBACKUP_CHAIN_VERIFY != 0 {
            return invalid(format!("cowbackup_chain_open_drivers: unknown flags {flags:#x}"));
        }
        let mut paths = Vec::with_capacity(n);
        let mut drivers: Vec<Arc<dyn crate::BlockDriver>> = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: both arrays have `n` elements (caller's guarantee).
            let (p, t) = unsafe { (*manifest_paths.add(i), *targets.add(i)) };
            if p.is_null() {
                return invalid(format!("cowbackup_chain_open_drivers: manifest_paths[{i}] is NULL"));
            }
            if t.is_null() {
                return invalid(format!("cowbackup_chain_open_drivers: targets[{i}] is NULL"));
            }
            // SAFETY: not NULL; NUL-terminated (caller's guarantee).
            paths.push(unsafe { path_buf(p) });
            // SAFETY: not NULL; a live driver handle for the call (caller's guarantee).
            drivers.push(unsafe { &*t }.inner.clone());
        }
        match Chain::open_drivers(&paths, drivers, flags & COWBACKUP_CHAIN_VERIFY != 0) {
            // SAFETY: `out` checked non-NULL; valid for writes (caller's guarantee).
            Ok(c) => unsafe { new_handle(Arc::new(c), out) },
            Err(e) => fail("cowbackup_chain_open_drivers", &e),
        }
    })
}

/// Merge the `n` backups of `manifest_paths` (a contiguous part of a chain, oldest first:
/// a full backup and incrementals after it, or consecutive incrementals) into one new
/// backup: the image `target_path` and its manifest `manifest_path`, neither of which may
/// exist (-EEXIST). Each cluster comes from the newest merged backup that holds it, read
/// with digest checks (a damaged cluster fails with -EBADMSG and nothing is published).
/// The new manifest records the last merged one's root as `replaces_root`, so a chain may
/// name the new backup in place of the merged ones. Crash-safe: image then manifest, each
/// written to a temporary file, fsynced and renamed without replacing; the old backups are
/// not changed and stay valid; a crash leaves no new manifest or a complete one.
/// Errors: as `cowbackup_chain_open` for the links, -EEXIST, -EINVAL (NULL arguments,
/// `n` = 0), I/O errors. Thread-safe.
///
/// # Safety
/// `manifest_paths` points to `n` NUL-terminated strings; `target_path` and
/// `manifest_path` are NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_chain_consolidate(
    manifest_paths: *const *const c_char,
    n: usize,
    target_path: *const c_char,
    manifest_path: *const c_char,
) -> c_int {
    ffi_panic_boundary!("cowbackup_chain_consolidate", {
        if manifest_paths.is_null() || n == 0 || target_path.is_null() || manifest_path.is_null() {
            return invalid("cowbackup_chain_consolidate: a path argument is NULL or n is 0");
        }
        let mut paths = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: `manifest_paths` has `n` elements (caller's guarantee).
            let p = unsafe { *manifest_paths.add(i) };
            if p.is_null() {
                return invalid(format!("cowbackup_chain_consolidate: manifest_paths[{i}] is NULL"));
            }
            // SAFETY: not NULL; NUL-terminated (caller's guarantee).
            paths.push(unsafe { path_buf(p) });
        }
        // SAFETY: not NULL; NUL-terminated (caller's guarantee).
        let (t, m) = unsafe { (path_buf(target_path), path_buf(manifest_path)) };
        match crate::repo::consolidate(&paths, &t, &m) {
            Ok(_) => 0,
            Err(e) => fail("cowbackup_chain_consolidate", &e),
        }
    })
}
