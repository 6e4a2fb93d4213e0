-- Queues and their messages. Acknowledged messages are deleted, not kept,
-- so the tables hold only live work and dead letters.
CREATE TABLE queues (
    name TEXT PRIMARY KEY,
    max_attempts INTEGER NOT NULL,
    backoff_initial_ms INTEGER NOT NULL,
    backoff_max_ms INTEGER NOT NULL,
    backoff_multiplier REAL NOT NULL,
    backoff_jitter BOOLEAN NOT NULL,
    lease_ms INTEGER NOT NULL,
    ttl_ms INTEGER NOT NULL,
    dedup_window_ms INTEGER NOT NULL,
    rate_limit REAL NOT NULL,
    max_concurrency INTEGER NOT NULL,
    depth_alert INTEGER NOT NULL,
    dead_letter_queue TEXT NOT NULL,
    paused BOOLEAN NOT NULL DEFAULT FALSE,
    -- 0: not draining, 1: draining, 2: drained (event published).
    drain_state INTEGER NOT NULL DEFAULT 0,
    alerting BOOLEAN NOT NULL DEFAULT FALSE,
    -- Rate-limit bucket, refilled by the service clock at each lease.
    rate_tokens REAL NOT NULL DEFAULT 0,
    rate_at INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

-- state: 1 scheduled, 2 ready, 3 leased, 4 dead (the proto's MessageState).
-- next_at: scheduled → when it becomes ready; leased → lease expiry.
-- slot: the fair-queueing start tag (see store.rs); ready messages are
-- handed out by priority, then slot, then id.
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    state INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    group_key TEXT NOT NULL,
    ready_at INTEGER NOT NULL,
    next_at INTEGER NOT NULL,
    expires_at INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_token INTEGER,
    payload BLOB NOT NULL,
    content_type TEXT NOT NULL,
    headers TEXT NOT NULL,
    dedup_key TEXT NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    origin_queue TEXT NOT NULL DEFAULT '',
    enqueued_at INTEGER NOT NULL
);
CREATE INDEX messages_ready ON messages (queue, priority DESC, slot, id) WHERE state = 2;
CREATE INDEX messages_due ON messages (next_at) WHERE state IN (1, 3);
CREATE INDEX messages_by_state ON messages (queue, state, id);
CREATE INDEX messages_expiring ON messages (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE dedup (
    queue TEXT NOT NULL,
    dedup_key TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (queue, dedup_key)
);
CREATE INDEX dedup_expiry ON dedup (expires_at);

-- Each group's next fair-queueing slot.
CREATE TABLE fair_groups (
    queue TEXT NOT NULL,
    group_key TEXT NOT NULL,
    next_slot INTEGER NOT NULL,
    PRIMARY KEY (queue, group_key)
);
