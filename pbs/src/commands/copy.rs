//! `copy --to LOCATION`: snapshots into another repository, which has keys of its own
//! (see `haul_repo::copy`): a directory, object storage, or another pbs over SSH
//! (`pbs:NAME`, see `crate::copy_remote`).

use super::Context;
use crate::cli::CopyArgs;
use crate::copy_remote::RemoteTarget;
use crate::error::CliError;
use crate::output::{bytes, typed_line};
use crate::record::CopyDetails;
use haul_protocol::SnapshotId;
use haul_repo::backend::Location;
use haul_repo::copy::{copy_snapshot, CopyReport, CopyTarget, LocalTarget};
use haul_repo::format::snapshot::Snapshot;
use haul_repo::{IndexedRepository, Repository};

pub fn copy(ctx: &Context, args: CopyArgs) -> Result<(), CliError> {
    let (source, _lock) = ctx.open_for_reading(args.filter.host.as_deref(), "copy", true)?;
    let site = ctx.site()?;
    let target = match args.to.strip_prefix(haul_config::REMOTE_PREFIX) {
        Some(_) if args.to_password_file.is_some() => {
            return Err(CliError::usage(
                "--to-password-file is not for another pbs (pbs:NAME): it opens its repository with its own key",
            ))
        }
        Some(_) => Target::open(&site.config, &source, &args.to, None, None, None)?,
        None => {
            let target_location = Location::parse(&args.to)?;
            if Some(&target_location) == ctx.global.repo.as_ref() {
                return Err(CliError::usage(
                    "--to names the repository copied from: give another one",
                ));
            }
            let pass = crate::password::target(args.to_password_file.as_deref())?;
            Target::open(
                &site.config,
                &source,
                &args.to,
                Some(&pass),
                site.config.server.s3_credentials_file.as_deref(),
                ctx.cache_dir().as_deref(),
            )?
        }
    };
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
    });
    target.close();
    let done = done?;
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

/// Where a copy goes, opened.
pub enum Target {
    /// A repository opened here, with its own passphrase.
    Repository(Box<IndexedRepository>),
    /// Another pbs (`pbs:NAME`, a `[[remote]]`), receiving over SSH.
    Pbs(Box<RemoteTarget>),
}

impl Target {
    /// Opens `to`: `pbs:NAME` is the `[[remote]]` of that name; anything else a
    /// repository location, opened with `pass` (the repository copied from is refused).
    pub fn open(
        config: &haul_config::Config,
        source: &IndexedRepository,
        to: &str,
        pass: Option<&[u8]>,
        credentials: Option<&std::path::Path>,
        cache: Option<&std::path::Path>,
    ) -> Result<Target, CliError> {
        if let Some(name) = to.strip_prefix(haul_config::REMOTE_PREFIX) {
            let remote = config.remote(name).ok_or_else(|| {
                CliError::usage(format!(
                    "--to {to}: the configuration has no [[remote]] named {name:?} (give its address and SSH keys there)"
                ))
            })?;
            return Ok(Target::Pbs(Box::new(
                RemoteTarget::open(remote).map_err(CliError::Failed)?,
            )));
        }
        let location = Location::parse(to)?;
        let pass = pass.expect("a repository's passphrase");
        let target = Repository::open(location.open(credentials)?, pass)?;
        if target.config().id == source.config().id {
            return Err(CliError::usage(format!(
                "{location} is the repository copied from (the same repository id): give another one"
            )));
        }
        Ok(Target::Repository(Box::new(target.load_index(cache)?)))
    }

    /// Ends a remote's receiving command and connection.
    pub fn close(self) {
        if let Target::Pbs(p) = self {
            p.close();
        }
    }
}

/// Copies `chosen` oldest first (a snapshot's parent is copied before it, and its copy
/// builds on the parent's copy), skipping those already there; `each` is told what
/// became of each.
pub fn copy_all(
    source: &IndexedRepository,
    target: &Target,
    to: &str,
    chosen: Vec<(SnapshotId, Snapshot)>,
    each: impl FnMut(&SnapshotId, &Snapshot, &CopyReport),
) -> Result<CopyDetails, CliError> {
    match target {
        Target::Repository(repo) => copy_each(source, &LocalTarget::new(repo)?, to, chosen, each),
        Target::Pbs(remote) => copy_each(source, &**remote, to, chosen, each),
    }
}

fn copy_each(
    source: &IndexedRepository,
    target: &dyn CopyTarget,
    to: &str,
    mut chosen: Vec<(SnapshotId, Snapshot)>,
    mut each: impl FnMut(&SnapshotId, &Snapshot, &CopyReport),
) -> Result<CopyDetails, CliError> {
    chosen.sort_by_key(|(_, s)| s.time);
    let failed = |id: &SnapshotId, e: haul_repo::Error| {
        CliError::Failed(format!(
            "copying snapshot {} to {to}: {e}; what arrived stays there, and running the copy again sends only the rest",
            id.short(),
        ))
    };
    let there = target
        .copies_of(&chosen)
        .map_err(|e| CliError::Failed(format!("copying to {to}: {e}")))?;
    // A parent's original id, from the source's snapshots (a parent that is itself
    // a copy names the one it was copied from).
    let originals: std::collections::HashMap<SnapshotId, SnapshotId> = source
        .snapshots()?
        .into_iter()
        .map(|(id, s)| (id, s.original.unwrap_or(id)))
        .collect();
    let mut done = CopyDetails {
        to: to.to_string(),
        ..CopyDetails::default()
    };
    for ((id, snapshot), existing) in chosen.iter().zip(there) {
        if let Some(existing) = existing {
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
            .map(|p| originals.get(&p).copied().unwrap_or(p));
        let report =
            copy_snapshot(source, target, id, snapshot, parent).map_err(|e| failed(id, e))?;
        done.copied += 1;
        done.bytes_copied += report.bytes_copied;
        each(id, snapshot, &report);
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
