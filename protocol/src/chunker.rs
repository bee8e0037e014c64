//! Content-defined chunking with FastCDC v2020, and per-chunk compression.
//!
//! The cut points are the `fastcdc` crate's own (the loop of `v2020::cut_gear`, with the
//! crate's gear tables from `get_gear_with_seed` and its masks), so a file chunks
//! exactly as `fastcdc::v2020::StreamCDC` would chunk it (tests hold us to that). We
//! do not use `StreamCDC` because it allocates a `max_size` buffer per file and moves
//! the buffer's tail after every chunk; a [`Chunker`] is built once per worker, reads
//! ahead only as far as the next cut needs, and reuses its buffer for every file, which
//! matters when a tree holds a hundred thousand small files. Its scan for a cut can stop
//! at the end of the bytes read so far and go on when more arrive, which `cut_gear`
//! cannot (see [`Chunker::cut`]).

use crate::id::ChunkId;
use fastcdc::v2020::{get_gear_with_seed, logarithm2, Normalization, MASKS};
use serde::{Deserialize, Serialize};
use std::io::{self, Read};

/// Chunker parameters: fixed per repository, handed to the agent per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
    /// XORed into FastCDC's gear tables so chunk boundaries differ per repository
    /// (an observer of chunk sizes cannot test for known files).
    pub seed: u64,
}

impl ChunkerParams {
    /// min 512 KiB, average 1 MiB, max 8 MiB (DESIGN §3), with the given seed.
    pub fn with_seed(seed: u64) -> Self {
        ChunkerParams {
            min_size: 512 * 1024,
            avg_size: 1024 * 1024,
            max_size: 8 * 1024 * 1024,
            seed,
        }
    }

    /// Whether the crate accepts these sizes (it asserts on the others).
    pub fn validate(&self) -> Result<(), String> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&self.min_size)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&self.avg_size)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&self.max_size)
            && self.min_size <= self.avg_size
            && self.avg_size <= self.max_size;
        if ok {
            Ok(())
        } else {
            Err(format!(
                "chunker sizes min {} avg {} max {} are outside what FastCDC accepts",
                self.min_size, self.avg_size, self.max_size
            ))
        }
    }
}

/// Where a scan for a cut stopped: the next pair of bytes to hash (two bytes per step,
/// as FastCDC v2020 does) and the gear hash so far.
struct Scan {
    pair: usize,
    hash: u64,
}

/// A reusable FastCDC chunker. Not `Sync`: one per worker thread.
pub struct Chunker {
    params: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
    gear: Box<[u64; 256]>,
    gear_ls: Box<[u64; 256]>,
    buf: Vec<u8>,
    step: usize,
}

impl Chunker {
    /// Panics if `params` fail [`ChunkerParams::validate`]; the repository validates
    /// them when it opens.
    pub fn new(params: ChunkerParams) -> Self {
        params.validate().expect("valid chunker parameters");
        let bits = logarithm2(params.avg_size);
        let norm = Normalization::Level1.bits();
        let (gear, gear_ls) = get_gear_with_seed(params.seed);
        Chunker {
            params,
            mask_s: MASKS[(bits + norm) as usize],
            mask_l: MASKS[(bits - norm) as usize],
            gear,
            gear_ls,
            buf: Vec::new(),
            step: READ_STEP,
        }
    }

    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    fn scan_start(&self) -> Scan {
        Scan {
            pair: self.params.min_size as usize / 2,
            hash: 0,
        }
    }

