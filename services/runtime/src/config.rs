//! Process configuration: defaults → `plinth.toml` → `PLINTH_*` environment
//! (`__` nests) → flags, validated once at start-up. The loader takes the
//! environment as an argument so tests never touch the process environment.
//! Per-service settings are sections of [`Config`]; nothing reads env vars
//! anywhere else.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::component::ComponentSet;

/// The prefix of every environment variable Plinth reads.
pub const ENV_PREFIX: &str = "PLINTH_";

/// Variables outside the `PLINTH_` prefix that Plinth honours by their
/// standard names, mapped to their configuration keys.
const STANDARD_ENV: &[(&str, &str)] = &[("OTEL_EXPORTER_OTLP_ENDPOINT", "otlp_endpoint")];

/// The configuration of one `plinthd` process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Components to run; empty means all (`--only`, `PLINTH_ONLY`).
    pub only: ComponentSet,
    /// Address of the gRPC listener (`PLINTH_GRPC_LISTEN`).
    pub grpc_listen: SocketAddr,
    /// Address of the HTTP listener: gateway, `/metrics`, `/healthz` (`PLINTH_HTTP_LISTEN`).
    pub http_listen: SocketAddr,
    /// Directory of the embedded SQLite files (`PLINTH_DATA_DIR`).
    pub data_dir: PathBuf,
    /// PostgreSQL URL; SQLite under `data_dir` when unset (`PLINTH_DATABASE_URL`).
    #[serde(serialize_with = "redact_opt")]
    pub database_url: Option<SecretString>,
    /// NATS URL; the in-process bus when unset (`PLINTH_NATS_URL`).
    #[serde(serialize_with = "redact_opt")]
    pub nats_url: Option<SecretString>,
    /// Redis URL; in-process state when unset (`PLINTH_REDIS_URL`).
    #[serde(serialize_with = "redact_opt")]
    pub redis_url: Option<SecretString>,
    /// Prefix of every Redis key Plinth writes, to share one Redis (`PLINTH_REDIS_KEY_PREFIX`).
    pub redis_key_prefix: String,
    /// OTLP/gRPC endpoint for traces (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub otlp_endpoint: Option<String>,
    /// Logging (`PLINTH_LOG__*`).
    pub log: LogConfig,
    /// Database pools (`PLINTH_STORAGE__*`).
    pub storage: StorageConfig,
    /// Event bus and outbox (`PLINTH_EVENTS__*`).
    pub events: EventsConfig,
    /// Identities and tokens (`PLINTH_AUTH__*`).
    pub auth: AuthSettings,
    /// Versioned configuration (`PLINTH_CONFIG__*`).
    pub config: ConfigSettings,
    /// The queue service (`PLINTH_QUEUE__*`).
    pub queue: QueueSettings,
    /// The audit service (`PLINTH_AUDIT__*`).
    pub audit: AuditSettings,
    /// The ai service: providers, model routes, prices (`PLINTH_AI__*`).
    pub ai: AiSettings,
    /// The HTTP/JSON edge (`PLINTH_GATEWAY__*`).
    pub gateway: GatewaySettings,
    /// Comma-separated addresses or CIDR ranges of proxies (the split
    /// gateway, load balancers) whose `X-Forwarded-For` is believed when
    /// deciding a client's address (`PLINTH_TRUSTED_PROXIES`).
    pub trusted_proxies: String,
    /// gRPC TLS (`PLINTH_TLS__*`); plaintext when unset.
    pub tls: Option<TlsConfig>,
    /// Seconds in-flight calls get to finish after SIGTERM (`PLINTH_SHUTDOWN_GRACE_SECS`).
    pub shutdown_grace_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            only: ComponentSet::default(),
            grpc_listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            data_dir: PathBuf::from("./data"),
            database_url: None,
            nats_url: None,
            redis_url: None,
            redis_key_prefix: "plinth:".into(),
            otlp_endpoint: None,
            log: LogConfig::default(),
            storage: StorageConfig::default(),
            events: EventsConfig::default(),
            auth: AuthSettings::default(),
            config: ConfigSettings::default(),
            queue: QueueSettings::default(),
            audit: AuditSettings::default(),
            ai: AiSettings::default(),
            gateway: GatewaySettings::default(),
            trusted_proxies: String::new(),
            tls: None,
            shutdown_grace_secs: 10,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter directives, e.g. `info,plinth_queue=debug` (`PLINTH_LOG__LEVEL`).
    pub level: String,
    /// `json` (one object per line) or `text` (`PLINTH_LOG__FORMAT`).
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Json,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines for a terminal.
    Text,
}

