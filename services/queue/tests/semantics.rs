//! The queue's semantics, one suite run on every backend (SQLite, the
//! embedded default, and PostgreSQL): priorities, delays, TTL, dedup under
//! concurrency, lease expiry and redelivery, stale-token rejection, backoff
//! timing, dead letters and redrive, pause and drain, rate and concurrency
//! limits, fairness between groups, long-poll wake-ups, and a restart that
//! loses nothing. Time is a hand-moved clock; sweeps run when the test says.

#![expect(
    clippy::unwrap_used,
    reason = "the scenarios run inside the SQLite and PostgreSQL tests; an unexpected answer fails the test"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use plinth_queue::model::{AckOutcome, Backoff, Nack, NackOutcome, NewMessage, RetryFilter, Schedule, Settings, State};
use plinth_queue::{QueueError, Queues, Store};
use plinth_runtime::config::QueueSettings;
use plinth_runtime::on_db;
use plinth_runtime::resilience::{ManualWallClock, WallClock};
use plinth_runtime::storage::Db;
use plinth_runtime::testing::{Backend, TestDatabase, backend_url};

/// Runs a scenario on SQLite and, when configured, on PostgreSQL.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                let db = plinth_runtime::testing::TestDatabase::sqlite("queue", &plinth_queue::MIGRATIONS).await.unwrap();
                super::run(db, super::$name).await;
            }
            #[tokio::test]
            async fn postgres() {
                if let Some(url) = super::backend_url(super::Backend::Postgres, stringify!($name)).unwrap() {
                    let db = plinth_runtime::testing::TestDatabase::postgres(&url, "queue", &plinth_queue::MIGRATIONS).await.unwrap();
                    super::run(db, super::$name).await;
                }
            }
        }
    )*};
}

on_both_backends!(
    priority_first_then_oldest,
    delayed_messages_wait_for_their_time,
    expired_messages_become_dead_letters,
    dedup_holds_under_concurrent_enqueues,
    concurrent_single_enqueues_each_get_their_own_message,
    concurrent_workers_share_out_the_work_without_overlap,
    workers_acking_and_leasing_together_finish_every_job_once,
    expired_lease_redelivers_and_the_old_token_is_refused,
    backoff_follows_the_queue_settings_then_dead_letters,
    dead_letters_are_redriven_by_retry_failed,
    dead_letter_queue_receives_failures_and_gives_them_back,
    pause_and_drain_stop_handing_out_work,
    rate_limit_caps_messages_per_second,
    concurrency_limit_caps_leases_in_flight,
    busy_group_does_not_starve_a_quiet_one,
    fifo_groups_hand_out_one_message_per_group_in_order,
    fifo_groups_hold_under_concurrent_workers,
    waiting_lease_wakes_when_work_arrives,
    extended_lease_outlives_its_first_expiry,
    a_leased_message_reads_as_stored,
    restart_loses_nothing_in_any_state,
    batch_enqueue_is_ordered_and_purge_counts,
    schedules_tick_exactly_once_across_two_replicas,
);

struct Ctx {
    queues: Queues,
    clock: ManualWallClock,
    db: Db,
}

fn service(db: &Db, clock: &ManualWallClock) -> Queues {
    Queues::with_clock(
        Store::new(db.clone()),
        QueueSettings {
            poll_ms: 50,
            ..QueueSettings::default()
        },
        None,
        Arc::new(clock.clone()),
    )
}

async fn run<F, Fut>(db: TestDatabase, scenario: F)
where
    F: FnOnce(Ctx, TestDatabase) -> Fut,
    Fut: std::future::Future<Output = TestDatabase>,
{
    let clock = ManualWallClock::new();
    let ctx = Ctx {
        queues: service(&db.db, &clock),
        clock,
        db: db.db.clone(),
    };
    let db = scenario(ctx, db).await;
    db.cleanup().await.unwrap();
}

/// Runs a PostgreSQL-only scenario, when PostgreSQL is configured.
async fn on_postgres<F, Fut>(name: &str, scenario: F)
where
    F: FnOnce(Ctx, TestDatabase) -> Fut,
    Fut: std::future::Future<Output = TestDatabase>,
{
    if let Some(url) = backend_url(Backend::Postgres, name).unwrap() {
        let db = TestDatabase::postgres(&url, "queue", &plinth_queue::MIGRATIONS)
            .await
            .unwrap();
        run(db, scenario).await;
    }
}

fn job(payload: &str) -> NewMessage {
    NewMessage {
        payload: payload.as_bytes().to_vec(),
        ..NewMessage::default()
    }
}

fn plain_backoff(initial_ms: i64) -> Backoff {
    Backoff {
        initial_ms,
        max_ms: 60_000,
        multiplier: 2.0,
        jitter: false,
    }
}

async fn queue(ctx: &Ctx, name: &str, settings: Settings) {
    ctx.queues.create_queue(name, &settings, "tester").await.unwrap();
}

async fn payloads(ctx: &Ctx, name: &str, max: i64) -> Vec<String> {
    ctx.queues
        .lease(name, max, None, Duration::ZERO)
        .await
        .unwrap()
        .into_iter()
        .map(|l| String::from_utf8(l.message.payload).unwrap())
        .collect()
}

async fn advance(ctx: &Ctx, by: Duration) {
    ctx.clock.advance(by);
    ctx.queues.tick().await.unwrap();
}

