//! The audit log's contract, one suite run on SQLite (the embedded default)
//! and PostgreSQL: proofs for many tree sizes checked by the verifier in
//! `plinth_tests::rfc9162` (written from RFC 9162 with `ring`, not the
//! service's hashing or signing code), checkpoints checked as C2SP signed notes, idempotent appends,
//! tamper detection, filters and paging, two replicas integrating one log,
//! and the bus consumer recording each event once.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "the scenarios run inside the SQLite and PostgreSQL tests; an unexpected answer fails the test"
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use plinth_audit::model::{ActorKind, Event, Filter, Outcome, RetentionPolicy};
use plinth_audit::{Audit, AuditError, Store};
use plinth_runtime::config::AuditSettings;
use plinth_runtime::events::{EventBus, InProcessBus};
use plinth_runtime::on_db;
use plinth_runtime::testing::{Backend, TestDatabase, backend_url};
use plinth_tests::rfc9162::{H, checkpoint_verifies, leaf, mth, note_parts, sha, verify_consistency, verify_inclusion};
use tokio_util::sync::CancellationToken;

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                let db = plinth_runtime::testing::TestDatabase::sqlite("audit", &plinth_audit::MIGRATIONS).await.unwrap();
                super::$name(&db).await;
                db.cleanup().await.unwrap();
            }
            #[tokio::test]
            async fn postgres() {
                if let Some(url) = super::backend_url(super::Backend::Postgres, stringify!($name)).unwrap() {
                    let db = plinth_runtime::testing::TestDatabase::postgres(&url, "audit", &plinth_audit::MIGRATIONS).await.unwrap();
                    super::$name(&db).await;
                    db.cleanup().await.unwrap();
                }
            }
        }
    )*};
}

on_both_backends!(
    proofs_verify_independently_at_every_size,
    checkpoints_are_signed_notes_any_verifier_accepts,
    appends_are_idempotent_on_event_id,
    verify_log_finds_tampered_rows,
    listing_filters_and_pages_without_gaps,
    two_replicas_integrate_one_log,
    bus_events_are_recorded_once,
    retention_and_erasure_keep_every_proof_valid,
);

fn settings(batch: usize) -> AuditSettings {
    AuditSettings {
        origin: "test.plinth/audit".into(),
        integrate_batch: batch,
        integrate_ms: 20,
        ..AuditSettings::default()
    }
}

async fn open(db: &TestDatabase, batch: usize) -> Audit {
    Audit::open(Store::new(db.db.clone()), settings(batch)).await.unwrap()
}

fn event(n: u64) -> Event {
    Event {
        id: format!("event-{n}"),
        time_ms: 1_700_000_000_000 + i64::try_from(n).unwrap() * 1000,
        tenant: if n.is_multiple_of(2) { "acme" } else { "globex" }.into(),
        actor_id: format!("user-{}", n % 3),
        actor_kind: ActorKind::User,
        actor_ip: "10.0.0.1".into(),
        actor_user_agent: "test".into(),
        action: if n.is_multiple_of(4) {
            "auth.login.failed"
        } else {
            "config.values.changed"
        }
        .into(),
        resource_type: "config.environment".into(),
        resource_name: format!("shop/env-{}", n % 5),
        outcome: if n.is_multiple_of(4) {
            Outcome::Failure
        } else {
            Outcome::Success
        },
        reason: String::new(),
        correlation_id: format!("corr-{}", n / 10),
        trace_id: String::new(),
        source: "test".into(),
        metadata: serde_json::json!({"n": n}).as_object().cloned().unwrap(),
    }
}

/// The leaf hashes of `[0, n)`, from each entry's `leaf_data` as served.
async fn leaves_from_data(audit: &Audit, n: u64) -> Vec<H> {
    let mut out = Vec::new();
    for i in 0..n {
        let (entry, _) = audit.entry(i).await.unwrap();
        out.push(leaf(entry.data.as_deref().unwrap()));
    }
    out
}

