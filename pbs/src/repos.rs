//! The repositories a process has open: each is opened (its key derived, its index
//! loaded) once and shared by `Arc` among every run that uses it — the daemon's pulls,
//! `pull --all`'s hosts — so a process holds one repository's memory per repository,
//! not one per run. The default repository is created here on first use, with a
//! random passphrase in a key file only its owner can read. A repository whose index
//! a prune has changed since it was loaded, or to whose view this process added a
//! million blobs, is loaded again for the next run.

use crate::error::CliError;
use crate::output::json_line;
use crate::site::RepoLocation;
use haul_repo::backend::Location;
use haul_repo::crypto::KdfParams;
use haul_repo::format::config::RepoConfig;
use haul_repo::{IndexedRepository, Repository};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub struct Repositories {
    open: Mutex<HashMap<Location, Arc<IndexedRepository>>>,
    cache_dir: Option<PathBuf>,
    /// Announce a created repository as a JSON line (else a sentence on stderr).
    json: bool,
}

impl Repositories {
    pub fn new(cache_dir: Option<PathBuf>, json: bool) -> Repositories {
        Repositories {
            open: Mutex::default(),
            cache_dir,
            json,
        }
    }

    /// The repository at `loc`, opened on first use (and created when it is a
    /// default one that does not exist yet).
    /// The index cache root of the repositories it opens.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.cache_dir.as_deref()
    }

    pub fn open(&self, loc: &RepoLocation) -> Result<Arc<IndexedRepository>, CliError> {
        self.get(loc, true)
    }

    /// [`Repositories::open`] without loading a stale view again: for a prune, which
    /// loads an index of its own.
    pub fn open_as_is(&self, loc: &RepoLocation) -> Result<Arc<IndexedRepository>, CliError> {
        self.get(loc, false)
    }

    fn get(&self, loc: &RepoLocation, current: bool) -> Result<Arc<IndexedRepository>, CliError> {
        // One at a time: two runs of one repository must not both derive its key.
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = open.get(&loc.location) {
            if !current {
                return Ok(r.clone());
            }
            // After a prune condemned packs, later runs answer from a new view (runs
            // still going keep theirs; see `haul_repo::prune`). So they do once this
            // process added many blobs to its view: in the table of a new one they take
            // 24 bytes each instead of 56, and a daemon's memory does not grow with
            // what it pulled since it started.
            if r.is_current()? && r.index().added_len() < RELOAD_AFTER_ADDED {
                return Ok(r.clone());
            }
            let fresh = Arc::new(r.reloaded()?);
            tracing::debug!(repository = %loc.location, "index loaded again");
            open.insert(loc.location.clone(), fresh.clone());
            return Ok(fresh);
        }
        if let Some(key) = loc.creatable() {
            create_default(loc, key, self.json)?;
        }
        let pass = loc.passphrase()?;
        let repo = Repository::open(loc.open_backend()?, &pass)?;
        let repo = Arc::new(repo.load_index(self.cache_dir.as_deref())?);
        tracing::debug!(repository = %loc.location, "repository open");
        open.insert(loc.location.clone(), repo.clone());
        Ok(repo)
    }

    /// Forgets the repositories no run uses any more (after the configuration changed).
    pub fn retain(&self, keep: impl Fn(&Location) -> bool) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|path, _| keep(path));
    }
}

/// Blobs a view may have added before later runs load the index again.
const RELOAD_AFTER_ADDED: usize = 1 << 20;

/// Creates a default repository with a random passphrase in a 0600 key file.
fn create_default(loc: &RepoLocation, key: &Path, json: bool) -> Result<(), CliError> {
    let dir = key.parent().expect("a key file in a directory");
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::Io(format!("repositories directory {}", dir.display()), e))?;
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret).expect("OS random numbers");
    let pass = hex::encode(secret);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key)
        .map_err(|e| {
            CliError::Io(
                format!(
                    "cannot create key file {} (if it is left from an earlier attempt and {} holds no repository, remove it)",
                    key.display(),
                    loc.location
                ),
                e,
            )
        })?;
    f.write_all(pass.as_bytes())
        .and_then(|_| f.write_all(b"\n"))
        .and_then(|_| f.sync_all())
        .map_err(|e| CliError::Io(format!("key file {}", key.display()), e))?;
    let backend = loc.location.create(loc.credentials.as_deref())?;
    let repo = Repository::init(
        backend,
        pass.as_bytes(),
        // The passphrase is 256 random bits: see `KdfParams::RANDOM_SECRET`.
        KdfParams::RANDOM_SECRET,
        RepoConfig::new(haul_repo::format::config::DEFAULT_COMPRESSION),
    )?;
    if json {
        json_line(
            &serde_json::json!({"type": "init", "repository": loc.location.to_string(), "key_file": key, "id": repo.config().id}),
        );
    } else {
        crate::errln!(
            "created repository {} at {}\nits key is in {}: keep a copy of that file somewhere safe, without it nothing in the repository can be read",
            &repo.config().id[..8],
            loc.location,
            key.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::site::KeySource;
    use haul_protocol::{BlobKind, PackId};
    use haul_repo::format::pack_header::PackEntry;

    /// A view that added a million blobs is loaded again for the next run; one that
    /// added fewer is shared as it is.
    #[test]
    fn a_view_that_added_a_million_blobs_is_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let loc = RepoLocation {
            location: Location::Local(dir.path().join("repo")),
            key: KeySource::Generated(dir.path().join("repo.key")),
            credentials: None,
        };
        let repos = Repositories::new(Some(dir.path().join("cache")), true);
        let first = repos.open(&loc).unwrap();
        let entries = |from: usize, n: usize| -> Vec<PackEntry> {
            (from..from + n)
                .map(|i| {
                    let mut id = [0u8; 32];
                    id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                    PackEntry {
                        kind: BlobKind::Data,
                        id,
                        offset: 0,
                        length: 1,
                        raw_length: 1,
                    }
                })
                .collect()
        };
        first
            .index()
            .add_pack(PackId([1; 32]), &entries(0, RELOAD_AFTER_ADDED - 1));
        let same = repos.open(&loc).unwrap();
        assert!(Arc::ptr_eq(&first, &same));
        first
            .index()
            .add_pack(PackId([2; 32]), &entries(RELOAD_AFTER_ADDED, 1));
        let fresh = repos.open(&loc).unwrap();
        assert!(!Arc::ptr_eq(&first, &fresh));
        assert_eq!(fresh.index().added_len(), 0);
        // And the new view is the one shared from then on.
        assert!(Arc::ptr_eq(&fresh, &repos.open(&loc).unwrap()));
    }
}
