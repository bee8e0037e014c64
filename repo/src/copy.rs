//! Copying snapshots into another repository (restic `copy`, borg `transfer`, a Proxmox
//! Backup Server sync job): one opened here ([`LocalTarget`]), or one another pbs
//! receives into over SSH (a [`CopyTarget`] of the pbs's).
//!
//! The target has its own keys and never needs the source's: every blob is opened
//! with the source's key and sealed again with the target's. Blob ids are the hashes of
//! their plaintext, so trees and chunks keep their ids (and deduplicate against what
//! the target already holds); a snapshot's id is the hash of its sealed file, so the
//! copy gets an id of its own and records the one it was copied from as `original`.
//!
//! Order and safety: a snapshot is copied in one session of the target, which
//! stores the blobs the target lacks (a subtree's before the tree that names it), then
//! writes the snapshot only after its commit check found every blob below its root
//! stored. A copy killed part way leaves stored blobs and no snapshot; run again, it
//! sends only what did not arrive (the target's index and the packs of the killed
//! session, which the next session indexes, tell what is there). A snapshot whose
//! copy is already in the target (same `original`, or the same time, host and tree)
//! is skipped.

use std::collections::HashSet;
use std::sync::Mutex;

use haul_protocol::tree::TreeBlob;
use haul_protocol::{BlobKind, BlobRef, SnapshotId, TreeId};

use crate::error::Result;
use crate::format::snapshot::Snapshot;
use crate::ingest::{DedupScope, IngestSession, ParentChoice, SessionInfo};
use crate::repository::IndexedRepository;

/// What copying one snapshot did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyReport {
    /// The copy's id in the target (the one already there when `skipped`).
    pub copy: Option<SnapshotId>,
    pub skipped: bool,
    /// Blobs the target lacked and got, and their bytes as read from the source
    /// (compressed, as stored).
    pub blobs_copied: u64,
    pub bytes_copied: u64,
    /// Blobs the snapshot uses that the target already had.
    pub blobs_present: u64,
    /// Bytes sent to the target's storage (sealed and compressed).
    pub bytes_stored: u64,
}

/// Where copies go: another repository opened here ([`LocalTarget`]), or another pbs
/// that receives them over SSH (`haul-pbs receive`).
pub trait CopyTarget {
    /// For each `(id, snapshot)` of the source, the target's copy of it, if it has one
    /// (see [`copy_in`]).
    fn copies_of(&self, snapshots: &[(SnapshotId, Snapshot)]) -> Result<Vec<Option<SnapshotId>>>;

    /// Starts a session that stores the copy of `snapshot`. `parent_original` is the
    /// original id of its parent: the target builds on its copy of it, if it has one.
    fn start(
        &self,
        snapshot: &Snapshot,
        parent_original: Option<SnapshotId>,
    ) -> Result<Box<dyn CopySession + '_>>;
}

/// One snapshot's copy on its way into the target.
pub trait CopySession: Sync {
    /// The refs of `refs` the target lacks.
    fn missing(&self, refs: &[BlobRef]) -> Result<Vec<BlobRef>>;
    /// Stores a blob given in its transfer encoding (verified against its id by the
    /// target); says whether it was taken as new.
    fn add(&self, kind: BlobKind, id: &[u8; 32], encoded: Vec<u8>) -> Result<bool>;
    /// Writes the copy once everything below its root is stored; its parent is the
    /// snapshot the session built on. Returns its id and the bytes the session added
    /// to the target's storage.
    fn commit(self: Box<Self>, copy: Snapshot) -> Result<(SnapshotId, u64)>;
    /// Ends the session without a snapshot; what it stored stays usable.
    fn abandon(self: Box<Self>);
}

/// The target's copy of `(id, snapshot)`, if it has one: recorded as copied from `id`,
/// or (a copy made before `original` existed, or the same backup imported twice) with
/// the same time, host, paths and root tree.
pub fn copy_in<'a>(
    target_snapshots: impl IntoIterator<Item = &'a (SnapshotId, Snapshot)>,
    id: &SnapshotId,
    snapshot: &Snapshot,
) -> Option<SnapshotId> {
    target_snapshots
        .into_iter()
        .find(|(_, t)| {
            t.original.as_ref() == Some(id)
                || (t.time == snapshot.time
                    && t.host == snapshot.host
                    && t.paths == snapshot.paths
                    && t.tree == snapshot.tree)
        })
        .map(|(tid, _)| *tid)
}

