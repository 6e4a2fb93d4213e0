//! A circuit breaker: after `failure_threshold` consecutive failures it opens
//! and refuses calls for `open_for`; then it lets `half_open_calls` trial
//! calls through. A trial success closes it, a trial failure reopens it. Its
//! state is exported as `plinth_circuit_breaker_state{breaker}`.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::clock::{Clock, SystemClock};
use crate::metrics;

/// Breaker tuning.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long it stays open before trial calls.
    pub open_for: Duration,
    /// Trial calls allowed at once while half-open.
    pub half_open_calls: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(30),
            half_open_calls: 1,
        }
    }
}

/// Where the breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Trial calls only.
    HalfOpen,
    /// Calls are refused.
    Open,
}

/// A call was refused because the breaker is open.
#[derive(Debug, Clone, thiserror::Error)]
#[error("circuit `{name}` is open for another {retry_after:?}")]
pub struct BreakerOpen {
    /// The breaker's name.
    pub name: String,
    /// When trial calls will be allowed.
    pub retry_after: Duration,
}

struct Inner {
    state: BreakerState,
    failures: u32,
    opened_at: Option<Instant>,
    trials: u32,
}

/// A named circuit breaker; cheap to clone (shared state).
#[derive(Clone)]
pub struct CircuitBreaker {
    name: String,
    config: BreakerConfig,
    clock: Arc<dyn Clock>,
    inner: Arc<Mutex<Inner>>,
}

impl CircuitBreaker {
    /// A closed breaker on the system clock.
    pub fn new(name: impl Into<String>, config: BreakerConfig) -> Self {
        Self::with_clock(name, config, Arc::new(SystemClock))
    }

    /// A closed breaker on `clock`.
    pub fn with_clock(name: impl Into<String>, config: BreakerConfig, clock: Arc<dyn Clock>) -> Self {
        let b = Self {
            name: name.into(),
            config,
            clock,
            inner: Arc::new(Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                opened_at: None,
                trials: 0,
            })),
        };
        b.export(BreakerState::Closed);
        b
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn export(&self, state: BreakerState) {
        let v = match state {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        };
        metrics::runtime()
            .breaker_state
            .with_label_values(&[self.name.as_str()])
            .set(v);
    }

    /// The current state (an open breaker past `open_for` reports half-open).
    pub fn state(&self) -> BreakerState {
        let inner = self.lock();
        match (inner.state, inner.opened_at) {
            (BreakerState::Open, Some(at)) if self.clock.now().duration_since(at) >= self.config.open_for => {
                BreakerState::HalfOpen
            }
            (s, _) => s,
        }
    }

    /// Asks to make a call. Report its outcome with [`CircuitBreaker::record`].
    pub fn acquire(&self) -> Result<(), BreakerOpen> {
        let now = self.clock.now();
        let mut inner = self.lock();
        if inner.state == BreakerState::Open {
            let since = inner.opened_at.map(|at| now.duration_since(at)).unwrap_or_default();
            if since < self.config.open_for {
                return Err(BreakerOpen {
                    name: self.name.clone(),
                    retry_after: self.config.open_for - since,
                });
            }
            inner.state = BreakerState::HalfOpen;
            inner.trials = 0;
            drop(inner);
            self.export(BreakerState::HalfOpen);
            tracing::info!(breaker = %self.name, "circuit half-open, trying a call");
            inner = self.lock();
        }
        if inner.state == BreakerState::HalfOpen {
            if inner.trials >= self.config.half_open_calls {
                return Err(BreakerOpen {
                    name: self.name.clone(),
                    retry_after: Duration::ZERO,
                });
            }
            inner.trials += 1;
        }
        Ok(())
    }

    /// Gives back a call that [`CircuitBreaker::acquire`] allowed without
    /// recording an outcome: the call said nothing new about the upstream
    /// (its failure was already recorded once for everyone who shared it).
    /// A half-open breaker lets another trial through in its place.
    pub fn forgo(&self) {
        let mut inner = self.lock();
        if inner.state == BreakerState::HalfOpen {
            inner.trials = inner.trials.saturating_sub(1);
        }
    }

    /// Records the outcome of a call that [`CircuitBreaker::acquire`] allowed.
    pub fn record(&self, success: bool) {
        let now = self.clock.now();
        let mut inner = self.lock();
        let before = inner.state;
        if success {
            inner.failures = 0;
            inner.state = BreakerState::Closed;
            inner.opened_at = None;
        } else {
            inner.failures = inner.failures.saturating_add(1);
            if before == BreakerState::HalfOpen || inner.failures >= self.config.failure_threshold {
                inner.state = BreakerState::Open;
                inner.opened_at = Some(now);
            }
        }
        let after = inner.state;
        drop(inner);
        if before != after {
            self.export(after);
            match after {
                BreakerState::Open => tracing::warn!(breaker = %self.name, "circuit opened"),
                BreakerState::Closed => tracing::info!(breaker = %self.name, "circuit closed"),
                BreakerState::HalfOpen => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ManualClock;
    use super::*;

    /// A breaker on `clock` that opens after `failures` for `open_secs`
    /// and then lets one trial through at a time.
    fn one_trial_at_a_time(name: &str, failures: u32, open_secs: u64, clock: &ManualClock) -> CircuitBreaker {
        let cfg = BreakerConfig {
            failure_threshold: failures,
            open_for: Duration::from_secs(open_secs),
            half_open_calls: 1,
        };
        CircuitBreaker::with_clock(name, cfg, Arc::new(clock.clone()))
    }

    #[test]
    fn opens_after_threshold_then_half_opens_and_closes_on_success() {
        let clock = ManualClock::new();
        let b = one_trial_at_a_time("upstream-a", 3, 10, &clock);
        for _ in 0..3 {
            b.acquire().unwrap();
            b.record(false);
        }
        assert_eq!(b.state(), BreakerState::Open);
        let refused = b.acquire().unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(10));

        clock.advance(Duration::from_secs(10));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.acquire().unwrap();
        // Only one trial at a time.
        assert!(b.acquire().is_err());
        b.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
        b.acquire().unwrap();
    }

    #[test]
    fn a_failed_trial_reopens_and_successes_reset_the_count() {
        let clock = ManualClock::new();
        let b = one_trial_at_a_time("upstream-b", 2, 5, &clock);
        b.record(false);
        b.record(true);
        b.record(false);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "non-consecutive failures must not open it"
        );
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open);
        clock.advance(Duration::from_secs(5));
        b.acquire().unwrap();
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.acquire().is_err());
    }

    #[test]
    fn a_forgone_trial_lets_the_next_one_through_without_an_outcome() {
        let clock = ManualClock::new();
        let b = one_trial_at_a_time("upstream-c", 1, 5, &clock);
        b.acquire().unwrap();
        b.record(false);
        clock.advance(Duration::from_secs(5));
        b.acquire().unwrap();
        assert!(b.acquire().is_err(), "one trial at a time");
        b.forgo();
        assert_eq!(b.state(), BreakerState::HalfOpen, "no outcome recorded");
        b.acquire().unwrap();
        b.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
