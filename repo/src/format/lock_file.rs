//! Lock files: who holds a lock on the repository, and since when.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    /// Exclusive locks (prune) exclude every other lock; shared ones (backups,
    /// checks, restores) only exclusive ones.
    pub exclusive: bool,
    /// When the holder last confirmed it is alive.
    pub time: chrono::DateTime<chrono::Utc>,
    pub hostname: String,
    pub pid: u32,
    /// What the holder is doing, for messages ("backup-local", "prune").
    pub purpose: String,
}