async fn proofs_verify_independently_at_every_size(db: &TestDatabase) {
    let audit = open(db, 10_000).await;
    // Grow the tree in uneven rounds so nodes complete across rounds.
    let rounds = [1u64, 1, 1, 4, 1, 1, 3, 16, 5, 30, 37, 900];
    let mut n = 0;
    let mut sizes = Vec::new();
    for r in rounds {
        let batch: Vec<Event> = (n..n + r).map(event).collect();
        audit.append(batch).await.unwrap();
        n += r;
        let c = audit.integrate_all().await.unwrap().unwrap();
        assert_eq!(c.tree_size, n);
        sizes.push(n);
    }
    assert_eq!(n, 1000);
    let leaves = leaves_from_data(&audit, n).await;
    let check_sizes: Vec<u64> = vec![
        1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 511, 999, 1000,
    ];
    for &size in &check_sizes {
        let root = mth(&leaves[..usize::try_from(size).unwrap()]);
        let indexes: Vec<u64> = if size <= 33 {
            (0..size).collect()
        } else {
            vec![0, 1, size / 3, size / 2, size - 2, size - 1]
        };
        for index in indexes {
            let p = audit.inclusion_proof(Some(index), None, size).await.unwrap();
            assert_eq!(p.root, root, "root of size {size}");
            assert_eq!(p.leaf_hash, leaves[usize::try_from(index).unwrap()]);
            assert!(
                verify_inclusion(index, size, &p.leaf_hash, &p.hashes, &root),
                "inclusion of {index} in {size}"
            );
            // A proof for another leaf must not verify.
            let other = leaves[usize::try_from((index + 1) % size).unwrap()];
            if size > 1 {
                assert!(!verify_inclusion(index, size, &other, &p.hashes, &root));
            }
        }
    }
    // Consistency between sizes the log really had and pseudo-random pairs.
    let mut pairs: Vec<(u64, u64)> = sizes.windows(2).map(|w| (w[0], w[1])).collect();
    let mut x: u64 = 12345;
    for _ in 0..60 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let a = 1 + (x >> 33) % 1000;
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let b = 1 + (x >> 33) % 1000;
        pairs.push((a.min(b), a.max(b)));
    }
    pairs.extend([(1, 1), (1, 2), (2, 3), (4, 8), (7, 8), (8, 9), (512, 1000)]);
    for (a, b) in pairs {
        let p = audit.consistency_proof(a, b).await.unwrap();
        let (ra, rb) = (
            mth(&leaves[..usize::try_from(a).unwrap()]),
            mth(&leaves[..usize::try_from(b).unwrap()]),
        );
        assert_eq!((p.first_root, p.second_root), (ra, rb), "roots of {a} and {b}");
        assert!(verify_consistency(a, b, &ra, &rb, &p.hashes), "consistency {a} → {b}");
        if a < b {
            let wrong = mth(&leaves[1..usize::try_from(a).unwrap().max(2)]);
            assert!(!verify_consistency(a, b, &wrong, &rb, &p.hashes), "forged {a} → {b}");
        }
    }
    // The latest checkpoint is the default tree, and proofs beyond it are refused.
    let p = audit.inclusion_proof(Some(0), None, 0).await.unwrap();
    assert_eq!(p.tree_size, 1000);
    let beyond = audit.inclusion_proof(Some(0), None, 1001).await.unwrap_err();
    assert!(matches!(beyond, AuditError::NotYetIntegrated(_)), "{beyond}");
    audit.append(vec![event(5000)]).await.unwrap();
    let pending = audit.inclusion_proof(None, Some("event-5000"), 0).await.unwrap_err();
    assert!(matches!(pending, AuditError::NotYetIntegrated(_)), "{pending}");
}

