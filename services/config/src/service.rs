//! The config domain: validates writes (names, sizes, schemas), seals
//! secrets, commits through the store, keeps this replica's feeds current,
//! and answers reads from the in-memory head when it can.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use plinth_runtime::storage::group_commit::GroupCommit;
use prost::Message;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use plinth::config::v1 as pb;
use plinth_runtime::config::ConfigSettings;
use plinth_runtime::events::SharedBus;
use plinth_runtime::events::outbox::{OutboxEvent, Relay};

use crate::convert::timestamp;
use crate::error::ConfigError;
use crate::feed::Hub;
use crate::formats::{self, Format};
use crate::model::{
    Batch, ClientIdentity, Entry, EnvId, Environment, Mutation, Namespace, NewValue, Plain, ReadAt, Release,
    RevisionInfo, RevisionKind, Rollout, RolloutState, Stored, check_key, check_text, now_ms,
};
use crate::schema::Schemas;
use crate::store::{Committed, SealedTable, Store, Write, WriteRequest};
use plinth_runtime::crypto::Keyring;

/// Updates a feed buffers for a slow watcher before it must re-read history.
const FEED_CAPACITY: usize = 1024;
/// Largest import document.
pub const MAX_DOCUMENT_BYTES: usize = 4 * 1024 * 1024;
/// Sealed rows re-wrapped per round of a rotation.
const REWRAP_BATCH: i64 = 500;

/// Who is calling, as the domain needs it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// User or service account id (recorded as author).
    pub subject: String,
    /// Whether the caller holds `config.secrets.read`.
    pub may_reveal: bool,
}

/// A key as answered: secrets opened only when revealed.
#[derive(Debug, Clone)]
pub struct Shown {
    /// The stored key.
    pub entry: Arc<Entry>,
    /// A revealed secret's text.
    pub secret: Option<String>,
}

/// Most writes committed together in one transaction.
const MAX_GROUP_WRITES: usize = 2000;

/// Writes of one environment, grouped into shared transactions.
type Lanes = GroupCommit<EnvId, WriteRequest, Committed, ConfigError>;

/// The precondition that a key is still as read: that version, or absent.
fn as_read(entry: Option<&Entry>) -> crate::model::Precondition {
    match entry {
        Some(e) => crate::model::Precondition {
            expected_etag: e.etag(),
            ..Default::default()
        },
        None => crate::model::Precondition {
            must_not_exist: true,
            ..Default::default()
        },
    }
}

/// `concrete` leaves no client read behind; reaching one is a bug.
fn unresolved() -> ConfigError {
    ConfigError::Storage(plinth_runtime::storage::StorageError::Query(sqlx::Error::Protocol(
        "a client read was not resolved to a release".into(),
    )))
}

/// The config service's domain.
#[derive(Clone)]
pub struct Configuration {
    store: Store,
    hub: Arc<Hub>,
    keyring: Arc<Keyring>,
    schemas: Arc<Schemas>,
    settings: ConfigSettings,
    relay: Option<Relay>,
    lanes: Arc<Lanes>,
}

impl Configuration {
    /// The domain over `store`, sealing secrets with `keyring`; `relay` is
    /// woken after each commit so events leave at once.
    pub fn new(store: Store, keyring: Keyring, settings: ConfigSettings, relay: Option<Relay>) -> Self {
        Self {
            hub: Arc::new(Hub::new(store.clone(), FEED_CAPACITY)),
            store,
            keyring: Arc::new(keyring),
            schemas: Arc::new(Schemas::default()),
            settings,
            relay,
            lanes: Arc::new(Lanes::new(
                "config-group-commit",
                MAX_GROUP_WRITES,
                plinth_runtime::Tasks::new(),
            )),
        }
    }

    /// Runs group commits on `tasks`, so shutdown waits for them.
    pub fn with_tasks(mut self, tasks: plinth_runtime::Tasks) -> Self {
        self.lanes = Arc::new(Lanes::new("config-group-commit", MAX_GROUP_WRITES, tasks));
        self
    }

    /// The feeds of this replica.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The settings.
    pub fn settings(&self) -> &ConfigSettings {
        &self.settings
    }

    fn wake(&self) {
        if let Some(r) = &self.relay {
            r.wake();
        }
    }

    fn admin_event(subject: &str, namespace: &str, environment: &str, detail: &str, who: &str) -> OutboxEvent {
        OutboxEvent::new(
            format!("plinth.config.{subject}"),
            format!("{namespace}/{environment}"),
            &pb::ConfigAdminEvent {
                namespace: namespace.to_owned(),
                environment: environment.to_owned(),
                detail: detail.to_owned(),
                subject: who.to_owned(),
                time: Some(timestamp(now_ms())),
            },
        )
    }

    // ---- namespaces and environments --------------------------------------

    /// Creates a namespace.
    pub async fn create_namespace(
        &self,
        name: &str,
        description: &str,
        caller: &Caller,
    ) -> Result<Namespace, ConfigError> {
        let ev = Self::admin_event("namespace_changed", name, "", "created", &caller.subject);
        let ns = self.store.create_namespace(name, description, &ev).await?;
        self.wake();
        Ok(ns)
    }

