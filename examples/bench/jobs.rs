//! Many jobs in one process (issue 26): what N concurrent, speed-limited backups cost
//! the host in threads, memory and CPU while they run.
//!
//! N jobs back up one shared source (a random image on tmpfs, `--scale-size`-independent:
//! 64 MiB) into N targets that discard what they are given (the cost of storing the
//! data is not what is measured here: N × 64 MiB of real targets would not fit), each
//! job limited to a speed (16 MiB/s for 64 jobs; for 1 000 jobs 1 MiB/s, so that the
//! aggregate, 1 GiB/s, is what two CPUs can copy and the jobs stay speed-limited).
//! After the jobs have run for 1 s, a 2 s window is measured: the process's threads
//! (`/proc/self/status` `Threads`), resident memory (`VmRSS`, and its growth over the
//! process before the jobs), the CPU time the process used (`getrusage`) and the
//! context switches. Then every job is cancelled and freed, and the time that takes.

use std::io;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use cowbackup::{
    backup_start, BackupOptions, BlockDriver, BlockStatus, FileDriver, Job, OpenFlags, StatusFlags, WorkerPool,
    WorkerPriority,
};

use crate::util::*;
use crate::Args;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A target that takes every write and keeps nothing (reads as zeroes).
struct Discard(u64);

