//! `prune`: reclaims the space of data no snapshot uses (see `haul_repo::prune`),
//! recorded as a run (host `repository`, kind `prune`); also what the daemon's
//! scheduled prune runs.

use super::Context;
use crate::cli::PruneArgs;
use crate::error::CliError;
use crate::history::History;
use crate::output::{bytes, json_line, prune_summary};
use crate::record::{Details, PruneDetails, RunKind};
use haul_repo::prune::{self, PruneOptions, PruneReport, RunOptions};
use haul_repo::Repository;

pub fn prune(ctx: &Context, args: PruneArgs) -> Result<(), CliError> {
    let start = chrono::Utc::now();
    let repo = ctx.open()?;
    let cache = ctx.cache_dir();
    let opts = PruneOptions {
        max_unused: args.max_unused,
        max_repack: args.max_repack,
        repack_small: args.repack_small,
        pack_size: 0,
    };
    let run = RunOptions {
        dry_run: args.dry_run,
        max_wait: args.max_wait,
        ..Default::default()
    };
    if args.dry_run {
        let report = prune::prune(repo, cache.as_deref(), &opts, &run)?;
        show(ctx, &report);
        return Ok(());
    }
    let history = ctx.site()?.history();
    let report = run_recorded(&history, repo, cache.as_deref(), &opts, &run, start)?;
    show(ctx, &report);
    Ok(())
}

/// Prunes `repo` and records the run; a failure is recorded and returned.
pub fn run_recorded(
    history: &History,
    repo: Repository,
    cache: Option<&std::path::Path>,
    opts: &PruneOptions,
    run: &RunOptions,
    start: chrono::DateTime<chrono::Utc>,
) -> Result<PruneReport, CliError> {
    let location = repo.backend().location();
    let result = prune::prune(repo, cache, opts, run).map_err(CliError::from);
    let details = match &result {
        Ok(r) => Ok(Details::Prune(PruneDetails {
            repository: location.clone(),
            ..PruneDetails::of(r)
        })),
        Err(e) => Err(format!("prune of {location}: {e}")),
    };
    if let Err(e) = history.record_local(("repository", RunKind::Prune), start, details) {
        crate::errln!("haul-pbs: the prune's run record: {e}");
    }
    result
}

fn show(ctx: &Context, r: &PruneReport) {
    if ctx.global.json {
        json_line(&serde_json::json!({
            "type": "prune",
            "report": r,
            "bytes_freed": r.storage_freed(),
        }));
        return;
    }
    let p = &r.plan;
    let verb = if r.dry_run { "would be" } else { "were" };
    crate::outln!(
        "{} snapshots; {} packs: {} {verb} deleted, {} {verb} repacked, {} kept",
        r.snapshots,
        p.delete.len() + p.repack.len() + p.keep,
        p.delete.len(),
        p.repack.len(),
        p.keep
    );
    crate::outln!(
        "stored blobs: {} before, {} after ({} {} in new packs)",
        bytes(p.bytes_before),
        bytes(p.bytes_after),
        bytes(p.bytes_repacked),
        if r.dry_run { "to copy" } else { "copied" }
    );
    crate::outln!("unused left: {}", bytes(p.unused_after));
    if r.dry_run {
        crate::outln!(
            "storage: {} now, about {} after a prune",
            bytes(r.storage_before),
            bytes(r.storage_after)
        );
        if r.packs_pending > 0 {
            crate::outln!(
                "{} packs condemned by an earlier prune await deletion",
                r.packs_pending
            );
        }
        return;
    }
    crate::outln!(
        "storage: {} before, {} after",
        bytes(r.storage_before),
        bytes(r.storage_after)
    );
    if r.packs_rescued > 0 {
        crate::outln!(
            "{} condemned packs were kept: snapshots committed during the prune use them",
            r.packs_rescued
        );
    }
    crate::outln!("{}", prune_summary(&PruneDetails::of(r)));
}
