//! The gRPC face of role-based access control: decode, call [`Rbac`], encode.

use std::sync::Arc;

use plinth::auth::v1::authorization_service_server::AuthorizationService;
use plinth::auth::v1::{
    BatchCheckRequest, BatchCheckResponse, CheckRequest, CheckResponse, CreateRoleBindingRequest,
    CreateRoleBindingResponse, CreateRoleRequest, CreateRoleResponse, DeleteRoleBindingRequest,
    DeleteRoleBindingResponse, DeleteRoleRequest, DeleteRoleResponse, GetRoleRequest, GetRoleResponse,
    ListPermissionsRequest, ListPermissionsResponse, ListRoleBindingsRequest, ListRoleBindingsResponse,
    ListRolesRequest, ListRolesResponse, Role, RoleBinding, UpdateRoleRequest, UpdateRoleResponse,
};
use plinth_runtime::auth::Principal;
use plinth_runtime::error::FieldViolation;
use tonic::{Request, Response, Status};

use crate::AuthError;
use crate::grpc::{caller, status, ts};
use crate::rbac::view::{RoleDef, RoleSet};
use crate::rbac::{
    MAX_BATCH, Question, Rbac, RoleInput, SCOPE_RULE, parse_version_token, valid_permission, valid_scope,
};

/// The tonic service over [`Rbac`].
#[derive(Clone)]
pub struct AuthzGrpc {
    rbac: Arc<Rbac>,
}

impl AuthzGrpc {
    /// Serves `rbac`.
    pub fn new(rbac: Arc<Rbac>) -> Self {
        Self { rbac }
    }

    /// Binds or unbinds the request's binding; returns it with the new version.
    async fn change_binding(
        &self,
        caller: &Principal,
        binding: Option<RoleBinding>,
        bind: bool,
    ) -> Result<(RoleBinding, i64), Status> {
        let b = binding.ok_or_else(|| status(AuthError::field("binding", "is required")))?;
        let version = self
            .rbac
            .change_binding(caller, &b.subject, &b.role, &b.scope, bind)
            .await
            .map_err(status)?;
        Ok((b, version))
    }
}

fn role_pb(role: &RoleDef, set: &RoleSet) -> Role {
    Role {
        name: role.name.clone(),
        description: role.description.clone(),
        permissions: role.permissions.clone(),
        inherits: role.inherits.clone(),
        level: role.level,
        builtin: role.builtin,
        effective_permissions: set.closure(&role.name).map(|c| c.patterns.clone()).unwrap_or_default(),
        update_time: (!role.builtin).then(|| ts(role.updated_at)),
    }
}

fn version_token(v: i64) -> String {
    v.to_string()
}

/// Validates one check question; `prefix` names where it sits in the request.
fn question<'a>(subject: &'a str, permission: &'a str, scope: &'a str, prefix: &str) -> Vec<FieldViolation> {
    let mut v = Vec::new();
    if subject.is_empty() || subject.len() > 64 {
        v.push(FieldViolation::new(
            format!("{prefix}subject"),
            "must be a user id or a service account id",
        ));
    }
    if !valid_permission(permission) {
        v.push(FieldViolation::new(
            format!("{prefix}permission"),
            "must be an exact permission like config.values.write",
        ));
    }
    if !valid_scope(scope) {
        v.push(FieldViolation::new(format!("{prefix}scope"), SCOPE_RULE));
    }
    v
}

fn invalid(v: Vec<FieldViolation>) -> Result<(), Status> {
    if v.is_empty() {
        Ok(())
    } else {
        Err(status(AuthError::Invalid(v)))
    }
}

