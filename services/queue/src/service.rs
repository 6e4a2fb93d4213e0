//! The queue's domain operations over [`Store`]: what each call means, the
//! events it records, who is woken when work appears, and the background
//! sweep. Time comes from a [`WallClock`] so tests move it by hand.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use plinth::queue::v1 as pb;
use plinth_runtime::Tasks;
use plinth_runtime::config::QueueSettings;
use plinth_runtime::events::outbox::{OutboxEvent, Relay};
use plinth_runtime::resilience::{SystemWallClock, WallClock};
use plinth_runtime::storage::Db;
use plinth_runtime::storage::group_commit::GroupCommit;
use plinth_runtime::wire::timestamp;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cron::Cron;
use crate::error::QueueError;
use crate::metrics;
use crate::model::{
    AckOutcome, Counts, Enqueued, Leased, Message, Nack, NackOutcome, NewMessage, Queue, RetryFilter, Schedule,
    Settings, State,
};
use crate::rates::{Rates, Sample};
use crate::store::{NOTIFY_CHANNEL, Store, Swept};

/// The queue service's domain, shared by its gRPC face and background tasks.
#[derive(Clone)]
pub struct Queues {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    clock: Arc<dyn WallClock>,
    settings: QueueSettings,
    relay: Option<Relay>,
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    rates: Rates,
    /// Rows claimed or deleted since the last vacuum.
    churn: AtomicU64,
    /// Rows inserted since the last `ANALYZE`.
    inserted: AtomicU64,
    /// The row count the last `ANALYZE` found.
    analyzed_rows: AtomicU64,
    /// Queues with new ready work that other replicas have not been told of.
    unannounced: Mutex<HashSet<String>>,
    /// Wakes [`Queues::announce`].
    announce: Notify,
    /// Where releases of dropped streams run; without it they wait for
    /// their leases to expire.
    tasks: Option<Tasks>,
    /// Transactions shared by concurrent callers.
    lanes: Lanes,
}

/// Concurrent callers' writes to one queue, grouped into shared transactions.
struct Lanes {
    /// Small enqueues (see [`GROUPED_BELOW`]).
    enqueues: GroupCommit<String, Vec<NewMessage>, Vec<Enqueued>, QueueError>,
    /// Claims on SQLite, by queue and lease duration: one transaction hands
    /// out each waiting worker's share.
    claims: GroupCommit<(String, Option<i64>), i64, Vec<Leased>, QueueError>,
    /// Acks on SQLite.
    acks: GroupCommit<String, Vec<(i64, i64)>, Vec<AckOutcome>, QueueError>,
}

impl Lanes {
    fn new(tasks: &Tasks) -> Self {
        Self {
            enqueues: GroupCommit::new("queue-group-enqueue", MAX_GROUP_MESSAGES, tasks.clone())
                .with_leads(ENQUEUE_LEADS),
            claims: GroupCommit::new("queue-group-claim", MAX_GROUP_MESSAGES, tasks.clone()),
            acks: GroupCommit::new("queue-group-ack", MAX_GROUP_MESSAGES, tasks.clone()),
        }
    }
}

/// Enqueues of fewer messages than this are grouped with concurrent ones
/// into one transaction: alone, each pays a commit and a handful of round
/// trips for one row. Bigger batches already amortise that and commit side
/// by side.
const GROUPED_BELOW: usize = 64;
/// Most messages a group of enqueues, claims or acks commits at once.
const MAX_GROUP_MESSAGES: usize = 1000;
/// Groups of one queue in flight at once: PostgreSQL runs them side by side
/// (SQLite takes them in turn), so a second keeps the server busy while the
/// first commits.
const ENQUEUE_LEADS: usize = 2;

/// Churned rows after which the sweeper vacuums the messages table.
const VACUUM_AFTER_ROWS: u64 = 5_000;
/// Least time between two vacuums by one replica.
const VACUUM_EVERY: Duration = Duration::from_secs(1);
/// Inserted rows after which the sweeper refreshes the table's statistics,
/// unless they are fewer than a fifth of the rows it last counted.
const ANALYZE_AFTER_ROWS: u64 = 5_000;

