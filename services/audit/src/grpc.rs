//! The gRPC face of the audit service: decode, validate into domain values
//! (naming the offending field), call [`Audit`], encode.

use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use plinth::audit::v1 as pb;
use plinth::audit::v1::audit_service_server::AuditService;
use plinth_runtime::auth::{subject_of, unix_now_ms};
use plinth_runtime::error::{FieldViolation, to_status};
use plinth_runtime::wire::{self, duration, duration_ms, json_of_struct, struct_of_json, timestamp, timestamp_ms};

use crate::alerts::{AlertRow, AlertRule, Group};
use crate::error::AuditError;
use crate::model::{
    ActorKind, Appended, Entry, Event, Filter, MAX_BATCH, MIN_RETAIN_MS, Outcome, RetentionPolicy, valid_policy_name,
};
use crate::service::Audit;

fn status(e: AuditError) -> Status {
    to_status(&e)
}

/// The audit service over gRPC.
#[derive(Clone)]
pub struct AuditGrpc {
    audit: Audit,
}

impl AuditGrpc {
    /// Serves `audit`.
    pub fn new(audit: Audit) -> Self {
        Self { audit }
    }
}

/// A wire event as a validated domain event; violations are named under `prefix`.
fn event(prefix: &str, e: &pb::AuditEvent, now_ms: i64, out: &mut Vec<FieldViolation>) -> Option<Event> {
    let actor = e.actor.clone().unwrap_or_default();
    let resource = e.resource.clone().unwrap_or_default();
    let time_ms = match &e.time {
        None => now_ms,
        Some(t) => match timestamp_ms(&format!("{prefix}time"), t) {
            Ok(ms) => ms,
            Err(bad) => {
                out.extend(bad.0);
                return None;
            }
        },
    };
    let Some(actor_kind) = ActorKind::from_number(actor.kind) else {
        out.push(FieldViolation::new(
            format!("{prefix}actor.kind"),
            "is not a known actor kind",
        ));
        return None;
    };
    let Some(outcome) = Outcome::from_number(e.outcome) else {
        out.push(FieldViolation::new(
            format!("{prefix}outcome"),
            "is required: OUTCOME_SUCCESS, OUTCOME_FAILURE or OUTCOME_DENIED",
        ));
        return None;
    };
    let metadata = match e
        .metadata
        .as_ref()
        .map(|m| json_of_struct(&format!("{prefix}metadata"), m))
    {
        None => serde_json::Map::new(),
        Some(Ok(m)) => m,
        Some(Err(bad)) => {
            out.extend(bad.0);
            return None;
        }
    };
    let event = Event {
        id: if e.id.is_empty() {
            uuid::Uuid::now_v7().to_string()
        } else {
            e.id.clone()
        },
        time_ms,
        tenant: e.tenant.clone(),
        actor_id: actor.id,
        actor_kind,
        actor_ip: actor.ip,
        actor_user_agent: actor.user_agent,
        action: e.action.clone(),
        resource_type: resource.r#type,
        resource_name: resource.name,
        outcome,
        reason: e.reason.clone(),
        correlation_id: e.correlation_id.clone(),
        trace_id: e.trace_id.clone(),
        source: e.source.clone(),
        metadata,
    };
    let before = out.len();
    event.check(prefix, out);
    (out.len() == before).then_some(event)
}

fn events(prefix: &str, wire: &[pb::AuditEvent]) -> Result<Vec<Event>, Status> {
    let now = unix_now_ms();
    let mut violations = Vec::new();
    let events: Vec<Event> = wire
        .iter()
        .enumerate()
        .filter_map(|(i, e)| event(&format!("{prefix}[{i}]."), e, now, &mut violations))
        .collect();
    if violations.is_empty() {
        Ok(events)
    } else {
        Err(status(AuditError::Invalid(violations)))
    }
}

fn appended(a: Appended) -> pb::AppendResponse {
    pb::AppendResponse {
        index: i64::try_from(a.index).unwrap_or(i64::MAX),
        id: a.id,
        duplicate: a.duplicate,
    }
}

