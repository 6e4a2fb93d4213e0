//! Audit helpers shared by the end-to-end tests: wait for entries to be
//! integrated, and prove one against the signed checkpoint with the
//! independent RFC 9162 verifier of [`crate::rfc9162`].

use std::time::{Duration, Instant};

use plinth::audit::v1::audit_service_client::AuditServiceClient;
use plinth::audit::v1::{self as pb};
use tonic::transport::Channel;

use crate::rfc9162::{H, checkpoint_verifies, leaf, verify_inclusion};
use crate::with_bearer;

/// A 32-byte hash from the wire; zeros where it is shorter.
pub fn hash(b: &[u8]) -> H {
    let mut h = [0u8; 32];
    let n = b.len().min(32);
    h[..n].copy_from_slice(&b[..n]);
    h
}

/// Waits until the entries matching `request` number `count` and are all
/// integrated; returns them.
pub async fn wait_for_entries(
    client: &mut AuditServiceClient<Channel>,
    token: &str,
    request: pb::ListEventsRequest,
    count: usize,
    within: Duration,
) -> anyhow::Result<Vec<pb::Entry>> {
    let deadline = Instant::now() + within;
    loop {
        let entries = client
            .list_events(with_bearer(request.clone(), token))
            .await?
            .into_inner()
            .entries;
        if entries.len() >= count && entries.iter().all(|e| e.integrated) {
            return Ok(entries);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {count} audit entries after {within:?}: {entries:?}",
            entries.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks `entry` against the public checkpoint with the independent verifier.
pub async fn prove(client: &mut AuditServiceClient<Channel>, token: &str, entry: &pb::Entry) -> anyhow::Result<()> {
    let checkpoint = client.get_checkpoint(pb::GetCheckpointRequest {}).await?.into_inner();
    let c = checkpoint.checkpoint.ok_or_else(|| anyhow::anyhow!("no checkpoint"))?;
    let size = u64::try_from(c.tree_size)?;
    let root = hash(&c.root_hash);
    anyhow::ensure!(
        checkpoint_verifies(&c.note, &checkpoint.verifier_key, &c.origin, size, &root),
        "the checkpoint note does not verify: {}",
        c.note
    );
    let event_id = entry.event.as_ref().map(|e| e.id.clone()).unwrap_or_default();
    let proof = client
        .get_inclusion_proof(with_bearer(
            pb::GetInclusionProofRequest {
                event_id,
                tree_size: c.tree_size,
                ..Default::default()
            },
            token,
        ))
        .await?
        .into_inner();
    let path: Vec<H> = proof.hashes.iter().map(|h| hash(h)).collect();
    let leaf_hash = leaf(&entry.leaf_data);
    anyhow::ensure!(proof.index == entry.index, "the proof is for another entry");
    anyhow::ensure!(
        verify_inclusion(u64::try_from(entry.index)?, size, &leaf_hash, &path, &root),
        "the inclusion proof of entry {} does not verify against the checkpoint",
        entry.index
    );
    Ok(())
}
