//! Job behaviour: unaligned devices and ranges, QEMU iotest 056, sync modes, zeroes,
//! cancel, bad input, panics in drivers, and a check against qemu-img.

mod common;

use std::io;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    assert_allocated, assert_same, contents, data_bytes, join_within, qemu_img, until, wait_end, wait_parked,
    wait_parked_n, Gate, Rec, Recorder, Rng,
};
use cowbackup::{
    allocated_bytes, backup_start, BackupOptions, BlockDriver, ErrorKind, FileDriver, JobState, MemDriver, OpenFlags,
    SyncMode, WorkerPriority,
};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
/// Longest a test waits for a job to end before it fails.
const END: Duration = Duration::from_secs(60);

fn mem(data: &[u8]) -> Arc<MemDriver> {
    Arc::new(MemDriver::from_bytes(data).unwrap())
}

#[test]
fn unaligned_device_and_hook_ranges() {
    // 4097 bytes: one full 4 KiB cluster and a 1-byte last cluster.
    let mut rng = Rng::new(1);
    let orig = rng.bytes(4097);
    let source = mem(&orig);
    let target = Arc::new(MemDriver::new(4097).unwrap());
    let gate = Gate::new(source.clone(), true); // hold the background copy back
    let opts = BackupOptions { cluster_size: 4096, workers: 1, max_chunk: 4096, ..Default::default() };
    let job = backup_start(gate.clone(), target.clone(), opts).unwrap();
    let _open = gate.open_on_drop(); // a failing assertion must not leave the worker parked
                                     // The worker has claimed cluster 0 and waits at the gate.
    wait_parked(&gate);
    // Hook on the last byte only: copies the partial last cluster.
    job.cow_before_write(4096, 1).unwrap();
    source.write_at(&[0xAA], 4096).unwrap();
    assert_eq!((job.info().cow_requests, job.info().cow_bytes), (1, 1));
    std::thread::scope(|s| {
        let _open = gate.open_on_drop(); // before the scope joins the hook
                                         // An unaligned range in cluster 0: waits for the worker copying it, copies nothing.
        let hook = s.spawn(|| {
            job.cow_before_write(100, 3000).unwrap();
            source.write_at(&[0xBB; 3000], 100).unwrap();
        });
        until("the hook to wait on the worker's claim", || job.info().cow_waits >= 1);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!hook.is_finished(), "the hook must wait for the cluster being copied");
        gate.open();
        join_within("the hook after the worker's copy", hook, Duration::from_secs(10));
    });
    // The whole device, now copied: fast path.
    job.cow_before_write(0, 4097).unwrap();
    source.write_at(&[0xCC; 4097], 0).unwrap();
    assert_eq!((job.info().cow_requests, job.info().cow_bytes), (1, 1));
    // Past the end or overflowing: rejected, nothing copied.
    assert_eq!(job.cow_before_write(4097, 1).unwrap_err().kind(), ErrorKind::InvalidInput);
    assert_eq!(job.cow_before_write(1, u64::MAX).unwrap_err().kind(), ErrorKind::InvalidInput);
    assert_eq!(job.cow_before_write(u64::MAX, 2).unwrap_err().kind(), ErrorKind::InvalidInput);
    assert!(job.cow_before_write(4097, 0).is_ok(), "empty range at the end is a no-op");
    wait_end(&job, END).unwrap();
    assert_same("4097-byte target", &target.to_vec(), &orig);
    // After completion the hook is a no-op and bad ranges are still errors.
    job.cow_before_write(0, 4097).unwrap();
    assert_eq!(job.info().cow_requests, 1);
    assert!(job.cow_before_write(0, 4098).is_err());
}

#[test]
fn hook_over_many_clusters_and_the_partial_last_one() {
    let size = 10 * MIB + 12345;
    let mut rng = Rng::new(2);
    let orig = rng.bytes(size as usize);
    let source = mem(&orig);
    let target = Arc::new(MemDriver::new(size).unwrap());
    let gate = Gate::new(source.clone(), true); // hold the background copy back
    let job = backup_start(gate.clone(), target.clone(), BackupOptions { workers: 3, ..Default::default() }).unwrap();
    let _open = gate.open_on_drop();
    // 5 MiB + a bit, unaligned at both ends, to the very end of the device.
    let off = size - 5 * MIB - 777;
    job.cow_before_write(off, size - off).unwrap();
    source.write_at(&vec![0x5A; (size - off) as usize], off).unwrap();
    gate.open();
    wait_end(&job, END).unwrap();
    assert_same("target", &target.to_vec(), &orig);
    let info = job.info();
    assert_eq!(info.cow_requests, 1);
    // The clusters touched: from the one holding `off` to the partial last cluster.
    let first = off / 65536 * 65536;
    assert_eq!(info.cow_bytes, size - first);
}

