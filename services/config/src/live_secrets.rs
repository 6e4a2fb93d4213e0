//! Secrets another component of this process reads (the ai service's
//! provider keys), kept as a decrypted copy that follows each environment's
//! feed: a `SetValue` applies to the reader's next request, with no restart
//! and no lookup in the request's path. Every time a changed value is
//! opened it is recorded as a reveal, like a `GetValue` that reveals it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use plinth_runtime::error::chain;
use plinth_runtime::secrets::{OPEN_RETRY, SecretRef, SecretSource};
use plinth_runtime::tasks::pause;
use secrecy::SecretString;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::feed::{Head, Update};
use crate::model::{Entry, EnvId};
use crate::service::{Caller, Configuration};

/// One opened value and the stored entry it came from.
struct Opened {
    entry: Arc<Entry>,
    text: SecretString,
}

/// A live, decrypted copy of the secrets one component asked for.
pub struct LiveSecrets {
    config: Configuration,
    reader: Caller,
    wanted: BTreeMap<EnvId, BTreeSet<String>>,
    values: RwLock<HashMap<SecretRef, Opened>>,
}

impl std::fmt::Debug for LiveSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSecrets")
            .field("reader", &self.reader.subject)
            .field("wanted", &self.wanted)
            .finish_non_exhaustive()
    }
}

impl LiveSecrets {
    /// A copy of `wanted` for the component `reader` (recorded as the
    /// subject of each reveal); empty until [`LiveSecrets::follow`] runs.
    pub fn new(config: Configuration, reader: &str, wanted: impl IntoIterator<Item = SecretRef>) -> Self {
        let mut by_env: BTreeMap<EnvId, BTreeSet<String>> = BTreeMap::new();
        for at in wanted {
            by_env
                .entry(EnvId::new(at.namespace, at.environment))
                .or_default()
                .insert(at.key);
        }
        Self {
            config,
            reader: Caller {
                subject: format!("component:{reader}"),
                may_reveal: true,
            },
            wanted: by_env,
            values: RwLock::new(HashMap::new()),
        }
    }

    /// Keeps the copy current until `token` is cancelled.
    pub async fn follow(self: Arc<Self>, token: CancellationToken) -> Result<(), crate::ConfigError> {
        let each = self.wanted.keys().map(|env| self.follow_env(env, &token));
        futures::future::join_all(each).await;
        Ok(())
    }

    async fn follow_env(&self, env: &EnvId, token: &CancellationToken) {
        let mut attempt = 0u32;
        loop {
            match self.config.hub().feed(env).await {
                Ok(feed) => {
                    attempt = 0;
                    let (mut updates, entries) = feed.subscribe(|h| self.pick(env, Some(h)));
                    self.refresh(env, entries).await;
                    loop {
                        let update = tokio::select! {
                            () = token.cancelled() => return,
                            u = updates.recv() => u,
                        };
                        match update {
                            Ok(u) if matches!(*u, Update::Gone) => break,
                            Ok(_) | Err(RecvError::Lagged(_)) => {
                                let entries = feed.read(|h| self.pick(env, Some(h)));
                                self.refresh(env, entries).await;
                            }
                            Err(RecvError::Closed) => break,
                        }
                    }
                    // The environment was deleted: its values are no longer there to use.
                    self.refresh(env, self.pick(env, None)).await;
                }
                Err(e) => {
                    let wait = OPEN_RETRY.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(
                        environment = %env,
                        error = %chain(&e),
                        retry_in_ms = wait.as_millis() as u64,
                        reader = %self.reader.subject,
                        "cannot read the secrets another component needs; retrying"
                    );
                    if !pause(token, wait).await {
                        return;
                    }
                }
            }
        }
    }

    /// The wanted keys of `env` and their entries in `head` (none without one).
    fn pick(&self, env: &EnvId, head: Option<&Head>) -> Vec<(String, Option<Arc<Entry>>)> {
        self.wanted
            .get(env)
            .into_iter()
            .flatten()
            .map(|k| (k.clone(), head.and_then(|h| h.entries.get(k).cloned())))
            .collect()
    }

    /// Opens the entries that changed since they were last opened, drops
    /// the ones that are gone, and records the reveals.
    async fn refresh(&self, env: &EnvId, entries: Vec<(String, Option<Arc<Entry>>)>) {
        let mut opened = Vec::new();
        let mut gone = Vec::new();
        for (key, entry) in entries {
            let at = SecretRef {
                namespace: env.namespace.clone(),
                environment: env.environment.clone(),
                key: key.clone(),
            };
            let Some(entry) = entry.filter(|e| e.value.is_secret()) else {
                gone.push(at);
                continue;
            };
            let unchanged = self.read(|v| v.get(&at).is_some_and(|o| Arc::ptr_eq(&o.entry, &entry)));
            if unchanged {
                continue;
            }
            match self.config.show(env, entry.clone(), true) {
                Ok(shown) => {
                    if let Some(text) = shown.secret {
                        opened.push((
                            at,
                            Opened {
                                entry,
                                text: SecretString::from(text),
                            },
                        ));
                    }
                }
                Err(e) => {
                    tracing::error!(secret = %at, error = %chain(&e), "cannot open a secret another component reads");
                    gone.push(at);
                }
            }
        }
        let revealed: Vec<String> = opened.iter().map(|(at, _)| at.key.clone()).collect();
        {
            let mut values = match self.values.write() {
                Ok(v) => v,
                Err(p) => p.into_inner(),
            };
            for at in &gone {
                values.remove(at);
            }
            values.extend(opened);
        }
        if !revealed.is_empty()
            && let Err(e) = self.config.record_reveal(env, revealed, "follow", &self.reader).await
        {
            tracing::warn!(environment = %env, error = %chain(&e), "cannot record a secret reveal");
        }
    }

    fn read<T>(&self, f: impl FnOnce(&HashMap<SecretRef, Opened>) -> T) -> T {
        match self.values.read() {
            Ok(v) => f(&v),
            Err(p) => f(&p.into_inner()),
        }
    }
}

impl SecretSource for LiveSecrets {
    fn secret(&self, at: &SecretRef) -> Option<SecretString> {
        self.read(|v| v.get(at).map(|o| o.text.clone()))
    }
}
