//! The snapshot view (src/job/snapshot.rs): fleecing, pull mode, discard, staleness.
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{contents, Rng};
use cowbackup::{
    backup_start, BackupOptions, BitmapMode, BlockDriver, BlockStatus, CbwErrorAction, DirtyBitmap, ErrorKind,
    FaultDriver, FaultOp, FaultRule, FileDriver, JobState, MemDriver, SnapshotView, StatusFlags, SyncMode,
};

const K64: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;

fn errno(e: std::io::Error) -> i32 {
    cowbackup::errno_of(&e)
}

/// QEMU iotest image-fleecing: fill 0x11, write 0x22 to clusters 0 and 2 before the job,
/// start a sync=None job, write 0x33 to clusters 0 and 5: the view reads 0x22 at 0 and 2
/// and 0x11 at 5, the source 0x33; reading every cluster copied nothing.
#[test]
fn image_fleecing() {
    let size = 64 * K64;
    let src = Arc::new(MemDriver::from_bytes(&vec![0x11; size as usize]).unwrap());
    for c in [0, 2] {
        src.write_at(&vec![0x22; K64 as usize], c * K64).unwrap();
    }
    let scratch = Arc::new(MemDriver::new(size).unwrap());
    let opts = BackupOptions { sync: SyncMode::None, ..Default::default() };
    let job = backup_start(src.clone(), scratch.clone(), opts).unwrap();
    let view = job.snapshot().unwrap();
    let before = job.info();
    let mut all = vec![0u8; size as usize];
    view.read_at(&mut all, 0).unwrap();
    assert_eq!(job.info().bytes_copied, before.bytes_copied, "a view read never copies");
    assert_eq!(common::data_bytes(&*scratch), 0, "the scratch target is untouched");
    for c in [0, 5] {
        job.cow_before_write(c * K64, K64).unwrap();
        src.write_at(&vec![0x33; K64 as usize], c * K64).unwrap();
    }
    let mut b = vec![0u8; K64 as usize];
    for (c, want) in [(0, 0x22), (2, 0x22), (5, 0x11), (7, 0x11)] {
        view.read_at(&mut b, c * K64).unwrap();
        assert!(b.iter().all(|&x| x == want), "cluster {c}");
    }
    src.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0x33));
    // Unaligned reads across copied and uncopied clusters.
    let mut b = vec![0u8; (3 * K64) as usize];
    view.read_at(&mut b, K64 / 2 - 7).unwrap();
    let mut want = vec![0x22u8; (K64 / 2 + 7) as usize];
    want.extend(vec![0x11; K64 as usize]);
    want.extend(vec![0x22; K64 as usize]);
    want.extend(vec![0x11; (K64 / 2 - 7) as usize]);
    assert_eq!(b, want);
    assert_eq!(errno(view.write_at(&[1], 0).unwrap_err()), libc::EROFS);
    assert_eq!(errno(view.read_at(&mut [0; 2], size - 1).unwrap_err()), libc::EINVAL);
    job.complete().unwrap();
    job.wait().unwrap();
    assert_eq!(job.info().state, JobState::Completed);
    assert_eq!(errno(view.read_at(&mut [0; 1], 0).unwrap_err()), libc::ESTALE);
    drop(job);
    assert_eq!(errno(view.read_at(&mut [0; 1], 0).unwrap_err()), libc::ESTALE, "the view outlives the job");
}

/// Readers and writers at once, every sync mode: every view read equals the point-in-time copy.
#[test]
fn view_reads_are_exact_under_load() {
    for (i, sync) in [SyncMode::None, SyncMode::Full, SyncMode::Top].into_iter().enumerate() {
        for cluster in [4096, K64, MIB] {
            let size = 8 * MIB + 4097;
            let mut rng = Rng::new(40 + i as u64);
            let src = Arc::new(MemDriver::from_bytes(&rng.bytes(size as usize)).unwrap());
            let pit = contents(&*src);
            let target = Arc::new(MemDriver::new(size).unwrap());
            let opts = BackupOptions { sync, cluster_size: cluster, speed: 16 * MIB, ..Default::default() };
            let job = backup_start(src.clone(), target, opts).unwrap();
            let view = job.snapshot().unwrap();
            std::thread::scope(|s| {
                for w in 0..2u64 {
                    let (job, src) = (&job, &src);
                    s.spawn(move || {
                        let mut rng = Rng::new(100 + w);
                        for _ in 0..200 {
                            let len = 1 + rng.below(3 * cluster);
                            let off = rng.below(size - len);
                            job.cow_before_write(off, len).unwrap();
                            src.write_at(&rng.bytes(len as usize), off).unwrap();
                        }
                    });
                }
                for r in 0..2u64 {
                    let (view, pit) = (&view, &pit);
                    s.spawn(move || {
                        let mut rng = Rng::new(200 + r);
                        for _ in 0..200 {
                            let len = 1 + rng.below(3 * cluster);
                            let off = rng.below(size - len);
                            let mut b = vec![0u8; len as usize];
                            match view.read_at(&mut b, off) {
                                Ok(()) => assert!(
                                    b[..] == pit[off as usize..(off + len) as usize],
                                    "{sync:?} {cluster} at {off}+{len}"
                                ),
                                Err(e) => assert_eq!(errno(e), libc::ESTALE, "only a finished job's view fails"),
                            }
                        }
                    });
                }
            });
            job.cancel();
        }
    }
}

