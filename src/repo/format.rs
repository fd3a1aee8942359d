//! The on-disk layout of a manifest (version 1), documented in docs/manifest.md.
//!
//! A manifest is a JSON header on the first line (ending in `\n`), then a binary body:
//! ```text
//! magic "CBMF", version u32 = 1, run count u64, digest count u64   (24 bytes, little endian)
//! runs: start cluster u64, count u64 with bit 63 set for a data run  (16 bytes each)
//! digests: 16 bytes each, one per cluster of the data runs, in order
//! checksum: BLAKE3 (derive-key "cowbackup manifest v1 body") of all the body before it (32 bytes)
//! ```
//! The root digest (in the header) is BLAKE3 (derive-key "cowbackup manifest v1 root") of
//! the canonical text of every header field ([`Manifest::canonical`]) followed by the whole
//! body: any change to a field or to the body changes it, so a manifest whose root does
//! not match is damaged (`EBADMSG`).

use std::path::{Path, PathBuf};

use super::digest::{hash_parts, hex, unhex, Digest, DIGEST_LEN};
use crate::error::{Error, ErrorKind, Result};

/// The format version this library writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
const MAGIC: [u8; 4] = *b"CBMF";
/// A manifest's `target` that starts with this names an RBD image, not a file.
pub(crate) const RBD_TARGET_PREFIX: &str = "rbd:";
const DATA_BIT: u64 = 1 << 63;
const BODY_CONTEXT: &str = "cowbackup manifest v1 body";
const ROOT_CONTEXT: &str = "cowbackup manifest v1 root";
const BODY_HEAD: usize = 24;
const RUN_LEN: usize = 16;
const SUM_LEN: usize = 32;

/// A run of the copy set: `count` clusters from `start`, all data (each with a digest) or
/// all zero (no digest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First cluster.
    pub start: u64,
    /// Clusters in the run (at least 1).
    pub count: u64,
    /// Data clusters (one digest each) rather than zero clusters.
    pub data: bool,
}

/// The bitmap a job used: its uuid, and its generation when the job started and after the
/// job gave it back (the next incremental of the chain starts at `generation_end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapRef {
    /// The bitmap's uuid.
    pub uuid: [u8; 16],
    /// Generation when the job started (froze it).
    pub generation_start: u64,
    /// Generation right after the job's end.
    pub generation_end: u64,
}

/// What a completed backup holds: the parsed contents of a manifest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Source (and target) size in bytes.
    pub size: u64,
    /// Cluster size of the job, bytes.
    pub cluster_size: u64,
    /// Sync mode of the job: `"full"`, `"top"` or `"bitmap"`.
    pub sync: String,
    /// The host's identity of the backed-up disk (`BackupOptions::disk_id`).
    pub disk_id: Option<String>,
    /// The dirty bitmap the job used.
    pub bitmap: Option<BitmapRef>,
    /// Root digest of the previous backup of the chain (an incremental), when known.
    pub parent_root: Option<[u8; 32]>,
    /// A consolidated backup ([`crate::repo::consolidate`]): the root digest of the newest
    /// backup it merged, so the incremental that followed that one still links to it.
    pub replaces_root: Option<[u8; 32]>,
    /// The target: an image file (relative paths are relative to the manifest's directory),
    /// or an RBD image's spec `rbd:POOL[/NAMESPACE]/IMAGE[:id=NAME]` (a relative file path
    /// that would start with `rbd:` is written `./rbd:...`). `None` when the target was
    /// neither (a device of the host's, an NBD export, memory).
    pub target: Option<String>,
    /// When the job started and ended, milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// See `started_ms`.
    pub ended_ms: u64,
    /// Data bytes read from the source and written to the target.
    pub bytes_copied: u64,
    /// Bytes of clusters that read as zero (in the copy set as zero clusters).
    pub bytes_zero: u64,
    /// The copy set, sorted, not overlapping.
    pub runs: Vec<Run>,
    /// One digest per data cluster, in run order.
    pub digests: Vec<Digest>,
    /// The root digest (computed by [`Manifest::seal`], checked by [`Manifest::parse`]).
    pub root: [u8; 32],
}

