//! Persistent, crash-safe dirty bitmaps: write-ahead marks with group commit, and atomic
//! switches for clear and a job's sync. The file format is in `format.rs`.
//!
//! # The argument
//!
//! Assumption: a write of one aligned 512-byte sector reaches the disk whole or not at all
//! (what disks guarantee and what [`CrashDriver`](crate::CrashDriver) models); data written
//! before a successful flush is durable. Every unit of the file is one such sector.
//!
//! 1. **A returned mark is durable.** `live` holds the granules the fast path may return on.
//!    A granule enters `live` only (a) after a commit that wrote its page and flushed, in the
//!    epoch the file's header names, or (b) when its page is already in the file with the
//!    bit (image bit set and the page neither dirty nor being written), or (c) as part of a
//!    switch target that is contained in every state the file can be in.
//! 2. **Rewriting a page never loses bits.** Within an epoch a page is rewritten in place
//!    and only gains bits: the sector is old or new, both hold every bit made durable before.
//! 3. **Switches are atomic.** Clear and a job's sync (bits removed) write the new content as
//!    pages of a new epoch into each page's *other* slot, flush, then write the header naming
//!    the new epoch into the other header slot, flush. Until the header sector lands the file
//!    reads as the old epoch (pages of a newer epoch are ignored); after, as the new one. A
//!    new epoch number is always above every epoch found on disk, so pages of an aborted
//!    switch are never taken for current ones.
//! 4. **A failed switch never leaves two possible states to be overwritten.** When the
//!    header write fails, the file may name either epoch; until a header write succeeds no
//!    other switch starts (it first completes this one), and marks wait for it.
//! 5. **Damage is reported.** Every sector carries a CRC-32C and its identity (page index,
//!    uuid); since sectors are never torn by a crash, a sector failing its checks is damage
//!    and `open` fails with EBADMSG rather than guess.
//!
//! # Group commit
//!
//! Marks that need a page written stage their bits in `image`, add the page to `dirty`, and
//! wait on the *open batch*. One waiter at a time becomes the leader: it closes the batch,
//! snapshots the dirty pages, writes them (adjacent pages in one write) and flushes once
//! without holding the lock; marks arriving meanwhile gather in the next batch, written by
//! the next leader with one flush for all of them.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, OnceLock};

use crate::driver::BlockDriver;
use crate::error::{errno_of, Error, ErrorKind, Result};

use super::bits::AtomicBits;
use super::file::BitmapFile;
use super::format::{
    self, corrupt, encode_page, Geometry, Header, HEADER_RECORDING, MAX_COUNTER, SECTOR, WORDS_PER_PAGE,
};
use super::owner::{self, OwnerGuard};
use super::{busy_error, lock, uuid, DirtyBitmap, State};

/// A page with no slot holding content of the epoch in question.
const NO_SLOT: u8 = 2;
/// Largest single write (sectors of adjacent pages are written together).
const MAX_WRITE: usize = 1 << 20;

/// The storage of a persistent bitmap. Immutable after open.
pub(super) struct Store {
    driver: Arc<dyn BlockDriver>,
    _owner: OwnerGuard,
}

/// The result of one commit, shared by everyone waiting for it. Set once, under `state`.
pub(super) struct Batch {
    result: OnceLock<Result<()>>,
}

impl Batch {
    fn new() -> Arc<Batch> {
        Arc::new(Batch { result: OnceLock::new() })
    }
}

/// A switch to new content (a new epoch) not yet confirmed in the file.
struct Switch {
    /// `None`: the new pages are not (all) written; the file is certainly in the old epoch.
    /// `Some((epoch, slots))`: every page of `epoch` is durable in `slots` (per page, or
    /// `NO_SLOT`), but the header write failed: the file may name either epoch.
    pages_done: Option<(u64, Vec<u8>)>,
}

