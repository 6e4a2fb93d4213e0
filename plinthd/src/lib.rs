//! Wiring of one `plinthd` process: chooses the backends the configuration
//! names, opens each enabled component's storage and outbox relay, registers
//! health, binds the listeners, and shuts down in order. No component logic
//! lives here; each component's behaviour belongs to its own crate.

pub mod cli;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::FutureExt;
use plinth::ai::v1::ai_service_server::AiServiceServer;
use plinth::audit::v1::audit_service_server::AuditServiceServer;
use plinth::auth::v1::auth_service_server::AuthServiceServer;
use plinth::auth::v1::authorization_service_server::AuthorizationServiceServer;
use plinth::queue::v1::queue_service_server::QueueServiceServer;
use plinth_gateway::{Gateway, GatewayOptions, Upstreams};
use plinth_runtime::auth::{
    ApiKeySource, AuthLayer, Authenticator, GrpcJwksSource, JwksSource, PermissionMap, Refusals, Revocations,
};
use plinth_runtime::client_address::TrustedProxies;
use plinth_runtime::config::Config;
use plinth_runtime::crypto::{KeySources, Keyring};
use plinth_runtime::events::outbox::Relay;
use plinth_runtime::events::{InProcessBus, NatsBus, SharedBus};
use plinth_runtime::health::Probe;
use plinth_runtime::resilience::RateLimiter;
use plinth_runtime::secrets::{self, RemoteSecrets, SecretRef, SecretSource};
use plinth_runtime::server::{BoundServer, ServerBuilder};
use plinth_runtime::state::{InProcessState, RedisState, SharedStateRef};
use plinth_runtime::storage::{Db, DbTarget, Migrations};
use plinth_runtime::{Component, Tasks};
use tokio_util::sync::CancellationToken;

/// How often each auth replica checks for policy changes made by others;
/// a check that passes a version token never waits for it.
const POLICY_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// How often each config replica compacts history beyond what it retains.
const COMPACTION_INTERVAL: Duration = Duration::from_secs(60);

/// How often backends are probed for health.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// One component's share of the process.
struct Running {
    component: Component,
    db: Option<Db>,
}

/// A built `plinthd`: listeners bound, backends connected, not yet serving.
pub struct Plinth {
    server: BoundServer,
    tasks: Tasks,
    running: Vec<Running>,
    grace: Duration,
}

