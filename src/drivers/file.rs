//! `FileDriver`: raw image files and block devices.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::buf::IO_ALIGN;
use crate::driver::{BlockDriver, BlockStatus, StatusFlags};
use crate::error::{errno_of, Error, ErrorKind};
use crate::fs::{self, CreateMode, DEFAULT_FILE_MODE};

bitflags::bitflags! {
    /// How [`FileDriver::open`] and [`FileDriver::create_with`] open a file. Same values as
    /// `COWBACKUP_OPEN_WRITE`, `COWBACKUP_OPEN_DIRECT` and `COWBACKUP_CREATE_OVERWRITE` in C.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct OpenFlags: u32 {
        /// Open read-write (a target, or a source the host writes to through this driver).
        const WRITE = 1;
        /// Bypass the page cache with `O_DIRECT` for aligned requests.
        const DIRECT = 2;
        /// [`FileDriver::create_with`] only: replace an existing regular file (by renaming a
        /// new file over it, never by writing through it; a symlink at the path is refused
        /// with `ELOOP`) or open an existing block device. Without it, creating over an
        /// existing path fails with `AlreadyExists` and leaves the file alone.
        /// [`FileDriver::open`] refuses it (`InvalidInput`).
        const OVERWRITE = 4;
    }
}

/// `_IOR(0x12, 114, size_t)`: the size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// A raw image file or a block device, with positional I/O (`pread`/`pwrite`, no
/// shared seek position), so every method can run on many threads at once.
///
/// - `write_zeroes_at` punches a hole (or zeroes the range) with `fallocate`, and
///   falls back to writing zeroes where the filesystem or device cannot.
/// - `block_status` uses `SEEK_DATA`/`SEEK_HOLE` on files; a block device is all data.
/// - `reads_as_zero` asks the file each time (`SEEK_DATA` from 0 finds no data); a
///   block device never claims it.
/// - `flush` is `fdatasync`.
/// - With [`OpenFlags::DIRECT`], requests whose buffer, offset and length are aligned
///   to 4 KiB go through an `O_DIRECT` descriptor; the rest go through a second,
///   buffered descriptor of the same file (the kernel keeps the two coherent). The
///   job's own buffers are always aligned.
/// - Only regular files and block devices are accepted: FIFOs, sockets, directories and
///   character devices are refused with `InvalidInput`, without blocking on them.
/// - Errors of opening or creating name the path; a write through a driver opened
///   read-only fails with errno `EBADF` and says so.
pub struct FileDriver {
    file: File,
    direct: Option<File>,
    size: u64,
    is_blockdev: bool,
    writable: bool,
    storage_id: (u64, u64),
    path: PathBuf,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// `e` with `what PATH: ` in front of its message, keeping its errno (and so its kind).
fn with_path(what: &str, path: &Path, e: io::Error) -> io::Error {
    let kind = if e.kind() == io::ErrorKind::InvalidInput { ErrorKind::InvalidInput } else { ErrorKind::Io };
    io::Error::from(Error::new(kind, errno_of(&e), format!("{what} {}: {e}", path.display())))
}

/// What a file that is neither a regular file nor a block device is, for messages.
fn type_name(ft: &std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else {
        "of an unknown type"
    }
}

/// `InvalidInput` unless `meta` is a regular file or a block device.
fn check_type(what: &str, path: &Path, meta: &std::fs::Metadata) -> io::Result<()> {
    let ft = meta.file_type();
    if ft.is_file() || ft.is_block_device() {
        return Ok(());
    }
    Err(invalid(format!(
        "{what} {}: is {}, not a regular file or block device (the only kinds a file driver uses)",
        path.display(),
        type_name(&ft)
    )))
}

/// Open `path` without blocking on it (`O_NONBLOCK`: a FIFO would wait for a writer;
/// `O_NOCTTY`: a terminal must not become ours), check what it is, then clear `O_NONBLOCK`.
fn open_checked(what: &str, path: &Path, opts: &mut OpenOptions, extra: libc::c_int) -> io::Result<File> {
    let file = opts
        .custom_flags(extra | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| with_path(what, path, e))?;
    let meta = file.metadata().map_err(|e| with_path(what, path, e))?;
    check_type(what, path, &meta)?;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, reading and then setting its status flags.
    let r = unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 {
            fl
        } else {
            libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK)
        }
    };
    if r < 0 {
        return Err(with_path(what, path, io::Error::last_os_error()));
    }
    Ok(file)
}