/// The file's state and the commit machinery. Part of [`State`], so protected by
/// `DirtyBitmap::state`.
pub(super) struct DiskState {
    /// The content of the in-memory epoch: ⊇ live ∪ frozen, plus bits staged by marks that
    /// have not returned. What the next commit writes.
    image: AtomicBits,
    /// Pages whose `image` bits are not all written yet.
    dirty: BTreeSet<u64>,
    /// Pages being written by the running commit (sorted).
    inflight: Vec<u64>,
    /// Per page: the slot holding its content in the file's confirmed epoch, or `NO_SLOT`.
    conf: Vec<u8>,
    /// The confirmed (durable) header and its slot.
    pub(super) header: Header,
    header_slot: u8,
    /// The flags in memory differ from the header's.
    pub(super) header_dirty: bool,
    /// The highest epoch that may be on disk (pages of aborted switches included).
    max_epoch: u64,
    /// A switch waiting to be (re)written.
    switch: Option<Switch>,
    /// A commit is doing I/O (only one at a time).
    running: bool,
    /// A commit's I/O panicked: what reached the file is unknown, so nothing more is written
    /// (every commit fails with EIO; marks already durable still return). Reopen to recover.
    poisoned: bool,
    /// The batch that marks staged now will be committed in.
    open: Arc<Batch>,
}

impl DiskState {
    /// The batch to wait for after staging changes.
    pub(super) fn open_batch(&self) -> Arc<Batch> {
        self.open.clone()
    }

    /// Stage granules `g` in `image`: true when a commit is needed before they may be
    /// reported durable (new bits, or their page not yet written).
    fn stage(&mut self, g: Range<u64>) -> bool {
        if g.is_empty() {
            return false;
        }
        let mut need = false;
        let mut last_page = u64::MAX;
        for w in g.start / 64..=(g.end - 1) / 64 {
            let m = super::bits::word_mask(g.start, g.end, w);
            let page = w / WORDS_PER_PAGE;
            if self.image.or_word(w, m) & m != m {
                self.dirty.insert(page);
                need = true;
            } else if page != last_page && (self.dirty.contains(&page) || self.inflight.binary_search(&page).is_ok()) {
                need = true;
            }
            last_page = page;
        }
        need
    }
}

/// What a commit writes.
struct Plan {
    batch: Arc<Batch>,
    /// `None`: an ordinary commit in the confirmed epoch. `Some((epoch, full))`: a switch to
    /// `epoch`, writing every non-empty page (`full`) or only dirty ones (header retry).
    switch: Option<(u64, bool)>,
    /// The epoch the pages are written in.
    epoch: u64,
    /// Page index, slot, words; sorted by slot then index (adjacent sectors coalesce).
    pages: Vec<(u64, u8, [u64; WORDS_PER_PAGE as usize])>,
    /// Dirty pages taken (given back when the pages are not written).
    taken: Vec<u64>,
    header: Option<(u8, Header)>,
}

/// The refusal of a write whose header sequence number `seq` or epoch `epoch` would be at
/// or past [`MAX_COUNTER`]: the open that follows would refuse the file. Only a file
/// crafted or damaged to hold a counter just below it gets there (one per switch, from 0).
fn counter_exhausted(seq: u64, epoch: u64) -> Result<()> {
    if seq < MAX_COUNTER && epoch < MAX_COUNTER {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Io,
        libc::EOVERFLOW,
        format!(
            "dirty bitmap file: its sequence number or epoch is exhausted ({seq}, {epoch}); \
             the file was not written: recreate the bitmap"
        ),
    ))
}

/// [`counter_exhausted`] for a plan, before it is written.
fn plan_fits(plan: &Plan) -> Result<()> {
    counter_exhausted(plan.header.as_ref().map_or(0, |(_, h)| h.seq), plan.epoch)
}

/// [`counter_exhausted`] for a switch not begun yet (its header takes the next sequence
/// number, its pages the next epoch), so a clear can refuse before it changes anything.
fn switch_fits(d: &DiskState) -> Result<()> {
    counter_exhausted(d.header.seq + 1, d.max_epoch + 1)
}

/// Which step of a commit failed.
enum Failed {
    Pages(Error),
    Header(Error),
}

fn other(slot: u8) -> u8 {
    if slot == 0 {
        1
    } else {
        0
    }
}

fn io_error(what: String, e: &std::io::Error) -> Error {
    Error::new(ErrorKind::Io, errno_of(e), format!("dirty bitmap file: {what}: {e}"))
}

fn no_memory(what: &str) -> Error {
    Error::new(ErrorKind::OutOfMemory, libc::ENOMEM, format!("dirty bitmap: out of memory for {what}"))
}

/// A vector of `n` copies of `v`, allocated fallibly.
fn try_vec<T: Clone>(n: u64, v: T, what: &str) -> Result<Vec<T>> {
    let n = usize::try_from(n).map_err(|_| no_memory(what))?;
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|_| no_memory(what))?;
    out.resize(n, v);
    Ok(out)
}

