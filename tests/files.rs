//! Files no one else can hijack (issue 23): the backups and bitmap files the library creates
//! are 0600 whatever the umask (or exactly the mode asked for), a symlink at the path is never
//! followed (with or without OVERWRITE, dangling or not), a file pre-created by another user is
//! never adopted, OVERWRITE replaces by rename (never writes through the path) and opens a
//! block device without replacing it, and a failed create leaves no temporary file behind.
//!
//! The attacks by a second, unprivileged user run as `cbatk` (created with useradd when
//! missing); they are skipped, with the reason printed, when the tests do not run as root.
//! The block-device case needs a loop device (skipped with the reason when there is none).

use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use cowbackup::{BlockDriver, DirtyBitmap, FileDriver, OpenFlags, DEFAULT_FILE_MODE};

const MIB: u64 = 1 << 20;

/// The umask is per process: the tests that set it do so under this lock and restore it.
static UMASK: Mutex<()> = Mutex::new(());

fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
    let _g = UMASK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: umask only swaps the process's file creation mask.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    r.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Names in `dir` that look like a temporary file of ours.
fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("cowbackup-tmp"))
        .collect()
}

fn errno(e: &std::io::Error) -> i32 {
    cowbackup::errno_of(e)
}

#[test]
fn modes_are_0600_whatever_the_umask_and_exactly_what_was_asked() {
    let dir = tempfile::tempdir().unwrap();
    for mask in [0o000, 0o022, 0o077] {
        with_umask(mask, || {
            let b = dir.path().join(format!("backup-{mask:03o}.raw"));
            let bm = dir.path().join(format!("disk-{mask:03o}.bitmap"));
            drop(FileDriver::create(&b, MIB).unwrap());
            drop(DirtyBitmap::create(&bm, MIB, 65536).unwrap());
            assert_eq!(mode_of(&b), DEFAULT_FILE_MODE, "backup under umask {mask:03o}");
            assert_eq!(mode_of(&bm), 0o600, "bitmap under umask {mask:03o}");
            // Widened on purpose: exactly that mode, the umask neither widens nor narrows it.
            let w = dir.path().join(format!("wide-{mask:03o}.raw"));
            drop(FileDriver::create_with_mode(&w, MIB, OpenFlags::DIRECT, 0o640).unwrap());
            assert_eq!(mode_of(&w), 0o640, "create_with_mode under umask {mask:03o}");
            let wb = dir.path().join(format!("wide-{mask:03o}.bitmap"));
            drop(DirtyBitmap::create_with_mode(&wb, MIB, 65536, 0o644).unwrap());
            assert_eq!(mode_of(&wb), 0o644);
            // An overwritten file gets the new mode, not the old file's.
            fs::set_permissions(&w, fs::Permissions::from_mode(0o666)).unwrap();
            drop(FileDriver::create_with(&w, MIB, OpenFlags::OVERWRITE).unwrap());
            assert_eq!(mode_of(&w), 0o600);
        });
    }
    // Bits outside 0o777 are refused, nothing is created.
    let bad = dir.path().join("setuid.raw");
    let e = FileDriver::create_with_mode(&bad, MIB, OpenFlags::empty(), 0o4755).err().unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    assert!(DirtyBitmap::create_with_mode(&bad, MIB, 65536, 0o1777).is_err());
    assert!(!bad.exists());
    assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
}

#[test]
fn a_symlink_at_the_target_path_is_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim.db");
    fs::write(&victim, b"precious data\n").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    let before = fs::metadata(&victim).unwrap();
    let link = dir.path().join("backup.raw");
    symlink(&victim, &link).unwrap();

    // Without OVERWRITE: EEXIST, as for any existing path.
    let e = FileDriver::create(&link, MIB).err().unwrap();
    assert_eq!(errno(&e), libc::EEXIST, "{e}");
    // With OVERWRITE: ELOOP, the link and what it points to are left alone.
    let e = FileDriver::create_with(&link, MIB, OpenFlags::OVERWRITE | OpenFlags::DIRECT).err().unwrap();
    assert_eq!(errno(&e), libc::ELOOP, "{e}");
    assert!(e.to_string().contains("symbolic link") && e.to_string().contains(&*link.to_string_lossy()), "{e}");
    // Bitmaps: EEXIST.
    let e = DirtyBitmap::create(&link, MIB, 65536).err().unwrap();
    assert_eq!(e.errno(), libc::EEXIST, "{e}");

    let after = fs::metadata(&victim).unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"precious data\n");
    assert_eq!((after.len(), after.mode(), after.ino()), (before.len(), before.mode(), before.ino()));
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
}

