//! Accounts over their lifetime, on SQLite and on PostgreSQL: an
//! administrator creates, lists, changes, disables and deletes users (and a
//! disabled user's tokens and API keys stop at once); users change their
//! password; a password reset token travels in an event through NATS and
//! works exactly once; signing keys rotate without breaking issued tokens.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

use std::time::Duration;

use futures::StreamExt;
use plinth::auth::v1::authorization_service_client::AuthorizationServiceClient;
use plinth::auth::v1::{
    ChangePasswordRequest, CreateApiKeyRequest, CreateUserRequest, DeleteRoleBindingRequest, DeleteUserRequest,
    GetMeRequest, GetUserRequest, ListUsersRequest, PasswordResetRequestedEvent, RequestPasswordResetRequest,
    ResetPasswordRequest, RoleBinding, RotateSigningKeyRequest, UpdateUserRequest, User, UserStatus,
};
use plinth_runtime::config::Config;
use plinth_runtime::events::{ConsumerSpec, EventBus, NatsBus};
use plinth_runtime::testing::{Backend, backend_url};
use plinth_tests::{
    ADMIN_EMAIL, ADMIN_PASSWORD, PASSWORD, TestApp, access_token, error_reason, postgres_config, published_kids,
    register_user, unique, violated_field, whoami, with_admin, with_bearer,
};
use prost::Message;
use secrecy::SecretString;
use tonic::Code;

