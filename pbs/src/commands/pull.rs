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
        if self.global.repo.is_some() {
            return self.open_indexed();
        }
        let state = self.state_dir(run);
        let (path, key) = (state.repo(), state.key_file());
        if !path.join("config").exists() {
            create_default(&path, &key, self.global.json)?;
        }
        let pass =
            crate::password::current(Some(self.global.password_file.as_deref().unwrap_or(&key)))?;
        let repo = Repository::open(Arc::new(LocalBackend::open(&path)?), &pass)?;
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
        RepoConfig::new(3),
    )?;
    if json {
        json_line(
            &serde_json::json!({"type": "init", "repository": path, "key_file": key, "id": repo.config().id}),
        );
    } else {
        eprintln!(
            "created repository {} at {}\nits key is in {}: keep a copy of that file somewhere safe, without it nothing in the repository can be read",
            &repo.config().id[..8],
            path.display(),
            key.display()
        );
    }
    Ok(())
}

pub fn pull(ctx: &Context, args: PullArgs) -> Result<(), CliError> {
    let start = chrono::Utc::now();
    let host = args.host.clone().unwrap_or_else(hostname);
    let state = ctx.state_dir(&args.run);
    let repo = ctx.open_for_run(&args.run)?;
    let server =
        Server::new(repo, Mode::AppendOnly, Some(host.clone())).with_source(SourceKind::Local);
    let mut agent_args: Vec<OsString> = vec!["backup".into(), "--params-stdin".into()];
    for p in &args.local {
        let abs = std::path::absolute(p)
            .map_err(|e| CliError::usage(format!("backup path {}: {e}", p.display())))?;
        agent_args.push("--path".into());
        agent_args.push(abs.into());
    }
    for e in &args.exclude {
        agent_args.push("--exclude".into());
        agent_args.push(e.into());
    }
    if args.exclude_caches {
        agent_args.push("--exclude-caches".into());
    }
    if args.one_file_system {
        agent_args.push("--one-file-system".into());
    }
    let params = serde_json::json!({
        "host": host,
        "tags": args.tag,
        "parent": if args.force { "none" } else { "latest" },
    })
    .to_string();
    let agent = run::agent_binary(args.run.agent.as_deref());
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
        run::run_agent(server.clone(), &agent, agent_args, Some(params), &|v| {
            if v["type"] == "progress" {
                *last.lock().expect("progress") = v.clone();
            }
            if json {
                json_line(&serde_json::json!({"type": "agent", "event": v}));
            }
        })
    };
    let end = chrono::Utc::now();
    let committed = server.committed();
    let (status, error) = match &outcome {
        Err(e) => ("failed", Some(e.to_string())),
        Ok(r) => match (&committed, r.exit) {
            (Some(_), Some(0)) => ("ok", None),
            (Some(_), Some(3)) => ("warning", None),
            (Some(_), code) => (
                "warning",
                Some(format!("the agent committed, then ended with {code:?}")),
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
        id: run::new_run_id(start),
        host: host.clone(),
        kind: "pull",
        transport: "local",
        start,
        end,
        status,
        snapshot: committed.as_ref().map(|(id, _)| id.to_hex()),
        counters: outcome.as_ref().ok().and_then(|r| r.summary.clone()),
        connections: outcome.as_ref().map(|r| r.connections).unwrap_or(0),
        agent_peak_rss_kib: outcome.as_ref().map(|r| r.agent_peak_rss_kib).unwrap_or(0),
        pbs_peak_rss_kib: run::own_peak_rss_kib(),
        output_tail: outcome.as_ref().map(|r| r.tail.clone()).unwrap_or_default(),
        error: error.clone(),
    };
    let saved = record.save(&state.runs());
    report(ctx, &record, outcome.as_ref().ok());
    saved?;
    match status {
        "ok" => Ok(()),
        "warning" => Err(CliError::Incomplete(format!(
            "snapshot {} saved, but some files could not be read completely (see the warnings above)",
            record.snapshot.as_deref().map_or("?", |s| &s[..8])
        ))),
        _ => Err(CliError::Failed(format!(
            "pull of {host} failed: {}; no snapshot was written, existing snapshots are untouched",
            error.unwrap_or_default()
        ))),
    }
}

fn report(ctx: &Context, r: &RunRecord, run: Option<&run::AgentRun>) {
    if ctx.global.json {
        json_line(&serde_json::json!({"type": "run", "run": r}));
        return;
    }
    if let Some(run) = run {
        for w in &run.warnings {
            eprintln!(
                "warning: {}: {}",
                w["path"].as_str().unwrap_or("?"),
                w["message"].as_str().unwrap_or("?")
            );
        }
    }
    let Some(c) = &r.counters else { return };
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    println!(
        "snapshot {} of {} saved: {} new, {} changed, {} unchanged files in {} dirs",
        r.snapshot.as_deref().map(|s| &s[..8]).unwrap_or("(none)"),
        r.host,
        n("files_new"),
        n("files_changed"),
        n("files_unchanged"),
        n("dirs")
    );
    println!(
        "{} read of {}, {} new, {} sent, in {:.1} s (run {})",
        bytes(n("bytes_read")),
        bytes(n("bytes_total")),
        bytes(n("bytes_new")),
        bytes(n("bytes_sent")),
        (r.end - r.start).num_milliseconds() as f64 / 1000.0,
        r.id
    );
}
