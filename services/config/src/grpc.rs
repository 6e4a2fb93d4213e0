//! The gRPC face of the config service: decode, validate into domain
//! values, call [`Configuration`], encode. No rule of the domain lives here.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use plinth::codec::LeanCodec;
use plinth::config::v1 as pb;
use plinth::config::v1::config_service_server::{ConfigService, ConfigServiceServer};
use plinth_runtime::auth::Principal;
use plinth_runtime::error::to_status;
use plinth_runtime::framed::{self, FrameStream};

use crate::convert::{self, env_id, page_size};
use crate::error::ConfigError;
use crate::model::{EnvId, ReadAt, RolloutState, check_key, check_name, check_release_name, check_text};
use crate::service::{Caller, Configuration};
use crate::watch::{self, WatchSpec};

/// The permission that lets a caller read secrets in clear.
pub const REVEAL_PERMISSION: &str = "config.secrets.read";

fn status(e: ConfigError) -> Status {
    to_status(&e)
}

fn caller<T>(request: &Request<T>) -> Caller {
    match request.extensions().get::<Principal>() {
        Some(p) => Caller {
            subject: p.subject.clone(),
            may_reveal: p.allows(REVEAL_PERMISSION),
        },
        None => Caller {
            subject: "anonymous".into(),
            may_reveal: false,
        },
    }
}

/// The config service over gRPC.
#[derive(Clone)]
pub struct ConfigGrpc {
    config: Configuration,
}

impl ConfigGrpc {
    /// Serves `config`.
    pub fn new(config: Configuration) -> Self {
        Self { config }
    }

    /// `Watch`, its messages as gRPC frames (see [`crate::watch`]).
    async fn watch_frames(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<impl Stream<Item = Result<Bytes, Status>> + Send + 'static, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        let prefix = convert::prefix("prefix", &r.prefix).map_err(status)?;
        if r.from_revision < 0 {
            return Err(status(ConfigError::invalid("from_revision", "must not be negative")));
        }
        Configuration::check_reveal(r.reveal_secrets, &who).map_err(status)?;
        if r.reveal_secrets {
            self.config
                .record_reveal(&env, vec![format!("{prefix}*")], "Watch", &who)
                .await
                .map_err(status)?;
        }
        let stream = watch::open(
            self.config.clone(),
            WatchSpec {
                env,
                prefix,
                from_revision: r.from_revision,
                reveal: r.reveal_secrets,
            },
        )
        .await
        .map_err(status)?;
        Ok(stream)
    }
}

/// A page cursor: the revision (or release) the first page read, and the last key.
enum Cursor {
    Revision(i64, String),
    Release(String, String),
}

fn encode_cursor(c: &Cursor) -> String {
    let raw = match c {
        Cursor::Revision(r, k) => format!("r{r}:{k}"),
        Cursor::Release(n, k) => format!("l{n}:{k}"),
    };
    plinth_runtime::wire::page_token(&raw)
}

