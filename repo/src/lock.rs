//! Repository locks, and when a lock is stale.
//!
//! Operations that only add data or read (backups, checks, restores) take a **shared**
//! lock, and so does `forget` (it removes snapshot files, never data). Key removal and
//! repairs take an **exclusive** one. A prune takes a **prune** lock: shared, so pulls
//! go on beside it, but excluding another prune (its safety rests on its lock holders
//! instead, see `crate::prune`). An exclusive lock conflicts with every lock. Locks are sealed objects in `locks/` (an observer of the storage learns
//! nothing from them).
//!
//! Stale-lock rules (a stale lock is ignored, and removed by `unlock`):
//! 1. A lock not refreshed for [`STALE_AFTER`] (30 minutes) is stale: its holder
//!    refreshes it every [`REFRESH_EVERY`] (5 minutes) while it runs, so it is gone.
//! 2. A lock written on this machine since it booted (same boot id, or the same
//!    hostname when the lock has none), in this PID namespace, by a process that no
//!    longer exists is stale at once.
//! 3. A lock that cannot be read (damaged, or sealed under another key) counts as an
//!    exclusive lock of an unknown holder and is never stale: `unlock --all` removes it.
//!
//! Taking a lock: check for conflicts, write the lock, then check again, so that two
//! processes racing for an exclusive lock cannot both win (each sees the other's lock
//! on the second look, and the later one backs off).
//!
//! Reading without a lock ([`Repository::lock_for_reading`]): an operation that only
//! reads must not need free space in the repository (issue 14: a restore from a full
//! disk). When its shared lock cannot be written (the disk is full, read-only, or not
//! writable by this user) it still refuses to start beside an exclusive lock, then goes
//! on without a lock, with a warning; `--no-lock` asks for that from the start, and
//! skips the look at other locks too, as restic's does. The risk is the one restic
//! names: an operation that deletes data (prune), started meanwhile, cannot see the
//! reader and may remove what it is about to read; the reader then fails, it never
//! changes anything.

use crate::backend::Backend;
use crate::backend::FileType;
use crate::crypto::Key;
use crate::error::{Error, Result};
use crate::format::lock_file::LockFile;
use crate::repository::Repository;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A lock older than this is stale.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);
/// How often a held lock is refreshed.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);

const AD: &[u8] = b"haul lock v1";

/// A held lock; released (its file removed) on drop. It owns what it needs (the
/// storage and the key), so a refresher thread can keep it fresh.
pub struct LockGuard {
    backend: Arc<dyn Backend>,
    key: Key,
    kind: LockKind,
    purpose: String,
    holder: String,
    name: Arc<Mutex<String>>,
    refresher: Option<haul_protocol::Ticker>,
    /// When the lock file was last written, and whether it ever went unwritten too long.
    freshness: Arc<Mutex<Freshness>>,
}

/// The time a holder last wrote into its lock file (taken before the write, as the
/// file says), by the wall clock and the monotonic one.
struct Freshness {
    wall: chrono::DateTime<chrono::Utc>,
    mono: std::time::Instant,
    /// Set for good once the lock went unwritten so long that others may have taken it
    /// for stale: the minutes it went unwritten.
    lost: Option<u64>,
}

impl Freshness {
    fn new(wall: chrono::DateTime<chrono::Utc>, mono: std::time::Instant) -> Self {
        Freshness {
            wall,
            mono,
            lost: None,
        }
    }

    /// Notes that `now` has come without a newer write (by either clock).
    fn note(&mut self, wall: chrono::DateTime<chrono::Utc>, mono: std::time::Instant) {
        let by_wall = wall
            .signed_duration_since(self.wall)
            .to_std()
            .unwrap_or_default();
        let gap = by_wall.max(mono.saturating_duration_since(self.mono));
        if gap + REFRESH_EVERY >= STALE_AFTER && self.lost.is_none() {
            self.lost = Some(gap.as_secs() / 60);
        }
    }

    /// Notes a write made with the time `wall` in the file.
    fn written(&mut self, wall: chrono::DateTime<chrono::Utc>, mono: std::time::Instant) {
        self.note(wall, mono);
        (self.wall, self.mono) = (wall, mono);
    }
}

/// What a lock lets its holder do beside others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    Shared,
    /// Shared, but not beside another prune.
    Prune,
    Exclusive,
}

