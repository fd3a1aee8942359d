//! Model-based random test: random sequences of operations on a live job — hook calls
//! and source writes, pause/resume/cancel/set_speed, transient target faults under
//! `Stop` with an operator's resume, bitmap marks, snapshot view reads — checked against
//! a simple reference model after every step and at the end:
//! - every view read equals the point-in-time image at those bytes;
//! - with or without `cow_buffer` (half the sequences);
//! - a job that reports success has a target equal to the point-in-time image on its
//!   copy set (all of it for Full/Top, the bitmap's clusters for Bitmap);
//! - the bitmap afterwards follows QEMU's rule (success: the marks made during the job;
//!   cancel or failure under OnSuccess: everything).
//!
//! Devices: memory, or (one sequence in four, chosen by the seed) sparse files in a temp
//! dir (`FileDriver`: pread/pwrite, holes, fallocate zeroing, SEEK_DATA for `Top`);
//! `COWBACKUP_MODEL_FILES=1` makes every sequence use files, `=0` none (scripts/soak.sh
//! runs both).
//!
//! Runs sequences until a time budget is spent: `COWBACKUP_MODEL_SECS` (default 15).
//! Every failure prints the seed; `COWBACKUP_MODEL_SEED=N` replays one sequence (with the
//! same `COWBACKUP_MODEL_FILES`).
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{contents, Rng};
use cowbackup::{
    backup_start, BackupOptions, BitmapMode, BlockDriver, DirtyBitmap, ErrorAction, ErrorKind, FaultDriver, FaultOp,
    FaultRule, FileDriver, JobState, MemDriver, OpenFlags, SyncMode,
};

const KIB: u64 = 1024;

/// The clusters (granule = cluster here) a set of byte ranges touches, as a sorted set.
fn granules(marks: &[(u64, u64)], g: u64) -> std::collections::BTreeSet<u64> {
    let mut s = std::collections::BTreeSet::new();
    for &(o, l) in marks {
        if l > 0 {
            s.extend((o / g)..(o + l).div_ceil(g));
        }
    }
    s
}

fn bitmap_granules(bm: &DirtyBitmap) -> std::collections::BTreeSet<u64> {
    let g = bm.granularity();
    let mut s = std::collections::BTreeSet::new();
    let mut from = 0;
    while let Some((o, l)) = bm.next_dirty(from) {
        s.extend((o / g)..(o + l).div_ceil(g));
        from = o + l;
    }
    s
}