    /// The cut `fastcdc::v2020::cut_gear` finds in `source` (its length if none),
    /// going on from `scan`, where an earlier call on a prefix of `source` stopped
    /// without a cut. The crate's function starts at `min_size` on every call, so
    /// after reading further the chunker would hash again the bytes it had already
    /// found no cut in: with reads of 1 MiB, about twice the bytes of each chunk.
    ///
    /// The loop is the crate's: two bytes per step, the first with the tables and
    /// masks shifted left by one; the strict mask (`mask_s`) before `avg_size`, the
    /// loose one (`mask_l`) from there to at most `max_size`. A position is judged
    /// the same however much data follows it, which is what makes stopping and going
    /// on exact (a test holds it to `StreamCDC`).
    fn cut(&self, source: &[u8], scan: &mut Scan) -> usize {
        let min = self.params.min_size as usize;
        let remaining = source.len().min(self.params.max_size as usize);
        if source.len() <= min {
            return source.len();
        }
        let center = (self.params.avg_size as usize).min(remaining) / 2;
        let (gear, gear_ls) = (&*self.gear, &*self.gear_ls);
        let mut hash = scan.hash;
        let mut pair = scan.pair;
        for (end, mask) in [(center, self.mask_s), (remaining / 2, self.mask_l)] {
            let mask_ls = mask << 1;
            while pair < end {
                let a = pair * 2;
                hash = (hash << 2).wrapping_add(gear_ls[source[a] as usize]);
                if hash & mask_ls == 0 {
                    return a;
                }
                hash = hash.wrapping_add(gear[source[a + 1] as usize]);
                if hash & mask == 0 {
                    return a + 1;
                }
                pair += 1;
            }
        }
        *scan = Scan { pair, hash };
        remaining
    }

