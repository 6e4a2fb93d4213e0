//! SQL for queues and messages, written once for SQLite and PostgreSQL
//! where the dialects agree. Storage writes what it is given: validation
//! happens before a call reaches here; only what must be decided under the
//! transaction's locks (dedup, lease tokens, rate and concurrency limits) is
//! decided inside.
//!
//! Table design for throughput under bloat: an acknowledged message is
//! deleted in the ack's statement, so the tables hold only live work and
//! dead letters; every hot query (claim, due sweep, counts) walks a partial
//! or leading-column index, never the table. Claims on PostgreSQL take rows
//! with `FOR UPDATE SKIP LOCKED`, so concurrent workers never queue behind
//! each other's row locks.
//!
//! Fairness: each message carries a start tag (`slot`). A group's messages
//! get consecutive slots from the group's counter, which first catches up
//! with the slot of the message about to be handed out; a message without
//! a group gets the slot just behind that head. A busy group's
//! backlog therefore holds far-future slots while a quiet group's new
//! message lands next to the head, so ready messages interleave across
//! groups (start-time fair queueing) with one ordered index scan.

use std::collections::{BTreeMap, HashMap, HashSet};

use plinth::queue::v1 as pb;
use plinth_runtime::events::outbox::OutboxEvent;
use plinth_runtime::on_db;
use plinth_runtime::storage::{BeginWrite, Db};
use plinth_runtime::wire::timestamp;

use crate::error::QueueError;
use crate::model::{
    AckOutcome, Backoff, Counts, Enqueued, Leased, Message, NewMessage, Queue, RetryFilter, Settings, State,
};

/// The channel PostgreSQL replicas announce new ready work on.
pub const NOTIFY_CHANNEL: &str = "plinth_queue";

/// Binds a queue's settings, in column order from `max_attempts` to
/// `fifo_groups`, to `$q`.
macro_rules! bind_settings {
    ($q:expr, $s:expr) => {
        $q.bind($s.max_attempts)
            .bind($s.backoff.initial_ms)
            .bind($s.backoff.max_ms)
            .bind($s.backoff.multiplier)
            .bind($s.backoff.jitter)
            .bind($s.lease_ms)
            .bind($s.ttl_ms)
            .bind($s.dedup_window_ms)
            .bind($s.rate_limit)
            .bind($s.max_concurrency)
            .bind($s.depth_alert)
            .bind(&$s.dead_letter_queue)
            .bind($s.fifo_groups)
    };
}

macro_rules! queue_columns {
    () => {
        "name, max_attempts, backoff_initial_ms, backoff_max_ms, backoff_multiplier, backoff_jitter, lease_ms, \
         ttl_ms, dedup_window_ms, rate_limit, max_concurrency, depth_alert, dead_letter_queue, fifo_groups, paused, \
         drain_state, generation, created_at, updated_at"
    };
}

macro_rules! message_columns {
    () => {
        "id, queue, state, priority, slot, group_key, ready_at, next_at, expires_at, attempts, lease_token, payload, \
         content_type, headers, dedup_key, last_error, origin_queue, enqueued_at"
    };
}

/// What a claim reads back of each message: the columns it did not just
/// set itself (state, token and lease expiry are the claim's own, the queue
/// is the one claimed from). Every column costs a copy per row on SQLite.
macro_rules! claimed_columns {
    () => {
        "id, priority, slot, group_key, ready_at, expires_at, attempts, payload, content_type, headers, dedup_key, \
         last_error, origin_queue, enqueued_at"
    };
}

/// `claimed_columns!` of the claim's `UPDATE messages m`.
macro_rules! returned_claimed_columns {
    () => {
        "m.id, m.priority, m.slot, m.group_key, m.ready_at, m.expires_at, m.attempts, m.payload, m.content_type, \
         m.headers, m.dedup_key, m.last_error, m.origin_queue, m.enqueued_at"
    };
}

/// The condition of `messages_by_state`, which leaves ready messages out
/// (they have `messages_ready`; see the SQLite migration 3003). SQLite uses
/// a partial index only for a query that states its condition word for word,
/// so every lookup of scheduled, leased or dead messages by queue adds it.
macro_rules! not_ready {
    () => {
        "state <> 2"
    };
}

/// The claim condition of a FIFO-groups queue on candidate `c` (in queue
/// `$3`): no group, or the oldest scheduled, ready or leased message of its
/// group (`messages_group_head`).
macro_rules! group_head {
    () => {
        "(c.group_key = '' OR c.id = (SELECT h.id FROM messages h WHERE h.queue = $3 AND h.group_key = c.group_key \
         AND h.group_key <> '' AND h.state IN (1, 2, 3) ORDER BY h.id LIMIT 1))"
    };
}

/// Dead-letters `failures` (a `Vec<Failure>`) in the transaction `$tx`:
/// moved as READY to their queue's dead letter queue when it has one that
/// exists, else DEAD where they are; one event each. Evaluates to the
/// queues that gained ready messages. A macro so that one text serves
/// both backends' transactions inside [`on_db!`].
macro_rules! dead_letter {
    ($tx:expr, $failures:expr, $now:expr) => {{
        let now: i64 = $now;
        let mut woken: Vec<String> = Vec::new();
        let mut targets: HashMap<String, Option<String>> = HashMap::new();
        for f in $failures {
            let f: Failure = f;
            if !targets.contains_key(&f.queue) {
                let dlq: Option<(String,)> = sqlx::query_as(
                    "SELECT d.name FROM queues q JOIN queues d ON d.name = q.dead_letter_queue WHERE q.name = $1",
                )
                .bind(&f.queue)
                .fetch_optional(&mut *$tx)
                .await?;
                targets.insert(f.queue.clone(), dlq.map(|(d,)| d));
            }
            let dlq = targets.get(&f.queue).cloned().flatten();
            match &dlq {
                Some(dlq) => {
                    sqlx::query(
                        "UPDATE messages SET queue = $2, state = 2, attempts = 0, origin_queue = $3, lease_token = NULL, \
                         ready_at = $4, next_at = $4, expires_at = NULL, last_error = $5 WHERE id = $1",
                    )
                    .bind(f.id)
                    .bind(dlq)
                    .bind(&f.queue)
                    .bind(now)
                    .bind(&f.last_error)
                    .execute(&mut *$tx)
                    .await?;
                    woken.push(dlq.clone());
                }
                None => {
                    sqlx::query(
                        "UPDATE messages SET state = 4, lease_token = NULL, next_at = $2, last_error = $3 WHERE id = $1",
                    )
                    .bind(f.id)
                    .bind(now)
                    .bind(&f.last_error)
                    .execute(&mut *$tx)
                    .await?;
                }
            }
            let event = pb::MessageDeadLetteredEvent {
                queue: f.queue.clone(),
                message_id: f.id,
                attempts: f.attempts,
                reason: f.reason.into(),
                last_error: f.last_error,
                dead_letter_queue: dlq.unwrap_or_default(),
                time: Some(timestamp(now)),
            };
            OutboxEvent::new("plinth.queue.dead_lettered", f.queue.as_str(), &event)
                .write(&mut *$tx)
                .await?;
        }
        woken
    }};
}

#[derive(sqlx::FromRow)]
struct QueueRow {
    name: String,
    max_attempts: i32,
    backoff_initial_ms: i64,
    backoff_max_ms: i64,
    backoff_multiplier: f64,
    backoff_jitter: bool,
    lease_ms: i64,
    ttl_ms: i64,
    dedup_window_ms: i64,
    rate_limit: f64,
    max_concurrency: i32,
    depth_alert: i64,
    dead_letter_queue: String,
    fifo_groups: bool,
    paused: bool,
    drain_state: i32,
    generation: i64,
    created_at: i64,
    updated_at: i64,
}

