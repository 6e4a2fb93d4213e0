//! One contract suite for every `SharedState` backend (in-process, Redis),
//! plus proof that the suite catches a broken backend and that a Redis
//! outage fails fast and recovers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bytes::Bytes;
use futures::future::join_all;
use plinth_runtime::state::{
    InProcessState, RateDecision, RedisState, SharedState, SharedStateRef, StateError, TokenBucket,
};
use plinth_runtime::testing::{Backend, ToggleProxy, backend_url, host_port};
use secrecy::SecretString;

/// Every behaviour callers rely on; returns the first broken promise.
async fn contract(state: SharedStateRef) -> anyhow::Result<()> {
    let ns = uuid::Uuid::now_v7().simple().to_string();
    let k = |name: &str| format!("test:{ns}:{name}");

    ensure!(
        state.get(&k("missing")).await?.is_none(),
        "a missing key must read as None"
    );
    state.set(&k("a"), Bytes::from_static(b"1"), None).await?;
    ensure!(
        state.get(&k("a")).await?.as_deref() == Some(&b"1"[..]),
        "set then get must return the value"
    );
    state.set(&k("a"), Bytes::from_static(b"2"), None).await?;
    ensure!(
        state.get(&k("a")).await?.as_deref() == Some(&b"2"[..]),
        "set must overwrite"
    );
    ensure!(
        state.delete(&k("a")).await?,
        "delete of a present key must say it existed"
    );
    ensure!(
        !state.delete(&k("a")).await?,
        "delete of an absent key must say it did not exist"
    );
    ensure!(state.get(&k("a")).await?.is_none(), "a deleted key must be gone");

    state
        .set(&k("ttl"), Bytes::from_static(b"x"), Some(Duration::from_millis(150)))
        .await?;
    ensure!(
        state.get(&k("ttl")).await?.is_some(),
        "a key must be readable before its ttl"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    ensure!(state.get(&k("ttl")).await?.is_none(), "a key must expire after its ttl");

    // set_if_absent is the primitive under locks and dedup: exactly one winner.
    let racers = (0..16).map(|i| {
        let state = state.clone();
        let key = k("once");
        async move {
            state
                .set_if_absent(&key, Bytes::from(i.to_string()), Duration::from_secs(30))
                .await
        }
    });
    let wins = join_all(racers)
        .await
        .into_iter()
        .collect::<Result<Vec<bool>, StateError>>()?;
    ensure!(
        wins.iter().filter(|w| **w).count() == 1,
        "set_if_absent must have exactly one winner, got {wins:?}"
    );

    let adds = (0..50).map(|_| {
        let state = state.clone();
        let key = k("counter");
        async move { state.incr(&key, 1, Duration::from_secs(30)).await }
    });
    let values = join_all(adds)
        .await
        .into_iter()
        .collect::<Result<Vec<i64>, StateError>>()?;
    ensure!(
        values.iter().max() == Some(&50),
        "50 concurrent increments must reach 50, got max {:?}",
        values.iter().max()
    );
    ensure!(
        state.incr(&k("counter"), -10, Duration::from_secs(30)).await? == 40,
        "negative increments must subtract"
    );
    state.incr(&k("short"), 1, Duration::from_millis(150)).await?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    ensure!(
        state.incr(&k("short"), 1, Duration::from_secs(30)).await? == 1,
        "an expired counter must restart at 0"
    );

    let bucket = TokenBucket {
        capacity: 5.0,
        refill_per_sec: 2.0,
    };
    let mut decisions: Vec<RateDecision> = Vec::new();
    for _ in 0..6 {
        decisions.push(state.take_tokens(&k("bucket"), bucket, 1).await?);
    }
    ensure!(
        decisions[..5].iter().all(|d| d.allowed),
        "a full bucket must allow its capacity: {decisions:?}"
    );
    let refused = decisions[5];
    ensure!(!refused.allowed, "the call past capacity must be refused");
    ensure!(
        refused.retry_after > Duration::from_millis(300) && refused.retry_after <= Duration::from_millis(500),
        "retry_after must be the time to refill one token at 2/s, got {:?}",
        refused.retry_after
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    ensure!(
        state.take_tokens(&k("bucket"), bucket, 1).await?.allowed,
        "the bucket must refill over time"
    );

    let tight = TokenBucket {
        capacity: 10.0,
        refill_per_sec: 0.001,
    };
    let takers = (0..25).map(|_| {
        let state = state.clone();
        let key = k("race");
        async move { state.take_tokens(&key, tight, 1).await }
    });
    let taken = join_all(takers)
        .await
        .into_iter()
        .collect::<Result<Vec<RateDecision>, StateError>>()?;
    let allowed = taken.iter().filter(|d| d.allowed).count();
    ensure!(
        allowed == 10,
        "25 concurrent takers of 10 tokens must get exactly 10, got {allowed}"
    );

    state.ping().await.context("ping must succeed on a healthy backend")?;
    Ok(())
}

#[tokio::test]
async fn in_process_state_keeps_the_contract() {
    contract(Arc::new(InProcessState::new())).await.unwrap();
}

#[tokio::test]
async fn redis_state_keeps_the_contract() {
    let Some(url) = backend_url(Backend::Redis, "redis_state_keeps_the_contract").unwrap() else {
        return;
    };
    let state = RedisState::connect(&SecretString::from(url), "plinth-test:", Duration::from_secs(5))
        .await
        .unwrap();
    contract(Arc::new(state)).await.unwrap();
}

/// A backend whose set-if-absent is a racy read-then-write, as a naive cache would do it.
struct RacyState(InProcessState);

#[async_trait::async_trait]
impl SharedState for RacyState {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StateError> {
        self.0.get(key).await
    }
    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<(), StateError> {
        self.0.set(key, value, ttl).await
    }
    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Duration) -> Result<bool, StateError> {
        let absent = self.0.get(key).await?.is_none();
        tokio::task::yield_now().await;
        if absent {
            self.0.set(key, value, Some(ttl)).await?;
        }
        Ok(absent)
    }
    async fn delete(&self, key: &str) -> Result<bool, StateError> {
        self.0.delete(key).await
    }
    async fn incr(&self, key: &str, by: i64, ttl: Duration) -> Result<i64, StateError> {
        self.0.incr(key, by, ttl).await
    }
    async fn take_tokens(&self, key: &str, bucket: TokenBucket, n: u32) -> Result<RateDecision, StateError> {
        self.0.take_tokens(key, bucket, n).await
    }
    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }
    fn kind(&self) -> &'static str {
        "racy"
    }
}

