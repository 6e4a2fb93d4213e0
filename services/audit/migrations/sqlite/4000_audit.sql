-- The audit log. `audit_entries` holds each event's canonical bytes (the
-- leaf data; NULL once erased) with the columns queries filter on, copied
-- from those bytes. `audit_nodes` holds every complete perfect subtree of
-- the Merkle tree above the leaves; the leaves' hashes are in the entries.
CREATE TABLE audit_entries (
    idx BIGINT PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    time_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    actor_id TEXT NOT NULL,
    action TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_name TEXT NOT NULL,
    outcome INTEGER NOT NULL,
    correlation_id TEXT NOT NULL,
    data BLOB,
    leaf_hash BLOB NOT NULL,
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
    level INTEGER NOT NULL,
    idx BIGINT NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)
);

CREATE TABLE audit_checkpoints (
    tree_size BIGINT PRIMARY KEY,
    root_hash BLOB NOT NULL,
    signed_at BIGINT NOT NULL,
    note TEXT NOT NULL
);

-- The generated checkpoint signing key, when none is configured.
CREATE TABLE audit_keys (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seed BLOB NOT NULL,
    created_at BIGINT NOT NULL
);
