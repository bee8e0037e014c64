//! `backup-local`: back up this machine's own files through an in-process ingest
//! session, with the same walker the agent uses.

use super::{hostname, Context};
use crate::cli::BackupLocalArgs;
use crate::error::CliError;
use crate::output::{bytes, json_line, Progress, Shown};
use haul_protocol::walk::{self, BackupOptions, WalkStats};
use haul_repo::format::snapshot::{SourceKind, Summary};
use haul_repo::ingest::{DedupScope, IngestSession, ParentChoice, SessionInfo};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

pub fn backup_local(ctx: &Context, args: BackupLocalArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let excludes = walk::compile_excludes(&args.select.exclude).map_err(CliError::usage)?;
    let mut paths = Vec::new();
    for p in &args.paths {
        let abs = std::path::absolute(p)
            .map_err(|e| CliError::usage(format!("backup path {}: {e}", p.display())))?;
        std::fs::symlink_metadata(&abs)
            .map_err(|e| CliError::usage(format!("backup path {}: {e}", abs.display())))?;
        paths.push(abs);
    }
    let repo = ctx.open_indexed()?;
    let parent = if args.force {
        ParentChoice::None
    } else if let Some(spec) = &args.parent {
        ParentChoice::Snapshot(repo.find_snapshot(spec)?.0)
    } else {
        ParentChoice::Latest
    };
    let info = SessionInfo {
        host: args.select.host.clone().unwrap_or_else(hostname),
        paths: paths.iter().map(|p| p.display().to_string()).collect(),
        tags: args.select.tag.clone(),
        source: SourceKind::Local,
        parent,
        // The pbs reads its own files: nothing to keep from it.
        scope: DedupScope::Repository,
    };
    let session = IngestSession::start(&repo, info)?;
    let opts = BackupOptions {
        paths,
        excludes,
        exclude_caches: args.select.exclude_caches,
        one_file_system: args.select.one_file_system,
        threads: ctx.threads(args.threads),
        chunker: session.chunker_params(),
        parent: session.parent_tree(),
    };
    let stats = Arc::new(WalkStats::default());
    let outcome = {
        let s = stats.clone();
        let _progress = Progress::start(!ctx.global.json, move || Shown {
            text: format!(
                "{} files, {} read, {} dirs",
                s.files_new.load(Relaxed)
                    + s.files_changed.load(Relaxed)
                    + s.files_unchanged.load(Relaxed),
                bytes(s.bytes_read.load(Relaxed)),
                s.dirs.load(Relaxed)
            ),
            done: s.bytes_read.load(Relaxed),
            total: None,
            bytes: true,
        });
        walk::backup(&session, &opts, &stats)
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            // Keep what was stored: the next run will not send it again.
            if let Err(flush) = session.abandon() {
                tracing::warn!("could not save the packs of the failed backup: {flush}");
            }
            return Err(e.into());
        }
    };
    let summary = Summary {
        files_new: stats.files_new.load(Relaxed),
        files_changed: stats.files_changed.load(Relaxed),
        files_unchanged: stats.files_unchanged.load(Relaxed),
        dirs: stats.dirs.load(Relaxed),
        bytes_read: stats.bytes_read.load(Relaxed),
        bytes_total: stats.bytes_total.load(Relaxed),
        warnings: outcome.warnings.len() as u64,
        ..Default::default()
    };
    let parent = session.parent().map(|(id, _)| id.short());
    let (id, snap) = session.commit(outcome.root, summary)?;
    let s = &snap.summary;
    if ctx.global.json {
        for w in &outcome.warnings {
            json_line(
                &serde_json::json!({"type": "warning", "path": w.path, "message": w.message}),
            );
        }
        json_line(&serde_json::json!({
            "type": "summary", "snapshot": id.to_hex(), "parent": parent, "tree": snap.tree.to_hex(),
            "files_new": s.files_new, "files_changed": s.files_changed, "files_unchanged": s.files_unchanged,
            "dirs": s.dirs, "bytes_read": s.bytes_read, "bytes_total": s.bytes_total, "bytes_new": s.bytes_new, "data_new": s.data_new,
            "bytes_stored": s.bytes_stored, "blobs_new": s.blobs_new, "warnings": s.warnings,
            "duration_ms": started.elapsed().as_millis() as u64,
        }));
    } else {
        for w in &outcome.warnings {
            crate::errln!("warning: {}: {}", w.path, w.message);
        }
        crate::outln!(
            "snapshot {} saved{}: {} new, {} changed, {} unchanged files in {} dirs",
            id.short(),
            parent.map(|p| format!(" (parent {p})")).unwrap_or_default(),
            s.files_new,
            s.files_changed,
            s.files_unchanged,
            s.dirs
        );
        crate::outln!(
            "{} read of {}, {} new, {} added to the repository, in {:.1} s",
            bytes(s.bytes_read),
            bytes(s.bytes_total),
            bytes(s.bytes_new),
            bytes(s.bytes_stored),
            started.elapsed().as_secs_f64()
        );
    }
    if !outcome.warnings.is_empty() {
        return Err(CliError::Incomplete(format!(
            "snapshot {} saved, but {} file(s) could not be read completely (see the warnings above)",
            id.short(),
            outcome.warnings.len()
        )));
    }
    Ok(())
}
