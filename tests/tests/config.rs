//! The config service's contract, run on the embedded default (SQLite) and on
//! PostgreSQL: revisions and history, preconditions, atomic changes,
//! rollback, releases, schemas, secrets and key rotation, import/export,
//! watch (replay, live, prefix, snapshot after compaction, progress), and
//! bad input named field by field.

#![expect(
    clippy::unwrap_used,
    reason = "the scenarios run inside the SQLite and PostgreSQL tests; an unexpected answer fails the test"
)]

use std::time::Duration;

use futures::StreamExt;
use plinth::config::v1::{self as pb};
use plinth_runtime::config::Config;
use plinth_tests::config::{ConfigSession, at_release, at_revision, number, secret, text, text_of};
use plinth_tests::{TestApp, error_reason, register_user, sign_in, violated_field, with_admin};
use secrecy::ExposeSecret;
use tonic::Code;

plinth_tests::on_both_backends!(
    writes_make_revisions_with_history,
    preconditions_abort_and_write_nothing,
    apply_changes_is_all_or_nothing,
    rollback_restores_a_past_state_as_a_new_revision,
    releases_freeze_a_revision,
    schemas_refuse_values_naming_key_and_rule,
    secrets_are_sealed_masked_and_revealed_with_permission,
    rotation_rewraps_every_secret_and_old_values_stay_readable,
    documents_import_and_export,
    watch_replays_then_follows_live_in_order,
    watch_from_compacted_history_starts_with_a_snapshot,
    bad_input_names_the_field,
    namespaces_and_environments_update_with_etags,
    rollouts_route_a_cohort_and_abort_returns_everyone,
    concurrent_writers_share_commits_yet_each_gets_its_own_revision,
);

async fn admin_app(config: Config) -> anyhow::Result<(TestApp, ConfigSession)> {
    let app = TestApp::spawn(with_admin(config)).await?;
    let session = ConfigSession::admin(&app).await?;
    Ok((app, session))
}

