//! Everything that can go wrong in the auth service, and how each maps to
//! the caller's error (one exhaustive table, no wildcard).

use plinth_runtime::error::{ErrorCode, FieldViolation, ServiceError};
use plinth_runtime::storage::StorageError;

/// An auth operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The request is malformed; names the fields.
    #[error("invalid request: {}", .0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldViolation>),
    /// Wrong email or password (deliberately not saying which).
    #[error("invalid email or password")]
    BadCredentials,
    /// A refresh token that is unknown, expired, or of an ended session.
    #[error("invalid or expired refresh token")]
    BadRefreshToken,
    /// A used refresh token was presented again: the session is revoked.
    #[error("refresh token reused; the session has been revoked, sign in again")]
    RefreshReused,
    /// The email is taken.
    #[error("a user with this email already exists")]
    EmailTaken,
    /// The phone number is taken.
    #[error("a user with this phone number already exists")]
    PhoneTaken,
    /// No such open session of the caller.
    #[error("session not found")]
    SessionNotFound,
    /// The caller's user no longer exists or is not active.
    #[error("user not found")]
    UserNotFound,
    /// No such live service account.
    #[error("service account not found")]
    ServiceAccountNotFound,
    /// Unknown service account or wrong secret (the same answer for both).
    #[error("invalid client credentials")]
    BadClientCredentials,
    /// No such active API key of the caller.
    #[error("API key not found")]
    ApiKeyNotFound,
    /// The change would leave no active administrator.
    #[error("this would leave no active user with the admin role; make someone else an administrator first")]
    LastAdmin,
    /// No such role.
    #[error("role not found")]
    RoleNotFound,
    /// A role with this name exists (built-in names included).
    #[error("a role with this name already exists")]
    RoleExists,
    /// Built-in roles cannot change.
    #[error("built-in roles cannot be changed or deleted; create a custom role that inherits it")]
    RoleBuiltin,
    /// The role is still inherited or bound.
    #[error("the role is in use: {0}")]
    RoleInUse(String),
    /// No such binding.
    #[error("role binding not found")]
    BindingNotFound,
    /// No live user or service account with this id.
    #[error("no user or service account with this id")]
    SubjectNotFound,
    /// The caller may not hand out what it asked to.
    #[error("not allowed: {0}")]
    Forbidden(String),
    /// No authenticated caller where one is needed.
    #[error("authentication required")]
    Unauthenticated,
    /// Too many login attempts for this account or address.
    #[error("too many login attempts, retry in {} s", retry_after.as_secs())]
    LoginThrottled {
        /// When the lockout ends.
        retry_after: std::time::Duration,
    },
    /// Shared state (Redis) is unreachable, so attempts cannot be counted.
    #[error("login throttling unavailable: {0}")]
    StateUnavailable(String),
    /// Too many password checks are waiting; come back shortly.
    #[error("too many sign-ins in progress, retry shortly")]
    Busy,
    /// Revocation lists could not be written.
    #[error("revocation failed")]
    Revocation(#[source] plinth_runtime::auth::AuthError),
    /// Storage failed.
    #[error("storage failed")]
    Storage(#[from] StorageError),
    /// Password hashing failed (a bug or exhausted resources).
    #[error("password hashing failed: {0}")]
    Hashing(String),
    /// A token signing key cannot be sealed or opened (wrong or missing
    /// `PLINTH_AUTH__KEYS`, tampered row).
    #[error("token signing key: {0}")]
    SigningKey(String),
}

impl From<sqlx::Error> for AuthError {
    fn from(e: sqlx::Error) -> Self {
        AuthError::Storage(StorageError::Query(e))
    }
}

impl AuthError {
    /// The field violations this error carries (none unless `Invalid`).
    pub fn violations(self) -> Vec<FieldViolation> {
        match self {
            AuthError::Invalid(v) => v,
            _ => Vec::new(),
        }
    }

    /// One invalid field.
    pub fn field(field: &str, description: impl Into<String>) -> Self {
        AuthError::Invalid(vec![FieldViolation::new(field, description)])
    }
}

impl ServiceError for AuthError {
    fn code(&self) -> ErrorCode {
        match self {
            AuthError::Invalid(_) => ErrorCode::InvalidArgument,
            AuthError::BadCredentials | AuthError::BadRefreshToken | AuthError::RefreshReused => {
                ErrorCode::Unauthenticated
            }
            AuthError::Unauthenticated | AuthError::BadClientCredentials => ErrorCode::Unauthenticated,
            AuthError::EmailTaken | AuthError::PhoneTaken | AuthError::RoleExists => ErrorCode::AlreadyExists,
            AuthError::RoleBuiltin | AuthError::RoleInUse(_) | AuthError::LastAdmin => ErrorCode::FailedPrecondition,
            AuthError::Forbidden(_) => ErrorCode::PermissionDenied,
            AuthError::UserNotFound
            | AuthError::SessionNotFound
            | AuthError::ApiKeyNotFound
            | AuthError::ServiceAccountNotFound
            | AuthError::RoleNotFound
            | AuthError::BindingNotFound
            | AuthError::SubjectNotFound => ErrorCode::NotFound,
            AuthError::LoginThrottled { .. } => ErrorCode::ResourceExhausted,
            AuthError::StateUnavailable(_) | AuthError::Busy | AuthError::Revocation(_) => ErrorCode::Unavailable,
            AuthError::Storage(e) if e.is_unavailable() => ErrorCode::Unavailable,
            AuthError::Storage(_) | AuthError::Hashing(_) | AuthError::SigningKey(_) => ErrorCode::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            AuthError::Invalid(_) => "INVALID_ARGUMENT",
            AuthError::BadCredentials => "BAD_CREDENTIALS",
            AuthError::BadRefreshToken => "BAD_REFRESH_TOKEN",
            AuthError::RefreshReused => "REFRESH_TOKEN_REUSED",
            AuthError::EmailTaken => "EMAIL_TAKEN",
            AuthError::PhoneTaken => "PHONE_TAKEN",
            AuthError::UserNotFound => "USER_NOT_FOUND",
            AuthError::SessionNotFound => "SESSION_NOT_FOUND",
            AuthError::ApiKeyNotFound => "API_KEY_NOT_FOUND",
            AuthError::BadClientCredentials => "BAD_CLIENT_CREDENTIALS",
            AuthError::ServiceAccountNotFound => "SERVICE_ACCOUNT_NOT_FOUND",
            AuthError::Unauthenticated => "CREDENTIALS_MISSING",
            AuthError::LastAdmin => "LAST_ADMIN",
            AuthError::RoleNotFound => "ROLE_NOT_FOUND",
            AuthError::RoleExists => "ROLE_EXISTS",
            AuthError::RoleBuiltin => "ROLE_BUILTIN",
            AuthError::RoleInUse(_) => "ROLE_IN_USE",
            AuthError::BindingNotFound => "ROLE_BINDING_NOT_FOUND",
            AuthError::SubjectNotFound => "SUBJECT_NOT_FOUND",
            AuthError::Forbidden(_) => "GRANT_EXCEEDS_CALLER",
            AuthError::LoginThrottled { .. } => "LOGIN_THROTTLED",
            AuthError::StateUnavailable(_) => "STATE_UNAVAILABLE",
            AuthError::Busy => "HASHING_BUSY",
            AuthError::Revocation(_) => "REVOCATION_FAILED",
            AuthError::Storage(_) => "STORAGE_FAILED",
            AuthError::Hashing(_) => "HASHING_FAILED",
            AuthError::SigningKey(_) => "SIGNING_KEY_UNREADABLE",
        }
    }

    fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            AuthError::LoginThrottled { retry_after } => Some(*retry_after),
            AuthError::Busy => Some(std::time::Duration::from_secs(1)),
            _ => None,
        }
    }

    fn field_violations(&self) -> Vec<FieldViolation> {
        match self {
            AuthError::Invalid(v) => v.clone(),
            _ => Vec::new(),
        }
    }
}
