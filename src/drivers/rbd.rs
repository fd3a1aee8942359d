//! `RbdDriver`: a Ceph RBD image through librbd, so a backup can be written straight into
//! a Ceph cluster (or read from an RBD image used as the source) without an NBD hop.
//!
//! Only built with the cargo feature `rbd` (links `librbd` and `librados` through `#[link]`, Debian:
//! `librbd-dev`). The declarations of the few librados/librbd functions used are written
//! here by hand from `rados/librados.h` and `rbd/librbd.h` (Ceph 16.2 "Pacific"; every one
//! of them exists since Ceph 15).
//!
//! # Opening
//!
//! An image is named `rbd:POOL/IMAGE`, `rbd:POOL/NAMESPACE/IMAGE`, with an optional
//! `@SNAPSHOT` (read-only) and an optional `:id=NAME` (the cephx client id, `admin` when
//! not given: the user `client.NAME`), QEMU's `rbd:` syntax minus its other options. The
//! driver creates its own cluster handle (`rados_create2`), reads the conf file
//! (`rados_conf_read_file`: the path given, or librados's search of `$CEPH_CONF`,
//! `/etc/ceph/ceph.conf`, `~/.ceph/config`, `./ceph.conf`), sets the timeouts below,
//! connects, and opens the image read-write (`rbd_open`) or read-only
//! (`rbd_open_read_only`). Dropping the driver closes the image (flushing, releasing
//! librbd's exclusive lock), the I/O context and the cluster handle, in that order, on a
//! helper thread that the drop waits for at most three times the timeout: against a cluster
//! that went away librbd's close can wait forever, and then that thread (and the handles)
//! are left behind instead of hanging the caller.
//!
//! # Timeouts
//!
//! Ceph's clients wait for an unreachable monitor or OSD forever by default. The driver
//! sets `client_mount_timeout`, `rados_mon_op_timeout` and `rados_osd_op_timeout` to
//! [`RbdOptions::timeout`] (30 s by default): connecting, and every request to a monitor or
//! an OSD, fails with `ETIMEDOUT` after at most that long. A driver call can take a small
//! multiple of it when librbd retries internally (a write under the exclusive lock first
//! asks for the lock), so a job against a cluster that went away fails in well under a
//! minute with the default, never hangs. librbd's write-back cache is off (`rbd_cache =
//! false`, like QEMU's `cache=none`): a write that returned is on the OSDs, and a write to a
//! cluster that went away fails instead of waiting in the cache.
//!
//! # Threads
//!
//! librbd image handles and librados cluster handles are thread-safe: every method may run
//! on many threads at once (a job's workers and the host's hook), each call blocking only
//! its caller. librbd splits a request into per-object operations and runs them in
//! parallel.
//!
//! # Errors
//!
//! Every error keeps librbd's errno (`EROFS` for a write to a read-only open or a snapshot,
//! `ENOENT` for a missing pool or image, `ETIMEDOUT` from the timeouts above, `EBLOCKLISTED`
//! when the cluster blocklisted the client...) and its message names the image and the
//! operation, for example `rbd:rbd/disk1: write at 4194304+65536: Connection timed out`.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::driver::{BlockDriver, BlockStatus, StatusFlags};
use crate::error::{Error, ErrorKind};

/// The hand-written declarations of the librados and librbd functions the driver uses.
#[allow(non_camel_case_types)]
mod sys {
    use std::os::raw::{c_char, c_int, c_void};

    /// `rados_t`: a cluster handle.
    pub type rados_t = *mut c_void;
    /// `rados_ioctx_t`: an I/O context (a pool and a namespace).
    pub type rados_ioctx_t = *mut c_void;
    /// `rbd_image_t`: an open image.
    pub type rbd_image_t = *mut c_void;
    /// The callback of `rbd_diff_iterate2`: offset, length, exists, opaque.
    pub type diff_cb = unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

