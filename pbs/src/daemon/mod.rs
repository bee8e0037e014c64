//! `haul-pbs daemon`: pulls every configured host on its schedule, in the foreground
//! (for supervisord or systemd), and serves the feeds, a status document and metrics
//! over HTTP.
//!
//! - [`schedule`]: when each host runs, retries, is held or is stale (pure; the clock
//!   is an argument).
//! - [`http`]: the status server.
//! - This module: the loop that starts due runs (each in a thread, through the same
//!   `pipeline::pull` as `haul-pbs pull`), records alerts, and handles signals.
//!
//! Signals: SIGTERM or SIGINT: no new runs; running ones get `--grace` to finish; then
//! their agents are stopped and the runs recorded as failed; the status server stops;
//! exit status 0. SIGHUP: the configuration is read again (and held hosts are released);
//! when it is invalid the error is logged and the old one kept. Runs that an earlier
//! process left unfinished (killed mid-run) are recorded as failed at start
//! (`History::recover`).
//!
//! Each repository is opened once for the daemon's lifetime and shared by its runs
//! (`repos.rs`).

pub mod auth;
pub mod http;
pub mod metrics;
pub mod overview;
pub mod page;
pub mod schedule;

use crate::cli::DaemonArgs;
use crate::commands::Context;
use crate::error::CliError;
use crate::history::History;
use crate::pipeline::{self, Quiet};
use crate::plan::{PullOptions, PullPlan, PushPlan};
use crate::record::{
    new_run_id, ErrorKind, RunError, RunKind, RunRecord, RunStatus, TransportKind,
};
use crate::repos::Repositories;
use crate::site::Site;
use chrono::{DateTime, Utc};
use haul_repo::backend::FileType;
use haul_repo::backend::Location;
use schedule::{Alert, Ended, Schedule};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Shared by the loop, the runs and the HTTP handlers.
pub struct Shared {
    site: Site,
    schedule: Schedule,
    history: History,
    /// Repositories being pruned.
    pruning: HashSet<Location>,
    /// When this process last started a prune of each repository (a prune that could
    /// not even open its repository has no record to tell).
    pruned: HashMap<Location, DateTime<Utc>>,
    /// Pushes running, as (host, clone): two pushes into one standby directory would
    /// meet at its lock, and the second would fail.
    pushing: HashSet<(String, String)>,
    /// Repositories being checked, and when this process last started a check of each.
    checking: HashSet<Location>,
    checked: HashMap<Location, DateTime<Utc>>,
    /// Copies running, as (`[[copy]]`, host), and when this process last started each.
    copying: HashSet<(String, String)>,
    copied: HashMap<(String, String), DateTime<Utc>>,
    /// The repositories' figures the status server shows.
    facts: Arc<overview::Facts>,
    /// Who may read the status server (`[server].status_credentials`).
    credentials: Option<Arc<auth::Credentials>>,
}

pub type SharedRef = Arc<Mutex<Shared>>;

fn jitter() -> f64 {
    let mut b = [0u8; 4];
    getrandom::getrandom(&mut b).expect("OS random numbers");
    u32::from_le_bytes(b) as f64 / u32::MAX as f64
}

pub fn daemon(ctx: &Context, args: DaemonArgs) -> Result<(), CliError> {
    // Every line the daemon and its runs write goes to its log.
    crate::output::to_the_logger();
    let site = Site::resolve(&ctx.global)?;
    site.require_config()?;
    // Notifiers are called off the scheduler's threads, one after another.
    let history = site
        .history()
        .with_notifiers(crate::notify::Notifiers::from_config(&site.config).in_background());
    let recovered = history.recover(
        false,
        "interrupted: haul-pbs (pid {pid}) stopped during the run (killed, or the machine went down)",
    )?;
    if recovered > 0 {
        tracing::warn!(
            runs = recovered,
            "recorded runs of an earlier process as failed: it stopped while they ran"
        );
    }
    let now = Utc::now();
    let schedule = history.with_records(|r| Schedule::new(&site.config, r, now, &mut jitter))?;
    for h in &site.config.hosts {
        let next = schedule.host(&h.name).and_then(|s| s.next);
        tracing::info!(host = %h.name, schedule = %h.schedule(&site.config), next = ?next.map(|t| t.to_rfc3339()), "scheduled");
    }
    let listen = site.config.server.status_listen;
    let credentials = load_credentials(&site.config)?;
    let repos = Arc::new(ctx.repositories());
    let shared = Arc::new(Mutex::new(Shared {
        site,
        schedule,
        history,
        pruning: HashSet::new(),
        pruned: HashMap::new(),
        pushing: HashSet::new(),
        checking: HashSet::new(),
        checked: HashMap::new(),
        copying: HashSet::new(),
        copied: HashMap::new(),
        facts: Arc::new(overview::Facts::new(repos.clone())),
        credentials,
    }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            CliError::Io(
                format!("status server on {listen} ([server].status_listen)"),
                e,
            )
        })?;
        tracing::info!(%listen, "status server listening");
        // systemd (Type=notify): ready once the status server listens.
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            tracing::warn!("cannot tell systemd the daemon is ready: {e}");
        }
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let status = tokio::spawn(crate::server::conn::serve_listener(
            listener,
            http::router(shared.clone()),
            crate::server::conn::Limits {
                grace: Duration::from_secs(5),
                ..Default::default()
            },
            async {
                let _ = stop_rx.await;
            },
            || {},
        ));
        let result = scheduler(ctx, &args, &shared, repos).await;
        let _ = stop_tx.send(());
        let _ = status.await;
        result
    })
}

