//! `Chain`: a full backup and its incrementals, read back as one read-only
//! [`BlockDriver`] of the newest point in time.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::digest::{digest, hex};
use super::format::Manifest;
use crate::error::{Error, ErrorKind, Result};
use crate::{BlockDriver, BlockStatus, FileDriver, OpenFlags, StatusFlags};

/// One backup of a chain.
struct Link {
    path: PathBuf,
    manifest: Manifest,
    index: Vec<u64>,
    target: Arc<dyn BlockDriver>,
}

/// Where a cluster of the chain comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Data cluster of link `i`.
    Data(usize),
    /// Zeroes: copied zeroes, or never copied.
    Zero,
}

/// A backup chain `[full, incr1, incr2, …]` (oldest first) as a read-only block device:
/// each cluster comes from the newest backup whose copy set holds it; a cluster no backup
/// holds reads as zeroes. `block_status` says `DATA` for clusters with data and `ZERO`
/// for the rest. Writes fail with `EROFS`.
///
/// With `verify_on_read`, every data cluster read is hashed and compared with its digest
/// first: a bad one fails the read with `EBADMSG` (the others still read). Reads are
/// then whole clusters internally.
///
/// Thread-safe: reads may run from many threads at once (a restore job's workers, the
/// NBD server's connections).
pub struct Chain {
    links: Vec<Link>,
    size: u64,
    cluster_size: u64,
    verify: bool,
}

fn link_error(i: usize, path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::invalid(format!("backup chain link {i} ({}): {msg}", path.display()))
}

impl Chain {
    /// Open the chain of the manifests at `manifests`, oldest (the full backup) first,
    /// and each backup's target image named in its manifest, read-only: a file (relative to
    /// the manifest's directory), or an RBD image (`rbd:POOL/IMAGE[:id=NAME]`, with the
    /// cargo feature `rbd`): opened with librados's default conf search (`$CEPH_CONF`,
    /// `/etc/ceph/ceph.conf`, `~/.ceph/config`, `./ceph.conf`), the spec's client id
    /// (`client.admin` without `:id=`) and the default timeout. For another conf file or
    /// user, targets the manifest does not name, or moved files: [`Chain::open_drivers`].
    ///
    /// Checks every link: the first backup is a full one (`full` or `top`), each later
    /// one an incremental of the same size, cluster size and disk id, whose bitmap (same
    /// uuid) starts at the generation the previous backup left it at, and whose parent
    /// root digest, when recorded, is the previous manifest's root.
    ///
    /// Errors: `InvalidInput` (EINVAL) naming the link and what is wrong (missing or
    /// reordered link, foreign disk, other size, an empty list); the manifest's errors
    /// (`EBADMSG` for a damaged one); opening a target (`ENOENT`, ..., librados's and
    /// librbd's errno for an RBD image), a manifest naming no target or a target of another
    /// size (EINVAL), an RBD image without the RBD driver built in (`ENOTSUP`).
    pub fn open<P: AsRef<Path>>(manifests: &[P], verify_on_read: bool) -> Result<Chain> {
        Chain::open_part(manifests, None, verify_on_read, false)
    }

    /// Open the chain of the manifests at `manifests` (oldest first, as [`Chain::open`])
    /// reading each backup from the driver the caller gives: `targets[i]` holds the backup
    /// of `manifests[i]` (one target per manifest, in the same order). For backups whose
    /// targets are not files the manifest can name, an RBD image (`RbdDriver`, open
    /// read-only), an NBD export, a device the host opened itself; or files moved away
    /// from their manifests. The manifest's `target` field is not looked at.
    ///
    /// The same link checks as [`Chain::open`]; each target must have the manifest's size.
    /// The chain keeps its `Arc`s of the targets (the caller may keep using or drop its
    /// own); it only reads them.
    ///
    /// Errors: `InvalidInput` (EINVAL) when the number of targets is not the number of
    /// manifests (nothing is loaded then), for a broken link (as [`Chain::open`]) and for a
    /// target of another size than its manifest says (the message names the link);
    /// the manifest's errors (`EBADMSG` for a damaged one, `ENOENT`...).
    pub fn open_drivers<P: AsRef<Path>>(
        manifests: &[P],
        targets: Vec<Arc<dyn BlockDriver>>,
        verify_on_read: bool,
    ) -> Result<Chain> {
        if targets.len() != manifests.len() {
            return Err(Error::invalid(format!(
                "a backup chain of {} manifests needs as many targets, {} given",
                manifests.len(),
                targets.len()
            )));
        }
        Chain::open_part(manifests, Some(targets), verify_on_read, false)
    }

