//! Snapshot-view scenarios: reading a view next to reading the source file directly,
//! guest write latency during a fleecing push backup next to a direct backup into the same
//! slow target, and the scratch file's peak allocation with and without discard.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use cowbackup::{
    allocated_bytes, backup_start, AlignedBuf, BackupOptions, BlockDriver, BlockStatus, FileDriver, Job, OpenFlags,
    SyncMode,
};

use crate::util::*;
use crate::Args;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The slow target of these scenarios: 100 MiB/s.
const SLOW: u64 = 100 * MIB;
/// Pieces of the sequential reads.
const PIECE: u64 = 4 * MIB;

/// A target that writes at most `rate` bytes/s, like one slow link or disk: each write
/// reserves its share of time after the writes before it (FIFO) and returns when that is
/// over, so concurrent writers queue. Zeroes and flushes are free.
struct Throttled {
    inner: FileDriver,
    rate: u64,
    /// When the link is free again. Protected by this mutex.
    free_at: Mutex<Instant>,
}

impl Throttled {
    fn new(inner: FileDriver, rate: u64) -> Throttled {
        Throttled { inner, rate, free_at: Mutex::new(Instant::now()) }
    }
}

impl BlockDriver for Throttled {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let done = {
            let mut free = self.free_at.lock().unwrap_or_else(|e| e.into_inner());
            *free = (*free).max(Instant::now()) + Duration::from_secs_f64(buf.len() as f64 / self.rate as f64);
            *free
        };
        thread::sleep(done.saturating_duration_since(Instant::now()));
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes_at(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        self.inner.block_status(offset, len)
    }
    fn reads_as_zero(&self) -> bool {
        self.inner.reads_as_zero()
    }
}

/// Read all of `d` in 4 MiB pieces; returns seconds and a checksum of the data.
fn read_all(d: &dyn BlockDriver) -> Result<(f64, u64), String> {
    let mut buf = AlignedBuf::with_len(PIECE as usize);
    let mut sum = 0u64;
    let t = Instant::now();
    let mut off = 0;
    while off < d.size() {
        let n = PIECE.min(d.size() - off) as usize;
        let b = buf.slice_mut(n);
        d.read_at(b, off).map_err(err)?;
        // One word per 4 KiB: cheap, and proves the data was there.
        sum = b.chunks(4096).fold(sum, |s, c| s.rotate_left(5) ^ u64::from_le_bytes(c[..8].try_into().unwrap()));
        off += n as u64;
    }
    Ok((t.elapsed().as_secs_f64(), sum))
}

/// Reading the `sync = None` view of a quiet image next to reading the image file directly
/// (same pieces, same buffer), on tmpfs and on disk (cold cache), interleaved run by run.
pub fn view_read(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    let mut places = vec![(a.shm_dir.clone(), false)];
    if a.disk {
        std::fs::create_dir_all(&a.disk_dir).map_err(|e| format!("{}: {e}", a.disk_dir.display()))?;
        places.push((a.disk_dir.clone(), true));
    }
    let size = a.size;
    for (dir, disk) in places {
        let fs = if !disk {
            "tmpfs".to_string()
        } else if drop_caches() {
            "disk (cold cache)".to_string()
        } else {
            "disk (WARM cache: cannot drop caches)".to_string()
        };
        eprint!("view read: {fs}, {} ", fmt_bytes(size));
        let (src, scratch) = (dir.join("bench-view-src.img"), dir.join("bench-view-scratch.img"));
        let cold = || if disk { drop_caches() } else { true };
        let (mut direct, mut view) = (vec![], vec![]);
        let res = (|| -> Result<(), String> {
            make_image(&src, size, Data::Random).map_err(err)?;
            let mut want = None;
            for run in 0..a.runs {
                for k in [run % 2, (run + 1) % 2] {
                    let _ = std::fs::remove_file(&scratch);
                    cold();
                    let source = Arc::new(FileDriver::open(&src, OpenFlags::empty()).map_err(err)?);
                    let sum = if k == 0 {
                        let (secs, sum) = read_all(&*source)?;
                        direct.push(secs);
                        sum
                    } else {
                        let target = Arc::new(FileDriver::create(&scratch, size).map_err(err)?);
                        let opts = BackupOptions { sync: SyncMode::None, ..Default::default() };
                        let job = backup_start(source, target, opts).map_err(err)?;
                        let v = job.snapshot().map_err(err)?;
                        let (secs, sum) = read_all(&*v)?;
                        let i = job.info();
                        if i.bytes_copied != 0 || allocated_bytes(&scratch).map_err(err)? != 0 {
                            return Err(format!("a view read copied data: {i:?}"));
                        }
                        job.complete().map_err(err)?;
                        job.wait().map_err(err)?;
                        view.push(secs);
                        sum
                    };
                    if *want.get_or_insert(sum) != sum {
                        return Err("VERIFY FAILED: the view and the file read differently".into());
                    }
                }
                eprint!(".");
            }
            Ok(())
        })();
        eprintln!();
        let _ = std::fs::remove_file(&src);
        let _ = std::fs::remove_file(&scratch);
        res?;
        let (d, v) = (summary(&direct), summary(&view));
        let ratio = d.median / v.median;
        rows.push(Row {
            scenario: format!(
                "snapshot view of a quiet {} image, sync=None, read in 4 MiB pieces, {fs}",
                fmt_bytes(size)
            ),
            cowbackup: format!("{} (nothing copied, scratch 0 blocks)", fmt_rate(size, v)),
            baseline: format!("the image file read directly: {}", fmt_rate(size, d)),
            ratio: format!("{ratio:.2}× the direct read"),
            target: check(ratio >= 0.9, "≥ 0.9× the direct read"),
        });
    }
    Ok(())
}

