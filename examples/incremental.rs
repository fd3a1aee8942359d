//! Incremental backups, end to end: a full backup and a chain of incrementals of a live
//! image, a crash of the writing process, and a restore that gives the image back byte for
//! byte.
//!
//! ```text
//! cargo run --release --example incremental [-- --size 512M --dir DIR --writers 2 --keep]
//! ```
//!
//! 1. A live image `disk.img` (random data, zero-filled stretches, holes) and a persistent
//!    dirty bitmap `disk.bitmap` (`DirtyBitmap::create`). Writer threads write to the image
//!    all along through the host's write path: `bitmap.mark` → `job.cow_before_write` (while a
//!    backup runs) → write.
//! 2. A full backup with the bitmap (`full.img`): it starts the chain; afterwards the bitmap
//!    holds the writes made since its start. Then three incrementals (`SyncMode::Bitmap`,
//!    `BitmapMode::OnSuccess`), each into a new sparse file `incN.img` that holds only its
//!    clusters, with its manifest `incN.manifest` (`BackupOptions::manifest`: the copy set,
//!    a digest of each copied cluster, the bitmap's uuid and generations, the disk id),
//!    checked with `repo::verify` right after the job.
//! 3. A crash: the writes move to a child process (this example, hidden subcommand
//!    `__crash-writer`) that marks and writes with the bitmap open and reports each returned
//!    mark on a pipe; the parent kills it with SIGKILL mid-way, reopens the bitmap (it must
//!    open, with the chain's uuid and generation and every reported mark), and the writers
//!    resume. A fourth incremental follows, with no new full backup.
//! 4. The restore: the chain `full.manifest, inc1.manifest, …` opened as one read-only
//!    device (`repo::Chain`, which checks each link), copied into a new `restored.img` by a
//!    backup job with the chain as its source. It must equal the image
//!    as it was when the last incremental started, byte for byte (and per `qemu-img compare`
//!    when installed).
//!
//! **Verification only**: `reference.img` is a copy of the image taken before the writers
//! start; at the start of each backup the writers are held out for an instant while the
//! ranges written since the last update (from the writers' own log, not from the bitmap) are
//! copied into it. It is the point in time each backup is checked against. A real host does
//! not do this: the backup job alone gives the point in time.
//!
//! **The restore rule**: the valid clusters of an incremental are exactly its job's copy set
//! (`Job::extents`: the clusters overlapping the granules dirty when it started). Inside the
//! copy set a hole in `incN.img` means zeroes (a cluster that read as zero is not written to
//! a target that reads as zero) and must be applied as zeroes; outside it the file means
//! nothing. So the copy set must be kept with the backup: the manifest records it, and the
//! chain applies this rule.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use cowbackup::{
    allocated_bytes, backup_start, BackupOptions, BitmapMode, BlockDriver, DirtyBitmap, FileDriver, Job, JobState,
    OpenFlags, SyncMode,
};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Bitmap granularity and backup cluster size (both the defaults).
const GRANULE: u64 = 64 * KIB;

struct Args {
    size: u64,
    dir: Option<PathBuf>,
    writers: usize,
    keep: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (
            &s[..i],
            match c.to_ascii_uppercase() {
                'K' => KIB,
                'M' => MIB,
                'G' => 1 << 30,
                _ => return Err(format!("bad size suffix in {s:?} (use K, M or G)")),
            },
        ),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    n.checked_mul(mult).filter(|&v| v > 0).ok_or_else(|| format!("bad size {s:?}"))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { size: 512 * MIB, dir: None, writers: 2, keep: false };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--size" => args.size = parse_size(&val()?)?,
            "--dir" => args.dir = Some(PathBuf::from(val()?)),
            "--writers" => args.writers = val()?.parse().map_err(|_| "bad --writers".to_string())?,
            "--keep" => args.keep = true,
            "-h" | "--help" => {
                println!("usage: incremental [--size 512M] [--dir DIR] [--writers 2] [--keep]");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a} (see --help)")),
        }
    }
    if args.size < 64 * MIB || args.size % MIB != 0 {
        return Err("--size must be a multiple of 1M, at least 64M".into());
    }
    if args.writers == 0 {
        return Err("--writers must be at least 1 (the example is about a live image)".into());
    }
    Ok(args)
}

