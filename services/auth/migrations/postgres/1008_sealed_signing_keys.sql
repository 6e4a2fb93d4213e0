-- Token signing keys sealed at rest under a key encryption key
-- (PLINTH_AUTH__KEYS, or the generated key file of an embedded deployment):
-- the seed, encrypted under its own data key, and that key wrapped by the
-- KEK named in kek_id. A sealed row keeps an empty seed.
ALTER TABLE signing_keys ADD COLUMN sealed_seed BYTEA;
ALTER TABLE signing_keys ADD COLUMN wrapped_key BYTEA;
ALTER TABLE signing_keys ADD COLUMN kek_id TEXT;
