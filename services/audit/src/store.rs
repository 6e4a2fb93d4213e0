//! SQL for the audit log, one text for SQLite and PostgreSQL where the
//! dialects agree. Appenders serialise on the `audit_sequence` row, so
//! indexes are dense and become visible in order (no gaps for the
//! integrator to trip on); integrators serialise on the `audit_tree` row,
//! so two replicas never integrate the same leaves twice. The store writes
//! what it is given: validation and all tree arithmetic happen elsewhere.

use std::collections::HashMap;

use plinth_runtime::auth::unix_now_ms;
use plinth_runtime::events::outbox::OutboxEvent;
use plinth_runtime::on_db;
use plinth_runtime::storage::{BeginWrite, Db};

use crate::error::AuditError;
use crate::merkle::{Frontier, Hash, NodeId, decompose};
use crate::model::{ActorKind, Appended, Entry, Erasure, Event, Filter, Outcome, RetentionPolicy};
use crate::note::SignedCheckpoint;

/// One event ready to store: its canonical bytes and their leaf hash.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The event.
    pub event: Event,
    /// Its canonical bytes.
    pub data: Vec<u8>,
    /// Their leaf hash.
    pub leaf_hash: Hash,
}

/// One stored row, as read back.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Row {
    idx: i64,
    event_id: String,
    time_ms: i64,
    tenant: String,
    actor_id: String,
    action: String,
    resource_type: String,
    resource_name: String,
    outcome: i16,
    correlation_id: String,
    data: Option<Vec<u8>>,
    leaf_hash: Vec<u8>,
}

const ROW_COLUMNS: &str = "idx, event_id, time_ms, tenant, actor_id, action, resource_type, resource_name, \
                           CAST(outcome AS SMALLINT) AS outcome, correlation_id, data, leaf_hash";

impl Row {
    /// The entry: the event from its bytes, or what the columns keep of it
    /// once erased.
    pub fn entry(self) -> Result<Entry, AuditError> {
        let leaf_hash = hash_of(&self.leaf_hash)?;
        let index = u64::try_from(self.idx).map_err(|_| AuditError::Corrupt(format!("index {}", self.idx)))?;
        let event = match &self.data {
            Some(bytes) => Event::from_canonical(bytes)?,
            None => Event {
                id: self.event_id,
                time_ms: self.time_ms,
                tenant: self.tenant,
                actor_id: self.actor_id,
                actor_kind: ActorKind::System,
                actor_ip: String::new(),
                actor_user_agent: String::new(),
                action: self.action,
                resource_type: self.resource_type,
                resource_name: self.resource_name,
                outcome: Outcome::from_number(i32::from(self.outcome)).unwrap_or(Outcome::Success),
                reason: String::new(),
                correlation_id: self.correlation_id,
                trace_id: String::new(),
                source: String::new(),
                metadata: serde_json::Map::new(),
            },
        };
        Ok(Entry {
            index,
            event,
            data: self.data,
            leaf_hash,
        })
    }

    /// Whether the query columns say what the hashed bytes say; the first
    /// column that differs otherwise.
    pub fn columns_differ(&self, e: &Event) -> Option<&'static str> {
        let checks = [
            ("event_id", self.event_id == e.id),
            ("time_ms", self.time_ms == e.time_ms),
            ("tenant", self.tenant == e.tenant),
            ("actor_id", self.actor_id == e.actor_id),
            ("action", self.action == e.action),
            ("resource_type", self.resource_type == e.resource_type),
            ("resource_name", self.resource_name == e.resource_name),
            ("outcome", i32::from(self.outcome) == e.outcome.number()),
            ("correlation_id", self.correlation_id == e.correlation_id),
        ];
        checks.into_iter().find(|(_, same)| !same).map(|(name, _)| name)
    }

    /// The index.
    pub fn index(&self) -> i64 {
        self.idx
    }

    /// The stored bytes, unless erased.
    pub fn data(&self) -> Option<&[u8]> {
        self.data.as_deref()
    }

    /// The stored leaf hash.
    pub fn stored_leaf_hash(&self) -> &[u8] {
        &self.leaf_hash
    }
}

