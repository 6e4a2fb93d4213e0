//! The HTTP/JSON edge. It reads the contract's descriptor set at start-up,
//! compiles a route table from every `google.api.http` rule, and transcodes
//! each request into the same gRPC call a generated client would make, so a
//! new annotated RPC appears over HTTP and in `/openapi.json` with no
//! hand-written route. It follows grpc-gateway v2's behaviour (see
//! `shared/reference/gateway-behaviour.md`), never links the services'
//! generated types, and calls them in-process or over gRPC alike.

mod codec;
mod edge;
mod error;
mod handler;
mod health;
mod metadata;
mod openai;
pub mod openapi;
mod routes;
pub mod template;
pub mod testing;
mod transcode;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

pub use codec::DynamicCodec;
pub use routes::{RouteError, RouteTable};
pub use upstream::{CallError, GrpcService, UpstreamError, Upstreams, component_of};

use plinth_runtime::resilience::RateLimiter;

/// How the edge behaves; every field has a production-safe default.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Largest request body accepted (413 above).
    pub body_limit: usize,
    /// Deadline of unary calls that send no `Grpc-Timeout`.
    pub default_timeout: Duration,
    /// Origins allowed by CORS (`*` for any); empty disables CORS.
    pub cors_origins: Vec<String>,
    /// Per-client rate limit (requests/s and burst); `None` disables it.
    pub rate_limit: Option<RateLimiter>,
    /// Whether responses may be compressed (gzip, br) when the client accepts it.
    pub compression: bool,
    /// This process's health registry, for `/healthz` and `/readyz`; names it
    /// does not know are asked of the upstreams.
    pub health: Option<plinth_runtime::health::Health>,
    /// Proxies (load balancers) whose `X-Forwarded-For` names the client the
    /// rate limit counts.
    pub trusted_proxies: plinth_runtime::client_address::TrustedProxies,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            body_limit: 4 * 1024 * 1024,
            default_timeout: Duration::from_secs(30),
            cors_origins: Vec::new(),
            rate_limit: None,
            compression: true,
            health: None,
            trusted_proxies: plinth_runtime::client_address::TrustedProxies::default(),
        }
    }
}

/// Building the gateway failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The route table could not be compiled.
    #[error(transparent)]
    Routes(#[from] RouteError),
    /// The OpenAPI document could not be generated.
    #[error("OpenAPI: {0}")]
    OpenApi(String),
}

/// A compiled gateway, ready to become an axum router.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<handler::Inner>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("bindings", &self.inner.table.bindings().len())
            .finish()
    }
}

impl Gateway {
    /// Compiles the routes of `descriptor_set` and their OpenAPI document.
    pub fn new(descriptor_set: &[u8], upstreams: Upstreams, options: GatewayOptions) -> Result<Self, GatewayError> {
        let table = RouteTable::from_descriptor_set(descriptor_set)?;
        let openapi = openapi::document(&table).map_err(|e| GatewayError::OpenApi(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(handler::Inner {
                table,
                upstreams,
                openapi: serde_json::to_vec_pretty(&openapi)
                    .map_err(|e| GatewayError::OpenApi(e.to_string()))?
                    .into(),
                options,
            }),
        })
    }

    /// The OpenAPI 3.1 document, as served at `/openapi.json`.
    pub fn openapi(&self) -> &[u8] {
        &self.inner.openapi
    }

    /// The compiled route table.
    pub fn routes(&self) -> &RouteTable {
        &self.inner.table
    }

    /// The HTTP routes: every binding, `/openapi.json`, `/docs`, with the edge layers.
    pub fn router(&self) -> axum::Router {
        edge::router(self.inner.clone())
    }
}
