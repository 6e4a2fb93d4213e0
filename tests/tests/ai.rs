//! The ai service as its users meet it, against local fake providers that
//! speak OpenAI's wire format over real HTTP: fallback to the next target on
//! a retryable failure, an open circuit breaker and a `Retry-After` that
//! skip their target without a call, streaming with tool calls, usage and
//! cost in `GetUsage`, a cancelled stream still billed, bad input named
//! over gRPC, over HTTP and over the OpenAI-compatible surface, and the
//! official `openai` Python SDK working unchanged against the gateway.

#![expect(
    clippy::unwrap_used,
    reason = "helpers shared by the tests; an unexpected answer fails the test"
)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use plinth::ai::v1::ai_service_client::AiServiceClient;
use plinth::ai::v1::{self as pb};
use plinth::audit::v1::audit_service_client::AuditServiceClient;
use plinth::audit::v1::{self as apb};
use plinth_runtime::config::{AiModel, AiPrice, AiProvider, AiSettings, AiTarget, Config};
use plinth_runtime::testing::{Backend, backend_url};
use plinth_tests::audit::wait_for_entries;
use plinth_tests::config::{ConfigSession, fresh_name, secret, text};
use plinth_tests::fake_upstream::{FakeUpstream, Reply, sse_frames};
use plinth_tests::{ADMIN_EMAIL, ADMIN_PASSWORD, TestApp, access_token, violated_field, with_admin, with_bearer};
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const CHAT: &str = "/v1/chat/completions";

fn provider(fake: &FakeUpstream, kind: &str) -> AiProvider {
    AiProvider {
        kind: kind.into(),
        base_url: Some(format!("{}/v1", fake.url())),
        api_key: Some(secrecy::SecretString::from("sk-test")),
        api_key_file: None,
        api_key_secret: None,
        api_version: None,
    }
}

fn target(provider: &str, model: &str) -> AiTarget {
    AiTarget {
        provider: provider.into(),
        model: model.into(),
        weight: None,
        tier: None,
        requests_per_minute: None,
        tokens_per_minute: None,
    }
}

/// `chat` → primary/gpt-p then backup/gpt-b; `embed` → primary/emb.
fn config(primary: &FakeUpstream, backup: &FakeUpstream) -> Config {
    let mut config = with_admin(TestApp::config());
    config.ai = AiSettings {
        providers: BTreeMap::from([
            ("primary".to_owned(), provider(primary, "openai")),
            ("backup".to_owned(), provider(backup, "custom")),
        ]),
        models: vec![
            AiModel {
                name: "chat".into(),
                targets: vec![target("primary", "gpt-p"), target("backup", "gpt-b")],
            },
            AiModel {
                name: "embed".into(),
                targets: vec![target("primary", "emb")],
            },
        ],
        prices: vec![
            AiPrice {
                provider: None,
                model: "gpt-b".into(),
                input: 1.0,
                output: 2.0,
                cached_input: None,
                cache_write: None,
            },
            AiPrice {
                provider: Some("primary".into()),
                model: "gpt-p".into(),
                input: 10.0,
                output: 20.0,
                cached_input: Some(5.0),
                cache_write: None,
            },
        ],
        timeout_ms: 5000,
        breaker_failures: 2,
        breaker_open_secs: 60,
        ..AiSettings::default()
    };
    config
}

/// The primary and the backup provider.
async fn fakes() -> (FakeUpstream, FakeUpstream) {
    (
        FakeUpstream::start().await.unwrap(),
        FakeUpstream::start().await.unwrap(),
    )
}

fn answer(text: &str, prompt: u64, completion: u64) -> Value {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "upstream-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": 0}},
    })
}

fn error(status: u16, kind: &str) -> Reply {
    Reply::status(
        status,
        json!({"error": {"message": format!("fake {kind}"), "type": kind, "code": null}}),
    )
}

fn user(text: &str) -> pb::Message {
    pb::Message {
        role: pb::Role::User as i32,
        content: vec![pb::ContentPart {
            part: Some(pb::content_part::Part::Text(text.into())),
        }],
        ..Default::default()
    }
}

fn request(text: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: "chat".into(),
        messages: vec![user(text)],
        ..Default::default()
    }
}

struct Session {
    app: TestApp,
    ai: AiServiceClient<Channel>,
    token: String,
}

async fn start(config: Config) -> Session {
    let app = TestApp::spawn(config).await.unwrap();
    let token = access_token(&mut app.auth().await.unwrap(), ADMIN_EMAIL, ADMIN_PASSWORD)
        .await
        .unwrap();
    let ai = AiServiceClient::new(app.channel().await.unwrap());
    Session { app, ai, token }
}

