//! Alert rules: a threshold of matching entries within a sliding window,
//! counted per actor, resource or tenant. An evaluator reads the log in
//! index order from a stored cursor and, in the same transaction that moves
//! the cursor, records each alert and its `plinth.audit.alert_raised` event
//! (outbox), so an entry is evaluated once however often the evaluator
//! restarts and however many replicas run it (they serialise on the cursor
//! row). A group alerts at most once per window. Webhooks are called by a
//! second loop that claims due alerts and retries with backoff.

use std::time::Duration;

use plinth::audit::v1 as pb;
use plinth_runtime::events::outbox::OutboxEvent;
use plinth_runtime::on_db;
use plinth_runtime::resilience::Backoff;
use plinth_runtime::storage::BeginWrite;
use plinth_runtime::wire::{duration, timestamp};

use crate::error::AuditError;
use crate::store::Store;

/// Webhook attempts before an alert's delivery is given up.
pub const MAX_ATTEMPTS: i32 = 8;
/// Entries evaluated per transaction.
pub(crate) const BATCH: i64 = 500;
/// Alerts whose webhooks are called per round.
const DELIVERIES: i64 = 16;

/// What a rule counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Everything matching together.
    All,
    /// Per actor id.
    Actor,
    /// Per `type/name` of the resource.
    Resource,
    /// Per tenant.
    Tenant,
}

impl Group {
    /// The wire (and stored) number.
    pub fn number(self) -> i32 {
        match self {
            Group::All => 0,
            Group::Actor => 1,
            Group::Resource => 2,
            Group::Tenant => 3,
        }
    }

    /// From the wire number.
    pub fn from_number(n: i32) -> Option<Group> {
        match n {
            0 => Some(Group::All),
            1 => Some(Group::Actor),
            2 => Some(Group::Resource),
            3 => Some(Group::Tenant),
            _ => None,
        }
    }

    /// The SQL condition comparing an entry's group with `$6`.
    fn condition(self) -> &'static str {
        match self {
            Group::All => "$6 = ''",
            Group::Actor => "actor_id = $6",
            Group::Resource => "resource_type || '/' || resource_name = $6",
            Group::Tenant => "tenant = $6",
        }
    }
}

/// A validated alert rule.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRule {
    /// Its name.
    pub name: String,
    /// Actions starting with this (empty: all).
    pub action_prefix: String,
    /// Only this outcome's number (0: any).
    pub outcome: i32,
    /// Counted per.
    pub group_by: Group,
    /// Entries that raise the alert.
    pub threshold: i64,
    /// The window, ms.
    pub window_ms: i64,
    /// Where to POST alerts (empty: nowhere).
    pub webhook_url: String,
    /// When it was set, ms.
    pub updated_ms: i64,
}

impl AlertRule {
    /// The wire rule.
    pub fn wire(&self) -> pb::AlertRule {
        pb::AlertRule {
            name: self.name.clone(),
            action_prefix: self.action_prefix.clone(),
            outcome: self.outcome,
            group_by: self.group_by.number(),
            threshold: self.threshold,
            window: Some(duration(self.window_ms)),
            webhook_url: self.webhook_url.clone(),
            update_time: Some(timestamp(self.updated_ms)),
        }
    }
}

#[derive(sqlx::FromRow)]
struct RuleRow {
    name: String,
    action_prefix: String,
    outcome: i32,
    group_by: i32,
    threshold: i64,
    window_ms: i64,
    webhook_url: String,
    updated_at: i64,
    from_idx: i64,
}

impl RuleRow {
    fn rule(&self) -> AlertRule {
        AlertRule {
            name: self.name.clone(),
            action_prefix: self.action_prefix.clone(),
            outcome: self.outcome,
            group_by: Group::from_number(self.group_by).unwrap_or(Group::All),
            threshold: self.threshold,
            window_ms: self.window_ms,
            webhook_url: self.webhook_url.clone(),
            updated_ms: self.updated_at,
        }
    }
}

