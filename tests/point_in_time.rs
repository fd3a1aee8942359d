//! The point-in-time property under stress: host threads write random data at random
//! unaligned offsets through the hook while the job copies; the target must equal the
//! source as it was at start, byte for byte.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use common::{assert_same, contents, Rng};
use cowbackup::{backup_start, BackupOptions, BlockDriver, FileDriver, JobState, MemDriver, OpenFlags};

const MIB: u64 = 1 << 20;

struct Case {
    cluster: u64,
    workers: usize,
    max_chunk: u64,
}

fn matrix() -> Vec<Case> {
    let mut v = Vec::new();
    for cluster in [4096, 64 << 10, MIB] {
        for workers in [1, 4] {
            for max_chunk in [cluster, 4 * MIB] {
                v.push(Case { cluster, workers, max_chunk });
            }
        }
    }
    v
}

/// Run one stressed backup of `source` into `target`; returns hook copies made.
fn stress(source: Arc<dyn BlockDriver>, target: Arc<dyn BlockDriver>, case: &Case, seed: u64) -> u64 {
    let size = source.size();
    let before = contents(&*source);
    let opts = BackupOptions {
        cluster_size: case.cluster,
        workers: case.workers,
        max_chunk: case.max_chunk,
        // Slow enough that the writers race the whole copy.
        speed: size * 4,
        ..Default::default()
    };
    let job = backup_start(source.clone(), target.clone(), opts).unwrap();
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        for t in 0..4u64 {
            let (job, source, done) = (&job, &source, &done);
            s.spawn(move || {
                let mut rng = Rng::new(seed * 100 + t);
                let mut writes = 0;
                while !done.load(Ordering::Relaxed) || writes < 20 {
                    let len = 1 + rng.below(3 * case.cluster.min(256 << 10));
                    let off = rng.below(size - len + 1);
                    let data = rng.bytes(len as usize);
                    job.cow_before_write(off, len).unwrap();
                    source.write_at(&data, off).unwrap();
                    writes += 1;
                    if writes > 4000 {
                        break;
                    }
                }
            });
        }
        job.wait().unwrap();
        done.store(true, Ordering::Relaxed);
    });
    let info = job.info();
    assert_eq!(info.state, JobState::Completed);
    assert_eq!(info.offset, size, "{info:?}");
    assert_same("target vs point-in-time source", &contents(&*target), &before);
    assert_ne!(contents(&*source), before, "the writers changed the source");
    info.cow_requests
}

fn size_for(case: &Case) -> u64 {
    // Unaligned sizes: the last cluster is partial.
    if case.cluster >= MIB {
        24 * MIB + 777
    } else {
        6 * MIB + 4097
    }
}

#[test]
fn stress_memory_drivers() {
    let mut hooks = 0;
    for (i, case) in matrix().iter().enumerate() {
        let size = size_for(case);
        let mut rng = Rng::new(i as u64);
        let source = Arc::new(MemDriver::from_bytes(&rng.bytes(size as usize)).unwrap());
        let target = Arc::new(MemDriver::new(size).unwrap());
        hooks += stress(source, target, case, i as u64);
    }
    assert!(hooks > 0, "the hook never had to copy: the test did not race the job");
}

#[test]
fn stress_file_drivers() {
    let dir = tempfile::tempdir().unwrap();
    let mut hooks = 0;
    for (i, case) in matrix().iter().enumerate() {
        let size = size_for(case);
        let mut rng = Rng::new(1000 + i as u64);
        let sp = dir.path().join(format!("src{i}.img"));
        std::fs::write(&sp, rng.bytes(size as usize)).unwrap();
        let source = Arc::new(FileDriver::open(&sp, OpenFlags::WRITE).unwrap());
        // Alternate a fresh sparse target and a pre-existing dirty one.
        let tp = dir.path().join(format!("dst{i}.img"));
        let target = if i % 2 == 0 {
            FileDriver::create(&tp, size).unwrap()
        } else {
            std::fs::write(&tp, vec![0xEE; size as usize]).unwrap();
            FileDriver::open(&tp, OpenFlags::WRITE).unwrap()
        };
        hooks += stress(source, Arc::new(target), case, 1000 + i as u64);
    }
    assert!(hooks > 0, "the hook never had to copy: the test did not race the job");
}