/// A run's end, as its thread reports it.
struct Done {
    host: String,
    /// When the pull itself started: the next one of an interval schedule follows it.
    started: DateTime<Utc>,
    ended: Ended,
}

async fn scheduler(
    ctx: &Context,
    args: &DaemonArgs,
    shared: &SharedRef,
    repos: Arc<Repositories>,
) -> Result<(), CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |k| signal(k).map_err(|e| CliError::Failed(format!("cannot handle signals: {e}")));
    let (mut term, mut int, mut hup) = (
        sig(SignalKind::terminate())?,
        sig(SignalKind::interrupt())?,
        sig(SignalKind::hangup())?,
    );
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Done>();
    tracing::info!("daemon started");
    loop {
        let wake = start_due(shared, &repos, &done_tx);
        start_prunes(shared, &repos);
        start_checks(shared, &repos);
        start_copies(shared, &repos);
        retry_pushes(shared, &repos);
        raise_stale_alerts(shared);
        tokio::select! {
            _ = tokio::time::sleep(wake) => {}
            Some(done) = done_rx.recv() => finished(shared, done),
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping");
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                break;
            }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = hup.recv() => reload(ctx, shared, repos.clone()),
        }
    }
    // No new runs. Running ones get the grace period, then are stopped.
    let running = || shared.lock().expect("daemon state").schedule.running();
    let deadline = tokio::time::Instant::now() + args.grace;
    while running() > 0 {
        tracing::info!(
            running = running(),
            grace_s = args.grace.as_secs_f64(),
            "waiting for running pulls"
        );
        tokio::select! {
            Some(done) = done_rx.recv() => finished(shared, done),
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    if running() > 0 {
        tracing::warn!(
            running = running(),
            "grace period over: stopping the running pulls"
        );
        stop_agents();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while running() > 0 {
            tokio::select! {
                Some(done) = done_rx.recv() => finished(shared, done),
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        // Whatever is still running (an SSH pull waiting on its host) ends with the
        // process; its record says so.
        let history = shared.lock().expect("daemon state").history.clone();
        history.recover(
            true,
            "aborted: the daemon was stopped (SIGTERM) and the run did not finish within the grace period",
        )?;
    }
    tracing::info!("daemon stopped");
    Ok(())
}

/// Starts the runs that are due; returns how long to sleep before looking again.
fn start_due(
    shared: &SharedRef,
    repos: &Arc<Repositories>,
    done: &tokio::sync::mpsc::UnboundedSender<Done>,
) -> Duration {
    let now = Utc::now();
    let ((due, wake), history) = locked(shared, |site, schedule, _| {
        let due: Vec<_> = schedule
            .start_due(&site.config, now)
            .into_iter()
            .map(|name| {
                let host = site.config.host(&name).expect("due hosts are configured");
                let plan = PullPlan::for_host(site, host, &PullOptions::default());
                // Its pushes, to every clone that receives it, after a saved pull.
                let pushes: Vec<Result<PushPlan, CliError>> = site
                    .config
                    .clones
                    .iter()
                    .filter(|c| c.receives(&name))
                    .map(|c| PushPlan::for_clone(site, host, c, "latest", &PullOptions::default()))
                    .collect();
                (name, plan, pushes)
            })
            .collect();
        (due, schedule.wake_in(now))
    });
    for (name, plan, pushes) in due {
        let (history, repos, done) = (history.clone(), repos.clone(), done.clone());
        let shared = shared.clone();
        tracing::info!(host = %name, "pull starting");
        std::thread::spawn(move || {
            let started = Utc::now();
            // A run that panics still ends for the schedule: the host is not left
            // "running" for ever, holding a place of max_concurrent.
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let (started, ended, saved) = pull_host(&history, &repos, &name, plan);
                if let Some(snapshot) = saved {
                    for push in pushes {
                        // A push tried again may still be running to that clone.
                        let _slot = push
                            .as_ref()
                            .ok()
                            .map(|p| PushSlot::wait(&shared, &name, &p.clone, PUSH_SLOT_WAIT));
                        push_snapshot(&history, &repos, &name, &snapshot, push);
                    }
                }
                (started, ended)
            }));
            let (started, ended) = run.unwrap_or_else(|_| {
                tracing::error!(host = %name, "the pull's thread panicked");
                let error = "the pull stopped on an internal error (see the daemon's log)";
                (
                    started,
                    Ended::Failed {
                        retry: true,
                        error: error.into(),
                    },
                )
            });
            let _ = done.send(Done {
                host: name,
                started,
                ended,
            });
        });
    }
    wake
}

