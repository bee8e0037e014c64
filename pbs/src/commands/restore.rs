//! `restore`: a snapshot, or parts of it, into a new or empty directory.

use super::Context;
use crate::cli::RestoreArgs;
use crate::error::CliError;
use crate::output::{bytes, json_line, Progress, Shown};
use haul_protocol::restore::{self, RestoreOptions, RestoreStats};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

pub fn restore(ctx: &Context, args: RestoreArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let target = std::path::absolute(&args.target)
        .map_err(|e| CliError::usage(format!("restore target {}: {e}", args.target.display())))?;
    let (spec, mut filter) = args.filter.select(&args.snapshot)?;
    match (&args.to_host, &filter.host) {
        // Onto a host, its own newest unless another is named: never another host's
        // data by accident.
        (Some(to), None) if spec == "latest" => filter.host = Some(to.clone()),
        // `--host` once meant the destination: say where this restore goes.
        (None, Some(h)) if !ctx.global.json && ctx.site()?.config.host(h).is_some() => {
            crate::errln!(
                "restoring {h}'s snapshot into {} on this machine; to restore onto {h} over SSH, add --to-host {h}",
                target.display()
            )
        }
        _ => {}
    }
    let excludes = haul_protocol::walk::compile_excludes(&args.exclude).map_err(CliError::usage)?;
    let (repo, lock) = ctx.open_for_reading(filter.host.as_deref(), "restore", true)?;
    let (id, snap) = repo.find_snapshot_matching(&spec, &filter)?;
    if args.via_agent || args.to_host.is_some() {
        return via_agent(ctx, args, repo, lock, id, target, started);
    }
    let opts = RestoreOptions {
        overwrite: args.overwrite,
        target: target.clone(),
        includes: args.include.clone(),
        excludes,
        threads: args
            .threads
            .unwrap_or_else(haul_protocol::restore::default_threads)
            .max(1),
    };
    let stats = Arc::new(RestoreStats::default());
    let warnings = {
        let s = stats.clone();
        let total = snap.summary.bytes_total;
        let _progress = Progress::start(!ctx.global.json, move || Shown {
            text: format!(
                "{} files, {} of {}",
                s.files.load(Relaxed),
                bytes(s.bytes.load(Relaxed)),
                bytes(total)
            ),
            done: s.bytes.load(Relaxed),
            total: Some(total),
            bytes: true,
        });
        restore::restore(&repo, &snap.tree, &opts, &stats)?
    };
    let (files, dirs, others, written, kept) = (
        stats.files.load(Relaxed),
        stats.dirs.load(Relaxed),
        stats.others.load(Relaxed),
        stats.bytes.load(Relaxed),
        stats.kept.load(Relaxed),
    );
    if ctx.global.json {
        for w in &warnings {
            json_line(
                &serde_json::json!({"type": "warning", "path": w.path, "kind": w.kind, "message": w.message}),
            );
        }
        json_line(&serde_json::json!({
            "type": "summary", "snapshot": id.to_hex(), "target": target, "files": files, "dirs": dirs,
            "others": others, "bytes": written, "unchanged": kept, "warnings": warnings.len(), "duration_ms": started.elapsed().as_millis() as u64,
        }));
    } else {
        for w in &warnings {
            crate::errln!("not restored: {}: {}", w.path, w.message);
        }
        let unchanged = match args.overwrite {
            Some(_) => format!(" ({kept} files left as they were)"),
            None => String::new(),
        };
        crate::outln!(
            "restored snapshot {} to {}: {files} files{unchanged}, {dirs} dirs, {others} other entries, {} in {:.1} s",
            id.short(),
            target.display(),
            bytes(written),
            started.elapsed().as_secs_f64()
        );
    }
    if !warnings.is_empty() {
        return Err(CliError::Incomplete(format!(
            "{} entries could not be restored (named above); everything else was; `haul-pbs check --read-data` tells what is damaged",
            warnings.len()
        )));
    }
    Ok(())
}

/// Restores through a read-only server of this process and a `haul-agent restore`
/// child, the path a clone host's restore takes.
fn via_agent(
    ctx: &Context,
    args: RestoreArgs,
    repo: haul_repo::IndexedRepository,
    lock: Option<haul_repo::lock::LockGuard>,
    id: haul_protocol::SnapshotId,
    target: std::path::PathBuf,
    started: Instant,
) -> Result<(), CliError> {
    use crate::server::{Mode, Server};
    use crate::transport::{AgentCall, Source};
    use haul_protocol::agent::{
        AgentEvent, AgentExit, AgentSummary, RestoreCommand, RestoreParams, SnapshotChoice,
    };
    let server = Server::new(Arc::new(repo), Mode::ReadOnly, None).pinned_to(id);
    let command = RestoreCommand {
        socket: String::new(),
        snapshot: SnapshotChoice::Snapshot(id.to_hex().parse().expect("an id is a prefix")),
        target: target
            .to_str()
            .ok_or_else(|| {
                CliError::usage(format!("restore target {} is not UTF-8", target.display()))
            })?
            .to_string(),
        includes: args.include.clone(),
        excludes: args.exclude.clone(),
        threads: args.threads.map(|t| t.min(u32::MAX as usize) as u32),
        params_stdin: true,
        standby: false,
        import: false,
        import_command: Vec::new(),
    };
    let json = ctx.global.json;
    let relay = |event: &AgentEvent| {
        if json {
            json_line(&serde_json::json!({"type": "agent", "event": event}));
        }
    };
    let source = match &args.to_host {
        // Onto another host: a read-only tunnel, the agent run by its haul-wrapper.
        Some(name) => Source::Ssh(Box::new(ctx.site()?.host(name)?.clone())),
        None => Source::Local {
            agent: crate::plan::agent_binary(args.run.agent.as_deref()),
            socket_dir: None,
        },
    };
    let call = AgentCall::restore(command, RestoreParams::default());
    let r = source
        .connect()
        .and_then(|t| t.run_agent(server, call, &relay))
        .map_err(|e| CliError::Failed(e.message))?;
    drop(lock);
    for w in &r.warnings {
        if !json {
            crate::errln!("not restored: {}: {}", w.path, w.message);
        }
    }
    let exit = r.exit.and_then(AgentExit::from_code);
    match (exit, &r.summary) {
        (Some(e), Some(AgentSummary::Restore(s))) if e.succeeded() => {
            if json {
                json_line(
                    &serde_json::json!({"type": "summary", "snapshot": id.to_hex(), "target": target,
                    "files": s.files, "dirs": s.dirs, "others": s.others, "bytes": s.bytes,
                    "warnings": s.warnings, "connections": r.connections,
                    "agent_peak_rss_kib": r.agent_peak_rss_kib, "pbs_peak_rss_kib": haul_protocol::peak_rss_kib(),
                    "duration_ms": started.elapsed().as_millis() as u64}),
                );
            } else {
                crate::outln!(
                    "restored snapshot {} to {} through the agent: {} files, {} dirs, {} other entries, {} in {:.1} s",
                    id.short(),
                    target.display(),
                    s.files,
                    s.dirs,
                    s.others,
                    bytes(s.bytes),
                    started.elapsed().as_secs_f64()
                );
            }
            if exit == Some(AgentExit::Warnings) {
                return Err(CliError::Incomplete(format!(
                    "{} entries could not be restored (named above); everything else was; `haul-pbs check --read-data` tells what is damaged",
                    r.warnings_total
                )));
            }
            Ok(())
        }
        _ => Err(CliError::Failed(format!(
            "restore through the agent failed: {}",
            r.error
                .unwrap_or_else(|| "the agent ended without a summary".into())
        ))),
    }
}