/// A repository opened here, as a copy's target. Everything it holds is a copy's to
/// build on: its owner is the one copying.
pub struct LocalTarget<'r> {
    repo: &'r IndexedRepository,
    /// Its snapshots, with the copies made since it was opened.
    snapshots: Mutex<Vec<(SnapshotId, Snapshot)>>,
}

impl<'r> LocalTarget<'r> {
    pub fn new(repo: &'r IndexedRepository) -> Result<LocalTarget<'r>> {
        Ok(LocalTarget {
            repo,
            snapshots: Mutex::new(repo.snapshots()?),
        })
    }
}

impl CopyTarget for LocalTarget<'_> {
    fn copies_of(&self, snapshots: &[(SnapshotId, Snapshot)]) -> Result<Vec<Option<SnapshotId>>> {
        let there = self.snapshots.lock().expect("snapshots");
        Ok(snapshots
            .iter()
            .map(|(id, s)| copy_in(there.iter(), id, s))
            .collect())
    }

    fn start(
        &self,
        snapshot: &Snapshot,
        parent_original: Option<SnapshotId>,
    ) -> Result<Box<dyn CopySession + '_>> {
        let parent = parent_original.and_then(|p| {
            self.snapshots
                .lock()
                .expect("snapshots")
                .iter()
                .find(|(_, t)| t.original == Some(p))
                .map(|(id, _)| *id)
        });
        let session = IngestSession::start(
            self.repo,
            SessionInfo {
                host: snapshot.host.clone(),
                paths: snapshot.paths.clone(),
                tags: snapshot.tags.clone(),
                source: snapshot.source,
                parent: parent.map_or(ParentChoice::None, ParentChoice::Snapshot),
                scope: DedupScope::Repository,
            },
        )?;
        Ok(Box::new(LocalSession {
            session,
            target: self,
        }))
    }
}

struct LocalSession<'t, 'r> {
    session: IngestSession<'r>,
    target: &'t LocalTarget<'r>,
}

impl CopySession for LocalSession<'_, '_> {
    fn missing(&self, refs: &[BlobRef]) -> Result<Vec<BlobRef>> {
        self.session.missing(refs)
    }

    fn add(&self, kind: BlobKind, id: &[u8; 32], encoded: Vec<u8>) -> Result<bool> {
        self.session.add_encoded(kind, id, encoded)
    }

    fn commit(self: Box<Self>, mut copy: Snapshot) -> Result<(SnapshotId, u64)> {
        copy.parent = self.session.parent().map(|(id, _)| *id);
        let ((id, copy), added) = self.session.commit_snapshot(copy)?;
        self.target
            .snapshots
            .lock()
            .expect("snapshots")
            .push((id, copy));
        Ok((id, added.bytes_stored))
    }

    fn abandon(self: Box<Self>) {
        if let Err(e) = self.session.abandon() {
            tracing::warn!("ending a copy's session: {e}");
        }
    }
}

/// Copies snapshot `id` of `source` into `target` (see the module doc).
/// `parent_original` is the original id of the snapshot's parent.
pub fn copy_snapshot(
    source: &IndexedRepository,
    target: &dyn CopyTarget,
    id: &SnapshotId,
    snapshot: &Snapshot,
    parent_original: Option<SnapshotId>,
) -> Result<CopyReport> {
    let session = target.start(snapshot, parent_original)?;
    let mut report = CopyReport::default();
    let mut walked: HashSet<TreeId> = HashSet::new();
    if let Err(e) = copy_tree(source, &*session, snapshot.tree, &mut walked, &mut report) {
        // What was stored stays usable by the next attempt.
        session.abandon();
        return Err(e);
    }
    let mut copy = snapshot.clone();
    copy.original = Some(snapshot.original.unwrap_or(*id));
    let (new_id, stored) = session.commit(copy)?;
    report.copy = Some(new_id);
    report.bytes_stored = stored;
    Ok(report)
}

