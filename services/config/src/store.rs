//! SQL for namespaces, environments, values, history, releases, schemas and
//! the active key id, written once for SQLite and PostgreSQL. Storage writes
//! what it is given: validation, encryption and schema checks happen before
//! a call reaches here; only the preconditions, which must be checked under
//! the environment's lock, are evaluated inside the write transaction.

use std::collections::HashMap;
use std::sync::Arc;

use plinth_runtime::events::outbox::OutboxEvent;
use plinth_runtime::on_db;
use plinth_runtime::storage::{BeginWrite, Db};

use crate::error::ConfigError;
use crate::model::{
    Batch, Entry, EnvId, Environment, KeyEvent, Namespace, Plain, Precondition, Release, RevisionInfo, RevisionKind,
    Rollout, RolloutState, Sealed, Stored, now_ms,
};

const VT_DELETED: i16 = 0;
const VT_STRING: i16 = 1;
const VT_NUMBER: i16 = 2;
const VT_BOOL: i16 = 3;
const VT_JSON: i16 = 4;
const VT_SECRET: i16 = 5;

/// A stored key row: key, value_type, value, wrapped_key, kek_id, version,
/// create_revision, mod_revision, updated_by, updated_at.
type ValueRow = (
    String,
    i16,
    Vec<u8>,
    Option<Vec<u8>>,
    Option<String>,
    i64,
    i64,
    i64,
    String,
    i64,
);

/// A history row: [`ValueRow`] whose `mod_revision` is the row's revision.
macro_rules! value_columns {
    () => {
        "key, value_type, value, wrapped_key, kek_id, version, create_revision, mod_revision, updated_by, updated_at"
    };
}
macro_rules! history_columns {
    () => {
        "key, value_type, value, wrapped_key, kek_id, version, create_revision, revision, updated_by, updated_at"
    };
}

/// A [`ValueRow`] of history with its revision's message.
type HistoryRow = (
    String,
    i16,
    Vec<u8>,
    Option<Vec<u8>>,
    Option<String>,
    i64,
    i64,
    i64,
    String,
    i64,
    String,
);
type NamespaceRow = (String, String, i64, i64, i64);
type EnvironmentRow = (String, String, String, i64, i64, i64, i64, i64, i64, String);
type RevisionRow = (i64, String, String, String, i64, i32, String);
type ReleaseRow = (String, i64, String, String, i64, i64);

macro_rules! env_columns {
    () => {
        "namespace, name, description, revision, compacted_revision, key_count, generation, created_at, updated_at, current_release"
    };
}

fn corrupt(what: impl Into<String>) -> ConfigError {
    ConfigError::Storage(plinth_runtime::storage::StorageError::Query(sqlx::Error::Protocol(
        what.into(),
    )))
}

fn encode(value: &Stored) -> (i16, Vec<u8>, Option<Vec<u8>>, Option<String>) {
    match value {
        Stored::Plain(Plain::String(s)) => (VT_STRING, s.as_bytes().to_vec(), None, None),
        Stored::Plain(Plain::Number(n)) => (VT_NUMBER, n.to_string().into_bytes(), None, None),
        Stored::Plain(Plain::Bool(b)) => (VT_BOOL, b.to_string().into_bytes(), None, None),
        Stored::Plain(Plain::Json(v)) => (VT_JSON, v.to_string().into_bytes(), None, None),
        Stored::Secret(s) => (
            VT_SECRET,
            s.ciphertext.clone(),
            Some(s.wrapped_key.clone()),
            Some(s.kek_id.clone()),
        ),
    }
}

fn decode(
    key: &str,
    vt: i16,
    value: Vec<u8>,
    wrapped: Option<Vec<u8>>,
    kek: Option<String>,
) -> Result<Stored, ConfigError> {
    let text = |v: Vec<u8>| String::from_utf8(v).map_err(|_| corrupt(format!("value of {key} is not UTF-8")));
    Ok(match vt {
        VT_STRING => Stored::Plain(Plain::String(text(value)?)),
        VT_NUMBER => Stored::Plain(Plain::Number(
            text(value)?
                .parse()
                .map_err(|_| corrupt(format!("number {key} does not parse")))?,
        )),
        VT_BOOL => Stored::Plain(Plain::Bool(text(value)? == "true")),
        VT_JSON => Stored::Plain(Plain::Json(
            serde_json::from_slice(&value).map_err(|_| corrupt(format!("json {key} does not parse")))?,
        )),
        VT_SECRET => Stored::Secret(Sealed {
            ciphertext: value,
            wrapped_key: wrapped.ok_or_else(|| corrupt(format!("secret {key} has no wrapped key")))?,
            kek_id: kek.ok_or_else(|| corrupt(format!("secret {key} has no key id")))?,
        }),
        other => return Err(corrupt(format!("value type {other} of {key}"))),
    })
}

/// A row as an entry; `None` for a delete marker.
fn entry(row: ValueRow) -> Result<Option<Entry>, ConfigError> {
    let (key, vt, value, wrapped, kek, version, create_revision, mod_revision, updated_by, updated_at) = row;
    if vt == VT_DELETED {
        return Ok(None);
    }
    let value = decode(&key, vt, value, wrapped, kek)?;
    Ok(Some(Entry {
        key,
        value,
        version,
        create_revision,
        mod_revision,
        updated_by,
        updated_at,
    }))
}

fn entries(rows: Vec<ValueRow>) -> Result<Vec<Entry>, ConfigError> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(e) = entry(row)? {
            out.push(e);
        }
    }
    Ok(out)
}

fn namespace(r: NamespaceRow) -> Namespace {
    Namespace {
        name: r.0,
        description: r.1,
        generation: r.2,
        created_at: r.3,
        updated_at: r.4,
    }
}

fn environment(r: EnvironmentRow) -> Environment {
    Environment {
        namespace: r.0,
        name: r.1,
        description: r.2,
        revision: r.3,
        compacted_revision: r.4,
        key_count: r.5,
        generation: r.6,
        created_at: r.7,
        updated_at: r.8,
        current_release: r.9,
    }
}

fn revision_info(r: RevisionRow) -> RevisionInfo {
    RevisionInfo {
        revision: r.0,
        author: r.1,
        message: r.2,
        kind: r.3,
        created_at: r.4,
        change_count: r.5,
        keys: serde_json::from_str(&r.6).unwrap_or_default(),
    }
}

fn release(r: ReleaseRow) -> Release {
    Release {
        name: r.0,
        revision: r.1,
        description: r.2,
        created_by: r.3,
        created_at: r.4,
        key_count: r.5,
    }
}

/// The upper bound of keys starting with `prefix` (every key character is
/// below 0x7f).
fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{7f}")
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

/// A write about to be committed: key, new value (`None`: delete), precondition.
#[derive(Debug, Clone)]
pub struct Write {
    /// The key.
    pub key: String,
    /// The value to store; `None` deletes.
    pub value: Option<Stored>,
    /// Checked under the lock.
    pub precondition: Precondition,
}

