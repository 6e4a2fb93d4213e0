//! Wire ↔ domain conversions: requests into validated domain values (naming
//! the offending field), domain values into answers.

use plinth::config::v1 as pb;
use plinth_runtime::wire::{json_of_struct, json_of_value, struct_of_json, value_of_json};

use crate::error::ConfigError;
use crate::formats::Format;
use crate::model::{
    ClientIdentity, EnvId, Environment, Mutation, Namespace, NewValue, Plain, Precondition, ReadAt, Release,
    RevisionInfo, Rollout, RolloutState, Stored, check_key, check_name, check_prefix,
};
use crate::service::Shown;

pub use plinth_runtime::wire::timestamp;

/// Checks and names a namespace/environment pair.
pub fn env_id(namespace: &str, environment: &str) -> Result<EnvId, ConfigError> {
    check_name("namespace", namespace)?;
    check_name("environment", environment)?;
    Ok(EnvId::new(namespace, environment))
}

/// A page size: default when 0, refused when negative or too large.
pub fn page_size(field: &str, size: i32, default: i32) -> Result<usize, ConfigError> {
    Ok(plinth_runtime::wire::page_size(field, size, default)?)
}

/// An etag as the generation it names (empty: 0, unchecked).
pub fn generation(field: &str, etag: &str) -> Result<i64, ConfigError> {
    if etag.is_empty() {
        return Ok(0);
    }
    etag.trim_matches('"')
        .parse::<i64>()
        .ok()
        .filter(|g| *g > 0)
        .ok_or_else(|| ConfigError::invalid(field, "is not an etag this service issued"))
}

/// A revision-number cursor; `field` names it.
pub fn revision_token(field: &str, token: &str) -> Result<i64, ConfigError> {
    if token.is_empty() {
        return Ok(0);
    }
    token
        .parse::<i64>()
        .ok()
        .filter(|r| *r > 0)
        .ok_or_else(|| ConfigError::invalid(field, "is not a token from a previous page"))
}

/// Which state a read asks for.
pub fn read_at(r: Option<&pb::ReadAt>) -> Result<ReadAt, ConfigError> {
    let Some(r) = r else {
        return Ok(ReadAt::Head { min_revision: 0 });
    };
    if r.revision < 0 {
        return Err(ConfigError::invalid("read_at.revision", "must not be negative"));
    }
    if r.min_revision < 0 {
        return Err(ConfigError::invalid("read_at.min_revision", "must not be negative"));
    }
    if let Some(c) = &r.client {
        if r.revision != 0 || !r.release.is_empty() {
            return Err(ConfigError::invalid(
                "read_at.client",
                "give a client, a revision or a release, not several",
            ));
        }
        return Ok(ReadAt::Client(client("read_at.client", c)?));
    }
    match (r.revision, r.release.as_str()) {
        (0, "") => Ok(ReadAt::Head {
            min_revision: r.min_revision,
        }),
        (rev, "") => Ok(ReadAt::Revision(rev)),
        (0, name) => {
            if name != crate::model::LATEST_RELEASE {
                crate::model::check_release_name("read_at.release", name)?;
            }
            Ok(ReadAt::Release(name.to_owned()))
        }
        _ => Err(ConfigError::invalid(
            "read_at.release",
            "give a revision or a release, not both",
        )),
    }
}

/// A wire value as a value to write.
pub fn new_value(field: &str, v: Option<&pb::Value>) -> Result<NewValue, ConfigError> {
    use pb::value::Kind;
    let kind = v.and_then(|v| v.kind.as_ref()).ok_or_else(|| {
        ConfigError::invalid(
            field,
            "is required (one of string_value, number_value, bool_value, json_value, secret_value)",
        )
    })?;
    Ok(match kind {
        Kind::StringValue(s) => NewValue::Plain(Plain::String(s.clone())),
        Kind::NumberValue(n) if n.is_finite() => NewValue::Plain(Plain::Number(*n)),
        Kind::NumberValue(_) => return Err(ConfigError::invalid(format!("{field}.number_value"), "must be finite")),
        Kind::BoolValue(b) => NewValue::Plain(Plain::Bool(*b)),
        Kind::JsonValue(j) => NewValue::Plain(Plain::Json(json_of_value(&format!("{field}.json_value"), j)?)),
        Kind::SecretValue(s) => NewValue::Secret(s.clone().into()),
    })
}

