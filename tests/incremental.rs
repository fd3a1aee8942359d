//! Jobs with dirty bitmaps (sync = Bitmap, Full/Top + bitmap, pull mode) and consistency
//! groups: QEMU iotest 257's matrix and 124's chains, re-expressed. Chains under live
//! writers: incremental_chain.rs; persistent bitmaps under jobs: incremental_persistent.rs.
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{one_parked_worker, wait_end, wait_parked, Gate, Rng};
use cowbackup::{
    backup_start, backup_start_group, BackupOptions, BitmapMode, BlockDriver, DirtyBitmap, ErrorKind, FaultDriver,
    FaultOp, FaultRule, Job, JobState, MemDriver, SyncMode,
};

const K64: u64 = 64 * 1024;
const SIZE: u64 = 64 << 20;

fn dirty_clusters(bm: &DirtyBitmap) -> Vec<u64> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some((off, len)) = bm.next_dirty(from) {
        out.extend((off / K64)..(off + len).div_ceil(K64));
        from = off + len;
    }
    out
}

/// Write random data to `clusters` of the source, marking the bitmap first (the host's path).
fn write_clusters(src: &dyn BlockDriver, bm: &DirtyBitmap, job: Option<&cowbackup::Job>, clusters: &[u64], seed: u64) {
    let mut rng = Rng::new(seed);
    for &c in clusters {
        let data = rng.bytes(K64 as usize);
        bm.mark(c * K64, K64).unwrap();
        if let Some(job) = job {
            job.cow_before_write(c * K64, K64).unwrap();
        }
        src.write_at(&data, c * K64).unwrap();
    }
}

fn setup() -> (Arc<MemDriver>, Arc<DirtyBitmap>) {
    let src = Arc::new(MemDriver::from_bytes(&Rng::new(1).bytes(SIZE as usize)).unwrap());
    let bm = DirtyBitmap::new(SIZE, K64).unwrap();
    (src, bm)
}

const G1: [u64; 6] = [0, 15, 16, 512, 513, 1022];
const G2: [u64; 7] = [1, 14, 15, 513, 514, 1022, 1023];

#[test]
fn incremental_copies_exactly_the_dirty_clusters_and_on_success_keeps_the_new_writes() {
    let (src, bm) = setup();
    write_clusters(&src, &bm, None, &G1, 2);
    let before = common::contents(&*src);
    let target = Arc::new(MemDriver::new(SIZE).unwrap());
    // Throttled (one cluster a second) so the job is still running while the test checks
    // the bitmap is busy and writes through the hook: 6 clusters could be done before the
    // first check (it failed once under load).
    let opts = BackupOptions {
        sync: SyncMode::Bitmap,
        bitmap: Some(bm.clone()),
        workers: 1,
        max_chunk: K64,
        speed: K64,
        ..Default::default()
    };
    let job = backup_start(src.clone(), target.clone(), opts).unwrap();
    assert!(bm.is_busy());
    assert_eq!(bm.clear().unwrap_err().kind(), ErrorKind::Busy);
    write_clusters(&src, &bm, Some(&job), &G2, 3);
    job.set_speed(0);
    job.wait().unwrap();
    let info = job.info();
    assert_eq!(info.state, JobState::Completed);
    assert_eq!(info.bytes_copied + info.bytes_zero, 6 * K64, "{info:?}");
    assert_eq!(info.bytes_skipped, SIZE - 6 * K64);
    assert_eq!(info.offset, SIZE);
    assert!(!bm.is_busy());
    assert_eq!(dirty_clusters(&bm), G2.to_vec());
    let t = common::contents(&*target);
    for c in G1 {
        let r = (c * K64) as usize..((c + 1) * K64) as usize;
        assert_eq!(t[r.clone()], before[r], "cluster {c}");
    }
}

