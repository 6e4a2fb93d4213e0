//! The queue service as its users meet it, on SQLite and PostgreSQL: bad
//! input named field by field with nothing stored, the admin HTTP paths,
//! permissions, and a worker process killed mid-job that loses nothing.

#![expect(
    clippy::unwrap_used,
    reason = "the scenarios run inside the SQLite and PostgreSQL tests; an unexpected answer fails the test"
)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use plinth::queue::v1::queue_service_client::QueueServiceClient;
use plinth::queue::v1::{self as pb};
use plinth_runtime::config::Config;
use plinth_tests::queue::{QueueSession, fresh_queue, millis, payload_of};
use plinth_tests::{TestApp, access_token, register_user, violated_field, with_admin, with_bearer};
use tonic::Code;

plinth_tests::on_both_backends!(
    bad_input_names_the_field_and_stores_nothing,
    a_killed_worker_loses_nothing
);

fn message(payload: &str) -> pb::NewMessage {
    pb::NewMessage {
        payload: payload.as_bytes().to_vec().into(),
        ..pb::NewMessage::default()
    }
}

async fn bad_input_names_the_field_and_stores_nothing(config: Config) -> anyhow::Result<()> {
    let app = TestApp::spawn(with_admin(config)).await?;
    let mut s = QueueSession::admin(&app, pb::QueueSettings::default()).await?;
    let q = s.queue.clone();

    let huge = pb::NewMessage {
        payload: vec![0u8; 1024 * 1024 + 1].into(),
        ..pb::NewMessage::default()
    };
    let both = pb::NewMessage {
        delay: Some(millis(1000)),
        run_time: Some(prost_types::Timestamp { seconds: 1, nanos: 0 }),
        ..message("x")
    };
    let cases: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "queue",
            s.client
                .enqueue(s.req(pb::EnqueueRequest {
                    queue: "Not A Name".into(),
                    message: Some(message("x")),
                }))
                .await
                .map(drop),
        ),
        (
            "messages[1].priority",
            s.client
                .enqueue_batch(s.req(pb::EnqueueBatchRequest {
                    queue: q.clone(),
                    messages: vec![
                        message("fine"),
                        pb::NewMessage {
                            priority: 5000,
                            ..message("bad")
                        },
                    ],
                }))
                .await
                .map(drop),
        ),
        (
            "message.payload",
            s.client
                .enqueue(s.req(pb::EnqueueRequest {
                    queue: q.clone(),
                    message: Some(huge),
                }))
                .await
                .map(drop),
        ),
        (
            "message.delay",
            s.client
                .enqueue(s.req(pb::EnqueueRequest {
                    queue: q.clone(),
                    message: Some(both),
                }))
                .await
                .map(drop),
        ),
        (
            "max_messages",
            s.client
                .lease(s.req(pb::LeaseRequest {
                    queue: q.clone(),
                    max_messages: 5000,
                    ..pb::LeaseRequest::default()
                }))
                .await
                .map(drop),
        ),
        (
            "lease_duration",
            s.client
                .lease(s.req(pb::LeaseRequest {
                    queue: q.clone(),
                    lease_duration: Some(millis(10)),
                    ..pb::LeaseRequest::default()
                }))
                .await
                .map(drop),
        ),
        (
            "acks[0].lease_token",
            s.client
                .ack(s.req(pb::AckRequest {
                    queue: q.clone(),
                    acks: vec![pb::AckEntry {
                        message_id: 1,
                        lease_token: "not-a-token".into(),
                    }],
                }))
                .await
                .map(drop),
        ),
        (
            "queue.settings.dead_letter_queue",
            s.client
                .create_queue(s.req(pb::CreateQueueRequest {
                    queue: Some(pb::Queue {
                        name: "self-dlq".into(),
                        settings: Some(pb::QueueSettings {
                            dead_letter_queue: "self-dlq".into(),
                            ..pb::QueueSettings::default()
                        }),
                        ..pb::Queue::default()
                    }),
                }))
                .await
                .map(drop),
        ),
        (
            "queue.settings.max_attempts",
            s.client
                .create_queue(s.req(pb::CreateQueueRequest {
                    queue: Some(pb::Queue {
                        name: "too-many".into(),
                        settings: Some(pb::QueueSettings {
                            max_attempts: 5000,
                            ..pb::QueueSettings::default()
                        }),
                        ..pb::Queue::default()
                    }),
                }))
                .await
                .map(drop),
        ),
        (
            "page_token",
            s.client
                .list_messages(s.req(pb::ListMessagesRequest {
                    queue: q.clone(),
                    page_token: "%%%".into(),
                    ..pb::ListMessagesRequest::default()
                }))
                .await
                .map(drop),
        ),
    ];
    for (field, result) in cases {
        let Err(status) = result else {
            anyhow::bail!("{field}: a bad request was accepted");
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert_eq!(violated_field(&status), field, "{status:?}");
    }
    let counts = s.counts().await?;
    assert_eq!(counts, pb::QueueCounts::default(), "a refused batch stored something");

    // Unknown queues and messages are NOT_FOUND; a stale token FAILED_PRECONDITION.
    let missing = s
        .client
        .get_queue(s.req(pb::GetQueueRequest {
            queue: fresh_queue("nope"),
        }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    s.enqueue(&["work"]).await?;
    let first = s.lease(1, Duration::from_secs(1), Duration::ZERO).await?;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let second = s.lease(1, Duration::from_secs(30), Duration::from_secs(5)).await?;
    assert_eq!(second.len(), 1, "the expired lease came back");
    let stale = s
        .client
        .nack(s.req(pb::NackRequest {
            queue: q.clone(),
            message_id: first[0].message.as_ref().unwrap().id,
            lease_token: first[0].lease_token.clone(),
            ..pb::NackRequest::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert_eq!(s.ack(&first).await?, [pb::AckOutcome::Stale]);
    assert_eq!(s.ack(&second).await?, [pb::AckOutcome::Acked]);
    app.stop().await;
    Ok(())
}

async fn a_killed_worker_loses_nothing(config: Config) -> anyhow::Result<()> {
    let app = TestApp::spawn(with_admin(config)).await?;
    let mut s = QueueSession::admin(&app, pb::QueueSettings::default()).await?;
    let jobs: Vec<String> = (0..20).map(|i| format!("job-{i}")).collect();
    let refs: Vec<&str> = jobs.iter().map(String::as_str).collect();
    s.enqueue(&refs).await?;

    let mut worker = Command::new(env!("CARGO_BIN_EXE_queue-worker"))
        .args([
            format!("http://{}", app.grpc),
            s.token.clone(),
            s.queue.clone(),
            "5".into(),
            "2000".into(),
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    // The app serves on this test's runtime: read the report off it.
    let stdout = worker.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await??;
    let taken: Vec<i64> = line
        .trim()
        .strip_prefix("leased ")
        .unwrap()
        .split(',')
        .map(|id| id.parse().unwrap())
        .collect();
    assert_eq!(taken.len(), 5);
    worker.kill()?; // SIGKILL: no goodbye, no nack.
    worker.wait()?;

    let mut done: HashMap<String, i32> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.len() < jobs.len() && Instant::now() < deadline {
        let leased = s.lease(10, Duration::from_secs(30), Duration::from_secs(2)).await?;
        if leased.is_empty() {
            continue;
        }
        for l in &leased {
            let m = l.message.as_ref().unwrap();
            let expected_attempts = if taken.contains(&m.id) { 2 } else { 1 };
            assert_eq!(m.attempts, expected_attempts, "{}", payload_of(l));
        }
        for (l, outcome) in leased.iter().zip(s.ack(&leased).await?) {
            assert_eq!(outcome, pb::AckOutcome::Acked);
            *done.entry(payload_of(l)).or_default() += 1;
        }
    }
    assert_eq!(
        done.len(),
        jobs.len(),
        "lost: {:?}",
        jobs.iter().filter(|j| !done.contains_key(*j)).collect::<Vec<_>>()
    );
    assert!(done.values().all(|n| *n == 1), "completed twice: {done:?}");
    assert_eq!(s.counts().await?, pb::QueueCounts::default());
    app.stop().await;
    Ok(())
}

#[tokio::test]
async fn admin_paths_answer_over_http() -> anyhow::Result<()> {
    let app = TestApp::spawn(with_admin(TestApp::config())).await?;
    let settings = pb::QueueSettings {
        max_attempts: 1,
        ..pb::QueueSettings::default()
    };
    let mut s = QueueSession::admin(&app, settings).await?;
    let http = reqwest::Client::new();
    let base = format!("http://{}", app.http);
    let auth = format!("Bearer {}", s.token);
    let q = s.queue.clone();

    let enqueued: serde_json::Value = http
        .post(format!("{base}/v1/queues/{q}/messages"))
        .header("authorization", &auth)
        .json(&serde_json::json!({"payload": "aGVsbG8=", "contentType": "text/plain"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(enqueued["result"]["state"], "MESSAGE_STATE_READY");

    let all: serde_json::Value = http
        .get(format!("{base}/queues"))
        .header("authorization", &auth)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let listed = all["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == q.as_str())
        .unwrap();
    assert_eq!(listed["counts"]["ready"], "1");

    let leased = s.lease(1, Duration::from_secs(30), Duration::ZERO).await?;
    let id = leased[0].message.as_ref().unwrap().id;
    let nacked: serde_json::Value = http
        .post(format!("{base}/v1/queues/{q}/messages/{id}:nack"))
        .header("authorization", &auth)
        .json(&serde_json::json!({"leaseToken": leased[0].lease_token, "error": "smtp 550"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(nacked["state"], "MESSAGE_STATE_DEAD");

    let status: serde_json::Value = http
        .get(format!("{base}/queues/{q}/status"))
        .header("authorization", &auth)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(status["counts"]["dead"], "1");
    assert!(status["failRate"].as_f64().unwrap() > 0.0);

    let retried: serde_json::Value = http
        .post(format!("{base}/queues/{q}/retry-failed"))
        .header("authorization", &auth)
        .json(&serde_json::json!({"errorContains": "smtp"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(retried["retried"], "1");

    let held = s.lease(1, Duration::from_secs(30), Duration::ZERO).await?;
    let drain: serde_json::Value = http
        .post(format!("{base}/queues/{q}/drain"))
        .header("authorization", &auth)
        .json(&serde_json::json!({}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(
        (drain["inFlight"].as_str(), drain["drained"].as_bool()),
        (Some("1"), Some(false))
    );
    s.ack(&held).await?;
    let drain: serde_json::Value = http
        .post(format!("{base}/queues/{q}/drain"))
        .header("authorization", &auth)
        .json(&serde_json::json!({"wait": "5s"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(drain["drained"], true);

    let bad = http
        .post(format!("{base}/v1/queues/{q}/messages:lease"))
        .header("authorization", &auth)
        .json(&serde_json::json!({"maxMessages": 5000}))
        .send()
        .await?;
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = bad.json().await?;
    assert!(body.to_string().contains("max_messages"), "{body}");
    let missing = http
        .get(format!("{base}/queues/{}/status", fresh_queue("nope")))
        .header("authorization", &auth)
        .send()
        .await?;
    assert_eq!(missing.status(), 404);
    app.stop().await;
    Ok(())
}

#[tokio::test]
async fn callers_without_queue_permissions_are_refused() -> anyhow::Result<()> {
    let app = TestApp::spawn(with_admin(TestApp::config())).await?;
    let s = QueueSession::admin(&app, pb::QueueSettings::default()).await?;
    let mut auth = app.auth().await?;
    let email = register_user(&mut auth, "no-queue").await?;
    let token = access_token(&mut auth, &email, plinth_tests::PASSWORD).await?;
    let mut client = QueueServiceClient::new(app.channel().await?);
    let denied = client
        .enqueue(with_bearer(
            pb::EnqueueRequest {
                queue: s.queue.clone(),
                message: Some(message("x")),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    // A viewer may read queue settings, not drain them.
    let read = reqwest::Client::new()
        .get(format!("http://{}/queues", app.http))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await?;
    assert_eq!(read.status(), 200);
    let over_http = reqwest::Client::new()
        .post(format!("http://{}/queues/{}/drain", app.http, s.queue))
        .header("authorization", format!("Bearer {token}"))
        .json(&serde_json::json!({}))
        .send()
        .await?;
    assert_eq!(over_http.status(), 403);
    let anonymous = reqwest::Client::new()
        .get(format!("http://{}/queues", app.http))
        .send()
        .await?;
    assert_eq!(anonymous.status(), 401);
    app.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_stream_pushes_within_its_credits_and_a_dropped_stream_gives_its_leases_back() -> anyhow::Result<()> {
    let app = TestApp::spawn(with_admin(TestApp::config())).await?;
    let settings = pb::QueueSettings {
        lease_duration: Some(millis(300_000)),
        ..pb::QueueSettings::default()
    };
    let mut s = QueueSession::admin(&app, settings).await?;
    let jobs: Vec<String> = (0..10).map(|i| format!("job-{i}")).collect();
    let refs: Vec<&str> = jobs.iter().map(String::as_str).collect();
    s.enqueue(&refs).await?;

    let (credits, requests) = tokio::sync::mpsc::channel::<pb::SubscribeRequest>(4);
    credits
        .send(pb::SubscribeRequest {
            queue: s.queue.clone(),
            lease_duration: None,
            credits: 4,
        })
        .await?;
    let mut stream = s
        .client
        .subscribe(s.req(tokio_stream::wrappers::ReceiverStream::new(requests)))
        .await?
        .into_inner();
    let mut got: Vec<pb::LeasedMessage> = Vec::new();
    while got.len() < 4 {
        got.extend(stream.message().await?.unwrap().messages);
    }
    assert_eq!(got.len(), 4, "pushed more than the credits");
    let nothing_more = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
    assert!(nothing_more.is_err(), "pushed without credits: {nothing_more:?}");
    credits
        .send(pb::SubscribeRequest {
            credits: 3,
            ..pb::SubscribeRequest::default()
        })
        .await?;
    while got.len() < 7 {
        got.extend(stream.message().await?.unwrap().messages);
    }
    // Work off two, then the worker goes away holding five.
    assert_eq!(s.ack(&got[..2]).await?, [pb::AckOutcome::Acked, pb::AckOutcome::Acked]);
    drop(stream);
    drop(credits);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut counts = s.counts().await?;
    while counts.ready < 8 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        counts = s.counts().await?;
    }
    assert_eq!(
        (counts.ready, counts.leased),
        (8, 0),
        "the dropped stream's leases were not released"
    );
    let again = s.lease(10, Duration::from_secs(30), Duration::ZERO).await?;
    let redelivered = again
        .iter()
        .filter(|l| l.message.as_ref().unwrap().attempts == 2)
        .count();
    assert_eq!(redelivered, 5);
    app.stop().await;
    Ok(())
}
