-- API keys, stored only as HMAC-SHA256 digests under a server secret
-- (hmac_keys), found by a random lookup id that is part of the key.
CREATE TABLE api_keys (
    id           TEXT    PRIMARY KEY,
    user_id      TEXT    NOT NULL REFERENCES users (id),
    lookup       TEXT    NOT NULL UNIQUE,
    digest       TEXT    NOT NULL,
    display_name TEXT    NOT NULL,
    scopes       TEXT    NOT NULL DEFAULT '',
    created_at   BIGINT  NOT NULL,
    expires_at   BIGINT,
    last_used_at BIGINT,
    revoked_at   BIGINT
);
CREATE INDEX api_keys_user ON api_keys (user_id);

CREATE TABLE hmac_keys (
    id         TEXT   PRIMARY KEY,
    secret     BLOB   NOT NULL,
    created_at BIGINT NOT NULL
);