#[test]
fn never_keeps_everything_and_cancel_and_failure_follow_qemus_rule() {
    for mode in [BitmapMode::Never, BitmapMode::OnSuccess, BitmapMode::Always] {
        // Completed under Never: G1 ∪ G2.
        if mode == BitmapMode::Never {
            let (src, bm) = setup();
            write_clusters(&src, &bm, None, &G1, 2);
            let opts = BackupOptions {
                sync: SyncMode::Bitmap,
                bitmap: Some(bm.clone()),
                bitmap_mode: mode,
                ..Default::default()
            };
            let job = backup_start(src.clone(), Arc::new(MemDriver::new(SIZE).unwrap()), opts).unwrap();
            write_clusters(&src, &bm, Some(&job), &G2, 3);
            job.wait().unwrap();
            let mut want: Vec<u64> = G1.iter().chain(G2.iter()).copied().collect();
            want.sort();
            want.dedup();
            assert_eq!(dirty_clusters(&bm), want);
        }
        // A source read error on cluster 513 (after 0, 15, 16, 512 were copied by one worker).
        let (src, bm) = setup();
        write_clusters(&src, &bm, None, &G1, 2);
        let faulty = Arc::new(FaultDriver::new(MemDriver::from_bytes(&common::contents(&*src)).unwrap()));
        faulty.add(FaultRule::new(FaultOp::Read).range(513 * K64, 1).errno(libc::EIO).forever());
        let opts = BackupOptions {
            sync: SyncMode::Bitmap,
            bitmap: Some(bm.clone()),
            bitmap_mode: mode,
            workers: 1,
            max_chunk: K64,
            ..Default::default()
        };
        let job = backup_start(faulty, Arc::new(MemDriver::new(SIZE).unwrap()), opts).unwrap();
        assert_eq!(job.wait().unwrap_err().errno(), libc::EIO);
        let got = dirty_clusters(&bm);
        match mode {
            BitmapMode::Always => assert_eq!(got, vec![513, 1022], "Always: G1 minus what was copied"),
            _ => assert_eq!(got, G1.to_vec(), "{mode:?}: G1 back"),
        }
    }
}

#[test]
fn full_with_a_bitmap_starts_a_chain_and_rejections_are_qemus() {
    let (src, bm) = setup();
    write_clusters(&src, &bm, None, &G1, 2);
    let opts = BackupOptions { sync: SyncMode::Full, bitmap: Some(bm.clone()), ..Default::default() };
    let job = backup_start(src.clone(), Arc::new(MemDriver::new(SIZE).unwrap()), opts).unwrap();
    write_clusters(&src, &bm, Some(&job), &G2, 3);
    job.wait().unwrap();
    assert_eq!(dirty_clusters(&bm), G2.to_vec());
    let t = || Arc::new(MemDriver::new(SIZE).unwrap());
    let e =
        backup_start(src.clone(), t(), BackupOptions { sync: SyncMode::Bitmap, ..Default::default() }).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let never = BackupOptions { bitmap: Some(bm.clone()), bitmap_mode: BitmapMode::Never, ..Default::default() };
    assert_eq!(backup_start(src.clone(), t(), never).err().unwrap().kind(), ErrorKind::InvalidInput);
    let other = DirtyBitmap::new(SIZE / 2, K64).unwrap();
    let o = BackupOptions { sync: SyncMode::Bitmap, bitmap: Some(other), ..Default::default() };
    assert_eq!(backup_start(src.clone(), t(), o).err().unwrap().kind(), ErrorKind::InvalidInput);
    let gen = bm.generation();
    let o = BackupOptions { sync: SyncMode::None, bitmap: Some(bm.clone()), ..Default::default() };
    let holder = backup_start(src.clone(), t(), o).unwrap();
    let o = BackupOptions { sync: SyncMode::Bitmap, bitmap: Some(bm.clone()), ..Default::default() };
    assert_eq!(backup_start(src.clone(), t(), o).err().unwrap().kind(), ErrorKind::Busy);
    holder.cancel();
    assert_eq!(holder.wait().unwrap_err().kind(), ErrorKind::Cancelled);
    assert_eq!(dirty_clusters(&bm), G2.to_vec(), "cancel of a pull job: bitmap back");
    assert_eq!(bm.generation(), gen);
}