fn hash_of(bytes: &[u8]) -> Result<Hash, AuditError> {
    Hash::try_from(bytes).map_err(|_| AuditError::Corrupt(format!("a stored hash is {} bytes", bytes.len())))
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The statements of an append on SQLite (PostgreSQL appends in one, see
/// [`append_in_one_statement`]).
trait LogWrites: Send {
    /// The indexes of those of `ids` already stored.
    fn existing<'a>(
        &'a mut self,
        ids: &'a [String],
    ) -> futures::future::BoxFuture<'a, Result<HashMap<String, i64>, sqlx::Error>>;
    /// Inserts entries at `first`, `first + 1`, …
    fn insert_entries<'a>(
        &'a mut self,
        first: i64,
        rows: &'a [&'a Prepared],
    ) -> futures::future::BoxFuture<'a, Result<(), sqlx::Error>>;
}

impl LogWrites for sqlx::SqliteConnection {
    fn existing<'a>(
        &'a mut self,
        ids: &'a [String],
    ) -> futures::future::BoxFuture<'a, Result<HashMap<String, i64>, sqlx::Error>> {
        Box::pin(async move {
            let mut q = sqlx::QueryBuilder::new("SELECT event_id, idx FROM audit_entries WHERE event_id IN (");
            let mut sep = q.separated(", ");
            for id in ids {
                sep.push_bind(id.as_str());
            }
            q.push(")");
            let rows: Vec<(String, i64)> = q.build_query_as().fetch_all(self).await?;
            Ok(rows.into_iter().collect())
        })
    }

    fn insert_entries<'a>(
        &'a mut self,
        first: i64,
        rows: &'a [&'a Prepared],
    ) -> futures::future::BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            let mut q = sqlx::QueryBuilder::new(
                "INSERT INTO audit_entries (idx, event_id, time_ms, tenant, actor_id, action, resource_type, \
                 resource_name, outcome, correlation_id, data, leaf_hash) ",
            );
            q.push_values(rows.iter().enumerate(), |mut b, (i, p)| {
                let e = &p.event;
                b.push_bind(first + i64::try_from(i).unwrap_or(0))
                    .push_bind(e.id.as_str())
                    .push_bind(e.time_ms)
                    .push_bind(e.tenant.as_str())
                    .push_bind(e.actor_id.as_str())
                    .push_bind(e.action.as_str())
                    .push_bind(e.resource_type.as_str())
                    .push_bind(e.resource_name.as_str())
                    .push_bind(e.outcome.number())
                    .push_bind(e.correlation_id.as_str())
                    .push_bind(p.data.as_slice())
                    .push_bind(p.leaf_hash.as_slice());
            });
            q.build().execute(self).await?;
            Ok(())
        })
    }
}

