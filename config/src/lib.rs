//! The backup server's configuration: where haul keeps things (the built-in default
//! state directory holds the default repository, its generated key file and the run
//! history) and the TOML file of the server, its feed, hosts and clones.

use std::path::{Path, PathBuf};

/// The state directory when none is configured: `$HAUL_STATE_DIR`; for root
/// `/var/lib/haul`; else `$XDG_STATE_HOME/haul` or `~/.local/state/haul`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HAUL_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/haul");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("haul");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/state/haul"),
        None => PathBuf::from("/var/lib/haul"),
    }
}

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir(pub PathBuf);

impl StateDir {
    /// The default repository.
    pub fn repo(&self) -> PathBuf {
        self.0.join("repo")
    }
    /// The generated passphrase of the default repository.
    pub fn key_file(&self) -> PathBuf {
        self.0.join("repo.key")
    }
    /// One JSON record per run.
    pub fn runs(&self) -> PathBuf {
        self.0.join("runs")
    }
}

pub mod locate;
pub mod schedule;

use locate::Seg;
pub use schedule::{parse_duration, Schedule};
use std::time::Duration;

/// The backup server's configuration file (default `/etc/haul/pbs.toml`): the server's
/// settings, the feed, the hosts to pull and the clones to push to. Only `[[host]]`
/// entries are needed; everything else has defaults.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerSettings,
    #[serde(default)]
    pub feed: FeedSettings,
    #[serde(default, rename = "host")]
    pub hosts: Vec<Host>,
    #[serde(default, rename = "clone")]
    pub clones: Vec<CloneTarget>,
    #[serde(default, rename = "notify")]
    pub notify: Vec<Notify>,
    #[serde(default, rename = "copy")]
    pub copies: Vec<CopyJob>,
    #[serde(default, rename = "remote")]
    pub remotes: Vec<RemotePbs>,
}

/// `[[remote]]`: another haul-pbs that takes copies over SSH (`copy --to pbs:NAME`,
/// `[[copy]] to = "pbs:NAME"`). Its key's forced command there is `haul-pbs receive`,
/// which chooses the repository; this side needs no passphrase of it. The SSH keys
/// mean what they mean for a `[[host]]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemotePbs {
    pub name: String,
    pub address: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_user")]
    pub user: String,
    #[serde(default = "default_identity")]
    pub identity: PathBuf,
    pub identity_passphrase_file: Option<PathBuf>,
    #[serde(default = "default_known_hosts")]
    pub known_hosts: PathBuf,
    #[serde(default = "default_window_mib")]
    pub window_mib: u32,
}

impl RemotePbs {
    /// The remote as an SSH destination, in the shape the SSH transport takes.
    pub fn ssh_host(&self) -> Host {
        Host::destination(
            &self.name,
            &self.address,
            self.port,
            &self.user,
            (&self.identity, self.identity_passphrase_file.as_ref()),
            &self.known_hosts,
            self.window_mib,
        )
    }
}

/// What `[[copy]] to` and `copy --to` name with `pbs:NAME`: a `[[remote]]`.
pub const REMOTE_PREFIX: &str = "pbs:";

/// `[[copy]]`: the daemon copies hosts' snapshots into another repository on a
/// schedule (`haul-pbs copy`), each host's copy a run in the history and the feed.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyJob {
    pub name: String,
    /// The repository copied into (it must exist): a directory,
    /// `s3:https://HOST[:PORT]/BUCKET/PREFIX` (credentials as for
    /// `[server].repositories_dir`), or `pbs:NAME`, another pbs (a `[[remote]]`).
    pub to: String,
    /// The file holding its passphrase (not for `pbs:NAME`: that pbs has its own).
    pub password_file: Option<PathBuf>,
    /// The hosts whose snapshots go there (default: every host).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// When (default: daily).
    #[serde(default = "default_copy_schedule")]
    pub schedule: Schedule,
}

impl CopyJob {
    /// Whether snapshots of `host` go there.
    pub fn copies(&self, host: &str) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|h| h == host)
    }
}

fn default_copy_schedule() -> Schedule {
    Schedule::Every(Duration::from_secs(24 * 3600))
}

/// The statuses a run can end with, as `[[notify]].on` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyStatus {
    Ok,
    Warning,
    Failed,
}

/// How a `[[notify]]` URL is called.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyFormat {
    /// healthchecks.io style: a POST of the run's summary to `url` when it saved its
    /// work (ok, warning), to `url/fail` when it failed.
    #[default]
    Ping,
    /// A POST of the run as a JSON object.
    Json,
}

/// The kinds of run a `[[notify]]` may select (`kinds`).
pub const RUN_KINDS: [&str; 8] = [
    "pull", "restore", "import", "forget", "check", "prune", "push", "alert",
];

/// `[[notify]]`: at the end of each run (and each alert), a command is run or a URL
/// called, if the run matches the filters. A notifier that fails is logged; it never
/// changes the run's outcome.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    /// Names it in logs (default: `notify[N]`).
    pub name: Option<String>,
    /// A URL to call (`http://` or `https://`); `{host}` in it is replaced by the run's
    /// host.
    pub url: Option<String>,
    #[serde(default)]
    pub format: NotifyFormat,
    /// A command to run instead (its words; no shell): the run in `HAUL_*` variables
    /// and as JSON on its standard input.
    #[serde(default)]
    pub command: Vec<String>,
    /// The statuses that trigger it (default: all).
    #[serde(default)]
    pub on: Vec<NotifyStatus>,
    /// The kinds of run that trigger it (default: all; see [`RUN_KINDS`]).
    #[serde(default)]
    pub kinds: Vec<String>,
    /// The hosts whose runs trigger it (default: all).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// How long the call or the command may take (default 10 s).
    #[serde(default = "default_notify_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
}

