//! `verify`: re-read a backup's target and check every cluster of its copy set against
//! the manifest. Needs no source.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

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

/// Most threads that read and hash at once.
const MAX_THREADS: usize = 4;

/// One piece of the copy set: clusters from `first`, `count` of them, data (with the
/// index of the first one's digest) or zero.
struct Unit {
    first: u64,
    count: u64,
    digest: Option<usize>,
}

/// Where the next unit starts: run index, cluster, next digest index.
struct Cursor {
    run: usize,
    c: u64,
    d: usize,
    seq: u64,
}

/// What one unit came to: clusters and bytes checked, the bad clusters' byte ranges.
struct Checked {
    clusters: u64,
    bytes: u64,
    bad: Vec<(u64, u64)>,
}

/// Check every cluster of the copy set of the manifest at `manifest` against `target`:
/// a data cluster must hash to its digest, a zero cluster must read as zeroes. Calls
/// `on_mismatch(offset, len)` for each bad range as soon as it is complete, in order, on
/// the calling thread; a callback returning `false` stops the check early.
///
/// The target is read in 1 MiB pieces and hashed by up to 4 threads at once (one per
/// CPU: the calling thread and scoped threads `cowbackup-verify-<n>`, which call only the
/// target's `read_at`), all joined before this returns.
///
/// Errors: the manifest's (damaged: `EBADMSG`, missing: `ENOENT`, ...); `InvalidInput`
/// when the target's size differs; the target's read errors (the first in offset order).
/// Mismatches are not errors here (see [`verify`]). Thread-safe (reads only).
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
    let cursor = Mutex::new(Cursor { run: 0, c: m.runs.first().map_or(0, |r| r.start), d: 0, seq: 0 });
    let stop = AtomicBool::new(false);
    // The next unit and its sequence number, or None at the end.
    let next = || -> Option<(u64, Unit)> {
        let mut k = cursor.lock().unwrap_or_else(|e| e.into_inner());
        let run = m.runs.get(k.run)?;
        let n = (run.start + run.count - k.c).min(per_read);
        let unit = Unit { first: k.c, count: n, digest: run.data.then_some(k.d) };
        let seq = k.seq;
        k.seq += 1;
        if run.data {
            k.d += n as usize;
        }
        k.c += n;
        if k.c >= run.start + run.count {
            k.run += 1;
            if let Some(r) = m.runs.get(k.run) {
                k.c = r.start;
            }
        }
        Some((seq, unit))
    };
    let check = |u: &Unit, buf: &mut Vec<u8>| -> Result<Checked> {
        let off = u.first * cs;
        let len = (m.size - off).min(u.count * cs);
        buf.resize(len as usize, 0);
        let data = &mut buf[..len as usize];
        target.read_at(data, off).map_err(|e| Error::io(Side::Target, Op::Read, off, len, &e))?;
        let mut out = Checked { clusters: 0, bytes: 0, bad: Vec::new() };
        for (i, cl) in data.chunks(cs as usize).enumerate() {
            let good = match u.digest {
                Some(d) => digest(cl) == m.digests[d + i],
                None => buffer_is_zero(cl),
            };
            out.clusters += 1;
            out.bytes += cl.len() as u64;
            if !good {
                out.bad.push((off + i as u64 * cs, cl.len() as u64));
            }
        }
        Ok(out)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_THREADS);
    let (tx, rx) = std::sync::mpsc::channel::<(u64, Result<Checked>)>();
    let work = |tx: std::sync::mpsc::Sender<(u64, Result<Checked>)>| {
        let mut buf = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let Some((seq, u)) = next() else { break };
            if tx.send((seq, check(&u, &mut buf))).is_err() {
                break;
            }
        }
    };
    std::thread::scope(|s| -> Result<VerifyReport> {
        for n in 1..threads {
            let tx = tx.clone();
            let work = &work;
            // A helper that cannot start leaves its share to the others.
            let _ = std::thread::Builder::new().name(format!("cowbackup-verify-{n}")).spawn_scoped(s, move || work(tx));
        }
        drop(tx); // `rx` ends when every helper has
                  // The calling thread reads and hashes too, and takes the results in order.
        let mut report = VerifyReport::default();
        let mut pending: Option<(u64, u64)> = None;
        let mut waiting: BTreeMap<u64, Result<Checked>> = BTreeMap::new();
        let (mut want, mut total) = (0u64, None::<u64>);
        let mut buf = Vec::new();
        let result = (|| -> Result<()> {
            loop {
                let Some(r) = waiting.remove(&want) else {
                    if total.is_none() {
                        match next() {
                            Some((seq, u)) => {
                                waiting.insert(seq, check(&u, &mut buf));
                            }
                            None => total = Some(cursor.lock().unwrap_or_else(|e| e.into_inner()).seq),
                        }
                        continue;
                    }
                    if total == Some(want) {
                        return Ok(());
                    }
                    match rx.recv() {
                        Ok((seq, r)) => {
                            waiting.insert(seq, r);
                            continue;
                        }
                        Err(_) => {
                            return Err(Error::new(
                                ErrorKind::Io,
                                libc::EIO,
                                "verify: a helper thread ended without its result (it panicked)",
                            ))
                        }
                    }
                };
                want += 1;
                let c = r?;
                report.clusters_checked += c.clusters;
                report.bytes_checked += c.bytes;
                for (at, len) in c.bad {
                    report.mismatched_clusters += 1;
                    match &mut pending {
                        Some((o, l)) if *o + *l == at => *l += len,
                        _ => {
                            if let Some((o, l)) = pending.replace((at, len)) {
                                report.mismatches.push((o, l));
                                if !on_mismatch(o, l) {
                                    pending = None;
                                    return Ok(());
                                }
                            }
                        }
                    }
                }
            }
        })();
        stop.store(true, Ordering::Relaxed);
        drop(rx);
        result?;
        if let Some((o, l)) = pending {
            report.mismatches.push((o, l));
            on_mismatch(o, l);
        }
        Ok(report)
    })
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
