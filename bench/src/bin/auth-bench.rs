//! Auth benchmark: local JWT verification, password login at the default
//! argon2id parameters, memory under a login storm, permission checks, and authenticated calls
//! through the auth layer, against an in-process `plinthd` on embedded
//! defaults (the client and server share this machine's cores).
//!
//! `cargo run --release -p plinth-bench --bin auth-bench -- --seconds 10`
//! (`--checks-only` runs the permission checks alone; `--check-callers N` sets their concurrency, 16 by default;
//! `--target http://host:50051 --admin-password P` runs them against a plinthd in another process)

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plinth::auth::v1::auth_service_client::AuthServiceClient;
use plinth::auth::v1::authorization_service_client::AuthorizationServiceClient;
use plinth::auth::v1::{
    BatchCheckRequest, CheckItem, CheckRequest, CreateRoleBindingRequest, CreateServiceAccountRequest, GetJwksRequest,
    GetMeRequest, IssueServiceTokenRequest, ListUsersRequest, LoginRequest, RegisterRequest, RoleBinding,
};
use plinth_bench::{arg, closed_loop, memory_kib};
use plinth_runtime::auth::jwt::{Expectations, KeySet, verify};
use plinth_runtime::auth::{Authenticator, JwksSource, unix_now};
use plinth_tests::{ADMIN_EMAIL, ADMIN_PASSWORD, TestApp, unique, with_admin};
use tonic::Request;

struct StaticKeys(Vec<plinth::auth::v1::Jwk>);

#[async_trait::async_trait]
impl JwksSource for StaticKeys {
    async fn fetch(&self) -> Result<Vec<plinth::auth::v1::Jwk>, String> {
        Ok(self.0.clone())
    }
}

const PASSWORD: &str = "violet staircase under rain";

