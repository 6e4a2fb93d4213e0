//! Every failure, the gateway's own or a service's, leaves as one body shape:
//! `google.rpc.Status` in proto3 JSON (`code`, `message`, `details` with
//! `@type`), with the HTTP status from the canonical gRPC → HTTP table.

use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::{HeaderValue, StatusCode, header};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

use crate::transcode::{TranscodeError, serialize_options};

/// The canonical HTTP status of a gRPC code (grpc-gateway v2, Envoy, Connect agree).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
    }
}

/// A request the gateway refuses before any upstream call.
pub fn invalid(e: &TranscodeError) -> tonic::Status {
    tonic::Status::with_error_details(
        Code::InvalidArgument,
        format!("{}: {}", e.field, e.reason),
        ErrorDetails::with_bad_request_violation(e.field.clone(), e.reason.clone()),
    )
}

/// `status` as the JSON body grpc-gateway sends.
pub fn status_json(status: &tonic::Status, pool: &DescriptorPool) -> serde_json::Value {
    let details: Vec<serde_json::Value> = if status.details().is_empty() {
        Vec::new()
    } else {
        match plinth::google::rpc::Status::decode(status.details()) {
            Ok(s) => s.details.iter().map(|any| any_json(any, pool)).collect(),
            Err(_) => Vec::new(),
        }
    };
    serde_json::json!({
        "code": status.code() as i32,
        "message": status.message(),
        "details": details,
    })
}

fn any_json(any: &prost_types::Any, pool: &DescriptorPool) -> serde_json::Value {
    let type_name = any.type_url.rsplit('/').next().unwrap_or_default();
    let decoded = pool
        .get_message_by_name(type_name)
        .and_then(|desc| DynamicMessage::decode(desc, any.value.as_slice()).ok())
        .and_then(|m| {
            m.serialize_with_options(serde_json::value::Serializer, &serialize_options())
                .ok()
        });
    match decoded {
        Some(serde_json::Value::Object(mut fields)) => {
            fields.insert("@type".into(), any.type_url.clone().into());
            serde_json::Value::Object(fields)
        }
        _ => serde_json::json!({
            "@type": any.type_url,
            "value": base64::engine::general_purpose::STANDARD.encode(&any.value),
        }),
    }
}

/// The HTTP response for `status`, with `WWW-Authenticate` on 401 and
/// `Retry-After` when the service sent `RetryInfo`.
pub fn status_response(status: &tonic::Status, pool: &DescriptorPool, http: Option<StatusCode>) -> Response {
    let code = http.unwrap_or_else(|| http_status(status.code()));
    let mut response = (
        code,
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        serde_json::to_vec(&status_json(status, pool))
            .unwrap_or_else(|_| br#"{"code":13,"message":"failed to marshal error message","details":[]}"#.to_vec()),
    )
        .into_response();
    let headers = response.headers_mut();
    if status.code() == Code::Unauthenticated {
        let description: String = status
            .message()
            .chars()
            .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '"' && *c != '\\')
            .collect();
        if let Ok(v) = HeaderValue::from_str(&format!(
            "Bearer realm=\"plinth\", error=\"invalid_token\", error_description=\"{description}\""
        )) {
            headers.insert(header::WWW_AUTHENTICATE, v);
        }
    }
    if let Some(retry) = status.get_details_retry_info().and_then(|r| r.retry_delay) {
        let secs = retry.as_secs() + u64::from(retry.subsec_nanos() > 0);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    response
}
