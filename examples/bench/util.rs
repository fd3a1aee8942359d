//! Helpers of the benchmark: random data, image preparation, statistics, formatting,
//! page-cache dropping, the result table.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const CLUSTER: u64 = 64 * KIB;

/// xorshift64*: fast deterministic random data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            c.copy_from_slice(&self.next().to_le_bytes()[..c.len()]);
        }
    }
}

/// What a prepared source image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data {
    /// Random bytes everywhere (all allocated).
    Random,
    /// Every 64 KiB cluster is random data or zero bytes (written, allocated), 50/50.
    Zero50,
    /// The first 1 MiB of every 8 MiB is random data; the rest are holes (12.5 % data).
    Sparse,
}

impl Data {
    pub fn name(self) -> &'static str {
        match self {
            Data::Random => "random data",
            Data::Zero50 => "50 % zero clusters",
            Data::Sparse => "sparse (12.5 % data)",
        }
    }
}

/// Create `path` of `size` bytes holding `data`, synced to disk.
pub fn make_image(path: &Path, size: u64, data: Data) -> io::Result<()> {
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
    f.set_len(size)?;
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ size);
    let mut buf = vec![0u8; 8 * MIB as usize];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(8 * MIB) as usize;
        match data {
            Data::Random => {
                rng.fill(&mut buf[..n]);
                f.write_all_at(&buf[..n], off)?;
            }
            Data::Zero50 => {
                for c in buf[..n].chunks_mut(CLUSTER as usize) {
                    if rng.next() & 1 == 0 {
                        rng.fill(c);
                    } else {
                        c.fill(0);
                    }
                }
                f.write_all_at(&buf[..n], off)?;
            }
            Data::Sparse => {
                let m = n.min(MIB as usize);
                rng.fill(&mut buf[..m]);
                f.write_all_at(&buf[..m], off)?;
            }
        }
        off += n as u64;
    }
    f.sync_all()
}

/// A sparse file of `size` bytes with `data` bytes of random data in 1 MiB extents,
/// spread evenly over the file.
pub fn make_sparse_spread(path: &Path, size: u64, data: u64) -> io::Result<()> {
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
    f.set_len(size)?;
    let extents = (data / MIB).max(1);
    let stride = size / extents / MIB * MIB;
    let mut rng = Rng(0xabcd_ef01_2345_6789);
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..extents {
        rng.fill(&mut buf);
        f.write_all_at(&buf, i * stride)?;
    }
    f.sync_all()
}

/// The next offset at or after `off` where `f` has data (`SEEK_DATA`); `len` when none.
fn next_data(f: &File, off: u64, len: u64) -> u64 {
    use std::os::unix::io::AsRawFd;
    // SAFETY: lseek on a descriptor we own; we only use positional reads on it.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if r < 0 {
        // ENXIO: no data after off. Anything else: cannot tell, assume data.
        return if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) { len } else { off };
    }
    r as u64
}

/// First differing offset of two files, `None` when they are equal. Ranges that are
/// holes in both files are skipped (`SEEK_DATA`), so a sparse 1 TiB pair is quick.
pub fn first_difference(a: &Path, b: &Path) -> io::Result<Option<u64>> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    if la != lb {
        return Ok(Some(la.min(lb)));
    }
    let (mut ba, mut bb) = (vec![0u8; 4 * MIB as usize], vec![0u8; 4 * MIB as usize]);
    let mut off = 0;
    while off < la {
        off = next_data(&fa, off, la).min(next_data(&fb, off, la)) / 4096 * 4096;
        if off >= la {
            break;
        }
        let n = (la - off).min(4 * MIB) as usize;
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        if ba[..n] != bb[..n] {
            let i = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y).unwrap_or(0);
            return Ok(Some(off + i as u64));
        }
        off += n as u64;
    }
    Ok(None)
}

/// Drop the page cache (needs root). False when not permitted.
/// `getrusage(who)`: `RUSAGE_SELF` (this process, every thread) or `RUSAGE_CHILDREN` (its
/// reaped children).
pub fn rusage(who: libc::c_int) -> libc::rusage {
    // SAFETY: getrusage writes one rusage into a zeroed local.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `who` is RUSAGE_SELF or RUSAGE_CHILDREN.
    unsafe { libc::getrusage(who, &mut ru) };
    ru
}

