//! Typed helpers for the config service in tests: an admin session, fresh
//! namespaces and environments, and short ways to set and read values.

use std::convert::Infallible;

use plinth::config::ConfigClient;
use plinth::config::v1::config_service_client::ConfigServiceClient;
use plinth::config::v1::value::Kind;
use plinth::config::v1::{self as pb};
use plinth_runtime::Tasks;
use tonic::transport::Channel;

use crate::{ADMIN_EMAIL, ADMIN_PASSWORD, TestApp, access_token, unique, with_bearer};

/// A config client signed in as someone, with an environment to work in.
pub struct ConfigSession {
    /// The gRPC client.
    pub client: ConfigServiceClient<Channel>,
    /// The caller's access token.
    pub token: String,
    /// The namespace of [`ConfigSession::fresh_env`].
    pub namespace: String,
    /// The environment of [`ConfigSession::fresh_env`].
    pub environment: String,
}

/// A name no other test uses, valid as a namespace or environment.
pub fn fresh_name(label: &str) -> String {
    format!("{label}-{}", unique().replace('_', "-"))
}

/// A string value.
pub fn text(s: &str) -> pb::Value {
    pb::Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

/// A number value.
pub fn number(n: f64) -> pb::Value {
    pb::Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

/// A secret value.
pub fn secret(s: &str) -> pb::Value {
    pb::Value {
        kind: Some(Kind::SecretValue(s.into())),
    }
}

/// The text of a string or secret value ("" otherwise).
pub fn text_of(kv: &pb::KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(s) | Kind::SecretValue(s)) => s.clone(),
        Some(Kind::NumberValue(n)) => n.to_string(),
        Some(Kind::BoolValue(b)) => b.to_string(),
        _ => String::new(),
    }
}

impl ConfigSession {
    /// Signs in as the bootstrap administrator (the app needs [`crate::with_admin`])
    /// and creates a fresh namespace with environment `prod`.
    pub async fn admin(app: &TestApp) -> anyhow::Result<Self> {
        let mut auth = app.auth().await?;
        let token = access_token(&mut auth, ADMIN_EMAIL, ADMIN_PASSWORD).await?;
        let mut s = Self::with_token(app, &token).await?;
        s.fresh_env().await?;
        Ok(s)
    }

    /// A session with `token`, no environment yet.
    pub async fn with_token(app: &TestApp, token: &str) -> anyhow::Result<Self> {
        Ok(Self::with_token_on(app.channel().await?, token))
    }

    /// A session with `token` over `channel`, no environment yet.
    pub fn with_token_on(channel: Channel, token: &str) -> Self {
        Self {
            client: ConfigServiceClient::new(channel),
            token: token.to_owned(),
            namespace: String::new(),
            environment: String::new(),
        }
    }

    /// Another session on `app` with the same token, namespace and environment.
    pub async fn clone_session(&self, app: &TestApp) -> anyhow::Result<Self> {
        let mut other = Self::with_token(app, &self.token).await?;
        other.namespace = self.namespace.clone();
        other.environment = self.environment.clone();
        Ok(other)
    }

    /// `message` with this session's token.
    pub fn req<T>(&self, message: T) -> tonic::Request<T> {
        with_bearer(message, &self.token)
    }

    /// Creates a fresh namespace with environment `prod` and works in it.
    pub async fn fresh_env(&mut self) -> anyhow::Result<()> {
        self.create_env(&fresh_name("app")).await
    }

    /// Creates namespace `namespace` with environment `prod` and works in it.
    pub async fn create_env(&mut self, namespace: &str) -> anyhow::Result<()> {
        let namespace = namespace.to_owned();
        self.client
            .create_namespace(self.req(pb::CreateNamespaceRequest {
                namespace: Some(pb::Namespace {
                    name: namespace.clone(),
                    description: "a test application".into(),
                    ..Default::default()
                }),
            }))
            .await?;
        self.client
            .create_environment(self.req(pb::CreateEnvironmentRequest {
                namespace: namespace.clone(),
                environment: Some(pb::Environment {
                    name: "prod".into(),
                    ..Default::default()
                }),
            }))
            .await?;
        self.namespace = namespace;
        self.environment = "prod".into();
        Ok(())
    }

