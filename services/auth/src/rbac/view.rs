//! The compiled policy: every role with what it grants after inheritance,
//! and what one subject holds. Pure data, so checks are a few lookups and
//! the rules are testable without a database.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use plinth_runtime::auth::pattern_matches;

/// The highest role level (admin).
pub const MAX_LEVEL: i32 = 100;

/// A role as defined (built-in or stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleDef {
    pub name: String,
    pub description: String,
    pub permissions: Vec<String>,
    pub inherits: Vec<String>,
    pub level: i32,
    pub builtin: bool,
    pub updated_at: i64,
}

/// The roles every deployment has. They cannot change; custom roles may
/// inherit them.
pub fn builtin_roles() -> Vec<RoleDef> {
    /// Name, level, description, permission patterns, inherited roles.
    type Builtin = (
        &'static str,
        i32,
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
    );
    let table: &[Builtin] = &[
        (
            "admin",
            MAX_LEVEL,
            "Everything, including roles and users.",
            &["*"],
            &[],
        ),
        (
            "operator",
            60,
            "Runs the platform: every service's data and settings, users read-only.",
            &[
                "config.*",
                "queue.*",
                "ai.*",
                "audit.events.read",
                "auth.users.read",
                "auth.roles.read",
                "auth.service_accounts.read",
            ],
            &["developer", "auditor"],
        ),
        (
            "developer",
            30,
            "Builds on the platform: configuration values, messages, generation.",
            &["config.values.*", "queue.messages.*", "ai.generate.*"],
            &["viewer"],
        ),
        (
            "auditor",
            30,
            "Reads the audit trail and who holds which role.",
            &["audit.*", "auth.users.read", "auth.roles.read"],
            &["viewer"],
        ),
        (
            "service",
            20,
            "A backend calling other services: messages, generation, audit writes, checks.",
            &[
                "audit.events.write",
                "config.values.read",
                "queue.messages.*",
                "ai.generate.*",
                "auth.permissions.check",
            ],
            &[],
        ),
        (
            "viewer",
            10,
            "Reads configuration values, queue settings and AI usage.",
            &[
                "config.values.read",
                "queue.queues.read",
                "ai.usage.read",
                "ai.models.read",
            ],
            &[],
        ),
    ];
    table
        .iter()
        .map(|(name, level, description, permissions, inherits)| RoleDef {
            name: (*name).to_owned(),
            description: (*description).to_owned(),
            permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
            inherits: inherits.iter().map(|r| (*r).to_owned()).collect(),
            level: *level,
            builtin: true,
            updated_at: 0,
        })
        .collect()
}

/// What a role grants after inheritance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Closure {
    /// The role and every role it inherits, sorted.
    pub roles: Vec<String>,
    /// Their permission patterns, sorted, without repeats.
    pub patterns: Vec<String>,
}

/// Every role, compiled.
#[derive(Debug, Default)]
pub struct RoleSet {
    roles: BTreeMap<String, RoleDef>,
    closures: HashMap<String, Closure>,
}

impl RoleSet {
    /// Built-in roles plus `custom`. Inheritance only points to lower
    /// levels (enforced on write), so it has no cycles; a dangling or
    /// cyclic reference in stored data is skipped rather than followed.
    pub fn compile(custom: Vec<RoleDef>) -> Self {
        let mut roles: BTreeMap<String, RoleDef> = builtin_roles().into_iter().map(|r| (r.name.clone(), r)).collect();
        for role in custom {
            roles.entry(role.name.clone()).or_insert(role);
        }
        let closures = roles
            .keys()
            .map(|name| (name.clone(), closure_of(&roles, name)))
            .collect();
        Self { roles, closures }
    }

    /// The role called `name`.
    pub fn get(&self, name: &str) -> Option<&RoleDef> {
        self.roles.get(name)
    }

