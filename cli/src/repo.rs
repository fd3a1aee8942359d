//! `cowbackup verify`, `restore` and `consolidate`: backups with manifests, and chains of
//! them (the library's `repo` module).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use cowbackup::repo::{consolidate, verify_with, Chain, Manifest};
use cowbackup::{backup_start, BackupOptions, BlockDriver, FileDriver, NbdDriver, NbdOptions, OpenFlags};
use serde_json::json;

use crate::progress::{run_to_end, ProgressArg};
use crate::util::{failed, is_nbd_uri, open_rbd, open_target, print_json, CliResult};

/// Arguments of `verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The backup's manifest.
    pub manifest: PathBuf,
    /// The backup's image (file, block device, NBD URI, or RBD image `rbd:POOL/IMAGE` when
    /// built with the feature `rbd`); default: the target the manifest names (a file
    /// relative to the manifest's directory, or an RBD image).
    pub target: Option<String>,
    /// Print the report as JSON (also when clusters do not match).
    #[arg(long)]
    pub json: bool,
}

fn open_readonly(what: &str, s: &str) -> CliResult<Arc<dyn BlockDriver>> {
    if is_nbd_uri(s) {
        let opts = NbdOptions { write: false, ..NbdOptions::default() };
        return Ok(Arc::new(NbdDriver::connect_with(s, &opts).map_err(|e| failed(format!("{what} {s}: {e}")))?));
    }
    if s.starts_with("rbd:") {
        return open_rbd(what, s, false);
    }
    Ok(Arc::new(FileDriver::open(s, OpenFlags::empty()).map_err(|e| failed(format!("{what}: {e}")))?))
}

/// Run `verify`.
pub fn run_verify(a: VerifyArgs) -> CliResult<()> {
    let target = match &a.target {
        Some(t) => t.clone(),
        None => {
            let m =
                Manifest::load(&a.manifest).map_err(|e| failed(format!("manifest {}: {e}", a.manifest.display())))?;
            match (m.target_rbd(), m.target_path(&a.manifest)) {
                (Some(spec), _) => spec.to_string(),
                (None, Some(p)) => p.display().to_string(),
                (None, None) => {
                    return Err(failed(format!(
                        "manifest {} names no target file: give the target",
                        a.manifest.display()
                    )))
                }
            }
        }
    };
    let driver = open_readonly("target", &target)?;
    let started = Instant::now();
    let report = verify_with(&a.manifest, &*driver, &mut |_, _| true)
        .map_err(|e| failed(format!("verify of {} against {target}: {e}", a.manifest.display())))?;
    let secs = started.elapsed().as_secs_f64();
    let good = report.mismatched_clusters == 0;
    if a.json {
        let mm: Vec<_> = report.mismatches.iter().map(|&(o, l)| json!({"offset": o, "length": l})).collect();
        print_json(&json!({
            "result": if good { "ok" } else { "mismatch" },
            "manifest": a.manifest.display().to_string(),
            "target": target,
            "clusters_checked": report.clusters_checked,
            "bytes_checked": report.bytes_checked,
            "mismatched_clusters": report.mismatched_clusters,
            "mismatches": mm,
            "seconds": secs,
        }))?;
    } else if good {
        println!("{target}: ok ({} clusters, {} bytes checked)", report.clusters_checked, report.bytes_checked);
    }
    if good {
        return Ok(());
    }
    let first: Vec<String> = report.mismatches.iter().take(8).map(|(o, l)| format!("{o}+{l}")).collect();
    Err(failed(format!(
        "verify of {target}: {} of {} clusters do not match manifest {}, at bytes {}{}",
        report.mismatched_clusters,
        report.clusters_checked,
        a.manifest.display(),
        first.join(", "),
        if report.mismatches.len() > 8 { ", ..." } else { "" }
    )))
}

/// Arguments of `restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The chain's manifests, oldest (the full backup) first. Each backup's image is the
    /// target its manifest names: a file relative to the manifest, or an RBD image (built
    /// with the feature `rbd`; conf from $CEPH_CONF or /etc/ceph/ceph.conf).
    #[arg(required = true, num_args = 1.., value_name = "MANIFEST")]
    pub manifests: Vec<PathBuf>,
    /// The destination: a new file, a block device of the chain's size, a writable NBD
    /// URI, or an existing RBD image of the chain's size (rbd:POOL/IMAGE, feature rbd). An
    /// existing file is not replaced unless --overwrite.
    #[arg(required = true)]
    pub dst: String,
    /// Replace an existing destination file.
    #[arg(long)]
    pub overwrite: bool,
    /// Do not check each cluster against its manifest digest while reading.
    #[arg(long)]
    pub no_verify: bool,
    /// Background copy threads (1 to 64).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    #[command(flatten)]
    pub progress: ProgressArg,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Run `restore`.
pub fn run_restore(a: RestoreArgs) -> CliResult<()> {
    let (dst, manifests) = (&a.dst, &a.manifests);
    let chain = Chain::open(manifests, !a.no_verify).map_err(|e| failed(format!("chain: {e}")))?;
    let cluster_size = chain.cluster_size();
    let chain: Arc<dyn BlockDriver> = Arc::new(chain);
    let size = chain.size();
    let (target, kind) = open_target(dst, size, a.overwrite, false)?;
    let opts = BackupOptions { cluster_size, workers: a.workers, ..BackupOptions::default() };
    let started = Instant::now();
    let job = Arc::new(backup_start(chain, target, opts).map_err(|e| failed(format!("restore: {e}")))?);
    let ended = run_to_end(job.clone(), a.progress.when, started)?;
    let (info, secs, error) = (&ended.info, ended.secs, ended.error.clone());
    if a.json {
        let mut v = json!({
            "result": ended.result_name(),
            "manifests": manifests.iter().map(|m| m.display().to_string()).collect::<Vec<_>>(),
            "target": dst,
            "target_kind": kind.name(),
            "size": size,
            "bytes_copied": info.bytes_copied,
            "bytes_zero": info.bytes_zero,
            "seconds": secs,
        });
        if let Some(e) = &error {
            v["error"] = json!(e);
        }
        print_json(&v)?;
    }
    match error {
        None => Ok(()),
        Some(e) => Err(failed(format!("restore to {dst} failed (the destination is incomplete): {e}"))),
    }
}

/// Arguments of `consolidate`.
#[derive(Debug, Args)]
pub struct ConsolidateArgs {
    /// Manifests of consecutive backups of one chain, oldest first.
    #[arg(required = true)]
    pub manifests: Vec<PathBuf>,
    /// The new backup's image (must not exist).
    #[arg(long, value_name = "IMAGE")]
    pub target: PathBuf,
    /// The new backup's manifest (must not exist).
    #[arg(long, value_name = "PATH")]
    pub manifest: PathBuf,
    /// Print the new backup's summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Run `consolidate`.
pub fn run_consolidate(a: ConsolidateArgs) -> CliResult<()> {
    let m = consolidate(&a.manifests, &a.target, &a.manifest).map_err(|e| failed(format!("consolidate: {e}")))?;
    if a.json {
        print_json(&json!({
            "manifest": a.manifest.display().to_string(),
            "target": a.target.display().to_string(),
            "size": m.size,
            "cluster_size": m.cluster_size,
            "bytes_copied": m.bytes_copied,
            "bytes_zero": m.bytes_zero,
        }))?;
    }
    Ok(())
}