fn decode_cursor(field: &str, token: &str) -> Result<Option<Cursor>, ConfigError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || ConfigError::invalid(field, "is not a token from a previous page");
    let raw = token_text(field, token)?;
    let (head, key) = raw.split_once(':').ok_or_else(bad)?;
    match head.split_at_checked(1) {
        Some(("r", rev)) => Ok(Some(Cursor::Revision(
            rev.parse().ok().filter(|r: &i64| *r >= 0).ok_or_else(bad)?,
            key.to_owned(),
        ))),
        Some(("l", name)) if !name.is_empty() => Ok(Some(Cursor::Release(name.to_owned(), key.to_owned()))),
        _ => Err(bad()),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ConfigService for ConfigGrpc {
    async fn create_namespace(
        &self,
        request: Request<pb::CreateNamespaceRequest>,
    ) -> Result<Response<pb::CreateNamespaceResponse>, Status> {
        let who = caller(&request);
        let ns = request
            .into_inner()
            .namespace
            .ok_or_else(|| status(ConfigError::invalid("namespace", "is required")))?;
        check_name("namespace.name", &ns.name).map_err(status)?;
        check_text("namespace.description", &ns.description).map_err(status)?;
        let created = self
            .config
            .create_namespace(&ns.name, &ns.description, &who)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CreateNamespaceResponse {
            namespace: Some(convert::namespace(&created)),
        }))
    }

    async fn get_namespace(
        &self,
        request: Request<pb::GetNamespaceRequest>,
    ) -> Result<Response<pb::GetNamespaceResponse>, Status> {
        let r = request.into_inner();
        check_name("namespace", &r.namespace).map_err(status)?;
        let ns = self.config.namespace(&r.namespace).await.map_err(status)?;
        Ok(Response::new(pb::GetNamespaceResponse {
            namespace: Some(convert::namespace(&ns)),
        }))
    }

    async fn list_namespaces(
        &self,
        request: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        let r = request.into_inner();
        let size = page_size("page_size", r.page_size, 50).map_err(status)?;
        let after = decode_name_token(&r.page_token).map_err(status)?;
        let mut list = self
            .config
            .namespaces(&after, i64::try_from(size + 1).unwrap_or(i64::MAX))
            .await
            .map_err(status)?;
        let next = next_name_token(&mut list, size, |n| n.name.clone());
        Ok(Response::new(pb::ListNamespacesResponse {
            namespaces: list.iter().map(convert::namespace).collect(),
            next_page_token: next,
        }))
    }

    async fn update_namespace(
        &self,
        request: Request<pb::UpdateNamespaceRequest>,
    ) -> Result<Response<pb::UpdateNamespaceResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        check_name("namespace", &r.namespace).map_err(status)?;
        let ns = r
            .update
            .ok_or_else(|| status(ConfigError::invalid("update", "is required")))?;
        if !ns.name.is_empty() && ns.name != r.namespace {
            return Err(status(ConfigError::invalid(
                "update.name",
                "must be empty or the namespace being updated",
            )));
        }
        check_mask(r.update_mask.as_ref(), "namespace").map_err(status)?;
        check_text("update.description", &ns.description).map_err(status)?;
        let expected = convert::generation("update.etag", &ns.etag).map_err(status)?;
        let updated = self
            .config
            .update_namespace(&r.namespace, &ns.description, expected, &who)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UpdateNamespaceResponse {
            namespace: Some(convert::namespace(&updated)),
        }))
    }

    async fn delete_namespace(
        &self,
        request: Request<pb::DeleteNamespaceRequest>,
    ) -> Result<Response<pb::DeleteNamespaceResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        check_name("namespace", &r.namespace).map_err(status)?;
        let expected = convert::generation("etag", &r.etag).map_err(status)?;
        self.config
            .delete_namespace(&r.namespace, r.force, expected, &who)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteNamespaceResponse {}))
    }

    async fn create_environment(
        &self,
        request: Request<pb::CreateEnvironmentRequest>,
    ) -> Result<Response<pb::CreateEnvironmentResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let e = r
            .environment
            .ok_or_else(|| status(ConfigError::invalid("environment", "is required")))?;
        check_name("namespace", &r.namespace).map_err(status)?;
        check_name("environment.name", &e.name).map_err(status)?;
        check_text("environment.description", &e.description).map_err(status)?;
        let created = self
            .config
            .create_environment(&EnvId::new(&r.namespace, &e.name), &e.description, &who)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CreateEnvironmentResponse {
            environment: Some(convert::environment(&created)),
        }))
    }

    async fn get_environment(
        &self,
        request: Request<pb::GetEnvironmentRequest>,
    ) -> Result<Response<pb::GetEnvironmentResponse>, Status> {
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        let e = self.config.environment(&env).await.map_err(status)?;
        Ok(Response::new(pb::GetEnvironmentResponse {
            environment: Some(convert::environment(&e)),
        }))
    }

    async fn list_environments(
        &self,
        request: Request<pb::ListEnvironmentsRequest>,
    ) -> Result<Response<pb::ListEnvironmentsResponse>, Status> {
        let r = request.into_inner();
        check_name("namespace", &r.namespace).map_err(status)?;
        let size = page_size("page_size", r.page_size, 50).map_err(status)?;
        let after = decode_name_token(&r.page_token).map_err(status)?;
        let mut list = self
            .config
            .environments(&r.namespace, &after, i64::try_from(size + 1).unwrap_or(i64::MAX))
            .await
            .map_err(status)?;
        let next = next_name_token(&mut list, size, |e| e.name.clone());
        Ok(Response::new(pb::ListEnvironmentsResponse {
            environments: list.iter().map(convert::environment).collect(),
            next_page_token: next,
        }))
    }

    async fn update_environment(
        &self,
        request: Request<pb::UpdateEnvironmentRequest>,
    ) -> Result<Response<pb::UpdateEnvironmentResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        let e = r
            .update
            .ok_or_else(|| status(ConfigError::invalid("update", "is required")))?;
        if !e.namespace.is_empty() && e.namespace != r.namespace {
            return Err(status(ConfigError::invalid(
                "update.namespace",
                "must be empty or the environment's namespace",
            )));
        }
        if !e.name.is_empty() && e.name != r.environment {
            return Err(status(ConfigError::invalid(
                "update.name",
                "must be empty or the environment being updated",
            )));
        }
        check_mask(r.update_mask.as_ref(), "environment").map_err(status)?;
        check_text("update.description", &e.description).map_err(status)?;
        let expected = convert::generation("update.etag", &e.etag).map_err(status)?;
        let updated = self
            .config
            .update_environment(&env, &e.description, expected, &who)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UpdateEnvironmentResponse {
            environment: Some(convert::environment(&updated)),
        }))
    }

    async fn delete_environment(
        &self,
        request: Request<pb::DeleteEnvironmentRequest>,
    ) -> Result<Response<pb::DeleteEnvironmentResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        let expected = convert::generation("etag", &r.etag).map_err(status)?;
        self.config
            .delete_environment(&env, expected, &who)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteEnvironmentResponse {}))
    }

    async fn get_value(&self, request: Request<pb::GetValueRequest>) -> Result<Response<pb::GetValueResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        check_key("key", &r.key).map_err(status)?;
        let at = convert::read_at(r.read_at.as_ref()).map_err(status)?;
        Configuration::check_reveal(r.reveal_secrets, &who).map_err(status)?;
        let (entry, revision) = self.config.get(&env, &r.key, &at).await.map_err(status)?;
        let is_secret = entry.value.is_secret();
        let shown = self.config.show(&env, entry, r.reveal_secrets).map_err(status)?;
        if r.reveal_secrets && is_secret {
            // Boxed: a write, sized out of every plain read's future.
            Box::pin(self.config.record_reveal(&env, vec![r.key.clone()], "GetValue", &who))
                .await
                .map_err(status)?;
        }
        Ok(Response::new(pb::GetValueResponse {
            value: Some(convert::key_value(&shown)),
            revision,
        }))
    }

    async fn list_values(
        &self,
        request: Request<pb::ListValuesRequest>,
    ) -> Result<Response<pb::ListValuesResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        let prefix = convert::prefix("prefix", &r.prefix).map_err(status)?;
        let size = page_size("page_size", r.page_size, 100).map_err(status)?;
        Configuration::check_reveal(r.reveal_secrets, &who).map_err(status)?;
        let (at, after) = match decode_cursor("page_token", &r.page_token).map_err(status)? {
            None => (convert::read_at(r.read_at.as_ref()).map_err(status)?, String::new()),
            Some(Cursor::Revision(rev, key)) => (ReadAt::Revision(rev), key),
            Some(Cursor::Release(name, key)) => (ReadAt::Release(name), key),
        };
        // Later pages must read what the first did, so a client's read is pinned here.
        let at = self.config.concrete(&env, &at).await.map_err(status)?;
        let (mut entries, revision) = self
            .config
            .list(&env, &at, &prefix, &after, size + 1)
            .await
            .map_err(status)?;
        let more = entries.len() > size;
        entries.truncate(size);
        let next_page_token = match (more, entries.last()) {
            (true, Some(last)) => {
                let cursor = match &at {
                    ReadAt::Release(name) => {
                        let concrete = self.config.release(&env, name).await.map_err(status)?;
                        Cursor::Release(concrete.name, last.key.clone())
                    }
                    ReadAt::Head { .. } | ReadAt::Revision(_) | ReadAt::Client(_) => {
                        Cursor::Revision(revision, last.key.clone())
                    }
                };
                encode_cursor(&cursor)
            }
            _ => String::new(),
        };
        let revealed: Vec<String> = if r.reveal_secrets {
            entries
                .iter()
                .filter(|e| e.value.is_secret())
                .map(|e| e.key.clone())
                .collect()
        } else {
            Vec::new()
        };
        let mut values = Vec::with_capacity(entries.len());
        for e in entries {
            values.push(convert::key_value(
                &self.config.show(&env, e, r.reveal_secrets).map_err(status)?,
            ));
        }
        if !revealed.is_empty() {
            self.config
                .record_reveal(&env, revealed, "ListValues", &who)
                .await
                .map_err(status)?;
        }
        Ok(Response::new(pb::ListValuesResponse {
            values,
            revision,
            next_page_token,
        }))
    }

    async fn set_value(&self, request: Request<pb::SetValueRequest>) -> Result<Response<pb::SetValueResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        check_key("key", &r.key).map_err(status)?;
        let value = convert::new_value("value", r.value.as_ref()).map_err(status)?;
        let precondition = convert::precondition("precondition", r.precondition.as_ref()).map_err(status)?;
        let committed = self
            .config
            .write(
                &env,
                vec![crate::model::Mutation {
                    key: r.key.clone(),
                    value: Some(value),
                    precondition,
                }],
                &r.message,
                "",
                &who,
            )
            .await
            .map_err(status)?;
        let entry = committed
            .batch
            .as_ref()
            .and_then(|b| b.events.first())
            .and_then(|e| e.entry.clone())
            .ok_or_else(|| Status::internal("internal error"))?;
        let shown = self.config.show(&env, entry, false).map_err(status)?;
        Ok(Response::new(pb::SetValueResponse {
            value: Some(convert::key_value(&shown)),
            revision: committed.revision,
        }))
    }

    async fn delete_value(
        &self,
        request: Request<pb::DeleteValueRequest>,
    ) -> Result<Response<pb::DeleteValueResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        check_key("key", &r.key).map_err(status)?;
        let precondition = convert::precondition("precondition", r.precondition.as_ref()).map_err(status)?;
        let committed = self
            .config
            .write(
                &env,
                vec![crate::model::Mutation {
                    key: r.key.clone(),
                    value: None,
                    precondition,
                }],
                &r.message,
                "",
                &who,
            )
            .await
            .map_err(status)?;
        if committed.batch.is_none() {
            return Err(status(ConfigError::KeyNotFound(r.key)));
        }
        Ok(Response::new(pb::DeleteValueResponse {
            revision: committed.revision,
        }))
    }

    async fn apply_changes(
        &self,
        request: Request<pb::ApplyChangesRequest>,
    ) -> Result<Response<pb::ApplyChangesResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        let mutations = convert::mutations(&r.changes).map_err(status)?;
        let order: Vec<String> = mutations.iter().map(|m| m.key.clone()).collect();
        let committed = self
            .config
            .write(&env, mutations, &r.message, "changes", &who)
            .await
            .map_err(status)?;
        let mut values = Vec::new();
        if let Some(batch) = &committed.batch {
            for key in &order {
                if let Some(entry) = batch
                    .events
                    .iter()
                    .find(|e| &e.key == key)
                    .and_then(|e| e.entry.clone())
                {
                    values.push(convert::key_value(
                        &self.config.show(&env, entry, false).map_err(status)?,
                    ));
                }
            }
        }
        Ok(Response::new(pb::ApplyChangesResponse {
            revision: committed.revision,
            values,
        }))
    }

    async fn list_revisions(
        &self,
        request: Request<pb::ListRevisionsRequest>,
    ) -> Result<Response<pb::ListRevisionsResponse>, Status> {
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        let size = page_size("page_size", r.page_size, 50).map_err(status)?;
        let before = convert::revision_token("page_token", &r.page_token).map_err(status)?;
        let mut list = self
            .config
            .revisions(&env, before, i64::try_from(size + 1).unwrap_or(i64::MAX))
            .await
            .map_err(status)?;
        let more = list.len() > size;
        list.truncate(size);
        let next_page_token = match (more, list.last()) {
            (true, Some(last)) => last.revision.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListRevisionsResponse {
            revisions: list.iter().map(convert::revision).collect(),
            next_page_token,
        }))
    }

    async fn get_history(
        &self,
        request: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::GetHistoryResponse>, Status> {
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        check_key("key", &r.key).map_err(status)?;
        let size = page_size("page_size", r.page_size, 50).map_err(status)?;
        let before = convert::revision_token("page_token", &r.page_token).map_err(status)?;
        let mut list = self
            .config
            .history(&env, &r.key, before, i64::try_from(size + 1).unwrap_or(i64::MAX))
            .await
            .map_err(status)?;
        let more = list.len() > size;
        list.truncate(size);
        let next_page_token = match (more, list.last()) {
            (true, Some(last)) => last.0.to_string(),
            _ => String::new(),
        };
        let mut changes = Vec::with_capacity(list.len());
        for (revision, message, entry) in list {
            changes.push(match entry {
                Some(e) => pb::KeyChange {
                    revision,
                    r#type: pb::ChangeType::Put.into(),
                    value: Some(convert::key_value(
                        &self.config.show(&env, std::sync::Arc::new(e), false).map_err(status)?,
                    )),
                    message,
                },
                None => pb::KeyChange {
                    revision,
                    r#type: pb::ChangeType::Delete.into(),
                    value: Some(convert::deleted(&r.key, revision)),
                    message,
                },
            });
        }
        Ok(Response::new(pb::GetHistoryResponse {
            changes,
            next_page_token,
        }))
    }

    async fn diff(&self, request: Request<pb::DiffRequest>) -> Result<Response<pb::DiffResponse>, Status> {
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        let prefix = convert::prefix("prefix", &r.prefix).map_err(status)?;
        if r.from_revision < 0 {
            return Err(status(ConfigError::invalid("from_revision", "must not be negative")));
        }
        if r.to_revision < 0 {
            return Err(status(ConfigError::invalid("to_revision", "must not be negative")));
        }
        let (diffs, to) = self
            .config
            .diff(&env, r.from_revision, r.to_revision, &prefix)
            .await
            .map_err(status)?;
        let mut out = Vec::with_capacity(diffs.len());
        for (key, from, to) in diffs {
            let show = |e: Option<crate::model::Entry>| -> Result<Option<pb::KeyValue>, Status> {
                e.map(|e| {
                    self.config
                        .show(&env, std::sync::Arc::new(e), false)
                        .map(|s| convert::key_value(&s))
                        .map_err(status)
                })
                .transpose()
            };
            out.push(pb::KeyDiff {
                key,
                added: from.is_none(),
                removed: to.is_none(),
                from: show(from)?,
                to: show(to)?,
            });
        }
        Ok(Response::new(pb::DiffResponse {
            diffs: out,
            from_revision: r.from_revision,
            to_revision: to,
        }))
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Result<Response<pb::RollbackResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        if r.to_revision < 0 {
            return Err(status(ConfigError::invalid("to_revision", "must not be negative")));
        }
        let committed = self
            .config
            .rollback(&env, r.to_revision, &r.message, &who)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RollbackResponse {
            revision: committed.revision,
            change_count: committed
                .batch
                .as_ref()
                .map_or(0, |b| i32::try_from(b.events.len()).unwrap_or(i32::MAX)),
        }))
    }

    type WatchStream = WatchStream;

    /// Served by [`ConfigServer`]'s own route, which sends the frames as
    /// they are; this (for a caller of the generated server alone) decodes them.
    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        use futures::StreamExt;
        let stream = self.watch_frames(request).await?;
        Ok(Response::new(Box::pin(stream.map(|m| {
            m.and_then(|frame| framed::unframe::<pb::WatchResponse>(&frame))
        }))))
    }

    async fn create_release(
        &self,
        request: Request<pb::CreateReleaseRequest>,
    ) -> Result<Response<pb::CreateReleaseResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        let rel = r
            .release
            .ok_or_else(|| status(ConfigError::invalid("release", "is required")))?;
        check_release_name("release.name", &rel.name).map_err(status)?;
        check_text("release.description", &rel.description).map_err(status)?;
        if rel.revision < 0 {
            return Err(status(ConfigError::invalid("release.revision", "must not be negative")));
        }
        let created = self
            .config
            .create_release(&env, &rel.name, rel.revision, &rel.description, &who)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CreateReleaseResponse {
            release: Some(convert::release(&created)),
        }))
    }

    async fn get_release(
        &self,
        request: Request<pb::GetReleaseRequest>,
    ) -> Result<Response<pb::GetReleaseResponse>, Status> {
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        if r.release != crate::model::LATEST_RELEASE {
            check_release_name("release", &r.release).map_err(status)?;
        }
        let rel = self.config.release(&env, &r.release).await.map_err(status)?;
        Ok(Response::new(pb::GetReleaseResponse {
            release: Some(convert::release(&rel)),
        }))
    }

    async fn list_releases(
        &self,
        request: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        let size = page_size("page_size", r.page_size, 50).map_err(status)?;
        let before = decode_release_token(&r.page_token).map_err(status)?;
        let mut list = self
            .config
            .releases(&env, before, i64::try_from(size + 1).unwrap_or(i64::MAX))
            .await
            .map_err(status)?;
        let more = list.len() > size;
        list.truncate(size);
        let next_page_token = match (more, list.last()) {
            (true, Some(last)) => plinth_runtime::wire::page_token(&format!("{}:{}", last.created_at, last.name)),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListReleasesResponse {
            releases: list.iter().map(convert::release).collect(),
            next_page_token,
        }))
    }

    async fn start_rollout(
        &self,
        request: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::StartRolloutResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        let rollout = r
            .rollout
            .ok_or_else(|| status(ConfigError::invalid("rollout", "is required")))?;
        if rollout.release != crate::model::LATEST_RELEASE {
            check_release_name("rollout.release", &rollout.release).map_err(status)?;
        }
        check_percentage("rollout.percentage", rollout.percentage).map_err(status)?;
        let labels = convert::labels("rollout.labels", &rollout.labels).map_err(status)?;
        let started = self
            .config
            .start_rollout(&env, &rollout.release, rollout.percentage, labels, &who)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::StartRolloutResponse {
            rollout: Some(convert::rollout(&started)),
        }))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::GetRolloutResponse>, Status> {
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        let (rollout, current_release) = self.config.rollout(&env).await.map_err(status)?;
        Ok(Response::new(pb::GetRolloutResponse {
            rollout: rollout.as_ref().map(convert::rollout),
            current_release,
        }))
    }

    async fn promote_rollout(
        &self,
        request: Request<pb::PromoteRolloutRequest>,
    ) -> Result<Response<pb::PromoteRolloutResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        check_percentage("percentage", r.percentage).map_err(status)?;
        let labels = if r.labels.is_empty() {
            None
        } else {
            Some(convert::labels("labels", &r.labels).map_err(status)?)
        };
        let promoted = self
            .config
            .promote_rollout(&env, r.percentage, labels, &who)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PromoteRolloutResponse {
            rollout: Some(convert::rollout(&promoted)),
        }))
    }

    async fn pause_rollout(
        &self,
        request: Request<pb::PauseRolloutRequest>,
    ) -> Result<Response<pb::PauseRolloutResponse>, Status> {
        let rollout = self
            .move_rollout(request, &[RolloutState::Active], RolloutState::Paused)
            .await?;
        Ok(Response::new(pb::PauseRolloutResponse { rollout }))
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::ResumeRolloutRequest>,
    ) -> Result<Response<pb::ResumeRolloutResponse>, Status> {
        let rollout = self
            .move_rollout(request, &[RolloutState::Paused], RolloutState::Active)
            .await?;
        Ok(Response::new(pb::ResumeRolloutResponse { rollout }))
    }

    async fn abort_rollout(
        &self,
        request: Request<pb::AbortRolloutRequest>,
    ) -> Result<Response<pb::AbortRolloutResponse>, Status> {
        let rollout = self
            .move_rollout(
                request,
                &[RolloutState::Active, RolloutState::Paused],
                RolloutState::Aborted,
            )
            .await?;
        Ok(Response::new(pb::AbortRolloutResponse { rollout }))
    }

    async fn resolve_release(
        &self,
        request: Request<pb::ResolveReleaseRequest>,
    ) -> Result<Response<pb::ResolveReleaseResponse>, Status> {
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        let client = r
            .client
            .as_ref()
            .ok_or_else(|| status(ConfigError::invalid("client.id", "is required")))?;
        let client = convert::client("client", client).map_err(status)?;
        let (release, in_rollout) = self.config.resolve(&env, &client).await.map_err(status)?;
        let revision = match &release {
            Some(name) => self.config.release(&env, name).await.map_err(status)?.revision,
            None => self.config.environment(&env).await.map_err(status)?.revision,
        };
        Ok(Response::new(pb::ResolveReleaseResponse {
            release: release.unwrap_or_default(),
            revision,
            in_rollout,
        }))
    }

    async fn set_schema(
        &self,
        request: Request<pb::SetSchemaRequest>,
    ) -> Result<Response<pb::SetSchemaResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        check_name("namespace", &r.namespace).map_err(status)?;
        let schema = r
            .schema
            .ok_or_else(|| status(ConfigError::invalid("schema", "is required")))?;
        let prefix = convert::prefix("schema.prefix", &schema.prefix).map_err(status)?;
        let json = schema
            .json_schema
            .as_ref()
            .ok_or_else(|| status(ConfigError::invalid("schema.json_schema", "is required")))?;
        let text = convert::struct_json(json, "schema.json_schema").map_err(status)?;
        let at = self
            .config
            .set_schema(&r.namespace, &prefix, &text, &who)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SetSchemaResponse {
            schema: Some(pb::Schema {
                prefix,
                json_schema: Some(json.clone()),
                updated_by: who.subject,
                update_time: Some(convert::timestamp(at)),
            }),
        }))
    }

    async fn list_schemas(
        &self,
        request: Request<pb::ListSchemasRequest>,
    ) -> Result<Response<pb::ListSchemasResponse>, Status> {
        let r = request.into_inner();
        check_name("namespace", &r.namespace).map_err(status)?;
        let list = self.config.schemas(&r.namespace).await.map_err(status)?;
        Ok(Response::new(pb::ListSchemasResponse {
            schemas: list
                .into_iter()
                .map(|(prefix, text, updated_by, at)| pb::Schema {
                    prefix,
                    json_schema: convert::json_struct(&text),
                    updated_by,
                    update_time: Some(convert::timestamp(at)),
                })
                .collect(),
        }))
    }

    async fn delete_schema(
        &self,
        request: Request<pb::DeleteSchemaRequest>,
    ) -> Result<Response<pb::DeleteSchemaResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        check_name("namespace", &r.namespace).map_err(status)?;
        let prefix = convert::prefix("prefix", &r.prefix).map_err(status)?;
        self.config
            .delete_schema(&r.namespace, &prefix, &who)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteSchemaResponse {}))
    }

    async fn import_values(
        &self,
        request: Request<pb::ImportValuesRequest>,
    ) -> Result<Response<pb::ImportValuesResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        let format = convert::format(r.format).map_err(status)?;
        let committed = self
            .config
            .import(&env, format, &r.content, r.replace, r.as_secrets, &r.message, &who)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ImportValuesResponse {
            revision: committed.revision,
            change_count: committed
                .batch
                .as_ref()
                .map_or(0, |b| i32::try_from(b.events.len()).unwrap_or(i32::MAX)),
        }))
    }

    async fn export_values(
        &self,
        request: Request<pb::ExportValuesRequest>,
    ) -> Result<Response<pb::ExportValuesResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let env = env_id(&r.namespace, &r.environment).map_err(status)?;
        let format = convert::format(r.format).map_err(status)?;
        let at = convert::read_at(r.read_at.as_ref()).map_err(status)?;
        let prefix = convert::prefix("prefix", &r.prefix).map_err(status)?;
        Configuration::check_reveal(r.reveal_secrets, &who).map_err(status)?;
        // Every page reads the state the first one did.
        let mut at = self.config.concrete(&env, &at).await.map_err(status)?;
        if let ReadAt::Release(name) = &at
            && name == crate::model::LATEST_RELEASE
        {
            at = ReadAt::Release(self.config.release(&env, name).await.map_err(status)?.name);
        }
        let mut entries = Vec::new();
        let revision = loop {
            let after = entries
                .last()
                .map(|e: &std::sync::Arc<crate::model::Entry>| e.key.clone())
                .unwrap_or_default();
            let (page, revision) = self
                .config
                .list(&env, &at, &prefix, &after, 1000)
                .await
                .map_err(status)?;
            let done = page.len() < 1000;
            entries.extend(page);
            if done {
                break revision;
            }
            if let ReadAt::Head { .. } = at {
                at = ReadAt::Revision(revision);
            }
        };
        let revealed: Vec<String> = entries
            .iter()
            .filter(|e| r.reveal_secrets && e.value.is_secret())
            .map(|e| e.key.clone())
            .collect();
        let (content, omitted_secrets) = self
            .config
            .export(&env, format, entries, r.reveal_secrets)
            .map_err(status)?;
        if !revealed.is_empty() {
            self.config
                .record_reveal(&env, revealed, "ExportValues", &who)
                .await
                .map_err(status)?;
        }
        Ok(Response::new(pb::ExportValuesResponse {
            content,
            revision,
            omitted_secrets,
        }))
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        if r.key_id.is_empty() {
            return Err(status(ConfigError::invalid("key_id", "is required")));
        }
        let rewrapped = self.config.rotate_key(&r.key_id, &who).await.map_err(status)?;
        Ok(Response::new(pb::RotateKeyResponse {
            key_id: r.key_id,
            rewrapped,
        }))
    }
}

