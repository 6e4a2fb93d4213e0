//! One watch stream: history from `from_revision` (or a snapshot), then the
//! feed's live revisions, each sent once, in order. A watcher that falls
//! behind the feed's buffer re-reads the missed revisions from history
//! instead of being cut off; one whose start was compacted away gets a
//! snapshot. The stream is a state machine polled by the transport, with no
//! task or channel of its own, so an idle watch costs little memory.
//!
//! Messages leave as gRPC frames (`plinth_runtime::framed`): a live
//! revision becomes the same bytes for every watch of the same prefix (and
//! secret visibility), so the first of them to reach it encodes it and the
//! others send those bytes. Building and encoding the message in each of
//! 10,000 streams was 15 % of the server's CPU in a fan-out.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tonic::Status;

use plinth::config::v1 as pb;
use plinth_runtime::error::to_status;

use crate::convert::{deleted, key_value};
use crate::error::ConfigError;
use crate::feed::{Feed, Update};
use crate::model::{Batch, Entry, EnvId};
use crate::service::Configuration;

/// Keys per snapshot message.
const SNAPSHOT_CHUNK: usize = 500;
/// Revisions read from history per query while replaying.
const REPLAY_CHUNK: i64 = 200;

/// What a watch asks for.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// Which environment.
    pub env: EnvId,
    /// Only keys starting with this.
    pub prefix: String,
    /// Changes after this revision; 0 starts with a snapshot.
    pub from_revision: i64,
    /// Send secrets' text.
    pub reveal: bool,
}

/// A live revision's messages as gRPC frames, by the watches they are for. It
/// lives as long as the feed's buffer holds the revision.
#[derive(Default)]
pub struct Encodings {
    /// By `reveal` (false, true), then prefix.
    by_watch: Mutex<[HashMap<String, Arc<OnceLock<Bytes>>>; 2]>,
}

impl std::fmt::Debug for Encodings {
    // The messages may hold secrets in clear.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Encodings")
    }
}

impl Encodings {
    /// The frame for watches of `prefix`/`reveal`, made by `encode`
    /// the first time it is asked for.
    fn get_or_encode(
        &self,
        prefix: &str,
        reveal: bool,
        encode: impl FnOnce() -> Result<Bytes, ConfigError>,
    ) -> Result<Bytes, ConfigError> {
        let cell = {
            let mut by_watch = match self.by_watch.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            let by_prefix = &mut by_watch[usize::from(reveal)];
            match by_prefix.get(prefix) {
                Some(cell) => cell.clone(),
                None => by_prefix.entry(prefix.to_owned()).or_default().clone(),
            }
        };
        if let Some(m) = cell.get() {
            return Ok(m.clone());
        }
        // Outside the lock (encoding may decrypt secrets): watches of other
        // kinds go on; two of this kind may both encode, and the first
        // one's bytes are kept.
        let m = encode()?;
        let _ = cell.set(m.clone());
        Ok(cell.get().cloned().unwrap_or(m))
    }
}

/// `m` as the gRPC frame a watch sends.
fn frame(m: &pb::WatchResponse) -> Result<Bytes, ConfigError> {
    Ok(plinth_runtime::framed::frame(m)?)
}

struct Watcher {
    config: Configuration,
    spec: WatchSpec,
    feed: Arc<Feed>,
    rx: broadcast::Receiver<Arc<Update>>,
    /// Every revision up to this was sent or did not concern the prefix.
    last: i64,
    /// History still to replay, up to this revision.
    replay_to: i64,
    queue: VecDeque<Bytes>,
    progress: Duration,
    /// Fires when the stream may have been quiet for `progress`.
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// When a message last went out.
    last_sent: tokio::time::Instant,
    ended: bool,
}

/// Opens a watch; NOT_FOUND and bad arguments fail here, before any
/// message. Each item is a `WatchResponse` as a gRPC frame.
pub async fn open(
    config: Configuration,
    spec: WatchSpec,
) -> Result<impl Stream<Item = Result<Bytes, Status>> + Send + 'static, ConfigError> {
    // A start past the head (a client's copy of an environment since
    // recreated or restored) is refused rather than waited on in silence.
    let feed = config
        .hub()
        .feed_at_least(&spec.env, spec.from_revision, "from_revision")
        .await?;
    let progress = Duration::from_secs(config.settings().watch_progress_secs);
    let (rx, _) = feed.subscribe(|_| ());
    let mut w = Watcher {
        config,
        feed: feed.clone(),
        rx,
        last: 0,
        replay_to: 0,
        queue: VecDeque::new(),
        progress,
        idle: Box::pin(tokio::time::sleep(progress)),
        last_sent: tokio::time::Instant::now(),
        ended: false,
        spec,
    };
    w.start(w.spec.from_revision)?;
    // Like etcd's `created`: the first message comes at once, so a client
    // (and an HTTP response's headers) need not wait for the first change.
    if w.queue.is_empty() && w.last >= w.replay_to {
        w.queue.push_back(frame(&pb::WatchResponse {
            revision: w.last,
            progress: true,
            ..Default::default()
        })?);
    }
    // Boxed: the stream moves its state into each item's future and back,
    // and a pointer moves cheaper than a watcher (every stream, every item).
    Ok(futures::stream::unfold(Box::new(w), |mut w| async move {
        let item = w.next().await?;
        Some((item, w))
    }))
}