async fn outbox_subjects(db: &Db) -> Vec<String> {
    on_db!(db, |pool| {
        sqlx::query_scalar("SELECT subject FROM plinth_outbox ORDER BY seq")
            .fetch_all(pool)
            .await
            .unwrap()
    })
}

async fn priority_first_then_oldest(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    queue(&ctx, "jobs", Settings::default()).await;
    for (p, name) in [(0, "a"), (5, "urgent"), (0, "b"), (-3, "later"), (0, "c")] {
        let m = NewMessage {
            priority: p,
            ..job(name)
        };
        ctx.queues.enqueue("jobs", &[m]).await.unwrap();
    }
    assert_eq!(payloads(&ctx, "jobs", 3).await, ["urgent", "a", "b"]);
    assert_eq!(payloads(&ctx, "jobs", 5).await, ["c", "later"]);
    db
}

async fn delayed_messages_wait_for_their_time(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    queue(&ctx, "jobs", Settings::default()).await;
    let delayed = NewMessage {
        delay_ms: 10_000,
        ..job("later")
    };
    let r = ctx.queues.enqueue("jobs", &[delayed]).await.unwrap();
    assert_eq!(r[0].state, Some(State::Scheduled));
    assert!(payloads(&ctx, "jobs", 1).await.is_empty());
    advance(&ctx, Duration::from_millis(9_999)).await;
    assert!(payloads(&ctx, "jobs", 1).await.is_empty(), "ready a millisecond early");
    advance(&ctx, Duration::from_millis(1)).await;
    assert_eq!(payloads(&ctx, "jobs", 1).await, ["later"]);
    db
}

async fn expired_messages_become_dead_letters(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    let settings = Settings {
        ttl_ms: 5_000,
        ..Settings::default()
    };
    queue(&ctx, "jobs", settings).await;
    ctx.queues.enqueue("jobs", &[job("stale")]).await.unwrap();
    let kept = NewMessage {
        ttl_ms: Some(60_000),
        ..job("kept")
    };
    ctx.queues.enqueue("jobs", &[kept]).await.unwrap();
    advance(&ctx, Duration::from_secs(6)).await;
    let view = ctx.queues.queue("jobs").await.unwrap();
    assert_eq!((view.counts.ready, view.counts.dead), (1, 1));
    assert_eq!(payloads(&ctx, "jobs", 5).await, ["kept"]);
    let dead = ctx.queues.messages("jobs", State::Dead, 0, 10).await.unwrap();
    assert_eq!(dead[0].payload, b"stale");
    assert!(
        outbox_subjects(&ctx.db)
            .await
            .contains(&"plinth.queue.dead_lettered".to_owned())
    );
    db
}

async fn dedup_holds_under_concurrent_enqueues(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    queue(&ctx, "jobs", Settings::default()).await;
    let results: Vec<_> = futures::future::join_all((0..16).map(|i| {
        let q = ctx.queues.clone();
        async move {
            let m = NewMessage {
                dedup_key: "order-42".into(),
                ..job(&format!("copy {i}"))
            };
            q.enqueue("jobs", &[m]).await.unwrap().remove(0)
        }
    }))
    .await;
    let first = results.iter().filter(|r| !r.duplicate).count();
    assert_eq!(first, 1, "exactly one enqueue adds the message");
    assert!(
        results.iter().all(|r| r.id == results[0].id),
        "every duplicate names the first id"
    );
    assert_eq!(ctx.queues.queue("jobs").await.unwrap().counts.ready, 1);
    // In one batch, too; and after the window the key is free again.
    let batch = [
        NewMessage {
            dedup_key: "b".into(),
            ..job("1")
        },
        NewMessage {
            dedup_key: "b".into(),
            ..job("2")
        },
    ];
    let r = ctx.queues.enqueue("jobs", &batch[..]).await.unwrap();
    assert_eq!(
        (r[0].duplicate, r[1].duplicate, r[0].id == r[1].id),
        (false, true, true)
    );
    advance(&ctx, Duration::from_secs(3601)).await;
    let again = NewMessage {
        dedup_key: "order-42".into(),
        ..job("again")
    };
    assert!(!ctx.queues.enqueue("jobs", &[again]).await.unwrap()[0].duplicate);
    db
}

/// Small enqueues arriving together share a transaction; each caller must
/// still get the id of its own message, and a failure only its own queue's.
async fn concurrent_single_enqueues_each_get_their_own_message(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    queue(&ctx, "jobs", Settings::default()).await;
    let sent: Vec<String> = (0..48).map(|i| format!("job {i}")).collect();
    let stored = futures::future::join_all(sent.iter().map(|payload| {
        let q = ctx.queues.clone();
        async move { (payload, q.enqueue("jobs", &[job(payload)]).await) }
    }));
    let missing = futures::future::join_all((0..4).map(|i| {
        let q = ctx.queues.clone();
        async move { q.enqueue("nowhere", &[job(&format!("lost {i}"))]).await }
    }));
    let (stored, missing) = futures::join!(stored, missing);
    let mut ids = std::collections::HashSet::new();
    for (payload, result) in stored {
        let result = result.unwrap();
        assert_eq!(result.len(), 1, "one answer per message sent");
        assert!(!result[0].duplicate);
        let message = ctx.queues.message("jobs", result[0].id).await.unwrap();
        assert_eq!(
            String::from_utf8(message.payload).unwrap(),
            *payload,
            "the id answered is another caller's message"
        );
        assert!(ids.insert(result[0].id), "two callers got id {}", result[0].id);
    }
    for result in missing {
        assert!(
            matches!(result, Err(QueueError::QueueNotFound(ref q)) if q == "nowhere"),
            "{result:?}"
        );
    }
    assert_eq!(ctx.queues.queue("jobs").await.unwrap().counts.ready, 48);
    db
}