#[derive(sqlx::FromRow)]
struct EntryCols {
    idx: i64,
    time_ms: i64,
    tenant: String,
    actor_id: String,
    action: String,
    resource_type: String,
    resource_name: String,
    outcome: i32,
}

/// A raised alert as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AlertRow {
    pub(crate) id: i64,
    rule: String,
    grp: String,
    count: i64,
    threshold: i64,
    window_ms: i64,
    idx: i64,
    time_ms: i64,
    webhook_url: String,
    delivery: i32,
    pub(crate) attempts: i32,
    next_attempt_ms: i64,
    last_error: String,
}

impl AlertRow {
    /// The wire alert.
    pub fn wire(&self) -> pb::Alert {
        pb::Alert {
            id: self.id,
            rule: self.rule.clone(),
            group: self.grp.clone(),
            count: self.count,
            threshold: self.threshold,
            window: Some(duration(self.window_ms)),
            index: self.idx,
            time: Some(timestamp(self.time_ms)),
            delivery: self.delivery,
            attempts: self.attempts,
            last_error: self.last_error.clone(),
        }
    }
}

const RULE_COLUMNS: &str = "name, action_prefix, CAST(outcome AS INTEGER) AS outcome, CAST(group_by AS INTEGER) AS group_by, threshold, \
     window_ms, webhook_url, updated_at, from_idx";
const ALERT_COLUMNS: &str = "id, rule, grp, count, threshold, window_ms, idx, time_ms, webhook_url, \
     CAST(delivery AS INTEGER) AS delivery, CAST(attempts AS INTEGER) AS attempts, next_attempt_ms, last_error";

fn group_of(group: Group, e: &EntryCols) -> String {
    match group {
        Group::All => String::new(),
        Group::Actor => e.actor_id.clone(),
        Group::Resource => format!("{}/{}", e.resource_type, e.resource_name),
        Group::Tenant => e.tenant.clone(),
    }
}

impl Store {
    /// Creates or replaces a rule; it looks at entries appended from now on.
    pub async fn set_alert_rule(&self, r: &AlertRule) -> Result<(), AuditError> {
        on_db!(&self.db, |pool| {
            sqlx::query(
                "INSERT INTO audit_alert_rules (name, action_prefix, outcome, group_by, threshold, window_ms, \
                 webhook_url, updated_at, from_idx) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, (SELECT next_idx FROM audit_sequence WHERE id = 1)) \
                 ON CONFLICT (name) DO UPDATE SET action_prefix = $2, outcome = $3, group_by = $4, threshold = $5, \
                 window_ms = $6, webhook_url = $7, updated_at = $8, \
                 from_idx = (SELECT next_idx FROM audit_sequence WHERE id = 1)",
            )
            .bind(&r.name)
            .bind(&r.action_prefix)
            .bind(r.outcome)
            .bind(r.group_by.number())
            .bind(r.threshold)
            .bind(r.window_ms)
            .bind(&r.webhook_url)
            .bind(r.updated_ms)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Every rule, by name.
    pub async fn alert_rules(&self) -> Result<Vec<AlertRule>, AuditError> {
        let sql = format!("SELECT {RULE_COLUMNS} FROM audit_alert_rules ORDER BY name");
        let rows: Vec<RuleRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await?
        });
        Ok(rows.iter().map(RuleRow::rule).collect())
    }

    /// Removes a rule; whether it existed.
    pub async fn delete_alert_rule(&self, name: &str) -> Result<bool, AuditError> {
        self.delete_named("audit_alert_rules", name).await
    }

    /// Alerts, newest first.
    pub async fn alerts(&self, rule: &str, limit: i64) -> Result<Vec<AlertRow>, AuditError> {
        let sql =
            format!("SELECT {ALERT_COLUMNS} FROM audit_alerts WHERE ($1 = '' OR rule = $1) ORDER BY id DESC LIMIT $2");
        Ok(on_db!(&self.db, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(rule)
                .bind(limit)
                .fetch_all(pool)
                .await?
        }))
    }

