//! The agent's command line: [`AgentCommand`], written by [`AgentCommand::to_args`] and
//! read by [`AgentCommand::parse`], the one parser both the wrapper and the agent use.
//!
//! The grammar is small on purpose, so that there is one reading of any command: a
//! subcommand, then flags from its table ([`BACKUP`], [`RESTORE`]), each written
//! `--name` and followed by its value as the next word, whatever that word is (no
//! `--name=value`, no short flags, no abbreviations, no positional words). A flag not in
//! the table, a single-valued flag given twice, a flag without its value and a missing
//! required flag are refused with a [`CommandError`] naming the flag.
//!
//! Paths are text, not `OsString`: the command line travels as the text of an SSH exec
//! request, and the pbs refuses a path that is not UTF-8 before it builds one.

use super::params::{BadSnapshot, Parent, SnapshotChoice};
use std::fmt;

/// A parsed agent command line (the words after `haul-agent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentCommand {
    Backup(BackupCommand),
    Restore(RestoreCommand),
}

/// `haul-agent backup`. Over SSH the wrapper admits only `socket`, `paths`,
/// `excludes` and the switches; host, tags and parent come in [`super::BackupParams`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupCommand {
    /// The repository server's Unix socket.
    pub socket: String,
    /// At least one.
    pub paths: Vec<String>,
    /// Glob patterns (`glob` crate syntax) matched against the full path and the name.
    pub excludes: Vec<String>,
    pub exclude_caches: bool,
    pub one_file_system: bool,
    /// Run parameters follow as one JSON line on stdin.
    pub params_stdin: bool,
    pub host: Option<String>,
    pub tags: Vec<String>,
    pub parent: Option<Parent>,
    pub threads: Option<u32>,
}

/// `haul-agent restore`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreCommand {
    /// The read-only repository server's Unix socket.
    pub socket: String,
    pub snapshot: SnapshotChoice,
    /// A new or empty directory.
    pub target: String,
    /// Paths of the snapshot to restore (none: all of it).
    pub includes: Vec<String>,
    /// Glob patterns: entries whose path in the snapshot, or whose name, matches one
    /// are not restored (as a backup's `--exclude`).
    pub excludes: Vec<String>,
    pub threads: Option<u32>,
    /// Run parameters follow as one JSON line on stdin.
    pub params_stdin: bool,
    /// Keep `target` as a standby copy: replace what it holds with the snapshot in one
    /// step, taking unchanged files and known chunks from what it held (see
    /// [`crate::standby`]).
    pub standby: bool,
    /// After a standby copy is replaced, run the import command.
    pub import: bool,
    /// The import command, as words (never from the pbs over SSH: the wrapper puts
    /// its policy's `import_command` here).
    pub import_command: Vec<String>,
}

/// How often a flag may be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arity {
    /// No value; at most once.
    Switch,
    /// One value, at most once (`required`: exactly once).
    Once { required: bool },
    /// One value each time, any number of times (`required`: at least once).
    Many { required: bool },
}

/// One flag of a subcommand, as the parser takes it and the agent's `--help` shows it.
#[derive(Debug, Clone, Copy)]
pub struct Flag {
    /// As written, dashes included.
    pub name: &'static str,
    /// The value's placeholder in help (empty for a switch).
    pub value: &'static str,
    pub arity: Arity,
    pub help: &'static str,
}

/// A subcommand and its flags.
#[derive(Debug)]
pub struct Subcommand {
    pub name: &'static str,
    pub about: &'static str,
    pub flags: &'static [Flag],
}

const fn flag(name: &'static str, value: &'static str, arity: Arity, help: &'static str) -> Flag {
    Flag {
        name,
        value,
        arity,
        help,
    }
}

const REQUIRED: Arity = Arity::Once { required: true };
const OPTIONAL: Arity = Arity::Once { required: false };
const ANY: Arity = Arity::Many { required: false };

