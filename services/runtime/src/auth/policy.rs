//! What each RPC requires, read once from the contracts' descriptors. Which
//! roles grant which permissions is data the auth service owns; a caller's
//! credential carries the permission patterns it was granted.

use std::collections::HashMap;

use prost_reflect::{DescriptorPool, Value};

/// Runtime endpoints that need no credentials.
pub const UNAUTHENTICATED_METHODS: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// What an RPC requires of its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Anyone.
    Public,
    /// Any valid caller.
    Authenticated,
    /// A caller holding this permission.
    Permission(String),
}

/// `/package.Service/Method` → [`Access`], from the `plinth.common.v1.permission` option.
#[derive(Debug, Clone, Default)]
pub struct PermissionMap {
    methods: HashMap<String, Access>,
}

/// The descriptor set could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read permissions from the descriptor set: {0}")]
pub struct DescriptorError(String);

impl PermissionMap {
    /// Reads every method of every service in `descriptor_set`.
    pub fn from_descriptor_set(descriptor_set: &[u8]) -> Result<Self, DescriptorError> {
        let pool = DescriptorPool::decode(descriptor_set).map_err(|e| DescriptorError(e.to_string()))?;
        let mut methods = HashMap::new();
        let Some(ext) = pool.get_extension_by_name(plinth::common::v1::PERMISSION_OPTION) else {
            return Ok(Self { methods });
        };
        for service in pool.services() {
            for method in service.methods() {
                let options = method.options();
                if !options.has_extension(&ext) {
                    continue;
                }
                let access = match options.get_extension(&ext).as_ref() {
                    Value::String(s) if s == "public" => Access::Public,
                    Value::String(s) if s == "authenticated" => Access::Authenticated,
                    Value::String(s) => Access::Permission(s.clone()),
                    _ => continue,
                };
                methods.insert(format!("/{}/{}", service.full_name(), method.name()), access);
            }
        }
        Ok(Self { methods })
    }

    /// A map from explicit `(path, access)` pairs.
    pub fn from_entries(entries: impl IntoIterator<Item = (String, Access)>) -> Self {
        Self {
            methods: entries.into_iter().collect(),
        }
    }

    /// What `path` requires; `None` for an RPC that declares nothing.
    pub fn access(&self, path: &str) -> Option<&Access> {
        self.methods.get(path)
    }

    /// Every permission some RPC requires, sorted, without repeats.
    pub fn declared_permissions(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .methods
            .values()
            .filter_map(|a| match a {
                Access::Permission(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

/// Whether a permission pattern (`queue.messages.write`, `queue.*`, `*`) covers `permission`.
pub fn pattern_matches(pattern: &str, permission: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => permission.starts_with(prefix),
        None => pattern == permission,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_options_become_access_rules() {
        let map = PermissionMap::from_descriptor_set(plinth::FILE_DESCRIPTOR_SET).unwrap();
        assert_eq!(map.access("/plinth.auth.v1.AuthService/Login"), Some(&Access::Public));
        assert_eq!(
            map.access("/plinth.auth.v1.AuthService/GetMe"),
            Some(&Access::Authenticated)
        );
        assert_eq!(map.access("/plinth.auth.v1.AuthService/Nope"), None);
    }

    #[test]
    fn wildcards_grant_by_prefix_only() {
        assert!(pattern_matches("*", "auth.roles.write"));
        assert!(pattern_matches("queue.*", "queue.messages.write"));
        assert!(pattern_matches("queue.messages.write", "queue.messages.write"));
        assert!(!pattern_matches("queue.messages.write", "queue.messages.delete"));
        assert!(!pattern_matches("queue.*", "queues.list.read"));
        assert!(!pattern_matches("config.values.read", "config.values.readx"));
    }

    #[test]
    fn declared_permissions_are_listed_once() {
        let map = PermissionMap::from_descriptor_set(plinth::FILE_DESCRIPTOR_SET).unwrap();
        let all = map.declared_permissions();
        assert!(all.contains(&"auth.users.read".to_owned()));
        assert!(!all.iter().any(|p| p == "public" || p == "authenticated"));
        let mut sorted = all.clone();
        sorted.dedup();
        assert_eq!(sorted, all);
    }
}
