//! `forget`: removes snapshots by a keep policy or by id, recorded as a run (kind
//! `forget`). Also the retention a successful pull applies to its host
//! ([`after_pull`]), and the retirement of the host's legacy rdiff-backup tree once
//! retention has removed one of its snapshots.

use super::Context;
use crate::cli::ForgetArgs;
use crate::error::CliError;
use crate::history::History;
use crate::output::json_line;
use crate::plan::PullPlan;
use crate::record::{Details, ForgetDetails, RunKind, RunStatus};
use haul_repo::forget::{plan, Decision, KeepPolicy};
use haul_repo::{Repository, SnapshotFilter};

/// `forget`, recorded as a run (host: `--host`, else `repository`).
pub fn forget(ctx: &Context, args: ForgetArgs) -> Result<(), CliError> {
    let start = chrono::Utc::now();
    let result = forget_command(ctx, &args);
    if !args.dry_run {
        let history = ctx.site()?.history();
        let details = match &result {
            Ok(d) => Ok(Details::Forget(details(d))),
            Err(e) => Err(e.to_string()),
        };
        let host = args.filter.host.as_deref().unwrap_or("repository");
        if let Err(e) = history.record_local((host, RunKind::Forget), start, details) {
            crate::errln!("haul-pbs: the forget's run record: {e}");
        }
    }
    result.map(|_| ())
}

fn policy_of(args: &ForgetArgs) -> KeepPolicy {
    KeepPolicy {
        last: args.keep_last,
        hourly: args.keep_hourly,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
        yearly: args.keep_yearly,
    }
}

/// The policy of a host's configured retention.
pub fn policy_of_config(r: &haul_config::Retention) -> KeepPolicy {
    KeepPolicy {
        last: r.keep_last,
        hourly: r.keep_hourly,
        daily: r.keep_daily,
        weekly: r.keep_weekly,
        monthly: r.keep_monthly,
        yearly: r.keep_yearly,
    }
}

fn details(d: &[Decision]) -> ForgetDetails {
    let removed: Vec<String> = d
        .iter()
        .filter(|d| !d.keep())
        .map(|d| d.id.to_hex())
        .collect();
    ForgetDetails {
        kept: (d.len() - removed.len()) as u64,
        removed,
        legacy_rdiff_dir_removed: None,
    }
}

fn forget_command(ctx: &Context, args: &ForgetArgs) -> Result<Vec<Decision>, CliError> {
    let filter = args.filter.to_filter();
    let repo = ctx.open_for(filter.host.as_deref())?;
    let decisions = if args.snapshots.is_empty() {
        let policy = policy_of(args);
        if policy.is_empty() {
            return Err(CliError::usage(
                "forget: give snapshot ids or at least one --keep-* rule (with none, every snapshot would be kept)",
            ));
        }
        decide(&repo, &filter, &policy)?
    } else {
        let mut out = Vec::new();
        for spec in &args.snapshots {
            let (id, s) = repo.find_snapshot_matching(spec, &filter)?;
            if out.iter().any(|d: &Decision| d.id == id) {
                continue;
            }
            out.push(Decision {
                id,
                host: s.host,
                time: s.time,
                reasons: Vec::new(),
            });
        }
        out
    };
    for d in &decisions {
        report(ctx.global.json, d, args.dry_run);
    }
    let gone: Vec<_> = decisions
        .iter()
        .filter(|d| !d.keep())
        .map(|d| d.id)
        .collect();
    if !args.dry_run {
        repo.forget(&gone)?;
    }
    if !ctx.global.json {
        crate::outln!(
            "{} {} snapshot(s), kept {}{}",
            if args.dry_run {
                "would remove"
            } else {
                "removed"
            },
            gone.len(),
            decisions.len() - gone.len(),
            if gone.is_empty() || args.dry_run {
                ""
            } else {
                "; their data stays in the packs until a prune"
            }
        );
    }
    Ok(decisions)
}

/// The policy's decisions for the snapshots `filter` selects, with periods in the
/// local time zone (as restic counts them).
fn decide(
    repo: &Repository,
    filter: &SnapshotFilter,
    policy: &KeepPolicy,
) -> Result<Vec<Decision>, CliError> {
    let snaps = repo.snapshots_matching(filter)?;
    Ok(plan(&snaps, policy, &chrono::Local))
}

fn report(json: bool, d: &Decision, dry_run: bool) {
    let verb = match (d.keep(), dry_run) {
        (true, _) => "keep",
        (false, true) => "would remove",
        (false, false) => "remove",
    };
    if json {
        json_line(
            &serde_json::json!({"type": "decision", "snapshot": d.id.to_hex(), "host": d.host, "time": d.time, "keep": d.keep(), "reasons": d.reasons, "dry_run": dry_run}),
        );
    } else {
        crate::outln!(
            "{verb:<12} {} {} {:<16} {}",
            &d.id.to_hex()[..8],
            d.time
                .with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S"),
            d.host,
            d.reasons.join(", ")
        );
    }
}

