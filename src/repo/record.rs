//! What a job with a manifest keeps while it runs: the digests of the buffers it copies
//! ([`Recorder`], fed by the one hook in job/copy.rs), and at the end the manifest file
//! ([`ManifestPlan::write`]).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use super::digest::{digest, Digest};
use super::format::{BitmapRef, Manifest, Run};
use crate::dirty::DirtyBitmap;
use crate::error::{Error, ErrorKind, Result};
use crate::{BackupOptions, BlockDriver, SyncMode};

enum Piece {
    Zero(u64),
    Data(Vec<Digest>),
}

/// The copy set and the digests of a running job: each copied run adds one piece (its
/// digests computed before the lock is taken). A cluster recorded twice (a copy retried
/// after an error) holds the same point-in-time data both times; the first is kept.
pub(crate) struct Recorder {
    pieces: Mutex<Vec<(u64, Piece)>>,
    cluster_size: usize,
}

impl Recorder {
    fn new(cluster_size: u64) -> Recorder {
        Recorder { pieces: Mutex::new(Vec::new()), cluster_size: cluster_size as usize }
    }

    /// Clusters `c` are in the target as zeroes.
    pub(crate) fn zero(&self, c: Range<u64>) {
        if !c.is_empty() {
            self.pieces.lock().unwrap_or_else(|e| e.into_inner()).push((c.start, Piece::Zero(c.end - c.start)));
        }
    }

    /// `data`, the point-in-time bytes of the clusters from `first` on, is in the target.
    pub(crate) fn data(&self, first: u64, data: &[u8]) {
        let d: Vec<Digest> = data.chunks(self.cluster_size).map(digest).collect();
        self.pieces.lock().unwrap_or_else(|e| e.into_inner()).push((first, Piece::Data(d)));
    }

