//! The transactional outbox. A service inserts its event with
//! [`OutboxEvent::write_sqlite`] / [`OutboxEvent::write_postgres`] inside the
//! same transaction as its state change; [`Relay`] publishes committed rows in
//! commit (`seq`) order and deletes them once the bus has stored them. If the
//! bus is down nothing is lost: rows wait and the relay retries with backoff.
//! A crash between publish and delete republishes with the same event id,
//! which the bus deduplicates.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::{PgConnection, SqliteConnection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Event, SharedBus, validate_subject};
use crate::resilience::Backoff;
use crate::storage::{Db, StorageError};
use crate::telemetry;

/// An event to be written in the caller's transaction.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    /// Unique id (UUIDv7), the bus's dedup key.
    pub id: String,
    /// `plinth.<service>.<event>`.
    pub subject: String,
    /// What the event is about (key, queue, user); order is kept per aggregate.
    pub aggregate: String,
    /// Protobuf-encoded event.
    pub payload: Vec<u8>,
    /// Trace context of the request that caused it, and other headers.
    pub headers: BTreeMap<String, String>,
}

impl OutboxEvent {
    /// An event carrying `message`, stamped with the current trace context.
    pub fn new(subject: impl Into<String>, aggregate: impl Into<String>, message: &impl prost::Message) -> Self {
        let mut headers = BTreeMap::new();
        telemetry::inject_current(&mut telemetry::HeaderCarrier(&mut headers));
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            subject: subject.into(),
            aggregate: aggregate.into(),
            payload: message.encode_to_vec(),
            headers,
        }
    }

    fn headers_json(&self) -> String {
        serde_json::to_string(&self.headers).unwrap_or_else(|_| "{}".to_owned())
    }

    fn check(&self) -> Result<(), StorageError> {
        validate_subject(&self.subject).map_err(|e| StorageError::Query(sqlx::Error::Protocol(e.to_string())))
    }

    /// Inserts the event using the caller's SQLite transaction.
    pub async fn write_sqlite(&self, tx: &mut SqliteConnection) -> Result<(), StorageError> {
        self.check()?;
        sqlx::query(
            "INSERT INTO plinth_outbox (event_id, subject, aggregate, payload, headers, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&self.id)
        .bind(&self.subject)
        .bind(&self.aggregate)
        .bind(&self.payload)
        .bind(self.headers_json())
        .bind(crate::auth::unix_now_ms())
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Inserts the event using the caller's PostgreSQL transaction.
    pub async fn write_postgres(&self, tx: &mut PgConnection) -> Result<(), StorageError> {
        self.check()?;
        sqlx::query(
            "INSERT INTO plinth_outbox (event_id, subject, aggregate, payload, headers, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&self.id)
        .bind(&self.subject)
        .bind(&self.aggregate)
        .bind(&self.payload)
        .bind(self.headers_json())
        .bind(crate::auth::unix_now_ms())
        .execute(tx)
        .await?;
        Ok(())
    }
}

/// A connection an outbox row can be written on, so code written once over
/// both backends (see [`crate::on_db`]) can call [`OutboxEvent::write`].
pub trait OutboxWriter: Send {
    /// Inserts `event` on this connection (inside the caller's transaction).
    fn write_event<'a>(
        &'a mut self,
        event: &'a OutboxEvent,
    ) -> futures::future::BoxFuture<'a, Result<(), StorageError>>;
}

impl OutboxWriter for SqliteConnection {
    fn write_event<'a>(
        &'a mut self,
        event: &'a OutboxEvent,
    ) -> futures::future::BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(event.write_sqlite(self))
    }
}

impl OutboxWriter for PgConnection {
    fn write_event<'a>(
        &'a mut self,
        event: &'a OutboxEvent,
    ) -> futures::future::BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(event.write_postgres(self))
    }
}

impl OutboxEvent {
    /// Inserts the event using the caller's transaction, on either backend.
    pub async fn write(&self, conn: &mut impl OutboxWriter) -> Result<(), StorageError> {
        conn.write_event(self).await
    }
}

type Row = (i64, String, String, Vec<u8>, String);

/// Publishes one component's outbox.
#[derive(Clone)]
pub struct Relay {
    component: String,
    db: Db,
    bus: SharedBus,
    wake: Arc<Notify>,
    poll: Duration,
    batch: u32,
}

impl Relay {
    /// A relay for `component`'s outbox in `db`, publishing to `bus`.
    pub fn new(component: impl Into<String>, db: Db, bus: SharedBus, poll: Duration, batch: u32) -> Self {
        Self {
            component: component.into(),
            db,
            bus,
            wake: Arc::new(Notify::new()),
            poll,
            batch: batch.max(1),
        }
    }