    #[link(name = "rbd")]
    #[link(name = "rados")]
    extern "C" {
        pub fn rados_create2(
            cluster: *mut rados_t,
            clustername: *const c_char,
            name: *const c_char,
            flags: u64,
        ) -> c_int;
        pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
        pub fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
        pub fn rados_connect(cluster: rados_t) -> c_int;
        pub fn rados_shutdown(cluster: rados_t);
        pub fn rados_ioctx_create(cluster: rados_t, pool_name: *const c_char, ioctx: *mut rados_ioctx_t) -> c_int;
        pub fn rados_ioctx_destroy(io: rados_ioctx_t);
        pub fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
        pub fn rados_ioctx_get_id(io: rados_ioctx_t) -> i64;
        pub fn rados_cluster_fsid(cluster: rados_t, buf: *mut c_char, len: usize) -> c_int;
        pub fn rbd_get_id(image: rbd_image_t, id: *mut c_char, id_len: usize) -> c_int;

        pub fn rbd_open(io: rados_ioctx_t, name: *const c_char, image: *mut rbd_image_t, snap: *const c_char) -> c_int;
        pub fn rbd_open_read_only(
            io: rados_ioctx_t,
            name: *const c_char,
            image: *mut rbd_image_t,
            snap: *const c_char,
        ) -> c_int;
        pub fn rbd_close(image: rbd_image_t) -> c_int;
        pub fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
        pub fn rbd_read2(image: rbd_image_t, ofs: u64, len: usize, buf: *mut c_char, op_flags: c_int) -> isize;
        pub fn rbd_write2(image: rbd_image_t, ofs: u64, len: usize, buf: *const c_char, op_flags: c_int) -> isize;
        pub fn rbd_write_zeroes(image: rbd_image_t, ofs: u64, len: usize, zero_flags: c_int, op_flags: c_int) -> isize;
        pub fn rbd_discard(image: rbd_image_t, ofs: u64, len: u64) -> c_int;
        pub fn rbd_flush(image: rbd_image_t) -> c_int;
        pub fn rbd_diff_iterate2(
            image: rbd_image_t,
            fromsnapname: *const c_char,
            ofs: u64,
            len: u64,
            include_parent: u8,
            whole_object: u8,
            cb: diff_cb,
            arg: *mut c_void,
        ) -> c_int;
    }
}

/// Most bytes one librbd call moves: its length travels as an `int` result inside librbd
/// (larger discards fail with `EINVAL`), so longer requests are split.
const MAX_REQUEST: u64 = 1 << 30;

/// Most bytes one [`BlockDriver::block_status`] call looks at: `rbd_diff_iterate2` asks
/// every object (4 MiB by default) of the range, so a long range is answered in windows.
const STATUS_WINDOW: u64 = 64 << 20;

/// The default of [`RbdOptions::timeout`].
pub const RBD_DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// An RBD image name, parsed from `rbd:POOL[/NAMESPACE]/IMAGE[@SNAPSHOT][:id=NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSpec {
    /// The pool.
    pub pool: String,
    /// The RADOS namespace inside the pool (`None`: the default namespace).
    pub namespace: Option<String>,
    /// The image.
    pub image: String,
    /// A snapshot of the image to open (read-only), or `None` for the image itself.
    pub snapshot: Option<String>,
    /// The cephx client id (`admin` for `client.admin`), or `None`: `admin`.
    pub id: Option<String>,
}

fn bad_spec(spec: &str, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("invalid RBD spec \"{}\": {why}", spec.escape_debug()))
}

