//! Run parameters: what the pbs tells the agent besides its command line, as one JSON
//! line on its stdin (the command line asks for it with `--params-stdin`). Over SSH the
//! wrapper's policy fixes the command line and refuses `--host`, `--tag` and `--parent`
//! there; these travel here instead, where they are not security-relevant: the server
//! decides what a run may read and write. Unknown fields are refused, so a misspelt
//! parameter is an error rather than silently ignored.
//!
//! Also here: how a run names a snapshot, on the command line and in parameters
//! ([`SnapshotPrefix`], [`Parent`], [`SnapshotChoice`]).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Set by haul-wrapper in the environment of the agent it starts (to the path of its
/// policy file): how the agent knows it runs under the wrapper, for
/// [`RunParams::require_wrapper`].
pub const WRAPPER_ENV: &str = "HAUL_WRAPPER";

/// Run parameters of either command.
pub trait RunParams: Serialize + DeserializeOwned + Default {
    /// The agent must refuse to run unless started by haul-wrapper. Over SSH the pbs
    /// always asks for it: without the wrapper, the key it logs in with has no forced
    /// command and can run anything on the host (a check for misconfiguration, not a
    /// security boundary).
    fn require_wrapper(&self) -> bool;

    /// Reads the line the pbs wrote. An empty line, or none at all (stdin closed),
    /// gives the defaults.
    fn from_line(line: &str) -> Result<Self, serde_json::Error> {
        if line.trim().is_empty() {
            Ok(Self::default())
        } else {
            serde_json::from_str(line)
        }
    }

    /// The line to write, without its newline.
    fn to_line(&self) -> String {
        serde_json::to_string(self).expect("run parameters serialize")
    }
}

/// Parameters of a backup. The command line's `--host`, `--tag` and `--parent` win
/// over these.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupParams {
    /// Host name to record (default: the machine's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Default: [`Parent::Latest`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
    #[serde(default)]
    pub require_wrapper: bool,
}

impl RunParams for BackupParams {
    fn require_wrapper(&self) -> bool {
        self.require_wrapper
    }
}

/// Parameters of a restore: only whether the wrapper is required.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreParams {
    #[serde(default)]
    pub require_wrapper: bool,
}

impl RunParams for RestoreParams {
    fn require_wrapper(&self) -> bool {
        self.require_wrapper
    }
}

/// A snapshot id or a prefix of one: 4 to 64 lowercase hex digits. The server resolves
/// it among the host's own snapshots. Its form is checked here so that the wrapper can
/// admit it without knowing the repository (`../x` is no snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotPrefix(String);

impl SnapshotPrefix {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A word that is not the snapshot reference it should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not {expected}")]
pub struct BadSnapshot {
    pub value: String,
    /// What was expected, as a noun phrase ("a snapshot id (…)").
    pub expected: &'static str,
}

impl FromStr for SnapshotPrefix {
    type Err = BadSnapshot;

    fn from_str(s: &str) -> Result<SnapshotPrefix, BadSnapshot> {
        let hex = (4..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex {
            return Err(BadSnapshot {
                value: s.into(),
                expected: "a snapshot id (4 to 64 lowercase hex digits)",
            });
        }
        Ok(SnapshotPrefix(s.into()))
    }
}

impl fmt::Display for SnapshotPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The snapshot a backup compares against to skip unchanged files. Written `latest`,
/// `none` or as a [`SnapshotPrefix`], on the command line and in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Parent {
    /// The newest snapshot of this host and paths.
    Latest,
    /// No parent: every file is read.
    None,
    Snapshot(SnapshotPrefix),
}

impl FromStr for Parent {
    type Err = BadSnapshot;

    fn from_str(s: &str) -> Result<Parent, BadSnapshot> {
        match s {
            "latest" => Ok(Parent::Latest),
            "none" => Ok(Parent::None),
            _ => s.parse().map(Parent::Snapshot).map_err(|_| BadSnapshot {
                value: s.into(),
                expected:
                    "a parent (`latest`, `none` or 4 to 64 lowercase hex digits of a snapshot id)",
            }),
        }
    }
}

impl fmt::Display for Parent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Parent::Latest => f.write_str("latest"),
            Parent::None => f.write_str("none"),
            Parent::Snapshot(p) => p.fmt(f),
        }
    }
}

