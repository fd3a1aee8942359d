//! Incremental backups side by side with QEMU's `sync=bitmap` backup job (issue 26,
//! `--only qemu-incremental`). On the disk directory (page cache dropped before every
//! copy) and on tmpfs: a `--size` random image and three dirty sets of 64 KiB granules,
//! 1 % scattered, 10 % scattered and 10 % in runs of 1 MiB (16 granules, the runs'
//! starts scattered, aligned to 1 MiB). Per set, the contenders take turns, the order
//! rotating from run to run, each into a preallocated target (`fallocate` of the whole
//! size, its blocks punched and allocated again before every run so that every run
//! writes into unwritten extents):
//!
//! - **QEMU** through `qemu-storage-daemon` (`--blockdev` file + raw nodes `src` and
//!   `tgt`, a writable NBD export of `src`, QMP on a Unix socket: see [`qsd_args`]). Per
//!   set: `block-dirty-bitmap-add {"node": "src", "name": "b0", "granularity": 65536}`,
//!   then the set is written through the NBD export with fresh random data (so QEMU's
//!   bitmap holds exactly those granules; checked with `query-named-block-nodes`), and
//!   per run `blockdev-backup {"job-id": "bk", "device": "src", "target": "tgt", "sync":
//!   "bitmap", "bitmap": "b0", "bitmap-mode": "never"}` (the bitmap stays for the next
//!   run), timed from the command to `BLOCK_JOB_COMPLETED` plus an `fdatasync` of the
//!   target. After the set: `block-dirty-bitmap-remove`.
//! - **cowbackup** in a child process (this binary, hidden subcommand `__qincr`):
//!   `SyncMode::Bitmap`, `BitmapMode::Never`, an in-memory `DirtyBitmap` marked with the
//!   same granules before the clock starts, default options (and a second row with
//!   `workers` from `BENCH_INCR_WORKERS`, if set), the target opened with
//!   `FileDriver::open(dst, OpenFlags::WRITE)`.
//! - **plain copier**: the same granules, adjacent ones merged into requests of at most
//!   1 MiB, `pread` + `pwrite` by T threads taking requests from a shared counter (QD1
//!   each), then `fdatasync`; T = 2 and 16, or the list in `BENCH_PLAIN_THREADS`.
//!
//! The data is the same for all: it is the same source file, written once per set
//! through QEMU's export. Run 0 of QEMU, cowbackup and the plain copier is checked
//! granule by granule against the source. Each scenario ends with the lines
//! `ratio vs best plain copier: X.XX` (best plain median / cowbackup's; goal ≥ 0.91, i.e.
//! cowbackup ≤ 1.1× the best plain time) and `ratio vs QEMU: X.XX` (QEMU's median /
//! cowbackup's; > 1: cowbackup is faster; goal ≥ 1.0 on disk). On tmpfs the step also
//! times a full backup of the image (defaults, preallocated target) and checks the old
//! incremental budget: cowbackup ≤ 1.5 × (dirty share × full time + 50 ms).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use cowbackup::{
    backup_start, BackupOptions, BitmapMode, BlockDriver, DirtyBitmap, FileDriver, JobState, NbdDriver, NbdOptions,
    OpenFlags, SyncMode,
};

use crate::incremental::shuffled;
use crate::qsd::*;
use crate::throughput::Target;
use crate::util::*;
use crate::{run_cow, Args, CowConf};

/// The granularity of both bitmaps (QEMU's `b0` and cowbackup's).
const G: u64 = 64 * KIB;
/// The length of a run of the "runs" set.
const RUN: u64 = MIB;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A dirty set: which granules of the image are dirty.
#[derive(Clone, Copy, Debug, PartialEq)]
enum DirtySet {
    /// This many parts per million of the granules, each alone at a random place.
    Scattered(u64),
    /// This many parts per million of the granules, in runs of 1 MiB (16 granules) whose
    /// starts are random and aligned to 1 MiB.
    Runs(u64),
}

