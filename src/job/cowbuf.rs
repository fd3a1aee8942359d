//! Where old data waits in memory (`BackupOptions::cow_buffer`): a hook that finds room
//! here reads its clusters' old data into a buffer, leaves the claim **saved**
//! (claims.rs) and returns at once; a worker then writes the data to the target and
//! releases the claim clean. The guest's write so never waits for the target: no
//! target write, no target file lock (which a worker's chunk write holds), no disk.
//!
//! Bounded: a hook whose data does not fit in what is left copies into the target
//! itself, as without a buffer. The bits of saved clusters stay set until their data
//! is in the target, so the job cannot complete, and a failed or cancelled job counts
//! them as not copied, exactly as clusters a copy had not reached.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::buf::AlignedBuf;

/// Old data of one saved claim: its clusters and a buffer holding exactly their bytes.
/// Immutable once saved: a worker writes it while views may read it.
pub(crate) struct Saved {
    pub clusters: Range<u64>,
    pub buf: AlignedBuf,
    pub len: u64,
}

impl Saved {
    /// The saved bytes.
    pub fn data(&self) -> &[u8] {
        self.buf.slice(self.len as usize)
    }
}

/// The saved old data of one job, within `capacity` bytes.
pub(crate) struct CowBuffer {
    capacity: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Bytes reserved: saved, or being read by a hook that will save them.
    used: u64,
    /// Every saved claim not yet released, for snapshot views: added before the claim is
    /// marked saved, removed only after its clusters are clean.
    entries: Vec<Arc<Saved>>,
    /// Saved claims for workers to write, oldest first.
    queue: VecDeque<Arc<Saved>>,
}

impl CowBuffer {
    /// A buffer of `capacity` bytes; 0 = off (every hook copies into the target).
    pub fn new(capacity: u64) -> CowBuffer {
        CowBuffer { capacity, state: Mutex::new(State::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes it may hold (`cow_buffer`).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The buffer is on (`cow_buffer` > 0).
    pub fn enabled(&self) -> bool {
        self.capacity != 0
    }

    /// Reserve room for `len` bytes; false when they do not fit (or the buffer is off).
    pub fn reserve(&self, len: u64) -> bool {
        if self.capacity == 0 {
            return false;
        }
        let mut s = self.lock();
        if s.used + len > self.capacity {
            return false;
        }
        s.used += len;
        true
    }

    /// Give back a reservation whose data was never added (the read failed).
    pub fn unreserve(&self, len: u64) {
        let mut s = self.lock();
        s.used = s.used.saturating_sub(len);
    }

    /// Make saved data (its room reserved) visible to snapshot views; call before its
    /// claim is marked saved, and [`CowBuffer::enqueue`] after.
    pub fn add(&self, saved: Saved) -> Arc<Saved> {
        let saved = Arc::new(saved);
        self.lock().entries.push(Arc::clone(&saved));
        saved
    }

    /// Queue added data for a worker to write.
    pub fn enqueue(&self, saved: Arc<Saved>) {
        self.lock().queue.push_back(saved);
    }

    /// Put saved data back at the head of the queue (its write failed; retried later).
    pub fn push_front(&self, saved: Arc<Saved>) {
        self.lock().queue.push_front(saved);
    }

    /// The oldest queued data, to write. It stays visible to views until released.
    pub fn pop(&self) -> Option<Arc<Saved>> {
        self.lock().queue.pop_front()
    }

    /// The data is in the target and its clusters are clean (or the job failed): forget
    /// it and give back its room. Returns its buffer when nobody else holds it.
    pub fn release(&self, saved: Arc<Saved>) -> Option<AlignedBuf> {
        let mut s = self.lock();
        if let Some(i) = s.entries.iter().position(|e| Arc::ptr_eq(e, &saved)) {
            s.entries.swap_remove(i);
            s.used = s.used.saturating_sub(saved.len);
        }
        drop(s);
        Arc::try_unwrap(saved).ok().map(|s| s.buf)
    }

    /// Saved data is waiting to be written.
    pub fn pending(&self) -> bool {
        self.capacity != 0 && !self.lock().queue.is_empty()
    }

    /// For a view: the saved data covering cluster `c`, if any.
    pub fn find(&self, c: u64) -> Option<Arc<Saved>> {
        if self.capacity == 0 {
            return None;
        }
        self.lock().entries.iter().find(|e| e.clusters.contains(&c)).cloned()
    }

    /// For a view: the first cluster after `c` and before `end` where saved data starts
    /// (`end` if none).
    pub fn next_start(&self, c: u64, end: u64) -> u64 {
        if self.capacity == 0 {
            return end;
        }
        let s = self.lock();
        s.entries.iter().map(|e| e.clusters.start).filter(|&x| x > c && x < end).min().unwrap_or(end)
    }

    /// Bytes held now.
    #[cfg(test)]
    pub fn used(&self) -> u64 {
        self.lock().used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stay_within_capacity() {
        let b = CowBuffer::new(3 << 16);
        assert!(b.reserve(2 << 16));
        assert!(!b.reserve(2 << 16), "over capacity");
        assert!(b.reserve(1 << 16));
        assert_eq!(b.used(), 3 << 16);
        b.unreserve(2 << 16);
        assert!(b.reserve(2 << 16));
        let off = CowBuffer::new(0);
        assert!(!off.reserve(1));
        assert!(!off.pending());
    }

    #[test]
    fn queue_is_oldest_first_and_a_failed_write_goes_back_to_the_head() {
        let b = CowBuffer::new(1 << 20);
        for c in 0..3 {
            let s = b.add(Saved { clusters: c * 2..c * 2 + 2, buf: AlignedBuf::new(), len: 0 });
            b.enqueue(s);
        }
        assert!(b.pending());
        let first = b.pop().unwrap();
        assert_eq!(first.clusters, 0..2);
        b.push_front(first);
        let popped: Vec<_> = std::iter::from_fn(|| b.pop()).collect();
        assert_eq!(popped.iter().map(|s| s.clusters.start).collect::<Vec<_>>(), vec![0, 2, 4]);
        assert!(!b.pending());
        // Popped data stays visible to views until released.
        assert_eq!(b.find(3).unwrap().clusters, 2..4);
        assert_eq!(b.next_start(0, 10), 2);
        assert_eq!(b.next_start(2, 4), 4);
        for s in popped {
            b.release(s);
        }
        assert!(b.find(3).is_none());
        assert_eq!(b.next_start(0, 10), 10);
    }
}
