//! `AtomicBits`: the bit storage of a dirty bitmap (one bit per granule) in atomic
//! 64-bit words, plus searches over the union of two of them (frozen ∪ successor).
//!
//! Allocated zeroed and fallibly (`alloc_zeroed`: a big, mostly clean bitmap costs pages
//! only where bits were set), so an impossible size is `ENOMEM`, never an abort.

use std::alloc::{alloc_zeroed, Layout};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, ErrorKind, Result};

/// A fixed number of bits in atomic words. Every method takes `&self`; single-bit and
/// single-word updates are atomic, a range update is atomic word by word.
pub(crate) struct AtomicBits {
    words: Box<[AtomicU64]>,
    len: u64,
}

/// The bits of `[start, end)` that fall in word `w`.
#[inline]
pub(crate) fn word_mask(start: u64, end: u64, w: u64) -> u64 {
    let base = w * 64;
    let lo = start.max(base) - base;
    let hi = end.min(base + 64) - base;
    if hi - lo == 64 {
        !0
    } else {
        ((1u64 << (hi - lo)) - 1) << lo
    }
}

impl AtomicBits {
    /// `len` clear bits. Errors: `OutOfMemory` (ENOMEM) when the words cannot be allocated.
    pub(crate) fn new(len: u64) -> Result<AtomicBits> {
        let nwords = len.div_ceil(64);
        let no_memory = || {
            Error::new(
                ErrorKind::OutOfMemory,
                libc::ENOMEM,
                format!("cannot allocate a dirty bitmap of {len} bits ({nwords} words)"),
            )
        };
        let n = usize::try_from(nwords).map_err(|_| no_memory())?;
        if n == 0 {
            return Ok(AtomicBits { words: Box::new([]), len });
        }
        let layout = Layout::array::<AtomicU64>(n).map_err(|_| no_memory())?;
        // SAFETY: `layout` has a non-zero size (n > 0 words of 8 bytes).
        let ptr = unsafe { alloc_zeroed(layout) }.cast::<AtomicU64>();
        if ptr.is_null() {
            return Err(no_memory());
        }
        // SAFETY: `ptr` is a fresh allocation of exactly `Layout::array::<AtomicU64>(n)` (the
        // layout `Box<[AtomicU64]>` frees with), zeroed, and all-zero bytes are a valid
        // `AtomicU64`; the box becomes its only owner.
        let words = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, n)) };
        Ok(AtomicBits { words, len })
    }

    /// Number of words.
    pub(crate) fn nwords(&self) -> u64 {
        self.words.len() as u64
    }

    /// Word `w` (Acquire).
    #[inline]
    pub(crate) fn word(&self, w: u64) -> u64 {
        self.words[w as usize].load(Ordering::Acquire)
    }

    /// OR `m` into word `w`; returns the old word.
    #[inline]
    pub(crate) fn or_word(&self, w: u64, m: u64) -> u64 {
        self.words[w as usize].fetch_or(m, Ordering::AcqRel)
    }

    /// Replace word `w` by `v`; returns the old word.
    #[inline]
    pub(crate) fn swap_word(&self, w: u64, v: u64) -> u64 {
        self.words[w as usize].swap(v, Ordering::AcqRel)
    }

    /// Set every bit of `r` (clipped to the length); true when any was clear.
    pub(crate) fn set_range(&self, r: Range<u64>) -> bool {
        let (start, end) = (r.start, r.end.min(self.len));
        if start >= end {
            return false;
        }
        let mut changed = false;
        for w in start / 64..=(end - 1) / 64 {
            let m = word_mask(start, end, w);
            changed |= self.or_word(w, m) & m != m;
        }
        changed
    }

    /// True when every bit of `r` (clipped to the length) is set: a few Acquire loads.
    #[inline]
    pub(crate) fn all_set(&self, r: Range<u64>) -> bool {
        let (start, end) = (r.start, r.end.min(self.len));
        if start >= end {
            return true;
        }
        (start / 64..=(end - 1) / 64).all(|w| {
            let m = word_mask(start, end, w);
            self.word(w) & m == m
        })
    }

    /// True when no bit is set.
    pub(crate) fn is_clear(&self) -> bool {
        self.words.iter().all(|w| w.load(Ordering::Acquire) == 0)
    }

    /// Clear every bit; true when any was set.
    pub(crate) fn clear_all(&self) -> bool {
        let mut any = false;
        for w in self.words.iter() {
            any |= w.swap(0, Ordering::AcqRel) != 0;
        }
        any
    }

    /// OR every bit of `other` (same length) into `self`.
    pub(crate) fn or_from(&self, other: &AtomicBits) {
        debug_assert_eq!(self.len, other.len);
        for w in 0..self.nwords() {
            let v = other.word(w);
            if v != 0 {
                self.or_word(w, v);
            }
        }
    }

    /// Number of set bits.
    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.load(Ordering::Acquire).count_ones())).sum()
    }
}

