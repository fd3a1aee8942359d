//! The RBD driver against a real Ceph cluster (scripts/ceph-up.sh: one mon, one mgr, one
//! memstore OSD on 127.0.0.1, cephx), started and stopped by these tests. Only with the cargo
//! feature `rbd` (`cargo test --release --features rbd --test rbd`); without the Ceph packages
//! (scripts/deps.sh installs them) every test prints why it skipped and passes.
//!
//! - the driver's operations and errors on a live image;
//! - full and incremental backups *into* RBD images while writer threads write through the
//!   hook, restored (a backup job with the RBD image as its source) and compared with the
//!   source at each job's start;
//! - the chain of those backups opened on the RBD images (`Chain::open_drivers`): each
//!   prefix restored by a job and compared, verify-on-read finding a cluster overwritten in
//!   one image; the manifests naming their images, and `Chain::open` opening them itself;
//! - a backup *of* an RBD image (the hook in front of librbd writes), checked against the
//!   job's point in time and an RBD snapshot taken at that instant;
//! - the cluster going away mid-job (the OSD stopped): a `Report` job fails, a `Stop` job
//!   pauses with the error and cancels, neither reports `Completed`, nothing hangs.
#![cfg(feature = "rbd")]
mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use common::{assert_same, contents, until_for, wait_end, Rng, SetOnDrop};
use cowbackup::repo::{Chain, Manifest};
use cowbackup::{
    backup_start, errno_of, BackupOptions, BlockDriver, DirtyBitmap, ErrorAction, FileDriver, Job, JobState, MemDriver,
    RbdDriver, RbdOptions, StatusFlags, SyncMode,
};

const K: u64 = 1024;
const M: u64 = 1 << 20;
/// A job's end, the host's bounded waits: far above what any step takes on a loaded machine.
const T: Duration = Duration::from_secs(180);

/// One cluster at a time on this machine (RAM, CPU), whatever the test harness's threads.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

/// A cluster from scripts/ceph-up.sh under a temp dir; scripts/ceph-down.sh on drop.
struct Cluster {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    conf: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name)
}

