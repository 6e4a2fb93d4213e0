//! The mesh as users meet it, in both shapes: every component in one
//! `plinthd` process on the embedded defaults, and one `plinthd --only`
//! process per component on PostgreSQL, Redis and NATS JetStream (a second
//! config replica beside them). Each shape runs the same flows against one
//! mesh, in order: an operator sets up a user who signs in and out over HTTP;
//! that user's configuration write reaches a Rust `ConfigClient` watching a
//! (second) replica and becomes a provable audit entry; jobs survive a killed
//! worker process and come back from the dead letters; the official `openai`
//! SDK gets the fallback provider's answer, billed and audited; a caller
//! without permission is refused by every service and each refusal audited.
//! In the production shape NATS is then stopped in the middle of config and
//! queue traffic and started again: nothing is lost, the audit log catches
//! up, and health reports the outage while it lasts.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a flow stops at the first unexpected answer; the assertion message says which"
)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plinth::ai::v1::ai_service_client::AiServiceClient;
use plinth::ai::v1::{self as ai_pb};
use plinth::audit::v1::audit_service_client::AuditServiceClient;
use plinth::audit::v1::{self as audit_pb};
use plinth::auth::v1::auth_service_client::AuthServiceClient;
use plinth::auth::v1::{self as auth_pb};
use plinth::config::ConfigClient;
use plinth::config::v1::config_service_client::ConfigServiceClient;
use plinth::config::v1::{self as config_pb};
use plinth::queue::v1::queue_service_client::QueueServiceClient;
use plinth::queue::v1::{self as queue_pb};
use plinth_tests::audit::{prove, wait_for_entries};
use plinth_tests::config::follow;
use plinth_tests::fake_upstream::{FakeUpstream, Reply};
use plinth_tests::mesh::{Mesh, Shape, channel_to};
use plinth_tests::{ADMIN_EMAIL, ADMIN_PASSWORD, PASSWORD, plinthd_binary, unique, with_bearer};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The gateway, spoken to as any HTTP client would.
struct Http {
    client: reqwest::Client,
    base: String,
}

impl Http {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, token, Some(body)).await
    }

    async fn put(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::PUT, path, token, Some(body)).await
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    /// `POST` that must answer 200; the body.
    async fn ok(&self, path: &str, token: Option<&str>, body: Value) -> Value {
        let (status, v) = self.post(path, token, body).await;
        assert_eq!(status, StatusCode::OK, "POST {path}: {v}");
        v
    }

    /// Signs in by email; the access and refresh tokens.
    async fn login(&self, email: &str, password: &str) -> (String, String) {
        let v = self
            .ok("/v1/auth/login", None, json!({"email": email, "password": password}))
            .await;
        let t = &v["tokens"];
        (str_of(&t["accessToken"]), str_of(&t["refreshToken"]))
    }
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// What the flows hand on to each other.
struct World {
    http: Http,
    admin: String,
    /// A developer created by the operator in flow 1: email and id.
    dev_email: String,
    dev_id: String,
}

impl World {
    /// A new namespace named after `label`, with a `prod` environment.
    async fn namespace_with_prod(&self, label: &str) -> String {
        let ns = format!("{label}{}", unique().replace('_', ""));
        self.http
            .ok("/v1/config/namespaces", Some(&self.admin), json!({"name": ns}))
            .await;
        self.http
            .ok(
                &format!("/v1/config/namespaces/{ns}/environments"),
                Some(&self.admin),
                json!({"name": "prod"}),
            )
            .await;
        ns
    }
}

const CHAT: &str = "/v1/chat/completions";

/// The AI configuration every process reads: `chat` tries `primary`, then `backup`.
fn ai_toml(primary: &FakeUpstream, backup: &FakeUpstream) -> String {
    format!(
        r#"
[ai.providers.primary]
kind = "openai"
base_url = "{}/v1"
api_key = "sk-primary"

[ai.providers.backup]
kind = "custom"
base_url = "{}/v1"
api_key = "sk-backup"

[[ai.models]]
name = "chat"
targets = [{{ provider = "primary", model = "gpt-p" }}, {{ provider = "backup", model = "gpt-b" }}]

[[ai.prices]]
model = "gpt-b"
input = 1.0
output = 2.0
"#,
        primary.url(),
        backup.url()
    )
}

