//! SQL for the auth service, one text per statement for both backends
//! (`$n` placeholders work on SQLite and PostgreSQL). Each function is one
//! transaction that writes what it is given, including its outbox event.

use plinth_runtime::crypto::Sealed;
use plinth_runtime::events::outbox::OutboxEvent;
use plinth_runtime::on_db;
use plinth_runtime::storage::{BeginWrite, Db};

use crate::AuthError;

/// A stored user.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    pub id: String,
    /// "" when the user has none (stored as NULL).
    pub email: String,
    /// E.164, "" when the user has none (stored as NULL).
    pub phone: String,
    pub password_hash: String,
    pub display_name: String,
    pub status: String,
    pub roles: String,
    pub created_at: i64,
    /// "" for none.
    pub tenant: String,
}

impl UserRow {
    pub fn role_list(&self) -> Vec<String> {
        split_roles(&self.roles)
    }
}

/// Roles are stored comma-separated.
fn split_roles(roles: &str) -> Vec<String> {
    roles.split(',').filter(|r| !r.is_empty()).map(str::to_owned).collect()
}

const USER_COLUMNS: &str = "id, COALESCE(email, '') AS email, COALESCE(phone, '') AS phone, password_hash, \
                            display_name, status, roles, created_at, tenant";

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// Inserts `user` with its event; `EmailTaken` or `PhoneTaken` when another
/// user has that email or phone number.
pub async fn insert_user(db: &Db, user: &UserRow, event: &OutboxEvent) -> Result<(), AuthError> {
    let result: Result<(), sqlx::Error> = on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        sqlx::query(
            "INSERT INTO users (id, email, phone, password_hash, display_name, status, roles, created_at, updated_at, \
             tenant) VALUES ($1, NULLIF($2, ''), NULLIF($8, ''), $3, $4, $5, $6, $7, $7, $9)",
        )
        .bind(&user.id)
        .bind(&user.email)
        .bind(&user.password_hash)
        .bind(&user.display_name)
        .bind(&user.status)
        .bind(&user.roles)
        .bind(user.created_at)
        .bind(&user.phone)
        .bind(&user.tenant)
        .execute(&mut *tx)
        .await?;
        event
            .write(&mut *tx)
            .await
            .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        tx.commit().await
    }
    .await);
    match result {
        Err(e) if is_unique_violation(&e) => Err(if names_phone(&e) {
            AuthError::PhoneTaken
        } else {
            AuthError::EmailTaken
        }),
        other => Ok(other?),
    }
}

/// Whether a unique violation is about the phone column (SQLite names the
/// column in its message, PostgreSQL the constraint).
fn names_phone(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d)
        if d.message().contains("phone") || d.constraint().is_some_and(|c| c.contains("phone")))
}

/// The user with this email or phone number.
pub async fn user_by(db: &Db, who: &crate::identity::Identifier) -> Result<Option<UserRow>, AuthError> {
    match who {
        crate::identity::Identifier::Email(e) => user_where(db, "email", e).await,
        crate::identity::Identifier::Phone(p) => user_where(db, "phone", p).await,
    }
}

pub async fn user_by_id(db: &Db, id: &str) -> Result<Option<UserRow>, AuthError> {
    user_where(db, "id", id).await
}

/// The user whose unique `column` equals `value`.
async fn user_where(db: &Db, column: &'static str, value: &str) -> Result<Option<UserRow>, AuthError> {
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE {column} = $1");
    Ok(on_db!(db, |pool| sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
        .bind(value)
        .fetch_optional(pool)
        .await)?)
}

/// Whether any user holds the `admin` role.
pub async fn any_admin(db: &Db) -> Result<bool, AuthError> {
    let sql = "SELECT count(*) FROM users WHERE (',' || roles || ',') LIKE '%,admin,%'";
    let (n,): (i64,) = on_db!(db, |pool| sqlx::query_as(sql).fetch_one(pool).await)?;
    Ok(n > 0)
}

/// Writes an event alone (e.g. a failed login, which changes no row).
pub async fn record(db: &Db, event: &OutboxEvent) -> Result<(), AuthError> {
    on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        event.write(&mut *tx).await?;
        tx.commit().await?;
        Ok::<(), AuthError>(())
    }
    .await)
}

