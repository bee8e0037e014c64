//! Key files (repo/src/format/key_file.rs), parsed as `Repository::open` parses them
//! before it derives a key: the JSON, the hex of the salt and of the sealed master key,
//! and the check of the key derivation parameters (which must refuse any that would
//! take absurd memory or time, before Argon2 sees them).
#![no_main]

use haul_fuzz::bounded;
use haul_repo::format::key_file::KeyFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = bounded(data.len(), 16, "KeyFile", || {
        serde_json::from_slice::<KeyFile>(data)
    }) else {
        return;
    };
    let json = serde_json::to_value(&file).unwrap();
    let again: KeyFile = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(serde_json::to_value(&again).unwrap(), json);
    let _ = hex::decode(&file.salt);
    let _ = hex::decode(&file.sealed_master);
    if file.kdf.check().is_ok() {
        let k = file.kdf;
        assert!(k.m_cost <= 4 * 1024 * 1024 && k.t_cost <= 100 && k.p_cost <= 64);
    }
});