/// Starts the prunes that are due (see [`schedule::prune_due`]), each in a thread of
/// its own: pulls go on meanwhile.
fn start_prunes(shared: &SharedRef, repos: &Arc<Repositories>) {
    let now = Utc::now();
    let due: Vec<crate::site::RepoLocation> = {
        let mut s = shared.lock().expect("daemon state");
        // Each repository once, with the hosts that use it.
        let repos_hosts: Vec<(crate::site::RepoLocation, Vec<String>)> = s
            .site
            .host_repositories()
            .into_iter()
            .map(|(_, loc, hosts)| (loc, hosts))
            .collect();
        let schedule = s.site.config.server.prune_schedule.clone();
        let last = s.history.with_records(|runs| {
            repos_hosts
                .iter()
                .map(|(loc, hosts)| {
                    let location = loc.location.to_string();
                    let pruned = runs
                        .iter()
                        .filter(|r| {
                            r.kind == RunKind::Prune
                                && matches!(&r.details, Some(crate::record::Details::Prune(d)) if d.repository == location)
                        })
                        .map(|r| r.start)
                        .max();
                    let forgotten = runs
                        .iter()
                        .filter(|r| {
                            hosts.contains(&r.host)
                                && matches!(&r.details, Some(crate::record::Details::Forget(d)) if !d.removed.is_empty())
                        })
                        .map(|r| r.start)
                        .max();
                    (pruned, forgotten)
                })
                .collect::<Vec<_>>()
        });
        let last = match last {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("reading the run history for prunes: {e}");
                return;
            }
        };
        let due: Vec<_> = repos_hosts
            .into_iter()
            .zip(last)
            .filter(|((loc, _), (pruned, forgotten))| {
                if s.pruning.contains(&loc.location) {
                    return false;
                }
                let pruned = (*pruned).max(s.pruned.get(&loc.location).copied());
                // A prune that could not sweep left condemnation records (the
                // daemon's repositories are local directories).
                let pending = loc.location.as_local().is_some_and(|dir| {
                    std::fs::read_dir(dir.join(FileType::Condemned.dir()))
                        .is_ok_and(|mut d| d.next().is_some())
                });
                schedule::prune_due(&schedule, pruned, *forgotten, pending, now)
            })
            .map(|((loc, _), _)| loc)
            .collect();
        for loc in &due {
            s.pruning.insert(loc.location.clone());
            s.pruned.insert(loc.location.clone(), now);
        }
        due
    };
    for loc in due {
        let (shared, repos) = (shared.clone(), repos.clone());
        tracing::info!(repository = %loc.location, "prune starting");
        std::thread::spawn(move || {
            let history = shared.lock().expect("daemon state").history.clone();
            // A prune that panics still ends for the schedule.
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                prune_repository(&history, &repos, &loc)
            }));
            if run.is_err() {
                tracing::error!(repository = %loc.location, "the prune's thread panicked");
            }
            shared
                .lock()
                .expect("daemon state")
                .pruning
                .remove(&loc.location);
        });
    }
}

