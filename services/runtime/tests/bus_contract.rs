//! One contract suite for every `EventBus` (in-process, NATS JetStream), and
//! proof that it catches a bus that loses events.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use futures::StreamExt;
use plinth_runtime::events::{
    BusError, ConsumerSpec, Delivery, Event, EventBus, InProcessBus, Listener, NatsBus, SharedBus, Subscription,
};
use plinth_runtime::testing::{Backend, backend_url};
use secrecy::SecretString;

fn event(topic: &str, kind: &str, n: u32) -> Event {
    let mut headers = BTreeMap::new();
    headers.insert(
        "traceparent".to_owned(),
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
    );
    Event {
        id: uuid::Uuid::now_v7().to_string(),
        subject: format!("plinth.{topic}.{kind}"),
        payload: Bytes::from(n.to_be_bytes().to_vec()),
        headers,
    }
}

fn number(d: &Delivery) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&d.event.payload[..4]);
    u32::from_be_bytes(b)
}

async fn next(sub: &mut Subscription) -> anyhow::Result<Delivery> {
    match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
        Ok(Some(d)) => Ok(d?),
        Ok(None) => bail!("subscription ended"),
        Err(_) => bail!("no delivery within 10s"),
    }
}

async fn nothing_more(sub: &mut Subscription, wait: Duration) -> anyhow::Result<()> {
    match tokio::time::timeout(wait, sub.next()).await {
        Err(_) => Ok(()),
        Ok(Some(Ok(d))) => bail!(
            "unexpected extra delivery of {} (attempt {})",
            d.event.subject,
            d.attempt
        ),
        Ok(other) => bail!("subscription failed: {:?}", other.map(|r| r.map(|_| ()))),
    }
}

async fn contract(bus: SharedBus) -> anyhow::Result<()> {
    let topic = format!("t{}", uuid::Uuid::now_v7().simple());
    let durable = |name: &str| format!("{topic}-{name}");

    // Ordered delivery to a wildcard consumer, filtered delivery to another.
    let mut all = bus
        .subscribe(&ConsumerSpec::new(durable("all"), format!("plinth.{topic}.>")))
        .await?;
    let mut only_b = bus
        .subscribe(&ConsumerSpec::new(durable("b"), format!("plinth.{topic}.b")))
        .await?;
    let sent: Vec<Event> = (0..4)
        .map(|n| event(&topic, if n % 2 == 0 { "a" } else { "b" }, n))
        .collect();
    for e in &sent {
        bus.publish(e).await?;
    }
    for (n, e) in sent.iter().enumerate() {
        let d = next(&mut all).await?;
        ensure!(
            d.event.id == e.id,
            "delivery {n} out of order: got {} want {}",
            d.event.id,
            e.id
        );
        ensure!(
            d.event.subject == e.subject && d.event.payload == e.payload,
            "event {n} changed in transit"
        );
        ensure!(
            d.event.headers.get("traceparent") == e.headers.get("traceparent"),
            "trace context lost"
        );
        ensure!(d.attempt == 1, "first delivery must be attempt 1");
        d.ack().await?;
    }
    nothing_more(&mut all, Duration::from_millis(300)).await?;
    for want in [1, 3] {
        let d = next(&mut only_b).await?;
        ensure!(number(&d) == want, "filtered consumer got {} want {want}", number(&d));
        d.ack().await?;
    }
    nothing_more(&mut only_b, Duration::from_millis(300)).await?;

    // The same id twice is stored once.
    let dup = event(&topic, "a", 10);
    bus.publish(&dup).await?;
    bus.publish(&dup).await?;
    let d = next(&mut all).await?;
    ensure!(d.event.id == dup.id, "dedup: wrong event");
    d.ack().await?;
    nothing_more(&mut all, Duration::from_millis(500))
        .await
        .context("a duplicate id must not be delivered twice")?;

    // Nack redelivers, with the attempt counted.
    bus.publish(&event(&topic, "a", 20)).await?;
    let d = next(&mut all).await?;
    ensure!(number(&d) == 20);
    d.nack(Duration::ZERO).await?;
    let again = next(&mut all).await?;
    ensure!(
        number(&again) == 20 && again.attempt == 2,
        "nack must redeliver as attempt 2, got attempt {}",
        again.attempt
    );
    again.ack().await?;

    // A durable consumer resumes after its subscriber goes away; unacked work comes back.
    drop(all);
    bus.publish(&event(&topic, "a", 30)).await?;
    let mut resumed = bus
        .subscribe(&ConsumerSpec::new(durable("all"), format!("plinth.{topic}.>")))
        .await?;
    let d = next(&mut resumed).await?;
    ensure!(
        number(&d) == 30,
        "a resumed durable must continue after its last ack, got {}",
        number(&d)
    );
    drop(d); // neither acked nor nacked
    let mut short = ConsumerSpec::new(durable("short"), format!("plinth.{topic}.b"));
    short.ack_wait = Duration::from_secs(1);
    let mut late = bus.subscribe(&short).await?;
    // A new durable sees the retained history from the start.
    let first = next(&mut late).await?;
    ensure!(
        number(&first) == 1,
        "a new durable must start from the first retained event"
    );
    drop(first);
    let second = next(&mut late).await?;
    ensure!(number(&second) == 3, "delivery continues past an unsettled event");
    second.ack().await?;
    let redelivered = next(&mut late).await?;
    ensure!(
        number(&redelivered) == 1 && redelivered.attempt >= 2,
        "an unacked delivery must come back after ack_wait"
    );
    redelivered.ack().await?;

    // A new durable that does not replay sees only what is published after it.
    let mut fresh = bus
        .subscribe(&ConsumerSpec {
            from_start: false,
            ..ConsumerSpec::new(durable("fresh"), format!("plinth.{topic}.>"))
        })
        .await?;
    bus.publish(&event(&topic, "a", 40)).await?;
    let d = next(&mut fresh).await?;
    ensure!(
        number(&d) == 40,
        "a consumer without replay must start at the next event, got {}",
        number(&d)
    );
    d.ack().await?;

    // A listener sees live events under its filter, in order, and nothing else.
    let topic = format!("live{}", uuid::Uuid::now_v7().simple());
    let mut live = bus.listen(&format!("plinth.{topic}.*")).await?;
    bus.publish(&event(&topic, "changed", 7)).await?;
    bus.publish(&event("elsewhere", "changed", 8)).await?;
    bus.publish(&event(&topic, "changed", 9)).await?;
    for want in [7u32, 9] {
        let got = tokio::time::timeout(Duration::from_secs(5), live.next())
            .await
            .context("listener got nothing")?
            .context("listener ended")?;
        let mut b = [0u8; 4];
        b.copy_from_slice(got.payload.get(..4).context("short payload")?);
        ensure!(
            u32::from_be_bytes(b) == want,
            "listener got {} instead of {want}",
            u32::from_be_bytes(b)
        );
        ensure!(!got.id.is_empty(), "a listened event keeps its id");
    }

    bus.ping().await?;
    Ok(())
}

