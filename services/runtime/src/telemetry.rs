//! Logs, traces and W3C trace-context propagation. JSON log lines carry the
//! request's span fields (request id, trace id, RPC); traces go to OTLP when an
//! endpoint is configured. Metrics live in [`crate::metrics`], not here.

use std::collections::BTreeMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat};

/// Telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built from the endpoint.
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT: {0}")]
    Otlp(String),
    /// A global subscriber was already installed.
    #[error("logging was already initialised: {0}")]
    AlreadyInitialised(String),
}

/// Keeps the tracer provider alive; [`TelemetryGuard::shutdown`] flushes spans.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl TelemetryGuard {
    /// Flushes pending spans to the exporter (last step of shutdown).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "trace exporter did not flush cleanly");
        }
    }
}

/// Installs the global subscriber: JSON (or text) logs on stdout, and spans to
/// `otlp_endpoint` when set. Trace ids exist even without an exporter, so every
/// log line of a request carries one.
pub fn init(log: &LogConfig, otlp_endpoint: Option<&str>, service: &str) -> Result<TelemetryGuard, TelemetryError> {
    let mut builder = SdkTracerProvider::builder().with_resource(
        opentelemetry_sdk::Resource::builder()
            .with_service_name(service.to_owned())
            .build(),
    );
    if let Some(endpoint) = otlp_endpoint.filter(|e| !e.is_empty()) {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("plinth"));

    let filter = EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_target(true)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_target(false).boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInitialised(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}

/// The current span's trace id as 32 hex digits, if it has one.
pub fn current_trace_id() -> Option<String> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Makes `span` a child of the W3C trace context found in `carrier`, if any.
pub fn set_parent(span: &tracing::Span, carrier: &dyn Extractor) {
    let cx = TraceContextPropagator::new().extract(carrier);
    if cx.span().span_context().is_valid() {
        // A failure only means the span is already closed or filtered out.
        let _ = span.set_parent(cx);
    }
}

/// Writes the current span's W3C trace context (`traceparent`, `tracestate`) into `carrier`.
pub fn inject_current(carrier: &mut dyn Injector) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, carrier);
}

/// String headers (events, NATS) as a propagation carrier.
pub struct HeaderCarrier<'a>(pub &'a mut BTreeMap<String, String>);

impl Injector for HeaderCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

/// Read-only string headers as a propagation carrier.
pub struct HeaderReader<'a>(pub &'a BTreeMap<String, String>);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// HTTP/gRPC request headers as a propagation carrier.
pub struct HttpHeaderReader<'a>(pub &'a http::HeaderMap);

impl Extractor for HttpHeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Outgoing HTTP/gRPC request headers as a propagation carrier.
pub struct HttpHeaderWriter<'a>(pub &'a mut http::HeaderMap);

impl Injector for HttpHeaderWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (http::HeaderName::try_from(key), http::HeaderValue::try_from(value)) {
            self.0.insert(name, value);
        }
    }
}
