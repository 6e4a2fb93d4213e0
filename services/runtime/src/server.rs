//! The one server builder: every service is registered here with its
//! descriptor set, so health, reflection, telemetry and metrics are never
//! forgotten. It binds the gRPC and HTTP listeners first (port 0 allowed),
//! reports the real addresses, then serves until shutdown and drains within
//! a bound. Routing of HTTP/JSON to gRPC is the gateway's, not this module's.

use std::convert::Infallible;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::response::IntoResponse;
use axum::routing::get;
use http::{HeaderValue, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::auth::AuthLayer;
use crate::coalesce::CoalescedWrites;
use crate::config::TlsConfig;
use crate::health::Health;
use crate::{metrics, telemetry};

/// The header carrying a request's id, generated when the caller sends none.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Starting the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The setting that chose it.
        key: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A TLS file could not be read or used.
    #[error("TLS: {key} ({path}): {reason}")]
    Tls {
        /// The setting naming the file.
        key: &'static str,
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Reflection could not read a descriptor set.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The gRPC server failed while serving.
    #[error("gRPC server: {0}")]
    Serve(String),
}

/// Collects services, then binds.
pub struct ServerBuilder {
    routes: RoutesBuilder,
    descriptor_sets: Vec<&'static [u8]>,
    health: Health,
    http: axum::Router,
    auth: AuthLayer,
}

impl ServerBuilder {
    /// A builder with the health service and the admin HTTP routes
    /// (`/metrics`; `/healthz` and `/readyz` unless a gateway takes them over).
    pub fn new() -> (Self, Health) {
        let (reporter, service) = tonic_health::server::health_reporter();
        let health = Health::new(reporter);
        let mut routes = RoutesBuilder::default();
        routes.add_service(service);
        let builder = Self {
            routes,
            descriptor_sets: vec![tonic_health::pb::FILE_DESCRIPTOR_SET],
            health: health.clone(),
            http: metrics_router(),
            auth: AuthLayer::deny_all(),
        };
        (builder, health)
    }

    /// Registers a gRPC service and the descriptor set that describes it.
    pub fn add_service<S>(mut self, service: S, descriptor_set: &'static [u8]) -> Self
    where
        S: Service<Request<tonic::body::Body>, Error = Infallible> + NamedService + Clone + Send + Sync + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.routes.add_service(service);
        if !self.descriptor_sets.contains(&descriptor_set) {
            self.descriptor_sets.push(descriptor_set);
        }
        self
    }

    /// Authenticates and authorises every call with `auth`. Without it only
    /// health and reflection answer.
    pub fn with_auth(mut self, auth: AuthLayer) -> Self {
        self.auth = auth;
        self
    }

    /// Merges HTTP routes (the gateway) into the HTTP listener.
    pub fn add_http(mut self, router: axum::Router) -> Self {
        self.http = self.http.merge(router);
        self
    }

    /// Binds both listeners and builds the services. Nothing is served yet.
    pub async fn bind(
        mut self,
        grpc: SocketAddr,
        http: SocketAddr,
        tls: Option<&TlsConfig>,
    ) -> Result<BoundServer, ServerError> {
        let mut reflection_v1 = tonic_reflection::server::Builder::configure();
        let mut reflection_v1alpha = tonic_reflection::server::Builder::configure();
        for set in &self.descriptor_sets {
            reflection_v1 = reflection_v1.register_encoded_file_descriptor_set(set);
            reflection_v1alpha = reflection_v1alpha.register_encoded_file_descriptor_set(set);
        }
        let v1 = reflection_v1
            .build_v1()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;
        let v1alpha = reflection_v1alpha
            .build_v1alpha()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;
        self.routes.add_service(v1).add_service(v1alpha);

        let http_tls = tls.map(load_http_tls).transpose()?;
        let tls = tls.map(load_tls).transpose()?;
        let grpc_listener = TcpListener::bind(grpc).await.map_err(|source| ServerError::Bind {
            addr: grpc,
            key: "PLINTH_GRPC_LISTEN",
            source,
        })?;
        let http_listener = TcpListener::bind(http).await.map_err(|source| ServerError::Bind {
            addr: http,
            key: "PLINTH_HTTP_LISTEN",
            source,
        })?;
        let grpc_addr = grpc_listener.local_addr().map_err(|source| ServerError::Bind {
            addr: grpc,
            key: "PLINTH_GRPC_LISTEN",
            source,
        })?;
        let http_addr = http_listener.local_addr().map_err(|source| ServerError::Bind {
            addr: http,
            key: "PLINTH_HTTP_LISTEN",
            source,
        })?;
        let routes = self.routes.routes();
        let in_process = InProcess {
            inner: tower::ServiceBuilder::new()
                .layer(ObserveLayer)
                .layer(self.auth.clone())
                .service(routes.clone()),
        };
        Ok(BoundServer {
            grpc_listener,
            http_listener,
            grpc_addr,
            http_addr,
            in_process,
            routes,
            http: self.http,
            health_routes: true,
            http_tls,
            tls,
            health: self.health,
            auth: self.auth,
        })
    }
}

/// Listeners bound, ready to serve.
pub struct BoundServer {
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    /// The real gRPC address (after port 0 is resolved).
    pub grpc_addr: SocketAddr,
    /// The real HTTP address.
    pub http_addr: SocketAddr,
    in_process: InProcess,
    routes: Routes,
    http: axum::Router,
    health_routes: bool,
    http_tls: Option<Arc<rustls::ServerConfig>>,
    tls: Option<ServerTlsConfig>,
    health: Health,
    auth: AuthLayer,
}

/// The registered services with the same layers the gRPC listener applies
/// (telemetry, authentication, permissions), callable without a socket: what
/// the gateway calls in the all-in-one process.
#[derive(Clone)]
pub struct InProcess {
    inner: Observe<crate::auth::AuthService<Routes>>,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess").finish()
    }
}

