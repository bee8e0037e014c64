//! `/metrics`: the [`Overview`] in the Prometheus text format, written by the
//! `prometheus-client` crate (a registry built per scrape from the overview: every
//! figure is derived from the run history and the repositories, none is kept twice).
//! Names follow Prometheus' conventions: base units (`_bytes`, `_seconds`), counters
//! ending in `_total`, timestamps as `_timestamp_seconds`. `examples/alerts.yml` holds
//! alert rules written against them.

use super::overview::{Overview, RepoRow};
use super::schedule::Copy;
use crate::record::{Details, RunKind, RunStatus};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::fmt::Write;
use std::sync::atomic::AtomicU64;

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

impl EncodeLabelValue for RunKind {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        e.write_str(self.word())
    }
}

impl EncodeLabelValue for RunStatus {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        e.write_str(self.word())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabel {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostStatusLabels {
    host: String,
    status: RunStatus,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    host: String,
    kind: RunKind,
    status: RunStatus,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RepoLabel {
    repository: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CopyLabels {
    clone: String,
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

type Value = Gauge<f64, AtomicU64>;

/// Registers a gauge family and fills it with one sample per item.
fn gauges<T, L>(
    reg: &mut Registry,
    name: &str,
    help: &str,
    items: &[T],
    sample: impl Fn(&T) -> Vec<(L, f64)>,
) where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<L, Value>::default();
    for item in items {
        for (labels, v) in sample(item) {
            family.get_or_create(&labels).set(v);
        }
    }
    reg.register(name, help, family);
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

fn time(t: Option<chrono::DateTime<chrono::Utc>>) -> f64 {
    t.map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0)
}

/// The overview in the Prometheus text format (version 0.0.4).
pub fn render(o: &Overview) -> String {
    let mut reg = Registry::default();
    reg.register(
        "haul_build",
        "The version of haul-pbs serving these metrics",
        Info::new(BuildLabels {
            version: env!("CARGO_PKG_VERSION").into(),
        }),
    );
    let runs = Family::<RunLabels, Counter>::default();
    for ((host, kind, status), n) in &o.runs {
        runs.get_or_create(&RunLabels {
            host: host.clone(),
            kind: *kind,
            status: *status,
        })
        .inc_by(*n);
    }
    reg.register(
        "haul_runs",
        "Runs in the run history by host, kind and status (the history keeps each host's newest runs: a compaction lowers it, like a restart)",
        runs,
    );
    let host = |name: &str| HostLabel { host: name.into() };
    let hosts = &o.hosts;
    gauges(
        &mut reg,
        "haul_host_last_success_timestamp_seconds",
        "Unix time of the end of the host's last successful pull (0: never)",
        hosts,
        |r| vec![(host(&r.name), time(r.health.last_success))],
    );
    gauges(
        &mut reg,
        "haul_host_last_run_status",
        "The status of the host's last pull: 1 on the label of that status",
        hosts,
        |r| {
            RunStatus::ALL
                .iter()
                .map(|st| {
                    let on = r.last.as_ref().is_some_and(|l| l.status == *st);
                    (
                        HostStatusLabels {
                            host: r.name.clone(),
                            status: *st,
                        },
                        flag(on),
                    )
                })
                .collect()
        },
    );
    gauges(
        &mut reg,
        "haul_host_last_run_duration_seconds",
        "How long the host's last pull took",
        hosts,
        |r| vec![(host(&r.name), r.last.as_ref().map_or(0.0, |l| l.seconds()))],
    );
    let counters = |r: &super::overview::HostRow| r.last.as_ref().and_then(|l| l.counters.clone());
    gauges(
        &mut reg,
        "haul_host_last_run_new_bytes",
        "Bytes of new content the host's last pull stored, as the server counted them",
        hosts,
        |r| vec![(host(&r.name), counters(r).map_or(0, |c| c.bytes_new) as f64)],
    );
    gauges(
        &mut reg,
        "haul_host_last_run_received_bytes",
        "Bytes the host's last pull received from its agent",
        hosts,
        |r| {
            vec![(
                host(&r.name),
                counters(r).map_or(0, |c| c.bytes_received) as f64,
            )]
        },
    );
    gauges(
        &mut reg,
        "haul_host_last_run_files",
        "Files in the snapshot of the host's last pull",
        hosts,
        |r| vec![(host(&r.name), counters(r).map_or(0, |c| c.files()) as f64)],
    );
    gauges(
        &mut reg,
        "haul_host_consecutive_failures",
        "Failed pulls of the host since its last successful one",
        hosts,
        |r| vec![(host(&r.name), r.state.failures as f64)],
    );
    gauges(
        &mut reg,
        "haul_host_stale",
        "1 when the host has had no successful pull within its alert window",
        hosts,
        |r| vec![(host(&r.name), flag(r.health.stale))],
    );
    gauges(
        &mut reg,
        "haul_host_alert_window_seconds",
        "The host's alert window: it is stale after this long without a successful pull",
        hosts,
        |r| vec![(host(&r.name), r.health.window.as_secs_f64())],
    );
    gauges(
        &mut reg,
        "haul_host_held",
        "1 when the host's last failure needs a person and it is not retried",
        hosts,
        |r| vec![(host(&r.name), flag(r.state.held.is_some()))],
    );
    gauges(
        &mut reg,
        "haul_host_running",
        "1 while a pull of the host runs",
        hosts,
        |r| vec![(host(&r.name), flag(r.state.running()))],
    );
    gauges(
        &mut reg,
        "haul_host_next_run_timestamp_seconds",
        "Unix time of the host's next scheduled pull (0: none, while it is held)",
        hosts,
        |r| vec![(host(&r.name), time(r.state.next))],
    );
    gauges(
        &mut reg,
        "haul_host_snapshots",
        "Snapshots of the host in its repository",
        hosts,
        |r| {
            r.snapshots
                .map(|n| (host(&r.name), n as f64))
                .into_iter()
                .collect()
        },
    );
    repository_metrics(&mut reg, &o.repositories);
    copy_metrics(&mut reg, &o.copies);
    gauges(
        &mut reg,
        "haul_max_concurrent_runs",
        "The cap on runs at once ([server].max_concurrent)",
        &[o.max_concurrent],
        |n| vec![(Vec::<(String, String)>::new(), *n as f64)],
    );
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &reg)
        .expect("writing to a String does not fail");
    out
}

fn repository_metrics(reg: &mut Registry, repos: &[RepoRow]) {
    let repo = |r: &RepoRow| RepoLabel {
        repository: r.name.clone(),
    };
    let readable: Vec<&RepoRow> = repos.iter().filter(|r| r.facts.error.is_none()).collect();
    gauges(
        reg,
        "haul_repository_up",
        "1 when the repository's figures could be read (0: not created yet, or it does not open)",
        repos,
        |r| vec![(repo(r), flag(r.facts.error.is_none()))],
    );
    gauges(
        reg,
        "haul_repository_stored_bytes",
        "Bytes of the repository's packs",
        &readable,
        |r| vec![(repo(r), r.facts.stored_bytes as f64)],
    );
    gauges(
        reg,
        "haul_repository_snapshots",
        "Snapshots in the repository",
        &readable,
        |r| vec![(repo(r), r.facts.snapshots.values().sum::<u64>() as f64)],
    );
    gauges(
        reg,
        "haul_repository_filesystem_size_bytes",
        "Size of the file system the repository is on",
        repos,
        |r| vec![(repo(r), r.facts.fs_size_bytes as f64)],
    );
    gauges(
        reg,
        "haul_repository_filesystem_avail_bytes",
        "Bytes still free for the pbs on the file system the repository is on",
        repos,
        |r| vec![(repo(r), r.facts.fs_avail_bytes as f64)],
    );
    gauges(
        reg,
        "haul_repository_last_check_timestamp_seconds",
        "Unix time of the end of the repository's last check (0: never)",
        repos,
        |r| vec![(repo(r), time(r.last_check))],
    );
    gauges(
        reg,
        "haul_repository_check_errors",
        "Damage the repository's last check found (0: none, or never checked)",
        repos,
        |r| vec![(repo(r), r.check_errors.unwrap_or(0) as f64)],
    );
    gauges(
        reg,
        "haul_repository_last_prune_timestamp_seconds",
        "Unix time of the end of the repository's last successful prune (0: never)",
        repos,
        |r| vec![(repo(r), time(r.last_prune))],
    );
}

fn copy_metrics(reg: &mut Registry, copies: &[Copy]) {
    let labels = |c: &Copy| CopyLabels {
        clone: c.clone.clone(),
        host: c.host.clone(),
    };
    gauges(
        reg,
        "haul_clone_last_success_timestamp_seconds",
        "Unix time of the end of the last successful push of the host to the clone (0: never)",
        copies,
        |c| vec![(labels(c), time(c.last_success))],
    );
    gauges(
        reg,
        "haul_clone_consecutive_failures",
        "Failed pushes of the host to the clone since its last successful one",
        copies,
        |c| vec![(labels(c), c.failures as f64)],
    );
    gauges(
        reg,
        "haul_clone_stale",
        "1 when the clone's copy of the host had no successful push within the clone's alert window",
        copies,
        |c| vec![(labels(c), flag(c.stale))],
    );
    gauges(
        reg,
        "haul_clone_last_push_sent_bytes",
        "Bytes the last push of the host to the clone sent (trees and chunks, compressed)",
        copies,
        |c| {
            let sent = c.last_push.as_ref().and_then(|l| match &l.details {
                Some(Details::Push(d)) => Some(d.bytes_sent as f64),
                _ => None,
            });
            vec![(labels(c), sent.unwrap_or(0.0))]
        },
    );
}
