//! Prometheus families of the queue service: depth by state and oldest
//! ready age per queue (refreshed by the sweeper from the database, so they
//! agree across replicas), and this replica's counters of enqueues, acks,
//! retries, lease expiries and dead letters.

use std::collections::{HashMap, HashSet};
use std::sync::{LazyLock, Mutex, PoisonError};

use plinth_runtime::metrics::{counter_vec, gauge_vec};
use prometheus::{IntCounterVec, IntGaugeVec};

use crate::model::{Counts, State};

/// The queue service's metric families.
pub struct QueueMetrics {
    /// `plinth_queue_messages{queue, state}`.
    pub messages: IntGaugeVec,
    /// `plinth_queue_oldest_ready_age_seconds{queue}`.
    pub oldest_ready: IntGaugeVec,
    /// `plinth_queue_enqueued_total{queue}`.
    pub enqueued: IntCounterVec,
    /// `plinth_queue_acked_total{queue}`.
    pub acked: IntCounterVec,
    /// `plinth_queue_retries_total{queue}`: nacks scheduled for another attempt.
    pub retries: IntCounterVec,
    /// `plinth_queue_lease_expiries_total{queue}`.
    pub lease_expiries: IntCounterVec,
    /// `plinth_queue_dead_letters_total{queue}`.
    pub dead_letters: IntCounterVec,
    known: Mutex<HashSet<String>>,
}

static METRICS: LazyLock<QueueMetrics> = LazyLock::new(|| QueueMetrics {
    messages: gauge_vec(
        "plinth_queue_messages",
        "Messages per queue by state",
        &["queue", "state"],
    ),
    oldest_ready: gauge_vec(
        "plinth_queue_oldest_ready_age_seconds",
        "How long the oldest ready message of each queue has waited",
        &["queue"],
    ),
    enqueued: counter_vec(
        "plinth_queue_enqueued_total",
        "Messages enqueued through this replica",
        &["queue"],
    ),
    acked: counter_vec(
        "plinth_queue_acked_total",
        "Messages acked through this replica",
        &["queue"],
    ),
    retries: counter_vec(
        "plinth_queue_retries_total",
        "Nacked deliveries scheduled for another attempt",
        &["queue"],
    ),
    lease_expiries: counter_vec(
        "plinth_queue_lease_expiries_total",
        "Leases that expired and were returned by this replica's sweeps",
        &["queue"],
    ),
    dead_letters: counter_vec(
        "plinth_queue_dead_letters_total",
        "Messages dead-lettered by this replica",
        &["queue"],
    ),
    known: Mutex::new(HashSet::new()),
});

/// The queue service's families.
pub fn queue() -> &'static QueueMetrics {
    &METRICS
}

fn state_label(s: State) -> &'static str {
    match s {
        State::Scheduled => "scheduled",
        State::Ready => "ready",
        State::Leased => "leased",
        State::Dead => "dead",
    }
}

impl QueueMetrics {
    /// Sets the gauges of every queue, removing those of queues that are gone.
    pub fn set_depths(&self, counts: &HashMap<String, Counts>, oldest_ready_secs: &HashMap<String, i64>) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        for gone in known.iter().filter(|q| !counts.contains_key(*q)) {
            for s in State::ALL {
                let _ = self.messages.remove_label_values(&[gone, state_label(s)]);
            }
            let _ = self.oldest_ready.remove_label_values(&[gone]);
        }
        known.clear();
        for (queue, c) in counts {
            for (s, n) in [
                (State::Scheduled, c.scheduled),
                (State::Ready, c.ready),
                (State::Leased, c.leased),
                (State::Dead, c.dead),
            ] {
                self.messages.with_label_values(&[queue, state_label(s)]).set(n);
            }
            self.oldest_ready
                .with_label_values(&[queue])
                .set(oldest_ready_secs.get(queue).copied().unwrap_or(0));
            known.insert(queue.clone());
        }
    }
}