impl LockKind {
    fn of(lock: &LockFile) -> LockKind {
        match (lock.exclusive, lock.prune) {
            (true, _) => LockKind::Exclusive,
            (false, true) => LockKind::Prune,
            (false, false) => LockKind::Shared,
        }
    }

    fn conflicts_with(self, other: LockKind) -> bool {
        use LockKind::*;
        matches!(
            (self, other),
            (Exclusive, _) | (_, Exclusive) | (Prune, Prune)
        )
    }

    fn describe(self) -> &'static str {
        match self {
            LockKind::Shared => "a shared",
            LockKind::Prune => "a prune",
            LockKind::Exclusive => "an exclusive",
        }
    }
}

/// A lock as `unlock` and error messages describe it.
#[derive(Debug, Clone)]
pub struct LockInfo {
    pub name: String,
    pub lock: Option<LockFile>,
    pub stale: bool,
}

impl LockInfo {
    fn holder(&self) -> String {
        match &self.lock {
            Some(l) => format!(
                "{} lock of `{}` (pid {} on {}, refreshed {})",
                LockKind::of(l).describe(),
                l.purpose,
                l.pid,
                l.hostname,
                l.time.format("%Y-%m-%d %H:%M:%S UTC")
            ),
            None => "an unreadable lock".to_string(),
        }
    }
}

fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// This machine's boot id (empty when it cannot be told).
fn boot_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
    .clone()
}

/// This process's PID namespace (0 when it cannot be told).
fn pid_namespace() -> u64 {
    use std::os::unix::fs::MetadataExt;
    static NS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *NS.get_or_init(|| std::fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino()))
}

