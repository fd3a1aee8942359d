//! The on-disk format of a persistent dirty bitmap (version 1).
//!
//! Every unit of the file is one 512-byte sector, written whole and checked by a CRC-32C:
//! a disk writes an aligned sector atomically (old or new contents, never a mix), so no
//! unit is ever torn by a crash, and a unit that fails its checks is damage (`EBADMSG`).
//!
//! ```text
//! offset 0     header slot 0 (512 bytes)       the valid slot with the higher `seq` wins
//! offset 512   header slot 1 (512 bytes)
//! offset 1024  unused up to 4096
//! offset 4096  page slot 0 of pages 0..npages  (512 bytes each)
//!              page slot 1 of pages 0..npages
//! ```
//!
//! Header (little endian): magic `"cowbdmap"`, version `u32` = 1, crc32c `u32` (of the
//! sector with this field zero), seq `u64`, size `u64`, granularity `u64`, uuid `[u8; 16]`,
//! generation `u64`, epoch `u64`, flags `u32` (bit 0: recording), zeroes.
//!
//! Page: magic `"CBPG"`, crc32c `u32` (of the sector with this field zero), page index `u64`,
//! epoch `u64`, uuid `[u8; 16]`, then 59 bitmap words (3776 granules). Page `p` holds words
//! `59p .. 59p + 59`. Each page has two slots; a page's content is the slot whose epoch
//! equals the header's epoch (empty when neither does). Within an epoch a page is rewritten
//! in place and only gains bits; a new epoch (clear, a job's sync) is written into the other
//! slots and made current by one header write: the switch is atomic.

use crate::error::{Error, ErrorKind, Result};

use super::crc32c::crc32c;
use super::{MAX_GRANULARITY, MIN_GRANULARITY};

/// The unit of the file: one disk sector.
pub(crate) const SECTOR: usize = 512;
/// Where the page slots start.
pub(crate) const PAGES_OFFSET: u64 = 4096;
/// Bitmap words in one page.
pub(crate) const WORDS_PER_PAGE: u64 = 59;
/// Bytes of a page before its words.
const PAGE_HEADER: usize = 40;

const MAGIC: [u8; 8] = *b"cowbdmap";
const PAGE_MAGIC: [u8; 4] = *b"CBPG";
const VERSION: u32 = 1;
/// Header flag: the bitmap records marks (enabled).
pub(crate) const HEADER_RECORDING: u32 = 1;
/// Sequence numbers and epochs only count up, one per switch, from 0 and 1: one at or
/// above this is damage, and rejecting it keeps `seq + 1` and `epoch + 1` from wrapping
/// (a header of seq `u64::MAX` would otherwise win over every later one, and a switch
/// written after it would be lost on the next open; found by fuzz/bitmap_file).
pub(crate) const MAX_COUNTER: u64 = 1 << 62;

/// A corrupt-file error (`EBADMSG`) with a message.
pub(crate) fn corrupt(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Corrupt, libc::EBADMSG, format!("dirty bitmap file is damaged: {}", msg.into()))
}

/// The CRC of a sector with its checksum field (4 bytes at `field`) taken as zero.
fn sector_crc(buf: &[u8; SECTOR], field: usize) -> u32 {
    let mut copy = *buf;
    copy[field..field + 4].fill(0);
    crc32c(&copy)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The geometry of a bitmap: how many granules, words and pages, and where they live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) size: u64,
    pub(crate) granularity: u64,
    pub(crate) nbits: u64,
    pub(crate) nwords: u64,
    pub(crate) npages: u64,
}

impl Geometry {
    /// The geometry of a bitmap of a `size`-byte device with `granularity`-byte granules.
    /// Errors: `InvalidInput` (size 0, granularity not a power of two in 512 B ..= 2 GiB).
    pub(crate) fn new(size: u64, granularity: u64) -> Result<Geometry> {
        if size == 0 {
            return Err(Error::invalid("dirty bitmap: the device size must not be 0"));
        }
        if !granularity.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity) {
            return Err(Error::invalid(format!(
                "dirty bitmap: granularity {granularity} is invalid: it must be a power of two from {MIN_GRANULARITY} to {MAX_GRANULARITY}"
            )));
        }
        let nbits = size.div_ceil(granularity);
        let nwords = nbits.div_ceil(64);
        Ok(Geometry { size, granularity, nbits, nwords, npages: nwords.div_ceil(WORDS_PER_PAGE) })
    }

    /// Bytes the file (or device) needs.
    pub(crate) fn file_size(&self) -> u64 {
        PAGES_OFFSET + 2 * self.npages * SECTOR as u64
    }

    /// Offset of slot `slot` (0 or 1) of page `page`.
    pub(crate) fn slot_offset(&self, page: u64, slot: u8) -> u64 {
        PAGES_OFFSET + (u64::from(slot) * self.npages + page) * SECTOR as u64
    }

    /// Offset of header slot `slot`.
    pub(crate) fn header_offset(slot: u8) -> u64 {
        u64::from(slot) * SECTOR as u64
    }

    /// The words of page `page`: `first..end`.
    pub(crate) fn page_words(&self, page: u64) -> std::ops::Range<u64> {
        let first = page * WORDS_PER_PAGE;
        first..(first + WORDS_PER_PAGE).min(self.nwords)
    }
}

