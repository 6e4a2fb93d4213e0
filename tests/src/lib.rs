//! The harness for end-to-end tests: [`TestApp::spawn`] starts a whole
//! `plinthd` in this process on random ports, with its data in a temporary
//! directory (or private PostgreSQL schemas), and offers typed helpers. Set
//! `TEST_LOG=1` to see its logs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Once;
use std::time::{Duration, Instant};

use plinth::auth::v1::auth_service_client::AuthServiceClient;
use plinth_runtime::Tasks;
use plinth_runtime::config::{Config, LogConfig};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub mod audit;
pub mod config;
pub mod fake_upstream;
pub mod mesh;
pub mod queue;
pub mod rfc9162;

/// Runs each named scenario (an `async fn(Config) -> anyhow::Result<()>` in
/// the calling module) on SQLite and, when configured, on PostgreSQL, as
/// `<name>::sqlite` and `<name>::postgres` tests.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name($crate::TestApp::config()).await.unwrap();
            }
            #[tokio::test]
            async fn postgres() {
                if let Some(config) = $crate::postgres_config(stringify!($name)).unwrap() {
                    super::$name(config).await.unwrap();
                }
            }
        }
    )*};
}

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
    /// PostgreSQL URL and schema prefix to drop afterwards.
    postgres: Option<(String, String)>,
}

impl TestApp {
    /// A config with random local ports and a private data directory.
    pub fn config() -> Config {
        let dir = std::env::temp_dir().join(format!("plinth-e2e-{}", unique()));
        Config {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: dir,
            log: LogConfig {
                level: "info".into(),
                ..LogConfig::default()
            },
            shutdown_grace_secs: 5,
            // Tests share the machine's Redis; keep each app's keys apart.
            redis_key_prefix: format!("plinth-test-{}:", unique()),
            // ...and its NATS stream: each app's audit records only what
            // was published while it ran.
            audit: plinth_runtime::config::AuditSettings {
                consumer: format!("plinth-audit-{}", unique()),
                replay: false,
                ..plinth_runtime::config::AuditSettings::default()
            },
            ..Config::default()
        }
    }

    /// [`TestApp::config`], on PostgreSQL at `postgres_url` (private schemas) when given.
    pub fn config_on(postgres_url: Option<&str>) -> Config {
        let mut config = Self::config();
        if let Some(url) = postgres_url {
            config.database_url = Some(secrecy::SecretString::from(url.to_owned()));
            config.storage.schema_prefix = format!("plinth_t{}_", unique());
        }
        config
    }

    /// A second replica of `config`: same databases, schemas and Redis keys,
    /// its own ports and data directory, running only `only`.
    pub fn replica_of(config: &Config, only: &str) -> anyhow::Result<Config> {
        let mut replica = Self::config();
        replica.database_url = config.database_url.clone();
        replica.redis_url = config.redis_url.clone();
        replica.nats_url = config.nats_url.clone();
        replica.storage.schema_prefix = config.storage.schema_prefix.clone();
        replica.redis_key_prefix = config.redis_key_prefix.clone();
        replica.only = only.parse()?;
        Ok(replica)
    }

    /// Builds and serves `config` until [`TestApp::stop`].
    pub async fn spawn(config: Config) -> anyhow::Result<TestApp> {
        if std::env::var("TEST_LOG").is_ok() {
            LOGS.call_once(|| {
                let _ = plinth_runtime::telemetry::init(&config.log, None, "plinth-tests");
            });
        }
        let dir = config.data_dir.clone();
        let postgres = config
            .database_url
            .as_ref()
            .map(|u| (u.expose_secret().to_owned(), config.storage.schema_prefix.clone()));
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
            postgres,
        })
    }

    /// A gRPC channel to the app.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Endpoint::from_shared(format!("http://{}", self.grpc))?
            .connect()
            .await?)
    }

    /// A client of the auth service.
    pub async fn auth(&self) -> anyhow::Result<AuthServiceClient<Channel>> {
        Ok(AuthServiceClient::new(self.channel().await?))
    }

    /// The health status of `service` ("" for the whole process).
    pub async fn health(&self, service: &str) -> Result<ServingStatus, tonic::Status> {
        let channel = self
            .channel()
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

    /// Shuts the app down as SIGTERM would and keeps its data (SQLite files,
    /// PostgreSQL schemas), so that `TestApp::spawn` with the same config
    /// starts it again.
    pub async fn stop_keeping_data(self) {
        self.shutdown.cancel();
        self.tasks.shutdown(Duration::from_secs(10)).await;
    }

    /// Shuts the app down as SIGTERM would and removes its data.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.shutdown(Duration::from_secs(10)).await;
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some((url, prefix)) = self.postgres {
            drop_schemas(&url, &prefix).await;
        }
    }
}

