//! Restoring into a directory that is not empty (`restore --overwrite MODE`), touching
//! only what must change.
//!
//! The snapshot is restored as always into a staging directory (inside the target,
//! so that every rename stays on its filesystem), but, as a standby push does (see [`crate::standby`]), a file the target already
//! holds as the snapshot has it is not written there: [`Reuse::file`] says it is made.
//! The staging directory is then merged into the target, entry by entry: each new or
//! changed file, link or special file is renamed over its old name (one atomic step
//! each: a reader sees the old file or the new one, never a mix), a missing directory
//! is renamed in whole, and an existing one is merged into and then given its
//! recorded metadata. What the target holds that the snapshot does not is left alone
//! (as restic and borg do), but for an entry of another type under a name the snapshot
//! uses (a directory where the snapshot has a file), which is replaced whole.
//!
//! Safety: the target's directories are entered by descriptor, never through a
//! symlink (`O_NOFOLLOW`, and paths through `/proc/self/fd`), and metadata is set on
//! those descriptors: someone who can write below the target cannot redirect a root
//! restore elsewhere by swapping a directory for a link. An entry replaced is first
//! moved aside into the staging directory and put back if its replacement fails, so a
//! failure leaves each name with its old entry or its new one; the entries merged
//! before it stay merged.
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
use crate::tree::Node;
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
    pub last_dir: Mutex<Option<std::path::PathBuf>>,
}

impl Keep<'_> {
    /// Whether every directory between the target and `rel` is a directory of the
    /// target, not a link to one elsewhere (the merge would replace such a link).
    /// Files come a directory at a time: the last directory found is remembered.
    fn real_dirs_above(&self, rel: &Path) -> bool {
        let Some(parent) = rel.parent() else {
            return true;
        };
        let mut last = self.last_dir.lock().unwrap();
        if last.as_deref() == Some(parent) {
            return true;
        }
        let mut at = self.target.to_path_buf();
        for c in parent.components() {
            at.push(c);
            if !fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir()) {
                return false;
            }
        }
        *last = Some(parent.to_path_buf());
        true
    }

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
        if !self.real_dirs_above(rel) {
            return Ok(false);
        }
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

/// A directory of the target, held open: its entries are reached through
/// `/proc/self/fd/N/NAME`, which resolves the directory by its descriptor, so no link
/// put in its place or above it is followed.
struct Dir(fs::File);

impl Dir {
    /// Opens `path`, refusing a symlink in its last component.
    fn open(path: &Path) -> io::Result<Dir> {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(path)
            .map(Dir)
    }

    fn at(&self, name: &std::ffi::OsStr) -> std::path::PathBuf {
        use std::os::fd::AsRawFd;
        Path::new(&format!("/proc/self/fd/{}", self.0.as_raw_fd())).join(name)
    }
}

/// The xattrs this process may set and remove: all as root, `user.*` otherwise.
fn settable(name: &[u8], is_root: bool) -> bool {
    is_root || name.starts_with(b"user.")
}