async fn writes_make_revisions_with_history(config: Config) -> anyhow::Result<()> {
    let (app, mut s) = admin_app(config).await?;
    let r1 = s.set("db/url", text("postgres://a")).await?;
    let r2 = s.set("db/pool", number(5.0)).await?;
    let r3 = s.set("db/url", text("postgres://b")).await?;
    let r4 = s.delete("db/pool").await?;
    assert_eq!((r1, r2, r3, r4), (1, 2, 3, 4), "each write is the next revision");

    let head = s.get_at("db/url", None, false).await?;
    let kv = head.value.unwrap_or_default();
    assert_eq!(text_of(&kv), "postgres://b");
    assert_eq!((kv.version, kv.create_revision, kv.mod_revision), (2, 1, 3));
    assert!(!kv.updated_by.is_empty() && !kv.etag.is_empty());
    assert_eq!(head.revision, 4);

    // Any past state can be read.
    assert_eq!(
        s.list(at_revision(2)).await?,
        vec![("db/pool".into(), "5".into()), ("db/url".into(), "postgres://a".into())]
    );
    assert_eq!(s.list(None).await?, vec![("db/url".into(), "postgres://b".into())]);
    let gone = s.get_at("db/pool", None, false).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let past = s.get_at("db/pool", at_revision(3), false).await?;
    assert_eq!(text_of(&past.value.unwrap_or_default()), "5");

    // Per key and per environment history: who, when, why.
    let h = s
        .client
        .get_history(s.req(pb::GetHistoryRequest {
            namespace: s.namespace.clone(),
            environment: s.environment.clone(),
            key: "db/url".into(),
            ..Default::default()
        }))
        .await?
        .into_inner();
    let revs: Vec<i64> = h.changes.iter().map(|c| c.revision).collect();
    assert_eq!(revs, vec![3, 1], "newest first");
    assert_eq!(h.changes[0].message, "set db/url");
    let list = s
        .client
        .list_revisions(s.req(pb::ListRevisionsRequest {
            namespace: s.namespace.clone(),
            environment: s.environment.clone(),
            page_size: 3,
            ..Default::default()
        }))
        .await?
        .into_inner();
    assert_eq!(
        list.revisions.iter().map(|r| r.revision).collect::<Vec<_>>(),
        vec![4, 3, 2]
    );
    assert_eq!(list.revisions[0].keys, vec!["db/pool".to_owned()]);
    assert_eq!(list.revisions[0].message, "delete db/pool");
    assert!(!list.next_page_token.is_empty());

    // Diff between two revisions.
    let d = s
        .client
        .diff(s.req(pb::DiffRequest {
            namespace: s.namespace.clone(),
            environment: s.environment.clone(),
            from_revision: 2,
            to_revision: 0,
            prefix: String::new(),
        }))
        .await?
        .into_inner();
    assert_eq!(d.to_revision, 4);
    let summary: Vec<(String, bool, bool)> = d.diffs.iter().map(|x| (x.key.clone(), x.added, x.removed)).collect();
    assert_eq!(
        summary,
        vec![("db/pool".into(), false, true), ("db/url".into(), false, false)]
    );

    // min_revision beyond the head is refused, at or below it answers.
    let ahead = s
        .get_at(
            "db/url",
            Some(pb::ReadAt {
                min_revision: 99,
                ..Default::default()
            }),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(ahead.code(), Code::InvalidArgument);
    assert_eq!(error_reason(&ahead), "FUTURE_REVISION");
    let env = s
        .client
        .get_environment(s.req(pb::GetEnvironmentRequest {
            namespace: s.namespace.clone(),
            environment: s.environment.clone(),
        }))
        .await?
        .into_inner()
        .environment
        .unwrap_or_default();
    assert_eq!((env.revision, env.key_count), (4, 1));
    app.stop().await;
    Ok(())
}

async fn preconditions_abort_and_write_nothing(config: Config) -> anyhow::Result<()> {
    let (app, mut s) = admin_app(config).await?;
    let must_not_exist = Some(pb::Precondition {
        must_not_exist: true,
        ..Default::default()
    });
    let created = s.set_if("feature/x", text("on"), must_not_exist.clone()).await?;
    let again = s.set_if("feature/x", text("off"), must_not_exist).await.unwrap_err();
    assert_eq!(again.code(), Code::Aborted);
    assert_eq!(error_reason(&again), "PRECONDITION_FAILED");

    let kv = created.value.unwrap_or_default();
    let stale_version = s
        .set_if(
            "feature/x",
            text("off"),
            Some(pb::Precondition {
                expected_version: kv.version + 1,
                ..Default::default()
            }),
        )
        .await
        .unwrap_err();
    assert_eq!(stale_version.code(), Code::Aborted);
    let ok = s
        .set_if(
            "feature/x",
            text("off"),
            Some(pb::Precondition {
                expected_etag: kv.etag.clone(),
                ..Default::default()
            }),
        )
        .await?;
    assert_eq!(ok.revision, 2, "refused writes used no revision");
    let stale_etag = s
        .set_if(
            "feature/x",
            text("on"),
            Some(pb::Precondition {
                expected_etag: kv.etag,
                ..Default::default()
            }),
        )
        .await
        .unwrap_err();
    assert_eq!(stale_etag.code(), Code::Aborted);
    assert_eq!(s.get("feature/x").await?, "off");

    // Two writers racing on the same version: exactly one wins.
    let version = s
        .get_at("feature/x", None, false)
        .await?
        .value
        .unwrap_or_default()
        .version;
    let mut other = ConfigSession::with_token(&app, &s.token).await?;
    other.namespace = s.namespace.clone();
    other.environment = s.environment.clone();
    let cas = |v: i64| {
        Some(pb::Precondition {
            expected_version: v,
            ..Default::default()
        })
    };
    let (a, b) = tokio::join!(
        s.set_if("feature/x", text("a"), cas(version)),
        other.set_if("feature/x", text("b"), cas(version))
    );
    assert!(a.is_ok() != b.is_ok(), "one of two racing CAS writes wins: {a:?} {b:?}");
    app.stop().await;
    Ok(())
}

async fn apply_changes_is_all_or_nothing(config: Config) -> anyhow::Result<()> {
    let (app, mut s) = admin_app(config).await?;
    s.set("a", text("1")).await?;
    let change = |key: &str, value: Option<pb::Value>, pre: Option<pb::Precondition>| pb::Change {
        key: key.into(),
        value,
        precondition: pre,
    };
    let (ns, env) = (s.namespace.clone(), s.environment.clone());
    let req = |changes| pb::ApplyChangesRequest {
        namespace: ns.clone(),
        environment: env.clone(),
        changes,
        message: "release 42".into(),
    };
    let refused = s
        .client
        .apply_changes(s.req(req(vec![
            change("b", Some(text("2")), None),
            change(
                "a",
                Some(text("x")),
                Some(pb::Precondition {
                    expected_version: 7,
                    ..Default::default()
                }),
            ),
        ])))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Aborted);
    assert_eq!(
        s.list(None).await?,
        vec![("a".into(), "1".into())],
        "nothing of it landed"
    );

    let done = s
        .client
        .apply_changes(s.req(req(vec![
            change("b", Some(text("2")), None),
            change("c", Some(text("3")), None),
            change("a", None, None),
        ])))
        .await?
        .into_inner();
    assert_eq!(done.revision, 2, "one transaction, one revision");
    assert_eq!(
        done.values.iter().map(|v| v.key.as_str()).collect::<Vec<_>>(),
        vec!["b", "c"]
    );
    assert_eq!(
        s.list(None).await?,
        vec![("b".into(), "2".into()), ("c".into(), "3".into())]
    );
    let dup = s
        .client
        .apply_changes(s.req(req(vec![change("b", None, None), change("b", None, None)])))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::InvalidArgument);
    assert_eq!(violated_field(&dup), "changes[1].key");
    app.stop().await;
    Ok(())
}

async fn rollback_restores_a_past_state_as_a_new_revision(config: Config) -> anyhow::Result<()> {
    let (app, mut s) = admin_app(with_keys(config, "k1")).await?;
    s.set("a", text("1")).await?;
    s.set("b", secret("s3cret")).await?;
    let good = s.set("c", text("3")).await?;
    s.set("a", text("broken")).await?;
    s.delete("c").await?;
    s.set("d", text("new")).await?;
    let before = s.list(at_revision(good)).await?;

    let rb = s
        .client
        .rollback(s.req(pb::RollbackRequest {
            namespace: s.namespace.clone(),
            environment: s.environment.clone(),
            to_revision: good,
            message: String::new(),
        }))
        .await?
        .into_inner();
    assert_eq!(rb.revision, 7, "a rollback is a new revision");
    assert_eq!(rb.change_count, 3);
    assert_eq!(s.list(None).await?, before);
    let b = s.get_at("b", None, true).await?.value.unwrap_or_default();
    assert_eq!(text_of(&b), "s3cret", "an untouched secret is still the same");
    // History is kept: the broken state is still readable, and revisions say what happened.
    assert_eq!(
        s.get_at("a", at_revision(4), false).await?.value.map(|v| text_of(&v)),
        Some("broken".into())
    );
    let revs = s
        .client
        .list_revisions(s.req(pb::ListRevisionsRequest {
            namespace: s.namespace.clone(),
            environment: s.environment.clone(),
            page_size: 1,
            ..Default::default()
        }))
        .await?
        .into_inner();
    assert_eq!(revs.revisions[0].kind, "rollback");
    assert_eq!(revs.revisions[0].message, format!("rollback to revision {good}"));
    app.stop().await;
    Ok(())
}

