//! Audit benchmark, through gRPC against a `plinthd` in a child process:
//! appends (one per call and batched) with integration and checkpointing
//! running as they do in production, the time until a bulk load is in a
//! signed checkpoint, inclusion and consistency proof latency and
//! `ListEvents` latency with filters once the log holds `--entries`
//! entries (after a `VACUUM ANALYZE`, as autovacuum would have run by then), and
//! the speed of `VerifyLog` over the whole log.
//!
//! `cargo run --release -p plinth-bench --bin audit-bench -- --seconds 5 --entries 1000000`
//! (`--database-url postgres://…` for PostgreSQL instead of SQLite,
//! `--connections 4`)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use plinth::audit::v1::audit_service_client::AuditServiceClient;
use plinth::audit::v1::{self as pb};
use plinth_bench::{
    ServerChild, admin_token, arg, channels, closed_loop, cpu_seconds, out, rss_kib, serve, server_config, storage_name,
};
use plinth_tests::with_bearer;
use tonic::transport::Channel;

/// A cheap deterministic pseudo-random sequence (no dependency needed).
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const ACTIONS: [&str; 8] = [
    "config.values.changed",
    "config.secrets.revealed",
    "auth.login.succeeded",
    "auth.login.failed",
    "auth.token.refreshed",
    "queue.queue.created",
    "queue.message.dead_lettered",
    "billing.invoice.paid",
];

/// Event `n` of the synthetic log: 1,000 actors, 8 actions, 10,000
/// resources, a correlation id per 10 events, ~450 bytes canonical.
fn event(n: u64, run: &str) -> pb::AuditEvent {
    let r = mix(n);
    let action = ACTIONS[(r % 8) as usize];
    let failed = action.ends_with("failed") || action.ends_with("dead_lettered");
    pb::AuditEvent {
        id: format!("{run}-{n}"),
        time: None,
        tenant: format!("tenant-{}", r % 10),
        actor: Some(pb::Actor {
            id: format!("user-{}", (r >> 8) % 1000),
            kind: pb::ActorKind::User as i32,
            ip: "10.1.2.3".into(),
            user_agent: "bench/1.0".into(),
        }),
        action: action.into(),
        resource: Some(pb::Resource {
            r#type: "bench.thing".into(),
            name: format!("thing-{}", (r >> 20) % 10_000),
        }),
        outcome: if failed {
            pb::Outcome::Failure as i32
        } else {
            pb::Outcome::Success as i32
        },
        reason: if failed { "BAD_PASSWORD".into() } else { String::new() },
        correlation_id: format!("{run}-c{}", n / 10),
        trace_id: String::new(),
        source: "bench".into(),
        metadata: Some(prost_types::Struct {
            fields: [(
                "detail".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue("x".repeat(120))),
                },
            )]
            .into(),
        }),
    }
}

/// Builds one listing request from a random number.
type MakeRequest = Arc<dyn Fn(u64) -> pb::ListEventsRequest + Send + Sync>;

#[derive(Clone)]
struct Bench {
    pool: Vec<Channel>,
    token: Arc<str>,
    run: Arc<str>,
}

