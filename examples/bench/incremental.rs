//! Incremental backups: what a persistent dirty bitmap costs the host (`mark` on a durable
//! granule, guest writes with and without a bitmap, first touches and group commit), and
//! what an incremental backup costs next to a full one.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Instant;

use cowbackup::{
    allocated_bytes, backup_start, BackupOptions, BitmapMode, BlockDriver, DirtyBitmap, FileDriver, JobState,
    OpenFlags, SyncMode,
};

use crate::util::*;
use crate::Args;

/// Bitmap granularity of every scenario here (the default, = the default cluster size).
const G: u64 = 64 * KIB;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Where the bitmap files go: the disk directory (a durable mark flushes a real disk),
/// or tmpfs with `--no-disk`.
fn bitmap_dir(a: &Args) -> Result<(&Path, &'static str), String> {
    if a.disk {
        std::fs::create_dir_all(&a.disk_dir).map_err(|e| format!("{}: {e}", a.disk_dir.display()))?;
        Ok((&a.disk_dir, "disk"))
    } else {
        Ok((&a.shm_dir, "tmpfs"))
    }
}

/// `0..n` in a random order, the same for a seed.
pub fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut rng = Rng(seed | 1);
    for i in (1..v.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// `mark` of a granule already dirty and durable: the host's steady state. Mean ns per call
/// over batches of 10 000 calls at random offsets, a persistent bitmap (file on disk) next
/// to an in-memory one, batches alternated.
pub fn mark(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    let (dir, place) = bitmap_dir(a)?;
    let size = a.size;
    let path = dir.join("bench-mark.bitmap");
    eprint!("mark: durable granules, {} device, bitmap file on {place} ", fmt_bytes(size));
    let mut rng = Rng(0x5eed);
    let offs: Vec<u64> = (0..10_000).map(|_| rng.next() % (size - 4096)).collect();
    let (mut pers, mut mem) = (vec![], vec![]);
    let res = (|| -> Result<(), String> {
        for _ in 0..a.runs {
            let _ = std::fs::remove_file(&path);
            let p = DirtyBitmap::create(&path, size, G).map_err(err)?;
            let m = DirtyBitmap::new(size, G).map_err(err)?;
            // Every granule dirty (and durable) in one commit.
            p.mark(0, size).map_err(err)?;
            m.mark(0, size).map_err(err)?;
            for _ in 0..20 {
                for (bm, out) in [(&p, &mut pers), (&m, &mut mem)] {
                    let t = Instant::now();
                    for &o in &offs {
                        bm.mark(o, 4096).map_err(err)?;
                    }
                    out.push(t.elapsed().as_nanos() as f64 / offs.len() as f64);
                }
            }
            drop(p);
            eprint!(".");
        }
        Ok(())
    })();
    eprintln!();
    let _ = std::fs::remove_file(&path);
    res?;
    let (p, m) = (summary(&pers), summary(&mem));
    rows.push(Row {
        scenario: format!("mark(4 KiB) of a durable granule, persistent bitmap on {place}, {} device", fmt_bytes(size)),
        cowbackup: format!(
            "{} per call ({}–{}), mean over batches of 10 000",
            fmt_ns(p.median),
            fmt_ns(p.min),
            fmt_ns(p.max)
        ),
        baseline: format!("in-memory bitmap: {} ({}–{})", fmt_ns(m.median), fmt_ns(m.min), fmt_ns(m.max)),
        ratio: format!("{:.2}× in memory", p.median / m.median),
        target: check(p.median <= 100.0, "median ≤ 100 ns"),
    });
    Ok(())
}

/// Guest QD1 64 KiB writes to an image on the disk directory, with a persistent bitmap
/// (mark, then write) and without: the first pass over the device (every write a first
/// touch: a bitmap page written and flushed before the write), then random writes once
/// every granule is durable (throughput, blocks with and without alternated).
pub fn guest(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    let (dir, place) = bitmap_dir(a)?;
    let size = 128 * MIB;
    let (src, bmp) = (dir.join("bench-bg-src.img"), dir.join("bench-bg.bitmap"));
    eprint!("guest writes with a persistent bitmap: {} image and bitmap on {place} ", fmt_bytes(size));
    let n = size / G;
    let (mut first_p50, mut first_p99, mut plain_p50, mut plain_p99) = (vec![], vec![], vec![], vec![]);
    let (mut with, mut without, mut ratios) = (vec![], vec![], vec![]);
    let res = (|| -> Result<(), String> {
        make_image(&src, size, Data::Random).map_err(err)?;
        let disk = FileDriver::open(&src, OpenFlags::WRITE).map_err(err)?;
        let mut buf = vec![0u8; G as usize];
        Rng(7).fill(&mut buf);
        let mut write = |off: u64, bm: Option<&DirtyBitmap>, seq: u64| -> Result<u64, String> {
            buf[..8].copy_from_slice(&seq.to_le_bytes());
            let t = Instant::now();
            if let Some(bm) = bm {
                bm.mark(off, G).map_err(err)?;
            }
            disk.write_at(&buf, off).map_err(err)?;
            Ok(t.elapsed().as_nanos() as u64)
        };
        let mut seq = 0;
        for run in 0..a.runs {
            let _ = std::fs::remove_file(&bmp);
            let bm = DirtyBitmap::create(&bmp, size, G).map_err(err)?;
            // First pass: every granule once, in random order, alternating blocks of 256
            // first touches with 256 plain writes (another random order).
            let (oa, ob) = (shuffled(n, 11 + run as u64), shuffled(n, 99 + run as u64));
            let (mut f, mut p) = (Vec::with_capacity(n as usize), Vec::with_capacity(n as usize));
            for (ca, cb) in oa.chunks(256).zip(ob.chunks(256)) {
                for &g in ca {
                    seq += 1;
                    f.push(write(g * G, Some(&bm), seq)?);
                }
                for &g in cb {
                    seq += 1;
                    p.push(write(g * G, None, seq)?);
                }
            }
            assert_eq!(bm.count(), size, "the first pass dirtied every granule");
            f.sort_unstable();
            p.sort_unstable();
            first_p50.push(quantile(&f, 0.5) as f64);
            first_p99.push(quantile(&f, 0.99) as f64);
            plain_p50.push(quantile(&p, 0.5) as f64);
            plain_p99.push(quantile(&p, 0.99) as f64);
            // After the first pass: random 4 KiB-aligned 64 KiB writes, blocks of 1000
            // with and without the bitmap, alternated.
            let mut rng = Rng(1234 + run as u64);
            let (mut tw, mut to) = (0.0, 0.0);
            for _ in 0..10 {
                for use_bm in [true, false] {
                    let t = Instant::now();
                    for _ in 0..1000 {
                        let off = rng.next() % ((size - G) / 4096) * 4096;
                        seq += 1;
                        write(off, use_bm.then_some(&*bm), seq)?;
                    }
                    let rate = 1000.0 / t.elapsed().as_secs_f64();
                    if use_bm {
                        with.push(rate);
                        tw += 1.0 / rate;
                    } else {
                        without.push(rate);
                        to += 1.0 / rate;
                    }
                }
            }
            ratios.push(to / tw);
            eprint!(".");
        }
        Ok(())
    })();
    eprintln!();
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&bmp);
    res?;
    let (w, o, r) = (summary(&with), summary(&without), summary(&ratios));
    let fmt_k = |s: Summary| format!("{:.1} k writes/s ({:.1}–{:.1})", s.median / 1e3, s.min / 1e3, s.max / 1e3);
    rows.push(Row {
        scenario: format!(
            "guest QD1 64 KiB random writes, {} image on {place}, after the first pass (every granule durable)",
            fmt_bytes(size)
        ),
        cowbackup: format!("with a persistent bitmap: {}", fmt_k(w)),
        baseline: format!("no bitmap, blocks alternated: {}", fmt_k(o)),
        ratio: format!("{:.3}× (per run {:.3}–{:.3})", r.median, r.min, r.max),
        target: check(r.median >= 0.95, "≥ 0.95×"),
    });
    let q = |v: &[f64]| fmt_ns(summary(v).median);
    let (f50, p50) = (summary(&first_p50).median, summary(&plain_p50).median);
    rows.push(Row {
        scenario: format!(
            "guest QD1 64 KiB writes, first pass over the {} image on {place}: each write is a first touch",
            fmt_bytes(size)
        ),
        cowbackup: format!("mark + write p50 {}, p99 {} ({} first touches per run)", q(&first_p50), q(&first_p99), n),
        baseline: format!("plain write p50 {}, p99 {}", q(&plain_p50), q(&plain_p99)),
        ratio: format!("+{} at p50", fmt_ns(f50 - p50)),
        target: "(a page write and a flush of the bitmap file: the disk's sync latency)".into(),
    });
    Ok(())
}