impl RbdSpec {
    /// Parse `rbd:POOL/IMAGE`, `rbd:POOL/NAMESPACE/IMAGE`, each with an optional
    /// `@SNAPSHOT` after the image and an optional `:id=NAME` at the end.
    ///
    /// Errors: `InvalidInput` (`EINVAL`) saying why, for a missing `rbd:` prefix, an empty
    /// pool, namespace, image, snapshot or id, a NUL byte, more than three `/`-separated
    /// parts, or an option other than `id=` (a conf file is passed separately, not as
    /// QEMU's `:conf=`).
    pub fn parse(spec: &str) -> io::Result<RbdSpec> {
        let rest = spec.strip_prefix("rbd:").ok_or_else(|| bad_spec(spec, "it must start with \"rbd:\""))?;
        if rest.contains('\0') {
            return Err(bad_spec(spec, "it contains a NUL byte"));
        }
        let mut opts = rest.split(':');
        let name = opts.next().unwrap_or_default();
        let mut id = None;
        for opt in opts {
            match opt.split_once('=') {
                Some(("id", v)) if !v.is_empty() => {
                    if id.replace(v.to_owned()).is_some() {
                        return Err(bad_spec(spec, "id= is given twice"));
                    }
                }
                Some(("id", _)) => return Err(bad_spec(spec, "the id is empty")),
                Some(("conf", _)) => {
                    return Err(bad_spec(spec, "pass the conf file as the conf argument, not as :conf="))
                }
                _ => return Err(bad_spec(spec, &format!("unknown option \"{}\" (only :id=NAME)", opt.escape_debug()))),
            }
        }
        let (name, snapshot) = match name.split_once('@') {
            Some((_, "")) => return Err(bad_spec(spec, "the snapshot name after '@' is empty")),
            Some((n, s)) => (n, Some(s.to_owned())),
            None => (name, None),
        };
        let parts: Vec<&str> = name.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad_spec(spec, "expected POOL/IMAGE or POOL/NAMESPACE/IMAGE, with no empty part"));
        }
        let (pool, namespace, image) = match parts[..] {
            [pool, image] => (pool, None, image),
            [pool, ns, image] => (pool, Some(ns.to_owned()), image),
            _ => return Err(bad_spec(spec, "expected POOL/IMAGE or POOL/NAMESPACE/IMAGE")),
        };
        Ok(RbdSpec { pool: pool.to_owned(), namespace, image: image.to_owned(), snapshot, id })
    }
}

impl fmt::Display for RbdSpec {
    /// `rbd:POOL[/NAMESPACE]/IMAGE[@SNAPSHOT]` (the id is left out).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rbd:{}/", self.pool)?;
        if let Some(ns) = &self.namespace {
            write!(f, "{ns}/")?;
        }
        write!(f, "{}", self.image)?;
        if let Some(s) = &self.snapshot {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

/// How [`RbdDriver::open_with`] connects and opens.
#[derive(Debug, Clone)]
pub struct RbdOptions {
    /// The Ceph conf file (`None`: librados's search: `$CEPH_CONF`, `/etc/ceph/ceph.conf`,
    /// `~/.ceph/config`, `./ceph.conf`). Its keyring setting (or the default keyring paths)
    /// gives the client's key.
    pub conf: Option<PathBuf>,
    /// Open read-write (default: read-only). A snapshot always opens read-only; asking to
    /// write one fails with `EROFS`.
    pub write: bool,
    /// Bound for connecting and for every monitor and OSD request (see the module docs).
    /// Whole seconds, at least 1 s (a shorter non-zero value counts as 1 s);
    /// `Duration::ZERO` keeps the conf file's values (Ceph's default: no timeout).
    pub timeout: Duration,
}

impl Default for RbdOptions {
    fn default() -> RbdOptions {
        RbdOptions { conf: None, write: false, timeout: RBD_DEFAULT_TIMEOUT }
    }
}

/// An RBD image of a Ceph cluster, through librbd. See the module docs for names, timeouts,
/// threads and errors.
///
/// - `read_at` / `write_at`: `rbd_read2` / `rbd_write2`;
/// - `write_zeroes_at`: `rbd_write_zeroes` (zeroes partial objects, deallocates whole
///   ones); `discard`: `rbd_discard`; `flush`: `rbd_flush`;
/// - `block_status`: `rbd_diff_iterate2` against nothing (`whole_object = 0`, the parent's
///   extents too): librbd reports each existing object from its start to its last written
///   byte, so a written object is `DATA` up to there (its unwritten bytes read as zeroes,
///   which `DATA` allows) and what no extent covers is a hole (`ZERO`, no `DATA`);
/// - `reads_as_zero`: asks the cluster, each call, whether the image has any allocated
///   extent at all;
/// - `size`: `rbd_get_size` when opened (an image resized while a job runs is not seen);
/// - `storage_id`: a hash of the cluster fsid, pool, namespace, image id and snapshot, so a
///   job refuses an image as both source and target through two handles.
pub struct RbdDriver {
    /// The cluster handle (`rados_shutdown` last).
    cluster: sys::rados_t,
    /// The pool's I/O context (destroyed after the image is closed).
    ioctx: sys::rados_ioctx_t,
    /// The open image.
    image: sys::rbd_image_t,
    /// `rbd:POOL/IMAGE` for messages.
    name: String,
    /// The cephx client id the spec gave (`:id=NAME`), for [`BlockDriver::target_spec`].
    id: Option<String>,
    size: u64,
    write: bool,
    /// [`RbdOptions::timeout`]: bounds the close in `Drop`.
    timeout: Duration,
    /// `storage_id`: (cluster fsid + pool id + namespace, image id + snapshot), hashed, with
    /// the top bit set (never a file's `st_dev`).
    identity: Option<(u64, u64)>,
}

// SAFETY: librados cluster handles and I/O contexts and librbd image handles are
// thread-safe (librbd's ImageCtx locks internally; QEMU and rbd-nbd issue I/O on one image
// handle from many threads). The handles are only released in `Drop`, with `&mut self`.
unsafe impl Send for RbdDriver {}
// SAFETY: as above; every `&self` method only issues librbd I/O calls on the handle.
unsafe impl Sync for RbdDriver {}

impl fmt::Debug for RbdDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RbdDriver")
            .field("image", &self.name)
            .field("size", &self.size)
            .field("write", &self.write)
            .finish()
    }
}

