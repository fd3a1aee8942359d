//! The demo: a point-in-time backup of a live, written-to image, verified.
//!
//! ```text
//! cargo run --release --example demo [-- --size 1G --dir DIR --writers 4 --keep]
//! ```
//!
//! Creates a source image with mixed random data, zero clusters and holes, copies it
//! aside as the point-in-time reference, starts a backup into a fresh sparse target,
//! and runs writer threads that write random data through the hook for the whole job.
//! Then it checks the target against the reference byte for byte (and with
//! `qemu-img compare` when installed) and prints throughput, hook calls and latency.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use cowbackup::{allocated_bytes, backup_start, BackupOptions, BlockDriver, FileDriver, JobState, OpenFlags};

const MIB: u64 = 1 << 20;

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
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1u64 << 40,
                _ => return Err(format!("bad size suffix in {s:?} (use K, M, G or T)")),
            },
        ),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    n.checked_mul(mult).filter(|&v| v > 0).ok_or_else(|| format!("bad size {s:?}"))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { size: 1 << 30, dir: None, writers: 4, keep: false };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--size" => args.size = parse_size(&val()?)?,
            "--dir" => args.dir = Some(PathBuf::from(val()?)),
            "--writers" => args.writers = val()?.parse().map_err(|_| "bad --writers".to_string())?,
            "--keep" => args.keep = true,
            "-h" | "--help" => {
                println!("usage: demo [--size 1G] [--dir DIR] [--writers 4] [--keep]");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a} (see --help)")),
        }
    }
    if args.size < MIB {
        return Err("--size must be at least 1M".into());
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
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            c.copy_from_slice(&self.next().to_le_bytes()[..c.len()]);
        }
    }
}

/// A source with, per 1 MiB: about 60 % random data, 25 % zero-filled clusters, 15 % holes.
fn make_source(path: &Path, size: u64) -> std::io::Result<()> {
    let d = FileDriver::create(path, size)?;
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB) as usize;
        let kind = rng.next() % 20;
        if kind < 12 {
            rng.fill(&mut buf[..n]);
            d.write_at(&buf[..n], off)?;
        } else if kind < 17 {
            buf[..n].fill(0);
            d.write_at(&buf[..n], off)?;
        } // else: a hole
        off += n as u64;
    }
    d.flush()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn fmt_ns(ns: u64) -> String {
    if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{:.1} µs", ns as f64 / 1e3)
    }
}

fn files_equal(a: &Path, b: &Path) -> std::io::Result<Option<u64>> {
    let (fa, fb) = (FileDriver::open(a, OpenFlags::empty())?, FileDriver::open(b, OpenFlags::empty())?);
    if fa.size() != fb.size() {
        return Ok(Some(0));
    }
    let (mut ba, mut bb) = (vec![0u8; 4 * MIB as usize], vec![0u8; 4 * MIB as usize]);
    let mut off = 0;
    while off < fa.size() {
        let n = (fa.size() - off).min(4 * MIB) as usize;
        fa.read_at(&mut ba[..n], off)?;
        fb.read_at(&mut bb[..n], off)?;
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(off + i as u64));
        }
        off += n as u64;
    }
    Ok(None)
}

fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    let tmp = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            None
        }
        None => Some(tempfile::Builder::new().prefix("cowbackup-demo").tempdir()?),
    };
    let dir = args.dir.clone().unwrap_or_else(|| tmp.as_ref().expect("temp dir").path().to_path_buf());
    let (src_path, ref_path, dst_path) = (dir.join("source.img"), dir.join("reference.img"), dir.join("backup.img"));
    // The demo never overwrites a file: a --dir from an earlier run must be emptied first.
    for p in [&src_path, &ref_path, &dst_path] {
        if p.symlink_metadata().is_ok() {
            return Err(format!(
                "{} already exists (from an earlier run?); the demo does not overwrite files: remove it or use another --dir",
                p.display()
            )
            .into());
        }
    }
    let size = args.size;
    println!("cowbackup demo: {} MiB image in {}", size / MIB, dir.display());

    let t = Instant::now();
    make_source(&src_path, size)?;
    std::fs::copy(&src_path, &ref_path)?; // the point in time, for verification
    println!("prepared source and reference copy in {:.2} s", t.elapsed().as_secs_f64());

    let source = Arc::new(FileDriver::open(&src_path, OpenFlags::WRITE)?);
    let target = Arc::new(FileDriver::create(&dst_path, size)?);
    let start = Instant::now();
    let job = backup_start(source.clone(), target, BackupOptions::default())?;
    let done = AtomicBool::new(false);

    let latencies: Vec<u64> = thread::scope(|s| -> Result<Vec<u64>, cowbackup::Error> {
        let writers: Vec<_> = (0..args.writers)
            .map(|w| {
                let (job, source, done) = (&job, &source, &done);
                s.spawn(move || -> Result<Vec<u64>, cowbackup::Error> {
                    let mut rng = Rng(0xfeed_0000 + w as u64 * 7919 + 1);
                    let mut lat = Vec::new();
                    let mut buf = vec![0u8; 256 << 10];
                    while !done.load(Ordering::Relaxed) {
                        let len = 512 + rng.next() % (256 << 10) - 512 + 1;
                        let off = rng.next() % (size - len + 1);
                        rng.fill(&mut buf[..len as usize]);
                        let t = Instant::now();
                        job.cow_before_write(off, len)?; // the hook, before every write
                        lat.push(t.elapsed().as_nanos() as u64);
                        source.write_at(&buf[..len as usize], off).map_err(|e| {
                            cowbackup::Error::io(cowbackup::Side::Source, cowbackup::Op::Write, off, len, &e)
                        })?;
                        thread::sleep(Duration::from_micros(200));
                    }
                    Ok(lat)
                })
            })
            .collect();
        // Progress: one updating line on a terminal, a line a second otherwise (logs, pipes).
        let tty = std::io::stdout().is_terminal();
        let mut last_line: Option<Instant> = None;
        let result = loop {
            if let Some(r) = job.wait_timeout(Duration::from_millis(100)) {
                break r;
            }
            if !tty && last_line.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                continue;
            }
            last_line = Some(Instant::now());
            let i = job.info();
            let pct = i.offset as f64 * 100.0 / i.len as f64;
            let bar = (pct / 5.0) as usize;
            let line = format!(
                "[{:<20}] {:5.1} %  copied {} MiB, zero {} MiB, hook copies {}",
                "#".repeat(bar),
                pct,
                i.bytes_copied / MIB,
                i.bytes_zero / MIB,
                i.cow_requests
            );
            if tty {
                print!("\r{line}   ");
                std::io::stdout().flush().ok();
            } else {
                println!("{line}");
            }
        };
        done.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for w in writers {
            all.extend(w.join().expect("writer thread panicked")?);
        }
        result?;
        Ok(all)
    })?;
    let elapsed = start.elapsed();
    let info = job.info();
    let end = format!("[{:<20}] 100.0 %  {:?}", "#".repeat(20), info.state);
    if std::io::stdout().is_terminal() {
        println!("\r{end}{:40}", "");
    } else {
        println!("{end}");
    }
    assert_eq!(info.state, JobState::Completed);

    let mut lat = latencies;
    lat.sort_unstable();
    let gib_s = size as f64 / elapsed.as_secs_f64() / (1u64 << 30) as f64;
    println!(
        "backup: {} MiB in {:.2} s = {:.2} GiB/s (copied {} MiB, zero {} MiB)",
        size / MIB,
        elapsed.as_secs_f64(),
        gib_s,
        info.bytes_copied / MIB,
        info.bytes_zero / MIB
    );
    println!(
        "hook: {} calls during the backup, {} had to copy ({} MiB); latency p50 {}, p99 {}, max {}",
        lat.len(),
        info.cow_requests,
        info.cow_bytes / MIB,
        fmt_ns(percentile(&lat, 0.5)),
        fmt_ns(percentile(&lat, 0.99)),
        fmt_ns(lat.last().copied().unwrap_or(0))
    );
    println!(
        "target allocation: {} MiB of {} MiB (zero clusters left as holes)",
        allocated_bytes(&dst_path)? / MIB,
        size / MIB
    );

    let t = Instant::now();
    let mut ok = match files_equal(&ref_path, &dst_path)? {
        None => {
            println!(
                "verify: backup == source at the start of the job, byte for byte ({:.2} s)",
                t.elapsed().as_secs_f64()
            );
            true
        }
        Some(at) => {
            println!("verify: FAILED: backup differs from the point-in-time source at byte {at}");
            false
        }
    };
    // The writers' data must have reached the source (else the test proved nothing, or
    // writes were lost); with no write during the job (--writers 0) it must be unchanged.
    let unchanged = files_equal(&src_path, &ref_path)?.is_none();
    match (lat.is_empty(), unchanged) {
        (true, true) => {
            println!("verify: no write during the job (--writers {}): the source is unchanged", args.writers)
        }
        (true, false) => {
            println!("verify: FAILED: the source changed although nothing wrote to it");
            ok = false;
        }
        (false, true) => {
            println!("verify: FAILED: {} writes during the job, but the source is unchanged", lat.len());
            ok = false;
        }
        (false, false) => {}
    }
    match Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(&ref_path)
        .arg(&dst_path)
        .status()
    {
        Ok(s) if s.success() => println!("verify: qemu-img compare reference.img backup.img: identical"),
        Ok(s) => {
            println!("verify: FAILED: qemu-img compare says the images differ ({s})");
            ok = false;
        }
        Err(_) => println!("verify: qemu-img not installed, skipped its compare"),
    }
    if args.dir.is_some() {
        println!("images kept in {}", dir.display());
    } else if let (true, Some(t)) = (args.keep, tmp) {
        println!("images kept in {}", t.keep().display());
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}