pub const BACKUP: Subcommand = Subcommand {
    name: "backup",
    about: "Back up paths into the repository server listening on --socket",
    flags: &[
        flag("--socket", "SOCKET", REQUIRED, "The repository server's Unix socket"),
        flag(
            "--path",
            "PATH",
            Arity::Many { required: true },
            "A path to back up (repeat for several)",
        ),
        flag(
            "--exclude",
            "PATTERN",
            ANY,
            "Leave out entries matching this glob pattern (matched against the full path and the name)",
        ),
        flag(
            "--params-stdin",
            "",
            Arity::Switch,
            "Read run parameters (host, tags, parent) as one JSON line from stdin",
        ),
        flag(
            "--exclude-caches",
            "",
            Arity::Switch,
            "Leave out the contents of directories holding a valid CACHEDIR.TAG",
        ),
        flag(
            "--one-file-system",
            "",
            Arity::Switch,
            "Stay on the filesystem of each backup path",
        ),
        flag(
            "--host",
            "HOST",
            OPTIONAL,
            "Host name to record (default: this machine's)",
        ),
        flag("--tag", "TAG", ANY, "Tag the snapshot (repeat for several)"),
        flag(
            "--parent",
            "PARENT",
            OPTIONAL,
            "Parent snapshot for change detection: `latest` (default), `none`, or an id",
        ),
        flag(
            "--threads",
            "N",
            OPTIONAL,
            "File-reading threads (default: the number of CPUs, at least 2)",
        ),
    ],
};

pub const RESTORE: Subcommand = Subcommand {
    name: "restore",
    about: "Restore a snapshot from the read-only server listening on --socket",
    flags: &[
        flag(
            "--socket",
            "SOCKET",
            REQUIRED,
            "The read-only repository server's Unix socket",
        ),
        flag(
            "--snapshot",
            "SNAPSHOT",
            REQUIRED,
            "Snapshot id (or unique prefix) or `latest`",
        ),
        flag(
            "--target",
            "DIR",
            REQUIRED,
            "A new or empty directory to restore into",
        ),
        flag(
            "--include",
            "PATH",
            ANY,
            "Restore only this path of the snapshot (repeat for several)",
        ),
        flag(
            "--exclude",
            "PATTERN",
            ANY,
            "Leave out entries whose path or name matches this glob (repeat for several)",
        ),
        flag(
            "--threads",
            "N",
            OPTIONAL,
            "Writer threads (default: four per CPU, 4 to 16)",
        ),
        flag(
            "--params-stdin",
            "",
            Arity::Switch,
            "Read run parameters as one JSON line from stdin",
        ),
        flag(
            "--standby",
            "",
            Arity::Switch,
            "Keep the target as a standby copy: replace its contents with the snapshot in one step, reusing unchanged files and known chunks",
        ),
        flag(
            "--import",
            "",
            Arity::Switch,
            "After the standby copy is replaced, run the import command",
        ),
        flag(
            "--import-command",
            "WORD",
            ANY,
            "The import command, a word at a time (over SSH: the wrapper's policy, never the pbs)",
        ),
    ],
};

/// Every subcommand, in the order help lists them.
pub const SUBCOMMANDS: [&Subcommand; 2] = [&BACKUP, &RESTORE];

/// Why a command line was refused. Each says which word or flag is at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommandError {
    /// No words at all.
    NoCommand,
    /// The first word is not a subcommand.
    UnknownCommand(String),
    /// A word where a flag of `command` should be.
    UnknownFlag { command: &'static str, word: String },
    /// The command line ends where the flag's value should be.
    MissingValue { flag: &'static str },
    /// A flag that may be given once, given again.
    Repeated { flag: &'static str },
    /// A required flag is absent (`many`: one given at least once).
    Missing {
        command: &'static str,
        flag: &'static str,
        many: bool,
    },
    /// A value of the wrong form; `expected` is a noun phrase.
    BadValue {
        flag: &'static str,
        value: String,
        expected: &'static str,
    },
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::NoCommand => f.write_str("haul-agent needs backup or restore"),
            CommandError::UnknownCommand(word) => {
                write!(
                    f,
                    "haul-agent {word:?} is not a command (backup or restore)"
                )
            }
            CommandError::UnknownFlag { command, word } => {
                write!(f, "{word:?} is not an argument of haul-agent {command}")
            }
            CommandError::MissingValue { flag } => write!(f, "{flag} needs a value"),
            CommandError::Repeated { flag } => write!(f, "{flag} given twice"),
            CommandError::Missing {
                command,
                flag,
                many,
            } => {
                let least = if *many { "at least one " } else { "" };
                write!(f, "haul-agent {command} needs {least}{flag}")
            }
            CommandError::BadValue {
                flag,
                value,
                expected,
            } => write!(f, "{flag} {value:?} is not {expected}"),
        }
    }
}

