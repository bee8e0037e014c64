//! A run as the history keeps it ([`RunRecord`]), and the types of its fields: what
//! kind of run, how it ended, what it counted and, when it failed, why and whether
//! trying again can help. The history file, the feeds, the status document, the
//! metrics and the daemon's schedule all read these fields, never words in a string.
//!
//! The JSON form is the history's (`STATE/runs.jsonl`): kinds, statuses and transports
//! are lower-case words, so a record written before a field existed still reads (a
//! missing field takes its default).

use haul_repo::format::snapshot::Summary;
use serde::{Deserialize, Serialize};

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// A backup through an agent.
    Pull,
    /// A restore through an agent.
    Restore,
    /// An rdiff-backup history imported.
    Import,
    /// Snapshots removed (by a keep policy or by id).
    Forget,
    /// The repository checked.
    Check,
    /// The space of data no snapshot uses reclaimed.
    Prune,
    /// A snapshot pushed to a clone's standby copy.
    Push,
    /// A host's snapshots copied into another repository (`[[copy]]`).
    Copy,
    /// No run: the daemon's warning about a host (stale, or a failure it will not
    /// retry by itself).
    Alert,
}

impl RunKind {
    pub fn word(self) -> &'static str {
        match self {
            RunKind::Pull => "pull",
            RunKind::Restore => "restore",
            RunKind::Import => "import",
            RunKind::Forget => "forget",
            RunKind::Check => "check",
            RunKind::Prune => "prune",
            RunKind::Push => "push",
            RunKind::Copy => "copy",
            RunKind::Alert => "alert",
        }
    }
}

impl std::fmt::Display for RunKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.word())
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Ok,
    /// It did its work, not cleanly: a snapshot was saved but some files could not be
    /// read, a restore skipped damaged entries, or an alert.
    Warning,
    Failed,
}

impl RunStatus {
    pub const ALL: [RunStatus; 3] = [RunStatus::Ok, RunStatus::Warning, RunStatus::Failed];

    pub fn word(self) -> &'static str {
        match self {
            RunStatus::Ok => "ok",
            RunStatus::Warning => "warning",
            RunStatus::Failed => "failed",
        }
    }

    /// The word monitors look for in a feed item's title.
    pub fn shout(self) -> &'static str {
        match self {
            RunStatus::Ok => "OK",
            RunStatus::Warning => "WARNING",
            RunStatus::Failed => "FAILED",
        }
    }

    /// A pull that ended so saved a snapshot.
    pub fn saved(self) -> bool {
        matches!(self, RunStatus::Ok | RunStatus::Warning)
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.word())
    }
}

/// How the pbs reached the agent of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TransportKind {
    #[serde(rename = "ssh")]
    Ssh,
    #[serde(rename = "local")]
    Local,
    /// No agent (an alert).
    #[serde(rename = "-")]
    None,
}

impl TransportKind {
    pub fn word(self) -> &'static str {
        match self {
            TransportKind::Ssh => "ssh",
            TransportKind::Local => "local",
            TransportKind::None => "-",
        }
    }
}

impl From<haul_config::Transport> for TransportKind {
    fn from(t: haul_config::Transport) -> Self {
        match t {
            haul_config::Transport::Ssh => TransportKind::Ssh,
            haul_config::Transport::Local => TransportKind::Local,
        }
    }
}

/// What a pull stored, as the server counted it: the summary of the snapshot it
/// committed (files, directories and sizes as the source reported them in its commit —
/// a host can only misstate its own data; blobs and bytes new and stored as the
/// repository counted them) and the request bytes it received.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    #[serde(flatten)]
    pub snapshot: Summary,
    /// Request body bytes the server received from the agent.
    pub bytes_received: u64,
}

impl std::ops::Deref for Counters {
    type Target = Summary;
    fn deref(&self) -> &Summary {
        &self.snapshot
    }
}

impl Counters {
    pub fn files(&self) -> u64 {
        self.files_new + self.files_changed + self.files_unchanged
    }
}

/// What runs other than pulls did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Details {
    Import(ImportDetails),
    Forget(ForgetDetails),
    Check(CheckDetails),
    Prune(PruneDetails),
    Push(PushDetails),
    Copy(CopyDetails),
    /// An alert about a clone's copy of the host, not about the host's own backups.
    CloneAlert(CloneAlertDetails),
}

/// Which clone an alert is about.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CloneAlertDetails {
    pub clone: String,
}

