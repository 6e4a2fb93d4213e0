//! The migration that made email optional rebuilds `users` on SQLite. It
//! must keep every row and every reference to it: sessions, refresh tokens,
//! API keys and reset tokens still point at the same users, and foreign
//! keys are still enforced against the new table.

use std::borrow::Cow;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

#[tokio::test]
async fn rebuilding_users_keeps_rows_and_references() {
    let dir = std::env::temp_dir().join(format!("plinth-phone-migration-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let options = SqliteConnectOptions::new()
        .filename(dir.join("auth.db"))
        .create_if_missing(true)
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .unwrap();
    let all = plinth_auth::MIGRATIONS.sqlite.unwrap();

    // The schema as it was before phone numbers.
    let before = Migrator {
        migrations: Cow::Owned(all.iter().filter(|m| m.version < 1006).cloned().collect()),
        ..Migrator::DEFAULT
    };
    before.run(&pool).await.unwrap();
    for sql in [
        "INSERT INTO users (id, email, password_hash, display_name, status, roles, created_at, updated_at) \
         VALUES ('u1', 'ada@example.com', 'hash', 'Ada', 'active', 'viewer,developer', 1, 1)",
        "INSERT INTO sessions (id, user_id, created_at, expires_at) VALUES ('s1', 'u1', 1, 2)",
        "INSERT INTO refresh_tokens (digest, session_id, created_at, expires_at) VALUES ('d1', 's1', 1, 2)",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }

    all.run(&pool).await.unwrap();

    let (email, phone, roles): (Option<String>, Option<String>, String) =
        sqlx::query_as("SELECT email, phone, roles FROM users WHERE id = 'u1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(email.as_deref(), Some("ada@example.com"));
    assert_eq!(phone, None);
    assert_eq!(roles, "viewer,developer");
    let (owner,): (String,) = sqlx::query_as("SELECT user_id FROM sessions WHERE id = 's1'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(owner, "u1");
    let broken: Vec<(String,)> = sqlx::query_as("SELECT \"table\" FROM pragma_foreign_key_check")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(broken.is_empty(), "dangling references: {broken:?}");
    // References now resolve to the new table and are still enforced.
    let orphan =
        sqlx::query("INSERT INTO sessions (id, user_id, created_at, expires_at) VALUES ('s2', 'nobody', 1, 2)")
            .execute(&pool)
            .await;
    assert!(orphan.is_err(), "a session for a missing user was accepted");
    // A user needs an email or a phone number; phone numbers are unique.
    let neither =
        sqlx::query("INSERT INTO users (id, password_hash, created_at, updated_at) VALUES ('u2', 'hash', 1, 1)")
            .execute(&pool)
            .await;
    assert!(neither.is_err());
    for id in ["u3", "u4"] {
        let r = sqlx::query(
            "INSERT INTO users (id, phone, password_hash, created_at, updated_at) VALUES ($1, '+442079460958', 'h', 1, 1)",
        )
        .bind(id)
        .execute(&pool)
        .await;
        assert_eq!(r.is_ok(), id == "u3");
    }
    pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
