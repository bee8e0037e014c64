//! `index_file::decode` (repo/src/format/index_file.rs): an index file's plaintext.
//! Accepted files encode back to themselves.
#![no_main]

use haul_fuzz::bounded;
use haul_repo::format::index_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let packs = bounded(data.len(), 4, "index_file::decode", || {
        index_file::decode(data)
    });
    if let Ok(packs) = packs {
        assert_eq!(index_file::encode(&packs), data);
    }
});
