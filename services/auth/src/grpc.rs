//! The gRPC face of the auth service: decode, call the domain, encode.

use std::sync::Arc;

use plinth::auth::v1::auth_service_server::AuthService;
use plinth::auth::v1::{
    ApiKey, ChangePasswordRequest, ChangePasswordResponse, CreateApiKeyRequest, CreateApiKeyResponse,
    CreateServiceAccountRequest, CreateServiceAccountResponse, CreateUserRequest, CreateUserResponse,
    DeleteServiceAccountRequest, DeleteServiceAccountResponse, DeleteUserRequest, DeleteUserResponse, GetJwksRequest,
    GetJwksResponse, GetMeRequest, GetMeResponse, GetUserRequest, GetUserResponse, IntrospectRequest,
    IntrospectResponse, IssueServiceTokenRequest, IssueServiceTokenResponse, ListApiKeysRequest, ListApiKeysResponse,
    ListServiceAccountsRequest, ListServiceAccountsResponse, ListSessionsRequest, ListSessionsResponse,
    ListUsersRequest, ListUsersResponse, LoginRequest, LoginResponse, LogoutRequest, LogoutResponse, RefreshRequest,
    RefreshResponse, RegisterRequest, RegisterResponse, RequestPasswordResetRequest, RequestPasswordResetResponse,
    ResetPasswordRequest, ResetPasswordResponse, RevokeAllSessionsRequest, RevokeAllSessionsResponse,
    RevokeApiKeyRequest, RevokeApiKeyResponse, RevokeRequest, RevokeResponse, RevokeSessionRequest,
    RevokeSessionResponse, RotateSigningKeyRequest, RotateSigningKeyResponse, ServiceAccount, Session, TokenPair,
    UpdateUserRequest, UpdateUserResponse, User, UserStatus,
};
use plinth_runtime::auth::Principal;
use plinth_runtime::client_address::TrustedProxies;
use plinth_runtime::error::to_status;
use tonic::{Request, Response, Status};

use crate::service::{self, Auth, NewAccount};
use crate::store::{ApiKeyRow, ServiceAccountRow, UserRow};
use crate::{AuthError, Identifier};

/// The tonic service over [`Auth`].
#[derive(Clone)]
pub struct AuthGrpc {
    auth: Arc<Auth>,
    proxies: Arc<TrustedProxies>,
}

impl AuthGrpc {
    /// Serves `auth`; client addresses (for login throttling) are read
    /// through `proxies`.
    pub fn new(auth: Arc<Auth>, proxies: TrustedProxies) -> Self {
        Self {
            auth,
            proxies: Arc::new(proxies),
        }
    }
}

/// The authenticated caller, put there by the auth layer.
pub(crate) fn caller<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| status(AuthError::Unauthenticated))
}

pub(crate) fn ts(secs: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    }
}

fn api_key_pb(k: ApiKeyRow) -> ApiKey {
    ApiKey {
        prefix: format!("{}{}", plinth_runtime::auth::API_KEY_PREFIX, k.lookup),
        scopes: k.scope_list(),
        id: k.id,
        display_name: k.display_name,
        create_time: Some(ts(k.created_at)),
        expire_time: k.expires_at.map(ts),
        last_use_time: k.last_used_at.map(ts),
        revoke_time: k.revoked_at.map(ts),
    }
}

fn service_account_pb(a: &ServiceAccountRow) -> ServiceAccount {
    ServiceAccount {
        id: a.id.clone(),
        display_name: a.display_name.clone(),
        roles: a.role_list(),
        create_time: Some(ts(a.created_at)),
        tenant: a.tenant.clone(),
    }
}

