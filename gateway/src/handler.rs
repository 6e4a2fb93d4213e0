//! One request: look the route up, build the message, call upstream, write
//! JSON (or NDJSON / SSE for a server stream, raw bytes for `HttpBody`).
//! Every failure leaves through [`crate::error::status_response`].

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, StatusCode, header};
use prost_reflect::{DynamicMessage, ReflectMessage, Value};
use std::sync::Arc;
use tonic::Status;
use tonic::transport::server::TcpConnectInfo;

use crate::GatewayOptions;
use crate::codec::DynamicCodec;
use crate::error::{invalid, status_json, status_response};
use crate::metadata::{self, REQUEST_ID};
use crate::routes::{Binding, HTTP_BODY, Lookup, RouteTable};
use crate::transcode::{build_request, encode_json};
use crate::upstream::Upstreams;

/// The gateway's shared state.
pub(crate) struct Inner {
    pub table: RouteTable,
    pub upstreams: Upstreams,
    pub openapi: Bytes,
    pub options: GatewayOptions,
}

/// The label of requests no binding matched.
static UNMATCHED: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("unmatched"));

/// What the access log and metrics record of a request.
#[derive(Debug, Clone)]
pub(crate) struct RouteLabel(pub Arc<str>);

/// The fallback handler: every path that is not `/openapi.json` or `/docs`.
pub(crate) async fn handle(State(gw): State<Arc<Inner>>, req: Request) -> Response {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let request_id = plinth_runtime::server::request_id(req.headers());
    let mut response = match gw.table.lookup(req.method(), req.uri().path()) {
        Lookup::NotFound => {
            let status = Status::not_found(format!("no route for {} {}", req.method(), req.uri().path()));
            let mut r = status_response(&status, gw.table.pool(), None);
            r.extensions_mut().insert(RouteLabel(UNMATCHED.clone()));
            r
        }
        Lookup::WrongMethod(allowed) => {
            let status = Status::unimplemented(format!("method {} not allowed for {}", req.method(), req.uri().path()));
            let mut r = status_response(&status, gw.table.pool(), Some(StatusCode::METHOD_NOT_ALLOWED));
            if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
                r.headers_mut().insert(header::ALLOW, v);
            }
            r.extensions_mut().insert(RouteLabel(UNMATCHED.clone()));
            r
        }
        Lookup::Found(binding, captures) => {
            let label = RouteLabel(binding.label.clone());
            let mut r = match call(&gw, binding, captures, req, peer, &request_id).await {
                Ok(r) => r,
                Err((status, http)) => {
                    let mut r = status_response(&status, gw.table.pool(), http);
                    metadata::incoming(status.metadata(), r.headers_mut());
                    r
                }
            };
            r.extensions_mut().insert(label);
            r
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

type Failure = (Status, Option<StatusCode>);

async fn call(
    gw: &Inner,
    binding: &Binding,
    captures: Vec<crate::template::Capture>,
    req: Request,
    peer: Option<SocketAddr>,
    request_id: &str,
) -> Result<Response, Failure> {
    let rpc = &binding.rpc;
    let (parts, body) = req.into_parts();
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && len > gw.options.body_limit
    {
        return Err(too_large(gw.options.body_limit));
    }
    let body = axum::body::to_bytes(body, gw.options.body_limit)
        .await
        .map_err(|_| too_large(gw.options.body_limit))?;
    let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let message =
        build_request(binding, &captures, parts.uri.query(), &body, content_type).map_err(|e| (invalid(&e), None))?;
    let metadata = metadata::outgoing(&parts.headers, peer, request_id).map_err(|e| (invalid(&e), None))?;
    let timeout = metadata::grpc_timeout(&parts.headers).map_err(|e| (invalid(&e), None))?;

    let service = gw.upstreams.for_service(&rpc.service).ok_or_else(|| {
        (
            Status::unavailable(format!(
                "no upstream serves {}: enable its component here or set PLINTH_GATEWAY__UPSTREAMS__{}",
                rpc.service,
                crate::component_of(&rpc.service).to_uppercase()
            )),
            None,
        )
    })?;
    let mut extensions = tonic::Extensions::new();
    // In-process calls have no socket: give the service the client's address.
    extensions.insert(TcpConnectInfo {
        local_addr: None,
        remote_addr: peer,
    });
    let mut request = tonic::Request::from_parts(metadata, extensions, message);
    let streaming = rpc.method.is_server_streaming();
    let deadline = timeout.or((!streaming).then_some(gw.options.default_timeout));
    if let Some(d) = deadline {
        request.set_timeout(d);
    }
    let mut grpc = tonic::client::Grpc::new(service);
    grpc.ready().await.map_err(|e| {
        (
            Status::unavailable(format!("upstream for {} is unavailable: {e}", rpc.service)),
            None,
        )
    })?;
    let codec = DynamicCodec::new(rpc.output());
    let path = rpc.grpc_path.clone();
    let wants_sse = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));

    if streaming {
        let response = grpc
            .server_streaming(request, path, codec)
            .await
            .map_err(|s| (s, None))?;
        let (md, stream, _) = response.into_parts();
        return stream_response(gw, binding, md, stream, wants_sse).await;
    }
    let started = std::time::Instant::now();
    let call = grpc.unary(request, path, codec);
    let expired = |d: std::time::Duration| (Status::deadline_exceeded(format!("no answer within {d:?}")), None);
    let response = match deadline {
        Some(d) => match tokio::time::timeout(d, call).await {
            Err(_) => return Err(expired(d)),
            // tonic reports its own expired timeout as CANCELLED.
            Ok(Err(s)) if s.code() == tonic::Code::Cancelled && started.elapsed() >= d => return Err(expired(d)),
            Ok(r) => r,
        },
        None => call.await,
    }
    .map_err(|s| (s, None))?;
    let (md, message, _) = response.into_parts();
    let mut out = unary_body(binding, &message)?;
    metadata::incoming(&md, out.headers_mut());
    Ok(out)
}