/// Database pool settings, shared by SQLite and PostgreSQL.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Pool size per component (`PLINTH_STORAGE__MAX_CONNECTIONS`).
    pub max_connections: u32,
    /// How long to wait for a connection from the pool (`PLINTH_STORAGE__ACQUIRE_TIMEOUT_MS`).
    pub acquire_timeout_ms: u64,
    /// PostgreSQL `statement_timeout` (`PLINTH_STORAGE__STATEMENT_TIMEOUT_MS`).
    pub statement_timeout_ms: u64,
    /// Give up connecting at start-up after this long (`PLINTH_STORAGE__CONNECT_RETRY_SECS`).
    pub connect_retry_secs: u64,
    /// PostgreSQL schema of each component is this plus its name (`PLINTH_STORAGE__SCHEMA_PREFIX`).
    pub schema_prefix: String,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout_ms: 5_000,
            statement_timeout_ms: 30_000,
            connect_retry_secs: 30,
            schema_prefix: "plinth_".into(),
        }
    }
}

/// Event bus and outbox relay settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// JetStream stream that holds every `plinth.>` subject (`PLINTH_EVENTS__STREAM`).
    pub stream: String,
    /// How long JetStream remembers message ids to drop duplicates (`PLINTH_EVENTS__DEDUP_WINDOW_SECS`).
    pub dedup_window_secs: u64,
    /// How often the outbox relay polls when nothing wakes it (`PLINTH_EVENTS__RELAY_POLL_MS`).
    pub relay_poll_ms: u64,
    /// Outbox rows published per relay round (`PLINTH_EVENTS__RELAY_BATCH`).
    pub relay_batch: u32,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            stream: "PLINTH".into(),
            dedup_window_secs: 120,
            relay_poll_ms: 500,
            relay_batch: 256,
        }
    }
}

/// Token issuance and verification.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// `iss` of access tokens (`PLINTH_AUTH__ISSUER`).
    pub issuer: String,
    /// `aud` of access tokens (`PLINTH_AUTH__AUDIENCE`).
    pub audience: String,
    /// Access token lifetime (`PLINTH_AUTH__ACCESS_TTL_SECS`).
    pub access_ttl_secs: u64,
    /// Refresh token lifetime (`PLINTH_AUTH__REFRESH_TTL_SECS`).
    pub refresh_ttl_secs: u64,
    /// How long a used refresh token may be presented again without revoking
    /// its session, for concurrent tabs (`PLINTH_AUTH__REFRESH_GRACE_SECS`).
    pub refresh_grace_secs: u64,
    /// Password hashes computed at once; more wait (`PLINTH_AUTH__HASH_CONCURRENCY`).
    pub hash_concurrency: u32,
    /// gRPC URL of the auth component for processes that do not run it, to
    /// fetch token keys (`PLINTH_AUTH__URL`, e.g. `http://auth:50051`).
    pub url: Option<String>,
    /// Email of the administrator created at first start when none exists
    /// (`PLINTH_AUTH__BOOTSTRAP_ADMIN_EMAIL`).
    pub bootstrap_admin_email: String,
    /// Its password; when unset a random one is generated and logged once
    /// (`PLINTH_AUTH__BOOTSTRAP_ADMIN_PASSWORD`).
    #[serde(serialize_with = "redact_opt")]
    pub bootstrap_admin_password: Option<SecretString>,
    /// Days between automatic signing-key rotations; 0 turns them off
    /// (`PLINTH_AUTH__KEY_ROTATION_DAYS`).
    pub key_rotation_days: u64,
    /// Seconds a new signing key is published before it signs, so verifiers
    /// learn it first (`PLINTH_AUTH__KEY_PUBLISH_LEAD_SECS`); at least
    /// `jwks_refresh_secs`.
    pub key_publish_lead_secs: u64,
    /// Verifiers refetch the JWKS on an unknown key id at most this often
    /// (`PLINTH_AUTH__JWKS_REFRESH_SECS`).
    pub jwks_refresh_secs: u64,
    /// Each auth replica rereads the signing keys this often, following
    /// rotations made by other replicas (`PLINTH_AUTH__KEY_RELOAD_SECS`); at
    /// most `key_publish_lead_secs`, so every replica publishes a new key
    /// before any replica signs with it.
    pub key_reload_secs: u64,
    /// Key encryption keys that seal the token signing keys at rest,
    /// `id=<base64 of 32 bytes>` separated by commas (`PLINTH_AUTH__KEYS`);
    /// the first seals new keys. Every auth replica needs the same keys.
    #[serde(serialize_with = "redact_opt")]
    pub keys: Option<SecretString>,
    /// A file with more such keys, one per line (`PLINTH_AUTH__KEYS_FILE`).
    /// With neither set and no database URL, a key is generated under the
    /// data directory; with PostgreSQL, signing keys stay in clear (a warning
    /// at start) until one is set.
    pub keys_file: Option<PathBuf>,
}

