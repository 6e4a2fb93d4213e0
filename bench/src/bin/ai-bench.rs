//! AI service benchmark: the latency Plinth adds in front of a provider.
//! A mock OpenAI-format upstream (its own process, answering after a fixed
//! delay) is called at fixed request rates directly, through Plinth's
//! OpenAI-compatible HTTP surface, and through gRPC `Generate`, each from
//! this process with an open loop (requests start on schedule whether or not
//! earlier ones finished, so queueing shows up in the percentiles). Added
//! latency is Plinth's percentile minus the direct one at the same rate.
//! Then a soak at one rate reports Plinth's memory before and after.
//! Mock, Plinth (all components by default, or `--only ai,auth,gateway`;
//! SQLite; usage recorded for every call, and with audit running, every
//! usage event appended to the audit log) and this load generator share
//! this machine's cores.
//!
//! `cargo run --release -p plinth-bench --bin ai-bench -- --rates 500,2000,5000 --seconds 10 --latency-ms 0 --soak-seconds 300`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use plinth::ai::v1 as pb;
use plinth::ai::v1::ai_service_client::AiServiceClient;
use plinth_bench::{Report, ServerChild, admin_token, arg, out, rss_kib, serve, server_config};
use plinth_runtime::config::{AiModel, AiProvider, AiSettings, AiTarget};
use tokio::sync::Mutex;

const ANSWER: &str = r#"{"id":"chatcmpl-b","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"The capital of France is Paris."},"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":8,"total_tokens":22}}"#;

fn body() -> serde_json::Value {
    serde_json::json!({"model": "bench", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32})
}

/// `--mock`: an OpenAI-format upstream answering after `--latency-ms`.
async fn mock(latency: Duration) -> anyhow::Result<()> {
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move || async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            ([(http::header::CONTENT_TYPE, "application/json")], ANSWER)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    out(&format!("grpc={}", listener.local_addr()?));
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let server = axum::serve(listener, app);
    tokio::select! {
        r = server => r?,
        _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                line.clear();
            }
        }) => {}
    }
    Ok(())
}

/// Runs `call` at `rate` per second for `duration`, open loop.
async fn open_loop<F, Fut>(name: &str, rate: u64, duration: Duration, call: F) -> Report
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let call = Arc::new(call);
    let latencies = Arc::new(Mutex::new(Vec::with_capacity((rate * duration.as_secs()) as usize)));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let total = rate * duration.as_secs();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let tasks = plinth_runtime::Tasks::new();
    let (lat, errs) = (latencies.clone(), errors.clone());
    // Paced by a thread sleeping to each start time: tokio's timers tick in
    // whole milliseconds, so pacing on them started requests in bursts (two
    // at once every millisecond at 2,000/s) rather than on schedule.
    let paced = tokio::task::spawn_blocking(move || {
        let mut handles = Vec::with_capacity(total as usize);
        for i in 0..total {
            let due = started + interval.mul_f64(i as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let (call, latencies, errors) = (call.clone(), lat.clone(), errs.clone());
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            handles.push(done_rx);
            tasks.spawn("bench-call", async move {
                let r = call().await;
                // Measured from when the request was due: lateness counts.
                let took = due.elapsed();
                match r {
                    Ok(()) => latencies.lock().await.push(took),
                    Err(e) => {
                        if errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
                            out(&format!("  first error: {e}"));
                        }
                    }
                }
                let _ = done_tx.send(());
                Ok::<(), String>(())
            });
        }
        handles
    })
    .await;
    let handles = match paced {
        Ok(handles) => handles,
        Err(e) => {
            out(&format!("  the pacing thread failed: {e}"));
            Vec::new()
        }
    };
    for h in handles {
        let _ = h.await;
    }
    let elapsed = started.elapsed();
    let l = std::mem::take(&mut *latencies.lock().await);
    let mut report = Report::from_latencies(name, l, elapsed);
    report.errors = errors.load(std::sync::atomic::Ordering::Relaxed);
    report
}

