//! Fleecing: back up a live image through a snapshot view, at the reader's pace, with a
//! scratch file that stays small.
//!
//! ```text
//! cargo run --release --example fleece [-- --size 256M --dir DIR --writers 2 --rate 100M]
//! ```
//!
//! An image file is written by guest threads the whole time (hook, then write). Two backups
//! of it are taken, each from a `sync = None` job whose target is a sparse scratch file: the
//! hook copies the old data of the clusters the guests overwrite into the scratch file, and
//! nothing else is copied.
//!
//! 1. **Pull**: the application reads the job's snapshot view in 4 MiB pieces (at `--rate`
//!    bytes/s, its own pace), writes each piece to the backup file, then discards it on the
//!    view: the piece leaves the copy set and its scratch space is released.
//! 2. **Push**: a second job whose source is the view, with `discard_source: true`, copies it
//!    into a throttled target (`--rate` bytes/s: a slow remote disk); each chunk is discarded
//!    once it is in the target.
//!
//! Each backup is compared with a copy of the image taken at the instant its job started
//! (byte for byte, and with `qemu-img compare` when installed), and the scratch file's peak
//! and final allocation (`st_blocks`) are printed: without discard it would grow towards the
//! size of the image.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use cowbackup::{
    allocated_bytes, backup_start, buffer_is_zero, BackupOptions, BlockDriver, BlockStatus, FileDriver, Job, OpenFlags,
    SyncMode,
};

const MIB: u64 = 1 << 20;
const PIECE: u64 = 4 * MIB;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    size: u64,
    dir: Option<PathBuf>,
    writers: usize,
    rate: u64,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)).filter(|&n| n > 0).ok_or(format!("bad size {s:?}"))
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args { size: 256 * MIB, dir: None, writers: 2, rate: 100 * MIB };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--size" => a.size = parse_size(&val()?)?,
            "--dir" => a.dir = Some(PathBuf::from(val()?)),
            "--writers" => a.writers = val()?.parse().map_err(|_| "bad --writers")?,
            "--rate" => a.rate = parse_size(&val()?)?,
            _ => return Err(format!("usage: fleece [--size 256M] [--dir DIR] [--writers 2] [--rate 100M] ({arg}?)")),
        }
    }
    if a.size < 16 * MIB || a.size % MIB != 0 {
        return Err("--size must be a multiple of 1M, at least 16M".into());
    }
    Ok(a)
}

/// xorshift64*: fast deterministic data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// The host: the live image and its write path. Writes hold the read side of `job` across
/// hook and write, so taking the write side gives an instant with no write in flight: the
/// point in time of a new job.
struct Host {
    path: PathBuf,
    image: FileDriver,
    job: RwLock<Option<Arc<Job>>>,
}

impl Host {
    fn write(&self, buf: &[u8], off: u64) -> Res<()> {
        let job = self.job.read().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = &*job {
            job.cow_before_write(off, buf.len() as u64)?;
        }
        self.image.write_at(buf, off)?;
        Ok(())
    }

    /// At a quiet instant: copy the image to `reference` (the point in time) and start a
    /// `sync = None` job into `scratch`, which the write path calls from then on.
    fn start_fleecing(&self, reference: &Path, scratch: Arc<FileDriver>) -> Res<Arc<Job>> {
        let mut current = self.job.write().unwrap_or_else(|e| e.into_inner());
        std::fs::copy(&self.path, reference)?;
        let source = Arc::new(FileDriver::open(&self.path, OpenFlags::empty())?);
        let job =
            Arc::new(backup_start(source, scratch, BackupOptions { sync: SyncMode::None, ..Default::default() })?);
        *current = Some(job.clone());
        Ok(job)
    }