/// The config service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigSettings {
    /// Key encryption keys for secrets, `id=<base64 of 32 bytes>` separated by
    /// commas (`PLINTH_CONFIG__KEYS`). Every replica needs the same keys.
    #[serde(serialize_with = "redact_opt")]
    pub keys: Option<SecretString>,
    /// A file with more such keys, one per line (`PLINTH_CONFIG__KEYS_FILE`).
    /// With neither set and no database URL, a key is generated under the
    /// data directory; with PostgreSQL, secrets are refused until one is set.
    pub keys_file: Option<PathBuf>,
    /// Largest value, in bytes (`PLINTH_CONFIG__MAX_VALUE_BYTES`).
    pub max_value_bytes: usize,
    /// Revisions of history kept per environment; older changes are
    /// compacted, and a watch from before them starts with a snapshot
    /// (`PLINTH_CONFIG__HISTORY_REVISIONS`; 0 keeps everything).
    pub history_revisions: u64,
    /// Seconds between progress messages on an idle watch (`PLINTH_CONFIG__WATCH_PROGRESS_SECS`).
    pub watch_progress_secs: u64,
    /// Milliseconds between checks for writes made by other replicas, in case
    /// the event announcing one is late or lost (`PLINTH_CONFIG__POLL_MS`).
    pub poll_ms: u64,
}

impl Default for ConfigSettings {
    fn default() -> Self {
        Self {
            keys: None,
            keys_file: None,
            max_value_bytes: 64 * 1024,
            history_revisions: 10_000,
            watch_progress_secs: 10,
            poll_ms: 1000,
        }
    }
}

/// The queue service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    /// Largest message payload, in bytes (`PLINTH_QUEUE__MAX_PAYLOAD_BYTES`).
    pub max_payload_bytes: usize,
    /// Milliseconds a waiting lease sleeps between looks at the database when
    /// no wake-up arrives (another replica's enqueue without LISTEN/NOTIFY,
    /// a rate limit refilling) (`PLINTH_QUEUE__POLL_MS`).
    pub poll_ms: u64,
    /// Milliseconds between sweeps that make due messages ready, return
    /// expired leases, dead-letter expired messages and raise depth alerts
    /// (`PLINTH_QUEUE__SWEEP_MS`).
    pub sweep_ms: u64,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            poll_ms: 500,
            sweep_ms: 100,
        }
    }
}

/// The ai service. Providers and models are usually given in the TOML
/// file (`[ai.providers.<name>]`, `[[ai.models]]`, `[[ai.prices]]`); from
/// the environment a whole table can be given as one value, e.g.
/// `PLINTH_AI__MODELS='[{name="chat",targets=[{provider="openai",model="gpt-4o-mini"}]}]'`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AiSettings {
    /// Provider accounts by name.
    pub providers: BTreeMap<String, AiProvider>,
    /// Logical models and their targets.
    pub models: Vec<AiModel>,
    /// US dollars per million tokens, per provider model.
    pub prices: Vec<AiPrice>,
    /// Milliseconds to wait for a provider's response headers, and then for
    /// each streamed chunk (`PLINTH_AI__TIMEOUT_MS`).
    pub timeout_ms: u64,
    /// `max_tokens` when a request gives none (Anthropic requires one)
    /// (`PLINTH_AI__DEFAULT_MAX_TOKENS`).
    pub default_max_tokens: u32,
    /// Consecutive failures that open a target's circuit breaker
    /// (`PLINTH_AI__BREAKER_FAILURES`).
    pub breaker_failures: u32,
    /// Seconds an open breaker skips its target before a trial call
    /// (`PLINTH_AI__BREAKER_OPEN_SECS`).
    pub breaker_open_secs: u64,
    /// Requests per minute one caller (API key, else user) may make; 0 for
    /// no limit (`PLINTH_AI__CALLER_REQUESTS_PER_MINUTE`).
    pub caller_requests_per_minute: u64,
    /// Tokens per minute one caller may reserve (prompt estimate plus
    /// `max_tokens`, settled to actual use); 0 for no limit
    /// (`PLINTH_AI__CALLER_TOKENS_PER_MINUTE`).
    pub caller_tokens_per_minute: u64,
    /// Spending limits per tenant or API key.
    pub budgets: Vec<AiBudget>,
    /// Seconds a cached `Generate` answer is kept; 0 turns the response
    /// cache off (`PLINTH_AI__CACHE_TTL_SECS`).
    pub cache_ttl_secs: u64,
    /// Milliseconds concurrent `Embed` calls for one provider model are
    /// gathered into one upstream request; 0 sends each alone
    /// (`PLINTH_AI__EMBED_BATCH_WINDOW_MS`).
    pub embed_batch_window_ms: u64,
    /// gRPC URL of the config service that holds the providers'
    /// `api_key_secret`s, for an ai process without the config component
    /// (`PLINTH_AI__SECRETS_URL`, e.g. `http://config:50051`).
    pub secrets_url: Option<String>,
    /// The API key the ai process reads those secrets with; it needs
    /// `config.secrets.read` (`PLINTH_AI__SECRETS_API_KEY`).
    #[serde(serialize_with = "redact_opt")]
    pub secrets_api_key: Option<SecretString>,
    /// A file holding that API key, reread before every call, so a rotated
    /// mounted Secret is picked up (`PLINTH_AI__SECRETS_API_KEY_FILE`).
    pub secrets_api_key_file: Option<PathBuf>,
}

