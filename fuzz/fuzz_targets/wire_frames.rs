//! The hand-written parts of the wire protocol (protocol/src/wire.rs): bodies of blob
//! references and of frames, sent by agents (`missing`, `upload`) and by the server
//! (`trees`, `chunks`). The first byte picks the parser; accepted bodies encode back to
//! themselves.
#![no_main]

use haul_fuzz::bounded;
use haul_protocol::wire::{decode_frames, decode_refs, encode_frame_header, encode_ref};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let mut again = Vec::new();
    if which % 2 == 0 {
        let Ok(refs) = bounded(body.len(), 4, "decode_refs", || decode_refs(body)) else {
            return;
        };
        for r in &refs {
            encode_ref(&mut again, r);
        }
    } else {
        let Ok(frames) = bounded(body.len(), 4, "decode_frames", || decode_frames(body)) else {
            return;
        };
        for (r, bytes) in &frames {
            encode_frame_header(&mut again, r, bytes.len() as u32);
            again.extend_from_slice(bytes);
        }
    }
    assert_eq!(again, body);
});
