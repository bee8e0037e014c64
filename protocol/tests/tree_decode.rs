//! The stable counterpart of the `tree_decode` fuzz target (docs/fuzzing.md): random
//! and corrupted tree encodings are refused or decoded to a tree that encodes back to
//! the same bytes, never a panic.

use haul_protocol::tree::{valid_name, Node, NodeKind, Timestamp, Tree};
use haul_protocol::{ChunkId, TreeId};
use proptest::prelude::*;

const KINDS: [NodeKind; 7] = [
    NodeKind::File,
    NodeKind::Dir,
    NodeKind::Symlink,
    NodeKind::Fifo,
    NodeKind::Socket,
    NodeKind::CharDevice,
    NodeKind::BlockDevice,
];

fn arb_node() -> impl Strategy<Value = Node> {
    (
        proptest::collection::vec(any::<u8>(), 1..8).prop_filter("valid name", |n| valid_name(n)),
        proptest::sample::select(&KINDS[..]),
        any::<(u32, u32, u64, i64, u32)>(),
        proptest::collection::vec(any::<u8>(), 0..6),
        proptest::collection::btree_map(
            proptest::collection::vec(any::<u8>(), 1..4),
            proptest::collection::vec(any::<u8>(), 0..4),
            0..3,
        ),
        proptest::collection::vec(any::<[u8; 32]>(), 0..3),
        proptest::option::of(any::<[u8; 32]>()),
    )
        .prop_map(
            |(name, kind, (mode, uid, size, sec, nsec), target, xattrs, content, subtree)| Node {
                name,
                kind,
                mode,
                uid,
                size,
                mtime: Timestamp {
                    sec,
                    nsec: nsec % 1_000_000_000,
                },
                target,
                xattrs: xattrs.into_iter().collect(),
                content: content.into_iter().map(ChunkId).collect(),
                subtree: subtree.map(TreeId),
                ..Node::default()
            },
        )
}

fn arb_encoding() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(arb_node(), 0..4).prop_map(|nodes| {
        let mut tree = Tree { nodes };
        tree.sort();
        tree.nodes.dedup_by(|a, b| a.name == b.name);
        tree.encode()
    })
}

proptest! {
    #[test]
    fn hostile_tree_encodings_are_refused_or_canonical(
        bytes in haul_mutate::inputs(arb_encoding(), 300),
    ) {
        if let Ok(tree) = Tree::decode(&bytes) {
            prop_assert_eq!(tree.encode(), bytes);
        }
    }
}
