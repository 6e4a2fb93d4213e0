CREATE TABLE config_namespaces (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    generation BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE config_environments (
    namespace TEXT NOT NULL REFERENCES config_namespaces (name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    revision BIGINT NOT NULL,
    compacted_revision BIGINT NOT NULL,
    key_count BIGINT NOT NULL,
    generation BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (namespace, name)
);

-- The head: one row per live key.
CREATE TABLE config_values (
    namespace TEXT NOT NULL,
    environment TEXT NOT NULL,
    key TEXT NOT NULL,
    value_type SMALLINT NOT NULL,
    value BLOB NOT NULL,
    wrapped_key BLOB,
    kek_id TEXT,
    version BIGINT NOT NULL,
    create_revision BIGINT NOT NULL,
    mod_revision BIGINT NOT NULL,
    updated_by TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (namespace, environment, key),
    FOREIGN KEY (namespace, environment) REFERENCES config_environments (namespace, name) ON DELETE CASCADE
);

-- Every set and delete; value_type 0 marks a delete.
CREATE TABLE config_history (
    namespace TEXT NOT NULL,
    environment TEXT NOT NULL,
    revision BIGINT NOT NULL,
    key TEXT NOT NULL,
    value_type SMALLINT NOT NULL,
    value BLOB NOT NULL,
    wrapped_key BLOB,
    kek_id TEXT,
    version BIGINT NOT NULL,
    create_revision BIGINT NOT NULL,
    updated_by TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (namespace, environment, revision, key),
    FOREIGN KEY (namespace, environment) REFERENCES config_environments (namespace, name) ON DELETE CASCADE
);
CREATE INDEX config_history_by_key ON config_history (namespace, environment, key, revision);
CREATE INDEX config_history_sealed ON config_history (kek_id);

CREATE TABLE config_revisions (
    namespace TEXT NOT NULL,
    environment TEXT NOT NULL,
    revision BIGINT NOT NULL,
    author TEXT NOT NULL,
    message TEXT NOT NULL,
    kind TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    change_count INTEGER NOT NULL,
    keys TEXT NOT NULL,
    PRIMARY KEY (namespace, environment, revision),
    FOREIGN KEY (namespace, environment) REFERENCES config_environments (namespace, name) ON DELETE CASCADE
);

CREATE TABLE config_releases (
    namespace TEXT NOT NULL,
    environment TEXT NOT NULL,
    name TEXT NOT NULL,
    revision BIGINT NOT NULL,
    description TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    key_count BIGINT NOT NULL,
    PRIMARY KEY (namespace, environment, name),
    FOREIGN KEY (namespace, environment) REFERENCES config_environments (namespace, name) ON DELETE CASCADE
);

-- A release's frozen keys, copied so that compaction never touches them.
CREATE TABLE config_release_values (
    namespace TEXT NOT NULL,
    environment TEXT NOT NULL,
    release TEXT NOT NULL,
    key TEXT NOT NULL,
    value_type SMALLINT NOT NULL,
    value BLOB NOT NULL,
    wrapped_key BLOB,
    kek_id TEXT,
    version BIGINT NOT NULL,
    create_revision BIGINT NOT NULL,
    mod_revision BIGINT NOT NULL,
    updated_by TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (namespace, environment, release, key),
    FOREIGN KEY (namespace, environment, release) REFERENCES config_releases (namespace, environment, name) ON DELETE CASCADE
);

CREATE TABLE config_schemas (
    namespace TEXT NOT NULL REFERENCES config_namespaces (name) ON DELETE CASCADE,
    prefix TEXT NOT NULL,
    json_schema TEXT NOT NULL,
    updated_by TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (namespace, prefix)
);

-- Which key encryption key wraps new secrets (one row).
CREATE TABLE config_keyring (
    id SMALLINT PRIMARY KEY,
    active_kek TEXT NOT NULL
);
