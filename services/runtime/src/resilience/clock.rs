//! Clocks that tests can move by hand, so timing logic (breakers, backoff,
//! leases) is tested without sleeping: [`Clock`] for durations,
//! [`WallClock`] for timestamps that are stored (lease expiries, run times).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A source of the current instant.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that only moves when told to.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<Instant>>);

impl Default for ManualClock {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Instant::now())))
    }
}

impl ManualClock {
    /// A clock stopped at the current instant.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A source of wall-clock time in milliseconds since the Unix epoch, for
/// times that are stored and compared across processes.
pub trait WallClock: Send + Sync {
    /// Now, in milliseconds since the epoch.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemWallClock;

impl WallClock for SystemWallClock {
    fn now_ms(&self) -> i64 {
        crate::auth::unix_now_ms()
    }
}

/// A wall clock that only moves when told to.
#[derive(Debug, Clone)]
pub struct ManualWallClock(Arc<Mutex<i64>>);

impl Default for ManualWallClock {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(crate::auth::unix_now_ms())))
    }
}

impl ManualWallClock {
    /// A clock stopped at the current time.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *now = now.saturating_add(i64::try_from(by.as_millis()).unwrap_or(i64::MAX));
    }
}

impl WallClock for ManualWallClock {
    fn now_ms(&self) -> i64 {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
