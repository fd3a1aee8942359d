//! Loom model of the claim protocol: the real [`Claims`] (claim, wait on overlap,
//! release clean or dirty, `wake_all`), the hook's loop [`Claims::copy_before_write`]
//! and the hook gate ([`HookGate`]), with loom's Mutex, Condvar and atomics (through
//! `crate::sync`). Only the drivers are replaced: the source is one atomic per cluster,
//! the target one `loom::cell::UnsafeCell` per cluster, so loom itself reports two
//! copies of a cluster racing, or a hook that returns without its clusters' target
//! writes happening before it.
//!
//! The worker below is the loop of worker.rs (`work`) with its policies reduced to
//! "fail the job" (Report) and "retry" (Stop, then resume); cancel is what
//! lifecycle.rs does: set the stop flag the hook and the workers look at, then
//! `wake_all`.
//!
//! Run with `scripts/loom.sh` (`RUSTFLAGS="--cfg loom"`, `LOOM_MAX_PREEMPTIONS`).
//! Time stands still under loom (see `crate::sync`): a wait only a time-out would end
//! is reported as a deadlock.

use std::cell::Cell;
use std::ops::Range;
use std::time::Duration;

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize};
use loom::sync::{Arc, Mutex};
use loom::thread;

use super::{Claims, HookGate};
use crate::bitmap::Bitmap;
use crate::sync::Ordering::{AcqRel, Acquire, Relaxed, Release};

/// The source's contents at the point in time, and after the host wrote it.
const OLD: u32 = 1;
const NEW: u32 = 2;

/// A job's shared state in miniature.
struct Model {
    claims: Claims,
    gate: HookGate,
    /// The source, one word per cluster: `OLD` until the host writes it.
    source: Vec<AtomicU32>,
    /// The target, 0 until a copy writes it. Plain memory: loom reports unordered access.
    target: Vec<UnsafeCell<u32>>,
    /// Copies of each cluster in flight right now (at most 1).
    copying: Vec<AtomicUsize>,
    /// Successful copies of each cluster (at most 1).
    copies: Vec<AtomicUsize>,
    /// The next copy touching this cluster fails (once).
    fail_once: Vec<AtomicBool>,
    /// Cancelled, or failed (the job's `stop` / `hook_off`).
    stop: AtomicBool,
    /// Held by the test: a worker's copy of cluster `hang_cluster` blocks on it (a hung device).
    hang: Mutex<()>,
    hang_cluster: Option<u64>,
    max_run: u64,
}

impl Model {
    fn new(clusters: u64, max_run: u64) -> Model {
        let n = clusters as usize;
        Model {
            claims: Claims::new(Bitmap::new(clusters, true)),
            gate: HookGate::default(),
            source: (0..n).map(|_| AtomicU32::new(OLD)).collect(),
            target: (0..n).map(|_| UnsafeCell::new(0)).collect(),
            copying: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            copies: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            fail_once: (0..n).map(|_| AtomicBool::new(false)).collect(),
            stop: AtomicBool::new(false),
            hang: Mutex::new(()),
            hang_cluster: None,
            max_run,
        }
    }

    fn fail_once(self, c: u64) -> Model {
        self.fail_once[c as usize].store(true, Relaxed);
        self
    }

    fn clusters(&self) -> u64 {
        self.source.len() as u64
    }

    /// Copy the clusters of a claim: read the source, write the target.
    fn copy(&self, r: Range<u64>, worker: bool) -> Result<(), ()> {
        for c in r.clone() {
            let before = self.copying[c as usize].fetch_add(1, AcqRel);
            assert_eq!(before, 0, "cluster {c} copied twice at once");
        }
        let result = self.copy_inner(r.clone(), worker);
        for c in r {
            self.copying[c as usize].fetch_sub(1, AcqRel);
        }
        result
    }

    fn copy_inner(&self, r: Range<u64>, worker: bool) -> Result<(), ()> {
        if worker && self.hang_cluster.is_some_and(|h| r.contains(&h)) {
            // A hung device: returns only when the test lets go, then fails.
            drop(self.hang.lock().unwrap());
            return Err(());
        }
        if r.clone().any(|c| self.fail_once[c as usize].swap(false, AcqRel)) {
            return Err(());
        }
        for c in r {
            let v = self.source[c as usize].load(Acquire);
            self.target[c as usize].with_mut(|p| {
                // SAFETY: loom checks that no other access to this cell is concurrent.
                unsafe { *p = v }
            });
        }
        Ok(())
    }

    fn count(&self, r: Range<u64>) {
        for c in r {
            let before = self.copies[c as usize].fetch_add(1, AcqRel);
            assert_eq!(before, 0, "cluster {c} copied twice (it was clean)");
        }
    }