/// User + system CPU seconds of a [`rusage`].
pub fn cpu_secs(ru: &libc::rusage) -> f64 {
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

pub fn drop_caches() -> bool {
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// Median, min and max of a non-empty set of values.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn summary(v: &[f64]) -> Summary {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    let median = if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Summary { median, min: *s.first().unwrap_or(&f64::NAN), max: *s.last().unwrap_or(&f64::NAN) }
}

/// The `p` quantile (0..=1) of sorted values (nearest rank).
pub fn quantile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn fmt_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e4 {
        format!("{:.0} µs", ns / 1e3)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

pub fn fmt_bytes(b: u64) -> String {
    if b >= 1 << 40 && b % (1 << 40) == 0 {
        format!("{} TiB", b >> 40)
    } else if b >= GIB && b % GIB == 0 {
        format!("{} GiB", b / GIB)
    } else if b >= MIB {
        format!("{} MiB", b / MIB)
    } else {
        format!("{} KiB", b / KIB)
    }
}

/// "1.23 s (1.20–1.40)"
pub fn fmt_secs(s: Summary) -> String {
    format!("{:.2} s ({:.2}–{:.2})", s.median, s.min, s.max)
}

/// Times in seconds for `bytes`: "2.10 GiB/s, 0.95 s (0.90–1.10)"
pub fn fmt_rate(bytes: u64, s: Summary) -> String {
    format!("{:.2} GiB/s, {}", bytes as f64 / GIB as f64 / s.median, fmt_secs(s))
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (
            &s[..i],
            match c.to_ascii_uppercase() {
                'K' => KIB,
                'M' => MIB,
                'G' => GIB,
                'T' => 1u64 << 40,
                _ => return Err(format!("bad size suffix in {s:?} (use K, M, G or T)")),
            },
        ),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    n.checked_mul(mult).filter(|&v| v > 0).ok_or_else(|| format!("bad size {s:?}"))
}

/// One line of the result table.
pub struct Row {
    pub scenario: String,
    pub cowbackup: String,
    pub baseline: String,
    /// How many times better cowbackup is (baseline time / cowbackup time, or the like).
    pub ratio: String,
    /// The target of issue 6 and whether it holds.
    pub target: String,
}

pub fn check(ok: bool, what: impl std::fmt::Display) -> String {
    format!("{} {what}", if ok { "✓" } else { "✗" })
}

/// Print the table in Markdown.
pub fn print_table(rows: &[Row]) {
    println!("| scenario | cowbackup | baseline (same run) | ratio | target |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} | {} | {} |", r.scenario, r.cowbackup, r.baseline, r.ratio, r.target);
    }
}

/// The 1-, 5- and 15-minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// `VmHWM` of this process, in bytes.
pub fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Create `path` (replacing it) as a file of `size` bytes with all of its space
/// allocated (`fallocate`, mode 0: what `fallocate -l` and qemu's `preallocation=falloc` do).
pub fn preallocate(path: &Path, size: u64) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let _ = std::fs::remove_file(path);
    let f = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
    // SAFETY: fallocate on a descriptor we own.
    if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as libc::off_t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    f.sync_all()
}

/// A new sparse `FileDriver` at `path`, replacing any file there (`FileDriver::create`
/// refuses an existing path).
pub fn create_new(path: &Path, size: u64) -> io::Result<cowbackup::FileDriver> {
    let _ = std::fs::remove_file(path);
    cowbackup::FileDriver::create(path, size)
}

/// [`create_new`] with flags (e.g. `OpenFlags::DIRECT`).
pub fn create_new_with(path: &Path, size: u64, flags: cowbackup::OpenFlags) -> io::Result<cowbackup::FileDriver> {
    let _ = std::fs::remove_file(path);
    cowbackup::FileDriver::create_with(path, size, flags)
}

/// The name of the filesystem holding `dir` (by `statfs` `f_type`), e.g. "ext4".
pub fn fs_name(dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return "?".into() };
    // SAFETY: a zeroed statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs with a NUL-terminated path and a local of the right type.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } < 0 {
        return "?".into();
    }
    match st.f_type as u32 {
        0x0102_1994 => "tmpfs".into(),
        0xef53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683e => "btrfs".into(),
        0x6969 => "nfs".into(),
        0x794c_7630 => "overlayfs".into(),
        t => format!("filesystem 0x{t:x}"),
    }
}

/// Latencies of several runs: per run its p50 and p99, over all the largest and the count.
#[derive(Default)]
pub struct Lat {
    pub p50: Vec<f64>,
    pub p99: Vec<f64>,
    pub max: u64,
    pub writes: usize,
}

impl Lat {
    pub fn new() -> Lat {
        Lat::default()
    }
    /// One run's latencies, ns.
    pub fn add(&mut self, mut ns: Vec<u64>) {
        ns.sort_unstable();
        self.writes += ns.len();
        self.p50.push(quantile(&ns, 0.5) as f64);
        self.p99.push(quantile(&ns, 0.99) as f64);
        self.max = self.max.max(ns.last().copied().unwrap_or(0));
    }
    /// The median of the runs' p99.
    pub fn p99(&self) -> f64 {
        summary(&self.p99).median
    }
    pub fn fmt(&self) -> String {
        let (a, b) = (summary(&self.p50), summary(&self.p99));
        format!(
            "p50 {} ({}–{}), p99 {} ({}–{}), max {}",
            fmt_ns(a.median),
            fmt_ns(a.min),
            fmt_ns(a.max),
            fmt_ns(b.median),
            fmt_ns(b.min),
            fmt_ns(b.max),
            fmt_ns(self.max as f64)
        )
    }
}