impl Service<Request<tonic::body::Body>> for InProcess {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<Request<tonic::body::Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        self.inner.call(req)
    }
}

impl BoundServer {
    /// The services, callable in-process (see [`InProcess`]).
    pub fn in_process(&self) -> InProcess {
        self.in_process.clone()
    }

    /// Merges the gateway's routes (built from [`BoundServer::in_process`])
    /// into the HTTP listener. The gateway answers `/healthz` and `/readyz`
    /// itself, upstreams included, so the local-only versions are dropped.
    pub fn add_gateway(&mut self, router: axum::Router) {
        self.http = std::mem::take(&mut self.http).merge(router);
        self.health_routes = false;
    }

    /// The health registry, for a gateway's `/healthz` and `/readyz`.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Serves until `shutdown` is cancelled, then marks health NOT_SERVING,
    /// stops accepting, and gives in-flight calls `grace` to finish.
    pub async fn serve(self, shutdown: CancellationToken, grace: Duration) -> Result<(), ServerError> {
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls).map_err(|e| ServerError::Tls {
                key: "PLINTH_TLS__CERT",
                path: String::new(),
                reason: e.to_string(),
            })?;
        }
        let health = self.health.clone();
        let draining = {
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                health.shutting_down().await;
            }
        };
        let grpc = builder
            .layer(ObserveLayer)
            .layer(self.auth)
            .add_routes(self.routes)
            .serve_with_incoming_shutdown(incoming(self.grpc_listener), draining);
        let router = if self.health_routes {
            self.http.merge(health_router(self.health.clone()))
        } else {
            self.http
        };
        let http: Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> = match self.http_tls {
            Some(tls) => Box::pin(serve_https(self.http_listener, router, tls, shutdown.clone())),
            None => Box::pin(
                axum::serve(
                    self.http_listener,
                    router.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                .into_future(),
            ),
        };

        let both = async {
            let (g, h) = tokio::join!(grpc, http);
            if let Err(e) = h {
                tracing::error!(error = %e, "http server failed");
            }
            g.map_err(|e| ServerError::Serve(e.to_string()))
        };
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            result = both => result,
            () = deadline => {
                tracing::warn!(grace_secs = grace.as_secs(), "in-flight calls did not finish before the deadline, closing them");
                Ok(())
            }
        }
    }
}

fn load_tls(cfg: &TlsConfig) -> Result<ServerTlsConfig, ServerError> {
    let read = |key: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| ServerError::Tls {
            key,
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    };
    let cert = read("PLINTH_TLS__CERT", &cfg.cert)?;
    let key = read("PLINTH_TLS__KEY", &cfg.key)?;
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca) = &cfg.client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read("PLINTH_TLS__CLIENT_CA", ca)?));
    }
    Ok(tls)
}

/// Accepted connections of `listener` with Nagle's algorithm off, their
/// writes coalesced (see [`CoalescedWrites`]). tonic sets `TCP_NODELAY` only
/// on listeners it binds itself; without it small gRPC responses can wait
/// ~40 ms for a delayed ACK.
pub fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<CoalescedWrites<tokio::net::TcpStream>>> {
    use futures::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(CoalescedWrites::new(conn))
    })
}

