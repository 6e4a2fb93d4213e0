//! SQL for roles and bindings. Every transaction that changes what anyone
//! may do starts by bumping `rbac_version`: that row lock serialises such
//! writers (so read-modify-write of a subject's role list is safe on
//! PostgreSQL as on SQLite) and gives each change its version.

use plinth_runtime::events::outbox::OutboxEvent;
use plinth_runtime::on_db;
use plinth_runtime::storage::{BeginWrite, Db};

use super::view::{RoleDef, SubjectGrants};
use crate::AuthError;

/// Active users holding the admin role; a write that takes it to zero is
/// refused inside its transaction, so nobody locks the deployment out.
pub const ACTIVE_ADMINS: &str =
    "SELECT count(*) FROM users WHERE status = 'active' AND (',' || roles || ',') LIKE '%,admin,%'";

/// Bumps the policy version; the first statement of every policy write.
pub const BUMP_VERSION: &str = "UPDATE rbac_version SET version = version + 1 WHERE id = 1 RETURNING version";

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// Patterns and role names are stored space-separated.
fn split(list: &str) -> Vec<String> {
    list.split_whitespace().map(str::to_owned).collect()
}

/// Subjects' unscoped roles are stored comma-separated (see `store`).
fn split_roles(list: &str) -> Vec<String> {
    list.split(',').filter(|r| !r.is_empty()).map(str::to_owned).collect()
}

#[derive(sqlx::FromRow)]
struct RoleRow {
    name: String,
    description: String,
    permissions: String,
    inherits: String,
    level: i32,
    updated_at: i64,
}

impl From<RoleRow> for RoleDef {
    fn from(r: RoleRow) -> Self {
        RoleDef {
            name: r.name,
            description: r.description,
            permissions: split(&r.permissions),
            inherits: split(&r.inherits),
            level: r.level,
            builtin: false,
            updated_at: r.updated_at,
        }
    }
}

/// The current policy version.
pub async fn version(db: &Db) -> Result<i64, AuthError> {
    let (v,): (i64,) = on_db!(db, |pool| sqlx::query_as(
        "SELECT version FROM rbac_version WHERE id = 1"
    )
    .fetch_one(pool)
    .await)?;
    Ok(v)
}

/// Every stored (custom) role.
pub async fn custom_roles(db: &Db) -> Result<Vec<RoleDef>, AuthError> {
    let sql = "SELECT name, description, permissions, inherits, level, updated_at FROM roles";
    let rows: Vec<RoleRow> = on_db!(db, |pool| sqlx::query_as(sql).fetch_all(pool).await)?;
    Ok(rows.into_iter().map(RoleDef::from).collect())
}

/// Stores a new role; `RoleExists` when the name is taken. Returns the new version.
pub async fn insert_role(db: &Db, role: &RoleDef, event: &OutboxEvent) -> Result<i64, AuthError> {
    let result: Result<i64, sqlx::Error> = on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        let (version,): (i64,) = sqlx::query_as(BUMP_VERSION).fetch_one(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO roles (name, description, permissions, inherits, level, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $6)",
        )
        .bind(&role.name)
        .bind(&role.description)
        .bind(role.permissions.join(" "))
        .bind(role.inherits.join(" "))
        .bind(role.level)
        .bind(role.updated_at)
        .execute(&mut *tx)
        .await?;
        event
            .write(&mut *tx)
            .await
            .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        tx.commit().await?;
        Ok(version)
    }
    .await);
    match result {
        Err(e) if is_unique_violation(&e) => Err(AuthError::RoleExists),
        other => Ok(other?),
    }
}

/// Replaces a stored role's definition; `None` when it does not exist.
pub async fn update_role(db: &Db, role: &RoleDef, event: &OutboxEvent) -> Result<Option<i64>, AuthError> {
    on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        let (version,): (i64,) = sqlx::query_as(BUMP_VERSION).fetch_one(&mut *tx).await?;
        let n = sqlx::query(
            "UPDATE roles SET description = $1, permissions = $2, inherits = $3, level = $4, updated_at = $5 \
             WHERE name = $6",
        )
        .bind(&role.description)
        .bind(role.permissions.join(" "))
        .bind(role.inherits.join(" "))
        .bind(role.level)
        .bind(role.updated_at)
        .bind(&role.name)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Ok::<Option<i64>, AuthError>(None);
        }
        event.write(&mut *tx).await?;
        tx.commit().await?;
        Ok(Some(version))
    }
    .await)
}