/// xorshift64*: fast deterministic random data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            c.copy_from_slice(&self.next().to_le_bytes()[..c.len()]);
        }
    }
}

/// The image: per 1 MiB, about 60 % random data, 25 % zero-filled, 15 % holes.
fn make_image(path: &Path, size: u64) -> Res<()> {
    let d = FileDriver::create(path, size)?;
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut buf = vec![0u8; MIB as usize];
    for off in (0..size).step_by(MIB as usize) {
        match rng.below(20) {
            0..=11 => {
                rng.fill(&mut buf);
                d.write_at(&buf, off)?;
            }
            12..=16 => d.write_at(&vec![0; MIB as usize], off)?,
            _ => {} // a hole
        }
    }
    Ok(d.flush()?)
}

/// One write of the guest's workload: where, how long, zeroes or data. Nine in ten land in
/// a hot 4 % of the image, the rest anywhere; one in eight writes a whole granule of zeroes.
fn next_write(rng: &mut Rng, size: u64) -> (u64, u64, bool) {
    let (base, span) = if rng.below(10) < 9 { (size / 4, size / 25) } else { (0, size) };
    if rng.below(8) == 0 {
        return (base + rng.below(span / GRANULE) * GRANULE, GRANULE, true);
    }
    let len = 4 * KIB * (1 + rng.below(16));
    (base + rng.below((span - len) / 512) * 512, len, false)
}

/// What the writers' host path uses: the bitmap and the running backup. Writes hold it
/// shared; starting a backup holds it exclusive (no write in flight at the point in time).
struct HostState {
    bitmap: Arc<DirtyBitmap>,
    job: Option<Arc<Job>>,
}

struct Host {
    disk: Arc<FileDriver>,
    state: RwLock<HostState>,
    writes: AtomicU64,
    /// Ranges written since `reference.img` was last brought up to date (verification only).
    log: Mutex<Vec<(u64, u64)>>,
}

impl Host {
    /// The host's write path: mark the bitmap (durable when it returns), let the backup
    /// save the old data, then write.
    fn write(&self, off: u64, data: &[u8]) -> Res<()> {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        let len = data.len() as u64;
        st.bitmap.mark(off, len)?;
        if let Some(job) = &st.job {
            job.cow_before_write(off, len)?;
        }
        self.disk.write_at(data, off)?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push((off, len));
        Ok(())
    }

    /// Read the ranges written since the last call from the image: with no write in
    /// flight, writing them into the reference (with [`write_reference`]) makes it the image
    /// as it is now. Only the reads happen here, so the writers are held out briefly.
    fn capture(&self) -> Res<Vec<(u64, Vec<u8>)>> {
        let mut log = std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()));
        log.sort_unstable();
        let mut out = Vec::new();
        let mut i = 0;
        while i < log.len() {
            let (start, mut end) = (log[i].0, log[i].0 + log[i].1);
            while i + 1 < log.len() && log[i + 1].0 <= end {
                i += 1;
                end = end.max(log[i].0 + log[i].1);
            }
            let mut buf = vec![0u8; (end - start) as usize];
            self.disk.read_at(&mut buf, start)?;
            out.push((start, buf));
            i += 1;
        }
        Ok(out)
    }
}

fn write_reference(reference: &Path, ranges: &[(u64, Vec<u8>)]) -> Res<()> {
    let r = std::fs::OpenOptions::new().write(true).open(reference)?;
    for (off, data) in ranges {
        r.write_all_at(data, *off)?;
    }
    Ok(())
}

/// A writer thread: QD1, a write every ~2 ms, until `stop`.
fn writer(host: &Host, seed: u64, stop: &AtomicBool) -> Res<()> {
    let size = host.disk.size();
    let mut rng = Rng(seed | 1);
    let mut buf = vec![0u8; GRANULE as usize];
    while !stop.load(Ordering::Relaxed) {
        let (off, len, zero) = next_write(&mut rng, size);
        let data = &mut buf[..len as usize];
        if zero {
            data.fill(0);
        } else {
            rng.fill(data);
        }
        host.write(off, data)?;
        thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Run `f` while `n` writer threads write; the writers stop when `f` returns (or fails).
fn with_writers<T>(host: &Host, n: usize, seed: u64, f: impl FnOnce() -> Res<T>) -> Res<T> {
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let ws: Vec<_> = (0..n)
            .map(|w| {
                s.spawn({
                    let stop = &stop;
                    move || writer(host, seed + w as u64 * 7919, stop)
                })
            })
            .collect();
        let r = f();
        stop.store(true, Ordering::Relaxed);
        for w in ws {
            w.join().map_err(|_| "a writer thread panicked")??;
        }
        r
    })
}

