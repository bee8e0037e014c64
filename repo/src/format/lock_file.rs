//! Lock files: who holds a lock on the repository, and since when.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    /// Exclusive locks (key removal, repairs) exclude every other lock; shared ones
    /// (backups, checks, restores, forget) only exclusive ones.
    pub exclusive: bool,
    /// A prune's lock: shared, but excluding another prune.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prune: bool,
    /// The same for every refresh of one lock (its file name changes): a prune's sweep
    /// waits for holders, not for files.
    #[serde(default)]
    pub holder: String,
    /// When the holder last confirmed it is alive.
    pub time: chrono::DateTime<chrono::Utc>,
    pub hostname: String,
    pub pid: u32,
    /// The holder's PID namespace (the inode of `/proc/self/ns/pid`; 0: unknown): a
    /// pid says whether a process lives only within its namespace.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pid_ns: u64,
    /// The holder's kernel boot id (`/proc/sys/kernel/random/boot_id`; empty: unknown):
    /// which machine, and which boot of it, its pid belongs to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub boot_id: String,
    /// What the holder is doing, for messages ("backup-local", "prune").
    pub purpose: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