fn process_exists(pid: u32) -> bool {
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn write_lock(
    backend: &dyn Backend,
    key: &Key,
    kind: LockKind,
    purpose: &str,
    holder: &str,
    time: chrono::DateTime<chrono::Utc>,
) -> Result<String> {
    let lock = LockFile {
        exclusive: kind == LockKind::Exclusive,
        prune: kind == LockKind::Prune,
        holder: holder.to_string(),
        time,
        hostname: this_host(),
        pid: std::process::id(),
        pid_ns: pid_namespace(),
        boot_id: boot_id(),
        purpose: purpose.to_string(),
    };
    let plain = serde_json::to_vec(&lock).expect("lock serializes");
    crate::repository::write_named(backend, key, FileType::Lock, AD, &plain)
}

/// Whether `e` says the repository cannot take a new file: a full disk or quota, a
/// read-only filesystem, no permission to write.
fn cannot_write(e: &Error) -> bool {
    match e {
        Error::Io { source, .. } => {
            e.is_disk_full()
                || matches!(
                    source.kind(),
                    std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied
                )
                || matches!(
                    source.raw_os_error(),
                    Some(libc::EROFS) | Some(libc::EACCES)
                )
        }
        _ => false,
    }
}

/// Whether a lock is stale by the rules in the module doc, at time `now`.
pub fn is_stale(lock: &LockFile, now: chrono::DateTime<chrono::Utc>, host: &str) -> bool {
    let age = now.signed_duration_since(lock.time);
    if age.to_std().is_ok_and(|a| a > STALE_AFTER) {
        return true;
    }
    let ns = pid_namespace();
    // Same machine and boot; where either PID namespace is unknown, the same name too
    // (containers of one machine share its boot id).
    let this_machine =
        lock.hostname == host || (!lock.boot_id.is_empty() && lock.pid_ns != 0 && ns != 0);
    let same_boot = lock.boot_id.is_empty() || lock.boot_id == boot_id();
    this_machine
        && same_boot
        && (lock.pid_ns == 0 || lock.pid_ns == ns)
        && lock.pid != std::process::id()
        && !process_exists(lock.pid)
}

impl Repository {
    /// Every lock in the repository, with its staleness.
    pub fn locks(&self) -> Result<Vec<LockInfo>> {
        let now = chrono::Utc::now();
        let host = this_host();
        let mut out = Vec::new();
        for (name, _) in self.backend().list(FileType::Lock)? {
            let lock = match self.backend().read(FileType::Lock, &name) {
                Ok(sealed) => self
                    .data_key()
                    .open(AD, &sealed, "lock")
                    .ok()
                    .and_then(|p| serde_json::from_slice::<LockFile>(&p).ok()),
                // Removed between list and read: released.
                Err(Error::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            let stale = lock.as_ref().is_some_and(|l| is_stale(l, now, &host));
            out.push(LockInfo { name, lock, stale });
        }
        Ok(out)
    }

    /// Takes a lock; fails with [`Error::Locked`] naming the holder on a conflict.
    pub fn lock(&self, kind: LockKind, purpose: &str) -> Result<LockGuard> {
        self.check_conflicts(kind, None)?;
        let mut id = [0u8; 16];
        getrandom::getrandom(&mut id).expect("OS random numbers");
        let holder = hex::encode(id);
        let (wall, mono) = (chrono::Utc::now(), std::time::Instant::now());
        let name = write_lock(
            self.backend().as_ref(),
            self.data_key(),
            kind,
            purpose,
            &holder,
            wall,
        )
        .map_err(|e| match e {
            Error::Io { what, source } => Error::Io {
                what: format!(
                    "cannot write a lock in repository {}: {what}",
                    self.backend().location()
                ),
                source,
            },
            other => other,
        })?;
        if let Err(e) = self.check_conflicts(kind, Some(&name)) {
            let _ = self.backend().delete(FileType::Lock, &name);
            return Err(e);
        }
        Ok(LockGuard {
            backend: self.backend().clone(),
            key: self.data_key().clone(),
            kind,
            purpose: purpose.to_string(),
            holder,
            name: Arc::new(Mutex::new(name)),
            refresher: None,
            freshness: Arc::new(Mutex::new(Freshness::new(wall, mono))),
        })
    }

    /// A shared lock for an operation that only reads (see the module doc): `None`
    /// when none was written, because `write` is false (`--no-lock`) or because the
    /// repository cannot take one (full, read-only, or not writable by this user).
    pub fn lock_for_reading(&self, write: bool, purpose: &str) -> Result<Option<LockGuard>> {
        if !write {
            return Ok(None);
        }
        match self.lock(LockKind::Shared, purpose) {
            Ok(guard) => Ok(Some(guard)),
            Err(e) if cannot_write(&e) => {
                tracing::warn!("{purpose} goes on without a lock: {e}");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn check_conflicts(&self, kind: LockKind, own: Option<&str>) -> Result<()> {
        for info in self.locks()? {
            if Some(info.name.as_str()) == own || info.stale {
                continue;
            }
            // An unreadable lock counts as an exclusive one.
            let other = info.lock.as_ref().map_or(LockKind::Exclusive, LockKind::of);
            if kind.conflicts_with(other) {
                return Err(Error::Locked {
                    what: format!("repository {}", self.backend().location()),
                    holder: info.holder(),
                    path: format!(
                        "lock {} (haul-pbs unlock removes stale locks)",
                        &info.name[..16]
                    ),
                });
            }
        }
        Ok(())
    }

    /// The holders of the live locks other than `own`'s (an unreadable lock is a
    /// holder of its own): what a prune's sweep waits for.
    pub fn lock_holders(&self, own: &LockGuard) -> Result<std::collections::HashSet<String>> {
        Ok(self
            .locks()?
            .into_iter()
            .filter(|info| !info.stale)
            .map(|info| match info.lock {
                Some(l) if !l.holder.is_empty() => l.holder,
                // Written by an older haul, whose lock changes name on every refresh:
                // one holder for them all, so a sweep waits until none is left.
                Some(_) => "a lock without a holder id".to_string(),
                None => format!("unreadable lock {}", info.name),
            })
            .filter(|h| *h != own.holder)
            .collect())
    }

    /// Waits until none of `holders` holds a live lock any more, looking every
    /// `poll`; `false` if some still did at `deadline`.
    pub fn wait_for_holders(
        &self,
        own: &LockGuard,
        holders: &std::collections::HashSet<String>,
        deadline: std::time::Instant,
        poll: Duration,
    ) -> Result<bool> {
        loop {
            let live = self.lock_holders(own)?;
            if holders.is_disjoint(&live) {
                return Ok(true);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            std::thread::sleep(poll.min(deadline - now));
        }
    }

    /// Removes stale locks (all locks with `all`); returns how many.
    pub fn unlock(&self, all: bool) -> Result<usize> {
        let mut removed = 0;
        for info in self.locks()? {
            if all || info.stale {
                match self.backend().delete(FileType::Lock, &info.name) {
                    Ok(()) | Err(Error::NotFound { .. }) => removed += 1,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(removed)
    }
}

impl LockGuard {
    /// Keeps the lock fresh from a background thread until the guard is dropped, for
    /// operations that may outlive [`REFRESH_EVERY`]: a new lock is written, then the
    /// old one removed, so the lock is never absent.
    pub fn refresh_in_background(&mut self) {
        if self.refresher.is_some() {
            return;
        }
        let (backend, key, name) = (self.backend.clone(), self.key.clone(), self.name.clone());
        let (kind, purpose, holder) = (self.kind, self.purpose.clone(), self.holder.clone());
        let freshness = self.freshness.clone();
        let refresh = move || {
            let (wall, mono) = (chrono::Utc::now(), std::time::Instant::now());
            match write_lock(backend.as_ref(), &key, kind, &purpose, &holder, wall) {
                Ok(new) => {
                    let mut f = freshness.lock().expect("lock time");
                    // A write that took long left the old file alone meanwhile.
                    f.note(chrono::Utc::now(), std::time::Instant::now());
                    f.written(wall, mono);
                    drop(f);
                    let old = std::mem::replace(&mut *name.lock().expect("lock name"), new);
                    let _ = backend.delete(FileType::Lock, &old);
                }
                Err(e) => tracing::warn!("could not refresh the repository lock: {e}"),
            }
        };
        self.refresher = Some(haul_protocol::Ticker::start(REFRESH_EVERY, refresh, || {}));
    }

    /// Fails with [`Error::LockLost`] once the lock went unwritten so long (by the
    /// wall clock or the monotonic one, at any time since it was taken) that others
    /// may have taken it for stale (see the module doc): a session must not commit,
    /// nor a prune delete, on the strength of a lock others may have ignored. The
    /// margin is [`REFRESH_EVERY`].
    pub fn ensure_fresh(&self, what: &str) -> Result<()> {
        let mut f = self.freshness.lock().expect("lock time");
        f.note(chrono::Utc::now(), std::time::Instant::now());
        match f.lost {
            None => Ok(()),
            Some(minutes) => Err(Error::LockLost {
                what: what.to_string(),
                minutes,
            }),
        }
    }
}

#[cfg(test)]
impl LockGuard {
    /// Makes the lock look last written `by` earlier (as after refreshes that failed).
    pub(crate) fn age_for_tests(&self, by: Duration) {
        let mut f = self.freshness.lock().expect("lock time");
        f.wall -= chrono::Duration::from_std(by).expect("a short duration");
        f.mono = f.mono.checked_sub(by).expect("the clock has run that long");
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        drop(self.refresher.take()); // stops the refresher at once
        let name = self.name.lock().expect("lock name").clone();
        if let Err(e) = self.backend.delete(FileType::Lock, &name) {
            tracing::warn!("could not remove the repository lock {name}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::crypto::KdfParams;
    use crate::format::config::RepoConfig;
    use std::sync::Arc;

    fn repo() -> Repository {
        let kdf = KdfParams {
            m_cost: 64,
            t_cost: 1,
            p_cost: 1,
        };
        Repository::init(
            Arc::new(MemoryBackend::default()),
            b"pw",
            kdf,
            RepoConfig::new(3),
        )
        .unwrap()
    }

    fn plant(repo: &Repository, lock: &LockFile) -> String {
        let sealed = repo.data_key().seal(AD, &serde_json::to_vec(lock).unwrap());
        let name = blake3::hash(&sealed).to_hex().to_string();
        repo.backend()
            .write_once(FileType::Lock, &name, &sealed)
            .unwrap();
        name
    }

    #[test]
    fn shared_locks_coexist_and_exclusive_excludes() {
        let repo = repo();
        let a = repo.lock(LockKind::Shared, "backup-local").unwrap();
        let b = repo.lock(LockKind::Shared, "check").unwrap();
        let err = repo.lock(LockKind::Exclusive, "key remove").err().unwrap();
        // Either holder may be named: locks are listed in no set order.
        let msg = err.to_string();
        assert!(
            msg.contains("a shared lock of `backup-local`")
                || msg.contains("a shared lock of `check`"),
            "{msg}"
        );
        assert!(matches!(err, Error::Locked { .. }));
        assert!(err.is_retryable());
        drop(a);
        drop(b);
        assert!(
            repo.locks().unwrap().is_empty(),
            "guards remove their locks"
        );
        let x = repo.lock(LockKind::Exclusive, "key remove").unwrap();
        let err = repo.lock(LockKind::Shared, "backup-local").err().unwrap();
        assert!(
            err.to_string()
                .contains("an exclusive lock of `key remove`"),
            "{err}"
        );
        drop(x);
        repo.lock(LockKind::Shared, "backup-local").unwrap();
    }

    #[test]
    fn a_prune_runs_beside_backups_but_not_beside_another_prune() {
        let repo = repo();
        let backup = repo.lock(LockKind::Shared, "backup").unwrap();
        let mut prune = repo.lock(LockKind::Prune, "prune").unwrap();
        let err = repo.lock(LockKind::Prune, "prune").err().unwrap();
        assert!(err.to_string().contains("a prune lock of `prune`"), "{err}");
        assert!(repo.lock(LockKind::Exclusive, "key remove").is_err());
        let late = repo.lock(LockKind::Shared, "backup").unwrap();
        // The sweep waits for holders, whose lock files change name on refresh.
        let holders = repo.lock_holders(&prune).unwrap();
        assert_eq!(holders.len(), 2);
        assert!(!holders.contains(&prune.holder));
        prune.refresh_in_background();
        let never = std::time::Instant::now() + Duration::from_millis(50);
        assert!(!repo
            .wait_for_holders(&prune, &holders, never, Duration::from_millis(10))
            .unwrap());
        drop(backup);
        drop(late);
        let soon = std::time::Instant::now() + Duration::from_secs(5);
        assert!(repo
            .wait_for_holders(&prune, &holders, soon, Duration::from_millis(10))
            .unwrap());
    }

    #[test]
    fn a_lock_not_refreshed_for_25_minutes_is_lost_to_its_holder_for_good() {
        let repo = repo();
        let mut lock = repo.lock(LockKind::Shared, "backup").unwrap();
        lock.ensure_fresh("backup session").unwrap();
        lock.age_for_tests(Duration::from_secs(24 * 60));
        lock.ensure_fresh("backup session").unwrap();
        lock.age_for_tests(Duration::from_secs(2 * 60));
        let err = lock.ensure_fresh("backup session").unwrap_err();
        assert!(matches!(err, Error::LockLost { minutes: 26, .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "the lock of this backup session could not be refreshed for 26 minutes, so a prune may no longer wait for it: nothing more is written; run it again"
        );
        assert!(err.is_retryable());
        // A refresh that succeeds later does not make it safe again: others may have
        // ignored it meanwhile.
        let (wall, mono) = (chrono::Utc::now(), std::time::Instant::now());
        lock.freshness.lock().unwrap().written(wall, mono);
        assert!(lock.ensure_fresh("backup session").is_err());
        lock.refresh_in_background();
        drop(lock);
    }

    #[test]
    fn stale_locks_are_ignored_and_removed_by_unlock() {
        let repo = repo();
        let host = this_host();
        // Rule 1: not refreshed for longer than STALE_AFTER, wherever it was taken.
        let old = LockFile {
            exclusive: true,
            prune: false,
            holder: "old".into(),
            pid_ns: 0,
            boot_id: String::new(),
            time: chrono::Utc::now() - chrono::Duration::minutes(31),
            hostname: "elsewhere".into(),
            pid: 1,
            purpose: "prune".into(),
        };
        plant(&repo, &old);
        // Rule 2: this host, a pid that does not exist.
        let mut dead = old.clone();
        dead.time = chrono::Utc::now();
        dead.hostname = host.clone();
        dead.pid = 0x3fff_fff0;
        plant(&repo, &dead);
        // A fresh lock of a live process elsewhere is not stale.
        let mut live = old.clone();
        live.time = chrono::Utc::now() - chrono::Duration::minutes(29);
        live.exclusive = false;
        plant(&repo, &live);
        // A dead pid of another machine of the same name (another boot id) says
        // nothing of that machine's processes.
        let mut elsewhere = dead.clone();
        elsewhere.boot_id = "another machine".into();
        elsewhere.exclusive = false;
        plant(&repo, &elsewhere);
        let stale: Vec<bool> = {
            let mut v: Vec<bool> = repo.locks().unwrap().iter().map(|l| l.stale).collect();
            v.sort();
            v
        };
        assert_eq!(stale, vec![false, false, true, true]);
        // Stale exclusive locks do not block a backup; the live shared one blocks prune.
        drop(repo.lock(LockKind::Shared, "backup-local").unwrap());
        assert!(repo.lock(LockKind::Exclusive, "key remove").is_err());
        assert_eq!(repo.unlock(false).unwrap(), 2);
        assert_eq!(repo.locks().unwrap().len(), 2);
        assert_eq!(repo.unlock(true).unwrap(), 2);
        repo.lock(LockKind::Exclusive, "key remove").unwrap();
    }
}