/// How many live subjects hold role `$2` (`$1` is its `%,name,%` pattern),
/// unscoped or scoped.
const ROLE_USES: &str = "SELECT (SELECT count(*) FROM users WHERE status <> 'deleted' AND (',' || roles || ',') LIKE $1) \
                         + (SELECT count(*) FROM service_accounts WHERE deleted_at IS NULL \
                            AND (',' || roles || ',') LIKE $1) \
                         + (SELECT count(*) FROM role_bindings WHERE role = $2)";

/// Deletes a stored role unless something still uses it (checked again
/// inside the transaction). `Ok(None)`: no such role.
pub async fn delete_role(db: &Db, name: &str, event: &OutboxEvent) -> Result<Option<i64>, AuthError> {
    let like = format!("%,{name},%");
    on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        let (version,): (i64,) = sqlx::query_as(BUMP_VERSION).fetch_one(&mut *tx).await?;
        let (n,): (i64,) = sqlx::query_as(ROLE_USES)
            .bind(&like)
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
        if n > 0 {
            return Err(AuthError::RoleInUse(format!("{n} subject(s) hold it")));
        }
        let deleted = sqlx::query("DELETE FROM roles WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            return Ok(None);
        }
        event.write(&mut *tx).await?;
        tx.commit().await?;
        Ok(Some(version))
    }
    .await)
}

/// What `subject` holds now: unknown subjects hold nothing.
pub async fn subject_grants(db: &Db, subject: &str) -> Result<SubjectGrants, AuthError> {
    let identity = "SELECT status = 'active', roles FROM users WHERE id = $1 \
                    UNION ALL SELECT deleted_at IS NULL, roles FROM service_accounts WHERE id = $1";
    let scoped = "SELECT role, scope FROM role_bindings WHERE subject = $1";
    // (active, roles) of the user or account, and its (role, scope) bindings.
    type Found = (Option<(bool, String)>, Vec<(String, String)>);
    let (found, scoped): Found = on_db!(db, |pool| async {
        let found = sqlx::query_as(identity).bind(subject).fetch_optional(pool).await?;
        let scoped = sqlx::query_as(scoped).bind(subject).fetch_all(pool).await?;
        Ok::<_, sqlx::Error>((found, scoped))
    }
    .await)?;
    Ok(match found {
        Some((active, roles)) => SubjectGrants {
            active,
            global: split_roles(&roles),
            scoped,
        },
        None => SubjectGrants::default(),
    })
}

/// A change to one binding.
pub struct BindingChange<'a> {
    pub subject: &'a str,
    pub role: &'a str,
    pub scope: &'a str,
    pub now: i64,
    /// Add (true) or remove (false).
    pub bind: bool,
}

/// What a binding change did.
pub enum BindingOutcome {
    /// Applied (or already so, for an add) at this version.
    Done(i64),
    /// No such live subject.
    NoSubject,
    /// Removing a binding that does not exist.
    NoBinding,
}

