//! `AlignedBuf`: a heap buffer aligned for `O_DIRECT`, reused by each worker.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every buffer the library allocates for I/O: enough for `O_DIRECT`
/// on any logical block size up to 4 KiB.
pub const IO_ALIGN: usize = 4096;

/// The allocator could not provide a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocFailed;

/// A zero-initialised, `IO_ALIGN`-aligned byte buffer that can grow.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer; allocates nothing.
    pub fn new() -> AlignedBuf {
        AlignedBuf { ptr: NonNull::dangling(), cap: 0 }
    }

    /// A buffer of at least `len` bytes.
    pub fn with_len(len: usize) -> AlignedBuf {
        let mut b = AlignedBuf::new();
        b.reserve(len);
        b
    }

    /// Make room for `len` bytes (rounded up to `IO_ALIGN`); old contents are not kept.
    /// Aborts when memory cannot be had: the library's copy paths call
    /// [`AlignedBuf::try_reserve`] first, so this never allocates for them.
    pub fn reserve(&mut self, len: usize) {
        if self.try_reserve(len).is_err() {
            alloc::handle_alloc_error(Layout::from_size_align(len.max(1), IO_ALIGN).unwrap_or(Layout::new::<u8>()));
        }
    }

    /// Make room for `len` bytes (rounded up to `IO_ALIGN`; old contents are not kept),
    /// or fail without aborting when the memory cannot be had.
    pub fn try_reserve(&mut self, len: usize) -> Result<(), AllocFailed> {
        if len <= self.cap {
            return Ok(());
        }
        let cap = len.checked_next_multiple_of(IO_ALIGN).ok_or(AllocFailed)?;
        let layout = Layout::from_size_align(cap, IO_ALIGN).map_err(|_| AllocFailed)?;
        // SAFETY: the layout has a non-zero size (len > cap >= 0).
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let p = NonNull::new(p).ok_or(AllocFailed)?;
        self.free();
        self.ptr = p;
        self.cap = cap;
        Ok(())
    }

    /// Bytes allocated.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The first `len` bytes (at most the capacity), read-only.
    pub fn slice(&self, len: usize) -> &[u8] {
        let len = len.min(self.cap);
        if len == 0 {
            return &[];
        }
        // SAFETY: ptr is valid for cap >= len initialised bytes, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len) }
    }

    /// The first `len` bytes, growing the buffer as needed.
    pub fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        self.reserve(len);
        if len == 0 {
            return &mut [];
        }
        // SAFETY: ptr is valid for cap >= len initialised bytes, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len) }
    }

    fn free(&mut self) {
        if self.cap > 0 {
            // SAFETY: ptr was allocated with exactly this layout in reserve().
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.cap, IO_ALIGN)) };
            self.cap = 0;
            self.ptr = NonNull::dangling();
        }
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        AlignedBuf::new()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_growing() {
        let mut b = AlignedBuf::new();
        assert!(b.slice_mut(0).is_empty());
        let s = b.slice_mut(100);
        assert_eq!(s.len(), 100);
        assert_eq!(s.as_ptr() as usize % IO_ALIGN, 0);
        s.fill(7);
        let s = b.slice_mut(1 << 20);
        assert_eq!(s.len(), 1 << 20);
        assert_eq!(s.as_ptr() as usize % IO_ALIGN, 0);
    }

    #[test]
    #[cfg_attr(miri, ignore = "asks the allocator for more memory than exists")]
    fn impossible_sizes_fail_without_aborting() {
        let mut b = AlignedBuf::new();
        assert!(b.try_reserve(usize::MAX).is_err());
        assert!(b.try_reserve(usize::MAX / 2).is_err());
        assert!(b.try_reserve(4096).is_ok());
        assert_eq!(b.slice_mut(4096).len(), 4096);
    }
}
