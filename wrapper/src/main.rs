//! `haul-wrapper`: the SSH forced command on a source host. It will read
//! `SSH_ORIGINAL_COMMAND`, admit only the `haul-agent` invocations its policy file
//! allows, and exec the agent with a clean environment (issue 4). Until then it refuses
//! everything, which is the safe default for a forced command.

use clap::Parser;
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
}

fn main() {
    let cli = Cli::parse();
    let requested = std::env::var("SSH_ORIGINAL_COMMAND").unwrap_or_default();
    eprintln!(
        "haul-wrapper: refused {requested:?}: this build has no command policy yet (policy file {} not read)",
        cli.policy.display()
    );
    std::process::exit(126);
}
