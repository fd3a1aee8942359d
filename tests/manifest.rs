//! Manifests, verify and backup chains (src/repo/): a full backup and incrementals made
//! under concurrent writers (data, write_zeroes, discards), restored through the chain
//! (read directly, by a restore job, and over the NBD server with qemu-img), corruption,
//! every chain error, and a process killed while it writes manifests.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{assert_same, contents, Rng};
use cowbackup::repo::{verify, verify_report, Chain, Manifest};
use cowbackup::{
    backup_start, BackupOptions, BlockDriver, DirtyBitmap, ErrorKind, FileDriver, MemDriver, OpenFlags, SyncMode,
};

const CS: u64 = 64 << 10;
const SIZE: u64 = 6 << 20;

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// qemu-img compare of two raw images (skipped with a message when qemu-img is missing).
fn qemu_compare(a: &Path, b: &Path) {
    if !have("qemu-img") {
        eprintln!("qemu-img not installed: compare skipped (scripts/deps.sh installs it)");
        return;
    }
    let o = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(a).arg(b).output().unwrap();
    assert!(
        o.status.success(),
        "qemu-img compare {} {}: {}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&o.stdout)
    );
}

/// A source disk with random data, zero clusters and holes, its bitmap and backups.
struct Disk {
    dir: PathBuf,
    source: Arc<FileDriver>,
    bitmap: Arc<DirtyBitmap>,
    disk_id: String,
    rng: Rng,
    /// Manifests made so far, oldest first, and the point-in-time image of each.
    backups: Vec<(PathBuf, Vec<u8>)>,
}

impl Disk {
    fn new(dir: &Path, name: &str, size: u64, seed: u64) -> Disk {
        let mut rng = Rng::new(seed);
        let mut img = rng.bytes(size as usize);
        for c in 0..size / CS {
            if rng.below(4) == 0 {
                img[(c * CS) as usize..((c + 1) * CS) as usize].fill(0);
            }
        }
        let p = dir.join(format!("{name}.src"));
        std::fs::write(&p, &img).unwrap();
        let source = Arc::new(FileDriver::open(&p, OpenFlags::WRITE).unwrap());
        let bitmap = DirtyBitmap::new(size, CS).unwrap();
        Disk { dir: dir.to_path_buf(), source, bitmap, disk_id: name.to_string(), rng, backups: Vec::new() }
    }

    /// One backup (full for the first, then incrementals) while a writer changes the
    /// source through the hook: data, write_zeroes and discards. Returns the manifest.
    fn backup(&mut self, opts_fn: impl FnOnce(&mut BackupOptions)) -> PathBuf {
        let n = self.backups.len();
        let pit = contents(&*self.source);
        let tp = self.dir.join(format!("{}.{n}.img", self.disk_id));
        let target = Arc::new(FileDriver::create(&tp, self.source.size()).unwrap());
        let mp = self.dir.join(format!("{}.{n}.manifest", self.disk_id));
        let mut opts = BackupOptions {
            sync: if n == 0 { SyncMode::Full } else { SyncMode::Bitmap },
            bitmap: Some(self.bitmap.clone()),
            manifest: Some(mp.clone()),
            disk_id: Some(self.disk_id.clone()),
            max_chunk: 256 << 10,
            ..Default::default()
        };
        opts_fn(&mut opts);
        let job = backup_start(self.source.clone(), target, opts).unwrap();
        let done = AtomicBool::new(false);
        let seed = self.rng.next();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut rng = Rng::new(seed);
                let size = self.source.size();
                let mut i = 0;
                while !done.load(Ordering::Acquire) && i < 30 || i < 10 {
                    let len = (1 + rng.below(3 * CS / 4096)) * 4096;
                    let off = rng.below((size - len) / 4096) * 4096;
                    job.cow_before_write(off, len).unwrap();
                    match rng.below(6) {
                        0 => self.source.write_zeroes_at(off, len).unwrap(),
                        1 => self.source.discard(off, len).unwrap(),
                        _ => self.source.write_at(&rng.bytes(len as usize), off).unwrap(),
                    }
                    self.bitmap.mark(off, len).unwrap();
                    i += 1;
                }
            });
            job.wait().unwrap();
            done.store(true, Ordering::Release);
        });
        // A few writes after the job: they belong to the next incremental.
        for _ in 0..20 {
            let len = (1 + self.rng.below(4)) * 4096;
            let off = self.rng.below((self.source.size() - len) / 4096) * 4096;
            self.source.write_at(&self.rng.bytes(len as usize), off).unwrap();
            self.bitmap.mark(off, len).unwrap();
        }
        self.backups.push((mp.clone(), pit));
        mp
    }

    fn manifests(&self) -> Vec<PathBuf> {
        self.backups.iter().map(|b| b.0.clone()).collect()
    }
}

fn errno(e: &cowbackup::Error) -> i32 {
    e.errno()
}