/// QEMU backup-discard-source: after the hook copied cluster 0, discard [0, 1 MiB) on the
/// view: the scratch file has no data there, a later write copies nothing, a read there
/// fails EACCES.
#[test]
fn discard_releases_scratch_space_and_leaves_the_copy_set() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let src = Arc::new(MemDriver::from_bytes(&Rng::new(3).bytes(size as usize)).unwrap());
    let scratch = Arc::new(FileDriver::create(dir.path().join("scratch"), size).unwrap());
    let opts = BackupOptions { sync: SyncMode::None, ..Default::default() };
    let job = backup_start(src.clone(), scratch.clone(), opts).unwrap();
    let view = job.snapshot().unwrap();
    job.cow_before_write(0, 100).unwrap();
    assert!(common::data_bytes(&*scratch) >= K64);
    view.discard(0, MIB).unwrap();
    assert_eq!(common::data_bytes(&*scratch), 0, "the discarded clusters' space is released");
    let copied = job.info().cow_bytes;
    job.cow_before_write(0, MIB).unwrap();
    assert_eq!(job.info().cow_bytes, copied, "a discarded range is not copied again");
    assert_eq!(errno(view.read_at(&mut [0; 10], 100).unwrap_err()), libc::EACCES);
    view.read_at(&mut [0; 10], MIB).unwrap();
    // Unaligned: only whole clusters inside are released.
    view.discard(MIB + 1, K64).unwrap();
    view.read_at(&mut [0; 10], MIB).unwrap();
    job.cancel();
}

/// Pull mode: sync=None + bitmap {0, 2}: reads of cluster 5 fail EACCES; complete() ->
/// OnSuccess: the bitmap holds only the writes made during the job; a cancelled pull job
/// gives the bitmap back.
#[test]
fn pull_mode() {
    let size = 16 * K64;
    let src = Arc::new(MemDriver::from_bytes(&Rng::new(5).bytes(size as usize)).unwrap());
    let pit = contents(&*src);
    let bm = DirtyBitmap::new(size, K64).unwrap();
    bm.mark(0, 10).unwrap();
    bm.mark(2 * K64, 10).unwrap();
    let opts = BackupOptions {
        sync: SyncMode::None,
        bitmap: Some(bm.clone()),
        bitmap_mode: BitmapMode::OnSuccess,
        ..Default::default()
    };
    let job = backup_start(src.clone(), Arc::new(MemDriver::new(size).unwrap()), opts.clone()).unwrap();
    let view = job.snapshot().unwrap();
    assert_eq!(errno(view.read_at(&mut [0; 10], 5 * K64).unwrap_err()), libc::EACCES);
    assert_eq!(errno(view.read_at(&mut vec![0; 3 * K64 as usize], 0).unwrap_err()), libc::EACCES, "fails whole");
    bm.mark(2 * K64, 10).unwrap();
    job.cow_before_write(2 * K64, 10).unwrap();
    src.write_at(&[9; 10], 2 * K64).unwrap();
    bm.mark(7 * K64, 10).unwrap();
    job.cow_before_write(7 * K64, 10).unwrap();
    let mut b = vec![0u8; K64 as usize];
    view.read_at(&mut b, 2 * K64).unwrap();
    assert_eq!(b[..], pit[(2 * K64) as usize..(3 * K64) as usize]);
    job.complete().unwrap();
    job.wait().unwrap();
    let mut got = Vec::new();
    let mut from = 0;
    while let Some((o, l)) = bm.next_dirty(from) {
        got.push((o, l));
        from = o + l;
    }
    assert_eq!(got, vec![(2 * K64, K64), (7 * K64, K64)]);
    // Cancel = failure: the bitmap comes back whole.
    let job = backup_start(src.clone(), Arc::new(MemDriver::new(size).unwrap()), opts).unwrap();
    bm.mark(9 * K64, 1).unwrap();
    job.cancel();
    assert!(job.wait().is_err());
    assert_eq!(bm.count(), 3 * K64);
    assert_eq!(
        backup_start(src.clone(), Arc::new(MemDriver::new(size).unwrap()), BackupOptions::default())
            .unwrap()
            .complete()
            .unwrap_err()
            .kind(),
        cowbackup::ErrorKind::InvalidInput
    );
}

/// Wraps a driver: reads and block_status queries made on threads named `view-reader`
/// wait while the gate is closed (other threads pass). Counts the callers waiting now.
struct ReaderGate<D> {
    inner: D,
    closed: Mutex<bool>,
    cv: Condvar,
    waiting: AtomicU64,
}

