//! What an audit event is, its bounds, and its canonical bytes: the JSON
//! text a leaf hash covers. The bytes are stored and handed out as they
//! were hashed, so a verifier never has to re-derive them; the service
//! parses them back only to check its own query columns against them.

use std::collections::BTreeMap;

use plinth_runtime::error::FieldViolation;
use serde_json::{Map, Value};

use crate::error::AuditError;

/// Most events in one `AppendBatch`.
pub const MAX_BATCH: usize = 1000;
/// Largest metadata object, as JSON.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Who acted, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorKind {
    /// A person.
    User,
    /// A non-human account.
    ServiceAccount,
    /// A caller with an API key.
    ApiKey,
    /// A component acting on its own.
    System,
}

impl ActorKind {
    /// The wire enum value.
    pub fn number(self) -> i32 {
        match self {
            Self::User => 1,
            Self::ServiceAccount => 2,
            Self::ApiKey => 3,
            Self::System => 4,
        }
    }

    /// From the wire enum value (unspecified is SYSTEM).
    pub fn from_number(n: i32) -> Option<Self> {
        match n {
            0 | 4 => Some(Self::System),
            1 => Some(Self::User),
            2 => Some(Self::ServiceAccount),
            3 => Some(Self::ApiKey),
            _ => None,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::ServiceAccount => "service_account",
            Self::ApiKey => "api_key",
            Self::System => "system",
        }
    }

    fn from_word(w: &str) -> Option<Self> {
        [Self::User, Self::ServiceAccount, Self::ApiKey, Self::System]
            .into_iter()
            .find(|k| k.word() == w)
    }
}

/// How an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It happened.
    Success,
    /// It failed.
    Failure,
    /// It was refused.
    Denied,
}

impl Outcome {
    /// The wire enum value (also stored).
    pub fn number(self) -> i32 {
        match self {
            Self::Success => 1,
            Self::Failure => 2,
            Self::Denied => 3,
        }
    }

    /// From the wire enum value.
    pub fn from_number(n: i32) -> Option<Self> {
        match n {
            1 => Some(Self::Success),
            2 => Some(Self::Failure),
            3 => Some(Self::Denied),
            _ => None,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Denied => "denied",
        }
    }

    fn from_word(w: &str) -> Option<Self> {
        [Self::Success, Self::Failure, Self::Denied]
            .into_iter()
            .find(|o| o.word() == w)
    }
}

/// An audit event, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Unique id (the idempotency key).
    pub id: String,
    /// When it happened, ms since the epoch.
    pub time_ms: i64,
    /// Tenant, or empty.
    pub tenant: String,
    /// Actor's subject id.
    pub actor_id: String,
    /// Actor's kind.
    pub actor_kind: ActorKind,
    /// Client address.
    pub actor_ip: String,
    /// Client user agent.
    pub actor_user_agent: String,
    /// Dotted action name.
    pub action: String,
    /// Resource type.
    pub resource_type: String,
    /// Resource name.
    pub resource_name: String,
    /// Outcome.
    pub outcome: Outcome,
    /// Why.
    pub reason: String,
    /// Correlation id.
    pub correlation_id: String,
    /// Trace id.
    pub trace_id: String,
    /// Reporting service.
    pub source: String,
    /// Anything else.
    pub metadata: Map<String, Value>,
}

/// The longest each text field may be, in bytes, by its wire name.
const LIMITS: &[(&str, usize)] = &[
    ("id", 128),
    ("tenant", 128),
    ("actor.id", 256),
    ("actor.ip", 64),
    ("actor.user_agent", 512),
    ("action", 128),
    ("resource.type", 128),
    ("resource.name", 512),
    ("reason", 1024),
    ("correlation_id", 128),
    ("trace_id", 64),
    ("source", 64),
];

/// Whether `action` is dotted lowercase words: `config.value.set`.
pub fn valid_action(action: &str) -> bool {
    let words: Vec<&str> = action.split('.').collect();
    words.len() >= 2
        && words.iter().all(|w| {
            !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        })
}

