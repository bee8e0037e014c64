//! Which stored blobs the snapshots still use: the mark phase a prune needs, and the
//! unused share `check` reports.
//!
//! Memory stays flat: one bit per blob of the loaded index ([`Marks`], by the index's
//! slots) and one [`PackUsage`] (48 bytes) per pack, however many snapshots, trees or
//! files there are. A tree's bit also says it was read, so a tree shared by many
//! snapshots is read once and no set of visited trees is kept.
//!
//! A blob stored twice (two sessions raced to store it) has one slot marked, the copy
//! the index finds; the other copy counts as unused, which it is.

use crate::error::Result;
use crate::index::Index;
use crate::repository::IndexedRepository;
use haul_protocol::{BlobKind, PackId, TreeId};

/// A bit per blob of the loaded index, by its slot (or, in an ingest session, by its
/// [`Index::locate`] position, which may lie past the table: the bits grow to it).
#[derive(Debug, Default, Clone)]
pub struct Marks {
    bits: Vec<u64>,
}

impl Marks {
    pub fn new(blobs: usize) -> Marks {
        Marks {
            bits: vec![0; blobs.div_ceil(64)],
        }
    }

    /// Marks `slot`; `true` if it was not marked before.
    pub fn set(&mut self, slot: usize) -> bool {
        let (word, bit) = (slot / 64, 1u64 << (slot % 64));
        if word >= self.bits.len() {
            // Past the table: blobs added since it was loaded. Grow by half at least,
            // so a session adding millions of blobs reallocates a few dozen times.
            let len = (word + 1).max(self.bits.len() + self.bits.len() / 2);
            self.bits.resize(len, 0);
        }
        let new = self.bits[word] & bit == 0;
        self.bits[word] |= bit;
        new
    }

    pub fn get(&self, slot: usize) -> bool {
        self.bits
            .get(slot / 64)
            .is_some_and(|w| w & (1u64 << (slot % 64)) != 0)
    }

    /// Bytes this takes.
    pub fn bytes(&self) -> usize {
        self.bits.capacity() * 8
    }
}

/// What one pack holds that the snapshots use, and what they do not.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PackUsage {
    pub pack: PackId,
    pub used_blobs: u32,
    pub unused_blobs: u32,
    /// Stored (compressed, sealed) bytes of its blobs.
    pub used_bytes: u64,
    pub unused_bytes: u64,
}

/// How much of the indexed data the snapshots use, pack by pack.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub packs: Vec<PackUsage>,
}

impl Usage {
    /// Counts, pack by pack, the blobs of the loaded `index` that `marks` marks.
    pub fn of(index: &Index, marks: &Marks) -> Usage {
        let mut packs: Vec<PackUsage> = index
            .table_packs()
            .iter()
            .map(|p| PackUsage {
                pack: *p,
                used_blobs: 0,
                unused_blobs: 0,
                used_bytes: 0,
                unused_bytes: 0,
            })
            .collect();
        for slot in 0..index.table_len() {
            let (pack, length, _) = index.slot_entry(slot);
            let p = &mut packs[pack as usize];
            if marks.get(slot) {
                p.used_blobs += 1;
                p.used_bytes += length as u64;
            } else {
                p.unused_blobs += 1;
                p.unused_bytes += length as u64;
            }
        }
        // A pack the table names but holds no blob of keeps its place: each of its
        // blobs has a copy in another pack, the one the index finds, so it holds
        // nothing the snapshots need, and a prune deletes it.
        Usage { packs }
    }

    pub fn used_bytes(&self) -> u64 {
        self.packs.iter().map(|p| p.used_bytes).sum()
    }

    pub fn unused_bytes(&self) -> u64 {
        self.packs.iter().map(|p| p.unused_bytes).sum()
    }

    pub fn unused_blobs(&self) -> u64 {
        self.packs.iter().map(|p| p.unused_blobs as u64).sum()
    }

    /// Packs that hold only unused blobs (a prune deletes them whole).
    pub fn packs_unused(&self) -> usize {
        self.packs.iter().filter(|p| p.used_blobs == 0).count()
    }

    /// Packs that hold both (a prune repacks those worth it).
    pub fn packs_partly_used(&self) -> usize {
        self.packs
            .iter()
            .filter(|p| p.used_blobs > 0 && p.unused_blobs > 0)
            .count()
    }
}

/// Marks everything the repository's snapshots reach.
pub fn mark_snapshots(repo: &IndexedRepository) -> Result<Marks> {
    let roots: Vec<TreeId> = repo.snapshots()?.into_iter().map(|(_, s)| s.tree).collect();
    mark(repo, roots)
}

