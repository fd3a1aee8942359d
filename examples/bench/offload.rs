//! The copy primitive, per filesystem: does `copy_file_range` pay?
//!
//! One thread copies a random-data image (`--size`, at most 1 GiB) in 1 MiB requests,
//! through `FileDriver`, two ways:
//!
//! - **read + write**: `read_at` into a buffer, zero check of each 64 KiB, `write_at`
//!   (what a job does where copy offload does not pay);
//! - **read + copy_file_range**: `read_at` and the zero check, then `copy_range_to`
//!   instead of the write (what a job does where [`FileDriver::copy_offload_pays`]).
//!
//! Each into a new and a preallocated file, flushed at the end, on tmpfs, the disk
//! directory with the source in the page cache and with a cold cache, and every
//! `--extra-dir` (cold). Runs interleave the methods and rotate their order.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cowbackup::{buffer_is_zero, AlignedBuf, BlockDriver, FileDriver, OpenFlags};

use crate::throughput::Target;
use crate::util::*;
use crate::Args;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    ReadWrite,
    ReadCfr,
}

const METHODS: [Method; 2] = [Method::ReadWrite, Method::ReadCfr];

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Copy `src` to `dst` (prepared as `target` wants) one way; seconds including the flush.
fn copy_once(src: &Path, dst: &Path, size: u64, m: Method, target: Target) -> Result<f64, String> {
    let t = Instant::now();
    let s = FileDriver::open(src, OpenFlags::empty()).map_err(err)?;
    let d = match target {
        Target::New => FileDriver::create(dst, size).map_err(err)?,
        Target::Prealloc => FileDriver::open(dst, OpenFlags::WRITE).map_err(err)?,
    };
    let mut buf = AlignedBuf::with_len(MIB as usize);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB);
        let b = buf.slice_mut(n as usize);
        s.read_at(b, off).map_err(err)?;
        // The zero check a job does; random data, so never zero.
        if b.chunks(CLUSTER as usize).any(buffer_is_zero) {
            return Err(format!("unexpected zero cluster near {off}"));
        }
        match m {
            Method::ReadWrite => d.write_at(buf.slice_mut(n as usize), off).map_err(err)?,
            Method::ReadCfr => s.copy_range_to(&d, off, n).map_err(err)?,
        }
        off += n;
    }
    d.flush().map_err(err)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Read all of `p` (to have it in the page cache).
fn warm(p: &Path) -> Result<(), String> {
    let f = FileDriver::open(p, OpenFlags::empty()).map_err(err)?;
    let mut buf = AlignedBuf::with_len(4 * MIB as usize);
    let mut off = 0;
    while off < f.size() {
        let n = (f.size() - off).min(4 * MIB);
        f.read_at(buf.slice_mut(n as usize), off).map_err(err)?;
        off += n;
    }
    Ok(())
}

pub fn offload(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    // (directory, cold cache)
    let mut places: Vec<(PathBuf, bool)> = vec![(a.shm_dir.clone(), false)];
    if a.disk {
        std::fs::create_dir_all(&a.disk_dir).map_err(|e| format!("{}: {e}", a.disk_dir.display()))?;
        places.push((a.disk_dir.clone(), false));
        places.push((a.disk_dir.clone(), true));
    }
    places.extend(a.extra_dirs.iter().map(|d| (d.clone(), true)));
    // At most 1 GiB: the slow method on a cold disk takes 5-10 s per GiB here.
    let size = a.size.min(GIB);
    for (dir, cold) in places {
        let fs = fs_name(&dir);
        let cache = match (fs.as_str(), cold) {
            ("tmpfs", _) => String::new(),
            (_, false) => " (source in the page cache)".into(),
            (_, true) if drop_caches() => " (cold cache)".into(),
            (_, true) => " (WARM cache: cannot drop caches)".into(),
        };
        let (src, dst) = (dir.join("bench-offload-src.img"), dir.join("bench-offload-dst.img"));
        eprint!("offload: {fs}{cache}, {} ", fmt_bytes(size));
        make_image(&src, size, Data::Random).map_err(err)?;
        let pays = {
            let d = create_new(&dst, size).map_err(err)?;
            FileDriver::open(&src, OpenFlags::empty()).map_err(err)?.copy_offload_pays(&d)
        };
        let contenders: Vec<(Method, Target)> =
            Target::BOTH.iter().flat_map(|&t| METHODS.iter().map(move |&m| (m, t))).collect();
        let mut secs = vec![Vec::new(); contenders.len()];
        let res = (|| -> Result<(), String> {
            for run in 0..a.runs {
                for k in (0..contenders.len()).map(|k| (k + run) % contenders.len()) {
                    let (m, target) = contenders[k];
                    target.prepare(&dst, size)?;
                    if cold {
                        drop_caches();
                    } else {
                        warm(&src)?;
                    }
                    secs[k].push(copy_once(&src, &dst, size, m, target)?);
                }
                eprint!(".");
            }
            Ok(())
        })();
        eprintln!();
        let _ = std::fs::remove_file(&dst);
        let _ = std::fs::remove_file(&src);
        res?;
        for target in Target::BOTH {
            let get = |m: Method| {
                let k = contenders.iter().position(|&c| c == (m, target)).expect("contender");
                summary(&secs[k])
            };
            let (rw, rc) = (get(Method::ReadWrite), get(Method::ReadCfr));
            rows.push(Row {
                scenario: format!(
                    "copy primitive, {fs}{cache}, random data, {}, {}: 1 MiB requests, 1 thread",
                    fmt_bytes(size),
                    target.name()
                ),
                cowbackup: format!("read + copy_file_range: {}", fmt_rate(size, rc)),
                baseline: format!("read + write: {}", fmt_rate(size, rw)),
                ratio: format!("{:.2}× read + write", rw.median / rc.median),
                target: format!("jobs use copy offload here: {}", if pays { "yes" } else { "no" }),
            });
        }
    }
    Ok(())
}
