//! Storage under a repository: a small trait, its contracts, and its implementations.
//!
//! A backend stores named, immutable objects of a few [`FileType`]s. It knows nothing of
//! encryption or formats. Cross-cutting behaviour (append-only, later retries and
//! limits) wraps a backend as a decorator, one per file.
//!
//! Contracts every implementation keeps (and `tests::conformance` checks):
//! - `write_once` is atomic and durable: after it returns `Ok`, the object is complete
//!   on stable storage under its name; a crash before that leaves no object of that
//!   name (partial data may remain only under temporary names that `list` never
//!   returns). Writing an existing name fails with [`Error::AlreadyExists`] and leaves
//!   the existing object untouched.
//! - `read` and `read_range` are idempotent and return exactly the bytes written. A
//!   missing object is [`Error::NotFound`] (permanent); a range past the end is
//!   [`Error::Corrupt`] (a short read is never returned as success).
//! - `list` returns every complete object of a type with its size, in no set order.
//! - `delete` of a missing object is [`Error::NotFound`].
//! - `move_aside` takes a damaged object out of its type's namespace but keeps its
//!   bytes, for an operator to look at (`haul-pbs repair`): afterwards `list` does not
//!   return it and reading it is [`Error::NotFound`]; a missing object is
//!   [`Error::NotFound`]. An object moved aside twice under one name keeps both copies.
//! - An [`ObjectWriter`] is `write_once` in pieces: nothing is visible under any name
//!   until `finish`, which has `write_once`'s semantics; a writer dropped without
//!   `finish` leaves nothing behind. Packs are streamed this way, so a 16 MiB pack
//!   never sits in memory.

mod append_only;
mod local;
mod memory;
mod s3;

pub use append_only::AppendOnly;
pub use local::LocalBackend;
pub use memory::MemoryBackend;
pub use s3::{S3Backend, S3Credentials, S3Location};

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a repository lives: a local directory, or a prefix in an S3 bucket
/// (`s3:https://host:port/bucket/prefix`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    Local(PathBuf),
    S3(S3Location),
}

impl Location {
    /// `s3:...` is object storage; anything else a directory.
    pub fn parse(s: &str) -> Result<Location> {
        match S3Location::parse(s) {
            Some(l) => Ok(Location::S3(l?)),
            None => Ok(Location::Local(PathBuf::from(s))),
        }
    }

    /// A repository named `name` inside this place (a directory's entry, or the
    /// prefix's next part).
    pub fn join(&self, name: &str) -> Location {
        match self {
            Location::Local(p) => Location::Local(p.join(name)),
            Location::S3(l) => Location::S3(l.join(name)),
        }
    }

    /// The local directory, if it is one.
    pub fn as_local(&self) -> Option<&Path> {
        match self {
            Location::Local(p) => Some(p),
            Location::S3(_) => None,
        }
    }

    /// Opens the repository there. Object-storage credentials come from `credentials`
    /// (a file of `NAME=value` lines) if given, else from the environment.
    pub fn open(&self, credentials: Option<&Path>) -> Result<Arc<dyn Backend>> {
        Ok(match self {
            Location::Local(p) => Arc::new(LocalBackend::open(p)?),
            Location::S3(l) => Arc::new(S3Backend::open(l, &S3Credentials::load(credentials)?)?),
        })
    }

    /// Makes a new, empty repository there (see [`LocalBackend::create`],
    /// [`S3Backend::create`]).
    pub fn create(&self, credentials: Option<&Path>) -> Result<Arc<dyn Backend>> {
        Ok(match self {
            Location::Local(p) => Arc::new(LocalBackend::create(p)?),
            Location::S3(l) => Arc::new(S3Backend::create(l, &S3Credentials::load(credentials)?)?),
        })
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::S3(l) => l.fmt(f),
        }
    }
}

use crate::error::Result;

/// The kinds of object a repository holds, each in its own namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileType {
    /// The single `config` object (its name is always `config`).
    Config,
    Key,
    /// Packs.
    Data,
    Index,
    Snapshot,
    Lock,
    /// A prune's condemnation records: packs to delete once no session can still be
    /// using them (see `crate::prune`).
    Condemned,
    /// Markers of completed condemnations: a process whose index view predates the
    /// newest one reloads it (see `crate::prune`).
    Epoch,
}