fn out(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = arg("--seconds", 10);
    // Against a plinthd in another process (`--target http://127.0.0.1:50051`),
    // so client and server are scheduled by the OS, not one shared runtime.
    let target: String = arg("--target", String::new());
    let admin_password: String = arg("--admin-password", ADMIN_PASSWORD.to_owned());
    let checks_only = !target.is_empty() || std::env::args().any(|a| a == "--checks-only");
    let check_callers: usize = arg("--check-callers", 16);
    let connections: usize = arg("--connections", 1).max(1);
    let duration = Duration::from_secs(seconds);
    let app = if target.is_empty() {
        let app = TestApp::spawn(with_admin(TestApp::config())).await?;
        let (rss_start, _) = memory_kib();
        out(&format!(
            "{:<44} {} MiB",
            "RSS after start (all components)",
            rss_start / 1024
        ));
        Some(app)
    } else {
        None
    };
    let connect = async || -> anyhow::Result<tonic::transport::Channel> {
        Ok(match &app {
            Some(app) => app.channel().await?,
            None => {
                tonic::transport::Endpoint::from_shared(target.clone())?
                    .connect()
                    .await?
            }
        })
    };
    let client = AuthServiceClient::new(connect().await?);
    // Before the login storm locks this address out.
    let admin = client
        .clone()
        .login(LoginRequest {
            email: ADMIN_EMAIL.into(),
            password: admin_password.clone(),
            phone: String::new(),
        })
        .await?
        .into_inner()
        .tokens
        .ok_or_else(|| anyhow::anyhow!("no tokens"))?
        .access_token;

    let users = 64;
    let mut emails = Vec::new();
    for _ in 0..users {
        let email = format!("bench-{}@example.com", unique());
        client
            .clone()
            .register(RegisterRequest {
                email: email.clone(),
                password: PASSWORD.into(),
                display_name: String::new(),
                phone: String::new(),
            })
            .await?;
        emails.push(email);
    }
    let login = client
        .clone()
        .login(LoginRequest {
            email: emails[0].clone(),
            password: PASSWORD.into(),
            phone: String::new(),
        })
        .await?
        .into_inner()
        .tokens
        .ok_or_else(|| anyhow::anyhow!("no tokens"))?;
    let token = login.access_token;

    if !checks_only {
        // 1. Local verification, one core, no I/O: what the auth layer costs per call.
        let keys = KeySet::from_jwks(&client.clone().get_jwks(GetJwksRequest {}).await?.into_inner().keys);
        let expect = Expectations {
            issuer: "plinth".into(),
            audience: "plinth".into(),
            leeway_secs: 30,
        };
        let n = 100_000;
        let started = Instant::now();
        for _ in 0..n {
            verify(&token, &keys, &expect, unix_now()).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let per_sec = f64::from(n) / started.elapsed().as_secs_f64();
        out(&format!(
            "{:<44} {:>10.0}/s   (one core, {n} verifications)",
            "jwt verify (EdDSA signature check)", per_sec
        ));

        // The auth layer's path: the same token again hits the verified-token cache.
        let jwks = client.clone().get_jwks(GetJwksRequest {}).await?.into_inner().keys;
        let authenticator = Authenticator::new(Arc::new(StaticKeys(jwks)), "plinth", "plinth", Duration::from_secs(30));
        let started = Instant::now();
        for _ in 0..n {
            authenticator.verify(&token).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let per_sec = f64::from(n) / started.elapsed().as_secs_f64();
        out(&format!(
            "{:<44} {:>10.0}/s   (one core, {n} calls)",
            "auth layer verify (token reused, cached)", per_sec
        ));

        // 2. Password login at the default parameters (19 MiB, t=2), 8 callers.
        let (rss_before, _) = memory_kib();
        let emails = std::sync::Arc::new(emails);
        let c = client.clone();
        let e = emails.clone();
        let report = closed_loop("login (argon2id m=19MiB t=2), 8 callers", 8, duration, move |w, i| {
            let mut c = c.clone();
            let email = e[(w * 8 + i) % e.len()].clone();
            async move {
                c.login(LoginRequest {
                    email,
                    password: PASSWORD.into(),
                    phone: String::new(),
                })
                .await
                .map(drop)
            }
        })
        .await;
        out(&report.line());

        // 3. A storm of 256 logins at once: memory stays bounded by the hashing pool.
        let storm = (0..256).map(|i| {
            let mut c = client.clone();
            let email = emails[i % emails.len()].clone();
            async move {
                c.login(LoginRequest {
                    email,
                    password: PASSWORD.into(),
                    phone: String::new(),
                })
                .await
                .is_ok()
            }
        });
        let started = Instant::now();
        let ok = futures::future::join_all(storm)
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count();
        let (rss_after, peak) = memory_kib();
        out(&format!(
            "{:<44} {ok}/256 ok in {:.1} s; RSS {} -> {} MiB, peak {} MiB",
            "login storm (256 at once)",
            started.elapsed().as_secs_f64(),
            rss_before / 1024,
            rss_after / 1024,
            peak / 1024
        ));

        // 4. Authenticated unary calls: auth layer (JWT verify) + handler + SQLite read.
        let c = client.clone();
        let report = closed_loop(
            "GetMe over gRPC (auth layer + db), 32 callers",
            32,
            duration,
            move |_, _| {
                let mut c = c.clone();
                let mut req = Request::new(GetMeRequest {});
                if let Ok(v) = format!("Bearer {token}").parse() {
                    req.metadata_mut().insert("authorization", v);
                }
                async move { c.get_me(req).await.map(drop) }
            },
        )
        .await;
        out(&report.line());

        let c = client.clone();
        let report = closed_loop(
            "GetJwks over gRPC (public, no db), 32 callers",
            32,
            duration,
            move |_, _| {
                let mut c: AuthServiceClient<_> = c.clone();
                async move { c.get_jwks(GetJwksRequest {}).await.map(drop) }
            },
        )
        .await;
        out(&report.line());

        // 5. Client credentials: a service account's id and secret for a token.
        let mut create = Request::new(CreateServiceAccountRequest {
            display_name: "bench".into(),
            roles: vec![],
            tenant: String::new(),
        });
        create
            .metadata_mut()
            .insert("authorization", format!("Bearer {admin}").parse()?);
        let account = client.clone().create_service_account(create).await?.into_inner();
        let id = account.service_account.ok_or_else(|| anyhow::anyhow!("no account"))?.id;
        let secret = account.client_secret;
        let c = client.clone();
        let report = closed_loop(
            "IssueServiceToken (client credentials), 32 callers",
            32,
            duration,
            move |_, _| {
                let mut c: AuthServiceClient<_> = c.clone();
                let request = IssueServiceTokenRequest {
                    client_id: id.clone(),
                    client_secret: secret.clone(),
                };
                async move { c.issue_service_token(request).await.map(drop) }
            },
        )
        .await;
        out(&report.line());
    }

    // 6. Permission checks: 64 users, half with a scoped binding, answered
    //    from the compiled view (each subject's grants cached after first use).
    let mut authz = AuthorizationServiceClient::new(connect().await?);
    // Callers spread over several HTTP/2 connections, as behind a client-side
    // balancer; one connection serialises its frames on one task.
    let mut pool = Vec::new();
    for _ in 0..connections {
        pool.push(AuthorizationServiceClient::new(connect().await?));
    }
    let pool = Arc::new(pool);
    let bearer =
        |token: &str| -> anyhow::Result<tonic::metadata::MetadataValue<_>> { Ok(format!("Bearer {token}").parse()?) };
    let mut list = Request::new(ListUsersRequest {
        page_size: 100,
        page_token: String::new(),
        tenant: String::new(),
    });
    list.metadata_mut().insert("authorization", bearer(&admin)?);
    let subjects: Vec<String> = client
        .clone()
        .list_users(list)
        .await?
        .into_inner()
        .users
        .into_iter()
        .map(|u| u.id)
        .collect();
    for subject in subjects.iter().step_by(2) {
        let mut req = Request::new(CreateRoleBindingRequest {
            binding: Some(RoleBinding {
                subject: subject.clone(),
                role: "developer".into(),
                scope: "tenant/acme".into(),
                create_time: None,
            }),
        });
        req.metadata_mut().insert("authorization", bearer(&admin)?);
        authz.create_role_binding(req).await?;
    }
    let subjects = Arc::new(subjects);
    let questions = [
        ("config.values.write", "tenant/acme/namespace/payments"),
        ("config.values.read", ""),
        ("auth.users.write", ""),
    ];
    let auth_header = bearer(&admin)?;
    let report = closed_loop(
        &format!("Check over gRPC (auth layer + view), {check_callers} callers"),
        check_callers,
        duration,
        {
            let pool = pool.clone();
            let subjects = subjects.clone();
            let auth_header = auth_header.clone();
            move |w, i| {
                let mut c = pool[w % pool.len()].clone();
                let (permission, scope) = questions[i % questions.len()];
                let mut req = Request::new(CheckRequest {
                    subject: subjects[(w * 7 + i) % subjects.len()].clone(),
                    permission: permission.into(),
                    scope: scope.into(),
                    min_version_token: String::new(),
                });
                req.metadata_mut().insert("authorization", auth_header.clone());
                async move { c.check(req).await.map(drop) }
            }
        },
    )
    .await;
    out(&report.line());
    let report = closed_loop(
        &format!("BatchCheck of 10 over gRPC, {check_callers} callers"),
        check_callers,
        duration,
        {
            let subjects = subjects.clone();
            move |w, i| {
                let mut c = pool[w % pool.len()].clone();
                let checks = (0..10)
                    .map(|k| {
                        let (permission, scope) = questions[(i + k) % questions.len()];
                        CheckItem {
                            subject: subjects[(w * 7 + i + k) % subjects.len()].clone(),
                            permission: permission.into(),
                            scope: scope.into(),
                        }
                    })
                    .collect();
                let mut req = Request::new(BatchCheckRequest {
                    checks,
                    min_version_token: String::new(),
                });
                req.metadata_mut().insert("authorization", auth_header.clone());
                async move { c.batch_check(req).await.map(drop) }
            }
        },
    )
    .await;
    out(&report.line());
    if let Some(app) = app {
        app.stop().await;
    }
    Ok(())
}