fn strerror(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    text.split(" (os error").next().unwrap_or(&text).to_owned()
}

/// The partly built handles, released in the right order when opening fails midway.
struct Handles {
    cluster: sys::rados_t,
    ioctx: sys::rados_ioctx_t,
    image: sys::rbd_image_t,
}

impl Drop for Handles {
    fn drop(&mut self) {
        // SAFETY: each handle is either null or a live handle this struct owns, released once.
        unsafe {
            if !self.image.is_null() {
                sys::rbd_close(self.image);
            }
            if !self.ioctx.is_null() {
                sys::rados_ioctx_destroy(self.ioctx);
            }
            if !self.cluster.is_null() {
                sys::rados_shutdown(self.cluster);
            }
        }
    }
}

fn cstring(what: &str, s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} contains a NUL byte")))
}

impl RbdDriver {
    /// Open the image `spec` (`rbd:POOL[/NAMESPACE]/IMAGE[@SNAPSHOT][:id=NAME]`) of the
    /// cluster described by `conf` (`None`: librados's default search), read-write when
    /// `write`, with the default timeout (30 s). See [`RbdDriver::open_with`].
    pub fn open(spec: &str, conf: Option<&Path>, write: bool) -> io::Result<RbdDriver> {
        RbdDriver::open_with(spec, &RbdOptions { conf: conf.map(Path::to_path_buf), write, ..Default::default() })
    }