impl Store {
    /// Write the plan's pages (adjacent sectors together) and flush, then its header and flush.
    fn execute(&self, geo: &Geometry, uuid: &[u8; 16], plan: &Plan) -> std::result::Result<(), Failed> {
        let pages = &plan.pages;
        let mut buf: Vec<u8> = Vec::new();
        let mut i = 0;
        while i < pages.len() {
            let (first, slot) = (pages[i].0, pages[i].1);
            buf.clear();
            let mut j = i;
            while j < pages.len() && pages[j].0 == first + (j - i) as u64 && pages[j].1 == slot && buf.len() < MAX_WRITE
            {
                let (p, _, ref words) = pages[j];
                let n = geo.page_words(p).count();
                buf.extend_from_slice(&encode_page(p, plan.epoch, uuid, &words[..n]));
                j += 1;
            }
            let off = geo.slot_offset(first, slot);
            self.driver
                .write_at(&buf, off)
                .map_err(|e| Failed::Pages(io_error(format!("write of {} bytes at offset {off}", buf.len()), &e)))?;
            i = j;
        }
        if !pages.is_empty() {
            self.driver.flush().map_err(|e| Failed::Pages(io_error("flush".into(), &e)))?;
        }
        if let Some((slot, h)) = plan.header {
            let off = Geometry::header_offset(slot);
            self.driver
                .write_at(&h.encode(), off)
                .map_err(|e| Failed::Header(io_error(format!("write of the header at offset {off}"), &e)))?;
            self.driver.flush().map_err(|e| Failed::Header(io_error("flush of the header".into(), &e)))?;
        }
        Ok(())
    }
}

/// Gives the commit token back if the I/O of a commit panics.
struct Running<'a> {
    bm: &'a DirtyBitmap,
    plan: Option<&'a Plan>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Some(plan) = self.plan {
            let mut st = lock(&self.bm.state);
            if let Some(d) = st.disk.as_mut() {
                d.running = false;
                d.poisoned = true;
                d.inflight.clear();
                d.dirty.extend(plan.taken.iter().copied());
                if plan.header.is_some() && plan.switch.is_none() {
                    d.header_dirty = true;
                }
            }
            let _ = plan.batch.result.set(Err(Error::new(
                ErrorKind::Io,
                libc::EIO,
                "dirty bitmap file: the driver panicked during a commit",
            )));
            self.bm.committed.notify_all();
        }
    }
}

impl DirtyBitmap {
    fn disk<'a>(st: &'a mut MutexGuard<'_, State>) -> &'a mut DiskState {
        st.disk.as_mut().expect("a persistent bitmap has a disk state")
    }

    /// The header to write next, naming `epoch`.
    fn next_header(&self, d: &DiskState, generation: u64, epoch: u64) -> (u8, Header) {
        let flags = if self.recording.load(Ordering::Acquire) { HEADER_RECORDING } else { 0 };
        (other(d.header_slot), Header { seq: d.header.seq + 1, generation, epoch, flags, ..d.header })
    }

    /// Close the open batch and decide what to write for it.
    fn prepare(&self, st: &mut MutexGuard<'_, State>) -> Plan {
        let generation = st.generation;
        let d = Self::disk(st);
        let batch = std::mem::replace(&mut d.open, Batch::new());
        let taken: Vec<u64> = std::mem::take(&mut d.dirty).into_iter().collect();
        let snapshot = |d: &DiskState, p: u64| {
            let mut words = [0u64; WORDS_PER_PAGE as usize];
            for (i, w) in self.geo.page_words(p).enumerate() {
                words[i] = d.image.word(w);
            }
            words
        };
        let mut pages = Vec::new();
        let (switch, header) = match &d.switch {
            None => {
                for &p in &taken {
                    let slot = if d.conf[p as usize] == NO_SLOT { 0 } else { d.conf[p as usize] };
                    pages.push((p, slot, snapshot(d, p)));
                }
                let header = if d.header_dirty {
                    d.header_dirty = false;
                    Some(self.next_header(d, generation, d.header.epoch))
                } else {
                    None
                };
                (None, header)
            }
            Some(Switch { pages_done: None }) => {
                d.header_dirty = false; // the switch's header carries the flags
                let epoch = d.max_epoch + 1;
                d.max_epoch = epoch;
                for p in 0..self.geo.npages {
                    if self.geo.page_words(p).any(|w| d.image.word(w) != 0) {
                        pages.push((p, other_or_first(d.conf[p as usize]), snapshot(d, p)));
                    }
                }
                (Some((epoch, true)), Some(self.next_header(d, generation, epoch)))
            }
            Some(Switch { pages_done: Some((epoch, slots)) }) => {
                d.header_dirty = false;
                for &p in &taken {
                    let slot = match slots[p as usize] {
                        NO_SLOT => other_or_first(d.conf[p as usize]),
                        s => s,
                    };
                    pages.push((p, slot, snapshot(d, p)));
                }
                let epoch = *epoch;
                (Some((epoch, false)), Some(self.next_header(d, generation, epoch)))
            }
        };
        d.inflight = taken.clone();
        pages.sort_unstable_by_key(|&(p, slot, _)| (slot, p));
        let epoch = switch.map_or(d.header.epoch, |(e, _)| e);
        Plan { batch, switch, epoch, pages, taken, header }
    }

