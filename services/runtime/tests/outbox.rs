//! The transactional outbox on every storage × bus pair: committed changes
//! publish their events exactly once and in order per aggregate, rolled-back
//! ones never, and a bus outage loses nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use plinth_runtime::Tasks;
use plinth_runtime::events::outbox::{OutboxEvent, Relay};
use plinth_runtime::events::{ConsumerSpec, Event, InProcessBus, NatsBus, SharedBus, Subscription};
use plinth_runtime::storage::{Db, Migrations};
use plinth_runtime::testing::{Backend, TestDatabase, ToggleProxy, backend_url, host_port};
use prost::Message;
use secrecy::SecretString;

#[derive(Clone, PartialEq, prost::Message)]
struct ItemChanged {
    #[prost(string, tag = "1")]
    item: String,
    #[prost(int64, tag = "2")]
    version: i64,
}

async fn create_items_table(db: &Db) -> anyhow::Result<()> {
    let ddl = "CREATE TABLE items (id TEXT PRIMARY KEY, version BIGINT NOT NULL)";
    match db {
        Db::Sqlite(p) => {
            sqlx::query(ddl).execute(p).await?;
        }
        Db::Postgres(p) => {
            sqlx::query(ddl).execute(p).await?;
        }
    }
    Ok(())
}

/// Upserts `item` at `version` and writes its event in one transaction;
/// rolls back instead of committing when `commit` is false.
async fn change(db: &Db, topic: &str, item: &str, version: i64, commit: bool) -> anyhow::Result<OutboxEvent> {
    let event = OutboxEvent::new(
        format!("plinth.{topic}.item_changed"),
        item,
        &ItemChanged {
            item: item.to_owned(),
            version,
        },
    );
    match db {
        Db::Sqlite(p) => {
            let mut tx = p.begin().await?;
            sqlx::query("INSERT INTO items (id, version) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET version = excluded.version")
                .bind(item)
                .bind(version)
                .execute(&mut *tx)
                .await?;
            event.write_sqlite(&mut tx).await?;
            if commit {
                tx.commit().await?
            } else {
                tx.rollback().await?
            }
        }
        Db::Postgres(p) => {
            let mut tx = p.begin().await?;
            sqlx::query("INSERT INTO items (id, version) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET version = excluded.version")
                .bind(item)
                .bind(version)
                .execute(&mut *tx)
                .await?;
            event.write_postgres(&mut tx).await?;
            if commit {
                tx.commit().await?
            } else {
                tx.rollback().await?
            }
        }
    }
    Ok(event)
}

async fn pending(db: &Db) -> anyhow::Result<i64> {
    let (n,): (i64,) = match db {
        Db::Sqlite(p) => {
            sqlx::query_as("SELECT count(*) FROM plinth_outbox")
                .fetch_one(p)
                .await?
        }
        Db::Postgres(p) => {
            sqlx::query_as("SELECT count(*) FROM plinth_outbox")
                .fetch_one(p)
                .await?
        }
    };
    Ok(n)
}

/// Receives until `want` events arrived, then checks for extras for `quiet`.
async fn receive(sub: &mut Subscription, want: usize, within: Duration, quiet: Duration) -> anyhow::Result<Vec<Event>> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sub.next()).await {
            Ok(Some(d)) => {
                let d = d?;
                got.push(d.event.clone());
                d.ack().await?;
            }
            Ok(None) => bail!("subscription ended after {} events", got.len()),
            Err(_) => bail!("only {} of {want} events arrived within {within:?}", got.len()),
        }
    }
    if let Ok(Some(extra)) = tokio::time::timeout(quiet, sub.next()).await {
        bail!("an extra delivery arrived: {:?}", extra.map(|d| d.event.id));
    }
    Ok(got)
}

/// Checks ids match the committed events exactly once, in order per aggregate.
fn check_exactly_once_in_order(got: &[Event], committed: &[OutboxEvent]) -> anyhow::Result<()> {
    let ids: std::collections::BTreeSet<&str> = got.iter().map(|e| e.id.as_str()).collect();
    ensure!(ids.len() == got.len(), "duplicate deliveries");
    for c in committed {
        ensure!(
            ids.contains(c.id.as_str()),
            "committed event {} was not delivered",
            c.id
        );
    }
    ensure!(
        got.len() == committed.len(),
        "{} delivered, {} committed",
        got.len(),
        committed.len()
    );
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    for e in got {
        let msg = ItemChanged::decode(e.payload.clone()).context("payload must be the protobuf that was written")?;
        if let Some(prev) = last.insert(msg.item.clone(), msg.version) {
            ensure!(
                msg.version > prev,
                "{}: version {} delivered after {prev}",
                msg.item,
                msg.version
            );
        }
    }
    Ok(())
}