async fn checkpoints_are_signed_notes_any_verifier_accepts(db: &TestDatabase) {
    let audit = open(db, 10_000).await;
    let empty = audit.checkpoint().await.unwrap();
    assert_eq!(empty.tree_size, 0);
    assert_eq!(empty.root.to_vec(), sha(&[]).to_vec());
    audit.append((0..5).map(event).collect()).await.unwrap();
    let c = audit.integrate_all().await.unwrap().unwrap();
    assert_eq!(audit.checkpoint().await.unwrap(), c);

    // The verifier key names the key and carries it: name+id+base64(0x01||key).
    let vkey = audit.signer().verifier_key();
    let mut parts = vkey.splitn(3, '+');
    let (name, id_hex, material) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
    assert_eq!(name, "test.plinth/audit");
    let material = STANDARD.decode(material).unwrap();
    assert_eq!(material[0], 0x01);
    let public = &material[1..];
    assert_eq!(public, audit.signer().public_key().as_slice());
    let key_id = |kind: u8| sha(&[name.as_bytes(), b"\n", &[kind], public])[..4].to_vec();
    let id: String = key_id(0x01).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(id_hex, id);

    let (text, sigs) = note_parts(&c.note).unwrap();
    let leaves = leaves_from_data(&audit, 5).await;
    assert_eq!(
        text,
        format!("test.plinth/audit\n5\n{}\n", STANDARD.encode(mth(&leaves)))
    );
    assert!(checkpoint_verifies(&c.note, &vkey, name, 5, &mth(&leaves)));
    assert!(!checkpoint_verifies(&c.note, &vkey, name, 6, &mth(&leaves)));
    let verifier = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public);
    // The plain Ed25519 note signature over the text.
    let (n0, s0) = &sigs[0];
    assert_eq!(n0, name);
    assert_eq!(s0[..4], key_id(0x01)[..]);
    verifier.verify(text.as_bytes(), &s0[4..]).expect("note signature");
    assert!(
        verifier
            .verify(text.replace("\n5\n", "\n6\n").as_bytes(), &s0[4..])
            .is_err()
    );
    // The timestamped cosignature/v1 line binds the signing time.
    let (_, s1) = &sigs[1];
    assert_eq!(s1[..4], key_id(0x04)[..]);
    let time = u64::from_be_bytes(s1[4..12].try_into().unwrap());
    assert_eq!(time, c.time_secs);
    let now = u64::try_from(plinth_runtime::auth::unix_now_ms() / 1000).unwrap();
    assert!(time <= now && now - time < 60, "time {time} vs now {now}");
    let signed = format!("cosignature/v1\ntime {time}\n{text}");
    verifier.verify(signed.as_bytes(), &s1[12..]).expect("cosignature");

    // Every signed checkpoint is published for witnesses, the latest as
    // `GetCheckpoint` answers it.
    let published: Vec<Vec<u8>> = on_db!(&db.db, |pool| {
        sqlx::query_scalar(
            "SELECT payload FROM plinth_outbox WHERE subject = 'plinth.audit.checkpoint_signed' ORDER BY seq",
        )
        .fetch_all(pool)
        .await
        .unwrap()
    });
    assert!(!published.is_empty(), "no checkpoint was published");
    let last =
        <plinth::audit::v1::CheckpointSignedEvent as prost::Message>::decode(published[published.len() - 1].as_slice())
            .unwrap()
            .checkpoint
            .unwrap();
    assert_eq!((last.tree_size, last.note.as_str()), (5, c.note.as_str()));
    assert_eq!(last.origin, "test.plinth/audit");
    assert_eq!(last.root_hash.as_ref(), c.root.as_slice());

    // A restart keeps the generated key (the same public key signs on).
    let again = open(db, 10_000).await;
    assert_eq!(again.signer().public_key(), audit.signer().public_key());
}

