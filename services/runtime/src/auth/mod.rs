//! The shared auth layer: every service verifies access tokens locally
//! against the auth service's JWKS (cached, refreshed on an unknown `kid` at
//! most once per interval) and enforces the permission its contract declares
//! for each RPC. Identities, sessions and token issuance are the auth
//! service's; only verification and enforcement live here.

pub mod jwt;
mod layer;
mod policy;
mod refusals;
mod revocation;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use plinth::auth::v1::Jwk;

pub use layer::{AuthLayer, AuthService};
pub use policy::{Access, PermissionMap, UNAUTHENTICATED_METHODS, pattern_matches};
pub use refusals::Refusals;
pub use revocation::Revocations;

use crate::error::{ErrorCode, ServiceError};
use jwt::{Claims, Expectations, KeySet, TokenError};

/// Where the public keys come from: the auth service in this process, or its
/// `GetJwks` over gRPC.
#[async_trait::async_trait]
pub trait JwksSource: Send + Sync {
    /// The current key set.
    async fn fetch(&self) -> Result<Vec<Jwk>, String>;
}

/// The verified caller of an RPC, in request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// User or service account id.
    pub subject: String,
    /// Roles from the token.
    pub roles: Vec<String>,
    /// Permission patterns the roles grant (`queue.*`, `auth.users.read`, `*`).
    pub permissions: Vec<String>,
    /// The subject's tenant; empty for none. Services keep tenants' data apart by it.
    pub tenant: String,
    /// Session (refresh-token family) the token belongs to.
    pub session: String,
    /// The token's id.
    pub token_id: String,
    /// When the credential expires (seconds since the epoch; 0 for never).
    pub expires_at: i64,
    /// Permission patterns the credential is limited to (API keys); empty
    /// means everything the roles grant.
    pub scopes: Vec<String>,
    /// The API key used, when the caller presented one instead of a token.
    pub api_key: Option<String>,
}

impl Principal {
    /// Whether the credential's scopes let it use `permission` (its roles
    /// must grant it too).
    pub fn scope_allows(&self, permission: &str) -> bool {
        self.scopes.is_empty() || self.scopes.iter().any(|s| pattern_matches(s, permission))
    }

    /// Whether the caller may use `permission`: granted by its roles and
    /// within its credential's scopes.
    pub fn allows(&self, permission: &str) -> bool {
        self.permissions.iter().any(|p| pattern_matches(p, permission)) && self.scope_allows(permission)
    }
}

impl From<Claims> for Principal {
    fn from(c: Claims) -> Self {
        Self {
            subject: c.sub,
            roles: c.roles,
            permissions: c.perms,
            tenant: c.tenant,
            session: c.sid,
            token_id: c.jti,
            expires_at: c.exp,
            scopes: Vec::new(),
            api_key: None,
        }
    }
}

/// API keys start with this, so they are told apart from JWTs at a glance
/// (and by secret scanners).
pub const API_KEY_PREFIX: &str = "plk_";

/// What an API key grants, as its issuer vouches for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyGrant {
    /// The key's id.
    pub key_id: String,
    /// Its owner.
    pub subject: String,
    /// The owner's roles now.
    pub roles: Vec<String>,
    /// Permission patterns those roles grant now.
    pub permissions: Vec<String>,
    /// The owner's tenant; empty for none.
    pub tenant: String,
    /// Permission patterns the key is limited to; empty for none.
    pub scopes: Vec<String>,
    /// Expiry (seconds since the epoch); 0 for never.
    pub expires_at: i64,
}

impl From<ApiKeyGrant> for Principal {
    fn from(g: ApiKeyGrant) -> Self {
        Self {
            subject: g.subject,
            roles: g.roles,
            permissions: g.permissions,
            tenant: g.tenant,
            session: String::new(),
            token_id: g.key_id.clone(),
            expires_at: g.expires_at,
            scopes: g.scopes,
            api_key: Some(g.key_id),
        }
    }
}

/// Validates API keys: the auth service in this process, or its
/// `Introspect` over gRPC.
#[async_trait::async_trait]
pub trait ApiKeySource: Send + Sync {
    /// The grant of `key`, `None` when it is unknown, expired or revoked.
    async fn validate(&self, key: &str) -> Result<Option<ApiKeyGrant>, String>;
}

/// How long a validated API key is trusted before asking its source again.
/// Revocation does not wait for it: revoked key ids are denylisted at once.
pub const API_KEY_CACHE_TTL: Duration = Duration::from_secs(30);

