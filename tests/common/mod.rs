//! Helpers shared by the integration tests: a deterministic PRNG, device contents,
//! and driver wrappers that count or hold back I/O of a real driver.
#![allow(dead_code)]

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use cowbackup::{BlockDriver, BlockStatus};

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

pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = first_diff(got, want) {
        panic!("{what}: differs at byte {i} (got {:#x?}, want {:#x?})", got.get(i), want.get(i));
    }
}

/// Wraps a real driver; counts source reads per byte range and can hold back every
/// call made from the job's own threads (named `cowbackup-*`) until opened.
pub struct Gate<D> {
    pub inner: D,
    closed: Mutex<bool>,
    cv: Condvar,
    pub reads: Mutex<Vec<(u64, u64)>>,
    pub held: AtomicU64,
    pub hold_jobs: AtomicBool,
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
        })
    }
    pub fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.cv.notify_all();
    }
    fn pass(&self) {
        let on_job_thread = std::thread::current().name().is_some_and(|n| n.starts_with("cowbackup-"));
        if !on_job_thread {
            return;
        }
        let mut closed = self.closed.lock().unwrap();
        if *closed {
            self.held.fetch_add(1, Ordering::SeqCst);
        }
        while *closed {
            closed = self.cv.wait(closed).unwrap();
        }
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
        self.pass();
        self.reads.lock().unwrap().push((offset, buf.len() as u64));
        self.inner.read_at(buf, offset)
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

/// Wait until the job's worker is parked at the gate.
pub fn wait_parked<D: BlockDriver>(gate: &Gate<D>) {
    let t = std::time::Instant::now();
    while gate.held.load(Ordering::SeqCst) == 0 {
        assert!(t.elapsed() < std::time::Duration::from_secs(10), "the worker never reached the gate");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
