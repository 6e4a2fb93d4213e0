//! Typed helpers for the queue service in tests: an admin session with a
//! fresh queue, and short ways to enqueue, lease and ack.

use std::time::Duration;

use plinth::queue::v1::queue_service_client::QueueServiceClient;
use plinth::queue::v1::{self as pb};
use tonic::transport::Channel;

use crate::{ADMIN_EMAIL, ADMIN_PASSWORD, TestApp, access_token, unique, with_bearer};

/// A queue client signed in as the administrator, with a queue to work in.
pub struct QueueSession {
    /// The gRPC client.
    pub client: QueueServiceClient<Channel>,
    /// The caller's access token.
    pub token: String,
    /// The queue this session created.
    pub queue: String,
}

/// A queue name no other test uses.
pub fn fresh_queue(label: &str) -> String {
    format!("{label}-{}", unique().replace('_', "-"))
}

/// A protobuf duration of `ms` milliseconds.
pub fn millis(ms: i64) -> prost_types::Duration {
    plinth_runtime::wire::duration(ms)
}

impl QueueSession {
    /// Signs in as the bootstrap administrator (the app needs
    /// [`crate::with_admin`]) and creates a queue with `settings`.
    pub async fn admin(app: &TestApp, settings: pb::QueueSettings) -> anyhow::Result<Self> {
        let mut auth = app.auth().await?;
        let token = access_token(&mut auth, ADMIN_EMAIL, ADMIN_PASSWORD).await?;
        let mut s = Self {
            client: QueueServiceClient::new(app.channel().await?),
            token,
            queue: fresh_queue("jobs"),
        };
        s.client
            .create_queue(with_bearer(
                pb::CreateQueueRequest {
                    queue: Some(pb::Queue {
                        name: s.queue.clone(),
                        settings: Some(settings),
                        ..pb::Queue::default()
                    }),
                },
                &s.token,
            ))
            .await?;
        Ok(s)
    }

    /// Another session of the same caller on `channel`, for the same queue.
    pub fn on(&self, channel: Channel) -> Self {
        Self {
            client: QueueServiceClient::new(channel),
            token: self.token.clone(),
            queue: self.queue.clone(),
        }
    }

    /// `message` with this session's credentials.
    pub fn req<T>(&self, message: T) -> tonic::Request<T> {
        with_bearer(message, &self.token)
    }

    /// Enqueues payloads in one batch; their ids.
    pub async fn enqueue(&mut self, payloads: &[&str]) -> Result<Vec<i64>, tonic::Status> {
        let messages = payloads
            .iter()
            .map(|p| pb::NewMessage {
                payload: p.as_bytes().to_vec().into(),
                ..pb::NewMessage::default()
            })
            .collect();
        let req = self.req(pb::EnqueueBatchRequest {
            queue: self.queue.clone(),
            messages,
        });
        Ok(self
            .client
            .enqueue_batch(req)
            .await?
            .into_inner()
            .results
            .into_iter()
            .map(|r| r.message_id)
            .collect())
    }

    /// Leases up to `max` messages for `lease`, waiting up to `wait`.
    pub async fn lease(
        &mut self,
        max: i32,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<pb::LeasedMessage>, tonic::Status> {
        let req = self.req(pb::LeaseRequest {
            queue: self.queue.clone(),
            max_messages: max,
            lease_duration: Some(millis(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX))),
            wait: Some(millis(i64::try_from(wait.as_millis()).unwrap_or(0))),
        });
        Ok(self.client.lease(req).await?.into_inner().messages)
    }

    /// Acks deliveries; the outcomes.
    pub async fn ack(&mut self, leased: &[pb::LeasedMessage]) -> Result<Vec<pb::AckOutcome>, tonic::Status> {
        let acks = leased
            .iter()
            .map(|l| pb::AckEntry {
                message_id: l.message.as_ref().map_or(0, |m| m.id),
                lease_token: l.lease_token.clone(),
            })
            .collect();
        let req = self.req(pb::AckRequest {
            queue: self.queue.clone(),
            acks,
        });
        Ok(self
            .client
            .ack(req)
            .await?
            .into_inner()
            .outcomes
            .into_iter()
            .map(|o| pb::AckOutcome::try_from(o).unwrap_or(pb::AckOutcome::Unspecified))
            .collect())
    }

    /// The queue's counts.
    pub async fn counts(&mut self) -> Result<pb::QueueCounts, tonic::Status> {
        let req = self.req(pb::GetQueueRequest {
            queue: self.queue.clone(),
        });
        Ok(self
            .client
            .get_queue(req)
            .await?
            .into_inner()
            .queue
            .and_then(|q| q.counts)
            .unwrap_or_default())
    }
}

/// The payload of a leased message as text.
pub fn payload_of(l: &pb::LeasedMessage) -> String {
    l.message
        .as_ref()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .unwrap_or_default()
}
