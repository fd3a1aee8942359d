//! Dirty bitmaps: `cowbackup_bitmap_*`, reference-counted handles on a `DirtyBitmap`.

use std::ffi::{CStr, OsStr};
use std::os::raw::{c_char, c_int};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use super::error::{fail, invalid, result};
use crate::{BitmapFlags, DirtyBitmap};

/// Bitmap state flag (`cowbackup_bitmap_info.flags`): the bitmap records marks (enabled).
pub const COWBACKUP_BITMAP_RECORDING: u32 = 1;
/// Bitmap state flag: a job uses the bitmap; clear, merge into it, enable and disable fail
/// with -EBUSY until the job ends.
pub const COWBACKUP_BITMAP_BUSY: u32 = 2;
/// Bitmap state flag: the bitmap is stored in a file and survives restarts and crashes.
pub const COWBACKUP_BITMAP_PERSISTENT: u32 = 4;
/// The usual granularity of a dirty bitmap: 64 KiB (granularities are powers of two from
/// 512 bytes to 2 GiB).
pub const COWBACKUP_BITMAP_DEFAULT_GRANULARITY: u64 = 65536;

/// A dirty bitmap (opaque): which granules of a device were written, for incremental backups.
///
/// Each handle owns one reference to the bitmap; a job holds references of its own, so a
/// handle may be freed while a job still uses the bitmap. A persistent bitmap's file stays
/// open and locked until the last reference is gone. Every function on a handle may be
/// called from any thread, concurrently (`cowbackup_bitmap_mark` from every writing thread),
/// except `cowbackup_bitmap_free`, which must be the last call on it.
pub struct cowbackup_bitmap {
    pub(crate) inner: Arc<DirtyBitmap>,
}

/// What `cowbackup_bitmap_query` reports (a consistent snapshot). A plain struct owned by the
/// caller.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct cowbackup_bitmap_info {
    /// Bytes of device covered.
    pub size: u64,
    /// Bytes per bit.
    pub granularity: u64,
    /// Dirty bytes (the last granule clipped to `size`).
    pub count: u64,
    /// Bumped each time bits are removed (a clear of a dirty bitmap, a job's sync); never by
    /// marks, merges, enable/disable or a job that merges its bitmap back.
    pub generation: u64,
    /// Random at creation; a persistent bitmap keeps it across reopens.
    pub uuid: [u8; 16],
    /// `COWBACKUP_BITMAP_RECORDING` | `_BUSY` | `_PERSISTENT`.
    pub flags: u32,
    /// Reserved; 0.
    pub reserved32: u32,
    /// Reserved for future fields; 0.
    pub reserved: [u64; 6],
}

/// Box a bitmap into a new handle and store it in `*out`.
///
/// # Safety
/// `out` is non-NULL and valid for writes.
unsafe fn new_handle(inner: Arc<DirtyBitmap>, out: *mut *mut cowbackup_bitmap) -> c_int {
    let handle = Box::into_raw(Box::new(cowbackup_bitmap { inner }));
    // SAFETY: the caller checked `out` and guarantees it is writable.
    unsafe { out.write(handle) };
    0
}

/// # Safety
/// `path` is non-NULL and a NUL-terminated string.
unsafe fn path_of<'a>(path: *const c_char) -> &'a Path {
    // SAFETY: the caller's guarantee.
    Path::new(OsStr::from_bytes(unsafe { CStr::from_ptr(path) }.to_bytes()))
}

/// Create a dirty bitmap in memory of a `size`-byte device (non-zero; the last granule may be
/// partial) with `granularity`-byte granules (a power of two from 512 to 2 GiB; usually
/// `COWBACKUP_BITMAP_DEFAULT_GRANULARITY`). It starts clean and recording, with a random uuid.
///
/// On success `*out` is a new handle (free with `cowbackup_bitmap_free`). Errors: -EINVAL
/// (NULL `out`, `size` 0, bad granularity); -ENOMEM (the bitmap cannot be allocated).
/// Thread-safe.
///
/// # Safety
/// `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_bitmap_new(size: u64, granularity: u64, out: *mut *mut cowbackup_bitmap) -> c_int {
    ffi_panic_boundary!("cowbackup_bitmap_new", {
        check_out!(out, "cowbackup_bitmap_new", "out");
        match DirtyBitmap::new(size, granularity) {
            // SAFETY: `out` was checked above.
            Ok(bm) => unsafe { new_handle(bm, out) },
            Err(e) => fail("cowbackup_bitmap_new", &e),
        }
    })
}

