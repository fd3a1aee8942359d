//! Manifests (issue 24), side by side in one run: a full backup with a manifest against the
//! same backup without; `repo::verify` of the backup against `b3sum` (or `sha256sum`) of
//! the same file; a restore of a full + 3 incrementals through `repo::Chain` against
//! `qemu-img convert` of the equivalent qcow2 chain (full + 3 overlays with backing files).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use cowbackup::repo::{verify, Chain};
use cowbackup::{backup_start, BackupOptions, BlockDriver, DirtyBitmap, FileDriver, NbdDriver, OpenFlags, SyncMode};

use crate::util::*;
use crate::Args;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let o = cmd.output().map_err(err)?;
    if !o.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr)));
    }
    Ok(())
}

/// A full backup of `src` into a new `dst` (and `manifest` when given); seconds.
fn full(src: &Path, dst: &Path, manifest: Option<&Path>) -> Result<f64, String> {
    let _ = std::fs::remove_file(dst);
    if let Some(m) = manifest {
        let _ = std::fs::remove_file(m);
    }
    let t = Instant::now();
    let s = Arc::new(FileDriver::open(src, OpenFlags::empty()).map_err(err)?);
    let d = Arc::new(FileDriver::create(dst, s.size()).map_err(err)?);
    let opts = BackupOptions { manifest: manifest.map(Path::to_path_buf), ..Default::default() };
    backup_start(s, d, opts).map_err(err)?.wait().map_err(err)?;
    Ok(t.elapsed().as_secs_f64())
}

