//! `decode_blob` and `decode_blob_ref` (protocol/src/chunker.rs): a chunk or tree in its
//! transfer encoding (raw or zstd, then a format byte), as uploaded by an agent or read
//! back from a pack. Both must agree, stay within the limit, and what they return must
//! encode and decode back to itself.
#![no_main]

use haul_fuzz::bounded;
use haul_protocol::chunker::{
    declared_plain_len, decode_blob, decode_blob_ref, encode_blob, BLOB_RAW,
};
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;

/// The repository's default chunker maximum: the limit chunks are decoded under.
const LIMIT: usize = 8 << 20;

/// A zstd block (at least 3 bytes: its header) holds at most 128 KiB, so no frame
/// decodes to more than 128 KiB per 3 input bytes; streaming an unsized frame may
/// hold twice its output while its buffer grows.
const PER_INPUT_BYTE: usize = 2 * (128 * 1024 / 3 + 1);

thread_local! {
    static CODEC: RefCell<(zstd::bulk::Compressor<'static>, zstd::bulk::Decompressor<'static>)> =
        RefCell::new((zstd::bulk::Compressor::new(1).unwrap(), zstd::bulk::Decompressor::new().unwrap()));
}

fuzz_target!(|data: &[u8]| {
    CODEC.with(|codec| {
        let (c, d) = &mut *codec.borrow_mut();
        let owned = bounded(data.len(), PER_INPUT_BYTE, "decode_blob", || {
            decode_blob(d, data.to_vec(), LIMIT)
        });
        let borrowed = bounded(data.len(), PER_INPUT_BYTE, "decode_blob_ref", || {
            decode_blob_ref(d, data, LIMIT).map(|b| b.into_owned())
        });
        let plain = match (owned, borrowed) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b, "decode_blob and decode_blob_ref differ");
                a
            }
            (Err(_), Err(_)) => return,
            (a, b) => panic!("decode_blob {a:?} but decode_blob_ref {b:?}"),
        };
        assert!(plain.len() <= LIMIT);
        if data.last() == Some(&BLOB_RAW) {
            assert_eq!(plain, data[..data.len() - 1]);
        }
        if let Some(n) = declared_plain_len(data) {
            assert_eq!(n, plain.len() as u64, "declared and decoded sizes differ");
        }
        let again = encode_blob(c, plain.clone()).unwrap();
        assert_eq!(decode_blob(d, again, LIMIT).unwrap(), plain);
    });
});
