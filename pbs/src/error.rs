//! How `haul-pbs` fails: one error type for the commands, mapped to exit codes in one
//! place ([`CliError::exit_code`]).
//!
//! Exit codes: 0 success; 1 the operation failed (nothing was changed that is not
//! safe to keep); 2 bad usage or input; 3 a backup was written but some files could not
//! be read, a check found damage, a restore skipped entries, or a repair left packs it
//! could not index.

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Repo(#[from] haul_repo::Error),
    #[error(transparent)]
    Walk(#[from] haul_protocol::walk::WalkError),
    #[error(transparent)]
    Restore(#[from] haul_protocol::restore::RestoreError),
    #[error("{0}")]
    Usage(String),
    /// An operating-system error on the named thing.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// A run or a component failed; the message says what and what to do.
    #[error("{0}")]
    Failed(String),
    /// The operation finished, but not cleanly (already reported).
    #[error("{0}")]
    Incomplete(String),
}

impl CliError {
    pub fn usage(msg: impl Into<String>) -> Self {
        CliError::Usage(msg.into())
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Repo(haul_repo::Error::InvalidInput(_) | haul_repo::Error::NoSuch { .. }) => {
                2
            }
            CliError::Restore(
                haul_protocol::restore::RestoreError::TargetNotEmpty(_)
                | haul_protocol::restore::RestoreError::IncludeNotFound(_),
            ) => 2,
            CliError::Incomplete(_) => 3,
            _ => 1,
        }
    }
}
