//! Latency scenarios: the hook alone (fast and slow path) and many threads hammering
//! the hook (guest writes during a backup: guest.rs).

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use cowbackup::{backup_start, AlignedBuf, BackupOptions, BlockDriver, FileDriver, Job, OpenFlags, SyncMode};

use crate::util::*;
use crate::Args;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A job that only serves the hook (`sync=None`): nothing is copied behind our back.
fn hook_only_job(src: &Path, dst: &Path) -> Result<(Job, Arc<FileDriver>), String> {
    let source = Arc::new(FileDriver::open(src, OpenFlags::WRITE).map_err(err)?);
    let target = Arc::new(create_new(dst, source.size()).map_err(err)?);
    let job = backup_start(source.clone(), target, BackupOptions { sync: SyncMode::None, ..Default::default() })
        .map_err(err)?;
    Ok((job, source))
}

fn shuffled_clusters(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut rng = Rng(seed);
    for i in (1..v.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// Hook latency: `cow_before_write` of 64 KiB on copied and on uncopied clusters,
/// next to a plain 64 KiB read + write of the same drivers.
pub fn hook(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    let size = a.size.min(GIB);
    let dir = &a.shm_dir;
    let (src, dst, base) =
        (dir.join("bench-hook-src.img"), dir.join("bench-hook-dst.img"), dir.join("bench-hook-base.img"));
    eprint!("hook latency: tmpfs, {} source ", fmt_bytes(size));
    make_image(&src, size, Data::Random).map_err(err)?;
    let n = size / CLUSTER;
    let samples = n.min(8192) as usize;
    let (mut slow, mut plain, mut fast) = (Lat::new(), Lat::new(), Lat::new());
    let mut fast_batch = Vec::new();
    let mut timer = Vec::new();
    let res = (|| -> Result<(), String> {
        for run in 0..a.runs {
            let (job, _source) = hook_only_job(&src, &dst)?;
            let source = FileDriver::open(&src, OpenFlags::empty()).map_err(err)?;
            let basef = create_new(&base, size).map_err(err)?;
            let order = shuffled_clusters(n, 77 + run as u64);
            let mut buf = AlignedBuf::with_len(CLUSTER as usize);
            let (mut s, mut p) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
            // Alternate blocks of 256 so both see the same conditions.
            for block in order[..samples].chunks(512) {
                let (h, b) = block.split_at(block.len() / 2);
                for &c in h {
                    let t = Instant::now();
                    job.cow_before_write(c * CLUSTER, CLUSTER).map_err(err)?;
                    s.push(t.elapsed().as_nanos() as u64);
                }
                for &c in b {
                    let t = Instant::now();
                    let d = buf.slice_mut(CLUSTER as usize);
                    source.read_at(d, c * CLUSTER).map_err(err)?;
                    basef.write_at(d, c * CLUSTER).map_err(err)?;
                    p.push(t.elapsed().as_nanos() as u64);
                }
            }
            slow.add(s);
            plain.add(p);
            // Fast path: clusters copied above, in random order.
            let copied: Vec<u64> =
                order[..samples].chunks(512).flat_map(|b| b[..b.len() / 2].iter().copied()).collect();
            let mut f = Vec::with_capacity(copied.len() * 8);
            for _ in 0..8 {
                for &c in &copied {
                    let t = Instant::now();
                    job.cow_before_write(c * CLUSTER, CLUSTER).map_err(err)?;
                    f.push(t.elapsed().as_nanos() as u64);
                }
            }
            fast.add(f);
            // Batches: the mean of 10 000 calls without a clock read in between.
            for _ in 0..20 {
                let t = Instant::now();
                for i in 0..10_000usize {
                    let c = copied[i % copied.len()];
                    job.cow_before_write(c * CLUSTER, CLUSTER).map_err(err)?;
                }
                fast_batch.push(t.elapsed().as_nanos() as f64 / 10_000.0);
            }
            let mut tv = Vec::with_capacity(10_000);
            for _ in 0..10_000 {
                let t = Instant::now();
                tv.push(t.elapsed().as_nanos() as u64);
            }
            tv.sort_unstable();
            timer.push(quantile(&tv, 0.5) as f64);
            job.cancel();
            let _ = job.wait();
            eprint!(".");
        }
        Ok(())
    })();
    eprintln!();
    for p in [&src, &dst, &base] {
        let _ = std::fs::remove_file(p);
    }
    res?;
    let batch = summary(&fast_batch);
    let (sp50, pp50) = (summary(&slow.p50).median, summary(&plain.p50).median);
    rows.push(Row {
        scenario: "hook, 64 KiB, cluster already copied (fast path), tmpfs".into(),
        cowbackup: format!(
            "{}; mean over batches of 10 000 calls {} ({}–{})",
            fast.fmt(),
            fmt_ns(batch.median),
            fmt_ns(batch.min),
            fmt_ns(batch.max)
        ),
        baseline: format!("plain 64 KiB read + write: p50 {}", fmt_ns(pp50)),
        ratio: format!("{:.4}× the plain I/O", batch.median / pp50),
        target: check(
            batch.median <= 100.0,
            format!("median ≤ 100 ns (per-call figures include a clock read of {})", fmt_ns(summary(&timer).median)),
        ),
    });
    rows.push(Row {
        scenario: "hook, 64 KiB, cluster not yet copied (slow path: read + write one cluster), tmpfs".into(),
        cowbackup: slow.fmt(),
        baseline: format!("plain 64 KiB read + write: {}", plain.fmt()),
        ratio: format!("{:.2}× at p50", sp50 / pp50),
        target: check(sp50 <= 1.3 * pp50, "p50 ≤ 1.3× plain"),
    });
    Ok(())
}

/// N threads hammering the hook, on copied and on uncopied clusters: calls/s.
pub fn contention(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    let size = a.size.min(GIB);
    let dir = &a.shm_dir;
    let (src, dst, base) =
        (dir.join("bench-cont-src.img"), dir.join("bench-cont-dst.img"), dir.join("bench-cont-base.img"));
    eprint!("contention: tmpfs, {} source ", fmt_bytes(size));
    let n = size / CLUSTER;
    let threads = [1usize, 2, 4, 8];
    let mut fast: Vec<Vec<f64>> = vec![vec![]; threads.len()];
    let mut slow: Vec<Vec<f64>> = vec![vec![]; threads.len()];
    let mut plain: Vec<Vec<f64>> = vec![vec![]; threads.len()];
    let res = (|| -> Result<(), String> {
        make_image(&src, size, Data::Random).map_err(err)?;
        for _ in 0..a.runs {
            for (ti, &nt) in threads.iter().enumerate() {
                // Uncopied: every thread copies its own share of the clusters, interleaved.
                let (job, _s) = hook_only_job(&src, &dst)?;
                let t = Instant::now();
                thread::scope(|s| {
                    let hs: Vec<_> = (0..nt)
                        .map(|k| {
                            let job = &job;
                            s.spawn(move || -> Result<(), String> {
                                let mut c = k as u64;
                                while c < n {
                                    job.cow_before_write(c * CLUSTER, CLUSTER).map_err(err)?;
                                    c += nt as u64;
                                }
                                Ok(())
                            })
                        })
                        .collect();
                    hs.into_iter().try_for_each(|h| h.join().expect("panicked"))
                })?;
                slow[ti].push(n as f64 / t.elapsed().as_secs_f64());
                // Copied: random clusters, all clean now.
                let per = 2_000_000u64 / nt as u64;
                let t = Instant::now();
                thread::scope(|s| {
                    let hs: Vec<_> = (0..nt)
                        .map(|k| {
                            let job = &job;
                            s.spawn(move || -> Result<(), String> {
                                let mut rng = Rng(k as u64 * 7 + 1);
                                for _ in 0..per {
                                    let c = rng.next() % n;
                                    job.cow_before_write(c * CLUSTER, CLUSTER).map_err(err)?;
                                }
                                Ok(())
                            })
                        })
                        .collect();
                    hs.into_iter().try_for_each(|h| h.join().expect("panicked"))
                })?;
                fast[ti].push((per * nt as u64) as f64 / t.elapsed().as_secs_f64());
                job.cancel();
                let _ = job.wait();
                drop(job);
                // Plain read + write of the same clusters, same threads.
                let source = FileDriver::open(&src, OpenFlags::empty()).map_err(err)?;
                let basef = create_new(&base, size).map_err(err)?;
                let t = Instant::now();
                thread::scope(|s| {
                    let hs: Vec<_> = (0..nt)
                        .map(|k| {
                            let (source, basef) = (&source, &basef);
                            s.spawn(move || -> Result<(), String> {
                                let mut buf = AlignedBuf::with_len(CLUSTER as usize);
                                let d = buf.slice_mut(CLUSTER as usize);
                                let mut c = k as u64;
                                while c < n {
                                    source.read_at(d, c * CLUSTER).map_err(err)?;
                                    basef.write_at(d, c * CLUSTER).map_err(err)?;
                                    c += nt as u64;
                                }
                                Ok(())
                            })
                        })
                        .collect();
                    hs.into_iter().try_for_each(|h| h.join().expect("panicked"))
                })?;
                plain[ti].push(n as f64 / t.elapsed().as_secs_f64());
            }
            eprint!(".");
        }
        Ok(())
    })();
    eprintln!();
    for p in [&src, &dst, &base] {
        let _ = std::fs::remove_file(p);
    }
    res?;
    let fmt_rate = |s: Summary| format!("{:.2} M/s ({:.2}–{:.2})", s.median / 1e6, s.min / 1e6, s.max / 1e6);
    let fmt_k = |s: Summary| format!("{:.0} k/s ({:.0}–{:.0})", s.median / 1e3, s.min / 1e3, s.max / 1e3);
    let f1 = summary(&fast[0]).median;
    for (ti, &nt) in threads.iter().enumerate() {
        let (f, s, p) = (summary(&fast[ti]), summary(&slow[ti]), summary(&plain[ti]));
        rows.push(Row {
            scenario: format!("contention, {nt} thread(s) calling the hook, 64 KiB, tmpfs"),
            cowbackup: format!("copied clusters {}; uncopied clusters {}", fmt_rate(f), fmt_k(s)),
            baseline: format!("plain 64 KiB read + write: {}", fmt_k(p)),
            ratio: format!("fast {:.2}× 1 thread; slow {:.2}× plain", f.median / f1, s.median / p.median),
            target: String::new(),
        });
    }
    Ok(())
}