/// QEMU iotest 056 "overlapping writes".
#[test]
fn iotest_056_overlapping_writes() {
    let source = Gate::new(MemDriver::from_bytes(&vec![0x42; 2 * MIB as usize]).unwrap(), true);
    let target = Arc::new(MemDriver::new(2 * MIB).unwrap());
    let opts = BackupOptions { cluster_size: 64 * KIB, workers: 1, max_chunk: 64 * KIB, ..Default::default() };
    let job = backup_start(source.clone(), target.clone(), opts).unwrap();
    let _open = source.open_on_drop();
    // Hold the background copy back: its first read waits at the gate.
    wait_parked(&source);
    let middle = MIB + 64 * KIB;
    job.cow_before_write(middle, 64 * KIB).unwrap();
    source.inner.write_at(&[0x23; 64 * KIB as usize], middle).unwrap();
    job.cow_before_write(MIB, MIB).unwrap();
    source.inner.write_at(&[0x66; MIB as usize], MIB).unwrap();
    let info = job.info();
    assert_eq!(info.cow_requests, 2);
    assert_eq!(info.cow_bytes, MIB, "the second write copied [1 MiB, 2 MiB) except the middle cluster");
    assert_eq!(source.reads_overlapping(middle, 64 * KIB), 1, "the middle cluster was read once");
    source.open();
    wait_end(&job, END).unwrap();
    assert_eq!(target.to_vec(), vec![0x42; 2 * MIB as usize]);
    assert_eq!(source.reads_overlapping(middle, 64 * KIB), 1);
}

#[test]
fn hook_after_cancel_is_a_noop_and_none_keeps_hooked_old_data() {
    let mut rng = Rng::new(3);
    let orig = rng.bytes(4 * MIB as usize);
    let source = mem(&orig);
    let target = Arc::new(MemDriver::new(4 * MIB).unwrap());
    let job =
        backup_start(source.clone(), target.clone(), BackupOptions { sync: SyncMode::None, ..Default::default() })
            .unwrap();
    // Fleecing: only hooked clusters reach the target.
    job.cow_before_write(100 * KIB, 10).unwrap(); // cluster [64K, 128K)
    source.write_at(&[1; 10], 100 * KIB).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(job.info().state, JobState::Running);
    assert_eq!(job.info().bytes_copied, 64 * KIB, "sync=None copies nothing in the background");
    job.cancel();
    assert_eq!(wait_end(&job, END).unwrap_err().kind(), ErrorKind::Cancelled);
    assert_eq!(job.info().state, JobState::Cancelled);
    // After cancel the hook copies nothing.
    job.cow_before_write(0, 64 * KIB).unwrap();
    source.write_at(&[2; 64 * KIB as usize], 0).unwrap();
    let t = target.to_vec();
    assert_same(
        "hooked cluster",
        &t[64 * KIB as usize..128 * KIB as usize],
        &orig[64 * KIB as usize..128 * KIB as usize],
    );
    assert!(t[..64 * KIB as usize].iter().all(|&b| b == 0), "cluster 0 was hooked after cancel");
    assert!(t[128 * KIB as usize..].iter().all(|&b| b == 0));
    assert_eq!(job.info().cow_requests, 1);
}

