//! `pack_header::decode` (repo/src/format/pack_header.rs): a pack's header plaintext
//! and where it starts. Accepted headers encode back to themselves, and their entries
//! tile the pack from 0 to the header's start.
#![no_main]

use haul_fuzz::{bounded, split_pack_header_input};
use haul_repo::format::pack_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((header_start, header)) = split_pack_header_input(data) else {
        return;
    };
    let entries = bounded(header.len(), 4, "pack_header::decode", || {
        pack_header::decode(header, header_start)
    });
    if let Ok(entries) = entries {
        assert_eq!(pack_header::encode(&entries), header);
        let mut offset = 0u64;
        for e in &entries {
            assert_eq!(u64::from(e.offset), offset);
            offset += u64::from(e.length);
        }
        assert_eq!(offset, header_start);
    }
});
