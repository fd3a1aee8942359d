//! `cowbackup backup SRC DST`: a full or incremental backup of an image, a block device or
//! an NBD export that nobody writes meanwhile (or a snapshot of it).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};
use cowbackup::{backup_start, BackupOptions, BitmapMode, DirtyBitmap, SyncMode, DEFAULT_GRANULARITY};
use serde_json::json;

use crate::progress::{run_to_end, ProgressArg};
use crate::util::{failed, open_source, open_target, parse_size, print_json, usage, uuid_text, CliResult};

/// Which clusters a backup copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Sync {
    /// Every cluster.
    Full,
    /// Only the clusters the source reports allocated (sparse images).
    Top,
}

/// What happens to `--bitmap` at the end of the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Cleared of what was backed up only when the backup succeeds (the default).
    OnSuccess,
    /// Cleared of what was copied even when the backup fails.
    Always,
    /// Never cleared (only with --incremental).
    Never,
}

/// Arguments of `backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The source: an image file, a block device, an NBD URI
    /// (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH), or an RBD image
    /// rbd:POOL/IMAGE[@SNAP] (built with the feature rbd). Nobody may write it during the
    /// backup (back up a snapshot of a disk in use).
    pub src: String,
    /// The target: a new file (created sparse), a block device of the source's size, a
    /// writable NBD URI, or an existing RBD image of the source's size (rbd:POOL/IMAGE,
    /// feature rbd). An existing file is not replaced unless --overwrite.
    pub dst: String,
    /// Persistent dirty bitmap file of the source. With --incremental: copy only what it
    /// marks. Without: a full backup that starts a new chain (the file is created, with
    /// --granularity, if it does not exist). Either way a successful backup leaves in it
    /// only the writes made since the backup started.
    #[arg(long, value_name = "FILE")]
    pub bitmap: Option<PathBuf>,
    /// Copy only the clusters --bitmap marks dirty (an incremental backup).
    #[arg(long, requires = "bitmap")]
    pub incremental: bool,
    /// What happens to --bitmap at the end.
    #[arg(long, value_enum, default_value = "on-success", requires = "bitmap")]
    pub bitmap_mode: Mode,
    /// Granularity of a bitmap file that --bitmap creates (e.g. 64K).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub granularity: Option<u64>,
    /// Which clusters a non-incremental backup copies.
    #[arg(long, value_enum, default_value = "full", conflicts_with = "incremental")]
    pub sync: Sync,
    /// Cluster size, a power of two from 4K to 64M (e.g. 64K, 1M).
    #[arg(long, value_parser = parse_size, value_name = "SIZE", default_value = "64K")]
    pub cluster_size: u64,
    /// Copy speed limit in bytes per second (e.g. 100M); 0 = unlimited.
    #[arg(long, value_parser = parse_size, value_name = "BYTES", default_value = "0")]
    pub speed: u64,
    /// Background copy threads (1 to 64).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Largest copy request (e.g. 1M, 8M).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub max_chunk: Option<u64>,
    /// Write a manifest of the backup here when it completes (what the target holds, a
    /// digest per copied cluster): for `verify`, `restore` and `consolidate`. Must not exist.
    #[arg(long, value_name = "PATH")]
    pub manifest: Option<PathBuf>,
    /// The source disk's identity, recorded in the manifest (and adopted by the bitmap);
    /// a chain links only backups of one disk id.
    #[arg(long, value_name = "ID")]
    pub disk_id: Option<String>,
    /// The previous backup's manifest, linked as the parent of this incremental's manifest.
    #[arg(long, value_name = "PATH", requires = "manifest")]
    pub parent_manifest: Option<PathBuf>,
    /// Replace an existing target file.
    #[arg(long)]
    pub overwrite: bool,
    /// Bypass the page cache (O_DIRECT) on files and block devices.
    #[arg(long)]
    pub direct: bool,
    #[command(flatten)]
    pub progress: ProgressArg,
    /// Print a JSON summary on stdout (also when the backup fails).
    #[arg(long)]
    pub json: bool,
}

fn bitmap_json(bm: &DirtyBitmap) -> serde_json::Value {
    let i = bm.info();
    json!({
        "uuid": uuid_text(&i.uuid),
        "generation": i.generation,
        "granularity": i.granularity,
        "count": i.count,
    })
}

