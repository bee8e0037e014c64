//! Where this pbs keeps things, resolved once for every command: the configuration
//! file, the state directory (run history, feeds, markers) and the repositories with
//! their keys. The daemon, `pull HOST`, `pull --all`, `snapshots`, `restore` and `runs`
//! all resolve them here, so a host's pulls land in the same repository and history
//! however they were started, and browsing finds what a pull created.
//!
//! - Configuration: `--config`/`$HAUL_CONFIG`, else `/etc/haul/pbs.toml` when it
//!   exists and can be read, else none (the built-in defaults).
//! - State directory: `--state-dir`, else the configuration's `[server].state_dir`
//!   (whose default is `$HAUL_STATE_DIR`, `/var/lib/haul` for root, else
//!   `~/.local/state/haul`).
//! - Repository: `--repo` when given (with the passphrase from `--password-file`,
//!   `$HAUL_PASSWORD`, or a prompt); else the repository of the host the command is
//!   about (`[[host]].repository`, default `repo`) in `[server].repositories_dir`
//!   (default: the state directory), with its generated key file `<name>.key` beside
//!   it. A pull creates it, and its key file, on first use.

use crate::cli::Global;
use crate::error::CliError;
use crate::history::History;
use haul_config::{Config, Host};
use haul_repo::backend::Location;
use std::path::{Path, PathBuf};

/// The configuration file used when none is named and it exists.
pub const DEFAULT_CONFIG: &str = "/etc/haul/pbs.toml";

/// The repository a host uses unless it names another.
pub const DEFAULT_REPOSITORY: &str = "repo";

pub struct Site {
    /// The configuration, if there is one (an empty one otherwise).
    pub config: Config,
    /// The file it came from.
    pub config_path: Option<PathBuf>,
    /// The state directory.
    pub state: PathBuf,
    /// `--repo`: one repository for everything this command does.
    pub(crate) explicit_repo: Option<Location>,
    /// `--password-file`.
    pub(crate) password_file: Option<PathBuf>,
    /// `[server].repositories_dir`: a directory, or a prefix in a bucket.
    pub(crate) repositories: Location,
}

/// Where a repository is and how its passphrase is found.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoLocation {
    pub location: Location,
    pub key: KeySource,
    /// Where object-storage credentials are (`[server].s3_credentials_file`); else
    /// the environment.
    pub credentials: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeySource {
    /// `--password-file` (when set), `$HAUL_PASSWORD`, or a prompt.
    Given(Option<PathBuf>),
    /// The key file the pbs generated with the repository: created with it on first
    /// use by a pull.
    Generated(PathBuf),
}