/// A backup of the chain, verified.
struct Step {
    name: String,
    extents: Vec<(u64, u64)>,
    copied: u64,
    zero: u64,
    hook_copies: u64,
    allocated: u64,
    zero_clusters: u64,
}

impl Step {
    fn bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.1).sum()
    }
}

/// Start a backup at a point in time, wait for it, verify it against the reference copy.
fn backup(host: &Host, dir: &Path, name: &str, sync: SyncMode) -> Res<Step> {
    let (img, reference) = (dir.join(format!("{name}.img")), dir.join("reference.img"));
    let size = host.disk.size();
    let target = Arc::new(FileDriver::create(&img, size)?); // new, sparse: reads as zeroes
    let t = Instant::now();
    let (job, captured, held) = {
        // The point in time: no write in flight from here until the job has started.
        let mut st = host.state.write().unwrap_or_else(|e| e.into_inner());
        let held = Instant::now();
        let captured = host.capture()?; // for verification only
        let opts = BackupOptions {
            sync,
            bitmap: Some(st.bitmap.clone()),
            bitmap_mode: BitmapMode::OnSuccess,
            manifest: Some(dir.join(format!("{name}.manifest"))),
            disk_id: Some("example-disk".into()),
            ..Default::default()
        };
        let job = Arc::new(backup_start(host.disk.clone(), target, opts)?);
        st.job = Some(job.clone());
        (job, captured, held)
    };
    let paused = held.elapsed();
    write_reference(&reference, &captured)?;
    let captured: usize = captured.iter().map(|c| c.1.len()).sum();
    let extents = job.extents(); // the copy set, fixed at start
    let result = job.wait();
    let secs = t.elapsed().as_secs_f64();
    host.state.write().unwrap_or_else(|e| e.into_inner()).job = None;
    result?;
    let ji = job.info();
    if ji.state != JobState::Completed {
        return Err(format!("{name}: ended {:?}", ji.state).into());
    }
    let zero_clusters = verify(&img, &reference, &extents).map_err(|e| format!("{name}: {e}"))?;
    // The manifest's own check: every cluster of the copy set against its digest.
    let report =
        cowbackup::repo::verify(dir.join(format!("{name}.manifest")), &FileDriver::open(&img, OpenFlags::empty())?)
            .map_err(|e| format!("{name}: {e}"))?;
    if report.bytes_checked != extents.iter().map(|e| e.1).sum::<u64>() {
        return Err(format!("{name}: the manifest's copy set differs from the job's").into());
    }
    let step = Step {
        name: name.to_string(),
        extents,
        copied: ji.bytes_copied,
        zero: ji.bytes_zero,
        hook_copies: ji.cow_requests,
        allocated: allocated_bytes(&img)?,
        zero_clusters,
    };
    // The file holds only its clusters (plus a little filesystem metadata).
    if step.allocated > step.bytes() + MIB {
        return Err(format!("{name}: {} bytes allocated for a copy set of {}", step.allocated, step.bytes()).into());
    }
    println!(
        "{name:>5}: {:>4} MiB in {:>5} extents ({:4.1} % of the image), {:.2} s (writers held {:.1} ms to read the {} \
         KiB written since the last one, for the reference); copied {} MiB, {} MiB zero, {} hook calls copied; file {} MiB; verified",
        step.bytes() / MIB,
        step.extents.len(),
        step.bytes() as f64 * 100.0 / size as f64,
        secs,
        paused.as_secs_f64() * 1e3,
        captured / 1024,
        step.copied / MIB,
        step.zero / MIB,
        step.hook_copies,
        step.allocated / MIB,
    );
    Ok(step)
}

