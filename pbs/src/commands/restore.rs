//! `restore`: a snapshot, or parts of it, into a new or empty directory.

use super::Context;
use crate::cli::RestoreArgs;
use crate::error::CliError;
use crate::output::{bytes, json_line, Progress};
use haul_protocol::restore::{self, RestoreOptions, RestoreStats};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

pub fn restore(ctx: &Context, args: RestoreArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let target = std::path::absolute(&args.target)
        .map_err(|e| CliError::usage(format!("restore target {}: {e}", args.target.display())))?;
    let repo = ctx.open_indexed()?;
    let _lock = repo.lock(false, "restore")?;
    let (id, snap) = repo.find_snapshot(&args.snapshot)?;
    let opts = RestoreOptions {
        target: target.clone(),
        includes: args.include.clone(),
        threads: args
            .threads
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
            })
            .max(1),
    };
    let stats = Arc::new(RestoreStats::default());
    let warnings = {
        let s = stats.clone();
        let total = snap.summary.bytes_total;
        let _progress = Progress::start(!ctx.global.json, move || {
            format!(
                "{} files, {} of {}",
                s.files.load(Relaxed),
                bytes(s.bytes.load(Relaxed)),
                bytes(total)
            )
        });
        restore::restore(&repo, &snap.tree, &opts, &stats)?
    };
    let (files, dirs, others, written) = (
        stats.files.load(Relaxed),
        stats.dirs.load(Relaxed),
        stats.others.load(Relaxed),
        stats.bytes.load(Relaxed),
    );
    if ctx.global.json {
        for w in &warnings {
            json_line(
                &serde_json::json!({"type": "warning", "path": w.path, "message": w.message}),
            );
        }
        json_line(&serde_json::json!({
            "type": "summary", "snapshot": id.to_hex(), "target": target, "files": files, "dirs": dirs,
            "others": others, "bytes": written, "warnings": warnings.len(), "duration_ms": started.elapsed().as_millis() as u64,
        }));
    } else {
        for w in &warnings {
            eprintln!("warning: {}: {}", w.path, w.message);
        }
        println!(
            "restored snapshot {} to {}: {files} files, {dirs} dirs, {others} other entries, {} in {:.1} s",
            id.short(),
            target.display(),
            bytes(written),
            started.elapsed().as_secs_f64()
        );
    }
    if !warnings.is_empty() {
        return Err(CliError::Incomplete(format!(
            "{} entries could not be restored as recorded",
            warnings.len()
        )));
    }
    Ok(())
}