    /// [`Chain::open`] or, with `targets`, [`Chain::open_drivers`]; with `part`: the first
    /// link may be an incremental (a part of a chain, for [`crate::repo::consolidate`]).
    pub(crate) fn open_part<P: AsRef<Path>>(
        manifests: &[P],
        targets: Option<Vec<Arc<dyn BlockDriver>>>,
        verify_on_read: bool,
        part: bool,
    ) -> Result<Chain> {
        if manifests.is_empty() {
            return Err(Error::invalid("a backup chain needs at least one manifest"));
        }
        if targets.as_ref().is_some_and(|t| t.len() != manifests.len()) {
            return Err(Error::invalid("a backup chain needs one target per manifest"));
        }
        let mut supplied = targets.map(Vec::into_iter);
        let mut links: Vec<Link> = Vec::with_capacity(manifests.len());
        for (i, p) in manifests.iter().enumerate() {
            let path = p.as_ref().to_path_buf();
            let m = Manifest::load(&path)?;
            match links.last() {
                None => {
                    if m.sync == "bitmap" && !part {
                        return Err(link_error(
                            i,
                            &path,
                            "is an incremental backup: a chain starts with a full backup (its parent is missing)",
                        ));
                    }
                }
                Some(prev) => check_link(i, &path, &m, prev)?,
            }
            let (target, name) = match supplied.as_mut() {
                Some(t) => (t.next().expect("counted above"), format!("{i} given")),
                None => open_target(i, &path, &m)?,
            };
            if target.size() != m.size {
                return Err(link_error(
                    i,
                    &path,
                    format!("target {name} has {} bytes, the manifest says {}", target.size(), m.size),
                ));
            }
            let index = m.digest_index();
            links.push(Link { path, manifest: m, index, target });
        }
        let (size, cluster_size) = (links[0].manifest.size, links[0].manifest.cluster_size);
        Ok(Chain { links, size, cluster_size, verify: verify_on_read })
    }

    /// A read of `offset..end` that takes pieces from several backups: ask the kernel to
    /// start reading every piece held in a file at once (`posix_fadvise(WILLNEED)`), so
    /// the scattered clusters of the incrementals are read in parallel from a cold disk,
    /// not one after another (a restore of full + 3 incrementals of 2 GiB from ext4: the
    /// pieces of an incremental are isolated clusters). Advisory.
    fn read_ahead(&self, offset: u64, end: u64) {
        let mut pos = offset;
        while pos < end {
            let run_end = self.run_end(pos, end);
            if let Source::Data(i) = self.source(pos / self.cluster_size) {
                if let Some(f) = self.links[i].target.as_file_driver() {
                    f.advise_willneed(pos, run_end - pos);
                }
            }
            pos = run_end;
        }
    }

    /// Where the run of clusters from `pos` (up to `end`) that all come from the same
    /// place ends.
    fn run_end(&self, pos: u64, end: u64) -> u64 {
        let cs = self.cluster_size;
        let src = self.source(pos / cs);
        let mut run_end = ((pos / cs + 1) * cs).min(end);
        while run_end < end && self.source(run_end / cs) == src {
            run_end = (run_end + cs).min(end);
        }
        run_end
    }

    /// The manifests' paths, oldest first.
    pub fn manifests(&self) -> Vec<PathBuf> {
        self.links.iter().map(|l| l.path.clone()).collect()
    }

    /// The root digest of the newest backup, in hex.
    pub fn root_hex(&self) -> String {
        hex(&self.links.last().expect("a chain has a link").manifest.root)
    }

