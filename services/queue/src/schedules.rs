//! SQL for cron schedules, on [`Store`]'s database. A tick is claimed and
//! its message inserted in one transaction, guarded by the tick's time, so
//! however many replicas sweep at once each tick enqueues exactly once.

use std::collections::BTreeMap;

use plinth_runtime::on_db;
use plinth_runtime::storage::BeginWrite;

use crate::error::QueueError;
use crate::model::{NewMessage, Schedule};
use crate::store::Store;

#[derive(sqlx::FromRow)]
struct ScheduleRow {
    queue: String,
    name: String,
    cron: String,
    time_zone: String,
    payload: Vec<u8>,
    content_type: String,
    headers: String,
    priority: i32,
    group_key: String,
    ttl_ms: Option<i64>,
    paused: bool,
    next_run_at: i64,
    last_run_at: Option<i64>,
    created_at: i64,
}

macro_rules! schedule_columns {
    () => {
        "queue, name, cron, time_zone, payload, content_type, headers, priority, group_key, ttl_ms, paused, \
         next_run_at, last_run_at, created_at"
    };
}

impl From<ScheduleRow> for Schedule {
    fn from(r: ScheduleRow) -> Self {
        let headers: BTreeMap<String, String> = if r.headers.is_empty() {
            BTreeMap::new()
        } else {
            serde_json::from_str(&r.headers).unwrap_or_default()
        };
        Schedule {
            queue: r.queue,
            name: r.name,
            cron: r.cron,
            time_zone: r.time_zone,
            template: NewMessage {
                payload: r.payload,
                content_type: r.content_type,
                headers,
                priority: r.priority,
                ttl_ms: r.ttl_ms,
                group_key: r.group_key,
                ..NewMessage::default()
            },
            paused: r.paused,
            next_run_at: r.next_run_at,
            last_run_at: r.last_run_at,
            created_at: r.created_at,
        }
    }
}

/// A tick that is due.
#[derive(Debug, Clone)]
pub struct DueTick {
    /// Queue.
    pub queue: String,
    /// Schedule name.
    pub name: String,
    /// Its cron expression.
    pub cron: String,
    /// Its zone.
    pub time_zone: String,
    /// The tick's time.
    pub due: i64,
}

