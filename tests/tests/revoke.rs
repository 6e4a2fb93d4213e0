//! RFC 7009 revocation: whoever holds a token can revoke it, whatever kind
//! it is; it stops at once and nothing else of the user's does; a token that
//! is unknown, expired or malformed gets the same answer, over gRPC and HTTP.

use plinth::auth::v1::{
    CreateApiKeyRequest, GetMeRequest, IntrospectRequest, RefreshRequest, RevokeRequest, TokenPair,
};
use plinth_tests::{TestApp, register_user, sign_in, violated_field, with_bearer};
use tonic::Code;

#[tokio::test]
async fn revoke_stops_exactly_the_token_presented() {
    let app = TestApp::spawn(TestApp::config()).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let email = register_user(&mut client, "revoke").await.unwrap();
    let a: TokenPair = sign_in(&mut client, &email).await.unwrap().tokens.unwrap();
    let b: TokenPair = sign_in(&mut client, &email).await.unwrap().tokens.unwrap();
    let revoke = |token: &str| RevokeRequest { token: token.into() };

    // An access token: it stops on every call; the other session's does not.
    client.revoke(revoke(&a.access_token)).await.unwrap();
    let err = client
        .get_me(with_bearer(GetMeRequest {}, &a.access_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    client
        .get_me(with_bearer(GetMeRequest {}, &b.access_token))
        .await
        .unwrap();
    let seen = client
        .introspect(IntrospectRequest {
            token: a.access_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!seen.active);

    // A refresh token ends its session; the other session refreshes fine.
    client.revoke(revoke(&a.refresh_token)).await.unwrap();
    let err = client
        .refresh(RefreshRequest {
            refresh_token: a.refresh_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    client
        .refresh(RefreshRequest {
            refresh_token: b.refresh_token.clone(),
        })
        .await
        .unwrap();

    // An API key.
    let key = client
        .create_api_key(with_bearer(
            CreateApiKeyRequest {
                display_name: "to revoke".into(),
                ..CreateApiKeyRequest::default()
            },
            &b.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;
    client.get_me(with_bearer(GetMeRequest {}, &key)).await.unwrap();
    client.revoke(revoke(&key)).await.unwrap();
    let err = client.get_me(with_bearer(GetMeRequest {}, &key)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Unknown, malformed and already-revoked tokens: the same quiet answer.
    for token in [
        "not a token",
        "plk_0000000000000000_nothing",
        "plr_unknown",
        "eyJhbGciOiJub25lIn0.e30.",
        &a.access_token,
        &key,
    ] {
        client.revoke(revoke(token)).await.unwrap();
    }
    let err = client.revoke(revoke("")).await.unwrap_err();
    assert_eq!(
        (err.code(), violated_field(&err)),
        (Code::InvalidArgument, "token".to_owned())
    );

    // Over HTTP, as an OAuth client library would call it.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = http
        .post(format!("http://{}/v1/auth/revoke", app.http))
        .json(&serde_json::json!({"token": b.access_token}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let err = client
        .get_me(with_bearer(GetMeRequest {}, &b.access_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    app.stop().await;
}
