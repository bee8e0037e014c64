//! What the status server shows, gathered once per request: the status page,
//! `/status.json` and `/metrics` all read one [`Overview`], taken under one look at the
//! daemon's state (so a reload cannot come between its parts) plus the repositories'
//! own figures ([`RepoFacts`], read at most once a minute).

use super::schedule::{Copy, Health, HostState};
use super::SharedRef;
use crate::record::{Details, RunKind, RunRecord, RunStatus};
use crate::site::RepoLocation;
use chrono::{DateTime, Utc};
use haul_repo::backend::FileType;
use std::collections::{BTreeMap, HashMap};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the repositories' figures are kept before they are read again.
pub const FACTS_TTL: Duration = Duration::from_secs(60);

/// Runs a host page lists.
pub const HOST_RUNS: usize = 50;

/// Everything the status server shows, at one moment.
pub struct Overview {
    pub now: DateTime<Utc>,
    /// When the daemon started.
    pub started: DateTime<Utc>,
    /// Stale hosts first, then failing ones, then by name.
    pub hosts: Vec<HostRow>,
    /// Each clone's copy of each host, in the same order.
    pub copies: Vec<Copy>,
    pub repositories: Vec<RepoRow>,
    /// Runs in the history, by host, kind and status.
    pub runs: BTreeMap<(String, RunKind, RunStatus), u64>,
    pub max_concurrent: usize,
    pub title: String,
}

/// One configured host.
pub struct HostRow {
    pub name: String,
    pub schedule: String,
    pub state: HostState,
    pub health: Health,
    /// Its last pull.
    pub last: Option<RunRecord>,
    /// The name of its repository.
    pub repository: String,
    /// Its snapshots, as its repository lists them (none when unknown).
    pub snapshots: Option<u64>,
}

impl HostRow {
    /// The status word and colour of its row: stale beats the last run's status.
    pub fn condition(&self) -> Condition {
        if self.health.stale {
            Condition::Stale
        } else if self.state.running() {
            Condition::Running
        } else {
            self.last
                .as_ref()
                .map_or(Condition::Never, |l| l.status.into())
        }
    }
}

/// A row's word and colour on the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Condition {
    Stale,
    Failed,
    Warning,
    Running,
    Never,
    Ok,
}

impl From<RunStatus> for Condition {
    fn from(s: RunStatus) -> Condition {
        match s {
            RunStatus::Ok => Condition::Ok,
            RunStatus::Warning => Condition::Warning,
            RunStatus::Failed => Condition::Failed,
        }
    }
}

impl Condition {
    pub fn word(self) -> &'static str {
        match self {
            Condition::Stale => "STALE",
            Condition::Failed => "FAILED",
            Condition::Warning => "WARNING",
            Condition::Running => "RUNNING",
            Condition::Never => "NO RUN YET",
            Condition::Ok => "OK",
        }
    }

    /// The CSS class of the colour.
    pub fn class(self) -> &'static str {
        match self {
            Condition::Stale | Condition::Failed => "bad",
            Condition::Warning => "warn",
            Condition::Running | Condition::Never => "idle",
            Condition::Ok => "good",
        }
    }

    pub fn of_copy(c: &Copy) -> Condition {
        if c.stale {
            return Condition::Stale;
        }
        c.last_push
            .as_ref()
            .map_or(Condition::Never, |l| l.status.into())
    }
}

/// One repository the configured hosts use.
pub struct RepoRow {
    /// Its name in the configuration (`repository = "..."`).
    pub name: String,
    pub facts: RepoFacts,
    /// The end of its last check and prune, and the errors the last check found.
    pub last_check: Option<DateTime<Utc>>,
    pub check_errors: Option<u64>,
    pub last_prune: Option<DateTime<Utc>>,
}

/// One snapshot, as the status pages list it.
#[derive(Debug, Clone)]
pub struct SnapInfo {
    pub id: String,
    pub host: String,
    pub time: DateTime<Utc>,
    pub files: u64,
    pub bytes: u64,
}

impl SnapInfo {
    pub fn short(&self) -> &str {
        &self.id[..8.min(self.id.len())]
    }
}

