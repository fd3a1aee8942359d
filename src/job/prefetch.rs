//! Where the copy set is **read ahead**: a worker that claims a run of clusters asks the
//! kernel (`posix_fadvise(WILLNEED)`) to start reading the next scattered runs of the
//! copy set, so a sparse copy set (an incremental: isolated clusters all over a cold
//! disk) has many reads in flight while each worker copies one run at a time.
//!
//! A contiguous copy set (a full backup) needs none of this: the kernel's own readahead
//! sees the workers' sequential reads. So a worker reads ahead only when the copy set
//! does not go on right after its claim, and only from a source file whose reads
//! can wait for a device (not tmpfs or ramfs: their pages are already in memory).
//! Advisory only: what the kernel does not read ahead is read by the copy as before.
//!
//! Never while the host writes clusters not yet copied ([`HostPace::host_active`]). Each
//! hook copy leaves a gap in a full backup's copy set, so the workers
//! would read ahead all the way (up to [`AHEAD_BYTES`] at a time, in requests of
//! megabytes), and the next hook's cold read of old data waits behind that at the device.
//! While the host writes, the job's reads go in small pieces instead (copy.rs,
//! `HOST_READ_PIECE`). Measured in PERFORMANCE.md (issue 26, "The read-ahead past the
//! hooks' gaps").

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use super::claims::Claims;
use super::priority::HostPace;
use crate::FileDriver;

/// How many runs of the copy set past a worker's claim are being read ahead: the queue
/// depth a cold disk sees from a sparse copy set (QEMU's block-copy keeps up to 64
/// requests in flight; PERFORMANCE.md has the measurements).
pub(crate) const AHEAD_RUNS: u64 = 32;
/// At most this many bytes of the copy set read ahead past a claim (what 1 MiB runs
/// are cut at; the page cache holds them until the copy reads them).
pub(crate) const AHEAD_BYTES: u64 = 16 << 20;

/// Read-ahead state of one job: the cluster before which every run was advised.
pub(crate) struct Prefetch {
    upto: AtomicU64,
    enabled: bool,
}

impl Prefetch {
    /// Read ahead for `source` when it is a file that a device backs.
    pub fn new(source: Option<&FileDriver>) -> Prefetch {
        Prefetch { upto: AtomicU64::new(0), enabled: source.is_some_and(FileDriver::reads_from_a_device) }
    }