fn default_notify_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Notify {
    /// Whether a run of `kind` on `host` that ended with `status` triggers it.
    pub fn selects(&self, host: &str, kind: &str, status: NotifyStatus) -> bool {
        (self.on.is_empty() || self.on.contains(&status))
            && (self.kinds.is_empty() || self.kinds.iter().any(|k| k == kind))
            && (self.hosts.is_empty() || self.hosts.iter().any(|h| h == host))
    }
}

/// `[server]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Run history, feeds, default key file (default: [`default_state_dir`]).
    pub state_dir: PathBuf,
    /// Where the repositories are: a host's is `repositories_dir/<its repository>`
    /// (default: the state directory, so the default repository is `STATE/repo`).
    pub repositories_dir: Option<PathBuf>,
    /// Where the pbs puts the Unix sockets of its runs' repository servers, each in a
    /// private directory of its own (default: the system's temporary directory).
    pub socket_dir: Option<PathBuf>,
    /// The status HTTP server (status pages, feeds, status.json, metrics): loopback by
    /// default.
    pub status_listen: std::net::SocketAddr,
    /// Who may read the status server: a file of `USER:ARGON2-HASH` lines (HTTP Basic)
    /// and `bearer:ARGON2-HASH` lines (a token, `Authorization: Bearer`), as
    /// `haul-pbs status-credentials` prints them. Required when `status_listen` is not
    /// a loopback address; when set, every request needs one of them.
    pub status_credentials: Option<PathBuf>,
    /// Runs at once, at most.
    pub max_concurrent: usize,
    /// A host's schedule unless it sets one.
    pub schedule: Schedule,
    /// When the daemon prunes each repository, if a snapshot of it was forgotten
    /// since its last prune (default: weekly).
    pub prune_schedule: Schedule,
    /// When the daemon checks each repository (default: never). Each check is a run
    /// in the history and the feed.
    pub check_schedule: Option<Schedule>,
    /// With `check_schedule`: read every pack whole within this period, one part of
    /// them at each check (`"30d"`: with a daily check, part 1 of 30, then 2 of 30 ...).
    /// Without it, the scheduled checks read no pack whole.
    #[serde(deserialize_with = "de_opt_duration")]
    pub check_read_data_period: Option<Duration>,
    /// A host without a successful run for this long is stale: a warning item in the
    /// feed, and `stale` in status and metrics.
    #[serde(deserialize_with = "de_duration")]
    pub alert_window: Duration,
    /// Retention unless a host sets its own (default: keep everything).
    pub retention: Retention,
    /// A run whose agent prints nothing (not even progress, which it prints every
    /// second) and sends no request for this long is stopped as stalled.
    #[serde(deserialize_with = "de_duration")]
    pub stall_timeout: Duration,
    /// A request of a run's agent (its head, its body, or the reading of its answer)
    /// that makes no progress for this long is cut off.
    #[serde(deserialize_with = "de_duration")]
    pub request_timeout: Duration,
    /// Repositories (by name) whose hosts trust each other: a pull may build on any
    /// content in them without sending it, so what hosts share crosses the wire once.
    /// Elsewhere (the default) a host sees only its own history: it sends content
    /// other hosts stored (stored once all the same), and can neither learn what they
    /// store nor borrow their data.
    pub cross_host_dedup: Vec<String>,
    /// A file of `AWS_ACCESS_KEY_ID=...` and `AWS_SECRET_ACCESS_KEY=...` lines (mode
    /// 0600) for repositories on object storage; default: the environment.
    pub s3_credentials_file: Option<PathBuf>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            state_dir: default_state_dir(),
            repositories_dir: None,
            socket_dir: None,
            status_listen: ([127, 0, 0, 1], 9470).into(),
            status_credentials: None,
            max_concurrent: 2,
            schedule: Schedule::Every(Duration::from_secs(24 * 3600)),
            prune_schedule: Schedule::Every(Duration::from_secs(7 * 24 * 3600)),
            check_schedule: None,
            check_read_data_period: None,
            alert_window: Duration::from_secs(26 * 3600),
            retention: Retention::default(),
            stall_timeout: Duration::from_secs(10 * 60),
            request_timeout: Duration::from_secs(60),
            cross_host_dedup: Vec::new(),
            s3_credentials_file: None,
        }
    }
}

impl ServerSettings {
    pub fn repositories_dir(&self) -> PathBuf {
        self.repositories_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.clone())
    }
}

/// `[feed]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedSettings {
    pub title: String,
    /// The channel's link (default: the status server's address).
    pub link: Option<String>,
    /// Items kept per feed: the newest.
    pub items: usize,
}

impl Default for FeedSettings {
    fn default() -> Self {
        FeedSettings {
            title: "haul backups".into(),
            link: None,
            items: 50,
        }
    }
}

/// How many snapshots to keep (`keep-last/hourly/daily/weekly/monthly/yearly`, as
/// restic and borg count them). Nothing set: keep everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
}

/// How the pbs reaches a host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// SSH to the host; its forced command runs the agent.
    #[default]
    Ssh,
    /// The agent runs on this machine as a child process.
    Local,
}

impl Transport {
    /// As the configuration and the run records spell it.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ssh => "ssh",
            Transport::Local => "local",
        }
    }
}

