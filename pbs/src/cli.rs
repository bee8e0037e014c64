//! The command line of `haul-pbs` (clap derive only; validation happens in the commands).

use clap::{Args, Parser, Subcommand};
use haul_repo::backend::Location;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "haul-pbs",
    version,
    about = "The haul backup server: owns repositories and keys, takes and restores backups"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct Global {
    /// The repository: a directory, or object storage as
    /// s3:https://HOST[:PORT]/BUCKET/PREFIX (credentials from AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY, or the file of [server].s3_credentials_file).
    #[arg(long, short = 'r', env = "HAUL_REPO", global = true, value_parser = parse_location)]
    pub repo: Option<Location>,
    /// File holding the repository passphrase (else $HAUL_PASSWORD, $HAUL_PASSWORD_FILE, or a prompt).
    #[arg(long, env = "HAUL_PASSWORD_FILE", global = true)]
    pub password_file: Option<PathBuf>,
    /// Directory for the local index cache (default: $XDG_CACHE_HOME/haul or ~/.cache/haul).
    #[arg(long, env = "HAUL_CACHE_DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
    /// Do not use or write the local index cache.
    #[arg(long, global = true)]
    pub no_cache: bool,
    /// Output one JSON object per line.
    #[arg(long, global = true)]
    pub json: bool,
    /// Take no lock: for commands that only read (snapshots, ls, restore, check, key
    /// list, repair --dry-run), e.g. on a read-only disk. Commands that write refuse it.
    #[arg(long, global = true)]
    pub no_lock: bool,
    /// The configuration file (default: /etc/haul/pbs.toml when it exists). Its
    /// `[server]` settings say where the state and the repositories are, for every
    /// command, as for the daemon.
    #[arg(long, env = "HAUL_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// State directory: run history, feeds, and (unless `[server].repositories_dir`
    /// says otherwise) the default repository and its key file (default:
    /// `[server].state_dir`, else $HAUL_STATE_DIR, /var/lib/haul for root, else
    /// ~/.local/state/haul).
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new repository.
    Init(InitArgs),
    /// Manage the repository's keys (passphrases).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Back up directories of this machine into the repository.
    BackupLocal(BackupLocalArgs),
    /// List snapshots.
    Snapshots(SnapshotsArgs),
    /// List the contents of a snapshot.
    Ls(LsArgs),
    /// Compare two snapshots: what was added (+), removed (-), changed in content (M),
    /// in metadata only (U) or in type (T), with totals.
    Diff(DiffArgs),
    /// Find the entries whose name matches a pattern in every snapshot, newest first.
    Find(FindArgs),
    /// Write a file of a snapshot to stdout, or a directory (or the whole snapshot) as
    /// a tar stream with owners, modes, times, xattrs, hard links and devices.
    Dump(DumpArgs),
    /// How big snapshots are: what a restore of each writes (restore-size), or the
    /// distinct data they use with its deduplication and compression (raw-data).
    Stats(StatsArgs),
    /// Mount the repository read-only (FUSE) to browse its snapshots: snapshots/,
    /// hosts/HOST/, tags/TAG/ and ids/ID/, each snapshot a directory named by its
    /// time. Runs until Ctrl-C, SIGTERM or `fusermount3 -u MOUNTPOINT`.
    Mount(MountArgs),
    /// Restore a snapshot into a new or empty directory.
    Restore(RestoreArgs),
    /// Check the repository's structure, and with --read-data every stored byte.
    Check(CheckArgs),
    /// Remove snapshots: those a keep policy does not keep (restic's and borg's rules,
    /// per host and paths; the newest always stays), or the ones named. Data only they
    /// referenced stays in the packs.
    Forget(ForgetArgs),
    /// Reclaim the space of data no snapshot uses any more: delete packs that hold only
    /// such data, repack those where it is worth it, while pulls go on.
    Prune(PruneArgs),
    /// Copy snapshots into another repository (a directory or object storage, with keys
    /// of its own): only the data it lacks is sent, a snapshot already there is
    /// skipped, and a copy cut short sends only the rest when run again.
    Copy(CopyArgs),
    /// Back up a source through its agent: `HOST` (from the configuration) over SSH, or
    /// `--local PATH...` with the agent on this machine. Without --repo, uses (and on
    /// first use creates) the default repository in the state directory.
    Pull(PullArgs),
    /// Push a host's newest snapshot (or the one named) to the standby copies its
    /// clones keep: only what they lack is sent, and each copy is replaced in one step.
    Push(PushArgs),
    /// List recorded runs, newest last.
    Runs(RunsArgs),
    /// Check the configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Import every session of an rdiff-backup repository as a snapshot with its
    /// original time (tags `rdiff-backup` and the session's timestring); sessions
    /// already imported for the host are skipped.
    ImportRdiff(ImportRdiffArgs),
    /// Pull every configured host on its schedule, in the foreground (for supervisord
    /// or systemd), and serve feeds, status and metrics over HTTP.
    Daemon(DaemonArgs),
    /// Print a shell script that sets a host up for SSH pulls (or a clone for pushes),
    /// to run there as root: a dedicated user, the agent's permissions, the wrapper's
    /// policy, the socket directory, the authorized_keys line and the sshd settings.
    SshSetup(SshSetupArgs),
    /// Print a line for `[server].status_credentials`: USER with a password (asked
    /// twice, or $HAUL_STATUS_PASSWORD), or with --token a new random token for
    /// `Authorization: Bearer` (shown on stderr; only its hash goes to stdout).
    StatusCredentials(StatusCredentialsArgs),
    /// Print the shell completions of haul-pbs for SHELL (bash, zsh, fish, elvish,
    /// powershell), e.g. `haul-pbs completions bash > /etc/bash_completion.d/haul-pbs`.
    Completions { shell: clap_complete::Shell },
    /// Write the manual pages of haul-pbs and its commands into DIR (packaging).
    #[command(hide = true)]
    ManPages { dir: PathBuf },
    /// Serve the repository on a Unix socket (append-only for backups, read-only for
    /// restores) until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// The forced command of the key another pbs copies snapshots in with (`copy --to
    /// pbs:NAME` there): serves this repository, append-only, on standard input and
    /// output until the sender is done. Nothing can be read, deleted or overwritten.
    Receive(ReceiveArgs),
    /// Repair damaged repository files, as `check` names them.
    #[command(subcommand)]
    Repair(RepairCommand),
    /// Remove stale locks (left by processes that died), or with --all every lock.
    Unlock {
        /// Remove every lock, also those of running processes.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RepairCommand {
    /// Index every pack that no readable index file lists, from the pack's own header,
    /// then move damaged index files aside (into damaged/index/).
    Index {
        /// Say what would be done, change nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
    },
    /// Move snapshot files that cannot be read aside (into damaged/snapshots/), so
    /// that listing and checking the others is clean again.
    Snapshots {
        /// Say what would be done, change nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
    },
}

impl RepairCommand {
    pub fn dry_run(&self) -> bool {
        match self {
            RepairCommand::Index { dry_run } | RepairCommand::Snapshots { dry_run } => *dry_run,
        }
    }
}

impl Command {
    /// The name of a command that writes to the repository (and so must hold a lock),
    /// `None` for one that only reads it or does not use one.
    pub fn writes(&self) -> Option<&'static str> {
        Some(match self {
            Command::Init(_) => "init",
            Command::Key(KeyCommand::Add { .. }) => "key add",
            Command::Key(KeyCommand::Remove { .. }) => "key remove",
            Command::BackupLocal(_) => "backup-local",
            Command::Forget(_) => "forget",
            Command::Prune(a) if !a.dry_run => "prune",
            Command::Pull(_) => "pull",
            Command::ImportRdiff(_) => "import-rdiff",
            Command::Daemon(_) => "daemon",
            Command::Serve(a) if a.mode == ServeMode::AppendOnly => "serve --mode append-only",
            Command::Receive(_) => "receive",
            Command::Repair(RepairCommand::Index { dry_run: false }) => "repair index",
            Command::Repair(RepairCommand::Snapshots { dry_run: false }) => "repair snapshots",
            Command::Unlock { .. } => "unlock",
            _ => return None,
        })
    }
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// zstd compression level for chunks (1-22; 1 is fast and, on typical data, within
    /// a few percent of 3's size).
    #[arg(long, default_value_t = haul_repo::format::config::DEFAULT_COMPRESSION)]
    pub compression: i32,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Add a key for another passphrase (read from --new-password-file, $HAUL_NEW_PASSWORD or a prompt).
    Add {
        #[arg(long, env = "HAUL_NEW_PASSWORD_FILE")]
        new_password_file: Option<PathBuf>,
    },
    /// List the keys.
    List,
    /// Remove a key by id (or a unique prefix). The last key cannot be removed.
    Remove { id: String },
}