/// A new session.
pub struct NewSession<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub now: i64,
    pub expires_at: i64,
    pub refresh_digest: &'a str,
}

/// Opens a session with its first refresh token.
pub async fn create_session(db: &Db, s: &NewSession<'_>, event: &OutboxEvent) -> Result<(), AuthError> {
    on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        sqlx::query("INSERT INTO sessions (id, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(s.id)
            .bind(s.user_id)
            .bind(s.now)
            .bind(s.expires_at)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO refresh_tokens (digest, session_id, created_at, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(s.refresh_digest)
            .bind(s.id)
            .bind(s.now)
            .bind(s.expires_at)
            .execute(&mut *tx)
            .await?;
        event.write(&mut *tx).await?;
        tx.commit().await?;
        Ok::<(), AuthError>(())
    }
    .await)
}

/// A presented refresh token and its session: (session id, token expiry,
/// used at, user id, session revoked at, session expiry).
type PresentedToken = (String, i64, Option<i64>, String, Option<i64>, i64);

/// What presenting a refresh token led to.
pub enum Rotation {
    /// A new token was stored for the session of `user_id`.
    Rotated { session_id: String, user_id: String },
    /// The token was used before, outside the grace window: the session is now revoked.
    Reused { session_id: String, user_id: String },
}

/// Uses up the token with `digest` and stores `next_digest` in its session.
/// A token used within `grace_secs` yields a sibling instead (concurrent
/// tabs); used earlier than that, it revokes the session and writes `revoked`.
pub async fn rotate_refresh(
    db: &Db,
    digest: &str,
    next_digest: &str,
    now: i64,
    grace_secs: i64,
    revoked: impl Fn(&str, &str) -> OutboxEvent,
    refreshed: impl Fn(&str, &str, bool) -> OutboxEvent,
) -> Result<Rotation, AuthError> {
    on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        // Write first: it takes the write lock before anything is read, so two
        // presentations of one token serialise here on both backends.
        let claimed = sqlx::query("UPDATE refresh_tokens SET used_at = $2 WHERE digest = $1 AND used_at IS NULL")
            .bind(digest)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let row: Option<PresentedToken> = sqlx::query_as(
            "SELECT r.session_id, r.expires_at, r.used_at, s.user_id, s.revoked_at, s.expires_at \
             FROM refresh_tokens r JOIN sessions s ON s.id = r.session_id WHERE r.digest = $1",
        )
        .bind(digest)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((session_id, expires_at, used_at, user_id, revoked_at, session_expires)) = row else {
            return Err(AuthError::BadRefreshToken);
        };
        if revoked_at.is_some() || expires_at <= now || session_expires <= now {
            return Err(AuthError::BadRefreshToken);
        }
        let within_grace = used_at.is_some_and(|used| now - used <= grace_secs);
        if claimed == 1 || within_grace {
            sqlx::query(
                "INSERT INTO refresh_tokens (digest, session_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(next_digest)
            .bind(&session_id)
            .bind(now)
            .bind(session_expires)
            .execute(&mut *tx)
            .await?;
            refreshed(&user_id, &session_id, claimed != 1).write(&mut *tx).await?;
            tx.commit().await?;
            return Ok(Rotation::Rotated { session_id, user_id });
        }
        sqlx::query("UPDATE sessions SET revoked_at = $2, revoke_reason = 'REFRESH_TOKEN_REUSED' WHERE id = $1")
            .bind(&session_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        revoked(&user_id, &session_id).write(&mut *tx).await?;
        tx.commit().await?;
        Ok(Rotation::Reused { session_id, user_id })
    }
    .await)
}

