//! Serving status of every registered service, driven by backend probes.
//! A service is SERVING only while each backend it requires answers; the
//! backends themselves are visible as `plinth.backend.<name>` entries so an
//! outage of an optional backend (NATS behind the outbox) is reported without
//! taking the service out of rotation.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::metrics;

/// Health probe of a backend: `Ok` when it answers.
pub type Probe = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

#[derive(Default)]
struct State {
    /// service name → backends it requires.
    services: BTreeMap<String, Vec<String>>,
    /// backend name → up.
    backends: BTreeMap<String, bool>,
    shutting_down: bool,
}

/// The process's health registry; cheap to clone.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").field("statuses", &self.statuses()).finish()
    }
}

impl Health {
    /// A registry publishing to `reporter` (from `tonic_health::server::health_reporter`).
    pub fn new(reporter: HealthReporter) -> Self {
        Self {
            reporter,
            state: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `service` as SERVING while all of `requires` are up.
    pub async fn register(&self, service: &str, requires: &[&str]) {
        {
            let mut st = self.lock();
            st.services
                .insert(service.to_owned(), requires.iter().map(|s| (*s).to_owned()).collect());
            for b in requires {
                st.backends.entry((*b).to_owned()).or_insert(true);
            }
        }
        self.publish().await;
    }

    /// Records a probe result for `backend`.
    pub async fn set_backend(&self, backend: &str, up: bool) {
        let changed = {
            let mut st = self.lock();
            st.backends.insert(backend.to_owned(), up) != Some(up)
        };
        metrics::runtime()
            .backend_up
            .with_label_values(&[backend])
            .set(i64::from(up));
        if changed {
            if up {
                tracing::info!(backend, "backend is reachable again");
            } else {
                tracing::warn!(backend, "backend is unreachable");
            }
            self.publish().await;
        }
    }

    /// Marks everything NOT_SERVING (first step of shutdown).
    pub async fn shutting_down(&self) {
        self.lock().shutting_down = true;
        self.publish().await;
    }

    /// The status of `service` ("" is the whole process), or `None` if unknown.
    pub fn status(&self, service: &str) -> Option<ServingStatus> {
        self.statuses().remove(service)
    }

    /// Every entry by name (the process as `plinthd`) with its status name,
    /// and whether all of them serve: what `/readyz` reports.
    pub fn readiness(&self) -> (bool, BTreeMap<String, &'static str>) {
        let statuses = self.statuses();
        let ready = statuses.values().all(|s| *s == ServingStatus::Serving);
        let names = statuses
            .into_iter()
            .map(|(k, v)| (if k.is_empty() { "plinthd".to_owned() } else { k }, status_name(v)))
            .collect();
        (ready, names)
    }

    /// Every entry: the process (""), each service, and `plinth.backend.<name>`.
    pub fn statuses(&self) -> BTreeMap<String, ServingStatus> {
        let st = self.lock();
        let serving = |ok: bool| {
            if ok && !st.shutting_down {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        let mut out = BTreeMap::new();
        let mut all = true;
        for (svc, reqs) in &st.services {
            let ok = reqs.iter().all(|b| st.backends.get(b).copied().unwrap_or(false));
            all &= ok;
            out.insert(svc.clone(), serving(ok));
        }
        for (b, up) in &st.backends {
            out.insert(format!("plinth.backend.{b}"), serving(*up));
        }
        out.insert(String::new(), serving(all));
        out
    }

    async fn publish(&self) {
        for (name, status) in self.statuses() {
            self.reporter.set_service_status(name, status).await;
        }
    }

    /// Probes every backend each `interval` until `token` is cancelled.
    pub async fn monitor(
        self,
        probes: Vec<(String, Probe)>,
        interval: Duration,
        token: CancellationToken,
    ) -> Result<(), std::convert::Infallible> {
        loop {
            for (name, probe) in &probes {
                let up = match tokio::time::timeout(interval.max(Duration::from_secs(1)), probe()).await {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::debug!(backend = %name, error = %e, "health probe failed");
                        false
                    }
                    Err(_) => false,
                };
                self.set_backend(name, up).await;
            }
            if !crate::tasks::pause(&token, interval).await {
                return Ok(());
            }
        }
    }
}

/// The `grpc.health.v1` name of a status (`SERVING`, `NOT_SERVING`, `UNKNOWN`).
pub fn status_name(status: ServingStatus) -> &'static str {
    match status {
        ServingStatus::Serving => "SERVING",
        ServingStatus::NotServing => "NOT_SERVING",
        ServingStatus::Unknown => "UNKNOWN",
    }
}
