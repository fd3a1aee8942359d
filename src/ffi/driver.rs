//! Drivers: reference-counted handles on an `Arc<dyn BlockDriver>`, the built-in file and
//! memory drivers, and drivers implemented in C through `cowbackup_driver_ops`.

use std::ffi::{CStr, OsStr};
use std::io;
use std::mem::size_of;
use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::error::{fail_io, fail_with, invalid};
use super::{
    COWBACKUP_CREATE_OVERWRITE, COWBACKUP_DRIVER_SERIALIZE, COWBACKUP_FILE_MODE_DEFAULT, COWBACKUP_OPEN_DIRECT,
    COWBACKUP_OPEN_WRITE,
};
use crate::error::{Error, ErrorKind};
use crate::{BlockDriver, BlockStatus, FileDriver, MemDriver, OpenFlags, StatusFlags};

/// A block device handle (opaque).
///
/// Each handle owns one reference to the device; a job holds references of its own, so a
/// handle may be freed with `cowbackup_driver_free` while a job still uses the device. The
/// device itself (and, for a C driver, its `release` op) goes away with the last reference.
/// A handle may be used from several threads at once; only its free must not race with
/// other calls on it.
pub struct cowbackup_driver {
    pub(crate) inner: Arc<dyn BlockDriver>,
}

/// The operations of a block device implemented in C (`cowbackup_driver_new`).
///
/// Pass `sizeof(cowbackup_driver_ops)` as `ops_size` (libfuse style): a caller compiled
/// against an older, shorter table keeps working, the ops it does not know being NULL.
///
/// Every op receives the `opaque` pointer given to `cowbackup_driver_new` first, returns 0
/// on success or a negative errno (which becomes the job's or the call's error; any other
/// value is turned into -EIO), and is only called for ranges inside the device. Buffers
/// passed to ops are valid only during the call.
///
/// Threads: ops run on a job's workers `cowbackup-<id>-<n>` (the background copy), its job
/// thread `cowbackup-<id>` (the target's `flush` at the end; zeroing first under
/// `COWBACKUP_SYNC_TOP`), its hook helpers `cowbackup-<id>-h` (with a cbw timeout), and on the
/// host threads calling `cowbackup_cow_before_write` (the hook's copy),
/// `cowbackup_backup_start` (`block_status` at start) or `cowbackup_driver_read`/`_write`,
/// possibly concurrently: they must be thread-safe, or the driver must be created with
/// `COWBACKUP_DRIVER_SERIALIZE` (then they run one at a time, under the driver's own lock).
/// No other library lock is held while an op runs.
///
/// Re-entrancy (capi/README.md, "Callbacks and re-entrancy"): an op running for a job (on
/// one of its threads or inside its `cowbackup_cow_before_write`) may call that job's
/// `cowbackup_job_query`, `_pause`, `_resume`, `_cancel`, `_set_speed`; there
/// `cowbackup_cow_before_write` of clusters not yet copied and `cowbackup_job_wait` return
/// -EDEADLK, and `cowbackup_job_free` is refused (the job is cancelled, not freed: free it
/// from outside). An op of a `COWBACKUP_DRIVER_SERIALIZE` driver that calls its own driver
/// again on the same thread (`cowbackup_driver_read`/`_write` on its handle, also through
/// another driver's op, or the hook of a job reading it) gets -EDEADLK instead of waiting for
/// itself; an op of a driver without the flag may call its own driver: it is just a call. An
/// op must not free its own driver handle, and must not longjmp out.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct cowbackup_driver_ops {
    /// Required. Fill `buf` with the `len` bytes at `offset`.
    pub read: Option<unsafe extern "C" fn(opaque: *mut c_void, offset: u64, buf: *mut c_void, len: usize) -> c_int>,
    /// Required. Write the `len` bytes of `buf` at `offset`.
    pub write: Option<unsafe extern "C" fn(opaque: *mut c_void, offset: u64, buf: *const c_void, len: usize) -> c_int>,
    /// Optional (may be NULL). Make `[offset, offset + len)` read as zeroes. NULL: the library
    /// writes buffers of zeroes with `write`, at most 1 MiB at a time.
    pub write_zeroes: Option<unsafe extern "C" fn(opaque: *mut c_void, offset: u64, len: u64) -> c_int>,
    /// Optional (may be NULL). Make written data durable; called when a job ends. NULL: nothing.
    pub flush: Option<unsafe extern "C" fn(opaque: *mut c_void) -> c_int>,
    /// Optional (may be NULL). Tell the status of the range starting at `offset`: write into
    /// `*pnum` how many bytes from `offset` (1 to `len`) share one status, and into `*status`
    /// `COWBACKUP_STATUS_DATA` and/or `COWBACKUP_STATUS_ZERO` (or 0). An answer of `*pnum == 0`
    /// or with other status bits is an I/O error (-EIO); `*pnum > len` is clamped to `len`.
    /// NULL: everything is DATA.
    pub block_status: Option<
        unsafe extern "C" fn(opaque: *mut c_void, offset: u64, len: u64, pnum: *mut u64, status: *mut u32) -> c_int,
    >,
    /// Optional (may be NULL). Called exactly once, after the last reference to the driver is
    /// gone (the last of `cowbackup_driver_free` and `cowbackup_job_free` of the jobs using
    /// it), on the thread that dropped it, before that call returns; no other op runs or will
    /// run then. Free `opaque` here.
    pub release: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
    /// Optional (may be NULL; a caller passing an older, smaller `ops_size` that ends before it
    /// gets NULL). The range `[offset, offset + len)` is no longer needed: release its space if
    /// the device can (punch a hole, unmap, free memory); what it reads afterwards is up to
    /// the driver (zeroes are best). Advisory: returning 0 without doing anything is correct.
    /// Called by `cowbackup_driver_discard` and by the library, e.g. when a snapshot view
    /// whose scratch target is this driver is discarded (fleecing). NULL: discard is a no-op
    /// returning 0.
    pub discard: Option<unsafe extern "C" fn(opaque: *mut c_void, offset: u64, len: u64) -> c_int>,
}

