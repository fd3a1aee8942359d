//! When a job is dropped (C: `cowbackup_job_free`) its threads have ended — the threads
//! themselves, not only the code they ran: workers, the job thread and hook helpers
//! (`cbw_timeout`). A host may unload the library or tear down what its driver callbacks
//! use right after the free. Found by the `capi` fuzz target (LeakSanitizer saw a worker
//! thread's handle still alive after every job was freed): the workers were waited for
//! through their scope, which returns when each closure has returned, while the thread
//! still runs its thread-local destructors.
//!
//! The probe: a driver whose ops touch a thread-local whose destructor, on a job thread,
//! takes 30 ms and then records whether the job had been freed meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cowbackup::{backup_start, BackupOptions, BlockDriver, BlockStatus, MemDriver, SyncMode};

static FREED: AtomicBool = AtomicBool::new(false);
static LATE: AtomicBool = AtomicBool::new(false);

struct Probe;

impl Drop for Probe {
    fn drop(&mut self) {
        let name = std::thread::current().name().unwrap_or("").to_string();
        if name.starts_with("cowbackup-") {
            std::thread::sleep(Duration::from_millis(30));
            if FREED.load(Ordering::SeqCst) {
                LATE.store(true, Ordering::SeqCst);
                eprintln!("thread {name} still ran after the job was freed");
            }
        }
    }
}

thread_local! {
    static PROBE: Probe = const { Probe };
}

/// A memory device whose ops register the probe on the calling thread.
struct Probed(MemDriver);

impl BlockDriver for Probed {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        PROBE.with(|_| ());
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        PROBE.with(|_| ());
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        PROBE.with(|_| ());
        self.0.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<BlockStatus> {
        self.0.block_status(offset, len)
    }
}

#[test]
fn no_job_thread_runs_after_the_job_is_dropped() {
    // (workers, cbw_timeout, sync, wait for the end before the drop)
    let t = Some(Duration::from_secs(10));
    let configs = [(3, None, SyncMode::Full, true), (1, t, SyncMode::Full, true), (2, t, SyncMode::None, false)];
    for (workers, timeout, sync, wait) in configs {
        FREED.store(false, Ordering::SeqCst);
        let size = 4 << 20;
        let src = Arc::new(Probed(MemDriver::from_bytes(&vec![7u8; size]).unwrap()));
        let tgt = Arc::new(Probed(MemDriver::new(size as u64).unwrap()));
        let opts = BackupOptions { workers, cbw_timeout: timeout, sync, speed: 8 << 20, ..Default::default() };
        let job = backup_start(src.clone(), tgt, opts).unwrap();
        // Hook calls that copy (on helper threads when there is a cbw_timeout).
        for i in 0..8u64 {
            job.cow_before_write(size as u64 - (i + 1) * 65536, 1).unwrap();
        }
        if wait {
            job.wait_timeout(Duration::from_secs(30)).expect("the job ended").unwrap();
        }
        // Without the wait (sync None: no workers, only hook helpers): dropped right after
        // the hook calls, while the last helper may be exiting.
        drop(job);
        FREED.store(true, Ordering::SeqCst);
        // Longer than a probe's destructor: a thread still exiting would record itself now.
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !LATE.load(Ordering::SeqCst),
            "a job thread ran after drop (workers {workers}, cbw_timeout {timeout:?}, wait {wait})"
        );
    }
}