impl Site {
    /// Resolves the site of a command from its global options (see the module doc).
    pub fn resolve(global: &Global) -> Result<Site, CliError> {
        let config_path = match &global.config {
            Some(p) => Some(p.clone()),
            // The default one only when this user can read it: `haul-pbs snapshots
            // --repo DIR` of a user other than the pbs's must not fail on it.
            None => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| std::fs::File::open(p).is_ok()),
        };
        let (config, config_path) = match config_path {
            Some(p) => match Config::load(&p) {
                Ok(c) => (c, Some(p)),
                // The default file, unreadable to this version, need not stop a command
                // given its repository (a restore in a hurry): said, and left out.
                Err(e) if global.config.is_none() && global.repo.is_some() => {
                    crate::errln!("haul-pbs: warning: {} (not used: --repo is given)", e.0);
                    (Config::default(), None)
                }
                Err(e) => return Err(CliError::usage(e.0)),
            },
            None => (Config::default(), None),
        };
        Site::with_config(config, config_path, global)
    }

    /// The site of a configuration already read (the daemon's, after a reload).
    pub fn with_config(
        config: Config,
        config_path: Option<PathBuf>,
        global: &Global,
    ) -> Result<Site, CliError> {
        let state = global
            .state_dir
            .clone()
            .unwrap_or_else(|| config.server.state_dir.clone());
        let repositories = match &config.server.repositories_dir {
            Some(d) => Location::parse(&d.to_string_lossy())
                .map_err(|e| CliError::usage(format!("[server].repositories_dir: {e}")))?,
            None => Location::Local(state.clone()),
        };
        Ok(Site {
            config,
            config_path,
            state,
            explicit_repo: global.repo.clone(),
            password_file: global.password_file.clone(),
            repositories,
        })
    }

    /// The configuration file's name, for messages.
    pub fn config_name(&self) -> String {
        self.config_path
            .as_ref()
            .map_or_else(|| DEFAULT_CONFIG.to_string(), |p| p.display().to_string())
    }

    /// The configuration must exist: for commands about configured hosts.
    pub fn require_config(&self) -> Result<&Config, CliError> {
        match &self.config_path {
            Some(_) => Ok(&self.config),
            None => Err(CliError::usage(format!(
                "no configuration: {DEFAULT_CONFIG} does not exist; give --config FILE or set HAUL_CONFIG"
            ))),
        }
    }

    /// The configured host `name`.
    pub fn host(&self, name: &str) -> Result<&Host, CliError> {
        let config = self.require_config()?;
        config.host(name).ok_or_else(|| {
            self.none_named("host", name, config.hosts.iter().map(|h| h.name.as_str()))
        })
    }

    /// The configured clone `name`.
    pub fn clone_target(&self, name: &str) -> Result<&haul_config::CloneTarget, CliError> {
        let config = self.require_config()?;
        config.clone_target(name).ok_or_else(|| {
            self.none_named("clone", name, config.clones.iter().map(|c| c.name.as_str()))
        })
    }

    /// No `what` called `name` in the configuration, which has `there`.
    fn none_named<'a>(
        &self,
        what: &str,
        name: &str,
        there: impl Iterator<Item = &'a str>,
    ) -> CliError {
        CliError::usage(format!(
            "no {what} {name:?} in {} ({what}s there: {})",
            self.config_name(),
            there.collect::<Vec<_>>().join(", ")
        ))
    }

    /// The run history, with the feeds the configuration describes.
    pub fn history(&self) -> History {
        History::new(self.state.clone())
            .with_feed(crate::feed::FeedOptions::from_config(&self.config))
            .with_notifiers(crate::notify::Notifiers::from_config(&self.config))
    }

    /// The repository named `name` in the repositories directory, with its key file:
    /// beside it in a directory; in the state directory for object storage.
    pub fn named_repository(&self, name: &str) -> RepoLocation {
        let keys = self.repositories.as_local().unwrap_or(&self.state);
        RepoLocation {
            location: self.repositories.join(name),
            key: match &self.password_file {
                Some(f) => KeySource::Given(Some(f.clone())),
                None => KeySource::Generated(keys.join(format!("{name}.key"))),
            },
            credentials: self.config.server.s3_credentials_file.clone(),
        }
    }

    /// The repository of `host` (a configured host's own, else the default one), or
    /// `--repo` when given.
    pub fn repository(&self, host: Option<&str>) -> RepoLocation {
        if let Some(location) = &self.explicit_repo {
            return RepoLocation {
                location: location.clone(),
                key: KeySource::Given(self.password_file.clone()),
                credentials: self.config.server.s3_credentials_file.clone(),
            };
        }
        let name = host
            .and_then(|h| self.config.host(h))
            .map_or(DEFAULT_REPOSITORY, |h| h.repository.as_str());
        self.named_repository(name)
    }

    /// Each repository the configured hosts use, once, in the order of the hosts: its
    /// name (`repository = "..."`), where it is, and the hosts that use it.
    pub fn host_repositories(&self) -> Vec<(String, RepoLocation, Vec<String>)> {
        let mut out: Vec<(String, RepoLocation, Vec<String>)> = Vec::new();
        for h in &self.config.hosts {
            let loc = self.repository(Some(&h.name));
            match out.iter_mut().find(|(_, l, _)| l.location == loc.location) {
                Some((_, _, hosts)) => hosts.push(h.name.clone()),
                None => out.push((h.repository.clone(), loc, vec![h.name.clone()])),
            }
        }
        out
    }

    /// Like [`Site::repository`], for a command that only uses an existing one: a
    /// repository that is not there is an error that says how to get one.
    pub fn existing_repository(&self, host: Option<&str>) -> Result<RepoLocation, CliError> {
        let loc = self.repository(host);
        if self.explicit_repo.is_none() && !loc.is_there() {
            return Err(CliError::usage(format!(
                "no repository at {} (the default one is created by the first `haul-pbs pull`): give --repo DIR or set HAUL_REPO, or --config/--state-dir to find the pbs's own",
                loc.location
            )));
        }
        Ok(loc)
    }
}

impl RepoLocation {
    /// The passphrase.
    pub fn passphrase(&self) -> Result<Vec<u8>, CliError> {
        match &self.key {
            KeySource::Given(file) => crate::password::current(file.as_deref()),
            // A repository made with `init` where the default one goes has no key
            // file: its passphrase comes from where `init` took it.
            KeySource::Generated(file) if !file.exists() => crate::password::current(None),
            KeySource::Generated(file) => crate::password::current(Some(file)),
        }
    }

    /// Whether a pull may create it: a generated key, and nothing there yet.
    pub fn creatable(&self) -> Option<&Path> {
        match &self.key {
            KeySource::Generated(key) if !self.is_there() => Some(key),
            _ => None,
        }
    }

    /// Whether a repository is there. Object storage is not asked (opening it says
    /// clearly if it is not there): one with a generated key is there once its key
    /// file is, since the key is written just before the repository is made.
    pub fn is_there(&self) -> bool {
        match (&self.location, &self.key) {
            (Location::Local(p), _) => p.join("config").exists(),
            (Location::S3(_), KeySource::Generated(key)) => key.exists(),
            (Location::S3(_), KeySource::Given(_)) => true,
        }
    }

    /// The repository's storage.
    pub fn open_backend(
        &self,
    ) -> Result<std::sync::Arc<dyn haul_repo::backend::Backend>, CliError> {
        Ok(self.location.open(self.credentials.as_deref())?)
    }
}
