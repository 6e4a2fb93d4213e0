//! What every benchmark program shares: closed-loop load with N concurrent
//! callers for a fixed time, latency percentiles, and process memory. The
//! programs print; they never assert.

use std::future::Future;
use std::time::{Duration, Instant};

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
    /// The `q` quantile (0..=1) of latency.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let last = self.latencies.len() - 1;
        let idx = ((last as f64) * q).round() as usize;
        self.latencies[idx.min(last)]
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
                    Err(_) => errors += 1,
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
