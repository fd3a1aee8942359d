//! Helpers shared by the integration tests: a deterministic PRNG, device contents,
//! driver wrappers that count, record or hold back I/O of a real driver, and waits that
//! fail the test instead of hanging it.
#![allow(dead_code)]

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cowbackup::{BlockDriver, BlockStatus, Job};

/// xorshift64*: deterministic, seedable, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }
}

/// Read a whole device.
pub fn contents(d: &dyn BlockDriver) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

/// Index of the first differing byte, for readable failures.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or(if a.len() != b.len() { Some(a.len().min(b.len())) } else { None })
}

#[track_caller]
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = first_diff(got, want) {
        panic!("{what}: differs at byte {i} (got {:#x?}, want {:#x?})", got.get(i), want.get(i));
    }
}

/// Wraps a real driver; counts source reads per byte range and can hold back reads
/// made from the job's own threads (named `cowbackup-*`) until opened: every such read,
/// or only those overlapping [`Gate::hold_only`]. Hook calls from test threads pass.
///
/// A test that closes a gate must also hold a [`Gate::open_on_drop`] guard, declared
/// after the job (and inside any `thread::scope` whose threads may wait on the gate), so
/// a failing assertion opens the gate instead of leaving a worker parked and the test hung.
pub struct Gate<D> {
    pub inner: D,
    closed: Mutex<bool>,
    cv: Condvar,
    pub reads: Mutex<Vec<(u64, u64)>>,
    pub held: AtomicU64,
    pub hold_jobs: AtomicBool,
    /// Reads of job threads waiting at the gate now: (offset, len).
    parked: Mutex<Vec<(u64, u64)>>,
    /// Reads of job threads in progress now (parked or reading): (offset, len).
    inflight: Mutex<Vec<(u64, u64)>>,
    /// Hold only reads overlapping this byte range; `None`: every read of a job thread.
    only: Mutex<Option<(u64, u64)>>,
    /// Microseconds every job-thread read takes at least (so others can catch it in flight).
    slow_us: AtomicU64,
}

/// Opens its gate when dropped (see [`Gate::open_on_drop`]).
pub struct GateGuard<D: BlockDriver>(Arc<Gate<D>>);

impl<D: BlockDriver> Drop for GateGuard<D> {
    fn drop(&mut self) {
        self.0.open();
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1.max(1) && b.0 < a.0 + a.1.max(1)
}

fn remove_one(v: &Mutex<Vec<(u64, u64)>>, r: (u64, u64)) {
    let mut v = v.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = v.iter().position(|&x| x == r) {
        v.swap_remove(i);
    }
}

impl<D: BlockDriver> Gate<D> {
    pub fn new(inner: D, closed: bool) -> Arc<Gate<D>> {
        Arc::new(Gate {
            inner,
            closed: Mutex::new(closed),
            cv: Condvar::new(),
            reads: Mutex::new(Vec::new()),
            held: AtomicU64::new(0),
            hold_jobs: AtomicBool::new(true),
            parked: Mutex::new(Vec::new()),
            inflight: Mutex::new(Vec::new()),
            only: Mutex::new(None),
            slow_us: AtomicU64::new(0),
        })
    }
    pub fn open(&self) {
        *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.cv.notify_all();
    }
    /// Hold job-thread reads again from now on.
    pub fn close(&self) {
        *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }
    /// A guard that opens the gate when dropped, also while a failing test unwinds.
    pub fn open_on_drop(self: &Arc<Self>) -> GateGuard<D> {
        GateGuard(Arc::clone(self))
    }
    /// Hold only job-thread reads overlapping `[offset, offset + len)`.
    pub fn hold_only(&self, offset: u64, len: u64) {
        *self.only.lock().unwrap() = Some((offset, len));
    }
    /// Make every job-thread read take at least `d`.
    pub fn slow_job_reads(&self, d: Duration) {
        self.slow_us.store(d.as_micros() as u64, Ordering::Relaxed);
    }
    /// Job-thread reads waiting at the gate now.
    pub fn parked(&self) -> Vec<(u64, u64)> {
        self.parked.lock().unwrap().clone()
    }
    /// Job-thread reads in progress now (waiting at the gate or reading).
    pub fn inflight(&self) -> Vec<(u64, u64)> {
        self.inflight.lock().unwrap().clone()
    }
    fn pass(&self, r: (u64, u64)) {
        let on_job_thread = std::thread::current().name().is_some_and(|n| n.starts_with("cowbackup-"));
        if !on_job_thread {
            return;
        }
        if self.only.lock().unwrap().is_some_and(|o| !overlaps(o, r)) {
            return;
        }
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        if !*closed {
            return;
        }
        self.parked.lock().unwrap().push(r);
        self.held.fetch_add(1, Ordering::SeqCst);
        while *closed {
            closed = self.cv.wait(closed).unwrap_or_else(|e| e.into_inner());
        }
        drop(closed);
        remove_one(&self.parked, r);
    }
    pub fn reads_overlapping(&self, off: u64, len: u64) -> usize {
        self.reads.lock().unwrap().iter().filter(|&&(o, l)| o < off + len && off < o + l).count()
    }
}

impl<D: BlockDriver> BlockDriver for Gate<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = (offset, buf.len() as u64);
        let on_job_thread = std::thread::current().name().is_some_and(|n| n.starts_with("cowbackup-"));
        if on_job_thread {
            self.inflight.lock().unwrap().push(r);
        }
        self.pass(r);
        self.reads.lock().unwrap().push(r);
        let slow = self.slow_us.load(Ordering::Relaxed);
        if on_job_thread && slow > 0 {
            std::thread::sleep(Duration::from_micros(slow));
        }
        let res = self.inner.read_at(buf, offset);
        if on_job_thread {
            remove_one(&self.inflight, r);
        }
        res
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
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
    fn reads_as_zero(&self) -> bool {
        self.inner.reads_as_zero()
    }
}

