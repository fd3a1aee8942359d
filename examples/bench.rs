//! The benchmark: cowbackup next to `dd` and `qemu-img convert` on the same files, in
//! one run, printed as one Markdown table.
//!
//! ```text
//! cargo run --release --example bench -- [--size 2G] [--runs 3] [--disk-dir DIR]
//!     [--shm-dir /dev/shm] [--only throughput,offload,hook,guest,qemu-guest,contention,scale] [--grid]
//!     (incremental backups: --only mark,bitmap-guest,group-commit,incremental;
//!     side by side with QEMU 10 on the same images: --only qemu-guest-disk,qemu-incremental;
//!     snapshot view: --only view,fleece,scratch; NBD: --only nbd-server,nbd-client,tls;
//!     manifests: --only manifest; many jobs: --only jobs)
//!     [--no-disk] [--scale-size 1T] [--extra-dir DIR]...
//! ```
//!
//! Throughput runs every tool into a new file and into a preallocated one, so each
//! ratio compares like with like (see `bench/throughput.rs`); `offload` measures the
//! copy primitive (`copy_file_range` against read + write) per filesystem.
//!
//! Every figure is the median of `--runs` runs (min–max in brackets), next to its
//! baseline measured in the same invocation, interleaved run by run. Every cowbackup
//! backup runs in a child process (this binary, hidden subcommand `__backup`) that
//! reports its time and peak RSS (`VmHWM`). Images are created in the tmpfs and disk
//! directories and removed afterwards.

#[path = "bench/guest.rs"]
mod guest;
#[path = "bench/incremental.rs"]
mod incremental;
#[path = "bench/jobs.rs"]
mod jobs;
#[path = "bench/latency.rs"]
mod latency;
#[path = "bench/manifest.rs"]
mod manifest;
#[path = "bench/nbd.rs"]
mod nbd;
#[path = "bench/offload.rs"]
mod offload;
#[path = "bench/qemu_guest.rs"]
mod qemu_guest;
#[path = "bench/qemu_incremental.rs"]
mod qemu_incremental;
#[path = "bench/qsd.rs"]
mod qsd;
#[path = "bench/throughput.rs"]
mod throughput;
#[path = "bench/util.rs"]
mod util;
#[path = "bench/view.rs"]
mod view;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Instant;

use cowbackup::{backup_start, BackupOptions, FileDriver, JobState, OpenFlags, SyncMode};
use throughput::Target;
use util::*;

pub struct Args {
    pub size: u64,
    pub runs: usize,
    pub shm_dir: PathBuf,
    pub disk_dir: PathBuf,
    pub disk: bool,
    pub only: Vec<String>,
    pub grid: bool,
    pub scale_size: u64,
    /// More directories (other filesystems) for the `offload` scenario.
    pub extra_dirs: Vec<PathBuf>,
}

impl Args {
    fn wants(&self, what: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == what)
    }
}

