//! Key files: the master key sealed under a passphrase-derived key (Argon2id). Several
//! key files may open one repository, like restic's `keys/`.

use crate::crypto::KdfParams;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub version: u32,
    pub created: chrono::DateTime<chrono::Utc>,
    pub hostname: String,
    pub username: String,
    pub kdf: KdfParams,
    /// Hex of the 16-byte Argon2 salt.
    pub salt: String,
    /// Hex of the sealed 32-byte master key.
    pub sealed_master: String,
}