/// Marks every tree and chunk reachable from `roots` (trees and chunks the index does
/// not hold are skipped: finding them is `check`'s work).
pub fn mark(repo: &IndexedRepository, roots: impl IntoIterator<Item = TreeId>) -> Result<Marks> {
    let roots: Vec<TreeId> = roots.into_iter().collect();
    Ok(mark_each(repo, &roots)?.0)
}

/// [`mark`] root by root, and for each root whether the index holds everything below
/// it. A bit per blob more says which trees lead to something the index lacks, so a
/// tree met again is judged as it was the first time without being read again.
pub fn mark_each(repo: &IndexedRepository, roots: &[TreeId]) -> Result<(Marks, Vec<bool>)> {
    enum Frame {
        Enter(TreeId),
        /// After the subtrees: whether this tree is complete.
        Exit {
            slot: usize,
            subtrees: Vec<TreeId>,
            chunk_missing: bool,
        },
    }
    let index = repo.index();
    let mut marks = Marks::new(index.table_len());
    let mut incomplete = Marks::new(index.table_len());
    let mut complete = Vec::with_capacity(roots.len());
    for root in roots {
        let mut stack = vec![Frame::Enter(*root)];
        while let Some(frame) = stack.pop() {
            match frame {
                Frame::Enter(id) => {
                    // A tree the index lacks makes its parent incomplete (below).
                    let Some(slot) = index.slot(BlobKind::Tree, &id.0)? else {
                        continue;
                    };
                    if !marks.set(slot) {
                        continue;
                    }
                    let tree = repo.load_tree(&id)?;
                    let mut chunk_missing = false;
                    for c in tree.chunks() {
                        match index.slot(BlobKind::Data, &c.0)? {
                            Some(slot) => {
                                marks.set(slot);
                            }
                            None => chunk_missing = true,
                        }
                    }
                    let subtrees: Vec<TreeId> = tree.subtrees();
                    stack.push(Frame::Exit {
                        slot,
                        subtrees: subtrees.clone(),
                        chunk_missing,
                    });
                    stack.extend(subtrees.into_iter().map(Frame::Enter));
                }
                Frame::Exit {
                    slot,
                    subtrees,
                    chunk_missing,
                } => {
                    let mut bad = chunk_missing;
                    for t in &subtrees {
                        if bad {
                            break;
                        }
                        bad = index
                            .slot(BlobKind::Tree, &t.0)?
                            .is_none_or(|s| incomplete.get(s));
                    }
                    if bad {
                        incomplete.set(slot);
                    }
                }
            }
        }
        complete.push(
            index
                .slot(BlobKind::Tree, &root.0)?
                .is_some_and(|s| !incomplete.get(s)),
        );
    }
    Ok((marks, complete))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::{Backend, MemoryBackend};
    use crate::crypto::KdfParams;
    use crate::format::config::RepoConfig;
    use crate::format::snapshot::Summary;
    use crate::ingest::{IngestSession, SessionInfo};
    use crate::Repository;
    use haul_protocol::tree::{Node, NodeKind, Tree};
    use haul_protocol::ChunkId;
    use std::sync::Arc;

    /// A snapshot of a directory `d` holding one file per content (the same `d` tree
    /// for equal contents: shared trees are read once).
    pub(crate) fn backup(
        repo: &IndexedRepository,
        contents: &[&[u8]],
    ) -> haul_protocol::SnapshotId {
        let session = IngestSession::start(repo, SessionInfo::for_tests()).unwrap();
        let mut nodes = Vec::new();
        for (i, content) in contents.iter().enumerate() {
            let chunk = ChunkId::of(content);
            session
                .add_plain(BlobKind::Data, &chunk.0, content.to_vec())
                .unwrap();
            nodes.push(Node {
                name: format!("f{i}").into_bytes(),
                kind: NodeKind::File,
                size: content.len() as u64,
                content: vec![chunk],
                ..Default::default()
            });
        }
        let (dir, bytes) = Tree { nodes }.encode_with_id();
        session.add_plain(BlobKind::Tree, &dir.0, bytes).unwrap();
        let (root, bytes) = Tree {
            nodes: vec![Node {
                name: b"d".to_vec(),
                kind: NodeKind::Dir,
                subtree: Some(dir),
                ..Default::default()
            }],
        }
        .encode_with_id();
        session.add_plain(BlobKind::Tree, &root.0, bytes).unwrap();
        session.commit(root, Summary::default()).unwrap().0
    }

    /// A new repository in memory, and its backend (to open it again as a new process
    /// would, with [`reopen`]).
    pub(crate) fn memory_repo() -> (Arc<dyn Backend>, IndexedRepository) {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::default());
        let repo = Repository::init(backend.clone(), b"pw", KdfParams::TESTS, RepoConfig::new(3))
            .unwrap()
            .load_index(None)
            .unwrap();
        (backend, repo)
    }

    /// The repository of `backend` as a new process sees it: the index as stored.
    pub(crate) fn reopen(backend: Arc<dyn Backend>) -> IndexedRepository {
        Repository::open(backend, b"pw")
            .unwrap()
            .load_index(None)
            .unwrap()
    }

    #[test]
    fn a_root_is_complete_only_when_everything_below_it_is_indexed() {
        let (backend, repo) = memory_repo();
        let shared = vec![5u8; 30_000];
        let a = backup(&repo, &[&shared, b"a"]);
        let b = backup(&repo, &[&shared, b"b"]);
        drop(repo);
        // Drop the index file that lists `b`'s own data pack: its chunk is missing.
        let repo = reopen(backend.clone());
        let snaps = repo.snapshots().unwrap();
        let roots: Vec<TreeId> = snaps.iter().map(|(_, s)| s.tree).collect();
        let (_, complete) = mark_each(&repo, &roots).unwrap();
        assert_eq!(complete, [true, true]);
        let chunk_b = ChunkId::of(b"b");
        let pack = repo
            .index()
            .get(BlobKind::Data, &chunk_b.0)
            .unwrap()
            .unwrap()
            .pack;
        for (name, _) in backend.list(crate::backend::FileType::Index).unwrap() {
            let listed = repo.read_index_file(&name).unwrap();
            if listed.iter().any(|p| p.pack == pack) {
                backend
                    .delete(crate::backend::FileType::Index, &name)
                    .unwrap();
            }
        }
        let repo = reopen(backend);
        assert!(repo
            .index()
            .get(BlobKind::Data, &chunk_b.0)
            .unwrap()
            .is_none());
        let by_id = |id| snaps.iter().position(|(s, _)| *s == id).unwrap();
        let (_, complete) = mark_each(&repo, &roots).unwrap();
        assert!(complete[by_id(a)], "a lacks nothing");
        assert!(!complete[by_id(b)], "b's chunk is in no index file");
        // In the other order, the shared directory tree is judged the same way.
        let reversed: Vec<TreeId> = roots.iter().rev().copied().collect();
        let (_, complete) = mark_each(&repo, &reversed).unwrap();
        assert!(complete[1 - by_id(a)] && !complete[1 - by_id(b)]);
    }

    #[test]
    fn what_only_forgotten_snapshots_held_is_unused() {
        let (backend, repo) = memory_repo();
        let shared = vec![7u8; 50_000];
        let gone: Vec<u8> = (0..80_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let first = backup(&repo, &[&shared, &gone]);
        let second = backup(&repo, &[&shared, b"new"]);
        backup(&repo, &[&shared, b"new"]);
        repo.forget(&[first]).unwrap();
        drop(repo);
        let repo = reopen(backend);
        let marks = mark_snapshots(&repo).unwrap();
        let usage = Usage::of(repo.index(), &marks);
        // Unused: the forgotten file's chunk and the first snapshot's two trees.
        assert_eq!(usage.unused_blobs(), 3, "{usage:#?}");
        let gone_stored = repo
            .index()
            .get(BlobKind::Data, &ChunkId::of(&gone).0)
            .unwrap()
            .unwrap()
            .length as u64;
        assert!(usage.unused_bytes() > gone_stored, "{usage:#?}");
        assert!(usage.used_bytes() > 0);
        // Each session wrote its own packs: the first one's data pack is shared with
        // nothing later, but holds the shared chunk too: partly used.
        assert!(usage.packs_partly_used() >= 1, "{usage:#?}");
        assert!(marks.bytes() <= 8 * repo.index().table_len().div_ceil(64));
        // Forgetting the rest leaves nothing used.
        let rest: Vec<_> = repo
            .snapshots()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert!(rest.contains(&second));
        repo.forget(&rest).unwrap();
        let usage = Usage::of(repo.index(), &mark(&repo, []).unwrap());
        assert_eq!(usage.used_bytes(), 0);
        assert_eq!(usage.packs_unused(), usage.packs.len());
    }
}
