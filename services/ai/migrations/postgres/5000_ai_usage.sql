-- One row per ai call: answered, failed or cancelled. Money in nano-dollars.
CREATE TABLE ai_usage (
    id TEXT PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    subject TEXT NOT NULL,
    api_key TEXT NOT NULL,
    operation TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    provider_model TEXT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    cost_nanos BIGINT NOT NULL,
    priced BOOLEAN NOT NULL,
    latency_ms BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    error TEXT NOT NULL,
    fallback_path TEXT NOT NULL,
    estimated BOOLEAN NOT NULL
);

CREATE INDEX ai_usage_by_time ON ai_usage (time_ms);
CREATE INDEX ai_usage_by_tenant ON ai_usage (tenant, time_ms);