async fn appends_are_idempotent_on_event_id(db: &TestDatabase) {
    let audit = open(db, 10_000).await;
    let first = audit.append(vec![event(1), event(2)]).await.unwrap();
    assert_eq!(
        first.iter().map(|a| (a.index, a.duplicate)).collect::<Vec<_>>(),
        [(0, false), (1, false)]
    );
    // A retry of the same batch, and a batch repeating an id within itself.
    let retry = audit.append(vec![event(1), event(2)]).await.unwrap();
    assert_eq!(
        retry.iter().map(|a| (a.index, a.duplicate)).collect::<Vec<_>>(),
        [(0, true), (1, true)]
    );
    let mixed = audit.append(vec![event(3), event(3), event(1)]).await.unwrap();
    assert_eq!(
        mixed.iter().map(|a| (a.index, a.duplicate)).collect::<Vec<_>>(),
        [(2, false), (2, true), (0, true)]
    );
    audit.integrate_all().await.unwrap();
    assert_eq!(audit.checkpoint().await.unwrap().tree_size, 3);
    // Concurrent retries of one id still make one entry.
    let tasks: Vec<_> = (0..8).map(|_| audit.append(vec![event(9)])).collect();
    let results = futures::future::join_all(tasks).await;
    let indexes: std::collections::BTreeSet<u64> = results.into_iter().map(|r| r.unwrap()[0].index).collect();
    assert_eq!(indexes.len(), 1);
    audit.integrate_all().await.unwrap();
    assert_eq!(audit.checkpoint().await.unwrap().tree_size, 4);
    // Appends arriving together share a commit; each caller still gets the
    // indexes of its own events, in its own order.
    let batches: Vec<Vec<u64>> = (0..24)
        .map(|i| (0..1 + i % 3).map(|j| 100 + i * 10 + j).collect())
        .collect();
    let answers = futures::future::join_all(
        batches
            .iter()
            .map(|ids| audit.append(ids.iter().map(|&n| event(n)).collect())),
    )
    .await;
    let mut seen = std::collections::BTreeSet::new();
    for (ids, answer) in batches.iter().zip(answers) {
        let answer = answer.unwrap();
        assert_eq!(answer.len(), ids.len(), "one answer per event sent");
        for (&n, appended) in ids.iter().zip(&answer) {
            assert_eq!(appended.id, format!("event-{n}"));
            assert!(!appended.duplicate);
            let (entry, _) = audit.entry(appended.index).await.unwrap();
            assert_eq!(
                entry.event.id, appended.id,
                "index {} holds another event",
                appended.index
            );
            assert!(seen.insert(appended.index), "index {} answered twice", appended.index);
        }
    }
    assert_eq!(seen.len(), 48);
    assert_eq!(
        seen.iter().copied().collect::<Vec<_>>(),
        (4..52).collect::<Vec<u64>>(),
        "no gaps"
    );
    audit.integrate_all().await.unwrap();
    assert_eq!(audit.checkpoint().await.unwrap().tree_size, 52);
    assert!(audit.verify().await.unwrap().problem.is_none());
}

async fn exec(db: &TestDatabase, sql: &str) {
    let sql = sql.to_owned();
    on_db!(&db.db, |pool| {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await.unwrap();
    });
}

async fn set_bytes(db: &TestDatabase, index: u64, column: &str, bytes: &[u8]) {
    let sql = format!("UPDATE audit_entries SET {column} = $1 WHERE idx = $2");
    on_db!(&db.db, |pool| {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(bytes.to_vec())
            .bind(i64::try_from(index).unwrap())
            .execute(pool)
            .await
            .unwrap();
    });
}