impl Store {
    /// Stores a new schedule; `AlreadyExists` when the name is taken in the queue.
    pub async fn create_schedule(&self, s: &Schedule) -> Result<Schedule, QueueError> {
        let t = &s.template;
        let headers = if t.headers.is_empty() {
            String::new()
        } else {
            serde_json::to_string(&t.headers).unwrap_or_default()
        };
        on_db!(self.db(), |pool| {
            let mut tx = pool.begin_write().await?;
            let exists: Option<(String,)> = sqlx::query_as("SELECT name FROM queues WHERE name = $1")
                .bind(&s.queue)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(QueueError::QueueNotFound(s.queue.clone()));
            }
            let inserted = sqlx::query(
                "INSERT INTO schedules (queue, name, cron, time_zone, payload, content_type, headers, priority, \
                 group_key, ttl_ms, next_run_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                 ON CONFLICT (queue, name) DO NOTHING",
            )
            .bind(&s.queue)
            .bind(&s.name)
            .bind(&s.cron)
            .bind(&s.time_zone)
            .bind(&t.payload)
            .bind(&t.content_type)
            .bind(headers)
            .bind(t.priority)
            .bind(&t.group_key)
            .bind(t.ttl_ms)
            .bind(s.next_run_at)
            .bind(s.created_at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                return Err(QueueError::AlreadyExists(format!("schedule {:?}", s.name)));
            }
            tx.commit().await?;
        });
        self.schedule(&s.queue, &s.name).await
    }

    /// One schedule.
    pub async fn schedule(&self, queue: &str, name: &str) -> Result<Schedule, QueueError> {
        let row: Option<ScheduleRow> = on_db!(self.db(), |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                schedule_columns!(),
                " FROM schedules WHERE queue = $1 AND name = $2"
            ))
            .bind(queue)
            .bind(name)
            .fetch_optional(pool)
            .await?
        });
        row.map(Schedule::from)
            .ok_or_else(|| QueueError::ScheduleNotFound(name.to_owned()))
    }

    /// A queue's schedules by name.
    pub async fn schedules(&self, queue: &str) -> Result<Vec<Schedule>, QueueError> {
        self.queue(queue).await?;
        let rows: Vec<ScheduleRow> = on_db!(self.db(), |pool| {
            sqlx::query_as(concat!(
                "SELECT ",
                schedule_columns!(),
                " FROM schedules WHERE queue = $1 ORDER BY name"
            ))
            .bind(queue)
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(Schedule::from).collect())
    }

    /// Pauses or resumes a schedule (resuming sets its next tick).
    pub async fn set_schedule_paused(
        &self,
        queue: &str,
        name: &str,
        paused: bool,
        next_run_at: Option<i64>,
    ) -> Result<Schedule, QueueError> {
        let changed = on_db!(self.db(), |pool| {
            sqlx::query(
                "UPDATE schedules SET paused = $3, next_run_at = COALESCE($4, next_run_at) WHERE queue = $1 AND name = $2",
            )
            .bind(queue)
            .bind(name)
            .bind(paused)
            .bind(next_run_at)
            .execute(pool)
            .await?
            .rows_affected()
        });
        if changed == 0 {
            return Err(QueueError::ScheduleNotFound(name.to_owned()));
        }
        self.schedule(queue, name).await
    }

    /// Deletes a schedule.
    pub async fn delete_schedule(&self, queue: &str, name: &str) -> Result<(), QueueError> {
        let gone = on_db!(self.db(), |pool| {
            sqlx::query("DELETE FROM schedules WHERE queue = $1 AND name = $2")
                .bind(queue)
                .bind(name)
                .execute(pool)
                .await?
                .rows_affected()
        });
        if gone == 0 {
            return Err(QueueError::ScheduleNotFound(name.to_owned()));
        }
        Ok(())
    }

    /// Ticks due at `now`, oldest first.
    pub async fn due_ticks(&self, now: i64) -> Result<Vec<DueTick>, QueueError> {
        let rows: Vec<(String, String, String, String, i64)> = on_db!(self.db(), |pool| {
            sqlx::query_as(
                "SELECT queue, name, cron, time_zone, next_run_at FROM schedules \
                 WHERE NOT paused AND next_run_at <= $1 ORDER BY next_run_at LIMIT 100",
            )
            .bind(now)
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(queue, name, cron, time_zone, due)| DueTick {
                queue,
                name,
                cron,
                time_zone,
                due,
            })
            .collect())
    }

    /// Claims `tick` (moving the schedule to `next`) and enqueues its
    /// message, in one transaction; false when another replica claimed it
    /// first (or the schedule changed), in which case nothing is written.
    pub async fn fire(&self, tick: &DueTick, next: i64, now: i64) -> Result<bool, QueueError> {
        on_db!(self.db(), |pool| {
            let mut tx = pool.begin_write().await?;
            let claimed = sqlx::query(
                "UPDATE schedules SET next_run_at = $4, last_run_at = $3 \
                 WHERE queue = $1 AND name = $2 AND next_run_at = $3 AND NOT paused",
            )
            .bind(&tick.queue)
            .bind(&tick.name)
            .bind(tick.due)
            .bind(next)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if claimed == 0 {
                return Ok(false);
            }
            sqlx::query(
                "INSERT INTO messages (queue, state, priority, slot, group_key, ready_at, next_at, expires_at, \
                 payload, content_type, headers, dedup_key, enqueued_at) \
                 SELECT s.queue, 2, s.priority, COALESCE((SELECT m.slot FROM messages m WHERE m.queue = s.queue \
                 AND m.state = 2 ORDER BY m.priority DESC, m.slot, m.id LIMIT 1), 0) + 1, s.group_key, $3, $3, \
                 CASE WHEN s.ttl_ms IS NOT NULL THEN $3 + s.ttl_ms WHEN q.ttl_ms > 0 THEN $3 + q.ttl_ms END, \
                 s.payload, s.content_type, s.headers, '', $3 \
                 FROM schedules s JOIN queues q ON q.name = s.queue WHERE s.queue = $1 AND s.name = $2",
            )
            .bind(&tick.queue)
            .bind(&tick.name)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(true)
        })
    }
}