/// The environment a rollout request names.
trait RolloutTarget {
    fn target(&self) -> (&str, &str);
}

macro_rules! rollout_target {
    ($($t:ty),*) => {$(
        impl RolloutTarget for $t {
            fn target(&self) -> (&str, &str) {
                (&self.namespace, &self.environment)
            }
        }
    )*};
}

rollout_target!(
    pb::PauseRolloutRequest,
    pb::ResumeRolloutRequest,
    pb::AbortRolloutRequest
);

impl ConfigGrpc {
    /// Pause, resume and abort: the rollout moves from one of `from` to `to`.
    async fn move_rollout<R: RolloutTarget>(
        &self,
        request: Request<R>,
        from: &[RolloutState],
        to: RolloutState,
    ) -> Result<Option<pb::Rollout>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let (namespace, environment) = r.target();
        let env = env_id(namespace, environment).map_err(status)?;
        let rollout = self
            .config
            .set_rollout_state(&env, from, to, &who)
            .await
            .map_err(status)?;
        Ok(Some(convert::rollout(&rollout)))
    }
}

fn check_percentage(field: &str, percentage: i32) -> Result<(), ConfigError> {
    if (0..=100).contains(&percentage) {
        Ok(())
    } else {
        Err(ConfigError::invalid(field, "must be between 0 and 100"))
    }
}