/// Full + 3 incrementals under writers: each prefix of the chain reads (and restores) as
/// the point in time of its newest backup; verify passes; the manifest is 0600.
#[test]
fn chain_restores_each_point_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Disk::new(dir.path(), "vm1-disk0", SIZE, 1);
    for i in 0..4 {
        let mp = d.backup(|o| o.cow_buffer = if i % 2 == 1 { 4 << 20 } else { 0 });
        let m = Manifest::load(&mp).unwrap();
        assert_eq!((m.size, m.cluster_size, m.disk_id.as_deref()), (SIZE, CS, Some("vm1-disk0")));
        assert_eq!(m.sync, if i == 0 { "full" } else { "bitmap" });
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&mp).unwrap().permissions().mode() & 0o777, 0o600);
        let target = FileDriver::open(m.target_path(&mp).unwrap(), OpenFlags::empty()).unwrap();
        let r = verify(&mp, &target).unwrap();
        let held: u64 = m.runs.iter().map(|r| r.count).sum();
        assert_eq!(r.clusters_checked, held);
        if i == 0 {
            assert_eq!(held, SIZE / CS, "a full backup holds every cluster");
        }
        let chain = Chain::open(&d.manifests(), true).unwrap();
        let want = &d.backups[i].1;
        assert_same(&format!("chain read after backup {i}"), &contents(&chain), want);
        // Restore = a backup job with the chain as source.
        let rp = dir.path().join(format!("restore{i}.img"));
        let rt = Arc::new(FileDriver::create(&rp, SIZE).unwrap());
        let job = backup_start(Arc::new(chain), rt, BackupOptions::default()).unwrap();
        job.wait().unwrap();
        let pp = dir.path().join(format!("pit{i}.img"));
        std::fs::write(&pp, want).unwrap();
        qemu_compare(&rp, &pp);
    }
}

/// Instant access: the chain exported by the NBD server, read by qemu-img.
#[test]
fn chain_over_nbd_reads_as_the_point_in_time() {
    if !have("qemu-img") {
        eprintln!("SKIP: qemu-img is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut d = Disk::new(dir.path(), "d", 2 << 20, 2);
    d.backup(|_| {});
    d.backup(|_| {});
    let chain = Chain::open(&d.manifests(), false).unwrap();
    let sock = dir.path().join("nbd.sock");
    let server = cowbackup::nbd::Server::start(&format!("unix:{}", sock.display())).unwrap();
    server.add("backup", Arc::new(chain), false).unwrap();
    let pp = dir.path().join("pit.img");
    std::fs::write(&pp, &d.backups[1].1).unwrap();
    let uri = format!("nbd+unix:///backup?socket={}", sock.display());
    let o = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &uri]).arg(&pp).output().unwrap();
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    server.stop();
}

/// One flipped byte: verify names exactly that cluster; a chain read with
/// verify-on-read fails there with EBADMSG and reads every other cluster.
#[test]
fn corruption_is_found_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Disk::new(dir.path(), "c", 2 << 20, 3);
    let mp = d.backup(|_| {});
    let m = Manifest::load(&mp).unwrap();
    let bad = m.runs.iter().find(|r| r.data).unwrap().start + 1;
    let run = m.runs.iter().find(|r| r.data && r.start <= bad && bad < r.start + r.count);
    let bad = if run.is_some() { bad } else { m.runs.iter().find(|r| r.data).unwrap().start };
    let tp = m.target_path(&mp).unwrap();
    let t = FileDriver::open(&tp, OpenFlags::WRITE).unwrap();
    let mut b = [0u8; 1];
    t.read_at(&mut b, bad * CS + 100).unwrap();
    t.write_at(&[b[0] ^ 0x40], bad * CS + 100).unwrap();
    let r = verify_report(&mp, &t).unwrap();
    assert_eq!((r.mismatched_clusters, r.mismatches.clone()), (1, vec![(bad * CS, CS)]));
    let e = verify(&mp, &t).unwrap_err();
    assert_eq!((e.kind(), errno(&e)), (ErrorKind::Corrupt, libc::EBADMSG));
    let chain = Chain::open(&[&mp], true).unwrap();
    let mut buf = vec![0u8; CS as usize];
    let e = chain.read_at(&mut buf, bad * CS).unwrap_err();
    assert_eq!(cowbackup::errno_of(&e), libc::EBADMSG, "{e}");
    for c in (0..(2 << 20) / CS).filter(|&c| c != bad) {
        chain.read_at(&mut buf, c * CS).unwrap();
        assert_eq!(buf, d.backups[0].1[(c * CS) as usize..((c + 1) * CS) as usize]);
    }
    // Without verify-on-read the damaged bytes read as they are.
    let chain = Chain::open(&[&mp], false).unwrap();
    chain.read_at(&mut buf, bad * CS).unwrap();
}

fn chain_err(manifests: &[&PathBuf]) -> cowbackup::Error {
    match Chain::open(manifests, false) {
        Ok(_) => panic!("chain {manifests:?} was accepted"),
        Err(e) => e,
    }
}