impl FileDriver {
    /// Open an existing image file or block device. The size is the file's length, or
    /// for a block device the device's size (`BLKGETSIZE64`). Read-only unless `flags`
    /// has [`OpenFlags::WRITE`].
    ///
    /// # Errors
    /// `InvalidInput` for [`OpenFlags::OVERWRITE`] (a create flag) and for a path that is
    /// not a regular file or block device (a FIFO, socket, directory or character device:
    /// refused without blocking); otherwise the open's error (`NotFound`,
    /// `PermissionDenied`, ...). Every message starts with `open PATH: `.
    pub fn open(path: impl AsRef<Path>, flags: OpenFlags) -> io::Result<FileDriver> {
        let path = path.as_ref();
        if flags.contains(OpenFlags::OVERWRITE) {
            return Err(invalid(format!(
                "open {}: OpenFlags::OVERWRITE is only for FileDriver::create_with",
                path.display()
            )));
        }
        // Refuse FIFOs and the like before opening them at all (opening has side effects on
        // some devices); open_checked checks the opened file again, in case it changed.
        let meta = std::fs::metadata(path).map_err(|e| with_path("open", path, e))?;
        check_type("open", path, &meta)?;
        let write = flags.contains(OpenFlags::WRITE);
        let file = open_checked("open", path, OpenOptions::new().read(true).write(write), 0)?;
        let direct = if flags.contains(OpenFlags::DIRECT) {
            Some(open_checked("open", path, OpenOptions::new().read(true).write(write), libc::O_DIRECT)?)
        } else {
            None
        };
        FileDriver::from_files(path, file, direct, write)
    }

    /// Create `path` as a new sparse file of `size` bytes and open it read-write. The new
    /// file reads as zeroes, so a job backing up into it skips zero clusters entirely.
    ///
    /// The file is created mode 0600 ([`DEFAULT_FILE_MODE`], whatever the umask:
    /// [`FileDriver::create_with_mode`] widens it), under a random temporary name in the same
    /// directory (`O_CREAT | O_EXCL | O_NOFOLLOW`), sized, synced and then renamed into place
    /// without replacing anything (`renameat2(RENAME_NOREPLACE)`): no window between a check
    /// and the create, a symlink or file planted at `path` is never followed or adopted, and
    /// `path` never names a half-made file.
    ///
    /// # Errors
    /// `AlreadyExists` (EEXIST) when anything exists at `path`, a dangling symlink included
    /// (nothing is changed: a backup pointed at the wrong path must not destroy it;
    /// [`FileDriver::create_with`] with [`OpenFlags::OVERWRITE`] replaces a file on purpose);
    /// `InvalidInput` when `size` is 0 or `path` does not end in a file name; the error of
    /// creating, sizing or renaming the file otherwise (the temporary file is removed again).
    /// Messages name the path. Thread-safe.
    pub fn create(path: impl AsRef<Path>, size: u64) -> io::Result<FileDriver> {
        FileDriver::create_with(path, size, OpenFlags::WRITE)
    }

    /// [`FileDriver::create`] with flags: [`OpenFlags::DIRECT`], and
    /// [`OpenFlags::OVERWRITE`] to replace an existing file instead of failing with
    /// `AlreadyExists`. [`OpenFlags::WRITE`] is implied. Mode 0600 ([`DEFAULT_FILE_MODE`]).
    ///
    /// With `OVERWRITE`:
    /// - a regular file at `path` is **replaced**, not truncated: the new file is made under a
    ///   temporary name in the same directory and renamed over `path` (so the directory must
    ///   be writable; other hard links of the old file keep the old contents, and a file
    ///   pre-created by another user never receives the data nor keeps its owner or mode);
    /// - a **symbolic link** at `path` is refused with `ELOOP` and left alone, as is what it
    ///   points to: a link is never followed (pass the resolved path, e.g. of a
    ///   `/dev/disk/by-id/` link, to write through it on purpose);
    /// - a **block device** at `path` is opened read-write (with `O_NOFOLLOW`), never
    ///   replaced nor resized: it must hold at least `size` bytes (`InvalidInput` otherwise)
    ///   and the driver's size is the device's; its node's owner and mode are left as they are;
    /// - a directory, FIFO, socket or character device is refused with `InvalidInput`,
    ///   untouched.
    ///
    /// # Errors
    /// As [`FileDriver::create`], plus the cases above.
    pub fn create_with(path: impl AsRef<Path>, size: u64, flags: OpenFlags) -> io::Result<FileDriver> {
        FileDriver::create_with_mode(path, size, flags, DEFAULT_FILE_MODE)
    }