fn wire_event(e: Event) -> pb::AuditEvent {
    pb::AuditEvent {
        id: e.id,
        time: Some(timestamp(e.time_ms)),
        tenant: e.tenant,
        actor: Some(pb::Actor {
            id: e.actor_id,
            kind: e.actor_kind.number(),
            ip: e.actor_ip,
            user_agent: e.actor_user_agent,
        }),
        action: e.action,
        resource: Some(pb::Resource {
            r#type: e.resource_type,
            name: e.resource_name,
        }),
        outcome: e.outcome.number(),
        reason: e.reason,
        correlation_id: e.correlation_id,
        trace_id: e.trace_id,
        source: e.source,
        metadata: Some(struct_of_json(&e.metadata)),
    }
}

fn wire_entry((e, integrated): (Entry, bool)) -> pb::Entry {
    pb::Entry {
        index: i64::try_from(e.index).unwrap_or(i64::MAX),
        erased: e.data.is_none(),
        leaf_data: e.data.map(Bytes::from).unwrap_or_default(),
        leaf_hash: Bytes::copy_from_slice(&e.leaf_hash),
        event: Some(wire_event(e.event)),
        integrated,
    }
}

fn non_negative(field: &str, n: i64) -> Result<u64, Status> {
    u64::try_from(n).map_err(|_| status(AuditError::invalid(field, "must not be negative")))
}

fn hashes(h: Vec<[u8; 32]>) -> Vec<Bytes> {
    h.into_iter().map(|h| Bytes::copy_from_slice(&h)).collect()
}

/// Why a text parameter is unusable: too long, or holding control characters
/// (which no stored value holds and PostgreSQL text cannot).
/// Why `name` is not a policy or rule name, if it is not.
fn name_problem(field: &str, name: &str) -> Option<FieldViolation> {
    (!valid_policy_name(name)).then(|| FieldViolation::new(field, "must be 1 to 63 lowercase letters, digits or `-`"))
}

fn text_problem(field: &str, value: &str, max: usize) -> Option<FieldViolation> {
    if value.len() > max {
        Some(FieldViolation::new(field, format!("must be at most {max} bytes")))
    } else if value.chars().any(char::is_control) {
        Some(FieldViolation::new(field, "must not contain control characters"))
    } else {
        None
    }
}

/// Filters from the wire, bounded like the fields they match; violations
/// are named under `filter.`.
fn filter(f: Option<&pb::EventFilter>) -> Result<Filter, Status> {
    let default = pb::EventFilter::default();
    let r = f.unwrap_or(&default);
    let mut bad = Vec::new();
    let texts = [
        ("filter.actor_id", &r.actor_id, 256),
        ("filter.action_prefix", &r.action_prefix, 128),
        ("filter.resource_type", &r.resource_type, 128),
        ("filter.resource_name", &r.resource_name, 512),
        ("filter.correlation_id", &r.correlation_id, 128),
        ("filter.tenant", &r.tenant, 128),
    ];
    for (field, value, max) in texts {
        if let Some(v) = text_problem(field, value, max) {
            bad.push(v);
        }
    }
    if !valid_prefix(&r.action_prefix) {
        bad.push(FieldViolation::new(
            "filter.action_prefix",
            "may hold only what actions hold: lowercase letters, digits, `_`, `-` and `.`",
        ));
    }
    let outcome = match r.outcome {
        0 => None,
        n => match Outcome::from_number(n) {
            Some(o) => Some(o),
            None => {
                bad.push(FieldViolation::new("filter.outcome", "is not a known outcome"));
                None
            }
        },
    };
    let mut time = |field: &str, t: Option<&prost_types::Timestamp>| {
        t.and_then(|t| match timestamp_ms(field, t) {
            Ok(ms) => Some(ms),
            Err(e) => {
                bad.extend(e.0);
                None
            }
        })
    };
    let start_ms = time("filter.start_time", r.start_time.as_ref());
    let end_ms = time("filter.end_time", r.end_time.as_ref());
    if !bad.is_empty() {
        return Err(status(AuditError::Invalid(bad)));
    }
    Ok(Filter {
        start_ms,
        end_ms,
        actor_id: r.actor_id.clone(),
        action_prefix: r.action_prefix.clone(),
        resource_type: r.resource_type.clone(),
        resource_name: r.resource_name.clone(),
        outcome,
        correlation_id: r.correlation_id.clone(),
        tenant: r.tenant.clone(),
    })
}