async fn run_flows(shape: Shape, test: &str) {
    let (primary, backup) = (
        FakeUpstream::start().await.unwrap(),
        FakeUpstream::start().await.unwrap(),
    );
    let Some(mut mesh) = Mesh::start(plinthd_binary!(), shape, test, &ai_toml(&primary, &backup))
        .await
        .unwrap()
    else {
        return;
    };
    if shape == Shape::Production {
        mesh.add("config-2", "config").await.unwrap();
    }
    let http = Http {
        client: reqwest::Client::new(),
        base: mesh.gateway().unwrap(),
    };
    let mut world = operator_sets_up_a_user_who_signs_in_refreshes_and_out(http).await;
    eprintln!("flow 1 ({shape:?}): passed");
    a_config_write_reaches_a_watcher_on_another_replica_and_is_provable(&mesh, &world).await;
    eprintln!("flow 2 ({shape:?}): passed");
    jobs_survive_a_killed_worker_and_come_back_from_the_dead_letters(&mesh, &world).await;
    eprintln!("flow 3 ({shape:?}): passed");
    the_openai_sdk_gets_the_fallback_answer_billed_and_audited(&mesh, &world, &primary, &backup).await;
    eprintln!("flow 4 ({shape:?}): passed");
    every_service_refuses_a_caller_without_permission_and_audits_it(&mesh, &mut world).await;
    eprintln!("flow 5 ({shape:?}): passed");
    if shape == Shape::Production {
        a_nats_outage_loses_nothing_and_health_reports_it(&mut mesh, &world).await;
        eprintln!("flow 6 ({shape:?}): passed");
    }
    mesh.stop().await;
}

#[tokio::test]
async fn the_flows_in_one_embedded_process() {
    run_flows(Shape::Embedded, "the_flows_in_one_embedded_process").await;
}

#[tokio::test]
async fn the_flows_in_the_production_shape() {
    run_flows(Shape::Production, "the_flows_in_the_production_shape").await;
}

/// Flow 1: the bootstrap admin creates a user and an API key over HTTP; the
/// user signs in, refreshes and signs out, after which neither token works.
async fn operator_sets_up_a_user_who_signs_in_refreshes_and_out(http: Http) -> World {
    let (admin, _) = http.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let dev_email = format!("dev-{}@example.com", unique());
    let created = http
        .ok(
            "/v1/auth/users",
            Some(&admin),
            json!({"email": dev_email, "password": PASSWORD, "roles": ["developer"]}),
        )
        .await;
    let dev_id = str_of(&created["user"]["id"]);
    assert!(!dev_id.is_empty(), "{created}");

    let key = http
        .ok(
            "/v1/auth/apiKeys",
            Some(&admin),
            json!({"displayName": "operator script"}),
        )
        .await;
    let secret = str_of(&key["secret"]);
    let (status, me) = http.get("/v1/auth/me", Some(&secret)).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["user"]["email"], ADMIN_EMAIL, "the API key acts as its owner");

    let (access, refresh) = http.login(&dev_email, PASSWORD).await;
    let (status, me) = http.get("/v1/auth/me", Some(&access)).await;
    assert_eq!(
        (status, str_of(&me["user"]["id"])),
        (StatusCode::OK, dev_id.clone()),
        "{me}"
    );
    let refreshed = http
        .ok("/v1/auth/refresh", None, json!({"refreshToken": refresh}))
        .await;
    let (access2, refresh2) = (
        str_of(&refreshed["tokens"]["accessToken"]),
        str_of(&refreshed["tokens"]["refreshToken"]),
    );
    assert_ne!(refresh2, refresh, "refresh rotates the refresh token");
    assert_eq!(http.get("/v1/auth/me", Some(&access2)).await.0, StatusCode::OK);
    http.ok("/v1/auth/logout", None, json!({"refreshToken": refresh2}))
        .await;
    let (status, body) = http
        .post("/v1/auth/refresh", None, json!({"refreshToken": refresh2}))
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a logged-out session cannot refresh: {body}"
    );
    let (status, body) = http.get("/v1/auth/me", Some(&access2)).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "logout ends the access token at once: {body}"
    );
    World {
        http,
        admin,
        dev_email,
        dev_id,
    }
}

