//! Snapshots (repo/src/format/snapshot.rs): the JSON of a decrypted snapshot file. An
//! accepted snapshot serializes and parses back to itself.
#![no_main]

use haul_fuzz::bounded;
use haul_repo::format::snapshot::Snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let snapshot = bounded(data.len(), 16, "Snapshot", || {
        serde_json::from_slice::<Snapshot>(data)
    });
    if let Ok(s) = snapshot {
        let again: Snapshot = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(again, s);
    }
});
