//! The engine's error type.
//!
//! Policy: every error is a typed kind a caller can match on (never a message to
//! parse), carries the name of the thing that failed, and says what to do where that is
//! known. [`Error::is_retryable`] tells whether trying again may help (a full disk, an
//! interrupted write) or cannot (a wrong passphrase, a corrupt pack). `anyhow` and
//! formatted strings as errors stay out of this crate; binaries turn these into
//! messages and exit codes.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a named object or path.
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },

    #[error("no haul repository at {0} (no config file): create one with `haul-pbs init`")]
    NoRepository(PathBuf),

    #[error("a repository already exists at {0}")]
    RepositoryExists(PathBuf),

    #[error("wrong passphrase: none of the {tried} key file(s) of this repository opens with it")]
    WrongPassphrase { tried: usize },

    #[error("{what} not found")]
    NotFound { what: String },

    /// A name the user gave (a snapshot id, a key id) matches nothing: bad input, not
    /// damage.
    #[error("{what} not found: {hint}")]
    NoSuch { what: String, hint: &'static str },

    #[error("{what} already exists: objects are written once and never replaced")]
    AlreadyExists { what: String },

    /// Stored bytes failed authentication, did not parse, or do not match their name.
    #[error("{what} is corrupt: {detail}")]
    Corrupt { what: String, detail: String },

    /// A blob's content does not hash to the id it was offered under.
    #[error("{kind} blob claimed as {claimed} hashes to {actual}: refused")]
    IdMismatch {
        kind: haul_protocol::BlobKind,
        claimed: String,
        actual: String,
    },

    /// A snapshot would reference blobs the repository does not have.
    #[error("commit refused: {count} referenced blob(s) are not in the repository (first: {first}); no snapshot written")]
    MissingBlobs { count: usize, first: String },

    /// The append-only decorator refused a delete or an overwrite.
    #[error("append-only repository refuses to {action} {what}")]
    AppendOnly { action: &'static str, what: String },

    #[error("cannot remove the last key of the repository: add another key first")]
    LastKey,

    #[error("{what} is locked by {holder}; if that process is gone, remove {path}")]
    Locked {
        what: String,
        holder: String,
        path: String,
    },

    #[error("{0}")]
    InvalidInput(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    pub(crate) fn corrupt(what: impl Into<String>, detail: impl std::fmt::Display) -> Error {
        Error::Corrupt {
            what: what.into(),
            detail: detail.to_string(),
        }
    }

    /// Whether the same operation might succeed if tried again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::StorageFull
                    | io::ErrorKind::ConnectionReset
            ),
            Error::Locked { .. } => true,
            _ => false,
        }
    }
}
