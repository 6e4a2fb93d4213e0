//! Traces leave the process over OTLP when an endpoint is configured, and the
//! W3C trace context of a request travels into the events it causes and out
//! of them into the consumer's span. One test per file: it owns the global
//! subscriber of this test process.

use std::collections::BTreeMap;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use plinth_runtime::config::{LogConfig, LogFormat};
use plinth_runtime::events::outbox::OutboxEvent;
use plinth_runtime::telemetry::{self, HeaderReader, HttpHeaderReader};
use tokio::sync::mpsc;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

struct Collector(mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[derive(Clone, PartialEq, prost::Message)]
struct Ping {
    #[prost(string, tag = "1")]
    note: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_export_over_otlp_and_trace_context_rides_on_events() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let tasks = plinth_runtime::Tasks::new();
    let token = tasks.token();
    tasks.spawn("fake-collector", async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                token.cancelled_owned(),
            )
            .await
    });

    let log = LogConfig {
        level: "info".into(),
        format: LogFormat::Json,
    };
    let guard = telemetry::init(&log, Some(&format!("http://{addr}")), "plinth-otlp-test").unwrap();

    // An incoming request with a traceparent: the span continues that trace.
    let mut incoming = http::HeaderMap::new();
    incoming.insert(
        "traceparent",
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    let span = tracing::info_span!("rpc", rpc = "/plinth.test.v1.Test/Do");
    telemetry::set_parent(&span, &HttpHeaderReader(&incoming));
    let event = span.in_scope(|| {
        assert_eq!(telemetry::current_trace_id().as_deref(), Some(TRACE_ID));
        OutboxEvent::new("plinth.test.pinged", "agg", &Ping { note: "hi".into() })
    });
    drop(span);
    let traceparent = event
        .headers
        .get("traceparent")
        .expect("events carry the trace context");
    assert!(traceparent.contains(TRACE_ID), "{traceparent}");

    // The consumer's span joins the same trace from the event's headers.
    let headers: BTreeMap<String, String> = event.headers.clone();
    let consumer = tracing::info_span!("consume", subject = %event.subject);
    telemetry::set_parent(&consumer, &HeaderReader(&headers));
    assert_eq!(
        consumer.in_scope(telemetry::current_trace_id).as_deref(),
        Some(TRACE_ID)
    );
    drop(consumer);

    tokio::task::spawn_blocking(move || guard.shutdown()).await.unwrap();
    let export = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let resource = format!("{:?}", export.resource_spans[0].resource);
    assert!(
        resource.contains("plinth-otlp-test"),
        "service.name missing: {resource}"
    );
    let spans: Vec<_> = export
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .collect();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"rpc") && names.contains(&"consume"), "{names:?}");
    let want: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&TRACE_ID[i * 2..i * 2 + 2], 16).unwrap())
        .collect();
    assert!(
        spans.iter().all(|s| s.trace_id == want),
        "every span belongs to the caller's trace"
    );
    tasks.shutdown(Duration::from_secs(5)).await;
}
