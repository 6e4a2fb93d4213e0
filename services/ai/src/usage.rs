//! Usage records: one per call, written with its `plinth.ai.usage.recorded`
//! event through the outbox in the same transaction. Calls hand records to
//! a [`Recorder`] and return at once; its writer commits them in batches
//! (gathered for up to 50 ms), so recording adds no database round trip to
//! a call's latency. Records still in the writer's buffer at shutdown are
//! flushed before it stops.

use std::time::Duration;

use plinth::ai::v1 as pb;
use plinth_runtime::events::outbox::{OutboxEvent, Relay};
use plinth_runtime::on_db;
use plinth_runtime::storage::{BeginWrite, Db};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::AiError;
use crate::model::Usage;

/// Most records written in one transaction.
const BATCH: usize = 500;
/// How long the writer keeps gathering records after the first arrives.
const LINGER: Duration = Duration::from_millis(50);
/// Records waiting for the writer before callers wait too.
const BUFFER: usize = 10_000;

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered.
    Success,
    /// Every target failed, or the stream broke.
    Failure,
    /// The caller went away during a stream.
    Cancelled,
}

impl Outcome {
    /// As stored.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// One call's usage.
#[derive(Debug, Clone)]
pub struct UsageRecord {
    /// The call's id.
    pub id: String,
    /// When it ended (ms since the epoch).
    pub time_ms: i64,
    /// The caller's tenant.
    pub tenant: String,
    /// The caller.
    pub subject: String,
    /// The API key id, or empty.
    pub api_key: String,
    /// `generate`, `generate_stream`, `embed`.
    pub operation: &'static str,
    /// The logical model.
    pub model: String,
    /// The provider that answered, or empty.
    pub provider: String,
    /// Its model.
    pub provider_model: String,
    /// Tokens.
    pub usage: Usage,
    /// Nano-dollars.
    pub cost_nanos: i64,
    /// Whether the price table knew the model.
    pub priced: bool,
    /// Request to last byte.
    pub latency_ms: i64,
    /// How it ended.
    pub outcome: Outcome,
    /// The error, when it failed.
    pub error: String,
    /// `provider/model` of each target tried before.
    pub fallback_path: Vec<String>,
    /// Whether tokens were estimated.
    pub estimated: bool,
    /// Whether the answer came from the response cache.
    pub cache_hit: bool,
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Proto usage from [`Usage`].
pub fn usage_pb(u: &Usage) -> pb::Usage {
    pb::Usage {
        input_tokens: signed(u.input_tokens),
        output_tokens: signed(u.output_tokens),
        cached_input_tokens: signed(u.cached_input_tokens),
        cache_write_tokens: signed(u.cache_write_tokens),
        reasoning_tokens: signed(u.reasoning_tokens),
        total_tokens: signed(u.total()),
    }
}

impl UsageRecord {
    fn event(&self) -> pb::UsageRecordedEvent {
        pb::UsageRecordedEvent {
            id: self.id.clone(),
            time: Some(prost_types::Timestamp {
                seconds: self.time_ms.div_euclid(1000),
                nanos: i32::try_from(self.time_ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
            }),
            tenant: self.tenant.clone(),
            subject: self.subject.clone(),
            api_key: self.api_key.clone(),
            operation: self.operation.to_owned(),
            model: self.model.clone(),
            provider: self.provider.clone(),
            provider_model: self.provider_model.clone(),
            usage: Some(usage_pb(&self.usage)),
            cost_usd: self.cost_nanos as f64 / 1e9,
            latency_ms: self.latency_ms,
            outcome: self.outcome.name().to_owned(),
            error: self.error.clone(),
            fallback_path: self.fallback_path.clone(),
            estimated: self.estimated,
            cache_hit: self.cache_hit,
        }
    }
}

/// Filters of a usage query.
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    /// From (ms, inclusive).
    pub start_ms: i64,
    /// To (ms, exclusive).
    pub end_ms: i64,
    /// Only this tenant (empty: all).
    pub tenant: String,
    /// Only this API key (empty: all).
    pub api_key: String,
    /// Only this logical model (empty: all).
    pub model: String,
    /// Only this provider (empty: all).
    pub provider: String,
    /// Grouping columns, in order.
    pub group_by: Vec<Dimension>,
}

/// A grouping column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    /// Tenant.
    Tenant,
    /// API key.
    ApiKey,
    /// Logical model.
    Model,
    /// Provider.
    Provider,
}

impl Dimension {
    fn column(self) -> &'static str {
        match self {
            Dimension::Tenant => "tenant",
            Dimension::ApiKey => "api_key",
            Dimension::Model => "model",
            Dimension::Provider => "provider",
        }
    }
}