/// After a successful pull: applies the host's retention (nothing when it has none)
/// and records a `forget` run when something was removed or it failed. Then, if
/// retention has ever removed a snapshot of the host, retires its legacy rdiff-backup
/// tree (see [`retire_legacy`]). Errors are recorded and returned; the pull's own
/// snapshot is never removed (it is the newest).
pub fn after_pull(history: &History, repo: &Repository, plan: &PullPlan) -> Result<(), CliError> {
    if plan.retention.is_empty() {
        return Ok(());
    }
    let host = &plan.host;
    let start = chrono::Utc::now();
    let mut note = None;
    let filter = SnapshotFilter {
        host: Some(host.clone()),
        ..Default::default()
    };
    let result = decide(repo, &filter, &plan.retention).and_then(|d| {
        let gone: Vec<_> = d.iter().filter(|d| !d.keep()).map(|d| d.id).collect();
        repo.forget(&gone)?;
        Ok(d)
    });
    let removed = result
        .as_ref()
        .map(|d| d.iter().any(|d| !d.keep()))
        .unwrap_or(false);
    let retired = match &result {
        Ok(_) => retire_legacy(history, plan, removed),
        Err(_) => Ok(None),
    };
    let mut details = result.as_ref().ok().map(|d| details(d));
    let error = match (&result, &retired) {
        (Err(e), _) => Some(e.to_string()),
        (_, Err(e)) => Some(e.to_string()),
        (Ok(_), Ok(Some(dir))) => {
            if let Some(d) = details.as_mut() {
                d.legacy_rdiff_dir_removed = Some(dir.display().to_string());
            }
            note = Some(format!(
                "{host}: retention has removed snapshots of the host and its rdiff-backup history was imported and verified: the legacy tree {} is removed (keep_legacy_rdiff_dir = true keeps it)",
                dir.display()
            ));
            None
        }
        _ => None,
    };
    if removed || error.is_some() || note.is_some() {
        let outcome = match (&error, details) {
            (Some(e), _) => Err(e.clone()),
            (None, d) => Ok(Details::Forget(d.unwrap_or_default())),
        };
        history.record_local((host, RunKind::Forget), start, outcome)?;
    }
    if let Some(n) = note {
        crate::errln!("{n}");
    }
    match error {
        Some(e) => Err(CliError::Failed(format!(
            "{host}: retention after the pull: {e}"
        ))),
        None => Ok(()),
    }
}

/// Removes the host's legacy rdiff-backup tree when retention has removed any snapshot
/// of the host (now, `removed_now`, or in an earlier recorded run), the import of that
/// tree succeeded and was verified (a recorded `import` run with status `ok`), the
/// host does not set `keep_legacy_rdiff_dir`, and the directory is still an
/// rdiff-backup tree. Returns the directory removed.
pub fn retire_legacy(
    history: &History,
    plan: &PullPlan,
    removed_now: bool,
) -> Result<Option<std::path::PathBuf>, CliError> {
    let Some(legacy) = &plan.legacy else {
        return Ok(None);
    };
    let dir = &legacy.dir;
    if legacy.keep || !dir.join("rdiff-backup-data").is_dir() {
        return Ok(None);
    }
    // This very directory was imported and verified (an import of another tree under
    // the same host name does not count).
    let this_dir = super::import::canonical(dir);
    let host = plan.host.as_str();
    let (verified, retention_removed) = history.with_records(|runs| {
        let verified = runs.iter().any(|r| {
            r.host == host
                && r.status == RunStatus::Ok
                && matches!(&r.details, Some(Details::Import(d))
                    if d.files_verified.is_some() && d.rdiff_dir == this_dir)
        });
        // Whatever became of the rest of that run (a failed retirement is tried again).
        let removed = runs.iter().any(|r| {
            r.host == host
                && matches!(&r.details, Some(Details::Forget(d)) if !d.removed.is_empty())
        });
        (verified, removed)
    })?;
    if !(verified && (removed_now || retention_removed)) {
        return Ok(None);
    }
    std::fs::remove_dir_all(dir).map_err(|e| {
        CliError::Failed(format!(
            "removing the legacy rdiff-backup tree {}: {e}; remove it by hand or set keep_legacy_rdiff_dir = true for host {host}",
            dir.display(),
        ))
    })?;
    Ok(Some(dir.clone()))
}
