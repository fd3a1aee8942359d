//! `RateLimit`: the background copy's speed limit, in 100 ms slices (QEMU's
//! util/throttle ratelimit). The hook is never limited.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Length of one accounting slice.
pub(crate) const SLICE: Duration = Duration::from_millis(100);

struct Slice {
    start: Instant,
    end: Instant,
    sent: u64,
}

/// A bytes-per-second limit shared by a job's workers.
pub(crate) struct RateLimit {
    /// Bytes per second; 0 = unlimited.
    speed: AtomicU64,
    /// The current slice. Protected by this mutex; held only for arithmetic.
    slice: Mutex<Slice>,
}

impl RateLimit {
    pub fn new(speed: u64) -> RateLimit {
        let now = Instant::now();
        RateLimit { speed: AtomicU64::new(speed), slice: Mutex::new(Slice { start: now, end: now, sent: 0 }) }
    }

    pub fn speed(&self) -> u64 {
        self.speed.load(Ordering::Relaxed)
    }

    /// Change the limit; takes effect at the next slice.
    pub fn set_speed(&self, speed: u64) {
        self.speed.store(speed, Ordering::Relaxed);
        let mut s = self.slice.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        *s = Slice { start: now, end: now, sent: 0 };
    }

    /// How long to wait before the next request may start (zero: go now).
    pub fn delay(&self) -> Duration {
        let speed = self.speed();
        if speed == 0 {
            return Duration::ZERO;
        }
        let quota = (speed / 10).max(1);
        let mut s = self.slice.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now >= s.end {
            *s = Slice { start: now, end: now + SLICE, sent: 0 };
        }
        if s.sent < quota {
            return Duration::ZERO;
        }
        // Over quota: the slice stretches over as many slices as were sent.
        let slices = s.sent.div_ceil(quota) as u32;
        s.end = s.start + SLICE * slices;
        s.end.saturating_duration_since(now)
    }

    /// Count `bytes` just copied.
    pub fn account(&self, bytes: u64) {
        if self.speed() == 0 {
            return;
        }
        self.slice.lock().unwrap_or_else(|e| e.into_inner()).sent += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits_and_limited_waits_after_quota() {
        let r = RateLimit::new(0);
        r.account(1 << 30);
        assert_eq!(r.delay(), Duration::ZERO);
        let r = RateLimit::new(10 << 20);
        assert_eq!(r.delay(), Duration::ZERO);
        r.account(4 << 20); // four slices' worth
        let d = r.delay();
        assert!(d > Duration::from_millis(300) && d <= Duration::from_millis(400), "{d:?}");
        r.set_speed(0);
        assert_eq!(r.delay(), Duration::ZERO);
    }
}
