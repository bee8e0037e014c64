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
