//! The auth service through gRPC, on SQLite and on PostgreSQL: registration
//! and its validation, login without user enumeration, tokens that every
//! service can verify from the published keys, refresh rotation with a grace
//! window for concurrent tabs and family revocation on reuse, and logout.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers fail the test loudly"
)]

use std::time::Duration;

use plinth::auth::v1::auth_service_client::AuthServiceClient;
use plinth::auth::v1::{
    GetJwksRequest, GetMeRequest, ListSessionsRequest, LoginRequest, LogoutRequest, RefreshRequest, RegisterRequest,
    RevokeAllSessionsRequest, RevokeSessionRequest,
};
use plinth_runtime::auth::jwt::{Expectations, KeySet, verify};
use plinth_runtime::auth::unix_now;
use plinth_runtime::config::Config;
use plinth_runtime::testing::{Backend, backend_url};
use plinth_tests::{TestApp, error_reason, with_bearer};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const PASSWORD: &str = "violet staircase under rain";

fn email() -> String {
    format!("user-{}@Example.com", plinth_tests::unique())
}

async fn login(
    client: &mut AuthServiceClient<Channel>,
    email: &str,
    password: &str,
) -> Result<(String, String), tonic::Status> {
    let resp = client
        .login(LoginRequest {
            email: email.into(),
            password: password.into(),
            phone: String::new(),
        })
        .await?
        .into_inner();
    let tokens = resp.tokens.unwrap();
    Ok((tokens.access_token, tokens.refresh_token))
}

async fn refresh(client: &mut AuthServiceClient<Channel>, token: &str) -> Result<String, tonic::Status> {
    let resp = client
        .refresh(RefreshRequest {
            refresh_token: token.into(),
        })
        .await?
        .into_inner();
    Ok(resp.tokens.unwrap().refresh_token)
}

