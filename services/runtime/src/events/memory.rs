//! The in-process bus: the embedded default. It keeps a bounded log of
//! events (like a JetStream stream with a message limit) and per-consumer
//! cursors with ack deadlines, so durable consumers, redelivery and dedup
//! behave as they do on NATS within one process.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    Acker, BusError, ConsumerSpec, Delivery, Event, EventBus, Listener, Subscription, subject_matches, validate_subject,
};

/// How many events the in-process bus retains for consumers created later.
const DEFAULT_RETAINED: usize = 100_000;

struct Consumer {
    filter: String,
    ack_wait: Duration,
    /// Next log sequence to look at.
    cursor: u64,
    /// Delivered but unsettled: seq → (redeliver at, attempts so far).
    pending: BTreeMap<u64, (Instant, u64)>,
}

struct Inner {
    /// `log[i]` has sequence `first_seq + i`.
    log: VecDeque<Event>,
    first_seq: u64,
    retained: usize,
    /// Event ids seen within the dedup window…
    seen: HashSet<Arc<str>>,
    /// …and when, oldest first, so expiry looks only at the front: a scan
    /// of every id on each publish made the bus the busiest code in the
    /// process at a few thousand events a second. Both share one copy of
    /// each id.
    seen_order: VecDeque<(Instant, Arc<str>)>,
    dedup_window: Duration,
    consumers: HashMap<String, Consumer>,
}

/// An event bus inside this process.
#[derive(Clone)]
pub struct InProcessBus {
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
    live: tokio::sync::broadcast::Sender<Event>,
}

/// Live events buffered per listener before the slowest loses some.
const LIVE_BUFFER: usize = 4096;

impl InProcessBus {
    /// A bus that drops duplicate ids seen within `dedup_window`.
    pub fn new(dedup_window: Duration) -> Self {
        Self::with_retention(dedup_window, DEFAULT_RETAINED)
    }

    /// A bus that keeps at most `retained` events for late consumers.
    pub fn with_retention(dedup_window: Duration, retained: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                log: VecDeque::new(),
                first_seq: 1,
                retained: retained.max(1),
                seen: HashSet::new(),
                seen_order: VecDeque::new(),
                dedup_window,
                consumers: HashMap::new(),
            })),
            notify: Arc::new(Notify::new()),
            live: tokio::sync::broadcast::channel(LIVE_BUFFER).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next delivery for `durable`, or the instant to look again.
    fn next_delivery(&self, durable: &str) -> Result<Option<(u64, Event, u64)>, Option<Instant>> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let now = Instant::now();
        let first_seq = inner.first_seq;
        let Some(c) = inner.consumers.get_mut(durable) else {
            return Err(None);
        };
        // Redeliveries first, oldest sequence first.
        if let Some((&seq, &(_, attempts))) = c.pending.iter().find(|(_, (at, _))| *at <= now) {
            let idx = seq.checked_sub(first_seq).and_then(|i| usize::try_from(i).ok());
            match idx.and_then(|i| inner.log.get(i)) {
                Some(event) => {
                    c.pending.insert(seq, (now + c.ack_wait, attempts + 1));
                    return Ok(Some((seq, event.clone(), attempts + 1)));
                }
                None => {
                    // Aged out of the retained log: nothing left to redeliver.
                    c.pending.remove(&seq);
                    return Ok(None);
                }
            }
        }
        c.cursor = c.cursor.max(first_seq);
        while let Some(event) = usize::try_from(c.cursor - first_seq)
            .ok()
            .and_then(|i| inner.log.get(i))
        {
            let seq = c.cursor;
            c.cursor += 1;
            if subject_matches(&c.filter, &event.subject) {
                c.pending.insert(seq, (now + c.ack_wait, 1));
                return Ok(Some((seq, event.clone(), 1)));
            }
        }
        Err(c.pending.values().map(|(at, _)| *at).min())
    }

    fn settle(&self, durable: &str, seq: u64, redeliver_at: Option<Instant>) {
        let mut inner = self.lock();
        if let Some(c) = inner.consumers.get_mut(durable) {
            match redeliver_at {
                None => {
                    c.pending.remove(&seq);
                }
                Some(at) => {
                    if let Some(p) = c.pending.get_mut(&seq) {
                        p.0 = at;
                    }
                }
            }
        }
        drop(inner);
        self.notify.notify_waiters();
    }
}

struct InProcessAck {
    bus: InProcessBus,
    durable: String,
    seq: u64,
}

#[async_trait::async_trait]
impl Acker for InProcessAck {
    async fn ack(&self) -> Result<(), BusError> {
        self.bus.settle(&self.durable, self.seq, None);
        Ok(())
    }

