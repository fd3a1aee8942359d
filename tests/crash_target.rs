//! Crash consistency of the backup target.
//!
//! What "the target claims to be complete" means: nothing in a target file says so (it has
//! the full size from the start); the claim is the job's — its completion callback, `wait`
//! returning `Ok` and `info().state == Completed` — plus whatever marker the caller writes
//! after that. So:
//! - on the power-loss simulator (`CrashDriver` as target), crashed at every kind of point
//!   of a job (every write, zeroing and flush it makes, the final flush included, and
//!   after it; the job's configuration and host writes are random per seed): a
//!   job whose target lost power never reports completion, and whenever a job reports
//!   completion (checked inside the completion callback, and after `wait`) a power loss at
//!   that instant leaves the whole point-in-time image on the disk: the final flush came
//!   first. After any crash, every sector of the target holds either its old contents or
//!   point-in-time data, never anything else;
//! - with real processes: a child process backing up an image file (with host writes
//!   through the hook and a persistent bitmap) is killed with SIGKILL mid-backup. The
//!   target is a full-size file that is not the point-in-time image; the caller's marker
//!   (written after `Completed`) is absent, every block holds point-in-time data or was
//!   never written, and the persistent bitmap still holds everything the killed job was
//!   to copy, so the next incremental copies it again.
//!
//! The child is this test binary itself, run with `COWBACKUP_TARGET_CHILD` set.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{contents, Rng};
use cowbackup::{
    backup_start, BackupOptions, BitmapMode, BlockDriver, CrashDriver, DirtyBitmap, ErrorAction, FileDriver, JobState,
    MemDriver, OpenFlags, SyncMode,
};

const KIB: u64 = 1024;

/// What the completion callback saw: the result, and the target's durable contents then.
type Seen = Arc<Mutex<Vec<(bool, Option<Vec<u8>>)>>>;