/// Starts the pushes due again (see [`schedule::push_retries`]), each in a thread of
/// its own, but none of a host being pulled (its pull pushes when it ends).
fn retry_pushes(shared: &SharedRef, repos: &Arc<Repositories>) {
    let now = Utc::now();
    let due: Vec<(String, String, Result<PushPlan, CliError>)> = {
        let mut s = shared.lock().expect("daemon state");
        let found = s
            .history
            .with_records(|r| schedule::push_retries(&s.site.config, r, now));
        let found = match found {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("reading the run history for push retries: {e}");
                return;
            }
        };
        let mut due = Vec::new();
        for (host, clone) in found {
            let running = s.schedule.host(&host).is_some_and(|h| h.running());
            if running || !s.pushing.insert((host.clone(), clone.clone())) {
                continue;
            }
            let config = &s.site.config;
            let plan = match (config.host(&host), config.clone_target(&clone)) {
                (Some(h), Some(c)) => {
                    PushPlan::for_clone(&s.site, h, c, "latest", &PullOptions::default())
                }
                _ => continue,
            };
            due.push((host, clone, plan));
        }
        due
    };
    for (host, clone, plan) in due {
        let (shared, repos) = (shared.clone(), repos.clone());
        tracing::info!(host = %host, clone = %clone, "push tried again");
        std::thread::spawn(move || {
            let history = shared.lock().expect("daemon state").history.clone();
            // Noted in `pushing` above; ended when this thread ends, however it ends.
            let _slot = PushSlot {
                shared,
                key: Some((host.clone(), clone.clone())),
            };
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                push_snapshot(&history, &repos, &host, "latest", plan)
            }));
            if run.is_err() {
                tracing::error!(host = %host, clone = %clone, "the push's thread panicked");
            }
        });
    }
}

/// One scheduled prune, recorded; a repository that does not open is recorded too.
/// Starts the checks that are due (`[server].check_schedule`), each in a thread of its
/// own. With `check_read_data_period`, each reads the next part of the packs whole:
/// parts of `period / schedule`, in turn, so that every pack is read within the
/// period; the part is in each check's record, where the next one continues.
fn start_checks(shared: &SharedRef, repos: &Arc<Repositories>) {
    let now = Utc::now();
    let due: Vec<(crate::site::RepoLocation, Option<haul_repo::check::Subset>)> = {
        let mut s = shared.lock().expect("daemon state");
        let Some(schedule) = s.site.config.server.check_schedule.clone() else {
            return;
        };
        let parts = s.site.config.server.check_read_data_period.map(|period| {
            let every = schedule.period().as_secs_f64().max(1.0);
            (period.as_secs_f64() / every).ceil().clamp(1.0, 100_000.0) as u32
        });
        let mut due = Vec::new();
        for (_, loc, _) in s.site.host_repositories() {
            if s.checking.contains(&loc.location) || !loc.is_there() {
                continue;
            }
            let here = loc.location.to_string();
            let last = s.history.with_records(|runs| {
                runs.iter()
                    .rev()
                    .find(|r| matches!(&r.details, Some(crate::record::Details::Check(d)) if d.repository == here))
                    .map(|r| {
                        let part = match &r.details {
                            Some(crate::record::Details::Check(d)) => d.subset.clone(),
                            _ => None,
                        };
                        (r.start, part)
                    })
            });
            let last = match last {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("reading the run history for checks: {e}");
                    return;
                }
            };
            let started = last
                .as_ref()
                .map(|(t, _)| *t)
                .max(s.checked.get(&loc.location).copied());
            if schedule.next_after(started, now, 0.0) > now {
                continue;
            }
            let subset = parts.map(|m| {
                let previous = last
                    .as_ref()
                    .and_then(|(_, p)| p.as_deref())
                    .and_then(|p| haul_repo::check::Subset::parse(p).ok());
                let n = match previous {
                    Some(haul_repo::check::Subset::Part { n, m: was }) if was == m => n % m + 1,
                    _ => 1,
                };
                haul_repo::check::Subset::Part { n, m }
            });
            s.checking.insert(loc.location.clone());
            s.checked.insert(loc.location.clone(), now);
            due.push((loc, subset));
        }
        due
    };
    for (loc, subset) in due {
        let (shared, repos) = (shared.clone(), repos.clone());
        tracing::info!(repository = %loc.location, subset = ?subset.map(|s| s.to_string()), "check starting");
        std::thread::spawn(move || {
            let history = shared.lock().expect("daemon state").history.clone();
            let start = Utc::now();
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let result = repos.open(&loc).and_then(|shared_view| {
                    let _lock = shared_view.lock_for_reading(true, "scheduled check")?;
                    // The snapshots committed so far, then an index that holds their
                    // blobs (a commit writes its index first): pulls go on meanwhile.
                    let names = shared_view
                        .backend()
                        .list(haul_repo::backend::FileType::Snapshot)?
                        .into_iter()
                        .map(|(n, _)| n)
                        .collect();
                    let repo = shared_view.reloaded()?;
                    let opts = haul_repo::check::CheckOptions {
                        read_data: subset.is_some(),
                        subset,
                        deadline: None,
                        only_snapshots: Some(names),
                    };
                    Ok(haul_repo::check::check(&repo, &opts, &|_, _| {})?)
                });
                crate::commands::check::record_check(
                    &history,
                    start,
                    &loc.location.to_string(),
                    (subset.is_some(), subset),
                    &result,
                );
                match result {
                    Ok(r) if r.ok() => {
                        tracing::info!(repository = %loc.location, packs_read = r.packs_read, "check finished: no damage")
                    }
                    Ok(r) => {
                        tracing::error!(repository = %loc.location, errors = r.errors.len(), "check found damage")
                    }
                    Err(e) => {
                        tracing::error!(repository = %loc.location, "check failed: {e}")
                    }
                }
            }));
            if run.is_err() {
                tracing::error!(repository = %loc.location, "the check's thread panicked");
            }
            shared
                .lock()
                .expect("daemon state")
                .checking
                .remove(&loc.location);
        });
    }
}