impl std::error::Error for CommandError {}

impl AgentCommand {
    /// Parses the words after `haul-agent` by the grammar in the module doc.
    pub fn parse<I>(words: I) -> Result<AgentCommand, CommandError>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let mut words = words.into_iter().map(Into::into);
        let Some(name) = words.next() else {
            return Err(CommandError::NoCommand);
        };
        match name.as_str() {
            "backup" => {
                BackupCommand::from_found(Found::collect(&BACKUP, words)?).map(AgentCommand::Backup)
            }
            "restore" => RestoreCommand::from_found(Found::collect(&RESTORE, words)?)
                .map(AgentCommand::Restore),
            _ => Err(CommandError::UnknownCommand(name)),
        }
    }

    /// The words after `haul-agent`, subcommand first, flags in table order: what
    /// [`AgentCommand::parse`] reads back as `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Words(Vec::new());
        match self {
            AgentCommand::Backup(b) => {
                out.0.push(BACKUP.name.into());
                out.value("--socket", &b.socket);
                out.values("--path", &b.paths);
                out.values("--exclude", &b.excludes);
                out.switch("--params-stdin", b.params_stdin);
                out.switch("--exclude-caches", b.exclude_caches);
                out.switch("--one-file-system", b.one_file_system);
                if let Some(h) = &b.host {
                    out.value("--host", h);
                }
                out.values("--tag", &b.tags);
                if let Some(p) = &b.parent {
                    out.value("--parent", &p.to_string());
                }
                if let Some(t) = b.threads {
                    out.value("--threads", &t.to_string());
                }
            }
            AgentCommand::Restore(r) => {
                out.0.push(RESTORE.name.into());
                out.value("--socket", &r.socket);
                out.value("--snapshot", &r.snapshot.to_string());
                out.value("--target", &r.target);
                out.values("--include", &r.includes);
                out.values("--exclude", &r.excludes);
                if let Some(t) = r.threads {
                    out.value("--threads", &t.to_string());
                }
                out.switch("--params-stdin", r.params_stdin);
                out.switch("--standby", r.standby);
                out.switch("--import", r.import);
                out.values("--import-command", &r.import_command);
            }
        }
        out.0
    }
}

struct Words(Vec<String>);

impl Words {
    fn value(&mut self, flag: &str, value: &str) {
        self.0.extend([flag.to_string(), value.to_string()]);
    }
    fn values(&mut self, flag: &str, values: &[String]) {
        for v in values {
            self.value(flag, v);
        }
    }
    fn switch(&mut self, flag: &str, on: bool) {
        if on {
            self.0.push(flag.into());
        }
    }
}

/// The values given for each flag of one subcommand, checked against its table.
struct Found {
    command: &'static Subcommand,
    /// Parallel to the table; a switch given holds one empty value.
    values: Vec<Vec<String>>,
}

impl Found {
    fn collect(
        command: &'static Subcommand,
        mut words: impl Iterator<Item = String>,
    ) -> Result<Found, CommandError> {
        let mut values = vec![Vec::new(); command.flags.len()];
        while let Some(word) = words.next() {
            let Some(i) = command.flags.iter().position(|f| f.name == word) else {
                return Err(CommandError::UnknownFlag {
                    command: command.name,
                    word,
                });
            };
            let flag = &command.flags[i];
            let value = match flag.arity {
                Arity::Switch => String::new(),
                _ => words
                    .next()
                    .ok_or(CommandError::MissingValue { flag: flag.name })?,
            };
            if !matches!(flag.arity, Arity::Many { .. }) && !values[i].is_empty() {
                return Err(CommandError::Repeated { flag: flag.name });
            }
            values[i].push(value);
        }
        for (flag, given) in command.flags.iter().zip(&values) {
            let (required, many) = match flag.arity {
                Arity::Switch => (false, false),
                Arity::Once { required } => (required, false),
                Arity::Many { required } => (required, true),
            };
            if required && given.is_empty() {
                return Err(CommandError::Missing {
                    command: command.name,
                    flag: flag.name,
                    many,
                });
            }
        }
        Ok(Found { command, values })
    }