impl BlockDriver for Discard {
    fn size(&self) -> u64 {
        self.0
    }
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes_at(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn block_status(&self, _offset: u64, len: u64) -> io::Result<BlockStatus> {
        Ok(BlockStatus { len, flags: StatusFlags::DATA })
    }
}

/// A `/proc/self/status` field in its unit (kB for memory).
fn status(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds used by the process so far, and its voluntary + involuntary switches.
fn usage() -> (f64, u64) {
    let ru = rusage(libc::RUSAGE_SELF);
    (cpu_secs(&ru), (ru.ru_nvcsw + ru.ru_nivcsw) as u64)
}

struct Cost {
    threads: u64,
    rss_kib: u64,
    rss_growth_kib: u64,
    cpu: f64,
    switches: u64,
    teardown: f64,
    /// Bytes the jobs copied per second in the window, over the sum of their limits.
    speed_share: f64,
}

/// `pool`: the jobs share a pool of that many threads, else each has its own workers.
fn run(src: &Arc<FileDriver>, n: usize, speed: u64, pool: Option<usize>) -> Result<Cost, String> {
    let rss0 = status("VmRSS:");
    let pool = match pool {
        Some(t) => Some(WorkerPool::new(t, WorkerPriority::Normal).map_err(err)?),
        None => None,
    };
    let size = src.size();
    let mut jobs: Vec<Job> = Vec::with_capacity(n);
    for _ in 0..n {
        let target: Arc<dyn BlockDriver> = Arc::new(Discard(size));
        let opts = BackupOptions { speed, pool: pool.clone(), ..Default::default() };
        match backup_start(src.clone(), target, opts) {
            Ok(j) => jobs.push(j),
            Err(e) => {
                for j in &jobs {
                    j.cancel();
                }
                return Err(format!("job {} of {n}: {e}", jobs.len()));
            }
        }
    }
    thread::sleep(Duration::from_secs(1));
    let done = |jobs: &[Job]| jobs.iter().map(|j| j.info().offset).sum::<u64>();
    let (c0, s0) = usage();
    let b0 = done(&jobs);
    let t = Instant::now();
    thread::sleep(Duration::from_secs(2));
    let (c1, s1) = usage();
    let b1 = done(&jobs);
    let window = t.elapsed().as_secs_f64();
    let threads = status("Threads:");
    let rss = status("VmRSS:");
    let t = Instant::now();
    for j in &jobs {
        j.cancel();
    }
    drop(jobs);
    drop(pool);
    let teardown = t.elapsed().as_secs_f64();
    Ok(Cost {
        threads,
        rss_kib: rss,
        rss_growth_kib: rss.saturating_sub(rss0),
        cpu: (c1 - c0) / window,
        switches: ((s1 - s0) as f64 / window) as u64,
        teardown,
        speed_share: (b1 - b0) as f64 / window / (n as f64 * speed as f64),
    })
}

/// The hidden subcommand `__jobs SRC N SPEED POOL`: [`run`] in a fresh process (so the
/// memory of one configuration is not counted in the next: freed memory stays with the
/// allocator), `POOL` 0 for the jobs' own workers. Prints the costs on one line.
pub fn child_jobs(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let [src, n, speed, pool] = args else { return Err("bad __jobs arguments".into()) };
    let src = Arc::new(FileDriver::open(src, OpenFlags::empty())?);
    let pool: usize = pool.parse()?;
    let c = run(&src, n.parse()?, speed.parse()?, (pool > 0).then_some(pool))?;
    println!(
        "{} {} {} {} {} {} {}",
        c.threads, c.rss_kib, c.rss_growth_kib, c.cpu, c.switches, c.teardown, c.speed_share
    );
    Ok(())
}

/// [`run`] in a child process (`__jobs`).
fn run_child(src: &std::path::Path, n: usize, speed: u64, pool: Option<usize>) -> Result<Cost, String> {
    let exe = std::env::current_exe().map_err(err)?;
    let out = std::process::Command::new(exe)
        .arg("__jobs")
        .arg(src)
        .arg(n.to_string())
        .arg(speed.to_string())
        .arg(pool.unwrap_or(0).to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(err)?;
    if !out.status.success() {
        return Err(format!("__jobs child failed: {}", out.status));
    }
    let s = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = s.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    let [threads, rss, growth, cpu, switches, teardown, share] = v[..] else {
        return Err(format!("bad __jobs output {s:?}"));
    };
    Ok(Cost {
        threads: threads as u64,
        rss_kib: rss as u64,
        rss_growth_kib: growth as u64,
        cpu,
        switches: switches as u64,
        teardown,
        speed_share: share,
    })
}

/// `--only jobs`: 64 jobs at 16 MiB/s and 1 000 jobs at 1 MiB/s, each set in a process of its own,
/// with their own workers (the defaults) and sharing one `WorkerPool` of 2 threads.
pub fn jobs(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    let path = a.shm_dir.join("bench-jobs-src.img");
    make_image(&path, 64 * MIB, Data::Random).map_err(err)?;
    // The child's main thread is its only thread before the jobs.
    let before = 1;
    let workers = BackupOptions::default().workers;
    let mut res = Vec::new();
    let pool_threads = 2;
    for (n, speed, pool) in [
        (64usize, 16 * MIB, None),
        (64, 16 * MIB, Some(pool_threads)),
        (1000, MIB, None),
        (1000, MIB, Some(pool_threads)),
    ] {
        eprint!("jobs: {n} jobs at {}/s{} ", fmt_bytes(speed), if pool.is_some() { ", pool" } else { "" });
        let mut runs = Vec::new();
        for _ in 0..a.runs {
            match run_child(&path, n, speed, pool) {
                Ok(c) => runs.push(c),
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
            }
            eprint!(".");
        }
        eprintln!();
        res.push((n, speed, pool, runs));
    }
    let _ = std::fs::remove_file(&path);
    println!();
    println!("jobs: N concurrent speed-limited jobs in one process (64 MiB tmpfs source, discarding targets)");
    for (n, speed, pool, runs) in &res {
        let how = match pool {
            Some(t) => format!("one WorkerPool of {t} threads"),
            None => format!("own workers ({workers} each)"),
        };
        let med = |f: &dyn Fn(&Cost) -> f64| summary(&runs.iter().map(f).collect::<Vec<_>>());
        let threads = med(&|c| c.threads as f64);
        let rss = med(&|c| c.rss_kib as f64 / 1024.0);
        let growth = med(&|c| c.rss_growth_kib as f64 / 1024.0);
        let cpu = med(&|c| c.cpu * 100.0);
        let sw = med(&|c| c.switches as f64);
        let down = med(&|c| c.teardown);
        let share = med(&|c| c.speed_share * 100.0);
        let per_job = (threads.median - before as f64) / *n as f64;
        let costs = format!(
            "{:.0} threads ({per_job:.1} per job), RSS {:.0} MiB (+{:.0} MiB for the jobs, {:.2} MiB per job), \
             CPU {:.0} % of one core, {:.0} switches/s, copying at {:.0} % of the sum of the limits",
            threads.median,
            rss.median,
            growth.median,
            growth.median / *n as f64,
            cpu.median,
            sw.median,
            share.median
        );
        println!("  {n:>4} jobs at {:>7}/s, {how}: {costs}, cancel + free all {:.2} s", fmt_bytes(*speed), down.median);
        rows.push(Row {
            scenario: format!(
                "{n} concurrent jobs in one process, each at {}/s (64 MiB tmpfs source, discarding targets), {how}",
                fmt_bytes(*speed)
            ),
            cowbackup: costs,
            baseline: format!("{before} thread before the jobs (a process of its own per run)"),
            ratio: format!("cancel + free all: {}", fmt_secs(down)),
            target: String::new(),
        });
    }
    Ok(())
}
