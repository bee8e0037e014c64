//! A pull, planned once: which host, how its agent is reached, which repository, what
//! the agent is asked to do, the time limits, what it may build on, the retention that
//! follows. The daemon, `pull HOST` and `pull --all` plan a configured host with
//! [`PullPlan::for_host`]; `pull --local` with [`PullPlan::local`]; all of them then
//! call the same `pipeline::pull`.

use crate::error::CliError;
use crate::server::conn::Limits;
use crate::site::{RepoLocation, Site};
use crate::transport::{AgentCall, Source};
use haul_config::{Host, Transport};
use haul_protocol::agent::{BackupCommand, BackupParams, Parent};
use haul_repo::forget::KeepPolicy;
use haul_repo::ingest::DedupScope;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a person can add to a configured host's pull on the command line (the daemon
/// uses none of it).
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    pub excludes: Vec<String>,
    pub exclude_caches: bool,
    pub one_file_system: bool,
    pub tags: Vec<String>,
    /// Read every file, ignoring the parent snapshot.
    pub force: bool,
    /// The agent binary for a local pull.
    pub agent: Option<PathBuf>,
    pub stall_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
}

/// A host's rdiff-backup tree whose history its first pull imports.
#[derive(Debug, Clone)]
pub struct LegacyTree {
    pub dir: PathBuf,
    /// The host's paths: an import needs exactly one.
    pub paths: Vec<PathBuf>,
    /// `keep_legacy_rdiff_dir`: never remove the tree.
    pub keep: bool,
}

#[derive(Debug, Clone)]
pub struct PullPlan {
    /// The host the snapshot belongs to.
    pub host: String,
    pub source: Source,
    pub repository: RepoLocation,
    pub call: AgentCall,
    pub limits: Limits,
    pub scope: DedupScope,
    /// Applied after a successful pull (empty: keep everything).
    pub retention: KeepPolicy,
    pub legacy: Option<LegacyTree>,
}

impl PullPlan {
    /// The pull of configured `host`, as the daemon runs it (plus `opts`).
    pub fn for_host(site: &Site, host: &Host, opts: &PullOptions) -> Result<PullPlan, CliError> {
        let config = &site.config;
        let source = match host.transport {
            Transport::Ssh => Source::Ssh(Box::new(host.clone())),
            Transport::Local => Source::Local {
                agent: agent_binary(opts.agent.as_deref().or(host.agent.as_deref())),
                socket_dir: config.server.socket_dir.clone(),
            },
        };
        let mut excludes = host.excludes.clone();
        excludes.extend(opts.excludes.iter().cloned());
        let mut tags = host.tags.clone();
        tags.extend(opts.tags.iter().cloned());
        Ok(PullPlan {
            host: host.name.clone(),
            source,
            repository: site.repository(Some(&host.name)),
            call: backup_call(&host.name, &host.paths, &excludes, &tags, opts)?,
            limits: limits(site, opts),
            scope: if config.server.cross_host_dedup.contains(&host.repository) {
                DedupScope::Repository
            } else {
                DedupScope::OwnHistory
            },
            retention: crate::commands::forget::policy_of_config(host.retention(config)),
            legacy: host.legacy_rdiff_dir.as_ref().map(|dir| LegacyTree {
                dir: dir.clone(),
                paths: host.paths.clone(),
                keep: host.keep_legacy_rdiff_dir,
            }),
        })
    }

    /// A pull of `paths` of this machine through a local agent, as host `name`.
    pub fn local(
        site: &Site,
        name: &str,
        paths: &[PathBuf],
        opts: &PullOptions,
    ) -> Result<PullPlan, CliError> {
        let mut absolute = Vec::new();
        for p in paths {
            absolute.push(
                std::path::absolute(p)
                    .map_err(|e| CliError::usage(format!("backup path {}: {e}", p.display())))?,
            );
        }
        Ok(PullPlan {
            host: name.to_string(),
            source: Source::Local {
                agent: agent_binary(opts.agent.as_deref()),
                socket_dir: site.config.server.socket_dir.clone(),
            },
            repository: site.repository(Some(name)),
            call: backup_call(name, &absolute, &opts.excludes, &opts.tags, opts)?,
            limits: limits(site, opts),
            scope: DedupScope::OwnHistory,
            retention: KeepPolicy::default(),
            legacy: None,
        })
    }
}

