//! Freezing a bitmap for a job: QEMU's successor bitmaps and `backup_cleanup_sync_bitmap`.
//!
//! A job freezes its bitmap when it starts ([`DirtyBitmap::freeze`]): the bits dirty at that
//! instant become the *frozen* set (what the job copies, read with
//! [`DirtyBitmap::frozen_next_dirty`] / [`DirtyBitmap::frozen_is_dirty`]), and marks made
//! from then on go to a *successor*. While frozen the bitmap is *busy*: `clear`, `merge`
//! into it, `enable` and `disable` fail with EBUSY, a second `freeze` too; `mark` keeps
//! working, and `count` / `next_dirty` / `info` report frozen ∪ successor. A persistent
//! bitmap's file holds frozen ∪ successor all along (a mark while frozen is durable before
//! it returns, as always).
//!
//! At the end the job calls [`DirtyBitmap::unfreeze`] with DESIGN's rule,
//! `sync = (completed || mode == Always) && mode != Never`:
//! - `sync`: [`EndOfJob::Replace`] with `add_back` = the byte ranges of the clusters the job
//!   did not copy (empty after a success): bitmap := successor ∪ granules overlapping
//!   `add_back`; the generation is bumped when this removes bits. Persistent: one atomic
//!   switch in the file (after a crash: frozen ∪ successor or the new bitmap, nothing less).
//! - else: [`EndOfJob::Merge`]: bitmap := frozen ∪ successor; the generation is unchanged.

use std::ops::Range;

use crate::error::{Error, ErrorKind, Result};

use super::bits::{AtomicBits, Union};
use super::{lock, DirtyBitmap, State};

/// How a job gives its frozen bitmap back ([`DirtyBitmap::unfreeze`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EndOfJob {
    /// The job synced the bitmap: it becomes the successor plus the granules overlapping the
    /// byte ranges `(offset, len)` of `add_back` (clusters not copied; clipped to the device).
    Replace {
        /// Byte ranges `(offset, len)` whose granules stay (or become) dirty.
        add_back: Vec<(u64, u64)>,
    },
    /// The job did not sync: the bitmap becomes frozen ∪ successor, as if never frozen.
    Merge,
}

impl DirtyBitmap {
    /// Freeze the bitmap for a job: the dirty granules become the frozen set, later marks go
    /// to a successor, and the bitmap is busy until [`DirtyBitmap::unfreeze`]. No I/O, even
    /// for a persistent bitmap. Recording (enabled or not) is unchanged: marks while frozen
    /// reach the successor only when the bitmap records.
    ///
    /// Errors: `Busy` (EBUSY) when already frozen (another job uses it); `OutOfMemory`
    /// (ENOMEM) for the frozen set. Nothing changes on error. Thread-safe.
    pub(crate) fn freeze(&self) -> Result<()> {
        let mut st = lock(&self.state);
        if st.busy {
            return Err(Error::new(ErrorKind::Busy, libc::EBUSY, "dirty bitmap: already in use by a job (busy)"));
        }
        let frozen = AtomicBits::new(self.geo.nbits)?;
        // Word by word: a concurrent lock-free mark lands before a word moves (frozen) or
        // after (successor); frozen ∪ successor always holds it.
        for w in 0..self.live.nwords() {
            let v = self.live.swap_word(w, 0);
            if v != 0 {
                frozen.or_word(w, v);
            }
        }
        st.frozen = Some(frozen);
        st.busy = true;
        Ok(())
    }

    /// True when a granule overlapping `[offset, offset + len)` (clipped to the device) is in
    /// the frozen set; false when not frozen or `len == 0`. Thread-safe.
    #[cfg_attr(not(test), allow(dead_code))] // for pull-mode views (snapshot.rs) and tests
    pub(crate) fn frozen_is_dirty(&self, offset: u64, len: u64) -> bool {
        let g = self.granules_clipped(offset, len);
        let st = lock(&self.state);
        st.frozen.as_ref().is_some_and(|f| Union { a: f, b: None }.any_set(g))
    }

    /// The next extent `(offset, len)` of the frozen set at or after byte `from` (consecutive
    /// granules merged, clipped to the device and to `from`); `None` when there is none or
    /// the bitmap is not frozen. A job turns the frozen set into its copy set with it:
    /// `while let Some((o, l)) = bm.frozen_next_dirty(pos) { ...; pos = o + l }`. Thread-safe.
    pub(crate) fn frozen_next_dirty(&self, from: u64) -> Option<(u64, u64)> {
        if from >= self.geo.size {
            return None;
        }
        let r = {
            let st = lock(&self.state);
            Union { a: st.frozen.as_ref()?, b: None }.next_run(from >> self.shift)?
        };
        let (start, len) = self.bytes_of(r);
        let s = start.max(from);
        Some((s, start + len - s))
    }

    /// Dirty bytes of the frozen set (0 when not frozen). Thread-safe.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn frozen_count(&self) -> u64 {
        let st = lock(&self.state);
        st.frozen.as_ref().map_or(0, |f| self.count_of(Union { a: f, b: None }))
    }

    /// End the job's use of the bitmap (see the module documentation for the rule): the
    /// bitmap is no longer busy when this returns, whatever the result.
    ///
    /// Errors: `InvalidInput` when the bitmap is not frozen (nothing changes). For
    /// `Replace`: `OutOfMemory`, or a persistent bitmap's I/O error. When the new state
    /// could not be built or written at all, the bitmap is merged back instead (frozen ∪
    /// successor: more dirty bits, never fewer; generation unchanged); when the switch was
    /// started but not confirmed in the file, the bitmap holds the new state in memory and
    /// the file still holds frozen ∪ successor until the next write completes the switch.
    /// Either way the error says the sync did not reach the file. Thread-safe.
    pub(crate) fn unfreeze(&self, end: EndOfJob) -> Result<()> {
        let mut st = lock(&self.state);
        if !st.busy {
            return Err(Error::invalid("dirty bitmap: unfreeze of a bitmap that is not frozen"));
        }
        let add_back = match end {
            EndOfJob::Merge => {
                self.merge_back(&mut st);
                return Ok(());
            }
            EndOfJob::Replace { add_back } => add_back,
        };
        let ranges: Vec<Range<u64>> =
            add_back.iter().map(|&(o, l)| self.granules_clipped(o, l)).filter(|g| !g.is_empty()).collect();
        if self.store.is_some() {
            return self.persist_replace(st, &ranges);
        }
        let g = match AtomicBits::new(self.geo.nbits) {
            Ok(g) => g,
            Err(e) => {
                self.merge_back(&mut st);
                return Err(e);
            }
        };
        for r in &ranges {
            g.set_range(r.clone());
        }
        let removed = self.removes_bits(&st, &g);
        self.live.or_from(&g);
        st.frozen = None;
        st.busy = false;
        if removed {
            st.generation += 1;
        }
        Ok(())
    }

    /// bitmap := frozen ∪ successor; not busy.
    pub(super) fn merge_back(&self, st: &mut State) {
        if let Some(f) = st.frozen.take() {
            self.live.or_from(&f);
        }
        st.busy = false;
    }

    /// True when replacing frozen ∪ successor by successor ∪ `g` removes a bit.
    pub(super) fn removes_bits(&self, st: &State, g: &AtomicBits) -> bool {
        let Some(f) = st.frozen.as_ref() else { return false };
        (0..f.nwords()).any(|w| f.word(w) & !(self.live.word(w) | g.word(w)) != 0)
    }
}