/// What a backup takes and how it is labelled, for `backup-local` and `pull`.
#[derive(Debug, Clone, Args)]
pub struct SelectArgs {
    /// Exclude entries whose path or name matches this glob (repeatable).
    #[arg(long, short = 'e')]
    pub exclude: Vec<String>,
    /// Skip the contents of directories tagged with CACHEDIR.TAG.
    #[arg(long)]
    pub exclude_caches: bool,
    /// Stay on the filesystem of each backup path.
    #[arg(long, short = 'x')]
    pub one_file_system: bool,
    /// Tag the snapshot (repeatable).
    #[arg(long)]
    pub tag: Vec<String>,
    /// Host name recorded in the snapshot (default: this machine's).
    #[arg(long)]
    pub host: Option<String>,
}

#[derive(Debug, Args)]
pub struct BackupLocalArgs {
    /// Files and directories to back up.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Compare against this snapshot instead of the latest of the same host and paths.
    #[arg(long, conflicts_with = "force")]
    pub parent: Option<String>,
    /// Read every file, ignoring the parent snapshot.
    #[arg(long)]
    pub force: bool,
    /// File-reading threads (default: twice the number of CPUs, at least 4).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Debug, Clone, Args)]
pub struct PullArgs {
    /// The host to pull, by its name in the configuration.
    #[arg(
        value_name = "HOST",
        required_unless_present_any = ["local", "all"],
        conflicts_with_all = ["local", "all"]
    )]
    pub name: Option<String>,
    /// Pull every host of the configuration, one after the other (for cron).
    #[arg(long, conflicts_with = "local")]
    pub all: bool,
    /// Back up these paths of this machine through a local haul-agent.
    #[arg(long = "local", num_args = 1..)]
    pub local: Vec<PathBuf>,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Read every file, ignoring the parent snapshot.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

