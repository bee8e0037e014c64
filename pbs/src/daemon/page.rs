//! The status pages: server-rendered HTML from askama templates (`pbs/templates/`),
//! readable without JavaScript. `/` lists every host (stale and failing first), every
//! clone's copy and every repository; `/hosts/<name>` a host's runs and snapshots;
//! `/runs/<id>` one run (what the feed items link to). Values are escaped by the
//! templates; times are written in UTC and say so.

use super::overview::{Condition, HostRow, Overview, HOST_RUNS};
use crate::feed;
use crate::output::bytes;
use crate::record::{Details, RunRecord};
use askama::Template;
use chrono::{DateTime, Utc};

/// A time as the pages write it.
pub fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// How long ago `t` was, in words: `3 h 12 min ago`.
fn ago(now: DateTime<Utc>, t: DateTime<Utc>) -> String {
    let s = (now - t).num_seconds();
    if s < 0 {
        return format!("in {}", span(-s));
    }
    format!("{} ago", span(s))
}

fn span(s: i64) -> String {
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

/// The link of a run's page.
pub fn run_href(id: &str) -> String {
    format!("/runs/{id}")
}

fn host_href(name: &str) -> String {
    format!("/hosts/{name}")
}

/// A run as a table cell links it.
pub struct RunLink {
    href: String,
    when: String,
    summary: String,
}

impl RunLink {
    fn of(r: &RunRecord) -> RunLink {
        RunLink {
            href: run_href(&r.id),
            when: when(r.start),
            summary: feed::summary(r),
        }
    }
}

pub struct HostLine {
    name: String,
    href: String,
    word: &'static str,
    class: &'static str,
    last_run: Option<RunLink>,
    last_success: String,
    next: String,
    snapshots: String,
    repository: String,
}

pub struct CopyLine {
    clone: String,
    host: String,
    host_href: String,
    word: &'static str,
    class: &'static str,
    last_push: Option<RunLink>,
    last_success: String,
    sent: String,
}

pub struct RepoLine {
    name: String,
    error: Option<String>,
    stored: String,
    snapshots: String,
    free: String,
    last_check: String,
    last_prune: String,
}

#[derive(Template)]
#[template(path = "index.html")]
pub struct IndexPage {
    site_title: String,
    now: String,
    hosts: Vec<HostLine>,
    copies: Vec<CopyLine>,
    repos: Vec<RepoLine>,
    bad: usize,
    running: usize,
    max_concurrent: usize,
}

fn last_success(o: &Overview, t: Option<DateTime<Utc>>) -> String {
    t.map_or("never".into(), |t| {
        format!("{} ({})", ago(o.now, t), when(t))
    })
}

/// `/`.
pub fn index(o: &Overview) -> String {
    let hosts: Vec<HostLine> = o
        .hosts
        .iter()
        .map(|h| {
            let c = h.condition();
            HostLine {
                name: h.name.clone(),
                href: host_href(&h.name),
                word: c.word(),
                class: c.class(),
                last_run: h.last.as_ref().map(RunLink::of),
                last_success: last_success(o, h.health.last_success),
                next: next_run(o, h),
                snapshots: h.snapshots.map_or("?".into(), |n| n.to_string()),
                repository: match o.repository_of(h) {
                    Some(r) if r.facts.error.is_none() => {
                        format!("{} ({})", r.name, bytes(r.facts.stored_bytes))
                    }
                    _ => h.repository.clone(),
                },
            }
        })
        .collect();
    let copies = o
        .copies
        .iter()
        .map(|c| {
            let cond = Condition::of_copy(c);
            CopyLine {
                clone: c.clone.clone(),
                host: c.host.clone(),
                host_href: host_href(&c.host),
                word: cond.word(),
                class: cond.class(),
                last_push: c.last_push.as_ref().map(RunLink::of),
                last_success: last_success(o, c.last_success),
                sent: c
                    .last_push
                    .as_ref()
                    .and_then(|l| match &l.details {
                        Some(Details::Push(d)) => Some(bytes(d.bytes_sent)),
                        _ => None,
                    })
                    .unwrap_or_default(),
            }
        })
        .collect();
    let repos = o
        .repositories
        .iter()
        .map(|r| {
            let f = &r.facts;
            let readable = f.error.is_none();
            RepoLine {
                name: r.name.clone(),
                error: f.error.clone(),
                stored: if readable {
                    bytes(f.stored_bytes)
                } else {
                    "?".into()
                },
                snapshots: if readable {
                    f.snapshots.values().sum::<u64>().to_string()
                } else {
                    "?".into()
                },
                free: if f.fs_size_bytes > 0 {
                    format!(
                        "{} of {} ({:.0}%)",
                        bytes(f.fs_avail_bytes),
                        bytes(f.fs_size_bytes),
                        f.fs_avail_bytes as f64 * 100.0 / f.fs_size_bytes as f64
                    )
                } else {
                    "?".into()
                },
                last_check: match (r.last_check, r.check_errors) {
                    (None, _) => "never".into(),
                    (Some(t), Some(e)) if e > 0 => format!("{} — {e} errors", when(t)),
                    (Some(t), _) => format!("{} — no damage", when(t)),
                },
                last_prune: r.last_prune.map_or("never".into(), when),
            }
        })
        .collect();
    IndexPage {
        site_title: o.title.clone(),
        now: when(o.now),
        bad: o
            .hosts
            .iter()
            .filter(|h| matches!(h.condition(), Condition::Stale | Condition::Failed))
            .count()
            + o.copies
                .iter()
                .filter(|c| matches!(Condition::of_copy(c), Condition::Stale | Condition::Failed))
                .count(),
        running: o.hosts.iter().filter(|h| h.state.running()).count(),
        max_concurrent: o.max_concurrent,
        hosts,
        copies,
        repos,
    }
    .render()
    .expect("the index template renders")
}

fn next_run(o: &Overview, h: &HostRow) -> String {
    if h.state.running() {
        return "running now".into();
    }
    match (&h.state.held, h.state.next) {
        (Some(why), _) => format!("held until a reload: {why}"),
        (None, Some(t)) if t <= o.now => format!("due now ({})", when(t)),
        (None, Some(t)) => format!("{} ({})", ago(o.now, t), when(t)),
        (None, None) => "not scheduled".into(),
    }
}

pub struct RunLine {
    href: String,
    when: String,
    kind: String,
    word: &'static str,
    class: &'static str,
    took: String,
    summary: String,
}

pub struct SnapLine {
    id: String,
    short: String,
    when: String,
    files: String,
    size: String,
}

#[derive(Template)]
#[template(path = "host.html")]
pub struct HostPage {
    site_title: String,
    now: String,
    name: String,
    word: &'static str,
    class: &'static str,
    facts: Vec<(&'static str, String)>,
    feed_href: String,
    runs: Vec<RunLine>,
    snapshots: Vec<SnapLine>,
    no_snapshots: String,
}

/// `/hosts/<name>`: none for a host that is not configured.
pub fn host(o: &Overview, name: &str, records: &[RunRecord]) -> Option<String> {
    let h = o.hosts.iter().find(|h| h.name == name)?;
    let c = h.condition();
    let repo = o.repository_of(h);
    let mut facts = vec![
        ("Schedule", h.schedule.clone()),
        ("Next run", next_run(o, h)),
        ("Last success", last_success(o, h.health.last_success)),
        (
            "Alert window",
            humantime::format_duration(h.health.window).to_string(),
        ),
        ("Failures since", h.state.failures.to_string()),
        ("Repository", h.repository.clone()),
        (
            "Snapshots",
            h.snapshots.map_or("?".into(), |n| n.to_string()),
        ),
    ];
    if let Some(why) = &h.state.held {
        facts.push(("Held", why.clone()));
    }
    let runs = records
        .iter()
        .rev()
        .filter(|r| r.host == name)
        .take(HOST_RUNS)
        .map(|r| {
            let c = Condition::from(r.status);
            RunLine {
                href: run_href(&r.id),
                when: when(r.start),
                kind: match &r.details {
                    Some(Details::Push(d)) => format!("push to {}", d.clone),
                    _ => r.kind.to_string(),
                },
                word: c.word(),
                class: c.class(),
                took: format!("{:.1} s", r.seconds()),
                summary: feed::summary(r),
            }
        })
        .collect();
    let snapshots = repo
        .map(|r| {
            r.facts
                .list
                .iter()
                .rev()
                .filter(|s| s.host == name)
                .map(|s| SnapLine {
                    id: s.id.clone(),
                    short: s.short().into(),
                    when: when(s.time),
                    files: feed::group_thousands(s.files),
                    size: bytes(s.bytes),
                })
                .collect()
        })
        .unwrap_or_default();
    let no_snapshots = match repo.and_then(|r| r.facts.error.clone()) {
        Some(e) => format!("The repository cannot be read: {e}"),
        None => "No snapshots yet.".into(),
    };
    Some(
        HostPage {
            site_title: o.title.clone(),
            now: when(o.now),
            name: name.into(),
            word: c.word(),
            class: c.class(),
            facts,
            feed_href: format!("/hosts/{name}/feed.xml"),
            runs,
            snapshots,
            no_snapshots,
        }
        .render()
        .expect("the host template renders"),
    )
}

#[derive(Template)]
#[template(path = "run.html")]
pub struct RunPage {
    site_title: String,
    now: String,
    title: String,
    word: &'static str,
    class: &'static str,
    host: String,
    /// None for a run that is not a configured host's (a check, a prune).
    host_href: Option<String>,
    facts: Vec<(&'static str, String)>,
    error: Option<String>,
    output: Vec<String>,
}

/// What a run's page lists about it.
pub fn run_facts(r: &RunRecord) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("Run", r.id.clone()),
        ("Kind", r.kind.to_string()),
        ("Transport", r.transport.word().to_string()),
        ("Started", when(r.start)),
        ("Ended", when(r.end)),
        ("Took", format!("{:.1} s", r.seconds())),
    ];
    if let Some(s) = &r.snapshot {
        f.push(("Snapshot", s.clone()));
    }
    if let Some(c) = &r.counters {
        f.extend([
            (
                "Files",
                format!(
                    "{} new, {} changed, {} unchanged",
                    c.files_new, c.files_changed, c.files_unchanged
                ),
            ),
            ("Read", bytes(c.bytes_read)),
            ("New", bytes(c.bytes_new)),
            ("Received", bytes(c.bytes_received)),
            ("Warnings", c.warnings.to_string()),
        ]);
    }
    match &r.details {
        Some(Details::Push(d)) => {
            f.extend([
                ("Clone", d.clone.clone()),
                ("Standby directory", d.dir.clone()),
                (
                    "Files",
                    format!(
                        "{} changed of {}, {} linked unchanged",
                        d.files_changed(),
                        d.files,
                        d.files_linked
                    ),
                ),
                ("Sent", bytes(d.bytes_sent)),
                ("Written", bytes(d.bytes_written)),
                ("Reused on the clone", bytes(d.bytes_local)),
                ("Chunks sent as deltas", d.chunks_delta.to_string()),
            ]);
            if let Some(i) = &d.import {
                let how = match (i.exit, &i.error) {
                    (_, Some(e)) => format!("could not start: {e}"),
                    (Some(0), None) => "OK".into(),
                    (Some(code), None) => format!("FAILED, exit status {code}"),
                    (None, None) => "FAILED, ended by a signal".into(),
                };
                f.push(("Import command", format!("{} — {how}", i.command.join(" "))));
            }
        }
        Some(Details::Prune(d)) => f.push(("Prune", crate::output::prune_summary(d))),
        Some(Details::Copy(d)) => f.push(("Copy", d.summary())),
        Some(Details::Forget(d)) => {
            f.push((
                "Forget",
                format!("{} snapshots removed, {} kept", d.removed.len(), d.kept),
            ));
            if !d.removed.is_empty() {
                f.push(("Removed", d.removed.join(", ")));
            }
        }
        Some(Details::Check(d)) => f.push((
            "Check",
            format!(
                "{} snapshots, {} packs, {} blobs; {} errors{}",
                d.snapshots,
                d.packs,
                d.blobs,
                d.errors,
                if d.read_data { ", data read" } else { "" }
            ),
        )),
        Some(Details::Import(d)) => f.push((
            "Import",
            format!(
                "{} sessions imported, {} skipped, {} new",
                d.sessions_imported,
                d.sessions_skipped,
                bytes(d.bytes_new)
            ),
        )),
        Some(Details::CloneAlert(d)) => f.push(("Clone", d.clone.clone())),
        None => {}
    }
    if r.agent_peak_rss_kib > 0 {
        f.push(("Agent peak memory", bytes(r.agent_peak_rss_kib * 1024)));
    }
    if r.pbs_peak_rss_kib > 0 {
        f.push(("Server peak memory", bytes(r.pbs_peak_rss_kib * 1024)));
    }
    f
}

/// `/runs/<id>`.
pub fn run(o: &Overview, r: &RunRecord) -> String {
    let c = Condition::from(r.status);
    RunPage {
        site_title: o.title.clone(),
        now: when(o.now),
        title: format!("{} {} {}", r.host, r.kind, when(r.start)),
        word: c.word(),
        class: c.class(),
        host: r.host.clone(),
        host_href: o
            .hosts
            .iter()
            .any(|h| h.name == r.host)
            .then(|| host_href(&r.host)),
        facts: run_facts(r),
        error: r.error.clone(),
        output: r.output_tail.clone(),
    }
    .render()
    .expect("the run template renders")
}