/// Workers leasing and acking together (one shared transaction on SQLite)
/// each get their own messages, never more than asked, never another's.
async fn concurrent_workers_share_out_the_work_without_overlap(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    queue(&ctx, "jobs", Settings::default()).await;
    let jobs: Vec<NewMessage> = (0..30).map(|i| job(&format!("job {i}"))).collect();
    ctx.queues.enqueue("jobs", &jobs[..]).await.unwrap();
    let leases = futures::future::join_all((0..8).map(|_| {
        let q = ctx.queues.clone();
        async move { q.lease("jobs", 5, None, Duration::ZERO).await.unwrap() }
    }))
    .await;
    let mut ids = std::collections::HashSet::new();
    for got in &leases {
        assert!(got.len() <= 5, "a worker asking for 5 got {}", got.len());
        for l in got {
            assert!(ids.insert(l.message.id), "message {} leased twice", l.message.id);
        }
    }
    assert_eq!(ids.len(), 30, "every ready message handed out once");
    let acks = futures::future::join_all(leases.iter().map(|got| {
        let q = ctx.queues.clone();
        let mine: Vec<(i64, i64)> = got.iter().map(|l| (l.message.id, l.token)).collect();
        async move { q.ack("jobs", &mine).await.unwrap() }
    }))
    .await;
    for (got, outcomes) in leases.iter().zip(&acks) {
        assert_eq!(outcomes.len(), got.len(), "one outcome per ack");
        assert!(outcomes.iter().all(|o| *o == AckOutcome::Acked), "{outcomes:?}");
    }
    // A worker's token does not ack another worker's delivery, and in a
    // mixed batch only the current deliveries are acked.
    ctx.queues
        .enqueue("jobs", &[job("late 1"), job("late 2")])
        .await
        .unwrap();
    let late = ctx.queues.lease("jobs", 2, None, Duration::ZERO).await.unwrap();
    assert_eq!(late.len(), 2);
    let foreign = leases.iter().flatten().next().unwrap().token;
    let mixed = [
        (late[0].message.id, foreign),
        (late[1].message.id, late[1].token),
        (999_999, 1),
    ];
    let outcomes = ctx.queues.ack("jobs", &mixed).await.unwrap();
    assert_eq!(outcomes, [AckOutcome::Stale, AckOutcome::Acked, AckOutcome::NotFound]);
    let counts = ctx.queues.queue("jobs").await.unwrap().counts;
    assert_eq!(
        (counts.ready, counts.leased),
        (0, 1),
        "the stale ack left its message leased"
    );
    db
}

/// Workers that ack and lease again at once (on SQLite their claims are
/// grouped into shared transactions, with two lease durations among them)
/// deliver every job exactly once. On a missing queue a claim fails and an
/// ack is answered "not found".
async fn workers_acking_and_leasing_together_finish_every_job_once(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    queue(&ctx, "jobs", Settings::default()).await;
    let jobs: Vec<NewMessage> = (0..200).map(|i| job(&format!("job {i}"))).collect();
    ctx.queues.enqueue("jobs", &jobs[..]).await.unwrap();
    let workers = (0..6).map(|w| {
        let q = ctx.queues.clone();
        async move {
            let lease_ms = (w % 2 == 0).then_some(120_000);
            let mut mine = Vec::new();
            loop {
                let got = q.lease("jobs", 7, lease_ms, Duration::ZERO).await.unwrap();
                if got.is_empty() {
                    return mine;
                }
                assert!(got.len() <= 7, "a worker asking for 7 got {}", got.len());
                let acks: Vec<(i64, i64)> = got.iter().map(|l| (l.message.id, l.token)).collect();
                let outcomes = q.ack("jobs", &acks).await.unwrap();
                assert_eq!(outcomes.len(), acks.len(), "one outcome per ack");
                assert!(outcomes.iter().all(|o| *o == AckOutcome::Acked), "{outcomes:?}");
                mine.extend(got.into_iter().map(|l| l.message.id));
            }
        }
    });
    let (q1, q2) = (ctx.queues.clone(), ctx.queues.clone());
    let missing = async move {
        tokio::join!(
            q1.lease("no-such-queue", 5, None, Duration::ZERO),
            q2.ack("no-such-queue", &[(1, 1)])
        )
    };
    let (done, (claim, ack)) = tokio::join!(futures::future::join_all(workers), missing);
    assert!(
        matches!(claim, Err(QueueError::QueueNotFound(_))),
        "a claim on a missing queue: {claim:?}"
    );
    assert_eq!(ack.unwrap(), [AckOutcome::NotFound]);
    let mut ids = std::collections::HashSet::new();
    for id in done.into_iter().flatten() {
        assert!(ids.insert(id), "message {id} delivered twice");
    }
    assert_eq!(ids.len(), 200, "every job delivered once");
    let counts = ctx.queues.queue("jobs").await.unwrap().counts;
    assert_eq!((counts.ready, counts.leased), (0, 0), "nothing left behind");
    db
}