#[test]
fn a_dangling_symlink_is_never_followed_nor_created_through() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("created-through-the-link");
    let link = dir.path().join("backup.raw");
    symlink(&nowhere, &link).unwrap();
    assert_eq!(errno(&FileDriver::create(&link, MIB).err().unwrap()), libc::EEXIST);
    assert_eq!(errno(&FileDriver::create_with(&link, MIB, OpenFlags::OVERWRITE).err().unwrap()), libc::ELOOP);
    assert_eq!(DirtyBitmap::create(&link, MIB, 65536).err().unwrap().errno(), libc::EEXIST);
    assert!(!nowhere.exists(), "a file was created through the dangling link");
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert!(leftovers(dir.path()).is_empty());
}

#[test]
fn overwrite_replaces_by_rename_and_never_writes_through_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backup.raw");
    fs::write(&path, vec![0x5a; 3 * MIB as usize]).unwrap();
    // Someone holding the old file (open, or by a second hard link) never sees the new data.
    let mut held = fs::File::open(&path).unwrap();
    let other_link = dir.path().join("other-link");
    fs::hard_link(&path, &other_link).unwrap();
    let d = FileDriver::create_with(&path, MIB, OpenFlags::OVERWRITE).unwrap();
    assert_eq!(d.size(), MIB);
    let mut buf = vec![0xffu8; 4096];
    d.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "the new file reads as zeroes");
    d.write_at(b"DISK-CONTENT", 0).unwrap();
    d.flush().unwrap();
    drop(d);
    let mut old = Vec::new();
    held.read_to_end(&mut old).unwrap();
    assert_eq!(old, vec![0x5a; 3 * MIB as usize]);
    assert_eq!(fs::read(&other_link).unwrap(), vec![0x5a; 3 * MIB as usize]);
    assert_eq!(&fs::read(&path).unwrap()[..12], b"DISK-CONTENT");
    assert_ne!(fs::metadata(&path).unwrap().ino(), fs::metadata(&other_link).unwrap().ino());
    // Not a file: refused, untouched.
    let sub = dir.path().join("sub");
    fs::create_dir(&sub).unwrap();
    let e = FileDriver::create_with(&sub, MIB, OpenFlags::OVERWRITE).err().unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    assert!(sub.is_dir());
    assert!(leftovers(dir.path()).is_empty());
}

#[test]
fn a_failed_create_leaves_no_temporary_file_and_the_path_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("too-big.raw");
    // Sizing fails (beyond any file size): nothing at the path, no temp file.
    let e = FileDriver::create(&path, u64::MAX).err().unwrap();
    assert!(matches!(errno(&e), libc::EFBIG | libc::EINVAL), "{e}");
    assert!(fs::symlink_metadata(&path).is_err());
    // The same over an existing file with OVERWRITE: the old file stays as it was.
    fs::write(&path, b"old contents").unwrap();
    assert!(FileDriver::create_with(&path, u64::MAX, OpenFlags::OVERWRITE).is_err());
    assert_eq!(fs::read(&path).unwrap(), b"old contents");
    // A missing directory: ENOENT, nothing anywhere.
    let e = FileDriver::create(dir.path().join("missing/x.raw"), MIB).err().unwrap();
    assert_eq!(errno(&e), libc::ENOENT, "{e}");
    // A path that names no file.
    let e = FileDriver::create(format!("{}/", dir.path().display()), MIB).err().unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// The unprivileged attacker: uid and gid of `cbatk`, created when missing. `Err(reason)` when
