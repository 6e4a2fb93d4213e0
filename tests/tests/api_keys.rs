//! API keys end to end, on SQLite and on PostgreSQL: the secret is shown
//! once and works as a bearer credential, a tampered or revoked key does not,
//! bad input names its field, `Introspect` answers with RFC 7662 semantics,
//! and a process that does not run auth validates keys over gRPC and sees a
//! revocation at once through Redis.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

use std::sync::Arc;
use std::time::Duration;

use plinth::auth::v1::auth_service_client::AuthServiceClient;
use plinth::auth::v1::{CreateApiKeyRequest, GetMeRequest, IntrospectRequest, ListApiKeysRequest, RevokeApiKeyRequest};
use plinth_runtime::auth::{AuthError, Authenticator, GrpcJwksSource, Revocations};
use plinth_runtime::config::Config;
use plinth_runtime::state::RedisState;
use plinth_runtime::testing::{Backend, backend_url};
use plinth_tests::{PASSWORD, TestApp, access_token, postgres_config, register_user, violated_field, with_bearer};
use tonic::Code;
use tonic::transport::Channel;

async fn user_token(client: &mut AuthServiceClient<Channel>) -> String {
    let email = register_user(client, "keys").await.unwrap();
    access_token(client, &email, PASSWORD).await.unwrap()
}

