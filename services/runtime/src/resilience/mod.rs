//! Resilience primitives every service shares: exponential backoff with full
//! jitter, a circuit breaker, and a token-bucket rate limiter over
//! [`crate::state::SharedState`]. Time comes from a [`Clock`] so tests control it.

mod breaker;
mod clock;
mod retry;

pub use breaker::{BreakerConfig, BreakerOpen, BreakerState, CircuitBreaker};
pub use clock::{Clock, ManualClock, ManualWallClock, SystemClock, SystemWallClock, WallClock};
pub use retry::{Backoff, retry};

use std::time::Duration;

use crate::state::{RateDecision, SharedStateRef, StateError, TokenBucket};

/// Rate limits keys (callers, targets) with token buckets in shared state, so
/// replicas sharing Redis share the limit.
#[derive(Clone)]
pub struct RateLimiter {
    state: SharedStateRef,
    prefix: String,
    bucket: TokenBucket,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("prefix", &self.prefix)
            .field("bucket", &self.bucket)
            .finish()
    }
}

impl RateLimiter {
    /// `rate_per_sec` sustained with bursts up to `burst`, keyed under `prefix`.
    pub fn new(state: SharedStateRef, prefix: impl Into<String>, rate_per_sec: f64, burst: f64) -> Self {
        Self {
            state,
            prefix: prefix.into(),
            bucket: TokenBucket {
                capacity: burst,
                refill_per_sec: rate_per_sec,
            },
        }
    }

    /// Takes `cost` tokens for `key`; the decision says when to retry if refused.
    pub async fn check(&self, key: &str, cost: u32) -> Result<RateDecision, StateError> {
        self.state
            .take_tokens(&format!("ratelimit:{}:{key}", self.prefix), self.bucket, cost)
            .await
    }

    /// The configured sustained rate.
    pub fn rate(&self) -> Duration {
        Duration::try_from_secs_f64(1.0 / self.bucket.refill_per_sec.max(f64::MIN_POSITIVE)).unwrap_or(Duration::MAX)
    }
}