/// Compare `extents` of `backup` with `reference`; returns the number of zero granules in
/// them (holes of the backup that a restore applies as zeroes).
fn verify(backup: &Path, reference: &Path, extents: &[(u64, u64)]) -> Res<u64> {
    let (b, r) = (File::open(backup)?, File::open(reference)?);
    let (mut bb, mut rb) = (vec![0u8; 4 * MIB as usize], vec![0u8; 4 * MIB as usize]);
    let mut zero = 0;
    for &(o, l) in extents {
        let mut off = o;
        while off < o + l {
            let n = (o + l - off).min(4 * MIB) as usize;
            b.read_exact_at(&mut bb[..n], off)?;
            r.read_exact_at(&mut rb[..n], off)?;
            if bb[..n] != rb[..n] {
                let i = bb.iter().zip(&rb).position(|(x, y)| x != y).unwrap_or(0);
                return Err(format!("differs from the point in time at byte {}", off + i as u64).into());
            }
            zero += bb[..n].chunks(GRANULE as usize).filter(|c| c.iter().all(|&x| x == 0)).count() as u64;
            off += n as u64;
        }
    }
    Ok(zero)
}

/// The restore: the chain of manifests opened as one read-only device, copied into a new
/// image by a backup job with the chain as its source. Returns the bytes the chain holds
/// as data.
fn restore(dir: &Path, chain: &[String], out: &Path, size: u64) -> Res<(usize, u64)> {
    let manifests: Vec<PathBuf> = chain.iter().map(|n| dir.join(format!("{n}.manifest"))).collect();
    let chain = Arc::new(cowbackup::repo::Chain::open(&manifests, false)?);
    let dst = Arc::new(FileDriver::create(out, size)?);
    let job = backup_start(chain, dst, BackupOptions::default())?;
    job.wait()?;
    Ok((manifests.len(), job.info().bytes_copied))
}

fn first_difference(a: &Path, b: &Path) -> Res<Option<u64>> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    let len = fa.metadata()?.len();
    if fb.metadata()?.len() != len {
        return Ok(Some(0));
    }
    let (mut ba, mut bb) = (vec![0u8; 4 * MIB as usize], vec![0u8; 4 * MIB as usize]);
    let mut off = 0;
    while off < len {
        let n = (len - off).min(4 * MIB) as usize;
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(off + i as u64));
        }
        off += n as u64;
    }
    Ok(None)
}

/// The child's side: open the bitmap and the image, and mark + write from 2 threads until
/// killed, reporting `MARK offset len` on stdout after each mark returned (one write(2) per
/// line, so a line is whole in the pipe even if the process dies right after).
fn crash_writer(dir: &Path, seed: u64) -> Res<()> {
    let bm = DirtyBitmap::open(dir.join("disk.bitmap"))?;
    let disk = FileDriver::open(dir.join("disk.img"), OpenFlags::WRITE)?;
    let out = Mutex::new(std::io::stdout());
    writeln!(out.lock().unwrap_or_else(|e| e.into_inner()), "READY")?;
    thread::scope(|s| -> Res<()> {
        let ts: Vec<_> = (0..2u64)
            .map(|t| {
                let (bm, disk, out) = (&bm, &disk, &out);
                s.spawn(move || -> Res<()> {
                    let mut rng = Rng(seed * 3 + t + 1);
                    let mut buf = vec![0u8; GRANULE as usize];
                    loop {
                        // Anywhere in the image: many first marks, each made durable.
                        let len = 4 * KIB * (1 + rng.below(16));
                        let off = rng.below((disk.size() - len) / 512) * 512;
                        bm.mark(off, len)?;
                        let line = format!("MARK {off} {len}\n");
                        {
                            let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
                            o.write_all(line.as_bytes())?;
                            o.flush()?;
                        }
                        let data = &mut buf[..len as usize];
                        rng.fill(data);
                        disk.write_at(data, off)?;
                    }
                })
            })
            .collect();
        for t in ts {
            t.join().map_err(|_| "writer panicked")??;
        }
        Ok(())
    })
}

/// Spawn the crash writer, kill it with SIGKILL after `after`, return the marks it reported.
fn crash(dir: &Path, after: Duration) -> Res<Vec<(u64, u64)>> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("__crash-writer")
        .arg(dir)
        .arg("7")
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no pipe")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = thread::spawn(move || {
        let mut marks = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line == "READY" {
                let _ = tx.send(());
            } else if let Some(rest) = line.strip_prefix("MARK ") {
                let mut f = rest.split(' ').map(|v| v.parse::<u64>().unwrap_or(0));
                marks.push((f.next().unwrap_or(0), f.next().unwrap_or(0)));
            }
        }
        marks
    });
    let ready = rx.recv_timeout(Duration::from_secs(20)).is_ok();
    if ready {
        thread::sleep(after);
    }
    child.kill()?; // SIGKILL: no destructor, no flush, no unlock runs in the child
    let status = child.wait()?;
    let marks = reader.join().map_err(|_| "reader panicked")?;
    if !ready {
        return Err(format!("the crash writer did not start ({status})").into());
    }
    Ok(marks)
}