    /// Open the image `spec` with `opts`.
    ///
    /// Errors: `EINVAL` for a bad spec ([`RbdSpec::parse`]) or a conf path with a NUL byte;
    /// `EROFS` for a writable open of a snapshot; librados's and librbd's errno otherwise
    /// (`ENOENT`: no conf file, no such pool or image; `EACCES`/`EPERM`: cephx refused the
    /// key; `ETIMEDOUT`: no monitor answered within the timeout), each with a message naming
    /// the image and the step that failed. Nothing is left open after an error.
    pub fn open_with(spec: &str, opts: &RbdOptions) -> io::Result<RbdDriver> {
        let parsed = RbdSpec::parse(spec)?;
        let name = parsed.to_string();
        if opts.write && parsed.snapshot.is_some() {
            return Err(rbd_err(libc::EROFS, &name, "open", "a snapshot is read-only; open it without write"));
        }
        let conf = match &opts.conf {
            Some(p) => Some(
                CString::new(p.as_os_str().as_bytes())
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the conf path contains a NUL byte"))?,
            ),
            None => None,
        };
        let client = cstring("the client id", &format!("client.{}", parsed.id.as_deref().unwrap_or("admin")))?;
        let pool = cstring("the pool", &parsed.pool)?;
        let ns = parsed.namespace.as_deref().map(|n| cstring("the namespace", n)).transpose()?;
        let image = cstring("the image", &parsed.image)?;
        let snap = parsed.snapshot.as_deref().map(|s| cstring("the snapshot", s)).transpose()?;

        let mut h = Handles { cluster: std::ptr::null_mut(), ioctx: std::ptr::null_mut(), image: std::ptr::null_mut() };
        let check = |r: c_int, step: &str| -> io::Result<()> {
            if r < 0 {
                Err(rbd_err(-r, &name, step, &strerror(-r)))
            } else {
                Ok(())
            }
        };
        // SAFETY: the out-pointer is valid; the strings are NUL-terminated and live across the call.
        let r = unsafe { sys::rados_create2(&mut h.cluster, b"ceph\0".as_ptr().cast(), client.as_ptr(), 0) };
        check(r, &format!("rados_create2 ({})", client.to_string_lossy()))?;
        let conf_ptr = conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: `h.cluster` is a live, unconnected handle; the path is NULL or NUL-terminated.
        let r = unsafe { sys::rados_conf_read_file(h.cluster, conf_ptr) };
        let conf_name = opts.conf.as_ref().map_or("the default conf files".to_owned(), |p| p.display().to_string());
        check(r, &format!("reading {conf_name}"))?;
        if !opts.timeout.is_zero() {
            let secs = CString::new(opts.timeout.as_secs().max(1).to_string()).expect("digits have no NUL");
            for opt in ["client_mount_timeout\0", "rados_mon_op_timeout\0", "rados_osd_op_timeout\0"] {
                // SAFETY: live, unconnected handle; NUL-terminated strings.
                let r = unsafe { sys::rados_conf_set(h.cluster, opt.as_ptr().cast(), secs.as_ptr()) };
                check(r, &format!("setting {}", opt.trim_end_matches('\0')))?;
            }
        }
        // No librbd write-back cache: a write is on the OSDs when it returns, so a write to a
        // cluster that went away fails (after the timeout) instead of waiting in the cache.
        // SAFETY: live, unconnected handle; NUL-terminated strings.
        let r = unsafe { sys::rados_conf_set(h.cluster, b"rbd_cache\0".as_ptr().cast(), b"false\0".as_ptr().cast()) };
        check(r, "setting rbd_cache")?;
        // SAFETY: live handle, configured above.
        let r = unsafe { sys::rados_connect(h.cluster) };
        check(r, &format!("connecting to the cluster ({conf_name}, {})", client.to_string_lossy()))?;
        // SAFETY: connected handle; NUL-terminated pool name; valid out-pointer.
        let r = unsafe { sys::rados_ioctx_create(h.cluster, pool.as_ptr(), &mut h.ioctx) };
        check(r, &format!("opening pool \"{}\"", parsed.pool))?;
        if let Some(ns) = &ns {
            // SAFETY: live I/O context; NUL-terminated namespace.
            unsafe { sys::rados_ioctx_set_namespace(h.ioctx, ns.as_ptr()) };
        }
        let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        // SAFETY: live I/O context; NUL-terminated names (snapshot NULL or NUL-terminated); valid out-pointer.
        let r = unsafe {
            if opts.write {
                sys::rbd_open(h.ioctx, image.as_ptr(), &mut h.image, snap_ptr)
            } else {
                sys::rbd_open_read_only(h.ioctx, image.as_ptr(), &mut h.image, snap_ptr)
            }
        };
        check(r, if opts.write { "rbd_open" } else { "rbd_open_read_only" })?;
        let mut size = 0u64;
        // SAFETY: open image; valid out-pointer.
        let r = unsafe { sys::rbd_get_size(h.image, &mut size) };
        check(r, "rbd_get_size")?;
        let identity = identity(&h, &parsed);
        let h = std::mem::ManuallyDrop::new(h);
        Ok(RbdDriver {
            cluster: h.cluster,
            ioctx: h.ioctx,
            image: h.image,
            name,
            id: parsed.id.clone(),
            size,
            write: opts.write,
            timeout: opts.timeout,
            identity,
        })
    }

