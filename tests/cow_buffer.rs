//! `BackupOptions::cow_buffer`: the hook keeps old data in memory and returns without
//! touching the target; a worker writes it. What must hold: the hook never waits for the
//! target while there is room; the backup is still exactly the point in time (under
//! concurrent writers, a small buffer, a paused job, failing target writes); a saved
//! write that fails is retried from memory, never re-read from the changed source.

mod common;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use common::{assert_same, one_parked_worker, until, wait_end, wait_parked, Gate, Rng};
use cowbackup::{
    backup_start, BackupOptions, BlockDriver, BlockStatus, ErrorAction, ErrorKind, FaultDriver, FaultOp, FaultRule,
    FileDriver, JobState, MemDriver, OpenFlags, SyncMode, TraceEvent,
};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const CS: u64 = 64 * KIB;
const END: Duration = Duration::from_secs(60);

fn random_mem(size: u64, seed: u64) -> (Arc<MemDriver>, Vec<u8>) {
    let data = Rng::new(seed).bytes(size as usize);
    (Arc::new(MemDriver::from_bytes(&data).unwrap()), data)
}

/// A target whose writes made from the job's own threads (`cowbackup-*`) wait while the
/// gate is closed; writes from test threads (a hook copying itself) pass. Counts writes
/// made from test threads.
struct WriteGate {
    inner: MemDriver,
    closed: Mutex<bool>,
    cv: Condvar,
    waiting: AtomicU64,
    host_thread_writes: AtomicU64,
}