/// Ends the session that `digest` belongs to; returns (session, user) when it was open.
pub async fn revoke_session_of(
    db: &Db,
    digest: &str,
    now: i64,
    revoked: impl Fn(&str, &str) -> OutboxEvent,
) -> Result<Option<EndedSession>, AuthError> {
    on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        let row: Option<(String, String, Option<i64>)> = sqlx::query_as(
            "SELECT s.id, s.user_id, s.revoked_at FROM refresh_tokens r JOIN sessions s ON s.id = r.session_id \
             WHERE r.digest = $1",
        )
        .bind(digest)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((session_id, user_id, revoked_at)) = row else {
            return Ok(None);
        };
        if revoked_at.is_some() {
            return Ok(Some(EndedSession { session_id, now: false }));
        }
        sqlx::query(
            "UPDATE sessions SET revoked_at = $2, revoke_reason = 'LOGOUT' WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(&session_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        revoked(&user_id, &session_id).write(&mut *tx).await?;
        tx.commit().await?;
        Ok(Some(EndedSession { session_id, now: true }))
    }
    .await)
}

/// The session a refresh token belongs to, as [`revoke_session_of`] left it.
pub struct EndedSession {
    /// The session.
    pub session_id: String,
    /// Whether this call ended it (false: it had ended before).
    pub now: bool,
}

/// Ends every open session of `user_id`; returns how many were open.
pub async fn revoke_all_sessions(db: &Db, user_id: &str, now: i64, event: &OutboxEvent) -> Result<u64, AuthError> {
    on_db!(db, |pool| {
        async {
        let mut tx = pool.begin_write().await?;
        let n = sqlx::query(
            "UPDATE sessions SET revoked_at = $2, revoke_reason = 'REVOKE_ALL' WHERE user_id = $1 AND revoked_at IS NULL",
        )
        .bind(user_id)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        event.write(&mut *tx).await?;
        tx.commit().await?;
        Ok::<u64, AuthError>(n)
    }
    .await
    })
}

/// A session as listed: (id, created_at, expires_at).
pub type SessionRow = (String, i64, i64);

/// `user_id`'s open sessions, newest first, after `before` (a session id) when given.
pub async fn open_sessions(
    db: &Db,
    user_id: &str,
    now: i64,
    before: Option<&str>,
    limit: i64,
) -> Result<Vec<SessionRow>, AuthError> {
    let sql = "SELECT id, created_at, expires_at FROM sessions \
               WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 AND ($3 IS NULL OR id < $3) \
               ORDER BY id DESC LIMIT $4";
    Ok(on_db!(db, |pool| sqlx::query_as(sql)
        .bind(user_id)
        .bind(now)
        .bind(before)
        .bind(limit)
        .fetch_all(pool)
        .await)?)
}

/// Ends session `session_id` if it is `user_id`'s and open; true when it was.
pub async fn revoke_session(
    db: &Db,
    user_id: &str,
    session_id: &str,
    now: i64,
    event: &OutboxEvent,
) -> Result<bool, AuthError> {
    on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        let n = sqlx::query(
            "UPDATE sessions SET revoked_at = $3, revoke_reason = 'REVOKED' \
             WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
        )
        .bind(session_id)
        .bind(user_id)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        event.write(&mut *tx).await?;
        tx.commit().await?;
        Ok::<bool, AuthError>(true)
    }
    .await)
}

/// A stored signing key.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SigningKeyRow {
    pub kid: String,
    /// The seed in clear; empty when it is sealed.
    pub seed: Vec<u8>,
    /// The seed sealed under `kek_id` (`PLINTH_AUTH__KEYS`).
    pub sealed_seed: Option<Vec<u8>>,
    pub wrapped_key: Option<Vec<u8>>,
    pub kek_id: Option<String>,
    pub created_at: i64,
    pub activates_at: i64,
    pub retired_at: Option<i64>,
}

