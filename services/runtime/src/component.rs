//! The components `plinthd` can run, and the set chosen with `--only`.
//! Only names and parsing live here; wiring is `plinthd`'s job.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The component a service belongs to: the package segment after the first
/// (`plinth.auth.v1.AuthService` → `auth`).
pub fn component_of(service: &str) -> &str {
    service.split('.').nth(1).unwrap_or(service)
}

/// One deployable part of Plinth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// The HTTP/JSON edge.
    Gateway,
    /// Versioned configuration.
    Config,
    /// Durable job queue.
    Queue,
    /// Tamper-evident audit log.
    Audit,
    /// One API over LLM providers.
    Ai,
    /// Identities, tokens and permissions.
    Auth,
}

impl Component {
    /// Every component, in start-up order (auth first: others verify its tokens).
    pub const ALL: [Component; 6] = [
        Component::Auth,
        Component::Config,
        Component::Queue,
        Component::Audit,
        Component::Ai,
        Component::Gateway,
    ];

    /// The lowercase name used in flags, health checks, schemas and logs.
    pub fn name(self) -> &'static str {
        match self {
            Component::Gateway => "gateway",
            Component::Config => "config",
            Component::Queue => "queue",
            Component::Audit => "audit",
            Component::Ai => "ai",
            Component::Auth => "auth",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A component name that is not one of [`Component::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown component `{0}` (expected one of gateway, config, queue, audit, ai, auth)")]
pub struct UnknownComponent(String);

impl FromStr for Component {
    type Err = UnknownComponent;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Component::ALL
            .into_iter()
            .find(|c| c.name() == s.trim())
            .ok_or_else(|| UnknownComponent(s.to_owned()))
    }
}

/// The components one process runs. Empty means all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComponentSet(Vec<Component>);

impl ComponentSet {
    /// Whether `c` runs in this process.
    pub fn contains(&self, c: Component) -> bool {
        self.0.is_empty() || self.0.contains(&c)
    }

    /// The components that run, in start-up order.
    pub fn enabled(&self) -> Vec<Component> {
        Component::ALL.into_iter().filter(|c| self.contains(*c)).collect()
    }
}

impl FromStr for ComponentSet {
    type Err = UnknownComponent;

    /// Parses `queue,auth` (or `all`, or an empty string for all).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut set = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty() && *p != "all") {
            let c: Component = part.parse()?;
            if !set.contains(&c) {
                set.push(c);
            }
        }
        Ok(ComponentSet(set))
    }
}

impl fmt::Display for ComponentSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("all");
        }
        let names: Vec<&str> = self.0.iter().map(|c| c.name()).collect();
        f.write_str(&names.join(","))
    }
}

impl Serialize for ComponentSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ComponentSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            One(String),
            Many(Vec<String>),
        }
        let joined = match Repr::deserialize(d)? {
            Repr::One(s) => s,
            Repr::Many(v) => v.join(","),
        };
        joined.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_list_parses_and_rejects_unknown_names() {
        let set: ComponentSet = "queue, auth".parse().unwrap();
        assert!(set.contains(Component::Queue));
        assert!(!set.contains(Component::Gateway));
        assert_eq!(set.enabled(), vec![Component::Auth, Component::Queue]);
        assert!("queue,billing".parse::<ComponentSet>().is_err());
        assert_eq!("".parse::<ComponentSet>().unwrap().enabled().len(), 6);
    }
}