fn run_one(seed: u64) {
    let mut rng = Rng::new(seed);
    let cluster = [4 * KIB, 16 * KIB, 64 * KIB][rng.below(3) as usize];
    let size = cluster * (8 + rng.below(56)) + rng.below(cluster);
    let sync = [SyncMode::Full, SyncMode::Top, SyncMode::None, SyncMode::Bitmap][rng.below(4) as usize];
    let files = match std::env::var("COWBACKUP_MODEL_FILES").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => rng.below(4) == 0,
    };
    let dir = tempfile::tempdir().unwrap();
    // A new device of `size` bytes reading as zeroes: a sparse file, or memory.
    let device = |name: &str| -> Arc<dyn BlockDriver> {
        if files {
            Arc::new(FileDriver::create_with(dir.path().join(name), size, OpenFlags::WRITE).unwrap())
        } else {
            Arc::new(MemDriver::new(size).unwrap())
        }
    };
    // The source: random data, some zero runs, some holes (for Top).
    let src = device("source.img");
    let mut off = 0;
    while off < size {
        let len = (cluster * (1 + rng.below(4))).min(size - off);
        match rng.below(3) {
            0 => src.write_at(&rng.bytes(len as usize), off).unwrap(),
            1 => src.write_at(&vec![0; len as usize], off).unwrap(),
            _ => {}
        }
        off += len;
    }
    let bm = DirtyBitmap::new(size, cluster).unwrap();
    let mut before_marks = Vec::new();
    for _ in 0..rng.below(6) {
        let (o, l) = (rng.below(size), 1 + rng.below(2 * cluster));
        let l = l.min(size - o);
        bm.mark(o, l).unwrap();
        before_marks.push((o, l));
    }
    let pit = contents(&*src);
    let target_fill = if rng.below(2) == 0 { 0 } else { 0xEE };
    let target_dev = device("target.img");
    if target_fill != 0 {
        target_dev.write_at(&vec![target_fill; size as usize], 0).unwrap();
    }
    let target = Arc::new(FaultDriver::new(target_dev));
    let with_bitmap = sync == SyncMode::Bitmap || rng.below(2) == 0;
    let opts = BackupOptions {
        cluster_size: cluster,
        sync,
        workers: 1 + rng.below(3) as usize,
        max_chunk: cluster * (1 + rng.below(8)),
        speed: [0, 256 * KIB, 1 << 20][rng.below(3) as usize],
        on_target_error: ErrorAction::Stop,
        bitmap: with_bitmap.then(|| bm.clone()),
        bitmap_mode: BitmapMode::OnSuccess,
        // Half the sequences keep old data in memory (cowbuf.rs), in a buffer of 1 to 16
        // clusters: hooks both save and copy; saved writes meet Stop faults and pauses.
        cow_buffer: if sync != SyncMode::None && rng.below(2) == 0 { cluster * (1 + rng.below(16)) } else { 0 },
        ..Default::default()
    };
    let job = backup_start(src.clone(), target.clone(), opts).unwrap();
    let view = job.snapshot().ok();
    let mut during_marks = Vec::new();
    let mut cancelled = false;
    let steps = 10 + rng.below(40);
    for step in 0..steps {
        match rng.below(10) {
            0..=3 => {
                // The host's write path: mark, hook, write.
                let len = 1 + rng.below(3 * cluster).min(size - 1);
                let o = rng.below(size - len + 1);
                bm.mark(o, len).unwrap();
                during_marks.push((o, len));
                match job.cow_before_write(o, len) {
                    Ok(()) => src.write_at(&rng.bytes(len as usize), o).unwrap(),
                    // An injected target fault under BreakGuestWrite: the host fails its
                    // write (does not write); the snapshot stays valid.
                    Err(e) => assert_eq!(e.errno(), libc::EIO, "seed {seed} step {step}: hook failed: {e}"),
                }
            }
            4 => {
                if let Some(v) = &view {
                    let len = 1 + rng.below(3 * cluster).min(size - 1);
                    let o = rng.below(size - len + 1);
                    let mut b = vec![0u8; len as usize];
                    match v.read_at(&mut b, o) {
                        Ok(()) => assert!(
                            b[..] == pit[o as usize..(o + len) as usize],
                            "seed {seed} step {step}: view read {o}+{len} differs from the point in time"
                        ),
                        Err(e) => {
                            let errno = cowbackup::errno_of(&e);
                            assert!(
                                [libc::ESTALE, libc::EACCES, libc::EIO].contains(&errno),
                                "seed {seed} step {step}: view read: {e}"
                            );
                        }
                    }
                }
            }
            5 => {
                let _ = job.pause();
            }
            6 => {
                let _ = job.resume();
            }
            7 => job.set_speed([0, 256 * KIB, 4 << 20][rng.below(3) as usize]),
            8 => {
                // A transient target fault (Stop): the operator resumes later.
                let o = rng.below(size);
                target.add(FaultRule::new(FaultOp::Write).range(o, 1).errno(libc::EIO).times(1));
            }
            _ => {
                if rng.below(8) == 0 {
                    job.cancel();
                    cancelled = true;
                }
            }
        }
    }
    // The operator: resume until the job ends (Stop errors are transient here).
    if sync == SyncMode::None && !cancelled {
        job.complete().unwrap();
    }
    let t = Instant::now();
    let result = loop {
        let _ = job.resume();
        if let Some(r) = job.wait_timeout(Duration::from_millis(20)) {
            break r;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "seed {seed}: the job never ended: {:?}", job.info());
    };
    let info = job.info();
    match &result {
        Ok(()) => {
            // (A cancel that came after the job had finished has no effect.)
            assert_eq!(info.state, JobState::Completed, "seed {seed}");
            let got = contents(&**target.inner());
            let copy_set: Option<std::collections::BTreeSet<u64>> = match sync {
                SyncMode::Full | SyncMode::Top => None,
                SyncMode::Bitmap => Some(granules(&before_marks, cluster)),
                _ => Some(Default::default()), // None: the target holds only what hooks copied
            };
            for c in 0..size.div_ceil(cluster) {
                if copy_set.as_ref().is_some_and(|s| !s.contains(&c)) {
                    continue;
                }
                let r = (c * cluster) as usize..((c + 1) * cluster).min(size) as usize;
                assert!(got[r.clone()] == pit[r], "seed {seed}: {sync:?}: cluster {c} of the target differs");
            }
            if with_bitmap {
                assert_eq!(bitmap_granules(&bm), granules(&during_marks, cluster), "seed {seed}: bitmap after success");
            }
        }
        Err(e) => {
            assert!(
                e.kind() == ErrorKind::Cancelled && cancelled,
                "seed {seed}: {sync:?}: the job failed without a fatal cause: {e} ({info:?})"
            );
            if with_bitmap {
                let mut all = before_marks.clone();
                all.extend(&during_marks);
                assert_eq!(bitmap_granules(&bm), granules(&all, cluster), "seed {seed}: bitmap after cancel");
            }
        }
    }
    if let Some(v) = view {
        assert!(v.read_at(&mut [0; 1], 0).is_err(), "seed {seed}: a view of an ended job must fail");
    }
}

#[test]
fn random_sequences_against_the_model() {
    if let Some(seed) = std::env::var("COWBACKUP_MODEL_SEED").ok().and_then(|s| s.parse().ok()) {
        run_one(seed);
        return;
    }
    let secs: u64 = std::env::var("COWBACKUP_MODEL_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let base: u64 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < Duration::from_secs(secs) || n < 20 {
        let seed = base.wrapping_add(n);
        let r = std::panic::catch_unwind(|| run_one(seed));
        if r.is_err() {
            let files = std::env::var("COWBACKUP_MODEL_FILES")
                .map(|v| format!(" COWBACKUP_MODEL_FILES={v}"))
                .unwrap_or_default();
            panic!("model test failed; replay with COWBACKUP_MODEL_SEED={seed}{files}");
        }
        n += 1;
    }
    println!("model: {n} random sequences in {:?}", t.elapsed());
}