async fn outbox_contract(tdb: &TestDatabase, relay_bus: SharedBus, consumer_bus: SharedBus) -> anyhow::Result<()> {
    let db = &tdb.db;
    let topic = format!("t{}", uuid::Uuid::now_v7().simple());
    create_items_table(db).await?;
    let mut sub = consumer_bus
        .subscribe(&ConsumerSpec::new(
            format!("{topic}-audit"),
            format!("plinth.{topic}.>"),
        ))
        .await?;

    let mut committed = Vec::new();
    for v in 1..=6 {
        for item in ["a", "b"] {
            committed.push(change(db, &topic, item, v, true).await?);
        }
    }
    let rolled_back = change(db, &topic, "a", 99, false).await?;
    ensure!(
        pending(db).await? == 12,
        "every committed change must leave exactly one outbox row"
    );

    // A relay that crashed after publishing but before deleting: the rows get
    // published again and the bus must drop the duplicates.
    for e in &committed[..3] {
        let ev = Event {
            id: e.id.clone(),
            subject: e.subject.clone(),
            payload: e.payload.clone().into(),
            headers: e.headers.clone(),
        };
        relay_bus.publish(&ev).await?;
    }

    let relay = Relay::new("test", db.clone(), relay_bus, Duration::from_millis(50), 5);
    let tasks = Tasks::new();
    tasks.spawn("outbox-relay", relay.clone().run(tasks.token()));
    relay.wake();
    let got = receive(
        &mut sub,
        committed.len(),
        Duration::from_secs(15),
        Duration::from_millis(700),
    )
    .await?;
    tasks.shutdown(Duration::from_secs(5)).await;
    check_exactly_once_in_order(&got, &committed)?;
    ensure!(
        !got.iter().any(|e| e.id == rolled_back.id),
        "a rolled-back change must never publish"
    );
    ensure!(pending(db).await? == 0, "published rows must leave the outbox");
    Ok(())
}

fn memory_bus() -> SharedBus {
    Arc::new(InProcessBus::new(Duration::from_secs(120)))
}

async fn nats_bus(url: &str) -> anyhow::Result<SharedBus> {
    Ok(Arc::new(
        NatsBus::connect(&SecretString::from(url.to_owned()), "PLINTH", Duration::from_secs(120)).await?,
    ))
}

