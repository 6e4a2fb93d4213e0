//! Everything that can go wrong in the config service, and how each maps to
//! the caller's error (one exhaustive table, no wildcard).

use std::collections::HashMap;

use plinth_runtime::error::{ErrorCode, FieldViolation, ServiceError, SharedFailure};
use plinth_runtime::storage::StorageError;

/// A config operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The request is malformed; names the fields.
    #[error("invalid request: {}", .0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldViolation>),
    /// No such namespace.
    #[error("namespace {0:?} not found")]
    NamespaceNotFound(String),
    /// No such environment.
    #[error("environment {0:?} not found")]
    EnvironmentNotFound(String),
    /// No such key (at the state read).
    #[error("key {0:?} not found")]
    KeyNotFound(String),
    /// No such release.
    #[error("release {0:?} not found")]
    ReleaseNotFound(String),
    /// No schema at that prefix.
    #[error("no schema at prefix {0:?}")]
    SchemaNotFound(String),
    /// The namespace, environment or release exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A precondition or etag did not hold; nothing was written.
    #[error("{0}")]
    Conflict(String),
    /// The namespace still has environments.
    #[error("namespace {0:?} still has environments; delete them or pass force")]
    NamespaceNotEmpty(String),
    /// The revision asked for is older than retained history.
    #[error("revision {revision} was compacted; history starts after revision {compacted}")]
    Compacted {
        /// Asked for.
        revision: i64,
        /// History starts after this.
        compacted: i64,
    },
    /// The revision asked for does not exist yet.
    #[error("revision {revision} is ahead of the head revision {head}")]
    FutureRevision {
        /// The request field that asked.
        field: &'static str,
        /// Asked for.
        revision: i64,
        /// The head.
        head: i64,
    },
    /// Secrets cannot be stored or read: no key encryption key.
    #[error("{0}")]
    NoEncryptionKey(String),
    /// Revealing secrets needs `config.secrets.read`.
    #[error("revealing secrets needs the config.secrets.read permission")]
    RevealDenied,
    /// A stored secret does not decrypt (wrong or missing key, tampered data).
    #[error("secret {key:?} cannot be decrypted: {reason}")]
    Decrypt {
        /// Which key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The rollout is not in a state that allows the call.
    #[error("{0}")]
    RolloutState(String),
    /// The write's transaction was cut off (its leader's caller went away);
    /// it may or may not have committed.
    #[error("the write may or may not have committed; read the key before retrying")]
    OutcomeUnknown,
    /// A failure shared by every write of a group commit.
    #[error(transparent)]
    Shared(#[from] SharedFailure),
    /// A watch message too large to send.
    #[error(transparent)]
    MessageTooLarge(#[from] plinth_runtime::framed::FrameTooLarge),
    /// The database failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

impl From<plinth_runtime::storage::group_commit::OutcomeUnknown> for ConfigError {
    fn from(_: plinth_runtime::storage::group_commit::OutcomeUnknown) -> Self {
        Self::OutcomeUnknown
    }
}

impl ConfigError {
    /// An invalid single field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldViolation::new(field, description)])
    }
}

impl ConfigError {
    /// The same failure again, for the other writers of a group commit:
    /// the same kind where it can be rebuilt, else [`ConfigError::Shared`]
    /// with the same code.
    pub fn replicate(&self) -> Self {
        match self {
            Self::EnvironmentNotFound(s) => Self::EnvironmentNotFound(s.clone()),
            Self::NamespaceNotFound(s) => Self::NamespaceNotFound(s.clone()),
            Self::OutcomeUnknown => Self::OutcomeUnknown,
            other => Self::Shared(SharedFailure::of(other)),
        }
    }
}

impl From<sqlx::Error> for ConfigError {
    fn from(e: sqlx::Error) -> Self {
        Self::Storage(StorageError::Query(e))
    }
}

impl From<plinth_runtime::error::InvalidRequest> for ConfigError {
    fn from(e: plinth_runtime::error::InvalidRequest) -> Self {
        Self::Invalid(e.0)
    }
}

impl ServiceError for ConfigError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::InvalidArgument,
            Self::NamespaceNotFound(_)
            | Self::EnvironmentNotFound(_)
            | Self::KeyNotFound(_)
            | Self::ReleaseNotFound(_)
            | Self::SchemaNotFound(_) => ErrorCode::NotFound,
            Self::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Self::Conflict(_) => ErrorCode::Aborted,
            Self::NamespaceNotEmpty(_) | Self::Compacted { .. } | Self::NoEncryptionKey(_) | Self::RolloutState(_) => {
                ErrorCode::FailedPrecondition
            }
            Self::FutureRevision { .. } => ErrorCode::InvalidArgument,
            Self::RevealDenied => ErrorCode::PermissionDenied,
            Self::Decrypt { .. } => ErrorCode::Internal,
            Self::MessageTooLarge(_) => ErrorCode::ResourceExhausted,
            Self::OutcomeUnknown => ErrorCode::Unavailable,
            Self::Shared(e) => e.code(),
            Self::Storage(e) if e.is_unavailable() => ErrorCode::Unavailable,
            Self::Storage(_) => ErrorCode::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "INVALID_ARGUMENT",
            Self::NamespaceNotFound(_) => "NAMESPACE_NOT_FOUND",
            Self::EnvironmentNotFound(_) => "ENVIRONMENT_NOT_FOUND",
            Self::KeyNotFound(_) => "KEY_NOT_FOUND",
            Self::ReleaseNotFound(_) => "RELEASE_NOT_FOUND",
            Self::SchemaNotFound(_) => "SCHEMA_NOT_FOUND",
            Self::AlreadyExists(_) => "ALREADY_EXISTS",
            Self::Conflict(_) => "PRECONDITION_FAILED",
            Self::NamespaceNotEmpty(_) => "NAMESPACE_NOT_EMPTY",
            Self::Compacted { .. } => "REVISION_COMPACTED",
            Self::FutureRevision { .. } => "FUTURE_REVISION",
            Self::NoEncryptionKey(_) => "NO_ENCRYPTION_KEY",
            Self::RevealDenied => "REVEAL_DENIED",
            Self::Decrypt { .. } => "SECRET_UNREADABLE",
            Self::MessageTooLarge(_) => "MESSAGE_TOO_LARGE",
            Self::RolloutState(_) => "ROLLOUT_STATE",
            Self::OutcomeUnknown => "COMMIT_OUTCOME_UNKNOWN",
            Self::Shared(e) => e.reason(),
            Self::Storage(e) if e.is_unavailable() => "STORAGE_UNAVAILABLE",
            Self::Storage(_) => "STORAGE_ERROR",
        }
    }

    fn field_violations(&self) -> Vec<FieldViolation> {
        match self {
            Self::Invalid(v) => v.clone(),
            Self::FutureRevision { field, .. } => vec![FieldViolation::new(*field, self.to_string())],
            _ => Vec::new(),
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        match self {
            Self::Compacted { compacted, .. } => {
                m.insert("compacted_revision".into(), compacted.to_string());
            }
            Self::FutureRevision { head, .. } => {
                m.insert("head_revision".into(), head.to_string());
            }
            _ => {}
        }
        m
    }
}
