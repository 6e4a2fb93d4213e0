//! Queue benchmark, through gRPC against a `plinthd` in a child process:
//! enqueue throughput (one message per call, and batched), drain throughput
//! of pre-enqueued 100-byte no-op jobs with N workers, end-to-end latency at
//! a steady 50% of the measured drain rate, idle pick-up latency, and
//! whole-machine CPU-seconds per 1,000 jobs (client, server and database).
//!
//! `cargo run --release -p plinth-bench --bin queue-bench -- --seconds 5`
//! (`--database-url postgres://…` for PostgreSQL instead of SQLite,
//! `--jobs 100000`, `--workers 8`, `--batch 100`, `--connections 4`)

use futures::StreamExt as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use plinth::queue::v1::queue_service_client::QueueServiceClient;
use plinth::queue::v1::{self as pb};
use plinth_bench::{
    Report, ServerChild, admin_token, arg, channels, closed_loop, cpu_seconds, machine_cpu_seconds, out, serve,
    server_config, storage_name,
};
use plinth_tests::queue::{fresh_queue, millis};
use plinth_tests::with_bearer;
use tonic::transport::Channel;

const PAYLOAD: usize = 100;

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A 100-byte payload that starts with the time it was made.
fn stamped() -> Vec<u8> {
    let mut p = now_micros().to_le_bytes().to_vec();
    p.resize(PAYLOAD, b'x');
    p
}

fn age_of(payload: &[u8]) -> Duration {
    let sent = payload
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes);
    Duration::from_micros(now_micros().saturating_sub(sent))
}

#[derive(Clone)]
struct Bench {
    pool: Vec<Channel>,
    token: Arc<str>,
}

impl Bench {
    fn client(&self, i: usize) -> QueueServiceClient<Channel> {
        QueueServiceClient::new(self.pool[i % self.pool.len()].clone())
    }

    fn req<T>(&self, m: T) -> tonic::Request<T> {
        with_bearer(m, &self.token)
    }

    async fn create(&self, label: &str) -> anyhow::Result<String> {
        let name = fresh_queue(label);
        self.client(0)
            .create_queue(self.req(pb::CreateQueueRequest {
                queue: Some(pb::Queue {
                    name: name.clone(),
                    settings: Some(pb::QueueSettings {
                        lease_duration: Some(millis(300_000)),
                        ..pb::QueueSettings::default()
                    }),
                    ..pb::Queue::default()
                }),
            }))
            .await?;
        Ok(name)
    }

    /// Messages still in `queue`, in any state: after a drain, anything
    /// but 0 means jobs were lost or never acknowledged.
    async fn left(&self, queue: &str) -> anyhow::Result<i64> {
        let counts = self
            .client(0)
            .get_queue(self.req(pb::GetQueueRequest {
                queue: queue.to_owned(),
            }))
            .await?
            .into_inner()
            .queue
            .and_then(|q| q.counts)
            .unwrap_or_default();
        Ok(counts.scheduled + counts.ready + counts.leased + counts.dead)
    }

    async fn enqueue_batch(&self, i: usize, queue: &str, n: usize) -> Result<(), tonic::Status> {
        let messages = (0..n)
            .map(|_| pb::NewMessage {
                payload: stamped().into(),
                ..pb::NewMessage::default()
            })
            .collect();
        self.client(i)
            .enqueue_batch(self.req(pb::EnqueueBatchRequest {
                queue: queue.to_owned(),
                messages,
            }))
            .await
            .map(drop)
    }

    /// Leases up to `max` (waiting up to `wait`), acks them in one call,
    /// and returns the payloads' ages at receipt.
    async fn work(&self, i: usize, queue: &str, max: i32, wait: Duration) -> Result<Vec<Duration>, tonic::Status> {
        let mut client = self.client(i);
        let leased = client
            .lease(self.req(pb::LeaseRequest {
                queue: queue.to_owned(),
                max_messages: max,
                lease_duration: None,
                wait: Some(millis(i64::try_from(wait.as_millis()).unwrap_or(0))),
            }))
            .await?
            .into_inner()
            .messages;
        if leased.is_empty() {
            return Ok(Vec::new());
        }
        let ages = leased
            .iter()
            .map(|l| l.message.as_ref().map_or(Duration::ZERO, |m| age_of(&m.payload)))
            .collect();
        let acks = leased
            .into_iter()
            .map(|l| pb::AckEntry {
                message_id: l.message.map_or(0, |m| m.id),
                lease_token: l.lease_token,
            })
            .collect();
        client
            .ack(self.req(pb::AckRequest {
                queue: queue.to_owned(),
                acks,
            }))
            .await?;
        Ok(ages)
    }