/// Every broken chain is refused with a message naming the link.
#[test]
fn chain_errors_name_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Disk::new(dir.path(), "a", 2 << 20, 4);
    let (full, i1, i2) = (d.backup(|_| {}), d.backup(|_| {}), d.backup(|_| {}));
    Chain::open(&[&full, &i1, &i2], false).unwrap();
    // Missing middle link, wrong order, an incremental first.
    let e = chain_err(&[&full, &i2]);
    assert!(errno(&e) == libc::EINVAL && e.to_string().contains("link 1"), "{e}");
    assert!(e.to_string().contains(&*i2.to_string_lossy()), "{e}");
    let e = chain_err(&[&full, &i2, &i1]);
    assert!(errno(&e) == libc::EINVAL && e.to_string().contains("link 1"), "{e}");
    let e = chain_err(&[&i1, &i2]);
    assert!(e.to_string().contains("link 0") && e.to_string().contains("full"), "{e}");
    // A foreign disk of the same size, and a disk of another size.
    let mut other = Disk::new(dir.path(), "b", 2 << 20, 5);
    let (_ofull, oi1) = (other.backup(|_| {}), other.backup(|_| {}));
    let e = chain_err(&[&full, &oi1]);
    assert!(errno(&e) == libc::EINVAL && e.to_string().contains("foreign disk"), "{e}");
    let sub = dir.path().join("small");
    std::fs::create_dir(&sub).unwrap();
    let mut small = Disk::new(&sub, "a-small", 1 << 20, 6);
    small.disk_id = "a".into();
    let (_sfull, si1) =
        (small.backup(|o| o.disk_id = Some("a".into())), small.backup(|o| o.disk_id = Some("a".into())));
    let e = chain_err(&[&full, &si1]);
    assert!(errno(&e) == libc::EINVAL && e.to_string().contains("bytes"), "{e}");
    // Damaged manifests: a header field, a body byte, a truncation.
    let bytes = std::fs::read(&i1).unwrap();
    let nl = bytes.iter().position(|&b| b == b'\n').unwrap();
    let text = String::from_utf8(bytes[..nl].to_vec()).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("header", [text.replace("\"bytes_copied\":", "\"bytes_copied\":1").as_bytes(), &bytes[nl..]].concat()),
        ("body", {
            let mut b = bytes.clone();
            let at = nl + 40;
            b[at] ^= 1;
            b
        }),
        ("truncated", bytes[..bytes.len() - 7].to_vec()),
    ];
    for (what, b) in cases {
        let p = dir.path().join(format!("damaged-{what}"));
        std::fs::write(&p, b).unwrap();
        let e = chain_err(&[&full, &p]);
        assert_eq!(errno(&e), libc::EBADMSG, "{what}: {e}");
        assert!(e.to_string().contains(&*p.to_string_lossy()), "{what}: {e}");
    }
}

/// The manifest is never written over a file, nor for a job that did not complete; a
/// bitmap adopts the first disk id durably and refuses another.
#[test]
fn manifest_rules_and_disk_identity() {
    let dir = tempfile::tempdir().unwrap();
    let d = Disk::new(dir.path(), "x", 1 << 20, 7);
    let tp = dir.path().join("t.img");
    let exists = dir.path().join("exists.manifest");
    std::fs::write(&exists, b"keep").unwrap();
    let target = Arc::new(FileDriver::create(&tp, 1 << 20).unwrap());
    let opts = BackupOptions { manifest: Some(exists.clone()), ..Default::default() };
    let e = backup_start(d.source.clone(), target.clone(), opts).err().unwrap();
    assert_eq!(errno(&e), libc::EEXIST, "{e}");
    assert_eq!(std::fs::read(&exists).unwrap(), b"keep");
    // Cancelled: no manifest.
    let mp = dir.path().join("cancelled.manifest");
    let opts = BackupOptions { manifest: Some(mp.clone()), speed: 4096, ..Default::default() };
    let job = backup_start(d.source.clone(), target.clone(), opts).unwrap();
    job.cancel();
    assert!(job.wait().is_err());
    assert!(!mp.exists());
    // Disk identity on a persistent bitmap.
    let bp = dir.path().join("bitmap");
    let bm = DirtyBitmap::create(&bp, 1 << 20, CS).unwrap();
    assert_eq!(bm.disk_id(), None);
    let opts = BackupOptions { bitmap: Some(bm.clone()), disk_id: Some("disk-A".into()), ..Default::default() };
    backup_start(d.source.clone(), target.clone(), opts).unwrap().wait().unwrap();
    drop(bm);
    let bm = DirtyBitmap::open(&bp).unwrap();
    assert_eq!(bm.disk_id().as_deref(), Some("disk-A"));
    let opts = BackupOptions { bitmap: Some(bm.clone()), disk_id: Some("disk-B".into()), ..Default::default() };
    let e = backup_start(d.source.clone(), target.clone(), opts).err().unwrap();
    assert!(errno(&e) == libc::EINVAL && e.to_string().contains("disk-A"), "{e}");
    // sync None cannot have a manifest.
    let opts = BackupOptions { manifest: Some(dir.path().join("n")), sync: SyncMode::None, ..Default::default() };
    assert_eq!(errno(&backup_start(d.source.clone(), target, opts).err().unwrap()), libc::EINVAL);
}

/// kill -9 of a process writing manifests: every manifest path that exists afterwards
/// holds a complete, valid manifest (temporary files are never taken for one).
#[test]
fn killed_writer_leaves_no_half_manifest() {
    if let Ok(dir) = std::env::var("COWBACKUP_MANIFEST_CHILD") {
        let dir = PathBuf::from(dir);
        let d = Disk::new(&dir, "k", 4 << 20, 8);
        for i in 0.. {
            let tp = dir.join(format!("k{i}.img"));
            let target = Arc::new(FileDriver::create(&tp, 4 << 20).unwrap());
            let opts = BackupOptions {
                manifest: Some(dir.join(format!("k{i}.manifest"))),
                cluster_size: 4096,
                ..Default::default()
            };
            backup_start(d.source.clone(), target, opts).unwrap().wait().unwrap();
            std::fs::remove_file(&tp).unwrap();
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for round in 0..4u64 {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args(["--exact", "killed_writer_leaves_no_half_manifest", "--nocapture"])
            .env("COWBACKUP_MANIFEST_CHILD", dir.path())
            .spawn()
            .unwrap();
        // Let it write a few manifests, then kill it at some point of the next.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let count = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".manifest"))
                .count()
        };
        let start = count();
        while count() < start + 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_micros(round * 1700));
        child.kill().unwrap();
        child.wait().unwrap();
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "manifest") {
                Manifest::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
        }
        // The next child starts over in the same directory.
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let p = e.unwrap().path();
            std::fs::remove_file(&p).unwrap();
        }
    }
}