async fn verify_log_finds_tampered_rows(db: &TestDatabase) {
    let audit = open(db, 10_000).await;
    audit.append((0..64).map(event).collect()).await.unwrap();
    audit.integrate_all().await.unwrap();
    audit.append((64..70).map(event).collect()).await.unwrap();
    audit.integrate_all().await.unwrap();
    let ok = audit.verify().await.unwrap();
    assert_eq!(
        (ok.problem.as_deref(), ok.entries_checked, ok.checkpoints_checked),
        (None, 70, 2)
    );

    // 1. Someone rewrites entry 21's bytes (the actor of a failed login).
    let (original, _) = audit.entry(21).await.unwrap();
    let original = original.data.unwrap();
    let mut forged = Event::from_canonical(&original).unwrap();
    forged.actor_id = "someone-else".into();
    set_bytes(db, 21, "data", &forged.canonical()).await;
    let found = audit.verify().await.unwrap();
    assert_eq!(found.first_bad_index, Some(21), "{found:?}");
    assert!(found.problem.unwrap().contains("bytes do not match"));

    // 2. ...and its leaf hash too: the tree above it gives it away.
    set_bytes(db, 21, "leaf_hash", &leaf(&forged.canonical())).await;
    exec(db, "UPDATE audit_entries SET actor_id = 'someone-else' WHERE idx = 21").await;
    let found = audit.verify().await.unwrap();
    assert_eq!(
        found.first_bad_index,
        Some(20),
        "the pair 20..22 no longer hashes to its node: {found:?}"
    );
    assert!(found.problem.unwrap().contains("tree node"));

    // 3. Restored, the log verifies again; a query column edited alone is caught.
    set_bytes(db, 21, "data", &original).await;
    set_bytes(db, 21, "leaf_hash", &leaf(&original)).await;
    exec(db, "UPDATE audit_entries SET actor_id = 'user-0' WHERE idx = 21").await;
    assert!(audit.verify().await.unwrap().problem.is_none());
    exec(
        db,
        "UPDATE audit_entries SET action = 'auth.login.succeeded' WHERE idx = 40",
    )
    .await;
    let found = audit.verify().await.unwrap();
    assert_eq!(found.first_bad_index, Some(40));
    assert!(found.problem.unwrap().contains("column `action`"));
    exec(
        db,
        "UPDATE audit_entries SET action = 'auth.login.failed' WHERE idx = 40",
    )
    .await;

    // 4. A checkpoint whose root was replaced, then a deleted entry.
    set_bytes(
        db,
        0,
        "leaf_hash",
        &leaf(&audit.entry(0).await.unwrap().0.data.unwrap()),
    )
    .await;
    on_db!(&db.db, |pool| {
        sqlx::query("UPDATE audit_checkpoints SET root_hash = $1 WHERE tree_size = 64")
            .bind(vec![7u8; 32])
            .execute(pool)
            .await
            .unwrap();
    });
    let found = audit.verify().await.unwrap();
    assert_eq!(found.first_bad_index, None);
    assert!(found.problem.unwrap().contains("checkpoint of size 64"));
    exec(db, "DELETE FROM audit_checkpoints WHERE tree_size = 64").await;
    exec(db, "DELETE FROM audit_entries WHERE idx = 69").await;
    let found = audit.verify().await.unwrap();
    assert_eq!(found.first_bad_index, Some(69), "{found:?}");
}

async fn listing_filters_and_pages_without_gaps(db: &TestDatabase) {
    let audit = open(db, 10_000).await;
    audit.append((0..120).map(event).collect()).await.unwrap();
    audit.integrate_all().await.unwrap();
    audit.append((120..130).map(event).collect()).await.unwrap();

    // Newest first, paged: every entry once, in order.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = audit.list(&Filter::default(), cursor, false, 17).await.unwrap();
        seen.extend(page.entries.iter().map(|(e, _)| e.index));
        match page.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, (0..130).rev().collect::<Vec<u64>>());

    let failed = Filter {
        action_prefix: "auth.".into(),
        outcome: Some(Outcome::Failure),
        ..Filter::default()
    };
    let page = audit.list(&failed, None, true, 1000).await.unwrap();
    let want: Vec<u64> = (0..130).filter(|n| n % 4 == 0).collect();
    assert_eq!(page.entries.iter().map(|(e, _)| e.index).collect::<Vec<_>>(), want);
    assert!(page.entries.iter().all(|(e, _)| e.event.action == "auth.login.failed"));
    // Integrated entries say so; the last ten are not yet.
    assert!(
        page.entries
            .iter()
            .all(|(e, integrated)| *integrated == (e.index < 120))
    );

    let narrow = Filter {
        actor_id: "user-1".into(),
        resource_name: "shop/env-2".into(),
        tenant: "globex".into(),
        correlation_id: "corr-3".into(),
        start_ms: Some(1_700_000_000_000 + 30_000),
        end_ms: Some(1_700_000_000_000 + 40_000),
        ..Filter::default()
    };
    let page = audit.list(&narrow, None, true, 100).await.unwrap();
    let want: Vec<u64> = (30..40).filter(|n| n % 3 == 1 && n % 5 == 2 && n % 2 == 1).collect();
    assert_eq!(page.entries.iter().map(|(e, _)| e.index).collect::<Vec<_>>(), want);
    assert_eq!(page.entries[0].0.event, event(want[0]));
    // A prefix that matches only a whole word boundary's worth.
    let none = Filter {
        action_prefix: "config.values.changed.x".into(),
        ..Filter::default()
    };
    assert!(audit.list(&none, None, true, 10).await.unwrap().entries.is_empty());
}