/// Flow 2: the developer writes configuration over HTTP; a Rust
/// `ConfigClient` in this process, watching the second config replica in
/// the production shape, sees it; the write is an audit entry whose
/// inclusion proof verifies against the signed checkpoint.
async fn a_config_write_reaches_a_watcher_on_another_replica_and_is_provable(mesh: &Mesh, w: &World) {
    let ns = w.namespace_with_prod("shop").await;
    let watched = match mesh.shape {
        Shape::Production => mesh.node("config-2").unwrap().grpc,
        Shape::Embedded => mesh.serving("config").unwrap().grpc,
    };
    let (dev, _) = w.http.login(&w.dev_email, PASSWORD).await;
    let (client, tasks) = follow(channel_to(watched).await.unwrap(), &ns, "prod", &dev)
        .await
        .unwrap();

    let (status, written) = w
        .http
        .put(
            &format!("/v1/config/namespaces/{ns}/environments/prod/values/checkout/limit"),
            Some(&dev),
            json!({"value": {"stringValue": "25"}, "message": "raise the limit"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{written}");
    let revision: i64 = str_of(&written["revision"]).parse().unwrap();
    wait_for_revision(&client, revision).await;
    let seen = client.get("checkout/limit").unwrap();
    assert_eq!(plinth_tests::config::text_of(&seen), "25");
    assert_eq!(seen.updated_by, w.dev_id, "the watcher sees who wrote it");

    let mut audit = AuditServiceClient::new(mesh.channel("audit").await.unwrap());
    let entries = wait_for_entries(&mut audit, &w.admin, changes_of(&ns), 1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(entries[0].event.as_ref().unwrap().actor.as_ref().unwrap().id, w.dev_id);
    prove(&mut audit, &w.admin, &entries[0]).await.unwrap();
    tasks.shutdown(Duration::from_secs(2)).await;
}

/// The audit log's configuration changes of `namespace`'s `prod`, oldest first.
fn changes_of(namespace: &str) -> audit_pb::ListEventsRequest {
    audit_pb::ListEventsRequest {
        filter: Some(audit_pb::EventFilter {
            action_prefix: "config.values.changed".into(),
            resource_name: format!("{namespace}/prod"),
            ..Default::default()
        }),
        oldest_first: true,
        ..Default::default()
    }
}

async fn wait_for_revision(client: &ConfigClient, revision: i64) {
    let mut changes = client.changes();
    tokio::time::timeout(Duration::from_secs(20), async {
        while client.revision() < revision {
            changes.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the watcher is at {} waiting for {revision}", client.revision()));
}

/// A `queue-worker` process and its report lines.
struct Worker {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Worker {
    fn start(grpc: &str, token: &str, queue: &str, lease_ms: &str, mode: &str) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_queue-worker"))
            .args([grpc, token, queue, "5", lease_ms, mode])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Worker { child, lines }
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(30), self.lines.recv())
            .await
            .expect("the worker went quiet")
            .expect("the worker exited")
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads `acked <id>` lines from `worker` until `done` holds `count` ids.
async fn acks_until(worker: &mut Worker, done: &mut HashMap<i64, u32>, count: usize) {
    while done.len() < count {
        let line = worker.line().await;
        if let Some(id) = line.strip_prefix("acked ") {
            *done.entry(id.parse().unwrap()).or_default() += 1;
        }
    }
}

/// Flow 3: a producer enqueues over gRPC; one worker process is killed with
/// jobs in hand, another acks the rest; the killed worker's jobs wait in the
/// dead letters (one attempt each), the admin paths count them, and
/// `retry-failed` brings them back to be done, each job exactly once.
async fn jobs_survive_a_killed_worker_and_come_back_from_the_dead_letters(mesh: &Mesh, w: &World) {
    let queue = format!("jobs-{}", unique().replace('_', "-"));
    let mut admin_q = QueueServiceClient::new(mesh.channel("queue").await.unwrap());
    admin_q
        .create_queue(with_bearer(
            queue_pb::CreateQueueRequest {
                queue: Some(queue_pb::Queue {
                    name: queue.clone(),
                    settings: Some(queue_pb::QueueSettings {
                        max_attempts: 1,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            &w.admin,
        ))
        .await
        .unwrap();
    let (dev, _) = w.http.login(&w.dev_email, PASSWORD).await;
    let jobs = 30;
    let messages = (0..jobs)
        .map(|i| queue_pb::NewMessage {
            payload: format!("job-{i}").into_bytes().into(),
            ..Default::default()
        })
        .collect();
    let ids: Vec<i64> = admin_q
        .enqueue_batch(with_bearer(
            queue_pb::EnqueueBatchRequest {
                queue: queue.clone(),
                messages,
            },
            &dev,
        ))
        .await
        .unwrap()
        .into_inner()
        .results
        .iter()
        .map(|r| r.message_id)
        .collect();
    assert_eq!(ids.len(), jobs);

    let grpc = format!("http://{}", mesh.serving("queue").unwrap().grpc);
    let mut doomed = Worker::start(&grpc, &dev, &queue, "1500", "hang");
    let held: Vec<i64> = doomed
        .line()
        .await
        .strip_prefix("leased ")
        .unwrap()
        .split(',')
        .map(|id| id.parse().unwrap())
        .collect();
    assert_eq!(held.len(), 5);
    let mut steady = Worker::start(&grpc, &dev, &queue, "30000", "ack");
    let mut done: HashMap<i64, u32> = HashMap::new();
    acks_until(&mut steady, &mut done, jobs - held.len()).await;
    doomed.kill(); // mid-job: no ack, no nack

    // The killed worker's leases expire; with one attempt allowed, its jobs go to the dead letters.
    let status_path = format!("/queues/{queue}/status");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, v) = w.http.get(&status_path, Some(&w.admin)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let c = &v["counts"];
        let n = |f: &str| c[f].as_str().and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
        if n("dead") == 5 && n("leased") == 0 && n("ready") == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the dead letters never filled: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, listed) = w.http.get("/queues", Some(&w.admin)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(listed.to_string().contains(&queue), "GET /queues lists it: {listed}");
    let retried = w
        .http
        .ok(&format!("/queues/{queue}/retry-failed"), Some(&w.admin), json!({}))
        .await;
    assert_eq!(retried["retried"], "5", "{retried}");
    acks_until(&mut steady, &mut done, jobs).await;
    steady.kill();
    let mut expected: Vec<i64> = ids.clone();
    expected.sort_unstable();
    let mut got: Vec<i64> = done.keys().copied().collect();
    got.sort_unstable();
    assert_eq!(got, expected, "every job done");
    assert!(done.values().all(|n| *n == 1), "a job done twice: {done:?}");
    let (_, v) = w.http.get(&status_path, Some(&w.admin)).await;
    assert!(
        ["scheduled", "ready", "leased", "dead"]
            .iter()
            .all(|f| v["counts"][f].is_null() || v["counts"][f] == "0"),
        "nothing left: {v}"
    );
}

/// Flow 4: the official `openai` SDK calls the gateway; the primary fake
/// fails, the backup answers; usage and cost show in `GetUsage` and the call
/// in the audit log.
async fn the_openai_sdk_gets_the_fallback_answer_billed_and_audited(
    mesh: &Mesh,
    w: &World,
    primary: &FakeUpstream,
    backup: &FakeUpstream,
) {
    let Ok(python) = std::env::var("PLINTH_TEST_PYTHON") else {
        assert!(
            std::env::var_os("PLINTH_TEST_REQUIRE_BACKENDS").is_none(),
            "PLINTH_TEST_PYTHON must name a Python with the openai package"
        );
        eprintln!("flow 4 skipped: PLINTH_TEST_PYTHON is not set");
        return;
    };
    primary.always(
        CHAT,
        Reply::status(503, json!({"error": {"message": "overloaded", "type": "server_error"}})),
    );
    backup.always(
        CHAT,
        Reply::ok(json!({
            "id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": "gpt-b",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "from the backup"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
        })),
    );
    let (dev, _) = w.http.login(&w.dev_email, PASSWORD).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_chat.py");
    let base = format!("{}/v1", w.http.base);
    let args = vec![base, dev, "chat".into(), "from the backup".into()];
    plinth_tests::run_python(python, script, args).await.unwrap();
    assert!(!primary.requests().is_empty(), "the primary was tried first");

    let (status, usage) = w
        .http
        .get("/v1/ai/usage?groupBy=USAGE_DIMENSION_PROVIDER", Some(&w.admin))
        .await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    let rows = usage["rows"].as_array().cloned().unwrap_or_default();
    let row = rows
        .iter()
        .find(|r| r["provider"] == "backup")
        .unwrap_or_else(|| panic!("no usage row for the backup: {usage}"));
    assert_eq!(row["requests"], "1", "{usage}");
    assert_eq!(row["usage"]["inputTokens"], "12", "{usage}");
    let cost = row["costUsd"].as_f64().unwrap_or(0.0);
    assert!(
        (cost - 0.000_018).abs() < 1e-9,
        "12 in at $1/M + 3 out at $2/M: {usage}"
    );

    let mut audit = AuditServiceClient::new(mesh.channel("audit").await.unwrap());
    let request = audit_pb::ListEventsRequest {
        filter: Some(audit_pb::EventFilter {
            action_prefix: "ai.".into(),
            actor_id: w.dev_id.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let entries = wait_for_entries(&mut audit, &w.admin, request, 1, Duration::from_secs(30))
        .await
        .unwrap();
    let event = entries[0].event.as_ref().unwrap();
    assert_eq!(event.resource.as_ref().unwrap().name, "chat");
}

/// Flow 5: a signed-in user with only the default role is refused a
/// permissioned call by every service, over HTTP (403) and gRPC
/// (PERMISSION_DENIED), and every refusal lands in the audit log.
async fn every_service_refuses_a_caller_without_permission_and_audits_it(mesh: &Mesh, w: &mut World) {
    let email = format!("viewer-{}@example.com", unique());
    w.http
        .ok("/v1/auth/register", None, json!({"email": email, "password": PASSWORD}))
        .await;
    let (viewer, _) = w.http.login(&email, PASSWORD).await;
    let (_, me) = w.http.get("/v1/auth/me", Some(&viewer)).await;
    let viewer_id = str_of(&me["user"]["id"]);

    let http_refusals = [
        (
            "config",
            reqwest::Method::POST,
            "/v1/config/namespaces",
            json!({"name": "nope"}),
        ),
        ("queue", reqwest::Method::POST, "/v1/queues", json!({"name": "nope"})),
        ("audit", reqwest::Method::GET, "/v1/audit/events", Value::Null),
        (
            "ai",
            reqwest::Method::POST,
            CHAT,
            json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        ("auth", reqwest::Method::GET, "/v1/auth/users", Value::Null),
    ];
    for (service, method, path, body) in http_refusals {
        let body = (!body.is_null()).then_some(body);
        let (status, v) = w.http.call(method, path, Some(&viewer), body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{service}: {path} → {v}");
    }
    // The same over gRPC, straight to each service's own process.
    refused(
        QueueServiceClient::new(mesh.channel("queue").await.unwrap())
            .purge_queue(with_bearer(
                queue_pb::PurgeQueueRequest {
                    queue: "nope".into(),
                    ..Default::default()
                },
                &viewer,
            ))
            .await,
    );
    refused(
        AuditServiceClient::new(mesh.channel("audit").await.unwrap())
            .verify_log(with_bearer(audit_pb::VerifyLogRequest {}, &viewer))
            .await,
    );
    refused(
        ConfigServiceClient::new(mesh.channel("config").await.unwrap())
            .create_namespace(with_bearer(
                config_pb::CreateNamespaceRequest {
                    namespace: Some(config_pb::Namespace {
                        name: "nope".into(),
                        ..Default::default()
                    }),
                },
                &viewer,
            ))
            .await,
    );
    refused(
        AiServiceClient::new(mesh.channel("ai").await.unwrap())
            .generate(with_bearer(
                ai_pb::GenerateRequest {
                    model: "chat".into(),
                    ..Default::default()
                },
                &viewer,
            ))
            .await,
    );
    refused(
        AuthServiceClient::new(mesh.channel("auth").await.unwrap())
            .list_users(with_bearer(auth_pb::ListUsersRequest::default(), &viewer))
            .await,
    );

    let mut audit = AuditServiceClient::new(mesh.channel("audit").await.unwrap());
    let request = audit_pb::ListEventsRequest {
        filter: Some(audit_pb::EventFilter {
            actor_id: viewer_id.clone(),
            outcome: audit_pb::Outcome::Denied as i32,
            ..Default::default()
        }),
        oldest_first: true,
        ..Default::default()
    };
    let entries = wait_for_entries(&mut audit, &w.admin, request, 10, Duration::from_secs(30))
        .await
        .unwrap();
    let mut actions: Vec<String> = entries
        .iter()
        .map(|e| e.event.as_ref().unwrap().action.clone())
        .collect();
    actions.sort();
    assert_eq!(
        actions,
        [
            "ai.access.denied",
            "ai.access.denied",
            "audit.access.denied",
            "audit.access.denied",
            "auth.access.denied",
            "auth.access.denied",
            "config.access.denied",
            "config.access.denied",
            "queue.access.denied",
            "queue.access.denied"
        ],
        "each refusal once, over HTTP and over gRPC"
    );
    let purge = entries
        .iter()
        .filter_map(|e| e.event.as_ref())
        .find(|e| e.resource.as_ref().is_some_and(|r| r.name.ends_with("/PurgeQueue")))
        .unwrap();
    assert!(
        purge.reason.contains("queue."),
        "the refusal names the permission: {}",
        purge.reason
    );
}

/// Health of `service` on the process at `grpc`.
async fn health(grpc: std::net::SocketAddr, service: &str) -> Option<ServingStatus> {
    let channel = channel_to(grpc).await.ok()?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status())
}

async fn wait_for_health(grpc: std::net::SocketAddr, service: &str, want: ServingStatus, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = health(grpc, service).await;
        if got == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{service} is {got:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Flow 6 (production shape): NATS goes away in the middle of configuration
/// writes and queue traffic. Both keep working, health says NATS is down
/// while it is, and once it is back the watcher and the audit log have
/// every change, none twice.
async fn a_nats_outage_loses_nothing_and_health_reports_it(mesh: &mut Mesh, w: &World) {
    let ns = w.namespace_with_prod("outage").await;
    let (dev, _) = w.http.login(&w.dev_email, PASSWORD).await;
    let replica = mesh.node("config-2").unwrap().grpc;
    let (client, tasks) = follow(channel_to(replica).await.unwrap(), &ns, "prod", &dev)
        .await
        .unwrap();
    let put = |i: usize| {
        let (http, dev, ns) = (&w.http, dev.clone(), ns.clone());
        async move {
            let (status, v) = http
                .put(
                    &format!("/v1/config/namespaces/{ns}/environments/prod/values/k{i}"),
                    Some(&dev),
                    json!({"value": {"stringValue": format!("v{i}")}}),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "write {i}: {v}");
            str_of(&v["revision"]).parse::<i64>().unwrap()
        }
    };
    put(0).await;

    let config_node = mesh.serving("config").unwrap().grpc;
    mesh.nats().unwrap().down().await;
    wait_for_health(
        config_node,
        "plinth.backend.nats",
        ServingStatus::NotServing,
        Duration::from_secs(30),
    )
    .await;
    let ready = w
        .http
        .client
        .get(format!("http://{}/readyz", mesh.serving("config").unwrap().http))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "readiness reports the outage"
    );
    let body = ready.text().await.unwrap();
    assert!(body.contains("nats"), "{body}");
    assert_eq!(
        health(config_node, "config").await,
        Some(ServingStatus::Serving),
        "config keeps serving through a NATS outage"
    );
    let mut last = 0;
    for i in 1..=5 {
        last = put(i).await;
    }
    // The queue keeps working too.
    let mut q = QueueServiceClient::new(mesh.channel("queue").await.unwrap());
    let queue = format!("outage-{}", unique().replace('_', "-"));
    q.create_queue(with_bearer(
        queue_pb::CreateQueueRequest {
            queue: Some(queue_pb::Queue {
                name: queue.clone(),
                ..Default::default()
            }),
        },
        &w.admin,
    ))
    .await
    .unwrap();
    let enqueued = q
        .enqueue_batch(with_bearer(
            queue_pb::EnqueueBatchRequest {
                queue: queue.clone(),
                messages: (0..10)
                    .map(|i| queue_pb::NewMessage {
                        payload: format!("during-outage-{i}").into_bytes().into(),
                        ..Default::default()
                    })
                    .collect(),
            },
            &dev,
        ))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(enqueued.len(), 10);

    mesh.nats().unwrap().up().await.unwrap();
    wait_for_health(
        config_node,
        "plinth.backend.nats",
        ServingStatus::Serving,
        Duration::from_secs(60),
    )
    .await;
    wait_for_revision(&client, last).await;
    for i in 0..=5 {
        assert_eq!(
            client
                .get(&format!("k{i}"))
                .map(|kv| plinth_tests::config::text_of(&kv)),
            Some(format!("v{i}"))
        );
    }
    let mut audit = AuditServiceClient::new(mesh.channel("audit").await.unwrap());
    let entries = wait_for_entries(&mut audit, &w.admin, changes_of(&ns), 6, Duration::from_secs(60))
        .await
        .unwrap();
    let mut revisions: Vec<String> = entries
        .iter()
        .filter_map(|e| {
            let m = e.event.as_ref()?.metadata.as_ref()?;
            Some(
                plinth_runtime::wire::json_of_struct("m", m)
                    .ok()?
                    .get("revision")?
                    .to_string(),
            )
        })
        .collect();
    revisions.sort();
    revisions.dedup();
    assert_eq!(revisions.len(), 6, "one entry per write, none twice: {revisions:?}");
    assert_eq!(entries.len(), 6, "no entry twice");
    tasks.shutdown(Duration::from_secs(2)).await;
}

/// The answer of a call the caller's role does not allow.
fn refused<T: std::fmt::Debug>(answer: Result<T, tonic::Status>) {
    let denied = answer.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
}
