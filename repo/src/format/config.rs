//! The repository config: identity and the parameters fixed at `init`.

use haul_protocol::chunker::ChunkerParams;
use serde::{Deserialize, Serialize};

/// Format version this code writes and reads.
pub const VERSION: u32 = 1;

/// The zstd level a new repository compresses chunks with unless told otherwise.
/// Level 1, as Proxmox Backup Server uses: on the benchmark data (`bench/pull.sh`) it
/// stores within 1% of level 3's size (which is restic's size too) for ~10% less CPU
/// in a full backup; text compresses about as well, and random data is stored raw at any level.
pub const DEFAULT_COMPRESSION: i32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    pub version: u32,
    /// Random, 64 hex digits; names the local index cache.
    pub id: String,
    pub chunker: ChunkerParams,
    /// zstd level for chunks compressed on the pbs.
    pub compression_level: i32,
    /// Target pack size in bytes.
    pub pack_size: u32,
}

impl RepoConfig {
    pub fn new(compression_level: i32) -> Self {
        let id: [u8; 32] = crate::crypto::random_bytes();
        let seed = u64::from_le_bytes(crate::crypto::random_bytes());
        RepoConfig {
            version: VERSION,
            id: hex::encode(id),
            chunker: ChunkerParams::with_seed(seed),
            compression_level,
            pack_size: 16 * 1024 * 1024,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.version != VERSION {
            return Err(format!(
                "repository format version {} is not supported (this haul reads {VERSION})",
                self.version
            ));
        }
        self.chunker.validate()?;
        if !(1..=22).contains(&self.compression_level) {
            return Err(format!(
                "compression level {} is outside zstd's 1..=22",
                self.compression_level
            ));
        }
        if self.pack_size < 1024 * 1024 || self.pack_size > 128 * 1024 * 1024 {
            return Err(format!(
                "pack size {} is outside 1 MiB..128 MiB",
                self.pack_size
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::lock_file::LockFile;
    use proptest::prelude::*;

    fn arb_files() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<bool>(),
            any::<(u32, u32, u32, u64)>(),
            any::<(i32, u32)>(),
        )
            .prop_map(
                |(lock, (min_size, avg_size, max_size, seed), (compression_level, pack_size))| {
                    if lock {
                        return serde_json::to_vec(&LockFile {
                            exclusive: seed.is_multiple_of(2),
                            prune: seed.is_multiple_of(3),
                            holder: format!("{seed:x}"),
                            pid_ns: seed,
                            boot_id: String::new(),
                            time: chrono::DateTime::from_timestamp(min_size.into(), 0).unwrap(),
                            hostname: "pbs".into(),
                            pid: avg_size,
                            purpose: "backup".into(),
                        })
                        .unwrap();
                    }
                    let mut c = RepoConfig::new(compression_level);
                    // Around the sizes FastCDC accepts, and anywhere.
                    let near = |v: u32, at: u32| {
                        if v.is_multiple_of(2) {
                            v
                        } else {
                            at + v % 64 - 32
                        }
                    };
                    c.chunker = ChunkerParams {
                        min_size: near(min_size, 64),
                        avg_size: near(avg_size, 256),
                        max_size: near(max_size, 1024),
                        seed,
                    };
                    c.pack_size = pack_size;
                    serde_json::to_vec(&c).unwrap()
                },
            )
    }

    proptest! {
        /// The stable counterpart of the `repo_config` fuzz target (docs/fuzzing.md): a
        /// config that validates builds a chunker (FastCDC asserts on the sizes it does
        /// not support), and both files round-trip through serde.
        #[test]
        fn hostile_configs_and_locks_are_refused_or_usable(
            bytes in haul_mutate::inputs_with(arb_files(), 200, haul_mutate::JSON),
        ) {
            if let Ok(c) = serde_json::from_slice::<RepoConfig>(&bytes) {
                let again: RepoConfig = serde_json::from_slice(&serde_json::to_vec(&c).unwrap()).unwrap();
                prop_assert_eq!(&again, &c);
                if c.validate().is_ok() {
                    drop(haul_protocol::chunker::Chunker::new(c.chunker));
                }
            }
            if let Ok(l) = serde_json::from_slice::<LockFile>(&bytes) {
                let again: LockFile = serde_json::from_slice(&serde_json::to_vec(&l).unwrap()).unwrap();
                prop_assert_eq!(again, l);
            }
        }
    }
}
