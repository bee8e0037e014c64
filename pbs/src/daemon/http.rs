//! The daemon's status server (`[server].status_listen`, loopback by default):
//! `/feed.xml`, `/hosts/<name>/feed.xml`, `/status.json`, `/metrics` (Prometheus text
//! format). Handlers read the history the daemon keeps in memory (`History`, read once)
//! and the schedule's state; none reads the history file whole.

use super::overview::Overview;
use super::SharedRef;
use crate::feed::{self, FeedOptions};
use haul_config::Config;

/// The overview, gathered on a blocking thread (it may read the repositories).
async fn overview(s: &SharedRef) -> Overview {
    let s = s.clone();
    tokio::task::spawn_blocking(move || Overview::gather(&s))
        .await
        .expect("gathering the overview does not panic")
}

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
                    answer(body.map(|b| b.map(xml)), || format!("no host {name:?}"))
                },
            ),
        )
        .route(
            "/",
            get(|State(s): State<SharedRef>| async move {
                axum::response::Html(super::page::index(&overview(&s).await)).into_response()
            }),
        )
        .route(
            "/hosts/{name}",
            get(
                |State(s): State<SharedRef>, Path(name): Path<String>| async move {
                    let o = overview(&s).await;
                    let (_, history) = parts(&s);
                    let page = history.with_records(|r| super::page::host(&o, &name, r));
                    answer(page.map(|p| p.map(axum::response::Html)), || {
                        format!("no host {name:?}")
                    })
                },
            ),
        )
        .route(
            "/runs/{id}",
            get(
                |State(s): State<SharedRef>, Path(id): Path<String>| async move {
                    let o = overview(&s).await;
                    let (_, history) = parts(&s);
                    let page = history.with_records(|r| {
                        r.iter()
                            .rev()
                            .find(|r| r.id == id)
                            .map(|r| super::page::run(&o, r))
                    });
                    answer(page.map(|p| p.map(axum::response::Html)), || {
                        format!("no run {id:?} in the history (it keeps each host's newest runs)")
                    })
                },
            ),
        )
        .route(
            "/status.json",
            get(
                |State(s): State<SharedRef>| async move { axum::Json(status(&overview(&s).await)) },
            ),
        )
        .route(
            "/metrics",
            get(|State(s): State<SharedRef>| async move {
                (
                    [(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)],
                    super::metrics::render(&overview(&s).await),
                )
            }),
        )
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            authenticate,
        ))
        .with_state(shared)
}

/// A page, `404` with `missing` when there is none, or `500` when the history could
/// not be read.
fn answer<T: axum::response::IntoResponse>(
    body: Result<Option<T>, crate::error::CliError>,
    missing: impl FnOnce() -> String,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    match body {
        Ok(Some(b)) => b.into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, format!("{}\n", missing())).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// Lets a request through when no credentials are configured or it carries valid
/// ones; otherwise `401` with a Basic challenge.
async fn authenticate(
    axum::extract::State(s): axum::extract::State<SharedRef>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let credentials = s.lock().expect("daemon state").credentials.clone();
    let Some(credentials) = credentials else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // Argon2 takes its time and memory: off the async threads, a few at once.
    static VERIFYING: tokio::sync::Semaphore =
        tokio::sync::Semaphore::const_new(super::auth::VERIFYING);
    let admitted = if credentials.remembered(given.as_deref()) {
        true
    } else {
        let _turn = VERIFYING.acquire().await;
        tokio::task::spawn_blocking(move || credentials.admits(given.as_deref()))
            .await
            .unwrap_or(false)
    };
    if admitted {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"haul\", charset=\"UTF-8\"",
        )],
        "credentials required: see [server].status_credentials\n",
    )
        .into_response()
}

fn parts(s: &SharedRef) -> (Config, crate::history::History) {
    let g = s.lock().expect("daemon state");
    (g.site.config.clone(), g.history.clone())
}

fn status(o: &Overview) -> serde_json::Value {
    let clones: Vec<serde_json::Value> = o
        .copies
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
    let hosts: Vec<serde_json::Value> = o
        .hosts
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
                "repository": r.repository,
                "snapshots": r.snapshots,
            })
        })
        .collect();
    let repositories: Vec<serde_json::Value> = o
        .repositories
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name,
                "stored_bytes": r.facts.error.is_none().then_some(r.facts.stored_bytes),
                "snapshots": r.facts.error.is_none().then(|| r.facts.snapshots.values().sum::<u64>()),
                "filesystem_size_bytes": r.facts.fs_size_bytes,
                "filesystem_avail_bytes": r.facts.fs_avail_bytes,
                "last_check": r.last_check.map(|t| t.to_rfc3339()),
                "check_errors": r.check_errors,
                "last_prune": r.last_prune.map(|t| t.to_rfc3339()),
                "error": r.facts.error,
            })
        })
        .collect();
    serde_json::json!({
        "hosts": hosts,
        "clones": clones,
        "repositories": repositories,
        "running": o.hosts.iter().filter(|r| r.state.running()).count(),
        "max_concurrent": o.max_concurrent,
    })
}
