//! Config benchmark: cached reads (through gRPC, and the in-memory head the
//! service answers them from), durable writes (history and outbox in the same
//! transaction) with 1 and 64 clients, commit-to-watcher latency with 1,000
//! and 10,000 open watch streams, and server memory per idle watch stream.
//!
//! The server runs in a child process (this program re-executed with
//! `--serve`), so its memory is measured apart from the client's and the two
//! are scheduled by the OS like separate services.
//!
//! `cargo run --release -p plinth-bench --bin config-bench -- --seconds 5`
//! (`--database-url postgres://…` for PostgreSQL instead of SQLite,
//! `--watchers 1000,10000`, `--streams-per-connection 100`, `--connections N` for reads and writes)

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use plinth::config::v1::config_service_client::ConfigServiceClient;
use plinth::config::v1::value::Kind;
use plinth::config::v1::{self as pb};
use plinth_bench::{
    Report, ServerChild, admin_token, arg, channels, closed_loop, cpu_seconds, out, quantile, rss_kib, serve,
    server_config, settle, storage_name,
};
use plinth_tests::config::{ConfigSession, number, text};
use plinth_tests::with_bearer;
use tonic::transport::Endpoint;

fn now_micros() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as f64)
        .unwrap_or(0.0)
}

fn set_request(s: &ConfigSession, key: &str, value: pb::Value) -> tonic::Request<pb::SetValueRequest> {
    s.req(pb::SetValueRequest {
        namespace: s.namespace.clone(),
        environment: s.environment.clone(),
        key: key.into(),
        value: Some(value),
        precondition: None,
        message: String::new(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let database_url: String = arg("--database-url", String::new());
    if std::env::args().any(|a| a == "--serve") {
        return serve(server_config(&database_url)).await;
    }
    let seconds: u64 = arg("--seconds", 5);
    let connections: usize = arg("--connections", 4).max(1);
    let watchers: String = arg("--watchers", "1000,10000".to_owned());
    // HTTP/2 multiplexes watch streams; 100 per connection stays under
    // servers' usual concurrent-stream limits.
    let per_connection: usize = arg("--streams-per-connection", 100).max(1);
    let duration = Duration::from_secs(seconds);

    let server = ServerChild::start(&["--database-url", &database_url])?;
    let pid = server.pid();
    let field = |name: &str| server.field(name);
    let target = server.target();
    out(&format!(
        "storage: {}   server pid {pid}, RSS after start {} MiB",
        storage_name(&database_url),
        rss_kib(pid) / 1024
    ));

    let channel = Endpoint::from_shared(target.clone())?.connect().await?;
    let token = admin_token(&target).await?;
    let mut s = ConfigSession::with_token_on(channel.clone(), &token);
    s.fresh_env().await?;
    for i in 0..100 {
        s.set(&format!("app/key{i:03}"), text(&format!("value {i}"))).await?;
    }
    let s = Arc::new(s);

    // 1. Cached reads over gRPC.
    let pool = channels(&target, connections).await?;
    for callers in [16, 64] {
        let (s2, pool2) = (s.clone(), pool.clone());
        let (server_cpu, client_cpu) = (cpu_seconds(pid), cpu_seconds(std::process::id()));
        let report = closed_loop(
            &format!("GetValue (cached), {callers} callers, {connections} conns"),
            callers,
            duration,
            move |w, i| {
                let mut client = ConfigServiceClient::new(pool2[w % pool2.len()].clone());
                let req = s2.req(pb::GetValueRequest {
                    namespace: s2.namespace.clone(),
                    environment: s2.environment.clone(),
                    key: format!("app/key{:03}", i % 100),
                    read_at: None,
                    reveal_secrets: false,
                });
                async move { client.get_value(req).await.map(|_| ()) }
            },
        )
        .await;
        out(&report.line());
        let per_call = |cpu: f64| cpu * 1e6 / report.ok.max(1) as f64;
        out(&format!(
            "{:<44} {:.1} µs of server CPU per call; the calling client {:.1} µs",
            format!("read cost, {callers} callers"),
            per_call(cpu_seconds(pid) - server_cpu),
            per_call(cpu_seconds(std::process::id()) - client_cpu),
        ));
    }

    // 2. The in-memory head those reads come from, without the transport.
    let head = in_memory_reads(&database_url, &field("data"), &field("schema_prefix"), &s, duration).await?;
    out(&head.line());

    // 3. Durable writes.
    for (callers, envs) in [(1usize, 1usize), (64, 1), (64, 8)] {
        let mut sessions = Vec::new();
        for _ in 0..envs {
            let mut e = ConfigSession::with_token_on(channel.clone(), &token);
            e.fresh_env().await?;
            sessions.push(Arc::new(e));
        }
        let pool2 = pool.clone();
        let report = closed_loop(
            &format!("SetValue (durable), {callers} clients, {envs} env(s)"),
            callers,
            duration,
            move |w, i| {
                let e = sessions[w % sessions.len()].clone();
                let mut client = ConfigServiceClient::new(pool2[w % pool2.len()].clone());
                let req = set_request(&e, &format!("k/{w}/{}", i % 50), number(i as f64));
                async move { client.set_value(req).await.map(|_| ()) }
            },
        )
        .await;
        out(&report.line());
    }

    // 4. Watchers: commit-to-watcher latency and memory per idle stream.
    for n in watchers.split(',').filter_map(|w| w.trim().parse::<usize>().ok()) {
        watch_round(&target, &s, n, pid, per_connection).await?;
    }

    server.stop();
    Ok(())
}

/// Each revision's median and last delivery, from deliveries tagged with
/// the revision's send time.
fn per_revision(tagged: &[(u64, Duration)]) -> (Vec<Duration>, Vec<Duration>) {
    let mut by: std::collections::BTreeMap<u64, Vec<Duration>> = Default::default();
    for (sent, latency) in tagged {
        by.entry(*sent).or_default().push(*latency);
    }
    by.into_values()
        .map(|mut v| {
            v.sort();
            (quantile(&v, 0.5), quantile(&v, 1.0))
        })
        .unzip()
}

/// "lowest–highest" of `values`, in milliseconds.
fn span_ms(values: &[Duration]) -> String {
    let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
    format!("{:.1}–{:.1}", ms(values.iter().min()), ms(values.iter().max()))
}

/// Reads the head the service answers from, in this process, on the same database.
async fn in_memory_reads(
    database_url: &str,
    data_dir: &str,
    schema_prefix: &str,
    s: &ConfigSession,
    duration: Duration,
) -> anyhow::Result<Report> {
    let storage = plinth_runtime::config::StorageConfig {
        schema_prefix: schema_prefix.to_owned(),
        ..Default::default()
    };
    let url = (!database_url.is_empty()).then(|| secrecy::SecretString::from(database_url.to_owned()));
    let target = plinth_runtime::storage::DbTarget::for_component(
        url.as_ref(),
        std::path::Path::new(data_dir),
        schema_prefix,
        "config",
    );
    let db = plinth_runtime::storage::Db::connect(&target, &storage).await?;
    let config = plinth_config::Configuration::new(
        plinth_config::Store::new(db.clone()),
        plinth_config::Keyring::from_keys(&[])?,
        Default::default(),
        None,
    );
    let env = plinth_config::model::EnvId::new(&s.namespace, &s.environment);
    let at = plinth_config::model::ReadAt::Head { min_revision: 0 };
    config.get(&env, "app/key000", &at).await?;
    let report = closed_loop(
        "head read in memory (no transport), 2 callers",
        2,
        duration,
        move |_, i| {
            let (config, env, at) = (config.clone(), env.clone(), at.clone());
            async move {
                // Yield now and then so the deadline check and other callers run.
                if i % 1024 == 0 {
                    tokio::task::yield_now().await;
                }
                config
                    .get(&env, &format!("app/key{:03}", i % 100), &at)
                    .await
                    .map(|_| ())
            }
        },
    )
    .await;
    db.close().await;
    Ok(report)
}

async fn watch_round(target: &str, s: &ConfigSession, n: usize, pid: u32, per_connection: usize) -> anyhow::Result<()> {
    const WRITES: usize = 20;
    let settled = settle(pid, Duration::from_secs(30)).await;
    let rss_before = rss_kib(pid);
    let pool = channels(target, n.div_ceil(per_connection)).await?;
    let mut client = s.client.clone();
    let head = client
        .get_environment(s.req(pb::GetEnvironmentRequest {
            namespace: s.namespace.clone(),
            environment: s.environment.clone(),
        }))
        .await?;
    let from = head.into_inner().environment.map(|e| e.revision).unwrap_or(0);
    let opened = Instant::now();
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let mut client = ConfigServiceClient::new(pool[i / per_connection].clone());
        let req = with_bearer(
            pb::WatchRequest {
                namespace: s.namespace.clone(),
                environment: s.environment.clone(),
                prefix: "watch/".into(),
                from_revision: from,
                reveal_secrets: false,
            },
            &s.token,
        );
        streams.push(client.watch(req).await?.into_inner());
    }
    let open_time = opened.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_kib(pid);
    let per_stream = (rss_idle.saturating_sub(rss_before)) as f64 / n as f64;

    let readers = streams.into_iter().map(|mut stream| async move {
        let mut lat = Vec::with_capacity(WRITES);
        while lat.len() < WRITES {
            let Some(Ok(m)) = stream.next().await else { break };
            for e in &m.events {
                if let Some(Kind::NumberValue(sent)) = e
                    .value
                    .as_ref()
                    .and_then(|v| v.value.as_ref())
                    .and_then(|v| v.kind.as_ref())
                {
                    lat.push((
                        *sent as u64,
                        Duration::from_micros((now_micros() - sent).max(0.0) as u64),
                    ));
                }
            }
        }
        // Kept open, to measure what a stream holds once it has carried traffic.
        (lat, stream)
    });
    let writer = async {
        let mut client = s.client.clone();
        for _ in 0..WRITES {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client
                .set_value(set_request(s, "watch/tick", number(now_micros())))
                .await?;
        }
        anyhow::Ok(())
    };
    let cpu_before = cpu_seconds(pid);
    let client_cpu_before = cpu_seconds(std::process::id());
    let (all, written) = tokio::time::timeout(
        Duration::from_secs(120),
        futures::future::join(futures::future::join_all(readers), writer),
    )
    .await?;
    written?;
    let server_cpu = cpu_seconds(pid) - cpu_before;
    let client_cpu = cpu_seconds(std::process::id()) - client_cpu_before;
    let (all, open): (Vec<_>, Vec<_>) = all.into_iter().unzip();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = rss_kib(pid);
    drop(open);
    let tagged: Vec<(u64, Duration)> = all.into_iter().flatten().collect();
    let mut latencies: Vec<Duration> = tagged.iter().map(|(_, d)| *d).collect();
    latencies.sort();
    let report = Report {
        name: format!("commit → watcher, {n} watchers"),
        ok: latencies.len(),
        errors: n * WRITES - latencies.len(),
        elapsed: Duration::from_secs(1),
        latencies,
    };
    out(&format!(
        "{:<44} deliveries {:>7}   p50 {:>9.3} ms   p99 {:>9.3} ms   max {:>9.3} ms   missing {}",
        report.name,
        report.ok,
        report.quantile(0.50).as_secs_f64() * 1e3,
        report.quantile(0.99).as_secs_f64() * 1e3,
        report.quantile(1.0).as_secs_f64() * 1e3,
        report.errors
    ));
    // One slow revision (the machine busy elsewhere for a moment) can
    // decide p99 alone: each revision is 1/20 of the deliveries.
    let (medians, lasts) = per_revision(&tagged);
    out(&format!(
        "{:<44} median delivery {} ms, last delivery {} ms",
        format!("per revision, {n} watchers"),
        span_ms(&medians),
        span_ms(&lasts),
    ));
    out(&format!(
        "{:<44} {:.1} µs of server CPU per delivery ({:.2} s for {} writes); the watching client {:.1} µs",
        format!("fan-out cost, {n} watchers"),
        server_cpu * 1e6 / (n * WRITES) as f64,
        server_cpu,
        WRITES,
        client_cpu * 1e6 / (n * WRITES) as f64,
    ));
    out(&format!(
        "{:<44} {:.1} KiB per stream (server RSS {} → {} MiB; opened in {:.1} s, after {:.1} s for the server to go idle)",
        format!("idle watch streams, {n}"),
        per_stream,
        rss_before / 1024,
        rss_idle / 1024,
        open_time.as_secs_f64(),
        settled.as_secs_f64()
    ));
    out(&format!(
        "{:<44} {:.1} KiB per stream (server RSS {} MiB)",
        format!("watch streams idle after {WRITES} changes, {n}"),
        rss_after.saturating_sub(rss_before) as f64 / n as f64,
        rss_after / 1024,
    ));
    Ok(())
}