/// The union of one or two `AtomicBits` of the same length, read word by word.
#[derive(Clone, Copy)]
pub(crate) struct Union<'a> {
    pub(crate) a: &'a AtomicBits,
    pub(crate) b: Option<&'a AtomicBits>,
}

impl Union<'_> {
    #[inline]
    fn word(&self, w: u64) -> u64 {
        self.a.word(w) | self.b.map_or(0, |b| b.word(w))
    }

    /// Number of bits.
    pub(crate) fn len(&self) -> u64 {
        self.a.len
    }

    /// Bit `i` of the union.
    pub(crate) fn get(&self, i: u64) -> bool {
        i < self.len() && self.word(i / 64) & (1 << (i % 64)) != 0
    }

    /// Number of bits set in the union.
    pub(crate) fn count(&self) -> u64 {
        (0..self.a.nwords()).map(|w| u64::from(self.word(w).count_ones())).sum()
    }

    /// True when a bit of `r` is set in the union.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn any_set(&self, r: Range<u64>) -> bool {
        self.next_set(r.start, r.end).is_some()
    }

    /// The first set bit in `[from, end)`, skipping zero words.
    pub(crate) fn next_set(&self, from: u64, end: u64) -> Option<u64> {
        self.next_with(from, end, false)
    }

    /// The first clear bit in `[from, end)`.
    pub(crate) fn next_clear(&self, from: u64, end: u64) -> Option<u64> {
        self.next_with(from, end, true)
    }

    fn next_with(&self, from: u64, end: u64, invert: bool) -> Option<u64> {
        let end = end.min(self.len());
        if from >= end {
            return None;
        }
        for w in from / 64..=(end - 1) / 64 {
            let mut bits = self.word(w);
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

    /// The first run of set bits at or after `from`: `start..end`.
    pub(crate) fn next_run(&self, from: u64) -> Option<Range<u64>> {
        let s = self.next_set(from, self.len())?;
        let e = self.next_clear(s, self.len()).unwrap_or(self.len());
        Some(s..e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_bits_agree_with_a_bool_model() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for len in [1u64, 63, 64, 65, 130, 1000] {
            let a = AtomicBits::new(len).unwrap();
            let b = AtomicBits::new(len).unwrap();
            let mut ma = vec![false; len as usize];
            let mut mb = vec![false; len as usize];
            // Fewer rounds under Miri (scripts/miri.sh): it interprets every step.
            for _ in 0..if cfg!(miri) { 20 } else { 200 } {
                let s = rnd(len);
                let e = s + rnd(len - s + 1);
                let (bits, model) = if rnd(2) == 0 { (&a, &mut ma) } else { (&b, &mut mb) };
                let was_all = model[s as usize..e as usize].iter().all(|&v| v);
                assert_eq!(bits.all_set(s..e), was_all);
                assert_eq!(bits.set_range(s..e), !was_all);
                model[s as usize..e as usize].fill(true);
                let u = Union { a: &a, b: Some(&b) };
                let mu: Vec<bool> = ma.iter().zip(&mb).map(|(x, y)| *x || *y).collect();
                let q = rnd(len);
                let qe = q + rnd(len - q + 1);
                assert_eq!(u.next_set(q, qe), (q..qe).find(|&i| mu[i as usize]));
                assert_eq!(u.next_clear(q, qe), (q..qe).find(|&i| !mu[i as usize]));
                assert_eq!(u.count(), mu.iter().filter(|&&v| v).count() as u64);
                assert_eq!(u.get(q), mu[q as usize]);
                if let Some(r) = u.next_run(q) {
                    assert!(r.start >= q && r.start < r.end);
                    assert!((r.start..r.end).all(|i| mu[i as usize]));
                    assert!(r.end == len || !mu[r.end as usize]);
                    assert!((q..r.start).all(|i| !mu[i as usize]));
                }
            }
            assert_eq!(a.count(), ma.iter().filter(|&&v| v).count() as u64);
            a.or_from(&b);
            assert_eq!(a.count(), ma.iter().zip(&mb).filter(|(x, y)| **x || **y).count() as u64);
            let had = a.count() > 0;
            assert_eq!(a.clear_all(), had);
            assert!(a.is_clear());
            assert!(!a.clear_all());
        }
    }

    #[test]
    // Miri reports the impossible allocation as resource exhaustion instead of failing it.
    #[cfg_attr(miri, ignore = "asks the allocator for more memory than exists")]
    fn dirty_bits_absurd_size_is_enomem() {
        let e = AtomicBits::new(u64::MAX).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::OutOfMemory);
        assert_eq!(e.errno(), libc::ENOMEM);
    }
}
