//! The in-memory head of each environment this replica serves, kept in step
//! with the database, and the broadcast that watchers follow.
//!
//! Correctness comes from the database alone: a feed only ever advances by
//! applying revision `n + 1` to revision `n`, and whatever it did not see
//! committed locally it reads back from history (`catch_up`). Hints that a
//! revision exists (a local commit, another replica's `plinth.config.changed`
//! event, the periodic poll) only decide *when* it catches up, so a lost or
//! late event delays a watcher but never makes it skip or repeat a change.
//! Revisions are assigned under the environment's row lock, so commit order
//! is revision order and a committed revision is never preceded by an
//! invisible one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::error::ConfigError;
use crate::model::{Batch, Entry, EnvId};
use crate::store::Store;
use crate::watch::Encodings;

/// Revisions read from history per query when catching up.
const CATCH_UP_CHUNK: i64 = 500;

/// What a feed broadcasts.
#[derive(Debug)]
pub enum Update {
    /// The next revision, and the messages watchers send for it.
    Batch(Arc<Batch>, Encodings),
    /// The feed fell behind compacted history and reloaded its whole state.
    Reset,
    /// The environment was deleted.
    Gone,
}

/// One environment's head.
#[derive(Debug, Default)]
pub struct Head {
    /// The revision it reflects.
    pub revision: i64,
    /// History starts after this.
    pub compacted: i64,
    /// Live keys.
    pub entries: BTreeMap<String, Arc<Entry>>,
}

