//! Pull-mode backup over NBD: a live image's point-in-time views exported on a Unix
//! socket, read by the ecosystem's own tools.
//!
//! ```text
//! cargo run --release --example pull_backup [-- --size 256M --dir DIR --writers 2 --keep]
//! ```
//!
//! Guest threads write to an image file the whole time through the host's write path: mark
//! the dirty bitmap, the hook of the running job (if any), then the write. An NBD server
//! (`cowbackup::nbd::Server`) listens on a Unix socket in the work directory.
//!
//! 1. **Full**: at a quiet instant the bitmap is cleared (it now records the writes since
//!    this backup) and a `sync = None` job starts into a sparse scratch file; its snapshot
//!    view is exported read-only as `full`, and `qemu-img convert` copies
//!    `nbd+unix:///full?socket=…` into `full.img`; the reader also backs it up with a job
//!    whose source is the export (`NbdDriver`), writing `full-m.img` and its manifest
//!    `full.manifest`. Then `Job::complete()`.
//! 2. **Incremental**: at another quiet instant a copy of the bitmap is frozen for the
//!    reader and a `sync = None` job with the bitmap starts (pull mode: the view serves only
//!    the bitmap's clusters). The view is exported as `inc` with the frozen copy as the
//!    context `qemu:dirty-bitmap:backup-inc`. `nbdinfo --map=qemu:dirty-bitmap:backup-inc`
//!    lists the dirty extents; the example reads just those through the NBD client driver
//!    (`NbdDriver`): a `sync = Bitmap` job over a bitmap of those extents into the new sparse
//!    `inc.img`, with the manifest `inc.manifest` (its parent: `full.manifest`). Then
//!    `Job::complete()`: the bitmap keeps only the writes made during the incremental.
//! 3. **Restore**: `repo::Chain` over `full.manifest` + `inc.manifest` (verify on read) is the
//!    image at the incremental's start; a backup job copies it into `restored.img`.
//!
//! Each result is compared with a copy of the image taken at its job's start (kept for
//! verification only) with `qemu-img compare`. Needs `qemu-img` and `nbdinfo`
//! (`scripts/deps.sh` installs libnbd-bin).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use cowbackup::nbd::Server;
use cowbackup::repo::Chain;
use cowbackup::{
    allocated_bytes, backup_start, BackupOptions, BitmapMode, BlockDriver, DirtyBitmap, FileDriver, Job, NbdDriver,
    OpenFlags, SyncMode,
};

