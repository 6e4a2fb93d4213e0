//! What each RPC requires (read once from the contracts' descriptors) and
//! which roles grant which permissions. The role table is the default role
//! set; role bindings and hierarchy managed at run time belong to the auth
//! service and arrive through the token's roles.

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
}

/// Role → permission patterns (`queue.messages.write`, `queue.*`, `*`).
#[derive(Debug, Clone)]
pub struct RolePolicy {
    roles: HashMap<String, Vec<String>>,
}

impl Default for RolePolicy {
    /// The default role set every deployment starts with.
    fn default() -> Self {
        let table: &[(&str, &[&str])] = &[
            ("admin", &["*"]),
            (
                "operator",
                &["config.*", "queue.*", "audit.events.read", "ai.*", "auth.users.read"],
            ),
            (
                "developer",
                &["config.values.*", "queue.messages.*", "ai.generate.*", "ai.usage.read"],
            ),
            (
                "auditor",
                &["audit.*", "config.values.read", "queue.queues.read", "auth.users.read"],
            ),
            ("viewer", &["config.values.read", "queue.queues.read", "ai.usage.read"]),
            (
                "service",
                &[
                    "audit.events.write",
                    "config.values.read",
                    "queue.messages.*",
                    "ai.generate.*",
                ],
            ),
        ];
        Self {
            roles: table
                .iter()
                .map(|(role, perms)| ((*role).to_owned(), perms.iter().map(|p| (*p).to_owned()).collect()))
                .collect(),
        }
    }
}

impl RolePolicy {
    /// Whether `role` is one this policy knows.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.contains_key(role)
    }

    /// Whether any of `roles` grants `permission`.
    pub fn allows(&self, roles: &[String], permission: &str) -> bool {
        roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .flatten()
            .any(|pattern| pattern_matches(pattern, permission))
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
        let policy = RolePolicy::default();
        let roles = |r: &str| vec![r.to_owned()];
        assert!(policy.allows(&roles("admin"), "auth.roles.write"));
        assert!(policy.allows(&roles("developer"), "queue.messages.write"));
        assert!(!policy.allows(&roles("developer"), "queue.queues.delete"));
        assert!(!policy.allows(&roles("viewer"), "config.values.write"));
        assert!(!policy.allows(&roles("nobody"), "config.values.read"));
        assert!(!policy.allows(&[], "config.values.read"));
    }
}