impl DirtySet {
    const ALL: [DirtySet; 3] = [DirtySet::Scattered(10_000), DirtySet::Scattered(100_000), DirtySet::Runs(100_000)];

    fn label(self) -> String {
        match self {
            DirtySet::Scattered(p) => format!("{} % scattered", p / 10_000),
            DirtySet::Runs(p) => format!("{} % in runs of 1 MiB", p / 10_000),
        }
    }

    /// The argument of `__qincr`: "s10000", "r100000".
    fn arg(self) -> String {
        match self {
            DirtySet::Scattered(p) => format!("s{p}"),
            DirtySet::Runs(p) => format!("r{p}"),
        }
    }

    fn parse(s: &str) -> Result<DirtySet, String> {
        let bad = || format!("bad dirty set {s:?}");
        let ppm = |v: &str| v.parse::<u64>().ok().filter(|&p| p > 0 && p <= 1_000_000).ok_or_else(bad);
        if let Some(v) = s.strip_prefix('s') {
            Ok(DirtySet::Scattered(ppm(v)?))
        } else if let Some(v) = s.strip_prefix('r') {
            Ok(DirtySet::Runs(ppm(v)?))
        } else {
            Err(bad())
        }
    }

    /// The seed of this set's granules (and of the data written into them).
    fn seed(self) -> u64 {
        match self {
            DirtySet::Scattered(p) => 0x5ca7 + p,
            DirtySet::Runs(p) => 0x7275 + p,
        }
    }

    /// The dirty granules of an image of `size` bytes, sorted; the same on every call.
    fn granules(self, size: u64) -> Vec<u64> {
        let n = size / G;
        let mut v = match self {
            DirtySet::Scattered(ppm) => {
                let mut v = shuffled(n, self.seed());
                v.truncate((n * ppm / 1_000_000).max(1) as usize);
                v
            }
            DirtySet::Runs(ppm) => {
                let per = RUN / G;
                let runs = (n * ppm / 1_000_000 / per).max(1) as usize;
                let mut starts = shuffled(size / RUN, self.seed());
                starts.truncate(runs);
                starts.iter().flat_map(|&r| (0..per).map(move |k| r * per + k)).collect()
            }
        };
        v.sort_unstable();
        v
    }
}

/// Sorted granules as byte ranges `(offset, len)`: adjacent granules merged, each range
/// at most `max` bytes.
fn extents(granules: &[u64], max: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &g in granules {
        match out.last_mut() {
            Some((o, l)) if *o + *l == g * G && *l + G <= max => *l += G,
            _ => out.push((g * G, G)),
        }
    }
    out
}

/// The hidden subcommand `__qincr SRC DST SET WORKERS`: an incremental backup of SRC into
/// the existing (preallocated) DST with a bitmap of the dirty set SET (see
/// [`DirtySet::arg`]), mode Never, WORKERS workers (0: the default). The bitmap is set
/// up before the clock starts. Prints `secs rss copied+zero`.
pub fn child_qincr(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let [src, dst, set, workers] = args else { return Err("bad __qincr arguments".into()) };
    let set = DirtySet::parse(set)?;
    let workers: usize = workers.parse()?;
    let size = std::fs::metadata(src)?.len();
    let bm = DirtyBitmap::new(size, G)?;
    for g in set.granules(size) {
        bm.mark(g * G, G)?;
    }
    let t = Instant::now();
    let source = Arc::new(FileDriver::open(src, OpenFlags::empty())?);
    let target = Arc::new(FileDriver::open(dst, OpenFlags::WRITE)?);
    let mut opts = BackupOptions {
        sync: SyncMode::Bitmap,
        bitmap: Some(bm),
        bitmap_mode: BitmapMode::Never,
        ..Default::default()
    };
    if workers > 0 {
        opts.workers = workers;
    }
    let job = backup_start(source, target, opts)?;
    job.wait()?;
    let secs = t.elapsed().as_secs_f64();
    let i = job.info();
    if i.state != JobState::Completed {
        return Err(format!("the job ended {:?}", i.state).into());
    }
    println!("{secs} {} {}", peak_rss(), i.bytes_copied + i.bytes_zero);
    Ok(())
}

