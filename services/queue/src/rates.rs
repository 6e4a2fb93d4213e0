//! Per-queue enqueue/ack/fail rates over the last minute, counted by this
//! replica in one-second buckets. Only for status answers; nothing here is
//! durable or shared between replicas.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

const WINDOW_SECS: usize = 60;

/// Rates per second over the window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Enqueued per second.
    pub enqueued: f64,
    /// Acked per second.
    pub acked: f64,
    /// Failed per second.
    pub failed: f64,
}

#[derive(Default)]
struct Window {
    /// (second, enqueued, acked, failed) per slot.
    slots: Vec<(u64, [u64; 3])>,
}

/// Counters per queue.
pub struct Rates {
    start: Instant,
    queues: Mutex<HashMap<String, Window>>,
}

impl Default for Rates {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            queues: Mutex::new(HashMap::new()),
        }
    }
}

impl Rates {
    fn second(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    /// Counts events for `queue` now.
    pub fn record(&self, queue: &str, enqueued: u64, acked: u64, failed: u64) {
        if enqueued + acked + failed == 0 {
            return;
        }
        let now = self.second();
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        let w = queues.entry(queue.to_owned()).or_default();
        if w.slots.is_empty() {
            w.slots = vec![(u64::MAX, [0; 3]); WINDOW_SECS];
        }
        let i = (now % WINDOW_SECS as u64) as usize;
        let slot = &mut w.slots[i];
        if slot.0 != now {
            *slot = (now, [0; 3]);
        }
        slot.1[0] += enqueued;
        slot.1[1] += acked;
        slot.1[2] += failed;
    }

    /// Per-second rates of `queue` over the last minute (or since start).
    pub fn sample(&self, queue: &str) -> Sample {
        let now = self.second();
        let span = (now + 1).min(WINDOW_SECS as u64) as f64;
        let queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(w) = queues.get(queue) else {
            return Sample::default();
        };
        let mut sum = [0u64; 3];
        for (sec, counts) in &w.slots {
            if *sec != u64::MAX && now.saturating_sub(*sec) < WINDOW_SECS as u64 {
                for k in 0..3 {
                    sum[k] += counts[k];
                }
            }
        }
        Sample {
            enqueued: sum[0] as f64 / span,
            acked: sum[1] as f64 / span,
            failed: sum[2] as f64 / span,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_up_as_rates_of_their_queue_only() {
        let r = Rates::default();
        r.record("a", 10, 4, 1);
        let s = r.sample("a");
        assert!(s.enqueued > 0.0 && s.acked > 0.0 && s.failed > 0.0);
        assert!(s.enqueued > s.acked);
        assert_eq!(r.sample("b"), Sample::default());
    }
}
