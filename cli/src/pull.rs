//! `cowbackup pull URI DST --bitmap NAME`: an incremental backup from any NBD server that
//! exports a dirty bitmap as the metadata context `qemu:dirty-bitmap:NAME` (QEMU's
//! pull-mode / fleecing exports, cowbackup's own server): only the dirty extents are read.

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use cowbackup::{
    backup_start, BackupOptions, BlockDriver, DirtyBitmap, NbdDriver, NbdOptions, SyncMode, MIN_CLUSTER_SIZE,
};
use serde_json::json;

use crate::progress::{run_to_end, ProgressArg};
use crate::util::{failed, is_nbd_uri, open_target, parse_size, print_json, usage, CliResult};

/// Arguments of `pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// The NBD export (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH).
    pub uri: String,
    /// The target: a new file (created sparse), a block device of the export's size, or
    /// a writable NBD URI. It receives the dirty extents at their offsets; the rest is left
    /// alone (holes in a new file).
    pub dst: String,
    /// The exported bitmap's name: the server's metadata context qemu:dirty-bitmap:NAME.
    #[arg(long, value_name = "NAME")]
    pub bitmap: String,
    /// Copy granularity (a power of two from 4K). Default: 64K, or less when the dirty
    /// extents are aligned to less (a cluster never reaches outside the bitmap: pull-mode
    /// servers refuse reads of clean areas).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub cluster_size: Option<u64>,
    /// Copy threads (1 to 64).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Write a manifest of the pulled incremental here when it completes (for `verify`).
    /// Must not exist.
    #[arg(long, value_name = "PATH")]
    pub manifest: Option<std::path::PathBuf>,
    /// The previous backup's manifest (the full backup, or the previous pull), linked as the
    /// parent of this one's, so `restore`/`serve --chain` take them as one chain.
    #[arg(long, value_name = "PATH", requires = "manifest")]
    pub parent_manifest: Option<std::path::PathBuf>,
    /// The disk's identity, recorded in the manifest.
    #[arg(long, value_name = "ID", requires = "manifest")]
    pub disk_id: Option<String>,
    /// Replace an existing target file.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub progress: ProgressArg,
    /// Print a JSON summary on stdout (also when the pull fails).
    #[arg(long)]
    pub json: bool,
}

/// The largest power of two dividing `x` (x > 0), capped.
fn alignment(x: u64, cap: u64) -> u64 {
    if x == 0 {
        cap
    } else {
        (1u64 << x.trailing_zeros()).min(cap)
    }
}

/// Run `pull`.
pub fn run(a: PullArgs) -> CliResult<()> {
    if !is_nbd_uri(&a.uri) {
        return Err(usage(format!("{}: pull reads an NBD URI (nbd://…, nbd+unix://…)", a.uri)));
    }
    if a.bitmap.is_empty() {
        return Err(usage("--bitmap NAME must not be empty"));
    }
    if let Some(cs) = a.cluster_size {
        if !cs.is_power_of_two() || cs < MIN_CLUSTER_SIZE {
            return Err(usage(format!("--cluster-size {cs}: a power of two from 4K")));
        }
    }
    let opts = NbdOptions { write: false, ..NbdOptions::default() };
    let source = NbdDriver::connect_with(&a.uri, &opts).map_err(|e| failed(format!("source {}: {e}", a.uri)))?;
    let size = source.size();
    let context = format!("qemu:dirty-bitmap:{}", a.bitmap);
    let started = Instant::now();
    let extents =
        source.context_extents(&context, 0, size).map_err(|e| failed(format!("dirty extents of {}: {e}", a.uri)))?;
    let dirty: Vec<(u64, u64)> = extents.iter().filter(|e| e.2 & 1 != 0).map(|e| (e.0, e.1)).collect();

    // The cluster size: every dirty extent must start and end on a cluster boundary (the
    // device's end counts as one), so no cluster read reaches a clean area.
    let want = a.cluster_size.unwrap_or(64 << 10);
    let mut align = want;
    for &(o, l) in &dirty {
        align = align.min(alignment(o, want));
        if o + l < size {
            align = align.min(alignment(o + l, want));
        }
    }
    if align < want && a.cluster_size.is_some() {
        return Err(failed(format!(
            "the dirty extents of {context} are aligned to {align} bytes only: use --cluster-size {align} or less"
        )));
    }
    if align < MIN_CLUSTER_SIZE {
        return Err(failed(format!(
            "the dirty extents of {context} are aligned to {align} bytes, less than the smallest cluster size {MIN_CLUSTER_SIZE}"
        )));
    }
    let cluster_size = align;
    let bitmap = DirtyBitmap::new(size, cluster_size).map_err(|e| failed(e.to_string()))?;
    for &(o, l) in &dirty {
        bitmap.mark(o, l).map_err(|e| failed(e.to_string()))?;
    }
    let dirty_bytes: u64 = dirty.iter().map(|e| e.1).sum();

    let job_opts = BackupOptions {
        cluster_size,
        sync: SyncMode::Bitmap,
        bitmap: Some(bitmap),
        workers: a.workers,
        manifest: a.manifest.clone(),
        parent_manifest: a.parent_manifest.clone(),
        disk_id: a.disk_id.clone(),
        ..BackupOptions::default()
    };
    job_opts.validate().map_err(|e| usage(e.to_string()))?;
    let (target, kind) = open_target(&a.dst, size, a.overwrite, false)?;
    let source: Arc<dyn BlockDriver> = Arc::new(source);
    let job = Arc::new(backup_start(source, target, job_opts).map_err(|e| failed(e.to_string()))?);
    let ended = run_to_end(job.clone(), a.progress.when, started)?;
    let (info, secs, error) = (&ended.info, ended.secs, ended.error.clone());
    if a.json {
        let mut v = json!({
            "result": ended.result_name(),
            "source": a.uri,
            "target": a.dst,
            "target_kind": kind.name(),
            "bitmap": context,
            "size": size,
            "cluster_size": cluster_size,
            "dirty_bytes": dirty_bytes,
            "dirty_extents": dirty.len(),
            "bytes_copied": info.bytes_copied,
            "bytes_zero": info.bytes_zero,
            "bytes_skipped": info.bytes_skipped,
            "seconds": secs,
        });
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
        Some(e) => Err(failed(format!("pull from {} to {} failed (the target is incomplete): {e}", a.uri, a.dst))),
    }
}