    /// The image's name, `rbd:POOL[/NAMESPACE]/IMAGE[@SNAPSHOT]`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.write
    }

    fn check_range(&self, op: &str, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(rbd_err(
                libc::EINVAL,
                &self.name,
                &format!("{op} at {offset}+{len}"),
                &format!("past the end of the image ({} bytes)", self.size),
            )),
        }
    }

    fn check_write(&self, op: &str, offset: u64, len: u64) -> io::Result<()> {
        if !self.write {
            return Err(rbd_err(
                libc::EROFS,
                &self.name,
                &format!("{op} at {offset}+{len}"),
                "the image is open read-only",
            ));
        }
        self.check_range(op, offset, len)
    }

    fn io_err(&self, errno: i32, op: &str, offset: u64, len: u64) -> io::Error {
        rbd_err(errno, &self.name, &format!("{op} at {offset}+{len}"), &strerror(errno))
    }

    /// Call `f(offset, len)` on pieces of at most `MAX_REQUEST` bytes.
    fn split(&self, offset: u64, len: u64, mut f: impl FnMut(u64, u64) -> io::Result<()>) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_REQUEST);
            f(offset + done, n)?;
            done += n;
        }
        Ok(())
    }

    /// The allocated extents of `[offset, offset + len)`, sorted.
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        unsafe extern "C" fn collect(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            if exists != 0 {
                // SAFETY: `arg` is the `Vec` passed to rbd_diff_iterate2 below, alive and not
                // otherwise borrowed during that call; librbd calls back on the calling thread
                // or its own, one call at a time.
                let v = unsafe { &mut *arg.cast::<Vec<(u64, u64)>>() };
                v.push((off, len as u64));
            }
            0
        }
        let mut v: Vec<(u64, u64)> = Vec::new();
        // SAFETY: open image; NULL from-snapshot (against nothing); the callback only pushes
        // to `v`, which outlives the call.
        let r = unsafe {
            sys::rbd_diff_iterate2(
                self.image,
                std::ptr::null(),
                offset,
                len,
                1,
                0,
                collect,
                (&mut v as *mut Vec<_>).cast(),
            )
        };
        if r < 0 {
            return Err(self.io_err(-r, "block status (rbd_diff_iterate2)", offset, len));
        }
        v.sort_unstable();
        Ok(v)
    }
}

/// The storage identity of an open image (see `RbdDriver::identity`), `None` when librados or
/// librbd cannot say.
fn identity(h: &Handles, spec: &RbdSpec) -> Option<(u64, u64)> {
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};
    let mut fsid = [0u8; 64];
    // SAFETY: connected cluster handle; the buffer is valid for `len` bytes.
    let n = unsafe { sys::rados_cluster_fsid(h.cluster, fsid.as_mut_ptr().cast(), fsid.len()) };
    if n <= 0 {
        return None;
    }
    let mut id = [0u8; 128];
    // SAFETY: open image; the buffer is valid for `len` bytes (librbd NUL-terminates).
    if unsafe { sys::rbd_get_id(h.image, id.as_mut_ptr().cast(), id.len()) } < 0 {
        return None;
    }
    // SAFETY: live I/O context.
    let pool = unsafe { sys::rados_ioctx_get_id(h.ioctx) };
    let fsid = fsid[..(n as usize).min(fsid.len())].split(|&b| b == 0).next().unwrap_or(&[]);
    let image_id = id.split(|&b| b == 0).next().unwrap_or(&[]);
    let mut st = DefaultHasher::new();
    (fsid, pool, &spec.namespace).hash(&mut st);
    let dev = st.finish() | (1 << 63);
    let mut st = DefaultHasher::new();
    (image_id, &spec.snapshot).hash(&mut st);
    Some((dev, st.finish()))
}