/// `opaque`, which the library only passes back to the ops.
struct Opaque(*mut c_void);

// SAFETY: the library never dereferences the pointer; it only passes it to the driver's ops,
// which the caller of cowbackup_driver_new promises are callable from any thread.
unsafe impl Send for Opaque {}
// SAFETY: as above; concurrent calls are either allowed by the caller (thread-safe ops) or
// serialized by the driver's mutex (COWBACKUP_DRIVER_SERIALIZE).
unsafe impl Sync for Opaque {}

/// A block device implemented by C callbacks.
struct CDriver {
    ops: cowbackup_driver_ops,
    opaque: Opaque,
    size: u64,
    /// Held during every op when the driver was created with `COWBACKUP_DRIVER_SERIALIZE`.
    serialize: Option<Serialize>,
}

/// The lock of a `COWBACKUP_DRIVER_SERIALIZE` driver, which knows the thread holding it.
///
/// An op that calls its own driver again on the same thread (`cowbackup_driver_read` on its
/// own handle, or the hook of a job whose source this driver is) would wait for itself
/// forever on a plain mutex; here the nested call fails with EDEADLK instead.
struct Serialize {
    /// Held during every op of the driver.
    lock: Mutex<()>,
    /// The [`thread_token`] of the thread holding `lock`, 0 when it is free. Written only by
    /// the holder: set right after locking, cleared right before unlocking. Relaxed is
    /// enough: the only thread that ever stores a thread's token is that thread, so a
    /// thread reads its own token here exactly when it holds the lock (its own last store;
    /// nobody else stores until it unlocks), and never otherwise (its last store was 0).
    owner: AtomicU64,
}

/// A number for the calling thread, unique in the process and never 0 (0 only while the
/// thread is being torn down and its thread-locals are gone: then nothing is detected).
fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TOKEN: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TOKEN.try_with(|t| *t).unwrap_or(0)
}

/// The serialize lock, held by this thread: clears the owner, then unlocks.
struct Held<'a> {
    owner: &'a AtomicU64,
    _guard: MutexGuard<'a, ()>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Before `_guard` unlocks (fields drop after this body).
        self.owner.store(0, Ordering::Relaxed);
    }
}

impl Serialize {
    fn new() -> Serialize {
        Serialize { lock: Mutex::new(()), owner: AtomicU64::new(0) }
    }

    /// Take the lock for one call of `op`; EDEADLK when this thread holds it already (an op
    /// of this driver calling the driver again).
    fn lock(&self, op: &str) -> io::Result<Held<'_>> {
        let me = thread_token();
        if me != 0 && self.owner.load(Ordering::Relaxed) == me {
            return Err(Error::new(
                ErrorKind::Deadlock,
                libc::EDEADLK,
                format!(
                    "C driver {op} op called from inside an op of the same COWBACKUP_DRIVER_SERIALIZE driver \
                     on this thread (EDEADLK): the driver's ops run one at a time, so this call would wait \
                     for itself forever (deadlock); an op must not call its own driver again, directly \
                     (cowbackup_driver_read/write on its handle) or through the hook of a job reading it"
                ),
            )
            .into());
        }
        let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.owner.store(me, Ordering::Relaxed);
        Ok(Held { owner: &self.owner, _guard: guard })
    }
}

/// Largest errno accepted from an op; more negative values are garbage (-EIO).
const MAX_ERRNO: c_int = 4095;

fn op_result(op: &str, ret: c_int) -> io::Result<()> {
    match ret {
        0 => Ok(()),
        r if (-MAX_ERRNO..0).contains(&r) => Err(io::Error::from_raw_os_error(-r)),
        r => Err(io::Error::other(format!("C driver {op} op returned {r}, not 0 or a negative errno"))),
    }
}

impl CDriver {
    /// Run one call of the op named `op`, under the driver's lock when it serializes.
    /// EDEADLK, without calling anything, when this thread is inside an op of this
    /// serializing driver already.
    fn call<R>(&self, op: &str, f: impl FnOnce(*mut c_void) -> R) -> io::Result<R> {
        let _held = self.serialize.as_ref().map(|s| s.lock(op)).transpose()?;
        Ok(f(self.opaque.0))
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {offset}+{len} is past the end of the device ({} bytes)", self.size),
            )),
        }
    }
}

