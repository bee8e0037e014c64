//! The one way a pull runs, for the daemon and the command line alike:
//!
//! 1. open the repository (once per process, see `repos.rs`) while the transport gets
//!    ready (for SSH: connect, check the host key, authenticate, forward);
//! 2. on a host's first pull with `legacy_rdiff_dir`, import that history first;
//! 3. mark the run as started (`History::begin`), serve an append-only server for this
//!    host to its agent through the transport, and note the snapshot as soon as it is
//!    saved;
//! 4. conclude: the status and the typed error from what the server saw (a committed
//!    snapshot or not) and how the agent ended; the counters from the snapshot the
//!    server verified, never from what the agent printed;
//! 5. record the run (history and feeds), then apply the host's retention after a
//!    fully successful pull.

use crate::agent::AgentRun;
use crate::error::CliError;
use crate::history::{History, Running};
use crate::output::{bytes, json_line};
use crate::plan::{LegacyTree, PullPlan, PushPlan};
use crate::record::{
    new_run_id, Counters, Details, ErrorKind, ImportDetails, PushDetails, RunError, RunKind,
    RunRecord, RunStatus, TransportKind,
};
use crate::repos::Repositories;
use crate::server::{Mode, Server};
use crate::transport::Transport;
use haul_protocol::agent::{
    AgentEvent, AgentExit, AgentProgress, AgentSummary, BackupProgress, ErrorCode, RestoreCommand,
    RestoreParams, SnapshotChoice, WrapperExit,
};
use haul_protocol::SnapshotId;
use haul_repo::format::snapshot::SourceKind;
use haul_repo::IndexedRepository;
use std::sync::Arc;

/// How a run talks to the person who started it.
pub trait Observer: Sync {
    /// Each event the agent prints.
    fn agent_event(&self, _event: &AgentEvent) {}
    /// Something worth saying that is not an error (an import's progress).
    fn note(&self, _text: &str) {}
}

/// Logs notes, relays nothing (the daemon's).
pub struct Quiet;
impl Observer for Quiet {
    fn note(&self, text: &str) {
        tracing::info!("{text}");
    }
}

/// What a pull or a push did.
pub struct RunOutcome {
    pub record: RunRecord,
    /// What its agent printed, when it ran (warnings for the report).
    pub agent: Option<AgentRun>,
    /// A failure that kept the run from its end.
    pub error: Option<RunError>,
    /// Why the record could not be written, if it could not.
    pub unrecorded: Option<CliError>,
}

/// Completes `record` with how the run ended (`status`, `error`, what its agent
/// printed) and writes it to `history`. A record that cannot be written (a full disk,
/// a feed directory another user owns) does not undo the run: it is said, and the
/// outcome stands.
fn record_run(
    history: &History,
    mut record: RunRecord,
    status: RunStatus,
    error: Option<RunError>,
    outcome: Result<AgentRun, RunError>,
) -> RunOutcome {
    let error = error.map(|e| RunError::new(e.kind, cut_to(e.message, MAX_ERROR)));
    record.status = status;
    if let Some(e) = &error {
        record.error = Some(e.message.clone());
        record.error_kind = Some(e.kind);
    }
    if let Ok(r) = &outcome {
        record.connections = r.connections;
        record.agent_peak_rss_kib = r.agent_peak_rss_kib;
        record.output_tail = r.tail.clone();
    }
    let unrecorded = history.record(&record).err();
    if let Some(e) = &unrecorded {
        crate::errln!("haul-pbs: the run {} could not be recorded: {e}", record.id);
    }
    RunOutcome {
        record,
        agent: outcome.ok(),
        error,
        unrecorded,
    }
}

