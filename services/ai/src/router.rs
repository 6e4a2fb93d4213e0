//! Logical models → provider targets. A route lists targets in tiers; the
//! attempt order is tier by tier, and within a tier a weighted random
//! order, so equal tiers share load by weight and later tiers are
//! fallbacks. Each provider model has one circuit breaker and one
//! `Retry-After` cool-down, shared by every route that uses it; a target
//! that is open or cooling down is skipped without a call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use plinth_runtime::config::AiSettings;
use plinth_runtime::resilience::{BreakerConfig, BreakerState, CircuitBreaker};
use plinth_runtime::secrets::{SecretRef, SecretSource};
use rand::Rng;
use secrecy::SecretString;

use crate::error::AiError;
use crate::limits::Limit;
use crate::providers::{self, ApiKey, Endpoint, Provider, ProviderKind};

/// One provider model of a route.
#[derive(Debug)]
pub struct Target {
    /// The provider's configured name.
    pub provider: String,
    /// Its wire format.
    pub kind: ProviderKind,
    /// The provider's model.
    pub model: String,
    /// Tier (lower first).
    pub tier: u32,
    /// Weight within its tier.
    pub weight: u32,
    /// The adapter.
    pub adapter: Arc<dyn Provider>,
    /// Its rate limit, shared by every route that uses it.
    pub limit: Option<Limit>,
    health: Arc<Health>,
}

/// A provider model's health, shared by every route that uses it: one
/// upstream, one breaker.
struct Health {
    breaker: CircuitBreaker,
    cool_until: Mutex<Option<Instant>>,
}

/// Why a target was not called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Its breaker is open.
    Open(Duration),
    /// It asked to be left alone (`Retry-After`).
    CoolingDown(Duration),
}

impl Skip {
    /// When it may be tried again.
    pub fn retry_after(self) -> Duration {
        match self {
            Skip::Open(d) | Skip::CoolingDown(d) => d,
        }
    }
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("breaker", &self.breaker.state())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::Open(d) => write!(f, "circuit open for another {:.1}s", d.as_secs_f64()),
            Skip::CoolingDown(d) => write!(f, "cooling down after Retry-After for another {:.1}s", d.as_secs_f64()),
        }
    }
}

impl Target {
    /// `provider/model`, for logs and fallback paths.
    pub fn label(&self) -> String {
        format!("{}/{}", self.provider, self.model)
    }

    /// Takes a call slot, or says why the target must be skipped.
    pub fn admit(&self) -> Result<(), Skip> {
        if let Some(left) = self.cooling_down() {
            return Err(Skip::CoolingDown(left));
        }
        self.health
            .breaker
            .acquire()
            .map_err(|open| Skip::Open(open.retry_after))
    }

    /// Reports the outcome of an admitted call: `healthy` is false only for
    /// failures that say something about the target (5xx, 429, timeouts).
    pub fn report(&self, healthy: bool, retry_after: Option<Duration>) {
        self.health.breaker.record(healthy);
        if let Some(d) = retry_after.filter(|d| !d.is_zero()) {
            let until = Instant::now() + d.min(Duration::from_secs(3600));
            *self.health.cool_until.lock().unwrap_or_else(PoisonError::into_inner) = Some(until);
        }
    }

    /// Gives back an admitted call's slot without an outcome (see
    /// [`ProviderError::already_reported`](crate::providers::ProviderError::already_reported)).
    pub fn release(&self) {
        self.health.breaker.forgo();
    }

    /// How long the target is still left alone after a `Retry-After`.
    pub fn cooling_down(&self) -> Option<Duration> {
        let until = (*self.health.cool_until.lock().unwrap_or_else(PoisonError::into_inner))?;
        until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
    }

    /// The breaker's state.
    pub fn breaker_state(&self) -> BreakerState {
        self.health.breaker.state()
    }
}

/// A logical model.
#[derive(Debug)]
pub struct Route {
    /// Its name.
    pub name: String,
    /// Its targets in configured order.
    pub targets: Vec<Arc<Target>>,
}