impl<D: BlockDriver> ReaderGate<D> {
    fn new(inner: D) -> Arc<ReaderGate<D>> {
        Arc::new(ReaderGate { inner, closed: Mutex::new(true), cv: Condvar::new(), waiting: AtomicU64::new(0) })
    }
    fn open(&self) {
        *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.cv.notify_all();
    }
    fn pass(&self) {
        if std::thread::current().name() != Some("view-reader") {
            return;
        }
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while *closed {
            closed = self.cv.wait(closed).unwrap_or_else(|e| e.into_inner());
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Opens a [`ReaderGate`] when dropped, also while a failing test unwinds.
struct OpenOnDrop<D: BlockDriver>(Arc<ReaderGate<D>>);

impl<D: BlockDriver> Drop for OpenOnDrop<D> {
    fn drop(&mut self) {
        self.0.open();
    }
}

impl<D: BlockDriver> BlockDriver for ReaderGate<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.pass();
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<BlockStatus> {
        self.pass();
        self.inner.block_status(offset, len)
    }
}

/// A view read holds the clusters it reads from the source: a hook on one of them waits
/// (counted in `cow_waits`) until the read is done, then copies the old data; the reader
/// got the old data too. Same for a block_status query of the view.
#[test]
fn hook_waits_for_a_view_read_then_copies_the_old_data() {
    for query in ["read", "block_status"] {
        let size = 16 * K64;
        let src = ReaderGate::new(MemDriver::from_bytes(&vec![0xAA; size as usize]).unwrap());
        let target = Arc::new(MemDriver::new(size).unwrap());
        let opts = BackupOptions { sync: SyncMode::None, ..Default::default() };
        let job = backup_start(src.clone(), target.clone(), opts).unwrap();
        let view = job.snapshot().unwrap();
        std::thread::scope(|s| {
            // Inside the scope: a failing assertion opens the gate before the scope joins the reader.
            let _open = OpenOnDrop(src.clone());
            let reader = std::thread::Builder::new()
                .name("view-reader".into())
                .spawn_scoped(s, || {
                    if query == "read" {
                        let mut b = vec![0u8; K64 as usize];
                        view.read_at(&mut b, 3 * K64).map(|()| b)
                    } else {
                        view.block_status(3 * K64, K64).map(|st| vec![st.flags.bits() as u8])
                    }
                })
                .unwrap();
            common::until("the view's source access to be parked", || src.waiting.load(Ordering::SeqCst) == 1);
            let waits = job.info().cow_waits;
            let writer = s.spawn(|| {
                job.cow_before_write(3 * K64 + 10, 100).unwrap();
                src.write_at(&[0xBB; 100], 3 * K64 + 10).unwrap();
            });
            common::until("the hook to wait for the view's hold", || job.info().cow_waits > waits);
            std::thread::sleep(Duration::from_millis(20));
            assert!(!writer.is_finished(), "{query}: the hook must not return while the view holds the cluster");
            assert_eq!(job.info().cow_bytes, 0, "{query}: nothing copied while held");
            src.open();
            let got = common::join_within("the view reader", reader, Duration::from_secs(10)).unwrap();
            if query == "read" {
                assert!(got.iter().all(|&b| b == 0xAA), "the reader got the old data");
            } else {
                assert_eq!(got, vec![StatusFlags::DATA.bits() as u8]);
            }
            common::join_within("the writer", writer, Duration::from_secs(10));
        });
        assert_eq!(job.info().cow_bytes, K64, "{query}: the hook copied the cluster after the read");
        let mut b = vec![0u8; K64 as usize];
        target.read_at(&mut b, 3 * K64).unwrap();
        assert!(b.iter().all(|&x| x == 0xAA), "{query}: the target holds the old data");
        view.read_at(&mut b, 3 * K64).unwrap();
        assert!(b.iter().all(|&x| x == 0xAA), "{query}: the view still reads the old data");
        job.cancel();
        common::wait_end(&job, Duration::from_secs(10)).unwrap_err();
    }
}

/// No double copy: reading every cluster of a sync=None view (one by one, then whole)
/// copies nothing and leaves the scratch target empty.
#[test]
fn view_reads_copy_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let src = Arc::new(MemDriver::from_bytes(&Rng::new(9).bytes(size as usize)).unwrap());
    let pit = contents(&*src);
    let path = dir.path().join("scratch");
    let scratch = Arc::new(FileDriver::create(&path, size).unwrap());
    let opts = BackupOptions { sync: SyncMode::None, ..Default::default() };
    let job = backup_start(src.clone(), scratch.clone(), opts).unwrap();
    let view = job.snapshot().unwrap();
    let before = job.info();
    let mut b = vec![0u8; K64 as usize];
    for c in 0..size / K64 {
        view.read_at(&mut b, c * K64).unwrap();
        assert!(b[..] == pit[(c * K64) as usize..((c + 1) * K64) as usize], "cluster {c}");
    }
    common::assert_same("the whole view", &contents(&*view), &pit);
    let after = job.info();
    assert_eq!((after.bytes_copied, after.bytes_zero), (before.bytes_copied, before.bytes_zero));
    assert_eq!((after.cow_requests, after.cow_bytes), (0, 0), "a view read is not a hook");
    assert_eq!(common::data_bytes(&*scratch), 0, "the scratch target has no data");
    assert_eq!(cowbackup::allocated_bytes(&path).unwrap(), 0, "no block of the scratch file is allocated");
    job.complete().unwrap();
    common::wait_end(&job, Duration::from_secs(10)).unwrap();
}

/// Slows writes to `rate` bytes/s (each write sleeps its share): a slow backup target.
struct Throttled<D> {
    inner: D,
    rate: u64,
}

impl<D: BlockDriver> BlockDriver for Throttled<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        std::thread::sleep(Duration::from_secs_f64(buf.len() as f64 / self.rate as f64));
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.write_zeroes_at(offset, len)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<BlockStatus> {
        self.inner.block_status(offset, len)
    }
    fn reads_as_zero(&self) -> bool {
        self.inner.reads_as_zero()
    }
}

