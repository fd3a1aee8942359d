//! `DirtyBitmap`: change tracking for incremental backups.
//!
//! One bit per *granule* (a power of two from 512 B to 2 GiB, default 64 KiB) records that
//! the host wrote to that part of the device. The host's write path calls
//! [`DirtyBitmap::mark`] before the write (next to a running job's `cow_before_write`);
//! an incremental backup later copies only what is dirty.
//!
//! - In memory: [`DirtyBitmap::new`].
//! - Persistent and crash-safe: [`DirtyBitmap::create`] / [`DirtyBitmap::open`] on a file, or
//!   [`DirtyBitmap::create_on`] / [`DirtyBitmap::open_on`] on any [`BlockDriver`] (tests run it
//!   on the power-loss simulator [`CrashDriver`](crate::CrashDriver)). Write-ahead like
//!   dm-era: when `mark` returns, the granules it covers are durable in the file (see
//!   `persistent.rs` and `format.rs` for how, and why a crash at any instant loses no
//!   returned mark).
//!
//! Jobs freeze a bitmap while they run (QEMU's successor bitmaps); see `freeze.rs`.

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::driver::BlockDriver;
use crate::error::{Error, ErrorKind, Result};

mod bits;
mod crc32c;
mod file;
mod format;
mod freeze;
mod identity;
mod owner;
mod persistent;
#[cfg(test)]
mod tests;
mod uuid;

use bits::{AtomicBits, Union};
use format::Geometry;
#[allow(unused_imports)] // For src/job (see freeze.rs).
pub(crate) use freeze::EndOfJob;
use persistent::{DiskState, Store};

/// The smallest granularity: one 512-byte sector.
pub const MIN_GRANULARITY: u64 = 512;
/// The largest granularity: 2 GiB.
pub const MAX_GRANULARITY: u64 = 1 << 31;
/// The usual granularity, 64 KiB (QEMU's default for dirty bitmaps and backup clusters).
pub const DEFAULT_GRANULARITY: u64 = 1 << 16;

bitflags::bitflags! {
    /// The state bits of [`BitmapInfo::flags`]. Same values as `COWBACKUP_BITMAP_*` in C.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct BitmapFlags: u32 {
        /// The bitmap records marks (enabled; see [`DirtyBitmap::disable`]).
        const RECORDING = 1;
        /// A job uses the bitmap (frozen): `clear`, `merge` into it, `enable` and `disable`
        /// fail with `Busy` (EBUSY) until the job ends.
        const BUSY = 2;
        /// The bitmap is stored in a file (or driver) and survives restarts and crashes.
        const PERSISTENT = 4;
    }
}

/// What [`DirtyBitmap::info`] reports: a consistent snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Bytes of device covered.
    pub size: u64,
    /// Bytes per bit.
    pub granularity: u64,
    /// Dirty bytes (the last granule clipped to `size`).
    pub count: u64,
    /// Bumped each time bits are removed (see [`DirtyBitmap::generation`]).
    pub generation: u64,
    /// Random at creation; a persistent bitmap keeps it across reopens.
    pub uuid: [u8; 16],
    /// `RECORDING`, `BUSY`, `PERSISTENT`.
    pub flags: BitmapFlags,
}

