//! Role-based access control as users meet it, on SQLite and PostgreSQL:
//! custom roles with inheritance decide what the shared auth layer lets a
//! token do, scoped bindings answer checks, nobody grants more than they
//! hold, and a check that carries a write's version token never sees the
//! state before that write, even on another replica.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

use plinth::auth::v1::authorization_service_client::AuthorizationServiceClient;
use plinth::auth::v1::{
    BatchCheckRequest, CheckItem, CheckRequest, CreateRoleBindingRequest, CreateRoleRequest, CreateUserRequest,
    DeleteRoleBindingRequest, DeleteRoleRequest, GetRoleRequest, ListPermissionsRequest, ListRoleBindingsRequest,
    ListRolesRequest, ListUsersRequest, RefreshRequest, Role, RoleBinding, UpdateRoleRequest,
};
use plinth_runtime::config::Config;
use plinth_tests::{
    ADMIN_EMAIL, ADMIN_PASSWORD, PASSWORD, TestApp, access_token, error_reason, postgres_config, register_user,
    sign_in, unique, violated_field, whoami, with_admin, with_bearer,
};
use tonic::Code;
use tonic::transport::Channel;

type Authz = AuthorizationServiceClient<Channel>;

fn role(name: &str, level: i32, permissions: &[&str], inherits: &[&str]) -> Role {
    Role {
        name: name.into(),
        description: format!("{name} for tests"),
        permissions: permissions.iter().map(|p| (*p).into()).collect(),
        inherits: inherits.iter().map(|r| (*r).into()).collect(),
        level,
        ..Role::default()
    }
}

fn binding(subject: &str, role: &str, scope: &str) -> RoleBinding {
    RoleBinding {
        subject: subject.into(),
        role: role.into(),
        scope: scope.into(),
        create_time: None,
    }
}

async fn bind(authz: &mut Authz, token: &str, b: RoleBinding) -> Result<String, tonic::Status> {
    Ok(authz
        .create_role_binding(with_bearer(CreateRoleBindingRequest { binding: Some(b) }, token))
        .await?
        .into_inner()
        .version_token)
}