/// A source host (`[[host]]`). Only `name`, `address` and `paths` are required.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub name: String,
    pub address: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_user")]
    pub user: String,
    /// The pbs's private key for this host.
    #[serde(default = "default_identity")]
    pub identity: PathBuf,
    /// A file holding the key's passphrase, if it has one.
    pub identity_passphrase_file: Option<PathBuf>,
    /// The pinned host keys (plain OpenSSH format, `[address]:port` when not 22).
    #[serde(default = "default_known_hosts")]
    pub known_hosts: PathBuf,
    #[serde(default)]
    pub transport: Transport,
    pub paths: Vec<PathBuf>,
    #[serde(default)]
    pub excludes: Vec<String>,
    /// When the daemon pulls it (default: `[server].schedule`).
    pub schedule: Option<Schedule>,
    /// Stale after this long without a successful run (default: `[server].alert_window`).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub alert_window: Option<Duration>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// An rdiff-backup tree of this host whose history is imported on its first pull.
    pub legacy_rdiff_dir: Option<PathBuf>,
    /// Keep `legacy_rdiff_dir` after retention has removed a snapshot of the host
    /// (by default it is then deleted: the imported history has taken its place).
    #[serde(default)]
    pub keep_legacy_rdiff_dir: bool,
    /// Directory on the host where sshd creates the run's forwarded socket; the
    /// wrapper policy's `socket_dir`.
    #[serde(default = "default_socket_dir")]
    pub socket_dir: PathBuf,
    /// The agent: for `local`, the binary run here (default: beside haul-pbs); over
    /// SSH the wrapper's policy decides which binary runs, whatever this says.
    pub agent: Option<PathBuf>,
    /// The repository (a name in `[server].repositories_dir`; default `repo`, shared by
    /// every host, so that what hosts have in common is stored once).
    #[serde(default = "default_repository")]
    pub repository: String,
    /// Retention for this host's snapshots (default: `[server].retention`).
    pub retention: Option<Retention>,
    /// SSH receive window in MiB: the upload direction moves at most about
    /// window / 2 per round trip (raise it on long links).
    #[serde(default = "default_window_mib")]
    pub window_mib: u32,
}

impl Host {
    pub fn schedule<'a>(&'a self, config: &'a Config) -> &'a Schedule {
        self.schedule.as_ref().unwrap_or(&config.server.schedule)
    }
    pub fn alert_window(&self, config: &Config) -> Duration {
        self.alert_window.unwrap_or(config.server.alert_window)
    }
    pub fn retention<'a>(&'a self, config: &'a Config) -> &'a Retention {
        self.retention.as_ref().unwrap_or(&config.server.retention)
    }
    pub fn repository_path(&self, config: &Config) -> PathBuf {
        config.server.repositories_dir().join(&self.repository)
    }

    /// An SSH destination that is not a source host (a clone, a remote pbs): only what
    /// a connection needs, the rest as defaults.
    fn destination(
        name: &str,
        address: &str,
        port: u16,
        user: &str,
        (identity, identity_passphrase_file): (&PathBuf, Option<&PathBuf>),
        known_hosts: &Path,
        window_mib: u32,
    ) -> Host {
        Host {
            name: name.to_string(),
            address: address.to_string(),
            port,
            user: user.to_string(),
            identity: identity.clone(),
            identity_passphrase_file: identity_passphrase_file.cloned(),
            known_hosts: known_hosts.to_path_buf(),
            transport: Transport::Ssh,
            paths: Vec::new(),
            excludes: Vec::new(),
            schedule: None,
            alert_window: None,
            tags: Vec::new(),
            legacy_rdiff_dir: None,
            keep_legacy_rdiff_dir: false,
            socket_dir: default_socket_dir(),
            agent: None,
            repository: default_repository(),
            retention: None,
            window_mib,
        }
    }
}

/// A clone host that snapshots are pushed to (`[[clone]]`): it keeps a standby copy
/// of each host it receives, a directory holding that host's newest snapshot. The SSH
/// keys mean what they mean for a `[[host]]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneTarget {
    pub name: String,
    pub address: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_user")]
    pub user: String,
    #[serde(default = "default_identity")]
    pub identity: PathBuf,
    pub identity_passphrase_file: Option<PathBuf>,
    #[serde(default = "default_known_hosts")]
    pub known_hosts: PathBuf,
    /// Where sshd on the clone creates the run's forwarded socket.
    #[serde(default = "default_socket_dir")]
    pub socket_dir: PathBuf,
    #[serde(default = "default_window_mib")]
    pub window_mib: u32,
    /// The directory on the clone holding each host's standby copy, as
    /// `standby_dir/<host>` (unless `dirs` names another for the host).
    pub standby_dir: Option<PathBuf>,
    /// A host's standby directory on the clone, where it is not `standby_dir/<host>`.
    #[serde(default)]
    pub dirs: std::collections::BTreeMap<String, PathBuf>,
    /// The hosts whose snapshots go there (default: every host).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Ask the clone to run its import command after each complete push (the command
    /// itself is the clone's choice, in its wrapper policy).
    #[serde(default)]
    pub import: bool,
    /// Stale after this long without a successful push (default: `[server].alert_window`).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub alert_window: Option<Duration>,
}

impl CloneTarget {
    /// Whether snapshots of `host` go to this clone.
    pub fn receives(&self, host: &str) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|h| h == host)
    }

    /// The standby directory of `host` on the clone.
    pub fn standby_dir_of(&self, host: &str) -> Option<PathBuf> {
        self.dirs
            .get(host)
            .cloned()
            .or_else(|| self.standby_dir.as_ref().map(|d| d.join(host)))
    }

    pub fn alert_window(&self, config: &Config) -> Duration {
        self.alert_window.unwrap_or(config.server.alert_window)
    }

    /// The clone as an SSH destination, in the shape the SSH transport takes.
    pub fn ssh_host(&self) -> Host {
        Host {
            socket_dir: self.socket_dir.clone(),
            alert_window: self.alert_window,
            ..Host::destination(
                &self.name,
                &self.address,
                self.port,
                &self.user,
                (&self.identity, self.identity_passphrase_file.as_ref()),
                &self.known_hosts,
                self.window_mib,
            )
        }
    }
}

