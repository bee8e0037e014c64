//! When the daemon runs each host, as a pure state machine: every method takes the
//! time (`now`) and, where a draw is needed, the source of jitter, so the schedule is
//! tested without sleeping and without a clock.
//!
//! - A host runs on its schedule: an interval after its last start plus jitter, or the
//!   times of its cron expression (`haul_config::Schedule`). At most
//!   `[server].max_concurrent` runs at once, never two of one host; the most overdue
//!   first.
//! - A failed run worth retrying (a timeout, an unreachable host, a cut connection) is
//!   retried after 30 s, doubling per consecutive failure, at most the host's period
//!   and at most an hour.
//! - A failure a person must fix (a changed host key, a refused key or forced command,
//!   a wrong setup: `ErrorKind::retry` is false) is not retried: the host is held, an
//!   alert is raised at once, and it runs again when the configuration is reloaded
//!   (SIGHUP) or the daemon restarts.
//! - After a restart, each host's next run follows from its recorded runs; hosts that
//!   are overdue are started one after another, [`stagger`] apart, most overdue first.
//! - A host without a successful run (a snapshot saved) for its alert window is stale:
//!   one alert per window.

use crate::record::{RunKind, RunRecord};
use chrono::{DateTime, Utc};
use haul_config::{Config, Host};
use std::collections::BTreeMap;
use std::time::Duration;

/// Where one host stands.
#[derive(Debug, Clone, PartialEq)]
pub struct HostState {
    /// Its next run (none while held).
    pub next: Option<DateTime<Utc>>,
    /// Failed runs since its last successful one.
    pub failures: u32,
    /// When its running pull started; none while idle.
    pub running_since: Option<DateTime<Utc>>,
    /// End of its last successful pull.
    pub last_success: Option<DateTime<Utc>>,
    /// Its last stale alert.
    pub last_alert: Option<DateTime<Utc>>,
    /// Why it is not retried (a failure a person must fix).
    pub held: Option<String>,
}

impl HostState {
    pub fn running(&self) -> bool {
        self.running_since.is_some()
    }
}

/// How a run ended, as far as the schedule cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// A snapshot was saved.
    Saved,
    /// No snapshot; `retry` says whether trying again later can help by itself.
    Failed { retry: bool, error: String },
}

/// A warning the daemon records for a host (kind `alert` in the history).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub host: String,
    pub message: String,
    /// The clone whose copy of the host is stale, for an alert about a clone.
    pub clone: Option<String>,
}

/// Per host: when it last succeeded and whether it is stale.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub last_success: Option<DateTime<Utc>>,
    pub stale: bool,
    pub window: Duration,
}

pub struct Schedule {
    hosts: BTreeMap<String, HostState>,
    /// When the daemon started: a host that never succeeded is stale counted from it.
    started: DateTime<Utc>,
}

