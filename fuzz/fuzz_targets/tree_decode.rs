//! `TreeBlob::decode` (protocol/src/tree.rs and tree/pages.rs): the canonical tree
//! encoding and a large directory's page index, read from agents (uploads, which are
//! untrusted) and from the repository. Accepted bytes must encode
//! back to themselves; memory must stay in proportion to the input.
#![no_main]

use haul_fuzz::bounded;
use haul_protocol::tree::TreeBlob;
use libfuzzer_sys::fuzz_target;

/// Bytes a decode may allocate per input byte. A decoded node takes about 13 bytes of
/// `Node` per byte of its encoding (at least 21 bytes encode a node of 264), and the
/// decoder refuses a node count the bytes cannot hold (it once reserved one node per
/// input byte: found by this target, see docs/fuzzing.md).
const PER_INPUT_BYTE: usize = 32;

fuzz_target!(|data: &[u8]| {
    let tree = bounded(data.len(), PER_INPUT_BYTE, "TreeBlob::decode", || {
        TreeBlob::decode(data)
    });
    if let Ok(tree) = tree {
        assert_eq!(tree.encode(), data, "an accepted tree is not canonical");
    }
});