/// Hands out one combined claim in order: each caller its `wants`, while
/// there are messages left.
fn share_out(claimed: Vec<Leased>, wants: &[i64]) -> Vec<Vec<Leased>> {
    let mut claimed = claimed.into_iter();
    wants
        .iter()
        .map(|&n| claimed.by_ref().take(usize::try_from(n).unwrap_or(0)).collect())
        .collect()
}

/// A queue with its counts.
#[derive(Debug, Clone)]
pub struct QueueView {
    /// The queue.
    pub queue: Queue,
    /// Messages by state.
    pub counts: Counts,
}

/// A queue's status.
#[derive(Debug, Clone)]
pub struct Status {
    /// The queue.
    pub queue: Queue,
    /// Messages by state.
    pub counts: Counts,
    /// How long the oldest ready message has waited (ms).
    pub oldest_ready_ms: i64,
    /// Per-second rates over the last minute, this replica.
    pub rates: Sample,
}

/// A settings change: the new settings and which of them to apply.
#[derive(Debug, Clone)]
pub struct SettingsUpdate {
    /// The new values.
    pub settings: Settings,
    /// Setting names to apply (`max_attempts`, `backoff`, `backoff.initial`, …).
    pub fields: Vec<String>,
    /// Refuse unless the queue's generation is this (0: any).
    pub generation: i64,
}

impl Queues {
    /// The domain over `store`, publishing through `relay`'s outbox.
    pub fn new(store: Store, settings: QueueSettings, relay: Option<Relay>) -> Self {
        Self::with_clock(store, settings, relay, Arc::new(SystemWallClock))
    }