/// A repository's figures, as read from its storage.
#[derive(Debug, Clone, Default)]
pub struct RepoFacts {
    /// Bytes of its packs.
    pub stored_bytes: u64,
    /// Snapshots per host.
    pub snapshots: BTreeMap<String, u64>,
    /// Every snapshot, oldest first.
    pub list: Arc<Vec<SnapInfo>>,
    /// The file system it is on: its size and the bytes an unprivileged writer can
    /// still use.
    pub fs_size_bytes: u64,
    pub fs_avail_bytes: u64,
    /// Why the figures could not be read (a repository not created yet, a key that
    /// does not open it).
    pub error: Option<String>,
}

/// The repositories' figures, read at most once per [`FACTS_TTL`], from the repository
/// the daemon's pulls have open (opened here if no pull has yet), each snapshot file
/// read once: a later look reads only the snapshot files that are new.
pub struct Facts {
    /// The daemon's open repositories: a repository its pulls use is not opened (its
    /// key derived) a second time for the status.
    open: Arc<crate::repos::Repositories>,
    repos: Mutex<HashMap<haul_repo::backend::Location, Cached>>,
    /// Raised by [`Facts::expire`]: figures read before are read again.
    generation: std::sync::atomic::AtomicU64,
}

struct Cached {
    /// Each snapshot file, read once.
    hosts: HashMap<String, SnapInfo>,
    facts: RepoFacts,
    at: Instant,
    generation: u64,
}

impl Facts {
    pub fn new(open: Arc<crate::repos::Repositories>) -> Facts {
        Facts {
            open,
            repos: Mutex::default(),
            generation: Default::default(),
        }
    }

    /// The figures of the repository at `loc`, read again when older than the TTL.
    pub fn of(&self, loc: &RepoLocation) -> RepoFacts {
        use std::sync::atomic::Ordering::Relaxed;
        let generation = self.generation.load(Relaxed);
        let mut repos = self.repos.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = repos.get(&loc.location) {
            if c.at.elapsed() < FACTS_TTL && c.generation == generation {
                return c.facts.clone();
            }
        }
        let c = repos.entry(loc.location.clone()).or_insert_with(|| Cached {
            hosts: HashMap::new(),
            facts: RepoFacts::default(),
            at: Instant::now(),
            generation,
        });
        c.generation = generation;
        c.facts = read_facts(&self.open, loc, c).unwrap_or_else(|e| RepoFacts {
            error: Some(e),
            ..RepoFacts::default()
        });
        c.at = Instant::now();
        // Object storage has no file system to measure.
        let (size, avail) = loc.location.as_local().map_or((0, 0), fs_space);
        c.facts.fs_size_bytes = size;
        c.facts.fs_avail_bytes = avail;
        c.facts.clone()
    }

