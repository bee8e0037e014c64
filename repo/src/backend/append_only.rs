//! The append-only decorator: what an ingest session for a source host may do.
//!
//! It refuses every delete except of locks (a session removes its own lock) and every
//! write of keys, the config, or a prune's records. Overwrites are already refused by every backend's
//! `write_once`; this decorator makes sure no code path through it can shrink or
//! rewrite history, whatever the caller asks.

use super::{Backend, FileType, ObjectWriter};
use crate::error::{Error, Result};

pub struct AppendOnly<B>(pub B);

impl<B: Backend> Backend for AppendOnly<B> {
    fn location(&self) -> String {
        self.0.location()
    }
    fn is_remote(&self) -> bool {
        self.0.is_remote()
    }
    fn list(&self, t: FileType) -> Result<Vec<(String, u64)>> {
        self.0.list(t)
    }
    fn read(&self, t: FileType, name: &str) -> Result<Vec<u8>> {
        self.0.read(t, name)
    }
    fn read_range(&self, t: FileType, name: &str, offset: u64, length: u32) -> Result<Vec<u8>> {
        self.0.read_range(t, name, offset, length)
    }
    fn write_once(&self, t: FileType, name: &str, data: &[u8]) -> Result<()> {
        if matches!(
            t,
            FileType::Key | FileType::Config | FileType::Condemned | FileType::Epoch
        ) {
            return Err(Error::AppendOnly {
                action: "write",
                what: format!("{t} {name}"),
            });
        }
        self.0.write_once(t, name, data)
    }
    fn writer(&self, t: FileType) -> Result<Box<dyn ObjectWriter>> {
        if matches!(
            t,
            FileType::Key | FileType::Config | FileType::Condemned | FileType::Epoch
        ) {
            return Err(Error::AppendOnly {
                action: "write",
                what: t.to_string(),
            });
        }
        self.0.writer(t)
    }
    fn delete(&self, t: FileType, name: &str) -> Result<()> {
        if t != FileType::Lock {
            return Err(Error::AppendOnly {
                action: "delete",
                what: format!("{t} {name}"),
            });
        }
        self.0.delete(t, name)
    }
    fn move_aside(&self, t: FileType, name: &str) -> Result<String> {
        Err(Error::AppendOnly {
            action: "move aside",
            what: format!("{t} {name}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;

    #[test]
    fn refuses_deletes_and_key_writes_but_appends() {
        let b = AppendOnly(MemoryBackend::default());
        let name = "cd".repeat(32);
        b.write_once(FileType::Data, &name, b"pack").unwrap();
        b.write_once(FileType::Snapshot, &name, b"snap").unwrap();
        for t in [
            FileType::Data,
            FileType::Snapshot,
            FileType::Index,
            FileType::Key,
        ] {
            let err = b.delete(t, &name).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::AppendOnly {
                        action: "delete",
                        ..
                    }
                ),
                "{err}"
            );
        }
        assert!(matches!(
            b.write_once(FileType::Key, &name, b"k"),
            Err(Error::AppendOnly {
                action: "write",
                ..
            })
        ));
        assert!(matches!(
            b.write_once(FileType::Data, &name, b"x"),
            Err(Error::AlreadyExists { .. })
        ));
        assert_eq!(b.read(FileType::Data, &name).unwrap(), b"pack");
        assert!(matches!(
            b.move_aside(FileType::Snapshot, &name),
            Err(Error::AppendOnly {
                action: "move aside",
                ..
            })
        ));
        assert_eq!(b.read(FileType::Snapshot, &name).unwrap(), b"snap");
        b.write_once(FileType::Lock, &name, b"l").unwrap();
        b.delete(FileType::Lock, &name).unwrap();
    }
}