/// Which granules of a device were written: the change tracking of incremental backups.
///
/// ```
/// use cowbackup::DirtyBitmap;
///
/// let bm = DirtyBitmap::new(1 << 30, 65536).unwrap();
/// bm.mark(4096, 4096).unwrap(); // inside granule 0
/// bm.mark(65536 * 3 - 10, 20).unwrap(); // across granules 2 and 3
/// assert_eq!(bm.count(), 3 * 65536);
/// assert_eq!(bm.next_dirty(0), Some((0, 65536)));
/// assert_eq!(bm.next_dirty(65536), Some((2 * 65536, 2 * 65536)));
///
/// // Persistent: every mark that returned is in the file after a crash.
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk0.bitmap");
/// let p = DirtyBitmap::create(&path, 1 << 30, 65536).unwrap();
/// p.mark(0, 512).unwrap();
/// drop(p);
/// let p = DirtyBitmap::open(&path).unwrap();
/// assert_eq!(p.count(), 65536);
/// ```
///
/// In memory ([`DirtyBitmap::new`]) or persistent ([`DirtyBitmap::create`] /
/// [`DirtyBitmap::open`], or on any driver with [`DirtyBitmap::create_on`] /
/// [`DirtyBitmap::open_on`]).
///
/// Shared as `Arc<DirtyBitmap>`; every method takes `&self` and is thread-safe. `mark` is
/// the host's hot path: when every granule of the range is already dirty (and, for a
/// persistent bitmap, durable) it costs a few atomic loads and takes no lock.
///
/// `generation` is bumped exactly when an operation removes at least one dirty granule:
/// [`clear`](DirtyBitmap::clear) of a bitmap with dirty granules, and the end of a job that
/// syncs the bitmap (the granules it copied leave the bitmap). Marks, merges, enabling,
/// disabling, a clear of a clean bitmap and a job that merges its bitmap back never change
/// it. With the uuid it lets a backup application check that its chain of incrementals is
/// intact: same uuid and the generation it recorded after its last backup.
pub struct DirtyBitmap {
    geo: Geometry,
    /// log2(granularity).
    shift: u32,
    uuid: [u8; 16],
    /// Marked granules; while busy, the *successor* (marks made since the freeze). For a
    /// persistent bitmap a bit is set here only once it is durable in every state the file
    /// can be found in after a crash, so the fast path may return on it. Atomic words: the
    /// fast path reads them with no lock; in-memory marks set them with no lock; everything
    /// else that changes them holds `state`.
    live: AtomicBits,
    /// Marks are recorded. Written under `state`, read anywhere.
    recording: AtomicBool,
    /// The rest of the state; see [`State`].
    state: Mutex<State>,
    /// Signalled (under `state`) when a persistent commit ends.
    committed: Condvar,
    /// The file of a persistent bitmap: the driver and the exclusive-open guard. Immutable.
    store: Option<Store>,
}

/// The state of a bitmap that is not on the mark fast path. Protected by `DirtyBitmap::state`.
pub(crate) struct State {
    /// A job has frozen the bitmap.
    busy: bool,
    /// While busy: the granules dirty at the freeze (what the job copies).
    frozen: Option<AtomicBits>,
    /// Bumped when bits are removed (persistent: written with the switch that removes them).
    generation: u64,
    /// Bumped each time the content is replaced (clear, a job's sync): a persistent mark that
    /// waited for a commit across such a replacement marks again.
    resets: u64,
    /// Persistent bitmaps: the file's state and the commit machinery.
    disk: Option<DiskState>,
    /// In-memory bitmaps: the disk id adopted (identity.rs); persistent ones keep it in
    /// their header.
    disk_id: Option<String>,
    /// Root digest of the last manifest written by a job that used this bitmap (in memory).
    last_root: Option<[u8; 32]>,
}

/// Lock a mutex, going on after a panic of another holder (the state stays consistent:
/// every update under the lock is completed before anything that can panic).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn busy_error(what: &str) -> Error {
    Error::new(ErrorKind::Busy, libc::EBUSY, format!("dirty bitmap: cannot {what}: a job is using the bitmap (busy)"))
}

impl DirtyBitmap {
    /// A bitmap in memory of a `size`-byte device (non-zero, any size: the last granule may
    /// be partial) with `granularity`-byte granules (a power of two from
    /// [`MIN_GRANULARITY`] to [`MAX_GRANULARITY`]), clean and recording, with a random uuid.
    ///
    /// Errors: `InvalidInput` (EINVAL) for a bad size or granularity; `OutOfMemory` (ENOMEM)
    /// when its bits cannot be allocated (never an abort); `Io` when no random bytes can be
    /// read for the uuid.
    pub fn new(size: u64, granularity: u64) -> Result<Arc<DirtyBitmap>> {
        let geo = Geometry::new(size, granularity)?;
        let uuid = uuid::random_uuid()?;
        Ok(Arc::new(DirtyBitmap::assemble(geo, uuid, 0, true, None, None)?))
    }

