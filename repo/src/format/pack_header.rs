//! Packs: sealed blobs back to back, then the sealed header, then the header's length.
//!
//! ```text
//! pack   = blob* sealed_header header_len:u32le
//! blob   = seal(blob_key, kind||id, format_byte || payload)
//! header = "HPK1" count:u32le (kind:u8 id[32] length:u32le raw_length:u32le)*count
//! ```
//!
//! Blob offsets are implicit (the sum of the lengths before it). `raw_length` is the
//! plaintext chunk's length. A pack holds blobs of one kind only.

use super::Cursor;
use haul_protocol::BlobKind;

/// One blob's place in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub kind: BlobKind,
    pub id: [u8; 32],
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
}

const MAGIC: &[u8; 4] = b"HPK1";
/// Bytes per entry in the header plaintext.
pub const ENTRY_SIZE: usize = 1 + 32 + 4 + 4;

pub fn encode(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + entries.len() * ENTRY_SIZE);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.push(e.kind.code());
        out.extend_from_slice(&e.id);
        out.extend_from_slice(&e.length.to_le_bytes());
        out.extend_from_slice(&e.raw_length.to_le_bytes());
    }
    out
}

/// Parses a header; entries' offsets are recomputed and must fit before `header_start`.
pub fn decode(bytes: &[u8], header_start: u64) -> Result<Vec<PackEntry>, &'static str> {
    let mut c = Cursor::new(bytes);
    if c.take(4) != Some(MAGIC) {
        return Err("bad pack header magic");
    }
    let count = c.u32().ok_or("truncated pack header")? as usize;
    if count > bytes.len() / ENTRY_SIZE {
        return Err("pack header count larger than the header");
    }
    let mut out = Vec::with_capacity(count);
    let mut offset = 0u64;
    for _ in 0..count {
        let kind = BlobKind::from_code(c.u8().ok_or("truncated")?).ok_or("unknown blob kind")?;
        let id = c.id().ok_or("truncated")?;
        let length = c.u32().ok_or("truncated")?;
        let raw_length = c.u32().ok_or("truncated")?;
        if offset + length as u64 > header_start {
            return Err("pack header entry beyond the blobs");
        }
        out.push(PackEntry {
            kind,
            id,
            offset: offset as u32,
            length,
            raw_length,
        });
        offset += length as u64;
    }
    if !c.done() {
        return Err("trailing bytes in pack header");
    }
    if offset != header_start {
        return Err("pack header does not account for every byte before it");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_entries() -> impl Strategy<Value = Vec<PackEntry>> {
        proptest::collection::vec(
            (any::<bool>(), any::<[u8; 32]>(), 0u32..5000, any::<u32>()),
            0..4,
        )
        .prop_map(|blobs| {
            let mut offset = 0;
            blobs
                .into_iter()
                .map(|(tree, id, length, raw_length)| {
                    let e = PackEntry {
                        kind: if tree { BlobKind::Tree } else { BlobKind::Data },
                        id,
                        offset,
                        length,
                        raw_length,
                    };
                    offset += length;
                    e
                })
                .collect()
        })
    }

    fn header_start(entries: &[PackEntry]) -> u64 {
        entries.iter().map(|e| u64::from(e.length)).sum()
    }

    proptest! {
        /// The stable counterpart of the `pack_header` fuzz target (docs/fuzzing.md):
        /// an accepted header encodes back to itself and its entries tile the pack.
        #[test]
        fn hostile_headers_are_refused_or_canonical(
            (start, bytes) in arb_entries().prop_flat_map(|entries| {
                let start = header_start(&entries);
                let valid = Just(encode(&entries));
                (
                    prop_oneof![Just(start), any::<u64>(), 0..start + 2],
                    haul_mutate::inputs(valid, 200),
                )
            }),
        ) {
            if let Ok(entries) = decode(&bytes, start) {
                prop_assert_eq!(encode(&entries), bytes);
                prop_assert_eq!(header_start(&entries), start);
                let mut offset = 0;
                for e in &entries {
                    prop_assert_eq!(e.offset, offset);
                    offset += e.length;
                }
            }
        }
    }

    #[test]
    fn a_header_round_trips() {
        let entries = vec![
            PackEntry {
                kind: BlobKind::Data,
                id: [1; 32],
                offset: 0,
                length: 10,
                raw_length: 20,
            },
            PackEntry {
                kind: BlobKind::Tree,
                id: [2; 32],
                offset: 10,
                length: 5,
                raw_length: 5,
            },
        ];
        assert_eq!(decode(&encode(&entries), 15).unwrap(), entries);
        assert_eq!(
            decode(&encode(&entries), 16).unwrap_err(),
            "pack header does not account for every byte before it"
        );
    }
}
