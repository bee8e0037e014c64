//! Trees: one per directory, in a canonical byte encoding named by its BLAKE3.
//!
//! The encoding is written by hand rather than through a serde format because it must be
//! *canonical*: the same directory must always encode to the same bytes, on every version,
//! or unchanged directories would produce new trees and deduplication of trees would
//! silently stop. [`Tree::decode`] accepts only what [`Tree::encode`] produces (names
//! strictly sorted, minimal varints, known kinds, no trailing bytes), so
//! `encode(decode(b)) == b` for every accepted `b`.
//!
//! Layout (integers are LEB128 varints unless noted, `bytes` is a varint length then
//! the bytes):
//!
//! ```text
//! tree  = "HTR1" count:varint node*count        (every node's flags are empty)
//!       | "HTR2" count:varint (node flags)*count (some node has a flag)
//! node  = name:bytes kind:u8 mode uid gid user:bytes group:bytes size
//!         mtime_sec:zigzag mtime_nsec ctime_sec:zigzag ctime_nsec
//!         inode device nlink rdev target:bytes
//!         xattr_count (name:bytes value:bytes)*   (sorted by name, unique)
//!         content_count chunk_id[32]*
//!         has_subtree:u8 [tree_id[32]]
//! flags = varint                                  (see [`NodeFlags`])
//! ```
//!
//! Flags came after the first trees were written: a tree without any keeps the `HTR1`
//! form, so an unchanged directory still encodes to the bytes (and the id) it had, and
//! deduplication of trees goes on across the change. An `HTR2` tree whose flags are all
//! empty is not canonical and is refused.
//!
//! Names and symlink targets are raw bytes: non-UTF-8 names round-trip. A name is never
//! empty, `.`, `..`, and never contains `/` or NUL, so a restorer that joins names onto a
//! target directory can never climb out of it.

use crate::id::{ChunkId, TreeId};

mod pages;
pub use pages::{
    check_page, find_node, for_each_page, is_pages, read_page, Lookup, PageError, PageRef, Pager,
    Pages, TreeBlob, PAGE_BYTES, PAGE_MAX, PAGE_MIN,
};

const MAGIC: &[u8; 4] = b"HTR1";
const MAGIC_FLAGS: &[u8; 4] = b"HTR2";
/// The fewest bytes a node encodes to: a one-byte name with its length, then a byte for
/// each other field (kind, mode, uid, gid, user, group, size, mtime and ctime in two
/// each, inode, device, nlink, rdev, target, xattr and content counts, subtree flag).
const MIN_NODE_BYTES: usize = 21;

/// What kind of file a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NodeKind {
    #[default]
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl NodeKind {
    fn code(self) -> u8 {
        match self {
            NodeKind::File => 0,
            NodeKind::Dir => 1,
            NodeKind::Symlink => 2,
            NodeKind::Fifo => 3,
            NodeKind::Socket => 4,
            NodeKind::CharDevice => 5,
            NodeKind::BlockDevice => 6,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => NodeKind::File,
            1 => NodeKind::Dir,
            2 => NodeKind::Symlink,
            3 => NodeKind::Fifo,
            4 => NodeKind::Socket,
            5 => NodeKind::CharDevice,
            6 => NodeKind::BlockDevice,
            _ => return None,
        })
    }
    /// A short word for listings.
    pub fn word(self) -> &'static str {
        match self {
            NodeKind::File => "file",
            NodeKind::Dir => "dir",
            NodeKind::Symlink => "symlink",
            NodeKind::Fifo => "fifo",
            NodeKind::Socket => "socket",
            NodeKind::CharDevice => "chardev",
            NodeKind::BlockDevice => "blockdev",
        }
    }
}

/// A point in time as seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

/// Facts about a node that its metadata alone does not tell. Bits this version does not
/// know are kept as they are (a tree written by a newer version re-encodes to itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NodeFlags(pub u64);

impl NodeFlags {
    /// The file changed while it was read, every time it was read: its content is the
    /// bytes that were read (its `size` is their length), which may mix two states of
    /// the file. The next backup reads it again whatever its metadata says.
    pub const CHANGED_WHILE_READ: NodeFlags = NodeFlags(1);
    /// The file had holes on the source (fewer blocks allocated than its size needs):
    /// a restore leaves its long zero runs as holes. A file without this flag is
    /// restored fully allocated, as it was (a preallocated database file stays so).
    pub const SPARSE: NodeFlags = NodeFlags(2);

