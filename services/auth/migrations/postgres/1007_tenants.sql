-- Optional tenants: a user or service account may belong to one; its tokens
-- say which, so services can keep tenants' data apart. '' is no tenant.
ALTER TABLE users ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
ALTER TABLE service_accounts ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
CREATE INDEX users_tenant ON users (tenant, id);