/// A damaged-manifest error (`EBADMSG`) naming the file.
pub(crate) fn damaged(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Corrupt, libc::EBADMSG, format!("manifest {} is damaged: {msg}", path.display()))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Manifest {
    /// Bytes of cluster `c` (the last cluster may be shorter).
    pub fn cluster_len(&self, c: u64) -> u64 {
        (self.size - c * self.cluster_size).min(self.cluster_size)
    }

    /// Number of clusters of the device.
    pub fn clusters(&self) -> u64 {
        self.size.div_ceil(self.cluster_size)
    }

    /// The canonical text of the header fields, covered by the root digest.
    fn canonical(&self) -> String {
        let opt = |s: &Option<String>| s.as_ref().map(|s| format!("{}:{s}", s.len())).unwrap_or_else(|| "-".into());
        let bitmap = self
            .bitmap
            .map(|b| format!("{} {} {}", hex(&b.uuid), b.generation_start, b.generation_end))
            .unwrap_or_else(|| "-".into());
        format!(
            "version {MANIFEST_VERSION}\nsize {}\ncluster_size {}\nsync {}\ndisk_id {}\nbitmap {bitmap}\nparent {}\n\
             replaces {}\ntarget {}\ntimes {} {}\nbytes {} {}\n",
            self.size,
            self.cluster_size,
            self.sync,
            opt(&self.disk_id),
            self.parent_root.map(|r| hex(&r)).unwrap_or_else(|| "-".into()),
            self.replaces_root.map(|r| hex(&r)).unwrap_or_else(|| "-".into()),
            opt(&self.target),
            self.started_ms,
            self.ended_ms,
            self.bytes_copied,
            self.bytes_zero,
        )
    }

    /// The binary body.
    fn body(&self) -> Vec<u8> {
        let mut b =
            Vec::with_capacity(BODY_HEAD + self.runs.len() * RUN_LEN + self.digests.len() * DIGEST_LEN + SUM_LEN);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        b.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.digests.len() as u64).to_le_bytes());
        for r in &self.runs {
            b.extend_from_slice(&r.start.to_le_bytes());
            b.extend_from_slice(&(r.count | if r.data { DATA_BIT } else { 0 }).to_le_bytes());
        }
        for d in &self.digests {
            b.extend_from_slice(d);
        }
        let sum = hash_parts(BODY_CONTEXT, &[&b]);
        b.extend_from_slice(&sum);
        b
    }

    /// Compute the root digest over the header fields and `body`.
    fn root_of(&self, body: &[u8]) -> [u8; 32] {
        hash_parts(ROOT_CONTEXT, &[self.canonical().as_bytes(), body])
    }

    /// Set `root` from the contents; returns the file's two parts, the header line and
    /// the body (written one after the other: no copy of a large body).
    pub(crate) fn seal_parts(&mut self) -> (Vec<u8>, Vec<u8>) {
        let body = self.body();
        self.root = self.root_of(&body);
        let bitmap = self.bitmap.map(|b| {
            serde_json::json!({
                "uuid": hex(&b.uuid), "generation_start": b.generation_start, "generation_end": b.generation_end,
            })
        });
        let data_clusters = self.digests.len() as u64;
        let copied_clusters: u64 = self.runs.iter().map(|r| r.count).sum();
        let header = serde_json::json!({
            "format": "cowbackup-manifest",
            "version": MANIFEST_VERSION,
            "size": self.size,
            "cluster_size": self.cluster_size,
            "sync": self.sync,
            "disk_id": self.disk_id,
            "bitmap": bitmap,
            "parent_root": self.parent_root.map(|r| hex(&r)),
            "replaces_root": self.replaces_root.map(|r| hex(&r)),
            "target": self.target,
            "started_unix_ms": self.started_ms,
            "ended_unix_ms": self.ended_ms,
            "bytes_copied": self.bytes_copied,
            "bytes_zero": self.bytes_zero,
            "copy_set_clusters": copied_clusters,
            "data_clusters": data_clusters,
            "digest": "blake3-128",
            "body_len": body.len(),
            "root_digest": hex(&self.root),
        });
        let mut head = header.to_string().into_bytes();
        head.push(b'\n');
        (head, body)
    }

    /// Set `root` from the contents; returns the whole file's bytes.
    #[cfg(test)]
    pub(crate) fn seal(&mut self) -> Vec<u8> {
        let (mut head, body) = self.seal_parts();
        head.extend_from_slice(&body);
        head
    }

    /// Write the sealed manifest to `path`: atomically, mode 0600, never over a file.
    pub(crate) fn write_new(&mut self, path: &Path) -> std::io::Result<()> {
        let (head, body) = self.seal_parts();
        crate::fs::write_new_atomically(path, 0o600, |f| {
            std::io::Write::write_all(f, &head)?;
            std::io::Write::write_all(f, &body)
        })
    }

    /// Read and check the manifest at `path`: `EBADMSG` (damaged: truncated, a field or
    /// the body changed, root digest or checksum wrong), `EINVAL`-like errors never; I/O
    /// errors as they are (`ENOENT`, ...).
    pub fn load(path: impl AsRef<Path>) -> Result<Manifest> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("manifest {}: {e}", path.display()),
            )
        })?;
        Manifest::parse(path, &bytes)
    }

    /// Parse and check manifest bytes (`path` only names the file in errors).
    pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<Manifest> {
        let nl = bytes.iter().position(|&b| b == b'\n').ok_or_else(|| damaged(path, "no header line"))?;
        let header: serde_json::Value =
            serde_json::from_slice(&bytes[..nl]).map_err(|e| damaged(path, format!("header is not JSON: {e}")))?;
        let body = &bytes[nl + 1..];
        let field = |k: &str| header.get(k).ok_or_else(|| damaged(path, format!("header field {k} missing")));
        let num =
            |k: &str| field(k)?.as_u64().ok_or_else(|| damaged(path, format!("header field {k} is not a number")));
        let opt_str = |k: &str| -> Result<Option<String>> {
            match field(k)? {
                serde_json::Value::Null => Ok(None),
                serde_json::Value::String(s) => Ok(Some(s.clone())),
                _ => Err(damaged(path, format!("header field {k} is not a string"))),
            }
        };
        if field("format")?.as_str() != Some("cowbackup-manifest") {
            return Err(damaged(path, "not a cowbackup manifest"));
        }
        let version = num("version")?;
        if version != MANIFEST_VERSION as u64 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                libc::ENOTSUP,
                format!(
                    "manifest {}: format version {version} is not supported (this library reads {MANIFEST_VERSION})",
                    path.display()
                ),
            ));
        }
        let hex32 = |s: &str, what: &str| -> Result<[u8; 32]> {
            let v = unhex(s, 32).ok_or_else(|| damaged(path, format!("{what} is not 64 hex digits")))?;
            Ok(v.try_into().expect("32 bytes"))
        };
        let bitmap = match field("bitmap")? {
            serde_json::Value::Null => None,
            b => {
                let g = |k: &str| b.get(k).and_then(|v| v.as_u64()).ok_or_else(|| damaged(path, format!("bitmap.{k}")));
                let uuid = b.get("uuid").and_then(|u| u.as_str()).and_then(|u| unhex(u, 16));
                let uuid = uuid.ok_or_else(|| damaged(path, "bitmap.uuid"))?;
                Some(BitmapRef {
                    uuid: uuid.try_into().expect("16 bytes"),
                    generation_start: g("generation_start")?,
                    generation_end: g("generation_end")?,
                })
            }
        };
        let parent_root = opt_str("parent_root")?.map(|s| hex32(&s, "parent_root")).transpose()?;
        let replaces_root = opt_str("replaces_root")?.map(|s| hex32(&s, "replaces_root")).transpose()?;
        let root = hex32(field("root_digest")?.as_str().ok_or_else(|| damaged(path, "root_digest"))?, "root_digest")?;
        let sync = field("sync")?.as_str().ok_or_else(|| damaged(path, "sync"))?.to_string();
        let size = num("size")?;
        let cluster_size = num("cluster_size")?;
        if size == 0 || !cluster_size.is_power_of_two() {
            return Err(damaged(path, "size or cluster_size invalid"));
        }
        if num("body_len")? != body.len() as u64 {
            return Err(damaged(path, format!("body is {} bytes, the header says {}", body.len(), num("body_len")?)));
        }
        // The body: sizes first, then its checksum.
        if body.len() < BODY_HEAD + SUM_LEN || body[..4] != MAGIC || le64(body, 4) as u32 != MANIFEST_VERSION {
            return Err(damaged(path, "body header"));
        }
        let (nruns, ndig) = (le64(body, 8), le64(body, 16));
        let want =
            (nruns as u128) * RUN_LEN as u128 + (ndig as u128) * DIGEST_LEN as u128 + (BODY_HEAD + SUM_LEN) as u128;
        if want != body.len() as u128 {
            return Err(damaged(path, "body length does not match its counts"));
        }
        let sum_at = body.len() - SUM_LEN;
        if hash_parts(BODY_CONTEXT, &[&body[..sum_at]])[..] != body[sum_at..] {
            return Err(damaged(path, "body checksum mismatch"));
        }
        let clusters = size.div_ceil(cluster_size);
        let mut runs = Vec::with_capacity(nruns as usize);
        let mut next = 0u64;
        let mut data_clusters = 0u64;
        for i in 0..nruns as usize {
            let at = BODY_HEAD + i * RUN_LEN;
            let (start, cd) = (le64(body, at), le64(body, at + 8));
            let (count, data) = (cd & !DATA_BIT, cd & DATA_BIT != 0);
            if count == 0 || start < next || start.checked_add(count).map_or(true, |e| e > clusters) {
                return Err(damaged(path, format!("copy set run {i} is out of order or out of range")));
            }
            next = start + count;
            if data {
                data_clusters += count;
            }
            runs.push(Run { start, count, data });
        }
        if data_clusters != ndig {
            return Err(damaged(path, "digest count does not match the data runs"));
        }
        let dstart = BODY_HEAD + nruns as usize * RUN_LEN;
        let digests =
            body[dstart..sum_at].chunks_exact(DIGEST_LEN).map(|c| Digest::try_from(c).expect("16 bytes")).collect();
        let m = Manifest {
            size,
            cluster_size,
            sync,
            disk_id: opt_str("disk_id")?,
            bitmap,
            parent_root,
            replaces_root,
            target: opt_str("target")?,
            started_ms: num("started_unix_ms")?,
            ended_ms: num("ended_unix_ms")?,
            bytes_copied: num("bytes_copied")?,
            bytes_zero: num("bytes_zero")?,
            runs,
            digests,
            root,
        };
        // The informational fields must say what the body says.
        if num("copy_set_clusters")? != m.runs.iter().map(|r| r.count).sum::<u64>()
            || num("data_clusters")? != m.digests.len() as u64
            || field("digest")?.as_str() != Some("blake3-128")
        {
            return Err(damaged(path, "copy_set_clusters, data_clusters or digest do not match the body"));
        }
        if m.root_of(body) != root {
            return Err(damaged(path, "root digest mismatch (a header field was changed)"));
        }
        Ok(m)
    }

    /// The target image's path: `target` resolved against the directory of `manifest_path`.
    /// `None` when the manifest names no target, or an RBD image ([`Manifest::target_rbd`]).
    pub fn target_path(&self, manifest_path: &Path) -> Option<PathBuf> {
        if self.target_rbd().is_some() {
            return None;
        }
        let t = Path::new(self.target.as_deref()?);
        Some(if t.is_absolute() { t.to_path_buf() } else { manifest_path.parent().unwrap_or(Path::new("")).join(t) })
    }

    /// The target when it is an RBD image: its spec, `rbd:POOL[/NAMESPACE]/IMAGE[:id=NAME]`
    /// (a `target` that starts with `rbd:`; a file target never does, see docs/manifest.md).
    pub fn target_rbd(&self) -> Option<&str> {
        self.target.as_deref().filter(|t| t.starts_with(RBD_TARGET_PREFIX))
    }

    /// Where cluster `c` is in the copy set: `Some(Some(digest))` data, `Some(None)` zero,
    /// `None` not in the copy set. `O(log runs)`; `index` = cumulative digest index per run.
    pub(crate) fn lookup(&self, index: &[u64], c: u64) -> Option<Option<&Digest>> {
        let i = self.runs.partition_point(|r| r.start + r.count <= c);
        let r = self.runs.get(i)?;
        if c < r.start {
            return None;
        }
        Some(r.data.then(|| &self.digests[(index[i] + c - r.start) as usize]))
    }

    /// The first digest index of each run (for [`Manifest::lookup`]).
    pub(crate) fn digest_index(&self) -> Vec<u64> {
        let mut n = 0;
        self.runs
            .iter()
            .map(|r| {
                let at = n;
                if r.data {
                    n += r.count;
                }
                at
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            size: 5 * 4096 + 100,
            cluster_size: 4096,
            sync: "bitmap".into(),
            disk_id: Some("vda".into()),
            bitmap: Some(BitmapRef { uuid: [7; 16], generation_start: 3, generation_end: 4 }),
            parent_root: Some([9; 32]),
            replaces_root: None,
            target: Some("b.img".into()),
            started_ms: 1,
            ended_ms: 2,
            bytes_copied: 8192,
            bytes_zero: 4096,
            runs: vec![Run { start: 1, count: 2, data: true }, Run { start: 4, count: 2, data: false }],
            digests: vec![[1; DIGEST_LEN], [2; DIGEST_LEN]],
            root: [0; 32],
        }
    }

    /// A manifest reads back as written, and every single flipped bit anywhere in the file,
    /// and every truncation, is refused.
    #[test]
    fn round_trip_and_every_damage_is_refused() {
        let mut m = sample();
        let bytes = m.seal();
        let p = Path::new("m");
        assert_eq!(Manifest::parse(p, &bytes).unwrap(), m);
        let (c, i) = (m.digest_index(), 0);
        assert_eq!(m.lookup(&c, 2), Some(Some(&[2; DIGEST_LEN])));
        assert_eq!(m.lookup(&c, 4), Some(None));
        assert_eq!(m.lookup(&c, 3), None);
        assert_eq!(m.lookup(&c, i), None);
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[at] ^= 1 << bit;
                assert!(Manifest::parse(p, &b).is_err(), "flip of bit {bit} at byte {at} accepted");
            }
        }
        for n in 0..bytes.len() {
            assert!(Manifest::parse(p, &bytes[..n]).is_err(), "truncation to {n} accepted");
        }
    }
}