impl Watcher {
    /// (Re)starts after `from` against a fresh subscription.
    fn start(&mut self, from: i64) -> Result<(), ConfigError> {
        let prefix = self.spec.prefix.clone();
        let (rx, (head, compacted, entries)) = self.feed.subscribe(|h| {
            let snapshot = (from == 0 || from < h.compacted).then(|| h.range(&prefix, "", usize::MAX));
            (h.revision, h.compacted, snapshot)
        });
        self.rx = rx;
        match entries {
            Some(entries) => {
                if from != 0 {
                    tracing::info!(env = %self.spec.env, from, compacted, "watch starts with a snapshot: history was compacted");
                }
                self.snapshot(head, entries)?;
                self.last = head;
                self.replay_to = head;
            }
            None => {
                self.last = from;
                self.replay_to = head.max(from);
            }
        }
        Ok(())
    }

    fn snapshot(&mut self, revision: i64, entries: Vec<Arc<Entry>>) -> Result<(), ConfigError> {
        let mut chunks: Vec<Vec<pb::WatchEvent>> = Vec::new();
        let mut current = Vec::new();
        for e in entries {
            let shown = self.config.show(&self.spec.env, e, self.spec.reveal)?;
            current.push(pb::WatchEvent {
                r#type: pb::ChangeType::Put.into(),
                value: Some(key_value(&shown)),
            });
            if current.len() == SNAPSHOT_CHUNK {
                chunks.push(std::mem::take(&mut current));
            }
        }
        chunks.push(current);
        let n = chunks.len();
        for (i, events) in chunks.into_iter().enumerate() {
            self.queue.push_back(frame(&pb::WatchResponse {
                revision,
                events,
                snapshot: true,
                snapshot_complete: i + 1 == n,
                ..Default::default()
            })?);
        }
        Ok(())
    }

    /// Queues the part of `batch` under the prefix (nothing when none is),
    /// encoded once per prefix when `shared` holds the live revision's encodings.
    fn push_batch(&mut self, batch: &Batch, shared: Option<&Encodings>) -> Result<(), ConfigError> {
        if batch.events.iter().any(|e| e.key.starts_with(&self.spec.prefix)) {
            let message = match shared {
                Some(shared) => {
                    shared.get_or_encode(&self.spec.prefix, self.spec.reveal, || self.encode_batch(batch))?
                }
                None => self.encode_batch(batch)?,
            };
            self.queue.push_back(message);
        }
        self.last = batch.revision;
        Ok(())
    }

    /// The message this watch sends for `batch`: the changes under its prefix.
    fn encode_batch(&self, batch: &Batch) -> Result<Bytes, ConfigError> {
        let mut events = Vec::new();
        for e in batch.events.iter().filter(|e| e.key.starts_with(&self.spec.prefix)) {
            events.push(match &e.entry {
                Some(entry) => pb::WatchEvent {
                    r#type: pb::ChangeType::Put.into(),
                    value: Some(key_value(&self.config.show(
                        &self.spec.env,
                        entry.clone(),
                        self.spec.reveal,
                    )?)),
                },
                None => pb::WatchEvent {
                    r#type: pb::ChangeType::Delete.into(),
                    value: Some(deleted(&e.key, batch.revision)),
                },
            });
        }
        frame(&pb::WatchResponse {
            revision: batch.revision,
            events,
            author: batch.author.clone(),
            message: batch.message.clone(),
            ..Default::default()
        })
    }

    async fn next(&mut self) -> Option<Result<Bytes, Status>> {
        if self.ended {
            return None;
        }
        match self.advance().await {
            Ok(m) => {
                self.last_sent = tokio::time::Instant::now();
                Some(Ok(m))
            }
            Err(e) => {
                self.ended = true;
                Some(Err(to_status(&e)))
            }
        }
    }

