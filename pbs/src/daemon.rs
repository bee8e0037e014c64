//! `haul-pbs daemon`: pulls every configured host on its schedule, in the foreground,
//! and serves the feeds, a status document and metrics over HTTP.
//!
//! - Schedules: an interval with jitter, or a cron expression (`haul_config::Schedule`).
//!   At most `[server].max_concurrent` runs at once, never two of one host. A failed run
//!   is retried after 30 s, doubling per consecutive failure, at most the host's period
//!   (and at most an hour).
//! - Restarts: the next run of each host follows from its last recorded run, so a
//!   restart runs only the hosts that are due; hosts already overdue are started one
//!   after another, [`stagger`] apart, not all at once. Runs that an earlier process left
//!   unfinished (killed mid-run) are recorded as failed first (`History::recover`).
//! - SIGTERM or SIGINT: no new runs; running ones get `--grace` to finish; then their
//!   agents are stopped and the runs recorded as failed; exit status 0. SIGHUP: the
//!   configuration is read again; when it is invalid the error is logged and the old
//!   one kept.
//! - Stale hosts: a host without a successful run (`ok` or `warning`: a snapshot was
//!   saved) for its alert window gets a `WARNING` item in the feeds, once per window,
//!   and `stale` in status and metrics.
//! - HTTP (`[server].status_listen`, loopback by default): `/feed.xml`,
//!   `/hosts/<name>/feed.xml`, `/status.json`, `/metrics` (Prometheus text format).
//!
//! Each repository is opened once for the daemon's lifetime (`server::keep`).

use crate::cli::{DaemonArgs, PullArgs, RunArgs, SelectArgs};
use crate::commands::Context;
use crate::error::CliError;
use crate::feed::{self, FeedOptions};
use crate::history::History;
use crate::run::RunRecord;
use chrono::{DateTime, Utc};
use haul_config::{Config, Host};
use haul_repo::IndexedRepository;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the scheduler knows of a host.
#[derive(Debug, Clone)]
struct HostState {
    next: DateTime<Utc>,
    failures: u32,
    /// When the running pull started; none while idle.
    running_since: Option<DateTime<Utc>>,
    /// End of the last successful pull, and time of the last stale alert (from the
    /// history at start, kept up to date here: the scheduler never rereads it).
    last_success: Option<DateTime<Utc>>,
    last_alert: Option<DateTime<Utc>>,
}

impl HostState {
    fn running(&self) -> bool {
        self.running_since.is_some()
    }
}

/// Shared by the scheduler and the HTTP handlers.
struct Shared {
    config: Config,
    hosts: HashMap<String, HostState>,
    started: DateTime<Utc>,
}

type SharedRef = Arc<Mutex<Shared>>;

pub fn daemon(ctx: &Context, args: DaemonArgs) -> Result<(), CliError> {
    let config = Config::load(&args.config).map_err(|e| CliError::usage(e.0))?;
    let history = history_of(&config);
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
    let (records, _) = history.read()?;
    let hosts = initial_states(&config, &records, now);
    for h in &config.hosts {
        let s = &hosts[&h.name];
        tracing::info!(host = %h.name, schedule = %h.schedule(&config), next = %s.next.to_rfc3339(), "scheduled");
    }
    let listen = config.server.status_listen;
    let shared = Arc::new(Mutex::new(Shared {
        config,
        hosts,
        started: now,
    }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("cannot start the runtime: {e}")))?;
    let ctx = Arc::new(Context::new(ctx.global.clone()));
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            CliError::Io(
                format!("status server on {listen} ([server].status_listen)"),
                e,
            )
        })?;
        tracing::info!(%listen, "status server listening");
        let app = status_router(shared.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("status server stopped: {e}");
            }
        });
        scheduler(ctx, args, shared).await
    })
}

fn history_of(config: &Config) -> History {
    History::new(config.server.state_dir.clone()).with_feed(FeedOptions::from_config(config))
}

/// Time between overdue hosts started after a restart.
fn stagger(period: Duration) -> Duration {
    (period / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Wait before retry `failures` (1 = the first failure).
fn backoff(failures: u32, period: Duration) -> Duration {
    let d = Duration::from_secs(30).saturating_mul(1 << failures.saturating_sub(1).min(16));
    d.min(period).min(Duration::from_secs(3600))
}

fn jitter() -> f64 {
    let mut b = [0u8; 4];
    getrandom::getrandom(&mut b).expect("OS random numbers");
    u32::from_le_bytes(b) as f64 / u32::MAX as f64
}

fn pulls_of<'a>(
    records: &'a [RunRecord],
    host: &'a str,
) -> impl DoubleEndedIterator<Item = &'a RunRecord> {
    records
        .iter()
        .filter(move |r| r.host == host && r.kind == "pull")
}

