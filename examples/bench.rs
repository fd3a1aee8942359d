//! The benchmark: cowbackup next to `dd` and `qemu-img convert` on the same files, in
//! one run, printed as one Markdown table.
//!
//! ```text
//! cargo run --release --example bench -- [--size 2G] [--runs 3] [--disk-dir DIR]
//!     [--shm-dir /dev/shm] [--only throughput,hook,guest,scale,contention] [--grid]
//!     (incremental backups: --only mark,bitmap-guest,group-commit,incremental;
//!     snapshot view: --only view,fleece,scratch)
//!     [--no-disk] [--scale-size 1T]
//! ```
//!
//! Every figure is the median of `--runs` runs (min–max in brackets), next to its
//! baseline measured in the same invocation, interleaved run by run. Every cowbackup
//! backup runs in a child process (this binary, hidden subcommand `__backup`) that
//! reports its time and peak RSS (`VmHWM`). Images are created in the tmpfs and disk
//! directories and removed afterwards.

#[path = "bench/incremental.rs"]
mod incremental;
#[path = "bench/latency.rs"]
mod latency;
#[path = "bench/util.rs"]
mod util;
#[path = "bench/view.rs"]
mod view;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Instant;

use cowbackup::{allocated_bytes, backup_start, BackupOptions, FileDriver, JobState, OpenFlags, SyncMode};
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
}

impl Args {
    fn wants(&self, what: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == what)
    }
}

fn usage() -> &'static str {
    "usage: bench [--size 2G] [--runs 3] [--shm-dir /dev/shm] [--disk-dir /var/tmp/cowbackup-bench]\n\
     \x20            [--no-disk] [--only throughput,hook,guest,scale,contention] [--grid] [--scale-size 1T]\n\
     \x20            incremental backups: --only mark,bitmap-guest,group-commit,incremental\n\
     \x20            snapshot view: --only view,fleece,scratch\n\
     --grid: throughput of every workers {1,2,4} x max_chunk {64K,1M,4M} on tmpfs random data\n\
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
#[derive(Clone, Copy, Debug)]
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

