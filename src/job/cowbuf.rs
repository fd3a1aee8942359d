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

use crate::buf::AlignedBuf;
use std::sync::{Mutex, MutexGuard};

/// Old data of one saved claim: its clusters and a buffer holding exactly their bytes.
pub(crate) struct Saved {
    pub clusters: Range<u64>,
    pub buf: AlignedBuf,
    pub len: u64,
}

/// The saved old data of one job, oldest first, within `capacity` bytes.
pub(crate) struct CowBuffer {
    capacity: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Bytes reserved: saved, or being read by a hook that will save them.
    used: u64,
    queue: VecDeque<Saved>,
}

impl CowBuffer {
    /// A buffer of `capacity` bytes; 0 = off (every hook copies into the target).
    pub fn new(capacity: u64) -> CowBuffer {
        CowBuffer { capacity, state: Mutex::new(State::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Give back a reservation (the read failed, or the saved data was written).
    pub fn unreserve(&self, len: u64) {
        let mut s = self.lock();
        s.used = s.used.saturating_sub(len);
    }

    /// Queue saved data (its room reserved) for a worker to write.
    pub fn push(&self, saved: Saved) {
        self.lock().queue.push_back(saved);
    }

    /// Put saved data back at the head of the queue (its write failed; retried later).
    pub fn push_front(&self, saved: Saved) {
        self.lock().queue.push_front(saved);
    }

    /// The oldest saved data, to write.
    pub fn pop(&self) -> Option<Saved> {
        self.lock().queue.pop_front()
    }

    /// Saved data is waiting to be written.
    pub fn pending(&self) -> bool {
        self.capacity != 0 && !self.lock().queue.is_empty()
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
            b.push(Saved { clusters: c..c + 1, buf: AlignedBuf::new(), len: 0 });
        }
        assert!(b.pending());
        let first = b.pop().unwrap();
        assert_eq!(first.clusters, 0..1);
        b.push_front(first);
        let order: Vec<_> = std::iter::from_fn(|| b.pop()).map(|s| s.clusters.start).collect();
        assert_eq!(order, vec![0, 1, 2]);
        assert!(!b.pending());
    }
}