    /// The cluster size of the chain's backups.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// The manifests, oldest first.
    pub(crate) fn manifest_list(&self) -> Vec<&Manifest> {
        self.links.iter().map(|l| &l.manifest).collect()
    }

    /// Where cluster `c` comes from: `None` when no backup holds it, else the digest of
    /// its data (`None` for a zero cluster).
    pub(crate) fn held(&self, c: u64) -> Option<Option<super::digest::Digest>> {
        self.links.iter().rev().find_map(|l| l.manifest.lookup(&l.index, c).map(|d| d.copied()))
    }

    fn source(&self, c: u64) -> Source {
        for (i, l) in self.links.iter().enumerate().rev() {
            match l.manifest.lookup(&l.index, c) {
                Some(Some(_)) => return Source::Data(i),
                Some(None) => return Source::Zero,
                None => {}
            }
        }
        Source::Zero
    }

    /// Read whole cluster `c` of link `i` into `buf` and check its digest.
    fn read_verified(&self, i: usize, c: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        let l = &self.links[i];
        let len = l.manifest.cluster_len(c) as usize;
        buf.resize(len, 0);
        l.target.read_at(buf, c * self.cluster_size)?;
        let want = l.manifest.lookup(&l.index, c).flatten().expect("a data cluster has a digest");
        if digest(buf) != *want {
            return Err(io::Error::from(Error::new(
                ErrorKind::Corrupt,
                libc::EBADMSG,
                format!(
                    "cluster at byte {} of backup {} does not match its digest (damaged backup)",
                    c * self.cluster_size,
                    l.path.display()
                ),
            )));
        }
        Ok(())
    }
}

/// Open the target the manifest of link `i` (at `path`) names, read-only: its file,
/// relative to the manifest's directory, or its RBD image (cargo feature `rbd`). Returns
/// the driver and its name for messages.
fn open_target(i: usize, path: &Path, m: &Manifest) -> Result<(Arc<dyn BlockDriver>, String)> {
    let target_error = |name: &dyn std::fmt::Display, e: io::Error| {
        Error::new(
            ErrorKind::Io,
            crate::errno_of(&e),
            format!("backup chain link {i} ({}): target {name}: {e}", path.display()),
        )
    };
    if let Some(spec) = m.target_rbd() {
        return open_rbd_target(spec).map(|d| (d, spec.to_string())).map_err(|e| target_error(&spec, e));
    }
    let tp = m.target_path(path).ok_or_else(|| {
        link_error(
            i,
            path,
            "the manifest names no target file (the backup went to a device, an NBD export or another driver): \
             open the chain with the targets given (Chain::open_drivers, cowbackup_chain_open_drivers)",
        )
    })?;
    let target = FileDriver::open(&tp, OpenFlags::empty()).map_err(|e| target_error(&tp.display(), e))?;
    Ok((Arc::new(target), tp.display().to_string()))
}

/// The RBD image `spec` of a manifest, opened read-only with librados's default conf
/// search (`$CEPH_CONF`, `/etc/ceph/ceph.conf`, `~/.ceph/config`, `./ceph.conf`), the spec's
/// client id (`client.admin` without `:id=`) and the default timeout.
#[cfg(feature = "rbd")]
fn open_rbd_target(spec: &str) -> io::Result<Arc<dyn BlockDriver>> {
    Ok(Arc::new(crate::RbdDriver::open(spec, None, false)?))
}

/// Without the RBD driver: `ENOTSUP`, saying what to do instead.
#[cfg(not(feature = "rbd"))]
fn open_rbd_target(_spec: &str) -> io::Result<Arc<dyn BlockDriver>> {
    Err(io::Error::from(Error::new(
        ErrorKind::InvalidInput,
        libc::ENOTSUP,
        "an RBD image, and this library was built without the RBD driver (cargo feature \"rbd\"): open the \
         images another way (e.g. qemu-nbd rbd:POOL/IMAGE and an NbdDriver) and give them to Chain::open_drivers \
         (C cowbackup_chain_open_drivers)",
    )))
}