fn check_mask(mask: Option<&prost_types::FieldMask>, resource: &str) -> Result<(), ConfigError> {
    for p in mask.map(|m| m.paths.as_slice()).unwrap_or_default() {
        if p != "description" {
            return Err(ConfigError::invalid(
                "update_mask",
                format!("only `description` of a {resource} can change, not `{p}`"),
            ));
        }
    }
    Ok(())
}

/// The text inside a page token (base64url), or the field named as bad.
fn token_text(field: &str, token: &str) -> Result<String, ConfigError> {
    Ok(plinth_runtime::wire::page_token_text(field, token)?)
}

fn decode_name_token(token: &str) -> Result<String, ConfigError> {
    if token.is_empty() {
        return Ok(String::new());
    }
    token_text("page_token", token)
}

fn next_name_token<T>(list: &mut Vec<T>, size: usize, name: impl Fn(&T) -> String) -> String {
    let more = list.len() > size;
    list.truncate(size);
    match (more, list.last()) {
        (true, Some(last)) => plinth_runtime::wire::page_token(&name(last)),
        _ => String::new(),
    }
}

fn decode_release_token(token: &str) -> Result<Option<(i64, String)>, ConfigError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || ConfigError::invalid("page_token", "is not a token from a previous page");
    let raw = token_text("page_token", token)?;
    let (at, name) = raw.split_once(':').ok_or_else(bad)?;
    Ok(Some((at.parse().map_err(|_| bad())?, name.to_owned())))
}

