//! Exponential backoff with full jitter (AWS architecture blog's "Full
//! Jitter"): the n-th delay is uniform in `[0, min(max, initial * 2^n)]`, so
//! retrying clients spread out instead of stampeding together.

use std::future::Future;
use std::time::Duration;

use rand::Rng;

/// Backoff delays: `initial * 2^attempt`, capped at `max`, fully jittered.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first ceiling.
    pub initial: Duration,
    /// The largest ceiling.
    pub max: Duration,
}

impl Backoff {
    /// A backoff from `initial` up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
        }
    }

    /// The ceiling for `attempt` (0-based), before jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.checked_pow(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.checked_mul(factor).unwrap_or(self.max).min(self.max)
    }

    /// A random delay in `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        if ceiling.is_zero() {
            return ceiling;
        }
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

/// Runs `op` until it succeeds, `retryable` says an error is final, or
/// `max_attempts` are used; sleeps a jittered backoff between attempts.
pub async fn retry<T, E, F, Fut>(
    backoff: Backoff,
    max_attempts: u32,
    retryable: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, E>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        match op(attempt).await {
            Ok(v) => return Ok(v),
            Err(e) if attempt + 1 >= max_attempts.max(1) || !retryable(&e) => return Err(e),
            Err(_) => {
                tokio::time::sleep(backoff.delay(attempt)).await;
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap_and_jitter_stays_below() {
        let b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        assert_eq!(b.ceiling(0), Duration::from_millis(10));
        assert_eq!(b.ceiling(3), Duration::from_millis(80));
        assert_eq!(b.ceiling(4), Duration::from_millis(100));
        assert_eq!(b.ceiling(60), Duration::from_millis(100));
        let delays: Vec<Duration> = (0..200).map(|_| b.delay(5)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(100)));
        // Full jitter spreads delays: not all equal, some in the lower half.
        assert!(delays.iter().any(|d| *d < Duration::from_millis(50)));
        assert!(delays.iter().any(|d| *d != delays[0]));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_stops_at_max_attempts_and_on_final_errors() {
        let b = Backoff::new(Duration::from_millis(1), Duration::from_millis(5));
        let mut calls = 0;
        let r: Result<(), &str> = retry(
            b,
            3,
            |_| true,
            |_| {
                calls += 1;
                async { Err("down") }
            },
        )
        .await;
        assert_eq!((r, calls), (Err("down"), 3));

        let mut calls = 0;
        let r: Result<(), &str> = retry(
            b,
            3,
            |e| *e != "bad input",
            |_| {
                calls += 1;
                async { Err("bad input") }
            },
        )
        .await;
        assert_eq!((r, calls), (Err("bad input"), 1));

        let r: Result<u32, &str> = retry(
            b,
            5,
            |_| true,
            |n| async move { if n < 2 { Err("down") } else { Ok(n) } },
        )
        .await;
        assert_eq!(r, Ok(2));
    }
}
