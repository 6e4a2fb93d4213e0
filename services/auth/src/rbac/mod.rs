//! Role-based access control as data: custom roles beside the built-in
//! ones, scoped bindings, and checks answered from an in-memory view.
//!
//! Consistency comes from one counter (`rbac_version`) bumped by every write
//! that changes what anyone may do. Each replica's view carries the version
//! it was built at; a check that demands a newer one resyncs first, and a
//! background sync follows other replicas' writes within a second. Subjects'
//! grants are cached until the version moves.

mod store;
pub mod view;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use plinth::auth::v1::{RoleBindingChangedEvent, RoleChangedEvent};
use plinth_runtime::auth::{Principal, Revocations, pattern_matches, unix_now};
use plinth_runtime::events::outbox::{OutboxEvent, Relay};
use plinth_runtime::storage::Db;

use crate::AuthError;
pub use store::{ACTIVE_ADMINS, BUMP_VERSION, BindingRow};
use store::{BindingChange, BindingOutcome};
use view::{MAX_LEVEL, RoleDef, RoleSet, SubjectGrants, covers};

/// Subjects whose grants are cached at most; the cache empties when full.
const SUBJECT_CACHE: usize = 100_000;
/// The longest role description.
const MAX_DESCRIPTION: usize = 500;
/// The most permission patterns or inherited roles one role may list.
const MAX_LIST: usize = 100;
/// The most questions in one BatchCheck.
pub const MAX_BATCH: usize = 100;

struct View {
    version: i64,
    roles: Arc<RoleSet>,
    subjects: HashMap<String, Arc<SubjectGrants>>,
}

/// The policy engine of one replica.
pub struct Rbac {
    db: Db,
    /// Every permission some RPC declares.
    catalog: Vec<String>,
    view: Mutex<View>,
    /// One resync at a time.
    sync_lock: tokio::sync::Mutex<()>,
    revocations: Revocations,
    token_lifetime: Duration,
    relay: Option<Relay>,
}

/// A role definition as a caller sends it.
#[derive(Debug, Clone, Default)]
pub struct RoleInput {
    pub name: String,
    pub description: String,
    pub permissions: Vec<String>,
    pub inherits: Vec<String>,
    pub level: i32,
}

impl RoleInput {
    /// The stored custom role this input defines, as changed at `now`.
    fn into_custom(self, now: i64) -> RoleDef {
        RoleDef {
            name: self.name,
            description: self.description,
            permissions: self.permissions,
            inherits: self.inherits,
            level: self.level,
            builtin: false,
            updated_at: now,
        }
    }
}

impl From<&RoleDef> for RoleInput {
    fn from(r: &RoleDef) -> Self {
        Self {
            name: r.name.clone(),
            description: r.description.clone(),
            permissions: r.permissions.clone(),
            inherits: r.inherits.clone(),
            level: r.level,
        }
    }
}

/// What a subject may do somewhere.
#[derive(Debug, Clone, Default)]
pub struct Permissions {
    pub roles: Vec<String>,
    pub patterns: Vec<String>,
    pub permissions: Vec<String>,
    pub version: i64,
}

/// One question of a check.
#[derive(Debug, Clone)]
pub struct Question<'a> {
    pub subject: &'a str,
    pub permission: &'a str,
    pub scope: &'a str,
}