    /// One namespace.
    pub async fn namespace(&self, name: &str) -> Result<Namespace, ConfigError> {
        self.store.get_namespace(name).await
    }

    /// Namespaces after `after`.
    pub async fn namespaces(&self, after: &str, limit: i64) -> Result<Vec<Namespace>, ConfigError> {
        self.store.list_namespaces(after, limit).await
    }

    /// Updates a namespace's description.
    pub async fn update_namespace(
        &self,
        name: &str,
        description: &str,
        expected: i64,
        caller: &Caller,
    ) -> Result<Namespace, ConfigError> {
        let ev = Self::admin_event("namespace_changed", name, "", "updated", &caller.subject);
        let ns = self.store.update_namespace(name, description, expected, &ev).await?;
        self.wake();
        Ok(ns)
    }

    /// Deletes a namespace.
    pub async fn delete_namespace(
        &self,
        name: &str,
        force: bool,
        expected: i64,
        caller: &Caller,
    ) -> Result<(), ConfigError> {
        let ev = Self::admin_event("namespace_changed", name, "", "deleted", &caller.subject);
        self.store.delete_namespace(name, force, expected, &ev).await?;
        self.hub.forget_namespace(name);
        self.wake();
        Ok(())
    }

    /// Creates an environment.
    pub async fn create_environment(
        &self,
        env: &EnvId,
        description: &str,
        caller: &Caller,
    ) -> Result<Environment, ConfigError> {
        let ev = Self::admin_event(
            "environment_changed",
            &env.namespace,
            &env.environment,
            "created",
            &caller.subject,
        );
        let e = self.store.create_environment(env, description, &ev).await?;
        self.wake();
        Ok(e)
    }

    /// One environment.
    pub async fn environment(&self, env: &EnvId) -> Result<Environment, ConfigError> {
        self.store.get_environment(env).await
    }