#[test]
fn cancel_of_a_full_backup_and_hooks_waiting_on_it() {
    let size = 64 * MIB;
    let source = Gate::new(MemDriver::from_bytes(&Rng::new(4).bytes(size as usize)).unwrap(), false);
    let target = Arc::new(MemDriver::new(size).unwrap());
    let job = backup_start(source.clone(), target, BackupOptions { speed: 8 * MIB, ..Default::default() }).unwrap();
    let _open = source.open_on_drop();
    std::thread::sleep(Duration::from_millis(150));
    until("background progress", || job.info().offset > 0);
    // Hold the workers' next reads: each parks holding the chunk it claimed.
    source.close();
    wait_parked_n(&source, 2);
    let parked = source.parked();
    std::thread::scope(|s| {
        let _open = source.open_on_drop(); // before the scope joins the hooks
                                           // A hook inside each parked chunk: it must wait for the worker copying it.
        let hooks: Vec<_> = parked
            .iter()
            .map(|&(off, len)| {
                let job = &job;
                s.spawn(move || job.cow_before_write(off + len / 2, 10))
            })
            .collect();
        until("the hooks to wait on the workers' claims", || job.info().cow_waits >= parked.len() as u64);
        std::thread::sleep(Duration::from_millis(20));
        assert!(hooks.iter().all(|h| !h.is_finished()), "a hook returned while its clusters were being copied");
        job.cancel();
        // Cancel releases the waiting hooks at once, while the workers are still parked.
        for h in hooks {
            join_within("a waiting hook to return after cancel", h, Duration::from_secs(5)).unwrap();
        }
        assert_eq!(source.parked(), parked, "the hooks returned because of cancel, not because the copy ended");
        source.open();
    });
    assert_eq!(wait_end(&job, END).unwrap_err().kind(), ErrorKind::Cancelled);
    let info = job.info();
    assert_eq!(info.state, JobState::Cancelled);
    assert!(info.offset < size);
    assert_eq!(info.cow_requests, 0, "the cancelled hooks copied nothing: {info:?}");
    let before = info.cow_requests;
    job.cow_before_write(size - MIB, MIB).unwrap();
    assert_eq!(job.info().cow_requests, before);
    job.cancel(); // twice: no effect
    assert!(job.pause().is_err(), "pause of an ended job is refused");
}

/// DESIGN "At the end the job flushes the target": once, after the last write of the
/// background copy and of the hooks, before the completion callback runs and `wait`
/// returns. Sync Full and Top, into a dirty target (zero clusters and holes are written
/// as zeroes), with hook copies while the job runs.
#[test]
fn the_target_is_flushed_once_after_the_last_write_before_the_end() {
    let size = 4 * MIB + 4097;
    for sync in [SyncMode::Full, SyncMode::Top] {
        let mut rng = Rng::new(20);
        // Data extents with zeroed data inside, and holes (unallocated: skipped by Top).
        let source = Arc::new(MemDriver::new(size).unwrap());
        for (i, off) in (0..size).step_by(256 * KIB as usize).enumerate() {
            let len = (128 * KIB).min(size - off);
            match i % 3 {
                0 => source.write_at(&rng.bytes(len as usize), off).unwrap(),
                1 => source.write_at(&vec![0; len as usize], off).unwrap(),
                _ => {}
            }
        }
        source.write_at(&[0x77; 4097], size - 4097).unwrap();
        let before = source.to_vec();
        let target = Recorder::new(MemDriver::from_bytes(&vec![0xEE; size as usize]).unwrap());
        let t = target.clone();
        // Slow enough that the hooks below find uncopied clusters (Top copies only the
        // ~1.4 MiB of data extents: at 16 MiB/s it would be done within its first burst).
        let opts = BackupOptions {
            sync,
            speed: 2 * MIB,
            max_chunk: 256 * KIB,
            on_complete: Some(Arc::new(move |r: &cowbackup::Result<()>| {
                t.mark(if r.is_ok() { "callback: ok" } else { "callback: error" })
            })),
            ..Default::default()
        };
        let job = backup_start(source.clone(), target.clone(), opts).unwrap();
        for _ in 0..32 {
            let off = rng.below(size - 8192);
            job.cow_before_write(off, 8192).unwrap();
            source.write_at(&rng.bytes(8192), off).unwrap();
        }
        wait_end(&job, END).unwrap();
        target.mark("wait returned");
        let log = target.log();
        let info = job.info();
        assert!(info.cow_requests > 0, "{sync:?}: no hook copied: {info:?}");
        assert!(info.bytes_zero > 0, "{sync:?}: no zero clusters: {info:?}");
        let flushes: Vec<usize> = log.iter().enumerate().filter(|(_, r)| **r == Rec::Flush).map(|(i, _)| i).collect();
        assert_eq!(flushes.len(), 1, "{sync:?}: the target must be flushed exactly once; log tail: {:?}", tail(&log));
        let flush = flushes[0];
        let last_write = log.iter().rposition(|r| matches!(r, Rec::Write(..) | Rec::WriteZeroes(..)));
        let last_write = last_write.expect("the job wrote the target");
        assert!(
            last_write < flush,
            "{sync:?}: a write after the final flush (write #{last_write}, flush #{flush}): {:?}",
            tail(&log)
        );
        assert!(log.iter().any(|r| matches!(r, Rec::WriteZeroes(..))), "{sync:?}: no write_zeroes");
        assert_eq!(
            &log[flush..],
            &[Rec::Flush, Rec::Mark("callback: ok"), Rec::Mark("wait returned")],
            "{sync:?}: flush, then the completion callback, then wait returns"
        );
        assert_same("target", &target.inner.to_vec(), &before);
    }
}

