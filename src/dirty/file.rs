//! `BitmapFile`: the file of a persistent bitmap opened by path, locked with
//! `flock(LOCK_EX | LOCK_NB)` for as long as it is open (one opener, across processes and
//! within one: the lock belongs to the open file description), and created (mode 0600 by
//! default, never through a symlink) under a temporary name then renamed into place (never
//! over an existing file) by `crate::fs`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use crate::driver::BlockDriver;
use crate::error::{errno_of, Error, ErrorKind, Result};
use crate::fs::{self, CreateMode};

/// A locked bitmap file: positional I/O, `fdatasync` as flush.
pub(super) struct BitmapFile {
    file: File,
    size: u64,
    id: (u64, u64),
}

fn io_error(path: &Path, what: &str, e: &io::Error) -> Error {
    Error::new(ErrorKind::Io, errno_of(e), format!("dirty bitmap file {}: {what}: {e}", path.display()))
}

impl BitmapFile {
    fn from_file(path: &Path, file: File) -> Result<BitmapFile> {
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::new(
                    ErrorKind::Busy,
                    libc::EBUSY,
                    format!(
                        "dirty bitmap file {} is already open (locked by another process or handle)",
                        path.display()
                    ),
                ));
            }
            return Err(io_error(path, "cannot lock", &e));
        }
        let meta = file.metadata().map_err(|e| io_error(path, "cannot stat", &e))?;
        if !meta.file_type().is_file() {
            return Err(Error::invalid(format!("dirty bitmap file {}: not a regular file", path.display())));
        }
        Ok(BitmapFile { file, size: meta.len(), id: (meta.dev(), meta.ino()) })
    }

    /// Open and lock an existing bitmap file. Errors: the open's errno (ENOENT...), `Busy`
    /// (EBUSY) when locked, `InvalidInput` for something other than a regular file.
    pub(super) fn open(path: &Path) -> Result<BitmapFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| io_error(path, "cannot open", &e))?;
        BitmapFile::from_file(path, file)
    }

    /// Create `path` as a `len`-byte file filled by `build`, atomically, with the permission
    /// bits `mode` (applied exactly, whatever the umask): the file is made (`O_EXCL |
    /// O_NOFOLLOW`, random name) and built under a temporary name in the same directory, then
    /// renamed to `path` without replacing anything (EEXIST when anything is there, a
    /// dangling symlink included) and the directory is synced (see `crate::fs`). On any
    /// error the temporary file is removed and `path` is untouched.
    pub(super) fn create<T>(
        path: &Path,
        len: u64,
        mode: u32,
        build: impl FnOnce(Arc<dyn BlockDriver>) -> Result<T>,
    ) -> Result<T> {
        let exists =
            || Error::new(ErrorKind::Io, libc::EEXIST, format!("dirty bitmap file {} already exists", path.display()));
        fs::check_mode(mode).map_err(|e| Error::invalid(format!("dirty bitmap file {}: {e}", path.display())))?;
        // Fail early, before building anything; the rename decides in the end.
        if path.symlink_metadata().is_ok() {
            return Err(exists());
        }
        let mut build_error = None;
        let published = fs::publish(path, CreateMode { mode, overwrite: false }, |file, _| {
            file.set_len(len)?;
            // A second descriptor of the same open file description: the lock taken through it
            // stays with the file after the rename.
            let built = file
                .try_clone()
                .map_err(|e| io_error(path, "cannot duplicate the descriptor", &e))
                .and_then(|f| BitmapFile::from_file(path, f))
                .and_then(|f| build(Arc::new(f)));
            built.map_err(|e| {
                build_error = Some(e);
                io::Error::from_raw_os_error(libc::ECANCELED)
            })
        });
        match published {
            Ok((_, t)) => Ok(t),
            Err(_) if build_error.is_some() => Err(build_error.take().expect("checked")),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(exists()),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                Err(Error::invalid(format!("dirty bitmap file {}: {e}", path.display())))
            }
            Err(e) => Err(io_error(path, "cannot create", &e)),
        }
    }
}

impl BlockDriver for BitmapFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn storage_id(&self) -> Option<(u64, u64)> {
        Some(self.id)
    }
}