/// True when every granule of `[off, off + len)` is dirty.
fn covered(bm: &DirtyBitmap, off: u64, len: u64) -> bool {
    let s = off / GRANULE * GRANULE;
    let e = ((off + len).div_ceil(GRANULE) * GRANULE).min(bm.size());
    matches!(bm.next_dirty(s), Some((o, l)) if o == s && o + l >= e)
}

fn run(args: Args) -> Res<bool> {
    let tmp = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            None
        }
        None => Some(tempfile::Builder::new().prefix("cowbackup-incremental").tempdir()?),
    };
    let dir = args.dir.clone().unwrap_or_else(|| tmp.as_ref().expect("temp dir").path().to_path_buf());
    for f in ["disk.img", "disk.bitmap", "full.img", "inc1.img", "reference.img", "restored.img"] {
        if dir.join(f).symlink_metadata().is_ok() {
            return Err(format!(
                "{} already exists (from an earlier run?); the example does not overwrite files: remove it or use another --dir",
                dir.join(f).display()
            )
            .into());
        }
    }
    let size = args.size;
    let started = Instant::now();
    println!(
        "cowbackup incremental backups: {} MiB live image, {} writer threads, bitmap granule and cluster {} KiB, in {}",
        size / MIB,
        args.writers,
        GRANULE / KIB,
        dir.display()
    );
    make_image(&dir.join("disk.img"), size)?;
    std::fs::copy(dir.join("disk.img"), dir.join("reference.img"))?; // verification only
    let bm_path = dir.join("disk.bitmap");
    let host = Host {
        disk: Arc::new(FileDriver::open(dir.join("disk.img"), OpenFlags::WRITE)?),
        state: RwLock::new(HostState { bitmap: DirtyBitmap::create(&bm_path, size, GRANULE)?, job: None }),
        writes: AtomicU64::new(0),
        log: Mutex::new(Vec::new()),
    };
    let pause = Duration::from_millis(1500);
    // Full backup, then three incrementals, the writers going all along.
    let mut chain = with_writers(&host, args.writers, 1, || {
        let mut chain = vec![backup(&host, &dir, "full", SyncMode::Full)?];
        for i in 1..=3 {
            thread::sleep(pause);
            chain.push(backup(&host, &dir, &format!("inc{i}"), SyncMode::Bitmap)?);
        }
        Ok(chain)
    })?;
    let writes_before = host.writes.load(Ordering::Relaxed);
    // With the writers stopped, check the verification method itself: the reference (the
    // first copy plus the logged writes) is the image.
    write_reference(&dir.join("reference.img"), &host.capture()?)?;
    if let Some(at) = first_difference(&dir.join("disk.img"), &dir.join("reference.img"))? {
        return Err(format!("the reference copy differs from the image at byte {at}: the write log is wrong").into());
    }
    let bm = host.state.read().unwrap_or_else(|e| e.into_inner()).bitmap.clone();
    let (uuid, generation, dirty) = (bm.uuid(), bm.generation(), bm.count());
    drop(bm);

    // The crash: the bitmap is closed here and opened by a child that writes until killed.
    let closed = DirtyBitmap::new(size, GRANULE)?; // a stand-in while the child owns the file
    let owned = std::mem::replace(&mut host.state.write().unwrap_or_else(|e| e.into_inner()).bitmap, closed);
    drop(owned); // no job holds it: the file is closed and unlocked
    let marks = crash(&dir, Duration::from_millis(400))?;
    // Every write of the child was reported first (mark, report, write): the reference's log.
    host.log.lock().unwrap_or_else(|e| e.into_inner()).extend(&marks);
    let bm = DirtyBitmap::open(&bm_path).map_err(|e| format!("reopening the bitmap after the crash: {e}"))?;
    let lost = marks.iter().filter(|&&(o, l)| !covered(&bm, o, l)).count();
    let intact = bm.uuid() == uuid && bm.generation() == generation;
    println!(
        "crash: the writing child was killed with SIGKILL after {} reported marks; the bitmap reopened: \
         uuid and generation {} as recorded after inc3: {}; reported marks missing: {lost}; dirty {} MiB (was {} MiB)",
        marks.len(),
        generation,
        if intact { "yes" } else { "NO" },
        bm.count() / MIB,
        dirty / MIB
    );
    let crash_ok = intact && lost == 0 && !marks.is_empty();
    host.state.write().unwrap_or_else(|e| e.into_inner()).bitmap = bm;

    // The writers resume; the next incremental, with no new full backup.
    chain.push(with_writers(&host, args.writers, 2, || {
        thread::sleep(pause / 2);
        backup(&host, &dir, "inc4", SyncMode::Bitmap)
    })?);
    let writes = host.writes.load(Ordering::Relaxed);

    // Restore the chain and compare with the image as it was at the last backup's start.
    let t = Instant::now();
    let names: Vec<String> = chain.iter().map(|s| s.name.clone()).collect();
    let restored = dir.join("restored.img");
    let (n_ext, n_bytes) = restore(&dir, &names, &restored, size)?;
    let restore_secs = t.elapsed().as_secs_f64();
    let same = first_difference(&restored, &dir.join("reference.img"))?;
    match same {
        None => println!(
            "restore: the chain {} ({n_ext} manifests, links checked) copied by a job ({} MiB of data) in \
             {restore_secs:.2} s: restored.img == the image at inc4's start, byte for byte",
            names.join(" + "),
            n_bytes / MIB
        ),
        Some(at) => println!("restore: FAILED: restored.img differs from the image at inc4's start at byte {at}"),
    }
    let qemu = match Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(dir.join("reference.img"))
        .arg(&restored)
        .status()
    {
        Ok(s) if s.success() => {
            println!("restore: qemu-img compare reference.img restored.img: identical");
            Some(true)
        }
        Ok(s) => {
            println!("restore: FAILED: qemu-img compare says the images differ ({s})");
            Some(false)
        }
        Err(_) => {
            println!("restore: qemu-img not installed, skipped its compare");
            None
        }
    };

    let incs: Vec<&Step> = chain.iter().skip(1).collect();
    let inc_bytes: u64 = incs.iter().map(|s| s.bytes()).sum();
    let holes: u64 = incs.iter().map(|s| s.zero_clusters).sum();
    let ok = same.is_none() && qemu != Some(false) && crash_ok;
    println!();
    println!("summary ({:.1} s):", started.elapsed().as_secs_f64());
    println!(
        "  chain: full {} MiB, then {}",
        chain[0].bytes() / MIB,
        incs.iter().map(|s| format!("{} {} MiB", s.name, s.bytes() / MIB)).collect::<Vec<_>>().join(", ")
    );
    println!(
        "  the 4 incrementals copied {} MiB where 4 full backups would copy {} MiB ({:.1} %); {holes} zero granules \
         of their copy sets were holes, applied as zeroes",
        inc_bytes / MIB,
        4 * size / MIB,
        inc_bytes as f64 * 100.0 / (4 * size) as f64
    );
    println!(
        "  {} host writes ({} before the crash), {} hook calls that copied old data; every backup matched its point in time",
        writes,
        writes_before,
        chain.iter().map(|s| s.hook_copies).sum::<u64>()
    );
    println!(
        "  crash: {} reported marks, {}; restore exact: {}",
        marks.len(),
        if crash_ok { "all in the reopened bitmap, chain intact" } else { "CHECK FAILED" },
        if same.is_none() { "yes" } else { "NO" }
    );
    println!("  {}", if ok { "OK" } else { "FAILED" });
    if args.dir.is_some() {
        println!("files kept in {}", dir.display());
    } else if let (true, Some(t)) = (args.keep, tmp) {
        println!("files kept in {}", t.keep().display());
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("__crash-writer") {
        let (Some(dir), Some(seed)) = (argv.get(2), argv.get(3).and_then(|s| s.parse().ok())) else {
            return ExitCode::from(2);
        };
        return match crash_writer(Path::new(dir), seed) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("incremental __crash-writer: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("incremental: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("incremental: {e}");
            ExitCode::FAILURE
        }
    }
}
