//! What `haul-agent`, the pbs that starts it and `haul-wrapper` (the SSH forced command
//! between them) must agree on, outside the HTTP protocol of [`crate::wire`]:
//!
//! - [`args`]: the agent's command line, [`AgentCommand`]. The pbs builds it with
//!   [`AgentCommand::to_args`], the wrapper and the agent read it with
//!   [`AgentCommand::parse`]; nobody else writes or reads its words, so the wrapper
//!   checks exactly what the agent will do.
//! - [`params`]: the run parameters the pbs writes as one JSON line on the agent's
//!   stdin ([`BackupParams`], [`RestoreParams`]), and how a run names a snapshot
//!   ([`Parent`], [`SnapshotChoice`]).
//! - [`events`]: the JSON lines the agent prints on stdout, [`AgentEvent`]; an error
//!   carries an [`ErrorCode`] saying where the fault lies.
//! - [`exit`]: the exit codes of the agent ([`AgentExit`]) and of the wrapper
//!   ([`WrapperExit`]), which never overlap, so the pbs can tell a refusal of the
//!   forced command (retrying will not help) from a failed run.

pub mod args;
pub mod events;
pub mod exit;
pub mod params;

pub use args::{AgentCommand, BackupCommand, CommandError, RestoreCommand};
pub use events::{
    AgentEvent, AgentProgress, AgentSummary, BackupProgress, BackupSummary, ErrorCode, ErrorEvent,
    ImportOutcome, RestoreProgress, RestoreSummary, StandbySummary, WarningEvent,
};
pub use exit::{AgentExit, WrapperExit};
pub use params::{
    BackupParams, BadSnapshot, Parent, RestoreParams, RunParams, SnapshotChoice, SnapshotPrefix,
    WRAPPER_ENV,
};
