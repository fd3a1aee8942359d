//! The snapshot view (src/job/snapshot.rs): fleecing, pull mode, discard, staleness.
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{contents, Rng};
use cowbackup::{
    backup_start, BackupOptions, BitmapMode, BlockDriver, BlockStatus, DirtyBitmap, FileDriver, JobState, MemDriver,
    SnapshotView, StatusFlags, SyncMode,
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
