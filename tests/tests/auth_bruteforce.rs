//! Brute-force defences of password login: parallel guesses cannot beat the
//! limit, a lockout refuses even the right password until it ends, replicas
//! sharing Redis share the count, and an unknown email costs the same time
//! as a wrong password.

#![expect(clippy::unwrap_used, clippy::panic, reason = "test helpers fail the test loudly")]

use std::time::{Duration, Instant};

use plinth::auth::v1::LoginRequest;
use plinth::auth::v1::auth_service_client::AuthServiceClient;
use plinth_runtime::testing::{Backend, backend_url};
use plinth_tests::{PASSWORD, TestApp, error_reason, register_user, unique};
use secrecy::SecretString;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

async fn attempt(client: &AuthServiceClient<Channel>, email: &str, password: &str) -> Result<(), tonic::Status> {
    let mut client = client.clone();
    client
        .login(LoginRequest {
            email: email.into(),
            password: password.into(),
            phone: String::new(),
        })
        .await
        .map(drop)
}

/// Fires `n` wrong guesses at once (spread over `clients`) and returns how many got a password check.
async fn storm(clients: &[AuthServiceClient<Channel>], email: &str, n: usize) -> usize {
    let guesses = (0..n).map(|i| attempt(&clients[i % clients.len()], email, "wrong guess of a password"));
    let results = futures::future::join_all(guesses).await;
    let mut checked = 0;
    for r in results {
        let e = r.unwrap_err();
        match error_reason(&e).as_str() {
            "BAD_CREDENTIALS" => checked += 1,
            "LOGIN_THROTTLED" => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                assert!(
                    e.get_error_details().retry_info().and_then(|r| r.retry_delay).is_some(),
                    "RetryInfo tells when"
                );
            }
            other => panic!("unexpected {other}: {e:?}"),
        }
    }
    checked
}

#[tokio::test]
async fn parallel_guesses_cannot_beat_the_limit_and_lockout_holds_the_right_password() {
    let app = TestApp::spawn(TestApp::config()).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let email = register_user(&mut client, "guess").await.unwrap();
    let checked = storm(std::slice::from_ref(&client), &email, 20).await;
    assert_eq!(
        checked, 5,
        "exactly the per-account limit of guesses may reach the password check"
    );
    let locked = attempt(&client, &email, PASSWORD).await.unwrap_err();
    assert_eq!(
        error_reason(&locked),
        "LOGIN_THROTTLED",
        "even the right password waits for the lockout"
    );
    // Another account is unaffected, and successful logins never exhaust the
    // address's allowance (an office behind one NAT address).
    let other = register_user(&mut client, "guess").await.unwrap();
    for _ in 0..55 {
        attempt(&client, &other, PASSWORD).await.unwrap();
    }
    app.stop().await;
}

#[tokio::test]
async fn replicas_sharing_redis_share_the_limit() {
    let name = "replicas_sharing_redis_share_the_limit";
    let (Some(pg), Some(redis)) = (
        backend_url(Backend::Postgres, name).unwrap(),
        backend_url(Backend::Redis, name).unwrap(),
    ) else {
        return;
    };
    let mut first = TestApp::config_on(Some(&pg));
    first.redis_url = Some(SecretString::from(redis));
    let second = TestApp::replica_of(&first, "auth").unwrap();
    let a = TestApp::spawn(first).await.unwrap();
    let b = TestApp::spawn(second).await.unwrap();
    let mut ca = a.auth().await.unwrap();
    let cb = b.auth().await.unwrap();
    let email = register_user(&mut ca, "guess").await.unwrap();
    let checked = storm(&[ca.clone(), cb.clone()], &email, 16).await;
    assert_eq!(checked, 5, "guesses spread over two replicas still meet one limit");
    assert_eq!(
        error_reason(&attempt(&cb, &email, PASSWORD).await.unwrap_err()),
        "LOGIN_THROTTLED"
    );
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn unknown_email_and_wrong_password_take_the_same_time() {
    let app = TestApp::spawn(TestApp::config()).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for _ in 0..4 {
        // A fresh account each round keeps the throttle out of the measurement.
        let email = register_user(&mut client, "guess").await.unwrap();
        let started = Instant::now();
        assert_eq!(
            error_reason(&attempt(&client, &email, "not the password").await.unwrap_err()),
            "BAD_CREDENTIALS"
        );
        known.push(started.elapsed());
        let started = Instant::now();
        let missing = format!("missing-{}@example.com", unique());
        assert_eq!(
            error_reason(&attempt(&client, &missing, "not the password").await.unwrap_err()),
            "BAD_CREDENTIALS"
        );
        unknown.push(started.elapsed());
    }
    known.sort();
    unknown.sort();
    let (k, u) = (known[known.len() / 2], unknown[unknown.len() / 2]);
    let ratio = u.as_secs_f64() / k.as_secs_f64();
    assert!(
        (0.5..2.0).contains(&ratio),
        "median unknown-user login {u:?} vs wrong-password {k:?}: the difference reveals which emails exist"
    );
    assert!(
        u > Duration::from_millis(5),
        "an unknown user must still cost a password hash, took {u:?}"
    );
    app.stop().await;
}