    /// Create a persistent bitmap in a new file at `path` (like [`DirtyBitmap::new`] otherwise)
    /// and open it. The file is built under a temporary name in the same directory and
    /// renamed into place only when complete (never over anything), so `path` never names a
    /// half-made bitmap; an existing file, or a symlink at `path` (dangling or not), is never
    /// touched nor followed. The file is mode 0600 ([`DEFAULT_FILE_MODE`](crate::DEFAULT_FILE_MODE),
    /// whatever the umask; [`DirtyBitmap::create_with_mode`] widens it) and locked (`flock`)
    /// while the bitmap is open.
    ///
    /// Errors: `InvalidInput` (EINVAL) for a bad size or granularity; `Io` with EEXIST when
    /// anything exists at `path`, or the errno of creating or writing the file (ENOENT for a
    /// missing directory, EACCES, ENOSPC...: the temporary file is removed again);
    /// `OutOfMemory` (ENOMEM). Thread-safe.
    pub fn create(path: impl AsRef<Path>, size: u64, granularity: u64) -> Result<Arc<DirtyBitmap>> {
        persistent::create_file(path.as_ref(), size, granularity, crate::DEFAULT_FILE_MODE)
    }

    /// [`DirtyBitmap::create`] with the permission bits of the new file: `mode` (0 to 0o777)
    /// is applied exactly, whatever the umask (e.g. 0o640 lets the file's group read it).
    ///
    /// Errors: as [`DirtyBitmap::create`]; `InvalidInput` for a mode with bits outside 0o777.
    pub fn create_with_mode(
        path: impl AsRef<Path>,
        size: u64,
        granularity: u64,
        mode: u32,
    ) -> Result<Arc<DirtyBitmap>> {
        persistent::create_file(path.as_ref(), size, granularity, mode)
    }

    /// Open the persistent bitmap in the file at `path` as it was last made durable:
    /// after a crash at any instant it holds every granule whose `mark` returned.
    ///
    /// Errors: `Io` with ENOENT (no such file) or the errno of opening or reading it;
    /// `Busy` (EBUSY) when the bitmap is already open, in this process or another (`flock`);
    /// `Corrupt` (EBADMSG) when the file is not a bitmap, is truncated or fails its
    /// checksums (the message says where): a damaged file is never opened with bits
    /// missing; `OutOfMemory` (ENOMEM).
    pub fn open(path: impl AsRef<Path>) -> Result<Arc<DirtyBitmap>> {
        persistent::open_file(path.as_ref())
    }

    /// [`DirtyBitmap::create`] on any block driver: format `driver` (at least
    /// [`DirtyBitmap::file_size`] bytes) as a new, empty persistent bitmap and open it. Made
    /// for tests on [`CrashDriver`](crate::CrashDriver) and for bitmaps on raw devices.
    ///
    /// One opener at a time is enforced within this process (by the driver's
    /// [`storage_id`](BlockDriver::storage_id), else by the driver object); use
    /// [`DirtyBitmap::create`] for a lock across processes.
    ///
    /// Errors: `InvalidInput` (bad size or granularity, driver too small); `Io` with EEXIST
    /// when the driver already holds a bitmap header, or the driver's errno; `Busy` when the
    /// driver is used by an open bitmap; `OutOfMemory`.
    pub fn create_on(driver: Arc<dyn BlockDriver>, size: u64, granularity: u64) -> Result<Arc<DirtyBitmap>> {
        persistent::create_on(driver, size, granularity, true)
    }

    /// [`DirtyBitmap::open`] on any block driver (see [`DirtyBitmap::create_on`]).
    ///
    /// Errors: `Busy` (EBUSY) when the driver is used by an open bitmap in this process;
    /// `Corrupt` (EBADMSG); `Io` (the driver's errno); `OutOfMemory`.
    pub fn open_on(driver: Arc<dyn BlockDriver>) -> Result<Arc<DirtyBitmap>> {
        persistent::open_on(driver)
    }

