//! The guest scenario side by side with QEMU's backup job (issue 14): a guest writes
//! over NBD into a live source image while a full backup of it runs, done once by QEMU
//! (`blockdev-backup` in a `qemu-storage-daemon` that exports the source over NBD) and
//! once by cowbackup (`nbd::Server` exporting the source through a driver that calls the
//! running job's hook before each write). Same images, same client ([`NbdDriver`], one
//! connection per writer thread), same writes: QD1 64 KiB at random 4 KiB-aligned
//! offsets every 2 ms, 3 s without a backup (same server) and then during a whole
//! backup. Every loaded backup is compared with a copy of the source taken just before
//! it started: the writes went through the backup's copy-before-write (QEMU's filter
//! node, cowbackup's hook) or the target would hold their data.
//!
//! Configurations: QEMU's defaults (64 block-copy workers), QEMU with `x-perf:
//! {max-workers: 1}`, cowbackup's defaults, cowbackup with `cow_buffer` 16 MiB. Writer
//! counts from `BENCH_GUEST_THREADS` (default "1,4"); `BENCH_QSD` names the
//! `qemu-storage-daemon` binary (default: found in `PATH`). To explore:
//! `BENCH_QEMU_GUEST_ONLY` (`qemu`, `cowbackup`, or `cow_buffer`: that configuration
//! alone), `BENCH_GUEST_WORKERS` and `BENCH_GUEST_CLUSTER` (cowbackup's `workers` and
//! `cluster_size`), `BENCH_FLOOR_ALIGN` (see [`ReadFirst`]).
//!
//! `qemu-guest-disk` adds two references measured in the same run with the same
//! writers: the disk's floor (each write after a cold read of its old data, no backup)
//! and the **loaded floor** (the same while a plain copier, no copy-before-write, copies
//! the source at half of cowbackup `cow_buffer`'s unloaded speed): what a backup at the
//! speed the goal asks costs the guest whatever engine runs it. Each cowbackup line also
//! says how many hook calls waited for a CPU ([`CpuWaits`]): the rest of the hook's time
//! is its read of old data (and, without `cow_buffer`, its write to the target).
//!
//! The QEMU daemon runs with the source (`file` + `raw`, node `src`), a target created
//! beforehand at full size (`file` + `raw`, node `tgt`), an NBD server on a Unix socket
//! with a writable export of `src`, and a QMP monitor on a Unix socket, spoken to by the
//! minimal QMP client below. QEMU's backup time runs from `blockdev-backup` to
//! `BLOCK_JOB_COMPLETED` plus an `fdatasync` of the target (cowbackup's job flushes its
//! target before it completes; QEMU's flushes it only when the node is closed).

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use cowbackup::{backup_start, BackupOptions, BlockDriver, BlockStatus, FileDriver, Job, JobState, NbdDriver};
use cowbackup::{NbdOptions, OpenFlags};

use crate::qsd::*;
use crate::util::*;
use crate::Args;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// How long the guest writes without a backup.
const IDLE: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------
// What is compared
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Engine {
    /// QEMU's `blockdev-backup`; `Some(n)`: `x-perf: {max-workers: n}`.
    Qemu(Option<u32>),
    /// cowbackup's default options with this `cow_buffer`.
    Cow(u64),
}

impl Engine {
    fn label(self, qemu: &str) -> String {
        match self {
            Engine::Qemu(None) => format!("{qemu} blockdev-backup, defaults (64 block-copy workers)"),
            Engine::Qemu(Some(w)) => format!("{qemu} blockdev-backup, x-perf max-workers {w}"),
            Engine::Cow(0) => format!("cowbackup, defaults ({} workers)", BackupOptions::default().workers),
            Engine::Cow(b) => format!("cowbackup, cow_buffer {}", fmt_bytes(b)),
        }
    }
    fn short(self) -> String {
        match self {
            Engine::Qemu(None) => "QEMU defaults".into(),
            Engine::Qemu(Some(w)) => format!("QEMU max-workers {w}"),
            Engine::Cow(0) => "cowbackup defaults".into(),
            Engine::Cow(b) => format!("cowbackup cow_buffer {}", fmt_bytes(b)),
        }
    }
}

/// Writer thread counts: `BENCH_GUEST_THREADS` (e.g. "1,2,4"), default 1 and 4.
fn thread_counts() -> Vec<usize> {
    std::env::var("BENCH_GUEST_THREADS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).filter(|&n| n > 0).collect::<Vec<_>>())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| vec![1, 4])
}

// ---------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------

/// A new sparse file of `size` bytes at `path` (inside a [`TempDir`]; a previous target
/// of this step is replaced).
fn new_target(path: &Path, size: u64) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let f = File::options().write(true).create_new(true).open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(size).map_err(err)
}

fn verify(reference: &Path, target: &Path, who: &str) -> Result<(), String> {
    match first_difference(reference, target).map_err(err)? {
        None => Ok(()),
        Some(at) => Err(format!("VERIFY FAILED: {who}'s backup differs from the point in time at byte {at}")),
    }
}

// ---------------------------------------------------------------------------------------
// cowbackup's side: the source exported through the hook
// ---------------------------------------------------------------------------------------