    /// Sets `key` unconditionally; returns the new revision.
    pub async fn set(&mut self, key: &str, value: pb::Value) -> Result<i64, tonic::Status> {
        self.set_if(key, value, None).await.map(|r| r.revision)
    }

    /// Sets `key` under `precondition`.
    pub async fn set_if(
        &mut self,
        key: &str,
        value: pb::Value,
        precondition: Option<pb::Precondition>,
    ) -> Result<pb::SetValueResponse, tonic::Status> {
        let req = self.req(pb::SetValueRequest {
            namespace: self.namespace.clone(),
            environment: self.environment.clone(),
            key: key.into(),
            value: Some(value),
            precondition,
            message: format!("set {key}"),
        });
        Ok(self.client.set_value(req).await?.into_inner())
    }

    /// Deletes `key`; returns the new revision.
    pub async fn delete(&mut self, key: &str) -> Result<i64, tonic::Status> {
        let req = self.req(pb::DeleteValueRequest {
            namespace: self.namespace.clone(),
            environment: self.environment.clone(),
            key: key.into(),
            precondition: None,
            message: format!("delete {key}"),
        });
        Ok(self.client.delete_value(req).await?.into_inner().revision)
    }

    /// Reads `key` at `read_at` (head when `None`).
    pub async fn get_at(
        &mut self,
        key: &str,
        read_at: Option<pb::ReadAt>,
        reveal: bool,
    ) -> Result<pb::GetValueResponse, tonic::Status> {
        let req = self.req(pb::GetValueRequest {
            namespace: self.namespace.clone(),
            environment: self.environment.clone(),
            key: key.into(),
            read_at,
            reveal_secrets: reveal,
        });
        Ok(self.client.get_value(req).await?.into_inner())
    }

    /// The text of `key` at the head.
    pub async fn get(&mut self, key: &str) -> Result<String, tonic::Status> {
        Ok(self
            .get_at(key, None, false)
            .await?
            .value
            .map(|kv| text_of(&kv))
            .unwrap_or_default())
    }

    /// Every key at `read_at` as (key, text) pairs.
    pub async fn list(&mut self, read_at: Option<pb::ReadAt>) -> Result<Vec<(String, String)>, tonic::Status> {
        let req = self.req(pb::ListValuesRequest {
            namespace: self.namespace.clone(),
            environment: self.environment.clone(),
            read_at,
            page_size: 1000,
            ..Default::default()
        });
        Ok(self
            .client
            .list_values(req)
            .await?
            .into_inner()
            .values
            .iter()
            .map(|kv| (kv.key.clone(), text_of(kv)))
            .collect())
    }

    /// Opens a watch from `from_revision` under `prefix`.
    pub async fn watch(
        &mut self,
        prefix: &str,
        from_revision: i64,
    ) -> Result<tonic::Streaming<pb::WatchResponse>, tonic::Status> {
        let req = self.req(pb::WatchRequest {
            namespace: self.namespace.clone(),
            environment: self.environment.clone(),
            prefix: prefix.into(),
            from_revision,
            reveal_secrets: false,
        });
        Ok(self.client.watch(req).await?.into_inner())
    }
}

/// A read of revision `revision`.
pub fn at_revision(revision: i64) -> Option<pb::ReadAt> {
    Some(pb::ReadAt {
        revision,
        ..Default::default()
    })
}

/// A read of release `name`.
pub fn at_release(name: &str) -> Option<pb::ReadAt> {
    Some(pb::ReadAt {
        release: name.into(),
        ..Default::default()
    })
}

/// A Rust `ConfigClient` following `namespace`/`environment` through
/// `channel` as the holder of `token`; its watch runs on the returned tasks.
pub async fn follow(
    channel: Channel,
    namespace: &str,
    environment: &str,
    token: &str,
) -> Result<(ConfigClient, Tasks), tonic::Status> {
    let (client, follow) = ConfigClient::builder(channel, namespace, environment)
        .bearer(token)
        .start()
        .await?;
    let tasks = Tasks::new();
    tasks.spawn("config-client", async move {
        follow.await;
        Ok::<(), Infallible>(())
    });
    Ok((client, tasks))
}
