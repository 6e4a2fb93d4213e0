-- Alert rules, the alerts they raised (with their webhook delivery), and how
-- far the evaluator has read the log.
CREATE TABLE audit_alert_rules (
    name TEXT PRIMARY KEY,
    action_prefix TEXT NOT NULL,
    outcome INTEGER NOT NULL,
    group_by INTEGER NOT NULL,
    threshold BIGINT NOT NULL,
    window_ms BIGINT NOT NULL,
    webhook_url TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    -- The first index it evaluates: the log's head when it was set.
    from_idx BIGINT NOT NULL
);

CREATE TABLE audit_alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rule TEXT NOT NULL,
    grp TEXT NOT NULL,
    count BIGINT NOT NULL,
    threshold BIGINT NOT NULL,
    window_ms BIGINT NOT NULL,
    idx BIGINT NOT NULL,
    time_ms BIGINT NOT NULL,
    webhook_url TEXT NOT NULL,
    delivery INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_ms BIGINT NOT NULL,
    last_error TEXT NOT NULL
);
CREATE INDEX audit_alerts_by_rule_group ON audit_alerts (rule, grp, time_ms);
CREATE INDEX audit_alerts_due ON audit_alerts (delivery, next_attempt_ms);

CREATE TABLE audit_alert_cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    next_idx BIGINT NOT NULL
);
INSERT INTO audit_alert_cursor (id, next_idx) SELECT 1, next_idx FROM audit_sequence;