/// The insert of signing key `$kid` with its `StoredSeed`, created at
/// `$now`, signing from `$activates_at`; a macro so that one text serves
/// both backends inside [`on_db!`] and a transaction.
macro_rules! insert_key_query {
    ($kid:expr, $seed:expr, $now:expr, $activates_at:expr) => {{
        let seed: &StoredSeed = $seed;
        sqlx::query(
            "INSERT INTO signing_keys (kid, seed, sealed_seed, wrapped_key, kek_id, created_at, activates_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind($kid)
        .bind(seed.clear())
        .bind(seed.sealed().map(|s| &s.ciphertext))
        .bind(seed.sealed().map(|s| &s.wrapped_key))
        .bind(seed.sealed().map(|s| &s.kek_id))
        .bind($now)
        .bind($activates_at)
    }};
}

/// Every signing key (a handful; the ring filters what is published).
pub async fn signing_key_rows(db: &Db) -> Result<Vec<SigningKeyRow>, AuthError> {
    let sql =
        "SELECT kid, seed, sealed_seed, wrapped_key, kek_id, created_at, activates_at, retired_at FROM signing_keys";
    Ok(on_db!(db, |pool| sqlx::query_as(sql).fetch_all(pool).await)?)
}

/// Adds a key that signs from `activates_at` and retires the others at that
/// moment, with its event. With `unless_newer_than`, does nothing (false) when
/// a key was created after that time (another replica rotated already).
pub async fn rotate_key(
    db: &Db,
    kid: &str,
    seed: &StoredSeed,
    now: i64,
    activates_at: i64,
    unless_newer_than: Option<i64>,
    event: &OutboxEvent,
) -> Result<bool, AuthError> {
    on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        if let Some(since) = unless_newer_than {
            let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM signing_keys WHERE created_at > $1")
                .bind(since)
                .fetch_one(&mut *tx)
                .await?;
            if n > 0 {
                return Ok::<bool, AuthError>(false);
            }
        }
        sqlx::query("UPDATE signing_keys SET retired_at = $1 WHERE retired_at IS NULL")
            .bind(activates_at)
            .execute(&mut *tx)
            .await?;
        insert_key_query!(kid, seed, now, activates_at)
            .execute(&mut *tx)
            .await?;
        event.write(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }
    .await)
}

/// Adds the first key of a deployment, signing at once.
pub async fn insert_key(db: &Db, kid: &str, seed: &StoredSeed, now: i64) -> Result<(), AuthError> {
    on_db!(db, |pool| insert_key_query!(kid, seed, now, now)
        .execute(pool)
        .await
        .map(drop))?;
    Ok(())
}

/// A signing key's seed as it is written: sealed when the deployment has a
/// key encryption key, else in clear.
pub enum StoredSeed {
    /// In clear (no `PLINTH_AUTH__KEYS`).
    Clear(Vec<u8>),
    /// Sealed.
    Sealed(Sealed),
}

impl StoredSeed {
    /// The `seed` column: empty when sealed.
    fn clear(&self) -> &[u8] {
        match self {
            StoredSeed::Clear(seed) => seed,
            StoredSeed::Sealed(_) => &[],
        }
    }

    fn sealed(&self) -> Option<&Sealed> {
        match self {
            StoredSeed::Clear(_) => None,
            StoredSeed::Sealed(s) => Some(s),
        }
    }
}

/// Replaces key `kid`'s seed in clear with `sealed`; false when it was
/// sealed already (another replica got there first).
pub async fn seal_key(db: &Db, kid: &str, sealed: &Sealed) -> Result<bool, AuthError> {
    let sql = "UPDATE signing_keys SET seed = $2, sealed_seed = $3, wrapped_key = $4, kek_id = $5 \
               WHERE kid = $1 AND kek_id IS NULL";
    let empty: &[u8] = &[];
    let n = on_db!(db, |pool| sqlx::query(sql)
        .bind(kid)
        .bind(empty)
        .bind(&sealed.ciphertext)
        .bind(&sealed.wrapped_key)
        .bind(&sealed.kek_id)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(n > 0)
}

/// A stored API key (never its secret).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyRow {
    pub id: String,
    pub user_id: String,
    pub lookup: String,
    pub digest: String,
    pub display_name: String,
    pub scopes: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl ApiKeyRow {
    pub fn scope_list(&self) -> Vec<String> {
        self.scopes.split_whitespace().map(str::to_owned).collect()
    }
}

const API_KEY_COLUMNS: &str =
    "id, user_id, lookup, digest, display_name, scopes, created_at, expires_at, last_used_at, revoked_at";

/// The server secret API key digests are keyed with, created on first use.
/// Two replicas starting at once both try; the loser reads the winner's.
pub async fn hmac_secret(db: &Db, fresh: &[u8], now: i64) -> Result<Vec<u8>, AuthError> {
    let insert =
        "INSERT INTO hmac_keys (id, secret, created_at) VALUES ('api-keys', $1, $2) ON CONFLICT (id) DO NOTHING";
    on_db!(db, |pool| sqlx::query(insert)
        .bind(fresh)
        .bind(now)
        .execute(pool)
        .await
        .map(drop))?;
    let select = "SELECT secret FROM hmac_keys WHERE id = 'api-keys'";
    let (secret,): (Vec<u8>,) = on_db!(db, |pool| sqlx::query_as(select).fetch_one(pool).await)?;
    Ok(secret)
}

/// Inserts `key` with its event.
pub async fn insert_api_key(db: &Db, key: &ApiKeyRow, event: &OutboxEvent) -> Result<(), AuthError> {
    on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        sqlx::query(
            "INSERT INTO api_keys (id, user_id, lookup, digest, display_name, scopes, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&key.id)
        .bind(&key.user_id)
        .bind(&key.lookup)
        .bind(&key.digest)
        .bind(&key.display_name)
        .bind(&key.scopes)
        .bind(key.created_at)
        .bind(key.expires_at)
        .execute(&mut *tx)
        .await?;
        event.write(&mut *tx).await?;
        tx.commit().await?;
        Ok::<(), AuthError>(())
    }
    .await)
}