impl Rbac {
    /// Loads the policy. `catalog` lists every declared permission; custom
    /// roles may only name patterns covering at least one of them.
    pub async fn load(
        db: Db,
        catalog: Vec<String>,
        revocations: Revocations,
        token_lifetime: Duration,
        relay: Option<Relay>,
    ) -> Result<Self, AuthError> {
        let version = store::version(&db).await?;
        let roles = RoleSet::compile(store::custom_roles(&db).await?);
        Ok(Self {
            db,
            catalog,
            view: Mutex::new(View {
                version,
                roles: Arc::new(roles),
                subjects: HashMap::new(),
            }),
            sync_lock: tokio::sync::Mutex::new(()),
            revocations,
            token_lifetime,
            relay,
        })
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The compiled roles now.
    pub fn roles(&self) -> Arc<RoleSet> {
        self.view().roles.clone()
    }

    /// The version of this replica's view.
    pub fn version(&self) -> i64 {
        self.view().version
    }

    /// Catches up with the database: rebuilds the view when the version
    /// moved. Returns the view's version.
    pub async fn sync(&self) -> Result<i64, AuthError> {
        let _one = self.sync_lock.lock().await;
        let current = store::version(&self.db).await?;
        if current <= self.version() {
            return Ok(self.version());
        }
        // Read after the version, so the roles are at least that new.
        let roles = Arc::new(RoleSet::compile(store::custom_roles(&self.db).await?));
        let mut view = self.view();
        view.version = current;
        view.roles = roles;
        view.subjects.clear();
        tracing::debug!(version = current, "policy view rebuilt");
        Ok(current)
    }

    /// Keeps the view within `interval` of other replicas' writes until `token` is cancelled.
    pub async fn follow(
        self: Arc<Self>,
        interval: Duration,
        token: tokio_util::sync::CancellationToken,
    ) -> Result<(), std::convert::Infallible> {
        while plinth_runtime::tasks::pause(&token, interval).await {
            if let Err(e) = self.sync().await {
                tracing::warn!(error = %e, "policy view could not be refreshed, keeping the current one");
            }
        }
        Ok(())
    }

    /// Makes sure the view is at least at `min` (from a write's version token).
    async fn at_least(&self, min: Option<i64>, field: &str) -> Result<(), AuthError> {
        let Some(min) = min else { return Ok(()) };
        if self.version() >= min {
            return Ok(());
        }
        if self.sync().await? < min {
            return Err(AuthError::field(
                field,
                "names a version this deployment has not reached",
            ));
        }
        Ok(())
    }

    /// `subject`'s grants, from the cache or the database.
    async fn grants(&self, subject: &str) -> Result<(Arc<SubjectGrants>, Arc<RoleSet>, i64), AuthError> {
        let (seen, roles, version) = {
            let view = self.view();
            (view.subjects.get(subject).cloned(), view.roles.clone(), view.version)
        };
        if let Some(g) = seen {
            return Ok((g, roles, version));
        }
        let grants = Arc::new(store::subject_grants(&self.db, subject).await?);
        let mut view = self.view();
        // Only cache what was read at the view's version: a resync in
        // between may have been about this very subject.
        if view.version == version {
            if view.subjects.len() >= SUBJECT_CACHE {
                view.subjects.clear();
            }
            view.subjects.insert(subject.to_owned(), grants.clone());
        }
        Ok((grants, roles, version))
    }

    /// Answers `questions` from one view at least as new as `min`.
    pub async fn check(&self, questions: &[Question<'_>], min: Option<i64>) -> Result<(Vec<bool>, i64), AuthError> {
        self.at_least(min, "min_version_token").await?;
        let mut answers = Vec::with_capacity(questions.len());
        let mut at = self.version();
        for q in questions {
            let (grants, roles, version) = self.grants(q.subject).await?;
            at = at.min(version);
            answers.push(grants.allows(&roles, q.permission, q.scope));
        }
        Ok((answers, at))
    }

    /// What `subject` may do at `scope`.
    pub async fn permissions(&self, subject: &str, scope: &str, min: Option<i64>) -> Result<Permissions, AuthError> {
        self.at_least(min, "min_version_token").await?;
        let (grants, roles, version) = self.grants(subject).await?;
        let bound = grants.roles_at(scope);
        let patterns = roles.patterns(&bound);
        let permissions = self
            .catalog
            .iter()
            .filter(|p| patterns.iter().any(|pat| pattern_matches(pat, p)))
            .cloned()
            .collect();
        Ok(Permissions {
            roles: roles.expand(&bound),
            patterns,
            permissions,
            version,
        })
    }

    /// The permission patterns an access token for a holder of `roles` carries.
    pub fn token_permissions(&self, roles: &[String]) -> Vec<String> {
        self.roles().patterns(roles)
    }

    /// Fails unless `caller` may hand out every role in `roles`: each known,
    /// at most the caller's level, and granting nothing the caller lacks.
    pub fn check_grantable(&self, caller: &Principal, roles: &[String], field: &str) -> Result<(), AuthError> {
        let set = self.roles();
        let level = set.level(&caller.roles);
        for (i, name) in roles.iter().enumerate() {
            let field = format!("{field}[{i}]");
            let Some(role) = set.get(name) else {
                return Err(AuthError::field(
                    &field,
                    format!("`{name}` is not a role (see ListRoles)"),
                ));
            };
            if role.level > level {
                return Err(AuthError::Forbidden(format!(
                    "role `{name}` (level {}) is above your highest level ({level})",
                    role.level
                )));
            }
            let patterns = set.closure(name).map(|c| c.patterns.clone()).unwrap_or_default();
            if let Some(p) = patterns.iter().find(|p| !holds(caller, p)) {
                return Err(AuthError::Forbidden(format!(
                    "role `{name}` grants `{p}`, which you do not hold"
                )));
            }
        }
        Ok(())
    }

    /// Validates a role definition against the current roles and the caller.
    fn validate_role(&self, caller: &Principal, role: &RoleInput, set: &RoleSet) -> Result<(), AuthError> {
        let mut violations = Vec::new();
        let mut bad =
            |field: String, why: String| violations.push(plinth_runtime::error::FieldViolation::new(&field, why));
        if !valid_role_name(&role.name) {
            bad(
                "role.name".into(),
                "must be 2 to 64 lowercase letters, digits or `-`, starting with a letter".into(),
            );
        }
        if role.description.chars().count() > MAX_DESCRIPTION {
            bad("role.description".into(), "must be at most 500 characters".into());
        }
        if !(1..=MAX_LEVEL).contains(&role.level) {
            bad("role.level".into(), "must be 1 to 100".into());
        }
        if role.permissions.is_empty() && role.inherits.is_empty() {
            bad(
                "role.permissions".into(),
                "a role needs at least one permission or inherited role".into(),
            );
        }
        if role.permissions.len() > MAX_LIST {
            bad("role.permissions".into(), "at most 100 patterns".into());
        }
        if role.inherits.len() > MAX_LIST {
            bad("role.inherits".into(), "at most 100 roles".into());
        }
        for (i, p) in role.permissions.iter().enumerate() {
            if !valid_pattern(p) {
                bad(
                    format!("role.permissions[{i}]"),
                    "must be a permission like queue.messages.write, a prefix like queue.* or *".into(),
                );
            } else if p != "*" && !self.catalog.iter().any(|d| pattern_matches(p, d)) {
                bad(
                    format!("role.permissions[{i}]"),
                    format!("`{p}` names no permission any Plinth RPC declares"),
                );
            }
        }
        for (i, r) in role.inherits.iter().enumerate() {
            match set.get(r) {
                None => bad(format!("role.inherits[{i}]"), format!("`{r}` is not a role")),
                Some(_) if *r == role.name => bad(format!("role.inherits[{i}]"), "a role cannot inherit itself".into()),
                Some(parent) if parent.level >= role.level => bad(
                    format!("role.inherits[{i}]"),
                    format!(
                        "`{r}` has level {}; a role only inherits roles of a lower level",
                        parent.level
                    ),
                ),
                Some(_) => {}
            }
        }
        if !violations.is_empty() {
            return Err(AuthError::Invalid(violations));
        }
        let level = set.level(&caller.roles);
        if role.level > level {
            return Err(AuthError::Forbidden(format!(
                "level {} is above your highest level ({level})",
                role.level
            )));
        }
        let mut granted: Vec<&String> = role.permissions.iter().collect();
        let inherited: Vec<String> = set.patterns(&role.inherits);
        granted.extend(inherited.iter());
        if let Some(p) = granted.into_iter().find(|p| !holds(caller, p)) {
            return Err(AuthError::Forbidden(format!(
                "the role would grant `{p}`, which you do not hold"
            )));
        }
        Ok(())
    }

    fn committed(&self) {
        if let Some(relay) = &self.relay {
            relay.wake();
        }
    }

    /// Makes every access token of subjects holding any of `roles`
    /// unscoped stop working, so their next refresh carries the new grants.
    async fn expire_tokens_of_holders(&self, roles: &[String]) -> Result<(), AuthError> {
        for subject in store::global_holders(&self.db, roles).await? {
            self.expire_tokens(&subject).await?;
        }
        Ok(())
    }

    /// Makes `subject`'s access tokens stop working (sessions stay; a
    /// refresh issues a token with the current grants).
    pub async fn expire_tokens(&self, subject: &str) -> Result<(), AuthError> {
        self.revocations
            .revoke_subject(subject, self.token_lifetime)
            .await
            .map_err(AuthError::Revocation)
    }

    fn role_event(role: &str, action: &str, actor: &Principal) -> OutboxEvent {
        let event = RoleChangedEvent {
            role: role.to_owned(),
            action: action.to_owned(),
            actor_id: actor.subject.clone(),
            time: Some(now_ts()),
        };
        OutboxEvent::new("plinth.auth.role_changed", role, &event)
    }

    /// Creates a custom role.
    pub async fn create_role(&self, caller: &Principal, input: RoleInput) -> Result<(RoleDef, i64), AuthError> {
        let set = self.roles();
        self.validate_role(caller, &input, &set)?;
        if set.get(&input.name).is_some() {
            return Err(AuthError::RoleExists);
        }
        let role = input.into_custom(unix_now());
        let version = store::insert_role(&self.db, &role, &Self::role_event(&role.name, "created", caller)).await?;
        self.committed();
        self.sync().await?;
        tracing::info!(role = %role.name, actor = %caller.subject, version, "role created");
        Ok((role, version))
    }

    /// Changes a custom role; holders' tokens expire so they pick it up.
    pub async fn update_role(
        &self,
        caller: &Principal,
        name: &str,
        apply: impl FnOnce(&mut RoleInput),
    ) -> Result<(RoleDef, i64), AuthError> {
        let set = self.roles();
        let current = editable(&set, caller, name)?;
        let mut input = RoleInput::from(current);
        apply(&mut input);
        self.validate_role(caller, &input, &set)?;
        // Lowering the level must keep every inheriting role above it.
        if let Some(child) = set
            .all()
            .into_iter()
            .find(|r| r.inherits.iter().any(|i| i == name) && r.level <= input.level)
        {
            return Err(AuthError::field(
                "role.level",
                format!(
                    "`{}` (level {}) inherits this role; keep the level below it",
                    child.name, child.level
                ),
            ));
        }
        let role = input.into_custom(unix_now());
        let affected = set.dependents(name);
        let version = store::update_role(&self.db, &role, &Self::role_event(name, "updated", caller))
            .await?
            .ok_or(AuthError::RoleNotFound)?;
        self.committed();
        self.sync().await?;
        self.expire_tokens_of_holders(&affected).await?;
        tracing::info!(role = %name, actor = %caller.subject, version, "role updated");
        Ok((role, version))
    }

    /// Deletes an unused custom role.
    pub async fn delete_role(&self, caller: &Principal, name: &str) -> Result<i64, AuthError> {
        let set = self.roles();
        editable(&set, caller, name)?;
        if let Some(child) = set.all().into_iter().find(|r| r.inherits.iter().any(|i| i == name)) {
            return Err(AuthError::RoleInUse(format!("role `{}` inherits it", child.name)));
        }
        let version = store::delete_role(&self.db, name, &Self::role_event(name, "deleted", caller))
            .await?
            .ok_or(AuthError::RoleNotFound)?;
        self.committed();
        self.sync().await?;
        tracing::info!(role = %name, actor = %caller.subject, version, "role deleted");
        Ok(version)
    }

    /// Binds (or, with `bind` false, unbinds) `role` to `subject` at `scope`.
    pub async fn change_binding(
        &self,
        caller: &Principal,
        subject: &str,
        role: &str,
        scope: &str,
        bind: bool,
    ) -> Result<i64, AuthError> {
        let mut violations = Vec::new();
        if subject.is_empty() || subject.len() > 64 {
            violations.push(plinth_runtime::error::FieldViolation::new(
                "binding.subject",
                "must be a user id or a service account id",
            ));
        }
        if !valid_scope(scope) {
            violations.push(plinth_runtime::error::FieldViolation::new("binding.scope", SCOPE_RULE));
        }
        if !violations.is_empty() {
            return Err(AuthError::Invalid(violations));
        }
        if self.roles().get(role).is_none() {
            return Err(AuthError::field(
                "binding.role",
                format!("`{role}` is not a role (see ListRoles)"),
            ));
        }
        self.check_grantable(caller, &[role.to_owned()], "binding.role")?;
        let now = unix_now();
        let event = RoleBindingChangedEvent {
            subject: subject.to_owned(),
            role: role.to_owned(),
            scope: scope.to_owned(),
            action: if bind { "bound" } else { "unbound" }.to_owned(),
            actor_id: caller.subject.clone(),
            time: Some(now_ts()),
        };
        let change = BindingChange {
            subject,
            role,
            scope,
            now,
            bind,
        };
        let outcome = store::change_binding(
            &self.db,
            &change,
            &OutboxEvent::new("plinth.auth.role_binding_changed", subject, &event),
        )
        .await?;
        let version = match outcome {
            BindingOutcome::Done(v) => v,
            BindingOutcome::NoSubject => return Err(AuthError::SubjectNotFound),
            BindingOutcome::NoBinding => return Err(AuthError::BindingNotFound),
        };
        self.committed();
        self.sync().await?;
        if scope.is_empty() {
            // Tokens carry unscoped grants: make the subject refresh.
            self.expire_tokens(subject).await?;
        }
        tracing::info!(subject, role, scope, bind, actor = %caller.subject, version, "role binding changed");
        Ok(version)
    }

    /// Bindings filtered by subject and/or role (at most 1000).
    pub async fn bindings(&self, subject: &str, role: &str) -> Result<Vec<BindingRow>, AuthError> {
        store::bindings(&self.db, subject, role).await
    }
}

/// The custom role `name`, if `caller` may change it (its level at most theirs).
fn editable<'a>(set: &'a RoleSet, caller: &Principal, name: &str) -> Result<&'a RoleDef, AuthError> {
    let role = set.get(name).ok_or(AuthError::RoleNotFound)?;
    if role.builtin {
        return Err(AuthError::RoleBuiltin);
    }
    if role.level > set.level(&caller.roles) {
        return Err(AuthError::Forbidden(format!(
            "role `{name}` (level {}) is above your highest level",
            role.level
        )));
    }
    Ok(role)
}

