//! The point-in-time property under stress: host threads write random data at random
//! unaligned offsets through the hook while the job copies; the target must equal the
//! source as it was at start, byte for byte.
//!
//! Every case covers both hook paths for certain, not by luck: the job starts with its
//! workers' first reads held at a [`Gate`]; a hook on the last cluster (which no parked
//! worker can hold) must copy it itself (`cow_requests`), and a hook inside a parked
//! worker's chunk must wait for that worker (`cow_waits`) before the gate opens. Then
//! writers race the job — one of them chasing the chunks workers are reading — while an
//! operator pauses, resumes and changes the speed at random. The sources hold data,
//! zeroed data and holes; cases run with `SyncMode::Full` and `SyncMode::Top`, on memory
//! and file drivers, into targets that read zeroes and targets that do not.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{assert_same, contents, join_within, until, wait_end, wait_parked, Gate, Rng, SetOnDrop};
use cowbackup::{backup_start, BackupOptions, BlockDriver, FileDriver, JobState, MemDriver, OpenFlags, SyncMode};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

#[derive(Debug)]
struct Case {
    cluster: u64,
    workers: usize,
    max_chunk: u64,
    sync: SyncMode,
}

fn matrix() -> Vec<Case> {
    let mut v = Vec::new();
    for cluster in [4096, 64 * KIB, MIB] {
        for workers in [1, 3] {
            for max_chunk in [cluster, (4 * cluster).max(MIB)] {
                for sync in [SyncMode::Full, SyncMode::Top] {
                    v.push(Case { cluster, workers, max_chunk, sync });
                }
            }
        }
    }
    v
}

fn size_for(case: &Case) -> u64 {
    // Unaligned sizes: the last cluster is partial.
    if case.cluster >= MIB {
        24 * MIB + 777
    } else {
        6 * MIB + 4097
    }
}

/// Write the source's start-of-job contents: pieces of `unit` bytes, even ones random
/// data (of random length, the rest a hole), odd ones alternately a hole and written
/// zeroes (allocated, reads zero), and the last piece data to the very end. Holes are
/// unallocated (skipped by `Top`); data pieces never touch, so a background claim covers
/// at most one piece under `Top`, and `workers * max_chunk` is less than half the device
/// under `Full`: the parked workers can never hold the last cluster.
fn lay_out(d: &dyn BlockDriver, case: &Case, rng: &mut Rng) {
    let size = d.size();
    let unit = case.cluster.max(64 * KIB);
    let mut off = 0;
    let mut i = 0;
    while off < size {
        let n = unit.min(size - off);
        if i % 2 == 0 {
            let len = (n / 2 + 1 + rng.below(n - n / 2)).min(n);
            d.write_at(&rng.bytes(len as usize), off).unwrap();
        } else if i % 4 == 3 {
            d.write_at(&vec![0; n as usize], off).unwrap();
        }
        off += n;
        i += 1;
    }
    let tail = unit.min(size);
    d.write_at(&rng.bytes(tail as usize), size - tail).unwrap();
}

