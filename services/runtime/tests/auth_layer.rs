//! The shared auth layer in front of a service: deny by default, bearer
//! tokens verified against the JWKS (refetched once on an unknown key, no
//! more often than the interval), and the contract's permission enforced
//! through the permission patterns the token (or API key) carries.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plinth::auth::v1::Jwk;
use plinth_runtime::auth::jwt::{Claims, TokenSigner};
use plinth_runtime::auth::{
    Access, ApiKeyGrant, ApiKeySource, AuthLayer, Authenticator, JwksSource, PermissionMap, Principal, unix_now,
};
use tower::{Layer, Service, ServiceExt};

/// A key set that can change, counting fetches.
struct Keys {
    jwks: Mutex<Vec<Jwk>>,
    fetches: AtomicUsize,
}

#[async_trait::async_trait]
impl JwksSource for Keys {
    async fn fetch(&self) -> Result<Vec<Jwk>, String> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        Ok(self.jwks.lock().unwrap().clone())
    }
}

/// What the test roles grant, as the auth service would put it in a token.
fn perms_of(roles: &[&str]) -> Vec<String> {
    roles
        .iter()
        .flat_map(|r| match *r {
            "admin" => vec!["*"],
            "developer" => vec!["config.values.*", "queue.messages.*"],
            "viewer" => vec!["config.values.read"],
            _ => vec![],
        })
        .map(str::to_owned)
        .collect()
}

fn token(signer: &TokenSigner, roles: &[&str]) -> String {
    let now = unix_now();
    signer.sign(&Claims {
        iss: "plinth".into(),
        sub: "user-1".into(),
        aud: "plinth".into(),
        exp: now + 60,
        iat: now,
        nbf: now,
        jti: "t1".into(),
        sid: "s1".into(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        perms: perms_of(roles),
        tenant: String::new(),
    })
}

/// Calls `path` through the layer; returns the gRPC code (0 = reached the service) and the principal seen.
async fn call(layer: &AuthLayer, path: &str, bearer: Option<&str>) -> (i32, Option<Principal>) {
    let seen = Arc::new(Mutex::new(None));
    let seen2 = seen.clone();
    let inner = tower::service_fn(move |req: http::Request<()>| {
        let seen = seen2.clone();
        async move {
            *seen.lock().unwrap() = req.extensions().get::<Principal>().cloned();
            Ok::<_, Infallible>(http::Response::new(String::new()))
        }
    });
    let mut svc = layer.layer(inner);
    let mut req = http::Request::builder().uri(format!("http://x{path}"));
    if let Some(t) = bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = svc.ready().await.unwrap().call(req.body(()).unwrap()).await.unwrap();
    let code = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().parse().unwrap())
        .unwrap_or(0);
    let principal = seen.lock().unwrap().clone();
    (code, principal)
}

const UNAUTHENTICATED: i32 = 16;
const PERMISSION_DENIED: i32 = 7;

fn setup(refresh_interval: Duration) -> (TokenSigner, Arc<Keys>, AuthLayer) {
    let signer = TokenSigner::generate();
    let keys = Arc::new(Keys {
        jwks: Mutex::new(vec![signer.jwk()]),
        fetches: AtomicUsize::new(0),
    });
    let authenticator = Arc::new(Authenticator::new(keys.clone(), "plinth", "plinth", refresh_interval));
    let map = PermissionMap::from_entries([
        ("/t.v1.T/Open".to_owned(), Access::Public),
        ("/t.v1.T/Me".to_owned(), Access::Authenticated),
        (
            "/t.v1.T/Write".to_owned(),
            Access::Permission("queue.messages.write".into()),
        ),
    ]);
    (signer, keys, AuthLayer::new(Some(authenticator), map))
}

#[tokio::test]
async fn permissions_from_the_contract_are_enforced() {
    let (signer, _, layer) = setup(Duration::from_secs(30));
    let viewer = token(&signer, &["viewer"]);
    let developer = token(&signer, &["developer"]);

    assert_eq!(call(&layer, "/t.v1.T/Open", None).await.0, 0);
    assert_eq!(call(&layer, "/t.v1.T/Me", None).await.0, UNAUTHENTICATED);
    let (code, principal) = call(&layer, "/t.v1.T/Me", Some(&viewer)).await;
    assert_eq!((code, principal.map(|p| p.subject)), (0, Some("user-1".to_owned())));
    assert_eq!(call(&layer, "/t.v1.T/Write", None).await.0, UNAUTHENTICATED);
    assert_eq!(call(&layer, "/t.v1.T/Write", Some(&viewer)).await.0, PERMISSION_DENIED);
    assert_eq!(call(&layer, "/t.v1.T/Write", Some(&developer)).await.0, 0);
    // A method the contract does not expose is refused even to an admin.
    assert_eq!(
        call(&layer, "/t.v1.T/Secret", Some(&token(&signer, &["admin"])))
            .await
            .0,
        PERMISSION_DENIED
    );
    // The runtime's own endpoints need nothing.
    assert_eq!(call(&layer, "/grpc.health.v1.Health/Check", None).await.0, 0);
    // A bad token on a public method is still an error, not an anonymous call.
    assert_eq!(call(&layer, "/t.v1.T/Open", Some("garbage")).await.0, UNAUTHENTICATED);
}