/// The source as cowbackup's NBD server exports it: every write (and zeroing, discard)
/// first calls the hook of the running job, if any, as a host's block layer would.
struct Hooked {
    file: Arc<FileDriver>,
    /// The running job. Lock: held only to clone or replace the `Arc`.
    job: Mutex<Option<Arc<Job>>>,
    /// How long each hook call took inside the server, ns (the guest's write time less
    /// this is NBD and the file write).
    hook_ns: Mutex<Vec<u64>>,
    /// Of the calls, how many waited at least [`CPU_WAIT`] for a CPU (runnable, not
    /// running: the second field of `/proc/thread-self/schedstat`), and how many of those
    /// were among the calls over 1 ms. The disk's latency swings with other tenants of
    /// the host; this part of the hook's time is the backup's CPU use, whatever the disk.
    cpu_waits: Mutex<CpuWaits>,
}

/// A hook call that waited this long for a CPU is counted in [`CpuWaits`].
const CPU_WAIT: Duration = Duration::from_micros(100);

/// See [`Hooked::cpu_waits`].
#[derive(Default, Clone, Copy)]
struct CpuWaits {
    calls: usize,
    waited: usize,
    slow: usize,
    slow_waited: usize,
}

impl CpuWaits {
    fn add(&mut self, o: CpuWaits) {
        self.calls += o.calls;
        self.waited += o.waited;
        self.slow += o.slow;
        self.slow_waited += o.slow_waited;
    }

    fn fmt(&self) -> String {
        format!(
            "{} of {} hook calls ({:.1} %), {} of the {} over 1 ms",
            self.waited,
            self.calls,
            100.0 * self.waited as f64 / self.calls.max(1) as f64,
            self.slow_waited,
            self.slow
        )
    }
}

thread_local! {
    /// This thread's `/proc/thread-self/schedstat`, opened once per thread.
    static SCHEDSTAT: Option<File> = File::open("/proc/thread-self/schedstat").ok();
}

/// Nanoseconds the calling thread has waited for a CPU so far (0 without schedstat).
fn cpu_waited_ns() -> u64 {
    use std::os::unix::fs::FileExt;
    SCHEDSTAT.with(|f| {
        let Some(f) = f else { return 0 };
        let mut b = [0u8; 96];
        let n = f.read_at(&mut b, 0).unwrap_or(0);
        std::str::from_utf8(&b[..n]).ok().and_then(|s| s.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
    })
}

impl Hooked {
    fn set_job(&self, job: Option<Arc<Job>>) {
        *self.job.lock().unwrap_or_else(|e| e.into_inner()) = job;
    }
    fn hook(&self, offset: u64, len: u64) -> io::Result<()> {
        let job = self.job.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match job {
            Some(j) => {
                let w0 = cpu_waited_ns();
                let t = Instant::now();
                let r = j.cow_before_write(offset, len).map_err(io::Error::from);
                let took = t.elapsed();
                let waited = Duration::from_nanos(cpu_waited_ns().saturating_sub(w0)) >= CPU_WAIT;
                self.hook_ns.lock().unwrap_or_else(|e| e.into_inner()).push(took.as_nanos() as u64);
                let mut c = self.cpu_waits.lock().unwrap_or_else(|e| e.into_inner());
                let slow = took > Duration::from_millis(1);
                c.calls += 1;
                c.waited += usize::from(waited);
                c.slow += usize::from(slow);
                c.slow_waited += usize::from(slow && waited);
                r
            }
            None => Ok(()),
        }
    }
}

impl BlockDriver for Hooked {
    fn size(&self) -> u64 {
        self.file.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.hook(offset, buf.len() as u64)?;
        self.file.write_at(buf, offset)
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        self.hook(offset, len)?;
        self.file.write_zeroes_at(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.hook(offset, len)?;
        self.file.discard(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.file.block_status(offset, len)
    }
}

// ---------------------------------------------------------------------------------------
// The guest
// ---------------------------------------------------------------------------------------

/// `n` NBD clients of `uri`, one connection each.
fn connect(uri: &str, n: usize) -> Result<Vec<NbdDriver>, String> {
    let opts = NbdOptions { connections: 1, ..Default::default() };
    (0..n).map(|_| NbdDriver::connect_with(uri, &opts).map_err(err)).collect()
}

/// A QD1 writer until `done`: 64 KiB at random 4 KiB-aligned offsets every 2 ms; the
/// time of each write in ns.
fn writer(dev: &NbdDriver, done: &AtomicBool, seed: u64) -> Result<Vec<u64>, String> {
    let mut rng = Rng(seed | 1);
    let mut buf = vec![0u8; CLUSTER as usize];
    rng.fill(&mut buf);
    let size = dev.size();
    let mut out = Vec::new();
    while !done.load(Ordering::Acquire) {
        let off = rng.next() % ((size - CLUSTER) / 4096) * 4096;
        buf[..8].copy_from_slice(&rng.next().to_le_bytes());
        let t = Instant::now();
        dev.write_at(&buf, off).map_err(|e| format!("guest write at {off}: {e}"))?;
        out.push(t.elapsed().as_nanos() as u64);
        thread::sleep(Duration::from_millis(2));
    }
    Ok(out)
}

/// One writer per client in `devs` until `body` returns; all their write times.
fn writers<T>(devs: &[NbdDriver], seed: u64, body: impl FnOnce() -> T) -> Result<(Vec<u64>, T), String> {
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        let hs: Vec<_> = devs
            .iter()
            .enumerate()
            .map(|(k, d)| {
                let done = &done;
                s.spawn(move || writer(d, done, seed * 31 + k as u64))
            })
            .collect();
        let r = body();
        done.store(true, Ordering::Release);
        let mut all = Vec::new();
        for h in hs {
            all.extend(h.join().map_err(|_| "writer panicked".to_string())??);
        }
        Ok((all, r))
    })
}

/// One measurement: write times without and during a backup, and the backup's seconds.
struct Sample {
    idle: Vec<u64>,
    busy: Vec<u64>,
    secs: f64,
    /// cowbackup's hook calls and their waits for a CPU (none for QEMU).
    cpu: CpuWaits,
}

/// Where one place's files are.
struct Place<'a> {
    src: &'a Path,
    dst: &'a Path,
    /// The point-in-time copy (always on tmpfs).
    refp: &'a Path,
    /// Sockets and the daemon's log.
    sockdir: &'a Path,
    size: u64,
    disk: bool,
}