async fn administration_contract(config: Config) {
    let app = TestApp::spawn(with_admin(config)).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let admin = access_token(&mut client, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();

    // Create with roles; a bad role names the field and creates nothing.
    let email = format!("dev-{}@example.com", unique());
    let err = client
        .create_user(with_bearer(
            CreateUserRequest {
                email: email.clone(),
                password: PASSWORD.into(),
                display_name: "Dev".into(),
                roles: vec!["developer".into(), "wizard".into()],
                phone: String::new(),
                tenant: String::new(),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), violated_field(&err)),
        (Code::InvalidArgument, "roles[1]".to_owned())
    );
    let dev = client
        .create_user(with_bearer(
            CreateUserRequest {
                email: email.clone(),
                password: PASSWORD.into(),
                display_name: "Dev".into(),
                roles: vec!["developer".into()],
                phone: String::new(),
                tenant: String::new(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(dev.roles, vec!["developer".to_owned()]);

    // Only administrators manage users.
    let dev_token = access_token(&mut client, &email, PASSWORD).await.unwrap();
    let err = client
        .list_users(with_bearer(ListUsersRequest::default(), &dev_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Pages.
    let page = client
        .list_users(with_bearer(
            ListUsersRequest {
                page_size: 1,
                page_token: String::new(),
                tenant: String::new(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.users.len(), 1);
    assert!(!page.next_page_token.is_empty());
    let rest = client
        .list_users(with_bearer(
            ListUsersRequest {
                page_size: 100,
                page_token: page.next_page_token,
                tenant: String::new(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(rest.users.iter().any(|u| u.id == dev.id));
    assert!(rest.users.iter().all(|u| u.id != page.users[0].id));

    // Disabling ends the user's tokens and API keys at once, and blocks login.
    let key = client
        .create_api_key(with_bearer(
            CreateApiKeyRequest {
                display_name: "laptop".into(),
                scopes: vec![],
                expire_time: None,
            },
            &dev_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;
    assert!(client.get_me(with_bearer(GetMeRequest {}, &key)).await.is_ok());
    let status_change = |status: UserStatus| UpdateUserRequest {
        user: Some(User {
            id: dev.id.clone(),
            status: status as i32,
            ..User::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["status".into()],
        }),
    };
    let updated = client
        .update_user(with_bearer(status_change(UserStatus::Disabled), &admin))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(updated.status, UserStatus::Disabled as i32);
    for credential in [&dev_token, &key] {
        let err = client
            .get_me(with_bearer(GetMeRequest {}, credential))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    assert_eq!(
        access_token(&mut client, &email, PASSWORD).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    client
        .update_user(with_bearer(status_change(UserStatus::Active), &admin))
        .await
        .unwrap();
    let again = access_token(&mut client, &email, PASSWORD).await.unwrap();
    assert!(client.get_me(with_bearer(GetMeRequest {}, &again)).await.is_ok());
    assert!(
        client.get_me(with_bearer(GetMeRequest {}, &key)).await.is_err(),
        "a key revoked by disabling stays revoked"
    );

    // An administrator cannot lock themselves out.
    let me = client
        .get_me(with_bearer(GetMeRequest {}, &admin))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let err = client
        .update_user(with_bearer(
            UpdateUserRequest {
                user: Some(User {
                    id: me.id.clone(),
                    status: UserStatus::Disabled as i32,
                    ..User::default()
                }),
                update_mask: None,
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), violated_field(&err)),
        (Code::InvalidArgument, "user.status".to_owned())
    );

    // Deleting hides the user and ends everything.
    client
        .delete_user(with_bearer(
            DeleteUserRequest {
                user_id: dev.id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let err = client
        .get_user(with_bearer(
            GetUserRequest {
                user_id: dev.id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(access_token(&mut client, &email, PASSWORD).await.is_err());
    app.stop().await;
}

#[tokio::test]
async fn administration_on_sqlite() {
    administration_contract(TestApp::config()).await;
}

#[tokio::test]
async fn administration_on_postgres() {
    if let Some(config) = postgres_config("administration_on_postgres").unwrap() {
        administration_contract(config).await;
    }
}

#[tokio::test]
async fn changing_a_password_checks_the_old_one_and_ends_every_session() {
    let app = TestApp::spawn(TestApp::config()).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let email = register_user(&mut client, "change").await.unwrap();
    let token = access_token(&mut client, &email, PASSWORD).await.unwrap();
    let change = |current: &str, new: &str| ChangePasswordRequest {
        current_password: current.into(),
        new_password: new.into(),
    };
    let err = client
        .change_password(with_bearer(change("not it at all", "a brand new passphrase"), &token))
        .await
        .unwrap_err();
    assert_eq!(violated_field(&err), "current_password");
    let err = client
        .change_password(with_bearer(change(PASSWORD, "short"), &token))
        .await
        .unwrap_err();
    assert_eq!(violated_field(&err), "new_password");
    client
        .change_password(with_bearer(change(PASSWORD, "a brand new passphrase"), &token))
        .await
        .unwrap();
    assert_eq!(
        client
            .get_me(with_bearer(GetMeRequest {}, &token))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert!(access_token(&mut client, &email, PASSWORD).await.is_err());
    let token = access_token(&mut client, &email, "a brand new passphrase")
        .await
        .unwrap();

    // Guessing the current password with a token is throttled like logins.
    let mut codes = Vec::new();
    for _ in 0..6 {
        let err = client
            .change_password(with_bearer(change("a wrong guess here", "whatever passphrase"), &token))
            .await
            .unwrap_err();
        codes.push(err.code());
    }
    assert_eq!(codes[..5], [Code::InvalidArgument; 5]);
    assert_eq!(codes[5], Code::ResourceExhausted, "{codes:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_reset_token_arrives_as_an_event_and_works_once() {
    let Some(nats) = backend_url(Backend::Nats, "a_reset_token_arrives_as_an_event_and_works_once").unwrap() else {
        return;
    };
    let mut config = TestApp::config();
    config.nats_url = Some(SecretString::from(nats.clone()));
    let stream = config.events.stream.clone();
    let app = TestApp::spawn(config).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let email = register_user(&mut client, "reset").await.unwrap();

    let bus = NatsBus::connect(&SecretString::from(nats), &stream, Duration::from_secs(120))
        .await
        .unwrap();
    let mut deliveries = bus
        .subscribe(&ConsumerSpec::new(
            format!("reset-test-{}", unique()),
            "plinth.auth.password_reset_requested",
        ))
        .await
        .unwrap();

    // An unknown email gets the same answer and emits nothing we could see.
    client
        .request_password_reset(RequestPasswordResetRequest {
            email: format!("nobody-{}@example.com", unique()),
            phone: String::new(),
        })
        .await
        .unwrap();
    client
        .request_password_reset(RequestPasswordResetRequest {
            email: email.clone(),
            phone: String::new(),
        })
        .await
        .unwrap();
    let token = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let delivery = deliveries.next().await.unwrap().unwrap();
            let event = PasswordResetRequestedEvent::decode(delivery.event.payload.clone()).unwrap();
            delivery.ack().await.unwrap();
            if event.email == email {
                return event.token;
            }
        }
    })
    .await
    .unwrap();
    assert!(token.starts_with("plp_"));

    let reset = |token: &str, password: &str| ResetPasswordRequest {
        token: token.into(),
        new_password: password.into(),
    };
    let err = client
        .reset_password(reset(&format!("{token}x"), "another fine passphrase"))
        .await
        .unwrap_err();
    assert_eq!(violated_field(&err), "token");
    let err = client.reset_password(reset(&token, "short")).await.unwrap_err();
    assert_eq!(
        violated_field(&err),
        "new_password",
        "a weak password does not spend the token"
    );
    client
        .reset_password(reset(&token, "another fine passphrase"))
        .await
        .unwrap();
    let err = client
        .reset_password(reset(&token, "yet another passphrase"))
        .await
        .unwrap_err();
    assert_eq!(violated_field(&err), "token", "a reset token works once");

    // At most three reset mails an hour per account; the answer stays the same.
    for _ in 0..5 {
        client
            .request_password_reset(RequestPasswordResetRequest {
                email: email.clone(),
                phone: String::new(),
            })
            .await
            .unwrap();
    }
    let mut sent = 0;
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout(Duration::from_secs(2), deliveries.next()).await {
        let event = PasswordResetRequestedEvent::decode(delivery.event.payload.clone()).unwrap();
        delivery.ack().await.unwrap();
        sent += usize::from(event.email == email);
    }
    assert_eq!(sent, 2, "the first request plus two more fill the hour's three");
    assert!(
        access_token(&mut client, &email, "another fine passphrase")
            .await
            .is_ok()
    );
    app.stop().await;
}

#[tokio::test]
async fn signing_keys_rotate_on_demand_without_breaking_issued_tokens() {
    // The lead must outlast a password check and a sign-in on a busy CI
    // machine (one second did not, once); the test waits it out below.
    const LEAD: Duration = Duration::from_secs(3);
    let mut config = with_admin(TestApp::config());
    config.auth.key_publish_lead_secs = LEAD.as_secs();
    config.auth.jwks_refresh_secs = 1;
    let app = TestApp::spawn(config).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let admin = access_token(&mut client, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    let old_kid = plinth_runtime::auth::jwt::peek_kid(&admin).unwrap();

    let email = register_user(&mut client, "rotate").await.unwrap();
    let viewer = access_token(&mut client, &email, PASSWORD).await.unwrap();
    let err = client
        .rotate_signing_key(with_bearer(RotateSigningKeyRequest {}, &viewer))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let rotated = client
        .rotate_signing_key(with_bearer(RotateSigningKeyRequest {}, &admin))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.kid, old_kid);
    let kids = published_kids(&mut client).await.unwrap();
    assert!(kids.contains(&old_kid) && kids.contains(&rotated.kid), "{kids:?}");
    let during_lead = access_token(&mut client, &email, PASSWORD).await.unwrap();
    assert_eq!(
        plinth_runtime::auth::jwt::peek_kid(&during_lead).unwrap(),
        old_kid,
        "a new key is published before it signs"
    );

    tokio::time::sleep(LEAD + Duration::from_millis(100)).await;
    let after = access_token(&mut client, &email, PASSWORD).await.unwrap();
    assert_eq!(plinth_runtime::auth::jwt::peek_kid(&after).unwrap(), rotated.kid);
    for token in [&viewer, &during_lead, &after] {
        assert!(
            client.get_me(with_bearer(GetMeRequest {}, token)).await.is_ok(),
            "tokens of the old key keep working until they expire"
        );
    }
    app.stop().await;
}

/// Nobody locks the deployment out: the last active administrator cannot
/// lose the admin role (by UpdateUser or by unbinding it); with a second
/// administrator in place, they can.
#[tokio::test]
async fn the_last_administrator_keeps_the_role() {
    let app = TestApp::spawn(with_admin(TestApp::config())).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let mut authz = AuthorizationServiceClient::new(app.channel().await.unwrap());
    let admin = access_token(&mut client, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    let admin_id = whoami(&mut client, &admin).await.unwrap();
    let demote = |token: &str| {
        with_bearer(
            UpdateUserRequest {
                user: Some(User {
                    id: admin_id.clone(),
                    roles: vec!["viewer".into()],
                    ..User::default()
                }),
                update_mask: None,
            },
            token,
        )
    };
    let err = client.update_user(demote(&admin)).await.unwrap_err();
    assert_eq!(
        (err.code(), error_reason(&err)),
        (Code::FailedPrecondition, "LAST_ADMIN".to_owned())
    );
    let err = authz
        .delete_role_binding(with_bearer(
            DeleteRoleBindingRequest {
                binding: Some(RoleBinding {
                    subject: admin_id.clone(),
                    role: "admin".into(),
                    scope: String::new(),
                    create_time: None,
                }),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(error_reason(&err), "LAST_ADMIN");
    client.get_me(with_bearer(GetMeRequest {}, &admin)).await.unwrap();

    let second = format!("second-admin-{}@example.com", unique());
    client
        .create_user(with_bearer(
            CreateUserRequest {
                email: second.clone(),
                password: PASSWORD.into(),
                display_name: String::new(),
                roles: vec!["admin".into()],
                phone: String::new(),
                tenant: String::new(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let user = client
        .update_user(demote(&admin))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.roles, ["viewer"]);
    app.stop().await;
}