    /// Bytes the file of a persistent bitmap of this geometry takes (the size a driver given
    /// to [`DirtyBitmap::create_on`] needs at least). Errors: `InvalidInput` for a bad size
    /// or granularity.
    pub fn file_size(size: u64, granularity: u64) -> Result<u64> {
        Ok(Geometry::new(size, granularity)?.file_size())
    }

    /// Build a bitmap whose live bits are `live` (or clean).
    fn assemble(
        geo: Geometry,
        uuid: [u8; 16],
        generation: u64,
        recording: bool,
        live: Option<AtomicBits>,
        disk: Option<(DiskState, Store)>,
    ) -> Result<DirtyBitmap> {
        let live = match live {
            Some(l) => l,
            None => AtomicBits::new(geo.nbits)?,
        };
        let (disk, store) = match disk {
            Some((d, s)) => (Some(d), Some(s)),
            None => (None, None),
        };
        Ok(DirtyBitmap {
            geo,
            shift: geo.granularity.trailing_zeros(),
            uuid,
            live,
            recording: AtomicBool::new(recording),
            state: Mutex::new(State {
                busy: false,
                frozen: None,
                generation,
                resets: 0,
                disk,
                disk_id: None,
                last_root: None,
            }),
            committed: Condvar::new(),
            store,
        })
    }