async fn api_key_contract(config: Config) {
    let app = TestApp::spawn(config).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let token = user_token(&mut client).await;

    let created = client
        .create_api_key(with_bearer(
            CreateApiKeyRequest {
                display_name: "deploy script".into(),
                scopes: vec![],
                expire_time: None,
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let secret = created.secret.clone();
    let key = created.api_key.unwrap();
    assert!(secret.starts_with("plk_"), "{secret}");
    assert!(secret.starts_with(&key.prefix), "the prefix is the start of the secret");
    assert!(
        key.prefix.len() < secret.len() / 2,
        "the prefix does not reveal the secret"
    );

    // The key is a bearer credential.
    let me = client
        .get_me(with_bearer(GetMeRequest {}, &secret))
        .await
        .unwrap()
        .into_inner();
    let me_by_token = client
        .get_me(with_bearer(GetMeRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.user.unwrap().id, me_by_token.user.unwrap().id);

    // Listed without the secret, with its last use recorded.
    let list = client
        .list_api_keys(with_bearer(ListApiKeysRequest { show_revoked: false }, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.api_keys.len(), 1);
    assert_eq!(list.api_keys[0].display_name, "deploy script");
    assert!(list.api_keys[0].last_use_time.is_some());
    assert!(!format!("{list:?}").contains(&secret[key.prefix.len() + 1..]));

    // Tampering: one character changed, or a valid lookup id with another secret.
    let mut tampered = secret.clone().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let forged = format!("{}_{}", key.prefix, "A".repeat(43));
    for bad in [tampered.as_str(), forged.as_str(), "plk_nothing"] {
        let err = client.get_me(with_bearer(GetMeRequest {}, bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{bad}");
    }

    // Introspection, RFC 7662: active with owner and type, or only `active: false`.
    let i = client
        .introspect(IntrospectRequest { token: secret.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(i.active);
    assert_eq!(
        (i.token_type.as_str(), i.client_id.as_str()),
        ("api_key", key.id.as_str())
    );
    assert_eq!(i.roles, vec!["viewer".to_owned()]);
    let i = client
        .introspect(IntrospectRequest { token: token.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(i.active);
    assert_eq!(i.token_type, "access_token");
    let i = client
        .introspect(IntrospectRequest {
            token: tampered.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!i.active && i.sub.is_empty() && i.roles.is_empty());

    // Bad input names the field and creates nothing.
    for (req, want) in [
        (
            CreateApiKeyRequest {
                display_name: " ".into(),
                scopes: vec![],
                expire_time: None,
            },
            "display_name",
        ),
        (
            CreateApiKeyRequest {
                display_name: "x".into(),
                scopes: vec!["Not A Scope".into()],
                expire_time: None,
            },
            "scopes[0]",
        ),
        (
            CreateApiKeyRequest {
                display_name: "x".into(),
                scopes: vec!["auth.users.write".into()],
                expire_time: None,
            },
            "scopes[0]",
        ),
        (
            CreateApiKeyRequest {
                display_name: "x".into(),
                scopes: vec![],
                expire_time: Some(prost_types::Timestamp {
                    seconds: 1_000,
                    nanos: 0,
                }),
            },
            "expire_time",
        ),
    ] {
        let err = client.create_api_key(with_bearer(req, &token)).await.unwrap_err();
        assert_eq!(
            (err.code(), violated_field(&err)),
            (Code::InvalidArgument, want.to_owned())
        );
    }
    let err = client
        .create_api_key(with_bearer(
            CreateApiKeyRequest {
                display_name: "from a key".into(),
                scopes: vec![],
                expire_time: None,
            },
            &secret,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "an API key cannot mint keys");
    let list = client
        .list_api_keys(with_bearer(ListApiKeysRequest { show_revoked: true }, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.api_keys.len(), 1, "refused requests created nothing");

    // Revocation is immediate, and only the owner can revoke.
    let other = user_token(&mut client).await;
    let err = client
        .revoke_api_key(with_bearer(RevokeApiKeyRequest { key_id: key.id.clone() }, &other))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    client
        .revoke_api_key(with_bearer(RevokeApiKeyRequest { key_id: key.id.clone() }, &token))
        .await
        .unwrap();
    let err = client.get_me(with_bearer(GetMeRequest {}, &secret)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let i = client
        .introspect(IntrospectRequest { token: secret.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(!i.active);
    let listed = client
        .list_api_keys(with_bearer(ListApiKeysRequest { show_revoked: false }, &token))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.api_keys.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn api_keys_on_sqlite() {
    api_key_contract(TestApp::config()).await;
}

#[tokio::test]
async fn api_keys_on_postgres() {
    if let Some(config) = postgres_config("api_keys_on_postgres").unwrap() {
        api_key_contract(config).await;
    }
}

#[tokio::test]
async fn a_remote_service_validates_keys_over_grpc_and_sees_revocation_at_once() {
    let Some(redis) = backend_url(Backend::Redis, "a_remote_service_validates_keys_over_grpc").unwrap() else {
        return;
    };
    let mut config = TestApp::config();
    config.redis_url = Some(secrecy::SecretString::from(redis.clone()));
    let prefix = config.redis_key_prefix.clone();
    let app = TestApp::spawn(config).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let token = user_token(&mut client).await;
    let secret = client
        .create_api_key(with_bearer(
            CreateApiKeyRequest {
                display_name: "worker".into(),
                scopes: vec!["queue.*".into()],
                expire_time: None,
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;

    // What a `--only queue` process builds: keys from auth over gRPC,
    // revocations from the shared Redis.
    let remote = Arc::new(GrpcJwksSource::new(&format!("http://{}", app.grpc)).unwrap());
    let state = Arc::new(
        RedisState::connect(&secrecy::SecretString::from(redis), &prefix, Duration::from_secs(5))
            .await
            .unwrap(),
    );
    let authenticator = Authenticator::new(remote.clone(), "plinth", "plinth", Duration::from_secs(30))
        .with_revocations(Revocations::new(state))
        .with_api_keys(remote);
    let grant = authenticator.verify_api_key(&secret).await.unwrap();
    assert_eq!(grant.scopes, vec!["queue.*".to_owned()]);
    assert_eq!(grant.roles, vec!["viewer".to_owned()]);

    let key_id = grant.key_id.clone();
    client
        .revoke_api_key(with_bearer(RevokeApiKeyRequest { key_id }, &token))
        .await
        .unwrap();
    // Within the validation cache window, yet refused: the denylist is shared.
    let err = authenticator.verify_api_key(&secret).await.unwrap_err();
    assert!(matches!(err, AuthError::Revoked), "{err:?}");
    app.stop().await;
}
