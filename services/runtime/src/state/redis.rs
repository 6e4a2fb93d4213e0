//! Shared state in Redis through fred. Commands fail fast while the
//! connection is down (no queueing, a short timeout) and fred reconnects in
//! the background, so a Redis outage is a clear `Unavailable`, not a hang.
//! Multi-step operations are Lua scripts so they stay atomic across replicas.

use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use fred::types::{Expiration, SetOptions};
use secrecy::{ExposeSecret, SecretString};

use super::{RateDecision, SharedState, StateError, TokenBucket};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// INCRBY that sets the expiry when it creates the key.
const INCR_SCRIPT: &str = r"
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if v == tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v";

/// The token bucket of `super::bucket_step`, on Redis server time.
const BUCKET_SCRIPT: &str = r"
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or capacity
local ts = tonumber(b[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) / 1000.0 * rate)
local allowed = 0
local retry_ms = 0
if tokens >= n then
  tokens = tokens - n
  allowed = 1
elseif rate > 0 then
  retry_ms = math.ceil((n - tokens) / rate * 1000)
else
  retry_ms = -1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
if rate > 0 then redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000) end
return {allowed, tostring(tokens), retry_ms}";

/// How long one wait for the first connection lasts before the client's
/// state is looked at again.
const CONNECT_CHECK: Duration = Duration::from_millis(100);

/// Shared state in Redis.
pub struct RedisState {
    client: Client,
    prefix: String,
}

fn unavailable(e: Error) -> StateError {
    StateError::Unavailable(e.to_string())
}

impl RedisState {
    /// Connects to `url`, waiting up to `connect_timeout` for the first
    /// connection. Keys are prefixed with `prefix` (e.g. `plinth:`).
    pub async fn connect(url: &SecretString, prefix: &str, connect_timeout: Duration) -> Result<Self, StateError> {
        let config = Config::from_url(url.expose_secret())
            .map_err(|e| StateError::Unavailable(format!("PLINTH_REDIS_URL: {e}")))?;
        let client = Builder::from_config(Config {
            fail_fast: true,
            ..config
        })
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = COMMAND_TIMEOUT;
            c.max_command_attempts = 1;
        })
        .with_performance_config(|p| p.default_command_timeout = COMMAND_TIMEOUT)
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
        .build()
        .map_err(unavailable)?;
        // fred keeps the connection task running and reconnects on its own.
        let _connection = client.connect();
        // `wait_for_connect` checks the state, then subscribes to the next
        // connection event (fred 10.1): a connection made in between is
        // missed and it waits for one that never comes (seen once in CI as
        // a 30 s start failure with Redis up). So it is asked in short turns,
        // with the state checked between them.
        let deadline = tokio::time::Instant::now() + connect_timeout;
        while !client.is_connected() {
            if tokio::time::Instant::now() >= deadline {
                return Err(StateError::Unavailable(format!(
                    "PLINTH_REDIS_URL: no connection within {connect_timeout:?}"
                )));
            }
            if let Ok(attempt) = tokio::time::timeout(CONNECT_CHECK, client.wait_for_connect()).await {
                attempt.map_err(unavailable)?;
            }
        }
        Ok(Self {
            client,
            prefix: prefix.to_owned(),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

#[async_trait::async_trait]
impl SharedState for RedisState {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StateError> {
        self.client
            .get::<Option<Bytes>, _>(self.key(key))
            .await
            .map_err(unavailable)
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<(), StateError> {
        let expire = ttl.map(|t| Expiration::PX(i64::try_from(t.as_millis()).unwrap_or(i64::MAX).max(1)));
        self.client
            .set::<(), _, _>(self.key(key), value, expire, None, false)
            .await
            .map_err(unavailable)
    }

    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Duration) -> Result<bool, StateError> {
        let expire = Expiration::PX(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1));
        let reply: Option<String> = self
            .client
            .set(self.key(key), value, Some(expire), Some(SetOptions::NX), false)
            .await
            .map_err(unavailable)?;
        Ok(reply.is_some())
    }

    async fn delete(&self, key: &str) -> Result<bool, StateError> {
        let n: i64 = self.client.del(self.key(key)).await.map_err(unavailable)?;
        Ok(n > 0)
    }

    async fn incr(&self, key: &str, by: i64, ttl: Duration) -> Result<i64, StateError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        self.client
            .eval::<i64, _, _, _>(INCR_SCRIPT, vec![self.key(key)], vec![by, ttl_ms])
            .await
            .map_err(unavailable)
    }

    async fn take_tokens(&self, key: &str, bucket: TokenBucket, n: u32) -> Result<RateDecision, StateError> {
        let args = vec![
            bucket.capacity.to_string(),
            bucket.refill_per_sec.to_string(),
            n.to_string(),
        ];
        let (allowed, tokens, retry_ms): (i64, String, i64) = self
            .client
            .eval(BUCKET_SCRIPT, vec![self.key(key)], args)
            .await
            .map_err(unavailable)?;
        let remaining = tokens
            .parse::<f64>()
            .map_err(|e| StateError::Protocol(format!("bucket tokens `{tokens}`: {e}")))?;
        let retry_after = match u64::try_from(retry_ms) {
            Ok(ms) => Duration::from_millis(ms),
            Err(_) => Duration::MAX,
        };
        Ok(RateDecision {
            allowed: allowed == 1,
            remaining,
            retry_after,
        })
    }

    async fn ping(&self) -> Result<(), StateError> {
        self.client.ping::<String>(None).await.map(drop).map_err(unavailable)
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}
