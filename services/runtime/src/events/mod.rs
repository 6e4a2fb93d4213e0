//! Events between services: the [`EventBus`] trait with an in-process and a
//! NATS JetStream implementation, and the transactional outbox that feeds it.
//! Payloads are protobuf bytes; subjects are `plinth.<service>.<event>`;
//! W3C trace context travels in headers. Consumers are durable and
//! at-least-once: a delivery that is not acked comes back.

mod memory;
mod nats;
pub mod outbox;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;

pub use memory::InProcessBus;
pub use nats::NatsBus;

/// The subject prefix every Plinth event uses.
pub const SUBJECT_PREFIX: &str = "plinth.";

/// The header carrying an event's id, used for deduplication (JetStream's name).
pub const EVENT_ID_HEADER: &str = "Nats-Msg-Id";

/// One event on the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Unique id; publishing the same id twice within the dedup window stores it once.
    pub id: String,
    /// `plinth.<service>.<event>`.
    pub subject: String,
    /// The protobuf-encoded event message.
    pub payload: Bytes,
    /// Trace context and other string headers.
    pub headers: BTreeMap<String, String>,
}

/// A bus operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The broker is unreachable or did not acknowledge in time.
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
    /// The request was rejected (bad subject, bad consumer settings).
    #[error("event bus rejected the request: {0}")]
    Rejected(String),
}

/// A durable consumer's settings.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Durable name; a consumer resumes where the last one with this name stopped.
    pub durable: String,
    /// Subject filter with NATS wildcards (`plinth.>`, `plinth.*.changed`).
    pub filter: String,
    /// How long a delivery may stay unacked before it is redelivered.
    pub ack_wait: Duration,
    /// Where a consumer that does not exist yet starts: the oldest event
    /// the bus still holds (`true`), or the next one published (`false`).
    /// An existing durable consumer always resumes where it stopped.
    pub from_start: bool,
}

impl ConsumerSpec {
    /// A consumer of `filter` named `durable`, with a 30 s ack wait,
    /// starting (when new) from the oldest event held.
    pub fn new(durable: impl Into<String>, filter: impl Into<String>) -> Self {
        Self {
            durable: durable.into(),
            filter: filter.into(),
            ack_wait: Duration::from_secs(30),
            from_start: true,
        }
    }
}

/// Settles a delivery; implemented per backend.
#[async_trait::async_trait]
pub trait Acker: Send + Sync {
    /// Done: never deliver again.
    async fn ack(&self) -> Result<(), BusError>;
    /// Failed: deliver again after `delay`.
    async fn nack(&self, delay: Duration) -> Result<(), BusError>;
}

/// One delivery of an event to a durable consumer.
pub struct Delivery {
    /// The event.
    pub event: Event,
    /// 1 on first delivery, more on redelivery.
    pub attempt: u64,
    acker: Box<dyn Acker>,
}

impl Delivery {
    /// A delivery settled through `acker`.
    pub fn new(event: Event, attempt: u64, acker: Box<dyn Acker>) -> Self {
        Self { event, attempt, acker }
    }

    /// Acknowledges the delivery.
    pub async fn ack(self) -> Result<(), BusError> {
        self.acker.ack().await
    }

    /// Asks for redelivery after `delay`.
    pub async fn nack(self, delay: Duration) -> Result<(), BusError> {
        self.acker.nack(delay).await
    }
}

/// The stream of deliveries of one subscription. It ends (or yields an error)
/// when the backend goes away; subscribe again to resume.
pub type Subscription = Pin<Box<dyn Stream<Item = Result<Delivery, BusError>> + Send>>;

/// Live events of a [`EventBus::listen`]; it ends when the backend goes away.
pub type Listener = Pin<Box<dyn Stream<Item = Event> + Send>>;

/// Publishes events and serves durable consumers.
#[async_trait::async_trait]
pub trait EventBus: Send + Sync {
    /// Publishes `event` and returns once the bus has stored it.
    async fn publish(&self, event: &Event) -> Result<(), BusError>;
    /// Opens (or resumes) the durable consumer described by `spec`.
    async fn subscribe(&self, spec: &ConsumerSpec) -> Result<Subscription, BusError>;
    /// Live events matching `filter` (NATS wildcards) from now on, best
    /// effort: no replay, no acknowledgement, nothing kept while away. For
    /// hints (waking a follower, dropping a cache entry), never for work
    /// that must happen; that is what [`EventBus::subscribe`] is for.
    async fn listen(&self, filter: &str) -> Result<Listener, BusError>;
    /// Whether the bus is reachable now.
    async fn ping(&self) -> Result<(), BusError>;
    /// `"in-process"` or `"nats"`, for logs.
    fn kind(&self) -> &'static str;
}

/// A shared handle to the configured bus.
pub type SharedBus = Arc<dyn EventBus>;

/// Whether `subject` matches the NATS-style `filter` (`*` one token, `>` the rest).
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Checks that `subject` is a concrete `plinth.<service>.<event>` subject.
pub fn validate_subject(subject: &str) -> Result<(), BusError> {
    let parts: Vec<&str> = subject.split('.').collect();
    let valid_token = |t: &&str| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if parts.len() < 3 || parts[0] != "plinth" || !parts.iter().all(valid_token) {
        return Err(BusError::Rejected(format!(
            "subject `{subject}` is not plinth.<service>.<event>"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_nats() {
        assert!(subject_matches("plinth.>", "plinth.config.changed"));
        assert!(subject_matches("plinth.*.changed", "plinth.config.changed"));
        assert!(!subject_matches("plinth.*.changed", "plinth.config.value.changed"));
        assert!(!subject_matches("plinth.>", "plinth"));
        assert!(subject_matches("plinth.queue.dead", "plinth.queue.dead"));
        assert!(!subject_matches("plinth.queue", "plinth.queue.dead"));
    }

    #[test]
    fn subjects_must_be_plinth_service_event() {
        assert!(validate_subject("plinth.config.changed").is_ok());
        assert!(validate_subject("plinth.config").is_err());
        assert!(validate_subject("other.config.changed").is_err());
        assert!(validate_subject("plinth.*.changed").is_err());
    }
}