/// A spending limit in US dollars per UTC day or calendar month, for one
/// tenant or one API key (give exactly one).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AiBudget {
    /// The tenant it limits.
    #[serde(default)]
    pub tenant: Option<String>,
    /// The API key id it limits.
    #[serde(default)]
    pub api_key: Option<String>,
    /// US dollars per period.
    pub usd: f64,
    /// `day` or `month` (default).
    #[serde(default = "month")]
    pub period: String,
}

fn month() -> String {
    "month".into()
}

impl Default for AiSettings {
    fn default() -> Self {
        Self {
            providers: BTreeMap::new(),
            models: Vec::new(),
            prices: Vec::new(),
            timeout_ms: 60_000,
            default_max_tokens: 4096,
            breaker_failures: 5,
            breaker_open_secs: 30,
            caller_requests_per_minute: 0,
            caller_tokens_per_minute: 0,
            budgets: Vec::new(),
            cache_ttl_secs: 3600,
            embed_batch_window_ms: 2,
            secrets_url: None,
            secrets_api_key: None,
            secrets_api_key_file: None,
        }
    }
}

/// One provider account.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AiProvider {
    /// Wire format: `openai`, `azure`, `anthropic`, `gemini`, or `custom`
    /// (any OpenAI-compatible server).
    pub kind: String,
    /// Base URL; defaults to the provider's public API (required for
    /// `azure`: `https://<resource>.openai.azure.com`, and for `custom`).
    #[serde(default)]
    pub base_url: Option<String>,
    /// The API key.
    #[serde(default, serialize_with = "redact_opt")]
    pub api_key: Option<SecretString>,
    /// A file holding the API key (a mounted Kubernetes Secret); read at start.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// A secret in the config service holding the API key, as
    /// `namespace/environment/key`; followed live, so `SetValue` rotates
    /// it without a restart. Read from the config component in this
    /// process, else from `secrets_url`.
    #[serde(default)]
    pub api_key_secret: Option<String>,
    /// Azure's `api-version`.
    #[serde(default)]
    pub api_version: Option<String>,
}

/// A logical model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AiModel {
    /// The name callers use.
    pub name: String,
    /// Where it runs, tried in order of `tier` (default: position).
    pub targets: Vec<AiTarget>,
}

/// One target of a logical model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AiTarget {
    /// A key of `providers`.
    pub provider: String,
    /// The provider's model (Azure: the deployment name).
    pub model: String,
    /// Targets of one tier share first attempts by weight (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
    /// Lower tiers are tried first (default: the target's position).
    #[serde(default)]
    pub tier: Option<u32>,
    /// Requests per minute sent to this provider model (all routes
    /// together); a target at its limit is skipped like a busy one.
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    /// Tokens per minute sent to this provider model (reserved as prompt
    /// estimate plus `max_tokens`, settled to actual use).
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
}

/// Prices of one provider model, in US dollars per million tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AiPrice {
    /// A key of `providers`; any provider when unset.
    #[serde(default)]
    pub provider: Option<String>,
    /// The provider's model.
    pub model: String,
    /// Uncached prompt tokens.
    pub input: f64,
    /// Completion tokens.
    pub output: f64,
    /// Prompt tokens read from the provider's cache (default: `input`).
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// Prompt tokens written to the provider's cache (default: `input`).
    #[serde(default)]
    pub cache_write: Option<f64>,
}