    /// Record the outcome of a commit in the state and publish its result.
    fn finish(&self, st: &mut MutexGuard<'_, State>, plan: &Plan, outcome: std::result::Result<(), Failed>) {
        let d = Self::disk(st);
        d.inflight.clear();
        let (pages_ok, header_ok, err) = match outcome {
            Ok(()) => (true, true, None),
            Err(Failed::Pages(e)) => (false, false, Some(e)),
            Err(Failed::Header(e)) => (true, false, Some(e)),
        };
        if !pages_ok {
            d.dirty.extend(plan.taken.iter().copied());
        }
        match plan.switch {
            None => {
                if pages_ok {
                    for &(p, slot, _) in &plan.pages {
                        d.conf[p as usize] = slot;
                    }
                }
                if let Some((slot, h)) = plan.header {
                    if header_ok {
                        d.header = h;
                        d.header_slot = slot;
                    } else {
                        d.header_dirty = true;
                    }
                }
            }
            Some((epoch, full)) => {
                let sw = d.switch.as_mut().expect("a switch commit has a switch");
                if pages_ok {
                    if full {
                        let mut slots = vec![NO_SLOT; d.conf.len()];
                        for &(p, slot, _) in &plan.pages {
                            slots[p as usize] = slot;
                        }
                        sw.pages_done = Some((epoch, slots));
                    } else if let Some((_, slots)) = sw.pages_done.as_mut() {
                        for &(p, slot, _) in &plan.pages {
                            slots[p as usize] = slot;
                        }
                    }
                }
                if header_ok {
                    let (_, slots) = d.switch.take().and_then(|s| s.pages_done).expect("pages written");
                    d.conf = slots;
                    let (slot, h) = plan.header.expect("a switch writes a header");
                    d.header = h;
                    d.header_slot = slot;
                }
            }
        }
        let _ = plan.batch.result.set(match err {
            None => Ok(()),
            Some(e) => Err(e),
        });
    }

