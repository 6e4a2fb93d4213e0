//! The `plinthd` binary as an operator meets it: starts with no set-up,
//! answers health and reflection for every component, serves `/metrics`,
//! exits cleanly on SIGTERM, and refuses a bad configuration in one line.

#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test harness helpers fail the test loudly"
)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

fn binary() -> PathBuf {
    std::env::var_os("NEXTEST_BIN_EXE_plinthd")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_plinthd")))
}

fn command(data_dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(binary());
    for (k, _) in std::env::vars() {
        if k.starts_with("PLINTH_") || k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("--listen").arg("127.0.0.1:0").arg("--data-dir").arg(data_dir);
    cmd
}

struct Running {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    dir: PathBuf,
}

impl Running {
    fn start(extra: &[&str]) -> Running {
        let dir = std::env::temp_dir().join(format!("plinthd-smoke-{}-{}", std::process::id(), rand_suffix()));
        let mut child = command(&dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut running = Running {
            child,
            grpc: ([0, 0, 0, 0], 0).into(),
            http: ([0, 0, 0, 0], 0).into(),
            lines,
            seen: vec![],
            dir,
        };
        let line = running.wait_for_log(|l| l.contains("plinthd listening"), Duration::from_secs(30));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        running.grpc = v["grpc_addr"].as_str().unwrap().parse().unwrap();
        running.http = v["http_addr"].as_str().unwrap().parse().unwrap();
        running
    }

    fn wait_for_log(&mut self, pred: impl Fn(&str) -> bool, within: Duration) -> String {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return l.clone();
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("log line not seen within {within:?}; seen: {:#?}", self.seen),
            }
        }
    }

    /// Sends SIGTERM and waits for the exit. Async, so the test's own gRPC
    /// connections keep running and can answer the server's GOAWAY.
    async fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let _ = std::fs::remove_dir_all(&self.dir);
                return (status, started.elapsed());
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "plinthd did not exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A failed assertion must not leave a server behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` expecting it to exit by itself within 20 s (it is killed otherwise).
fn output_within(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("plinthd kept running when it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

async fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn health(addr: SocketAddr, service: &str) -> Result<ServingStatus, tonic::Status> {
    let mut client = HealthClient::new(channel(addr).await);
    let resp = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(resp.into_inner().status())
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: plinth\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf.split(' ').nth(1).unwrap().parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn starts_with_no_setup_serves_health_reflection_metrics_and_stops_on_sigterm() {
    let mut app = Running::start(&[]);

    for component in [
        "",
        "gateway",
        "config",
        "queue",
        "audit",
        "ai",
        "auth",
        "plinth.auth.v1.AuthService",
        "plinth.backend.database",
    ] {
        assert_eq!(
            health(app.grpc, component).await.unwrap(),
            ServingStatus::Serving,
            "component `{component}`"
        );
    }
    let unknown = health(app.grpc, "billing").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // Reflection (v1) lists the services, so grpcurl works without protos.
    let mut reflection = ServerReflectionClient::new(channel(app.grpc).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{response:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "plinth.auth.v1.AuthService",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    // Older grpcurl versions speak v1alpha.
    let mut alpha =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(channel(app.grpc).await);
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses = alpha
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    assert!(
        format!("{response:?}").contains("grpc.health.v1.Health"),
        "{response:?}"
    );

    // A failing call is logged with its request id and the caller's trace id.
    let mut client = HealthClient::new(channel(app.grpc).await);
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: "billing".into(),
    });
    req.metadata_mut()
        .insert("x-request-id", "req-smoke-1".parse().unwrap());
    req.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    let err = client.check(req).await.unwrap_err();
    assert_eq!(
        err.metadata().get("x-request-id").unwrap(),
        "req-smoke-1",
        "the request id must be echoed"
    );
    let line = app.wait_for_log(|l| l.contains("req-smoke-1"), Duration::from_secs(5));
    assert!(
        line.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
        "trace id must be on the request's log line: {line}"
    );
    assert!(line.contains("/grpc.health.v1.Health/Check"), "{line}");

    // First start creates an administrator and shows its password once; it signs in.
    let line = app.wait_for_log(|l| l.contains("bootstrap administrator"), Duration::from_secs(5));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let mut auth = plinth::auth::v1::auth_service_client::AuthServiceClient::new(channel(app.grpc).await);
    let login = auth
        .login(plinth::auth::v1::LoginRequest {
            email: v["email"].as_str().unwrap().to_owned(),
            password: v["password"].as_str().unwrap().to_owned(),
            phone: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(login.user.unwrap().roles, vec!["admin"]);

    let (status, body) = http_get(app.http, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("plinth_grpc_requests_total{code=\"Ok\",rpc=\"/grpc.health.v1.Health/Check\"}"),
        "{body}"
    );
    assert!(body.contains("code=\"NotFound\""), "errors by code: {body}");
    assert!(
        body.contains("plinth_grpc_request_duration_seconds_bucket"),
        "latency histogram: {body}"
    );
    let (status, body) = http_get(app.http, "/healthz?service=queue").await;
    assert_eq!((status, body.contains("SERVING")), (200, true));
    assert_eq!(http_get(app.http, "/healthz?service=billing").await.0, 404);

    let (status, took) = app.terminate().await;
    let _ = app.wait_for_log(|l| l.contains("plinthd stopped"), Duration::from_secs(1));
    assert!(status.success(), "SIGTERM must exit cleanly, got {status:?}");
    assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");
}

#[tokio::test]
async fn only_runs_the_named_components() {
    let mut app = Running::start(&["--only", "queue,auth"]);
    assert_eq!(health(app.grpc, "queue").await.unwrap(), ServingStatus::Serving);
    assert_eq!(health(app.grpc, "auth").await.unwrap(), ServingStatus::Serving);
    assert_eq!(
        health(app.grpc, "config").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert!(app.dir.join("queue.db").exists() && !app.dir.join("config.db").exists());
    let (status, _) = app.terminate().await;
    assert!(status.success());
}

#[test]
fn bad_configuration_stops_startup_with_one_line_naming_it() {
    let dir = std::env::temp_dir().join("plinthd-badconfig");
    for (var, value) in [
        ("PLINTH_STORAGE__MAX_CONNECTIONS", "lots"),
        ("PLINTH_SHUTDOWN_GRACE_SECS", "soon"),
        ("PLINTH_DATABASE_URL", "mysql://db/x"),
        ("PLINTH_GRPC_LISTN", "127.0.0.1:1"),
    ] {
        let out = output_within(command(&dir).env(var, value));
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(var), "{var} not named in: {stderr}");
    }
    let out = output_within(command(&dir).args(["--only", "billing"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--only"));
}

#[test]
fn dump_config_prints_the_effective_variables_without_secrets() {
    let dir = std::env::temp_dir().join("plinthd-dump");
    let out = command(&dir)
        .env("PLINTH_DATABASE_URL", "postgres://plinth:hunter2@db/plinth")
        .env("PLINTH_QUEUE_UNUSED", "")
        .env_remove("PLINTH_QUEUE_UNUSED")
        .arg("--dump-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("PLINTH_GRPC_LISTEN=127.0.0.1:0"), "{stdout}");
    assert!(stdout.contains("PLINTH_DATABASE_URL=<redacted>"), "{stdout}");
    assert!(!stdout.contains("hunter2"));
}
