//! The other JSON files of a repository: its config (repo/src/format/config.rs, sealed)
//! with the validation `Repository::open` runs, and lock files
//! (repo/src/format/lock_file.rs, plain). A config that validates must build a chunker
//! (FastCDC asserts on sizes it does not support); both round-trip through serde.
#![no_main]

use haul_fuzz::bounded;
use haul_protocol::chunker::Chunker;
use haul_repo::format::config::RepoConfig;
use haul_repo::format::lock_file::LockFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let config = bounded(data.len(), 16, "RepoConfig", || {
        serde_json::from_slice::<RepoConfig>(data)
    });
    if let Ok(c) = config {
        let again: RepoConfig = serde_json::from_slice(&serde_json::to_vec(&c).unwrap()).unwrap();
        assert_eq!(again, c);
        if c.validate().is_ok() {
            drop(Chunker::new(c.chunker));
        }
    }
    let lock = bounded(data.len(), 16, "LockFile", || {
        serde_json::from_slice::<LockFile>(data)
    });
    if let Ok(l) = lock {
        let again: LockFile = serde_json::from_slice(&serde_json::to_vec(&l).unwrap()).unwrap();
        assert_eq!(again, l);
    }
});
