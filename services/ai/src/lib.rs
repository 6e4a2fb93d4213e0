//! The ai service: one request shape over OpenAI, Azure OpenAI, Anthropic,
//! Gemini and any OpenAI-compatible endpoint. `model` is the shape,
//! `providers` the wire formats, `router` picks targets and keeps their
//! health, `service` falls back, streams and records usage, `pricing` and
//! `tokens` count money and tokens, `limits` holds rate limits and budgets,
//! `usage` stores records, `grpc` is the wire.

pub mod cache;
mod coalesce;
mod error;
mod grpc;
pub mod limits;
pub mod model;
pub mod pricing;
pub mod providers;
pub mod router;
mod service;
mod telemetry;
pub mod tokens;
pub mod usage;

use plinth_runtime::storage::Migrations;
use sqlx::migrate::Migrator;

pub use error::AiError;
pub use grpc::AiGrpc;
pub use service::{Ai, Answer, Attempt, Caller, Embedded, ModelInfo, Served, StreamItem, Streaming, TargetInfo};

static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

/// This service's tables, for `Db::migrate`.
pub const MIGRATIONS: Migrations = Migrations {
    sqlite: Some(&SQLITE),
    postgres: Some(&POSTGRES),
};
