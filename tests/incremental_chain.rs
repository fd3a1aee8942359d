//! Chains of backups under live writers (QEMU iotest 124, re-expressed): a full backup with
//! a dirty bitmap, then incrementals (`SyncMode::Bitmap`, `OnSuccess`), while writer threads
//! write through the host's path (`mark`, `cow_before_write`, write) all along. Each job's
//! copy set must be the clusters overlapping the granules dirty at its start, each target
//! must hold exactly the point-in-time contents of its copy set (and nothing else), and
//! applying the chain (the full backup, then each incremental's extents in order, holes as
//! zeroes) must give the source as it was at each job's start, byte for byte. Over a matrix
//! of bitmap granularity against cluster size: smaller, equal, larger.
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread;
use std::time::Duration;

use common::{assert_same, contents, data_bytes, wait_end, Rng, SetOnDrop};
use cowbackup::{backup_start, BackupOptions, BlockDriver, DirtyBitmap, Job, MemDriver, SyncMode};

const K: u64 = 1024;
const T: Duration = Duration::from_secs(30);

/// The host: its disk, the dirty bitmap, and the running job (if any) its writes go through.
struct Host {
    src: Arc<MemDriver>,
    bm: Arc<DirtyBitmap>,
    /// The job writes go through. Writes hold it shared; starting a job (the point in
    /// time), exclusive.
    job: RwLock<Option<Arc<Job>>>,
    writes: AtomicU64,
}

