//! The ingest session's guarantees, through the engine's API: claims are verified,
//! commits are complete, interrupted sessions lose nothing.

use haul_protocol::tree::{Node, NodeKind, Tree, TreeBlob};
use haul_protocol::{BlobKind, BlobRef, ChunkId, TreeId};
use haul_repo::backend::{Backend, FileType, LocalBackend};
use haul_repo::crypto::KdfParams;
use haul_repo::format::config::RepoConfig;
use haul_repo::format::snapshot::{SourceKind, Summary};
use haul_repo::ingest::{DedupScope, IngestSession, OwnPacks, ParentChoice, SessionInfo};
use haul_repo::{Error, IndexedRepository, Repository};
use haul_tests::random_bytes;
use std::sync::Arc;

const KDF: KdfParams = KdfParams {
    m_cost: 1024,
    t_cost: 1,
    p_cost: 1,
};

fn repo(dir: &std::path::Path) -> IndexedRepository {
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::create(&dir.join("repo")).unwrap());
    Repository::init(backend, b"pw", KDF, RepoConfig::new(3)).unwrap();
    reopen(dir)
}

fn reopen(dir: &std::path::Path) -> IndexedRepository {
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::open(&dir.join("repo")).unwrap());
    Repository::open(backend, b"pw")
        .unwrap()
        .load_index(Some(&dir.join("cache")))
        .unwrap()
}

/// Creates a repository and stores `n` random 1 MiB chunks in a session that ends
/// without a commit, as when the source disconnects; returns the chunks, their refs,
/// and the packs the session wrote (as the pbs keeps them for the host's next pull).
fn store_without_commit(
    dir: &std::path::Path,
    n: u64,
    seed: u64,
) -> (Vec<Vec<u8>>, Vec<BlobRef>, OwnPacks) {
    let chunks: Vec<Vec<u8>> = (0..n)
        .map(|i| random_bytes(seed + i, 1024 * 1024))
        .collect();
    let ids: Vec<BlobRef> = chunks
        .iter()
        .map(|c| BlobRef::data(ChunkId::of(c)))
        .collect();
    let repo = repo(dir);
    let own = OwnPacks::default();
    let mut s = IngestSession::start(&repo, info()).unwrap();
    s.share_own_packs(own.clone());
    for (c, id) in chunks.iter().zip(&ids) {
        assert!(s.add_plain(BlobKind::Data, &id.id, c.clone()).unwrap());
    }
    drop(s);
    assert!(repo.snapshots().unwrap().is_empty());
    (chunks, ids, own)
}

fn info() -> SessionInfo {
    SessionInfo {
        host: "h".into(),
        paths: vec!["/x".into()],
        tags: vec![],
        source: SourceKind::Pull,
        parent: ParentChoice::Latest,
        scope: Default::default(),
    }
}

fn zstd_encoded(plain: &[u8]) -> Vec<u8> {
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    haul_protocol::chunker::encode_blob(&mut c, plain.to_vec()).unwrap()
}

fn file_tree(chunks: &[ChunkId], size: u64) -> Tree {
    Tree {
        nodes: vec![Node {
            name: b"f".to_vec(),
            kind: NodeKind::File,
            size,
            content: chunks.to_vec(),
            ..Default::default()
        }],
    }
}

#[test]
fn a_chunk_with_a_wrong_claimed_id_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let s = IngestSession::start(&repo, info()).unwrap();
    let real = b"the real content".repeat(100);
    let garbage = b"garbage pretending to be the real content ".repeat(50);
    assert_eq!(
        *zstd_encoded(&garbage).last().unwrap(),
        haul_protocol::chunker::BLOB_ZSTD
    );
    let claimed = ChunkId::of(&real);
    // Compressed and raw encodings are both checked.
    let mut raw = garbage.clone();
    raw.push(haul_protocol::chunker::BLOB_RAW);
    for encoded in [zstd_encoded(&garbage), raw] {
        let err = s
            .add_encoded(BlobKind::Data, &claimed.0, encoded)
            .unwrap_err();
        match err {
            Error::IdMismatch {
                claimed: c, actual, ..
            } => {
                assert_eq!(c, claimed.to_hex());
                assert_eq!(actual, ChunkId::of(&garbage).to_hex());
            }
            other => panic!("expected IdMismatch, got {other}"),
        }
    }
    // The id is still missing: the lie did not poison deduplication.
    assert_eq!(
        s.missing(&[BlobRef::data(claimed)]).unwrap(),
        vec![BlobRef::data(claimed)]
    );
    // The honest upload is accepted and then known.
    assert!(s
        .add_encoded(BlobKind::Data, &claimed.0, zstd_encoded(&real))
        .unwrap());
    assert!(s.missing(&[BlobRef::data(claimed)]).unwrap().is_empty());
    // A tree that does not parse is refused even under its true hash.
    let junk = b"not a tree".to_vec();
    let err = s
        .add_encoded(
            BlobKind::Tree,
            blake3::hash(&junk).as_bytes(),
            zstd_encoded(&junk),
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    let (root, bytes) = file_tree(&[claimed], real.len() as u64).encode_with_id();
    s.add_encoded(BlobKind::Tree, &root.0, zstd_encoded(&bytes))
        .unwrap();
    s.commit(root, Summary::default()).unwrap();
    let repo = reopen(dir.path());
    assert_eq!(repo.load_chunk(&claimed).unwrap(), real);
}