impl Session {
    /// POSTs `body` as JSON to `path` on the gateway with the admin token.
    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("http://{}{path}", self.app.http))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn generate(&mut self, r: pb::GenerateRequest) -> Result<pb::GenerateResponse, tonic::Status> {
        self.ai
            .generate(with_bearer(r, &self.token))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Waits until `GetUsage` (grouped as given) counts `requests` calls in total.
    async fn usage(&mut self, group_by: Vec<pb::UsageDimension>, requests: i64) -> pb::GetUsageResponse {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self
                .ai
                .get_usage(with_bearer(
                    pb::GetUsageRequest {
                        group_by: group_by.iter().map(|d| *d as i32).collect(),
                        ..Default::default()
                    },
                    &self.token,
                ))
                .await
                .unwrap()
                .into_inner();
            if r.total.as_ref().map_or(0, |t| t.requests) >= requests {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "usage never reached {requests} requests: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn target_state(&mut self, provider: &str) -> pb::Target {
        self.target_state_of("chat", provider).await
    }

    async fn target_state_of(&mut self, model: &str, provider: &str) -> pb::Target {
        let models = self
            .ai
            .list_models(with_bearer(pb::ListModelsRequest {}, &self.token))
            .await
            .unwrap()
            .into_inner()
            .models;
        let found = models.into_iter().find(|m| m.name == model).unwrap();
        found.targets.into_iter().find(|t| t.provider == provider).unwrap()
    }
}

#[tokio::test]
async fn a_failing_target_falls_back_and_the_answering_one_is_billed() {
    let (primary, backup) = fakes().await;
    primary.push(CHAT, error(503, "server_error"));
    backup.push(CHAT, Reply::ok(answer("from backup", 1_000_000, 500_000)));
    let mut s = start(config(&primary, &backup)).await;

    let r = s.generate(request("hello")).await.unwrap();
    assert_eq!(r.provider, "backup");
    assert_eq!(r.provider_model, "gpt-b");
    assert_eq!(r.finish_reason, pb::FinishReason::Stop as i32);
    let text = match &r.message.as_ref().unwrap().content[0].part {
        Some(pb::content_part::Part::Text(t)) => t.clone(),
        other => panic!("no text: {other:?}"),
    };
    assert_eq!(text, "from backup");
    assert_eq!(r.attempts.len(), 1);
    assert_eq!(r.attempts[0].provider, "primary");
    assert!(!r.attempts[0].skipped);
    assert!(r.attempts[0].error.contains("503"), "{:?}", r.attempts[0]);
    // 1M input × $1 + 0.5M output × $2.
    assert!(r.priced);
    assert!((r.cost_usd - 2.0).abs() < 1e-9, "{}", r.cost_usd);

    // Each target got the request under its own model name, with the default max_tokens.
    let sent = backup.last().unwrap();
    assert_eq!(sent.body["model"], "gpt-b");
    assert_eq!(sent.body["max_tokens"], 4096);
    assert_eq!(sent.body["messages"][0], json!({"role": "user", "content": "hello"}));
    assert_eq!(sent.header("authorization"), "Bearer sk-test");
    assert_eq!(primary.last().unwrap().body["model"], "gpt-p");

    let usage = s.usage(vec![pb::UsageDimension::Provider], 1).await;
    let total = usage.total.unwrap();
    assert_eq!(total.failed_requests, 0);
    assert_eq!(total.usage.as_ref().unwrap().input_tokens, 1_000_000);
    assert_eq!(total.usage.as_ref().unwrap().output_tokens, 500_000);
    assert!((total.cost_usd - 2.0).abs() < 1e-9);
    assert_eq!(usage.rows.len(), 1);
    assert_eq!(usage.rows[0].provider, "backup");
    s.app.stop().await;
}

#[tokio::test]
async fn an_open_breaker_and_a_retry_after_skip_their_target_without_a_call() {
    let (primary, backup) = fakes().await;
    primary.always(CHAT, error(500, "server_error"));
    backup.always(CHAT, Reply::ok(answer("ok", 10, 2)));
    let mut s = start(config(&primary, &backup)).await;

    for _ in 0..2 {
        assert_eq!(s.generate(request("hi")).await.unwrap().provider, "backup");
    }
    assert_eq!(primary.requests().len(), 2);
    assert_eq!(s.target_state("primary").await.breaker, pb::BreakerState::Open as i32);
    // The breaker opened after two failures: the primary is skipped, not called.
    let r = s.generate(request("hi")).await.unwrap();
    assert_eq!(r.provider, "backup");
    assert!(r.attempts[0].skipped, "{:?}", r.attempts);
    assert!(r.attempts[0].error.contains("circuit open"), "{:?}", r.attempts);
    assert_eq!(primary.requests().len(), 2, "an open target must not be called");

    // A 429 with Retry-After on the backup: it is left alone for that long,
    // and with every target unavailable the caller gets RESOURCE_EXHAUSTED
    // with a retry delay instead of a hammering.
    backup.push(CHAT, error(429, "rate_limit_exceeded").with_header("retry-after", "30"));
    let refused = s.generate(request("hi")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let calls = backup.requests().len();
    let again = s.generate(request("hi")).await.unwrap_err();
    assert_eq!(again.code(), Code::ResourceExhausted, "{again:?}");
    assert!(again.message().contains("cooling down"), "{again:?}");
    let retry = again
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .unwrap();
    assert!(retry > Duration::from_secs(20), "{retry:?}");
    assert_eq!(
        backup.requests().len(),
        calls,
        "a cooling-down target must not be called"
    );
    let state = s.target_state("backup").await;
    let left = state.cooling_down.unwrap();
    assert!(left.seconds > 20 && left.seconds <= 30, "{left:?}");
    s.app.stop().await;
}

/// The first chunk of tool call `index`: its id and name (and maybe arguments).
fn call_start(index: u32, id: &str, name: &str, arguments: &str) -> (&'static str, Value) {
    chunk(
        json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": arguments}}]}),
        Value::Null,
    )
}

/// A later chunk of tool call `index`: only an argument fragment.
fn call_arguments(index: u32, fragment: &str) -> (&'static str, Value) {
    chunk(
        json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}),
        Value::Null,
    )
}