const WATCH_PATH: &str = "/plinth.config.v1.ConfigService/Watch";

/// The config service's gRPC routes: the generated server for every RPC
/// but `Watch`, which sends its messages as they were framed, once per
/// revision for all the watches that receive the same one (see the
/// `watch` module and `plinth_runtime::framed`). The wire is the same
/// either way. Neither route compresses or changes tonic's message size
/// limits; a setting added to one must be added to the other.
#[derive(Clone)]
pub struct ConfigServer {
    grpc: ConfigGrpc,
    generated: ConfigServiceServer<ConfigGrpc>,
}

impl ConfigServer {
    /// Serves `config`.
    pub fn new(config: Configuration) -> Self {
        let grpc = ConfigGrpc::new(config);
        Self {
            generated: ConfigServiceServer::new(grpc.clone()),
            grpc,
        }
    }
}

impl NamedService for ConfigServer {
    const NAME: &'static str = <ConfigServiceServer<ConfigGrpc> as NamedService>::NAME;
}

type RouteFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send + 'static>>;

impl tower::Service<http::Request<Body>> for ConfigServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> RouteFuture {
        if req.uri().path() != WATCH_PATH {
            return self.generated.call(req);
        }
        let grpc = self.grpc.clone();
        let codec = LeanCodec::<pb::WatchResponse, pb::WatchRequest>::default();
        Box::pin(async move { Ok(framed::server_streaming(codec, move |r| serve_watch(grpc, r), req).await) })
    }
}