async fn auth_contract(mut config: Config) {
    config.auth.refresh_grace_secs = 1;
    let app = TestApp::spawn(config).await.unwrap();
    let mut client = app.auth().await.unwrap();

    // Bad input names every bad field and creates nothing.
    let err = client
        .register(RegisterRequest {
            email: "not-an-email".into(),
            password: "short".into(),
            display_name: String::new(),
            phone: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let fields: Vec<String> = err
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(fields, vec!["email", "password"]);

    let email = email();
    let user = client
        .register(RegisterRequest {
            email: email.clone(),
            password: PASSWORD.into(),
            display_name: "Ada".into(),
            phone: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.email, email.to_lowercase(), "emails are case-normalised");
    let dup = client
        .register(RegisterRequest {
            email: email.to_uppercase(),
            password: PASSWORD.into(),
            display_name: String::new(),
            phone: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (dup.code(), error_reason(&dup).as_str()),
        (Code::AlreadyExists, "EMAIL_TAKEN")
    );

    // Wrong password and unknown user look the same.
    let wrong = login(&mut client, &email, "not the password at all").await.unwrap_err();
    let unknown = login(&mut client, "nobody-here@example.com", PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(
        (wrong.code(), wrong.message(), error_reason(&wrong)),
        (unknown.code(), unknown.message(), error_reason(&unknown))
    );

    // A login's access token verifies against the published keys and opens GetMe.
    let (access, refresh1) = login(&mut client, &email.to_uppercase(), PASSWORD).await.unwrap();
    let jwks = client.get_jwks(GetJwksRequest {}).await.unwrap().into_inner().keys;
    let expect = Expectations {
        issuer: "plinth".into(),
        audience: "plinth".into(),
        leeway_secs: 0,
    };
    let claims = verify(&access, &KeySet::from_jwks(&jwks), &expect, unix_now()).unwrap();
    assert_eq!(claims.sub, user.id);
    assert_eq!(claims.roles, vec!["viewer"]);
    let me = client
        .get_me(with_bearer(GetMeRequest {}, &access))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(me.id, user.id);
    let anonymous = client.get_me(GetMeRequest {}).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let mut forged = access.clone();
    forged.insert(forged.len() - 3, if forged.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(
        client
            .get_me(with_bearer(GetMeRequest {}, &forged))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    // Rotation: the used token still works within the grace window (two tabs)…
    let refresh2 = refresh(&mut client, &refresh1).await.unwrap();
    assert_ne!(refresh2, refresh1);
    let sibling = refresh(&mut client, &refresh1).await.unwrap();
    // …and parallel refreshes of one token all succeed without logging anyone out.
    let mut racers = Vec::new();
    for _ in 0..4 {
        let mut c = client.clone();
        let t = refresh2.clone();
        racers.push(async move { refresh(&mut c, &t).await });
    }
    for r in futures::future::join_all(racers).await {
        r.expect("concurrent refresh within the grace window must not fail");
    }

    // Outside the window, reuse revokes the whole family.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let reused = refresh(&mut client, &refresh1).await.unwrap_err();
    assert_eq!(
        (reused.code(), error_reason(&reused).as_str()),
        (Code::Unauthenticated, "REFRESH_TOKEN_REUSED")
    );
    let family = refresh(&mut client, &sibling).await.unwrap_err();
    assert_eq!(
        error_reason(&family),
        "BAD_REFRESH_TOKEN",
        "every token of a revoked session is dead"
    );

    // Logout with the session's access token stops that token at once; other sessions go on.
    let (access_a, refresh_a) = login(&mut client, &email, PASSWORD).await.unwrap();
    let (access_b, refresh_b) = login(&mut client, &email, PASSWORD).await.unwrap();
    client
        .logout(with_bearer(
            LogoutRequest {
                refresh_token: refresh_a.clone(),
            },
            &access_a,
        ))
        .await
        .unwrap();
    let revoked = client
        .get_me(with_bearer(GetMeRequest {}, &access_a))
        .await
        .unwrap_err();
    assert_eq!(
        (revoked.code(), error_reason(&revoked).as_str()),
        (Code::Unauthenticated, "CREDENTIALS_REVOKED")
    );
    client.get_me(with_bearer(GetMeRequest {}, &access_b)).await.unwrap();

    // RevokeAllSessions ends every session and every token issued so far.
    let n = client
        .revoke_all_sessions(with_bearer(RevokeAllSessionsRequest {}, &access_b))
        .await
        .unwrap()
        .into_inner()
        .revoked_sessions;
    assert!(n >= 1, "the open session must be counted, got {n}");
    assert_eq!(
        error_reason(
            &client
                .get_me(with_bearer(GetMeRequest {}, &access_b))
                .await
                .unwrap_err()
        ),
        "CREDENTIALS_REVOKED"
    );
    assert_eq!(
        error_reason(&refresh(&mut client, &refresh_b).await.unwrap_err()),
        "BAD_REFRESH_TOKEN"
    );
    let (fresh, _) = login(&mut client, &email, PASSWORD).await.unwrap();
    client
        .get_me(with_bearer(GetMeRequest {}, &fresh))
        .await
        .expect("a login after the revocation works");

    // Logout ends a fresh session.
    let (_, refresh_a) = login(&mut client, &email, PASSWORD).await.unwrap();
    client
        .logout(LogoutRequest {
            refresh_token: refresh_a.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        error_reason(&refresh(&mut client, &refresh_a).await.unwrap_err()),
        "BAD_REFRESH_TOKEN"
    );
    assert_eq!(
        client
            .refresh(RefreshRequest {
                refresh_token: String::new()
            })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    app.stop().await;
}

#[tokio::test]
async fn auth_on_sqlite() {
    auth_contract(TestApp::config()).await;
}

#[tokio::test]
async fn auth_on_postgres() {
    if let Some(config) = plinth_tests::postgres_config("auth_on_postgres").unwrap() {
        auth_contract(config).await;
    }
}

#[tokio::test]
async fn revocation_reaches_every_replica_through_redis() {
    let name = "revocation_reaches_every_replica_through_redis";
    let (Some(pg), Some(redis)) = (
        backend_url(Backend::Postgres, name).unwrap(),
        backend_url(Backend::Redis, name).unwrap(),
    ) else {
        return;
    };
    let mut first = TestApp::config_on(Some(&pg));
    first.redis_url = Some(secrecy::SecretString::from(redis));
    let second = TestApp::replica_of(&first, "auth").unwrap();
    let a = TestApp::spawn(first).await.unwrap();
    let b = TestApp::spawn(second).await.unwrap();
    let (mut ca, mut cb) = (a.auth().await.unwrap(), b.auth().await.unwrap());
    let email = email();
    ca.register(RegisterRequest {
        email: email.clone(),
        password: PASSWORD.into(),
        display_name: String::new(),
        phone: String::new(),
    })
    .await
    .unwrap();
    let (access, _) = login(&mut ca, &email, PASSWORD).await.unwrap();
    cb.get_me(with_bearer(GetMeRequest {}, &access))
        .await
        .expect("replica b accepts the token");
    ca.revoke_all_sessions(with_bearer(RevokeAllSessionsRequest {}, &access))
        .await
        .unwrap();
    let refused = cb.get_me(with_bearer(GetMeRequest {}, &access)).await.unwrap_err();
    assert_eq!(
        error_reason(&refused),
        "CREDENTIALS_REVOKED",
        "a revocation on one replica holds on the other at once"
    );
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn a_configured_bootstrap_admin_signs_in_with_the_admin_role() {
    let mut config = TestApp::config();
    config.auth.bootstrap_admin_email = "Root@Example.com".into();
    config.auth.bootstrap_admin_password = Some(secrecy::SecretString::from("a long operator passphrase".to_owned()));
    let app = TestApp::spawn(config).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let (access, _) = login(&mut client, "root@example.com", "a long operator passphrase")
        .await
        .unwrap();
    let me = client
        .get_me(with_bearer(GetMeRequest {}, &access))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(me.roles, vec!["admin"]);
    app.stop().await;
}

async fn sessions_contract(config: Config) {
    let app = TestApp::spawn(config).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let (alice, mallory) = (email(), email());
    for e in [&alice, &mallory] {
        client
            .register(RegisterRequest {
                email: e.clone(),
                password: PASSWORD.into(),
                display_name: String::new(),
                phone: String::new(),
            })
            .await
            .unwrap();
    }
    let mut logins = Vec::new();
    for _ in 0..3 {
        logins.push(login(&mut client, &alice, PASSWORD).await.unwrap());
    }
    let (current, _) = &logins[2];
    let page = client
        .list_sessions(with_bearer(
            ListSessionsRequest {
                page_size: 2,
                page_token: String::new(),
            },
            current,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.sessions.len(), 2);
    assert!(
        page.sessions[0].current,
        "newest first, and the caller's session is marked"
    );
    assert!(!page.next_page_token.is_empty());
    let rest = client
        .list_sessions(with_bearer(
            ListSessionsRequest {
                page_size: 2,
                page_token: page.next_page_token.clone(),
            },
            current,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((rest.sessions.len(), rest.next_page_token.as_str()), (1, ""));
    let oldest = rest.sessions[0].id.clone();

    let bad = client
        .list_sessions(with_bearer(
            ListSessionsRequest {
                page_size: 101,
                page_token: String::new(),
            },
            current,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(
        bad.get_error_details().bad_request().unwrap().field_violations[0].field,
        "page_size"
    );

    // Someone else cannot end Alice's session, nor learn whether it exists.
    let (mallory_token, _) = login(&mut client, &mallory, PASSWORD).await.unwrap();
    let denied = client
        .revoke_session(with_bearer(
            RevokeSessionRequest {
                session_id: oldest.clone(),
            },
            &mallory_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::NotFound);
    client
        .get_me(with_bearer(GetMeRequest {}, &logins[0].0))
        .await
        .expect("a foreign revoke changes nothing");

    // Alice ends her oldest session: its access and refresh tokens stop at once.
    client
        .revoke_session(with_bearer(RevokeSessionRequest { session_id: oldest }, current))
        .await
        .unwrap();
    let (old_access, old_refresh) = &logins[0];
    assert_eq!(
        error_reason(
            &client
                .get_me(with_bearer(GetMeRequest {}, old_access))
                .await
                .unwrap_err()
        ),
        "CREDENTIALS_REVOKED"
    );
    assert_eq!(
        error_reason(&refresh(&mut client, old_refresh).await.unwrap_err()),
        "BAD_REFRESH_TOKEN"
    );
    client
        .get_me(with_bearer(GetMeRequest {}, current))
        .await
        .expect("other sessions go on");
    app.stop().await;
}

#[tokio::test]
async fn sessions_list_and_revoke_on_sqlite() {
    sessions_contract(TestApp::config()).await;
}

#[tokio::test]
async fn sessions_list_and_revoke_on_postgres() {
    if let Some(config) = plinth_tests::postgres_config("sessions_list_and_revoke_on_postgres").unwrap() {
        sessions_contract(config).await;
    }
}

#[tokio::test]
async fn hashes_made_with_older_parameters_are_upgraded_at_login() {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    let config = TestApp::config();
    let db_file = config.data_dir.join("auth.db");
    let app = TestApp::spawn(config).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let email = plinth_tests::register_user(&mut client, "rehash").await.unwrap();

    // What an older deployment (weaker settings) would have stored.
    let weak = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(8 * 1024, 1, 1, None).unwrap(),
    );
    let salt = SaltString::encode_b64(b"sixteen byte slt").unwrap();
    let old_hash = weak
        .hash_password(plinth_tests::PASSWORD.as_bytes(), &salt)
        .unwrap()
        .to_string();
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db_file.display()))
        .await
        .unwrap();
    sqlx::query("UPDATE users SET password_hash = $1 WHERE email = $2")
        .bind(&old_hash)
        .bind(&email)
        .execute(&pool)
        .await
        .unwrap();

    login(&mut client, &email, plinth_tests::PASSWORD).await.unwrap();
    let (stored,): (String,) = sqlx::query_as("SELECT password_hash FROM users WHERE email = $1")
        .bind(&email)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_ne!(stored, old_hash);
    assert!(stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{stored}");
    login(&mut client, &email, plinth_tests::PASSWORD).await.unwrap();
    assert!(login(&mut client, &email, "not the password at all").await.is_err());
    pool.close().await;
    app.stop().await;
}
