//! The domain error vocabulary and its single mapping to `tonic::Status`.
//!
//! Every domain area returns [`Error`]; the gRPC layer converts it with
//! `Status::from`, the only place where codes and `google.rpc` details are
//! chosen. Storage errors are cleaned here: serialization failures and
//! deadlocks become ABORTED, an unreachable database UNAVAILABLE, anything
//! else INTERNAL with a generic message while the detail goes to the log.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use vaultguard_proto::v1::ErrorReason;

/// The `domain` of every `google.rpc.ErrorInfo` VaultGuard sends.
pub const ERROR_DOMAIN: &str = "vaultguard.dev";

/// One invalid request field, named as in the proto (`settings.token_algorithm`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// A failure of a domain operation. Nothing half-written survives one: every
/// variant is returned before, or instead of, a transaction commit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0:?}")]
    InvalidArgument(Vec<FieldViolation>),
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),
    #[error("unauthenticated with reason {reason:?}: {detail}")]
    UnauthenticatedReason {
        reason: ErrorReason,
        detail: &'static str,
    },
    #[error("permission denied ({reason:?})")]
    PermissionDenied {
        reason: ErrorReason,
        message: String,
        metadata: HashMap<String, String>,
    },
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("already exists: {message}")]
    AlreadyExists {
        reason: Option<ErrorReason>,
        message: String,
        metadata: HashMap<String, String>,
    },
    #[error("failed precondition ({reason:?}): {message}")]
    FailedPrecondition {
        reason: ErrorReason,
        message: String,
        metadata: HashMap<String, String>,
    },
    /// A dependency (an OAuth provider) cannot be reached or failed; a retry
    /// later may succeed.
    #[error("unavailable ({reason:?}): {message}")]
    Unavailable {
        reason: ErrorReason,
        message: String,
        metadata: HashMap<String, String>,
    },
    /// A position beyond the end of a sequence (an audit cursor past the head).
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// A concurrent change won; nothing was written and a retry may succeed.
    #[error("conflict: {0}")]
    Conflict(&'static str),
    /// A limit of the caller (`scope`: agent, tenant, operator, client,
    /// streams) refused the call before any work; `retry_after` is when a
    /// call would be admitted, when that is known.
    #[error("rate limited ({scope})")]
    RateLimited {
        scope: &'static str,
        retry_after: Option<std::time::Duration>,
    },
    /// A standing quota of the caller's tenant (not a rate) refused the
    /// call; nothing was written.
    #[error("resource exhausted ({reason:?}): {message}")]
    ResourceExhausted {
        reason: ErrorReason,
        message: String,
        metadata: HashMap<String, String>,
    },
    /// The request message did not arrive within the read deadline
    /// (`request_body_timeout_ms`); nothing was done.
    #[error("request body not read within {timeout_ms} ms")]
    RequestBodyTimeout { timeout_ms: u64 },
    #[error("unimplemented: {0}")]
    Unimplemented(&'static str),
    #[error("storage: {0}")]
    Storage(#[from] sea_orm::DbErr),
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A single invalid field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation {
            field: field.into(),
            description: description.into(),
        }])
    }

    /// PERMISSION_DENIED with a reason and no metadata.
    pub fn denied(reason: ErrorReason, message: impl Into<String>) -> Self {
        Self::PermissionDenied {
            reason,
            message: message.into(),
            metadata: HashMap::new(),
        }
    }

    /// FAILED_PRECONDITION with ERROR_REASON_INVALID_STATE and the current state.
    pub fn invalid_state(message: impl Into<String>, state: &str) -> Self {
        Self::FailedPrecondition {
            reason: ErrorReason::InvalidState,
            message: message.into(),
            metadata: HashMap::from([("state".to_owned(), state.to_owned())]),
        }
    }

    /// ALREADY_EXISTS without an ErrorInfo reason (a unique name is taken).
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::AlreadyExists {
            reason: None,
            message: message.into(),
            metadata: HashMap::new(),
        }
    }

    /// INTERNAL from anything displayable; the detail is logged, never sent.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self::Internal(detail.to_string())
    }
}

impl From<FieldViolation> for Error {
    fn from(violation: FieldViolation) -> Self {
        Self::InvalidArgument(vec![violation])
    }
}

/// Collects field violations while a request is validated.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// Records the error of a single-field check, if any.
    pub fn check(&mut self, result: std::result::Result<(), FieldViolation>) {
        if let Err(violation) = result {
            self.0.push(violation);
        }
    }

    /// Records the error of a check that yields a value; `None` then, and
    /// [`Violations::finish`] fails.
    pub fn take<T>(&mut self, result: std::result::Result<T, FieldViolation>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(violation) => {
                self.0.push(violation);
                None
            }
        }
    }

    /// `Ok` when nothing was recorded, INVALID_ARGUMENT naming every field otherwise.
    pub fn finish(self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(self.0))
        }
    }
}

/// How a storage error is reported to the caller.
enum StorageClass {
    Conflict,
    Unavailable,
    Other,
}