impl Plinth {
    /// Connects the backends `cfg` names and binds the listeners.
    pub async fn build(cfg: Config) -> anyhow::Result<Plinth> {
        let tasks = Tasks::new();
        let bus: SharedBus = match &cfg.nats_url {
            Some(url) => Arc::new(
                NatsBus::connect(
                    url,
                    &cfg.events.stream,
                    Duration::from_secs(cfg.events.dedup_window_secs),
                )
                .await?,
            ),
            None => Arc::new(InProcessBus::new(Duration::from_secs(cfg.events.dedup_window_secs))),
        };
        let state: SharedStateRef = match &cfg.redis_url {
            Some(url) => Arc::new(
                RedisState::connect(
                    url,
                    &cfg.redis_key_prefix,
                    Duration::from_secs(cfg.storage.connect_retry_secs),
                )
                .await
                .context("while connecting to PLINTH_REDIS_URL")?,
            ),
            None => Arc::new(InProcessState::new()),
        };

        let (mut builder, health) = ServerBuilder::new();
        let mut running = Vec::new();
        let mut jwks: Option<Arc<dyn JwksSource>> = None;
        let mut api_keys: Option<Arc<dyn ApiKeySource>> = None;
        // Provider keys the ai component reads from config secrets; the
        // config component (started before ai) serves them. A malformed
        // address is the ai component's to refuse, naming its provider.
        let mut secrets: Option<Arc<dyn SecretSource>> = None;
        let wanted_secrets: Vec<SecretRef> = cfg
            .ai
            .providers
            .values()
            .filter_map(|p| SecretRef::parse(p.api_key_secret.as_deref()?).ok())
            .collect();
        let mut required = vec!["database"];
        if cfg.redis_url.is_some() {
            required.push("redis");
        }
        for component in cfg.only.enabled() {
            let db = if component == Component::Gateway {
                None
            } else {
                let target = DbTarget::for_component(
                    cfg.database_url.as_ref(),
                    &cfg.data_dir,
                    &cfg.storage.schema_prefix,
                    component.name(),
                );
                let db = Db::connect(&target, &cfg.storage)
                    .await
                    .with_context(|| format!("while opening the {component} database"))?;
                db.migrate(component.name(), &migrations(component)).await?;
                let relay = Relay::new(
                    component.name(),
                    db.clone(),
                    bus.clone(),
                    Duration::from_millis(cfg.events.relay_poll_ms),
                    cfg.events.relay_batch,
                );
                tasks.spawn("outbox-relay", relay.clone().run(tasks.token()));
                if component == Component::Auth {
                    let auth = plinth_auth::Auth::new(
                        db.clone(),
                        cfg.auth.clone(),
                        plinth_auth::LoginThrottle::new(state.clone(), plinth_auth::Limits::default()),
                        Revocations::new(state.clone()),
                        Some(relay.clone()),
                        keyring(&cfg, Component::Auth)?,
                    )
                    .await?;
                    builder = builder.add_service(
                        AuthServiceServer::new(plinth_auth::AuthGrpc::new(
                            auth.clone(),
                            TrustedProxies::parse(&cfg.trusted_proxies)?,
                        )),
                        plinth::FILE_DESCRIPTOR_SET,
                    );
                    builder = builder.add_service(
                        AuthorizationServiceServer::new(plinth_auth::AuthzGrpc::new(auth.rbac())),
                        plinth::FILE_DESCRIPTOR_SET,
                    );
                    health.register("plinth.auth.v1.AuthService", &required).await;
                    health.register("plinth.auth.v1.AuthorizationService", &required).await;
                    tasks.spawn("policy-view", auth.rbac().follow(POLICY_SYNC_INTERVAL, tasks.token()));
                    tasks.spawn(
                        "signing-keys",
                        auth.clone()
                            .maintain_keys(Duration::from_secs(cfg.auth.key_reload_secs), tasks.token()),
                    );
                    jwks = Some(auth.clone());
                    api_keys = Some(auth);
                }
                if component == Component::Config {
                    let keyring = keyring(&cfg, Component::Config)?;
                    if keyring.is_empty() {
                        tracing::warn!(
                            "no key encryption key configured: secret values are refused until PLINTH_CONFIG__KEYS or PLINTH_CONFIG__KEYS_FILE is set"
                        );
                    }
                    let config = plinth_config::Configuration::new(
                        plinth_config::Store::new(db.clone()),
                        keyring,
                        cfg.config.clone(),
                        Some(relay.clone()),
                    )
                    .with_tasks(tasks.clone());
                    builder = builder.add_service(
                        plinth_config::ConfigServer::new(config.clone()),
                        plinth::FILE_DESCRIPTOR_SET,
                    );
                    health.register("plinth.config.v1.ConfigService", &required).await;
                    tasks.spawn(
                        "config-feeds",
                        config
                            .hub()
                            .clone()
                            .follow(Duration::from_millis(cfg.config.poll_ms), tasks.token()),
                    );
                    tasks.spawn("config-hints", config.clone().follow_events(bus.clone(), tasks.token()));
                    if cfg.only.contains(Component::Ai) && !wanted_secrets.is_empty() {
                        let live = Arc::new(plinth_config::LiveSecrets::new(
                            config.clone(),
                            Component::Ai.name(),
                            wanted_secrets.clone(),
                        ));
                        tasks.spawn("ai-provider-keys", live.clone().follow(tasks.token()));
                        secrets = Some(live);
                    }
                    tasks.spawn("config-compaction", config.compact(COMPACTION_INTERVAL, tasks.token()));
                }
                if component == Component::Queue {
                    let queues = plinth_queue::Queues::new(
                        plinth_queue::Store::new(db.clone()),
                        cfg.queue.clone(),
                        Some(relay.clone()),
                    )
                    .with_tasks(tasks.clone());
                    builder = builder.add_service(
                        QueueServiceServer::new(plinth_queue::QueueGrpc::new(queues.clone())),
                        plinth::FILE_DESCRIPTOR_SET,
                    );
                    health.register("plinth.queue.v1.QueueService", &required).await;
                    tasks.spawn("queue-sweeper", queues.clone().run_sweeper(tasks.token()));
                    tasks.spawn("queue-announcer", queues.clone().announce(tasks.token()));
                    tasks.spawn("queue-listener", queues.listen(tasks.token()));
                }
                if component == Component::Audit {
                    let audit = plinth_audit::Audit::open_with_tasks(
                        plinth_audit::Store::new(db.clone()),
                        cfg.audit.clone(),
                        tasks.clone(),
                    )
                    .await?;
                    builder = builder.add_service(
                        AuditServiceServer::new(plinth_audit::AuditGrpc::new(audit.clone())),
                        plinth::FILE_DESCRIPTOR_SET,
                    );
                    health.register("plinth.audit.v1.AuditService", &required).await;
                    tasks.spawn("audit-integrator", audit.clone().run_integrator(tasks.token()));
                    tasks.spawn(
                        "audit-retention",
                        audit.clone().run_retention(
                            Duration::from_secs(cfg.audit.retention_sweep_secs.max(1)),
                            tasks.token(),
                        ),
                    );
                    tasks.spawn(
                        "audit-alerts",
                        audit
                            .clone()
                            .run_alerts(Duration::from_millis(cfg.audit.alert_eval_ms.max(10)), tasks.token()),
                    );
                    if cfg.audit.ingest {
                        tasks.spawn("audit-ingest", audit.run_ingest(bus.clone(), tasks.token()));
                    }
                }
                if component == Component::Ai {
                    if secrets.is_none()
                        && !wanted_secrets.is_empty()
                        && let Some(url) = &cfg.ai.secrets_url
                    {
                        let channel = RemoteSecrets::dial(url).context("PLINTH_AI__SECRETS_URL")?;
                        let credential =
                            secrets::credential(cfg.ai.secrets_api_key.clone(), cfg.ai.secrets_api_key_file.clone());
                        let remote = Arc::new(RemoteSecrets::default());
                        tasks.spawn(
                            "ai-provider-keys",
                            remote
                                .clone()
                                .follow(channel, credential, wanted_secrets.clone(), tasks.token()),
                        );
                        secrets = Some(remote);
                    }
                    let ai = plinth_ai::Ai::new(
                        &cfg.ai,
                        db.clone(),
                        Some(relay.clone()),
                        state.clone(),
                        tasks.clone(),
                        secrets.clone(),
                    )?;
                    if cfg.ai.models.is_empty() {
                        tracing::warn!(
                            "no ai models configured: Generate and Embed answer NOT_FOUND until [[ai.models]] (or PLINTH_AI__MODELS) names some"
                        );
                    }
                    builder = builder.add_service(
                        AiServiceServer::new(plinth_ai::AiGrpc::new(ai)),
                        plinth::FILE_DESCRIPTOR_SET,
                    );
                    health.register("plinth.ai.v1.AiService", &required).await;
                }
                tracing::info!(component = %component, storage = db.kind(), events = bus.kind(), state = state.kind(), "component ready");
                Some(db)
            };
            let requires: &[&str] = if db.is_some() { &required } else { &[] };
            health.register(component.name(), requires).await;
            running.push(Running { component, db });
        }

        let dbs: Vec<Db> = running.iter().filter_map(|r| r.db.clone()).collect();
        let mut probes: Vec<(String, Probe)> = Vec::new();
        if !dbs.is_empty() {
            let dbs = dbs.clone();
            probes.push((
                "database".into(),
                Arc::new(move || {
                    let dbs = dbs.clone();
                    async move {
                        for db in &dbs {
                            db.ping().await.map_err(|e| e.to_string())?;
                        }
                        Ok(())
                    }
                    .boxed()
                }),
            ));
        }
        if cfg.nats_url.is_some() {
            let bus = bus.clone();
            probes.push((
                "nats".into(),
                Arc::new(move || {
                    let bus = bus.clone();
                    async move { bus.ping().await.map_err(|e| e.to_string()) }.boxed()
                }),
            ));
        }
        if cfg.redis_url.is_some() {
            let state = state.clone();
            probes.push((
                "redis".into(),
                Arc::new(move || {
                    let state = state.clone();
                    async move { state.ping().await.map_err(|e| e.to_string()) }.boxed()
                }),
            ));
        }
        tasks.spawn(
            "health-monitor",
            health.clone().monitor(probes, PROBE_INTERVAL, tasks.token()),
        );
        tasks.spawn(
            "pool-metrics",
            pool_metrics(
                running
                    .iter()
                    .filter_map(|r| r.db.clone().map(|d| (r.component, d)))
                    .collect(),
                tasks.token(),
            ),
        );

        if jwks.is_none()
            && let Some(url) = &cfg.auth.url
        {
            let remote = Arc::new(GrpcJwksSource::new(url).map_err(anyhow::Error::msg)?);
            jwks = Some(remote.clone());
            api_keys = Some(remote);
        }
        let authenticator = jwks.map(|source| {
            let refresh = Duration::from_secs(cfg.auth.jwks_refresh_secs);
            let mut a = Authenticator::new(source, &cfg.auth.issuer, &cfg.auth.audience, refresh)
                .with_revocations(Revocations::new(state.clone()));
            if let Some(keys) = api_keys {
                a = a.with_api_keys(keys);
            }
            Arc::new(a)
        });
        let permissions = PermissionMap::from_descriptor_set(plinth::FILE_DESCRIPTOR_SET)?;
        builder = builder
            .with_auth(AuthLayer::new(authenticator, permissions).with_refusals(Refusals::start(bus.clone(), &tasks)));

        let mut server = builder.bind(cfg.grpc_listen, cfg.http_listen, cfg.tls.as_ref()).await?;
        if cfg.only.contains(Component::Gateway) {
            let gateway = gateway(&cfg, &server, state.clone())?;
            server.add_gateway(gateway.router());
        }
        tracing::info!(
            grpc_addr = %server.grpc_addr,
            http_addr = %server.http_addr,
            components = %cfg.only,
            tls = cfg.tls.is_some(),
            "plinthd listening"
        );
        Ok(Plinth {
            server,
            tasks,
            running,
            grace: Duration::from_secs(cfg.shutdown_grace_secs),
        })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.server.grpc_addr
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.server.http_addr
    }