/// that is not possible (not root, no useradd).
fn attacker() -> Result<(u32, u32), String> {
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root: cannot act as a second user".into());
    }
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").arg(flag).arg("cbatk").output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok().filter(|_| out.status.success())
    };
    for _ in 0..20 {
        if let (Some(u), Some(g)) = (id("-u"), id("-g")) {
            return Ok((u, g));
        }
        // Several test programs may add it at once: useradd then fails on its lock; retry.
        let _ = Command::new("useradd").args(["-M", "-s", "/bin/sh", "cbatk"]).output();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err("cannot create the user cbatk (useradd)".into())
}

/// Run `script` with `sh -c` as `uid:gid`; true when it succeeded.
fn as_user((uid, gid): (u32, u32), script: &str) -> bool {
    Command::new("sh").arg("-c").arg(script).uid(uid).gid(gid).env("HOME", "/").status().unwrap().success()
}

/// A shared directory like /tmp (mode 1777) that `cbatk` can reach, or `Err(reason)`.
fn shared_dir(user: (u32, u32)) -> Result<(tempfile::TempDir, PathBuf), String> {
    let d = tempfile::tempdir().map_err(|e| e.to_string())?;
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o1777)).map_err(|e| e.to_string())?;
    let p = d.path().to_path_buf();
    if !as_user(user, &format!("test -w '{}' && test -x '{}'", p.display(), p.display())) {
        return Err(format!("cbatk cannot reach {} (a parent directory is closed to others)", p.display()));
    }
    Ok((d, p))
}

#[test]
fn another_users_planted_files_and_links_are_never_adopted_nor_followed() {
    let user = match attacker() {
        Ok(u) => u,
        Err(why) => return eprintln!("skipped: {why}"),
    };
    let (_keep, dir) = match shared_dir(user) {
        Ok(d) => d,
        Err(why) => return eprintln!("skipped: {why}"),
    };
    // A root-owned file the attacker would like to see clobbered.
    let victim_dir = tempfile::tempdir().unwrap();
    let victim = victim_dir.path().join("root-owned.db");
    fs::write(&victim, b"precious root data\n").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    let (planted, link, bm_planted, bm_link) =
        (dir.join("planted.raw"), dir.join("link.raw"), dir.join("planted.bitmap"), dir.join("link.bitmap"));
    assert!(as_user(
        user,
        &format!(
            "umask 000 && printf mine > '{p}' && ln -s '{v}' '{l}' && printf mine > '{bp}' && ln -s '{v}' '{bl}'",
            p = planted.display(),
            l = link.display(),
            bp = bm_planted.display(),
            bl = bm_link.display(),
            v = victim.display()
        )
    ));
    let owner = |p: &Path| fs::symlink_metadata(p).unwrap().uid();
    assert_eq!(owner(&planted), user.0);

    // Without OVERWRITE: EEXIST; the attacker's file is not adopted (still theirs, unchanged).
    assert_eq!(errno(&FileDriver::create(&planted, MIB).err().unwrap()), libc::EEXIST);
    assert_eq!(errno(&FileDriver::create(&link, MIB).err().unwrap()), libc::EEXIST);
    assert_eq!(DirtyBitmap::create(&bm_planted, MIB, 65536).err().unwrap().errno(), libc::EEXIST);
    assert_eq!(DirtyBitmap::create(&bm_link, MIB, 65536).err().unwrap().errno(), libc::EEXIST);
    assert_eq!(fs::read(&planted).unwrap(), b"mine");
    assert_eq!(fs::read(&bm_planted).unwrap(), b"mine");

    // With OVERWRITE through the attacker's symlink: ELOOP, the root file untouched.
    let e = FileDriver::create_with(&link, MIB, OpenFlags::OVERWRITE).err().unwrap();
    assert_eq!(errno(&e), libc::ELOOP, "{e}");
    assert_eq!(fs::read(&victim).unwrap(), b"precious root data\n");
    assert_eq!(fs::metadata(&victim).unwrap().len(), 19);

    // With OVERWRITE over the attacker's file, held open by the attacker: the path now names a
    // new root-owned 0600 file; the attacker's file never receives the disk's data and the
    // attacker cannot read the new one.
    let mut held = fs::File::open(&planted).unwrap();
    let d = FileDriver::create_with(&planted, MIB, OpenFlags::OVERWRITE).unwrap();
    d.write_at(b"DISK-CONTENT", 0).unwrap();
    d.flush().unwrap();
    drop(d);
    let meta = fs::symlink_metadata(&planted).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!((meta.uid(), meta.mode() & 0o7777, meta.len()), (0, 0o600, MIB));
    let mut old = Vec::new();
    held.read_to_end(&mut old).unwrap();
    assert_eq!(old, b"mine");
    assert!(!as_user(user, &format!("cat '{}' >/dev/null 2>&1", planted.display())), "cbatk read the backup");
    assert!(
        !as_user(user, &format!("{{ printf x >> '{}'; }} 2>/dev/null", planted.display())),
        "cbatk wrote to the backup"
    );
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
}

