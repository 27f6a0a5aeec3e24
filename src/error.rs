//! The HTTP error: every failure a handler can answer with, its status, and the JSON body
//! `{"error": {"code": "...", "message": "..."}}`. Server-side failures are logged here and
//! answered without their internals.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::ingest::IngestError;
use crate::jobs::inference::InferenceError;

/// What a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{message}")]
    Invalid {
        /// The offending field, when there is one (`config.finetune.epochs`).
        field: Option<String>,
        message: String,
    },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    TooManyRequests(String),
    /// No room on the data disk, or the data directory's quota is used up.
    #[error("{0}")]
    InsufficientStorage(String),
    /// The `Host` header names a host this server does not serve (DNS rebinding).
    #[error("{0}")]
    MisdirectedHost(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unavailable(String),
    /// Overloaded: try again after `retry_after` seconds (sent as `Retry-After`).
    #[error("{message}")]
    Busy { message: String, retry_after: u64 },
    #[error("{0}")]
    TimedOut(String),
    /// The client stopped sending its request.
    #[error("{0}")]
    RequestTimeout(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Internal(String),
}

/// The JSON error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong, for people (`message`) and for programs (`code`, `field`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::Invalid {
            field: None,
            message: message.into(),
        }
    }

    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        Self::Internal(format!("{context}: {err}"))
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            Self::InsufficientStorage(_) => {
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            Self::MisdirectedHost(_) => (StatusCode::MISDIRECTED_REQUEST, "misdirected"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Self::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Busy { .. } => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            Self::TimedOut(_) => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            Self::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            Self::Database(e) if database_unreachable(e) => {
                (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable")
            }
            Self::Database(_) | Self::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        }
    }
}

/// The database could not be reached (as opposed to refusing a query): the server is up,
/// the request may succeed once the database is back, so 503 rather than 500.
fn database_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // PostgreSQL's class 08 (connection exception) and 57P (operator intervention:
        // the server is shutting down or restarting).
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

impl From<crate::objects::ObjectError> for ApiError {
    fn from(err: crate::objects::ObjectError) -> Self {
        match err {
            // The store is down or refusing: the request may work once it is back.
            crate::objects::ObjectError::Store { .. } => {
                tracing::error!(error = %err, "the object store failed");
                Self::Unavailable("the object store is unavailable; retry shortly".into())
            }
            other => Self::internal("the local file cache", other),
        }
    }
}

impl From<InferenceError> for ApiError {
    fn from(err: InferenceError) -> Self {
        match err {
            // The queue drains in about one forward pass; a second is a fair wait.
            InferenceError::Full { .. } => Self::Busy {
                message: err.to_string(),
                retry_after: 1,
            },
            InferenceError::TooMany { .. } => Self::TooLarge(err.to_string()),
            InferenceError::Stopped | InferenceError::Model(_) => Self::internal("predicting", err),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(err: IngestError) -> Self {
        match err {
            IngestError::TooLarge(_) => Self::TooLarge(err.to_string()),
            IngestError::Io(_) => Self::internal("storing the upload", err),
            _ => Self::unprocessable(err.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let retry_after = match &self {
            Self::Busy { retry_after, .. } => Some(*retry_after),
            Self::Database(e) if database_unreachable(e) => Some(5),
            _ => None,
        };
        let (message, field) = match self {
            Self::Database(ref e) if database_unreachable(e) => {
                tracing::error!(error = %e, "the database is unreachable");
                (
                    "the database is unavailable; retry shortly".to_string(),
                    None,
                )
            }
            Self::Database(ref e) => {
                tracing::error!(error = %e, "database error");
                ("internal error; see the server log".to_string(), None)
            }
            Self::Internal(ref e) => {
                tracing::error!(error = %e, "internal error");
                ("internal error; see the server log".to_string(), None)
            }
            Self::Invalid { field, message } => (message, field),
            other => (other.to_string(), None),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message,
                field,
            },
        };
        let mut res = (status, Json(body)).into_response();
        if let Some(secs) = retry_after {
            res.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        res
    }
}