fn tail(log: &[Rec]) -> &[Rec] {
    &log[log.len().saturating_sub(6)..]
}

#[test]
fn top_on_a_sparse_file_keeps_the_target_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let sp = dir.path().join("sparse.img");
    let src = FileDriver::create(&sp, size).unwrap();
    let mut rng = Rng::new(5);
    // 3 data extents, the rest holes.
    for off in [0, 20 * MIB + 4096, size - MIB] {
        src.write_at(&rng.bytes(MIB as usize), off).unwrap();
    }
    let snapshot = contents(&src);
    let source = Arc::new(src);
    let tp = dir.path().join("target.img");
    let target = Arc::new(FileDriver::create(&tp, size).unwrap());
    let job =
        backup_start(source, target.clone(), BackupOptions { sync: SyncMode::Top, ..Default::default() }).unwrap();
    wait_end(&job, END).unwrap();
    let info = job.info();
    assert_same("target", &contents(&*target), &snapshot);
    // 3 MiB of data; the unaligned extent touches one more 64 KiB cluster.
    assert_eq!(info.bytes_copied, 3 * MIB + 64 * KIB, "{info:?}");
    assert_eq!(info.bytes_skipped, size - info.bytes_copied);
    assert_eq!(info.offset, size);
    assert_eq!(data_bytes(&*target), info.bytes_copied);
    assert_allocated("sparse target", allocated_bytes(&tp).unwrap(), info.bytes_copied);
}

#[test]
fn top_into_a_dirty_target_zeroes_the_holes() {
    let size = 8 * MIB;
    let source = Arc::new(MemDriver::new(size).unwrap());
    source.write_at(&[7; 4096], 3 * MIB).unwrap();
    let target = mem(&vec![0xEE; size as usize]);
    let job = backup_start(source.clone(), target.clone(), BackupOptions { sync: SyncMode::Top, ..Default::default() })
        .unwrap();
    wait_end(&job, END).unwrap();
    assert_same("target", &target.to_vec(), &source.to_vec());
    assert_eq!(job.info().bytes_skipped, size - 64 * KIB);
}

#[test]
fn zero_clusters_become_holes() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let mut rng = Rng::new(6);
    // Fully allocated source where every other 64 KiB cluster is written zeroes.
    let mut data = rng.bytes(size as usize);
    for c in (0..size / (64 * KIB)).step_by(2) {
        let o = (c * 64 * KIB) as usize;
        data[o..o + 64 * KIB as usize].fill(0);
    }
    let sp = dir.path().join("src.img");
    std::fs::write(&sp, &data).unwrap();
    assert_allocated("source", allocated_bytes(&sp).unwrap(), size);
    let source: Arc<dyn BlockDriver> = Arc::new(FileDriver::open(&sp, OpenFlags::empty()).unwrap());
    // A fresh sparse target: zero clusters are not written at all.
    let tp = dir.path().join("fresh.img");
    let target = Arc::new(FileDriver::create(&tp, size).unwrap());
    let job = backup_start(source.clone(), target.clone(), BackupOptions::default()).unwrap();
    wait_end(&job, END).unwrap();
    assert_same("fresh target", &contents(&*target), &data);
    assert_eq!(job.info().bytes_zero, size / 2);
    assert_eq!(job.info().bytes_copied, size / 2);
    assert_eq!(data_bytes(&*target), size / 2);
    assert_allocated("fresh target", allocated_bytes(&tp).unwrap(), size / 2);
    drop(job);
    // A fully written target: zero clusters are punched out.
    let tp2 = dir.path().join("dirty.img");
    std::fs::write(&tp2, vec![0xEE; size as usize]).unwrap();
    let target2 = Arc::new(FileDriver::open(&tp2, OpenFlags::WRITE).unwrap());
    let job = backup_start(source, target2.clone(), BackupOptions::default()).unwrap();
    wait_end(&job, END).unwrap();
    assert_same("dirty target", &contents(&*target2), &data);
    assert_eq!(data_bytes(&*target2), size / 2);
    assert_allocated("dirty target", allocated_bytes(&tp2).unwrap(), size / 2);
}

