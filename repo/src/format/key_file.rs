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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_key_file() -> impl Strategy<Value = Vec<u8>> {
        (
            0i64..4_000_000_000,
            any::<(u32, u32, u32)>(),
            any::<[u8; 16]>(),
            proptest::collection::vec(any::<u8>(), 0..80),
        )
            .prop_map(|(secs, (m_cost, t_cost, p_cost), salt, sealed)| {
                serde_json::to_vec_pretty(&KeyFile {
                    version: 1,
                    created: chrono::DateTime::from_timestamp(secs, 0).unwrap(),
                    hostname: "pbs".into(),
                    username: "root".into(),
                    kdf: KdfParams {
                        m_cost: m_cost % (8 << 20),
                        t_cost: t_cost % 200,
                        p_cost: p_cost % 100,
                    },
                    salt: hex::encode(salt),
                    sealed_master: hex::encode(sealed),
                })
                .unwrap()
            })
    }

    proptest! {
        /// The stable counterpart of the `key_file` fuzz target (docs/fuzzing.md): what
        /// `Repository::open` reads before it derives a key never panics, and the
        /// parameter check refuses what would exhaust the server.
        #[test]
        fn hostile_key_files_are_refused_or_bounded(
            bytes in haul_mutate::inputs_with(arb_key_file(), 200, haul_mutate::JSON),
        ) {
            if let Ok(file) = serde_json::from_slice::<KeyFile>(&bytes) {
                let json = serde_json::to_value(&file).unwrap();
                let again: KeyFile = serde_json::from_value(json.clone()).unwrap();
                prop_assert_eq!(serde_json::to_value(&again).unwrap(), json);
                let _ = hex::decode(&file.salt);
                let _ = hex::decode(&file.sealed_master);
                if file.kdf.check().is_ok() {
                    let k = file.kdf;
                    prop_assert!(k.m_cost <= 4 << 20 && k.t_cost <= 100 && k.p_cost <= 64);
                }
            }
        }
    }
}
