//! Persistent dirty bitmaps under jobs: the end-of-job switch reaches the file. After the
//! job, a reopened bitmap holds what the bitmap held in memory (the successor after a sync,
//! frozen ∪ successor otherwise), with the same uuid, and the generation is bumped by a sync
//! that removes bits, never by `Never`, a failed `OnSuccess` job or a merge. A power loss at
//! any step of the switch leaves the old bitmap or the new one, nothing less.
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{assert_same, contents, one_parked_worker, wait_end, wait_parked, Gate, Rng};
use cowbackup::{
    backup_start, BackupOptions, BitmapMode, BlockDriver, CrashDriver, DirtyBitmap, ErrorKind, FaultDriver, FaultOp,
    FaultRule, Job, MemDriver, SyncMode,
};

const K64: u64 = 64 * 1024;
const SIZE: u64 = 64 << 20;
const T: Duration = Duration::from_secs(20);
const G1: [u64; 6] = [0, 15, 16, 512, 513, 1022];
const G2: [u64; 7] = [1, 14, 15, 513, 514, 1022, 1023];

fn clusters(bm: &DirtyBitmap) -> Vec<u64> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some((off, len)) = bm.next_dirty(from) {
        out.extend((off / K64)..(off + len).div_ceil(K64));
        from = off + len;
    }
    out
}

