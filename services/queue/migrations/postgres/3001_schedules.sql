-- Cron schedules: each tick enqueues a copy of the template, exactly once
-- (the tick's claim and its message commit in one transaction).
CREATE TABLE schedules (
    queue TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    cron TEXT NOT NULL,
    time_zone TEXT NOT NULL,
    payload BYTEA NOT NULL,
    content_type TEXT NOT NULL,
    headers TEXT NOT NULL,
    priority INTEGER NOT NULL,
    group_key TEXT NOT NULL,
    ttl_ms BIGINT,
    paused BOOLEAN NOT NULL DEFAULT FALSE,
    next_run_at BIGINT NOT NULL,
    last_run_at BIGINT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (queue, name)
);
CREATE INDEX schedules_due ON schedules (next_run_at) WHERE NOT paused;