impl From<QueueRow> for Queue {
    fn from(r: QueueRow) -> Self {
        Queue {
            name: r.name,
            settings: Settings {
                max_attempts: r.max_attempts,
                backoff: Backoff {
                    initial_ms: r.backoff_initial_ms,
                    max_ms: r.backoff_max_ms,
                    multiplier: r.backoff_multiplier,
                    jitter: r.backoff_jitter,
                },
                lease_ms: r.lease_ms,
                ttl_ms: r.ttl_ms,
                dedup_window_ms: r.dedup_window_ms,
                rate_limit: r.rate_limit,
                max_concurrency: r.max_concurrency,
                depth_alert: r.depth_alert,
                dead_letter_queue: r.dead_letter_queue,
                fifo_groups: r.fifo_groups,
            },
            paused: r.paused,
            drain_state: r.drain_state,
            generation: r.generation,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// A stored message's columns, less those a claim sets itself (see
/// [`claimed_columns!`]).
#[derive(sqlx::FromRow)]
struct MessageBody {
    id: i64,
    priority: i32,
    slot: i64,
    group_key: String,
    ready_at: i64,
    expires_at: Option<i64>,
    attempts: i32,
    payload: Vec<u8>,
    content_type: String,
    headers: String,
    dedup_key: String,
    last_error: String,
    origin_queue: String,
    enqueued_at: i64,
}

impl MessageBody {
    fn into_message(self, queue: String, state: State, next_at: i64, lease_token: Option<i64>) -> Message {
        Message {
            id: self.id,
            queue,
            state,
            payload: self.payload,
            content_type: self.content_type,
            headers: if self.headers.is_empty() {
                BTreeMap::new()
            } else {
                serde_json::from_str(&self.headers).unwrap_or_default()
            },
            priority: self.priority,
            dedup_key: self.dedup_key,
            group_key: self.group_key,
            attempts: self.attempts,
            enqueued_at: self.enqueued_at,
            next_at,
            ready_at: self.ready_at,
            expires_at: self.expires_at,
            last_error: self.last_error,
            origin_queue: self.origin_queue,
            lease_token,
        }
    }

    /// The delivery this row became: leased from `queue` with `token` until `expires`.
    fn into_leased(self, queue: &str, token: i64, expires: i64) -> Leased {
        Leased {
            message: self.into_message(queue.to_owned(), State::Leased, expires, Some(token)),
            token,
            expires_at: expires,
        }
    }
}

/// A whole stored message ([`message_columns!`]).
#[derive(sqlx::FromRow)]
struct MessageRow {
    queue: String,
    state: i32,
    next_at: i64,
    lease_token: Option<i64>,
    #[sqlx(flatten)]
    body: MessageBody,
}

impl MessageRow {
    fn into_message(self) -> Message {
        let state = State::from_i32(self.state).unwrap_or(State::Dead);
        self.body
            .into_message(self.queue, state, self.next_at, self.lease_token)
    }
}

/// A message row to insert.
struct NewRow {
    state: i32,
    priority: i32,
    slot: i64,
    group_key: String,
    ready_at: i64,
    expires_at: Option<i64>,
    payload: Vec<u8>,
    content_type: String,
    headers: String,
    dedup_key: String,
}

/// Bulk insert of message rows on a backend's connection: one statement
/// per call, answering (id, state) per row.
trait InsertRows: Send {
    fn insert_rows<'a>(
        &'a mut self,
        queue: &'a str,
        rows: Vec<NewRow>,
        now: i64,
    ) -> futures::future::BoxFuture<'a, Result<Vec<(i64, i32)>, sqlx::Error>>;
}

impl InsertRows for sqlx::SqliteConnection {
    fn insert_rows<'a>(
        &'a mut self,
        queue: &'a str,
        rows: Vec<NewRow>,
        now: i64,
    ) -> futures::future::BoxFuture<'a, Result<Vec<(i64, i32)>, sqlx::Error>> {
        Box::pin(async move {
            let mut q = sqlx::QueryBuilder::new(
                "INSERT INTO messages (queue, state, priority, slot, group_key, ready_at, next_at, expires_at, \
                 payload, content_type, headers, dedup_key, enqueued_at) ",
            );
            q.push_values(rows, |mut b, r| {
                b.push_bind(queue.to_owned())
                    .push_bind(r.state)
                    .push_bind(r.priority)
                    .push_bind(r.slot)
                    .push_bind(r.group_key)
                    .push_bind(r.ready_at)
                    .push_bind(r.ready_at)
                    .push_bind(r.expires_at)
                    .push_bind(r.payload)
                    .push_bind(r.content_type)
                    .push_bind(r.headers)
                    .push_bind(r.dedup_key)
                    .push_bind(now);
            });
            q.push(" RETURNING id, state");
            q.build_query_as().fetch_all(self).await
        })
    }
}

impl InsertRows for sqlx::PgConnection {
    /// Columns as arrays through `UNNEST`: one short statement that
    /// PostgreSQL parses and plans once, whatever the batch size, instead of
    /// thirteen parameters per row.
    fn insert_rows<'a>(
        &'a mut self,
        queue: &'a str,
        rows: Vec<NewRow>,
        now: i64,
    ) -> futures::future::BoxFuture<'a, Result<Vec<(i64, i32)>, sqlx::Error>> {
        Box::pin(async move {
            let n = rows.len();
            let mut state = Vec::with_capacity(n);
            let mut priority = Vec::with_capacity(n);
            let mut slot = Vec::with_capacity(n);
            let mut group_key = Vec::with_capacity(n);
            let mut ready_at = Vec::with_capacity(n);
            let mut expires_at = Vec::with_capacity(n);
            let mut payload = Vec::with_capacity(n);
            let mut content_type = Vec::with_capacity(n);
            let mut headers = Vec::with_capacity(n);
            let mut dedup_key = Vec::with_capacity(n);
            for r in rows {
                state.push(r.state);
                priority.push(r.priority);
                slot.push(r.slot);
                group_key.push(r.group_key);
                ready_at.push(r.ready_at);
                expires_at.push(r.expires_at);
                payload.push(r.payload);
                content_type.push(r.content_type);
                headers.push(r.headers);
                dedup_key.push(r.dedup_key);
            }
            sqlx::query_as(
                "INSERT INTO messages (queue, state, priority, slot, group_key, ready_at, next_at, expires_at, \
                 payload, content_type, headers, dedup_key, enqueued_at) \
                 SELECT $1, s, p, sl, g, r, r, e, pl, ct, h, d, $2 FROM UNNEST($3::int[], $4::int[], $5::bigint[], \
                 $6::text[], $7::bigint[], $8::bigint[], $9::bytea[], $10::text[], $11::text[], $12::text[]) \
                 AS t(s, p, sl, g, r, e, pl, ct, h, d) RETURNING id, state",
            )
            .bind(queue)
            .bind(now)
            .bind(state)
            .bind(priority)
            .bind(slot)
            .bind(group_key)
            .bind(ready_at)
            .bind(expires_at)
            .bind(payload)
            .bind(content_type)
            .bind(headers)
            .bind(dedup_key)
            .fetch_all(self)
            .await
        })
    }
}

/// Queue names, (queue, state, count) rows and (queue, oldest ready) rows.
type DepthRows = (Vec<(String,)>, Vec<(String, i32, i64)>, Vec<(String, Option<i64>)>);

fn add_count(c: &mut Counts, state: i32, n: i64) {
    match State::from_i32(state) {
        Some(State::Scheduled) => c.scheduled += n,
        Some(State::Ready) => c.ready += n,
        Some(State::Leased) => c.leased += n,
        Some(State::Dead) | None => c.dead += n,
    }
}

/// One failed message on its way to the dead letters.
struct Failure {
    id: i64,
    queue: String,
    attempts: i32,
    last_error: String,
    reason: &'static str,
}

/// What a sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Queues that gained ready messages (wake their waiters).
    pub woken: HashSet<String>,
    /// Scheduled messages that became ready.
    pub promoted: u64,
    /// Expired leases made ready again, per queue.
    pub expired_leases: HashMap<String, u64>,
    /// Messages dead-lettered (attempts exhausted on expiry, TTL), per queue.
    pub dead_lettered: HashMap<String, u64>,
    /// Whether any event was written.
    pub events: bool,
}

/// Rows touched per sweep statement, so one sweep never holds locks long.
const SWEEP_BATCH: i64 = 2000;