impl WriteGate {
    fn new(size: u64) -> Arc<WriteGate> {
        Arc::new(WriteGate {
            inner: MemDriver::new(size).unwrap(),
            closed: Mutex::new(true),
            cv: Condvar::new(),
            waiting: AtomicU64::new(0),
            host_thread_writes: AtomicU64::new(0),
        })
    }
    fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.cv.notify_all();
    }
    fn pass(&self) {
        if !thread::current().name().is_some_and(|n| n.starts_with("cowbackup-")) {
            self.host_thread_writes.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let mut closed = self.closed.lock().unwrap();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while *closed {
            closed = self.cv.wait(closed).unwrap();
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Opens a [`WriteGate`] when dropped, so a failing assertion never leaves a worker parked.
struct OpenOnDrop(Arc<WriteGate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

impl BlockDriver for WriteGate {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.pass();
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        self.pass();
        self.inner.write_zeroes_at(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.inner.block_status(offset, len)
    }
}

/// With room in the buffer the hook returns while every target write is blocked, and
/// the host's write that follows does not reach the backup: the worker writes the old
/// data later, from memory.
#[test]
fn the_hook_returns_without_writing_the_target() {
    let size = 8 * MIB;
    let (source, data) = random_mem(size, 1);
    let target = WriteGate::new(size);
    let opts = BackupOptions { workers: 1, max_chunk: CS, cow_buffer: 4 * MIB, ..Default::default() };
    let job = backup_start(source.clone(), target.clone(), opts).unwrap();
    let _open = OpenOnDrop(target.clone());
    until("the worker blocked in its first target write", || target.waiting.load(Ordering::SeqCst) == 1);
    // Unaligned, three clusters, far from the worker.
    let (off, len) = (size - 3 * CS - 100, 2 * CS + 50);
    job.cow_before_write(off, len).unwrap();
    assert_eq!(target.host_thread_writes.load(Ordering::SeqCst), 0, "the hook wrote the target");
    let mut t = vec![0u8; len as usize];
    target.inner.read_at(&mut t, off).unwrap();
    assert!(t.iter().all(|&b| b == 0), "the target holds the data before any worker wrote it");
    source.write_at(&vec![0xAB; len as usize], off).unwrap();
    // Written again while saved: no second copy, no wait.
    job.cow_before_write(off, len).unwrap();
    assert_eq!(job.info().cow_requests, 1);
    assert_eq!(job.info().cow_bytes, 3 * CS);
    target.open();
    wait_end(&job, END).unwrap();
    assert_eq!(job.info().state, JobState::Completed);
    assert_same("target", &target.inner.to_vec(), &data);
}

/// Old data that does not fit in what is left of the buffer is copied by the hook into
/// the target itself, as without a buffer.
#[test]
fn a_hook_that_does_not_fit_copies_into_the_target_itself() {
    let size = 8 * MIB;
    let (source, data) = random_mem(size, 2);
    let target = WriteGate::new(size);
    // Room for one cluster; the hook's range is one run of two.
    let opts = BackupOptions { workers: 1, max_chunk: 4 * CS, cow_buffer: CS, ..Default::default() };
    let job = backup_start(source.clone(), target.clone(), opts).unwrap();
    let _open = OpenOnDrop(target.clone());
    until("the worker blocked in its first target write", || target.waiting.load(Ordering::SeqCst) == 1);
    let off = size - 2 * CS;
    job.cow_before_write(off, 2 * CS).unwrap();
    assert!(target.host_thread_writes.load(Ordering::SeqCst) > 0, "the hook did not write the target");
    let mut t = vec![0u8; 2 * CS as usize];
    target.inner.read_at(&mut t, off).unwrap();
    assert_same("the hook's clusters in the target", &t, &data[off as usize..]);
    source.write_at(&vec![0xCD; 2 * CS as usize], off).unwrap();
    target.open();
    wait_end(&job, END).unwrap();
    assert_same("target", &target.inner.to_vec(), &data);
}

/// A saved write that fails under `Stop` pauses the job and keeps the data (views read it
/// from memory meanwhile); `resume` writes it from memory: the source's newer data never
/// reaches the backup.
#[test]
fn a_failed_saved_write_is_retried_from_memory_after_resume() {
    let size = 4 * MIB;
    let (mem, data) = random_mem(size, 3);
    let source = Gate::new(mem.clone(), true);
    let target = Arc::new(FaultDriver::new(MemDriver::new(size).unwrap()));
    let off = size - CS;
    let rule = target.add(FaultRule::new(FaultOp::Write).range(off, CS).errno(libc::EIO).times(1));
    let opts = BackupOptions { on_target_error: ErrorAction::Stop, cow_buffer: MIB, ..one_parked_worker() };
    let job = backup_start(source.clone(), target.clone(), opts).unwrap();
    let _open = source.open_on_drop();
    let view = job.snapshot().unwrap();
    wait_parked(&source);
    job.cow_before_write(off, CS).unwrap();
    mem.write_at(&vec![0xEE; CS as usize], off).unwrap();
    source.open();
    until("the saved write failed and paused the job", || job.info().state == JobState::Paused);
    assert_eq!(target.fired(rule), 1);
    let e = job.info().error.expect("the pause error");
    assert_eq!(e.errno(), libc::EIO);
    // A view read of those clusters is served from memory: it does not wait for the
    // resume that the reader itself would have to give.
    let mut b = vec![0u8; CS as usize];
    view.read_at(&mut b, off).unwrap();
    assert_same("view read while paused", &b, &data[off as usize..]);
    job.resume().unwrap();
    wait_end(&job, END).unwrap();
    assert_same("target", &target.inner().to_vec(), &data);
}

/// Under `Report` a failed saved write fails the job with the target's error (the hook
/// had returned success: the host's write went ahead).
#[test]
fn a_failed_saved_write_under_report_fails_the_job() {
    let size = 4 * MIB;
    let (mem, _) = random_mem(size, 4);
    let source = Gate::new(mem.clone(), true);
    let target = Arc::new(FaultDriver::new(MemDriver::new(size).unwrap()));
    let off = size - CS;
    target.add(FaultRule::new(FaultOp::Write).range(off, CS).errno(libc::ENOSPC).forever());
    let opts = BackupOptions { cow_buffer: MIB, ..one_parked_worker() };
    let job = backup_start(source.clone(), target.clone(), opts).unwrap();
    let _open = source.open_on_drop();
    wait_parked(&source);
    job.cow_before_write(off, CS).unwrap();
    source.open();
    let e = wait_end(&job, END).unwrap_err();
    assert_eq!(job.info().state, JobState::Failed);
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert!(e.to_string().contains("target"), "{e}");
}

/// A job paused by the operator still writes what hooks saved (the hook keeps working
/// while paused), and copies no background chunk.
#[test]
fn a_paused_job_writes_saved_data_but_no_chunk() {
    let size = 4 * MIB;
    let (source, data) = random_mem(size, 5);
    let target = Arc::new(MemDriver::new(size).unwrap());
    let opts = BackupOptions { workers: 1, max_chunk: CS, speed: 64 * KIB, cow_buffer: MIB, ..Default::default() };
    let job = backup_start(source.clone(), target.clone(), opts).unwrap();
    job.pause().unwrap();
    thread::sleep(Duration::from_millis(50)); // a chunk in flight lands
    let before = job.info().offset;
    let off = size - 4 * CS;
    job.cow_before_write(off, 4 * CS).unwrap();
    source.write_at(&vec![0x11; 4 * CS as usize], off).unwrap();
    until("the saved data written while paused", || job.info().offset == before + 4 * CS);
    let mut t = vec![0u8; 4 * CS as usize];
    target.read_at(&mut t, off).unwrap();
    assert_same("saved clusters in the target", &t, &data[off as usize..]);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(job.info().offset, before + 4 * CS, "a background chunk was copied while paused");
    assert_eq!(job.info().state, JobState::Paused);
    job.set_speed(0);
    job.resume().unwrap();
    wait_end(&job, END).unwrap();
    assert_same("target", &target.to_vec(), &data);
}

/// A snapshot view reads saved clusters from memory: the old data, at once, while the
/// target has not got it yet, also while the job is paused by a failed saved write.
#[test]
fn a_view_reads_saved_clusters_from_memory() {
    let size = 4 * MIB;
    let (source, data) = random_mem(size, 6);
    let target = WriteGate::new(size);
    let opts = BackupOptions { workers: 1, max_chunk: CS, cow_buffer: MIB, ..Default::default() };
    let job = backup_start(source.clone(), target.clone(), opts).unwrap();
    let _open = OpenOnDrop(target.clone());
    let view = job.snapshot().unwrap();
    until("the worker blocked in its first target write", || target.waiting.load(Ordering::SeqCst) == 1);
    let off = size - 3 * CS;
    job.cow_before_write(off, 2 * CS).unwrap();
    source.write_at(&vec![0x22; 3 * CS as usize], off).unwrap();
    // Saved (2 clusters) and not saved (the last one, copied by nobody yet) in one read,
    // unaligned at both ends.
    let (o, n) = (off + 100, 3 * CS - 200);
    let mut b = vec![0u8; n as usize];
    view.read_at(&mut b, o).unwrap();
    // The last cluster was overwritten without a hook: outside the point in time the
    // view promises, so only the saved part is compared.
    assert_same(
        "view read of saved clusters",
        &b[..(2 * CS - 100) as usize],
        &data[o as usize..(off + 2 * CS) as usize],
    );
    let st = view.block_status(off, 3 * CS).unwrap();
    assert!(st.len >= 1 && st.len <= 2 * CS, "{st:?}");
    target.open();
    wait_end(&job, END).unwrap();
}

/// Cancel with saved data queued: the job ends `Cancelled` at once.
#[test]
fn cancel_with_saved_data_queued_ends_the_job() {
    let size = 4 * MIB;
    let (mem, _) = random_mem(size, 7);
    let source = Gate::new(mem, true);
    let target = Arc::new(MemDriver::new(size).unwrap());
    let job = backup_start(source.clone(), target, BackupOptions { cow_buffer: MIB, ..one_parked_worker() }).unwrap();
    let _open = source.open_on_drop();
    wait_parked(&source);
    job.cow_before_write(size - 8 * CS, 8 * CS).unwrap();
    job.cancel();
    source.open();
    let e = wait_end(&job, END).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled);
    assert_eq!(job.info().state, JobState::Cancelled);
}

/// Real files, four host threads writing at random (hook, then write) with a buffer
/// small enough that hooks both save and copy: the backup is exactly the point in time,
/// and workers did write saved data.
#[test]
fn concurrent_writers_with_a_small_buffer_get_the_point_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let data = Rng::new(8).bytes(size as usize);
    let src = dir.path().join("src.img");
    std::fs::write(&src, &data).unwrap();
    let source = Arc::new(FileDriver::open(&src, OpenFlags::WRITE).unwrap());
    let target = Arc::new(FileDriver::create(dir.path().join("dst.img"), size).unwrap());
    let saved_writes = Arc::new(AtomicU64::new(0));
    let sw = saved_writes.clone();
    let trace: cowbackup::TraceFn = Arc::new(move |e: &TraceEvent| {
        let worker = thread::current().name().is_some_and(|n| n.starts_with("cowbackup-"));
        if matches!(e, TraceEvent::ChunkCopied { hook: true, .. }) && worker {
            sw.fetch_add(1, Ordering::Relaxed);
        }
    });
    let opts = BackupOptions {
        cow_buffer: 256 * KIB,
        speed: 16 * MIB,
        max_chunk: 256 * KIB,
        trace: Some(trace),
        ..Default::default()
    };
    let job = backup_start(source.clone(), target.clone(), opts).unwrap();
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        for w in 0..4u64 {
            let (job, source, stop) = (&job, &source, &stop);
            s.spawn(move || {
                let mut rng = Rng::new(100 + w);
                while !stop.load(Ordering::Relaxed) {
                    let len = 1 + rng.below(3 * CS);
                    let off = rng.below(size - len);
                    job.cow_before_write(off, len).unwrap();
                    source.write_at(&rng.bytes(len as usize), off).unwrap();
                }
            });
        }
        let r = wait_end(&job, END);
        stop.store(true, Ordering::Relaxed);
        r.unwrap();
    });
    assert_eq!(job.info().state, JobState::Completed);
    assert!(saved_writes.load(Ordering::Relaxed) > 0, "no hook saved data for a worker to write");
    let got = std::fs::read(dir.path().join("dst.img")).unwrap();
    assert_same("target", &got, &data);
}

