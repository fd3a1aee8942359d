//! The one place that creates files safely: mode given by the caller (0600 for what the
//! library writes), `O_NOFOLLOW` at the last component, `O_EXCL` unless replacing was
//! asked, and whole files published by `rename` from a temporary file in the same
//! directory, with the data and the directory made durable.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{}: path contains NUL", path.display())))
}

/// Create `path` as a new file (`O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_RDWR` plus
/// `extra_flags`) with permission bits `mode` (before the umask). `AlreadyExists` when the
/// path exists, also as a symbolic link. Thread-safe.
pub(crate) fn create_new(path: &Path, mode: u32, extra_flags: i32) -> io::Result<File> {
    let c = c_path(path)?;
    let flags = libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_RDWR | extra_flags;
    // SAFETY: a NUL-terminated path; open returns a new descriptor or -1.
    let fd = unsafe { libc::open(c.as_ptr(), flags, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor we own from here on.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The directory holding `path` ("." for a bare name).
fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Make the directory entries of `dir` durable (`fsync` of the directory).
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write a temporary file next to `path` with `write`, fsync it, and return its path.
fn write_temp(path: &Path, mode: u32, write: impl FnOnce(&mut File) -> io::Result<()>) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a file name", path.display())))?;
    let dir = parent_of(path);
    let mut n = 0u32;
    loop {
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}-{n}", std::process::id()));
        let tmp = dir.join(tmp_name);
        match create_new(&tmp, mode, 0) {
            Ok(mut f) => {
                let r = write(&mut f).and_then(|()| f.sync_all());
                if let Err(e) = r {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                return Ok(tmp);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Publish a new file at `path` whole or not at all: written by `write` into a temporary
/// file in the same directory (mode `mode`), fsynced, renamed to `path` without replacing
/// anything (`renameat2(RENAME_NOREPLACE)`: `AlreadyExists` when `path` exists, and the
/// temporary file is removed), then the directory fsynced. A crash leaves either no file
/// at `path` or the complete one (and maybe a `.NAME.tmp-*` file to clean up).
pub(crate) fn write_new_atomically(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = write_temp(path, mode, write)?;
    let (a, b) = (c_path(&tmp)?, c_path(path)?);
    // SAFETY: two NUL-terminated paths relative to the current directory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(&parent_of(path))
}

/// Like [`write_new_atomically`] but replace `path` if it exists (plain `rename`).
#[allow(dead_code)] // for the bitmap and status files; src/fs.rs of the safe-files work uses it
pub(crate) fn replace_atomically(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = write_temp(path, mode, write)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(&parent_of(path))
}
