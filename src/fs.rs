//! The one place that creates files: targets, persistent bitmaps, manifests and status files.
//!
//! Every file the library creates is made so that no other user of the machine can take it
//! over, read it, or make the library write somewhere else:
//! - **mode 0600 by default**, applied exactly: the file is created with 0600 (the umask can
//!   only narrow that) and then set with `fchmod` to the mode the caller asked for, so the
//!   result does not depend on the umask (a umask of 000 cannot make a backup
//!   world-writable, a umask of 077 cannot hide a file the caller widened on purpose). Only
//!   the permission bits 0o777 are accepted (no setuid, setgid or sticky bit);
//! - **`O_NOFOLLOW` at the last component**: a symbolic link at the path is never followed
//!   (earlier components are, as the caller named them);
//! - **`O_EXCL`**: a new file is never opened over an existing one, so a file (or a dangling
//!   symlink) planted in advance by someone else is never adopted;
//! - **temp file + rename in the same directory** where a file is published or replaced: the
//!   content is written and synced under a fresh random name made with `O_EXCL`, then renamed
//!   into place (`renameat2(RENAME_NOREPLACE)` for a new file, plain `rename` to replace one;
//!   `rename` replaces a symlink at the path, it never writes through it), and the directory
//!   is synced. On any error the temp file is removed and the path is untouched.
//!
//! All functions are thread-safe; temp names are random, so concurrent calls (in this process
//! or others) never collide.

use std::ffi::{CString, OsString};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// The mode of every file the library creates (backups, bitmap files) unless the caller asks
/// for another one (`FileDriver::create_with_mode`, `DirtyBitmap::create_with_mode`): 0o600,
/// read and write for the owner only.
pub const DEFAULT_FILE_MODE: u32 = 0o600;

/// Options for creating a file. Default: mode 0o600, no overwrite, don't follow symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CreateMode {
    /// Permission bits of the new file (0o000..=0o777), applied exactly (the umask is ignored).
    pub mode: u32,
    /// Replace an existing file at the path (by rename, never by writing through it).
    pub overwrite: bool,
}