/// Run one stressed backup of `source` (behind a closed gate) into `target`.
fn stress<D: BlockDriver + 'static>(source: Arc<Gate<D>>, target: Arc<dyn BlockDriver>, case: &Case, seed: u64) {
    let size = source.size();
    let cs = case.cluster;
    let before = contents(&*source);
    let mut rng = Rng::new(seed);
    // Slow enough that the writers race the copy (the operator may lift the limit).
    let speed = [size, 2 * size, 3 * size][rng.below(3) as usize];
    let opts = BackupOptions {
        cluster_size: cs,
        workers: case.workers,
        max_chunk: case.max_chunk,
        sync: case.sync,
        speed,
        ..Default::default()
    };
    let what = format!("{case:?}, speed {speed}, seed {seed}");
    let job = backup_start(source.clone(), target.clone(), opts).unwrap();
    let _open = source.open_on_drop(); // a failing assertion must not leave workers parked
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        let _open = source.open_on_drop(); // before the scope joins threads waiting on the gate
        let _done = SetOnDrop(&done); // and stop the writers when this fails

        // 1. The workers' first reads are held. A hook on the last cluster copies it itself.
        wait_parked(&source);
        let last = size - 1;
        job.cow_before_write(last, 1).unwrap();
        source.inner.write_at(&[0xA5], last).unwrap();
        assert!(job.info().cow_requests >= 1, "{what}: the hook on the last cluster did not copy: {:?}", job.info());
        // A hook inside a parked worker's chunk must wait for that worker.
        let (off, len) = source.parked()[0];
        let mid = off + len / 2;
        let job_ref = &job;
        let chaser = s.spawn(move || job_ref.cow_before_write(mid, 1));
        until("a hook to wait on a parked worker's claim", || job.info().cow_waits >= 1);
        assert!(!chaser.is_finished(), "{what}: the hook returned while its cluster was being copied");
        source.open();
        join_within("the hook after the worker's copy", chaser, Duration::from_secs(10)).unwrap();
        source.inner.write_at(&[0x5A], mid).unwrap();

        // 2. Writers race the job: three at random, one chasing the chunks being read.
        source.slow_job_reads(Duration::from_micros(100));
        let (job, source, done) = (&job, &source, &done);
        for t in 0..4u64 {
            s.spawn(move || {
                let mut rng = Rng::new(seed * 100 + t);
                let mut writes = 0;
                while !done.load(Ordering::Relaxed) || writes < 20 {
                    let inflight = if t == 3 { source.inflight() } else { Vec::new() };
                    let (off, len) = match inflight.get(rng.below(inflight.len().max(1) as u64) as usize) {
                        Some(&(o, l)) => (o + rng.below(l), 1 + rng.below(cs)),
                        None => {
                            let len = 1 + rng.below(3 * cs.min(256 * KIB));
                            (rng.below(size - len + 1), len)
                        }
                    };
                    let len = len.min(size - off);
                    job.cow_before_write(off, len).unwrap();
                    source.inner.write_at(&rng.bytes(len as usize), off).unwrap();
                    writes += 1;
                    if writes > 4000 {
                        break;
                    }
                }
            });
        }
        // The operator: pauses (always resumed), resumes, speed changes.
        s.spawn(move || {
            let mut rng = Rng::new(seed ^ 0x5eed);
            while !done.load(Ordering::Relaxed) && job.wait_timeout(Duration::from_millis(5 + rng.below(15))).is_none()
            {
                match rng.below(4) {
                    0 => {
                        let _ = job.pause();
                        thread::sleep(Duration::from_millis(1 + rng.below(20)));
                        let _ = job.resume();
                    }
                    1 => job.set_speed([0, size, 2 * size, 4 * size][rng.below(4) as usize]),
                    _ => {}
                }
            }
        });
        let r = wait_end(job, Duration::from_secs(60));
        done.store(true, Ordering::Relaxed);
        r.unwrap_or_else(|e| panic!("{what}: the job failed: {e}"));
    });
    let info = job.info();
    assert_eq!(info.state, JobState::Completed, "{what}");
    assert_eq!(info.offset, size, "{what}: {info:?}");
    assert_same(&format!("{what}: target vs point-in-time source"), &contents(&*target), &before);
    assert_ne!(contents(&*source), before, "{what}: the writers changed the source");
    assert!(info.cow_requests > 0, "{what}: no hook copied: {info:?}");
    assert!(info.cow_waits > 0, "{what}: no hook waited on an in-flight claim: {info:?}");
    assert!(info.bytes_zero > 0, "{what}: no zero cluster: {info:?}");
    if case.sync == SyncMode::Top {
        assert!(info.bytes_skipped > 0, "{what}: Top skipped no hole: {info:?}");
    } else {
        assert_eq!(info.bytes_skipped, 0, "{what}: {info:?}");
    }
}

#[test]
fn stress_memory_drivers() {
    for (i, case) in matrix().iter().enumerate() {
        let size = size_for(case);
        let mut rng = Rng::new(i as u64);
        let src = MemDriver::new(size).unwrap();
        lay_out(&src, case, &mut rng);
        let source = Gate::new(src, true);
        // Alternate a target that reads zeroes and a dirty one.
        let target = if i % 2 == 0 {
            MemDriver::new(size).unwrap()
        } else {
            MemDriver::from_bytes(&vec![0xEE; size as usize]).unwrap()
        };
        stress(source, Arc::new(target), case, i as u64);
    }
}

/// File drivers, the source sparse with real holes (behind the gate, the copy is read and
/// write through the drivers: copy offload between files is covered in tests/job.rs).
#[test]
fn stress_file_drivers() {
    let dir = tempfile::tempdir().unwrap();
    for (i, case) in matrix().iter().enumerate() {
        let size = size_for(case);
        let mut rng = Rng::new(1000 + i as u64);
        let sp = dir.path().join(format!("src{i}.img"));
        let src = FileDriver::create(&sp, size).unwrap();
        lay_out(&src, case, &mut rng);
        let source = Gate::new(src, true);
        // Alternate a fresh sparse target and a pre-existing dirty one.
        let tp = dir.path().join(format!("dst{i}.img"));
        let target = if i % 2 == 0 {
            FileDriver::create(&tp, size).unwrap()
        } else {
            std::fs::write(&tp, vec![0xEE; size as usize]).unwrap();
            FileDriver::open(&tp, OpenFlags::WRITE).unwrap()
        };
        stress(source, Arc::new(target), case, 1000 + i as u64);
        std::fs::remove_file(&sp).unwrap();
        std::fs::remove_file(&tp).unwrap();
    }
}
