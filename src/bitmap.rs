//! `Bitmap`: one bit per cluster in atomic 64-bit words, 1 = still to copy.
//!
//! Bits are read without a lock (the hook's fast path: a few `Acquire` loads). A bit
//! goes 1 → 0 with `Release` only after the cluster's old data is in the target, so a
//! reader that sees 0 also sees the target write. Searches skip whole zero words, so a
//! mostly clean bitmap of a 1 TiB device (16 Mi clusters at 64 KiB, 256 Ki words)
//! is scanned in well under a millisecond.

use crate::sync::{AtomicU64, Ordering};
use std::ops::Range;

/// An atomic bitmap of `len` bits.
pub struct Bitmap {
    words: Box<[AtomicU64]>,
    len: u64,
}

#[inline]
fn word_mask(start: u64, end: u64, word: u64) -> u64 {
    // Bits of [start, end) that fall in word `word`.
    let base = word * 64;
    let lo = start.max(base) - base;
    let hi = end.min(base + 64) - base;
    if hi - lo == 64 {
        !0
    } else {
        ((1u64 << (hi - lo)) - 1) << lo
    }
}

impl Bitmap {
    /// A bitmap of `len` bits, all set (`true`) or all clear.
    pub fn new(len: u64, set: bool) -> Bitmap {
        let nwords = len.div_ceil(64) as usize;
        let words: Box<[AtomicU64]> = (0..nwords).map(|_| AtomicU64::new(0)).collect();
        let b = Bitmap { words, len };
        if set {
            b.set_range(0..len);
        }
        b
    }

    /// Like [`Bitmap::new`], but `None` instead of aborting when the memory cannot be had.
    pub fn try_new(len: u64, set: bool) -> Option<Bitmap> {
        let nwords = usize::try_from(len.div_ceil(64)).ok()?;
        let mut v: Vec<AtomicU64> = Vec::new();
        v.try_reserve_exact(nwords).ok()?;
        v.extend((0..nwords).map(|_| AtomicU64::new(0)));
        let b = Bitmap { words: v.into_boxed_slice(), len };
        if set {
            b.set_range(0..len);
        }
        Some(b)
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a bitmap of no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bit `i` (Acquire).
    #[inline]
    pub fn get(&self, i: u64) -> bool {
        debug_assert!(i < self.len);
        self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Set every bit of `r`; returns how many were clear before.
    pub fn set_range(&self, r: Range<u64>) -> u64 {
        self.update_range(r, true)
    }

    /// Clear every bit of `r` (Release); returns how many were set before.
    pub fn clear_range(&self, r: Range<u64>) -> u64 {
        self.update_range(r, false)
    }

    fn update_range(&self, r: Range<u64>, set: bool) -> u64 {
        let (start, end) = (r.start, r.end.min(self.len));
        if start >= end {
            return 0;
        }
        let mut changed = 0;
        for w in start / 64..=(end - 1) / 64 {
            let m = word_mask(start, end, w);
            let word = &self.words[w as usize];
            let old = if set { word.fetch_or(m, Ordering::AcqRel) } else { word.fetch_and(!m, Ordering::AcqRel) };
            changed += u64::from(if set { !old & m } else { old & m }.count_ones());
        }
        changed
    }

    /// True when any bit of `r` is set (Acquire loads, no lock).
    #[inline]
    pub fn any_set(&self, r: Range<u64>) -> bool {
        let (start, end) = (r.start, r.end.min(self.len));
        if start >= end {
            return false;
        }
        (start / 64..=(end - 1) / 64)
            .any(|w| self.words[w as usize].load(Ordering::Acquire) & word_mask(start, end, w) != 0)
    }

    /// The first set bit in `[from, end)`, skipping zero words.
    pub fn next_set(&self, from: u64, end: u64) -> Option<u64> {
        self.next_with(from, end, false)
    }

    /// The first clear bit in `[from, end)`.
    pub fn next_clear(&self, from: u64, end: u64) -> Option<u64> {
        self.next_with(from, end, true)
    }

    fn next_with(&self, from: u64, end: u64, invert: bool) -> Option<u64> {
        let end = end.min(self.len);
        if from >= end {
            return None;
        }
        for w in from / 64..=(end - 1) / 64 {
            let mut bits = self.words[w as usize].load(Ordering::Acquire);
            if invert {
                bits = !bits;
            }
            bits &= word_mask(from, end, w);
            if bits != 0 {
                return Some(w * 64 + u64::from(bits.trailing_zeros()));
            }
        }
        None
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.load(Ordering::Acquire).count_ones())).sum()
    }

    /// The set bits as maximal runs.
    pub fn runs(&self) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(s) = self.next_set(pos, self.len) {
            let e = self.next_clear(s, self.len).unwrap_or(self.len);
            out.push(s..e);
            pos = e;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_search_agree_with_a_bool_model() {
        // A small deterministic xorshift so the test needs no dependency.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for len in [1u64, 63, 64, 65, 200, 1000] {
            let b = Bitmap::new(len, false);
            let mut model = vec![false; len as usize];
            // Fewer rounds under Miri (scripts/miri.sh): it interprets every step.
            for _ in 0..if cfg!(miri) { 20 } else { 300 } {
                let s = rnd(len);
                let e = s + rnd(len - s + 1);
                let set = rnd(2) == 0;
                let before = model[s as usize..e as usize].iter().filter(|&&v| v != set).count() as u64;
                let changed = if set { b.set_range(s..e) } else { b.clear_range(s..e) };
                assert_eq!(changed, before);
                model[s as usize..e as usize].fill(set);
                let q = rnd(len);
                let qe = q + rnd(len - q + 1);
                let expect_next = (q..qe).find(|&i| model[i as usize]);
                assert_eq!(b.next_set(q, qe), expect_next);
                assert_eq!(b.next_clear(q, qe), (q..qe).find(|&i| !model[i as usize]));
                assert_eq!(b.any_set(q..qe), expect_next.is_some());
                assert_eq!(b.count_ones(), model.iter().filter(|&&v| v).count() as u64);
            }
            let runs = b.runs();
            let mut from_runs = vec![false; len as usize];
            for r in runs {
                from_runs[r.start as usize..r.end as usize].fill(true);
            }
            assert_eq!(from_runs, model);
        }
    }

    #[test]
    fn new_set_covers_exactly_len() {
        let b = Bitmap::new(130, true);
        assert_eq!(b.count_ones(), 130);
        assert_eq!(b.next_clear(0, 130), None);
        assert!(Bitmap::new(0, true).is_empty());
    }
}