impl BlockDriver for CDriver {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let read = self.ops.read.expect("checked by cowbackup_driver_new");
        // SAFETY: `read` is the caller's op (non-NULL, checked at creation); `buf` is valid for
        // `buf.len()` writable bytes during the call, and the range is inside the device.
        let ret = self.call("read", |opaque| unsafe { read(opaque, offset, buf.as_mut_ptr().cast(), buf.len()) })?;
        op_result("read", ret)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let write = self.ops.write.expect("checked by cowbackup_driver_new");
        // SAFETY: `write` is the caller's op (non-NULL, checked at creation); `buf` is valid for
        // `buf.len()` bytes during the call, and the range is inside the device.
        let ret = self.call("write", |opaque| unsafe { write(opaque, offset, buf.as_ptr().cast(), buf.len()) })?;
        op_result("write", ret)
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if let Some(write_zeroes) = self.ops.write_zeroes {
            // SAFETY: the caller's op, called with a range inside the device.
            let ret = self.call("write_zeroes", |opaque| unsafe { write_zeroes(opaque, offset, len) })?;
            return op_result("write_zeroes", ret);
        }
        crate::driver::write_zero_buffers(self, offset, len)
    }

    fn flush(&self) -> io::Result<()> {
        match self.ops.flush {
            // SAFETY: the caller's op; it only receives its own opaque pointer.
            Some(flush) => op_result("flush", self.call("flush", |opaque| unsafe { flush(opaque) })?),
            None => Ok(()),
        }
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.check(offset, len)?;
        let Some(block_status) = self.ops.block_status else {
            return Ok(BlockStatus { len, flags: StatusFlags::DATA });
        };
        let mut pnum = 0u64;
        let mut status = 0u32;
        // SAFETY: the caller's op, called with a range inside the device; `pnum` and `status`
        // point to live locals for the duration of the call.
        let ret =
            self.call("block_status", |opaque| unsafe { block_status(opaque, offset, len, &mut pnum, &mut status) })?;
        op_result("block_status", ret)?;
        if pnum == 0 && len > 0 {
            return Err(io::Error::other(format!(
                "C driver block_status op answered 0 bytes for offset {offset} (length {len})"
            )));
        }
        let flags = StatusFlags::from_bits(status).ok_or_else(|| {
            io::Error::other(format!(
                "C driver block_status op answered unknown status bits {status:#x} at offset {offset}"
            ))
        })?;
        Ok(BlockStatus { len: pnum.min(len), flags })
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        let Some(discard) = self.ops.discard else { return Ok(()) };
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the caller's op, called with a non-empty range inside the device.
        let ret = self.call("discard", |opaque| unsafe { discard(opaque, offset, len) })?;
        op_result("discard", ret)
    }
}

impl Drop for CDriver {
    fn drop(&mut self) {
        if let Some(release) = self.ops.release {
            // SAFETY: the caller's op, called exactly once: this is the last reference, so no
            // other op runs or will run.
            unsafe { release(self.opaque.0) }
        }
    }
}

/// Box a driver into a new handle and store it in `*out`.
///
/// # Safety
/// `out` is non-NULL and valid for writes.
pub(crate) unsafe fn new_handle(inner: Arc<dyn BlockDriver>, out: *mut *mut cowbackup_driver) -> c_int {
    let handle = Box::into_raw(Box::new(cowbackup_driver { inner }));
    // SAFETY: the caller checked `out` and guarantees it is valid for writes.
    unsafe { out.write(handle) };
    0
}

/// Biggest `ops_size` accepted (a larger value is a bug of the caller, not a newer table).
const MAX_OPS_SIZE: usize = 4096;
const PTR: usize = size_of::<usize>();

/// Create a block device whose I/O is done by the C functions of `ops`.
///
/// `ops` is copied: the table need not outlive the call. `ops_size` is `sizeof(*ops)` as the
/// caller knows it; ops not wholly inside it are treated as NULL, and a larger table from a
/// newer caller is accepted when the ops this library does not know are all NULL (-ENOTSUP
/// otherwise). `read` and `write` are required. `opaque` is passed to every op and never
/// dereferenced by the library. `size` is the device size in bytes (non-zero; it must not
/// change). `flags`: 0 or `COWBACKUP_DRIVER_SERIALIZE`.
///
/// On success `*out` is a new handle (free it with `cowbackup_driver_free`) and the library
/// owns `opaque` until it calls `release` (exactly once, after the last reference is gone).
/// On failure nothing is created, `release` is not called and the caller keeps `opaque`.
///
/// Errors: -EINVAL (NULL `ops` or `out`, `ops_size` too small for `read` and `write` or
/// larger than 4096, NULL `read` or `write`, `size` 0, unknown flags); -ENOTSUP (a newer
/// table with non-NULL ops this library does not know).
///
/// # Safety
/// `ops` points to at least `ops_size` readable bytes laid out as `cowbackup_driver_ops`
/// (valid function pointers or NULL); `out` is valid for writes; the ops are safe to call
/// from any thread (concurrently, unless `COWBACKUP_DRIVER_SERIALIZE`) until `release`.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_driver_new(
    ops: *const cowbackup_driver_ops,
    ops_size: usize,
    opaque: *mut c_void,
    size: u64,
    flags: u32,
    out: *mut *mut cowbackup_driver,
) -> c_int {
    ffi_panic_boundary!("cowbackup_driver_new", {
        check_out!(out, "cowbackup_driver_new", "out");
        if ops.is_null() {
            return invalid("cowbackup_driver_new: ops is NULL");
        }
        const FULL: usize = size_of::<cowbackup_driver_ops>();
        if !(2 * PTR..=MAX_OPS_SIZE).contains(&ops_size) {
            return invalid(format!(
                "cowbackup_driver_new: ops_size {ops_size} is invalid: it must be from {} (read and write) to {MAX_OPS_SIZE}; pass sizeof(cowbackup_driver_ops) ({FULL})",
                2 * PTR
            ));
        }
        if size == 0 {
            return invalid("cowbackup_driver_new: size is 0");
        }
        if flags & !COWBACKUP_DRIVER_SERIALIZE != 0 {
            return invalid(format!(
                "cowbackup_driver_new: unknown flags {flags:#x} (only COWBACKUP_DRIVER_SERIALIZE)"
            ));
        }
        if ops_size > FULL {
            // SAFETY: the caller guarantees `ops_size` readable bytes at `ops`.
            let tail = unsafe { std::slice::from_raw_parts(ops.cast::<u8>().add(FULL), ops_size - FULL) };
            if tail.iter().any(|&b| b != 0) {
                return fail_with(
                    libc::ENOTSUP,
                    format!("cowbackup_driver_new: the ops table has {ops_size} bytes and ops this library ({} bytes, version {}) does not know", FULL, env!("CARGO_PKG_VERSION")),
                );
            }
        }
        // Whole pointers only: an op cut by ops_size counts as absent.
        let known = ops_size.min(FULL) / PTR * PTR;
        let mut table = cowbackup_driver_ops {
            read: None,
            write: None,
            write_zeroes: None,
            flush: None,
            block_status: None,
            release: None,
            discard: None,
        };
        // SAFETY: `known` <= both `ops_size` (readable, caller's guarantee) and the size of
        // `table`; the table is all nullable function pointers, and the caller's bytes are
        // valid function pointers or NULL.
        unsafe {
            std::ptr::copy_nonoverlapping(
                ops.cast::<u8>(),
                (&mut table as *mut cowbackup_driver_ops).cast::<u8>(),
                known,
            )
        };
        if table.read.is_none() || table.write.is_none() {
            return invalid("cowbackup_driver_new: the read and write ops are required");
        }
        let serialize = (flags & COWBACKUP_DRIVER_SERIALIZE != 0).then(Serialize::new);
        let driver = CDriver { ops: table, opaque: Opaque(opaque), size, serialize };
        // SAFETY: `out` was checked above and the caller guarantees it is writable.
        unsafe { new_handle(Arc::new(driver), out) }
    })
}