fn union(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut v: Vec<u64> = a.iter().chain(b).copied().collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The host's write path for whole clusters: mark, hook, write.
fn write_clusters(src: &dyn BlockDriver, bm: &DirtyBitmap, job: Option<&Job>, cs: &[u64], seed: u64) {
    let mut rng = Rng::new(seed);
    for &c in cs {
        bm.mark(c * K64, K64).unwrap();
        if let Some(j) = job {
            j.cow_before_write(c * K64, K64).unwrap();
        }
        src.write_at(&rng.bytes(K64 as usize), c * K64).unwrap();
    }
}

/// A 64 MiB source with random data in the clusters of G1 and G2 (the rest reads as
/// zeroes: cheap to make).
fn source() -> MemDriver {
    let d = MemDriver::new(SIZE).unwrap();
    let mut rng = Rng::new(1);
    for c in union(&G1, &G2) {
        d.write_at(&rng.bytes(K64 as usize), c * K64).unwrap();
    }
    d
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    Complete,
    /// A source read error on cluster 512 (G1 minus G2): after 0 and 16 were copied by the
    /// worker and 15, 513, 1022 by the hook.
    ReadError,
    Cancel,
}

/// A job of the bitmap (dirty G1) on a 64 MiB source: its worker is held on cluster 0 while
/// G2 is written through the hook, then the job ends as `end` says. Returns its result.
fn job_with_writes(bm: &Arc<DirtyBitmap>, sync: SyncMode, mode: BitmapMode, end: End) -> cowbackup::Result<()> {
    let faulty = Arc::new(FaultDriver::new(source()));
    let src = Gate::new(faulty.clone(), true);
    let opts = BackupOptions { sync, bitmap: Some(bm.clone()), bitmap_mode: mode, ..one_parked_worker() };
    let job = backup_start(src.clone(), Arc::new(MemDriver::new(SIZE).unwrap()), opts).unwrap();
    let _open = src.open_on_drop();
    wait_parked(&src);
    write_clusters(&*src, bm, Some(&job), &G2, 3);
    match end {
        End::Complete => {}
        End::ReadError => {
            faulty.add(FaultRule::new(FaultOp::Read).range(512 * K64, 1).errno(libc::EIO).forever());
        }
        End::Cancel => job.cancel(),
    }
    src.open();
    let r = wait_end(&job, T);
    match end {
        End::Complete => assert!(r.is_ok(), "{r:?}"),
        End::ReadError => assert_eq!(r.as_ref().unwrap_err().errno(), libc::EIO),
        End::Cancel => assert_eq!(r.as_ref().unwrap_err().kind(), ErrorKind::Cancelled),
    }
    r
}

/// Create a persistent bitmap with G1, run the job, check the bitmap in memory, reopen
/// it and check the file holds the same, with the same uuid and generation.
fn persisted(sync: SyncMode, mode: BitmapMode, end: End) -> (Vec<u64>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.bitmap");
    let bm = DirtyBitmap::create(&path, SIZE, K64).unwrap();
    write_clusters(&MemDriver::new(SIZE).unwrap(), &bm, None, &G1, 2);
    let (uuid, gen0) = (bm.uuid(), bm.generation());
    let _ = job_with_writes(&bm, sync, mode, end);
    assert!(!bm.is_busy());
    let (mem, gen) = (clusters(&bm), bm.generation());
    drop(bm); // the job (dropped) held a reference too: the file is closed now
    let bm = DirtyBitmap::open(&path).unwrap();
    assert_eq!(clusters(&bm), mem, "{sync:?} {mode:?} {end:?}: the file holds what the bitmap held");
    assert_eq!(bm.generation(), gen, "{sync:?} {mode:?} {end:?}: generation kept in the file");
    assert_eq!(bm.uuid(), uuid);
    (mem, gen - gen0)
}

#[test]
fn a_completed_sync_persists_the_successor_and_bumps_the_generation() {
    assert_eq!(persisted(SyncMode::Bitmap, BitmapMode::OnSuccess, End::Complete), (G2.to_vec(), 1));
    assert_eq!(persisted(SyncMode::Bitmap, BitmapMode::Always, End::Complete), (G2.to_vec(), 1));
}

#[test]
fn a_full_backup_with_a_bitmap_persists_the_writes_made_during_it() {
    assert_eq!(persisted(SyncMode::Full, BitmapMode::OnSuccess, End::Complete), (G2.to_vec(), 1));
}

#[test]
fn never_persists_everything_and_keeps_the_generation() {
    assert_eq!(persisted(SyncMode::Bitmap, BitmapMode::Never, End::Complete), (union(&G1, &G2), 0));
}

#[test]
fn a_failed_on_success_job_persists_everything_and_keeps_the_generation() {
    assert_eq!(persisted(SyncMode::Bitmap, BitmapMode::OnSuccess, End::ReadError), (union(&G1, &G2), 0));
    assert_eq!(persisted(SyncMode::Bitmap, BitmapMode::OnSuccess, End::Cancel), (union(&G1, &G2), 0));
    assert_eq!(persisted(SyncMode::Full, BitmapMode::OnSuccess, End::Cancel), (union(&G1, &G2), 0));
}

#[test]
fn a_failed_always_job_persists_what_was_not_copied_and_bumps_the_generation() {
    // Not copied: 512 (the read error); 0 and 16 went by the worker, 15, 513, 1022 by the hook.
    assert_eq!(persisted(SyncMode::Bitmap, BitmapMode::Always, End::ReadError), (union(&[512], &G2), 1));
    // Cancelled while the worker held cluster 0 (its chunk may finish after the cancel).
    let (got, bumped) = persisted(SyncMode::Bitmap, BitmapMode::Always, End::Cancel);
    assert!(got == union(&[16, 512], &G2) || got == union(&[0, 16, 512], &G2), "{got:?}");
    assert_eq!(bumped, 1);
}

#[test]
fn merges_keep_the_generation_clears_bump_it_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.bitmap");
    let bm = DirtyBitmap::create(&path, SIZE, K64).unwrap();
    write_clusters(&MemDriver::new(SIZE).unwrap(), &bm, None, &G1, 2);
    let other = DirtyBitmap::new(SIZE, 4096).unwrap();
    other.mark(5 * K64 + 4096, 1).unwrap();
    bm.merge(&other).unwrap();
    drop(bm);
    let bm = DirtyBitmap::open(&path).unwrap();
    assert_eq!(clusters(&bm), union(&G1, &[5]));
    assert_eq!(bm.generation(), 0, "a merge removes nothing");
    bm.clear().unwrap();
    drop(bm);
    let bm = DirtyBitmap::open(&path).unwrap();
    assert_eq!((bm.count(), bm.generation()), (0, 1));
}

