//! The gRPC face of the auth service: decode, call the domain, encode.

use std::sync::Arc;

use plinth::auth::v1::auth_service_server::AuthService;
use plinth::auth::v1::{
    GetJwksRequest, GetJwksResponse, GetMeRequest, GetMeResponse, ListSessionsRequest, ListSessionsResponse,
    LoginRequest, LoginResponse, LogoutRequest, LogoutResponse, RefreshRequest, RefreshResponse, RegisterRequest,
    RegisterResponse, RevokeAllSessionsRequest, RevokeAllSessionsResponse, RevokeSessionRequest, RevokeSessionResponse,
    Session, TokenPair, User, UserStatus,
};
use plinth_runtime::auth::Principal;
use plinth_runtime::error::to_status;
use tonic::{Request, Response, Status};

use crate::AuthError;
use crate::service::{self, Auth};
use crate::store::UserRow;

/// The tonic service over [`Auth`].
#[derive(Clone)]
pub struct AuthGrpc {
    auth: Arc<Auth>,
}

impl AuthGrpc {
    /// Serves `auth`.
    pub fn new(auth: Arc<Auth>) -> Self {
        Self { auth }
    }
}

fn user_pb(u: &UserRow) -> User {
    let status = match u.status.as_str() {
        "active" => UserStatus::Active,
        "disabled" => UserStatus::Disabled,
        "locked" => UserStatus::Locked,
        _ => UserStatus::Unspecified,
    };
    User {
        id: u.id.clone(),
        email: u.email.clone(),
        display_name: u.display_name.clone(),
        status: status.into(),
        roles: u.role_list(),
        create_time: Some(prost_types::Timestamp {
            seconds: u.created_at,
            nanos: 0,
        }),
    }
}

fn tokens_pb(t: service::TokenPair) -> TokenPair {
    TokenPair {
        access_token: t.access_token,
        token_type: "Bearer".into(),
        expires_in: t.expires_in,
        refresh_token: t.refresh_token,
        refresh_expires_in: t.refresh_expires_in,
    }
}

fn status(e: AuthError) -> Status {
    to_status(&e)
}

#[tonic::async_trait]
impl AuthService for AuthGrpc {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let r = request.into_inner();
        let user = self
            .auth
            .register(&r.email, r.password, &r.display_name)
            .await
            .map_err(status)?;
        Ok(Response::new(RegisterResponse {
            user: Some(user_pb(&user)),
        }))
    }

    async fn login(&self, request: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        // The peer address; behind the gateway, the client address it forwards
        // will be used once the gateway can vouch for it.
        let address = request.remote_addr().map(|a| a.ip().to_string());
        let r = request.into_inner();
        let out = self
            .auth
            .login(&r.email, r.password, address.as_deref())
            .await
            .map_err(status)?;
        Ok(Response::new(LoginResponse {
            tokens: Some(tokens_pb(out.tokens)),
            user: Some(user_pb(&out.user)),
        }))
    }

    async fn refresh(&self, request: Request<RefreshRequest>) -> Result<Response<RefreshResponse>, Status> {
        let r = request.into_inner();
        if r.refresh_token.is_empty() {
            return Err(status(AuthError::field("refresh_token", "is required")));
        }
        let tokens = self.auth.refresh(&r.refresh_token).await.map_err(status)?;
        Ok(Response::new(RefreshResponse {
            tokens: Some(tokens_pb(tokens)),
        }))
    }

    async fn logout(&self, request: Request<LogoutRequest>) -> Result<Response<LogoutResponse>, Status> {
        let caller = request.extensions().get::<Principal>().cloned();
        self.auth
            .logout(&request.into_inner().refresh_token, caller.as_ref())
            .await
            .map_err(status)?;
        Ok(Response::new(LogoutResponse {}))
    }

    async fn revoke_all_sessions(
        &self,
        request: Request<RevokeAllSessionsRequest>,
    ) -> Result<Response<RevokeAllSessionsResponse>, Status> {
        let principal = request
            .extensions()
            .get::<Principal>()
            .ok_or_else(|| status(AuthError::Unauthenticated))?;
        let n = self
            .auth
            .revoke_all_sessions(&principal.subject)
            .await
            .map_err(status)?;
        Ok(Response::new(RevokeAllSessionsResponse {
            revoked_sessions: i64::try_from(n).unwrap_or(i64::MAX),
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        let principal = request
            .extensions()
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| status(AuthError::Unauthenticated))?;
        let r = request.into_inner();
        let (rows, next_page_token) = self
            .auth
            .sessions(&principal.subject, r.page_size, &r.page_token)
            .await
            .map_err(status)?;
        let sessions = rows
            .into_iter()
            .map(|(id, created, expires)| Session {
                current: id == principal.session,
                id,
                create_time: Some(prost_types::Timestamp {
                    seconds: created,
                    nanos: 0,
                }),
                expire_time: Some(prost_types::Timestamp {
                    seconds: expires,
                    nanos: 0,
                }),
            })
            .collect();
        Ok(Response::new(ListSessionsResponse {
            sessions,
            next_page_token,
        }))
    }

    async fn revoke_session(
        &self,
        request: Request<RevokeSessionRequest>,
    ) -> Result<Response<RevokeSessionResponse>, Status> {
        let principal = request
            .extensions()
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| status(AuthError::Unauthenticated))?;
        self.auth
            .revoke_session(&principal.subject, &request.into_inner().session_id)
            .await
            .map_err(status)?;
        Ok(Response::new(RevokeSessionResponse {}))
    }

    async fn get_me(&self, request: Request<GetMeRequest>) -> Result<Response<GetMeResponse>, Status> {
        let principal = request
            .extensions()
            .get::<Principal>()
            .ok_or_else(|| status(AuthError::Unauthenticated))?;
        let user = self.auth.user(&principal.subject).await.map_err(status)?;
        Ok(Response::new(GetMeResponse {
            user: Some(user_pb(&user)),
        }))
    }

    async fn get_jwks(&self, _request: Request<GetJwksRequest>) -> Result<Response<GetJwksResponse>, Status> {
        Ok(Response::new(GetJwksResponse { keys: self.auth.jwks() }))
    }
}