/// Starts the copies that are due (`[[copy]]`), a host's at a time, each in a thread
/// of its own and recorded as a run of the host.
fn start_copies(shared: &SharedRef, repos: &Arc<Repositories>) {
    let now = Utc::now();
    let due: Vec<(haul_config::CopyJob, String, crate::site::RepoLocation)> = {
        let mut s = shared.lock().expect("daemon state");
        if s.site.config.copies.is_empty() {
            return;
        }
        // The start of the last run of each (copy, host), from one pass over the history.
        let last = s.history.with_records(|runs| {
            let mut last: HashMap<(String, String), DateTime<Utc>> = HashMap::new();
            for r in runs.iter().filter(|r| r.kind == RunKind::Copy) {
                if let Some(job) = copy_job_of(r) {
                    last.insert((job.to_string(), r.host.clone()), r.start);
                }
            }
            last
        });
        let last = match last {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("reading the run history for copies: {e}");
                return;
            }
        };
        let mut due = Vec::new();
        for job in s.site.config.copies.clone() {
            let hosts: Vec<String> = s
                .site
                .config
                .hosts
                .iter()
                .filter(|h| job.copies(&h.name))
                .map(|h| h.name.clone())
                .collect();
            for host in hosts {
                let key = (job.name.clone(), host.clone());
                let loc = s.site.repository(Some(&host));
                // Nothing to copy before the host's first pull made its repository.
                if s.copying.contains(&key) || !loc.is_there() {
                    continue;
                }
                let last = last.get(&key).copied();
                let started = last.max(s.copied.get(&key).copied());
                if job.schedule.next_after(started, now, 0.0) > now {
                    continue;
                }
                s.copying.insert(key.clone());
                s.copied.insert(key, now);
                due.push((job.clone(), host, loc));
            }
        }
        due
    };
    for (job, host, loc) in due {
        let (shared, repos) = (shared.clone(), repos.clone());
        tracing::info!(copy = %job.name, host = %host, to = %job.to, "copy starting");
        std::thread::spawn(move || {
            let (history, config) = {
                let s = shared.lock().expect("daemon state");
                (s.history.clone(), s.site.config.clone())
            };
            let start = Utc::now();
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let result = copy_host(&repos, &config, &job, &host, &loc);
                match &result {
                    Ok(d) => {
                        tracing::info!(copy = %job.name, host = %host, "copy finished: {}", d.summary())
                    }
                    Err(e) => tracing::error!(copy = %job.name, host = %host, "copy failed: {e}"),
                }
                let result = result
                    .map(crate::record::Details::Copy)
                    .map_err(|e| format!("copy {}: {e}", job.name));
                if let Err(e) = history.record_local((&host, RunKind::Copy), start, result) {
                    tracing::error!("cannot record the copy: {e}");
                }
            }));
            if run.is_err() {
                tracing::error!(copy = %job.name, host = %host, "the copy's thread panicked");
            }
            shared
                .lock()
                .expect("daemon state")
                .copying
                .remove(&(job.name.clone(), host));
        });
    }
}

