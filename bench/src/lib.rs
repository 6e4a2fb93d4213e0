//! What every benchmark program shares: closed-loop load with N concurrent
//! callers for a fixed time, latency percentiles, process and machine CPU
//! and memory, and a `plinthd` in a child process (the program re-executed
//! with `--serve`) so the server is measured apart from the client. The
//! programs print; they never assert.

use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plinth_runtime::config::Config;
use plinth_tests::{TestApp, with_admin};
use tonic::transport::{Channel, Endpoint};

/// The outcome of one load run.
#[derive(Debug, Clone)]
pub struct Report {
    /// What was measured.
    pub name: String,
    /// Successful calls.
    pub ok: usize,
    /// Failed calls.
    pub errors: usize,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Sorted latencies of successful calls.
    pub latencies: Vec<Duration>,
}

impl Report {
    /// A report of latencies measured some other way than [`closed_loop`].
    pub fn from_latencies(name: &str, mut latencies: Vec<Duration>, elapsed: Duration) -> Report {
        latencies.sort();
        Report {
            name: name.to_owned(),
            ok: latencies.len(),
            errors: 0,
            elapsed,
            latencies,
        }
    }

    /// The `q` quantile (0..=1) of latency.
    pub fn quantile(&self, q: f64) -> Duration {
        quantile(&self.latencies, q)
    }

    /// Successful calls per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// One line: name, rate, p50, p99, errors.
    pub fn line(&self) -> String {
        format!(
            "{:<44} {:>10.0}/s   p50 {:>9.3} ms   p99 {:>9.3} ms   errors {}",
            self.name,
            self.rate(),
            self.quantile(0.50).as_secs_f64() * 1e3,
            self.quantile(0.99).as_secs_f64() * 1e3,
            self.errors
        )
    }
}

/// Runs `call(worker, i)` from `concurrency` workers in a closed loop for `duration`.
pub async fn closed_loop<F, Fut, E>(name: &str, concurrency: usize, duration: Duration, call: F) -> Report
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    let started = Instant::now();
    let deadline = started + duration;
    let workers = (0..concurrency).map(|w| {
        let call = call.clone();
        async move {
            let (mut lat, mut errors, mut i) = (Vec::new(), 0usize, 0usize);
            while Instant::now() < deadline {
                let t = Instant::now();
                match call(w, i).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        if errors == 0 {
                            eprintln!("  {name}: worker {w}'s first error: {e}");
                        }
                        errors += 1;
                    }
                }
                i += 1;
            }
            (lat, errors)
        }
    });
    let results = futures::future::join_all(workers).await;
    let elapsed = started.elapsed();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for (l, e) in results {
        latencies.extend(l);
        errors += e;
    }
    latencies.sort();
    Report {
        name: name.to_owned(),
        ok: latencies.len(),
        errors,
        elapsed,
        latencies,
    }
}

/// `VmRSS` and `VmHWM` (peak) of this process in KiB, from `/proc/self/status`.
pub fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Reads `--name value` from the command line, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Prints one line of results.
pub fn out(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// CPU time (user + system) process `pid` has used, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    (ticks(11) + ticks(12)) / 100.0
}

/// The `q` quantile (0..=1) of `sorted` latencies; zero when there are none.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let Some(last) = sorted.len().checked_sub(1) else {
        return Duration::ZERO;
    };
    let idx = ((last as f64) * q).round() as usize;
    sorted[idx.min(last)]
}

/// Waits (at most `limit`) until process `pid` is idle: under 5 % of a core
/// over half a second. Work a round left behind (events still being
/// consumed after a burst of writes) would otherwise be measured as the
/// next round's: its memory, its latency. How long it took, for the report.
pub async fn settle(pid: u32, limit: std::time::Duration) -> std::time::Duration {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        let before = cpu_seconds(pid);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if cpu_seconds(pid) - before < 0.025 {
            break;
        }
    }
    started.elapsed()
}

/// CPU time the whole machine has spent busy (every process, the database
/// included), in seconds, from `/proc/stat`.
pub fn machine_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .map(|l| l.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: f64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy / 100.0
}

/// Resident memory of process `pid` in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `n` separate HTTP/2 connections to `target`.
pub async fn channels(target: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(plinth_runtime::coalesce::connect(&Endpoint::from_shared(target.to_owned())?).await?);
    }
    Ok(out)
}

/// The server's configuration: SQLite, or PostgreSQL at `database_url`.
pub fn server_config(database_url: &str) -> Config {
    let mut config = if database_url.is_empty() {
        TestApp::config()
    } else {
        TestApp::config_on(Some(database_url))
    };
    config.log.level = "warn".into();
    with_admin(config)
}

/// `--serve`: runs plinthd with `config`, prints where (`grpc=… data=…
/// schema_prefix=…`), and serves until stdin closes.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let app = TestApp::spawn(config.clone()).await?;
    out(&format!(
        "grpc={} http={} data={} schema_prefix={}",
        app.grpc,
        app.http,
        config.data_dir.display(),
        config.storage.schema_prefix
    ));
    let _ = std::io::stdout().flush();
    // The parent closes our stdin when it is done (or dies).
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            line.clear();
        }
    })
    .await?;
    app.stop().await;
    Ok(())
}

/// How a benchmark line names the storage behind `--database-url`.
pub fn storage_name(database_url: &str) -> &'static str {
    if database_url.is_empty() {
        "SQLite (embedded)"
    } else {
        "PostgreSQL"
    }
}

/// An access token of the bootstrap administrator of the server at `target`.
pub async fn admin_token(target: &str) -> anyhow::Result<String> {
    let channel = Endpoint::from_shared(target.to_owned())?.connect().await?;
    Ok(plinth_tests::access_token(
        &mut plinth::auth::v1::auth_service_client::AuthServiceClient::new(channel),
        plinth_tests::ADMIN_EMAIL,
        plinth_tests::ADMIN_PASSWORD,
    )
    .await?)
}

/// A server in a child process (this program with `--serve` and `args`).
pub struct ServerChild {
    child: Child,
    first: String,
}

impl ServerChild {
    /// Starts it and waits for its address.
    pub fn start(args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--serve")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut first = String::new();
        BufReader::new(child.stdout.take().ok_or_else(|| anyhow::anyhow!("no child stdout"))?).read_line(&mut first)?;
        Ok(Self { child, first })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A `name=value` field of its first line.
    pub fn field(&self, name: &str) -> String {
        self.first
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or_default()
            .to_owned()
    }

    /// `http://<grpc address>`.
    pub fn target(&self) -> String {
        format!("http://{}", self.field("grpc"))
    }

    /// Closes its stdin and waits for it to exit.
    pub fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}
