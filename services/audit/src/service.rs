//! What each audit call means: appending (canonical bytes, leaf hashes,
//! idempotency), integrating into the tree with a signed checkpoint per
//! round, proofs from stored nodes, listing, and re-verifying the whole log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use plinth::audit::v1 as pb;
use plinth_runtime::Tasks;
use plinth_runtime::config::AuditSettings;
use plinth_runtime::events::outbox::OutboxEvent;
use plinth_runtime::storage::group_commit::GroupCommit;
use secrecy::ExposeSecret;
use sha2::Digest;
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use crate::alerts::{AlertRow, AlertRule};
use crate::error::AuditError;
use crate::merkle::{self, Frontier, Hash, NodeId, Range, consistency_ranges, decompose, inclusion_ranges};
use crate::model::{Appended, Entry, Erasure, Event, Filter, RetentionPolicy, Verification};
use crate::note::{NoteSigner, SignedCheckpoint};
use crate::store::{Prepared, Row, Store};

/// How often a live tail looks for other replicas' appends.
const TAIL_POLL: Duration = Duration::from_millis(250);
/// Entries a tail or export reads per query.
const STREAM_PAGE: usize = 500;
/// Entries erased per statement.
const ERASE_BATCH: i64 = 5_000;
/// Entries read per query while verifying.
const VERIFY_CHUNK: i64 = 5_000;
/// Checkpoints read per query while verifying.
const CHECKPOINT_CHUNK: usize = 1_000;

/// An inclusion proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InclusionProof {
    /// The leaf.
    pub index: u64,
    /// The tree.
    pub tree_size: u64,
    /// The leaf's hash.
    pub leaf_hash: Hash,
    /// The audit path, bottom to top.
    pub hashes: Vec<Hash>,
    /// The tree's root.
    pub root: Hash,
}

/// A consistency proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistencyProof {
    /// The older size.
    pub first: u64,
    /// The newer size.
    pub second: u64,
    /// The proof.
    pub hashes: Vec<Hash>,
    /// The older root.
    pub first_root: Hash,
    /// The newer root.
    pub second_root: Hash,
}

/// A listing page.
#[derive(Debug, Clone)]
pub struct Page {
    /// Entries, each with whether it is integrated.
    pub entries: Vec<(Entry, bool)>,
    /// Cursor for the next page.
    pub next: Option<u64>,
}

struct Inner {
    store: Store,
    signer: NoteSigner,
    settings: AuditSettings,
    frontier: Mutex<Option<Frontier>>,
    wake: Notify,
    /// Bumped after each append that added entries, for live tails.
    appended: tokio::sync::watch::Sender<u64>,
    /// Concurrent appends share one transaction: the log has one inserter
    /// at a time, so each commit should carry as much as is waiting.
    appends: GroupCommit<(), Vec<Prepared>, Vec<Appended>, AuditError>,
    /// The latest tree size this replica knows of and when it learnt it:
    /// a proof at a size no larger needs no checkpoint read.
    known_size: std::sync::Mutex<(u64, Instant)>,
}

/// How long a known tree size answers for "the latest" before proofs read
/// the checkpoint again (another replica may have integrated since).
/// This replica's own integrations update it at once.
const LATEST_SIZE_FOR: Duration = Duration::from_millis(500);

/// Most entries appended in one transaction by a group of callers.
const MAX_GROUP_ENTRIES: usize = 2000;

/// The audit log.
#[derive(Clone)]
pub struct Audit {
    inner: Arc<Inner>,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A setting is unusable.
    #[error("{0}")]
    Settings(String),
    /// The database failed.
    #[error(transparent)]
    Audit(#[from] AuditError),
}

impl Audit {
    /// Opens the log in `store` with the configured (or stored) signing key.
    pub async fn open(store: Store, settings: AuditSettings) -> Result<Self, OpenError> {
        Self::open_with_tasks(store, settings, Tasks::new()).await
    }

