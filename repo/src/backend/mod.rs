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

pub use append_only::AppendOnly;
pub use local::LocalBackend;
pub use memory::MemoryBackend;

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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::Error;

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
    }

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
