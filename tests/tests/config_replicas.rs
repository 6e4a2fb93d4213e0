//! Two config replicas sharing PostgreSQL and NATS: writers on both at once,
//! a watcher on each. Every watcher sees every revision exactly once, in
//! order, with the keys the database recorded for it, whichever replica
//! committed it.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use plinth::config::v1::{self as pb};
use plinth_runtime::testing::{Backend, backend_url};
use plinth_tests::config::{ConfigSession, number};
use plinth_tests::{TestApp, postgres_config, with_admin};

const WRITERS_PER_REPLICA: usize = 3;
const WRITES_PER_WRITER: usize = 60;

/// Reads `count` change messages (revisions 1..=count) from `stream`.
async fn collect(
    mut stream: tonic::Streaming<pb::WatchResponse>,
    count: i64,
) -> anyhow::Result<(Vec<(i64, Vec<String>)>, tonic::Streaming<pb::WatchResponse>)> {
    let mut seen = Vec::new();
    while seen.len() < usize::try_from(count)? {
        let m = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .map_err(|_| anyhow::anyhow!("no watch message within 20 s after {} revisions", seen.len()))?
            .ok_or_else(|| anyhow::anyhow!("watch ended"))??;
        if m.progress || m.snapshot {
            continue;
        }
        let keys = m
            .events
            .iter()
            .map(|e| e.value.as_ref().map(|v| v.key.clone()).unwrap_or_default())
            .collect();
        seen.push((m.revision, keys));
    }
    Ok((seen, stream))
}

#[tokio::test]
async fn watchers_on_either_replica_see_every_revision_once_in_order() {
    let Some(config) = postgres_config("config_replicas").unwrap() else {
        return;
    };
    let Some(nats) = backend_url(Backend::Nats, "config_replicas").unwrap() else {
        return;
    };
    let mut config = with_admin(config);
    config.nats_url = Some(nats.into());
    // Make a missed hint show up as a stall rather than be covered by polling.
    config.config.poll_ms = 30_000;
    let a = TestApp::spawn(config.clone()).await.unwrap();
    let mut b_config = TestApp::replica_of(&config, "config").unwrap();
    b_config.auth.url = Some(format!("http://{}", a.grpc));
    b_config.config.poll_ms = 30_000;
    let b = TestApp::spawn(b_config).await.unwrap();

    let on_a = ConfigSession::admin(&a).await.unwrap();
    let mut on_b = ConfigSession::with_token(&b, &on_a.token).await.unwrap();
    on_b.namespace = on_a.namespace.clone();
    on_b.environment = on_a.environment.clone();
    let mut watch_a = ConfigSession::with_token(&a, &on_a.token).await.unwrap();
    watch_a.namespace = on_a.namespace.clone();
    watch_a.environment = on_a.environment.clone();
    let mut watch_b = ConfigSession::with_token(&b, &on_a.token).await.unwrap();
    watch_b.namespace = on_a.namespace.clone();
    watch_b.environment = on_a.environment.clone();
    let stream_a = watch_a.watch("", 0).await.unwrap();
    let stream_b = watch_b.watch("", 0).await.unwrap();

    let total = i64::try_from(2 * WRITERS_PER_REPLICA * WRITES_PER_WRITER).unwrap();
    let readers = async { tokio::join!(collect(stream_a, total), collect(stream_b, total)) };

    let mut writers = Vec::new();
    for w in 0..2 * WRITERS_PER_REPLICA {
        let (app, base) = if w % 2 == 0 { (&a, &on_a) } else { (&b, &on_b) };
        let mut s = ConfigSession::with_token(app, &base.token).await.unwrap();
        s.namespace = base.namespace.clone();
        s.environment = base.environment.clone();
        writers.push(async move {
            let mut revisions = Vec::new();
            for i in 0..WRITES_PER_WRITER {
                let key = format!("w{w}/k{}", i % 5);
                revisions.push((s.set(&key, number(i as f64)).await?, key));
            }
            anyhow::Ok(revisions)
        });
    }
    let ((seen_a, seen_b), written) = tokio::time::timeout(
        Duration::from_secs(120),
        futures::future::join(readers, futures::future::join_all(writers)),
    )
    .await
    .expect("writers and watchers finished");
    let mut committed: BTreeMap<i64, String> = BTreeMap::new();
    for w in written {
        for (revision, key) in w.unwrap() {
            assert!(
                committed.insert(revision, key).is_none(),
                "revision {revision} given twice"
            );
        }
    }
    assert_eq!(
        committed.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );

    let (seen_a, stream_a) = seen_a.unwrap();
    let (seen_b, _) = seen_b.unwrap();
    for (replica, seen) in [("a", seen_a), ("b", seen_b)] {
        let revisions: Vec<i64> = seen.iter().map(|(r, _)| *r).collect();
        assert_eq!(
            revisions,
            (1..=total).collect::<Vec<_>>(),
            "replica {replica}: no gap, no duplicate, in order"
        );
        for (revision, keys) in &seen {
            assert_eq!(
                keys,
                &vec![committed[revision].clone()],
                "replica {replica}, revision {revision}"
            );
        }
    }

    // A write on B alone reaches A's watcher through the change event, long
    // before A's next poll (30 s away): nothing on A pulls it in otherwise.
    let next = on_b.set("late/key", number(1.0)).await.unwrap();
    let (late, _) = tokio::time::timeout(Duration::from_secs(5), collect(stream_a, 1))
        .await
        .expect("a write on replica b reaches a watcher on replica a through the bus")
        .unwrap();
    assert_eq!(late, vec![(next, vec!["late/key".to_owned()])]);
    b.stop().await;
    a.stop().await;
}