/// `cow_buffer` needs background workers: rejected with sync mode `None`.
#[test]
fn cow_buffer_with_sync_none_is_rejected() {
    let (source, _) = random_mem(MIB, 9);
    let target = Arc::new(MemDriver::new(MIB).unwrap());
    let opts = BackupOptions { sync: SyncMode::None, cow_buffer: MIB, ..Default::default() };
    let Err(e) = backup_start(source, target.clone(), opts) else { panic!("started") };
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("cow_buffer"), "{e}");
    assert!(target.to_vec().iter().all(|&b| b == 0));
}

/// Blocks reads (`on_reads`, except the job's own) or writes of the cluster at `off`
/// until released, and says when someone waits there.
struct HoldOne {
    inner: MemDriver,
    off: u64,
    on_reads: bool,
    open: Mutex<bool>,
    cv: Condvar,
    waiting: AtomicBool,
}

impl HoldOne {
    fn new(inner: MemDriver, off: u64, on_reads: bool) -> Arc<HoldOne> {
        Arc::new(HoldOne {
            inner,
            off,
            on_reads,
            open: Mutex::new(false),
            cv: Condvar::new(),
            waiting: AtomicBool::new(false),
        })
    }
    fn pass(&self, off: u64) {
        if off != self.off {
            return;
        }
        let mut o = self.open.lock().unwrap_or_else(|e| e.into_inner());
        self.waiting.store(true, Ordering::SeqCst);
        while !*o {
            o = self.cv.wait(o).unwrap_or_else(|e| e.into_inner());
        }
    }
    fn release(&self) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
}