    pub fn contains(self, f: NodeFlags) -> bool {
        self.0 & f.0 == f.0
    }
    pub fn insert(&mut self, f: NodeFlags) {
        self.0 |= f.0;
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// One entry of a directory with all the metadata haul keeps.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Node {
    /// The entry's name: raw bytes, never containing `/` or NUL.
    pub name: Vec<u8>,
    pub kind: NodeKind,
    /// Permission bits including setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// The owner's user name on the source host, empty if unknown.
    pub user: Vec<u8>,
    /// The owner's group name on the source host, empty if unknown.
    pub group: Vec<u8>,
    /// Content length for files, 0 otherwise.
    pub size: u64,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub inode: u64,
    pub device: u64,
    pub nlink: u64,
    /// Device number of character and block devices.
    pub rdev: u64,
    /// Symlink target as raw bytes; empty for other kinds.
    pub target: Vec<u8>,
    /// Extended attributes, sorted by name, names unique.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The chunks of a file's content, in order.
    pub content: Vec<ChunkId>,
    /// A directory's own tree.
    pub subtree: Option<TreeId>,
    pub flags: NodeFlags,
}

impl Node {
    /// BLAKE3 of what a restore makes of this node (kind, permissions, owner, size,
    /// mtime, device number, link target, xattrs, content, flags), not of what it says
    /// of its source (inode, ctime, link count): two nodes with one digest restore to
    /// the same entry. A standby copy keeps a file whose digest did not change.
    pub fn restore_digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        let bytes = |h: &mut blake3::Hasher, b: &[u8]| {
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        };
        h.update(&[self.kind.code()]);
        for n in [self.mode, self.uid, self.gid, self.mtime.nsec] {
            h.update(&n.to_le_bytes());
        }
        for n in [self.size, self.rdev, self.flags.0] {
            h.update(&n.to_le_bytes());
        }
        h.update(&self.mtime.sec.to_le_bytes());
        bytes(&mut h, &self.user);
        bytes(&mut h, &self.group);
        bytes(&mut h, &self.target);
        h.update(&(self.xattrs.len() as u64).to_le_bytes());
        for (name, value) in &self.xattrs {
            bytes(&mut h, name);
            bytes(&mut h, value);
        }
        h.update(&(self.content.len() as u64).to_le_bytes());
        for c in &self.content {
            h.update(&c.0);
        }
        *h.finalize().as_bytes()
    }
}

/// A directory listing: nodes sorted by name, names unique.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

/// Why bytes are not a valid tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tree encoding at byte {offset}: {reason}")]
pub struct DecodeError {
    pub offset: usize,
    pub reason: &'static str,
}

/// Whether `name` may stand in a tree: not empty, not `.` or `..`, no `/` or NUL.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.iter().any(|&b| b == b'/' || b == 0)
}

impl Tree {
    /// Sorts nodes by name (byte order) so the tree can be encoded.
    pub fn sort(&mut self) {
        self.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    }

    /// The node called `name`, by binary search.
    pub fn find(&self, name: &[u8]) -> Option<&Node> {
        self.nodes
            .binary_search_by(|n| n.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.nodes[i])
    }