/// Whether `caller` holds `pattern` with its credential: granted by its
/// roles and inside its API key's scopes.
fn holds(caller: &Principal, pattern: &str) -> bool {
    covers(&caller.permissions, pattern) && (caller.scopes.is_empty() || covers(&caller.scopes, pattern))
}

fn now_ts() -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: unix_now(),
        nanos: 0,
    }
}

/// Role names: a lowercase letter, then letters, digits or `-`; 2 to 64.
pub fn valid_role_name(name: &str) -> bool {
    (2..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `*`, or dot-separated lowercase segments of which only the last may be `*`.
pub fn valid_pattern(p: &str) -> bool {
    if p == "*" {
        return true;
    }
    let segments: Vec<&str> = p.split('.').collect();
    p.len() <= 128
        && segments.len() >= 2
        && segments.iter().enumerate().all(|(i, s)| {
            (*s == "*" && i == segments.len() - 1)
                || (!s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
        })
}

/// An exact permission: a pattern without `*`.
pub fn valid_permission(p: &str) -> bool {
    !p.contains('*') && valid_pattern(p)
}

/// What a scope must look like, for error messages.
pub const SCOPE_RULE: &str = "must be empty or slash-separated segments of lowercase letters, digits, `.`, `_` or `-` \
                              (e.g. tenant/acme/namespace/payments), at most 256 characters";

/// Empty, or `/`-separated non-empty segments of `[a-z0-9._-]`.
pub fn valid_scope(scope: &str) -> bool {
    scope.is_empty()
        || (scope.len() <= 256
            && scope.split('/').all(|s| {
                !s.is_empty()
                    && s != "."
                    && s != ".."
                    && s.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-')
            }))
}

/// A version token as issued (a positive number); `None` for empty.
pub fn parse_version_token(token: &str, field: &str) -> Result<Option<i64>, AuthError> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .parse::<i64>()
        .ok()
        .filter(|v| *v > 0)
        .map(Some)
        .ok_or_else(|| AuthError::field(field, "must be a version_token returned by a write"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_patterns_and_scopes_are_checked() {
        assert!(valid_role_name("billing-admin"));
        assert!(!valid_role_name("Billing"));
        assert!(!valid_role_name("9lives"));
        assert!(!valid_role_name("a"));
        assert!(valid_pattern("queue.*") && valid_pattern("*") && valid_pattern("queue.messages.write"));
        assert!(!valid_pattern("queue*") && !valid_pattern("*.messages") && !valid_pattern("queue"));
        assert!(!valid_pattern("queue..write") && !valid_pattern("Queue.messages.write"));
        assert!(valid_permission("queue.messages.write") && !valid_permission("queue.*"));
        assert!(valid_scope("") && valid_scope("tenant/acme/namespace/pay-ments.v2"));
        assert!(!valid_scope("/tenant") && !valid_scope("tenant//x") && !valid_scope("tenant/../x"));
        assert!(!valid_scope("Tenant/Acme"));
        assert_eq!(parse_version_token("", "f").unwrap(), None);
        assert_eq!(parse_version_token("42", "f").unwrap(), Some(42));
        assert!(parse_version_token("-1", "f").is_err() && parse_version_token("v1", "f").is_err());
    }
}