/// [`Store::append`] on PostgreSQL as one autocommitted statement.
///
/// Appends serialise on the sequence row, which is held until commit, so
/// every round trip inside the transaction is time no other append can use;
/// one statement holds it for the insert and the commit only. Its snapshot
/// is taken before the lock is granted, so an append racing another with
/// the same event id fails on the unique index instead of finding it
/// (see [`append_on_postgres`]).
async fn append_in_one_statement<'e>(
    db: impl sqlx::PgExecutor<'e>,
    batch: &[Prepared],
) -> Result<Vec<Appended>, sqlx::Error> {
    let col = |f: fn(&Event) -> &str| batch.iter().map(|p| f(&p.event)).collect::<Vec<&str>>();
    let time: Vec<i64> = batch.iter().map(|p| p.event.time_ms).collect();
    let outcome: Vec<i16> = batch
        .iter()
        .map(|p| i16::try_from(p.event.outcome.number()).unwrap_or(0))
        .collect();
    let data: Vec<&[u8]> = batch.iter().map(|p| p.data.as_slice()).collect();
    let hashes: Vec<&[u8]> = batch.iter().map(|p| p.leaf_hash.as_slice()).collect();
    let rows: Vec<(String, i64, bool)> = sqlx::query_as(
        "WITH input AS ( \
           SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], \
             $7::text[], $8::smallint[], $9::text[], $10::bytea[], $11::bytea[]) WITH ORDINALITY \
             AS t(event_id, time_ms, tenant, actor_id, action, resource_type, resource_name, outcome, \
                  correlation_id, data, leaf_hash, ord)), \
         firsts AS (SELECT DISTINCT ON (event_id) * FROM input ORDER BY event_id, ord), \
         old AS (SELECT e.event_id, e.idx FROM firsts f JOIN audit_entries e ON e.event_id = f.event_id), \
         fresh AS (SELECT f.*, row_number() OVER (ORDER BY f.ord) - 1 AS rn FROM firsts f \
                   WHERE NOT EXISTS (SELECT 1 FROM old o WHERE o.event_id = f.event_id)), \
         n AS (SELECT count(*) AS n FROM fresh), \
         seq AS (UPDATE audit_sequence SET next_idx = next_idx + (SELECT n FROM n) WHERE id = 1 \
                 RETURNING next_idx), \
         ins AS (INSERT INTO audit_entries (idx, event_id, time_ms, tenant, actor_id, action, resource_type, \
                   resource_name, outcome, correlation_id, data, leaf_hash) \
                 SELECT seq.next_idx - n.n + fresh.rn, fresh.event_id, fresh.time_ms, fresh.tenant, fresh.actor_id, \
                   fresh.action, fresh.resource_type, fresh.resource_name, fresh.outcome, fresh.correlation_id, \
                   fresh.data, fresh.leaf_hash FROM fresh, seq, n ORDER BY fresh.rn \
                 RETURNING event_id, idx) \
         SELECT event_id, idx, false FROM ins UNION ALL SELECT event_id, idx, true FROM old",
    )
    .bind(col(|e| &e.id))
    .bind(time)
    .bind(col(|e| &e.tenant))
    .bind(col(|e| &e.actor_id))
    .bind(col(|e| &e.action))
    .bind(col(|e| &e.resource_type))
    .bind(col(|e| &e.resource_name))
    .bind(outcome)
    .bind(col(|e| &e.correlation_id))
    .bind(data)
    .bind(hashes)
    .fetch_all(db)
    .await?;
    let mut stored: HashMap<String, (i64, bool)> = rows.into_iter().map(|(id, idx, old)| (id, (idx, old))).collect();
    let mut out = Vec::with_capacity(batch.len());
    for p in batch {
        let Some((index, duplicate)) = stored.get_mut(&p.event.id) else {
            return Err(sqlx::Error::Protocol(format!(
                "append returned no index for {}",
                p.event.id
            )));
        };
        out.push(Appended {
            index: u64::try_from(*index).unwrap_or(0),
            id: p.event.id.clone(),
            duplicate: *duplicate,
        });
        // A repeat within the batch is a duplicate of its first occurrence.
        *duplicate = true;
    }
    Ok(out)
}

/// [`Store::append`] on PostgreSQL: [`append_in_one_statement`], and when it
/// lost a race for an event id, again in a transaction that locks the
/// sequence row first, so that its statement sees the winner's entry.
async fn append_on_postgres(pool: &sqlx::PgPool, batch: &[Prepared]) -> Result<Vec<Appended>, AuditError> {
    match append_in_one_statement(pool, batch).await {
        Err(e) if is_unique_violation(&e) => {
            let mut tx = pool.begin().await?;
            sqlx::query("SELECT next_idx FROM audit_sequence WHERE id = 1 FOR UPDATE")
                .execute(&mut *tx)
                .await?;
            let out = append_in_one_statement(&mut *tx, batch).await?;
            tx.commit().await?;
            Ok(out)
        }
        other => Ok(other?),
    }
}

/// Whether `e` is a unique-constraint violation (SQLSTATE 23505).
fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).as_deref() == Some("23505")
}

/// Stored hashes as read: `(level, index, hash)`.
type NodeRows = Vec<(i64, i64, Vec<u8>)>;

/// Reads stored hashes; the SQL differs per backend.
trait NodeReads: Send {
    /// `(level, index, hash)` of those of `ids` that are stored.
    fn read_nodes<'a>(&'a mut self, ids: &'a [NodeId])
    -> futures::future::BoxFuture<'a, Result<NodeRows, sqlx::Error>>;
}