/// `Watch` as [`ConfigServer`] serves it.
async fn serve_watch(grpc: ConfigGrpc, request: Request<pb::WatchRequest>) -> Result<Response<FrameStream>, Status> {
    let frames: FrameStream = Box::pin(grpc.watch_frames(request).await?);
    Ok(Response::new(frames))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use plinth::config::v1::config_service_client::ConfigServiceClient;

    use super::*;
    use crate::model::{Mutation, NewValue, Plain};

    #[test]
    fn the_encoded_route_is_the_contract_s_watch() {
        assert_eq!(
            WATCH_PATH,
            format!("/{}/Watch", <ConfigServiceServer<ConfigGrpc> as NamedService>::NAME)
        );
    }

    /// `ConfigServer` over a real connection: `Watch` through its own route
    /// sends what the generated trait's `watch` sends, live changes as well
    /// as the snapshot, refuses bad requests as every RPC does, and ends with
    /// the status in the trailers; the other RPCs reach the generated server.
    #[tokio::test]
    async fn config_server_serves_watch_and_the_other_rpcs() {
        let (t, config, env) = crate::watch::tests::configuration().await;
        let caller = Caller {
            subject: "t".into(),
            may_reveal: false,
        };
        let set = |value: &str| Mutation {
            key: "k".into(),
            value: Some(NewValue::Plain(Plain::String(value.into()))),
            precondition: Default::default(),
        };
        config
            .write(&env, vec![set("v")], "", "changes", &caller)
            .await
            .unwrap();
        let request = || pb::WatchRequest {
            namespace: "app".into(),
            environment: "prod".into(),
            prefix: String::new(),
            from_revision: 0,
            reveal_secrets: false,
        };
        let mut from_trait = ConfigService::watch(&ConfigGrpc::new(config.clone()), Request::new(request()))
            .await
            .unwrap()
            .into_inner();
        let from_trait = from_trait.next().await.unwrap().unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = futures::stream::unfold(listener, |l| async move {
            let accepted = l.accept().await.map(|(s, _)| s);
            Some((accepted, l))
        });
        let serve = tonic::transport::Server::builder()
            .add_service(ConfigServer::new(config.clone()))
            .serve_with_incoming(incoming);
        let calls = async {
            let mut client = ConfigServiceClient::connect(format!("http://{addr}")).await.unwrap();
            let got = client
                .get_environment(pb::GetEnvironmentRequest {
                    namespace: "app".into(),
                    environment: "prod".into(),
                })
                .await
                .unwrap()
                .into_inner();
            let mut watch = client.watch(request()).await.unwrap().into_inner();
            let first = watch.next().await.unwrap().unwrap();
            config
                .write(&env, vec![set("w")], "live", "changes", &caller)
                .await
                .unwrap();
            let live = watch.next().await.unwrap().unwrap();
            let missing = pb::WatchRequest {
                environment: "nowhere".into(),
                ..request()
            };
            let missing = client.watch(missing).await.unwrap_err();
            let negative = pb::WatchRequest {
                from_revision: -1,
                ..request()
            };
            let negative = client.watch(negative).await.unwrap_err();
            config.delete_environment(&env, 0, &caller).await.unwrap();
            let ended = loop {
                match watch.next().await {
                    Some(Ok(m)) => assert!(m.progress && m.events.is_empty(), "{m:?}"),
                    Some(Err(status)) => break status,
                    None => panic!("the watch ended without a status"),
                }
            };
            (got, first, live, missing, negative, ended)
        };
        let (environment, over_the_wire, live, missing, negative, ended) = tokio::select! {
            r = serve => panic!("the server stopped: {r:?}"),
            got = calls => got,
        };
        assert_eq!(environment.environment.map(|e| e.revision), Some(1));
        assert_eq!(over_the_wire, from_trait);
        assert!(over_the_wire.snapshot && over_the_wire.snapshot_complete);
        assert_eq!(over_the_wire.events.len(), 1);
        assert_eq!(
            (live.revision, live.message.as_str(), live.events.len()),
            (2, "live", 1)
        );
        let value = live.events[0].value.as_ref().and_then(|v| v.value.as_ref());
        assert_eq!(
            value.and_then(|v| v.kind.clone()),
            Some(pb::value::Kind::StringValue("w".into()))
        );
        assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
        assert!(missing.message().contains("nowhere"), "{missing:?}");
        assert_eq!(negative.code(), tonic::Code::InvalidArgument, "{negative:?}");
        assert!(negative.message().contains("from_revision"), "{negative:?}");
        assert_eq!(ended.code(), tonic::Code::NotFound, "{ended:?}");
        t.cleanup().await.unwrap();
    }
}
