//! The auth service: users, password login, sessions with rotating refresh
//! tokens, and the Ed25519 keys that sign access tokens. Token verification
//! and permission enforcement for every service live in
//! `plinth_runtime::auth`; this crate issues what that layer checks.

mod authz_grpc;
mod error;
mod grpc;
mod identity;
mod keys;
mod password;
pub mod rbac;
mod service;
mod store;
mod throttle;

use plinth_runtime::storage::Migrations;
use sqlx::migrate::Migrator;

pub use authz_grpc::AuthzGrpc;
pub use error::AuthError;
pub use grpc::AuthGrpc;
pub use identity::Identifier;
pub use password::PasswordHasher;
pub use service::{Auth, LoginOutcome, TokenPair};
pub use throttle::{Limits, LoginThrottle};

static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

/// This service's tables, for `Db::migrate`.
pub const MIGRATIONS: Migrations = Migrations {
    sqlite: Some(&SQLITE),
    postgres: Some(&POSTGRES),
};
