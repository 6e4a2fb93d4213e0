//! Signing up and in with a phone number instead of an email, on SQLite and
//! PostgreSQL: numbers are normalised to E.164 and unique, either identifier
//! signs in, a bad number names the field and creates nothing, phone logins
//! are throttled per account like email logins, and a reset requested by
//! phone travels to the phone.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

use std::time::Duration;

use futures::StreamExt;
use plinth::auth::v1::{
    LoginRequest, PasswordResetRequestedEvent, RegisterRequest, RequestPasswordResetRequest, UpdateUserRequest, User,
};
use plinth_runtime::config::Config;
use plinth_runtime::events::{ConsumerSpec, EventBus, NatsBus};
use plinth_runtime::testing::{Backend, backend_url};
use plinth_tests::{
    ADMIN_EMAIL, ADMIN_PASSWORD, PASSWORD, TestApp, access_token, error_reason, postgres_config, unique,
    violated_field, with_admin, with_bearer,
};
use prost::Message;
use secrecy::SecretString;
use tonic::Code;

/// A fresh, valid UK-style number with the given spacing style.
fn number() -> (String, String) {
    let tail: u64 = unique()
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
        % 100_000_000;
    (
        format!("+44 20 {:04} {:04}", tail / 10_000, tail % 10_000),
        format!("+4420{tail:08}"),
    )
}

fn login(email: &str, phone: &str, password: &str) -> LoginRequest {
    LoginRequest {
        email: email.into(),
        phone: phone.into(),
        password: password.into(),
    }
}

async fn phone_contract(config: Config) {
    let app = TestApp::spawn(config).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let (spaced, e164) = number();

    let user = client
        .register(RegisterRequest {
            email: String::new(),
            password: PASSWORD.into(),
            display_name: "Phone user".into(),
            phone: spaced.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!((user.phone.as_str(), user.email.as_str()), (e164.as_str(), ""));

    // The same number written differently is the same number.
    let dashed = format!("{}-{}", &e164[..6], &e164[6..]);
    let err = client
        .register(RegisterRequest {
            email: String::new(),
            password: PASSWORD.into(),
            display_name: String::new(),
            phone: dashed.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), error_reason(&err)),
        (Code::AlreadyExists, "PHONE_TAKEN".to_owned())
    );

    // Either spelling signs in; a wrong password does not.
    let tokens = client.login(login("", &dashed, PASSWORD)).await.unwrap().into_inner();
    assert_eq!(tokens.user.unwrap().id, user.id);
    let err = client.login(login("", &e164, "wrong password here")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Bad input names the field and creates nothing.
    for (email, phone, field) in [
        ("", "020 7946 0958", "phone"),
        ("", "", "email"),
        ("not-an-email", "+442079460958", "email"),
    ] {
        let err = client
            .register(RegisterRequest {
                email: email.into(),
                password: PASSWORD.into(),
                display_name: String::new(),
                phone: phone.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), violated_field(&err)),
            (Code::InvalidArgument, field.to_owned()),
            "{email:?} {phone:?}"
        );
    }
    let err = client.login(login("", "+442079460958", PASSWORD)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "nothing was created");
    let err = client
        .login(login("someone@example.com", &e164, PASSWORD))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), violated_field(&err)),
        (Code::InvalidArgument, "phone".to_owned())
    );

    // Email and phone together: either one signs in.
    let (spaced2, e164_2) = number();
    let email = format!("both-{}@example.com", unique());
    client
        .register(RegisterRequest {
            email: email.clone(),
            password: PASSWORD.into(),
            display_name: String::new(),
            phone: spaced2,
        })
        .await
        .unwrap();
    client.login(login(&email, "", PASSWORD)).await.unwrap();
    client.login(login("", &e164_2, PASSWORD)).await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn phone_identities_on_sqlite() {
    phone_contract(TestApp::config()).await;
}

#[tokio::test]
async fn phone_identities_on_postgres() {
    if let Some(config) = postgres_config("phone_identities_on_postgres").unwrap() {
        phone_contract(config).await;
    }
}