#[tonic::async_trait]
impl AuthorizationService for AuthzGrpc {
    async fn create_role(&self, request: Request<CreateRoleRequest>) -> Result<Response<CreateRoleResponse>, Status> {
        let principal = caller(&request)?;
        let role = request
            .into_inner()
            .role
            .ok_or_else(|| status(AuthError::field("role", "is required")))?;
        let input = RoleInput {
            name: role.name,
            description: role.description,
            permissions: role.permissions,
            inherits: role.inherits,
            level: role.level,
        };
        let (role, version) = self.rbac.create_role(&principal, input).await.map_err(status)?;
        Ok(Response::new(CreateRoleResponse {
            role: Some(role_pb(&role, &self.rbac.roles())),
            version_token: version_token(version),
        }))
    }

    async fn get_role(&self, request: Request<GetRoleRequest>) -> Result<Response<GetRoleResponse>, Status> {
        let name = request.into_inner().role_name;
        let set = self.rbac.roles();
        let role = set.get(&name).ok_or_else(|| status(AuthError::RoleNotFound))?;
        Ok(Response::new(GetRoleResponse {
            role: Some(role_pb(role, &set)),
        }))
    }

    async fn list_roles(&self, _request: Request<ListRolesRequest>) -> Result<Response<ListRolesResponse>, Status> {
        let version = self.rbac.version();
        let set = self.rbac.roles();
        Ok(Response::new(ListRolesResponse {
            roles: set.all().into_iter().map(|r| role_pb(r, &set)).collect(),
            version_token: version_token(version),
        }))
    }

    async fn update_role(&self, request: Request<UpdateRoleRequest>) -> Result<Response<UpdateRoleResponse>, Status> {
        let principal = caller(&request)?;
        let r = request.into_inner();
        let role = r.role.ok_or_else(|| status(AuthError::field("role", "is required")))?;
        // Without a mask, the populated fields (AIP-134).
        let paths: Vec<String> = match r.update_mask {
            Some(m) if !m.paths.is_empty() => m.paths,
            _ => {
                let mut p = Vec::new();
                if !role.description.is_empty() {
                    p.push("description".to_owned());
                }
                if !role.permissions.is_empty() {
                    p.push("permissions".to_owned());
                }
                if !role.inherits.is_empty() {
                    p.push("inherits".to_owned());
                }
                if role.level != 0 {
                    p.push("level".to_owned());
                }
                p
            }
        };
        for path in &paths {
            if !["description", "permissions", "inherits", "level"].contains(&path.as_str()) {
                return Err(status(AuthError::field(
                    "update_mask",
                    format!("{path} cannot be changed (description, permissions, inherits, level)"),
                )));
            }
        }
        if paths.is_empty() {
            return Err(status(AuthError::field(
                "update_mask",
                "names no field to change (description, permissions, inherits, level)",
            )));
        }
        let name = role.name.clone();
        let (updated, version) = self
            .rbac
            .update_role(&principal, &name, |input| {
                for path in &paths {
                    match path.as_str() {
                        "description" => input.description = role.description.clone(),
                        "permissions" => input.permissions = role.permissions.clone(),
                        "inherits" => input.inherits = role.inherits.clone(),
                        _ => input.level = role.level,
                    }
                }
            })
            .await
            .map_err(status)?;
        Ok(Response::new(UpdateRoleResponse {
            role: Some(role_pb(&updated, &self.rbac.roles())),
            version_token: version_token(version),
        }))
    }

    async fn delete_role(&self, request: Request<DeleteRoleRequest>) -> Result<Response<DeleteRoleResponse>, Status> {
        let principal = caller(&request)?;
        let name = request.into_inner().role_name;
        let version = self.rbac.delete_role(&principal, &name).await.map_err(status)?;
        Ok(Response::new(DeleteRoleResponse {
            version_token: version_token(version),
        }))
    }

    async fn create_role_binding(
        &self,
        request: Request<CreateRoleBindingRequest>,
    ) -> Result<Response<CreateRoleBindingResponse>, Status> {
        let principal = caller(&request)?;
        let b = request.into_inner().binding;
        let (b, version) = self.change_binding(&principal, b, true).await?;
        Ok(Response::new(CreateRoleBindingResponse {
            binding: Some(RoleBinding { create_time: None, ..b }),
            version_token: version_token(version),
        }))
    }

