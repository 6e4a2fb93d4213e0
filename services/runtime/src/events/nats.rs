//! The NATS JetStream bus: one stream (`PLINTH` by default) holds every
//! `plinth.>` subject; publishes wait for the stream's ack and carry the event
//! id as `Nats-Msg-Id`, so a republish inside the dedup window is stored once.
//! The stream is created lazily, so NATS may be down when `plinthd` starts.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::OnceCell;

use super::{
    Acker, BusError, ConsumerSpec, Delivery, EVENT_ID_HEADER, Event, EventBus, Listener, Subscription, validate_subject,
};

/// How long a publish or management request may wait for NATS.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An event bus on NATS JetStream.
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    stream_name: String,
    dedup_window: Duration,
    stream: OnceCell<stream::Stream>,
}

impl NatsBus {
    /// Connects to `url` in the background (the call returns even if NATS is
    /// down) and uses stream `stream_name`.
    pub async fn connect(url: &SecretString, stream_name: &str, dedup_window: Duration) -> Result<Self, BusError> {
        let options = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(REQUEST_TIMEOUT)
            .request_timeout(Some(REQUEST_TIMEOUT))
            .max_reconnects(None)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                    other => tracing::debug!(event = %other, "nats event"),
                }
            });
        let client = async_nats::connect_with_options(url.expose_secret(), options)
            .await
            .map_err(|e| BusError::Rejected(format!("PLINTH_NATS_URL: {e}")))?;
        // Give a reachable server a moment, so the first publish does not
        // fail fast merely because the handshake is still running.
        for _ in 0..40 {
            if client.connection_state() == async_nats::connection::State::Connected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let js = jetstream::new(client.clone());
        let bus = Self {
            client,
            js,
            stream_name: stream_name.to_owned(),
            dedup_window,
            stream: OnceCell::new(),
        };
        // Create the stream now when NATS is up; otherwise on first use.
        if bus.connected().is_ok()
            && let Err(e) = bus.stream().await
        {
            tracing::warn!(error = %e, "jetstream stream not ready yet, will retry on first use");
        }
        Ok(bus)
    }

    async fn stream(&self) -> Result<&stream::Stream, BusError> {
        self.stream
            .get_or_try_init(|| async {
                self.js
                    .get_or_create_stream(stream::Config {
                        name: self.stream_name.clone(),
                        subjects: vec!["plinth.>".to_owned()],
                        duplicate_window: self.dedup_window,
                        storage: stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| BusError::Unavailable(format!("creating stream {}: {e}", self.stream_name)))
            })
            .await
    }

    fn connected(&self) -> Result<(), BusError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            other => Err(BusError::Unavailable(format!("nats is {other}"))),
        }
    }
}

struct NatsAck(jetstream::Message);

#[async_trait::async_trait]
impl Acker for NatsAck {
    async fn ack(&self) -> Result<(), BusError> {
        // Double ack: returns only once the server has recorded it, so an
        // acked event is not redelivered after a consumer restart.
        self.0
            .double_ack()
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))
    }

    async fn nack(&self, delay: Duration) -> Result<(), BusError> {
        self.0
            .ack_with(jetstream::AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))
    }
}

/// The event a NATS message carries (its id from `Nats-Msg-Id`).
fn event_of(msg: &async_nats::Message) -> Event {
    let mut headers = BTreeMap::new();
    let mut id = String::new();
    if let Some(h) = &msg.headers {
        for (name, values) in h.iter() {
            let value = values.first().map(|v| v.as_str().to_owned()).unwrap_or_default();
            if AsRef::<str>::as_ref(name) == EVENT_ID_HEADER {
                id = value;
            } else {
                headers.insert(name.to_string(), value);
            }
        }
    }
    Event {
        id,
        subject: msg.subject.to_string(),
        payload: msg.payload.clone(),
        headers,
    }
}

fn to_delivery(msg: jetstream::Message) -> Delivery {
    let attempt = msg.info().map(|i| u64::try_from(i.delivered).unwrap_or(1)).unwrap_or(1);
    Delivery::new(event_of(&msg.message), attempt, Box::new(NatsAck(msg)))
}

#[async_trait::async_trait]
impl EventBus for NatsBus {
    async fn publish(&self, event: &Event) -> Result<(), BusError> {
        validate_subject(&event.subject)?;
        self.connected()?;
        self.stream().await?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(EVENT_ID_HEADER, event.id.as_str());
        for (k, v) in &event.headers {
            headers.insert(k.as_str(), v.as_str());
        }
        let ack = self
            .js
            .publish_with_headers(event.subject.clone(), headers, event.payload.clone())
            .await
            .map_err(|e| BusError::Unavailable(format!("publishing {}: {e}", event.subject)))?;
        tokio::time::timeout(REQUEST_TIMEOUT, ack)
            .await
            .map_err(|_| BusError::Unavailable(format!("no ack for {} within {REQUEST_TIMEOUT:?}", event.subject)))?
            .map_err(|e| BusError::Unavailable(format!("publishing {}: {e}", event.subject)))?;
        Ok(())
    }

    async fn subscribe(&self, spec: &ConsumerSpec) -> Result<Subscription, BusError> {
        if spec.durable.is_empty() || spec.durable.contains(['.', '*', '>', ' ']) {
            return Err(BusError::Rejected(format!(
                "durable name `{}` is not a plain token",
                spec.durable
            )));
        }
        self.connected()?;
        let stream = self.stream().await?;
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &spec.durable,
                consumer::pull::Config {
                    durable_name: Some(spec.durable.clone()),
                    filter_subject: spec.filter.clone(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: spec.ack_wait,
                    deliver_policy: if spec.from_start {
                        consumer::DeliverPolicy::All
                    } else {
                        consumer::DeliverPolicy::New
                    },
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| BusError::Unavailable(format!("creating consumer {}: {e}", spec.durable)))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| BusError::Unavailable(format!("consuming {}: {e}", spec.durable)))?;
        Ok(Box::pin(messages.map(|m| match m {
            Ok(msg) => Ok(to_delivery(msg)),
            Err(e) => Err(BusError::Unavailable(e.to_string())),
        })))
    }

    async fn listen(&self, filter: &str) -> Result<Listener, BusError> {
        self.connected()?;
        let sub = self
            .client
            .subscribe(filter.to_owned())
            .await
            .map_err(|e| BusError::Unavailable(format!("listening on {filter}: {e}")))?;
        Ok(Box::pin(sub.map(|msg| event_of(&msg))))
    }

    async fn ping(&self) -> Result<(), BusError> {
        self.connected()?;
        tokio::time::timeout(REQUEST_TIMEOUT, self.client.flush())
            .await
            .map_err(|_| BusError::Unavailable("nats flush timed out".into()))?
            .map_err(|e| BusError::Unavailable(e.to_string()))
    }

    fn kind(&self) -> &'static str {
        "nats"
    }
}
