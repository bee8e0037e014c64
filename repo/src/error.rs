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
    /// An I/O error on a named object or path. A full disk says so, and what to do.
    #[error("{what}: {source}{}", if is_disk_full(.source) { DISK_FULL_ADVICE } else { "" })]
    Io { what: String, source: io::Error },

    #[error("no haul repository at {0} (no config file): create one with `haul-pbs init`")]
    NoRepository(PathBuf),

    #[error("a repository already exists at {0}")]
    RepositoryExists(PathBuf),

    /// No key file opens with the passphrase. `broken` are the key files that could
    /// not even be tried (damaged): the passphrase may belong to one of them.
    #[error("wrong passphrase: none of the {tried} key file(s) of this repository opens with it{}", broken_keys(.broken))]
    WrongPassphrase {
        tried: usize,
        broken: Vec<DamagedFile>,
    },

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

    /// A snapshot would reference blobs the repository does not have, or, in a
    /// session that sees only its host's history, blobs that are not that host's
    /// (the two are not told apart).
    #[error("commit refused: {count} referenced blob(s) are not in the repository, or not this host's to use (first: {first}); send them; no snapshot written")]
    MissingBlobs { count: usize, first: String },

    /// A pack the session was writing could not be finished, so blobs it was told were
    /// stored are not: its commit is refused.
    #[error("commit refused: a pack of this backup could not be written ({detail}); no snapshot written; run the backup again")]
    PackLost { detail: String },

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

    /// A held lock was not refreshed for so long that others may take it for stale
    /// (see `crate::lock`): what it protected may be gone.
    #[error("the lock of this {what} could not be refreshed for {minutes} minutes, so a prune may no longer wait for it: nothing more is written; run it again")]
    LockLost { what: String, minutes: u64 },

    #[error("{0}")]
    InvalidInput(String),

    /// What another pbs receiving a copy said, or why it could not be reached.
    #[error("{0}")]
    Remote(String),
}

const DISK_FULL_ADVICE: &str =
    " (the disk is full: nothing stored before was changed; free some space on it before anything is written there again)";

/// ENOSPC or EDQUOT: no room for what was being written.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

fn broken_keys(broken: &[DamagedFile]) -> String {
    if broken.is_empty() {
        return String::new();
    }
    let list: Vec<String> = broken.iter().map(|d| d.to_string()).collect();
    format!(
        "; {} damaged key file(s) could not be tried: {}; if the passphrase belongs to one of them, put back a copy of that file in keys/",
        broken.len(),
        list.join("; ")
    )
}

/// A repository file that could not be read (damaged, truncated, or not sealed with
/// this repository's key), which the operation that met it skipped and reported.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DamagedFile {
    /// `snapshot`, `index file`, `key` (the backend's name for the file's type).
    #[serde(rename = "type", serialize_with = "as_display")]
    pub file_type: crate::backend::FileType,
    pub name: String,
    /// What is wrong with it.
    pub reason: String,
}

fn as_display<S: serde::Serializer>(
    t: &crate::backend::FileType,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(t)
}

impl DamagedFile {
    /// The damage `error` shows in file `name`: the detail of a corruption, else the
    /// whole message.
    pub(crate) fn new(file_type: crate::backend::FileType, name: &str, error: &Error) -> Self {
        let reason = match error {
            Error::Corrupt { detail, .. } => detail.clone(),
            other => other.to_string(),
        };
        DamagedFile {
            file_type,
            name: name.to_string(),
            reason,
        }
    }

    /// Where the file is, relative to the repository (`keys/3fa4…`).
    pub fn path(&self) -> String {
        match self.file_type.dir() {
            "" => self.name.clone(),
            dir => format!("{dir}/{}", self.name),
        }
    }
}

impl std::fmt::Display for DamagedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.path(), self.reason)
    }
}

/// A page of a directory's listing that is not what its index says: damage, as a
/// blob that does not decode is.
impl From<haul_protocol::tree::PageError> for Error {
    fn from(e: haul_protocol::tree::PageError) -> Self {
        Error::corrupt(format!("tree page {}", e.page.short()), e.reason)
    }
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
            Error::Io { source, .. } => {
                is_disk_full(source)
                    || matches!(
                        source.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::WouldBlock
                            | io::ErrorKind::ConnectionReset
                    )
            }
            Error::Locked { .. } | Error::LockLost { .. } | Error::PackLost { .. } => true,
            _ => false,
        }
    }

    /// Whether this is a full disk (or an exhausted quota) on the named path.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Error::Io { source, .. } if is_disk_full(source))
    }
}
