//! The tower layer that authenticates every gRPC call and enforces the
//! permission its contract declares. Deny by default: an RPC that declares
//! nothing is refused unless it is one of the runtime's own endpoints.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};

use super::refusals::Refusals;
use super::{Access, AuthError, Authenticator, PermissionMap, Principal, UNAUTHENTICATED_METHODS};
use crate::error::to_status;

struct State {
    authenticator: Option<Arc<Authenticator>>,
    permissions: PermissionMap,
    refusals: Option<Refusals>,
}

/// Authenticates callers and enforces per-RPC permissions.
#[derive(Clone)]
pub struct AuthLayer {
    state: Arc<State>,
}

impl AuthLayer {
    /// A layer verifying tokens with `authenticator` (none: every token is
    /// refused as unverifiable) and enforcing `permissions` against what the
    /// caller's credential grants.
    pub fn new(authenticator: Option<Arc<Authenticator>>, permissions: PermissionMap) -> Self {
        Self {
            state: Arc::new(State {
                authenticator,
                permissions,
                refusals: None,
            }),
        }
    }

    /// Reports every refusal for a missing permission to `refusals` (and
    /// so to the audit log).
    pub fn with_refusals(self, refusals: Refusals) -> Self {
        Self {
            state: Arc::new(State {
                authenticator: self.state.authenticator.clone(),
                permissions: self.state.permissions.clone(),
                refusals: Some(refusals),
            }),
        }
    }

    /// A layer that admits only the runtime's own endpoints.
    pub fn deny_all() -> Self {
        Self::new(None, PermissionMap::default())
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            state: self.state.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    state: Arc<State>,
}

fn bearer(headers: &http::HeaderMap) -> Option<String> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
}

impl<S, B, RB> Service<Request<B>> for AuthService<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path().to_owned();
        if UNAUTHENTICATED_METHODS.contains(&path.as_str()) {
            return Box::pin(inner.call(req));
        }
        let state = self.state.clone();
        let token = bearer(req.headers());
        Box::pin(async move {
            let decision = authorize(&state, &path, token.as_deref()).await;
            match decision {
                Ok(principal) => {
                    if let Some(p) = principal {
                        req.extensions_mut().insert(p);
                    }
                    inner.call(req).await
                }
                Err(e) => {
                    tracing::info!(rpc = %path, reason = e_reason(&e), error = %crate::error::chain(&e), "call refused");
                    Ok(to_status(&e).into_http())
                }
            }
        })
    }
}

fn e_reason(e: &AuthError) -> &'static str {
    crate::error::ServiceError::reason(e)
}

async fn authorize(state: &State, path: &str, token: Option<&str>) -> Result<Option<Principal>, AuthError> {
    let access = state.permissions.access(path).ok_or(AuthError::NotExposed)?;
    let principal = match (token, &state.authenticator) {
        (None, _) => None,
        (Some(_), None) => return Err(AuthError::KeysUnavailable("no token keys configured".into())),
        (Some(t), Some(a)) if t.starts_with(super::API_KEY_PREFIX) => Some(Principal::from(a.verify_api_key(t).await?)),
        (Some(t), Some(a)) => Some(Principal::from(a.verify(t).await?)),
    };
    match access {
        Access::Public => Ok(principal),
        Access::Authenticated => principal.map(Some).ok_or(AuthError::Missing),
        Access::Permission(perm) => {
            let p = principal.ok_or(AuthError::Missing)?;
            if p.allows(perm) {
                Ok(Some(p))
            } else {
                if let Some(refusals) = &state.refusals {
                    refusals.report(path, perm, &p);
                }
                Err(AuthError::Denied(perm.clone()))
            }
        }
    }
}
