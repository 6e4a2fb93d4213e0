//! Storage on SQLite and PostgreSQL: migrations merge and run once, replicas
//! can migrate concurrently, isolation between test schemas, statement
//! timeouts, and an unreachable database failing clearly.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

use std::borrow::Cow;
use std::time::{Duration, Instant};

use plinth_runtime::config::StorageConfig;
use plinth_runtime::storage::{Db, DbTarget, Migrations, StorageError};
use plinth_runtime::testing::{Backend, TestDatabase, backend_url};
use secrecy::SecretString;
use sqlx::migrate::{Migration, MigrationType, Migrator};

fn leak(migrations: Vec<Migration>) -> &'static Migrator {
    Box::leak(Box::new(Migrator::with_migrations(migrations)))
}

fn migration(version: i64, sql: &'static str) -> Migration {
    Migration::new(
        version,
        Cow::Borrowed("test"),
        MigrationType::Simple,
        sqlx::SqlSafeStr::into_sql_str(sql),
        false,
    )
}

fn service_migrations() -> Migrations {
    let m = leak(vec![migration(
        1000,
        "CREATE TABLE widgets (id BIGINT PRIMARY KEY, name TEXT NOT NULL)",
    )]);
    Migrations {
        sqlite: Some(m),
        postgres: Some(m),
    }
}

async fn count_widgets(db: &Db) -> i64 {
    let q = "SELECT count(*) FROM widgets";
    let (n,): (i64,) = match db {
        Db::Sqlite(p) => sqlx::query_as(q).fetch_one(p).await.unwrap(),
        Db::Postgres(p) => sqlx::query_as(q).fetch_one(p).await.unwrap(),
    };
    n
}