/// Why a call was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credentials where some are required.
    #[error("authentication required")]
    Missing,
    /// Credentials that do not verify (details are logged, not returned).
    #[error("invalid or expired credentials")]
    Invalid(#[source] TokenError),
    /// Valid credentials without the permission.
    #[error("permission `{0}` required")]
    Denied(String),
    /// The RPC declares no permission and is not on the allowlist.
    #[error("this method is not exposed")]
    NotExposed,
    /// The token or its subject was revoked.
    #[error("credentials revoked")]
    Revoked,
    /// The revocation lists cannot be read; the call is refused.
    #[error("revocation lists unavailable")]
    RevocationUnavailable(String),
    /// The key set cannot be fetched and the token's key is unknown.
    #[error("token keys unavailable")]
    KeysUnavailable(String),
}

impl ServiceError for AuthError {
    fn code(&self) -> ErrorCode {
        match self {
            AuthError::Missing | AuthError::Invalid(_) | AuthError::Revoked => ErrorCode::Unauthenticated,
            AuthError::RevocationUnavailable(_) => ErrorCode::Unavailable,
            AuthError::Denied(_) | AuthError::NotExposed => ErrorCode::PermissionDenied,
            AuthError::KeysUnavailable(_) => ErrorCode::Unavailable,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "CREDENTIALS_MISSING",
            AuthError::Invalid(_) => "CREDENTIALS_INVALID",
            AuthError::Revoked => "CREDENTIALS_REVOKED",
            AuthError::RevocationUnavailable(_) => "REVOCATIONS_UNAVAILABLE",
            AuthError::Denied(_) => "PERMISSION_DENIED",
            AuthError::NotExposed => "METHOD_NOT_EXPOSED",
            AuthError::KeysUnavailable(_) => "KEYS_UNAVAILABLE",
        }
    }
}

/// Verifies access tokens against a cached JWKS.
pub struct Authenticator {
    source: Arc<dyn JwksSource>,
    keys: RwLock<Arc<KeySet>>,
    last_fetch: Mutex<Option<Instant>>,
    refresh_interval: Duration,
    expect: Expectations,
    /// Tokens already verified, so a client reusing its token (the common
    /// case) costs a lookup instead of a signature check. Bounded; emptied
    /// when the key set changes.
    verified: Mutex<HashMap<String, Claims>>,
    revocations: Option<Revocations>,
    api_keys: Option<Arc<dyn ApiKeySource>>,
    /// Validated API keys by SHA-256 of the secret, with when they were checked.
    key_cache: Mutex<HashMap<[u8; 32], (ApiKeyGrant, Instant)>>,
}

/// Verified tokens remembered at most; the cache is emptied when full.
const VERIFIED_CACHE: usize = 10_000;

impl Authenticator {
    /// Verifies tokens for `issuer`/`audience`, fetching keys from `source`
    /// no more often than every `refresh_interval` on unknown key ids.
    pub fn new(source: Arc<dyn JwksSource>, issuer: &str, audience: &str, refresh_interval: Duration) -> Self {
        Self {
            source,
            keys: RwLock::new(Arc::new(KeySet::default())),
            last_fetch: Mutex::new(None),
            refresh_interval,
            expect: Expectations {
                issuer: issuer.to_owned(),
                audience: audience.to_owned(),
                leeway_secs: 30,
            },
            verified: Mutex::new(HashMap::new()),
            revocations: None,
            api_keys: None,
            key_cache: Mutex::new(HashMap::new()),
        }
    }

    /// Also accepts API keys, validated by `source` (cached briefly).
    pub fn with_api_keys(mut self, source: Arc<dyn ApiKeySource>) -> Self {
        self.api_keys = Some(source);
        self
    }