/// The `OpenFlags` of a `flags` argument: `allowed` bits only (named in the message).
fn open_flags(function: &str, flags: u32, allowed: u32, names: &str) -> Result<OpenFlags, c_int> {
    if flags & !allowed != 0 {
        return Err(invalid(format!("{function}: unknown flags {flags:#x} (only {names})")));
    }
    Ok(OpenFlags::from_bits_truncate(flags))
}

/// # Safety
/// `path` is non-NULL and a NUL-terminated string.
unsafe fn path_of<'a>(path: *const c_char) -> &'a OsStr {
    // SAFETY: the caller's guarantee.
    OsStr::from_bytes(unsafe { CStr::from_ptr(path) }.to_bytes())
}

/// Open an existing raw image file or block device. The device size is the file's length (a
/// block device's size). `flags`: `COWBACKUP_OPEN_WRITE` to open read-write (default
/// read-only), `COWBACKUP_OPEN_DIRECT` to use `O_DIRECT` for aligned requests.
///
/// Only regular files and block devices are opened: a FIFO, socket, directory or character
/// device is refused with -EINVAL at once (the file type is checked without blocking, so a
/// FIFO with no writer does not hang the call).
///
/// On success `*out` is a new handle (free with `cowbackup_driver_free`). Errors: -EINVAL (NULL
/// argument, unknown flags or `COWBACKUP_CREATE_OVERWRITE`, not a regular file or block
/// device); the open's errno (-ENOENT, -EACCES, ...). The message names the path.
/// Thread-safe; the driver itself is thread-safe.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_file_open(
    path: *const c_char,
    flags: u32,
    out: *mut *mut cowbackup_driver,
) -> c_int {
    ffi_panic_boundary!("cowbackup_file_open", {
        check_out!(out, "cowbackup_file_open", "out");
        if path.is_null() {
            return invalid("cowbackup_file_open: path is NULL");
        }
        let flags = match open_flags(
            "cowbackup_file_open",
            flags,
            COWBACKUP_OPEN_WRITE | COWBACKUP_OPEN_DIRECT,
            "COWBACKUP_OPEN_WRITE and COWBACKUP_OPEN_DIRECT",
        ) {
            Ok(f) => f,
            Err(e) => return e,
        };
        // SAFETY: non-NULL, NUL-terminated (caller's guarantee).
        let path = unsafe { path_of(path) };
        match FileDriver::open(path, flags) {
            // SAFETY: `out` was checked above.
            Ok(d) => unsafe { new_handle(Arc::new(d), out) },
            Err(e) => fail_io("cowbackup_file_open", &e),
        }
    })
}

/// Create a new sparse raw image file of `size` bytes (non-zero) and open it read-write. The
/// new file reads as zeroes, so a backup into it skips zero clusters.
///
/// An existing `path` is **not** replaced: the call fails with -EEXIST and the file is left
/// as it was (a target pointed at the source's path by mistake must not wipe the source).
/// The file is mode 0600 whatever the umask (`cowbackup_file_create_mode` widens it), made
/// under a random temporary name in the same directory with `O_CREAT | O_EXCL | O_NOFOLLOW`,
/// sized, synced and renamed into place without replacing anything: there is no window
/// between a check and the create, and a symlink (even dangling) or a file planted at `path`
/// by someone else is never followed nor adopted (-EEXIST).
///
/// Pass `COWBACKUP_CREATE_OVERWRITE` to replace an existing regular file on purpose: a new
/// file is renamed over it (the directory must be writable; the old file is never written
/// through or truncated). With it, a symlink at `path` is refused with -ELOOP (neither the
/// link nor what it points to is touched: pass the resolved path to write there), and a
/// block device at `path` is opened read-write, never replaced: it must hold at least `size`
/// bytes and the driver's size is the device's. `flags`: 0 or a combination of
/// `COWBACKUP_OPEN_WRITE` (implied), `COWBACKUP_OPEN_DIRECT`, `COWBACKUP_CREATE_OVERWRITE`.
///
/// On success `*out` is a new handle (free with `cowbackup_driver_free`). Errors: -EEXIST (the
/// path exists and `COWBACKUP_CREATE_OVERWRITE` was not given); -ELOOP (overwrite of a
/// symlink); -EINVAL (NULL argument, `size` 0, unknown flags, a path that does not end in a
/// file name, overwrite of something that is not a regular file or block device, a block
/// device smaller than `size`); the errno of creating, sizing or renaming the file (-EACCES,
/// -EFBIG, ...; the temporary file is removed again and `path` is untouched). The message
/// names the path. Thread-safe.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_file_create(
    path: *const c_char,
    size: u64,
    flags: u32,
    out: *mut *mut cowbackup_driver,
) -> c_int {
    ffi_panic_boundary!("cowbackup_file_create", {
        check_out!(out, "cowbackup_file_create", "out");
        if path.is_null() {
            return invalid("cowbackup_file_create: path is NULL");
        }
        // SAFETY: non-NULL, NUL-terminated (caller's guarantee); `out` was checked above.
        unsafe { file_create("cowbackup_file_create", path_of(path), size, flags, COWBACKUP_FILE_MODE_DEFAULT, out) }
    })
}