impl FileType {
    pub fn dir(self) -> &'static str {
        match self {
            FileType::Config => "",
            FileType::Key => "keys",
            FileType::Data => "data",
            FileType::Index => "index",
            FileType::Snapshot => "snapshots",
            FileType::Lock => "locks",
            FileType::Condemned => "condemned",
            FileType::Epoch => "epochs",
        }
    }

    pub const ALL: [FileType; 8] = [
        FileType::Config,
        FileType::Key,
        FileType::Data,
        FileType::Index,
        FileType::Snapshot,
        FileType::Lock,
        FileType::Condemned,
        FileType::Epoch,
    ];
}

impl std::fmt::Display for FileType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileType::Config => "config",
            FileType::Key => "key",
            FileType::Data => "pack",
            FileType::Index => "index file",
            FileType::Snapshot => "snapshot",
            FileType::Lock => "lock",
            FileType::Condemned => "condemnation record",
            FileType::Epoch => "prune epoch",
        })
    }
}

/// The storage under a repository. See the module doc for the contracts.
pub trait Backend: Send + Sync {
    /// Where the repository lives, for messages.
    fn location(&self) -> String;
    /// Every complete object of type `t`: (name, size in bytes).
    fn list(&self, t: FileType) -> Result<Vec<(String, u64)>>;
    fn read(&self, t: FileType, name: &str) -> Result<Vec<u8>>;
    /// Exactly `length` bytes from `offset`.
    fn read_range(&self, t: FileType, name: &str, offset: u64, length: u32) -> Result<Vec<u8>>;
    /// Stores a new object; never replaces one.
    fn write_once(&self, t: FileType, name: &str, data: &[u8]) -> Result<()>;
    fn delete(&self, t: FileType, name: &str) -> Result<()>;
    /// Moves a damaged object aside (see the module doc); returns where it went, for
    /// messages.
    fn move_aside(&self, t: FileType, name: &str) -> Result<String>;
    /// Starts a new object of type `t` whose name is given when it is finished. The
    /// writer owns what it needs: a session that owns its repository (through an
    /// `Arc`) can keep one open.
    fn writer(&self, t: FileType) -> Result<Box<dyn ObjectWriter>>;
    /// Whether each read is a network round trip (object storage): the repository then
    /// keeps a local copy of its tree packs (see `crate::pack_cache`).
    fn is_remote(&self) -> bool {
        false
    }
}

/// A new object written in pieces (see the module doc).
pub trait ObjectWriter: std::io::Write + Send {
    /// Makes the bytes written durable and visible as `name`.
    fn finish(self: Box<Self>, name: &str) -> Result<()>;
}

/// Object names: lower-case hex (or `config`). Refusing anything else keeps names from
/// escaping their directory.
pub(crate) fn check_name(t: FileType, name: &str) -> Result<()> {
    let ok = match t {
        FileType::Config => name == "config",
        _ => {
            name.len() >= 4
                && name.len() <= 128
                && name
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        }
    };
    if ok {
        Ok(())
    } else {
        Err(crate::Error::InvalidInput(format!(
            "{name:?} is not a valid {t} name"
        )))
    }
}

/// The contract tests every backend passes, public so that the integration tests can
/// run them against a real object store.
#[doc(hidden)]
pub mod contract {
    use super::*;
    use crate::Error;
    use std::io::Write;