fn usage() -> &'static str {
    "usage: bench [--size 2G] [--runs 3] [--shm-dir /dev/shm] [--disk-dir /var/tmp/cowbackup-bench]\n\
     \x20            [--no-disk] [--only throughput,offload,hook,guest,qemu-guest,contention,scale] [--grid]\n\
     \x20            [--scale-size 1T] [--extra-dir DIR]...\n\
     throughput: dd, qemu-img convert and cowbackup, each into a new file and into a preallocated one\n\
     offload: copy_file_range against read + write, 1 MiB requests, on tmpfs, the disk directory\n\
     \x20        (source cached, then cold) and every --extra-dir (cold; e.g. an XFS or Btrfs mount)\n\
     --grid: throughput of every workers {1,2,4} x max_chunk {64K,1M,4M} on tmpfs random data,\n\
     \x20       into preallocated files\n\
     qemu-guest: guest writes over NBD during a full backup by QEMU (qemu-storage-daemon blockdev-backup,\n\
     \x20           64 workers and x-perf max-workers 1) and by cowbackup (nbd::Server, defaults and cow_buffer\n\
     \x20           16 MiB); BENCH_GUEST_THREADS (default 1,4), BENCH_QSD (the daemon's path)\n\
     qemu-guest-disk: qemu-guest on the disk directory only, plus the disk's floor in the same run (QD1\n\
     \x20           64 KiB writes over NBD, each after a cold pread of the old 64 KiB, no backup): cowbackup's\n\
     \x20           p99 / floor (goal <= 3x), speed (>= 50 %), and `ratio vs QEMU: X.XX` lines; and the\n\
     \x20           loaded floor: the same writes while a plain copier (no copy-before-write) copies the\n\
     \x20           source at half of cowbackup cow_buffer's unloaded speed; BENCH_FLOOR_ALIGN=65536: both floors\n\
     \x20           read the 64 KiB clusters a write touches (what the hook reads) instead of its 64 KiB\n\
     qemu-incremental: sync=bitmap incrementals (1 % and 10 % scattered, 10 % in 1 MiB runs of 64 KiB\n\
     \x20           granules) into preallocated targets on disk (cold) and tmpfs: QEMU (qemu-storage-daemon,\n\
     \x20           bitmap dirtied over NBD), cowbackup (BENCH_INCR_WORKERS: a second row) and pread+pwrite\n\
     \x20           with BENCH_PLAIN_THREADS threads (default 2,16); ends with `ratio vs QEMU: X.XX`\n\
     incremental backups: --only mark,bitmap-guest,group-commit,incremental\n\
     snapshot view: --only view,fleece,scratch\n\
     manifests: --only manifest (full backup with vs without a manifest, verify vs b3sum/sha256sum,\n\
     \x20          restore of full + 3 incrementals through the chain vs qemu-img convert of a qcow2 chain)\n\
     many jobs: --only jobs (64 jobs at 16 MiB/s, 1000 at 1 MiB/s in one process: threads, RSS, CPU)\n\
     NBD: --only nbd-server (nbdcopy from nbd::Server vs from qemu-nbd),\n\
     \x20    nbd-client (backup through the NBD client into qemu-nbd vs qemu-img convert into it)\n\
     \x20    tls (nbdcopy from nbd::Server over TLS vs plaintext, qemu-nbd --tls-creds alongside)\n\
     \x20       (default: the default options, plus workers 1 and 4, max_chunk 64K and 4M)"
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        size: 2 * GIB,
        runs: 3,
        shm_dir: PathBuf::from("/dev/shm"),
        disk_dir: PathBuf::from("/var/tmp/cowbackup-bench"),
        disk: true,
        only: Vec::new(),
        grid: false,
        scale_size: 1 << 40,
        extra_dirs: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--size" => a.size = parse_size(&val()?)?,
            "--runs" => a.runs = val()?.parse().map_err(|_| "bad --runs".to_string())?,
            "--shm-dir" => a.shm_dir = PathBuf::from(val()?),
            "--disk-dir" => a.disk_dir = PathBuf::from(val()?),
            "--no-disk" => a.disk = false,
            "--only" => a.only = val()?.split(',').map(str::to_string).collect(),
            "--grid" => a.grid = true,
            "--scale-size" => a.scale_size = parse_size(&val()?)?,
            "--extra-dir" => a.extra_dirs.push(PathBuf::from(val()?)),
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {arg}\n{}", usage())),
        }
    }
    if a.size < 64 * MIB || a.size % MIB != 0 {
        return Err("--size must be a multiple of 1M, at least 64M".into());
    }
    if a.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    Ok(a)
}

/// What a cowbackup backup is asked to do (in the child process).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CowConf {
    pub workers: usize,
    pub chunk: u64,
    pub sync: SyncMode,
}

impl CowConf {
    pub fn default_opts() -> CowConf {
        let d = BackupOptions::default();
        CowConf { workers: d.workers, chunk: d.max_chunk, sync: SyncMode::Full }
    }
    fn label(&self) -> String {
        let d = BackupOptions::default();
        let def = if self.workers == d.workers && self.chunk == d.max_chunk { ", defaults" } else { "" };
        format!("workers {}, max_chunk {}{def}", self.workers, fmt_bytes(self.chunk))
    }
}

