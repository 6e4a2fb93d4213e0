//! The auth domain: registration, password login, refresh rotation, logout
//! and the signing keys. Input arrives validated as plain values; this
//! module decides, `store` persists.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use plinth::auth::v1::{
    ApiKeyCreatedEvent, ApiKeyRevokedEvent, Jwk, LockoutEvent, LoginFailedEvent, LoginSucceededEvent,
    PasswordChangedEvent, PasswordResetRequestedEvent, SessionRevokedEvent, SigningKeyRotatedEvent,
    TokenRefreshedEvent, TokenRevokedEvent, UserRegisteredEvent, UserUpdatedEvent,
};
use plinth_runtime::auth::jwt::{self, Claims, Expectations, TokenSigner};
use plinth_runtime::auth::{
    API_KEY_PREFIX, ApiKeyGrant, PermissionMap, Principal, Revocations, pattern_matches, unix_now,
};
use plinth_runtime::config::AuthSettings;
use plinth_runtime::crypto::Keyring;
use plinth_runtime::events::outbox::{OutboxEvent, Relay};
use plinth_runtime::storage::Db;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::AuthError;
use crate::identity::{Identifier, email_of, phone_of, tenant_of};
use crate::keys::SigningKeys;
use crate::password::{PasswordHasher, check_policy};
use crate::rbac::Rbac;
use crate::store::{self, ApiKeyRow, NewSession, Rotation, ServiceAccountRow, UserChange, UserRow};
use crate::throttle::LoginThrottle;

/// Refresh tokens start with this, so leaked ones are recognisable in scanners and logs.
const REFRESH_PREFIX: &str = "plr_";
/// The role a self-registered user gets.
const DEFAULT_ROLE: &str = "viewer";

/// Who a new user is: email and/or phone (normalised, "" for none) and tenant.
struct NewUser {
    email: String,
    phone: String,
    tenant: String,
}

/// What an administrator sends to create a user, before validation.
pub struct NewAccount<'a> {
    /// Email, or "".
    pub email: &'a str,
    /// Phone number, or "".
    pub phone: &'a str,
    /// Tenant, or "".
    pub tenant: &'a str,
}

/// An access token and the refresh token that renews it.
#[derive(Debug, Clone)]
pub struct TokenPair {
    /// The signed JWT.
    pub access_token: String,
    /// Seconds until it expires.
    pub expires_in: i64,
    /// The opaque refresh token.
    pub refresh_token: String,
    /// Seconds until the refresh token expires.
    pub refresh_expires_in: i64,
}

/// A successful login.
#[derive(Debug, Clone)]
pub struct LoginOutcome {
    /// The tokens of the new session.
    pub tokens: TokenPair,
    /// Who signed in.
    pub user: UserRow,
}

/// The auth service's domain.
pub struct Auth {
    db: Db,
    settings: AuthSettings,
    hasher: PasswordHasher,
    /// The signing key ring, reloaded from the database.
    keys: SigningKeys,
    relay: Option<Relay>,
    throttle: LoginThrottle,
    revocations: Revocations,
    /// Keys the HMAC digests of API keys.
    api_key_hmac: ring::hmac::Key,
    /// Roles, bindings and checks.
    rbac: Arc<Rbac>,
}

/// What `Introspect` says of a token (RFC 7662).
#[derive(Debug, Clone, Default)]
pub struct Introspection {
    /// Whether it is valid now.
    pub active: bool,
    /// `access_token` or `api_key`.
    pub token_type: &'static str,
    /// Its subject.
    pub subject: String,
    /// Scopes (API keys).
    pub scopes: Vec<String>,
    /// Expiry; 0 for never.
    pub expires_at: i64,
    /// Key id or session id.
    pub client_id: String,
    /// The subject's roles.
    pub roles: Vec<String>,
    /// Permission patterns those roles grant.
    pub permissions: Vec<String>,
    /// The subject's tenant.
    pub tenant: String,
}

/// Service account client secrets start with this.
const SERVICE_SECRET_PREFIX: &str = "pls_";
/// Password reset tokens start with this.
const RESET_PREFIX: &str = "plp_";
/// How long a reset token works.
const RESET_TTL_SECS: i64 = 3600;
/// Statuses an administrator may set.
const STATUSES: &[&str] = &["active", "disabled", "locked"];

/// The longest API key display name.
const MAX_KEY_NAME: usize = 100;
/// The most scopes one API key may carry.
const MAX_SCOPES: usize = 50;

/// A new account's email and phone, normalised: at least one, "" for the other.
fn identifiers(email: &str, phone: &str) -> Result<(String, String), AuthError> {
    let mut violations = Vec::new();
    let email = match email.trim() {
        "" => String::new(),
        e => email_of(e).unwrap_or_else(|e| {
            violations.extend(e.violations());
            String::new()
        }),
    };
    let phone = match phone.trim() {
        "" => String::new(),
        p => phone_of(p).unwrap_or_else(|e| {
            violations.extend(e.violations());
            String::new()
        }),
    };
    if violations.is_empty() && email.is_empty() && phone.is_empty() {
        return Err(AuthError::field("email", "an email or a phone number is required"));
    }
    if violations.is_empty() {
        Ok((email, phone))
    } else {
        Err(AuthError::Invalid(violations))
    }
}