fn succeeded(r: &RunRecord) -> bool {
    r.status == "ok" || r.status == "warning"
}

/// Where each host's schedule stands, from the history.
fn initial_states(
    config: &Config,
    records: &[RunRecord],
    now: DateTime<Utc>,
) -> HashMap<String, HostState> {
    let mut overdue = Vec::new();
    let mut states = HashMap::new();
    for h in &config.hosts {
        let state = state_from_history(config, h, records, now);
        if state.next <= now {
            overdue.push((state.next, h.name.clone(), h.schedule(config).period()));
        }
        states.insert(h.name.clone(), state);
    }
    // Overdue hosts one after another, most overdue first.
    overdue.sort();
    let mut at = now;
    for (_, name, period) in overdue {
        states.get_mut(&name).expect("just inserted").next = at;
        at += chrono::Duration::from_std(stagger(period)).expect("small");
    }
    states
}

fn state_from_history(
    config: &Config,
    h: &Host,
    records: &[RunRecord],
    now: DateTime<Utc>,
) -> HostState {
    let schedule = h.schedule(config);
    let last = pulls_of(records, &h.name).max_by_key(|r| r.start);
    let failures = pulls_of(records, &h.name)
        .rev()
        .take_while(|r| !succeeded(r))
        .count() as u32;
    let next = match last {
        Some(r) if failures > 0 => {
            r.end + chrono::Duration::from_std(backoff(failures, schedule.period())).expect("small")
        }
        Some(r) => schedule.next_after(Some(r.start), now, jitter()),
        None => schedule.next_after(None, now, jitter()),
    };
    HostState {
        next,
        failures,
        running_since: None,
        last_success: pulls_of(records, &h.name)
            .filter(|r| succeeded(r))
            .map(|r| r.end)
            .max(),
        last_alert: records
            .iter()
            .filter(|r| r.host == h.name && r.kind == "alert")
            .map(|r| r.end)
            .max(),
    }
}

