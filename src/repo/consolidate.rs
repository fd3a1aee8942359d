//! `consolidate`: merge a part of a backup chain into one backup with its own manifest
//! (QEMU's block-commit, a backup server's prune), crash-safe.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::chain::Chain;
use super::format::{BitmapRef, Manifest, Run};
use super::record::{file_target_name, io_err, relative_to};
use crate::error::{Error, ErrorKind, Result};
use crate::BlockDriver;

/// Bytes read and written at a time.
const CHUNK: u64 = 1 << 20;

fn exists_error(what: &str, path: &Path) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        libc::EEXIST,
        format!("{what} {} exists: consolidate never writes over an existing file", path.display()),
    )
}

/// Merge the backups of `manifests` (a contiguous part of a chain, oldest first: a full
/// backup and incrementals after it, or consecutive incrementals) into one new backup:
/// the image `target_path` and its manifest `manifest_path` (both must not exist).
///
/// The new backup holds the union of their copy sets, each cluster from the newest of them
/// that holds it, read with verify-on-read (a damaged cluster fails the merge with
/// `EBADMSG`: damage is never carried into the new backup). Its manifest takes the first
/// one's parent and bitmap start generation and the last one's bitmap end generation, and
/// records the last one's root as `replaces_root`: in a chain the consolidated backup
/// stands where the merged ones stood (`[new, next incrementals…]`, or `[full, new, …]`).
///
/// Crash-safe: the image is written to a temporary file in its directory, fsynced and
/// renamed to `target_path` without replacing; the manifest is written the same way
/// after it. The old backups are not changed (delete them once the new one is there). A
/// crash at any point leaves the old chain valid and either no new manifest or a complete
/// one (an image without a manifest is not a backup).
///
/// Errors: as [`Chain::open`] for the links; `EEXIST` when a path exists; I/O errors.
/// Returns the new manifest.
pub fn consolidate<P: AsRef<Path>>(
    manifests: &[P],
    target_path: impl AsRef<Path>,
    manifest_path: impl AsRef<Path>,
) -> Result<Manifest> {
    merge(manifests, None, target_path.as_ref(), manifest_path.as_ref())
}

/// [`consolidate`] of backups whose targets the caller gives: `targets[i]` holds the backup
/// of `manifests[i]` (as [`Chain::open_drivers`]; for backups in RBD images, NBD exports,
/// devices). The new backup is still the file `target_path` with its manifest
/// `manifest_path`, written the same crash-safe way.
///
/// Errors: as [`consolidate`], and `InvalidInput` (EINVAL) when the number of targets is
/// not the number of manifests or a target's size is not its manifest's.
pub fn consolidate_drivers<P: AsRef<Path>>(
    manifests: &[P],
    targets: Vec<Arc<dyn BlockDriver>>,
    target_path: impl AsRef<Path>,
    manifest_path: impl AsRef<Path>,
) -> Result<Manifest> {
    if targets.len() != manifests.len() {
        return Err(Error::invalid(format!(
            "consolidate: {} manifests need as many targets, {} given",
            manifests.len(),
            targets.len()
        )));
    }
    merge(manifests, Some(targets), target_path.as_ref(), manifest_path.as_ref())
}

fn merge<P: AsRef<Path>>(
    manifests: &[P],
    targets: Option<Vec<Arc<dyn BlockDriver>>>,
    target_path: &Path,
    manifest_path: &Path,
) -> Result<Manifest> {
    for (what, p) in [("target", target_path), ("manifest", manifest_path)] {
        if std::fs::symlink_metadata(p).is_ok() {
            return Err(exists_error(what, p));
        }
    }
    let chain = Chain::open_part(manifests, targets, true, true)?;
    let ms = chain.manifest_list();
    let (first, last) = (ms[0], ms[ms.len() - 1]);
    let (size, cs) = (first.size, first.cluster_size);
    let clusters = size.div_ceil(cs);
    // The merged copy set, and the digests (already checked on read).
    let (mut runs, mut digests): (Vec<Run>, Vec<_>) = (Vec::new(), Vec::new());
    let (mut bytes_copied, mut bytes_zero) = (0u64, 0u64);
    for c in 0..clusters {
        let Some(d) = chain.held(c) else { continue };
        let len = (size - c * cs).min(cs);
        if let Some(d) = d {
            digests.push(d);
            bytes_copied += len;
        } else {
            bytes_zero += len;
        }
        let data = d.is_some();
        match runs.last_mut() {
            Some(r) if r.data == data && r.start + r.count == c => r.count += 1,
            _ => runs.push(Run { start: c, count: 1, data }),
        }
    }
    // The image: data runs read through the chain (verified) and written at their place.
    crate::fs::write_new_atomically(target_path, 0o600, |f| {
        f.set_len(size)?;
        let mut buf = vec![0u8; CHUNK.max(cs) as usize];
        for r in runs.iter().filter(|r| r.data) {
            let (mut off, end) = (r.start * cs, ((r.start + r.count) * cs).min(size));
            while off < end {
                let n = (end - off).min(buf.len() as u64) as usize;
                chain.read_at(&mut buf[..n], off)?;
                f.write_all_at(&buf[..n], off)?;
                off += n as u64;
            }
        }
        Ok(())
    })
    .map_err(|e| match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        Some(err) => err.clone(),
        None if e.kind() == std::io::ErrorKind::AlreadyExists => exists_error("target", target_path),
        None => io_err("consolidate: writing", target_path, e),
    })?;
    let dir = match manifest_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let dir = dir.canonicalize().map_err(|e| io_err("manifest directory", &dir, e))?;
    let t = target_path.canonicalize().map_err(|e| io_err("target", target_path, e))?;
    let bitmap = last
        .bitmap
        .map(|b| BitmapRef { generation_start: first.bitmap.map_or(b.generation_start, |f| f.generation_start), ..b });
    let mut m = Manifest {
        size,
        cluster_size: cs,
        sync: first.sync.clone(),
        disk_id: first.disk_id.clone(),
        bitmap,
        parent_root: first.parent_root,
        replaces_root: Some(last.root),
        target: Some(file_target_name(&relative_to(&t, &dir))),
        started_ms: first.started_ms,
        ended_ms: last.ended_ms,
        bytes_copied,
        bytes_zero,
        runs,
        digests,
        root: [0; 32],
    };
    m.write_new(manifest_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            exists_error("manifest", manifest_path)
        } else {
            io_err("consolidate: writing", manifest_path, e)
        }
    })?;
    Ok(m)
}