#[test]
fn a_group_fails_together_and_leaves_every_bitmap_unchanged() {
    let (a, bma) = setup();
    let (b, bmb) = setup();
    write_clusters(&a, &bma, None, &G1, 2);
    write_clusters(&b, &bmb, None, &G2, 3);
    let fb = Arc::new(FaultDriver::new(MemDriver::from_bytes(&common::contents(&*b)).unwrap()));
    fb.add(FaultRule::new(FaultOp::Read).errno(libc::EIO).times(1));
    let o = |bm: &Arc<DirtyBitmap>| BackupOptions {
        sync: SyncMode::Bitmap,
        bitmap: Some(bm.clone()),
        ..Default::default()
    };
    let jobs = backup_start_group(vec![
        (a.clone() as Arc<dyn BlockDriver>, Arc::new(MemDriver::new(SIZE).unwrap()) as Arc<dyn BlockDriver>, o(&bma)),
        (fb.clone() as Arc<dyn BlockDriver>, Arc::new(MemDriver::new(SIZE).unwrap()) as Arc<dyn BlockDriver>, o(&bmb)),
    ])
    .unwrap();
    assert_eq!(jobs[0].wait().unwrap_err().kind(), ErrorKind::Cancelled);
    assert_eq!(jobs[1].wait().unwrap_err().errno(), libc::EIO);
    assert_eq!(dirty_clusters(&bma), G1.to_vec());
    assert_eq!(dirty_clusters(&bmb), G2.to_vec());
    // A bad input starts nothing and leaves the bitmaps alone.
    let bad = backup_start_group(vec![
        (a.clone() as Arc<dyn BlockDriver>, Arc::new(MemDriver::new(SIZE).unwrap()) as Arc<dyn BlockDriver>, o(&bma)),
        (
            b.clone() as Arc<dyn BlockDriver>,
            Arc::new(MemDriver::new(SIZE / 2).unwrap()) as Arc<dyn BlockDriver>,
            o(&bmb),
        ),
    ]);
    assert_eq!(bad.err().unwrap().kind(), ErrorKind::InvalidInput);
    assert!(!bma.is_busy() && !bmb.is_busy());
    // Rerun: both complete, both bitmaps emptied.
    let jobs = backup_start_group(vec![
        (a.clone() as Arc<dyn BlockDriver>, Arc::new(MemDriver::new(SIZE).unwrap()) as Arc<dyn BlockDriver>, o(&bma)),
        (b.clone() as Arc<dyn BlockDriver>, Arc::new(MemDriver::new(SIZE).unwrap()) as Arc<dyn BlockDriver>, o(&bmb)),
    ])
    .unwrap();
    for j in &jobs {
        j.wait().unwrap();
    }
    assert_eq!(bma.count() + bmb.count(), 0);
}

// ---- QEMU iotest 257, extended: cancel after one cluster, read errors, Full + bitmap ----

const T: Duration = Duration::from_secs(20);