#[tokio::test]
async fn phone_logins_are_throttled_per_account() {
    let app = TestApp::spawn(TestApp::config()).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let (spaced, e164) = number();
    client
        .register(RegisterRequest {
            email: String::new(),
            password: PASSWORD.into(),
            display_name: String::new(),
            phone: spaced,
        })
        .await
        .unwrap();
    for _ in 0..5 {
        let err = client.login(login("", &e164, "wrong password here")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let err = client.login(login("", &e164, PASSWORD)).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::ResourceExhausted,
        "locked out even with the right password"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_reset_requested_by_phone_goes_to_the_phone() {
    let Some(nats) = backend_url(Backend::Nats, "a_reset_requested_by_phone_goes_to_the_phone").unwrap() else {
        return;
    };
    let mut config = TestApp::config();
    config.nats_url = Some(SecretString::from(nats.clone()));
    let stream = config.events.stream.clone();
    let app = TestApp::spawn(config).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let (spaced, e164) = number();
    let email = format!("reset-phone-{}@example.com", unique());
    client
        .register(RegisterRequest {
            email: email.clone(),
            password: PASSWORD.into(),
            display_name: String::new(),
            phone: spaced,
        })
        .await
        .unwrap();
    let bus = NatsBus::connect(&SecretString::from(nats), &stream, Duration::from_secs(120))
        .await
        .unwrap();
    let mut deliveries = bus
        .subscribe(&ConsumerSpec::new(
            format!("reset-phone-test-{}", unique()),
            "plinth.auth.password_reset_requested",
        ))
        .await
        .unwrap();
    client
        .request_password_reset(RequestPasswordResetRequest {
            email: String::new(),
            phone: e164.clone(),
        })
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let delivery = deliveries.next().await.unwrap().unwrap();
            let event = PasswordResetRequestedEvent::decode(delivery.event.payload.clone()).unwrap();
            delivery.ack().await.unwrap();
            if event.phone == e164 {
                return event;
            }
        }
    })
    .await
    .unwrap();
    assert!(
        event.email.is_empty(),
        "the token goes to the phone that asked, not the email"
    );
    assert!(event.token.starts_with("plp_"));
    app.stop().await;
}

/// An administrator changes how a user signs in: add an email, move to a
/// number someone else holds (refused), drop the phone, never drop both.
#[tokio::test]
async fn administrators_change_email_and_phone_on_sqlite() {
    change_contract(TestApp::config()).await;
}

#[tokio::test]
async fn administrators_change_email_and_phone_on_postgres() {
    if let Some(config) = postgres_config("administrators_change_email_and_phone_on_postgres").unwrap() {
        change_contract(config).await;
    }
}

async fn change_contract(config: Config) {
    let app = TestApp::spawn(with_admin(config)).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let admin = access_token(&mut client, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    let (spaced, e164) = number();
    let (other_spaced, other) = number();
    let mut ids = Vec::new();
    for phone in [spaced, other_spaced] {
        let user = client
            .register(RegisterRequest {
                email: String::new(),
                password: PASSWORD.into(),
                display_name: String::new(),
                phone,
            })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        ids.push(user.id);
    }
    let update = |email: Option<&str>, phone: Option<&str>| {
        let mut paths = Vec::new();
        let mut user = User {
            id: ids[0].clone(),
            ..User::default()
        };
        if let Some(e) = email {
            user.email = e.into();
            paths.push("email".to_owned());
        }
        if let Some(p) = phone {
            user.phone = p.into();
            paths.push("phone".to_owned());
        }
        with_bearer(
            UpdateUserRequest {
                user: Some(user),
                update_mask: Some(prost_types::FieldMask { paths }),
            },
            &admin,
        )
    };
    let email = format!("Moved-{}@Example.com", unique());
    let user = client
        .update_user(update(Some(&email), None))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!((user.email, user.phone.clone()), (email.to_lowercase(), e164.clone()));
    client.login(login(&email, "", PASSWORD)).await.unwrap();

    let err = client.update_user(update(None, Some(&other))).await.unwrap_err();
    assert_eq!(
        (err.code(), error_reason(&err)),
        (Code::AlreadyExists, "PHONE_TAKEN".to_owned())
    );
    let err = client.update_user(update(None, Some("12345"))).await.unwrap_err();
    assert_eq!(
        (err.code(), violated_field(&err)),
        (Code::InvalidArgument, "user.phone".to_owned())
    );
    let err = client.update_user(update(Some(""), Some(""))).await.unwrap_err();
    assert_eq!(
        (err.code(), violated_field(&err)),
        (Code::InvalidArgument, "user.email".to_owned())
    );
    client.login(login("", &e164, PASSWORD)).await.unwrap();

    // Dropping the phone leaves the email; the old number no longer signs in.
    client.update_user(update(None, Some(""))).await.unwrap();
    assert_eq!(
        client.login(login("", &e164, PASSWORD)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    client.login(login(&email, "", PASSWORD)).await.unwrap();
    app.stop().await;
}
