//! Where haul keeps things on the backup server. The TOML model of hosts and clones
//! comes with the daemon; for now this is the built-in default state directory, which
//! holds the default repository, its generated key file and the run records.

use std::path::PathBuf;

/// The state directory when none is configured: `$HAUL_STATE_DIR`; for root
/// `/var/lib/haul`; else `$XDG_STATE_HOME/haul` or `~/.local/state/haul`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HAUL_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/haul");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("haul");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/state/haul"),
        None => PathBuf::from("/var/lib/haul"),
    }
}

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir(pub PathBuf);

impl StateDir {
    /// The default repository.
    pub fn repo(&self) -> PathBuf {
        self.0.join("repo")
    }
    /// The generated passphrase of the default repository.
    pub fn key_file(&self) -> PathBuf {
        self.0.join("repo.key")
    }
    /// One JSON record per run.
    pub fn runs(&self) -> PathBuf {
        self.0.join("runs")
    }
}