    /// Wait until `batch` is committed, leading commits while no one else does. Returns the
    /// state lock again and the batch's result.
    pub(super) fn commit<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        batch: &Arc<Batch>,
    ) -> (MutexGuard<'a, State>, Result<()>) {
        let store = self.store.as_ref().expect("a persistent bitmap has a store");
        loop {
            if let Some(r) = batch.result.get() {
                return (st, r.clone());
            }
            if Self::disk(&mut st).running {
                st = self.committed.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            if Self::disk(&mut st).poisoned {
                let e = Error::new(
                    ErrorKind::Io,
                    libc::EIO,
                    "dirty bitmap file: a write panicked earlier, the file's state is unknown: reopen the bitmap",
                );
                return (st, Err(e));
            }
            let plan = self.prepare(&mut st);
            if let Err(e) = plan_fits(&plan) {
                // Written, this header would be refused by the next open (format.rs):
                // refuse the commit instead, before anything is written.
                self.finish(&mut st, &plan, Err(Failed::Pages(e)));
                self.committed.notify_all();
                continue;
            }
            Self::disk(&mut st).running = true;
            drop(st);
            let mut guard = Running { bm: self, plan: Some(&plan) };
            let outcome = store.execute(&self.geo, &self.uuid, &plan);
            guard.plan = None;
            st = lock(&self.state);
            self.finish(&mut st, &plan, outcome);
            Self::disk(&mut st).running = false;
            self.committed.notify_all();
        }
    }

    /// Make granule ranges `gs` dirty and durable, then report them (the slow path of a
    /// persistent mark; a merge with `merge` set, which fails while busy).
    pub(super) fn persist_ranges(&self, gs: &[Range<u64>], merge: bool) -> Result<()> {
        let mut st = lock(&self.state);
        loop {
            if merge && st.busy {
                return Err(busy_error("merge into it"));
            }
            let resets = st.resets;
            let d = Self::disk(&mut st);
            let mut need = d.switch.is_some();
            for g in gs {
                need |= d.stage(g.clone());
            }
            if need {
                let batch = d.open_batch();
                let (s, r) = self.commit(st, &batch);
                st = s;
                r?;
                if st.resets != resets {
                    // The content was replaced meanwhile (clear, a job's sync): stage again.
                    continue;
                }
            }
            for g in gs {
                self.live.set_range(g.clone());
            }
            return Ok(());
        }
    }

    /// [`DirtyBitmap::merge`] of the granule ranges of the source into a persistent bitmap.
    pub(super) fn persist_merge(&self, gs: &[Range<u64>]) -> Result<()> {
        self.persist_ranges(gs, true)
    }

    /// Wait until no commit runs and no switch is half confirmed (completing it), so the
    /// content may be replaced. Returns the lock, or the error of completing the switch.
    fn settle<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
    ) -> std::result::Result<MutexGuard<'a, State>, (MutexGuard<'a, State>, Error)> {
        loop {
            let d = Self::disk(&mut st);
            if d.running {
                st = self.committed.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            if matches!(d.switch, Some(Switch { pages_done: Some(_) })) {
                let batch = d.open_batch();
                let (s, r) = self.commit(st, &batch);
                st = s;
                if let Err(e) = r {
                    return Err((st, e));
                }
                continue;
            }
            return Ok(st);
        }
    }

    /// [`DirtyBitmap::clear`] of a persistent bitmap: an atomic switch to empty content.
    pub(super) fn persist_clear(&self) -> Result<()> {
        let st = lock(&self.state);
        if st.busy {
            return Err(busy_error("clear"));
        }
        let mut st = self.settle(st).map_err(|(_, e)| e)?;
        if st.busy {
            return Err(busy_error("clear"));
        }
        let d = Self::disk(&mut st);
        if self.live.is_clear() && d.image.is_clear() {
            if d.switch.is_none() {
                return Ok(());
            }
        } else {
            // Refused before anything changes when the switch could never be written.
            switch_fits(d)?;
            d.image.clear_all();
            d.dirty.clear();
            d.switch = Some(Switch { pages_done: None });
            self.live.clear_all();
            st.generation += 1;
            st.resets += 1;
        }
        let batch = Self::disk(&mut st).open_batch();
        self.commit(st, &batch).1
    }

    /// [`DirtyBitmap::unfreeze`] with `Replace` of a persistent bitmap (`st` busy).
    pub(super) fn persist_replace(&self, st: MutexGuard<'_, State>, add_back: &[Range<u64>]) -> Result<()> {
        let mut st = match self.settle(st) {
            Ok(st) => st,
            Err((mut st, e)) => {
                self.merge_back(&mut st);
                return Err(e);
            }
        };
        if !st.busy {
            // Another unfreeze ran while the pending switch was completed.
            return Err(Error::invalid("dirty bitmap: unfreeze of a bitmap that is not frozen"));
        }
        if let Err(e) = switch_fits(Self::disk(&mut st)) {
            self.merge_back(&mut st);
            return Err(e);
        }
        let g = match AtomicBits::new(self.geo.nbits) {
            Ok(g) => g,
            Err(e) => {
                self.merge_back(&mut st);
                return Err(e);
            }
        };
        for r in add_back {
            g.set_range(r.clone());
        }
        if !self.removes_bits(&st, &g) {
            // Nothing leaves: merge back, then add the granules given back like marks.
            self.merge_back(&mut st);
            drop(st);
            return self.persist_ranges(add_back, false);
        }
        // New content A = successor ∪ g, switched to atomically. Until the switch is
        // confirmed the file holds frozen ∪ successor (⊇ A ∩ (frozen ∪ successor)), so those
        // bits may be reported at once; g's other bits once the switch is durable.
        let frozen = st.frozen.take().expect("busy bitmaps have a frozen set");
        let d = Self::disk(&mut st);
        d.image.clear_all();
        d.image.or_from(&self.live);
        d.image.or_from(&g);
        d.dirty.clear();
        d.switch = Some(Switch { pages_done: None });
        for w in 0..g.nwords() {
            let m = g.word(w) & frozen.word(w);
            if m != 0 {
                self.live.or_word(w, m);
            }
        }
        st.busy = false;
        st.generation += 1;
        st.resets += 1;
        let resets = st.resets;
        let batch = Self::disk(&mut st).open_batch();
        let (st, r) = self.commit(st, &batch);
        if r.is_ok() && st.resets == resets {
            self.live.or_from(&g);
        }
        r
    }
}