#[test]
fn another_user_cannot_read_a_new_backup_or_bitmap() {
    let user = match attacker() {
        Ok(u) => u,
        Err(why) => return eprintln!("skipped: {why}"),
    };
    let (_keep, dir) = match shared_dir(user) {
        Ok(d) => d,
        Err(why) => return eprintln!("skipped: {why}"),
    };
    // Under umask 000, where 0666 & ~umask would have been world-writable.
    with_umask(0, || {
        let b = dir.join("backup.raw");
        let bm = dir.join("disk.bitmap");
        let d = FileDriver::create(&b, MIB).unwrap();
        d.write_at(b"secret", 0).unwrap();
        let bitmap = DirtyBitmap::create(&bm, MIB, 65536).unwrap();
        for p in [&b, &bm] {
            let shown = p.display();
            assert!(!as_user(user, &format!("cat '{shown}' >/dev/null 2>&1")), "cbatk read {shown}");
            assert!(!as_user(user, &format!("{{ printf x >> '{shown}'; }} 2>/dev/null")), "cbatk wrote {shown}");
        }
        drop((d, bitmap));
    });
}

/// A loop device over a file; detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Result<Loop, String> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup not runnable: {e}"))?;
        if !out.status.success() {
            return Err(format!("losetup failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn overwrite_of_a_block_device_opens_it_and_never_replaces_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing.img");
    fs::write(&backing, vec![0x77u8; 4 * MIB as usize]).unwrap();
    let dev = match Loop::attach(&backing) {
        Ok(l) => l,
        Err(e) => return eprintln!("skipped: no loop device: {e}"),
    };
    let node_before = fs::symlink_metadata(&dev.0).unwrap();
    // Without OVERWRITE: EEXIST, the device is not touched.
    assert_eq!(errno(&FileDriver::create(&dev.0, MIB).err().unwrap()), libc::EEXIST);
    // Bigger than the device: refused, untouched.
    let e = FileDriver::create_with(&dev.0, 8 * MIB, OpenFlags::OVERWRITE).err().unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    // A symlink to the device: ELOOP (resolve it to write there).
    let link = dir.path().join("by-id-link");
    symlink(&dev.0, &link).unwrap();
    assert_eq!(errno(&FileDriver::create_with(&link, MIB, OpenFlags::OVERWRITE).err().unwrap()), libc::ELOOP);
    // OVERWRITE of the device: opened read-write, the driver's size is the device's.
    let d = FileDriver::create_with_mode(&dev.0, MIB, OpenFlags::OVERWRITE | OpenFlags::DIRECT, 0o600).unwrap();
    assert_eq!(d.size(), 4 * MIB);
    d.write_at(b"DISK-CONTENT", 0).unwrap();
    d.flush().unwrap();
    drop(d);
    let node_after = fs::symlink_metadata(&dev.0).unwrap();
    assert!(node_after.file_type().is_block_device());
    assert_eq!(
        (node_after.ino(), node_after.mode(), node_after.rdev()),
        (node_before.ino(), node_before.mode(), node_before.rdev()),
        "the device node was replaced or changed"
    );
    let data = fs::read(&backing).unwrap();
    assert_eq!(&data[..12], b"DISK-CONTENT");
    assert!(data[12..].iter().all(|&b| b == 0x77));
    assert!(leftovers(dev.0.parent().unwrap()).is_empty());
}