/// What a committed write did.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The new revision and its changes; `None` when nothing changed (every
    /// change was a delete of an absent key).
    pub batch: Option<Arc<Batch>>,
    /// The head after the write.
    pub revision: i64,
}

/// Rows per multi-row statement (12 binds each stays far below SQLite's
/// 32,766 and PostgreSQL's 65,535 parameters).
const ROWS_PER_STATEMENT: usize = 500;
/// Keys per `IN (…)` list.
const KEYS_PER_STATEMENT: usize = 1000;

/// One write request of a group: one revision if it changes anything.
#[derive(Debug, Clone)]
pub struct WriteRequest {
    /// Who.
    pub author: String,
    /// Why.
    pub message: String,
    /// Write, rollback or import.
    pub kind: RevisionKind,
    /// Its changes, each key at most once.
    pub writes: Vec<Write>,
}

/// Completes `… WHERE namespace = ` with the environment and `keys`.
fn of_keys<'a, DB>(q: &mut sqlx::QueryBuilder<DB>, env: &'a EnvId, keys: &[&'a str])
where
    DB: sqlx::Database,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    q.push_bind(env.namespace.as_str())
        .push(" AND environment = ")
        .push_bind(env.environment.as_str())
        .push(" AND key IN (");
    let mut list = q.separated(", ");
    for k in keys {
        list.push_bind(*k);
    }
    list.push_unseparated(")");
}

/// What `request` would change on top of `state` as revision `revision`;
/// the conflict if a precondition fails. Deletes of absent keys are no
/// change. Events come in key order.
fn stage(
    state: &HashMap<String, Option<Entry>>,
    request: &WriteRequest,
    revision: i64,
    now: i64,
) -> Result<Vec<KeyEvent>, ConfigError> {
    let mut events = Vec::with_capacity(request.writes.len());
    for w in &request.writes {
        let current = state.get(&w.key).and_then(Option::as_ref);
        w.precondition.check(&w.key, current)?;
        match &w.value {
            Some(value) => {
                let (version, create_revision) = match current {
                    Some(c) => (c.version + 1, c.create_revision),
                    None => (1, revision),
                };
                events.push(KeyEvent {
                    key: w.key.clone(),
                    entry: Some(Arc::new(Entry {
                        key: w.key.clone(),
                        value: value.clone(),
                        version,
                        create_revision,
                        mod_revision: revision,
                        updated_by: request.author.clone(),
                        updated_at: now,
                    })),
                });
            }
            None if current.is_some() => events.push(KeyEvent {
                key: w.key.clone(),
                entry: None,
            }),
            None => {}
        }
    }
    events.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(events)
}

/// The config service's tables.
#[derive(Clone)]
pub struct Store {
    db: Db,
    /// SQLite has one writer: group commits of different environments take
    /// turns here (in arrival order) instead of polling the busy lock.
    sqlite_writer: Arc<tokio::sync::Mutex<()>>,
}

impl Store {
    /// Storage on `db` (migrated with [`crate::MIGRATIONS`]).
    pub fn new(db: Db) -> Self {
        Self {
            db,
            sqlite_writer: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    // ---- namespaces --------------------------------------------------------

    /// Inserts a namespace.
    pub async fn create_namespace(
        &self,
        name: &str,
        description: &str,
        event: &OutboxEvent,
    ) -> Result<Namespace, ConfigError> {
        let now = now_ms();
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let r = sqlx::query(
                "INSERT INTO config_namespaces (name, description, generation, created_at, updated_at) VALUES ($1, $2, 1, $3, $3)",
            )
            .bind(name)
            .bind(description)
            .bind(now)
            .execute(&mut *tx)
            .await;
            match r {
                Err(e) if is_unique_violation(&e) => {
                    return Err(ConfigError::AlreadyExists(format!("namespace {name:?}")));
                }
                r => r?,
            };
            event.write(&mut *tx).await?;
            tx.commit().await?;
        });
        Ok(Namespace {
            name: name.to_owned(),
            description: description.to_owned(),
            generation: 1,
            created_at: now,
            updated_at: now,
        })
    }