    /// A worker claimed `claim`: advise the runs of the copy set that follow it (up to
    /// [`AHEAD_RUNS`] runs or [`AHEAD_BYTES`] of clusters of `shift` bits) and were not
    /// advised yet, unless the copy set goes on right after the claim (sequential) or the
    /// host is writing clusters not yet copied (`pace`; those runs are advised by a later
    /// claim when it is quiet again).
    pub fn ahead(
        &self,
        claims: &Claims,
        source: Option<&FileDriver>,
        claim: Range<u64>,
        shift: u32,
        clusters: u64,
        pace: &HostPace,
    ) {
        let Some(src) = source.filter(|_| self.enabled && !pace.host_active()) else { return };
        if claim.end >= clusters || claims.run_from(claim.end, clusters).0 {
            return;
        }
        let max_clusters = (AHEAD_BYTES >> shift).max(1);
        let (mut c, mut runs, mut taken) = (claim.end, 0, 0);
        let from = self.upto.load(Ordering::Relaxed).max(claim.end);
        while runs < AHEAD_RUNS && taken < max_clusters && c < clusters {
            let (dirty, end) = claims.run_from(c, clusters);
            if dirty {
                let end = end.min(c + max_clusters - taken);
                if end > from {
                    let s = c.max(from);
                    src.advise_willneed(s << shift, (end - s) << shift);
                }
                runs += 1;
                taken += end - c;
            }
            c = end;
        }
        self.upto.fetch_max(c, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::Bitmap;
    use crate::OpenFlags;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    const CS: u64 = 64 << 10;

    /// Which of the file's clusters `0..n` have all their pages in the page cache.
    fn resident(f: &std::fs::File, n: u64) -> Vec<bool> {
        let len = (n * CS) as usize;
        // SAFETY: a private read-only mapping of `len` bytes of a file at least that long,
        // unmapped below; mincore writes one byte per page into `vec`.
        unsafe {
            let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
            assert_ne!(p, libc::MAP_FAILED);
            let mut vec = vec![0u8; len / 4096];
            assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
            libc::munmap(p, len);
            vec.chunks((CS / 4096) as usize).map(|c| c.iter().all(|b| b & 1 == 1)).collect()
        }
    }

    /// On a disk filesystem, a claim followed by a gap has the copy set's next runs (and
    /// only them) read into the page cache, up to AHEAD_RUNS runs; a claim the copy set
    /// goes on after (sequential) reads nothing ahead, nor does any while the host writes
    /// clusters not yet copied; a file on tmpfs never does.
    #[test]
    #[cfg_attr(miri, ignore = "real files: posix_fadvise, mmap and mincore are not supported by Miri")]
    fn the_next_scattered_runs_are_read_ahead_and_nothing_else() {
        // /var/tmp is on a disk (not tmpfs) on most machines: skipped where it is not.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let n = 4 * AHEAD_RUNS + 8;
        let path = dir.path().join("src");
        std::fs::write(&path, vec![0x5au8; (n * CS) as usize]).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        f.sync_all().unwrap();
        let src = FileDriver::open(&path, OpenFlags::empty()).unwrap();
        if !src.reads_from_a_device() {
            eprintln!("skipped: /var/tmp is on tmpfs");
            return;
        }
        // Copy set: 0..2 (sequential), then every 3rd cluster from 3 on.
        let bm = Bitmap::new(n, false);
        bm.set_range(0..2);
        let mut set = vec![];
        let mut c = 3;
        while c < n {
            bm.set_range(c..c + 1);
            set.push(c);
            c += 3;
        }
        let claims = Claims::new(bm);
        let shift = CS.trailing_zeros();
        let evict = || {
            // SAFETY: posix_fadvise on a descriptor we own.
            assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
        };
        let p = Prefetch::new(Some(&src));
        let quiet = HostPace::new(true);
        evict();
        // Claim 0..1: the copy set goes on at 1, nothing to read ahead.
        p.ahead(&claims, Some(&src), 0..1, shift, n, &quiet);
        std::thread::sleep(Duration::from_millis(200));
        assert!(resident(&f, n).iter().all(|r| !r), "nothing read ahead after a sequential claim");
        // Claim 0..2 while the host writes: nothing is read ahead, and nothing is taken as
        // advised.
        let writing = HostPace::new(true);
        writing.host_wrote();
        p.ahead(&claims, Some(&src), 0..2, shift, n, &writing);
        std::thread::sleep(Duration::from_millis(200));
        assert!(resident(&f, n).iter().all(|r| !r), "nothing read ahead while the host writes");
        // Claim 0..2, the host quiet: a gap follows; the next AHEAD_RUNS runs are read ahead.
        p.ahead(&claims, Some(&src), 0..2, shift, n, &quiet);
        let want: Vec<u64> = set.iter().copied().take(AHEAD_RUNS as usize).collect();
        let t = Instant::now();
        loop {
            let r = resident(&f, n);
            if want.iter().all(|&c| r[c as usize]) {
                let extra: Vec<usize> = (0..n as usize).filter(|&c| r[c] && !want.contains(&(c as u64))).collect();
                assert!(extra.is_empty(), "clusters outside the next runs were read: {extra:?}");
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "the next runs were not read ahead: {r:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The same claim again: those runs were advised already, nothing more is read.
        evict();
        p.ahead(&claims, Some(&src), 0..2, shift, n, &quiet);
        std::thread::sleep(Duration::from_millis(200));
        assert!(resident(&f, n).iter().all(|r| !r), "runs advised once are not advised again");
        // tmpfs: never.
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let sp = shm.path().join("src");
        std::fs::write(&sp, [0u8; 4096]).unwrap();
        assert!(!FileDriver::open(&sp, OpenFlags::empty()).unwrap().reads_from_a_device());
        assert!(!Prefetch::new(Some(&FileDriver::open(&sp, OpenFlags::empty()).unwrap())).enabled);
    }
}
