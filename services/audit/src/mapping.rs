//! How each Plinth event on the bus reads as an audit event: who acted, on
//! what, with which outcome. The bus event's id becomes the audit event's
//! id, so a redelivery lands on the same entry. Subjects this table does
//! not know are still recorded (as `<service>.<event>` by the system, with
//! the payload in base64), so a new event type is never lost while this
//! table catches up. Secrets never enter the log: the password reset
//! token is dropped here.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use plinth::ai::v1 as ai;
use plinth::auth::v1 as auth;
use plinth::config::v1 as config;
use plinth::queue::v1 as queue;
use plinth_runtime::events::Event as BusEvent;
use prost::Message;
use serde_json::{Map, Value, json};

use crate::model::{ActorKind, Event, MAX_METADATA_BYTES, Outcome};

/// The subjects of the audit service's own events, never recorded (they
/// would feed back into the log).
const OWN_SUBJECTS: &str = "plinth.audit.";

/// Whether `subject` is worth recording: everything but the audit service's
/// own events. Refusals of audit RPCs are recorded like any other service's
/// (recording one causes no further event).
pub fn recorded(subject: &str) -> bool {
    !subject.starts_with(OWN_SUBJECTS) || subject.ends_with(".access_denied")
}

fn ms(t: Option<&prost_types::Timestamp>) -> Option<i64> {
    t.map(|t| {
        t.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(t.nanos / 1_000_000))
    })
}

/// The trace id of a W3C `traceparent` header (`00-<trace>-<span>-<flags>`).
fn trace_id(e: &BusEvent) -> String {
    e.headers
        .get("traceparent")
        .and_then(|t| t.split('-').nth(1))
        .filter(|t| t.len() == 32)
        .map(str::to_owned)
        .unwrap_or_default()
}

