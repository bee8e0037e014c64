//! `haul-agent`: runs on a source host (backup) or a clone host (restore), driven by
//! the pbs through an SSH forced command, or as a child of `haul-pbs pull --local`.
//! It holds no key and links no crypto or pack code: it walks, chunks, hashes and
//! compresses with `haul-protocol`, and talks to the pbs's repository server over a
//! Unix socket.
//!
//! Its command line, run parameters, output and exit codes are the shared types of
//! [`haul_protocol::agent`]: JSON lines on stdout (`progress` events about once a
//! second, `warning`s, then one `summary` or `error`), and a human progress line on
//! stderr when it is a terminal. Exit codes: 0 ok; 1 failed (nothing committed); 2 bad
//! usage; 3 done with warnings (a snapshot was committed, but some files could not be
//! read completely).

mod backup;
mod client;
mod failure;
mod help;
mod prefetch;
mod restore;
mod run;

pub use failure::Failure;
use haul_protocol::agent::{
    AgentCommand, AgentEvent, AgentExit, AgentProgress, ErrorCode, ErrorEvent, RunParams,
    WRAPPER_ENV,
};
use std::io::IsTerminal;

/// How a command ended.
pub enum Outcome {
    Ok,
    /// Finished, with problems already reported as warnings.
    Warnings,
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
    let result = command().and_then(|command| match command {
        AgentCommand::Backup(c) => run::backup(c),
        AgentCommand::Restore(c) => restore::run(c),
    });
    let exit = match result {
        Ok(Outcome::Ok) => AgentExit::Ok,
        Ok(Outcome::Warnings) => AgentExit::Warnings,
        Err(f) => {
            eprintln!("haul-agent: {}", f.message);
            let exit = f.code.exit();
            event(&AgentEvent::Error(ErrorEvent {
                message: f.message,
                code: f.code,
            }));
            exit
        }
    };
    std::process::exit(exit.code());
}

/// The command line, read by the parser the wrapper uses too. `--help` and `--version`
/// are not part of that grammar (the wrapper must not admit them), so they show up as
/// its refusals and are handed to [`help`], which prints and exits.
fn command() -> Result<AgentCommand, Failure> {
    let words = std::env::args_os()
        .skip(1)
        .map(|w| {
            w.into_string().map_err(|w| {
                Failure::usage(format!(
                    "argument {w:?} is not UTF-8: the agent's command line is text, as in an SSH command"
                ))
            })
        })
        .collect::<Result<Vec<String>, Failure>>()?;
    AgentCommand::parse(words.iter().cloned()).map_err(|e| {
        if help::asked(&e) {
            help::show(&words);
        }
        Failure::usage(format!("{e} (see haul-agent --help)"))
    })
}

/// Reads the run parameters from the first line of stdin (an empty line gives the
/// defaults), and refuses to go on when they require haul-wrapper and it is absent.
///
/// Over SSH the pbs always requires it: without it, the key the pbs logs in with has
/// no forced command and runs whatever it is given, so the host's sshd, not haul,
/// decides what that key may do. The agent stops before it touches a file; the pbs
/// reports the message. (A check for misconfiguration, not a security boundary: the
/// boundary is the forced command, which makes the wrapper run whatever the key asks.)
pub fn read_params<T: RunParams>() -> Result<T, Failure> {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| Failure::usage(format!("reading run parameters from stdin: {e}")))?;
    let params =
        T::from_line(&line).map_err(|e| Failure::usage(format!("run parameters on stdin: {e}")))?;
    if params.require_wrapper() && std::env::var_os(WRAPPER_ENV).is_none() {
        return Err(Failure::new(
            ErrorCode::WrapperRequired,
            "refusing to run: not started by haul-wrapper, so the SSH key this pbs logs in with has no forced command and can run any command on this host. In the authorized_keys file, put command=\"/usr/local/bin/haul-wrapper --policy /etc/haul/wrapper.toml\",restrict,port-forwarding before the key (`haul-pbs ssh-setup HOST` prints the whole line)",
        ));
    }
    Ok(params)
}

/// Prints one event line on stdout.
pub fn event(e: &AgentEvent) {
    use std::io::Write;
    let mut line = e.to_line();
    line.push('\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// A tokio runtime for the HTTP side; the walker and the restorer run on their own
/// threads and call into it.
pub fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| {
            Failure::new(
                ErrorCode::Internal,
                format!("cannot start the I/O runtime: {e}"),
            )
        })
}

/// Emits progress: a JSON line about once a second on stdout when stdout is not a
/// terminal, and a redrawn line on stderr when stderr is one.
pub struct Progress {
    _ticker: haul_protocol::Ticker,
}

impl Progress {
    pub fn start(
        json: impl Fn() -> AgentProgress + Send + 'static,
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
                    event(&AgentEvent::Progress(json()));
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