impl Event {
    /// Checks bounds; violations name fields under `prefix` (e.g. `events[3].`).
    pub fn check(&self, prefix: &str, out: &mut Vec<FieldViolation>) {
        let values = [
            &self.id,
            &self.tenant,
            &self.actor_id,
            &self.actor_ip,
            &self.actor_user_agent,
            &self.action,
            &self.resource_type,
            &self.resource_name,
            &self.reason,
            &self.correlation_id,
            &self.trace_id,
            &self.source,
        ];
        for ((field, max), value) in LIMITS.iter().zip(values) {
            if value.len() > *max {
                out.push(FieldViolation::new(
                    format!("{prefix}{field}"),
                    format!("must be at most {max} bytes"),
                ));
            }
            if value.chars().any(char::is_control) {
                out.push(FieldViolation::new(
                    format!("{prefix}{field}"),
                    "must not contain control characters",
                ));
            }
        }
        if self.action.is_empty() {
            out.push(FieldViolation::new(format!("{prefix}action"), "is required"));
        } else if !valid_action(&self.action) {
            out.push(FieldViolation::new(
                format!("{prefix}action"),
                "must be dotted lowercase words, e.g. config.value.set",
            ));
        }
        if Value::Object(self.metadata.clone()).to_string().len() > MAX_METADATA_BYTES {
            out.push(FieldViolation::new(
                format!("{prefix}metadata"),
                format!("must be at most {MAX_METADATA_BYTES} bytes as JSON"),
            ));
        }
    }

    /// The canonical bytes: compact JSON, keys sorted at every depth.
    pub fn canonical(&self) -> Vec<u8> {
        let mut actor = BTreeMap::new();
        actor.insert("id", Value::from(self.actor_id.as_str()));
        actor.insert("ip", Value::from(self.actor_ip.as_str()));
        actor.insert("kind", Value::from(self.actor_kind.word()));
        actor.insert("user_agent", Value::from(self.actor_user_agent.as_str()));
        let mut resource = BTreeMap::new();
        resource.insert("name", Value::from(self.resource_name.as_str()));
        resource.insert("type", Value::from(self.resource_type.as_str()));
        let time = jiff::Timestamp::from_millisecond(self.time_ms)
            .map(|t| format!("{t:.3}"))
            .unwrap_or_default();
        let fields: [(&str, Value); 13] = [
            ("action", Value::from(self.action.as_str())),
            ("actor", object(actor)),
            ("correlation_id", Value::from(self.correlation_id.as_str())),
            ("id", Value::from(self.id.as_str())),
            ("metadata", Value::Object(self.metadata.clone())),
            ("outcome", Value::from(self.outcome.word())),
            ("reason", Value::from(self.reason.as_str())),
            ("resource", object(resource)),
            ("source", Value::from(self.source.as_str())),
            ("tenant", Value::from(self.tenant.as_str())),
            ("time", Value::from(time)),
            ("time_ms", Value::from(self.time_ms)),
            ("trace_id", Value::from(self.trace_id.as_str())),
        ];
        let mut out = String::new();
        write_sorted(&object(fields.into_iter().collect()), &mut out);
        out.into_bytes()
    }

    /// Parses canonical bytes back.
    pub fn from_canonical(bytes: &[u8]) -> Result<Self, AuditError> {
        let bad = |what: &str| AuditError::Corrupt(format!("canonical entry bytes: {what}"));
        let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(&e.to_string()))?;
        let text = |v: &Value, key: &str| -> Result<String, AuditError> {
            v.get(key)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| bad(&format!("`{key}` is missing")))
        };
        let actor = v.get("actor").ok_or_else(|| bad("`actor` is missing"))?;
        let resource = v.get("resource").ok_or_else(|| bad("`resource` is missing"))?;
        Ok(Self {
            id: text(&v, "id")?,
            time_ms: v
                .get("time_ms")
                .and_then(Value::as_i64)
                .ok_or_else(|| bad("`time_ms` is missing"))?,
            tenant: text(&v, "tenant")?,
            actor_id: text(actor, "id")?,
            actor_kind: ActorKind::from_word(&text(actor, "kind")?).ok_or_else(|| bad("unknown actor kind"))?,
            actor_ip: text(actor, "ip")?,
            actor_user_agent: text(actor, "user_agent")?,
            action: text(&v, "action")?,
            resource_type: text(resource, "type")?,
            resource_name: text(resource, "name")?,
            outcome: Outcome::from_word(&text(&v, "outcome")?).ok_or_else(|| bad("unknown outcome"))?,
            reason: text(&v, "reason")?,
            correlation_id: text(&v, "correlation_id")?,
            trace_id: text(&v, "trace_id")?,
            source: text(&v, "source")?,
            metadata: v
                .get("metadata")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        })
    }
}

