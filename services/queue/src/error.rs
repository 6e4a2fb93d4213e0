//! Everything that can go wrong in the queue service, and how each maps to
//! the caller's error (one exhaustive table, no wildcard).

use plinth_runtime::error::{ErrorCode, FieldViolation, InvalidRequest, ServiceError, SharedFailure};
use plinth_runtime::storage::StorageError;
use plinth_runtime::storage::group_commit::OutcomeUnknown;

/// A queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The request is malformed; names the fields.
    #[error("invalid request: {}", .0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldViolation>),
    /// No such queue.
    #[error("queue {0:?} not found")]
    QueueNotFound(String),
    /// No such message in that queue.
    #[error("message {id} not found in queue {queue:?} (acked, purged, or never enqueued there)")]
    MessageNotFound {
        /// Queue.
        queue: String,
        /// Id.
        id: i64,
    },
    /// No such schedule in that queue.
    #[error("schedule {0:?} not found")]
    ScheduleNotFound(String),
    /// The queue exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The etag did not match.
    #[error("queue {0:?} changed since it was read (etag mismatch)")]
    Conflict(String),
    /// The lease token is not the current delivery's.
    #[error("lease token of message {0} is stale: the lease expired and the message was redelivered, or it was nacked")]
    StaleLease(i64),
    /// The database failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// A failure of a group commit, shared by each enqueue in the group.
    #[error(transparent)]
    Shared(#[from] SharedFailure),
    /// The commit carrying the enqueue ended without an answer (shutdown):
    /// the messages may or may not be stored (a dedup key makes the retry safe).
    #[error(transparent)]
    OutcomeUnknown(#[from] OutcomeUnknown),
}

impl QueueError {
    /// An invalid single field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldViolation::new(field, description)])
    }
}

impl QueueError {
    /// The same failure again, for the other callers of a group commit:
    /// the same kind where callers switch on it, else [`QueueError::Shared`]
    /// with the same code, reason and message.
    pub fn replicate(&self) -> Self {
        match self {
            Self::QueueNotFound(q) => Self::QueueNotFound(q.clone()),
            Self::Invalid(v) => Self::Invalid(v.clone()),
            other => Self::Shared(SharedFailure::of(other)),
        }
    }
}

impl From<sqlx::Error> for QueueError {
    fn from(e: sqlx::Error) -> Self {
        Self::Storage(StorageError::Query(e))
    }
}

impl From<InvalidRequest> for QueueError {
    fn from(e: InvalidRequest) -> Self {
        Self::Invalid(e.0)
    }
}

impl ServiceError for QueueError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::InvalidArgument,
            Self::QueueNotFound(_) | Self::MessageNotFound { .. } | Self::ScheduleNotFound(_) => ErrorCode::NotFound,
            Self::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Self::Conflict(_) => ErrorCode::Aborted,
            Self::StaleLease(_) => ErrorCode::FailedPrecondition,
            Self::Storage(e) if e.is_unavailable() => ErrorCode::Unavailable,
            Self::Storage(_) => ErrorCode::Internal,
            Self::Shared(e) => e.code(),
            Self::OutcomeUnknown(_) => ErrorCode::Unavailable,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "INVALID_ARGUMENT",
            Self::QueueNotFound(_) => "QUEUE_NOT_FOUND",
            Self::MessageNotFound { .. } => "MESSAGE_NOT_FOUND",
            Self::ScheduleNotFound(_) => "SCHEDULE_NOT_FOUND",
            Self::AlreadyExists(_) => "ALREADY_EXISTS",
            Self::Conflict(_) => "ETAG_MISMATCH",
            Self::StaleLease(_) => "LEASE_STALE",
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
