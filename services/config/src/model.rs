//! The config domain's own types and the rules for valid names, keys and
//! values. Wire types convert into these (in `grpc`), storage reads and
//! writes them; nothing here knows about either.

use std::sync::Arc;

use secrecy::SecretString;

use crate::error::ConfigError;

/// Longest key.
pub const MAX_KEY_LEN: usize = 256;
/// Most changes in one ApplyChanges.
pub const MAX_CHANGES: usize = 1000;
/// Longest description or change message.
pub const MAX_TEXT_LEN: usize = 1024;

/// Checks a namespace or environment name: `[a-z][a-z0-9-]*`, at most 63.
pub fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else if name.is_empty() {
        Err(ConfigError::invalid(field, "is required"))
    } else {
        Err(ConfigError::invalid(
            field,
            "must start with a lowercase letter and hold only lowercase letters, digits and '-' (at most 63)",
        ))
    }
}

/// Checks a release name: `[a-z0-9][a-z0-9.-]*`, at most 63, not `latest`.
pub fn check_release_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if name == LATEST_RELEASE {
        return Err(ConfigError::invalid(
            field,
            "`latest` is reserved for the newest release",
        ));
    }
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            "must be lowercase letters, digits, '.' and '-', starting with a letter or digit (at most 63)",
        ))
    }
}

/// Reads naming this release get the newest one.
pub const LATEST_RELEASE: &str = "latest";

/// Checks a key: segments of `[A-Za-z0-9_.-]` separated by single `/`.
pub fn check_key(field: &str, key: &str) -> Result<(), ConfigError> {
    if key.is_empty() {
        return Err(ConfigError::invalid(field, "is required"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(ConfigError::invalid(
            field,
            format!("is longer than {MAX_KEY_LEN} characters"),
        ));
    }
    let segments_ok = key.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    });
    if segments_ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            "must be segments of letters, digits, '_', '.' and '-' separated by single '/'",
        ))
    }
}

/// Checks a prefix: empty, or a key prefix (may end in `/` or mid-segment).
pub fn check_prefix(field: &str, prefix: &str) -> Result<(), ConfigError> {
    if prefix.len() > MAX_KEY_LEN
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'))
    {
        return Err(ConfigError::invalid(
            field,
            "must be at most 256 letters, digits, '_', '.', '-' and '/'",
        ));
    }
    Ok(())
}

/// Checks free text (descriptions, change messages).
pub fn check_text(field: &str, text: &str) -> Result<(), ConfigError> {
    if text.chars().count() > MAX_TEXT_LEN {
        return Err(ConfigError::invalid(
            field,
            format!("is longer than {MAX_TEXT_LEN} characters"),
        ));
    }
    Ok(())
}

/// A value that is not secret.
#[derive(Debug, Clone, PartialEq)]
pub enum Plain {
    /// Text.
    String(String),
    /// A finite number.
    Number(f64),
    /// A flag.
    Bool(bool),
    /// A JSON document.
    Json(serde_json::Value),
}

impl Plain {
    /// The value as JSON, for schema validation and JSON/YAML export.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Plain::String(s) => serde_json::Value::String(s.clone()),
            Plain::Number(n) => {
                serde_json::Number::from_f64(*n).map_or(serde_json::Value::Null, serde_json::Value::Number)
            }
            Plain::Bool(b) => serde_json::Value::Bool(*b),
            Plain::Json(v) => v.clone(),
        }
    }
}

/// A value a caller writes.
#[derive(Debug, Clone)]
pub enum NewValue {
    /// Stored as it is.
    Plain(Plain),
    /// Encrypted before it is stored.
    Secret(SecretString),
}

/// Conditions a write needs to hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Precondition {
    /// The current version must be this (0: not checked).
    pub expected_version: i64,
    /// The current etag must be this (empty: not checked).
    pub expected_etag: String,
    /// The key must not exist.
    pub must_not_exist: bool,
}

impl Precondition {
    /// Whether the key's current state (`None`: absent) satisfies it.
    pub fn check(&self, key: &str, current: Option<&Entry>) -> Result<(), ConfigError> {
        if self.must_not_exist && current.is_some() {
            return Err(ConfigError::Conflict(format!("key {key:?} already exists")));
        }
        if self.expected_version != 0 {
            let actual = current.map_or(0, |e| e.version);
            if actual != self.expected_version {
                return Err(ConfigError::Conflict(format!(
                    "key {key:?} is at version {actual}, not the expected {}",
                    self.expected_version
                )));
            }
        }
        if !self.expected_etag.is_empty() {
            let actual = current.map(Entry::etag).unwrap_or_default();
            if actual != self.expected_etag {
                return Err(ConfigError::Conflict(format!(
                    "key {key:?} changed since it was read (etag {actual:?}, expected {:?})",
                    self.expected_etag
                )));
            }
        }
        Ok(())
    }
}