    /// The canonical encoding. Panics if the nodes are not sorted and unique, or a
    /// name is invalid: callers build trees through [`Tree::sort`] from names read
    /// off a filesystem, so either is a bug, not bad input.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.nodes.len() * 96);
        let flagged = self.nodes.iter().any(|n| !n.flags.is_empty());
        out.extend_from_slice(if flagged { MAGIC_FLAGS } else { MAGIC });
        put_varint(&mut out, self.nodes.len() as u64);
        let mut prev: Option<&[u8]> = None;
        for node in &self.nodes {
            assert!(
                valid_name(&node.name),
                "invalid name in tree: {:?}",
                node.name
            );
            if let Some(p) = prev {
                assert!(p < node.name.as_slice(), "tree nodes not sorted and unique");
            }
            prev = Some(&node.name);
            encode_node(&mut out, node);
            if flagged {
                put_varint(&mut out, node.flags.0);
            }
        }
        out
    }

    /// Encodes and names the tree.
    pub fn encode_with_id(&self) -> (TreeId, Vec<u8>) {
        let bytes = self.encode();
        (TreeId::of(&bytes), bytes)
    }

    /// Parses a canonical encoding, rejecting anything [`Tree::encode`] would not produce.
    pub fn decode(bytes: &[u8]) -> Result<Tree, DecodeError> {
        let mut nodes = Vec::new();
        Tree::for_each_node(bytes, |node| {
            nodes.push(node);
            Ok::<(), std::convert::Infallible>(())
        })
        .map_err(|e| match e {
            VisitError::Decode(d) => d,
            VisitError::Visitor(never) => match never {},
        })?;
        Ok(Tree { nodes })
    }

    /// Checks a canonical encoding as [`Tree::decode`] does, handing each node to
    /// `visit` as it is decoded instead of keeping them all: memory is one node, not
    /// the directory (a node takes ten times its smallest encoding in memory, and the
    /// server checks every tree a host uploads). On a visitor's error, stops with it.
    pub fn for_each_node<E>(
        bytes: &[u8],
        mut visit: impl FnMut(Node) -> Result<(), E>,
    ) -> Result<(), VisitError<E>> {
        let mut r = Reader { buf: bytes, pos: 0 };
        let flagged = match r.take(4)? {
            m if m == MAGIC => false,
            m if m == MAGIC_FLAGS => true,
            _ => return Err(r.err("not a haul tree (bad magic)").into()),
        };
        let count = r.varint()?;
        // Every node takes at least MIN_NODE_BYTES: a larger count is a lie.
        if count > (r.remaining() / MIN_NODE_BYTES) as u64 {
            return Err(r.err("node count larger than the encoding").into());
        }
        let mut prev: Vec<u8> = Vec::new();
        let mut any_flag = false;
        for i in 0..count {
            let mut node = decode_node(&mut r)?;
            if flagged {
                node.flags = NodeFlags(r.varint()?);
                any_flag |= !node.flags.is_empty();
            }
            if i > 0 && prev >= node.name {
                return Err(r.err("node names not sorted and unique").into());
            }
            prev.clear();
            prev.extend_from_slice(&node.name);
            visit(node).map_err(VisitError::Visitor)?;
        }
        if r.pos != bytes.len() {
            return Err(r.err("trailing bytes after the last node").into());
        }
        if flagged && !any_flag {
            return Err(r.err("flagged tree without a flagged node").into());
        }
        Ok(())
    }
}

/// Why [`Tree::for_each_node`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum VisitError<E> {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("{0}")]
    Visitor(E),
}

fn encode_node(out: &mut Vec<u8>, n: &Node) {
    put_bytes(out, &n.name);
    out.push(n.kind.code());
    put_varint(out, n.mode as u64);
    put_varint(out, n.uid as u64);
    put_varint(out, n.gid as u64);
    put_bytes(out, &n.user);
    put_bytes(out, &n.group);
    put_varint(out, n.size);
    put_varint(out, zigzag(n.mtime.sec));
    put_varint(out, n.mtime.nsec as u64);
    put_varint(out, zigzag(n.ctime.sec));
    put_varint(out, n.ctime.nsec as u64);
    put_varint(out, n.inode);
    put_varint(out, n.device);
    put_varint(out, n.nlink);
    put_varint(out, n.rdev);
    put_bytes(out, &n.target);
    put_varint(out, n.xattrs.len() as u64);
    let mut prev: Option<&[u8]> = None;
    for (k, v) in &n.xattrs {
        if let Some(p) = prev {
            assert!(p < k.as_slice(), "xattrs not sorted and unique");
        }
        prev = Some(k);
        put_bytes(out, k);
        put_bytes(out, v);
    }
    put_varint(out, n.content.len() as u64);
    for c in &n.content {
        out.extend_from_slice(&c.0);
    }
    match &n.subtree {
        Some(t) => {
            out.push(1);
            out.extend_from_slice(&t.0);
        }
        None => out.push(0),
    }
}

