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