impl Place<'_> {
    /// Drop the page cache before a backup on disk; false when not permitted.
    fn cold(&self) -> bool {
        !self.disk || drop_caches()
    }
    /// A generous bound for one backup.
    fn backup_timeout(&self) -> Duration {
        Duration::from_secs(300 + self.size / (10 * MIB))
    }
}

/// QEMU backing up with no writers: seconds.
fn qemu_alone(p: &Place, max_workers: Option<u32>) -> Result<f64, String> {
    new_target(p.dst, p.size)?;
    let mut d = Daemon::start(p.src, p.dst, p.sockdir)?;
    p.cold();
    let t = Instant::now();
    d.start_backup(max_workers)?;
    d.wait_backup(p.dst, p.backup_timeout())?;
    let secs = t.elapsed().as_secs_f64();
    d.stop()?;
    Ok(secs)
}

/// QEMU: `n` writers for 3 s, then during a backup; the target verified.
fn qemu_loaded(p: &Place, max_workers: Option<u32>, n: usize, seed: u64) -> Result<Sample, String> {
    new_target(p.dst, p.size)?;
    let mut d = Daemon::start(p.src, p.dst, p.sockdir)?;
    let devs = connect(&d.uri(), n)?;
    let (idle, ()) = writers(&devs, seed, || thread::sleep(IDLE))?;
    std::fs::copy(p.src, p.refp).map_err(err)?;
    p.cold();
    let t = Instant::now();
    d.start_backup(max_workers)?;
    let timeout = p.backup_timeout();
    let (busy, r) = writers(&devs, seed + 1, || d.wait_backup(p.dst, timeout).map(|()| t.elapsed().as_secs_f64()))?;
    let secs = r?;
    drop(devs);
    d.stop()?;
    verify(p.refp, p.dst, "QEMU")?;
    Ok(Sample { idle, busy, secs, cpu: CpuWaits::default() })
}

/// cowbackup's options: the defaults with `cow_buffer`, and `BENCH_GUEST_WORKERS` from
/// the environment (to explore, as in the guest step).
fn cow_opts(cow_buffer: u64) -> BackupOptions {
    let mut o = BackupOptions { cow_buffer, ..Default::default() };
    if let Some(c) = std::env::var("BENCH_GUEST_CLUSTER").ok().and_then(|v| v.parse().ok()) {
        o.cluster_size = c;
    }
    if let Some(w) = std::env::var("BENCH_GUEST_WORKERS").ok().and_then(|v| v.parse().ok()) {
        o.workers = w;
    }
    o
}

/// cowbackup backing up with no writers (in this process): seconds.
fn cow_alone(p: &Place, cow_buffer: u64) -> Result<f64, String> {
    let source = Arc::new(FileDriver::open(p.src, OpenFlags::empty()).map_err(err)?);
    let _ = std::fs::remove_file(p.dst);
    let target = Arc::new(FileDriver::create(p.dst, p.size).map_err(err)?);
    p.cold();
    let t = Instant::now();
    let job = backup_start(source, target, cow_opts(cow_buffer)).map_err(err)?;
    job.wait().map_err(err)?;
    Ok(t.elapsed().as_secs_f64())
}

