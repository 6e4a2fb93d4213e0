//! Signing-key rotation across replicas: two auth processes on one
//! PostgreSQL database. A rotation on one is published by both before either
//! signs with the new key, then both sign with it, each verifies the other's
//! tokens, and tokens signed with the old key keep working everywhere.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

use std::time::Duration;

use plinth::auth::v1::{GetMeRequest, RotateSigningKeyRequest};
use plinth_runtime::config::Config;
use plinth_tests::{
    ADMIN_EMAIL, ADMIN_PASSWORD, PASSWORD, TestApp, access_token, postgres_config, published_kids, register_user,
    with_admin, with_bearer,
};

/// The `kid` in a token's header.
fn kid(token: &str) -> String {
    plinth_runtime::auth::jwt::peek_kid(token).unwrap_or_default()
}

fn replica(config: &Config) -> Config {
    let mut replica = with_admin(TestApp::replica_of(config, "auth").unwrap());
    // Fast clocks: the same rules as the defaults, in seconds instead of minutes.
    replica.auth.jwks_refresh_secs = 1;
    replica.auth.key_publish_lead_secs = 2;
    replica.auth.key_reload_secs = 1;
    replica
}

#[tokio::test]
async fn a_rotation_on_one_replica_is_followed_by_the_other() {
    let Some(config) = postgres_config("a_rotation_on_one_replica_is_followed_by_the_other").unwrap() else {
        return;
    };
    let a = TestApp::spawn(replica(&config)).await.unwrap();
    let b = TestApp::spawn(replica(&config)).await.unwrap();
    let mut on_a = a.auth().await.unwrap();
    let mut on_b = b.auth().await.unwrap();
    let admin = access_token(&mut on_a, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    let email = register_user(&mut on_a, "rotation").await.unwrap();
    let old = access_token(&mut on_b, &email, PASSWORD).await.unwrap();
    let old_kid = kid(&old);

    let rotated = on_a
        .rotate_signing_key(with_bearer(RotateSigningKeyRequest {}, &admin))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.kid, old_kid);

    // B publishes the new key after at most one reload, within the publish
    // lead (the rule that it does so before signing is the key ring's own test).
    let mut seen_on_b = false;
    for _ in 0..15 {
        if published_kids(&mut on_b).await.unwrap().contains(&rotated.kid) {
            seen_on_b = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen_on_b, "replica B never published the new key");
    // After the lead (and B's next reload), both sign with the new key.
    let activate = rotated.activate_time.unwrap().seconds;
    let wait = u64::try_from(activate - plinth_runtime::auth::unix_now()).unwrap_or(0) + 2;
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let from_a = access_token(&mut on_a, &email, PASSWORD).await.unwrap();
    let from_b = access_token(&mut on_b, &email, PASSWORD).await.unwrap();
    assert_eq!((kid(&from_a), kid(&from_b)), (rotated.kid.clone(), rotated.kid.clone()));

    // Each verifies the other's new tokens, and the old token still works on both.
    for (client, token) in [(&on_a, &from_b), (&on_b, &from_a), (&on_a, &old), (&on_b, &old)] {
        client
            .clone()
            .get_me(with_bearer(GetMeRequest {}, token))
            .await
            .unwrap();
    }
    let keys = published_kids(&mut on_a).await.unwrap();
    assert!(keys.contains(&old_kid) && keys.contains(&rotated.kid), "{keys:?}");
    b.stop().await;
    a.stop().await;
}

/// A `signing_keys` row: kid, seed (clear), sealed seed, kek id.
type StoredKeyRow = (String, Vec<u8>, Option<Vec<u8>>, Option<String>);

/// `(kid, bytes in the clear seed column, kek_id)` of every stored signing key.
async fn stored_keys(config: &Config) -> Vec<(String, usize, Option<String>)> {
    let target = plinth_runtime::storage::DbTarget::for_component(
        config.database_url.as_ref(),
        &config.data_dir,
        &config.storage.schema_prefix,
        "auth",
    );
    let db = plinth_runtime::storage::Db::connect(&target, &config.storage)
        .await
        .unwrap();
    let rows: Vec<StoredKeyRow> = plinth_runtime::on_db!(&db, |pool| sqlx::query_as(
        "SELECT kid, seed, sealed_seed, kek_id FROM signing_keys ORDER BY created_at"
    )
    .fetch_all(pool)
    .await
    .unwrap());
    db.close().await;
    for (kid, _, sealed, kek) in &rows {
        if kek.is_some() {
            // Nonce, 32-byte seed, tag.
            assert_eq!(sealed.as_ref().map(Vec::len), Some(12 + 32 + 16), "{kid}");
        }
    }
    rows.into_iter()
        .map(|(kid, seed, _, kek)| (kid, seed.len(), kek))
        .collect()
}

/// A key encryption key for `PLINTH_AUTH__KEYS`.
fn kek(id: &str) -> secrecy::SecretString {
    use base64::Engine;
    format!("{id}={}", base64::engine::general_purpose::STANDARD.encode([7u8; 32])).into()
}

/// Signing keys at rest: an embedded deployment seals them under a key it
/// generates; one that stored them in clear (PostgreSQL without
/// `PLINTH_AUTH__KEYS`) seals them when it next starts with keys and keeps
/// honouring the tokens they signed; a later rotation is sealed too; and a
/// replica without the keys refuses to start rather than run without a
/// usable signing key.
#[tokio::test]
async fn signing_keys_are_sealed_at_rest() {
    let embedded = with_admin(TestApp::config());
    let app = TestApp::spawn(embedded.clone()).await.unwrap();
    let rows = stored_keys(&embedded).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, 0, "no seed in clear");
    assert!(
        rows[0].2.as_deref().unwrap_or_default().starts_with("local-"),
        "{rows:?}"
    );
    assert!(embedded.data_dir.join("auth-keys").exists());
    app.stop().await;

    let Some(config) = postgres_config("signing_keys_are_sealed_at_rest").unwrap() else {
        return;
    };
    let clear = TestApp::spawn(replica(&config)).await.unwrap();
    let mut on_clear = clear.auth().await.unwrap();
    let admin = access_token(&mut on_clear, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    let rows = stored_keys(&config).await;
    assert!(rows.iter().all(|r| r.1 == 32 && r.2.is_none()), "{rows:?}");
    clear.stop_keeping_data().await;

    let mut keyed = replica(&config);
    keyed.auth.keys = Some(kek("k1"));
    let sealed = TestApp::spawn(keyed).await.unwrap();
    let rows = stored_keys(&config).await;
    assert!(
        rows.iter().all(|r| r.1 == 0 && r.2.as_deref() == Some("k1")),
        "{rows:?}"
    );
    let mut on_sealed = sealed.auth().await.unwrap();
    let me = on_sealed
        .get_me(with_bearer(GetMeRequest {}, &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        me.user.unwrap().email,
        ADMIN_EMAIL,
        "a token signed before sealing still verifies"
    );
    on_sealed
        .rotate_signing_key(with_bearer(RotateSigningKeyRequest {}, &admin))
        .await
        .unwrap();
    let rows = stored_keys(&config).await;
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter().all(|r| r.1 == 0 && r.2.as_deref() == Some("k1")),
        "{rows:?}"
    );
    sealed.stop_keeping_data().await;

    let refused = TestApp::spawn(replica(&config)).await.err().map(|e| format!("{e:#}"));
    assert!(
        refused.as_deref().unwrap_or_default().contains("PLINTH_AUTH__KEYS"),
        "{refused:?}"
    );
    let mut wrong = replica(&config);
    wrong.auth.keys = Some(kek("k2"));
    let refused = TestApp::spawn(wrong).await.err().map(|e| format!("{e:#}"));
    assert!(refused.as_deref().unwrap_or_default().contains("\"k1\""), "{refused:?}");
    let mut keyed = replica(&config);
    keyed.auth.keys = Some(kek("k1"));
    TestApp::spawn(keyed).await.unwrap().stop().await;
}