fn chunk(delta: Value, finish: Value) -> (&'static str, Value) {
    (
        "",
        json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}),
    )
}

#[tokio::test]
async fn a_stream_carries_text_tool_calls_and_usage_and_a_cancelled_one_is_billed() {
    let (primary, backup) = fakes().await;
    let mut frames = sse_frames([
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(json!({"content": "Let me "}), Value::Null),
        chunk(json!({"content": "check."}), Value::Null),
        call_start(0, "call_1", "weather", ""),
        call_arguments(0, "{\"city\":"),
        call_arguments(0, "\"Oslo\"}"),
        chunk(json!({}), json!("tool_calls")),
        (
            "",
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                   "usage": {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000, "total_tokens": 2_000_000,
                             "prompt_tokens_details": {"cached_tokens": 400_000}}}),
        ),
    ]);
    frames.push("data: [DONE]\n\n".into());
    primary.push(CHAT, Reply::sse(frames));
    let mut s = start(config(&primary, &backup)).await;

    let mut stream =
        s.ai.generate_stream(with_bearer(request("weather in Oslo?"), &s.token))
            .await
            .unwrap()
            .into_inner();
    let mut messages = Vec::new();
    while let Some(m) = stream.next().await {
        messages.push(m.unwrap());
    }
    assert_eq!(messages[0].provider, "primary");
    let text: String = messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(text, "Let me check.");
    let calls: Vec<&pb::ToolCallDelta> = messages.iter().flat_map(|m| &m.tool_calls).collect();
    assert_eq!(calls[0].id, "call_1");
    assert_eq!(calls[0].name, "weather");
    assert!(calls.iter().all(|c| c.index == 0));
    let args: String = calls.iter().map(|c| c.arguments.as_str()).collect();
    assert_eq!(args, "{\"city\":\"Oslo\"}");
    let last = messages.last().unwrap();
    let finish = messages.iter().find(|m| m.finish_reason != 0).unwrap();
    assert_eq!(finish.finish_reason, pb::FinishReason::ToolCalls as i32);
    let usage = last.usage.unwrap();
    assert_eq!(
        (usage.input_tokens, usage.output_tokens, usage.cached_input_tokens),
        (1_000_000, 1_000_000, 400_000)
    );
    // 0.6M × $10 + 0.4M cached × $5 + 1M × $20.
    assert!((last.cost_usd - 28.0).abs() < 1e-9, "{}", last.cost_usd);
    // Upstream was asked for usage although the caller did not ask.
    assert_eq!(primary.last().unwrap().body["stream_options"]["include_usage"], true);
    let before = s.usage(vec![], 1).await.total.unwrap();

    // A stream the caller abandons after two deltas: the upstream never
    // sent its usage, yet the call is recorded with what was produced.
    primary.push(
        CHAT,
        Reply::Sse {
            chunks: sse_frames([
                chunk(json!({"content": "word ".repeat(40)}), Value::Null),
                chunk(json!({"content": "more ".repeat(40)}), Value::Null),
            ]),
            gap: Duration::ZERO,
            hang_after: true,
        },
    );
    let mut stream =
        s.ai.generate_stream(with_bearer(request("write a long story"), &s.token))
            .await
            .unwrap()
            .into_inner();
    let mut got = 0;
    while got < 2 {
        let m = stream.next().await.unwrap().unwrap();
        if !m.text.is_empty() {
            got += 1;
        }
    }
    drop(stream);
    let after = s.usage(vec![], 2).await.total.unwrap();
    let billed = after.usage.unwrap().output_tokens - before.usage.unwrap().output_tokens;
    assert!(
        billed >= 80,
        "a cancelled stream must be billed for its ~100 produced tokens, got {billed}"
    );
    assert!(after.cost_usd > before.cost_usd);
    s.app.stop().await;
}

