//! What the forced command admits: the policy file, and the one decision,
//! [`Policy::admit`], which turns `SSH_ORIGINAL_COMMAND` into the exact argument vector
//! of the agent, or a refusal that says why.
//!
//! The command is split here, never by a shell, with the grammar of
//! [`haul_protocol::command`] (shell words without any expansion; anything a shell
//! would treat specially is refused), and its words are read by the agent's own parser,
//! [`AgentCommand::parse`]: the policy judges the command the agent will run, not a
//! reading of its own.

use haul_protocol::agent::{AgentCommand, BackupCommand, CommandError, RestoreCommand};
use serde::Deserialize;
use std::path::{Component, Path, PathBuf};

/// The wrapper's policy file (default `/etc/haul/wrapper.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The agent binary the wrapper runs (absolute).
    pub agent: PathBuf,
    /// The directory the pbs's forwarded sockets are created in (absolute). A command's
    /// `--socket` must name a `*.sock` file directly inside it.
    pub socket_dir: PathBuf,
    /// Backups may read only paths inside these directories (default: `/`).
    #[serde(default = "root")]
    pub backup_roots: Vec<PathBuf>,
    /// Restores may write only into directories inside these; none: no restores.
    #[serde(default)]
    pub restore_targets: Vec<PathBuf>,
    /// What a standby push runs once the standby copy is replaced, when the pbs asks
    /// for it (`--import`): the program (absolute) and its arguments, run in the
    /// standby directory with `HAUL_STANDBY_DIR` and `HAUL_SNAPSHOT` set. Chosen here
    /// only: the pbs can trigger it, never name it.
    #[serde(default)]
    pub import_command: Vec<String>,
}

/// Longest command accepted (sshd itself takes up to 256 KiB).
const MAX_COMMAND: usize = 64 * 1024;

fn root() -> Vec<PathBuf> {
    vec![PathBuf::from("/")]
}

/// A policy that could not be read; the message names the file, line and key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// Why a command was refused: one line, for the pbs and the logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

fn deny<T>(why: impl Into<String>) -> Result<T, Denied> {
    Err(Denied(why.into()))
}

