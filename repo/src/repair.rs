//! `repair`: makes a repository with damaged index or snapshot files whole again, as
//! restic's `repair index` and `repair snapshots` do (issue 14).
//!
//! - [`repair_index`] indexes every pack that no readable index file lists (those of a
//!   damaged index file, and those an interrupted backup left) from the pack's own
//!   header into one new index file, and only then moves the damaged index files aside.
//!   Readable index files are left as they are: an entry whose pack is missing stays,
//!   so `check` keeps naming the files that pack held.
//! - [`repair_snapshots`] moves every snapshot file that cannot be read aside.
//!
//! Nothing is destroyed: a file moved aside keeps its bytes in the backend's place for
//! damaged objects (`damaged/index/`, `damaged/snapshots/` in a local repository), for
//! an operator to inspect or delete. With `dry_run` nothing is written or moved.
//! Callers hold an exclusive lock: the repair must not race a backup's own indexing.

use crate::backend::FileType;
use crate::error::{DamagedFile, Result};
use crate::repository::{IndexedRepository, Repository};
use haul_protocol::PackId;

/// What [`repair_index`] did (or, in a dry run, would do).
#[derive(Debug, Default, serde::Serialize)]
pub struct IndexRepair {
    /// Index files that do not verify, moved aside (each with where it went).
    pub damaged: Vec<Moved>,
    /// Packs indexed from their headers: (pack, number of blobs).
    pub packs_indexed: Vec<(PackId, usize)>,
    /// Packs in no index whose header cannot be read: left as they are, their blobs
    /// stay unknown (`check --read-data` tells which files they held, if any).
    pub unreadable_packs: Vec<(PackId, String)>,
    /// The new index file, if one was written.
    pub index_written: Option<String>,
}

/// A damaged file, and where it was moved (`None` in a dry run).
#[derive(Debug, serde::Serialize)]
pub struct Moved {
    #[serde(flatten)]
    pub file: DamagedFile,
    pub moved_to: Option<String>,
}

/// Indexes the packs no readable index file lists and moves damaged index files
/// aside (see the module doc).
pub fn repair_index(repo: &IndexedRepository, dry_run: bool) -> Result<IndexRepair> {
    let scan = repo.unindexed_packs()?;
    let mut report = IndexRepair {
        packs_indexed: scan.packs.iter().map(|p| (p.pack, p.blobs.len())).collect(),
        unreadable_packs: scan
            .unreadable
            .iter()
            .map(|(id, e)| (*id, e.to_string()))
            .collect(),
        ..Default::default()
    };
    // The new index first: at every moment each readable pack is listed somewhere.
    if !dry_run && !scan.packs.is_empty() {
        report.index_written = Some(repo.write_index_file(&scan.packs)?);
    }
    report.damaged = move_aside(repo, FileType::Index, repo.index().damaged(), dry_run)?;
    Ok(report)
}

/// Moves every snapshot file that cannot be read aside; returns them.
pub fn repair_snapshots(repo: &Repository, dry_run: bool) -> Result<Vec<Moved>> {
    let list = repo.read_snapshots()?;
    move_aside(repo, FileType::Snapshot, &list.damaged, dry_run)
}