fn too_large(limit: usize) -> Failure {
    (
        Status::resource_exhausted(format!("request body is larger than the limit of {limit} bytes")),
        Some(StatusCode::PAYLOAD_TOO_LARGE),
    )
}

fn internal(e: impl std::fmt::Display) -> Failure {
    (Status::internal(format!("cannot encode the response: {e}")), None)
}

fn unary_body(binding: &Binding, message: &DynamicMessage) -> Result<Response, Failure> {
    if message.descriptor().full_name() == HTTP_BODY {
        let (content_type, data) = http_body_parts(message);
        return Ok(raw(content_type, data));
    }
    let json = encode_json(message, binding.response_body.as_ref()).map_err(internal)?;
    Ok((
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        json,
    )
        .into_response())
}

fn http_body_parts(message: &DynamicMessage) -> (String, Bytes) {
    let content_type = message
        .get_field_by_name("content_type")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let data = match message.get_field_by_name("data").as_deref() {
        Some(Value::Bytes(b)) => b.clone(),
        _ => Bytes::new(),
    };
    (content_type, data)
}

fn raw(content_type: String, data: Bytes) -> Response {
    let ct = HeaderValue::from_str(&content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    ([(header::CONTENT_TYPE, ct)], data).into_response()
}

/// How long a server stream's first message is awaited before the status
/// line goes out anyway: long enough for an immediate error (bad request,
/// permission) to get its own HTTP status, short enough that a quiet live
/// tail answers at once instead of leaving the client without headers.
const FIRST_MESSAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A server stream: the first message (or error) is awaited, up to
/// [`FIRST_MESSAGE_WAIT`], before the status line, so an error before any
/// message gets its own HTTP status; later errors arrive in-band.
async fn stream_response(
    gw: &Inner,
    binding: &Binding,
    md: tonic::metadata::MetadataMap,
    mut stream: tonic::Streaming<DynamicMessage>,
    sse: bool,
) -> Result<Response, Failure> {
    let first = match tokio::time::timeout(FIRST_MESSAGE_WAIT, stream.next()).await {
        Ok(Some(Err(status))) => return Err((status, None)),
        Ok(Some(Ok(m))) => Some(m),
        Ok(None) | Err(_) => None,
    };
    let pool = gw.table.pool().clone();
    let response_field = binding.response_body.clone();
    let raw_body = binding.rpc.output().full_name() == HTTP_BODY;
    let content_type = if raw_body {
        first
            .as_ref()
            .map(|m| http_body_parts(m).0)
            .unwrap_or_else(|| "application/octet-stream".into())
    } else if sse {
        "text/event-stream".into()
    } else {
        "application/x-ndjson".into()
    };
    let encode = move |item: Result<DynamicMessage, Status>| -> Bytes {
        match item {
            Ok(m) if raw_body => http_body_parts(&m).1,
            Ok(m) => {
                let json = encode_json(&m, response_field.as_ref()).unwrap_or_else(|e| {
                    serde_json::to_vec(&status_json(&Status::internal(e.to_string()), &pool)).unwrap_or_default()
                });
                frame(sse, "result", &json)
            }
            Err(status) => {
                let json = serde_json::to_vec(&status_json(&status, &pool)).unwrap_or_default();
                frame(sse, "error", &json)
            }
        }
    };
    let body = futures::stream::iter(first.map(Ok))
        .chain(stream)
        .map(move |item| Ok::<_, std::convert::Infallible>(encode(item)));
    let mut response = Response::new(Body::from_stream(body));
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    metadata::incoming(&md, response.headers_mut());
    Ok(response)
}

/// One stream frame: NDJSON `{"result":…}\n` or SSE `data: {…}\n\n`
/// (`event: error` for a failure).
fn frame(sse: bool, kind: &str, json: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 24);
    if sse {
        if kind == "error" {
            out.extend_from_slice(b"event: error\n");
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(json);
        out.extend_from_slice(b"\n\n");
    } else {
        out.extend_from_slice(b"{\"");
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\":");
        out.extend_from_slice(json);
        out.extend_from_slice(b"}\n");
    }
    Bytes::from(out)
}