/// Releases a [`HoldOne`] when dropped, also while a failing test unwinds.
struct ReleaseOnDrop(Arc<HoldOne>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl BlockDriver for HoldOne {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.on_reads && !thread::current().name().is_some_and(|n| n.starts_with("cowbackup-")) {
            self.pass(offset);
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.on_reads {
            self.pass(offset);
        }
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes_at(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.inner.block_status(offset, len)
    }
}

/// A hook saves the last dirty cluster in memory while the only worker is busy: the job
/// must write that saved data before it completes (a saved claim is not clean). The one
/// worker is stuck writing cluster 0 while a hook reads cluster 1's old data; both are
/// let go close together, with varying gaps, so the worker finds the copy set empty of
/// dirty-and-unclaimed clusters right as the hook saves.
#[test]
fn saved_data_is_in_the_target_before_the_job_completes() {
    for run in 0..40u64 {
        let size = 2 * CS;
        let data = Rng::new(run + 1).bytes(size as usize);
        let source = HoldOne::new(MemDriver::from_bytes(&data).unwrap(), CS, true);
        let target = HoldOne::new(MemDriver::new(size).unwrap(), 0, false);
        let opts = BackupOptions {
            workers: 1,
            max_chunk: CS,
            cow_buffer: MIB,
            worker_priority: cowbackup::WorkerPriority::Low, // one shift: exactly one worker
            ..Default::default()
        };
        let job = backup_start(source.clone(), target.clone(), opts).unwrap();
        let _release = (ReleaseOnDrop(source.clone()), ReleaseOnDrop(target.clone()));
        until("the worker writing cluster 0", || target.waiting.load(Ordering::SeqCst));
        thread::scope(|s| {
            let (job, src) = (&job, &source);
            let host = s.spawn(move || {
                job.cow_before_write(CS, CS).unwrap();
                src.inner.write_at(&vec![0xAB; CS as usize], CS).unwrap();
            });
            until("the hook reading cluster 1", || source.waiting.load(Ordering::SeqCst));
            target.release();
            thread::sleep(Duration::from_micros(20 * (run % 8)));
            source.release();
            common::join_within("the host write", host, END);
        });
        let r = job.wait_timeout(END);
        assert!(matches!(r, Some(Ok(()))), "run {run}: {r:?}");
        assert_same(&format!("run {run}: the completed target"), &target.inner.to_vec(), &data);
    }
}