fn move_aside(
    repo: &Repository,
    t: FileType,
    damaged: &[DamagedFile],
    dry_run: bool,
) -> Result<Vec<Moved>> {
    let mut out = Vec::new();
    for d in damaged {
        let moved_to = if dry_run {
            None
        } else {
            Some(repo.backend().move_aside(t, &d.name)?)
        };
        out.push(Moved {
            file: d.clone(),
            moved_to,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, MemoryBackend};
    use crate::crypto::KdfParams;
    use crate::format::config::RepoConfig;
    use crate::format::snapshot::Summary;
    use crate::ingest::{IngestSession, SessionInfo};
    use haul_protocol::tree::{Node, NodeKind, Tree};
    use haul_protocol::{BlobKind, ChunkId};
    use std::sync::Arc;

    /// A snapshot of one file holding `content`.
    fn backup(repo: &IndexedRepository, content: &[u8]) -> haul_protocol::SnapshotId {
        let session = IngestSession::start(repo, SessionInfo::for_tests()).unwrap();
        let chunk = ChunkId::of(content);
        session
            .add_plain(BlobKind::Data, &chunk.0, content.to_vec())
            .unwrap();
        let tree = Tree {
            nodes: vec![Node {
                name: b"f".to_vec(),
                kind: NodeKind::File,
                size: content.len() as u64,
                content: vec![chunk],
                ..Default::default()
            }],
        };
        let (root, bytes) = tree.encode_with_id();
        session.add_plain(BlobKind::Tree, &root.0, bytes).unwrap();
        session.commit(root, Summary::default()).unwrap().0
    }

    fn names(b: &dyn Backend, t: FileType) -> Vec<String> {
        let mut v: Vec<String> = b.list(t).unwrap().into_iter().map(|(n, _)| n).collect();
        v.sort();
        v
    }

    #[test]
    fn damaged_index_and_snapshot_files_are_skipped_then_repaired() {
        let memory = Arc::new(MemoryBackend::default());
        let backend: Arc<dyn Backend> = memory.clone();
        let repo = Repository::init(backend.clone(), b"pw", KdfParams::TESTS, RepoConfig::new(3))
            .unwrap()
            .load_index(None)
            .unwrap();
        let first = backup(&repo, b"first");
        let index_before = names(backend.as_ref(), FileType::Index);
        let second = backup(&repo, b"second");
        let third = backup(&repo, b"third");
        drop(repo);
        // Truncate the index file of the second backup; damage the third snapshot.
        let index = names(backend.as_ref(), FileType::Index);
        let victim = index
            .iter()
            .find(|n| !index_before.contains(n))
            .unwrap()
            .clone();
        let replace = |t: FileType, name: &str, f: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = backend.read(t, name).unwrap();
            f(&mut bytes);
            backend.delete(t, name).unwrap();
            backend.write_once(t, name, &bytes).unwrap();
        };
        replace(FileType::Index, &victim, &|b| b.truncate(b.len() / 2));
        replace(FileType::Snapshot, &third.to_hex(), &|b| b[3] ^= 0x40);

        let repo = Repository::open(backend.clone(), b"pw")
            .unwrap()
            .load_index(None)
            .unwrap();
        assert_eq!(repo.index().damaged().len(), 1);
        assert_eq!(repo.index().damaged()[0].name, victim);
        // The other snapshots are listed, and every blob is found.
        let list = repo.read_snapshots().unwrap();
        let ids: Vec<_> = list.snapshots.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.contains(&first) && ids.contains(&second));
        assert_eq!(list.damaged.len(), 1);
        assert_eq!(list.damaged[0].name, third.to_hex());
        for id in [first, second] {
            let snap = repo.load_snapshot(&id).unwrap();
            repo.load_tree(&snap.tree).unwrap();
        }
        assert_eq!(repo.load_chunk(&ChunkId::of(b"second")).unwrap(), b"second");
        // Named, the damaged snapshot says what is wrong and what to do.
        let err = repo.find_snapshot(&third.to_hex()[..8]).unwrap_err();
        assert!(
            err.to_string().contains("`haul-pbs repair snapshots`"),
            "{err}"
        );
        // Reading wrote nothing.
        assert_eq!(names(backend.as_ref(), FileType::Index), index);

        // A dry run changes nothing.
        let dry = repair_index(&repo, true).unwrap();
        assert_eq!(dry.damaged.len(), 1);
        assert!(dry.damaged[0].moved_to.is_none());
        assert_eq!(dry.packs_indexed.len(), 2, "the data and the tree pack");
        assert_eq!(names(backend.as_ref(), FileType::Index), index);
        assert_eq!(repair_snapshots(&repo, true).unwrap().len(), 1);
        assert_eq!(backend.list(FileType::Snapshot).unwrap().len(), 3);

        let done = repair_index(&repo, false).unwrap();
        let written = done.index_written.clone().unwrap();
        let moved = repair_snapshots(&repo, false).unwrap();
        assert!(moved[0].moved_to.is_some());
        let mut expected: Vec<String> = index.iter().filter(|n| **n != victim).cloned().collect();
        expected.push(written);
        expected.sort();
        assert_eq!(names(backend.as_ref(), FileType::Index), expected);
        let aside: Vec<(FileType, String)> = memory
            .moved_aside()
            .into_iter()
            .map(|(t, n, _)| (t, n))
            .collect();
        assert_eq!(
            aside,
            vec![
                (FileType::Index, victim),
                (FileType::Snapshot, third.to_hex())
            ]
        );

        // Whole again.
        let repo = Repository::open(backend.clone(), b"pw")
            .unwrap()
            .load_index(None)
            .unwrap();
        assert!(repo.index().damaged().is_empty());
        assert!(repo.read_snapshots().unwrap().damaged.is_empty());
        assert_eq!(repo.load_chunk(&ChunkId::of(b"second")).unwrap(), b"second");
        assert!(repair_index(&repo, false).unwrap().index_written.is_none());
    }
}
