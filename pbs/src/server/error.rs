//! The one place where the server chooses HTTP status codes. Every refusal is a JSON
//! [`haul_protocol::wire::ErrorBody`] with a stable machine code and a human message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use haul_protocol::wire::{ErrorBody, ErrorDetail};

/// Machine codes of the API's refusals. Their spelling is part of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// No route with this path.
    NotFound,
    /// A route exists, but not for this method (nothing can be deleted or overwritten).
    MethodNotAllowed,
    /// An id that is not 64 hex digits, or a malformed body.
    BadRequest,
    BadId,
    /// A blob's content does not hash to its claimed id.
    IdMismatch,
    /// A commit references blobs the repository lacks.
    MissingBlobs,
    /// Reading or writing something this session may not touch.
    Forbidden,
    /// A request that needs a session came before `start`.
    NoSession,
    /// `start` while a session is running.
    SessionActive,
    /// Too many uploads at once, or `commit` while uploads of the session still run.
    Busy,
    BodyTooLarge,
    BlobTooLarge,
    TruncatedBody,
    /// The asked-for object does not exist.
    UnknownObject,
    Locked,
    RepositoryCorrupt,
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::NotFound => "not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::BadRequest => "bad_request",
            Code::BadId => "bad_id",
            Code::IdMismatch => "id_mismatch",
            Code::MissingBlobs => "missing_blobs",
            Code::Forbidden => "forbidden",
            Code::NoSession => "no_session",
            Code::SessionActive => "session_active",
            Code::Busy => "busy",
            Code::BodyTooLarge => "body_too_large",
            Code::BlobTooLarge => "blob_too_large",
            Code::TruncatedBody => "truncated_body",
            Code::UnknownObject => "unknown_object",
            Code::Locked => "locked",
            Code::RepositoryCorrupt => "repository_corrupt",
            Code::Internal => "internal",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Code::NotFound | Code::UnknownObject => StatusCode::NOT_FOUND,
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Code::BadRequest | Code::BadId | Code::TruncatedBody => StatusCode::BAD_REQUEST,
            Code::IdMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Code::MissingBlobs | Code::NoSession | Code::SessionActive | Code::Locked => {
                StatusCode::CONFLICT
            }
            Code::Forbidden => StatusCode::FORBIDDEN,
            Code::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Code::BodyTooLarge | Code::BlobTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::RepositoryCorrupt | Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

impl From<haul_repo::Error> for ApiError {
    fn from(e: haul_repo::Error) -> Self {
        use haul_repo::Error as E;
        let code = match &e {
            E::IdMismatch { .. } => Code::IdMismatch,
            E::MissingBlobs { .. } => Code::MissingBlobs,
            E::AppendOnly { .. } => Code::Forbidden,
            E::NotFound { .. } | E::NoSuch { .. } => Code::UnknownObject,
            E::InvalidInput(_) => Code::BadRequest,
            E::Locked { .. } => Code::Locked,
            E::Corrupt { .. } => Code::RepositoryCorrupt,
            _ => Code::Internal,
        };
        ApiError::new(code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.code.status().is_server_error() {
            tracing::error!(code = self.code.as_str(), "{}", self.message);
        } else {
            tracing::info!(code = self.code.as_str(), "refused: {}", self.message);
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.as_str().into(),
                message: self.message,
            },
        };
        (self.code.status(), axum::Json(body)).into_response()
    }
}