impl Policy {
    /// Parses and checks a policy; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Policy, PolicyError> {
        let policy: Policy = toml::from_str(text).map_err(|e| {
            PolicyError(format!(
                "policy {file}:{}",
                haul_config::toml_error(text, &e)
            ))
        })?;
        let bad = |key: &str, why: &str| PolicyError(format!("policy {file}: {key}: {why}"));
        let absolute = |p: &Path| p.is_absolute() && normal(p);
        if !absolute(&policy.agent) {
            return Err(bad("agent", "must be an absolute path without `..`"));
        }
        if !absolute(&policy.socket_dir) || policy.socket_dir == Path::new("/") {
            return Err(bad(
                "socket_dir",
                "must be an absolute directory without `..`, not `/`",
            ));
        }
        for (key, list) in [
            ("backup_roots", &policy.backup_roots),
            ("restore_targets", &policy.restore_targets),
        ] {
            if let Some(p) = list.iter().find(|p| !absolute(p)) {
                return Err(bad(
                    key,
                    &format!("{} is not an absolute path without `..`", p.display()),
                ));
            }
        }
        if let Some(program) = policy.import_command.first() {
            if !absolute(Path::new(program)) {
                return Err(bad(
                    "import_command",
                    &format!("its program {program:?} is not an absolute path without `..`"),
                ));
            }
        }
        Ok(policy)
    }

    /// Admits `command` (the text of `SSH_ORIGINAL_COMMAND`) or says why not. The
    /// returned arguments follow the agent binary; they are rebuilt from what was
    /// checked ([`AgentCommand::to_args`]), not copied from the input.
    pub fn admit(&self, command: &str) -> Result<Vec<String>, Denied> {
        let mut command = self.check(command)?;
        if let AgentCommand::Restore(r) = &mut command {
            if r.import {
                r.import_command = self.import_command.clone();
            }
        }
        Ok(command.to_args())
    }

    fn check(&self, command: &str) -> Result<AgentCommand, Denied> {
        if command.len() > MAX_COMMAND {
            return deny(format!(
                "the command is {} bytes long; at most {MAX_COMMAND} are accepted",
                command.len()
            ));
        }
        let words = haul_protocol::command::split(command).map_err(Denied)?;
        let mut words = words.into_iter();
        match words.next().as_deref() {
            Some("haul-agent") => {}
            Some(other) => return deny(format!("only haul-agent may run, not {other:?}")),
            None => return deny("empty command: only haul-agent may run"),
        }
        let rest: Vec<String> = words.collect();
        // Said first: whatever the flags, this host takes no restores.
        if rest.first().is_some_and(|w| w == "restore") && self.restore_targets.is_empty() {
            return deny(
                "restores are not allowed on this host (the policy has no restore_targets)",
            );
        }
        let agent_command = AgentCommand::parse(rest).map_err(refusal)?;
        match &agent_command {
            AgentCommand::Backup(b) => self.backup(b)?,
            AgentCommand::Restore(r) => self.restore(r)?,
        }
        Ok(agent_command)
    }

    fn backup(&self, b: &BackupCommand) -> Result<(), Denied> {
        self.socket(&b.socket)?;
        for p in &b.paths {
            inside(p, &self.backup_roots, "backup path", "backup_roots")?;
        }
        no_flag_like("--exclude", &b.excludes)?;
        // Over SSH these come in the run parameters, where they cannot change what is
        // read (and the threads stay the agent's choice).
        for (given, flag) in [
            (b.host.is_some(), "--host"),
            (!b.tags.is_empty(), "--tag"),
            (b.parent.is_some(), "--parent"),
            (b.threads.is_some(), "--threads"),
        ] {
            if given {
                return deny(format!(
                    "{flag:?} is not an allowed argument of haul-agent backup"
                ));
            }
        }
        Ok(())
    }

    /// The snapshot's form (`latest` or hex digits) is checked by the parser.
    fn restore(&self, r: &RestoreCommand) -> Result<(), Denied> {
        self.socket(&r.socket)?;
        inside(
            &r.target,
            &self.restore_targets,
            "restore target",
            "restore_targets",
        )?;
        no_flag_like("--include", &r.includes)?;
        no_flag_like("--exclude", &r.excludes)?;
        if !r.import_command.is_empty() {
            return deny(
                "--import-command is not an allowed argument: the import command is this host's choice (import_command in its policy)",
            );
        }
        // Its state directory is made beside it: inside the roots too.
        if r.standby
            && self
                .restore_targets
                .iter()
                .any(|root| Path::new(&r.target) == root.as_path())
        {
            return deny(format!(
                "standby directory {:?} is a restore_targets directory itself; a standby copy goes in a directory inside one (its state is kept beside it)",
                r.target
            ));
        }
        if let Some(n) = r.threads {
            if !(1..=64).contains(&n) {
                return deny(format!("--threads {n} is not a number from 1 to 64"));
            }
        }
        Ok(())
    }

    /// Checks the paths of admitted arguments (from [`Policy::admit`]) on the real
    /// filesystem: with every symlink resolved, each backup path and restore target
    /// must still be inside the policy's roots (`/srv/link/x` with `link -> /etc` is
    /// not inside `/srv`).
    pub fn confine(&self, args: &[String]) -> Result<(), Denied> {
        let (paths, roots, key) = match AgentCommand::parse(args).map_err(refusal)? {
            AgentCommand::Backup(b) => (b.paths, &self.backup_roots, "backup_roots"),
            AgentCommand::Restore(r) => (vec![r.target], &self.restore_targets, "restore_targets"),
        };
        let roots: Vec<PathBuf> = roots
            .iter()
            .map(|r| resolve(r).unwrap_or_else(|| r.clone()))
            .collect();
        for path in paths {
            let real = resolve(Path::new(&path)).ok_or_else(|| {
                Denied(format!(
                    "{path:?} cannot be resolved (a dangling or looping symlink)"
                ))
            })?;
            if !roots.iter().any(|r| real.starts_with(r)) {
                return deny(format!(
                    "{path:?} is {} with symlinks resolved, outside the policy's {key}",
                    real.display()
                ));
            }
        }
        Ok(())
    }

    /// A socket path: a `*.sock` file directly in the socket directory.
    fn socket(&self, s: &str) -> Result<(), Denied> {
        let p = Path::new(s);
        let name_ok = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            n.len() > 5
                && n.ends_with(".sock")
                && !n.starts_with('.')
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
        if !name_ok || p.parent() != Some(self.socket_dir.as_path()) {
            return deny(format!(
                "--socket {s:?} is not a *.sock file directly in {}",
                self.socket_dir.display()
            ));
        }
        Ok(())
    }
}