/// One operation a [`Recorder`] saw, in the order they completed (markers: when added).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rec {
    Write(u64, u64),
    WriteZeroes(u64, u64),
    Flush,
    /// A point in the test's own timeline (e.g. "callback", "wait returned").
    Mark(&'static str),
}

/// Wraps a driver and records every write, write_zeroes and flush (and test markers) in
/// one sequence. A write is recorded when it has completed, a flush when it starts, so
/// "every write before the flush" in the log means no write overlapped the flush.
pub struct Recorder<D> {
    pub inner: D,
    log: Mutex<Vec<Rec>>,
}

impl<D: BlockDriver> Recorder<D> {
    pub fn new(inner: D) -> Arc<Recorder<D>> {
        Arc::new(Recorder { inner, log: Mutex::new(Vec::new()) })
    }
    pub fn mark(&self, what: &'static str) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push(Rec::Mark(what));
    }
    pub fn log(&self) -> Vec<Rec> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn push(&self, r: Rec) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push(r);
    }
}

impl<D: BlockDriver> BlockDriver for Recorder<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = self.inner.write_at(buf, offset);
        self.push(Rec::Write(offset, buf.len() as u64));
        r
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        let r = self.inner.write_zeroes_at(offset, len);
        self.push(Rec::WriteZeroes(offset, len));
        r
    }
    fn flush(&self) -> io::Result<()> {
        self.push(Rec::Flush);
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.inner.block_status(offset, len)
    }
    fn reads_as_zero(&self) -> bool {
        self.inner.reads_as_zero()
    }
    fn storage_id(&self) -> Option<(u64, u64)> {
        self.inner.storage_id()
    }
}

/// Sets the flag when dropped: helper threads of a test stop also when it fails.
pub struct SetOnDrop<'a>(pub &'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Poll until `f` holds; fails the test with `what` after 10 s.
#[track_caller]
pub fn until(what: &str, f: impl FnMut() -> bool) {
    until_for(what, Duration::from_secs(10), f)
}

/// Poll until `f` holds; fails the test with `what` after `timeout`.
#[track_caller]
pub fn until_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The job's result; fails the test (with the job's state) when it has not ended within `timeout`.
#[track_caller]
pub fn wait_end(job: &Job, timeout: Duration) -> cowbackup::Result<()> {
    match job.wait_timeout(timeout) {
        Some(r) => r,
        None => panic!("the job did not end within {timeout:?}: {:?}", job.info()),
    }
}

/// Wait for a scoped thread, at most `timeout`; fails the test when it is still running.
#[track_caller]
pub fn join_within<T>(what: &str, h: std::thread::ScopedJoinHandle<'_, T>, timeout: Duration) -> T {
    until_for(what, timeout, || h.is_finished());
    match h.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// `qemu-img`, if installed.
pub fn qemu_img() -> Option<std::path::PathBuf> {
    let out = std::process::Command::new("qemu-img").arg("--version").output().ok()?;
    out.status.success().then(|| "qemu-img".into())
}

/// Bytes the driver reports as allocated data (walks `block_status`).
pub fn data_bytes(d: &dyn BlockDriver) -> u64 {
    let (mut off, mut total) = (0, 0);
    while off < d.size() {
        let st = d.block_status(off, d.size() - off).unwrap();
        if st.flags.contains(cowbackup::StatusFlags::DATA) {
            total += st.len;
        }
        off += st.len;
    }
    total
}

/// `allocated` is `want` plus at most a little filesystem metadata (extent blocks).
pub fn assert_allocated(what: &str, allocated: u64, want: u64) {
    assert!(
        allocated >= want && allocated <= want + 64 * 1024,
        "{what}: {allocated} bytes allocated, want {want} (+ at most 64 KiB of metadata)"
    );
}

/// Options whose single background worker copies 64 KiB at a time: with a closed
/// [`Gate`] on the source it parks holding cluster 0 only.
pub fn one_parked_worker() -> cowbackup::BackupOptions {
    cowbackup::BackupOptions { workers: 1, max_chunk: 64 * 1024, ..Default::default() }
}

/// Wait until a job's worker is parked at the gate (fails the test after 10 s).
#[track_caller]
pub fn wait_parked<D: BlockDriver>(gate: &Gate<D>) {
    wait_parked_n(gate, 1);
}

/// Wait until `n` job-thread reads are parked at the gate now (fails the test after 10 s).
#[track_caller]
pub fn wait_parked_n<D: BlockDriver>(gate: &Gate<D>, n: usize) {
    until(&format!("{n} worker(s) parked at the gate"), || gate.parked().len() >= n);
}