async fn scheduler(ctx: Arc<Context>, args: DaemonArgs, shared: SharedRef) -> Result<(), CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |k| signal(k).map_err(|e| CliError::Failed(format!("cannot handle signals: {e}")));
    let (mut term, mut int, mut hup) = (
        sig(SignalKind::terminate())?,
        sig(SignalKind::interrupt())?,
        sig(SignalKind::hangup())?,
    );
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Done>();
    let repos: Arc<Mutex<HashMap<PathBuf, &'static IndexedRepository>>> = Default::default();
    tracing::info!("daemon started");
    loop {
        let wake = start_due(&ctx, &args, &shared, &repos, &done_tx);
        raise_alerts(&shared);
        tokio::select! {
            _ = tokio::time::sleep(wake) => {}
            Some(done) = done_rx.recv() => finished(&shared, done),
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = hup.recv() => reload(&args, &shared),
        }
    }
    // No new runs. Running ones get the grace period, then are stopped.
    let deadline = tokio::time::Instant::now() + args.grace;
    while running(&shared) > 0 {
        tracing::info!(
            running = running(&shared),
            grace_s = args.grace.as_secs_f64(),
            "waiting for running pulls"
        );
        tokio::select! {
            Some(done) = done_rx.recv() => finished(&shared, done),
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    if running(&shared) > 0 {
        tracing::warn!(
            running = running(&shared),
            "grace period over: stopping the running pulls"
        );
        stop_agents();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while running(&shared) > 0 {
            tokio::select! {
                Some(done) = done_rx.recv() => finished(&shared, done),
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        // Whatever is still running (an SSH pull waiting on its host) ends with the
        // process; its record says so.
        let config = shared.lock().expect("daemon state").config.clone();
        history_of(&config).recover(
            true,
            "aborted: the daemon was stopped (SIGTERM) and the run did not finish within the grace period",
        )?;
    }
    tracing::info!("daemon stopped");
    Ok(())
}

fn running(shared: &SharedRef) -> usize {
    shared
        .lock()
        .expect("daemon state")
        .hosts
        .values()
        .filter(|s| s.running())
        .count()
}

/// Starts the runs that are due, as far as the concurrency cap allows; returns how long
/// to sleep before looking again.
fn start_due(
    ctx: &Arc<Context>,
    args: &DaemonArgs,
    shared: &SharedRef,
    repos: &Arc<Mutex<HashMap<PathBuf, &'static IndexedRepository>>>,
    done: &tokio::sync::mpsc::UnboundedSender<Done>,
) -> Duration {
    let now = Utc::now();
    let mut s = shared.lock().expect("daemon state");
    let cap = s.config.server.max_concurrent;
    let mut busy = s.hosts.values().filter(|h| h.running()).count();
    // Most overdue first.
    let mut due: Vec<(DateTime<Utc>, String)> = s
        .hosts
        .iter()
        .filter(|(_, h)| !h.running() && h.next <= now)
        .map(|(n, h)| (h.next, n.clone()))
        .collect();
    due.sort();
    for (_, name) in due {
        if busy >= cap {
            break;
        }
        let Some(host) = s.config.host(&name).cloned() else {
            continue;
        };
        s.hosts.get_mut(&name).expect("known host").running_since = Some(now);
        busy += 1;
        let config = s.config.clone();
        let (ctx, repos, done) = (ctx.clone(), repos.clone(), done.clone());
        let config_path = args.config.clone();
        tracing::info!(host = %name, "pull starting");
        std::thread::spawn(move || {
            let (status, started) = pull_host(&ctx, &config, &config_path, &host, &repos);
            let _ = done.send(Done {
                host: host.name.clone(),
                status,
                started,
            });
        });
    }
    let next = s
        .hosts
        .values()
        .filter(|h| !h.running())
        .map(|h| h.next)
        .min()
        .unwrap_or(now + chrono::Duration::seconds(60));
    (next - now)
        .to_std()
        .unwrap_or(Duration::ZERO)
        .clamp(Duration::from_millis(200), Duration::from_secs(60))
}

/// One pull, recorded in the history by `pull_one`; returns its status.
fn pull_host(
    ctx: &Context,
    config: &Config,
    config_path: &std::path::Path,
    host: &Host,
    repos: &Mutex<HashMap<PathBuf, &'static IndexedRepository>>,
) -> (&'static str, DateTime<Utc>) {
    let path = host.repository_path(config);
    let repo = {
        let mut open = repos.lock().expect("repositories");
        match open.get(&path) {
            Some(r) => Ok(*r),
            None => {
                let key = config
                    .server
                    .repositories_dir()
                    .join(format!("{}.key", host.repository));
                ctx.open_with_key_file(&path, &key).map(|r| {
                    let r = crate::server::keep(r);
                    open.insert(path.clone(), r);
                    r
                })
            }
        }
    };
    let repo = match repo {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(host = %host.name, "repository {}: {e}", path.display());
            record_failure(config, host, &format!("repository {}: {e}", path.display()));
            return ("failed", Utc::now());
        }
    };
    let args = PullArgs {
        name: Some(host.name.clone()),
        all: false,
        local: Vec::new(),
        config: config_path.to_path_buf(),
        select: SelectArgs {
            exclude: Vec::new(),
            exclude_caches: false,
            one_file_system: false,
            tag: Vec::new(),
            host: None,
        },
        force: false,
        run: RunArgs {
            state_dir: Some(config.server.state_dir.clone()),
            agent: host.agent.clone(),
            stall_timeout: Some(config.server.stall_timeout),
            request_timeout: Some(config.server.request_timeout),
        },
    };
    // The run starts now, the repository open (its first open takes a while).
    let started = Utc::now();
    let status = match crate::commands::pull::pull_one(ctx, &args, Some(repo), Some(config)) {
        Ok(()) => "ok",
        Err(CliError::Incomplete(_)) => "warning",
        Err(e) => {
            tracing::warn!(host = %host.name, "pull failed: {e}");
            "failed"
        }
    };
    tracing::info!(host = %host.name, status, "pull finished");
    (status, started)
}

/// Records a run that failed before it could start.
fn record_failure(config: &Config, host: &Host, error: &str) {
    let now = Utc::now();
    let record = RunRecord::bare(
        crate::run::new_run_id(now),
        &host.name,
        ("pull", host.transport.name()),
        now,
        "failed",
        error.to_string(),
    );
    if let Err(e) = history_of(config).record(&record) {
        tracing::error!("cannot record the run: {e}");
    }
}

/// A pull's end, as its thread reports it.
struct Done {
    host: String,
    status: &'static str,
    /// When the pull itself started: the next one of an interval schedule follows it.
    started: DateTime<Utc>,
}

fn finished(shared: &SharedRef, done: Done) {
    let Done {
        host,
        status,
        started,
    } = done;
    let host = host.as_str();
    let now = Utc::now();
    let mut s = shared.lock().expect("daemon state");
    let Some(h) = s.config.host(host).cloned() else {
        // Removed from the configuration while it ran.
        s.hosts.remove(host);
        return;
    };
    let schedule = h.schedule(&s.config).clone();
    let state = s.hosts.get_mut(host).expect("known host");
    state.running_since = None;
    if status == "failed" {
        state.failures += 1;
        let wait = backoff(state.failures, schedule.period());
        state.next = now + chrono::Duration::from_std(wait).expect("small");
        tracing::info!(
            host,
            failures = state.failures,
            retry_in_s = wait.as_secs(),
            "will retry"
        );
    } else {
        state.failures = 0;
        state.last_success = Some(now);
        state.next = schedule.next_after(Some(started), now, jitter());
    }
}

/// SIGHUP: read the configuration again; keep the old one when the new one is invalid.
fn reload(args: &DaemonArgs, shared: &SharedRef) {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("SIGHUP: the configuration is invalid, the old one stays in use: {e}");
            return;
        }
    };
    let now = Utc::now();
    let records = history_of(&config)
        .read()
        .map(|(r, _)| r)
        .unwrap_or_default();
    let mut s = shared.lock().expect("daemon state");
    let mut hosts = HashMap::new();
    for h in &config.hosts {
        let state = match s.hosts.get(&h.name) {
            // A running host keeps its state; an idle one is rescheduled (its schedule
            // may have changed).
            Some(old) if old.running() => old.clone(),
            _ => state_from_history(&config, h, &records, now),
        };
        hosts.insert(h.name.clone(), state);
    }
    // Running hosts that were removed stay until their run ends.
    for (name, old) in &s.hosts {
        if old.running() && !hosts.contains_key(name) {
            hosts.insert(name.clone(), old.clone());
        }
    }
    if config.server.status_listen != s.config.server.status_listen {
        tracing::warn!("SIGHUP: [server].status_listen changes only when the daemon restarts");
    }
    tracing::info!(hosts = config.hosts.len(), "SIGHUP: configuration reloaded");
    s.config = config;
    s.hosts = hosts;
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

/// Per host: when it last succeeded (or, never, when the daemon started), and whether
/// it is stale.
struct Health {
    last_success: Option<DateTime<Utc>>,
    stale: bool,
    window: Duration,
}

fn health(
    config: &Config,
    h: &Host,
    state: &HostState,
    started: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Health {
    let window = h.alert_window(config);
    // Never succeeded: counted from when this daemon started.
    let since = state.last_success.unwrap_or(started);
    Health {
        last_success: state.last_success,
        stale: (now - since).to_std().unwrap_or_default() > window,
        window,
    }
}

/// A `WARNING` item for each stale host, once per alert window. Decided from the
/// scheduler's state; the history is only written.
fn raise_alerts(shared: &SharedRef) {
    let now = Utc::now();
    let mut alerts = Vec::new();
    let config = {
        let mut s = shared.lock().expect("daemon state");
        let (config, started) = (s.config.clone(), s.started);
        for h in &config.hosts {
            let Some(state) = s.hosts.get_mut(&h.name) else {
                continue;
            };
            let health = health(&config, h, state, started, now);
            let since = state.last_success.unwrap_or(started);
            let alerted = state.last_alert.is_some_and(|a| {
                a > since && (now - a).to_std().unwrap_or_default() < health.window
            });
            if !health.stale || alerted {
                continue;
            }
            state.last_alert = Some(now);
            let gap = human_gap(now - since);
            let what = match health.last_success {
                Some(_) => format!("no successful backup for {gap}"),
                None => format!("no successful backup since the daemon started {gap} ago"),
            };
            alerts.push((h.name.clone(), what, health.window));
        }
        config
    };
    let history = history_of(&config);
    for (host, what, window) in alerts {
        tracing::warn!(host = %host, "{what}");
        let record = RunRecord::bare(
            crate::run::new_run_id(now),
            &host,
            ("alert", "-"),
            now,
            "warning",
            format!(
                "{what} (alert window {})",
                humantime::format_duration(window)
            ),
        );
        if let Err(e) = history.record(&record) {
            tracing::error!("cannot record the alert: {e}");
        }
    }
}

/// `27 h` for long gaps, `3m 20s` for short ones.
fn human_gap(gap: chrono::Duration) -> String {
    let secs = gap.num_seconds().max(0) as u64;
    if secs >= 3600 {
        format!("{:.0} h", secs as f64 / 3600.0)
    } else {
        humantime::format_duration(Duration::from_secs(secs)).to_string()
    }
}

fn status_router(shared: SharedRef) -> axum::Router {
    use axum::extract::{Path, State};
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    let xml = |body: String| {
        (
            [(header::CONTENT_TYPE, "application/rss+xml; charset=utf-8")],
            body,
        )
    };
    axum::Router::new()
        .route(
            "/feed.xml",
            get(move |State(s): State<SharedRef>| async move {
                let (config, records) = snapshot(&s);
                xml(feed::render_with(
                    &records,
                    None,
                    &FeedOptions::from_config(&config),
                ))
            }),
        )
        .route(
            "/hosts/{name}/feed.xml",
            get(
                move |State(s): State<SharedRef>, Path(name): Path<String>| async move {
                    let (config, records) = snapshot(&s);
                    if config.host(&name).is_none() && !records.iter().any(|r| r.host == name) {
                        return (StatusCode::NOT_FOUND, format!("no host {name:?}\n"))
                            .into_response();
                    }
                    xml(feed::render_with(
                        &records,
                        Some(&name),
                        &FeedOptions::from_config(&config),
                    ))
                    .into_response()
                },
            ),
        )
        .route(
            "/status.json",
            get(|State(s): State<SharedRef>| async move { axum::Json(status(&s)) }),
        )
        .route(
            "/metrics",
            get(|State(s): State<SharedRef>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics(&s),
                )
            }),
        )
        .with_state(shared)
}

