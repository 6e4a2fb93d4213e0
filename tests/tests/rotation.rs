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