/// `cowbackup_file_create` with the permission bits of the new file: `mode` (0 to 0777) is
/// applied exactly with `fchmod`, whatever the umask (the file is created 0600 and widened only
/// once it is the caller's, before it is renamed into place); e.g. 0640 lets the file's group
/// read the backup. Not applied to a block device opened with `COWBACKUP_CREATE_OVERWRITE`.
///
/// Errors: as `cowbackup_file_create`; -EINVAL for a mode with bits outside 0777 (setuid,
/// setgid, sticky). Thread-safe.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_file_create_mode(
    path: *const c_char,
    size: u64,
    flags: u32,
    mode: u32,
    out: *mut *mut cowbackup_driver,
) -> c_int {
    ffi_panic_boundary!("cowbackup_file_create_mode", {
        check_out!(out, "cowbackup_file_create_mode", "out");
        if path.is_null() {
            return invalid("cowbackup_file_create_mode: path is NULL");
        }
        // SAFETY: non-NULL, NUL-terminated (caller's guarantee); `out` was checked above.
        unsafe { file_create("cowbackup_file_create_mode", path_of(path), size, flags, mode, out) }
    })
}

/// The body of `cowbackup_file_create` and `cowbackup_file_create_mode`, inside their panic
/// boundary, after the NULL checks.
///
/// # Safety
/// `out` is valid for writes.
unsafe fn file_create(
    function: &str,
    path: &OsStr,
    size: u64,
    flags: u32,
    mode: u32,
    out: *mut *mut cowbackup_driver,
) -> c_int {
    let flags = match open_flags(
        function,
        flags,
        COWBACKUP_OPEN_WRITE | COWBACKUP_OPEN_DIRECT | COWBACKUP_CREATE_OVERWRITE,
        "COWBACKUP_OPEN_WRITE, COWBACKUP_OPEN_DIRECT and COWBACKUP_CREATE_OVERWRITE",
    ) {
        Ok(f) => f | OpenFlags::WRITE,
        Err(e) => return e,
    };
    if size == 0 {
        return invalid(format!("{function}: size is 0"));
    }
    if mode & !0o777 != 0 {
        return invalid(format!("{function}: mode {mode:#o} is invalid: only the permission bits 0777 may be set"));
    }
    match FileDriver::create_with_mode(path, size, flags, mode) {
        // SAFETY: the caller's guarantee.
        Ok(d) => unsafe { new_handle(Arc::new(d), out) },
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => fail_with(
            libc::EEXIST,
            format!(
                "{function}: {}: the file already exists; refusing to overwrite it \
                 (pass COWBACKUP_CREATE_OVERWRITE to replace it)",
                path.to_string_lossy()
            ),
        ),
        Err(e) => fail_io(function, &e),
    }
}

/// Largest memory device: its bookkeeping is allocated up front (about 50 bytes per MiB).
const MAX_MEMORY_SIZE: u64 = 1 << 40;

/// Create an in-memory device of `size` bytes (1 byte to 1 TiB) that reads as zeroes. Memory
/// is allocated lazily, 1 MiB at a time, when written. For tests, examples and scratch targets.
///
/// On success `*out` is a new handle (free with `cowbackup_driver_free`). Errors: -EINVAL
/// (NULL `out`, `size` 0 or over 1 TiB). Thread-safe.
///
/// # Safety
/// `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_memory_new(size: u64, out: *mut *mut cowbackup_driver) -> c_int {
    ffi_panic_boundary!("cowbackup_memory_new", {
        check_out!(out, "cowbackup_memory_new", "out");
        if size == 0 || size > MAX_MEMORY_SIZE {
            return invalid(format!(
                "cowbackup_memory_new: size {size} is invalid: it must be from 1 to {MAX_MEMORY_SIZE}"
            ));
        }
        match MemDriver::new(size) {
            // SAFETY: `out` was checked above.
            Ok(d) => unsafe { new_handle(Arc::new(d), out) },
            Err(e) => fail_io("cowbackup_memory_new", &e),
        }
    })
}