/// One OpenAI-format chat call to `url` with `bearer`, as an open-loop job.
fn chat_call(
    client: reqwest::Client,
    url: String,
    bearer: String,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>> + Send + Sync + 'static
{
    move || {
        let request = client.post(url.clone()).bearer_auth(&bearer).json(&body());
        Box::pin(async move {
            let r = request.send().await.map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                return Err(r.status().to_string());
            }
            r.bytes().await.map(|_| ()).map_err(|e| e.to_string())
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let latency = Duration::from_millis(arg("--latency-ms", 0));
    if std::env::args().any(|a| a == "--mock") {
        return mock(latency).await;
    }
    if std::env::args().any(|a| a == "--serve") {
        let upstream: String = arg("--upstream", String::new());
        let mut config = server_config("");
        config.only = arg("--only", "all".to_owned()).parse()?;
        config.ai = AiSettings {
            providers: [(
                "mock".to_owned(),
                AiProvider {
                    kind: "openai".into(),
                    base_url: Some(format!("http://{upstream}/v1")),
                    api_key: Some(secrecy::SecretString::from("sk-bench")),
                    api_key_file: None,
                    api_key_secret: None,
                    api_version: None,
                },
            )]
            .into(),
            models: vec![AiModel {
                name: "bench".into(),
                targets: vec![AiTarget {
                    provider: "mock".into(),
                    model: "m".into(),
                    weight: None,
                    tier: None,
                    requests_per_minute: None,
                    tokens_per_minute: None,
                }],
            }],
            ..AiSettings::default()
        };
        return serve(config).await;
    }
    let rates: String = arg("--rates", "500,2000,5000".to_owned());
    let rates: Vec<u64> = rates.split(',').filter_map(|r| r.trim().parse().ok()).collect();
    let seconds = Duration::from_secs(arg("--seconds", 10));
    let soak = Duration::from_secs(arg("--soak-seconds", 60));
    let soak_rate: u64 = arg("--soak-rate", 2000);

    let mock = ServerChild::start(&["--mock", "--latency-ms", &latency.as_millis().to_string()])?;
    let upstream = mock.field("grpc");
    let only: String = arg("--only", "all".to_owned());
    let plinth = ServerChild::start(&["--upstream", &upstream, "--only", &only])?;
    let pid = plinth.pid();
    let target = plinth.target();
    let token = admin_token(&target).await?;
    let grpc_addr: SocketAddr = plinth.field("grpc").parse()?;
    // The HTTP surface: plinthd's HTTP port is the gRPC port's neighbour in
    // the serve line; ask the server instead of guessing.
    let http = plinth.field("http");
    out(&format!(
        "mock upstream latency {} ms; plinth pid {pid} (components {only}, SQLite); rates {rates:?} for {}s each",
        latency.as_millis(),
        seconds.as_secs()
    ));
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(512)
        .build()?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let grpc_request = pb::GenerateRequest {
        model: "bench".into(),
        messages: vec![pb::Message {
            role: pb::Role::User as i32,
            content: vec![pb::ContentPart {
                part: Some(pb::content_part::Part::Text("What is the capital of France?".into())),
            }],
            ..Default::default()
        }],
        max_tokens: Some(32),
        ..Default::default()
    };
    // Warm connections and code paths.
    for _ in 0..200 {
        let _ = client
            .post(format!("http://{http}/v1/chat/completions"))
            .bearer_auth(&token)
            .json(&body())
            .send()
            .await?
            .bytes()
            .await;
    }
    out("rate req/s | path | ok | errors | p50 ms | p99 ms | added p50 ms | added p99 ms");
    for rate in &rates {
        let direct = open_loop(
            "direct",
            *rate,
            seconds,
            chat_call(
                client.clone(),
                format!("http://{upstream}/v1/chat/completions"),
                "sk-bench".into(),
            ),
        )
        .await;
        let via_http = open_loop(
            "plinth HTTP",
            *rate,
            seconds,
            chat_call(
                client.clone(),
                format!("http://{http}/v1/chat/completions"),
                token.clone(),
            ),
        )
        .await;
        let via_grpc = {
            let (channel, token, request) = (channel.clone(), token.clone(), grpc_request.clone());
            open_loop("plinth gRPC", *rate, seconds, move || {
                let mut ai = AiServiceClient::new(channel.clone());
                let request = plinth_tests::with_bearer(request.clone(), &token);
                async move { ai.generate(request).await.map(|_| ()).map_err(|e| e.to_string()) }
            })
            .await
        };
        let base = (direct.quantile(0.5), direct.quantile(0.99));
        for r in [&direct, &via_http, &via_grpc] {
            out(&format!(
                "{rate} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3}",
                r.name,
                r.ok,
                r.errors,
                ms(r.quantile(0.5)),
                ms(r.quantile(0.99)),
                ms(r.quantile(0.5)) - ms(base.0),
                ms(r.quantile(0.99)) - ms(base.1),
            ));
        }
    }
    let before = rss_kib(pid);
    // Plinth's memory every 30 s of the soak, to see whether it levels off.
    let sampler = plinth_runtime::Tasks::new();
    let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let (samples, token) = (samples.clone(), sampler.token());
        sampler.spawn("rss-sampler", async move {
            while plinth_runtime::tasks::pause(&token, Duration::from_secs(30)).await {
                if let Ok(mut s) = samples.lock() {
                    s.push(rss_kib(pid) / 1024);
                }
            }
            Ok::<(), std::convert::Infallible>(())
        });
    }
    let soaked = open_loop(
        "soak HTTP",
        soak_rate,
        soak,
        chat_call(
            client.clone(),
            format!("http://{http}/v1/chat/completions"),
            token.clone(),
        ),
    )
    .await;
    let after = rss_kib(pid);
    sampler.shutdown(Duration::from_secs(1)).await;
    out(&format!(
        "plinth RSS every 30 s of the soak (MiB): {:?}",
        samples.lock().map(|s| s.clone()).unwrap_or_default()
    ));
    out(&format!(
        "soak {soak_rate} req/s for {}s through HTTP: {} ok, {} errors, p50 {:.3} ms, p99 {:.3} ms; plinth RSS {} MiB before, {} MiB after",
        soak.as_secs(),
        soaked.ok,
        soaked.errors,
        ms(soaked.quantile(0.5)),
        ms(soaked.quantile(0.99)),
        before / 1024,
        after / 1024
    ));
    plinth.stop();
    mock.stop();
    Ok(())
}
