-- Password reset tokens, stored only as SHA-256 digests; single use.
CREATE TABLE password_resets (
    digest     TEXT   PRIMARY KEY,
    user_id    TEXT   NOT NULL REFERENCES users (id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at    BIGINT
);
CREATE INDEX password_resets_user ON password_resets (user_id);