/// How a run finds its agent and how long it waits for it.
#[derive(Debug, Args, Clone, Default)]
pub struct RunArgs {
    /// The haul-agent binary (default: beside haul-pbs, else on $PATH).
    #[arg(long, env = "HAUL_AGENT")]
    pub agent: Option<PathBuf>,
    /// Stop the run when its agent prints nothing and sends no request for this long
    /// (default: the configuration's `[server].stall_timeout`, else 10 minutes).
    #[arg(long, value_parser = parse_duration)]
    pub stall_timeout: Option<std::time::Duration>,
    /// Cut a request of the agent that makes no progress for this long (its head, its
    /// body, or the reading of its answer) (default: `[server].request_timeout`, else 60 s).
    #[arg(long, value_parser = parse_duration)]
    pub request_timeout: Option<std::time::Duration>,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The host whose snapshot is pushed, by its name in the configuration.
    #[arg(value_name = "HOST")]
    pub host: String,
    /// Only to this clone (default: every clone that receives the host).
    #[arg(long, value_name = "NAME")]
    pub clone: Option<String>,
    /// The snapshot: an id or unique prefix of the host's (default: its newest).
    #[arg(long, value_name = "ID", default_value = "latest")]
    pub snapshot: String,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Args)]
pub struct ImportRdiffArgs {
    /// The rdiff-backup repository: the mirror directory holding rdiff-backup-data.
    pub dir: PathBuf,
    /// The host the snapshots belong to (default: this machine's name).
    #[arg(long)]
    pub host: Option<String>,
    /// The path on that host the rdiff-backup tree is a backup of.
    #[arg(long, default_value = "/")]
    pub path: String,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Log JSON lines instead of human-readable ones (stderr either way; nothing goes
    /// to stdout).
    #[arg(long, env = "HAUL_LOG_JSON")]
    pub log_json: bool,
    /// On SIGTERM, how long running pulls may take to finish before they are stopped
    /// and recorded as failed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub grace: std::time::Duration,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    haul_config::parse_duration(s)
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Read and check the configuration: the problems, or a summary of what it holds.
    Check,
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    /// Only runs of this host.
    #[arg(long)]
    pub host: Option<String>,
    /// Only the last N runs.
    #[arg(long)]
    pub last: Option<usize>,
}

#[derive(Debug, Args)]
pub struct StatusCredentialsArgs {
    /// The user name for HTTP Basic authentication.
    #[arg(required_unless_present = "token", conflicts_with = "token")]
    pub user: Option<String>,
    /// Make a bearer token instead (for a scraper such as Prometheus).
    #[arg(long)]
    pub token: bool,
}

#[derive(Debug, Args)]
pub struct SshSetupArgs {
    /// The host, or a clone, by its name in the configuration.
    pub host: String,
    /// Where haul-wrapper is installed on the host (the package's place by default).
    #[arg(long, default_value = "/usr/bin/haul-wrapper")]
    pub wrapper: PathBuf,
    /// Where haul-agent is installed on the host (the package's place by default).
    #[arg(long, default_value = "/usr/bin/haul-agent")]
    pub agent: PathBuf,
    /// This server's address as the host sees it, for the key's `from=` (default: the
    /// address this machine's traffic to the host leaves from).
    #[arg(long)]
    pub from: Option<String>,
    /// The host's configuration directory: the wrapper's policy goes in DIR/haul, the
    /// socket directory's entry in DIR/tmpfiles.d, the sshd settings in
    /// DIR/ssh/sshd_config.d.
    #[arg(long, default_value = "/etc")]
    pub etc: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServeMode {
    AppendOnly,
    ReadOnly,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The Unix socket to listen on (its directory is created 0700 if missing).
    #[arg(long)]
    pub socket: PathBuf,
    #[arg(long, value_enum)]
    pub mode: ServeMode,
    /// Accept sessions of this host only.
    #[arg(long)]
    pub host: Option<String>,
    /// Read-only: stream this snapshot only (an id or unique prefix).
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Read-only: a client may name chunks of this snapshot as the bases of deltas
    /// (`POST /v1/restore/deltas`): one it was pushed before (repeatable).
    #[arg(long = "delta-base", value_name = "SNAPSHOT")]
    pub delta_bases: Vec<String>,
    /// A client that sends nothing for this long in the middle of a request (its head
    /// or its body), or reads nothing of an answer, is cut off; an idle connection is
    /// closed after it too.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub request_timeout: std::time::Duration,
    /// On SIGTERM, connections still open this long are closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub grace: std::time::Duration,
    /// Append-only: let a session build on any content of the repository, not only on
    /// its host's own history (for hosts that trust each other; see README, Security).
    #[arg(long)]
    pub cross_host_dedup: bool,
}

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// Take snapshots of this host only (repeatable; default: of any host).
    #[arg(long = "host", value_name = "HOST")]
    pub hosts: Vec<String>,
    /// Let a copy build on any content of the repository, not only on its host's
    /// copies (when the sender may know what other hosts stored here).
    #[arg(long)]
    pub cross_host_dedup: bool,
    /// A sender that sends nothing for this long in the middle of a request, or reads
    /// nothing of an answer, is cut off; an idle one too.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub request_timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    #[command(flatten)]
    pub filter: SnapshotFilter,
}

/// Which snapshots a command considers: also what `latest` is the newest of. A host
/// named here that the configuration knows is looked for in that host's repository.
#[derive(Debug, Clone, Default, Args)]
pub struct SnapshotFilter {
    /// Only snapshots of this host.
    #[arg(long)]
    pub host: Option<String>,
    /// Only snapshots with this path among their paths (repeatable: all of them).
    #[arg(long = "path")]
    pub paths: Vec<String>,
    /// Only snapshots with this tag (repeatable: all of them).
    #[arg(long)]
    pub tag: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The older snapshot: an id or unique prefix, `latest`, or `HOST:latest`.
    pub first: String,
    /// The newer snapshot.
    pub second: String,
    /// Compare only below this path inside the snapshots.
    pub path: Option<String>,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// An existing directory to mount on.
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub filter: SnapshotFilter,
    /// Let users other than the one mounting in (needs `user_allow_other` in
    /// /etc/fuse.conf unless mounting as root); the recorded permissions still apply.
    #[arg(long)]
    pub allow_other: bool,
    /// Do not check the recorded permissions: with --allow-other, every user reads
    /// every file.
    #[arg(long)]
    pub no_default_permissions: bool,
    /// Memory for decrypted chunks, in MiB.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    pub cache_mib: usize,
}

#[derive(Debug, Args)]
pub struct DumpArgs {
    /// Snapshot: an id (or unique prefix), `latest` (the newest that the filters
    /// select), or `HOST:latest`.
    pub snapshot: String,
    /// The file or directory inside the snapshot (`/`: all of it, as a tar).
    pub path: String,
    #[command(flatten)]
    pub filter: SnapshotFilter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatsMode {
    /// What restores of the snapshots would write, added up.
    RestoreSize,
    /// The distinct blobs the snapshots use, once each, plain and stored.
    RawData,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Snapshots (ids, prefixes, `latest`, `HOST:latest`); default: every snapshot the
    /// filters select.
    pub snapshots: Vec<String>,
    #[command(flatten)]
    pub filter: SnapshotFilter,
    #[arg(long, value_enum, default_value = "restore-size")]
    pub mode: StatsMode,
}

#[derive(Debug, Args)]
pub struct FindArgs {
    /// Glob patterns matched against entry names (`*.conf`, `id_?sa`); an entry that
    /// matches any is listed.
    #[arg(required = true)]
    pub patterns: Vec<String>,
    #[command(flatten)]
    pub filter: SnapshotFilter,
    /// Search only the newest N snapshots the filters select.
    #[arg(long)]
    pub newest: Option<usize>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Snapshot: an id (or unique prefix), `latest` (the newest that the filters
    /// select), or `HOST:latest`.
    pub snapshot: String,
    #[command(flatten)]
    pub filter: SnapshotFilter,
    /// List only below this path inside the snapshot.
    pub path: Option<String>,
    /// List only the named directory's entries, not everything below it.
    #[arg(long)]
    pub no_recursive: bool,
    /// Mode, owner, size and mtime before each path (and a symlink's target after
    /// it), as `ls -l`.
    #[arg(long, short = 'l')]
    pub long: bool,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot: an id (or unique prefix), `latest` (the newest that the filters
    /// select), or `HOST:latest`.
    pub snapshot: String,
    #[command(flatten)]
    pub filter: SnapshotFilter,
    /// Directory to restore into: must not exist or be empty, unless --overwrite.
    #[arg(long, short = 't')]
    pub target: PathBuf,
    /// Restore into a directory that is not empty: overwrite the entries that differ
    /// from the snapshot in content or metadata (`if-changed`: size and mtime tell a
    /// file's content, and unchanged files are not touched), every entry of the
    /// snapshot (`always`), or none (`never`: only missing entries are added). What the
    /// directory holds beyond the snapshot stays. On this machine only.
    #[arg(long, value_name = "MODE", conflicts_with_all = ["via_agent", "to_host"])]
    pub overwrite: Option<haul_protocol::in_place::Overwrite>,
    /// Restore only this path of the snapshot and what is below it (repeatable).
    #[arg(long, short = 'i')]
    pub include: Vec<String>,
    /// Do not restore entries whose path in the snapshot, or whose name, matches this
    /// glob (repeatable; as a backup's --exclude).
    #[arg(long, short = 'e')]
    pub exclude: Vec<String>,
    /// Writing threads (default: four per CPU, 4 to 16: a writer mostly waits in the
    /// kernel).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Restore through a read-only server and a haul-agent, as a clone host would.
    #[arg(long)]
    pub via_agent: bool,
    /// Restore onto this host (by its name in the configuration) over SSH, through a
    /// read-only tunnel and the host's haul-wrapper (whose policy must list the
    /// target's directory in `restore_targets`). The target is a path on that host.
    #[arg(long, value_name = "HOST")]
    pub to_host: Option<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// Snapshots to remove (ids or unique prefixes), instead of a policy.
    #[arg(conflicts_with_all = ["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"])]
    pub snapshots: Vec<String>,
    #[command(flatten)]
    pub filter: SnapshotFilter,
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest snapshot of each of the last N days that have one.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the last N ISO weeks that have one.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the last N months that have one.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest snapshot of each of the last N years that have one.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Say what would be removed, remove nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The repository to copy into (it must exist: `haul-pbs --repo LOCATION init`):
    /// a directory, or s3:https://HOST[:PORT]/BUCKET/PREFIX.
    #[arg(long, value_name = "LOCATION")]
    pub to: String,
    /// File holding the target repository's passphrase (else $HAUL_TO_PASSWORD, or a
    /// prompt).
    #[arg(long, env = "HAUL_TO_PASSWORD_FILE")]
    pub to_password_file: Option<PathBuf>,
    /// Only these snapshots (ids or unique prefixes; repeatable). Default: all that
    /// match the filter.
    #[arg(long = "snapshot", value_name = "ID")]
    pub snapshots: Vec<String>,
    #[command(flatten)]
    pub filter: SnapshotFilter,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// How much unused data may stay: a share of the used data (`5%`, the default),
    /// a size (`2G`, `500MiB`), or `unlimited` (delete only packs that hold nothing
    /// used; repack nothing for its unused share).
    #[arg(long, default_value = "5%", value_parser = parse_max_unused)]
    pub max_unused: haul_repo::prune::MaxUnused,
    /// Rewrite at most this much used data into new packs (default: no limit).
    #[arg(long, value_parser = parse_size)]
    pub max_repack: Option<u64>,
    /// Also combine small packs into full-sized ones.
    #[arg(long)]
    pub repack_small: bool,
    /// Say what would be done, change nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// How long to wait for pulls that began before the condemnation before deleting
    /// its packs; after that they are left for the next prune.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub max_wait: std::time::Duration,
}

/// `5%`, a size, or `unlimited`.
fn parse_max_unused(s: &str) -> Result<haul_repo::prune::MaxUnused, String> {
    use haul_repo::prune::MaxUnused;
    let s = s.trim();
    if s == "unlimited" {
        return Ok(MaxUnused::Unlimited);
    }
    if let Some(p) = s.strip_suffix('%') {
        return match p.trim().parse::<f64>() {
            Ok(v) if (0.0..=100.0).contains(&v) => Ok(MaxUnused::Percent(v)),
            _ => Err(format!("{s:?} is not a percentage from 0% to 100%")),
        };
    }
    parse_size(s).map(MaxUnused::Bytes)
}

/// A size: a number with an optional unit (`K`, `M`, `G`, `T`, each of 1024 of the
/// one before, also written `KiB` or `KB`; `B` or none: bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("{s:?} is not a size; use e.g. 500M, 2G or 1T")),
    };
    match number.parse::<f64>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok((v * (1u64 << shift) as f64) as u64),
        _ => Err(format!("{s:?} is not a size; use e.g. 500M, 2G or 1T")),
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Also read, decrypt, decompress and re-hash every blob.
    #[arg(long)]
    pub read_data: bool,
    /// Read only part of the packs whole: N/M (part N of M: parts 1 to M together read
    /// every pack once) or P% (that share, drawn at random). Implies --read-data.
    #[arg(long, value_name = "N/M|P%", value_parser = parse_subset)]
    pub read_data_subset: Option<haul_repo::check::Subset>,
    /// Stop reading packs whole after this long (`30m`, `2h`); their headers are still
    /// checked, and the report says how many were left. Implies --read-data.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_duration: Option<std::time::Duration>,
}

fn parse_location(text: &str) -> Result<Location, String> {
    Location::parse(text).map_err(|e| e.to_string())
}

fn parse_subset(text: &str) -> Result<haul_repo::check::Subset, String> {
    haul_repo::check::Subset::parse(text)
}