/// A `Struct` as JSON text (schemas).
pub fn struct_json(s: &prost_types::Struct, field: &str) -> Result<String, ConfigError> {
    Ok(serde_json::Value::Object(json_of_struct(field, s)?).to_string())
}

/// JSON text as a `Struct` (schemas).
pub fn json_struct(text: &str) -> Option<prost_types::Struct> {
    match serde_json::from_str(text).ok()? {
        serde_json::Value::Object(o) => Some(struct_of_json(&o)),
        _ => None,
    }
}

/// A wire precondition.
pub fn precondition(field: &str, p: Option<&pb::Precondition>) -> Result<Precondition, ConfigError> {
    let Some(p) = p else { return Ok(Precondition::default()) };
    if p.expected_version < 0 {
        return Err(ConfigError::invalid(
            format!("{field}.expected_version"),
            "must not be negative",
        ));
    }
    Ok(Precondition {
        expected_version: p.expected_version,
        expected_etag: p.expected_etag.clone(),
        must_not_exist: p.must_not_exist,
    })
}

/// The changes of an ApplyChanges.
pub fn mutations(changes: &[pb::Change]) -> Result<Vec<Mutation>, ConfigError> {
    if changes.is_empty() {
        return Err(ConfigError::invalid("changes", "must hold at least one change"));
    }
    if changes.len() > crate::model::MAX_CHANGES {
        return Err(ConfigError::invalid("changes", "must hold at most 1000 changes"));
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(changes.len());
    for (i, c) in changes.iter().enumerate() {
        check_key(&format!("changes[{i}].key"), &c.key)?;
        if !seen.insert(c.key.as_str()) {
            return Err(ConfigError::invalid(
                format!("changes[{i}].key"),
                "appears more than once",
            ));
        }
        let value = match &c.value {
            None => None,
            Some(v) => Some(new_value(&format!("changes[{i}].value"), Some(v))?),
        };
        out.push(Mutation {
            key: c.key.clone(),
            value,
            precondition: precondition(&format!("changes[{i}].precondition"), c.precondition.as_ref())?,
        });
    }
    Ok(out)
}

/// A prefix filter.
pub fn prefix(field: &str, p: &str) -> Result<String, ConfigError> {
    check_prefix(field, p)?;
    Ok(p.to_owned())
}

/// A wire format.
pub fn format(f: i32) -> Result<Format, ConfigError> {
    match pb::Format::try_from(f) {
        Ok(pb::Format::Json) => Ok(Format::Json),
        Ok(pb::Format::Yaml) => Ok(Format::Yaml),
        Ok(pb::Format::Dotenv) => Ok(Format::Dotenv),
        Ok(pb::Format::Unspecified) | Err(_) => Err(ConfigError::invalid(
            "format",
            "must be FORMAT_JSON, FORMAT_YAML or FORMAT_DOTENV",
        )),
    }
}

/// A key as answered.
pub fn key_value(shown: &Shown) -> pb::KeyValue {
    use pb::value::Kind;
    let e = &shown.entry;
    let (kind, redacted) = match (&e.value, &shown.secret) {
        (Stored::Plain(Plain::String(s)), _) => (Kind::StringValue(s.clone()), false),
        (Stored::Plain(Plain::Number(n)), _) => (Kind::NumberValue(*n), false),
        (Stored::Plain(Plain::Bool(b)), _) => (Kind::BoolValue(*b), false),
        (Stored::Plain(Plain::Json(j)), _) => (Kind::JsonValue(value_of_json(j)), false),
        (Stored::Secret(_), Some(text)) => (Kind::SecretValue(text.clone()), false),
        (Stored::Secret(_), None) => (Kind::SecretValue(String::new()), true),
    };
    pb::KeyValue {
        key: e.key.clone(),
        value: Some(pb::Value { kind: Some(kind) }),
        version: e.version,
        create_revision: e.create_revision,
        mod_revision: e.mod_revision,
        updated_by: e.updated_by.clone(),
        update_time: Some(timestamp(e.updated_at)),
        etag: e.etag(),
        redacted,
    }
}

/// A namespace as answered.
pub fn namespace(n: &Namespace) -> pb::Namespace {
    pb::Namespace {
        name: n.name.clone(),
        description: n.description.clone(),
        create_time: Some(timestamp(n.created_at)),
        update_time: Some(timestamp(n.updated_at)),
        etag: n.generation.to_string(),
    }
}

/// An environment as answered.
pub fn environment(e: &Environment) -> pb::Environment {
    pb::Environment {
        namespace: e.namespace.clone(),
        name: e.name.clone(),
        description: e.description.clone(),
        revision: e.revision,
        compacted_revision: e.compacted_revision,
        key_count: e.key_count,
        create_time: Some(timestamp(e.created_at)),
        update_time: Some(timestamp(e.updated_at)),
        etag: e.generation.to_string(),
    }
}

/// A revision as answered.
pub fn revision(r: &RevisionInfo) -> pb::Revision {
    pb::Revision {
        revision: r.revision,
        author: r.author.clone(),
        message: r.message.clone(),
        create_time: Some(timestamp(r.created_at)),
        keys: r.keys.clone(),
        change_count: r.change_count,
        kind: r.kind.clone(),
    }
}

/// A release as answered.
pub fn release(r: &Release) -> pb::Release {
    pb::Release {
        name: r.name.clone(),
        revision: r.revision,
        description: r.description.clone(),
        created_by: r.created_by.clone(),
        create_time: Some(timestamp(r.created_at)),
        key_count: r.key_count,
    }
}

/// A key's deletion as answered.
pub fn deleted(key: &str, revision: i64) -> pb::KeyValue {
    pb::KeyValue {
        key: key.to_owned(),
        mod_revision: revision,
        ..Default::default()
    }
}

/// Most labels on a client or rollout.
const MAX_LABELS: usize = 32;

/// Checks labels: at most 32, keys and values at most 63 printable characters.
pub fn labels(
    field: &str,
    labels: &std::collections::HashMap<String, String>,
) -> Result<std::collections::BTreeMap<String, String>, ConfigError> {
    if labels.len() > MAX_LABELS {
        return Err(ConfigError::invalid(
            field,
            format!("must hold at most {MAX_LABELS} labels"),
        ));
    }
    let ok = |s: &str, empty_ok: bool| {
        (empty_ok || !s.is_empty()) && s.len() <= 63 && s.chars().all(|c| c.is_ascii_graphic())
    };
    for (k, v) in labels {
        if !ok(k, false) || !ok(v, true) {
            return Err(ConfigError::invalid(
                field,
                format!("label {k:?}: keys and values are at most 63 printable ASCII characters, keys not empty"),
            ));
        }
    }
    Ok(labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// A wire client.
pub fn client(field: &str, c: &pb::Client) -> Result<ClientIdentity, ConfigError> {
    if c.id.len() > 256 {
        return Err(ConfigError::invalid(
            format!("{field}.id"),
            "is longer than 256 characters",
        ));
    }
    if c.id.is_empty() && c.labels.is_empty() {
        return Err(ConfigError::invalid(format!("{field}.id"), "is required (or labels)"));
    }
    Ok(ClientIdentity {
        id: c.id.clone(),
        labels: labels(&format!("{field}.labels"), &c.labels)?,
    })
}

/// A rollout state on the wire.
fn rollout_state(s: RolloutState) -> pb::RolloutState {
    match s {
        RolloutState::Active => pb::RolloutState::Active,
        RolloutState::Paused => pb::RolloutState::Paused,
        RolloutState::Completed => pb::RolloutState::Completed,
        RolloutState::Aborted => pb::RolloutState::Aborted,
    }
}

/// A rollout as answered.
pub fn rollout(r: &Rollout) -> pb::Rollout {
    pb::Rollout {
        release: r.release.clone(),
        percentage: r.percentage,
        labels: r.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        previous_release: r.previous_release.clone(),
        state: rollout_state(r.state).into(),
        updated_by: r.updated_by.clone(),
        create_time: Some(timestamp(r.created_at)),
        update_time: Some(timestamp(r.updated_at)),
    }
}
