//! Jobs with dirty bitmaps (sync = Bitmap, Full/Top + bitmap, pull mode) and consistency
//! groups: QEMU iotest 257's matrix and 124's chains, re-expressed.
mod common;

use std::sync::Arc;

use common::Rng;
use cowbackup::{
    backup_start, backup_start_group, BackupOptions, BitmapMode, BlockDriver, DirtyBitmap, ErrorKind, FaultDriver,
    FaultOp, FaultRule, JobState, MemDriver, SyncMode,
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
fn write_clusters(src: &MemDriver, bm: &DirtyBitmap, job: Option<&cowbackup::Job>, clusters: &[u64], seed: u64) {
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
    let opts = BackupOptions { sync: SyncMode::Bitmap, bitmap: Some(bm.clone()), workers: 1, ..Default::default() };
    let job = backup_start(src.clone(), target.clone(), opts).unwrap();
    assert!(bm.is_busy());
    assert_eq!(bm.clear().unwrap_err().kind(), ErrorKind::Busy);
    write_clusters(&src, &bm, Some(&job), &G2, 3);
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