/// What the child reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct CowRun {
    pub secs: f64,
    pub rss: u64,
    pub copied: u64,
    pub zero: u64,
    pub skipped: u64,
}

/// The hidden subcommand: `__backup SRC DST WORKERS CHUNK full|top new|prealloc`. Backs
/// up SRC into DST (`new`: created as a sparse file, it must not exist; `prealloc`: an
/// existing file of the same size, opened for writing) and prints `secs rss copied zero
/// skipped`.
fn child_backup(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let [src, dst, workers, chunk, sync, target] = args else { return Err("bad __backup arguments".into()) };
    let t = Instant::now();
    let source = Arc::new(FileDriver::open(src, OpenFlags::empty())?);
    let target = Arc::new(match target.as_str() {
        "new" => FileDriver::create(dst, cowbackup::BlockDriver::size(&*source))?,
        "prealloc" => FileDriver::open(dst, OpenFlags::WRITE)?,
        t => return Err(format!("bad __backup target kind {t:?}").into()),
    });
    let opts = BackupOptions {
        workers: workers.parse()?,
        max_chunk: chunk.parse()?,
        sync: if sync == "top" { SyncMode::Top } else { SyncMode::Full },
        ..Default::default()
    };
    let job = backup_start(source, target, opts)?;
    job.wait()?;
    let secs = t.elapsed().as_secs_f64();
    let i = job.info();
    assert_eq!(i.state, JobState::Completed);
    println!("{secs} {} {} {} {}", peak_rss(), i.bytes_copied, i.bytes_zero, i.bytes_skipped);
    Ok(())
}

/// One cowbackup backup in a child process; `dst` is as `target` wants it (see
/// [`Target::prepare`]).
pub fn run_cow(src: &Path, dst: &Path, c: CowConf, target: Target) -> Result<CowRun, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let sync = if c.sync == SyncMode::Top { "top" } else { "full" };
    let out = Command::new(exe)
        .arg("__backup")
        .arg(src)
        .arg(dst)
        .arg(c.workers.to_string())
        .arg(c.chunk.to_string())
        .arg(sync)
        .arg(target.arg())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("backup child failed: {}", out.status));
    }
    let s = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = s.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    if v.len() != 5 {
        return Err(format!("bad child output {s:?}"));
    }
    Ok(CowRun { secs: v[0], rss: v[1] as u64, copied: v[2] as u64, zero: v[3] as u64, skipped: v[4] as u64 })
}