/// Counts the flushes and writes of a driver (the bitmap's file).
struct Counting<D> {
    inner: D,
    flushes: AtomicU64,
    writes: AtomicU64,
}

impl<D: BlockDriver> BlockDriver for Counting<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.write_zeroes_at(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.inner.flush()
    }
    fn storage_id(&self) -> Option<(u64, u64)> {
        self.inner.storage_id()
    }
}

/// Group commit: N guest threads writing 64 KiB to granules never written before (each
/// write a first touch: mark, then write) on a sparse image with its bitmap file on the disk
/// directory: the bitmap's flushes next to the first marks, and first touches per second.
pub fn group_commit(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    let (dir, place) = bitmap_dir(a)?;
    let (img, path) = (dir.join("bench-gc.img"), dir.join("bench-gc.bitmap"));
    let size = a.size;
    let touches = 512u64;
    let threads = [1usize, 2, 4, 8];
    eprint!(
        "group commit: {touches} first touches from 1–8 guest threads, {} sparse image on {place} ",
        fmt_bytes(size)
    );
    let mut res_rows: Vec<(usize, Vec<f64>, Vec<f64>)> = threads.iter().map(|&t| (t, vec![], vec![])).collect();
    let res = (|| -> Result<(), String> {
        for run in 0..a.runs {
            for (ti, (nt, flushes, rates)) in res_rows.iter_mut().enumerate() {
                let _ = std::fs::remove_file(&img);
                let _ = std::fs::remove_file(&path);
                let disk = FileDriver::create(&img, size).map_err(err)?;
                let f = FileDriver::create(&path, DirtyBitmap::file_size(size, G).map_err(err)?).map_err(err)?;
                let d = Arc::new(Counting { inner: f, flushes: AtomicU64::new(0), writes: AtomicU64::new(0) });
                let bm = DirtyBitmap::create_on(d.clone(), size, G).map_err(err)?;
                let before = d.flushes.load(Ordering::Relaxed);
                let mut order = shuffled(size / G, 1000 * run as u64 + ti as u64 + 1);
                order.truncate(touches as usize);
                let n = *nt;
                let barrier = Barrier::new(n);
                let t = Instant::now();
                thread::scope(|s| {
                    let hs: Vec<_> = (0..n)
                        .map(|k| {
                            let (bm, barrier, disk, order) = (&bm, &barrier, &disk, &order);
                            s.spawn(move || -> Result<(), String> {
                                let mut buf = vec![0u8; G as usize];
                                Rng(k as u64 + 5).fill(&mut buf);
                                barrier.wait();
                                for &g in order.iter().skip(k).step_by(n) {
                                    bm.mark(g * G, G).map_err(err)?;
                                    disk.write_at(&buf, g * G).map_err(err)?;
                                }
                                Ok(())
                            })
                        })
                        .collect();
                    hs.into_iter().try_for_each(|h| h.join().expect("guest thread panicked"))
                })?;
                let secs = t.elapsed().as_secs_f64();
                if bm.count() != touches * G {
                    return Err(format!("group commit: {} dirty bytes, want {}", bm.count(), touches * G));
                }
                flushes.push((d.flushes.load(Ordering::Relaxed) - before) as f64);
                rates.push(touches as f64 / secs);
            }
            eprint!(".");
        }
        Ok(())
    })();
    eprintln!();
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_file(&path);
    res?;
    let r1 = summary(&res_rows[0].2).median;
    for (nt, flushes, rates) in &res_rows {
        let (f, r) = (summary(flushes), summary(rates));
        rows.push(Row {
            scenario: format!(
                "group commit: {nt} guest thread(s), {touches} first touches (mark + 64 KiB write), {} image and bitmap on {place}",
                fmt_bytes(size)
            ),
            cowbackup: format!(
                "{:.0} bitmap flushes ({:.0}–{:.0}) for {touches} first marks; {:.0} first touches/s ({:.0}–{:.0})",
                f.median, f.min, f.max, r.median, r.min, r.max
            ),
            baseline: if *nt == 1 { "(one flush per first mark)".into() } else { format!("1 thread: {r1:.0} first touches/s") },
            ratio: format!("{:.1} marks per flush; {:.2}× 1 thread's rate", touches as f64 / f.median, r.median / r1),
            target: if *nt >= 4 {
                check(f.median * 2.0 <= touches as f64, "flushes ≤ ½ first marks")
            } else {
                String::new()
            },
        });
    }
    Ok(())
}