/// The parser's refusal, in the policy's words where they differ: a word the agent
/// does not take is one the policy does not allow.
fn refusal(e: CommandError) -> Denied {
    Denied(match e {
        CommandError::UnknownCommand(word) => {
            format!("haul-agent {word:?} is not allowed (only backup and restore)")
        }
        CommandError::UnknownFlag { command, word } => {
            format!("{word:?} is not an allowed argument of haul-agent {command}")
        }
        e => e.to_string(),
    })
}

/// `p` with every symlink resolved: its longest existing ancestor canonicalized, the
/// rest (what does not exist yet, like a restore target) appended. `None` if some part
/// exists but cannot be resolved (a dangling or looping symlink).
fn resolve(p: &Path) -> Option<PathBuf> {
    let mut missing = Vec::new();
    let mut at = p;
    loop {
        match std::fs::canonicalize(at) {
            Ok(real) => return Some(missing.iter().rev().fold(real, |acc, c| acc.join(c))),
            Err(_) if std::fs::symlink_metadata(at).is_ok() => return None,
            Err(_) => {}
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_os_string());
                at = parent;
            }
            _ => return Some(p.to_path_buf()),
        }
    }
}

/// True if `p` has no `.`/`..` components (and so means what it says).
fn normal(p: &Path) -> bool {
    let s = p.as_os_str().as_encoded_bytes();
    !s.windows(2).any(|w| w == b"//")
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && !s.ends_with(b"/.")
}

/// The parser takes the word after a flag as its value whatever it is; a value that
/// looks like a flag is far more likely a forgotten value than a pattern, and is
/// refused. (Paths and sockets must be absolute, so only free-form values need this.)
fn no_flag_like(flag: &str, values: &[String]) -> Result<(), Denied> {
    match values.iter().find(|v| v.starts_with("--")) {
        Some(v) => deny(format!("{flag} needs a value, not the flag {v:?}")),
        None => Ok(()),
    }
}

