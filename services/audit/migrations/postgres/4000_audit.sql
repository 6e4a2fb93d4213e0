-- The audit log. `audit_entries` holds each event's canonical bytes (the
-- leaf data; NULL once erased) with the columns queries filter on, copied
-- from those bytes (full indexes, not partial ones: a partial index's
-- predicate cannot be proven for a parameter, so generic plans would skip
-- it). `audit_nodes` holds every complete perfect subtree of
-- the Merkle tree above the leaves; the leaves' hashes are in the entries.
CREATE TABLE audit_entries (
    idx BIGINT PRIMARY KEY,
    event_id TEXT COLLATE "C" NOT NULL UNIQUE,
    time_ms BIGINT NOT NULL,
    tenant TEXT COLLATE "C" NOT NULL,
    actor_id TEXT COLLATE "C" NOT NULL,
    action TEXT COLLATE "C" NOT NULL,
    resource_type TEXT COLLATE "C" NOT NULL,
    resource_name TEXT COLLATE "C" NOT NULL,
    outcome SMALLINT NOT NULL,
    correlation_id TEXT COLLATE "C" NOT NULL,
    data BYTEA,
    leaf_hash BYTEA NOT NULL,
    erased_at BIGINT
);
CREATE INDEX audit_entries_action ON audit_entries (action, idx);
CREATE INDEX audit_entries_actor ON audit_entries (actor_id, idx);
CREATE INDEX audit_entries_resource ON audit_entries (resource_type, resource_name, idx);
CREATE INDEX audit_entries_correlation ON audit_entries (correlation_id, idx);
CREATE INDEX audit_entries_tenant ON audit_entries (tenant, idx);
CREATE INDEX audit_entries_time ON audit_entries (time_ms, idx);

-- The next index to hand out; appenders serialise on this one row.
CREATE TABLE audit_sequence (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    next_idx BIGINT NOT NULL
);
INSERT INTO audit_sequence (id, next_idx) VALUES (1, 0);

-- How many entries are in the tree; integrators serialise on this row.
CREATE TABLE audit_tree (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    size BIGINT NOT NULL
);
INSERT INTO audit_tree (id, size) VALUES (1, 0);

CREATE TABLE audit_nodes (
    level SMALLINT NOT NULL,
    idx BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    PRIMARY KEY (level, idx)
);

CREATE TABLE audit_checkpoints (
    tree_size BIGINT PRIMARY KEY,
    root_hash BYTEA NOT NULL,
    signed_at BIGINT NOT NULL,
    note TEXT NOT NULL
);

-- The generated checkpoint signing key, when none is configured.
CREATE TABLE audit_keys (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seed BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