/// Gives the target directory `to` the owner, xattrs, mode and mtime of the staged
/// `from`, whose metadata was `f` (before entries were moved out of it, which changed
/// its mtime).
fn copy_dir_metadata(from: &Path, f: &fs::Metadata, to: &Dir, is_root: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let t = to.0.metadata()?;
    if is_root && (f.uid(), f.gid()) != (t.uid(), t.gid()) {
        std::os::unix::fs::fchown(&to.0, Some(f.uid()), Some(f.gid()))?;
    }
    let fx = meta::read_xattrs(from)?;
    let tx = meta::read_xattrs(&to.at(std::ffi::OsStr::new(".")))?;
    if fx != tx {
        use xattr::FileExt;
        for (name, _) in &tx {
            if settable(name, is_root) && !fx.iter().any(|(n, _)| n == name) {
                to.0.remove_xattr(std::ffi::OsStr::from_bytes(name))?;
            }
        }
        for (name, value) in &fx {
            if settable(name, is_root) {
                to.0.set_xattr(std::ffi::OsStr::from_bytes(name), value)?;
            }
        }
    }
    if f.mode() & 0o7777 != t.mode() & 0o7777 {
        to.0.set_permissions(fs::Permissions::from_mode(f.mode() & 0o7777))?;
    }
    let ts = libc::timespec {
        tv_sec: f.mtime() as libc::time_t,
        tv_nsec: f.mtime_nsec() as _,
    };
    if unsafe { libc::futimens(to.0.as_raw_fd(), [ts, ts].as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Renames `from` (of metadata `m`) to `to`. Moving a directory to another parent
/// writes its `..`: a directory its owner may not write (a recorded 0555) is made
/// writable for the move and given its mode back.
fn moved(from: &Path, m: &fs::Metadata, to: &Path, is_root: bool) -> io::Result<()> {
    let locked = !is_root && m.is_dir() && m.mode() & 0o200 == 0;
    if locked {
        fs::set_permissions(from, fs::Permissions::from_mode(m.mode() & 0o7777 | 0o200))?;
    }
    fs::rename(from, to)?;
    if locked {
        fs::set_permissions(to, fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    Ok(())
}

/// Moves what the staged directory `staging` holds into the target directory
/// `target` (see the module doc), directories after their contents. Entries replaced
/// go into `trash`; the staging area `area` (inside `target`) is left out.
pub(crate) fn merge(
    staging: &Path,
    target: &Path,
    trash: &Path,
    area: &Path,
    mode: Overwrite,
    is_root: bool,
) -> Result<(), RestoreError> {
    let dir = Dir::open(target).map_err(io_err(target))?;
    let skip = area.file_name().map(|n| n.to_os_string());
    let mut trashed = 0u64;
    merge_dir(
        staging,
        &dir,
        target,
        trash,
        &mut trashed,
        skip.as_deref(),
        mode,
        is_root,
    )
}

#[allow(clippy::too_many_arguments)]
fn merge_dir(
    staging: &Path,
    target: &Dir,
    shown: &Path,
    trash: &Path,
    trashed: &mut u64,
    skip: Option<&std::ffi::OsStr>,
    mode: Overwrite,
    is_root: bool,
) -> Result<(), RestoreError> {
    let mut names: Vec<_> = fs::read_dir(staging)
        .map_err(io_err(staging))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .map_err(io_err(staging))?;
    names.sort();
    // Entries go into the target's directory: its owner may write there even when its
    // mode does not say so (the final mode is set after).
    let own = target.0.metadata().map_err(io_err(shown))?;
    if !is_root && own.mode() & 0o200 == 0 {
        target
            .0
            .set_permissions(fs::Permissions::from_mode(own.mode() & 0o7777 | 0o700))
            .map_err(io_err(shown))?;
    }
    for name in names {
        if Some(name.as_os_str()) == skip {
            continue;
        }
        let (new, old) = (staging.join(&name), target.at(&name));
        let shown_old = shown.join(&name);
        let nm = fs::symlink_metadata(&new).map_err(io_err(&new))?;
        let om = match fs::symlink_metadata(&old) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(RestoreError::Io {
                    path: shown_old,
                    source: e,
                })
            }
        };
        match om {
            None => moved(&new, &nm, &old, is_root).map_err(io_err(&shown_old))?,
            Some(om) if nm.is_dir() && om.is_dir() => {
                // Staged directories have their recorded modes: this process must
                // still move entries out of it.
                fs::set_permissions(&new, fs::Permissions::from_mode(0o700))
                    .map_err(io_err(&new))?;
                let sub = Dir::open(&old).map_err(io_err(&shown_old))?;
                merge_dir(&new, &sub, &shown_old, trash, trashed, None, mode, is_root)?;
                if mode != Overwrite::Never {
                    copy_dir_metadata(&new, &nm, &sub, is_root).map_err(io_err(&shown_old))?;
                }
            }
            Some(_) if mode == Overwrite::Never => {}
            Some(om) => {
                // A file of several links is written again: its names are linked in
                // the staging directory, and keeping one old name would split them.
                if mode == Overwrite::IfChanged
                    && !nm.is_dir()
                    && nm.nlink() == 1
                    && same_entry(&new, &nm, &old, &om)
                {
                    continue;
                }
                // The old entry goes aside first, and comes back if the new one cannot
                // take its place.
                let aside = trash.join(trashed.to_string());
                *trashed += 1;
                fs::rename(&old, &aside).map_err(io_err(&shown_old))?;
                if let Err(e) = moved(&new, &nm, &old, is_root) {
                    let _ = fs::rename(&aside, &old);
                    return Err(RestoreError::Io {
                        path: shown_old,
                        source: e,
                    });
                }
            }
        }
    }
    if !is_root && own.mode() & 0o200 == 0 && mode == Overwrite::Never {
        target
            .0
            .set_permissions(fs::Permissions::from_mode(own.mode() & 0o7777))
            .map_err(io_err(shown))?;
    }
    Ok(())
}
