//! `haul-pbs`, the backup server: the commands an operator runs on it.
//!
//! `main.rs` parses the command line and maps errors to exit codes; this library holds
//! the commands so tests can drive them too.

pub mod agent;
pub mod cli;
pub mod commands;
pub mod copy_remote;
pub mod daemon;
pub mod error;
pub mod feed;
pub mod history;
pub mod notify;
pub mod output;
pub mod password;
pub mod pipeline;
pub mod plan;
pub mod record;
pub mod repos;
pub mod server;
pub mod site;
pub mod transport;

pub use error::CliError;

use cli::{Cli, Command, KeyCommand};

/// Runs one command.
pub fn run(cli: Cli) -> Result<(), CliError> {
    if let (true, Some(name)) = (cli.global.no_lock, cli.command.writes()) {
        return Err(CliError::usage(format!(
            "--no-lock is only for commands that read the repository (snapshots, ls, restore, check, key list, repair --dry-run): `{name}` changes it and must hold a lock; run it without --no-lock"
        )));
    }
    let ctx = commands::Context::new(cli.global);
    match cli.command {
        Command::Init(a) => commands::admin::init(&ctx, a),
        Command::Key(KeyCommand::Add { new_password_file }) => {
            commands::admin::key_add(&ctx, new_password_file)
        }
        Command::Key(KeyCommand::List) => commands::admin::key_list(&ctx),
        Command::Key(KeyCommand::Remove { id }) => commands::admin::key_remove(&ctx, &id),
        Command::BackupLocal(a) => commands::backup::backup_local(&ctx, a),
        Command::Snapshots(a) => commands::browse::snapshots(&ctx, a),
        Command::Ls(a) => commands::browse::ls(&ctx, a),
        Command::Diff(a) => commands::compare::diff(&ctx, a),
        Command::Find(a) => commands::compare::find(&ctx, a),
        Command::Dump(a) => commands::dump::dump(&ctx, a),
        Command::Stats(a) => commands::stats::stats(&ctx, a),
        Command::Mount(a) => commands::mount::mount(&ctx, a),
        Command::Restore(a) => commands::restore::restore(&ctx, a),
        Command::Check(a) => commands::check::check(&ctx, a),
        Command::Pull(a) => commands::pull::pull(&ctx, a),
        Command::Push(a) => commands::push::push(&ctx, a),
        Command::Serve(a) => commands::serve::serve(&ctx, a),
        Command::Receive(a) => commands::receive::receive(&ctx, a),
        Command::SshSetup(a) => commands::setup::ssh_setup(&ctx, a),
        Command::StatusCredentials(a) => daemon::auth::credentials_line(a),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cli::Cli::command(), "haul-pbs", &mut out);
            output::write_bytes(&out);
            Ok(())
        }
        Command::ManPages { dir } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(&dir)
                .and_then(|()| clap_mangen::generate_to(cli::Cli::command(), &dir))
                .map_err(|e| error::CliError::Io(format!("manual pages in {}", dir.display()), e))
        }
        Command::Runs(a) => commands::pull::runs(&ctx, a),
        Command::Config(cli::ConfigCommand::Check) => commands::pull::config_check(&ctx),
        Command::Unlock { all } => commands::admin::unlock(&ctx, all),
        Command::Daemon(a) => daemon::daemon(&ctx, a),
        Command::ImportRdiff(a) => commands::import::import_rdiff(&ctx, a),
        Command::Forget(a) => commands::forget::forget(&ctx, a),
        Command::Prune(a) => commands::prune::prune(&ctx, a),
        Command::Copy(a) => commands::copy::copy(&ctx, a),
        Command::Repair(c) => commands::repair::repair(&ctx, c),
    }
}