/// The header of a bitmap file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// Write counter: of the two slots, the valid one with the higher seq is current.
    pub(crate) seq: u64,
    pub(crate) size: u64,
    pub(crate) granularity: u64,
    pub(crate) uuid: [u8; 16],
    /// Bumped when bits are removed.
    pub(crate) generation: u64,
    /// Pages of this epoch are current; others are stale (or of an aborted switch).
    pub(crate) epoch: u64,
    /// `HEADER_RECORDING`.
    pub(crate) flags: u32,
    /// The disk identity the bitmap was created for (`BackupOptions::disk_id`): byte 0 its
    /// length (0: none yet), then the bytes. On disk at offset 76 (length) and 80 (bytes);
    /// files written before it have zeroes there (no disk id).
    pub(crate) disk_id: [u8; 1 + MAX_DISK_ID],
}

/// Longest disk id a bitmap file can record, in bytes.
pub(crate) const MAX_DISK_ID: usize = 128;

impl Header {
    /// The sector of this header.
    pub(crate) fn encode(&self) -> [u8; SECTOR] {
        let mut b = [0u8; SECTOR];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.size.to_le_bytes());
        b[32..40].copy_from_slice(&self.granularity.to_le_bytes());
        b[40..56].copy_from_slice(&self.uuid);
        b[56..64].copy_from_slice(&self.generation.to_le_bytes());
        b[64..72].copy_from_slice(&self.epoch.to_le_bytes());
        b[72..76].copy_from_slice(&self.flags.to_le_bytes());
        let n = self.disk_id[0] as usize;
        b[76] = n as u8;
        b[80..80 + n].copy_from_slice(&self.disk_id[1..1 + n]);
        let crc = sector_crc(&b, 12);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode header slot `slot`. Errors: `Corrupt` (EBADMSG) naming what is wrong.
    pub(crate) fn decode(b: &[u8; SECTOR], slot: u8) -> Result<Header> {
        if b[0..8] != MAGIC {
            return Err(corrupt(format!("header slot {slot}: no cowbackup dirty bitmap magic (not a bitmap file)")));
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(corrupt(format!(
                "header slot {slot}: unknown format version {version} (this library reads {VERSION})"
            )));
        }
        if u32_at(b, 12) != sector_crc(b, 12) {
            return Err(corrupt(format!("header slot {slot}: checksum mismatch")));
        }
        let h = Header {
            seq: u64_at(b, 16),
            size: u64_at(b, 24),
            granularity: u64_at(b, 32),
            uuid: b[40..56].try_into().expect("16 bytes"),
            generation: u64_at(b, 56),
            epoch: u64_at(b, 64),
            flags: u32_at(b, 72),
            disk_id: [0; 1 + MAX_DISK_ID],
        };
        let n = b[76] as usize;
        let mut h = h;
        if n <= MAX_DISK_ID {
            h.disk_id[0] = n as u8;
            h.disk_id[1..1 + n].copy_from_slice(&b[80..80 + n]);
        }
        if h.flags & !HEADER_RECORDING != 0
            || n > MAX_DISK_ID
            || b[77..80].iter().chain(&b[80 + n.min(MAX_DISK_ID)..]).any(|&x| x != 0)
        {
            return Err(corrupt(format!("header slot {slot}: unknown flags or fields")));
        }
        if h.seq >= MAX_COUNTER || h.epoch >= MAX_COUNTER {
            return Err(corrupt(format!(
                "header slot {slot}: sequence number {} or epoch {} out of range",
                h.seq, h.epoch
            )));
        }
        Geometry::new(h.size, h.granularity).map_err(|e| corrupt(format!("header slot {slot}: {}", e.message())))?;
        Ok(h)
    }
}

/// One page: its epoch and words.
pub(crate) struct Page {
    pub(crate) epoch: u64,
    pub(crate) words: [u64; WORDS_PER_PAGE as usize],
}