#[test]
fn a_commit_referencing_a_missing_blob_writes_no_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let s = IngestSession::start(&repo, info()).unwrap();
    let present = b"present".to_vec();
    s.add_plain(BlobKind::Data, &ChunkId::of(&present).0, present.clone())
        .unwrap();
    let absent = ChunkId::of(b"never uploaded");
    let (root, bytes) = file_tree(&[ChunkId::of(&present), absent], 100).encode_with_id();
    s.add_plain(BlobKind::Tree, &root.0, bytes.clone()).unwrap();
    let err = s.commit(root, Summary::default()).unwrap_err();
    match &err {
        Error::MissingBlobs { count, first } => {
            assert_eq!(*count, 1);
            assert!(first.contains(&absent.to_hex()), "{first}");
        }
        other => panic!("expected MissingBlobs, got {other}"),
    }
    assert!(repo.backend().list(FileType::Snapshot).unwrap().is_empty());
    // A root tree that was never uploaded is refused too.
    let s = IngestSession::start(&repo, info()).unwrap();
    let (ghost, _) = Tree::default().encode_with_id();
    assert!(matches!(
        s.commit(ghost, Summary::default()),
        Err(Error::MissingBlobs { .. })
    ));
    assert!(repo.snapshots().unwrap().is_empty());
}

/// A tree with one directory `name` whose subtree is `sub` (none: a directory node
/// without its subtree).
fn dir_tree(name: &str, sub: Option<TreeId>) -> Tree {
    Tree {
        nodes: vec![Node {
            name: name.as_bytes().to_vec(),
            kind: NodeKind::Dir,
            mode: 0o755,
            subtree: sub,
            ..Default::default()
        }],
    }
}

#[test]
fn a_commit_checks_what_arrived_late_and_what_was_already_there() {
    // The commit looks at the trees of its session as they were noted on arrival, and
    // reads the others: each way, every chunk below the root must be stored.
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());

    // A chunk that arrives after the tree that refers to it: complete.
    let s = IngestSession::start(&repo, info()).unwrap();
    let late = b"uploaded after its tree".to_vec();
    let (leaf, leaf_bytes) = file_tree(&[ChunkId::of(&late)], late.len() as u64).encode_with_id();
    s.add_plain(BlobKind::Tree, &leaf.0, leaf_bytes).unwrap();
    let (root, root_bytes) = dir_tree("d", Some(leaf)).encode_with_id();
    s.add_plain(BlobKind::Tree, &root.0, root_bytes).unwrap();
    s.add_plain(BlobKind::Data, &ChunkId::of(&late).0, late.clone())
        .unwrap();
    s.commit(root, Summary::default()).unwrap();

    // A tree stored by an interrupted session, whose chunk never came: in the index,
    // yet incomplete. A later root that refers to it without sending it again is
    // refused, naming that chunk.
    let s = IngestSession::start(&repo, info()).unwrap();
    let lost = ChunkId::of(b"never stored");
    let (orphan, orphan_bytes) = file_tree(&[lost], 12).encode_with_id();
    s.add_plain(BlobKind::Tree, &orphan.0, orphan_bytes)
        .unwrap();
    s.abandon().unwrap();
    // A source that sees the whole repository finds it present ...
    let trusting = || SessionInfo {
        scope: DedupScope::Repository,
        ..info()
    };
    let s = IngestSession::start(&repo, trusting()).unwrap();
    assert!(s.missing(&[BlobRef::tree(orphan)]).unwrap().is_empty());
    let (root2, root2_bytes) = dir_tree("old", Some(orphan)).encode_with_id();
    s.add_plain(BlobKind::Tree, &root2.0, root2_bytes).unwrap();
    match s.commit(root2, Summary::default()).unwrap_err() {
        Error::MissingBlobs { count, first } => {
            assert_eq!(count, 1);
            assert!(first.contains(&lost.to_hex()), "{first}");
        }
        other => panic!("expected MissingBlobs, got {other}"),
    }
    // ... one that sees only its own history (the default) is told to send it, and
    // may not refer to it unsent.
    let s = IngestSession::start(&repo, info()).unwrap();
    assert_eq!(
        s.missing(&[BlobRef::tree(orphan)]).unwrap(),
        vec![BlobRef::tree(orphan)]
    );
    s.add_plain(
        BlobKind::Tree,
        &root2.0,
        dir_tree("old", Some(orphan)).encode(),
    )
    .unwrap();
    match s.commit(root2, Summary::default()).unwrap_err() {
        Error::MissingBlobs { count, first } => {
            assert_eq!(count, 1);
            assert!(first.contains(&orphan.to_hex()), "{first}");
        }
        other => panic!("expected MissingBlobs, got {other}"),
    }

    // A directory node without its subtree is refused, with the directory's name.
    let s = IngestSession::start(&repo, info()).unwrap();
    let (root3, root3_bytes) = dir_tree("hollow", None).encode_with_id();
    s.add_plain(BlobKind::Tree, &root3.0, root3_bytes).unwrap();
    match s.commit(root3, Summary::default()).unwrap_err() {
        Error::MissingBlobs { first, .. } => assert!(first.contains("hollow"), "{first}"),
        other => panic!("expected MissingBlobs, got {other}"),
    }
    // One snapshot: the complete one.
    assert_eq!(repo.snapshots().unwrap().len(), 1);
}

