//! Brute-force protection for password logins. Each attempt is reserved
//! atomically (a shared counter per account and per client address) before
//! any hashing, so parallel guesses cannot outrun the limit; past it the
//! account or address is locked out for a delay that doubles with each
//! lockout. The state is shared across replicas through Redis when configured.
//! Unknown and known accounts are throttled alike, so throttling reveals
//! nothing about which emails exist.

use std::time::Duration;

use bytes::Bytes;
use plinth_runtime::auth::unix_now;
use plinth_runtime::state::SharedStateRef;

use crate::AuthError;

/// Failed-attempt limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Attempts per account within `window` before a lockout.
    pub per_account: i64,
    /// Attempts per client address within `window` before a lockout.
    pub per_address: i64,
    /// Counting window.
    pub window: Duration,
    /// First lockout; each further one within a day doubles it.
    pub first_lockout: Duration,
    /// Longest lockout.
    pub max_lockout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_account: 5,
            per_address: 50,
            window: Duration::from_secs(15 * 60),
            first_lockout: Duration::from_secs(30),
            max_lockout: Duration::from_secs(3600),
        }
    }
}

/// Password reset emails per account per hour.
pub const RESETS_PER_HOUR: i64 = 3;

/// Reserves login attempts against [`Limits`].
#[derive(Clone)]
pub struct LoginThrottle {
    state: SharedStateRef,
    limits: Limits,
}

/// A lockout that began with this attempt, for the caller to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lockout {
    /// `account` or `address`.
    pub scope: &'static str,
    /// How long.
    pub duration: Duration,
}

impl LoginThrottle {
    /// A throttle keeping its counters in `state`.
    pub fn new(state: SharedStateRef, limits: Limits) -> Self {
        Self { state, limits }
    }

    /// Takes one attempt for `email` from `address`. Refused with
    /// `LoginThrottled` while locked out, or when this attempt exceeds a
    /// limit (then the returned error carries the new lockout's length).
    pub async fn reserve(&self, email: &str, address: Option<&str>) -> Result<(), (AuthError, Option<Lockout>)> {
        let now = unix_now();
        let scopes: Vec<(&'static str, String, i64)> =
            std::iter::once(("account", email.to_owned(), self.limits.per_account))
                .chain(address.map(|a| ("address", a.to_owned(), self.limits.per_address)))
                .collect();
        for (scope, key, _) in &scopes {
            if let Some(until) = self.locked_until(scope, key).await.map_err(|e| (e, None))?
                && until > now
            {
                return Err((throttled(until - now), None));
            }
        }
        for (scope, key, limit) in &scopes {
            let attempts = self
                .state
                .incr(&format!("login:attempts:{scope}:{key}"), 1, self.limits.window)
                .await
                .map_err(|e| (unavailable(e), None))?;
            if attempts > *limit {
                let lockout = self.lock(scope, key, now).await.map_err(|e| (e, None))?;
                return Err((throttled(secs(lockout.duration)), Some(lockout)));
            }
        }
        Ok(())
    }

    /// Whether another password reset may be sent for `email`: at most
    /// three an hour, so nobody can flood a mailbox. Kept apart
    /// from login attempts, so reset requests never lock anyone out.
    pub async fn allow_reset(&self, email: &str) -> Result<bool, AuthError> {
        let n = self
            .state
            .incr(&format!("reset:requests:{email}"), 1, Duration::from_secs(3600))
            .await
            .map_err(unavailable)?;
        Ok(n <= RESETS_PER_HOUR)
    }

    /// After a successful login: forgets the account's failed attempts and
    /// gives the address its reserved attempt back, so the address counter
    /// counts failures (and attempts in flight), not busy offices behind NAT.
    pub async fn succeeded(&self, email: &str, address: Option<&str>) {
        if let Err(e) = self.state.delete(&format!("login:attempts:account:{email}")).await {
            tracing::warn!(error = %e, "could not reset login attempts");
        }
        if let Some(address) = address
            && let Err(e) = self
                .state
                .incr(&format!("login:attempts:address:{address}"), -1, self.limits.window)
                .await
        {
            tracing::warn!(error = %e, "could not return the address's login attempt");
        }
    }

    async fn locked_until(&self, scope: &str, key: &str) -> Result<Option<i64>, AuthError> {
        let value = self
            .state
            .get(&format!("login:lock:{scope}:{key}"))
            .await
            .map_err(unavailable)?;
        Ok(value.and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok()))
    }

    async fn lock(&self, scope: &'static str, key: &str, now: i64) -> Result<Lockout, AuthError> {
        let day = Duration::from_secs(24 * 3600);
        let lockouts = self
            .state
            .incr(&format!("login:lockouts:{scope}:{key}"), 1, day)
            .await
            .map_err(unavailable)?;
        let doublings = u32::try_from(lockouts.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
        let duration = self
            .limits
            .first_lockout
            .saturating_mul(2u32.saturating_pow(doublings))
            .min(self.limits.max_lockout);
        let until = now.saturating_add(secs(duration));
        self.state
            .set(
                &format!("login:lock:{scope}:{key}"),
                Bytes::from(until.to_string()),
                Some(duration),
            )
            .await
            .map_err(unavailable)?;
        // Count afresh once the lockout ends.
        self.state
            .delete(&format!("login:attempts:{scope}:{key}"))
            .await
            .map_err(unavailable)?;
        tracing::warn!(scope, lockout_secs = duration.as_secs(), "login attempts locked out");
        Ok(Lockout { scope, duration })
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn throttled(retry_after_secs: i64) -> AuthError {
    AuthError::LoginThrottled {
        retry_after: Duration::from_secs(u64::try_from(retry_after_secs.max(1)).unwrap_or(1)),
    }
}

fn unavailable(e: plinth_runtime::state::StateError) -> AuthError {
    AuthError::StateUnavailable(e.to_string())
}