/// Store the size of the device in bytes in `*size`. Errors: -EINVAL (NULL argument).
/// Thread-safe.
///
/// # Safety
/// `d` is NULL or a live handle; `size` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_driver_size(d: *const cowbackup_driver, size: *mut u64) -> c_int {
    ffi_panic_boundary!("cowbackup_driver_size", {
        check_out!(size, "cowbackup_driver_size", "size");
        let d = try_ref!(d, "cowbackup_driver_size", "d");
        // SAFETY: checked non-NULL above; the caller guarantees it is writable.
        unsafe { size.write(d.inner.size()) };
        0
    })
}

/// Check `offset + len <= size` without overflow.
fn check_range(function: &str, d: &cowbackup_driver, offset: u64, len: usize) -> Result<(), c_int> {
    let size = d.inner.size();
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(invalid(format!("{function}: range {offset}+{len} is past the end of the device ({size} bytes)"))),
    }
}

/// Read `len` bytes at `offset` of the device into `buf`, directly (not through a job: use it
/// to verify a target, or to read a device in a C block layer). `buf` may be NULL only when
/// `len` is 0.
///
/// Errors: -EINVAL (NULL argument, range past the end of the device or overflowing); the
/// device's -errno. On failure `buf` may have been partly written. Thread-safe.
///
/// # Safety
/// `d` is NULL or a live handle; `buf` is NULL or valid for `len` bytes of writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_driver_read(
    d: *mut cowbackup_driver,
    offset: u64,
    buf: *mut c_void,
    len: usize,
) -> c_int {
    ffi_panic_boundary!("cowbackup_driver_read", {
        let d = try_ref!(d, "cowbackup_driver_read", "d");
        if buf.is_null() && len > 0 {
            return invalid("cowbackup_driver_read: buf is NULL");
        }
        if let Err(e) = check_range("cowbackup_driver_read", d, offset, len) {
            return e;
        }
        if len == 0 {
            return 0;
        }
        // SAFETY: non-NULL, and the caller guarantees `len` writable bytes for the call.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
        match d.inner.read_at(buf, offset) {
            Ok(()) => 0,
            Err(e) => fail_io("cowbackup_driver_read", &e),
        }
    })
}

/// Write the `len` bytes of `buf` at `offset` of the device, directly. This does NOT call the
/// copy-before-write hook of a job backing up this device: call `cowbackup_cow_before_write`
/// first. `buf` may be NULL only when `len` is 0.
///
/// Errors: -EINVAL (NULL argument, range past the end of the device or overflowing); the
/// device's -errno (-EBADF for a file opened without `COWBACKUP_OPEN_WRITE`, with a message
/// saying so). Thread-safe.
///
/// # Safety
/// `d` is NULL or a live handle; `buf` is NULL or valid for `len` bytes of reads.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_driver_write(
    d: *mut cowbackup_driver,
    offset: u64,
    buf: *const c_void,
    len: usize,
) -> c_int {
    ffi_panic_boundary!("cowbackup_driver_write", {
        let d = try_ref!(d, "cowbackup_driver_write", "d");
        if buf.is_null() && len > 0 {
            return invalid("cowbackup_driver_write: buf is NULL");
        }
        if let Err(e) = check_range("cowbackup_driver_write", d, offset, len) {
            return e;
        }
        if len == 0 {
            return 0;
        }
        // SAFETY: non-NULL, and the caller guarantees `len` readable bytes for the call.
        let buf = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) };
        match d.inner.write_at(buf, offset) {
            Ok(()) => 0,
            Err(e) => fail_io("cowbackup_driver_write", &e),
        }
    })
}

/// Drop the caller's reference to the device and free the handle. Jobs using the device keep
/// their own references: the device (and a C driver's `release`) goes when the last is gone.
/// NULL: nothing. The handle must not be used afterwards, nor freed concurrently with another
/// call on it.
///
/// # Safety
/// `d` is NULL or a live handle not used by any other call during this one nor afterwards.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_driver_free(d: *mut cowbackup_driver) {
    ffi_panic_boundary!("cowbackup_driver_free", {
        if !d.is_null() {
            // SAFETY: a handle made by Box::into_raw in new_handle, freed once (caller's guarantee).
            drop(unsafe { Box::from_raw(d) });
        }
    })
}

/// Check `offset + len <= size` of a 64-bit range without overflow.
fn check_range64(function: &str, d: &cowbackup_driver, offset: u64, len: u64) -> Result<(), c_int> {
    let size = d.inner.size();
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(invalid(format!("{function}: range {offset}+{len} is past the end of the device ({size} bytes)"))),
    }
}

/// Tell the allocation status of the range of `d` starting at `offset`, at most `len` bytes
/// (non-zero): on success `*pnum` is how many bytes from `offset` (1 to `len`) share one
/// status and `*status` is `COWBACKUP_STATUS_DATA` and/or `COWBACKUP_STATUS_ZERO` (or 0). Walk
/// a device by calling again at `offset + *pnum`.
///
/// Any driver: a file answers from its extents (`SEEK_DATA`/`SEEK_HOLE`), a memory device from
/// what was written, a C driver through its `block_status` op (NULL: everything DATA), a
/// snapshot view (`cowbackup_job_snapshot`) with the status of the point-in-time image.
///
/// Errors (nothing written): -EINVAL (NULL argument, `len` 0, range past the end of the
/// device or overflowing); the device's -errno; for a snapshot view also -EACCES (the cluster
/// at `offset` is not served: outside the job's bitmap, or discarded), -ESTALE or the job's
/// -errno (the job has ended). Thread-safe.
///
/// # Safety
/// `d` is NULL or a live handle; `pnum` and `status` are NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_driver_block_status(
    d: *mut cowbackup_driver,
    offset: u64,
    len: u64,
    pnum: *mut u64,
    status: *mut u32,
) -> c_int {
    ffi_panic_boundary!("cowbackup_driver_block_status", {
        check_out!(pnum, "cowbackup_driver_block_status", "pnum");
        check_out!(status, "cowbackup_driver_block_status", "status");
        let d = try_ref!(d, "cowbackup_driver_block_status", "d");
        if len == 0 {
            return invalid("cowbackup_driver_block_status: len is 0");
        }
        if let Err(e) = check_range64("cowbackup_driver_block_status", d, offset, len) {
            return e;
        }
        match d.inner.block_status(offset, len) {
            Ok(st) => {
                // SAFETY: both checked non-NULL above; the caller guarantees they are writable.
                unsafe {
                    pnum.write(st.len.clamp(1, len));
                    status.write(st.flags.bits());
                }
                0
            }
            Err(e) => fail_io("cowbackup_driver_block_status", &e),
        }
    })
}

