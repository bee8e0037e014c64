//! `check [--read-data]`.

use super::Context;
use crate::cli::CheckArgs;
use crate::error::CliError;
use crate::output::{bytes, Progress, Shown};
use crate::record::{
    new_run_id, CheckDetails, Details, RunKind, RunRecord, RunStatus, TransportKind,
};
use haul_repo::check::{self, CheckOptions};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// Checks the repository and records the check as a run (host `repository`, kind
/// `check`): `failed` when it found damage, with the first error.
pub fn check(ctx: &Context, args: CheckArgs) -> Result<(), CliError> {
    let start = chrono::Utc::now();
    let history = ctx.site()?.history();
    let mut location = String::new();
    let result = check_repository(ctx, &args, &mut location);
    record_check(
        &history,
        start,
        &location,
        (reads(&args), args.read_data_subset),
        &result,
    );
    let report = result?;
    if !report.ok() {
        return Err(CliError::Incomplete(format!(
            "check found {} error(s); the damaged blobs and the files they affect are listed above",
            report.errors.len()
        )));
    }
    Ok(())
}

/// Records a check as a run (host `repository`, kind `check`): `failed` when it found
/// damage, with the first error. `reading`: whether it read packs whole, and which.
pub fn record_check(
    history: &crate::history::History,
    start: chrono::DateTime<chrono::Utc>,
    location: &str,
    (read_data, subset): (bool, Option<check::Subset>),
    result: &Result<check::CheckReport, CliError>,
) {
    let mut record = RunRecord::new(
        new_run_id(start),
        "repository",
        RunKind::Check,
        TransportKind::Local,
        start,
    );
    match result {
        Ok(r) => {
            record.details = Some(Details::Check(CheckDetails {
                repository: location.to_string(),
                snapshots: r.snapshots as u64,
                packs: r.packs as u64,
                blobs: r.blobs as u64,
                bytes_read: r.bytes_read,
                errors: r.errors.len() as u64,
                read_data,
                packs_read: r.packs_read as u64,
                subset: subset.map(|s| s.to_string()),
                unused_bytes: r.unused.bytes,
            }));
            if !r.ok() {
                record.status = RunStatus::Failed;
                record.error = Some(format!(
                    "check found {} error(s): {}",
                    r.errors.len(),
                    r.errors.first().cloned().unwrap_or_default()
                ));
            }
        }
        Err(e) => {
            record.status = RunStatus::Failed;
            record.error = Some(e.to_string());
        }
    }
    if let Err(e) = history.record(&record) {
        crate::errln!("haul-pbs: the check's run record: {e}");
    }
}

/// Whether the check reads packs whole (some or all of them).
fn reads(args: &CheckArgs) -> bool {
    args.read_data || args.read_data_subset.is_some() || args.max_duration.is_some()
}

/// Checks the repository; `location` is set to where it is once it is open.
fn check_repository(
    ctx: &Context,
    args: &CheckArgs,
    location: &mut String,
) -> Result<check::CheckReport, CliError> {
    let started = std::time::Instant::now();
    // Check what the repository says, not what a local cache remembers.
    let (repo, _lock) = ctx.open_for_reading(None, "check", false)?;
    *location = repo.backend().location();
    let done = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
    let report = {
        let d = done.clone();
        let _progress = Progress::start(!ctx.global.json, move || Shown {
            text: format!(
                "checking packs: {} of {}",
                d.0.load(Relaxed),
                d.1.load(Relaxed)
            ),
            done: d.0.load(Relaxed) as u64,
            total: Some(d.1.load(Relaxed) as u64).filter(|t| *t > 0),
            bytes: false,
        });
        let progress = |n: usize, total: usize| {
            done.0.store(n, Relaxed);
            done.1.store(total, Relaxed);
        };
        check::check(
            &repo,
            &CheckOptions {
                read_data: reads(args),
                subset: args.read_data_subset,
                deadline: args.max_duration.map(|d| started + d),
                ..Default::default()
            },
            &progress,
        )?
    };
    if ctx.global.json {
        crate::output::typed_line("check", &report);
    } else {
        crate::outln!(
            "{} snapshots, {} packs, {} blobs, {} trees checked{}",
            report.snapshots,
            report.packs,
            report.blobs,
            report.trees_checked,
            if reads(args) {
                format!(
                    ", {} packs ({}) read and verified",
                    report.packs_read,
                    bytes(report.bytes_read)
                )
            } else {
                String::new()
            }
        );
        if report.packs_left_unread > 0 {
            crate::outln!(
                "time was up: {} packs of the subset were not read (their headers were checked)",
                report.packs_left_unread
            );
        }
        let u = &report.unused;
        crate::outln!(
            "unused: {} of {} stored ({:.1}%) in {} blobs; {} packs hold only unused blobs, {} some",
            bytes(u.bytes),
            bytes(u.total_bytes),
            u.percent(),
            u.blobs,
            u.packs,
            u.packs_partly
        );
        for w in &report.warnings {
            crate::outln!("warning: {w}");
        }
        for e in &report.errors {
            crate::outln!("error: {e}");
        }
        for d in &report.damaged {
            crate::outln!(
                "damaged {} blob {}{}: {}",
                d.kind,
                d.blob,
                d.pack
                    .as_ref()
                    .map(|p| format!(" in pack {}", &p[..16]))
                    .unwrap_or_default(),
                d.reason
            );
            for a in &d.affected {
                crate::outln!("  affects snapshot {} file {}", a.snapshot, a.path);
            }
        }
        if report.ok() {
            crate::outln!("no errors found");
        }
    }
    Ok(report)
}