async fn expired_lease_redelivers_and_the_old_token_is_refused(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    queue(&ctx, "jobs", Settings::default()).await;
    ctx.queues.enqueue("jobs", &[job("work")]).await.unwrap();
    let first = ctx
        .queues
        .lease("jobs", 1, Some(5_000), Duration::ZERO)
        .await
        .unwrap()
        .remove(0);
    assert!(
        payloads(&ctx, "jobs", 1).await.is_empty(),
        "leased work is not handed out twice"
    );
    advance(&ctx, Duration::from_secs(6)).await;
    let second = ctx
        .queues
        .lease("jobs", 1, None, Duration::ZERO)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(second.message.id, first.message.id);
    assert_eq!(second.message.attempts, 2);
    assert_ne!(second.token, first.token);
    let id = first.message.id;
    let late = ctx.queues.ack("jobs", &[(id, first.token)]).await.unwrap();
    assert_eq!(late, [AckOutcome::Stale]);
    let nack = ctx.queues.nack("jobs", id, first.token, &Nack::default()).await;
    assert!(matches!(nack, Err(QueueError::StaleLease(_))), "{nack:?}");
    let ext = ctx.queues.extend("jobs", id, first.token, None).await;
    assert!(matches!(ext, Err(QueueError::StaleLease(_))), "{ext:?}");
    assert_eq!(
        ctx.queues.ack("jobs", &[(id, second.token)]).await.unwrap(),
        [AckOutcome::Acked]
    );
    assert_eq!(
        ctx.queues.ack("jobs", &[(id, second.token)]).await.unwrap(),
        [AckOutcome::NotFound]
    );
    db
}

async fn backoff_follows_the_queue_settings_then_dead_letters(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    let settings = Settings {
        max_attempts: 3,
        backoff: plain_backoff(1_000),
        ..Settings::default()
    };
    queue(&ctx, "jobs", settings).await;
    ctx.queues.enqueue("jobs", &[job("flaky")]).await.unwrap();
    for wait_ms in [1_000u64, 2_000] {
        let l = ctx
            .queues
            .lease("jobs", 1, None, Duration::ZERO)
            .await
            .unwrap()
            .remove(0);
        let start = ctx.clock.now_ms();
        let outcome = ctx
            .queues
            .nack(
                "jobs",
                l.message.id,
                l.token,
                &Nack {
                    error: "timeout".into(),
                    ..Nack::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(outcome, NackOutcome::Retry(start + wait_ms as i64));
        advance(&ctx, Duration::from_millis(wait_ms - 1)).await;
        assert!(payloads(&ctx, "jobs", 1).await.is_empty(), "retried before its backoff");
        advance(&ctx, Duration::from_millis(1)).await;
    }
    let l = ctx
        .queues
        .lease("jobs", 1, None, Duration::ZERO)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(l.message.attempts, 3);
    assert_eq!(l.message.last_error, "timeout");
    let outcome = ctx
        .queues
        .nack("jobs", l.message.id, l.token, &Nack::default())
        .await
        .unwrap();
    assert_eq!(outcome, NackOutcome::Dead);
    assert_eq!(ctx.queues.queue("jobs").await.unwrap().counts.dead, 1);
    db
}

async fn dead_letters_are_redriven_by_retry_failed(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    queue(&ctx, "jobs", Settings::default()).await;
    ctx.queues.enqueue("jobs", &[job("a"), job("b")]).await.unwrap();
    for (l, error) in ctx
        .queues
        .lease("jobs", 2, None, Duration::ZERO)
        .await
        .unwrap()
        .into_iter()
        .zip(["smtp refused", "bad address"])
    {
        let nack = Nack {
            error: error.into(),
            dead_letter: true,
            ..Nack::default()
        };
        assert_eq!(
            ctx.queues.nack("jobs", l.message.id, l.token, &nack).await.unwrap(),
            NackOutcome::Dead
        );
    }
    let dead = ctx.queues.messages("jobs", State::Dead, 0, 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    let only_smtp = RetryFilter {
        error_contains: "smtp".into(),
        limit: 100,
        ..RetryFilter::default()
    };
    assert_eq!(ctx.queues.retry_failed("jobs", &only_smtp, "tester").await.unwrap(), 1);
    let l = ctx.queues.lease("jobs", 5, None, Duration::ZERO).await.unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].message.payload, b"a");
    assert_eq!(l[0].message.attempts, 1, "attempts start again");
    let all = RetryFilter {
        limit: 100,
        ..RetryFilter::default()
    };
    assert_eq!(ctx.queues.retry_failed("jobs", &all, "tester").await.unwrap(), 1);
    assert_eq!(ctx.queues.queue("jobs").await.unwrap().counts.dead, 0);
    db
}

async fn dead_letter_queue_receives_failures_and_gives_them_back(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    queue(&ctx, "jobs-dlq", Settings::default()).await;
    let settings = Settings {
        max_attempts: 1,
        dead_letter_queue: "jobs-dlq".into(),
        ..Settings::default()
    };
    queue(&ctx, "jobs", settings).await;
    ctx.queues.enqueue("jobs", &[job("poison")]).await.unwrap();
    let l = ctx
        .queues
        .lease("jobs", 1, None, Duration::ZERO)
        .await
        .unwrap()
        .remove(0);
    let nack = Nack {
        error: "cannot parse".into(),
        ..Nack::default()
    };
    assert_eq!(
        ctx.queues.nack("jobs", l.message.id, l.token, &nack).await.unwrap(),
        NackOutcome::Dead
    );
    let moved = ctx.queues.message("jobs-dlq", l.message.id).await.unwrap();
    assert_eq!((moved.state, moved.origin_queue.as_str()), (State::Ready, "jobs"));
    assert_eq!(moved.last_error, "cannot parse");
    let all = RetryFilter {
        limit: 100,
        ..RetryFilter::default()
    };
    assert_eq!(ctx.queues.retry_failed("jobs", &all, "tester").await.unwrap(), 1);
    assert_eq!(payloads(&ctx, "jobs", 1).await, ["poison"]);
    assert_eq!(ctx.queues.queue("jobs-dlq").await.unwrap().counts.ready, 0);
    db
}

async fn pause_and_drain_stop_handing_out_work(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    queue(&ctx, "jobs", Settings::default()).await;
    ctx.queues
        .enqueue("jobs", &[job("a"), job("b"), job("c")])
        .await
        .unwrap();
    ctx.queues.pause("jobs", "tester").await.unwrap();
    assert!(
        payloads(&ctx, "jobs", 1).await.is_empty(),
        "paused queue handed out work"
    );
    ctx.queues.enqueue("jobs", &[job("d")]).await.unwrap();
    ctx.queues.resume("jobs", "tester").await.unwrap();
    let held = ctx
        .queues
        .lease("jobs", 1, None, Duration::ZERO)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(ctx.queues.drain("jobs", Duration::ZERO, "tester").await.unwrap(), 1);
    assert!(
        payloads(&ctx, "jobs", 1).await.is_empty(),
        "draining queue handed out work"
    );
    let status = ctx.queues.status("jobs").await.unwrap();
    assert!(status.queue.drain_state != 0);
    assert_eq!(status.counts.ready, 3);
    // The worker finishes while a drain waits for it.
    let (drained, ()) = tokio::join!(ctx.queues.drain("jobs", Duration::from_secs(10), "tester"), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ctx.queues.ack("jobs", &[(held.message.id, held.token)]).await.unwrap();
    });
    assert_eq!(drained.unwrap(), 0);
    let subjects = outbox_subjects(&ctx.db).await;
    assert_eq!(
        subjects.iter().filter(|s| *s == "plinth.queue.queue_changed").count(),
        5,
        "created, paused, resumed, draining, drained: {subjects:?}"
    );
    ctx.queues.resume("jobs", "tester").await.unwrap();
    assert_eq!(payloads(&ctx, "jobs", 10).await.len(), 3);
    db
}