/// The slot for new-epoch content of a page whose confirmed content is in `conf`.
fn other_or_first(conf: u8) -> u8 {
    if conf == NO_SLOT {
        0
    } else {
        other(conf)
    }
}

/// Read `len` bytes at `off` of the driver.
fn read(driver: &dyn BlockDriver, buf: &mut [u8], off: u64) -> Result<()> {
    driver.read_at(buf, off).map_err(|e| io_error(format!("read of {} bytes at offset {off}", buf.len()), &e))
}

/// Format `driver` as an empty bitmap and open it.
pub(super) fn create_on(
    driver: Arc<dyn BlockDriver>,
    size: u64,
    granularity: u64,
    refuse_existing: bool,
) -> Result<Arc<DirtyBitmap>> {
    let geo = Geometry::new(size, granularity)?;
    if driver.size() < geo.file_size() {
        return Err(Error::invalid(format!(
            "dirty bitmap: the driver has {} bytes; a bitmap of a {size}-byte device with {granularity}-byte granules needs {}",
            driver.size(),
            geo.file_size()
        )));
    }
    let owner = owner::claim(&driver)?;
    if refuse_existing {
        let mut h = [0u8; 2 * SECTOR];
        read(&*driver, &mut h, 0)?;
        if Header::decode(h[..SECTOR].try_into().expect("a sector"), 0).is_ok()
            || Header::decode(h[SECTOR..].try_into().expect("a sector"), 1).is_ok()
        {
            return Err(Error::new(ErrorKind::Io, libc::EEXIST, "dirty bitmap: the driver already holds a bitmap"));
        }
    }
    let uuid = uuid::random_uuid()?;
    let image = AtomicBits::new(geo.nbits)?;
    let conf = try_vec(geo.npages, NO_SLOT, "the page table")?;
    // Every slot gets a valid page of epoch 0 (stale: the header says epoch 1), so that no
    // sector of the file is ever unformatted and any damage is detectable.
    let per_write = (MAX_WRITE / SECTOR) as u64;
    let mut buf = Vec::with_capacity(MAX_WRITE.min(geo.npages as usize * SECTOR));
    for slot in 0..2u8 {
        let mut p = 0;
        while p < geo.npages {
            let n = (geo.npages - p).min(per_write);
            buf.clear();
            for i in p..p + n {
                buf.extend_from_slice(&encode_page(i, 0, &uuid, &[]));
            }
            let off = geo.slot_offset(p, slot);
            driver.write_at(&buf, off).map_err(|e| io_error(format!("write at offset {off}"), &e))?;
            p += n;
        }
    }
    driver.flush().map_err(|e| io_error("flush".into(), &e))?;
    let h0 = Header {
        seq: 0,
        size,
        granularity,
        uuid,
        generation: 0,
        epoch: 1,
        flags: HEADER_RECORDING,
        disk_id: [0; 1 + super::format::MAX_DISK_ID],
    };
    let h1 = Header { seq: 1, ..h0 };
    let mut hb = [0u8; 2 * SECTOR];
    hb[..SECTOR].copy_from_slice(&h0.encode());
    hb[SECTOR..].copy_from_slice(&h1.encode());
    driver.write_at(&hb, 0).map_err(|e| io_error("write of the headers".into(), &e))?;
    driver.flush().map_err(|e| io_error("flush".into(), &e))?;
    let disk = DiskState {
        image,
        dirty: BTreeSet::new(),
        inflight: Vec::new(),
        conf,
        header: h1,
        header_slot: 1,
        header_dirty: false,
        max_epoch: 1,
        switch: None,
        running: false,
        poisoned: false,
        open: Batch::new(),
    };
    let store = Store { driver, _owner: owner };
    Ok(Arc::new(DirtyBitmap::assemble(geo, uuid, 0, true, None, Some((disk, store)))?))
}

