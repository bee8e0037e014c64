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