/// The audit service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// The log's identity in its signed checkpoints and the name of its
    /// signing key, e.g. `audit.example.com/prod` (`PLINTH_AUDIT__ORIGIN`).
    pub origin: String,
    /// The Ed25519 checkpoint signing key: base64 of its 32-byte seed
    /// (`PLINTH_AUDIT__SIGNING_KEY`). When unset, a key is generated once
    /// and kept in the audit database, where anyone who can write the
    /// database could also re-sign a forged log; production deployments
    /// should set it from a secret.
    #[serde(serialize_with = "redact_opt")]
    pub signing_key: Option<SecretString>,
    /// Milliseconds between integrations of new entries into the tree when
    /// no append wakes the integrator (appends on other replicas)
    /// (`PLINTH_AUDIT__INTEGRATE_MS`).
    pub integrate_ms: u64,
    /// Most entries integrated (and covered by one checkpoint) per round
    /// (`PLINTH_AUDIT__INTEGRATE_BATCH`).
    pub integrate_batch: usize,
    /// Whether to record every Plinth event from the bus (`plinth.>`)
    /// (`PLINTH_AUDIT__INGEST`).
    pub ingest: bool,
    /// The durable consumer's name; audit replicas of one deployment share
    /// it and split the events between them (`PLINTH_AUDIT__CONSUMER`).
    pub consumer: String,
    /// Whether a new consumer starts from the oldest event the bus still
    /// holds (`true`) or only records events published from then on
    /// (`PLINTH_AUDIT__REPLAY`).
    pub replay: bool,
    /// Seconds between runs of the retention policies
    /// (`PLINTH_AUDIT__RETENTION_SWEEP_SECS`).
    pub retention_sweep_secs: u64,
    /// Milliseconds between evaluations of the alert rules over new entries
    /// (and calls of due webhooks) (`PLINTH_AUDIT__ALERT_EVAL_MS`).
    pub alert_eval_ms: u64,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            origin: "plinth.local/audit".into(),
            signing_key: None,
            integrate_ms: 1000,
            integrate_batch: 10_000,
            ingest: true,
            consumer: "plinth-audit".into(),
            replay: true,
            retention_sweep_secs: 3600,
            alert_eval_ms: 500,
        }
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            issuer: "plinth".into(),
            audience: "plinth".into(),
            access_ttl_secs: 900,
            refresh_ttl_secs: 30 * 24 * 3600,
            refresh_grace_secs: 10,
            hash_concurrency: 2,
            url: None,
            bootstrap_admin_email: "admin@plinth.local".into(),
            bootstrap_admin_password: None,
            key_rotation_days: 30,
            key_publish_lead_secs: 60,
            jwks_refresh_secs: 30,
            key_reload_secs: 30,
            keys: None,
            keys_file: None,
        }
    }
}

/// The HTTP/JSON edge.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// gRPC URLs of components this process does not run, by component
    /// (`PLINTH_GATEWAY__UPSTREAMS__AUTH=http://auth:50051`).
    pub upstreams: BTreeMap<String, String>,
    /// Largest request body in bytes; larger gets 413 (`PLINTH_GATEWAY__BODY_LIMIT_BYTES`).
    pub body_limit_bytes: usize,
    /// Deadline of unary calls without `Grpc-Timeout` (`PLINTH_GATEWAY__DEFAULT_TIMEOUT_MS`).
    pub default_timeout_ms: u64,
    /// Comma-separated origins allowed by CORS, `*` for any; empty turns CORS
    /// off (`PLINTH_GATEWAY__CORS_ORIGINS`).
    pub cors_origins: String,
    /// Requests per second per client address; 0 turns the limit off
    /// (`PLINTH_GATEWAY__RATE_LIMIT_PER_SEC`). Shared through Redis when set.
    pub rate_limit_per_sec: f64,
    /// Burst above the rate (`PLINTH_GATEWAY__RATE_LIMIT_BURST`).
    pub rate_limit_burst: f64,
    /// gzip/br compression of responses when the client accepts it (`PLINTH_GATEWAY__COMPRESSION`).
    pub compression: bool,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            upstreams: BTreeMap::new(),
            body_limit_bytes: 4 * 1024 * 1024,
            default_timeout_ms: 30_000,
            cors_origins: String::new(),
            rate_limit_per_sec: 0.0,
            rate_limit_burst: 100.0,
            compression: true,
        }
    }
}

/// PEM files for TLS on the gRPC listener; `client_ca` turns on mutual TLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (`PLINTH_TLS__CERT`).
    pub cert: PathBuf,
    /// Server private key (`PLINTH_TLS__KEY`).
    pub key: PathBuf,
    /// CA that client certificates must chain to (`PLINTH_TLS__CLIENT_CA`).
    pub client_ca: Option<PathBuf>,
}

/// A configuration that cannot be used; the message names the variable or key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value failed to parse or a key is unknown.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// Values parsed but do not make sense together.
    #[error("invalid configuration: {key}: {reason}")]
    Rejected {
        /// The environment variable (or key) at fault.
        key: &'static str,
        /// Why it was rejected.
        reason: String,
    },
}