impl Bench {
    fn client(&self, i: usize) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.pool[i % self.pool.len()].clone()).max_decoding_message_size(64 << 20)
    }

    fn req<T>(&self, m: T) -> tonic::Request<T> {
        with_bearer(m, &self.token)
    }

    async fn append(&self, w: usize, first: u64, n: u64) -> Result<(), tonic::Status> {
        let events = (first..first + n).map(|i| event(i, &self.run)).collect();
        self.client(w)
            .append_batch(self.req(pb::AppendBatchRequest { events }))
            .await?;
        Ok(())
    }

    async fn tree_size(&self) -> anyhow::Result<i64> {
        let c = self
            .client(0)
            .get_checkpoint(pb::GetCheckpointRequest {})
            .await?
            .into_inner();
        Ok(c.checkpoint.map_or(0, |c| c.tree_size))
    }

    async fn appended(&self) -> anyhow::Result<i64> {
        // The newest entry's index + 1.
        let page = self
            .client(0)
            .list_events(self.req(pb::ListEventsRequest {
                page_size: 1,
                ..Default::default()
            }))
            .await?
            .into_inner();
        Ok(page.entries.first().map_or(0, |e| e.index + 1))
    }

    /// Waits until every appended entry is in a signed checkpoint.
    async fn integrated(&self) -> anyhow::Result<i64> {
        let want = self.appended().await?;
        loop {
            let size = self.tree_size().await?;
            if size >= want {
                return Ok(size);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let database_url: String = arg("--database-url", String::new());
    if std::env::args().any(|a| a == "--serve") {
        return serve(server_config(&database_url)).await;
    }
    let seconds: u64 = arg("--seconds", 5);
    let entries: u64 = arg("--entries", 1_000_000);
    let connections: usize = arg("--connections", 4).max(1);
    let duration = Duration::from_secs(seconds);

    let server = ServerChild::start(&["--database-url", &database_url])?;
    let pid = server.pid();
    let target = server.target();
    out(&format!(
        "storage: {}   server pid {pid}   {connections} connections",
        storage_name(&database_url),
    ));
    let token = admin_token(&target).await?;
    let b = Bench {
        pool: channels(&target, connections).await?,
        token: token.into(),
        run: format!("b{}", std::process::id()).into(),
    };
    let next = Arc::new(AtomicU64::new(0));

    // 1. One event per call.
    for clients in [1usize, 32] {
        let (b2, next2) = (b.clone(), next.clone());
        let report = closed_loop(
            &format!("Append (1 per call), {clients} clients"),
            clients,
            duration,
            move |w, _| {
                let (b2, next2) = (b2.clone(), next2.clone());
                async move { b2.append(w, next2.fetch_add(1, Ordering::Relaxed), 1).await }
            },
        )
        .await;
        out(&report.line());
    }
    let t = Instant::now();
    b.integrated().await?;
    out(&format!(
        "  backlog integrated {:.0} ms after the run",
        t.elapsed().as_secs_f64() * 1e3
    ));

    // 2. Batches of 100, 4 clients.
    let (b2, next2) = (b.clone(), next.clone());
    let report = closed_loop("AppendBatch (100 per call), 4 clients", 4, duration, move |w, _| {
        let (b2, next2) = (b2.clone(), next2.clone());
        async move { b2.append(w, next2.fetch_add(100, Ordering::Relaxed), 100).await }
    })
    .await;
    out(&format!("{}   = {:.0} entries/s", report.line(), report.rate() * 100.0));

    // 3. Bulk load to `entries` with 1,000 per call; sustained rate until the
    //    last entry is in a signed checkpoint.
    let start = b.integrated().await?;
    let cpu = cpu_seconds(pid);
    let started = Instant::now();
    let loaders = (0..4).map(|w| {
        let (b, next) = (b.clone(), next.clone());
        async move {
            loop {
                let first = next.fetch_add(1000, Ordering::Relaxed);
                if first >= entries {
                    return Ok::<(), tonic::Status>(());
                }
                b.append(w, first, 1000.min(entries - first)).await?;
            }
        }
    });
    for r in futures::future::join_all(loaders).await {
        r?;
    }
    let appended_in = started.elapsed();
    let size = b.integrated().await?;
    let integrated_in = started.elapsed();
    let loaded = u64::try_from(size - start).unwrap_or(0);
    out(&format!(
        "Bulk load {loaded} entries (1,000 per call, 4 clients): appended {:.0}/s, in a signed checkpoint {:.0}/s ({:.1} s); server CPU {:.1} s, RSS {} MiB; log now {size} entries",
        loaded as f64 / appended_in.as_secs_f64(),
        loaded as f64 / integrated_in.as_secs_f64(),
        integrated_in.as_secs_f64(),
        cpu_seconds(pid) - cpu,
        rss_kib(pid) / 1024,
    ));

    // Statistics as autovacuum (PostgreSQL) or the periodic `PRAGMA
    // optimize` (SQLite) keep them in a log that grew over days, not in the
    // minutes the bulk load took: without them the planner guesses how many
    // rows an action prefix matches. On PostgreSQL the vacuum and a
    // checkpoint also finish the write-back of the bulk load, which would
    // otherwise run during the reads below (and did, by how fast it went).
    if database_url.is_empty() {
        let file = std::path::Path::new(&server.field("data")).join("audit.db");
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", file.display())).await?;
        sqlx::query("ANALYZE").execute(&pool).await?;
        pool.close().await;
    } else {
        let schema = format!("{}audit", server.field("schema_prefix"));
        let pool = sqlx::PgPool::connect(&database_url).await?;
        for table in ["audit_entries", "audit_nodes"] {
            sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE \"{schema}\".{table}")))
                .execute(&pool)
                .await?;
        }
        sqlx::query("CHECKPOINT").execute(&pool).await?;
        pool.close().await;
    }

    // 4. Proofs at this size.
    let size_u = u64::try_from(size).unwrap_or(1).max(1);
    let b2 = b.clone();
    let report = closed_loop(
        &format!("GetInclusionProof at {size} entries, 4 clients"),
        4,
        duration,
        move |w, i| {
            let b2 = b2.clone();
            async move {
                let index = (mix((w * 1_000_003 + i) as u64) % size_u) as i64;
                b2.client(w)
                    .get_inclusion_proof(b2.req(pb::GetInclusionProofRequest {
                        index,
                        ..Default::default()
                    }))
                    .await
                    .map(drop)
            }
        },
    )
    .await;
    out(&report.line());
    let b2 = b.clone();
    let report = closed_loop(
        &format!("GetConsistencyProof at {size} entries, 4 clients"),
        4,
        duration,
        move |w, i| {
            let b2 = b2.clone();
            async move {
                let first = 1 + (mix((w * 7_000_003 + i) as u64) % size_u) as i64;
                b2.client(w)
                    .get_consistency_proof(b2.req(pb::GetConsistencyProofRequest {
                        first_tree_size: first,
                        second_tree_size: 0,
                    }))
                    .await
                    .map(drop)
            }
        },
    )
    .await;
    out(&report.line());

    // 5. Filtered listings (a page of 50, newest first).
    let run = b.run.clone();
    let filters: Vec<(&str, MakeRequest)> = vec![
        (
            "actor",
            Arc::new(|r| pb::ListEventsRequest {
                filter: Some(pb::EventFilter {
                    actor_id: format!("user-{}", r % 1000),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        (
            "action prefix + outcome",
            Arc::new(|r| pb::ListEventsRequest {
                filter: Some(pb::EventFilter {
                    action_prefix: if r % 2 == 0 { "auth.login." } else { "queue." }.into(),
                    outcome: pb::Outcome::Failure as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        (
            "resource",
            Arc::new(|r| pb::ListEventsRequest {
                filter: Some(pb::EventFilter {
                    resource_type: "bench.thing".into(),
                    resource_name: format!("thing-{}", r % 10_000),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        (
            "correlation id",
            Arc::new(move |r| pb::ListEventsRequest {
                filter: Some(pb::EventFilter {
                    correlation_id: format!("{run}-c{}", r % (size_u / 10).max(1)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        (
            "tenant + actor",
            Arc::new(|r| pb::ListEventsRequest {
                filter: Some(pb::EventFilter {
                    tenant: format!("tenant-{}", r % 10),
                    actor_id: format!("user-{}", (r >> 8) % 1000),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
    ];
    for (name, make) in filters {
        let b2 = b.clone();
        let report = closed_loop(
            &format!("ListEvents by {name}, 4 clients"),
            4,
            duration / 2,
            move |w, i| {
                let (b2, make) = (b2.clone(), make.clone());
                async move {
                    let mut request = make(mix((w * 31 + i) as u64));
                    request.page_size = 50;
                    b2.client(w).list_events(b2.req(request)).await.map(drop)
                }
            },
        )
        .await;
        out(&report.line());
    }

    // 6. Verify the whole log.
    let started = Instant::now();
    let v = b
        .client(0)
        .verify_log(b.req(pb::VerifyLogRequest {}))
        .await?
        .into_inner();
    let took = started.elapsed();
    out(&format!(
        "VerifyLog of {} entries and {} checkpoints: {:.1} s = {:.0} entries/s, ok = {}",
        v.entries_checked,
        v.checkpoints_checked,
        took.as_secs_f64(),
        v.entries_checked as f64 / took.as_secs_f64(),
        v.ok
    ));
    server.stop();
    Ok(())
}