async fn check(authz: &mut Authz, token: &str, subject: &str, permission: &str, scope: &str, min: &str) -> bool {
    authz
        .check(with_bearer(
            CheckRequest {
                subject: subject.into(),
                permission: permission.into(),
                scope: scope.into(),
                min_version_token: min.into(),
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
        .allowed
}

async fn rbac_contract(config: Config) {
    let app = TestApp::spawn(with_admin(config)).await.unwrap();
    let mut auth = app.auth().await.unwrap();
    let mut authz = AuthorizationServiceClient::new(app.channel().await.unwrap());
    let admin = access_token(&mut auth, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();

    // The built-in roles, with inheritance resolved.
    let roles = authz
        .list_roles(with_bearer(ListRolesRequest {}, &admin))
        .await
        .unwrap()
        .into_inner()
        .roles;
    let names: Vec<&str> = roles.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["admin", "operator", "auditor", "developer", "service", "viewer"]
    );
    let operator = roles.iter().find(|r| r.name == "operator").unwrap();
    assert!(operator.builtin);
    assert!(
        operator
            .effective_permissions
            .contains(&"config.values.read".to_owned()),
        "operator → developer → viewer"
    );

    // Bad definitions name the field and create nothing.
    for (bad, field) in [
        (role("Bad Name", 15, &["auth.users.read"], &[]), "role.name"),
        (role("typo-role", 15, &["auth.userz.read"], &[]), "role.permissions[0]"),
        (role("wide-role", 15, &["auth*"], &[]), "role.permissions[0]"),
        (
            role("climber", 15, &["auth.users.read"], &["operator"]),
            "role.inherits[0]",
        ),
        (role("orphan", 15, &[], &["nonexistent"]), "role.inherits[0]"),
        (role("no-level", 0, &["auth.users.read"], &[]), "role.level"),
    ] {
        let err = authz
            .create_role(with_bearer(
                CreateRoleRequest {
                    role: Some(bad.clone()),
                },
                &admin,
            ))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), violated_field(&err)),
            (Code::InvalidArgument, field.to_owned()),
            "{bad:?}"
        );
    }
    let after = authz
        .list_roles(with_bearer(ListRolesRequest {}, &admin))
        .await
        .unwrap()
        .into_inner()
        .roles;
    assert_eq!(after.len(), 6, "nothing was created");

    // A custom role inheriting a built-in one, two levels deep.
    let created = authz
        .create_role(with_bearer(
            CreateRoleRequest {
                role: Some(role("user-reader", 15, &["auth.users.read"], &["viewer"])),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let effective = created.role.unwrap().effective_permissions;
    assert!(effective.contains(&"auth.users.read".to_owned()) && effective.contains(&"config.values.read".to_owned()));
    authz
        .create_role(with_bearer(
            CreateRoleRequest {
                role: Some(role("user-reader-plus", 20, &["auth.roles.read"], &["user-reader"])),
            },
            &admin,
        ))
        .await
        .unwrap();
    let err = authz
        .create_role(with_bearer(
            CreateRoleRequest {
                role: Some(role("user-reader", 15, &["auth.users.read"], &[])),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // A user: what the token may do follows the role, through the auth layer.
    let email = register_user(&mut auth, "rbac").await.unwrap();
    let login = sign_in(&mut auth, &email).await.unwrap().tokens.unwrap();
    let user_id = whoami(&mut auth, &login.access_token).await.unwrap();
    let list_users = |token: &str| with_bearer(ListUsersRequest::default(), token);
    assert_eq!(
        auth.list_users(list_users(&login.access_token))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert!(!check(&mut authz, &admin, &user_id, "auth.users.read", "", "").await);

    let v1 = bind(&mut authz, &admin, binding(&user_id, "user-reader-plus", ""))
        .await
        .unwrap();
    assert!(
        check(&mut authz, &admin, &user_id, "auth.users.read", "", &v1).await,
        "inherited from user-reader, seen at once with the version token"
    );
    // The old token carried the old grants: it stopped; a refresh carries the new ones.
    assert_eq!(
        auth.list_users(list_users(&login.access_token))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let refreshed = auth
        .refresh(RefreshRequest {
            refresh_token: login.refresh_token.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    auth.list_users(list_users(&refreshed.access_token)).await.unwrap();

    // Changing the inherited role changes what holders of the child may do.
    let v2 = authz
        .update_role(with_bearer(
            UpdateRoleRequest {
                role: Some(Role {
                    name: "user-reader".into(),
                    permissions: vec!["auth.service_accounts.read".into()],
                    ..Role::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["permissions".into()],
                }),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .version_token;
    assert!(!check(&mut authz, &admin, &user_id, "auth.users.read", "", &v2).await);
    assert!(check(&mut authz, &admin, &user_id, "auth.service_accounts.read", "", &v2).await);
    assert_eq!(
        auth.list_users(list_users(&refreshed.access_token))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated,
        "tokens issued before the change stop"
    );
    let again = auth
        .refresh(RefreshRequest {
            refresh_token: refreshed.refresh_token.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    assert_eq!(
        auth.list_users(list_users(&again.access_token))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // Scoped bindings answer checks at their scope and below only.
    let v3 = bind(&mut authz, &admin, binding(&user_id, "developer", "tenant/acme"))
        .await
        .unwrap();
    assert!(
        check(
            &mut authz,
            &admin,
            &user_id,
            "config.values.write",
            "tenant/acme/namespace/payments",
            &v3
        )
        .await
    );
    assert!(
        !check(
            &mut authz,
            &admin,
            &user_id,
            "config.values.write",
            "tenant/globex",
            &v3
        )
        .await
    );
    assert!(!check(&mut authz, &admin, &user_id, "config.values.write", "", &v3).await);
    let batch = authz
        .batch_check(with_bearer(
            BatchCheckRequest {
                checks: ["tenant/acme", "tenant/acmecorp", ""]
                    .iter()
                    .map(|scope| CheckItem {
                        subject: user_id.clone(),
                        permission: "config.values.write".into(),
                        scope: (*scope).into(),
                    })
                    .collect(),
                min_version_token: v3.clone(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.allowed, [true, false, false]);
    let mine = authz
        .list_permissions(with_bearer(
            ListPermissionsRequest {
                scope: "tenant/acme".into(),
                ..ListPermissionsRequest::default()
            },
            &again.access_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.roles, ["developer", "user-reader", "user-reader-plus", "viewer"]);
    assert!(mine.patterns.contains(&"config.values.*".to_owned()));
    assert!(mine.permissions.contains(&"auth.roles.read".to_owned()));
    let err = authz
        .list_permissions(with_bearer(
            ListPermissionsRequest {
                subject: "someone-else".into(),
                ..ListPermissionsRequest::default()
            },
            &again.access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let listed = authz
        .list_role_bindings(with_bearer(
            ListRoleBindingsRequest {
                subject: user_id.clone(),
                ..ListRoleBindingsRequest::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .bindings;
    let triples: Vec<(&str, &str)> = listed.iter().map(|b| (b.role.as_str(), b.scope.as_str())).collect();
    assert_eq!(
        triples,
        [("viewer", ""), ("user-reader-plus", ""), ("developer", "tenant/acme")]
    );

    // Roles in use cannot go; built-in roles cannot change.
    let err = authz
        .delete_role(with_bearer(
            DeleteRoleRequest {
                role_name: "user-reader".into(),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), error_reason(&err)),
        (Code::FailedPrecondition, "ROLE_IN_USE".to_owned()),
        "user-reader-plus inherits it"
    );
    let err = authz
        .delete_role(with_bearer(
            DeleteRoleRequest {
                role_name: "user-reader-plus".into(),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "a user holds it");
    let err = authz
        .update_role(with_bearer(
            UpdateRoleRequest {
                role: Some(Role {
                    name: "viewer".into(),
                    description: "hijacked".into(),
                    ..Role::default()
                }),
                update_mask: None,
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    authz
        .delete_role_binding(with_bearer(
            DeleteRoleBindingRequest {
                binding: Some(binding(&user_id, "user-reader-plus", "")),
            },
            &admin,
        ))
        .await
        .unwrap();
    let err = authz
        .delete_role_binding(with_bearer(
            DeleteRoleBindingRequest {
                binding: Some(binding(&user_id, "user-reader-plus", "")),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let v4 = authz
        .delete_role(with_bearer(
            DeleteRoleRequest {
                role_name: "user-reader-plus".into(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .version_token;
    assert!(!check(&mut authz, &admin, &user_id, "auth.roles.read", "", &v4).await);
    let err = authz
        .get_role(with_bearer(
            GetRoleRequest {
                role_name: "user-reader-plus".into(),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Bad questions name the field.
    for (req, field) in [
        (
            CheckRequest {
                subject: user_id.clone(),
                permission: "config.*".into(),
                ..CheckRequest::default()
            },
            "permission",
        ),
        (
            CheckRequest {
                subject: user_id.clone(),
                permission: "config.values.read".into(),
                scope: "Tenant//x".into(),
                ..CheckRequest::default()
            },
            "scope",
        ),
        (
            CheckRequest {
                subject: user_id.clone(),
                permission: "config.values.read".into(),
                min_version_token: "v1".into(),
                ..CheckRequest::default()
            },
            "min_version_token",
        ),
        (
            CheckRequest {
                subject: user_id.clone(),
                permission: "config.values.read".into(),
                min_version_token: "999999999".into(),
                ..CheckRequest::default()
            },
            "min_version_token",
        ),
    ] {
        let err = authz.check(with_bearer(req, &admin)).await.unwrap_err();
        assert_eq!(
            (err.code(), violated_field(&err)),
            (Code::InvalidArgument, field.to_owned())
        );
    }
    // Checking needs its permission: a viewer may not ask.
    let viewer = access_token(&mut auth, &email, PASSWORD).await.unwrap();
    let err = authz
        .check(with_bearer(
            CheckRequest {
                subject: user_id.clone(),
                permission: "config.values.read".into(),
                ..CheckRequest::default()
            },
            &viewer,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    app.stop().await;
}

#[tokio::test]
async fn rbac_on_sqlite() {
    rbac_contract(TestApp::config()).await;
}

#[tokio::test]
async fn rbac_on_postgres() {
    if let Some(config) = postgres_config("rbac_on_postgres").unwrap() {
        rbac_contract(config).await;
    }
}

/// An operator who may manage roles still cannot hand out more than they hold.
#[tokio::test]
async fn nobody_grants_more_than_they_hold() {
    let app = TestApp::spawn(with_admin(TestApp::config())).await.unwrap();
    let mut auth = app.auth().await.unwrap();
    let mut authz = AuthorizationServiceClient::new(app.channel().await.unwrap());
    let admin = access_token(&mut auth, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    authz
        .create_role(with_bearer(
            CreateRoleRequest {
                role: Some(role("role-manager", 60, &["auth.roles.*"], &[])),
            },
            &admin,
        ))
        .await
        .unwrap();
    let email = format!("op-{}@example.com", unique());
    auth.create_user(with_bearer(
        CreateUserRequest {
            email: email.clone(),
            password: PASSWORD.into(),
            display_name: "Operator".into(),
            roles: vec!["operator".into(), "role-manager".into()],
            phone: String::new(),
            tenant: String::new(),
        },
        &admin,
    ))
    .await
    .unwrap();
    let op = access_token(&mut auth, &email, PASSWORD).await.unwrap();
    let victim = register_user(&mut auth, "victim").await.unwrap();
    let victim_token = access_token(&mut auth, &victim, PASSWORD).await.unwrap();
    let victim_id = whoami(&mut auth, &victim_token).await.unwrap();

    for (r, why) in [
        (role("super", 50, &["*"], &[]), "grants * which the operator lacks"),
        (
            role("lofty", 70, &["auth.users.read"], &[]),
            "level above the operator's",
        ),
        (
            role("writer", 50, &["auth.users.write"], &[]),
            "auth.users.write is not the operator's",
        ),
    ] {
        let err = authz
            .create_role(with_bearer(CreateRoleRequest { role: Some(r) }, &op))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{why}");
    }
    let err = bind(&mut authz, &op, binding(&victim_id, "admin", ""))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), error_reason(&err)),
        (Code::PermissionDenied, "GRANT_EXCEEDS_CALLER".to_owned())
    );
    // Within their own grants, they may.
    authz
        .create_role(with_bearer(
            CreateRoleRequest {
                role: Some(role("user-lister", 50, &["auth.users.read"], &["viewer"])),
            },
            &op,
        ))
        .await
        .unwrap();
    let v = bind(&mut authz, &op, binding(&victim_id, "user-lister", "tenant/acme"))
        .await
        .unwrap();
    assert!(check(&mut authz, &admin, &victim_id, "auth.users.read", "tenant/acme", &v).await);
    assert!(!check(&mut authz, &admin, &victim_id, "auth.users.read", "", &v).await);
    app.stop().await;
}

/// Two auth replicas on one PostgreSQL database: a check on replica B that
/// carries the version token of a write on replica A sees that write, every
/// time, without waiting for B's background sync.
#[tokio::test]
async fn check_after_write_on_another_replica() {
    let Some(config) = postgres_config("check_after_write_on_another_replica").unwrap() else {
        return;
    };
    let a = TestApp::spawn(with_admin(TestApp::replica_of(&config, "auth").unwrap()))
        .await
        .unwrap();
    let b = TestApp::spawn(with_admin(TestApp::replica_of(&config, "auth").unwrap()))
        .await
        .unwrap();
    let mut auth = a.auth().await.unwrap();
    let admin = access_token(&mut auth, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    let mut on_a = AuthorizationServiceClient::new(a.channel().await.unwrap());
    let mut on_b = AuthorizationServiceClient::new(b.channel().await.unwrap());
    // B verifies A's tokens: both replicas share the signing keys.
    let email = register_user(&mut auth, "replicas").await.unwrap();
    let token = access_token(&mut auth, &email, PASSWORD).await.unwrap();
    let subject = whoami(&mut auth, &token).await.unwrap();
    // Warm B's cache with the "before" answer, so a stale cache would show.
    assert!(!check(&mut on_b, &admin, &subject, "config.values.write", "tenant/t1", "").await);
    for round in 0..10 {
        let scope = "tenant/t1";
        let v = bind(&mut on_a, &admin, binding(&subject, "developer", scope))
            .await
            .unwrap();
        assert!(
            check(&mut on_b, &admin, &subject, "config.values.write", scope, &v).await,
            "round {round}: B answered from before the bind"
        );
        let v = on_a
            .delete_role_binding(with_bearer(
                DeleteRoleBindingRequest {
                    binding: Some(binding(&subject, "developer", scope)),
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .version_token;
        assert!(
            !check(&mut on_b, &admin, &subject, "config.values.write", scope, &v).await,
            "round {round}: B answered from before the unbind"
        );
    }
    b.stop().await;
    a.stop().await;
}