impl Default for CreateMode {
    fn default() -> CreateMode {
        CreateMode { mode: DEFAULT_FILE_MODE, overwrite: false }
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// `InvalidInput` unless `mode` has only permission bits (0o777).
pub(crate) fn check_mode(mode: u32) -> io::Result<()> {
    if mode & !0o777 != 0 {
        return Err(invalid(format!(
            "file mode {mode:#o} is invalid: only the permission bits 0o777 may be set (no setuid, setgid or sticky bit)"
        )));
    }
    Ok(())
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| invalid(format!("{}: path contains a NUL byte", p.display())))
}

/// `fchmod(file, mode)`.
fn set_mode(file: &File, mode: u32) -> io::Result<()> {
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// The directory and the last component of `path`, which must name a file (not end in `/`,
/// `.` or `..`). A bare name is in `.`.
pub(crate) fn split(path: &Path) -> io::Result<(PathBuf, OsString)> {
    let bytes = path.as_os_str().as_bytes();
    let name = match path.components().next_back() {
        Some(Component::Normal(n)) if !bytes.ends_with(b"/") && !bytes.ends_with(b"/.") => n.to_os_string(),
        _ => return Err(invalid(format!("{}: not a file name (the path must end in a file name)", path.display()))),
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

/// Remove `path` only if it still names the file `id` (device, inode): never someone else's
/// file that replaced ours meanwhile. Errors are ignored (this is clean-up).
fn remove_if_ours(path: &Path, id: (u64, u64)) {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if (m.dev(), m.ino()) == id {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Create `path` as a new file: `O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC` (+ `extra_flags`, e.g.
/// `O_DIRECT`), opened read-write, then `fchmod` to `mode` exactly (the file is created 0600,
/// narrowed by the umask, and only then set to `mode`, so it is never wider than asked, even for
/// an instant, and the umask does not change the result).
///
/// Errors: `AlreadyExists` (EEXIST) when anything exists at `path`, a dangling symlink
/// included; `InvalidInput` for a mode outside 0o777; the open's errno otherwise (ENOENT for
/// a missing directory, EACCES...). When setting the mode fails the new file is removed again.
pub(crate) fn create_new(path: &Path, mode: u32, extra_flags: i32) -> io::Result<File> {
    check_mode(mode)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(DEFAULT_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | extra_flags)
        .open(path)?;
    let meta = file.metadata()?;
    if let Err(e) = set_mode(&file, mode) {
        drop(file);
        remove_if_ours(path, (meta.dev(), meta.ino()));
        return Err(e);
    }
    Ok(file)
}

/// Random hex for temp names (`getrandom`; the clock and a counter where it is missing).
fn random_suffix() -> String {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`, which is valid for writes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    let v = if n == b.len() as isize {
        u64::from_ne_bytes(b)
    } else {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ (u64::from(std::process::id()) << 32)
            ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    };
    format!("{v:016x}")
}

/// A new temp file in `dir` for the final name `name`: `.NAME.cowbackup-tmp.RANDOM`, made by
/// [`create_new`] (so never an existing file or a symlink). Returns the file and its path.
pub(crate) fn create_temp(dir: &Path, name: &std::ffi::OsStr, mode: u32) -> io::Result<(File, PathBuf)> {
    let mut last = None;
    for _ in 0..16 {
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".cowbackup-tmp.{}", random_suffix()));
        // Keep the name within NAME_MAX: cut the final name, never the random part.
        let bytes = tmp_name.into_vec();
        let tmp_name = if bytes.len() > 255 {
            let keep = 255 - 32;
            let mut v = bytes[..keep.min(bytes.len())].to_vec();
            v.extend_from_slice(format!(".cowbackup-tmp.{}", random_suffix()).as_bytes());
            OsString::from_vec(v)
        } else {
            OsString::from_vec(bytes)
        };
        let tmp = dir.join(tmp_name);
        match create_new(&tmp, mode, 0) {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EEXIST)))
}

/// Rename `from` to `to` without replacing anything at `to`: `renameat2(RENAME_NOREPLACE)`, or
/// where the filesystem lacks it, `link` + `unlink` (both fail with EEXIST when `to` exists, a
/// dangling symlink included).
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: two valid NUL-terminated paths; plain syscall.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // The filesystem (or kernel) has no RENAME_NOREPLACE.
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => link_then_unlink(from, to),
        _ => Err(e),
    }
}

/// The fallback of [`rename_noreplace`]: `link(from, to)` (which never replaces anything and
/// never follows a symlink at either end), then `unlink(from)`.
fn link_then_unlink(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::hard_link(from, to)?;
    let _ = std::fs::remove_file(from);
    Ok(())
}

/// fsync of a directory (makes a create, rename or unlink in it durable).
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    let d = OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(dir)?;
    d.sync_all()
}

/// The engine of [`write_new_atomically`] and [`replace_atomically`], keeping the open file
/// (it names `path` on success) and what `write` returned. `write` also gets the temp file's
/// path (e.g. to open a second descriptor of it with other flags, `O_NOFOLLOW` included).
///
/// Errors: as [`write_new_atomically`]. The one error after which the file stays in place is
/// the final sync of the directory (EIO...): the rename happened, only its durability is in
/// doubt, and removing the complete file then would lose more than it saves.
pub(crate) fn publish<T>(
    path: &Path,
    how: CreateMode,
    write: impl FnOnce(&mut File, &Path) -> io::Result<T>,
) -> io::Result<(File, T)> {
    check_mode(how.mode)?;
    let (dir, name) = split(path)?;
    let (mut file, tmp) = create_temp(&dir, &name, how.mode)?;
    let done = (|| {
        let t = write(&mut file, &tmp)?;
        file.sync_all()?;
        if how.overwrite {
            // rename() replaces what is at `path` (a file, or a symlink itself): it never
            // follows a symlink there.
            std::fs::rename(&tmp, path)?;
        } else {
            rename_noreplace(&tmp, path)?;
        }
        Ok(t)
    })();
    match done {
        Ok(t) => {
            fsync_dir(&dir)?;
            Ok((file, t))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Writes a new file atomically, never over an existing one: temp file (O_EXCL, random name) in
/// the same directory, `write` fills it, fsync, rename without replacing (renameat2
/// RENAME_NOREPLACE, fallback link()+unlink() when the filesystem lacks it) → EEXIST if `path`
/// exists, fsync of the directory. On any error the temp file is removed and `path` untouched.
/// (The writer of manifests and status files; targets and bitmaps use [`publish`].)
///
/// Errors: `AlreadyExists` (EEXIST) when anything exists at `path` (a dangling symlink too);
/// `InvalidInput` for a bad mode or a path that does not end in a file name; the errno of
/// creating, writing, syncing or renaming; `write`'s error as it returned it (see [`publish`]
/// for the directory sync).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn write_new_atomically(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    publish(path, CreateMode { mode, overwrite: false }, |f, _| write(f)).map(|_| ())
}

/// Same as [`write_new_atomically`] but replaces an existing `path` (plain rename), never
/// following a symlink at `path` (the symlink itself is replaced; what it points to is
/// untouched). Renaming over a directory fails (EISDIR).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn replace_atomically(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    publish(path, CreateMode { mode, overwrite: true }, |f, _| write(f)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::symlink;

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("cowbackup-tmp"))
            .collect()
    }

    #[test]
    fn create_new_is_exclusive_nofollow_and_exact_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a");
        let f = create_new(&p, 0o640, 0).unwrap();
        drop(f);
        assert_eq!(mode_of(&p), 0o640);
        assert_eq!(create_new(&p, 0o600, 0).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let link = d.path().join("link");
        symlink(&victim, &link).unwrap();
        assert_eq!(create_new(&link, 0o600, 0).unwrap_err().raw_os_error(), Some(libc::EEXIST));
        let dangling = d.path().join("dangling");
        symlink(d.path().join("nowhere"), &dangling).unwrap();
        assert_eq!(create_new(&dangling, 0o600, 0).unwrap_err().raw_os_error(), Some(libc::EEXIST));
        assert!(!d.path().join("nowhere").exists());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(create_new(&d.path().join("b"), 0o4755, 0).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert!(!d.path().join("b").exists());
    }

    #[test]
    fn write_new_never_replaces_and_cleans_up() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m");
        write_new_atomically(&p, 0o600, |f| f.write_all(b"one")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        assert_eq!(mode_of(&p), 0o600);
        let e = write_new_atomically(&p, 0o600, |f| f.write_all(b"two")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        let e = write_new_atomically(&d.path().join("n"), 0o600, |_| Err(io::Error::other("refused"))).unwrap_err();
        assert_eq!(e.to_string(), "refused");
        assert!(!d.path().join("n").exists());
        // A symlink (dangling or not) at the path is never followed nor replaced.
        let dangling = d.path().join("dangling");
        symlink(d.path().join("nowhere"), &dangling).unwrap();
        let e = write_new_atomically(&dangling, 0o600, |f| f.write_all(b"x")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        assert!(!d.path().join("nowhere").exists());
        assert!(leftovers(d.path()).is_empty(), "{:?}", leftovers(d.path()));
    }

    #[test]
    fn replace_replaces_the_link_not_its_target() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = d.path().join("link");
        symlink(&victim, &link).unwrap();
        replace_atomically(&link, 0o644, |f| f.write_all(b"new")).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_file());
        assert_eq!(std::fs::read(&link).unwrap(), b"new");
        assert_eq!(mode_of(&link), 0o644);
        // An error leaves the old file in place and no temp file behind.
        let e = replace_atomically(&link, 0o600, |f| {
            f.write_all(b"half")?;
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        })
        .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(std::fs::read(&link).unwrap(), b"new");
        assert!(leftovers(d.path()).is_empty());
        // Over a directory: refused, nothing left.
        std::fs::create_dir(d.path().join("dir")).unwrap();
        assert!(replace_atomically(&d.path().join("dir"), 0o600, |_| Ok(())).is_err());
        assert!(leftovers(d.path()).is_empty());
    }

    #[test]
    fn the_link_fallback_never_replaces() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, b"new").unwrap();
        std::fs::write(&b, b"old").unwrap();
        assert_eq!(link_then_unlink(&a, &b).unwrap_err().raw_os_error(), Some(libc::EEXIST));
        assert_eq!(std::fs::read(&b).unwrap(), b"old");
        let dangling = d.path().join("dangling");
        symlink(d.path().join("nowhere"), &dangling).unwrap();
        assert_eq!(link_then_unlink(&a, &dangling).unwrap_err().raw_os_error(), Some(libc::EEXIST));
        assert!(!d.path().join("nowhere").exists());
        let c = d.path().join("c");
        link_then_unlink(&a, &c).unwrap();
        assert!(!a.exists());
        assert_eq!(std::fs::read(&c).unwrap(), b"new");
    }

    #[test]
    fn concurrent_writers_of_one_path_one_wins_nothing_left_behind() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("contended");
        let results: Vec<io::Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8u8)
                .map(|i| {
                    let p = &p;
                    s.spawn(move || write_new_atomically(p, 0o600, |f| f.write_all(&[i; 4096])))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(r.raw_os_error(), Some(libc::EEXIST));
        }
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), 4096);
        assert!(data.iter().all(|&b| b == data[0]), "the file is one writer's, whole");
        assert!(leftovers(d.path()).is_empty());
    }

    #[test]
    fn long_names_get_temp_names_within_name_max() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("n".repeat(250));
        write_new_atomically(&p, 0o600, |f| f.write_all(b"x")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"x");
        assert!(leftovers(d.path()).is_empty());
    }

    #[test]
    fn paths_that_name_no_file_are_refused() {
        for p in ["/", "..", "a/..", "dir/", ".", "a/.", ""] {
            assert_eq!(split(Path::new(p)).unwrap_err().kind(), io::ErrorKind::InvalidInput, "{p}");
        }
        assert_eq!(split(Path::new("x")).unwrap(), (PathBuf::from("."), OsString::from("x")));
        assert_eq!(split(Path::new("/a/b")).unwrap(), (PathBuf::from("/a"), OsString::from("b")));
    }

    #[test]
    fn fsync_dir_works_and_refuses_files() {
        let d = tempfile::tempdir().unwrap();
        fsync_dir(d.path()).unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"").unwrap();
        assert_eq!(fsync_dir(&f).unwrap_err().raw_os_error(), Some(libc::ENOTDIR));
    }
}