impl Head {
    /// Keys starting with `prefix` after `after`, at most `limit`.
    pub fn range(&self, prefix: &str, after: &str, limit: usize) -> Vec<Arc<Entry>> {
        use std::ops::Bound;
        let lower = if after.is_empty() || after < prefix {
            Bound::Included(prefix)
        } else {
            Bound::Excluded(after)
        };
        self.entries
            .range::<str, _>((lower, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect()
    }
}

/// One environment followed by this replica.
pub struct Feed {
    env: EnvId,
    /// When the environment was created: an environment deleted and
    /// created again under the same name is another one.
    incarnation: i64,
    head: RwLock<Head>,
    tx: broadcast::Sender<Arc<Update>>,
    sync: tokio::sync::Mutex<()>,
}

impl Feed {
    /// Reads the head.
    pub fn read<T>(&self, f: impl FnOnce(&Head) -> T) -> T {
        match self.head.read() {
            Ok(h) => f(&h),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// The revision the head reflects.
    pub fn revision(&self) -> i64 {
        self.read(|h| h.revision)
    }

    /// Subscribes, then reads: every update after what `f` saw arrives on the receiver.
    pub fn subscribe<T>(&self, f: impl FnOnce(&Head) -> T) -> (broadcast::Receiver<Arc<Update>>, T) {
        let rx = self.tx.subscribe();
        (rx, self.read(f))
    }

    fn write<T>(&self, f: impl FnOnce(&mut Head) -> T) -> T {
        match self.head.write() {
            Ok(mut h) => f(&mut h),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Applies `batch` if it is the next revision; whether it was.
    fn apply(&self, batch: &Arc<Batch>) -> bool {
        self.write(|h| {
            if batch.revision != h.revision + 1 {
                return false;
            }
            for e in &batch.events {
                match &e.entry {
                    Some(entry) => {
                        h.entries.insert(e.key.clone(), entry.clone());
                    }
                    None => {
                        h.entries.remove(&e.key);
                    }
                }
            }
            h.revision = batch.revision;
            // Sent under the lock: a subscriber that read the head before
            // this sees the batch, one that read it after does not.
            let _ = self
                .tx
                .send(Arc::new(Update::Batch(batch.clone(), Encodings::default())));
            true
        })
    }

    fn reset(&self, revision: i64, compacted: i64, entries: Vec<Entry>) {
        self.write(|h| {
            h.revision = revision;
            h.compacted = compacted;
            h.entries = entries.into_iter().map(|e| (e.key.clone(), Arc::new(e))).collect();
            let _ = self.tx.send(Arc::new(Update::Reset));
        });
    }
}

/// Every feed of this replica, and the follower that keeps them current.
pub struct Hub {
    store: Store,
    feeds: Mutex<HashMap<EnvId, Arc<Feed>>>,
    capacity: usize,
    hints: mpsc::Sender<(EnvId, i64)>,
    hints_rx: Mutex<Option<mpsc::Receiver<(EnvId, i64)>>>,
}

impl Hub {
    /// A hub over `store`; each feed buffers `capacity` updates for slow watchers.
    pub fn new(store: Store, capacity: usize) -> Self {
        let (hints, rx) = mpsc::channel(4096);
        Self {
            store,
            feeds: Mutex::new(HashMap::new()),
            capacity,
            hints,
            hints_rx: Mutex::new(Some(rx)),
        }
    }

    fn existing(&self, env: &EnvId) -> Option<Arc<Feed>> {
        match self.feeds.lock() {
            Ok(f) => f.get(env).cloned(),
            Err(p) => p.into_inner().get(env).cloned(),
        }
    }

    fn all(&self) -> Vec<Arc<Feed>> {
        match self.feeds.lock() {
            Ok(f) => f.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        }
    }

    /// The feed of `env`, loading it on first use. NOT_FOUND when the environment does not exist.
    pub async fn feed(&self, env: &EnvId) -> Result<Arc<Feed>, ConfigError> {
        if let Some(f) = self.existing(env) {
            return Ok(f);
        }
        let (environment, entries) = self.store.load_head(env).await?;
        let (tx, _) = broadcast::channel(self.capacity);
        let fresh = Arc::new(Feed {
            env: env.clone(),
            incarnation: environment.created_at,
            head: RwLock::new(Head {
                revision: environment.revision,
                compacted: environment.compacted_revision,
                entries: entries.into_iter().map(|e| (e.key.clone(), Arc::new(e))).collect(),
            }),
            tx,
            sync: tokio::sync::Mutex::new(()),
        });
        let (feed, raced) = {
            let mut feeds = match self.feeds.lock() {
                Ok(f) => f,
                Err(p) => p.into_inner(),
            };
            match feeds.get(env) {
                Some(existing) => (existing.clone(), true),
                None => {
                    feeds.insert(env.clone(), fresh.clone());
                    (fresh, false)
                }
            }
        };
        if raced && feed.revision() < environment.revision {
            self.catch_up(&feed).await?;
        }
        Ok(feed)
    }

    /// The feed of `env` at revision `min_revision` or later.
    /// `field` names the request field that asked, for the error.
    pub async fn feed_at_least(
        &self,
        env: &EnvId,
        min_revision: i64,
        field: &'static str,
    ) -> Result<Arc<Feed>, ConfigError> {
        if let Some(feed) = self.existing(env).filter(|f| f.revision() >= min_revision) {
            return Ok(feed);
        }
        // Boxed: loading and catching up read storage, and unboxed their
        // futures would be sized into every cached read's.
        Box::pin(self.load_at_least(env, min_revision, field)).await
    }

    async fn load_at_least(
        &self,
        env: &EnvId,
        min_revision: i64,
        field: &'static str,
    ) -> Result<Arc<Feed>, ConfigError> {
        let feed = self.feed(env).await?;
        if feed.revision() < min_revision {
            self.catch_up(&feed).await?;
            let head = feed.revision();
            if head < min_revision {
                return Err(ConfigError::FutureRevision {
                    field,
                    revision: min_revision,
                    head,
                });
            }
        }
        Ok(feed)
    }

    /// A revision committed on this replica: applied at once when it is the
    /// next one, else read back from the database.
    pub async fn committed(&self, env: &EnvId, batch: &Arc<Batch>) {
        let Some(feed) = self.existing(env) else { return };
        let _guard = feed.sync.lock().await;
        if feed.apply(batch) || feed.revision() >= batch.revision {
            return;
        }
        drop(_guard);
        if let Err(e) = self.catch_up(&feed).await {
            tracing::warn!(env = %env, error = %plinth_runtime::error::chain(&e), "feed catch-up failed");
        }
    }

    /// Someone committed `revision` of `env`: catch up soon if behind.
    pub fn hint(&self, env: EnvId, revision: i64) {
        if self.existing(&env).is_some_and(|f| f.revision() < revision) {
            let _ = self.hints.try_send((env, revision));
        }
    }

    /// Stops following `env` (deleted): its watchers' streams end.
    pub fn forget(&self, env: &EnvId) {
        let removed = match self.feeds.lock() {
            Ok(mut f) => f.remove(env),
            Err(p) => p.into_inner().remove(env),
        };
        if let Some(feed) = removed {
            let _ = feed.tx.send(Arc::new(Update::Gone));
        }
    }

    /// Stops following every environment of `namespace` (deleted with them).
    pub fn forget_namespace(&self, namespace: &str) {
        let gone: Vec<EnvId> = self
            .all()
            .iter()
            .filter(|f| f.env.namespace == namespace)
            .map(|f| f.env.clone())
            .collect();
        for env in gone {
            self.forget(&env);
        }
    }

    /// Brings `feed` up to the database's head.
    pub async fn catch_up(&self, feed: &Feed) -> Result<(), ConfigError> {
        let _guard = feed.sync.lock().await;
        let environment = match self.store.get_environment(&feed.env).await {
            Ok(e) => e,
            Err(ConfigError::EnvironmentNotFound(_) | ConfigError::NamespaceNotFound(_)) => {
                self.forget(&feed.env);
                return Err(ConfigError::EnvironmentNotFound(feed.env.to_string()));
            }
            Err(e) => return Err(e),
        };
        if environment.created_at != feed.incarnation {
            self.forget(&feed.env);
            return Err(ConfigError::EnvironmentNotFound(feed.env.to_string()));
        }
        loop {
            let from = feed.revision();
            if from >= environment.revision {
                return Ok(());
            }
            if from < environment.compacted_revision {
                let (env, entries) = self.store.load_head(&feed.env).await?;
                tracing::info!(env = %feed.env, from, to = env.revision, "feed reloaded past compacted history");
                feed.reset(env.revision, env.compacted_revision, entries);
                return Ok(());
            }
            let upto = environment.revision.min(from + CATCH_UP_CHUNK);
            let batches = match self.store.batches(&feed.env, from, upto).await {
                Err(ConfigError::Compacted { .. }) => {
                    // Compacted between the check above and this read: reload.
                    let (env, entries) = self.store.load_head(&feed.env).await?;
                    feed.reset(env.revision, env.compacted_revision, entries);
                    return Ok(());
                }
                other => other?,
            };
            if batches.is_empty() {
                return Err(ConfigError::Storage(plinth_runtime::storage::StorageError::Query(
                    sqlx::Error::Protocol(format!("history of {} misses revisions after {from}", feed.env)),
                )));
            }
            for b in batches {
                let b = Arc::new(b);
                if !feed.apply(&b) && b.revision > feed.revision() {
                    return Err(ConfigError::Storage(plinth_runtime::storage::StorageError::Query(
                        sqlx::Error::Protocol(format!("history of {} skips to revision {}", feed.env, b.revision)),
                    )));
                }
            }
        }
    }

    /// Follows other replicas' writes: hints as they come, and a poll of
    /// every environment's head every `poll` in case a hint was lost.
    pub async fn follow(self: Arc<Self>, poll: Duration, token: CancellationToken) -> Result<(), ConfigError> {
        let taken = match self.hints_rx.lock() {
            Ok(mut r) => r.take(),
            Err(p) => p.into_inner().take(),
        };
        let Some(mut hints) = taken else { return Ok(()) };
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = token.cancelled() => return Ok(()),
                hint = hints.recv() => {
                    let Some((env, revision)) = hint else { return Ok(()) };
                    if let Some(feed) = self.existing(&env).filter(|f| f.revision() < revision)
                        && let Err(e) = self.catch_up(&feed).await
                    {
                        tracing::warn!(env = %env, error = %plinth_runtime::error::chain(&e), "feed catch-up failed");
                    }
                }
                _ = tick.tick() => self.poll_heads().await,
            }
        }
    }

    async fn poll_heads(&self) {
        let feeds = self.all();
        if feeds.is_empty() {
            return;
        }
        let heads = match self.store.heads().await {
            Ok(h) => h.into_iter().map(|(e, r, c)| (e, (r, c))).collect::<HashMap<_, _>>(),
            Err(e) => {
                tracing::warn!(error = %plinth_runtime::error::chain(&e), "polling environment heads failed");
                return;
            }
        };
        for feed in feeds {
            match heads.get(&feed.env) {
                None => self.forget(&feed.env),
                Some(&(_, created)) if created != feed.incarnation => self.forget(&feed.env),
                Some(&(head, _)) if head > feed.revision() => {
                    if let Err(e) = self.catch_up(&feed).await {
                        tracing::warn!(env = %feed.env, error = %plinth_runtime::error::chain(&e), "feed catch-up failed");
                    }
                }
                Some(_) => {}
            }
        }
    }
}
