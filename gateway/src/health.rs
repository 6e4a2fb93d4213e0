//! `/healthz` and `/readyz` as the edge sees them. A name this process knows
//! is answered from its own registry; any other is asked of the upstream that
//! serves it over `grpc.health.v1` (grpc-gateway's `WithHealthzEndpoint`
//! mapping: SERVING 200, NOT_SERVING 503, unknown 404, no health service 501).
//! `/readyz` adds every remote upstream's overall status, so a gateway-only
//! process is ready only when the components behind it are.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::{Value, json};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::error::status_response;
use crate::handler::Inner;
use plinth_runtime::health::status_name;

/// How long a readiness probe waits for an upstream.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(serde::Deserialize)]
pub(crate) struct HealthQuery {
    #[serde(default)]
    service: String,
}

/// `GET /healthz?service=X`.
pub(crate) async fn healthz(State(gw): State<Arc<Inner>>, Query(q): Query<HealthQuery>) -> Response {
    if let Some(health) = &gw.options.health
        && let Some(status) = health.status(&q.service)
    {
        let code = if status == ServingStatus::Serving {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return (code, axum::Json(json!({"status": status_name(status)}))).into_response();
    }
    let Some(upstream) = gw.upstreams.for_service(&q.service) else {
        let status = tonic::Status::not_found(format!("unknown service {}", q.service));
        return status_response(&status, gw.table.pool(), None);
    };
    match check(upstream, &q.service).await {
        Ok(WireStatus::Serving) => (StatusCode::OK, axum::Json(json!({"status": "SERVING"}))).into_response(),
        Ok(other) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": other.as_str_name()})),
        )
            .into_response(),
        Err(status) => status_response(&status, gw.table.pool(), None),
    }
}

/// `GET /readyz`: this process's entries plus `upstream.<component>` for each
/// remote upstream; 503 when any is not serving.
pub(crate) async fn readyz(State(gw): State<Arc<Inner>>) -> Response {
    let mut body = serde_json::Map::new();
    let mut ready = true;
    if let Some(health) = &gw.options.health {
        let (local_ready, names) = health.readiness();
        ready &= local_ready;
        body.extend(names.into_iter().map(|(k, v)| (k, Value::from(v))));
    }
    let probes = gw
        .upstreams
        .remotes()
        .into_iter()
        .map(|(component, service)| async move {
            let status = check(service, "").await;
            (component, status)
        });
    for (component, status) in futures::future::join_all(probes).await {
        let text = match status {
            Ok(WireStatus::Serving) => "SERVING".to_owned(),
            Ok(other) => other.as_str_name().to_owned(),
            Err(e) => format!("UNREACHABLE: {}", e.message()),
        };
        ready &= text == "SERVING";
        body.insert(format!("upstream.{component}"), Value::from(text));
    }
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(Value::Object(body))).into_response()
}

async fn check(upstream: crate::upstream::GrpcService, service: &str) -> Result<WireStatus, tonic::Status> {
    let mut client = HealthClient::new(upstream);
    let call = client.check(HealthCheckRequest {
        service: service.to_owned(),
    });
    let response = tokio::time::timeout(PROBE_TIMEOUT, call)
        .await
        .map_err(|_| tonic::Status::deadline_exceeded(format!("no health answer within {PROBE_TIMEOUT:?}")))??;
    Ok(response.into_inner().status())
}