async fn migrations_contract(tdb: TestDatabase) {
    let m = service_migrations();
    // The runtime's outbox and the service's own table both exist.
    assert_eq!(count_widgets(&tdb.db).await, 0);
    // Running again is a no-op, also from a second pool (another replica).
    tdb.db.migrate("test", &m).await.unwrap();
    let replica = tdb.connect_again().await.unwrap();
    replica.migrate("test", &m).await.unwrap();
    // A service migration in the runtime's reserved range is refused by name.
    let bad = leak(vec![migration(7, "SELECT 1")]);
    let err = tdb
        .db
        .migrate(
            "test",
            &Migrations {
                sqlite: Some(bad),
                postgres: Some(bad),
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("reserves"), "{err}");
    tdb.db.ping().await.unwrap();
    replica.close().await;
    tdb.cleanup().await.unwrap();
}

#[tokio::test]
async fn sqlite_migrations_merge_and_repeat_safely() {
    migrations_contract(TestDatabase::sqlite("test", &service_migrations()).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_migrations_merge_and_repeat_safely() {
    let Some(url) = backend_url(Backend::Postgres, "postgres_migrations_merge_and_repeat_safely").unwrap() else {
        return;
    };
    migrations_contract(
        TestDatabase::postgres(&url, "test", &service_migrations())
            .await
            .unwrap(),
    )
    .await;
}

#[tokio::test]
async fn concurrent_replicas_migrate_one_postgres_schema_once() {
    let Some(url) = backend_url(
        Backend::Postgres,
        "concurrent_replicas_migrate_one_postgres_schema_once",
    )
    .unwrap() else {
        return;
    };
    let schema = format!("plinth_test_{}", uuid::Uuid::now_v7().simple());
    let target = DbTarget::Postgres {
        url: SecretString::from(url.clone()),
        schema: schema.clone(),
    };
    let cfg = StorageConfig::default();
    let starts = (0..4).map(|_| {
        let target = target.clone();
        let cfg = cfg.clone();
        async move {
            let db = Db::connect(&target, &cfg).await?;
            db.migrate("test", &service_migrations()).await?;
            Ok::<Db, StorageError>(db)
        }
    });
    let dbs: Vec<Db> = futures::future::join_all(starts)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    if let Db::Postgres(p) = &dbs[0] {
        let (applied,): (i64,) = sqlx::query_as("SELECT count(*) FROM _sqlx_migrations")
            .fetch_one(p)
            .await
            .unwrap();
        assert_eq!(applied, 2, "runtime + service migration, each applied once");
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE")))
            .execute(p)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn postgres_test_schemas_are_isolated_and_removed() {
    let Some(url) = backend_url(Backend::Postgres, "postgres_test_schemas_are_isolated_and_removed").unwrap() else {
        return;
    };
    let a = TestDatabase::postgres(&url, "test", &service_migrations())
        .await
        .unwrap();
    let b = TestDatabase::postgres(&url, "test", &service_migrations())
        .await
        .unwrap();
    if let Db::Postgres(p) = &a.db {
        sqlx::query("INSERT INTO widgets (id, name) VALUES (1, 'a')")
            .execute(p)
            .await
            .unwrap();
    }
    assert_eq!(count_widgets(&a.db).await, 1);
    assert_eq!(
        count_widgets(&b.db).await,
        0,
        "a write in one test schema must not be visible in another"
    );
    let schema: String = match &a.db {
        Db::Postgres(p) => sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(p)
            .await
            .unwrap(),
        Db::Sqlite(_) => unreachable!(),
    };
    a.cleanup().await.unwrap();
    b.cleanup().await.unwrap();
    let admin = Db::connect(
        &DbTarget::Postgres {
            url: SecretString::from(url),
            schema: "public".into(),
        },
        &StorageConfig::default(),
    )
    .await
    .unwrap();
    if let Db::Postgres(p) = &admin {
        let left: Option<String> = sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname = $1")
            .bind(&schema)
            .fetch_optional(p)
            .await
            .unwrap();
        assert!(left.is_none(), "cleanup must drop the schema");
    }
}

#[tokio::test]
async fn postgres_statement_timeout_is_enforced() {
    let Some(url) = backend_url(Backend::Postgres, "postgres_statement_timeout_is_enforced").unwrap() else {
        return;
    };
    let cfg = StorageConfig {
        statement_timeout_ms: 200,
        ..StorageConfig::default()
    };
    let db = Db::connect(
        &DbTarget::Postgres {
            url: SecretString::from(url),
            schema: "public".into(),
        },
        &cfg,
    )
    .await
    .unwrap();
    let Db::Postgres(p) = &db else { unreachable!() };
    let started = Instant::now();
    let err = sqlx::query("SELECT pg_sleep(3)").execute(p).await.unwrap_err();
    assert!(err.to_string().contains("statement timeout"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn unreachable_postgres_fails_after_the_retry_budget() {
    let cfg = StorageConfig {
        connect_retry_secs: 1,
        acquire_timeout_ms: 300,
        ..StorageConfig::default()
    };
    let target = DbTarget::Postgres {
        url: SecretString::from("postgres://u@127.0.0.1:1/x".to_owned()),
        schema: "s".into(),
    };
    let started = Instant::now();
    let err = Db::connect(&target, &cfg).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(
        err.to_string().contains("127.0.0.1:1"),
        "the error must say which database: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn sqlite_files_are_created_in_wal_mode() {
    let tdb = TestDatabase::sqlite("test", &Migrations::RUNTIME_ONLY).await.unwrap();
    let Db::Sqlite(p) = &tdb.db else { unreachable!() };
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(p).await.unwrap();
    assert_eq!(mode, "wal");
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(p).await.unwrap();
    assert_eq!(sync, 2, "FULL: an acknowledged write survives power loss");
    tdb.cleanup().await.unwrap();
}

/// A SQLite file of its own in a fresh directory, with a short busy timeout
/// and a table `marks (seq, <column>)`; the caller removes the directory.
async fn scratch_sqlite(name: &str, max_connections: u32, column: &str) -> (std::path::PathBuf, Db) {
    let dir = std::env::temp_dir().join(format!("plinth-{name}-{}", std::process::id()));
    let cfg = StorageConfig {
        acquire_timeout_ms: 200,
        max_connections,
        ..StorageConfig::default()
    };
    let db = Db::connect(&DbTarget::Sqlite(dir.join(format!("{name}.db"))), &cfg)
        .await
        .unwrap();
    let Db::Sqlite(pool) = &db else { unreachable!() };
    let create = format!("CREATE TABLE marks (seq INTEGER PRIMARY KEY AUTOINCREMENT, {column} INTEGER NOT NULL)");
    sqlx::query(sqlx::AssertSqlSafe(create)).execute(pool).await.unwrap();
    (dir, db)
}

/// The writers' answers, after asserting that none failed.
fn all_succeeded<T>(results: Vec<Result<T, sqlx::Error>>) -> Vec<T> {
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| e.to_string())
        .collect();
    assert!(failed.is_empty(), "writers failed: {failed:?}");
    results.into_iter().flatten().collect()
}

/// Concurrent write transactions on one SQLite file take turns in the order
/// they asked, instead of colliding on SQLite's lock, where each loser's busy
/// handler sleeps and retries and whoever retries at the right moment wins
/// (and, with the short busy timeout here, some fail "database is locked").
#[tokio::test]
async fn sqlite_writers_take_turns_in_arrival_order() {
    use plinth_runtime::storage::BeginWrite;
    let (dir, db) = scratch_sqlite("write-turns", 16, "writer").await;
    let Db::Sqlite(pool) = &db else { unreachable!() };
    // Each holds the lock for 2 ms: eight of them fit well within the 200 ms
    // that the last one may wait for its turn.
    let writers = (0..8).map(|w| async move {
        let mut tx = pool.begin_write().await?;
        sqlx::query("INSERT INTO marks (writer) VALUES (?)")
            .bind(w)
            .execute(&mut *tx)
            .await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
        tx.commit().await
    });
    all_succeeded(futures::future::join_all(writers).await);
    let order: Vec<i64> = sqlx::query_scalar("SELECT writer FROM marks ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(order, (0..8).collect::<Vec<i64>>(), "commits follow arrival");
    db.close().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An unflushed write transaction commits without waiting for the disk
/// (`synchronous=NORMAL`) while every other write keeps FULL, and both kinds
/// take the same turns at the file: mixed, none fails on SQLite's lock. A
/// closed database takes no more unflushed writes.
#[tokio::test]
async fn sqlite_unflushed_writes_skip_only_their_own_flush() {
    use plinth_runtime::storage::BeginWrite;
    let (dir, db) = scratch_sqlite("unflushed", 4, "sync").await;
    let Db::Sqlite(pool) = &db else { unreachable!() };
    let writers = (0..16).map(|w| async move {
        let mut tx = if w % 2 == 0 {
            pool.begin_write_unflushed().await?
        } else {
            pool.begin_write().await?
        };
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&mut *tx).await?;
        sqlx::query("INSERT INTO marks (sync) VALUES (?)")
            .bind(sync)
            .execute(&mut *tx)
            .await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
        tx.commit().await.map(|()| (w, sync))
    });
    let results = all_succeeded(futures::future::join_all(writers).await);
    for (w, sync) in results {
        let expected = if w % 2 == 0 { 1 } else { 2 };
        assert_eq!(sync, expected, "writer {w}: NORMAL only for unflushed writes");
    }
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM marks")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(stored, 16);
    db.close().await;
    assert!(
        matches!(pool.begin_write_unflushed().await, Err(sqlx::Error::PoolClosed)),
        "a closed database is not reopened behind its owner's back"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
