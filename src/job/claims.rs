//! Where clusters are **claimed** and **released**: the copy bitmap plus the table of
//! in-flight claims (QEMU's CowRequest / BlockReq list).
//!
//! A cluster is in one of four states:
//! - dirty and unclaimed: its bit is 1 and no claim covers it; anyone may claim it;
//! - claimed: a hook or a worker is copying it (the bit is still 1);
//! - saved (only with `cow_buffer`, cowbuf.rs): a hook read its old data into memory
//!   and returned; the claim stays in the table, bit still 1, until a worker has
//!   written that data to the target. Hooks treat it as clean (the host may write
//!   the source), workers skip it, snapshot views read its old data from memory (a
//!   read hold does not wait for it; the data is visible in the cow buffer before the
//!   claim is marked saved, and until after its bits are cleared);
//! - clean: its old data is in the target (bit 0); the host may write it.
//!
//! Rules (all under `table`'s mutex, never held across I/O):
//! - a claim is only taken on dirty, unclaimed clusters;
//! - only the holder of a claim clears its bits (after its copy succeeded), and it
//!   clears them *before* removing the claim, so nobody sees a copied cluster as
//!   dirty-and-unclaimed and copies it twice;
//! - a failed copy releases its claim with the bits still set: a waiter then copies
//!   the clusters itself, or the background copy retries them;
//! - every release wakes all waiters.
//!
//! A snapshot view reading clusters not yet copied takes a **read hold** on them
//! (snapshot.rs): several readers may hold the same clusters, nobody may claim them
//! meanwhile (a hook waits for the hold to go, then copies; a worker skips them). A
//! reader never waits for a copier (QEMU's copy-before-write: reads go to the source,
//! host writes wait for frozen reads), so a slow or hung target never stalls a view:
//! a claim that is copying when a hold arrives goes on copying, but when it ends (copied,
//! or saved in memory) while a hold that overlaps it is still there, it is **parked**:
//! its bits stay set and hooks keep waiting for it, because the reader may be reading
//! the source there. The last such hold to go finishes the parked claim (clears its
//! bits, or marks it saved). A new hold waits for parked claims only (so readers cannot
//! starve the host), which wait for older readers only, never for the target.

use std::ops::Range;
use std::time::Duration;

use super::priority::HookGate;
use crate::bitmap::Bitmap;
use crate::sync::{AtomicU64, Condvar, Mutex, MutexGuard, Ordering};

/// The copy bitmap and the in-flight claims of one job.
pub(crate) struct Claims {
    /// 1 = still to copy. Read lock-free; bits are cleared only by a claim holder,
    /// with `table` locked.
    bitmap: Bitmap,
    /// Number of set bits of `bitmap`; updated with `table` locked.
    dirty: AtomicU64,
    /// Runs of clusters being copied (claims) or read by a snapshot view (holds) right
    /// now. Protected by this mutex.
    table: Mutex<Vec<Entry>>,
    /// Signalled (notify_all) on every release and by `wake_all`.
    released: Condvar,
    /// Times a hook waited for clusters claimed by another thread (statistics).
    waits: AtomicU64,
}

/// What a hook got from [`Claims::claim_or_wait`].
pub(crate) enum HookClaim<'a> {
    /// Every cluster of the range is clean.
    Clean,
    /// `stop()` became true while looking or waiting.
    Stopped,
    /// Dirty clusters claimed for this caller; copy them, then call the hook again.
    Claimed(Vec<Claim<'a>>),
}

/// A claimed run of clusters. Dropping it without [`Claim::done`] releases it with its
/// clusters still dirty (the copy failed or panicked), so no claim is ever leaked.
pub(crate) struct Claim<'a> {
    owner: &'a Claims,
    range: Range<u64>,
    held: bool,
}

