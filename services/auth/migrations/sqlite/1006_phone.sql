-- no-transaction
-- Users may sign up with a phone number instead of (or besides) an email:
-- email becomes optional, phone is added, at least one is required. SQLite
-- cannot drop NOT NULL in place, so the table is rebuilt the documented way
-- (foreign keys off outside the transaction, copy, drop, rename), keeping
-- the references from sessions, api_keys and password_resets intact.
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;
CREATE TABLE users_new (
    id            TEXT    PRIMARY KEY,
    email         TEXT    UNIQUE,
    phone         TEXT    UNIQUE,
    password_hash TEXT    NOT NULL,
    display_name  TEXT    NOT NULL DEFAULT '',
    status        TEXT    NOT NULL DEFAULT 'active',
    roles         TEXT    NOT NULL DEFAULT '',
    created_at    BIGINT  NOT NULL,
    updated_at    BIGINT  NOT NULL,
    CHECK (email IS NOT NULL OR phone IS NOT NULL)
);
INSERT INTO users_new (id, email, password_hash, display_name, status, roles, created_at, updated_at)
    SELECT id, email, password_hash, display_name, status, roles, created_at, updated_at FROM users;
DROP TABLE users;
ALTER TABLE users_new RENAME TO users;
COMMIT;
PRAGMA foreign_keys = ON;
