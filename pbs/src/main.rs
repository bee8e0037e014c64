//! `haul-pbs`: parse the command line, install logging, run, map the outcome to an exit
//! code (see `error.rs` for the codes).

use clap::Parser;

fn main() {
    // SIGPIPE stays ignored (Rust's default): a pbs writing to an agent that died, or
    // answering a client that hung up, gets EPIPE and records the run, instead of
    // dying with no message and its markers left behind. Output never panics on a
    // closed stdout, and `haul-pbs ls latest | head` still ends quietly (output.rs).
    limit_malloc_arenas();
    let cli = haul_pbs::cli::Cli::parse();
    // The daemon logs what it does (info); commands only their problems (warn).
    let (level, json_log) = match &cli.command {
        haul_pbs::cli::Command::Daemon(a) => ("info", a.log_json),
        _ => ("warn", false),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HAUL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour only for a person at a terminal: not in supervisord's or journald's logs.
    use std::io::IsTerminal;
    let log = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .with_target(false);
    if json_log {
        log.json().init();
    } else {
        log.init();
    }
    let json = cli.global.json;
    let result = haul_pbs::run(cli);
    // Output that could not be written (other than to a reader that went away) fails
    // the command, unless it failed for a reason of its own.
    if let (Ok(()), Some(e)) = (&result, haul_pbs::output::stdout_error()) {
        haul_pbs::errln!("haul-pbs: {e}");
        std::process::exit(1);
    }
    if let Err(e) = result {
        if json {
            haul_pbs::output::json_line(
                &serde_json::json!({"type": "error", "message": e.to_string(), "exit_code": e.exit_code()}),
            );
        }
        haul_pbs::errln!("haul-pbs: {e}");
        std::process::exit(e.exit_code());
    }
}

/// One malloc arena for all threads. Every backup worker passes chunks of up to 8 MiB
/// through a few buffers; with glibc's default of one arena per thread, each arena
/// keeps its own freed buffers and peak memory grows by about 20 MiB per worker
/// (measured: 4 workers 195 MiB, one arena 115 MiB, no slower: the large allocations
/// are few, so the shared lock is not contended).
/// Four arenas with a fixed 4 MiB mmap threshold, which made the agent faster, made the
/// pbs slower (measured over SSH: more CPU in every round).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