/// The key whose lookup id is `lookup`.
pub async fn api_key_by_lookup(db: &Db, lookup: &str) -> Result<Option<ApiKeyRow>, AuthError> {
    let sql = format!("SELECT {API_KEY_COLUMNS} FROM api_keys WHERE lookup = $1");
    Ok(on_db!(db, |pool| sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
        .bind(lookup)
        .fetch_optional(pool)
        .await)?)
}

/// `user_id`'s keys, newest first.
pub async fn api_keys_of(db: &Db, user_id: &str, with_revoked: bool) -> Result<Vec<ApiKeyRow>, AuthError> {
    let filter = if with_revoked { "" } else { " AND revoked_at IS NULL" };
    let sql = format!("SELECT {API_KEY_COLUMNS} FROM api_keys WHERE user_id = $1{filter} ORDER BY id DESC");
    Ok(on_db!(db, |pool| sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
        .bind(user_id)
        .fetch_all(pool)
        .await)?)
}

/// Marks `user_id`'s key `key_id` revoked with its event; false when no
/// such active key is theirs.
pub async fn revoke_api_key(
    db: &Db,
    user_id: &str,
    key_id: &str,
    now: i64,
    event: &OutboxEvent,
) -> Result<bool, AuthError> {
    on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL")
                .bind(now)
                .bind(key_id)
                .bind(user_id)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
        if done {
            event.write(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok::<bool, AuthError>(done)
    }
    .await)
}

/// Records a use of `key_id` unless one was recorded in the last minute.
pub async fn touch_api_key(db: &Db, key_id: &str, now: i64) -> Result<(), AuthError> {
    let sql = "UPDATE api_keys SET last_used_at = $1 WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $3)";
    on_db!(db, |pool| sqlx::query(sql)
        .bind(now)
        .bind(key_id)
        .bind(now - 60)
        .execute(pool)
        .await
        .map(drop))?;
    Ok(())
}

const SET_PASSWORD: &str = "UPDATE users SET password_hash = $1, updated_at = $2 WHERE id = $3";

/// Sets `user_id`'s password hash, with its event when the change is one
/// (none for a rehash with current parameters: nothing about the account changed).
pub async fn update_password(
    db: &Db,
    user_id: &str,
    hash: &str,
    now: i64,
    event: Option<&OutboxEvent>,
) -> Result<(), AuthError> {
    on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        sqlx::query(SET_PASSWORD)
            .bind(hash)
            .bind(now)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        if let Some(event) = event {
            event.write(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok::<(), AuthError>(())
    }
    .await)
}

