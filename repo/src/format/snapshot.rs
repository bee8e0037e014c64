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

/// The run's counters. A field missing from the JSON reads as 0 (run records embed
/// these and outlive versions).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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
    /// The snapshot this one was copied from (`haul-pbs copy`), in another repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<haul_protocol::SnapshotId>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_snapshot() -> impl Strategy<Value = Vec<u8>> {
        (
            0i64..4_000_000_000,
            "[a-z0-9-]{0,8}",
            proptest::collection::vec("/[a-z]{0,6}", 0..3),
            any::<[u8; 32]>(),
            proptest::option::of(any::<[u8; 32]>()),
            any::<(u64, u64, bool)>(),
        )
            .prop_map(
                |(secs, host, paths, tree, parent, (files_new, bytes_new, pretty))| {
                    let s = Snapshot {
                        time: chrono::DateTime::from_timestamp(secs, 0).unwrap(),
                        host,
                        paths,
                        tags: vec!["nightly".into()],
                        tree: TreeId(tree),
                        parent: parent.map(haul_protocol::SnapshotId),
                        source: SourceKind::Pull,
                        summary: Summary {
                            files_new,
                            bytes_new,
                            ..Summary::default()
                        },
                        original: parent.map(|p| haul_protocol::SnapshotId([p[0]; 32])),
                    };
                    if pretty {
                        serde_json::to_vec_pretty(&s).unwrap()
                    } else {
                        serde_json::to_vec(&s).unwrap()
                    }
                },
            )
    }

    proptest! {
        /// The stable counterpart of the `snapshot` fuzz target (docs/fuzzing.md): an
        /// accepted snapshot serializes and parses back to itself.
        #[test]
        fn hostile_snapshots_are_refused_or_round_trip(
            bytes in haul_mutate::inputs_with(arb_snapshot(), 200, haul_mutate::JSON),
        ) {
            if let Ok(s) = serde_json::from_slice::<Snapshot>(&bytes) {
                let again: Snapshot = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
                prop_assert_eq!(again, s);
            }
        }
    }
}
