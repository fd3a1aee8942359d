//! The hash of the repository side, behind one function: BLAKE3 (measured on the
//! development machine, 64 KiB buffers, one thread: BLAKE3 2.65 GiB/s, SHA-256 with the
//! CPU's SHA extensions 1.19 GiB/s; the faster keeps a hook's added latency lowest).
//!
//! A cluster digest is the first [`DIGEST_LEN`] bytes of BLAKE3 of the cluster's bytes
//! (BLAKE3 output may be cut to any length; 128 bits keep a second preimage at 2^128
//! work and halve the manifest of a full disk). A cluster that reads as zeroes has no
//! digest: it is recorded as a zero cluster in the copy set (format.rs), so zeroes are
//! never hashed. [`zero_digest`] gives the digest of a zero cluster of `n` bytes, a
//! constant per size, for code that needs one for a zero cluster anyway.

/// Bytes of a cluster digest.
pub const DIGEST_LEN: usize = 16;

/// A cluster digest.
pub type Digest = [u8; DIGEST_LEN];

/// The digest of `data` (one cluster, or the last, shorter cluster of a device).
pub fn digest(data: &[u8]) -> Digest {
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(&blake3::hash(data).as_bytes()[..DIGEST_LEN]);
    out
}

/// The digest of a cluster of `n` zero bytes, computed once per size (at most a few
/// sizes in a process: the cluster size and a device's shorter last cluster).
pub fn zero_digest(n: usize) -> Digest {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<usize, Digest>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(d) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&n) {
        return *d;
    }
    let d = digest(&vec![0u8; n]);
    cache.lock().unwrap_or_else(|e| e.into_inner()).insert(n, d);
    d
}

/// A 32-byte BLAKE3 hash of several parts (the root digest, checksums), domain-separated
/// by `context` so a root can never be taken for another kind of hash.
pub fn hash_parts(context: &str, parts: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(context);
    for p in parts {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes of the hex string `s`; `None` unless it is exactly `n` bytes of lower-case hex
/// (one spelling per value: a changed letter case is a change).
pub fn unhex(s: &str, n: usize) -> Option<Vec<u8>> {
    if s.len() != 2 * n || !s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
        return None;
    }
    (0..n).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_digest_is_the_digest_of_zeroes() {
        assert_eq!(zero_digest(65536), digest(&[0u8; 65536]));
        assert_eq!(zero_digest(512), digest(&[0u8; 512]));
        assert_ne!(zero_digest(512), zero_digest(1024));
        assert_eq!(unhex(&hex(&[1, 0xab, 0xff]), 3).unwrap(), vec![1, 0xab, 0xff]);
        assert!(unhex("zz", 1).is_none() && unhex("AB", 1).is_none() && unhex("+1", 1).is_none());
    }
}