/// Scheduled messages due at `$1`, at most `$2`, soonest first. SQLite takes
/// a partial index only for a query that repeats its condition word for
/// word, so `messages_due`'s `state IN (1, 3)` is spelled out beside
/// `state = 1`; without it every sweep (each `sweep_ms`) read the whole
/// table.
macro_rules! due_scheduled {
    () => {
        "SELECT id FROM messages WHERE state = 1 AND state IN (1, 3) AND next_at <= $1 ORDER BY next_at LIMIT $2"
    };
}

/// Messages of queue `$1` in state `$2` after id `$3`, at most `$4`, by id:
/// ready messages through `messages_ready`, whose ids are then sorted (so a
/// page costs in proportion to that queue's ready backlog, ~20 ms at
/// 180,000; with statistics SQLite would otherwise walk every queue's rows
/// by id), the others through `messages_by_state`.
const READY_BY_ID: &str = concat!(
    "SELECT ",
    message_columns!(),
    " FROM messages WHERE queue = $1 AND state = $2 AND state = 2 AND id > $3 ORDER BY id LIMIT $4"
);
const READY_BY_ID_SQLITE: &str = concat!(
    "SELECT ",
    message_columns!(),
    " FROM messages INDEXED BY messages_ready WHERE queue = $1 AND state = $2 AND state = 2 AND id > $3 \
     ORDER BY id LIMIT $4"
);
const NOT_READY_BY_ID: &str = concat!(
    "SELECT ",
    message_columns!(),
    " FROM messages WHERE queue = $1 AND state = $2 AND ",
    not_ready!(),
    " AND id > $3 ORDER BY id LIMIT $4"
);

/// Dead messages, through `messages_by_state`.
const DEAD: &str = concat!("state = 4 AND ", not_ready!());
/// Ready messages of queue `$1`: how many, and deleting them.
const READY_COUNT: &str = "SELECT COUNT(*) FROM messages WHERE queue = $1 AND state = 2";
const DELETE_READY: &str = "DELETE FROM messages WHERE queue = $1 AND state = 2";
/// Every other message of queue `$1`, deleted.
const DELETE_NOT_READY: &str = concat!("DELETE FROM messages WHERE queue = $1 AND ", not_ready!());
/// Leases of queue `$1`: all, and those unexpired at `$2`.
const LEASED_COUNT: &str = concat!(
    "SELECT COUNT(*) FROM messages WHERE queue = $1 AND state = 3 AND ",
    not_ready!()
);
const UNEXPIRED_LEASED_COUNT: &str = concat!(
    "SELECT COUNT(*) FROM messages WHERE queue = $1 AND state = 3 AND next_at > $2 AND ",
    not_ready!()
);

/// Messages per queue and state, each state counted through its index.
const COUNTS_BY_STATE: &str = concat!(
    "SELECT queue, state, COUNT(*) FROM messages WHERE ",
    not_ready!(),
    " GROUP BY queue, state UNION ALL SELECT queue, 2, COUNT(*) FROM messages WHERE state = 2 GROUP BY queue"
);

/// Leases expired at `$1`, at most `$2`, through `messages_due` as above.
const EXPIRED_LEASES: &str = "SELECT m.id, m.queue, m.attempts, q.max_attempts, m.last_error FROM messages m \
     JOIN queues q ON q.name = m.queue WHERE m.state = 3 AND m.state IN (1, 3) AND m.next_at <= $1 \
     ORDER BY m.next_at LIMIT $2";

/// Plans for the hot path that do not depend on statistics (PostgreSQL, for
/// one transaction). A claim has one good plan — walk the ready index in
/// order and stop after `max` rows — and an ack one — look each id up by
/// primary key; costs are only ever a reason to pick worse ones. Statistics
/// lag a queue table that grows by thousands of rows a second or holds a
/// backlog of another queue, and the planner then sorts a whole queue per
/// claim and hash-joins it per ack: with 37,000 ready rows of another queue
/// in the table, a steady 13,000 jobs/s went from p50 16 ms to 3 s.
const BY_INDEX_ONLY: &str = "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; \
     SET LOCAL enable_sort = off; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off";

/// The queue service's tables.
#[derive(Clone)]
pub struct Store {
    db: Db,
}

impl Store {
    /// Queries `db` (already migrated).
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The pool, for the PostgreSQL listener.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Whether this is the embedded SQLite store (one writer at a time).
    pub fn is_sqlite(&self) -> bool {
        matches!(self.db, Db::Sqlite(_))
    }

    fn is_postgres(&self) -> bool {
        matches!(self.db, Db::Postgres(_))
    }