    /// Forgets the figures, so the next look reads them (after a run changed them).
    /// Takes no lock: a look that is reading them meanwhile is not waited for.
    pub fn expire(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn read_facts(
    open: &crate::repos::Repositories,
    loc: &RepoLocation,
    c: &mut Cached,
) -> Result<RepoFacts, String> {
    if !loc.is_there() {
        return Err(format!(
            "no repository at {} yet (the first pull creates it)",
            loc.location
        ));
    }
    // As the pulls have it: no view is loaded again for the status.
    let repo = open.open_as_is(loc).map_err(|e| e.to_string())?;
    let listed = |t| repo.backend().list(t).map_err(|e| e.to_string());
    let stored_bytes = listed(FileType::Data)?.iter().map(|(_, n)| n).sum();
    let names = listed(FileType::Snapshot)?;
    let present: std::collections::HashSet<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
    c.hosts.retain(|name, _| present.contains(name.as_str()));
    let mut snapshots = BTreeMap::new();
    let mut list = Vec::new();
    for (name, _) in names {
        if !c.hosts.contains_key(&name) {
            let Ok(id) = name.parse() else { continue };
            // A snapshot removed meanwhile, or damaged (`check` says which), is not
            // counted.
            let Ok(s) = repo.load_snapshot(&id) else {
                continue;
            };
            let info = SnapInfo {
                id: name.clone(),
                host: s.host,
                time: s.time,
                files: s.summary.files_new + s.summary.files_changed + s.summary.files_unchanged,
                bytes: s.summary.bytes_total,
            };
            c.hosts.insert(name.clone(), info);
        }
        let info = &c.hosts[&name];
        *snapshots.entry(info.host.clone()).or_default() += 1;
        list.push(info.clone());
    }
    list.sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
    Ok(RepoFacts {
        stored_bytes,
        snapshots,
        list: Arc::new(list),
        ..RepoFacts::default()
    })
}

/// The size of the file system under `path` and the bytes still free for its users.
fn fs_space(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    // The repository, or the nearest directory above it that exists.
    let Some(dir) = path.ancestors().find(|p| p.exists()) else {
        return (0, 0);
    };
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    // SAFETY: `c` is a NUL-terminated path and `st` a zeroed statvfs to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return (0, 0);
    }
    let unit = st.f_frsize as u64;
    (st.f_blocks as u64 * unit, st.f_bavail as u64 * unit)
}

impl Overview {
    /// The overview now. Reads the repositories' figures (at most once per TTL): call
    /// it off the async runtime's threads.
    pub fn gather(shared: &SharedRef) -> Overview {
        let now = Utc::now();
        let (config, history, started, hosts, locations, facts) = {
            let g = shared.lock().expect("daemon state");
            let config = g.site.config.clone();
            let hosts: Vec<(String, String, HostState, Health, String)> = config
                .hosts
                .iter()
                .filter_map(|h| {
                    Some((
                        h.name.clone(),
                        h.schedule(&config).to_string(),
                        g.schedule.host(&h.name)?.clone(),
                        g.schedule.health(&config, h, now)?,
                        h.repository.clone(),
                    ))
                })
                .collect();
            let locations: Vec<(String, RepoLocation)> = g
                .site
                .host_repositories()
                .into_iter()
                .map(|(name, loc, _)| (name, loc))
                .collect();
            (
                config,
                g.history.clone(),
                g.schedule.started(),
                hosts,
                locations,
                g.facts.clone(),
            )
        };
        let repositories: Vec<RepoRow> = locations
            .iter()
            .map(|(name, loc)| RepoRow {
                name: name.clone(),
                facts: facts.of(loc),
                last_check: None,
                check_errors: None,
                last_prune: None,
            })
            .collect();
        let mut overview = Overview {
            now,
            started,
            hosts: Vec::new(),
            copies: Vec::new(),
            repositories,
            runs: BTreeMap::new(),
            max_concurrent: config.server.max_concurrent,
            title: config.feed.title.clone(),
        };
        let heres: Vec<String> = locations
            .iter()
            .map(|(_, loc)| loc.location.to_string())
            .collect();
        let read = history.with_records(|records| {
            let mut last: HashMap<&str, &RunRecord> = HashMap::new();
            for r in records {
                *overview
                    .runs
                    .entry((r.host.clone(), r.kind, r.status))
                    .or_default() += 1;
                if r.kind == RunKind::Pull {
                    last.insert(&r.host, r);
                }
                for (row, here) in overview.repositories.iter_mut().zip(&heres) {
                    match &r.details {
                        Some(Details::Prune(d)) if d.repository == *here && r.status.saved() => {
                            row.last_prune = Some(r.end);
                        }
                        Some(Details::Check(d)) if d.repository == *here => {
                            row.last_check = Some(r.end);
                            row.check_errors = Some(d.errors);
                        }
                        _ => {}
                    }
                }
            }
            overview.copies = super::schedule::copies(&config, records, now, started);
            hosts
                .into_iter()
                .map(|(name, schedule, state, health, repository)| HostRow {
                    last: last.get(name.as_str()).map(|r| (*r).clone()),
                    snapshots: overview
                        .repositories
                        .iter()
                        .find(|r| r.name == repository)
                        .filter(|r| r.facts.error.is_none())
                        .map(|r| r.facts.snapshots.get(&name).copied().unwrap_or(0)),
                    name,
                    schedule,
                    state,
                    health,
                    repository,
                })
                .collect::<Vec<_>>()
        });
        match read {
            Ok(hosts) => overview.hosts = hosts,
            Err(e) => tracing::warn!("reading the run history for the status: {e}"),
        }
        overview
            .hosts
            .sort_by(|a, b| a.condition().cmp(&b.condition()).then(a.name.cmp(&b.name)));
        overview.copies.sort_by(|a, b| {
            Condition::of_copy(a)
                .cmp(&Condition::of_copy(b))
                .then(a.clone.cmp(&b.clone))
                .then(a.host.cmp(&b.host))
        });
        overview
    }

    /// The repository row of `host`.
    pub fn repository_of(&self, host: &HostRow) -> Option<&RepoRow> {
        self.repositories.iter().find(|r| r.name == host.repository)
    }
}