    /// [`Audit::open`], committing grouped appends on `tasks` so shutdown
    /// waits for them.
    pub async fn open_with_tasks(store: Store, settings: AuditSettings, tasks: Tasks) -> Result<Self, OpenError> {
        let seed: [u8; 32] = match &settings.signing_key {
            Some(key) => STANDARD
                .decode(key.expose_secret().trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .ok_or_else(|| OpenError::Settings("PLINTH_AUDIT__SIGNING_KEY must be base64 of 32 bytes".into()))?,
            None => store.signing_seed(rand::random()).await?,
        };
        let signer = NoteSigner::new(&settings.origin, &seed).map_err(|e| OpenError::Settings(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                signer,
                settings,
                frontier: Mutex::new(None),
                wake: Notify::new(),
                appended: tokio::sync::watch::Sender::new(0),
                appends: GroupCommit::new("audit-group-append", MAX_GROUP_ENTRIES, tasks),
                known_size: std::sync::Mutex::new((0, Instant::now())),
            }),
        })
    }

    /// The signer (its public key and verifier key).
    pub fn signer(&self) -> &NoteSigner {
        &self.inner.signer
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &AuditSettings {
        &self.inner.settings
    }

    /// The store, for tests that tamper with it.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Appends validated events; a repeated id adds nothing.
    pub async fn append(&self, events: Vec<Event>) -> Result<Vec<Appended>, AuditError> {
        let prepared: Vec<Prepared> = events
            .into_iter()
            .map(|event| {
                let data = event.canonical();
                let leaf_hash = merkle::leaf_hash(&data);
                Prepared { event, data, leaf_hash }
            })
            .collect();
        let store = self.inner.store.clone();
        let out = self
            .inner
            .appends
            .submit_items(&(), prepared, AuditError::replicate, move |(), all| async move {
                store.append(&all).await
            })
            .await?;
        if out.iter().any(|a| !a.duplicate) {
            self.inner.wake.notify_one();
            self.inner.appended.send_modify(|n| *n += 1);
        }
        Ok(out)
    }

    /// Integrates one batch of new entries; the checkpoint it signed, if any.
    pub async fn integrate(&self) -> Result<Option<SignedCheckpoint>, AuditError> {
        let mut frontier = self.inner.frontier.lock().await;
        let signer = &self.inner.signer;
        let sign = |size: u64, root: Hash| signer.sign(size, root, now_secs());
        let signed = self
            .inner
            .store
            .integrate(&mut frontier, self.inner.settings.integrate_batch, &sign, &|c| {
                OutboxEvent::new(
                    "plinth.audit.checkpoint_signed",
                    signer.origin(),
                    &pb::CheckpointSignedEvent {
                        checkpoint: Some(c.wire(signer.origin())),
                    },
                )
            })
            .await?;
        if let Some(c) = &signed {
            self.learn_size(c.tree_size);
        }
        Ok(signed)
    }

    /// Remembers that the tree has (at least) `size` entries.
    fn learn_size(&self, size: u64) {
        let mut known = self
            .inner
            .known_size
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if size >= known.0 {
            *known = (size, Instant::now());
        }
    }

    /// The latest tree size if it is at least `need`: from memory when known
    /// recently enough (`fresh`), else from the latest checkpoint. A smaller
    /// size means the tree has not reached `need` yet.
    async fn latest_size(&self, need: u64, fresh: bool) -> Result<u64, AuditError> {
        let (size, at) = *self
            .inner
            .known_size
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if size >= need && (!fresh || at.elapsed() < LATEST_SIZE_FOR) {
            return Ok(size);
        }
        let size = self.checkpoint().await?.tree_size;
        self.learn_size(size);
        Ok(size)
    }

    /// Integrates until nothing is left; the last checkpoint signed.
    pub async fn integrate_all(&self) -> Result<Option<SignedCheckpoint>, AuditError> {
        let mut last = None;
        while let Some(c) = self.integrate().await? {
            last = Some(c);
        }
        Ok(last)
    }

    /// Integrates whenever appends arrive (and every `integrate_ms` for
    /// other replicas' appends) until `token` is cancelled.
    pub async fn run_integrator(self, token: CancellationToken) -> Result<(), AuditError> {
        let interval = Duration::from_millis(self.inner.settings.integrate_ms.max(10));
        loop {
            tokio::select! {
                () = token.cancelled() => return Ok(()),
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(interval) => {}
            }
            if let Err(e) = self.integrate_all().await {
                tracing::warn!(error = %e, "audit integration failed; retrying");
                if !plinth_runtime::tasks::pause(&token, interval).await {
                    return Ok(());
                }
            }
        }
    }

    /// The latest checkpoint; for an empty log, one signed now for size 0.
    pub async fn checkpoint(&self) -> Result<SignedCheckpoint, AuditError> {
        Ok(match self.inner.store.latest_checkpoint().await? {
            Some((c, _)) => c,
            None => self.inner.signer.sign(0, merkle::empty_root(), now_secs()),
        })
    }

    /// The tree size a proof is made in: `requested`, or the latest when 0
    /// (`need` is the least size the proof can be made in).
    async fn tree_size(&self, requested: u64, need: u64) -> Result<u64, AuditError> {
        if requested == 0 {
            return self.latest_size(need, true).await;
        }
        let latest = self.latest_size(requested, false).await?;
        if requested > latest {
            return Err(AuditError::NotYetIntegrated(format!(
                "tree size {requested} is beyond the latest checkpoint ({latest} entries)"
            )));
        }
        Ok(requested)
    }

    /// The hash of each of `ranges`, from stored subtrees fetched in one query.
    async fn range_hashes(&self, ranges: &[Range]) -> Result<Vec<Hash>, AuditError> {
        let parts: Vec<Vec<NodeId>> = ranges.iter().map(|r| decompose(*r)).collect();
        let ids: Vec<NodeId> = parts.iter().flatten().copied().collect();
        let found = self.inner.store.nodes(&ids).await?;
        parts
            .iter()
            .map(|ids| {
                let hashes = ids
                    .iter()
                    .map(|id| found.get(id).copied())
                    .collect::<Option<Vec<Hash>>>()
                    .ok_or_else(|| AuditError::Corrupt("a tree node a proof needs is missing".into()))?;
                Ok(merkle::fold(&hashes).unwrap_or_else(merkle::empty_root))
            })
            .collect()
    }

    /// The inclusion proof of entry `index` (or of the entry with `event_id`)
    /// in the tree of `tree_size` (latest when 0).
    pub async fn inclusion_proof(
        &self,
        index: Option<u64>,
        event_id: Option<&str>,
        tree_size: u64,
    ) -> Result<InclusionProof, AuditError> {
        let index = match (index, event_id) {
            (_, Some(id)) => self
                .inner
                .store
                .index_of(id)
                .await?
                .ok_or_else(|| AuditError::EntryNotFound(format!("with event id {id:?}")))?,
            (Some(i), None) => i,
            (None, None) => return Err(AuditError::invalid("index", "give index or event_id")),
        };
        let size = self.tree_size(tree_size, index.saturating_add(1)).await?;
        if index >= size {
            return Err(if tree_size == 0 {
                AuditError::NotYetIntegrated(format!(
                    "entry {index} is not in the latest checkpoint ({size} entries) yet; retry shortly"
                ))
            } else {
                AuditError::invalid("tree_size", format!("must be larger than the index {index}"))
            });
        }
        let mut ranges = inclusion_ranges(index, size);
        ranges.push((index, index + 1));
        ranges.push((0, size));
        let mut hashes = self.range_hashes(&ranges).await?;
        let root = hashes.pop().unwrap_or_else(merkle::empty_root);
        let leaf_hash = hashes.pop().unwrap_or_else(merkle::empty_root);
        Ok(InclusionProof {
            index,
            tree_size: size,
            leaf_hash,
            hashes,
            root,
        })
    }

    /// The consistency proof from `first` to `second` entries (latest when 0).
    pub async fn consistency_proof(&self, first: u64, second: u64) -> Result<ConsistencyProof, AuditError> {
        let second = self.tree_size(second, first.max(1)).await?;
        if first == 0 {
            return Err(AuditError::invalid("first_tree_size", "must be at least 1"));
        }
        if first > second {
            return Err(AuditError::invalid(
                "first_tree_size",
                format!("must be at most the second tree size ({second})"),
            ));
        }
        let mut ranges = consistency_ranges(first, second);
        ranges.push((0, first));
        ranges.push((0, second));
        let mut hashes = self.range_hashes(&ranges).await?;
        let second_root = hashes.pop().unwrap_or_else(merkle::empty_root);
        let first_root = hashes.pop().unwrap_or_else(merkle::empty_root);
        Ok(ConsistencyProof {
            first,
            second,
            hashes,
            first_root,
            second_root,
        })
    }

    /// One entry and whether it is integrated.
    pub async fn entry(&self, index: u64) -> Result<(Entry, bool), AuditError> {
        let row = self
            .inner
            .store
            .entry(index)
            .await?
            .ok_or_else(|| AuditError::EntryNotFound(format!("at index {index}")))?;
        let size = self.inner.store.tree_size().await?;
        Ok((row.entry()?, index < size))
    }

    /// A page of entries matching `filter`.
    pub async fn list(
        &self,
        filter: &Filter,
        cursor: Option<u64>,
        oldest_first: bool,
        limit: usize,
    ) -> Result<Page, AuditError> {
        let rows = self.inner.store.list(filter, cursor, oldest_first, limit + 1).await?;
        let size = self.inner.store.tree_size().await?;
        let more = rows.len() > limit;
        let entries = rows
            .into_iter()
            .take(limit)
            .map(|r| {
                let e = r.entry()?;
                let integrated = e.index < size;
                Ok::<_, AuditError>((e, integrated))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let next = if more {
            entries.last().map(|(e, _)| e.index)
        } else {
            None
        };
        Ok(Page { entries, next })
    }

    /// The entries matching `filter` after index `after` (from the first
    /// when `None`), then each new one as it is appended, in index order.
    /// Indexes are handed out under a lock and committed in order, so
    /// reading past the last index seen never skips one.
    pub fn tail(
        &self,
        filter: Filter,
        after: Option<u64>,
    ) -> impl futures::Stream<Item = Result<(Entry, bool), AuditError>> + Send + 'static {
        struct State {
            audit: Audit,
            filter: Filter,
            cursor: Option<u64>,
            buffer: std::collections::VecDeque<(Entry, bool)>,
            changes: tokio::sync::watch::Receiver<u64>,
        }
        let state = State {
            changes: self.inner.appended.subscribe(),
            audit: self.clone(),
            filter,
            cursor: after,
            buffer: std::collections::VecDeque::new(),
        };
        futures::stream::unfold(state, |mut s| async move {
            loop {
                if let Some(item) = s.buffer.pop_front() {
                    s.cursor = Some(item.0.index);
                    return Some((Ok(item), s));
                }
                s.changes.borrow_and_update();
                match s.audit.list(&s.filter, s.cursor, true, STREAM_PAGE).await {
                    Err(e) => return Some((Err(e), s)),
                    Ok(page) if !page.entries.is_empty() => s.buffer.extend(page.entries),
                    Ok(_) => {
                        // Caught up: wait for a local append or the next poll.
                        let _ = tokio::time::timeout(TAIL_POLL, s.changes.changed()).await;
                    }
                }
            }
        })
    }

    /// Where a tail that starts "now" starts: after the last entry appended.
    pub async fn last_index(&self) -> Result<Option<u64>, AuditError> {
        Ok(self.inner.store.appended().await?.checked_sub(1))
    }

    /// The entries matching `filter` in the tree of `checkpoint`, oldest
    /// first, each with its inclusion proof in that tree.
    pub fn export(
        &self,
        filter: Filter,
        checkpoint: &SignedCheckpoint,
    ) -> impl futures::Stream<Item = Result<(Entry, Vec<Hash>), AuditError>> + Send + 'static {
        let size = checkpoint.tree_size;
        let state = (
            self.clone(),
            filter,
            None::<u64>,
            std::collections::VecDeque::<(Entry, bool)>::new(),
            false,
        );
        futures::stream::unfold(
            state,
            move |(audit, filter, mut cursor, mut buffer, mut done)| async move {
                loop {
                    if let Some((entry, _)) = buffer.pop_front() {
                        if entry.index >= size {
                            done = true;
                            buffer.clear();
                            continue;
                        }
                        cursor = Some(entry.index);
                        let proof = audit.inclusion_proof(Some(entry.index), None, size).await;
                        let item = proof.map(|p| (entry, p.hashes));
                        return Some((item, (audit, filter, cursor, buffer, done)));
                    }
                    if done {
                        return None;
                    }
                    match audit.list(&filter, cursor, true, STREAM_PAGE).await {
                        Err(e) => return Some((Err(e), (audit, filter, cursor, buffer, true))),
                        Ok(page) => {
                            done = page.next.is_none();
                            buffer.extend(page.entries);
                        }
                    }
                }
            },
        )
    }

    /// Creates or replaces a retention policy (validated by the caller).
    pub async fn set_policy(&self, policy: RetentionPolicy) -> Result<RetentionPolicy, AuditError> {
        self.inner.store.set_policy(&policy).await?;
        Ok(policy)
    }

    /// Every retention policy.
    pub async fn policies(&self) -> Result<Vec<RetentionPolicy>, AuditError> {
        self.inner.store.policies().await
    }

    /// Removes a retention policy.
    pub async fn delete_policy(&self, name: &str) -> Result<(), AuditError> {
        if self.inner.store.delete_policy(name).await? {
            Ok(())
        } else {
            Err(AuditError::PolicyNotFound(name.to_owned()))
        }
    }

    /// Creates or replaces an alert rule.
    pub async fn set_alert_rule(&self, rule: AlertRule) -> Result<AlertRule, AuditError> {
        self.inner.store.set_alert_rule(&rule).await?;
        Ok(rule)
    }

    /// Every alert rule, by name.
    pub async fn alert_rules(&self) -> Result<Vec<AlertRule>, AuditError> {
        self.inner.store.alert_rules().await
    }

    /// Removes an alert rule.
    pub async fn delete_alert_rule(&self, name: &str) -> Result<(), AuditError> {
        if self.inner.store.delete_alert_rule(name).await? {
            Ok(())
        } else {
            Err(AuditError::AlertRuleNotFound(name.to_owned()))
        }
    }

    /// Raised alerts, newest first.
    pub async fn alerts(&self, rule: &str, limit: i64) -> Result<Vec<AlertRow>, AuditError> {
        self.inner.store.alerts(rule, limit).await
    }

    /// Evaluates alert rules over new entries and calls due webhooks, every
    /// `interval`, until `token` is cancelled.
    pub async fn run_alerts(self, interval: Duration, token: CancellationToken) -> Result<(), AuditError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| AuditError::Webhooks(e.to_string()))?;
        while plinth_runtime::tasks::pause(&token, interval).await {
            loop {
                match self
                    .inner
                    .store
                    .evaluate_alerts(plinth_runtime::auth::unix_now_ms())
                    .await
                {
                    Ok((read, raised)) => {
                        for a in &raised {
                            let w = a.wire();
                            tracing::warn!(rule = %w.rule, group = %w.group, count = w.count, index = w.index, "audit alert raised");
                        }
                        if i64::try_from(read).unwrap_or(i64::MAX) < crate::alerts::BATCH {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "evaluating audit alert rules failed; retrying");
                        break;
                    }
                }
            }
            let now = plinth_runtime::auth::unix_now_ms();
            let due = match self.inner.store.claim_deliveries(now).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(error = %e, "reading due audit alert webhooks failed; retrying");
                    continue;
                }
            };
            for alert in due {
                let attempts = alert.attempts + 1;
                let (ok, error) = match crate::alerts::call_webhook(&client, &alert).await {
                    Ok(()) => (true, String::new()),
                    Err(e) => {
                        tracing::warn!(alert = alert.id, attempts, error = %e, "audit alert webhook failed");
                        (false, e)
                    }
                };
                let next = plinth_runtime::auth::unix_now_ms()
                    + i64::try_from(crate::alerts::retry_in(attempts).as_millis()).unwrap_or(i64::MAX / 2);
                if let Err(e) = self.inner.store.delivered(alert.id, ok, &error, attempts, next).await {
                    tracing::warn!(alert = alert.id, error = %e, "recording an audit alert webhook attempt failed");
                }
            }
        }
        Ok(())
    }

    /// Erases everything `what` covers, in batches; how many entries.
    async fn erase_all(&self, what: &Erasure, now_ms: i64) -> Result<u64, AuditError> {
        let mut total = 0;
        loop {
            let n = self.inner.store.erase(what, ERASE_BATCH, now_ms).await?;
            total += n;
            if n < u64::try_from(ERASE_BATCH).unwrap_or(0) {
                return Ok(total);
            }
        }
    }

    /// Applies every retention policy as of `now_ms`; each policy that
    /// erased something appends an `audit.entries.erased` entry.
    pub async fn apply_retention(&self, now_ms: i64) -> Result<Vec<(String, u64)>, AuditError> {
        let mut out = Vec::new();
        for p in self.policies().await? {
            let before_ms = now_ms.saturating_sub(p.retain_ms);
            let what = Erasure::Expired {
                action_prefix: p.action_prefix.clone(),
                tenant: p.tenant.clone(),
                before_ms,
            };
            let erased = self.erase_all(&what, now_ms).await?;
            if erased == 0 {
                continue;
            }
            tracing::info!(policy = %p.name, erased, "audit retention erased expired entries");
            let mut record = system_event("audit.entries.erased", now_ms);
            record.resource_type = "audit.retention_policy".into();
            record.resource_name = p.name.clone();
            record.metadata = crate::model::json_object(serde_json::json!({
                "erased": erased,
                "before_time_ms": before_ms,
                "action_prefix": p.action_prefix,
                "tenant": p.tenant,
            }));
            self.append(vec![record]).await?;
            out.push((p.name, erased));
        }
        Ok(out)
    }

    /// Erases every entry about `subject` and records that (with the
    /// subject's SHA-256, not the subject): (entries erased, record index).
    pub async fn erase_subject(
        &self,
        subject: &str,
        reason: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<(u64, Option<u64>), AuditError> {
        let erased = self.erase_all(&Erasure::Subject(subject.to_owned()), now_ms).await?;
        if erased == 0 {
            return Ok((0, None));
        }
        let digest: String = sha2::Sha256::digest(subject.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut record = system_event("audit.subject.erased", now_ms);
        record.actor_id = by.to_owned();
        record.actor_kind = crate::model::ActorKind::User;
        record.resource_type = "audit.subject".into();
        record.resource_name = format!("sha256:{digest}");
        record.reason = reason.to_owned();
        record.metadata = crate::model::json_object(serde_json::json!({"erased": erased}));
        let appended = self.append(vec![record]).await?;
        tracing::info!(erased, "audit erased a subject's entries on request");
        Ok((erased, appended.first().map(|a| a.index)))
    }

    /// Applies the retention policies every `interval` until `token` is cancelled.
    pub async fn run_retention(self, interval: Duration, token: CancellationToken) -> Result<(), AuditError> {
        while plinth_runtime::tasks::pause(&token, interval).await {
            if let Err(e) = self.apply_retention(plinth_runtime::auth::unix_now_ms()).await {
                tracing::warn!(error = %e, "audit retention failed; retrying at the next interval");
            }
        }
        Ok(())
    }

    /// Re-derives the tree from the stored bytes and compares it with the
    /// stored nodes and every signed checkpoint; stops at the first problem.
    pub async fn verify(&self) -> Result<Verification, AuditError> {
        let store = &self.inner.store;
        let size = store.tree_size().await?;
        let mut report = Verification::default();
        let mut frontier = Frontier::default();
        let mut checkpoints = std::collections::VecDeque::from(store.checkpoints_after(0, CHECKPOINT_CHUNK).await?);
        let mut more_checkpoints = checkpoints.len() == CHECKPOINT_CHUNK;
        let mut next: u64 = 0;
        loop {
            let rows = store.scan(next, VERIFY_CHUNK).await?;
            if rows.is_empty() {
                break;
            }
            let mut completed: Vec<(NodeId, Hash)> = Vec::new();
            for row in &rows {
                if u64::try_from(row.index()).ok() != Some(next) {
                    return Ok(report.bad(next, format!("entry {next} is missing from the log")));
                }
                if let Some(problem) = leaf_problem(row) {
                    return Ok(report.bad(next, format!("entry {next}: {problem}")));
                }
                report.entries_checked += 1;
                if next < size {
                    let leaf = Hash::try_from(row.stored_leaf_hash()).unwrap_or_default();
                    completed.extend(frontier.push(leaf));
                    if checkpoints.is_empty() && more_checkpoints {
                        checkpoints = store
                            .checkpoints_after(frontier.size() - 1, CHECKPOINT_CHUNK)
                            .await?
                            .into();
                        more_checkpoints = checkpoints.len() == CHECKPOINT_CHUNK;
                    }
                    while checkpoints.front().is_some_and(|c| c.tree_size <= frontier.size()) {
                        let Some(c) = checkpoints.pop_front() else { break };
                        if c.tree_size == frontier.size() {
                            if c.root != frontier.root() {
                                if let Some(bad) = self.node_problem(&completed).await? {
                                    return Ok(report.node(bad));
                                }
                                return Ok(report.damaged(format!(
                                    "the checkpoint of size {} has a root the entries do not produce",
                                    c.tree_size
                                )));
                            }
                            if !self.inner.signer.verify(&c) {
                                return Ok(report.damaged(format!(
                                    "the checkpoint of size {} does not carry this log's signature",
                                    c.tree_size
                                )));
                            }
                            report.checkpoints_checked += 1;
                        }
                    }
                }
                next += 1;
            }
            if let Some(bad) = self.node_problem(&completed).await? {
                return Ok(report.node(bad));
            }
        }
        if next < size {
            return Ok(report.bad(
                next,
                format!("the tree holds {size} entries but only {next} are stored"),
            ));
        }
        Ok(report)
    }

    /// The lowest, then leftmost, of `completed` whose stored node differs.
    async fn node_problem(&self, completed: &[(NodeId, Hash)]) -> Result<Option<(NodeId, &'static str)>, AuditError> {
        let max_level = completed.iter().map(|(id, _)| id.level).max().unwrap_or(0);
        for level in 1..=max_level {
            let mine: Vec<&(NodeId, Hash)> = completed.iter().filter(|(id, _)| id.level == level).collect();
            let (Some(lo), Some(hi)) = (mine.first(), mine.last()) else {
                continue;
            };
            let stored = self.inner.store.level_nodes(level, lo.0.index, hi.0.index + 1).await?;
            let stored: std::collections::HashMap<u64, Vec<u8>> = stored.into_iter().collect();
            for (id, hash) in mine {
                let problem = match stored.get(&id.index) {
                    None => Some("the node is missing"),
                    Some(h) if h.as_slice() != hash.as_slice() => Some("its stored hash differs"),
                    Some(_) => None,
                };
                if let Some(p) = problem {
                    // The lowest damaged node pins the damage closest to its leaves.
                    return Ok(Some((*id, p)));
                }
            }
        }
        Ok(None)
    }
}

/// Whether a row's bytes, hash and columns agree.
fn leaf_problem(row: &Row) -> Option<String> {
    let stored = row.stored_leaf_hash();
    if stored.len() != 32 {
        return Some("its stored leaf hash is not 32 bytes".into());
    }
    let data = row.data()?;
    if merkle::leaf_hash(data).as_slice() != stored {
        return Some("its stored bytes do not match its leaf hash".into());
    }
    match Event::from_canonical(data) {
        Err(e) => Some(e.to_string()),
        Ok(event) => row
            .columns_differ(&event)
            .map(|c| format!("column `{c}` differs from the hashed bytes")),
    }
}

impl Verification {
    fn bad(mut self, index: u64, problem: String) -> Self {
        self.first_bad_index = Some(index);
        self.problem = Some(problem);
        self
    }

    fn node(self, (id, problem): (NodeId, &str)) -> Self {
        let first = id.index << id.level;
        let end = (id.index + 1) << id.level;
        self.bad(
            first,
            format!("the tree node covering entries {first}..{end} does not match them: {problem}"),
        )
    }

    fn damaged(mut self, problem: String) -> Self {
        self.problem = Some(problem);
        self
    }
}

/// An event the audit service itself records.
fn system_event(action: &str, now_ms: i64) -> Event {
    Event {
        id: uuid::Uuid::now_v7().to_string(),
        time_ms: now_ms,
        tenant: String::new(),
        actor_id: "audit".into(),
        actor_kind: crate::model::ActorKind::System,
        actor_ip: String::new(),
        actor_user_agent: String::new(),
        action: action.into(),
        resource_type: String::new(),
        resource_name: String::new(),
        outcome: crate::model::Outcome::Success,
        reason: String::new(),
        correlation_id: String::new(),
        trace_id: String::new(),
        source: "audit".into(),
        metadata: serde_json::Map::new(),
    }
}

fn now_secs() -> u64 {
    u64::try_from(plinth_runtime::auth::unix_now_ms() / 1000).unwrap_or(0)
}
