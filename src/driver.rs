//! The `BlockDriver` trait: what cowbackup needs of a block device, and `BlockStatus`.

use std::io;

bitflags::bitflags! {
    /// What [`BlockDriver::block_status`] says of a range.
    ///
    /// `DATA`: the range is allocated (has data of its own). `ZERO`: the range reads as
    /// zeroes. An unallocated hole of a sparse file is `ZERO` without `DATA`.
    /// Same values as `COWBACKUP_STATUS_DATA` / `COWBACKUP_STATUS_ZERO` in C.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct StatusFlags: u32 {
        /// Allocated data.
        const DATA = 1;
        /// Reads as zeroes.
        const ZERO = 2;
    }
}

/// The status of the range `[offset, offset + len)` that starts at the queried offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// How many bytes from the queried offset have this status (at least 1, at most the queried length).
    pub len: u64,
    /// The status.
    pub flags: StatusFlags,
}

/// A block device: a fixed-size array of bytes with positional, blocking I/O.
///
/// Every method may be called from several threads at once (the caller's hook thread
/// and the job's worker threads), so implementations must be thread-safe; none of them
/// is called with a lock of the library held. Errors are `std::io::Error`; the job
/// reports them with the operation, range and device they belong to.
pub trait BlockDriver: Send + Sync {
    /// Size of the device in bytes. Must not change while a job uses the driver.
    fn size(&self) -> u64;

    /// Fill `buf` with the bytes at `offset`. `offset + buf.len() <= size()`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Write all of `buf` at `offset`. `offset + buf.len() <= size()`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Make `[offset, offset + len)` read as zeroes. The default writes zero buffers;
    /// drivers that can punch holes or zero ranges cheaply override it.
    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zero_buffers(self, offset, len)
    }

    /// Make written data durable. The default does nothing (volatile devices).
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// The allocation status of the range starting at `offset`, at most `len` bytes.
    /// The default reports everything as data.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let _ = offset;
        Ok(BlockStatus { len, flags: StatusFlags::DATA })
    }

    /// The caller no longer needs `[offset, offset + len)`: the driver may release its
    /// space (a hole in a file, freed memory); what the range reads afterwards is
    /// unspecified (zeroes for the built-in drivers). Advisory: the default does nothing
    /// and returns `Ok`. On a job's snapshot view it releases whole clusters (see
    /// [`crate::Job::snapshot`]).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// True when the whole device reads as zeroes right now (a freshly created sparse
    /// file or memory device). A job whose target reads zeroes does not write zero
    /// clusters at all, so a wrong `true` leaves stale data in the backup: answer from
    /// the device's state at the time of the call, never from what was true when the
    /// driver was made (another handle or program may have written to the same storage
    /// since), and answer `false` when unsure. The job asks once, when it starts.
    /// [`FileDriver`](crate::FileDriver) answers with `SEEK_DATA` on the file (no data
    /// extent: true; block devices, and filesystems that cannot tell: false). The default
    /// is `false`.
    fn reads_as_zero(&self) -> bool {
        false
    }

    /// The identity of the storage behind the driver (`st_dev`, `st_ino`) when known,
    /// so a job can refuse to back up a device onto itself through two handles.
    fn storage_id(&self) -> Option<(u64, u64)> {
        None
    }

    /// The [`FileDriver`](crate::FileDriver) behind this driver, when it is one: a job
    /// copying between two of them on a filesystem that clones extents or copies on the
    /// server ([`FileDriver::copy_offload_pays`](crate::FileDriver::copy_offload_pays))
    /// writes the data by copy offload ([`FileDriver::copy_range_to`](crate::FileDriver::copy_range_to))
    /// instead of from its buffers. Wrappers that must see every write (fault injection,
    /// counting) keep the default `None`.
    fn as_file_driver(&self) -> Option<&crate::FileDriver> {
        None
    }

    /// A name that opens this storage again, for a job's manifest to record as the backup's
    /// `target` when the driver is not a file ([`as_file_driver`](BlockDriver::as_file_driver)
    /// names files): `RbdDriver` (cargo feature `rbd`) answers its image,
    /// `rbd:POOL[/NAMESPACE]/IMAGE[:id=NAME]`, which [`crate::repo::Chain::open`] opens again
    /// (docs/manifest.md). Only `rbd:` names are recorded (anything else would read as a
    /// file path). The default, and wrappers, answer `None`: the manifest names no target
    /// and the chain is opened with the targets given ([`crate::repo::Chain::open_drivers`]).
    fn target_spec(&self) -> Option<String> {
        None
    }
}

/// Make `[offset, offset + len)` of `d` read as zeroes by writing zero buffers of at most
/// 1 MiB with `write_at`: the fallback of drivers that cannot zero a range cheaply.
pub fn write_zero_buffers<D: BlockDriver + ?Sized>(d: &D, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; len.min(CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        d.write_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A shared driver is a driver: wrappers (fault injection, counting, gating) can hold
/// an `Arc` of a driver that the host keeps using too.
impl<T: BlockDriver + ?Sized> BlockDriver for std::sync::Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).write_zeroes_at(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        (**self).block_status(offset, len)
    }
    fn reads_as_zero(&self) -> bool {
        (**self).reads_as_zero()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
    fn storage_id(&self) -> Option<(u64, u64)> {
        (**self).storage_id()
    }
    fn as_file_driver(&self) -> Option<&crate::FileDriver> {
        (**self).as_file_driver()
    }
    fn target_spec(&self) -> Option<String> {
        (**self).target_spec()
    }
}