#[tokio::test]
async fn bad_input_is_named_and_reaches_no_provider() {
    let (primary, backup) = fakes().await;
    let mut s = start(config(&primary, &backup)).await;

    let mut no_role = request("x");
    no_role.messages[0].role = 0;
    let e = s.generate(no_role).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(violated_field(&e), "messages[0].role");
    let mut hot = request("x");
    hot.temperature = Some(3.0);
    assert_eq!(violated_field(&s.generate(hot).await.unwrap_err()), "temperature");
    let unknown = pb::GenerateRequest {
        model: "nope".into(),
        ..request("x")
    };
    assert_eq!(s.generate(unknown).await.unwrap_err().code(), Code::NotFound);

    let r = s
        .post(
            "/v1/ai:generate",
            &json!({"model": "chat", "messages": [{"role": "ROLE_USER", "content": [{"text": "x"}]}], "topP": 1.5}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body.to_string().contains("top_p"), "{body}");

    // The OpenAI-compatible surface answers in OpenAI's error shape.
    let r = s
        .post("/v1/chat/completions", &json!({"model": "chat", "messages": "hello"}))
        .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["param"], "messages", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let r = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "chat", "messages": [{"role": "user", "content": "x"}], "temperature": 5}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["param"], "temperature", "{body}");
    let r = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(r.status(), 404);
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", s.app.http))
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the OpenAI surface is authenticated like the rest");

    assert!(primary.requests().is_empty() && backup.requests().is_empty());
    s.app.stop().await;
}

#[tokio::test]
async fn the_official_openai_python_sdk_works_unchanged() {
    let Some(python) = backend_url(Backend::Python, "the_official_openai_python_sdk_works_unchanged").unwrap() else {
        return;
    };
    let (primary, backup) = fakes().await;
    // In the order the script calls.
    primary.push(CHAT, Reply::ok(answer("Hello from Plinth", 9, 4)));
    let mut frames = sse_frames([
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(json!({"content": "one "}), Value::Null),
        chunk(json!({"content": "two"}), Value::Null),
        chunk(json!({}), json!("stop")),
        (
            "",
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                   "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}),
        ),
    ]);
    frames.push("data: [DONE]\n\n".into());
    primary.push(CHAT, Reply::sse(frames));
    let mut frames = sse_frames([
        call_start(0, "call_a", "lookup", ""),
        call_arguments(0, "{\"q\":"),
        call_arguments(0, "\"rust\"}"),
        call_start(1, "call_b", "lookup", "{\"q\":\"go\"}"),
        chunk(json!({}), json!("tool_calls")),
    ]);
    frames.push("data: [DONE]\n\n".into());
    primary.push(CHAT, Reply::sse(frames));
    // Out of order on purpose: the index decides.
    primary.push(
        "/v1/embeddings",
        Reply::ok(
            json!({"object": "list", "model": "emb", "usage": {"prompt_tokens": 4, "total_tokens": 4},
            "data": [{"object": "embedding", "index": 1, "embedding": [0.5, -1.0, 0.25]},
                     {"object": "embedding", "index": 0, "embedding": [1.0, 2.0, 3.0]}]}),
        ),
    );
    primary.push(
        "/v1/embeddings",
        Reply::ok(
            json!({"object": "list", "model": "emb", "usage": {"prompt_tokens": 2, "total_tokens": 2},
            "data": [{"object": "embedding", "index": 0, "embedding": [1.0, 2.0, 3.0]}]}),
        ),
    );
    let s = start(config(&primary, &backup)).await;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_sdk.py");
    // Off the runtime's thread: the app under test is served by this runtime.
    let (base, token) = (format!("http://{}/v1", s.app.http), s.token.clone());
    plinth_tests::run_python(python, script, vec![base, token])
        .await
        .unwrap();
    // The script's streamed call asked for usage; upstream always is.
    let streamed = &primary.requests()[1];
    assert_eq!(streamed.body["stream"], true);
    assert_eq!(streamed.body["messages"][0]["role"], "system");
    s.app.stop().await;
}