impl Config {
    /// Loads defaults, then `file` (when it exists), then `PLINTH_*` entries of
    /// `env`, then `overrides` (flags), and validates the result.
    pub fn load(
        file: Option<&Path>,
        env: &[(String, String)],
        overrides: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment
            .merge(EnvProvider::new(env))
            .merge(FlagProvider(overrides.clone()));
        let config: Config = figment.extract().map_err(|e| ConfigError::Invalid(one_line(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that values make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, url, schemes) in [
            (
                "PLINTH_DATABASE_URL",
                &self.database_url,
                &["postgres", "postgresql"][..],
            ),
            ("PLINTH_NATS_URL", &self.nats_url, &["nats", "tls"][..]),
            ("PLINTH_REDIS_URL", &self.redis_url, &["redis", "rediss"][..]),
        ] {
            if let Some(url) = url {
                let scheme = url.expose_secret().split("://").next().unwrap_or_default();
                if !url.expose_secret().contains("://") || !schemes.contains(&scheme) {
                    return Err(ConfigError::Rejected {
                        key,
                        reason: format!("expected a URL starting with {}://", schemes.join(":// or ")),
                    });
                }
            }
        }
        if self.queue.poll_ms == 0 || self.queue.sweep_ms == 0 {
            return Err(ConfigError::Rejected {
                key: "PLINTH_QUEUE__SWEEP_MS",
                reason: "PLINTH_QUEUE__POLL_MS and PLINTH_QUEUE__SWEEP_MS must be at least 1".into(),
            });
        }
        if self.storage.max_connections == 0 {
            return Err(ConfigError::Rejected {
                key: "PLINTH_STORAGE__MAX_CONNECTIONS",
                reason: "must be at least 1".into(),
            });
        }
        if self.auth.hash_concurrency == 0 {
            return Err(ConfigError::Rejected {
                key: "PLINTH_AUTH__HASH_CONCURRENCY",
                reason: "must be at least 1".into(),
            });
        }
        if self.auth.access_ttl_secs == 0 || self.auth.access_ttl_secs > 24 * 3600 {
            return Err(ConfigError::Rejected {
                key: "PLINTH_AUTH__ACCESS_TTL_SECS",
                reason: "must be between 1 second and 1 day".into(),
            });
        }
        if self.auth.jwks_refresh_secs == 0 || self.auth.key_publish_lead_secs < self.auth.jwks_refresh_secs {
            return Err(ConfigError::Rejected {
                key: "PLINTH_AUTH__KEY_PUBLISH_LEAD_SECS",
                reason: format!(
                    "must be at least PLINTH_AUTH__JWKS_REFRESH_SECS ({}, itself at least 1), so verifiers know a new key before it signs",
                    self.auth.jwks_refresh_secs
                ),
            });
        }
        if self.auth.key_reload_secs == 0 || self.auth.key_reload_secs > self.auth.key_publish_lead_secs {
            return Err(ConfigError::Rejected {
                key: "PLINTH_AUTH__KEY_RELOAD_SECS",
                reason: format!(
                    "must be between 1 and PLINTH_AUTH__KEY_PUBLISH_LEAD_SECS ({}), so every replica knows a new key before any signs with it",
                    self.auth.key_publish_lead_secs
                ),
            });
        }
        let prefix = &self.storage.schema_prefix;
        if prefix.is_empty()
            || !prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(ConfigError::Rejected {
                key: "PLINTH_STORAGE__SCHEMA_PREFIX",
                reason: "must be lowercase letters, digits and underscores".into(),
            });
        }
        if let Err(e) = crate::client_address::TrustedProxies::parse(&self.trusted_proxies) {
            return Err(ConfigError::Rejected {
                key: "PLINTH_TRUSTED_PROXIES",
                reason: e.to_string(),
            });
        }
        for (component, url) in &self.gateway.upstreams {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::Rejected {
                    key: "PLINTH_GATEWAY__UPSTREAMS__<COMPONENT>",
                    reason: format!("upstream of {component} must be an http:// or https:// gRPC URL, not {url:?}"),
                });
            }
        }
        if self.gateway.rate_limit_per_sec < 0.0 || self.gateway.rate_limit_burst < 1.0 {
            return Err(ConfigError::Rejected {
                key: "PLINTH_GATEWAY__RATE_LIMIT_PER_SEC",
                reason: "the rate must be at least 0 and the burst at least 1".into(),
            });
        }
        if self.config.max_value_bytes == 0 || self.config.max_value_bytes > 4 * 1024 * 1024 {
            return Err(ConfigError::Rejected {
                key: "PLINTH_CONFIG__MAX_VALUE_BYTES",
                reason: "must be between 1 and 4194304".into(),
            });
        }
        if self.config.watch_progress_secs == 0 || self.config.poll_ms == 0 {
            return Err(ConfigError::Rejected {
                key: "PLINTH_CONFIG__WATCH_PROGRESS_SECS",
                reason: "PLINTH_CONFIG__WATCH_PROGRESS_SECS and PLINTH_CONFIG__POLL_MS must be at least 1".into(),
            });
        }
        if self.events.relay_batch == 0 {
            return Err(ConfigError::Rejected {
                key: "PLINTH_EVENTS__RELAY_BATCH",
                reason: "must be at least 1".into(),
            });
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::Rejected {
                key: "PLINTH_LOG__LEVEL",
                reason: format!(
                    "`{}` is not a valid filter (try `info` or `info,plinth_queue=debug`)",
                    self.log.level
                ),
            });
        }
        Ok(())
    }

    /// The effective configuration as `PLINTH_*=value` lines, secrets redacted
    /// (what `plinthd --dump-config` prints).
    pub fn dump(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Ok(value) = serde_json::to_value(self) {
            flatten_env(&mut lines, ENV_PREFIX.trim_end_matches('_'), &value);
        }
        lines
    }

    /// Every environment variable the loader reads, with its default (empty
    /// when unset), sorted: `PLINTH_*` names (`<COMPONENT>` stands for a map
    /// key) and the standard names Plinth honours. Derived from [`Config`]
    /// itself, so `plinthd --help` and the deployment checks that compare
    /// against it cannot drift from what is parsed.
    pub fn env_vars() -> Vec<(String, String)> {
        // Optional sections and maps dump nothing when empty; fill them.
        let mut gateway = GatewaySettings::default();
        gateway.upstreams.insert("<component>".into(), String::new());
        let mut ai = AiSettings::default();
        ai.providers.insert(
            "<name>".into(),
            AiProvider {
                kind: String::new(),
                base_url: None,
                api_key: None,
                api_key_file: None,
                api_key_secret: None,
                api_version: None,
            },
        );
        let sample = Config {
            ai,
            tls: Some(TlsConfig {
                cert: PathBuf::new(),
                key: PathBuf::new(),
                client_ca: Some(PathBuf::new()),
            }),
            gateway,
            ..Config::default()
        };
        let mut vars: Vec<(String, String)> = sample
            .dump()
            .into_iter()
            .filter_map(|line| {
                let (name, default) = line.split_once('=')?;
                let standard = STANDARD_ENV
                    .iter()
                    .find(|(_, key)| name == format!("{ENV_PREFIX}{}", key.replace('.', "__").to_uppercase()));
                let name = standard.map_or(name, |(standard, _)| *standard);
                Some((name.to_owned(), default.to_owned()))
            })
            .collect();
        vars.sort();
        vars
    }
}

