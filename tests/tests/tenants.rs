//! Optional tenants: an administrator puts a user or service account in a
//! tenant, its tokens and API keys carry it (so services can keep tenants'
//! data apart), users can be listed per tenant, and a bad tenant id names
//! the field.

use plinth::auth::v1::{
    CreateApiKeyRequest, CreateServiceAccountRequest, CreateUserRequest, GetMeRequest, IntrospectRequest,
    IssueServiceTokenRequest, ListUsersRequest,
};
use plinth_tests::{
    ADMIN_EMAIL, ADMIN_PASSWORD, PASSWORD, TestApp, access_token, register_user, unique, violated_field, with_admin,
    with_bearer,
};
use tonic::Code;

#[tokio::test]
async fn tenants_travel_with_identities_and_their_credentials() {
    let app = TestApp::spawn(with_admin(TestApp::config())).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let admin = access_token(&mut client, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    let tenant = format!("acme-{}", unique().replace('_', "-"));

    let create = |email: &str, tenant: &str| CreateUserRequest {
        email: email.into(),
        password: PASSWORD.into(),
        display_name: String::new(),
        roles: vec![],
        phone: String::new(),
        tenant: tenant.into(),
    };
    let bad_email = format!("bad-tenant-{}@example.com", unique());
    let err = client
        .create_user(with_bearer(create(&bad_email, "Acme Corp"), &admin))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), violated_field(&err)),
        (Code::InvalidArgument, "tenant".to_owned())
    );
    assert_eq!(
        access_token(&mut client, &bad_email, PASSWORD)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated,
        "nothing was created"
    );

    let email = format!("tenant-user-{}@example.com", unique());
    let user = client
        .create_user(with_bearer(create(&email, &tenant), &admin))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.tenant, tenant);
    let outsider = register_user(&mut client, "no-tenant").await.unwrap();

    // The access token carries the tenant; a user without one gets none.
    let token = access_token(&mut client, &email, PASSWORD).await.unwrap();
    let me = client
        .get_me(with_bearer(GetMeRequest {}, &token))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(me.tenant, tenant);
    let introspect = |token: &str| IntrospectRequest { token: token.into() };
    let seen = client.introspect(introspect(&token)).await.unwrap().into_inner();
    assert!(seen.active);
    assert_eq!(seen.tenant, tenant);
    let other = access_token(&mut client, &outsider, PASSWORD).await.unwrap();
    assert_eq!(
        client.introspect(introspect(&other)).await.unwrap().into_inner().tenant,
        ""
    );

    // So does an API key of that user.
    let key = client
        .create_api_key(with_bearer(
            CreateApiKeyRequest {
                display_name: "tenant key".into(),
                ..CreateApiKeyRequest::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;
    let seen = client.introspect(introspect(&key)).await.unwrap().into_inner();
    assert_eq!(
        (seen.token_type.as_str(), seen.tenant.as_str()),
        ("api_key", tenant.as_str())
    );

    // Listing per tenant shows only that tenant's users.
    let listed = client
        .list_users(with_bearer(
            ListUsersRequest {
                page_size: 100,
                page_token: String::new(),
                tenant: tenant.clone(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .users;
    assert_eq!(
        listed.iter().map(|u| u.email.as_str()).collect::<Vec<_>>(),
        [email.as_str()]
    );

    // Service accounts too: the client-credentials token carries the tenant.
    let account = client
        .create_service_account(with_bearer(
            CreateServiceAccountRequest {
                display_name: "tenant job".into(),
                roles: vec![],
                tenant: tenant.clone(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let service = account.service_account.unwrap();
    assert_eq!(service.tenant, tenant);
    let issued = client
        .issue_service_token(IssueServiceTokenRequest {
            client_id: service.id,
            client_secret: account.client_secret,
        })
        .await
        .unwrap()
        .into_inner();
    let seen = client
        .introspect(introspect(&issued.access_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.tenant, tenant);
    app.stop().await;
}
