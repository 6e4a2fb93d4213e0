//! The exact-match response cache for `Generate`: the key is a SHA-256 of
//! the logical model and the whole normalised request, the value the
//! provider's answer, kept in the shared state (Redis across replicas) for
//! a TTL. It sits in front of routing and never changes what is sent
//! upstream, so providers' own prompt caching keeps working. A cache that
//! fails (Redis away) is skipped, never an error for the caller.

use std::time::Duration;

use bytes::Bytes;
use plinth_runtime::state::SharedStateRef;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{ChatRequest, ChatResponse};

/// Largest answer kept (bytes of its JSON).
const MAX_ENTRY: usize = 256 * 1024;

/// When a call may use the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CachePolicy {
    /// Only when `temperature` is 0.
    #[default]
    Deterministic,
    /// Never.
    Bypass,
    /// Whatever the temperature.
    Use,
}

/// A cached answer and who gave it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// The provider that answered.
    pub provider: String,
    /// Its model.
    pub provider_model: String,
    /// The answer.
    pub response: ChatResponse,
}

/// The cache.
#[derive(Clone)]
pub struct ResponseCache {
    state: SharedStateRef,
    ttl: Duration,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl ResponseCache {
    /// A cache in `state` keeping answers for `ttl` (zero: off).
    pub fn new(state: SharedStateRef, ttl: Duration) -> Self {
        Self { state, ttl }
    }

    /// The key of `request` to logical `model`, when `policy` lets it be cached.
    pub fn key(&self, policy: CachePolicy, model: &str, request: &ChatRequest) -> Option<String> {
        if self.ttl.is_zero() {
            return None;
        }
        let allowed = match policy {
            CachePolicy::Bypass => false,
            CachePolicy::Use => true,
            CachePolicy::Deterministic => request.temperature == Some(0.0),
        };
        if !allowed {
            return None;
        }
        let bytes = serde_json::to_vec(&(model, request)).ok()?;
        let digest = Sha256::digest(&bytes);
        let mut hex = String::with_capacity(64);
        for b in digest {
            hex.push_str(&format!("{b:02x}"));
        }
        Some(format!("ai:cache:{hex}"))
    }

    /// The cached answer under `key`.
    pub async fn get(&self, key: &str) -> Option<Entry> {
        match self.state.get(key).await {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).ok(),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "response cache unavailable; asking the provider");
                None
            }
        }
    }

    /// Keeps `entry` under `key`.
    pub async fn put(&self, key: &str, entry: &Entry) {
        let Ok(bytes) = serde_json::to_vec(entry) else {
            return;
        };
        if bytes.len() > MAX_ENTRY {
            return;
        }
        if let Err(e) = self.state.set(key, Bytes::from(bytes), Some(self.ttl)).await {
            tracing::warn!(error = %e, "storing an answer in the response cache failed");
        }
    }
}