pub fn manifest(a: &Args, rows: &mut Vec<Row>) -> Result<(), String> {
    let mut dirs = vec![("tmpfs", a.shm_dir.clone())];
    if a.disk {
        dirs.push(("disk", a.disk_dir.clone()));
    }
    let sum_tool = if have("b3sum") { "b3sum" } else { "sha256sum" };
    for (where_, dir) in dirs {
        std::fs::create_dir_all(&dir).map_err(err)?;
        let p = |n: &str| dir.join(format!("bench-manifest-{n}"));
        let src = p("src.img");
        eprint!("manifest ({where_}): {} random ", fmt_bytes(a.size));
        make_image(&src, a.size, Data::Random).map_err(err)?;
        // 1. Full backup with and without a manifest, interleaved.
        let (mut with, mut without) = (vec![], vec![]);
        for _ in 0..a.runs {
            without.push(full(&src, &p("dst.img"), None)?);
            with.push(full(&src, &p("dst.img"), Some(&p("dst.manifest")))?);
            eprint!(".");
        }
        let (w, wo) = (summary(&with), summary(&without));
        let ratio = wo.median / w.median;
        let want = if where_ == "tmpfs" { 0.85 } else { 0.97 };
        rows.push(Row {
            scenario: format!("full backup with manifest, {where_}, {}", fmt_bytes(a.size)),
            cowbackup: fmt_rate(a.size, w),
            baseline: format!("without manifest {}", fmt_rate(a.size, wo)),
            ratio: format!("{ratio:.2}x"),
            target: check(ratio >= want, format!(">= {want}x")),
        });
        // 2. verify against b3sum / sha256sum of the same file.
        let (mut ver, mut sum) = (vec![], vec![]);
        let target = FileDriver::open(p("dst.img"), OpenFlags::empty()).map_err(err)?;
        for _ in 0..a.runs {
            let t = Instant::now();
            verify(p("dst.manifest"), &target).map_err(err)?;
            ver.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            run(Command::new(sum_tool).arg(p("dst.img")))?;
            sum.push(t.elapsed().as_secs_f64());
            eprint!(".");
        }
        let (v, s) = (summary(&ver), summary(&sum));
        let ratio = s.median / v.median;
        rows.push(Row {
            scenario: format!("verify of the backup, {where_}, {}", fmt_bytes(a.size)),
            cowbackup: fmt_rate(a.size, v),
            baseline: format!("{sum_tool} {}", fmt_rate(a.size, s)),
            ratio: format!("{ratio:.2}x"),
            target: check(ratio >= 0.9, ">= 0.9x"),
        });
        // 3. A chain: full + 3 incrementals, each after rewriting ~10 % of the clusters.
        if have("qemu-img") {
            restore(a, &dir, &src, where_, rows)?;
        }
        for e in std::fs::read_dir(&dir).map_err(err)? {
            let e = e.map_err(err)?;
            if e.file_name().to_string_lossy().starts_with("bench-manifest-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        eprintln!();
    }
    Ok(())
}

/// On disk the page cache is dropped before each restore (both read their chain cold).
fn restore(a: &Args, dir: &Path, src: &Path, where_: &str, rows: &mut Vec<Row>) -> Result<(), String> {
    let disk = where_ == "disk";
    let p = |n: &str| dir.join(format!("bench-manifest-{n}"));
    let source = Arc::new(FileDriver::open(src, OpenFlags::WRITE).map_err(err)?);
    let size = a.size;
    let bm = DirtyBitmap::new(size, 65536).map_err(err)?;
    let mut manifests: Vec<PathBuf> = Vec::new();
    let mut rng = Rng(0x5eed ^ size);
    let mut qcow: Vec<PathBuf> = Vec::new();
    for n in 0..4 {
        let mut changed: Vec<u64> = Vec::new();
        if n > 0 {
            let mut buf = vec![0u8; 65536];
            for _ in 0..size / 65536 / 10 {
                let c = rng.next() % (size / 65536);
                rng.fill(&mut buf);
                source.write_at(&buf, c * 65536).map_err(err)?;
                bm.mark(c * 65536, 65536).map_err(err)?;
                changed.push(c);
            }
        }
        let (img, mf) = (p(&format!("c{n}.img")), p(&format!("c{n}.manifest")));
        let t = Arc::new(FileDriver::create(&img, size).map_err(err)?);
        let opts = BackupOptions {
            sync: if n == 0 { SyncMode::Full } else { SyncMode::Bitmap },
            bitmap: Some(bm.clone()),
            manifest: Some(mf.clone()),
            ..Default::default()
        };
        backup_start(source.clone(), t, opts).map_err(err)?.wait().map_err(err)?;
        manifests.push(mf);
        // The equivalent qcow2 chain: the full image, then overlays (backing file: the
        // previous one) that hold exactly the clusters written in their round.
        let q = p(&format!("q{n}.qcow2"));
        match qcow.last() {
            None => run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(src).arg(&q))?,
            Some(prev) => qcow2_overlay(dir, prev, &q, &source, changed)?,
        }
        qcow.push(q);
    }
    let (mut cow, mut qemu) = (vec![], vec![]);
    for _ in 0..a.runs {
        let out = p("restored.img");
        let _ = std::fs::remove_file(&out);
        if disk {
            drop_caches();
        }
        let t = Instant::now();
        let chain = Arc::new(Chain::open(&manifests, false).map_err(err)?);
        let dst = Arc::new(FileDriver::create(&out, size).map_err(err)?);
        backup_start(chain, dst, BackupOptions::default()).map_err(err)?.wait().map_err(err)?;
        cow.push(t.elapsed().as_secs_f64());
        if first_difference(&out, src).map_err(err)?.is_some() {
            return Err("the chain restore differs from the source".into());
        }
        let qout = p("qrestored.img");
        let _ = std::fs::remove_file(&qout);
        if disk {
            drop_caches();
        }
        let t = Instant::now();
        run(Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(qcow.last().expect("4 overlays"))
            .arg(&qout))?;
        // qemu-img's target cache mode is `unsafe` (no flush): flush it as cowbackup's job
        // flushes its target before it completes, so both times end with the data durable.
        std::fs::File::open(&qout).and_then(|f| f.sync_data()).map_err(err)?;
        qemu.push(t.elapsed().as_secs_f64());
        if first_difference(&qout, src).map_err(err)?.is_some() {
            return Err("the qcow2 chain's restore differs from the source".into());
        }
        eprint!(".");
    }
    let (c, q) = (summary(&cow), summary(&qemu));
    let ratio = q.median / c.median;
    rows.push(Row {
        scenario: format!("restore full + 3 incrementals, {where_}, {}", fmt_bytes(size)),
        cowbackup: format!("chain + job {}", fmt_rate(size, c)),
        baseline: format!("qemu-img convert of qcow2 chain {}", fmt_rate(size, q)),
        ratio: format!("{ratio:.2}x"),
        target: check(ratio >= 0.9, ">= 0.9x"),
    });
    Ok(())
}

/// A qcow2 overlay `q` over `backing` that holds exactly the clusters `changed` of
/// `source` (what `qemu-img rebase` of a whole image cannot make: an image converted
/// whole keeps every cluster allocated). Written through `qemu-nbd`, in cluster order.
fn qcow2_overlay(
    dir: &Path,
    backing: &Path,
    q: &Path,
    source: &FileDriver,
    mut changed: Vec<u64>,
) -> Result<(), String> {
    let size = source.size();
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(backing)
        .arg(q)
        .arg(size.to_string()))?;
    let sock = dir.join("bench-manifest-overlay.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "qcow2", "--cache=writeback", "-k"]).arg(&sock).arg(q);
    let server = crate::nbd::Proc::start(cmd, &sock)?;
    let nbd = NbdDriver::connect(&server.uri()).map_err(err)?;
    changed.sort_unstable();
    changed.dedup();
    let mut buf = vec![0u8; 65536];
    for c in changed {
        source.read_at(&mut buf, c * 65536).map_err(err)?;
        nbd.write_at(&buf, c * 65536).map_err(err)?;
    }
    nbd.flush().map_err(err)?;
    drop(nbd);
    drop(server);
    let _ = std::fs::remove_file(&sock);
    Ok(())
}