fn digest(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

fn new_refresh_token() -> String {
    let random: [u8; 32] = rand::random();
    format!("{REFRESH_PREFIX}{}", URL_SAFE_NO_PAD.encode(random))
}

fn timestamp(secs: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

fn secs(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Auth {
    /// Loads (or creates, on first start) the signing key and returns the
    /// service. With a key in `sealing`, signing keys are sealed at rest.
    pub async fn new(
        db: Db,
        settings: AuthSettings,
        throttle: LoginThrottle,
        revocations: Revocations,
        relay: Option<Relay>,
        sealing: Keyring,
    ) -> Result<Arc<Self>, AuthError> {
        let hasher = PasswordHasher::new(settings.hash_concurrency as usize)?;
        let keys = SigningKeys::load(&db, secs(settings.access_ttl_secs), unix_now(), sealing).await?;
        let bootstrap = (
            settings.bootstrap_admin_email.clone(),
            settings.bootstrap_admin_password.clone(),
        );
        let secret = store::hmac_secret(&db, &rand::random::<[u8; 32]>(), unix_now()).await?;
        let catalog = PermissionMap::from_descriptor_set(plinth::FILE_DESCRIPTOR_SET)
            .map_err(|e| AuthError::Hashing(e.to_string()))?
            .declared_permissions();
        let rbac = Rbac::load(
            db.clone(),
            catalog,
            revocations.clone(),
            std::time::Duration::from_secs(settings.access_ttl_secs),
            relay.clone(),
        )
        .await?;
        let auth = Arc::new(Self {
            db,
            settings,
            hasher,
            keys,
            relay,
            throttle,
            revocations,
            api_key_hmac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
            rbac: Arc::new(rbac),
        });
        auth.bootstrap_admin(&bootstrap.0, bootstrap.1).await?;
        Ok(auth)
    }

    /// Creates the first administrator when no user has the admin role, so a
    /// new deployment can be operated without ever running with auth off.
    async fn bootstrap_admin(&self, email: &str, password: Option<SecretString>) -> Result<(), AuthError> {
        if store::any_admin(&self.db).await? {
            return Ok(());
        }
        let email = email_of(email)?;
        let generated = password.is_none();
        let password = match password {
            Some(p) => p.expose_secret().to_owned(),
            None => URL_SAFE_NO_PAD.encode(rand::random::<[u8; 18]>()),
        };
        check_policy(&password, &email)?;
        let user = match self
            .create_user(
                NewUser {
                    email,
                    phone: String::new(),
                    tenant: String::new(),
                },
                password.clone(),
                "Bootstrap administrator",
                "admin",
            )
            .await
        {
            // Another replica created it first.
            Err(AuthError::EmailTaken) => return Ok(()),
            other => other?,
        };
        if generated {
            tracing::warn!(
                email = %user.email,
                password = %password,
                "created the bootstrap administrator; this password is shown once, change it"
            );
        } else {
            tracing::info!(email = %user.email, "created the bootstrap administrator");
        }
        Ok(())
    }

    /// The policy engine (roles, bindings, checks).
    pub fn rbac(&self) -> Arc<Rbac> {
        self.rbac.clone()
    }

    fn committed(&self) {
        if let Some(relay) = &self.relay {
            relay.wake();
        }
    }

    /// The public keys of every token that may still be valid.
    pub fn jwks(&self) -> Vec<Jwk> {
        self.keys.current().jwks().to_vec()
    }

    /// Rotates the signing key: the new one is published now and signs after
    /// the publish lead. With `scheduled`, only when the newest key is older
    /// than the rotation period (and no other replica rotated meanwhile).
    /// Returns the new key id and when it activates.
    pub async fn rotate_signing_key(&self, scheduled: bool) -> Result<Option<(String, i64)>, AuthError> {
        let now = unix_now();
        let period = secs(self.settings.key_rotation_days).saturating_mul(86_400);
        let unless_newer_than = if scheduled {
            if period == 0 {
                return Ok(None);
            }
            let newest = self.keys.current().newest_created().unwrap_or(0);
            if newest > now - period {
                return Ok(None);
            }
            Some(now - period)
        } else {
            None
        };
        let signer = TokenSigner::generate();
        let activates_at = now + secs(self.settings.key_publish_lead_secs);
        let event = SigningKeyRotatedEvent {
            kid: signer.kid().to_owned(),
            activate_time: timestamp(activates_at),
            trigger: if scheduled { "SCHEDULE" } else { "ON_DEMAND" }.into(),
            time: timestamp(now),
        };
        let event = OutboxEvent::new("plinth.auth.signing_key_rotated", signer.kid(), &event);
        if !store::rotate_key(
            &self.db,
            signer.kid(),
            &self.keys.stored(signer.kid(), &signer.seed())?,
            now,
            activates_at,
            unless_newer_than,
            &event,
        )
        .await?
        {
            return Ok(None);
        }
        self.committed();
        self.keys.reload(&self.db, now).await?;
        tracing::info!(kid = signer.kid(), activates_at, scheduled, "signing key rotated");
        Ok(Some((signer.kid().to_owned(), activates_at)))
    }

    /// Reloads the key ring every `interval` (following rotations made by
    /// other replicas and retiring old keys from the JWKS) and rotates on
    /// schedule, until `token` is cancelled.
    pub async fn maintain_keys(
        self: Arc<Self>,
        interval: std::time::Duration,
        token: tokio_util::sync::CancellationToken,
    ) -> Result<(), std::convert::Infallible> {
        while plinth_runtime::tasks::pause(&token, interval).await {
            if let Err(e) = self.rotate_signing_key(true).await {
                tracing::warn!(error = %e, "scheduled signing key rotation failed, will retry");
            }
            if let Err(e) = self.keys.reload(&self.db, unix_now()).await {
                tracing::warn!(error = %e, "signing keys could not be reloaded, keeping the current ring");
            }
        }
        Ok(())
    }

    /// Creates a user with an email, a phone number or both.
    pub async fn register(
        &self,
        email: &str,
        phone: &str,
        password: String,
        display_name: &str,
    ) -> Result<UserRow, AuthError> {
        let display_name = display_name.trim();
        let mut violations = Vec::new();
        let (email, phone) = match identifiers(email, phone) {
            Ok(pair) => pair,
            Err(AuthError::Invalid(v)) => {
                violations.extend(v);
                (String::new(), String::new())
            }
            Err(e) => return Err(e),
        };
        let name = if email.is_empty() { &phone } else { &email };
        if let Err(AuthError::Invalid(v)) = check_policy(&password, name) {
            violations.extend(v);
        }
        if display_name.chars().count() > 200 {
            violations.push(plinth_runtime::error::FieldViolation::new(
                "display_name",
                "must be at most 200 characters",
            ));
        }
        if !violations.is_empty() {
            return Err(AuthError::Invalid(violations));
        }
        let who = NewUser {
            email,
            phone,
            tenant: String::new(),
        };
        let user = self.create_user(who, password, display_name, DEFAULT_ROLE).await?;
        tracing::info!(user_id = %user.id, "user registered");
        Ok(user)
    }

    /// Hashes the password and stores an active user with its event.
    async fn create_user(
        &self,
        who: NewUser,
        password: String,
        display_name: &str,
        roles: &str,
    ) -> Result<UserRow, AuthError> {
        let now = unix_now();
        let user = UserRow {
            id: uuid::Uuid::now_v7().to_string(),
            email: who.email,
            phone: who.phone,
            tenant: who.tenant,
            password_hash: self.hasher.hash(password).await?,
            display_name: display_name.to_owned(),
            status: "active".into(),
            roles: roles.to_owned(),
            created_at: now,
        };
        let event = UserRegisteredEvent {
            user_id: user.id.clone(),
            email: user.email.clone(),
            phone: user.phone.clone(),
            time: timestamp(now),
        };
        store::insert_user(
            &self.db,
            &user,
            &OutboxEvent::new("plinth.auth.user_registered", &user.id, &event),
        )
        .await?;
        self.committed();
        Ok(user)
    }

    /// Checks a password and opens a session. Unknown users, wrong passwords
    /// and inactive users get the same error after the same amount of work.
    pub async fn login(
        &self,
        who: &Identifier,
        password: String,
        address: Option<&str>,
    ) -> Result<LoginOutcome, AuthError> {
        let key = who.key().to_owned();
        if password.is_empty() || password.chars().count() > crate::password::MAX_PASSWORD_CHARS {
            return Err(AuthError::field("password", "must be 1 to 1024 characters"));
        }
        if let Err((error, lockout)) = self.throttle.reserve(&key, address).await {
            if let Some(lockout) = lockout {
                let event = LockoutEvent {
                    email: who.email().to_owned(),
                    phone: who.phone().to_owned(),
                    scope: lockout.scope.into(),
                    duration_secs: i64::try_from(lockout.duration.as_secs()).unwrap_or(i64::MAX),
                    time: timestamp(unix_now()),
                };
                store::record(&self.db, &OutboxEvent::new("plinth.auth.lockout", &key, &event)).await?;
                self.committed();
            }
            return Err(error);
        }
        let user = store::user_by(&self.db, who).await?;
        let rehash = user
            .as_ref()
            .is_some_and(|u| self.hasher.needs_rehash(&u.password_hash))
            .then(|| password.clone());
        let matches = self
            .hasher
            .verify(password, user.as_ref().map(|u| u.password_hash.clone()))
            .await?;
        if matches && let (Some(password), Some(u)) = (rehash, &user) {
            // Hashed with older parameters: upgrade it now that we know the password.
            let hash = self.hasher.hash(password).await?;
            store::update_password(&self.db, &u.id, &hash, unix_now(), None).await?;
            tracing::info!(user_id = %u.id, "password rehashed with the current parameters");
        }
        let now = unix_now();
        let failure = match &user {
            None => Some("UNKNOWN_USER"),
            Some(_) if !matches => Some("BAD_PASSWORD"),
            Some(u) if u.status != "active" => Some("USER_NOT_ACTIVE"),
            Some(_) => None,
        };
        let (Some(user), None) = (user, failure) else {
            let reason = failure.unwrap_or("BAD_PASSWORD");
            let event = LoginFailedEvent {
                email: who.email().to_owned(),
                phone: who.phone().to_owned(),
                user_id: String::new(),
                reason: reason.into(),
                time: timestamp(now),
            };
            store::record(&self.db, &OutboxEvent::new("plinth.auth.login_failed", &key, &event)).await?;
            self.committed();
            tracing::info!(reason, "login failed");
            return Err(AuthError::BadCredentials);
        };
        self.throttle.succeeded(&key, address).await;
        let session_id = uuid::Uuid::now_v7().to_string();
        let refresh = new_refresh_token();
        let refresh_ttl = secs(self.settings.refresh_ttl_secs);
        let refresh_digest = digest(&refresh);
        let session = NewSession {
            id: &session_id,
            user_id: &user.id,
            now,
            expires_at: now.saturating_add(refresh_ttl),
            refresh_digest: &refresh_digest,
        };
        let event = LoginSucceededEvent {
            user_id: user.id.clone(),
            session_id: session_id.clone(),
            time: timestamp(now),
        };
        store::create_session(
            &self.db,
            &session,
            &OutboxEvent::new("plinth.auth.login_succeeded", &user.id, &event),
        )
        .await?;
        self.committed();
        let tokens = self.issue(&user, &session_id, refresh, refresh_ttl, now);
        tracing::info!(user_id = %user.id, session_id = %session_id, "login succeeded");
        Ok(LoginOutcome { tokens, user })
    }

    fn issue(&self, user: &UserRow, session_id: &str, refresh: String, refresh_ttl: i64, now: i64) -> TokenPair {
        let ttl = secs(self.settings.access_ttl_secs);
        let claims = Claims {
            iss: self.settings.issuer.clone(),
            sub: user.id.clone(),
            aud: self.settings.audience.clone(),
            exp: now.saturating_add(ttl),
            iat: now,
            nbf: now,
            jti: uuid::Uuid::now_v7().to_string(),
            sid: session_id.to_owned(),
            perms: self.rbac.token_permissions(&user.role_list()),
            roles: user.role_list(),
            tenant: user.tenant.clone(),
        };
        TokenPair {
            access_token: self.sign(&claims),
            expires_in: ttl,
            refresh_token: refresh,
            refresh_expires_in: refresh_ttl,
        }
    }

    fn sign(&self, claims: &Claims) -> String {
        let ring = self.keys.current();
        match ring.signer(claims.iat) {
            Some(signer) => signer.sign(claims),
            // `SigningKeys::reload` never installs an empty ring.
            None => String::new(),
        }
    }

    fn revoked_event(reason: &'static str) -> impl Fn(&str, &str) -> OutboxEvent {
        move |user_id, session_id| {
            let event = SessionRevokedEvent {
                user_id: user_id.to_owned(),
                session_id: session_id.to_owned(),
                reason: reason.into(),
                time: timestamp(unix_now()),
            };
            OutboxEvent::new("plinth.auth.session_revoked", user_id, &event)
        }
    }

    /// Rotates a refresh token. Reuse outside the grace window revokes the session.
    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenPair, AuthError> {
        if !refresh_token.starts_with(REFRESH_PREFIX) || refresh_token.len() > 128 {
            return Err(AuthError::BadRefreshToken);
        }
        let next = new_refresh_token();
        let now = unix_now();
        let grace = secs(self.settings.refresh_grace_secs);
        let rotation = store::rotate_refresh(
            &self.db,
            &digest(refresh_token),
            &digest(&next),
            now,
            grace,
            Self::revoked_event("REFRESH_TOKEN_REUSED"),
            |user_id, session_id, within_grace| {
                let event = TokenRefreshedEvent {
                    user_id: user_id.to_owned(),
                    session_id: session_id.to_owned(),
                    within_grace,
                    time: timestamp(now),
                };
                OutboxEvent::new("plinth.auth.token_refreshed", user_id, &event)
            },
        )
        .await?;
        match rotation {
            Rotation::Rotated { session_id, user_id } => {
                self.committed();
                let user = store::user_by_id(&self.db, &user_id)
                    .await?
                    .ok_or(AuthError::BadRefreshToken)?;
                if user.status != "active" {
                    return Err(AuthError::BadRefreshToken);
                }
                let refresh_ttl = secs(self.settings.refresh_ttl_secs);
                Ok(self.issue(&user, &session_id, next, refresh_ttl, now))
            }
            Rotation::Reused { session_id, user_id } => {
                self.committed();
                tracing::warn!(user_id = %user_id, session_id = %session_id, "refresh token reused, session revoked");
                Err(AuthError::RefreshReused)
            }
        }
    }

    /// Ends the session of `refresh_token` and every access token issued in
    /// it (on every replica, at once), and denies `caller`'s access token when
    /// given. Ending an already ended session succeeds.
    pub async fn logout(&self, refresh_token: &str, caller: Option<&Principal>) -> Result<(), AuthError> {
        if refresh_token.is_empty() {
            return Err(AuthError::field("refresh_token", "is required"));
        }
        if let Some(p) = caller {
            self.revocations
                .revoke_token(&p.token_id, p.expires_at, unix_now())
                .await
                .map_err(AuthError::Revocation)?;
        }
        let ended = store::revoke_session_of(
            &self.db,
            &digest(refresh_token),
            unix_now(),
            Self::revoked_event("LOGOUT"),
        )
        .await?;
        if let Some(ended) = ended {
            if ended.now {
                self.committed();
            }
            // Also for a session that had ended: a logout retried after the
            // marker could not be written still writes it.
            let lifetime = std::time::Duration::from_secs(self.settings.access_ttl_secs);
            self.revocations
                .revoke_session(&ended.session_id, lifetime)
                .await
                .map_err(AuthError::Revocation)?;
        }
        Ok(())
    }

    /// RFC 7009 revocation of whatever `token` is; unknown, expired and
    /// malformed tokens are ignored, so the answer reveals nothing.
    pub async fn revoke(&self, token: &str) -> Result<(), AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::field("token", "is required"));
        }
        if token.starts_with(API_KEY_PREFIX) {
            if let Some(grant) = self.validate_api_key(token).await? {
                return match self.revoke_api_key(&grant.subject, &grant.key_id).await {
                    Err(AuthError::ApiKeyNotFound) | Ok(()) => Ok(()),
                    Err(e) => Err(e),
                };
            }
            return Ok(());
        }
        if token.starts_with(REFRESH_PREFIX) {
            return self.logout(token, None).await;
        }
        let expect = Expectations {
            issuer: self.settings.issuer.clone(),
            audience: self.settings.audience.clone(),
            leeway_secs: 30,
        };
        let now = unix_now();
        let Ok(claims) = jwt::verify(token, self.keys.current().keyset(), &expect, now) else {
            return Ok(());
        };
        self.revocations
            .revoke_token(&claims.jti, claims.exp, now)
            .await
            .map_err(AuthError::Revocation)?;
        let event = TokenRevokedEvent {
            user_id: claims.sub.clone(),
            token_id: claims.jti.clone(),
            time: timestamp(now),
        };
        store::record(
            &self.db,
            &OutboxEvent::new("plinth.auth.token_revoked", &claims.sub, &event),
        )
        .await?;
        self.committed();
        tracing::info!(user_id = %claims.sub, token_id = %claims.jti, "access token revoked");
        Ok(())
    }

    /// Ends every session of `user_id` and refuses every access token issued
    /// to them until now. Returns how many sessions were open.
    pub async fn revoke_all_sessions(&self, user_id: &str) -> Result<u64, AuthError> {
        let now = unix_now();
        // Deny the tokens first: if this fails nothing claims to be revoked.
        let lifetime = std::time::Duration::from_secs(self.settings.access_ttl_secs);
        self.revocations
            .revoke_subject(user_id, lifetime)
            .await
            .map_err(AuthError::Revocation)?;
        let event = Self::revoked_event("REVOKE_ALL")(user_id, "");
        let n = store::revoke_all_sessions(&self.db, user_id, now, &event).await?;
        self.committed();
        tracing::info!(user_id, sessions = n, "all sessions revoked");
        Ok(n)
    }

    /// `user_id`'s open sessions, newest first: a page of at most `page_size`
    /// (default 50, at most 100) after `page_token`, and the next token.
    pub async fn sessions(
        &self,
        user_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<store::SessionRow>, String), AuthError> {
        let size: usize = match page_size {
            0 => 50,
            1..=100 => usize::try_from(page_size).unwrap_or(50),
            _ => return Err(AuthError::field("page_size", "must be between 0 and 100")),
        };
        let before = (!page_token.is_empty()).then_some(page_token);
        if before.is_some_and(|t| uuid::Uuid::parse_str(t).is_err()) {
            return Err(AuthError::field(
                "page_token",
                "is not a token from a previous response",
            ));
        }
        let limit = i64::try_from(size + 1).unwrap_or(101);
        let mut rows = store::open_sessions(&self.db, user_id, unix_now(), before, limit).await?;
        let next = if rows.len() > size {
            rows.truncate(size);
            rows.last().map(|r| r.0.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok((rows, next))
    }

    /// Ends `user_id`'s session `session_id`; its access tokens stop at once.
    pub async fn revoke_session(&self, user_id: &str, session_id: &str) -> Result<(), AuthError> {
        if uuid::Uuid::parse_str(session_id).is_err() {
            return Err(AuthError::field("session_id", "must be a session id from ListSessions"));
        }
        let lifetime = std::time::Duration::from_secs(self.settings.access_ttl_secs);
        let event = Self::revoked_event("REVOKED")(user_id, session_id);
        if !store::revoke_session(&self.db, user_id, session_id, unix_now(), &event).await? {
            return Err(AuthError::SessionNotFound);
        }
        self.revocations
            .revoke_session(session_id, lifetime)
            .await
            .map_err(AuthError::Revocation)?;
        self.committed();
        Ok(())
    }

    fn key_digest(&self, key: &str) -> String {
        URL_SAFE_NO_PAD.encode(ring::hmac::sign(&self.api_key_hmac, key.as_bytes()).as_ref())
    }

    /// Creates an API key for `caller`; the secret is returned this once.
    pub async fn create_api_key(
        &self,
        caller: &Principal,
        display_name: &str,
        scopes: Vec<String>,
        expires_at: Option<i64>,
    ) -> Result<(ApiKeyRow, String), AuthError> {
        let now = unix_now();
        let name = display_name.trim();
        if name.is_empty() || name.chars().count() > MAX_KEY_NAME {
            return Err(AuthError::field("display_name", "must be 1 to 100 characters"));
        }
        if scopes.len() > MAX_SCOPES {
            return Err(AuthError::field("scopes", "at most 50 scopes"));
        }
        for (i, scope) in scopes.iter().enumerate() {
            let valid = scope == "*"
                || (!scope.is_empty()
                    && scope.len() <= 128
                    && scope.split('.').all(|p| {
                        p == "*"
                            || (!p.is_empty()
                                && p.bytes()
                                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
                    }));
            if !valid {
                return Err(AuthError::field(
                    &format!("scopes[{i}]"),
                    "must be a permission pattern like queue.messages.write, queue.* or *",
                ));
            }
        }
        // A key never carries more than its owner may do: with roles that
        // grant `*`, anything goes; otherwise each exact scope must be granted.
        for (i, scope) in scopes.iter().enumerate() {
            if !scope.contains('*') && !caller.permissions.iter().any(|p| pattern_matches(p, scope)) {
                return Err(AuthError::field(
                    &format!("scopes[{i}]"),
                    "is not granted by your roles",
                ));
            }
        }
        if let Some(at) = expires_at
            && at <= now
        {
            return Err(AuthError::field("expire_time", "must be in the future"));
        }
        if caller.api_key.is_some() {
            return Err(AuthError::field(
                "authorization",
                "API keys cannot create API keys; sign in",
            ));
        }
        let lookup = hex(&rand::random::<[u8; 8]>());
        let secret = format!(
            "{API_KEY_PREFIX}{lookup}_{}",
            URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
        );
        let row = ApiKeyRow {
            id: uuid::Uuid::now_v7().to_string(),
            user_id: caller.subject.clone(),
            lookup,
            digest: self.key_digest(&secret),
            display_name: name.to_owned(),
            scopes: scopes.join(" "),
            created_at: now,
            expires_at,
            last_used_at: None,
            revoked_at: None,
        };
        let event = ApiKeyCreatedEvent {
            user_id: row.user_id.clone(),
            key_id: row.id.clone(),
            scopes,
            time: timestamp(now),
        };
        store::insert_api_key(
            &self.db,
            &row,
            &OutboxEvent::new("plinth.auth.api_key_created", &row.user_id, &event),
        )
        .await?;
        self.committed();
        tracing::info!(user_id = %row.user_id, key_id = %row.id, "api key created");
        Ok((row, secret))
    }

    /// `user_id`'s API keys, newest first.
    pub async fn api_keys(&self, user_id: &str, with_revoked: bool) -> Result<Vec<ApiKeyRow>, AuthError> {
        store::api_keys_of(&self.db, user_id, with_revoked).await
    }

    /// Revokes `user_id`'s key `key_id`; it stops working at once everywhere.
    pub async fn revoke_api_key(&self, user_id: &str, key_id: &str) -> Result<(), AuthError> {
        if uuid::Uuid::parse_str(key_id).is_err() {
            return Err(AuthError::field("key_id", "must be a key id from ListApiKeys"));
        }
        let now = unix_now();
        let event = ApiKeyRevokedEvent {
            user_id: user_id.to_owned(),
            key_id: key_id.to_owned(),
            time: timestamp(now),
        };
        let event = OutboxEvent::new("plinth.auth.api_key_revoked", user_id, &event);
        if !store::revoke_api_key(&self.db, user_id, key_id, now, &event).await? {
            return Err(AuthError::ApiKeyNotFound);
        }
        self.revocations
            .revoke_api_key(key_id)
            .await
            .map_err(AuthError::Revocation)?;
        self.committed();
        tracing::info!(user_id, key_id, "api key revoked");
        Ok(())
    }

    /// The grant of an API key secret, `None` for anything not a live key of
    /// an active user. The digest comparison is constant-time.
    pub async fn validate_api_key(&self, key: &str) -> Result<Option<ApiKeyGrant>, AuthError> {
        let Some(lookup) = key
            .strip_prefix(API_KEY_PREFIX)
            .and_then(|rest| rest.split_once('_'))
            .map(|(lookup, _)| lookup)
            .filter(|l| l.len() == 16 && l.bytes().all(|b| b.is_ascii_hexdigit()))
        else {
            return Ok(None);
        };
        let Some(row) = store::api_key_by_lookup(&self.db, lookup).await? else {
            return Ok(None);
        };
        let now = unix_now();
        let tag = URL_SAFE_NO_PAD.decode(&row.digest).unwrap_or_default();
        if ring::hmac::verify(&self.api_key_hmac, key.as_bytes(), &tag).is_err()
            || row.revoked_at.is_some()
            || row.expires_at.is_some_and(|at| at <= now)
        {
            return Ok(None);
        }
        let Some(user) = store::user_by_id(&self.db, &row.user_id).await? else {
            return Ok(None);
        };
        if user.status != "active" {
            return Ok(None);
        }
        store::touch_api_key(&self.db, &row.id, now).await?;
        Ok(Some(ApiKeyGrant {
            scopes: row.scope_list(),
            key_id: row.id,
            subject: row.user_id,
            permissions: self.rbac.token_permissions(&user.role_list()),
            roles: user.role_list(),
            tenant: user.tenant.clone(),
            expires_at: row.expires_at.unwrap_or(0),
        }))
    }

    /// RFC 7662 introspection of an access token or an API key.
    pub async fn introspect(&self, token: &str) -> Result<Introspection, AuthError> {
        if token.starts_with(API_KEY_PREFIX) {
            return Ok(match self.validate_api_key(token).await? {
                Some(g) if self.revocations.check_api_key(&g.key_id).await.is_ok() => Introspection {
                    active: true,
                    token_type: "api_key",
                    subject: g.subject,
                    scopes: g.scopes,
                    expires_at: g.expires_at,
                    client_id: g.key_id,
                    roles: g.roles,
                    permissions: g.permissions,
                    tenant: g.tenant,
                },
                _ => Introspection::default(),
            });
        }
        let expect = Expectations {
            issuer: self.settings.issuer.clone(),
            audience: self.settings.audience.clone(),
            leeway_secs: 30,
        };
        let ring = self.keys.current();
        let verified = match jwt::verify(token, ring.keyset(), &expect, unix_now()) {
            Ok(c) => self.revocations.check(&c).await.map(|()| c).ok(),
            Err(_) => None,
        };
        Ok(match verified {
            Some(c) => Introspection {
                active: true,
                token_type: "access_token",
                subject: c.sub,
                scopes: Vec::new(),
                expires_at: c.exp,
                client_id: c.sid,
                roles: c.roles,
                permissions: c.perms,
                tenant: c.tenant,
            },
            None => Introspection::default(),
        })
    }

    /// Changes `user_id`'s password after checking `current`; every session
    /// and token of the user ends.
    pub async fn change_password(&self, user_id: &str, current: String, new: String) -> Result<(), AuthError> {
        let user = self.user(user_id).await?;
        // Guessing the current password with a stolen token counts as login attempts.
        self.throttle.reserve(&user.email, None).await.map_err(|(e, _)| e)?;
        if !self.hasher.verify(current, Some(user.password_hash.clone())).await? {
            return Err(AuthError::field("current_password", "is not the current password"));
        }
        self.throttle.succeeded(&user.email, None).await;
        check_policy(&new, &user.email).map_err(|e| rename_field(e, "password", "new_password"))?;
        let hash = self.hasher.hash(new).await?;
        let now = unix_now();
        let event = PasswordChangedEvent {
            user_id: user.id.clone(),
            how: "CHANGE".into(),
            time: timestamp(now),
        };
        store::update_password(
            &self.db,
            &user.id,
            &hash,
            now,
            Some(&OutboxEvent::new("plinth.auth.password_changed", &user.id, &event)),
        )
        .await?;
        self.revoke_all_sessions(&user.id).await?;
        tracing::info!(user_id = %user.id, "password changed");
        Ok(())
    }

    /// Emits a single-use reset token for the user named by `who`, if there
    /// is an active one, for delivery to that address or number; the caller
    /// learns nothing either way.
    pub async fn request_password_reset(&self, who: &Identifier) -> Result<(), AuthError> {
        let Some(user) = store::user_by(&self.db, who).await? else {
            return Ok(());
        };
        if user.status != "active" {
            return Ok(());
        }
        if !self.throttle.allow_reset(who.key()).await? {
            tracing::warn!(user_id = %user.id, "password reset not sent: too many requests for this account");
            return Ok(());
        }
        let token = format!("{RESET_PREFIX}{}", URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>()));
        let now = unix_now();
        let expires_at = now + RESET_TTL_SECS;
        let event = PasswordResetRequestedEvent {
            user_id: user.id.clone(),
            email: who.email().to_owned(),
            phone: who.phone().to_owned(),
            token: token.clone(),
            expire_time: timestamp(expires_at),
            time: timestamp(now),
        };
        store::insert_reset(
            &self.db,
            &digest(&token),
            &user.id,
            now,
            expires_at,
            &OutboxEvent::new("plinth.auth.password_reset_requested", &user.id, &event),
        )
        .await?;
        self.committed();
        tracing::info!(user_id = %user.id, "password reset requested");
        Ok(())
    }

    /// Sets a new password with a reset token and spends the token.
    pub async fn reset_password(&self, token: &str, new: String) -> Result<(), AuthError> {
        let invalid = || AuthError::field("token", "is invalid, expired or already used");
        if !token.starts_with(RESET_PREFIX) {
            return Err(invalid());
        }
        let key = digest(token);
        let user_id = store::reset_user(&self.db, &key, unix_now())
            .await?
            .ok_or_else(invalid)?;
        let user = self.user(&user_id).await?;
        check_policy(&new, &user.email).map_err(|e| rename_field(e, "password", "new_password"))?;
        let hash = self.hasher.hash(new).await?;
        let now = unix_now();
        let event = PasswordChangedEvent {
            user_id: user.id.clone(),
            how: "RESET".into(),
            time: timestamp(now),
        };
        let event = OutboxEvent::new("plinth.auth.password_changed", &user.id, &event);
        if !store::spend_reset(&self.db, &key, &user.id, &hash, now, &event).await? {
            return Err(invalid());
        }
        self.revoke_all_sessions(&user.id).await?;
        tracing::info!(user_id = %user.id, "password reset");
        Ok(())
    }

    /// The stored form of `roles` (default viewer), once `caller` is
    /// allowed to hand each of them out.
    fn roles_of(&self, caller: &Principal, roles: &[String]) -> Result<String, AuthError> {
        self.rbac.check_grantable(caller, roles, "roles")?;
        let mut unique: Vec<&str> = Vec::new();
        for role in roles {
            if !unique.contains(&role.as_str()) {
                unique.push(role);
            }
        }
        Ok(if unique.is_empty() {
            DEFAULT_ROLE.to_owned()
        } else {
            unique.join(",")
        })
    }

    /// An administrator creates a user with `roles`.
    pub async fn admin_create_user(
        &self,
        caller: &Principal,
        who: &NewAccount<'_>,
        password: String,
        display_name: &str,
        roles: &[String],
    ) -> Result<UserRow, AuthError> {
        let (email, phone) = identifiers(who.email, who.phone)?;
        let tenant = tenant_of(who.tenant, "tenant")?;
        let roles = self.roles_of(caller, roles)?;
        check_policy(&password, if email.is_empty() { &phone } else { &email })?;
        let who = NewUser { email, phone, tenant };
        self.create_user(who, password, display_name.trim(), &roles).await
    }

    /// A page of users, oldest first.
    pub async fn list_users(
        &self,
        tenant: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<UserRow>, String), AuthError> {
        let tenant = tenant_of(tenant, "tenant")?;
        let size: usize = match page_size {
            0 => 50,
            1..=100 => usize::try_from(page_size).unwrap_or(50),
            _ => return Err(AuthError::field("page_size", "must be between 0 and 100")),
        };
        if !page_token.is_empty() && uuid::Uuid::parse_str(page_token).is_err() {
            return Err(AuthError::field(
                "page_token",
                "is not a token from a previous response",
            ));
        }
        let after = (!page_token.is_empty()).then_some(page_token);
        let mut rows = store::list_users(&self.db, &tenant, after, i64::try_from(size + 1).unwrap_or(101)).await?;
        let next = if rows.len() > size {
            rows.truncate(size);
            rows.last().map(|r| r.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok((rows, next))
    }

    /// An administrator changes a user. Any status but active ends the
    /// user's sessions and revokes their API keys at once.
    pub async fn update_user(
        &self,
        caller: &Principal,
        user_id: &str,
        display_name: Option<&str>,
        roles: Option<&[String]>,
        status: Option<&str>,
        contact: (Option<&str>, Option<&str>),
    ) -> Result<UserRow, AuthError> {
        if uuid::Uuid::parse_str(user_id).is_err() {
            return Err(AuthError::field("user.id", "must be a user id"));
        }
        let mut change = UserChange::default();
        let mut fields = Vec::new();
        let (email, phone) = contact;
        if let Some(email) = email {
            change.email = Some(match email.trim() {
                "" => String::new(),
                e => email_of(e).map_err(|e| rename_field(e, "email", "user.email"))?,
            });
            fields.push("email".to_owned());
        }
        if let Some(phone) = phone {
            change.phone = Some(match phone.trim() {
                "" => String::new(),
                p => phone_of(p).map_err(|e| rename_field(e, "phone", "user.phone"))?,
            });
            fields.push("phone".to_owned());
        }
        if let Some(name) = display_name {
            if name.chars().count() > 200 {
                return Err(AuthError::field("user.display_name", "at most 200 characters"));
            }
            change.display_name = Some(name.trim().to_owned());
            fields.push("display_name".to_owned());
        }
        if let Some(roles) = roles {
            // Nobody changes the roles of someone above them.
            let current = self.visible_user(user_id).await?.role_list();
            self.rbac.check_grantable(caller, &current, "user.roles")?;
            change.roles = Some(
                self.roles_of(caller, roles)
                    .map_err(|e| rename_field(e, "roles", "user.roles"))?,
            );
            fields.push("roles".to_owned());
        }
        if let Some(status) = status {
            if !STATUSES.contains(&status) && status != "deleted" {
                return Err(AuthError::field("user.status", "must be ACTIVE, DISABLED or LOCKED"));
            }
            if caller.subject == user_id && status != "active" {
                return Err(AuthError::field(
                    "user.status",
                    "you cannot disable, lock or delete yourself",
                ));
            }
            change.status = Some(status.to_owned());
            fields.push("status".to_owned());
        }
        if fields.is_empty() {
            return Err(AuthError::field(
                "update_mask",
                "names no field to change (display_name, roles, status, email, phone)",
            ));
        }
        let now = unix_now();
        let event = UserUpdatedEvent {
            user_id: user_id.to_owned(),
            actor_id: caller.subject.clone(),
            fields,
            status: change.status.clone().unwrap_or_default(),
            time: timestamp(now),
        };
        let event = OutboxEvent::new("plinth.auth.user_updated", user_id, &event);
        let user = store::update_user(&self.db, user_id, &change, now, &event)
            .await?
            .ok_or(AuthError::UserNotFound)?;
        self.committed();
        if user.status != "active" {
            self.revoke_all_sessions(user_id).await?;
            for key_id in store::revoke_all_api_keys(&self.db, user_id, now).await? {
                self.revocations
                    .revoke_api_key(&key_id)
                    .await
                    .map_err(AuthError::Revocation)?;
            }
        } else if change.roles.is_some() {
            // Tokens carry what roles grant: make them refresh now, not at expiry.
            self.rbac.expire_tokens(user_id).await?;
        }
        self.rbac.sync().await?;
        tracing::info!(user_id, actor = %caller.subject, status = %user.status, "user updated");
        Ok(user)
    }

    /// Creates a service account with `roles` (default `service`); returns it
    /// and its client secret, shown once.
    pub async fn create_service_account(
        &self,
        caller: &Principal,
        display_name: &str,
        roles: &[String],
        tenant: &str,
    ) -> Result<(ServiceAccountRow, String), AuthError> {
        let tenant = tenant_of(tenant, "tenant")?;
        let name = display_name.trim();
        if name.is_empty() || name.chars().count() > MAX_KEY_NAME {
            return Err(AuthError::field("display_name", "must be 1 to 100 characters"));
        }
        let roles = if roles.is_empty() {
            self.rbac.check_grantable(caller, &["service".to_owned()], "roles")?;
            "service".to_owned()
        } else {
            self.roles_of(caller, roles)?
        };
        let secret = format!(
            "{SERVICE_SECRET_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
        );
        let row = ServiceAccountRow {
            id: uuid::Uuid::now_v7().to_string(),
            display_name: name.to_owned(),
            roles,
            secret_digest: self.key_digest(&secret),
            created_at: unix_now(),
            deleted_at: None,
            tenant,
        };
        store::insert_service_account(&self.db, &row).await?;
        tracing::info!(service_account = %row.id, roles = %row.roles, "service account created");
        Ok((row, secret))
    }

    /// Service accounts not deleted.
    pub async fn service_accounts(&self) -> Result<Vec<ServiceAccountRow>, AuthError> {
        store::service_accounts(&self.db).await
    }

    /// Deletes a service account; its tokens stop at once.
    pub async fn delete_service_account(&self, id: &str) -> Result<(), AuthError> {
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(AuthError::field("service_account_id", "must be a service account id"));
        }
        let lifetime = std::time::Duration::from_secs(self.settings.access_ttl_secs);
        // Deny first: if that fails the account is still there to retry.
        self.revocations
            .revoke_subject(id, lifetime)
            .await
            .map_err(AuthError::Revocation)?;
        if !store::delete_service_account(&self.db, id, unix_now()).await? {
            return Err(AuthError::ServiceAccountNotFound);
        }
        self.rbac.sync().await?;
        tracing::info!(service_account = %id, "service account deleted");
        Ok(())
    }

    /// The client-credentials grant: an access token for a live service
    /// account whose secret matches (compared in constant time).
    pub async fn issue_service_token(&self, client_id: &str, secret: &str) -> Result<(String, i64), AuthError> {
        let account = match uuid::Uuid::parse_str(client_id) {
            Ok(_) => store::service_account(&self.db, client_id).await?,
            Err(_) => None,
        };
        let Some(account) = account.filter(|a| a.deleted_at.is_none()) else {
            return Err(AuthError::BadClientCredentials);
        };
        let tag = URL_SAFE_NO_PAD.decode(&account.secret_digest).unwrap_or_default();
        if ring::hmac::verify(&self.api_key_hmac, secret.as_bytes(), &tag).is_err() {
            return Err(AuthError::BadClientCredentials);
        }
        let now = unix_now();
        let ttl = secs(self.settings.access_ttl_secs);
        let claims = Claims {
            iss: self.settings.issuer.clone(),
            sub: account.id.clone(),
            aud: self.settings.audience.clone(),
            exp: now.saturating_add(ttl),
            iat: now,
            nbf: now,
            jti: uuid::Uuid::now_v7().to_string(),
            sid: String::new(),
            perms: self.rbac.token_permissions(&account.role_list()),
            roles: account.role_list(),
            tenant: account.tenant.clone(),
        };
        Ok((self.sign(&claims), ttl))
    }

    /// The user with `id`, unless deleted (for administrators).
    pub async fn visible_user(&self, id: &str) -> Result<UserRow, AuthError> {
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(AuthError::field("user_id", "must be a user id"));
        }
        match self.user(id).await? {
            u if u.status == "deleted" => Err(AuthError::UserNotFound),
            u => Ok(u),
        }
    }

    /// The user with `id`.
    pub async fn user(&self, id: &str) -> Result<UserRow, AuthError> {
        store::user_by_id(&self.db, id).await?.ok_or(AuthError::UserNotFound)
    }
}

/// The same violations, reported under another field name.
fn rename_field(e: AuthError, from: &str, to: &str) -> AuthError {
    match e {
        AuthError::Invalid(mut v) => {
            for f in &mut v {
                if f.field == from {
                    f.field = to.to_owned();
                }
            }
            AuthError::Invalid(v)
        }
        other => other,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[async_trait::async_trait]
impl plinth_runtime::auth::ApiKeySource for Auth {
    async fn validate(&self, key: &str) -> Result<Option<ApiKeyGrant>, String> {
        self.validate_api_key(key).await.map_err(|e| e.to_string())
    }
}

#[async_trait::async_trait]
impl plinth_runtime::auth::JwksSource for Auth {
    async fn fetch(&self) -> Result<Vec<Jwk>, String> {
        Ok(self.jwks())
    }
}