async fn releases_freeze_a_revision(config: Config) -> anyhow::Result<()> {
    let (app, mut s) = admin_app(config).await?;
    s.set("ui/theme", text("dark")).await?;
    let r = s.set("ui/beta", text("off")).await?;
    let (ns, env) = (s.namespace.clone(), s.environment.clone());
    let create = |name: &str, revision: i64| pb::CreateReleaseRequest {
        namespace: ns.clone(),
        environment: env.clone(),
        release: Some(pb::Release {
            name: name.into(),
            revision,
            description: "weekly".into(),
            ..Default::default()
        }),
    };
    let v1 = s.client.create_release(s.req(create("v1.0.0", 0))).await?.into_inner();
    assert_eq!(v1.release.as_ref().map(|r| (r.revision, r.key_count)), Some((r, 2)));
    s.set("ui/beta", text("on")).await?;
    s.delete("ui/theme").await?;

    assert_eq!(
        s.list(at_release("v1.0.0")).await?,
        vec![("ui/beta".into(), "off".into()), ("ui/theme".into(), "dark".into())]
    );
    assert_eq!(s.list(at_release("latest")).await?.len(), 2);
    s.client.create_release(s.req(create("v1.1.0", 0))).await?;
    assert_eq!(
        s.list(at_release("latest")).await?,
        vec![("ui/beta".into(), "on".into())]
    );
    let dup = s.client.create_release(s.req(create("v1.0.0", 0))).await.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let reserved = s.client.create_release(s.req(create("latest", 0))).await.unwrap_err();
    assert_eq!(violated_field(&reserved), "release.name");
    let listed = s
        .client
        .list_releases(s.req(pb::ListReleasesRequest {
            namespace: s.namespace.clone(),
            environment: s.environment.clone(),
            ..Default::default()
        }))
        .await?
        .into_inner();
    assert_eq!(
        listed.releases.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        vec!["v1.1.0", "v1.0.0"]
    );
    let missing = s.get_at("ui/beta", at_release("v9.9.9"), false).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    app.stop().await;
    Ok(())
}

async fn schemas_refuse_values_naming_key_and_rule(config: Config) -> anyhow::Result<()> {
    let (app, mut s) = admin_app(config).await?;
    let schema: prost_types::Struct = serde_json_struct(serde_json::json!({
        "type": "integer", "minimum": 1, "maximum": 100
    }));
    s.client
        .set_schema(s.req(pb::SetSchemaRequest {
            namespace: s.namespace.clone(),
            schema: Some(pb::Schema {
                prefix: "limits/".into(),
                json_schema: Some(schema),
                ..Default::default()
            }),
        }))
        .await?;
    s.set("limits/rps", number(50.0)).await?;
    let bad = s.set("limits/rps", number(500.0)).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(violated_field(&bad), "value");
    assert!(
        bad.message().contains("limits/rps") && bad.message().contains("maximum"),
        "{}",
        bad.message()
    );
    let wrong_type = s.set("limits/rps", text("fast")).await.unwrap_err();
    assert!(wrong_type.message().contains("type"), "{}", wrong_type.message());
    assert_eq!(s.get("limits/rps").await?, "50", "refused writes change nothing");
    s.set("other", text("free")).await?;

    let unusable = s
        .client
        .set_schema(s.req(pb::SetSchemaRequest {
            namespace: s.namespace.clone(),
            schema: Some(pb::Schema {
                prefix: String::new(),
                json_schema: Some(serde_json_struct(serde_json::json!({"type": 5}))),
                ..Default::default()
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(violated_field(&unusable), "schema.json_schema");
    app.stop().await;
    Ok(())
}

fn serde_json_struct(v: serde_json::Value) -> prost_types::Struct {
    fn value(v: serde_json::Value) -> prost_types::Value {
        use prost_types::value::Kind;
        prost_types::Value {
            kind: Some(match v {
                serde_json::Value::Null => Kind::NullValue(0),
                serde_json::Value::Bool(b) => Kind::BoolValue(b),
                serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
                serde_json::Value::String(s) => Kind::StringValue(s),
                serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
                    values: a.into_iter().map(value).collect(),
                }),
                serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
                    fields: o.into_iter().map(|(k, v)| (k, value(v))).collect(),
                }),
            }),
        }
    }
    match value(v).kind {
        Some(prost_types::value::Kind::StructValue(s)) => s,
        _ => prost_types::Struct::default(),
    }
}

/// The config database's (key, value bytes, key id) rows, read directly.
async fn stored_rows(config: &Config) -> anyhow::Result<Vec<(String, Vec<u8>, Option<String>)>> {
    let sql = "SELECT key, value, kek_id FROM config_values ORDER BY key";
    Ok(match &config.database_url {
        None => {
            let path = config.data_dir.join("config.db");
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display())).await?;
            let rows = sqlx::query_as(sql).fetch_all(&pool).await?;
            pool.close().await;
            rows
        }
        Some(url) => {
            let pool = sqlx::PgPool::connect(url.expose_secret()).await?;
            let schema = format!("{}config", config.storage.schema_prefix);
            let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT key, value, kek_id FROM \"{schema}\".config_values ORDER BY key"
            )))
            .fetch_all(&pool)
            .await?;
            pool.close().await;
            rows
        }
    })
}