impl Cluster {
    /// A fresh cluster with the pool `rbd`, or `None` (the reason printed) without the packages.
    fn start() -> Option<Cluster> {
        if Command::new("ceph-mon").arg("--version").output().is_err() {
            eprintln!("SKIPPED: the Ceph packages are not installed (scripts/deps.sh installs them as root)");
            return None;
        }
        let tmp = tempfile::Builder::new().prefix("cowbackup-rbd-").tempdir().unwrap();
        let dir = tmp.path().join("ceph");
        let (p1, p2) = (free_port(), free_port());
        let out = Command::new(script("ceph-up.sh"))
            .env("CEPH_DIR", &dir)
            .env("MON_PORT", p1.to_string())
            .env("MON_PORT2", p2.to_string())
            .env("IMAGE", "")
            .output()
            .unwrap();
        let cluster = Cluster { conf: dir.join("ceph.conf"), dir, _tmp: tmp };
        if out.status.code() == Some(77) {
            eprintln!("SKIPPED: {}", String::from_utf8_lossy(&out.stderr).trim());
            return None;
        }
        assert!(out.status.success(), "ceph-up.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        Some(cluster)
    }

    /// `rbd -c CONF ARGS...`, which must succeed; its stdout.
    fn rbd(&self, args: &[&str]) -> String {
        let out = Command::new("timeout").arg("120").arg("rbd").arg("-c").arg(&self.conf).args(args).output().unwrap();
        assert!(out.status.success(), "rbd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A new image `rbd/NAME` of `size` bytes.
    fn create(&self, name: &str, size: u64) {
        self.rbd(&["create", "--size", &format!("{}K", size / K), &format!("rbd/{name}")]);
    }

    fn open(&self, spec: &str, write: bool) -> Arc<RbdDriver> {
        Arc::new(RbdDriver::open(spec, Some(&self.conf), write).unwrap_or_else(|e| panic!("open {spec}: {e}")))
    }

    fn pid(&self, daemon: &str) -> i32 {
        std::fs::read_to_string(self.dir.join("run").join(format!("{daemon}.pid"))).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script("ceph-down.sh")).env("CEPH_DIR", &self.dir).status();
    }
}

/// The host: its disk, a dirty bitmap, and the running job its writes go through.
struct Host {
    src: Arc<dyn BlockDriver>,
    bm: Arc<DirtyBitmap>,
    /// Writes hold it shared; starting a job (the point in time) holds it exclusive.
    job: RwLock<Option<Arc<Job>>>,
    writes: AtomicU64,
}

impl Host {
    /// The host's write path: mark the bitmap, the hook, then the write.
    fn write(&self, off: u64, data: &[u8]) {
        let job = self.job.read().unwrap_or_else(|e| e.into_inner());
        let len = data.len() as u64;
        self.bm.mark(off, len).unwrap();
        if let Some(j) = job.as_ref() {
            j.cow_before_write(off, len).unwrap();
        }
        self.src.write_at(data, off).unwrap();
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Start a job with the writers held out for an instant: the job and the source's
    /// contents at its start (read for the check only). `at_start` runs at that instant.
    fn start(&self, target: Arc<dyn BlockDriver>, opts: BackupOptions, at_start: impl FnOnce()) -> (Arc<Job>, Vec<u8>) {
        let mut slot = self.job.write().unwrap_or_else(|e| e.into_inner());
        let pit = contents(&*self.src);
        at_start();
        let job = Arc::new(backup_start(self.src.clone(), target, opts).unwrap());
        *slot = Some(job.clone());
        (job, pit)
    }

    fn stop_jobs(&self) {
        *self.job.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn writer(host: &Host, seed: u64, stop: &AtomicBool) {
    let size = host.src.size();
    let mut rng = Rng::new(seed);
    while !stop.load(Ordering::Relaxed) {
        let len = 1 + rng.below(128 * K);
        let off = rng.below(size - len + 1);
        if rng.below(5) == 0 {
            host.write(off, &vec![0; len as usize]);
        } else {
            host.write(off, &rng.bytes(len as usize));
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Initial contents: random, with a zero region.
fn initial(size: u64, seed: u64) -> Vec<u8> {
    let mut v = Rng::new(seed).bytes(size as usize);
    v[(size / 3) as usize..(size / 2) as usize].fill(0);
    v
}

fn opts(sync: SyncMode, bm: &Arc<DirtyBitmap>, size: u64) -> BackupOptions {
    BackupOptions {
        sync,
        bitmap: Some(bm.clone()),
        workers: 4,
        max_chunk: M,
        speed: size, // about a second: the writers' writes go through the hook
        ..Default::default()
    }
}

/// Restore an RBD image into a new file with a backup job (the image as the source).
fn restore(from: Arc<RbdDriver>, dir: &Path, name: &str) -> Arc<FileDriver> {
    let file = Arc::new(FileDriver::create(dir.join(name), from.size()).unwrap());
    let job = backup_start(from, file.clone(), BackupOptions::default()).unwrap();
    wait_end(&job, T).unwrap();
    file
}

fn driver_operations(c: &Cluster) {
    let size = 16 * M + 12 * K; // not a whole number of objects
    c.create("ops", size);
    let d = c.open("rbd:rbd/ops", true);
    assert_eq!(d.size(), size);
    assert!(d.is_writable());
    assert_eq!(d.name(), "rbd:rbd/ops");
    assert!(d.reads_as_zero(), "a new image reads as zeroes");
    let st = d.block_status(0, size).unwrap();
    assert_eq!(st.flags, StatusFlags::ZERO);
    assert!(st.len > 0 && st.len <= size);

    let data = Rng::new(7).bytes((3 * M) as usize);
    d.write_at(&data, 5 * M + 123).unwrap();
    assert!(!d.reads_as_zero());
    let mut back = vec![0u8; data.len()];
    d.read_at(&mut back, 5 * M + 123).unwrap();
    assert_same("read back", &back, &data);
    // Allocation: a hole, then data, then a hole again. librbd reports an object from its
    // start to its last written byte: the hole ends at the data's object (4 MiB objects).
    let st = d.block_status(0, size).unwrap();
    assert_eq!(st.flags, StatusFlags::ZERO);
    assert!(st.len >= 4 * M && st.len <= 5 * M + 123, "{st:?}");
    let st = d.block_status(5 * M + 123, size - (5 * M + 123)).unwrap();
    assert_eq!(st, cowbackup::BlockStatus { len: 3 * M, flags: StatusFlags::DATA });
    assert_eq!(d.block_status(8 * M + 123, 4 * M).unwrap().flags, StatusFlags::ZERO);

    // write_zeroes inside an object (partial) and over whole objects.
    d.write_zeroes_at(5 * M + 200, 1000).unwrap();
    d.write_zeroes_at(4 * M, 4 * M).unwrap();
    let mut want = vec![0u8; size as usize];
    want[(5 * M + 123) as usize..(8 * M + 123) as usize].copy_from_slice(&data);
    want[(5 * M + 200) as usize..(5 * M + 1200) as usize].fill(0);
    want[(4 * M) as usize..(8 * M) as usize].fill(0);
    assert_same("after write_zeroes", &contents(&*d), &want);
    assert_eq!(d.block_status(4 * M, 4 * M).unwrap().flags, StatusFlags::ZERO, "zeroed whole object deallocated");
    d.discard(8 * M, 4 * M).unwrap();
    want[(8 * M) as usize..(12 * M) as usize].fill(0);
    assert_same("after discard", &contents(&*d), &want);
    d.write_at(&data[..4096], size - 4096).unwrap();
    d.flush().unwrap();

    // Errors: the image and the op in the message, librbd's errno kept.
    let e = d.read_at(&mut [0u8; 512], size - 511).unwrap_err();
    assert_eq!(errno_of(&e), libc::EINVAL);
    assert!(e.to_string().contains("rbd:rbd/ops") && e.to_string().contains("read"), "{e}");
    let ro = c.open("rbd:rbd/ops:id=admin", false);
    // What a manifest records for the image: the spec, with the id when one was given.
    assert_eq!(d.target_spec().as_deref(), Some("rbd:rbd/ops"));
    assert_eq!(ro.target_spec().as_deref(), Some("rbd:rbd/ops:id=admin"));
    let e = ro.write_at(&[1; 512], 0).unwrap_err();
    assert_eq!(errno_of(&e), libc::EROFS, "{e}");
    assert_eq!(errno_of(&ro.write_zeroes_at(0, 512).unwrap_err()), libc::EROFS);
    assert_eq!(errno_of(&ro.discard(0, 512).unwrap_err()), libc::EROFS);
    let mut tail = vec![0u8; 4096];
    ro.read_at(&mut tail, size - 4096).unwrap();
    assert_eq!(tail, data[..4096], "a second handle sees the first one's writes");
    // Two handles on one image: the same storage, refused as source and target of one job.
    assert_eq!(ro.storage_id(), d.storage_id());
    assert!(d.storage_id().is_some());
    match backup_start(ro.clone(), d.clone(), BackupOptions::default()) {
        Ok(_) => panic!("a job from an RBD image onto itself started"),
        Err(e) => assert!(e.to_string().contains("same"), "{e}"),
    }
    c.create("ops2", size);
    let other = c.open("rbd:rbd/ops2", true);
    assert_ne!(other.storage_id(), d.storage_id());
    drop(other);
    for (spec, errno) in [("rbd:rbd/nope", libc::ENOENT), ("rbd:nopool/ops", libc::ENOENT)] {
        let e = RbdDriver::open(spec, Some(&c.conf), true).unwrap_err();
        assert_eq!(errno_of(&e), errno, "{spec}: {e}");
        assert!(e.to_string().contains(&spec[..spec.len().min(9)]), "{e}");
    }
    let e = RbdDriver::open("rbd:rbd/ops:id=nobody", Some(&c.conf), false).unwrap_err();
    assert!(errno_of(&e) > 0, "{e}");
    eprintln!("unknown client: {e}");
}

/// Full and incremental backups into RBD images under live writers; restored and compared.
fn backups_into_rbd(c: &Cluster) {
    let size = 48 * M;
    let dir = tempfile::tempdir().unwrap();
    let src = Arc::new(FileDriver::create(dir.path().join("disk.img"), size).unwrap());
    src.write_at(&initial(size, 1), 0).unwrap();
    let host = Host {
        src: src.clone(),
        bm: DirtyBitmap::new(size, 64 * K).unwrap(),
        job: RwLock::new(None),
        writes: AtomicU64::new(0),
    };
    let stop = AtomicBool::new(false);
    let mut cow = 0;
    thread::scope(|s| {
        let _stop = SetOnDrop(&stop);
        for w in 0..3 {
            let (host, stop) = (&host, &stop);
            s.spawn(move || writer(host, 10 + w, stop));
        }
        c.create("full", size);
        let full = c.open("rbd:rbd/full", true);
        let manifest = |name: &str| dir.path().join(format!("{name}.manifest"));
        let with_manifest = |o: BackupOptions, name: &str| BackupOptions { manifest: Some(manifest(name)), ..o };
        let (job, pit_full) =
            host.start(full.clone(), with_manifest(opts(SyncMode::Full, &host.bm, size), "full"), || {});
        wait_end(&job, T).unwrap();
        assert_eq!(job.info().state, JobState::Completed);
        cow += job.info().cow_requests;
        let mut incs = Vec::new();
        for i in 1..=2 {
            thread::sleep(Duration::from_millis(300));
            let name = format!("inc{i}");
            c.create(&name, size);
            let inc = c.open(&format!("rbd:rbd/{name}"), true);
            let (job, pit) =
                host.start(inc.clone(), with_manifest(opts(SyncMode::Bitmap, &host.bm, size), &name), || {});
            let extents = job.extents();
            assert!(!extents.is_empty(), "incremental {i}: the writers dirtied nothing");
            wait_end(&job, T).unwrap();
            cow += job.info().cow_requests;
            incs.push((inc, extents, pit));
        }
        host.stop_jobs();
        drop(full);

        // Restore: the full backup read back from the cluster by a job, then each
        // incremental's copy set on top; equal to the source at each job's start.
        let full = c.open("rbd:rbd/full", false);
        let restored = restore(full, dir.path(), "restored.img");
        assert_same("full backup restored from RBD", &contents(&*restored), &pit_full);
        let mut image = contents(&*restored);
        let mut pits = vec![pit_full.clone()];
        for (i, (inc, extents, pit)) in incs.into_iter().enumerate() {
            for (o, l) in extents {
                inc.read_at(&mut image[o as usize..(o + l) as usize], o).unwrap();
            }
            assert_same(&format!("full + incrementals 1..={}", i + 1), &image, &pit);
            pits.push(pit);
        }
        // The manifests verify against the RBD targets (every copied cluster re-read from the
        // cluster and checked); a cluster changed behind the backup's back is found.
        for name in ["full", "inc1", "inc2"] {
            let d = c.open(&format!("rbd:rbd/{name}"), false);
            let r = cowbackup::repo::verify(manifest(name), &*d).unwrap_or_else(|e| panic!("verify {name}: {e}"));
            assert!(r.clusters_checked > 0 && r.mismatched_clusters == 0, "{name}: {r:?}");
        }
        let tamper = c.open("rbd:rbd/full", true);
        tamper.write_at(b"not the backup", 3 * M + 5).unwrap();
        drop(tamper);
        let d = c.open("rbd:rbd/full", false);
        let r = cowbackup::repo::verify_report(manifest("full"), &*d).unwrap();
        assert_eq!(r.mismatched_clusters, 1, "{r:?}");
        let e = cowbackup::repo::verify(manifest("full"), &*d).unwrap_err();
        assert_eq!(e.errno(), libc::EBADMSG, "{e}");
        let fix = c.open("rbd:rbd/full", true);
        fix.write_at(&pit_full[(3 * M + 5) as usize..(3 * M + 19) as usize], 3 * M + 5).unwrap();
        drop(fix);
        // And through Ceph's own tool: `rbd export` of the full backup.
        let exported = dir.path().join("export.img");
        c.rbd(&["export", "--no-progress", "rbd/full", exported.to_str().unwrap()]);
        assert_same("rbd export of the full backup", &std::fs::read(&exported).unwrap(), &pit_full);
        chain_on_rbd(c, dir.path(), &["full", "inc1", "inc2"].map(manifest), &pits);
    });
    let writes = host.writes.load(Ordering::Relaxed);
    eprintln!("backups into RBD: {writes} host writes, {cow} went through the hook and copied");
    assert!(writes > 50, "the writers hardly wrote: {writes}");
    assert!(cow > 0, "no write went through an uncopied cluster: the hook path was not tested");
}

/// The chain of the backups into the RBD images `rbd/full`, `rbd/inc1`, `rbd/inc2` (manifests
/// `manifests`, point-in-time images `pits`), opened on read-only handles of the images:
/// each prefix restored into a file by a backup job equals its point in time;
/// verify-on-read finds a cluster overwritten in one image (EBADMSG there, the others read).
/// The manifests name their images, and `Chain::open` (in a child process) opens them.
fn chain_on_rbd(c: &Cluster, dir: &Path, manifests: &[PathBuf; 3], pits: &[Vec<u8>]) {
    let names = ["full", "inc1", "inc2"];
    let targets = || -> Vec<Arc<dyn BlockDriver>> {
        names.iter().map(|n| c.open(&format!("rbd:rbd/{n}"), false) as Arc<dyn BlockDriver>).collect()
    };
    for n in 1..=3 {
        let chain = Chain::open_drivers(&manifests[..n], targets()[..n].to_vec(), n == 3)
            .unwrap_or_else(|e| panic!("chain of {n} RBD backups: {e}"));
        let file = Arc::new(FileDriver::create(dir.join(format!("chain{n}.img")), chain.size()).unwrap());
        let job =
            backup_start(Arc::new(chain), file.clone(), BackupOptions { workers: 4, ..Default::default() }).unwrap();
        wait_end(&job, T).unwrap();
        assert_eq!(job.info().state, JobState::Completed);
        assert_same(&format!("chain of {n} RBD backups restored"), &contents(&*file), &pits[n - 1]);
    }
    // The manifests name their RBD images: `Chain::open` opens them itself, with the
    // default conf search. In a child process, so that CEPH_CONF is set for it alone.
    for (m, n) in manifests.iter().zip(names) {
        let want = format!("rbd:rbd/{n}");
        assert_eq!(Manifest::load(m).unwrap().target_rbd(), Some(want.as_str()));
    }
    let pit_file = dir.join("pit2.img");
    std::fs::write(&pit_file, &pits[2]).unwrap();
    let list: Vec<String> = manifests.iter().chain([&pit_file]).map(|p| p.display().to_string()).collect();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "rbd_driver_and_backups_against_a_real_cluster", "--nocapture"])
        .env("CEPH_CONF", &c.conf)
        .env(CHAIN_CHILD, list.join("\n"))
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("chain opened from the manifests' RBD targets"), "{text}");

    // A size the manifests do not say: refused.
    c.create("small", pits[0].len() as u64 - M);
    let mut t = targets();
    t[1] = c.open("rbd:rbd/small", false);
    let e = Chain::open_drivers(manifests, t, false).map(|_| ()).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    assert!(e.to_string().contains("link 1"), "{e}");

    // Damage: overwrite, behind the backup's back, a data cluster that the chain reads from
    // one image: preferably one of inc1 that inc2 does not hold (the middle link), else one
    // of the full backup that no incremental holds, else one of inc2 (the newest: always
    // read from it). Which clusters the writers left alone is up to the scheduling.
    let ms: Vec<Manifest> = manifests.iter().map(|m| Manifest::load(m).unwrap()).collect();
    let cs = ms[0].cluster_size;
    let held = |m: &Manifest, c: u64| m.runs.iter().any(|r| r.start <= c && c < r.start + r.count);
    let read_from = |i: usize| {
        ms[i]
            .runs
            .iter()
            .filter(|r| r.data)
            .flat_map(|r| r.start..r.start + r.count)
            .find(|&c| ms[i + 1..].iter().all(|later| !held(later, c)))
    };
    let (link, bad) = [1, 0, 2]
        .into_iter()
        .find_map(|i| read_from(i).map(|c| (i, c)))
        .expect("inc2 copied data clusters (the writers wrote data)");
    let (image, manifest_name) = (format!("rbd:rbd/{}", names[link]), format!("{}.manifest", names[link]));
    let tamper = c.open(&image, true);
    let mut orig = vec![0u8; cs as usize];
    tamper.read_at(&mut orig, bad * cs).unwrap();
    let mut changed = orig.clone();
    changed[100] ^= 0x5a;
    tamper.write_at(&changed, bad * cs).unwrap();
    drop(tamper);
    let chain = Chain::open_drivers(manifests, targets(), true).unwrap();
    let mut buf = vec![0u8; cs as usize];
    let e = chain.read_at(&mut buf, bad * cs).unwrap_err();
    assert_eq!(errno_of(&e), libc::EBADMSG, "{e}");
    assert!(e.to_string().contains(&manifest_name), "the error names the backup: {e}");
    let want = &pits[2];
    for cl in (0..chain.size() / cs).filter(|&cl| cl != bad) {
        chain.read_at(&mut buf, cl * cs).unwrap_or_else(|e| panic!("cluster {cl}: {e}"));
        assert!(buf == want[(cl * cs) as usize..((cl + 1) * cs) as usize], "cluster {cl} differs");
    }
    // Without verify-on-read the changed bytes read as they are; repaired, the chain verifies.
    let plain = Chain::open_drivers(manifests, targets(), false).unwrap();
    plain.read_at(&mut buf, bad * cs).unwrap();
    assert_eq!(buf, changed);
    let fix = c.open(&image, true);
    fix.write_at(&orig, bad * cs).unwrap();
    drop(fix);
    chain.read_at(&mut buf, bad * cs).unwrap();
    assert!(buf == want[(bad * cs) as usize..((bad + 1) * cs) as usize]);
    eprintln!("chain on RBD targets: restored 3 prefixes, damaged cluster {bad} of {image} found by verify-on-read");
}

/// A backup of an RBD image: the host writes through the hook, then into librbd.
fn backup_of_rbd(c: &Cluster) {
    let size = 32 * M;
    c.create("vm", size);
    let src = c.open("rbd:rbd/vm", true);
    src.write_at(&initial(size, 2), 0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let host = Host {
        src: src.clone(),
        bm: DirtyBitmap::new(size, 64 * K).unwrap(),
        job: RwLock::new(None),
        writes: AtomicU64::new(0),
    };
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let _stop = SetOnDrop(&stop);
        for w in 0..3 {
            let (host, stop) = (&host, &stop);
            s.spawn(move || writer(host, 20 + w, stop));
        }
        thread::sleep(Duration::from_millis(200));
        let target = Arc::new(FileDriver::create(dir.path().join("vm-backup.img"), size).unwrap());
        // An RBD snapshot at the same instant: Ceph's own point in time, to compare with.
        let (job, pit) = host.start(target.clone(), opts(SyncMode::Full, &host.bm, size), || {
            c.rbd(&["snap", "create", "rbd/vm@pit"]);
        });
        wait_end(&job, T).unwrap();
        let info = job.info();
        host.stop_jobs();
        assert_eq!(info.state, JobState::Completed);
        assert!(info.cow_requests > 0, "no host write went through the hook: {info:?}");
        assert_same("backup of the RBD image", &contents(&*target), &pit);
        let snap = c.open("rbd:rbd/vm@pit", false);
        assert_same("the RBD snapshot at the same instant", &contents(&*snap), &pit);
        assert_eq!(errno_of(&RbdDriver::open("rbd:rbd/vm@pit", Some(&c.conf), true).unwrap_err()), libc::EROFS);
    });
    assert!(host.writes.load(Ordering::Relaxed) > 20);
}

/// The environment variable that makes [`rbd_driver_and_backups_against_a_real_cluster`] the
/// child of [`chain_on_rbd`]: the manifests and the point-in-time image, one path a line.
const CHAIN_CHILD: &str = "COWBACKUP_RBD_CHAIN_CHILD";

/// In the child (CEPH_CONF set to the test cluster's conf): `Chain::open` of the manifests,
/// which name their RBD images, reads as the point in time.
fn chain_child(list: &str) {
    let paths: Vec<PathBuf> = list.lines().map(PathBuf::from).collect();
    let (manifests, pit) = paths.split_at(paths.len() - 1);
    let chain = Chain::open(manifests, true).unwrap_or_else(|e| panic!("Chain::open on RBD targets: {e}"));
    assert_same("chain opened from the manifests", &contents(&chain), &std::fs::read(&pit[0]).unwrap());
    eprintln!("chain opened from the manifests' RBD targets and read as the point in time");
}

#[test]
fn rbd_driver_and_backups_against_a_real_cluster() {
    if let Ok(list) = std::env::var(CHAIN_CHILD) {
        return chain_child(&list);
    }
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let Some(c) = Cluster::start() else { return };
    let t = Instant::now();
    driver_operations(&c);
    eprintln!("driver operations: {:?}", t.elapsed());
    let t = Instant::now();
    backups_into_rbd(&c);
    eprintln!("full + incremental backups into RBD: {:?}", t.elapsed());
    let t = Instant::now();
    backup_of_rbd(&c);
    eprintln!("backup of an RBD image: {:?}", t.elapsed());
}

/// The OSD goes away mid-job: `Report` fails, `Stop` pauses with the error (and cancels);
/// never `Completed`; every wait (the jobs, the hook, closing the images) is bounded.
#[test]
fn the_cluster_going_away_fails_or_pauses_jobs_and_nothing_hangs() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let Some(c) = Cluster::start() else { return };
    let size = 128 * M;
    let timeout = Duration::from_secs(5);
    let open = |name: &str| {
        c.create(name, size);
        let o = RbdOptions { conf: Some(c.conf.clone()), write: true, timeout };
        Arc::new(RbdDriver::open_with(&format!("rbd:rbd/{name}"), &o).unwrap())
    };
    let (ta, tb) = (open("dead-a"), open("dead-b"));
    let src = Arc::new(MemDriver::from_bytes(&Rng::new(3).bytes(size as usize)).unwrap());
    let slow = |on_target_error| BackupOptions {
        workers: 2,
        max_chunk: M,
        speed: 16 * M, // 8 s for the whole image: the OSD stops long before the end
        on_target_error,
        ..Default::default()
    };
    let a = backup_start(src.clone(), ta.clone(), slow(ErrorAction::Report)).unwrap();
    let b = backup_start(src.clone(), tb.clone(), slow(ErrorAction::Stop)).unwrap();
    until_for("both jobs copying", T, || a.info().bytes_copied >= 4 * M && b.info().bytes_copied >= 4 * M);

    let osd = c.pid("osd.0");
    // SAFETY: a plain kill(2) of the OSD this test's cluster started (pid from its pid file).
    assert_eq!(unsafe { libc::kill(osd, libc::SIGKILL) }, 0);
    let t = Instant::now();

    let ra = wait_end(&a, T);
    let ia = a.info();
    eprintln!("Report job ended after {:?}: {ia:?}", t.elapsed());
    assert_eq!(ia.state, JobState::Failed, "{ia:?}");
    let e = ra.unwrap_err();
    assert!(e.to_string().contains("rbd:rbd/dead-a"), "the error names the image: {e}");
    assert!(ia.offset < size || ia.bytes_failed > 0, "{ia:?}");

    until_for("the Stop job pauses with the error", T, || b.info().state == JobState::Paused);
    let ib = b.info();
    eprintln!("Stop job paused after {:?}: {ib:?}", t.elapsed());
    let e = ib.error.expect("a paused job shows its error");
    assert!(e.to_string().contains("rbd:rbd/dead-b"), "{e}");
    // The hook of the paused job must copy an uncopied cluster to the dead target: the guest
    // write fails (BreakGuestWrite, the default) after the timeout instead of hanging.
    let b = Arc::new(b);
    let (tx, rx) = std::sync::mpsc::channel();
    let hb = b.clone();
    thread::spawn(move || {
        let _ = tx.send(hb.cow_before_write(size - 4096, 4096));
    });
    let hook = rx.recv_timeout(T).expect("the hook hung on a dead cluster");
    let e = hook.expect_err("the hook cannot have copied to a dead cluster");
    eprintln!("hook on the dead cluster after {:?}: {e}", t.elapsed());
    assert_ne!(b.info().state, JobState::Completed);
    b.cancel();
    let rb = wait_end(&b, T);
    assert_eq!(b.info().state, JobState::Cancelled, "{rb:?}");

    // The hook of a failed job returns at once; closing the images is bounded by the timeout
    // (plain thread, not scoped: a hung close must fail the test, not hang it).
    a.cow_before_write(0, 4096).ok();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        drop((a, b));
        drop((ta, tb));
        let _ = tx.send(());
    });
    rx.recv_timeout(T).expect("closing the images of a dead cluster hung");
    eprintln!("closed after {:?}", t.elapsed());
}
