//! `push HOST`: a host's snapshot to the standby copies its clones keep, through the
//! one run pipeline the daemon uses too (`pipeline::push`).

use super::Context;
use crate::cli::PushArgs;
use crate::error::CliError;
use crate::output::{bytes, json_line};
use crate::pipeline::{self, Console, RunOutcome};
use crate::plan::{PullOptions, PushPlan};
use crate::record::{Details, RunRecord, RunStatus};

pub fn push(ctx: &Context, args: PushArgs) -> Result<(), CliError> {
    let site = ctx.site()?;
    let config = site.require_config()?;
    let host = site.host(&args.host)?;
    let clones: Vec<&haul_config::CloneTarget> = match &args.clone {
        Some(name) => vec![site.clone_target(name)?],
        None => config
            .clones
            .iter()
            .filter(|c| c.receives(&host.name))
            .collect(),
    };
    if clones.is_empty() {
        return Err(CliError::usage(format!(
            "no [[clone]] in {} receives {}",
            site.config_name(),
            host.name
        )));
    }
    let opts = PullOptions {
        stall_timeout: args.run.stall_timeout,
        request_timeout: args.run.request_timeout,
        ..PullOptions::default()
    };
    let plans = clones
        .iter()
        .map(|c| PushPlan::for_clone(site, host, c, &args.snapshot, &opts))
        .collect::<Result<Vec<_>, _>>()?;
    let history = site.history();
    let repos = ctx.repositories();
    let (mut failed, mut warned) = (Vec::new(), Vec::new());
    for plan in &plans {
        let RunOutcome {
            record,
            error,
            unrecorded,
            ..
        } = {
            let console = Console::new(ctx.global.json);
            pipeline::push(&history, &repos, plan, &console)?
        };
        report(ctx, &record);
        if let Some(e) = unrecorded {
            return Err(e);
        }
        match record.status {
            RunStatus::Ok => {}
            RunStatus::Warning => warned.push(format!(
                "{}: {}",
                plan.clone,
                error
                    .map(|e| e.message)
                    .unwrap_or_else(|| "entries could not be restored".into())
            )),
            RunStatus::Failed => {
                let why = error.map(|e| e.message).unwrap_or_default();
                if plans.len() > 1 {
                    crate::errln!(
                        "haul-pbs: push of {} to {} failed: {why}",
                        plan.host,
                        plan.clone
                    );
                }
                failed.push(format!("{}: {why}", plan.clone));
            }
        }
    }
    match (failed.as_slice(), warned.is_empty()) {
        ([], true) => Ok(()),
        ([], false) => Err(CliError::Incomplete(format!(
            "pushed with warnings: {}",
            warned.join("; ")
        ))),
        ([one], _) if plans.len() == 1 => {
            Err(CliError::Failed(format!("push of {} to {one}", host.name)))
        }
        _ => Err(CliError::Failed(format!(
            "pushes of {} failed: {}",
            host.name,
            failed.join("; ")
        ))),
    }
}

fn report(ctx: &Context, r: &RunRecord) {
    if ctx.global.json {
        json_line(&serde_json::json!({"type": "run", "run": r}));
        return;
    }
    let Some(Details::Push(d)) = &r.details else {
        return;
    };
    if !d.replaced {
        return;
    }
    crate::outln!(
        "snapshot {} of {} pushed to {}:{}: {} files ({} unchanged, {} written), {} sent, {} of changed files from the clone's own chunks, in {:.1} s (run {})",
        r.short_snapshot(),
        r.host,
        d.clone,
        d.dir,
        d.files,
        d.files_linked,
        d.files_changed(),
        bytes(d.bytes_sent),
        bytes(d.bytes_local),
        r.seconds(),
        r.id
    );
    if let Some(i) = &d.import {
        let how = match i.exit {
            Some(0) => "OK".to_string(),
            Some(c) => format!("FAILED (exit code {c})"),
            None => format!(
                "FAILED ({})",
                i.error.as_deref().unwrap_or("killed by a signal")
            ),
        };
        crate::outln!("import command {:?}: {how}", i.command.join(" "));
        for l in &i.tail {
            crate::outln!("  | {l}");
        }
    }
}