impl NodeReads for sqlx::SqliteConnection {
    /// Literal integers in the text (SQLite prepares cheaply); not kept in
    /// the statement cache, since nearly every text is new.
    fn read_nodes<'a>(
        &'a mut self,
        ids: &'a [NodeId],
    ) -> futures::future::BoxFuture<'a, Result<NodeRows, sqlx::Error>> {
        Box::pin(async move {
            match nodes_sql(ids) {
                None => Ok(Vec::new()),
                Some(sql) => {
                    sqlx::query_as(sqlx::AssertSqlSafe(sql))
                        .persistent(false)
                        .fetch_all(self)
                        .await
                }
            }
        })
    }
}

impl NodeReads for sqlx::PgConnection {
    /// One fixed statement with the ids as arrays, prepared once.
    fn read_nodes<'a>(
        &'a mut self,
        ids: &'a [NodeId],
    ) -> futures::future::BoxFuture<'a, Result<NodeRows, sqlx::Error>> {
        Box::pin(async move {
            let leaves: Vec<i64> = ids.iter().filter(|n| n.level == 0).map(|n| i64_of(n.index)).collect();
            let (levels, indexes): (Vec<i16>, Vec<i64>) = ids
                .iter()
                .filter(|n| n.level > 0)
                .map(|n| (i16::from(n.level), i64_of(n.index)))
                .unzip();
            sqlx::query_as(
                "SELECT CAST(0 AS BIGINT), e.idx, e.leaf_hash FROM UNNEST($1::bigint[]) AS l(idx) \
                 JOIN audit_entries e ON e.idx = l.idx \
                 UNION ALL SELECT CAST(n.level AS BIGINT), n.idx, n.hash \
                 FROM UNNEST($2::smallint[], $3::bigint[]) AS w(level, idx) \
                 JOIN audit_nodes n ON n.level = w.level AND n.idx = w.idx",
            )
            .bind(leaves)
            .bind(levels)
            .bind(indexes)
            .fetch_all(self)
            .await
        })
    }
}

/// The SQL that reads the hashes of `ids` (leaves from the entries, the
/// rest from the nodes). Only integers we computed are spliced in.
fn nodes_sql(ids: &[NodeId]) -> Option<String> {
    let leaves: Vec<String> = ids
        .iter()
        .filter(|n| n.level == 0)
        .map(|n| n.index.to_string())
        .collect();
    let inner: Vec<String> = ids
        .iter()
        .filter(|n| n.level > 0)
        .map(|n| format!("({}, {})", n.level, n.index))
        .collect();
    let mut parts = Vec::new();
    if !leaves.is_empty() {
        parts.push(format!(
            "SELECT CAST(0 AS BIGINT) AS level, idx, leaf_hash AS hash FROM audit_entries WHERE idx IN ({})",
            leaves.join(", ")
        ));
    }
    if !inner.is_empty() {
        parts.push(format!(
            "SELECT CAST(level AS BIGINT) AS level, idx, hash FROM audit_nodes WHERE (level, idx) IN (VALUES {})",
            inner.join(", ")
        ));
    }
    (!parts.is_empty()).then(|| parts.join(" UNION ALL "))
}

fn node_map(rows: NodeRows) -> Result<HashMap<NodeId, Hash>, AuditError> {
    rows.into_iter()
        .map(|(level, idx, hash)| {
            let id = NodeId {
                level: u8::try_from(level).map_err(|_| AuditError::Corrupt(format!("node level {level}")))?,
                index: u64::try_from(idx).map_err(|_| AuditError::Corrupt(format!("node index {idx}")))?,
            };
            Ok((id, hash_of(&hash)?))
        })
        .collect()
}

/// A value bound into a dynamically built query.
enum Bind {
    Text(String),
    Int(i64),
}

/// The audit tables.
#[derive(Clone)]
pub struct Store {
    pub(crate) db: Db,
}