fn classify_storage(err: &sea_orm::DbErr) -> StorageClass {
    use sea_orm::{DbErr, RuntimeErr};
    let sqlx_err = match err {
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => Some(e),
        _ => None,
    };
    if matches!(err, DbErr::ConnectionAcquire(_) | DbErr::Conn(_)) {
        return StorageClass::Unavailable;
    }
    let Some(sqlx_err) = sqlx_err else {
        return StorageClass::Other;
    };
    match sqlx_err.as_ref() {
        sea_orm::sqlx::Error::PoolTimedOut
        | sea_orm::sqlx::Error::PoolClosed
        | sea_orm::sqlx::Error::Io(_) => StorageClass::Unavailable,
        sea_orm::sqlx::Error::Database(db) => match db.code().as_deref() {
            // PostgreSQL serialization_failure, deadlock_detected; SQLite BUSY, LOCKED.
            Some("40001" | "40P01" | "5" | "6" | "517" | "262") => StorageClass::Conflict,
            // A failover under way: the host is a standby now
            // (read_only_sql_transaction), is shutting down or crashing
            // (admin_shutdown, crash_shutdown), still starting
            // (cannot_connect_now), or the connection broke (class 08).
            // in_failed_sql_transaction follows one of those inside the
            // same transaction (seen in tests/it/failover.rs while a
            // promoted standby still refused writes): nothing of the
            // transaction can commit, so a retry is safe.
            Some("25006" | "25P02" | "57P01" | "57P02" | "57P03") => StorageClass::Unavailable,
            Some(code) if code.starts_with("08") => StorageClass::Unavailable,
            _ => StorageClass::Other,
        },
        _ => StorageClass::Other,
    }
}

/// True when a storage error is a unique-constraint violation.
pub fn is_unique_violation(err: &sea_orm::DbErr) -> bool {
    matches!(
        err.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    )
}

/// True when `err` says the database could not be reached (what the caller
/// is answered UNAVAILABLE for): the same read may succeed once it is back.
pub fn is_database_unavailable(err: &Error) -> bool {
    matches!(err, Error::Storage(db_err) if matches!(classify_storage(db_err), StorageClass::Unavailable))
}

fn status_with_info(
    code: Code,
    message: String,
    reason: ErrorReason,
    metadata: HashMap<String, String>,
) -> Status {
    let details = ErrorDetails::with_error_info(reason.as_str_name(), ERROR_DOMAIN, metadata);
    Status::with_error_details(code, message, details)
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument(violations) => {
                let message = violations
                    .iter()
                    .map(|v| format!("{}: {}", v.field, v.description))
                    .collect::<Vec<_>>()
                    .join("; ");
                let mut details = ErrorDetails::new();
                for violation in violations {
                    details.add_bad_request_violation(violation.field, violation.description);
                }
                Status::with_error_details(
                    Code::InvalidArgument,
                    format!("invalid argument: {message}"),
                    details,
                )
            }
            Error::Unauthenticated(detail) => {
                tracing::info!(detail, "request unauthenticated");
                status_with_info(
                    Code::Unauthenticated,
                    "missing or invalid credentials".to_owned(),
                    ErrorReason::Unauthenticated,
                    HashMap::new(),
                )
            }
            Error::UnauthenticatedReason { reason, detail } => {
                tracing::info!(detail, "request unauthenticated");
                status_with_info(
                    Code::Unauthenticated,
                    "missing or invalid credentials".to_owned(),
                    reason,
                    HashMap::new(),
                )
            }
            Error::PermissionDenied {
                reason,
                message,
                metadata,
            } => status_with_info(Code::PermissionDenied, message, reason, metadata),
            Error::NotFound(what) => Status::not_found(format!("{what} not found")),
            Error::AlreadyExists {
                reason: Some(reason),
                message,
                metadata,
            } => status_with_info(Code::AlreadyExists, message, reason, metadata),
            Error::AlreadyExists {
                reason: None,
                message,
                ..
            } => Status::already_exists(message),
            Error::FailedPrecondition {
                reason,
                message,
                metadata,
            } => status_with_info(Code::FailedPrecondition, message, reason, metadata),
            Error::Unavailable {
                reason,
                message,
                metadata,
            } => status_with_info(Code::Unavailable, message, reason, metadata),
            Error::OutOfRange(message) => Status::out_of_range(message),
            Error::Conflict(detail) => status_with_info(
                Code::Aborted,
                format!("{detail}; retry"),
                ErrorReason::StorageConflict,
                HashMap::new(),
            ),
            Error::RateLimited { scope, retry_after } => {
                let mut details = ErrorDetails::new();
                details.set_error_info(
                    ErrorReason::RateLimited.as_str_name(),
                    ERROR_DOMAIN,
                    HashMap::from([("scope".to_owned(), scope.to_owned())]),
                );
                if let Some(delay) = retry_after {
                    details.set_retry_info(Some(delay));
                }
                Status::with_error_details(
                    Code::ResourceExhausted,
                    format!("{scope} limit exceeded; retry later"),
                    details,
                )
            }
            Error::ResourceExhausted {
                reason,
                message,
                metadata,
            } => status_with_info(Code::ResourceExhausted, message, reason, metadata),
            Error::RequestBodyTimeout { timeout_ms } => status_with_info(
                Code::DeadlineExceeded,
                format!("request message not received within {timeout_ms} ms"),
                ErrorReason::RequestBodyTimeout,
                HashMap::from([("timeout_ms".to_owned(), timeout_ms.to_string())]),
            ),
            Error::Unimplemented(what) => {
                Status::unimplemented(format!("{what} is not implemented yet"))
            }
            Error::Storage(db_err) => match classify_storage(&db_err) {
                StorageClass::Conflict => {
                    tracing::warn!(error = %db_err, "storage conflict");
                    status_with_info(
                        Code::Aborted,
                        "concurrent update conflict; retry".to_owned(),
                        ErrorReason::StorageConflict,
                        HashMap::new(),
                    )
                }
                StorageClass::Unavailable => {
                    tracing::error!(error = %db_err, "database unavailable");
                    status_with_info(
                        Code::Unavailable,
                        "database unavailable; retry later".to_owned(),
                        ErrorReason::Unavailable,
                        HashMap::new(),
                    )
                }
                StorageClass::Other => {
                    tracing::error!(error = %db_err, "storage error");
                    Status::internal("internal error")
                }
            },
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error")
            }
        }
    }
}