/// Adds or removes a binding with its event. Unscoped bindings edit the
/// subject's role list (users first, then service accounts).
pub async fn change_binding(
    db: &Db,
    change: &BindingChange<'_>,
    event: &OutboxEvent,
) -> Result<BindingOutcome, AuthError> {
    let c = change;
    on_db!(db, |pool| async {
        let mut tx = pool.begin_write().await?;
        let (version,): (i64,) = sqlx::query_as(BUMP_VERSION).fetch_one(&mut *tx).await?;
        let user: Option<(String,)> = sqlx::query_as("SELECT roles FROM users WHERE id = $1 AND status <> 'deleted'")
            .bind(c.subject)
            .fetch_optional(&mut *tx)
            .await?;
        let account: Option<(String,)> = match user {
            Some(_) => None,
            None => {
                sqlx::query_as("SELECT roles FROM service_accounts WHERE id = $1 AND deleted_at IS NULL")
                    .bind(c.subject)
                    .fetch_optional(&mut *tx)
                    .await?
            }
        };
        let (table, roles) = match (user, account) {
            (Some((r,)), _) => ("users", r),
            (None, Some((r,))) => ("service_accounts", r),
            (None, None) => return Ok::<BindingOutcome, AuthError>(BindingOutcome::NoSubject),
        };
        let changed = if c.scope.is_empty() {
            let mut list = split_roles(&roles);
            let had = list.iter().any(|r| r == c.role);
            if c.bind && !had {
                list.push(c.role.to_owned());
            } else if !c.bind && had {
                list.retain(|r| r != c.role);
            }
            let sql = format!("UPDATE {table} SET roles = $1 WHERE id = $2");
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(list.join(","))
                .bind(c.subject)
                .execute(&mut *tx)
                .await?;
            had != c.bind
        } else if c.bind {
            sqlx::query(
                "INSERT INTO role_bindings (subject, role, scope, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (subject, role, scope) DO NOTHING",
            )
            .bind(c.subject)
            .bind(c.role)
            .bind(c.scope)
            .bind(c.now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1
        } else {
            sqlx::query("DELETE FROM role_bindings WHERE subject = $1 AND role = $2 AND scope = $3")
                .bind(c.subject)
                .bind(c.role)
                .bind(c.scope)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1
        };
        if !changed && !c.bind {
            return Ok(BindingOutcome::NoBinding);
        }
        if changed && !c.bind && c.scope.is_empty() && c.role == "admin" {
            let (admins,): (i64,) = sqlx::query_as(ACTIVE_ADMINS).fetch_one(&mut *tx).await?;
            if admins == 0 {
                return Err(AuthError::LastAdmin);
            }
        }
        if changed {
            event.write(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(BindingOutcome::Done(version))
    }
    .await)
}

/// A binding as listed: (subject, role, scope, created_at for scoped ones).
pub type BindingRow = (String, String, String, Option<i64>);

/// The most bindings one listing returns.
pub const MAX_LISTED: usize = 1000;

/// Bindings, unscoped first, filtered by subject and/or role.
pub async fn bindings(db: &Db, subject: &str, role: &str) -> Result<Vec<BindingRow>, AuthError> {
    let like = if role.is_empty() {
        "%".to_owned()
    } else {
        format!("%,{role},%")
    };
    let global = "SELECT id, roles FROM users WHERE status <> 'deleted' AND ($1 = '' OR id = $1) \
                  AND (',' || roles || ',') LIKE $2 \
                  UNION ALL SELECT id, roles FROM service_accounts WHERE deleted_at IS NULL \
                  AND ($1 = '' OR id = $1) AND (',' || roles || ',') LIKE $2 ORDER BY 1 LIMIT 1000";
    let scoped = "SELECT subject, role, scope, created_at FROM role_bindings \
                  WHERE ($1 = '' OR subject = $1) AND ($2 = '' OR role = $2) ORDER BY scope, subject, role LIMIT 1000";
    // (subject, roles) holders, and (subject, role, scope, created_at) rows.
    type Found = (Vec<(String, String)>, Vec<(String, String, String, i64)>);
    let (holders, scoped): Found = on_db!(db, |pool| async {
        let holders = sqlx::query_as(global).bind(subject).bind(&like).fetch_all(pool).await?;
        let scoped = sqlx::query_as(scoped).bind(subject).bind(role).fetch_all(pool).await?;
        Ok::<_, sqlx::Error>((holders, scoped))
    }
    .await)?;
    let mut out: Vec<BindingRow> = holders
        .into_iter()
        .flat_map(|(id, roles)| {
            split_roles(&roles)
                .into_iter()
                .filter(|r| role.is_empty() || r == role)
                .map(move |r| (id.clone(), r, String::new(), None))
        })
        .collect();
    out.extend(scoped.into_iter().map(|(s, r, sc, at)| (s, r, sc, Some(at))));
    out.truncate(MAX_LISTED);
    Ok(out)
}

/// Live subjects holding any of `roles` unscoped (their tokens carry them).
pub async fn global_holders(db: &Db, roles: &[String]) -> Result<Vec<String>, AuthError> {
    let sql = "SELECT id FROM users WHERE status <> 'deleted' AND (',' || roles || ',') LIKE $1 \
               UNION SELECT id FROM service_accounts WHERE deleted_at IS NULL AND (',' || roles || ',') LIKE $1";
    let mut out = Vec::new();
    for role in roles {
        let like = format!("%,{role},%");
        let ids: Vec<(String,)> = on_db!(db, |pool| sqlx::query_as(sql).bind(&like).fetch_all(pool).await)?;
        out.extend(ids.into_iter().map(|r| r.0));
    }
    out.sort();
    out.dedup();
    Ok(out)
}
