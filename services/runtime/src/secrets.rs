//! Credentials a component takes from the config service's secrets rather
//! than from its own settings, so an operator rotates them in one place
//! (`SetValue`) and every replica picks the new value up without a restart.
//! Components ask a [`SecretSource`], which answers from a live local copy
//! and never waits on the network in a request's path.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use plinth::config::ConfigClient;
use plinth::config::v1::value::Kind;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use crate::resilience::Backoff;
use crate::tasks::pause;

/// Where a secret lives: `namespace/environment/key` (the key may itself
/// contain `/`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretRef {
    /// The config namespace.
    pub namespace: String,
    /// The environment.
    pub environment: String,
    /// The key.
    pub key: String,
}

impl SecretRef {
    /// Parses `namespace/environment/key`, naming what is missing.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.splitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(ns), Some(env), Some(key)) if !ns.is_empty() && !env.is_empty() && !key.is_empty() => Ok(Self {
                namespace: ns.to_owned(),
                environment: env.to_owned(),
                key: key.to_owned(),
            }),
            _ => Err(format!(
                "{text:?} is not a config secret address: expected namespace/environment/key"
            )),
        }
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.environment, self.key)
    }
}

/// Answers secrets from a copy kept current in the background.
pub trait SecretSource: Send + Sync {
    /// The secret's current text; `None` while it is not known (not loaded
    /// yet, not set, or stored as a plain value rather than a secret).
    fn secret(&self, at: &SecretRef) -> Option<SecretString>;
}

/// Where a component in another process than the config service gets the
/// credential it reads secrets with (an API key holding
/// `config.secrets.read`): asked again before every call, so a rotated key
/// file is picked up.
pub type Credential = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Waits between attempts to open an environment that is missing or
/// unreadable (a component starting before its secrets exist).
pub const OPEN_RETRY: Backoff = Backoff {
    initial: Duration::from_millis(200),
    max: Duration::from_secs(5),
};

/// Secrets read from a config service in another process: one live copy
/// (`Watch` with `reveal_secrets`) per environment, kept current by
/// [`plinth::config::ConfigClient`] across disconnects.
#[derive(Default)]
pub struct RemoteSecrets {
    /// By namespace, then environment.
    copies: RwLock<HashMap<String, HashMap<String, ConfigClient>>>,
}

impl fmt::Debug for RemoteSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteSecrets").finish_non_exhaustive()
    }
}

/// The credential from an inline API key, or from a file reread before
/// every call.
pub fn credential(key: Option<SecretString>, file: Option<std::path::PathBuf>) -> Credential {
    Arc::new(move || match (&key, &file) {
        (Some(key), _) => Some(key.expose_secret().to_owned()),
        (None, Some(path)) => std::fs::read_to_string(path).ok().map(|k| k.trim().to_owned()),
        (None, None) => None,
    })
}

impl RemoteSecrets {
    /// A channel to the config service at `url`, dialled on first use.
    /// No request timeout: the watch streams it carries are long-lived.
    pub fn dial(url: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        Ok(tonic::transport::Endpoint::from_shared(url.to_owned())?
            .connect_timeout(Duration::from_secs(3))
            .connect_lazy())
    }

    /// Follows the environments of `wanted` over `channel` until `token`
    /// is cancelled, retrying an environment that cannot be opened yet.
    pub async fn follow(
        self: Arc<Self>,
        channel: tonic::transport::Channel,
        credential: Credential,
        wanted: Vec<SecretRef>,
        token: CancellationToken,
    ) -> Result<(), std::convert::Infallible> {
        let envs: BTreeSet<(String, String)> = wanted.into_iter().map(|at| (at.namespace, at.environment)).collect();
        let each = envs.into_iter().map(|(namespace, environment)| {
            let (this, channel, credential, token) = (self.clone(), channel.clone(), credential.clone(), token.clone());
            async move {
                for attempt in 0u32.. {
                    let credential = credential.clone();
                    let started = ConfigClient::builder(channel.clone(), namespace.clone(), environment.clone())
                        .reveal_secrets(true)
                        .bearer_from(move || credential())
                        .start()
                        .await;
                    match started {
                        Ok((client, keep_current)) => {
                            this.copies
                                .write()
                                .unwrap_or_else(PoisonError::into_inner)
                                .entry(namespace.clone())
                                .or_default()
                                .insert(environment.clone(), client);
                            tokio::select! {
                                () = token.cancelled() => return,
                                () = keep_current => return,
                            }
                        }
                        Err(status) => {
                            let wait = OPEN_RETRY.delay(attempt);
                            tracing::warn!(
                                namespace = %namespace,
                                environment = %environment,
                                code = ?status.code(),
                                error = status.message(),
                                retry_in_ms = wait.as_millis() as u64,
                                "cannot read secrets from the config service; retrying"
                            );
                            if !pause(&token, wait).await {
                                return;
                            }
                        }
                    }
                }
            }
        });
        futures::future::join_all(each).await;
        Ok(())
    }
}

impl SecretSource for RemoteSecrets {
    fn secret(&self, at: &SecretRef) -> Option<SecretString> {
        let snapshot = self
            .copies
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&at.namespace)?
            .get(&at.environment)?
            .snapshot();
        match snapshot.values.get(&at.key)?.value.as_ref()?.kind.as_ref()? {
            Kind::SecretValue(text) if !text.is_empty() => Some(SecretString::from(text.as_str())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SecretRef;

    #[test]
    fn addresses_split_into_namespace_environment_and_a_key_that_may_hold_slashes() {
        let r = SecretRef::parse("ai/prod/providers/openai").expect("valid");
        assert_eq!(
            (r.namespace.as_str(), r.environment.as_str(), r.key.as_str()),
            ("ai", "prod", "providers/openai")
        );
        assert_eq!(r.to_string(), "ai/prod/providers/openai");
        for bad in ["", "ai", "ai/prod", "ai/prod/", "/prod/key", "ai//key"] {
            let err = SecretRef::parse(bad).expect_err(bad);
            assert!(err.contains("namespace/environment/key"), "{err}");
        }
    }
}
