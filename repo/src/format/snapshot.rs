//! Snapshots: one backup's root tree and what is known about the run that made it.

use haul_protocol::TreeId;
use serde::{Deserialize, Serialize};

/// Where a snapshot's data came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// Pulled from a source host by the pbs.
    Pull,
    /// Read by the pbs from its own filesystem.
    Local,
    /// Imported from an rdiff-backup repository.
    RdiffBackupImport,
}

/// The run's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub files_new: u64,
    pub files_changed: u64,
    pub files_unchanged: u64,
    pub dirs: u64,
    /// Bytes read from source files.
    pub bytes_read: u64,
    /// Size of all files in the snapshot.
    pub bytes_total: u64,
    /// Plaintext bytes of blobs the repository did not have.
    pub bytes_new: u64,
    /// Of those, bytes of file content (the rest are trees).
    #[serde(default)]
    pub data_new: u64,
    /// Bytes added to the repository (compressed and sealed).
    pub bytes_stored: u64,
    pub blobs_new: u64,
    pub duration_ms: u64,
    pub warnings: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub time: chrono::DateTime<chrono::Utc>,
    pub host: String,
    pub paths: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub tree: TreeId,
    pub parent: Option<haul_protocol::SnapshotId>,
    pub source: SourceKind,
    pub summary: Summary,
}