/// The HTTP listener's TLS: the same certificate as gRPC (no client
/// certificates: browsers and `curl` reach the gateway here), HTTP/2 and 1.1.
fn load_http_tls(cfg: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let err = |key: &'static str, path: &std::path::Path, reason: String| ServerError::Tls {
        key,
        path: path.display().to_string(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| err("PLINTH_TLS__CERT", &cfg.cert, e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| err("PLINTH_TLS__KEY", &cfg.key, e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| err("PLINTH_TLS__CERT", &cfg.cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| err("PLINTH_TLS__KEY", &cfg.key, e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `router` over TLS until `shutdown`, then lets open connections
/// finish their requests (the caller bounds how long).
async fn serve_https(
    listener: TcpListener,
    router: axum::Router,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "https accept failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let acceptor = acceptor.clone();
        let service = router.clone().layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        let watcher = graceful.watcher();
        connections.spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, peer = %peer, "tls handshake failed");
                    return;
                }
            };
            let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(
                hyper_util::rt::TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(service),
            );
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(error = %e, peer = %peer, "https connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
    connections.close();
    connections.wait().await;
    Ok(())
}

fn metrics_router() -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        get(|| async {
            (
                [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                metrics::render(),
            )
        }),
    )
}

fn health_router(health: Health) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
}

#[derive(serde::Deserialize)]
struct HealthQuery {
    #[serde(default)]
    service: String,
}

/// `GET /healthz?service=X`: 200 SERVING, 503 NOT_SERVING, 404 unknown service.
async fn healthz(State(health): State<Health>, Query(q): Query<HealthQuery>) -> impl IntoResponse {
    let (code, name) = match health.status(&q.service) {
        Some(ServingStatus::Serving) => (StatusCode::OK, "SERVING"),
        Some(other) => (StatusCode::SERVICE_UNAVAILABLE, crate::health::status_name(other)),
        None => (StatusCode::NOT_FOUND, "SERVICE_UNKNOWN"),
    };
    (code, axum::Json(serde_json::json!({ "status": name })))
}

/// `GET /readyz`: every entry's status; 503 if any is not serving.
async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    let (ready, names) = health.readiness();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(names))
}

/// The caller's `x-request-id` when it is sensible (1–128 bytes of visible
/// ASCII), else a new UUIDv7: one id per request across HTTP and gRPC hops.
pub fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(new_request_id)
}

/// A fresh UUIDv7 whose random bits come from this thread's generator:
/// `Uuid::now_v7` asks the kernel for them, a `getrandom` system call per
/// request (2 % of the server's CPU in a cached `GetValue`).
fn new_request_id() -> String {
    let millis = u64::try_from(crate::auth::unix_now_ms()).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(millis, &rand::random())
        .into_uuid()
        .to_string()
}

/// The id of the request being served, in request extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Per-call span (rpc, request id, trace id continued from `traceparent`),
/// request metrics, and the request id echoed back.
#[derive(Debug, Clone, Copy)]
pub struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Observe { inner }
    }
}

/// See [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let rpc = req.uri().path().to_owned();
        let request_id = request_id(req.headers());
        let span = tracing::info_span!("rpc", rpc = %rpc, request_id = %request_id, trace_id = tracing::field::Empty);
        telemetry::set_parent(&span, &telemetry::HttpHeaderReader(req.headers()));
        if let Some(trace_id) = span.in_scope(telemetry::current_trace_id) {
            span.record("trace_id", trace_id);
        }
        req.extensions_mut().insert(RequestId(request_id.clone()));

        // Call the clone that was driven to readiness; keep a fresh one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let started = Instant::now();
        Box::pin(
            async move {
                let mut result = inner.call(req).await;
                let code = match &result {
                    Ok(resp) => resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .unwrap_or(0),
                    Err(_) => tonic::Code::Unknown as i32,
                };
                let code_name = format!("{:?}", tonic::Code::from_i32(code));
                let m = metrics::runtime();
                m.grpc_requests
                    .with_label_values(&[rpc.as_str(), code_name.as_str()])
                    .inc();
                m.grpc_duration
                    .with_label_values(&[rpc.as_str()])
                    .observe(started.elapsed().as_secs_f64());
                if code != 0 {
                    tracing::info!(code = %code_name, elapsed_ms = started.elapsed().as_millis() as u64, "rpc failed");
                }
                if let Ok(resp) = &mut result
                    && let Ok(mut v) = HeaderValue::from_str(&request_id)
                {
                    // Never indexed by HPACK: a value that never repeats
                    // would only churn both ends' header tables.
                    v.set_sensitive(true);
                    resp.headers_mut().insert(REQUEST_ID_HEADER, v);
                }
                result
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Generated request ids are UUIDv7 (sortable by time, as operators
    /// grepping logs expect), stamped with now, and do not repeat.
    #[test]
    fn generated_request_ids_are_fresh_uuid_v7() {
        let before = u64::try_from(crate::auth::unix_now_ms()).unwrap_or(0);
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| request_id(&http::HeaderMap::new())).collect();
        let after = u64::try_from(crate::auth::unix_now_ms()).unwrap_or(0);
        assert_eq!(ids.len(), 1000, "request ids repeat");
        for id in &ids {
            let uuid = uuid::Uuid::parse_str(id).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(uuid.get_version_num(), 7, "{id}");
            let (secs, nanos) = uuid.get_timestamp().map(|t| t.to_unix()).unwrap_or_default();
            let millis = secs * 1000 + u64::from(nanos) / 1_000_000;
            assert!(
                (before..=after).contains(&millis),
                "{id} stamped {millis}, not in {before}..={after}"
            );
        }
    }
}
