//! How a run of the agent fails: a message for a person and an [`ErrorCode`] for the
//! pbs. This is the one place where the agent's errors get their codes, and so their
//! exit codes ([`ErrorCode::exit`]).

use crate::client::ClientError;
use haul_protocol::agent::ErrorCode;
use haul_protocol::restore::RestoreError;
use haul_protocol::walk::WalkError;
use std::error::Error;
use std::fmt::Display;

/// A failed run. Cloneable, so that one failure of a background task (a prefetcher)
/// can be reported to every caller waiting on it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub message: String,
    pub code: ErrorCode,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Display) -> Failure {
        Failure {
            message: message.to_string(),
            code,
        }
    }

    /// The command line or the run parameters are wrong.
    pub fn usage(message: impl Display) -> Failure {
        Failure::new(ErrorCode::Usage, message)
    }

    /// The same failure, its message prefixed with what was being done.
    pub fn context(self, doing: &str) -> Failure {
        Failure {
            message: format!("{doing}: {}", self.message),
            code: self.code,
        }
    }
}

impl ClientError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ClientError::Connect { .. } | ClientError::Http(_) => ErrorCode::Connection,
            ClientError::Api { .. } => ErrorCode::Server,
            ClientError::Protocol { .. } => ErrorCode::Protocol,
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        Failure::new(e.code(), e)
    }
}

impl From<WalkError> for Failure {
    fn from(e: WalkError) -> Failure {
        let code = match &e {
            WalkError::BadPath { .. } => ErrorCode::Source,
            WalkError::Relative(_) | WalkError::NoPaths => ErrorCode::Usage,
            WalkError::Sink(s) => boxed_code(&*s.0),
            // Reported only if the part that failed first did not say why.
            WalkError::Interrupted => ErrorCode::Internal,
        };
        Failure::new(code, e)
    }
}

impl From<RestoreError> for Failure {
    fn from(e: RestoreError) -> Failure {
        let code = match &e {
            RestoreError::TargetNotEmpty(_) => ErrorCode::Target,
            RestoreError::Io { .. } => ErrorCode::Io,
            RestoreError::ChunkMismatch { .. } | RestoreError::SizeMismatch { .. } => {
                ErrorCode::Protocol
            }
            RestoreError::IncludeNotFound(_) => ErrorCode::Include,
            RestoreError::Source(s) => boxed_code(&*s.error),
        };
        Failure::new(code, e)
    }
}

/// The code of an error that a sink or a blob source boxed: the agent's own errors
/// keep theirs; anything else they report concerns what the server sent (a tree that
/// does not decode or hash to its id).
fn boxed_code(e: &(dyn Error + Send + Sync + 'static)) -> ErrorCode {
    if let Some(f) = e.downcast_ref::<Failure>() {
        f.code
    } else if let Some(c) = e.downcast_ref::<ClientError>() {
        c.code()
    } else if e.is::<std::io::Error>() {
        ErrorCode::Io
    } else {
        ErrorCode::Protocol
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use haul_protocol::walk::SinkError;

    #[test]
    fn boxed_errors_keep_the_code_of_what_they_box() {
        let refused = ClientError::Api {
            what: "POST /v1/backup/start".into(),
            status: 403,
            code: "forbidden".into(),
            message: "no".into(),
        };
        let f = Failure::from(WalkError::Sink(SinkError::new(refused)));
        assert_eq!(f.code, ErrorCode::Server);
        assert!(f
            .message
            .contains("server refused POST /v1/backup/start (forbidden): no"));
        let cut = Failure::new(ErrorCode::Connection, "gone").context("fetching ahead");
        assert_eq!(cut.message, "fetching ahead: gone");
        let f = Failure::from(WalkError::Sink(SinkError::new(cut)));
        assert_eq!(f.code, ErrorCode::Connection);
        let f = Failure::from(WalkError::Sink(SinkError("bad tree".into())));
        assert_eq!(f.code, ErrorCode::Protocol);
        let f = Failure::from(RestoreError::IncludeNotFound("x".into()));
        assert_eq!((f.code, f.code.exit().code()), (ErrorCode::Include, 1));
        let f = Failure::from(WalkError::BadPath {
            path: "/nope".into(),
            source: std::io::ErrorKind::NotFound.into(),
        });
        assert_eq!((f.code, f.code.exit().code()), (ErrorCode::Source, 2));
    }
}