/// cowbackup: the source exported by `nbd::Server` through [`Hooked`]; `n` writers for
/// 3 s, then during a backup; the target verified.
fn cow_loaded(p: &Place, cow_buffer: u64, n: usize, seed: u64) -> Result<Sample, String> {
    let source = Arc::new(FileDriver::open(p.src, OpenFlags::WRITE).map_err(err)?);
    let hooked = Arc::new(Hooked {
        file: source.clone(),
        job: Mutex::new(None),
        hook_ns: Mutex::new(Vec::new()),
        cpu_waits: Mutex::default(),
    });
    let sock = p.sockdir.join("cow-nbd.sock");
    let server = cowbackup::nbd::Server::start(&format!("unix:{}", sock.display())).map_err(err)?;
    server.add("src", hooked.clone(), true).map_err(err)?;
    let devs = connect(&format!("nbd+unix:///src?socket={}", sock.display()), n)?;
    let (idle, ()) = writers(&devs, seed, || thread::sleep(IDLE))?;
    std::fs::copy(p.src, p.refp).map_err(err)?;
    let _ = std::fs::remove_file(p.dst);
    let target = Arc::new(FileDriver::create(p.dst, p.size).map_err(err)?);
    p.cold();
    let t = Instant::now();
    let job = Arc::new(backup_start(source, target, cow_opts(cow_buffer)).map_err(err)?);
    hooked.set_job(Some(job.clone()));
    let w = writers(&devs, seed + 1, || job.wait().map(|()| t.elapsed().as_secs_f64()));
    hooked.set_job(None);
    drop(devs);
    server.stop();
    let (busy, r) = w?;
    let secs = r.map_err(err)?;
    if job.info().state != JobState::Completed {
        return Err(format!("cowbackup's job ended {:?}", job.info().state));
    }
    drop(job);
    let mut h = std::mem::take(&mut *hooked.hook_ns.lock().unwrap_or_else(|e| e.into_inner()));
    h.sort_unstable();
    let cpu = *hooked.cpu_waits.lock().unwrap_or_else(|e| e.into_inner());
    eprint!(
        "[cow_buffer {cow_buffer}: hook in the server: p99 {}, max {}; waited for a CPU: {}]",
        fmt_ns(quantile(&h, 0.99) as f64),
        fmt_ns(*h.last().unwrap_or(&0) as f64),
        cpu.fmt()
    );
    verify(p.refp, p.dst, "cowbackup")?;
    Ok(Sample { idle, busy, secs, cpu })
}

/// The floor's server side: the source, each write (and zeroing) preceded by a `pread`
/// of the old data at its offset and of its length (64 KiB for the guest's writes), as a
/// copy-before-write hook must do before the host's write can go on, but with no backup.
/// The old data is read as the hook reads it: through a descriptor without read-ahead
/// (`POSIX_FADV_RANDOM`). With read-ahead, a read just past pages a copy has cached
/// grows into a large context read-ahead: the same writes while a plain copier reads the
/// source had a p99 of 4.5-5.8 ms, against 0.9-1.0 ms without (PERFORMANCE.md).
struct ReadFirst {
    file: Arc<FileDriver>,
    reader: File,
}

impl ReadFirst {
    fn new(path: &Path) -> Result<ReadFirst, String> {
        let file = Arc::new(FileDriver::open(path, OpenFlags::WRITE).map_err(err)?);
        Ok(ReadFirst { file, reader: open_without_readahead(path)? })
    }

    fn read_old(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let a = floor_align();
        let (offset, end) = (offset / a * a, (offset + len).div_ceil(a) * a);
        let mut old = vec![0u8; (end - offset).min(4 * MIB) as usize];
        self.reader.read_exact_at(&mut old, offset)
    }
}

