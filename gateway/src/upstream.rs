//! Where each RPC is sent: in the all-in-one process the services' own tower
//! stack (auth and telemetry layers included, no socket); split apart a lazily
//! connected gRPC channel per component. Both are one boxed service type, so
//! the handler does not know which it talks to.

use std::collections::HashMap;
use std::convert::Infallible;

use tonic::body::Body;
use tonic::transport::Endpoint;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceExt};

/// A gRPC endpoint the gateway can call.
pub type GrpcService = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, CallError>;

/// A transport failure reaching an upstream. A concrete type (rather than a
/// bare `BoxError`) keeps handler futures `Send`-provable; tonic still finds
/// connection errors through `source()` and reports them as UNAVAILABLE.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CallError(#[source] pub BoxError);

/// A bad upstream address.
#[derive(Debug, thiserror::Error)]
#[error("upstream {component} at {url:?}: {reason}")]
pub struct UpstreamError {
    component: String,
    url: String,
    reason: String,
}

/// The upstream of every service, by the component that serves it.
#[derive(Clone, Default)]
pub struct Upstreams {
    by_component: HashMap<String, GrpcService>,
    remote: Vec<String>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("components", &self.by_component.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Upstreams {
    /// No upstreams yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves the services of `components` in-process, through `service`.
    pub fn in_process<S>(mut self, service: S, components: &[&str]) -> Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let service = BoxCloneSyncService::new(service.map_err(|e: Infallible| match e {}));
        for c in components {
            self.by_component.insert((*c).to_owned(), service.clone());
        }
        self
    }

    /// Whether `component` has an upstream.
    pub fn serves(&self, component: &str) -> bool {
        self.by_component.contains_key(component)
    }

    /// Sends `component`'s RPCs to the gRPC server at `url` (connected lazily).
    pub fn remote(mut self, component: &str, url: &str) -> Result<Self, UpstreamError> {
        let err = |reason: String| UpstreamError {
            component: component.to_owned(),
            url: url.to_owned(),
            reason,
        };
        let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| err(e.to_string()))?;
        let channel = plinth_runtime::coalesce::connect_lazy(&endpoint);
        self.by_component.insert(
            component.to_owned(),
            BoxCloneSyncService::new(channel.map_err(|e| CallError(e.into()))),
        );
        self.remote.push(component.to_owned());
        Ok(self)
    }

    /// The components served by another process, with their upstreams.
    pub fn remotes(&self) -> Vec<(String, GrpcService)> {
        self.remote
            .iter()
            .filter_map(|c| self.by_component.get(c).map(|s| (c.clone(), s.clone())))
            .collect()
    }

    /// The upstream for a service's full name (`plinth.auth.v1.AuthService`
    /// belongs to component `auth`).
    pub fn for_service(&self, service: &str) -> Option<GrpcService> {
        self.by_component.get(component_of(service)).cloned()
    }
}

pub use plinth_runtime::component::component_of;