/// The hidden subcommand: `__backup SRC DST WORKERS CHUNK full|top`. Backs up SRC into
/// a new sparse DST and prints `secs rss copied zero skipped`.
fn child_backup(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let [src, dst, workers, chunk, sync] = args else { return Err("bad __backup arguments".into()) };
    let t = Instant::now();
    let source = Arc::new(FileDriver::open(src, OpenFlags::empty())?);
    let target = Arc::new(FileDriver::create(dst, cowbackup::BlockDriver::size(&*source))?);
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

pub fn run_cow(src: &Path, dst: &Path, c: CowConf) -> Result<CowRun, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let sync = if c.sync == SyncMode::Top { "top" } else { "full" };
    let out = Command::new(exe)
        .arg("__backup")
        .arg(src)
        .arg(dst)
        .arg(c.workers.to_string())
        .arg(c.chunk.to_string())
        .arg(sync)
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

fn run_cmd(cmd: &mut Command) -> Result<f64, String> {
    let t = Instant::now();
    let st = cmd.stdout(Stdio::null()).status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !st.success() {
        return Err(format!("{cmd:?} failed: {st}"));
    }
    Ok(t.elapsed().as_secs_f64())
}

fn run_dd(src: &Path, dst: &Path) -> Result<f64, String> {
    let _ = std::fs::remove_file(dst);
    let mut c = Command::new("dd");
    c.arg(format!("if={}", src.display())).arg(format!("of={}", dst.display())).args([
        "bs=1M",
        "conv=fsync",
        "status=none",
    ]);
    run_cmd(&mut c)
}

fn run_qemu(src: &Path, dst: &Path, size: u64) -> Result<f64, String> {
    let _ = std::fs::remove_file(dst);
    let f = std::fs::File::create(dst).map_err(|e| e.to_string())?;
    f.set_len(size).map_err(|e| e.to_string())?;
    drop(f);
    let mut c = Command::new("qemu-img");
    c.args(["convert", "-n", "-f", "raw", "-O", "raw", "-m", "8", "-W"]).arg(src).arg(dst);
    run_cmd(&mut c)
}

struct Sets {
    dd: Vec<f64>,
    qemu: Vec<f64>,
    cow: Vec<(CowConf, Vec<CowRun>)>,
    alloc_dd: u64,
    alloc_qemu: u64,
    alloc_cow: u64,
}

/// Run dd, qemu-img and every cowbackup configuration `runs` times, interleaved.
fn measure(a: &Args, dir: &Path, data: Data, confs: &[CowConf], disk: bool) -> Result<Sets, String> {
    let src = dir.join("bench-src.img");
    let dst = dir.join("bench-dst.img");
    make_image(&src, a.size, data).map_err(|e| e.to_string())?;
    let mut s = Sets {
        dd: vec![],
        qemu: vec![],
        cow: confs.iter().map(|c| (*c, vec![])).collect(),
        alloc_dd: 0,
        alloc_qemu: 0,
        alloc_cow: 0,
    };
    let cold = || if disk { drop_caches() } else { true };
    let alloc = |p: &Path| allocated_bytes(p).unwrap_or(0);
    // Contender k of n: 0 = dd, 1 = qemu-img, 2.. = the cowbackup configurations. The
    // order rotates from run to run, so no contender always runs first (after the
    // source was written) or always follows another.
    let n = 2 + confs.len();
    for run in 0..a.runs {
        for k in (0..n).map(|k| (k + run) % n) {
            let _ = std::fs::remove_file(&dst);
            cold();
            match k {
                0 => {
                    s.dd.push(run_dd(&src, &dst)?);
                    s.alloc_dd = alloc(&dst);
                }
                1 => {
                    s.qemu.push(run_qemu(&src, &dst, a.size)?);
                    s.alloc_qemu = alloc(&dst);
                }
                _ => {
                    let (c, v) = &mut s.cow[k - 2];
                    v.push(run_cow(&src, &dst, *c)?);
                    if k == 2 {
                        s.alloc_cow = alloc(&dst);
                        if run == 0 {
                            if let Some(at) = first_difference(&src, &dst).map_err(|e| e.to_string())? {
                                return Err(format!(
                                    "VERIFY FAILED: {} differs from the source at {at}",
                                    dst.display()
                                ));
                            }
                        }
                    }
                }
            }
        }
        eprint!(".");
    }
    let _ = std::fs::remove_file(&dst);
    let _ = std::fs::remove_file(&src);
    Ok(s)
}

fn throughput(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    let def = CowConf::default_opts();
    let mut grid = vec![def];
    let mut push = |c: CowConf| {
        if !grid.iter().any(|g| g.workers == c.workers && g.chunk == c.chunk) {
            grid.push(c)
        }
    };
    if a.grid {
        for w in [1, 2, 4] {
            for ch in [64 * KIB, MIB, 4 * MIB] {
                push(CowConf { workers: w, chunk: ch, ..def });
            }
        }
    } else {
        push(CowConf { workers: 1, ..def });
        push(CowConf { workers: 4, ..def });
        push(CowConf { chunk: 64 * KIB, ..def });
        push(CowConf { chunk: 4 * MIB, ..def });
    }
    let mut places = vec![(a.shm_dir.clone(), false)];
    if a.disk {
        std::fs::create_dir_all(&a.disk_dir).map_err(|e| format!("{}: {e}", a.disk_dir.display()))?;
        places.push((a.disk_dir.clone(), true));
    }
    let size = a.size;
    for (dir, disk) in places {
        let fs = if disk {
            let warm = if drop_caches() { "cold cache" } else { "WARM cache: cannot drop caches" };
            format!("disk ({warm})")
        } else {
            "tmpfs".to_string()
        };
        let mut random_secs = f64::NAN;
        for data in [Data::Random, Data::Zero50, Data::Sparse] {
            // The grid only for random data on tmpfs; elsewhere the defaults.
            let confs: &[CowConf] = if !disk && data == Data::Random { &grid } else { &grid[..1] };
            eprint!("throughput: {fs}, {}, {} ", data.name(), fmt_bytes(size));
            let s = measure(a, &dir, data, confs, disk)?;
            eprintln!();
            let dd = summary(&s.dd);
            let qemu = summary(&s.qemu);
            for (i, (c, runs)) in s.cow.iter().enumerate() {
                let secs: Vec<f64> = runs.iter().map(|r| r.secs).collect();
                let cs = summary(&secs);
                let rss = runs.iter().map(|r| r.rss).max().unwrap_or(0);
                let vs_dd = dd.median / cs.median;
                let vs_qemu = qemu.median / cs.median;
                let mut target = Vec::new();
                if i == 0 {
                    match (disk, data) {
                        (false, Data::Random) => {
                            target.push(check(vs_dd >= 2.0, "≥ 2× dd"));
                            target.push(check(vs_qemu >= 1.0, "≥ 1× qemu-img"));
                            random_secs = cs.median;
                        }
                        (true, Data::Random) => {
                            target.push(check(vs_dd >= 1.0, "≥ 1× dd"));
                            random_secs = cs.median;
                        }
                        (_, Data::Zero50) => {
                            let pct = s.alloc_cow as f64 * 100.0 / size as f64;
                            target.push(check(pct <= 51.0, format!("target allocated {pct:.1} % ≤ 51 %")));
                            let r = cs.median / random_secs;
                            target.push(check(r <= 0.7, format!("time {r:.2}× random ≤ 0.7×")));
                        }
                        _ => {}
                    }
                }
                target.push(check(rss <= 64 * MIB, format!("peak RSS {} MiB", rss.div_ceil(MIB))));
                let (ad, aq, ac) = (s.alloc_dd / MIB, s.alloc_qemu / MIB, s.alloc_cow / MIB);
                rows.push(Row {
                    scenario: format!("{fs}, {}, {}: {}", data.name(), fmt_bytes(size), c.label()),
                    cowbackup: if i == 0 {
                        format!("{} (allocated {ac} MiB)", fmt_rate(size, cs))
                    } else {
                        fmt_rate(size, cs)
                    },
                    baseline: if i == 0 {
                        format!(
                            "dd: {} (allocated {ad} MiB); qemu-img: {} (allocated {aq} MiB)",
                            fmt_rate(size, dd),
                            fmt_rate(size, qemu)
                        )
                    } else {
                        "(as above)".into()
                    },
                    ratio: format!("{vs_dd:.2}× dd, {vs_qemu:.2}× qemu-img"),
                    target: target.join("; "),
                });
            }
        }
    }
    Ok(())
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
            let run = run_cow(src, &dst, CowConf { sync, ..def })?;
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
    if argv.get(1).map(String::as_str) == Some("__incr") {
        return match incremental::child_incr(&argv[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench __incr: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if argv.get(1).map(String::as_str) == Some("__backup") {
        return match child_backup(&argv[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench __backup: {e}");
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
    let steps: [(&str, Step); 12] = [
        ("throughput", throughput),
        ("hook", latency::hook),
        ("guest", latency::guest),
        ("contention", latency::contention),
        ("scale", scale),
        ("mark", incremental::mark),
        ("bitmap-guest", incremental::guest),
        ("group-commit", incremental::group_commit),
        ("incremental", incremental::incremental),
        ("view", view::view_read),
        ("fleece", view::fleece_latency),
        ("scratch", view::scratch_peak),
    ];
    for (name, step) in steps {
        if a.wants(name) {
            if let Err(e) = step(&a, &mut rows) {
                eprintln!("bench: {name}: {e}");
                failed = true;
            }
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
