//! A test-only gRPC service for the gateway's tests and benchmark: the
//! `plinth.gatewaytest.v1.EchoService` contract (compiled by `build.rs`) served
//! dynamically, echoing each request back so a test can see exactly which
//! message an HTTP request became. Not part of any production path.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use futures::Stream;
use prost_reflect::{DescriptorPool, DynamicMessage, MapKey, MethodDescriptor, Value};
use tonic::metadata::{KeyAndValueRef, MetadataValue};
use tonic::server::{NamedService, ServerStreamingService, UnaryService};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::codec::DynamicCodec;

/// The echo contract's encoded `FileDescriptorSet` (with Google's imports).
pub const ECHO_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/echo_descriptor.bin"));

const SERVICE: &str = "plinth.gatewaytest.v1.EchoService";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The echo service. Clones share the live-stream counter.
#[derive(Clone)]
pub struct EchoServer {
    pool: DescriptorPool,
    live_streams: Arc<AtomicUsize>,
}

impl std::fmt::Debug for EchoServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchoServer").finish()
    }
}

impl EchoServer {
    /// The server, or why the embedded descriptor set does not decode.
    pub fn new() -> Result<Self, prost_reflect::DescriptorError> {
        Ok(Self {
            pool: DescriptorPool::decode(ECHO_DESCRIPTOR_SET)?,
            live_streams: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// How many `Stream` calls are being served right now.
    pub fn live_streams(&self) -> usize {
        self.live_streams.load(Ordering::SeqCst)
    }
}

impl NamedService for EchoServer {
    const NAME: &'static str = SERVICE;
}

impl tower::Service<http::Request<tonic::body::Body>> for EchoServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let server = self.clone();
        Box::pin(async move {
            let name = req.uri().path().rsplit('/').next().unwrap_or_default().to_owned();
            let method = server
                .pool
                .get_service_by_name(SERVICE)
                .and_then(|s| s.methods().find(|m| m.name() == name));
            let Some(method) = method else {
                return Ok(Status::unimplemented(format!("no method {name}")).into_http());
            };
            let mut grpc = tonic::server::Grpc::new(DynamicCodec::new(method.input()));
            if method.is_server_streaming() {
                Ok(grpc
                    .server_streaming(
                        Streamer {
                            method,
                            live: server.live_streams.clone(),
                        },
                        req,
                    )
                    .await)
            } else {
                Ok(grpc.unary(Unary { method }, req).await)
            }
        })
    }
}

struct Unary {
    method: MethodDescriptor,
}

impl UnaryService<DynamicMessage> for Unary {
    type Response = DynamicMessage;
    type Future = BoxFuture<Result<tonic::Response<DynamicMessage>, Status>>;