/// Stores a reset token digest, with the event that carries the token.
pub async fn insert_reset(
    db: &Db,
    digest: &str,
    user_id: &str,
    now: i64,
    expires_at: i64,
    event: &OutboxEvent,
) -> Result<(), AuthError> {
    on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        sqlx::query("INSERT INTO password_resets (digest, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(digest)
            .bind(user_id)
            .bind(now)
            .bind(expires_at)
            .execute(&mut *tx)
            .await?;
        event.write(&mut *tx).await?;
        tx.commit().await?;
        Ok::<(), AuthError>(())
    }
    .await)
}

/// The user of a usable (unspent, unexpired) reset token.
pub async fn reset_user(db: &Db, digest: &str, now: i64) -> Result<Option<String>, AuthError> {
    let sql = "SELECT user_id FROM password_resets WHERE digest = $1 AND used_at IS NULL AND expires_at > $2";
    let row: Option<(String,)> = on_db!(db, |pool| sqlx::query_as(sql)
        .bind(digest)
        .bind(now)
        .fetch_optional(pool)
        .await)?;
    Ok(row.map(|r| r.0))
}

/// Spends the reset token and sets the password in one transaction; false
/// when the token was spent (or expired) meanwhile.
pub async fn spend_reset(
    db: &Db,
    digest: &str,
    user_id: &str,
    hash: &str,
    now: i64,
    event: &OutboxEvent,
) -> Result<bool, AuthError> {
    on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        let spent = sqlx::query(
            "UPDATE password_resets SET used_at = $1 WHERE digest = $2 AND user_id = $3 AND used_at IS NULL \
             AND expires_at > $1",
        )
        .bind(now)
        .bind(digest)
        .bind(user_id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !spent {
            return Ok::<bool, AuthError>(false);
        }
        sqlx::query(SET_PASSWORD)
            .bind(hash)
            .bind(now)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        event.write(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }
    .await)
}

/// A page of users that are not deleted, oldest first, after `after`.
pub async fn list_users(db: &Db, tenant: &str, after: Option<&str>, limit: i64) -> Result<Vec<UserRow>, AuthError> {
    let sql = format!(
        "SELECT {USER_COLUMNS} FROM users WHERE status <> 'deleted' AND ($3 = '' OR tenant = $3) AND id > $1 \
         ORDER BY id LIMIT $2"
    );
    Ok(on_db!(db, |pool| sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
        .bind(after.unwrap_or(""))
        .bind(limit)
        .bind(tenant)
        .fetch_all(pool)
        .await)?)
}

/// What an administrator changes of a user; `None` leaves a field as it is.
#[derive(Debug, Default)]
pub struct UserChange {
    pub display_name: Option<String>,
    pub roles: Option<String>,
    pub status: Option<String>,
    /// A new email; "" removes it.
    pub email: Option<String>,
    /// A new phone number; "" removes it.
    pub phone: Option<String>,
}

/// Applies `change` to `user_id` with its event; returns the user after, or
/// `None` when there is no such (undeleted) user.
pub async fn update_user(
    db: &Db,
    user_id: &str,
    change: &UserChange,
    now: i64,
    event: &OutboxEvent,
) -> Result<Option<UserRow>, AuthError> {
    let result: Result<Option<UserRow>, AuthError> = on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        // Roles and status decide what the user may do: a policy change.
        sqlx::query(crate::rbac::BUMP_VERSION).fetch_one(&mut *tx).await?;
        let updated = sqlx::query(
            "UPDATE users SET display_name = COALESCE($1, display_name), roles = COALESCE($2, roles), \
             status = COALESCE($3, status), updated_at = $4, \
             email = CASE WHEN $6 = 1 THEN NULLIF($7, '') ELSE email END, \
             phone = CASE WHEN $8 = 1 THEN NULLIF($9, '') ELSE phone END \
             WHERE id = $5 AND status <> 'deleted'",
        )
        .bind(change.display_name.as_deref())
        .bind(change.roles.as_deref())
        .bind(change.status.as_deref())
        .bind(now)
        .bind(user_id)
        .bind(i32::from(change.email.is_some()))
        .bind(change.email.as_deref().unwrap_or(""))
        .bind(i32::from(change.phone.is_some()))
        .bind(change.phone.as_deref().unwrap_or(""))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !updated {
            return Ok::<Option<UserRow>, AuthError>(None);
        }
        if change.roles.is_some() || change.status.is_some() {
            let (admins,): (i64,) = sqlx::query_as(crate::rbac::ACTIVE_ADMINS).fetch_one(&mut *tx).await?;
            if admins == 0 {
                return Err(AuthError::LastAdmin);
            }
        }
        event.write(&mut *tx).await?;
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1");
        let user: UserRow = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(user_id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(user))
    }
    .await);
    match result {
        Err(AuthError::Storage(plinth_runtime::storage::StorageError::Query(e))) => Err(identity_conflict(e)),
        other => other,
    }
}

