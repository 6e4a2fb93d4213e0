//! Edge duties around the transcoder: an access log line and Prometheus
//! metrics per request (labelled by route template, never by raw path),
//! per-client rate limiting, security headers, CORS, and compression of
//! unary responses (streams are never buffered by a compressor).

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderValue, Method, header};
use prometheus::{HistogramVec, IntCounterVec};
use tonic_types::{ErrorDetails, StatusExt};
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

use crate::error::status_response;
use crate::handler::{Inner, RouteLabel, handle};
use crate::health;
use crate::metadata::REQUEST_ID;

struct EdgeMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

static METRICS: LazyLock<EdgeMetrics> = LazyLock::new(|| EdgeMetrics {
    requests: plinth_runtime::metrics::counter_vec(
        "plinth_gateway_requests_total",
        "HTTP requests through the gateway, by route template, method and HTTP status.",
        &["route", "method", "status"],
    ),
    duration: plinth_runtime::metrics::histogram_vec(
        "plinth_gateway_request_duration_seconds",
        "Time to the response head of HTTP requests through the gateway, by route template.",
        &["route"],
        vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ],
    ),
});

/// The gateway's router with every edge layer, and the health endpoints.
pub(crate) fn router(inner: Arc<Inner>) -> axum::Router {
    let mut router = axum::Router::new()
        .route("/openapi.json", get(openapi))
        .route("/docs", get(docs))
        .merge(crate::openai::routes())
        .fallback(handle)
        .layer(middleware::from_fn_with_state(inner.clone(), rate_limit))
        // Probes are not rate limited.
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .with_state(inner.clone());
    if inner.options.compression {
        let predicate = SizeAbove::new(256)
            .and(NotForContentType::const_new("application/x-ndjson"))
            .and(NotForContentType::const_new("text/event-stream"))
            .and(NotForContentType::const_new("application/grpc"));
        router = router.layer(CompressionLayer::new().gzip(true).br(true).compress_when(predicate));
    }
    if let Some(cors) = cors(&inner.options.cors_origins) {
        router = router.layer(cors);
    }
    router
        .layer(middleware::from_fn(security_headers))
        .layer(middleware::from_fn(observe))
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
        .allow_headers(Any)
        .expose_headers(Any)
        .max_age(Duration::from_secs(600));
    Some(if origins.iter().any(|o| o == "*") {
        layer.allow_origin(Any)
    } else {
        let list: Vec<HeaderValue> = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
        layer.allow_origin(AllowOrigin::list(list))
    })
}

async fn openapi(State(gw): State<Arc<Inner>>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        gw.openapi.clone(),
    )
        .into_response()
}

async fn docs() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        include_str!("docs.html"),
    )
        .into_response()
}

async fn rate_limit(State(gw): State<Arc<Inner>>, req: Request, next: Next) -> Response {
    let Some(limiter) = &gw.options.rate_limit else {
        return next.run(req).await;
    };
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let forwarded = req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok());
    let client = gw
        .options
        .trusted_proxies
        .client(peer, forwarded)
        .map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
    match limiter.check(&client, 1).await {
        Ok(d) if !d.allowed => {
            let status = tonic::Status::with_error_details(
                tonic::Code::ResourceExhausted,
                "too many requests from this client",
                ErrorDetails::with_retry_info(Some(d.retry_after.max(Duration::from_millis(1)))),
            );
            status_response(&status, gw.table.pool(), None)
        }
        Ok(_) => next.run(req).await,
        Err(e) => {
            // Fail open: a rate-limit store outage must not take the API down.
            tracing::warn!(error = %e, "rate limit state unavailable, request allowed");
            next.run(req).await
        }
    }
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
            ),
        );
    }
    response
}

/// One access-log line and the metrics of every request.
async fn observe(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let response = next.run(req).await;
    let route = response
        .extensions()
        .get::<RouteLabel>()
        .map_or_else(|| Arc::from(path.as_str()), |r| r.0.clone());
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    let status_label = status.to_string();
    METRICS
        .requests
        .with_label_values(&[&*route, method.as_str(), status_label.as_str()])
        .inc();
    METRICS
        .duration
        .with_label_values(&[&*route])
        .observe(elapsed.as_secs_f64());
    let request_id = response
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    tracing::info!(
        method = %method,
        path = %path,
        route = %route,
        status,
        elapsed_us = elapsed.as_micros() as u64,
        request_id,
        "http request"
    );
    response
}
