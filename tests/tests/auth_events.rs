//! What the auth service tells the rest of the mesh (and audit) through its
//! outbox, seen on NATS JetStream: sign-in, refresh (with whether it came
//! within the concurrent-tab grace window), reuse that revokes the session,
//! role changes.

use std::time::Duration;

use futures::StreamExt;
use plinth::auth::v1::authorization_service_client::AuthorizationServiceClient;
use plinth::auth::v1::{
    CreateRoleBindingRequest, LoginSucceededEvent, RefreshRequest, RoleBinding, RoleBindingChangedEvent,
    SessionRevokedEvent, TokenRefreshedEvent,
};
use plinth_runtime::events::{ConsumerSpec, EventBus, NatsBus};
use plinth_runtime::testing::{Backend, backend_url};
use plinth_tests::{
    ADMIN_EMAIL, ADMIN_PASSWORD, TestApp, access_token, register_user, sign_in, unique, with_admin, with_bearer,
};
use prost::Message;
use secrecy::SecretString;

#[tokio::test]
async fn sessions_and_roles_are_announced_through_the_outbox() {
    let Some(nats) = backend_url(Backend::Nats, "sessions_and_roles_are_announced_through_the_outbox").unwrap() else {
        return;
    };
    let mut config = with_admin(TestApp::config());
    config.nats_url = Some(SecretString::from(nats.clone()));
    let stream = config.events.stream.clone();
    let app = TestApp::spawn(config).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let bus = NatsBus::connect(&SecretString::from(nats), &stream, Duration::from_secs(120))
        .await
        .unwrap();
    let mut deliveries = bus
        .subscribe(&ConsumerSpec::new(format!("auth-events-{}", unique()), "plinth.auth.>"))
        .await
        .unwrap();

    let email = register_user(&mut client, "events").await.unwrap();
    let login = sign_in(&mut client, &email).await.unwrap();
    let user_id = login.user.unwrap().id;
    let first = login.tokens.unwrap().refresh_token;
    let refresh = |token: &str| RefreshRequest {
        refresh_token: token.into(),
    };
    client.refresh(refresh(&first)).await.unwrap();
    client.refresh(refresh(&first)).await.unwrap(); // another tab, within the grace window
    let admin = access_token(&mut client, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    AuthorizationServiceClient::new(app.channel().await.unwrap())
        .create_role_binding(with_bearer(
            CreateRoleBindingRequest {
                binding: Some(RoleBinding {
                    subject: user_id.clone(),
                    role: "developer".into(),
                    scope: "tenant/acme".into(),
                    create_time: None,
                }),
            },
            &admin,
        ))
        .await
        .unwrap();

    let (mut logins, mut refreshes, mut bindings) = (0, Vec::new(), 0);
    tokio::time::timeout(Duration::from_secs(20), async {
        while logins < 1 || refreshes.len() < 2 || bindings < 1 {
            let delivery = deliveries.next().await.unwrap().unwrap();
            let payload = delivery.event.payload.clone();
            match delivery.event.subject.as_str() {
                "plinth.auth.login_succeeded" => {
                    logins += usize::from(LoginSucceededEvent::decode(payload).unwrap().user_id == user_id);
                }
                "plinth.auth.token_refreshed" => {
                    let e = TokenRefreshedEvent::decode(payload).unwrap();
                    if e.user_id == user_id {
                        refreshes.push(e.within_grace);
                    }
                }
                "plinth.auth.role_binding_changed" => {
                    let e = RoleBindingChangedEvent::decode(payload).unwrap();
                    bindings += usize::from(e.subject == user_id && e.scope == "tenant/acme" && e.action == "bound");
                }
                "plinth.auth.session_revoked" => {
                    let e = SessionRevokedEvent::decode(payload).unwrap();
                    assert_ne!(e.user_id, user_id, "a refresh within grace revoked the session");
                }
                _ => {}
            }
            delivery.ack().await.unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(refreshes, [false, true], "the second presentation came within grace");
    app.stop().await;
}