/// Check that `m` (link `i` at `path`) follows `prev`.
fn check_link(i: usize, path: &Path, m: &Manifest, prev: &Link) -> Result<()> {
    let p = &prev.manifest;
    let prev_name = prev.path.display();
    if m.size != p.size {
        return Err(link_error(i, path, format!("is a backup of {} bytes, {prev_name} of {}", m.size, p.size)));
    }
    if m.disk_id != p.disk_id {
        return Err(link_error(
            i,
            path,
            format!("is a backup of disk {:?}, {prev_name} of disk {:?} (a foreign disk)", m.disk_id, p.disk_id),
        ));
    }
    if m.cluster_size != p.cluster_size {
        return Err(link_error(
            i,
            path,
            format!("has clusters of {} bytes, {prev_name} of {}", m.cluster_size, p.cluster_size),
        ));
    }
    if m.sync != "bitmap" {
        return Err(link_error(
            i,
            path,
            format!("is a {} backup, not an incremental: only the first link is full", m.sync),
        ));
    }
    let parent_named = m.parent_root.is_some_and(|r| r == p.root || Some(r) == p.replaces_root);
    let (Some(b), Some(pb)) = (m.bitmap, p.bitmap) else {
        // Without a bitmap on both sides only an explicit parent link
        // (`BackupOptions::parent_manifest`) ties them.
        if parent_named {
            return Ok(());
        }
        return Err(link_error(i, path, format!("{prev_name} was made without a dirty bitmap: nothing links them")));
    };
    if b.uuid != pb.uuid {
        // Each pull from an NBD server's bitmap (cowbackup pull, examples/pull_backup) makes
        // its job's bitmap anew: the explicit parent root digest is the link then.
        if parent_named {
            return Ok(());
        }
        return Err(link_error(i, path, format!("was made with another dirty bitmap than {prev_name} (uuid differs)")));
    }
    if b.generation_start != pb.generation_end {
        return Err(link_error(
            i,
            path,
            format!(
                "does not follow {prev_name}: its bitmap was at generation {} when it started, {prev_name} left it \
                 at {} (a backup is missing between them, or the order is wrong)",
                b.generation_start, pb.generation_end
            ),
        ));
    }
    if let Some(parent) = m.parent_root {
        if parent != p.root && Some(parent) != p.replaces_root {
            return Err(link_error(
                i,
                path,
                format!("its parent is not {prev_name} (parent root digest differs: a missing link or wrong order)"),
            ));
        }
    }
    Ok(())
}

fn read_only() -> io::Error {
    io::Error::from(Error::new(ErrorKind::InvalidInput, libc::EROFS, "a backup chain is read-only"))
}

impl BlockDriver for Chain {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let cs = self.cluster_size;
        let end = offset + buf.len() as u64;
        let first_end = self.run_end(offset, end);
        // A read of one piece is read sequentially: the kernel's own readahead serves it.
        if first_end < end {
            self.read_ahead(offset, end);
        }
        let mut pos = offset;
        let mut tmp = Vec::new();
        while pos < end {
            let c = pos / cs;
            let src = self.source(c);
            // Extend over following clusters from the same source (not when verifying:
            // each cluster is checked whole).
            let run_end = if self.verify && matches!(src, Source::Data(_)) {
                ((c + 1) * cs).min(end)
            } else if pos == offset {
                first_end
            } else {
                self.run_end(pos, end)
            };
            let out = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            match src {
                Source::Zero => out.fill(0),
                Source::Data(i) if self.verify => {
                    self.read_verified(i, c, &mut tmp)?;
                    let from = (pos - c * cs) as usize;
                    out.copy_from_slice(&tmp[from..from + out.len()]);
                }
                Source::Data(i) => self.links[i].target.read_at(out, pos)?,
            }
            pos = run_end;
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn write_zeroes_at(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let cs = self.cluster_size;
        let end = offset.saturating_add(len).min(self.size);
        let data = |c: u64| matches!(self.source(c), Source::Data(_));
        let first = data(offset / cs);
        let mut at = ((offset / cs) + 1) * cs;
        while at < end && data(at / cs) == first {
            at += cs;
        }
        let flags = if first { StatusFlags::DATA } else { StatusFlags::ZERO };
        Ok(BlockStatus { len: at.min(end) - offset, flags })
    }
}
