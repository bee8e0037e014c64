//! On-disk encodings of the repository's objects, with validation and no workflow.
//!
//! Every object but `config` and key files is sealed (see [`crate::crypto`]) under the
//! data key with associated data naming its role, so an observer of the storage learns
//! only object sizes, and no object can be passed off as another kind.

pub mod condemned;
pub mod config;
pub mod index_file;
pub mod key_file;
pub mod lock_file;
pub mod pack_header;
pub mod snapshot;

/// Associated data of each sealed object kind.
pub(crate) mod ad {
    pub const CONFIG: &[u8] = b"haul config v1";
    pub const INDEX: &[u8] = b"haul index v1";
    pub const SNAPSHOT: &[u8] = b"haul snapshot v1";
    pub const PACK_HEADER: &[u8] = b"haul pack header v1";
    pub const MASTER_KEY: &[u8] = b"haul master key v1";
    pub const CONDEMNED: &[u8] = b"haul condemnation v1";
    pub const EPOCH: &[u8] = b"haul prune epoch v1";

    /// A blob's associated data: its kind and full id.
    pub fn blob(kind: haul_protocol::BlobKind, id: &[u8; 32]) -> [u8; 33] {
        let mut out = [0u8; 33];
        out[0] = kind.code();
        out[1..].copy_from_slice(id);
        out
    }
}

/// A small cursor for the binary formats here.
pub(crate) struct Cursor<'a> {
    pub buf: &'a [u8],
    pub pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    pub fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    pub fn id(&mut self) -> Option<[u8; 32]> {
        self.take(32)?.try_into().ok()
    }
    pub fn done(&self) -> bool {
        self.pos == self.buf.len()
    }
}
