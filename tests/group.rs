//! Consistency groups (src/job/group.rs): one point in time, one outcome. Once every
//! member has finished copying, the group commits: a later cancel (or free) of a member
//! changes nothing, and members never end split (one Completed, another Cancelled).
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{wait_end, Rng};
use cowbackup::{
    backup_start_group, BackupOptions, BitmapMode, DirtyBitmap, FaultDriver, FaultOp, FaultRule, Job, JobState,
    MemDriver, SyncMode,
};

const SIZE: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);

fn bitmap_opts(bm: &Arc<DirtyBitmap>) -> BackupOptions {
    BackupOptions {
        sync: SyncMode::Bitmap,
        bitmap: Some(bm.clone()),
        bitmap_mode: BitmapMode::OnSuccess,
        ..Default::default()
    }
}

/// Two members; A's final flush is slow, so B arrives first and waits for A. The outcome
/// of every run is checked: both Completed with both bitmaps synced, or both not.
fn check_one_outcome(a: &Job, b: &Job, bm_a: &DirtyBitmap, bm_b: &DirtyBitmap, run: u64) {
    let (sa, sb) = (a.info().state, b.info().state);
    assert_eq!(sa, sb, "run {run}: the group ended split: A {sa:?}, B {sb:?}");
    if sa == JobState::Completed {
        assert_eq!((bm_a.count(), bm_b.count()), (0, 0), "run {run}: both bitmaps synced");
    } else {
        assert_eq!((bm_a.count(), bm_b.count()), (SIZE, SIZE), "run {run}: both bitmaps merged back");
    }
}

/// A's completion callback cancels B: B is then between the last arrival and its own end.
#[test]
fn a_cancel_after_every_member_arrived_changes_nothing() {
    for run in 0..20 {
        let slot: Arc<Mutex<Option<Arc<Job>>>> = Arc::new(Mutex::new(None));
        let s2 = slot.clone();
        let on_a_done: cowbackup::CompletionFn = Arc::new(move |r: &cowbackup::Result<()>| {
            if r.is_ok() {
                if let Some(b) = s2.lock().unwrap().as_ref() {
                    b.cancel();
                }
            }
        });
        let src_a = Arc::new(MemDriver::from_bytes(&Rng::new(1 + run).bytes(SIZE as usize)).unwrap());
        let src_b = Arc::new(MemDriver::from_bytes(&Rng::new(100 + run).bytes(SIZE as usize)).unwrap());
        let tgt_a = Arc::new(FaultDriver::new(MemDriver::new(SIZE).unwrap()));
        tgt_a.add(FaultRule::new(FaultOp::Flush).errno(0).delay(Duration::from_millis(100)).forever());
        let tgt_b = Arc::new(MemDriver::new(SIZE).unwrap());
        let (bm_a, bm_b) = (DirtyBitmap::new(SIZE, 65536).unwrap(), DirtyBitmap::new(SIZE, 65536).unwrap());
        bm_a.mark(0, SIZE).unwrap();
        bm_b.mark(0, SIZE).unwrap();
        let oa = BackupOptions { on_complete: Some(on_a_done), ..bitmap_opts(&bm_a) };
        let jobs = backup_start_group(vec![(src_a, tgt_a, oa), (src_b, tgt_b, bitmap_opts(&bm_b))]).unwrap();
        let mut it = jobs.into_iter().map(Arc::new);
        let (a, b) = (it.next().unwrap(), it.next().unwrap());
        *slot.lock().unwrap() = Some(b.clone());
        let (ra, rb) = (wait_end(&a, T), wait_end(&b, T));
        slot.lock().unwrap().take();
        check_one_outcome(&a, &b, &bm_a, &bm_b, run);
        assert!(ra.is_ok() && rb.is_ok(), "run {run}: every member had arrived: the group completes");
    }
}

/// The host waits for A (Completed: every member has finished copying), then frees B at
/// once (dropping a Job cancels it first, as cowbackup_job_free does): harmless.
#[test]
fn freeing_a_member_after_the_group_completed_is_harmless() {
    for run in 0..30 {
        let src_a = Arc::new(MemDriver::from_bytes(&Rng::new(1 + run).bytes(SIZE as usize)).unwrap());
        let src_b = Arc::new(MemDriver::from_bytes(&Rng::new(100 + run).bytes(SIZE as usize)).unwrap());
        let tgt_a = Arc::new(FaultDriver::new(MemDriver::new(SIZE).unwrap()));
        tgt_a.add(FaultRule::new(FaultOp::Flush).errno(0).delay(Duration::from_millis(10)).forever());
        let tgt_b = Arc::new(MemDriver::new(SIZE).unwrap());
        let (bm_a, bm_b) = (DirtyBitmap::new(SIZE, 65536).unwrap(), DirtyBitmap::new(SIZE, 65536).unwrap());
        bm_a.mark(0, SIZE).unwrap();
        bm_b.mark(0, SIZE).unwrap();
        let jobs = backup_start_group(vec![
            (src_a, tgt_a, bitmap_opts(&bm_a)),
            (src_b.clone(), tgt_b.clone(), bitmap_opts(&bm_b)),
        ])
        .unwrap();
        let mut it = jobs.into_iter();
        let (a, b) = (it.next().unwrap(), it.next().unwrap());
        wait_end(&a, T).unwrap();
        b.cancel();
        wait_end(&b, T).unwrap();
        check_one_outcome(&a, &b, &bm_a, &bm_b, run);
        drop(b); // and the free itself
        assert_eq!(tgt_b.to_vec(), src_b.to_vec(), "run {run}: B's target is its point in time");
    }
}

/// A cancel before every member arrived still fails the whole group, and every bitmap
/// goes back as for a failure.
#[test]
fn a_cancel_before_the_last_arrival_fails_the_whole_group() {
    let src_a = Arc::new(MemDriver::from_bytes(&Rng::new(7).bytes(SIZE as usize)).unwrap());
    let src_b = Arc::new(MemDriver::from_bytes(&Rng::new(8).bytes(SIZE as usize)).unwrap());
    let tgt_a = Arc::new(MemDriver::new(SIZE).unwrap());
    // B's copy is slow: A arrives and waits, then A is cancelled.
    let tgt_b = Arc::new(FaultDriver::new(MemDriver::new(SIZE).unwrap()));
    tgt_b.add(FaultRule::new(FaultOp::Flush).errno(0).delay(Duration::from_millis(500)).forever());
    let (bm_a, bm_b) = (DirtyBitmap::new(SIZE, 65536).unwrap(), DirtyBitmap::new(SIZE, 65536).unwrap());
    bm_a.mark(0, SIZE).unwrap();
    bm_b.mark(0, SIZE).unwrap();
    let jobs =
        backup_start_group(vec![(src_a, tgt_a, bitmap_opts(&bm_a)), (src_b, tgt_b, bitmap_opts(&bm_b))]).unwrap();
    let mut it = jobs.into_iter();
    let (a, b) = (it.next().unwrap(), it.next().unwrap());
    common::until("A to finish copying", || a.info().offset == SIZE);
    a.cancel();
    assert!(wait_end(&a, T).is_err());
    assert!(wait_end(&b, T).is_err());
    assert_eq!(a.info().state, JobState::Cancelled);
    assert_eq!(b.info().state, JobState::Cancelled);
    check_one_outcome(&a, &b, &bm_a, &bm_b, 0);
}