/// consolidate: merging the full backup with the first incrementals, or incrementals in
/// the middle, gives a backup that verifies and stands in the chain for the merged ones.
#[test]
fn consolidate_merges_and_keeps_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Disk::new(dir.path(), "m", 3 << 20, 9);
    let ms: Vec<PathBuf> = (0..4).map(|_| d.backup(|_| {})).collect();
    let pit = d.backups[3].1.clone();
    let p = |n: &str| dir.path().join(n);
    let head = cowbackup::repo::consolidate(&ms[..3], p("head.img"), p("head.manifest")).unwrap();
    assert_eq!(head.sync, "full");
    verify(p("head.manifest"), &FileDriver::open(p("head.img"), OpenFlags::empty()).unwrap()).unwrap();
    assert_same("[head, i3]", &contents(&Chain::open(&[p("head.manifest"), ms[3].clone()], true).unwrap()), &pit);
    let mid = cowbackup::repo::consolidate(&ms[1..3], p("mid.img"), p("mid.manifest")).unwrap();
    assert_eq!(mid.sync, "bitmap");
    let chain = Chain::open(&[ms[0].clone(), p("mid.manifest"), ms[3].clone()], true).unwrap();
    assert_same("[full, mid, i3]", &contents(&chain), &pit);
    // The old chain is untouched; the new paths are never written over.
    assert_same("old chain", &contents(&Chain::open(&ms, true).unwrap()), &pit);
    let e = cowbackup::repo::consolidate(&ms[..2], p("head.img"), p("other.manifest")).unwrap_err();
    assert_eq!(errno(&e), libc::EEXIST, "{e}");
    // A damaged cluster in a merged backup fails the merge; nothing is published.
    let m1 = Manifest::load(&ms[1]).unwrap();
    if let Some(r) = m1.runs.iter().find(|r| r.data) {
        let t = FileDriver::open(m1.target_path(&ms[1]).unwrap(), OpenFlags::WRITE).unwrap();
        let mut b = [0u8; 1];
        t.read_at(&mut b, r.start * CS).unwrap();
        t.write_at(&[!b[0]], r.start * CS).unwrap();
        // Only when no later backup holds that cluster is the damaged copy read.
        let later = |c: u64| Manifest::load(&ms[2]).unwrap().runs.iter().any(|r| r.start <= c && c < r.start + r.count);
        if !later(r.start) {
            let e = cowbackup::repo::consolidate(&ms[1..3], p("bad.img"), p("bad.manifest")).unwrap_err();
            assert_eq!(errno(&e), libc::EBADMSG, "{e}");
            assert!(!p("bad.manifest").exists() && !p("bad.img").exists());
        }
    }
}

/// kill -9 during consolidate: the old chain stays valid, and a consolidated manifest
/// that exists is complete and verifies against its image.
#[test]
fn killed_consolidate_leaves_old_chain_and_no_half_backup() {
    if let Ok(dir) = std::env::var("COWBACKUP_CONSOLIDATE_CHILD") {
        let dir = PathBuf::from(dir);
        let ms: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("k.{i}.manifest"))).collect();
        for i in 0.. {
            cowbackup::repo::consolidate(&ms, dir.join(format!("c{i}.img")), dir.join(format!("c{i}.cmanifest")))
                .unwrap();
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut d = Disk::new(dir.path(), "k", 8 << 20, 10);
    let ms: Vec<PathBuf> = (0..3).map(|_| d.backup(|_| {})).collect();
    let pit = d.backups[2].1.clone();
    for round in 0..4u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "killed_consolidate_leaves_old_chain_and_no_half_backup", "--nocapture"])
            .env("COWBACKUP_CONSOLIDATE_CHILD", dir.path())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let done = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".cmanifest"))
                .count()
        };
        while done() < 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::thread::sleep(std::time::Duration::from_millis(round * 7));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_same("old chain", &contents(&Chain::open(&ms, true).unwrap()), &pit);
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "cmanifest") {
                let m = Manifest::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                let t = FileDriver::open(m.target_path(&p).unwrap(), OpenFlags::empty()).unwrap();
                verify(&p, &t).unwrap();
                assert_same("consolidated", &contents(&Chain::open(&[&p], true).unwrap()), &pit);
            }
        }
        // Clear the consolidated files (and any temporary leftovers) for the next round.
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with('c') || name.starts_with(".c") {
                std::fs::remove_file(&p).unwrap();
            }
        }
    }
}