fn rbd_err(errno: i32, image: &str, op: &str, why: &str) -> io::Error {
    io::Error::from(Error::new(ErrorKind::Io, errno, format!("{image}: {op}: {why}")))
}

// SAFETY: the handles are librados/librbd handles, usable from any thread; `Handles` owns
// them alone (moved out of the driver when it is dropped).
unsafe impl Send for Handles {}

impl Drop for RbdDriver {
    /// Closes the image (flushing, releasing the exclusive lock), then the I/O context, then
    /// the cluster handle, on a helper thread: against a cluster that went away, librbd's
    /// close can wait forever (its watch and lock release retry), so the drop waits at most
    /// three times the timeout, then leaves that thread (and the handles) behind.
    fn drop(&mut self) {
        let h = Handles { cluster: self.cluster, ioctx: self.ioctx, image: self.image };
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new().name("cowbackup-rbd-close".into()).spawn(move || {
            drop(h);
            let _ = tx.send(());
        });
        match spawned {
            Ok(t) if self.timeout.is_zero() => {
                let _ = t.join();
            }
            // The close goes on in the background if it takes longer (nothing else to do).
            Ok(_) => {
                let _ = rx.recv_timeout(self.timeout.max(Duration::from_secs(1)) * 3);
            }
            // No thread: the closure was dropped, which closed the handles on this thread.
            Err(_) => {}
        }
    }
}

