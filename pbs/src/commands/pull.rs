//! `pull`: a configured host (`pull HOST`), every configured host (`pull --all`), or
//! paths of this machine through a local agent (`pull --local PATH...`), each through
//! the one run pipeline the daemon uses too (`pipeline.rs`); and the commands about
//! the configured hosts: `ssh-setup`, `runs`, `config check`.

use super::{hostname, Context};
use crate::agent::AgentRun;
use crate::cli::PullArgs;
use crate::error::CliError;
use crate::output::{bytes, json_line};
use crate::pipeline::{self, Console, RunOutcome};
use crate::plan::{PullOptions, PullPlan};
use crate::record::{RunRecord, RunStatus};

impl PullArgs {
    /// What the command line adds to a host's configured pull.
    pub fn options(&self) -> PullOptions {
        PullOptions {
            excludes: self.select.exclude.clone(),
            exclude_caches: self.select.exclude_caches,
            one_file_system: self.select.one_file_system,
            tags: self.select.tag.clone(),
            force: self.force,
            agent: self.run.agent.clone(),
            stall_timeout: self.run.stall_timeout,
            request_timeout: self.run.request_timeout,
        }
    }
}

pub fn pull(ctx: &Context, args: PullArgs) -> Result<(), CliError> {
    let site = ctx.site()?;
    let history = site.history();
    let repos = ctx.repositories();
    let opts = args.options();
    let plans = if args.all {
        let config = site.require_config()?;
        if config.hosts.is_empty() {
            return Err(CliError::usage(format!(
                "no [[host]] in {}",
                site.config_name()
            )));
        }
        config
            .hosts
            .iter()
            .map(|h| PullPlan::for_host(site, h, &opts))
            .collect::<Result<Vec<_>, _>>()?
    } else if let Some(name) = &args.name {
        vec![PullPlan::for_host(site, site.host(name)?, &opts)?]
    } else {
        let name = args.select.host.clone().unwrap_or_else(hostname);
        vec![PullPlan::local(site, &name, &args.local, &opts)?]
    };
    if plans.len() == 1 {
        return pull_one(ctx, &history, &repos, &plans[0]);
    }
    // Every host, one after the other, through the same open repositories; a failure
    // does not stop the others. The exit code is the worst outcome.
    let (mut failed, mut warned) = (Vec::new(), Vec::new());
    for plan in &plans {
        match pull_one(ctx, &history, &repos, plan) {
            Ok(()) => {}
            Err(CliError::Incomplete(_)) => warned.push(plan.host.clone()),
            Err(e) => {
                crate::errln!("haul-pbs: {e}");
                failed.push(plan.host.clone());
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

/// One pull through the pipeline, reported on the console; its outcome as the
/// command's result.
fn pull_one(
    ctx: &Context,
    history: &crate::history::History,
    repos: &crate::repos::Repositories,
    plan: &PullPlan,
) -> Result<(), CliError> {
    let RunOutcome {
        record,
        agent,
        error,
        unrecorded,
    } = {
        let console = Console::new(ctx.global.json);
        pipeline::pull(history, repos, plan, &console)?
    };
    report(ctx, &record, agent.as_ref());
    if let Some(e) = unrecorded {
        return Err(e);
    }
    let error = error.map(|e| e.message);
    match record.status {
        RunStatus::Ok => Ok(()),
        RunStatus::Warning => Err(CliError::Incomplete(format!(
            "snapshot {} saved, but {}",
            record.short_snapshot(),
            error.unwrap_or_else(|| {
                "some files could not be read completely (see the warnings above)".into()
            })
        ))),
        RunStatus::Failed => Err(CliError::Failed(format!(
            "pull of {} failed: {}; no snapshot was written, existing snapshots are untouched",
            record.host,
            error.unwrap_or_default()
        ))),
    }
}

fn report(ctx: &Context, r: &RunRecord, run: Option<&AgentRun>) {
    if ctx.global.json {
        json_line(&serde_json::json!({"type": "run", "run": r}));
        return;
    }
    if let Some(run) = run {
        for w in &run.warnings {
            crate::errln!("warning: {}: {}", w.path, w.message);
        }
        let more = run.warnings_total - run.warnings.len() as u64;
        if more > 0 {
            crate::errln!("... and {more} more warnings (`--json` relays every one)");
        }
    }
    let Some(c) = &r.counters else { return };
    crate::outln!(
        "snapshot {} of {} saved: {} new, {} changed, {} unchanged files in {} dirs",
        r.short_snapshot(),
        r.host,
        c.files_new,
        c.files_changed,
        c.files_unchanged,
        c.dirs
    );
    crate::outln!(
        "{} read of {}, {} new, {} received, in {:.1} s (run {})",
        bytes(c.bytes_read),
        bytes(c.bytes_total),
        bytes(c.bytes_new),
        bytes(c.bytes_received),
        r.seconds(),
        r.id
    );
}

/// `runs`: the run history, newest last.
pub fn runs(ctx: &Context, args: crate::cli::RunsArgs) -> Result<(), CliError> {
    let history = ctx.site()?.history();
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
    crate::output::table(
        &[
            "RUN",
            "HOST",
            "KIND",
            "STATUS",
            "START (UTC)",
            "SECONDS",
            "SNAPSHOT",
            "ERROR",
        ],
        &[5],
        records
            .iter()
            .map(|r| {
                vec![
                    r.id.clone(),
                    r.host.clone(),
                    r.kind.word().into(),
                    r.status.word().into(),
                    r.start.format("%Y-%m-%d %H:%M:%S").to_string(),
                    format!("{:.1}", r.seconds()),
                    r.short_snapshot().into(),
                    r.error.as_deref().unwrap_or("").into(),
                ]
            })
            .collect(),
    );
    crate::outln!("{} run(s)", records.len());
    Ok(())
}

/// `config check`: the configuration's problems (exit 2), or what it holds.
pub fn config_check(ctx: &Context) -> Result<(), CliError> {
    let site = ctx.site()?;
    let config = site.require_config()?;
    let path = site.config_path.as_deref().expect("a configuration file");
    // Files an SSH host or a clone needs must be there and readable by the pbs.
    let mut problems = Vec::new();
    let ssh_hosts = config
        .hosts
        .iter()
        .enumerate()
        .filter(|(_, h)| h.transport == haul_config::Transport::Ssh)
        .map(|(i, h)| {
            (
                format!("host[{i}]"),
                h.identity.clone(),
                h.known_hosts.clone(),
            )
        });
    let clones = config.clones.iter().enumerate().map(|(i, c)| {
        (
            format!("clone[{i}]"),
            c.identity.clone(),
            c.known_hosts.clone(),
        )
    });
    for (at, identity, known_hosts) in ssh_hosts.chain(clones) {
        for (key, file) in [("identity", &identity), ("known_hosts", &known_hosts)] {
            if let Err(e) = std::fs::File::open(file) {
                problems.push(format!(
                    "config {}: {at}.{key}: {} cannot be read: {e}",
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
            &serde_json::json!({"type": "config", "file": path, "hosts": config.hosts.iter().map(|h| &h.name).collect::<Vec<_>>(),
                "clones": config.clones.iter().map(|c| &c.name).collect::<Vec<_>>()}),
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
        for c in &config.clones {
            let receives: Vec<&str> = config
                .hosts
                .iter()
                .filter(|h| c.receives(&h.name))
                .map(|h| h.name.as_str())
                .collect();
            crate::outln!(
                "clone {} ({}:{}): standby copies of {}",
                c.name,
                c.address,
                c.port,
                receives.join(", ")
            );
        }
    }
    Ok(())
}
