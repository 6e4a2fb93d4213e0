//! The durable consumer of every Plinth event (`plinth.>`): deliveries are
//! taken in batches, appended in one transaction, and acknowledged only
//! after the append committed. A crash or an outage in between means a
//! redelivery, which the event id turns into a duplicate that adds
//! nothing: each event lands in the log exactly once.

use std::time::Duration;

use futures::{FutureExt, StreamExt};
use plinth_runtime::events::{ConsumerSpec, Delivery, SharedBus};
use plinth_runtime::resilience::Backoff;
use tokio_util::sync::CancellationToken;

use crate::error::AuditError;
use crate::mapping::{audit_event, recorded};
use crate::service::Audit;

/// Most deliveries appended in one transaction.
const BATCH: usize = 500;
/// How long a failed batch waits before redelivery.
const RETRY_DELAY: Duration = Duration::from_secs(1);

impl Audit {
    /// Consumes `plinth.>` from `bus` into the log until `token` is
    /// cancelled, resubscribing with backoff whenever the bus goes away.
    pub async fn run_ingest(self, bus: SharedBus, token: CancellationToken) -> Result<(), AuditError> {
        let spec = ConsumerSpec {
            from_start: self.settings().replay,
            ..ConsumerSpec::new(self.settings().consumer.clone(), "plinth.>")
        };
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut failures: u32 = 0;
        loop {
            let mut sub = match bus.subscribe(&spec).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "audit cannot subscribe to events yet; retrying");
                    failures = failures.saturating_add(1);
                    if !plinth_runtime::tasks::pause(&token, backoff.delay(failures)).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            loop {
                let first = tokio::select! {
                    () = token.cancelled() => return Ok(()),
                    next = sub.next() => next,
                };
                let Some(Ok(first)) = first else { break };
                failures = 0;
                let mut batch = vec![first];
                while batch.len() < BATCH {
                    match sub.next().now_or_never() {
                        Some(Some(Ok(d))) => batch.push(d),
                        _ => break,
                    }
                }
                self.record(batch).await;
            }
            tracing::warn!("audit event subscription ended; resubscribing");
            failures = failures.saturating_add(1);
            if !plinth_runtime::tasks::pause(&token, backoff.delay(failures)).await {
                return Ok(());
            }
        }
    }

    /// Appends a batch of deliveries, then settles them all.
    async fn record(&self, batch: Vec<Delivery>) {
        let now = plinth_runtime::auth::unix_now_ms();
        let events: Vec<_> = batch
            .iter()
            .filter(|d| recorded(&d.event.subject))
            .map(|d| audit_event(&d.event, now))
            .collect();
        let appended = if events.is_empty() {
            Ok(Vec::new())
        } else {
            self.append(events).await
        };
        match appended {
            Ok(_) => {
                let acks = batch.into_iter().map(|d| d.ack());
                for r in futures::future::join_all(acks).await {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "ack of a recorded event failed; it will be redelivered and deduplicated");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, events = batch.len(), "recording events failed; they will be redelivered");
                let nacks = batch.into_iter().map(|d| d.nack(RETRY_DELAY));
                futures::future::join_all(nacks).await;
            }
        }
    }
}