impl Store {
    /// The store in `db` (migrated with [`crate::MIGRATIONS`]).
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The database, for tests that tamper with it.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Appends in one transaction; ids already stored (or repeated within
    /// the batch) are answered with their existing index.
    pub async fn append(&self, batch: &[Prepared]) -> Result<Vec<Appended>, AuditError> {
        let pool = match &self.db {
            Db::Postgres(pool) => return append_on_postgres(pool, batch).await,
            Db::Sqlite(pool) => pool,
        };
        let ids: Vec<String> = batch.iter().map(|p| p.event.id.clone()).collect();
        {
            let mut tx = pool.begin_write().await?;
            let (next,): (i64,) =
                sqlx::query_as("UPDATE audit_sequence SET next_idx = next_idx WHERE id = 1 RETURNING next_idx")
                    .fetch_one(&mut *tx)
                    .await?;
            let mut known = tx.existing(&ids).await?;
            let mut fresh: Vec<&Prepared> = Vec::new();
            let mut out = Vec::with_capacity(batch.len());
            for p in batch {
                let (index, duplicate) = match known.get(&p.event.id) {
                    Some(i) => (*i, true),
                    None => {
                        let i = next + i64::try_from(fresh.len()).unwrap_or(0);
                        known.insert(p.event.id.clone(), i);
                        fresh.push(p);
                        (i, false)
                    }
                };
                out.push(Appended {
                    index: u64::try_from(index).unwrap_or(0),
                    id: p.event.id.clone(),
                    duplicate,
                });
            }
            if !fresh.is_empty() {
                tx.insert_entries(next, &fresh).await?;
                sqlx::query("UPDATE audit_sequence SET next_idx = $1 WHERE id = 1")
                    .bind(next + i64::try_from(fresh.len()).unwrap_or(0))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(out)
        }
    }

    /// Entries appended so far (integrated or not).
    pub async fn appended(&self) -> Result<u64, AuditError> {
        let (n,): (i64,) = on_db!(&self.db, |pool| {
            sqlx::query_as("SELECT next_idx FROM audit_sequence WHERE id = 1")
                .fetch_one(pool)
                .await?
        });
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Entries in the tree (covered by the latest checkpoint).
    pub async fn tree_size(&self) -> Result<u64, AuditError> {
        let (n,): (i64,) = on_db!(&self.db, |pool| {
            sqlx::query_as("SELECT size FROM audit_tree WHERE id = 1")
                .fetch_one(pool)
                .await?
        });
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Integrates up to `batch` new entries into the tree and stores the
    /// checkpoint `sign` makes for the new tree, in one transaction.
    /// `cache` is the frontier this replica last saw; it is reloaded when
    /// another replica integrated in between. `None` when nothing was new.
    pub async fn integrate(
        &self,
        cache: &mut Option<Frontier>,
        batch: usize,
        sign: &(dyn Fn(u64, Hash) -> SignedCheckpoint + Send + Sync),
        announce: &(dyn Fn(&SignedCheckpoint) -> OutboxEvent + Send + Sync),
    ) -> Result<Option<SignedCheckpoint>, AuditError> {
        let limit = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
        let cached = cache.take();
        let result: Result<(Frontier, Option<SignedCheckpoint>), AuditError> = on_db!(&self.db, |pool| async {
            let mut tx = pool.begin_write().await?;
            let (size,): (i64,) = sqlx::query_as("UPDATE audit_tree SET size = size WHERE id = 1 RETURNING size")
                .fetch_one(&mut *tx)
                .await?;
            let leaves: Vec<(i64, Vec<u8>)> =
                sqlx::query_as("SELECT idx, leaf_hash FROM audit_entries WHERE idx >= $1 ORDER BY idx LIMIT $2")
                    .bind(size)
                    .bind(limit)
                    .fetch_all(&mut *tx)
                    .await?;
            let size = u64::try_from(size).unwrap_or(0);
            let mut frontier = match cached {
                Some(f) if f.size() == size => f,
                _ => {
                    let ids = decompose((0, size));
                    let found = node_map(tx.read_nodes(&ids).await?)?;
                    let nodes = ids
                        .iter()
                        .map(|id| found.get(id).map(|h| (*id, *h)))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| AuditError::Corrupt(format!("tree nodes of size {size} are missing")))?;
                    Frontier::from_nodes(size, nodes)
                        .ok_or_else(|| AuditError::Corrupt(format!("tree nodes of size {size} do not fit")))?
                }
            };
            if leaves.is_empty() {
                tx.rollback().await?;
                return Ok((frontier, None));
            }
            let mut completed = Vec::new();
            for (idx, hash) in &leaves {
                if u64::try_from(*idx).ok() != Some(frontier.size()) {
                    return Err(AuditError::Corrupt(format!(
                        "entry {} is missing before entry {idx}",
                        frontier.size()
                    )));
                }
                completed.extend(frontier.push(hash_of(hash)?));
            }
            for chunk in completed.chunks(1000) {
                let mut q = sqlx::QueryBuilder::new("INSERT INTO audit_nodes (level, idx, hash) ");
                q.push_values(chunk, |mut b, (id, hash)| {
                    b.push_bind(i16::from(id.level))
                        .push_bind(i64_of(id.index))
                        .push_bind(hash.to_vec());
                });
                q.build().execute(&mut *tx).await?;
            }
            let new_size = frontier.size();
            sqlx::query("UPDATE audit_tree SET size = $1 WHERE id = 1")
                .bind(i64_of(new_size))
                .execute(&mut *tx)
                .await?;
            let signed = sign(new_size, frontier.root());
            sqlx::query(
                "INSERT INTO audit_checkpoints (tree_size, root_hash, signed_at, note) VALUES ($1, $2, $3, $4)",
            )
            .bind(i64_of(signed.tree_size))
            .bind(signed.root.to_vec())
            .bind(i64::try_from(signed.time_secs).unwrap_or(0).saturating_mul(1000))
            .bind(&signed.note)
            .execute(&mut *tx)
            .await?;
            announce(&signed).write(&mut *tx).await?;
            tx.commit().await?;
            Ok((frontier, Some(signed)))
        }
        .await);
        let (frontier, signed) = result?;
        *cache = Some(frontier);
        Ok(signed)
    }

    /// The hashes of `ids`; an id with no stored hash is missing from the map.
    pub async fn nodes(&self, ids: &[NodeId]) -> Result<HashMap<NodeId, Hash>, AuditError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: NodeRows = on_db!(&self.db, |pool| {
            let mut conn = pool.acquire().await?;
            conn.read_nodes(ids).await?
        });
        node_map(rows)
    }

    /// Stored nodes of `level` with index in `[from, to)`, in order.
    pub async fn level_nodes(&self, level: u8, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
        let rows: Vec<(i64, Vec<u8>)> = on_db!(&self.db, |pool| {
            sqlx::query_as("SELECT idx, hash FROM audit_nodes WHERE level = $1 AND idx >= $2 AND idx < $3 ORDER BY idx")
                .bind(i16::from(level))
                .bind(i64_of(from))
                .bind(i64_of(to))
                .fetch_all(pool)
                .await?
        });
        Ok(rows
            .into_iter()
            .map(|(i, h)| (u64::try_from(i).unwrap_or(0), h))
            .collect())
    }

    /// The latest checkpoint, if any was signed.
    pub async fn latest_checkpoint(&self) -> Result<Option<(SignedCheckpoint, i64)>, AuditError> {
        let row: Option<(i64, Vec<u8>, i64, String)> = on_db!(&self.db, |pool| {
            sqlx::query_as(
                "SELECT tree_size, root_hash, signed_at, note FROM audit_checkpoints ORDER BY tree_size DESC LIMIT 1",
            )
            .fetch_optional(pool)
            .await?
        });
        row.map(checkpoint_of).transpose()
    }

    /// Checkpoints with sizes in `(after, ..]`, smallest first, at most `limit`.
    pub async fn checkpoints_after(&self, after: u64, limit: usize) -> Result<Vec<SignedCheckpoint>, AuditError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<(i64, Vec<u8>, i64, String)> = on_db!(&self.db, |pool| {
            sqlx::query_as(
                "SELECT tree_size, root_hash, signed_at, note FROM audit_checkpoints WHERE tree_size > $1 \
                 ORDER BY tree_size LIMIT $2",
            )
            .bind(i64_of(after))
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(|r| checkpoint_of(r).map(|(c, _)| c)).collect()
    }

    /// One entry by index.
    pub async fn entry(&self, index: u64) -> Result<Option<Row>, AuditError> {
        let sql = format!("SELECT {ROW_COLUMNS} FROM audit_entries WHERE idx = $1");
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(i64_of(index))
                .fetch_optional(pool)
                .await?
        }))
    }

