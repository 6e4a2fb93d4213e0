//! Versioned migrations: the runtime's own tables (versions below
//! [`RUNTIME_MIGRATIONS_BELOW`]) are merged with a component's so one
//! migrator, one history table and one advisory lock (PostgreSQL) cover both.
//! Several replicas starting at once serialise on that lock.

use sqlx::migrate::{Migration, Migrator};

use super::{Db, StorageError};

/// Runtime-owned migrations use versions below this; services start at it or above.
pub const RUNTIME_MIGRATIONS_BELOW: i64 = 1000;

static RUNTIME_SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
static RUNTIME_POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

/// A component's migrations for each backend (from `sqlx::migrate!`).
#[derive(Debug, Clone, Copy)]
pub struct Migrations {
    /// For the embedded SQLite database.
    pub sqlite: Option<&'static Migrator>,
    /// For PostgreSQL.
    pub postgres: Option<&'static Migrator>,
}

impl Migrations {
    /// Only the runtime's tables (a component with no tables of its own yet).
    pub const RUNTIME_ONLY: Migrations = Migrations {
        sqlite: None,
        postgres: None,
    };

    fn merged(runtime: &Migrator, own: Option<&Migrator>, component: &str) -> Result<Migrator, StorageError> {
        let mut all: Vec<Migration> = runtime.iter().cloned().collect();
        for m in own.into_iter().flat_map(|m| m.iter()) {
            if m.version < RUNTIME_MIGRATIONS_BELOW {
                return Err(StorageError::Migrate {
                    component: component.to_owned(),
                    reason: format!(
                        "migration {} uses a version below {RUNTIME_MIGRATIONS_BELOW}, which the runtime reserves",
                        m.version
                    ),
                });
            }
            all.push(m.clone());
        }
        all.sort_by_key(|m| m.version);
        Ok(Migrator::with_migrations(all))
    }

    pub(super) async fn run(&self, db: &Db, component: &str) -> Result<(), StorageError> {
        let failed = |e: sqlx::migrate::MigrateError| StorageError::Migrate {
            component: component.to_owned(),
            reason: e.to_string(),
        };
        match db {
            Db::Sqlite(pool) => Self::merged(&RUNTIME_SQLITE, self.sqlite, component)?
                .run(pool)
                .await
                .map_err(failed),
            Db::Postgres(pool) => Self::merged(&RUNTIME_POSTGRES, self.postgres, component)?
                .run(pool)
                .await
                .map_err(failed),
        }
    }
}
