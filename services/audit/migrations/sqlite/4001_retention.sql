-- Retention policies: entries matching a policy are erased (payload and
-- personal columns removed, leaf hash kept) once older than `retain_ms`.
CREATE TABLE audit_retention (
    name TEXT PRIMARY KEY,
    action_prefix TEXT NOT NULL,
    tenant TEXT NOT NULL,
    retain_ms BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Erasure on request finds a subject as actor or as resource.
CREATE INDEX audit_entries_resource_name ON audit_entries (resource_name);