/// A full backup made without the bitmap links to its incremental only through an explicit
/// `parent_manifest`; the chain then reads as the incremental's point in time.
#[test]
fn explicit_parent_manifest_links_without_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Disk::new(dir.path(), "p", 2 << 20, 11);
    let full = d.backup(|o| o.bitmap = None);
    let linked = d.backup(|o| o.parent_manifest = Some(full.clone()));
    let chain = Chain::open(&[&full, &linked], true).unwrap();
    assert_same("[full, linked]", &contents(&chain), &d.backups[1].1);
    // The next incremental's parent is `linked` (from the bitmap): not the full backup.
    let next = d.backup(|_| {});
    let e = chain_err(&[&full, &next]);
    assert!(e.to_string().contains("without a dirty bitmap"), "{e}");
    Chain::open(&[&full, &linked, &next], true).unwrap();
    // A parent manifest that cannot be read is refused at start.
    let tp = dir.path().join("other.img");
    let opts = BackupOptions {
        sync: SyncMode::Bitmap,
        bitmap: Some(d.bitmap.clone()),
        disk_id: Some("p".into()),
        manifest: Some(dir.path().join("other.manifest")),
        parent_manifest: Some(dir.path().join("missing.manifest")),
        ..Default::default()
    };
    let e = backup_start(d.source.clone(), Arc::new(FileDriver::create(&tp, 2 << 20).unwrap()), opts).err().unwrap();
    assert_eq!(errno(&e), libc::ENOENT, "{e}");
}

/// Sync `Top` of a sparse source and `Full` into a target holding old data: holes and zero
/// clusters are in the copy set as zeroes (written or found at start), so verify passes and
/// the chain reads as the source, also where the target had other bytes before.
#[test]
fn zero_clusters_and_holes_are_in_the_copy_set() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2u64 << 20;
    let src_path = dir.path().join("sparse.src");
    let f = std::fs::File::create(&src_path).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    let source = Arc::new(FileDriver::open(&src_path, OpenFlags::WRITE).unwrap());
    let mut rng = Rng::new(12);
    for c in [1u64, 2, 7, 20, 31] {
        source.write_at(&rng.bytes(CS as usize), c * CS).unwrap();
    }
    source.write_at(&vec![0u8; CS as usize], 9 * CS).unwrap(); // allocated zeroes
    let want = contents(&*source);
    for (name, sync) in [("top", SyncMode::Top), ("full", SyncMode::Full)] {
        let tp = dir.path().join(format!("{name}.img"));
        std::fs::write(&tp, vec![0xeeu8; size as usize]).unwrap();
        let target = Arc::new(FileDriver::open(&tp, OpenFlags::WRITE).unwrap());
        let mp = dir.path().join(format!("{name}.manifest"));
        let opts = BackupOptions { sync, manifest: Some(mp.clone()), ..Default::default() };
        backup_start(source.clone(), target.clone(), opts).unwrap().wait().unwrap();
        let m = Manifest::load(&mp).unwrap();
        assert_eq!(m.runs.iter().map(|r| r.count).sum::<u64>(), size / CS, "{name}: every cluster is held");
        assert_eq!(m.digests.len(), 5, "{name}: only the data clusters have digests");
        verify(&mp, &*target).unwrap();
        assert_same(name, &contents(&Chain::open(&[&mp], true).unwrap()), &want);
    }
}

/// A source whose second half is unallocated without reading as zeroes (a backing file's
/// data, as an overlay reports it).
struct Overlay(FileDriver);

impl BlockDriver for Overlay {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<cowbackup::BlockStatus> {
        let half = self.size() / 2;
        Ok(if offset < half {
            cowbackup::BlockStatus { len: len.min(half - offset), flags: cowbackup::StatusFlags::DATA }
        } else {
            cowbackup::BlockStatus { len, flags: cowbackup::StatusFlags::empty() }
        })
    }
}

/// Sync `Top`: unallocated clusters that do not read as zeroes are not in the copy set
/// (the backup does not hold their data), so a chain does not claim them as zeroes.
#[test]
fn top_leaves_unallocated_data_out_of_the_copy_set() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1u64 << 20;
    let sp = dir.path().join("overlay.src");
    std::fs::write(&sp, Rng::new(13).bytes(size as usize)).unwrap();
    let source = Arc::new(Overlay(FileDriver::open(&sp, OpenFlags::WRITE).unwrap()));
    let tp = dir.path().join("top.img");
    let target = Arc::new(FileDriver::create(&tp, size).unwrap());
    let mp = dir.path().join("top.manifest");
    let opts = BackupOptions { sync: SyncMode::Top, manifest: Some(mp.clone()), ..Default::default() };
    backup_start(source.clone(), target, opts).unwrap().wait().unwrap();
    let m = Manifest::load(&mp).unwrap();
    assert_eq!(m.runs, vec![cowbackup::repo::Run { start: 0, count: size / 2 / CS, data: true }]);
    let chain = Chain::open(&[&mp], true).unwrap();
    let img = contents(&chain);
    assert_same("held half", &img[..(size / 2) as usize], &contents(&*source)[..(size / 2) as usize]);
    assert!(img[(size / 2) as usize..].iter().all(|&b| b == 0));
    assert_eq!(chain.block_status(size / 2, size / 2).unwrap().flags, cowbackup::StatusFlags::ZERO);
}