    /// Cuts `reader`'s bytes into chunks and hands each to `f` in order, as an owned
    /// buffer. Returns the number of bytes read.
    ///
    /// It reads ahead only as far as the next cut needs, in steps of [`READ_STEP`]: a
    /// cut FastCDC finds before the end of the bytes at hand is the cut it would find
    /// with more bytes (positions before the end are judged by the same masks, and the
    /// gear hash looks only backwards), so only "no cut yet" needs more data. The
    /// buffer thus holds about one average chunk, not `max_size`, in most cases.
    pub fn chunk<R: Read>(
        &mut self,
        mut reader: R,
        mut f: impl FnMut(Vec<u8>) -> io::Result<()>,
    ) -> io::Result<u64> {
        let max = self.params.max_size as usize;
        let mut len = 0usize; // valid bytes at the start of buf
        let mut eof = false;
        let mut total = 0u64;
        let mut want = self.step.min(max);
        let mut scan = self.scan_start();
        loop {
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            while !eof && len < want {
                match reader.read(&mut self.buf[len..want]) {
                    Ok(0) => eof = true,
                    Ok(n) => {
                        len += n;
                        total += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if len == 0 {
                if self.buf.len() > 2 * self.step {
                    // A large file grew the buffer towards max_size: give it back
                    // rather than keep it for the (usually small) files to come.
                    self.buf = Vec::new();
                }
                return Ok(total);
            }
            let cut = self.cut(&self.buf[..len], &mut scan);
            if cut == len && !eof && len < max {
                // No cut in what we have: read further before deciding; the scan
                // goes on from where it stopped.
                want = (want + self.step).min(max);
                continue;
            }
            scan = self.scan_start();
            // Sized for the format byte and the seal, so neither reallocates (and
            // copies) the chunk later.
            let mut chunk = Vec::with_capacity(cut + 1 + SEAL_ROOM);
            chunk.extend_from_slice(&self.buf[..cut]);
            f(chunk)?;
            self.buf.copy_within(cut..len, 0);
            len -= cut;
            want = (len + self.step).min(max);
        }
    }
}

/// How much further the chunker reads when it has not found a cut yet.
pub const READ_STEP: usize = 1024 * 1024;

/// The last byte of an encoded blob: how the bytes before it are encoded.
pub const BLOB_RAW: u8 = 0;
/// See [`BLOB_RAW`].
pub const BLOB_ZSTD: u8 = 1;
/// A zstd frame of the plaintext compressed with other chunks' plaintext as its
/// prefix, then those chunks' ids and their count (see [`encode_delta`]): only ever on
/// the wire of a push, never stored.
pub const BLOB_DELTA: u8 = 2;
/// Most chunks one delta is made against.
pub const MAX_DELTA_BASES: usize = 4;

/// Encodes `plain` as a delta against `base`, the plaintext of the chunks `base_ids`
/// one after the other: a zstd frame compressed with `base` as its prefix (what the two
/// share costs a few bytes), the ids, their count, then [`BLOB_DELTA`]. Decoding needs
/// those chunks ([`delta_bases`], [`decode_delta`]).
pub fn encode_delta(
    base_ids: &[ChunkId],
    base: &[u8],
    plain: &[u8],
    level: i32,
) -> io::Result<Vec<u8>> {
    if base_ids.is_empty() || base_ids.len() > MAX_DELTA_BASES {
        return Err(io::Error::other(format!(
            "a delta is made against 1 to {MAX_DELTA_BASES} chunks"
        )));
    }
    use zstd::zstd_safe::{CCtx, CParameter};
    let zerr =
        |code: usize| io::Error::other(format!("zstd: {}", zstd::zstd_safe::get_error_name(code)));
    let mut cctx = CCtx::create();
    cctx.set_parameter(CParameter::CompressionLevel(level))
        .map_err(zerr)?;
    cctx.set_parameter(CParameter::WindowLog(delta_window_log(
        base.len() + plain.len(),
    )))
    .map_err(zerr)?;
    cctx.set_parameter(CParameter::ContentSizeFlag(true))
        .map_err(zerr)?;
    // Long-distance matching finds the base's runs anywhere in it: without it the fast
    // levels keep too few positions of a prefix of megabytes to find them.
    cctx.set_parameter(CParameter::EnableLongDistanceMatching(true))
        .map_err(zerr)?;
    cctx.ref_prefix(base).map_err(zerr)?;
    let mut out =
        Vec::with_capacity(zstd::zstd_safe::compress_bound(plain.len()) + 32 * base_ids.len() + 2);
    cctx.compress2(&mut out, plain).map_err(zerr)?;
    for id in base_ids {
        out.extend_from_slice(&id.0);
    }
    out.push(base_ids.len() as u8);
    out.push(BLOB_DELTA);
    Ok(out)
}

/// The chunks an encoded blob is a delta against, in order, if it is a delta; and
/// where its frame ends.
fn split_delta(encoded: &[u8]) -> Option<(Vec<ChunkId>, usize)> {
    let (&format, rest) = encoded.split_last()?;
    let (&n, rest) = rest.split_last()?;
    let n = n as usize;
    if format != BLOB_DELTA || n == 0 || n > MAX_DELTA_BASES || rest.len() < 32 * n {
        return None;
    }
    let end = rest.len() - 32 * n;
    let ids = rest[end..]
        .chunks_exact(32)
        .map(|c| ChunkId(c.try_into().expect("32 bytes")))
        .collect();
    Some((ids, end))
}

/// The chunks an encoded blob is a delta against, in order, if it is a delta.
pub fn delta_bases(encoded: &[u8]) -> Option<Vec<ChunkId>> {
    split_delta(encoded).map(|(ids, _)| ids)
}

/// The window a delta needs: the prefix and the plaintext after it.
fn delta_window_log(len: usize) -> u32 {
    (usize::BITS - len.max(1 << 10).next_power_of_two().leading_zeros() - 1).clamp(10, 27)
}

/// Decodes what [`encode_delta`] made of a plaintext with `base` (the plaintext of
/// the chunks [`delta_bases`] names, one after the other), up to `limit` bytes.
pub fn decode_delta(base: &[u8], encoded: &[u8], limit: usize) -> Result<Vec<u8>, BlobDecodeError> {
    use zstd::zstd_safe::{DCtx, DParameter};
    let Some((_, end)) = split_delta(encoded) else {
        return Err(match encoded.last() {
            Some(&f) if f != BLOB_DELTA => BlobDecodeError::UnknownFormat(f),
            _ => BlobDecodeError::Empty,
        });
    };
    let frame = &encoded[..end];
    let corrupt =
        |why: String| BlobDecodeError::Zstd(io::Error::new(io::ErrorKind::InvalidData, why));
    // The declared size, checked, is what is allocated: a delta's frame is small by
    // nature, so its size says nothing about what it decodes to (unlike a stored one).
    let size = match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(size)) if size > limit as u64 => {
            return Err(BlobDecodeError::TooLarge {
                actual: size,
                limit,
            })
        }
        Ok(Some(size)) => size as usize,
        _ => return Err(corrupt("not a zstd frame that declares its size".into())),
    };
    let zerr = |code: usize| corrupt(zstd::zstd_safe::get_error_name(code).to_string());
    let mut dctx = DCtx::create();
    dctx.set_parameter(DParameter::WindowLogMax(27))
        .map_err(zerr)?;
    dctx.ref_prefix(base).map_err(zerr)?;
    let mut out = Vec::with_capacity(size);
    dctx.decompress(&mut out, frame).map_err(zerr)?;
    Ok(out)
}

/// Room to leave at the end of an encoded blob for sealing (tag and nonce).
const SEAL_ROOM: usize = 64;

/// Encodes a chunk for transfer and storage: a zstd frame, or the raw bytes when
/// compression does not make them smaller, followed by one format byte. The format byte
/// goes last so a raw chunk is encoded (and later sealed) in its own buffer, without a
/// copy.
pub fn encode_blob(
    compressor: &mut zstd::bulk::Compressor<'_>,
    plain: Vec<u8>,
) -> io::Result<Vec<u8>> {
    encode_blob_with(compressor, &mut Vec::new(), plain)
}

/// [`encode_blob`] compressing into `scratch`, a buffer the caller keeps between calls:
/// a compressed blob is then allocated at its compressed size, instead of a chunk-sized
/// buffer being allocated, filled and shrunk (a copy) for every chunk. Threads that
/// encode many chunks thus call the allocator less, which they share.
pub fn encode_blob_with(
    compressor: &mut zstd::bulk::Compressor<'_>,
    scratch: &mut Vec<u8>,
    plain: Vec<u8>,
) -> io::Result<Vec<u8>> {
    scratch.clear();
    scratch.reserve(PROBE);
    let mut compressed = None;
    if !looks_incompressible(compressor, &plain, scratch) {
        scratch.clear();
        // A frame that would not be smaller than the input fails for lack of room (or
        // is refused below), which is exactly when the chunk is stored raw.
        scratch.reserve(plain.len());
        if let Ok(n) = compressor.compress_to_buffer(&plain, scratch) {
            if n < plain.len() {
                let mut out = Vec::with_capacity(n + 1 + SEAL_ROOM);
                out.extend_from_slice(&scratch[..n]);
                out.push(BLOB_ZSTD);
                compressed = Some(out);
            }
        }
    }
    // A large chunk grew the scratch buffer: give it back rather than keep it for the
    // (usually smaller) chunks to come.
    if scratch.capacity() > 2 * READ_STEP {
        *scratch = Vec::new();
    }
    if let Some(out) = compressed {
        return Ok(out);
    }
    let mut raw = plain;
    raw.reserve_exact(1 + SEAL_ROOM);
    raw.push(BLOB_RAW);
    Ok(raw)
}

/// Size of the sample that decides whether a large chunk is worth compressing.
const PROBE: usize = 64 * 1024;

/// Whether a sample of `plain` shrinks by less than 2%: then the whole chunk is stored
/// raw without running zstd over it. Random, encrypted and already-compressed data
/// (media, archives) is a large share of real backups, and zstd spends about as long
/// failing to compress it as it does compressing text. Only chunks much larger than the
/// sample are probed; `scratch` is a buffer of at least `PROBE` bytes' capacity.
fn looks_incompressible(
    compressor: &mut zstd::bulk::Compressor<'_>,
    plain: &[u8],
    scratch: &mut Vec<u8>,
) -> bool {
    if plain.len() < 4 * PROBE || scratch.capacity() < PROBE {
        return false;
    }
    let mid = plain.len() / 2;
    let sample = &plain[mid..mid + PROBE];
    scratch.clear();
    match compressor.compress_to_buffer(sample, scratch) {
        Ok(n) => n * 50 >= PROBE * 49,
        Err(_) => true,
    }
}

/// Why a stored or received blob could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum BlobDecodeError {
    #[error("empty blob")]
    Empty,
    #[error("unknown blob format byte {0}")]
    UnknownFormat(u8),
    #[error("a delta, which only its base decodes")]
    NeedsBase,
    #[error("zstd: {0}")]
    Zstd(io::Error),
    #[error("decoded size {actual} exceeds the limit {limit}")]
    TooLarge { actual: u64, limit: usize },
}

