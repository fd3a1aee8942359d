//! `AlignedBuf`: a heap buffer aligned for `O_DIRECT`, reused by each worker.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every buffer the library allocates for I/O: enough for `O_DIRECT`
/// on any logical block size up to 4 KiB.
pub const IO_ALIGN: usize = 4096;

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
    pub fn reserve(&mut self, len: usize) {
        if len <= self.cap {
            return;
        }
        let cap = len.div_ceil(IO_ALIGN) * IO_ALIGN;
        let layout = Layout::from_size_align(cap, IO_ALIGN).expect("buffer size overflows");
        // SAFETY: the layout has a non-zero size (len > cap >= 0).
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let Some(p) = NonNull::new(p) else { alloc::handle_alloc_error(layout) };
        self.free();
        self.ptr = p;
        self.cap = cap;
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
}