    /// Verifies an API key: its source's answer (cached for
    /// [`API_KEY_CACHE_TTL`]), its expiry, and the revocation list.
    pub async fn verify_api_key(&self, key: &str) -> Result<ApiKeyGrant, AuthError> {
        use sha2::Digest;
        let source = self
            .api_keys
            .as_ref()
            .ok_or_else(|| AuthError::KeysUnavailable("API keys are not accepted here".into()))?;
        let fingerprint: [u8; 32] = sha2::Sha256::digest(key.as_bytes()).into();
        let cached = self
            .key_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&fingerprint)
            .filter(|(_, at)| at.elapsed() < API_KEY_CACHE_TTL)
            .map(|(g, _)| g.clone());
        let grant = match cached {
            Some(g) => g,
            None => {
                let grant = source
                    .validate(key)
                    .await
                    .map_err(AuthError::KeysUnavailable)?
                    .ok_or(AuthError::Invalid(TokenError::UnknownApiKey))?;
                let mut cache = self.key_cache.lock().unwrap_or_else(PoisonError::into_inner);
                if cache.len() >= VERIFIED_CACHE {
                    cache.clear();
                }
                cache.insert(fingerprint, (grant.clone(), Instant::now()));
                grant
            }
        };
        if grant.expires_at != 0 && unix_now() >= grant.expires_at {
            return Err(AuthError::Invalid(TokenError::Expired));
        }
        if let Some(revocations) = &self.revocations {
            revocations.check_api_key(&grant.key_id).await?;
        }
        Ok(grant)
    }

    /// Also refuses tokens on the revocation lists (checked on every call).
    pub fn with_revocations(mut self, revocations: Revocations) -> Self {
        self.revocations = Some(revocations);
        self
    }

    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Fetches the key set unless it was fetched within the refresh interval.
    async fn refresh(&self) -> Result<bool, String> {
        {
            let mut last = self.last_fetch.lock().unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < self.refresh_interval) {
                return Ok(false);
            }
            *last = Some(Instant::now());
        }
        let jwks = self.source.fetch().await?;
        let set = KeySet::from_jwks(&jwks);
        tracing::debug!(keys = set.len(), "token keys refreshed");
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
        self.verified.lock().unwrap_or_else(PoisonError::into_inner).clear();
        Ok(true)
    }

    /// Verifies `token` now.
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let claims = self.verify_signed(token).await?;
        if let Some(revocations) = &self.revocations {
            revocations.check(&claims).await?;
        }
        Ok(claims)
    }

    /// Signature and claims, from the cache when this token was seen before.
    async fn verify_signed(&self, token: &str) -> Result<Claims, AuthError> {
        let now = unix_now();
        let leeway = self.expect.leeway_secs;
        if let Some(claims) = self.verified.lock().unwrap_or_else(PoisonError::into_inner).get(token)
            && now < claims.exp.saturating_add(leeway)
            && now.saturating_add(leeway) >= claims.nbf
        {
            return Ok(claims.clone());
        }
        let claims = self.verify_uncached(token, now).await?;
        let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if verified.len() >= VERIFIED_CACHE {
            verified.clear();
        }
        verified.insert(token.to_owned(), claims.clone());
        Ok(claims)
    }

    async fn verify_uncached(&self, token: &str, now: i64) -> Result<Claims, AuthError> {
        match jwt::verify(token, &self.current(), &self.expect, now) {
            Err(TokenError::UnknownKey(kid)) => {
                // A new key was published (rotation) or we never fetched: fetch once.
                match self.refresh().await {
                    Ok(true) => jwt::verify(token, &self.current(), &self.expect, now).map_err(AuthError::Invalid),
                    Ok(false) => Err(AuthError::Invalid(TokenError::UnknownKey(kid))),
                    Err(e) => Err(AuthError::KeysUnavailable(e)),
                }
            }
            other => other.map_err(AuthError::Invalid),
        }
    }
}

/// The subject of the caller the auth layer let through, or `anonymous`
/// (for logs and audit records, never for decisions).
pub fn subject_of<T>(request: &tonic::Request<T>) -> String {
    request
        .extensions()
        .get::<Principal>()
        .map_or_else(|| "anonymous".to_owned(), |p| p.subject.clone())
}

/// Milliseconds since the epoch.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Seconds since the epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Validates API keys with the auth service's `Introspect` over gRPC.
#[async_trait::async_trait]
impl ApiKeySource for GrpcJwksSource {
    async fn validate(&self, key: &str) -> Result<Option<ApiKeyGrant>, String> {
        let mut client = self.client.clone();
        let resp = client
            .introspect(plinth::auth::v1::IntrospectRequest { token: key.to_owned() })
            .await
            .map_err(|e| e.message().to_owned())?
            .into_inner();
        if !resp.active || resp.token_type != "api_key" {
            return Ok(None);
        }
        Ok(Some(ApiKeyGrant {
            key_id: resp.client_id,
            subject: resp.sub,
            roles: resp.roles,
            permissions: resp.permissions,
            tenant: resp.tenant,
            scopes: resp.scope.split_whitespace().map(str::to_owned).collect(),
            expires_at: resp.exp,
        }))
    }
}

/// Fetches the key set from the auth service's `GetJwks` over gRPC (and
/// validates API keys with its `Introspect`), for processes that do not run
/// the auth component.
pub struct GrpcJwksSource {
    client: plinth::auth::v1::auth_service_client::AuthServiceClient<tonic::transport::Channel>,
}

impl GrpcJwksSource {
    /// Dials `url` (e.g. `http://auth:50051`) lazily, on first fetch.
    pub fn new(url: &str) -> Result<Self, String> {
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| format!("PLINTH_AUTH__URL: {e}"))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        Ok(Self {
            client: plinth::auth::v1::auth_service_client::AuthServiceClient::new(channel),
        })
    }
}

#[async_trait::async_trait]
impl JwksSource for GrpcJwksSource {
    async fn fetch(&self) -> Result<Vec<Jwk>, String> {
        let mut client = self.client.clone();
        let resp = client
            .get_jwks(plinth::auth::v1::GetJwksRequest {})
            .await
            .map_err(|e| e.message().to_owned())?;
        Ok(resp.into_inner().keys)
    }
}
