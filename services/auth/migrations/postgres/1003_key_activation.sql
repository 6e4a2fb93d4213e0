-- A rotated-in key is published before it signs: it signs from activates_at.
ALTER TABLE signing_keys ADD COLUMN activates_at BIGINT NOT NULL DEFAULT 0;