#[tokio::test]
async fn rate_limits_reserve_up_front_settle_to_use_and_release_on_failure() {
    let (primary, backup) = fakes().await;
    let mut config = config(&primary, &backup);
    // Each call reserves its prompt estimate plus max_tokens (4,096 by
    // default): two at once fit in 10,000, three do not.
    config.ai.caller_tokens_per_minute = 10_000;
    config.ai.models[0].targets[0].requests_per_minute = Some(2);
    primary.always(CHAT, Reply::ok(answer("p", 10, 2)));
    backup.always(CHAT, Reply::ok(answer("b", 10, 2)));
    let mut s = start(config).await;

    // Settled to 12 tokens each, five calls in a row fit easily; the
    // primary takes two a minute, then is skipped (not called) for the backup.
    for i in 0..5 {
        let r = s.generate(request("hi")).await.unwrap();
        if i < 2 {
            assert_eq!(r.provider, "primary");
        } else {
            assert_eq!(r.provider, "backup", "{r:?}");
            assert!(
                r.attempts[0].skipped && r.attempts[0].error.contains("requests per minute"),
                "{r:?}"
            );
        }
    }
    assert_eq!(primary.requests().len(), 2);

    // Failures give their reservation back: three failed calls in a row
    // would have held 12,000 tokens.
    backup.push(CHAT, error(400, "invalid_request_error"));
    backup.push(CHAT, error(400, "invalid_request_error"));
    backup.push(CHAT, error(400, "invalid_request_error"));
    for _ in 0..3 {
        assert!(s.generate(request("hi")).await.is_err());
    }
    assert_eq!(s.generate(request("hi")).await.unwrap().provider, "backup");

    // What calls really use is what counts, also when a busy target was
    // skipped on the way (the skip must not hand back the caller's
    // reservation): three calls of 3,500 tokens each pass, then the caller's
    // minute is used up and the next is refused before any provider is
    // asked, with when to retry.
    for _ in 0..3 {
        backup.push(CHAT, Reply::ok(answer("long", 3_000, 500)));
    }
    let small = || pb::GenerateRequest {
        max_tokens: Some(100),
        ..request("hi")
    };
    for _ in 0..3 {
        let r = s.generate(small()).await.unwrap();
        assert!(r.attempts[0].skipped, "{r:?}");
    }
    let calls = backup.requests().len();
    let e = s.generate(small()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("tokens per minute"), "{e:?}");
    assert!(e.get_error_details().retry_info().is_some());
    assert_eq!(backup.requests().len(), calls);
    s.app.stop().await;
}

#[tokio::test]
async fn a_budget_refuses_once_spent_and_stays_spent_across_a_restart() {
    let (primary, backup) = fakes().await;
    // $10 in, $20 out per million tokens on the primary; 100 + 100 tokens = $0.003 a call.
    primary.always(CHAT, Reply::ok(answer("p", 100, 100)));
    let mut config = config(&primary, &backup);
    let s = start(config.clone()).await;
    let created = plinth::auth::v1::auth_service_client::AuthServiceClient::new(s.app.channel().await.unwrap())
        .create_api_key(with_bearer(
            plinth::auth::v1::CreateApiKeyRequest {
                display_name: "budgeted".into(),
                scopes: vec![],
                expire_time: None,
            },
            &s.token,
        ))
        .await
        .unwrap()
        .into_inner();
    let (key_id, secret) = (created.api_key.unwrap().id, created.secret);
    s.app.stop_keeping_data().await;

    config.ai.budgets = vec![plinth_runtime::config::AiBudget {
        tenant: None,
        api_key: Some(key_id.clone()),
        usd: 0.01,
        period: "month".into(),
    }];
    config.ai.models[0].targets.truncate(1);
    let call = |max: i32| pb::GenerateRequest {
        max_tokens: Some(max),
        ..request("hi")
    };
    let app = TestApp::spawn(config.clone()).await.unwrap();
    let mut ai = AiServiceClient::new(app.channel().await.unwrap());
    // Each call reserves (prompt + 100) × $20/M ≈ $0.0022 and settles to $0.003.
    for _ in 0..3 {
        ai.generate(with_bearer(call(100), &secret)).await.unwrap();
    }
    let e = ai.generate(with_bearer(call(100), &secret)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("budget"), "{e:?}");
    assert_eq!(primary.requests().len(), 3, "a refused call reaches no provider");
    // Other callers are not limited by this key's budget.
    let admin = access_token(&mut app.auth().await.unwrap(), ADMIN_EMAIL, ADMIN_PASSWORD)
        .await
        .unwrap();
    ai.generate(with_bearer(call(100), &admin)).await.unwrap();
    app.stop_keeping_data().await;

    // A restart starts with an empty in-process counter: it is seeded from
    // the recorded usage, so the spent budget stays spent.
    let app = TestApp::spawn(config).await.unwrap();
    let mut ai = AiServiceClient::new(app.channel().await.unwrap());
    let e = ai.generate(with_bearer(call(100), &secret)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(primary.requests().len(), 4);
    app.stop().await;
}

#[tokio::test]
async fn identical_deterministic_requests_are_answered_from_the_cache() {
    let (primary, backup) = fakes().await;
    primary.always(CHAT, Reply::ok(answer("cached answer", 30, 3)));
    let mut s = start(config(&primary, &backup)).await;
    let zero = pb::GenerateRequest {
        temperature: Some(0.0),
        ..request("what is 2+2?")
    };

    let first = s.generate(zero.clone()).await.unwrap();
    assert!(!first.cached);
    let second = s.generate(zero.clone()).await.unwrap();
    assert!(second.cached, "{second:?}");
    assert_eq!(second.message, first.message);
    assert_eq!(second.provider, "primary");
    assert_eq!(second.cost_usd, 0.0);
    assert_eq!(primary.requests().len(), 1, "a cache hit calls no provider");

    // Another question, a bypass, or a sampled request all go upstream.
    let other = pb::GenerateRequest {
        temperature: Some(0.0),
        ..request("what is 3+3?")
    };
    assert!(!s.generate(other).await.unwrap().cached);
    let bypass = pb::GenerateRequest {
        cache: pb::CachePolicy::Bypass as i32,
        ..zero.clone()
    };
    assert!(!s.generate(bypass).await.unwrap().cached);
    let sampled = pb::GenerateRequest {
        temperature: Some(0.7),
        ..request("what is 2+2?")
    };
    assert!(!s.generate(sampled.clone()).await.unwrap().cached);
    assert!(!s.generate(sampled).await.unwrap().cached);
    assert_eq!(primary.requests().len(), 5);

    let total = s.usage(vec![], 6).await.total.unwrap();
    assert_eq!(total.cache_hits, 1);
    assert_eq!(total.requests, 6);

    // Over the OpenAI surface the cache is asked for with a header.
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", s.app.http);
    let body = json!({"model": "chat", "temperature": 0.9, "messages": [{"role": "user", "content": "a haiku"}]});
    let ask = |cache: &'static str| {
        http.post(&url)
            .bearer_auth(&s.token)
            .header("x-plinth-cache", cache)
            .json(&body)
            .send()
    };
    let mut seen = Vec::new();
    for _ in 0..2 {
        let r = ask("use").await.unwrap();
        assert_eq!(r.status(), 200);
        seen.push(r.headers()["x-plinth-cache"].to_str().unwrap().to_owned());
    }
    assert_eq!(seen, ["miss", "hit"]);
    assert_eq!(primary.requests().len(), 6);
    let bad = ask("sometimes").await.unwrap();
    assert_eq!(bad.status(), 400);
    let e: Value = bad.json().await.unwrap();
    assert_eq!(e["error"]["param"], "x-plinth-cache");
    s.app.stop().await;
}