#[test]
fn bad_input_is_rejected_and_writes_nothing() {
    let src = || -> Arc<dyn BlockDriver> { mem(&[1u8; 1 << 20]) };
    let target = Arc::new(MemDriver::new(1 << 20).unwrap());
    let t = || -> Arc<dyn BlockDriver> { target.clone() };
    let err = |o: BackupOptions| backup_start(src(), t(), o).err().expect("must be rejected");
    let expect_invalid = |o: BackupOptions, needle: &str| {
        let e = err(o);
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.to_string().contains(needle), "{e} should mention {needle}");
    };
    expect_invalid(BackupOptions { cluster_size: 0, ..Default::default() }, "cluster_size");
    expect_invalid(BackupOptions { cluster_size: 2048, ..Default::default() }, "cluster_size");
    expect_invalid(BackupOptions { cluster_size: 65536 + 4096, ..Default::default() }, "cluster_size");
    expect_invalid(BackupOptions { cluster_size: 128 << 20, ..Default::default() }, "cluster_size");
    expect_invalid(BackupOptions { workers: 0, ..Default::default() }, "workers");
    expect_invalid(BackupOptions { workers: 65, ..Default::default() }, "workers");
    expect_invalid(BackupOptions { max_chunk: 0, ..Default::default() }, "max_chunk");
    expect_invalid(BackupOptions { max_chunk: 2 << 30, ..Default::default() }, "max_chunk");
    expect_invalid(BackupOptions { cbw_timeout: Some(Duration::ZERO), ..Default::default() }, "cbw_timeout");
    // Different sizes.
    let small: Arc<dyn BlockDriver> = Arc::new(MemDriver::new(4096).unwrap());
    let e = backup_start(src(), small, BackupOptions::default()).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("differ in size"), "{e}");
    // The same object as source and target.
    let same = src();
    let e = backup_start(same.clone(), same, BackupOptions::default()).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("same device"), "{e}");
    // The same file through two handles.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("img");
    let a = Arc::new(FileDriver::create(&p, MIB).unwrap());
    let b = Arc::new(FileDriver::open(&p, OpenFlags::WRITE).unwrap());
    let e = backup_start(a, b, BackupOptions::default()).err().unwrap();
    assert!(e.to_string().contains("same file"), "{e}");
    // Nothing was written to the target by any of the refused jobs.
    assert!(target.reads_as_zero());
}

/// A driver that panics on read: the job fails with EIO instead of a dead thread.
struct Panicky(MemDriver);
impl BlockDriver for Panicky {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, _buf: &mut [u8], offset: u64) -> io::Result<()> {
        panic!("driver bug at {offset}");
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }
}

#[test]
fn a_panicking_driver_fails_the_job() {
    let source = Arc::new(Panicky(MemDriver::new(MIB).unwrap()));
    let target = Arc::new(MemDriver::new(MIB).unwrap());
    let calls = Arc::new(AtomicU64::new(0));
    let result = Arc::new(Mutex::new(None));
    let (c, r) = (calls.clone(), result.clone());
    let opts = BackupOptions {
        on_complete: Some(Arc::new(move |res: &cowbackup::Result<()>| {
            c.fetch_add(1, Ordering::SeqCst);
            *r.lock().unwrap() = Some(res.clone());
        })),
        ..Default::default()
    };
    let job = backup_start(source, target, opts).unwrap();
    let e = wait_end(&job, END).unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert!(e.to_string().contains("panicked"), "{e}");
    assert_eq!(job.info().state, JobState::Failed);
    drop(job);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(result.lock().unwrap().clone().unwrap().unwrap_err().errno(), libc::EIO);
}

