//! The ingest and restore protocol between `haul-agent` and the pbs: HTTP/1.1 over a
//! Unix socket (forwarded over SSH in a real pull). Both sides use these types, so the
//! agent and the server cannot disagree on a field or a frame.
//!
//! Append-only server (one backup session at a time):
//!
//! | request | body | answer |
//! |---|---|---|
//! | `POST /v1/backup/start` | [`BackupStart`] (JSON) | [`BackupStarted`] |
//! | `GET /v1/backup/tree/{id}` | — | the tree's canonical bytes (parent trees only) |
//! | `POST /v1/backup/trees` | tree refs | frames of the trees' canonical bytes, see below |
//! | `POST /v1/backup/missing` | [`BlobRef`]s, [`REF_LEN`] bytes each | the refs the repository lacks, same encoding |
//! | `POST /v1/backup/upload` | frames (see [`encode_frame_header`]) | [`UploadDone`] |
//! | `POST /v1/backup/commit` | [`Commit`] | [`Committed`] |
//! | `POST /v1/backup/abandon` | — | `{}`: the session ends; what it stored is kept |
//!
//! Read-only server (restore):
//!
//! | request | body | answer |
//! |---|---|---|
//! | `POST /v1/restore/start` | [`RestoreStart`] | [`RestoreStarted`] |
//! | `GET /v1/restore/tree/{id}` | — | the tree's canonical bytes |
//! | `GET /v1/restore/chunk/{id}` | — | the chunk in its transfer encoding ([`crate::chunker::decode_blob`]) |
//! | `POST /v1/restore/trees` | tree refs | frames of trees |
//! | `POST /v1/restore/chunks` | data refs | frames of chunks in their transfer encoding |
//! | `POST /v1/restore/deltas` | asks ([`encode_delta_ask`]): a chunk, and chunks the client holds | frames of the chunks, each in its transfer encoding or as a delta against the chunks of its ask |
//!
//! `deltas` is for pushes to a clone, whose old copy holds chunks like the new ones: a
//! chunk comes as a delta ([`crate::chunker::BLOB_DELTA`]) when its base is a chunk of a
//! snapshot pushed to that clone before (the pbs names them; any other base is ignored)
//! and the delta is the smaller. The chunk itself must be in the snapshot being pushed.
//!
//! The batch reads (`trees`, `chunks`) answer with frames for the refs in the order
//! asked, and stop after [`MAX_FRAMES_RESPONSE`] bytes (at least one frame): the
//! client asks again for the rest. So an answer's size is bounded whatever was asked.
//! In a restore's batch, a blob the repository cannot read (missing, damaged) is a frame
//! of length 0 (no stored blob encodes to nothing): the client asks for it alone to
//! learn why, and the rest of the batch still arrives.
//!
//! Every error is a JSON [`ErrorBody`] with a stable machine `code`.
//!
//! A commit ends the session whether it succeeds or is refused (`missing_blobs`): the
//! client starts a new session to try again, and finds everything it uploaded already
//! present. `missing` answers for the client's host: a blob is present only if that
//! host's parent snapshot references it or the host sent it (in this session, or in its
//! own pulls cut short); content other hosts stored is missing to it, and a commit
//! naming it is refused as `missing_blobs`, so a host learns nothing of others' data.
//! A server may let hosts that trust each other build on everything
//! (`serve --cross-host-dedup`, `[server].cross_host_dedup`).

use crate::chunker::ChunkerParams;
use crate::id::{BlobKind, BlobRef, ChunkId};
use serde::{Deserialize, Serialize};

/// One blob reference on the wire: a kind byte ([`BlobKind::code`]) and the 32-byte id.
pub const REF_LEN: usize = 33;
/// A frame header: kind byte, 32-byte id, little-endian u32 length of the encoded blob.
pub const FRAME_HEADER_LEN: usize = 37;
/// Most refs in one `missing` request.
pub const MAX_REFS_PER_REQUEST: usize = 65_536;
/// A client does not reuse a connection it left idle this long: the server closes a
/// connection idle for its request limit (60 s unless set lower), and a request sent as
/// it closes would be lost.
pub const CLIENT_IDLE_REUSE: std::time::Duration = std::time::Duration::from_secs(20);

/// Connections one agent opens to its server at most. Over SSH each is a channel, and
/// a channel moves about its window per round trip (OpenSSH's sshd offers 2 MiB): on a
/// long link, requests on several connections at once are what keeps it busy.
pub const MAX_CONNECTIONS: usize = 8;
/// Upload requests a server handles at once; more are refused with `busy`.
pub const MAX_UPLOADS_IN_FLIGHT: usize = 4;

