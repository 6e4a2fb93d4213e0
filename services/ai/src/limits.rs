//! Rate limits (requests and tokens per minute, per caller and per target)
//! and budgets (US dollars per day or month, per tenant or API key).
//! Everything is a counter in the shared state (Redis when configured, so
//! replicas share it) for the current window, taken *before* the call:
//! tokens as the prompt estimate plus `max_tokens`, money as the most that
//! could cost on the dearest target. After the call the reservation is
//! settled to what was really used; a reservation that is dropped unsettled
//! (an error, a cancelled stream) gives back its tokens and money, so
//! nothing leaks and nothing is counted twice. Windows are fixed (the
//! minute, the UTC day or month), so a burst can straddle a boundary.

use std::time::Duration;

use plinth_runtime::Tasks;
use plinth_runtime::auth::unix_now_ms;
use plinth_runtime::config::AiBudget;
use plinth_runtime::state::{SharedStateRef, StateError};

use crate::error::AiError;

/// A counted amount in one window.
#[derive(Debug, Clone)]
struct Held {
    key: String,
    amount: i64,
    /// Settled to the call's tokens (`Tokens`), its cost (`Money`), or kept (`Requests`).
    kind: Kind,
    ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Requests,
    Tokens,
    Money,
}

/// What one call holds; settle it, or drop it to give it back.
pub struct Reservation {
    state: Option<SharedStateRef>,
    tasks: Tasks,
    held: Vec<Held>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

/// One limit to take from.
#[derive(Debug, Clone)]
pub struct Limit {
    /// What it limits, for the refusal (`caller key_1`, `target openai/gpt-4o`).
    pub scope: String,
    /// Requests per minute (0: none).
    pub requests_per_minute: u64,
    /// Tokens per minute (0: none).
    pub tokens_per_minute: u64,
}

/// Why a reservation was refused.
#[derive(Debug, Clone)]
pub struct Refused {
    /// The reason, for the caller.
    pub reason: String,
    /// When the window ends.
    pub retry_after: Duration,
}

const MINUTE_MS: i64 = 60_000;

fn window(now_ms: i64) -> (i64, Duration) {
    let start = now_ms - now_ms.rem_euclid(MINUTE_MS);
    (
        start,
        Duration::from_millis(u64::try_from(start + MINUTE_MS - now_ms).unwrap_or(0)),
    )
}

/// The start of the budget period holding `now_ms` and when it ends.
pub fn period(name: &str, now_ms: i64) -> Option<(i64, i64)> {
    let now = jiff::Timestamp::from_millisecond(now_ms)
        .ok()?
        .to_zoned(jiff::tz::TimeZone::UTC);
    let day = now.date();
    let (start, end) = match name {
        "day" => (day, day.tomorrow().ok()?),
        "month" => {
            let first = day.first_of_month();
            (first, first.checked_add(jiff::Span::new().months(1)).ok()?)
        }
        _ => return None,
    };
    let ms = |d: jiff::civil::Date| -> Option<i64> {
        Some(d.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp().as_millisecond())
    };
    Some((ms(start)?, ms(end)?))
}

impl Reservation {
    /// Nothing held.
    pub fn none(tasks: Tasks) -> Self {
        Self {
            state: None,
            tasks,
            held: Vec::new(),
        }
    }

    /// Takes `amount` in `key`'s window; refused (and given back) past `limit`.
    async fn take(
        &mut self,
        state: &SharedStateRef,
        key: String,
        amount: i64,
        limit: i64,
        kind: Kind,
        ttl: Duration,
    ) -> Result<Option<i64>, StateError> {
        self.state = Some(state.clone());
        let total = state.incr(&key, amount, ttl).await?;
        if total > limit {
            state.incr(&key, -amount, ttl).await?;
            return Ok(Some(total - amount));
        }
        self.held.push(Held { key, amount, kind, ttl });
        Ok(None)
    }

    /// Takes one request and `tokens` from each limit; the first refusal
    /// gives back what was taken and says which limit refused.
    pub async fn take_limits(
        &mut self,
        state: &SharedStateRef,
        limits: &[Limit],
        tokens: u64,
    ) -> Result<Result<(), Refused>, StateError> {
        let (start, left) = window(unix_now_ms());
        let ttl = left + Duration::from_secs(5);
        // A refusal undoes what this call took, and only that: a target's
        // limit refusing must not hand back the caller's reservation.
        let ours = self.held.len();
        for limit in limits {
            if limit.requests_per_minute > 0 {
                let key = format!("ai:rpm:{}:{start}", limit.scope);
                let max = i64::try_from(limit.requests_per_minute).unwrap_or(i64::MAX);
                if self.take(state, key, 1, max, Kind::Requests, ttl).await?.is_some() {
                    self.undo_since(ours, state).await;
                    return Ok(Err(Refused {
                        reason: format!(
                            "{} is over {} requests per minute",
                            limit.scope, limit.requests_per_minute
                        ),
                        retry_after: left,
                    }));
                }
            }
            if limit.tokens_per_minute > 0 {
                let key = format!("ai:tpm:{}:{start}", limit.scope);
                let max = i64::try_from(limit.tokens_per_minute).unwrap_or(i64::MAX);
                let want = i64::try_from(tokens).unwrap_or(i64::MAX);
                if self.take(state, key, want, max, Kind::Tokens, ttl).await?.is_some() {
                    self.undo_since(ours, state).await;
                    return Ok(Err(Refused {
                        reason: format!(
                            "{} is over {} tokens per minute (this call reserves {tokens}: its prompt and max_tokens)",
                            limit.scope, limit.tokens_per_minute
                        ),
                        retry_after: left,
                    }));
                }
            }
        }
        Ok(Ok(()))
    }