/// Create a persistent, crash-safe dirty bitmap in a new file at `path` (geometry as
/// `cowbackup_bitmap_new`) and open it. The file is built under a temporary name in the same
/// directory and renamed into place when complete, never over anything: an existing file, or
/// a symlink at `path` (even dangling), is never touched nor followed (-EEXIST). The file is
/// mode 0600 whatever the umask (`cowbackup_bitmap_create_mode` widens it) and locked while
/// the bitmap is open.
///
/// On success `*out` is a new handle (free with `cowbackup_bitmap_free`). Errors: -EINVAL
/// (NULL argument, `size` 0, bad granularity); -EEXIST (`path` exists); the errno of creating
/// or writing the file (-ENOENT for a missing directory, -EACCES, -ENOSPC...); -ENOMEM.
/// Thread-safe.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_bitmap_create(
    path: *const c_char,
    size: u64,
    granularity: u64,
    out: *mut *mut cowbackup_bitmap,
) -> c_int {
    ffi_panic_boundary!("cowbackup_bitmap_create", {
        check_out!(out, "cowbackup_bitmap_create", "out");
        if path.is_null() {
            return invalid("cowbackup_bitmap_create: path is NULL");
        }
        // SAFETY: non-NULL, NUL-terminated (caller's guarantee).
        let path = unsafe { path_of(path) };
        match DirtyBitmap::create(path, size, granularity) {
            // SAFETY: `out` was checked above.
            Ok(bm) => unsafe { new_handle(bm, out) },
            Err(e) => fail("cowbackup_bitmap_create", &e),
        }
    })
}

/// `cowbackup_bitmap_create` with the permission bits of the new file: `mode` (0 to 0777) is
/// applied exactly, whatever the umask (e.g. 0640 lets the file's group read it).
///
/// On success `*out` is a new handle (free with `cowbackup_bitmap_free`). Errors: as
/// `cowbackup_bitmap_create`; -EINVAL for a mode with bits outside 0777 (setuid, setgid,
/// sticky). Thread-safe.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_bitmap_create_mode(
    path: *const c_char,
    size: u64,
    granularity: u64,
    mode: u32,
    out: *mut *mut cowbackup_bitmap,
) -> c_int {
    ffi_panic_boundary!("cowbackup_bitmap_create_mode", {
        check_out!(out, "cowbackup_bitmap_create_mode", "out");
        if path.is_null() {
            return invalid("cowbackup_bitmap_create_mode: path is NULL");
        }
        // SAFETY: non-NULL, NUL-terminated (caller's guarantee).
        let path = unsafe { path_of(path) };
        match DirtyBitmap::create_with_mode(path, size, granularity, mode) {
            // SAFETY: `out` was checked above.
            Ok(bm) => unsafe { new_handle(bm, out) },
            Err(e) => fail("cowbackup_bitmap_create_mode", &e),
        }
    })
}

/// Open the persistent dirty bitmap in the file at `path`, as it was last made durable: after
/// a crash at any instant it holds every granule whose `cowbackup_bitmap_mark` returned 0.
/// The file is locked while open (one opener at a time, across processes).
///
/// On success `*out` is a new handle (free with `cowbackup_bitmap_free`). Errors: -EINVAL
/// (NULL argument, not a regular file); -ENOENT (no such file) or the errno of opening or
/// reading it; -EBUSY (the bitmap is open already, in this process or another); -EBADMSG (not
/// a bitmap file, truncated, or damaged: the message says where; a damaged file is never
/// opened with bits missing); -ENOMEM. Thread-safe.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_bitmap_open(path: *const c_char, out: *mut *mut cowbackup_bitmap) -> c_int {
    ffi_panic_boundary!("cowbackup_bitmap_open", {
        check_out!(out, "cowbackup_bitmap_open", "out");
        if path.is_null() {
            return invalid("cowbackup_bitmap_open: path is NULL");
        }
        // SAFETY: non-NULL, NUL-terminated (caller's guarantee).
        let path = unsafe { path_of(path) };
        match DirtyBitmap::open(path) {
            // SAFETY: `out` was checked above.
            Ok(bm) => unsafe { new_handle(bm, out) },
            Err(e) => fail("cowbackup_bitmap_open", &e),
        }
    })
}

