//! Gateway benchmark: the same unary RPC of the echo service called directly
//! over gRPC and through the gateway over HTTP/1.1 JSON, on loopback, at the
//! same concurrency (small, 1 KiB and 1 MiB bodies), then a server stream's
//! messages/s both ways. The gateway dials the echo server over gRPC (the
//! split shape) and, separately, calls it in-process (the all-in-one shape).
//! Client, gateway and server share this machine's cores.
//!
//! `cargo run --release -p plinth-bench --bin gateway-bench -- --seconds 10 --concurrency 16`

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use plinth_bench::{Report, arg, closed_loop};
use plinth_gateway::testing::{ECHO_DESCRIPTOR_SET, EchoServer};
use plinth_gateway::{DynamicCodec, Gateway, GatewayOptions, Upstreams};
use plinth_runtime::Tasks;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, Value};
use tokio::net::TcpListener;
use tonic::transport::Channel;

fn out(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

async fn serve_gateway(tasks: &Tasks, upstreams: Upstreams) -> anyhow::Result<String> {
    let gateway = Gateway::new(
        ECHO_DESCRIPTOR_SET,
        upstreams,
        GatewayOptions {
            body_limit: 4 * 1024 * 1024,
            ..GatewayOptions::default()
        },
    )?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = gateway.router().into_make_service_with_connect_info::<SocketAddr>();
    tasks.spawn("gateway", async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}"))
}

fn echo_message(desc: &MessageDescriptor, size: usize) -> DynamicMessage {
    let mut m = DynamicMessage::new(desc.clone());
    m.set_field_by_name("id", Value::String("x".repeat(size.max(1))));
    m.set_field_by_name("count", Value::I64(42));
    m
}

async fn direct(
    channel: Channel,
    desc: MessageDescriptor,
    size: usize,
    concurrency: usize,
    duration: Duration,
) -> Report {
    let message = echo_message(&desc, size);
    closed_loop(
        &format!("direct gRPC      {}", label(size)),
        concurrency,
        duration,
        move |_, _| {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            let message = message.clone();
            let desc = desc.clone();
            async move {
                grpc.ready().await.map_err(|e| e.to_string())?;
                grpc.unary(
                    tonic::Request::new(message),
                    http::uri::PathAndQuery::from_static("/plinth.gatewaytest.v1.EchoService/Echo"),
                    DynamicCodec::new(desc),
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
            }
        },
    )
    .await
}

async fn through(name: &str, base: &str, size: usize, concurrency: usize, duration: Duration) -> Report {
    let http = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap_or_default();
    let body =
        serde_json::to_vec(&serde_json::json!({"id": "x".repeat(size.max(1)), "count": "42"})).unwrap_or_default();
    let url = format!("{base}/v1/echo");
    closed_loop(
        &format!("{name} {}", label(size)),
        concurrency,
        duration,
        move |_, _| {
            let req = http
                .post(url.clone())
                .header("content-type", "application/json")
                .body(body.clone());
            async move {
                let resp = req.send().await.map_err(|e| e.to_string())?;
                if !resp.status().is_success() {
                    return Err(format!("HTTP {}", resp.status()));
                }
                resp.bytes().await.map(|_| ()).map_err(|e| e.to_string())
            }
        },
    )
    .await
}

fn label(size: usize) -> &'static str {
    match size {
        0..=64 => "small",
        65..=2048 => "1 KiB",
        _ => "1 MiB",
    }
}

fn compare(direct: &Report, gateway: &Report) {
    let added_p50 = gateway.quantile(0.5).saturating_sub(direct.quantile(0.5));
    let added_p99 = gateway.quantile(0.99).saturating_sub(direct.quantile(0.99));
    out(&format!(
        "  → gateway keeps {:.0}% of direct throughput; adds {:.0} µs at p50, {:.0} µs at p99",
        100.0 * gateway.rate() / direct.rate().max(f64::MIN_POSITIVE),
        added_p50.as_secs_f64() * 1e6,
        added_p99.as_secs_f64() * 1e6,
    ));
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = arg("--seconds", 10);
    let concurrency: usize = arg("--concurrency", 16);
    let duration = Duration::from_secs(seconds);
    let tasks = Tasks::new();
    let echo = EchoServer::new()?;
    let pool = DescriptorPool::decode(ECHO_DESCRIPTOR_SET)?;
    let desc = pool
        .get_message_by_name("plinth.gatewaytest.v1.EchoMessage")
        .ok_or_else(|| anyhow::anyhow!("EchoMessage missing"))?;

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let grpc_addr = listener.local_addr()?;
    let server = tonic::transport::Server::builder()
        .add_service(echo.clone())
        .serve_with_incoming(plinth_runtime::server::incoming(listener));
    tasks.spawn("echo-grpc", server);
    let url = format!("http://{grpc_addr}");
    let remote = serve_gateway(&tasks, Upstreams::new().remote("gatewaytest", &url)?).await?;
    let local = serve_gateway(&tasks, Upstreams::new().in_process(echo.clone(), &["gatewaytest"])).await?;
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .tcp_nodelay(true)
        .connect()
        .await?;

    // One caller at a time: the latency the gateway adds, without queueing.
    out(&format!("concurrency 1, {seconds} s per run, loopback"));
    let d = direct(channel.clone(), desc.clone(), 8, 1, duration).await;
    out(&d.line());
    let g = through("gateway → gRPC   ", &remote, 8, 1, duration).await;
    out(&g.line());
    compare(&d, &g);
    let l = through("gateway in-proc  ", &local, 8, 1, duration).await;
    out(&l.line());
    compare(&d, &l);

    out(&format!(
        "concurrency {concurrency}, {seconds} s per run, loopback, 2 cores shared by client and servers"
    ));
    for size in [8usize, 1024, 1024 * 1024] {
        let d = direct(channel.clone(), desc.clone(), size, concurrency, duration).await;
        out(&d.line());
        let g = through("gateway → gRPC   ", &remote, size, concurrency, duration).await;
        out(&g.line());
        compare(&d, &g);
        let l = through("gateway in-proc  ", &local, size, concurrency, duration).await;
        out(&l.line());
    }

    // Server stream: messages per second, direct and as NDJSON through the gateway.
    let count = 200_000;
    let stream_desc = pool
        .get_message_by_name("plinth.gatewaytest.v1.StreamRequest")
        .ok_or_else(|| anyhow::anyhow!("StreamRequest missing"))?;
    let mut request = DynamicMessage::new(stream_desc);
    request.set_field_by_name("count", Value::I32(count));
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await?;
    let started = Instant::now();
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(request),
            http::uri::PathAndQuery::from_static("/plinth.gatewaytest.v1.EchoService/Stream"),
            DynamicCodec::new(desc.clone()),
        )
        .await?
        .into_inner();
    let mut n = 0usize;
    while let Some(m) = stream.next().await {
        m?;
        n += 1;
    }
    out(&format!(
        "{:<44} {:>10.0} msg/s ({n} messages)",
        "stream direct gRPC",
        n as f64 / started.elapsed().as_secs_f64()
    ));
    for (name, base) in [
        ("stream gateway → gRPC (NDJSON)", &remote),
        ("stream gateway in-proc (NDJSON)", &local),
    ] {
        let http = reqwest::Client::builder().no_proxy().build()?;
        let started = Instant::now();
        let mut body = http
            .get(format!("{base}/v1/stream?count={count}"))
            .send()
            .await?
            .bytes_stream();
        let mut lines = 0usize;
        while let Some(chunk) = body.next().await {
            lines += chunk?.iter().filter(|b| **b == b'\n').count();
        }
        out(&format!(
            "{name:<44} {:>10.0} msg/s ({lines} messages)",
            lines as f64 / started.elapsed().as_secs_f64()
        ));
    }
    tasks.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
