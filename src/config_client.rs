//! A local copy of one environment that keeps itself current: it follows
//! `Watch` from the revision it has, resumes from there after a disconnect
//! (so no change is missed or applied twice), and can start from a file
//! snapshot when the service is unreachable. Reads never leave the process.
//!
//! ```no_run
//! # async fn example(channel: tonic::transport::Channel) -> Result<(), tonic::Status> {
//! use plinth::config::ConfigClient;
//! let (config, follow) = ConfigClient::builder(channel, "payments", "prod")
//!     .bearer("plk_…")
//!     .snapshot_file("/var/cache/payments-prod.cfg")
//!     .start()
//!     .await?;
//! tokio::spawn(follow);
//! let url = config.get("db/url");
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use prost::Message;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::config::v1::config_service_client::ConfigServiceClient;
use crate::config::v1::{
    ChangeType, ConfigSnapshot, GetEnvironmentRequest, KeyValue, Value, WatchRequest, WatchResponse,
};

/// First and longest wait between reconnection attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(10));

/// Where the credential of each call comes from.
type Credential = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// The keys a [`ConfigClient`] holds, at one revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The revision the copy reflects.
    pub revision: i64,
    /// The keys.
    pub values: BTreeMap<String, KeyValue>,
}

struct Inner {
    namespace: String,
    environment: String,
    prefix: String,
    reveal_secrets: bool,
    state: RwLock<Arc<Snapshot>>,
    changed: watch::Sender<i64>,
    file: Option<PathBuf>,
}

impl Inner {
    fn snapshot(&self) -> Arc<Snapshot> {
        match self.state.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn replace(&self, next: Snapshot) {
        let revision = next.revision;
        let next = Arc::new(next);
        match self.state.write() {
            Ok(mut s) => *s = next.clone(),
            Err(p) => *p.into_inner() = next.clone(),
        }
        self.save(&next);
        self.changed.send_replace(revision);
    }

    /// Writes the copy to the snapshot file, atomically (temp file + rename).
    fn save(&self, snapshot: &Snapshot) {
        let Some(path) = &self.file else { return };
        let encoded = ConfigSnapshot {
            namespace: self.namespace.clone(),
            environment: self.environment.clone(),
            prefix: self.prefix.clone(),
            revision: snapshot.revision,
            values: snapshot.values.values().cloned().collect(),
            revealed: self.reveal_secrets,
        }
        .encode_to_vec();
        let tmp = path.with_extension("tmp");
        if write_private(&tmp, &encoded).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }

    fn load(&self) -> Option<Snapshot> {
        let bytes = std::fs::read(self.file.as_ref()?).ok()?;
        let s = ConfigSnapshot::decode(bytes.as_slice()).ok()?;
        // A copy made with other settings (another prefix, secrets revealed
        // or not) is not this client's: start over rather than mix them.
        let ours = s.namespace == self.namespace
            && s.environment == self.environment
            && s.prefix == self.prefix
            && s.revealed == self.reveal_secrets;
        ours.then(|| Snapshot {
            revision: s.revision,
            values: s.values.into_iter().map(|kv| (kv.key.clone(), kv)).collect(),
        })
    }
}

/// Writes `bytes` to a new file only its owner can read: the copy may hold
/// revealed secrets.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(bytes)
}

/// Builds a [`ConfigClient`].
pub struct ConfigClientBuilder {
    channel: Channel,
    namespace: String,
    environment: String,
    prefix: String,
    reveal_secrets: bool,
    credential: Option<Credential>,
    file: Option<PathBuf>,
}

impl ConfigClientBuilder {
    /// Only keys starting with `prefix`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sends `token` (an API key or access token) as the bearer credential.
    pub fn bearer(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.credential = Some(Arc::new(move || Some(token.clone())));
        self
    }

    /// Asks `source` for a credential before every call (for access tokens
    /// that a caller refreshes).
    pub fn bearer_from(mut self, source: impl Fn() -> Option<String> + Send + Sync + 'static) -> Self {
        self.credential = Some(Arc::new(source));
        self
    }

    /// Holds secrets' text (the credential needs `config.secrets.read`).
    pub fn reveal_secrets(mut self, reveal: bool) -> Self {
        self.reveal_secrets = reveal;
        self
    }

    /// Keeps a copy in `path` after every change and starts from it.
    pub fn snapshot_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(path.into());
        self
    }

    /// Loads the snapshot file (if any), then catches up with the service.
    /// Returns the client and the future that keeps it current; run that
    /// future on your runtime (it ends when every clone of the client is
    /// dropped). When the service cannot be reached, it starts from the
    /// snapshot file if there is one, and fails otherwise.
    pub async fn start(self) -> Result<(ConfigClient, impl Future<Output = ()> + Send + 'static), Status> {
        let (changed, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            namespace: self.namespace,
            environment: self.environment,
            prefix: self.prefix,
            reveal_secrets: self.reveal_secrets,
            state: RwLock::new(Arc::new(Snapshot::default())),
            changed,
            file: self.file,
        });
        let loaded = inner.load();
        let from_file = loaded.is_some();
        if let Some(s) = loaded {
            inner.replace(s);
        }
        let mut follower = Follower {
            client: ConfigServiceClient::new(self.channel),
            credential: self.credential,
            inner: Arc::downgrade(&inner),
        };
        match follower.catch_up(&inner).await {
            Ok(stream) => Ok((ConfigClient { inner }, follower.run(Some(stream)))),
            Err(_) if from_file => Ok((ConfigClient { inner }, follower.run(None))),
            Err(e) => Err(e),
        }
    }
}