/// Record that `[offset, offset + len)` of the device is about to be written: call it in the
/// host's write path before the write (and before `cowbackup_cow_before_write` of a running
/// job). Every granule the range touches becomes dirty. For a persistent bitmap, when it
/// returns 0 those granules are durable in the file; concurrent first marks share one flush,
/// and a mark of granules already dirty costs a few atomic loads (no lock, no system call).
/// `len == 0` does nothing. A disabled bitmap returns 0 and records nothing. While a job uses
/// the bitmap, marks go to its successor.
///
/// Errors: -EINVAL (NULL `bm`, range past the end of the device or overflowing; nothing is
/// recorded); for a persistent bitmap, the -errno of writing the file (-EIO, -ENOSPC; or
/// -EOVERFLOW when the file's switch counter is exhausted, which only a damaged or crafted
/// file reaches, after an enable or disable of it was refused the same way): the mark is not
/// durable, fail the guest write. Thread-safe: call it from every writing thread.
///
/// # Safety
/// `bm` is NULL or a live bitmap handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_bitmap_mark(bm: *mut cowbackup_bitmap, offset: u64, len: u64) -> c_int {
    ffi_panic_boundary!("cowbackup_bitmap_mark", {
        let bm = try_ref!(bm, "cowbackup_bitmap_mark", "bm");
        result("cowbackup_bitmap_mark", bm.inner.mark(offset, len))
    })
}

/// Remove every dirty granule; the generation is bumped when there was any. A persistent
/// bitmap switches atomically in the file (after a crash: all old bits or none).
///
/// Errors: -EINVAL (NULL `bm`); -EBUSY (a job uses the bitmap; nothing changes);
/// -EOVERFLOW (the file's switch counter is exhausted, which only a damaged or crafted file
/// reaches; nothing changes: recreate the bitmap); for a persistent bitmap, the -errno of
/// writing the file (the bitmap is then clear in memory and the file is rewritten by the
/// next write; until then it holds the old bits). Thread-safe.
///
/// # Safety
/// `bm` is NULL or a live bitmap handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_bitmap_clear(bm: *mut cowbackup_bitmap) -> c_int {
    ffi_panic_boundary!("cowbackup_bitmap_clear", {
        let bm = try_ref!(bm, "cowbackup_bitmap_clear", "bm");
        result("cowbackup_bitmap_clear", bm.inner.clear())
    })
}

/// Start recording marks (the default). A persistent bitmap keeps the setting in its file.
/// Errors: -EINVAL (NULL `bm`); -EBUSY (a job uses the bitmap); for a persistent bitmap the
/// -errno of writing the file. Thread-safe.
///
/// # Safety
/// `bm` is NULL or a live bitmap handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_bitmap_enable(bm: *mut cowbackup_bitmap) -> c_int {
    ffi_panic_boundary!("cowbackup_bitmap_enable", {
        let bm = try_ref!(bm, "cowbackup_bitmap_enable", "bm");
        result("cowbackup_bitmap_enable", bm.inner.enable())
    })
}

/// Stop recording: `cowbackup_bitmap_mark` then returns 0 and records nothing. Errors as
/// `cowbackup_bitmap_enable`. Thread-safe.
///
/// # Safety
/// `bm` is NULL or a live bitmap handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_bitmap_disable(bm: *mut cowbackup_bitmap) -> c_int {
    ffi_panic_boundary!("cowbackup_bitmap_disable", {
        let bm = try_ref!(bm, "cowbackup_bitmap_disable", "bm");
        result("cowbackup_bitmap_disable", bm.inner.disable())
    })
}

/// Add every dirty granule of `src` to `dst` (a union): a granule of `src` dirties every
/// granule of `dst` it overlaps, whatever the two granularities. `src` is not modified (it may
/// be busy: its frozen bits and new marks are merged; `src` may be `dst`). The generation of
/// `dst` does not change. Persistent `dst`: durable when this returns 0.
///
/// Errors (`dst` unchanged): -EINVAL (NULL argument, the bitmaps cover different device
/// sizes); -EBUSY (a job uses `dst`); -ENOMEM; for a persistent `dst` the -errno of writing
/// the file. Thread-safe.
///
/// # Safety
/// `dst` and `src` are NULL or live bitmap handles.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_bitmap_merge(dst: *mut cowbackup_bitmap, src: *const cowbackup_bitmap) -> c_int {
    ffi_panic_boundary!("cowbackup_bitmap_merge", {
        let dst = try_ref!(dst, "cowbackup_bitmap_merge", "dst");
        let src = try_ref!(src, "cowbackup_bitmap_merge", "src");
        result("cowbackup_bitmap_merge", dst.inner.merge(&src.inner))
    })
}