    fn target(&self, c: u64) -> u32 {
        self.target[c as usize].with(|p| {
            // SAFETY: loom checks that this read is ordered after every write.
            unsafe { *p }
        })
    }

    /// The host's write path (cow.rs): the hook, then the write. `Err`: the hook failed
    /// (BreakGuestWrite), the write does not happen.
    fn host_write(&self, r: Range<u64>) -> Result<(), ()> {
        let stopped = Cell::new(false);
        if !self.claims.is_clean(r.clone()) {
            let stop = || {
                let s = self.stop.load(Acquire);
                stopped.set(s);
                s
            };
            self.claims.copy_before_write(
                r.clone(),
                self.max_run,
                &self.gate,
                stop,
                |run| self.copy(run, false).map(|()| ((), false)),
                |run, ()| self.count(run),
            )?;
        }
        if !stopped.get() {
            for c in r.clone() {
                assert_eq!(self.target(c), OLD, "the hook returned before cluster {c} was in the target");
            }
        }
        for c in r {
            self.source[c as usize].store(NEW, Release);
        }
        Ok(())
    }

    /// A background worker (worker.rs `work`). `retry`: a failed copy is retried
    /// (policy Stop, then resume); else it fails the job (Report).
    fn worker(&self, retry: bool) {
        let mut cursor = 0;
        loop {
            if self.stop.load(Acquire) {
                return;
            }
            self.gate.yield_to_hooks(Duration::from_millis(2));
            let Some(claim) = self.claims.claim_next(cursor, self.max_run) else {
                if self.claims.dirty() == 0 {
                    return;
                }
                self.claims.wait_release(Duration::from_millis(100));
                continue;
            };
            cursor = claim.range().end;
            match self.copy(claim.range(), true) {
                Ok(()) => {
                    let r = claim.range();
                    claim.done();
                    self.count(r);
                }
                Err(()) => {
                    drop(claim);
                    if !retry {
                        self.cancel();
                        return;
                    }
                }
            }
        }
    }

    /// A snapshot view's read (snapshot.rs `read_at`): hold the clusters, then read each
    /// run from the source while dirty, from the target once copied. `None`: stopped.
    fn view_read(&self, r: Range<u64>) -> Option<Vec<u32>> {
        let hold = self.claims.hold(r.clone(), || self.stop.load(Acquire))?;
        let mut out = Vec::new();
        let mut c = r.start;
        while c < r.end {
            let (dirty, e) = self.claims.run_from(c, r.end);
            // The read takes a while: let the others run (loom's bounded search does not
            // reach this interleaving on its own).
            thread::yield_now();
            for c in c..e {
                out.push(if dirty { self.source[c as usize].load(Acquire) } else { self.target(c) });
            }
            c = e;
        }
        drop(hold);
        Some(out)
    }

    /// Cancel, or a fatal error (lifecycle.rs): stop, then wake every waiter.
    fn cancel(&self) {
        self.stop.store(true, Release);
        self.claims.wake_all();
    }

