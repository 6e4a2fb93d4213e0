//! The real auth service through the gateway over HTTP/JSON, in both shapes:
//! all components in one process (in-process calls), and a gateway-only
//! process dialling a separate auth process over gRPC. What a `curl` user
//! meets: register, log in, call with the token, refresh, log out, and the
//! error bodies and statuses on the way.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

use plinth_runtime::config::Config;
use plinth_tests::TestApp;
use serde_json::{Value, json};

const PASSWORD: &str = "violet staircase under rain";

async fn call(
    http: &reqwest::Client,
    method: &str,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http.request(method.parse().unwrap(), url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The production shape: an auth-only process (trusting `trusted_proxies`)
/// and a gateway-only process dialling it.
async fn split(base: &Config, trusted_proxies: &str) -> (TestApp, TestApp) {
    let mut auth_config = TestApp::replica_of(base, "auth").unwrap();
    auth_config.trusted_proxies = trusted_proxies.into();
    let auth = TestApp::spawn(auth_config).await.unwrap();
    let mut gateway_config = TestApp::replica_of(base, "gateway").unwrap();
    gateway_config
        .gateway
        .upstreams
        .insert("auth".into(), format!("http://{}", auth.grpc));
    let gateway = TestApp::spawn(gateway_config).await.unwrap();
    (auth, gateway)
}

/// Register → login → me → refresh → logout → refresh refused, over HTTP at `base`.
async fn session_flow(base: &str) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let email = format!("http-{}@example.com", plinth_tests::unique());

    let (s, b) = call(
        &http,
        "POST",
        format!("{base}/v1/auth/register"),
        None,
        Some(json!({"email": email, "password": "short"})),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["code"], 3);
    assert!(b["details"].to_string().contains("password"), "the field is named: {b}");

    let (s, b) = call(
        &http,
        "POST",
        format!("{base}/v1/auth/register"),
        None,
        Some(json!({"email": email, "password": PASSWORD, "displayName": "HTTP user"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["user"]["displayName"], "HTTP user");

    let (s, b) = call(
        &http,
        "POST",
        format!("{base}/v1/auth/login"),
        None,
        Some(json!({"email": email, "password": "wrong password entirely"})),
    )
    .await;
    assert_eq!((s, b["code"].clone()), (401, json!(16)), "{b}");

    let (s, b) = call(
        &http,
        "POST",
        format!("{base}/v1/auth/login"),
        None,
        Some(json!({"email": email, "password": PASSWORD})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let access = b["tokens"]["accessToken"].as_str().unwrap().to_owned();
    let refresh = b["tokens"]["refreshToken"].as_str().unwrap().to_owned();
    assert_eq!(b["tokens"]["expiresIn"], "900", "int64 is a JSON string");

    let (s, b) = call(&http, "GET", format!("{base}/v1/auth/me"), Some(&access), None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["user"]["email"], email);

    let resp = http.get(format!("{base}/v1/auth/me")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().contains_key("www-authenticate"));

    // An API key made over HTTP works as a bearer credential.
    let (s, b) = call(
        &http,
        "POST",
        format!("{base}/v1/auth/apiKeys"),
        Some(&access),
        Some(json!({"displayName": "ci"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let key = b["secret"].as_str().unwrap().to_owned();
    let (s, b) = call(&http, "GET", format!("{base}/v1/auth/me"), Some(&key), None).await;
    assert_eq!((s, b["user"]["email"].clone()), (200, json!(email)), "{b}");

    let (s, b) = call(&http, "GET", format!("{base}/v1/auth/sessions"), Some(&access), None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["sessions"].as_array().unwrap().len(), 1);

    let (s, b) = call(
        &http,
        "POST",
        format!("{base}/v1/auth/refresh"),
        None,
        Some(json!({"refreshToken": refresh})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let rotated = b["tokens"]["refreshToken"].as_str().unwrap().to_owned();
    assert_ne!(rotated, refresh);

    let (s, _) = call(
        &http,
        "POST",
        format!("{base}/v1/auth/logout"),
        Some(&access),
        Some(json!({"refreshToken": rotated})),
    )
    .await;
    assert_eq!(s, 200);
    let (s, b) = call(
        &http,
        "POST",
        format!("{base}/v1/auth/refresh"),
        None,
        Some(json!({"refreshToken": rotated})),
    )
    .await;
    assert_eq!(s, 401, "a logged-out session cannot refresh: {b}");

    let (s, b) = call(&http, "GET", format!("{base}/.well-known/jwks.json"), None, None).await;
    assert_eq!(s, 200);
    assert_eq!(b["keys"][0]["alg"], "EdDSA");
}

#[tokio::test]
async fn auth_over_http_in_one_process() {
    let app = TestApp::spawn(TestApp::config()).await.unwrap();
    let base = format!("http://{}", app.http);
    session_flow(&base).await;

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let (s, doc) = call(&http, "GET", format!("{base}/openapi.json"), None, None).await;
    assert_eq!(s, 200);
    let login = &doc["paths"]["/v1/auth/login"]["post"];
    assert_eq!(login["operationId"], "AuthService_Login");
    assert_eq!(login["security"], json!([]), "login is public");
    let me = &doc["paths"]["/v1/auth/me"]["get"];
    assert!(
        me["description"].as_str().unwrap().contains("valid access token"),
        "{me}"
    );
    app.stop().await;
}

#[tokio::test]
async fn auth_over_http_through_a_separate_gateway_process() {
    let base_config = TestApp::config();
    let (auth, gateway) = split(&base_config, "").await;
    session_flow(&format!("http://{}", gateway.http)).await;

    // Health through the edge: names it does not know are asked of the upstream.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let g = format!("http://{}", gateway.http);
    let (s, b) = call(
        &http,
        "GET",
        format!("{g}/healthz?service=plinth.auth.v1.AuthService"),
        None,
        None,
    )
    .await;
    assert_eq!((s, b["status"].clone()), (200, json!("SERVING")), "{b}");
    let (s, _) = call(
        &http,
        "GET",
        format!("{g}/healthz?service=plinth.nothing.v1.Nope"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (s, b) = call(&http, "GET", format!("{g}/readyz"), None, None).await;
    assert_eq!((s, b["upstream.auth"].clone()), (200, json!("SERVING")), "{b}");

    // An auth-only process serves no gateway routes.
    let (s, _) = call(&http, "GET", format!("http://{}/v1/auth/me", auth.http), None, None).await;
    assert_eq!(s, 404);

    // With auth gone the gateway is not ready, and says which upstream is missing.
    auth.stop().await;
    let (s, b) = call(&http, "GET", format!("{g}/readyz"), None, None).await;
    assert_eq!(s, 503, "{b}");
    assert!(b["upstream.auth"].as_str().unwrap().starts_with("UNREACHABLE"), "{b}");
    let (s, b) = call(
        &http,
        "POST",
        format!("{g}/v1/auth/login"),
        None,
        Some(json!({"email": "a@b.c", "password": PASSWORD})),
    )
    .await;
    assert_eq!((s, b["code"].clone()), (503, json!(14)), "{b}");
    gateway.stop().await;

    // A gateway with no upstream for a component answers 503 naming the setting.
    let lonely = TestApp::spawn(TestApp::replica_of(&base_config, "gateway").unwrap())
        .await
        .unwrap();
    let (s, b) = call(&http, "GET", format!("http://{}/v1/auth/me", lonely.http), None, None).await;
    assert_eq!((s, b["code"].clone()), (503, json!(14)), "{b}");
    assert!(
        b["message"]
            .as_str()
            .unwrap()
            .contains("PLINTH_GATEWAY__UPSTREAMS__AUTH"),
        "{b}"
    );
    lonely.stop().await;
}

#[tokio::test]
async fn the_http_listener_speaks_tls_when_configured() {
    let dir = std::env::temp_dir().join(format!("plinth-tls-{}", plinth_tests::unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let mut config = TestApp::config();
    config.tls = Some(plinth_runtime::config::TlsConfig {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        client_ca: None,
    });
    let app = TestApp::spawn(config).await.unwrap();
    let port = app.http.port();
    let https = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", app.http)
        .build()
        .unwrap();
    let resp = https
        .get(format!("https://localhost:{port}/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = https
        .get(format!("https://localhost:{port}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let plain = reqwest::Client::builder().no_proxy().build().unwrap();
    assert!(
        plain
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .is_err(),
        "plaintext HTTP is refused on a TLS listener"
    );
    app.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn behind_a_split_gateway_logins_are_throttled_per_client_not_per_gateway() {
    let base_config = TestApp::config();
    // The gateway process connects from loopback: trust it to report clients.
    let (auth, gateway) = split(&base_config, "127.0.0.1").await;
    let g = format!("http://{}", gateway.http);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let email = format!("nat-{}@example.com", plinth_tests::unique());
    let (s, _) = call(
        &http,
        "POST",
        format!("{g}/v1/auth/register"),
        None,
        Some(json!({"email": email, "password": PASSWORD})),
    )
    .await;
    assert_eq!(s, 200);

    // One client guesses across many accounts until its address is locked out.
    let attempt = |from: &'static str, email: String, password: &'static str| {
        let http = http.clone();
        let url = format!("{g}/v1/auth/login");
        async move {
            http.post(url)
                .header("x-forwarded-for", from)
                .json(&json!({"email": email, "password": password}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let guesses = (0..50).map(|i| {
        attempt(
            "10.0.0.7",
            format!("guess-{i}-{}@example.com", plinth_tests::unique()),
            "wrong password guess",
        )
    });
    let statuses = futures::future::join_all(guesses).await;
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    assert_eq!(
        attempt("10.0.0.7", email.clone(), PASSWORD).await,
        429,
        "that client is locked out"
    );
    // Another client behind the same gateway is not.
    assert_eq!(attempt("10.0.0.8", email.clone(), PASSWORD).await, 200);
    gateway.stop().await;
    auth.stop().await;
}