impl TryFrom<String> for Parent {
    type Error = BadSnapshot;

    fn try_from(s: String) -> Result<Parent, BadSnapshot> {
        s.parse()
    }
}

impl From<Parent> for String {
    fn from(p: Parent) -> String {
        p.to_string()
    }
}

/// The snapshot a restore asks the server for: `latest` or a [`SnapshotPrefix`]. (A
/// server started for one snapshot streams that one only, whatever is asked.)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SnapshotChoice {
    Latest,
    Snapshot(SnapshotPrefix),
}

impl FromStr for SnapshotChoice {
    type Err = BadSnapshot;

    fn from_str(s: &str) -> Result<SnapshotChoice, BadSnapshot> {
        match s {
            "latest" => Ok(SnapshotChoice::Latest),
            _ => s
                .parse()
                .map(SnapshotChoice::Snapshot)
                .map_err(|_| BadSnapshot {
                    value: s.into(),
                    expected: "a snapshot id (`latest` or 4 to 64 lowercase hex digits)",
                }),
        }
    }
}

impl fmt::Display for SnapshotChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotChoice::Latest => f.write_str("latest"),
            SnapshotChoice::Snapshot(p) => p.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_keep_their_json_names_and_refuse_unknown_fields() {
        let p = BackupParams::from_line(
            r#"{"host":"web-1","tags":["a"],"parent":"none","require_wrapper":true}"#,
        )
        .unwrap();
        assert_eq!(
            p,
            BackupParams {
                host: Some("web-1".into()),
                tags: vec!["a".into()],
                parent: Some(Parent::None),
                require_wrapper: true,
            }
        );
        assert_eq!(BackupParams::from_line(&p.to_line()).unwrap(), p);
        // What the pbs writes today: a JSON object, maybe with a null host.
        let p = BackupParams::from_line(r#"{"host":null,"tags":[],"parent":"latest"}"#).unwrap();
        assert_eq!(p.parent, Some(Parent::Latest));
        assert!(!p.require_wrapper);
        let id = "0a1b2c3d".repeat(8);
        let p = BackupParams::from_line(&format!(r#"{{"parent":"{id}"}}"#)).unwrap();
        assert_eq!(p.parent.unwrap().to_string(), id);

        for line in ["", "  \n", "\n"] {
            assert_eq!(
                BackupParams::from_line(line).unwrap(),
                BackupParams::default()
            );
            assert_eq!(
                RestoreParams::from_line(line).unwrap(),
                RestoreParams::default()
            );
        }
        let e = BackupParams::from_line(r#"{"hots":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `hots`"), "{e}");
        let e = BackupParams::from_line(r#"{"parent":"../x"}"#).unwrap_err();
        assert!(e.to_string().contains("is not a parent"), "{e}");
        let e = RestoreParams::from_line(r#"{"require_wrapper":true,"host":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `host`"), "{e}");
        assert!(
            RestoreParams::from_line(r#"{"require_wrapper":true}"#)
                .unwrap()
                .require_wrapper
        );
    }

    #[test]
    fn snapshot_references_have_one_form() {
        for ok in ["abcd", "0123456789abcdef", &"f".repeat(64)] {
            assert_eq!(ok.parse::<SnapshotPrefix>().unwrap().as_str(), ok);
            assert_eq!(
                ok.parse::<Parent>().unwrap(),
                Parent::Snapshot(ok.parse().unwrap())
            );
        }
        for bad in [
            "",
            "abc",
            "ABCD",
            "../x",
            "latest ",
            &"f".repeat(65),
            "abcg",
        ] {
            assert!(bad.parse::<SnapshotPrefix>().is_err(), "{bad:?}");
            assert!(bad.parse::<SnapshotChoice>().is_err(), "{bad:?}");
            assert!(bad.parse::<Parent>().is_err(), "{bad:?}");
        }
        assert_eq!("latest".parse(), Ok(SnapshotChoice::Latest));
        assert!("none".parse::<SnapshotChoice>().is_err());
        assert_eq!("none".parse(), Ok(Parent::None));
        let e = "../x".parse::<SnapshotChoice>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"../x\" is not a snapshot id (`latest` or 4 to 64 lowercase hex digits)"
        );
    }
}
