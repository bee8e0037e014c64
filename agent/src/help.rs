//! `haul-agent --help` and `--version`. The flags and their help come from the tables
//! of [`haul_protocol::agent::args`] that the parser reads, so help cannot drift from
//! what is parsed; clap only renders them.

use clap::{Arg, ArgAction, Command};
use haul_protocol::agent::args::{Arity, SUBCOMMANDS};
use haul_protocol::agent::CommandError;

/// Whether the refusal `e` is a request for help or the version.
pub fn asked(e: &CommandError) -> bool {
    match e {
        CommandError::NoCommand => true,
        CommandError::UnknownCommand(word) => {
            matches!(word.as_str(), "help" | "--help" | "-h" | "--version" | "-V")
        }
        CommandError::UnknownFlag { word, .. } => matches!(word.as_str(), "--help" | "-h"),
        _ => false,
    }
}

/// Prints the help or the version that `words` ask for, and exits as clap does (0; 2
/// for no words at all).
pub fn show(words: &[String]) -> ! {
    let words = std::iter::once("haul-agent").chain(words.iter().map(String::as_str));
    match command().try_get_matches_from(words) {
        Err(e) => e.exit(),
        // Only a request for help gets here, and clap answers it with an "error".
        Ok(_) => unreachable!("help was asked for"),
    }
}

fn command() -> Command {
    let mut command = Command::new("haul-agent")
        .version(env!("CARGO_PKG_VERSION"))
        .about("The haul agent: walks, chunks and uploads a source host's files to the pbs; restores snapshots")
        .long_about(
            "The haul agent runs on a source host (backup) or a clone host (restore), started by the \
             pbs (through haul-wrapper over SSH). It holds no key: the pbs encrypts.",
        )
        .subcommand_required(true)
        .arg_required_else_help(true);
    for sub in SUBCOMMANDS {
        let mut c = Command::new(sub.name).about(sub.about);
        for flag in sub.flags {
            let long = flag.name.trim_start_matches('-');
            let arg = Arg::new(long).long(long).help(flag.help);
            c = c.arg(match flag.arity {
                Arity::Switch => arg.action(ArgAction::SetTrue),
                Arity::Once { required } => arg
                    .value_name(flag.value)
                    .required(required)
                    .action(ArgAction::Set),
                Arity::Many { required } => arg
                    .value_name(flag.value)
                    .required(required)
                    .action(ArgAction::Append),
            });
        }
        command = command.subcommand(c);
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;
    use haul_protocol::agent::AgentCommand;

    #[test]
    fn help_lists_every_flag_the_parser_takes() {
        let mut c = command();
        c.build();
        for sub in SUBCOMMANDS {
            let help = c
                .find_subcommand_mut(sub.name)
                .unwrap()
                .render_help()
                .to_string();
            for flag in sub.flags {
                assert!(help.contains(flag.name), "{} lacks {}", sub.name, flag.name);
            }
        }
        let e = command()
            .try_get_matches_from(["haul-agent", "--version"])
            .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
    }

    #[test]
    fn only_requests_for_help_are_taken_for_them() {
        let parse = |line: &str| AgentCommand::parse(line.split_whitespace()).unwrap_err();
        for asking in [
            "",
            "--help",
            "-h",
            "help",
            "--version",
            "-V",
            "backup --help",
            "restore --socket s -h",
        ] {
            assert!(asked(&parse(asking)), "{asking:?}");
        }
        for not in [
            "serve",
            "backup --bogus",
            "backup --socket s",
            "backup --path --help",
        ] {
            assert!(!asked(&parse(not)), "{not:?}");
        }
    }
}