    fn call(&mut self, request: tonic::Request<DynamicMessage>) -> Self::Future {
        let method = self.method.clone();
        Box::pin(async move {
            let output = method.output();
            let (metadata, _, message) = request.into_parts();
            let int = |m: &DynamicMessage, f: &str| m.get_field_by_name(f).and_then(|v| v.as_i32()).unwrap_or(0);
            let string = |m: &DynamicMessage, f: &str| {
                m.get_field_by_name(f)
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            };
            match method.name() {
                "Fail" => {
                    let code = Code::from_i32(int(&message, "code"));
                    let text = string(&message, "message");
                    let with_details = message
                        .get_field_by_name("with_details")
                        .and_then(|v| v.as_bool())
                        .unwrap_or(false);
                    let mut status = if with_details {
                        let mut details = ErrorDetails::with_error_info(
                            "ECHO_FAILED",
                            "gatewaytest.plinth.dev",
                            [("asked".to_owned(), format!("{code:?}"))]
                                .into_iter()
                                .collect::<std::collections::HashMap<String, String>>(),
                        );
                        details.add_bad_request_violation("code", "asked to fail");
                        Status::with_error_details(code, text, details)
                    } else {
                        Status::new(code, text)
                    };
                    status
                        .metadata_mut()
                        .insert("x-fail", MetadataValue::from_static("yes"));
                    Err(status)
                }
                "Download" => {
                    let mut body = DynamicMessage::new(output);
                    body.set_field_by_name("content_type", Value::String("text/plain; charset=utf-8".into()));
                    body.set_field_by_name(
                        "data",
                        Value::Bytes(format!("hello {}", string(&message, "name")).into_bytes().into()),
                    );
                    Ok(tonic::Response::new(body))
                }
                "Upload" => {
                    let size = match message.get_field_by_name("data").as_deref() {
                        Some(Value::Bytes(b)) => b.len() as i64,
                        _ => 0,
                    };
                    let mut out = DynamicMessage::new(output);
                    out.set_field_by_name("content_type", Value::String(string(&message, "content_type")));
                    out.set_field_by_name("size", Value::I64(size));
                    Ok(tonic::Response::new(out))
                }
                "Headers" => {
                    let mut map = std::collections::HashMap::new();
                    for entry in metadata.iter() {
                        let (k, v) = match entry {
                            KeyAndValueRef::Ascii(k, v) => (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()),
                            KeyAndValueRef::Binary(k, v) => (
                                k.as_str().to_owned(),
                                base64::engine::general_purpose::STANDARD.encode(v.to_bytes().unwrap_or_default()),
                            ),
                        };
                        map.insert(MapKey::String(k), Value::String(v));
                    }
                    let mut out = DynamicMessage::new(output);
                    out.set_field_by_name("metadata", Value::Map(map));
                    let mut response = tonic::Response::new(out);
                    response
                        .metadata_mut()
                        .insert("x-echo", MetadataValue::from_static("yes"));
                    response
                        .metadata_mut()
                        .insert_bin("x-echo-bin", tonic::metadata::MetadataValue::from_bytes(b"\x00\x01"));
                    Ok(response)
                }
                "Slow" => {
                    tokio::time::sleep(Duration::from_millis(
                        u64::try_from(int(&message, "millis")).unwrap_or(0),
                    ))
                    .await;
                    Ok(tonic::Response::new(DynamicMessage::new(output)))
                }
                _ => Ok(tonic::Response::new(message)),
            }
        })
    }
}

struct Streamer {
    method: MethodDescriptor,
    live: Arc<AtomicUsize>,
}

/// Counts a stream as live until it is dropped (finished or cancelled).
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ServerStreamingService<DynamicMessage> for Streamer {
    type Response = DynamicMessage;
    type ResponseStream = Pin<Box<dyn Stream<Item = Result<DynamicMessage, Status>> + Send>>;
    type Future = BoxFuture<Result<tonic::Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: tonic::Request<DynamicMessage>) -> Self::Future {
        let output = self.method.output();
        let live = self.live.clone();
        Box::pin(async move {
            let message = request.into_inner();
            let count = message.get_field_by_name("count").and_then(|v| v.as_i32()).unwrap_or(0);
            let fail = message
                .get_field_by_name("fail_at_end")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            let interval = message
                .get_field_by_name("interval_millis")
                .and_then(|v| v.as_i32())
                .unwrap_or(0);
            let first_delay = message
                .get_field_by_name("first_delay_millis")
                .and_then(|v| v.as_i32())
                .unwrap_or(0);
            if count < 0 {
                return Err(Status::invalid_argument("count: must not be negative"));
            }
            live.fetch_add(1, Ordering::SeqCst);
            let guard = LiveGuard(live);
            let stream = futures::stream::unfold((0, guard), move |(i, guard)| {
                let output = output.clone();
                async move {
                    if i > count {
                        return None;
                    }
                    if i == count {
                        return fail.then(|| {
                            (
                                Err(Status::aborted("stream failed at the end as asked")),
                                (i + 1, guard),
                            )
                        });
                    }
                    let pause = if i == 0 { first_delay } else { interval };
                    if pause > 0 {
                        tokio::time::sleep(Duration::from_millis(u64::try_from(pause).unwrap_or(0))).await;
                    }
                    let mut m = DynamicMessage::new(output);
                    m.set_field_by_name("id", Value::String(i.to_string()));
                    m.set_field_by_name("count", Value::I64(i64::from(i)));
                    Some((Ok(m), (i + 1, guard)))
                }
            });
            Ok(tonic::Response::new(Box::pin(stream) as Self::ResponseStream))
        })
    }
}