#[tokio::test]
async fn concurrent_embeddings_are_sent_as_one_request_and_split_back() {
    let (primary, backup) = fakes().await;
    primary.push(
        "/v1/embeddings",
        Reply::ok(json!({"object": "list", "model": "emb", "usage": {"prompt_tokens": 40, "total_tokens": 40},
            "data": (0..4).map(|i| json!({"object": "embedding", "index": i, "embedding": [f64::from(i), 0.5]})).collect::<Vec<_>>()})),
    );
    let mut config = config(&primary, &backup);
    config.ai.embed_batch_window_ms = 200;
    let s = start(config).await;
    let call = |inputs: &[&str]| {
        let mut ai = s.ai.clone();
        let request = with_bearer(
            pb::EmbedRequest {
                model: "embed".into(),
                inputs: inputs.iter().map(|t| (*t).to_owned()).collect(),
                ..Default::default()
            },
            &s.token,
        );
        async move { ai.embed(request).await.map(tonic::Response::into_inner) }
    };
    let (one, two, three) = tokio::join!(call(&["alpha"]), call(&["beta", "gamma"]), call(&["delta"]));
    let requests = primary.requests();
    assert_eq!(requests.len(), 1, "three calls, one upstream request");
    let sent: Vec<String> = requests[0].body["input"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sent.len(), 4);
    for (answer, texts) in [
        (one, vec!["alpha"]),
        (two, vec!["beta", "gamma"]),
        (three, vec!["delta"]),
    ] {
        let answer = answer.unwrap();
        assert_eq!(answer.embeddings.len(), texts.len());
        for (e, text) in answer.embeddings.iter().zip(texts) {
            let position = sent.iter().position(|t| t == text).unwrap();
            assert_eq!(
                e.values,
                vec![position as f32, 0.5],
                "{text} got another input's vector"
            );
        }
        assert!(answer.usage.unwrap().input_tokens > 0);
    }
    s.app.stop().await;
}