/// The dirty granules of an incremental of `ppm` parts per million of `n` granules:
/// distinct, scattered at random (the worst case for a disk), the same for a seed.
pub fn dirty_granules(n: u64, ppm: u64, seed: u64) -> Vec<u64> {
    let k = (n * ppm / 1_000_000).max(1) as usize;
    let mut v = shuffled(n, seed);
    v.truncate(k);
    v.sort_unstable();
    v
}

/// The hidden subcommand `__incr SRC DST PPM WORKERS`: back up SRC into a new sparse DST, in
/// full (PPM 0) or incrementally with a bitmap of PPM parts per million dirty (set up before
/// the clock starts; mode Never), with WORKERS workers. Prints `secs rss copied zero skipped`.
pub fn child_incr(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let [src, dst, ppm, workers] = args else { return Err("bad __incr arguments".into()) };
    let ppm: u64 = ppm.parse()?;
    let workers: usize = workers.parse()?;
    let size = std::fs::metadata(src)?.len();
    let bitmap = if ppm == 0 {
        None
    } else {
        let bm = DirtyBitmap::new(size, G)?;
        for g in dirty_granules(size / G, ppm, 42) {
            bm.mark(g * G, G)?;
        }
        Some(bm)
    };
    let t = Instant::now();
    let source = Arc::new(FileDriver::open(src, OpenFlags::empty())?);
    let target = Arc::new(FileDriver::create(dst, size)?);
    let opts = match bitmap {
        None => BackupOptions { sync: SyncMode::Full, workers, ..Default::default() },
        Some(bm) => BackupOptions {
            sync: SyncMode::Bitmap,
            bitmap: Some(bm),
            bitmap_mode: BitmapMode::Never,
            workers,
            ..Default::default()
        },
    };
    let job = backup_start(source, target, opts)?;
    job.wait()?;
    let secs = t.elapsed().as_secs_f64();
    let i = job.info();
    assert_eq!(i.state, JobState::Completed);
    println!("{secs} {} {} {} {}", peak_rss(), i.bytes_copied, i.bytes_zero, i.bytes_skipped);
    Ok(())
}

