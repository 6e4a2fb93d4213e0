-- Non-human identities; their client secrets are stored only as HMAC digests.
CREATE TABLE service_accounts (
    id            TEXT   PRIMARY KEY,
    display_name  TEXT   NOT NULL,
    roles         TEXT   NOT NULL,
    secret_digest TEXT   NOT NULL,
    created_at    BIGINT NOT NULL,
    deleted_at    BIGINT
);