/// `s` is an absolute, normal path inside one of `roots`.
fn inside(s: &str, roots: &[PathBuf], what: &str, key: &str) -> Result<(), Denied> {
    let p = Path::new(s);
    if !p.is_absolute() || !normal(p) {
        return deny(format!(
            "{what} {s:?} is not an absolute path without `.` or `..`"
        ));
    }
    if !roots.iter().any(|r| p.starts_with(r)) {
        return deny(format!("{what} {s:?} is outside the policy's {key}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const POLICY: &str = r#"
agent = "/usr/local/bin/haul-agent"
socket_dir = "/run/haul"
backup_roots = ["/srv", "/etc"]
restore_targets = ["/var/restore"]
"#;

    fn policy() -> Policy {
        Policy::parse(POLICY, "wrapper.toml").unwrap()
    }

    #[test]
    fn a_standby_push_gets_the_policys_import_command_and_never_the_pbss() {
        let text = format!("{POLICY}import_command = [\"/usr/local/sbin/import\", \"--quiet\"]\n");
        let p = Policy::parse(&text, "wrapper.toml").unwrap();
        let push = "haul-agent restore --socket /run/haul/r.sock --snapshot 0a1b2c3d --target /var/restore/web-1 --standby --params-stdin";
        // Asked for: the policy's command follows, word by word.
        let args = p.admit(&format!("{push} --import")).unwrap();
        let tail: Vec<&str> = args
            .iter()
            .rev()
            .take(4)
            .rev()
            .map(String::as_str)
            .collect();
        assert_eq!(
            tail,
            [
                "--import-command",
                "/usr/local/sbin/import",
                "--import-command",
                "--quiet"
            ]
        );
        // Not asked for: none.
        assert!(!p
            .admit(push)
            .unwrap()
            .iter()
            .any(|a| a == "--import-command"));
        // Named by the pbs: refused, whatever it names.
        let e = p
            .admit(&format!("{push} --import --import-command /bin/sh"))
            .unwrap_err()
            .0;
        assert!(
            e.starts_with("--import-command is not an allowed argument"),
            "{e}"
        );
        // The root of restore_targets itself: refused (the copy's state goes beside it).
        let e = p
            .admit("haul-agent restore --socket /run/haul/r.sock --snapshot latest --target /var/restore --standby")
            .unwrap_err()
            .0;
        assert!(e.contains("is a restore_targets directory itself"), "{e}");
        // A relative program: the policy is refused.
        let bad = format!("{POLICY}import_command = [\"import\"]\n");
        let e = Policy::parse(&bad, "wrapper.toml").unwrap_err().0;
        assert!(
            e.contains("import_command: its program \"import\" is not an absolute path"),
            "{e}"
        );
    }

    fn refused(cmd: &str) -> String {
        policy().admit(cmd).unwrap_err().0
    }

    /// Commands the pbs sends, quoted as it quotes them.
    fn arb_command() -> impl Strategy<Value = Vec<u8>> {
        let path = || {
            proptest::sample::select(
                &[
                    "/srv/www",
                    "/etc",
                    "/srv/it's",
                    "/srv/a b",
                    "/etc/../root",
                    "/home",
                ][..],
            )
        };
        (
            any::<bool>(),
            path(),
            path(),
            "[a-z0-9]{1,6}",
            any::<(bool, bool)>(),
        )
            .prop_map(|(backup, a, b, sock, (stdin, extra))| {
                let socket = format!("/run/haul/{sock}.sock");
                let mut words: Vec<&str> = vec!["haul-agent"];
                if backup {
                    words.extend(["backup", "--socket", &socket, "--path", a, "--path", b]);
                    if extra {
                        words.extend(["--exclude", "*.tmp", "--one-file-system"]);
                    }
                } else {
                    words.extend(["restore", "--socket", &socket, "--snapshot", "latest"]);
                    words.extend(["--target", "/var/restore/web", "--include", a]);
                    if extra {
                        words.extend(["--threads", "4"]);
                    }
                }
                if stdin {
                    words.push("--params-stdin");
                }
                haul_protocol::command::join(&words).into_bytes()
            })
    }

    const TOKENS: &[&[u8]] = &[
        b" ",
        b"'",
        b"\\'",
        b"--socket",
        b"--path",
        b"--target",
        b"--snapshot",
        b"--threads",
        b"/run/haul/x.sock",
        b"/..",
        b"//",
        b"/.",
        b"=",
        b";",
        b"$(id)",
        b"\n",
        b"\xc3\xa9",
    ];

    proptest! {
        /// The stable counterpart of the `wrapper_policy` fuzz target (docs/fuzzing.md):
        /// admitted arguments, quoted and admitted again, come back unchanged.
        #[test]
        fn hostile_commands_are_refused_or_admitted_stably(
            bytes in haul_mutate::inputs_with(arb_command(), 120, TOKENS),
        ) {
            let p = policy();
            let command = String::from_utf8_lossy(&bytes);
            if let Ok(args) = p.admit(&command) {
                prop_assert!(args[0] == "backup" || args[0] == "restore");
                let socket = &args[args.iter().position(|a| a == "--socket").unwrap() + 1];
                prop_assert_eq!(Path::new(socket).parent(), Some(p.socket_dir.as_path()));
                let mut words = vec!["haul-agent"];
                words.extend(args.iter().map(String::as_str));
                prop_assert_eq!(p.admit(&haul_protocol::command::join(&words)), Ok(args));
            }
        }

        /// A policy file is refused with its name, or every path in it is absolute and
        /// normal.
        #[test]
        fn hostile_policies_are_refused_or_absolute(
            bytes in haul_mutate::inputs_with(Just(POLICY.as_bytes().to_vec()), 120, TOKENS),
        ) {
            match Policy::parse(&String::from_utf8_lossy(&bytes), "wrapper.toml") {
                Ok(p) => {
                    for path in [&p.agent, &p.socket_dir].into_iter().chain(&p.backup_roots).chain(&p.restore_targets) {
                        prop_assert!(path.is_absolute() && normal(path), "{}", path.display());
                    }
                }
                Err(e) => prop_assert!(e.0.starts_with("policy wrapper.toml"), "{}", e),
            }
        }
    }

    #[test]
    fn admits_the_pbs_commands_and_rebuilds_their_arguments() {
        let p = policy();
        let args = p
            .admit("haul-agent backup --socket /run/haul/r1.sock --params-stdin --path /srv/www --path '/etc/my dir' --exclude '*.tmp' --one-file-system")
            .unwrap();
        assert_eq!(
            args,
            [
                "backup",
                "--socket",
                "/run/haul/r1.sock",
                "--path",
                "/srv/www",
                "--path",
                "/etc/my dir",
                "--exclude",
                "*.tmp",
                "--params-stdin",
                "--one-file-system"
            ]
        );
        let args = p
            .admit("haul-agent restore --socket /run/haul/r2.sock --params-stdin --snapshot 0a1b2c3d --target /var/restore/web --include /srv --exclude '*.log' --threads 4")
            .unwrap();
        assert_eq!(
            args,
            [
                "restore",
                "--socket",
                "/run/haul/r2.sock",
                "--snapshot",
                "0a1b2c3d",
                "--target",
                "/var/restore/web",
                "--include",
                "/srv",
                "--exclude",
                "*.log",
                "--threads",
                "4",
                "--params-stdin"
            ]
        );
        // What the pbs sends, quoted by the shared quoting, is admitted as it was.
        let words = [
            "haul-agent",
            "backup",
            "--socket",
            "/run/haul/x.sock",
            "--path",
            "/srv/it's",
        ];
        let args = p.admit(&haul_protocol::command::join(&words)).unwrap();
        assert_eq!(
            args,
            [
                "backup",
                "--socket",
                "/run/haul/x.sock",
                "--path",
                "/srv/it's"
            ]
        );
    }

    #[test]
    fn refuses_everything_else_and_says_why() {
        let cases = [
            ("", "empty command"),
            ("sh -c id", "only haul-agent may run, not \"sh\""),
            ("/tmp/haul-agent backup", "only haul-agent may run"),
            ("haul-agent", "needs backup or restore"),
            ("haul-agent serve", "\"serve\" is not allowed"),
            ("haul-agent backup --path /srv", "needs --socket"),
            ("haul-agent backup --socket /run/haul/a.sock", "at least one --path"),
            ("haul-agent backup --socket /tmp/a.sock --path /srv", "directly in /run/haul"),
            ("haul-agent backup --socket /run/haul/sub/a.sock --path /srv", "directly in /run/haul"),
            ("haul-agent backup --socket /run/haul/../a.sock --path /srv", "directly in /run/haul"),
            ("haul-agent backup --socket /run/haul/a.txt --path /srv", "directly in /run/haul"),
            ("haul-agent backup --socket /run/haul/a.sock --socket /run/haul/b.sock --path /srv", "--socket given twice"),
            ("haul-agent backup --socket /run/haul/a.sock --path /home", "outside the policy's backup_roots"),
            ("haul-agent backup --socket /run/haul/a.sock --path /srv/../root", "without `.` or `..`"),
            ("haul-agent backup --socket /run/haul/a.sock --path srv", "not an absolute path"),
            ("haul-agent backup --socket /run/haul/a.sock --path /srvx", "outside the policy's backup_roots"),
            ("haul-agent backup --socket /run/haul/a.sock --path /srv --threads 9", "\"--threads\" is not an allowed argument"),
            ("haul-agent backup --socket /run/haul/a.sock --path /srv --path=/etc", "\"--path=/etc\" is not an allowed"),
            ("haul-agent backup --socket /run/haul/a.sock --path", "--path needs a value"),
            ("haul-agent backup --socket /run/haul/a.sock --path --one-file-system", "not an absolute path"),
            ("haul-agent backup --socket /run/haul/a.sock --path /srv --exclude --one-file-system", "--exclude needs a value"),
            ("haul-agent backup --socket --path /srv", "\"/srv\" is not an allowed argument"),
            ("haul-agent backup --socket /run/haul/a.sock --path /srv --host h", "\"--host\" is not an allowed argument"),
            ("haul-agent backup --socket /run/haul/a.sock --path /srv --tag t", "\"--tag\" is not an allowed argument"),
            ("haul-agent backup --socket /run/haul/a.sock --path /srv --parent none", "\"--parent\" is not an allowed argument"),
            ("haul-agent backup --socket /run/haul/a.sock --path /srv --help", "\"--help\" is not an allowed argument"),
            ("haul-agent backup --socket /run/haul/a.sock --path /srv --include /srv", "\"--include\" is not an allowed argument"),
            ("haul-agent --version", "\"--version\" is not allowed"),
            ("haul-agent restore --socket /run/haul/a.sock --snapshot latest --target /var/restore/x --include --threads", "--include needs a value"),
            ("haul-agent restore --socket /run/haul/a.sock --snapshot latest --target /var/restore/x --threads 65", "from 1 to 64"),
            ("haul-agent restore --socket /run/haul/a.sock --snapshot latest --target /var/restore/x --threads x", "--threads \"x\" is not a number"),
            ("haul-agent restore --socket /run/haul/a.sock --snapshot ABCD --target /var/restore/x", "not a snapshot id"),
            ("haul-agent restore --socket /run/haul/a.sock --snapshot latest --target /var/restore/x --exclude --threads", "--exclude needs a value"),
            ("haul-agent backup --socket /run/haul/a.sock --path /srv; rm -rf /", "not allowed in the command"),
            ("haul-agent backup --socket /run/haul/a.sock --path $(id)", "not allowed in the command"),
            ("haul-agent restore --socket /run/haul/a.sock --snapshot latest --target /tmp/x", "outside the policy's restore_targets"),
            ("haul-agent restore --socket /run/haul/a.sock --snapshot ../x --target /var/restore/x", "not a snapshot id"),
            ("haul-agent restore --socket /run/haul/a.sock --target /var/restore/x", "needs --snapshot"),
            ("haul-agent restore --socket /run/haul/a.sock --snapshot latest --target /var/restore/x --threads 0", "from 1 to 64"),
            ("haul-agent restore --socket /run/haul/a.sock --snapshot latest --target /var/restore/x --params-stdin --params-stdin", "--params-stdin given twice"),
        ];
        for (cmd, why) in cases {
            let got = refused(cmd);
            assert!(got.contains(why), "{cmd:?}: {got:?} lacks {why:?}");
        }
    }

    #[test]
    fn symlinks_cannot_lead_a_path_out_of_its_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("srv");
        std::fs::create_dir_all(root.join("www")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        let p = Policy::parse(
            &format!(
                "agent = \"/a\"\nsocket_dir = \"/run/haul\"\nbackup_roots = [{:?}]\nrestore_targets = [{:?}]\n",
                root.display().to_string(),
                root.display().to_string()
            ),
            "w.toml",
        )
        .unwrap();
        let cmd = |path: &Path| {
            format!(
                "haul-agent backup --socket /run/haul/a.sock --path {}",
                path.display()
            )
        };
        let ok = p.admit(&cmd(&root.join("www"))).unwrap();
        p.confine(&ok).unwrap();
        let sneaky = p.admit(&cmd(&root.join("link/passwd"))).unwrap();
        let e = p.confine(&sneaky).unwrap_err();
        assert!(
            e.0.contains("/etc/passwd with symlinks resolved, outside the policy's backup_roots"),
            "{e}"
        );
        // A restore target that does not exist yet is judged by its existing parent.
        let t = p
            .admit(&format!(
                "haul-agent restore --socket /run/haul/a.sock --snapshot latest --target {}",
                root.join("link/new").display()
            ))
            .unwrap();
        assert!(p.confine(&t).unwrap_err().0.contains("restore_targets"));
        // A dangling symlink is not taken for a directory that does not exist yet.
        std::os::unix::fs::symlink("/nonexistent/x", root.join("dangling")).unwrap();
        let t = p
            .admit(&format!(
                "haul-agent restore --socket /run/haul/a.sock --snapshot latest --target {}",
                root.join("dangling/sub").display()
            ))
            .unwrap();
        assert!(p.confine(&t).unwrap_err().0.contains("cannot be resolved"));
        let t = p
            .admit(&format!(
                "haul-agent restore --socket /run/haul/a.sock --snapshot latest --target {}",
                root.join("www/new/deeper").display()
            ))
            .unwrap();
        p.confine(&t).unwrap();
    }

    #[test]
    fn an_overlong_command_is_refused() {
        let long = format!(
            "haul-agent backup --socket /run/haul/a.sock --path /srv --exclude {}",
            "x".repeat(70_000)
        );
        assert!(refused(&long).contains("at most 65536 are accepted"));
    }

    #[test]
    fn restores_are_refused_without_restore_targets() {
        let p = Policy::parse("agent = \"/a\"\nsocket_dir = \"/run/haul\"\n", "w.toml").unwrap();
        assert_eq!(p.backup_roots, [PathBuf::from("/")]);
        let e = p
            .admit("haul-agent restore --socket /run/haul/a.sock --snapshot latest --target /x")
            .unwrap_err();
        assert!(e.0.contains("no restore_targets"), "{e}");
        assert!(p
            .admit("haul-agent backup --socket /run/haul/a.sock --path /home")
            .is_ok());
    }

    #[test]
    fn the_example_policy_is_valid() {
        let p = Policy::parse(
            include_str!("../../examples/wrapper.toml"),
            "examples/wrapper.toml",
        )
        .unwrap();
        assert_eq!(
            p.backup_roots,
            [PathBuf::from("/etc"), PathBuf::from("/srv/www")]
        );
        assert!(p.restore_targets.is_empty());
    }

    #[test]
    fn policy_errors_name_the_file_line_and_key() {
        let e = Policy::parse(
            "agent = \"/a\"\nsocket_dir = \"/run/haul\"\nbackup_rots = [\"/\"]\n",
            "/etc/haul/wrapper.toml",
        )
        .unwrap_err();
        assert!(
            e.0.starts_with("policy /etc/haul/wrapper.toml:3:1: backup_rots: unknown field"),
            "{e}"
        );
        assert!(e.0.contains("backup_rots"), "{e}");
        let e = Policy::parse("socket_dir = \"/run/haul\"\n", "w.toml").unwrap_err();
        assert!(e.0.contains("agent"), "{e}");
        let e = Policy::parse(
            "agent = \"bin/agent\"\nsocket_dir = \"/run/haul\"\n",
            "w.toml",
        )
        .unwrap_err();
        assert!(
            e.0.contains("w.toml: agent: must be an absolute path"),
            "{e}"
        );
        let e = Policy::parse(
            "agent = \"/a\"\nsocket_dir = \"/run/haul\"\nrestore_targets = [\"/x/../y\"]\n",
            "w.toml",
        )
        .unwrap_err();
        assert!(e.0.contains("restore_targets: /x/../y"), "{e}");
        let e = Policy::parse("agent = \"/a\"\nsocket_dir = \"/\"\n", "w.toml").unwrap_err();
        assert!(e.0.contains("socket_dir"), "{e}");
    }
}