/// The longest retention a policy may set: 100 years.
const MAX_RETAIN_MS: i64 = 100 * 366 * 24 * 3_600_000;

fn valid_prefix(prefix: &str) -> bool {
    prefix
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'))
}

fn wire_policy(p: RetentionPolicy) -> pb::RetentionPolicy {
    pb::RetentionPolicy {
        name: p.name,
        action_prefix: p.action_prefix,
        tenant: p.tenant,
        retain: Some(duration(p.retain_ms)),
        update_time: Some(timestamp(p.updated_ms)),
    }
}

/// A server stream of the service's answers.
type Answers<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AuditService for AuditGrpc {
    async fn append(&self, request: Request<pb::AppendRequest>) -> Result<Response<pb::AppendResponse>, Status> {
        let r = request.into_inner();
        let Some(e) = r.event else {
            return Err(status(AuditError::invalid("event", "is required")));
        };
        let mut violations = Vec::new();
        let Some(event) = event("event.", &e, unix_now_ms(), &mut violations) else {
            return Err(status(AuditError::Invalid(violations)));
        };
        let mut out = self.audit.append(vec![event]).await.map_err(status)?;
        let a = out.pop().ok_or_else(|| Status::internal("append answered nothing"))?;
        Ok(Response::new(appended(a)))
    }

    async fn append_batch(
        &self,
        request: Request<pb::AppendBatchRequest>,
    ) -> Result<Response<pb::AppendBatchResponse>, Status> {
        let r = request.into_inner();
        if r.events.is_empty() || r.events.len() > MAX_BATCH {
            return Err(status(AuditError::invalid(
                "events",
                format!("must hold 1 to {MAX_BATCH} events"),
            )));
        }
        let events = events("events", &r.events)?;
        let out = self.audit.append(events).await.map_err(status)?;
        Ok(Response::new(pb::AppendBatchResponse {
            results: out.into_iter().map(appended).collect(),
        }))
    }

    async fn get_entry(&self, request: Request<pb::GetEntryRequest>) -> Result<Response<pb::GetEntryResponse>, Status> {
        let index = non_negative("index", request.get_ref().index)?;
        let entry = self.audit.entry(index).await.map_err(status)?;
        Ok(Response::new(pb::GetEntryResponse {
            entry: Some(wire_entry(entry)),
        }))
    }

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let r = request.into_inner();
        let filter = filter(r.filter.as_ref())?;
        let limit = wire::page_size("page_size", r.page_size, 100).map_err(|e| status(e.into()))?;
        let cursor = if r.page_token.is_empty() {
            None
        } else {
            let text = wire::page_token_text("page_token", &r.page_token).map_err(|e| status(e.into()))?;
            Some(
                text.parse::<u64>()
                    .map_err(|_| status(AuditError::invalid("page_token", "is not a token from a previous page")))?,
            )
        };
        let page = self
            .audit
            .list(&filter, cursor, r.oldest_first, limit)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListEventsResponse {
            entries: page.entries.into_iter().map(wire_entry).collect(),
            next_page_token: page.next.map(|n| wire::page_token(&n.to_string())).unwrap_or_default(),
        }))
    }

    type StreamEventsStream = Answers<pb::StreamEventsResponse>;

    async fn stream_events(
        &self,
        request: Request<pb::StreamEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        let r = request.into_inner();
        let filter = filter(r.filter.as_ref())?;
        let after = match r.after_index {
            None => self.audit.last_index().await.map_err(status)?,
            Some(-1) => None,
            Some(n) => Some(u64::try_from(n).map_err(|_| {
                status(AuditError::invalid(
                    "after_index",
                    "must be -1 (the whole log) or an index",
                ))
            })?),
        };
        let stream = self.audit.tail(filter, after).map(|r| {
            r.map(|e| pb::StreamEventsResponse {
                entry: Some(wire_entry(e)),
            })
            .map_err(status)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type ExportEventsStream = Answers<pb::ExportEventsResponse>;

    async fn export_events(
        &self,
        request: Request<pb::ExportEventsRequest>,
    ) -> Result<Response<Self::ExportEventsStream>, Status> {
        let r = request.into_inner();
        let filter = filter(r.filter.as_ref())?;
        let checkpoint = self.audit.checkpoint().await.map_err(status)?;
        let first = pb::ExportEventsResponse {
            checkpoint: Some(checkpoint.wire(self.audit.signer().origin())),
            entry: None,
            inclusion_proof: Vec::new(),
        };
        let entries = self.audit.export(filter, &checkpoint).map(|r| {
            r.map(|(entry, proof)| pb::ExportEventsResponse {
                checkpoint: None,
                entry: Some(wire_entry((entry, true))),
                inclusion_proof: hashes(proof),
            })
            .map_err(status)
        });
        Ok(Response::new(Box::pin(
            futures::stream::once(async { Ok(first) }).chain(entries),
        )))
    }

    async fn set_retention_policy(
        &self,
        request: Request<pb::SetRetentionPolicyRequest>,
    ) -> Result<Response<pb::SetRetentionPolicyResponse>, Status> {
        let r = request.into_inner();
        let p = r
            .policy
            .ok_or_else(|| status(AuditError::invalid("policy", "is required")))?;
        let mut bad = Vec::new();
        bad.extend(name_problem("name", &r.name));
        if !p.name.is_empty() && p.name != r.name {
            bad.push(FieldViolation::new(
                "policy.name",
                "must be empty or the same as `name`",
            ));
        }
        if !p.action_prefix.is_empty() && !valid_prefix(&p.action_prefix) {
            bad.push(FieldViolation::new(
                "policy.action_prefix",
                "may hold only what actions hold: lowercase letters, digits, `_`, `-` and `.`",
            ));
        }
        bad.extend(text_problem("policy.action_prefix", &p.action_prefix, 128));
        bad.extend(text_problem("policy.tenant", &p.tenant, 128));
        let retain_ms = match &p.retain {
            None => {
                bad.push(FieldViolation::new("policy.retain", "is required"));
                0
            }
            Some(d) => duration_ms("policy.retain", d, MIN_RETAIN_MS, MAX_RETAIN_MS).unwrap_or_else(|e| {
                bad.extend(e.0);
                0
            }),
        };
        if !bad.is_empty() {
            return Err(status(AuditError::Invalid(bad)));
        }
        let stored = self
            .audit
            .set_policy(RetentionPolicy {
                name: r.name,
                action_prefix: p.action_prefix,
                tenant: p.tenant,
                retain_ms,
                updated_ms: unix_now_ms(),
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SetRetentionPolicyResponse {
            policy: Some(wire_policy(stored)),
        }))
    }

    async fn list_retention_policies(
        &self,
        _request: Request<pb::ListRetentionPoliciesRequest>,
    ) -> Result<Response<pb::ListRetentionPoliciesResponse>, Status> {
        let policies = self.audit.policies().await.map_err(status)?;
        Ok(Response::new(pb::ListRetentionPoliciesResponse {
            policies: policies.into_iter().map(wire_policy).collect(),
        }))
    }

    async fn delete_retention_policy(
        &self,
        request: Request<pb::DeleteRetentionPolicyRequest>,
    ) -> Result<Response<pb::DeleteRetentionPolicyResponse>, Status> {
        let name = request.into_inner().name;
        if let Some(bad) = name_problem("name", &name) {
            return Err(status(AuditError::Invalid(vec![bad])));
        }
        self.audit.delete_policy(&name).await.map_err(status)?;
        Ok(Response::new(pb::DeleteRetentionPolicyResponse {}))
    }

    async fn set_alert_rule(
        &self,
        request: Request<pb::SetAlertRuleRequest>,
    ) -> Result<Response<pb::SetAlertRuleResponse>, Status> {
        let r = request.into_inner();
        let rule = r
            .rule
            .ok_or_else(|| status(AuditError::invalid("rule", "is required")))?;
        let mut bad = Vec::new();
        bad.extend(name_problem("name", &r.name));
        if !rule.name.is_empty() && rule.name != r.name {
            bad.push(FieldViolation::new("rule.name", "must be empty or the same as `name`"));
        }
        if !rule.action_prefix.is_empty() && !valid_prefix(&rule.action_prefix) {
            bad.push(FieldViolation::new(
                "rule.action_prefix",
                "may hold only what actions hold: lowercase letters, digits, `_`, `-` and `.`",
            ));
        }
        bad.extend(text_problem("rule.action_prefix", &rule.action_prefix, 128));
        if rule.outcome != 0 && Outcome::from_number(rule.outcome).is_none() {
            bad.push(FieldViolation::new("rule.outcome", "is not a known outcome"));
        }
        let group_by = Group::from_number(rule.group_by).unwrap_or_else(|| {
            bad.push(FieldViolation::new("rule.group_by", "is not a known grouping"));
            Group::All
        });
        if !(1..=1_000_000).contains(&rule.threshold) {
            bad.push(FieldViolation::new("rule.threshold", "must be between 1 and 1,000,000"));
        }
        let window_ms = match &rule.window {
            None => {
                bad.push(FieldViolation::new("rule.window", "is required"));
                0
            }
            Some(d) => duration_ms("rule.window", d, 1000, 86_400_000).unwrap_or_else(|e| {
                bad.extend(e.0);
                0
            }),
        };
        if !rule.webhook_url.is_empty() {
            let scheme_ok = rule.webhook_url.starts_with("http://") || rule.webhook_url.starts_with("https://");
            if !scheme_ok || rule.webhook_url.len() > 2048 || rule.webhook_url.chars().any(char::is_whitespace) {
                bad.push(FieldViolation::new(
                    "rule.webhook_url",
                    "must be an http:// or https:// URL of at most 2,048 bytes",
                ));
            }
        }
        if !bad.is_empty() {
            return Err(status(AuditError::Invalid(bad)));
        }
        let stored = self
            .audit
            .set_alert_rule(AlertRule {
                name: r.name,
                action_prefix: rule.action_prefix,
                outcome: rule.outcome,
                group_by,
                threshold: rule.threshold,
                window_ms,
                webhook_url: rule.webhook_url,
                updated_ms: unix_now_ms(),
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SetAlertRuleResponse {
            rule: Some(stored.wire()),
        }))
    }

    async fn list_alert_rules(
        &self,
        _request: Request<pb::ListAlertRulesRequest>,
    ) -> Result<Response<pb::ListAlertRulesResponse>, Status> {
        let rules = self.audit.alert_rules().await.map_err(status)?;
        Ok(Response::new(pb::ListAlertRulesResponse {
            rules: rules.iter().map(AlertRule::wire).collect(),
        }))
    }

    async fn delete_alert_rule(
        &self,
        request: Request<pb::DeleteAlertRuleRequest>,
    ) -> Result<Response<pb::DeleteAlertRuleResponse>, Status> {
        let name = request.into_inner().name;
        if let Some(bad) = name_problem("name", &name) {
            return Err(status(AuditError::Invalid(vec![bad])));
        }
        self.audit.delete_alert_rule(&name).await.map_err(status)?;
        Ok(Response::new(pb::DeleteAlertRuleResponse {}))
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let r = request.into_inner();
        let limit = wire::page_size("page_size", r.page_size, 100).map_err(|e| status(e.into()))?;
        if let Some(bad) = name_problem("rule", &r.rule).filter(|_| !r.rule.is_empty()) {
            return Err(status(AuditError::Invalid(vec![bad])));
        }
        let alerts = self
            .audit
            .alerts(&r.rule, i64::try_from(limit).unwrap_or(100))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: alerts.iter().map(AlertRow::wire).collect(),
        }))
    }

    async fn erase_subject(
        &self,
        request: Request<pb::EraseSubjectRequest>,
    ) -> Result<Response<pb::EraseSubjectResponse>, Status> {
        let by = subject_of(&request);
        let r = request.into_inner();
        let mut bad = Vec::new();
        if r.subject_id.is_empty() {
            bad.push(FieldViolation::new("subject_id", "is required"));
        }
        bad.extend(text_problem("subject_id", &r.subject_id, 512));
        bad.extend(text_problem("reason", &r.reason, 1024));
        if !bad.is_empty() {
            return Err(status(AuditError::Invalid(bad)));
        }
        let (erased, record) = self
            .audit
            .erase_subject(&r.subject_id, &r.reason, &by, unix_now_ms())
            .await
            .map_err(status)?;
        Ok(Response::new(pb::EraseSubjectResponse {
            erased: i64::try_from(erased).unwrap_or(i64::MAX),
            record_index: record.map_or(-1, |i| i64::try_from(i).unwrap_or(i64::MAX)),
        }))
    }

    async fn get_checkpoint(
        &self,
        _request: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        let c = self.audit.checkpoint().await.map_err(status)?;
        let signer = self.audit.signer();
        Ok(Response::new(pb::GetCheckpointResponse {
            checkpoint: Some(c.wire(signer.origin())),
            verifier_key: signer.verifier_key(),
            public_key: Bytes::copy_from_slice(&signer.public_key()),
        }))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<pb::GetInclusionProofRequest>,
    ) -> Result<Response<pb::GetInclusionProofResponse>, Status> {
        let r = request.into_inner();
        let tree_size = non_negative("tree_size", r.tree_size)?;
        let index = non_negative("index", r.index)?;
        if let Some(v) = text_problem("event_id", &r.event_id, 128) {
            return Err(status(AuditError::Invalid(vec![v])));
        }
        let event_id = (!r.event_id.is_empty()).then_some(r.event_id.as_str());
        if event_id.is_some() && r.index != 0 {
            return Err(status(AuditError::invalid("index", "give index or event_id, not both")));
        }
        let p = self
            .audit
            .inclusion_proof(Some(index), event_id, tree_size)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GetInclusionProofResponse {
            index: i64::try_from(p.index).unwrap_or(i64::MAX),
            tree_size: i64::try_from(p.tree_size).unwrap_or(i64::MAX),
            leaf_hash: Bytes::copy_from_slice(&p.leaf_hash),
            hashes: hashes(p.hashes),
            root_hash: Bytes::copy_from_slice(&p.root),
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<pb::GetConsistencyProofRequest>,
    ) -> Result<Response<pb::GetConsistencyProofResponse>, Status> {
        let r = request.into_inner();
        let first = non_negative("first_tree_size", r.first_tree_size)?;
        let second = non_negative("second_tree_size", r.second_tree_size)?;
        let p = self.audit.consistency_proof(first, second).await.map_err(status)?;
        Ok(Response::new(pb::GetConsistencyProofResponse {
            first_tree_size: i64::try_from(p.first).unwrap_or(i64::MAX),
            second_tree_size: i64::try_from(p.second).unwrap_or(i64::MAX),
            hashes: hashes(p.hashes),
            first_root_hash: Bytes::copy_from_slice(&p.first_root),
            second_root_hash: Bytes::copy_from_slice(&p.second_root),
        }))
    }

    async fn verify_log(
        &self,
        _request: Request<pb::VerifyLogRequest>,
    ) -> Result<Response<pb::VerifyLogResponse>, Status> {
        let v = self.audit.verify().await.map_err(status)?;
        Ok(Response::new(pb::VerifyLogResponse {
            ok: v.problem.is_none(),
            entries_checked: i64::try_from(v.entries_checked).unwrap_or(i64::MAX),
            checkpoints_checked: i64::try_from(v.checkpoints_checked).unwrap_or(i64::MAX),
            first_bad_index: v.first_bad_index.map_or(-1, |i| i64::try_from(i).unwrap_or(i64::MAX)),
            problem: v.problem.unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::valid_action;

    #[test]
    fn an_event_without_outcome_or_with_a_bad_action_names_the_fields() {
        let wire = pb::AuditEvent {
            action: "Not An Action".into(),
            ..Default::default()
        };
        let mut bad = Vec::new();
        assert!(event("events[0].", &wire, 0, &mut bad).is_none());
        assert_eq!(bad.first().map(|v| v.field.as_str()), Some("events[0].outcome"));

        let wire = pb::AuditEvent {
            action: "Not An Action".into(),
            outcome: 1,
            ..Default::default()
        };
        let mut bad = Vec::new();
        assert!(event("event.", &wire, 0, &mut bad).is_none());
        assert!(bad.iter().any(|v| v.field == "event.action"), "{bad:?}");
        assert!(valid_action("a.b"));
    }
}
