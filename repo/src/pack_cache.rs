//! A local copy of the tree packs of a repository on remote storage (restic keeps the
//! same): a pull walks its parent's trees and a restore, `ls`, `find` or `diff` walk
//! theirs, one small ranged read per directory. On object storage each such read is a
//! request with a round trip; from the cache it is a `pread`.
//!
//! A tree pack is fetched whole the first time one of its blobs is wanted, checked
//! against its name (the BLAKE3 of its bytes), and kept in
//! `CACHE/<repository id>/packs/<pack>`. Pack names are never reused for other bytes,
//! so a cached pack is never stale; one a prune deleted is removed from the cache when
//! the cache is opened and the index no longer names it.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use haul_protocol::PackId;

use crate::backend::{Backend, FileType};
use crate::error::{Error, Result};

/// Open cached packs kept.
const OPEN_FILES: usize = 64;

pub struct PackCache {
    dir: PathBuf,
    /// Open cached packs, and the lock a fetch holds (one fetch at a time: tree packs
    /// are few, and two fetches of one pack would be wasted work).
    open: Mutex<HashMap<PackId, Arc<File>>>,
}

impl PackCache {
    /// The cache in `dir`, keeping only the packs `keep` says are still indexed.
    pub fn open(dir: &Path, keep: impl Fn(&PackId) -> bool) -> Result<PackCache> {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("pack cache {}", dir.display())))?;
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name();
                let stale = match name.to_str().and_then(|n| n.parse::<PackId>().ok()) {
                    Some(id) => !keep(&id),
                    // A fetch cut short leaves `<pack>.tmp`.
                    None => true,
                };
                if stale {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(PackCache {
            dir: dir.to_path_buf(),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// `length` bytes at `offset` of tree pack `pack`, fetched whole first if the cache
    /// does not have it.
    pub fn read_range(
        &self,
        backend: &dyn Backend,
        pack: &PackId,
        offset: u64,
        length: u32,
    ) -> Result<Vec<u8>> {
        let file = self.file(backend, pack)?;
        let mut buf = vec![0u8; length as usize];
        match file.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(buf),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::corrupt(
                format!("pack {}", pack.short()),
                format!("range {offset}+{length} past its end"),
            )),
            Err(e) => Err(Error::Io {
                what: format!("cached pack {}", pack.short()),
                source: e,
            }),
        }
    }

    fn file(&self, backend: &dyn Backend, pack: &PackId) -> Result<Arc<File>> {
        let mut open = self.open.lock().expect("pack cache");
        if let Some(f) = open.get(pack) {
            return Ok(f.clone());
        }
        let path = self.dir.join(pack.to_hex());
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.fetch(backend, pack, &path)?
            }
            Err(e) => {
                return Err(Error::Io {
                    what: format!("cached pack {}", path.display()),
                    source: e,
                })
            }
        };
        if open.len() >= OPEN_FILES {
            open.clear();
        }
        let file = Arc::new(file);
        open.insert(*pack, file.clone());
        Ok(file)
    }

    /// Reads the whole pack, checks it against its name, and keeps it.
    fn fetch(&self, backend: &dyn Backend, pack: &PackId, path: &Path) -> Result<File> {
        let bytes = backend.read(FileType::Data, &pack.to_hex())?;
        if blake3::hash(&bytes).as_bytes() != &pack.0 {
            return Err(Error::corrupt(
                format!("pack {}", pack.short()),
                "its bytes do not hash to its name",
            ));
        }
        let what = format!("cached pack {}", path.display());
        let tmp = path.with_extension("tmp");
        let written = File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            // A cache that cannot be written (a full disk) is read around, not fatal.
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!("{what}: {e}; reading the pack from the repository");
            let mut t = tempfile::tempfile().map_err(Error::io(what.clone()))?;
            t.write_all(&bytes).map_err(Error::io(what))?;
            return Ok(t);
        }
        File::open(path).map_err(Error::io(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;

    #[test]
    fn packs_are_fetched_once_checked_and_dropped_when_no_longer_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let b = MemoryBackend::default();
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let pack = PackId::of(&bytes);
        b.write_once(FileType::Data, &pack.to_hex(), &bytes)
            .unwrap();
        let cache = PackCache::open(dir.path(), |_| true).unwrap();
        assert_eq!(
            cache.read_range(&b, &pack, 1000, 10).unwrap(),
            &bytes[1000..1010]
        );
        // Read from the cache, not the backend, from then on.
        b.delete(FileType::Data, &pack.to_hex()).unwrap();
        assert_eq!(
            cache.read_range(&b, &pack, 99_990, 10).unwrap(),
            &bytes[99_990..]
        );
        assert!(matches!(
            cache.read_range(&b, &pack, 99_995, 10),
            Err(Error::Corrupt { .. })
        ));
        assert!(dir.path().join(pack.to_hex()).exists());
        // A pack whose bytes are not its name's is refused, and not kept.
        let liar = PackId::of(b"something else");
        b.write_once(FileType::Data, &liar.to_hex(), &bytes)
            .unwrap();
        let e = cache.read_range(&b, &liar, 0, 10).unwrap_err().to_string();
        assert!(e.contains("do not hash to its name"), "{e}");
        assert!(!dir.path().join(liar.to_hex()).exists());
        // Opened again when the index no longer names the pack (a prune deleted it).
        drop(cache);
        PackCache::open(dir.path(), |p| *p != pack).unwrap();
        assert!(!dir.path().join(pack.to_hex()).exists());
    }
}
