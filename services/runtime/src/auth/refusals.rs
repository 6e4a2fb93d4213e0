//! A refusal for a missing permission is an audit event: the auth layer
//! reports it on the bus as `plinth.<service>.access_denied`. A refusal
//! changes no state, so there is no transaction to carry it through an
//! outbox; a bounded queue and a publisher that retries while the bus is down
//! stand in. Reporting never slows or fails the refusal itself: a flood
//! beyond the queue is dropped and counted.

use std::sync::LazyLock;
use std::time::Duration;

use plinth::auth::v1::AccessDeniedEvent;
use prometheus::IntCounterVec;
use prost::Message;
use tokio::sync::mpsc;

use super::Principal;
use crate::Tasks;
use crate::events::{Event, SharedBus};

/// Refusals waiting for the bus; beyond this they are dropped.
const QUEUE: usize = 10_000;

static DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "plinth_auth_refusals_dropped_total",
        "Permission refusals not reported to the audit log because the report queue was full.",
        &["service"],
    )
});

/// Reports permission refusals to the bus (see the module docs).
#[derive(Clone)]
pub struct Refusals {
    tx: mpsc::Sender<Event>,
}

impl Refusals {
    /// Starts the publisher on `tasks`; it stops with them.
    pub fn start(bus: SharedBus, tasks: &Tasks) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tasks.spawn("refusal-reporter", publish(bus, rx, tasks.token()));
        Self { tx }
    }

    /// Queues the report that `principal` was refused `rpc` for lacking `permission`.
    pub(crate) fn report(&self, rpc: &str, permission: &str, principal: &Principal) {
        let service = service_of(rpc);
        let message = AccessDeniedEvent {
            rpc: rpc.to_owned(),
            permission: permission.to_owned(),
            subject: principal.subject.clone(),
            tenant: principal.tenant.clone(),
            api_key_id: principal.api_key.clone().unwrap_or_default(),
            roles: principal.roles.clone(),
            time: Some(crate::wire::timestamp(super::unix_now_ms())),
        };
        let mut headers = std::collections::BTreeMap::new();
        crate::telemetry::inject_current(&mut crate::telemetry::HeaderCarrier(&mut headers));
        let event = Event {
            id: uuid::Uuid::now_v7().to_string(),
            subject: format!("plinth.{service}.access_denied"),
            payload: message.encode_to_vec().into(),
            headers,
        };
        if self.tx.try_send(event).is_err() {
            DROPPED.with_label_values(&[service]).inc();
        }
    }
}

/// The component owning `rpc` (`/plinth.config.v1.ConfigService/SetValue` →
/// `config`), or `unknown` where that would not make a subject token.
fn service_of(rpc: &str) -> &str {
    let service = rpc.trim_start_matches('/').split('/').next().unwrap_or_default();
    Some(crate::component::component_of(service))
        .filter(|s| service.starts_with("plinth.") && !s.is_empty())
        .filter(|s| s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
        .unwrap_or("unknown")
}

/// Publishes each queued refusal, retrying one that the bus refuses with a
/// growing pause (the bus deduplicates by event id, so a retry after a lost
/// acknowledgement is harmless).
async fn publish(
    bus: SharedBus,
    mut rx: mpsc::Receiver<Event>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), std::convert::Infallible> {
    while let Some(event) = tokio::select! {
        e = rx.recv() => e,
        () = stop.cancelled() => None,
    } {
        let mut pause = Duration::from_millis(100);
        loop {
            match bus.publish(&event).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(subject = %event.subject, error = %e, "cannot report a refusal yet; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = stop.cancelled() => return Ok(()),
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::service_of;

    #[test]
    fn the_service_is_read_from_the_rpc_path() {
        assert_eq!(service_of("/plinth.config.v1.ConfigService/SetValue"), "config");
        assert_eq!(service_of("/plinth.auth.v1.AuthorizationService/Check"), "auth");
        assert_eq!(service_of("/grpc.health.v1.Health/Check"), "unknown");
        assert_eq!(service_of("/plinth..x/Y"), "unknown");
    }
}