/// A push, planned once: which host's snapshot, to which clone's standby directory,
/// through which repository. `push HOST` and the daemon (after a pull) plan it with
/// [`PushPlan::for_clone`] and run it with `pipeline::push`.
#[derive(Debug, Clone)]
pub struct PushPlan {
    /// The host whose snapshot is pushed.
    pub host: String,
    /// The clone, by its name in the configuration.
    pub clone: String,
    pub source: Source,
    pub repository: RepoLocation,
    /// `latest` (the host's newest), or a snapshot id or prefix of the host's.
    pub snapshot: String,
    /// The host's standby directory on the clone.
    pub dir: PathBuf,
    /// Ask the clone to run its import command after the copy is replaced.
    pub import: bool,
    pub limits: Limits,
}

impl PushPlan {
    /// The push of `host`'s snapshot (`latest` or an id) to `clone`, which must
    /// receive the host.
    pub fn for_clone(
        site: &Site,
        host: &Host,
        clone: &haul_config::CloneTarget,
        snapshot: &str,
        opts: &PullOptions,
    ) -> Result<PushPlan, CliError> {
        if !clone.receives(&host.name) {
            return Err(CliError::usage(format!(
                "clone {:?} does not receive host {:?} (its `hosts` in {} are {}): nothing is pushed there",
                clone.name,
                host.name,
                site.config_name(),
                clone.hosts.join(", ")
            )));
        }
        let dir = clone.standby_dir_of(&host.name).ok_or_else(|| {
            CliError::usage(format!(
                "clone {:?} has no standby_dir for {:?}",
                clone.name, host.name
            ))
        })?;
        Ok(PushPlan {
            host: host.name.clone(),
            clone: clone.name.clone(),
            source: Source::Ssh(Box::new(clone.ssh_host())),
            repository: site.repository(Some(&host.name)),
            snapshot: snapshot.to_string(),
            dir,
            import: clone.import,
            limits: limits(site, opts),
        })
    }
}

fn limits(site: &Site, opts: &PullOptions) -> Limits {
    Limits {
        stall: opts
            .stall_timeout
            .unwrap_or(site.config.server.stall_timeout),
        request: opts
            .request_timeout
            .unwrap_or(site.config.server.request_timeout),
        ..Default::default()
    }
}

/// The agent's backup command and its run parameters.
fn backup_call(
    host: &str,
    paths: &[PathBuf],
    excludes: &[String],
    tags: &[String],
    opts: &PullOptions,
) -> Result<AgentCall, CliError> {
    let mut text = Vec::new();
    for p in paths {
        let p = p
            .to_str()
            .ok_or_else(|| CliError::usage(format!("backup path {} is not UTF-8", p.display())))?;
        text.push(p.to_string());
    }
    let command = BackupCommand {
        paths: text,
        excludes: excludes.to_vec(),
        exclude_caches: opts.exclude_caches,
        one_file_system: opts.one_file_system,
        ..Default::default()
    };
    let params = BackupParams {
        host: Some(host.to_string()),
        tags: tags.to_vec(),
        parent: Some(if opts.force {
            Parent::None
        } else {
            Parent::Latest
        }),
        require_wrapper: false,
    };
    Ok(AgentCall::backup(command, params))
}

/// The agent binary: the one named, else `haul-agent` beside this executable, else on
/// `$PATH`.
pub fn agent_binary(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Ok(exe) = std::env::current_exe() {
        let sibling = exe.with_file_name("haul-agent");
        if sibling.is_file() {
            return sibling;
        }
    }
    PathBuf::from("haul-agent")
}