/// The parts of an audit event a mapping decides.
struct Mapped {
    action: String,
    time: Option<i64>,
    actor: (String, ActorKind),
    resource: (&'static str, String),
    outcome: Outcome,
    reason: String,
    tenant: String,
    metadata: Map<String, Value>,
}

impl Mapped {
    fn new(action: &str, time: Option<&prost_types::Timestamp>) -> Self {
        Self {
            action: action.to_owned(),
            time: ms(time),
            actor: (String::new(), ActorKind::System),
            resource: ("", String::new()),
            outcome: Outcome::Success,
            reason: String::new(),
            tenant: String::new(),
            metadata: Map::new(),
        }
    }
    fn by(mut self, id: &str, kind: ActorKind) -> Self {
        self.actor = (id.to_owned(), if id.is_empty() { ActorKind::System } else { kind });
        self
    }
    fn on(mut self, kind: &'static str, name: impl Into<String>) -> Self {
        self.resource = (kind, name.into());
        self
    }
    fn ended(mut self, outcome: Outcome, reason: &str) -> Self {
        self.outcome = outcome;
        self.reason = reason.to_owned();
        self
    }
    fn in_tenant(mut self, tenant: &str) -> Self {
        tenant.clone_into(&mut self.tenant);
        self
    }
    fn with(mut self, v: Value) -> Self {
        self.metadata = crate::model::json_object(v);
        self
    }
}

fn config_event(name: &str, payload: &[u8]) -> Option<Mapped> {
    Some(match name {
        "changed" => {
            let e = config::ConfigChangedEvent::decode(payload).ok()?;
            Mapped::new("config.values.changed", e.time.as_ref())
                .by(&e.author, ActorKind::User)
                .on("config.environment", format!("{}/{}", e.namespace, e.environment))
                .with(json!({"revision": e.revision, "keys": e.keys, "kind": e.kind, "message": e.message}))
        }
        "secret_revealed" => {
            let e = config::SecretRevealedEvent::decode(payload).ok()?;
            Mapped::new("config.secrets.revealed", e.time.as_ref())
                .by(&e.subject, ActorKind::User)
                .on("config.environment", format!("{}/{}", e.namespace, e.environment))
                .with(json!({"keys": e.keys, "method": e.method}))
        }
        "namespace_changed" | "environment_changed" | "release_created" | "schema_changed" | "key_rotated" => {
            let e = config::ConfigAdminEvent::decode(payload).ok()?;
            let resource = if e.environment.is_empty() {
                e.namespace.clone()
            } else {
                format!("{}/{}", e.namespace, e.environment)
            };
            Mapped::new(&format!("config.{name}"), e.time.as_ref())
                .by(&e.subject, ActorKind::User)
                .on("config.namespace", resource)
                .with(json!({"detail": e.detail}))
        }
        _ => return None,
    })
}

fn auth_event(name: &str, payload: &[u8]) -> Option<Mapped> {
    Some(match name {
        "user_registered" => {
            let e = auth::UserRegisteredEvent::decode(payload).ok()?;
            Mapped::new("auth.user.registered", e.time.as_ref())
                .by(&e.user_id, ActorKind::User)
                .on("auth.user", &e.user_id)
                .with(json!({"email": e.email, "phone": e.phone}))
        }
        "login_succeeded" => {
            let e = auth::LoginSucceededEvent::decode(payload).ok()?;
            Mapped::new("auth.login.succeeded", e.time.as_ref())
                .by(&e.user_id, ActorKind::User)
                .on("auth.session", &e.session_id)
        }
        "login_failed" => {
            let e = auth::LoginFailedEvent::decode(payload).ok()?;
            let who = if e.user_id.is_empty() {
                if e.email.is_empty() {
                    e.phone.clone()
                } else {
                    e.email.clone()
                }
            } else {
                e.user_id.clone()
            };
            Mapped::new("auth.login.failed", e.time.as_ref())
                .by(&who, ActorKind::User)
                .on("auth.user", who.clone())
                .ended(Outcome::Failure, &e.reason)
                .with(json!({"email": e.email, "phone": e.phone}))
        }
        "lockout" => {
            let e = auth::LockoutEvent::decode(payload).ok()?;
            let who = if e.email.is_empty() {
                e.phone.clone()
            } else {
                e.email.clone()
            };
            Mapped::new("auth.login.locked_out", e.time.as_ref())
                .on("auth.user", who)
                .ended(
                    Outcome::Denied,
                    &format!("too many failed logins ({} lockout)", e.scope),
                )
                .with(json!({"scope": e.scope, "duration_secs": e.duration_secs}))
        }
        "session_revoked" => {
            let e = auth::SessionRevokedEvent::decode(payload).ok()?;
            Mapped::new("auth.session.revoked", e.time.as_ref())
                .by(&e.user_id, ActorKind::User)
                .on("auth.session", &e.session_id)
                .ended(Outcome::Success, &e.reason)
        }
        "token_refreshed" => {
            let e = auth::TokenRefreshedEvent::decode(payload).ok()?;
            Mapped::new("auth.token.refreshed", e.time.as_ref())
                .by(&e.user_id, ActorKind::User)
                .on("auth.session", &e.session_id)
                .with(json!({"within_grace": e.within_grace}))
        }
        "token_revoked" => {
            let e = auth::TokenRevokedEvent::decode(payload).ok()?;
            Mapped::new("auth.token.revoked", e.time.as_ref())
                .by(&e.user_id, ActorKind::User)
                .on("auth.token", &e.token_id)
        }
        "api_key_created" | "api_key_revoked" => {
            let (user_id, key_id, time, scopes) = if name == "api_key_created" {
                let e = auth::ApiKeyCreatedEvent::decode(payload).ok()?;
                (e.user_id, e.key_id, e.time, e.scopes)
            } else {
                let e = auth::ApiKeyRevokedEvent::decode(payload).ok()?;
                (e.user_id, e.key_id, e.time, Vec::new())
            };
            let verb = name.trim_start_matches("api_key_");
            Mapped::new(&format!("auth.api_key.{verb}"), time.as_ref())
                .by(&user_id, ActorKind::User)
                .on("auth.api_key", key_id)
                .with(json!({"scopes": scopes}))
        }
        "password_reset_requested" => {
            // The token is for delivery only; it never enters the log.
            let e = auth::PasswordResetRequestedEvent::decode(payload).ok()?;
            Mapped::new("auth.password.reset_requested", e.time.as_ref())
                .on("auth.user", &e.user_id)
                .with(json!({"email": e.email, "phone": e.phone}))
        }
        "password_changed" => {
            let e = auth::PasswordChangedEvent::decode(payload).ok()?;
            Mapped::new("auth.password.changed", e.time.as_ref())
                .by(&e.user_id, ActorKind::User)
                .on("auth.user", &e.user_id)
                .with(json!({"how": e.how}))
        }
        "user_updated" => {
            let e = auth::UserUpdatedEvent::decode(payload).ok()?;
            Mapped::new("auth.user.updated", e.time.as_ref())
                .by(&e.actor_id, ActorKind::User)
                .on("auth.user", &e.user_id)
                .with(json!({"fields": e.fields, "status": e.status}))
        }
        "signing_key_rotated" => {
            let e = auth::SigningKeyRotatedEvent::decode(payload).ok()?;
            Mapped::new("auth.signing_key.rotated", e.time.as_ref())
                .on("auth.signing_key", &e.kid)
                .with(json!({"trigger": e.trigger, "activate_time_ms": ms(e.activate_time.as_ref())}))
        }
        "role_changed" => {
            let e = auth::RoleChangedEvent::decode(payload).ok()?;
            Mapped::new(&format!("auth.role.{}", e.action), e.time.as_ref())
                .by(&e.actor_id, ActorKind::User)
                .on("auth.role", &e.role)
        }
        "role_binding_changed" => {
            let e = auth::RoleBindingChangedEvent::decode(payload).ok()?;
            Mapped::new(&format!("auth.role_binding.{}", e.action), e.time.as_ref())
                .by(&e.actor_id, ActorKind::User)
                .on("auth.role_binding", format!("{}:{}", e.subject, e.role))
                .with(json!({"subject": e.subject, "role": e.role, "scope": e.scope}))
        }
        _ => return None,
    })
}

fn queue_event(name: &str, payload: &[u8]) -> Option<Mapped> {
    Some(match name {
        "dead_lettered" => {
            let e = queue::MessageDeadLetteredEvent::decode(payload).ok()?;
            Mapped::new("queue.message.dead_lettered", e.time.as_ref())
                .on("queue.message", format!("{}/{}", e.queue, e.message_id))
                .ended(Outcome::Failure, &e.reason)
                .with(json!({"attempts": e.attempts, "last_error": e.last_error, "dead_letter_queue": e.dead_letter_queue}))
        }
        "depth_alert" => {
            let e = queue::DepthAlertEvent::decode(payload).ok()?;
            let verb = if e.raised { "raised" } else { "cleared" };
            Mapped::new(&format!("queue.depth_alert.{verb}"), e.time.as_ref())
                .on("queue.queue", &e.queue)
                .with(json!({"depth": e.depth, "threshold": e.threshold}))
        }
        "queue_changed" => {
            let e = queue::QueueChangedEvent::decode(payload).ok()?;
            Mapped::new(&format!("queue.queue.{}", e.change), e.time.as_ref())
                .by(&e.subject, ActorKind::User)
                .on("queue.queue", &e.queue)
                .with(json!({"messages": e.messages}))
        }
        _ => return None,
    })
}

fn ai_event(name: &str, payload: &[u8]) -> Option<Mapped> {
    Some(match name {
        "usage.recorded" => {
            let e = ai::UsageRecordedEvent::decode(payload).ok()?;
            let (outcome, reason) = match e.outcome.as_str() {
                "failure" => (Outcome::Failure, e.error.as_str()),
                "cancelled" => (Outcome::Success, "cancelled by the caller"),
                _ => (Outcome::Success, ""),
            };
            let kind = if e.api_key.is_empty() {
                ActorKind::User
            } else {
                ActorKind::ApiKey
            };
            let usage = e.usage.unwrap_or_default();
            Mapped::new(&format!("ai.{}", action_word(&e.operation)), e.time.as_ref())
                .by(&e.subject, kind)
                .on("ai.model", &e.model)
                .ended(outcome, reason)
                .with(json!({
                    "call": e.id, "provider": e.provider, "provider_model": e.provider_model,
                    "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                    "cached_input_tokens": usage.cached_input_tokens, "cost_usd": e.cost_usd,
                    "latency_ms": e.latency_ms, "fallback_path": e.fallback_path, "estimated": e.estimated,
                    "api_key": e.api_key,
                }))
        }
        _ => return None,
    })
}

/// Lowercases and replaces what an action may not contain.
fn action_word(s: &str) -> String {
    let w: String = s
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if w.is_empty() { "_".into() } else { w }
}

/// Any service's shared auth layer refused a caller an RPC for a missing permission.
fn access_denied(service: &str, payload: &[u8]) -> Option<Mapped> {
    let e = auth::AccessDeniedEvent::decode(payload).ok()?;
    let kind = if e.api_key_id.is_empty() {
        ActorKind::User
    } else {
        ActorKind::ApiKey
    };
    Some(
        Mapped::new(&format!("{}.access.denied", action_word(service)), e.time.as_ref())
            .by(&e.subject, kind)
            .on("rpc", &e.rpc)
            .ended(Outcome::Denied, &format!("missing permission {}", e.permission))
            .in_tenant(&e.tenant)
            .with(json!({"permission": e.permission, "api_key_id": e.api_key_id, "roles": e.roles})),
    )
}

/// The audit event a bus event stands for; `now_ms` when it carries no time.
pub fn audit_event(e: &BusEvent, now_ms: i64) -> Event {
    let mut parts = e.subject.splitn(3, '.');
    let (_, service, name) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let known = match service {
        _ if name == "access_denied" => access_denied(service, &e.payload),
        "config" => config_event(name, &e.payload),
        "auth" => auth_event(name, &e.payload),
        "queue" => queue_event(name, &e.payload),
        "ai" => ai_event(name, &e.payload),
        _ => None,
    };
    let m = known.unwrap_or_else(|| {
        let action = format!(
            "{}.{}",
            action_word(service),
            name.split('.').map(action_word).collect::<Vec<_>>().join(".")
        );
        let payload = if e.payload.len() * 4 / 3 < MAX_METADATA_BYTES - 64 {
            STANDARD.encode(&e.payload)
        } else {
            String::new()
        };
        Mapped::new(&action, None).with(json!({"subject": e.subject, "payload_base64": payload}))
    });
    let mut action = m.action;
    if !crate::model::valid_action(&action) {
        action = format!("{}.event", action_word(service));
    }
    Event {
        id: if e.id.is_empty() {
            uuid::Uuid::now_v7().to_string()
        } else {
            e.id.clone()
        },
        time_ms: m.time.filter(|t| *t > 0).unwrap_or(now_ms),
        tenant: m.tenant.chars().take(128).collect(),
        actor_id: m.actor.0.chars().take(256).collect(),
        actor_kind: m.actor.1,
        actor_ip: String::new(),
        actor_user_agent: String::new(),
        action,
        resource_type: m.resource.0.to_owned(),
        resource_name: m.resource.1.chars().take(512).collect(),
        outcome: m.outcome,
        reason: m.reason.chars().take(1024).collect(),
        correlation_id: e.headers.get("x-correlation-id").cloned().unwrap_or_default(),
        trace_id: trace_id(e),
        source: action_word(service),
        metadata: m.metadata,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn bus(subject: &str, payload: Vec<u8>) -> BusEvent {
        BusEvent {
            id: "ev-1".into(),
            subject: subject.into(),
            payload: payload.into(),
            headers: BTreeMap::from([(
                "traceparent".to_owned(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            )]),
        }
    }

    #[test]
    fn a_config_change_names_its_author_environment_and_keys() {
        let payload = config::ConfigChangedEvent {
            namespace: "shop".into(),
            environment: "prod".into(),
            revision: 7,
            keys: vec!["db.url".into()],
            author: "u_1".into(),
            kind: "write".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let e = audit_event(&bus("plinth.config.changed", payload), 5);
        assert_eq!(e.id, "ev-1");
        assert_eq!(e.action, "config.values.changed");
        assert_eq!((e.actor_id.as_str(), e.actor_kind), ("u_1", ActorKind::User));
        assert_eq!(
            (e.resource_type.as_str(), e.resource_name.as_str()),
            ("config.environment", "shop/prod")
        );
        assert_eq!(e.metadata.get("revision"), Some(&json!(7)));
        assert_eq!(e.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(e.time_ms, 5);
    }

    #[test]
    fn a_refusal_by_any_service_is_recorded_as_denied_with_the_missing_permission() {
        let payload = auth::AccessDeniedEvent {
            rpc: "/plinth.queue.v1.QueueService/PurgeQueue".into(),
            permission: "queue.messages.purge".into(),
            subject: "u_7".into(),
            tenant: "acme".into(),
            api_key_id: "key_3".into(),
            roles: vec!["viewer".into()],
            time: Some(prost_types::Timestamp { seconds: 2, nanos: 0 }),
        }
        .encode_to_vec();
        let e = audit_event(&bus("plinth.queue.access_denied", payload), 1);
        assert_eq!(e.action, "queue.access.denied");
        assert_eq!(e.outcome, Outcome::Denied);
        assert_eq!(e.reason, "missing permission queue.messages.purge");
        assert_eq!((e.actor_id.as_str(), e.actor_kind), ("u_7", ActorKind::ApiKey));
        assert_eq!(
            (e.resource_type.as_str(), e.resource_name.as_str()),
            ("rpc", "/plinth.queue.v1.QueueService/PurgeQueue")
        );
        assert_eq!(e.tenant, "acme");
        assert_eq!(e.source, "queue");
        assert_eq!(e.time_ms, 2000);
        assert_eq!(e.metadata.get("api_key_id"), Some(&json!("key_3")));
    }

    #[test]
    fn an_ai_call_is_recorded_with_its_tokens_cost_and_caller() {
        let payload = ai::UsageRecordedEvent {
            id: "gen-1".into(),
            subject: "u_9".into(),
            api_key: "key_1".into(),
            operation: "generate_stream".into(),
            model: "chat".into(),
            provider: "backup".into(),
            usage: Some(ai::Usage {
                input_tokens: 12,
                output_tokens: 5,
                ..Default::default()
            }),
            cost_usd: 0.25,
            outcome: "failure".into(),
            error: "stream broke".into(),
            fallback_path: vec!["primary/gpt-p".into()],
            ..Default::default()
        }
        .encode_to_vec();
        let e = audit_event(&bus("plinth.ai.usage.recorded", payload), 1);
        assert_eq!(e.action, "ai.generate_stream");
        assert_eq!((e.actor_id.as_str(), e.actor_kind), ("u_9", ActorKind::ApiKey));
        assert_eq!(
            (e.resource_type.as_str(), e.resource_name.as_str()),
            ("ai.model", "chat")
        );
        assert_eq!(e.outcome, Outcome::Failure);
        assert_eq!(e.metadata.get("output_tokens"), Some(&json!(5)));
        assert_eq!(e.metadata.get("fallback_path"), Some(&json!(["primary/gpt-p"])));
    }

    #[test]
    fn a_failed_login_is_a_failure_and_a_reset_token_never_enters_the_log() {
        let failed = auth::LoginFailedEvent {
            email: "a@b.c".into(),
            reason: "BAD_PASSWORD".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let e = audit_event(&bus("plinth.auth.login_failed", failed), 1);
        assert_eq!((e.action.as_str(), e.outcome), ("auth.login.failed", Outcome::Failure));
        assert_eq!(e.reason, "BAD_PASSWORD");

        let reset = auth::PasswordResetRequestedEvent {
            user_id: "u_2".into(),
            token: "very-secret-token".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let e = audit_event(&bus("plinth.auth.password_reset_requested", reset), 1);
        let bytes = String::from_utf8(e.canonical()).unwrap_or_default();
        assert!(!bytes.contains("very-secret-token"), "{bytes}");
    }

    #[test]
    fn unknown_subjects_are_kept_with_their_payload() {
        let e = audit_event(&bus("plinth.billing.Invoice.Paid", vec![1, 2, 3]), 1);
        assert_eq!(e.action, "billing.invoice.paid");
        assert_eq!(e.metadata.get("payload_base64"), Some(&json!("AQID")));
        assert_eq!(e.actor_kind, ActorKind::System);
    }
}