    /// Serves until `shutdown` is cancelled, then: health NOT_SERVING →
    /// servers drain → relays flush and background tasks stop → pools close.
    pub async fn run_until(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let served = self.server.serve(shutdown, self.grace).await;
        let clean = self.tasks.shutdown(self.grace).await;
        for r in &self.running {
            if let Some(db) = &r.db {
                db.close().await;
            }
        }
        served?;
        tracing::info!(clean, "plinthd stopped");
        Ok(())
    }
}

/// The HTTP/JSON edge: local components in-process, the others at their
/// configured upstream URLs (auth also at `PLINTH_AUTH__URL`).
fn gateway(cfg: &Config, server: &BoundServer, state: SharedStateRef) -> anyhow::Result<Gateway> {
    let local: Vec<&str> = cfg
        .only
        .enabled()
        .into_iter()
        .filter(|c| *c != Component::Gateway)
        .map(|c| c.name())
        .collect();
    let mut upstreams = Upstreams::new().in_process(server.in_process(), &local);
    for (component, url) in &cfg.gateway.upstreams {
        if !upstreams.serves(component) {
            upstreams = upstreams.remote(component, url)?;
        }
    }
    if !upstreams.serves("auth")
        && let Some(url) = &cfg.auth.url
    {
        upstreams = upstreams.remote("auth", url)?;
    }
    let g = &cfg.gateway;
    let options = GatewayOptions {
        body_limit: g.body_limit_bytes,
        default_timeout: Duration::from_millis(g.default_timeout_ms),
        cors_origins: g
            .cors_origins
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        rate_limit: (g.rate_limit_per_sec > 0.0)
            .then(|| RateLimiter::new(state, "gateway", g.rate_limit_per_sec, g.rate_limit_burst)),
        compression: g.compression,
        health: Some(server.health()),
        trusted_proxies: TrustedProxies::parse(&cfg.trusted_proxies)?,
    };
    Ok(Gateway::new(plinth::FILE_DESCRIPTOR_SET, upstreams, options)?)
}