/// QD1 guest writes (64 KiB at random 4 KiB-aligned offsets, 2 ms apart) through `job`'s hook
/// until `done`; the latencies in ns.
fn guest(source: &FileDriver, job: &Job, done: &AtomicBool, seed: u64) -> Result<Vec<u64>, String> {
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; CLUSTER as usize];
    rng.fill(&mut buf);
    let size = source.size();
    let mut lat = Vec::new();
    while !done.load(Ordering::Acquire) {
        let off = rng.next() % ((size - CLUSTER) / 4096) * 4096;
        buf[..8].copy_from_slice(&rng.next().to_le_bytes());
        let t = Instant::now();
        job.cow_before_write(off, CLUSTER).map_err(err)?;
        source.write_at(&buf, off).map_err(err)?;
        lat.push(t.elapsed().as_nanos() as u64);
        thread::sleep(Duration::from_millis(2));
    }
    Ok(lat)
}

/// A fleecing job (sync=None into a scratch file on tmpfs) and a push job from its view
/// into `target`, with `discard_source`. Runs `during` with the fleecing job (its hook is the
/// guest's) until the push ends; returns `during`'s result and the push's duration.
fn fleece_push<T>(
    source: &Arc<FileDriver>,
    scratch: &Path,
    target: Arc<Throttled>,
    discard: bool,
    during: impl FnOnce(&Job, &Job) -> T,
) -> Result<(T, f64), String> {
    let size = source.size();
    let fleece = backup_start(
        source.clone(),
        Arc::new(FileDriver::create(scratch, size).map_err(err)?),
        BackupOptions { sync: SyncMode::None, ..Default::default() },
    )
    .map_err(err)?;
    let view = fleece.snapshot().map_err(err)?;
    let t = Instant::now();
    let push =
        backup_start(view, target, BackupOptions { discard_source: discard, ..Default::default() }).map_err(err)?;
    let r = during(&fleece, &push);
    push.wait().map_err(err)?;
    let secs = t.elapsed().as_secs_f64();
    fleece.complete().map_err(err)?;
    fleece.wait().map_err(err)?;
    Ok((r, secs))
}