    /// [`FileDriver::create_with`] with the permission bits of the new file: `mode` (0 to
    /// 0o777) is applied exactly with `fchmod`, whatever the umask (the file is created 0600
    /// and widened only once it is ours, before it is renamed into place). For example 0o640
    /// lets the file's group read the backup. Not applied to a block device opened with
    /// [`OpenFlags::OVERWRITE`] (its node is not replaced).
    ///
    /// # Errors
    /// As [`FileDriver::create_with`]; `InvalidInput` for a mode with bits outside 0o777
    /// (setuid, setgid, sticky).
    pub fn create_with_mode(path: impl AsRef<Path>, size: u64, flags: OpenFlags, mode: u32) -> io::Result<FileDriver> {
        let path = path.as_ref();
        if size == 0 {
            return Err(invalid(format!("create {}: device size must not be 0", path.display())));
        }
        fs::check_mode(mode).map_err(|e| with_path("create", path, e))?;
        let overwrite = flags.contains(OpenFlags::OVERWRITE);
        let direct = flags.contains(OpenFlags::DIRECT);
        if overwrite {
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(io::Error::from(Error::new(
                        ErrorKind::Io,
                        libc::ELOOP,
                        format!(
                            "create {}: is a symbolic link; a target is never created or replaced through a link \
                             (the link and what it points to are left alone; pass the resolved path to write there)",
                            path.display()
                        ),
                    )))
                }
                Ok(meta) if meta.file_type().is_block_device() => {
                    return FileDriver::overwrite_block_device(path, size, direct, &meta)
                }
                Ok(meta) if !meta.file_type().is_file() => {
                    return Err(invalid(format!(
                        "create {}: is {}: only a regular file can be replaced (or a block device opened)",
                        path.display(),
                        type_name(&meta.file_type())
                    )))
                }
                _ => {}
            }
        }
        let how = CreateMode { mode, overwrite };
        let published = fs::publish(path, how, |file, tmp| {
            file.set_len(size)?;
            if !direct {
                return Ok(None);
            }
            // The O_DIRECT descriptor of the same (still temporary, still ours) file, made
            // before the rename so a failure leaves nothing behind.
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(tmp)
                .map(Some)
        });
        let (file, direct) = match published {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(io::Error::from(Error::new(
                    ErrorKind::Io,
                    libc::EEXIST,
                    format!(
                        "create {}: the file already exists; refusing to overwrite it (pass OpenFlags::OVERWRITE to replace it)",
                        path.display()
                    ),
                )))
            }
            Err(e) => return Err(with_path("create", path, e)),
        };
        FileDriver::from_files(path, file, direct, true)
    }

    /// `create_with(OVERWRITE)` of a block device: open it (never follow a link, never replace
    /// the node), check it is still the device `seen` and big enough.
    fn overwrite_block_device(
        path: &Path,
        size: u64,
        direct: bool,
        seen: &std::fs::Metadata,
    ) -> io::Result<FileDriver> {
        let open =
            |extra| open_checked("create", path, OpenOptions::new().read(true).write(true), libc::O_NOFOLLOW | extra);
        let file = open(0)?;
        let meta = file.metadata().map_err(|e| with_path("create", path, e))?;
        if !meta.file_type().is_block_device() || meta.rdev() != seen.rdev() {
            return Err(invalid(format!(
                "create {}: the block device changed while it was being opened",
                path.display()
            )));
        }
        let direct = if direct { Some(open(libc::O_DIRECT)?) } else { None };
        let d = FileDriver::from_files(path, file, direct, true)?;
        if d.size < size {
            return Err(invalid(format!(
                "create {}: the block device holds {} bytes, less than the {size} bytes asked for (a device is never resized)",
                path.display(),
                d.size
            )));
        }
        Ok(d)
    }

    fn from_files(path: &Path, file: File, direct: Option<File>, writable: bool) -> io::Result<FileDriver> {
        let meta = file.metadata().map_err(|e| with_path("open", path, e))?;
        check_type("open", path, &meta)?;
        let is_blockdev = meta.file_type().is_block_device();
        let (size, storage_id) = if is_blockdev {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
            if r < 0 {
                return Err(with_path("open", path, io::Error::last_os_error()));
            }
            (size, (u64::MAX, meta.rdev()))
        } else {
            (meta.len(), (meta.dev(), meta.ino()))
        };
        if let Some(d) = &direct {
            let m = d.metadata().map_err(|e| with_path("open", path, e))?;
            let id = if is_blockdev { (u64::MAX, m.rdev()) } else { (m.dev(), m.ino()) };
            if id != storage_id {
                return Err(invalid(format!("open {}: the file changed while it was being opened", path.display())));
            }
        }
        Ok(FileDriver { file, direct, size, is_blockdev, writable, storage_id, path: path.to_path_buf() })
    }

    /// `EBADF` with a message saying how to open the file for writing.
    fn read_only(&self, op: &str) -> io::Error {
        io::Error::from(Error::new(
            ErrorKind::Io,
            libc::EBADF,
            format!(
                "{op} {}: the driver was opened read-only; open it with OpenFlags::WRITE \
                 (C: COWBACKUP_OPEN_WRITE, Python: Driver.open(path, write=True)) to write to it",
                self.path.display()
            ),
        ))
    }

    /// The path the driver was opened or created with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(invalid(format!("range {offset}+{len} is past the end of the device ({} bytes)", self.size))),
        }
    }

    /// The descriptor for a request: the O_DIRECT one when everything is aligned.
    fn fd_for(&self, ptr: *const u8, len: usize, offset: u64) -> &File {
        match &self.direct {
            Some(d) if (ptr as usize | len) % IO_ALIGN == 0 && offset % IO_ALIGN as u64 == 0 => d,
            _ => &self.file,
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on an fd we own; offset and len were range-checked.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Copy `[offset, offset + len)` of this file to the same range of `target`
    /// inside the kernel with `copy_file_range` (a reflink clone where the filesystem
    /// shares extents, e.g. XFS or Btrfs), without passing the bytes through user memory.
    ///
    /// # Errors
    /// `Unsupported` (errno `EXDEV`, `EOPNOTSUPP`, `ENOSYS` or `EINVAL`) when the kernel
    /// or the filesystems cannot (block devices, different filesystems on old kernels):
    /// read and write instead. `InvalidInput` for a range past the end; the I/O error
    /// of the copy otherwise.
    pub fn copy_range_to(&self, target: &FileDriver, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        target.check(offset, len)?;
        if self.is_blockdev || target.is_blockdev {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        if len == 0 {
            return Ok(());
        }
        if !target.writable {
            return Err(target.read_only("copy_file_range to"));
        }
        let (mut src_off, mut dst_off) = (offset as libc::loff_t, offset as libc::loff_t);
        let end = offset + len;
        while (src_off as u64) < end {
            let want = (end - src_off as u64).min(1 << 30) as usize;
            // SAFETY: both descriptors are ours and open; the offsets are valid pointers to
            // locals; copy_file_range does not touch the descriptors' file positions then.
            let n = unsafe {
                libc::copy_file_range(
                    self.file.as_raw_fd(),
                    &mut src_off,
                    target.file.as_raw_fd(),
                    &mut dst_off,
                    want,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "copy_file_range copied nothing"));
            }
        }
        Ok(())
    }

    /// Whether [`copy_range_to`](FileDriver::copy_range_to) `target` spares writing the
    /// data: both are regular files on one filesystem of a type where `copy_file_range`
    /// clones extents or copies on the server (XFS, Btrfs, bcachefs, OCFS2, ZFS, NFS,
    /// SMB/CIFS, Ceph), known by `fstatfs`. Elsewhere (ext4, tmpfs, ...) the kernel
    /// copies the bytes page to page: for data the caller has read anyway (a job reads
    /// every cluster to find zeroes) that is the same two memory copies as a `pwrite`
    /// of the buffer, measured from 0.8x to 3x its speed depending on the state of the
    /// machine's memory (PERFORMANCE.md), so no structural gain. `false` when `fstatfs`
    /// fails.
    pub fn copy_offload_pays(&self, target: &FileDriver) -> bool {
        /// `f_type` of the filesystems whose `copy_file_range` does not move the data
        /// through this machine's page cache (linux/magic.h; ZFS and SMB2 from their sources).
        const SHARING: [u32; 9] = [
            0x5846_5342, // XFS
            0x9123_683e, // Btrfs
            0xca45_1a4e, // bcachefs
            0x7461_636f, // OCFS2
            0x2fc1_2fc1, // ZFS (block cloning)
            0x0000_6969, // NFS (server-side copy)
            0xff53_4d42, // CIFS
            0xfe53_4d42, // SMB2
            0x00c3_6400, // Ceph
        ];
        if self.is_blockdev || target.is_blockdev || self.storage_id.0 != target.storage_id.0 {
            return false;
        }
        // SAFETY: a zeroed statfs is a valid value of this plain C struct.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs on a descriptor we own, writing into a local of the right type.
        if unsafe { libc::fstatfs(self.file.as_raw_fd(), &mut st) } < 0 {
            return false;
        }
        SHARING.contains(&(st.f_type as u32))
    }

    /// Whether reads of this file wait for a device, so reading ahead pays: a block
    /// device, or a file on a filesystem other than tmpfs or ramfs (whose pages are in
    /// memory already), opened without [`OpenFlags::DIRECT`] (whose reads skip the page
    /// cache that read-ahead fills). `false` when `fstatfs` fails.
    pub(crate) fn reads_from_a_device(&self) -> bool {
        self.uses_page_cache() && !self.in_memory().unwrap_or(true)
    }

    /// Whether reads and writes of this file go through the page cache: opened without
    /// [`OpenFlags::DIRECT`].
    pub(crate) fn uses_page_cache(&self) -> bool {
        self.direct.is_none()
    }

    /// Whether the file is on tmpfs or ramfs (its pages are memory: reading a hole costs a
    /// zero page, and `SEEK_HOLE`/`SEEK_DATA` walk the page cache page by page); `None`
    /// when `fstatfs` fails. Never for a block device.
    pub(crate) fn in_memory(&self) -> Option<bool> {
        const IN_MEMORY: [u32; 2] = [0x0102_1994 /* tmpfs */, 0x8584_58f6 /* ramfs */];
        if self.is_blockdev {
            return Some(false);
        }
        // SAFETY: a zeroed statfs is a valid value of this plain C struct.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs on a descriptor we own, writing into a local of the right type.
        if unsafe { libc::fstatfs(self.file.as_raw_fd(), &mut st) } < 0 {
            return None;
        }
        Some(IN_MEMORY.contains(&(st.f_type as u32)))
    }

    /// A second, read-only descriptor of the same file for a job's own reads, with the
    /// kernel's readahead off (`POSIX_FADV_RANDOM`), or `None` where reads do not wait for
    /// a device ([`FileDriver::reads_from_a_device`]) or the reopen fails. Reopened through
    /// `/proc/self/fd`, so it is the same file (checked: same device and inode) whatever
    /// happened to the path.
    ///
    /// Why: a job reads exactly what it copies, and readahead on a descriptor read in
    /// 1 MiB chunks queues up to `read_ahead_kb` (8 MiB on a virtio disk) ahead of the
    /// device, so the hook's cold read of old data waits behind tens of milliseconds of
    /// background reads (PERFORMANCE.md, issue 26). The job's reads are exact instead; a
    /// sparse copy set is read ahead explicitly (prefetch.rs). The host's own reads
    /// through this driver keep their readahead.
    pub(crate) fn exact_reader(&self) -> Option<FileDriver> {
        if !self.reads_from_a_device() {
            return None;
        }
        let proc = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let file = OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(&proc).ok()?;
        let meta = file.metadata().ok()?;
        let id = if self.is_blockdev { (u64::MAX, meta.rdev()) } else { (meta.dev(), meta.ino()) };
        if id != self.storage_id {
            return None;
        }
        // SAFETY: posix_fadvise on the descriptor just opened; it reads no memory of ours.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        Some(FileDriver {
            file,
            direct: None,
            size: self.size,
            is_blockdev: self.is_blockdev,
            writable: false,
            storage_id: self.storage_id,
            path: self.path.clone(),
        })
    }

    /// Ask the kernel to start reading `len` bytes at `offset` into the page cache
    /// (`posix_fadvise(POSIX_FADV_WILLNEED)`): it queues the reads and returns. Advisory:
    /// an error changes nothing but the speed, so none is reported.
    pub(crate) fn advise_willneed(&self, offset: u64, len: u64) {
        // SAFETY: posix_fadvise on a descriptor we own; it reads no memory of ours.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }

    /// Read `buf` at `offset` as [`BlockDriver::read_at`] does, and say whether every byte
    /// came from the page cache without waiting for the device: `preadv2(RWF_NOWAIT)`
    /// first, then an ordinary read of whatever it left (a page not cached, or a kernel
    /// or filesystem without `RWF_NOWAIT`). Always `false` with [`OpenFlags::DIRECT`].
    pub(crate) fn read_at_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.check(offset, buf.len() as u64)?;
        if self.direct.is_some() {
            return self.read_at(buf, offset).map(|()| false);
        }
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: one iovec over `buf`, memory we borrow mutably for the call; the
        // descriptor is ours.
        let r = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, offset as libc::off_t, libc::RWF_NOWAIT) };
        // Short: a page was not cached (the kernel stops there); negative: none was
        // (EAGAIN), or no RWF_NOWAIT here, or an error the ordinary read reports.
        let done = if r > 0 { r as usize } else { 0 };
        if done == buf.len() {
            return Ok(true);
        }
        self.file.read_exact_at(&mut buf[done..], offset + done as u64)?;
        Ok(false)
    }

    /// Whether writes to this file go through the page cache to a device, so starting
    /// their writeback early can pay (job/writeback.rs): writable, not
    /// [`OpenFlags::DIRECT`], not on tmpfs or ramfs.
    pub(crate) fn writes_through_page_cache(&self) -> bool {
        self.writable && self.uses_page_cache() && self.in_memory() == Some(false)
    }

    /// Start writing back the dirty pages of `len` bytes at `offset`
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: queued, not waited for; no durability
    /// promise, the job's final flush is still what makes the target durable). Advisory:
    /// an error changes nothing but when the pages are written, so none is reported.
    pub(crate) fn start_writeback(&self, offset: u64, len: u64) {
        // SAFETY: sync_file_range on a descriptor we own; it reads no memory of ours.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }

    fn lseek(&self, offset: u64, whence: libc::c_int) -> io::Result<u64> {
        // SAFETY: lseek on an fd we own; all I/O is positional so moving the offset is harmless.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    }
}

/// The operation cannot be done this way here (fall back to another).
pub(crate) fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::EXDEV))
}