fn user_pb(u: &UserRow) -> User {
    let status = match u.status.as_str() {
        "active" => UserStatus::Active,
        "disabled" => UserStatus::Disabled,
        "locked" => UserStatus::Locked,
        "deleted" => UserStatus::Deleted,
        _ => UserStatus::Unspecified,
    };
    User {
        id: u.id.clone(),
        email: u.email.clone(),
        phone: u.phone.clone(),
        tenant: u.tenant.clone(),
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

pub(crate) fn status(e: AuthError) -> Status {
    to_status(&e)
}

#[tonic::async_trait]
impl AuthService for AuthGrpc {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let r = request.into_inner();
        let user = self
            .auth
            .register(&r.email, &r.phone, r.password, &r.display_name)
            .await
            .map_err(status)?;
        Ok(Response::new(RegisterResponse {
            user: Some(user_pb(&user)),
        }))
    }

    async fn login(&self, request: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        // The client's address: the peer, or behind a trusted proxy (the split
        // gateway) the address that proxy saw.
        let forwarded = request.metadata().get("x-forwarded-for").and_then(|v| v.to_str().ok());
        let address = self
            .proxies
            .client(request.remote_addr(), forwarded)
            .map(|ip| ip.to_string());
        let r = request.into_inner();
        // Neither or both is a malformed request; a malformed address or
        // number is just a failed login.
        let named = r.email.trim().is_empty() != r.phone.trim().is_empty();
        let who = Identifier::one_of(&r.email, &r.phone).map_err(|e| {
            if named {
                status(AuthError::BadCredentials)
            } else {
                status(e)
            }
        })?;
        let out = self
            .auth
            .login(&who, r.password, address.as_deref())
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

    async fn revoke(&self, request: Request<RevokeRequest>) -> Result<Response<RevokeResponse>, Status> {
        self.auth.revoke(&request.into_inner().token).await.map_err(status)?;
        Ok(Response::new(RevokeResponse {}))
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

    async fn create_api_key(
        &self,
        request: Request<CreateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        let principal = caller(&request)?;
        let r = request.into_inner();
        let expires_at = r.expire_time.map(|t| t.seconds);
        let (row, secret) = self
            .auth
            .create_api_key(&principal, &r.display_name, r.scopes, expires_at)
            .await
            .map_err(status)?;
        Ok(Response::new(CreateApiKeyResponse {
            api_key: Some(api_key_pb(row)),
            secret,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<ListApiKeysRequest>,
    ) -> Result<Response<ListApiKeysResponse>, Status> {
        let principal = caller(&request)?;
        let rows = self
            .auth
            .api_keys(&principal.subject, request.into_inner().show_revoked)
            .await
            .map_err(status)?;
        Ok(Response::new(ListApiKeysResponse {
            api_keys: rows.into_iter().map(api_key_pb).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<RevokeApiKeyRequest>,
    ) -> Result<Response<RevokeApiKeyResponse>, Status> {
        let principal = caller(&request)?;
        self.auth
            .revoke_api_key(&principal.subject, &request.into_inner().key_id)
            .await
            .map_err(status)?;
        Ok(Response::new(RevokeApiKeyResponse {}))
    }

    async fn introspect(&self, request: Request<IntrospectRequest>) -> Result<Response<IntrospectResponse>, Status> {
        let token = request.into_inner().token;
        if token.is_empty() {
            return Err(status(AuthError::field("token", "is required")));
        }
        let i = self.auth.introspect(&token).await.map_err(status)?;
        Ok(Response::new(IntrospectResponse {
            active: i.active,
            token_type: i.token_type.to_owned(),
            sub: i.subject,
            scope: i.scopes.join(" "),
            exp: i.expires_at,
            client_id: i.client_id,
            roles: i.roles,
            permissions: i.permissions,
            tenant: i.tenant,
        }))
    }

    async fn change_password(
        &self,
        request: Request<ChangePasswordRequest>,
    ) -> Result<Response<ChangePasswordResponse>, Status> {
        let principal = caller(&request)?;
        let r = request.into_inner();
        self.auth
            .change_password(&principal.subject, r.current_password, r.new_password)
            .await
            .map_err(status)?;
        Ok(Response::new(ChangePasswordResponse {}))
    }

    async fn request_password_reset(
        &self,
        request: Request<RequestPasswordResetRequest>,
    ) -> Result<Response<RequestPasswordResetResponse>, Status> {
        let r = request.into_inner();
        let who = Identifier::one_of(&r.email, &r.phone).map_err(status)?;
        self.auth.request_password_reset(&who).await.map_err(status)?;
        Ok(Response::new(RequestPasswordResetResponse {}))
    }

    async fn reset_password(
        &self,
        request: Request<ResetPasswordRequest>,
    ) -> Result<Response<ResetPasswordResponse>, Status> {
        let r = request.into_inner();
        self.auth
            .reset_password(&r.token, r.new_password)
            .await
            .map_err(status)?;
        Ok(Response::new(ResetPasswordResponse {}))
    }

    async fn create_user(&self, request: Request<CreateUserRequest>) -> Result<Response<CreateUserResponse>, Status> {
        let principal = caller(&request)?;
        let r = request.into_inner();
        let user = self
            .auth
            .admin_create_user(
                &principal,
                &NewAccount {
                    email: &r.email,
                    phone: &r.phone,
                    tenant: &r.tenant,
                },
                r.password,
                &r.display_name,
                &r.roles,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(CreateUserResponse {
            user: Some(user_pb(&user)),
        }))
    }

    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<GetUserResponse>, Status> {
        let user = self
            .auth
            .visible_user(&request.into_inner().user_id)
            .await
            .map_err(status)?;
        Ok(Response::new(GetUserResponse {
            user: Some(user_pb(&user)),
        }))
    }

    async fn list_users(&self, request: Request<ListUsersRequest>) -> Result<Response<ListUsersResponse>, Status> {
        let r = request.into_inner();
        let (rows, next_page_token) = self
            .auth
            .list_users(&r.tenant, r.page_size, &r.page_token)
            .await
            .map_err(status)?;
        Ok(Response::new(ListUsersResponse {
            users: rows.iter().map(user_pb).collect(),
            next_page_token,
        }))
    }

    async fn update_user(&self, request: Request<UpdateUserRequest>) -> Result<Response<UpdateUserResponse>, Status> {
        let principal = caller(&request)?;
        let r = request.into_inner();
        let user = r.user.ok_or_else(|| status(AuthError::field("user", "is required")))?;
        // Without a mask, the populated fields (AIP-134).
        let paths: Vec<String> = match r.update_mask {
            Some(m) if !m.paths.is_empty() => m.paths,
            _ => {
                let mut p = Vec::new();
                if !user.display_name.is_empty() {
                    p.push("display_name".to_owned());
                }
                if !user.roles.is_empty() {
                    p.push("roles".to_owned());
                }
                if user.status != UserStatus::Unspecified as i32 {
                    p.push("status".to_owned());
                }
                if !user.email.is_empty() {
                    p.push("email".to_owned());
                }
                if !user.phone.is_empty() {
                    p.push("phone".to_owned());
                }
                p
            }
        };
        let mut display_name = None;
        let mut roles = None;
        let mut new_status = None;
        let (mut email, mut phone) = (None, None);
        for path in &paths {
            match path.as_str() {
                "display_name" | "displayName" => display_name = Some(user.display_name.as_str()),
                "roles" => roles = Some(user.roles.as_slice()),
                "email" => email = Some(user.email.as_str()),
                "phone" => phone = Some(user.phone.as_str()),
                "status" => {
                    new_status = Some(match UserStatus::try_from(user.status) {
                        Ok(UserStatus::Active) => "active",
                        Ok(UserStatus::Disabled) => "disabled",
                        Ok(UserStatus::Locked) => "locked",
                        _ => {
                            return Err(status(AuthError::field(
                                "user.status",
                                "must be ACTIVE, DISABLED or LOCKED",
                            )));
                        }
                    })
                }
                other => {
                    return Err(status(AuthError::field(
                        "update_mask",
                        format!("{other} cannot be changed (display_name, roles, status, email, phone)"),
                    )));
                }
            }
        }
        let updated = self
            .auth
            .update_user(&principal, &user.id, display_name, roles, new_status, (email, phone))
            .await
            .map_err(status)?;
        Ok(Response::new(UpdateUserResponse {
            user: Some(user_pb(&updated)),
        }))
    }

    async fn delete_user(&self, request: Request<DeleteUserRequest>) -> Result<Response<DeleteUserResponse>, Status> {
        let principal = caller(&request)?;
        let user_id = request.into_inner().user_id;
        self.auth
            .update_user(&principal, &user_id, None, None, Some("deleted"), (None, None))
            .await
            .map_err(|e| match e {
                AuthError::Invalid(_) if uuid::Uuid::parse_str(&user_id).is_err() => {
                    status(AuthError::field("user_id", "must be a user id"))
                }
                other => status(other),
            })?;
        Ok(Response::new(DeleteUserResponse {}))
    }

    async fn rotate_signing_key(
        &self,
        _request: Request<RotateSigningKeyRequest>,
    ) -> Result<Response<RotateSigningKeyResponse>, Status> {
        let (kid, activates_at) = self
            .auth
            .rotate_signing_key(false)
            .await
            .map_err(status)?
            .ok_or_else(|| Status::internal("rotation did not happen"))?;
        Ok(Response::new(RotateSigningKeyResponse {
            kid,
            activate_time: Some(ts(activates_at)),
        }))
    }

    async fn create_service_account(
        &self,
        request: Request<CreateServiceAccountRequest>,
    ) -> Result<Response<CreateServiceAccountResponse>, Status> {
        let principal = caller(&request)?;
        let r = request.into_inner();
        let (row, client_secret) = self
            .auth
            .create_service_account(&principal, &r.display_name, &r.roles, &r.tenant)
            .await
            .map_err(status)?;
        Ok(Response::new(CreateServiceAccountResponse {
            service_account: Some(service_account_pb(&row)),
            client_secret,
        }))
    }

    async fn list_service_accounts(
        &self,
        _request: Request<ListServiceAccountsRequest>,
    ) -> Result<Response<ListServiceAccountsResponse>, Status> {
        let rows = self.auth.service_accounts().await.map_err(status)?;
        Ok(Response::new(ListServiceAccountsResponse {
            service_accounts: rows.iter().map(service_account_pb).collect(),
        }))
    }

    async fn delete_service_account(
        &self,
        request: Request<DeleteServiceAccountRequest>,
    ) -> Result<Response<DeleteServiceAccountResponse>, Status> {
        self.auth
            .delete_service_account(&request.into_inner().service_account_id)
            .await
            .map_err(status)?;
        Ok(Response::new(DeleteServiceAccountResponse {}))
    }

    async fn issue_service_token(
        &self,
        request: Request<IssueServiceTokenRequest>,
    ) -> Result<Response<IssueServiceTokenResponse>, Status> {
        let r = request.into_inner();
        let (access_token, expires_in) = self
            .auth
            .issue_service_token(&r.client_id, &r.client_secret)
            .await
            .map_err(status)?;
        Ok(Response::new(IssueServiceTokenResponse {
            access_token,
            token_type: "Bearer".into(),
            expires_in,
        }))
    }
}