#[test]
fn threads_are_named() {
    let source = Gate::new(MemDriver::from_bytes(&[1u8; 4 << 20]).unwrap(), true);
    let target = Arc::new(MemDriver::new(4 * MIB).unwrap());
    let opts = BackupOptions { workers: 2, max_chunk: 64 * KIB, ..Default::default() };
    let job = backup_start(source.clone(), target, opts).unwrap();
    let _open = source.open_on_drop();
    wait_parked_n(&source, 2);
    let names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect();
    let id = job.id();
    for want in [format!("cowbackup-{id}"), format!("cowbackup-{id}-1"), format!("cowbackup-{id}-2")] {
        assert!(names.contains(&want), "no thread {want} in {names:?}");
    }
    source.open();
    wait_end(&job, END).unwrap();
}

/// The thread ids of the job's workers `cowbackup-<id>-<n>`.
fn worker_tids(id: u64, n: usize) -> Vec<i32> {
    let names: Vec<String> = (1..=n).map(|k| format!("cowbackup-{id}-{k}")).collect();
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            names.contains(&comm.trim().to_string()).then(|| e.file_name().to_str()?.parse().ok())?
        })
        .collect()
}

/// (scheduling policy, nice, I/O priority) of thread `tid`, as the kernel has them.
fn sched_of(tid: i32) -> (i32, i32, i64) {
    // SAFETY: plain syscalls with integer arguments; errno is cleared before getpriority
    // (which may return -1 as a value).
    unsafe {
        let policy = libc::sched_getscheduler(tid);
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        assert_eq!(*libc::__errno_location(), 0, "getpriority({tid})");
        let io = libc::syscall(libc::SYS_ioprio_get, 1 /* IOPRIO_WHO_PROCESS */, tid);
        (policy, nice, io)
    }
}

/// `worker_priority` reaches the kernel: each worker thread's policy, nice and I/O
/// priority read back with `sched_getscheduler`, `getpriority` and `ioprio_get`. The
/// default, `Normal`, leaves the workers as the starting thread.
#[test]
fn worker_priority_takes_effect() {
    // SAFETY: gettid takes no arguments.
    let me = sched_of(unsafe { libc::gettid() });
    const BE7: i64 = (2 << 13) | 7;
    const IDLE: i64 = 3 << 13;
    for (prio, want) in [
        (None, None),
        (Some(WorkerPriority::Low), Some((libc::SCHED_BATCH, 19, BE7))),
        (Some(WorkerPriority::Idle), Some((libc::SCHED_IDLE, me.1, IDLE))),
        (Some(WorkerPriority::Normal), None),
    ] {
        let source = Gate::new(MemDriver::from_bytes(&[1u8; 4 << 20]).unwrap(), true);
        let target = Arc::new(MemDriver::new(4 * MIB).unwrap());
        let mut opts = BackupOptions { workers: 2, max_chunk: 64 * KIB, ..Default::default() };
        if let Some(p) = prio {
            opts.worker_priority = p;
        }
        let job = backup_start(source.clone(), target, opts).unwrap();
        let _open = source.open_on_drop();
        // Parked in their first read: their priority was set before it.
        wait_parked_n(&source, 2);
        let tids = worker_tids(job.id(), 2);
        assert_eq!(tids.len(), 2, "{prio:?}: worker threads not found");
        for tid in tids {
            let got = sched_of(tid);
            match want {
                Some((policy, nice, io)) => {
                    assert_eq!(got.0, policy, "{prio:?}: policy of worker {tid}");
                    assert_eq!(got.1, nice, "{prio:?}: nice of worker {tid}");
                    // Class (bits 13..) and, for best effort, level (bits 0..2).
                    let level = |v: i64| if v >> 13 == 2 { v & 7 } else { 0 };
                    assert_eq!(
                        (got.2 >> 13, level(got.2)),
                        (io >> 13, level(io)),
                        "{prio:?}: I/O priority of worker {tid}"
                    );
                }
                None => assert_eq!((got.0, got.1), (me.0, me.1), "{prio:?}: worker {tid} not as its starter"),
            }
        }
        source.open();
        wait_end(&job, END).unwrap();
    }
}

