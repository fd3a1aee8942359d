//! `verify`: re-read a backup's target and check every cluster of its copy set against
//! the manifest. Needs no source.

use std::path::Path;

use super::digest::digest;
use super::format::Manifest;
use crate::error::{Error, ErrorKind, Op, Result, Side};
use crate::zero::buffer_is_zero;
use crate::BlockDriver;

/// What [`verify_report`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Clusters of the copy set checked (data and zero).
    pub clusters_checked: u64,
    /// Bytes of those clusters.
    pub bytes_checked: u64,
    /// Clusters whose bytes did not match.
    pub mismatched_clusters: u64,
    /// The mismatching byte ranges `(offset, len)`, in order, adjacent clusters merged.
    pub mismatches: Vec<(u64, u64)>,
}

/// Bytes read from the target at a time.
const READ_CHUNK: u64 = 1 << 20;

/// Check every cluster of the copy set of the manifest at `manifest` against `target`:
/// a data cluster must hash to its digest, a zero cluster must read as zeroes. Calls
/// `on_mismatch(offset, len)` for each bad range as soon as it is complete (on the
/// calling thread); a callback returning `false` stops the check early.
///
/// Errors: the manifest's (damaged: `EBADMSG`, missing: `ENOENT`, ...); `InvalidInput`
/// when the target's size differs; the target's read errors. Mismatches are not errors
/// here (see [`verify`]). Thread-safe (reads only).
pub fn verify_with(
    manifest: impl AsRef<Path>,
    target: &dyn BlockDriver,
    on_mismatch: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<VerifyReport> {
    let path = manifest.as_ref();
    let m = Manifest::load(path)?;
    if target.size() != m.size {
        return Err(Error::invalid(format!(
            "the target has {} bytes, the backup of manifest {} has {}",
            target.size(),
            path.display(),
            m.size
        )));
    }
    let cs = m.cluster_size;
    let per_read = (READ_CHUNK / cs).max(1);
    let mut report = VerifyReport::default();
    let mut buf = vec![0u8; (per_read * cs) as usize];
    let mut d = 0usize; // next digest
    let mut pending: Option<(u64, u64)> = None;
    let mut flush = |pending: &mut Option<(u64, u64)>, report: &mut VerifyReport| -> bool {
        match pending.take() {
            Some((o, l)) => {
                report.mismatches.push((o, l));
                on_mismatch(o, l)
            }
            None => true,
        }
    };
    for run in &m.runs {
        let mut c = run.start;
        while c < run.start + run.count {
            let n = (run.start + run.count - c).min(per_read);
            let off = c * cs;
            let len = (m.size - off).min(n * cs);
            let data = &mut buf[..len as usize];
            target.read_at(data, off).map_err(|e| Error::io(Side::Target, Op::Read, off, len, &e))?;
            for (i, cl) in data.chunks(cs as usize).enumerate() {
                let good = if run.data {
                    let ok = digest(cl) == m.digests[d];
                    d += 1;
                    ok
                } else {
                    buffer_is_zero(cl)
                };
                let at = off + i as u64 * cs;
                report.clusters_checked += 1;
                report.bytes_checked += cl.len() as u64;
                if !good {
                    report.mismatched_clusters += 1;
                    match &mut pending {
                        Some((o, l)) if *o + *l == at => *l += cl.len() as u64,
                        _ => {
                            if !flush(&mut pending, &mut report) {
                                return Ok(report);
                            }
                            pending = Some((at, cl.len() as u64));
                        }
                    }
                }
            }
            c += n;
        }
    }
    flush(&mut pending, &mut report);
    Ok(report)
}

/// [`verify_with`] without a callback: the full report.
pub fn verify_report(manifest: impl AsRef<Path>, target: &dyn BlockDriver) -> Result<VerifyReport> {
    verify_with(manifest, target, &mut |_, _| true)
}

/// Verify the backup in `target` against the manifest at `manifest`: `Ok(report)` when
/// every cluster of the copy set matches; `Corrupt` (`EBADMSG`) naming the first bad
/// ranges when any does not ([`verify_report`] gives them all). Other errors as
/// [`verify_with`]. Thread-safe.
pub fn verify(manifest: impl AsRef<Path>, target: &dyn BlockDriver) -> Result<VerifyReport> {
    let r = verify_report(manifest.as_ref(), target)?;
    if r.mismatched_clusters == 0 {
        return Ok(r);
    }
    let first: Vec<String> = r.mismatches.iter().take(8).map(|(o, l)| format!("{o}+{l}")).collect();
    Err(Error::new(
        ErrorKind::Corrupt,
        libc::EBADMSG,
        format!(
            "verify of {}: {} of {} clusters do not match the manifest, at bytes {}{}",
            manifest.as_ref().display(),
            r.mismatched_clusters,
            r.clusters_checked,
            first.join(", "),
            if r.mismatches.len() > 8 { ", ..." } else { "" }
        ),
    ))
}