/// Say that `[offset, offset + len)` of `d` is no longer needed: the device may release its
/// space. A file punches a hole (where the filesystem can) and a memory device frees the
/// memory, both reading zeroes there afterwards; a C driver calls its `discard` op (NULL:
/// nothing). On a
/// **snapshot view** it means "the reader is done with this range": its whole clusters (partial
/// clusters at either end are left alone) leave the job's copy set (a later write there copies
/// nothing), their space in the job's target (the scratch image) is released, and later reads
/// of them fail with -EACCES. `len` 0: nothing, 0. Advisory: 0 when the device cannot release
/// space.
///
/// This does NOT call the copy-before-write hook of a job backing up `d`: call
/// `cowbackup_cow_before_write` first when `d` is a job's source.
///
/// Errors: -EINVAL (NULL `d`, range past the end of the device or overflowing); the device's
/// -errno (-EBADF for a file opened read-only); for a snapshot view -ESTALE or the job's
/// -errno (the job has ended). Thread-safe.
///
/// # Safety
/// `d` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_driver_discard(d: *mut cowbackup_driver, offset: u64, len: u64) -> c_int {
    ffi_panic_boundary!("cowbackup_driver_discard", {
        let d = try_ref!(d, "cowbackup_driver_discard", "d");
        if let Err(e) = check_range64("cowbackup_driver_discard", d, offset, len) {
            return e;
        }
        if len == 0 {
            return 0;
        }
        match d.inner.discard(offset, len) {
            Ok(()) => 0,
            Err(e) => fail_io("cowbackup_driver_discard", &e),
        }
    })
}