    /// A namespace's environments after `after`.
    pub async fn environments(
        &self,
        namespace: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Environment>, ConfigError> {
        self.store.list_environments(namespace, after, limit).await
    }

    /// Updates an environment's description.
    pub async fn update_environment(
        &self,
        env: &EnvId,
        description: &str,
        expected: i64,
        caller: &Caller,
    ) -> Result<Environment, ConfigError> {
        let ev = Self::admin_event(
            "environment_changed",
            &env.namespace,
            &env.environment,
            "updated",
            &caller.subject,
        );
        let e = self.store.update_environment(env, description, expected, &ev).await?;
        self.wake();
        Ok(e)
    }

    /// Deletes an environment.
    pub async fn delete_environment(&self, env: &EnvId, expected: i64, caller: &Caller) -> Result<(), ConfigError> {
        let ev = Self::admin_event(
            "environment_changed",
            &env.namespace,
            &env.environment,
            "deleted",
            &caller.subject,
        );
        self.store.delete_environment(env, expected, &ev).await?;
        self.hub.forget(env);
        self.wake();
        Ok(())
    }

    // ---- reads ------------------------------------------------------------

    /// Opens a secret or leaves it masked.
    pub fn show(&self, env: &EnvId, entry: Arc<Entry>, reveal: bool) -> Result<Shown, ConfigError> {
        let secret = match (&entry.value, reveal) {
            (Stored::Secret(sealed), true) => {
                let context = format!("{env}/{}", entry.key);
                let bytes = self
                    .keyring
                    .open(sealed, &context)
                    .map_err(|reason| ConfigError::Decrypt {
                        key: entry.key.clone(),
                        reason,
                    })?;
                Some(String::from_utf8_lossy(&bytes).into_owned())
            }
            _ => None,
        };
        Ok(Shown { entry, secret })
    }

    /// Records that `caller` read secrets in clear.
    pub async fn record_reveal(
        &self,
        env: &EnvId,
        keys: Vec<String>,
        method: &str,
        caller: &Caller,
    ) -> Result<(), ConfigError> {
        let ev = OutboxEvent::new(
            "plinth.config.secret_revealed",
            env.to_string(),
            &pb::SecretRevealedEvent {
                namespace: env.namespace.clone(),
                environment: env.environment.clone(),
                keys,
                subject: caller.subject.clone(),
                method: method.to_owned(),
                time: Some(timestamp(now_ms())),
            },
        );
        self.store.emit(&ev).await?;
        self.wake();
        Ok(())
    }

    /// Refuses a reveal the caller may not make.
    pub fn check_reveal(reveal: bool, caller: &Caller) -> Result<(), ConfigError> {
        if reveal && !caller.may_reveal {
            return Err(ConfigError::RevealDenied);
        }
        Ok(())
    }

    /// Keys under `prefix` after `after` at `at`, and the revision read.
    pub async fn list(
        &self,
        env: &EnvId,
        at: &ReadAt,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<Arc<Entry>>, i64), ConfigError> {
        let lim = i64::try_from(limit).unwrap_or(i64::MAX);
        match &self.concrete(env, at).await? {
            ReadAt::Head { min_revision } => {
                let feed = self
                    .hub
                    .feed_at_least(env, *min_revision, "read_at.min_revision")
                    .await?;
                Ok(feed.read(|h| (h.range(prefix, after, limit), h.revision)))
            }
            ReadAt::Revision(rev) => {
                let head = self.readable_revision(env, *rev, "read_at.revision").await?;
                let entries = self.store.state_at(env, *rev, prefix, after, lim).await?;
                Ok((entries.into_iter().map(Arc::new).collect(), head))
            }
            ReadAt::Release(name) => {
                let release = self.store.get_release(env, name).await?;
                let entries = self
                    .store
                    .release_values(env, &release.name, prefix, after, lim)
                    .await?;
                Ok((entries.into_iter().map(Arc::new).collect(), release.revision))
            }
            ReadAt::Client(_) => Err(unresolved()),
        }
    }

    /// Checks that `revision` can be read; returns it.
    async fn readable_revision(&self, env: &EnvId, revision: i64, field: &'static str) -> Result<i64, ConfigError> {
        let e = self.store.get_environment(env).await?;
        if revision > e.revision {
            return Err(ConfigError::FutureRevision {
                field,
                revision,
                head: e.revision,
            });
        }
        if revision < e.compacted_revision {
            return Err(ConfigError::Compacted {
                revision,
                compacted: e.compacted_revision,
            });
        }
        Ok(revision)
    }

    /// One key at `at`, and the revision read.
    pub async fn get(&self, env: &EnvId, key: &str, at: &ReadAt) -> Result<(Arc<Entry>, i64), ConfigError> {
        let (found, revision) = match at {
            ReadAt::Head { min_revision } => self.head_entry(env, key, *min_revision).await?,
            // Boxed: these read storage, and unboxed their futures would be
            // sized into every cached read's (copied with it at each move).
            other => Box::pin(self.stored_entry(env, key, other)).await?,
        };
        found
            .map(|e| (e, revision))
            .ok_or_else(|| ConfigError::KeyNotFound(key.to_owned()))
    }

    /// One key of the head (cached), and the head's revision.
    async fn head_entry(
        &self,
        env: &EnvId,
        key: &str,
        min_revision: i64,
    ) -> Result<(Option<Arc<Entry>>, i64), ConfigError> {
        let feed = self
            .hub
            .feed_at_least(env, min_revision, "read_at.min_revision")
            .await?;
        Ok(feed.read(|h| (h.entries.get(key).cloned(), h.revision)))
    }

    /// One key at a past revision, a release or a client's release.
    async fn stored_entry(
        &self,
        env: &EnvId,
        key: &str,
        at: &ReadAt,
    ) -> Result<(Option<Arc<Entry>>, i64), ConfigError> {
        Ok(match &self.concrete(env, at).await? {
            ReadAt::Head { min_revision } => self.head_entry(env, key, *min_revision).await?,
            ReadAt::Revision(rev) => {
                self.readable_revision(env, *rev, "read_at.revision").await?;
                (self.store.get_at(env, key, *rev).await?.map(Arc::new), *rev)
            }
            ReadAt::Release(name) => {
                let release = self.store.get_release(env, name).await?;
                let found = self.store.release_values(env, &release.name, key, "", 1).await?;
                (found.into_iter().find(|e| e.key == key).map(Arc::new), release.revision)
            }
            ReadAt::Client(_) => return Err(unresolved()),
        })
    }

    // ---- writes -----------------------------------------------------------

    async fn active_kek(&self) -> Result<String, ConfigError> {
        if let Some(id) = self.store.active_kek().await? {
            return Ok(id);
        }
        let Some(default) = self.keyring.default_id() else {
            return Err(ConfigError::NoEncryptionKey(
                "no key encryption key is configured for secrets: set PLINTH_CONFIG__KEYS or PLINTH_CONFIG__KEYS_FILE"
                    .into(),
            ));
        };
        self.store.set_active_kek(default, true).await
    }

    /// Validates and seals mutations into storage writes.
    async fn prepare(&self, env: &EnvId, mutations: Vec<Mutation>, field: &str) -> Result<Vec<Write>, ConfigError> {
        let schemas: Vec<(String, String)> = self
            .store
            .schemas(&env.namespace)
            .await?
            .into_iter()
            .map(|(p, s, _, _)| (p, s))
            .collect();
        let needs_key = mutations.iter().any(|m| matches!(m.value, Some(NewValue::Secret(_))));
        let kek = if needs_key {
            Some(self.active_kek().await?)
        } else {
            None
        };
        let mut writes = Vec::with_capacity(mutations.len());
        let mut seen = std::collections::HashSet::with_capacity(mutations.len());
        for m in &mutations {
            if !seen.insert(m.key.as_str()) {
                let f = if field.is_empty() { "content" } else { field };
                return Err(ConfigError::invalid(
                    f,
                    format!("key {:?} appears more than once", m.key),
                ));
            }
        }
        for (i, m) in mutations.into_iter().enumerate() {
            let at = |sub: &str| {
                if field.is_empty() {
                    sub.to_owned()
                } else {
                    format!("{field}[{i}].{sub}")
                }
            };
            check_key(&at("key"), &m.key)?;
            let value = match m.value {
                None => None,
                Some(v) => {
                    let (json, size) = match &v {
                        NewValue::Plain(p) => {
                            let json = p.to_json();
                            let size = match p {
                                Plain::String(s) => s.len(),
                                _ => json.to_string().len(),
                            };
                            (json, size)
                        }
                        NewValue::Secret(s) => (
                            serde_json::Value::String(s.expose_secret().to_owned()),
                            s.expose_secret().len(),
                        ),
                    };
                    if size > self.settings.max_value_bytes {
                        return Err(ConfigError::invalid(
                            at("value"),
                            format!(
                                "is {size} bytes, more than the limit of {}",
                                self.settings.max_value_bytes
                            ),
                        ));
                    }
                    let secret = matches!(v, NewValue::Secret(_));
                    if let Err(reason) = self.schemas.check(&schemas, &m.key, &json, secret) {
                        return Err(ConfigError::invalid(
                            at("value"),
                            format!("key {:?} violates its schema: {reason}", m.key),
                        ));
                    }
                    Some(match v {
                        NewValue::Plain(p) => Stored::Plain(p),
                        NewValue::Secret(s) => {
                            let kek = kek.as_deref().unwrap_or_default();
                            let context = format!("{env}/{}", m.key);
                            let sealed = self
                                .keyring
                                .seal(kek, s.expose_secret().as_bytes(), &context)
                                .map_err(ConfigError::NoEncryptionKey)?;
                            Stored::Secret(sealed)
                        }
                    })
                }
            };
            writes.push(Write {
                key: m.key,
                value,
                precondition: m.precondition,
            });
        }
        Ok(writes)
    }

    async fn commit(
        &self,
        env: &EnvId,
        writes: Vec<Write>,
        message: &str,
        kind: RevisionKind,
        caller: &Caller,
    ) -> Result<Committed, ConfigError> {
        check_text("message", message)?;
        let request = WriteRequest {
            author: caller.subject.clone(),
            message: message.to_owned(),
            kind,
            writes,
        };
        // Group commit: writers of one environment queue up; whoever holds
        // the lane's lead commits everything queued in one transaction. A
        // lone writer leads at once, so nobody waits for company.
        let weight = request.writes.len();
        let this = self.clone();
        self.lanes
            .submit(env, request, weight, move |env, group| async move {
                this.commit_group(&env, group).await
            })
            .await
    }

    /// Commits `requests` in one transaction; one answer each, in order.
    async fn commit_group(&self, env: &EnvId, requests: Vec<WriteRequest>) -> Vec<Result<Committed, ConfigError>> {
        let result = self
            .store
            .commit_group(
                env,
                &requests,
                &|sealed, kek| self.keyring.rewrap(sealed, kek),
                |request, revision, keys| {
                    OutboxEvent::new(
                        "plinth.config.changed",
                        env.to_string(),
                        &pb::ConfigChangedEvent {
                            namespace: env.namespace.clone(),
                            environment: env.environment.clone(),
                            revision,
                            keys: keys.to_vec(),
                            author: request.author.clone(),
                            message: request.message.clone(),
                            kind: request.kind.as_str().to_owned(),
                            time: Some(timestamp(now_ms())),
                        },
                    )
                },
            )
            .await;
        match result {
            Ok(outcomes) => {
                let mut any = false;
                for batch in outcomes.iter().flatten().filter_map(|c| c.batch.as_ref()) {
                    any = true;
                    // Before answering: a writer reading right after its write sees it here.
                    self.hub.committed(env, batch).await;
                }
                if any {
                    self.wake();
                }
                outcomes
            }
            Err(e) => {
                use plinth_runtime::error::{ErrorCode, ServiceError};
                if matches!(e.code(), ErrorCode::Internal | ErrorCode::Unavailable) {
                    tracing::error!(env = %env, writes = requests.len(), error = %plinth_runtime::error::chain(&e), "group commit failed");
                }
                requests.iter().map(|_| Err(e.replicate())).collect()
            }
        }
    }

    /// Applies mutations as one revision (`field` names them in errors).
    pub async fn write(
        &self,
        env: &EnvId,
        mutations: Vec<Mutation>,
        message: &str,
        field: &str,
        caller: &Caller,
    ) -> Result<Committed, ConfigError> {
        let writes = self.prepare(env, mutations, field).await?;
        self.commit(env, writes, message, RevisionKind::Write, caller).await
    }

    /// The environment's revisions before `before`.
    pub async fn revisions(&self, env: &EnvId, before: i64, limit: i64) -> Result<Vec<RevisionInfo>, ConfigError> {
        self.store.get_environment(env).await?;
        self.store.list_revisions(env, before, limit).await
    }

    /// One key's changes before `before`.
    pub async fn history(
        &self,
        env: &EnvId,
        key: &str,
        before: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String, Option<Entry>)>, ConfigError> {
        self.store.get_environment(env).await?;
        self.store.key_history(env, key, before, limit).await
    }

    async fn all_at(&self, env: &EnvId, revision: i64, prefix: &str) -> Result<Vec<Entry>, ConfigError> {
        let mut out: Vec<Entry> = Vec::new();
        loop {
            let after = out.last().map(|e| e.key.clone()).unwrap_or_default();
            let page = self.store.state_at(env, revision, prefix, &after, 1000).await?;
            let done = page.len() < 1000;
            out.extend(page);
            if done {
                break;
            }
        }
        // A compaction past `revision` while paging may have removed rows
        // the pages needed; then the answer cannot be trusted.
        let compacted = self.store.get_environment(env).await?.compacted_revision;
        if revision < compacted {
            return Err(ConfigError::Compacted { revision, compacted });
        }
        Ok(out)
    }

    /// The keys that differ between two revisions: (key, before, after).
    pub async fn diff(
        &self,
        env: &EnvId,
        from: i64,
        to: i64,
        prefix: &str,
    ) -> Result<(Vec<(String, Option<Entry>, Option<Entry>)>, i64), ConfigError> {
        let head = self.store.get_environment(env).await?.revision;
        let to = if to == 0 { head } else { to };
        self.readable_revision(env, from, "from_revision").await?;
        self.readable_revision(env, to, "to_revision").await?;
        let a = self.all_at(env, from, prefix).await?;
        let b = self.all_at(env, to, prefix).await?;
        let mut out = Vec::new();
        let mut ia = a.into_iter().peekable();
        let mut ib = b.into_iter().peekable();
        loop {
            match (ia.peek(), ib.peek()) {
                (None, None) => break,
                (Some(x), Some(y)) if x.key == y.key => {
                    let (x, y) = (ia.next(), ib.next());
                    if let (Some(x), Some(y)) = (x, y)
                        && x.mod_revision != y.mod_revision
                    {
                        out.push((x.key.clone(), Some(x), Some(y)));
                    }
                }
                (Some(x), Some(y)) if x.key < y.key => {
                    if let Some(x) = ia.next() {
                        out.push((x.key.clone(), Some(x), None));
                    }
                }
                (Some(_), None) => {
                    if let Some(x) = ia.next() {
                        out.push((x.key.clone(), Some(x), None));
                    }
                }
                (_, Some(_)) => {
                    if let Some(y) = ib.next() {
                        out.push((y.key.clone(), None, Some(y)));
                    }
                }
            }
        }
        Ok((out, to))
    }

    /// Restores `to_revision`'s state as a new revision.
    pub async fn rollback(
        &self,
        env: &EnvId,
        to_revision: i64,
        message: &str,
        caller: &Caller,
    ) -> Result<Committed, ConfigError> {
        let (changes, head) = self.diff(env, to_revision, 0, "").await?;
        // Each key must still be as the diff saw it at the head; a write that
        // lands in between makes the rollback refuse (ABORTED) rather than
        // restore a state that never was.
        let writes: Vec<Write> = changes
            .into_iter()
            .map(|(key, target, current)| Write {
                key,
                value: target.map(|e| e.value),
                precondition: as_read(current.as_ref()),
            })
            .collect();
        if writes.is_empty() {
            return Ok(Committed {
                batch: None,
                revision: head,
            });
        }
        let message = if message.is_empty() {
            format!("rollback to revision {to_revision}")
        } else {
            message.to_owned()
        };
        self.commit(env, writes, &message, RevisionKind::Rollback, caller).await
    }

    // ---- releases ---------------------------------------------------------

    /// Freezes the state at `revision` (0: head) as a release.
    pub async fn create_release(
        &self,
        env: &EnvId,
        name: &str,
        revision: i64,
        description: &str,
        caller: &Caller,
    ) -> Result<Release, ConfigError> {
        let head = self.store.get_environment(env).await?.revision;
        let revision = if revision == 0 { head } else { revision };
        self.readable_revision(env, revision, "release.revision").await?;
        let entries = self.all_at(env, revision, "").await?;
        let release = Release {
            name: name.to_owned(),
            revision,
            description: description.to_owned(),
            created_by: caller.subject.clone(),
            created_at: now_ms(),
            key_count: i64::try_from(entries.len()).unwrap_or(i64::MAX),
        };
        let ev = Self::admin_event(
            "release_created",
            &env.namespace,
            &env.environment,
            name,
            &caller.subject,
        );
        self.store.create_release(env, &release, &entries, &ev).await?;
        self.wake();
        Ok(release)
    }

    /// One release (`latest`: the newest).
    pub async fn release(&self, env: &EnvId, name: &str) -> Result<Release, ConfigError> {
        self.store.get_release(env, name).await
    }

    /// Releases before the cursor, newest first.
    pub async fn releases(
        &self,
        env: &EnvId,
        before: Option<(i64, String)>,
        limit: i64,
    ) -> Result<Vec<Release>, ConfigError> {
        self.store.list_releases(env, before, limit).await
    }

    // ---- rollouts ---------------------------------------------------------

    /// Which release `client` reads now: (release, or `None` for the head;
    /// whether through a rollout).
    pub async fn resolve(&self, env: &EnvId, client: &ClientIdentity) -> Result<(Option<String>, bool), ConfigError> {
        let environment = self.store.get_environment(env).await?;
        if let Some(r) = self.store.get_rollout(env).await?
            && r.state.routes()
            && r.includes(env, client)
        {
            return Ok((Some(r.release), true));
        }
        let current = environment.current_release;
        Ok(((!current.is_empty()).then_some(current), false))
    }

    /// `at` with a client's read turned into the release or head it means.
    pub async fn concrete(&self, env: &EnvId, at: &ReadAt) -> Result<ReadAt, ConfigError> {
        Ok(match at {
            ReadAt::Client(client) => match self.resolve(env, client).await?.0 {
                Some(release) => ReadAt::Release(release),
                None => ReadAt::Head { min_revision: 0 },
            },
            other => other.clone(),
        })
    }

    /// The environment's last rollout and its current release.
    pub async fn rollout(&self, env: &EnvId) -> Result<(Option<Rollout>, String), ConfigError> {
        let environment = self.store.get_environment(env).await?;
        Ok((self.store.get_rollout(env).await?, environment.current_release))
    }

    async fn save_rollout(
        &self,
        env: &EnvId,
        from: &[Option<RolloutState>],
        next: &Rollout,
        current_release: Option<&str>,
        caller: &Caller,
    ) -> Result<(), ConfigError> {
        let detail = format!("{} {} {}%", next.state.as_str(), next.release, next.percentage);
        let ev = Self::admin_event(
            "rollout_changed",
            &env.namespace,
            &env.environment,
            &detail,
            &caller.subject,
        );
        self.store.put_rollout(env, from, next, current_release, &ev).await?;
        self.wake();
        Ok(())
    }

    /// Starts rolling `release` out; at 100 percent it completes at once.
    pub async fn start_rollout(
        &self,
        env: &EnvId,
        release: &str,
        percentage: i32,
        labels: std::collections::BTreeMap<String, String>,
        caller: &Caller,
    ) -> Result<Rollout, ConfigError> {
        let target = self.store.get_release(env, release).await?;
        let environment = self.store.get_environment(env).await?;
        // Those outside the rollout keep what they read: the current release,
        // or, before any rollout, the newest other release (the head if none).
        let previous = if environment.current_release.is_empty() {
            self.store
                .list_releases(env, None, 2)
                .await?
                .into_iter()
                .find(|r| r.name != target.name)
                .map(|r| r.name)
                .unwrap_or_default()
        } else {
            environment.current_release
        };
        if previous == target.name {
            return Err(ConfigError::RolloutState(format!(
                "release {:?} is already the current release",
                target.name
            )));
        }
        let now = now_ms();
        let complete = percentage >= 100;
        let next = Rollout {
            release: target.name.clone(),
            previous_release: previous.clone(),
            percentage,
            labels,
            state: if complete {
                RolloutState::Completed
            } else {
                RolloutState::Active
            },
            updated_by: caller.subject.clone(),
            created_at: now,
            updated_at: now,
        };
        let current = if complete {
            target.name.as_str()
        } else {
            previous.as_str()
        };
        let from = [None, Some(RolloutState::Completed), Some(RolloutState::Aborted)];
        self.save_rollout(env, &from, &next, Some(current), caller).await?;
        Ok(next)
    }

    async fn current_rollout(&self, env: &EnvId) -> Result<Rollout, ConfigError> {
        self.store
            .get_rollout(env)
            .await?
            .ok_or_else(|| ConfigError::RolloutState("the environment has no rollout".into()))
    }

    /// Widens an active rollout; at 100 percent it completes.
    pub async fn promote_rollout(
        &self,
        env: &EnvId,
        percentage: i32,
        labels: Option<std::collections::BTreeMap<String, String>>,
        caller: &Caller,
    ) -> Result<Rollout, ConfigError> {
        let mut r = self.current_rollout(env).await?;
        if r.state != RolloutState::Active {
            return Err(ConfigError::RolloutState(format!(
                "the rollout is {}; only an active rollout can be promoted",
                r.state.as_str()
            )));
        }
        if percentage < r.percentage {
            return Err(ConfigError::invalid(
                "percentage",
                format!(
                    "must not be lower than the rollout's {} (abort to go back)",
                    r.percentage
                ),
            ));
        }
        r.percentage = percentage;
        if let Some(labels) = labels {
            r.labels = labels;
        }
        r.updated_by = caller.subject.clone();
        r.updated_at = now_ms();
        let complete = percentage >= 100;
        if complete {
            r.state = RolloutState::Completed;
        }
        let release = r.release.clone();
        self.save_rollout(
            env,
            &[Some(RolloutState::Active)],
            &r,
            complete.then_some(release.as_str()),
            caller,
        )
        .await?;
        Ok(r)
    }

    /// Moves the rollout from one of `from` to `to`.
    pub async fn set_rollout_state(
        &self,
        env: &EnvId,
        from: &[RolloutState],
        to: RolloutState,
        caller: &Caller,
    ) -> Result<Rollout, ConfigError> {
        let mut r = self.current_rollout(env).await?;
        if !from.contains(&r.state) {
            return Err(ConfigError::RolloutState(format!(
                "the rollout is {}; it cannot become {}",
                r.state.as_str(),
                to.as_str()
            )));
        }
        r.state = to;
        r.updated_by = caller.subject.clone();
        r.updated_at = now_ms();
        let from: Vec<Option<RolloutState>> = from.iter().copied().map(Some).collect();
        // An abort puts everyone back on the previous release.
        let previous = r.previous_release.clone();
        let current = (to == RolloutState::Aborted).then_some(previous.as_str());
        self.save_rollout(env, &from, &r, current, caller).await?;
        Ok(r)
    }

    // ---- schemas ----------------------------------------------------------

    /// Attaches a schema to a prefix of a namespace.
    pub async fn set_schema(
        &self,
        namespace: &str,
        prefix: &str,
        schema: &str,
        caller: &Caller,
    ) -> Result<i64, ConfigError> {
        self.schemas
            .compile(schema)
            .map_err(|e| ConfigError::invalid("schema.json_schema", format!("is not a usable JSON Schema: {e}")))?;
        let ev = Self::admin_event("schema_changed", namespace, "", prefix, &caller.subject);
        let at = self
            .store
            .set_schema(namespace, prefix, schema, &caller.subject, &ev)
            .await?;
        self.wake();
        Ok(at)
    }

    /// A namespace's schemas.
    pub async fn schemas(&self, namespace: &str) -> Result<Vec<(String, String, String, i64)>, ConfigError> {
        self.store.get_namespace(namespace).await?;
        self.store.schemas(namespace).await
    }

    /// Removes a schema.
    pub async fn delete_schema(&self, namespace: &str, prefix: &str, caller: &Caller) -> Result<(), ConfigError> {
        self.store.get_namespace(namespace).await?;
        let ev = Self::admin_event("schema_changed", namespace, "", prefix, &caller.subject);
        self.store.delete_schema(namespace, prefix, &ev).await?;
        self.wake();
        Ok(())
    }

    // ---- documents --------------------------------------------------------

    /// Imports a document as one revision.
    #[expect(clippy::too_many_arguments, reason = "the request's fields, passed through")]
    pub async fn import(
        &self,
        env: &EnvId,
        format: Format,
        content: &str,
        replace: bool,
        as_secrets: bool,
        message: &str,
        caller: &Caller,
    ) -> Result<Committed, ConfigError> {
        if content.len() > MAX_DOCUMENT_BYTES {
            return Err(ConfigError::invalid("content", "is larger than 4 MiB"));
        }
        let pairs = formats::parse(format, content).map_err(|e| ConfigError::invalid("content", e))?;
        if pairs.len() > 10 * crate::model::MAX_CHANGES {
            return Err(ConfigError::invalid("content", "holds more than 10000 keys"));
        }
        let mut mutations: Vec<Mutation> = Vec::with_capacity(pairs.len());
        for (key, value) in pairs {
            check_key("content", &key).map_err(|_| {
                ConfigError::invalid(
                    "content",
                    format!("{key:?} is not a valid key (segments of letters, digits, '_', '.', '-' separated by '/')"),
                )
            })?;
            let value = if as_secrets {
                let text = match value {
                    Plain::String(s) => s,
                    other => other.to_json().to_string(),
                };
                NewValue::Secret(text.into())
            } else {
                NewValue::Plain(value)
            };
            mutations.push(Mutation {
                key,
                value: Some(value),
                precondition: Default::default(),
            });
        }
        // The head as the database has it now, not as this replica last heard.
        let head = self.store.get_environment(env).await?.revision;
        let feed = self.hub.feed_at_least(env, head, "content").await?;
        let current: Vec<Arc<Entry>> = feed.read(|h| h.entries.values().cloned().collect());
        // Only what differs is written; a re-import of the same document writes nothing.
        mutations.retain(|m| match (&m.value, current.iter().find(|e| e.key == m.key)) {
            (Some(NewValue::Plain(p)), Some(e)) => e.value != Stored::Plain(p.clone()),
            _ => true,
        });
        if replace {
            let keep: std::collections::HashSet<String> = formats::parse(format, content)
                .map_err(|e| ConfigError::invalid("content", e))?
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            for e in &current {
                if !keep.contains(&e.key) {
                    mutations.push(Mutation {
                        key: e.key.clone(),
                        value: None,
                        precondition: Default::default(),
                    });
                }
            }
        }
        if mutations.is_empty() {
            return Ok(Committed {
                batch: None,
                revision: feed.revision(),
            });
        }
        // Decided from that head: refuse (ABORTED) if a key moved since.
        for m in &mut mutations {
            m.precondition = as_read(current.iter().find(|e| e.key == m.key).map(|e| e.as_ref()));
        }
        let writes = self.prepare(env, mutations, "").await?;
        self.commit(env, writes, message, RevisionKind::Import, caller).await
    }

    /// Exports `entries` as a document: (document, omitted secrets).
    pub fn export(
        &self,
        env: &EnvId,
        format: Format,
        entries: Vec<Arc<Entry>>,
        reveal: bool,
    ) -> Result<(String, Vec<String>), ConfigError> {
        let mut pairs = Vec::with_capacity(entries.len());
        let mut omitted = Vec::new();
        for e in entries {
            let shown = self.show(env, e, reveal)?;
            match (&shown.entry.value, shown.secret) {
                (Stored::Plain(p), _) => pairs.push((shown.entry.key.clone(), p.clone())),
                (Stored::Secret(_), Some(text)) => pairs.push((shown.entry.key.clone(), Plain::String(text))),
                (Stored::Secret(_), None) => omitted.push(shown.entry.key.clone()),
            }
        }
        let doc = formats::render(format, &pairs).map_err(|e| ConfigError::invalid("format", e))?;
        Ok((doc, omitted))
    }

    // ---- keys -------------------------------------------------------------

    /// Makes `kek` active and re-wraps every data key under it.
    pub async fn rotate_key(&self, kek: &str, caller: &Caller) -> Result<i64, ConfigError> {
        if !self.keyring.contains(kek) {
            return Err(ConfigError::invalid(
                "key_id",
                format!("is not in the configured keyring ({})", self.keyring.source()),
            ));
        }
        self.store.set_active_kek(kek, false).await?;
        let mut rewrapped = 0i64;
        for table in SealedTable::ALL {
            loop {
                let rows = self.store.sealed_not_under(table, kek, REWRAP_BATCH).await?;
                if rows.is_empty() {
                    break;
                }
                let mut progressed = false;
                for row in rows {
                    let sealed = crate::model::Sealed {
                        ciphertext: Vec::new(),
                        wrapped_key: row.wrapped_key.clone(),
                        kek_id: row.kek_id.clone(),
                    };
                    let moved = self
                        .keyring
                        .rewrap(&sealed, kek)
                        .map_err(|reason| ConfigError::Decrypt {
                            key: row.key.clone(),
                            reason,
                        })?;
                    if self.store.rewrap_row(table, &row, &moved.wrapped_key, kek).await? {
                        rewrapped += 1;
                        progressed = true;
                    }
                }
                if !progressed {
                    tokio::task::yield_now().await;
                }
            }
        }
        // In-memory heads keep the old wrapping, which opens while the old
        // key stays configured; a restart without it reads the new one.
        let ev = Self::admin_event("key_rotated", "", "", kek, &caller.subject);
        self.store.emit(&ev).await?;
        self.wake();
        Ok(rewrapped)
    }

    // ---- background -------------------------------------------------------

    /// Compacts history older than the retained revisions, every `interval`.
    pub async fn compact(self, interval: Duration, token: CancellationToken) -> Result<(), ConfigError> {
        let keep = i64::try_from(self.settings.history_revisions).unwrap_or(i64::MAX);
        if keep == 0 {
            return Ok(());
        }
        while plinth_runtime::tasks::pause(&token, interval).await {
            let envs = match self.store.heads().await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %plinth_runtime::error::chain(&e), "listing environments for compaction failed");
                    continue;
                }
            };
            for (env, head, _) in envs {
                let upto = head - keep;
                if upto <= 0 {
                    continue;
                }
                match self.store.get_environment(&env).await {
                    Ok(e) if e.compacted_revision < upto => match self.store.compact(&env, upto).await {
                        Ok(rows) => tracing::info!(env = %env, upto, rows, "history compacted"),
                        Err(e) => {
                            tracing::warn!(env = %env, error = %plinth_runtime::error::chain(&e), "compaction failed")
                        }
                    },
                    Ok(_) | Err(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Hints the feeds of every `plinth.config.changed` event on the bus, so
    /// a write on another replica reaches this replica's watchers at once
    /// rather than at the next poll. Hints only: a lost one costs latency.
    pub async fn follow_events(self, bus: SharedBus, token: CancellationToken) -> Result<(), ConfigError> {
        loop {
            match bus.listen("plinth.config.changed").await {
                Ok(mut live) => loop {
                    tokio::select! {
                        () = token.cancelled() => return Ok(()),
                        next = live.next() => match next {
                            Some(event) => {
                                if let Ok(c) = pb::ConfigChangedEvent::decode(event.payload) {
                                    self.hub.hint(EnvId::new(c.namespace, c.environment), c.revision);
                                }
                            }
                            None => break,
                        },
                    }
                },
                Err(e) => tracing::warn!(error = %e, "cannot listen for config changes; relying on polling"),
            }
            if !plinth_runtime::tasks::pause(&token, Duration::from_secs(1)).await {
                return Ok(());
            }
        }
    }

    /// Compacts one environment's history up to `upto` now (operators, tests).
    pub async fn compact_now(&self, env: &EnvId, upto: i64) -> Result<u64, ConfigError> {
        self.store.compact(env, upto).await
    }

    /// Batches of `env` in `(after, upto]`, for watchers replaying history.
    /// `Compacted` when `after` is older than retained history.
    pub async fn batches(&self, env: &EnvId, after: i64, upto: i64) -> Result<Vec<Batch>, ConfigError> {
        self.store.batches(env, after, upto).await
    }
}
