//! Throughput: whole-image backups next to `dd` and `qemu-img convert`, each tool into
//! both kinds of target, so every ratio compares like with like:
//!
//! - **new**: the target does not exist before the copy (dd and qemu-img create it,
//!   cowbackup uses `FileDriver::create`): the copy pays for allocating every block or
//!   page it writes (on tmpfs that costs about as much as the copy itself);
//! - **preallocated**: the target exists with all its space allocated (`fallocate`),
//!   as a disk image or volume being overwritten: dd `conv=notrunc`, `qemu-img convert -n`,
//!   cowbackup `FileDriver::open(path, OpenFlags::WRITE)`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use cowbackup::allocated_bytes;

use crate::util::*;
use crate::{run_cow, Args, CowConf, CowRun};

/// What the target is before the copy starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// No file: the tool creates it (sparse where the tool does so).
    New,
    /// An existing file of the right size with all of its space allocated (`fallocate`).
    Prealloc,
}

impl Target {
    pub const BOTH: [Target; 2] = [Target::New, Target::Prealloc];

    pub fn name(self) -> &'static str {
        match self {
            Target::New => "into a new file",
            Target::Prealloc => "into a preallocated file",
        }
    }

    /// The argument of the `__backup` child.
    pub fn arg(self) -> &'static str {
        match self {
            Target::New => "new",
            Target::Prealloc => "prealloc",
        }
    }

    /// Make `dst` what this kind of target is before a copy (outside the timing).
    pub fn prepare(self, dst: &Path, size: u64) -> Result<(), String> {
        let _ = std::fs::remove_file(dst);
        match self {
            Target::New => Ok(()),
            Target::Prealloc => preallocate(dst, size).map_err(|e| format!("preallocate {}: {e}", dst.display())),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Tool {
    Dd,
    Qemu,
    Cow(CowConf),
}

/// One tool into one kind of target, and its runs.
struct Contender {
    tool: Tool,
    target: Target,
    secs: Vec<f64>,
    rss: u64,
    /// Allocated bytes of the target after the last run.
    alloc: u64,
}

fn run_cmd(cmd: &mut Command) -> Result<f64, String> {
    let t = Instant::now();
    let st = cmd.stdout(Stdio::null()).status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !st.success() {
        return Err(format!("{cmd:?} failed: {st}"));
    }
    Ok(t.elapsed().as_secs_f64())
}

fn run_dd(src: &Path, dst: &Path, target: Target) -> Result<f64, String> {
    let mut c = Command::new("dd");
    c.arg(format!("if={}", src.display())).arg(format!("of={}", dst.display())).arg("bs=1M").arg("status=none");
    c.arg(match target {
        Target::New => "conv=fsync",
        Target::Prealloc => "conv=notrunc,fsync",
    });
    run_cmd(&mut c)
}

fn run_qemu(src: &Path, dst: &Path, target: Target) -> Result<f64, String> {
    let mut c = Command::new("qemu-img");
    c.args(["convert", "-f", "raw", "-O", "raw", "-m", "8", "-W"]);
    if target == Target::Prealloc {
        c.arg("-n");
    }
    c.arg(src).arg(dst);
    run_cmd(&mut c)
}

fn label(tool: Tool) -> &'static str {
    match tool {
        Tool::Dd => "dd",
        Tool::Qemu => "qemu-img",
        Tool::Cow(_) => "cowbackup",
    }
}

/// Run every contender `runs` times, interleaved in an order that rotates from run to
/// run (no contender always runs first after the source was written, or always after
/// another). The first cowbackup backup into each kind of target is verified.
fn measure(a: &Args, dir: &Path, data: Data, mut cs: Vec<Contender>, disk: bool) -> Result<Vec<Contender>, String> {
    let src = dir.join("bench-src.img");
    let dst = dir.join("bench-dst.img");
    make_image(&src, a.size, data).map_err(|e| e.to_string())?;
    let n = cs.len();
    let res = (|| -> Result<(), String> {
        for run in 0..a.runs {
            for k in (0..n).map(|k| (k + run) % n) {
                // The first cowbackup backup into each kind of target is checked.
                let verify = run == 0
                    && matches!(cs[k].tool, Tool::Cow(_))
                    && !cs[..k].iter().any(|o| matches!(o.tool, Tool::Cow(_)) && o.target == cs[k].target);
                let c = &mut cs[k];
                c.target.prepare(&dst, a.size)?;
                if disk {
                    drop_caches();
                }
                match c.tool {
                    Tool::Dd => c.secs.push(run_dd(&src, &dst, c.target)?),
                    Tool::Qemu => c.secs.push(run_qemu(&src, &dst, c.target)?),
                    Tool::Cow(conf) => {
                        let r: CowRun = run_cow(&src, &dst, conf, c.target)?;
                        c.secs.push(r.secs);
                        c.rss = c.rss.max(r.rss);
                        if verify {
                            if let Some(at) = first_difference(&src, &dst).map_err(|e| e.to_string())? {
                                return Err(format!(
                                    "VERIFY FAILED: {} differs from the source at {at}",
                                    dst.display()
                                ));
                            }
                        }
                    }
                }
                c.alloc = allocated_bytes(&dst).unwrap_or(0);
            }
            eprint!(".");
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&dst);
    let _ = std::fs::remove_file(&src);
    res.map(|()| cs)
}

pub fn throughput(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
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
            format!("{} ({warm})", fs_name(&dir))
        } else {
            fs_name(&dir)
        };
        let mut random_secs = [f64::NAN; 2];
        // Sparse sources only on tmpfs: on disk the holes cost no I/O, and the time.
        let datas: &[Data] =
            if disk { &[Data::Random, Data::Zero50] } else { &[Data::Random, Data::Zero50, Data::Sparse] };
        for &data in datas {
            // The other worker and chunk settings only for random data on tmpfs, into
            // preallocated files (where page allocation does not drown the differences).
            let confs_for = |target: Target| -> &[CowConf] {
                if !disk && data == Data::Random && target == Target::Prealloc {
                    &grid
                } else {
                    &grid[..1]
                }
            };
            let mut cs = Vec::new();
            for target in Target::BOTH {
                let confs = confs_for(target);
                let tools = [Tool::Dd, Tool::Qemu].into_iter().chain(confs.iter().map(|c| Tool::Cow(*c)));
                cs.extend(tools.map(|tool| Contender { tool, target, secs: vec![], rss: 0, alloc: 0 }));
            }
            eprint!("throughput: {fs}, {}, {} ", data.name(), fmt_bytes(size));
            let cs = measure(a, &dir, data, cs, disk)?;
            eprintln!();
            for (ti, target) in Target::BOTH.into_iter().enumerate() {
                let find = |t: Tool| cs.iter().find(|c| c.tool == t && c.target == target).expect("contender");
                let (dd, qemu) = (find(Tool::Dd), find(Tool::Qemu));
                let (dds, qs) = (summary(&dd.secs), summary(&qemu.secs));
                for (i, conf) in confs_for(target).iter().enumerate() {
                    let c = find(Tool::Cow(*conf));
                    let s = summary(&c.secs);
                    let (vs_dd, vs_qemu) = (dds.median / s.median, qs.median / s.median);
                    let mut checks = Vec::new();
                    if i == 0 {
                        match (disk, data) {
                            (false, Data::Random) => {
                                checks.push(check(vs_dd >= 2.0, "≥ 2× dd"));
                                checks.push(check(vs_qemu >= 1.0, "≥ 1× qemu-img"));
                                random_secs[ti] = s.median;
                            }
                            (true, Data::Random) => {
                                checks.push(check(vs_dd >= 1.0, "≥ 1× dd"));
                                random_secs[ti] = s.median;
                            }
                            (_, Data::Zero50) => {
                                // A new target stays sparse where the source reads zeroes. A
                                // preallocated one keeps its space: it reads zeroes already
                                // (`fallocate`), so the job skips those clusters rather than
                                // punch holes into what the user reserved.
                                if target == Target::New {
                                    let pct = c.alloc as f64 * 100.0 / size as f64;
                                    checks.push(check(pct <= 51.0, format!("target allocated {pct:.1} % ≤ 51 %")));
                                }
                                let r = s.median / random_secs[ti];
                                checks.push(check(r <= 0.7, format!("time {r:.2}× random ≤ 0.7×")));
                            }
                            _ => {}
                        }
                    }
                    // Issue 26's table (its ratios to dd and qemu-img, defaults, preallocated
                    // targets): the regression check compares ratios, not absolute times.
                    let base = match (disk, data) {
                        (false, Data::Random) => Some((1.30, 1.17)),
                        (false, Data::Zero50) => Some((1.43, 2.82)),
                        (true, Data::Random) => Some((1.00, 1.04)),
                        _ => None,
                    };
                    if let (0, Target::Prealloc, Some((bd, bq))) = (i, target, base) {
                        checks.push(check(
                            vs_dd >= 0.9 * bd && vs_qemu >= 0.9 * bq,
                            format!("no regression: ≥ 90 % of issue 26's {bd:.2}× dd, {bq:.2}× qemu-img"),
                        ));
                    }
                    checks.push(check(c.rss <= 64 * MIB, format!("peak RSS {} MiB", c.rss.div_ceil(MIB))));
                    let alloc = |c: &Contender| format!("(allocated {} MiB)", c.alloc / MIB);
                    rows.push(Row {
                        scenario: format!(
                            "{fs}, {}, {}, {}: {}",
                            data.name(),
                            fmt_bytes(size),
                            target.name(),
                            conf.label()
                        ),
                        cowbackup: if i == 0 {
                            format!("{} {}", fmt_rate(size, s), alloc(c))
                        } else {
                            fmt_rate(size, s)
                        },
                        baseline: if i == 0 {
                            format!(
                                "{}: {} {}; {}: {} {}",
                                label(dd.tool),
                                fmt_rate(size, dds),
                                alloc(dd),
                                label(qemu.tool),
                                fmt_rate(size, qs),
                                alloc(qemu)
                            )
                        } else {
                            "(as above)".into()
                        },
                        ratio: format!("{vs_dd:.2}× dd, {vs_qemu:.2}× qemu-img"),
                        target: checks.join("; "),
                    });
                }
            }
        }
    }
    Ok(())
}
