//! Restoring into a directory that is not empty (`restore --overwrite MODE`), touching
//! only what must change.
//!
//! The snapshot is restored as always into a staging directory beside the target,
//! but, as a standby push does (see [`crate::standby`]), a file the target already
//! holds as the snapshot has it is not written there: [`Reuse::file`] says it is made.
//! The staging directory is then merged into the target, entry by entry: each new or
//! changed file, link or special file is renamed over its old name (one atomic step
//! each: a reader sees the old file or the new one, never a mix), a missing directory
//! is renamed in whole, and an existing one is merged into and then given its
//! recorded metadata. What the target holds that the snapshot does not is left alone
//! (as restic and borg do).
//!
//! [`Overwrite`] says what is overwritten:
//! - `if-changed`: an entry whose kind, size, mtime, mode, owner and xattrs (and link
//!   target or device number) are as recorded is kept as it is, inode and all; others
//!   are replaced. Files with several links are always written again (their links are
//!   made in the staging directory).
//! - `always`: every entry of the snapshot is written again.
//! - `never`: an existing name is never replaced; only missing entries are added.

use crate::meta::{self, NameCache};
use crate::restore::{io_err, RestoreError, RestoreStats, Reuse};
use crate::tree::{Node, NodeKind};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

/// What a restore into a non-empty directory overwrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overwrite {
    /// Entries that differ from the snapshot in content or metadata.
    IfChanged,
    /// Every entry of the snapshot.
    Always,
    /// Nothing: only missing entries are restored.
    Never,
}

impl std::fmt::Display for Overwrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Overwrite::IfChanged => "if-changed",
            Overwrite::Always => "always",
            Overwrite::Never => "never",
        })
    }
}

impl std::str::FromStr for Overwrite {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "if-changed" => Ok(Overwrite::IfChanged),
            "always" => Ok(Overwrite::Always),
            "never" => Ok(Overwrite::Never),
            _ => Err(format!("{s:?}: give if-changed, always or never")),
        }
    }
}

/// The [`Reuse`] hook of an in-place restore: keeps the target's files that need not
/// be written.
pub(crate) struct Keep<'a> {
    pub staging: &'a Path,
    pub target: &'a Path,
    pub mode: Overwrite,
    pub stats: &'a RestoreStats,
    pub is_root: bool,
    pub names: Mutex<NameCache>,
}

impl Keep<'_> {
    /// Whether the target's `old` is the file `node` records.
    fn same_file(&self, old: &Path, m: &fs::Metadata, node: &Node) -> bool {
        m.is_file()
            && m.len() == node.size
            && (m.mtime(), m.mtime_nsec()) == (node.mtime.sec, node.mtime.nsec as i64)
            && m.mode() & 0o7777 == node.mode
            && (!self.is_root || meta::has_owner(m, node, &mut self.names.lock().unwrap()))
            && meta::read_xattrs(old).is_ok_and(|x| x == node.xattrs)
    }
}

impl Reuse for Keep<'_> {
    fn file(&self, _seq: u64, path: &Path, node: &Node) -> Result<bool, RestoreError> {
        let Ok(rel) = path.strip_prefix(self.staging) else {
            return Ok(false);
        };
        let old = self.target.join(rel);
        let keep = match fs::symlink_metadata(&old) {
            Err(_) => false,
            Ok(_) if self.mode == Overwrite::Never => true,
            Ok(m) => self.mode == Overwrite::IfChanged && self.same_file(&old, &m, node),
        };
        if keep {
            self.stats.kept.fetch_add(1, Relaxed);
        }
        Ok(keep)
    }

    fn written(&self, _seq: u64, _lens: &[u32]) {}

    fn failed(&self, _seq: u64) {}
}

