//! `pull --local PATH...`: a backup through the agent, over the ingest protocol, on
//! this machine. The repository server runs in this process on a private socket; the
//! agent is a child process that holds no key.

use super::{hostname, Context};
use crate::cli::{PullArgs, RunArgs};
use crate::error::CliError;
use crate::output::{bytes, json_line, Progress};
use crate::run::{self, RunRecord};
use crate::server::{Mode, Server};
use haul_config::StateDir;
use haul_repo::backend::LocalBackend;
use haul_repo::crypto::KdfParams;
use haul_repo::format::config::RepoConfig;
use haul_repo::format::snapshot::SourceKind;
use haul_repo::ingest::DedupScope;
use haul_repo::{IndexedRepository, Repository};
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

impl Context {
    pub fn state_dir(&self, run: &RunArgs) -> StateDir {
        StateDir(
            run.state_dir
                .clone()
                .unwrap_or_else(haul_config::default_state_dir),
        )
    }

    /// The repository a run uses: `--repo` (with the usual passphrase sources), else
    /// the state directory's default repository, opened with its generated key file
    /// and created on first use.
    pub fn open_for_run(&self, run: &RunArgs) -> Result<IndexedRepository, CliError> {
        let repo = if self.global.repo.is_some() {
            self.open_indexed()?
        } else {
            let state = self.state_dir(run);
            self.open_with_key_file(&state.repo(), &state.key_file())?
        };
        tracing::debug!("repository open");
        Ok(repo)
    }

    /// Opens the repository at `path` with the passphrase in `key` (or
    /// `--password-file`), creating both on first use.
    pub fn open_with_key_file(
        &self,
        path: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<IndexedRepository, CliError> {
        if !path.join("config").exists() {
            create_default(path, key, self.global.json)?;
        }
        let pass =
            crate::password::current(Some(self.global.password_file.as_deref().unwrap_or(key)))?;
        let repo = Repository::open(Arc::new(LocalBackend::open(path)?), &pass)?;
        Ok(repo.load_index(self.cache_dir().as_deref())?)
    }
}

/// Creates the default repository with a random passphrase in a 0600 key file.
fn create_default(
    path: &std::path::Path,
    key: &std::path::Path,
    json: bool,
) -> Result<(), CliError> {
    let dir = key.parent().expect("key file in the state directory");
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::Io(format!("state directory {}", dir.display()), e))?;
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
                    path.display()
                ),
                e,
            )
        })?;
    f.write_all(pass.as_bytes())
        .and_then(|_| f.write_all(b"\n"))
        .and_then(|_| f.sync_all())
        .map_err(|e| CliError::Io(format!("key file {}", key.display()), e))?;
    let backend = Arc::new(LocalBackend::create(path)?);
    let repo = Repository::init(
        backend,
        pass.as_bytes(),
        KdfParams::default(),
        RepoConfig::new(haul_repo::format::config::DEFAULT_COMPRESSION),
    )?;
    if json {
        json_line(
            &serde_json::json!({"type": "init", "repository": path, "key_file": key, "id": repo.config().id}),
        );
    } else {
        crate::errln!(
            "created repository {} at {}\nits key is in {}: keep a copy of that file somewhere safe, without it nothing in the repository can be read",
            &repo.config().id[..8],
            path.display(),
            key.display()
        );
    }
    Ok(())
}

/// What a pull runs: which host, how it is reached, and the agent's arguments.
struct Plan {
    /// The configuration the host came from (none for `--local`).
    config: Option<haul_config::Config>,
    host: String,
    ssh: Option<haul_config::Host>,
    transport: &'static str,
    args: Vec<String>,
    tags: Vec<String>,
}

