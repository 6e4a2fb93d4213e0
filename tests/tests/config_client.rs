//! The Rust `ConfigClient`: a local copy that follows Watch, resumes from its
//! revision after a disconnect without missing or repeating a change, and
//! starts from its snapshot file while the service is unreachable.

use std::convert::Infallible;
use std::time::Duration;

use plinth::config::ConfigClient;
use plinth_runtime::Tasks;
use plinth_runtime::testing::ToggleProxy;
use plinth_tests::config::{ConfigSession, follow, number, text, text_of};
use plinth_tests::{TestApp, unique, with_admin};
use tonic::transport::Endpoint;

async fn wait_for(client: &ConfigClient, revision: i64) -> anyhow::Result<()> {
    let mut changes = client.changes();
    tokio::time::timeout(Duration::from_secs(15), async {
        while client.revision() < revision {
            changes.changed().await?;
        }
        anyhow::Ok(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("client stuck at revision {} waiting for {revision}", client.revision()))?
}

fn value_of(client: &ConfigClient, key: &str) -> String {
    client.get(key).map(|kv| text_of(&kv)).unwrap_or_default()
}

#[tokio::test]
async fn the_client_follows_writes_and_resumes_after_a_disconnect_without_missing_any() {
    let app = TestApp::spawn(with_admin(TestApp::config())).await.unwrap();
    let mut admin = ConfigSession::admin(&app).await.unwrap();
    admin.set("db/url", text("a")).await.unwrap();
    admin.set("tmp", text("x")).await.unwrap();
    let mut proxy = ToggleProxy::reserve(app.grpc.to_string()).await.unwrap();
    proxy.up().await.unwrap();
    let channel = Endpoint::from_shared(format!("http://{}", proxy.addr()))
        .unwrap()
        .connect_lazy();

    let (client, tasks) = follow(channel, &admin.namespace, &admin.environment, &admin.token)
        .await
        .unwrap();
    assert_eq!(client.revision(), 2, "start returns with the head");
    assert_eq!(value_of(&client, "db/url"), "a");

    let r = admin.set("db/url", text("b")).await.unwrap();
    wait_for(&client, r).await.unwrap();
    assert_eq!(value_of(&client, "db/url"), "b");

    // Cut the connection; write while the client cannot hear.
    proxy.down().await;
    let mut last = 0;
    for i in 0..10 {
        last = admin.set(&format!("k/{i}"), number(f64::from(i))).await.unwrap();
    }
    last = last.max(admin.delete("tmp").await.unwrap());
    assert!(client.revision() < last);
    proxy.up().await.unwrap();
    wait_for(&client, last).await.unwrap();
    let copy: Vec<(String, String)> = client
        .snapshot()
        .values
        .values()
        .map(|kv| (kv.key.clone(), text_of(kv)))
        .collect();
    assert_eq!(
        copy,
        admin.list(None).await.unwrap(),
        "the copy equals the service's state"
    );
    tasks.shutdown(Duration::from_secs(1)).await;
    app.stop().await;
}

#[tokio::test]
async fn the_client_starts_from_its_snapshot_file_while_the_service_is_down() {
    let app = TestApp::spawn(with_admin(TestApp::config())).await.unwrap();
    let mut admin = ConfigSession::admin(&app).await.unwrap();
    admin.set("feature/beta", text("on")).await.unwrap();
    let head = admin.set("db/url", text("postgres://a")).await.unwrap();
    let file = std::env::temp_dir().join(format!("plinth-config-snapshot-{}", unique()));
    let mut proxy = ToggleProxy::reserve(app.grpc.to_string()).await.unwrap();
    proxy.up().await.unwrap();
    let channel = Endpoint::from_shared(format!("http://{}", proxy.addr()))
        .unwrap()
        .connect_lazy();
    let builder = || {
        ConfigClient::builder(channel.clone(), &admin.namespace, &admin.environment)
            .bearer(&admin.token)
            .snapshot_file(&file)
    };

    // A first run leaves its copy in the file.
    let (first, _follow) = builder().start().await.unwrap();
    assert_eq!(first.revision(), head);
    drop(first);

    // The service is unreachable: without a file there is nothing to start from…
    proxy.down().await;
    let none = ConfigClient::builder(channel.clone(), &admin.namespace, &admin.environment)
        .bearer(&admin.token)
        .start()
        .await;
    assert!(none.is_err());
    // …with it, the client starts from the saved copy.
    let (client, follow) = builder().start().await.unwrap();
    assert_eq!(client.revision(), head);
    assert_eq!(value_of(&client, "db/url"), "postgres://a");
    let tasks = Tasks::new();
    tasks.spawn("config-client", async move {
        follow.await;
        Ok::<(), Infallible>(())
    });

    // When the service is back, it catches up from the saved revision.
    let next = admin.set("db/url", text("postgres://b")).await.unwrap();
    proxy.up().await.unwrap();
    wait_for(&client, next).await.unwrap();
    assert_eq!(value_of(&client, "db/url"), "postgres://b");
    assert_eq!(value_of(&client, "feature/beta"), "on");
    tasks.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_file(&file);
    app.stop().await;
}
