//! The daemon's status server (`[server].status_listen`, loopback by default):
//! `/feed.xml`, `/hosts/<name>/feed.xml`, `/status.json`, `/metrics` (Prometheus text
//! format). Handlers read the history the daemon keeps in memory (`History`, read once)
//! and the schedule's state; none reads the history file whole.

use super::{Shared, SharedRef};
use crate::feed::{self, FeedOptions};
use crate::record::{RunKind, RunRecord, RunStatus};
use chrono::Utc;
use haul_config::Config;

/// The router of the status server.
pub fn router(shared: SharedRef) -> axum::Router {
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
                let (config, history) = parts(&s);
                let body = history.with_records(|r| {
                    feed::render_with(r, None, &FeedOptions::from_config(&config))
                });
                match body {
                    Ok(b) => xml(b).into_response(),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
                }
            }),
        )
        .route(
            "/hosts/{name}/feed.xml",
            get(
                move |State(s): State<SharedRef>, Path(name): Path<String>| async move {
                    let (config, history) = parts(&s);
                    let body = history.with_records(|r| {
                        let known =
                            config.host(&name).is_some() || r.iter().any(|r| r.host == name);
                        known.then(|| {
                            feed::render_with(r, Some(&name), &FeedOptions::from_config(&config))
                        })
                    });
                    match body {
                        Ok(Some(b)) => xml(b).into_response(),
                        Ok(None) => {
                            (StatusCode::NOT_FOUND, format!("no host {name:?}\n")).into_response()
                        }
                        Err(e) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
                        }
                    }
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

fn parts(s: &SharedRef) -> (Config, crate::history::History) {
    let g = s.lock().expect("daemon state");
    (g.site.config.clone(), g.history.clone())
}

/// Per host, what status and metrics show.
struct Row {
    name: String,
    schedule: String,
    state: super::schedule::HostState,
    last: Option<RunRecord>,
    health: super::schedule::Health,
}

fn rows(s: &SharedRef) -> (Vec<Row>, Config) {
    let now = Utc::now();
    // Configuration and states from one look, so a reload cannot come between them.
    let (config, history, rows) = {
        let g: std::sync::MutexGuard<'_, Shared> = s.lock().expect("daemon state");
        let config = g.site.config.clone();
        let rows: Vec<_> = config
            .hosts
            .iter()
            .filter_map(|h| {
                Some((
                    h.name.clone(),
                    h.schedule(&config).to_string(),
                    g.schedule.host(&h.name)?.clone(),
                    g.schedule.health(&config, h, now)?,
                ))
            })
            .collect();
        (config, g.history.clone(), rows)
    };
    let last = |name: &str| {
        history
            .with_records(|r| {
                r.iter()
                    .rev()
                    .find(|r| r.host == name && r.kind == RunKind::Pull)
                    .cloned()
            })
            .ok()
            .flatten()
    };
    let rows = rows
        .into_iter()
        .map(|(name, schedule, state, health)| Row {
            last: last(&name),
            name,
            schedule,
            state,
            health,
        })
        .collect();
    (rows, config)
}

/// Every clone's copy of every host it receives.
fn copies(s: &SharedRef) -> Vec<super::schedule::Copy> {
    let (config, history, started) = {
        let g = s.lock().expect("daemon state");
        (
            g.site.config.clone(),
            g.history.clone(),
            g.schedule.started(),
        )
    };
    history
        .with_records(|r| super::schedule::copies(&config, r, Utc::now(), started))
        .unwrap_or_default()
}

fn status(s: &SharedRef) -> serde_json::Value {
    let (rows, config) = rows(s);
    let clones: Vec<serde_json::Value> = copies(s)
        .iter()
        .map(|c| {
            let details = c.last_push.as_ref().and_then(|l| match &l.details {
                Some(crate::record::Details::Push(d)) => Some(d),
                _ => None,
            });
            serde_json::json!({
                "clone": c.clone,
                "host": c.host,
                "last_push": c.last_push.as_ref().map(|l| serde_json::json!({
                    "id": l.id, "status": l.status, "start": l.start.to_rfc3339(),
                    "end": l.end.to_rfc3339(), "error": l.error, "error_kind": l.error_kind,
                    "snapshot": l.snapshot, "bytes_sent": details.map(|d| d.bytes_sent),
                })),
                "last_success": c.last_success.map(|t| t.to_rfc3339()),
                "consecutive_failures": c.failures,
                "alert_window_s": c.window.as_secs(),
                "stale": c.stale,
            })
        })
        .collect();
    let hosts: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name,
                "schedule": r.schedule,
                "running": r.state.running(),
                "next_run": r.state.next.map(|t| t.to_rfc3339()),
                "held": r.state.held,
                "consecutive_failures": r.state.failures,
                "last_run": r.last.as_ref().map(|l| serde_json::json!({
                    "id": l.id, "status": l.status, "start": l.start.to_rfc3339(),
                    "end": l.end.to_rfc3339(), "error": l.error, "error_kind": l.error_kind,
                    "snapshot": l.snapshot,
                })),
                "last_success": r.health.last_success.map(|t| t.to_rfc3339()),
                "alert_window_s": r.health.window.as_secs(),
                "stale": r.health.stale,
            })
        })
        .collect();
    serde_json::json!({
        "hosts": hosts,
        "clones": clones,
        "running": rows.iter().filter(|r| r.state.running()).count(),
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
    let counters = |r: &Row| r.last.as_ref().and_then(|l| l.counters.clone());
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
            RunStatus::ALL
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
                r.last.as_ref().map_or(0.0, RunRecord::seconds),
            )]
        },
    );
    family(
        "haul_host_last_run_bytes_new",
        "Bytes of new content the host's last pull stored, as the server counted them.",
        &|r| vec![(String::new(), counters(r).map_or(0, |c| c.bytes_new) as f64)],
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
        "haul_host_held",
        "1 when the host's last failure needs a person and it is not retried.",
        &|r| {
            vec![(
                String::new(),
                if r.state.held.is_some() { 1.0 } else { 0.0 },
            )]
        },
    );
    family(
        "haul_host_running",
        "1 while a pull of the host runs.",
        &|r| vec![(String::new(), if r.state.running() { 1.0 } else { 0.0 })],
    );
    // Each clone's copy of each host.
    let copies = copies(s);
    let mut clone_family =
        |name: &str, help: &str, value: &dyn Fn(&super::schedule::Copy) -> f64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            for c in &copies {
                let _ = writeln!(
                    out,
                    "{name}{{clone=\"{}\",host=\"{}\"}} {}",
                    c.clone,
                    c.host,
                    value(c)
                );
            }
        };
    clone_family(
        "haul_clone_last_success_timestamp_seconds",
        "Unix time of the end of the last successful push of the host to the clone (0: never).",
        &|c| c.last_success.map_or(0.0, |t| t.timestamp() as f64),
    );
    clone_family(
        "haul_clone_consecutive_failures",
        "Failed pushes of the host to the clone since its last successful one.",
        &|c| c.failures as f64,
    );
    clone_family(
        "haul_clone_stale",
        "1 when the clone's copy of the host had no successful push within the clone's alert window.",
        &|c| if c.stale { 1.0 } else { 0.0 },
    );
    clone_family(
        "haul_clone_last_push_bytes_sent",
        "Bytes the last push of the host to the clone sent (trees and chunks, compressed).",
        &|c| {
            c.last_push
                .as_ref()
                .and_then(|l| match &l.details {
                    Some(crate::record::Details::Push(d)) => Some(d.bytes_sent as f64),
                    _ => None,
                })
                .unwrap_or(0.0)
        },
    );
    let _ = writeln!(
        out,
        "# HELP haul_max_concurrent_runs The cap on runs at once ([server].max_concurrent).\n# TYPE haul_max_concurrent_runs gauge\nhaul_max_concurrent_runs {}",
        config.server.max_concurrent
    );
    out
}
