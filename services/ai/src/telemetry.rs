//! OpenTelemetry GenAI semantic conventions: every call runs in a span
//! named `{operation} {model}` with the `gen_ai.*` attributes (exported over
//! OTLP when configured), and feeds the two GenAI client metrics, here in
//! Prometheus form: `gen_ai_client_token_usage` (tokens per call, by token
//! type) and `gen_ai_client_operation_duration_seconds`.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::HistogramVec;

use crate::model::Usage;
use crate::service::Served;

struct Metrics {
    tokens: HistogramVec,
    duration: HistogramVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    tokens: plinth_runtime::metrics::histogram_vec(
        "gen_ai_client_token_usage",
        "Tokens used per ai call, by operation, provider, logical model and token type (input or output).",
        &[
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
            "gen_ai_token_type",
        ],
        vec![
            1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
        ],
    ),
    duration: plinth_runtime::metrics::histogram_vec(
        "gen_ai_client_operation_duration_seconds",
        "Duration of ai calls from request to last byte, by operation, provider, logical model and error type.",
        &[
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
            "error_type",
        ],
        vec![
            0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
        ],
    ),
});

/// The semantic-conventions operation name of one of our operations.
pub fn operation_name(operation: &str) -> &'static str {
    match operation {
        "embed" => "embeddings",
        _ => "chat",
    }
}

/// A span for one call of `operation` on logical `model`.
pub fn span(operation: &str, model: &str) -> tracing::Span {
    let op = operation_name(operation);
    tracing::info_span!(
        "gen_ai",
        otel.name = %format!("{op} {model}"),
        otel.kind = "client",
        gen_ai.operation.name = op,
        gen_ai.request.model = %model,
        gen_ai.provider.name = tracing::field::Empty,
        gen_ai.response.model = tracing::field::Empty,
        gen_ai.response.id = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

/// Records a finished call on the current span and in the metrics.
pub fn finished(operation: &str, served: &Served, usage: &Usage, took: Duration, error: Option<&str>) {
    let span = tracing::Span::current();
    let op = operation_name(operation);
    let model = served.model.as_str();
    let kind = served.kind;
    if !kind.is_empty() {
        span.record("gen_ai.provider.name", kind);
        span.record("gen_ai.response.model", served.provider_model.as_str());
        span.record("gen_ai.response.id", served.id.as_str());
        span.record("gen_ai.usage.input_tokens", usage.input_tokens);
        span.record("gen_ai.usage.output_tokens", usage.output_tokens);
        let m = &*METRICS;
        m.tokens
            .with_label_values(&[op, kind, model, "input"])
            .observe(usage.input_tokens as f64);
        m.tokens
            .with_label_values(&[op, kind, model, "output"])
            .observe(usage.output_tokens as f64);
    }
    if let Some(e) = error {
        span.record("error.type", e);
    }
    METRICS
        .duration
        .with_label_values(&[
            op,
            if kind.is_empty() { "none" } else { kind },
            model,
            error.unwrap_or(""),
        ])
        .observe(took.as_secs_f64());
}