async fn secrets_are_sealed_masked_and_revealed_with_permission(config: Config) -> anyhow::Result<()> {
    let config = with_keys(config, "k1");
    let (app, mut s) = admin_app(config.clone()).await?;
    s.set("db/password", secret("correct-horse")).await?;
    s.set("db/user", text("app")).await?;

    let rows = stored_rows(&config).await?;
    let (_, bytes, kek) = rows.iter().find(|r| r.0 == "db/password").cloned().unwrap_or_default();
    assert!(
        !bytes.windows(13).any(|w| w == b"correct-horse"),
        "secrets are encrypted at rest"
    );
    assert_eq!(kek.as_deref(), Some("k1"), "the key id is stored with the value");

    let masked = s.get_at("db/password", None, false).await?.value.unwrap_or_default();
    assert!(
        masked.redacted && text_of(&masked).is_empty(),
        "reads are masked by default"
    );
    assert!(s.list(None).await?.contains(&("db/password".into(), String::new())));
    let revealed = s.get_at("db/password", None, true).await?.value.unwrap_or_default();
    assert!(!revealed.redacted);
    assert_eq!(text_of(&revealed), "correct-horse");

    // A viewer reads values but not secrets in clear.
    let mut auth = app.auth().await?;
    let email = register_user(&mut auth, "viewer").await?;
    let token = sign_in(&mut auth, &email)
        .await?
        .tokens
        .unwrap_or_default()
        .access_token;
    let mut viewer = ConfigSession::with_token(&app, &token).await?;
    viewer.namespace = s.namespace.clone();
    viewer.environment = s.environment.clone();
    assert_eq!(viewer.get("db/user").await?, "app");
    let denied = viewer.get_at("db/password", None, true).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(error_reason(&denied), "REVEAL_DENIED");
    let write = viewer.set("db/user", text("x")).await.unwrap_err();
    assert_eq!(write.code(), Code::PermissionDenied);
    app.stop().await;
    Ok(())
}

fn with_keys(mut config: Config, ids: &str) -> Config {
    use base64::Engine;
    let keys: Vec<String> = ids
        .split(',')
        .map(|id| {
            let mut k = [0u8; 32];
            for (i, b) in k.iter_mut().enumerate() {
                *b =
                    u8::try_from((i * 7 + id.len() * 13 + usize::from(id.as_bytes()[id.len() - 1])) % 251).unwrap_or(0);
            }
            format!("{id}={}", base64::engine::general_purpose::STANDARD.encode(k))
        })
        .collect();
    config.config.keys = Some(keys.join(",").into());
    config
}

async fn rotation_rewraps_every_secret_and_old_values_stay_readable(config: Config) -> anyhow::Result<()> {
    let config = with_keys(config, "k1,k2");
    let (app, mut s) = admin_app(config.clone()).await?;
    for i in 0..30 {
        s.set(&format!("s/{i:02}"), secret(&format!("value-{i}"))).await?;
    }
    s.set("s/00", secret("changed")).await?;
    s.client
        .create_release(s.req(pb::CreateReleaseRequest {
            namespace: s.namespace.clone(),
            environment: s.environment.clone(),
            release: Some(pb::Release {
                name: "r1".into(),
                ..Default::default()
            }),
        }))
        .await?;
    assert!(stored_rows(&config).await?.iter().all(|r| r.2.as_deref() == Some("k1")));

    let unknown = s
        .client
        .rotate_key(s.req(pb::RotateKeyRequest { key_id: "k9".into() }))
        .await
        .unwrap_err();
    assert_eq!(violated_field(&unknown), "key_id");
    let rotated = s
        .client
        .rotate_key(s.req(pb::RotateKeyRequest { key_id: "k2".into() }))
        .await?
        .into_inner();
    // 30 head rows, 31 history rows, 30 release rows.
    assert_eq!(rotated.rewrapped, 91);
    assert!(stored_rows(&config).await?.iter().all(|r| r.2.as_deref() == Some("k2")));

    // A replica that has only the new key: head, history and release still open.
    let second = TestApp::spawn(with_keys(config.clone(), "k2")).await?;
    let mut again = ConfigSession::with_token(&second, &s.token).await?;
    again.namespace = s.namespace.clone();
    again.environment = s.environment.clone();
    let open = |r: pb::GetValueResponse| r.value.map(|v| text_of(&v)).unwrap_or_default();
    assert_eq!(open(again.get_at("s/07", None, true).await?), "value-7");
    assert_eq!(open(again.get_at("s/00", at_revision(1), true).await?), "value-0");
    assert_eq!(open(again.get_at("s/00", at_release("r1"), true).await?), "changed");
    let next = again.set("s/new", secret("fresh")).await?;
    assert!(next > 0);
    assert_eq!(
        stored_rows(&config)
            .await?
            .iter()
            .find(|r| r.0 == "s/new")
            .and_then(|r| r.2.clone()),
        Some("k2".into()),
        "new secrets use the active key"
    );
    second.stop().await;
    app.stop().await;
    Ok(())
}