/// Incrementals pulled from an NBD server's bitmap make their job's bitmap anew each time
/// (another uuid each): an explicit `parent_manifest` links them, and only it.
#[test]
fn pulled_incrementals_link_by_their_explicit_parent() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1u64 << 20;
    let disk = Arc::new(MemDriver::from_bytes(&Rng::new(21).bytes(size as usize)).unwrap());
    let p = |n: &str| dir.path().join(n);
    let full = BackupOptions { manifest: Some(p("full.m")), ..Default::default() };
    backup_start(disk.clone(), Arc::new(FileDriver::create(p("full.img"), size).unwrap()), full)
        .unwrap()
        .wait()
        .unwrap();
    let mut parent = p("full.m");
    for (i, name) in ["i1", "i2"].into_iter().enumerate() {
        let at = (i as u64 + 1) * 4 * CS;
        disk.write_at(&vec![0x40 + i as u8; CS as usize], at).unwrap();
        let marks = DirtyBitmap::new(size, CS).unwrap(); // a fresh bitmap: a new uuid
        marks.mark(at, CS).unwrap();
        let opts = BackupOptions {
            sync: SyncMode::Bitmap,
            bitmap: Some(marks),
            manifest: Some(p(&format!("{name}.m"))),
            parent_manifest: Some(parent.clone()),
            ..Default::default()
        };
        let t = Arc::new(FileDriver::create(p(&format!("{name}.img")), size).unwrap());
        backup_start(disk.clone(), t, opts).unwrap().wait().unwrap();
        parent = p(&format!("{name}.m"));
    }
    let chain = Chain::open(&[p("full.m"), p("i1.m"), p("i2.m")], true).unwrap();
    assert_same("the chain of pulls", &contents(&chain), &contents(&*disk));
    // Without the explicit parent, another bitmap's incremental does not link.
    let marks = DirtyBitmap::new(size, CS).unwrap();
    marks.mark(0, CS).unwrap();
    let opts =
        BackupOptions { sync: SyncMode::Bitmap, bitmap: Some(marks), manifest: Some(p("i3.m")), ..Default::default() };
    backup_start(disk.clone(), Arc::new(FileDriver::create(p("i3.img"), size).unwrap()), opts).unwrap().wait().unwrap();
    let e = Chain::open(&[p("full.m"), p("i1.m"), p("i2.m"), p("i3.m")], false).err().expect("no link");
    assert!(e.to_string().contains("another dirty bitmap"), "{e}");
}

