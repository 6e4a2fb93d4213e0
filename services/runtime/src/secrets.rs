//! Credentials a component takes from the config service's secrets rather
//! than from its own settings, so an operator rotates them in one place
//! (`SetValue`) and every replica picks the new value up without a restart.
//! Components ask a [`SecretSource`], which answers from a live local copy
//! and never waits on the network in a request's path.

use std::fmt;

use secrecy::SecretString;

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
