//! `BitmapFile`: the file of a persistent bitmap opened by path, locked with
//! `flock(LOCK_EX | LOCK_NB)` for as long as it is open (one opener, across processes and
//! within one: the lock belongs to the open file description), and created under a
//! temporary name then linked into place (never over an existing file).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::driver::BlockDriver;
use crate::error::{errno_of, Error, ErrorKind, Result};

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

    /// Create `path` as a `len`-byte file filled by `build`, atomically: the file is made and
    /// built under a temporary name in the same directory, then hard-linked to `path` (which
    /// fails with EEXIST rather than replace anything) and the directory is synced.
    pub(super) fn create<T>(path: &Path, len: u64, build: impl FnOnce(Arc<dyn BlockDriver>) -> Result<T>) -> Result<T> {
        if path.symlink_metadata().is_ok() {
            return Err(Error::new(
                ErrorKind::Io,
                libc::EEXIST,
                format!("dirty bitmap file {} already exists", path.display()),
            ));
        }
        let name = path
            .file_name()
            .ok_or_else(|| Error::invalid(format!("dirty bitmap file {}: not a file name", path.display())))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let tmp = dir.join(format!(
            ".{}.cowbackup-tmp.{}.{}",
            name.to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| io_error(path, "cannot create", &e))?;
        let built = (|| {
            file.set_len(len).map_err(|e| io_error(path, "cannot size", &e))?;
            let f = BitmapFile::from_file(path, file)?;
            let t = build(Arc::new(f))?;
            std::fs::hard_link(&tmp, path).map_err(|e| {
                if e.raw_os_error() == Some(libc::EEXIST) {
                    Error::new(
                        ErrorKind::Io,
                        libc::EEXIST,
                        format!("dirty bitmap file {} already exists", path.display()),
                    )
                } else {
                    io_error(path, "cannot link the new file into place", &e)
                }
            })?;
            Ok(t)
        })();
        let _ = std::fs::remove_file(&tmp);
        let t = built?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| io_error(path, "cannot sync the directory", &e))?;
        Ok(t)
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