    fn all(&mut self, name: &str) -> Vec<String> {
        let i = self
            .command
            .flags
            .iter()
            .position(|f| f.name == name)
            .unwrap_or_else(|| panic!("{name} is not in the table of {}", self.command.name));
        std::mem::take(&mut self.values[i])
    }

    fn switch(&mut self, name: &str) -> bool {
        !self.all(name).is_empty()
    }

    fn optional(&mut self, name: &str) -> Option<String> {
        self.all(name).pop()
    }

    /// A required flag's value ([`Found::collect`] made sure it is there).
    fn required(&mut self, name: &str) -> String {
        self.optional(name).unwrap_or_default()
    }

    fn threads(&mut self) -> Result<Option<u32>, CommandError> {
        self.optional("--threads")
            .map(|v| {
                v.parse().map_err(|_| CommandError::BadValue {
                    flag: "--threads",
                    value: v,
                    expected: "a number",
                })
            })
            .transpose()
    }
}

fn bad_snapshot(flag: &'static str) -> impl FnOnce(BadSnapshot) -> CommandError {
    move |e| CommandError::BadValue {
        flag,
        value: e.value,
        expected: e.expected,
    }
}

impl BackupCommand {
    fn from_found(mut f: Found) -> Result<BackupCommand, CommandError> {
        Ok(BackupCommand {
            socket: f.required("--socket"),
            paths: f.all("--path"),
            excludes: f.all("--exclude"),
            exclude_caches: f.switch("--exclude-caches"),
            one_file_system: f.switch("--one-file-system"),
            params_stdin: f.switch("--params-stdin"),
            host: f.optional("--host"),
            tags: f.all("--tag"),
            parent: f
                .optional("--parent")
                .map(|p| p.parse().map_err(bad_snapshot("--parent")))
                .transpose()?,
            threads: f.threads()?,
        })
    }
}