fn scale(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    let dir = if a.disk { a.disk_dir.clone() } else { a.shm_dir.clone() };
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let where_ = if a.disk { "disk" } else { "tmpfs" };
    let (big, small) = (dir.join("bench-1t.img"), dir.join("bench-1g.img"));
    let dst = dir.join("bench-scale-dst.img");
    eprint!("scale: {} sparse with 1 GiB data, and a 1 GiB full image ", fmt_bytes(a.scale_size));
    make_sparse_spread(&big, a.scale_size, GIB).map_err(|e| e.to_string())?;
    make_image(&small, GIB, Data::Random).map_err(|e| e.to_string())?;
    let def = CowConf::default_opts();
    let (mut t_small, mut t_top, mut t_full) = (vec![], vec![], vec![]);
    let (mut r_small, mut r_top, mut r_full) = (0, 0, 0);
    let cold = || if a.disk { drop_caches() } else { true };
    let mut res = Ok(());
    for _ in 0..a.runs {
        let go = |src: &Path, sync: SyncMode, t: &mut Vec<f64>, r: &mut u64| -> Result<(), String> {
            let _ = std::fs::remove_file(&dst);
            cold();
            let run = run_cow(src, &dst, CowConf { sync, ..def }, Target::New)?;
            t.push(run.secs);
            *r = (*r).max(run.rss);
            Ok(())
        };
        res = go(&small, SyncMode::Full, &mut t_small, &mut r_small)
            .and_then(|_| go(&big, SyncMode::Top, &mut t_top, &mut r_top))
            .and_then(|_| go(&big, SyncMode::Full, &mut t_full, &mut r_full));
        if res.is_err() {
            break;
        }
        eprint!(".");
    }
    eprintln!();
    if res.is_ok() {
        // The last 1 TiB Full backup is still there: check it.
        res = match first_difference(&big, &dst) {
            Ok(None) => Ok(()),
            Ok(Some(at)) => Err(format!("VERIFY FAILED: 1 TiB backup differs at {at}")),
            Err(e) => Err(e.to_string()),
        };
    }
    for p in [&big, &small, &dst] {
        let _ = std::fs::remove_file(p);
    }
    res?;
    let (s, top, full) = (summary(&t_small), summary(&t_top), summary(&t_full));
    let big_s = fmt_bytes(a.scale_size);
    rows.push(Row {
        scenario: format!("scale ({where_}): {big_s} sparse, 1 GiB data, sync=Top"),
        cowbackup: format!("{}, peak RSS {} MiB", fmt_secs(top), r_top.div_ceil(MIB)),
        baseline: format!("1 GiB full image, sync=Full: {}, peak RSS {} MiB", fmt_secs(s), r_small.div_ceil(MIB)),
        ratio: format!("{:.2}× the time", top.median / s.median),
        target: format!(
            "{}; {}",
            check(top.median <= 1.5 * s.median, "≤ 1.5× the 1 GiB time"),
            check(r_top.max(r_small) <= 64 * MIB, "RSS ≤ 64 MiB")
        ),
    });
    rows.push(Row {
        scenario: format!("scale ({where_}): {big_s} sparse, 1 GiB data, sync=Full into a sparse target"),
        cowbackup: format!("{}, peak RSS {} MiB", fmt_secs(full), r_full.div_ceil(MIB)),
        baseline: "(as above)".into(),
        ratio: format!("{:.2}× the time", full.median / s.median),
        target: check(r_full <= 64 * MIB, "RSS ≤ 64 MiB"),
    });
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    // The hidden subcommands: one measurement in a child process of its own.
    type Child = fn(&[String]) -> Result<(), Box<dyn std::error::Error>>;
    let children: [(&str, Child); 4] = [
        ("__incr", incremental::child_incr),
        ("__qincr", qemu_incremental::child_qincr),
        ("__jobs", jobs::child_jobs),
        ("__backup", child_backup),
    ];
    if let Some((name, child)) = children.iter().find(|c| argv.get(1).map(String::as_str) == Some(c.0)) {
        return match child(&argv[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench {name}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let load_start = loadavg();
    let mut rows = Vec::new();
    let mut failed = false;
    type Step = fn(&Args, &mut Vec<Row>) -> Result<(), String>;
    let steps: [(&str, Step); 21] = [
        ("throughput", throughput::throughput),
        ("offload", offload::offload),
        ("hook", latency::hook),
        ("guest", guest::guest),
        ("qemu-guest", qemu_guest::qemu_guest),
        ("qemu-guest-disk", qemu_guest::qemu_guest_disk),
        ("contention", latency::contention),
        ("scale", scale),
        ("mark", incremental::mark),
        ("bitmap-guest", incremental::guest),
        ("group-commit", incremental::group_commit),
        ("incremental", incremental::incremental),
        ("qemu-incremental", qemu_incremental::qemu_incremental),
        ("view", view::view_read),
        ("fleece", view::fleece_latency),
        ("scratch", view::scratch_peak),
        ("nbd-server", nbd::server),
        ("nbd-client", nbd::client),
        ("tls", nbd::tls),
        ("manifest", manifest::manifest),
        ("jobs", jobs::jobs),
    ];
    for (name, step) in steps {
        if a.wants(name) {
            let t = Instant::now();
            if let Err(e) = step(&a, &mut rows) {
                eprintln!("bench: {name}: {e}");
                failed = true;
            }
            eprintln!("{name}: {:.0} s", t.elapsed().as_secs_f64());
        }
    }
    println!();
    println!(
        "cowbackup {} bench: {} runs per figure, median (min–max); load average {load_start} at start, {} at end; {:.0} s",
        env!("CARGO_PKG_VERSION"),
        a.runs,
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    println!();
    print_table(&rows);
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
