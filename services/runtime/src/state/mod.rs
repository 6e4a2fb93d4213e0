//! Shared ephemeral state: cache entries, counters, denylists and token
//! buckets, in-process by default or in Redis so replicas share them.
//! Nothing here is durable; anything that must survive belongs in storage.

mod memory;
mod redis;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use memory::InProcessState;
pub use redis::RedisState;

/// A state operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The backend is unreachable or timed out; callers should fail fast.
    #[error("shared state unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something unexpected.
    #[error("shared state returned an unexpected reply: {0}")]
    Protocol(String),
}

/// A token bucket: `capacity` tokens, refilled at `refill_per_sec`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    /// Maximum burst.
    pub capacity: f64,
    /// Tokens added per second.
    pub refill_per_sec: f64,
}

/// The outcome of taking tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateDecision {
    /// Whether the tokens were taken.
    pub allowed: bool,
    /// Tokens left after this decision.
    pub remaining: f64,
    /// When refused: how long until enough tokens exist.
    pub retry_after: Duration,
}

/// Cache, counters, denylists and rate-limit buckets shared by replicas.
#[async_trait::async_trait]
pub trait SharedState: Send + Sync {
    /// The value under `key`, if present and not expired.
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StateError>;
    /// Stores `value`, expiring after `ttl` when given.
    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<(), StateError>;
    /// Stores `value` only if `key` is absent; true when stored.
    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Duration) -> Result<bool, StateError>;
    /// Removes `key`; true when it existed.
    async fn delete(&self, key: &str) -> Result<bool, StateError>;
    /// Adds `by` to the counter at `key` (created at 0 with `ttl`) and returns the new value.
    async fn incr(&self, key: &str, by: i64, ttl: Duration) -> Result<i64, StateError>;
    /// Atomically takes `n` tokens from the bucket at `key`.
    async fn take_tokens(&self, key: &str, bucket: TokenBucket, n: u32) -> Result<RateDecision, StateError>;
    /// Whether the backend is reachable now.
    async fn ping(&self) -> Result<(), StateError>;
    /// `"in-process"` or `"redis"`, for logs.
    fn kind(&self) -> &'static str;
}

/// A shared handle to the configured state backend.
pub type SharedStateRef = Arc<dyn SharedState>;

/// Refills `tokens` (last updated `elapsed` ago) and takes `n` if there are enough.
/// Both backends use this arithmetic (Redis mirrors it in Lua).
pub(crate) fn bucket_step(tokens: f64, elapsed: Duration, bucket: TokenBucket, n: u32) -> (f64, RateDecision) {
    let refilled = (tokens + elapsed.as_secs_f64() * bucket.refill_per_sec).min(bucket.capacity);
    let want = f64::from(n);
    if refilled >= want {
        let left = refilled - want;
        (
            left,
            RateDecision {
                allowed: true,
                remaining: left,
                retry_after: Duration::ZERO,
            },
        )
    } else {
        let missing = want - refilled;
        let secs = if bucket.refill_per_sec > 0.0 {
            missing / bucket.refill_per_sec
        } else {
            f64::MAX
        };
        let retry_after = Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX);
        (
            refilled,
            RateDecision {
                allowed: false,
                remaining: refilled,
                retry_after,
            },
        )
    }
}
