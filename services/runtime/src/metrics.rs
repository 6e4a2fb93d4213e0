//! Prometheus metrics: one registry per process, rendered at `/metrics`.
//! Each module registers its own families here once; nothing else creates
//! registries.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// The metric families the runtime itself maintains.
pub struct RuntimeMetrics {
    /// `plinth_grpc_requests_total{rpc, code}`.
    pub grpc_requests: IntCounterVec,
    /// `plinth_grpc_request_duration_seconds{rpc}`.
    pub grpc_duration: HistogramVec,
    /// `plinth_db_pool_connections{component, state}` (state = idle | busy).
    pub db_pool: IntGaugeVec,
    /// `plinth_outbox_pending{component}`: outbox rows not yet published.
    pub outbox_pending: IntGaugeVec,
    /// `plinth_events_published_total{component}`.
    pub events_published: IntCounterVec,
    /// `plinth_circuit_breaker_state{breaker}`: 0 closed, 1 half-open, 2 open.
    pub breaker_state: IntGaugeVec,
    /// `plinth_backend_up{backend}`: 1 when the last probe succeeded.
    pub backend_up: IntGaugeVec,
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

/// Families by name, so a second registration returns the exported one.
static FAMILIES: LazyLock<Mutex<HashMap<String, Box<dyn Any + Send + Sync>>>> = LazyLock::new(Default::default);

static RUNTIME: LazyLock<RuntimeMetrics> = LazyLock::new(|| RuntimeMetrics {
    grpc_requests: counter_vec(
        "plinth_grpc_requests_total",
        "gRPC calls by RPC and status code",
        &["rpc", "code"],
    ),
    grpc_duration: histogram_vec(
        "plinth_grpc_request_duration_seconds",
        "gRPC call latency until response headers, by RPC",
        &["rpc"],
        vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ],
    ),
    db_pool: gauge_vec(
        "plinth_db_pool_connections",
        "Database pool connections by state",
        &["component", "state"],
    ),
    outbox_pending: gauge_vec(
        "plinth_outbox_pending",
        "Outbox rows waiting to be published",
        &["component"],
    ),
    events_published: counter_vec(
        "plinth_events_published_total",
        "Events the outbox relay published",
        &["component"],
    ),
    breaker_state: gauge_vec(
        "plinth_circuit_breaker_state",
        "Circuit breaker state: 0 closed, 1 half-open, 2 open",
        &["breaker"],
    ),
    backend_up: gauge_vec(
        "plinth_backend_up",
        "1 when the backend's last health probe succeeded",
        &["backend"],
    ),
});

/// The runtime's own metric families.
pub fn runtime() -> &'static RuntimeMetrics {
    &RUNTIME
}

/// The process registry, for services that add their own families.
pub fn registry() -> &'static Registry {
    &REGISTRY
}

/// The text exposition of every registered family.
pub fn render() -> String {
    LazyLock::force(&RUNTIME);
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&REGISTRY.gather(), &mut buf) {
        tracing::warn!(error = %e, "metrics encoding failed");
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// Registers a counter family, or returns the one already registered by that name.
pub fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let family = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| invalid_metric(name));
    register(name, family)
}

/// Registers a gauge family, or returns the one already registered by that name.
pub fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let family = IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| invalid_metric(name));
    register(name, family)
}

/// Registers a histogram family with the given buckets.
pub fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let family = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .unwrap_or_else(|_| invalid_metric(name));
    register(name, family)
}

fn register<M>(name: &str, family: M) -> M
where
    M: prometheus::core::Collector + Clone + Send + Sync + 'static,
{
    let mut families = FAMILIES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(existing) = families.get(name).and_then(|f| f.downcast_ref::<M>()) {
        return existing.clone();
    }
    if let Err(e) = REGISTRY.register(Box::new(family.clone())) {
        tracing::warn!(metric = name, error = %e, "metric family not registered");
    }
    families.insert(name.to_owned(), Box::new(family.clone()));
    family
}

#[expect(
    clippy::panic,
    reason = "metric names and labels are compile-time constants; a bad one is a bug"
)]
fn invalid_metric(name: &str) -> ! {
    panic!("invalid metric definition for {name}")
}