fn decode_node(r: &mut Reader<'_>) -> Result<Node, DecodeError> {
    let name = r.bytes()?.to_vec();
    if !valid_name(&name) {
        return Err(r.err("invalid node name"));
    }
    let kind = NodeKind::from_code(r.u8()?).ok_or_else(|| r.err("unknown node kind"))?;
    let mode = r.u32()?;
    let uid = r.u32()?;
    let gid = r.u32()?;
    let user = r.bytes()?.to_vec();
    let group = r.bytes()?.to_vec();
    let size = r.varint()?;
    let mtime = Timestamp {
        sec: unzigzag(r.varint()?),
        nsec: r.nsec()?,
    };
    let ctime = Timestamp {
        sec: unzigzag(r.varint()?),
        nsec: r.nsec()?,
    };
    let inode = r.varint()?;
    let device = r.varint()?;
    let nlink = r.varint()?;
    let rdev = r.varint()?;
    let target = r.bytes()?.to_vec();
    let nx = r.varint()?;
    // A pair takes at least two bytes (two empty lengths), however it is counted.
    if nx > (r.remaining() / 2) as u64 {
        return Err(r.err("xattr count larger than the encoding"));
    }
    let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(nx as usize);
    for _ in 0..nx {
        let k = r.bytes()?.to_vec();
        let v = r.bytes()?.to_vec();
        if let Some((p, _)) = xattrs.last() {
            if *p >= k {
                return Err(r.err("xattrs not sorted and unique"));
            }
        }
        xattrs.push((k, v));
    }
    let nc = r.varint()?;
    if nc > (r.remaining() / 32) as u64 {
        return Err(r.err("content count larger than the encoding"));
    }
    let mut content = Vec::with_capacity(nc as usize);
    for _ in 0..nc {
        content.push(ChunkId(r.array32()?));
    }
    let subtree = match r.u8()? {
        0 => None,
        1 => Some(TreeId(r.array32()?)),
        _ => return Err(r.err("bad subtree flag")),
    };
    Ok(Node {
        name,
        kind,
        mode,
        uid,
        gid,
        user,
        group,
        size,
        mtime,
        ctime,
        inode,
        device,
        nlink,
        rdev,
        target,
        xattrs,
        content,
        subtree,
        flags: NodeFlags::default(),
    })
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Appends `v` as an unsigned LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, reason: &'static str) -> DecodeError {
        DecodeError {
            offset: self.pos,
            reason,
        }
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(self.err("truncated"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn array32(&mut self) -> Result<[u8; 32], DecodeError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            if i == 9 && b > 1 {
                return Err(self.err("varint overflows 64 bits"));
            }
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(self.err("non-minimal varint"));
                }
                return Ok(v);
            }
        }
        Err(self.err("varint too long"))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        u32::try_from(self.varint()?).map_err(|_| self.err("value exceeds 32 bits"))
    }
    fn nsec(&mut self) -> Result<u32, DecodeError> {
        let v = self.u32()?;
        if v >= 1_000_000_000 {
            return Err(self.err("nanoseconds out of range"));
        }
        Ok(v)
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.varint()?;
        if n > self.remaining() as u64 {
            return Err(self.err("length larger than the encoding"));
        }
        self.take(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_name() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 1..12).prop_filter("valid name", |n| valid_name(n))
    }

    fn arb_node() -> impl Strategy<Value = Node> {
        (
            arb_name(),
            0u8..7,
            any::<(u32, u32, u32)>(),
            proptest::collection::vec(any::<u8>(), 0..8),
            any::<(u64, i64, u32, i64, u32)>(),
            any::<(u64, u64, u64, u64)>(),
            proptest::collection::vec(any::<u8>(), 0..20),
            proptest::collection::btree_map(
                proptest::collection::vec(any::<u8>(), 1..6),
                proptest::collection::vec(any::<u8>(), 0..10),
                0..3,
            ),
            proptest::collection::vec(any::<[u8; 32]>(), 0..4),
            proptest::option::of(any::<[u8; 32]>()),
            prop_oneof![3 => Just(0u64), 1 => 0u64..4, 1 => any::<u64>()],
        )
            .prop_map(
                |(name, kind, (mode, uid, gid), user, t, d, target, x, content, sub, flags)| Node {
                    name,
                    kind: NodeKind::from_code(kind).unwrap(),
                    mode,
                    uid,
                    gid,
                    group: user.clone(),
                    user,
                    size: t.0,
                    mtime: Timestamp {
                        sec: t.1,
                        nsec: t.2 % 1_000_000_000,
                    },
                    ctime: Timestamp {
                        sec: t.3,
                        nsec: t.4 % 1_000_000_000,
                    },
                    inode: d.0,
                    device: d.1,
                    nlink: d.2,
                    rdev: d.3,
                    target,
                    xattrs: x.into_iter().collect(),
                    content: content.into_iter().map(ChunkId).collect(),
                    subtree: sub.map(TreeId),
                    flags: NodeFlags(flags),
                },
            )
    }

    fn arb_tree() -> impl Strategy<Value = Tree> {
        proptest::collection::vec(arb_node(), 0..6).prop_map(|nodes| {
            let mut t = Tree { nodes };
            t.sort();
            t.nodes.dedup_by(|a, b| a.name == b.name);
            t
        })
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(tree in arb_tree()) {
            let bytes = tree.encode();
            let back = Tree::decode(&bytes).unwrap();
            prop_assert_eq!(&back, &tree);
            prop_assert_eq!(back.encode(), bytes);
        }

        #[test]
        fn decode_never_panics_and_accepts_only_canonical(flagged: bool, bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut input = if flagged { MAGIC_FLAGS } else { MAGIC }.to_vec();
            input.extend_from_slice(&bytes);
            if let Ok(t) = Tree::decode(&input) {
                prop_assert_eq!(t.encode(), input);
            }
        }

        #[test]
        fn zigzag_round_trip(v in any::<i64>()) {
            prop_assert_eq!(unzigzag(zigzag(v)), v);
        }
    }

    #[test]
    fn a_tree_without_flags_keeps_the_first_form_and_its_id() {
        let mut tree = Tree {
            nodes: vec![
                Node {
                    name: b"a".to_vec(),
                    size: 3,
                    ..Default::default()
                },
                Node {
                    name: b"b".to_vec(),
                    ..Default::default()
                },
            ],
        };
        let plain = tree.encode();
        assert_eq!(&plain[..4], MAGIC);
        tree.nodes[1].flags.insert(NodeFlags::CHANGED_WHILE_READ);
        let flagged = tree.encode();
        assert_eq!(&flagged[..4], MAGIC_FLAGS);
        let back = Tree::decode(&flagged).unwrap();
        assert!(back.nodes[1].flags.contains(NodeFlags::CHANGED_WHILE_READ));
        assert!(!back.nodes[1].flags.contains(NodeFlags::SPARSE));
        assert!(back.nodes[0].flags.is_empty());
        // The same nodes, all flags empty, in the second form: not canonical.
        let mut forged = MAGIC_FLAGS.to_vec();
        forged.extend_from_slice(&plain[4..5]);
        let mut body = plain[5..].to_vec();
        // Each node's encoding is followed by its flags varint (0) in this form.
        let first_len = {
            let mut out = Vec::new();
            encode_node(&mut out, &tree.nodes[0]);
            out.len()
        };
        body.insert(first_len, 0);
        body.push(0);
        forged.extend_from_slice(&body);
        assert_eq!(
            Tree::decode(&forged).unwrap_err().reason,
            "flagged tree without a flagged node"
        );
    }

    /// Found by the tree_decode fuzz target: a node count near the input's length made
    /// the decoder reserve 264 bytes per input byte (26 GB for a 100 MB upload).
    #[test]
    fn a_node_count_the_bytes_cannot_hold_reserves_nothing() {
        // A node count followed by 64 KiB of zeros: why it does not decode.
        let refusal = |count| {
            let mut bytes = MAGIC.to_vec();
            put_varint(&mut bytes, count);
            bytes.resize(bytes.len() + 64 * 1024, 0);
            Tree::decode(&bytes).unwrap_err().reason
        };
        assert_eq!(refusal(100_000_000), "node count larger than the encoding");
        // A count the bytes could hold decodes node by node and fails at the first.
        assert_eq!(refusal(3000), "invalid node name");
        // Likewise an xattr count.
        let mut out = MAGIC.to_vec();
        put_varint(&mut out, 1);
        let node = Node {
            name: b"x".to_vec(),
            ..Default::default()
        };
        encode_node(&mut out, &node);
        let at = out.len() - 3; // xattr count, content count, subtree flag
        out[at] = 0x80;
        out.insert(at + 1, 0x40); // 8192 pairs in three bytes
        assert_eq!(
            Tree::decode(&out).unwrap_err().reason,
            "xattr count larger than the encoding"
        );
    }

    #[test]
    fn rejects_unsorted_and_bad_names() {
        let mut a = Node {
            name: b"b".to_vec(),
            ..Default::default()
        };
        let bytes_b = {
            let mut out = MAGIC.to_vec();
            put_varint(&mut out, 2);
            encode_node(&mut out, &a);
            a.name = b"a".to_vec();
            encode_node(&mut out, &a);
            out
        };
        assert_eq!(
            Tree::decode(&bytes_b).unwrap_err().reason,
            "node names not sorted and unique"
        );
        let mut out = MAGIC.to_vec();
        put_varint(&mut out, 1);
        a.name = b"..".to_vec();
        encode_node(&mut out, &a);
        assert_eq!(Tree::decode(&out).unwrap_err().reason, "invalid node name");
        assert!(!valid_name(b"a/b"));
        assert!(valid_name(&[0xff, 0xfe]));
    }
}