/// A local, self-updating copy of one environment. Cheap to clone.
#[derive(Clone)]
pub struct ConfigClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ConfigClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigClient")
            .field("namespace", &self.inner.namespace)
            .field("environment", &self.inner.environment)
            .field("revision", &self.revision())
            .finish_non_exhaustive()
    }
}

impl ConfigClient {
    /// A client of `namespace`/`environment` over `channel`.
    pub fn builder(
        channel: Channel,
        namespace: impl Into<String>,
        environment: impl Into<String>,
    ) -> ConfigClientBuilder {
        ConfigClientBuilder {
            channel,
            namespace: namespace.into(),
            environment: environment.into(),
            prefix: String::new(),
            reveal_secrets: false,
            credential: None,
            file: None,
        }
    }

    /// One key, as of [`ConfigClient::revision`].
    pub fn get(&self, key: &str) -> Option<KeyValue> {
        self.inner.snapshot().values.get(key).cloned()
    }

    /// One key's value.
    pub fn value(&self, key: &str) -> Option<Value> {
        self.get(key).and_then(|kv| kv.value)
    }

    /// Every key, consistent at one revision.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot()
    }

    /// The revision the copy reflects.
    pub fn revision(&self) -> i64 {
        self.inner.snapshot().revision
    }

    /// Wakes on every change (the new revision); for reacting to changes.
    pub fn changes(&self) -> watch::Receiver<i64> {
        self.inner.changed.subscribe()
    }
}

struct Follower {
    client: ConfigServiceClient<Channel>,
    credential: Option<Credential>,
    inner: Weak<Inner>,
}

/// A watch that is open and has been read up to the head.
type Stream = tonic::Streaming<WatchResponse>;

impl Follower {
    fn request<T>(&self, message: T) -> Request<T> {
        let mut req = Request::new(message);
        if let Some(token) = self.credential.as_ref().and_then(|c| c())
            && let Ok(v) = format!("Bearer {token}").parse()
        {
            req.metadata_mut().insert("authorization", v);
        }
        req
    }

    /// Opens a watch from the copy's revision and applies what it sends
    /// until the copy reaches the head as it was when the watch opened.
    async fn catch_up(&mut self, inner: &Inner) -> Result<Stream, Status> {
        let env = self
            .client
            .get_environment(self.request(GetEnvironmentRequest {
                namespace: inner.namespace.clone(),
                environment: inner.environment.clone(),
            }))
            .await?
            .into_inner();
        let head = env.environment.map_or(0, |e| e.revision);
        let mut from = inner.snapshot().revision;
        if from > head {
            // The copy is ahead of the service: the environment was recreated
            // or restored. Start over from a snapshot.
            from = 0;
        }
        let mut stream = self
            .client
            .watch(self.request(WatchRequest {
                namespace: inner.namespace.clone(),
                environment: inner.environment.clone(),
                prefix: inner.prefix.clone(),
                from_revision: from,
                reveal_secrets: inner.reveal_secrets,
            }))
            .await?
            .into_inner();
        let mut pending: Option<Snapshot> = None;
        // From 0 the service starts with a snapshot (maybe empty); wait for all of it.
        let mut have_state = from != 0;
        while !have_state || inner.snapshot().revision < head {
            let Some(message) = stream.message().await? else {
                return Err(Status::unavailable("watch ended while catching up"));
            };
            have_state |= message.snapshot_complete;
            apply(inner, &mut pending, message);
        }
        Ok(stream)
    }

    /// Follows changes for as long as a client exists, reconnecting with
    /// backoff and resuming from the copy's revision.
    async fn run(mut self, mut stream: Option<Stream>) {
        let mut delay = BACKOFF.0;
        loop {
            let Some(inner) = self.inner.upgrade() else { return };
            let current = match stream.take() {
                Some(s) => Ok(s),
                None => self.catch_up(&inner).await,
            };
            if let Ok(mut s) = current {
                delay = BACKOFF.0;
                let mut pending = None;
                while let Ok(Some(message)) = s.message().await {
                    apply(&inner, &mut pending, message);
                    if Arc::strong_count(&inner) == 1 {
                        return;
                    }
                }
            }
            drop(inner);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(BACKOFF.1);
        }
    }
}

/// Applies one watch message to the copy. Snapshot parts collect in
/// `pending` and replace the copy when complete.
fn apply(inner: &Inner, pending: &mut Option<Snapshot>, message: WatchResponse) {
    if message.snapshot {
        let part = pending.get_or_insert_with(Snapshot::default);
        part.revision = message.revision;
        for e in message.events {
            if let Some(kv) = e.value {
                part.values.insert(kv.key.clone(), kv);
            }
        }
        if message.snapshot_complete
            && let Some(done) = pending.take()
        {
            inner.replace(done);
        }
        return;
    }
    let current = inner.snapshot();
    if message.revision <= current.revision {
        return;
    }
    if message.events.is_empty() && message.progress {
        // Progress: nothing under the prefix changed; remember how far we are.
        let mut next = (*current).clone();
        next.revision = message.revision;
        match inner.state.write() {
            Ok(mut s) => *s = Arc::new(next),
            Err(p) => *p.into_inner() = Arc::new(next),
        }
        return;
    }
    let mut next = (*current).clone();
    next.revision = message.revision;
    for e in message.events {
        let Some(kv) = e.value else { continue };
        if e.r#type == i32::from(ChangeType::Delete) {
            next.values.remove(&kv.key);
        } else {
            next.values.insert(kv.key.clone(), kv);
        }
    }
    inner.replace(next);
}