    /// Evaluates the rules over the next entries after the cursor; the
    /// alerts raised (with their events) and the cursor commit together.
    /// Returns how many entries were read.
    pub async fn evaluate_alerts(&self, now_ms: i64) -> Result<(usize, Vec<AlertRow>), AuditError> {
        let rule_sql = format!("SELECT {RULE_COLUMNS} FROM audit_alert_rules");
        let alert_sql = format!(
            "INSERT INTO audit_alerts (rule, grp, count, threshold, window_ms, idx, time_ms, webhook_url, delivery, \
             attempts, next_attempt_ms, last_error) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10, '') \
             RETURNING {ALERT_COLUMNS}"
        );
        let result: Result<(usize, Vec<AlertRow>), AuditError> = on_db!(&self.db, |pool| async {
            let mut tx = pool.begin_write().await?;
            let (next,): (i64,) =
                sqlx::query_as("UPDATE audit_alert_cursor SET next_idx = next_idx WHERE id = 1 RETURNING next_idx")
                    .fetch_one(&mut *tx)
                    .await?;
            let rules: Vec<RuleRow> = sqlx::query_as(sqlx::AssertSqlSafe(rule_sql.clone()))
                .fetch_all(&mut *tx)
                .await?;
            if rules.is_empty() {
                // Nothing to evaluate: skip to the head, so a new rule starts there.
                sqlx::query(
                    "UPDATE audit_alert_cursor SET next_idx = (SELECT next_idx FROM audit_sequence WHERE id = 1) \
                     WHERE id = 1",
                )
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                return Ok((0, Vec::new()));
            }
            let entries: Vec<EntryCols> = sqlx::query_as(
                "SELECT idx, time_ms, tenant, actor_id, action, resource_type, resource_name, \
                 CAST(outcome AS INTEGER) AS outcome FROM audit_entries WHERE idx >= $1 ORDER BY idx LIMIT $2",
            )
            .bind(next)
            .bind(BATCH)
            .fetch_all(&mut *tx)
            .await?;
            let mut raised = Vec::new();
            for e in &entries {
                for r in &rules {
                    if e.idx < r.from_idx
                        || !e.action.starts_with(&r.action_prefix)
                        || (r.outcome != 0 && r.outcome != e.outcome)
                    {
                        continue;
                    }
                    let group_by = Group::from_number(r.group_by).unwrap_or(Group::All);
                    let group = group_of(group_by, e);
                    let count_sql = format!(
                        "SELECT COUNT(*) FROM audit_entries WHERE substr(action, 1, length($1)) = $1 \
                         AND ($2 = 0 OR outcome = $2) AND time_ms > $3 AND time_ms <= $4 AND idx <= $5 \
                         AND idx >= $7 AND {}",
                        group_by.condition()
                    );
                    let (count,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(count_sql))
                        .persistent(false)
                        .bind(&r.action_prefix)
                        .bind(r.outcome)
                        .bind(e.time_ms - r.window_ms)
                        .bind(e.time_ms)
                        .bind(e.idx)
                        .bind(&group)
                        .bind(r.from_idx)
                        .fetch_one(&mut *tx)
                        .await?;
                    if count < r.threshold {
                        continue;
                    }
                    let recent: Option<(i64,)> = sqlx::query_as(
                        "SELECT id FROM audit_alerts WHERE rule = $1 AND grp = $2 AND time_ms > $3 LIMIT 1",
                    )
                    .bind(&r.name)
                    .bind(&group)
                    .bind(e.time_ms - r.window_ms)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if recent.is_some() {
                        continue;
                    }
                    let delivery = if r.webhook_url.is_empty() {
                        pb::AlertDelivery::Unspecified
                    } else {
                        pb::AlertDelivery::Pending
                    };
                    let alert: AlertRow = sqlx::query_as(sqlx::AssertSqlSafe(alert_sql.clone()))
                        .bind(&r.name)
                        .bind(&group)
                        .bind(count)
                        .bind(r.threshold)
                        .bind(r.window_ms)
                        .bind(e.idx)
                        .bind(e.time_ms)
                        .bind(&r.webhook_url)
                        .bind(delivery as i32)
                        .bind(now_ms)
                        .fetch_one(&mut *tx)
                        .await?;
                    OutboxEvent::new(
                        "plinth.audit.alert_raised",
                        r.name.as_str(),
                        &pb::AlertRaisedEvent {
                            alert: Some(alert.wire()),
                        },
                    )
                    .write(&mut *tx)
                    .await?;
                    raised.push(alert);
                }
            }
            if let Some(last) = entries.last() {
                sqlx::query("UPDATE audit_alert_cursor SET next_idx = $1 WHERE id = 1")
                    .bind(last.idx + 1)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok((entries.len(), raised))
        }
        .await);
        result
    }

    /// Claims alerts whose webhook call is due (so another replica does not
    /// call it at the same time) and returns them.
    pub async fn claim_deliveries(&self, now_ms: i64) -> Result<Vec<AlertRow>, AuditError> {
        let sql = format!(
            "SELECT {ALERT_COLUMNS} FROM audit_alerts WHERE delivery = 1 AND next_attempt_ms <= $1 \
             ORDER BY next_attempt_ms LIMIT $2"
        );
        let due: Vec<AlertRow> = on_db!(&self.db, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(now_ms)
                .bind(DELIVERIES)
                .fetch_all(pool)
                .await?
        });
        let mut claimed = Vec::with_capacity(due.len());
        for a in due {
            // Hold it for a minute; the outcome sets the real next time.
            let n = on_db!(&self.db, |pool| {
                sqlx::query(
                    "UPDATE audit_alerts SET next_attempt_ms = $1 WHERE id = $2 AND delivery = 1 AND next_attempt_ms = $3",
                )
                .bind(now_ms + 60_000)
                .bind(a.id)
                .bind(a.next_attempt_ms)
                .execute(pool)
                .await?
                .rows_affected()
            });
            if n == 1 {
                claimed.push(a);
            }
        }
        Ok(claimed)
    }