/// One change of a write.
#[derive(Debug, Clone)]
pub struct Mutation {
    /// The key.
    pub key: String,
    /// The new value; `None` deletes.
    pub value: Option<NewValue>,
    /// Must hold, or the whole write is refused.
    pub precondition: Precondition,
}

pub use plinth_runtime::crypto::Sealed;

/// A value as stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// Not secret.
    Plain(Plain),
    /// Secret.
    Secret(Sealed),
}

impl Stored {
    /// Whether it is a secret.
    pub fn is_secret(&self) -> bool {
        matches!(self, Stored::Secret(_))
    }
}

/// One key at some revision.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Stored,
    /// 1 on create, +1 per set.
    pub version: i64,
    /// The revision that created it.
    pub create_revision: i64,
    /// The revision that last set it.
    pub mod_revision: i64,
    /// Who last set it.
    pub updated_by: String,
    /// When (ms since the epoch).
    pub updated_at: i64,
}

impl Entry {
    /// Identifies this version of the key.
    pub fn etag(&self) -> String {
        format!("{:x}-{:x}", self.mod_revision, self.version)
    }
}

/// What one revision did to one key.
#[derive(Debug, Clone)]
pub struct KeyEvent {
    /// The key.
    pub key: String,
    /// The key after a set; `None` after a delete.
    pub entry: Option<Arc<Entry>>,
}

/// What a revision is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevisionKind {
    /// SetValue, DeleteValue or ApplyChanges.
    Write,
    /// Rollback.
    Rollback,
    /// ImportValues.
    Import,
}

impl RevisionKind {
    /// Its name in storage and answers.
    pub fn as_str(self) -> &'static str {
        match self {
            RevisionKind::Write => "write",
            RevisionKind::Rollback => "rollback",
            RevisionKind::Import => "import",
        }
    }
}

/// One committed revision with its changes.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The revision.
    pub revision: i64,
    /// Who wrote it.
    pub author: String,
    /// Why.
    pub message: String,
    /// The changes, in key order.
    pub events: Vec<KeyEvent>,
}

/// A revision's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionInfo {
    /// The number.
    pub revision: i64,
    /// Who.
    pub author: String,
    /// Why.
    pub message: String,
    /// `write`, `rollback` or `import`.
    pub kind: String,
    /// When (ms).
    pub created_at: i64,
    /// How many keys changed.
    pub change_count: i32,
    /// The first 100 of them.
    pub keys: Vec<String>,
}

/// A namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Its name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Bumped on every update.
    pub generation: i64,
    /// Created (ms).
    pub created_at: i64,
    /// Last changed (ms).
    pub updated_at: i64,
}

/// An environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Head revision.
    pub revision: i64,
    /// History starts after this.
    pub compacted_revision: i64,
    /// Keys at the head.
    pub key_count: i64,
    /// Bumped on every settings update.
    pub generation: i64,
    /// Created (ms).
    pub created_at: i64,
    /// Last changed (ms).
    pub updated_at: i64,
    /// What clients outside a rollout read (empty: the head).
    pub current_release: String,
}

/// A release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Its name.
    pub name: String,
    /// The frozen revision.
    pub revision: i64,
    /// Free text.
    pub description: String,
    /// Who created it.
    pub created_by: String,
    /// When (ms).
    pub created_at: i64,
    /// Keys it holds.
    pub key_count: i64,
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutState {
    /// Its cohort reads the release; it may be promoted.
    Active,
    /// Its cohort reads the release; not promotable until resumed.
    Paused,
    /// Everyone reads the release.
    Completed,
    /// Everyone reads the previous release.
    Aborted,
}