async fn rate_limit_caps_messages_per_second(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    let settings = Settings {
        rate_limit: 5.0,
        ..Settings::default()
    };
    queue(&ctx, "jobs", settings).await;
    let batch: Vec<NewMessage> = (0..20).map(|i| job(&i.to_string())).collect();
    ctx.queues.enqueue("jobs", &batch[..]).await.unwrap();
    assert_eq!(payloads(&ctx, "jobs", 100).await.len(), 5);
    assert!(payloads(&ctx, "jobs", 100).await.is_empty());
    ctx.clock.advance(Duration::from_millis(400));
    assert_eq!(payloads(&ctx, "jobs", 100).await.len(), 2);
    ctx.clock.advance(Duration::from_secs(10));
    assert_eq!(
        payloads(&ctx, "jobs", 100).await.len(),
        5,
        "bursts stay within one second's worth"
    );
    db
}

async fn concurrency_limit_caps_leases_in_flight(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    let settings = Settings {
        max_concurrency: 2,
        ..Settings::default()
    };
    queue(&ctx, "jobs", settings).await;
    let batch: Vec<NewMessage> = (0..10).map(|i| job(&i.to_string())).collect();
    ctx.queues.enqueue("jobs", &batch[..]).await.unwrap();
    let held = ctx.queues.lease("jobs", 10, None, Duration::ZERO).await.unwrap();
    assert_eq!(held.len(), 2);
    assert!(payloads(&ctx, "jobs", 10).await.is_empty());
    ctx.queues
        .ack("jobs", &[(held[0].message.id, held[0].token)])
        .await
        .unwrap();
    assert_eq!(
        ctx.queues.lease("jobs", 10, None, Duration::ZERO).await.unwrap().len(),
        1
    );
    db
}

async fn busy_group_does_not_starve_a_quiet_one(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    queue(&ctx, "jobs", Settings::default()).await;
    let busy: Vec<NewMessage> = (0..200)
        .map(|i| NewMessage {
            group_key: "tenant-busy".into(),
            ..job(&format!("busy {i}"))
        })
        .collect();
    ctx.queues.enqueue("jobs", &busy[..]).await.unwrap();
    let quiet: Vec<NewMessage> = (0..10)
        .map(|i| NewMessage {
            group_key: "tenant-quiet".into(),
            ..job(&format!("quiet {i}"))
        })
        .collect();
    ctx.queues.enqueue("jobs", &quiet[..]).await.unwrap();
    let first: Vec<String> = payloads(&ctx, "jobs", 20).await;
    let quiet_served = first.iter().filter(|p| p.starts_with("quiet")).count();
    assert!(
        quiet_served >= 9,
        "the quiet group waited behind the busy one: {first:?}"
    );
    // Within a group, order is kept.
    let quiet_order: Vec<&String> = first.iter().filter(|p| p.starts_with("quiet")).collect();
    assert_eq!(quiet_order[0], "quiet 0");
    db
}

fn grouped(group: &str, payload: &str) -> NewMessage {
    NewMessage {
        group_key: group.into(),
        ..job(payload)
    }
}