/// Stores what the target lacks of tree `root` and everything below it. The trees are
/// walked with an explicit stack (a deep tree does not deepen the call stack) and the
/// blobs they name are copied in batches by [`THREADS`] threads: reading a blob and
/// storing it wait on storage (a round trip each on object storage, a pack's upload now
/// and then), so one at a time would leave the CPUs idle. The order blobs arrive in
/// does not matter: the commit checks that everything below the root is there, and a
/// copy run again after a kill looks at every blob again.
fn copy_tree(
    source: &IndexedRepository,
    session: &dyn CopySession,
    root: TreeId,
    walked: &mut HashSet<TreeId>,
    report: &mut CopyReport,
) -> Result<()> {
    let mut stack = vec![root];
    let mut batch: Vec<BlobRef> = Vec::new();
    while let Some(id) = stack.pop() {
        if !walked.insert(id) {
            continue;
        }
        batch.push(BlobRef::tree(id));
        match source.load_tree(&id)? {
            TreeBlob::Pages(p) => stack.extend(p.pages.iter().map(|p| p.id)),
            TreeBlob::Nodes(t) => {
                for node in &t.nodes {
                    batch.extend(node.content.iter().map(|c| BlobRef::data(*c)));
                    stack.extend(node.subtree);
                }
            }
        }
        if batch.len() >= BATCH {
            copy_blobs(source, session, &std::mem::take(&mut batch), report)?;
        }
    }
    copy_blobs(source, session, &batch, report)
}

/// Threads that copy blobs at once.
const THREADS: usize = 8;
/// Blobs looked up in the target at once.
const BATCH: usize = 4096;

/// Stores the blobs of `refs` the target lacks, read from the source in their
/// transfer encoding (compressed as stored: nothing is decompressed to be compressed
/// again) and verified against their ids as the target takes them.
fn copy_blobs(
    source: &IndexedRepository,
    session: &dyn CopySession,
    refs: &[BlobRef],
    report: &mut CopyReport,
) -> Result<()> {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
    if refs.is_empty() {
        return Ok(());
    }
    let missing = session.missing(refs)?;
    report.blobs_present += (refs.len() - missing.len()) as u64;
    let (next, blobs, bytes) = (AtomicUsize::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let copy_one = |b: &BlobRef| -> Result<()> {
        let encoded = source.load_encoded(b.kind, &b.id)?;
        let len = encoded.len() as u64;
        if session.add(b.kind, &b.id, encoded)? {
            blobs.fetch_add(1, Relaxed);
            bytes.fetch_add(len, Relaxed);
        }
        Ok(())
    };
    let work = || -> Result<()> {
        while let Some(b) = missing.get(next.fetch_add(1, Relaxed)) {
            if let Err(e) = copy_one(b) {
                // The others stop at their next blob.
                next.store(missing.len(), Relaxed);
                return Err(e);
            }
        }
        Ok(())
    };
    let threads = THREADS.min(missing.len().div_ceil(16));
    let result = std::thread::scope(|s| {
        let handles: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mut result = work();
        for h in handles {
            let r = h.join().expect("a copy thread panicked");
            if result.is_ok() {
                result = r;
            }
        }
        result
    });
    report.blobs_copied += blobs.load(Relaxed);
    report.bytes_copied += bytes.load(Relaxed);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_known_by_its_original_or_by_time_host_paths_and_tree() {
        let s = Snapshot {
            time: chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            host: "web-1".into(),
            paths: vec!["/srv".into()],
            tags: vec![],
            tree: TreeId([1; 32]),
            parent: None,
            source: crate::format::snapshot::SourceKind::Pull,
            summary: Default::default(),
            original: None,
        };
        let id = SnapshotId([9; 32]);
        let by_original = Snapshot {
            original: Some(id),
            tree: TreeId([2; 32]),
            ..s.clone()
        };
        assert_eq!(
            copy_in(&[(SnapshotId([3; 32]), by_original)], &id, &s),
            Some(SnapshotId([3; 32]))
        );
        assert_eq!(
            copy_in(&[(SnapshotId([4; 32]), s.clone())], &id, &s),
            Some(SnapshotId([4; 32]))
        );
        let other_host = Snapshot {
            host: "web-2".into(),
            ..s.clone()
        };
        assert_eq!(copy_in(&[(SnapshotId([5; 32]), other_host)], &id, &s), None);
    }
}
