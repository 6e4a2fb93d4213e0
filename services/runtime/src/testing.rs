//! Helpers for tests in every crate: which real backends the machine offers
//! (`PLINTH_TEST_DATABASE_URL`, `PLINTH_TEST_REDIS_URL`, `PLINTH_TEST_NATS_URL`),
//! and isolated databases (a private PostgreSQL schema or a fresh SQLite file)
//! that are removed afterwards. Not used by production code paths.

use std::path::PathBuf;

use secrecy::SecretString;

use crate::config::StorageConfig;
use crate::storage::{Db, DbTarget, Migrations, StorageError};

/// A real backend a test can ask for.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    /// PostgreSQL, `PLINTH_TEST_DATABASE_URL`.
    Postgres,
    /// Redis, `PLINTH_TEST_REDIS_URL`.
    Redis,
    /// NATS with JetStream, `PLINTH_TEST_NATS_URL`.
    Nats,
    /// A Python interpreter with the interoperability packages (PyJWT…), `PLINTH_TEST_PYTHON`.
    Python,
}

impl Backend {
    /// The variable that points tests at this backend.
    pub fn variable(self) -> &'static str {
        match self {
            Backend::Postgres => "PLINTH_TEST_DATABASE_URL",
            Backend::Redis => "PLINTH_TEST_REDIS_URL",
            Backend::Nats => "PLINTH_TEST_NATS_URL",
            Backend::Python => "PLINTH_TEST_PYTHON",
        }
    }
}

/// The backend was required (`PLINTH_TEST_REQUIRE_BACKENDS=1`) but not configured.
#[derive(Debug, thiserror::Error)]
#[error("{0} is not set but PLINTH_TEST_REQUIRE_BACKENDS=1 requires it")]
pub struct MissingBackend(&'static str);

/// The URL of `backend` for tests. `Ok(None)` (with a notice on stderr) means
/// skip this variant; it is an error instead when `PLINTH_TEST_REQUIRE_BACKENDS=1`.
pub fn backend_url(backend: Backend, test: &str) -> Result<Option<String>, MissingBackend> {
    match std::env::var(backend.variable()) {
        Ok(url) if !url.is_empty() => Ok(Some(url)),
        _ if std::env::var("PLINTH_TEST_REQUIRE_BACKENDS").is_ok_and(|v| v == "1") => {
            Err(MissingBackend(backend.variable()))
        }
        _ => {
            eprintln!("SKIPPED {test}: {} is not set", backend.variable());
            Ok(None)
        }
    }
}

/// A database private to one test.
pub struct TestDatabase {
    /// The pool, already migrated.
    pub db: Db,
    /// What to remove afterwards.
    target: DbTarget,
    dir: Option<PathBuf>,
}

impl TestDatabase {
    /// A fresh SQLite file in a new temporary directory.
    pub async fn sqlite(component: &str, migrations: &Migrations) -> Result<Self, StorageError> {
        let dir = std::env::temp_dir().join(format!("plinth-test-{}", uuid::Uuid::now_v7().simple()));
        let target = DbTarget::Sqlite(dir.join(format!("{component}.db")));
        let db = Db::connect(&target, &test_storage()).await?;
        db.migrate(component, migrations).await?;
        Ok(Self {
            db,
            target,
            dir: Some(dir),
        })
    }

    /// A fresh schema `plinth_test_<id>` in the PostgreSQL at `url`.
    pub async fn postgres(url: &str, component: &str, migrations: &Migrations) -> Result<Self, StorageError> {
        let schema = format!("plinth_test_{}", uuid::Uuid::now_v7().simple());
        let target = DbTarget::Postgres {
            url: SecretString::from(url.to_owned()),
            schema,
        };
        let db = Db::connect(&target, &test_storage()).await?;
        db.migrate(component, migrations).await?;
        Ok(Self { db, target, dir: None })
    }

    /// A second pool on the same database (another "replica").
    pub async fn connect_again(&self) -> Result<Db, StorageError> {
        Db::connect(&self.target, &test_storage()).await
    }

    /// Drops the schema or deletes the files.
    pub async fn cleanup(self) -> Result<(), StorageError> {
        self.db.close().await;
        if let DbTarget::Postgres { url, schema } = &self.target {
            let admin = Db::connect(
                &DbTarget::Postgres {
                    url: url.clone(),
                    schema: "public".into(),
                },
                &test_storage(),
            )
            .await?;
            if let Db::Postgres(pool) = &admin {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                )))
                .execute(pool)
                .await?;
            }
            admin.close().await;
        }
        if let Some(dir) = self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(())
    }
}

fn test_storage() -> StorageConfig {
    StorageConfig {
        max_connections: 5,
        connect_retry_secs: 5,
        ..StorageConfig::default()
    }
}

/// A TCP forwarder to a real server that a test can take down and bring back,
/// to simulate the server's outage without stopping the machine's server.
pub struct ToggleProxy {
    addr: std::net::SocketAddr,
    upstream: String,
    running: Option<crate::Tasks>,
}

impl ToggleProxy {
    /// Reserves a local port for `upstream` (`host:port`); the proxy starts down.
    pub async fn reserve(upstream: impl Into<String>) -> std::io::Result<Self> {
        let probe = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = probe.local_addr()?;
        drop(probe);
        Ok(Self {
            addr,
            upstream: upstream.into(),
            running: None,
        })
    }

    /// The address clients should dial.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Starts accepting and forwarding.
    pub async fn up(&mut self) -> std::io::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        let tasks = crate::Tasks::new();
        let token = tasks.token();
        let upstream = self.upstream.clone();
        let conns = tasks.clone();
        tasks.spawn("toggle-proxy-accept", async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    () = token.cancelled() => return Ok::<(), std::io::Error>(()),
                    accepted = listener.accept() => accepted?,
                };
                let upstream = upstream.clone();
                let token = token.clone();
                conns.spawn("toggle-proxy-conn", async move {
                    let mut outbound = tokio::net::TcpStream::connect(upstream).await?;
                    tokio::select! {
                        () = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                    Ok::<(), std::io::Error>(())
                });
            }
        });
        self.running = Some(tasks);
        Ok(())
    }

    /// Stops accepting and cuts every open connection.
    pub async fn down(&mut self) {
        if let Some(tasks) = self.running.take() {
            tasks.shutdown(std::time::Duration::from_secs(5)).await;
        }
    }
}

/// `host:port` of a URL such as `nats://127.0.0.1:4222` or `redis://127.0.0.1:6379/0`.
pub fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}