    /// Takes `nanos` of each budget, seeding a period's counter from
    /// `spent_before` (what the usage table says) the first time it is used.
    pub async fn take_budget(
        &mut self,
        state: &SharedStateRef,
        budget: &AiBudget,
        scope: &str,
        nanos: i64,
        spent_before: impl AsyncFnOnce(i64) -> Result<i64, AiError>,
    ) -> Result<Result<(), Refused>, AiError> {
        let now = unix_now_ms();
        let Some((start, end)) = period(&budget.period, now) else {
            return Err(AiError::Config(format!(
                "budget period {:?} (day or month)",
                budget.period
            )));
        };
        let ttl = Duration::from_millis(u64::try_from(end - now).unwrap_or(0)) + Duration::from_secs(60);
        let key = format!("ai:budget:{scope}:{start}");
        let marker = format!("{key}:seeded");
        let fresh = state
            .set_if_absent(&marker, bytes::Bytes::from_static(b"1"), ttl)
            .await
            .map_err(state_error)?;
        if fresh {
            let spent = spent_before(start).await?;
            state.incr(&key, spent, ttl).await.map_err(state_error)?;
        }
        let limit = (budget.usd * 1e9).round() as i64;
        match self
            .take(state, key, nanos, limit, Kind::Money, ttl)
            .await
            .map_err(state_error)?
        {
            None => Ok(Ok(())),
            Some(spent) => Ok(Err(Refused {
                reason: format!(
                    "the {} budget of ${:.2} for {scope} is spent (${:.4} used; this call may cost up to ${:.4})",
                    budget.period,
                    budget.usd,
                    spent as f64 / 1e9,
                    nanos as f64 / 1e9
                ),
                retry_after: Duration::from_millis(u64::try_from(end - now).unwrap_or(0)),
            })),
        }
    }

    /// Settles to what the call used: tokens and money to the real amounts,
    /// requests kept.
    pub async fn settle(mut self, tokens: u64, cost_nanos: i64) {
        let Some(state) = self.state.take() else {
            return;
        };
        for h in std::mem::take(&mut self.held) {
            let actual = match h.kind {
                Kind::Requests => continue,
                Kind::Tokens => i64::try_from(tokens).unwrap_or(i64::MAX),
                Kind::Money => cost_nanos,
            };
            if actual != h.amount
                && let Err(e) = state.incr(&h.key, actual - h.amount, h.ttl).await
            {
                tracing::warn!(key = %h.key, error = %e, "settling an ai reservation failed");
            }
        }
    }

    /// Gives back tokens and money now (the call failed before using any).
    pub async fn give_back(&mut self) {
        if let Some(state) = self.state.clone() {
            release(&state, std::mem::take(&mut self.held)).await;
        }
    }
}

impl Reservation {
    /// Gives back everything taken since `len` entries were held, requests included.
    async fn undo_since(&mut self, len: usize, state: &SharedStateRef) {
        for h in self.held.split_off(len) {
            if let Err(e) = state.incr(&h.key, -h.amount, h.ttl).await {
                tracing::warn!(key = %h.key, error = %e, "undoing an ai reservation failed");
            }
        }
    }
}

/// Gives back the tokens and money of `held` (requests stay counted).
async fn release(state: &SharedStateRef, held: Vec<Held>) {
    for h in held.into_iter().filter(|h| h.kind != Kind::Requests) {
        if let Err(e) = state.incr(&h.key, -h.amount, h.ttl).await {
            tracing::warn!(key = %h.key, error = %e, "releasing an ai reservation failed");
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.held.iter().all(|h| h.kind == Kind::Requests) {
            return;
        }
        let Some(state) = self.state.take() else {
            return;
        };
        let held = std::mem::take(&mut self.held);
        self.tasks.spawn("ai-release", async move {
            release(&state, held).await;
            Ok::<(), std::convert::Infallible>(())
        });
    }
}

fn state_error(e: StateError) -> AiError {
    AiError::Limits(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_utc_days_and_calendar_months() {
        // 2026-02-15T12:00:00Z
        let now = 1_771_156_800_000;
        let (start, end) = period("month", now).unwrap();
        assert_eq!(start, 1_769_904_000_000); // 2026-02-01
        assert_eq!(end, 1_772_323_200_000); // 2026-03-01
        let (start, end) = period("day", now).unwrap();
        assert_eq!((start, end), (1_771_113_600_000, 1_771_200_000_000));
        assert!(period("week", now).is_none());
    }
}
