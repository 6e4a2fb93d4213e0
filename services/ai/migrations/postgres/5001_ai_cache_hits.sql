-- Calls answered from the response cache.
ALTER TABLE ai_usage ADD COLUMN cache_hit BOOLEAN NOT NULL DEFAULT FALSE;
