//! Condemnation records: what one prune condemned (see `crate::prune`).
//!
//! ```text
//! record = "HCD1" header_len:u32le header(JSON) index_file(the condemned packs)
//! header = {"time": RFC 3339, "superseded": [index file name], "marked": [snapshot id]}
//! ```
//!
//! The condemned packs are written in the index-file encoding (with their blobs), so a
//! sweep can still read a tree from a condemned pack that a late snapshot turned out
//! to need, and index the pack again (rescue).

use super::index_file::{self, IndexedPack};
use haul_protocol::{PackId, SnapshotId};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 4] = b"HCD1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condemnation {
    pub header: Header,
    pub packs: Vec<IndexedPack>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub time: chrono::DateTime<chrono::Utc>,
    /// Index files that listed the condemned packs, replaced by files without them:
    /// all are deleted before the condemnation takes effect.
    pub superseded: Vec<String>,
    /// The snapshots the prune's mark walked: a sweep walks only the others.
    pub marked: Vec<SnapshotId>,
}

pub fn encode(c: &Condemnation) -> Vec<u8> {
    let header = serde_json::to_vec(&c.header).expect("header serializes");
    let packs = index_file::encode(&c.packs);
    let mut out = Vec::with_capacity(8 + header.len() + packs.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&packs);
    out
}

pub fn decode(bytes: &[u8]) -> Result<Condemnation, String> {
    let (header, rest) = split(bytes)?;
    let packs = index_file::decode(rest)?;
    Ok(Condemnation { header, packs })
}

/// The header and the condemned packs' ids, without their blobs.
pub fn decode_summary(bytes: &[u8]) -> Result<(Header, Vec<PackId>), String> {
    let (header, rest) = split(bytes)?;
    Ok((header, index_file::pack_ids(rest)?))
}

fn split(bytes: &[u8]) -> Result<(Header, &[u8]), String> {
    let mut c = super::Cursor::new(bytes);
    if c.take(4) != Some(MAGIC) {
        return Err("bad condemnation record magic".into());
    }
    let len = c.u32().ok_or("truncated")? as usize;
    let header = c.take(len).ok_or("truncated header")?;
    let header: Header = serde_json::from_slice(header).map_err(|e| e.to_string())?;
    Ok((header, &bytes[c.pos..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pack_header::PackEntry;
    use haul_protocol::BlobKind;

    #[test]
    fn round_trips_and_refuses_damage() {
        let c = Condemnation {
            header: Header {
                time: chrono::Utc::now(),
                superseded: vec!["ab".repeat(32)],
                marked: vec![SnapshotId::of(b"s")],
            },
            packs: vec![IndexedPack {
                pack: PackId::of(b"p"),
                blobs: vec![PackEntry {
                    kind: BlobKind::Tree,
                    id: [3; 32],
                    offset: 0,
                    length: 10,
                    raw_length: 9,
                }],
            }],
        };
        let bytes = encode(&c);
        assert_eq!(decode(&bytes).unwrap(), c);
        assert_eq!(
            decode_summary(&bytes).unwrap(),
            (c.header.clone(), vec![PackId::of(b"p")])
        );
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode(&bytes[..6]).is_err());
    }
}
