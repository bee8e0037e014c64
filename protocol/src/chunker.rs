//! Content-defined chunking with FastCDC v2020, and per-chunk compression.
//!
//! The cut points are the `fastcdc` crate's own (`v2020::cut_gear` with the gear tables
//! of `get_gear_with_seed`), so a file chunks exactly as `fastcdc::v2020::StreamCDC`
//! would chunk it (a test holds us to that). We drive `cut_gear` ourselves because
//! `StreamCDC` allocates a `max_size` buffer per file and moves the buffer's tail after
//! every chunk; a [`Chunker`] is built once per worker and reuses its buffer for every
//! file, which matters when a tree holds a hundred thousand small files.

use fastcdc::v2020::{cut_gear, get_gear_with_seed, logarithm2, Normalization, MASKS};
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

/// A reusable FastCDC chunker. Not `Sync`: one per worker thread.
pub struct Chunker {
    params: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
    gear: Box<[u64; 256]>,
    gear_ls: Box<[u64; 256]>,
    buf: Vec<u8>,
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
        }
    }

    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Cuts `reader`'s bytes into chunks and hands each to `f` in order, as an owned
    /// buffer. Reads at most `max_size` bytes ahead. Returns the number of bytes read.
    pub fn chunk<R: Read>(
        &mut self,
        mut reader: R,
        mut f: impl FnMut(Vec<u8>) -> io::Result<()>,
    ) -> io::Result<u64> {
        let max = self.params.max_size as usize;
        if self.buf.len() < max {
            self.buf.resize(max, 0);
        }
        let mut len = 0usize; // valid bytes at the start of buf
        let mut eof = false;
        let mut total = 0u64;
        loop {
            while !eof && len < max {
                match reader.read(&mut self.buf[len..max]) {
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
                return Ok(total);
            }
            let (_, cut) = cut_gear(
                &self.buf[..len],
                self.params.min_size as usize,
                self.params.avg_size as usize,
                max,
                self.mask_s,
                self.mask_l,
                self.mask_s << 1,
                self.mask_l << 1,
                &self.gear,
                &self.gear_ls,
            );
            f(self.buf[..cut].to_vec())?;
            self.buf.copy_within(cut..len, 0);
            len -= cut;
        }
    }
}

/// The first byte of a stored blob's plaintext: how the rest is encoded.
pub const BLOB_RAW: u8 = 0;
/// See [`BLOB_RAW`].
pub const BLOB_ZSTD: u8 = 1;

/// Encodes a chunk for transfer and storage: a format byte, then the zstd frame, or
/// the raw bytes when compression does not make them smaller.
pub fn compress_blob(
    compressor: &mut zstd::bulk::Compressor<'_>,
    plain: &[u8],
) -> io::Result<Vec<u8>> {
    // A destination no larger than the input: zstd fails when the frame would not be
    // smaller, which is exactly when the chunk is stored raw.
    let mut out = vec![0u8; 1 + plain.len()];
    match compressor.compress_to_buffer(plain, &mut out[1..]) {
        Ok(n) if n < plain.len() => {
            out[0] = BLOB_ZSTD;
            out.truncate(1 + n);
        }
        _ => {
            out[0] = BLOB_RAW;
            out[1..].copy_from_slice(plain);
        }
    }
    Ok(out)
}

/// Why a stored or received blob could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum BlobDecodeError {
    #[error("empty blob")]
    Empty,
    #[error("unknown blob format byte {0}")]
    UnknownFormat(u8),
    #[error("zstd: {0}")]
    Zstd(io::Error),
    #[error("decoded size {actual} exceeds the limit {limit}")]
    TooLarge { actual: u64, limit: usize },
}

/// Reverses [`compress_blob`]. `limit` bounds the decoded size, so a hostile peer cannot
/// make us allocate more than that.
pub fn decompress_blob(
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    encoded: &[u8],
    limit: usize,
) -> Result<Vec<u8>, BlobDecodeError> {
    let (&format, body) = encoded.split_first().ok_or(BlobDecodeError::Empty)?;
    match format {
        BLOB_RAW => {
            if body.len() > limit {
                return Err(BlobDecodeError::TooLarge {
                    actual: body.len() as u64,
                    limit,
                });
            }
            Ok(body.to_vec())
        }
        BLOB_ZSTD => {
            let size = zstd::zstd_safe::get_frame_content_size(body)
                .ok()
                .flatten()
                .unwrap_or(limit as u64);
            if size > limit as u64 {
                return Err(BlobDecodeError::TooLarge {
                    actual: size,
                    limit,
                });
            }
            decompressor
                .decompress(body, size as usize)
                .map_err(BlobDecodeError::Zstd)
        }
        other => Err(BlobDecodeError::UnknownFormat(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let mut out = Vec::new();
        let mut c = Chunker::new(params);
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
            let ours = chunks_of(params, &data);
            prop_assert_eq!(ours.concat(), data.clone());
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
            let enc = compress_blob(&mut c, &data).unwrap();
            prop_assert!(enc.len() <= data.len() + 1);
            prop_assert_eq!(decompress_blob(&mut d, &enc, 1 << 20).unwrap(), data);
        }
    }

    #[test]
    fn shifted_data_shares_most_chunks() {
        let mut rng = 0x1234_5678_u64;
        let data: Vec<u8> = (0..200_000)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        let mut shifted = b"xyz".to_vec();
        shifted.extend_from_slice(&data);
        let a = chunks_of(small_params(9), &data);
        let b = chunks_of(small_params(9), &shifted);
        let common = b.iter().filter(|c| a.contains(c)).count();
        assert!(
            a.len() > 100 && common + 2 >= a.len(),
            "{common} of {} shared",
            a.len()
        );
    }

    #[test]
    fn incompressible_is_stored_raw_and_limit_holds() {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let enc = compress_blob(&mut c, &data).unwrap();
        assert_eq!(enc[0], BLOB_RAW);
        let zeros = vec![0u8; 100_000];
        let enc = compress_blob(&mut c, &zeros).unwrap();
        assert_eq!(enc[0], BLOB_ZSTD);
        assert!(matches!(
            decompress_blob(&mut d, &enc, 1000),
            Err(BlobDecodeError::TooLarge { .. })
        ));
    }
}
