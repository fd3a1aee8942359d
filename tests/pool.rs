//! `WorkerPool`: many jobs copied by a few shared threads (issue 26). Real files, real
//! threads: every target is compared with its point in time; the threads the jobs hold
//! are counted by name in /proc/self/task.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_same, contents, until, wait_end, Rng};
use cowbackup::{
    backup_start, BackupOptions, BlockDriver, ErrorKind, FaultDriver, FaultOp, FaultRule, FileDriver, JobState,
    OpenFlags, WorkerPool, WorkerPriority,
};

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(120);

/// Names of this process's threads.
fn thread_names() -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(s) = std::fs::read_to_string(e.path().join("comm")) {
            v.push(s.trim().to_string());
        }
    }
    v
}

/// A file of `size` random bytes (seed `seed`) in `dir`.
fn image(dir: &Path, name: &str, size: u64, seed: u64) -> (Arc<FileDriver>, Vec<u8>) {
    let data = Rng::new(seed).bytes(size as usize);
    let p = dir.join(name);
    std::fs::write(&p, &data).unwrap();
    (Arc::new(FileDriver::open(&p, OpenFlags::WRITE).unwrap()), data)
}

fn target(dir: &Path, name: &str, size: u64) -> Arc<FileDriver> {
    Arc::new(FileDriver::create(dir.join(name), size).unwrap())
}

fn pooled(pool: &Arc<WorkerPool>) -> BackupOptions {
    BackupOptions { pool: Some(pool.clone()), ..Default::default() }
}

/// 32 jobs on a pool of 2 threads: no job has a worker thread of its own (only its job
/// thread), and each target is its source at the start while the host writes to every
/// source through the hook.
#[test]
fn many_jobs_share_the_pool_threads_and_each_is_its_point_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let pool = WorkerPool::new(2, WorkerPriority::Normal).unwrap();
    assert_eq!(pool.threads(), 2);
    let n = 32;
    let size = 4 * MIB;
    let mut jobs = Vec::new();
    for i in 0..n {
        let (src, data) = image(dir.path(), &format!("s{i}"), size, i);
        let dst = target(dir.path(), &format!("d{i}"), size);
        // Speed-limited so that they all run at once while the threads are counted.
        let opts = BackupOptions { speed: 2 * MIB, ..pooled(&pool) };
        let job = Arc::new(backup_start(src.clone(), dst.clone(), opts).unwrap());
        jobs.push((job, src, dst, data));
    }
    until("every job attached to the pool", || pool.jobs() == n as usize);
    let names = thread_names();
    let ids: Vec<u64> = jobs.iter().map(|j| j.0.id()).collect();
    let own_workers: Vec<&String> =
        names.iter().filter(|t| ids.iter().any(|id| t.starts_with(&format!("cowbackup-{id}-")))).collect();
    assert!(own_workers.is_empty(), "pooled jobs started workers of their own: {own_workers:?}");
    let pool_threads = names.iter().filter(|t| t.starts_with("cowbackup-p")).count();
    assert!(pool_threads >= 2, "the pool's threads are named cowbackup-p<P>-<n>: {names:?}");
    // The host writes into every source, through the hook, while the jobs run.
    let mut rng = Rng::new(99);
    for (job, src, _, _) in &jobs {
        for _ in 0..8 {
            let off = rng.below(size / 4096) * 4096;
            job.cow_before_write(off, 4096).unwrap();
            src.write_at(&rng.bytes(4096), off).unwrap();
        }
    }
    for (job, _, _, _) in &jobs {
        job.set_speed(0);
    }
    for (job, _, dst, data) in &jobs {
        wait_end(job, LONG).unwrap();
        assert_eq!(job.info().state, JobState::Completed);
        assert_same("pooled target", &contents(&**dst), data);
    }
    until("every job left the pool", || pool.jobs() == 0);
}

/// Per-job speed limits hold inside a pool: a limited job takes at least its time while
/// an unlimited one in the same one-thread pool is done long before.
#[test]
fn speed_limits_hold_per_job_in_a_pool() {
    let dir = tempfile::tempdir().unwrap();
    let pool = WorkerPool::new(1, WorkerPriority::Normal).unwrap();
    let size = 8 * MIB;
    let (s1, d1) = image(dir.path(), "s1", size, 1);
    let (s2, d2) = image(dir.path(), "s2", size, 2);
    let t = Instant::now();
    let slow =
        backup_start(s1, target(dir.path(), "t1", size), BackupOptions { speed: 4 * MIB, ..pooled(&pool) }).unwrap();
    let fast = backup_start(s2, target(dir.path(), "t2", size), pooled(&pool)).unwrap();
    wait_end(&fast, LONG).unwrap();
    let fast_done = t.elapsed();
    assert_eq!(slow.info().state, JobState::Running, "the limited job is still copying when the other is done");
    wait_end(&slow, LONG).unwrap();
    let slow_done = t.elapsed();
    // 8 MiB at 4 MiB/s: 2 s, less the 100 ms burst and a chunk.
    assert!(slow_done >= Duration::from_millis(1800), "the limited job took only {slow_done:?}");
    assert!(fast_done < slow_done);
    let _ = (d1, d2);
}