/// Runs `plan`, records it in `history`, and applies the host's retention. An error
/// means the run could not start (its repository did not open): nothing was started
/// on the host and nothing is recorded.
pub fn pull(
    history: &History,
    repos: &Repositories,
    plan: &PullPlan,
    observer: &dyn Observer,
) -> Result<RunOutcome, CliError> {
    let start = chrono::Utc::now();
    tracing::debug!(host = %plan.host, "pull starting");
    // A host that has saved snapshots before finds no repository: its disk is not
    // mounted, or the configuration changed. Not a reason to start a new one there
    // (with a new key, sending everything again, onto whatever disk is underneath).
    if plan.repository.creatable().is_some() {
        let pulled = history.with_records(|r| {
            r.iter()
                .any(|r| r.host == plan.host && r.kind == RunKind::Pull && r.status.saved())
        })?;
        if pulled {
            return Err(CliError::Failed(format!(
                "no repository at {}, but {} has saved snapshots before: is its disk mounted, or did [server].repositories_dir or the host's repository change? (a repository is created only for a host's first pull)",
                plan.repository.location,
                plan.host
            )));
        }
    }
    // Over SSH, the connection is made while the repository opens: deriving its key
    // (Argon2id, ~0.15 s of one core) takes longer than connecting, authenticating and
    // setting up the forward (~0.06 s). Not before a legacy import, which takes long.
    let import_first = plan.legacy.is_some();
    let (repo, transport) = std::thread::scope(|s| {
        let opening = s.spawn(|| repos.open(&plan.repository));
        let transport = (!import_first).then(|| plan.source.connect());
        (
            opening.join().expect("the thread opening the repository"),
            transport,
        )
    });
    // A failure to open ends here; a connection made meanwhile is dropped unused.
    let repo = repo?;
    if let Some(legacy) = &plan.legacy {
        legacy_import(history, &repo, &plan.host, legacy, observer)?;
    }
    let transport = transport.unwrap_or_else(|| plan.source.connect());
    let id = new_run_id(start);
    let marker = Running {
        id: id.clone(),
        host: plan.host.clone(),
        kind: RunKind::Pull,
        transport: plan.source.kind(),
        start,
        pid: std::process::id(),
        snapshot: None,
    };
    history.begin(&marker)?;
    let (server, own_packs) = append_only_server(history, &repo, plan, marker);
    let outcome = transport.and_then(|t: Box<dyn Transport>| {
        t.run_agent(server.clone(), plan.call.clone(), &|v| {
            observer.agent_event(v)
        })
    });
    // Both transports have ended the session by now (its packs are in `own_packs`).
    let committed = server.committed();
    if let Err(e) = history.settle_own_packs(&plan.host, &own_packs, committed.is_some()) {
        tracing::warn!("{e}: the next pull sends again what this one sent");
    }
    let (status, error) = conclude(&outcome, committed.is_some());
    let mut record = RunRecord::new(id, &plan.host, RunKind::Pull, plan.source.kind(), start);
    record.snapshot = committed.as_ref().map(|(id, _)| id.to_hex());
    record.counters = committed.as_ref().map(|(_, snap)| Counters {
        snapshot: snap.summary.clone(),
        bytes_received: server.bytes_received(),
    });
    let done = record_run(history, record, status, error, outcome);
    // Retention only after a fully successful pull: its snapshot is the newest, which
    // retention never removes. A failure here is recorded as a failed `forget` run
    // (and reported); the pull itself stands.
    if status == RunStatus::Ok && !plan.retention.is_empty() {
        if let Err(e) = crate::commands::forget::after_pull(history, &repo, plan) {
            crate::errln!("haul-pbs: {e}");
        }
    }
    Ok(done)
}

