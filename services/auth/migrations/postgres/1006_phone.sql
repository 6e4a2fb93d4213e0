-- Users may sign up with a phone number instead of (or besides) an email:
-- email becomes optional, phone is added (E.164, unique), at least one is required.
ALTER TABLE users ALTER COLUMN email DROP NOT NULL;
ALTER TABLE users ADD COLUMN phone TEXT UNIQUE;
ALTER TABLE users ADD CONSTRAINT users_email_or_phone CHECK (email IS NOT NULL OR phone IS NOT NULL);
