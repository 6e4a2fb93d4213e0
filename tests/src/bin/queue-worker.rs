//! A worker process for the crash test: leases messages, reports their ids
//! on stdout, then hangs "mid-job" until it is killed. Arguments: gRPC URL,
//! access token, queue, how many to lease, lease milliseconds.

use std::io::Write;
use std::time::Duration;

use plinth::queue::v1::queue_service_client::QueueServiceClient;
use plinth::queue::v1::{self as pb};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, token, queue, count, lease_ms] = args.as_slice() else {
        anyhow::bail!("usage: queue-worker <grpc-url> <token> <queue> <count> <lease-ms>");
    };
    let mut client = QueueServiceClient::connect(url.clone()).await?;
    let mut req = tonic::Request::new(pb::LeaseRequest {
        queue: queue.clone(),
        max_messages: count.parse()?,
        lease_duration: Some(plinth_runtime::wire::duration(lease_ms.parse()?)),
        wait: Some(plinth_runtime::wire::duration(5_000)),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let leased = client.lease(req).await?.into_inner().messages;
    let ids: Vec<String> = leased
        .iter()
        .filter_map(|l| l.message.as_ref().map(|m| m.id.to_string()))
        .collect();
    let mut out = std::io::stdout().lock();
    writeln!(out, "leased {}", ids.join(","))?;
    out.flush()?;
    drop(out);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    Ok(())
}