    /// One worker stream: acks each pushed batch and grants its credits
    /// back, until `done` reaches `target`.
    async fn stream_work(
        &self,
        i: usize,
        queue: &str,
        credits: i32,
        target: usize,
        done: &AtomicUsize,
    ) -> Result<(), tonic::Status> {
        let (grant, requests) = tokio::sync::mpsc::channel::<pb::SubscribeRequest>(16);
        let _ = grant
            .send(pb::SubscribeRequest {
                queue: queue.to_owned(),
                lease_duration: None,
                credits,
            })
            .await;
        let mut client = self.client(i);
        let mut stream = client
            .subscribe(self.req(tokio_stream::wrappers::ReceiverStream::new(requests)))
            .await?
            .into_inner();
        while done.load(Ordering::Relaxed) < target {
            let Ok(pushed) = tokio::time::timeout(Duration::from_millis(200), stream.message()).await else {
                continue;
            };
            let Some(pushed) = pushed? else { break };
            let n = pushed.messages.len();
            let acks = pushed
                .messages
                .into_iter()
                .map(|l| pb::AckEntry {
                    message_id: l.message.map_or(0, |m| m.id),
                    lease_token: l.lease_token,
                })
                .collect();
            client
                .ack(self.req(pb::AckRequest {
                    queue: queue.to_owned(),
                    acks,
                }))
                .await?;
            done.fetch_add(n, Ordering::Relaxed);
            let _ = grant
                .send(pb::SubscribeRequest {
                    credits: i32::try_from(n).unwrap_or(1).max(1),
                    ..pb::SubscribeRequest::default()
                })
                .await;
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let database_url: String = arg("--database-url", String::new());
    if std::env::args().any(|a| a == "--serve") {
        return serve(server_config(&database_url)).await;
    }
    let seconds: u64 = arg("--seconds", 5);
    let jobs: usize = arg("--jobs", 100_000);
    let workers: usize = arg("--workers", 8).max(1);
    let batch: i32 = arg("--batch", 100).clamp(1, 1000);
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
    };

    // 1. Enqueue, one message per call.
    for clients in [1usize, 32] {
        let q: Arc<str> = b.create("enqueue").await?.into();
        let b2 = b.clone();
        let report = closed_loop(
            &format!("Enqueue (1 per call), {clients} clients"),
            clients,
            duration,
            move |w, _| {
                let (b2, q) = (b2.clone(), q.clone());
                async move { b2.enqueue_batch(w, &q, 1).await }
            },
        )
        .await;
        out(&report.line());
    }

    // 2. Batched enqueue: the preload of the drain run, 1,000 per call.
    let q = b.create("drain").await?;
    let started = Instant::now();
    let machine = machine_cpu_seconds();
    let next = Arc::new(AtomicUsize::new(0));
    let loaders = (0..4).map(|w| {
        let (b, q, next) = (b.clone(), q.clone(), next.clone());
        async move {
            while next.fetch_add(1000, Ordering::Relaxed) < jobs {
                b.enqueue_batch(w, &q, 1000).await?;
            }
            Ok::<(), tonic::Status>(())
        }
    });
    for r in futures::future::join_all(loaders).await {
        r?;
    }
    let loaded = jobs.div_ceil(1000) * 1000;
    let took = started.elapsed();
    out(&format!(
        "{:<44} {:>10.0}/s   ({loaded} messages in {:.2} s, 4 clients; {:.2} CPU-s per 1,000 on the machine)",
        "EnqueueBatch (1,000 per call)",
        loaded as f64 / took.as_secs_f64(),
        took.as_secs_f64(),
        (machine_cpu_seconds() - machine) / loaded as f64 * 1000.0
    ));

    // 3. Drain them with N workers.
    let started = Instant::now();
    let machine = machine_cpu_seconds();
    let server_cpu = cpu_seconds(pid);
    let done = Arc::new(AtomicUsize::new(0));
    let drainers = (0..workers).map(|w| {
        let (b, q, done) = (b.clone(), q.clone(), done.clone());
        async move {
            while done.load(Ordering::Relaxed) < loaded {
                let got = b.work(w, &q, batch, Duration::ZERO).await?;
                if got.is_empty() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                done.fetch_add(got.len(), Ordering::Relaxed);
            }
            Ok::<(), tonic::Status>(())
        }
    });
    for r in futures::future::join_all(drainers).await {
        r?;
    }
    let took = started.elapsed();
    let drain_rate = loaded as f64 / took.as_secs_f64();
    out(&format!(
        "{:<44} {:>10.0}/s   ({loaded} jobs in {:.2} s, {workers} workers, lease/ack {batch} per call; {} left in the queue)",
        "Drain (lease + ack, no-op handler)",
        drain_rate,
        took.as_secs_f64(),
        b.left(&q).await?,
    ));
    out(&format!(
        "{:<44} {:>10.2} CPU-s per 1,000 jobs (server alone {:.2})",
        "  whole machine while draining",
        (machine_cpu_seconds() - machine) / loaded as f64 * 1000.0,
        (cpu_seconds(pid) - server_cpu) / loaded as f64 * 1000.0,
    ));

    // 3b. The same drain through worker streams: the server pushes within
    // each worker's credits; the worker acks a batch and grants as many again.
    let q = b.create("stream").await?;
    let next = Arc::new(AtomicUsize::new(0));
    let loaders = (0..4).map(|w| {
        let (b, q, next) = (b.clone(), q.clone(), next.clone());
        async move {
            while next.fetch_add(1000, Ordering::Relaxed) < jobs {
                b.enqueue_batch(w, &q, 1000).await?;
            }
            Ok::<(), tonic::Status>(())
        }
    });
    for r in futures::future::join_all(loaders).await {
        r?;
    }
    let started = Instant::now();
    let machine = machine_cpu_seconds();
    let done = Arc::new(AtomicUsize::new(0));
    let streams = (0..workers).map(|w| {
        let (b, q, done) = (b.clone(), q.clone(), done.clone());
        async move { b.stream_work(w, &q, batch, loaded, &done).await }
    });
    for r in futures::future::join_all(streams).await {
        r?;
    }
    let took = started.elapsed();
    out(&format!(
        "{:<44} {:>10.0}/s   ({loaded} jobs in {:.2} s, {workers} streams, {batch} credits each; {:.2} CPU-s per 1,000 on the machine; {} left)",
        "Drain (Subscribe + batched ack, no-op)",
        loaded as f64 / took.as_secs_f64(),
        took.as_secs_f64(),
        (machine_cpu_seconds() - machine) / loaded as f64 * 1000.0,
        b.left(&q).await?,
    ));

    // 4. End-to-end latency at a steady half of the drain rate. A single
    // `Enqueue` waits for its own commit, so at these rates producers send
    // what accrued every 5 ms as one `EnqueueBatch`, as a busy application
    // would; the age of each payload is taken when a worker receives it.
    for share in [0.5, 0.25] {
        let q: Arc<str> = b.create("steady").await?.into();
        let rate = (drain_rate * share).max(10.0);
        let producers = 4usize;
        let every = Duration::from_millis(5);
        let per_tick = rate / producers as f64 * every.as_secs_f64();
        let deadline = Instant::now() + duration;
        let produced = (0..producers).map(|w| {
            let (b, q) = (b.clone(), q.clone());
            async move {
                // Stagger the producers over one interval.
                tokio::time::sleep(every.mul_f64(w as f64 / producers as f64)).await;
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                // Open loop: a slow batch does not hold back the next one.
                let mut in_flight = futures::stream::FuturesUnordered::new();
                let (mut sent, mut owed) = (0usize, 0.0f64);
                while Instant::now() < deadline {
                    tokio::select! {
                        _ = tick.tick() => {
                            owed += per_tick;
                            let n = owed.floor() as usize;
                            if n > 0 {
                                owed -= n as f64;
                                let (b, q) = (b.clone(), q.clone());
                                in_flight.push(async move { b.enqueue_batch(w, &q, n).await.map(|()| n) });
                            }
                        }
                        Some(done) = in_flight.next() => sent += done.unwrap_or(0),
                    }
                }
                while let Some(done) = in_flight.next().await {
                    sent += done.unwrap_or(0);
                }
                sent
            }
        });
        let consumed = (0..workers).map(|w| {
            let (b, q) = (b.clone(), q.clone());
            async move {
                let mut ages = Vec::new();
                while Instant::now() < deadline + Duration::from_secs(2) {
                    if let Ok(got) = b.work(w, &q, batch, Duration::from_millis(500)).await {
                        ages.extend(got);
                    }
                }
                ages
            }
        });
        let (sent, ages) = tokio::join!(futures::future::join_all(produced), futures::future::join_all(consumed));
        let sent: usize = sent.into_iter().sum();
        let ages: Vec<Duration> = ages.into_iter().flatten().collect();
        let report = Report::from_latencies(
            &format!(
                "End-to-end at {:.0} % of drain: {rate:.0}/s offered ({sent} sent)",
                share * 100.0
            ),
            ages,
            duration,
        );
        out(&report.line());
    }

    // 5. Idle pick-up: one waiting worker, one message at a time.
    let q: Arc<str> = b.create("idle").await?.into();
    let samples = 200usize;
    let waiter = {
        let (b, q) = (b.clone(), q.clone());
        async move {
            let mut ages = Vec::new();
            while ages.len() < samples {
                match b.work(0, &q, 1, Duration::from_secs(5)).await {
                    Ok(got) => ages.extend(got),
                    Err(_) => break,
                }
            }
            ages
        }
    };
    let producer = {
        let (b, q) = (b.clone(), q.clone());
        async move {
            for _ in 0..samples {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = b.enqueue_batch(1, &q, 1).await;
            }
        }
    };
    let (ages, ()) = tokio::join!(waiter, producer);
    out(&Report::from_latencies("Idle pick-up (enqueue → waiting worker)", ages, duration).line());

    server.stop();
    Ok(())
}