/// Three callers whose embeddings went out as one request that failed: one
/// upstream failure, so one count against the target's breaker (it opens at
/// two), not three.
#[tokio::test]
async fn a_failed_embedding_batch_counts_once_against_its_target() {
    let (primary, backup) = fakes().await;
    primary.push("/v1/embeddings", error(500, "server_error"));
    let mut config = config(&primary, &backup);
    config.ai.embed_batch_window_ms = 200;
    let mut s = start(config).await;
    let call = |text: &str| {
        let mut ai = s.ai.clone();
        let request = with_bearer(
            pb::EmbedRequest {
                model: "embed".into(),
                inputs: vec![text.to_owned()],
                ..Default::default()
            },
            &s.token,
        );
        async move { ai.embed(request).await }
    };
    let (one, two, three) = tokio::join!(call("alpha"), call("beta"), call("gamma"));
    assert_eq!(primary.requests().len(), 1, "three calls, one upstream request");
    for failed in [one, two, three] {
        let status = failed.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    assert_eq!(
        s.target_state_of("embed", "primary").await.breaker,
        pb::BreakerState::Closed as i32,
        "one failed request is one failure"
    );
    s.app.stop().await;
}

#[tokio::test]
async fn thinking_blocks_survive_a_tool_turn_through_the_openai_surface() {
    let (primary, backup) = fakes().await;
    let claude = FakeUpstream::start().await.unwrap();
    let mut config = config(&primary, &backup);
    config.ai.providers.insert(
        "claude".into(),
        AiProvider {
            base_url: Some(claude.url()),
            ..provider(&claude, "anthropic")
        },
    );
    config.ai.models.push(AiModel {
        name: "thinker".into(),
        targets: vec![target("claude", "claude-sonnet-4-5")],
    });
    claude.push(
        "/v1/messages",
        Reply::ok(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [
                {"type": "thinking", "thinking": "Need the weather tool.", "signature": "SIG-1"},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
            ],
            "stop_reason": "tool_use", "usage": {"input_tokens": 20, "output_tokens": 15},
        })),
    );
    claude.push(
        "/v1/messages",
        Reply::ok(json!({
            "id": "msg_2", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "It is 3°C in Oslo."}],
            "stop_reason": "end_turn", "usage": {"input_tokens": 60, "output_tokens": 9},
        })),
    );
    let s = start(config).await;
    let tools = json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let mut messages = vec![json!({"role": "user", "content": "Weather in Oslo?"})];
    let first: Value = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "thinker", "messages": messages, "tools": tools, "reasoning_effort": "low"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let answer = first["choices"][0]["message"].clone();
    assert_eq!(
        answer["thinking_blocks"],
        json!([{"type": "thinking", "thinking": "Need the weather tool.", "signature": "SIG-1"}]),
        "{first}"
    );
    assert_eq!(first["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(claude.last().unwrap().body["thinking"]["budget_tokens"], 1024);

    // The client appends the assistant message as it came, then the tool's answer.
    messages.push(answer);
    messages.push(json!({"role": "tool", "tool_call_id": "toolu_1", "content": "3°C"}));
    let second: Value = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "thinker", "messages": messages, "tools": tools, "reasoning_effort": "low"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        second["choices"][0]["message"]["content"], "It is 3°C in Oslo.",
        "{second}"
    );
    let sent = claude.last().unwrap().body;
    assert_eq!(
        sent["messages"][1]["content"][0],
        json!({"type": "thinking", "thinking": "Need the weather tool.", "signature": "SIG-1"}),
        "{sent}"
    );
    assert_eq!(sent["messages"][1]["content"][1]["type"], "tool_use");
    assert_eq!(sent["messages"][2]["content"][0]["type"], "tool_result");
    s.app.stop().await;
}

/// Fakes that always answer, and [`config`] with the primary's key read
/// from the config secret at `address`.
async fn keyed_by_secret(address: &str) -> (FakeUpstream, FakeUpstream, Config) {
    let (primary, backup) = fakes().await;
    primary.always(CHAT, Reply::ok(answer("from primary", 3, 2)));
    backup.always(CHAT, Reply::ok(answer("from backup", 3, 2)));
    let mut config = config(&primary, &backup);
    let p = config.ai.providers.get_mut("primary").unwrap();
    p.api_key = None;
    p.api_key_secret = Some(address.to_owned());
    (primary, backup, config)
}