/// Make the data written to `d` durable: `fdatasync` for a file, the `flush` op for a C driver
/// (NULL: nothing), nothing for a memory device or a snapshot view. Errors: -EINVAL (NULL
/// `d`); the device's -errno. Thread-safe.
///
/// # Safety
/// `d` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn cowbackup_driver_flush(d: *mut cowbackup_driver) -> c_int {
    ffi_panic_boundary!("cowbackup_driver_flush", {
        let d = try_ref!(d, "cowbackup_driver_flush", "d");
        match d.inner.flush() {
            Ok(()) => 0,
            Err(e) => fail_io("cowbackup_driver_flush", &e),
        }
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;
    use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicUsize};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::ffi::cowbackup_last_error;

    /// A C driver over a buffer whose `read` op, once armed, calls `cowbackup_driver_read`
    /// on `nested` (its own handle, or another driver's) and records what that returned.
    struct Dev {
        data: Mutex<Vec<u8>>,
        /// The handle the read op calls into (NULL: none).
        nested: AtomicPtr<cowbackup_driver>,
        /// What the nested call returned, and its message.
        nested_rc: AtomicI32,
        nested_msg: Mutex<String>,
        /// Ops running now, and the most seen at once.
        inflight: AtomicUsize,
        max_inflight: AtomicUsize,
        /// Sleep this long in each read (to make calls overlap).
        slow: Duration,
    }

    impl Dev {
        fn new(size: usize, fill: u8) -> Box<Dev> {
            Box::new(Dev {
                data: Mutex::new(vec![fill; size]),
                nested: AtomicPtr::new(std::ptr::null_mut()),
                nested_rc: AtomicI32::new(1),
                nested_msg: Mutex::new(String::new()),
                inflight: AtomicUsize::new(0),
                max_inflight: AtomicUsize::new(0),
                slow: Duration::ZERO,
            })
        }
    }

    unsafe extern "C" fn dev_read(opaque: *mut c_void, offset: u64, buf: *mut c_void, len: usize) -> c_int {
        // SAFETY: the tests pass a live `Dev` as opaque.
        let dev = unsafe { &*opaque.cast::<Dev>() };
        let now = dev.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        dev.max_inflight.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(dev.slow);
        // Armed only once: the nested call disarms it, so a nested call into this very
        // driver does not recurse again.
        let nested = dev.nested.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !nested.is_null() {
            let mut b = [0u8; 16];
            // SAFETY: `nested` is a live handle of the test; `b` is a local of 16 bytes.
            let rc = unsafe { cowbackup_driver_read(nested, 0, b.as_mut_ptr().cast(), b.len()) };
            // SAFETY: the library's thread-local message, valid until the next failing call.
            let msg = unsafe { CStr::from_ptr(cowbackup_last_error()) }.to_string_lossy().into_owned();
            *dev.nested_msg.lock().unwrap() = msg;
            dev.nested_rc.store(rc, Ordering::SeqCst);
        }
        let data = dev.data.lock().unwrap();
        let off = offset as usize;
        // SAFETY: the library passes `len` writable bytes, inside the device.
        unsafe { std::ptr::copy_nonoverlapping(data[off..off + len].as_ptr(), buf.cast::<u8>(), len) };
        dev.inflight.fetch_sub(1, Ordering::SeqCst);
        0
    }

    unsafe extern "C" fn dev_write(opaque: *mut c_void, offset: u64, buf: *const c_void, len: usize) -> c_int {
        // SAFETY: the tests pass a live `Dev` as opaque.
        let dev = unsafe { &*opaque.cast::<Dev>() };
        let mut data = dev.data.lock().unwrap();
        let off = offset as usize;
        // SAFETY: the library passes `len` readable bytes, inside the device.
        unsafe { std::ptr::copy_nonoverlapping(buf.cast::<u8>(), data[off..off + len].as_mut_ptr(), len) };
        0
    }

    const OPS: cowbackup_driver_ops = cowbackup_driver_ops {
        read: Some(dev_read),
        write: Some(dev_write),
        write_zeroes: None,
        flush: None,
        block_status: None,
        release: None,
        discard: None,
    };

    fn driver(dev: &Dev, flags: u32) -> *mut cowbackup_driver {
        let mut d = std::ptr::null_mut();
        let opaque = (dev as *const Dev).cast_mut().cast();
        // SAFETY: a full ops table; `dev` outlives the driver in every test (freed first).
        let rc = unsafe { cowbackup_driver_new(&OPS, size_of::<cowbackup_driver_ops>(), opaque, 4096, flags, &mut d) };
        assert_eq!(rc, 0);
        d
    }

    fn read(d: *mut cowbackup_driver) -> (c_int, u8) {
        let mut b = [0u8; 16];
        // SAFETY: a live handle and a local buffer.
        let rc = unsafe { cowbackup_driver_read(d, 0, b.as_mut_ptr().cast(), b.len()) };
        (rc, b[0])
    }

    #[test]
    fn serialized_op_calling_its_own_driver_gets_edeadlk() {
        let dev = Dev::new(4096, 7);
        let d = driver(&dev, COWBACKUP_DRIVER_SERIALIZE);
        dev.nested.store(d, Ordering::SeqCst);
        let start = Instant::now();
        // The outer read works; the nested one is refused at once instead of hanging.
        assert_eq!(read(d), (0, 7));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(dev.nested_rc.load(Ordering::SeqCst), -libc::EDEADLK);
        let msg = dev.nested_msg.lock().unwrap().clone();
        assert!(msg.starts_with("cowbackup_driver_read: C driver read op"), "{msg}");
        assert!(msg.contains("EDEADLK") && msg.contains("COWBACKUP_DRIVER_SERIALIZE"), "{msg}");
        // The lock and its owner were let go: the driver works again, from here and elsewhere.
        assert_eq!(read(d), (0, 7));
        let dd = Handle(d);
        let other = std::thread::spawn(move || read(dd.get())).join().unwrap();
        assert_eq!(other, (0, 7));
        // SAFETY: made above, freed once.
        unsafe { cowbackup_driver_free(d) };
    }

    #[test]
    fn nested_through_another_driver_is_caught_too() {
        // X's read calls Y, whose read calls X: X's lock is this thread's, Y's is free.
        let (x_dev, y_dev) = (Dev::new(4096, 1), Dev::new(4096, 2));
        let x = driver(&x_dev, COWBACKUP_DRIVER_SERIALIZE);
        let y = driver(&y_dev, COWBACKUP_DRIVER_SERIALIZE);
        x_dev.nested.store(y, Ordering::SeqCst);
        y_dev.nested.store(x, Ordering::SeqCst);
        assert_eq!(read(x), (0, 1));
        assert_eq!(x_dev.nested_rc.load(Ordering::SeqCst), 0, "X's call into Y works");
        assert_eq!(y_dev.nested_rc.load(Ordering::SeqCst), -libc::EDEADLK, "Y's call back into X is refused");
        // SAFETY: made above, freed once.
        unsafe {
            cowbackup_driver_free(x);
            cowbackup_driver_free(y);
        }
    }

    #[test]
    fn unserialized_op_calling_its_own_driver_is_just_a_call() {
        let dev = Dev::new(4096, 9);
        let d = driver(&dev, 0);
        dev.nested.store(d, Ordering::SeqCst);
        assert_eq!(read(d), (0, 9));
        assert_eq!(dev.nested_rc.load(Ordering::SeqCst), 0);
        // SAFETY: made above, freed once.
        unsafe { cowbackup_driver_free(d) };
    }

    #[test]
    fn other_threads_still_wait_for_the_lock() {
        // Only the holder's own nested call is refused: calls from other threads are
        // serialized as before (never two reads at once, none refused).
        let mut dev = Dev::new(4096, 3);
        dev.slow = Duration::from_millis(20);
        let d = Handle(driver(&dev, COWBACKUP_DRIVER_SERIALIZE));
        let results: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(move || read(d.get())))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert!(results.iter().all(|&r| r == (0, 3)), "{results:?}");
        assert_eq!(dev.max_inflight.load(Ordering::SeqCst), 1);
        // SAFETY: made above, freed once.
        unsafe { cowbackup_driver_free(d.get()) };
    }

    /// A driver handle sent to other threads as the pointer it is (not as an integer,
    /// which would lose its provenance: Miri could then miss a use after free).
    #[derive(Clone, Copy)]
    struct Handle(*mut cowbackup_driver);
    // SAFETY: a cowbackup_driver may be used from any thread (its ops are thread-safe).
    unsafe impl Send for Handle {}
    impl Handle {
        fn get(self) -> *mut cowbackup_driver {
            self.0
        }
    }
}