    /// As [`Queues::new`] with a given clock (tests move it by hand).
    pub fn with_clock(store: Store, settings: QueueSettings, relay: Option<Relay>, clock: Arc<dyn WallClock>) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                clock,
                settings,
                relay,
                wakers: Mutex::new(HashMap::new()),
                rates: Rates::default(),
                churn: AtomicU64::new(0),
                inserted: AtomicU64::new(0),
                analyzed_rows: AtomicU64::new(0),
                unannounced: Mutex::new(HashSet::new()),
                announce: Notify::new(),
                tasks: None,
                lanes: Lanes::new(&Tasks::new()),
            }),
        }
    }

    /// Runs background work (releasing the leases of dropped streams) on `tasks`.
    /// Call before cloning.
    pub fn with_tasks(mut self, tasks: Tasks) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.lanes = Lanes::new(&tasks);
            inner.tasks = Some(tasks);
        }
        self
    }

    fn now(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    /// The service's settings.
    pub fn settings(&self) -> &QueueSettings {
        &self.inner.settings
    }

    fn published(&self) {
        if let Some(r) = &self.inner.relay {
            r.wake();
        }
    }

    /// The notification this replica fires when `queue` may have ready work.
    pub fn waker(&self, queue: &str) -> Arc<Notify> {
        let mut w = self.inner.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        w.entry(queue.to_owned()).or_default().clone()
    }

    /// `queue` may have new ready work: wakes this replica's waiting leases
    /// and, on PostgreSQL, has [`Queues::announce`] tell the other replicas
    /// once the work is committed (it is, wherever this is called).
    pub fn wake(&self, queue: &str) {
        self.wake_here(queue);
        if matches!(self.inner.store.db(), Db::Postgres(_)) {
            self.inner
                .unannounced
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(queue.to_owned());
            self.inner.announce.notify_one();
        }
    }

    /// Wakes this replica's waiting leases on `queue` (another replica
    /// announced work).
    fn wake_here(&self, queue: &str) {
        let w = self.inner.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = w.get(queue) {
            n.notify_waiters();
        }
    }

    fn changed(&self, queue: &str, change: &str, subject: &str, messages: i64) -> OutboxEvent {
        let event = pb::QueueChangedEvent {
            queue: queue.to_owned(),
            change: change.to_owned(),
            subject: subject.to_owned(),
            messages,
            time: Some(timestamp(self.now())),
        };
        OutboxEvent::new("plinth.queue.queue_changed", queue, &event)
    }

    /// Creates a queue.
    pub async fn create_queue(&self, name: &str, settings: &Settings, subject: &str) -> Result<QueueView, QueueError> {
        let queue = self
            .inner
            .store
            .create_queue(name, settings, self.now(), &self.changed(name, "created", subject, 0))
            .await?;
        self.published();
        Ok(QueueView {
            queue,
            counts: Counts::default(),
        })
    }

    /// One queue with counts.
    pub async fn queue(&self, name: &str) -> Result<QueueView, QueueError> {
        let queue = self.inner.store.queue(name).await?;
        let counts = self.counts(name).await?;
        Ok(QueueView { queue, counts })
    }

    async fn counts(&self, name: &str) -> Result<Counts, QueueError> {
        Ok(self.inner.store.counts(&[name]).await?.remove(name).unwrap_or_default())
    }

    /// Queues by name after `after`, with counts.
    pub async fn queues(&self, after: &str, limit: usize) -> Result<Vec<QueueView>, QueueError> {
        let queues = self.inner.store.queues(after, limit).await?;
        let names: Vec<&str> = queues.iter().map(|q| q.name.as_str()).collect();
        let mut counts = self.inner.store.counts(&names).await?;
        Ok(queues
            .into_iter()
            .map(|q| {
                let counts = counts.remove(&q.name).unwrap_or_default();
                QueueView { queue: q, counts }
            })
            .collect())
    }

    /// Applies a settings change (read, merge, write if unchanged since the read).
    pub async fn update_queue(
        &self,
        name: &str,
        update: SettingsUpdate,
        subject: &str,
    ) -> Result<QueueView, QueueError> {
        let current = self.inner.store.queue(name).await?;
        if update.generation != 0 && update.generation != current.generation {
            return Err(QueueError::Conflict(name.to_owned()));
        }
        let merged = merge(&current.settings, &update)?;
        merged.check("settings", name)?;
        let queue = self
            .inner
            .store
            .update_queue(
                name,
                current.generation,
                &merged,
                self.now(),
                &self.changed(name, "updated", subject, 0),
            )
            .await?;
        self.published();
        let counts = self.counts(name).await?;
        Ok(QueueView { queue, counts })
    }

    /// Deletes a queue and its messages.
    pub async fn delete_queue(&self, name: &str, subject: &str) -> Result<i64, QueueError> {
        let n = self
            .inner
            .store
            .delete_queue(name, &self.changed(name, "deleted", subject, 0))
            .await?;
        self.published();
        self.wake(name);
        Ok(n)
    }

    /// Stops handing out leases.
    pub async fn pause(&self, name: &str, subject: &str) -> Result<QueueView, QueueError> {
        let current = self.inner.store.queue(name).await?;
        self.set_flow(name, true, current.drain_state, "paused", subject).await
    }

    /// Hands out leases again (ends a pause and a drain).
    pub async fn resume(&self, name: &str, subject: &str) -> Result<QueueView, QueueError> {
        let view = self.set_flow(name, false, 0, "resumed", subject).await?;
        self.wake(name);
        Ok(view)
    }

    async fn set_flow(
        &self,
        name: &str,
        paused: bool,
        drain_state: i32,
        change: &str,
        subject: &str,
    ) -> Result<QueueView, QueueError> {
        let queue = self
            .inner
            .store
            .set_flow(
                name,
                paused,
                drain_state,
                self.now(),
                &self.changed(name, change, subject, 0),
            )
            .await?;
        self.published();
        let counts = self.counts(name).await?;
        Ok(QueueView { queue, counts })
    }

    /// Starts (or continues) a drain and reports leases in flight, waiting
    /// up to `wait` for them to reach zero.
    pub async fn drain(&self, name: &str, wait: Duration, subject: &str) -> Result<i64, QueueError> {
        let current = self.inner.store.queue(name).await?;
        if current.drain_state == 0 {
            self.set_flow(name, current.paused, 1, "draining", subject).await?;
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let in_flight = self.counts(name).await?.leased;
            if in_flight == 0 {
                if self.inner.store.watch_thresholds(self.now()).await? {
                    self.published();
                }
                return Ok(0);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(in_flight);
            }
            let step = Duration::from_millis(self.inner.settings.poll_ms.min(100));
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + step)).await;
        }
    }

    /// Counts, oldest ready age and this replica's rates.
    pub async fn status(&self, name: &str) -> Result<Status, QueueError> {
        let QueueView { queue, counts } = self.queue(name).await?;
        let oldest = self.inner.store.oldest_ready(name).await?;
        let now = self.now();
        Ok(Status {
            queue,
            counts,
            oldest_ready_ms: oldest.map_or(0, |t| (now - t).max(0)),
            rates: self.inner.rates.sample(name),
        })
    }

    /// Adds messages (all or none); one result each, in order. Owned, so a
    /// small enqueue joins a group commit without copying its payloads.
    pub async fn enqueue(
        &self,
        queue: &str,
        messages: impl Into<Vec<NewMessage>>,
    ) -> Result<Vec<Enqueued>, QueueError> {
        let messages = messages.into();
        let results = if messages.len() >= GROUPED_BELOW {
            self.inner.store.enqueue(queue, &messages, self.now()).await?
        } else {
            let this = self.clone();
            self.inner
                .lanes
                .enqueues
                .submit_items(
                    &queue.to_owned(),
                    messages,
                    QueueError::replicate,
                    move |name, all| async move { this.inner.store.enqueue(&name, &all, this.now()).await },
                )
                .await?
        };
        let added = results.iter().filter(|r| !r.duplicate).count() as u64;
        self.inner.inserted.fetch_add(added, Ordering::Relaxed);
        self.inner.rates.record(queue, added, 0, 0);
        metrics::queue().enqueued.with_label_values(&[queue]).inc_by(added);
        if results.iter().any(|r| !r.duplicate && r.state == Some(State::Ready)) {
            self.wake(queue);
        }
        Ok(results)
    }

    /// Leases up to `max` messages, waiting up to `wait` when none is ready.
    pub async fn lease(
        &self,
        queue: &str,
        max: i64,
        lease_ms: Option<i64>,
        wait: Duration,
    ) -> Result<Vec<Leased>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        let poll = Duration::from_millis(self.inner.settings.poll_ms);
        let waker = self.waker(queue);
        loop {
            // Registered before looking, so an enqueue between the look and
            // the wait still wakes this lease.
            let woken = waker.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let got = self.lease_now(queue, max, lease_ms).await?;
            let now = tokio::time::Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep_until(deadline.min(now + poll)) => {}
            }
        }
    }

    /// Leases up to `max` without waiting (for streams, which wait on
    /// [`Queues::waker`] themselves).
    pub async fn lease_now(&self, queue: &str, max: i64, lease_ms: Option<i64>) -> Result<Vec<Leased>, QueueError> {
        let got = if self.inner.store.is_sqlite() {
            // SQLite commits one writer at a time: workers claiming together
            // share one transaction instead of queueing for the file.
            let this = self.clone();
            let weight = usize::try_from(max).unwrap_or(0);
            self.inner
                .lanes
                .claims
                .submit(
                    &(queue.to_owned(), lease_ms),
                    max,
                    weight,
                    move |(queue, lease_ms), wants: Vec<i64>| async move {
                        let total = wants.iter().sum();
                        match this.inner.store.claim(&queue, total, lease_ms, this.now()).await {
                            Ok(claimed) => share_out(claimed, &wants).into_iter().map(Ok).collect(),
                            Err(e) => wants.iter().map(|_| Err(e.replicate())).collect(),
                        }
                    },
                )
                .await?
        } else {
            self.inner.store.claim(queue, max, lease_ms, self.now()).await?
        };
        self.inner.churn.fetch_add(got.len() as u64, Ordering::Relaxed);
        Ok(got)
    }

    /// Ends the leases of deliveries `tokens` at once, in the background
    /// (a worker's stream is gone). Their messages are handed out again by
    /// the next sweep.
    pub fn release_later(&self, queue: &str, tokens: Vec<i64>) {
        let Some(tasks) = &self.inner.tasks else {
            tracing::debug!(
                queue,
                leases = tokens.len(),
                "stream closed; its leases run until they expire"
            );
            return;
        };
        let (this, queue) = (self.clone(), queue.to_owned());
        tasks.spawn("queue-release", async move {
            let released = this.inner.store.expire_leases(&queue, &tokens, this.now()).await?;
            if released > 0 {
                tracing::info!(queue = %queue, released, "stream closed; its leases were released");
                this.tick().await?;
            }
            Ok::<(), QueueError>(())
        });
    }

    /// Creates a cron schedule; its first tick is the first after now.
    pub async fn create_schedule(&self, mut schedule: Schedule) -> Result<Schedule, QueueError> {
        let cron = Cron::parse("schedule", &schedule.cron, &schedule.time_zone)?;
        let now = self.now();
        schedule.next_run_at = cron
            .next_after(now)
            .ok_or_else(|| QueueError::invalid("schedule.cron", "never fires again"))?;
        schedule.created_at = now;
        self.inner.store.create_schedule(&schedule).await
    }

    /// A queue's schedules.
    pub async fn schedules(&self, queue: &str) -> Result<Vec<Schedule>, QueueError> {
        self.inner.store.schedules(queue).await
    }

    /// Pauses a schedule.
    pub async fn pause_schedule(&self, queue: &str, name: &str) -> Result<Schedule, QueueError> {
        self.inner.store.set_schedule_paused(queue, name, true, None).await
    }

    /// Resumes a schedule from its first tick after now.
    pub async fn resume_schedule(&self, queue: &str, name: &str) -> Result<Schedule, QueueError> {
        let s = self.inner.store.schedule(queue, name).await?;
        let next = Cron::parse("schedule", &s.cron, &s.time_zone)?.next_after(self.now());
        let next = next.ok_or_else(|| QueueError::invalid("schedule.cron", "never fires again"))?;
        self.inner
            .store
            .set_schedule_paused(queue, name, false, Some(next))
            .await
    }

    /// Deletes a schedule.
    pub async fn delete_schedule(&self, queue: &str, name: &str) -> Result<(), QueueError> {
        self.inner.store.delete_schedule(queue, name).await
    }

    /// Enqueues every due tick once; how many this replica enqueued.
    async fn fire_schedules(&self, now: i64) -> Result<u64, QueueError> {
        let mut fired = 0;
        for tick in self.inner.store.due_ticks(now).await? {
            let next = Cron::parse("schedule", &tick.cron, &tick.time_zone)
                .ok()
                .and_then(|c| c.next_after(now.max(tick.due)));
            // A schedule that never fires again parks far in the future.
            let next = next.unwrap_or(i64::MAX);
            if self.inner.store.fire(&tick, next, now).await? {
                fired += 1;
                self.wake(&tick.queue);
            }
        }
        Ok(fired)
    }

    /// Completes deliveries.
    pub async fn ack(&self, queue: &str, acks: &[(i64, i64)]) -> Result<Vec<AckOutcome>, QueueError> {
        let outcomes = if self.inner.store.is_sqlite() {
            let this = self.clone();
            self.inner
                .lanes
                .acks
                .submit_items(
                    &queue.to_owned(),
                    acks.to_vec(),
                    QueueError::replicate,
                    move |name, all| async move { this.inner.store.ack(&name, &all).await },
                )
                .await?
        } else {
            self.inner.store.ack(queue, acks).await?
        };
        let acked = outcomes.iter().filter(|o| **o == AckOutcome::Acked).count() as u64;
        self.inner.rates.record(queue, 0, acked, 0);
        self.inner.churn.fetch_add(acked, Ordering::Relaxed);
        metrics::queue().acked.with_label_values(&[queue]).inc_by(acked);
        Ok(outcomes)
    }

    /// Gives a delivery back: retry after backoff (or `delay`), or dead letter.
    pub async fn nack(&self, queue: &str, id: i64, token: i64, nack: &Nack) -> Result<NackOutcome, QueueError> {
        let (attempts, settings) = self.inner.store.delivery(queue, id, token).await?;
        self.inner.rates.record(queue, 0, 0, 1);
        let now = self.now();
        if nack.dead_letter || attempts >= settings.max_attempts {
            let reason = if nack.dead_letter {
                "nacked"
            } else {
                "attempts_exhausted"
            };
            let woken = self
                .inner
                .store
                .kill(queue, id, token, &nack.error, reason, now)
                .await?;
            self.published();
            metrics::queue().dead_letters.with_label_values(&[queue]).inc();
            for q in woken {
                self.wake(&q);
            }
            return Ok(NackOutcome::Dead);
        }
        let delay = nack.delay_ms.unwrap_or_else(|| settings.backoff.delay_ms(attempts));
        let at = now.saturating_add(delay);
        self.inner.store.retry_at(queue, id, token, at, &nack.error).await?;
        metrics::queue().retries.with_label_values(&[queue]).inc();
        Ok(NackOutcome::Retry(at))
    }

    /// Extends a lease to now + `lease_ms` (default: the queue's).
    pub async fn extend(&self, queue: &str, id: i64, token: i64, lease_ms: Option<i64>) -> Result<i64, QueueError> {
        let lease = match lease_ms {
            Some(ms) => ms,
            None => self.inner.store.queue(queue).await?.settings.lease_ms,
        };
        let expires = self.now().saturating_add(lease);
        self.inner.store.extend(queue, id, token, expires).await?;
        Ok(expires)
    }

    /// One message.
    pub async fn message(&self, queue: &str, id: i64) -> Result<Message, QueueError> {
        self.inner.store.message(queue, id).await
    }

    /// Messages in one state after id `after`.
    pub async fn messages(
        &self,
        queue: &str,
        state: State,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Message>, QueueError> {
        self.inner.store.queue(queue).await?;
        self.inner.store.messages(queue, state, after, limit).await
    }

    /// Deletes messages in `states`.
    pub async fn purge(&self, queue: &str, states: &[State], subject: &str) -> Result<i64, QueueError> {
        let n = self
            .inner
            .store
            .purge(queue, states, |n| self.changed(queue, "purged", subject, n))
            .await?;
        self.published();
        Ok(n)
    }

    /// Redrives dead letters.
    pub async fn retry_failed(&self, queue: &str, filter: &RetryFilter, subject: &str) -> Result<i64, QueueError> {
        let n = self
            .inner
            .store
            .retry_failed(queue, filter, self.now(), |n| {
                self.changed(queue, "retried", subject, n)
            })
            .await?;
        if n > 0 {
            self.published();
            self.wake(queue);
        }
        Ok(n)
    }

    /// One sweep: due messages, expired leases and messages, dedup keys,
    /// depth alerts and drains. The background task calls it every
    /// `sweep_ms`; tests call it after moving the clock.
    pub async fn tick(&self) -> Result<Swept, QueueError> {
        let now = self.now();
        self.fire_schedules(now).await?;
        let swept = self.inner.store.sweep(now).await?;
        self.refresh_statistics().await?;
        for q in &swept.woken {
            self.wake(q);
        }
        let m = metrics::queue();
        for (q, n) in &swept.expired_leases {
            m.lease_expiries.with_label_values(&[q]).inc_by(*n);
            self.inner.rates.record(q, 0, 0, *n);
        }
        for (q, n) in &swept.dead_lettered {
            m.dead_letters.with_label_values(&[q]).inc_by(*n);
        }
        let alerts = self.inner.store.watch_thresholds(now).await?;
        if swept.events || alerts {
            self.published();
        }
        Ok(swept)
    }

    /// Refreshes the table's planner statistics once it has grown by
    /// [`ANALYZE_AFTER_ROWS`] and by a fifth since they were taken (see
    /// [`Store::analyze`]).
    async fn refresh_statistics(&self) -> Result<(), QueueError> {
        let inserted = self.inner.inserted.load(Ordering::Relaxed);
        let floor = self.inner.analyzed_rows.load(Ordering::Relaxed) / 5;
        if inserted < ANALYZE_AFTER_ROWS.max(floor) {
            return Ok(());
        }
        self.inner.inserted.fetch_sub(inserted, Ordering::Relaxed);
        if let Some(rows) = self.inner.store.analyze().await? {
            tracing::debug!(rows, inserted, "queue table statistics refreshed");
            self.inner.analyzed_rows.store(rows, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Refreshes the depth gauges from the database.
    pub async fn refresh_metrics(&self) -> Result<(), QueueError> {
        let (counts, oldest) = self.inner.store.depths().await?;
        let now = self.now();
        let ages = oldest.into_iter().map(|(q, t)| (q, (now - t).max(0) / 1000)).collect();
        metrics::queue().set_depths(&counts, &ages);
        Ok(())
    }

    /// Sweeps until `token` is cancelled, refreshing the depth gauges
    /// every couple of seconds.
    pub async fn run_sweeper(self, token: CancellationToken) -> Result<(), QueueError> {
        let every = Duration::from_millis(self.inner.settings.sweep_ms);
        let gauges_every = (2000 / self.inner.settings.sweep_ms.max(1)).max(1);
        let mut failures = 0u32;
        let mut ticks = 0u64;
        let mut vacuumed = tokio::time::Instant::now();
        while plinth_runtime::tasks::pause(&token, every).await {
            ticks += 1;
            let mut result = self.tick().await;
            if self.inner.churn.load(Ordering::Relaxed) >= VACUUM_AFTER_ROWS && vacuumed.elapsed() >= VACUUM_EVERY {
                self.inner.churn.store(0, Ordering::Relaxed);
                vacuumed = tokio::time::Instant::now();
                result = self.inner.store.vacuum().await.and(result);
            }
            if result.is_ok() && ticks.is_multiple_of(gauges_every) {
                result = self.refresh_metrics().await.and(result);
            }
            match result {
                Ok(s) => {
                    failures = 0;
                    let expired: u64 = s.expired_leases.values().sum();
                    let dead: u64 = s.dead_lettered.values().sum();
                    if expired > 0 || dead > 0 {
                        tracing::info!(
                            expired_leases = expired,
                            dead_lettered = dead,
                            "queue sweep returned expired work"
                        );
                    }
                }
                Err(e) => {
                    if failures == 0 || failures.is_power_of_two() {
                        tracing::warn!(error = %e, attempt = failures, "queue sweep failed, will retry");
                    }
                    failures = failures.saturating_add(1);
                }
            }
        }
        Ok(())
    }

    /// On PostgreSQL, tells other replicas which queues received ready work
    /// (`NOTIFY`, see [`Queues::wake`]), after it committed and coalesced:
    /// one notification per queue for everything since the last one. Inside
    /// each enqueue's transaction, `NOTIFY` took a database-wide lock held
    /// through the commit's WAL flush, so enqueues could not share commits:
    /// `pg_stat_activity` showed most committing enqueues waiting on that
    /// lock. Returns at once on SQLite.
    pub async fn announce(self, token: CancellationToken) -> Result<(), QueueError> {
        if !matches!(self.inner.store.db(), Db::Postgres(_)) {
            return Ok(());
        }
        let mut failures = 0u32;
        loop {
            tokio::select! {
                () = token.cancelled() => return Ok(()),
                () = self.inner.announce.notified() => {}
            }
            let queues: Vec<String> =
                std::mem::take(&mut *self.inner.unannounced.lock().unwrap_or_else(PoisonError::into_inner))
                    .into_iter()
                    .collect();
            if queues.is_empty() {
                continue;
            }
            // A lost announcement costs other replicas' idle workers one
            // poll interval, not a message.
            match self.inner.store.announce(&queues).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    if failures == 0 || failures.is_power_of_two() {
                        tracing::warn!(error = %e, queues = queues.len(), "cannot announce ready work to other replicas; they will poll");
                    }
                    failures = failures.saturating_add(1);
                }
            }
        }
    }

    /// On PostgreSQL, wakes this replica's waiting leases when another
    /// replica makes work ready (LISTEN/NOTIFY); returns at once on SQLite,
    /// where every writer is in this process.
    pub async fn listen(self, token: CancellationToken) -> Result<(), QueueError> {
        let Db::Postgres(pool) = self.inner.store.db().clone() else {
            return Ok(());
        };
        let backoff = plinth_runtime::resilience::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut attempt = 0u32;
        loop {
            let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "queue listener cannot connect, will retry");
                    if !plinth_runtime::tasks::pause(&token, backoff.delay(attempt)).await {
                        return Ok(());
                    }
                    attempt = attempt.saturating_add(1);
                    continue;
                }
            };
            if let Err(e) = listener.listen(NOTIFY_CHANNEL).await {
                tracing::warn!(error = %e, "queue listener cannot listen, will retry");
                if !plinth_runtime::tasks::pause(&token, backoff.delay(attempt)).await {
                    return Ok(());
                }
                attempt = attempt.saturating_add(1);
                continue;
            }
            attempt = 0;
            loop {
                tokio::select! {
                    () = token.cancelled() => return Ok(()),
                    n = listener.recv() => match n {
                        Ok(n) => self.wake_here(n.payload()),
                        Err(e) => {
                            tracing::warn!(error = %e, "queue listener lost its connection, reconnecting");
                            break;
                        }
                    },
                }
            }
        }
    }
}