impl BlockDriver for FileDriver {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.fd_for(buf.as_ptr(), buf.len(), offset).read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if !self.writable {
            return Err(self.read_only("write to"));
        }
        self.fd_for(buf.as_ptr(), buf.len(), offset).write_all_at(buf, offset)
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if !self.writable {
            return Err(self.read_only("write zeroes to"));
        }
        let modes = if self.is_blockdev {
            [libc::FALLOC_FL_ZERO_RANGE, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE]
        } else {
            [libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, libc::FALLOC_FL_ZERO_RANGE]
        };
        for mode in modes {
            match self.fallocate(mode, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        // Neither works here: write zero buffers (aligned, so O_DIRECT can take them).
        const CHUNK: u64 = 1 << 20;
        let mut zeroes = crate::buf::AlignedBuf::new();
        let zeroes = zeroes.slice_mut(len.min(CHUNK) as usize);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK) as usize;
            let at = offset + done;
            self.fd_for(zeroes.as_ptr(), n, at).write_all_at(&zeroes[..n], at)?;
            done += n as u64;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Punches a hole (`fallocate` `PUNCH_HOLE | KEEP_SIZE`): the range reads as zeroes
    /// and its space is released. Where the filesystem cannot punch holes, nothing
    /// happens (discard is advisory).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if !self.writable {
            return Err(self.read_only("discard"));
        }
        match self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            Err(e) if unsupported(&e) => Ok(()),
            r => r,
        }
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.check(offset, len)?;
        let end = offset + len;
        if self.is_blockdev || len == 0 {
            return Ok(BlockStatus { len, flags: StatusFlags::DATA });
        }
        match self.lseek(offset, libc::SEEK_DATA) {
            Ok(data) if data <= offset => {
                let hole = self.lseek(offset, libc::SEEK_HOLE).unwrap_or(end);
                Ok(BlockStatus { len: (hole.min(end) - offset).max(1), flags: StatusFlags::DATA })
            }
            Ok(data) => Ok(BlockStatus { len: data.min(end) - offset, flags: StatusFlags::ZERO }),
            // No data after offset: a hole to the end of the file.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(BlockStatus { len, flags: StatusFlags::ZERO }),
            // The filesystem cannot tell: everything is data.
            Err(e) if unsupported(&e) => Ok(BlockStatus { len, flags: StatusFlags::DATA }),
            Err(e) => Err(e),
        }
    }

    /// Asked of the file each time, never remembered: another handle (or program) may
    /// have written to it since it was created. True when `SEEK_DATA` from offset 0 finds
    /// no data before the end of the device (the file is one hole); false for a block
    /// device, for a file with any data extent (even of zeroes), and when the filesystem
    /// cannot tell (`SEEK_DATA` unsupported) or the query fails.
    fn reads_as_zero(&self) -> bool {
        if self.is_blockdev {
            return false;
        }
        match self.lseek(0, libc::SEEK_DATA) {
            Ok(data) => data >= self.size,
            // ENXIO: no data at or after offset 0.
            Err(e) => e.raw_os_error() == Some(libc::ENXIO),
        }
    }

    fn storage_id(&self) -> Option<(u64, u64)> {
        Some(self.storage_id)
    }

    fn as_file_driver(&self) -> Option<&FileDriver> {
        (!self.is_blockdev).then_some(self)
    }
}

