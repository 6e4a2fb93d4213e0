//! Service accounts and the client-credentials grant, on SQLite and on
//! PostgreSQL: an administrator creates one (the secret is shown once), it
//! trades id and secret for a token carrying its roles and nothing more, a
//! wrong secret gets nothing, and deleting the account stops its tokens at once.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

use plinth::auth::v1::auth_service_client::AuthServiceClient;
use plinth::auth::v1::{
    CreateServiceAccountRequest, DeleteServiceAccountRequest, IssueServiceTokenRequest, ListServiceAccountsRequest,
    ListUsersRequest,
};
use plinth_runtime::config::Config;
use plinth_tests::{
    ADMIN_EMAIL, ADMIN_PASSWORD, TestApp, access_token, error_reason, postgres_config, violated_field, with_admin,
    with_bearer,
};
use tonic::Code;
use tonic::transport::Channel;

async fn issue(client: &mut AuthServiceClient<Channel>, id: &str, secret: &str) -> Result<String, tonic::Status> {
    Ok(client
        .issue_service_token(IssueServiceTokenRequest {
            client_id: id.into(),
            client_secret: secret.into(),
        })
        .await?
        .into_inner()
        .access_token)
}

async fn contract(config: Config) {
    let app = TestApp::spawn(with_admin(config)).await.unwrap();
    let mut client = app.auth().await.unwrap();
    let admin = access_token(&mut client, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();

    let create = |name: &str, roles: &[&str]| CreateServiceAccountRequest {
        display_name: name.into(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        tenant: String::new(),
    };
    let err = client
        .create_service_account(with_bearer(create("bad", &["root"]), &admin))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), violated_field(&err)),
        (Code::InvalidArgument, "roles[0]".to_owned())
    );

    let worker = client
        .create_service_account(with_bearer(create("nightly job", &[]), &admin))
        .await
        .unwrap()
        .into_inner();
    let operator = client
        .create_service_account(with_bearer(create("ops bot", &["operator"]), &admin))
        .await
        .unwrap()
        .into_inner();
    let (worker_id, worker_secret) = (worker.service_account.unwrap().id, worker.client_secret);
    let (ops_id, ops_secret) = (operator.service_account.unwrap().id, operator.client_secret);
    assert!(worker_secret.starts_with("pls_"));

    let listed = client
        .list_service_accounts(with_bearer(ListServiceAccountsRequest {}, &admin))
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .service_accounts
            .iter()
            .any(|a| a.id == worker_id && a.roles == ["service"])
    );
    assert!(!format!("{listed:?}").contains(&worker_secret));

    // The token carries the account's roles, nothing more.
    let worker_token = issue(&mut client, &worker_id, &worker_secret).await.unwrap();
    let err = client
        .list_users(with_bearer(ListUsersRequest::default(), &worker_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let ops_token = issue(&mut client, &ops_id, &ops_secret).await.unwrap();
    assert!(
        client
            .list_users(with_bearer(ListUsersRequest::default(), &ops_token))
            .await
            .is_ok()
    );

    // Wrong secret, another account's secret, unknown id: the same refusal.
    for (id, secret) in [
        (worker_id.as_str(), "pls_wrong"),
        (worker_id.as_str(), ops_secret.as_str()),
        ("01a20000-0000-7000-8000-000000000000", worker_secret.as_str()),
    ] {
        let err = issue(&mut client, id, secret).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert_eq!(error_reason(&err), "BAD_CLIENT_CREDENTIALS");
    }

    // Deleting stops issued tokens at once and refuses new ones.
    client
        .delete_service_account(with_bearer(
            DeleteServiceAccountRequest {
                service_account_id: ops_id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let err = client
        .list_users(with_bearer(ListUsersRequest::default(), &ops_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(issue(&mut client, &ops_id, &ops_secret).await.is_err());
    let err = client
        .delete_service_account(with_bearer(
            DeleteServiceAccountRequest {
                service_account_id: ops_id,
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    app.stop().await;
}

#[tokio::test]
async fn service_accounts_on_sqlite() {
    contract(TestApp::config()).await;
}

#[tokio::test]
async fn service_accounts_on_postgres() {
    if let Some(config) = postgres_config("service_accounts_on_postgres").unwrap() {
        contract(config).await;
    }
}