/// Guest write latency during a backup into a slow target (100 MiB/s): fleecing (the hook
/// copies into a tmpfs scratch file, a push job from the view feeds the slow target) next to a
/// direct Full backup into the same slow target (the hook copies into it). Both verified.
pub fn fleece_latency(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    let size = a.size.min(GIB);
    let dir = &a.shm_dir;
    let (src, dst, refp, scratch) = (
        dir.join("bench-fl-src.img"),
        dir.join("bench-fl-dst.img"),
        dir.join("bench-fl-ref.img"),
        dir.join("bench-fl-scratch.img"),
    );
    eprint!("fleecing vs direct, guest writes: tmpfs, {} source, target at {}/s ", fmt_bytes(size), fmt_bytes(SLOW));
    let (mut fl, mut di) = (Lat::new(), Lat::new());
    let (mut t_fl, mut t_di) = (vec![], vec![]);
    let res = (|| -> Result<(), String> {
        make_image(&src, size, Data::Random).map_err(err)?;
        for run in 0..a.runs {
            for k in [run % 2, (run + 1) % 2] {
                let _ = std::fs::remove_file(&dst);
                let _ = std::fs::remove_file(&scratch);
                std::fs::copy(&src, &refp).map_err(err)?; // the point in time: no writer yet
                let source = Arc::new(FileDriver::open(&src, OpenFlags::WRITE).map_err(err)?);
                let target = Arc::new(Throttled::new(FileDriver::create(&dst, size).map_err(err)?, SLOW));
                let done = AtomicBool::new(false);
                let seed = 7 + run as u64;
                if k == 0 {
                    let (lat, secs) = fleece_push(&source, &scratch, target, true, |fleece, push| {
                        thread::scope(|s| {
                            let w = s.spawn(|| guest(&source, fleece, &done, seed));
                            let _ = push.wait();
                            done.store(true, Ordering::Release);
                            w.join().expect("guest panicked")
                        })
                    })?;
                    fl.add(lat?);
                    t_fl.push(secs);
                } else {
                    let t = Instant::now();
                    let job = backup_start(source.clone(), target, BackupOptions::default()).map_err(err)?;
                    let lat = thread::scope(|s| {
                        let w = s.spawn(|| guest(&source, &job, &done, seed));
                        let r = job.wait();
                        done.store(true, Ordering::Release);
                        (w.join().expect("guest panicked"), r)
                    });
                    lat.1.map_err(err)?;
                    t_di.push(t.elapsed().as_secs_f64());
                    di.add(lat.0?);
                }
                if let Some(at) = first_difference(&refp, &dst).map_err(err)? {
                    return Err(format!("VERIFY FAILED: the backup differs from the point in time at byte {at}"));
                }
            }
            eprint!(".");
        }
        Ok(())
    })();
    eprintln!();
    for p in [&src, &dst, &refp, &scratch] {
        let _ = std::fs::remove_file(p);
    }
    res?;
    let (p_fl, p_di) = (summary(&fl.p99).median, summary(&di.p99).median);
    rows.push(Row {
        scenario: format!(
            "guest QD1 64 KiB writes every 2 ms during a {} backup into a target throttled to {}/s: \
             fleecing (sync=None into a tmpfs scratch + push job from the view, discard_source; {} writes, verified)",
            fmt_bytes(size),
            fmt_bytes(SLOW),
            fl.writes
        ),
        cowbackup: format!("{}; backup {}", fl.fmt(), fmt_secs(summary(&t_fl))),
        baseline: format!(
            "direct sync=Full backup into the same target ({} writes): {}; backup {}",
            di.writes,
            di.fmt(),
            fmt_secs(summary(&t_di))
        ),
        ratio: format!("p99 {:.1}× lower with fleecing", p_di / p_fl),
        target: String::new(),
    });
    Ok(())
}