    /// Built-in roles first (highest level first, then by name), then custom ones by name.
    pub fn all(&self) -> Vec<&RoleDef> {
        let mut all: Vec<&RoleDef> = self.roles.values().collect();
        all.sort_by(|a, b| {
            let by_level = if a.builtin {
                b.level.cmp(&a.level)
            } else {
                std::cmp::Ordering::Equal
            };
            b.builtin.cmp(&a.builtin).then(by_level).then(a.name.cmp(&b.name))
        });
        all
    }

    /// What `name` grants; `None` for an unknown role.
    pub fn closure(&self, name: &str) -> Option<&Closure> {
        self.closures.get(name)
    }

    /// Every role `roles` include (themselves and inherited), sorted.
    pub fn expand(&self, roles: &[String]) -> Vec<String> {
        let set: BTreeSet<&String> = roles
            .iter()
            .filter_map(|r| self.closure(r))
            .flat_map(|c| c.roles.iter())
            .collect();
        set.into_iter().cloned().collect()
    }

    /// The permission patterns `roles` grant, sorted, without repeats.
    pub fn patterns(&self, roles: &[String]) -> Vec<String> {
        let set: BTreeSet<&String> = roles
            .iter()
            .filter_map(|r| self.closure(r))
            .flat_map(|c| c.patterns.iter())
            .collect();
        set.into_iter().cloned().collect()
    }

    /// The highest level among `roles` (0 for none known).
    pub fn level(&self, roles: &[String]) -> i32 {
        roles
            .iter()
            .filter_map(|r| self.get(r))
            .map(|r| r.level)
            .max()
            .unwrap_or(0)
    }

    /// Roles whose grants include `name`'s: itself and every role inheriting
    /// it, directly or not.
    pub fn dependents(&self, name: &str) -> Vec<String> {
        self.closures
            .iter()
            .filter(|(_, c)| c.roles.iter().any(|r| r == name))
            .map(|(r, _)| r.clone())
            .collect()
    }
}

fn closure_of(roles: &BTreeMap<String, RoleDef>, name: &str) -> Closure {
    let mut seen = BTreeSet::new();
    let mut patterns = BTreeSet::new();
    let mut stack = vec![name.to_owned()];
    while let Some(next) = stack.pop() {
        let Some(role) = roles.get(&next) else { continue };
        if !seen.insert(next) {
            continue;
        }
        patterns.extend(role.permissions.iter().cloned());
        stack.extend(role.inherits.iter().cloned());
    }
    Closure {
        roles: seen.into_iter().collect(),
        patterns: patterns.into_iter().collect(),
    }
}

/// Whether a binding at `binding_scope` applies at `scope`: unscoped
/// bindings apply everywhere, scoped ones at their scope and below it.
pub fn scope_covers(binding_scope: &str, scope: &str) -> bool {
    binding_scope.is_empty()
        || scope == binding_scope
        || scope
            .strip_prefix(binding_scope)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Whether holding `held` patterns covers granting `pattern`: an exact
/// permission needs a pattern matching it; a wildcard needs one at least
/// as wide.
pub fn covers(held: &[String], pattern: &str) -> bool {
    held.iter().any(|h| match pattern.strip_suffix('*') {
        Some(prefix) => h == "*" || h.strip_suffix('*').is_some_and(|p| prefix.starts_with(p)),
        None => pattern_matches(h, pattern),
    })
}

/// What one subject holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubjectGrants {
    /// Whether the subject exists and may act (an active user or a live
    /// service account).
    pub active: bool,
    /// Unscoped roles.
    pub global: Vec<String>,
    /// Scoped bindings: (role, scope).
    pub scoped: Vec<(String, String)>,
}

impl SubjectGrants {
    /// The roles bound to the subject that apply at `scope`.
    pub fn roles_at(&self, scope: &str) -> Vec<String> {
        if !self.active {
            return Vec::new();
        }
        let mut roles = self.global.clone();
        roles.extend(
            self.scoped
                .iter()
                .filter(|(_, s)| scope_covers(s, scope))
                .map(|(r, _)| r.clone()),
        );
        roles
    }