    /// The end of the job: what the end-of-job rule relies on. After a stop (cancel,
    /// failure) the host writes without the hook, so a copy still in flight may take
    /// new data: such a job never reports success, and its target is not checked.
    fn check_end(&self) {
        assert!(self.claims.lock().is_empty(), "a claim was leaked");
        let stopped = self.stop.load(Relaxed);
        let mut dirty = 0;
        for c in 0..self.clusters() {
            let copies = self.copies[c as usize].load(Relaxed);
            if self.claims.is_clean(c..c + 1) {
                assert_eq!(copies, 1, "cluster {c} is clean but was copied {copies} times");
                if !stopped {
                    assert_eq!(self.target(c), OLD, "cluster {c} is clean but its target is not the old data");
                }
            } else {
                assert_eq!(copies, 0, "cluster {c} was copied but is still dirty");
                dirty += 1;
            }
        }
        assert_eq!(self.claims.dirty(), dirty, "the dirty count disagrees with the bitmap");
        if !stopped {
            assert_eq!(dirty, 0, "the job did not fail, yet clusters were left dirty");
        }
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    loom::model(f);
}

/// A hook overlapping a worker's chunk: each cluster copied exactly once, the hook
/// returns only when its clusters' old data is in the target.
#[test]
fn hook_and_worker_copy_each_cluster_once() {
    model(|| {
        let m = Arc::new(Model::new(3, 2));
        let w = {
            let m = m.clone();
            thread::spawn(move || m.worker(false))
        };
        m.host_write(1..3).unwrap();
        w.join().unwrap();
        m.check_end();
    });
}

/// Two hooks on overlapping ranges and a worker: one waits for the other's claims.
#[test]
fn overlapping_hooks_wait_for_each_other() {
    model(|| {
        let m = Arc::new(Model::new(3, 1));
        let w = {
            let m = m.clone();
            thread::spawn(move || m.worker(false))
        };
        let h = {
            let m = m.clone();
            thread::spawn(move || m.host_write(0..2).unwrap())
        };
        m.host_write(1..3).unwrap();
        h.join().unwrap();
        w.join().unwrap();
        m.check_end();
    });
}

/// A hook whose copy fails leaves its clusters dirty; the worker (policy Stop, then
/// resume) or a later hook copies them.
#[test]
fn failed_hook_copy_leaves_clusters_dirty() {
    model(|| {
        let m = Arc::new(Model::new(2, 2).fail_once(1));
        let w = {
            let m = m.clone();
            thread::spawn(move || m.worker(true))
        };
        if m.host_write(0..2).is_err() {
            // BreakGuestWrite: the guest write fails; its retry must succeed.
            m.host_write(0..2).unwrap();
        }
        w.join().unwrap();
        m.check_end();
    });
}

/// A worker whose copy fails fails the job (policy Report): a hook waiting for that
/// chunk wakes and copies the clusters itself or sees the job stopped. (Or the hook
/// meets the failure: its clusters stay dirty and the guest's retry copies them.)
#[test]
fn failed_worker_copy_fails_job_and_releases_hook() {
    model(|| {
        let m = Arc::new(Model::new(2, 2).fail_once(0));
        let w = {
            let m = m.clone();
            thread::spawn(move || m.worker(false))
        };
        if m.host_write(0..2).is_err() {
            // The hook met the failure instead (BreakGuestWrite): a retry succeeds.
            m.host_write(0..2).unwrap();
        }
        w.join().unwrap();
        m.check_end();
    });
}

/// A worker hangs on a device while it holds the claim a hook waits for: cancel must
/// still let the hook return (the claim is released only after the hook returned).
#[test]
fn cancel_releases_hook_waiting_on_hung_worker() {
    model(|| {
        let mut m = Model::new(2, 2);
        m.hang_cluster = Some(0);
        let m = Arc::new(m);
        let hung = m.hang.lock().unwrap();
        let w = {
            let m = m.clone();
            thread::spawn(move || m.worker(true))
        };
        let c = {
            let m = m.clone();
            thread::spawn(move || m.cancel())
        };
        m.host_write(0..1).unwrap();
        drop(hung);
        c.join().unwrap();
        w.join().unwrap();
        m.check_end();
    });
}

/// Cancel racing a hook and a worker: everyone returns, nothing is copied twice, and
/// what is clean holds the old data.
#[test]
fn cancel_races_hook_and_worker() {
    model(|| {
        let m = Arc::new(Model::new(3, 2));
        let w = {
            let m = m.clone();
            thread::spawn(move || m.worker(false))
        };
        let c = {
            let m = m.clone();
            thread::spawn(move || m.cancel())
        };
        m.host_write(0..3).unwrap();
        c.join().unwrap();
        w.join().unwrap();
        m.check_end();
    });
}

/// A snapshot view reads while a hook copies: the view always reads the
/// point-in-time image (the hook waits for the read hold before copying, so the host
/// cannot write a cluster the view is reading from the source).
#[test]
fn view_reads_the_point_in_time_image() {
    model(|| {
        let m = Arc::new(Model::new(2, 1));
        let v = {
            let m = m.clone();
            thread::spawn(move || m.view_read(0..2))
        };
        m.host_write(0..2).unwrap();
        assert_eq!(v.join().unwrap(), Some(vec![OLD, OLD]), "the view read data written after the point in time");
        m.check_end();
    });
}

/// A snapshot view reads while a worker copies and the host writes: the view never waits
/// for the worker's copy, yet always reads the point-in-time image (a copy that ends
/// under the view's hold is parked, so the host waits for the read).
#[test]
fn view_reads_the_point_in_time_image_while_a_worker_copies() {
    model(|| {
        let m = Arc::new(Model::new(2, 2));
        let w = {
            let m = m.clone();
            thread::spawn(move || m.worker(false))
        };
        let v = {
            let m = m.clone();
            thread::spawn(move || m.view_read(0..2))
        };
        m.host_write(1..2).unwrap();
        assert_eq!(v.join().unwrap(), Some(vec![OLD, OLD]), "the view read data written after the point in time");
        w.join().unwrap();
        m.check_end();
    });
}