async fn two_replicas_integrate_one_log(db: &TestDatabase) {
    let a = open(db, 7).await;
    let other = db.connect_again().await.unwrap();
    let b = Audit::open(Store::new(other.clone()), settings(5)).await.unwrap();
    assert_eq!(
        a.signer().public_key(),
        b.signer().public_key(),
        "replicas share the key"
    );
    let writers = (0..4u64).map(|w| {
        let (a, b) = (a.clone(), b.clone());
        async move {
            for i in 0..25u64 {
                let n = w * 1000 + i;
                let target = if i % 2 == 0 { &a } else { &b };
                target.append(vec![event(n)]).await.unwrap();
                if i % 5 == 0 {
                    target.integrate().await.unwrap();
                }
            }
        }
    });
    let integrators = async {
        for _ in 0..20 {
            futures::future::join(a.integrate(), b.integrate()).await.0.unwrap();
        }
    };
    futures::future::join(futures::future::join_all(writers), integrators).await;
    a.integrate_all().await.unwrap();
    b.integrate_all().await.unwrap();
    assert_eq!(a.checkpoint().await.unwrap().tree_size, 100);
    let v = b.verify().await.unwrap();
    assert_eq!((v.problem, v.entries_checked), (None, 100));
    let p = a.consistency_proof(3, 100).await.unwrap();
    assert_eq!(p.second_root, b.checkpoint().await.unwrap().root);
    other.close().await;
}

