//! Index files: which blobs each pack holds, so a repository can be used without
//! reading every pack header.
//!
//! ```text
//! index = "HIX1" packs:u32le (pack_id[32] count:u32le (kind:u8 id[32] offset:u32le length:u32le raw_length:u32le)*count)*packs
//! ```

use super::pack_header::PackEntry;
use super::Cursor;
use haul_protocol::{BlobKind, PackId};

const MAGIC: &[u8; 4] = b"HIX1";

/// The blobs of one pack, as an index file lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedPack {
    pub pack: PackId,
    pub blobs: Vec<PackEntry>,
}

pub fn encode(packs: &[IndexedPack]) -> Vec<u8> {
    let n: usize = packs.iter().map(|p| 36 + p.blobs.len() * 45).sum();
    let mut out = Vec::with_capacity(8 + n);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for p in packs {
        out.extend_from_slice(&p.pack.0);
        out.extend_from_slice(&(p.blobs.len() as u32).to_le_bytes());
        for b in &p.blobs {
            out.push(b.kind.code());
            out.extend_from_slice(&b.id);
            out.extend_from_slice(&b.offset.to_le_bytes());
            out.extend_from_slice(&b.length.to_le_bytes());
            out.extend_from_slice(&b.raw_length.to_le_bytes());
        }
    }
    out
}

pub fn decode(bytes: &[u8]) -> Result<Vec<IndexedPack>, &'static str> {
    let mut out = Vec::new();
    for_each_pack(bytes, |pack, raw| {
        let blobs = raw
            .chunks_exact(45)
            .map(|b| {
                let mut c = Cursor::new(b);
                Ok(PackEntry {
                    kind: BlobKind::from_code(c.u8().ok_or("truncated")?)
                        .ok_or("unknown blob kind")?,
                    id: c.id().ok_or("truncated")?,
                    offset: c.u32().ok_or("truncated")?,
                    length: c.u32().ok_or("truncated")?,
                    raw_length: c.u32().ok_or("truncated")?,
                })
            })
            .collect::<Result<Vec<_>, &'static str>>()?;
        out.push(IndexedPack { pack, blobs });
        Ok(())
    })?;
    Ok(out)
}

/// The packs an index file lists, without their blobs (whose kinds are checked as
/// [`decode`] checks them).
pub fn pack_ids(bytes: &[u8]) -> Result<Vec<PackId>, &'static str> {
    let mut out = Vec::new();
    for_each_pack(bytes, |pack, raw| {
        if raw
            .chunks_exact(45)
            .any(|b| BlobKind::from_code(b[0]).is_none())
        {
            return Err("unknown blob kind");
        }
        out.push(pack);
        Ok(())
    })?;
    Ok(out)
}

/// Checks the layout and calls `each` with every pack and the bytes of its blobs (45
/// per blob).
fn for_each_pack(
    bytes: &[u8],
    mut each: impl FnMut(PackId, &[u8]) -> Result<(), &'static str>,
) -> Result<(), &'static str> {
    let mut c = Cursor::new(bytes);
    if c.take(4) != Some(MAGIC) {
        return Err("bad index magic");
    }
    let packs = c.u32().ok_or("truncated")? as usize;
    if packs > bytes.len() / 36 {
        return Err("pack count larger than the file");
    }
    for _ in 0..packs {
        let pack = PackId(c.id().ok_or("truncated")?);
        let count = c.u32().ok_or("truncated")? as usize;
        if count > bytes.len() / 45 {
            return Err("blob count larger than the file");
        }
        each(pack, c.take(count * 45).ok_or("truncated")?)?;
    }
    if !c.done() {
        return Err("trailing bytes in index");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_index() -> impl Strategy<Value = Vec<u8>> {
        let entry = (any::<bool>(), any::<[u8; 32]>(), any::<(u32, u32, u32)>()).prop_map(
            |(tree, id, (offset, length, raw_length))| PackEntry {
                kind: if tree { BlobKind::Tree } else { BlobKind::Data },
                id,
                offset,
                length,
                raw_length,
            },
        );
        proptest::collection::vec(
            (any::<[u8; 32]>(), proptest::collection::vec(entry, 0..3)),
            0..3,
        )
        .prop_map(|packs| {
            let packs: Vec<IndexedPack> = packs
                .into_iter()
                .map(|(pack, blobs)| IndexedPack {
                    pack: PackId(pack),
                    blobs,
                })
                .collect();
            encode(&packs)
        })
    }

    proptest! {
        /// The stable counterpart of the `index_file` fuzz target (docs/fuzzing.md).
        #[test]
        fn hostile_index_files_are_refused_or_canonical(bytes in haul_mutate::inputs(arb_index(), 200)) {
            if let Ok(packs) = decode(&bytes) {
                prop_assert_eq!(encode(&packs), bytes);
            }
        }
    }
}