/// The plaintext length of an encoded blob, without decoding it when it is raw.
/// `limit` bounds the decoded size, so a hostile peer cannot make us allocate more.
pub fn decode_blob(
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    mut encoded: Vec<u8>,
    limit: usize,
) -> Result<Vec<u8>, BlobDecodeError> {
    match encoded.pop().ok_or(BlobDecodeError::Empty)? {
        BLOB_RAW => {
            if encoded.len() > limit {
                return Err(BlobDecodeError::TooLarge {
                    actual: encoded.len() as u64,
                    limit,
                });
            }
            Ok(encoded)
        }
        BLOB_ZSTD => decompress_frame(decompressor, &encoded, limit),
        BLOB_DELTA => Err(BlobDecodeError::NeedsBase),
        other => Err(BlobDecodeError::UnknownFormat(other)),
    }
}

/// What an encoded blob says it decodes to, without decoding it: `None` when a zstd
/// frame does not declare its size (or the bytes are no blob).
pub fn declared_plain_len(encoded: &[u8]) -> Option<u64> {
    let (&format, body) = encoded.split_last()?;
    match format {
        BLOB_RAW => Some(body.len() as u64),
        BLOB_ZSTD => zstd::zstd_safe::get_frame_content_size(body).ok().flatten(),
        _ => None,
    }
}