/// Open the bitmap stored on `driver`.
pub(super) fn open_on(driver: Arc<dyn BlockDriver>) -> Result<Arc<DirtyBitmap>> {
    let owner = owner::claim(&driver)?;
    if driver.size() < 2 * SECTOR as u64 {
        return Err(corrupt(format!("{} bytes is too small for a bitmap header", driver.size())));
    }
    let mut hb = [0u8; 2 * SECTOR];
    read(&*driver, &mut hb, 0)?;
    let h0 = Header::decode(hb[..SECTOR].try_into().expect("a sector"), 0)?;
    let h1 = Header::decode(hb[SECTOR..].try_into().expect("a sector"), 1)?;
    if (h0.size, h0.granularity, h0.uuid) != (h1.size, h1.granularity, h1.uuid) {
        return Err(corrupt("the two header slots describe different bitmaps"));
    }
    let (header, header_slot) = match h0.seq.cmp(&h1.seq) {
        std::cmp::Ordering::Greater => (h0, 0),
        std::cmp::Ordering::Less => (h1, 1),
        std::cmp::Ordering::Equal => return Err(corrupt("the two header slots have the same sequence number")),
    };
    let geo = Geometry::new(header.size, header.granularity)?;
    if driver.size() < geo.file_size() {
        return Err(corrupt(format!(
            "the file is truncated: {} bytes, a bitmap of this geometry takes {}",
            driver.size(),
            geo.file_size()
        )));
    }
    let image = AtomicBits::new(geo.nbits)?;
    let mut conf = try_vec(geo.npages, NO_SLOT, "the page table")?;
    let mut max_epoch = header.epoch;
    let per_read = (MAX_WRITE / SECTOR) as u64;
    let mut buf = vec![0u8; MAX_WRITE.min(geo.npages as usize * SECTOR)];
    for slot in 0..2u8 {
        let mut p = 0;
        while p < geo.npages {
            let n = (geo.npages - p).min(per_read);
            let chunk = &mut buf[..n as usize * SECTOR];
            read(&*driver, chunk, geo.slot_offset(p, slot))?;
            for (i, sector) in chunk.chunks_exact(SECTOR).enumerate() {
                let index = p + i as u64;
                let page = format::decode_page(sector.try_into().expect("a sector"), index, slot, &header.uuid)?;
                max_epoch = max_epoch.max(page.epoch);
                if page.epoch != header.epoch {
                    continue;
                }
                let words = geo.page_words(index);
                let nw = (words.end - words.start) as usize;
                if page.words[nw..].iter().any(|&w| w != 0) {
                    return Err(corrupt(format!("page {index} slot {slot}: bits past the end of the device")));
                }
                for (j, w) in words.enumerate() {
                    let v = page.words[j];
                    if v != 0 {
                        image.or_word(w, v);
                    }
                }
                if conf[index as usize] == NO_SLOT {
                    conf[index as usize] = slot;
                }
            }
            p += n;
        }
    }
    let tail = geo.nbits % 64;
    if tail != 0 && image.word(geo.nwords - 1) >> tail != 0 {
        return Err(corrupt("bits past the end of the device"));
    }
    let live = AtomicBits::new(geo.nbits)?;
    live.or_from(&image);
    let disk = DiskState {
        image,
        dirty: BTreeSet::new(),
        inflight: Vec::new(),
        conf,
        header,
        header_slot,
        header_dirty: false,
        max_epoch,
        switch: None,
        running: false,
        poisoned: false,
        open: Batch::new(),
    };
    let store = Store { driver, _owner: owner };
    let recording = header.flags & HEADER_RECORDING != 0;
    Ok(Arc::new(DirtyBitmap::assemble(
        geo,
        header.uuid,
        header.generation,
        recording,
        Some(live),
        Some((disk, store)),
    )?))
}

/// [`DirtyBitmap::create`].
pub(super) fn create_file(path: &Path, size: u64, granularity: u64, mode: u32) -> Result<Arc<DirtyBitmap>> {
    let geo = Geometry::new(size, granularity)?;
    BitmapFile::create(path, geo.file_size(), mode, |driver| create_on(driver, size, granularity, false))
}

/// [`DirtyBitmap::open`].
pub(super) fn open_file(path: &Path) -> Result<Arc<DirtyBitmap>> {
    let file = BitmapFile::open(path)?;
    open_on(Arc::new(file))
        .map_err(|e| Error::new(e.kind(), e.errno(), format!("{} ({})", e.message(), path.display())))
}