async fn fifo_groups_hand_out_one_message_per_group_in_order(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    let settings = Settings {
        fifo_groups: true,
        backoff: plain_backoff(1_000),
        ..Settings::default()
    };
    queue(&ctx, "orders", settings).await;
    let batch = [
        grouped("cart-a", "a1"),
        grouped("cart-b", "b1"),
        grouped("cart-a", "a2"),
        // Priority does not jump the group's order.
        NewMessage {
            priority: 9,
            ..grouped("cart-a", "a3")
        },
        grouped("cart-b", "b2"),
        job("loose 1"),
        job("loose 2"),
    ];
    ctx.queues.enqueue("orders", &batch[..]).await.unwrap();
    let lease = |max| ctx.queues.lease("orders", max, None, Duration::ZERO);
    let mut first: Vec<_> = lease(10).await.unwrap();
    first.sort_by_key(|l| l.message.id);
    let names = |ls: &[plinth_queue::model::Leased]| -> Vec<String> {
        ls.iter()
            .map(|l| String::from_utf8(l.message.payload.clone()).unwrap())
            .collect()
    };
    assert_eq!(
        names(&first),
        ["a1", "b1", "loose 1", "loose 2"],
        "one head per group, all of the ungrouped"
    );
    assert!(lease(10).await.unwrap().is_empty(), "a group's next waited for nothing");
    // Acking a group's head releases the next one, of that group only.
    ctx.queues
        .ack("orders", &[(first[0].message.id, first[0].token)])
        .await
        .unwrap();
    let next = lease(10).await.unwrap();
    assert_eq!(names(&next), ["a2"]);
    // A head waiting for its retry holds its group back.
    let outcome = ctx
        .queues
        .nack("orders", first[1].message.id, first[1].token, &Nack::default())
        .await
        .unwrap();
    assert!(matches!(outcome, NackOutcome::Retry(_)), "{outcome:?}");
    assert!(
        lease(10).await.unwrap().is_empty(),
        "b2 overtook b1 while b1 waited to be retried"
    );
    advance(&ctx, Duration::from_secs(2)).await;
    let retried = lease(10).await.unwrap();
    assert_eq!(names(&retried), ["b1"], "the retry comes first");
    // A dead-lettered head lets the group go on.
    let dead = Nack {
        dead_letter: true,
        ..Nack::default()
    };
    ctx.queues
        .nack("orders", retried[0].message.id, retried[0].token, &dead)
        .await
        .unwrap();
    ctx.queues
        .ack("orders", &[(next[0].message.id, next[0].token)])
        .await
        .unwrap();
    let mut rest = lease(10).await.unwrap();
    rest.sort_by_key(|l| l.message.id);
    assert_eq!(names(&rest), ["a3", "b2"]);
    // Turned off, a group's messages flow side by side again.
    assert!(ctx.queues.queue("orders").await.unwrap().queue.settings.fifo_groups);
    let more = [grouped("cart-c", "c1"), grouped("cart-c", "c2")];
    ctx.queues.enqueue("orders", &more[..]).await.unwrap();
    let off = plinth_queue::SettingsUpdate {
        settings: Settings::default(),
        fields: vec!["fifo_groups".into()],
        generation: 0,
    };
    let view = ctx.queues.update_queue("orders", off, "tester").await.unwrap();
    assert!(!view.queue.settings.fifo_groups);
    assert_eq!(payloads(&ctx, "orders", 10).await, ["c1", "c2"]);
    db
}

/// Workers claiming at the same moment (`SKIP LOCKED` on PostgreSQL) never
/// hold two messages of one group, and each group is worked in order.
async fn fifo_groups_hold_under_concurrent_workers(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    let settings = Settings {
        fifo_groups: true,
        ..Settings::default()
    };
    queue(&ctx, "orders", settings).await;
    let batch: Vec<NewMessage> = (0..60)
        .map(|i| grouped(&format!("cart-{}", i % 6), &format!("{}:{}", i % 6, i / 6)))
        .collect();
    ctx.queues.enqueue("orders", &batch[..]).await.unwrap();
    let mut done: std::collections::HashMap<String, Vec<u32>> = std::collections::HashMap::new();
    for _round in 0..30 {
        let claims = futures::future::join_all((0..8).map(|_| {
            let q = ctx.queues.clone();
            async move { q.lease("orders", 3, None, Duration::ZERO).await.unwrap() }
        }))
        .await;
        let held: Vec<_> = claims.into_iter().flatten().collect();
        let mut groups = std::collections::HashSet::new();
        for l in &held {
            assert!(
                groups.insert(l.message.group_key.clone()),
                "two of {} in flight at once",
                l.message.group_key
            );
            let text = String::from_utf8(l.message.payload.clone()).unwrap();
            let (group, n) = text.split_once(':').unwrap();
            done.entry(group.to_owned()).or_default().push(n.parse().unwrap());
        }
        let acks: Vec<(i64, i64)> = held.iter().map(|l| (l.message.id, l.token)).collect();
        if acks.is_empty() {
            break;
        }
        ctx.queues.ack("orders", &acks).await.unwrap();
    }
    assert_eq!(done.len(), 6);
    for (group, order) in &done {
        assert_eq!(*order, (0..10).collect::<Vec<u32>>(), "group {group} out of order");
    }
    db
}