async fn bus_events_are_recorded_once(db: &TestDatabase) {
    let audit = open(db, 10_000).await;
    let bus = Arc::new(InProcessBus::new(Duration::from_secs(60)));
    let changed = plinth::config::v1::ConfigChangedEvent {
        namespace: "shop".into(),
        environment: "prod".into(),
        revision: 3,
        keys: vec!["db.url".into()],
        author: "user-7".into(),
        kind: "write".into(),
        ..Default::default()
    };
    let publish = |id: &str, subject: &str| plinth_runtime::events::Event {
        id: id.into(),
        subject: subject.into(),
        payload: prost::Message::encode_to_vec(&changed).into(),
        headers: BTreeMap::new(),
    };
    bus.publish(&publish("bus-1", "plinth.config.changed")).await.unwrap();
    bus.publish(&publish("bus-2", "plinth.config.changed")).await.unwrap();
    bus.publish(&publish("bus-3", "plinth.audit.checkpoint")).await.unwrap();
    let token = CancellationToken::new();
    let ingest = audit.clone().run_ingest(bus.clone(), token.clone());
    let wait = async {
        for _ in 0..200 {
            if audit.store().appended().await.unwrap() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The same event delivered again (a redelivery after a crash before
        // the ack) adds nothing.
        let again = plinth_audit::mapping::audit_event(&publish("bus-1", "plinth.config.changed"), 0);
        assert!(audit.append(vec![again]).await.unwrap()[0].duplicate);
        tokio::time::sleep(Duration::from_millis(50)).await;
        token.cancel();
    };
    let (r, ()) = futures::future::join(ingest, wait).await;
    r.unwrap();
    assert_eq!(
        audit.store().appended().await.unwrap(),
        2,
        "its own subjects are skipped"
    );
    let (entry, _) = audit.entry(0).await.unwrap();
    assert_eq!(entry.event.id, "bus-1");
    assert_eq!(entry.event.action, "config.values.changed");
    assert_eq!(entry.event.actor_id, "user-7");
    assert_eq!(entry.event.resource_name, "shop/prod");
}

async fn retention_and_erasure_keep_every_proof_valid(db: &TestDatabase) {
    let audit = open(db, 10_000).await;
    audit.append((0..40).map(event).collect()).await.unwrap();
    let before = audit.integrate_all().await.unwrap().unwrap();
    let proof_of = |i: u64| audit.inclusion_proof(Some(i), None, 40);
    let old_proofs: Vec<_> = futures::future::join_all((0..40).map(proof_of)).await;
    let now = plinth_runtime::auth::unix_now_ms();
    let hour = 3_600_000;

    // Failed logins are kept an hour (these are from 2023); the rest stays.
    audit
        .set_policy(RetentionPolicy {
            name: "logins".into(),
            action_prefix: "auth.login.".into(),
            tenant: String::new(),
            retain_ms: hour,
            updated_ms: now,
        })
        .await
        .unwrap();
    audit
        .set_policy(RetentionPolicy {
            name: "recent-only".into(),
            action_prefix: "config.".into(),
            tenant: "acme".into(),
            retain_ms: 100 * 365 * 24 * hour,
            updated_ms: now,
        })
        .await
        .unwrap();
    let erased = audit.apply_retention(now).await.unwrap();
    assert_eq!(erased, vec![("logins".to_owned(), 10)]);
    assert!(
        audit.apply_retention(now).await.unwrap().is_empty(),
        "nothing left to erase, nothing logged"
    );
    let (gone, _) = audit.entry(4).await.unwrap();
    assert!(gone.data.is_none());
    assert_eq!(
        (gone.event.action.as_str(), gone.event.actor_id.as_str()),
        ("auth.login.failed", "")
    );
    let (kept, _) = audit.entry(5).await.unwrap();
    assert_eq!(kept.event, event(5));

    // The erasure is itself in the log.
    audit.integrate_all().await.unwrap();
    let records = audit
        .list(
            &Filter {
                action_prefix: "audit.entries.erased".into(),
                ..Filter::default()
            },
            None,
            true,
            10,
        )
        .await
        .unwrap();
    assert_eq!(records.entries.len(), 1);
    assert_eq!(records.entries[0].0.event.metadata["erased"], serde_json::json!(10));
    assert_eq!(records.entries[0].0.event.resource_name, "logins");

    // A person's entries, on request: their id is not in the record.
    let (n, record) = audit.erase_subject("user-1", "ticket 7", "admin-1", now).await.unwrap();
    let expected = (0..40u64).filter(|i| i % 3 == 1 && i % 4 != 0).count() as u64;
    assert_eq!(n, expected);
    let (record, _) = audit.entry(record.unwrap()).await.unwrap();
    let bytes = String::from_utf8(record.data.clone().unwrap()).unwrap();
    assert!(!bytes.contains("user-1"), "{bytes}");
    assert!(record.event.resource_name.starts_with("sha256:"));
    assert_eq!(record.event.actor_id, "admin-1");
    let by_actor = Filter {
        actor_id: "user-1".into(),
        ..Filter::default()
    };
    assert!(audit.list(&by_actor, None, true, 100).await.unwrap().entries.is_empty());
    assert_eq!(
        audit.erase_subject("user-1", "again", "admin-1", now).await.unwrap(),
        (0, None)
    );

    // Every old proof still holds against the old root, and the log verifies.
    audit.integrate_all().await.unwrap();
    for (i, old) in old_proofs.into_iter().enumerate() {
        let old = old.unwrap();
        let again = audit.inclusion_proof(Some(i as u64), None, 40).await.unwrap();
        assert_eq!(again, old);
        assert!(verify_inclusion(
            i as u64,
            40,
            &old.leaf_hash,
            &old.hashes,
            &before.root
        ));
    }
    let v = audit.verify().await.unwrap();
    assert_eq!(v.problem, None);
    assert!(audit.delete_policy("logins").await.is_ok());
    assert!(matches!(
        audit.delete_policy("logins").await,
        Err(AuditError::PolicyNotFound(_))
    ));
}