impl Claim<'_> {
    /// The clusters of this claim.
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }

    /// The copy succeeded: clear the bits, release the claim, wake waiters.
    pub fn done(mut self) {
        self.owner.release(&self.range, true);
        self.held = false;
    }

    /// A hook has the old data of these clusters in memory (cowbuf.rs): the claim
    /// stays, marked saved, until a worker takes it back ([`Claims::take_saved`]) and
    /// writes the data. From now on hooks treat the clusters as clean.
    pub fn save(mut self) {
        let mut table = self.owner.lock();
        // A reader holding some of these clusters may be reading the source: hooks must
        // not treat them as clean before it is done (parked until its hold goes).
        let kind = if held(&table, &self.range) { Kind::Parked(Then::Saved) } else { Kind::Saved };
        if let Some(e) = table.iter_mut().find(|e| e.range == self.range && e.kind == Kind::Claim) {
            e.kind = kind;
        }
        drop(table);
        self.held = false;
        self.owner.released.notify_all();
    }

    /// Writing the saved data failed with policy `Stop`: keep the claim, still saved,
    /// for a retry after `resume` (the source no longer holds that data, so the
    /// clusters must never become dirty-and-unclaimed).
    pub fn keep_saved(mut self) {
        self.held = false;
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.held {
            self.owner.release(&self.range, false);
        }
    }
}

/// One run of clusters in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    range: Range<u64>,
    kind: Kind,
}

/// What an [`Entry`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A read hold of a snapshot view (shared).
    Hold,
    /// A claim of a copier (exclusive), copying.
    Claim,
    /// A claim whose old data a hook saved in memory (see the module doc): as good as
    /// clean for hooks and readers.
    Saved,
    /// A claim whose copy ended while read holds that overlap it were there: it
    /// becomes `Then` when the last of them goes (see the module doc).
    Parked(Then),
}

/// What a parked claim becomes once no read hold overlaps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Copied: clear its bits and remove it.
    Clean,
    /// Saved in memory by a hook: mark it [`Kind::Saved`].
    Saved,
}

impl Entry {
    fn claim(range: Range<u64>) -> Entry {
        Entry { range, kind: Kind::Claim }
    }

    fn overlaps(&self, r: &Range<u64>) -> bool {
        self.range.start < r.end && r.start < self.range.end
    }
}

/// True when a read hold overlaps `r`.
fn held(table: &[Entry], r: &Range<u64>) -> bool {
    table.iter().any(|e| e.kind == Kind::Hold && e.overlaps(r))
}

/// The end of a claim or hold covering cluster `c`.
fn claim_covering(table: &[Entry], c: u64) -> Option<u64> {
    covering(table, c).map(|e| e.range.end)
}

fn covering(table: &[Entry], c: u64) -> Option<&Entry> {
    table.iter().find(|e| e.range.contains(&c))
}

fn next_claim_start(table: &[Entry], c: u64) -> u64 {
    table.iter().map(|e| e.range.start).filter(|&s| s > c).min().unwrap_or(u64::MAX)
}

/// A read hold on clusters (see the module doc); dropping it releases them.
pub(crate) struct Hold<'a> {
    owner: &'a Claims,
    range: Range<u64>,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut table = self.owner.lock();
        let me = Entry { range: self.range.clone(), kind: Kind::Hold };
        if let Some(i) = table.iter().position(|e| *e == me) {
            table.swap_remove(i);
        }
        // Finish the parked claims no other hold overlaps any more.
        let mut i = 0;
        while i < table.len() {
            let Kind::Parked(then) = table[i].kind else {
                i += 1;
                continue;
            };
            if held(&table, &table[i].range) {
                i += 1;
                continue;
            }
            match then {
                Then::Saved => {
                    table[i].kind = Kind::Saved;
                    i += 1;
                }
                Then::Clean => {
                    let cleared = self.owner.bitmap.clear_range(table[i].range.clone());
                    self.owner.dirty.fetch_sub(cleared, Ordering::AcqRel);
                    table.swap_remove(i);
                }
            }
        }
        drop(table);
        self.owner.released.notify_all();
    }
}