#[test]
fn a_chain_across_reopens_restores_exactly() {
    // The host restarts between backups: each time the bitmap is reopened from its file,
    // and the uuid and generation recorded after the last backup say the chain is intact.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.bitmap");
    let src = Arc::new(MemDriver::from_bytes(&Rng::new(9).bytes(SIZE as usize)).unwrap());
    let bm = DirtyBitmap::create(&path, SIZE, K64).unwrap();
    let full = Arc::new(MemDriver::new(SIZE).unwrap());
    let job = backup_start(src.clone(), full.clone(), BackupOptions { bitmap: Some(bm.clone()), ..Default::default() })
        .unwrap();
    wait_end(&job, T).unwrap();
    let mut image = contents(&*full);
    let mut recorded = (bm.uuid(), bm.generation());
    drop((job, bm));
    for (i, set) in [&G1[..], &G2[..], &[3, 4, 5, 700][..]].into_iter().enumerate() {
        let bm = DirtyBitmap::open(&path).unwrap();
        assert_eq!((bm.uuid(), bm.generation()), recorded, "step {i}: the chain is intact");
        write_clusters(&*src, &bm, None, set, 20 + i as u64);
        drop(bm); // a restart between the writes and the backup
        let bm = DirtyBitmap::open(&path).unwrap();
        let inc = Arc::new(MemDriver::new(SIZE).unwrap());
        let opts = BackupOptions { sync: SyncMode::Bitmap, bitmap: Some(bm.clone()), ..Default::default() };
        let job = backup_start(src.clone(), inc.clone(), opts).unwrap();
        wait_end(&job, T).unwrap();
        let want: Vec<(u64, u64)> = set.iter().map(|&c| (c * K64, K64)).collect();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (o, l) in want {
            match merged.last_mut() {
                Some((mo, ml)) if *mo + *ml == o => *ml += l,
                _ => merged.push((o, l)),
            }
        }
        assert_eq!(job.extents(), merged, "step {i}");
        for (o, l) in job.extents() {
            inc.read_at(&mut image[o as usize..(o + l) as usize], o).unwrap();
        }
        assert_same(&format!("chain after step {i}"), &image, &contents(&*src));
        assert_eq!(bm.count(), 0);
        recorded = (bm.uuid(), bm.generation());
        assert_eq!(recorded.1, i as u64 + 1);
    }
}

#[test]
fn a_power_loss_at_any_step_of_the_end_of_job_switch_keeps_the_old_or_the_new_bitmap() {
    let file_size = DirtyBitmap::file_size(SIZE, K64).unwrap();
    let mut outcomes = [0usize; 2];
    for k in 0..64u64 {
        let d = Arc::new(CrashDriver::with_seed(file_size, k + 1).unwrap());
        let bm = DirtyBitmap::create_on(d.clone(), SIZE, K64).unwrap();
        write_clusters(&MemDriver::new(SIZE).unwrap(), &bm, None, &G1, 2);
        let gen0 = bm.generation();
        // The k-th bitmap write or flush from the switch on fails: power is lost there.
        let src = Gate::new(source(), true);
        let opts = BackupOptions { sync: SyncMode::Bitmap, bitmap: Some(bm.clone()), ..one_parked_worker() };
        let job = backup_start(src.clone(), Arc::new(MemDriver::new(SIZE).unwrap()), opts).unwrap();
        let _open = src.open_on_drop();
        wait_parked(&src);
        write_clusters(&*src, &bm, Some(&job), &G2, 3); // durable marks of the successor
        d.crash_after(k);
        src.open();
        wait_end(&job, T).unwrap(); // the backup's result stands whatever the bitmap's I/O did
        let crashed = d.stats().crashes > 0;
        d.crash(); // and if the switch was complete, a power loss right after it
        drop((job, bm));
        d.restart();
        let bm = DirtyBitmap::open_on(d.clone()).unwrap_or_else(|e| panic!("crash at op {k}: {e}"));
        let got = (clusters(&bm), bm.generation());
        if got == (G2.to_vec(), gen0 + 1) {
            outcomes[1] += 1;
        } else {
            assert_eq!(got, (union(&G1, &G2), gen0), "crash at op {k}: neither the old nor the new bitmap");
            outcomes[0] += 1;
        }
        if !crashed {
            assert_eq!(got.0, G2.to_vec(), "a switch that completed before the power loss is durable");
            println!("switch: {k} bitmap writes and flushes; old bitmap after {outcomes:?} [old, new] crashes");
            assert!(outcomes[0] > 0, "no crash landed before the switch took effect");
            return;
        }
    }
    panic!("the end-of-job switch did not complete within 64 bitmap writes and flushes");
}