/// Whether two entries that are not directories are the same: kind, mode, owner,
/// mtime, size, device number, link target and xattrs.
fn same_entry(a: &Path, am: &fs::Metadata, b: &Path, bm: &fs::Metadata) -> bool {
    let link =
        |p: &Path, m: &fs::Metadata| m.file_type().is_symlink().then(|| fs::read_link(p).ok());
    am.mode() == bm.mode()
        && (am.uid(), am.gid()) == (bm.uid(), bm.gid())
        && (am.mtime(), am.mtime_nsec()) == (bm.mtime(), bm.mtime_nsec())
        && am.len() == bm.len()
        && am.rdev() == bm.rdev()
        && link(a, am) == link(b, bm)
        && (am.file_type().is_symlink() || meta::read_xattrs(a).ok() == meta::read_xattrs(b).ok())
}

/// Gives directory `to` the owner, xattrs, mode and mtime of `from`, whose metadata
/// was `f` (before entries were moved out of it, which changed its mtime).
fn copy_dir_metadata(from: &Path, f: &fs::Metadata, to: &Path, is_root: bool) -> io::Result<()> {
    let t = fs::symlink_metadata(to)?;
    if is_root && (f.uid(), f.gid()) != (t.uid(), t.gid()) {
        std::os::unix::fs::lchown(to, Some(f.uid()), Some(f.gid()))?;
    }
    let (fx, tx) = (meta::read_xattrs(from)?, meta::read_xattrs(to)?);
    if fx != tx {
        for (name, _) in &tx {
            if !fx.iter().any(|(n, _)| n == name) {
                xattr::remove(to, std::ffi::OsStr::from_bytes(name))?;
            }
        }
        for (name, value) in &fx {
            xattr::set(to, std::ffi::OsStr::from_bytes(name), value)?;
        }
    }
    if f.mode() & 0o7777 != t.mode() & 0o7777 {
        fs::set_permissions(to, fs::Permissions::from_mode(f.mode() & 0o7777))?;
    }
    if (f.mtime(), f.mtime_nsec()) != (t.mtime(), t.mtime_nsec()) {
        let node = Node {
            kind: NodeKind::Dir,
            mtime: crate::tree::Timestamp {
                sec: f.mtime(),
                nsec: f.mtime_nsec() as u32,
            },
            ..Node::default()
        };
        meta::apply_mtime(meta::Target::Path(to), &node)?;
    }
    Ok(())
}

/// Moves what `staging` holds into `target` (see the module doc), directories after
/// their contents. `staging` is left with what was not moved.
pub(crate) fn merge(
    staging: &Path,
    target: &Path,
    mode: Overwrite,
    is_root: bool,
) -> Result<(), RestoreError> {
    let mut names: Vec<_> = fs::read_dir(staging)
        .map_err(io_err(staging))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .map_err(io_err(staging))?;
    names.sort();
    for name in names {
        let (new, old) = (staging.join(&name), target.join(&name));
        let nm = fs::symlink_metadata(&new).map_err(io_err(&new))?;
        let om = match fs::symlink_metadata(&old) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(RestoreError::Io {
                    path: old,
                    source: e,
                })
            }
        };
        match om {
            None => fs::rename(&new, &old).map_err(io_err(&old))?,
            Some(om) if nm.is_dir() && om.is_dir() => {
                merge(&new, &old, mode, is_root)?;
                if mode != Overwrite::Never {
                    copy_dir_metadata(&new, &nm, &old, is_root).map_err(io_err(&old))?;
                }
            }
            Some(_) if mode == Overwrite::Never => {}
            Some(om) => {
                if mode == Overwrite::IfChanged && !nm.is_dir() && same_entry(&new, &nm, &old, &om)
                {
                    continue;
                }
                if om.is_dir() {
                    fs::remove_dir_all(&old).map_err(io_err(&old))?;
                } else if nm.is_dir() {
                    fs::remove_file(&old).map_err(io_err(&old))?;
                }
                // A file, link or special file replaces the old name in one step.
                fs::rename(&new, &old).map_err(io_err(&old))?;
            }
        }
    }
    Ok(())
}