/// The keyring `component` seals its secrets at rest with (auth: token
/// signing keys; config: secret values): `PLINTH_<COMPONENT>__KEYS`/`_FILE`,
/// or on an embedded deployment `<data dir>/<component>-keys`, generated at
/// first start. Empty with PostgreSQL and no keys given.
fn keyring(cfg: &Config, component: Component) -> anyhow::Result<Keyring> {
    let (setting, keys, keys_file, protects) = match component {
        Component::Auth => (
            "PLINTH_AUTH__KEYS",
            cfg.auth.keys.as_ref(),
            cfg.auth.keys_file.as_deref(),
            "token signing keys",
        ),
        Component::Config => (
            "PLINTH_CONFIG__KEYS",
            cfg.config.keys.as_ref(),
            cfg.config.keys_file.as_deref(),
            "config secrets",
        ),
        other => anyhow::bail!("{other} keeps no secrets at rest"),
    };
    let generated = cfg.data_dir.join(format!("{component}-keys"));
    Ok(Keyring::load(KeySources {
        setting,
        keys,
        keys_file,
        generate_at: cfg.database_url.is_none().then_some(generated.as_path()),
        protects,
    })?)
}

/// Each component's own tables (beside the runtime's outbox).
fn migrations(component: Component) -> Migrations {
    match component {
        Component::Auth => plinth_auth::MIGRATIONS,
        Component::Config => plinth_config::MIGRATIONS,
        Component::Queue => plinth_queue::MIGRATIONS,
        Component::Audit => plinth_audit::MIGRATIONS,
        Component::Ai => plinth_ai::MIGRATIONS,
        Component::Gateway => Migrations::RUNTIME_ONLY,
    }
}

/// How often each database's planner statistics are refreshed (SQLite;
/// PostgreSQL's autovacuum does it itself).
const OPTIMIZE_EVERY: u32 = 60;

async fn pool_metrics(dbs: Vec<(Component, Db)>, token: CancellationToken) -> Result<(), std::convert::Infallible> {
    let mut round: u32 = 0;
    loop {
        for (c, db) in &dbs {
            db.record_pool_metrics(c.name());
            // Every 5 minutes, starting 5 minutes in.
            if round > 0
                && round.is_multiple_of(OPTIMIZE_EVERY)
                && let Err(e) = db.optimize().await
            {
                tracing::warn!(component = %c, error = %e, "refreshing planner statistics failed");
            }
        }
        round = round.wrapping_add(1);
        if !plinth_runtime::tasks::pause(&token, Duration::from_secs(5)).await {
            return Ok(());
        }
    }
}