#[tokio::test]
async fn in_process_bus_keeps_the_contract() {
    contract(Arc::new(InProcessBus::new(Duration::from_secs(60))))
        .await
        .unwrap();
}

#[tokio::test]
async fn nats_bus_keeps_the_contract() {
    let Some(url) = backend_url(Backend::Nats, "nats_bus_keeps_the_contract").unwrap() else {
        return;
    };
    let bus = NatsBus::connect(&SecretString::from(url), "PLINTH", Duration::from_secs(120))
        .await
        .unwrap();
    contract(Arc::new(bus)).await.unwrap();
}

/// A bus that silently drops every third event, as a fire-and-forget publisher would under load.
struct LossyBus {
    inner: InProcessBus,
    count: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl EventBus for LossyBus {
    async fn publish(&self, event: &Event) -> Result<(), BusError> {
        if self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 3 == 2 {
            return Ok(());
        }
        self.inner.publish(event).await
    }
    async fn subscribe(&self, spec: &ConsumerSpec) -> Result<Subscription, BusError> {
        self.inner.subscribe(spec).await
    }
    async fn listen(&self, filter: &str) -> Result<Listener, BusError> {
        self.inner.listen(filter).await
    }
    async fn ping(&self) -> Result<(), BusError> {
        Ok(())
    }
    fn kind(&self) -> &'static str {
        "lossy"
    }
}

#[tokio::test]
async fn the_contract_catches_a_lossy_bus() {
    let bus = LossyBus {
        inner: InProcessBus::new(Duration::from_secs(60)),
        count: Default::default(),
    };
    assert!(contract(Arc::new(bus)).await.is_err());
}

#[tokio::test]
async fn bad_subjects_are_rejected() {
    let bus = InProcessBus::new(Duration::from_secs(60));
    let mut e = event("x", "a", 1);
    e.subject = "orders.created".into();
    assert!(matches!(bus.publish(&e).await, Err(BusError::Rejected(_))));
}