    /// The conformance suite every backend runs.
    pub fn conformance(b: &dyn Backend) {
        let name = "ab".repeat(32);
        assert!(b.list(FileType::Data).unwrap().is_empty());
        b.write_once(FileType::Data, &name, b"hello world").unwrap();
        assert_eq!(b.read(FileType::Data, &name).unwrap(), b"hello world");
        assert_eq!(b.read_range(FileType::Data, &name, 6, 5).unwrap(), b"world");
        assert!(matches!(
            b.read_range(FileType::Data, &name, 6, 6),
            Err(Error::Corrupt { .. })
        ));
        assert_eq!(b.list(FileType::Data).unwrap(), vec![(name.clone(), 11)]);
        assert!(matches!(
            b.write_once(FileType::Data, &name, b"other"),
            Err(Error::AlreadyExists { .. })
        ));
        assert_eq!(b.read(FileType::Data, &name).unwrap(), b"hello world");
        assert!(matches!(
            b.read(FileType::Index, &name),
            Err(Error::NotFound { .. })
        ));
        assert!(b.write_once(FileType::Data, "../etc", b"x").is_err());
        b.write_once(FileType::Config, "config", b"c").unwrap();
        assert_eq!(
            b.list(FileType::Config).unwrap(),
            vec![("config".to_string(), 1)]
        );
        b.delete(FileType::Data, &name).unwrap();
        assert!(matches!(
            b.delete(FileType::Data, &name),
            Err(Error::NotFound { .. })
        ));
        assert!(b.list(FileType::Data).unwrap().is_empty());

        // Moved aside: gone from its namespace, twice under one name without loss.
        let snap = "cd".repeat(32);
        b.write_once(FileType::Snapshot, &snap, b"damaged").unwrap();
        let first = b.move_aside(FileType::Snapshot, &snap).unwrap();
        assert!(b.list(FileType::Snapshot).unwrap().is_empty());
        assert!(matches!(
            b.read(FileType::Snapshot, &snap),
            Err(Error::NotFound { .. })
        ));
        b.write_once(FileType::Snapshot, &snap, b"again").unwrap();
        let second = b.move_aside(FileType::Snapshot, &snap).unwrap();
        assert_ne!(first, second);
        assert!(matches!(
            b.move_aside(FileType::Snapshot, &snap),
            Err(Error::NotFound { .. })
        ));

        // Written in pieces: nothing visible before `finish`, nothing left by a
        // writer dropped unfinished, a large object whole (a pack is 16 MiB), a
        // second `finish` to one name refused.
        let big: Vec<u8> = (0..(17u32 << 20) + 12345)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let pack = "ef".repeat(32);
        let mut w = b.writer(FileType::Data).unwrap();
        for piece in big.chunks(1 << 20) {
            w.write_all(piece).unwrap();
        }
        assert!(b.list(FileType::Data).unwrap().is_empty());
        w.finish(&pack).unwrap();
        assert_eq!(
            b.list(FileType::Data).unwrap(),
            vec![(pack.clone(), big.len() as u64)]
        );
        assert!(b.read(FileType::Data, &pack).unwrap() == big);
        let at = (9u64 << 20) - 7;
        assert_eq!(
            b.read_range(FileType::Data, &pack, at, 4096).unwrap(),
            &big[at as usize..at as usize + 4096]
        );
        let mut again = b.writer(FileType::Data).unwrap();
        again.write_all(b"not the same").unwrap();
        assert!(matches!(
            again.finish(&pack),
            Err(Error::AlreadyExists { .. })
        ));
        let mut dropped = b.writer(FileType::Index).unwrap();
        dropped.write_all(b"half").unwrap();
        drop(dropped);
        assert!(b.list(FileType::Index).unwrap().is_empty());
        b.delete(FileType::Data, &pack).unwrap();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::contract::conformance;
    use super::*;

    #[test]
    fn memory_backend_conforms() {
        conformance(&MemoryBackend::default());
    }

    #[test]
    fn local_backend_removes_temporary_files_of_dead_processes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let b = LocalBackend::create(&root).unwrap();
        b.write_once(FileType::Config, "config", b"c").unwrap();
        let dead = root.join("tmp").join(format!("{}-0.tmp", 0x3fff_fff0));
        let live = root
            .join("tmp")
            .join(format!("{}-0.tmp", std::process::id()));
        std::fs::write(&dead, b"half a pack").unwrap();
        std::fs::write(&live, b"being written").unwrap();
        LocalBackend::open(&root).unwrap();
        assert!(!dead.exists());
        assert!(live.exists());
    }

    #[test]
    fn local_backend_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::create(&dir.path().join("repo")).unwrap();
        conformance(&b);
    }
}
