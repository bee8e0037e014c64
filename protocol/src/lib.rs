//! What the haul agent and the haul repository agree on.
//!
//! The agent on a source host must never link crypto or pack code (a compromised
//! source host holds no key), yet it and the repository must agree byte for byte on
//! ids, trees and chunk boundaries. This crate is that agreement, plus the two pieces
//! of filesystem work both sides do:
//!
//! - [`id`]: BLAKE3 ids as newtypes.
//! - [`tree`]: the canonical directory encoding.
//! - [`chunker`]: FastCDC chunking and per-chunk zstd encoding.
//! - [`walk`]: the backup walker with change detection, feeding a [`walk::Sink`].
//! - [`restore`]: the restorer, fed by a [`restore::BlobSource`].
//! - [`meta`]: reading and applying file metadata.

pub mod chunker;
pub mod command;
pub mod id;
pub mod meta;
pub mod restore;
pub mod tree;
pub mod walk;

pub use id::{BlobKind, BlobRef, ChunkId, PackId, SnapshotId, TreeId};
pub mod wire;

/// This process's peak resident memory in KiB, as both sides report it in run records:
/// `VmHWM`, the high-water mark of this program's own memory. (`getrusage`'s
/// `ru_maxrss` would include the memory of the process that started this one, up to
/// the `exec`.)
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
