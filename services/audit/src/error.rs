//! Everything that can go wrong in the audit service, and how each maps to
//! the caller's error (one exhaustive table, no wildcard).

use plinth_runtime::error::{ErrorCode, FieldViolation, InvalidRequest, ServiceError, SharedFailure};
use plinth_runtime::storage::StorageError;
use plinth_runtime::storage::group_commit::OutcomeUnknown;

/// An audit operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The request is malformed; names the fields.
    #[error("invalid request: {}", .0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldViolation>),
    /// No entry with that index or event id.
    #[error("no audit entry {0}")]
    EntryNotFound(String),
    /// No retention policy of that name.
    #[error("retention policy {0:?} not found")]
    PolicyNotFound(String),
    /// No alert rule of that name.
    #[error("alert rule {0:?} not found")]
    AlertRuleNotFound(String),
    /// The proof asks about a tree larger than the latest checkpoint, or an
    /// entry not yet integrated.
    #[error("{0}")]
    NotYetIntegrated(String),
    /// Stored data does not parse (tampering or a bug); never the caller's fault.
    #[error("stored log is damaged: {0}")]
    Corrupt(String),
    /// The HTTP client for alert webhooks could not be built.
    #[error("alert webhooks: {0}")]
    Webhooks(String),
    /// The database failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// A failure of a group commit, shared by each append in the group.
    #[error(transparent)]
    Shared(#[from] SharedFailure),
    /// The commit carrying the append ended without an answer (shutdown);
    /// retrying with the same event ids is safe.
    #[error(transparent)]
    OutcomeUnknown(#[from] OutcomeUnknown),
}

impl AuditError {
    /// An invalid single field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldViolation::new(field, description)])
    }
}

impl AuditError {
    /// The same failure again, for the other callers of a group commit:
    /// the same kind where callers switch on it, else [`AuditError::Shared`]
    /// with the same code, reason and message.
    pub fn replicate(&self) -> Self {
        match self {
            Self::Invalid(v) => Self::Invalid(v.clone()),
            other => Self::Shared(SharedFailure::of(other)),
        }
    }
}

impl From<sqlx::Error> for AuditError {
    fn from(e: sqlx::Error) -> Self {
        Self::Storage(StorageError::Query(e))
    }
}

impl From<InvalidRequest> for AuditError {
    fn from(e: InvalidRequest) -> Self {
        Self::Invalid(e.0)
    }
}

impl ServiceError for AuditError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::InvalidArgument,
            Self::EntryNotFound(_) | Self::PolicyNotFound(_) | Self::AlertRuleNotFound(_) => ErrorCode::NotFound,
            Self::NotYetIntegrated(_) => ErrorCode::FailedPrecondition,
            Self::Corrupt(_) | Self::Webhooks(_) => ErrorCode::Internal,
            Self::Storage(e) if e.is_unavailable() => ErrorCode::Unavailable,
            Self::Storage(_) => ErrorCode::Internal,
            Self::Shared(e) => e.code(),
            Self::OutcomeUnknown(_) => ErrorCode::Unavailable,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "INVALID_ARGUMENT",
            Self::EntryNotFound(_) => "ENTRY_NOT_FOUND",
            Self::PolicyNotFound(_) => "POLICY_NOT_FOUND",
            Self::AlertRuleNotFound(_) => "ALERT_RULE_NOT_FOUND",
            Self::NotYetIntegrated(_) => "NOT_YET_INTEGRATED",
            Self::Corrupt(_) => "LOG_DAMAGED",
            Self::Webhooks(_) => "WEBHOOKS_UNAVAILABLE",
            Self::Storage(e) if e.is_unavailable() => "STORAGE_UNAVAILABLE",
            Self::Storage(_) => "STORAGE_ERROR",
            Self::Shared(e) => e.reason(),
            Self::OutcomeUnknown(_) => "COMMIT_OUTCOME_UNKNOWN",
        }
    }

    fn field_violations(&self) -> Vec<FieldViolation> {
        match self {
            Self::Invalid(v) => v.clone(),
            _ => Vec::new(),
        }
    }
}