/// The sector of page `index` of epoch `epoch` holding `words` (the rest zero).
pub(crate) fn encode_page(index: u64, epoch: u64, uuid: &[u8; 16], words: &[u64]) -> [u8; SECTOR] {
    debug_assert!(words.len() as u64 <= WORDS_PER_PAGE);
    let mut b = [0u8; SECTOR];
    b[0..4].copy_from_slice(&PAGE_MAGIC);
    b[8..16].copy_from_slice(&index.to_le_bytes());
    b[16..24].copy_from_slice(&epoch.to_le_bytes());
    b[24..40].copy_from_slice(uuid);
    for (i, w) in words.iter().enumerate() {
        b[PAGE_HEADER + 8 * i..PAGE_HEADER + 8 * i + 8].copy_from_slice(&w.to_le_bytes());
    }
    let crc = sector_crc(&b, 4);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decode slot `slot` of page `index`. Errors: `Corrupt` (EBADMSG): not a page, checksum
/// mismatch, another page's or another bitmap's sector.
pub(crate) fn decode_page(b: &[u8; SECTOR], index: u64, slot: u8, uuid: &[u8; 16]) -> Result<Page> {
    let at = || format!("page {index} slot {slot}");
    if b[0..4] != PAGE_MAGIC {
        return Err(corrupt(format!("{}: not a bitmap page", at())));
    }
    if u32_at(b, 4) != sector_crc(b, 4) {
        return Err(corrupt(format!("{}: checksum mismatch", at())));
    }
    let found = u64_at(b, 8);
    if found != index {
        return Err(corrupt(format!("{}: holds page {found}", at())));
    }
    if b[24..40] != uuid[..] {
        return Err(corrupt(format!("{}: belongs to another bitmap (uuid differs)", at())));
    }
    let mut words = [0u64; WORDS_PER_PAGE as usize];
    for (i, w) in words.iter_mut().enumerate() {
        *w = u64_at(b, PAGE_HEADER + 8 * i);
    }
    let epoch = u64_at(b, 16);
    if epoch >= MAX_COUNTER {
        return Err(corrupt(format!("{}: epoch {epoch} out of range", at())));
    }
    Ok(Page { epoch, words })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_format_round_trips_and_rejects_damage() {
        let h = Header {
            seq: 7,
            size: 1 << 30,
            granularity: 65536,
            uuid: [9; 16],
            generation: 3,
            epoch: 5,
            flags: HEADER_RECORDING,
            disk_id: {
                let mut d = [0; 1 + MAX_DISK_ID];
                d[0] = 3;
                d[1..4].copy_from_slice(b"vda");
                d
            },
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b, 0).unwrap(), h);
        for i in [0usize, 9, 13, 20, 100, 511] {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert_eq!(Header::decode(&bad, 1).unwrap_err().errno(), libc::EBADMSG, "byte {i}");
        }
        let words: Vec<u64> = (0..WORDS_PER_PAGE).map(|i| i * 3 + 1).collect();
        let p = encode_page(4, 5, &[9; 16], &words);
        let page = decode_page(&p, 4, 0, &[9; 16]).unwrap();
        assert_eq!(page.epoch, 5);
        assert_eq!(&page.words[..], &words[..]);
        assert!(decode_page(&p, 3, 0, &[9; 16]).is_err());
        assert!(decode_page(&p, 4, 0, &[8; 16]).is_err());
        for i in [0usize, 5, 10, 17, 30, 45, 511] {
            let mut bad = p;
            bad[i] ^= 1;
            assert_eq!(decode_page(&bad, 4, 1, &[9; 16]).err().unwrap().errno(), libc::EBADMSG, "byte {i}");
        }
        assert!(decode_page(&[0; SECTOR], 0, 0, &[9; 16]).is_err());
        // Counters that the next switch would wrap: damage, not a header that wins forever.
        for (seq, epoch) in [(u64::MAX, 5), (7, u64::MAX), (MAX_COUNTER, 5)] {
            let b = Header { seq, epoch, ..h }.encode();
            assert_eq!(Header::decode(&b, 0).unwrap_err().errno(), libc::EBADMSG, "seq {seq} epoch {epoch}");
        }
        let p = encode_page(4, u64::MAX, &[9; 16], &words);
        assert_eq!(decode_page(&p, 4, 0, &[9; 16]).err().unwrap().errno(), libc::EBADMSG);
    }

    #[test]
    fn dirty_geometry() {
        let g = Geometry::new(1000 * 512 + 1, 512).unwrap();
        assert_eq!((g.nbits, g.nwords, g.npages), (1001, 16, 1));
        assert_eq!(g.file_size(), 4096 + 1024);
        let g = Geometry::new(u64::MAX, 512).unwrap();
        assert_eq!(g.nbits, 1 << 55);
        assert!(Geometry::new(0, 512).is_err());
        assert!(Geometry::new(1, 256).is_err());
        assert!(Geometry::new(1, 3 << 9).is_err());
        assert!(Geometry::new(1, 4 << 30).is_err());
    }
}