impl RestoreCommand {
    fn from_found(mut f: Found) -> Result<RestoreCommand, CommandError> {
        Ok(RestoreCommand {
            socket: f.required("--socket"),
            snapshot: f
                .required("--snapshot")
                .parse()
                .map_err(bad_snapshot("--snapshot"))?,
            target: f.required("--target"),
            includes: f.all("--include"),
            excludes: f.all("--exclude"),
            threads: f.threads()?,
            params_stdin: f.switch("--params-stdin"),
            standby: f.switch("--standby"),
            import: f.switch("--import"),
            import_command: f.all("--import-command"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::SnapshotPrefix;
    use proptest::prelude::*;

    fn parse(line: &str) -> Result<AgentCommand, CommandError> {
        AgentCommand::parse(crate::command::split(line).unwrap())
    }

    fn refusal(line: &str) -> String {
        parse(line).unwrap_err().to_string()
    }

    #[test]
    fn parses_what_the_pbs_sends_in_any_order() {
        let c = parse("backup --params-stdin --path /srv --path '/etc/my dir' --exclude '*.tmp' --one-file-system --socket /run/haul/r.sock").unwrap();
        assert_eq!(
            c,
            AgentCommand::Backup(BackupCommand {
                socket: "/run/haul/r.sock".into(),
                paths: vec!["/srv".into(), "/etc/my dir".into()],
                excludes: vec!["*.tmp".into()],
                one_file_system: true,
                params_stdin: true,
                ..BackupCommand::default()
            })
        );
        let c = parse("restore --snapshot 0a1b2c3d --target /var/restore/x --include /srv --threads 4 --socket /s.sock").unwrap();
        assert_eq!(
            c,
            AgentCommand::Restore(RestoreCommand {
                socket: "/s.sock".into(),
                snapshot: SnapshotChoice::Snapshot("0a1b2c3d".parse().unwrap()),
                target: "/var/restore/x".into(),
                includes: vec!["/srv".into()],
                excludes: Vec::new(),
                threads: Some(4),
                params_stdin: false,
                standby: false,
                import: false,
                import_command: Vec::new(),
            })
        );
        let c =
            parse("backup --socket s --path p --host h --tag a --tag b --parent none --threads 2")
                .unwrap();
        let AgentCommand::Backup(b) = c else { panic!() };
        assert_eq!(
            (b.host.as_deref(), b.tags, b.parent, b.threads),
            (
                Some("h"),
                vec!["a".into(), "b".into()],
                Some(Parent::None),
                Some(2)
            )
        );
    }

    #[test]
    fn refuses_with_a_sentence_naming_the_flag() {
        let cases = [
            ("", "haul-agent needs backup or restore"),
            (
                "serve",
                "haul-agent \"serve\" is not a command (backup or restore)",
            ),
            ("backup --path /srv", "haul-agent backup needs --socket"),
            (
                "backup --socket s",
                "haul-agent backup needs at least one --path",
            ),
            (
                "restore --socket s --target t",
                "haul-agent restore needs --snapshot",
            ),
            (
                "backup --socket s --path p --bogus",
                "\"--bogus\" is not an argument of haul-agent backup",
            ),
            (
                "backup --socket s --path=/etc",
                "\"--path=/etc\" is not an argument of haul-agent backup",
            ),
            ("backup --socket s --path p -h", "\"-h\" is not an argument"),
            (
                "backup --socket s --path p stray",
                "\"stray\" is not an argument",
            ),
            (
                "backup --socket s --path p --include x",
                "\"--include\" is not an argument of haul-agent backup",
            ),
            (
                "restore --socket s --snapshot latest --target t --one-file-system",
                "\"--one-file-system\" is not an argument of haul-agent restore",
            ),
            ("backup --socket s --path", "--path needs a value"),
            (
                "backup --socket a --socket b --path p",
                "--socket given twice",
            ),
            (
                "backup --socket a --path p --one-file-system --one-file-system",
                "--one-file-system given twice",
            ),
            (
                "backup --socket a --path p --host a --host b",
                "--host given twice",
            ),
            (
                "restore --socket a --snapshot latest --snapshot latest --target t",
                "--snapshot given twice",
            ),
            (
                "backup --socket a --path p --threads x",
                "--threads \"x\" is not a number",
            ),
            (
                "backup --socket a --path p --threads -1",
                "--threads \"-1\" is not a number",
            ),
            (
                "backup --socket a --path p --parent ../x",
                "--parent \"../x\" is not a parent",
            ),
            (
                "restore --socket a --snapshot ../x --target t",
                "--snapshot \"../x\" is not a snapshot id",
            ),
            (
                "restore --socket a --snapshot ABCD --target t",
                "is not a snapshot id",
            ),
        ];
        for (line, why) in cases {
            let got = refusal(line);
            assert!(got.contains(why), "{line:?}: {got:?} lacks {why:?}");
        }
        assert_eq!(
            parse("backup --socket a --path p --threads x"),
            Err(CommandError::BadValue {
                flag: "--threads",
                value: "x".into(),
                expected: "a number"
            })
        );
    }

    #[test]
    fn a_value_is_the_next_word_whatever_it_is() {
        // One reading of any command: what looks like a flag after a flag that takes
        // a value is that value, for the agent and for the wrapper alike.
        let c = parse("backup --socket s --path --one-file-system --exclude ''").unwrap();
        let AgentCommand::Backup(b) = c else { panic!() };
        assert_eq!(b.paths, ["--one-file-system"]);
        assert_eq!(b.excludes, [""]);
        assert!(!b.one_file_system);
    }

    #[test]
    fn every_flag_in_the_tables_is_written_and_read() {
        let full = [
            AgentCommand::Backup(BackupCommand {
                socket: "s".into(),
                paths: vec!["p".into()],
                excludes: vec!["e".into()],
                exclude_caches: true,
                one_file_system: true,
                params_stdin: true,
                host: Some("h".into()),
                tags: vec!["t".into()],
                parent: Some(Parent::Latest),
                threads: Some(3),
            }),
            AgentCommand::Restore(RestoreCommand {
                socket: "s".into(),
                snapshot: SnapshotChoice::Latest,
                target: "t".into(),
                includes: vec!["i".into()],
                excludes: vec!["e".into()],
                threads: Some(3),
                params_stdin: true,
                standby: true,
                import: true,
                import_command: vec!["c".into()],
            }),
        ];
        for (command, table) in full.iter().zip(SUBCOMMANDS) {
            let args = command.to_args();
            assert_eq!(args[0], table.name);
            for flag in table.flags {
                assert!(args.contains(&flag.name.to_string()), "{}", flag.name);
            }
            assert_eq!(AgentCommand::parse(args).as_ref(), Ok(command));
        }
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[^\\x00-\\x1f\\x7f-\\u{9f}]{0,12}",
            "/[a-z '\"]{0,6}/[a-z' ]{0,6}",
            proptest::sample::select(vec!["--path", "--socket", "", "-", "'", "it's", "a b"])
                .prop_map(String::from),
        ]
    }

    fn prefix() -> impl Strategy<Value = SnapshotPrefix> {
        "[0-9a-f]{4,64}".prop_map(|s| s.parse().unwrap())
    }

    fn backup() -> impl Strategy<Value = BackupCommand> {
        let parent = prop_oneof![
            Just(Parent::Latest),
            Just(Parent::None),
            prefix().prop_map(Parent::Snapshot)
        ];
        (
            (
                text(),
                proptest::collection::vec(text(), 1..4),
                proptest::collection::vec(text(), 0..3),
                any::<(bool, bool, bool)>(),
            ),
            (
                proptest::option::of(text()),
                proptest::collection::vec(text(), 0..3),
                proptest::option::of(parent),
                proptest::option::of(any::<u32>()),
            ),
        )
            .prop_map(
                |(
                    (socket, paths, excludes, (caches, one_fs, stdin)),
                    (host, tags, parent, threads),
                )| {
                    BackupCommand {
                        socket,
                        paths,
                        excludes,
                        exclude_caches: caches,
                        one_file_system: one_fs,
                        params_stdin: stdin,
                        host,
                        tags,
                        parent,
                        threads,
                    }
                },
            )
    }

    fn restore() -> impl Strategy<Value = RestoreCommand> {
        let snapshot = prop_oneof![
            Just(SnapshotChoice::Latest),
            prefix().prop_map(SnapshotChoice::Snapshot)
        ];
        (
            text(),
            snapshot,
            text(),
            (
                proptest::collection::vec(text(), 0..3),
                proptest::collection::vec(text(), 0..3),
            ),
            proptest::option::of(any::<u32>()),
            any::<bool>(),
            (any::<bool>(), any::<bool>()),
            proptest::collection::vec(text(), 0..3),
        )
            .prop_map(
                |(
                    socket,
                    snapshot,
                    target,
                    (includes, excludes),
                    threads,
                    params_stdin,
                    (standby, import),
                    import_command,
                )| RestoreCommand {
                    socket,
                    snapshot,
                    target,
                    includes,
                    excludes,
                    threads,
                    params_stdin,
                    standby,
                    import,
                    import_command,
                },
            )
    }

    fn command() -> impl Strategy<Value = AgentCommand> {
        prop_oneof![
            backup().prop_map(AgentCommand::Backup),
            restore().prop_map(AgentCommand::Restore)
        ]
    }

    proptest! {
        /// What the pbs writes is what the wrapper and the agent read, also after it
        /// was quoted into an SSH command and split again.
        #[test]
        fn parse_reads_back_what_to_args_wrote(c in command()) {
            let args = c.to_args();
            prop_assert_eq!(AgentCommand::parse(args.clone()), Ok(c.clone()));
            let mut words = vec!["haul-agent"];
            words.extend(args.iter().map(String::as_str));
            let mut split = crate::command::split(&crate::command::join(&words)).unwrap();
            prop_assert_eq!(split.remove(0), "haul-agent");
            prop_assert_eq!(AgentCommand::parse(split), Ok(c));
        }
    }
}