async fn waiting_lease_wakes_when_work_arrives(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    queue(&ctx, "jobs", Settings::default()).await;
    let ((n, waited), ()) = tokio::join!(
        async {
            let started = Instant::now();
            let got = ctx
                .queues
                .lease("jobs", 1, None, Duration::from_secs(20))
                .await
                .unwrap();
            (got.len(), started.elapsed())
        },
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            ctx.queues.enqueue("jobs", &[job("now")]).await.unwrap();
        }
    );
    assert_eq!(n, 1);
    assert!(waited < Duration::from_secs(5), "woke only after {waited:?}");
    // And an empty wait ends at its deadline with nothing.
    let started = Instant::now();
    assert!(
        ctx.queues
            .lease("jobs", 1, None, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    db
}

async fn extended_lease_outlives_its_first_expiry(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    queue(&ctx, "jobs", Settings::default()).await;
    ctx.queues.enqueue("jobs", &[job("long")]).await.unwrap();
    let l = ctx
        .queues
        .lease("jobs", 1, Some(5_000), Duration::ZERO)
        .await
        .unwrap()
        .remove(0);
    ctx.clock.advance(Duration::from_secs(4));
    ctx.queues
        .extend("jobs", l.message.id, l.token, Some(60_000))
        .await
        .unwrap();
    advance(&ctx, Duration::from_secs(10)).await;
    assert!(
        payloads(&ctx, "jobs", 1).await.is_empty(),
        "an extended lease was redelivered"
    );
    assert_eq!(
        ctx.queues.ack("jobs", &[(l.message.id, l.token)]).await.unwrap(),
        [AckOutcome::Acked]
    );
    db
}

/// A claim reads back only the columns it did not set itself; what it
/// hands out must still be the whole stored message.
async fn a_leased_message_reads_as_stored(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    queue(&ctx, "jobs", Settings::default()).await;
    let sent = NewMessage {
        payload: b"full".to_vec(),
        content_type: "application/json".into(),
        headers: [("trace".to_owned(), "abc".to_owned())].into(),
        priority: 3,
        ttl_ms: Some(3_600_000),
        dedup_key: "order-7".into(),
        group_key: "tenant-a".into(),
        ..NewMessage::default()
    };
    let id = ctx.queues.enqueue("jobs", std::slice::from_ref(&sent)).await.unwrap()[0].id;
    let leased = ctx
        .queues
        .lease("jobs", 10, Some(30_000), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    let l = &leased[0];
    let stored = ctx.queues.message("jobs", id).await.unwrap();
    assert_eq!(l.message, stored, "the leased message differs from the stored one");
    assert_eq!(l.message.queue, "jobs");
    assert_eq!(l.message.state, State::Leased);
    assert_eq!(l.message.lease_token, Some(l.token));
    assert_eq!(l.message.next_at, l.expires_at, "a lease's next time is its expiry");
    assert_eq!(l.expires_at, ctx.clock.now_ms() + 30_000);
    assert_eq!(l.message.attempts, 1);
    assert_eq!(
        (&l.message.payload, &l.message.content_type, &l.message.headers),
        (&sent.payload, &sent.content_type, &sent.headers)
    );
    assert_eq!(
        (l.message.priority, &l.message.dedup_key, &l.message.group_key),
        (3, &sent.dedup_key, &sent.group_key)
    );
    assert_eq!(l.message.expires_at, Some(l.message.enqueued_at + 3_600_000));
    db
}

async fn restart_loses_nothing_in_any_state(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    let settings = Settings {
        max_attempts: 1,
        ..Settings::default()
    };
    queue(&ctx, "jobs", settings).await;
    let delayed = NewMessage {
        delay_ms: 60_000,
        ..job("scheduled")
    };
    ctx.queues
        .enqueue("jobs", &[job("leased"), job("dead"), job("ready"), delayed])
        .await
        .unwrap();
    let mut l = ctx.queues.lease("jobs", 2, Some(5_000), Duration::ZERO).await.unwrap();
    let dead = l.remove(1);
    ctx.queues
        .nack("jobs", dead.message.id, dead.token, &Nack::default())
        .await
        .unwrap();
    let before = ctx.queues.queue("jobs").await.unwrap().counts;
    drop(ctx.queues);

    let again = db.connect_again().await.unwrap();
    let restarted = service(&again, &ctx.clock);
    let after = restarted.queue("jobs").await.unwrap().counts;
    assert_eq!(before, after);
    assert_eq!((after.scheduled, after.ready, after.leased, after.dead), (1, 1, 1, 1));
    ctx.clock.advance(Duration::from_secs(61));
    restarted.tick().await.unwrap();
    let counts = restarted.queue("jobs").await.unwrap().counts;
    // The expired lease had its one attempt: dead; the scheduled one is ready.
    assert_eq!((counts.ready, counts.leased, counts.dead), (2, 0, 2));
    again.close().await;
    db
}

async fn batch_enqueue_is_ordered_and_purge_counts(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    queue(&ctx, "jobs", Settings::default()).await;
    let batch: Vec<NewMessage> = (0..750).map(|i| job(&format!("{i:04}"))).collect();
    let results = ctx.queues.enqueue("jobs", &batch[..]).await.unwrap();
    assert!(
        results.windows(2).all(|w| w[0].id < w[1].id),
        "ids follow request order"
    );
    let got = payloads(&ctx, "jobs", 1000).await;
    let expected: Vec<String> = (0..750).map(|i| format!("{i:04}")).collect();
    assert_eq!(got, expected);
    assert_eq!(ctx.queues.purge("jobs", &State::ALL, "tester").await.unwrap(), 750);
    let missing = ctx.queues.enqueue("nope", &[job("x")]).await;
    assert!(matches!(missing, Err(QueueError::QueueNotFound(_))));
    db
}

async fn schedules_tick_exactly_once_across_two_replicas(ctx: Ctx, db: TestDatabase) -> TestDatabase {
    queue(&ctx, "jobs", Settings::default()).await;
    let again = db.connect_again().await.unwrap();
    let replica = service(&again, &ctx.clock);
    let every_minute = Schedule {
        queue: "jobs".into(),
        name: "report".into(),
        cron: "* * * * *".into(),
        time_zone: "Europe/Berlin".into(),
        template: job("tick"),
        paused: false,
        next_run_at: 0,
        last_run_at: None,
        created_at: 0,
    };
    let created = ctx.queues.create_schedule(every_minute).await.unwrap();
    assert!(created.next_run_at > ctx.clock.now_ms());
    assert_eq!(created.next_run_at % 60_000, 0, "ticks fall on the minute");
    let ready = |q: Queues| async move { q.queue("jobs").await.unwrap().counts.ready };
    for minute in 1..=5 {
        ctx.clock.advance(Duration::from_secs(60));
        let (a, b) = tokio::join!(ctx.queues.tick(), replica.tick());
        a.unwrap();
        b.unwrap();
        assert_eq!(ready(ctx.queues.clone()).await, minute, "minute {minute}");
    }
    // Ten missed minutes are caught up with one enqueue.
    ctx.clock.advance(Duration::from_secs(600));
    let (a, b) = tokio::join!(ctx.queues.tick(), replica.tick());
    a.unwrap();
    b.unwrap();
    assert_eq!(ready(ctx.queues.clone()).await, 6);
    // A paused schedule does not tick; resumed, it continues from now.
    ctx.queues.pause_schedule("jobs", "report").await.unwrap();
    advance(&ctx, Duration::from_secs(180)).await;
    assert_eq!(ready(ctx.queues.clone()).await, 6);
    let resumed = ctx.queues.resume_schedule("jobs", "report").await.unwrap();
    assert!(resumed.next_run_at > ctx.clock.now_ms());
    advance(&ctx, Duration::from_secs(60)).await;
    assert_eq!(ready(ctx.queues.clone()).await, 7);
    let listed = replica.schedules("jobs").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].last_run_at.is_some());
    let bad = Schedule {
        cron: "every day".into(),
        ..listed[0].clone()
    };
    assert!(matches!(
        ctx.queues.create_schedule(bad).await,
        Err(QueueError::Invalid(_))
    ));
    ctx.queues.delete_schedule("jobs", "report").await.unwrap();
    assert!(matches!(
        ctx.queues.delete_schedule("jobs", "report").await,
        Err(QueueError::ScheduleNotFound(_))
    ));
    again.close().await;
    db
}