/// Removes the schemas a PostgreSQL-backed app created.
pub(crate) async fn drop_schemas(url: &str, prefix: &str) {
    let Ok(pool) = sqlx::PgPool::connect(url).await else {
        return;
    };
    let schemas: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1)")
            .bind(prefix)
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
    for schema in schemas {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE")))
            .execute(&pool)
            .await;
    }
    pool.close().await;
}

/// A process-unique lowercase token for names.
pub fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}_{nanos}", std::process::id())
}

/// A password every test user shares; it passes the password policy.
pub const PASSWORD: &str = "violet staircase under rain";

/// `message` with `authorization: Bearer <token>` (an access token or API key).
pub fn with_bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {token}").parse() {
        req.metadata_mut().insert("authorization", value);
    }
    req
}

/// Registers a fresh user named after `label` with [`PASSWORD`]; returns the email.
pub async fn register_user(client: &mut AuthServiceClient<Channel>, label: &str) -> anyhow::Result<String> {
    let email = format!("{label}-{}@example.com", unique());
    client
        .register(plinth::auth::v1::RegisterRequest {
            email: email.clone(),
            password: PASSWORD.into(),
            display_name: String::new(),
            phone: String::new(),
        })
        .await?;
    Ok(email)
}

/// The bootstrap administrator's password in tests that need an admin.
pub const ADMIN_PASSWORD: &str = "correct horse battery staple";

/// The email of the bootstrap administrator.
pub const ADMIN_EMAIL: &str = "admin@plinth.local";

/// `config` with the bootstrap administrator's password set to [`ADMIN_PASSWORD`].
pub fn with_admin(mut config: Config) -> Config {
    config.auth.bootstrap_admin_password = Some(secrecy::SecretString::from(ADMIN_PASSWORD));
    config
}

/// [`TestApp::config_on`] PostgreSQL for `test`, or `None` (with a notice)
/// when `PLINTH_TEST_DATABASE_URL` is unset; an error when backends are required.
pub fn postgres_config(test: &str) -> anyhow::Result<Option<Config>> {
    let url = plinth_runtime::testing::backend_url(plinth_runtime::testing::Backend::Postgres, test)?;
    Ok(url.map(|u| TestApp::config_on(Some(&u))))
}

/// Logs in by email with [`PASSWORD`]; returns the whole answer (tokens and user).
pub async fn sign_in(
    client: &mut AuthServiceClient<Channel>,
    email: &str,
) -> Result<plinth::auth::v1::LoginResponse, tonic::Status> {
    Ok(client
        .login(plinth::auth::v1::LoginRequest {
            email: email.into(),
            password: PASSWORD.into(),
            phone: String::new(),
        })
        .await?
        .into_inner())
}

/// The id of the user (or service account) `token` belongs to.
pub async fn whoami(client: &mut AuthServiceClient<Channel>, token: &str) -> Result<String, tonic::Status> {
    client
        .get_me(with_bearer(plinth::auth::v1::GetMeRequest {}, token))
        .await?
        .into_inner()
        .user
        .map(|u| u.id)
        .ok_or_else(|| tonic::Status::internal("GetMe returned no user"))
}

/// Logs in and returns the access token.
pub async fn access_token(
    client: &mut AuthServiceClient<Channel>,
    email: &str,
    password: &str,
) -> Result<String, tonic::Status> {
    let login = client
        .login(plinth::auth::v1::LoginRequest {
            email: email.into(),
            password: password.into(),
            phone: String::new(),
        })
        .await?
        .into_inner();
    login
        .tokens
        .map(|t| t.access_token)
        .ok_or_else(|| tonic::Status::internal("login returned no tokens"))
}

/// The key ids the auth service publishes in its JWKS now.
pub async fn published_kids(client: &mut AuthServiceClient<Channel>) -> Result<Vec<String>, tonic::Status> {
    Ok(client
        .get_jwks(plinth::auth::v1::GetJwksRequest {})
        .await?
        .into_inner()
        .keys
        .into_iter()
        .map(|k| k.kid)
        .collect())
}

/// The field the first `BadRequest` violation of `status` names ("" if none).
pub fn violated_field(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
        .unwrap_or_default()
}

/// The `ErrorInfo` reason of `status` ("" if none).
pub fn error_reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

/// Runs `script` with `PLINTH_TEST_PYTHON` and `args` off the async
/// runtime (the app under test may be served by it); fails unless it exits 0.
pub async fn run_python(python: String, script: &'static str, args: Vec<String>) -> anyhow::Result<String> {
    let out = tokio::task::spawn_blocking(move || std::process::Command::new(python).arg(script).args(args).output())
        .await??;
    anyhow::ensure!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