async fn documents_import_and_export(config: Config) -> anyhow::Result<()> {
    let (app, mut s) = admin_app(config).await?;
    let (ns, env) = (s.namespace.clone(), s.environment.clone());
    let import = |format: pb::Format, content: &str, replace: bool| pb::ImportValuesRequest {
        namespace: ns.clone(),
        environment: env.clone(),
        format: format.into(),
        content: content.into(),
        replace,
        message: "import".into(),
        as_secrets: false,
    };
    let json = r#"{"db/url": "postgres://x", "db/pool": 8, "flags/beta": true, "list": [1, 2]}"#;
    let done = s
        .client
        .import_values(s.req(import(pb::Format::Json, json, false)))
        .await?
        .into_inner();
    assert_eq!((done.revision, done.change_count), (1, 4));
    let again = s
        .client
        .import_values(s.req(import(pb::Format::Json, json, false)))
        .await?
        .into_inner();
    assert_eq!(
        (again.revision, again.change_count),
        (1, 0),
        "importing the same document writes nothing"
    );

    let (ns, env) = (s.namespace.clone(), s.environment.clone());
    let export = |format: pb::Format| pb::ExportValuesRequest {
        namespace: ns.clone(),
        environment: env.clone(),
        format: format.into(),
        ..Default::default()
    };
    let yaml = s
        .client
        .export_values(s.req(export(pb::Format::Yaml)))
        .await?
        .into_inner();
    assert!(yaml.content.contains("db/pool: 8"), "{}", yaml.content);
    let dotenv = s
        .client
        .export_values(s.req(export(pb::Format::Dotenv)))
        .await?
        .into_inner();
    assert!(dotenv.content.contains("DB_URL=\"postgres://x\""), "{}", dotenv.content);

    // YAML back in with replace: keys it lacks are deleted, in one revision.
    let replaced = s
        .client
        .import_values(s.req(import(
            pb::Format::Yaml,
            "db/url: postgres://y\nflags/beta: false\n",
            true,
        )))
        .await?
        .into_inner();
    assert_eq!(replaced.revision, 2);
    assert_eq!(
        s.list(None).await?,
        vec![
            ("db/url".into(), "postgres://y".into()),
            ("flags/beta".into(), "false".into())
        ]
    );
    s.client
        .import_values(s.req(import(pb::Format::Dotenv, "# c\nAPI_KEY=\"abc\"\n", false)))
        .await?;
    assert_eq!(s.get("API_KEY").await?, "abc");

    let bad = s
        .client
        .import_values(s.req(import(pb::Format::Json, "[1, 2]", false)))
        .await
        .unwrap_err();
    assert_eq!(violated_field(&bad), "content");
    let no_format = s
        .client
        .import_values(s.req(import(pb::Format::Unspecified, "{}", false)))
        .await
        .unwrap_err();
    assert_eq!(violated_field(&no_format), "format");
    app.stop().await;
    Ok(())
}

async fn next_message(stream: &mut tonic::Streaming<pb::WatchResponse>) -> anyhow::Result<pb::WatchResponse> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .map_err(|_| anyhow::anyhow!("no watch message within 10 s"))?
            .ok_or_else(|| anyhow::anyhow!("watch ended"))??;
        if !m.progress {
            return Ok(m);
        }
    }
}

fn keys_of(m: &pb::WatchResponse) -> Vec<String> {
    m.events
        .iter()
        .map(|e| e.value.as_ref().map(|v| v.key.clone()).unwrap_or_default())
        .collect()
}

