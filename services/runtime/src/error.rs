//! The error model every service shares: each service's `thiserror` enum
//! implements [`ServiceError`], and [`to_status`] turns it into a
//! `tonic::Status` with `google.rpc` details in exactly one place.
//! Internal causes are logged here and never sent to the caller.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every Plinth error.
pub const ERROR_DOMAIN: &str = "plinth.dev";

/// What kind of failure an error is; decides the gRPC code (and so the HTTP status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The caller sent something malformed; names the field.
    InvalidArgument,
    /// The named resource does not exist.
    NotFound,
    /// A resource with that identity already exists.
    AlreadyExists,
    /// A concurrent change won (etag or version mismatch); retry after re-reading.
    Aborted,
    /// The system is not in a state that allows the call (e.g. a lease expired).
    FailedPrecondition,
    /// A quota, rate limit or size limit was hit.
    ResourceExhausted,
    /// No valid credentials.
    Unauthenticated,
    /// Valid credentials without the required permission.
    PermissionDenied,
    /// A backend is down; retrying later may succeed.
    Unavailable,
    /// The deadline passed before the work finished.
    DeadlineExceeded,
    /// The call is not supported by this deployment.
    Unimplemented,
    /// A bug or an unexpected backend answer; details only in the log.
    Internal,
}

impl ErrorCode {
    /// The one mapping from error kind to gRPC code.
    pub fn grpc_code(self) -> Code {
        match self {
            ErrorCode::InvalidArgument => Code::InvalidArgument,
            ErrorCode::NotFound => Code::NotFound,
            ErrorCode::AlreadyExists => Code::AlreadyExists,
            ErrorCode::Aborted => Code::Aborted,
            ErrorCode::FailedPrecondition => Code::FailedPrecondition,
            ErrorCode::ResourceExhausted => Code::ResourceExhausted,
            ErrorCode::Unauthenticated => Code::Unauthenticated,
            ErrorCode::PermissionDenied => Code::PermissionDenied,
            ErrorCode::Unavailable => Code::Unavailable,
            ErrorCode::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorCode::Unimplemented => Code::Unimplemented,
            ErrorCode::Internal => Code::Internal,
        }
    }
}

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field path, e.g. `queue.max_attempts`.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Implemented by each service's error enum (with an exhaustive `match`).
pub trait ServiceError: std::error::Error {
    /// The kind of failure.
    fn code(&self) -> ErrorCode;
    /// A stable UPPER_SNAKE reason callers can switch on, e.g. `LEASE_EXPIRED`.
    fn reason(&self) -> &'static str;
    /// Invalid fields, for [`ErrorCode::InvalidArgument`].
    fn field_violations(&self) -> Vec<FieldViolation> {
        Vec::new()
    }
    /// Extra `ErrorInfo.metadata` (never secrets).
    fn metadata(&self) -> HashMap<String, String> {
        HashMap::new()
    }
    /// When to retry, for throttling and temporary unavailability (`RetryInfo`).
    fn retry_after(&self) -> Option<std::time::Duration> {
        None
    }
}

/// Converts a service error into the status sent to the caller.
///
/// Internal and unavailable errors are logged with their full cause chain; the
/// caller sees a generic message and the stable reason only.
pub fn to_status<E: ServiceError>(err: &E) -> Status {
    let code = err.code();
    let message = match code {
        ErrorCode::Internal => {
            tracing::error!(reason = err.reason(), error = %chain(err), "internal error");
            "internal error".to_owned()
        }
        ErrorCode::Unavailable => {
            tracing::warn!(reason = err.reason(), error = %chain(err), "backend unavailable");
            "service temporarily unavailable, retry later".to_owned()
        }
        _ => err.to_string(),
    };
    let mut details = ErrorDetails::with_error_info(err.reason(), ERROR_DOMAIN, err.metadata());
    for v in err.field_violations() {
        details.add_bad_request_violation(v.field, v.description);
    }
    if let Some(delay) = err.retry_after() {
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(code.grpc_code(), message, details)
}

/// One failure answered to several callers (the writers of a group
/// commit): the original's code, reason, retry hint and whole cause chain
/// as text, so each caller's error reads and maps exactly like the original.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SharedFailure {
    code: ErrorCode,
    reason: &'static str,
    retry_after: Option<std::time::Duration>,
    message: String,
}

impl SharedFailure {
    /// A copy of `err` that can be handed to every caller it concerns.
    pub fn of<E: ServiceError>(err: &E) -> Self {
        Self {
            code: err.code(),
            reason: err.reason(),
            retry_after: err.retry_after(),
            message: chain(err),
        }
    }
}

impl ServiceError for SharedFailure {
    fn code(&self) -> ErrorCode {
        self.code
    }

    fn reason(&self) -> &'static str {
        self.reason
    }

    fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after
    }
}

/// `error: cause: cause` on one line, for logs.
pub fn chain(err: &(dyn std::error::Error + '_)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A request that failed validation, with every bad field. Handlers build it
/// while converting wire types to domain types.
#[derive(Debug, Clone, Default, thiserror::Error)]
#[error("invalid request: {}", summary(.0))]
pub struct InvalidRequest(pub Vec<FieldViolation>);

fn summary(v: &[FieldViolation]) -> String {
    v.iter()
        .map(|f| format!("{}: {}", f.field, f.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl InvalidRequest {
    /// One bad field.
    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self(vec![FieldViolation::new(field, description)])
    }
}

impl ServiceError for InvalidRequest {
    fn code(&self) -> ErrorCode {
        ErrorCode::InvalidArgument
    }
    fn reason(&self) -> &'static str {
        "INVALID_ARGUMENT"
    }
    fn field_violations(&self) -> Vec<FieldViolation> {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("disk on fire")]
    struct Boom;

    impl ServiceError for Boom {
        fn code(&self) -> ErrorCode {
            ErrorCode::Internal
        }
        fn reason(&self) -> &'static str {
            "STORAGE_FAILED"
        }
    }

    #[test]
    fn invalid_argument_names_the_field() {
        let status = to_status(&InvalidRequest::field("queue", "must not be empty"));
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let bad = details.bad_request().unwrap();
        assert_eq!(bad.field_violations[0].field, "queue");
        assert_eq!(details.error_info().unwrap().domain, ERROR_DOMAIN);
    }

    #[test]
    fn internal_errors_do_not_leak_their_cause() {
        let status = to_status(&Boom);
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
        assert_eq!(
            status.get_error_details().error_info().unwrap().reason,
            "STORAGE_FAILED"
        );
    }
}