/// Sums of one group.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct UsageSum {
    /// Tenant (when grouped).
    pub tenant: String,
    /// API key (when grouped).
    pub api_key: String,
    /// Model (when grouped).
    pub model: String,
    /// Provider (when grouped).
    pub provider: String,
    /// Calls.
    pub requests: i64,
    /// Failed calls.
    pub failed_requests: i64,
    /// Calls answered from the response cache.
    pub cache_hits: i64,
    /// Prompt tokens.
    pub input_tokens: i64,
    /// Completion tokens.
    pub output_tokens: i64,
    /// Cache reads.
    pub cached_input_tokens: i64,
    /// Cache writes.
    pub cache_write_tokens: i64,
    /// Reasoning tokens.
    pub reasoning_tokens: i64,
    /// Nano-dollars.
    pub cost_nanos: i64,
}

/// The `ai_usage` table.
#[derive(Debug, Clone)]
pub struct UsageLog {
    db: Db,
}

impl UsageLog {
    /// The table in `db`.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Writes `records` and their events in one transaction.
    pub async fn insert(&self, records: &[UsageRecord]) -> Result<(), AiError> {
        if records.is_empty() {
            return Ok(());
        }
        on_db!(&self.db, |pool| {
            let mut tx = pool.begin_write().await?;
            for r in records {
                sqlx::query(
                    "INSERT INTO ai_usage (id, time_ms, tenant, subject, api_key, operation, model, provider, \
                     provider_model, input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, \
                     reasoning_tokens, cost_nanos, priced, latency_ms, outcome, error, fallback_path, estimated, cache_hit) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22) \
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(&r.id)
                .bind(r.time_ms)
                .bind(&r.tenant)
                .bind(&r.subject)
                .bind(&r.api_key)
                .bind(r.operation)
                .bind(&r.model)
                .bind(&r.provider)
                .bind(&r.provider_model)
                .bind(signed(r.usage.input_tokens))
                .bind(signed(r.usage.output_tokens))
                .bind(signed(r.usage.cached_input_tokens))
                .bind(signed(r.usage.cache_write_tokens))
                .bind(signed(r.usage.reasoning_tokens))
                .bind(r.cost_nanos)
                .bind(r.priced)
                .bind(r.latency_ms)
                .bind(r.outcome.name())
                .bind(&r.error)
                .bind(r.fallback_path.join(","))
                .bind(r.estimated)
                .bind(r.cache_hit)
                .execute(&mut *tx)
                .await?;
                OutboxEvent::new("plinth.ai.usage.recorded", r.model.as_str(), &r.event())
                    .write(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Sums matching `q`, one row per group, by descending cost (at most 1,000 groups).
    pub async fn summarize(&self, q: &UsageQuery) -> Result<Vec<UsageSum>, AiError> {
        let mut select = Vec::new();
        for d in [
            Dimension::Tenant,
            Dimension::ApiKey,
            Dimension::Model,
            Dimension::Provider,
        ] {
            if q.group_by.contains(&d) {
                select.push(d.column().to_owned());
            } else {
                select.push(format!("'' AS {}", d.column()));
            }
        }
        let group: Vec<&str> = q.group_by.iter().map(|d| d.column()).collect();
        let sql = format!(
            "SELECT {}, COUNT(*) AS requests, \
             CAST(COALESCE(SUM(CASE WHEN outcome = 'failure' THEN 1 ELSE 0 END), 0) AS BIGINT) AS failed_requests, \
             CAST(COALESCE(SUM(CASE WHEN cache_hit THEN 1 ELSE 0 END), 0) AS BIGINT) AS cache_hits, \
             CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) AS input_tokens, \
             CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS output_tokens, \
             CAST(COALESCE(SUM(cached_input_tokens), 0) AS BIGINT) AS cached_input_tokens, \
             CAST(COALESCE(SUM(cache_write_tokens), 0) AS BIGINT) AS cache_write_tokens, \
             CAST(COALESCE(SUM(reasoning_tokens), 0) AS BIGINT) AS reasoning_tokens, \
             CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT) AS cost_nanos \
             FROM ai_usage WHERE time_ms >= $1 AND time_ms < $2 \
             AND ($3 = '' OR tenant = $3) AND ($4 = '' OR api_key = $4) \
             AND ($5 = '' OR model = $5) AND ($6 = '' OR provider = $6){} \
             ORDER BY cost_nanos DESC, requests DESC LIMIT 1000",
            select.join(", "),
            if group.is_empty() {
                String::new()
            } else {
                format!(" GROUP BY {}", group.join(", "))
            }
        );
        let rows: Vec<UsageSum> = on_db!(&self.db, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .persistent(false)
                .bind(q.start_ms)
                .bind(q.end_ms)
                .bind(&q.tenant)
                .bind(&q.api_key)
                .bind(&q.model)
                .bind(&q.provider)
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().filter(|r| r.requests > 0).collect())
    }
}

/// Hands records to the batch writer.
#[derive(Debug, Clone)]
pub struct Recorder {
    sender: mpsc::Sender<UsageRecord>,
}

/// The writer's end; run it with [`Writer::run`].
pub struct Writer {
    receiver: mpsc::Receiver<UsageRecord>,
    log: UsageLog,
    relay: Option<Relay>,
}

/// A recorder and its writer over `log`.
pub fn recorder(log: UsageLog, relay: Option<Relay>) -> (Recorder, Writer) {
    let (sender, receiver) = mpsc::channel(BUFFER);
    (Recorder { sender }, Writer { receiver, log, relay })
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Recorder {
    /// Queues `record`; waits only when the writer is `BUFFER` records behind.
    pub async fn record(&self, record: UsageRecord) {
        if let Err(e) = self.sender.send(record).await {
            tracing::error!(id = %e.0.id, "usage writer stopped; a usage record is lost");
        }
    }
}

impl Writer {
    /// Writes batches until `token` is cancelled and the buffer is empty.
    /// A failed batch is retried (with a pause) until it is written or the
    /// service stops, so that a database outage delays records instead of
    /// losing them.
    pub async fn run(mut self, token: CancellationToken) -> Result<(), AiError> {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let received = tokio::select! {
                n = self.receiver.recv_many(&mut batch, BATCH) => n,
                () = token.cancelled() => {
                    self.receiver.close();
                    self.receiver.recv_many(&mut batch, BUFFER).await
                }
            };
            if received == 0 && batch.is_empty() {
                return Ok(());
            }
            // Gather what arrives shortly after, so a busy service commits a
            // batch every LINGER instead of one per call or two: each commit
            // is an fsync on SQLite, and each wakes the outbox relay.
            let deadline = tokio::time::Instant::now() + LINGER;
            while batch.len() < BATCH && !token.is_cancelled() {
                let room = BATCH - batch.len();
                tokio::select! {
                    n = self.receiver.recv_many(&mut batch, room) => if n == 0 { break },
                    () = tokio::time::sleep_until(deadline) => break,
                    () = token.cancelled() => break,
                }
            }
            loop {
                match self.log.insert(&batch).await {
                    Ok(()) => break,
                    Err(e) if token.is_cancelled() => {
                        tracing::error!(error = %e, records = batch.len(), "usage records lost at shutdown");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, records = batch.len(), "writing usage failed; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            () = token.cancelled() => {}
                        }
                    }
                }
            }
            batch.clear();
            if let Some(relay) = &self.relay {
                relay.wake();
            }
        }
    }
}