fn union(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut v: Vec<u64> = a.iter().chain(b).copied().collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn minus(a: &[u64], b: &[u64]) -> Vec<u64> {
    a.iter().copied().filter(|c| !b.contains(c)).collect()
}

/// The clusters of a job's copy set ([`Job::extents`]).
fn extent_clusters(job: &Job) -> Vec<u64> {
    job.extents().iter().flat_map(|&(o, l)| (o / K64)..(o + l).div_ceil(K64)).collect()
}

/// Apply `clusters` of `from` onto `onto` (a restore step: holes read as zeroes).
fn apply(onto: &mut [u8], from: &dyn BlockDriver, clusters: &[u64]) {
    for &c in clusters {
        let r = (c * K64) as usize..((c + 1) * K64) as usize;
        from.read_at(&mut onto[r], c * K64).unwrap();
    }
}

/// A full backup of `src` with `bm` (OnSuccess, nothing written during it): the chain's
/// base. Returns the target.
fn full_backup(src: Arc<dyn BlockDriver>, bm: &Arc<DirtyBitmap>) -> Arc<MemDriver> {
    let target = Arc::new(MemDriver::new(SIZE).unwrap());
    let opts = BackupOptions { sync: SyncMode::Full, bitmap: Some(bm.clone()), ..Default::default() };
    let job = backup_start(src, target.clone(), opts).unwrap();
    wait_end(&job, T).unwrap();
    assert_eq!(job.extents(), vec![(0, SIZE)], "Full: the whole device");
    assert_eq!(bm.count(), 0, "no write during the full backup: the bitmap starts empty");
    target
}

/// Cancel an incremental of G1 after exactly one cluster (0) was copied: the worker is held
/// at a gate on its second chunk (cluster 15) while the host writes G2 through the hook (the
/// write of 15 waits for the held worker), then the job is cancelled.
fn cancel_after_one_cluster(mode: BitmapMode) {
    let src = Gate::new(MemDriver::from_bytes(&Rng::new(1).bytes(SIZE as usize)).unwrap(), false);
    let bm = DirtyBitmap::new(SIZE, K64).unwrap();
    write_clusters(&*src, &bm, None, &G1, 2);
    let gen = bm.generation();
    src.hold_only(15 * K64, SIZE - 15 * K64);
    src.close();
    let opts =
        BackupOptions { sync: SyncMode::Bitmap, bitmap: Some(bm.clone()), bitmap_mode: mode, ..one_parked_worker() };
    let job = backup_start(src.clone(), Arc::new(MemDriver::new(SIZE).unwrap()), opts).unwrap();
    let _open = src.open_on_drop();
    wait_parked(&src);
    assert_eq!(src.parked(), vec![(15 * K64, K64)], "the worker holds cluster 15");
    let i = job.info();
    assert_eq!(i.bytes_copied + i.bytes_zero, K64, "exactly cluster 0 copied: {i:?}");
    assert_eq!(extent_clusters(&job), G1.to_vec());
    std::thread::scope(|s| {
        let _open = src.open_on_drop();
        let writer = s.spawn(|| write_clusters(&*src, &bm, Some(&job), &G2, 3));
        common::until("the hook on cluster 15 to wait for the held worker", || job.info().cow_waits >= 1);
        job.cancel();
        // The waiting hook returns at the cancel (afterwards the hook is a no-op).
        common::join_within("the host writer", writer, T);
    });
    src.open();
    assert_eq!(wait_end(&job, T).unwrap_err().kind(), ErrorKind::Cancelled);
    assert_eq!(job.info().state, JobState::Cancelled);
    assert!(!bm.is_busy());
    let got = dirty_clusters(&bm);
    match mode {
        BitmapMode::Always => {
            // Cluster 15 may have been copied after the cancel (the held chunk went on);
            // it is in G2 either way.
            assert_eq!(got, union(&minus(&G1, &[0]), &G2), "Always: (G1 - copied) + new writes");
            assert_eq!(bm.generation(), gen + 1, "Always: cluster 0 left the bitmap");
        }
        _ => {
            assert_eq!(got, union(&G1, &G2), "{mode:?}: G1 + new writes");
            assert_eq!(bm.generation(), gen, "{mode:?}: nothing removed");
        }
    }
}

#[test]
fn cancel_after_one_cluster_on_success_keeps_g1_and_the_new_writes() {
    cancel_after_one_cluster(BitmapMode::OnSuccess);
}

#[test]
fn cancel_after_one_cluster_never_keeps_g1_and_the_new_writes() {
    cancel_after_one_cluster(BitmapMode::Never);
}

#[test]
fn cancel_after_one_cluster_always_drops_only_the_copied_cluster() {
    cancel_after_one_cluster(BitmapMode::Always);
}

/// A full backup, G1 written, an incremental that fails on a source read error at cluster
/// 513 (after 0, 15, 16, 512), G2 written, then the next incremental: the chain restores
/// the source exactly. Under `Always` the failed job's copied clusters are part of the chain.
fn read_error_then_next_incremental(mode: BitmapMode) {
    let src = Arc::new(FaultDriver::new(MemDriver::from_bytes(&Rng::new(1).bytes(SIZE as usize)).unwrap()));
    let bm = DirtyBitmap::new(SIZE, K64).unwrap();
    let full = full_backup(src.clone(), &bm);
    write_clusters(&*src, &bm, None, &G1, 2);
    let gen = bm.generation();
    let rule = src.add(FaultRule::new(FaultOp::Read).range(513 * K64, 1).errno(libc::EIO).forever());
    let partial = Arc::new(MemDriver::new(SIZE).unwrap());
    let opts = BackupOptions {
        sync: SyncMode::Bitmap,
        bitmap: Some(bm.clone()),
        bitmap_mode: mode,
        workers: 1,
        max_chunk: K64,
        ..Default::default()
    };
    let failed = backup_start(src.clone(), partial.clone(), opts).unwrap();
    assert_eq!(wait_end(&failed, T).unwrap_err().errno(), libc::EIO);
    assert_eq!(failed.info().state, JobState::Failed);
    assert_eq!(extent_clusters(&failed), G1.to_vec(), "the copy set stays what it was at start");
    src.remove(rule);
    let after = dirty_clusters(&bm);
    let copied = match mode {
        BitmapMode::Always => {
            assert_eq!(after, vec![513, 1022], "Always: G1 minus what was copied");
            assert_eq!(bm.generation(), gen + 1);
            // Nothing was written during the job: what left the bitmap was copied.
            minus(&extent_clusters(&failed), &after)
        }
        _ => {
            assert_eq!(after, G1.to_vec(), "OnSuccess: G1 back");
            assert_eq!(bm.generation(), gen, "a failed OnSuccess job removes nothing");
            vec![]
        }
    };
    write_clusters(&*src, &bm, None, &G2, 3);
    let inc = Arc::new(MemDriver::new(SIZE).unwrap());
    let opts = BackupOptions { sync: SyncMode::Bitmap, bitmap: Some(bm.clone()), ..Default::default() };
    let next = backup_start(src.clone(), inc.clone(), opts).unwrap();
    wait_end(&next, T).unwrap();
    assert_eq!(extent_clusters(&next), union(&after, &G2));
    assert_eq!(bm.count(), 0);
    // Restore: full, then (Always) the failed job's copied clusters, then the incremental.
    let mut image = common::contents(&*full);
    apply(&mut image, &*partial, &copied);
    apply(&mut image, &*inc, &extent_clusters(&next));
    common::assert_same("restored chain", &image, &common::contents(&*src));
}

#[test]
fn read_error_on_success_gives_g1_back_and_the_next_incremental_restores_exactly() {
    read_error_then_next_incremental(BitmapMode::OnSuccess);
}

#[test]
fn read_error_always_keeps_what_was_copied_and_the_next_incremental_restores_exactly() {
    read_error_then_next_incremental(BitmapMode::Always);
}

#[test]
fn full_with_a_bitmap_on_success_leaves_only_the_writes_made_during_the_job() {
    let src = Gate::new(MemDriver::from_bytes(&Rng::new(1).bytes(SIZE as usize)).unwrap(), true);
    let bm = DirtyBitmap::new(SIZE, K64).unwrap();
    write_clusters(&*src, &bm, None, &G1, 2);
    let pit = common::contents(&*src);
    let target = Arc::new(MemDriver::new(SIZE).unwrap());
    let opts = BackupOptions { sync: SyncMode::Full, bitmap: Some(bm.clone()), ..one_parked_worker() };
    let job = backup_start(src.clone(), target.clone(), opts).unwrap();
    let _open = src.open_on_drop();
    wait_parked(&src); // the background copy is held: G2 goes through the hook
    write_clusters(&*src, &bm, Some(&job), &G2, 3);
    assert_eq!(dirty_clusters(&bm), union(&G1, &G2), "while busy: frozen + new marks");
    src.open();
    wait_end(&job, T).unwrap();
    assert_eq!(job.info().cow_bytes, G2.len() as u64 * K64, "G2 copied by the hook");
    assert_eq!(dirty_clusters(&bm), G2.to_vec(), "G1 (before the job) is gone: only writes during it");
    common::assert_same("full backup", &common::contents(&*target), &pit);
    // The chain goes on: an incremental of G2 restores the source.
    let inc = Arc::new(MemDriver::new(SIZE).unwrap());
    let opts = BackupOptions { sync: SyncMode::Bitmap, bitmap: Some(bm.clone()), ..Default::default() };
    let job = backup_start(src.clone(), inc.clone(), opts).unwrap();
    wait_end(&job, T).unwrap();
    let mut image = common::contents(&*target);
    apply(&mut image, &*inc, &extent_clusters(&job));
    common::assert_same("full + incremental", &image, &common::contents(&*src));
}

#[test]
fn full_with_a_bitmap_that_fails_on_success_keeps_everything() {
    let src = Arc::new(FaultDriver::new(MemDriver::from_bytes(&Rng::new(1).bytes(SIZE as usize)).unwrap()));
    let bm = DirtyBitmap::new(SIZE, K64).unwrap();
    write_clusters(&*src, &bm, None, &G1, 2);
    let gen = bm.generation();
    src.add(FaultRule::new(FaultOp::Read).range(SIZE - K64, K64).errno(libc::EIO).forever());
    let opts = BackupOptions { sync: SyncMode::Full, bitmap: Some(bm.clone()), workers: 1, ..Default::default() };
    let job = backup_start(src.clone(), Arc::new(MemDriver::new(SIZE).unwrap()), opts).unwrap();
    write_clusters(&*src, &bm, Some(&job), &[2, 3], 3);
    assert_eq!(wait_end(&job, T).unwrap_err().errno(), libc::EIO);
    assert_eq!(dirty_clusters(&bm), union(&G1, &[2, 3]));
    assert_eq!(bm.generation(), gen);
}

#[test]
fn extents_are_the_copy_set_at_start_merged_and_clipped() {
    // Granules of 16 KiB on 64 KiB clusters, and a device ending inside a cluster.
    let size = 10 * K64 + 5000;
    let src = Arc::new(MemDriver::from_bytes(&Rng::new(4).bytes(size as usize)).unwrap());
    let bm = DirtyBitmap::new(size, 16 * 1024).unwrap();
    bm.mark(K64 + 100, 1).unwrap(); // cluster 1
    bm.mark(2 * K64 + 40_000, 30_000).unwrap(); // clusters 2 and 3: merged with 1
    bm.mark(size - 1, 1).unwrap(); // the partial last cluster
    let opts = BackupOptions { sync: SyncMode::Bitmap, bitmap: Some(bm.clone()), ..Default::default() };
    let job = backup_start(src.clone(), Arc::new(MemDriver::new(size).unwrap()), opts).unwrap();
    let want = vec![(K64, 3 * K64), (10 * K64, 5000)];
    assert_eq!(job.extents(), want);
    wait_end(&job, T).unwrap();
    assert_eq!(job.extents(), want, "unchanged after the end");
    // Full and Top: the whole device, whatever the bitmap.
    for sync in [SyncMode::Full, SyncMode::Top] {
        bm.mark(0, 1).unwrap();
        let opts = BackupOptions { sync, bitmap: Some(bm.clone()), ..Default::default() };
        let job = backup_start(src.clone(), Arc::new(MemDriver::new(size).unwrap()), opts).unwrap();
        wait_end(&job, T).unwrap();
        assert_eq!(job.extents(), vec![(0, size)], "{sync:?}");
    }
    // An empty bitmap: nothing to copy, no extent, and the job completes.
    bm.clear().unwrap();
    let opts = BackupOptions { sync: SyncMode::Bitmap, bitmap: Some(bm.clone()), ..Default::default() };
    let job = backup_start(src, Arc::new(MemDriver::new(size).unwrap()), opts).unwrap();
    wait_end(&job, T).unwrap();
    assert_eq!(job.extents(), vec![]);
    assert_eq!(job.info().bytes_skipped, size);
}

#[test]
fn extents_of_a_pull_job_lose_what_the_reader_discards() {
    let (src, bm) = setup();
    write_clusters(&*src, &bm, None, &G1, 2);
    let opts = BackupOptions { sync: SyncMode::None, bitmap: Some(bm.clone()), ..Default::default() };
    let job = backup_start(src.clone(), Arc::new(MemDriver::new(SIZE).unwrap()), opts).unwrap();
    assert_eq!(extent_clusters(&job), G1.to_vec(), "pull mode: the frozen bitmap's clusters");
    let view = job.snapshot().unwrap();
    view.discard(15 * K64, 2 * K64).unwrap(); // the reader is done with 15 and 16
    assert_eq!(extent_clusters(&job), vec![0, 512, 513, 1022]);
    job.complete().unwrap();
    wait_end(&job, T).unwrap();
    assert_eq!(extent_clusters(&job), vec![0, 512, 513, 1022]);
}