    /// Creates a queue; `AlreadyExists` when the name is taken.
    pub async fn create_queue(
        &self,
        name: &str,
        s: &Settings,
        now: i64,
        event: &OutboxEvent,
    ) -> Result<Queue, QueueError> {
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let insert = sqlx::query(
                "INSERT INTO queues (name, max_attempts, backoff_initial_ms, backoff_max_ms, backoff_multiplier, \
                 backoff_jitter, lease_ms, ttl_ms, dedup_window_ms, rate_limit, max_concurrency, depth_alert, \
                 dead_letter_queue, fifo_groups, generation, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 1, $15, $15) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(name);
            let inserted = bind_settings!(insert, s)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if inserted == 0 {
                return Err(QueueError::AlreadyExists(format!("queue {name:?}")));
            }
            event.write(&mut *tx).await?;
            tx.commit().await?;
        });
        self.queue(name).await
    }

    /// One queue.
    pub async fn queue(&self, name: &str) -> Result<Queue, QueueError> {
        let row: Option<QueueRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(concat!("SELECT ", queue_columns!(), " FROM queues WHERE name = $1"))
                .bind(name)
                .fetch_optional(pool)
                .await?
        });
        row.map(Queue::from)
            .ok_or_else(|| QueueError::QueueNotFound(name.to_owned()))
    }

    /// Queues by name after `after`.
    pub async fn queues(&self, after: &str, limit: usize) -> Result<Vec<Queue>, QueueError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<QueueRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                queue_columns!(),
                " FROM queues WHERE name > $1 ORDER BY name LIMIT $2"
            ))
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(Queue::from).collect())
    }

    /// Replaces a queue's settings if its generation is still `generation`.
    pub async fn update_queue(
        &self,
        name: &str,
        generation: i64,
        s: &Settings,
        now: i64,
        event: &OutboxEvent,
    ) -> Result<Queue, QueueError> {
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let update = sqlx::query(
                "UPDATE queues SET max_attempts = $3, backoff_initial_ms = $4, backoff_max_ms = $5, \
                 backoff_multiplier = $6, backoff_jitter = $7, lease_ms = $8, ttl_ms = $9, dedup_window_ms = $10, \
                 rate_limit = $11, max_concurrency = $12, depth_alert = $13, dead_letter_queue = $14, \
                 fifo_groups = $15, generation = generation + 1, updated_at = $16 WHERE name = $1 AND generation = $2",
            )
            .bind(name)
            .bind(generation);
            let updated = bind_settings!(update, s)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if updated == 0 {
                return Err(QueueError::Conflict(name.to_owned()));
            }
            event.write(&mut *tx).await?;
            tx.commit().await?;
        });
        self.queue(name).await
    }

    /// Deletes a queue and its messages; the number of messages deleted.
    pub async fn delete_queue(&self, name: &str, event: &OutboxEvent) -> Result<i64, QueueError> {
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let gone = sqlx::query("DELETE FROM queues WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if gone == 0 {
                return Err(QueueError::QueueNotFound(name.to_owned()));
            }
            let mut messages = 0;
            for delete in [DELETE_READY, DELETE_NOT_READY] {
                messages += sqlx::query(delete).bind(name).execute(&mut *tx).await?.rows_affected();
            }
            sqlx::query("DELETE FROM dedup WHERE queue = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM schedules WHERE queue = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM fair_groups WHERE queue = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            event.write(&mut *tx).await?;
            tx.commit().await?;
            Ok(i64::try_from(messages).unwrap_or(i64::MAX))
        })
    }

    /// Sets `paused` and `drain_state`; the queue after the change.
    pub async fn set_flow(
        &self,
        name: &str,
        paused: bool,
        drain_state: i32,
        now: i64,
        event: &OutboxEvent,
    ) -> Result<Queue, QueueError> {
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let changed = sqlx::query(
                "UPDATE queues SET paused = $2, drain_state = $3, generation = generation + 1, updated_at = $4 \
                 WHERE name = $1",
            )
            .bind(name)
            .bind(paused)
            .bind(drain_state)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if changed == 0 {
                return Err(QueueError::QueueNotFound(name.to_owned()));
            }
            event.write(&mut *tx).await?;
            tx.commit().await?;
        });
        self.queue(name).await
    }

    /// Messages by state, per queue, for the queues named.
    pub async fn counts(&self, names: &[&str]) -> Result<HashMap<String, Counts>, QueueError> {
        let mut out: HashMap<String, Counts> = names.iter().map(|n| ((*n).to_owned(), Counts::default())).collect();
        for chunk in names.chunks(500) {
            let rows: Vec<(String, i32, i64)> = on_db!(&self.db, |pool| {
                let mut q = sqlx::QueryBuilder::new("SELECT queue, state, COUNT(*) FROM messages WHERE queue IN (");
                let mut list = q.separated(", ");
                for n in chunk {
                    list.push_bind(*n);
                }
                q.push(concat!(") AND ", not_ready!(), " GROUP BY queue, state UNION ALL "));
                q.push("SELECT queue, 2, COUNT(*) FROM messages WHERE queue IN (");
                let mut list = q.separated(", ");
                for n in chunk {
                    list.push_bind(*n);
                }
                q.push(") AND state = 2 GROUP BY queue");
                q.build_query_as().fetch_all(pool).await?
            });
            for (queue, state, n) in rows {
                add_count(out.entry(queue).or_default(), state, n);
            }
        }
        Ok(out)
    }

    /// When the oldest ready message became ready.
    pub async fn oldest_ready(&self, name: &str) -> Result<Option<i64>, QueueError> {
        let (oldest,): (Option<i64>,) = on_db!(&self.db, |pool| {
            sqlx::query_as("SELECT MIN(ready_at) FROM messages WHERE queue = $1 AND state = 2")
                .bind(name)
                .fetch_one(pool)
                .await?
        });
        Ok(oldest)
    }

    /// Counts by state and when the oldest ready message became ready, for
    /// every queue (for the metrics).
    pub async fn depths(&self) -> Result<(HashMap<String, Counts>, HashMap<String, i64>), QueueError> {
        let (names, rows, oldest): DepthRows = on_db!(&self.db, |pool| {
            let names = sqlx::query_as("SELECT name FROM queues").fetch_all(pool).await?;
            let rows = sqlx::query_as(COUNTS_BY_STATE).fetch_all(pool).await?;
            let oldest = sqlx::query_as("SELECT queue, MIN(ready_at) FROM messages WHERE state = 2 GROUP BY queue")
                .fetch_all(pool)
                .await?;
            (names, rows, oldest)
        });
        let mut counts: HashMap<String, Counts> = names.into_iter().map(|(n,)| (n, Counts::default())).collect();
        for (queue, state, n) in rows {
            if let Some(c) = counts.get_mut(&queue) {
                add_count(c, state, n);
            }
        }
        let oldest = oldest.into_iter().filter_map(|(q, t)| t.map(|t| (q, t))).collect();
        Ok((counts, oldest))
    }

    /// Adds `messages` to `queue` in one transaction, in order; duplicates
    /// (by dedup key within the window) are answered with the first id.
    pub async fn enqueue(&self, queue: &str, messages: &[NewMessage], now: i64) -> Result<Vec<Enqueued>, QueueError> {
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let q: Option<(i64, i64)> = sqlx::query_as("SELECT ttl_ms, dedup_window_ms FROM queues WHERE name = $1")
                .bind(queue)
                .fetch_optional(&mut *tx)
                .await?;
            let (ttl_ms, window_ms) = q.ok_or_else(|| QueueError::QueueNotFound(queue.to_owned()))?;

            let mut results: Vec<Option<Enqueued>> = vec![None; messages.len()];
            let mut first_with_key: HashMap<&str, usize> = HashMap::new();
            let mut copies: Vec<(usize, usize)> = Vec::new();
            let mut fresh: Vec<usize> = Vec::with_capacity(messages.len());
            for (i, m) in messages.iter().enumerate() {
                if m.dedup_key.is_empty() {
                    fresh.push(i);
                    continue;
                }
                if let Some(&first) = first_with_key.get(m.dedup_key.as_str()) {
                    copies.push((i, first));
                    continue;
                }
                first_with_key.insert(&m.dedup_key, i);
                // Taking the key is one statement: a concurrent enqueue of
                // the same key waits on the unique index until this commits,
                // then finds the key taken.
                let taken: Option<(i64,)> = sqlx::query_as(
                    "INSERT INTO dedup (queue, dedup_key, message_id, expires_at) VALUES ($1, $2, 0, $3) \
                     ON CONFLICT (queue, dedup_key) DO UPDATE SET message_id = 0, expires_at = excluded.expires_at \
                     WHERE dedup.expires_at <= $4 RETURNING message_id",
                )
                .bind(queue)
                .bind(&m.dedup_key)
                .bind(now.saturating_add(window_ms))
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
                if taken.is_some() {
                    fresh.push(i);
                } else {
                    let (id,): (i64,) =
                        sqlx::query_as("SELECT message_id FROM dedup WHERE queue = $1 AND dedup_key = $2")
                            .bind(queue)
                            .bind(&m.dedup_key)
                            .fetch_one(&mut *tx)
                            .await?;
                    let state: Option<(i32,)> = sqlx::query_as("SELECT state FROM messages WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    results[i] = Some(Enqueued {
                        id,
                        duplicate: true,
                        state: state.and_then(|(s,)| State::from_i32(s)),
                    });
                }
            }

            // Start tags: each group continues from its counter, caught up
            // with the tag of the message at the head of the queue.
            let mut slots: HashMap<usize, i64> = HashMap::with_capacity(fresh.len());
            if !fresh.is_empty() {
                let head: Option<(i64,)> = sqlx::query_as(
                    "SELECT slot FROM messages WHERE queue = $1 AND state = 2 ORDER BY priority DESC, slot, id LIMIT 1",
                )
                .bind(queue)
                .fetch_optional(&mut *tx)
                .await?;
                let floor = head.map_or(0, |(s,)| s);
                let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
                for &i in &fresh {
                    if messages[i].group_key.is_empty() {
                        // Without a group a message is its own group: it
                        // starts right behind the head. No shared counter
                        // row, so concurrent enqueues never wait on its lock.
                        slots.insert(i, floor + 1);
                    } else {
                        groups.entry(messages[i].group_key.as_str()).or_default().push(i);
                    }
                }
                for (group, members) in groups {
                    let count = i64::try_from(members.len()).unwrap_or(i64::MAX);
                    let (last,): (i64,) = sqlx::query_as(
                        "INSERT INTO fair_groups (queue, group_key, next_slot) VALUES ($1, $2, $3 + $4) \
                         ON CONFLICT (queue, group_key) DO UPDATE SET next_slot = \
                         (CASE WHEN fair_groups.next_slot > $3 THEN fair_groups.next_slot ELSE $3 END) + $4 \
                         RETURNING next_slot",
                    )
                    .bind(queue)
                    .bind(group)
                    .bind(floor)
                    .bind(count)
                    .fetch_one(&mut *tx)
                    .await?;
                    for (k, i) in members.into_iter().enumerate() {
                        slots.insert(i, last - count + 1 + i64::try_from(k).unwrap_or(0));
                    }
                }
            }

            for chunk in fresh.chunks(1000) {
                let rows: Vec<NewRow> = chunk
                    .iter()
                    .map(|&i| {
                        let m = &messages[i];
                        let ready_at = m.ready_at(now);
                        let state = if ready_at > now { State::Scheduled } else { State::Ready };
                        let ttl = m.ttl_ms.unwrap_or(ttl_ms);
                        NewRow {
                            state: state as i32,
                            priority: m.priority,
                            slot: slots.get(&i).copied().unwrap_or(0),
                            group_key: m.group_key.clone(),
                            ready_at,
                            expires_at: (ttl > 0).then(|| now.saturating_add(ttl)),
                            payload: m.payload.clone(),
                            content_type: m.content_type.clone(),
                            headers: if m.headers.is_empty() {
                                String::new()
                            } else {
                                serde_json::to_string(&m.headers).unwrap_or_default()
                            },
                            dedup_key: m.dedup_key.clone(),
                        }
                    })
                    .collect();
                let mut rows = (*tx).insert_rows(queue, rows, now).await?;
                // Ids grow in input order on both backends; RETURNING order
                // is not promised, so sort.
                rows.sort_unstable();
                for (&i, (id, state)) in chunk.iter().zip(rows) {
                    results[i] = Some(Enqueued {
                        id,
                        duplicate: false,
                        state: State::from_i32(state),
                    });
                    let m = &messages[i];
                    if !m.dedup_key.is_empty() {
                        sqlx::query("UPDATE dedup SET message_id = $3 WHERE queue = $1 AND dedup_key = $2")
                            .bind(queue)
                            .bind(&m.dedup_key)
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
            }
            for (copy, first) in copies {
                results[copy] = results[first].map(|r| Enqueued { duplicate: true, ..r });
            }
            tx.commit().await?;
            Ok(results.into_iter().flatten().collect())
        })
    }

    /// Tells other replicas (PostgreSQL `NOTIFY`) that `queues` have ready
    /// work; nothing on SQLite, where every writer is in this process.
    pub async fn announce(&self, queues: &[String]) -> Result<(), QueueError> {
        if let Db::Postgres(pool) = &self.db {
            sqlx::query("SELECT pg_notify($1, q) FROM UNNEST($2::text[]) AS q")
                .bind(NOTIFY_CHANNEL)
                .bind(queues)
                .execute(pool)
                .await?;
        }
        Ok(())
    }

    /// Leases up to `max` ready messages for `lease_ms`, within the queue's
    /// rate and concurrency limits. Empty when paused or draining.
    pub async fn claim(
        &self,
        queue: &str,
        max: i64,
        lease_ms: Option<i64>,
        now: i64,
    ) -> Result<Vec<Leased>, QueueError> {
        let token: i64 = rand::random::<i64>() | 1;
        let postgres = self.is_postgres();
        on_db!(&self.db, |pool| {
            // A lease lost to a power cut hands the message out again,
            // which at-least-once delivery allows; waiting for the disk on
            // every claim would cost the drain a flush per group.
            let mut tx = pool.begin_write_unflushed().await?;
            if postgres {
                sqlx::raw_sql(BY_INDEX_ONLY).execute(&mut *tx).await?;
            }
            let q: Option<(bool, i32, i64, f64, i32, bool)> = sqlx::query_as(
                "SELECT paused, drain_state, lease_ms, rate_limit, max_concurrency, fifo_groups FROM queues WHERE name = $1",
            )
            .bind(queue)
            .fetch_optional(&mut *tx)
            .await?;
            let (paused, drain_state, default_lease, rate, concurrency, fifo) =
                q.ok_or_else(|| QueueError::QueueNotFound(queue.to_owned()))?;
            if paused || drain_state != 0 {
                return Ok(Vec::new());
            }
            let mut n = max;
            let limited = rate > 0.0 || concurrency > 0;
            let mut bucket = (0.0, 0);
            if limited {
                // Limits are decided under the queue row's lock, so claims on
                // every replica share them exactly.
                let (tokens, at): (f64, i64) = sqlx::query_as(if postgres {
                    "SELECT rate_tokens, rate_at FROM queues WHERE name = $1 FOR UPDATE"
                } else {
                    "SELECT rate_tokens, rate_at FROM queues WHERE name = $1"
                })
                .bind(queue)
                .fetch_one(&mut *tx)
                .await?;
                if concurrency > 0 {
                    let (in_flight,): (i64,) = sqlx::query_as(UNEXPIRED_LEASED_COUNT)
                        .bind(queue)
                        .bind(now)
                        .fetch_one(&mut *tx)
                        .await?;
                    n = n.min(i64::from(concurrency) - in_flight);
                }
                if rate > 0.0 {
                    let burst = rate.max(1.0);
                    let elapsed = (now - at).max(0) as f64 / 1000.0;
                    let available = (tokens + elapsed * rate).min(burst);
                    bucket = (available, now);
                    n = n.min(available.floor() as i64);
                }
                if n <= 0 {
                    return Ok(Vec::new());
                }
            }
            let expires = now.saturating_add(lease_ms.unwrap_or(default_lease));
            // With FIFO groups a grouped message is claimable only as its
            // group's oldest live message. Under `SKIP LOCKED` a concurrent
            // claim still sees the head it skipped as live, so it cannot
            // take the one behind it.
            let rows: Vec<MessageBody> = match (postgres, fifo) {
                (true, false) => sqlx::query_as(concat!(
                    "UPDATE messages m SET state = 3, attempts = m.attempts + 1, lease_token = $1, next_at = $2 \
                     WHERE m.id = ANY(ARRAY(SELECT id FROM messages WHERE queue = $3 AND state = 2 \
                     AND (expires_at IS NULL OR expires_at > $4) ORDER BY priority DESC, slot, id LIMIT $5 \
                     FOR UPDATE SKIP LOCKED)) RETURNING ",
                    returned_claimed_columns!()
                )),
                (true, true) => sqlx::query_as(concat!(
                    "UPDATE messages m SET state = 3, attempts = m.attempts + 1, lease_token = $1, next_at = $2 \
                     WHERE m.id = ANY(ARRAY(SELECT c.id FROM messages c WHERE c.queue = $3 AND c.state = 2 \
                     AND (c.expires_at IS NULL OR c.expires_at > $4) AND ",
                    group_head!(),
                    " ORDER BY c.priority DESC, c.slot, c.id LIMIT $5 FOR UPDATE SKIP LOCKED)) RETURNING ",
                    returned_claimed_columns!()
                )),
                (false, false) => sqlx::query_as(concat!(
                    "UPDATE messages SET state = 3, attempts = attempts + 1, lease_token = $1, next_at = $2 \
                     WHERE id IN (SELECT id FROM messages WHERE queue = $3 AND state = 2 \
                     AND (expires_at IS NULL OR expires_at > $4) ORDER BY priority DESC, slot, id LIMIT $5) RETURNING ",
                    claimed_columns!()
                )),
                (false, true) => sqlx::query_as(concat!(
                    "UPDATE messages SET state = 3, attempts = attempts + 1, lease_token = $1, next_at = $2 \
                     WHERE id IN (SELECT c.id FROM messages c WHERE c.queue = $3 AND c.state = 2 \
                     AND (c.expires_at IS NULL OR c.expires_at > $4) AND ",
                    group_head!(),
                    " ORDER BY c.priority DESC, c.slot, c.id LIMIT $5) RETURNING ",
                    claimed_columns!()
                )),
            }
            .bind(token)
            .bind(expires)
            .bind(queue)
            .bind(now)
            .bind(n)
            .fetch_all(&mut *tx)
            .await?;
            if rate > 0.0 && !rows.is_empty() {
                sqlx::query("UPDATE queues SET rate_tokens = $2, rate_at = $3 WHERE name = $1")
                    .bind(queue)
                    .bind(bucket.0 - rows.len() as f64)
                    .bind(bucket.1)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            let mut rows = rows;
            rows.sort_unstable_by_key(|r| (std::cmp::Reverse(r.priority), r.slot, r.id));
            Ok(rows.into_iter().map(|r| r.into_leased(queue, token, expires)).collect())
        })
    }

    /// Completes deliveries; one outcome per entry, in order.
    pub async fn ack(&self, queue: &str, acks: &[(i64, i64)]) -> Result<Vec<AckOutcome>, QueueError> {
        let mut done: HashSet<i64> = HashSet::with_capacity(acks.len());
        let mut present: HashSet<i64> = HashSet::new();
        let postgres = self.is_postgres();
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            if postgres {
                sqlx::raw_sql(BY_INDEX_ONLY).execute(&mut *tx).await?;
            }
            // The acked ids drive the join (SQLite's `CROSS JOIN` keeps them
            // the outer loop), each looked up by primary key. Written as
            // `queue = ? AND (id, lease_token) IN (VALUES …)`, SQLite walked
            // every leased and ready row of the queue per ack: 51 ms for 100
            // acks in a queue of 300,000, 0.6 ms this way.
            for chunk in acks.chunks(500) {
                let mut q = sqlx::QueryBuilder::new("DELETE FROM messages WHERE id IN (SELECT m.id FROM (VALUES ");
                let mut list = q.separated(", ");
                for (id, token) in chunk {
                    list.push("(")
                        .push_bind_unseparated(*id)
                        .push_unseparated(", ")
                        .push_bind_unseparated(*token)
                        .push_unseparated(")");
                }
                q.push(
                    ") AS a CROSS JOIN messages m WHERE m.id = a.column1 AND m.lease_token = a.column2 AND m.queue = ",
                )
                .push_bind(queue.to_owned())
                .push(" AND m.state IN (2, 3)) RETURNING id");
                let ids: Vec<(i64,)> = q.build_query_as().fetch_all(&mut *tx).await?;
                done.extend(ids.into_iter().map(|(id,)| id));
            }
            let missing: Vec<i64> = acks.iter().map(|(id, _)| *id).filter(|id| !done.contains(id)).collect();
            for chunk in missing.chunks(500) {
                let mut q = sqlx::QueryBuilder::new("SELECT m.id FROM (VALUES ");
                let mut list = q.separated(", ");
                for id in chunk {
                    list.push("(").push_bind_unseparated(*id).push_unseparated(")");
                }
                q.push(") AS a CROSS JOIN messages m WHERE m.id = a.column1 AND m.queue = ")
                    .push_bind(queue.to_owned());
                let ids: Vec<(i64,)> = q.build_query_as().fetch_all(&mut *tx).await?;
                present.extend(ids.into_iter().map(|(id,)| id));
            }
            tx.commit().await?;
        });
        Ok(acks
            .iter()
            .map(|(id, _)| {
                if done.contains(id) {
                    AckOutcome::Acked
                } else if present.contains(id) {
                    AckOutcome::Stale
                } else {
                    AckOutcome::NotFound
                }
            })
            .collect())
    }

    /// Why a token did not match: the message exists (stale) or not.
    async fn mismatch(&self, queue: &str, id: i64) -> QueueError {
        let found: Result<Option<(i64,)>, sqlx::Error> = on_db!(&self.db, |pool| {
            sqlx::query_as("SELECT id FROM messages WHERE id = $1 AND queue = $2")
                .bind(id)
                .bind(queue)
                .fetch_optional(pool)
                .await
        });
        match found {
            Ok(Some(_)) => QueueError::StaleLease(id),
            Ok(None) => QueueError::MessageNotFound {
                queue: queue.to_owned(),
                id,
            },
            Err(e) => e.into(),
        }
    }

    /// The current delivery of message `id`, with its queue's retry settings:
    /// (attempts, max_attempts, backoff). Stale or missing → the error.
    pub async fn delivery(&self, queue: &str, id: i64, token: i64) -> Result<(i32, Settings), QueueError> {
        let row: Option<(i32,)> = on_db!(&self.db, |pool| {
            sqlx::query_as(
                "SELECT attempts FROM messages WHERE id = $1 AND queue = $2 AND lease_token = $3 AND state IN (2, 3)",
            )
            .bind(id)
            .bind(queue)
            .bind(token)
            .fetch_optional(pool)
            .await?
        });
        match row {
            Some((attempts,)) => Ok((attempts, self.queue(queue).await?.settings)),
            None => Err(self.mismatch(queue, id).await),
        }
    }

    /// Schedules a retry of the delivery at `at`, if `token` is still current.
    pub async fn retry_at(&self, queue: &str, id: i64, token: i64, at: i64, error: &str) -> Result<(), QueueError> {
        let changed = on_db!(&self.db, |pool| {
            sqlx::query(
                "UPDATE messages SET state = 1, next_at = $4, ready_at = $4, lease_token = NULL, last_error = $5 \
                 WHERE id = $1 AND queue = $2 AND lease_token = $3 AND state IN (2, 3)",
            )
            .bind(id)
            .bind(queue)
            .bind(token)
            .bind(at)
            .bind(error)
            .execute(pool)
            .await?
            .rows_affected()
        });
        if changed == 0 {
            return Err(self.mismatch(queue, id).await);
        }
        Ok(())
    }

    /// Dead-letters the delivery, if `token` is still current; the queues
    /// that gained ready messages (a dead letter queue).
    pub async fn kill(
        &self,
        queue: &str,
        id: i64,
        token: i64,
        error: &str,
        reason: &'static str,
        now: i64,
    ) -> Result<Vec<String>, QueueError> {
        let woken: Option<Vec<String>> = on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let row: Option<(i32,)> = sqlx::query_as(
                "UPDATE messages SET last_error = $4, lease_token = NULL \
                 WHERE id = $1 AND queue = $2 AND lease_token = $3 AND state IN (2, 3) RETURNING attempts",
            )
            .bind(id)
            .bind(queue)
            .bind(token)
            .bind(error)
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                Some((attempts,)) => {
                    let failures = vec![Failure {
                        id,
                        queue: queue.to_owned(),
                        attempts,
                        last_error: error.to_owned(),
                        reason,
                    }];
                    let woken = dead_letter!(tx, failures, now);
                    tx.commit().await?;
                    Some(woken)
                }
                None => None,
            }
        });
        match woken {
            Some(w) => Ok(w),
            None => Err(self.mismatch(queue, id).await),
        }
    }

    /// Moves the lease of the delivery to `expires`, if `token` is current.
    pub async fn extend(&self, queue: &str, id: i64, token: i64, expires: i64) -> Result<(), QueueError> {
        let changed = on_db!(&self.db, |pool| {
            sqlx::query(
                "UPDATE messages SET state = 3, next_at = $4 \
                 WHERE id = $1 AND queue = $2 AND lease_token = $3 AND state IN (2, 3)",
            )
            .bind(id)
            .bind(queue)
            .bind(token)
            .bind(expires)
            .execute(pool)
            .await?
            .rows_affected()
        });
        if changed == 0 {
            return Err(self.mismatch(queue, id).await);
        }
        Ok(())
    }

    /// One message.
    pub async fn message(&self, queue: &str, id: i64) -> Result<Message, QueueError> {
        let row: Option<MessageRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages WHERE id = $1 AND queue = $2"
            ))
            .bind(id)
            .bind(queue)
            .fetch_optional(pool)
            .await?
        });
        row.map(MessageRow::into_message)
            .ok_or_else(|| QueueError::MessageNotFound {
                queue: queue.to_owned(),
                id,
            })
    }

    /// Messages of one state by id, after `after`.
    pub async fn messages(
        &self,
        queue: &str,
        state: State,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Message>, QueueError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let postgres = self.is_postgres();
        let rows: Vec<MessageRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(match (state, postgres) {
                (State::Ready, true) => READY_BY_ID,
                (State::Ready, false) => READY_BY_ID_SQLITE,
                _ => NOT_READY_BY_ID,
            })
            .bind(queue)
            .bind(state as i32)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(MessageRow::into_message).collect())
    }

    /// Deletes messages in `states`; how many.
    pub async fn purge(
        &self,
        queue: &str,
        states: &[State],
        event: impl Fn(i64) -> OutboxEvent,
    ) -> Result<i64, QueueError> {
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let exists: Option<(String,)> = sqlx::query_as("SELECT name FROM queues WHERE name = $1")
                .bind(queue)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(QueueError::QueueNotFound(queue.to_owned()));
            }
            let mut purged = 0u64;
            if states.contains(&State::Ready) {
                purged += sqlx::query(DELETE_READY)
                    .bind(queue)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            let others: Vec<i32> = states
                .iter()
                .filter(|s| **s != State::Ready)
                .map(|s| *s as i32)
                .collect();
            if !others.is_empty() {
                let mut q = sqlx::QueryBuilder::new("DELETE FROM messages WHERE queue = ");
                q.push_bind(queue.to_owned()).push(" AND state IN (");
                let mut list = q.separated(", ");
                for s in others {
                    list.push_bind(s);
                }
                q.push(concat!(") AND ", not_ready!()));
                purged += q.build().execute(&mut *tx).await?.rows_affected();
            }
            let purged = i64::try_from(purged).unwrap_or(i64::MAX);
            event(purged).write(&mut *tx).await?;
            tx.commit().await?;
            Ok(purged)
        })
    }

    /// Makes dead letters of `queue` (and those its dead letter queue holds
    /// from it) ready again in `queue`; how many.
    pub async fn retry_failed(
        &self,
        queue: &str,
        filter: &RetryFilter,
        now: i64,
        event: impl Fn(i64) -> OutboxEvent,
    ) -> Result<i64, QueueError> {
        let contains = if self.is_postgres() {
            " AND strpos(last_error, "
        } else {
            " AND instr(last_error, "
        };
        let postgres = self.is_postgres();
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            let dlq: Option<(String,)> = sqlx::query_as("SELECT dead_letter_queue FROM queues WHERE name = $1")
                .bind(queue)
                .fetch_optional(&mut *tx)
                .await?;
            let (dlq,) = dlq.ok_or_else(|| QueueError::QueueNotFound(queue.to_owned()))?;
            let mut retried = 0i64;
            // The dead letter queue holds redriven messages ready or dead;
            // each state is read through its own index (an `OR` of the two
            // made SQLite read the whole table once it had statistics) and
            // the two are merged by id.
            let sources: Vec<(&str, &[&str])> = if dlq.is_empty() {
                vec![(queue, &[DEAD])]
            } else {
                vec![(queue, &[DEAD]), (dlq.as_str(), &["state = 2", DEAD])]
            };
            for (source, arms) in sources {
                if retried >= filter.limit {
                    break;
                }
                let mut q = sqlx::QueryBuilder::new("UPDATE messages SET queue = ");
                q.push_bind(queue.to_owned())
                    .push(", state = 2, attempts = 0, origin_queue = '', lease_token = NULL, ready_at = ")
                    .push_bind(now)
                    .push(", next_at = ")
                    .push_bind(now)
                    .push(if postgres {
                        " WHERE id = ANY(ARRAY(SELECT id FROM ("
                    } else {
                        " WHERE id IN (SELECT id FROM ("
                    });
                for (i, states) in arms.iter().enumerate() {
                    if i > 0 {
                        q.push(" UNION ALL ");
                    }
                    q.push("SELECT id FROM messages WHERE queue = ")
                        .push_bind(source.to_owned())
                        .push(" AND ")
                        .push(states);
                    if source != queue {
                        q.push(" AND origin_queue = ").push_bind(queue.to_owned());
                    }
                    if !filter.error_contains.is_empty() {
                        q.push(contains).push_bind(filter.error_contains.clone()).push(") > 0");
                    }
                    if !filter.ids.is_empty() {
                        q.push(" AND id IN (");
                        let mut list = q.separated(", ");
                        for id in &filter.ids {
                            list.push_bind(*id);
                        }
                        q.push(")");
                    }
                }
                q.push(") AS candidates ORDER BY id LIMIT ")
                    .push_bind(filter.limit - retried)
                    .push(if postgres { "))" } else { ")" });
                retried += i64::try_from(q.build().execute(&mut *tx).await?.rows_affected()).unwrap_or(0);
            }
            if retried > 0 {
                event(retried).write(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(retried)
        })
    }

    /// Moves time-driven states on: due scheduled messages become ready,
    /// expired leases are returned (or dead-lettered when out of attempts),
    /// expired messages are dead-lettered, expired dedup keys are dropped.
    pub async fn sweep(&self, now: i64) -> Result<Swept, QueueError> {
        let mut swept = Swept::default();
        let postgres = self.is_postgres();
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            // `= ANY(ARRAY(…))`, not `IN (…)`: PostgreSQL's generic plan
            // guesses 10,000 rows for `LIMIT $n` and would hash-join the
            // whole table; the array forces the primary key lookup.
            let promoted: Vec<(String,)> = sqlx::query_as(if postgres {
                concat!(
                    "UPDATE messages SET state = 2 WHERE id = ANY(ARRAY(",
                    due_scheduled!(),
                    ")) RETURNING queue"
                )
            } else {
                concat!(
                    "UPDATE messages SET state = 2 WHERE id IN (",
                    due_scheduled!(),
                    ") RETURNING queue"
                )
            })
            .bind(now)
            .bind(SWEEP_BATCH)
            .fetch_all(&mut *tx)
            .await?;
            swept.promoted = promoted.len() as u64;
            swept.woken.extend(promoted.into_iter().map(|(q,)| q));

            let expired: Vec<(i64, String, i32, i32, String)> = sqlx::query_as(EXPIRED_LEASES)
                .bind(now)
                .bind(SWEEP_BATCH)
                .fetch_all(&mut *tx)
                .await?;
            let mut again = Vec::new();
            let mut failures = Vec::new();
            for (id, queue, attempts, max_attempts, last_error) in expired {
                if attempts >= max_attempts {
                    failures.push(Failure {
                        id,
                        queue,
                        attempts,
                        last_error: if last_error.is_empty() {
                            "lease expired".to_owned()
                        } else {
                            last_error
                        },
                        reason: "attempts_exhausted",
                    });
                } else {
                    again.push(id);
                }
            }
            for chunk in again.chunks(500) {
                let mut q = sqlx::QueryBuilder::new("UPDATE messages SET state = 2, ready_at = ");
                q.push_bind(now)
                    .push(", last_error = 'lease expired' WHERE state = 3 AND next_at <= ")
                    .push_bind(now)
                    .push(" AND id IN (");
                let mut list = q.separated(", ");
                for id in chunk {
                    list.push_bind(*id);
                }
                q.push(") RETURNING queue");
                let queues: Vec<(String,)> = q.build_query_as().fetch_all(&mut *tx).await?;
                for (queue,) in queues {
                    *swept.expired_leases.entry(queue.clone()).or_default() += 1;
                    swept.woken.insert(queue);
                }
            }

            let stale: Vec<(i64, String, i32, String)> = sqlx::query_as(
                "SELECT id, queue, attempts, last_error FROM messages \
                 WHERE expires_at <= $1 AND state IN (1, 2) LIMIT $2",
            )
            .bind(now)
            .bind(SWEEP_BATCH)
            .fetch_all(&mut *tx)
            .await?;
            failures.extend(stale.into_iter().map(|(id, queue, attempts, last_error)| Failure {
                id,
                queue,
                attempts,
                last_error,
                reason: "ttl_expired",
            }));
            for f in &failures {
                *swept.dead_lettered.entry(f.queue.clone()).or_default() += 1;
            }
            swept.events = !failures.is_empty();
            swept.woken.extend(dead_letter!(tx, failures, now));
            sqlx::query("DELETE FROM dedup WHERE expires_at <= $1")
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(swept)
    }

    /// Ends the leases of deliveries `tokens` now, so the next sweep hands
    /// them out again (or dead-letters them when out of attempts).
    pub async fn expire_leases(&self, queue: &str, tokens: &[i64], now: i64) -> Result<u64, QueueError> {
        let mut released = 0;
        for chunk in tokens.chunks(500) {
            released += on_db!(&self.db, |pool| {
                let mut q = sqlx::QueryBuilder::new("UPDATE messages SET next_at = ");
                q.push_bind(now)
                    .push(" WHERE queue = ")
                    .push_bind(queue.to_owned())
                    .push(concat!(" AND state = 3 AND ", not_ready!(), " AND lease_token IN ("));
                let mut list = q.separated(", ");
                for t in chunk {
                    list.push_bind(*t);
                }
                q.push(")");
                q.build().execute(pool).await?.rows_affected()
            });
        }
        Ok(released)
    }

    /// Removes dead row versions from the messages table and its indexes
    /// (PostgreSQL only; SQLite deletes in place). Every claim moves rows
    /// out of the ready index and every ack deletes them; index scans mark
    /// dead entries they pass, but the heap and the other indexes keep them
    /// until a vacuum, and autovacuum wakes too rarely for a busy queue, so
    /// the sweeper calls this once enough rows have churned (without it a
    /// steady 13,000 jobs/s had p50 210–250 ms instead of 10–12 ms).
    /// `SKIP_LOCKED`: when another replica is already vacuuming, this one
    /// does not wait. `TRUNCATE FALSE`: giving the emptied tail of the table
    /// back takes an exclusive lock that stalled acks and claims for up to
    /// seconds, and a queue refills that space anyway.
    pub async fn vacuum(&self) -> Result<(), QueueError> {
        if let Db::Postgres(pool) = &self.db {
            sqlx::query("VACUUM (SKIP_LOCKED, TRUNCATE FALSE) messages")
                .execute(pool)
                .await?;
        }
        Ok(())
    }

    /// Refreshes the planner's statistics of the messages table and
    /// returns the row count it now assumes (PostgreSQL only; `None` on
    /// SQLite). A queue table swings from empty to hundreds of thousands of
    /// rows within seconds; planned from statistics taken while it was
    /// small, a claim sorts the whole queue (a bitmap scan, then a sort) and
    /// an ack hash-joins it, instead of walking the ready index and the
    /// primary key. Measured on 100,000 ready rows with eight workers: 10.5 s
    /// to drain with the stale plan, 2.1 s after `ANALYZE`. Autoanalyze
    /// wakes once a minute, so the sweeper calls this when the table has grown.
    pub async fn analyze(&self) -> Result<Option<u64>, QueueError> {
        let Db::Postgres(pool) = &self.db else {
            return Ok(None);
        };
        sqlx::query("ANALYZE (SKIP_LOCKED) messages").execute(pool).await?;
        let (rows,): (f32,) = sqlx::query_as("SELECT reltuples FROM pg_class WHERE oid = 'messages'::regclass")
            .fetch_one(pool)
            .await?;
        Ok(Some(rows.max(0.0) as u64))
    }

    /// Raises and clears depth alerts, and completes drains; whether any
    /// event was written.
    pub async fn watch_thresholds(&self, now: i64) -> Result<bool, QueueError> {
        let mut wrote = false;
        on_db!(&self.db, |pool| {
            let watched: Vec<(String, i64, bool, i32)> = sqlx::query_as(
                "SELECT name, depth_alert, alerting, drain_state FROM queues WHERE depth_alert > 0 OR drain_state = 1",
            )
            .fetch_all(pool)
            .await?;
            for (name, threshold, alerting, drain_state) in watched {
                let mut tx = pool.begin_write().await?;
                if threshold > 0 {
                    let (depth,): (i64,) = sqlx::query_as(READY_COUNT).bind(&name).fetch_one(&mut *tx).await?;
                    let raised = depth >= threshold;
                    if raised != alerting {
                        let changed = sqlx::query("UPDATE queues SET alerting = $2 WHERE name = $1 AND alerting = $3")
                            .bind(&name)
                            .bind(raised)
                            .bind(alerting)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        if changed > 0 {
                            let event = pb::DepthAlertEvent {
                                queue: name.clone(),
                                raised,
                                depth,
                                threshold,
                                time: Some(timestamp(now)),
                            };
                            OutboxEvent::new("plinth.queue.depth_alert", name.as_str(), &event)
                                .write(&mut *tx)
                                .await?;
                            wrote = true;
                        }
                    }
                }
                if drain_state == 1 {
                    let (in_flight,): (i64,) = sqlx::query_as(LEASED_COUNT).bind(&name).fetch_one(&mut *tx).await?;
                    if in_flight == 0 {
                        let changed =
                            sqlx::query("UPDATE queues SET drain_state = 2 WHERE name = $1 AND drain_state = 1")
                                .bind(&name)
                                .execute(&mut *tx)
                                .await?
                                .rows_affected();
                        if changed > 0 {
                            let event = pb::QueueChangedEvent {
                                queue: name.clone(),
                                change: "drained".into(),
                                subject: String::new(),
                                messages: 0,
                                time: Some(timestamp(now)),
                            };
                            OutboxEvent::new("plinth.queue.queue_changed", name.as_str(), &event)
                                .write(&mut *tx)
                                .await?;
                            wrote = true;
                        }
                    }
                }
                tx.commit().await?;
            }
        });
        Ok(wrote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plinth_runtime::testing::TestDatabase;

    /// The sweeper runs every `sweep_ms`, and listings and counts run per
    /// page and per metrics scrape; on SQLite each must go through its index,
    /// never read the whole `messages` table or walk every queue's rows by
    /// id. SQLite uses a partial index only when the query states its
    /// condition, which an edit easily loses; and its plans change once it
    /// has statistics, so each query is planned on an empty table and again
    /// on a filled, analysed one.
    #[tokio::test]
    async fn sqlite_sweeps_listings_and_counts_use_their_indexes() {
        let db = TestDatabase::sqlite("queue", &crate::MIGRATIONS).await.unwrap();
        let Db::Sqlite(pool) = &db.db else {
            panic!("TestDatabase::sqlite made a non-SQLite pool");
        };
        let by_state = "messages_by_state";
        let ready = "messages_ready";
        let due = "messages_due";
        // The redrive's statement is built per call; these are its shapes,
        // with the same condition constant.
        let dead = format!("SELECT id FROM messages WHERE queue = $1 AND {DEAD}");
        let dead_letter_sources = format!(
            "SELECT id FROM (SELECT id FROM messages WHERE queue = $1 AND state = 2 UNION ALL {dead}) \
             AS candidates ORDER BY id LIMIT 10"
        );
        let queries: [(&str, &[&str]); 12] = [
            (due_scheduled!(), &[due]),
            (EXPIRED_LEASES, &[due]),
            (READY_BY_ID_SQLITE, &[ready]),
            (NOT_READY_BY_ID, &[by_state]),
            (COUNTS_BY_STATE, &[by_state, ready]),
            (READY_COUNT, &[ready]),
            (LEASED_COUNT, &[by_state]),
            (UNEXPIRED_LEASED_COUNT, &[by_state]),
            (DELETE_READY, &[ready]),
            (DELETE_NOT_READY, &[by_state]),
            (&dead, &[by_state]),
            (&dead_letter_sources, &[ready, by_state]),
        ];
        let mut conn = pool.acquire().await.unwrap();
        for filled in [false, true] {
            if filled {
                let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
                for i in 0..3_000i64 {
                    sqlx::query(
                        "INSERT INTO messages (queue, state, priority, slot, group_key, ready_at, next_at, payload, \
                         content_type, headers, dedup_key, enqueued_at) VALUES ($1, $2, 0, $3, '', 0, $3, x'00', '', '{}', '', 0)",
                    )
                    .bind(["a", "b", "c"][(i % 3) as usize])
                    .bind(1 + (i / 3) % 4)
                    .bind(i)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                }
                tx.commit().await.unwrap();
                sqlx::query("ANALYZE").execute(&mut *conn).await.unwrap();
            }
            for (sql, indexes) in queries {
                // Prepared afresh each time: a cached statement keeps the plan
                // it was first given, before the statistics existed.
                let plan: Vec<(i64, i64, i64, String)> =
                    sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql} -- {filled}")))
                        .persistent(false)
                        .fetch_all(&mut *conn)
                        .await
                        .unwrap();
                let steps: Vec<&str> = plan.iter().map(|(_, _, _, step)| step.as_str()).collect();
                let whole_table = |step: &&str| step.starts_with("SCAN") && !step.contains("USING");
                assert!(
                    !steps.iter().any(|step| whole_table(step) || step.contains("rowid>")),
                    "{sql}\nreads every row (filled: {filled}): {steps:?}"
                );
                for index in indexes {
                    assert!(
                        steps.iter().any(|step| step.contains(&format!("INDEX {index} "))
                            || step.ends_with(&format!("INDEX {index}"))),
                        "{sql}\ndoes not use {index} (filled: {filled}): {steps:?}"
                    );
                }
            }
        }
        drop(conn);
        db.cleanup().await.unwrap();
    }
}