    async fn delete_role_binding(
        &self,
        request: Request<DeleteRoleBindingRequest>,
    ) -> Result<Response<DeleteRoleBindingResponse>, Status> {
        let principal = caller(&request)?;
        let b = request.into_inner().binding;
        let (_, version) = self.change_binding(&principal, b, false).await?;
        Ok(Response::new(DeleteRoleBindingResponse {
            version_token: version_token(version),
        }))
    }

    async fn list_role_bindings(
        &self,
        request: Request<ListRoleBindingsRequest>,
    ) -> Result<Response<ListRoleBindingsResponse>, Status> {
        let r = request.into_inner();
        let rows = self.rbac.bindings(&r.subject, &r.role).await.map_err(status)?;
        Ok(Response::new(ListRoleBindingsResponse {
            bindings: rows
                .into_iter()
                .map(|(subject, role, scope, at)| RoleBinding {
                    subject,
                    role,
                    scope,
                    create_time: at.map(ts),
                })
                .collect(),
        }))
    }

    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let r = request.into_inner();
        invalid(question(&r.subject, &r.permission, &r.scope, ""))?;
        let min = parse_version_token(&r.min_version_token, "min_version_token").map_err(status)?;
        let q = Question {
            subject: &r.subject,
            permission: &r.permission,
            scope: &r.scope,
        };
        let (answers, version) = self.rbac.check(&[q], min).await.map_err(status)?;
        Ok(Response::new(CheckResponse {
            allowed: answers.first().copied().unwrap_or(false),
            version_token: version_token(version),
        }))
    }

    async fn batch_check(&self, request: Request<BatchCheckRequest>) -> Result<Response<BatchCheckResponse>, Status> {
        let r = request.into_inner();
        if r.checks.is_empty() || r.checks.len() > MAX_BATCH {
            return Err(status(AuthError::field("checks", "must hold 1 to 100 questions")));
        }
        let violations: Vec<FieldViolation> = r
            .checks
            .iter()
            .enumerate()
            .flat_map(|(i, c)| question(&c.subject, &c.permission, &c.scope, &format!("checks[{i}].")))
            .collect();
        invalid(violations)?;
        let min = parse_version_token(&r.min_version_token, "min_version_token").map_err(status)?;
        let questions: Vec<Question<'_>> = r
            .checks
            .iter()
            .map(|c| Question {
                subject: &c.subject,
                permission: &c.permission,
                scope: &c.scope,
            })
            .collect();
        let (allowed, version) = self.rbac.check(&questions, min).await.map_err(status)?;
        Ok(Response::new(BatchCheckResponse {
            allowed,
            version_token: version_token(version),
        }))
    }

    async fn list_permissions(
        &self,
        request: Request<ListPermissionsRequest>,
    ) -> Result<Response<ListPermissionsResponse>, Status> {
        let principal = caller(&request)?;
        let r = request.into_inner();
        let subject = if r.subject.is_empty() {
            principal.subject.as_str()
        } else {
            r.subject.as_str()
        };
        if subject != principal.subject && !principal.allows("auth.permissions.check") {
            return Err(status(AuthError::Forbidden(
                "asking about someone else needs `auth.permissions.check`".into(),
            )));
        }
        if !valid_scope(&r.scope) {
            return Err(status(AuthError::field("scope", SCOPE_RULE)));
        }
        let min = parse_version_token(&r.min_version_token, "min_version_token").map_err(status)?;
        let p = self.rbac.permissions(subject, &r.scope, min).await.map_err(status)?;
        Ok(Response::new(ListPermissionsResponse {
            roles: p.roles,
            patterns: p.patterns,
            permissions: p.permissions,
            version_token: version_token(p.version),
        }))
    }
}
