//! Clients no one here wrote: PyJWT verifies our access tokens against our
//! published JWKS, and refuses them for another audience.

use plinth::auth::v1::{GetJwksRequest, LoginRequest, RegisterRequest};
use plinth_runtime::testing::{Backend, backend_url};
use plinth_tests::{TestApp, unique};

#[tokio::test]
async fn pyjwt_verifies_access_tokens_with_the_published_jwks() {
    let Some(python) = backend_url(Backend::Python, "pyjwt_verifies_access_tokens_with_the_published_jwks").unwrap()
    else {
        return;
    };
    let app = TestApp::spawn(TestApp::config()).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let email = format!("interop-{}@example.com", unique());
    let password = "violet staircase under rain";
    let user = client
        .register(RegisterRequest {
            email: email.clone(),
            password: password.into(),
            display_name: String::new(),
            phone: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let tokens = client
        .login(LoginRequest {
            email,
            password: password.into(),
            phone: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    let keys = client.get_jwks(GetJwksRequest {}).await.unwrap().into_inner().keys;
    let jwks = serde_json::json!({
        "keys": keys.iter().map(|k| serde_json::json!({
            "kty": k.kty, "crv": k.crv, "x": k.x, "kid": k.kid, "alg": k.alg, "use": k.r#use,
        })).collect::<Vec<_>>()
    });

    let dir = std::env::temp_dir().join(format!("plinth-interop-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("jwks.json"), jwks.to_string()).unwrap();
    std::fs::write(dir.join("token"), &tokens.access_token).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/verify_jwt.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(dir.join("jwks.json"))
        .arg(dir.join("token"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "PyJWT refused our token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claims["sub"], user.id.as_str());
    assert_eq!(claims["aud"], "plinth");
    app.stop().await;
}

/// Python stubs generated from `proto/` with grpcio-tools call every
/// service over gRPC (`tests/python/grpc_clients.py`).
#[tokio::test]
async fn python_grpcio_stubs_call_every_service() {
    let Some(python) = backend_url(Backend::Python, "python_grpcio_stubs_call_every_service").unwrap() else {
        return;
    };
    let app = TestApp::spawn(plinth_tests::with_admin(TestApp::config()))
        .await
        .unwrap();
    let out = std::env::temp_dir().join(format!("plinth-pystubs-{}", unique()));
    let target = app.grpc.to_string();
    let stubs = out.clone();
    // Off the runtime's thread: the app under test is served by this runtime.
    let result = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/python/grpc_clients.py"))
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../proto"))
            .arg(&stubs)
            .arg(target)
            .arg(plinth_tests::ADMIN_EMAIL)
            .arg(plinth_tests::ADMIN_PASSWORD)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let _ = std::fs::remove_dir_all(&out);
    app.stop().await;
    assert!(
        result.status.success(),
        "the grpcio clients failed:\n{}\n{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
}