/// Bitmap mode `Always`, a job that fails (Report) or is cancelled after copying part of
/// its clusters: the copied clusters leave the persistent bitmap, so they must be durable
/// in the target first. After a power loss of the target right after the job, every
/// cluster is either durable in the target with its point-in-time data or still in the
/// reopened bitmap (the next incremental copies it); and when the final flush fails,
/// nothing leaves the bitmap.
#[test]
fn always_mode_after_a_failure_drops_only_durable_clusters_from_the_bitmap() {
    const N: u64 = 128;
    let size = N * K64;
    for (seed, how) in [(1, "fail"), (2, "cancel"), (3, "fail"), (4, "cancel"), (5, "flush fails")] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.bitmap");
        let data = Rng::new(seed).bytes(size as usize);
        let src = Arc::new(FaultDriver::new(MemDriver::from_bytes(&data).unwrap()));
        let bm = DirtyBitmap::create(&path, size, K64).unwrap();
        bm.mark(0, size).unwrap();
        let crash = Arc::new(CrashDriver::with_seed(size, seed).unwrap());
        let target = Arc::new(FaultDriver::new(Arc::clone(&crash)));
        if how == "cancel" {
            src.add(
                FaultRule::new(FaultOp::Read).range(100 * K64, 1).errno(0).delay(Duration::from_millis(300)).times(1),
            );
        } else {
            // Clusters 0..100 are copied, then cluster 100 cannot be read: Report.
            src.add(FaultRule::new(FaultOp::Read).range(100 * K64, 1).errno(libc::EIO).forever());
        }
        if how == "flush fails" {
            target.add(FaultRule::new(FaultOp::Flush).errno(libc::EIO).forever());
        }
        let opts = BackupOptions {
            sync: SyncMode::Bitmap,
            bitmap: Some(bm.clone()),
            bitmap_mode: BitmapMode::Always,
            workers: 1,
            max_chunk: K64,
            ..Default::default()
        };
        let job = backup_start(src.clone(), target.clone(), opts).unwrap();
        if how == "cancel" {
            common::until("the worker past cluster 50", || job.info().bytes_copied >= 50 * K64);
            job.cancel();
        }
        assert!(wait_end(&job, T).is_err(), "{how}: the job was meant to end in failure");
        drop(job);
        drop(bm);
        let bm = DirtyBitmap::open(&path).unwrap();
        crash.crash();
        crash.restart();
        let durable = crash.durable_to_vec();
        let mut left = 0;
        for c in 0..N {
            let r = (c * K64) as usize..((c + 1) * K64) as usize;
            let in_bitmap = bm.next_dirty(c * K64).is_some_and(|(off, _)| off <= c * K64);
            if !in_bitmap {
                left += 1;
                assert!(
                    durable[r.clone()] == data[r],
                    "{how}: cluster {c} left the bitmap but is not durable in the target"
                );
            }
        }
        if how == "flush fails" {
            assert_eq!(left, 0, "{how}: the flush failed, so every cluster stays in the bitmap");
        } else {
            assert!(left >= 50, "{how}: the copied clusters leave the bitmap ({left})");
        }
    }
}