    /// One namespace.
    pub async fn get_namespace(&self, name: &str) -> Result<Namespace, ConfigError> {
        let row: Option<NamespaceRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(
                "SELECT name, description, generation, created_at, updated_at FROM config_namespaces WHERE name = $1",
            )
            .bind(name)
            .fetch_optional(pool)
            .await?
        });
        row.map(namespace)
            .ok_or_else(|| ConfigError::NamespaceNotFound(name.to_owned()))
    }

    /// Namespaces after `after`, by name.
    pub async fn list_namespaces(&self, after: &str, limit: i64) -> Result<Vec<Namespace>, ConfigError> {
        let rows: Vec<NamespaceRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(
                "SELECT name, description, generation, created_at, updated_at FROM config_namespaces WHERE name > $1 ORDER BY name LIMIT $2",
            )
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(namespace).collect())
    }

    /// Sets a namespace's description when its generation is `expected` (0: any).
    pub async fn update_namespace(
        &self,
        name: &str,
        description: &str,
        expected: i64,
        event: &OutboxEvent,
    ) -> Result<Namespace, ConfigError> {
        let now = now_ms();
        let row: Option<NamespaceRow> = on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let row: Option<NamespaceRow> = sqlx::query_as(
                "UPDATE config_namespaces SET description = $2, generation = generation + 1, updated_at = $3 \
                 WHERE name = $1 AND ($4 = 0 OR generation = $4) \
                 RETURNING name, description, generation, created_at, updated_at",
            )
            .bind(name)
            .bind(description)
            .bind(now)
            .bind(expected)
            .fetch_optional(&mut *tx)
            .await?;
            if row.is_some() {
                event.write(&mut *tx).await?;
                tx.commit().await?;
            }
            row
        });
        match row {
            Some(r) => Ok(namespace(r)),
            None => {
                self.get_namespace(name).await?;
                Err(ConfigError::Conflict(format!(
                    "namespace {name:?} changed since it was read (etag mismatch)"
                )))
            }
        }
    }

    /// Deletes a namespace; with `force` also its environments (cascading).
    pub async fn delete_namespace(
        &self,
        name: &str,
        force: bool,
        expected: i64,
        event: &OutboxEvent,
    ) -> Result<(), ConfigError> {
        let current = self.get_namespace(name).await?;
        if expected != 0 && current.generation != expected {
            return Err(ConfigError::Conflict(format!(
                "namespace {name:?} changed since it was read (etag mismatch)"
            )));
        }
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let (envs,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM config_environments WHERE namespace = $1")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
            if envs > 0 && !force {
                return Err(ConfigError::NamespaceNotEmpty(name.to_owned()));
            }
            sqlx::query("DELETE FROM config_namespaces WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            event.write(&mut *tx).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    // ---- environments ------------------------------------------------------

    /// Inserts an environment at revision 0.
    pub async fn create_environment(
        &self,
        env: &EnvId,
        description: &str,
        event: &OutboxEvent,
    ) -> Result<Environment, ConfigError> {
        let now = now_ms();
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let exists: Option<(String,)> = sqlx::query_as("SELECT name FROM config_namespaces WHERE name = $1")
                .bind(&env.namespace)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(ConfigError::NamespaceNotFound(env.namespace.clone()));
            }
            let r = sqlx::query(
                "INSERT INTO config_environments (namespace, name, description, revision, compacted_revision, key_count, generation, created_at, updated_at) \
                 VALUES ($1, $2, $3, 0, 0, 0, 1, $4, $4)",
            )
            .bind(&env.namespace)
            .bind(&env.environment)
            .bind(description)
            .bind(now)
            .execute(&mut *tx)
            .await;
            match r {
                Err(e) if is_unique_violation(&e) => {
                    return Err(ConfigError::AlreadyExists(format!("environment {env}")));
                }
                r => r?,
            };
            event.write(&mut *tx).await?;
            tx.commit().await?;
        });
        Ok(Environment {
            namespace: env.namespace.clone(),
            name: env.environment.clone(),
            description: description.to_owned(),
            revision: 0,
            compacted_revision: 0,
            key_count: 0,
            generation: 1,
            created_at: now,
            updated_at: now,
            current_release: String::new(),
        })
    }

    /// One environment.
    pub async fn get_environment(&self, env: &EnvId) -> Result<Environment, ConfigError> {
        let row: Option<EnvironmentRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                env_columns!(),
                " FROM config_environments WHERE namespace = $1 AND name = $2"
            ))
            .bind(&env.namespace)
            .bind(&env.environment)
            .fetch_optional(pool)
            .await?
        });
        match row {
            Some(r) => Ok(environment(r)),
            None => {
                self.get_namespace(&env.namespace).await?;
                Err(ConfigError::EnvironmentNotFound(env.to_string()))
            }
        }
    }

    /// A namespace's environments after `after`, by name.
    pub async fn list_environments(
        &self,
        namespace: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Environment>, ConfigError> {
        self.get_namespace(namespace).await?;
        let rows: Vec<EnvironmentRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                env_columns!(),
                " FROM config_environments WHERE namespace = $1 AND name > $2 ORDER BY name LIMIT $3"
            ))
            .bind(namespace)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(environment).collect())
    }

    /// Every environment's head revision, for replicas following each other.
    /// (environment, head revision, when it was created: its incarnation).
    pub async fn heads(&self) -> Result<Vec<(EnvId, i64, i64)>, ConfigError> {
        let rows: Vec<(String, String, i64, i64)> = on_db!(&self.db, |pool| {
            sqlx::query_as("SELECT namespace, name, revision, created_at FROM config_environments")
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().map(|(n, e, r, c)| (EnvId::new(n, e), r, c)).collect())
    }

    /// Sets an environment's description when its generation is `expected` (0: any).
    pub async fn update_environment(
        &self,
        env: &EnvId,
        description: &str,
        expected: i64,
        event: &OutboxEvent,
    ) -> Result<Environment, ConfigError> {
        let now = now_ms();
        let row: Option<EnvironmentRow> = on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let row: Option<EnvironmentRow> = sqlx::query_as(concat!(
                "UPDATE config_environments SET description = $3, generation = generation + 1, updated_at = $4 \
                 WHERE namespace = $1 AND name = $2 AND ($5 = 0 OR generation = $5) RETURNING ",
                env_columns!()
            ))
            .bind(&env.namespace)
            .bind(&env.environment)
            .bind(description)
            .bind(now)
            .bind(expected)
            .fetch_optional(&mut *tx)
            .await?;
            if row.is_some() {
                event.write(&mut *tx).await?;
                tx.commit().await?;
            }
            row
        });
        match row {
            Some(r) => Ok(environment(r)),
            None => {
                self.get_environment(env).await?;
                Err(ConfigError::Conflict(format!(
                    "environment {env} changed since it was read (etag mismatch)"
                )))
            }
        }
    }

    /// Deletes an environment with everything in it.
    pub async fn delete_environment(&self, env: &EnvId, expected: i64, event: &OutboxEvent) -> Result<(), ConfigError> {
        let current = self.get_environment(env).await?;
        if expected != 0 && current.generation != expected {
            return Err(ConfigError::Conflict(format!(
                "environment {env} changed since it was read (etag mismatch)"
            )));
        }
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            sqlx::query("DELETE FROM config_environments WHERE namespace = $1 AND name = $2")
                .bind(&env.namespace)
                .bind(&env.environment)
                .execute(&mut *tx)
                .await?;
            event.write(&mut *tx).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    // ---- reads -------------------------------------------------------------

    /// The head and every live key, read in one consistent snapshot.
    pub async fn load_head(&self, env: &EnvId) -> Result<(Environment, Vec<Entry>), ConfigError> {
        let postgres = matches!(self.db, Db::Postgres(_));
        let (row, rows): (Option<EnvironmentRow>, Vec<ValueRow>) = on_db!(&self.db, |pool| {
            // One snapshot for both reads: a deferred SQLite transaction reads
            // one WAL snapshot throughout; PostgreSQL needs REPEATABLE READ.
            let mut tx = pool.begin().await?;
            if postgres {
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .execute(&mut *tx)
                    .await?;
            }
            let row = sqlx::query_as(concat!(
                "SELECT ",
                env_columns!(),
                " FROM config_environments WHERE namespace = $1 AND name = $2"
            ))
            .bind(&env.namespace)
            .bind(&env.environment)
            .fetch_optional(&mut *tx)
            .await?;
            let rows = sqlx::query_as(concat!(
                "SELECT ",
                value_columns!(),
                " FROM config_values WHERE namespace = $1 AND environment = $2 ORDER BY key"
            ))
            .bind(&env.namespace)
            .bind(&env.environment)
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            (row, rows)
        });
        let Some(row) = row else {
            self.get_namespace(&env.namespace).await?;
            return Err(ConfigError::EnvironmentNotFound(env.to_string()));
        };
        Ok((environment(row), entries(rows)?))
    }

    /// The revisions in `(after, upto]` with their changes, oldest first.
    /// The caller makes sure `after` is not older than retained history.
    pub async fn batches(&self, env: &EnvId, after: i64, upto: i64) -> Result<Vec<Batch>, ConfigError> {
        let postgres = matches!(self.db, Db::Postgres(_));
        type Read = (Option<(i64,)>, Vec<(i64, String, String)>, Vec<ValueRow>);
        let (compacted, revs, rows): Read = on_db!(&self.db, |pool| {
            // One snapshot for all three reads, so a compaction committing
            // meanwhile cannot leave records without rows or rows without
            // records.
            let mut tx = pool.begin().await?;
            if postgres {
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .execute(&mut *tx)
                    .await?;
            }
            let compacted =
                sqlx::query_as("SELECT compacted_revision FROM config_environments WHERE namespace = $1 AND name = $2")
                    .bind(&env.namespace)
                    .bind(&env.environment)
                    .fetch_optional(&mut *tx)
                    .await?;
            let revs = sqlx::query_as(
                "SELECT revision, author, message FROM config_revisions \
                 WHERE namespace = $1 AND environment = $2 AND revision > $3 AND revision <= $4 ORDER BY revision",
            )
            .bind(&env.namespace)
            .bind(&env.environment)
            .bind(after)
            .bind(upto)
            .fetch_all(&mut *tx)
            .await?;
            let rows = sqlx::query_as(concat!(
                "SELECT ",
                history_columns!(),
                " FROM config_history \
                 WHERE namespace = $1 AND environment = $2 AND revision > $3 AND revision <= $4 ORDER BY revision, key"
            ))
            .bind(&env.namespace)
            .bind(&env.environment)
            .bind(after)
            .bind(upto)
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            (compacted, revs, rows)
        });
        let Some((compacted,)) = compacted else {
            return Err(ConfigError::EnvironmentNotFound(env.to_string()));
        };
        // Every revision of the range, or the range reaches compacted history.
        let contiguous = revs.iter().zip(after + 1..).all(|(r, want)| r.0 == want)
            && i64::try_from(revs.len()).ok() == Some(upto - after);
        if after < compacted || !contiguous {
            return Err(ConfigError::Compacted {
                revision: after,
                compacted,
            });
        }
        let mut batches: Vec<Batch> = revs
            .into_iter()
            .map(|(revision, author, message)| Batch {
                revision,
                author,
                message,
                events: Vec::new(),
            })
            .collect();
        let mut i = 0;
        for row in rows {
            let revision = row.7;
            let key = row.0.clone();
            while i < batches.len() && batches[i].revision < revision {
                i += 1;
            }
            let Some(batch) = batches.get_mut(i).filter(|b| b.revision == revision) else {
                // Compaction removes the records of revisions up to a point
                // and keeps each key's last row; meeting one means the range
                // asked for reaches into compacted history.
                return Err(ConfigError::Compacted {
                    revision: after,
                    compacted: revision,
                });
            };
            batch.events.push(KeyEvent {
                key,
                entry: entry(row)?.map(Arc::new),
            });
        }
        Ok(batches)
    }

    /// The live keys at `revision` under `prefix`, after `after`, by key.
    pub async fn state_at(
        &self,
        env: &EnvId,
        revision: i64,
        prefix: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Entry>, ConfigError> {
        let rows: Vec<ValueRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                history_columns!(),
                " FROM config_history h \
                 WHERE namespace = $1 AND environment = $2 AND key >= $3 AND key < $4 AND key > $5 AND revision <= $6 \
                 AND revision = (SELECT MAX(revision) FROM config_history l WHERE l.namespace = h.namespace \
                     AND l.environment = h.environment AND l.key = h.key AND l.revision <= $6) \
                 AND value_type <> 0 ORDER BY key LIMIT $7"
            ))
            .bind(&env.namespace)
            .bind(&env.environment)
            .bind(prefix)
            .bind(prefix_end(prefix))
            .bind(after)
            .bind(revision)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        entries(rows)
    }

    /// One key at `revision`.
    pub async fn get_at(&self, env: &EnvId, key: &str, revision: i64) -> Result<Option<Entry>, ConfigError> {
        let row: Option<ValueRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                history_columns!(),
                " FROM config_history WHERE namespace = $1 AND environment = $2 AND key = $3 \
                 AND revision <= $4 ORDER BY revision DESC LIMIT 1"
            ))
            .bind(&env.namespace)
            .bind(&env.environment)
            .bind(key)
            .bind(revision)
            .fetch_optional(pool)
            .await?
        });
        Ok(match row {
            Some(r) => entry(r)?,
            None => None,
        })
    }

    /// One key's changes before revision `before` (0: all), newest first:
    /// (revision, entry after it or `None` for a delete, message).
    pub async fn key_history(
        &self,
        env: &EnvId,
        key: &str,
        before: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String, Option<Entry>)>, ConfigError> {
        let before = if before <= 0 { i64::MAX } else { before };
        let rows: Vec<HistoryRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(
                "SELECT h.key, h.value_type, h.value, h.wrapped_key, h.kek_id, h.version, h.create_revision, h.revision, \
                 h.updated_by, h.updated_at, COALESCE(r.message, '') FROM config_history h LEFT JOIN config_revisions r \
                 ON r.namespace = h.namespace AND r.environment = h.environment AND r.revision = h.revision \
                 WHERE h.namespace = $1 AND h.environment = $2 AND h.key = $3 AND h.revision < $4 \
                 ORDER BY h.revision DESC LIMIT $5",
            )
            .bind(&env.namespace)
            .bind(&env.environment)
            .bind(key)
            .bind(before)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        let rows = rows
            .into_iter()
            .map(|r| ((r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7, r.8, r.9), r.10));
        let mut out = Vec::new();
        for (row, message) in rows {
            let revision = row.7;
            out.push((revision, message, entry(row)?));
        }
        Ok(out)
    }

    /// Revisions before `before` (0: all), newest first.
    pub async fn list_revisions(&self, env: &EnvId, before: i64, limit: i64) -> Result<Vec<RevisionInfo>, ConfigError> {
        let before = if before <= 0 { i64::MAX } else { before };
        let rows: Vec<RevisionRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(
                "SELECT revision, author, message, kind, created_at, change_count, keys FROM config_revisions \
                 WHERE namespace = $1 AND environment = $2 AND revision < $3 ORDER BY revision DESC LIMIT $4",
            )
            .bind(&env.namespace)
            .bind(&env.environment)
            .bind(before)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(revision_info).collect())
    }

    // ---- writes ------------------------------------------------------------

    /// Commits `requests` in one transaction, each as its own revision in
    /// order, with the outbox event `event` builds for each. A request whose
    /// precondition fails is answered with the conflict and takes no
    /// revision; the others still commit. Everything is read once and
    /// written with one multi-row statement per table, so a group of many
    /// writes costs little more than one: this is what lets concurrent
    /// writers of one environment share a commit (and its fsync).
    pub async fn commit_group(
        &self,
        env: &EnvId,
        requests: &[WriteRequest],
        reseal: &(dyn Fn(&Sealed, &str) -> Result<Sealed, String> + Sync),
        event: impl Fn(&WriteRequest, i64, &[String]) -> OutboxEvent,
    ) -> Result<Vec<Result<Committed, ConfigError>>, ConfigError> {
        let now = now_ms();
        let postgres = matches!(self.db, Db::Postgres(_));
        let seals = requests
            .iter()
            .flat_map(|r| &r.writes)
            .any(|w| matches!(w.value, Some(Stored::Secret(_))));
        let mut keys: Vec<&str> = requests
            .iter()
            .flat_map(|r| r.writes.iter().map(|w| w.key.as_str()))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let _turn = match &self.db {
            Db::Sqlite(_) => Some(self.sqlite_writer.lock().await),
            Db::Postgres(_) => None,
        };
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            // Locks the environment row (PostgreSQL; SQLite's write lock is
            // already held), so revisions follow commit order.
            let head: Option<(i64,)> = sqlx::query_as(
                "UPDATE config_environments SET updated_at = $3 WHERE namespace = $1 AND name = $2 RETURNING revision",
            )
            .bind(&env.namespace)
            .bind(&env.environment)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((mut revision,)) = head else {
                drop(tx);
                self.get_namespace(&env.namespace).await?;
                return Err(ConfigError::EnvironmentNotFound(env.to_string()));
            };
            // Secrets sealed before a key rotation committed are re-wrapped
            // here, under the key active now. On PostgreSQL the share lock
            // makes a rotation wait for this transaction, so its sweep sees
            // whatever this one writes; SQLite has one writer anyway.
            let resealed: Vec<WriteRequest>;
            let requests: &[WriteRequest] = if seals {
                let active: Option<(String,)> = sqlx::query_as(if postgres {
                    "SELECT active_kek FROM config_keyring WHERE id = 1 FOR SHARE"
                } else {
                    "SELECT active_kek FROM config_keyring WHERE id = 1"
                })
                .fetch_optional(&mut *tx)
                .await?;
                match active {
                    Some((kek,))
                        if requests
                            .iter()
                            .flat_map(|r| &r.writes)
                            .any(|w| matches!(&w.value, Some(Stored::Secret(s)) if s.kek_id != kek)) =>
                    {
                        let mut copy = requests.to_vec();
                        for w in copy.iter_mut().flat_map(|r| r.writes.iter_mut()) {
                            if let Some(Stored::Secret(sealed)) = &w.value
                                && sealed.kek_id != kek
                            {
                                let moved = reseal(sealed, &kek).map_err(|reason| ConfigError::Decrypt {
                                    key: w.key.clone(),
                                    reason,
                                })?;
                                w.value = Some(Stored::Secret(moved));
                            }
                        }
                        resealed = copy;
                        &resealed
                    }
                    Some(_) | None => requests,
                }
            } else {
                requests
            };
            let mut state: HashMap<String, Option<Entry>> = HashMap::with_capacity(keys.len());
            for chunk in keys.chunks(KEYS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::new(concat!(
                    "SELECT ",
                    value_columns!(),
                    " FROM config_values WHERE namespace = "
                ));
                of_keys(&mut q, env, chunk);
                let rows: Vec<ValueRow> = q.build_query_as().fetch_all(&mut *tx).await?;
                for row in rows {
                    let key = row.0.clone();
                    state.insert(key, entry(row)?);
                }
            }
            let existed: HashMap<String, bool> = keys
                .iter()
                .map(|k| ((*k).to_owned(), state.get(*k).is_some_and(Option::is_some)))
                .collect();

            let mut outcomes = Vec::with_capacity(requests.len());
            let mut history: Vec<(i64, Arc<Entry>, bool)> = Vec::new();
            let mut revisions: Vec<(i64, &WriteRequest, Vec<String>)> = Vec::new();
            let mut touched: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
            for request in requests {
                match stage(&state, request, revision + 1, now) {
                    Err(conflict) => outcomes.push(Err(conflict)),
                    Ok(events) if events.is_empty() => outcomes.push(Ok(Committed { batch: None, revision })),
                    Ok(events) => {
                        revision += 1;
                        for e in &events {
                            let row = match &e.entry {
                                Some(entry) => (revision, entry.clone(), false),
                                None => {
                                    let before = state.get(&e.key).cloned().flatten();
                                    let (version, create_revision) =
                                        before.map_or((0, 0), |b| (b.version, b.create_revision));
                                    let marker = Entry {
                                        key: e.key.clone(),
                                        value: Stored::Plain(Plain::String(String::new())),
                                        version,
                                        create_revision,
                                        mod_revision: revision,
                                        updated_by: request.author.clone(),
                                        updated_at: now,
                                    };
                                    (revision, Arc::new(marker), true)
                                }
                            };
                            history.push(row);
                            touched.insert(e.key.clone());
                            state.insert(e.key.clone(), e.entry.as_deref().cloned());
                        }
                        let keys: Vec<String> = events.iter().map(|e| e.key.clone()).collect();
                        revisions.push((revision, request, keys));
                        outcomes.push(Ok(Committed {
                            batch: Some(Arc::new(Batch {
                                revision,
                                author: request.author.clone(),
                                message: request.message.clone(),
                                events,
                            })),
                            revision,
                        }));
                    }
                }
            }
            if revisions.is_empty() {
                drop(tx);
                return Ok(outcomes);
            }

            // The head: final state of every touched key.
            let mut upserts: Vec<&Entry> = Vec::new();
            let mut deletes: Vec<&str> = Vec::new();
            let mut delta = 0i64;
            for key in &touched {
                let before = existed.get(key).copied().unwrap_or(false);
                match state.get(key).and_then(Option::as_ref) {
                    Some(e) => {
                        upserts.push(e);
                        if !before {
                            delta += 1;
                        }
                    }
                    None if before => {
                        delta -= 1;
                        deletes.push(key);
                    }
                    None => {}
                }
            }
            sqlx::query(
                "UPDATE config_environments SET revision = $3, key_count = key_count + $4 WHERE namespace = $1 AND name = $2",
            )
            .bind(&env.namespace)
            .bind(&env.environment)
            .bind(revision)
            .bind(delta)
            .execute(&mut *tx)
            .await?;
            for chunk in upserts.chunks(ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::new(concat!(
                    "INSERT INTO config_values (namespace, environment, ",
                    value_columns!(),
                    ") "
                ));
                q.push_values(chunk, |mut b, e| {
                    let (vt, bytes, wrapped, kek) = encode(&e.value);
                    b.push_bind(&env.namespace)
                        .push_bind(&env.environment)
                        .push_bind(&e.key)
                        .push_bind(vt)
                        .push_bind(bytes)
                        .push_bind(wrapped)
                        .push_bind(kek)
                        .push_bind(e.version)
                        .push_bind(e.create_revision)
                        .push_bind(e.mod_revision)
                        .push_bind(&e.updated_by)
                        .push_bind(e.updated_at);
                });
                q.push(
                    " ON CONFLICT (namespace, environment, key) DO UPDATE SET value_type = excluded.value_type, \
                     value = excluded.value, wrapped_key = excluded.wrapped_key, kek_id = excluded.kek_id, \
                     version = excluded.version, create_revision = excluded.create_revision, \
                     mod_revision = excluded.mod_revision, updated_by = excluded.updated_by, updated_at = excluded.updated_at",
                );
                q.build().execute(&mut *tx).await?;
            }
            for chunk in deletes.chunks(KEYS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::new("DELETE FROM config_values WHERE namespace = ");
                of_keys(&mut q, env, chunk);
                q.build().execute(&mut *tx).await?;
            }
            for chunk in history.chunks(ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::new(
                    "INSERT INTO config_history (namespace, environment, revision, key, value_type, value, wrapped_key, \
                     kek_id, version, create_revision, updated_by, updated_at) ",
                );
                q.push_values(chunk, |mut b, (rev, e, deleted)| {
                    let (vt, bytes, wrapped, kek) = if *deleted {
                        (VT_DELETED, Vec::new(), None, None)
                    } else {
                        encode(&e.value)
                    };
                    b.push_bind(&env.namespace)
                        .push_bind(&env.environment)
                        .push_bind(*rev)
                        .push_bind(&e.key)
                        .push_bind(vt)
                        .push_bind(bytes)
                        .push_bind(wrapped)
                        .push_bind(kek)
                        .push_bind(e.version)
                        .push_bind(e.create_revision)
                        .push_bind(&e.updated_by)
                        .push_bind(e.updated_at);
                });
                q.build().execute(&mut *tx).await?;
            }
            for chunk in revisions.chunks(ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::new(
                    "INSERT INTO config_revisions (namespace, environment, revision, author, message, kind, created_at, \
                     change_count, keys) ",
                );
                q.push_values(chunk, |mut b, (rev, request, keys)| {
                    let listed: Vec<&String> = keys.iter().take(100).collect();
                    b.push_bind(&env.namespace)
                        .push_bind(&env.environment)
                        .push_bind(*rev)
                        .push_bind(&request.author)
                        .push_bind(&request.message)
                        .push_bind(request.kind.as_str())
                        .push_bind(now)
                        .push_bind(i32::try_from(keys.len()).unwrap_or(i32::MAX))
                        .push_bind(serde_json::to_string(&listed).unwrap_or_else(|_| "[]".into()));
                });
                q.build().execute(&mut *tx).await?;
            }
            for (rev, request, keys) in &revisions {
                event(request, *rev, keys).write(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(outcomes)
        })
    }

    /// Forgets changes at or before `upto` that later state does not need:
    /// every row superseded by a newer one at or before `upto`, and delete
    /// markers. Returns how many rows went.
    pub async fn compact(&self, env: &EnvId, upto: i64) -> Result<u64, ConfigError> {
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let done = sqlx::query(
                "DELETE FROM config_history WHERE namespace = $1 AND environment = $2 AND revision <= $3 AND (value_type = 0 \
                 OR EXISTS (SELECT 1 FROM config_history n WHERE n.namespace = config_history.namespace \
                     AND n.environment = config_history.environment AND n.key = config_history.key \
                     AND n.revision > config_history.revision AND n.revision <= $3))",
            )
            .bind(&env.namespace)
            .bind(&env.environment)
            .bind(upto)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query("DELETE FROM config_revisions WHERE namespace = $1 AND environment = $2 AND revision <= $3")
                .bind(&env.namespace)
                .bind(&env.environment)
                .bind(upto)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE config_environments SET compacted_revision = $3 WHERE namespace = $1 AND name = $2 AND compacted_revision < $3",
            )
            .bind(&env.namespace)
            .bind(&env.environment)
            .bind(upto)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(done)
        })
    }

    // ---- releases ----------------------------------------------------------

    /// Freezes `entries` (the state at `revision`) as a release.
    pub async fn create_release(
        &self,
        env: &EnvId,
        release: &Release,
        entries: &[Entry],
        event: &OutboxEvent,
    ) -> Result<(), ConfigError> {
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let r = sqlx::query(
                "INSERT INTO config_releases (namespace, environment, name, revision, description, created_by, created_at, key_count) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&env.namespace)
            .bind(&env.environment)
            .bind(&release.name)
            .bind(release.revision)
            .bind(&release.description)
            .bind(&release.created_by)
            .bind(release.created_at)
            .bind(release.key_count)
            .execute(&mut *tx)
            .await;
            match r {
                Err(e) if is_unique_violation(&e) => {
                    return Err(ConfigError::AlreadyExists(format!("release {:?}", release.name)));
                }
                r => r?,
            };
            for e in entries {
                let (vt, bytes, wrapped, kek) = encode(&e.value);
                sqlx::query(
                    "INSERT INTO config_release_values (namespace, environment, release, key, value_type, value, wrapped_key, kek_id, version, create_revision, mod_revision, updated_by, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                )
                .bind(&env.namespace)
                .bind(&env.environment)
                .bind(&release.name)
                .bind(&e.key)
                .bind(vt)
                .bind(&bytes)
                .bind(&wrapped)
                .bind(&kek)
                .bind(e.version)
                .bind(e.create_revision)
                .bind(e.mod_revision)
                .bind(&e.updated_by)
                .bind(e.updated_at)
                .execute(&mut *tx)
                .await?;
            }
            event.write(&mut *tx).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// One release by name, or the newest for `latest`.
    pub async fn get_release(&self, env: &EnvId, name: &str) -> Result<Release, ConfigError> {
        let row: Option<ReleaseRow> = on_db!(&self.db, |pool| {
            if name == crate::model::LATEST_RELEASE {
                sqlx::query_as(
                    "SELECT name, revision, description, created_by, created_at, key_count FROM config_releases \
                     WHERE namespace = $1 AND environment = $2 ORDER BY created_at DESC, revision DESC, name DESC LIMIT 1",
                )
                .bind(&env.namespace)
                .bind(&env.environment)
                .fetch_optional(pool)
                .await?
            } else {
                sqlx::query_as(
                    "SELECT name, revision, description, created_by, created_at, key_count FROM config_releases \
                     WHERE namespace = $1 AND environment = $2 AND name = $3",
                )
                .bind(&env.namespace)
                .bind(&env.environment)
                .bind(name)
                .fetch_optional(pool)
                .await?
            }
        });
        match row {
            Some(r) => Ok(release(r)),
            None => {
                self.get_environment(env).await?;
                Err(ConfigError::ReleaseNotFound(name.to_owned()))
            }
        }
    }

    /// Releases created before `(created_at, name)` of the cursor, newest first.
    pub async fn list_releases(
        &self,
        env: &EnvId,
        before: Option<(i64, String)>,
        limit: i64,
    ) -> Result<Vec<Release>, ConfigError> {
        self.get_environment(env).await?;
        let (at, name) = before.unwrap_or((i64::MAX, String::new()));
        let rows: Vec<ReleaseRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(
                "SELECT name, revision, description, created_by, created_at, key_count FROM config_releases \
                 WHERE namespace = $1 AND environment = $2 AND (created_at < $3 OR (created_at = $3 AND name < $4)) \
                 ORDER BY created_at DESC, name DESC LIMIT $5",
            )
            .bind(&env.namespace)
            .bind(&env.environment)
            .bind(at)
            .bind(if at == i64::MAX { "\u{7f}".to_owned() } else { name })
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(release).collect())
    }

    /// A release's keys under `prefix` after `after`, by key.
    pub async fn release_values(
        &self,
        env: &EnvId,
        release: &str,
        prefix: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Entry>, ConfigError> {
        let rows: Vec<ValueRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                value_columns!(),
                " FROM config_release_values WHERE namespace = $1 AND environment = $2 AND release = $3 \
                 AND key >= $4 AND key < $5 AND key > $6 ORDER BY key LIMIT $7"
            ))
            .bind(&env.namespace)
            .bind(&env.environment)
            .bind(release)
            .bind(prefix)
            .bind(prefix_end(prefix))
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        entries(rows)
    }

    // ---- schemas -----------------------------------------------------------

    /// Sets the schema at `prefix` of a namespace.
    pub async fn set_schema(
        &self,
        namespace: &str,
        prefix: &str,
        schema: &str,
        by: &str,
        event: &OutboxEvent,
    ) -> Result<i64, ConfigError> {
        let now = now_ms();
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let exists: Option<(String,)> = sqlx::query_as("SELECT name FROM config_namespaces WHERE name = $1")
                .bind(namespace)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(ConfigError::NamespaceNotFound(namespace.to_owned()));
            }
            sqlx::query(
                "INSERT INTO config_schemas (namespace, prefix, json_schema, updated_by, updated_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (namespace, prefix) DO UPDATE SET json_schema = excluded.json_schema, \
                 updated_by = excluded.updated_by, updated_at = excluded.updated_at",
            )
            .bind(namespace)
            .bind(prefix)
            .bind(schema)
            .bind(by)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            event.write(&mut *tx).await?;
            tx.commit().await?;
        });
        Ok(now)
    }

    /// A namespace's schemas: (prefix, schema JSON, updated_by, updated_at), by prefix.
    pub async fn schemas(&self, namespace: &str) -> Result<Vec<(String, String, String, i64)>, ConfigError> {
        let rows = on_db!(&self.db, |pool| {
            sqlx::query_as(
                "SELECT prefix, json_schema, updated_by, updated_at FROM config_schemas WHERE namespace = $1 ORDER BY prefix",
            )
            .bind(namespace)
            .fetch_all(pool)
            .await?
        });
        Ok(rows)
    }

    /// Removes the schema at `prefix`.
    pub async fn delete_schema(&self, namespace: &str, prefix: &str, event: &OutboxEvent) -> Result<(), ConfigError> {
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let done = sqlx::query("DELETE FROM config_schemas WHERE namespace = $1 AND prefix = $2")
                .bind(namespace)
                .bind(prefix)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if done == 0 {
                return Err(ConfigError::SchemaNotFound(prefix.to_owned()));
            }
            event.write(&mut *tx).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    // ---- key encryption keys -----------------------------------------------

    /// The key id new secrets are wrapped with, once one was chosen.
    pub async fn active_kek(&self) -> Result<Option<String>, ConfigError> {
        let row: Option<(String,)> = on_db!(&self.db, |pool| {
            sqlx::query_as("SELECT active_kek FROM config_keyring WHERE id = 1")
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|r| r.0))
    }

    /// Records `kek` as the active key; with `only_if_unset`, keeps one already recorded.
    pub async fn set_active_kek(&self, kek: &str, only_if_unset: bool) -> Result<String, ConfigError> {
        let row: (String,) = on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            if only_if_unset {
                sqlx::query("INSERT INTO config_keyring (id, active_kek) VALUES (1, $1) ON CONFLICT (id) DO NOTHING")
                    .bind(kek)
                    .execute(&mut *tx)
                    .await?;
            } else {
                sqlx::query(
                    "INSERT INTO config_keyring (id, active_kek) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET active_kek = excluded.active_kek",
                )
                .bind(kek)
                .execute(&mut *tx)
                .await?;
            }
            let row = sqlx::query_as("SELECT active_kek FROM config_keyring WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            row
        });
        Ok(row.0)
    }

    /// Up to `limit` sealed rows of `table` not wrapped by `kek`:
    /// (namespace, environment, row discriminator, key, wrapped_key, kek_id).
    pub async fn sealed_not_under(
        &self,
        table: SealedTable,
        kek: &str,
        limit: i64,
    ) -> Result<Vec<SealedRow>, ConfigError> {
        let sql = format!(
            "SELECT namespace, environment, {}, key, wrapped_key, kek_id FROM {} WHERE kek_id IS NOT NULL AND kek_id <> $1 LIMIT $2",
            table.discriminator(),
            table.name()
        );
        let rows: Vec<(String, String, String, String, Vec<u8>, String)> = on_db!(&self.db, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(kek)
                .bind(limit)
                .fetch_all(pool)
                .await?
        });
        Ok(rows
            .into_iter()
            .map(|(namespace, environment, disc, key, wrapped_key, kek_id)| SealedRow {
                env: EnvId::new(namespace, environment),
                discriminator: disc,
                key,
                wrapped_key,
                kek_id,
            })
            .collect())
    }

    /// Replaces one row's wrapped key, unless it changed meanwhile.
    pub async fn rewrap_row(
        &self,
        table: SealedTable,
        row: &SealedRow,
        wrapped: &[u8],
        kek: &str,
    ) -> Result<bool, ConfigError> {
        let sql = format!(
            "UPDATE {} SET wrapped_key = $1, kek_id = $2 WHERE namespace = $3 AND environment = $4 AND {} = $5 AND key = $6 AND kek_id = $7",
            table.name(),
            table.discriminator()
        );
        let done = on_db!(&self.db, |pool| {
            let q = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(wrapped)
                .bind(kek)
                .bind(&row.env.namespace)
                .bind(&row.env.environment);
            q.bind(&row.discriminator)
                .bind(&row.key)
                .bind(&row.kek_id)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done == 1)
    }
}