    async fn nack(&self, delay: Duration) -> Result<(), BusError> {
        self.bus.settle(&self.durable, self.seq, Some(Instant::now() + delay));
        Ok(())
    }
}

#[async_trait::async_trait]
impl EventBus for InProcessBus {
    async fn publish(&self, event: &Event) -> Result<(), BusError> {
        validate_subject(&event.subject)?;
        {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let now = Instant::now();
            while let Some((at, _)) = inner.seen_order.front()
                && now.duration_since(*at) >= inner.dedup_window
            {
                if let Some((_, id)) = inner.seen_order.pop_front() {
                    inner.seen.remove(&*id);
                }
            }
            if inner.seen.contains(event.id.as_str()) {
                return Ok(());
            }
            let id: Arc<str> = Arc::from(event.id.as_str());
            inner.seen.insert(id.clone());
            inner.seen_order.push_back((now, id));
            inner.log.push_back(event.clone());
            while inner.log.len() > inner.retained {
                inner.log.pop_front();
                inner.first_seq += 1;
            }
        }
        self.notify.notify_waiters();
        let _ = self.live.send(event.clone());
        Ok(())
    }

    async fn listen(&self, filter: &str) -> Result<Listener, BusError> {
        let filter = filter.to_owned();
        let rx = self.live.subscribe();
        Ok(Box::pin(futures::stream::unfold(rx, move |mut rx| {
            let filter = filter.clone();
            async move {
                loop {
                    match rx.recv().await {
                        Ok(e) if subject_matches(&filter, &e.subject) => return Some((e, rx)),
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        })))
    }

    async fn subscribe(&self, spec: &ConsumerSpec) -> Result<Subscription, BusError> {
        if spec.durable.is_empty() {
            return Err(BusError::Rejected("durable name must not be empty".into()));
        }
        {
            let mut inner = self.lock();
            let first_seq = inner.first_seq;
            let next_seq = first_seq + u64::try_from(inner.log.len()).unwrap_or(0);
            let start = if spec.from_start { first_seq } else { next_seq };
            let consumer = inner.consumers.entry(spec.durable.clone()).or_insert_with(|| Consumer {
                filter: spec.filter.clone(),
                ack_wait: spec.ack_wait,
                cursor: start,
                pending: BTreeMap::new(),
            });
            if consumer.filter != spec.filter {
                return Err(BusError::Rejected(format!(
                    "durable `{}` already filters `{}`, not `{}`",
                    spec.durable, consumer.filter, spec.filter
                )));
            }
            // A new subscriber takes over unsettled deliveries of the last one at once.
            let now = Instant::now();
            for p in consumer.pending.values_mut() {
                p.0 = now;
            }
        }
        let bus = self.clone();
        let durable = spec.durable.clone();
        let stream = futures::stream::unfold((bus, durable), |(bus, durable)| async move {
            loop {
                let notify = Arc::clone(&bus.notify);
                let notified = notify.notified();
                match bus.next_delivery(&durable) {
                    Ok(Some((seq, event, attempt))) => {
                        let acker = InProcessAck {
                            bus: bus.clone(),
                            durable: durable.clone(),
                            seq,
                        };
                        let delivery = Delivery::new(event, attempt, Box::new(acker));
                        return Some((Ok(delivery), (bus, durable)));
                    }
                    Ok(None) => continue,
                    Err(wake_at) => match wake_at {
                        Some(at) => {
                            tokio::select! {
                                () = notified => {}
                                () = tokio::time::sleep_until(at) => {}
                            }
                        }
                        None => notified.await,
                    },
                }
            }
        });
        Ok(Box::pin(stream))
    }

    async fn ping(&self) -> Result<(), BusError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "in-process"
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use futures::StreamExt;

    use super::*;

    fn event(id: &str) -> Event {
        Event {
            id: id.into(),
            subject: "plinth.test.happened".into(),
            payload: bytes::Bytes::new(),
            headers: BTreeMap::new(),
        }
    }

    /// A republish inside the window (an outbox relay retrying after a lost
    /// ack) is stored once; once the window has passed the id is new again,
    /// and what the bus remembered of it is gone.
    #[tokio::test]
    async fn an_id_is_stored_once_within_the_dedup_window() {
        let bus = InProcessBus::new(Duration::from_secs(1));
        let mut live = bus.listen("plinth.>").await.unwrap();
        for id in ["a", "b", "a"] {
            bus.publish(&event(id)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
        for id in ["c", "a"] {
            bus.publish(&event(id)).await.unwrap();
        }
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(live.next().await.unwrap().id);
        }
        assert_eq!(got, ["a", "b", "c", "a"]);
        let inner = bus.lock();
        assert_eq!(inner.log.len(), 4);
        assert_eq!(inner.seen.len(), 2, "ids older than the window are forgotten");
    }
}
