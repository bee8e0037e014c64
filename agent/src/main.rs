//! `haul-agent`: runs on a source host (backup) or a clone host (restore), driven by
//! the pbs through an SSH forced command. It holds no key and links no crypto or pack
//! code: it walks, chunks, hashes and compresses with `haul-protocol`, and talks to the
//! pbs's ingest server over a forwarded Unix socket.
//!
//! The backup and restore subcommands arrive with the ingest server (issue 3); until
//! then the binary only describes itself.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "haul-agent",
    version,
    about = "The haul agent: walks, chunks and uploads a source host's files to the pbs; restores snapshots",
    long_about = "The haul agent runs on a source host (backup) or a clone host (restore), started by the \
                  pbs through haul-wrapper. It holds no key: the pbs encrypts. The backup and restore \
                  subcommands come with the ingest server.",
    arg_required_else_help = true
)]
struct Cli {
    /// Print the chunker defaults this agent was built with and exit.
    #[arg(long)]
    chunker_defaults: bool,
}

fn main() {
    let cli = Cli::parse();
    if cli.chunker_defaults {
        let p = haul_protocol::chunker::ChunkerParams::with_seed(0);
        println!("min {} avg {} max {}", p.min_size, p.avg_size, p.max_size);
    }
}