    /// The index of the entry with this event id.
    pub async fn index_of(&self, event_id: &str) -> Result<Option<u64>, AuditError> {
        let row: Option<(i64,)> = on_db!(&self.db, |pool| {
            sqlx::query_as("SELECT idx FROM audit_entries WHERE event_id = $1")
                .bind(event_id)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(i,)| u64::try_from(i).unwrap_or(0)))
    }

    /// Entries `[from, from + limit)` in order, for verification.
    pub async fn scan(&self, from: u64, limit: i64) -> Result<Vec<Row>, AuditError> {
        let sql = format!("SELECT {ROW_COLUMNS} FROM audit_entries WHERE idx >= $1 ORDER BY idx LIMIT $2");
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(i64_of(from))
                .bind(limit)
                .fetch_all(pool)
                .await?
        }))
    }

    /// A page of entries matching `filter`, after `cursor` (an index) in the
    /// listing's order.
    pub async fn list(
        &self,
        filter: &Filter,
        cursor: Option<u64>,
        oldest_first: bool,
        limit: usize,
    ) -> Result<Vec<Row>, AuditError> {
        let mut conditions: Vec<String> = Vec::new();
        let mut binds: Vec<Bind> = Vec::new();
        let mut add = |sql: &str, b: Bind| {
            binds.push(b);
            conditions.push(sql.replace('?', &format!("${}", binds.len())));
        };
        let texts = [
            ("actor_id = ?", &filter.actor_id),
            ("resource_type = ?", &filter.resource_type),
            ("resource_name = ?", &filter.resource_name),
            ("correlation_id = ?", &filter.correlation_id),
            ("tenant = ?", &filter.tenant),
        ];
        for (sql, value) in texts {
            if !value.is_empty() {
                add(sql, Bind::Text(value.clone()));
            }
        }
        if !filter.action_prefix.is_empty() {
            add("action >= ?", Bind::Text(filter.action_prefix.clone()));
            // Actions are ASCII; the prefix's successor bounds the range.
            let mut upper = filter.action_prefix.clone().into_bytes();
            if let Some(last) = upper.last_mut() {
                *last = last.saturating_add(1);
            }
            add("action < ?", Bind::Text(String::from_utf8_lossy(&upper).into_owned()));
        }
        if let Some(o) = filter.outcome {
            add("outcome = ?", Bind::Int(i64::from(o.number())));
        }
        if let Some(t) = filter.start_ms {
            add("time_ms >= ?", Bind::Int(t));
        }
        if let Some(t) = filter.end_ms {
            add("time_ms < ?", Bind::Int(t));
        }
        if let Some(c) = cursor {
            add(if oldest_first { "idx > ?" } else { "idx < ?" }, Bind::Int(i64_of(c)));
        }
        let mut sql = format!("SELECT {ROW_COLUMNS} FROM audit_entries");
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        sql.push_str(if oldest_first {
            " ORDER BY idx LIMIT "
        } else {
            " ORDER BY idx DESC LIMIT "
        });
        sql.push_str(&limit.to_string());
        // Planned for these values each time (not cached): a generic plan
        // cannot know whether an action prefix matches a few rows (walk its
        // index) or a quarter of the log (walk the log newest first).
        Ok(on_db!(&self.db, |pool| {
            let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql)).persistent(false);
            for b in &binds {
                q = match b {
                    Bind::Text(t) => q.bind(t.as_str()),
                    Bind::Int(i) => q.bind(*i),
                };
            }
            q.fetch_all(pool).await?
        }))
    }

    /// Creates or replaces a retention policy.
    pub async fn set_policy(&self, p: &RetentionPolicy) -> Result<(), AuditError> {
        on_db!(&self.db, |pool| {
            sqlx::query(
                "INSERT INTO audit_retention (name, action_prefix, tenant, retain_ms, updated_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET action_prefix = $2, tenant = $3, \
                 retain_ms = $4, updated_at = $5",
            )
            .bind(&p.name)
            .bind(&p.action_prefix)
            .bind(&p.tenant)
            .bind(p.retain_ms)
            .bind(p.updated_ms)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Every retention policy, by name.
    pub async fn policies(&self) -> Result<Vec<RetentionPolicy>, AuditError> {
        let rows: Vec<(String, String, String, i64, i64)> = on_db!(&self.db, |pool| {
            sqlx::query_as(
                "SELECT name, action_prefix, tenant, retain_ms, updated_at FROM audit_retention ORDER BY name",
            )
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(name, action_prefix, tenant, retain_ms, updated_ms)| RetentionPolicy {
                name,
                action_prefix,
                tenant,
                retain_ms,
                updated_ms,
            })
            .collect())
    }

    /// Removes a policy; whether it existed.
    pub async fn delete_policy(&self, name: &str) -> Result<bool, AuditError> {
        self.delete_named("audit_retention", name).await
    }

    /// Deletes the row named `name` from `table` (one of ours, keyed by
    /// `name`); whether it existed.
    pub(crate) async fn delete_named(&self, table: &'static str, name: &str) -> Result<bool, AuditError> {
        let sql = format!("DELETE FROM {table} WHERE name = $1");
        let n = on_db!(&self.db, |pool| {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(name)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n > 0)
    }

    /// Erases up to `batch` entries `what` covers (payload and personal
    /// columns gone, leaf hash kept); how many.
    pub async fn erase(&self, what: &Erasure, batch: i64, now_ms: i64) -> Result<u64, AuditError> {
        let (condition, binds): (&str, Vec<Bind>) = match what {
            Erasure::Expired {
                action_prefix,
                tenant,
                before_ms,
            } => {
                let mut upper = action_prefix.clone().into_bytes();
                match upper.last_mut() {
                    Some(last) => *last = last.saturating_add(1),
                    None => upper = vec![0x7f],
                }
                let upper = String::from_utf8_lossy(&upper).into_owned();
                let condition = if tenant.is_empty() {
                    "time_ms < $3 AND action >= $4 AND action < $5 AND $6 = ''"
                } else {
                    "time_ms < $3 AND action >= $4 AND action < $5 AND tenant = $6"
                };
                (
                    condition,
                    vec![
                        Bind::Int(*before_ms),
                        Bind::Text(action_prefix.clone()),
                        Bind::Text(upper),
                        Bind::Text(tenant.clone()),
                    ],
                )
            }
            Erasure::Subject(subject) => (
                "(actor_id = $3 OR resource_name = $3)",
                vec![Bind::Text(subject.clone())],
            ),
        };
        let sql = format!(
            "UPDATE audit_entries SET data = NULL, actor_id = '', resource_name = '', correlation_id = '', \
             erased_at = $1 WHERE idx IN (SELECT idx FROM audit_entries WHERE data IS NOT NULL AND {condition} \
             ORDER BY idx LIMIT $2)"
        );
        let done = on_db!(&self.db, |pool| {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now_ms).bind(batch);
            for b in &binds {
                q = match b {
                    Bind::Text(t) => q.bind(t.as_str()),
                    Bind::Int(i) => q.bind(*i),
                };
            }
            q.execute(pool).await?.rows_affected()
        });
        Ok(done)
    }

    /// The stored checkpoint signing seed, generating and storing `fresh`
    /// when there is none yet (all replicas end up with the first one).
    pub async fn signing_seed(&self, fresh: [u8; 32]) -> Result<[u8; 32], AuditError> {
        let seed: (Vec<u8>,) = on_db!(&self.db, |pool| {
            sqlx::query("INSERT INTO audit_keys (id, seed, created_at) VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING")
                .bind(fresh.to_vec())
                .bind(unix_now_ms())
                .execute(pool)
                .await?;
            sqlx::query_as("SELECT seed FROM audit_keys WHERE id = 1")
                .fetch_one(pool)
                .await?
        });
        <[u8; 32]>::try_from(seed.0.as_slice()).map_err(|_| AuditError::Corrupt("stored signing key".into()))
    }
}

fn checkpoint_of(
    (size, root, signed_at, note): (i64, Vec<u8>, i64, String),
) -> Result<(SignedCheckpoint, i64), AuditError> {
    Ok((
        SignedCheckpoint {
            tree_size: u64::try_from(size).unwrap_or(0),
            root: hash_of(&root)?,
            time_secs: u64::try_from(signed_at / 1000).unwrap_or(0),
            note,
        },
        signed_at,
    ))
}