/// Tables holding sealed values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedTable {
    /// The head.
    Values,
    /// History.
    History,
    /// Releases.
    Releases,
}

impl SealedTable {
    /// All of them.
    pub const ALL: [SealedTable; 3] = [SealedTable::Values, SealedTable::History, SealedTable::Releases];

    fn name(self) -> &'static str {
        match self {
            SealedTable::Values => "config_values",
            SealedTable::History => "config_history",
            SealedTable::Releases => "config_release_values",
        }
    }

    /// A text column telling rows of one key apart within the table.
    fn discriminator(self) -> &'static str {
        match self {
            SealedTable::Values => "''",
            SealedTable::History => "CAST(revision AS TEXT)",
            SealedTable::Releases => "release",
        }
    }
}

/// A sealed row to re-wrap.
#[derive(Debug, Clone)]
pub struct SealedRow {
    /// Where.
    pub env: EnvId,
    /// Revision (history) or release name (releases); empty for the head.
    pub discriminator: String,
    /// The key.
    pub key: String,
    /// The wrapped data key.
    pub wrapped_key: Vec<u8>,
    /// Under which key.
    pub kek_id: String,
}

impl Store {
    /// Writes one event on its own (for reads that must be recorded).
    pub async fn emit(&self, event: &OutboxEvent) -> Result<(), ConfigError> {
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            event.write(&mut *tx).await?;
            tx.commit().await?;
        });
        Ok(())
    }
}

