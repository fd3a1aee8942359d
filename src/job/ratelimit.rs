//! `RateLimit`: the background copy's speed limit. A virtual clock: every byte copied
//! costs `1 / speed` seconds, and a worker may start its next chunk when the clock is
//! not ahead of real time. After idling, up to one slice (100 ms) of data may go at
//! once, so the limit holds on average to within one chunk. The hook is never limited.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The burst allowance: how far behind real time the virtual clock may fall.
pub(crate) const SLICE: Duration = Duration::from_millis(100);

/// The clock of a limiter that has been idle: one slice of burst allowed.
fn idle_clock() -> Instant {
    let now = Instant::now();
    now.checked_sub(SLICE).unwrap_or(now)
}

/// A bytes-per-second limit shared by a job's workers.
pub(crate) struct RateLimit {
    /// Bytes per second; 0 = unlimited.
    speed: AtomicU64,
    /// When the bytes accounted so far will have been "paid for". Protected by this
    /// mutex; held only for arithmetic.
    clock: Mutex<Instant>,
}

impl RateLimit {
    pub fn new(speed: u64) -> RateLimit {
        RateLimit { speed: AtomicU64::new(speed), clock: Mutex::new(idle_clock()) }
    }

    pub fn speed(&self) -> u64 {
        self.speed.load(Ordering::Relaxed)
    }

    /// Change the limit; takes effect for the next chunk. The debt owed under the old
    /// limit is forgiven (one slice of burst); setting the same limit again changes
    /// nothing, so re-applying a limit cannot be used to exceed it.
    pub fn set_speed(&self, speed: u64) {
        let mut clock = self.clock.lock().unwrap_or_else(|e| e.into_inner());
        if self.speed.swap(speed, Ordering::Relaxed) != speed {
            *clock = idle_clock();
        }
    }

    /// How long to wait before the next request may start (zero: go now).
    pub fn delay(&self) -> Duration {
        if self.speed() == 0 {
            return Duration::ZERO;
        }
        let clock = self.clock.lock().unwrap_or_else(|e| e.into_inner());
        clock.saturating_duration_since(Instant::now())
    }

    /// Count `bytes` just copied.
    pub fn account(&self, bytes: u64) {
        let speed = self.speed();
        if speed == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / speed as f64);
        let mut clock = self.clock.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let floor = now.checked_sub(SLICE).unwrap_or(now);
        *clock = (*clock).max(floor) + cost;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits_and_limited_waits_for_what_was_sent() {
        let r = RateLimit::new(0);
        r.account(1 << 30);
        assert_eq!(r.delay(), Duration::ZERO);
        let r = RateLimit::new(10 << 20);
        assert_eq!(r.delay(), Duration::ZERO);
        r.account(1 << 20); // 100 ms worth: covered by the burst allowance
        assert!(r.delay() <= Duration::from_millis(1));
        r.account(3 << 20); // 300 ms more
        let d = r.delay();
        assert!(d > Duration::from_millis(250) && d <= Duration::from_millis(300), "{d:?}");
        r.set_speed(10 << 20); // the same limit again: the debt stays
        assert!(r.delay() > Duration::from_millis(200));
        r.set_speed(0);
        assert_eq!(r.delay(), Duration::ZERO);
    }
}