    /// Records a webhook attempt's outcome.
    pub async fn delivered(
        &self,
        id: i64,
        ok: bool,
        error: &str,
        attempts: i32,
        next_ms: i64,
    ) -> Result<(), AuditError> {
        let delivery = if ok {
            pb::AlertDelivery::Delivered
        } else if attempts >= MAX_ATTEMPTS {
            pb::AlertDelivery::Failed
        } else {
            pb::AlertDelivery::Pending
        };
        on_db!(&self.db, |pool| {
            sqlx::query(
                "UPDATE audit_alerts SET delivery = $1, attempts = $2, next_attempt_ms = $3, last_error = $4 WHERE id = $5",
            )
            .bind(delivery as i32)
            .bind(attempts)
            .bind(next_ms)
            .bind(error)
            .bind(id)
            .execute(pool)
            .await?;
        });
        Ok(())
    }
}

/// Calls one alert's webhook; `Err` with what went wrong.
pub async fn call_webhook(client: &reqwest::Client, alert: &AlertRow) -> Result<(), String> {
    let body = serde_json::json!({
        "rule": alert.rule,
        "group": alert.grp,
        "count": alert.count,
        "threshold": alert.threshold,
        "window_seconds": alert.window_ms / 1000,
        "index": alert.idx,
        "time_ms": alert.time_ms,
        "id": alert.id,
    });
    let response = client
        .post(&alert.webhook_url)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("webhook answered {}", response.status()))
    }
}

/// When to try a webhook again after `attempts` failures.
pub fn retry_in(attempts: i32) -> Duration {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(300)).delay(u32::try_from(attempts).unwrap_or(0))
}