impl Claims {
    /// Claims over `bitmap`, with no claim in flight.
    pub fn new(bitmap: Bitmap) -> Claims {
        let dirty = bitmap.count_ones();
        Claims {
            bitmap,
            dirty: AtomicU64::new(dirty),
            table: Mutex::new(Vec::new()),
            released: Condvar::new(),
            waits: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fast path: true when every cluster of `r` is clean. No lock, Acquire loads.
    #[inline]
    pub fn is_clean(&self, r: Range<u64>) -> bool {
        !self.bitmap.any_set(r)
    }

    /// Times a hook waited for another thread's claim.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// Clusters still to copy (claimed or not).
    pub fn dirty(&self) -> u64 {
        self.dirty.load(Ordering::Acquire)
    }

    /// For a hook covering clusters `r`: claim every dirty, unclaimed cluster of `r`
    /// (in runs of at most `max_run`); if there are none but some are claimed by
    /// others, wait for a release and look again.
    pub fn claim_or_wait(&self, r: Range<u64>, max_run: u64, stop: impl Fn() -> bool) -> HookClaim<'_> {
        let mut table = self.lock();
        loop {
            if stop() {
                return HookClaim::Stopped;
            }
            let mut mine = Vec::new();
            let mut blocked = false;
            let mut c = r.start;
            while let Some(d) = self.bitmap.next_set(c, r.end) {
                if let Some(e) = covering(&table, d) {
                    // Saved in memory by a hook: as good as clean for a hook.
                    blocked |= e.kind != Kind::Saved;
                    c = e.range.end;
                    continue;
                }
                let limit = r.end.min(d + max_run).min(next_claim_start(&table, d));
                let e = self.bitmap.next_clear(d, limit).unwrap_or(limit);
                table.push(Entry::claim(d..e));
                mine.push(Claim { owner: self, range: d..e, held: true });
                c = e;
            }
            if !mine.is_empty() {
                return HookClaim::Claimed(mine);
            }
            if !blocked {
                return HookClaim::Clean;
            }
            self.waits.fetch_add(1, Ordering::Relaxed);
            table = self.released.wait(table).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The hook's whole protocol for clusters `r` (cow.rs): claim every dirty, unclaimed
    /// cluster ([`Claims::claim_or_wait`]), wait for those others copy, copy its own
    /// claims with priority over the workers (`gate`, entered only while copying, never
    /// while waiting), and look again, until every cluster of `r` is clean or `stop()`.
    /// `copy` copies one claimed run and says whether it only saved the old data in
    /// memory; on success the claim is released clean (or kept, marked saved) and
    /// `copied` is told. The first failed copy is returned, and its claim and the
    /// remaining ones are released dirty: the clusters are copied again later.
    pub fn copy_before_write<T, E>(
        &self,
        r: Range<u64>,
        max_run: u64,
        gate: &HookGate,
        stop: impl Fn() -> bool,
        mut copy: impl FnMut(Range<u64>) -> Result<(T, bool), E>,
        mut copied: impl FnMut(Range<u64>, T),
    ) -> Result<(), E> {
        loop {
            match self.claim_or_wait(r.clone(), max_run, &stop) {
                HookClaim::Clean | HookClaim::Stopped => return Ok(()),
                HookClaim::Claimed(mine) => {
                    // Held while copying our own claims only, so no worker waits for us
                    // while we wait for one of its claims.
                    let _pass = gate.enter();
                    for claim in mine {
                        // On `?` the remaining claims are dropped: released dirty.
                        let (done, saved) = copy(claim.range())?;
                        let range = claim.range();
                        if saved {
                            claim.save();
                        } else {
                            claim.done();
                        }
                        copied(range, done);
                    }
                }
            }
        }
    }

    /// For a background worker: claim the next run of dirty, unclaimed clusters at
    /// or after `from` (wrapping around once), at most `max_run` long. `None` when
    /// every dirty cluster is claimed by someone else (or none is left).
    pub fn claim_next(&self, from: u64, max_run: u64) -> Option<Claim<'_>> {
        let n = self.bitmap.len();
        let mut pos = from.min(n);
        let mut wrapped = pos == 0;
        loop {
            // Search lock-free, then confirm under the lock.
            let Some(d) = self.bitmap.next_set(pos, n) else {
                if wrapped {
                    return None;
                }
                wrapped = true;
                pos = 0;
                continue;
            };
            let mut table = self.lock();
            if !self.bitmap.get(d) {
                pos = d + 1;
                continue;
            }
            if let Some(end) = claim_covering(&table, d) {
                pos = end;
                continue;
            }
            let limit = n.min(d + max_run).min(next_claim_start(&table, d));
            let e = self.bitmap.next_clear(d, limit).unwrap_or(limit);
            table.push(Entry::claim(d..e));
            return Some(Claim { owner: self, range: d..e, held: true });
        }
    }

    /// Release the claim on `r`: copied (`clean`: clear the bits, or park the claim while
    /// an older read hold overlaps it, see the module doc) or failed (bits stay set).
    fn release(&self, r: &Range<u64>, clean: bool) {
        let mut table = self.lock();
        let i = table.iter().position(|e| e.range == *r && e.kind != Kind::Hold);
        // Saved data is read from memory, never from the source: nothing to wait for.
        let park = clean && i.is_some_and(|i| table[i].kind != Kind::Saved) && held(&table, r);
        if park {
            if let Some(i) = i {
                table[i].kind = Kind::Parked(Then::Clean);
            }
        } else {
            if clean {
                let cleared = self.bitmap.clear_range(r.clone());
                self.dirty.fetch_sub(cleared, Ordering::AcqRel);
            }
            if let Some(i) = i {
                table.swap_remove(i);
            }
        }
        drop(table);
        self.released.notify_all();
    }

    /// For a worker about to write the saved old data of `r` (a range saved with
    /// [`Claim::save`]): the saved claim, now held by the caller. It stays marked
    /// saved (hooks keep treating it as clean) until released.
    pub fn take_saved(&self, r: Range<u64>) -> Claim<'_> {
        debug_assert!(self
            .lock()
            .iter()
            .any(|e| e.range == r && matches!(e.kind, Kind::Saved | Kind::Parked(Then::Saved))));
        Claim { owner: self, range: r, held: true }
    }

    /// For a snapshot view: hold clusters `r` for reading. Never waits for a copier (its
    /// claim is parked if it ends while the hold is there); waits only while a parked
    /// claim overlaps `r`, i.e. for older readers, so a stream of readers cannot keep
    /// the host from writing. `None` when `stop()` became true. While held, the bits of
    /// `r` do not change, except those of saved claims (read from memory, see
    /// snapshot.rs): claims cannot start on held clusters, and claims that were copying
    /// are parked, not cleared.
    pub fn hold(&self, r: Range<u64>, stop: impl Fn() -> bool) -> Option<Hold<'_>> {
        let mut table = self.lock();
        loop {
            if stop() {
                return None;
            }
            let parked = table.iter().any(|e| matches!(e.kind, Kind::Parked(_)) && e.overlaps(&r));
            if !parked {
                table.push(Entry { range: r.clone(), kind: Kind::Hold });
                return Some(Hold { owner: self, range: r });
            }
            table = self.released.wait(table).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The run of clusters from `c` (before `end`) that are all dirty or all clean:
    /// whether they are dirty, and where the run ends (stable while the caller holds
    /// them). Word-at-a-time search.
    pub fn run_from(&self, c: u64, end: u64) -> (bool, u64) {
        let dirty = self.bitmap.get(c);
        let e = if dirty { self.bitmap.next_clear(c, end) } else { self.bitmap.next_set(c, end) };
        (dirty, e.unwrap_or(end))
    }

    /// For a view's discard: wait until no claim or hold covers `r`, then mark it clean
    /// without copying (it leaves the copy set). Returns the clusters removed, or `None`
    /// when `stop()` became true.
    pub fn drop_from_copy_set(&self, r: Range<u64>, stop: impl Fn() -> bool) -> Option<u64> {
        let mut table = self.lock();
        loop {
            if stop() {
                return None;
            }
            if !table.iter().any(|e| e.range.start < r.end && r.start < e.range.end) {
                let cleared = self.bitmap.clear_range(r);
                self.dirty.fetch_sub(cleared, Ordering::AcqRel);
                return Some(cleared);
            }
            table = self.released.wait(table).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Wait until no claim or hold is in flight.
    pub fn wait_idle(&self) {
        let mut table = self.lock();
        while !table.is_empty() {
            table = self.released.wait(table).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Wait until some claim is released, or `timeout` passes.
    pub fn wait_release(&self, timeout: Duration) {
        let table = self.lock();
        if table.is_empty() {
            return;
        }
        drop(self.released.wait_timeout(table, timeout).unwrap_or_else(|e| e.into_inner()));
    }

    /// Wake every waiter (after the job's state changed), without a lost wake-up.
    pub fn wake_all(&self) {
        drop(self.lock());
        self.released.notify_all();
    }

    /// The runs of dirty clusters (claimed or not) inside `r`.
    pub fn dirty_runs(&self, r: Range<u64>) -> Vec<Range<u64>> {
        let mut runs = Vec::new();
        let mut c = r.start;
        while let Some(d) = self.bitmap.next_set(c, r.end) {
            let e = self.bitmap.next_clear(d, r.end).unwrap_or(r.end);
            runs.push(d..e);
            c = e;
        }
        runs
    }

    /// Mark `r` clean without copying (skipped at start, or zero in a zero target).
    /// Only before the job runs, or with no claim on `r`. Returns clusters cleared.
    pub fn clear_unclaimed(&self, r: Range<u64>) -> u64 {
        let _table = self.lock();
        let cleared = self.bitmap.clear_range(r);
        self.dirty.fetch_sub(cleared, Ordering::AcqRel);
        cleared
    }
}

#[cfg(all(test, loom))]
mod loom_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_claims_dirty_runs_and_skips_claimed_ones() {
        let c = Claims::new(Bitmap::new(32, true));
        let w = c.claim_next(4, 4).unwrap();
        assert_eq!(w.range(), 4..8);
        let HookClaim::Claimed(mine) = c.claim_or_wait(0..10, 64, || false) else { panic!("expected claims") };
        let ranges: Vec<_> = mine.iter().map(|m| m.range()).collect();
        assert_eq!(ranges, vec![0..4, 8..10]);
        for m in mine {
            m.done();
        }
        assert_eq!(c.dirty(), 32 - 6);
        // Only the worker's claim remains: a hook that must stop does not wait for it.
        assert!(matches!(c.claim_or_wait(0..10, 64, || true), HookClaim::Stopped));
        drop(w); // failed copy: released dirty
        let HookClaim::Claimed(mine) = c.claim_or_wait(0..10, 64, || false) else { panic!("expected claims") };
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].range(), 4..8);
        drop(mine);
        assert!(!c.is_clean(0..10));
        assert!(c.is_clean(0..4));
    }

    #[test]
    fn claim_next_wraps_and_respects_other_claims() {
        let c = Claims::new(Bitmap::new(10, true));
        let a = c.claim_next(8, 100).unwrap();
        assert_eq!(a.range(), 8..10);
        let b = c.claim_next(9, 100).unwrap();
        assert_eq!(b.range(), 0..8);
        assert!(c.claim_next(0, 100).is_none());
        a.done();
        b.done();
        assert_eq!(c.dirty(), 0);
        assert!(c.claim_next(0, 100).is_none());
    }
}
