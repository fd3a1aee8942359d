//! The synchronization primitives of the claim machinery (copy bitmap, claims, hook
//! gate): std's in every normal build, loom's under `--cfg loom` so that the **real**
//! claim code is what the loom model tests of `job/claims/loom_tests.rs` check
//! (`scripts/loom.sh`). Like crossbeam-utils' `primitive` module.
//!
//! Under loom, time stands still: [`Instant::now`] never moves and loom's
//! `Condvar::wait_timeout` never times out. So a wait that only a time-out would end
//! shows up in the model as a deadlock instead of being hidden by the clock.
//!
//! Loom's types are used only in the unit-test build under `--cfg loom` (`cfg(all(loom,
//! test))`, where the dev-dependency loom exists): they panic outside `loom::model`, so
//! that build is for the loom tests only (`scripts/loom.sh` runs nothing else). Every
//! other build, `--cfg loom` or not, uses std.

#[cfg(not(all(loom, test)))]
pub(crate) use std::sync::{
    atomic::{AtomicU64, AtomicUsize},
    Condvar, Mutex, MutexGuard,
};
#[cfg(not(all(loom, test)))]
pub(crate) use std::time::Instant;

#[cfg(all(loom, test))]
pub(crate) use loom::sync::{
    atomic::{AtomicU64, AtomicUsize},
    Condvar, Mutex, MutexGuard,
};
#[cfg(all(loom, test))]
pub(crate) use model_time::Instant;

pub(crate) use std::sync::atomic::Ordering;

#[cfg(all(loom, test))]
mod model_time {
    use std::ops::{Add, Sub};
    use std::time::Duration;

    /// A clock that never moves: under loom, deadlines are never reached.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub(crate) struct Instant(Duration);

    impl Instant {
        pub(crate) fn now() -> Instant {
            Instant(Duration::ZERO)
        }

        pub(crate) fn elapsed(&self) -> Duration {
            Duration::ZERO
        }
    }

    impl Add<Duration> for Instant {
        type Output = Instant;
        fn add(self, d: Duration) -> Instant {
            Instant(self.0.saturating_add(d))
        }
    }

    impl Sub for Instant {
        type Output = Duration;
        fn sub(self, earlier: Instant) -> Duration {
            self.0.saturating_sub(earlier.0)
        }
    }
}