#[test]
fn an_interrupted_session_leaves_its_data_for_the_next() {
    let dir = tempfile::tempdir().unwrap();
    // 40 MiB: two packs are full and written, one is still open when the session ends.
    let (chunks, ids, own) = store_without_commit(dir.path(), 40, 100);
    let repo = reopen(dir.path());
    // A source that sees only its own history is not told of what another's
    // interrupted session stored ...
    let s = IngestSession::start(&repo, info()).unwrap();
    assert_eq!(
        s.missing(&ids).unwrap(),
        ids,
        "another source's blobs are not its own"
    );
    drop(s);
    // ... but its own interrupted session's blobs are known, as the pbs keeps them
    // (`share_own_packs`), the open pack included.
    let mut s = IngestSession::start(&repo, info()).unwrap();
    s.share_own_packs(own);
    assert!(
        s.missing(&ids).unwrap().is_empty(),
        "everything stored before the interruption is known"
    );
    for (c, id) in chunks.iter().zip(&ids) {
        assert!(
            !s.add_plain(BlobKind::Data, &id.id, c.clone()).unwrap(),
            "re-offered chunk was stored again"
        );
    }
    assert_eq!(
        s.stats()
            .bytes_stored
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let content: Vec<ChunkId> = ids.iter().map(|r| ChunkId(r.id)).collect();
    let (root, bytes) = file_tree(&content, 40 * 1024 * 1024).encode_with_id();
    s.add_plain(BlobKind::Tree, &root.0, bytes.clone()).unwrap();
    s.commit(root, Summary::default()).unwrap();
    for (c, id) in chunks.iter().zip(&ids).step_by(7) {
        assert_eq!(&repo.load_chunk(&ChunkId(id.id)).unwrap(), c);
    }
}

#[test]
fn append_only_backend_keeps_history() {
    use haul_repo::backend::AppendOnly;
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let s = IngestSession::start(&repo, info()).unwrap();
    let (root, bytes) = Tree::default().encode_with_id();
    s.add_plain(BlobKind::Tree, &root.0, bytes.clone()).unwrap();
    let (snap, _) = s.commit(root, Summary::default()).unwrap();
    let guarded = AppendOnly(LocalBackend::open(&dir.path().join("repo")).unwrap());
    let err = guarded
        .delete(FileType::Snapshot, &snap.to_hex())
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::AppendOnly {
                action: "delete",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "append-only repository refuses to delete snapshot {}",
            snap.to_hex()
        )
    );
    // The allowed path, adding, still works, and the snapshot is intact.
    guarded
        .write_once(FileType::Index, &"ab".repeat(32), b"x")
        .unwrap();
    assert_eq!(reopen_plain(dir.path()).snapshots().unwrap().len(), 1);
}

fn reopen_plain(dir: &std::path::Path) -> Repository {
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::open(&dir.join("repo")).unwrap());
    Repository::open(backend, b"pw").unwrap()
}