impl Host {
    /// The host's write path: mark, hook, write.
    fn write(&self, off: u64, data: &[u8]) {
        let job = self.job.read().unwrap_or_else(|e| e.into_inner());
        let len = data.len() as u64;
        self.bm.mark(off, len).unwrap();
        if let Some(j) = job.as_ref() {
            j.cow_before_write(off, len).unwrap();
        }
        self.src.write_at(data, off).unwrap();
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Start a job with the writers held out for an instant: returns it, the source's
    /// contents at its start (the reference, for verification only) and the copy set it must
    /// have (clusters overlapping the dirty granules, as byte extents).
    fn start(&self, target: Arc<MemDriver>, opts: BackupOptions) -> (Arc<Job>, Vec<u8>, Vec<(u64, u64)>) {
        let mut slot = self.job.write().unwrap_or_else(|e| e.into_inner());
        let pit = contents(&*self.src);
        let want = copy_set(&self.bm, opts.cluster_size);
        let job = Arc::new(backup_start(self.src.clone(), target, opts).unwrap());
        *slot = Some(job.clone());
        (job, pit, want)
    }
}

/// The clusters overlapping the bitmap's dirty granules, as merged byte extents.
fn copy_set(bm: &DirtyBitmap, cluster: u64) -> Vec<(u64, u64)> {
    let size = bm.size();
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut from = 0;
    while let Some((off, len)) = bm.next_dirty(from) {
        let s = off / cluster * cluster;
        let e = ((off + len).div_ceil(cluster) * cluster).min(size);
        match out.last_mut() {
            Some((o, l)) if *o + *l >= s => *l = e - *o,
            _ => out.push((s, e - s)),
        }
        from = off + len;
    }
    out
}

/// A writer: random unaligned writes of random data, three in four inside a hot quarter of
/// the device, and now and then whole clusters of zeroes (which an incremental leaves as
/// holes in its target), until `stop`.
fn writer(host: &Host, cluster: u64, seed: u64, stop: &AtomicBool) {
    let size = host.src.size();
    let mut rng = Rng::new(seed);
    while !stop.load(Ordering::Relaxed) {
        let span = if rng.below(4) == 0 { size } else { size / 4 };
        if rng.below(6) == 0 {
            let c = rng.below(span / cluster);
            host.write(c * cluster, &vec![0; cluster as usize]);
        } else {
            let len = 1 + rng.below(32 * K);
            let off = rng.below(span - len + 1);
            host.write(off, &rng.bytes(len as usize));
        }
        thread::sleep(Duration::from_micros(300));
    }
}

/// Full + `n` incrementals under 2 writers; every step verified, the chain restored.
fn chain(size: u64, granularity: u64, cluster: u64, n: usize) {
    let mut rng = Rng::new(size ^ granularity ^ cluster);
    let mut init = rng.bytes(size as usize);
    init[(size / 3) as usize..(size / 2) as usize].fill(0); // a zero region too
    let host = Host {
        src: Arc::new(MemDriver::from_bytes(&init).unwrap()),
        bm: DirtyBitmap::new(size, granularity).unwrap(),
        job: RwLock::new(None),
        writes: AtomicU64::new(0),
    };
    let stop = AtomicBool::new(false);
    let opts = |sync| BackupOptions {
        sync,
        cluster_size: cluster,
        bitmap: Some(host.bm.clone()),
        max_chunk: 256 * K,
        speed: size * 4, // each job lasts up to 250 ms: writes go through the hook
        ..Default::default()
    };
    let (mut hook_copies, mut holes) = (0, 0);
    thread::scope(|s| {
        let _stop = SetOnDrop(&stop);
        for w in 0..2 {
            let (host, stop) = (&host, &stop);
            s.spawn(move || writer(host, cluster, 100 + w, stop));
        }
        // The full backup starts the chain.
        let full = Arc::new(MemDriver::new(size).unwrap());
        let t0 = std::time::Instant::now();
        let (job, pit, _) = host.start(full.clone(), opts(SyncMode::Full));
        eprintln!("start {:?}", t0.elapsed());
        wait_end(&job, T).unwrap();
        eprintln!("full {:?} {:?}", t0.elapsed(), job.info());
        assert_eq!(job.extents(), vec![(0, size)]);
        assert_same("full backup", &contents(&*full), &pit);
        hook_copies += job.info().cow_requests;
        let mut image = contents(&*full);
        for i in 1..=n {
            thread::sleep(Duration::from_millis(15));
            let inc = Arc::new(MemDriver::new(size).unwrap());
            let (job, pit, want) = host.start(inc.clone(), opts(SyncMode::Bitmap));
            assert_eq!(job.extents(), want, "incremental {i}: the copy set is the dirty granules' clusters");
            assert!(!want.is_empty(), "incremental {i}: the writers dirtied nothing");
            let t0 = std::time::Instant::now();
            wait_end(&job, T).unwrap();
            eprintln!("inc {:?} {:?}", t0.elapsed(), job.info());
            hook_copies += job.info().cow_requests;
            // The target holds its copy set at the point in time, and nothing else.
            let t = contents(&*inc);
            let mut expect = vec![0u8; size as usize];
            for &(o, l) in &want {
                let r = o as usize..(o + l) as usize;
                expect[r.clone()].copy_from_slice(&pit[r]);
            }
            assert_same(&format!("incremental {i}"), &t, &expect);
            let in_set: u64 = want.iter().map(|e| e.1).sum();
            if data_bytes(&*inc) < in_set {
                holes += 1; // zero clusters of the copy set left as holes
            }
            // Restore step: apply exactly the copy set, holes as zeroes.
            for &(o, l) in &want {
                let r = o as usize..(o + l) as usize;
                image[r.clone()].copy_from_slice(&t[r]);
            }
            assert_same(&format!("full + incrementals 1..={i}"), &image, &pit);
        }
        *host.job.write().unwrap() = None;
    });
    let writes = host.writes.load(Ordering::Relaxed);
    assert!(writes > 100, "the writers hardly wrote: {writes}");
    assert!(hook_copies > 0, "no write went through an uncopied cluster: the hook path was not tested");
    assert!(holes > 0, "no incremental had a zero cluster left as a hole: the restore rule was not tested");
}

#[test]
fn chain_granularity_smaller_than_the_cluster() {
    chain(16 << 20, 16 * K, 64 * K, 4);
}

#[test]
fn chain_granularity_equal_to_the_cluster() {
    chain(16 << 20, 64 * K, 64 * K, 4);
}

#[test]
fn chain_granularity_larger_than_the_cluster() {
    chain(16 << 20, 256 * K, 64 * K, 4);
}

#[test]
fn chain_large_granules_small_clusters_and_a_partial_last_cluster() {
    chain((12 << 20) + 5000, 1 << 20, 4 * K, 4);
}

#[test]
fn chain_sector_granules() {
    chain(8 << 20, 512, 64 * K, 3);
}