/// With `cow_buffer` and the default priority the job runs two shifts (priority.rs):
/// workers `-1`, `-2` as their starter, copying while the host is quiet, and `-3` (and
/// `-4` with more than 2 CPUs: one fewer than the CPUs, at most `workers`) at
/// `SCHED_IDLE`, resting until the host writes a cluster not yet copied, and then
/// copying. The backup is still the point in time.
#[test]
fn a_cow_buffer_job_has_a_night_shift_at_idle_priority() {
    // SAFETY: gettid takes no arguments.
    let me = sched_of(unsafe { libc::gettid() });
    let size = 8 * MIB;
    let data: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8).collect();
    let source = Gate::new(MemDriver::from_bytes(&data).unwrap(), true);
    let target = Arc::new(MemDriver::new(size).unwrap());
    let opts = BackupOptions { workers: 2, max_chunk: 64 * KIB, cow_buffer: MIB, ..Default::default() };
    let job = backup_start(source.clone(), target.clone(), opts).unwrap();
    let _open = source.open_on_drop();
    // The host is quiet: the day shift copies (parked in its first reads), the night rests.
    wait_parked_n(&source, 2);
    // The night shift starts after the day shift, and lowers itself first thing.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let night = cpus.saturating_sub(1).clamp(1, 2);
    let mut policies = vec![];
    until("the night shift's threads, at SCHED_IDLE", || {
        policies = worker_tids(job.id(), 2 + night).iter().map(|&t| sched_of(t).0).collect::<Vec<i32>>();
        policies.len() == 2 + night && policies.iter().filter(|&&p| p == libc::SCHED_IDLE).count() == night
    });
    assert!(worker_tids(job.id(), 5).len() == 2 + night, "no more workers than the two shifts");
    assert_eq!(policies.iter().filter(|&&p| p == me.0).count(), 2, "day shift as its starter: {policies:?}");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(source.parked().len(), 2, "the night shift copied while the host was quiet");
    // The host writes a cluster far from the day shift: the night shift starts copying.
    job.cow_before_write(size - 64 * KIB, 4096).unwrap();
    source.inner.write_at(&[0xEE; 4096], size - 64 * KIB).unwrap();
    wait_parked_n(&source, 2 + night);
    source.open();
    wait_end(&job, END).unwrap();
    assert_eq!(job.info().state, JobState::Completed);
    assert_eq!(target.to_vec(), data, "the backup is the point in time");
}

/// Real files, real writers, checked by a real peer: `qemu-img compare`.
#[test]
fn qemu_img_compare_agrees() {
    let Some(qemu_img) = qemu_img() else {
        eprintln!("skipped: qemu-img is not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB + 512;
    let mut rng = Rng::new(7);
    let sp = dir.path().join("src.img");
    let mut data = rng.bytes(size as usize);
    data[..4 * MIB as usize].fill(0);
    std::fs::write(&sp, &data).unwrap();
    let snap = dir.path().join("snap.img");
    std::fs::copy(&sp, &snap).unwrap();
    let source = Arc::new(FileDriver::open(&sp, OpenFlags::WRITE).unwrap());
    let tp = dir.path().join("dst.img");
    let target = Arc::new(FileDriver::create(&tp, size).unwrap());
    let job = backup_start(source.clone(), target, BackupOptions { speed: 64 * MIB, ..Default::default() }).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut rng = Rng::new(8);
            while job.wait_timeout(Duration::ZERO).is_none() {
                let len = 1 + rng.below(200_000);
                let off = rng.below(size - len);
                job.cow_before_write(off, len).unwrap();
                source.write_at(&rng.bytes(len as usize), off).unwrap();
            }
        });
    });
    wait_end(&job, END).unwrap();
    assert!(job.info().cow_requests > 0);
    let cmp = |a: &std::path::Path, b: &std::path::Path| {
        Command::new(&qemu_img).args(["compare", "-q", "-f", "raw", "-F", "raw"]).arg(a).arg(b).status().unwrap()
    };
    assert!(cmp(&snap, &tp).success(), "qemu-img compare: target differs from the snapshot");
    assert!(!cmp(&sp, &tp).success(), "qemu-img compare sees the live source differ from the backup");
}