#[tokio::test]
async fn sqlite_outbox_to_in_process_bus() {
    let db = TestDatabase::sqlite("test", &Migrations::RUNTIME_ONLY).await.unwrap();
    let bus = memory_bus();
    outbox_contract(&db, bus.clone(), bus).await.unwrap();
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn postgres_outbox_to_in_process_bus() {
    let Some(url) = backend_url(Backend::Postgres, "postgres_outbox_to_in_process_bus").unwrap() else {
        return;
    };
    let db = TestDatabase::postgres(&url, "test", &Migrations::RUNTIME_ONLY)
        .await
        .unwrap();
    let bus = memory_bus();
    outbox_contract(&db, bus.clone(), bus).await.unwrap();
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn sqlite_outbox_to_nats() {
    let Some(url) = backend_url(Backend::Nats, "sqlite_outbox_to_nats").unwrap() else {
        return;
    };
    let db = TestDatabase::sqlite("test", &Migrations::RUNTIME_ONLY).await.unwrap();
    let bus = nats_bus(&url).await.unwrap();
    outbox_contract(&db, bus.clone(), bus).await.unwrap();
    db.cleanup().await.unwrap();
}

#[tokio::test]
async fn postgres_outbox_to_nats() {
    let Some(pg) = backend_url(Backend::Postgres, "postgres_outbox_to_nats").unwrap() else {
        return;
    };
    let Some(url) = backend_url(Backend::Nats, "postgres_outbox_to_nats").unwrap() else {
        return;
    };
    let db = TestDatabase::postgres(&pg, "test", &Migrations::RUNTIME_ONLY)
        .await
        .unwrap();
    let bus = nats_bus(&url).await.unwrap();
    outbox_contract(&db, bus.clone(), bus).await.unwrap();
    db.cleanup().await.unwrap();
}

/// NATS is unreachable while changes commit; once it is back, every event is
/// delivered exactly once, in order per aggregate.
async fn nats_outage_loses_nothing(tdb: TestDatabase, nats_url: &str) -> anyhow::Result<()> {
    let db = &tdb.db;
    let topic = format!("t{}", uuid::Uuid::now_v7().simple());
    create_items_table(db).await?;
    let mut proxy = ToggleProxy::reserve(host_port(nats_url)).await?;
    let relay_bus: SharedBus = Arc::new(
        NatsBus::connect(
            &SecretString::from(format!("nats://{}", proxy.addr())),
            "PLINTH",
            Duration::from_secs(120),
        )
        .await?,
    );
    ensure!(
        relay_bus.ping().await.is_err(),
        "the relay's NATS must start out unreachable"
    );
    let consumer_bus = nats_bus(nats_url).await?;
    let mut sub = consumer_bus
        .subscribe(&ConsumerSpec::new(
            format!("{topic}-audit"),
            format!("plinth.{topic}.>"),
        ))
        .await?;

    let relay = Relay::new("test", db.clone(), relay_bus.clone(), Duration::from_millis(100), 8);
    let tasks = Tasks::new();
    tasks.spawn("outbox-relay", relay.clone().run(tasks.token()));

    let mut committed = Vec::new();
    for v in 1..=10 {
        for item in ["a", "b"] {
            committed.push(change(db, &topic, item, v, true).await?);
            relay.wake();
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ensure!(
        pending(db).await? == 20,
        "with NATS down every event must wait in the outbox"
    );
    if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
        bail!(
            "nothing can be delivered while NATS is down, got {:?}",
            d.map(|d| d.event.id)
        );
    }

    proxy.up().await?;
    let got = receive(
        &mut sub,
        committed.len(),
        Duration::from_secs(40),
        Duration::from_millis(700),
    )
    .await?;
    check_exactly_once_in_order(&got, &committed)?;
    ensure!(pending(db).await? == 0, "the outbox must drain once NATS is back");
    tasks.shutdown(Duration::from_secs(5)).await;
    proxy.down().await;
    tdb.cleanup().await?;
    Ok(())
}

#[tokio::test]
async fn postgres_outbox_survives_a_nats_outage() {
    let Some(pg) = backend_url(Backend::Postgres, "postgres_outbox_survives_a_nats_outage").unwrap() else {
        return;
    };
    let Some(url) = backend_url(Backend::Nats, "postgres_outbox_survives_a_nats_outage").unwrap() else {
        return;
    };
    let db = TestDatabase::postgres(&pg, "test", &Migrations::RUNTIME_ONLY)
        .await
        .unwrap();
    nats_outage_loses_nothing(db, &url).await.unwrap();
}

#[tokio::test]
async fn sqlite_outbox_survives_a_nats_outage() {
    let Some(url) = backend_url(Backend::Nats, "sqlite_outbox_survives_a_nats_outage").unwrap() else {
        return;
    };
    let db = TestDatabase::sqlite("test", &Migrations::RUNTIME_ONLY).await.unwrap();
    nats_outage_loses_nothing(db, &url).await.unwrap();
}

#[tokio::test]
async fn two_postgres_relays_on_one_outbox_publish_each_event_once() {
    let Some(pg) = backend_url(
        Backend::Postgres,
        "two_postgres_relays_on_one_outbox_publish_each_event_once",
    )
    .unwrap() else {
        return;
    };
    let tdb = TestDatabase::postgres(&pg, "test", &Migrations::RUNTIME_ONLY)
        .await
        .unwrap();
    let replica = tdb.connect_again().await.unwrap();
    let topic = format!("t{}", uuid::Uuid::now_v7().simple());
    create_items_table(&tdb.db).await.unwrap();
    // No dedup window: only the relays' mutual exclusion prevents duplicates.
    let bus: SharedBus = Arc::new(InProcessBus::new(Duration::ZERO));
    let mut sub = bus
        .subscribe(&ConsumerSpec::new("replicas", format!("plinth.{topic}.>")))
        .await
        .unwrap();
    let mut committed = Vec::new();
    for v in 1..=40 {
        committed.push(change(&tdb.db, &topic, "a", v, true).await.unwrap());
    }
    let tasks = Tasks::new();
    for db in [tdb.db.clone(), replica] {
        let relay = Relay::new("test", db, bus.clone(), Duration::from_millis(10), 3);
        tasks.spawn("outbox-relay", relay.run(tasks.token()));
    }
    let got = receive(
        &mut sub,
        committed.len(),
        Duration::from_secs(20),
        Duration::from_millis(500),
    )
    .await
    .unwrap();
    check_exactly_once_in_order(&got, &committed).unwrap();
    tasks.shutdown(Duration::from_secs(5)).await;
    tdb.cleanup().await.unwrap();
}