/// What a push did, as the clone's agent reported it and the server counted it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PushDetails {
    /// The clone, by its name in the configuration.
    pub clone: String,
    /// The standby directory on the clone.
    pub dir: String,
    /// Whether the standby copy now holds the snapshot.
    pub replaced: bool,
    pub files: u64,
    pub dirs: u64,
    pub others: u64,
    /// Files unchanged since the copy it replaced (hard links there, nothing sent).
    pub files_linked: u64,
    /// Bytes of content written on the clone.
    pub bytes_written: u64,
    /// Of those, bytes taken from chunks the clone already held.
    pub bytes_local: u64,
    /// Response bytes the server sent (trees and chunks, compressed).
    pub bytes_sent: u64,
    /// Chunks sent as deltas against chunks of the clone's old copy.
    pub chunks_delta: u64,
    /// The clone's import command, when it ran.
    pub import: Option<haul_protocol::agent::ImportOutcome>,
}

impl PushDetails {
    /// Files written anew (changed or new since the copy it replaced).
    pub fn files_changed(&self) -> u64 {
        self.files.saturating_sub(self.files_linked)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PruneDetails {
    /// Where the repository is.
    pub repository: String,
    pub snapshots: u64,
    pub packs_deleted: u64,
    pub packs_repacked: u64,
    pub packs_kept: u64,
    pub packs_written: u64,
    /// Condemned packs indexed again: snapshots committed during the prune use them.
    pub packs_rescued: u64,
    /// Condemned packs left for the next prune (pulls older than the condemnation
    /// still ran).
    pub packs_pending: u64,
    pub bytes_freed: u64,
    /// Bytes of the packs in storage, before and after.
    pub storage_before: u64,
    pub storage_after: u64,
    /// Stored bytes no snapshot uses, left in kept packs.
    pub unused_after: u64,
}

impl PruneDetails {
    pub fn of(r: &haul_repo::prune::PruneReport) -> PruneDetails {
        PruneDetails {
            repository: String::new(),
            snapshots: r.snapshots as u64,
            packs_deleted: r.packs_deleted as u64,
            packs_repacked: r.plan.repack.len() as u64,
            packs_kept: r.plan.keep as u64,
            packs_written: r.packs_written as u64,
            packs_rescued: r.packs_rescued as u64,
            packs_pending: r.packs_pending as u64,
            bytes_freed: r.storage_freed(),
            storage_before: r.storage_before,
            storage_after: r.storage_after,
            unused_after: r.plan.unused_after,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImportDetails {
    /// The rdiff-backup tree, canonical: what retiring a legacy tree compares with.
    pub rdiff_dir: String,
    pub sessions_imported: u64,
    pub sessions_skipped: u64,
    pub files_rebuilt: u64,
    pub bytes_new: u64,
    /// Files of the newest session verified against the rdiff-backup mirror (none:
    /// not verified).
    pub files_verified: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ForgetDetails {
    /// The snapshots removed (full ids).
    pub removed: Vec<String>,
    pub kept: u64,
    /// The legacy rdiff-backup tree removed after this retention.
    pub legacy_rdiff_dir_removed: Option<String>,
}

/// What a copy into another repository did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CopyDetails {
    /// The `[[copy]]` it ran for (empty for the command line's).
    pub copy: String,
    /// Where it copied to.
    pub to: String,
    pub copied: u64,
    pub skipped: u64,
    /// Bytes read from this repository and stored in that one.
    pub bytes_copied: u64,
}

impl CopyDetails {
    /// `1 snapshot copied to offsite, 2 already there, 54.0 MiB sent`.
    pub fn summary(&self) -> String {
        format!(
            "{} snapshot(s) copied to {}, {} already there, {} sent",
            self.copied,
            if self.copy.is_empty() {
                &self.to
            } else {
                &self.copy
            },
            self.skipped,
            crate::output::bytes(self.bytes_copied)
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckDetails {
    /// Where the repository checked is (its storage's location).
    pub repository: String,
    pub snapshots: u64,
    pub packs: u64,
    pub blobs: u64,
    pub bytes_read: u64,
    pub errors: u64,
    pub read_data: bool,
    /// Packs read whole (a subset, or all with read_data).
    pub packs_read: u64,
    /// The part of the packs read whole (`2/30`, `10%`), if not all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Stored bytes no snapshot uses.
    pub unused_bytes: u64,
}

/// Why a run failed, as far as it matters for what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The host could not be reached (no connection, a timeout).
    Unreachable,
    /// The connection went away during the run.
    Cut,
    /// The agent went silent for the stall timeout.
    Stalled,
    /// The host's key is not the pinned one (or none is pinned).
    HostKey,
    /// The host refused the pbs's key.
    Authentication,
    /// The host's forced command refused the run, its policy is invalid, or the
    /// agent could not start there.
    Refused,
    /// Something on this side is set up wrong: an identity, a forward, a path.
    Setup,
    /// The agent refused its input (bad flags or parameters).
    Usage,
    /// A backup path could not be read when the backup started (missing, unmounted,
    /// no permission): retried, as a mount may come back.
    Source,
    /// The agent failed during the run.
    Agent,
    /// The repository could not be opened or written.
    Repository,
    /// The pbs stopped during the run (killed, or its grace period ran out).
    Interrupted,
}

impl ErrorKind {
    /// Whether trying again later can help by itself. A changed host key, a refused
    /// key or command, or a wrong setup needs a person: the daemon alerts at once
    /// instead of retrying every so often.
    pub fn retry(self) -> bool {
        !matches!(
            self,
            ErrorKind::HostKey
                | ErrorKind::Authentication
                | ErrorKind::Refused
                | ErrorKind::Setup
                | ErrorKind::Usage
        )
    }
}

/// A run's failure: what kind, and the sentence that says what and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RunError {
    pub kind: ErrorKind,
    pub message: String,
}

impl RunError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> RunError {
        RunError {
            kind,
            message: message.into(),
        }
    }
}

/// One run, as recorded in the run history (`history.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "OnDisk")]
pub struct RunRecord {
    pub id: String,
    pub host: String,
    pub kind: RunKind,
    pub transport: TransportKind,
    pub start: chrono::DateTime<chrono::Utc>,
    pub end: chrono::DateTime<chrono::Utc>,
    pub status: RunStatus,
    pub snapshot: Option<String>,
    /// A pull's figures (see [`Counters`]).
    #[serde(default)]
    pub counters: Option<Counters>,
    /// What other kinds of run did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
    #[serde(default)]
    pub connections: u64,
    #[serde(default)]
    pub agent_peak_rss_kib: u64,
    #[serde(default)]
    pub pbs_peak_rss_kib: u64,
    #[serde(default)]
    pub output_tail: Vec<String>,
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
}

/// A record as any version wrote it. Before `details` existed, imports, forgets and
/// checks kept their figures in `counters` under other names: they are read into
/// `details`, so the decisions that rest on them (retiring a legacy rdiff-backup tree)
/// still see them.
#[derive(Deserialize)]
struct OnDisk {
    id: String,
    host: String,
    kind: RunKind,
    transport: TransportKind,
    start: chrono::DateTime<chrono::Utc>,
    end: chrono::DateTime<chrono::Utc>,
    status: RunStatus,
    snapshot: Option<String>,
    #[serde(default)]
    counters: Option<serde_json::Value>,
    #[serde(default)]
    details: Option<Details>,
    #[serde(default)]
    connections: u64,
    #[serde(default)]
    agent_peak_rss_kib: u64,
    #[serde(default)]
    pbs_peak_rss_kib: u64,
    #[serde(default)]
    output_tail: Vec<String>,
    error: Option<String>,
    #[serde(default)]
    error_kind: Option<ErrorKind>,
}

impl From<OnDisk> for RunRecord {
    fn from(d: OnDisk) -> RunRecord {
        let number = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
        let (counters, details) = match (d.kind, d.counters, d.details) {
            (_, c, Some(details)) => (
                c.and_then(|c| serde_json::from_value(c).ok()),
                Some(details),
            ),
            (RunKind::Pull, c, None) => (c.and_then(|c| serde_json::from_value(c).ok()), None),
            (RunKind::Import, Some(c), None) => (
                None,
                Some(Details::Import(ImportDetails {
                    rdiff_dir: c["rdiff_dir"].as_str().unwrap_or_default().to_string(),
                    sessions_imported: number(&c, "sessions_imported"),
                    sessions_skipped: number(&c, "sessions_skipped"),
                    files_rebuilt: number(&c, "files_new"),
                    bytes_new: number(&c, "bytes_new"),
                    files_verified: c["files_verified"].as_u64(),
                })),
            ),
            (RunKind::Forget, Some(c), None) => (
                None,
                Some(Details::Forget(ForgetDetails {
                    removed: c["snapshots_removed"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default(),
                    kept: number(&c, "kept"),
                    legacy_rdiff_dir_removed: c["legacy_rdiff_dir_removed"]
                        .as_str()
                        .map(String::from),
                })),
            ),
            (RunKind::Check, Some(c), None) => (
                None,
                Some(Details::Check(CheckDetails {
                    snapshots: number(&c, "snapshots"),
                    packs: number(&c, "packs"),
                    blobs: number(&c, "blobs"),
                    bytes_read: number(&c, "bytes_read"),
                    errors: number(&c, "errors"),
                    read_data: c["read_data"].as_bool().unwrap_or(false),
                    ..CheckDetails::default()
                })),
            ),
            _ => (None, None),
        };
        RunRecord {
            id: d.id,
            host: d.host,
            kind: d.kind,
            transport: d.transport,
            start: d.start,
            end: d.end,
            status: d.status,
            snapshot: d.snapshot,
            counters,
            details,
            connections: d.connections,
            agent_peak_rss_kib: d.agent_peak_rss_kib,
            pbs_peak_rss_kib: d.pbs_peak_rss_kib,
            output_tail: d.output_tail,
            error: d.error,
            error_kind: d.error_kind,
        }
    }
}

/// The push runs of `host` to `clone` among `records`, in their order.
pub fn pushes_of<'a>(
    records: &'a [RunRecord],
    host: &'a str,
    clone: &'a str,
) -> impl DoubleEndedIterator<Item = &'a RunRecord> {
    records.iter().filter(move |r| {
        r.host == host
            && r.kind == RunKind::Push
            && matches!(&r.details, Some(Details::Push(d)) if d.clone == clone)
    })
}

impl RunRecord {
    /// A run of `kind` on `host` that started at `start` and ends now, without figures
    /// yet: `ok` until told otherwise.
    pub fn new(
        id: String,
        host: &str,
        kind: RunKind,
        transport: TransportKind,
        start: chrono::DateTime<chrono::Utc>,
    ) -> RunRecord {
        RunRecord {
            id,
            host: host.into(),
            kind,
            transport,
            start,
            end: chrono::Utc::now(),
            status: RunStatus::Ok,
            snapshot: None,
            counters: None,
            details: None,
            connections: 0,
            agent_peak_rss_kib: 0,
            pbs_peak_rss_kib: haul_protocol::peak_rss_kib(),
            output_tail: Vec::new(),
            error: None,
            error_kind: None,
        }
    }

    /// Marks the run failed with `error`.
    pub fn failed(mut self, error: &RunError) -> RunRecord {
        self.status = RunStatus::Failed;
        self.error = Some(error.message.clone());
        self.error_kind = Some(error.kind);
        self
    }

    pub fn with_details(mut self, details: Details) -> RunRecord {
        self.details = Some(details);
        self
    }

    pub fn seconds(&self) -> f64 {
        (self.end - self.start).num_milliseconds().max(0) as f64 / 1000.0
    }

    /// The snapshot's short id, or `-`.
    pub fn short_snapshot(&self) -> &str {
        self.snapshot
            .as_deref()
            .map_or("-", |s| &s[..8.min(s.len())])
    }
}

/// A run id: sortable by time, unique.
pub fn new_run_id(now: chrono::DateTime<chrono::Utc>) -> String {
    let mut r = [0u8; 4];
    getrandom::getrandom(&mut r).expect("OS random numbers");
    format!("{}-{}", now.format("%Y%m%dT%H%M%SZ"), hex::encode(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_written_before_the_typed_fields_still_reads() {
        // An import record of an earlier version: its counters held other names.
        let old = r#"{"id":"r1","host":"a","kind":"import","transport":"local","start":"2026-01-01T00:00:00Z","end":"2026-01-01T00:00:01Z","status":"ok","snapshot":null,"counters":{"sessions_imported":3,"rdiff_dir":"/x"},"connections":0,"agent_peak_rss_kib":0,"pbs_peak_rss_kib":0,"output_tail":[],"error":null}"#;
        let r: RunRecord = serde_json::from_str(old).unwrap();
        assert_eq!(r.kind, RunKind::Import);
        assert_eq!(r.status, RunStatus::Ok);
        let Some(Details::Import(d)) = &r.details else {
            panic!("{r:?}")
        };
        assert_eq!((d.sessions_imported, d.rdiff_dir.as_str()), (3, "/x"));
        assert_eq!(d.files_verified, None);
        let forget = old.replace("\"import\"", "\"forget\"").replace(
            r#"{"sessions_imported":3,"rdiff_dir":"/x"}"#,
            r#"{"removed":1,"kept":2,"snapshots_removed":["ab"]}"#,
        );
        let r: RunRecord = serde_json::from_str(&forget).unwrap();
        let Some(Details::Forget(d)) = &r.details else {
            panic!("{r:?}")
        };
        assert_eq!((d.removed.as_slice(), d.kept), (&["ab".to_string()][..], 2));
        // Written again, it reads the same.
        let again: RunRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(again.details, r.details);
        let alert = r#"{"id":"r2","host":"a","kind":"alert","transport":"-","start":"2026-01-01T00:00:00Z","end":"2026-01-01T00:00:01Z","status":"warning","snapshot":null,"counters":null,"error":"stale"}"#;
        let r: RunRecord = serde_json::from_str(alert).unwrap();
        assert_eq!(r.transport, TransportKind::None);
    }

    #[test]
    fn only_failures_a_person_must_fix_are_not_retried() {
        assert!(ErrorKind::Unreachable.retry() && ErrorKind::Cut.retry());
        assert!(!ErrorKind::HostKey.retry() && !ErrorKind::Refused.retry());
    }
}