/// Backups whose targets the manifests cannot name (a device, an RBD image: here memory
/// drivers, and files moved away from their manifests) open as a chain with the targets
/// given: same contents, restore, verify-on-read, link checks, and the count and size
/// errors; consolidate takes them too.
#[test]
fn chain_open_drivers_takes_the_targets_given() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2 << 20;
    let mut d = Disk::new(dir.path(), "drv", size, 12);
    let ms: Vec<PathBuf> = (0..3).map(|_| d.backup(|_| {})).collect();
    let pit = d.backups[2].1.clone();
    // The targets move away: the manifests' `target` no longer finds them.
    let moved = dir.path().join("moved");
    std::fs::create_dir(&moved).unwrap();
    let mut files: Vec<PathBuf> = Vec::new();
    for m in &ms {
        let tp = Manifest::load(m).unwrap().target_path(m).unwrap();
        let to = moved.join(tp.file_name().unwrap());
        std::fs::rename(&tp, &to).unwrap();
        files.push(to);
    }
    assert_eq!(errno(&chain_err(&[&ms[0], &ms[1], &ms[2]])), libc::ENOENT);
    // Two kinds of drivers: files opened read-only, and copies in memory.
    let file = |p: &PathBuf| -> Arc<dyn BlockDriver> { Arc::new(FileDriver::open(p, OpenFlags::empty()).unwrap()) };
    let mem =
        |p: &PathBuf| -> Arc<dyn BlockDriver> { Arc::new(MemDriver::from_bytes(&std::fs::read(p).unwrap()).unwrap()) };
    let targets: Vec<Arc<dyn BlockDriver>> = vec![file(&files[0]), mem(&files[1]), file(&files[2])];
    let chain = Chain::open_drivers(&ms, targets.clone(), true).unwrap();
    assert_eq!(chain.manifests(), ms);
    assert_same("chain of given targets", &contents(&chain), &pit);
    for (n, want) in [(1, &d.backups[0].1), (2, &d.backups[1].1)] {
        let c = Chain::open_drivers(&ms[..n], targets[..n].to_vec(), false).unwrap();
        assert_same(&format!("first {n} links"), &contents(&c), want);
    }
    // Restore = a backup job from the chain.
    let rp = dir.path().join("restored.img");
    let rt = Arc::new(FileDriver::create(&rp, size).unwrap());
    let job = backup_start(Arc::new(chain), rt.clone(), BackupOptions::default()).unwrap();
    job.wait().unwrap();
    assert_same("restored from given targets", &contents(&*rt), &pit);

    // The link checks are the same: wrong order, an incremental first.
    let bad = |m: &[&PathBuf], t: Vec<Arc<dyn BlockDriver>>| match Chain::open_drivers(m, t, false) {
        Ok(_) => panic!("chain {m:?} with given targets was accepted"),
        Err(e) => e,
    };
    let e = bad(&[&ms[0], &ms[2], &ms[1]], vec![targets[0].clone(), targets[2].clone(), targets[1].clone()]);
    assert!(errno(&e) == libc::EINVAL && e.to_string().contains("link 1"), "{e}");
    let e = bad(&[&ms[1]], vec![targets[1].clone()]);
    assert!(errno(&e) == libc::EINVAL && e.to_string().contains("link 0"), "{e}");
    // One target per manifest.
    for t in [vec![], targets[..2].to_vec(), [targets.clone(), targets[..1].to_vec()].concat()] {
        let n = t.len();
        let e = bad(&[&ms[0], &ms[1], &ms[2]], t);
        assert_eq!(errno(&e), libc::EINVAL, "{n} targets: {e}");
        assert!(e.to_string().contains("3 manifests") && e.to_string().contains(&format!("{n} given")), "{e}");
    }
    let e = bad(&[], vec![]);
    assert_eq!(errno(&e), libc::EINVAL, "{e}");
    // A target of another size: refused, naming the link.
    let small: Arc<dyn BlockDriver> = Arc::new(MemDriver::new(size - CS).unwrap());
    let e = bad(&[&ms[0], &ms[1]], vec![targets[0].clone(), small]);
    assert!(errno(&e) == libc::EINVAL && e.to_string().contains("link 1"), "{e}");
    assert!(e.to_string().contains(&format!("{} bytes", size - CS)), "{e}");

    // Verify-on-read on a given target: one damaged data cluster of the newest backup fails
    // with EBADMSG, every other cluster still reads.
    let m2 = Manifest::load(&ms[2]).unwrap();
    let run = m2.runs.iter().find(|r| r.data).expect("the last incremental copied data");
    let damaged_at = run.start * CS;
    let copy = std::fs::read(&files[2]).unwrap();
    let damaged = MemDriver::from_bytes(&copy).unwrap();
    damaged.write_at(&[!copy[damaged_at as usize + 7]], damaged_at + 7).unwrap();
    let targets2: Vec<Arc<dyn BlockDriver>> = vec![targets[0].clone(), targets[1].clone(), Arc::new(damaged)];
    let chain = Chain::open_drivers(&ms, targets2.clone(), true).unwrap();
    let mut buf = vec![0u8; CS as usize];
    let e = chain.read_at(&mut buf, damaged_at).unwrap_err();
    assert_eq!(cowbackup::errno_of(&e), libc::EBADMSG, "{e}");
    for c in (0..size / CS).filter(|&c| c * CS != damaged_at) {
        chain.read_at(&mut buf, c * CS).unwrap();
        assert_eq!(buf, pit[(c * CS) as usize..((c + 1) * CS) as usize], "cluster {c}");
    }

    // Consolidate from given targets: the new backup is a file with its manifest.
    let p = |n: &str| dir.path().join(n);
    let e = cowbackup::repo::consolidate_drivers(&ms, targets[..2].to_vec(), p("x.img"), p("x.manifest")).unwrap_err();
    assert_eq!(errno(&e), libc::EINVAL, "{e}");
    let e = cowbackup::repo::consolidate_drivers(&ms, targets2, p("x.img"), p("x.manifest")).unwrap_err();
    assert_eq!(errno(&e), libc::EBADMSG, "damage is never carried over: {e}");
    assert!(!p("x.img").exists() && !p("x.manifest").exists());
    let head = cowbackup::repo::consolidate_drivers(&ms, targets, p("head.img"), p("head.manifest")).unwrap();
    assert_eq!(head.target.as_deref(), Some("head.img"));
    assert_same("consolidated from given targets", &contents(&Chain::open(&[p("head.manifest")], true).unwrap()), &pit);
}

/// A backup into a device (here memory) has a manifest naming no target file: `Chain::open`
/// says to give the targets, `Chain::open_drivers` opens it.
#[test]
fn a_manifest_without_a_target_file_opens_with_the_target_given() {
    let dir = tempfile::tempdir().unwrap();
    let data = Rng::new(77).bytes(1 << 20);
    let src = Arc::new(MemDriver::from_bytes(&data).unwrap());
    let target = Arc::new(MemDriver::new(1 << 20).unwrap());
    let mp = dir.path().join("mem.manifest");
    let opts = BackupOptions { manifest: Some(mp.clone()), ..Default::default() };
    backup_start(src, target.clone(), opts).unwrap().wait().unwrap();
    assert_eq!(Manifest::load(&mp).unwrap().target, None);
    let e = chain_err(&[&mp]);
    assert_eq!(errno(&e), libc::EINVAL, "{e}");
    assert!(e.to_string().contains("names no target file") && e.to_string().contains("open_drivers"), "{e}");
    let chain = Chain::open_drivers(&[&mp], vec![target], true).unwrap();
    assert_same("device backup through the chain", &contents(&chain), &data);
}