/// The `[[copy]]` a copy run was made for: its details say, and a failed one's error
/// starts with `copy NAME: ` (see [`start_copies`]).
fn copy_job_of(r: &crate::record::RunRecord) -> Option<&str> {
    match &r.details {
        Some(crate::record::Details::Copy(d)) => Some(&d.copy),
        _ => r
            .error
            .as_deref()?
            .strip_prefix("copy ")?
            .split_once(": ")
            .map(|(job, _)| job),
    }
}

/// One `[[copy]]` of one host's snapshots.
fn copy_host(
    repos: &Repositories,
    config: &haul_config::Config,
    job: &haul_config::CopyJob,
    host: &str,
    loc: &crate::site::RepoLocation,
) -> Result<crate::record::CopyDetails, CliError> {
    let source = repos.open(loc)?;
    let _lock = source.lock_for_reading(true, "scheduled copy")?;
    let pass = match &job.password_file {
        Some(f) => Some(crate::password::target(Some(f))?),
        None => None,
    };
    let target = crate::commands::copy::Target::open(
        config,
        &source,
        &job.to,
        pass.as_deref(),
        loc.credentials.as_deref(),
        repos.cache_dir(),
    )?;
    let chosen = source.snapshots_matching(&haul_repo::SnapshotFilter {
        host: Some(host.to_string()),
        ..Default::default()
    })?;
    let done = crate::commands::copy::copy_all(&source, &target, &job.to, chosen, |_, _, _| {});
    target.close();
    let mut done = done?;
    done.copy = job.name.clone();
    Ok(done)
}

fn prune_repository(history: &History, repos: &Repositories, loc: &crate::site::RepoLocation) {
    let start = Utc::now();
    // The repository as the daemon's pulls have it (no key derivation, no index load:
    // the prune loads an index of its own, and the pulls' views load theirs again
    // after it).
    let result = repos
        .open_as_is(loc)
        .inspect_err(|e| {
            let error = Err(format!("prune of {}: {e}", loc.location));
            if let Err(e) = history.record_local(("repository", RunKind::Prune), start, error) {
                tracing::error!("cannot record the prune: {e}");
            }
        })
        .and_then(|r| {
            crate::commands::prune::run_recorded(
                history,
                haul_repo::Repository::clone(&r),
                r.cache_root(),
                &haul_repo::prune::PruneOptions::default(),
                &haul_repo::prune::RunOptions::default(),
                start,
            )
        });
    match result {
        Ok(r) => tracing::info!(
            repository = %loc.location,
            "prune finished: {}",
            crate::output::prune_summary(&crate::record::PruneDetails::of(&r))
        ),
        Err(e) => tracing::error!(repository = %loc.location, "prune failed: {e}"),
    }
}

/// How long a pull's push waits for another push of its host to that clone to end; then
/// it goes on (and fails at the standby directory's lock, recorded, if that one still
/// runs).
const PUSH_SLOT_WAIT: Duration = Duration::from_secs(6 * 3600);

/// A push of a host to a clone noted in `pushing` while it runs.
struct PushSlot {
    shared: SharedRef,
    key: Option<(String, String)>,
}