/// Decodes without taking ownership: the raw case borrows the bytes.
pub fn decode_blob_ref<'a>(
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    encoded: &'a [u8],
    limit: usize,
) -> Result<std::borrow::Cow<'a, [u8]>, BlobDecodeError> {
    let (&format, body) = encoded.split_last().ok_or(BlobDecodeError::Empty)?;
    match format {
        BLOB_RAW => {
            if body.len() > limit {
                return Err(BlobDecodeError::TooLarge {
                    actual: body.len() as u64,
                    limit,
                });
            }
            Ok(std::borrow::Cow::Borrowed(body))
        }
        BLOB_ZSTD => decompress_frame(decompressor, body, limit).map(std::borrow::Cow::Owned),
        BLOB_DELTA => Err(BlobDecodeError::NeedsBase),
        other => Err(BlobDecodeError::UnknownFormat(other)),
    }
}

/// The most a zstd frame can decode to per byte of it: every block takes at least 3
/// bytes (its header) and decodes to at most 128 KiB.
const ZSTD_MAX_BLOCK: u64 = 128 * 1024;

/// The largest window a frame without a declared size may use (8 MiB, the window every
/// decoder must support by RFC 8878); only such frames need a window buffer.
const UNSIZED_WINDOW_LOG_MAX: u32 = 23;