/// Bytes of disk actually allocated to a file (`st_blocks * 512`): how sparse it is.
pub fn allocated_bytes(path: impl AsRef<Path>) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(
        miri,
        ignore = "real files: fallocate, SEEK_DATA, copy_file_range, O_DIRECT, fstatfs are not supported by Miri"
    )]
    fn create_is_sparse_and_status_follows_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let d = FileDriver::create(&p, 8 << 20).unwrap();
        assert_eq!(d.size(), 8 << 20);
        assert!(d.reads_as_zero());
        assert_eq!(d.block_status(0, 8 << 20).unwrap(), BlockStatus { len: 8 << 20, flags: StatusFlags::ZERO });
        d.write_at(&[7u8; 65536], 1 << 20).unwrap();
        assert!(!d.reads_as_zero());
        assert_eq!(d.block_status(0, 8 << 20).unwrap(), BlockStatus { len: 1 << 20, flags: StatusFlags::ZERO });
        let s = d.block_status(1 << 20, 7 << 20).unwrap();
        assert_eq!(s.flags, StatusFlags::DATA);
        assert!(s.len >= 65536);
        d.write_zeroes_at(1 << 20, 65536).unwrap();
        let mut b = vec![1u8; 65536];
        d.read_at(&mut b, 1 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(allocated_bytes(&p).unwrap(), 0);
        assert!(d.read_at(&mut [0u8; 2], (8 << 20) - 1).is_err());
        assert!(FileDriver::create(dir.path().join("z"), 0).is_err());
        let ro = FileDriver::open(&p, OpenFlags::empty()).unwrap();
        assert_eq!(ro.storage_id(), d.storage_id());
        assert!(ro.write_at(&[1], 0).is_err());
    }

    fn msg(e: &io::Error) -> String {
        e.to_string()
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "real files: fallocate, SEEK_DATA, copy_file_range, O_DIRECT, fstatfs are not supported by Miri"
    )]
    fn create_refuses_an_existing_path_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("source.img");
        std::fs::write(&p, [0x5a; 12345]).unwrap();
        let e = FileDriver::create(&p, 1 << 20).err().expect("create over an existing file must fail");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(errno_of(&e), libc::EEXIST);
        assert!(msg(&e).contains(&p.display().to_string()) && msg(&e).contains("OVERWRITE"), "{e}");
        let e = FileDriver::create_with(&p, 1 << 20, OpenFlags::WRITE | OpenFlags::DIRECT).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&p).unwrap(), vec![0x5a; 12345], "the existing file was changed");
        // A dangling symlink is a path that exists too: nothing is created behind it.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
        assert_eq!(FileDriver::create(&link, 4096).err().unwrap().kind(), io::ErrorKind::AlreadyExists);
        assert!(!dir.path().join("nowhere").exists());
        // On purpose: OVERWRITE truncates and resizes; the result reads as zeroes.
        let d = FileDriver::create_with(&p, 1 << 20, OpenFlags::OVERWRITE).unwrap();
        assert_eq!(d.size(), 1 << 20);
        assert!(d.reads_as_zero());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        assert_eq!(allocated_bytes(&p).unwrap(), 0);
        d.write_at(&[1; 4096], 0).unwrap(); // opened read-write without WRITE given
                                            // A create that fails after making the file leaves nothing behind.
        let big = dir.path().join("big.img");
        assert!(FileDriver::create(&big, u64::MAX).is_err());
        assert!(!big.exists(), "a failed create left its file");
        let e = FileDriver::create(dir.path().join("none/x.img"), 4096).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(msg(&e).starts_with("create ") && msg(&e).contains("none/x.img"), "{e}");
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "real files: fallocate, SEEK_DATA, copy_file_range, O_DIRECT, fstatfs are not supported by Miri"
    )]
    fn reads_as_zero_asks_the_file_not_a_flag() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.img");
        let fresh = FileDriver::create(&p, 4 << 20).unwrap();
        assert!(fresh.reads_as_zero());
        // Another handle writes: the first one must not claim zeroes any more.
        let other = FileDriver::open(&p, OpenFlags::WRITE).unwrap();
        other.write_at(&[0xee; 4096], 3 << 20).unwrap();
        assert!(!fresh.reads_as_zero());
        assert!(!other.reads_as_zero());
        other.write_zeroes_at(3 << 20, 4096).unwrap(); // a hole again
        assert!(fresh.reads_as_zero());
        // A file written with zero bytes has data extents: not claimed (the safe answer).
        let z = dir.path().join("z.img");
        std::fs::write(&z, vec![0u8; 1 << 20]).unwrap();
        assert!(!FileDriver::open(&z, OpenFlags::empty()).unwrap().reads_as_zero());
    }

    /// Run `f` on a thread; fail (instead of hanging the test run) if it blocks.
    fn promptly<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap_or_else(|_| panic!("{what} blocked"))
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "real files: fallocate, SEEK_DATA, copy_file_range, O_DIRECT, fstatfs are not supported by Miri"
    )]
    fn open_refuses_fifos_sockets_directories_and_char_devices_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let sock = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let cases = [
            (fifo.clone(), "FIFO"),
            (sock, "socket"),
            (dir.path().to_path_buf(), "directory"),
            (PathBuf::from("/dev/null"), "character device"),
        ];
        for (path, what) in cases {
            for flags in [OpenFlags::empty(), OpenFlags::WRITE, OpenFlags::WRITE | OpenFlags::DIRECT] {
                let p = path.clone();
                let e = promptly("open", move || FileDriver::open(&p, flags).err().expect("opened"));
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{}: {e}", path.display());
                assert_eq!(errno_of(&e), libc::EINVAL);
                assert!(msg(&e).contains(what) && msg(&e).contains(&path.display().to_string()), "{e}");
            }
        }
        // create: without OVERWRITE the path exists; with it, only a regular file is replaced.
        let p = fifo.clone();
        let e = promptly("create", move || FileDriver::create(&p, 4096).err().unwrap());
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        let p = fifo.clone();
        let e = promptly("create", move || FileDriver::create_with(&p, 4096, OpenFlags::OVERWRITE).err().unwrap());
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert!(msg(&e).contains("FIFO"), "{e}");
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        // OVERWRITE means nothing to open.
        let e = FileDriver::open("/dev/null", OpenFlags::OVERWRITE).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "real files: fallocate, SEEK_DATA, copy_file_range, O_DIRECT, fstatfs are not supported by Miri"
    )]
    fn errors_name_the_path_and_read_only_writes_say_how_to_write() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.img");
        let e = FileDriver::open(&missing, OpenFlags::empty()).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(errno_of(&e), libc::ENOENT);
        assert!(msg(&e).starts_with(&format!("open {}: ", missing.display())), "{e}");
        let p = dir.path().join("ro.img");
        std::fs::write(&p, [1u8; 8192]).unwrap();
        let ro = FileDriver::open(&p, OpenFlags::empty()).unwrap();
        assert_eq!(ro.path(), p);
        for e in [ro.write_at(&[1], 0).unwrap_err(), ro.write_zeroes_at(0, 4096).unwrap_err()] {
            assert_eq!(errno_of(&e), libc::EBADF, "{e}");
            assert!(msg(&e).contains("opened read-only") && msg(&e).contains("OpenFlags::WRITE"), "{e}");
            assert!(msg(&e).contains(&p.display().to_string()), "{e}");
        }
        let src = FileDriver::create(dir.path().join("src.img"), 8192).unwrap();
        let e = src.copy_range_to(&ro, 0, 4096).unwrap_err();
        assert_eq!(errno_of(&e), libc::EBADF);
        assert_eq!(std::fs::read(&p).unwrap(), vec![1u8; 8192]);
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "real files: fallocate, SEEK_DATA, copy_file_range, O_DIRECT, fstatfs are not supported by Miri"
    )]
    fn copy_range_to_copies_in_the_kernel_and_the_target_has_data() {
        let dir = tempfile::tempdir().unwrap();
        let a = FileDriver::create(dir.path().join("a"), 4 << 20).unwrap();
        let b = FileDriver::create(dir.path().join("b"), 4 << 20).unwrap();
        let data: Vec<u8> = (0..3 << 20).map(|i| (i * 7 + i / 4093) as u8).collect();
        a.write_at(&data, 12345).unwrap();
        assert!(b.reads_as_zero());
        a.copy_range_to(&b, 4096, 2 << 20).unwrap();
        assert!(!b.reads_as_zero());
        let mut back = vec![0u8; 4 << 20];
        b.read_at(&mut back, 0).unwrap();
        let mut want = vec![0u8; 4 << 20];
        a.read_at(&mut want[4096..4096 + (2 << 20)], 4096).unwrap();
        assert_eq!(back, want);
        assert!(a.copy_range_to(&b, 3 << 20, 2 << 20).is_err());
        assert!(a.as_file_driver().is_some());
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "real files: fallocate, SEEK_DATA, copy_file_range, O_DIRECT, fstatfs are not supported by Miri"
    )]
    fn direct_io_with_aligned_and_unaligned_requests() {
        // tmpfs may refuse O_DIRECT; use the crate's directory, which is on a disk filesystem.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let p = dir.path().join("img");
        let d = match FileDriver::create_with(&p, 1 << 20, OpenFlags::WRITE | OpenFlags::DIRECT) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipped: O_DIRECT not supported here: {e}");
                return;
            }
        };
        let mut buf = crate::buf::AlignedBuf::with_len(8192);
        let s = buf.slice_mut(8192);
        s.fill(0xab);
        d.write_at(s, 4096).unwrap();
        d.write_at(&[1, 2, 3], 4097).unwrap();
        let mut back = vec![0u8; 8];
        d.read_at(&mut back, 4094).unwrap();
        assert_eq!(back, [0, 0, 0xab, 1, 2, 3, 0xab, 0xab]);
    }

    /// Pages of `len` bytes at `offset` (page-aligned) of `file` in the page cache (mincore).
    fn resident_pages(file: &File, offset: u64, len: usize) -> usize {
        let page = 4096;
        // SAFETY: a shared read-only mapping of a file we hold open, never touched (so it
        // faults nothing in), queried with mincore and unmapped before returning.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            );
            assert_ne!(p, libc::MAP_FAILED, "mmap: {}", io::Error::last_os_error());
            let mut vec = vec![0u8; len.div_ceil(page)];
            let r = libc::mincore(p, len, vec.as_mut_ptr());
            let err = io::Error::last_os_error();
            libc::munmap(p, len);
            assert_eq!(r, 0, "mincore: {err}");
            vec.iter().filter(|&&v| v & 1 != 0).count()
        }
    }

    /// `read_at_cached` reads the same bytes as `read_at` and says `true` only when all of
    /// them were in the page cache: a page dropped from it makes the read `false`.
    #[test]
    #[cfg_attr(miri, ignore = "real files: preadv2, posix_fadvise, mmap and mincore are not supported by Miri")]
    fn read_at_cached_tells_page_cache_hits_from_device_reads() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let p = dir.path().join("img");
        let img: Vec<u8> = (0..4u32 << 18).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(&p, &img).unwrap();
        let d = FileDriver::open(&p, OpenFlags::empty()).unwrap();
        if d.in_memory() != Some(false) {
            eprintln!("skipped: the checkout is on tmpfs, whose pages cannot be dropped");
            return;
        }
        let mut buf = vec![0u8; 256 << 10];
        assert!(d.read_at_cached(&mut buf, 64 << 10).unwrap(), "just written: in the page cache");
        assert!(buf[..] == img[64 << 10..320 << 10]);
        // Written back and dropped: the pages of the range are no longer cached. The drop
        // is advisory (a page still in a per-CPU batch, or under writeback, stays), so it
        // is repeated until mincore(2) shows no page of the range resident.
        d.file.sync_all().unwrap();
        let mut tries = 0;
        while resident_pages(&d.file, 64 << 10, 256 << 10) > 0 {
            tries += 1;
            assert!(tries < 200, "the range's pages could not be dropped from the page cache");
            // SAFETY: posix_fadvise on a descriptor the driver owns; it reads no memory of ours.
            unsafe { libc::posix_fadvise(d.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        buf.fill(0);
        assert!(!d.read_at_cached(&mut buf, 64 << 10).unwrap(), "dropped pages are read from the device");
        assert!(buf[..] == img[64 << 10..320 << 10], "the bytes are the file's either way");
        // Out of range: the same error as read_at, nothing read.
        let e = d.read_at_cached(&mut buf, (1 << 20) - 4096).unwrap_err();
        assert_eq!(e.raw_os_error(), d.read_at(&mut buf, (1 << 20) - 4096).unwrap_err().raw_os_error());
    }
}