fn snapshot(s: &SharedRef) -> (Config, Vec<RunRecord>) {
    let config = s.lock().expect("daemon state").config.clone();
    let records = history_of(&config)
        .read()
        .map(|(r, _)| r)
        .unwrap_or_default();
    (config, records)
}

/// Per host, what status and metrics show.
struct Row {
    name: String,
    state: HostState,
    last: Option<RunRecord>,
    health: Health,
}

fn rows(s: &SharedRef) -> (Vec<Row>, Config) {
    // Configuration and states from one look, so a reload cannot come between them.
    let (config, states, started) = {
        let g = s.lock().expect("daemon state");
        (g.config.clone(), g.hosts.clone(), g.started)
    };
    let records = history_of(&config)
        .read()
        .map(|(r, _)| r)
        .unwrap_or_default();
    let now = Utc::now();
    let rows = config
        .hosts
        .iter()
        .filter_map(|h| {
            let state = states.get(&h.name)?.clone();
            Some(Row {
                name: h.name.clone(),
                last: pulls_of(&records, &h.name).max_by_key(|r| r.start).cloned(),
                health: health(&config, h, &state, started, now),
                state,
            })
        })
        .collect();
    (rows, config)
}

fn status(s: &SharedRef) -> serde_json::Value {
    let (rows, config) = rows(s);
    let hosts: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let h = config.host(&r.name).expect("a configured host");
            serde_json::json!({
                "name": r.name,
                "schedule": h.schedule(&config).to_string(),
                "running": r.state.running(),
                "next_run": r.state.next.to_rfc3339(),
                "consecutive_failures": r.state.failures,
                "last_run": r.last.as_ref().map(|l| serde_json::json!({
                    "id": l.id, "status": l.status, "start": l.start.to_rfc3339(),
                    "end": l.end.to_rfc3339(), "error": l.error, "snapshot": l.snapshot,
                })),
                "last_success": r.health.last_success.map(|t| t.to_rfc3339()),
                "alert_window_s": r.health.window.as_secs(),
                "stale": r.health.stale,
            })
        })
        .collect();
    serde_json::json!({
        "hosts": hosts,
        "running": hosts.iter().filter(|h| h["running"] == true).count(),
        "max_concurrent": config.server.max_concurrent,
    })
}