impl Route {
    /// The order to try targets in for one call.
    pub fn plan(&self) -> Vec<Arc<Target>> {
        let mut rng = rand::rng();
        // Efraimidis–Spirakis: sorting by u^(1/w) descending is a weighted
        // random permutation; tier dominates the key.
        let mut keyed: Vec<(u32, f64, Arc<Target>)> = self
            .targets
            .iter()
            .map(|t| {
                let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
                (t.tier, u.powf(1.0 / f64::from(t.weight.max(1))), t.clone())
            })
            .collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
        keyed.into_iter().map(|(_, _, t)| t).collect()
    }
}

/// Every route.
#[derive(Debug, Default)]
pub struct Router {
    routes: HashMap<String, Route>,
    names: Vec<String>,
}

impl Router {
    /// Builds adapters, breakers and routes from the settings, refusing
    /// unknown provider kinds, targets naming unknown providers, and
    /// models without targets. Keys given as `api_key_secret` are read
    /// from `secrets`.
    pub fn from_settings(
        settings: &AiSettings,
        client: reqwest::Client,
        secrets: Option<&Arc<dyn SecretSource>>,
    ) -> Result<Self, AiError> {
        let timeout = Duration::from_millis(settings.timeout_ms.max(1));
        let mut adapters: HashMap<&str, (ProviderKind, Arc<dyn Provider>)> = HashMap::new();
        for (name, p) in &settings.providers {
            let kind = ProviderKind::parse(&p.kind).ok_or_else(|| {
                AiError::Config(format!(
                    "provider {name:?}: unknown kind {:?} (openai, azure, anthropic, gemini or custom)",
                    p.kind
                ))
            })?;
            let base_url = p
                .base_url
                .clone()
                .or_else(|| kind.default_base_url().map(str::to_owned))
                .ok_or_else(|| AiError::Config(format!("provider {name:?}: base_url is required for {}", p.kind)))?;
            if p.kind == "custom" && p.base_url.is_none() {
                return Err(AiError::Config(format!(
                    "provider {name:?}: base_url is required for custom"
                )));
            }
            let api_key = match (&p.api_key, &p.api_key_file, &p.api_key_secret) {
                (Some(k), None, None) => ApiKey::Fixed(k.clone()),
                (None, Some(path), None) => {
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        AiError::Config(format!("provider {name:?}: cannot read {}: {e}", path.display()))
                    })?;
                    ApiKey::Fixed(SecretString::from(text.trim().to_owned()))
                }
                (None, None, Some(address)) => {
                    let at = SecretRef::parse(address)
                        .map_err(|e| AiError::Config(format!("provider {name:?}: api_key_secret: {e}")))?;
                    let source = secrets.cloned().ok_or_else(|| {
                        AiError::Config(format!(
                            "provider {name:?}: api_key_secret needs the config component in this process or PLINTH_AI__SECRETS_URL"
                        ))
                    })?;
                    ApiKey::Secret { at, source }
                }
                (None, None, None) => ApiKey::None,
                _ => {
                    return Err(AiError::Config(format!(
                        "provider {name:?}: give at most one of api_key, api_key_file and api_key_secret"
                    )));
                }
            };
            let endpoint = Endpoint {
                base_url,
                api_key,
                api_version: p.api_version.clone(),
                timeout,
                client: client.clone(),
            };
            adapters.insert(name.as_str(), (kind, Arc::from(providers::adapter(kind, endpoint))));
        }
        let breaker = BreakerConfig {
            failure_threshold: settings.breaker_failures.max(1),
            open_for: Duration::from_secs(settings.breaker_open_secs),
            half_open_calls: 1,
        };
        let mut router = Router::default();
        let mut health: HashMap<String, Arc<Health>> = HashMap::new();
        for m in &settings.models {
            if m.targets.is_empty() {
                return Err(AiError::Config(format!("model {:?} has no targets", m.name)));
            }
            if router.routes.contains_key(&m.name) {
                return Err(AiError::Config(format!("model {:?} is configured twice", m.name)));
            }
            let mut targets = Vec::new();
            for (position, t) in m.targets.iter().enumerate() {
                let (kind, adapter) = adapters.get(t.provider.as_str()).ok_or_else(|| {
                    AiError::Config(format!(
                        "model {:?}: target provider {:?} is not among the configured providers",
                        m.name, t.provider
                    ))
                })?;
                let label = format!("{}/{}", t.provider, t.model);
                let health = health
                    .entry(label.clone())
                    .or_insert_with(|| {
                        Arc::new(Health {
                            breaker: CircuitBreaker::new(format!("ai:{label}"), breaker),
                            cool_until: Mutex::new(None),
                        })
                    })
                    .clone();
                targets.push(Arc::new(Target {
                    provider: t.provider.clone(),
                    kind: *kind,
                    model: t.model.clone(),
                    tier: t.tier.unwrap_or(u32::try_from(position).unwrap_or(u32::MAX)),
                    weight: t.weight.unwrap_or(1),
                    adapter: adapter.clone(),
                    limit: (t.requests_per_minute.is_some() || t.tokens_per_minute.is_some()).then(|| Limit {
                        scope: format!("target {label}"),
                        requests_per_minute: t.requests_per_minute.unwrap_or(0),
                        tokens_per_minute: t.tokens_per_minute.unwrap_or(0),
                    }),
                    health,
                }));
            }
            router.names.push(m.name.clone());
            router.routes.insert(
                m.name.clone(),
                Route {
                    name: m.name.clone(),
                    targets,
                },
            );
        }
        router.names.sort();
        Ok(router)
    }

    /// The route of `model`.
    pub fn route(&self, model: &str) -> Result<&Route, AiError> {
        self.routes
            .get(model)
            .ok_or_else(|| AiError::UnknownModel(model.to_owned()))
    }

    /// Every route, by name.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.names.iter().filter_map(|n| self.routes.get(n))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use plinth_runtime::config::{AiProvider, AiSettings};
    use plinth_runtime::secrets::{SecretRef, SecretSource};
    use secrecy::SecretString;

    use super::Router;

    struct NoSecrets;

    impl SecretSource for NoSecrets {
        fn secret(&self, _: &SecretRef) -> Option<SecretString> {
            None
        }
    }

    fn refusal(p: AiProvider, secrets: Option<&Arc<dyn SecretSource>>) -> Option<String> {
        let settings = AiSettings {
            providers: BTreeMap::from([("main".to_owned(), p)]),
            ..AiSettings::default()
        };
        Router::from_settings(&settings, reqwest::Client::new(), secrets)
            .err()
            .map(|e| e.to_string())
    }

    #[test]
    fn a_key_secret_needs_a_secret_source_a_full_address_and_no_second_key() {
        let provider = |key: Option<&str>, secret: Option<&str>| AiProvider {
            kind: "openai".into(),
            base_url: None,
            api_key: key.map(SecretString::from),
            api_key_file: None,
            api_key_secret: secret.map(str::to_owned),
            api_version: None,
        };
        let source: Arc<dyn SecretSource> = Arc::new(NoSecrets);
        assert_eq!(refusal(provider(None, Some("ai/prod/openai")), Some(&source)), None);
        let alone = refusal(provider(None, Some("ai/prod/openai")), None).unwrap_or_default();
        assert!(alone.contains("needs the config component"), "{alone}");
        let partial = refusal(provider(None, Some("ai/openai")), Some(&source)).unwrap_or_default();
        assert!(
            partial.contains("api_key_secret") && partial.contains("namespace/environment/key"),
            "{partial}"
        );
        let both = refusal(provider(Some("sk"), Some("ai/prod/openai")), Some(&source)).unwrap_or_default();
        assert!(both.contains("at most one of"), "{both}");
    }
}
