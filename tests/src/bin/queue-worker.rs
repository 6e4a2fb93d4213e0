//! A worker process for the crash tests. Arguments: gRPC URL, access token,
//! queue, how many to lease at once, lease milliseconds, and the mode:
//! `hang` (the default) leases once, reports `leased <id,id,…>` on stdout,
//! then hangs "mid-job" until it is killed; `ack` leases and acks until it is
//! killed, reporting `acked <id>` for each ack the service confirms.

use std::io::Write;
use std::time::Duration;

use plinth::queue::v1::queue_service_client::QueueServiceClient;
use plinth::queue::v1::{self as pb};
use tonic::transport::Channel;

struct Worker {
    client: QueueServiceClient<Channel>,
    bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    queue: String,
}

impl Worker {
    fn req<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        req.metadata_mut().insert("authorization", self.bearer.clone());
        req
    }

    async fn lease(&mut self, count: i32, lease_ms: i64) -> anyhow::Result<Vec<pb::LeasedMessage>> {
        let req = self.req(pb::LeaseRequest {
            queue: self.queue.clone(),
            max_messages: count,
            lease_duration: Some(plinth_runtime::wire::duration(lease_ms)),
            wait: Some(plinth_runtime::wire::duration(1_000)),
        });
        Ok(self.client.lease(req).await?.into_inner().messages)
    }
}

fn report(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (url, token, queue, count, lease_ms, mode) = match args.as_slice() {
        [u, t, q, c, l] => (u, t, q, c, l, "hang"),
        [u, t, q, c, l, m] => (u, t, q, c, l, m.as_str()),
        _ => anyhow::bail!("usage: queue-worker <grpc-url> <token> <queue> <count> <lease-ms> [hang|ack]"),
    };
    let (count, lease_ms): (i32, i64) = (count.parse()?, lease_ms.parse()?);
    let mut worker = Worker {
        client: QueueServiceClient::connect(url.clone()).await?,
        bearer: format!("Bearer {token}").parse()?,
        queue: queue.clone(),
    };
    if mode != "ack" {
        let leased = worker.lease(count, lease_ms).await?;
        let ids: Vec<String> = leased
            .iter()
            .filter_map(|l| l.message.as_ref().map(|m| m.id.to_string()))
            .collect();
        report(&format!("leased {}", ids.join(",")))?;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return Ok(());
    }
    loop {
        let leased = match worker.lease(count, lease_ms).await {
            Ok(l) => l,
            Err(e) => {
                report(&format!("error {e}"))?;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if leased.is_empty() {
            continue;
        }
        let acks = leased
            .iter()
            .filter_map(|l| {
                l.message.as_ref().map(|m| pb::AckEntry {
                    message_id: m.id,
                    lease_token: l.lease_token.clone(),
                })
            })
            .collect();
        let req = worker.req(pb::AckRequest {
            queue: worker.queue.clone(),
            acks,
        });
        let answer = worker.client.ack(req).await?.into_inner();
        for (l, outcome) in leased.iter().zip(answer.outcomes()) {
            if let (Some(m), pb::AckOutcome::Acked) = (&l.message, outcome) {
                report(&format!("acked {}", m.id))?;
            }
        }
    }
}
