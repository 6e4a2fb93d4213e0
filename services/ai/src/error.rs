//! Everything that can go wrong in the ai service, and how each maps to the
//! caller's error (one exhaustive table, no wildcard).

use std::time::Duration;

use plinth_runtime::error::{ErrorCode, FieldViolation, InvalidRequest, ServiceError};
use plinth_runtime::storage::StorageError;

/// An ai operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AiError {
    /// The request is malformed; names the fields.
    #[error("invalid request: {}", .0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldViolation>),
    /// No logical model of that name.
    #[error("model {0:?} is not configured (see ListModels)")]
    UnknownModel(String),
    /// Every target failed or was skipped; `summary` lists why, in order.
    #[error("no target of model {model:?} answered: {summary}")]
    Exhausted {
        /// The logical model.
        model: String,
        /// `provider/model: reason` for each target.
        summary: String,
        /// Whether the last failure was a rate limit (429).
        rate_limited: bool,
        /// When a skipped target may be tried again.
        retry_after: Option<Duration>,
    },
    /// The caller is over a rate limit.
    #[error("rate limited: {reason}")]
    RateLimited {
        /// Which limit.
        reason: String,
        /// When the window ends.
        retry_after: std::time::Duration,
    },
    /// The caller's tenant or API key has spent its budget.
    #[error("budget exceeded: {reason}")]
    BudgetExceeded {
        /// Which budget, spent how far.
        reason: String,
        /// When the period ends.
        retry_after: std::time::Duration,
    },
    /// A budget applies but a target of the model has no price, so the
    /// budget could not be kept.
    #[error("{0}")]
    Unpriced(String),
    /// The shared state holding limits is unreachable.
    #[error("rate limits and budgets unavailable: {0}")]
    Limits(String),
    /// A stream broke after its first delta (no fallback is possible then).
    #[error("the provider's stream broke: {0}")]
    StreamBroken(String),
    /// The configuration of providers and models is unusable.
    #[error("ai configuration: {0}")]
    Config(String),
    /// The database failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

impl AiError {
    /// An invalid single field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldViolation::new(field, description)])
    }
}

impl From<sqlx::Error> for AiError {
    fn from(e: sqlx::Error) -> Self {
        Self::Storage(StorageError::Query(e))
    }
}

impl From<InvalidRequest> for AiError {
    fn from(e: InvalidRequest) -> Self {
        Self::Invalid(e.0)
    }
}

impl ServiceError for AiError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::InvalidArgument,
            Self::UnknownModel(_) => ErrorCode::NotFound,
            Self::Exhausted { rate_limited: true, .. } => ErrorCode::ResourceExhausted,
            Self::Exhausted { .. } | Self::StreamBroken(_) | Self::Limits(_) => ErrorCode::Unavailable,
            Self::RateLimited { .. } | Self::BudgetExceeded { .. } => ErrorCode::ResourceExhausted,
            Self::Unpriced(_) => ErrorCode::FailedPrecondition,
            Self::Config(_) => ErrorCode::Internal,
            Self::Storage(e) if e.is_unavailable() => ErrorCode::Unavailable,
            Self::Storage(_) => ErrorCode::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "INVALID_ARGUMENT",
            Self::UnknownModel(_) => "MODEL_NOT_FOUND",
            Self::Exhausted { rate_limited: true, .. } => "UPSTREAM_RATE_LIMITED",
            Self::Exhausted { .. } => "NO_TARGET_AVAILABLE",
            Self::StreamBroken(_) => "UPSTREAM_STREAM_BROKEN",
            Self::RateLimited { .. } => "RATE_LIMITED",
            Self::BudgetExceeded { .. } => "BUDGET_EXCEEDED",
            Self::Unpriced(_) => "MODEL_UNPRICED",
            Self::Limits(_) => "LIMITS_UNAVAILABLE",
            Self::Config(_) => "AI_MISCONFIGURED",
            Self::Storage(e) if e.is_unavailable() => "STORAGE_UNAVAILABLE",
            Self::Storage(_) => "STORAGE_ERROR",
        }
    }

    fn field_violations(&self) -> Vec<FieldViolation> {
        match self {
            Self::Invalid(v) => v.clone(),
            _ => Vec::new(),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Exhausted { retry_after, .. } => *retry_after,
            Self::RateLimited { retry_after, .. } | Self::BudgetExceeded { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}