#[test]
fn a_source_reads_only_its_parent_trees() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    // Snapshot of host "other", holding a secret file.
    let other = SessionInfo {
        host: "other".into(),
        ..info()
    };
    let s = IngestSession::start(&repo, other).unwrap();
    let secret = b"another host's secret".to_vec();
    let secret_id = ChunkId::of(&secret);
    s.add_plain(BlobKind::Data, &secret_id.0, secret).unwrap();
    let (other_root, bytes) = file_tree(&[secret_id], 21).encode_with_id();
    s.add_plain(BlobKind::Tree, &other_root.0, bytes).unwrap();
    s.commit(other_root, Summary::default()).unwrap();

    // Host "h": first backup, then a second session whose parent is the first.
    let s = IngestSession::start(&repo, info()).unwrap();
    assert!(s.parent().is_none());
    let sub = Tree { nodes: vec![] };
    let (sub_id, sub_bytes) = sub.encode_with_id();
    s.add_plain(BlobKind::Tree, &sub_id.0, sub_bytes).unwrap();
    let root = Tree {
        nodes: vec![Node {
            name: b"d".to_vec(),
            kind: NodeKind::Dir,
            subtree: Some(sub_id),
            ..Default::default()
        }],
    };
    let (root_id, root_bytes) = root.encode_with_id();
    s.add_plain(BlobKind::Tree, &root_id.0, root_bytes).unwrap();
    s.commit(root_id, Summary::default()).unwrap();

    let s = IngestSession::start(&repo, info()).unwrap();
    assert_eq!(s.parent_tree(), Some(root_id));
    // Another host's tree is refused, by the exact rule.
    let err = s.read_tree(&other_root).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("append-only repository refuses to read tree {other_root}, which is not part of the parent snapshot")
    );
    // A subtree is readable only once its parent tree has been read.
    assert!(s.read_tree(&sub_id).is_err());
    assert_eq!(s.read_tree(&root_id).unwrap().subtrees(), vec![sub_id]);
    assert_eq!(
        s.read_tree(&sub_id).unwrap(),
        TreeBlob::Nodes(Tree::default())
    );
    // Committing the unchanged root again is complete at once.
    let (snap, _) = s.commit(root_id, Summary::default()).unwrap();
    assert_eq!(repo.load_snapshot(&snap).unwrap().tree, root_id);
}

#[test]
fn packs_a_killed_session_left_unindexed_are_used_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let (chunks, ids, _) = store_without_commit(dir.path(), 20, 200);
    // As if killed before its index was written: packs without an index file.
    let backend = LocalBackend::open(&dir.path().join("repo")).unwrap();
    for (name, _) in backend.list(FileType::Index).unwrap() {
        backend.delete(FileType::Index, &name).unwrap();
    }
    let repo = reopen(dir.path());
    assert_eq!(repo.index().len(), 0);
    // The packs' record was lost with the killed process: a source that trusts the
    // repository is the one that finds them.
    let s = IngestSession::start(
        &repo,
        SessionInfo {
            scope: DedupScope::Repository,
            ..info()
        },
    )
    .unwrap();
    assert!(
        s.missing(&ids).unwrap().is_empty(),
        "the orphan packs were indexed"
    );
    for (c, id) in chunks.iter().zip(&ids) {
        assert!(!s.add_plain(BlobKind::Data, &id.id, c.clone()).unwrap());
    }
    drop(s);
    // And they stay indexed for everyone after.
    assert_eq!(reopen(dir.path()).index().len(), 20);
}

/// A pull cut short after it had sent a directory's tree: the resumed pull is told the
/// tree is there, does not send it again, and its commit holds (the tree is read and
/// checked, as the source's own); to another source the same tree is missing.
#[test]
fn a_resumed_session_builds_on_the_trees_its_cut_session_sent() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let own = OwnPacks::default();
    let content = b"a file in a directory that did not change".to_vec();
    let chunk = ChunkId::of(&content);
    let (sub, sub_bytes) = file_tree(&[chunk], content.len() as u64).encode_with_id();
    {
        let mut s = IngestSession::start(&repo, info()).unwrap();
        s.share_own_packs(own.clone());
        s.add_plain(BlobKind::Data, &chunk.0, content.clone())
            .unwrap();
        s.add_plain(BlobKind::Tree, &sub.0, sub_bytes).unwrap();
        // Cut short: no commit.
    }
    let (root, root_bytes) = dir_tree("unchanged", Some(sub)).encode_with_id();
    // Another source may not build on it.
    let s = IngestSession::start(
        &repo,
        SessionInfo {
            host: "other".into(),
            ..info()
        },
    )
    .unwrap();
    assert_eq!(
        s.missing(&[BlobRef::tree(sub)]).unwrap(),
        vec![BlobRef::tree(sub)]
    );
    s.add_plain(BlobKind::Tree, &root.0, root_bytes.clone())
        .unwrap();
    assert!(matches!(
        s.commit(root, Summary::default()).unwrap_err(),
        Error::MissingBlobs { .. }
    ));
    // The resumed one does.
    let mut s = IngestSession::start(&repo, info()).unwrap();
    s.share_own_packs(own);
    assert!(s
        .missing(&[BlobRef::tree(sub), BlobRef::data(chunk)])
        .unwrap()
        .is_empty());
    s.add_plain(BlobKind::Tree, &root.0, root_bytes).unwrap();
    let (snap, _) = s.commit(root, Summary::default()).unwrap();
    assert_eq!(repo.load_snapshot(&snap).unwrap().tree, root);
}