/// PostgreSQL plans claims and acks from the table's statistics; taken while
/// a queue was empty, they make each claim sort the whole queue. A bulk load
/// is followed, at the next sweep, by fresh statistics.
#[tokio::test]
async fn bulk_load_refreshes_the_planner_statistics_on_postgres() {
    on_postgres("bulk_load_statistics", |ctx, db| async move {
        let Db::Postgres(pool) = ctx.db.clone() else {
            return db;
        };
        let planned_rows = || async {
            sqlx::query_scalar::<_, f32>("SELECT reltuples FROM pg_class WHERE oid = 'messages'::regclass")
                .fetch_one(&pool)
                .await
                .unwrap()
        };
        queue(&ctx, "bulk", Settings::default()).await;
        let batch: Vec<NewMessage> = (0..1000).map(|i| job(&format!("{i}"))).collect();
        for _ in 0..6 {
            ctx.queues.enqueue("bulk", &batch[..]).await.unwrap();
        }
        assert!(planned_rows().await < 6000.0, "no statistics before the sweep");
        ctx.queues.tick().await.unwrap();
        assert_eq!(planned_rows().await, 6000.0, "the sweep analyzed the grown table");
        // Below the threshold nothing is re-analyzed: the count stays.
        ctx.queues.enqueue("bulk", &batch[..]).await.unwrap();
        ctx.queues.tick().await.unwrap();
        assert_eq!(planned_rows().await, 6000.0);
        db
    })
    .await;
}

/// On PostgreSQL an enqueue on one replica wakes a lease waiting on another
/// at once (`NOTIFY` after the commit), not at that replica's next poll.
#[tokio::test]
async fn enqueue_on_one_replica_wakes_a_lease_waiting_on_another_on_postgres() {
    on_postgres("cross_replica_wake", |ctx, db| async move {
        queue(&ctx, "jobs", Settings::default()).await;
        let again = db.connect_again().await.unwrap();
        // Polls once a minute: only the announcement can wake it in time.
        let other = Queues::with_clock(
            Store::new(again.clone()),
            QueueSettings {
                poll_ms: 60_000,
                ..QueueSettings::default()
            },
            None,
            Arc::new(ctx.clock.clone()),
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let waiter = async {
            let started = Instant::now();
            let got = other.lease("jobs", 1, None, Duration::from_secs(20)).await.unwrap();
            stop.cancel();
            (got.len(), started.elapsed())
        };
        let producer = async {
            // Time for the listener to subscribe.
            tokio::time::sleep(Duration::from_millis(500)).await;
            ctx.queues.enqueue("jobs", &[job("elsewhere")]).await.unwrap();
        };
        let ((n, waited), (), listened, announced) = tokio::join!(
            waiter,
            producer,
            other.clone().listen(stop.clone()),
            ctx.queues.clone().announce(stop.clone())
        );
        listened.unwrap();
        announced.unwrap();
        assert_eq!(n, 1);
        assert!(waited < Duration::from_secs(3), "woke only after {waited:?}");
        again.close().await;
        db
    })
    .await;
}