/// Priorities order the jobs of a pool: with one thread, once a `Normal` job is
/// attached no chunk of a `Low` one is copied until the normal one has copied its last;
/// both complete.
#[test]
fn a_normal_job_goes_before_a_low_one_in_the_pool() {
    use std::sync::Mutex;
    let dir = tempfile::tempdir().unwrap();
    let pool = WorkerPool::new(1, WorkerPriority::Normal).unwrap();
    let size = 32 * MIB;
    let (s1, data1) = image(dir.path(), "s1", size, 1);
    let (s2, data2) = image(dir.path(), "s2", size, 2);
    let (t1, t2) = (target(dir.path(), "t1", size), target(dir.path(), "t2", size));
    // Which job each background chunk was copied for, in order.
    let order = Arc::new(Mutex::new(Vec::<u64>::new()));
    let o = order.clone();
    let trace: cowbackup::TraceFn = Arc::new(move |e: &cowbackup::TraceEvent| {
        if let cowbackup::TraceEvent::ChunkCopied { job, hook: false, .. } = e {
            o.lock().unwrap().push(*job);
        }
    });
    let opts = |p| BackupOptions { worker_priority: p, trace: Some(trace.clone()), ..pooled(&pool) };
    // The low one is paused until the normal one is attached, so both wait for the thread.
    let low = backup_start(s1, t1.clone(), opts(WorkerPriority::Low)).unwrap();
    low.pause().unwrap();
    let normal = backup_start(s2, t2.clone(), opts(WorkerPriority::Normal)).unwrap();
    until("both attached", || pool.jobs() == 2);
    low.resume().unwrap();
    wait_end(&normal, LONG).unwrap();
    wait_end(&low, LONG).unwrap();
    let order = order.lock().unwrap().clone();
    let last_normal = order.iter().rposition(|&j| j == normal.id()).unwrap();
    let low_before = order[..last_normal].iter().filter(|&&j| j == low.id()).count();
    // At most the chunk the thread was copying when the normal job attached.
    assert!(low_before <= 1, "{low_before} low chunks went before the normal job's last: {order:?}");
    assert_same("low", &contents(&*t1), &data1);
    assert_same("normal", &contents(&*t2), &data2);
}

/// Pause, resume and cancel reach a pooled job; a job whose target fails fails alone,
/// the other jobs of the pool complete.
#[test]
fn pause_cancel_and_a_failing_job_in_a_pool() {
    let dir = tempfile::tempdir().unwrap();
    let pool = WorkerPool::new(2, WorkerPriority::Normal).unwrap();
    let size = 8 * MIB;
    // Paused: no progress; resumed: completes.
    let (s, data) = image(dir.path(), "s", size, 1);
    let t = target(dir.path(), "t", size);
    let job = backup_start(s, t.clone(), BackupOptions { speed: 8 * MIB, ..pooled(&pool) }).unwrap();
    job.pause().unwrap();
    until("paused", || job.info().state == JobState::Paused);
    let at = job.info().offset;
    std::thread::sleep(Duration::from_millis(300));
    assert!(job.info().offset <= at + MIB, "a paused pooled job copied on");
    job.resume().unwrap();
    job.set_speed(0);
    wait_end(&job, LONG).unwrap();
    assert_same("resumed", &contents(&*t), &data);
    // Cancelled while speed-limited: ends Cancelled, promptly.
    let (s, _) = image(dir.path(), "s2", size, 2);
    let job = backup_start(s, target(dir.path(), "t2", size), BackupOptions { speed: MIB, ..pooled(&pool) }).unwrap();
    until("copying", || job.info().offset > 0);
    job.cancel();
    let e = wait_end(&job, Duration::from_secs(30)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled);
    // A failing target fails its job; a job beside it completes.
    let (s3, _) = image(dir.path(), "s3", size, 3);
    let bad = Arc::new(FaultDriver::new(FileDriver::create(dir.path().join("t3"), size).unwrap()));
    bad.add(FaultRule::new(FaultOp::Write).range(4 * MIB, MIB).forever());
    let (s4, data4) = image(dir.path(), "s4", size, 4);
    let t4 = target(dir.path(), "t4", size);
    let failing = backup_start(s3, bad.clone(), pooled(&pool)).unwrap();
    let good = backup_start(s4, t4.clone(), pooled(&pool)).unwrap();
    let e = wait_end(&failing, LONG).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_eq!(failing.info().state, JobState::Failed);
    wait_end(&good, LONG).unwrap();
    assert_same("beside a failing job", &contents(&*t4), &data4);
    until("both left the pool", || pool.jobs() == 0);
}

/// Bad input changes nothing; once the pool and every job started with it are gone, so
/// are its threads.
#[test]
fn pool_threads_end_with_the_pool_and_bad_sizes_are_refused() {
    for bad in [0, cowbackup::MAX_POOL_THREADS + 1] {
        let e = WorkerPool::new(bad, WorkerPriority::Normal).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "{e}");
        assert!(e.to_string().contains("pool threads"), "{e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = WorkerPool::new(3, WorkerPriority::Low).unwrap();
    let prefix = format!("{:?}", pool); // WorkerPool { id: P, .. }
    let id: u64 = prefix.split("id: ").nth(1).unwrap().split(',').next().unwrap().trim().parse().unwrap();
    let name = format!("cowbackup-p{id}-");
    until("the pool's 3 threads named", || thread_names().iter().filter(|t| t.starts_with(&name)).count() == 3);
    let (s, data) = image(dir.path(), "s", 4 * MIB, 5);
    let t = target(dir.path(), "t", 4 * MIB);
    let job = backup_start(s, t.clone(), pooled(&pool)).unwrap();
    drop(pool); // the job keeps the pool alive
    wait_end(&job, LONG).unwrap();
    assert_same("pool dropped by its creator first", &contents(&*t), &data);
    drop(job);
    until("the pool's threads ended", || !thread_names().iter().any(|t| t.starts_with(&name)));
    // The target file was written through the driver and reads back the same.
    let mut b = vec![0u8; 4096];
    std::fs::File::open(dir.path().join("t")).unwrap().read_exact_at(&mut b, 0).unwrap();
    assert_eq!(b, data[..4096]);
}