/// Asks `chat` something new each time (equal requests would be answered
/// from the response cache) until the primary is sent `key`.
async fn until_primary_is_sent(
    ai: &mut AiServiceClient<Channel>,
    token: &str,
    primary: &FakeUpstream,
    key: &str,
    asked: &mut u32,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        *asked += 1;
        let r = ai
            .generate(with_bearer(request(&format!("question {asked}")), token))
            .await
            .unwrap()
            .into_inner();
        if r.provider == "primary" && primary.last().unwrap().header("authorization") == format!("Bearer {key}") {
            return;
        }
        assert!(Instant::now() < deadline, "{key} was never used: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A provider key kept as a config secret (`api_key_secret`): while it is
/// not set, or set as a plain value, that provider is skipped without a
/// request and the attempt names the secret; once set, the next call
/// carries it, and after a rotation the next call carries the new key, with
/// no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_keys_follow_config_secrets_without_a_restart() {
    let namespace = fresh_name("ai-keys");
    let address = format!("{namespace}/prod/providers/openai");
    let (primary, _backup, config) = keyed_by_secret(&address).await;
    let mut s = start(config).await;
    let mut keys = ConfigSession::with_token(&s.app, &s.token).await.unwrap();
    keys.create_env(&namespace).await.unwrap();

    let r = s.generate(request("before the key is set")).await.unwrap();
    assert_eq!(r.provider, "backup");
    assert!(r.attempts[0].error.contains(&address), "{:?}", r.attempts);
    keys.set("providers/openai", text("sk-plain")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = s.generate(request("with a plain value")).await.unwrap();
    assert_eq!(r.provider, "backup", "a plain value is never sent as a key");
    assert!(
        primary.requests().is_empty(),
        "nothing reaches a provider without its key"
    );

    let mut asked = 0;
    for key in ["sk-first", "sk-rotated"] {
        keys.set("providers/openai", secret(key)).await.unwrap();
        until_primary_is_sent(&mut s.ai, &s.token, &primary, key, &mut asked).await;
    }

    // Each value the ai component opened is in the audit log as a reveal by it.
    let mut audit = AuditServiceClient::new(s.app.channel().await.unwrap());
    let reveals = apb::ListEventsRequest {
        filter: Some(apb::EventFilter {
            action_prefix: "config.secrets.revealed".into(),
            resource_name: format!("{namespace}/prod"),
            ..Default::default()
        }),
        oldest_first: true,
        ..Default::default()
    };
    let entries = wait_for_entries(&mut audit, &s.token, reveals, 2, Duration::from_secs(15))
        .await
        .unwrap();
    for entry in &entries {
        let event = entry.event.as_ref().unwrap();
        assert_eq!(event.actor.as_ref().unwrap().id, "component:ai");
    }

    // A deleted environment takes its keys with it.
    keys.client
        .delete_environment(keys.req(plinth::config::v1::DeleteEnvironmentRequest {
            namespace: namespace.clone(),
            environment: "prod".into(),
            etag: String::new(),
        }))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        asked += 1;
        let r = s.generate(request(&format!("question {asked}"))).await.unwrap();
        if r.provider == "backup" {
            assert!(r.attempts[0].error.contains(&address), "{:?}", r.attempts);
            break;
        }
        assert!(Instant::now() < deadline, "the deleted key is still used");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.app.stop().await;
}

/// An ai process without the config component (`--only ai`, as the Helm
/// chart deploys it) reads `api_key_secret` from the config service of
/// another process (`PLINTH_AI__SECRETS_URL`) with an API key scoped to
/// `config.secrets.read`, read from a file, and follows its rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_ai_process_reads_provider_keys_from_the_config_service() {
    let mut keeper = with_admin(TestApp::config());
    keeper.only = "auth,config".parse().unwrap();
    let keeper = TestApp::spawn(keeper).await.unwrap();
    let mut auth = keeper.auth().await.unwrap();
    let admin = access_token(&mut auth, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    let namespace = fresh_name("ai-remote");
    let mut keys = ConfigSession::with_token(&keeper, &admin).await.unwrap();
    keys.create_env(&namespace).await.unwrap();
    keys.set("openai", secret("sk-remote-1")).await.unwrap();
    let api_key = auth
        .create_api_key(with_bearer(
            plinth::auth::v1::CreateApiKeyRequest {
                display_name: "ai reads provider keys".into(),
                scopes: vec!["config.secrets.read".into(), "config.values.read".into()],
                expire_time: None,
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;

    let (primary, _backup, mut config) = keyed_by_secret(&format!("{namespace}/prod/openai")).await;
    config.only = "ai".parse().unwrap();
    config.auth.url = Some(format!("http://{}", keeper.grpc));
    config.ai.secrets_url = Some(format!("http://{}", keeper.grpc));
    let key_file = config.data_dir.join("secrets-api-key");
    std::fs::create_dir_all(key_file.parent().unwrap()).unwrap();
    std::fs::write(&key_file, format!("{api_key}\n")).unwrap();
    config.ai.secrets_api_key_file = Some(key_file);
    let app = TestApp::spawn(config).await.unwrap();
    let mut ai = AiServiceClient::new(app.channel().await.unwrap());

    let mut asked = 0;
    until_primary_is_sent(&mut ai, &admin, &primary, "sk-remote-1", &mut asked).await;
    keys.set("openai", secret("sk-remote-2")).await.unwrap();
    until_primary_is_sent(&mut ai, &admin, &primary, "sk-remote-2", &mut asked).await;
    app.stop().await;
    keeper.stop().await;
}