/// A rollout row: release, previous_release, percentage, labels (JSON),
/// state, updated_by, created_at, updated_at.
type RolloutRow = (String, String, i32, String, String, String, i64, i64);

fn rollout(r: RolloutRow) -> Rollout {
    Rollout {
        release: r.0,
        previous_release: r.1,
        percentage: r.2,
        labels: serde_json::from_str(&r.3).unwrap_or_default(),
        state: RolloutState::parse(&r.4),
        updated_by: r.5,
        created_at: r.6,
        updated_at: r.7,
    }
}

impl Store {
    /// The environment's last rollout.
    pub async fn get_rollout(&self, env: &EnvId) -> Result<Option<Rollout>, ConfigError> {
        let row: Option<RolloutRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(
                "SELECT release, previous_release, percentage, labels, state, updated_by, created_at, updated_at \
                 FROM config_rollouts WHERE namespace = $1 AND environment = $2",
            )
            .bind(&env.namespace)
            .bind(&env.environment)
            .fetch_optional(pool)
            .await?
        });
        Ok(row.map(rollout))
    }

    /// Stores `next` as the environment's rollout, and `current_release`
    /// when given, if the rollout in place is in one of `from` states (`None`
    /// in `from` admits an environment without one). The check and the
    /// write share a transaction, so two operators cannot both win.
    pub async fn put_rollout(
        &self,
        env: &EnvId,
        from: &[Option<RolloutState>],
        next: &Rollout,
        current_release: Option<&str>,
        event: &OutboxEvent,
    ) -> Result<(), ConfigError> {
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            // Locks the environment row (PostgreSQL) so checks and writes serialise.
            let locked: Option<(i64,)> = sqlx::query_as(
                "UPDATE config_environments SET generation = generation WHERE namespace = $1 AND name = $2 RETURNING revision",
            )
            .bind(&env.namespace)
            .bind(&env.environment)
            .fetch_optional(&mut *tx)
            .await?;
            if locked.is_none() {
                return Err(ConfigError::EnvironmentNotFound(env.to_string()));
            }
            let state: Option<(String,)> =
                sqlx::query_as("SELECT state FROM config_rollouts WHERE namespace = $1 AND environment = $2")
                    .bind(&env.namespace)
                    .bind(&env.environment)
                    .fetch_optional(&mut *tx)
                    .await?;
            let state = state.map(|s| RolloutState::parse(&s.0));
            if !from.contains(&state) {
                return Err(ConfigError::RolloutState(match state {
                    None => "the environment has no rollout".into(),
                    Some(s) => format!("the rollout is {}", s.as_str()),
                }));
            }
            sqlx::query(
                "INSERT INTO config_rollouts (namespace, environment, release, previous_release, percentage, labels, state, updated_by, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (namespace, environment) DO UPDATE SET \
                 release = excluded.release, previous_release = excluded.previous_release, percentage = excluded.percentage, \
                 labels = excluded.labels, state = excluded.state, updated_by = excluded.updated_by, \
                 created_at = excluded.created_at, updated_at = excluded.updated_at",
            )
            .bind(&env.namespace)
            .bind(&env.environment)
            .bind(&next.release)
            .bind(&next.previous_release)
            .bind(next.percentage)
            .bind(serde_json::to_string(&next.labels).unwrap_or_else(|_| "{}".into()))
            .bind(next.state.as_str())
            .bind(&next.updated_by)
            .bind(next.created_at)
            .bind(next.updated_at)
            .execute(&mut *tx)
            .await?;
            if let Some(current) = current_release {
                sqlx::query("UPDATE config_environments SET current_release = $3 WHERE namespace = $1 AND name = $2")
                    .bind(&env.namespace)
                    .bind(&env.environment)
                    .bind(current)
                    .execute(&mut *tx)
                    .await?;
            }
            event.write(&mut *tx).await?;
            tx.commit().await?;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use plinth_runtime::testing::{Backend, TestDatabase, backend_url};

    use super::*;
    use plinth_runtime::crypto::Keyring;

    fn event() -> OutboxEvent {
        OutboxEvent::new("plinth.config.test", "t", &prost_types::Timestamp::default())
    }

    /// A secret sealed under the old key before a rotation, committed after
    /// the rotation's sweep, is stored under the new key all the same.
    async fn a_secret_sealed_before_a_rotation_lands_under_the_new_key(db: Db) -> anyhow::Result<()> {
        let store = Store::new(db);
        let keyring = Keyring::from_keys(&[("k1", [1; 32]), ("k2", [2; 32])])?;
        let env = EnvId::new("app", "prod");
        store.create_namespace("app", "", &event()).await?;
        store.create_environment(&env, "", &event()).await?;
        store.set_active_kek("k1", false).await?;
        let sealed = keyring
            .seal("k1", b"hunter2", "app/prod/db")
            .map_err(anyhow::Error::msg)?;
        // The rotation commits (and would sweep) before the write does.
        store.set_active_kek("k2", false).await?;
        let request = WriteRequest {
            author: "t".into(),
            message: String::new(),
            kind: RevisionKind::Write,
            writes: vec![Write {
                key: "db".into(),
                value: Some(Stored::Secret(sealed)),
                precondition: Precondition::default(),
            }],
        };
        let outcomes = store
            .commit_group(&env, &[request], &|s, kek| keyring.rewrap(s, kek), |_, _, _| event())
            .await?;
        assert!(outcomes.iter().all(Result::is_ok));
        let head = store.get_at(&env, "db", 1).await?;
        let Some(Entry {
            value: Stored::Secret(stored),
            ..
        }) = head
        else {
            anyhow::bail!("the secret was not stored");
        };
        assert_eq!(stored.kek_id, "k2");
        assert_eq!(
            keyring.open(&stored, "app/prod/db").map_err(anyhow::Error::msg)?,
            b"hunter2"
        );
        Ok(())
    }

    #[tokio::test]
    async fn secrets_sealed_before_a_rotation_are_rewrapped_on_sqlite() {
        let t = TestDatabase::sqlite("config", &crate::MIGRATIONS).await.unwrap();
        a_secret_sealed_before_a_rotation_lands_under_the_new_key(t.db.clone())
            .await
            .unwrap();
        t.cleanup().await.unwrap();
    }

    #[tokio::test]
    async fn secrets_sealed_before_a_rotation_are_rewrapped_on_postgres() {
        let Some(url) = backend_url(Backend::Postgres, "secrets_sealed_before_a_rotation").unwrap() else {
            return;
        };
        let t = TestDatabase::postgres(&url, "config", &crate::MIGRATIONS)
            .await
            .unwrap();
        a_secret_sealed_before_a_rotation_lands_under_the_new_key(t.db.clone())
            .await
            .unwrap();
        t.cleanup().await.unwrap();
    }
}