/// A target driver that names itself like an RBD image (`target_spec`), over memory.
struct NamedTarget(MemDriver, &'static str);

impl BlockDriver for NamedTarget {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn target_spec(&self) -> Option<String> {
        Some(self.1.to_string())
    }
}

/// The manifest records a target's `target_spec` (an RBD image's `rbd:` spec); `Chain::open`
/// opens such a target with the RBD driver, or (built without it) says to give the targets;
/// a file whose relative path starts with `rbd:` is recorded as `./rbd:...` and stays a file.
#[test]
fn rbd_targets_in_the_manifest_and_files_named_rbd() {
    let dir = tempfile::tempdir().unwrap();
    let data = Rng::new(78).bytes(1 << 20);
    let src = Arc::new(MemDriver::from_bytes(&data).unwrap());
    let target = Arc::new(NamedTarget(MemDriver::new(1 << 20).unwrap(), "rbd:backups/vm1-disk0:id=restore"));
    let mp = dir.path().join("rbd.manifest");
    let opts = BackupOptions { manifest: Some(mp.clone()), ..Default::default() };
    backup_start(src.clone(), target.clone(), opts).unwrap().wait().unwrap();
    let m = Manifest::load(&mp).unwrap();
    assert_eq!(m.target.as_deref(), Some("rbd:backups/vm1-disk0:id=restore"));
    assert_eq!(m.target_rbd(), Some("rbd:backups/vm1-disk0:id=restore"));
    assert_eq!(m.target_path(&mp), None, "an RBD image is not a file");
    let e = chain_err(&[&mp]);
    assert!(e.to_string().contains("link 0") && e.to_string().contains("rbd:backups/vm1-disk0"), "{e}");
    if cfg!(feature = "rbd") {
        // librados finds no such cluster here (or no such pool): an error, not a chain.
        assert_ne!(errno(&e), 0, "{e}");
    } else {
        assert_eq!(errno(&e), libc::ENOTSUP, "{e}");
        assert!(e.to_string().contains("open_drivers"), "{e}");
    }
    let chain = Chain::open_drivers(&[&mp], vec![target as Arc<dyn BlockDriver>], true).unwrap();
    assert_same("RBD-named target through open_drivers", &contents(&chain), &data);
    // Only rbd: names are recorded: another would be read back as a file path.
    let other = Arc::new(NamedTarget(MemDriver::new(1 << 20).unwrap(), "nbd://host/export"));
    let om = dir.path().join("other.manifest");
    let opts = BackupOptions { manifest: Some(om.clone()), ..Default::default() };
    backup_start(src.clone(), other, opts).unwrap().wait().unwrap();
    assert_eq!(Manifest::load(&om).unwrap().target, None);

    // A file below a directory named like an RBD spec stays a file.
    let sub = dir.path().join("rbd:pool");
    std::fs::create_dir(&sub).unwrap();
    let ft = Arc::new(FileDriver::create(sub.join("t.img"), 1 << 20).unwrap());
    let fm = dir.path().join("file.manifest");
    let opts = BackupOptions { manifest: Some(fm.clone()), ..Default::default() };
    backup_start(src, ft, opts).unwrap().wait().unwrap();
    let m = Manifest::load(&fm).unwrap();
    assert_eq!(m.target.as_deref(), Some("./rbd:pool/t.img"));
    assert_eq!(m.target_rbd(), None);
    assert_eq!(m.target_path(&fm), Some(dir.path().join("./rbd:pool/t.img")));
    assert_same("file named rbd:", &contents(&Chain::open(&[&fm], true).unwrap()), &data);
}

/// Verify reads and hashes with several threads: on a 32 MiB backup damaged in ten places
/// (adjacent clusters among them), the report lists the bad ranges in offset order, merged,
/// the callback gets them in that order on the calling thread, and a callback that says
/// stop ends the check after the first range.
#[test]
fn verify_reports_every_bad_range_in_order_with_several_threads() {
    let dir = tempfile::tempdir().unwrap();
    let size = 32u64 << 20;
    let src = Arc::new(MemDriver::from_bytes(&common::Rng::new(5).bytes(size as usize)).unwrap());
    let tp = dir.path().join("t.img");
    let mp = dir.path().join("t.manifest");
    let job = cowbackup::backup_start(
        src,
        Arc::new(FileDriver::create(&tp, size).unwrap()),
        cowbackup::BackupOptions { manifest: Some(mp.clone()), ..Default::default() },
    )
    .unwrap();
    job.wait().unwrap();
    let t = FileDriver::open(&tp, OpenFlags::WRITE).unwrap();
    // Clusters 3, 4 (one range), 40, 170, 171, 172 (one range), 300, 333, 400, 511.
    let bad = [3u64, 4, 40, 170, 171, 172, 300, 333, 400, 511];
    for &c in &bad {
        let mut b = [0u8; 1];
        t.read_at(&mut b, c * CS + 7).unwrap();
        t.write_at(&[b[0] ^ 1], c * CS + 7).unwrap();
    }
    let want: Vec<(u64, u64)> = [(3, 2), (40, 1), (170, 3), (300, 1), (333, 1), (400, 1), (511, 1)]
        .iter()
        .map(|&(c, n)| (c * CS, n * CS))
        .collect();
    let me = std::thread::current().id();
    let mut seen = Vec::new();
    let r = cowbackup::repo::verify_with(&mp, &t, &mut |o, l| {
        assert_eq!(std::thread::current().id(), me, "the callback runs on the calling thread");
        seen.push((o, l));
        true
    })
    .unwrap();
    assert_eq!(r.mismatches, want);
    assert_eq!(seen, want);
    assert_eq!(r.mismatched_clusters, bad.len() as u64);
    assert_eq!((r.clusters_checked, r.bytes_checked), (size / CS, size));
    let mut first = Vec::new();
    let r = cowbackup::repo::verify_with(&mp, &t, &mut |o, l| {
        first.push((o, l));
        false
    })
    .unwrap();
    assert_eq!(first, want[..1]);
    assert_eq!(r.mismatches, want[..1]);
    assert!(r.clusters_checked < size / CS, "stopped early: {r:?}");
}