    fn stop_fleecing(&self) {
        *self.job.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Guest threads: 64 KiB random writes at 4 KiB-aligned offsets, 1 ms apart, until `stop`.
fn guests(host: &Host, n: usize, stop: &AtomicBool, writes: &AtomicU64) -> Res<()> {
    thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|w| {
                s.spawn(move || -> Result<(), String> {
                    let mut rng = Rng(0x9E37_79B9 + w as u64);
                    let mut buf = vec![0u8; 64 << 10];
                    let size = host.image.size();
                    while !stop.load(Ordering::Relaxed) {
                        rng.fill(&mut buf[..64]);
                        let off = rng.next() % ((size - buf.len() as u64) / 4096) * 4096;
                        host.write(&buf, off).map_err(|e| e.to_string())?;
                        writes.fetch_add(1, Ordering::Relaxed);
                        thread::sleep(Duration::from_millis(1));
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter().try_for_each(|h| h.join().expect("guest thread panicked"))
    })?;
    Ok(())
}

/// A slow target: each write sleeps for its share of `rate` bytes/s.
struct Throttled {
    inner: FileDriver,
    rate: u64,
}

impl BlockDriver for Throttled {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        thread::sleep(Duration::from_secs_f64(buf.len() as f64 / self.rate as f64));
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

/// Pull: read the view piece by piece at `rate`, write each to `backup`, discard it.
/// Returns the scratch file's peak allocation.
fn pull(job: &Job, backup: &FileDriver, scratch: &Path, rate: u64) -> Res<u64> {
    let view = job.snapshot()?;
    let mut buf = vec![0u8; PIECE as usize];
    let mut peak = 0;
    let t = Instant::now();
    let mut off = 0;
    while off < view.len() {
        let len = PIECE.min(view.len() - off);
        let piece = &mut buf[..len as usize];
        view.read_at(piece, off)?;
        if !buffer_is_zero(piece) {
            backup.write_at(piece, off)?;
        }
        peak = peak.max(allocated_bytes(scratch)?);
        view.discard(off, len)?;
        off += len;
        // The reader's own pace.
        let due = Duration::from_secs_f64(off as f64 / rate as f64);
        thread::sleep(due.saturating_sub(t.elapsed()));
    }
    backup.flush()?;
    Ok(peak)
}

/// Push: a second job from the view into a throttled target, each chunk discarded on the view
/// once copied. Returns the scratch file's peak allocation (sampled every 5 ms).
fn push(job: &Job, target: Arc<Throttled>, scratch: &Path) -> Res<u64> {
    let view = job.snapshot()?;
    let push = backup_start(view, target, BackupOptions { discard_source: true, ..Default::default() })?;
    let mut peak = 0;
    let result = loop {
        peak = peak.max(allocated_bytes(scratch)?);
        if let Some(r) = push.wait_timeout(Duration::from_millis(5)) {
            break r;
        }
    };
    result?;
    Ok(peak)
}

/// First differing byte offset of two files of the same size, if any.
fn first_difference(a: &Path, b: &Path) -> Res<Option<u64>> {
    let (a, b) = (FileDriver::open(a, OpenFlags::empty())?, FileDriver::open(b, OpenFlags::empty())?);
    if a.size() != b.size() {
        return Ok(Some(a.size().min(b.size())));
    }
    let (mut x, mut y) = (vec![0u8; PIECE as usize], vec![0u8; PIECE as usize]);
    let mut off = 0;
    while off < a.size() {
        let n = PIECE.min(a.size() - off) as usize;
        a.read_at(&mut x[..n], off)?;
        b.read_at(&mut y[..n], off)?;
        if let Some(i) = x[..n].iter().zip(&y[..n]).position(|(p, q)| p != q) {
            return Ok(Some(off + i as u64));
        }
        off += n as u64;
    }
    Ok(None)
}

/// Byte-for-byte check, then `qemu-img compare` when installed.
fn verify(what: &str, reference: &Path, backup: &Path) -> Res<()> {
    if let Some(at) = first_difference(reference, backup)? {
        return Err(format!("{what}: the backup differs from the point-in-time copy at byte {at}").into());
    }
    let qemu = match Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(reference)
        .arg(backup)
        .status()
    {
        Ok(s) if s.success() => "qemu-img compare: identical",
        Ok(_) => return Err(format!("{what}: qemu-img compare says the images differ").into()),
        Err(_) => "qemu-img not installed",
    };
    println!("  verified: byte for byte equal to the point-in-time copy; {qemu}");
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

fn run(a: &Args) -> Res<()> {
    let tmp = match &a.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let dir = tmp.path();
    let path = dir.join("image.raw");
    println!(
        "image {} in {}: {} guest writer(s); reader / slow target at {}/s",
        mib(a.size),
        dir.display(),
        a.writers,
        mib(a.rate)
    );
    {
        let img = FileDriver::create(&path, a.size)?;
        let mut rng = Rng(42);
        let mut buf = vec![0u8; PIECE as usize];
        for off in (0..a.size).step_by(PIECE as usize) {
            rng.fill(&mut buf);
            img.write_at(&buf[..PIECE.min(a.size - off) as usize], off)?;
        }
        img.flush()?;
    }
    let host = Host { path: path.clone(), image: FileDriver::open(&path, OpenFlags::WRITE)?, job: RwLock::new(None) };
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    thread::scope(|s| -> Res<()> {
        let g = s.spawn(|| guests(&host, a.writers, &stop, &writes).map_err(|e| e.to_string()));
        let r = (|| -> Res<()> {
            // 1. Pull: the application reads the view at its pace and discards what it has.
            let (scratch, reference, backup) =
                (dir.join("scratch-1.raw"), dir.join("pit-1.raw"), dir.join("backup-1.raw"));
            let job = host.start_fleecing(&reference, Arc::new(FileDriver::create(&scratch, a.size)?))?;
            let w0 = writes.load(Ordering::Relaxed);
            let t = Instant::now();
            let peak = pull(&job, &FileDriver::create(&backup, a.size)?, &scratch, a.rate)?;
            job.complete()?;
            job.wait()?;
            host.stop_fleecing();
            let i = job.info();
            println!(
                "1. pull: view read in {} pieces, each discarded once read: {:.2} s",
                mib(PIECE),
                t.elapsed().as_secs_f64()
            );
            println!(
                "  {} guest writes meanwhile; the hook copied {} of old data into the scratch file",
                writes.load(Ordering::Relaxed) - w0,
                mib(i.cow_bytes)
            );
            println!(
                "  scratch file allocation (st_blocks): peak {}, final {}",
                mib(peak),
                mib(allocated_bytes(&scratch)?)
            );
            verify("pull", &reference, &backup)?;

            // 2. Push: a second job copies the view into a slow target, discarding as it goes.
            let (scratch, reference, backup) =
                (dir.join("scratch-2.raw"), dir.join("pit-2.raw"), dir.join("backup-2.raw"));
            let job = host.start_fleecing(&reference, Arc::new(FileDriver::create(&scratch, a.size)?))?;
            let w0 = writes.load(Ordering::Relaxed);
            let t = Instant::now();
            let target = Arc::new(Throttled { inner: FileDriver::create(&backup, a.size)?, rate: a.rate });
            let peak = push(&job, target, &scratch)?;
            job.complete()?;
            job.wait()?;
            host.stop_fleecing();
            let i = job.info();
            println!(
                "2. push: a second job from the view with discard_source, into a throttled target: {:.2} s",
                t.elapsed().as_secs_f64()
            );
            println!(
                "  {} guest writes meanwhile; the hook copied {} of old data into the scratch file",
                writes.load(Ordering::Relaxed) - w0,
                mib(i.cow_bytes)
            );
            println!(
                "  scratch file allocation (st_blocks): peak {}, final {}",
                mib(peak),
                mib(allocated_bytes(&scratch)?)
            );
            verify("push", &reference, &backup)?;
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        let g = g.join().expect("guests panicked");
        r?;
        g?;
        Ok(())
    })
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fleece: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleece: {e}");
            ExitCode::FAILURE
        }
    }
}
