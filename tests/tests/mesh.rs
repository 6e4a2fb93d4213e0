//! The mesh in both shapes: everything in one process on embedded defaults,
//! and split components on PostgreSQL, NATS and Redis; health follows the
//! backends in both.

use std::time::Duration;

use plinth_runtime::component::ComponentSet;
use plinth_runtime::testing::{Backend, ToggleProxy, backend_url, host_port};
use plinth_tests::TestApp;
use secrecy::SecretString;
use tonic_health::pb::health_check_response::ServingStatus;

const COMPONENTS: [&str; 6] = ["gateway", "config", "queue", "audit", "ai", "auth"];

#[tokio::test]
async fn embedded_mesh_serves_every_component() {
    let app = TestApp::spawn(TestApp::config()).await.unwrap();
    for c in COMPONENTS {
        assert_eq!(app.health(c).await.unwrap(), ServingStatus::Serving, "{c}");
    }
    assert_eq!(
        app.health("plinth.backend.database").await.unwrap(),
        ServingStatus::Serving
    );
    // No backend that is not configured is reported.
    assert_eq!(
        app.health("plinth.backend.nats").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    app.stop().await;
}

#[tokio::test]
async fn split_components_share_production_backends() {
    let name = "split_components_share_production_backends";
    let (Some(pg), Some(nats), Some(redis)) = (
        backend_url(Backend::Postgres, name).unwrap(),
        backend_url(Backend::Nats, name).unwrap(),
        backend_url(Backend::Redis, name).unwrap(),
    ) else {
        return;
    };
    let mut apps = Vec::new();
    for only in ["auth", "queue,config"] {
        let mut cfg = TestApp::config();
        cfg.only = only.parse::<ComponentSet>().unwrap();
        cfg.database_url = Some(SecretString::from(pg.clone()));
        cfg.nats_url = Some(SecretString::from(nats.clone()));
        cfg.redis_url = Some(SecretString::from(redis.clone()));
        apps.push(TestApp::spawn(cfg).await.unwrap());
    }
    assert_eq!(apps[0].health("auth").await.unwrap(), ServingStatus::Serving);
    assert_eq!(apps[0].health("queue").await.unwrap_err().code(), tonic::Code::NotFound);
    for c in ["queue", "config"] {
        assert_eq!(apps[1].health(c).await.unwrap(), ServingStatus::Serving, "{c}");
    }
    for app in &apps {
        for backend in ["database", "nats", "redis"] {
            app.wait_for_health(
                &format!("plinth.backend.{backend}"),
                ServingStatus::Serving,
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        }
    }
    for app in apps {
        app.stop().await;
    }
}

#[tokio::test]
async fn health_follows_redis_and_reports_a_nats_outage() {
    let name = "health_follows_redis_and_reports_a_nats_outage";
    let (Some(redis), Some(nats)) = (
        backend_url(Backend::Redis, name).unwrap(),
        backend_url(Backend::Nats, name).unwrap(),
    ) else {
        return;
    };
    let mut redis_proxy = ToggleProxy::reserve(host_port(&redis)).await.unwrap();
    let mut nats_proxy = ToggleProxy::reserve(host_port(&nats)).await.unwrap();
    redis_proxy.up().await.unwrap();
    nats_proxy.up().await.unwrap();
    let mut cfg = TestApp::config();
    cfg.only = "queue".parse().unwrap();
    cfg.redis_url = Some(SecretString::from(format!("redis://{}", redis_proxy.addr())));
    cfg.nats_url = Some(SecretString::from(format!("nats://{}", nats_proxy.addr())));
    let app = TestApp::spawn(cfg).await.unwrap();
    let wait = Duration::from_secs(15);
    app.wait_for_health("queue", ServingStatus::Serving, wait)
        .await
        .unwrap();
    app.wait_for_health("plinth.backend.nats", ServingStatus::Serving, wait)
        .await
        .unwrap();

    // Redis is required: the component leaves rotation while it is down.
    redis_proxy.down().await;
    app.wait_for_health("queue", ServingStatus::NotServing, wait)
        .await
        .unwrap();
    app.wait_for_health("plinth.backend.redis", ServingStatus::NotServing, wait)
        .await
        .unwrap();
    redis_proxy.up().await.unwrap();
    app.wait_for_health("queue", ServingStatus::Serving, wait)
        .await
        .unwrap();

    // NATS sits behind the outbox: its outage is reported, the component keeps serving.
    nats_proxy.down().await;
    app.wait_for_health("plinth.backend.nats", ServingStatus::NotServing, wait)
        .await
        .unwrap();
    assert_eq!(app.health("queue").await.unwrap(), ServingStatus::Serving);
    nats_proxy.up().await.unwrap();
    app.wait_for_health("plinth.backend.nats", ServingStatus::Serving, Duration::from_secs(30))
        .await
        .unwrap();
    app.stop().await;
}