#[tokio::test]
async fn the_contract_catches_a_racy_backend() {
    let err = contract(Arc::new(RacyState(InProcessState::new()))).await.unwrap_err();
    assert!(err.to_string().contains("exactly one winner"), "{err}");
}

#[tokio::test]
async fn redis_outage_fails_fast_and_recovers() {
    let Some(url) = backend_url(Backend::Redis, "redis_outage_fails_fast_and_recovers").unwrap() else {
        return;
    };
    let mut proxy = ToggleProxy::reserve(host_port(&url)).await.unwrap();
    proxy.up().await.unwrap();
    let via_proxy = SecretString::from(format!("redis://{}", proxy.addr()));
    let state = RedisState::connect(&via_proxy, "plinth-test:", Duration::from_secs(5))
        .await
        .unwrap();
    state
        .set("test:outage", Bytes::from_static(b"v"), Some(Duration::from_secs(30)))
        .await
        .unwrap();

    proxy.down().await;
    let started = Instant::now();
    let err = state.get("test:outage").await.unwrap_err();
    assert!(matches!(err, StateError::Unavailable(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a Redis outage must fail fast, took {:?}",
        started.elapsed()
    );
    assert!(state.ping().await.is_err());

    proxy.up().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match state.get("test:outage").await {
            Ok(v) => {
                assert_eq!(v.as_deref(), Some(&b"v"[..]));
                break;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("redis did not recover: {e}"),
        }
    }
}

#[tokio::test]
async fn unreachable_redis_is_a_clear_error_at_start() {
    let started = Instant::now();
    let url = SecretString::from("redis://127.0.0.1:1".to_owned());
    let err = RedisState::connect(&url, "x:", Duration::from_secs(2))
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("PLINTH_REDIS_URL") || matches!(err, StateError::Unavailable(_)),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}
