//! Where haul keeps things on the backup server. The TOML model of hosts and clones
//! comes with the daemon; for now this is the built-in default state directory, which
//! holds the default repository, its generated key file and the run records.

use std::path::PathBuf;

/// The state directory when none is configured: `$HAUL_STATE_DIR`; for root
/// `/var/lib/haul`; else `$XDG_STATE_HOME/haul` or `~/.local/state/haul`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HAUL_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/haul");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("haul");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/state/haul"),
        None => PathBuf::from("/var/lib/haul"),
    }
}

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir(pub PathBuf);

impl StateDir {
    /// The default repository.
    pub fn repo(&self) -> PathBuf {
        self.0.join("repo")
    }
    /// The generated passphrase of the default repository.
    pub fn key_file(&self) -> PathBuf {
        self.0.join("repo.key")
    }
    /// One JSON record per run.
    pub fn runs(&self) -> PathBuf {
        self.0.join("runs")
    }
}

/// The backup server's configuration file (default `/etc/haul/pbs.toml`). For now the
/// hosts to pull; the daemon's settings, the feed and clones come with the daemon.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, rename = "host")]
    pub hosts: Vec<Host>,
}

/// How the pbs reaches a host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// SSH to the host; its forced command runs the agent.
    #[default]
    Ssh,
    /// The agent runs on this machine as a child process.
    Local,
}

/// A source host (`[[host]]`). Only `name`, `address` and `paths` are required.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub name: String,
    pub address: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_user")]
    pub user: String,
    /// The pbs's private key for this host.
    #[serde(default = "default_identity")]
    pub identity: PathBuf,
    /// A file holding the key's passphrase, if it has one.
    pub identity_passphrase_file: Option<PathBuf>,
    /// The pinned host keys (plain OpenSSH format, `[address]:port` when not 22).
    #[serde(default = "default_known_hosts")]
    pub known_hosts: PathBuf,
    #[serde(default)]
    pub transport: Transport,
    pub paths: Vec<PathBuf>,
    #[serde(default)]
    pub excludes: Vec<String>,
    /// Directory on the host where sshd creates the run's forwarded socket; the
    /// wrapper policy's `socket_dir`.
    #[serde(default = "default_socket_dir")]
    pub socket_dir: PathBuf,
    /// SSH receive window in MiB: the upload direction moves at most about
    /// window / 2 per round trip (raise it on long links).
    #[serde(default = "default_window_mib")]
    pub window_mib: u32,
    #[serde(default)]
    pub tags: Vec<String>,
}

fn default_port() -> u16 {
    22
}
fn default_user() -> String {
    "root".into()
}
fn default_identity() -> PathBuf {
    PathBuf::from("/etc/haul/id_ed25519")
}
fn default_known_hosts() -> PathBuf {
    PathBuf::from("/etc/haul/known_hosts")
}
fn default_socket_dir() -> PathBuf {
    PathBuf::from("/run/haul")
}
fn default_window_mib() -> u32 {
    8
}

/// A TOML error as `line N: message`, for messages that name the file and the line.
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let at = e
        .span()
        .map(|s| {
            let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: ")
        })
        .unwrap_or_default();
    format!("{at}{}", e.message().trim())
}

/// A configuration that could not be used; the message names the file, the line or
/// the key, and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("config {file}: {e}")))?;
        Config::parse(&text, &file)
    }

    /// Parses and checks a configuration; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text)
            .map_err(|e| ConfigError(format!("config {file}: {}", toml_error(text, &e))))?;
        let mut names = std::collections::HashSet::new();
        for (i, h) in config.hosts.iter().enumerate() {
            let bad = |key: &str, why: String| {
                ConfigError(format!("config {file}: host[{i}].{key}: {why}"))
            };
            if h.name.is_empty()
                || !h
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(bad(
                    "name",
                    format!(
                        "{:?} is not a host name (letters, digits, `.`, `_`, `-`)",
                        h.name
                    ),
                ));
            }
            if !names.insert(h.name.as_str()) {
                return Err(bad(
                    "name",
                    format!("{:?} is used by another host too", h.name),
                ));
            }
            if h.paths.is_empty() {
                return Err(bad("paths", "give at least one path to back up".into()));
            }
            for (key, p) in h.paths.iter().map(|p| ("paths", p)).chain([
                ("identity", &h.identity),
                ("known_hosts", &h.known_hosts),
                ("socket_dir", &h.socket_dir),
            ]) {
                if !p.is_absolute() {
                    return Err(bad(key, format!("{} is not an absolute path", p.display())));
                }
            }
            if !(1..=256).contains(&h.window_mib) {
                return Err(bad(
                    "window_mib",
                    format!("{} is not from 1 to 256", h.window_mib),
                ));
            }
        }
        Ok(config)
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_with_name_address_and_paths_is_enough() {
        let c = Config::parse(
            "[[host]]\nname = \"web-1\"\naddress = \"10.0.0.5\"\npaths = [\"/srv\"]\n",
            "pbs.toml",
        )
        .unwrap();
        let h = c.host("web-1").unwrap();
        assert_eq!(
            (h.port, h.user.as_str(), h.transport),
            (22, "root", Transport::Ssh)
        );
        assert_eq!(h.socket_dir, PathBuf::from("/run/haul"));
    }

    #[test]
    fn the_example_configuration_is_valid() {
        let c =
            Config::parse(include_str!("../../examples/pbs.toml"), "examples/pbs.toml").unwrap();
        let names: Vec<&str> = c.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["web-1", "db-1", "pbs"]);
        assert_eq!(c.host("db-1").unwrap().port, 2222);
        assert_eq!(c.host("pbs").unwrap().transport, Transport::Local);
    }

    #[test]
    fn errors_name_the_file_line_and_key() {
        let e = Config::parse(
            "[[host]]\nname = \"a\"\naddress = \"x\"\npaths = [\"/srv\"]\nshedule = \"6h\"\n",
            "pbs.toml",
        )
        .unwrap_err();
        assert!(e.0.starts_with("config pbs.toml: line 5: "), "{e}");
        assert!(e.0.contains("shedule"), "{e}");
        let e = Config::parse("[[host]]\nname = \"a\"\naddress = \"x\"\npaths = [\"/srv\"]\n[[host]]\nname = \"a\"\naddress = \"y\"\npaths = [\"srv\"]\n", "pbs.toml").unwrap_err();
        assert!(
            e.0.contains("host[1].name: \"a\" is used by another host too"),
            "{e}"
        );
        let e = Config::parse(
            "[[host]]\nname = \"a\"\naddress = \"x\"\npaths = [\"srv\"]\n",
            "pbs.toml",
        )
        .unwrap_err();
        assert!(
            e.0.contains("host[0].paths: srv is not an absolute path"),
            "{e}"
        );
    }
}