#[tokio::test]
async fn a_rotated_key_is_fetched_once_and_unknown_keys_do_not_stampede() {
    let (signer, keys, layer) = setup(Duration::from_secs(3600));
    assert_eq!(call(&layer, "/t.v1.T/Me", Some(&token(&signer, &[]))).await.0, 0);
    assert_eq!(
        keys.fetches.load(Ordering::SeqCst),
        1,
        "the first unknown kid fetches the key set"
    );
    assert_eq!(call(&layer, "/t.v1.T/Me", Some(&token(&signer, &[]))).await.0, 0);
    assert_eq!(
        keys.fetches.load(Ordering::SeqCst),
        1,
        "known keys are served from the cache"
    );

    // Tokens signed by a key nobody published are refused without refetching each time.
    let stranger = TokenSigner::generate();
    for _ in 0..5 {
        assert_eq!(
            call(&layer, "/t.v1.T/Me", Some(&token(&stranger, &[]))).await.0,
            UNAUTHENTICATED
        );
    }
    assert_eq!(keys.fetches.load(Ordering::SeqCst), 1, "refetching is rate-limited");

    let (signer2, keys2, layer2) = setup(Duration::ZERO);
    assert_eq!(call(&layer2, "/t.v1.T/Me", Some(&token(&signer2, &[]))).await.0, 0);
    let rotated = TokenSigner::generate();
    keys2.jwks.lock().unwrap().push(rotated.jwk());
    assert_eq!(
        call(&layer2, "/t.v1.T/Me", Some(&token(&rotated, &[]))).await.0,
        0,
        "a newly published key is picked up"
    );
}

/// Keys an issuer vouches for, by secret, counting validations.
struct IssuedKeys {
    grants: Vec<(String, ApiKeyGrant)>,
    validations: AtomicUsize,
}

#[async_trait::async_trait]
impl ApiKeySource for IssuedKeys {
    async fn validate(&self, key: &str) -> Result<Option<ApiKeyGrant>, String> {
        self.validations.fetch_add(1, Ordering::SeqCst);
        Ok(self.grants.iter().find(|(k, _)| k == key).map(|(_, g)| g.clone()))
    }
}

#[tokio::test]
async fn api_keys_are_limited_to_their_scopes_and_their_owners_roles() {
    let signer = TokenSigner::generate();
    let keys = Arc::new(Keys {
        jwks: Mutex::new(vec![signer.jwk()]),
        fetches: AtomicUsize::new(0),
    });
    let grant = |id: &str, roles: &[&str], scopes: &[&str], expires_at: i64| ApiKeyGrant {
        key_id: id.into(),
        subject: "owner".into(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        permissions: perms_of(roles),
        tenant: String::new(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        expires_at,
    };
    let issued = Arc::new(IssuedKeys {
        grants: vec![
            ("plk_dev_any".into(), grant("k1", &["developer"], &[], 0)),
            ("plk_dev_queue".into(), grant("k2", &["developer"], &["queue.*"], 0)),
            ("plk_dev_config".into(), grant("k3", &["developer"], &["config.*"], 0)),
            ("plk_viewer_queue".into(), grant("k4", &["viewer"], &["queue.*"], 0)),
            ("plk_expired".into(), grant("k5", &["developer"], &[], unix_now() - 1)),
        ],
        validations: AtomicUsize::new(0),
    });
    let authenticator =
        Arc::new(Authenticator::new(keys, "plinth", "plinth", Duration::from_secs(30)).with_api_keys(issued.clone()));
    let map = PermissionMap::from_entries([(
        "/t.v1.T/Write".to_owned(),
        Access::Permission("queue.messages.write".into()),
    )]);
    let layer = AuthLayer::new(Some(authenticator), map);
    let write = "/t.v1.T/Write";

    let (code, principal) = call(&layer, write, Some("plk_dev_any")).await;
    assert_eq!(code, 0);
    assert_eq!(principal.unwrap().api_key.as_deref(), Some("k1"));
    assert_eq!(call(&layer, write, Some("plk_dev_queue")).await.0, 0);
    assert_eq!(
        call(&layer, write, Some("plk_dev_config")).await.0,
        PERMISSION_DENIED,
        "outside the key's scopes"
    );
    assert_eq!(
        call(&layer, write, Some("plk_viewer_queue")).await.0,
        PERMISSION_DENIED,
        "scopes never exceed the owner's roles"
    );
    assert_eq!(call(&layer, write, Some("plk_expired")).await.0, UNAUTHENTICATED);
    assert_eq!(call(&layer, write, Some("plk_unknown")).await.0, UNAUTHENTICATED);

    // Repeated use is served from the short cache, not the issuer.
    let before = issued.validations.load(Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(call(&layer, write, Some("plk_dev_any")).await.0, 0);
    }
    assert_eq!(issued.validations.load(Ordering::SeqCst), before);
}
