//! Fuzz target `bitmap_file`: the persistent dirty bitmap's file parser.
//!
//! The input is the bytes of a bitmap file (after one byte of flags). It is opened with
//! `DirtyBitmap::open_on` on a memory device. Whatever the bytes, the result is `EBADMSG`
//! (or `ENOMEM`) or a valid bitmap — never a panic, never a bitmap that breaks later:
//! an opened bitmap is queried, marked, cleared and reopened, and must keep its bits.
//!
//! Every sector of the format carries a CRC-32C, which random mutations almost never
//! satisfy; flag bits ask the target to recompute the checksums of the mutated file (its
//! two header slots and every page sector), so the fuzzer reaches the checks behind them:
//! - bit 0: fix the header checksums; bit 1: fix the page checksums.
//!
//! Seeds (fuzz/corpus/bitmap_file) are valid files written by the library itself.
#![no_main]

use std::sync::Arc;

use cowbackup::{BlockDriver, DirtyBitmap, MemDriver};
use libfuzzer_sys::fuzz_target;

const SECTOR: usize = 512;
const PAGES_OFFSET: usize = 4096;

/// CRC-32C (Castagnoli, reflected), bit by bit: the format's sector checksum.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// Recompute the checksum of the sector at `at` (field of 4 bytes at `field`), if whole.
fn fix_sector(file: &mut [u8], at: usize, field: usize) {
    if file.len() < at + SECTOR {
        return;
    }
    let s = &mut file[at..at + SECTOR];
    s[field..field + 4].fill(0);
    let crc = crc32c(s);
    s[field..field + 4].copy_from_slice(&crc.to_le_bytes());
}

fn granules(bm: &DirtyBitmap) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    let mut from = 0;
    while let Some((o, l)) = bm.next_dirty(from) {
        assert!(l > 0 && o >= from && o + l <= bm.size(), "next_dirty({from}) = ({o}, {l}) of {}", bm.size());
        v.push((o, l));
        from = o + l;
    }
    v
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else { return };
    let mut file = bytes.to_vec();
    if flags & 1 != 0 {
        fix_sector(&mut file, 0, 12);
        fix_sector(&mut file, SECTOR, 12);
    }
    if flags & 2 != 0 {
        let mut at = PAGES_OFFSET;
        while at + SECTOR <= file.len() {
            fix_sector(&mut file, at, 4);
            at += SECTOR;
        }
    }
    let Ok(dev) = MemDriver::from_bytes(&file) else { return };
    let dev = Arc::new(dev);
    let bm = match DirtyBitmap::open_on(dev.clone()) {
        Ok(bm) => bm,
        Err(e) => {
            assert!(
                [libc::EBADMSG, libc::ENOMEM].contains(&e.errno()),
                "open of a damaged file must fail with EBADMSG or ENOMEM, not errno {}: {e}",
                e.errno()
            );
            return;
        }
    };
    // A valid bitmap: consistent answers...
    let info = bm.info();
    let runs = granules(&bm);
    let counted: u64 = runs.iter().map(|r| r.1).sum();
    assert_eq!(counted, bm.count(), "count() and next_dirty() disagree");
    assert!(info.count <= info.size);
    // ...and usable: a mark is durable, a clear switches, a reopen finds exactly that. A
    // file whose counters are one step from their limit refuses the write that would pass
    // it (EOVERFLOW, nothing written): the reopen must then find the bits as they were.
    let exhausted = |r: cowbackup::Result<()>, what: &str| match r {
        Ok(()) => false,
        Err(e) if e.errno() == libc::EOVERFLOW => true,
        Err(e) => panic!("{what} on a memory device: {e}"),
    };
    let last = bm.size() - 1;
    let mut want = runs.clone();
    if !exhausted(bm.mark(last, 1), "mark") {
        want = granules(&bm);
        assert!(bm.count() >= counted);
        if flags & 4 != 0 {
            if !exhausted(bm.clear(), "clear") {
                want = granules(&bm);
                if !exhausted(bm.mark(0, 1), "mark") {
                    want = granules(&bm);
                }
            }
        }
    } else {
        assert_eq!(granules(&bm), runs, "a refused mark changed the bits");
    }
    let generation = bm.generation();
    drop(bm);
    let again = DirtyBitmap::open_on(dev.clone() as Arc<dyn BlockDriver>)
        .unwrap_or_else(|e| panic!("a bitmap the library opened and wrote no longer opens: {e}"));
    assert_eq!(granules(&again), want, "the reopened bitmap lost or gained bits");
    assert_eq!(again.generation(), generation);
    assert_eq!(again.uuid(), info.uuid);
});
