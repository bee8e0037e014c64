//! `repair index` and `repair snapshots` (see `haul_repo::repair`), each under an
//! exclusive lock, or with `--dry-run` a shared one (changing nothing).

use super::Context;
use crate::cli::RepairCommand;
use crate::error::CliError;
use crate::output::json_line;
use haul_repo::repair::{self, Moved};

pub fn repair(ctx: &Context, command: RepairCommand) -> Result<(), CliError> {
    let dry_run = command.dry_run();
    let repo = ctx.open()?;
    let purpose = match command {
        RepairCommand::Index { .. } => "repair index",
        RepairCommand::Snapshots { .. } => "repair snapshots",
    };
    let _lock = if dry_run {
        ctx.read_lock(&repo, purpose)?
    } else {
        Some(repo.lock(haul_repo::lock::LockKind::Exclusive, purpose)?)
    };
    match command {
        RepairCommand::Index { .. } => {
            // What the repository holds, not what a local cache remembers.
            let repo = repo.load_index(None)?;
            let report = repair::repair_index(&repo, dry_run)?;
            if ctx.global.json {
                json_line(
                    &serde_json::json!({"type": "repair-index", "dry_run": dry_run, "report": report}),
                );
            } else {
                for (pack, blobs) in &report.packs_indexed {
                    crate::outln!(
                        "{} pack {pack} ({blobs} blobs) from its header",
                        if dry_run { "would index" } else { "indexed" }
                    );
                }
                print_moved("index file", &report.damaged, dry_run);
                for (pack, e) in &report.unreadable_packs {
                    crate::outln!("pack {pack} is in no index and its header is unreadable: {e}");
                }
                match (&report.index_written, report.packs_indexed.len()) {
                    (Some(name), n) => crate::outln!("wrote index file {name} for {n} pack(s)"),
                    (None, 0) => crate::outln!("every readable pack is indexed"),
                    (None, n) => crate::outln!("would write an index file for {n} pack(s)"),
                }
            }
            if !report.unreadable_packs.is_empty() {
                return Err(CliError::Incomplete(format!(
                    "{} pack(s) in no index have an unreadable header and were left as they are (named above): `haul-pbs check --read-data` tells which files, if any, lose data",
                    report.unreadable_packs.len()
                )));
            }
        }
        RepairCommand::Snapshots { .. } => {
            let moved = repair::repair_snapshots(&repo, dry_run)?;
            if ctx.global.json {
                json_line(
                    &serde_json::json!({"type": "repair-snapshots", "dry_run": dry_run, "moved": moved}),
                );
            } else {
                print_moved("snapshot file", &moved, dry_run);
                if moved.is_empty() {
                    crate::outln!("every snapshot file is readable");
                }
            }
        }
    }
    Ok(())
}

fn print_moved(what: &str, moved: &[Moved], dry_run: bool) {
    for m in moved {
        match &m.moved_to {
            Some(to) => crate::outln!("{what} {} is damaged: moved to {to}", m.file),
            None if dry_run => crate::outln!("{what} {} is damaged: would move it aside", m.file),
            None => crate::outln!("{what} {} is damaged", m.file),
        }
    }
}
