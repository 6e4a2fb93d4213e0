//! Revocation that takes effect at once, although access tokens are verified
//! locally: a denylist of token ids (kept until the token would expire) and a
//! per-subject "not before" that kills every token issued earlier. Both live
//! in shared state (Redis when configured), so every replica sees them. A
//! lookup failure refuses the call: revocation fails closed.

use std::time::Duration;

use bytes::Bytes;

use super::jwt::Claims;
use super::{AuthError, unix_now_ms};
use crate::state::SharedStateRef;

/// Tolerated clock skew, so a denylist entry outlives its token everywhere.
const SKEW_SECS: i64 = 60;

/// The revocation lists.
#[derive(Clone)]
pub struct Revocations {
    state: SharedStateRef,
}

impl Revocations {
    /// Lists kept in `state`.
    pub fn new(state: SharedStateRef) -> Self {
        Self { state }
    }

    /// Refuses the token `jti` from now until it expires at `expires_at`.
    pub async fn revoke_token(&self, jti: &str, expires_at: i64, now: i64) -> Result<(), AuthError> {
        let ttl = u64::try_from(expires_at.saturating_sub(now).saturating_add(SKEW_SECS)).unwrap_or(0);
        if ttl == 0 {
            return Ok(());
        }
        self.state
            .set(
                &format!("revoked:jti:{jti}"),
                Bytes::from_static(b"1"),
                Some(Duration::from_secs(ttl)),
            )
            .await
            .map_err(|e| AuthError::RevocationUnavailable(e.to_string()))
    }

    /// Refuses every token of `subject` issued until now, for as long as such
    /// a token could live (`token_lifetime`). Issue times are compared in
    /// milliseconds (from the UUIDv7 `jti`), so a login right after the
    /// revocation is not caught by it.
    pub async fn revoke_subject(&self, subject: &str, token_lifetime: Duration) -> Result<(), AuthError> {
        let ttl = token_lifetime + Duration::from_secs(u64::try_from(SKEW_SECS).unwrap_or(60));
        self.state
            .set(
                &format!("revoked:sub-ms:{subject}"),
                Bytes::from(unix_now_ms().to_string()),
                Some(ttl),
            )
            .await
            .map_err(|e| AuthError::RevocationUnavailable(e.to_string()))
    }

    /// Refuses every token of session `sid`, for as long as one could live.
    pub async fn revoke_session(&self, sid: &str, token_lifetime: Duration) -> Result<(), AuthError> {
        let ttl = token_lifetime + Duration::from_secs(u64::try_from(SKEW_SECS).unwrap_or(60));
        self.state
            .set(&format!("revoked:sid:{sid}"), Bytes::from_static(b"1"), Some(ttl))
            .await
            .map_err(|e| AuthError::RevocationUnavailable(e.to_string()))
    }

    /// Refuses API key `key_id` at once on every replica, for as long as a
    /// replica may still trust a cached validation of it.
    pub async fn revoke_api_key(&self, key_id: &str) -> Result<(), AuthError> {
        let ttl = super::API_KEY_CACHE_TTL + Duration::from_secs(u64::try_from(SKEW_SECS).unwrap_or(60));
        self.state
            .set(&format!("revoked:key:{key_id}"), Bytes::from_static(b"1"), Some(ttl))
            .await
            .map_err(|e| AuthError::RevocationUnavailable(e.to_string()))
    }

    /// Fails when API key `key_id` was revoked within the cache window.
    pub async fn check_api_key(&self, key_id: &str) -> Result<(), AuthError> {
        match self.state.get(&format!("revoked:key:{key_id}")).await {
            Ok(Some(_)) => Err(AuthError::Revoked),
            Ok(None) => Ok(()),
            Err(e) => Err(AuthError::RevocationUnavailable(e.to_string())),
        }
    }

    /// Fails when `claims` belong to a revoked token, session or subject.
    pub async fn check(&self, claims: &Claims) -> Result<(), AuthError> {
        let unavailable = |e: crate::state::StateError| AuthError::RevocationUnavailable(e.to_string());
        for key in [
            format!("revoked:jti:{}", claims.jti),
            format!("revoked:sid:{}", claims.sid),
        ] {
            if self.state.get(&key).await.map_err(unavailable)?.is_some() {
                return Err(AuthError::Revoked);
            }
        }
        let revoked_at = self
            .state
            .get(&format!("revoked:sub-ms:{}", claims.sub))
            .await
            .map_err(unavailable)?;
        let revoked_at: Option<i64> = revoked_at.and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok());
        if revoked_at.is_some_and(|at| issued_ms(claims) <= at) {
            return Err(AuthError::Revoked);
        }
        Ok(())
    }
}

/// When a token was issued, in milliseconds: from its UUIDv7 `jti` (our
/// tokens), else from `iat` at the start of its second.
fn issued_ms(claims: &Claims) -> i64 {
    uuid::Uuid::parse_str(&claims.jti)
        .ok()
        .and_then(|id| id.get_timestamp())
        .map(|ts| {
            let (secs, nanos) = ts.to_unix();
            i64::try_from(secs).unwrap_or(i64::MAX) * 1000 + i64::from(nanos / 1_000_000)
        })
        .unwrap_or(claims.iat.saturating_mul(1000))
}