/// Decodes a blob's zstd frame. Memory follows what the frame can hold, never the
/// limit alone: a frame that declares its size (every frame [`encode_blob`] writes does)
/// is decoded in one call into a buffer of that size, once the size has been checked
/// against the limit and against what the frame's bytes could decode to; a frame that
/// declares none is decoded as a stream, its buffer growing with its actual output.
/// (Sizing the buffer by the limit let a few bytes reserve the whole limit: 8 MiB for
/// a chunk, 512 MiB for a tree; found by the `blob_decode` fuzz target.)
fn decompress_frame(
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    frame: &[u8],
    limit: usize,
) -> Result<Vec<u8>, BlobDecodeError> {
    let corrupt = |why: &str| {
        BlobDecodeError::Zstd(io::Error::new(io::ErrorKind::InvalidData, why.to_string()))
    };
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Err(_) => Err(corrupt("not a zstd frame")),
        Ok(Some(size)) => {
            if size > limit as u64 {
                return Err(BlobDecodeError::TooLarge {
                    actual: size,
                    limit,
                });
            }
            if size > frame.len() as u64 / 3 * ZSTD_MAX_BLOCK {
                return Err(corrupt("the frame declares more than its bytes can hold"));
            }
            decompressor
                .decompress(frame, size as usize)
                .map_err(BlobDecodeError::Zstd)
        }
        Ok(None) => {
            let mut stream =
                zstd::stream::read::Decoder::with_buffer(frame).map_err(BlobDecodeError::Zstd)?;
            stream
                .window_log_max(UNSIZED_WINDOW_LOG_MAX)
                .map_err(BlobDecodeError::Zstd)?;
            let mut out = Vec::new();
            stream
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(BlobDecodeError::Zstd)?;
            if out.len() > limit {
                return Err(BlobDecodeError::TooLarge {
                    actual: out.len() as u64,
                    limit,
                });
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delta_carries_what_changed_and_decodes_only_with_its_base() {
        let mut rng = 7u64;
        let mut random = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect()
        };
        let base = random(1 << 20);
        let mut plain = base.clone();
        plain[300_000..300_100].copy_from_slice(&random(100));
        plain.splice(700_000..700_000, random(50));
        let base_id = ChunkId::of(&base);
        let delta = encode_delta(&[base_id], &base, &plain, 1).unwrap();
        assert_eq!(*delta.last().unwrap(), BLOB_DELTA);
        assert_eq!(delta_bases(&delta), Some(vec![base_id]));
        assert!(delta.len() < 2_000, "{} bytes", delta.len());
        assert_eq!(decode_delta(&base, &delta, 2 << 20).unwrap(), plain);
        // Bounded, and useless without its base.
        assert!(matches!(
            decode_delta(&base, &delta, 1 << 20),
            Err(BlobDecodeError::TooLarge { .. })
        ));
        let other = random(1 << 20);
        assert_ne!(
            decode_delta(&other, &delta, 2 << 20).ok(),
            Some(plain.clone())
        );
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        assert!(matches!(
            decode_blob(&mut d, delta.clone(), 2 << 20),
            Err(BlobDecodeError::NeedsBase)
        ));
        // A chunk that took in its neighbour (a cut point gone): a delta against both.
        let next = random(1 << 19);
        let mut merged = base.clone();
        merged.extend_from_slice(&next);
        merged[100] ^= 1;
        let both = [base.clone(), next.clone()].concat();
        let ids = [base_id, ChunkId::of(&next)];
        let delta = encode_delta(&ids, &both, &merged, 1).unwrap();
        assert!(delta.len() < 2_000, "{} bytes", delta.len());
        assert_eq!(delta_bases(&delta), Some(ids.to_vec()));
        assert_eq!(decode_delta(&both, &delta, 2 << 20).unwrap(), merged);
        assert!(encode_delta(&[], &both, &merged, 3).is_err());
        // A stored blob is no delta.
        assert!(decode_delta(
            &base,
            &encode_blob(&mut zstd::bulk::Compressor::new(3).unwrap(), plain.clone()).unwrap(),
            2 << 20
        )
        .is_err());
    }
    use proptest::prelude::*;

    fn small_params(seed: u64) -> ChunkerParams {
        ChunkerParams {
            min_size: 64,
            avg_size: 256,
            max_size: 1024,
            seed,
        }
    }

    fn chunks_of(params: ChunkerParams, data: &[u8]) -> Vec<Vec<u8>> {
        chunks_with_step(params, data, READ_STEP)
    }

    fn chunks_with_step(params: ChunkerParams, data: &[u8], step: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut c = Chunker::new(params);
        c.step = step;
        c.chunk(data, |ch| {
            out.push(ch);
            Ok(())
        })
        .unwrap();
        out
    }

    proptest! {
        #[test]
        fn chunks_reassemble_and_match_stream_cdc(
            data in proptest::collection::vec(any::<u8>(), 0..20_000),
            seed in any::<u64>(),
        ) {
            let params = small_params(seed);
            // Reading ahead in small steps must not move any cut.
            let ours = chunks_with_step(params, &data, 1 + (seed % 300) as usize);
            prop_assert_eq!(ours.concat(), data.clone());
            let theirs: Vec<Vec<u8>> = fastcdc::v2020::StreamCDC::with_level_and_seed(
                data.as_slice(), params.min_size, params.avg_size, params.max_size,
                Normalization::Level1, seed,
            ).map(|c| c.unwrap().data).collect();
            prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn any_valid_sizes_and_reads_match_stream_cdc(
            data in proptest::collection::vec(any::<u8>(), 0..12_000),
            zeros in 0usize..3000,
            min in 64u32..300,
            avg_extra in 0u32..700,
            max_extra in 0u32..3000,
            step in 1usize..2000,
            seed in any::<u64>(),
        ) {
            // Odd sizes, steps that end anywhere, and a zero run (no cut until max).
            let avg = (min + avg_extra).max(256);
            let params = ChunkerParams { min_size: min, avg_size: avg, max_size: (avg + max_extra).max(1024), seed };
            prop_assume!(params.validate().is_ok());
            let mut data = data;
            let at = data.len() / 3;
            data.splice(at..at, std::iter::repeat_n(0u8, zeros));
            let ours = chunks_with_step(params, &data, step);
            let theirs: Vec<Vec<u8>> = fastcdc::v2020::StreamCDC::with_level_and_seed(
                data.as_slice(), params.min_size, params.avg_size, params.max_size,
                Normalization::Level1, seed,
            ).map(|c| c.unwrap().data).collect();
            prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn compress_round_trip(data in proptest::collection::vec(any::<u8>(), 0..5000), repeat in 1usize..4) {
            let data = data.repeat(repeat);
            let mut c = zstd::bulk::Compressor::new(3).unwrap();
            let mut d = zstd::bulk::Decompressor::new().unwrap();
            let enc = encode_blob(&mut c, data.clone()).unwrap();
            prop_assert!(enc.len() <= data.len() + 1);
            // Every blob we write declares its size (decode_blob relies on it for speed).
            prop_assert_eq!(declared_plain_len(&enc), Some(data.len() as u64));
            prop_assert_eq!(&*decode_blob_ref(&mut d, &enc, 1 << 20).unwrap(), data.as_slice());
            prop_assert_eq!(decode_blob(&mut d, enc, 1 << 20).unwrap(), data);
        }
    }

    /// Valid transfer encodings: zstd frames of compressible bytes, raw random ones.
    fn arb_blob() -> impl Strategy<Value = Vec<u8>> {
        (proptest::collection::vec(any::<u8>(), 0..200), 1usize..8).prop_map(|(data, repeat)| {
            let mut c = zstd::bulk::Compressor::new(1).unwrap();
            encode_blob(&mut c, data.repeat(repeat)).unwrap()
        })
    }

    proptest! {
        /// The stable counterpart of the `blob_decode` fuzz target (docs/fuzzing.md).
        #[test]
        fn hostile_blobs_are_refused_or_decoded_within_the_limit(
            encoded in haul_mutate::inputs(arb_blob(), 200),
            limit in 0usize..3000,
        ) {
            let mut d = zstd::bulk::Decompressor::new().unwrap();
            let owned = decode_blob(&mut d, encoded.clone(), limit);
            let borrowed = decode_blob_ref(&mut d, &encoded, limit);
            match (owned, borrowed) {
                (Ok(a), Ok(b)) => {
                    prop_assert_eq!(&a, &*b);
                    prop_assert!(a.len() <= limit);
                    if let Some(n) = declared_plain_len(&encoded) {
                        prop_assert_eq!(n, a.len() as u64);
                    }
                }
                (Err(_), Err(_)) => {}
                (a, b) => prop_assert!(false, "decode_blob {:?} but decode_blob_ref {:?}", a, b),
            }
        }
    }

    /// A zstd frame without a content size: a 1 KiB window and raw blocks.
    fn unsized_frame(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x00];
        let blocks: Vec<&[u8]> = if data.is_empty() {
            vec![&[]]
        } else {
            data.chunks(1024).collect()
        };
        for (i, block) in blocks.iter().enumerate() {
            let last = u32::from(i + 1 == blocks.len());
            out.extend_from_slice(&((block.len() as u32) << 3 | last).to_le_bytes()[..3]);
            out.extend_from_slice(block);
        }
        out.push(BLOB_ZSTD);
        out
    }

    /// Far more than this machine has: a decoder that sized its buffer by the limit
    /// would abort the test.
    const HUGE_LIMIT: usize = 1 << 40;

    /// The first `blob_decode` fuzz crash: the zstd format byte after bytes that are no
    /// zstd frame reserved the whole limit before zstd refused them.
    #[test]
    fn garbage_after_the_zstd_format_byte_does_not_reserve_the_limit() {
        let crash =
            b"\x28\xb5\x2f\xff\x60\x88\x12\x4d\x00\x00\x10\x00\x00\x01\x00\x83\xd3\x03\x2c\x01";
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let e = decode_blob_ref(&mut d, crash, HUGE_LIMIT).unwrap_err();
        assert!(e.to_string().contains("not a zstd frame"), "{e}");
    }

    #[test]
    fn a_frame_declaring_more_than_its_bytes_can_hold_is_refused_before_decoding() {
        // Single segment, an 8-byte content size of 512 MiB, one empty raw block.
        let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0xe0];
        frame.extend_from_slice(&(512u64 << 20).to_le_bytes());
        frame.extend_from_slice(&[0x01, 0x00, 0x00, BLOB_ZSTD]);
        assert_eq!(declared_plain_len(&frame), Some(512 << 20));
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let e = decode_blob(&mut d, frame, HUGE_LIMIT).unwrap_err();
        assert!(
            e.to_string()
                .contains("declares more than its bytes can hold"),
            "{e}"
        );
    }

    #[test]
    fn a_frame_without_a_declared_size_decodes_as_a_stream_within_the_limit() {
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let data = noise(5000, 11);
        let frame = unsized_frame(&data);
        assert_eq!(declared_plain_len(&frame), None);
        assert_eq!(
            decode_blob(&mut d, frame.clone(), HUGE_LIMIT).unwrap(),
            data
        );
        assert_eq!(decode_blob(&mut d, frame.clone(), 5000).unwrap(), data);
        assert!(matches!(
            decode_blob(&mut d, frame, 4999),
            Err(BlobDecodeError::TooLarge { limit: 4999, .. })
        ));
        assert_eq!(decode_blob(&mut d, unsized_frame(b""), 0).unwrap(), b"");
    }

    #[test]
    fn shifted_data_shares_most_chunks() {
        let data = noise(200_000, 0x1234_5678);
        let mut shifted = b"xyz".to_vec();
        shifted.extend_from_slice(&data);
        let a = chunks_of(small_params(9), &data);
        let b = chunks_of(small_params(9), &shifted);
        let common = b.iter().filter(|c| a.contains(c)).count();
        // Only the chunks around the shift differ: FastCDC resynchronises within a
        // few (small, here) chunks.
        assert!(
            a.len() > 100 && common + 4 >= a.len(),
            "{common} of {} shared",
            a.len()
        );
    }

    /// Incompressible bytes (xorshift).
    fn noise(len: usize, mut x: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    #[test]
    fn one_scratch_buffer_encodes_a_run_of_chunks_as_fresh_buffers_do() {
        let text: Vec<u8> = b"alpha beta gamma delta backup restore snapshot chunk "
            .iter()
            .cycle()
            .take(300_000)
            .copied()
            .collect();
        let chunks = [
            text.clone(),
            noise(3_000_000, 3), // grows the scratch past the size it keeps
            text[..5000].to_vec(),
            noise(2000, 5),
            vec![0u8; 4_000_000],
            Vec::new(),
            text,
        ];
        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let mut scratch = Vec::new();
        for chunk in chunks {
            let shared = encode_blob_with(&mut c, &mut scratch, chunk.clone()).unwrap();
            assert_eq!(shared, encode_blob(&mut c, chunk.clone()).unwrap());
            assert!(scratch.capacity() <= 2 * READ_STEP + PROBE);
            // Sized to the blob plus the seal, not to the chunk.
            assert!(shared.capacity() <= shared.len() + SEAL_ROOM);
            assert_eq!(decode_blob(&mut d, shared, 8 << 20).unwrap(), chunk);
        }
    }

    #[test]
    fn incompressible_is_stored_raw_and_limit_holds() {
        let data = noise(4096, 0x9e37_79b9_7f4a_7c15);
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let enc = encode_blob(&mut c, data.clone()).unwrap();
        assert_eq!(*enc.last().unwrap(), BLOB_RAW);
        // Large random chunks are recognised by the probe and stored raw too.
        let big = noise(1_000_000, 7);
        let enc = encode_blob(&mut c, big.clone()).unwrap();
        assert_eq!(*enc.last().unwrap(), BLOB_RAW);
        assert_eq!(decode_blob(&mut d, enc, 1 << 20).unwrap(), big);
        let zeros = vec![0u8; 100_000];
        let enc = encode_blob(&mut c, zeros.clone()).unwrap();
        assert_eq!(*enc.last().unwrap(), BLOB_ZSTD);
        assert!(enc.len() < 1000);
        assert_eq!(
            &*decode_blob_ref(&mut d, &enc, 1 << 20).unwrap(),
            zeros.as_slice()
        );
        assert!(matches!(
            decode_blob(&mut d, enc, 1000),
            Err(BlobDecodeError::TooLarge { .. })
        ));
    }
}