    /// Whether the subject holds `permission` at `scope`.
    pub fn allows(&self, roles: &RoleSet, permission: &str, scope: &str) -> bool {
        self.active
            && self
                .global
                .iter()
                .chain(
                    self.scoped
                        .iter()
                        .filter(|(_, s)| scope_covers(s, scope))
                        .map(|(r, _)| r),
                )
                .filter_map(|r| roles.closure(r))
                .any(|c| c.patterns.iter().any(|p| pattern_matches(p, permission)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn custom(name: &str, level: i32, permissions: &[&str], inherits: &[&str]) -> RoleDef {
        RoleDef {
            name: name.into(),
            description: String::new(),
            permissions: permissions.iter().map(|p| (*p).into()).collect(),
            inherits: inherits.iter().map(|r| (*r).into()).collect(),
            level,
            builtin: false,
            updated_at: 0,
        }
    }

    #[test]
    fn inheritance_is_transitive() {
        let set = RoleSet::compile(vec![
            custom("billing-reader", 15, &["ai.usage.read"], &["viewer"]),
            custom("billing-admin", 40, &["ai.budgets.write"], &["billing-reader"]),
        ]);
        let c = set.closure("billing-admin").unwrap();
        assert_eq!(c.roles, ["billing-admin", "billing-reader", "viewer"]);
        assert!(
            c.patterns.contains(&"config.values.read".to_owned()),
            "from viewer, two levels down"
        );
        assert!(c.patterns.contains(&"ai.budgets.write".to_owned()));
        let mut deps = set.dependents("viewer");
        deps.sort();
        assert!(deps.contains(&"billing-admin".to_owned()) && deps.contains(&"operator".to_owned()));
        assert!(!deps.contains(&"service".to_owned()));
    }

    #[test]
    fn operator_inherits_developer_and_auditor() {
        let set = RoleSet::compile(Vec::new());
        let p = set.patterns(&["operator".to_owned()]);
        assert!(p.contains(&"audit.*".to_owned()) && p.contains(&"config.values.*".to_owned()));
        assert_eq!(set.level(&["viewer".to_owned(), "operator".to_owned()]), 60);
        assert_eq!(set.level(&["nobody".to_owned()]), 0);
    }

    #[test]
    fn cycles_in_stored_data_terminate() {
        let set = RoleSet::compile(vec![
            custom("a", 5, &["x.y.z"], &["b"]),
            custom("b", 4, &["x.y.w"], &["a"]),
        ]);
        assert_eq!(set.closure("a").unwrap().roles, ["a", "b"]);
    }

    #[test]
    fn scopes_cover_their_subtree_only() {
        assert!(scope_covers("", "tenant/acme"));
        assert!(scope_covers("tenant/acme", "tenant/acme"));
        assert!(scope_covers("tenant/acme", "tenant/acme/namespace/payments"));
        assert!(!scope_covers("tenant/acme", "tenant/acmecorp"));
        assert!(!scope_covers("tenant/acme", ""));
    }

    #[test]
    fn granting_needs_an_at_least_as_wide_pattern() {
        let held = vec!["queue.*".to_owned(), "config.values.read".to_owned()];
        assert!(covers(&held, "queue.messages.write"));
        assert!(covers(&held, "queue.messages.*"));
        assert!(covers(&held, "queue.*"));
        assert!(!covers(&held, "*"));
        assert!(!covers(&held, "config.*"));
        assert!(!covers(&held, "config.values.write"));
        assert!(covers(&["*".to_owned()], "*"));
    }

    #[test]
    fn scoped_bindings_apply_below_their_scope() {
        let set = RoleSet::compile(Vec::new());
        let grants = SubjectGrants {
            active: true,
            global: vec!["viewer".into()],
            scoped: vec![("developer".into(), "tenant/acme".into())],
        };
        assert!(grants.allows(&set, "config.values.read", ""));
        assert!(!grants.allows(&set, "config.values.write", ""));
        assert!(grants.allows(&set, "config.values.write", "tenant/acme/namespace/payments"));
        assert!(!grants.allows(&set, "config.values.write", "tenant/globex"));
        let disabled = SubjectGrants {
            active: false,
            ..grants
        };
        assert!(!disabled.allows(&set, "config.values.read", ""));
    }
}