/// One cowbackup incremental in a child process: seconds and bytes copied (data + zero).
fn run_child(src: &Path, dst: &Path, set: DirtySet, workers: usize) -> Result<(f64, u64), String> {
    let exe = std::env::current_exe().map_err(err)?;
    let out = Command::new(exe)
        .arg("__qincr")
        .arg(src)
        .arg(dst)
        .arg(set.arg())
        .arg(workers.to_string())
        .stderr(Stdio::inherit())
        .output()
        .map_err(err)?;
    if !out.status.success() {
        return Err(format!("__qincr child failed: {}", out.status));
    }
    let s = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = s.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    if v.len() != 3 {
        return Err(format!("bad __qincr output {s:?}"));
    }
    Ok((v[0], v[2] as u64))
}

/// The plain copier: `exts` from `src` to the existing `dst` by `pread` + `pwrite`,
/// `threads` threads taking the next extent from a shared counter, then `fdatasync`.
/// Seconds, from opening the files to the end of the `fdatasync`.
fn run_plain(src: &Path, dst: &Path, exts: &[(u64, u64)], threads: usize) -> Result<f64, String> {
    let t = Instant::now();
    let s = File::open(src).map_err(err)?;
    let d = OpenOptions::new().write(true).open(dst).map_err(err)?;
    let next = AtomicUsize::new(0);
    thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                let (s, d, next) = (&s, &d, &next);
                sc.spawn(move || -> Result<(), String> {
                    let mut buf = vec![0u8; RUN as usize];
                    while let Some(&(off, len)) = exts.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let b = &mut buf[..len as usize];
                        s.read_exact_at(b, off).map_err(err)?;
                        d.write_all_at(b, off).map_err(err)?;
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter().try_for_each(|h| h.join().map_err(|_| "copy thread panicked".to_string())?)
    })?;
    d.sync_data().map_err(err)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Give the existing file `path` of `size` bytes fresh preallocated blocks: punch them
/// all, then `fallocate` (mode 0) again and `fsync`. Same inode, so a daemon that holds it
/// open sees the change.
fn reallocate(path: &Path, size: u64) -> Result<(), String> {
    use std::os::unix::io::AsRawFd;
    let f = OpenOptions::new().write(true).open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let fd = f.as_raw_fd();
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor we own.
    if unsafe { libc::fallocate(fd, mode, 0, size as libc::off_t) } < 0 {
        return Err(format!("punching {}: {}", path.display(), std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::fallocate(fd, 0, 0, size as libc::off_t) } < 0 {
        return Err(format!("fallocate {}: {}", path.display(), std::io::Error::last_os_error()));
    }
    f.sync_all().map_err(err)
}

/// Check that `dst` holds `src`'s data in every granule of `granules`.
fn verify_granules(src: &Path, dst: &Path, granules: &[u64], who: &str) -> Result<(), String> {
    let (s, d) = (File::open(src).map_err(err)?, File::open(dst).map_err(err)?);
    let (mut a, mut b) = (vec![0u8; G as usize], vec![0u8; G as usize]);
    for &g in granules {
        s.read_exact_at(&mut a, g * G).map_err(err)?;
        d.read_exact_at(&mut b, g * G).map_err(err)?;
        if a != b {
            return Err(format!("VERIFY FAILED: {who}'s incremental differs from the source in granule {g}"));
        }
    }
    Ok(())
}

/// The `count` of the dirty bitmap `name` in a `query-named-block-nodes` answer.
fn bitmap_count(q: &mut Qmp, name: &str) -> Result<u64, String> {
    let ans = q.execute("query-named-block-nodes", Some("{\"flat\": true}"))?;
    let pat = format!("\"name\": {}", json_str(name));
    let at = ans.find(&pat).ok_or_else(|| format!("no dirty bitmap {name} in {ans}"))?;
    let (a, b) = (ans[..at].rfind('{').unwrap_or(0), at + ans[at..].find('}').unwrap_or(ans.len() - at));
    json_get_u64(&ans[a..b], "count").ok_or_else(|| format!("no count for the dirty bitmap {name}: {}", &ans[a..b]))
}

/// Write `exts` of the image through the NBD export at `uri` with random data from `seed`,
/// then flush.
fn write_through_nbd(uri: &str, exts: &[(u64, u64)], seed: u64) -> Result<(), String> {
    let dev = NbdDriver::connect_with(uri, &NbdOptions { connections: 1, ..Default::default() }).map_err(err)?;
    let mut rng = Rng(seed | 1);
    let mut buf = vec![0u8; RUN as usize];
    for &(off, len) in exts {
        let b = &mut buf[..len as usize];
        rng.fill(b);
        dev.write_at(b, off).map_err(|e| format!("NBD write at {off}: {e}"))?;
    }
    dev.flush().map_err(err)
}

/// Plain copier thread counts: `BENCH_PLAIN_THREADS` (e.g. "2,8,16"), default 2 and 16.
fn plain_threads() -> Vec<usize> {
    std::env::var("BENCH_PLAIN_THREADS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).filter(|&n| n > 0).collect::<Vec<_>>())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| vec![2, 16])
}

#[derive(Clone, Copy, PartialEq)]
enum Who {
    Qemu,
    /// cowbackup with this many workers (0: the default).
    Cow(usize),
    /// The plain copier with this many threads.
    Plain(usize),
}

impl Who {
    fn label(self, qemu: &str) -> String {
        match self {
            Who::Qemu => qemu.to_string(),
            Who::Cow(0) => "cowbackup".into(),
            Who::Cow(w) => format!("cowbackup workers {w}"),
            Who::Plain(t) => format!("plain {t} thr"),
        }
    }
}

/// Medians and min–max in seconds, 3 decimals: "0.298 s (0.290–0.310)".
fn fmt_s3(s: Summary) -> String {
    format!("{:.3} s ({:.3}–{:.3})", s.median, s.min, s.max)
}

/// `--only qemu-incremental`: see the module's documentation.
pub fn qemu_incremental(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    let version = match qsd_version() {
        Ok(v) => v,
        Err(e) => {
            rows.push(Row {
                scenario: "qemu-incremental: sync=bitmap backups by QEMU's backup job vs cowbackup".into(),
                cowbackup: format!("skipped: qemu-storage-daemon is needed ({e})"),
                baseline: String::new(),
                ratio: String::new(),
                target: String::new(),
            });
            eprintln!("qemu-incremental: skipped: {e}");
            return Ok(());
        }
    };
    let qemu = qemu_name(&version);
    let shm = TempDir::new(&a.shm_dir, "qincr-shm")?;
    let (s, t) = (Path::new("SRC"), Path::new("TGT"));
    let (n, q) = (shm.0.join("qsd-nbd.sock"), shm.0.join("qsd-qmp.sock"));
    println!();
    println!("qemu-incremental: {version}: {} {}", qsd_program(), qsd_args(s, t, &n, &q).join(" "));
    println!(
        "qemu-incremental: QMP per set: block-dirty-bitmap-add {{\"node\": \"src\", \"name\": \"b0\", \"granularity\": \
         65536}}; the set written through the NBD export; per run: blockdev-backup {{\"job-id\": \"bk\", \"device\": \
         \"src\", \"target\": \"tgt\", \"sync\": \"bitmap\", \"bitmap\": \"b0\", \"bitmap-mode\": \"never\"}} until \
         BLOCK_JOB_COMPLETED, then fdatasync(TGT); after the set: block-dirty-bitmap-remove"
    );
    let disk_dir = if a.disk { Some(TempDir::new(&a.disk_dir, "qincr-disk")?) } else { None };
    if let Some(d) = &disk_dir {
        place(a, &d.0, &shm.0, true, &qemu, rows)?;
    }
    place(a, &shm.0, &shm.0, false, &qemu, rows)
}

/// One filesystem: the image, the daemon, the three sets.
fn place(a: &Args, dir: &Path, sockdir: &Path, disk: bool, qemu: &str, rows: &mut Vec<Row>) -> Result<(), String> {
    let size = a.size;
    let mut fs = fs_name(dir);
    if disk && !drop_caches() {
        fs = format!("{fs}, WARM cache: cannot drop caches");
    }
    let (src, tq, tc) = (dir.join("src.img"), dir.join("qemu-dst.img"), dir.join("cow-dst.img"));
    let mut who = vec![Who::Qemu, Who::Cow(0)];
    if let Some(w) = std::env::var("BENCH_INCR_WORKERS").ok().and_then(|v| v.parse().ok()).filter(|&w| w > 0) {
        who.push(Who::Cow(w));
    }
    let threads = plain_threads();
    who.extend(threads.iter().map(|&t| Who::Plain(t)));
    eprint!("qemu-incremental: {fs}, {} random source ", fmt_bytes(size));
    let cold = || if disk { drop_caches() } else { true };
    let mut full = Vec::new();
    let mut results: Vec<(DirtySet, Vec<Vec<f64>>)> = Vec::new();
    let res = (|| -> Result<(), String> {
        make_image(&src, size, Data::Random).map_err(err)?;
        preallocate(&tq, size).map_err(err)?;
        if !disk {
            // The old budget's full backup: defaults, into a preallocated target.
            for _ in 0..a.runs {
                Target::Prealloc.prepare(&tc, size)?;
                full.push(run_cow(&src, &tc, CowConf::default_opts(), Target::Prealloc)?.secs);
            }
        }
        preallocate(&tc, size).map_err(err)?;
        let mut d = Daemon::start(&src, &tq, sockdir)?;
        for set in DirtySet::ALL {
            let granules = set.granules(size);
            let want = granules.len() as u64 * G;
            d.qmp.execute(
                "block-dirty-bitmap-add",
                Some("{\"node\": \"src\", \"name\": \"b0\", \"granularity\": 65536}"),
            )?;
            write_through_nbd(&d.uri(), &extents(&granules, RUN), set.seed())?;
            let count = bitmap_count(&mut d.qmp, "b0")?;
            if count != want {
                return Err(format!("QEMU's bitmap b0 holds {count} bytes after the writes, want {want}"));
            }
            let exts = extents(&granules, RUN);
            let mut secs = vec![Vec::new(); who.len()];
            for run in 0..a.runs {
                for k in (0..who.len()).map(|k| (k + run) % who.len()) {
                    let w = who[k];
                    let dst = if w == Who::Qemu { &tq } else { &tc };
                    reallocate(dst, size)?;
                    cold();
                    let t = match w {
                        Who::Qemu => {
                            let t0 = Instant::now();
                            d.start_bitmap_backup("b0")?;
                            d.wait_backup(&tq, Duration::from_secs(300 + size / (10 * MIB)))?;
                            t0.elapsed().as_secs_f64()
                        }
                        Who::Cow(workers) => {
                            let (t, done) = run_child(&src, &tc, set, workers)?;
                            if done != want {
                                return Err(format!("cowbackup's incremental copied {done} bytes, want {want}"));
                            }
                            t
                        }
                        Who::Plain(threads) => run_plain(&src, &tc, &exts, threads)?,
                    };
                    secs[k].push(t);
                    if run == 0 {
                        verify_granules(&src, dst, &granules, &who[k].label(qemu))?;
                    }
                }
                eprint!(".");
            }
            d.qmp.execute("block-dirty-bitmap-remove", Some("{\"node\": \"src\", \"name\": \"b0\"}"))?;
            results.push((set, secs));
        }
        d.stop()
    })();
    eprintln!();
    for p in [&src, &tq, &tc] {
        let _ = std::fs::remove_file(p);
    }
    res?;
    let full = (!full.is_empty()).then(|| summary(&full));
    for (set, secs) in results {
        let sums: Vec<Summary> = secs.iter().map(|v| summary(v)).collect();
        let q = sums[0];
        let c = sums[1];
        let (best_t, best) = who
            .iter()
            .zip(&sums)
            .filter_map(|(w, s)| if let Who::Plain(t) = w { Some((*t, *s)) } else { None })
            .min_by(|x, y| x.1.median.total_cmp(&y.1.median))
            .expect("at least one plain copier");
        let share = set.granules(size).len() as f64 * G as f64 / size as f64;
        let line = who
            .iter()
            .zip(&sums)
            .map(|(w, s)| format!("{} {}", w.label("QEMU"), fmt_s3(*s)))
            .collect::<Vec<_>>()
            .join(", ");
        println!("qemu-incremental, {fs}, {}: {line}", set.label());
        let (vs_q, vs_p) = (q.median / c.median, best.median / c.median);
        let mut checks = vec![];
        if disk {
            checks.push(check(vs_q >= 1.0, "≥ 1.0× QEMU"));
        }
        checks.push(check(vs_p >= 1.0 / 1.1, format!("≤ 1.1× the best plain copier ({best_t} threads)")));
        if let Some(f) = full {
            let budget = share * f.median + 0.05;
            checks.push(check(
                c.median <= 1.5 * budget,
                format!(
                    "within the old budget: {:.3} s ≤ 1.5 × ({:.0} % × full {:.3} s + 50 ms) = {:.3} s",
                    c.median,
                    share * 100.0,
                    f.median,
                    1.5 * budget
                ),
            ));
        }
        let checks = checks.join("; ");
        println!("  checks: {checks}");
        println!("ratio vs best plain copier: {vs_p:.2}");
        println!("ratio vs QEMU: {vs_q:.2}");
        for (k, w) in who.iter().enumerate() {
            let Who::Cow(workers) = *w else { continue };
            let s = sums[k];
            let opts = if workers == 0 {
                format!("defaults ({} workers)", BackupOptions::default().workers)
            } else {
                format!("workers {workers} (BENCH_INCR_WORKERS)")
            };
            let plains = who
                .iter()
                .zip(&sums)
                .filter(|(w, _)| matches!(w, Who::Plain(_)))
                .map(|(w, s)| format!("{} {}", w.label(qemu), fmt_s3(*s)))
                .collect::<Vec<_>>()
                .join(", ");
            rows.push(Row {
                scenario: format!(
                    "qemu-incremental: sync=bitmap, {fs}{}, {} random data, dirty 64 KiB granules: {}, into a \
                     preallocated target; cowbackup {opts}",
                    if disk { " (page cache dropped before each copy)" } else { "" },
                    fmt_bytes(size),
                    set.label()
                ),
                cowbackup: fmt_s3(s),
                baseline: format!(
                    "{qemu} blockdev-backup sync=bitmap: {}; pread + pwrite: {plains}{}",
                    fmt_s3(q),
                    full.map(|f| format!("; full backup (defaults) {}", fmt_s3(f))).unwrap_or_default()
                ),
                ratio: format!(
                    "{:.2}× QEMU; {:.2}× the best plain copier's speed",
                    q.median / s.median,
                    best.median / s.median
                ),
                target: if workers == 0 { checks.clone() } else { String::new() },
            });
        }
    }
    Ok(())
}