fn flatten_env(out: &mut Vec<String>, prefix: &str, value: &serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            let sep = if prefix == "PLINTH" { "_" } else { "__" };
            for (k, v) in map {
                flatten_env(out, &format!("{prefix}{sep}{}", k.to_uppercase()), v);
            }
        }
        serde_json::Value::Null => out.push(format!("{prefix}=")),
        serde_json::Value::String(s) => out.push(format!("{prefix}={s}")),
        other => out.push(format!("{prefix}={other}")),
    }
}

fn redact_opt<S: serde::Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_some("<redacted>"),
        None => s.serialize_none(),
    }
}

/// figment errors can span lines (one per nested cause); operators want one.
fn one_line(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| e.to_string().replace('\n', " "))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `PLINTH_A__B=v` entries of a given environment, as figment data whose
/// errors name the variable.
struct EnvProvider {
    vars: Vec<(String, String)>,
}

impl EnvProvider {
    fn new(env: &[(String, String)]) -> Self {
        let mut vars = Vec::new();
        for (k, v) in env {
            if let Some(rest) = k.strip_prefix(ENV_PREFIX) {
                if !rest.is_empty() && !rest.starts_with("TEST_") {
                    vars.push((rest.to_lowercase().replace("__", "."), v.clone()));
                }
            } else if let Some((_, key)) = STANDARD_ENV.iter().find(|(name, _)| name == k) {
                vars.push(((*key).to_owned(), v.clone()));
            }
        }
        Self { vars }
    }
}

impl Provider for EnvProvider {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable").interpolater(|_: &Profile, keys: &[&str]| {
            let key = keys.join(".");
            STANDARD_ENV
                .iter()
                .find(|(_, k)| *k == key)
                .map(|(name, _)| (*name).to_owned())
                .unwrap_or_else(|| format!("{ENV_PREFIX}{}", keys.join("__").to_uppercase()))
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(nested_dict(self.vars.iter().map(|(k, v)| (k, v)))))
    }
}

/// `a.b = raw` pairs as one nested dictionary; values parse as TOML-like
/// scalars except for [`is_string_key`] keys.
fn nested_dict<'a>(pairs: impl Iterator<Item = (&'a String, &'a String)>) -> Dict {
    let mut dict = Dict::new();
    for (key, raw) in pairs {
        let value = if is_string_key(key) {
            Value::from(raw.clone())
        } else {
            raw.parse().unwrap_or(Value::from(raw.clone()))
        };
        if let Value::Dict(_, nested) = figment::util::nest(key, value) {
            dict = merge_dicts(dict, nested);
        }
    }
    dict
}

/// Keys whose values are strings even when they look like numbers or lists.
fn is_string_key(key: &str) -> bool {
    matches!(
        key,
        "only"
            | "auth.url"
            | "auth.bootstrap_admin_email"
            | "auth.bootstrap_admin_password"
            | "redis_key_prefix"
            | "auth.issuer"
            | "auth.audience"
            | "storage.schema_prefix"
            | "database_url"
            | "nats_url"
            | "redis_url"
            | "otlp_endpoint"
            | "log.level"
            | "audit.origin"
            | "audit.signing_key"
            | "audit.consumer"
    )
}

fn merge_dicts(mut a: Dict, b: Dict) -> Dict {
    for (k, v) in b {
        let merged = match (a.remove(&k), v) {
            (Some(Value::Dict(_, x)), Value::Dict(tag, y)) => Value::Dict(tag, merge_dicts(x, y)),
            (_, v) => v,
        };
        a.insert(k, merged);
    }
    a
}