/// Push mode (QEMU's backup-discard-source): a sync=None job into a scratch file, and a
/// second job whose source is the view, with `discard_source`, into a throttled target,
/// while host threads write through the first job's hook. The backup is the point-in-time
/// image, and every cluster the hook put into the scratch file is released again: the
/// scratch file ends with no allocated block.
#[test]
fn push_from_a_view_with_discard_source_leaves_no_scratch_space() {
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let src = Arc::new(MemDriver::from_bytes(&Rng::new(21).bytes(size as usize)).unwrap());
    let pit = contents(&*src);
    let scratch_path = dir.path().join("scratch");
    let scratch = Arc::new(FileDriver::create(&scratch_path, size).unwrap());
    let fleece =
        backup_start(src.clone(), scratch.clone(), BackupOptions { sync: SyncMode::None, ..Default::default() })
            .unwrap();
    let view = fleece.snapshot().unwrap();
    let backup_path = dir.path().join("backup");
    let backup = Arc::new(Throttled { inner: FileDriver::create(&backup_path, size).unwrap(), rate: 64 * MIB });
    let push = backup_start(view.clone(), backup.clone(), BackupOptions { discard_source: true, ..Default::default() })
        .unwrap();
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    let mut peak = 0;
    std::thread::scope(|s| {
        let _stop = common::SetOnDrop(&stop);
        for w in 0..3u64 {
            let (fleece, src, stop, writes) = (&fleece, &src, &stop, &writes);
            s.spawn(move || {
                let mut rng = Rng::new(300 + w);
                while !stop.load(Ordering::Relaxed) {
                    let len = 1 + rng.below(2 * K64);
                    let off = rng.below(size - len);
                    fleece.cow_before_write(off, len).unwrap();
                    src.write_at(&rng.bytes(len as usize), off).unwrap();
                    writes.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
        }
        while push.wait_timeout(Duration::from_millis(5)).is_none() {
            peak = peak.max(cowbackup::allocated_bytes(&scratch_path).unwrap());
        }
    });
    common::wait_end(&push, Duration::from_secs(60)).unwrap();
    let info = fleece.info();
    assert!(writes.load(Ordering::Relaxed) > 0 && info.cow_bytes > 0, "the host wrote during the push: {info:?}");
    assert!(peak > 0, "the hook put old data into the scratch file meanwhile");
    common::assert_same("the pushed backup", &contents(&backup.inner), &pit);
    assert_eq!(cowbackup::allocated_bytes(&scratch_path).unwrap(), 0, "every scratch cluster was discarded");
    // Everything is discarded: later writes copy nothing, and the view serves nothing.
    fleece.cow_before_write(0, size).unwrap();
    assert_eq!(fleece.info().cow_bytes, info.cow_bytes);
    assert_eq!(errno(view.read_at(&mut [0; 1], 0).unwrap_err()), libc::EACCES);
    fleece.complete().unwrap();
    common::wait_end(&fleece, Duration::from_secs(10)).unwrap();
    assert_eq!(cowbackup::allocated_bytes(&scratch_path).unwrap(), 0);
}

/// on_cbw_error with a scratch target failing ENOSPC. BreakGuestWrite: the hook fails,
/// the guest write is not made, the view keeps serving the old data. BreakSnapshot: the
/// hook returns Ok (the write goes on), the job fails with ENOSPC, view reads fail with it.
#[test]
fn cbw_errors_on_a_full_scratch_target() {
    for action in [CbwErrorAction::BreakGuestWrite, CbwErrorAction::BreakSnapshot] {
        let size = 16 * K64;
        let src = Arc::new(MemDriver::from_bytes(&vec![0x11; size as usize]).unwrap());
        let scratch = Arc::new(FaultDriver::new(MemDriver::new(size).unwrap()));
        for op in [FaultOp::Write, FaultOp::WriteZeroes] {
            scratch.add(FaultRule::new(op).errno(libc::ENOSPC).forever());
        }
        let opts = BackupOptions { sync: SyncMode::None, on_cbw_error: action, ..Default::default() };
        let job = backup_start(src.clone(), scratch.clone(), opts).unwrap();
        let view = job.snapshot().unwrap();
        let r = job.cow_before_write(K64, 10);
        let mut b = vec![0u8; K64 as usize];
        if action == CbwErrorAction::BreakGuestWrite {
            assert_eq!(r.unwrap_err().errno(), libc::ENOSPC);
            // The host fails its write: the source keeps the old data, so does the view.
            view.read_at(&mut b, K64).unwrap();
            assert!(b.iter().all(|&x| x == 0x11));
            assert_eq!(job.info().state, JobState::Running, "the snapshot stays valid");
            // Room again: the retried write copies the old data, the view still has it.
            scratch.clear();
            job.cow_before_write(K64, 10).unwrap();
            src.write_at(&[0x33; 10], K64).unwrap();
            view.read_at(&mut b, K64).unwrap();
            assert!(b.iter().all(|&x| x == 0x11));
            job.cancel();
            assert_eq!(common::wait_end(&job, Duration::from_secs(10)).unwrap_err().kind(), ErrorKind::Cancelled);
            assert_eq!(errno(view.read_at(&mut b, K64).unwrap_err()), libc::ESTALE);
        } else {
            r.unwrap();
            src.write_at(&[0x33; 10], K64).unwrap();
            let e = common::wait_end(&job, Duration::from_secs(10)).unwrap_err();
            assert_eq!(e.errno(), libc::ENOSPC, "{e}");
            assert_eq!(job.info().state, JobState::Failed);
            assert_eq!(errno(view.read_at(&mut b, 0).unwrap_err()), libc::ENOSPC);
            assert_eq!(errno(view.block_status(0, K64).unwrap_err()), libc::ENOSPC);
        }
    }
}

/// Which bytes of the load test's bitmap are dirty: every even MiB (aligned to the
/// largest cluster size, so the served clusters are exactly these bytes).
fn even_mib(off: u64, len: u64) -> bool {
    (off >> 20..=(off + len - 1) >> 20).all(|m| m % 2 == 0)
}

/// Many readers and writers at once, every sync mode (Full, Top, None, Bitmap), cluster
/// sizes 4 KiB, 64 KiB and 1 MiB, two rounds with other seeds: every successful view read
/// equals the point-in-time copy, every block_status ZERO answer is zeroes there, and reads
/// do happen while the job runs (successes counted per case; the job is paused for the first
/// half of the reads, so it cannot end before any). Under Bitmap, a read touching a cluster
/// outside the bitmap fails whole with EACCES, and only then.
#[test]
fn view_reads_are_exact_under_heavy_load_in_every_sync_mode() {
    let modes = [SyncMode::Full, SyncMode::Top, SyncMode::None, SyncMode::Bitmap];
    for round in 0..2u64 {
        for (i, sync) in modes.into_iter().enumerate() {
            for cluster in [4096, K64, MIB] {
                let size = 8 * MIB + 4097;
                let seed = round * 100 + i as u64 * 10 + cluster.trailing_zeros() as u64;
                let mut rng = Rng::new(seed);
                // Data in three of every four MiB, holes elsewhere (Top skips those).
                let src = Arc::new(MemDriver::new(size).unwrap());
                for m in 0..=size >> 20 {
                    if m % 4 != 3 {
                        let len = MIB.min(size - (m << 20));
                        src.write_at(&rng.bytes(len as usize), m << 20).unwrap();
                    }
                }
                let pit = contents(&*src);
                let bitmap = (sync == SyncMode::Bitmap).then(|| {
                    let bm = DirtyBitmap::new(size, K64).unwrap();
                    for m in (0..=size >> 20).step_by(2) {
                        bm.mark(m << 20, MIB.min(size - (m << 20))).unwrap();
                    }
                    bm
                });
                let opts = BackupOptions {
                    sync,
                    cluster_size: cluster,
                    speed: 8 * MIB,
                    bitmap,
                    workers: 2,
                    ..Default::default()
                };
                let job = backup_start(src.clone(), Arc::new(MemDriver::new(size).unwrap()), opts).unwrap();
                let view = job.snapshot().unwrap();
                // Paused for the first half of the reads (only the hooks copy: the job cannot
                // end, even when they copy everything), then resumed (the workers copy too).
                job.pause().unwrap();
                let resumed = AtomicBool::new(false);
                let reads = AtomicU64::new(0);
                let ok_reads = AtomicU64::new(0);
                std::thread::scope(|s| {
                    for w in 0..4u64 {
                        let (job, src) = (&job, &src);
                        s.spawn(move || {
                            let mut rng = Rng::new(seed * 7 + w);
                            for _ in 0..150 {
                                let len = 1 + rng.below(3 * cluster);
                                let off = rng.below(size - len);
                                job.cow_before_write(off, len).unwrap();
                                src.write_at(&rng.bytes(len as usize), off).unwrap();
                            }
                        });
                    }
                    for r in 0..4u64 {
                        let (view, pit, ok_reads, reads, resumed, job) =
                            (&view, &pit, &ok_reads, &reads, &resumed, &job);
                        s.spawn(move || {
                            let mut rng = Rng::new(seed * 13 + r);
                            for _ in 0..150 {
                                if reads.fetch_add(1, Ordering::Relaxed) == 300
                                    && !resumed.swap(true, Ordering::Relaxed)
                                {
                                    job.resume().unwrap();
                                }
                                let len = 1 + rng.below(3 * cluster);
                                let off = rng.below(size - len);
                                let mut b = vec![0u8; len as usize];
                                let want = &pit[off as usize..(off + len) as usize];
                                let served = sync != SyncMode::Bitmap || even_mib(off, len);
                                match view.read_at(&mut b, off) {
                                    Ok(()) => {
                                        assert!(served, "{sync:?} {cluster}: read of {off}+{len} outside the bitmap");
                                        assert!(b[..] == *want, "{sync:?} {cluster}: read at {off}+{len}");
                                        ok_reads.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Err(e) if !served => assert!(matches!(errno(e), libc::EACCES | libc::ESTALE)),
                                    Err(e) => assert_eq!(errno(e), libc::ESTALE, "only a finished job's view fails"),
                                }
                                if let Ok(st) = view.block_status(off, len) {
                                    assert!(st.len >= 1 && st.len <= len);
                                    if st.flags.contains(StatusFlags::ZERO) {
                                        let z = &pit[off as usize..(off + st.len) as usize];
                                        assert!(
                                            z.iter().all(|&x| x == 0),
                                            "{sync:?} {cluster}: ZERO at {off}+{}",
                                            st.len
                                        );
                                    }
                                }
                            }
                        });
                    }
                });
                let n = ok_reads.load(Ordering::Relaxed);
                assert!(n > 0, "{sync:?}, cluster {cluster}, round {round}: no view read succeeded while the job ran");
                // Ended by itself (a short copy set), or cancelled now: never failed.
                job.cancel();
                if let Err(e) = common::wait_end(&job, Duration::from_secs(10)) {
                    assert_eq!(e.kind(), ErrorKind::Cancelled, "{sync:?} {cluster}: {e}");
                }
            }
        }
    }
}

/// block_status of a view in pull mode: EACCES at a cluster outside the bitmap; an answer
/// starting in a served cluster stops before the next cluster that is not served.
#[test]
fn view_block_status_in_pull_mode() {
    let size = 8 * K64;
    let src = Arc::new(MemDriver::from_bytes(&vec![7; size as usize]).unwrap());
    let bm = DirtyBitmap::new(size, K64).unwrap();
    bm.mark(0, 2 * K64).unwrap();
    let opts = BackupOptions { sync: SyncMode::None, bitmap: Some(bm), ..Default::default() };
    let job = backup_start(src, Arc::new(MemDriver::new(size).unwrap()), opts).unwrap();
    let view = job.snapshot().unwrap();
    let st = view.block_status(100, size - 100).unwrap();
    assert_eq!((st.len, st.flags), (2 * K64 - 100, StatusFlags::DATA));
    assert_eq!(errno(view.block_status(2 * K64, K64).unwrap_err()), libc::EACCES);
    job.cow_before_write(0, 1).unwrap();
    let st = view.block_status(0, size).unwrap();
    assert_eq!(st.len, K64, "copied cluster 0: the target's status, up to the uncopied cluster 1");
    assert_eq!(errno(view.block_status(size, 1).unwrap_err()), libc::EINVAL);
    job.cancel();
}

/// A source driver whose read, on the hook's own thread, reads the job's view (of the very
/// clusters the hook is copying): refused with EDEADLK instead of waiting for itself.
#[test]
fn view_read_from_inside_the_jobs_own_hook_is_refused() {
    struct Nested {
        inner: MemDriver,
        /// Armed once: taken by the first read.
        view: Mutex<Option<Arc<SnapshotView>>>,
        got: Mutex<Vec<i32>>,
    }
    impl BlockDriver for Nested {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let armed = self.view.lock().unwrap().take();
            if let Some(v) = armed {
                let r = v.read_at(&mut vec![0; buf.len()], offset);
                self.got.lock().unwrap().push(r.map_or_else(errno, |()| 0));
                let d = v.discard(offset, buf.len() as u64);
                self.got.lock().unwrap().push(d.map_or_else(errno, |()| 0));
            }
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.inner.write_at(buf, offset)
        }
    }
    let size = 4 * K64;
    let src = Arc::new(Nested {
        inner: MemDriver::from_bytes(&vec![5; size as usize]).unwrap(),
        view: Default::default(),
        got: Mutex::new(Vec::new()),
    });
    let opts = BackupOptions { sync: SyncMode::None, ..Default::default() };
    let job = backup_start(src.clone(), Arc::new(MemDriver::new(size).unwrap()), opts).unwrap();
    let view = job.snapshot().unwrap();
    *src.view.lock().unwrap() = Some(view.clone());
    std::thread::scope(|s| {
        let h = s.spawn(|| job.cow_before_write(0, K64));
        let t = std::time::Instant::now();
        while !h.is_finished() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if !h.is_finished() {
            job.cancel(); // wakes the hung read, so the test fails instead of hanging
            panic!("the hook hung reading its own job's view");
        }
        h.join().unwrap().unwrap();
    });
    assert_eq!(*src.got.lock().unwrap(), vec![libc::EDEADLK, libc::EDEADLK]);
    // From outside the job, the same calls work.
    assert_eq!(contents(&*view), vec![5; size as usize]);
    job.cancel();
}

/// A reader's discard on the view of a job whose target is the backup (not sync=None):
/// the target lacks those clusters, so the job must not report success.
#[test]
fn discard_on_the_view_of_a_full_job_fails_the_job() {
    let size = 4 * MIB;
    let src = Arc::new(MemDriver::from_bytes(&vec![7u8; size as usize]).unwrap());
    let target = Arc::new(MemDriver::new(size).unwrap());
    let opts = BackupOptions { speed: MIB, ..Default::default() };
    let job = backup_start(src, target, opts).unwrap();
    let view = job.snapshot().unwrap();
    view.discard(2 * MIB, MIB).unwrap();
    job.set_speed(0);
    let e = job.wait_timeout(std::time::Duration::from_secs(30)).expect("the job ends").unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(e.to_string().contains("discarded"), "{e}");
    assert_eq!(job.info().state, JobState::Failed);
}

/// A driver whose reads (`on_reads`) or writes made by threads whose name starts with
/// one of the closed prefixes wait until that prefix is opened. Counts the waiters per prefix.
struct ByThread<D> {
    inner: D,
    on_reads: bool,
    closed: Mutex<Vec<&'static str>>,
    waiting: Mutex<Vec<&'static str>>,
    cv: Condvar,
}

impl<D: BlockDriver> ByThread<D> {
    fn new(inner: D, on_reads: bool, closed: &[&'static str]) -> Arc<ByThread<D>> {
        Arc::new(ByThread {
            inner,
            on_reads,
            closed: Mutex::new(closed.to_vec()),
            waiting: Mutex::new(Vec::new()),
            cv: Condvar::new(),
        })
    }
    fn open(&self, prefix: &str) {
        self.closed.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| *p != prefix);
        self.cv.notify_all();
    }
    fn open_all(&self) {
        self.closed.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.cv.notify_all();
    }
    fn waiting(&self, prefix: &str) -> bool {
        self.waiting.lock().unwrap().contains(&prefix)
    }
    fn pass(&self) {
        let name = std::thread::current().name().unwrap_or("").to_string();
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = closed.iter().copied().find(|p| name.starts_with(p)) else { return };
        self.waiting.lock().unwrap().push(p);
        while closed.contains(&p) {
            closed = self.cv.wait(closed).unwrap_or_else(|e| e.into_inner());
        }
        let mut w = self.waiting.lock().unwrap();
        if let Some(i) = w.iter().position(|x| *x == p) {
            w.swap_remove(i);
        }
    }
}

/// Opens every gate of a [`ByThread`] when dropped, also while a failing test unwinds.
struct OpenAllOnDrop<D: BlockDriver>(Arc<ByThread<D>>);

impl<D: BlockDriver> Drop for OpenAllOnDrop<D> {
    fn drop(&mut self) {
        self.0.open_all();
    }
}

impl<D: BlockDriver> BlockDriver for ByThread<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if self.on_reads {
            self.pass();
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if !self.on_reads {
            self.pass();
        }
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if !self.on_reads {
            self.pass();
        }
        self.inner.write_zeroes_at(offset, len)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<BlockStatus> {
        self.inner.block_status(offset, len)
    }
}

/// A view read never waits for the target: with the only worker stuck writing a chunk to
/// a hung target (the usual fleecing case: scratch on a network disk), reads of those
/// very clusters, and of every other one, complete from the source with the
/// point-in-time data. A hook on the stuck clusters waits (their old data is not in the
/// target yet); once the target answers, the job completes exactly.
#[test]
fn view_reads_do_not_wait_for_a_hung_target_write() {
    let size = 32 * K64;
    let data = Rng::new(71).bytes(size as usize);
    let src = Arc::new(MemDriver::from_bytes(&data).unwrap());
    let target = ByThread::new(MemDriver::new(size).unwrap(), false, &["cowbackup-"]);
    let opts = BackupOptions { workers: 1, max_chunk: 4 * K64, ..Default::default() };
    let job = backup_start(src.clone(), target.clone(), opts).unwrap();
    let view = job.snapshot().unwrap();
    std::thread::scope(|s| {
        let _open = OpenAllOnDrop(target.clone());
        common::until("the worker stuck on its target write", || target.waiting("cowbackup-"));
        assert!(job.info().bytes_copied == 0, "the first chunk is the one stuck");
        let reader = s.spawn(|| {
            let mut all = vec![0u8; size as usize];
            view.read_at(&mut all, 0).map(|()| all)
        });
        let got = common::join_within("a view read while the target hangs", reader, Duration::from_secs(20)).unwrap();
        common::assert_same("the view while the target hangs", &got, &data);
        let writer = s.spawn(|| {
            job.cow_before_write(0, K64).unwrap();
            src.write_at(&vec![0xEE; K64 as usize], 0).unwrap();
        });
        common::until("the hook to wait for the stuck claim", || job.info().cow_waits > 0);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!writer.is_finished(), "the hook must wait until the stuck copy is in the target");
        target.open("cowbackup-");
        common::join_within("the writer", writer, Duration::from_secs(20));
    });
    job.wait().unwrap();
    common::assert_same("target", &target.inner.to_vec(), &data);
}

/// The other side of the rule above: a view read of a cluster that a copier (a hook, or
/// a worker) is copying reads the source; when that copy ends before the read does, the
/// host must still not write those clusters until the read is done — the claim stays
/// parked, the hook keeps waiting — or the view would return data written after the
/// point in time.
#[test]
fn a_copy_that_ends_under_a_view_read_keeps_the_host_waiting() {
    for copier in ["hook-copier", "cowbackup-"] {
        let size = 16 * K64;
        let x = 8 * K64;
        let data = Rng::new(72).bytes(size as usize);
        // The worker is held too when the hook is the copier (it must not copy x first).
        let src = ByThread::new(MemDriver::from_bytes(&data).unwrap(), true, &[copier, "view-reader", "cowbackup-"]);
        let target = Arc::new(MemDriver::new(size).unwrap());
        let opts = BackupOptions { workers: 1, max_chunk: K64, ..Default::default() };
        let job = backup_start(src.clone(), target.clone(), opts).unwrap();
        let view = job.snapshot().unwrap();
        std::thread::scope(|s| {
            let _open = OpenAllOnDrop(src.clone());
            // The copier reads cluster x's old data (and waits there).
            let first = if copier == "hook-copier" {
                Some(
                    std::thread::Builder::new()
                        .name("hook-copier".into())
                        .spawn_scoped(s, || {
                            job.cow_before_write(x, K64).unwrap();
                            src.inner.write_at(&vec![0xAB; K64 as usize], x).unwrap();
                        })
                        .unwrap(),
                )
            } else {
                None // the worker starts at cluster 0 and parks there: its cursor is not x
            };
            common::until("the copier reading", || src.waiting(copier));
            // With the worker as the copier, the chunk it is stuck on is cluster 0.
            let at = if copier == "hook-copier" { x } else { 0 };
            let reader = std::thread::Builder::new()
                .name("view-reader".into())
                .spawn_scoped(s, move || {
                    let mut b = vec![0u8; K64 as usize];
                    view.read_at(&mut b, at).map(|()| b)
                })
                .unwrap();
            common::until("the view reader on the source (it does not wait for the copier)", || {
                src.waiting("view-reader")
            });
            // The copy ends while the read is in flight (and the worker goes on).
            src.open(copier);
            src.open("cowbackup-");
            let host = if copier == "hook-copier" {
                first.unwrap()
            } else {
                common::until("the worker's copy of cluster 0", || job.info().bytes_copied >= K64);
                s.spawn(|| {
                    job.cow_before_write(0, K64).unwrap();
                    src.inner.write_at(&vec![0xAB; K64 as usize], 0).unwrap();
                })
            };
            std::thread::sleep(Duration::from_millis(50));
            assert!(!host.is_finished(), "{copier}: the host wrote a cluster a view was still reading");
            src.open("view-reader");
            let got = common::join_within("the view reader", reader, Duration::from_secs(20)).unwrap();
            common::assert_same(copier, &got, &data[at as usize..(at + K64) as usize]);
            common::join_within("the host write", host, Duration::from_secs(20));
        });
        job.wait().unwrap();
        common::assert_same(copier, &target.to_vec(), &data);
    }
}

/// The reader of a pull-mode view copies just the bitmap's clusters with a second job
/// (`sync = Bitmap` over the same clusters, into a new target that reads zeroes): the
/// second job's start-up scan asks the view about its copy set only, never about the
/// clusters the view does not serve (they would fail EACCES), and it copies exactly them.
#[test]
fn a_bitmap_job_reads_a_pull_mode_view_through_its_copy_set_only() {
    let size = 64 * K64;
    let mut data = Rng::new(81).bytes(size as usize);
    data[(10 * K64) as usize..(12 * K64) as usize].fill(0); // zero clusters in the copy set too
    let src = Arc::new(MemDriver::from_bytes(&data).unwrap());
    let bm = DirtyBitmap::new(size, K64).unwrap();
    for (off, len) in [(3 * K64, 2 * K64), (10 * K64, 3 * K64), (63 * K64, K64)] {
        bm.mark(off, len).unwrap();
    }
    let pull = BackupOptions { sync: SyncMode::None, bitmap: Some(bm.clone()), ..Default::default() };
    let job = backup_start(src.clone(), Arc::new(MemDriver::new(size).unwrap()), pull).unwrap();
    let view = job.snapshot().unwrap();
    // The reader's copy of the extents the bitmap names.
    let marks = DirtyBitmap::new(size, K64).unwrap();
    let mut from = 0;
    while let Some((off, len)) = bm.next_dirty(from) {
        marks.mark(off, len).unwrap();
        from = off + len;
    }
    let out = Arc::new(MemDriver::new(size).unwrap());
    let copy = BackupOptions { sync: SyncMode::Bitmap, bitmap: Some(marks), ..Default::default() };
    // The host writes meanwhile: the copy still gets the point in time.
    let copier = backup_start(view.clone(), out.clone(), copy).unwrap();
    job.cow_before_write(3 * K64, 10).unwrap();
    src.write_at(&[7; 10], 3 * K64).unwrap();
    copier.wait().unwrap();
    let info = copier.info();
    assert_eq!(info.bytes_copied + info.bytes_zero, 6 * K64, "exactly the copy set");
    let got = out.to_vec();
    for c in 0..64u64 {
        let r = (c * K64) as usize..((c + 1) * K64) as usize;
        if [3, 4, 10, 11, 12, 63].contains(&c) {
            assert!(got[r.clone()] == data[r], "cluster {c}: the point in time");
        } else {
            assert!(got[r].iter().all(|&b| b == 0), "cluster {c}: not copied");
        }
    }
    job.complete().unwrap();
    job.wait().unwrap();
}
