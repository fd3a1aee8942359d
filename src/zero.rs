//! `buffer_is_zero`: is a buffer all zero bytes? Used per cluster to turn zero data
//! into `write_zeroes` (or nothing at all, when the target already reads zeroes).

/// True when every byte of `buf` is zero.
///
/// Checks the unaligned head and tail bytewise and the aligned middle as `u128`
/// words, eight at a time, so the compiler emits wide vector ORs. The first word is
/// tested alone first: most data clusters are rejected after 16 bytes.
pub fn buffer_is_zero(buf: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128, and align_to only reinterprets the
    // correctly aligned middle part of the slice.
    let (head, words, tail) = unsafe { buf.align_to::<u128>() };
    if head.iter().any(|&b| b != 0) || tail.iter().any(|&b| b != 0) {
        return false;
    }
    if let Some(&first) = words.first() {
        if first != 0 {
            return false;
        }
    }
    let mut chunks = words.chunks_exact(8);
    for chunk in &mut chunks {
        let acc = chunk.iter().fold(0u128, |a, &w| a | w);
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&w| w == 0)
}

#[cfg(test)]
mod tests {
    use super::buffer_is_zero;

    #[test]
    fn finds_any_nonzero_byte_at_any_offset_and_alignment() {
        let mut buf = vec![0u8; 4096 + 64];
        // Under Miri (scripts/miri.sh) fewer starts and every 61st byte (and the last):
        // it interprets every step, and this loop is quadratic.
        let (starts, stride) = if cfg!(miri) { (3, 61) } else { (17, 1) };
        for start in 0..starts {
            for len in [0usize, 1, 15, 16, 17, 127, 128, 129, 4096] {
                let s = &mut buf[start..start + len];
                assert!(buffer_is_zero(s));
                for i in (0..len).filter(|&i| i % stride == 0 || i + 1 == len) {
                    s[i] = 0x80;
                    assert!(!buffer_is_zero(s), "start {start} len {len} byte {i}");
                    s[i] = 0;
                }
            }
        }
    }
}