impl BlockDriver for RbdDriver {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        self.check_range("read", offset, len)?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(MAX_REQUEST) as usize;
            let piece = &mut buf[done as usize..done as usize + n];
            // SAFETY: open image; `piece` is valid for writes of `n` bytes for the call.
            let r = unsafe { sys::rbd_read2(self.image, offset + done, n, piece.as_mut_ptr().cast::<c_char>(), 0) };
            if r < 0 {
                return Err(self.io_err(-r as i32, "read", offset + done, n as u64));
            }
            if r == 0 {
                return Err(self.io_err(libc::EIO, "read (short read)", offset + done, n as u64));
            }
            done += r as u64;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        self.check_write("write", offset, len)?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(MAX_REQUEST) as usize;
            let piece = &buf[done as usize..done as usize + n];
            // SAFETY: open image; `piece` is valid for reads of `n` bytes for the call.
            let r = unsafe { sys::rbd_write2(self.image, offset + done, n, piece.as_ptr().cast::<c_char>(), 0) };
            if r < 0 {
                return Err(self.io_err(-r as i32, "write", offset + done, n as u64));
            }
            if r == 0 {
                return Err(self.io_err(libc::EIO, "write (short write)", offset + done, n as u64));
            }
            done += r as u64;
        }
        Ok(())
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_write("write zeroes", offset, len)?;
        self.split(offset, len, |off, n| {
            // SAFETY: open image; no buffer.
            let r = unsafe { sys::rbd_write_zeroes(self.image, off, n as usize, 0, 0) };
            if r < 0 {
                return Err(self.io_err(-r as i32, "write zeroes", off, n));
            }
            Ok(())
        })
    }

    fn flush(&self) -> io::Result<()> {
        // SAFETY: open image.
        let r = unsafe { sys::rbd_flush(self.image) };
        if r < 0 {
            return Err(rbd_err(-r, &self.name, "flush", &strerror(-r)));
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_write("discard", offset, len)?;
        self.split(offset, len, |off, n| {
            // SAFETY: open image.
            let r = unsafe { sys::rbd_discard(self.image, off, n) };
            if r < 0 {
                return Err(self.io_err(-r, "discard", off, n));
            }
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.check_range("block status", offset, len)?;
        if len == 0 {
            return Err(self.io_err(libc::EINVAL, "block status (empty range)", offset, len));
        }
        let window = len.min(STATUS_WINDOW);
        let extents = self.extents(offset, window)?;
        // The status at `offset`: inside an extent (and the extents that touch it) = DATA;
        // else a hole up to the next extent (or the end of the window).
        let mut pos = offset;
        let end = offset + window;
        let mut data = None;
        for (s, l) in extents {
            let e = (s + l).min(end);
            if e <= pos {
                continue;
            }
            if s > pos {
                if data.is_none() {
                    return Ok(BlockStatus { len: s.min(end) - offset, flags: StatusFlags::ZERO });
                }
                break;
            }
            data = Some(());
            pos = e;
        }
        match data {
            Some(()) => Ok(BlockStatus { len: pos - offset, flags: StatusFlags::DATA }),
            None => Ok(BlockStatus { len: window, flags: StatusFlags::ZERO }),
        }
    }

    /// The same image (or snapshot) of the same cluster gives the same identity through any
    /// handle, so a job refuses an RBD image as both its source and its target.
    /// `rbd:POOL[/NAMESPACE]/IMAGE[@SNAPSHOT]`, with `:id=NAME` when the spec it was opened
    /// with gave one: a job's manifest records it as the backup's target, and
    /// [`crate::repo::Chain::open`] opens it again (read-only, the default conf search).
    fn target_spec(&self) -> Option<String> {
        Some(match &self.id {
            Some(id) => format!("{}:id={id}", self.name),
            None => self.name.clone(),
        })
    }

    fn storage_id(&self) -> Option<(u64, u64)> {
        self.identity
    }

    fn reads_as_zero(&self) -> bool {
        // Whole objects: the cheapest question librbd answers (the object map when the image
        // has one). Any extent, or any error, says "not known to be zero".
        unsafe extern "C" fn stop(_off: u64, _len: usize, exists: c_int, _arg: *mut c_void) -> c_int {
            if exists != 0 {
                -libc::EEXIST
            } else {
                0
            }
        }
        // SAFETY: open image; the callback touches no memory.
        let r = unsafe {
            sys::rbd_diff_iterate2(self.image, std::ptr::null(), 0, self.size, 1, 1, stop, std::ptr::null_mut())
        };
        r == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let s = RbdSpec::parse("rbd:pool/img").unwrap();
        assert_eq!(s, RbdSpec { pool: "pool".into(), namespace: None, image: "img".into(), snapshot: None, id: None });
        assert_eq!(s.to_string(), "rbd:pool/img");
        let s = RbdSpec::parse("rbd:p/ns/img@snap1:id=backup").unwrap();
        assert_eq!(s.namespace.as_deref(), Some("ns"));
        assert_eq!(s.image, "img");
        assert_eq!(s.snapshot.as_deref(), Some("snap1"));
        assert_eq!(s.id.as_deref(), Some("backup"));
        assert_eq!(s.to_string(), "rbd:p/ns/img@snap1");
        for bad in [
            "pool/img",
            "rbd:",
            "rbd:pool",
            "rbd:/img",
            "rbd:pool/",
            "rbd:a/b/c/d",
            "rbd:pool/img@",
            "rbd:pool/img:id=",
            "rbd:pool/img:id=a:id=b",
            "rbd:pool/img:conf=/etc/ceph/ceph.conf",
            "rbd:pool/img:foo=bar",
            "rbd:pool/img:",
            "rbd:po\0ol/img",
        ] {
            let e = RbdSpec::parse(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}");
            assert!(e.to_string().contains("invalid RBD spec"), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_opens_fail_cleanly() {
        let e = RbdDriver::open("rbd:p/i@s", None, true).unwrap_err();
        assert_eq!(crate::errno_of(&e), libc::EROFS);
        assert!(e.to_string().contains("rbd:p/i@s"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = RbdDriver::open("rbd:p/i", Some(&dir.path().join("nope.conf")), false).unwrap_err();
        assert_eq!(crate::errno_of(&e), libc::ENOENT, "{e}");
        assert!(e.to_string().contains("nope.conf"), "{e}");
    }
}