/// Find the next dirty extent at or after byte `from`: `*offset` (>= `from`) and `*len`, with
/// consecutive dirty granules merged into one extent and the extent clipped to the device
/// size. When nothing is dirty from `from` on (or `from` is past the end), `*offset` is the
/// device size and `*len` is 0. Iterate with `from = *offset + *len` until `*len == 0`. While
/// a job uses the bitmap: its frozen bits and the marks since.
///
/// Errors: -EINVAL (NULL argument). Thread-safe.
///
/// # Safety
/// `bm` is NULL or a live bitmap handle; `offset` and `len` are NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_bitmap_next_dirty(
    bm: *const cowbackup_bitmap,
    from: u64,
    offset: *mut u64,
    len: *mut u64,
) -> c_int {
    ffi_panic_boundary!("cowbackup_bitmap_next_dirty", {
        check_out!(offset, "cowbackup_bitmap_next_dirty", "offset");
        check_out!(len, "cowbackup_bitmap_next_dirty", "len");
        let bm = try_ref!(bm, "cowbackup_bitmap_next_dirty", "bm");
        let (o, l) = bm.inner.next_dirty(from).unwrap_or((bm.inner.size(), 0));
        // SAFETY: both checked non-NULL above; the caller guarantees they are writable.
        unsafe {
            offset.write(o);
            len.write(l);
        }
        0
    })
}

/// Store the bitmap's size, granularity, dirty bytes, generation, uuid and state flags in
/// `*info` (read together; `reserved` fields are 0). Errors: -EINVAL (NULL argument).
/// Thread-safe.
///
/// # Safety
/// `bm` is NULL or a live bitmap handle; `info` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_bitmap_query(
    bm: *const cowbackup_bitmap,
    info: *mut cowbackup_bitmap_info,
) -> c_int {
    ffi_panic_boundary!("cowbackup_bitmap_query", {
        check_out!(info, "cowbackup_bitmap_query", "info");
        let bm = try_ref!(bm, "cowbackup_bitmap_query", "bm");
        let i = bm.inner.info();
        let mut flags = 0;
        for (f, c) in [
            (BitmapFlags::RECORDING, COWBACKUP_BITMAP_RECORDING),
            (BitmapFlags::BUSY, COWBACKUP_BITMAP_BUSY),
            (BitmapFlags::PERSISTENT, COWBACKUP_BITMAP_PERSISTENT),
        ] {
            if i.flags.contains(f) {
                flags |= c;
            }
        }
        let out = cowbackup_bitmap_info {
            size: i.size,
            granularity: i.granularity,
            count: i.count,
            generation: i.generation,
            uuid: i.uuid,
            flags,
            reserved32: 0,
            reserved: [0; 6],
        };
        // SAFETY: checked non-NULL above; the caller guarantees it is writable.
        unsafe { info.write(out) };
        0
    })
}

/// Drop the caller's reference to the bitmap and free the handle. Jobs using the bitmap keep
/// their own references; a persistent bitmap's file is closed (and unlocked) when the last is
/// gone. Every mark that returned 0 is already durable: nothing is lost by freeing. NULL:
/// nothing. The handle must not be used afterwards, nor freed concurrently with another call
/// on it.
///
/// # Safety
/// `bm` is NULL or a live handle not used by any other call during this one nor afterwards.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_bitmap_free(bm: *mut cowbackup_bitmap) {
    ffi_panic_boundary!("cowbackup_bitmap_free", {
        if !bm.is_null() {
            // SAFETY: a handle made by Box::into_raw in new_handle, freed once (caller's guarantee).
            drop(unsafe { Box::from_raw(bm) });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_ffi_flags_match_the_rust_flags() {
        assert_eq!(COWBACKUP_BITMAP_RECORDING, BitmapFlags::RECORDING.bits());
        assert_eq!(COWBACKUP_BITMAP_BUSY, BitmapFlags::BUSY.bits());
        assert_eq!(COWBACKUP_BITMAP_PERSISTENT, BitmapFlags::PERSISTENT.bits());
        assert_eq!(COWBACKUP_BITMAP_DEFAULT_GRANULARITY, crate::DEFAULT_GRANULARITY);
        assert_eq!(std::mem::size_of::<cowbackup_bitmap_info>(), 4 * 8 + 16 + 8 + 6 * 8);
    }
}
