//! One module per group of commands; [`Context`] is what they share.

pub mod admin;
pub mod backup;
pub mod browse;
pub mod check;
pub mod compare;
pub mod copy;
pub mod dump;
pub mod forget;
pub mod import;
pub mod mount;
pub mod prune;
pub mod pull;
pub mod push;
pub mod receive;
pub mod repair;
pub mod restore;
pub mod serve;
pub mod setup;
pub mod stats;

use crate::cli::Global;
use crate::error::CliError;
use crate::repos::Repositories;
use crate::site::Site;
use haul_repo::backend::Location;
use haul_repo::{IndexedRepository, Repository};
use std::path::PathBuf;
use std::sync::OnceLock;

pub struct Context {
    pub global: Global,
    site: OnceLock<Site>,
}

impl Context {
    pub fn new(global: Global) -> Self {
        Context {
            global,
            site: OnceLock::new(),
        }
    }

    /// Where things are (see `site.rs`), resolved on first use.
    pub fn site(&self) -> Result<&Site, CliError> {
        if let Some(s) = self.site.get() {
            return Ok(s);
        }
        let site = Site::resolve(&self.global)?;
        Ok(self.site.get_or_init(|| site))
    }

    /// The repository directory `init` creates: only ever the one named.
    pub fn repo_location(&self) -> Result<Location, CliError> {
        self.global.repo.clone().ok_or_else(|| {
            CliError::usage("no repository given: use --repo DIR or set HAUL_REPO (a pull creates the default one by itself)")
        })
    }

    /// The existing repository of `host` (see `Site::repository`): `--repo`, the
    /// host's configured one, else the default one.
    pub fn open_for(&self, host: Option<&str>) -> Result<Repository, CliError> {
        let loc = self.site()?.existing_repository(host)?;
        Ok(Repository::open(loc.open_backend()?, &loc.passphrase()?)?)
    }

    pub fn open(&self) -> Result<Repository, CliError> {
        self.open_for(None)
    }

    pub fn open_indexed_for(&self, host: Option<&str>) -> Result<IndexedRepository, CliError> {
        let repo = self.open_for(host)?;
        Ok(repo.load_index(self.cache_dir().as_deref())?)
    }

    pub fn open_indexed(&self) -> Result<IndexedRepository, CliError> {
        self.open_indexed_for(None)
    }

    /// The repository of `host` for a command that reads it, with its shared lock
    /// ([`Context::read_lock`]) taken before the index is loaded: a prune's sweep then
    /// either waits for this reader, or deleted its packs before the index was listed
    /// (see `haul_repo::prune`).
    pub fn open_for_reading(
        &self,
        host: Option<&str>,
        purpose: &str,
        cache: bool,
    ) -> Result<(IndexedRepository, Option<haul_repo::lock::LockGuard>), CliError> {
        let repo = self.open_for(host)?;
        let lock = self.read_lock(&repo, purpose)?;
        let cache = if cache { self.cache_dir() } else { None };
        Ok((repo.load_index(cache.as_deref())?, lock))
    }

    /// The repositories this process opens for runs (created on first use).
    pub fn repositories(&self) -> Repositories {
        Repositories::new(self.cache_dir(), self.global.json)
    }

    /// The shared lock of a command that only reads: none with `--no-lock`, or when
    /// the repository cannot take one (see `haul_repo::lock`).
    pub fn read_lock(
        &self,
        repo: &Repository,
        purpose: &str,
    ) -> Result<Option<haul_repo::lock::LockGuard>, CliError> {
        Ok(repo.lock_for_reading(!self.global.no_lock, purpose)?)
    }

    /// The index cache root, unless disabled.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        if self.global.no_cache {
            return None;
        }
        if let Some(d) = &self.global.cache_dir {
            return Some(d.clone());
        }
        if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
            return Some(PathBuf::from(x).join("haul"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("haul"))
    }

    /// Worker threads: by default twice the CPUs (at least 4), so that while some
    /// workers wait for the disk the others keep every CPU busy.
    pub fn threads(&self, requested: Option<usize>) -> usize {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        requested.unwrap_or((2 * cpus).max(4)).max(1)
    }
}

pub use haul_protocol::hostname;
