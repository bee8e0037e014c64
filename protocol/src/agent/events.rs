//! The agent's stdout: one JSON object per line, [`AgentEvent`], told apart by its
//! `type`. During a run, `progress` about once a second (only when stdout is not a
//! terminal) and `warning`s; at the end, one `summary` or one `error`.
//!
//! The field names are the wire format: pbs versions read them, older ones as untyped
//! JSON, so a field is never renamed or removed, only added. A reader should skip a line
//! it cannot read (an agent newer than it may print events it does not know); an
//! [`ErrorCode`] it does not know reads as [`ErrorCode::Unknown`].

use super::exit::AgentExit;
use crate::restore::ProblemKind;
use crate::wire::RunCounters;
use serde::{Deserialize, Serialize};

/// One line of the agent's stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentEvent {
    Progress(AgentProgress),
    /// A problem with one entry that did not stop the run.
    Warning(WarningEvent),
    /// The run is done (its exit code says whether with warnings).
    Summary(AgentSummary),
    /// The run failed; nothing was committed, or the restore target was left alone.
    Error(ErrorEvent),
}

impl AgentEvent {
    /// The event as its line, without the newline.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("agent events serialize")
    }

    pub fn from_line(line: &str) -> Result<AgentEvent, serde_json::Error> {
        serde_json::from_str(line)
    }
}

/// Progress of either command; the fields tell them apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AgentProgress {
    Backup(BackupProgress),
    Restore(RestoreProgress),
}

/// Counters so far, as the walker and the uploader see them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupProgress {
    /// Files walked (new, changed and unchanged).
    pub files: u64,
    pub dirs: u64,
    pub bytes_read: u64,
    /// Bytes uploaded (compressed).
    pub bytes_sent: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreProgress {
    /// Files written.
    pub files: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarningEvent {
    pub path: String,
    /// What the problem means for the entry; restores say it, backups do not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ProblemKind>,
    pub message: String,
}

/// The summary of either command; the fields tell them apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AgentSummary {
    Backup(BackupSummary),
    Restore(RestoreSummary),
}

/// A committed backup, as the agent saw it. The pbs trusts the counters the server
/// verified over these: a hostile agent may print anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSummary {
    /// The committed snapshot's id.
    pub snapshot: String,
    /// The parent the server chose (null: none).
    pub parent: Option<String>,
    /// The counters the agent sent with its commit, as fields of their own.
    #[serde(flatten)]
    pub counters: RunCounters,
    /// Plaintext bytes of the blobs the server did not have.
    pub bytes_new: u64,
    /// Bytes uploaded (compressed).
    pub bytes_sent: u64,
    pub blobs_sent: u64,
    /// Bytes the server added to the repository (as it answered the commit).
    pub bytes_stored: u64,
    /// Connections the agent opened to the server.
    pub connections: u64,
    pub peak_rss_kib: u64,
    pub duration_ms: u64,
}

/// A complete restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreSummary {
    pub snapshot: String,
    /// The target directory, absolute.
    pub target: String,
    pub files: u64,
    pub dirs: u64,
    /// Entries that are neither files nor directories (symlinks, devices, fifos).
    pub others: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    pub warnings: u64,
    /// Connections the agent opened to the server.
    pub connections: u64,
    pub peak_rss_kib: u64,
    pub duration_ms: u64,
    /// A standby push (`--standby`): what it took from the copy it replaced, and how
    /// its import command ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<StandbySummary>,
}

/// What a standby push did beyond a restore. The copy was replaced when this is sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandbySummary {
    /// Files unchanged since the copy it replaced: hard links to them, nothing read.
    pub files_linked: u64,
    /// Bytes of changed files taken from chunks the copy it replaced already held.
    pub bytes_local: u64,
    /// The import command, when one was asked for and the policy has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<ImportOutcome>,
}

/// How the clone's import command ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportOutcome {
    /// The command, as its words.
    pub command: Vec<String>,
    /// Its exit code; none if a signal ended it or it could not start.
    pub exit: Option<i32>,
    /// Why it could not start, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last lines it printed (standard output and error, interleaved).
    pub tail: Vec<String>,
    pub duration_ms: u64,
}

