//! In-process shared state: the embedded default. Expiry is checked on read
//! and expired entries are swept as the map grows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::{RateDecision, SharedState, StateError, TokenBucket, bucket_step};

enum Value {
    Bytes(Bytes),
    Counter(i64),
    Bucket { tokens: f64, at: Instant },
}

struct Entry {
    value: Value,
    expires: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    next_sweep: usize,
}

/// Shared state inside this process.
#[derive(Clone, Default)]
pub struct InProcessState {
    inner: Arc<Mutex<Inner>>,
}

impl InProcessState {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.entries.len() > inner.next_sweep {
            let now = Instant::now();
            inner.entries.retain(|_, e| e.expires.is_none_or(|at| at > now));
            inner.next_sweep = (inner.entries.len() * 2).max(1024);
        }
        inner
    }
}

fn live<'a>(inner: &'a mut Inner, key: &str, now: Instant) -> Option<&'a mut Entry> {
    if inner
        .entries
        .get(key)
        .is_some_and(|e| e.expires.is_some_and(|at| at <= now))
    {
        inner.entries.remove(key);
    }
    inner.entries.get_mut(key)
}

#[async_trait::async_trait]
impl SharedState for InProcessState {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StateError> {
        let mut inner = self.lock();
        Ok(match live(&mut inner, key, Instant::now()).map(|e| &e.value) {
            Some(Value::Bytes(b)) => Some(b.clone()),
            Some(Value::Counter(n)) => Some(Bytes::from(n.to_string())),
            Some(Value::Bucket { .. }) | None => None,
        })
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<(), StateError> {
        let expires = ttl.map(|t| Instant::now() + t);
        self.lock().entries.insert(
            key.to_owned(),
            Entry {
                value: Value::Bytes(value),
                expires,
            },
        );
        Ok(())
    }

    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Duration) -> Result<bool, StateError> {
        let now = Instant::now();
        let mut inner = self.lock();
        if live(&mut inner, key, now).is_some() {
            return Ok(false);
        }
        inner.entries.insert(
            key.to_owned(),
            Entry {
                value: Value::Bytes(value),
                expires: Some(now + ttl),
            },
        );
        Ok(true)
    }

    async fn delete(&self, key: &str) -> Result<bool, StateError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let existed = live(&mut inner, key, now).is_some();
        inner.entries.remove(key);
        Ok(existed)
    }

    async fn incr(&self, key: &str, by: i64, ttl: Duration) -> Result<i64, StateError> {
        let now = Instant::now();
        let mut inner = self.lock();
        if let Some(entry) = live(&mut inner, key, now) {
            return match &mut entry.value {
                Value::Counter(n) => {
                    *n = n.saturating_add(by);
                    Ok(*n)
                }
                _ => Err(StateError::Protocol(format!("`{key}` is not a counter"))),
            };
        }
        inner.entries.insert(
            key.to_owned(),
            Entry {
                value: Value::Counter(by),
                expires: Some(now + ttl),
            },
        );
        Ok(by)
    }

    async fn take_tokens(&self, key: &str, bucket: TokenBucket, n: u32) -> Result<RateDecision, StateError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let (tokens, at) = match live(&mut inner, key, now).map(|e| &e.value) {
            Some(Value::Bucket { tokens, at }) => (*tokens, *at),
            _ => (bucket.capacity, now),
        };
        let (left, decision) = bucket_step(tokens, now.duration_since(at), bucket, n);
        let full_in = Duration::try_from_secs_f64(bucket.capacity / bucket.refill_per_sec.max(f64::MIN_POSITIVE))
            .unwrap_or(Duration::from_secs(86_400));
        inner.entries.insert(
            key.to_owned(),
            Entry {
                value: Value::Bucket { tokens: left, at: now },
                expires: Some(now + full_in + Duration::from_secs(1)),
            },
        );
        Ok(decision)
    }

    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "in-process"
    }
}