    /// The granules of `[offset, offset + len)`, after checking the range.
    fn granules(&self, what: &str, offset: u64, len: u64) -> Result<Range<u64>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.geo.size => {
                if len == 0 {
                    return Ok(0..0);
                }
                Ok(offset >> self.shift..((end - 1) >> self.shift) + 1)
            }
            _ => Err(Error::invalid(format!(
                "dirty bitmap {what}: range {offset}+{len} is past the end of the device ({} bytes)",
                self.geo.size
            ))),
        }
    }

    /// The granules overlapping `[offset, offset + len)`, clipped to the device (for ranges
    /// handed over by a job, already known to be in range).
    fn granules_clipped(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.geo.size);
        if offset >= end {
            return 0..0;
        }
        offset >> self.shift..((end - 1) >> self.shift) + 1
    }

    /// The byte extent of granules `r`, clipped to the device.
    fn bytes_of(&self, r: Range<u64>) -> (u64, u64) {
        let start = r.start << self.shift;
        let end = (u128::from(r.end) << self.shift).min(u128::from(self.geo.size)) as u64;
        (start, end - start)
    }

    /// Record that `[offset, offset + len)` is about to be written: call it before the write.
    ///
    /// Every granule the range touches becomes dirty. For a persistent bitmap, when `mark`
    /// returns those granules are durable in the file (write-ahead, like dm-era): the first
    /// mark of a clean granule writes its bitmap page and flushes, concurrent first marks
    /// share one flush (group commit); a mark of granules already dirty and durable costs a
    /// few atomic loads, takes no lock and makes no system call. While a job has the bitmap
    /// frozen, marks go to the successor (see `freeze`). `len == 0` does nothing. A disabled
    /// bitmap returns `Ok` and records nothing.
    ///
    /// Errors: `InvalidInput` (EINVAL) for a range past the end or overflowing (nothing is
    /// recorded); for a persistent bitmap, the I/O error of writing the page (the write must
    /// then not go ahead: the mark is not durable), or `EOVERFLOW` when the file's switch
    /// counter is exhausted (only a damaged or crafted file; see [`DirtyBitmap::clear`]).
    /// Thread-safe: call it from every writer.
    #[inline]
    pub fn mark(&self, offset: u64, len: u64) -> Result<()> {
        let g = self.granules("mark", offset, len)?;
        if g.is_empty() || !self.recording.load(Ordering::Acquire) || self.live.all_set(g.clone()) {
            return Ok(());
        }
        self.mark_slow(&[g])
    }

    /// Set granule ranges `gs` in the live bits, durably for a persistent bitmap.
    fn mark_slow(&self, gs: &[Range<u64>]) -> Result<()> {
        if self.store.is_some() {
            return self.persist_ranges(gs, false);
        }
        for g in gs {
            self.live.set_range(g.clone());
        }
        Ok(())
    }

    /// Remove every dirty granule. Bumps the generation when there was any. Marks that run
    /// concurrently are kept or not; a mark that returns after `clear` returns is kept.
    ///
    /// Persistent: atomic in the file (after a crash, either every old bit or none of them).
    /// On an I/O error the bitmap is clear in memory and the file still holds the old bits
    /// (more, never fewer); the file is rewritten by the next mark or update.
    ///
    /// Errors: `Busy` (EBUSY) while a job uses the bitmap (nothing changes); `Io` with errno
    /// EOVERFLOW when the file's switch counter is exhausted (only a damaged or crafted file
    /// gets there; nothing changes: recreate the bitmap); for a persistent bitmap, the I/O
    /// error of the switch. Thread-safe.
    pub fn clear(&self) -> Result<()> {
        if self.store.is_some() {
            return self.persist_clear();
        }
        let mut st = lock(&self.state);
        if st.busy {
            return Err(busy_error("clear"));
        }
        if self.live.clear_all() {
            st.generation += 1;
        }
        Ok(())
    }

    /// Start recording marks (the default). Persistent: the setting is kept in the file.
    /// Errors: `Busy` (EBUSY) while a job uses the bitmap; for a persistent bitmap the I/O
    /// error of writing the header (the bitmap is then enabled in memory, and the file is
    /// updated by the next write). Thread-safe.
    pub fn enable(&self) -> Result<()> {
        self.set_recording(true)
    }

    /// Stop recording: `mark` then returns `Ok` and records nothing. Errors as
    /// [`DirtyBitmap::enable`]. Thread-safe.
    pub fn disable(&self) -> Result<()> {
        self.set_recording(false)
    }

    fn set_recording(&self, on: bool) -> Result<()> {
        let what = if on { "enable" } else { "disable" };
        let mut st = lock(&self.state);
        if st.busy {
            return Err(busy_error(what));
        }
        if self.recording.load(Ordering::Acquire) == on {
            return Ok(());
        }
        self.recording.store(on, Ordering::Release);
        match st.disk.as_mut() {
            None => Ok(()),
            Some(d) => {
                d.header_dirty = true;
                let batch = d.open_batch();
                let (_st, r) = self.commit(st, &batch);
                r
            }
        }
    }

    /// Add every dirty granule of `src` to this bitmap (a union): a granule of `src` dirties
    /// every granule of this bitmap it overlaps, whatever the two granularities. Both must
    /// cover the same device size. `src` may be busy (its frozen ∪ successor is merged) or
    /// disabled; this bitmap may be disabled (a merge is not a mark). Persistent: durable
    /// when `merge` returns. The generation does not change.
    ///
    /// Errors (this bitmap unchanged): `InvalidInput` (EINVAL) for another device size;
    /// `Busy` (EBUSY) while a job uses this bitmap; `OutOfMemory`; for a persistent bitmap,
    /// the I/O error of writing the pages (then the bits are not reported until written).
    /// Thread-safe.
    pub fn merge(&self, src: &DirtyBitmap) -> Result<()> {
        if src.geo.size != self.geo.size {
            return Err(Error::invalid(format!(
                "dirty bitmap merge: the source bitmap covers {} bytes, this one {} bytes: they must cover the same device",
                src.geo.size, self.geo.size
            )));
        }
        // Collect first: `src` may be `self`, and no two bitmap locks are held at once.
        let mut ranges: Vec<Range<u64>> = Vec::new();
        let mut from = 0;
        while let Some((off, len)) = src.next_dirty(from) {
            let g = self.granules_clipped(off, len);
            match ranges.last_mut() {
                Some(last) if last.end >= g.start => last.end = last.end.max(g.end),
                _ => {
                    ranges.try_reserve(1).map_err(|_| {
                        Error::new(ErrorKind::OutOfMemory, libc::ENOMEM, "dirty bitmap merge: out of memory")
                    })?;
                    ranges.push(g)
                }
            }
            from = off + len;
        }
        if self.store.is_some() {
            return self.persist_merge(&ranges);
        }
        let st = lock(&self.state);
        if st.busy {
            return Err(busy_error("merge into it"));
        }
        for g in ranges {
            self.live.set_range(g);
        }
        Ok(())
    }

    /// Run `f` on the reported bits: frozen ∪ live.
    fn with_union<T>(&self, f: impl FnOnce(Union<'_>) -> T) -> T {
        let st = lock(&self.state);
        f(Union { a: &self.live, b: st.frozen.as_ref() })
    }

    /// Dirty bytes: dirty granules times the granularity, the last granule clipped to the
    /// device size. While a job uses the bitmap: frozen ∪ marks since. Thread-safe.
    pub fn count(&self) -> u64 {
        self.with_union(|u| self.count_of(u))
    }

    fn count_of(&self, u: Union<'_>) -> u64 {
        let n = u.count();
        let mut bytes = u128::from(n) << self.shift;
        if n > 0 && u.get(self.geo.nbits - 1) {
            bytes -= (u128::from(self.geo.nbits) << self.shift) - u128::from(self.geo.size);
        }
        bytes as u64
    }

    /// The next dirty extent at or after byte `from`: `(offset, len)` with `offset >= from`,
    /// consecutive dirty granules merged into one extent, clipped to the device size; `None`
    /// when nothing is dirty from there on (or `from` is past the end). While a job uses the
    /// bitmap: frozen ∪ marks since. Iterate with `from = offset + len`. Thread-safe.
    pub fn next_dirty(&self, from: u64) -> Option<(u64, u64)> {
        if from >= self.geo.size {
            return None;
        }
        let r = self.with_union(|u| u.next_run(from >> self.shift))?;
        let (start, len) = self.bytes_of(r);
        let s = start.max(from);
        Some((s, start + len - s))
    }

    /// Size, granularity, dirty bytes, generation, uuid and state flags, read together.
    /// Thread-safe.
    pub fn info(&self) -> BitmapInfo {
        let st = lock(&self.state);
        let count = self.count_of(Union { a: &self.live, b: st.frozen.as_ref() });
        let mut flags = BitmapFlags::empty();
        flags.set(BitmapFlags::RECORDING, self.recording.load(Ordering::Acquire));
        flags.set(BitmapFlags::BUSY, st.busy);
        flags.set(BitmapFlags::PERSISTENT, self.store.is_some());
        BitmapInfo {
            size: self.geo.size,
            granularity: self.geo.granularity,
            count,
            generation: st.generation,
            uuid: self.uuid,
            flags,
        }
    }

    /// Bytes of device covered.
    pub fn size(&self) -> u64 {
        self.geo.size
    }

    /// Bytes per granule.
    pub fn granularity(&self) -> u64 {
        self.geo.granularity
    }

    /// The identity: random at creation, kept by a persistent bitmap across reopens.
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    /// Bumped exactly when an operation removes dirty granules (a clear of a dirty bitmap, a
    /// job's sync); see the type's documentation. Persistent: kept in the file.
    pub fn generation(&self) -> u64 {
        lock(&self.state).generation
    }

    /// True when marks are recorded.
    pub fn is_recording(&self) -> bool {
        self.recording.load(Ordering::Acquire)
    }

    /// True while a job uses the bitmap.
    pub fn is_busy(&self) -> bool {
        lock(&self.state).busy
    }

    /// True for a bitmap stored in a file or driver.
    pub fn is_persistent(&self) -> bool {
        self.store.is_some()
    }
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.info();
        f.debug_struct("DirtyBitmap")
            .field("size", &i.size)
            .field("granularity", &i.granularity)
            .field("count", &i.count)
            .field("generation", &i.generation)
            .field("flags", &i.flags)
            .finish()
    }
}
