//! `FileDriver`: raw image files and block devices.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::buf::IO_ALIGN;
use crate::driver::{BlockDriver, BlockStatus, StatusFlags};

bitflags::bitflags! {
    /// How [`FileDriver::open`] opens a file. Same values as `COWBACKUP_OPEN_*` in C.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct OpenFlags: u32 {
        /// Open read-write (a target, or a source the host writes to through this driver).
        const WRITE = 1;
        /// Bypass the page cache with `O_DIRECT` for aligned requests.
        const DIRECT = 2;
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
/// - `flush` is `fdatasync`.
/// - With [`OpenFlags::DIRECT`], requests whose buffer, offset and length are aligned
///   to 4 KiB go through an `O_DIRECT` descriptor; the rest go through a second,
///   buffered descriptor of the same file (the kernel keeps the two coherent). The
///   job's own buffers are always aligned.
pub struct FileDriver {
    file: File,
    direct: Option<File>,
    size: u64,
    is_blockdev: bool,
    storage_id: (u64, u64),
    /// Set by [`FileDriver::create`], cleared by the first data write.
    fresh: AtomicBool,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl FileDriver {
    /// Open an existing image file or block device. The size is the file's length, or
    /// for a block device the device's size (`BLKGETSIZE64`).
    pub fn open(path: impl AsRef<Path>, flags: OpenFlags) -> io::Result<FileDriver> {
        let path = path.as_ref();
        let write = flags.contains(OpenFlags::WRITE);
        let file = OpenOptions::new().read(true).write(write).open(path)?;
        let direct = if flags.contains(OpenFlags::DIRECT) {
            Some(OpenOptions::new().read(true).write(write).custom_flags(libc::O_DIRECT).open(path)?)
        } else {
            None
        };
        FileDriver::from_files(file, direct, false)
    }

    /// Create (or truncate) `path` as a sparse file of `size` bytes and open it
    /// read-write. The new file reads as zeroes, so a job backing up into it skips
    /// zero clusters entirely. `size` must be non-zero.
    pub fn create(path: impl AsRef<Path>, size: u64) -> io::Result<FileDriver> {
        FileDriver::create_with(path, size, OpenFlags::WRITE)
    }

    /// [`FileDriver::create`] with open flags (e.g. [`OpenFlags::DIRECT`]).
    pub fn create_with(path: impl AsRef<Path>, size: u64, flags: OpenFlags) -> io::Result<FileDriver> {
        if size == 0 {
            return Err(invalid("device size must not be 0".into()));
        }
        let path = path.as_ref();
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        file.set_len(size)?;
        let direct = if flags.contains(OpenFlags::DIRECT) {
            Some(OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path)?)
        } else {
            None
        };
        FileDriver::from_files(file, direct, true)
    }

    fn from_files(file: File, direct: Option<File>, fresh: bool) -> io::Result<FileDriver> {
        let meta = file.metadata()?;
        let is_blockdev = meta.file_type().is_block_device();
        let (size, storage_id) = if is_blockdev {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            (size, (u64::MAX, meta.rdev()))
        } else if meta.file_type().is_file() {
            (meta.len(), (meta.dev(), meta.ino()))
        } else {
            return Err(invalid("not a regular file or block device".into()));
        };
        Ok(FileDriver { file, direct, size, is_blockdev, storage_id, fresh: AtomicBool::new(fresh) })
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
        target.fresh.store(false, Ordering::Release);
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
        self.fresh.store(false, Ordering::Release);
        self.fd_for(buf.as_ptr(), buf.len(), offset).write_all_at(buf, offset)
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
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

    fn reads_as_zero(&self) -> bool {
        self.fresh.load(Ordering::Acquire)
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

    #[test]
    fn copy_range_to_copies_in_the_kernel_and_marks_the_target_written() {
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
}
