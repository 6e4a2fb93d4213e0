//! The audit service as its users meet it: a configuration write becomes an
//! audit entry whose inclusion proof verifies against the signed checkpoint
//! (checked with `plinth_tests::rfc9162`, not the service's code), on SQLite
//! and PostgreSQL; bad input named field by field over gRPC and HTTP with
//! nothing stored; the checkpoint public, the log not; and a NATS outage
//! that delays the audit trail without losing or doubling an entry.

#![expect(
    clippy::unwrap_used,
    reason = "the scenarios run inside the SQLite and PostgreSQL tests; an unexpected answer fails the test"
)]

use std::time::{Duration, Instant};

use plinth::audit::v1::audit_service_client::AuditServiceClient;
use plinth::audit::v1::{self as pb};
use plinth_runtime::config::Config;
use plinth_runtime::testing::{Backend, ToggleProxy, backend_url, host_port};
use plinth_tests::audit::{hash, prove, wait_for_entries};
use plinth_tests::config::{ConfigSession, text};
use plinth_tests::rfc9162::{H, leaf, verify_inclusion};
use plinth_tests::{TestApp, access_token, register_user, violated_field, with_admin, with_bearer};
use tonic::Code;

plinth_tests::on_both_backends!(
    a_config_write_becomes_a_provable_audit_entry,
    a_tail_follows_the_log_and_an_export_carries_proofs,
    an_alert_rule_raises_once_per_window_and_its_webhook_is_retried
);

fn config_changes(s: &ConfigSession) -> pb::ListEventsRequest {
    pb::ListEventsRequest {
        filter: Some(pb::EventFilter {
            action_prefix: "config.values.changed".into(),
            resource_type: "config.environment".into(),
            resource_name: format!("{}/{}", s.namespace, s.environment),
            ..Default::default()
        }),
        oldest_first: true,
        ..Default::default()
    }
}

async fn a_config_write_becomes_a_provable_audit_entry(config: Config) -> anyhow::Result<()> {
    let app = TestApp::spawn(with_admin(config)).await?;
    let mut s = ConfigSession::admin(&app).await?;
    s.set("db/url", text("postgres://db")).await?;
    let mut audit = AuditServiceClient::new(app.channel().await?);
    let entries = wait_for_entries(&mut audit, &s.token, config_changes(&s), 1, Duration::from_secs(15)).await?;
    let entry = &entries[0];
    let event = entry.event.clone().unwrap();
    assert_eq!(event.source, "config");
    assert_eq!(event.outcome, pb::Outcome::Success as i32);
    let metadata = serde_json::to_string(&plinth_runtime::wire::json_of_struct("m", &event.metadata.unwrap())?)?;
    assert!(metadata.contains("db/url"), "{metadata}");
    assert!(
        !metadata.contains("postgres://db"),
        "values never enter the log: {metadata}"
    );
    let me = plinth_tests::whoami(&mut app.auth().await?, &s.token).await?;
    assert_eq!(event.actor.unwrap().id, me);
    prove(&mut audit, &s.token, entry).await?;

    let v = audit
        .verify_log(with_bearer(pb::VerifyLogRequest {}, &s.token))
        .await?
        .into_inner();
    assert!(v.ok, "{v:?}");
    assert!(v.entries_checked >= 1);
    app.stop().await;
    Ok(())
}

fn shipped(n: u32) -> pb::AuditEvent {
    pb::AuditEvent {
        id: format!("shipped-{n}"),
        action: "shop.order.shipped".into(),
        outcome: pb::Outcome::Success as i32,
        resource: Some(pb::Resource {
            r#type: "shop.order".into(),
            name: n.to_string(),
        }),
        ..Default::default()
    }
}

fn shop_filter() -> Option<pb::EventFilter> {
    Some(pb::EventFilter {
        action_prefix: "shop.".into(),
        ..Default::default()
    })
}

