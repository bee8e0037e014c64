//! `copy --to LOCATION`: snapshots into another repository, which has keys of its own
//! (see `haul_repo::copy`).

use super::Context;
use crate::cli::CopyArgs;
use crate::error::CliError;
use crate::output::{bytes, typed_line};
use crate::record::CopyDetails;
use haul_protocol::SnapshotId;
use haul_repo::backend::Location;
use haul_repo::copy::{copy_in, copy_snapshot, CopyReport};
use haul_repo::format::snapshot::Snapshot;
use haul_repo::{IndexedRepository, Repository};

pub fn copy(ctx: &Context, args: CopyArgs) -> Result<(), CliError> {
    let (source, _lock) = ctx.open_for_reading(args.filter.host.as_deref(), "copy", true)?;
    let target_location = Location::parse(&args.to)?;
    if Some(&target_location) == ctx.global.repo.as_ref() {
        return Err(CliError::usage(
            "--to names the repository copied from: give another one",
        ));
    }
    let credentials = ctx.site()?.config.server.s3_credentials_file.clone();
    let pass = crate::password::target(args.to_password_file.as_deref())?;
    let target = open_target(
        &source,
        &target_location,
        &pass,
        credentials.as_deref(),
        ctx.cache_dir().as_deref(),
    )?;
    let mut chosen = source.snapshots_matching(&args.filter.to_filter())?;
    if !args.snapshots.is_empty() {
        let mut wanted = Vec::new();
        for spec in &args.snapshots {
            wanted.push(source.find_snapshot(spec)?.0);
        }
        chosen.retain(|(id, _)| wanted.contains(id));
    }
    let done = copy_all(&source, &target, &args.to, chosen, |id, s, r| {
        say(ctx, id, s, r)
    })?;
    if ctx.global.json {
        typed_line(
            "copy-summary",
            &serde_json::json!({"copied": done.copied, "skipped": done.skipped, "bytes_copied": done.bytes_copied, "to": args.to}),
        );
    } else {
        crate::outln!(
            "{} snapshot(s) copied, {} already there; {} sent to {}",
            done.copied,
            done.skipped,
            bytes(done.bytes_copied),
            args.to
        );
    }
    Ok(())
}

/// Opens the repository a copy writes to, with its own passphrase; the repository
/// copied from is refused.
pub fn open_target(
    source: &IndexedRepository,
    location: &Location,
    pass: &[u8],
    credentials: Option<&std::path::Path>,
    cache: Option<&std::path::Path>,
) -> Result<IndexedRepository, CliError> {
    let target = Repository::open(location.open(credentials)?, pass)?;
    if target.config().id == source.config().id {
        return Err(CliError::usage(format!(
            "{location} is the repository copied from (the same repository id): give another one"
        )));
    }
    Ok(target.load_index(cache)?)
}

/// Copies `chosen` oldest first (a snapshot's parent is copied before it, and its copy
/// names the parent's copy as parent), skipping those already there; `each` is told
/// what became of each.
pub fn copy_all(
    source: &IndexedRepository,
    target: &IndexedRepository,
    to: &str,
    mut chosen: Vec<(SnapshotId, Snapshot)>,
    mut each: impl FnMut(&SnapshotId, &Snapshot, &CopyReport),
) -> Result<CopyDetails, CliError> {
    chosen.sort_by_key(|(_, s)| s.time);
    let mut there = target.snapshots()?;
    let mut done = CopyDetails {
        to: to.to_string(),
        ..CopyDetails::default()
    };
    for (id, snapshot) in &chosen {
        if let Some(existing) = copy_in(&there, id, snapshot) {
            done.skipped += 1;
            each(
                id,
                snapshot,
                &CopyReport {
                    copy: Some(existing),
                    skipped: true,
                    ..CopyReport::default()
                },
            );
            continue;
        }
        let parent = snapshot
            .parent
            .as_ref()
            .and_then(|p| there.iter().find(|(_, t)| t.original.as_ref() == Some(p)))
            .map(|(tid, _)| *tid);
        let report = copy_snapshot(source, target, id, snapshot, parent).map_err(|e| {
            CliError::Failed(format!(
                "copying snapshot {} to {to}: {e}; what arrived stays there, and running the copy again sends only the rest",
                id.short(),
            ))
        })?;
        done.copied += 1;
        done.bytes_copied += report.bytes_copied;
        each(id, snapshot, &report);
        if let Some(new) = report.copy {
            let mut copy = snapshot.clone();
            copy.original = Some(snapshot.original.unwrap_or(*id));
            there.push((new, copy));
        }
    }
    Ok(done)
}

fn say(ctx: &Context, id: &SnapshotId, s: &Snapshot, r: &CopyReport) {
    if ctx.global.json {
        typed_line(
            "copy",
            &serde_json::json!({"snapshot": id, "host": s.host, "time": s.time, "report": r}),
        );
        return;
    }
    let copy = r.copy.map(|c| c.short()).unwrap_or_default();
    if r.skipped {
        crate::outln!(
            "snapshot {} of {} at {}: already there as {copy}",
            id.short(),
            s.host,
            s.time.format("%Y-%m-%d %H:%M:%S UTC")
        );
    } else {
        crate::outln!(
            "snapshot {} of {} at {}: copied as {copy}, {} new blob(s), {} sent, {} blob(s) already there",
            id.short(),
            s.host,
            s.time.format("%Y-%m-%d %H:%M:%S UTC"),
            r.blobs_copied,
            bytes(r.bytes_copied),
            r.blobs_present
        );
    }
}