/// Runs `plan`: a read-only server of this process streams the host's snapshot (and
/// nothing else) through the clone's SSH tunnel to `haul-agent restore --standby`
/// there, which replaces the standby copy in one step (see
/// `haul_protocol::standby`) and runs the clone's import command if asked. Recorded
/// in `history` as a `push` run. An error means the run could not start (its
/// repository did not open, or the host has no such snapshot).
pub fn push(
    history: &History,
    repos: &Repositories,
    plan: &PushPlan,
    observer: &dyn Observer,
) -> Result<RunOutcome, CliError> {
    let start = chrono::Utc::now();
    let (repo, transport) = std::thread::scope(|s| {
        let opening = s.spawn(|| repos.open_as_is(&plan.repository));
        let transport = plan.source.connect();
        (
            opening.join().expect("the thread opening the repository"),
            transport,
        )
    });
    let repo = repo?;
    // A prune's sweep waits for this reader, or finished before it began: then the view
    // opened above may name packs it deleted, and is loaded again now (the lock comes
    // before the view, as in `Context::open_for_reading`).
    let _lock = repo.lock_for_reading(true, "push")?;
    let repo = repos.open(&plan.repository)?;
    let (snapshot, _) = repo.find_snapshot_of(&plan.snapshot, Some(&plan.host))?;
    // Read before this run is begun: it is no earlier push.
    let bases = earlier_pushes(history, &plan.host, &plan.clone, &snapshot)?;
    let id = new_run_id(start);
    history.begin(&Running {
        id: id.clone(),
        host: plan.host.clone(),
        kind: RunKind::Push,
        transport: plan.source.kind(),
        start,
        pid: std::process::id(),
        snapshot: Some(snapshot.to_hex()),
    })?;
    let server = Server::new(repo.clone(), Mode::ReadOnly, Some(plan.host.clone()))
        .pinned_to(snapshot)
        .with_bases(bases)
        .with_limits(plan.limits);
    let dir = plan.dir.to_str().ok_or_else(|| {
        CliError::usage(format!(
            "standby directory {} is not UTF-8",
            plan.dir.display()
        ))
    })?;
    let command = RestoreCommand {
        socket: String::new(),
        snapshot: SnapshotChoice::Snapshot(snapshot.to_hex().parse().expect("an id is a prefix")),
        target: dir.to_string(),
        includes: Vec::new(),
        excludes: Vec::new(),
        threads: None,
        params_stdin: true,
        standby: true,
        import: plan.import,
        import_command: Vec::new(),
    };
    let call = crate::transport::AgentCall::restore(command, RestoreParams::default());
    let outcome = transport.and_then(|t: Box<dyn Transport>| {
        t.run_agent(server.clone(), call, &|v| observer.agent_event(v))
    });
    let mut details = PushDetails {
        clone: plan.clone.clone(),
        dir: dir.to_string(),
        bytes_sent: server.bytes_sent(),
        chunks_delta: server.deltas_sent(),
        ..PushDetails::default()
    };
    if let Ok(r) = &outcome {
        if let Some(AgentSummary::Restore(s)) = &r.summary {
            details.files = s.files;
            details.dirs = s.dirs;
            details.others = s.others;
            details.bytes_written = s.bytes;
            if let Some(st) = &s.standby {
                details.replaced = true;
                details.files_linked = st.files_linked;
                details.bytes_local = st.bytes_local;
                details.import = st.import.clone();
            }
        }
    }
    let (status, error) = conclude_push(&outcome, details.replaced);
    let mut record = RunRecord::new(id, &plan.host, RunKind::Push, plan.source.kind(), start)
        .with_details(Details::Push(details));
    record.snapshot = Some(snapshot.to_hex());
    Ok(record_run(history, record, status, error, outcome))
}

/// How many earlier pushes' snapshots a push may build deltas on.
const DELTA_BASES: usize = 2;

/// The snapshots of the latest pushes of `host` to `clone` (whatever became of them:
/// the clone was allowed to read each), newest first, other than `now`: what its copy
/// may hold, so what a push may send deltas against.
fn earlier_pushes(
    history: &History,
    host: &str,
    clone: &str,
    now: &SnapshotId,
) -> Result<Vec<SnapshotId>, CliError> {
    history.with_records(|records| {
        let mut found: Vec<SnapshotId> = Vec::new();
        for r in crate::record::pushes_of(records, host, clone).rev() {
            if found.len() == DELTA_BASES {
                break;
            }
            let snapshot = r
                .snapshot
                .as_deref()
                .and_then(|s| s.parse::<SnapshotId>().ok());
            if let Some(s) = snapshot.filter(|s| s != now && !found.contains(s)) {
                found.push(s);
            }
        }
        found
    })
}