async fn watch_replays_then_follows_live_in_order(mut config: Config) -> anyhow::Result<()> {
    config.config.watch_progress_secs = 1;
    let (app, mut s) = admin_app(config).await?;
    s.set("app/a", text("1")).await?;
    s.set("other/x", text("1")).await?;
    s.set("app/b", text("2")).await?;

    // From revision 1: replays revision 3 (2 is outside the prefix), then live.
    let mut w = s.watch("app/", 1).await?;
    let first = next_message(&mut w).await?;
    assert_eq!((first.revision, keys_of(&first)), (3, vec!["app/b".to_owned()]));
    assert!(!first.author.is_empty(), "a change says who made it");
    s.set("app/c", text("3")).await?;
    s.delete("app/a").await?;
    let live = next_message(&mut w).await?;
    assert_eq!((live.revision, keys_of(&live)), (4, vec!["app/c".to_owned()]));
    let del = next_message(&mut w).await?;
    assert_eq!(del.revision, 5);
    assert_eq!(del.events[0].r#type, i32::from(pb::ChangeType::Delete));

    // An idle stream gets progress messages carrying the current revision.
    s.set("other/y", text("2")).await?;
    let progress = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("watch ended"))??;
    assert!(progress.progress && progress.events.is_empty());
    assert_eq!(progress.revision, 6, "progress says the watcher is current to the head");

    // From 0: a snapshot of the head, then live.
    let mut snap = s.watch("app/", 0).await?;
    let first = next_message(&mut snap).await?;
    assert!(first.snapshot && first.snapshot_complete);
    assert_eq!(
        (first.revision, keys_of(&first)),
        (6, vec!["app/b".to_owned(), "app/c".to_owned()])
    );

    // Many quick writes arrive exactly once each, in order.
    let mut all = s.watch("", 6).await?;
    for i in 0..200 {
        s.set(&format!("burst/{}", i % 7), number(f64::from(i))).await?;
    }
    for want in 7..207 {
        let m = next_message(&mut all).await?;
        assert_eq!(m.revision, want, "no gap, no duplicate");
    }

    let missing = s
        .client
        .watch(s.req(pb::WatchRequest {
            namespace: s.namespace.clone(),
            environment: "nope".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    app.stop().await;
    Ok(())
}

async fn watch_from_compacted_history_starts_with_a_snapshot(mut config: Config) -> anyhow::Result<()> {
    config.config.history_revisions = 5;
    let (app, mut s) = admin_app(config.clone()).await?;
    // A reader makes this replica hold the environment's head from before
    // the compaction below, which it does not hear about.
    s.set("k/0", number(0.0)).await?;
    s.get("k/0").await?;
    for i in 1..20 {
        s.set(&format!("k/{}", i % 3), number(f64::from(i))).await?;
    }
    // Compaction runs every minute; run it now the way the task does.
    let rows = compact_now(&config, &s.namespace, &s.environment, 15).await?;
    assert!(rows > 0);

    let mut w = s.watch("k/", 2).await?;
    let first = next_message(&mut w).await?;
    assert!(first.snapshot, "a watch from compacted history starts with a snapshot");
    assert_eq!(first.revision, 20);
    assert_eq!(keys_of(&first), vec!["k/0", "k/1", "k/2"]);
    s.set("k/9", text("x")).await?;
    let live = next_message(&mut w).await?;
    assert_eq!((live.revision, live.snapshot), (21, false));

    // Reads of compacted revisions are refused; retained ones still work.
    let old = s.get_at("k/0", at_revision(3), false).await.unwrap_err();
    assert_eq!(error_reason(&old), "REVISION_COMPACTED");
    assert_eq!(s.list(at_revision(16)).await?.len(), 3);
    let from_retained = s.watch("k/", 17).await?;
    let mut from_retained = from_retained;
    assert_eq!(next_message(&mut from_retained).await?.revision, 18);
    app.stop().await;
    Ok(())
}

/// Compacts like the background task does, through the service's own store.
async fn compact_now(config: &Config, namespace: &str, environment: &str, upto: i64) -> anyhow::Result<u64> {
    let target = plinth_runtime::storage::DbTarget::for_component(
        config.database_url.as_ref(),
        &config.data_dir,
        &config.storage.schema_prefix,
        "config",
    );
    let db = plinth_runtime::storage::Db::connect(&target, &config.storage).await?;
    let keyring = plinth_config::Keyring::from_keys(&[])?;
    let domain = plinth_config::Configuration::new(
        plinth_config::Store::new(db.clone()),
        keyring,
        config.config.clone(),
        None,
    );
    let rows = domain
        .compact_now(&plinth_config::model::EnvId::new(namespace, environment), upto)
        .await?;
    db.close().await;
    Ok(rows)
}

async fn bad_input_names_the_field(config: Config) -> anyhow::Result<()> {
    let (app, mut s) = admin_app(config).await?;
    let bad_key = s.set("a//b", text("x")).await.unwrap_err();
    assert_eq!(
        (bad_key.code(), violated_field(&bad_key)),
        (Code::InvalidArgument, "key".into())
    );
    let no_value = s
        .client
        .set_value(s.req(pb::SetValueRequest {
            namespace: s.namespace.clone(),
            environment: s.environment.clone(),
            key: "k".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(violated_field(&no_value), "value");
    let nan = s.set("k", number(f64::NAN)).await.unwrap_err();
    assert_eq!(violated_field(&nan), "value.number_value");
    let big = s.set("k", text(&"x".repeat(70_000))).await.unwrap_err();
    assert_eq!(violated_field(&big), "value");
    let bad_ns = s
        .client
        .create_namespace(s.req(pb::CreateNamespaceRequest {
            namespace: Some(pb::Namespace {
                name: "Bad Name".into(),
                ..Default::default()
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(violated_field(&bad_ns), "namespace.name");
    let page = s
        .client
        .list_values(s.req(pb::ListValuesRequest {
            namespace: s.namespace.clone(),
            environment: s.environment.clone(),
            page_token: "garbage!".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(violated_field(&page), "page_token");
    let both = s
        .get_at(
            "k",
            Some(pb::ReadAt {
                revision: 1,
                release: "v1".into(),
                ..Default::default()
            }),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(violated_field(&both), "read_at.release");
    assert!(s.list(None).await?.is_empty(), "nothing was written");

    // Deleting a namespace with environments needs force.
    let refused = s
        .client
        .delete_namespace(s.req(pb::DeleteNamespaceRequest {
            namespace: s.namespace.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    s.client
        .delete_namespace(s.req(pb::DeleteNamespaceRequest {
            namespace: s.namespace.clone(),
            force: true,
            etag: String::new(),
        }))
        .await?;
    let gone = s.set("k", text("x")).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    app.stop().await;
    Ok(())
}

async fn namespaces_and_environments_update_with_etags(config: Config) -> anyhow::Result<()> {
    let (app, mut s) = admin_app(config).await?;
    let ns = s
        .client
        .get_namespace(s.req(pb::GetNamespaceRequest {
            namespace: s.namespace.clone(),
        }))
        .await?
        .into_inner()
        .namespace
        .unwrap_or_default();
    let update = |etag: &str, description: &str| pb::UpdateNamespaceRequest {
        namespace: ns.name.clone(),
        update: Some(pb::Namespace {
            description: description.into(),
            etag: etag.into(),
            ..Default::default()
        }),
        update_mask: None,
    };
    let updated = s
        .client
        .update_namespace(s.req(update(&ns.etag, "billing")))
        .await?
        .into_inner()
        .namespace
        .unwrap_or_default();
    assert_eq!(updated.description, "billing");
    assert_ne!(updated.etag, ns.etag);
    let stale = s
        .client
        .update_namespace(s.req(update(&ns.etag, "lost update")))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);

    for name in ["dev", "staging"] {
        s.client
            .create_environment(s.req(pb::CreateEnvironmentRequest {
                namespace: s.namespace.clone(),
                environment: Some(pb::Environment {
                    name: name.into(),
                    ..Default::default()
                }),
            }))
            .await?;
    }
    let page = |token: String| pb::ListEnvironmentsRequest {
        namespace: ns.name.clone(),
        page_size: 2,
        page_token: token,
    };
    let first = s
        .client
        .list_environments(s.req(page(String::new())))
        .await?
        .into_inner();
    let second = s
        .client
        .list_environments(s.req(page(first.next_page_token.clone())))
        .await?
        .into_inner();
    let names: Vec<String> = first
        .environments
        .iter()
        .chain(second.environments.iter())
        .map(|e| e.name.clone())
        .collect();
    assert_eq!(names, vec!["dev", "prod", "staging"]);
    assert!(second.next_page_token.is_empty());

    let env = s
        .client
        .update_environment(s.req(pb::UpdateEnvironmentRequest {
            namespace: ns.name.clone(),
            environment: "dev".into(),
            update: Some(pb::Environment {
                description: "laptops".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["description".into()],
            }),
        }))
        .await?
        .into_inner()
        .environment
        .unwrap_or_default();
    assert_eq!(env.description, "laptops");
    let bad_mask = s
        .client
        .update_environment(s.req(pb::UpdateEnvironmentRequest {
            namespace: ns.name.clone(),
            environment: "dev".into(),
            update: Some(pb::Environment::default()),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["revision".into()],
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(violated_field(&bad_mask), "update_mask");

    // Deleting an environment ends its watches.
    s.environment = "dev".into();
    s.set("old/key", text("from the first dev")).await?;
    let mut w = s.watch("", 0).await?;
    assert!(next_message(&mut w).await?.snapshot);
    s.client
        .delete_environment(s.req(pb::DeleteEnvironmentRequest {
            namespace: ns.name.clone(),
            environment: "dev".into(),
            etag: String::new(),
        }))
        .await?;
    let ended = next_message(&mut w).await.unwrap_err();
    assert!(ended.to_string().contains("not found"), "{ended}");
    // The same name again is a new environment: nothing of the old one shows.
    s.client
        .create_environment(s.req(pb::CreateEnvironmentRequest {
            namespace: ns.name.clone(),
            environment: Some(pb::Environment {
                name: "dev".into(),
                ..Default::default()
            }),
        }))
        .await?;
    assert!(s.list(None).await?.is_empty());
    let ahead = s.watch("", 5).await.unwrap_err();
    assert_eq!(
        (ahead.code(), violated_field(&ahead)),
        (Code::InvalidArgument, "from_revision".into())
    );
    app.stop().await;
    Ok(())
}

fn client(id: &str, labels: &[(&str, &str)]) -> pb::Client {
    pb::Client {
        id: id.into(),
        labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
    }
}

async fn rollouts_route_a_cohort_and_abort_returns_everyone(config: Config) -> anyhow::Result<()> {
    let (app, mut s) = admin_app(config).await?;
    let (ns, env) = (s.namespace.clone(), s.environment.clone());
    let release = |name: &str| pb::CreateReleaseRequest {
        namespace: ns.clone(),
        environment: env.clone(),
        release: Some(pb::Release {
            name: name.into(),
            ..Default::default()
        }),
    };
    let read_as = |c: pb::Client| {
        Some(pb::ReadAt {
            client: Some(c),
            ..Default::default()
        })
    };
    // Before any release, clients read the head.
    s.set("ui/theme", text("light")).await?;
    assert_eq!(
        s.get_at("ui/theme", read_as(client("c-1", &[])), false).await?.revision,
        1
    );
    s.client.create_release(s.req(release("v1"))).await?;
    s.set("ui/theme", text("dark")).await?;
    s.client.create_release(s.req(release("v2"))).await?;
    s.set("ui/theme", text("unreleased")).await?;

    let start = |percentage: i32, labels: &[(&str, &str)]| pb::StartRolloutRequest {
        namespace: ns.clone(),
        environment: env.clone(),
        rollout: Some(pb::Rollout {
            release: "v2".into(),
            percentage,
            labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            ..Default::default()
        }),
    };
    let started = s
        .client
        .start_rollout(s.req(start(20, &[("canary", "true")])))
        .await?
        .into_inner()
        .rollout
        .unwrap_or_default();
    assert_eq!(started.previous_release, "v1", "others keep the release before");
    assert_eq!(started.state, i32::from(pb::RolloutState::Active));
    let again = s.client.start_rollout(s.req(start(50, &[]))).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "one rollout at a time");

    // About a fifth of the clients, always the same ones, plus every canary.
    let theme = |kv: pb::GetValueResponse| kv.value.map(|v| text_of(&v)).unwrap_or_default();
    let mut in_cohort = Vec::new();
    for i in 0..200 {
        let id = format!("client-{i}");
        let seen = theme(s.get_at("ui/theme", read_as(client(&id, &[])), false).await?);
        assert!(seen == "dark" || seen == "light", "{seen}");
        if seen == "dark" {
            in_cohort.push(id);
        }
    }
    assert!(
        (20..=60).contains(&in_cohort.len()),
        "{} of 200 in a 20% cohort",
        in_cohort.len()
    );
    let canary = theme(
        s.get_at("ui/theme", read_as(client("outsider-9", &[("canary", "true")])), false)
            .await?,
    );
    assert_eq!(canary, "dark");
    let resolved = s
        .client
        .resolve_release(s.req(pb::ResolveReleaseRequest {
            namespace: ns.clone(),
            environment: env.clone(),
            client: Some(client(&in_cohort[0], &[])),
        }))
        .await?
        .into_inner();
    assert_eq!((resolved.release.as_str(), resolved.in_rollout), ("v2", true));

    // Promote: everyone in the cohort stays in it.
    let promote = |percentage: i32| pb::PromoteRolloutRequest {
        namespace: ns.clone(),
        environment: env.clone(),
        percentage,
        labels: Default::default(),
    };
    s.client.promote_rollout(s.req(promote(60))).await?;
    for id in &in_cohort {
        assert_eq!(
            theme(s.get_at("ui/theme", read_as(client(id, &[])), false).await?),
            "dark"
        );
    }
    let lower = s.client.promote_rollout(s.req(promote(10))).await.unwrap_err();
    assert_eq!(violated_field(&lower), "percentage");

    // Pause holds it; promote is refused until resumed.
    let (n, e) = (ns.clone(), env.clone());
    s.client
        .pause_rollout(s.req(pb::PauseRolloutRequest {
            namespace: n.clone(),
            environment: e.clone(),
        }))
        .await?;
    let paused = s.client.promote_rollout(s.req(promote(80))).await.unwrap_err();
    assert_eq!(error_reason(&paused), "ROLLOUT_STATE");
    s.client
        .resume_rollout(s.req(pb::ResumeRolloutRequest {
            namespace: n.clone(),
            environment: e.clone(),
        }))
        .await?;

    // Abort: everyone is back on v1 at once.
    let aborted = s
        .client
        .abort_rollout(s.req(pb::AbortRolloutRequest {
            namespace: n.clone(),
            environment: e.clone(),
        }))
        .await?
        .into_inner()
        .rollout
        .unwrap_or_default();
    assert_eq!(aborted.state, i32::from(pb::RolloutState::Aborted));
    for id in in_cohort.iter().take(10) {
        assert_eq!(
            theme(s.get_at("ui/theme", read_as(client(id, &[])), false).await?),
            "light"
        );
    }

    // A new rollout to 100% completes: v2 is everyone's.
    let done = s
        .client
        .start_rollout(s.req(start(100, &[])))
        .await?
        .into_inner()
        .rollout
        .unwrap_or_default();
    assert_eq!(done.state, i32::from(pb::RolloutState::Completed));
    assert_eq!(
        theme(s.get_at("ui/theme", read_as(client("anyone", &[])), false).await?),
        "dark"
    );
    let got = s
        .client
        .get_rollout(s.req(pb::GetRolloutRequest {
            namespace: n,
            environment: e,
        }))
        .await?
        .into_inner();
    assert_eq!(got.current_release, "v2");
    let bad = s.client.start_rollout(s.req(start(101, &[]))).await.unwrap_err();
    assert_eq!(violated_field(&bad), "rollout.percentage");
    app.stop().await;
    Ok(())
}

async fn concurrent_writers_share_commits_yet_each_gets_its_own_revision(config: Config) -> anyhow::Result<()> {
    let (app, s) = admin_app(config).await?;
    s.clone_session(&app).await?.set("shared", number(0.0)).await?;
    let mut writers = Vec::new();
    for i in 0..40 {
        let mut w = s.clone_session(&app).await?;
        writers.push(async move {
            if i % 5 == 0 {
                // Eight writers race to move `shared` from version 1: one wins.
                let won = w
                    .set_if(
                        "shared",
                        number(f64::from(i)),
                        Some(pb::Precondition {
                            expected_version: 1,
                            ..Default::default()
                        }),
                    )
                    .await;
                (i, won.map(|r| r.revision))
            } else {
                (i, w.set(&format!("own/{i:02}"), number(f64::from(i))).await)
            }
        });
    }
    let results = futures::future::join_all(writers).await;
    let mut revisions: Vec<i64> = results.iter().filter_map(|(_, r)| r.as_ref().ok().copied()).collect();
    let refused: Vec<&tonic::Status> = results.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    assert_eq!(refused.len(), 7, "exactly one of the eight CAS writers wins");
    assert!(refused.iter().all(|e| e.code() == Code::Aborted));
    revisions.sort_unstable();
    assert_eq!(
        revisions,
        (2..=34).collect::<Vec<_>>(),
        "one revision each, no gap, none shared"
    );
    let mut s = s;
    assert_eq!(s.list(None).await?.len(), 33);
    let shared = s.get_at("shared", None, false).await?.value.unwrap_or_default();
    assert_eq!(shared.version, 2);
    app.stop().await;
    Ok(())
}

#[tokio::test]
async fn over_http_values_round_trip_bad_input_is_400_and_watch_is_ndjson() {
    let (app, s) = admin_app(TestApp::config()).await.unwrap();
    let base = format!(
        "http://{}/v1/config/namespaces/{}/environments/{}",
        app.http, s.namespace, s.environment
    );
    let http = reqwest::Client::new();
    let auth = format!("Bearer {}", s.token);

    let put = http
        .put(format!("{base}/values/db/url"))
        .header("authorization", &auth)
        .json(&serde_json::json!({"value": {"stringValue": "postgres://x"}, "message": "first"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let body: serde_json::Value = put.json().await.unwrap();
    assert_eq!(body["revision"], "1");
    assert_eq!(body["value"]["key"], "db/url");
    let got: serde_json::Value = http
        .get(format!("{base}/values/db/url"))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["value"]["value"]["stringValue"], "postgres://x");

    for (path, body, field) in [
        (
            "values/a%20b",
            serde_json::json!({"value": {"stringValue": "x"}}),
            "key",
        ),
        ("values/ok", serde_json::json!({}), "value"),
        (
            "values/ok",
            serde_json::json!({"value": {"numberValue": 1}, "precondition": {"expectedVersion": -1}}),
            "precondition.expected_version",
        ),
    ] {
        let r = http
            .put(format!("{base}/{path}"))
            .header("authorization", &auth)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path} {body}");
        let e: serde_json::Value = r.json().await.unwrap();
        let violations = e["details"]
            .as_array()
            .and_then(|d| d.iter().find(|x| x["fieldViolations"].is_array()))
            .cloned()
            .unwrap_or_default();
        assert_eq!(violations["fieldViolations"][0]["field"], field, "{e}");
    }
    let conflict = http
        .put(format!("{base}/values/db/url"))
        .header("authorization", &auth)
        .json(&serde_json::json!({"value": {"stringValue": "y"}, "precondition": {"mustNotExist": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(conflict.status(), 409);

    // The watch as NDJSON: one JSON object per line, a change per revision.
    let mut watch = http
        .get(format!("{base}:watch?fromRevision=1"))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    assert_eq!(
        watch.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/x-ndjson")
    );
    let mut s = s;
    s.set("feature/beta", text("on")).await.unwrap();
    let mut buffered = String::new();
    let mut lines = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while lines.len() < 2 {
            if let Some((line, rest)) = buffered.split_once('\n') {
                lines.push(serde_json::from_str::<serde_json::Value>(line).unwrap());
                buffered = rest.to_owned();
                continue;
            }
            let chunk = watch.chunk().await.unwrap().unwrap_or_default();
            buffered.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap();
    // First, at once: where the watch starts.
    assert_eq!(lines[0]["result"]["progress"], true);
    assert_eq!(lines[0]["result"]["revision"], "1");
    let message = &lines[1];
    assert_eq!(message["result"]["revision"], "2");
    assert_eq!(message["result"]["events"][0]["value"]["key"], "feature/beta");
    app.stop().await;
}