/// A batch read's answer stops after this many bytes of frames.
pub const MAX_FRAMES_RESPONSE: usize = 8 * 1024 * 1024;
/// Most bytes the blobs of one upload request may decompress to.
pub const MAX_UPLOAD_PLAIN: u64 = 256 * 1024 * 1024;
/// Largest upload request body the server accepts.
pub const MAX_UPLOAD_BODY: u64 = 32 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupStart {
    pub host: String,
    pub paths: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// `"latest"` (the newest snapshot of this host and paths), `"none"`, or a
    /// snapshot id or unique prefix.
    #[serde(default = "latest")]
    pub parent: String,
}

fn latest() -> String {
    "latest".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupStarted {
    pub chunker: ChunkerParams,
    /// zstd level the repository asks for.
    pub compression_level: i32,
    pub parent_snapshot: Option<String>,
    pub parent_tree: Option<String>,
    /// Largest upload body the server accepts.
    pub max_upload_body: u64,
}

/// The run's counters, as the agent saw them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCounters {
    pub files_new: u64,
    pub files_changed: u64,
    pub files_unchanged: u64,
    pub dirs: u64,
    pub bytes_read: u64,
    pub bytes_total: u64,
    pub warnings: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Commit {
    pub root: String,
    pub counters: RunCounters,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Committed {
    pub snapshot: String,
    pub time: String,
    /// Plaintext bytes of blobs new to the repository.
    pub bytes_new: u64,
    /// Bytes added to the repository (compressed and sealed).
    pub bytes_stored: u64,
    pub blobs_new: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UploadDone {
    /// Blobs in the request.
    pub received: u64,
    /// Of those, blobs the repository did not have.
    pub stored: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreStart {
    /// A snapshot id, a unique prefix, or `"latest"`.
    pub snapshot: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreStarted {
    pub snapshot: String,
    pub tree: String,
    pub host: String,
    pub paths: Vec<String>,
    pub time: String,
    /// Largest chunk of the repository (the chunker's maximum): a receiver refuses
    /// to decode anything larger.
    pub max_chunk: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `id_mismatch`, `missing_blobs`, `no_session`, ...
    pub code: String,
    pub message: String,
}

pub fn encode_ref(out: &mut Vec<u8>, r: &BlobRef) {
    out.push(r.kind.code());
    out.extend_from_slice(&r.id);
}

/// Decodes a body of concatenated refs.
pub fn decode_refs(bytes: &[u8]) -> Result<Vec<BlobRef>, String> {
    if !bytes.len().is_multiple_of(REF_LEN) {
        return Err(format!(
            "{} bytes is not a whole number of {REF_LEN}-byte blob references",
            bytes.len()
        ));
    }
    bytes
        .chunks_exact(REF_LEN)
        .map(|c| {
            let kind =
                BlobKind::from_code(c[0]).ok_or_else(|| format!("unknown blob kind {}", c[0]))?;
            let mut id = [0u8; 32];
            id.copy_from_slice(&c[1..]);
            Ok(BlobRef { kind, id })
        })
        .collect()
}

/// The route of a `deltas` request.
pub const RESTORE_DELTAS: &str = "/v1/restore/deltas";

/// Writes one ask of a `deltas` request: the ref of `chunk`, how many `bases` follow
/// (one byte, at most [`MAX_DELTA_BASES`](crate::chunker::MAX_DELTA_BASES)), and
/// their 32-byte ids: chunks it may come as a delta against, one after the other.
pub fn encode_delta_ask(out: &mut Vec<u8>, chunk: &ChunkId, bases: &[ChunkId]) {
    let bases = &bases[..bases.len().min(crate::chunker::MAX_DELTA_BASES)];
    encode_ref(out, &BlobRef::data(*chunk));
    out.push(bases.len() as u8);
    for b in bases {
        out.extend_from_slice(&b.0);
    }
}

/// Decodes a `deltas` request: each chunk and its bases.
pub fn decode_delta_asks(mut bytes: &[u8]) -> Result<Vec<(ChunkId, Vec<ChunkId>)>, String> {
    let mut asks = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < REF_LEN + 1 {
            return Err("a deltas request ends inside an ask".into());
        }
        if bytes[0] != BlobKind::Data.code() {
            return Err("a deltas request names chunks only".into());
        }
        let chunk = ChunkId(bytes[1..REF_LEN].try_into().expect("32 bytes"));
        let n = bytes[REF_LEN] as usize;
        if n > crate::chunker::MAX_DELTA_BASES {
            return Err(format!(
                "an ask names {n} bases, at most {} are taken",
                crate::chunker::MAX_DELTA_BASES
            ));
        }
        let rest = &bytes[REF_LEN + 1..];
        if rest.len() < 32 * n {
            return Err("a deltas request ends inside an ask".into());
        }
        let bases = rest[..32 * n]
            .chunks_exact(32)
            .map(|c| ChunkId(c.try_into().expect("32 bytes")))
            .collect();
        asks.push((chunk, bases));
        bytes = &rest[32 * n..];
    }
    Ok(asks)
}

/// Writes an upload frame's header; the `len` encoded bytes follow it.
pub fn encode_frame_header(out: &mut Vec<u8>, r: &BlobRef, len: u32) {
    encode_ref(out, r);
    out.extend_from_slice(&len.to_le_bytes());
}

/// Splits a body of frames into (ref, bytes) pairs.
pub fn decode_frames(mut body: &[u8]) -> Result<Vec<(BlobRef, &[u8])>, String> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let h: &[u8; FRAME_HEADER_LEN] = body
            .get(..FRAME_HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or("frames end inside a frame header")?;
        let (r, len) = decode_frame_header(h)?;
        let rest = &body[FRAME_HEADER_LEN..];
        if rest.len() < len as usize {
            return Err(format!("frame of {r} is cut short"));
        }
        out.push((r, &rest[..len as usize]));
        body = &rest[len as usize..];
    }
    Ok(out)
}

/// Reads a frame header.
pub fn decode_frame_header(h: &[u8; FRAME_HEADER_LEN]) -> Result<(BlobRef, u32), String> {
    let r = decode_refs(&h[..REF_LEN])?.remove(0);
    let len = u32::from_le_bytes(h[REF_LEN..].try_into().expect("4 bytes"));
    Ok((r, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ChunkId;
    use proptest::prelude::*;

    #[test]
    fn delta_asks_round_trip_and_bad_ones_are_refused() {
        let c = |n: u8| ChunkId([n; 32]);
        let mut body = Vec::new();
        encode_delta_ask(&mut body, &c(1), &[]);
        encode_delta_ask(&mut body, &c(2), &[c(3), c(4)]);
        // More bases than a delta takes: the first ones.
        encode_delta_ask(&mut body, &c(5), &[c(6); 9]);
        let asks = decode_delta_asks(&body).unwrap();
        assert_eq!(
            asks,
            [
                (c(1), vec![]),
                (c(2), vec![c(3), c(4)]),
                (c(5), vec![c(6); crate::chunker::MAX_DELTA_BASES])
            ]
        );
        assert!(decode_delta_asks(&body[..body.len() - 1]).is_err());
        let mut tree = body.clone();
        tree[0] = BlobKind::Tree.code();
        assert!(decode_delta_asks(&tree).is_err());
        let mut many = body[..REF_LEN].to_vec();
        many.push(200);
        many.extend(std::iter::repeat_n(0u8, 200 * 32));
        assert!(decode_delta_asks(&many).unwrap_err().contains("200 bases"));
    }

    fn arb_ref() -> impl Strategy<Value = BlobRef> {
        (any::<bool>(), any::<[u8; 32]>()).prop_map(|(tree, id)| BlobRef {
            kind: if tree { BlobKind::Tree } else { BlobKind::Data },
            id,
        })
    }

    fn arb_refs() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(arb_ref(), 0..4).prop_map(|refs| {
            let mut out = Vec::new();
            for r in &refs {
                encode_ref(&mut out, r);
            }
            out
        })
    }

    fn arb_frames() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            (arb_ref(), proptest::collection::vec(any::<u8>(), 0..40)),
            0..4,
        )
        .prop_map(|frames| {
            let mut out = Vec::new();
            for (r, bytes) in &frames {
                encode_frame_header(&mut out, r, bytes.len() as u32);
                out.extend_from_slice(bytes);
            }
            out
        })
    }

    proptest! {
        /// The stable counterpart of the `wire_frames` fuzz target (docs/fuzzing.md).
        #[test]
        fn accepted_refs_and_frames_encode_back_to_the_body(
            refs in haul_mutate::inputs(arb_refs(), 120),
            frames in haul_mutate::inputs(arb_frames(), 120),
        ) {
            if let Ok(decoded) = decode_refs(&refs) {
                let mut again = Vec::new();
                for r in &decoded {
                    encode_ref(&mut again, r);
                }
                prop_assert_eq!(again, refs);
            }
            if let Ok(decoded) = decode_frames(&frames) {
                let mut again = Vec::new();
                for (r, bytes) in &decoded {
                    encode_frame_header(&mut again, r, bytes.len() as u32);
                    again.extend_from_slice(bytes);
                }
                prop_assert_eq!(again, frames);
            }
        }
    }

    #[test]
    fn refs_and_frames_round_trip_and_reject_garbage() {
        let a = BlobRef::data(ChunkId::of(b"a"));
        let mut buf = Vec::new();
        encode_ref(&mut buf, &a);
        assert_eq!(decode_refs(&buf).unwrap(), vec![a]);
        assert!(decode_refs(&buf[..32]).is_err());
        buf[0] = 9;
        assert!(decode_refs(&buf)
            .unwrap_err()
            .contains("unknown blob kind 9"));
        let mut h = Vec::new();
        encode_frame_header(&mut h, &a, 12345);
        let (r, len) = decode_frame_header(&h.try_into().unwrap()).unwrap();
        assert_eq!((r, len), (a, 12345));
    }
}
