-- Cron schedules: each tick enqueues a copy of the template, exactly once
-- (the tick's claim and its message commit in one transaction).
CREATE TABLE schedules (
    queue TEXT NOT NULL,
    name TEXT NOT NULL,
    cron TEXT NOT NULL,
    time_zone TEXT NOT NULL,
    payload BLOB NOT NULL,
    content_type TEXT NOT NULL,
    headers TEXT NOT NULL,
    priority INTEGER NOT NULL,
    group_key TEXT NOT NULL,
    ttl_ms INTEGER,
    paused BOOLEAN NOT NULL DEFAULT FALSE,
    next_run_at INTEGER NOT NULL,
    last_run_at INTEGER,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (queue, name)
);
CREATE INDEX schedules_due ON schedules (next_run_at) WHERE NOT paused;