/// Time between overdue hosts started after a restart.
pub fn stagger(period: Duration) -> Duration {
    (period / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Wait before retry `failures` (1 = the first failure).
pub fn backoff(failures: u32, period: Duration) -> Duration {
    let d = Duration::from_secs(30).saturating_mul(1 << failures.saturating_sub(1).min(16));
    d.min(period).min(Duration::from_secs(3600))
}

fn after(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn pulls_of<'a>(
    records: &'a [RunRecord],
    host: &'a str,
) -> impl DoubleEndedIterator<Item = &'a RunRecord> {
    records
        .iter()
        .filter(move |r| r.host == host && r.kind == RunKind::Pull)
}

impl Schedule {
    /// Where each host's schedule stands, from the recorded runs.
    pub fn new(
        config: &Config,
        records: &[RunRecord],
        now: DateTime<Utc>,
        jitter: &mut dyn FnMut() -> f64,
    ) -> Schedule {
        let mut s = Schedule {
            hosts: BTreeMap::new(),
            started: now,
        };
        let mut overdue = Vec::new();
        for h in &config.hosts {
            let state = from_history(config, h, records, now, jitter);
            if state.next.is_some_and(|n| n <= now) {
                overdue.push((state.next, h.name.clone(), h.schedule(config).period()));
            }
            s.hosts.insert(h.name.clone(), state);
        }
        // Overdue hosts one after another, most overdue first.
        overdue.sort();
        let mut at = now;
        for (_, name, period) in overdue {
            s.hosts.get_mut(&name).expect("just inserted").next = Some(at);
            at = after(at, stagger(period));
        }
        s
    }

    /// A new configuration: running hosts keep their state, idle ones (held ones too)
    /// are scheduled afresh from the history; hosts gone from it are dropped once
    /// their run ends.
    pub fn reload(
        &mut self,
        config: &Config,
        records: &[RunRecord],
        now: DateTime<Utc>,
        jitter: &mut dyn FnMut() -> f64,
    ) {
        let mut hosts = BTreeMap::new();
        for h in &config.hosts {
            let state = match self.hosts.get(&h.name) {
                Some(old) if old.running() => old.clone(),
                _ => from_history(config, h, records, now, jitter),
            };
            hosts.insert(h.name.clone(), state);
        }
        for (name, old) in &self.hosts {
            if old.running() && !hosts.contains_key(name) {
                hosts.insert(name.clone(), old.clone());
            }
        }
        self.hosts = hosts;
    }

    pub fn host(&self, name: &str) -> Option<&HostState> {
        self.hosts.get(name)
    }

    pub fn running(&self) -> usize {
        self.hosts.values().filter(|h| h.running()).count()
    }

    /// The hosts to start now, most overdue first, as far as `max_concurrent` allows;
    /// they are marked running.
    pub fn start_due(&mut self, config: &Config, now: DateTime<Utc>) -> Vec<String> {
        let room = config.server.max_concurrent.saturating_sub(self.running());
        let mut due: Vec<(DateTime<Utc>, String)> = self
            .hosts
            .iter()
            .filter(|(n, h)| !h.running() && config.host(n).is_some())
            .filter_map(|(n, h)| h.next.filter(|t| *t <= now).map(|t| (t, n.clone())))
            .collect();
        due.sort();
        let mut started = Vec::new();
        for (_, name) in due.into_iter().take(room) {
            self.hosts.get_mut(&name).expect("due").running_since = Some(now);
            started.push(name);
        }
        started
    }

    /// How long to sleep before looking again: until the next idle host is due,
    /// between 0.2 s and 60 s.
    pub fn wake_in(&self, now: DateTime<Utc>) -> Duration {
        let next = self
            .hosts
            .values()
            .filter(|h| !h.running())
            .filter_map(|h| h.next)
            .min()
            .unwrap_or(after(now, Duration::from_secs(60)));
        (next - now)
            .to_std()
            .unwrap_or(Duration::ZERO)
            .clamp(Duration::from_millis(200), Duration::from_secs(60))
    }

    /// A run of `host` that started at `started` ended at `now`. Returns the alert to
    /// raise at once, for a failure that is not retried.
    pub fn finished(
        &mut self,
        config: &Config,
        host: &str,
        started: DateTime<Utc>,
        ended: Ended,
        now: DateTime<Utc>,
        jitter: &mut dyn FnMut() -> f64,
    ) -> Option<Alert> {
        let Some(h) = config.host(host) else {
            // Removed from the configuration while it ran.
            self.hosts.remove(host);
            return None;
        };
        let schedule = h.schedule(config);
        let state = self.hosts.get_mut(host)?;
        state.running_since = None;
        match ended {
            Ended::Saved => {
                state.failures = 0;
                state.held = None;
                state.last_success = Some(now);
                state.next = Some(schedule.next_after(Some(started), now, jitter()));
                None
            }
            Ended::Failed { retry: true, .. } => {
                state.failures += 1;
                state.next = Some(after(now, backoff(state.failures, schedule.period())));
                None
            }
            Ended::Failed {
                retry: false,
                error,
            } => {
                state.failures += 1;
                state.next = None;
                state.held = Some(error.clone());
                Some(Alert {
                    host: host.to_string(),
                    message: format!(
                        "not retried until it is fixed: {error}; then reload the daemon (SIGHUP) or restart it"
                    ),
                    clone: None,
                })
            }
        }
    }

    /// Takes in pulls that other processes recorded (`haul-pbs pull H` while the daemon
    /// runs): a newer saved pull of an idle host counts as its success, and releases it
    /// when it was held (a person fixed it and pulled it by hand).
    pub fn observe(
        &mut self,
        config: &Config,
        records: &[RunRecord],
        now: DateTime<Utc>,
        jitter: &mut dyn FnMut() -> f64,
    ) {
        for h in &config.hosts {
            let Some(state) = self.hosts.get_mut(&h.name) else {
                continue;
            };
            let newest = pulls_of(records, &h.name)
                .filter(|r| r.status.saved())
                .max_by_key(|r| r.end);
            let Some(r) = newest else { continue };
            if state.running() || state.last_success.is_some_and(|t| t >= r.end) {
                continue;
            }
            state.last_success = Some(r.end);
            state.failures = 0;
            state.held = None;
            let next = h.schedule(config).next_after(Some(r.start), now, jitter());
            state.next = Some(state.next.map_or(next, |n| n.max(next)));
        }
    }

    pub fn health(&self, config: &Config, h: &Host, now: DateTime<Utc>) -> Option<Health> {
        let state = self.hosts.get(&h.name)?;
        let window = h.alert_window(config);
        // Never succeeded: counted from when this daemon started.
        let since = state.last_success.unwrap_or(self.started);
        Some(Health {
            last_success: state.last_success,
            stale: (now - since).to_std().unwrap_or_default() > window,
            window,
        })
    }

    /// The stale hosts not alerted within their window yet; each is noted as alerted.
    pub fn stale_alerts(&mut self, config: &Config, now: DateTime<Utc>) -> Vec<Alert> {
        let mut alerts = Vec::new();
        for h in &config.hosts {
            let Some(health) = self.health(config, h, now) else {
                continue;
            };
            let started = self.started;
            let state = self.hosts.get_mut(&h.name).expect("health found it");
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
            alerts.push(Alert {
                host: h.name.clone(),
                message: format!(
                    "{what} (alert window {})",
                    humantime::format_duration(health.window)
                ),
                clone: None,
            });
        }
        alerts
    }
}

/// The clone an alert record is about, if it is about one.
fn clone_of(r: &RunRecord) -> Option<&str> {
    match &r.details {
        Some(crate::record::Details::CloneAlert(d)) => Some(&d.clone),
        _ => None,
    }
}

/// A clone's copy of one host, as the run history tells it.
#[derive(Debug, Clone)]
pub struct Copy {
    pub clone: String,
    pub host: String,
    /// The newest push to it.
    pub last_push: Option<RunRecord>,
    /// The end of the newest successful push.
    pub last_success: Option<DateTime<Utc>>,
    /// Failed pushes since the last successful one.
    pub failures: u32,
    pub window: Duration,
    /// No successful push within the window (counted from `started` if none ever).
    pub stale: bool,
}

/// Every clone's copy of every host it receives.
pub fn copies(
    config: &Config,
    records: &[RunRecord],
    now: DateTime<Utc>,
    started: DateTime<Utc>,
) -> Vec<Copy> {
    let mut out = Vec::new();
    for c in &config.clones {
        let window = c.alert_window(config);
        for h in config.hosts.iter().filter(|h| c.receives(&h.name)) {
            let pushes: Vec<&RunRecord> =
                crate::record::pushes_of(records, &h.name, &c.name).collect();
            let last_success = pushes
                .iter()
                .filter(|r| r.status.saved())
                .map(|r| r.end)
                .max();
            let since = last_success.unwrap_or(started);
            out.push(Copy {
                clone: c.name.clone(),
                host: h.name.clone(),
                last_push: pushes.last().map(|r| (*r).clone()),
                last_success,
                failures: pushes
                    .iter()
                    .rev()
                    .take_while(|r| !r.status.saved())
                    .count() as u32,
                window,
                stale: (now - since).to_std().unwrap_or_default() > window,
            });
        }
    }
    out
}

impl Schedule {
    /// Each clone's copy of each host it receives with no successful push for longer
    /// than the clone's alert window (counted from when this daemon started if there
    /// was none) and not alerted within that window yet.
    pub fn stale_clones(
        &self,
        config: &Config,
        records: &[RunRecord],
        now: DateTime<Utc>,
    ) -> Vec<Alert> {
        let mut alerts = Vec::new();
        for copy in copies(config, records, now, self.started) {
            if !copy.stale {
                continue;
            }
            let since = copy.last_success.unwrap_or(self.started);
            let alerted = records
                .iter()
                .filter(|r| r.host == copy.host && r.kind == RunKind::Alert)
                .filter(|r| clone_of(r) == Some(copy.clone.as_str()))
                .map(|r| r.end)
                .max()
                .is_some_and(|a| a > since && (now - a).to_std().unwrap_or_default() < copy.window);
            if alerted {
                continue;
            }
            let gap = human_gap(now - since);
            let what = match copy.last_success {
                Some(_) => format!("no successful push of {} for {gap}", copy.host),
                None => format!(
                    "no successful push of {} since the daemon started {gap} ago",
                    copy.host
                ),
            };
            alerts.push(Alert {
                message: format!(
                    "clone {}: {what} (alert window {})",
                    copy.clone,
                    humantime::format_duration(copy.window)
                ),
                host: copy.host,
                clone: Some(copy.clone),
            });
        }
        alerts
    }

    /// When this daemon started.
    pub fn started(&self) -> DateTime<Utc> {
        self.started
    }
}

/// The pushes to try again at `now`, as (host, clone): each clone's copy of a host
/// whose newest push failed in a way that trying again may help by itself, once the
/// backoff after its consecutive failed pushes has passed (as for pulls, with the
/// host's schedule). A push that needs a person (refused, set up wrong) waits for the
/// next pull.
pub fn push_retries(
    config: &Config,
    records: &[RunRecord],
    now: DateTime<Utc>,
) -> Vec<(String, String)> {
    copies(config, records, now, now)
        .into_iter()
        .filter(|copy| {
            let Some(newest) = &copy.last_push else {
                return false;
            };
            let period = config
                .host(&copy.host)
                .map_or(copy.window, |h| h.schedule(config).period());
            !newest.status.saved()
                && newest.error_kind.is_some_and(|k| k.retry())
                && now >= after(newest.end, backoff(copy.failures, period))
        })
        .map(|copy| (copy.host, copy.clone))
        .collect()
}

/// Where `h`'s schedule stands, from its recorded runs.
fn from_history(
    config: &Config,
    h: &Host,
    records: &[RunRecord],
    now: DateTime<Utc>,
    jitter: &mut dyn FnMut() -> f64,
) -> HostState {
    let schedule = h.schedule(config);
    let last = pulls_of(records, &h.name).max_by_key(|r| r.start);
    let failures = pulls_of(records, &h.name)
        .rev()
        .take_while(|r| !r.status.saved())
        .count() as u32;
    let next = match last {
        Some(r) if failures > 0 => after(r.end, backoff(failures, schedule.period())),
        Some(r) => schedule.next_after(Some(r.start), now, jitter()),
        None => schedule.next_after(None, now, jitter()),
    };
    HostState {
        next: Some(next),
        failures,
        running_since: None,
        last_success: pulls_of(records, &h.name)
            .filter(|r| r.status.saved())
            .map(|r| r.end)
            .max(),
        last_alert: records
            .iter()
            .filter(|r| r.host == h.name && r.kind == RunKind::Alert && clone_of(r).is_none())
            .map(|r| r.end)
            .max(),
        held: None,
    }
}

/// `27 h` for long gaps, `3m 20s` for short ones.
/// How soon a prune runs again when the last one left packs to sweep.
pub const PENDING_SWEEP_RETRY: Duration = Duration::from_secs(3600);

/// Whether a repository's prune is due at `now`: a snapshot was forgotten (at
/// `forgotten`, the newest such run) since its last prune started (`pruned`), and the
/// prune schedule's time after that prune has come (never pruned: due at once); or the
/// last prune left condemned packs to sweep (`pending`: pulls older than it still ran)
/// and an hour has passed.
pub fn prune_due(
    schedule: &haul_config::Schedule,
    pruned: Option<DateTime<Utc>>,
    forgotten: Option<DateTime<Utc>>,
    pending: bool,
    now: DateTime<Utc>,
) -> bool {
    if pending {
        return pruned.is_none_or(|p| after(p, PENDING_SWEEP_RETRY) <= now);
    }
    let Some(forgotten) = forgotten else {
        return false;
    };
    if pruned.is_some_and(|p| forgotten < p) {
        return false;
    }
    schedule.next_after(pruned, now, 0.0) <= now
}

fn human_gap(gap: chrono::Duration) -> String {
    let secs = gap.num_seconds().max(0) as u64;
    if secs >= 3600 {
        format!("{:.0} h", secs as f64 / 3600.0)
    } else {
        humantime::format_duration(Duration::from_secs(secs)).to_string()
    }
}

#[cfg(test)]
mod prune_tests {
    use super::prune_due;
    use chrono::{Duration, TimeZone, Utc};

    #[test]
    fn a_prune_is_due_on_schedule_and_only_after_a_forget() {
        let weekly = haul_config::Schedule::parse("7d").unwrap();
        let now = Utc.with_ymd_and_hms(2026, 12, 6, 12, 0, 0).unwrap();
        let (day, hour) = (Duration::days(1), Duration::hours(1));
        let due =
            |pruned, forgotten, pending, at| prune_due(&weekly, pruned, forgotten, pending, at);
        // Nothing forgotten: never.
        assert!(!due(None, None, false, now));
        assert!(!due(Some(now - day * 30), None, false, now));
        // Forgotten, never pruned: now.
        assert!(due(None, Some(now - day), false, now));
        // Pruned three days ago, forgotten since: in four days, not now.
        assert!(!due(Some(now - day * 3), Some(now - day), false, now));
        assert!(due(
            Some(now - day * 3),
            Some(now - day),
            false,
            now + day * 4
        ));
        // Pruned after the last forget: not even a week later.
        assert!(!due(Some(now - day * 8), Some(now - day * 9), false, now));
        // Packs left to sweep: an hour after the prune that left them.
        assert!(!due(Some(now - hour / 2), None, true, now));
        assert!(due(Some(now - hour), None, true, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RunStatus;
    use chrono::TimeZone;

    #[test]
    fn a_failed_push_is_tried_again_after_its_backoff_unless_a_person_must_act() {
        let c = config(
            "[[host]]\nname = \"a\"\naddress = \"x\"\npaths = [\"/a\"]\nschedule = \"1h\"\n\
             [[clone]]\nname = \"off\"\naddress = \"y\"\nstandby_dir = \"/s\"\n",
        );
        let push =
            |end: DateTime<Utc>, status: RunStatus, kind: Option<crate::record::ErrorKind>| {
                let mut r = crate::history::tests::record("p", "a", status);
                r.kind = RunKind::Push;
                r.end = end;
                r.error_kind = kind;
                r.details = Some(crate::record::Details::Push(crate::record::PushDetails {
                    clone: "off".into(),
                    ..Default::default()
                }));
                r
            };
        use crate::record::ErrorKind::{Refused, Unreachable};
        let t = at(10, 0, 0);
        let due = |records: &[RunRecord], now| push_retries(&c, records, now);
        // None yet, or the newest succeeded: nothing to retry.
        assert!(due(&[], t).is_empty());
        assert!(due(&[push(t, RunStatus::Ok, None)], t).is_empty());
        // One failure: 30 s later; two in a row: a minute later.
        let one = [push(t, RunStatus::Failed, Some(Unreachable))];
        assert!(due(&one, t + chrono::Duration::seconds(29)).is_empty());
        assert_eq!(
            due(&one, t + chrono::Duration::seconds(30)),
            [("a".to_string(), "off".to_string())]
        );
        let two = [
            push(t, RunStatus::Failed, Some(Unreachable)),
            push(t, RunStatus::Failed, Some(Unreachable)),
        ];
        assert!(due(&two, t + chrono::Duration::seconds(59)).is_empty());
        assert_eq!(due(&two, t + chrono::Duration::seconds(60)).len(), 1);
        // Refused by the clone's wrapper: a person must act; the next pull pushes again.
        let refused = [push(t, RunStatus::Failed, Some(Refused))];
        assert!(due(&refused, t + chrono::Duration::hours(2)).is_empty());
    }

    fn config(text: &str) -> Config {
        Config::parse(text, "pbs.toml").unwrap()
    }

    fn hosts(names: &[&str], extra: &str) -> Config {
        let mut text = String::new();
        for n in names {
            text.push_str(&format!(
                "[[host]]\nname = \"{n}\"\naddress = \"x\"\npaths = [\"/{n}\"]\n{extra}\n"
            ));
        }
        config(&text)
    }

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, h, m, s).unwrap()
    }

    fn rec(host: &str, start: DateTime<Utc>, status: RunStatus) -> RunRecord {
        let mut r = crate::history::tests::record(&format!("r-{host}"), host, status);
        r.start = start;
        r.end = start + chrono::Duration::seconds(5);
        r
    }

    fn no_jitter() -> impl FnMut() -> f64 {
        || 0.0
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
        let c = hosts(&["a", "b", "c", "d"], "schedule = \"1h\"");
        let now = at(12, 0, 0);
        let ago = |m| now - chrono::Duration::minutes(m);
        // a ran 10 min ago; b 2 h and c 5 h ago (both overdue); d failed 1 min ago (its
        // retry is due 30 s after that: overdue too).
        let records = vec![
            rec("a", ago(10), RunStatus::Ok),
            rec("b", ago(120), RunStatus::Ok),
            rec("c", ago(300), RunStatus::Ok),
            rec("d", ago(1), RunStatus::Failed),
        ];
        let mut s = Schedule::new(&c, &records, now, &mut no_jitter());
        assert_eq!(
            s.host("a").unwrap().next,
            Some(ago(10) + chrono::Duration::hours(1))
        );
        // The most overdue first, then the next one a stagger later.
        assert_eq!(s.host("c").unwrap().next, Some(now));
        assert_eq!(
            s.host("b").unwrap().next,
            Some(now + chrono::Duration::seconds(30))
        );
        assert_eq!(s.host("d").unwrap().failures, 1);
        assert_eq!(
            s.host("d").unwrap().next,
            Some(now + chrono::Duration::seconds(60))
        );
        // max_concurrent (2 by default): c now; b and d when their time comes.
        assert_eq!(s.start_due(&c, now), ["c"]);
        assert_eq!(s.start_due(&c, now + chrono::Duration::seconds(60)), ["b"]);
        assert!(s
            .start_due(&c, now + chrono::Duration::seconds(60))
            .is_empty());
        assert_eq!(s.running(), 2);
    }

    #[test]
    fn an_interval_follows_the_last_start_plus_a_bounded_jitter() {
        let c = hosts(&["a"], "schedule = \"6h\"");
        let start = at(0, 0, 0);
        let mut s = Schedule::new(&c, &[], start, &mut || 1.0);
        // Never run: soon, within the jitter (a tenth of 6 h, at most 15 min).
        assert_eq!(
            s.host("a").unwrap().next,
            Some(start + chrono::Duration::minutes(15))
        );
        let t = start + chrono::Duration::minutes(15);
        assert_eq!(s.start_due(&c, t), ["a"]);
        let end = t + chrono::Duration::minutes(3);
        assert_eq!(s.finished(&c, "a", t, Ended::Saved, end, &mut || 0.5), None);
        let next = s.host("a").unwrap().next.unwrap();
        assert_eq!(
            next,
            t + chrono::Duration::hours(6) + chrono::Duration::seconds(450)
        );
        assert_eq!(s.wake_in(end), Duration::from_secs(60));
        assert_eq!(
            s.wake_in(next - chrono::Duration::seconds(5)),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn a_cron_schedule_runs_at_its_times() {
        let c = hosts(&["a"], "schedule = \"30 2 * * *\"");
        let now = chrono::Local
            .with_ymd_and_hms(2026, 3, 2, 1, 0, 0)
            .unwrap()
            .with_timezone(&Utc);
        let s = Schedule::new(&c, &[], now, &mut no_jitter());
        let next = s.host("a").unwrap().next.unwrap();
        assert_eq!(
            next.with_timezone(&chrono::Local)
                .format("%H:%M")
                .to_string(),
            "02:30"
        );
        assert!(next > now && next - now <= chrono::Duration::hours(2));
    }

    #[test]
    fn failures_back_off_and_a_success_resets_them() {
        let c = hosts(&["a"], "schedule = \"1d\"");
        let t0 = at(0, 0, 0);
        let mut s = Schedule::new(&c, &[], t0, &mut no_jitter());
        let fail = || Ended::Failed {
            retry: true,
            error: "no SSH connection".into(),
        };
        let mut now = t0;
        for (n, wait) in [(1, 30), (2, 60), (3, 120), (4, 240)] {
            assert_eq!(s.start_due(&c, now), ["a"], "attempt {n}");
            assert_eq!(
                s.finished(&c, "a", now, fail(), now, &mut no_jitter()),
                None
            );
            let st = s.host("a").unwrap();
            assert_eq!(st.failures, n);
            assert_eq!(st.next, Some(now + chrono::Duration::seconds(wait)));
            now = st.next.unwrap();
        }
        s.start_due(&c, now);
        s.finished(&c, "a", now, Ended::Saved, now, &mut no_jitter());
        assert_eq!(s.host("a").unwrap().failures, 0);
        assert_eq!(
            s.host("a").unwrap().next,
            Some(now + chrono::Duration::days(1))
        );
    }

    #[test]
    fn a_failure_a_person_must_fix_is_held_and_alerts_at_once_until_a_reload() {
        let c = hosts(&["a", "b"], "schedule = \"1h\"");
        let t0 = at(3, 0, 0);
        let mut s = Schedule::new(&c, &[], t0, &mut no_jitter());
        // Never run: both due at once, started a stagger apart.
        let now = t0 + chrono::Duration::seconds(30);
        assert_eq!(s.start_due(&c, now), ["a", "b"]);
        let alert = s.finished(
            &c,
            "a",
            now,
            Ended::Failed {
                retry: false,
                error: "HOST KEY CHANGED for x:22".into(),
            },
            now,
            &mut no_jitter(),
        );
        let alert = alert.expect("an alert at once");
        assert_eq!(alert.host, "a");
        assert!(alert.message.contains("HOST KEY CHANGED"), "{alert:?}");
        assert_eq!(s.host("a").unwrap().next, None);
        // Not started again, however long the daemon waits...
        let later = now + chrono::Duration::days(3);
        assert!(s.start_due(&c, later).is_empty());
        // ... until the configuration is reloaded.
        let records = vec![rec("a", now, RunStatus::Failed)];
        s.reload(&c, &records, later, &mut no_jitter());
        assert_eq!(s.host("a").unwrap().held, None);
        assert_eq!(s.start_due(&c, later), ["a"]);
    }

    #[test]
    fn a_held_host_pulled_by_hand_is_released() {
        let c = hosts(&["a"], "schedule = \"1h\"");
        let t0 = at(6, 0, 0);
        let mut s = Schedule::new(&c, &[], t0, &mut no_jitter());
        s.start_due(&c, t0);
        let refused = Ended::Failed {
            retry: false,
            error: "refused".into(),
        };
        s.finished(&c, "a", t0, refused, t0, &mut no_jitter());
        assert_eq!(s.host("a").unwrap().next, None);
        // Someone fixed it and ran `haul-pbs pull a`.
        let by_hand = t0 + chrono::Duration::minutes(10);
        let records = vec![rec("a", by_hand, RunStatus::Ok)];
        s.observe(&c, &records, by_hand, &mut no_jitter());
        let st = s.host("a").unwrap();
        assert_eq!(st.held, None);
        assert_eq!(st.failures, 0);
        assert_eq!(st.next, Some(by_hand + chrono::Duration::hours(1)));
        assert!(!s.health(&c, &c.hosts[0], by_hand).unwrap().stale);
        // Seen once: observing again changes nothing.
        let before = s.host("a").cloned();
        s.observe(&c, &records, by_hand, &mut || 1.0);
        assert_eq!(s.host("a").cloned(), before);
    }

    #[test]
    fn a_stale_host_is_alerted_once_per_window() {
        let c = hosts(&["a"], "schedule = \"1h\"\nalert_window = \"2h\"");
        let t0 = at(0, 0, 0);
        let mut s = Schedule::new(&c, &[], t0, &mut no_jitter());
        assert!(s
            .stale_alerts(&c, t0 + chrono::Duration::minutes(119))
            .is_empty());
        let t1 = t0 + chrono::Duration::minutes(121);
        let alerts = s.stale_alerts(&c, t1);
        assert_eq!(alerts.len(), 1);
        assert!(
            alerts[0].message.contains("since the daemon started"),
            "{alerts:?}"
        );
        assert!(s
            .stale_alerts(&c, t1 + chrono::Duration::minutes(60))
            .is_empty());
        assert_eq!(
            s.stale_alerts(&c, t1 + chrono::Duration::minutes(121))
                .len(),
            1
        );
        // A success makes it fresh again.
        s.start_due(&c, t1);
        s.finished(&c, "a", t1, Ended::Saved, t1, &mut no_jitter());
        assert!(!s.health(&c, &c.hosts[0], t1).unwrap().stale);
    }

    #[test]
    fn a_host_removed_while_it_runs_is_dropped_when_it_ends() {
        let c = hosts(&["a", "b"], "");
        let t0 = at(5, 0, 0);
        let mut s = Schedule::new(&c, &[], t0, &mut no_jitter());
        let now = t0 + chrono::Duration::seconds(30);
        assert_eq!(s.start_due(&c, now), ["a", "b"]);
        let only_b = hosts(&["b"], "");
        s.reload(&only_b, &[], now, &mut no_jitter());
        assert!(s.host("a").is_some_and(HostState::running));
        s.finished(&only_b, "a", now, Ended::Saved, now, &mut no_jitter());
        assert!(s.host("a").is_none());
    }
}
