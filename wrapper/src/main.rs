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
}

fn main() {
    let cli = Cli::parse();
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