impl BlockDriver for ReadFirst {
    fn size(&self) -> u64 {
        self.file.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.read_old(offset, buf.len() as u64)?;
        self.file.write_at(buf, offset)
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        self.read_old(offset, len)?;
        self.file.write_zeroes_at(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.file.discard(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.file.block_status(offset, len)
    }
}

/// What the floor reads before each write: the write's own range (the goal's floor), or
/// with `BENCH_FLOOR_ALIGN=65536` the 64 KiB clusters it touches, which is what the hook
/// reads with the default cluster size (two clusters for a 64 KiB write at a 4 KiB-aligned
/// offset). To explore; the default is the goal's.
fn floor_align() -> u64 {
    std::env::var("BENCH_FLOOR_ALIGN").ok().and_then(|v| v.parse().ok()).filter(|&a: &u64| a > 0).unwrap_or(1)
}

/// `path` opened for reading through a descriptor without read-ahead (`POSIX_FADV_RANDOM`).
fn open_without_readahead(path: &Path) -> Result<File, String> {
    use std::os::unix::io::AsRawFd;
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: posix_fadvise on a descriptor we own; it reads no memory of ours.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    Ok(f)
}

/// The source exported by `nbd::Server` through [`ReadFirst`], `n` writers connected to
/// it, the page cache dropped: `body` runs with the writers' connections, then the server
/// stops.
fn with_floor_server<T>(
    p: &Place,
    n: usize,
    body: impl FnOnce(&[NbdDriver]) -> Result<T, String>,
) -> Result<T, String> {
    let rf = ReadFirst::new(p.src)?;
    let sock = p.sockdir.join("floor-nbd.sock");
    let server = cowbackup::nbd::Server::start(&format!("unix:{}", sock.display())).map_err(err)?;
    let r = (|| {
        server.add("src", Arc::new(rf), true).map_err(err)?;
        let devs = connect(&format!("nbd+unix:///src?socket={}", sock.display()), n)?;
        p.cold();
        body(&devs)
    })();
    server.stop();
    r
}

/// The disk's floor for `n` writers ([`with_floor_server`]; the same client and cadence
/// as the engines': QD1 64 KiB at random 4 KiB-aligned offsets every 2 ms) for 3 s with
/// no backup running. Their write times, ns: a cold QD1 64 KiB read plus the write on the
/// idle disk, what a copy-before-write hook cannot avoid.
fn floor_sample(p: &Place, n: usize, seed: u64) -> Result<Vec<u64>, String> {
    with_floor_server(p, n, |devs| Ok(writers(devs, seed, || thread::sleep(IDLE))?.0))
}

/// Request size of [`loaded_floor_sample`]'s plain copier.
const PLAIN_PIECE: usize = 128 << 10;

/// The floor with the disk busy: the same server, writers and cadence as
/// [`floor_sample`] ([`with_floor_server`]), while a plain copier (no copy-before-write, no engine) copies the
/// source into the target file at `rate` bytes/s (half of cowbackup's unloaded speed in
/// this run: the speed the goal asks of a backup). The copier is the gentlest found on
/// these VMs (PERFORMANCE.md, "The loaded floor: what the disk gives under a copy"): QD1 128 KiB
/// requests, `pread` through the page cache without read-ahead (reading a file the guest
/// writes with `O_DIRECT` stalls the guest's buffered writes on ext4), `O_DIRECT`
/// `pwrite` into the target. What a backup at that speed costs the guest whatever
/// engine runs it: if this is above 3× the idle floor, so is every backup's.
/// Returns the writers' times (ns) and the copier's speed (bytes/s).
fn loaded_floor_sample(p: &Place, n: usize, seed: u64, rate: f64) -> Result<(Vec<u64>, f64), String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let reader = open_without_readahead(p.src)?;
    let _ = std::fs::remove_file(p.dst);
    // O_DIRECT where the filesystem takes it (a filesystem refusing it gets page cache writes).
    let create = |flags| std::fs::OpenOptions::new().write(true).create_new(true).custom_flags(flags).open(p.dst);
    let target = match create(libc::O_DIRECT) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // The open may have created the file before refusing the flag.
            let _ = std::fs::remove_file(p.dst);
            create(0)
        }
        r => r,
    }
    .map_err(|e| format!("{}: {e}", p.dst.display()))?;
    target.set_len(p.size).map_err(err)?;
    let stop = AtomicBool::new(false);
    let r = with_floor_server(p, n, |devs| {
        thread::scope(|s| {
            let copier = s.spawn(|| -> io::Result<f64> {
                let mut buf = cowbackup::AlignedBuf::with_len(PLAIN_PIECE);
                let t = Instant::now();
                let (mut off, mut copied) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    if off + PLAIN_PIECE as u64 > p.size {
                        off = 0;
                    }
                    let b = buf.slice_mut(PLAIN_PIECE);
                    reader.read_exact_at(b, off)?;
                    target.write_all_at(b, off)?;
                    off += PLAIN_PIECE as u64;
                    copied += PLAIN_PIECE as u64;
                    let due = Duration::from_secs_f64(copied as f64 / rate);
                    if let Some(wait) = due.checked_sub(t.elapsed()) {
                        thread::sleep(wait);
                    }
                }
                Ok(copied as f64 / t.elapsed().as_secs_f64())
            });
            let w = writers(devs, seed, || thread::sleep(IDLE));
            stop.store(true, Ordering::Relaxed);
            let speed = copier.join().map_err(|_| "plain copier panicked".to_string())?.map_err(err)?;
            let (ns, ()) = w?;
            Ok((ns, speed))
        })
    });
    let _ = std::fs::remove_file(p.dst);
    r
}

