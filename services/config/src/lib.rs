//! The config service: namespaces and environments of typed values with a
//! revision per write, history, diff and rollback, releases, JSON Schema
//! validation, envelope-encrypted secrets (also read live by other components of the
//! process: `live_secrets`), and a watch that is gap-free
//! across replicas. `feed` keeps each replica's in-memory head in step with
//! the database; `watch` streams from it.

mod convert;
mod error;
mod feed;
pub mod formats;
mod grpc;
mod live_secrets;
pub mod model;
mod schema;
mod service;
mod store;
mod watch;

use plinth_runtime::storage::Migrations;
use sqlx::migrate::Migrator;

pub use error::ConfigError;
pub use grpc::{ConfigGrpc, ConfigServer, REVEAL_PERMISSION};
pub use live_secrets::LiveSecrets;
pub use plinth_runtime::crypto::Keyring;
pub use service::{Caller, Configuration};
pub use store::Store;

static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

/// This service's tables, for `Db::migrate`.
pub const MIGRATIONS: Migrations = Migrations {
    sqlite: Some(&SQLITE),
    postgres: Some(&POSTGRES),
};