impl PushSlot {
    /// Waits (at most `limit`) until no other push of `host` to `clone` runs, and notes
    /// this one.
    fn wait(shared: &SharedRef, host: &str, clone: &str, limit: Duration) -> PushSlot {
        let key = (host.to_string(), clone.to_string());
        let deadline = std::time::Instant::now() + limit;
        loop {
            if shared
                .lock()
                .expect("daemon state")
                .pushing
                .insert(key.clone())
            {
                return PushSlot {
                    shared: shared.clone(),
                    key: Some(key),
                };
            }
            if std::time::Instant::now() >= deadline {
                tracing::warn!(host, clone, "another push to this clone is still running");
                return PushSlot {
                    shared: shared.clone(),
                    key: None,
                };
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for PushSlot {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.shared
                .lock()
                .expect("daemon state")
                .pushing
                .remove(&key);
        }
    }
}

/// One push of the snapshot a pull of `host` just saved, through the pipeline (which
/// records it); a push that cannot even start is recorded as failed too.
fn push_snapshot(
    history: &History,
    repos: &Repositories,
    host: &str,
    snapshot: &str,
    plan: Result<PushPlan, CliError>,
) {
    let started = Utc::now();
    let result = plan.and_then(|mut plan| {
        plan.snapshot = snapshot.to_string();
        tracing::info!(host, clone = %plan.clone, "push starting");
        pipeline::push(history, repos, &plan, &Quiet).map(|o| (plan.clone, o))
    });
    match result {
        Ok((clone, outcome)) => match outcome.error {
            None => tracing::info!(host, clone = %clone, "push finished"),
            Some(e) => {
                tracing::warn!(host, clone = %clone, kind = ?e.kind, "push {}: {}", outcome.record.status, e.message)
            }
        },
        Err(e) => {
            tracing::error!(host, "push failed before it started: {e}");
            let error = RunError::new(ErrorKind::Setup, e.to_string());
            record_unstarted(
                history,
                host,
                RunKind::Push,
                TransportKind::Ssh,
                started,
                &error,
            );
        }
    }
}

/// Records a run that failed before the pipeline could start it (which would have
/// recorded it itself).
fn record_unstarted(
    history: &History,
    host: &str,
    kind: RunKind,
    transport: TransportKind,
    started: DateTime<Utc>,
    error: &RunError,
) {
    let record = RunRecord::new(new_run_id(started), host, kind, transport, started).failed(error);
    if let Err(e) = history.record(&record) {
        tracing::error!("cannot record the run: {e}");
    }
}

/// One pull through the pipeline (which records it); how it ended for the schedule,
/// and the snapshot it saved.
fn pull_host(
    history: &History,
    repos: &Repositories,
    name: &str,
    plan: Result<PullPlan, CliError>,
) -> (DateTime<Utc>, Ended, Option<String>) {
    let started = Utc::now();
    let transport = plan
        .as_ref()
        .map_or(TransportKind::None, |p| p.source.kind());
    let result = plan.and_then(|plan| pipeline::pull(history, repos, &plan, &Quiet));
    let saved = result
        .as_ref()
        .ok()
        .filter(|o| o.record.status.saved())
        .and_then(|o| o.record.snapshot.clone());
    let ended = match result {
        Ok(outcome) if outcome.record.status.saved() => Ended::Saved,
        Ok(outcome) => {
            let error = outcome
                .error
                .unwrap_or_else(|| RunError::new(ErrorKind::Agent, "failed"));
            tracing::warn!(host = %name, kind = ?error.kind, "pull failed: {}", error.message);
            Ended::Failed {
                retry: error.kind.retry(),
                error: error.message,
            }
        }
        // It could not start (its repository did not open): recorded here.
        Err(e) => {
            tracing::error!(host = %name, "pull failed before it started: {e}");
            let error = RunError::new(ErrorKind::Repository, e.to_string());
            record_unstarted(history, name, RunKind::Pull, transport, started, &error);
            Ended::Failed {
                retry: true,
                error: error.message,
            }
        }
    };
    tracing::info!(host = %name, saved = matches!(ended, Ended::Saved), "pull finished");
    (started, ended, saved)
}

/// Calls `f` with the site and the schedule, under the lock; returns what it returns
/// and the history (to record in after the lock is released).
fn locked<T>(
    shared: &SharedRef,
    f: impl FnOnce(&Site, &mut Schedule, &History) -> T,
) -> (T, History) {
    let mut s = shared.lock().expect("daemon state");
    let Shared {
        site,
        schedule,
        history,
        ..
    } = &mut *s;
    (f(site, schedule, history), history.clone())
}

fn finished(shared: &SharedRef, done: Done) {
    let now = Utc::now();
    // The pull (and its pushes) changed what the repositories hold.
    let facts = shared.lock().expect("daemon state").facts.clone();
    facts.expire();
    let (alert, history) = locked(shared, |site, schedule, _| {
        let alert = schedule.finished(
            &site.config,
            &done.host,
            done.started,
            done.ended,
            now,
            &mut jitter,
        );
        if let Some(st) = schedule.host(&done.host) {
            tracing::info!(host = %done.host, failures = st.failures, next = ?st.next.map(|t| t.to_rfc3339()), "scheduled");
        }
        alert
    });
    if let Some(alert) = alert {
        record_alert(&history, alert, RunStatus::Failed);
    }
}

/// A `WARNING` item for each stale host, once per alert window.
fn raise_stale_alerts(shared: &SharedRef) {
    let (alerts, history) = locked(shared, |site, schedule, history| {
        let now = Utc::now();
        // Pulls other processes recorded count too (the history is read incrementally).
        let clones = history.with_records(|r| {
            schedule.observe(&site.config, r, now, &mut jitter);
            schedule.stale_clones(&site.config, r, now)
        });
        let mut alerts = schedule.stale_alerts(&site.config, now);
        match clones {
            Ok(c) => alerts.extend(c),
            Err(e) => tracing::warn!("reading the run history: {e}"),
        }
        alerts
    });
    for alert in alerts {
        record_alert(&history, alert, RunStatus::Warning);
    }
}

fn record_alert(history: &History, alert: Alert, status: RunStatus) {
    tracing::warn!(host = %alert.host, "{}", alert.message);
    let now = Utc::now();
    let mut record = RunRecord::new(
        new_run_id(now),
        &alert.host,
        RunKind::Alert,
        TransportKind::None,
        now,
    );
    record.status = status;
    record.error = Some(alert.message);
    if let Some(clone) = alert.clone {
        record.details = Some(crate::record::Details::CloneAlert(
            crate::record::CloneAlertDetails { clone },
        ));
    }
    if let Err(e) = history.record(&record) {
        tracing::error!("cannot record the alert: {e}");
    }
}

/// SIGHUP: read the configuration file the daemon started with again; keep the old
/// configuration when the file is invalid or gone.
fn load_credentials(
    config: &haul_config::Config,
) -> Result<Option<Arc<auth::Credentials>>, CliError> {
    config
        .server
        .status_credentials
        .as_deref()
        .map(|p| auth::Credentials::load(p).map(Arc::new))
        .transpose()
}

fn reload(ctx: &Context, shared: &SharedRef, repos: Arc<Repositories>) {
    let path = shared
        .lock()
        .expect("daemon state")
        .site
        .config_path
        .clone();
    let global = crate::cli::Global {
        config: path,
        ..ctx.global.clone()
    };
    // The path is the one found at start (the daemon needs one), so a file gone
    // meanwhile is an error here, not an empty configuration.
    let site = match Site::resolve(&global) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("SIGHUP: the configuration is invalid, the old one stays in use: {e}");
            return;
        }
    };
    let credentials = match load_credentials(&site.config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("SIGHUP: the old configuration stays in use: {e}");
            return;
        }
    };
    let notifiers = crate::notify::Notifiers::from_config(&site.config).in_background();
    let now = Utc::now();
    let mut s = shared.lock().expect("daemon state");
    // The status server stays on the address it was bound to: off loopback, it keeps
    // requiring credentials whatever the new file says.
    let bound = s.site.config.server.status_listen;
    if !bound.ip().is_loopback() && credentials.is_none() {
        tracing::error!(
            "SIGHUP: the old configuration stays in use: the status server listens on {bound}, not a loopback address, and the new configuration has no [server].status_credentials"
        );
        return;
    }
    if site.config.server.status_listen != s.site.config.server.status_listen {
        tracing::warn!("SIGHUP: [server].status_listen changes only when the daemon restarts");
    }
    if site.state != s.site.state {
        tracing::warn!("SIGHUP: [server].state_dir changes only when the daemon restarts");
    }
    let Shared {
        site: old,
        schedule,
        history,
        ..
    } = &mut *s;
    let config = site.config.clone();
    if let Err(e) = history.with_records(|r| schedule.reload(&config, r, now, &mut jitter)) {
        tracing::error!(
            "SIGHUP: the run history cannot be read, the old configuration stays in use: {e}"
        );
        return;
    }
    // Repositories no host uses any more are closed.
    let used: Vec<_> = config
        .hosts
        .iter()
        .map(|h| site.repository(Some(&h.name)).location)
        .collect();
    // Off this task: a repository being opened holds the map for as long as that takes.
    std::thread::spawn(move || repos.retain(|p| used.iter().any(|u| u == p)));
    tracing::info!(hosts = config.hosts.len(), "SIGHUP: configuration reloaded");
    *old = Site {
        state: old.state.clone(),
        ..site
    };
    s.credentials = credentials;
    s.history = s.history.clone().with_notifiers(notifiers);
}

/// SIGTERM to this process's haul-agent children: their pulls then fail and are
/// recorded.
fn stop_agents() {
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1);
        if ppid == Some(me.as_str()) && head.contains("(haul-agent") {
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
}