fn default_port() -> u16 {
    22
}
fn default_user() -> String {
    "root".into()
}
fn default_identity() -> PathBuf {
    PathBuf::from("/etc/haul/id_ed25519")
}
fn default_known_hosts() -> PathBuf {
    PathBuf::from("/etc/haul/known_hosts")
}
fn default_socket_dir() -> PathBuf {
    PathBuf::from("/run/haul")
}
fn default_window_mib() -> u32 {
    8
}
fn default_repository() -> String {
    "repo".into()
}

impl<'de> serde::Deserialize<'de> for Schedule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Schedule::parse(&text).map_err(serde::de::Error::custom)
    }
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// A TOML error as `LINE:COLUMN: KEY.PATH: message`, for messages that also name the
/// file (`config /etc/haul/pbs.toml:12:12: host[2].schedule: ...`).
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim();
    match e.span() {
        Some(span) => {
            let (line, col) = locate::line_col(text, span.start);
            match locate::path_at(text, span.start) {
                Some(path) => format!("{line}:{col}: {path}: {message}"),
                None => format!("{line}:{col}: {message}"),
            }
        }
        None => message.to_string(),
    }
}

/// A configuration that could not be used; the message names the file, the line, the
/// column and the key, and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("config {file}: {e}")))?;
        Config::parse(&text, &file)
    }

    /// Parses and checks a configuration; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text)
            .map_err(|e| ConfigError(format!("config {file}:{}", toml_error(text, &e))))?;
        config.check().map_err(|(path, why)| {
            let (line, col) = locate::offset_of(text, &path)
                .map(|at| locate::line_col(text, at))
                .unwrap_or((1, 1));
            ConfigError(format!(
                "config {file}:{line}:{col}: {}: {why}",
                locate::render(&path)
            ))
        })?;
        Ok(config)
    }

    /// The checks TOML types cannot express; a failure is the key path and why.
    fn check(&self) -> Result<(), (Vec<Seg<'static>>, String)> {
        let abs = |p: &PathBuf| {
            if p.is_absolute() {
                Ok(())
            } else {
                Err(format!("{} is not an absolute path", p.display()))
            }
        };
        let at = |keys: &[Seg<'static>], why: String| (keys.to_vec(), why);
        let s = &self.server;
        for (key, p) in [
            ("state_dir", Some(&s.state_dir)),
            // Object storage (`s3:...`) is checked where it is used.
            (
                "repositories_dir",
                s.repositories_dir
                    .as_ref()
                    .filter(|p| !p.to_string_lossy().starts_with("s3:")),
            ),
            ("socket_dir", s.socket_dir.as_ref()),
            ("status_credentials", s.status_credentials.as_ref()),
            ("s3_credentials_file", s.s3_credentials_file.as_ref()),
        ] {
            if let Some(p) = p {
                abs(p).map_err(|why| at(&[Seg::Key("server"), Seg::Key(key)], why))?;
            }
        }
        if !s.status_listen.ip().is_loopback() && s.status_credentials.is_none() {
            return Err(at(
                &[Seg::Key("server"), Seg::Key("status_listen")],
                format!(
                    "{} is not a loopback address: set [server].status_credentials to a file of credentials (`haul-pbs status-credentials` makes its lines), or listen on 127.0.0.1 behind a reverse proxy",
                    s.status_listen
                ),
            ));
        }
        if s.check_read_data_period.is_some() && s.check_schedule.is_none() {
            return Err(at(
                &[Seg::Key("server"), Seg::Key("check_read_data_period")],
                "is set without [server].check_schedule: set when the daemon checks".into(),
            ));
        }
        if !(1..=64).contains(&s.max_concurrent) {
            return Err(at(
                &[Seg::Key("server"), Seg::Key("max_concurrent")],
                format!("{} is not from 1 to 64", s.max_concurrent),
            ));
        }
        for (i, name) in s.cross_host_dedup.iter().enumerate() {
            if !self.hosts.iter().any(|h| &h.repository == name) {
                return Err(at(
                    &[Seg::Key("server"), Seg::Key("cross_host_dedup"), Seg::Index(i)],
                    format!("no host uses a repository {name:?} (a host's `repository`, default \"repo\")"),
                ));
            }
        }
        if !(1..=10_000).contains(&self.feed.items) {
            return Err(at(
                &[Seg::Key("feed"), Seg::Key("items")],
                format!("{} is not from 1 to 10000", self.feed.items),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, h) in self.hosts.iter().enumerate() {
            let key = |k: &'static str| vec![Seg::Key("host"), Seg::Index(i), Seg::Key(k)];
            if !valid_name(&h.name) {
                return Err((
                    key("name"),
                    format!(
                        "{:?} is not a host name (letters, digits, `.`, `_`, `-`)",
                        h.name
                    ),
                ));
            }
            if !names.insert(h.name.as_str()) {
                return Err((
                    key("name"),
                    format!("{:?} is used by another host too", h.name),
                ));
            }
            if h.paths.is_empty() {
                return Err((key("paths"), "give at least one path to back up".into()));
            }
            for (j, p) in h.paths.iter().enumerate() {
                abs(p).map_err(|why| {
                    let mut k = key("paths");
                    k.push(Seg::Index(j));
                    (k, why)
                })?;
            }
            for (k, p) in [
                ("identity", &h.identity),
                ("known_hosts", &h.known_hosts),
                ("socket_dir", &h.socket_dir),
            ] {
                abs(p).map_err(|why| (key(k), why))?;
            }
            if let Some(d) = &h.legacy_rdiff_dir {
                abs(d).map_err(|why| (key("legacy_rdiff_dir"), why))?;
            }
            if !valid_name(&h.repository) {
                return Err((
                    key("repository"),
                    format!(
                        "{:?} is not a repository name (letters, digits, `.`, `_`, `-`; it is a directory in [server].repositories_dir)",
                        h.repository
                    ),
                ));
            }
            if !(1..=256).contains(&h.window_mib) {
                return Err((
                    key("window_mib"),
                    format!("{} is not from 1 to 256", h.window_mib),
                ));
            }
        }
        for (i, n) in self.notify.iter().enumerate() {
            let key = |k: &'static str| vec![Seg::Key("notify"), Seg::Index(i), Seg::Key(k)];
            match (&n.url, n.command.is_empty()) {
                (Some(_), false) | (None, true) => {
                    return Err((
                        vec![Seg::Key("notify"), Seg::Index(i)],
                        "give either url or command".into(),
                    ))
                }
                (Some(u), true) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                    return Err((
                        key("url"),
                        format!("{u:?} is not an http:// or https:// URL"),
                    ));
                }
                _ => {}
            }
            if let Some(k) = n.kinds.iter().find(|k| !RUN_KINDS.contains(&k.as_str())) {
                return Err((
                    key("kinds"),
                    format!("{k:?} is not a kind of run ({})", RUN_KINDS.join(", ")),
                ));
            }
            // Checks and prunes are runs of host "repository".
            if let Some(h) = n
                .hosts
                .iter()
                .find(|h| !names.contains(h.as_str()) && *h != "repository")
            {
                return Err((
                    key("hosts"),
                    format!("{h:?} is not a [[host]] of this file (nor \"repository\", for checks and prunes)"),
                ));
            }
            if n.timeout.is_zero() || n.timeout > Duration::from_secs(300) {
                return Err((key("timeout"), "is not from 1 s to 5 min".into()));
            }
        }
        // A `[[copy]]`'s or `[[clone]]`'s name (valid, used once) and hosts (this
        // file's).
        let entry = |section: &'static str,
                     i: usize,
                     name: &str,
                     hosts: &[String],
                     seen: &mut std::collections::HashSet<String>| {
            let key = |k: &'static str| vec![Seg::Key(section), Seg::Index(i), Seg::Key(k)];
            if !valid_name(name) {
                return Err((key("name"), format!("{name:?} is not a {section} name")));
            }
            if !seen.insert(name.to_string()) {
                return Err((
                    key("name"),
                    format!("{name:?} is used by another {section} too"),
                ));
            }
            match hosts
                .iter()
                .enumerate()
                .find(|(_, h)| !names.contains(h.as_str()))
            {
                Some((j, h)) => {
                    let mut k = key("hosts");
                    k.push(Seg::Index(j));
                    Err((k, format!("{h:?} is not a [[host]] of this file")))
                }
                None => Ok(()),
            }
        };
        let mut jobs = std::collections::HashSet::new();
        for (i, c) in self.copies.iter().enumerate() {
            let key = |k: &'static str| vec![Seg::Key("copy"), Seg::Index(i), Seg::Key(k)];
            entry("copy", i, &c.name, &c.hosts, &mut jobs)?;
            match (c.to.strip_prefix(REMOTE_PREFIX), &c.password_file) {
                (Some(remote), None) => {
                    if self.remote(remote).is_none() {
                        return Err((key("to"), format!("no [[remote]] named {remote:?}")));
                    }
                }
                (Some(_), Some(_)) => return Err((
                    key("password_file"),
                    "is not for another pbs (pbs:NAME): it opens its repository with its own key"
                        .into(),
                )),
                (None, None) => {
                    return Err((
                        key("to"),
                        "a repository needs password_file, the file holding its passphrase".into(),
                    ))
                }
                (None, Some(pass)) => {
                    if !c.to.starts_with("s3:") {
                        abs(&PathBuf::from(&c.to)).map_err(|why| (key("to"), why))?;
                    }
                    abs(pass).map_err(|why| (key("password_file"), why))?;
                }
            }
        }
        let mut remotes = std::collections::HashSet::new();
        for (i, r) in self.remotes.iter().enumerate() {
            let key = |k: &'static str| vec![Seg::Key("remote"), Seg::Index(i), Seg::Key(k)];
            entry("remote", i, &r.name, &[], &mut remotes)?;
            for (k, p) in [("identity", &r.identity), ("known_hosts", &r.known_hosts)] {
                abs(p).map_err(|why| (key(k), why))?;
            }
            if !(1..=256).contains(&r.window_mib) {
                return Err((
                    key("window_mib"),
                    format!("{} is not from 1 to 256", r.window_mib),
                ));
            }
        }
        let mut clones = std::collections::HashSet::new();
        for (i, c) in self.clones.iter().enumerate() {
            let key = |k: &'static str| vec![Seg::Key("clone"), Seg::Index(i), Seg::Key(k)];
            entry("clone", i, &c.name, &c.hosts, &mut clones)?;
            for (k, p) in [
                ("identity", &c.identity),
                ("known_hosts", &c.known_hosts),
                ("socket_dir", &c.socket_dir),
            ] {
                abs(p).map_err(|why| (key(k), why))?;
            }
            if let Some(d) = &c.standby_dir {
                abs(d).map_err(|why| (key("standby_dir"), why))?;
            }
            if !(1..=256).contains(&c.window_mib) {
                return Err((
                    key("window_mib"),
                    format!("{} is not from 1 to 256", c.window_mib),
                ));
            }
            for (h, d) in &c.dirs {
                if !c.receives(h) || !names.contains(h.as_str()) {
                    return Err((
                        key("dirs"),
                        format!("{h:?} is not a host this clone receives"),
                    ));
                }
                abs(d).map_err(|why| (key("dirs"), format!("{h}: {why}")))?;
            }
            if let Some(h) = self
                .hosts
                .iter()
                .find(|h| c.receives(&h.name) && c.standby_dir_of(&h.name).is_none())
            {
                return Err((
                    key("standby_dir"),
                    format!(
                        "clone {:?} receives {:?} but has no standby_dir (nor a dirs entry for it): where does its copy go?",
                        c.name, h.name
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    pub fn remote(&self, name: &str) -> Option<&RemotePbs> {
        self.remotes.iter().find(|r| r.name == name)
    }

    pub fn clone_target(&self, name: &str) -> Option<&CloneTarget> {
        self.clones.iter().find(|c| c.name == name)
    }

    /// Where the feed's channel links to.
    pub fn feed_link(&self) -> String {
        self.feed
            .link
            .clone()
            .unwrap_or_else(|| format!("http://{}/", self.server.status_listen))
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SCHEDULES: &[&str] = &[
        "6h",
        "30m",
        "1h 30m",
        "0 */6 * * *",
        "30 2 * * *",
        "*/10 * * * *",
        "0 0 29 2 *",
        "1s",
        "584542046090y",
        "18446744073709551615s",
    ];

    /// TOML's syntax and the file's own keys, for the mutations to insert.
    const TOML_TOKENS: &[&[u8]] = &[
        b"\n",
        b"[[host]]\n",
        b"[server]\n",
        b"[[clone]]\n",
        b" = ",
        b"\"",
        b"'''",
        b"[",
        b"]",
        b"{",
        b"}",
        b",",
        b".",
        b"#",
        b"schedule = \"",
        b"alert_window = \"",
        b"9999999999999999999",
        b"-1",
        b"1e400",
        b"inf",
        b"\"0 0 31 2 *\"",
        b"\"99999999999d\"",
        b"\\u0000",
        b"\xc3\xa9",
    ];

    fn arb_config() -> impl Strategy<Value = Vec<u8>> {
        let schedule = || proptest::sample::select(SCHEDULES);
        (
            schedule(),
            schedule(),
            schedule(),
            (0usize..70, 0u32..300, any::<u16>(), 0usize..10_002),
        )
            .prop_map(|(server, host, window, (concurrent, window_mib, port, items))| {
                format!(
                    "[server]\nmax_concurrent = {concurrent}\nschedule = \"{server}\"\nalert_window = \"{window}\"\n\
                     retention = {{ keep_daily = 7 }}\n[feed]\nitems = {items}\n\
                     [[host]]\nname = \"web-1\"\naddress = \"192.0.2.10\"\npaths = [\"/srv\"]\nschedule = \"{host}\"\n\
                     port = {port}\nwindow_mib = {window_mib}\nalert_window = \"{window}\"\n\
                     [[host]]\nname = \"db-1\"\naddress = \"db\"\npaths = [\"/var\"]\n\
                     [[clone]]\nname = \"off\"\naddress = \"z\"\nstandby_dir = \"/r\"\nhosts = [\"web-1\"]\n"
                )
                .into_bytes()
            })
    }

    /// What the daemon computes from an accepted configuration.
    fn use_config(c: &Config) {
        let now = chrono::DateTime::from_timestamp(1_793_534_580, 0).unwrap();
        let _ = c.feed_link();
        for h in &c.hosts {
            let s = h.schedule(c);
            for (last, jitter) in [(None, 0.0), (Some(now), 1.0), (Some(now), 0.5)] {
                assert!(s.next_after(last, now, jitter) >= now - chrono::Duration::seconds(1));
            }
            let _ = s.period();
            let _ = (h.alert_window(c), h.retention(c), h.repository_path(c));
        }
    }

    proptest! {
        /// The stable counterpart of the `pbs_config` fuzz target (docs/fuzzing.md): a
        /// configuration is refused with its file and position, or it can be used
        /// without a panic.
        #[test]
        fn hostile_configurations_are_refused_with_a_position_or_usable(
            bytes in haul_mutate::inputs_with(arb_config(), 200, TOML_TOKENS),
        ) {
            let text = String::from_utf8_lossy(&bytes);
            match Config::parse(&text, "pbs.toml") {
                Ok(c) => use_config(&c),
                Err(e) => prop_assert!(e.0.starts_with("config pbs.toml:"), "{}", e),
            }
        }
    }

    #[test]
    fn a_host_with_name_address_and_paths_is_enough() {
        let c = Config::parse(
            "[[host]]\nname = \"web-1\"\naddress = \"10.0.0.5\"\npaths = [\"/srv\"]\n",
            "pbs.toml",
        )
        .unwrap();
        let h = c.host("web-1").unwrap();
        assert_eq!(
            (h.port, h.user.as_str(), h.transport),
            (22, "root", Transport::Ssh)
        );
        assert_eq!(h.socket_dir, PathBuf::from("/run/haul"));
    }

    #[test]
    fn the_example_configuration_is_valid() {
        let c =
            Config::parse(include_str!("../../examples/pbs.toml"), "examples/pbs.toml").unwrap();
        let names: Vec<&str> = c.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["web-1", "db-1", "pbs"]);
        assert_eq!(c.host("db-1").unwrap().port, 2222);
        assert_eq!(c.host("pbs").unwrap().transport, Transport::Local);
        assert!(matches!(
            c.host("db-1").unwrap().schedule(&c),
            Schedule::Cron { .. }
        ));
        assert_eq!(c.clones[0].name, "off-site");
        assert_eq!(c.server.max_concurrent, 2);
    }

    #[test]
    fn every_bad_input_names_its_line_column_and_key_path() {
        const HOST: &str =
            "[[host]]\nname = \"web-1\"\naddress = \"10.0.0.5\"\npaths = [\"/srv\"]\n";
        let three = "[[host]]\nname = \"a\"\naddress = \"x\"\npaths = [\"/srv\"]\n[[host]]\nname = \"b\"\naddress = \"y\"\npaths = [\"/srv\"]\n[[host]]\nname = \"c\"\naddress = \"z\"\npaths = [\"/srv\"]\nschedule = \"every 5 min\"\n";
        let cases: Vec<(String, &str)> = vec![
            ("[server]\nmax_concurrent = 0\n".into(), "pbs.toml:2:18: server.max_concurrent: 0 is not from 1 to 64"),
            ("[server]\nstatus_listen = \"localhost\"\n".into(), "pbs.toml:2:17: server.status_listen: invalid socket address syntax"),
            ("[server]\nstatus_listen = \"0.0.0.0:9470\"\n".into(), "pbs.toml:2:17: server.status_listen: 0.0.0.0:9470 is not a loopback address: set [server].status_credentials to a file of credentials (`haul-pbs status-credentials` makes its lines), or listen on 127.0.0.1 behind a reverse proxy"),
            ("[server]\nalert_window = \"a day\"\n".into(), "pbs.toml:2:16: server.alert_window: \"a day\" is not a duration; use e.g. \"30m\", \"26h\" or \"7d\""),
            ("[server]\nstate_dir = \"var/lib/haul\"\n".into(), "pbs.toml:2:13: server.state_dir: var/lib/haul is not an absolute path"),
            ("[server]\nretention = { keep_daily = -1 }\n".into(), "pbs.toml:2:28: server.retention.keep_daily: invalid value: integer `-1`, expected u32"),
            ("[feed]\nitems = 0\n".into(), "pbs.toml:2:9: feed.items: 0 is not from 1 to 10000"),
            (format!("[server]\ncross_host_dedup = [\"repo\", \"lab\"]\n{HOST}"), "pbs.toml:2:29: server.cross_host_dedup[1]: no host uses a repository \"lab\""),
            ("[feed]\ncolour = \"red\"\n".into(), "pbs.toml:2:1: feed.colour: unknown field `colour`"),
            (three.into(), "pbs.toml:13:12: host[2].schedule: \"every 5 min\" is not a schedule; use an interval like \"30m\" or \"6h\", or a cron expression like \"0 */6 * * *\""),
            (format!("{HOST}schedule = \"0 25 * * *\"\n"), "pbs.toml:5:12: host[0].schedule: \"0 25 * * *\" is not a valid cron expression"),
            (format!("{HOST}alert_window = \"soon\"\n"), "pbs.toml:5:16: host[0].alert_window: \"soon\" is not a duration"),
            (format!("{HOST}transport = \"rsh\"\n"), "pbs.toml:5:13: host[0].transport: unknown variant `rsh`, expected `ssh` or `local`"),
            (format!("{HOST}port = 70000\n"), "pbs.toml:5:8: host[0].port: invalid value: integer `70000`, expected u16"),
            ("[[host]]\nname = \"web 1\"\naddress = \"x\"\npaths = [\"/srv\"]\n".into(), "pbs.toml:2:8: host[0].name: \"web 1\" is not a host name"),
            ("[[host]]\nname = \"a\"\naddress = \"x\"\n".into(), "pbs.toml:1:1: host[0]: missing field `paths`"),
            (format!("{HOST}legacy_rdiff_dir = \"old\"\n"), "pbs.toml:5:20: host[0].legacy_rdiff_dir: old is not an absolute path"),
            (format!("{HOST}repository = \"../x\"\n"), "pbs.toml:5:14: host[0].repository: \"../x\" is not a repository name"),
            (format!("{HOST}window_mib = 0\n"), "pbs.toml:5:14: host[0].window_mib: 0 is not from 1 to 256"),
            (format!("{HOST}[[clone]]\nname = \"c1\"\naddress = \"x\"\nstandby_dir = \"/r\"\nhosts = [\"web-2\"]\n"), "pbs.toml:9:10: clone[0].hosts[0]: \"web-2\" is not a [[host]] of this file"),
            (format!("{HOST}[[clone]]\nname = \"c1\"\naddress = \"x\"\nstandby_dir = \"r\"\n"), "pbs.toml:8:15: clone[0].standby_dir: r is not an absolute path"),
            (format!("{HOST}[[clone]]\nname = \"c1\"\naddress = \"x\"\n"), "pbs.toml:6:1: clone[0].standby_dir: clone \"c1\" receives \"web-1\" but has no standby_dir"),
            (format!("{HOST}[[clone]]\nname = \"c1\"\naddress = \"x\"\nrepository = \"/r\"\n"), "pbs.toml:8:1: clone[0].repository: unknown field `repository`"),
            (format!("{HOST}[[copy]]\nname = \"off\"\nto = \"rel/dir\"\npassword_file = \"/p\"\n"), "pbs.toml:7:6: copy[0].to: rel/dir is not an absolute path"),
            (format!("{HOST}[[copy]]\nname = \"off\"\nto = \"s3:https://h/b\"\npassword_file = \"/p\"\nhosts = [\"web-1\", \"nope\"]\n"), "pbs.toml:9:19: copy[0].hosts[1]: \"nope\" is not a [[host]] of this file"),
            (format!("{HOST}[[clone]]\nname = \"c1\"\naddress = \"x\"\nhosts = []\ndirs = {{ db = \"/s\" }}\n"), "pbs.toml:9:1: clone[0].dirs: \"db\" is not a host this clone receives"),
            (format!("{HOST}[[copy]]\nname = \"off\"\nto = \"pbs:far\"\n"), "pbs.toml:7:6: copy[0].to: no [[remote]] named \"far\""),
            (format!("{HOST}[[remote]]\nname = \"far\"\naddress = \"x\"\n[[copy]]\nname = \"off\"\nto = \"pbs:far\"\npassword_file = \"/p\"\n"), "pbs.toml:11:17: copy[0].password_file: is not for another pbs (pbs:NAME)"),
            (format!("{HOST}[[copy]]\nname = \"off\"\nto = \"/srv/copy\"\n"), "pbs.toml:7:6: copy[0].to: a repository needs password_file"),
            (format!("{HOST}[[remote]]\nname = \"far\"\naddress = \"x\"\nidentity = \"id\"\n"), "pbs.toml:8:12: remote[0].identity: id is not an absolute path"),
            (format!("{HOST}[[remote]]\nname = \"far\"\naddress = \"x\"\n[[remote]]\nname = \"far\"\naddress = \"y\"\n"), "pbs.toml:9:8: remote[1].name: \"far\" is used by another remote too"),
        ];
        let mut wrong = Vec::new();
        for (text, want) in &cases {
            match Config::parse(text, "pbs.toml") {
                Ok(_) => wrong.push(format!("{text:?}: accepted, want {want:?}")),
                Err(e) if !e.0.starts_with(&format!("config {want}")) => {
                    wrong.push(format!("{text:?}:\n   got {:?}\n  want {want:?}", e.0))
                }
                Err(_) => {}
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn a_full_configuration_parses_with_its_defaults() {
        let c = Config::parse(
            "[server]\nstate_dir = \"/srv/haul\"\nmax_concurrent = 3\nalert_window = \"30h\"\n\
             retention = { keep_daily = 7, keep_weekly = 4 }\n[feed]\ntitle = \"backups\"\n\
             [[host]]\nname = \"a\"\naddress = \"x\"\npaths = [\"/srv\"]\nschedule = \"0 */6 * * *\"\n\
             [[host]]\nname = \"b\"\naddress = \"y\"\npaths = [\"/srv\"]\nrepository = \"b\"\nalert_window = \"2h\"\n\
             [[clone]]\nname = \"off-site\"\naddress = \"z\"\nstandby_dir = \"/standby\"\nhosts = [\"a\"]\n\
             dirs = { a = \"/srv/a\" }\nimport = true\n\
             [[clone]]\nname = \"second\"\naddress = \"w\"\nstandby_dir = \"/standby\"\n",
            "pbs.toml",
        )
        .unwrap();
        let (a, b) = (c.host("a").unwrap(), c.host("b").unwrap());
        assert!(matches!(a.schedule(&c), Schedule::Cron { .. }));
        assert!(matches!(b.schedule(&c), Schedule::Every(d) if *d == Duration::from_secs(86_400)));
        assert_eq!(a.alert_window(&c), Duration::from_secs(30 * 3600));
        assert_eq!(b.alert_window(&c), Duration::from_secs(2 * 3600));
        assert_eq!(a.repository_path(&c), PathBuf::from("/srv/haul/repo"));
        assert_eq!(b.repository_path(&c), PathBuf::from("/srv/haul/b"));
        assert_eq!(a.retention(&c).keep_daily, Some(7));
        assert_eq!(c.server.status_listen.to_string(), "127.0.0.1:9470");
        assert_eq!(c.feed_link(), "http://127.0.0.1:9470/");
        assert_eq!(c.clones[0].hosts, ["a"]);
        let (off, second) = (&c.clones[0], &c.clones[1]);
        assert!(off.receives("a") && !off.receives("b") && off.import);
        assert_eq!(off.standby_dir_of("a"), Some(PathBuf::from("/srv/a")));
        assert!(second.receives("a") && second.receives("b") && !second.import);
        assert_eq!(
            second.standby_dir_of("b"),
            Some(PathBuf::from("/standby/b"))
        );
        assert_eq!(second.ssh_host().socket_dir, PathBuf::from("/run/haul"));
        assert_eq!(second.alert_window(&c), Duration::from_secs(30 * 3600));
    }

    #[test]
    fn errors_name_the_file_line_and_key() {
        let e = Config::parse(
            "[[host]]\nname = \"a\"\naddress = \"x\"\npaths = [\"/srv\"]\nshedule = \"6h\"\n",
            "pbs.toml",
        )
        .unwrap_err();
        assert!(
            e.0.starts_with("config pbs.toml:5:1: host[0].shedule: "),
            "{e}"
        );
        assert!(e.0.contains("shedule"), "{e}");
        let e = Config::parse("[[host]]\nname = \"a\"\naddress = \"x\"\npaths = [\"/srv\"]\n[[host]]\nname = \"a\"\naddress = \"y\"\npaths = [\"srv\"]\n", "pbs.toml").unwrap_err();
        assert!(
            e.0.contains("config pbs.toml:6:8: host[1].name: \"a\" is used by another host too"),
            "{e}"
        );
        let e = Config::parse(
            "[[host]]\nname = \"a\"\naddress = \"x\"\npaths = [\"srv\"]\n",
            "pbs.toml",
        )
        .unwrap_err();
        assert!(
            e.0.contains("config pbs.toml:4:10: host[0].paths[0]: srv is not an absolute path"),
            "{e}"
        );
    }
}