impl ImportOutcome {
    pub fn succeeded(&self) -> bool {
        self.exit == Some(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEvent {
    /// One line for a person: what failed and, where it can, what to do.
    pub message: String,
    /// Absent from agents older than the field: those read as [`ErrorCode::Unknown`].
    #[serde(default)]
    pub code: ErrorCode,
}

/// Where the fault of a failed run lies, for the pbs to decide what to do about it
/// without reading the message. The exit code follows from it ([`ErrorCode::exit`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The command line or the run parameters are wrong (an unknown flag, a bad exclude
    /// pattern, a misspelt parameter).
    Usage,
    /// The parameters require haul-wrapper, and the agent was not started by it: the
    /// key's line in `authorized_keys` lacks its forced command.
    WrapperRequired,
    /// A backup path cannot be read when the backup starts (missing, no permission).
    Source,
    /// The restore target cannot be used: it is not a new or empty directory.
    Target,
    /// An include path of a restore is not in the snapshot.
    Include,
    /// The repository server cannot be reached, or the connection to it broke.
    Connection,
    /// The repository server refused or failed a request; its own machine code is in
    /// the message.
    Server,
    /// The server's answer makes no sense to the agent (a malformed id, data that does
    /// not hash to its id): a damaged repository, or a pbs of another version.
    Protocol,
    /// Reading or writing local files failed in a way that ends the run (a full disk,
    /// a directory that cannot be created).
    Io,
    /// The agent itself failed (its runtime could not start, a thread panicked).
    Internal,
    /// The standby copy was replaced, but the clone's import command failed (its
    /// outcome is in the summary).
    Import,
    /// A code this side does not know (a newer agent), or none (an older one).
    #[default]
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The agent's exit code for a run that failed with this code.
    pub const fn exit(self) -> AgentExit {
        match self {
            ErrorCode::Usage | ErrorCode::WrapperRequired | ErrorCode::Source => AgentExit::Usage,
            _ => AgentExit::Failed,
        }
    }

    /// Whether running the same command again later may succeed without a person
    /// changing anything first.
    pub const fn retry_may_help(self) -> bool {
        matches!(
            self,
            ErrorCode::Connection
                | ErrorCode::Server
                | ErrorCode::Io
                | ErrorCode::Internal
                | ErrorCode::Import
                | ErrorCode::Unknown
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The lines as agents before these types printed them (serde_json sorts keys):
    /// each reads as its event and is written back with the same fields.
    #[test]
    fn events_keep_the_fields_agents_printed() {
        let lines = [
            json!({"type": "progress", "files": 3, "dirs": 1, "bytes_read": 10, "bytes_sent": 5}),
            json!({"type": "progress", "files": 3, "bytes": 10}),
            json!({"type": "warning", "path": "/srv/f", "message": "vanished"}),
            json!({"type": "warning", "path": "/srv/f", "kind": "not_restored", "message": "damaged"}),
            json!({"type": "summary", "snapshot": "ab", "parent": null, "files_new": 1,
                "files_changed": 2, "files_unchanged": 3, "dirs": 4, "bytes_read": 5,
                "bytes_total": 6, "bytes_new": 7, "bytes_sent": 8, "blobs_sent": 9,
                "bytes_stored": 10, "warnings": 11, "connections": 12, "peak_rss_kib": 13,
                "duration_ms": 14}),
            json!({"type": "summary", "snapshot": "ab", "target": "/t", "files": 1, "dirs": 2,
                "others": 3, "bytes": 4, "warnings": 5, "connections": 6, "peak_rss_kib": 7,
                "duration_ms": 8}),
        ];
        for line in lines {
            let event = AgentEvent::from_line(&line.to_string()).unwrap();
            let again: serde_json::Value = serde_json::from_str(&event.to_line()).unwrap();
            assert_eq!(again, line, "{event:?}");
        }
        // A field added later is read past; the old ones are still there.
        let line = json!({"type": "summary", "snapshot": "ab", "parent": "cd", "files_new": 1,
            "files_changed": 2, "files_unchanged": 3, "dirs": 4, "bytes_read": 5,
            "bytes_total": 6, "bytes_new": 7, "bytes_sent": 8, "blobs_sent": 9,
            "bytes_stored": 10, "warnings": 11, "connections": 12, "peak_rss_kib": 13,
            "duration_ms": 14, "added_later": true});
        let AgentEvent::Summary(AgentSummary::Backup(b)) =
            AgentEvent::from_line(&line.to_string()).unwrap()
        else {
            panic!("not a backup summary");
        };
        assert_eq!(b.parent.as_deref(), Some("cd"));
        assert_eq!((b.counters.files_unchanged, b.bytes_stored), (3, 10));
    }

    #[test]
    fn errors_carry_a_code_and_read_old_and_new_agents() {
        let e = AgentEvent::Error(ErrorEvent {
            message: "no".into(),
            code: ErrorCode::WrapperRequired,
        });
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&e.to_line()).unwrap(),
            json!({"type": "error", "message": "no", "code": "wrapper_required"})
        );
        let old = AgentEvent::from_line(r#"{"type":"error","message":"m"}"#).unwrap();
        let newer =
            AgentEvent::from_line(r#"{"type":"error","message":"m","code":"quota"}"#).unwrap();
        for e in [old, newer] {
            let AgentEvent::Error(e) = e else { panic!() };
            assert_eq!(e.code, ErrorCode::Unknown);
            assert_eq!(e.code.exit(), AgentExit::Failed);
        }
        assert!(AgentEvent::from_line(r#"{"type":"hello"}"#).is_err());
        assert_eq!(ErrorCode::Source.exit(), AgentExit::Usage);
        assert!(!ErrorCode::Usage.retry_may_help() && ErrorCode::Connection.retry_may_help());
    }
}
