//! The order of a copy: a cluster leaves the copy bitmap only after its old data is in the
//! target. So a hook on a cluster whose background copy has read the source but not yet
//! written the target waits for that write, and when it returns the target holds the old
//! data (a host crash right after the guest write then leaves a target that has it).
//!
//! The background copy's target write is held at a gate; a hook on that cluster must still
//! be waiting 300 ms later, and must return as soon as the gate opens. (A mutation that
//! clears the bits after the read but before the write, or a hook that does not wait for
//! clusters claimed by others, returns at once.)

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{contents, join_within, until, Rng};
use cowbackup::{backup_start, BackupOptions, BlockDriver, BlockStatus, MemDriver};

const K64: u64 = 64 * 1024;

/// A memory device whose writes from the job's threads wait at a gate until it opens.
struct WriteGate {
    inner: MemDriver,
    closed: Mutex<bool>,
    cv: Condvar,
    parked: AtomicU64,
}

impl WriteGate {
    fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.cv.notify_all();
    }
}

/// Opens the gate when dropped, so a failing assertion does not leave a worker parked.
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
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if std::thread::current().name().is_some_and(|n| n.starts_with("cowbackup-")) {
            let mut closed = self.closed.lock().unwrap();
            self.parked.fetch_add(1, Ordering::SeqCst);
            while *closed {
                closed = self.cv.wait(closed).unwrap();
            }
        }
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
}

#[test]
fn a_hook_on_a_cluster_being_written_returns_only_once_the_target_has_it() {
    let size = 16 * K64;
    let src = Arc::new(MemDriver::from_bytes(&Rng::new(5).bytes(size as usize)).unwrap());
    let pit = contents(&*src);
    let target = Arc::new(WriteGate {
        inner: MemDriver::new(size).unwrap(),
        closed: Mutex::new(true),
        cv: Condvar::new(),
        parked: AtomicU64::new(0),
    });
    let opts = BackupOptions { cluster_size: K64, workers: 1, max_chunk: K64, ..Default::default() };
    let job = backup_start(src.clone(), target.clone(), opts).unwrap();
    let _open = OpenOnDrop(target.clone());
    // The worker has read its first cluster (cluster 0: it starts at the beginning, one
    // cluster per chunk) and waits to write it.
    until("the worker's first target write", || target.parked.load(Ordering::SeqCst) > 0);
    let returned = AtomicBool::new(false);
    std::thread::scope(|s| {
        let _open = OpenOnDrop(target.clone());
        let hook = s.spawn(|| {
            job.cow_before_write(100, 10).unwrap();
            returned.store(true, Ordering::SeqCst);
            // When the hook returns, the old data of its cluster is in the target.
            let mut got = vec![0u8; K64 as usize];
            target.inner.read_at(&mut got, 0).unwrap();
            assert!(
                got[..] == pit[..K64 as usize],
                "the hook returned before its cluster's old data was in the target"
            );
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !returned.load(Ordering::SeqCst),
            "the hook returned while the copy of its cluster had not written the target yet"
        );
        target.open();
        join_within("the hook", hook, Duration::from_secs(10));
    });
    job.wait_timeout(Duration::from_secs(30)).expect("the job ended").unwrap();
    assert!(target.inner.to_vec() == pit);
}
