//! `MemDriver`: an in-memory block device for tests, examples and scratch targets.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use crate::bitmap::Bitmap;
use crate::driver::{BlockDriver, BlockStatus, StatusFlags};

const SEGMENT: u64 = 1 << 20;
const BLOCK: u64 = 4096;

/// One lazily allocated segment of memory.
type Segment = RwLock<Option<Box<[u8]>>>;

/// An in-memory, thread-safe block device.
///
/// Memory is allocated lazily in 1 MiB segments, each behind its own lock, so a large
/// mostly-empty device costs little and threads working on different segments do not
/// contend. It tracks which 4 KiB blocks were ever written (and not zeroed since), so
/// [`BlockDriver::block_status`] reports `DATA` for them and `ZERO` for the rest, like a
/// sparse file.
pub struct MemDriver {
    size: u64,
    segments: Box<[Segment]>,
    written: Bitmap,
    ever_written: AtomicBool,
}

fn check(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} is past the end of the device ({size} bytes)"),
        )),
    }
}

impl MemDriver {
    /// A device of `size` bytes that reads as zeroes. `size` must be non-zero.
    pub fn new(size: u64) -> io::Result<MemDriver> {
        if size == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "device size must not be 0"));
        }
        let no_memory = || {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot allocate the bookkeeping of a {size}-byte memory device"),
            )
        };
        let nseg = usize::try_from(size.div_ceil(SEGMENT)).map_err(|_| no_memory())?;
        let mut segments = Vec::new();
        segments.try_reserve_exact(nseg).map_err(|_| no_memory())?;
        segments.extend((0..nseg).map(|_| RwLock::new(None)));
        Ok(MemDriver {
            size,
            segments: segments.into_boxed_slice(),
            written: Bitmap::try_new(size.div_ceil(BLOCK), false).ok_or_else(no_memory)?,
            ever_written: AtomicBool::new(false),
        })
    }

    /// A device holding a copy of `data`.
    pub fn from_bytes(data: &[u8]) -> io::Result<MemDriver> {
        let d = MemDriver::new(data.len() as u64)?;
        d.write_at(data, 0)?;
        Ok(d)
    }

    /// The whole contents (for tests and verification).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.size as usize];
        self.read_at(&mut v, 0).expect("in-range read of a memory device cannot fail");
        v
    }

    /// Run `f(segment contents or None, offset in segment, position in request, len)` for
    /// every segment piece of `[offset, offset + len)`.
    fn for_pieces(&self, offset: u64, len: u64, mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let seg = (pos / SEGMENT) as usize;
            let in_seg = (pos % SEGMENT) as usize;
            let n = (len - done).min(SEGMENT - pos % SEGMENT) as usize;
            f(seg, in_seg, done as usize, n);
            done += n as u64;
        }
    }

    fn segment_len(&self, seg: usize) -> usize {
        (self.size - seg as u64 * SEGMENT).min(SEGMENT) as usize
    }
}

impl BlockDriver for MemDriver {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check(self.size, offset, buf.len() as u64)?;
        self.for_pieces(offset, buf.len() as u64, |seg, in_seg, pos, n| {
            let guard = self.segments[seg].read().unwrap_or_else(|e| e.into_inner());
            match guard.as_deref() {
                Some(data) => buf[pos..pos + n].copy_from_slice(&data[in_seg..in_seg + n]),
                None => buf[pos..pos + n].fill(0),
            }
        });
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check(self.size, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.for_pieces(offset, buf.len() as u64, |seg, in_seg, pos, n| {
            let mut guard = self.segments[seg].write().unwrap_or_else(|e| e.into_inner());
            let data = guard.get_or_insert_with(|| vec![0u8; self.segment_len(seg)].into_boxed_slice());
            data[in_seg..in_seg + n].copy_from_slice(&buf[pos..pos + n]);
        });
        let end = offset + buf.len() as u64;
        self.written.set_range(offset / BLOCK..end.div_ceil(BLOCK));
        self.ever_written.store(true, Ordering::Release);
        Ok(())
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        check(self.size, offset, len)?;
        self.for_pieces(offset, len, |seg, in_seg, _, n| {
            let mut guard = self.segments[seg].write().unwrap_or_else(|e| e.into_inner());
            if in_seg == 0 && n == self.segment_len(seg) {
                *guard = None;
            } else if let Some(data) = guard.as_deref_mut() {
                data[in_seg..in_seg + n].fill(0);
            }
        });
        // Whole blocks become holes again; partially zeroed blocks stay data.
        let end = offset + len;
        let first_full = offset.div_ceil(BLOCK);
        let end_full = if end == self.size { end.div_ceil(BLOCK) } else { end / BLOCK };
        if first_full < end_full {
            self.written.clear_range(first_full..end_full);
        }
        Ok(())
    }

    /// Frees the memory of the range (it reads as zeroes afterwards).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes_at(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        check(self.size, offset, len)?;
        let end = offset + len;
        let block = offset / BLOCK;
        let end_block = end.div_ceil(BLOCK);
        let data = self.written.get(block);
        let next =
            if data { self.written.next_clear(block, end_block) } else { self.written.next_set(block, end_block) };
        let stop = next.map_or(end, |b| (b * BLOCK).min(end));
        let flags = if data { StatusFlags::DATA } else { StatusFlags::ZERO };
        Ok(BlockStatus { len: (stop - offset).max(1).min(len), flags })
    }

    fn reads_as_zero(&self) -> bool {
        !self.ever_written.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "writes megabytes byte by byte: too slow under Miri")]
    fn read_write_across_segments_and_status() {
        let d = MemDriver::new(3 * SEGMENT + 100).unwrap();
        assert!(d.reads_as_zero());
        let data: Vec<u8> = (0..2 * SEGMENT + 10).map(|i| (i % 251) as u8).collect();
        d.write_at(&data, SEGMENT - 5).unwrap();
        assert!(!d.reads_as_zero());
        let mut back = vec![0u8; data.len()];
        d.read_at(&mut back, SEGMENT - 5).unwrap();
        assert_eq!(back, data);
        let s = d.block_status(0, d.size()).unwrap();
        assert_eq!(s, BlockStatus { len: SEGMENT - BLOCK, flags: StatusFlags::ZERO });
        let s = d.block_status(SEGMENT, d.size() - SEGMENT).unwrap();
        assert_eq!(s.flags, StatusFlags::DATA);
        d.write_zeroes_at(SEGMENT, SEGMENT).unwrap();
        let s = d.block_status(SEGMENT, SEGMENT).unwrap();
        assert_eq!(s, BlockStatus { len: SEGMENT, flags: StatusFlags::ZERO });
        let mut z = vec![1u8; SEGMENT as usize];
        d.read_at(&mut z, SEGMENT).unwrap();
        assert!(z.iter().all(|&b| b == 0));
        assert!(d.read_at(&mut [0u8; 2], d.size() - 1).is_err());
        assert!(d.write_at(&[0u8; 1], u64::MAX).is_err());
        assert!(MemDriver::new(0).is_err());
        assert_eq!(MemDriver::new(u64::MAX).err().unwrap().kind(), io::ErrorKind::OutOfMemory);
    }
}