    /// Wakes the relay now (call after committing a transaction with events)
    /// instead of waiting for the next poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Publishes until `token` is cancelled, then makes one last attempt to
    /// flush what is committed.
    pub async fn run(self, token: CancellationToken) -> Result<(), StorageError> {
        let backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut failures = 0u32;
        loop {
            let wait = match self.publish_batch().await {
                Ok(n) if n as u32 >= self.batch => {
                    failures = 0;
                    Duration::ZERO
                }
                Ok(_) => {
                    failures = 0;
                    self.poll
                }
                Err(e) => {
                    let wait = backoff.delay(failures);
                    if failures == 0 || failures.is_power_of_two() {
                        tracing::warn!(component = %self.component, error = %e, attempt = failures, "outbox relay cannot publish, will retry");
                    }
                    failures = failures.saturating_add(1);
                    wait
                }
            };
            if wait.is_zero() {
                if token.is_cancelled() {
                    return Ok(());
                }
                continue;
            }
            tokio::select! {
                () = token.cancelled() => {
                    if let Err(e) = self.publish_batch().await {
                        tracing::info!(component = %self.component, error = %e, "outbox left rows for the next start");
                    }
                    return Ok(());
                }
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Publishes up to one batch in order; returns how many were published.
    /// Stops at the first failure so order per aggregate is kept.
    pub async fn publish_batch(&self) -> Result<usize, RelayError> {
        let limit = i64::from(self.batch);
        match &self.db {
            Db::Sqlite(pool) => {
                let rows: Vec<Row> = sqlx::query_as(
                    "SELECT seq, event_id, subject, payload, headers FROM plinth_outbox ORDER BY seq LIMIT ?",
                )
                .bind(limit)
                .fetch_all(pool)
                .await
                .map_err(StorageError::from)?;
                let (published, result) = self.publish_rows(&rows).await;
                if let Some(last) = published {
                    sqlx::query("DELETE FROM plinth_outbox WHERE seq <= ?")
                        .bind(last)
                        .execute(pool)
                        .await
                        .map_err(StorageError::from)?;
                }
                self.record_pending(pool_count_sqlite(pool).await);
                result
            }
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(StorageError::from)?;
                // One relay per schema at a time, across replicas; the others skip the round.
                let (locked,): (bool,) =
                    sqlx::query_as("SELECT pg_try_advisory_xact_lock(hashtext('plinth_outbox.' || current_schema()))")
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(StorageError::from)?;
                if !locked {
                    return Ok(0);
                }
                let rows: Vec<Row> = sqlx::query_as(
                    "SELECT seq, event_id, subject, payload, headers FROM plinth_outbox ORDER BY seq LIMIT $1",
                )
                .bind(limit)
                .fetch_all(&mut *tx)
                .await
                .map_err(StorageError::from)?;
                let (published, result) = self.publish_rows(&rows).await;
                if let Some(last) = published {
                    sqlx::query("DELETE FROM plinth_outbox WHERE seq = ANY($1)")
                        .bind(rows.iter().map(|r| r.0).filter(|s| *s <= last).collect::<Vec<i64>>())
                        .execute(&mut *tx)
                        .await
                        .map_err(StorageError::from)?;
                }
                tx.commit().await.map_err(StorageError::from)?;
                let pending: Result<(i64,), _> = sqlx::query_as("SELECT count(*) FROM plinth_outbox")
                    .fetch_one(pool)
                    .await;
                self.record_pending(pending.map(|p| p.0).ok());
                result
            }
        }
    }

    async fn publish_rows(&self, rows: &[Row]) -> (Option<i64>, Result<usize, RelayError>) {
        let mut last = None;
        for (count, (seq, id, subject, payload, headers)) in rows.iter().enumerate() {
            let event = Event {
                id: id.clone(),
                subject: subject.clone(),
                payload: Bytes::from(payload.clone()),
                headers: serde_json::from_str(headers).unwrap_or_default(),
            };
            if let Err(e) = self.bus.publish(&event).await {
                return (last, Err(RelayError::Bus(e)));
            }
            crate::metrics::runtime()
                .events_published
                .with_label_values(&[self.component.as_str()])
                .inc();
            last = Some(*seq);
            tracing::debug!(component = %self.component, subject = %subject, event_id = %id, n = count + 1, "event published");
        }
        (last, Ok(rows.len()))
    }

    fn record_pending(&self, pending: Option<i64>) {
        if let Some(n) = pending {
            crate::metrics::runtime()
                .outbox_pending
                .with_label_values(&[self.component.as_str()])
                .set(n);
        }
    }
}

async fn pool_count_sqlite(pool: &sqlx::SqlitePool) -> Option<i64> {
    let r: Result<(i64,), _> = sqlx::query_as("SELECT count(*) FROM plinth_outbox")
        .fetch_one(pool)
        .await;
    r.map(|r| r.0).ok()
}

/// A relay round failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading or deleting outbox rows failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The bus did not take an event.
    #[error(transparent)]
    Bus(#[from] super::BusError),
}