fn metrics(s: &SharedRef) -> String {
    use std::fmt::Write;
    let (rows, config) = rows(s);
    let mut out = String::new();
    let mut family = |name: &str, help: &str, value: &dyn Fn(&Row) -> Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for r in &rows {
            for (labels, v) in value(r) {
                // Host names are letters, digits, `.`, `_` and `-`: nothing to escape.
                let _ = writeln!(out, "{name}{{host=\"{}\"{labels}}} {v}", r.name);
            }
        }
    };
    family(
        "haul_host_last_success_timestamp_seconds",
        "Unix time of the end of the host's last successful pull (0: never).",
        &|r| {
            vec![(
                String::new(),
                r.health.last_success.map_or(0.0, |t| t.timestamp() as f64),
            )]
        },
    );
    family(
        "haul_host_last_run_status",
        "The status of the host's last pull: 1 on the label of that status.",
        &|r| {
            ["ok", "warning", "failed"]
                .iter()
                .map(|st| {
                    let on = r.last.as_ref().is_some_and(|l| l.status == *st);
                    (format!(",status=\"{st}\""), if on { 1.0 } else { 0.0 })
                })
                .collect()
        },
    );
    family(
        "haul_host_last_run_duration_seconds",
        "How long the host's last pull took.",
        &|r| {
            vec![(
                String::new(),
                r.last.as_ref().map_or(0.0, |l| {
                    (l.end - l.start).num_milliseconds() as f64 / 1000.0
                }),
            )]
        },
    );
    family(
        "haul_host_last_run_bytes_new",
        "Bytes of new content the host's last pull stored.",
        &|r| {
            vec![(
                String::new(),
                r.last
                    .as_ref()
                    .and_then(|l| l.counters.as_ref())
                    .and_then(|c| c["bytes_new"].as_u64())
                    .unwrap_or(0) as f64,
            )]
        },
    );
    family(
        "haul_host_consecutive_failures",
        "Failed pulls of the host since its last successful one.",
        &|r| vec![(String::new(), r.state.failures as f64)],
    );
    family(
        "haul_host_stale",
        "1 when the host has had no successful pull within its alert window.",
        &|r| vec![(String::new(), if r.health.stale { 1.0 } else { 0.0 })],
    );
    family(
        "haul_host_running",
        "1 while a pull of the host runs.",
        &|r| vec![(String::new(), if r.state.running() { 1.0 } else { 0.0 })],
    );
    let _ = writeln!(
        out,
        "# HELP haul_max_concurrent_runs The cap on runs at once ([server].max_concurrent).\n# TYPE haul_max_concurrent_runs gauge\nhaul_max_concurrent_runs {}",
        config.server.max_concurrent
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, "pbs.toml").unwrap()
    }

    #[test]
    fn backoff_doubles_up_to_the_period_and_an_hour() {
        let day = Duration::from_secs(86_400);
        assert_eq!(backoff(1, day), Duration::from_secs(30));
        assert_eq!(backoff(3, day), Duration::from_secs(120));
        assert_eq!(backoff(30, day), Duration::from_secs(3600));
        assert_eq!(backoff(5, Duration::from_secs(60)), Duration::from_secs(60));
    }

    #[test]
    fn after_a_restart_only_due_hosts_run_and_overdue_ones_are_staggered() {
        let c = config(
            "[[host]]\nname = \"a\"\naddress = \"x\"\npaths = [\"/a\"]\nschedule = \"1h\"\n\
             [[host]]\nname = \"b\"\naddress = \"x\"\npaths = [\"/b\"]\nschedule = \"1h\"\n\
             [[host]]\nname = \"c\"\naddress = \"x\"\npaths = [\"/c\"]\nschedule = \"1h\"\n\
             [[host]]\nname = \"d\"\naddress = \"x\"\npaths = [\"/d\"]\nschedule = \"1h\"\n",
        );
        let now = Utc::now();
        let rec = |host: &str, ago_min: i64, status: &str| {
            let mut r = crate::history::tests::record(&format!("r-{host}"), host, status);
            r.start = now - chrono::Duration::minutes(ago_min);
            r.end = r.start + chrono::Duration::seconds(5);
            r
        };
        // a ran 10 min ago; b 2 h and c 5 h ago (both overdue); d failed 1 min ago (its
        // retry is due 30 s after that: overdue too).
        let records = vec![
            rec("a", 10, "ok"),
            rec("b", 120, "ok"),
            rec("c", 300, "ok"),
            rec("d", 1, "failed"),
        ];
        let s = initial_states(&c, &records, now);
        assert!(
            s["a"].next >= now + chrono::Duration::minutes(50),
            "{:?}",
            s["a"]
        );
        // The most overdue first, then the next one a stagger later.
        assert_eq!(s["c"].next, now);
        assert_eq!(s["b"].next, now + chrono::Duration::seconds(30));
        assert_eq!(s["d"].failures, 1);
        assert_eq!(s["d"].next, now + chrono::Duration::seconds(60));
    }
}