/// An email/phone change that broke a constraint, as the caller's error.
fn identity_conflict(e: sqlx::Error) -> AuthError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            if names_phone(&e) {
                AuthError::PhoneTaken
            } else {
                AuthError::EmailTaken
            }
        }
        sqlx::Error::Database(d) if d.is_check_violation() => {
            AuthError::field("user.email", "a user keeps an email or a phone number")
        }
        _ => AuthError::from(e),
    }
}

/// Revokes every active API key of `user_id`; returns their ids.
pub async fn revoke_all_api_keys(db: &Db, user_id: &str, now: i64) -> Result<Vec<String>, AuthError> {
    on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        let ids: Vec<(String,)> = sqlx::query_as("SELECT id FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL")
            .bind(user_id)
            .fetch_all(&mut *tx)
            .await?;
        sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok::<Vec<String>, AuthError>(ids.into_iter().map(|r| r.0).collect())
    }
    .await)
}

/// A stored service account.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ServiceAccountRow {
    pub id: String,
    pub display_name: String,
    pub roles: String,
    pub secret_digest: String,
    pub created_at: i64,
    pub deleted_at: Option<i64>,
    /// "" for none.
    pub tenant: String,
}

impl ServiceAccountRow {
    pub fn role_list(&self) -> Vec<String> {
        split_roles(&self.roles)
    }
}

const SERVICE_ACCOUNT_COLUMNS: &str = "id, display_name, roles, secret_digest, created_at, deleted_at, tenant";

/// Inserts `account`.
pub async fn insert_service_account(db: &Db, account: &ServiceAccountRow) -> Result<(), AuthError> {
    let sql = "INSERT INTO service_accounts (id, display_name, roles, secret_digest, created_at, tenant) \
               VALUES ($1, $2, $3, $4, $5, $6)";
    on_db!(db, |pool| sqlx::query(sql)
        .bind(&account.id)
        .bind(&account.display_name)
        .bind(&account.roles)
        .bind(&account.secret_digest)
        .bind(account.created_at)
        .bind(&account.tenant)
        .execute(pool)
        .await
        .map(drop))?;
    Ok(())
}

/// The account with `id`, deleted or not.
pub async fn service_account(db: &Db, id: &str) -> Result<Option<ServiceAccountRow>, AuthError> {
    let sql = format!("SELECT {SERVICE_ACCOUNT_COLUMNS} FROM service_accounts WHERE id = $1");
    Ok(on_db!(db, |pool| sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
        .bind(id)
        .fetch_optional(pool)
        .await)?)
}

/// Accounts not deleted, oldest first.
pub async fn service_accounts(db: &Db) -> Result<Vec<ServiceAccountRow>, AuthError> {
    let sql = format!("SELECT {SERVICE_ACCOUNT_COLUMNS} FROM service_accounts WHERE deleted_at IS NULL ORDER BY id");
    Ok(on_db!(db, |pool| sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
        .fetch_all(pool)
        .await)?)
}

/// Marks `id` deleted (a policy change: it holds nothing any more); false
/// when there is no such live account.
pub async fn delete_service_account(db: &Db, id: &str, now: i64) -> Result<bool, AuthError> {
    let sql = "UPDATE service_accounts SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL";
    on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        sqlx::query(crate::rbac::BUMP_VERSION).fetch_one(&mut *tx).await?;
        let n = sqlx::query(sql)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 1 {
            sqlx::query("DELETE FROM role_bindings WHERE subject = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        Ok::<bool, AuthError>(n == 1)
    }
    .await)
}