/// The floor lines of `qemu-guest-disk` for writer count index `k` (`n` writers): the
/// floor, each cowbackup configuration's p99 against it and its speed, then the
/// `ratio vs QEMU:` lines (QEMU defaults' p99 / cowbackup's) and the
/// `ratio vs QEMU x-perf max-workers=1:` lines; and a row per cowbackup configuration.
#[allow(clippy::too_many_arguments)]
fn floor_report(
    floor: &Lat,
    loaded: &(Lat, Vec<f64>),
    n: usize,
    where_: &str,
    size: u64,
    res: &[PerEngine],
    k: usize,
    qemu: &str,
    rows: &mut Vec<Row>,
) {
    let f = floor.p99();
    // What the floor reads before each write (see `floor_align`).
    let read = match floor_align() {
        1 => "64 KiB".to_string(),
        a => format!("{}-aligned", fmt_bytes(a)),
    };
    println!(
        "qemu-guest-disk, {where_}, {n} writer(s): floor (cold QD1 {read} pread of the old data + the write, idle \
         disk, no backup, same client and cadence) p99 {}: {}",
        fmt_ns(f),
        floor.fmt()
    );
    let (busy, speeds) = loaded;
    if !speeds.is_empty() {
        let rate = fmt_rate(size, summary(&speeds.iter().map(|b| size as f64 / b).collect::<Vec<_>>()));
        println!(
            "  loaded floor (the same, while a plain copier copies the source at half of cowbackup cow_buffer's \
             unloaded speed: QD1 {} KiB pread without read-ahead + O_DIRECT pwrite; {rate}) p99 {} = {:.2}× floor: {}",
            PLAIN_PIECE >> 10,
            fmt_ns(busy.p99()),
            busy.p99() / f,
            busy.fmt()
        );
        rows.push(Row {
            scenario: format!(
                "qemu-guest-disk: {n} writer(s), the floor while a plain copier (no copy-before-write) copies the \
                 source at half of cowbackup cow_buffer's unloaded speed ({where_}, {})",
                fmt_bytes(size)
            ),
            cowbackup: format!("p99 {}; copier {rate}", fmt_ns(busy.p99())),
            baseline: format!("floor (idle disk): {}", floor.fmt()),
            ratio: format!("{:.2}× floor", busy.p99() / f),
            target: "(reference: what a backup at that speed costs the guest, whatever the engine)".into(),
        });
    }
    let p99 = |e: Engine| res.iter().find(|r| r.engine == e && r.skipped.is_none()).map(|r| r.per_n[k].busy.p99());
    let cows: Vec<&PerEngine> = res.iter().filter(|r| matches!(r.engine, Engine::Cow(_))).collect();
    for c in &cows {
        let pn = &c.per_n[k];
        let (ta, tl) = (summary(&c.t_alone), summary(&pn.t_loaded));
        let (x, speed) = (pn.busy.p99() / f, ta.median / tl.median);
        let checks =
            format!("{}; {}", check(x <= 3.0, "p99 ≤ 3× floor"), check(speed >= 0.5, "backup ≥ 50 % of unloaded"));
        // Against the disk busy with a plain copy at half speed (when measured).
        let vs_loaded = match speeds.is_empty() {
            true => String::new(),
            false => format!(", {:.2}× the loaded floor", pn.busy.p99() / busy.p99()),
        };
        println!(
            "  {}: p99 {} = {x:.2}× floor{vs_loaded}, backup at {:.0} % of its unloaded speed: {checks}",
            c.engine.short(),
            fmt_ns(pn.busy.p99()),
            speed * 100.0
        );
        println!("    the hook waited ≥ {} µs for a CPU in {}", CPU_WAIT.as_micros(), pn.cpu.fmt());
        let vs = |e: Engine| p99(e).map(|q| format!("{:.2}×", q / pn.busy.p99())).unwrap_or_else(|| "n/a".into());
        rows.push(Row {
            scenario: format!(
                "qemu-guest-disk: {n} writer(s) over NBD, QD1 64 KiB every 2 ms, during a {} full backup ({where_}; \
                 {}): p99 against the disk's floor measured in the same run",
                fmt_bytes(size),
                c.engine.label(qemu)
            ),
            cowbackup: format!(
                "p99 {}; backup {}; the hook waited ≥ {} µs for a CPU in {}",
                fmt_ns(pn.busy.p99()),
                fmt_rate(size, tl),
                CPU_WAIT.as_micros(),
                pn.cpu.fmt()
            ),
            baseline: format!(
                "floor (cold {read} pread + the write, idle disk): {}; backup alone {}",
                floor.fmt(),
                fmt_rate(size, ta)
            ),
            ratio: format!(
                "{x:.2}× floor{vs_loaded}; {:.0} % speed; QEMU defaults p99 / ours {}, QEMU max-workers 1 p99 / ours {}",
                speed * 100.0,
                vs(Engine::Qemu(None)),
                vs(Engine::Qemu(Some(1)))
            ),
            target: checks,
        });
    }
    for (label, e) in [("QEMU", Engine::Qemu(None)), ("QEMU x-perf max-workers=1", Engine::Qemu(Some(1)))] {
        let Some(q) = p99(e) else { continue };
        for c in &cows {
            let ours = c.per_n[k].busy.p99();
            println!(
                "{n} writer(s): {} p99 {} / {} p99 {} (≥ 1: cowbackup's p99 is lower):",
                e.short(),
                fmt_ns(q),
                c.engine.short(),
                fmt_ns(ours)
            );
            println!("ratio vs {label}: {:.2}", q / ours);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------

/// Results of one engine and one writer count.
#[derive(Default)]
struct PerN {
    idle: Lat,
    busy: Lat,
    t_loaded: Vec<f64>,
    cpu: CpuWaits,
}

/// Results of one engine.
struct PerEngine {
    engine: Engine,
    t_alone: Vec<f64>,
    per_n: Vec<PerN>,
    /// Why the engine was left out (QEMU refused its options).
    skipped: Option<String>,
}

/// Guest write latency over NBD without and during a full backup by QEMU (64 workers,
/// 1 worker) and by cowbackup (defaults, `cow_buffer` 16 MiB), and each backup's time
/// with and without the guest; tmpfs and (unless `--no-disk`) disk.
pub fn qemu_guest(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    let version = match qsd_version() {
        Ok(v) => v,
        Err(e) => {
            rows.push(Row {
                scenario: "qemu-guest: guest writes over NBD during QEMU's backup job vs cowbackup's".into(),
                cowbackup: format!("skipped: qemu-storage-daemon is needed ({e})"),
                baseline: String::new(),
                ratio: String::new(),
                target: String::new(),
            });
            eprintln!("qemu-guest: skipped: {e}");
            return Ok(());
        }
    };
    let shm = TempDir::new(&a.shm_dir, "qguest-shm")?;
    let (s, t) = (Path::new("SRC"), Path::new("TGT"));
    let (n, q) = (shm.0.join("qsd-nbd.sock"), shm.0.join("qsd-qmp.sock"));
    eprintln!("qemu-guest: {} {}", qsd_program(), qsd_args(s, t, &n, &q).join(" "));
    let mut places = vec![(shm.0.clone(), false)];
    let disk_dir = if a.disk { Some(TempDir::new(&a.disk_dir, "qguest-disk")?) } else { None };
    if let Some(d) = &disk_dir {
        places.push((d.0.clone(), true));
    }
    for (dir, disk) in places {
        place(a, &dir, &shm.0, disk, &version, rows, false)?;
    }
    Ok(())
}

/// `--only qemu-guest-disk`: [`qemu_guest`] on the disk directory only, plus the disk's
/// floor measured in the same run (see [`floor_sample`]): per writer count, cowbackup's
/// p99 during the backup against that floor (goal ≤ 3×), its backup speed with the guest
/// (goal ≥ 50 % of alone), and `ratio vs QEMU: X.XX` lines (QEMU's p99 / cowbackup's).
pub fn qemu_guest_disk(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    let version = match qsd_version() {
        Ok(v) if a.disk => v,
        r => {
            let why = match r {
                Err(e) => format!("qemu-storage-daemon is needed ({e})"),
                Ok(_) => "--no-disk".into(),
            };
            rows.push(Row {
                scenario: "qemu-guest-disk: guest writes over NBD during QEMU's backup job vs cowbackup's, on disk"
                    .into(),
                cowbackup: format!("skipped: {why}"),
                baseline: String::new(),
                ratio: String::new(),
                target: String::new(),
            });
            eprintln!("qemu-guest-disk: skipped: {why}");
            return Ok(());
        }
    };
    let shm = TempDir::new(&a.shm_dir, "qguest-shm")?;
    let (s, t) = (Path::new("SRC"), Path::new("TGT"));
    let (n, q) = (shm.0.join("qsd-nbd.sock"), shm.0.join("qsd-qmp.sock"));
    eprintln!("qemu-guest-disk: {} {}", qsd_program(), qsd_args(s, t, &n, &q).join(" "));
    let d = TempDir::new(&a.disk_dir, "qguest-disk")?;
    place(a, &d.0, &shm.0, true, &version, rows, true)
}

fn place(
    a: &Args,
    dir: &Path,
    shm: &Path,
    disk: bool,
    version: &str,
    rows: &mut Vec<Row>,
    with_floor: bool,
) -> Result<(), String> {
    let (src, dst, refp) = (dir.join("src.img"), dir.join("dst.img"), shm.join("ref.img"));
    let p = Place { src: &src, dst: &dst, refp: &refp, sockdir: shm, size: a.size, disk };
    let mut where_ = fs_name(dir);
    let qemu = qemu_name(version);
    let counts = thread_counts();
    let mut engines = vec![Engine::Qemu(None), Engine::Qemu(Some(1)), Engine::Cow(0), Engine::Cow(16 << 20)];
    // `BENCH_QEMU_GUEST_ONLY=cowbackup`, `=qemu` or `=cow_buffer`: one side only (to explore).
    match std::env::var("BENCH_QEMU_GUEST_ONLY").as_deref() {
        Ok("cowbackup") => engines.retain(|e| matches!(e, Engine::Cow(_))),
        Ok("qemu") => engines.retain(|e| matches!(e, Engine::Qemu(_))),
        Ok("cow_buffer") => engines.retain(|e| matches!(e, Engine::Cow(b) if *b > 0)),
        _ => {}
    }
    let mut res: Vec<PerEngine> = engines
        .iter()
        .map(|&engine| PerEngine {
            engine,
            t_alone: vec![],
            per_n: counts.iter().map(|_| PerN::default()).collect(),
            skipped: None,
        })
        .collect();
    let mut floor: Vec<Lat> = counts.iter().map(|_| Lat::new()).collect();
    // The floor under a plain copier at half of cowbackup's unloaded speed, and its speeds.
    let mut loaded: Vec<(Lat, Vec<f64>)> = counts.iter().map(|_| (Lat::new(), Vec::new())).collect();
    eprint!("qemu-guest: {where_}, {} random source, {counts:?} writers, {version} ", fmt_bytes(a.size));
    if disk && !drop_caches() {
        where_ = format!("{where_}, WARM cache");
    }
    let mut run_all = || -> Result<(), String> {
        make_image(&src, a.size, Data::Random).map_err(err)?;
        for run in 0..a.runs {
            if with_floor {
                for j in 0..counts.len() {
                    let k = (j + run) % counts.len();
                    floor[k].add(floor_sample(&p, counts[k], (run * 100 + counts[k]) as u64 + 7)?);
                    eprint!("f");
                }
            }
            // Rotate the order of the engines and of the writer counts from run to run.
            for i in 0..res.len() {
                let e = &mut res[(i + run) % engines.len()];
                if e.skipped.is_some() {
                    continue;
                }
                let alone = match e.engine {
                    Engine::Qemu(w) => qemu_alone(&p, w),
                    Engine::Cow(b) => cow_alone(&p, b),
                };
                match alone {
                    Ok(s) => e.t_alone.push(s),
                    Err(m) if matches!(e.engine, Engine::Qemu(Some(_))) && m.contains("x-perf") => {
                        e.skipped = Some(m);
                        continue;
                    }
                    Err(m) => return Err(m),
                }
                for j in 0..counts.len() {
                    let k = (j + run) % counts.len();
                    let n = counts[k];
                    let seed = (run * 100 + n) as u64;
                    let s = match e.engine {
                        Engine::Qemu(w) => qemu_loaded(&p, w, n, seed)?,
                        Engine::Cow(b) => cow_loaded(&p, b, n, seed)?,
                    };
                    let pn = &mut e.per_n[k];
                    pn.idle.add(s.idle);
                    pn.busy.add(s.busy);
                    pn.t_loaded.push(s.secs);
                    pn.cpu.add(s.cpu);
                    eprint!(".");
                }
            }
            // The floor with the disk busy, at half of what the cowbackup configuration of
            // the goal (`cow_buffer`) copies alone in this invocation.
            let cow_alone = res.iter().find(|e| e.engine == Engine::Cow(16 << 20)).map(|e| &e.t_alone);
            if let (true, Some(t)) = (with_floor, cow_alone.filter(|t| !t.is_empty())) {
                let rate = 0.5 * a.size as f64 / summary(t).median;
                for (k, &n) in counts.iter().enumerate() {
                    let (ns, speed) = loaded_floor_sample(&p, n, (run * 100 + n) as u64 + 11, rate)?;
                    loaded[k].0.add(ns);
                    loaded[k].1.push(speed);
                    eprint!("l");
                }
            }
        }
        Ok(())
    };
    let r = run_all();
    eprintln!();
    for f in [&src, &dst, &refp] {
        let _ = std::fs::remove_file(f);
    }
    r?;
    let size = a.size;
    let step = if with_floor { "qemu-guest-disk" } else { "qemu-guest" };
    println!();
    println!(
        "{step}, {where_}, {}: guest p99 during / without a backup, backup speed loaded (unloaded)",
        fmt_bytes(size)
    );
    for (k, &n) in counts.iter().enumerate() {
        let mut side = Vec::new();
        for e in &res {
            let label = e.engine.label(&qemu);
            if let Some(m) = &e.skipped {
                rows.push(Row {
                    scenario: format!("qemu-guest: {label}"),
                    cowbackup: format!("skipped: {m}"),
                    baseline: String::new(),
                    ratio: String::new(),
                    target: String::new(),
                });
                continue;
            }
            let p = &e.per_n[k];
            let (ta, tl) = (summary(&e.t_alone), summary(&p.t_loaded));
            let ratio = p.busy.p99() / p.idle.p99();
            let speed = ta.median / tl.median;
            let is_cow = matches!(e.engine, Engine::Cow(_));
            let checks = format!("{}; {}", check(ratio <= 3.0, "p99 ≤ 3×"), check(speed >= 0.5, "backup ≥ 50 % speed"));
            rows.push(Row {
                scenario: format!(
                    "qemu-guest: {n} writer(s) over NBD, each QD1 64 KiB random writes every 2 ms, during a {} full \
                     backup ({where_}; {label}; {} writes, targets verified)",
                    fmt_bytes(size),
                    p.busy.writes
                ),
                cowbackup: format!("{}; backup {}", p.busy.fmt(), fmt_rate(size, tl)),
                baseline: format!(
                    "3 s without a backup, same server: {}; backup alone {}",
                    p.idle.fmt(),
                    fmt_rate(size, ta)
                ),
                ratio: format!("{ratio:.2}× p99; backup at {:.0} % of its unloaded speed", speed * 100.0),
                target: if is_cow { checks } else { format!("(reference) {checks}") },
            });
            println!(
                "  {n} writer(s), {:<28} p99 {:>9} / {:>9} = {ratio:5.2}×, backup {:.2} GiB/s ({:.2} GiB/s alone, {:.0} %)",
                e.engine.short(),
                fmt_ns(p.busy.p99()),
                fmt_ns(p.idle.p99()),
                size as f64 / GIB as f64 / tl.median,
                size as f64 / GIB as f64 / ta.median,
                speed * 100.0
            );
            side.push((e.engine, ratio, p.busy.p99(), size as f64 / GIB as f64 / tl.median, speed));
        }
        let fmt_side = |cow: bool| {
            side.iter()
                .filter(|s| matches!(s.0, Engine::Cow(_)) == cow)
                .map(|s| {
                    format!(
                        "{}: p99 {} ({:.2}×), backup {:.2} GiB/s ({:.0} %)",
                        s.0.short(),
                        fmt_ns(s.2),
                        s.1,
                        s.3,
                        s.4 * 100.0
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let qemu_p99 = side.iter().find(|s| s.0 == Engine::Qemu(None)).map(|s| s.2);
        let vs = side
            .iter()
            .filter(|s| matches!(s.0, Engine::Cow(_)))
            .filter_map(|s| qemu_p99.map(|q| format!("{}: {:.2}×", s.0.short(), q / s.2)))
            .collect::<Vec<_>>()
            .join(", ");
        rows.push(Row {
            scenario: format!(
                "qemu-guest summary: {n} writer(s), {where_}, {}: p99 during the backup (× without), backup speed \
                 with the guest (% of alone)",
                fmt_bytes(size)
            ),
            cowbackup: fmt_side(true),
            baseline: format!("{qemu}: {}", fmt_side(false)),
            ratio: if vs.is_empty() { String::new() } else { format!("QEMU defaults p99 / cowbackup p99: {vs}") },
            target: String::new(),
        });
        if with_floor {
            floor_report(&floor[k], &loaded[k], n, &where_, size, &res, k, &qemu, rows);
        }
    }
    Ok(())
}