/// How a push ended, from whether the clone replaced its copy and how its agent ended.
/// A copy replaced whose import command failed is a failed push: what the clone was
/// to do with it did not happen.
fn conclude_push(
    outcome: &Result<AgentRun, RunError>,
    replaced: bool,
) -> (RunStatus, Option<RunError>) {
    // What the clone holds after a failure: the previous copy when the agent never ran
    // or ended before the swap; when the connection went away (a stall, a cut), it may
    // have got as far as the swap.
    const KEPT: &str = "the standby copy is as it was";
    const EITHER: &str = "the standby copy holds one whole snapshot, the previous one or, if the push got as far as the swap, this one; the next push finishes either way";
    let r = match outcome {
        Err(e) if replaced => {
            let message = format!("the standby copy was replaced, but then {}", e.message);
            return (RunStatus::Warning, Some(RunError::new(e.kind, message)));
        }
        Err(e) => {
            let before = matches!(
                e.kind,
                ErrorKind::Unreachable
                    | ErrorKind::HostKey
                    | ErrorKind::Authentication
                    | ErrorKind::Setup
                    | ErrorKind::Refused
            );
            let state = if before { KEPT } else { EITHER };
            let message = format!("{}; {state}", e.message);
            return (RunStatus::Failed, Some(RunError::new(e.kind, message)));
        }
        Ok(r) => r,
    };
    let exit = r.exit.and_then(AgentExit::from_code);
    match (replaced, exit, r.error_code) {
        (true, Some(AgentExit::Ok), _) => (RunStatus::Ok, None),
        (true, Some(AgentExit::Warnings), _) => (RunStatus::Warning, None),
        (true, _, Some(ErrorCode::Import)) => (
            RunStatus::Failed,
            Some(RunError::new(
                ErrorKind::Agent,
                r.error
                    .clone()
                    .unwrap_or_else(|| "the import command failed".into()),
            )),
        ),
        (true, _, _) => (
            RunStatus::Warning,
            Some(RunError::new(
                ErrorKind::Agent,
                "the standby copy was replaced, but the agent ended abnormally after",
            )),
        ),
        // Not replaced: as a pull that saved nothing (refused, cut, failed).
        (false, _, _) => {
            let (_, error) = conclude(outcome, false);
            let state = if r.cut { EITHER } else { KEPT };
            let error = error.map(|e| RunError::new(e.kind, format!("{}; {state}", e.message)));
            (RunStatus::Failed, error)
        }
    }
}

/// The append-only server of this pull: sessions of its host only, its packs of
/// earlier cut-short pulls counted as its own, the snapshot noted in the run's marker
/// as soon as it is saved.
fn append_only_server(
    history: &History,
    repo: &Arc<IndexedRepository>,
    plan: &PullPlan,
    marker: Running,
) -> (Arc<Server>, haul_repo::ingest::OwnPacks) {
    let own_packs = history.own_packs(&plan.host);
    let marker_history = History::new(history.state().to_path_buf());
    let server = Server::new(repo.clone(), Mode::AppendOnly, Some(plan.host.clone()))
        .with_source(plan.source.snapshot_source())
        .with_own_packs(own_packs.clone())
        .with_scope(plan.scope)
        .with_limits(plan.limits)
        .on_commit(Box::new(move |snapshot| {
            let saved = Running {
                snapshot: Some(snapshot.to_hex()),
                ..marker.clone()
            };
            if let Err(e) = marker_history.begin(&saved) {
                tracing::warn!("noting the saved snapshot in the run's marker: {e}");
            }
        }));
    (server, own_packs)
}