/// Run `backup`.
pub fn run(a: BackupArgs) -> CliResult<()> {
    if a.incremental && a.sync != Sync::Full {
        return Err(usage("--sync does not apply to --incremental"));
    }
    if a.bitmap_mode == Mode::Never && !a.incremental {
        return Err(usage("--bitmap-mode never needs --incremental (a full backup must reset the bitmap)"));
    }
    if a.granularity.is_some() && a.bitmap.is_none() {
        return Err(usage("--granularity needs --bitmap"));
    }
    let source = open_source(&a.src, a.direct)?;
    let size = source.size();

    let bitmap = match &a.bitmap {
        None => None,
        Some(path) if a.incremental => {
            Some(DirtyBitmap::open(path).map_err(|e| failed(format!("bitmap {}: {e}", path.display())))?)
        }
        Some(path) => match DirtyBitmap::open(path) {
            Ok(b) => Some(b),
            Err(e) if e.errno() == libc::ENOENT => Some(
                DirtyBitmap::create(path, size, a.granularity.unwrap_or(DEFAULT_GRANULARITY))
                    .map_err(|e| failed(format!("bitmap {}: {e}", path.display())))?,
            ),
            Err(e) => return Err(failed(format!("bitmap {}: {e}", path.display()))),
        },
    };
    if let Some(bm) = &bitmap {
        if bm.size() != size {
            return Err(failed(format!(
                "bitmap {}: covers {} bytes, the source has {size}",
                a.bitmap.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                bm.size()
            )));
        }
    }

    let mut opts = BackupOptions {
        cluster_size: a.cluster_size,
        sync: if a.incremental {
            SyncMode::Bitmap
        } else if a.sync == Sync::Top {
            SyncMode::Top
        } else {
            SyncMode::Full
        },
        workers: a.workers,
        speed: a.speed,
        bitmap: bitmap.clone(),
        manifest: a.manifest.clone(),
        disk_id: a.disk_id.clone(),
        parent_manifest: a.parent_manifest.clone(),
        bitmap_mode: match a.bitmap_mode {
            Mode::OnSuccess => BitmapMode::OnSuccess,
            Mode::Always => BitmapMode::Always,
            Mode::Never => BitmapMode::Never,
        },
        ..BackupOptions::default()
    };
    if let Some(c) = a.max_chunk {
        opts.max_chunk = c;
    }
    // Bad options are usage errors, found before the target is created.
    opts.validate().map_err(|e| usage(e.to_string()))?;

    let (target, kind) = open_target(&a.dst, size, a.overwrite, a.direct)?;
    let started = Instant::now();
    let job = Arc::new(backup_start(source, target, opts).map_err(|e| failed(e.to_string()))?);

    let ended = run_to_end(job.clone(), a.progress.when, started)?;
    let (info, secs, error) = (&ended.info, ended.secs, ended.error.clone());
    if a.json {
        let mut v = json!({
            "result": ended.result_name(),
            "source": a.src,
            "target": a.dst,
            "target_kind": kind.name(),
            "sync": if a.incremental { "bitmap" } else if a.sync == Sync::Top { "top" } else { "full" },
            "size": info.len,
            "cluster_size": a.cluster_size,
            "bytes_done": info.offset,
            "bytes_copied": info.bytes_copied,
            "bytes_zero": info.bytes_zero,
            "bytes_skipped": info.bytes_skipped,
            "bytes_failed": info.bytes_failed,
            "seconds": secs,
            "bytes_per_second": if secs > 0.0 { (info.offset as f64 / secs) as u64 } else { 0 },
        });
        if let Some(bm) = &bitmap {
            v["bitmap"] = bitmap_json(bm);
            v["bitmap"]["path"] = json!(a.bitmap.as_ref().map(|p| p.display().to_string()));
        }
        if let Some(m) = &a.manifest {
            v["manifest"] = json!(m.display().to_string());
        }
        if let Some(e) = &error {
            v["error"] = json!(e);
        }
        print_json(&v)?;
    }
    match error {
        None => Ok(()),
        Some(e) => Err(failed(format!("backup of {} to {} failed (the target is incomplete): {e}", a.src, a.dst))),
    }
}
