//! `haul-wrapper`: the SSH forced command on a source host. It reads
//! `SSH_ORIGINAL_COMMAND`, admits only the `haul-agent backup`/`restore` invocations its
//! policy file allows ([`policy::Policy::admit`]), and execs the agent with a clean
//! environment. It never runs a shell.
//!
//! Install it in the pbs key's line of `authorized_keys`:
//!
//! ```text
//! command="/usr/local/bin/haul-wrapper --policy /etc/haul/wrapper.toml",restrict,port-forwarding ssh-ed25519 AAAA... haul-pbs
//! ```
//!
//! Exit codes ([`WrapperExit`]): 126 the command was refused (one line on stderr says
//! what and why); 125 the policy file is missing or invalid; 127 the agent could not be
//! started; otherwise the agent's own.

mod policy;

use clap::Parser;
use haul_protocol::agent::{WrapperExit, WRAPPER_ENV};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "haul-wrapper",
    version,
    about = "The haul SSH forced command: admits only what its policy allows, then execs haul-agent"
)]
struct Cli {
    /// Policy file (TOML).
    #[arg(long, default_value = "/etc/haul/wrapper.toml")]
    policy: PathBuf,
    /// Check the policy file and print what it allows, then exit.
    #[arg(long)]
    check: bool,
    /// Print the manual page (roff) and exit (packaging).
    #[arg(long, hide = true)]
    man_page: bool,
}

fn main() {
    let cli = Cli::parse();
    if cli.man_page {
        use clap::CommandFactory;
        let mut out = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut out)
            .expect("rendering to memory");
        use std::io::Write;
        let _ = std::io::stdout().write_all(&out);
        return;
    }
    let file = cli.policy.display().to_string();
    let policy = match std::fs::read_to_string(&cli.policy)
        .map_err(|e| policy::PolicyError(format!("policy {file}: {e}")))
        .and_then(|text| policy::Policy::parse(&text, &file))
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("haul-wrapper: {e}; fix the policy file (nothing was run)");
            std::process::exit(WrapperExit::PolicyInvalid.code());
        }
    };
    if cli.check {
        println!(
            "policy {file} is valid: runs {}, sockets in {}, backups of {}, restores into {}",
            policy.agent.display(),
            policy.socket_dir.display(),
            list(&policy.backup_roots),
            if policy.restore_targets.is_empty() {
                "nothing (restores refused)".into()
            } else {
                list(&policy.restore_targets)
            }
        );
        if !policy.import_command.is_empty() {
            println!(
                "after a standby push it runs: {}",
                policy.import_command.join(" ")
            );
        }
        return;
    }
    let Some(requested) = std::env::var_os("SSH_ORIGINAL_COMMAND") else {
        refuse(
            "(none)",
            "no SSH_ORIGINAL_COMMAND: haul-wrapper runs as an SSH forced command",
        );
    };
    let Some(requested) = requested.to_str() else {
        refuse("(not UTF-8)", "the command is not valid UTF-8");
    };
    let args = match policy
        .admit(requested)
        .and_then(|a| policy.confine(&a).map(|()| a))
    {
        Ok(args) => args,
        Err(denied) => refuse(requested, &denied.0),
    };
    let socket = args
        .iter()
        .position(|a| a == "--socket")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let removed = remove_stale_sockets(&policy.socket_dir, socket.as_deref());
    if removed > 0 {
        eprintln!(
            "haul-wrapper: removed {removed} socket(s) of earlier runs from {}",
            policy.socket_dir.display()
        );
    }
    eprintln!(
        "haul-wrapper: running {} {}",
        policy.agent.display(),
        args.join(" ")
    );
    let err = std::process::Command::new(&policy.agent)
        .arg0("haul-agent")
        .args(&args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C.UTF-8")
        // Tells the agent it runs under the wrapper (see `RunParams::require_wrapper`).
        .env(WRAPPER_ENV, &file)
        .exec();
    eprintln!(
        "haul-wrapper: cannot run the agent {}: {err}; check `agent` in {file}",
        policy.agent.display()
    );
    std::process::exit(WrapperExit::AgentNotStarted.code());
}

/// A socket file this old that nobody listens on is left by a run that ended (sshd
/// does not remove the sockets of its forwards).
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// The paths of the Unix sockets bound on this machine (`/proc/net/unix`), or none if
/// that cannot be read.
fn bound_sockets() -> Option<std::collections::HashSet<PathBuf>> {
    let text = std::fs::read_to_string("/proc/net/unix").ok()?;
    Some(
        text.lines()
            .skip(1)
            // Num RefCount Protocol Flags Type St Inode Path: the path is the eighth.
            .filter_map(|l| l.split_whitespace().nth(7))
            .map(PathBuf::from)
            .collect(),
    )
}

/// Removes the `*.sock` files in `dir` (the runs' sockets) that no socket is bound to
/// any more (`/proc/net/unix`: nothing is connected to find out) and that are older
/// than [`STALE_AFTER`] (a socket being set up for a run that starts now is younger),
/// except `current`; returns how many. Errors are ignored: what is left is tried again
/// by the next run.
fn remove_stale_sockets(dir: &std::path::Path, current: Option<&std::path::Path>) -> usize {
    use std::os::unix::fs::FileTypeExt;
    let Some(bound) = bound_sockets() else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let path = e.path();
        let Ok(meta) = e.metadata() else { continue };
        let old = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > STALE_AFTER);
        if !meta.file_type().is_socket()
            || path.extension().is_none_or(|x| x != "sock")
            || Some(path.as_path()) == current
            || !old
        {
            continue;
        }
        if !bound.contains(&path) && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn refuse(requested: &str, why: &str) -> ! {
    let shown: String = requested.chars().take(200).collect();
    eprintln!("haul-wrapper: refused {shown:?}: {why}");
    std::process::exit(WrapperExit::Refused.code());
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
