-- Role-based access control as data. Built-in roles live in code; custom
-- roles here. Unscoped bindings are the `roles` of users and service
-- accounts; scoped ones are rows of role_bindings.
CREATE TABLE roles (
    name        TEXT    PRIMARY KEY,
    description TEXT    NOT NULL,
    permissions TEXT    NOT NULL,
    inherits    TEXT    NOT NULL,
    level       INTEGER NOT NULL,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL
);

CREATE TABLE role_bindings (
    subject    TEXT   NOT NULL,
    role       TEXT   NOT NULL,
    scope      TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (subject, role, scope)
);
CREATE INDEX role_bindings_role ON role_bindings (role);

-- One counter bumped in every transaction that changes what anyone may do.
-- Writers serialise on this row, so versions commit in order; replicas
-- compare it with the version of their compiled view.
CREATE TABLE rbac_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT  NOT NULL
);
INSERT INTO rbac_version (id, version) VALUES (1, 1);