async fn next_entry(stream: &mut tonic::Streaming<pb::StreamEventsResponse>) -> anyhow::Result<pb::Entry> {
    let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .map_err(|_| anyhow::anyhow!("no entry within 10 s"))??;
    message
        .and_then(|m| m.entry)
        .ok_or_else(|| anyhow::anyhow!("the stream ended"))
}

async fn a_tail_follows_the_log_and_an_export_carries_proofs(config: Config) -> anyhow::Result<()> {
    let app = TestApp::spawn(with_admin(config)).await?;
    let s = ConfigSession::admin(&app).await?;
    let mut audit = AuditServiceClient::new(app.channel().await?);
    let append = |events: Vec<pb::AuditEvent>| with_bearer(pb::AppendBatchRequest { events }, &s.token);
    audit.append_batch(append((0..3).map(shipped).collect())).await?;

    // From the start: the three so far, then each new one as it comes.
    let mut tail = audit
        .stream_events(with_bearer(
            pb::StreamEventsRequest {
                filter: shop_filter(),
                after_index: Some(-1),
            },
            &s.token,
        ))
        .await?
        .into_inner();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next_entry(&mut tail).await?);
    }
    audit.append_batch(append((3..5).map(shipped).collect())).await?;
    for _ in 0..2 {
        seen.push(next_entry(&mut tail).await?);
    }
    let names: Vec<String> = seen
        .iter()
        .map(|e| e.event.as_ref().unwrap().resource.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(names, ["0", "1", "2", "3", "4"]);
    assert!(seen.windows(2).all(|w| w[0].index < w[1].index));
    drop(tail);

    // Resumed after the last index received: only what came after.
    audit.append_batch(append(vec![shipped(5)])).await?;
    let mut resumed = audit
        .stream_events(with_bearer(
            pb::StreamEventsRequest {
                filter: shop_filter(),
                after_index: Some(seen[4].index),
            },
            &s.token,
        ))
        .await?
        .into_inner();
    let next = next_entry(&mut resumed).await?;
    assert_eq!(next.event.unwrap().id, "shipped-5");

    // The export: the checkpoint first, then each entry with a proof in it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let checkpoint = loop {
        let c = audit.get_checkpoint(pb::GetCheckpointRequest {}).await?.into_inner();
        let c = c.checkpoint.unwrap();
        if c.tree_size > next.index {
            break c;
        }
        anyhow::ensure!(Instant::now() < deadline, "entry {} never integrated", next.index);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut export = audit
        .export_events(with_bearer(pb::ExportEventsRequest { filter: shop_filter() }, &s.token))
        .await?
        .into_inner();
    let first = export.message().await?.unwrap();
    let c = first.checkpoint.unwrap();
    let root = hash(&c.root_hash);
    let size = u64::try_from(c.tree_size)?;
    let mut exported = 0;
    while let Some(m) = export.message().await? {
        let entry = m.entry.unwrap();
        let path: Vec<H> = m.inclusion_proof.iter().map(|h| hash(h)).collect();
        assert!(
            verify_inclusion(u64::try_from(entry.index)?, size, &leaf(&entry.leaf_data), &path, &root),
            "exported entry {} does not prove",
            entry.index
        );
        exported += 1;
    }
    assert_eq!(exported, 6);
    assert!(checkpoint.tree_size <= c.tree_size);
    app.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_input_is_refused_by_field_and_the_log_is_not_public() -> anyhow::Result<()> {
    let app = TestApp::spawn(with_admin(TestApp::config())).await?;
    let s = ConfigSession::admin(&app).await?;
    let mut audit = AuditServiceClient::new(app.channel().await?);
    let good = |action: &str| pb::AuditEvent {
        action: action.into(),
        outcome: pb::Outcome::Success as i32,
        ..Default::default()
    };
    let huge = prost_types::Struct {
        fields: [(
            "blob".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("x".repeat(17 * 1024))),
            },
        )]
        .into(),
    };
    let cases: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "event.outcome",
            audit
                .append(with_bearer(
                    pb::AppendRequest {
                        event: Some(pb::AuditEvent {
                            outcome: 0,
                            ..good("test.thing.done")
                        }),
                    },
                    &s.token,
                ))
                .await
                .map(drop),
        ),
        (
            "events[1].action",
            audit
                .append_batch(with_bearer(
                    pb::AppendBatchRequest {
                        events: vec![good("test.thing.done"), good("Not An Action")],
                    },
                    &s.token,
                ))
                .await
                .map(drop),
        ),
        (
            "events[0].metadata",
            audit
                .append_batch(with_bearer(
                    pb::AppendBatchRequest {
                        events: vec![pb::AuditEvent {
                            metadata: Some(huge),
                            ..good("test.thing.done")
                        }],
                    },
                    &s.token,
                ))
                .await
                .map(drop),
        ),
        (
            "events",
            audit
                .append_batch(with_bearer(
                    pb::AppendBatchRequest {
                        events: vec![good("test.thing.done"); 1001],
                    },
                    &s.token,
                ))
                .await
                .map(drop),
        ),
        (
            "first_tree_size",
            audit
                .get_consistency_proof(with_bearer(
                    pb::GetConsistencyProofRequest {
                        first_tree_size: 0,
                        second_tree_size: 0,
                    },
                    &s.token,
                ))
                .await
                .map(drop),
        ),
        (
            "policy.retain",
            audit
                .set_retention_policy(with_bearer(
                    pb::SetRetentionPolicyRequest {
                        name: "short".into(),
                        policy: Some(pb::RetentionPolicy {
                            retain: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
                            ..Default::default()
                        }),
                    },
                    &s.token,
                ))
                .await
                .map(drop),
        ),
        (
            "name",
            audit
                .set_retention_policy(with_bearer(
                    pb::SetRetentionPolicyRequest {
                        name: "Not A Name".into(),
                        policy: Some(pb::RetentionPolicy {
                            retain: Some(prost_types::Duration {
                                seconds: 86_400,
                                nanos: 0,
                            }),
                            ..Default::default()
                        }),
                    },
                    &s.token,
                ))
                .await
                .map(drop),
        ),
        (
            "page_token",
            audit
                .list_events(with_bearer(
                    pb::ListEventsRequest {
                        page_token: "!!".into(),
                        ..Default::default()
                    },
                    &s.token,
                ))
                .await
                .map(drop),
        ),
    ];
    for (field, result) in cases {
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert_eq!(violated_field(&status), field, "{status:?}");
    }
    let policies = audit
        .list_retention_policies(with_bearer(pb::ListRetentionPoliciesRequest {}, &s.token))
        .await?
        .into_inner();
    assert!(policies.policies.is_empty(), "{policies:?}");
    // Nothing of the refused batches was stored.
    let stored = audit
        .list_events(with_bearer(
            pb::ListEventsRequest {
                filter: Some(pb::EventFilter {
                    action_prefix: "test.".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            &s.token,
        ))
        .await?
        .into_inner();
    assert!(stored.entries.is_empty(), "{stored:?}");

    // Over HTTP: a 400 naming the field; a good append is idempotent.
    let http = reqwest::Client::new();
    let base = format!("http://{}", app.http);
    let bearer = format!("Bearer {}", s.token);
    let bad = http
        .post(format!("{base}/v1/audit/events"))
        .header("authorization", &bearer)
        .json(&serde_json::json!({"action": "test.thing.done"}))
        .send()
        .await?;
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = bad.json().await?;
    assert!(body.to_string().contains("event.outcome"), "{body}");
    let event = serde_json::json!({
        "id": "order-42-shipped",
        "action": "test.order.shipped",
        "outcome": "OUTCOME_SUCCESS",
        "actor": {"id": "svc-orders", "kind": "ACTOR_KIND_SERVICE_ACCOUNT"},
        "resource": {"type": "shop.order", "name": "42"},
        "metadata": {"carrier": "ups"}
    });
    let mut indexes = Vec::new();
    for _ in 0..2 {
        let r: serde_json::Value = http
            .post(format!("{base}/v1/audit/events"))
            .header("authorization", &bearer)
            .json(&event)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        indexes.push(r["index"].clone());
    }
    assert_eq!(indexes[0], indexes[1], "a retried append lands on the same entry");
    let policy: serde_json::Value = http
        .put(format!("{base}/v1/audit/retentionPolicies/logins"))
        .header("authorization", &bearer)
        .json(&serde_json::json!({"actionPrefix": "auth.login.", "retain": "7776000s"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(policy["policy"]["name"], "logins");
    assert_eq!(policy["policy"]["retain"], "7776000s");

    // The checkpoint is public; the log and proofs are not.
    let checkpoint: serde_json::Value = http
        .get(format!("{base}/v1/audit/checkpoint"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert!(
        checkpoint["verifierKey"]
            .as_str()
            .unwrap()
            .starts_with("plinth.local/audit+")
    );
    let anonymous = http.get(format!("{base}/v1/audit/events")).send().await?;
    assert_eq!(anonymous.status(), 401);
    let mut auth = app.auth().await?;
    let email = register_user(&mut auth, "no-audit").await?;
    let token = access_token(&mut auth, &email, plinth_tests::PASSWORD).await?;
    let denied = http
        .get(format!("{base}/v1/audit/events"))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await?;
    assert_eq!(denied.status(), 403);
    let denied = audit
        .append(with_bearer(
            pb::AppendRequest {
                event: Some(good("test.thing.done")),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    app.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_nats_outage_delays_the_audit_trail_and_loses_nothing() -> anyhow::Result<()> {
    let test = "a_nats_outage_delays_the_audit_trail_and_loses_nothing";
    let (Some(pg), Some(nats)) = (backend_url(Backend::Postgres, test)?, backend_url(Backend::Nats, test)?) else {
        return Ok(());
    };
    let mut proxy = ToggleProxy::reserve(host_port(&nats)).await?;
    proxy.up().await?;
    let mut config = with_admin(TestApp::config_on(Some(&pg)));
    config.nats_url = Some(format!("nats://{}", proxy.addr()).into());
    let app = TestApp::spawn(config).await?;
    let mut s = ConfigSession::admin(&app).await?;
    let mut audit = AuditServiceClient::new(app.channel().await?);
    s.set("before", text("1")).await?;
    wait_for_entries(&mut audit, &s.token, config_changes(&s), 1, Duration::from_secs(15)).await?;

    // NATS goes away: writes still succeed (their events wait in the outbox).
    proxy.down().await;
    for i in 0..3 {
        s.set(&format!("during/{i}"), text("2")).await?;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = audit
        .list_events(with_bearer(config_changes(&s), &s.token))
        .await?
        .into_inner()
        .entries;
    assert_eq!(during.len(), 1, "nothing can reach audit while NATS is down");

    // NATS is back: the trail catches up, each change exactly once.
    proxy.up().await?;
    let entries = wait_for_entries(&mut audit, &s.token, config_changes(&s), 4, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let entries_again = audit
        .list_events(with_bearer(config_changes(&s), &s.token))
        .await?
        .into_inner()
        .entries;
    assert_eq!(entries_again.len(), 4, "no change is recorded twice: {entries_again:?}");
    let mut revisions: Vec<f64> = entries
        .iter()
        .map(|e| {
            let m = plinth_runtime::wire::json_of_struct("m", e.event.as_ref().unwrap().metadata.as_ref().unwrap());
            m.unwrap()["revision"].as_f64().unwrap()
        })
        .collect();
    revisions.sort_by(f64::total_cmp);
    revisions.dedup();
    assert_eq!(revisions.len(), 4);
    prove(&mut audit, &s.token, entries.last().unwrap()).await?;
    app.stop().await;
    proxy.down().await;
    Ok(())
}

fn login_failed(id: &str, actor: &str, outcome: pb::Outcome) -> pb::AuditEvent {
    pb::AuditEvent {
        id: id.into(),
        action: "auth.login.failed".into(),
        outcome: outcome as i32,
        actor: Some(pb::Actor {
            id: actor.into(),
            kind: pb::ActorKind::User as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Three failed logins of one account within a minute raise one alert for
/// that account (not for another with two, not again for a fourth), which
/// a webhook receives after one refused attempt; bad rules are named.
async fn an_alert_rule_raises_once_per_window_and_its_webhook_is_retried(config: Config) -> anyhow::Result<()> {
    let hook = plinth_tests::fake_upstream::FakeUpstream::start().await?;
    hook.push(
        "/hook",
        plinth_tests::fake_upstream::Reply::status(503, serde_json::json!({})),
    );
    hook.always("/hook", plinth_tests::fake_upstream::Reply::ok(serde_json::json!({})));
    let app = TestApp::spawn(with_admin(config)).await?;
    let s = ConfigSession::admin(&app).await?;
    let mut audit = AuditServiceClient::new(app.channel().await?);
    let rule = pb::AlertRule {
        action_prefix: "auth.login.failed".into(),
        outcome: pb::Outcome::Failure as i32,
        group_by: pb::AlertGroup::Actor as i32,
        threshold: 3,
        window: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
        webhook_url: format!("{}/hook", hook.url()),
        ..Default::default()
    };
    for (bad, field) in [
        (
            pb::AlertRule {
                threshold: 0,
                ..rule.clone()
            },
            "rule.threshold",
        ),
        (
            pb::AlertRule {
                window: None,
                ..rule.clone()
            },
            "rule.window",
        ),
        (
            pb::AlertRule {
                webhook_url: "ftp://x".into(),
                ..rule.clone()
            },
            "rule.webhook_url",
        ),
    ] {
        let e = audit
            .set_alert_rule(with_bearer(
                pb::SetAlertRuleRequest {
                    name: "logins".into(),
                    rule: Some(bad),
                },
                &s.token,
            ))
            .await
            .unwrap_err();
        assert_eq!(
            (e.code(), violated_field(&e)),
            (Code::InvalidArgument, field.to_owned())
        );
    }
    audit
        .set_alert_rule(with_bearer(
            pb::SetAlertRuleRequest {
                name: "logins".into(),
                rule: Some(rule),
            },
            &s.token,
        ))
        .await?;
    let run = plinth_tests::unique();
    let events = vec![
        login_failed(&format!("{run}-1"), "mallory", pb::Outcome::Failure),
        login_failed(&format!("{run}-2"), "alice", pb::Outcome::Failure),
        login_failed(&format!("{run}-3"), "mallory", pb::Outcome::Failure),
        login_failed(&format!("{run}-4"), "mallory", pb::Outcome::Success),
        login_failed(&format!("{run}-5"), "alice", pb::Outcome::Failure),
        login_failed(&format!("{run}-6"), "mallory", pb::Outcome::Failure),
        login_failed(&format!("{run}-7"), "mallory", pb::Outcome::Failure),
    ];
    audit
        .append_batch(with_bearer(pb::AppendBatchRequest { events }, &s.token))
        .await?;

    let deadline = Instant::now() + Duration::from_secs(20);
    let alert = loop {
        let alerts = audit
            .list_alerts(with_bearer(
                pb::ListAlertsRequest {
                    rule: "logins".into(),
                    page_size: 0,
                },
                &s.token,
            ))
            .await?
            .into_inner()
            .alerts;
        if let Some(a) = alerts.first()
            && a.delivery == pb::AlertDelivery::Delivered as i32
        {
            assert_eq!(alerts.len(), 1, "one alert per group and window: {alerts:?}");
            break a.clone();
        }
        anyhow::ensure!(Instant::now() < deadline, "no delivered alert: {alerts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((alert.group.as_str(), alert.count, alert.threshold), ("mallory", 3, 3));
    assert_eq!(alert.attempts, 2, "one refused webhook call, then one answered");
    let calls = hook.requests();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].body["rule"], "logins");
    assert_eq!(calls[1].body["group"], "mallory");
    assert_eq!(calls[1].body["count"], 3);
    app.stop().await;
    Ok(())
}