fn run_incr(src: &Path, dst: &Path, ppm: u64, workers: usize) -> Result<(f64, u64, u64), String> {
    let _ = std::fs::remove_file(dst);
    let exe = std::env::current_exe().map_err(err)?;
    let out = std::process::Command::new(exe)
        .arg("__incr")
        .arg(src)
        .arg(dst)
        .arg(ppm.to_string())
        .arg(workers.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(err)?;
    if !out.status.success() {
        return Err(format!("__incr child failed: {}", out.status));
    }
    let s = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = s.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    if v.len() != 5 {
        return Err(format!("bad __incr output {s:?}"));
    }
    Ok((v[0], v[1] as u64, v[2] as u64 + v[3] as u64))
}

/// The baseline of an incremental: the same granules copied with `pread` + `pwrite` by 2
/// threads into a new sparse file, then `fdatasync`. Returns seconds.
fn run_plain(src: &Path, dst: &Path, ppm: u64) -> Result<f64, String> {
    use std::os::unix::fs::FileExt;
    let _ = std::fs::remove_file(dst);
    let t = Instant::now();
    let s = std::fs::File::open(src).map_err(err)?;
    let size = s.metadata().map_err(err)?.len();
    let d = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(dst).map_err(err)?;
    d.set_len(size).map_err(err)?;
    let gs = dirty_granules(size / G, ppm, 42);
    thread::scope(|sc| {
        let hs: Vec<_> = (0..2)
            .map(|k| {
                let (s, d, gs) = (&s, &d, &gs);
                sc.spawn(move || -> Result<(), String> {
                    let mut buf = vec![0u8; G as usize];
                    for &g in gs.iter().skip(k).step_by(2) {
                        s.read_exact_at(&mut buf, g * G).map_err(err)?;
                        d.write_all_at(&buf, g * G).map_err(err)?;
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter().try_for_each(|h| h.join().expect("copy thread panicked"))
    })?;
    d.sync_data().map_err(err)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Check that `dst` holds the source's data in the dirty granules of `ppm`.
fn verify_incr(src: &Path, dst: &Path, ppm: u64) -> Result<(), String> {
    let (s, d) = (
        FileDriver::open(src, OpenFlags::empty()).map_err(err)?,
        FileDriver::open(dst, OpenFlags::empty()).map_err(err)?,
    );
    let (mut a, mut b) = (vec![0u8; G as usize], vec![0u8; G as usize]);
    for g in dirty_granules(s.size() / G, ppm, 42) {
        s.read_at(&mut a, g * G).map_err(err)?;
        d.read_at(&mut b, g * G).map_err(err)?;
        if a != b {
            return Err(format!("VERIFY FAILED: incremental ({ppm} ppm) differs from the source in granule {g}"));
        }
    }
    Ok(())
}

/// An incremental backup of a 2 GiB image (1 % and 10 % of its granules dirty, scattered)
/// next to a full backup of the same image in the same run: its time against
/// (dirty share × full backup time) + 50 ms. With the default options, and with 8 workers
/// (scattered reads want a deeper queue on a disk).
pub fn incremental(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    let size = a.size;
    let mut places = vec![(a.shm_dir.clone(), false)];
    if a.disk {
        std::fs::create_dir_all(&a.disk_dir).map_err(err)?;
        places.push((a.disk_dir.clone(), true));
    }
    let def = BackupOptions::default().workers;
    // (parts per million dirty, workers): 0 ppm = the full backup, 0 workers = the plain
    // pread + pwrite baseline of the same granules.
    let contenders = [(0u64, def), (10_000, def), (100_000, def), (10_000, 8), (100_000, 8), (10_000, 0), (100_000, 0)];
    for (dir, disk) in places {
        let fs = if disk {
            format!("disk ({})", if drop_caches() { "cold cache" } else { "WARM cache: cannot drop caches" })
        } else {
            "tmpfs".to_string()
        };
        let (src, dst) = (dir.join("bench-incr-src.img"), dir.join("bench-incr-dst.img"));
        eprint!("incremental: {fs}, {} random data, 1 % and 10 % dirty ", fmt_bytes(size));
        let mut secs: Vec<Vec<f64>> = vec![vec![]; contenders.len()];
        let mut alloc = vec![0u64; contenders.len()];
        let cold = || if disk { drop_caches() } else { true };
        let res = (|| -> Result<(), String> {
            make_image(&src, size, Data::Random).map_err(err)?;
            let n = contenders.len();
            for run in 0..a.runs {
                // The order rotates from run to run.
                for k in (0..n).map(|k| (k + run) % n) {
                    let (ppm, workers) = contenders[k];
                    cold();
                    if workers == 0 {
                        secs[k].push(run_plain(&src, &dst, ppm)?);
                        continue;
                    }
                    let (t, _, done) = run_incr(&src, &dst, ppm, workers)?;
                    secs[k].push(t);
                    if ppm == 0 {
                        continue;
                    }
                    let want = dirty_granules(size / G, ppm, 42).len() as u64 * G;
                    if done != want {
                        return Err(format!("incremental of {ppm} ppm copied {done} bytes, want {want}"));
                    }
                    if run == 0 {
                        verify_incr(&src, &dst, ppm)?;
                        alloc[k] = allocated_bytes(&dst).map_err(err)?;
                    }
                }
                eprint!(".");
            }
            Ok(())
        })();
        eprintln!();
        let _ = std::fs::remove_file(&src);
        let _ = std::fs::remove_file(&dst);
        res?;
        let f = summary(&secs[0]);
        for (k, &(ppm, workers)) in contenders.iter().enumerate().skip(1) {
            if workers == 0 {
                continue;
            }
            let s = summary(&secs[k]);
            let plain = contenders.iter().position(|&c| c == (ppm, 0)).map(|i| summary(&secs[i]));
            let share = dirty_granules(size / G, ppm, 42).len() as f64 * G as f64 / size as f64;
            let budget = share * f.median + 0.05;
            let r = s.median / budget;
            let opts = if workers == def { "defaults".to_string() } else { format!("workers {workers}") };
            rows.push(Row {
                scenario: format!(
                    "incremental backup, {fs}, {} random data, {:.0} % of the 64 KiB granules dirty (scattered), {opts}",
                    fmt_bytes(size),
                    share * 100.0
                ),
                cowbackup: format!("{} (target allocated {} MiB)", fmt_secs(s), alloc[k] / MIB),
                baseline: match (k, plain) {
                    (1 | 2, Some(p)) => format!(
                        "full backup, defaults: {}; the same granules by pread + pwrite, 2 threads: {}",
                        fmt_rate(size, f),
                        fmt_secs(p)
                    ),
                    _ => "(as above)".into(),
                },
                ratio: format!(
                    "{r:.2}× ({:.0} % × full + 50 ms = {:.3} s); {:.2}× pread + pwrite",
                    share * 100.0,
                    budget,
                    s.median / plain.map_or(f64::NAN, |p| p.median)
                ),
                target: check(r <= 1.5, "≤ 1.5×"),
            });
        }
    }
    Ok(())
}