/// One job onto a crash-simulated target that loses power at its `crash_at`-th operation
/// (write, write_zeroes or flush; `None`: never). Returns the number of target operations
/// the job made (when it did not crash).
fn one_job(seed: u64, crash_at: Option<u64>) -> u64 {
    let mut rng = Rng::new(seed);
    let cluster = [4 * KIB, 16 * KIB, 64 * KIB][rng.below(3) as usize];
    let size = cluster * (4 + rng.below(28)) + rng.below(cluster);
    let src = Arc::new(MemDriver::new(size).unwrap());
    let mut off = 0;
    while off < size {
        let len = (cluster * (1 + rng.below(3))).min(size - off);
        if rng.below(3) != 0 {
            src.write_at(&rng.bytes(len as usize), off).unwrap();
        }
        off += len;
    }
    let pit = contents(&*src);
    let target = Arc::new(CrashDriver::with_seed(size, seed).unwrap());
    // Old contents, durable: after a crash a sector holds these or point-in-time data.
    let old = vec![0xEE; size as usize];
    target.write_at(&old, 0).unwrap();
    target.flush().unwrap();
    let before = target.stats();
    if let Some(k) = crash_at {
        target.crash_after(k);
    }
    let seen: Seen = Arc::default();
    let (t, s) = (target.clone(), seen.clone());
    let sync = if rng.below(3) == 0 { SyncMode::Top } else { SyncMode::Full };
    let stop_policy = rng.below(2) == 0;
    let opts = BackupOptions {
        cluster_size: cluster,
        sync,
        workers: 1 + rng.below(3) as usize,
        max_chunk: cluster * (1 + rng.below(4)),
        on_target_error: if stop_policy { ErrorAction::Stop } else { ErrorAction::Report },
        on_complete: Some(Arc::new(move |r: &cowbackup::Result<()>| {
            // The instant the job claims completion: what would a power loss now leave?
            let durable = r.is_ok().then(|| t.durable_to_vec());
            s.lock().unwrap().push((r.is_ok(), durable));
        })),
        ..Default::default()
    };
    let job = backup_start(src.clone(), target.clone(), opts).unwrap();
    // The host writes meanwhile, through the hook.
    for _ in 0..rng.below(6) {
        let len = 1 + rng.below(2 * cluster).min(size - 1);
        let o = rng.below(size - len + 1);
        if job.cow_before_write(o, len).is_ok() {
            src.write_at(&rng.bytes(len as usize), o).unwrap();
        }
    }
    // The operator: a Stop-paused job is resumed a few times (the target stays dead:
    // every retry fails), then cancelled.
    let t0 = Instant::now();
    let mut resumes = 0;
    let result = loop {
        if let Some(r) = job.wait_timeout(Duration::from_millis(20)) {
            break r;
        }
        if job.info().state == JobState::Paused {
            resumes += 1;
            if resumes > 3 {
                job.cancel();
            } else {
                let _ = job.resume();
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "seed {seed}: the job never ended: {:?}", job.info());
    };
    let crashed = target.stats().crashes > 0;
    if crash_at.is_none() {
        assert!(result.is_ok(), "seed {seed}: a job without a crash failed: {result:?}");
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "seed {seed}: the completion callback ran {} times", seen.len());
    assert_eq!(seen[0].0, result.is_ok(), "seed {seed}: callback and wait disagree");
    let what = format!("seed {seed} ({sync:?}, cluster {cluster}, size {size}, crash at {crash_at:?})");
    if crashed {
        assert!(result.is_err(), "{what}: the target lost power, yet the job reported completion");
        assert_ne!(job.info().state, JobState::Completed, "{what}");
    }
    if result.is_ok() {
        assert_eq!(job.info().state, JobState::Completed);
        // When the callback ran, nothing of the image was volatile any more...
        let at_callback = seen[0].1.as_ref().unwrap();
        assert!(at_callback[..] == pit[..], "{what}: completion was reported before the image was durable");
        // ...and a power loss now keeps it all.
        target.crash();
        target.restart();
        assert!(
            target.durable_to_vec() == pit,
            "{what}: a power loss after completion lost part of the image (no final flush?)"
        );
    } else {
        // A job that did not complete: whatever reached the disk is old contents or
        // point-in-time data, sector by sector (copied clusters are valid, the rest undefined).
        if !crashed {
            target.crash();
        }
        target.restart();
        let durable = target.durable_to_vec();
        for (i, ((d, p), o)) in durable.iter().zip(&pit).zip(&old).enumerate() {
            assert!(d == p || d == o, "{what}: byte {i} of the target is neither old contents nor point-in-time data");
        }
    }
    let after = target.stats();
    (after.writes + after.flushes) - (before.writes + before.flushes)
}

#[test]
fn a_target_power_loss_never_leaves_a_job_claiming_completion() {
    // COWBACKUP_CRASH_SEED=n shifts the seeds, for longer runs.
    let base: u64 = std::env::var("COWBACKUP_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let seeds = if cfg!(debug_assertions) { 6 } else { 20 };
    let (mut runs, mut completed_runs) = (0, 0);
    for seed in (0..seeds).map(|s| s + base * 1000) {
        // A run without a crash gives the number of operations; then a crash at every one
        // of them (the final flush is the very last) and just after the last.
        let ops = one_job(seed, None);
        completed_runs += 1;
        for k in 0..ops + 2 {
            one_job(seed, Some(k));
            runs += 1;
        }
    }
    println!("{completed_runs} jobs without a crash, {runs} with a power loss at a chosen operation");
}

// ---- a real process killed mid-backup ----

const CHILD_ENV: &str = "COWBACKUP_TARGET_CHILD";
const IMG: u64 = 16 << 20;
const G: u64 = 64 * KIB;

/// The child's side: in the directory named by `COWBACKUP_TARGET_CHILD`, open `disk.img`
/// and `disk.bitmap`, start an incremental backup (`SyncMode::Bitmap`) into the new file
/// `inc.img` at 2 MiB/s, write to the disk through the host's path (mark, hook, write)
/// meanwhile, and after `Completed` write the marker `inc.img.done` — the caller's proof of
/// a complete backup. Prints `STARTED` once the job runs. Does nothing in a normal run.
#[test]
fn child_process() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let dir = Path::new(&dir);
    let disk = Arc::new(FileDriver::open(dir.join("disk.img"), OpenFlags::WRITE).unwrap());
    let bm = DirtyBitmap::open(dir.join("disk.bitmap")).unwrap();
    let target = Arc::new(FileDriver::create(dir.join("inc.img"), IMG).unwrap());
    let opts = BackupOptions {
        sync: SyncMode::Bitmap,
        bitmap: Some(bm.clone()),
        bitmap_mode: BitmapMode::OnSuccess,
        speed: 2 << 20,
        ..Default::default()
    };
    let job = backup_start(disk.clone(), target, opts).unwrap();
    let mut out = std::io::stdout();
    writeln!(out, "\nSTARTED").unwrap();
    out.flush().unwrap();
    let mut rng = Rng::new(std::process::id().into());
    while job.wait_timeout(Duration::from_millis(5)).is_none() {
        let o = rng.below(IMG / 4096) * 4096;
        bm.mark(o, 4096).unwrap();
        job.cow_before_write(o, 4096).unwrap();
        disk.write_at(&rng.bytes(4096), o).unwrap();
    }
    job.wait().unwrap();
    std::fs::write(dir.join("inc.img.done"), b"completed\n").unwrap();
    writeln!(out, "\nDONE").unwrap();
}

/// The granules of a bitmap, as byte offsets.
fn dirty_granules(bm: &DirtyBitmap) -> Vec<u64> {
    let mut v = Vec::new();
    let mut from = 0;
    while let Some((o, l)) = bm.next_dirty(from) {
        v.extend((o..o + l).step_by(bm.granularity() as usize));
        from = o + l;
    }
    v
}

#[test]
fn sigkill_mid_backup_leaves_a_target_that_is_not_taken_for_complete() {
    let mut rng = Rng::new(7);
    for it in 0..4u64 {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // The disk, the point-in-time copy for checking, and a bitmap with 160 granules marked.
        let img = rng.bytes(IMG as usize);
        std::fs::write(dir.join("disk.img"), &img).unwrap();
        let frozen = {
            let bm = DirtyBitmap::create(dir.join("disk.bitmap"), IMG, G).unwrap();
            for _ in 0..160 {
                bm.mark(rng.below(IMG / G) * G, 1).unwrap();
            }
            dirty_granules(&bm)
        };
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["child_process", "--exact", "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let started = lines.by_ref().map_while(|l| l.ok()).any(|l| l == "STARTED");
        assert!(started, "iteration {it}: the child did not start its backup");
        // Mid-backup: ~10 MiB to copy at 2 MiB/s takes ~5 s.
        std::thread::sleep(Duration::from_millis(100 + rng.below(900)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let done: Vec<String> = lines.map_while(|l| l.ok()).collect();
        assert!(!done.iter().any(|l| l == "DONE"), "iteration {it}: the backup finished before the kill");

        // What is left: a full-size target file that nothing distinguishes from a complete one...
        let target = FileDriver::open(dir.join("inc.img"), OpenFlags::empty()).unwrap();
        assert_eq!(target.size(), IMG, "iteration {it}");
        // ...except the marker the caller writes after Completed, which is absent.
        assert!(!dir.join("inc.img.done").exists(), "iteration {it}: marker of a killed backup");
        // Clusters already copied hold point-in-time data; the rest was never written.
        let got = contents(&target);
        let mut copied = 0;
        for (b, (g, p)) in got.chunks(4096).zip(img.chunks(4096)).enumerate() {
            if g == p {
                copied += 1;
            } else {
                assert!(
                    g.iter().all(|&x| x == 0),
                    "iteration {it}: block {b} of the target is neither copied nor untouched"
                );
            }
        }
        let missing =
            frozen.iter().filter(|&&o| got[o as usize..(o + G) as usize] != img[o as usize..(o + G) as usize]);
        assert!(missing.count() > 0, "iteration {it}: the killed job had copied everything ({copied} blocks)");

        // The persistent bitmap: reopens (the dead process's lock is gone) and still holds
        // every granule the killed job was to copy, plus the child's marks.
        let bm = DirtyBitmap::open(dir.join("disk.bitmap")).unwrap_or_else(|e| panic!("iteration {it}: {e}"));
        let now = dirty_granules(&bm);
        for g in &frozen {
            assert!(now.contains(g), "iteration {it}: granule at {g} of the killed job left the bitmap");
        }
        // The next incremental repeats them: its copy set covers every one.
        let disk = Arc::new(FileDriver::open(dir.join("disk.img"), OpenFlags::WRITE).unwrap());
        let inc2 = Arc::new(FileDriver::create(dir.join("inc2.img"), IMG).unwrap());
        let opts = BackupOptions { sync: SyncMode::Bitmap, bitmap: Some(bm.clone()), ..Default::default() };
        let job = backup_start(disk.clone(), inc2.clone(), opts).unwrap();
        let extents = job.extents();
        job.wait_timeout(Duration::from_secs(60)).expect("the next incremental ended").unwrap();
        let disk_now = contents(&*disk);
        let inc2_now = contents(&*inc2);
        for &g in &frozen {
            assert!(
                extents.iter().any(|&(o, l)| o <= g && g + G <= o + l),
                "iteration {it}: the next incremental does not copy granule {g}"
            );
            let r = g as usize..(g + G) as usize;
            assert!(inc2_now[r.clone()] == disk_now[r], "iteration {it}: granule {g} not in the next incremental");
        }
    }
}