/// Longest error kept in a record: an agent's or a host's words, repeated in feeds,
/// status and alerts.
const MAX_ERROR: usize = 1024;

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn cut_to(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// How a run ended, from whether its snapshot was saved and how its agent ended.
pub fn conclude(
    outcome: &Result<AgentRun, RunError>,
    committed: bool,
) -> (RunStatus, Option<RunError>) {
    let r = match outcome {
        // Saved, then the transport failed (a stall after the commit, say): the
        // snapshot stands.
        Err(e) if committed => {
            let message = format!("the snapshot is complete, but then {}", e.message);
            return (RunStatus::Warning, Some(RunError::new(e.kind, message)));
        }
        Err(e) => return (RunStatus::Failed, Some(e.clone())),
        Ok(r) => r,
    };
    let exit = r.exit.and_then(AgentExit::from_code);
    match (committed, exit) {
        (true, Some(AgentExit::Ok)) => (RunStatus::Ok, None),
        (true, Some(AgentExit::Warnings)) => (RunStatus::Warning, None),
        (true, _) => (
            RunStatus::Warning,
            Some(RunError::new(
                ErrorKind::Agent,
                format!(
                    "the snapshot is complete, but the agent ended abnormally after committing it ({})",
                    r.exit.map_or("killed by a signal".to_string(), |c| format!("exit code {c}"))
                ),
            )),
        ),
        (false, _) => {
            let kind = if r.cut {
                ErrorKind::Cut
            } else if r.exit.and_then(WrapperExit::from_code).is_some() {
                // The forced command refused the run, its policy is invalid, or it
                // could not start the agent.
                ErrorKind::Refused
            } else {
                match r.error_code {
                    // The key's line lacks its forced command.
                    Some(ErrorCode::WrapperRequired) => ErrorKind::Refused,
                    Some(ErrorCode::Source) => ErrorKind::Source,
                    Some(code) if !code.retry_may_help() => ErrorKind::Usage,
                    _ if exit == Some(AgentExit::Usage) => ErrorKind::Usage,
                    _ => ErrorKind::Agent,
                }
            };
            let message = r
                .error
                .clone()
                .unwrap_or_else(|| "the agent ended without committing a snapshot".into());
            (RunStatus::Failed, Some(RunError::new(kind, message)))
        }
    }
}

/// A host's first pull with `legacy_rdiff_dir`: imports that rdiff-backup history
/// (unless something of it is in the repository already), verifies the newest imported
/// snapshot against the rdiff-backup mirror, and records the import as a run of its
/// own. The pull that follows uses that snapshot as its parent (same host, same path).
/// A failed import is recorded and reported; the pull goes on, and the next one tries
/// the import again.
fn legacy_import(
    history: &History,
    repo: &IndexedRepository,
    host: &str,
    legacy: &LegacyTree,
    observer: &dyn Observer,
) -> Result<(), CliError> {
    use crate::commands::import;
    let imported = repo.snapshots()?.into_iter().any(|(_, s)| {
        s.host == host
            && s.source == SourceKind::RdiffBackupImport
            && s.tags.iter().any(|t| t == import::TAG)
    });
    if imported {
        return Ok(());
    }
    let start = chrono::Utc::now();
    let dir = &legacy.dir;
    let result = match legacy.paths.as_slice() {
        [one] => {
            let path = one.display().to_string();
            import::import(repo, dir, host, &path, &mut |e| {
                if let import::Event::Imported { session, .. } = e {
                    observer.note(&format!("{host}: imported rdiff-backup session {session}"));
                }
            })
            .and_then(|outcome| {
                let verified = match &outcome.newest {
                    Some(newest) => import::verify(repo, dir, newest)?,
                    None => 0,
                };
                Ok((outcome, verified))
            })
        }
        _ => Err(CliError::usage(format!(
            "host {host}: legacy_rdiff_dir needs a host with exactly one path (the one the rdiff-backup tree is a backup of)"
        ))),
    };
    let record = RunRecord::new(
        new_run_id(start),
        host,
        RunKind::Import,
        TransportKind::Local,
        start,
    );
    let record = match &result {
        Ok((o, verified)) => record.with_details(Details::Import(ImportDetails {
            files_verified: Some(*verified),
            ..import::details(o, dir)
        })),
        Err(e) => record.failed(&RunError::new(ErrorKind::Setup, e.to_string())),
    };
    history.record(&record)?;
    match result {
        Ok((o, verified)) => observer.note(&format!(
            "{host}: imported {} rdiff-backup sessions from {} ({} new); the newest is verified against its mirror ({verified} files)",
            o.imported,
            dir.display(),
            bytes(o.bytes_new)
        )),
        Err(e) => crate::errln!(
            "haul-pbs: {host}: the import of {} failed, the pull goes on without it: {e}",
            dir.display()
        ),
    }
    Ok(())
}

/// The command line's observer: a progress line on a terminal, agent events relayed
/// as JSON lines with `--json`.
pub struct Console {
    pub json: bool,
    last: Arc<std::sync::Mutex<BackupProgress>>,
    _progress: crate::output::Progress,
}

impl Console {
    pub fn new(json: bool) -> Console {
        let last = Arc::new(std::sync::Mutex::new(BackupProgress::default()));
        let l = last.clone();
        let progress = crate::output::Progress::start(!json, move || {
            let p = l.lock().expect("progress").clone();
            crate::output::Shown {
                text: format!(
                    "{} files, {} read, {} sent",
                    p.files,
                    bytes(p.bytes_read),
                    bytes(p.bytes_sent)
                ),
                done: p.bytes_read,
                total: None,
                bytes: true,
            }
        });
        Console {
            json,
            last,
            _progress: progress,
        }
    }
}

impl Observer for Console {
    fn agent_event(&self, event: &AgentEvent) {
        if let AgentEvent::Progress(AgentProgress::Backup(p)) = event {
            *self.last.lock().expect("progress") = p.clone();
        }
        if self.json {
            json_line(&serde_json::json!({"type": "agent", "event": event}));
        }
    }

    fn note(&self, text: &str) {
        if !self.json {
            crate::errln!("{text}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::AgentOutput;

    fn run(exit: Option<i32>, stdout: &[&str]) -> Result<AgentRun, RunError> {
        let mut out = AgentOutput::default();
        for line in stdout {
            out.stdout_line(line, &|_| {});
        }
        Ok(out.finish(exit, "exit status"))
    }

    #[test]
    fn a_run_is_concluded_from_the_commit_and_how_its_agent_ended() {
        let kind = |r, committed| conclude(&r, committed).1.map(|e| e.kind);
        assert_eq!(conclude(&run(Some(0), &[]), true), (RunStatus::Ok, None));
        assert_eq!(conclude(&run(Some(3), &[]), true).0, RunStatus::Warning);
        // A snapshot saved and then the agent killed: saved, with a warning.
        let (status, error) = conclude(&run(None, &[]), true);
        assert_eq!(status, RunStatus::Warning);
        assert!(error.unwrap().message.contains("killed by a signal"));
        // The forced command refused it: not worth retrying.
        assert_eq!(kind(run(Some(126), &[]), false), Some(ErrorKind::Refused));
        let missing =
            r#"{"type":"error","message":"backup path /x: No such file","code":"source"}"#;
        assert_eq!(
            kind(run(Some(2), &[missing]), false),
            Some(ErrorKind::Source)
        );
        let bad_flag = r#"{"type":"error","message":"--exclude: bad pattern","code":"usage"}"#;
        assert_eq!(
            kind(run(Some(2), &[bad_flag]), false),
            Some(ErrorKind::Usage)
        );
        let no_wrapper =
            r#"{"type":"error","message":"refusing to run","code":"wrapper_required"}"#;
        assert_eq!(
            kind(run(Some(2), &[no_wrapper]), false),
            Some(ErrorKind::Refused)
        );
        // A broken connection to the server, or an agent of unknown make: retried.
        let cut = r#"{"type":"error","message":"connection reset","code":"connection"}"#;
        assert_eq!(kind(run(Some(1), &[cut]), false), Some(ErrorKind::Agent));
        assert_eq!(kind(run(Some(1), &[]), false), Some(ErrorKind::Agent));
        let mut gone = run(None, &[]).unwrap();
        gone.cut = true;
        assert_eq!(kind(Ok(gone), false), Some(ErrorKind::Cut));
        let stalled = || Err(RunError::new(ErrorKind::Stalled, "silent"));
        assert_eq!(kind(stalled(), false), Some(ErrorKind::Stalled));
        // Saved before the transport failed: the snapshot stands.
        assert_eq!(conclude(&stalled(), true).0, RunStatus::Warning);
    }

    #[test]
    fn a_push_is_concluded_from_the_swap_and_says_what_the_clone_holds() {
        let message = |r: &Result<AgentRun, RunError>, replaced| {
            conclude_push(r, replaced)
                .1
                .map(|e| e.message)
                .unwrap_or_default()
        };
        assert_eq!(
            conclude_push(&run(Some(0), &[]), true),
            (RunStatus::Ok, None)
        );
        // The import command failed after the swap: FAILED with its words.
        let import =
            r#"{"type":"error","message":"the import command exited with code 7","code":"import"}"#;
        let (status, error) = conclude_push(&run(Some(1), &[import]), true);
        assert_eq!(status, RunStatus::Failed);
        assert_eq!(
            error.unwrap().message,
            "the import command exited with code 7"
        );
        // Refused, or failed before the swap: the copy is as it was.
        assert!(message(&run(Some(126), &[]), false).ends_with("; the standby copy is as it was"));
        let unreachable = Err(RunError::new(ErrorKind::Unreachable, "no route"));
        assert!(message(&unreachable, false).ends_with("the standby copy is as it was"));
        // Cut off or stalled: it may have got as far as the swap.
        let stalled = Err(RunError::new(ErrorKind::Stalled, "silent"));
        assert!(message(&stalled, false)
            .contains("the previous one or, if the push got as far as the swap, this one"));
        let mut cut = run(None, &[]).unwrap();
        cut.cut = true;
        assert!(message(&Ok(cut), false).contains("if the push got as far as the swap"));
        // Replaced, then the connection went: the copy stands.
        assert_eq!(conclude_push(&stalled, true).0, RunStatus::Warning);
    }
}