/// Peak scratch allocation of a fleecing push backup while the guest rewrites 10 % of the
/// device (distinct random clusters, spread over the backup), with `discard_source` next to
/// the same without it.
pub fn scratch_peak(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    let size = a.size.min(GIB);
    let dir = &a.shm_dir;
    let (src, dst, refp, scratch) = (
        dir.join("bench-sp-src.img"),
        dir.join("bench-sp-dst.img"),
        dir.join("bench-sp-ref.img"),
        dir.join("bench-sp-scratch.img"),
    );
    eprint!("scratch peak: tmpfs, {}, 10 % rewritten, target at {}/s ", fmt_bytes(size), fmt_bytes(SLOW));
    let n = size / CLUSTER;
    let rewrite = n / 10;
    // Spread the rewrites over 80 % of the expected backup time.
    let interval = Duration::from_secs_f64(0.8 * size as f64 / SLOW as f64 / rewrite as f64);
    let (mut peak, mut fin, mut rewritten) = ([vec![], vec![]], [vec![], vec![]], [vec![], vec![]]);
    let res = (|| -> Result<(), String> {
        make_image(&src, size, Data::Random).map_err(err)?;
        for run in 0..a.runs {
            for k in [run % 2, (run + 1) % 2] {
                let _ = std::fs::remove_file(&dst);
                let _ = std::fs::remove_file(&scratch);
                std::fs::copy(&src, &refp).map_err(err)?;
                let source = Arc::new(FileDriver::open(&src, OpenFlags::WRITE).map_err(err)?);
                let target = Arc::new(Throttled::new(FileDriver::create(&dst, size).map_err(err)?, SLOW));
                // The clusters to rewrite: a random 10 %, each once.
                let mut order: Vec<u64> = (0..n).collect();
                let mut rng = Rng(99 + run as u64);
                for i in (1..order.len()).rev() {
                    order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
                }
                order.truncate(rewrite as usize);
                let done = AtomicBool::new(false);
                let writes = AtomicU64::new(0);
                let ((p, w), _) = fleece_push(&source, &scratch, target, k == 0, |fleece, push| {
                    thread::scope(|s| {
                        let g = s.spawn(|| -> Result<(), String> {
                            let mut buf = vec![0u8; CLUSTER as usize];
                            let t = Instant::now();
                            for (i, &c) in order.iter().enumerate() {
                                if done.load(Ordering::Acquire) {
                                    break;
                                }
                                thread::sleep((interval * i as u32).saturating_sub(t.elapsed()));
                                buf[..8].copy_from_slice(&c.to_le_bytes());
                                fleece.cow_before_write(c * CLUSTER, CLUSTER).map_err(err)?;
                                source.write_at(&buf, c * CLUSTER).map_err(err)?;
                                writes.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(())
                        });
                        let mut p = 0;
                        while push.wait_timeout(Duration::from_millis(5)).is_none() {
                            p = p.max(allocated_bytes(&scratch).unwrap_or(0));
                        }
                        done.store(true, Ordering::Release);
                        let r = g.join().expect("guest panicked");
                        (p.max(allocated_bytes(&scratch).unwrap_or(0)), r)
                    })
                })?;
                w?;
                peak[k].push(p as f64);
                fin[k].push(allocated_bytes(&scratch).map_err(err)? as f64);
                rewritten[k].push(writes.load(Ordering::Relaxed) as f64 * CLUSTER as f64);
                if let Some(at) = first_difference(&refp, &dst).map_err(err)? {
                    return Err(format!("VERIFY FAILED: the backup differs from the point in time at byte {at}"));
                }
            }
            eprint!(".");
        }
        Ok(())
    })();
    eprintln!();
    for p in [&src, &dst, &refp, &scratch] {
        let _ = std::fs::remove_file(p);
    }
    res?;
    let mib = |v: &[f64]| {
        let s = summary(v);
        format!("{:.0} MiB ({:.0}–{:.0})", s.median / MIB as f64, s.min / MIB as f64, s.max / MIB as f64)
    };
    let pct = |v: &[f64]| summary(v).median * 100.0 / size as f64;
    rows.push(Row {
        scenario: format!(
            "fleecing push backup of {} into a target at {}/s while the guest rewrites 10 % of it \
             (rewritten during the backup: {:.1} %): scratch file allocation",
            fmt_bytes(size),
            fmt_bytes(SLOW),
            pct(&rewritten[0])
        ),
        cowbackup: format!(
            "with discard_source: peak {} = {:.1} % of the device, final {}",
            mib(&peak[0]),
            pct(&peak[0]),
            mib(&fin[0])
        ),
        baseline: format!("without discard: peak {} = {:.1} %, final {}", mib(&peak[1]), pct(&peak[1]), mib(&fin[1])),
        ratio: format!("{:.2}× the peak without discard", summary(&peak[0]).median / summary(&peak[1]).median),
        target: check(summary(&fin[0]).median == 0.0, "final allocation 0 with discard"),
    });
    Ok(())
}
