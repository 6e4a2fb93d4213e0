//! The audit service: a tamper-evident, append-only log of everything that
//! happens in the mesh. Entries form an RFC 6962 Merkle tree; each round of
//! integration signs a C2SP checkpoint; inclusion and consistency proofs are
//! served from stored subtree hashes so that any RFC 9162 verifier can check
//! them. `merkle` is the arithmetic, `note` the signatures, `store` the SQL,
//! `service` the meaning of each call, `ingest` + `mapping` the bus consumer,
//! `grpc` the wire.

pub mod alerts;
mod error;
mod grpc;
mod ingest;
pub mod mapping;
pub mod merkle;
pub mod model;
pub mod note;
mod service;
mod store;

use plinth_runtime::storage::Migrations;
use sqlx::migrate::Migrator;

pub use error::AuditError;
pub use grpc::AuditGrpc;
pub use service::{Audit, ConsistencyProof, InclusionProof, OpenError, Page};
pub use store::Store;

static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

/// This service's tables, for `Db::migrate`.
pub const MIGRATIONS: Migrations = Migrations {
    sqlite: Some(&SQLITE),
    postgres: Some(&POSTGRES),
};
