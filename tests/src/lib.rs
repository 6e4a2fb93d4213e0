//! The harness for end-to-end tests: [`TestApp::spawn`] starts a whole
//! `plinthd` in this process on random ports, with its data in a temporary
//! directory, and offers typed helpers. Set `TEST_LOG=1` to see its logs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Once;
use std::time::{Duration, Instant};

use plinth_runtime::Tasks;
use plinth_runtime::config::{Config, LogConfig};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

static LOGS: Once = Once::new();

/// A running `plinthd` inside the test process.
pub struct TestApp {
    /// The gRPC address.
    pub grpc: SocketAddr,
    /// The HTTP address.
    pub http: SocketAddr,
    shutdown: CancellationToken,
    tasks: Tasks,
    dir: PathBuf,
}

impl TestApp {
    /// A config with random local ports and a private data directory.
    pub fn config() -> Config {
        let dir = std::env::temp_dir().join(format!("plinth-e2e-{}", uuid_like()));
        Config {
            grpc_listen: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable_addr()),
            http_listen: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable_addr()),
            data_dir: dir,
            log: LogConfig {
                level: "info".into(),
                ..LogConfig::default()
            },
            shutdown_grace_secs: 5,
            ..Config::default()
        }
    }

    /// Builds and serves `config` until [`TestApp::stop`].
    pub async fn spawn(config: Config) -> anyhow::Result<TestApp> {
        if std::env::var("TEST_LOG").is_ok() {
            LOGS.call_once(|| {
                let _ = plinth_runtime::telemetry::init(&config.log, None, "plinth-tests");
            });
        }
        let dir = config.data_dir.clone();
        let app = plinthd::Plinth::build(config).await?;
        let (grpc, http) = (app.grpc_addr(), app.http_addr());
        let shutdown = CancellationToken::new();
        let tasks = Tasks::new();
        tasks.spawn("plinthd", app.run_until(shutdown.clone()));
        Ok(TestApp {
            grpc,
            http,
            shutdown,
            tasks,
            dir,
        })
    }

    /// The health status of `service` ("" for the whole process).
    pub async fn health(&self, service: &str) -> Result<ServingStatus, tonic::Status> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let resp = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?;
        Ok(resp.into_inner().status())
    }

    /// Waits until `service` reports `want`, or fails after `within`.
    pub async fn wait_for_health(&self, service: &str, want: ServingStatus, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.health(service).await;
            if matches!(&got, Ok(s) if *s == want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!("`{service}` is {got:?}, not {want:?}, after {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Shuts the app down as SIGTERM would and removes its data.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.shutdown(Duration::from_secs(10)).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

fn unreachable_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