    /// The copy set as sorted runs, and the digests of its data runs.
    fn runs(&self) -> (Vec<Run>, Vec<Digest>) {
        let mut pieces = std::mem::take(&mut *self.pieces.lock().unwrap_or_else(|e| e.into_inner()));
        pieces.sort_by_key(|p| p.0); // stable: the first record of a cluster stays first
        let (mut runs, mut digests) = (Vec::<Run>::new(), Vec::new());
        let mut next = 0u64; // first cluster not yet in `runs`
        for (start, piece) in pieces {
            let count = match &piece {
                Piece::Zero(n) => *n,
                Piece::Data(d) => d.len() as u64,
            };
            if start + count <= next {
                continue;
            }
            let skip = next.saturating_sub(start);
            let (s, n, data) = (start + skip, count - skip, matches!(piece, Piece::Data(_)));
            if let Piece::Data(d) = &piece {
                digests.extend_from_slice(&d[skip as usize..]);
            }
            match runs.last_mut() {
                Some(r) if r.data == data && r.start + r.count == s => r.count += n,
                _ => runs.push(Run { start: s, count: n, data }),
            }
            next = s + n;
        }
        (runs, digests)
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub(crate) fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    let kind = if errno == libc::EEXIST { ErrorKind::InvalidInput } else { ErrorKind::Io };
    Error::new(kind, errno, format!("{what} {}: {e}", path.display()))
}

/// `path` relative to `dir` when it lies below it, else `path` as it is (absolute).
pub(crate) fn relative_to(path: &Path, dir: &Path) -> PathBuf {
    match path.strip_prefix(dir) {
        Ok(rel) => rel.to_path_buf(),
        Err(_) => path.to_path_buf(),
    }
}

/// The manifest's `target` text for a file at `rel` (relative to the manifest's directory,
/// or absolute): a relative path that starts with `rbd:` gets `./` in front, so it is never
/// read as an RBD image's spec.
pub(crate) fn file_target_name(rel: &Path) -> String {
    let s = rel.to_string_lossy().into_owned();
    if s.starts_with(super::format::RBD_TARGET_PREFIX) {
        format!("./{s}")
    } else {
        s
    }
}

/// A job's manifest: where it goes and what it will say besides the copy set.
pub(crate) struct ManifestPlan {
    path: PathBuf,
    pub(crate) rec: Recorder,
    size: u64,
    cluster_size: u64,
    sync: &'static str,
    disk_id: Option<String>,
    parent_root: Option<[u8; 32]>,
    bitmap: Option<(Arc<DirtyBitmap>, [u8; 16], u64)>,
    target: Option<String>,
    started_ms: u64,
}

impl ManifestPlan {
    /// Check at start what can be checked (the manifest path must not exist; its
    /// directory must; the sync mode must make a backup; an explicit parent manifest must
    /// load and fit) and note the start. Called after the bitmap is frozen.
    pub(crate) fn prepare(opts: &BackupOptions, target: &dyn BlockDriver, size: u64) -> Result<Option<ManifestPlan>> {
        let Some(path) = &opts.manifest else { return Ok(None) };
        let sync = match opts.sync {
            SyncMode::Full => "full",
            SyncMode::Top => "top",
            SyncMode::Bitmap => "bitmap",
            _ => {
                return Err(Error::invalid(
                    "a manifest needs a job that makes a backup: sync mode None leaves a scratch target",
                ))
            }
        };
        match std::fs::symlink_metadata(path) {
            Ok(_) => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    libc::EEXIST,
                    format!("manifest {} exists: a manifest is never written over an existing file", path.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("manifest", path, e)),
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir = dir.canonicalize().map_err(|e| io_err("manifest directory", &dir, e))?;
        let target_name = match target.as_file_driver() {
            Some(f) => {
                let t = f.path().canonicalize().map_err(|e| io_err("target", f.path(), e))?;
                Some(file_target_name(&relative_to(&t, &dir)))
            }
            // An RBD image: its `rbd:` spec (docs/manifest.md). Other names are not
            // recorded: a reader would take them for file paths.
            None => target.target_spec().filter(|s| s.starts_with(super::format::RBD_TARGET_PREFIX)),
        };
        let bitmap = opts.bitmap.as_ref().map(|b| (b.clone(), b.uuid(), b.generation()));
        let parent_root = match &opts.parent_manifest {
            Some(p) => {
                let parent = Manifest::load(p)?;
                if parent.size != size {
                    return Err(Error::invalid(format!(
                        "parent manifest {} is of a disk of {} bytes, the source has {size}",
                        p.display(),
                        parent.size
                    )));
                }
                if parent.disk_id != opts.disk_id {
                    return Err(Error::invalid(format!(
                        "parent manifest {} is of disk {:?}, this job's disk_id is {:?}",
                        p.display(),
                        parent.disk_id,
                        opts.disk_id
                    )));
                }
                Some(parent.root)
            }
            // An incremental continues the chain of its bitmap's last manifest.
            None if opts.sync == SyncMode::Bitmap => opts.bitmap.as_ref().and_then(|b| b.last_manifest_root()),
            None => None,
        };
        Ok(Some(ManifestPlan {
            path: path.clone(),
            rec: Recorder::new(opts.cluster_size),
            size,
            cluster_size: opts.cluster_size,
            sync,
            disk_id: opts.disk_id.clone(),
            parent_root,
            bitmap,
            target: target_name,
            started_ms: now_ms(),
        }))
    }

    /// Write the manifest of the completed job (after its bitmap was given back):
    /// atomically, 0600, never over an existing file. On success the bitmap remembers
    /// the root, the parent of its next incremental.
    pub(crate) fn write(&self, bytes_copied: u64, bytes_zero: u64) -> Result<()> {
        let (runs, digests) = self.rec.runs();
        let mut m = Manifest {
            size: self.size,
            cluster_size: self.cluster_size,
            sync: self.sync.to_string(),
            disk_id: self.disk_id.clone(),
            bitmap: self.bitmap.as_ref().map(|(b, uuid, g)| BitmapRef {
                uuid: *uuid,
                generation_start: *g,
                generation_end: b.generation(),
            }),
            parent_root: self.parent_root,
            replaces_root: None,
            target: self.target.clone(),
            started_ms: self.started_ms,
            ended_ms: now_ms(),
            bytes_copied,
            bytes_zero,
            runs,
            digests,
            root: [0; 32],
        };
        m.write_new(&self.path).map_err(|e| io_err("writing manifest", &self.path, e))?;
        if let Some((b, _, _)) = &self.bitmap {
            b.set_last_manifest_root(m.root);
        }
        Ok(())
    }
}