/// Applies the fields of `update` to `current`.
fn merge(current: &Settings, update: &SettingsUpdate) -> Result<Settings, QueueError> {
    let mut out = current.clone();
    let new = &update.settings;
    for field in &update.fields {
        match field.as_str() {
            "max_attempts" => out.max_attempts = new.max_attempts,
            "backoff" => out.backoff = new.backoff,
            "backoff.initial" => out.backoff.initial_ms = new.backoff.initial_ms,
            "backoff.max" => out.backoff.max_ms = new.backoff.max_ms,
            "backoff.multiplier" => out.backoff.multiplier = new.backoff.multiplier,
            "backoff.jitter" => out.backoff.jitter = new.backoff.jitter,
            "lease_duration" => out.lease_ms = new.lease_ms,
            "message_ttl" => out.ttl_ms = new.ttl_ms,
            "dedup_window" => out.dedup_window_ms = new.dedup_window_ms,
            "rate_limit_per_second" => out.rate_limit = new.rate_limit,
            "max_concurrency" => out.max_concurrency = new.max_concurrency,
            "depth_alert_threshold" => out.depth_alert = new.depth_alert,
            "dead_letter_queue" => out.dead_letter_queue.clone_from(&new.dead_letter_queue),
            "fifo_groups" => out.fifo_groups = new.fifo_groups,
            other => {
                return Err(QueueError::invalid(
                    "update_mask",
                    format!("`{other}` is not a queue setting"),
                ));
            }
        }
    }
    Ok(out)
}
