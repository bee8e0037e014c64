//! `haul-agent`: runs on a source host (backup) or a clone host (restore), driven by
//! the pbs through an SSH forced command, or as a child of `haul-pbs pull --local`.
//! It holds no key and links no crypto or pack code: it walks, chunks, hashes and
//! compresses with `haul-protocol`, and talks to the pbs's repository server over a
//! Unix socket.
//!
//! Output: JSON lines on stdout (`progress` events about once a second, `warning`s,
//! then one `summary` or `error`); a human progress line on stderr when it is a
//! terminal. Exit codes: 0 ok; 1 failed (nothing committed); 2 bad usage; 3 done with
//! warnings (a snapshot was committed, but some files could not be read completely).

mod backup;
mod client;
mod prefetch;
mod restore;

use clap::{Args, Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "haul-agent",
    version,
    about = "The haul agent: walks, chunks and uploads a source host's files to the pbs; restores snapshots",
    long_about = "The haul agent runs on a source host (backup) or a clone host (restore), started by the \
                  pbs (through haul-wrapper over SSH). It holds no key: the pbs encrypts."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Back up paths into the repository server listening on --socket.
    Backup(BackupArgs),
    /// Restore a snapshot from the read-only server listening on --socket.
    Restore(RestoreArgs),
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The repository server's Unix socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// A path to back up (repeat for several).
    #[arg(long = "path", required = true)]
    pub paths: Vec<PathBuf>,
    /// Leave out entries matching this glob pattern (matched against the full path and the name).
    #[arg(long)]
    pub exclude: Vec<String>,
    /// Leave out the contents of directories holding a valid CACHEDIR.TAG.
    #[arg(long)]
    pub exclude_caches: bool,
    /// Stay on the filesystem of each backup path.
    #[arg(long)]
    pub one_file_system: bool,
    /// Read run parameters (host, tags, parent) as one JSON line from stdin.
    #[arg(long)]
    pub params_stdin: bool,
    /// Host name to record (default: this machine's).
    #[arg(long)]
    pub host: Option<String>,
    /// Tag the snapshot (repeat for several).
    #[arg(long)]
    pub tag: Vec<String>,
    /// Parent snapshot for change detection: `latest`, `none`, or an id.
    #[arg(long)]
    pub parent: Option<String>,
    /// File-reading threads (default: the number of CPUs, at least 2: the walker reads
    /// ahead of them, and each costs a chunk buffer).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The read-only repository server's Unix socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// Snapshot id (or unique prefix) or `latest`.
    #[arg(long)]
    pub snapshot: String,
    /// A new or empty directory to restore into.
    #[arg(long)]
    pub target: PathBuf,
    /// Restore only this path of the snapshot (repeat for several).
    #[arg(long)]
    pub include: Vec<String>,
    /// Writer threads (default: four per CPU, 4 to 16: a writer mostly waits in the
    /// kernel).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Read run parameters as one JSON line from stdin.
    #[arg(long)]
    pub params_stdin: bool,
}

/// How a command ended.
pub enum Outcome {
    Ok,
    /// Finished, with problems already reported as warnings.
    Warnings,
}

/// A failure: the message, and whether it was the user's input.
pub struct Failure {
    pub message: String,
    pub usage: bool,
}

impl Failure {
    pub fn usage(m: impl Into<String>) -> Self {
        Failure {
            message: m.into(),
            usage: true,
        }
    }
    pub fn run(m: impl std::fmt::Display) -> Self {
        Failure {
            message: m.to_string(),
            usage: false,
        }
    }
}

fn main() {
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Four malloc arenas and a fixed 4 MiB mmap threshold. With one arena (as before)
    // the readers, the walker, the prefetchers and the uploader queued on its lock, and
    // a lock holder preempted by sshd stalled the rest: a pull over SSH spent about a
    // tenth longer. glibc raises its mmap threshold to the largest buffer freed (8 MiB
    // chunks), after which each arena would keep such buffers; fixed at 4 MiB, the rare
    // larger buffers are mapped and returned, and peak memory stays below that of one
    // arena (measured: 47-48 MiB against 50-55 MiB).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 4);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Backup(a) => backup_main(a),
        Command::Restore(a) => restore::run(a),
    };
    let code = match result {
        Ok(Outcome::Ok) => 0,
        Ok(Outcome::Warnings) => 3,
        Err(f) => {
            event(&serde_json::json!({"type": "error", "message": f.message}));
            eprintln!("haul-agent: {}", f.message);
            if f.usage {
                2
            } else {
                1
            }
        }
    };
    std::process::exit(code);
}

fn backup_main(a: BackupArgs) -> Result<Outcome, Failure> {
    run::backup(a)
}

/// Set by haul-wrapper in the agent's environment (to its policy file).
pub const WRAPPER_ENV: &str = "HAUL_WRAPPER";

/// Reads the run parameters from the first line of stdin (an empty line gives the
/// defaults), and refuses to go on when they require haul-wrapper and it is absent.
///
/// Over SSH the pbs always requires it: without it, the key the pbs logs in with has
/// no forced command and runs whatever it is given, so the host's sshd, not haul,
/// decides what that key may do. The agent stops before it touches a file; the pbs
/// reports the message. (A check for misconfiguration, not a security boundary: the
/// boundary is the forced command, which makes the wrapper run whatever the key asks.)
pub fn read_params<T: serde::de::DeserializeOwned + Default + RequiresWrapper>(
) -> Result<T, Failure> {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| Failure::usage(format!("reading run parameters from stdin: {e}")))?;
    let params: T = if line.trim().is_empty() {
        T::default()
    } else {
        serde_json::from_str(&line)
            .map_err(|e| Failure::usage(format!("run parameters on stdin: {e}")))?
    };
    if params.requires_wrapper() && std::env::var_os(WRAPPER_ENV).is_none() {
        return Err(Failure::usage(
            "refusing to run: not started by haul-wrapper, so the SSH key this pbs logs in with has no forced command and can run any command on this host. In the authorized_keys file, put command=\"/usr/local/bin/haul-wrapper --policy /etc/haul/wrapper.toml\",restrict,port-forwarding before the key (`haul-pbs ssh-setup HOST` prints the whole line)",
        ));
    }
    Ok(params)
}

/// Run parameters that can demand the wrapper.
pub trait RequiresWrapper {
    fn requires_wrapper(&self) -> bool;
}

/// Prints one JSON event line on stdout.
pub fn event(v: &serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, v);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// A tokio runtime for the HTTP side; the walker and the restorer run on their own
/// threads and call into it.
pub fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Failure::run(format!("cannot start the I/O runtime: {e}")))
}

/// Emits progress: a JSON line about once a second on stdout when stdout is not a
/// terminal, and a redrawn line on stderr when stderr is one.
pub struct Progress {
    _ticker: haul_protocol::Ticker,
}

impl Progress {
    pub fn start(
        json: impl Fn() -> serde_json::Value + Send + 'static,
        human: impl Fn() -> String + Send + 'static,
    ) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let json_out = !std::io::stdout().is_terminal();
        let mut ticks = 0u32;
        let ticker = haul_protocol::Ticker::start(
            std::time::Duration::from_millis(200),
            move || {
                ticks += 1;
                if tty {
                    eprint!("\r\x1b[K{}", human());
                }
                if json_out && ticks.is_multiple_of(5) {
                    event(&json());
                }
            },
            move || {
                if tty {
                    eprint!("\r\x1b[K");
                }
            },
        );
        Progress { _ticker: ticker }
    }
}

mod run;
