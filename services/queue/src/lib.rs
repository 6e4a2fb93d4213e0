//! The queue service: durable jobs with leases, retries with backoff, dead
//! letters and redrive, dedup, delays, TTL, priorities, fair scheduling
//! across group keys, and rate and concurrency limits. `store` holds the
//! SQL (SQLite and PostgreSQL), `service` the meaning of each call, `grpc`
//! the wire.

pub mod cron;
mod error;
mod grpc;
pub mod metrics;
pub mod model;
mod rates;
mod schedules;
mod service;
mod store;

use plinth_runtime::storage::Migrations;
use sqlx::migrate::Migrator;

pub use error::QueueError;
pub use grpc::QueueGrpc;
pub use service::{QueueView, Queues, SettingsUpdate, Status};
pub use store::{Store, Swept};

static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

/// This service's tables, for `Db::migrate`.
pub const MIGRATIONS: Migrations = Migrations {
    sqlite: Some(&SQLITE),
    postgres: Some(&POSTGRES),
};