const MIB: u64 = 1 << 20;
const GRANULE: u64 = 64 << 10;
const BITMAP_NAME: &str = "backup-inc";

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    size: u64,
    dir: Option<PathBuf>,
    writers: usize,
    keep: bool,
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
    let mut a = Args { size: 256 * MIB, dir: None, writers: 2, keep: false };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--size" => a.size = parse_size(&val()?)?,
            "--dir" => a.dir = Some(PathBuf::from(val()?)),
            "--writers" => a.writers = val()?.parse().map_err(|_| "bad --writers")?,
            "--keep" => a.keep = true,
            _ => return Err(format!("usage: pull_backup [--size 256M] [--dir DIR] [--writers 2] [--keep] ({arg}?)")),
        }
    }
    if a.size < 16 * MIB || a.size % MIB != 0 {
        return Err("--size must be a multiple of 1M, at least 16M".into());
    }
    if a.writers == 0 {
        return Err("--writers must be at least 1".into());
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

/// The host: the live image, its dirty bitmap and its write path. Writes hold the read
/// side of `job` across mark, hook and write, so taking the write side gives an instant
/// with no write in flight: the point in time of a new job.
struct Host {
    path: PathBuf,
    image: FileDriver,
    bitmap: Arc<DirtyBitmap>,
    job: RwLock<Option<Arc<Job>>>,
}

impl Host {
    fn write(&self, buf: &[u8], off: u64) -> Res<()> {
        let job = self.job.read().unwrap_or_else(|e| e.into_inner());
        self.bitmap.mark(off, buf.len() as u64)?;
        if let Some(job) = &*job {
            job.cow_before_write(off, buf.len() as u64)?;
        }
        self.image.write_at(buf, off)?;
        Ok(())
    }

    /// At a quiet instant: run `at_start` (clear or copy the bitmap), copy the image to
    /// `reference` (for verification only), and start a `sync = None` job into `scratch`
    /// (with the bitmap for a pull-mode incremental), which the write path calls from then on.
    fn start_pull(
        &self,
        reference: &Path,
        scratch: Arc<FileDriver>,
        incremental: bool,
        at_start: impl FnOnce() -> Res<()>,
    ) -> Res<Arc<Job>> {
        let mut current = self.job.write().unwrap_or_else(|e| e.into_inner());
        at_start()?;
        std::fs::copy(&self.path, reference)?;
        let source = Arc::new(FileDriver::open(&self.path, OpenFlags::empty())?);
        let opts = BackupOptions {
            sync: SyncMode::None,
            bitmap: incremental.then(|| self.bitmap.clone()),
            bitmap_mode: BitmapMode::OnSuccess,
            ..Default::default()
        };
        let job = Arc::new(backup_start(source, scratch, opts)?);
        *current = Some(job.clone());
        Ok(job)
    }

    fn end_pull(&self) {
        *self.job.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Guest threads: 64 KiB random writes at 4 KiB-aligned offsets, 2 ms apart, until `stop`.
fn guests(host: &Host, n: usize, stop: &AtomicBool, writes: &AtomicU64) -> Res<()> {
    thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|w| {
                s.spawn(move || -> Result<(), String> {
                    let mut rng = Rng(0x5EED_0000 + w as u64);
                    let mut buf = vec![0u8; 64 << 10];
                    let size = host.image.size();
                    while !stop.load(Ordering::Relaxed) {
                        rng.fill(&mut buf[..256]);
                        let off = rng.next() % ((size - buf.len() as u64) / 4096) * 4096;
                        host.write(&buf, off).map_err(|e| e.to_string())?;
                        writes.fetch_add(1, Ordering::Relaxed);
                        thread::sleep(Duration::from_millis(2));
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter().try_for_each(|h| h.join().expect("guest thread panicked"))
    })?;
    Ok(())
}

/// Run a command; its output, or an error with its stderr.
fn run(cmd: &mut Command) -> Res<String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// `qemu-img compare`: true when identical.
fn compare(a: &Path, b: &Path) -> Res<bool> {
    let out = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(a).arg(b).output()?;
    print!("    qemu-img compare {} {}: {}", a.display(), b.display(), String::from_utf8_lossy(&out.stdout));
    Ok(out.status.code() == Some(0))
}

/// The dirty extents of `nbdinfo --map=CONTEXT URI` (lines "offset length type description").
fn dirty_extents(context: &str, uri: &str) -> Res<Vec<(u64, u64)>> {
    let out = run(Command::new("nbdinfo").arg(format!("--map={context}")).arg(uri))?;
    let mut extents = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let (off, len, ty): (u64, u64, u32) = (f[0].parse()?, f[1].parse()?, f[2].parse()?);
        if ty & 1 != 0 {
            extents.push((off, len));
        }
    }
    Ok(extents)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("pull_backup: {e}");
            return ExitCode::from(2);
        }
    };
    for tool in ["qemu-img", "nbdinfo"] {
        if !have(tool) {
            eprintln!("pull_backup: {tool} is needed (scripts/deps.sh installs it)");
            return ExitCode::from(2);
        }
    }
    match run_example(&a) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            println!("BACKUP DIFFERS from the point-in-time image");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("pull_backup: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_example(a: &Args) -> Res<bool> {
    let tmp;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("cowbackup-pull").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let path = dir.join("disk.img");
    println!("image {}: {} (random data, zeroes, holes), {} guest writers", path.display(), mib(a.size), a.writers);
    {
        let img = FileDriver::create_with(&path, a.size, OpenFlags::WRITE | OpenFlags::OVERWRITE)?;
        let mut rng = Rng(0xD15C);
        let mut buf = vec![0u8; 4 * MIB as usize];
        for (i, off) in (0..a.size).step_by(buf.len()).enumerate() {
            match i % 4 {
                0 | 1 => {
                    rng.fill(&mut buf);
                    img.write_at(&buf, off)?;
                }
                2 => img.write_at(&vec![0u8; buf.len()], off)?,
                _ => {} // hole
            }
        }
        img.flush()?;
    }
    let host = Host {
        image: FileDriver::open(&path, OpenFlags::WRITE)?,
        bitmap: DirtyBitmap::new(a.size, GRANULE)?,
        job: RwLock::new(None),
        path: path.clone(),
    };
    let sock = dir.join("nbd.sock");
    let server = Server::start(&format!("unix:{}", sock.display()))?;
    println!("NBD server on {}", server.address());
    let uri = |export: &str| format!("nbd+unix:///{export}?socket={}", sock.display());

    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    let result = thread::scope(|s| -> Res<bool> {
        let guests = s.spawn(|| guests(&host, a.writers, &stop, &writes).map_err(|e| e.to_string()));
        let r = backups(a, &dir, &host, &server, &uri, &writes);
        stop.store(true, Ordering::Relaxed);
        guests.join().expect("guest threads panicked")?;
        r
    });
    server.stop();
    println!("{} guest writes in all", writes.load(Ordering::Relaxed));
    if a.keep || a.dir.is_some() {
        println!("files kept in {}", dir.display());
    }
    result
}

fn backups(
    a: &Args,
    dir: &Path,
    host: &Host,
    server: &Server,
    uri: &dyn Fn(&str) -> String,
    writes: &AtomicU64,
) -> Res<bool> {
    thread::sleep(Duration::from_millis(300));

    // 1. Full: sync = None view, pulled by qemu-img convert.
    println!("\nfull backup (pull mode, sync=None view exported as \"full\")");
    let (ref_full, full, scratch1) = (dir.join("ref-full.img"), dir.join("full.img"), dir.join("scratch-full.img"));
    let w0 = writes.load(Ordering::Relaxed);
    let scratch = Arc::new(FileDriver::create_with(&scratch1, a.size, OpenFlags::WRITE | OpenFlags::OVERWRITE)?);
    let job = host.start_pull(&ref_full, scratch, false, || Ok(host.bitmap.clear()?))?;
    server.add("full", job.snapshot()?, false)?;
    let t = Instant::now();
    let _ = std::fs::remove_file(&full);
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(uri("full")).arg(&full))?;
    let secs = t.elapsed().as_secs_f64();
    // The reader's own backup of the same export, with a manifest: a backup job whose source
    // is the export (NbdDriver), so each cluster's digest is of the point-in-time data read.
    let (full_m, full_b) = (dir.join("full.manifest"), dir.join("full-m.img"));
    for p in [&full_m, &full_b] {
        let _ = std::fs::remove_file(p);
    }
    let opts = BackupOptions { cluster_size: GRANULE, manifest: Some(full_m.clone()), ..Default::default() };
    backup_start(Arc::new(NbdDriver::connect(&uri("full"))?), Arc::new(FileDriver::create(&full_b, a.size)?), opts)?
        .wait()?;
    server.remove("full")?;
    job.complete()?;
    job.wait()?;
    host.end_pull();
    println!(
        "    qemu-img convert {} {}: {} in {secs:.2} s ({:.0} MiB/s); {} guest writes meanwhile, the hook saved {} into the scratch file (allocated {})",
        uri("full"),
        full.display(),
        mib(a.size),
        a.size as f64 / MIB as f64 / secs,
        writes.load(Ordering::Relaxed) - w0,
        mib(job.info().cow_bytes),
        mib(allocated_bytes(&scratch1)?)
    );
    println!("    and a backup job from the export into {} with the manifest {}", full_b.display(), full_m.display());
    if !compare(&full, &ref_full)? {
        return Ok(false);
    }

    thread::sleep(Duration::from_millis(700));

    // 2. Incremental: pull-mode view with the bitmap, dirty extents from nbdinfo.
    println!(
        "\nincremental backup (pull mode with the dirty bitmap, exported as \"inc\" + qemu:dirty-bitmap:{BITMAP_NAME})"
    );
    let (ref_inc, inc, scratch2) = (dir.join("ref-inc.img"), dir.join("inc.img"), dir.join("scratch-inc.img"));
    let frozen = DirtyBitmap::new(a.size, GRANULE)?;
    let scratch = Arc::new(FileDriver::create_with(&scratch2, a.size, OpenFlags::WRITE | OpenFlags::OVERWRITE)?);
    let w0 = writes.load(Ordering::Relaxed);
    let job = host.start_pull(&ref_inc, scratch, true, || Ok(frozen.merge(&host.bitmap)?))?;
    server.add("inc", job.snapshot()?, false)?;
    server.add_bitmap("inc", BITMAP_NAME, frozen.clone())?;
    let t = Instant::now();
    let context = format!("qemu:dirty-bitmap:{BITMAP_NAME}");
    let extents = dirty_extents(&context, &uri("inc"))?;
    let dirty: u64 = extents.iter().map(|e| e.1).sum();
    println!("    nbdinfo --map={context} {}: {} dirty extents, {}", uri("inc"), extents.len(), mib(dirty));
    if dirty != frozen.count() {
        return Err(format!("nbdinfo reports {dirty} dirty bytes, the bitmap {}", frozen.count()).into());
    }
    // The reader copies just those extents: a backup job from the export with sync = Bitmap
    // over a bitmap of the extents (clusters of one granule: the export serves nothing else),
    // into a new sparse image, with a manifest whose parent is the full backup's.
    let marks = DirtyBitmap::new(a.size, GRANULE)?;
    for &(off, len) in &extents {
        marks.mark(off, len)?;
    }
    let inc_m = dir.join("inc.manifest");
    for p in [&inc, &inc_m] {
        let _ = std::fs::remove_file(p);
    }
    let opts = BackupOptions {
        cluster_size: GRANULE,
        sync: SyncMode::Bitmap,
        bitmap: Some(marks),
        manifest: Some(inc_m.clone()),
        parent_manifest: Some(full_m.clone()),
        ..Default::default()
    };
    backup_start(Arc::new(NbdDriver::connect(&uri("inc"))?), Arc::new(FileDriver::create(&inc, a.size)?), opts)?
        .wait()?;
    let secs = t.elapsed().as_secs_f64();
    server.remove("inc")?;
    job.complete()?;
    job.wait()?;
    host.end_pull();
    println!(
        "    copied the dirty extents through NbdDriver (a sync=Bitmap job, manifest inc.manifest) into {}: {} in {secs:.2} s; {} guest writes meanwhile",
        inc.display(),
        mib(dirty),
        writes.load(Ordering::Relaxed) - w0
    );
    println!(
        "    after complete(): the bitmap holds {} (the writes made during the incremental), was {}",
        mib(host.bitmap.count()),
        mib(dirty)
    );
    // Restore: the chain full + inc is the disk at the incremental's start; a backup job
    // from it into a new image (instant access: the chain exported by nbd::Server).
    let chain = Arc::new(Chain::open(&[&full_m, &inc_m], true)?);
    let restored = dir.join("restored.img");
    let _ = std::fs::remove_file(&restored);
    backup_start(chain, Arc::new(FileDriver::create(&restored, a.size)?), BackupOptions::default())?.wait()?;
    println!("    restored the chain {} + {} into {}", full_m.display(), inc_m.display(), restored.display());
    Ok(compare(&full_b, &ref_full)? && compare(&restored, &ref_inc)?)
}