/// A JSON value's object, or an empty one.
pub fn json_object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn object(m: BTreeMap<&str, Value>) -> Value {
    Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

/// Compact JSON with object keys sorted, whatever order the map keeps.
fn write_sorted(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::from(k.as_str()).to_string());
                out.push(':');
                if let Some(v) = m.get(k) {
                    write_sorted(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_sorted(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Position in the log.
    pub index: u64,
    /// The event (from the bytes; only id, time and action once erased).
    pub event: Event,
    /// The canonical bytes; `None` once erased.
    pub data: Option<Vec<u8>>,
    /// The leaf hash.
    pub leaf_hash: [u8; 32],
}

/// The result of appending one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Its index.
    pub index: u64,
    /// Its id.
    pub id: String,
    /// Whether it was there already.
    pub duplicate: bool,
}

/// Filters of a listing; empty strings and `None` match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// At or after, ms.
    pub start_ms: Option<i64>,
    /// Before, ms.
    pub end_ms: Option<i64>,
    /// Actor id.
    pub actor_id: String,
    /// Action prefix.
    pub action_prefix: String,
    /// Resource type.
    pub resource_type: String,
    /// Resource name.
    pub resource_name: String,
    /// Outcome.
    pub outcome: Option<Outcome>,
    /// Correlation id.
    pub correlation_id: String,
    /// Tenant.
    pub tenant: String,
}

/// Erase entries matching these once older than `retain_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Its name.
    pub name: String,
    /// Actions starting with this (empty: all).
    pub action_prefix: String,
    /// Only this tenant (empty: all).
    pub tenant: String,
    /// How long entries stay whole.
    pub retain_ms: i64,
    /// When it was set, ms.
    pub updated_ms: i64,
}

/// The shortest retention a policy may set: one hour.
pub const MIN_RETAIN_MS: i64 = 3_600_000;

/// Whether `name` is a policy name: lowercase letters, digits and `-`, 1–63.
pub fn valid_policy_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Which entries an erasure covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Erasure {
    /// A policy's entries older than a cutoff (ms).
    Expired {
        /// Actions starting with this.
        action_prefix: String,
        /// Only this tenant, when not empty.
        tenant: String,
        /// Entries before this time.
        before_ms: i64,
    },
    /// Every entry whose actor or resource is this subject.
    Subject(String),
}

/// What `VerifyLog` found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verification {
    /// Entries whose bytes were re-hashed.
    pub entries_checked: u64,
    /// Checkpoints whose root and signature were checked.
    pub checkpoints_checked: u64,
    /// The first entry that no longer matches the tree.
    pub first_bad_index: Option<u64>,
    /// What is wrong.
    pub problem: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            id: "e1".into(),
            time_ms: 1_700_000_000_123,
            tenant: String::new(),
            actor_id: "u1".into(),
            actor_kind: ActorKind::User,
            actor_ip: "10.0.0.1".into(),
            actor_user_agent: "curl".into(),
            action: "config.value.set".into(),
            resource_type: "config.value".into(),
            resource_name: "app/prod/db.url".into(),
            outcome: Outcome::Success,
            reason: String::new(),
            correlation_id: "c1".into(),
            trace_id: String::new(),
            source: "config".into(),
            metadata: serde_json::json!({"z": 1, "a": {"y": [2, 1], "b": null}})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        }
    }

    #[test]
    fn canonical_bytes_sort_keys_and_round_trip() {
        let e = event();
        let bytes = e.canonical();
        let text = String::from_utf8(bytes.clone()).unwrap_or_default();
        assert!(
            text.starts_with(r#"{"action":"config.value.set","actor":{"id":"u1""#),
            "{text}"
        );
        assert!(
            text.contains(r#""metadata":{"a":{"b":null,"y":[2,1]},"z":1}"#),
            "{text}"
        );
        assert!(text.contains(r#""time":"2023-11-14T22:13:20.123Z""#), "{text}");
        assert_eq!(Event::from_canonical(&bytes).ok(), Some(e));
    }

    #[test]
    fn actions_are_dotted_lowercase_words() {
        assert!(valid_action("auth.login.failed"));
        assert!(!valid_action("auth"));
        assert!(!valid_action("Auth.Login"));
        assert!(!valid_action("auth..x"));
    }
}