impl RolloutState {
    /// Its name in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Active => "active",
            RolloutState::Paused => "paused",
            RolloutState::Completed => "completed",
            RolloutState::Aborted => "aborted",
        }
    }

    /// From storage (anything unknown reads as aborted: it routes no one).
    pub fn parse(s: &str) -> Self {
        match s {
            "active" => RolloutState::Active,
            "paused" => RolloutState::Paused,
            "completed" => RolloutState::Completed,
            _ => RolloutState::Aborted,
        }
    }

    /// Whether its cohort reads its release.
    pub fn routes(self) -> bool {
        matches!(self, RolloutState::Active | RolloutState::Paused)
    }
}

/// A release rolled out to part of the clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// The release.
    pub release: String,
    /// What the others read ('' = the head).
    pub previous_release: String,
    /// Cohort by id hash, 0-100.
    pub percentage: i32,
    /// Clients with all of these are in.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Where it is.
    pub state: RolloutState,
    /// Who changed it last.
    pub updated_by: String,
    /// Started (ms).
    pub created_at: i64,
    /// Last changed (ms).
    pub updated_at: i64,
}

/// A client as rollouts see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Stable id.
    pub id: String,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Rollout {
    /// Whether `client` is in this rollout's cohort (state aside): it has
    /// every rollout label, or its id hashes into the percentage. The hash
    /// covers the release, so successive rollouts pick different cohorts,
    /// and is stable, so a client stays in as the percentage grows.
    pub fn includes(&self, env: &EnvId, client: &ClientIdentity) -> bool {
        use sha2::Digest;
        if !self.labels.is_empty() && self.labels.iter().all(|(k, v)| client.labels.get(k) == Some(v)) {
            return true;
        }
        if client.id.is_empty() {
            return false;
        }
        let digest = sha2::Sha256::digest(format!("{env}/{}/{}", self.release, client.id).as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        let bucket = u64::from_be_bytes(first) % 100;
        bucket < u64::try_from(self.percentage.clamp(0, 100)).unwrap_or(0)
    }
}

/// Which state a read sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadAt {
    /// The head, at least this new (0: whatever this replica has).
    Head {
        /// Lowest acceptable revision.
        min_revision: i64,
    },
    /// A past revision.
    Revision(i64),
    /// A release by name (or `latest`).
    Release(String),
    /// What this client should read (its rollout's release, the current one, or the head).
    Client(ClientIdentity),
}

/// Where a namespace/environment pair lives; the key of per-environment state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EnvId {
    /// The namespace.
    pub namespace: String,
    /// The environment.
    pub environment: String,
}

impl EnvId {
    /// The pair.
    pub fn new(namespace: impl Into<String>, environment: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            environment: environment.into(),
        }
    }
}

impl std::fmt::Display for EnvId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.environment)
    }
}

/// Milliseconds since the epoch (the runtime's clock).
pub use plinth_runtime::auth::unix_now_ms as now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_slash_separated_segments() {
        for good in ["a", "db/url", "feature.flags/new-ui", "A_B/c.d-e"] {
            assert!(check_key("key", good).is_ok(), "{good}");
        }
        for bad in ["", "/a", "a/", "a//b", "a b", "a/../b", "ü", &"k".repeat(257)] {
            assert!(check_key("key", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_lowercase_identifiers() {
        assert!(check_name("n", "prod-eu1").is_ok());
        for bad in ["", "Prod", "1prod", "pr_od", &"a".repeat(64)] {
            assert!(check_name("n", bad).is_err(), "{bad}");
        }
        assert!(check_release_name("r", "v1.4.0").is_ok());
        assert!(check_release_name("r", "latest").is_err());
    }

    #[test]
    fn preconditions_compare_version_etag_and_existence() {
        let e = Entry {
            key: "k".into(),
            value: Stored::Plain(Plain::Bool(true)),
            version: 3,
            create_revision: 1,
            mod_revision: 7,
            updated_by: "u".into(),
            updated_at: 0,
        };
        let p = |v: i64, etag: &str, mne: bool| Precondition {
            expected_version: v,
            expected_etag: etag.into(),
            must_not_exist: mne,
        };
        assert!(p(3, "", false).check("k", Some(&e)).is_ok());
        assert!(p(2, "", false).check("k", Some(&e)).is_err());
        assert!(p(0, &e.etag(), false).check("k", Some(&e)).is_ok());
        assert!(p(0, "7-2", false).check("k", Some(&e)).is_err());
        assert!(p(0, "", true).check("k", Some(&e)).is_err());
        assert!(p(0, "", true).check("k", None).is_ok());
        assert!(p(1, "", false).check("k", None).is_err());
    }
}