fn plan(args: &PullArgs, config: Option<&haul_config::Config>) -> Result<Plan, CliError> {
    let mut loaded = None;
    let (host, ssh, paths, excludes, tags) =
        match &args.name {
            Some(name) => {
                let config = match config {
                    Some(c) => c.clone(),
                    None => {
                        haul_config::Config::load(&args.config).map_err(|e| CliError::usage(e.0))?
                    }
                };
                let config = loaded.insert(config);
                let h = config.host(name).ok_or_else(|| {
                    CliError::usage(format!(
                        "no host {name:?} in {} (hosts there: {})",
                        args.config.display(),
                        config
                            .hosts
                            .iter()
                            .map(|h| h.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
                let mut excludes = h.excludes.clone();
                excludes.extend(args.select.exclude.iter().cloned());
                let mut tags = h.tags.clone();
                tags.extend(args.select.tag.iter().cloned());
                let ssh = (h.transport == haul_config::Transport::Ssh).then(|| h.clone());
                (h.name.clone(), ssh, h.paths.clone(), excludes, tags)
            }
            None => {
                let mut paths = Vec::new();
                for p in &args.local {
                    paths.push(std::path::absolute(p).map_err(|e| {
                        CliError::usage(format!("backup path {}: {e}", p.display()))
                    })?);
                }
                let host = args.select.host.clone().unwrap_or_else(hostname);
                (
                    host,
                    None,
                    paths,
                    args.select.exclude.clone(),
                    args.select.tag.clone(),
                )
            }
        };
    let mut agent_args: Vec<String> = vec!["backup".into(), "--params-stdin".into()];
    for p in &paths {
        let p = p
            .to_str()
            .ok_or_else(|| CliError::usage(format!("backup path {} is not UTF-8", p.display())))?;
        agent_args.extend(["--path".to_string(), p.to_string()]);
    }
    for e in &excludes {
        agent_args.extend(["--exclude".to_string(), e.clone()]);
    }
    if args.select.exclude_caches {
        agent_args.push("--exclude-caches".into());
    }
    if args.select.one_file_system {
        agent_args.push("--one-file-system".into());
    }
    Ok(Plan {
        config: loaded,
        host,
        transport: if ssh.is_some() { "ssh" } else { "local" },
        ssh,
        args: agent_args,
        tags,
    })
}

pub fn pull(ctx: &Context, args: PullArgs) -> Result<(), CliError> {
    if !args.all {
        return pull_one(ctx, &args, None, None);
    }
    // Every host of the configuration, one after the other; a failure does not stop
    // the others. The exit code is the worst outcome.
    let config = haul_config::Config::load(&args.config).map_err(|e| CliError::usage(e.0))?;
    if config.hosts.is_empty() {
        return Err(CliError::usage(format!(
            "no [[host]] in {}",
            args.config.display()
        )));
    }
    let mut failed = Vec::new();
    let mut warned = Vec::new();
    // One repository for all hosts (see `server::keep`).
    let repo = crate::server::keep(ctx.open_for_run(&args.run)?);
    for h in &config.hosts {
        let one = PullArgs {
            name: Some(h.name.clone()),
            all: false,
            ..args.clone()
        };
        match pull_one(ctx, &one, Some(repo), Some(&config)) {
            Ok(()) => {}
            Err(CliError::Incomplete(_)) => warned.push(h.name.clone()),
            Err(e) => {
                crate::errln!("haul-pbs: {e}");
                failed.push(h.name.clone());
            }
        }
    }
    match (failed.is_empty(), warned.is_empty()) {
        (true, true) => Ok(()),
        (true, false) => Err(CliError::Incomplete(format!(
            "pulls of {} finished with warnings",
            warned.join(", ")
        ))),
        _ => Err(CliError::Failed(format!(
            "pulls of {} failed (see above); the other hosts were pulled",
            failed.join(", ")
        ))),
    }
}

/// Pulls one host (or `--local` paths) into `repo` (default: the run's repository),
/// with the host from `config` when given (else from `args.config`), and records the
/// run in the history.
pub fn pull_one(
    ctx: &Context,
    args: &PullArgs,
    repo: Option<&'static IndexedRepository>,
    config: Option<&haul_config::Config>,
) -> Result<(), CliError> {
    let start = chrono::Utc::now();
    let plan = plan(args, config)?;
    let host = plan.host.clone();
    let state = ctx.state_dir(&args.run);
    let history = crate::history::History::new(state.0.clone()).with_feed(
        plan.config
            .as_ref()
            .map(crate::feed::FeedOptions::from_config)
            .unwrap_or_default(),
    );
    let legacy = plan
        .config
        .as_ref()
        .and_then(|c| c.host(&host))
        .and_then(|h| h.legacy_rdiff_dir.as_ref().map(|dir| (h, dir)));
    // Over SSH, the connection is made while the repository opens: deriving its key
    // (Argon2id, ~0.15 s of one core here) takes longer than connecting,
    // authenticating and setting up the forward (~0.06 s). Not before a legacy import,
    // which takes long. A failure to connect is the run's failure, recorded below; a failure
    // to open the repository ends the command as before, and the connection is closed
    // unused (nothing was started on the host).
    tracing::debug!(%host, "pull starting");
    let mut connection = None;
    let repo = match (repo, &plan.ssh) {
        (Some(r), _) => r,
        (None, Some(h)) if legacy.is_none() => {
            let (repo, connected) = std::thread::scope(|s| {
                let opening = s.spawn(|| ctx.open_for_run(&args.run));
                let connected = crate::ssh::Connection::open(h);
                (
                    opening.join().expect("the thread opening the repository"),
                    connected,
                )
            });
            let repo = repo?;
            connection = Some(connected);
            crate::server::keep(repo)
        }
        (None, _) => crate::server::keep(ctx.open_for_run(&args.run)?),
    };
    if let Some((h, dir)) = legacy {
        legacy_import(ctx, &history, repo, h, dir)?;
    }
    let id = run::new_run_id(start);
    let marker = crate::history::Running {
        id: id.clone(),
        host: host.clone(),
        kind: "pull".into(),
        transport: plan.transport.into(),
        start,
        pid: std::process::id(),
        snapshot: None,
    };
    history.begin(&marker)?;
    let source = if plan.ssh.is_some() {
        SourceKind::Pull
    } else {
        SourceKind::Local
    };
    let marker_history = crate::history::History::new(history.state().to_path_buf());
    let stall = args
        .run
        .stall_timeout
        .or_else(|| plan.config.as_ref().map(|c| c.server.stall_timeout))
        .unwrap_or(crate::server::conn::Limits::default().stall);
    let own_packs = history.own_packs(&host);
    let scope = match plan
        .config
        .as_ref()
        .and_then(|c| c.host(&host).map(|h| (c, h)))
    {
        Some((c, h)) if c.server.cross_host_dedup.contains(&h.repository) => DedupScope::Repository,
        _ => DedupScope::OwnHistory,
    };
    let server = Server::new(repo, Mode::AppendOnly, Some(host.clone()))
        .with_source(source)
        .with_own_packs(own_packs.clone())
        .with_scope(scope)
        .with_limits(crate::server::conn::Limits {
            stall,
            request: args
                .run
                .request_timeout
                .or_else(|| plan.config.as_ref().map(|c| c.server.request_timeout))
                .unwrap_or(crate::server::conn::Limits::default().request),
            ..Default::default()
        })
        .on_commit(Box::new(move |snapshot| {
            let saved = crate::history::Running {
                snapshot: Some(snapshot.to_hex()),
                ..marker.clone()
            };
            if let Err(e) = marker_history.begin(&saved) {
                tracing::warn!("noting the saved snapshot in the run's marker: {e}");
            }
        }));
    let params = serde_json::json!({
        "host": host,
        "tags": plan.tags,
        "parent": if args.force { "none" } else { "latest" },
    });
    let agent = run::agent_binary(args.run.agent.as_deref());
    // The run's socket goes in [server].socket_dir when the configuration sets one
    // (else in a private temporary directory).
    let socket_dir = plan
        .config
        .as_ref()
        .and_then(|c| c.server.socket_dir.clone());
    let json = ctx.global.json;
    let last = Arc::new(Mutex::new(serde_json::Value::Null));
    let outcome = {
        let l = last.clone();
        let _progress = Progress::start(!json, move || {
            let v = l.lock().expect("progress").clone();
            format!(
                "{} files, {} read, {} sent",
                v["files"].as_u64().unwrap_or(0),
                bytes(v["bytes_read"].as_u64().unwrap_or(0)),
                bytes(v["bytes_sent"].as_u64().unwrap_or(0))
            )
        });
        let relay = |v: &serde_json::Value| {
            if v["type"] == "progress" {
                *last.lock().expect("progress") = v.clone();
            }
            if json {
                json_line(&serde_json::json!({"type": "agent", "event": v}));
            }
        };
        match &plan.ssh {
            // Connected already while the repository opened, or now.
            Some(h) => connection
                .unwrap_or_else(|| crate::ssh::Connection::open(h))
                .and_then(|c| c.run_agent(server.clone(), plan.args.clone(), Some(params), &relay)),
            None => run::run_agent(
                server.clone(),
                &agent,
                plan.args.iter().map(OsString::from).collect(),
                Some(params.to_string()),
                socket_dir.as_deref(),
                &relay,
            ),
        }
    };
    let end = chrono::Utc::now();
    // Both transports have ended the session by now (its packs are in `own_packs`).
    let committed = server.committed();
    if let Err(e) = history.settle_own_packs(&host, &own_packs, committed.is_some()) {
        tracing::warn!("{e}: the next pull sends again what this one sent");
    }
    let (status, error) = match &outcome {
        Err(e) => ("failed", Some(e.to_string())),
        Ok(r) => match (&committed, r.exit) {
            (Some(_), Some(0)) => ("ok", None),
            (Some(_), Some(3)) => ("warning", None),
            (Some(_), code) => (
                "warning",
                Some(format!(
                    "the snapshot is complete, but the agent ended abnormally after committing it ({})",
                    code.map_or("killed by a signal".to_string(), |c| format!("exit code {c}"))
                )),
            ),
            (None, _) => (
                "failed",
                Some(
                    r.error
                        .clone()
                        .unwrap_or_else(|| "the agent ended without committing a snapshot".into()),
                ),
            ),
        },
    };
    let record = RunRecord {
        id,
        host: host.clone(),
        kind: "pull".into(),
        transport: plan.transport.into(),
        start,
        end,
        status: status.into(),
        snapshot: committed.as_ref().map(|(id, _)| id.to_hex()),
        counters: outcome.as_ref().ok().and_then(|r| r.summary.clone()),
        connections: outcome.as_ref().map(|r| r.connections).unwrap_or(0),
        agent_peak_rss_kib: outcome.as_ref().map(|r| r.agent_peak_rss_kib).unwrap_or(0),
        pbs_peak_rss_kib: haul_protocol::peak_rss_kib(),
        output_tail: outcome.as_ref().map(|r| r.tail.clone()).unwrap_or_default(),
        error: error.clone(),
    };
    let saved = history.record(&record);
    tracing::debug!("run recorded");
    report(ctx, &record, outcome.as_ref().ok());
    saved?;
    // Retention only after a fully successful pull: its snapshot is the newest, which
    // retention never removes. A failure here is recorded as a failed `forget` run
    // (and reported); the pull itself stands.
    if status == "ok" {
        if let Some((c, h)) = plan
            .config
            .as_ref()
            .and_then(|c| c.host(&host).map(|h| (c, h)))
        {
            if let Err(e) = super::forget::after_pull(&history, repo, c, h) {
                crate::errln!("haul-pbs: {e}");
            }
        }
    }
    match status {
        "ok" => Ok(()),
        "warning" => Err(CliError::Incomplete(format!(
            "snapshot {} saved, but {}",
            record.snapshot.as_deref().map_or("?", |s| &s[..8]),
            error.unwrap_or_else(|| {
                "some files could not be read completely (see the warnings above)".into()
            })
        ))),
        _ => Err(CliError::Failed(format!(
            "pull of {host} failed: {}; no snapshot was written, existing snapshots are untouched",
            error.unwrap_or_default()
        ))),
    }
}

/// A host's first pull with `legacy_rdiff_dir`: imports that rdiff-backup history
/// (unless something of it is in the repository already), verifies the newest imported
/// snapshot against the rdiff-backup mirror, and records the import as a run of its
/// own. The pull that follows uses that snapshot as its parent (same host, same path).
/// A failed import is recorded and reported; the pull goes on, and the next one tries
/// the import again.
fn legacy_import(
    ctx: &Context,
    history: &crate::history::History,
    repo: &'static IndexedRepository,
    h: &haul_config::Host,
    dir: &std::path::Path,
) -> Result<(), CliError> {
    use super::import;
    let imported = repo.snapshots()?.into_iter().any(|(_, s)| {
        s.host == h.name
            && s.source == SourceKind::RdiffBackupImport
            && s.tags.iter().any(|t| t == import::TAG)
    });
    if imported {
        return Ok(());
    }
    let start = chrono::Utc::now();
    let json = ctx.global.json;
    let result = match h.paths.as_slice() {
        [one] => {
            let path = one.display().to_string();
            import::import(repo, dir, &h.name, &path, &mut |e| {
                if json {
                    if let import::Event::Imported { session, snapshot, .. } = e {
                        json_line(&serde_json::json!({"type": "imported", "session": session, "snapshot": snapshot.to_hex()}));
                    }
                } else if let import::Event::Imported { session, .. } = e {
                    crate::errln!("{}: imported rdiff-backup session {session}", h.name);
                }
            })
            .and_then(|outcome| {
                let verified = match &outcome.newest {
                    Some(newest) => import::verify(repo, dir, newest)?,
                    None => 0,
                };
                Ok((outcome, verified))
            })
        }
        _ => Err(CliError::usage(format!(
            "host {}: legacy_rdiff_dir needs a host with exactly one path (the one the rdiff-backup tree is a backup of)",
            h.name
        ))),
    };
    let (status, error, counters) = match &result {
        Ok((o, verified)) => (
            "ok",
            None,
            Some(
                serde_json::json!({"sessions_imported": o.imported, "sessions_skipped": o.skipped, "files_new": o.files_rebuilt, "bytes_new": o.bytes_new, "files_verified": verified, "rdiff_dir": import::canonical(dir)}),
            ),
        ),
        Err(e) => ("failed", Some(e.to_string()), None),
    };
    let mut record = RunRecord::bare(
        run::new_run_id(start),
        &h.name,
        ("import", "local"),
        start,
        status,
        error.clone().unwrap_or_default(),
    );
    record.error = error.clone();
    record.counters = counters;
    history.record(&record)?;
    match result {
        Ok((o, verified)) => {
            if !json {
                crate::errln!(
                    "{}: imported {} rdiff-backup sessions from {} ({} new); the newest is verified against its mirror ({verified} files)",
                    h.name,
                    o.imported,
                    dir.display(),
                    bytes(o.bytes_new)
                );
            }
        }
        Err(e) => crate::errln!(
            "haul-pbs: {}: the import of {} failed, the pull goes on without it: {e}",
            h.name,
            dir.display()
        ),
    }
    Ok(())
}

fn report(ctx: &Context, r: &RunRecord, run: Option<&run::AgentRun>) {
    if ctx.global.json {
        json_line(&serde_json::json!({"type": "run", "run": r}));
        return;
    }
    if let Some(run) = run {
        for w in &run.warnings {
            crate::errln!(
                "warning: {}: {}",
                w["path"].as_str().unwrap_or("?"),
                w["message"].as_str().unwrap_or("?")
            );
        }
        let more = run.warnings_total - run.warnings.len() as u64;
        if more > 0 {
            crate::errln!("... and {more} more warnings (`--json` relays every one)");
        }
    }
    let Some(c) = &r.counters else { return };
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    crate::outln!(
        "snapshot {} of {} saved: {} new, {} changed, {} unchanged files in {} dirs",
        r.snapshot.as_deref().map(|s| &s[..8]).unwrap_or("(none)"),
        r.host,
        n("files_new"),
        n("files_changed"),
        n("files_unchanged"),
        n("dirs")
    );
    crate::outln!(
        "{} read of {}, {} new, {} sent, in {:.1} s (run {})",
        bytes(n("bytes_read")),
        bytes(n("bytes_total")),
        bytes(n("bytes_new")),
        bytes(n("bytes_sent")),
        (r.end - r.start).num_milliseconds() as f64 / 1000.0,
        r.id
    );
}

/// `ssh-setup HOST`: what the host needs, printed to be pasted there.
pub fn ssh_setup(_ctx: &Context, args: crate::cli::SshSetupArgs) -> Result<(), CliError> {
    let config = haul_config::Config::load(&args.config).map_err(|e| CliError::usage(e.0))?;
    let h = config.host(&args.host).ok_or_else(|| {
        CliError::usage(format!(
            "no host {:?} in {}",
            args.host,
            args.config.display()
        ))
    })?;
    let key = russh::keys::load_secret_key(&h.identity, None).map_err(|e| {
        CliError::usage(format!(
            "identity {}: {e} (create one with `ssh-keygen -t ed25519 -N '' -f {}`)",
            h.identity.display(),
            h.identity.display()
        ))
    })?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| CliError::Failed(format!("public key of {}: {e}", h.identity.display())))?;
    let roots: Vec<String> = h
        .paths
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    crate::outln!(
        r#"# On {name} ({address}), as root.
# 1. Install haul-agent and haul-wrapper as {agent} and {wrapper}.
# 2. /etc/haul/wrapper.toml, the wrapper's policy:
agent = "{agent}"
socket_dir = "{socket_dir}"
backup_roots = [{roots}]
restore_targets = []

# 3. The socket directory, writable by {user} only:
#    install -d -m 0700 -o {user} {socket_dir}
# 4. In ~{user}/.ssh/authorized_keys, one line:
command="{wrapper} --policy /etc/haul/wrapper.toml",restrict,port-forwarding {public}
#    Prefer a dedicated user to root: a key allowed to forward may bind (and, with
#    StreamLocalBindUnlink, replace) a socket anywhere its user can write. Such a user's
#    agent reads everything with: setcap cap_dac_read_search+ep {agent}
# 5. In /etc/ssh/sshd_config (then `sshd -t && systemctl reload ssh`):
Match User {user}
    AllowTcpForwarding remote
    PermitListen none
    PermitOpen none
    AllowStreamLocalForwarding remote
    StreamLocalBindUnlink yes
    StreamLocalBindMask 0177
    X11Forwarding no
    AllowAgentForwarding no
    PermitTTY no
    ClientAliveInterval 30
    ClientAliveCountMax 3
# 6. On this server, pin the host key in {known_hosts}:
#    ssh-keyscan -p {port} {address} >> {known_hosts}   (and compare the fingerprint)"#,
        name = h.name,
        address = h.address,
        port = h.port,
        user = h.user,
        agent = args.agent.display(),
        wrapper = args.wrapper.display(),
        socket_dir = h.socket_dir.display(),
        roots = roots.join(", "),
        known_hosts = h.known_hosts.display(),
        public = public.trim(),
    );
    Ok(())
}

/// `runs`: the run history, newest last.
pub fn runs(ctx: &Context, args: crate::cli::RunsArgs) -> Result<(), CliError> {
    let history = crate::history::History::new(ctx.state_dir(&args.run).0);
    let (mut records, warnings) = history.read()?;
    for w in &warnings {
        crate::errln!("warning: {w}");
    }
    records.retain(|r| args.host.as_ref().is_none_or(|h| &r.host == h));
    if let Some(n) = args.last {
        let skip = records.len().saturating_sub(n);
        records.drain(..skip);
    }
    if ctx.global.json {
        for r in &records {
            json_line(&serde_json::json!({"type": "run", "run": r}));
        }
        return Ok(());
    }
    crate::outln!(
        "{:<28} {:<16} {:<6} {:<8} {:<20} {:>8} {:<9} ERROR",
        "RUN",
        "HOST",
        "KIND",
        "STATUS",
        "START (UTC)",
        "SECONDS",
        "SNAPSHOT"
    );
    for r in &records {
        crate::outln!(
            "{:<28} {:<16} {:<6} {:<8} {:<20} {:>8.1} {:<9} {}",
            r.id,
            r.host,
            r.kind,
            r.status,
            r.start.format("%Y-%m-%d %H:%M:%S"),
            (r.end - r.start).num_milliseconds() as f64 / 1000.0,
            r.snapshot.as_deref().map_or("-", |s| &s[..8]),
            r.error.as_deref().unwrap_or("")
        );
    }
    crate::outln!("{} run(s)", records.len());
    Ok(())
}

/// `config check`: the configuration's problems (exit 2), or what it holds.
pub fn config_check(ctx: &Context, path: &std::path::Path) -> Result<(), CliError> {
    let config = haul_config::Config::load(path).map_err(|e| CliError::usage(e.0))?;
    // Files an SSH host needs must be there and readable by the pbs.
    let mut problems = Vec::new();
    for (i, h) in config.hosts.iter().enumerate() {
        if h.transport != haul_config::Transport::Ssh {
            continue;
        }
        for (key, file) in [("identity", &h.identity), ("known_hosts", &h.known_hosts)] {
            if let Err(e) = std::fs::File::open(file) {
                problems.push(format!(
                    "config {}: host[{i}].{key}: {} cannot be read: {e}",
                    path.display(),
                    file.display()
                ));
            }
        }
    }
    if !problems.is_empty() {
        return Err(CliError::usage(problems.join("\n")));
    }
    if ctx.global.json {
        json_line(
            &serde_json::json!({"type": "config", "file": path, "hosts": config.hosts.iter().map(|h| &h.name).collect::<Vec<_>>()}),
        );
    } else {
        crate::outln!(
            "{}: {} host(s): {}",
            path.display(),
            config.hosts.len(),
            config
                .hosts
                .iter()
                .map(|h| format!(
                    "{} ({})",
                    h.name,
                    if h.transport == haul_config::Transport::Ssh {
                        "ssh"
                    } else {
                        "local"
                    }
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