    async fn advance(&mut self) -> Result<Bytes, ConfigError> {
        loop {
            if let Some(m) = self.queue.pop_front() {
                return Ok(m);
            }
            if self.last < self.replay_to {
                let upto = self.replay_to.min(self.last + REPLAY_CHUNK);
                // Boxed: a history query's future is many KiB, and inline it
                // would size every idle watch stream for the rare replay.
                let replay = Box::pin(self.config.batches(&self.spec.env, self.last, upto));
                let batches = match replay.await {
                    Ok(b) if !b.is_empty() => b,
                    // Compacted since this replica loaded the head: start
                    // over from a snapshot, as a watch from there would.
                    Ok(_) | Err(ConfigError::Compacted { .. }) => {
                        tracing::info!(env = %self.spec.env, from = self.last, "watch replay reached compacted history; sending a snapshot");
                        self.start(0)?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                for b in &batches {
                    self.push_batch(b, None)?;
                }
                continue;
            }
            // One timer per stream, re-armed only when it fires: re-arming on
            // every message would touch the runtime's timer wheel once per
            // delivery, a cost every watcher pays on every revision.
            let received = tokio::select! {
                biased;
                received = self.rx.recv() => Ok(received),
                () = &mut self.idle => Err(()),
            };
            match received {
                Err(()) => {
                    let quiet_until = self.last_sent + self.progress;
                    if quiet_until > tokio::time::Instant::now() {
                        self.idle.as_mut().reset(quiet_until);
                        continue;
                    }
                    self.idle.as_mut().reset(tokio::time::Instant::now() + self.progress);
                    return frame(&pb::WatchResponse {
                        revision: self.last,
                        progress: true,
                        ..Default::default()
                    });
                }
                Ok(Ok(update)) => match update.as_ref() {
                    Update::Batch(b, _) if b.revision <= self.last => {}
                    Update::Batch(b, shared) if b.revision == self.last + 1 => self.push_batch(b, Some(shared))?,
                    Update::Batch(b, _) => {
                        // Not contiguous (cannot happen with one feed; be safe): re-read the gap.
                        self.replay_to = b.revision;
                        let last = self.last;
                        self.start(last)?;
                    }
                    Update::Reset => self.start(0)?,
                    Update::Gone => {
                        return Err(ConfigError::EnvironmentNotFound(self.spec.env.to_string()));
                    }
                },
                Ok(Err(RecvError::Lagged(missed))) => {
                    tracing::debug!(env = %self.spec.env, missed, "watcher fell behind; replaying from history");
                    let last = self.last;
                    self.start(last)?;
                }
                Ok(Err(RecvError::Closed)) => {
                    return Err(ConfigError::EnvironmentNotFound(self.spec.env.to_string()));
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use plinth_runtime::crypto::Keyring;
    use plinth_runtime::testing::TestDatabase;

    use super::*;
    use crate::service::Caller;
    use crate::store::Store;

    /// A configuration on a fresh SQLite file (one key in its keyring),
    /// with environment app/prod.
    pub(crate) async fn configuration() -> (TestDatabase, Configuration, EnvId) {
        let t = TestDatabase::sqlite("config", &crate::MIGRATIONS).await.unwrap();
        let config = Configuration::new(
            Store::new(t.db.clone()),
            Keyring::from_keys(&[("k1", [1; 32])]).unwrap(),
            Default::default(),
            None,
        );
        let caller = Caller {
            subject: "t".into(),
            may_reveal: false,
        };
        let env = EnvId::new("app", "prod");
        config.create_namespace("app", "", &caller).await.unwrap();
        config.create_environment(&env, "", &caller).await.unwrap();
        (t, config, env)
    }

    /// The next message of `stream` that carries changes.
    async fn next_change(
        stream: &mut (impl Stream<Item = Result<Bytes, Status>> + Unpin),
    ) -> (Bytes, pb::WatchResponse) {
        use futures::StreamExt;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
            let bytes = match next {
                Ok(Some(Ok(b))) => b,
                other => panic!("no change arrived: {other:?}"),
            };
            let m = plinth_runtime::framed::unframe::<pb::WatchResponse>(&bytes).unwrap();
            if !m.events.is_empty() {
                return (bytes, m);
            }
        }
    }

    fn keys_and_values(m: &pb::WatchResponse) -> Vec<(String, Option<pb::value::Kind>, bool)> {
        m.events
            .iter()
            .filter_map(|e| e.value.as_ref())
            .map(|kv| {
                (
                    kv.key.clone(),
                    kv.value.as_ref().and_then(|v| v.kind.clone()),
                    kv.redacted,
                )
            })
            .collect()
    }

    /// A live revision is encoded once per kind of watch (prefix, secrets
    /// shown or not) and those bytes are shared; each watch still gets only
    /// the keys under its prefix, secrets in clear only if it asked, and
    /// nothing when none of its keys changed.
    #[tokio::test]
    async fn each_watch_gets_its_own_part_of_a_shared_revision() {
        use crate::model::{Mutation, NewValue, Plain};
        use pb::value::Kind;
        let (t, config, env) = configuration().await;
        let caller = Caller {
            subject: "t".into(),
            may_reveal: true,
        };
        let mut streams = Vec::new();
        for (prefix, reveal) in [
            ("a/", false),
            ("a/", false),
            ("a/", true),
            ("b/", false),
            ("", false),
            ("c/", false),
            ("c/", false),
        ] {
            let spec = WatchSpec {
                env: env.clone(),
                prefix: prefix.into(),
                from_revision: 0,
                reveal,
            };
            streams.push(Box::pin(open(config.clone(), spec).await.unwrap()));
        }
        let set = |key: &str, value: NewValue| Mutation {
            key: key.into(),
            value: Some(value),
            precondition: Default::default(),
        };
        let text = |s: &str| NewValue::Plain(Plain::String(s.into()));
        let first = config
            .write(
                &env,
                vec![
                    set("a/s", NewValue::Secret("hunter2".to_owned().into())),
                    set("a/x", text("1")),
                    set("b/y", text("2")),
                ],
                "one",
                "changes",
                &caller,
            )
            .await
            .unwrap();
        let second = config
            .write(&env, vec![set("c/z", text("3"))], "two", "changes", &caller)
            .await
            .unwrap();
        let third = config
            .write(&env, vec![set("a/x", text("4"))], "three", "changes", &caller)
            .await
            .unwrap();

        let mut got = Vec::new();
        for stream in &mut streams {
            got.push(next_change(stream).await);
        }
        let masked = (Some(Kind::SecretValue(String::new())), true);
        let a = vec![
            ("a/s".to_owned(), masked.0.clone(), masked.1),
            ("a/x".to_owned(), Some(Kind::StringValue("1".into())), false),
        ];
        assert_eq!(keys_and_values(&got[0].1), a);
        assert_eq!(got[0].1.revision, first.revision);
        assert_eq!(got[0].1.message, "one");
        assert_eq!(
            got[0].0.as_ptr(),
            got[1].0.as_ptr(),
            "the same watch's message was encoded twice"
        );
        assert_eq!(
            keys_and_values(&got[2].1),
            vec![
                ("a/s".to_owned(), Some(Kind::SecretValue("hunter2".into())), false),
                ("a/x".to_owned(), Some(Kind::StringValue("1".into())), false),
            ]
        );
        assert_eq!(
            keys_and_values(&got[3].1),
            vec![("b/y".to_owned(), Some(Kind::StringValue("2".into())), false)]
        );
        assert_eq!(got[4].1.events.len(), 3, "the whole environment's watch");
        for c in &got[5..] {
            assert_eq!(
                (c.1.revision, keys_and_values(&c.1)),
                (
                    second.revision,
                    vec![("c/z".to_owned(), Some(Kind::StringValue("3".into())), false)]
                ),
                "a watch none of whose keys changed skips the revision"
            );
        }
        let (_, next) = next_change(&mut streams[0]).await;
        assert_eq!(
            (next.revision, keys_and_values(&next)),
            (
                third.revision,
                vec![("a/x".to_owned(), Some(Kind::StringValue("4".into())), false)]
            ),
            "the a/ watch skips c/'s revision"
        );
        drop(streams);
        t.cleanup().await.unwrap();
    }

    /// A cached read's future is built and moved (copied whole) at every
    /// layer of each `GetValue`; storage reads sized into it (a past
    /// revision's query, loading an environment) made it 5.3 KB, copied
    /// several times per call even though a cached read never runs them.
    #[tokio::test]
    async fn a_cached_read_holds_little_state() {
        let (t, config, env) = configuration().await;
        let read = config.get(&env, "k", &crate::model::ReadAt::Head { min_revision: 0 });
        let size = std::mem::size_of_val(&read);
        assert!(size <= 1024, "a cached read's future is {size} bytes");
        drop(read);
        t.cleanup().await.unwrap();
    }

    /// Every open watch holds its stream's state for as long as it is open,
    /// so ten thousand idle watchers cost ten thousand of these. A future
    /// awaited inside the stream (a history query, say) that is not boxed
    /// is sized into it whether or not it ever runs.
    #[tokio::test]
    async fn an_open_watch_stream_holds_little_state() {
        let (t, config, env) = configuration().await;
        let spec = WatchSpec {
            env,
            prefix: String::new(),
            from_revision: 0,
            reveal: false,
        };
        let stream = open(config, spec).await.unwrap();
        let size = std::mem::size_of_val(&stream);
        assert!(size <= 2048, "a watch stream's state is {size} bytes");
        drop(stream);
        t.cleanup().await.unwrap();
    }
}