/// Command-line flags, already as `key.path = value`.
struct FlagProvider(BTreeMap<String, String>);

impl Provider for FlagProvider {
    fn metadata(&self) -> Metadata {
        Metadata::named("command-line flag")
            .interpolater(|_: &Profile, keys: &[&str]| format!("--{}", keys.join("-").replace('_', "-")))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(nested_dict(self.0.iter())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn defaults_need_no_setup() {
        let c = Config::load(None, &[], &BTreeMap::new()).unwrap();
        assert_eq!(c.grpc_listen.port(), 50051);
        assert!(c.database_url.is_none());
        assert!(c.only.contains(crate::Component::Queue));
    }

    #[test]
    fn env_nests_with_double_underscore_and_flags_win() {
        let e = env(&[
            ("PLINTH_STORAGE__MAX_CONNECTIONS", "3"),
            ("PLINTH_GRPC_LISTEN", "127.0.0.1:1"),
            ("PLINTH_ONLY", "queue,auth"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("HOME", "/root"),
        ]);
        let flags = BTreeMap::from([("grpc_listen".to_owned(), "127.0.0.1:2".to_owned())]);
        let c = Config::load(None, &e, &flags).unwrap();
        assert_eq!(c.storage.max_connections, 3);
        assert_eq!(c.grpc_listen.port(), 2);
        assert!(!c.only.contains(crate::Component::Gateway));
        assert_eq!(c.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4317"));
    }

    #[test]
    fn malformed_value_names_the_variable() {
        let e = env(&[("PLINTH_STORAGE__MAX_CONNECTIONS", "lots")]);
        let msg = Config::load(None, &e, &BTreeMap::new()).unwrap_err().to_string();
        assert!(msg.contains("PLINTH_STORAGE__MAX_CONNECTIONS"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn a_key_publish_lead_shorter_than_the_jwks_refresh_is_rejected() {
        let e = env(&[
            ("PLINTH_AUTH__KEY_PUBLISH_LEAD_SECS", "10"),
            ("PLINTH_AUTH__JWKS_REFRESH_SECS", "30"),
        ]);
        let msg = Config::load(None, &e, &BTreeMap::new()).unwrap_err().to_string();
        assert!(msg.contains("PLINTH_AUTH__KEY_PUBLISH_LEAD_SECS"), "{msg}");
        let e = env(&[("PLINTH_GATEWAY__UPSTREAMS__AUTH", "auth:50051")]);
        let msg = Config::load(None, &e, &BTreeMap::new()).unwrap_err().to_string();
        assert!(msg.contains("PLINTH_GATEWAY__UPSTREAMS"), "{msg}");
    }

    #[test]
    fn unknown_variable_is_rejected_by_name() {
        let e = env(&[("PLINTH_GRPC_LISTN", "127.0.0.1:1")]);
        let msg = Config::load(None, &e, &BTreeMap::new()).unwrap_err().to_string();
        assert!(msg.contains("grpc_listn"), "{msg}");
    }

    #[test]
    fn wrong_url_scheme_is_rejected_by_name() {
        let e = env(&[("PLINTH_DATABASE_URL", "mysql://localhost/x")]);
        let msg = Config::load(None, &e, &BTreeMap::new()).unwrap_err().to_string();
        assert!(msg.contains("PLINTH_DATABASE_URL"), "{msg}");
    }

    #[test]
    fn dump_redacts_secrets() {
        let e = env(&[("PLINTH_DATABASE_URL", "postgres://u:hunter2@db/x")]);
        let c = Config::load(None, &e, &BTreeMap::new()).unwrap();
        let dump = c.dump().join("\n");
        assert!(dump.contains("PLINTH_DATABASE_URL=<redacted>"), "{dump}");
        assert!(!dump.contains("hunter2"));
        assert!(dump.contains("PLINTH_STORAGE__MAX_CONNECTIONS=10"), "{dump}");
    }

    #[test]
    fn env_vars_list_every_name_the_loader_accepts() {
        let vars = Config::env_vars();
        let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        for expected in [
            "PLINTH_DATABASE_URL",
            "PLINTH_TLS__CLIENT_CA",
            "PLINTH_GATEWAY__UPSTREAMS__<COMPONENT>",
            "PLINTH_AUTH__BOOTSTRAP_ADMIN_PASSWORD",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ] {
            assert!(names.contains(&expected), "{expected} missing from {names:?}");
        }
        assert!(!names.contains(&"PLINTH_OTLP_ENDPOINT"), "{names:?}");
        // Each name with its default loads: the list holds no name the loader refuses.
        for (name, default) in vars.iter().filter(|(_, d)| !d.is_empty()) {
            let e = env(&[(name.as_str(), default.as_str())]);
            assert!(Config::load(None, &e, &BTreeMap::new()).is_ok(), "{name}={default}");
        }
    }
}
