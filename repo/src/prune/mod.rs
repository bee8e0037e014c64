//! Prune: the space of forgotten snapshots comes back while pulls go on.
//!
//! # What a prune does
//!
//! 1. **Mark**: the snapshots are listed, *then* the index loaded, and every blob the
//!    snapshots reach is marked ([`crate::usage`]: a bit per blob). A snapshot is
//!    written only once all it uses is in index files, so the index holds what every
//!    listed snapshot uses, except blobs of packs an earlier, unswept prune condemned
//!    (or damage): a snapshot that reaches such a gap is not counted as walked.
//! 2. **Plan** ([`plan`]): packs holding only unused blobs are deleted; partly used
//!    ones are repacked, most wasteful first, until at most `max_unused` stays.
//! 3. **Repack**: the used blobs of those packs are copied into new packs (their
//!    sealed bytes, each opened first), and an index file for the new packs written.
//! 4. **Condemn**: every index file that lists a condemned pack (deleted or repacked)
//!    is replaced by one without it; a *condemnation record* (`condemned/`) lists the
//!    condemned packs with their blobs, the replaced index files and the snapshots
//!    the mark walked whole. Only then are the replaced index files deleted.
//! 5. **Sweep**, for every record in the repository: its replaced index files are
//!    deleted again (a prune may have stopped halfway), an *epoch marker* (`epochs/`)
//!    is written,
//!    the lock holders are listed, and once none of them runs any more, the snapshots
//!    that some record's mark did not walk are walked (listed before the index is
//!    loaded, as in 1), over the index, looking for what it lacks in the condemned
//!    packs, one record at a time. A condemned pack holding a blob one of them uses is
//!    **rescued** (indexed again); the others are deleted, then the records.
//!
//! # Why pulls never lose data to it (the lock and grace rules)
//!
//! A prune takes a *prune* lock, which only another prune or an exclusive lock
//! excludes: pulls, forgets, checks and restores go on. The danger is a session that
//! was told a blob exists (so its source did not send it) when the prune thought the
//! blob unused, because the snapshot that uses it was not committed yet when the mark
//! ran. Sessions answer from an index *view*: the index a process loaded, plus the
//! blobs it stored since. The rules:
//!
//! - **A view never learns a condemned pack after the condemnation took effect.** A
//!   pack is condemned by removing it from every index file; a record naming it is
//!   written before that, and a session's scan for packs in no index file (left by
//!   an interrupted backup) skips the packs of every record. So a view loaded after
//!   the epoch marker was written cannot know a condemned pack.
//! - **A view older than the newest epoch is never answered from.** A process records
//!   the epoch markers it saw before it listed the index files. A session (and a
//!   reader: restore, ls, check) writes its lock, *then* compares the markers (a reader
//!   loads its index only then); on a new one it loads the index again.
//! - **The sweep waits for every lock holder that existed after its epoch.** Holders
//!   keep one id across the refreshes of their lock. Any session that may answer from
//!   an older view wrote its lock before it looked at the markers, so either its lock
//!   is among those the sweep waits for, or it looked after the epoch and loaded a
//!   view without the condemned packs. Blobs a running session has been told exist
//!   therefore stay until that session ends, and the snapshot it commits is walked by
//!   the sweep, which rescues the packs it needs.
//! - **A session does not build on a snapshot that is not settled.** It trusts its
//!   parent's trees without looking below them; a parent committed after a pending
//!   record's mark (or forgotten as the session starts) may lead to condemned blobs, so
//!   the session then reads every file again instead.
//! - A lock not refreshed for 30 minutes, or of a process of this machine and PID
//!   namespace that no longer exists, is stale (see [`crate::lock`]) and not waited
//!   for. A holder whose own lock once went 25 minutes without being written stops
//!   before it commits a snapshot, writes an index file or a record, or deletes
//!   anything ([`LockGuard::ensure_fresh`]); what remains is the window of one write
//!   after that look (a process stalled for five minutes right there), as with any
//!   lease.
//! - If the holders are still there after `max_wait`, the prune ends without the
//!   sweep; the condemned packs stay (unindexed, never handed to a session) and the
//!   next prune sweeps them.
//!
//! # Crash safety
//!
//! Every step only adds before it removes, and the records say what is left to do:
//! killed while repacking, the new packs are unindexed copies (the next prune indexes
//! them first, and deletes them as unused copies); killed after the record, the next
//! prune deletes the replaced index files, writes an epoch, and sweeps; killed while
//! deleting packs, the next sweep deletes the rest (a pack already gone is no error).
//! `check` reports the packs in no index as reclaimable, not as damage.

mod plan;
mod records;

pub use plan::{plan, repack, MaxUnused, PruneOptions, PrunePlan, SMALL_SHARE};
pub use records::{Condemnations, Record};

use crate::backend::FileType;
use crate::error::{Error, Result};
use crate::format::condemned::{Condemnation, Header};
use crate::format::index_file::IndexedPack;
use crate::format::pack_header::PackEntry;
use crate::index::BlobLocation;
use crate::lock::{LockGuard, LockKind};
use crate::repository::{IndexedRepository, Repository};
use crate::usage::{mark, mark_each, Marks, Usage};
use haul_protocol::tree::TreeBlob;
use haul_protocol::{BlobKind, BlobRef, PackId, SnapshotId, TreeId};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// How a prune runs (what it decides is [`PruneOptions`]).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Decide and report, change nothing.
    pub dry_run: bool,
    /// How long the sweep waits for sessions that began before the condemnation.
    pub max_wait: Duration,
    /// How often it looks at the locks meanwhile.
    pub poll: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            dry_run: false,
            max_wait: Duration::from_secs(3600),
            poll: Duration::from_secs(2),
        }
    }
}

/// What a prune did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub snapshots: usize,
    /// The decision of this prune's mark.
    pub plan: PrunePlan,
    /// New packs written by the repack.
    pub packs_written: usize,
    /// Packs deleted by the sweeps (this prune's condemnation and earlier ones).
    pub packs_deleted: usize,
    /// Condemned packs indexed again because a snapshot committed meanwhile uses them.
    pub packs_rescued: usize,
    /// Condemned packs left for the next prune: sessions older than the condemnation
    /// were still running after the wait.
    pub packs_pending: usize,
    /// Bytes of the packs in storage, before and after.
    pub storage_before: u64,
    pub storage_after: u64,
}

impl PruneReport {
    pub fn storage_freed(&self) -> u64 {
        self.storage_before.saturating_sub(self.storage_after)
    }
}

/// The steps a debug build can pause at (`HAUL_PRUNE_PAUSE_AT=<step>`), so tests can
/// kill a prune there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Listed,
    Marked,
    Repacking,
    Repacked,
    Condemned,
    IndexDeleting,
    Epoch,
    Rescued,
    PackDeleting,
    Swept,
}

impl Step {
    pub const ALL: [Step; 10] = [
        Step::Listed,
        Step::Marked,
        Step::Repacking,
        Step::Repacked,
        Step::Condemned,
        Step::IndexDeleting,
        Step::Epoch,
        Step::Rescued,
        Step::PackDeleting,
        Step::Swept,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::Listed => "listed",
            Step::Marked => "marked",
            Step::Repacking => "repacking",
            Step::Repacked => "repacked",
            Step::Condemned => "condemned",
            Step::IndexDeleting => "index-deleting",
            Step::Epoch => "epoch",
            Step::Rescued => "rescued",
            Step::PackDeleting => "pack-deleting",
            Step::Swept => "swept",
        }
    }
}

/// In a debug build, stops at `step` when `HAUL_PRUNE_PAUSE_AT` names it, after
/// saying so on stderr: until the file `HAUL_PRUNE_RESUME` names exists, or for good
/// (the test then kills the process). Bounded: it goes on after ten minutes.
pub(crate) fn pause_at(step: Step) {
    if cfg!(debug_assertions)
        && std::env::var("HAUL_PRUNE_PAUSE_AT").is_ok_and(|s| s == step.name())
    {
        eprintln!("haul: prune paused at step {}", step.name());
        let resume = std::env::var_os("HAUL_PRUNE_RESUME").map(std::path::PathBuf::from);
        for _ in 0..6000 {
            if resume.as_ref().is_some_and(|f| f.exists()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Records are written with at most this many blobs each.
const RECORD_BLOBS: usize = 200_000;

/// Prunes `repo`, with its index cache in `cache` (see
/// [`Repository::load_index`]): see the module doc. Memory holds one index at a time:
/// the prune's, then the sweep's.
pub fn prune(
    repo: Repository,
    cache: Option<&Path>,
    opts: &PruneOptions,
    run: &RunOptions,
) -> Result<PruneReport> {
    if run.dry_run {
        return dry_run(repo, cache, opts);
    }
    let mut lock = repo.lock(LockKind::Prune, "prune")?;
    lock.refresh_in_background();
    let mut report = PruneReport {
        storage_before: storage_bytes(&repo)?,
        ..Default::default()
    };
    // Earlier condemnations first take effect, so the view loaded next holds none of
    // their packs (the sweep writes the epoch that tells other processes).
    let earlier = repo.condemnations()?;
    warn_damaged(&earlier);
    for r in &earlier.records {
        delete_all(&repo, FileType::Index, &r.header.superseded, None)?;
    }
    // The snapshots before the index: a snapshot is written only once everything it
    // uses is in index files (see `IngestSession::commit`), so the index loaded next
    // holds what every listed snapshot uses.
    let snapshots = repo.snapshots()?;
    report.snapshots = snapshots.len();
    pause_at(Step::Listed);
    let mut view = repo.load_index(cache)?;
    if let Some(d) = view.index().damaged().first() {
        return Err(Error::InvalidInput(format!(
            "index file {d} is damaged: run `haul-pbs repair index` before a prune"
        )));
    }
    // Packs in no index file (left by a killed backup or prune) are indexed, so the
    // mark decides about them too: a killed prune's copies go, as unused duplicates.
    lock.ensure_fresh("prune")?;
    let orphans = view.index_orphan_packs()?;
    if orphans > 0 {
        tracing::info!(packs = orphans, "indexed packs that no index file listed");
        let (base, cache) = view.unload();
        view = base.load_index(cache.as_deref())?;
    }
    let roots: Vec<TreeId> = snapshots.iter().map(|(_, s)| s.tree).collect();
    let (marks, complete) = mark_each(&view, &roots)?;
    drop(roots);
    // A snapshot using what the index lacks (blobs of packs an earlier prune
    // condemned, or damage) is walked again by the sweep, over the condemned packs.
    let marked: Vec<SnapshotId> = snapshots
        .iter()
        .zip(&complete)
        .filter(|(_, complete)| **complete)
        .map(|((id, _), _)| *id)
        .collect();
    if marked.len() < snapshots.len() {
        tracing::warn!(
            snapshots = snapshots.len() - marked.len(),
            "snapshots use blobs the index does not hold: the sweep looks for them in condemned packs (`haul-pbs check` names what is missing)"
        );
    }
    drop(snapshots);
    pause_at(Step::Marked);
    let usage = Usage::of(view.index(), &marks);
    report.plan = plan(
        &usage,
        &PruneOptions {
            pack_size: view.config().pack_size as u64,
            ..opts.clone()
        },
    );
    drop(usage);
    report.packs_written = repack(&view, &report.plan.repack, &marks)?.len();
    drop(marks);
    pause_at(Step::Repacked);
    let condemned: HashSet<PackId> = report
        .plan
        .delete
        .iter()
        .chain(&report.plan.repack)
        .copied()
        .collect();
    if !condemned.is_empty() {
        condemn(&view, &lock, &condemned, marked)?;
    }
    let (base, _) = view.unload();
    sweep(&base, cache, &lock, run, &mut report)?;
    report.storage_after = storage_bytes(&base)?;
    Ok(report)
}

fn dry_run(repo: Repository, cache: Option<&Path>, opts: &PruneOptions) -> Result<PruneReport> {
    let _lock = repo.lock_for_reading(true, "prune --dry-run")?;
    let snapshots = repo.snapshots()?;
    let repo = repo.load_index(cache)?;
    let marks = mark(&repo, snapshots.iter().map(|(_, s)| s.tree))?;
    let plan = plan(
        &Usage::of(repo.index(), &marks),
        &PruneOptions {
            pack_size: repo.config().pack_size as u64,
            ..opts.clone()
        },
    );
    let storage = storage_bytes(&repo)?;
    let pending = repo.condemnations()?.packs().len();
    Ok(PruneReport {
        dry_run: true,
        snapshots: snapshots.len(),
        storage_before: storage,
        storage_after: storage.saturating_sub(plan.bytes_freed()),
        packs_pending: pending,
        plan,
        ..Default::default()
    })
}

/// Bytes of every pack in storage.
fn storage_bytes(repo: &Repository) -> Result<u64> {
    Ok(repo
        .backend()
        .list(FileType::Data)?
        .iter()
        .map(|(_, size)| size)
        .sum())
}

fn warn_damaged(c: &Condemnations) {
    for d in &c.damaged {
        tracing::warn!("condemnation record {d} cannot be read: its packs are left as they are");
    }
}

/// Deletes the objects `names` of type `t` (those already gone are no error), pausing
/// at `step` after the first.
fn delete_all(repo: &Repository, t: FileType, names: &[String], step: Option<Step>) -> Result<()> {
    for (i, name) in names.iter().enumerate() {
        match repo.backend().delete(t, name) {
            Ok(()) | Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        if let (0, Some(step)) = (i, step) {
            pause_at(step);
        }
    }
    Ok(())
}

/// Step 4 of the module doc: replaces the index files that list a `condemned` pack,
/// records the condemnation, and deletes the replaced files.
fn condemn(
    repo: &IndexedRepository,
    lock: &LockGuard,
    condemned: &HashSet<PackId>,
    marked: Vec<SnapshotId>,
) -> Result<()> {
    // Each write of an index file or a record only while the lock holds: a prune
    // whose lock was lost could otherwise list again a pack another prune deleted.
    let mut records: Vec<Condemnation> = Vec::new();
    let mut current = Condemnation {
        header: Header {
            time: chrono::Utc::now(),
            superseded: Vec::new(),
            marked,
        },
        packs: Vec::new(),
    };
    let mut blobs = 0;
    let mut superseded = Vec::new();
    // One index file at a time: memory holds one file and the record being built.
    for (name, _) in repo.backend().list(FileType::Index)? {
        let packs = repo.read_index_file(&name)?;
        if !packs.iter().any(|p| condemned.contains(&p.pack)) {
            continue;
        }
        let (gone, kept): (Vec<IndexedPack>, Vec<IndexedPack>) =
            packs.into_iter().partition(|p| condemned.contains(&p.pack));
        if !kept.is_empty() {
            lock.ensure_fresh("prune")?;
            repo.write_index_file(&kept)?;
        }
        blobs += gone.iter().map(|p| p.blobs.len()).sum::<usize>();
        current.packs.extend(gone);
        current.header.superseded.push(name.clone());
        superseded.push(name);
        if blobs >= RECORD_BLOBS {
            let next = Condemnation {
                header: Header {
                    superseded: Vec::new(),
                    ..current.header.clone()
                },
                packs: Vec::new(),
            };
            records.push(std::mem::replace(&mut current, next));
            blobs = 0;
        }
    }
    if !current.packs.is_empty() {
        records.push(current);
    }
    // Every record before any deletion: a pack missing from the index files is
    // always named by a record (see the module doc).
    for r in &records {
        lock.ensure_fresh("prune")?;
        repo.write_condemnation(r)?;
    }
    pause_at(Step::Condemned);
    // The epoch follows in the sweep, once every record's files are gone.
    delete_all(
        repo,
        FileType::Index,
        &superseded,
        Some(Step::IndexDeleting),
    )
}

/// Step 5 of the module doc, for every record in the repository.
fn sweep(
    repo: &Repository,
    cache: Option<&std::path::Path>,
    lock: &LockGuard,
    run: &RunOptions,
    report: &mut PruneReport,
) -> Result<()> {
    let records = repo.condemnations()?;
    if records.records.is_empty() {
        return Ok(());
    }
    // Every record swept takes effect before the holders are listed, whoever wrote
    // it (a prune killed, or one whose lock was lost, may have stopped before its
    // epoch): its replaced index files gone, then an epoch.
    for r in &records.records {
        delete_all(repo, FileType::Index, &r.header.superseded, None)?;
    }
    repo.write_epoch()?;
    pause_at(Step::Epoch);
    lock.ensure_fresh("prune")?;
    let holders = repo.lock_holders(lock)?;
    if !holders.is_empty() {
        tracing::info!(
            sessions = holders.len(),
            "waiting for the sessions that began before the condemnation"
        );
    }
    let deadline = Instant::now() + run.max_wait;
    if !repo.wait_for_holders(lock, &holders, deadline, run.poll)? {
        report.packs_pending = records.packs().len();
        tracing::warn!(
            "sessions that began before the condemnation still run after {:?}: {} condemned pack(s) are left for the next prune",
            run.max_wait,
            report.packs_pending
        );
        return Ok(());
    }
    // Snapshots some record's mark did not walk: committed since, by sessions that
    // may have been told about condemned blobs. Listed before the index is loaded
    // (as in the mark), so the index holds what they use outside condemned packs.
    let walked: HashSet<SnapshotId> = records
        .records
        .iter()
        .map(|r| r.header.marked.iter().copied().collect::<HashSet<_>>())
        .reduce(|a, b| a.intersection(&b).copied().collect())
        .unwrap_or_default();
    let roots: Vec<TreeId> = repo
        .snapshots()?
        .into_iter()
        .filter(|(id, _)| !walked.contains(id))
        .map(|(_, s)| s.tree)
        .collect();
    // A pack a killed sweep already deleted is not looked in.
    let present: HashSet<PackId> = repo
        .backend()
        .list(FileType::Data)?
        .into_iter()
        .filter_map(|(name, _)| name.parse().ok())
        .collect();
    let view = repo.clone().load_index(cache)?;
    let rescued = rescue(&view, &records, &present, roots)?;
    if !rescued.is_empty() {
        tracing::info!(
            packs = rescued.len(),
            "condemned packs rescued: a snapshot committed during the prune uses them"
        );
        lock.ensure_fresh("prune")?;
        view.write_index_file(&rescued)?;
    }
    report.packs_rescued = rescued.len();
    pause_at(Step::Rescued);
    // Listed by an index file (rescued, or indexed again by hand): kept.
    let mut kept: HashSet<PackId> = view.index().table_packs().iter().copied().collect();
    kept.extend(rescued.iter().map(|p| p.pack));
    drop(view);
    let doomed: Vec<String> = records
        .packs()
        .iter()
        .filter(|p| !kept.contains(p))
        .map(|p| p.to_hex())
        .collect();
    lock.ensure_fresh("prune")?;
    delete_all(repo, FileType::Data, &doomed, Some(Step::PackDeleting))?;
    report.packs_deleted = doomed.len();
    pause_at(Step::Swept);
    let names: Vec<String> = records.records.iter().map(|r| r.name.clone()).collect();
    delete_all(repo, FileType::Condemned, &names, None)
}

/// Blobs the sweep is looking for in the condemned packs, at most this many at once.
const SEARCH_BATCH: usize = 1 << 20;

/// Walks the trees from `roots` over the index of `view`; what it does not hold is
/// looked for in the condemned packs of `records` (read one record at a time), and
/// the packs it is found in are returned, with their blobs, to be indexed again. Memory:
/// a bit per indexed blob, and the blobs found in no index file (at most
/// [`SEARCH_BATCH`] at a time), never the records' blobs.
fn rescue(
    view: &IndexedRepository,
    records: &Condemnations,
    present: &HashSet<PackId>,
    roots: Vec<TreeId>,
) -> Result<Vec<IndexedPack>> {
    let index = view.index();
    let mut visited = Marks::new(index.table_len());
    let mut visited_elsewhere: HashSet<TreeId> = HashSet::new();
    let mut wanted: HashSet<BlobRef> = HashSet::new();
    let mut rescued: BTreeMap<PackId, Vec<PackEntry>> = BTreeMap::new();
    let mut stack = roots;
    let visit = |tree: &TreeBlob, stack: &mut Vec<TreeId>, wanted: &mut HashSet<BlobRef>| {
        stack.extend(tree.subtrees());
        for c in tree.chunks() {
            if index.slot(BlobKind::Data, &c.0)?.is_none() {
                wanted.insert(BlobRef::data(*c));
            }
        }
        Ok::<(), Error>(())
    };
    loop {
        while let Some(id) = stack.pop() {
            match index.slot(BlobKind::Tree, &id.0)? {
                Some(slot) => {
                    if visited.set(slot) {
                        visit(&view.load_tree(&id)?, &mut stack, &mut wanted)?;
                    }
                }
                None => {
                    if visited_elsewhere.insert(id) {
                        wanted.insert(BlobRef::tree(id));
                    }
                }
            }
            if wanted.len() >= SEARCH_BATCH {
                break;
            }
        }
        if wanted.is_empty() {
            if stack.is_empty() {
                break;
            }
            continue;
        }
        // One pass over the records: the packs that hold what is searched for are
        // rescued, and the trees found are walked on (what they need is searched for
        // in the next pass).
        let mut searching = std::mem::take(&mut wanted);
        for r in &records.records {
            let c = view.read_condemnation(&r.name)?;
            for p in c.packs.into_iter().filter(|p| present.contains(&p.pack)) {
                let mut needed = false;
                for e in &p.blobs {
                    let b = BlobRef {
                        kind: e.kind,
                        id: e.id,
                    };
                    if !searching.remove(&b) {
                        continue;
                    }
                    needed = true;
                    if e.kind == BlobKind::Tree {
                        let loc = BlobLocation {
                            pack: p.pack,
                            offset: e.offset,
                            length: e.length,
                            raw_length: e.raw_length,
                        };
                        let bytes = view.load_blob_at(BlobKind::Tree, &e.id, &loc)?;
                        let tree = TreeBlob::decode(&bytes).map_err(|d| {
                            Error::corrupt(format!("tree {}", TreeId(e.id).short()), d)
                        })?;
                        visit(&tree, &mut stack, &mut wanted)?;
                    }
                }
                if needed || rescued.contains_key(&p.pack) {
                    let entries = rescued.entry(p.pack).or_default();
                    entries.extend(p.blobs);
                    entries.sort_by_key(|e| (e.offset, e.kind.code(), e.id));
                    entries.dedup();
                }
            }
        }
        // What no index file and no condemned pack holds is not this sweep's to find:
        // `check` reports it.
        for b in searching {
            tracing::warn!(
                "{} blob {} of a snapshot committed during the prune is in no pack",
                b.kind,
                hex::encode(&b.id[..8])
            );
        }
    }
    Ok(rescued
        .into_iter()
        .map(|(pack, blobs)| IndexedPack { pack, blobs })
        .collect())
}

impl IndexedRepository {
    /// The packs an index file lists.
    pub(crate) fn read_index_file(&self, name: &str) -> Result<Vec<IndexedPack>> {
        crate::index::read_index_file(self.backend().as_ref(), self.data_key(), name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{check, CheckOptions};
    use crate::format::snapshot::Summary;
    use crate::ingest::{IngestSession, ParentChoice, SessionInfo};
    use crate::usage::tests::{backup, memory_repo, reopen};
    use haul_protocol::tree::{Node, NodeKind, Tree};
    use haul_protocol::{BlobKind, BlobRef, ChunkId};

    fn content(seed: u8, len: usize) -> Vec<u8> {
        let mut x = seed as u32 + 1;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (x >> 16) as u8
            })
            .collect()
    }

    /// A prune with the default options by a new process (its own repository handle).
    fn prune_as_new_process(
        backend: &std::sync::Arc<dyn crate::backend::Backend>,
        run: &RunOptions,
    ) -> PruneReport {
        let repo = Repository::open(backend.clone(), b"pw").unwrap();
        prune(repo, None, &PruneOptions::default(), run).unwrap()
    }

    fn quick() -> RunOptions {
        RunOptions {
            dry_run: false,
            max_wait: Duration::from_millis(200),
            poll: Duration::from_millis(20),
        }
    }

    fn clean(repo: &IndexedRepository) -> crate::check::CheckReport {
        let fresh = reopen(repo.backend().clone());
        let report = check(
            &fresh,
            &CheckOptions {
                read_data: true,
                ..Default::default()
            },
            &|_, _| {},
        )
        .unwrap();
        assert!(report.ok(), "{:?}", report.errors);
        report
    }

    #[test]
    fn forgotten_data_goes_and_what_stays_reads_back() {
        let (backend, repo) = memory_repo();
        let shared = content(0, 30_000);
        let ids: Vec<_> = (1..=4u8)
            .map(|n| backup(&repo, &[&shared, &content(n, 200_000)]))
            .collect();
        repo.forget(&ids[..3]).unwrap();
        drop(repo);
        let repo = reopen(backend.clone());
        // A dry run decides the same and changes nothing.
        let dry = prune_as_new_process(
            &backend,
            &RunOptions {
                dry_run: true,
                ..quick()
            },
        );
        assert!(dry.plan.bytes_freed() > 3 * 190_000, "{dry:#?}");
        assert_eq!(dry.storage_before, storage_bytes(&repo).unwrap());
        let report = prune_as_new_process(&backend, &quick());
        assert_eq!(report.plan, dry.plan);
        assert_eq!(report.packs_pending, 0);
        assert_eq!(report.packs_rescued, 0);
        assert!(report.packs_deleted > 0);
        assert!(report.storage_freed() > 3 * 190_000, "{report:#?}");
        assert!(report.storage_after < report.storage_before / 2);
        assert!(repo.condemnations().unwrap().records.is_empty());
        assert_eq!(repo.epochs().unwrap().len(), 1);
        let after = clean(&repo);
        assert_eq!(after.snapshots, 1);
        assert_eq!(after.unused.blobs, 0, "{:?}", after.unused);
        // The kept snapshot reads back whole, from a new process.
        let fresh = reopen(repo.backend().clone());
        let (_, snap) = fresh.snapshots().unwrap().pop().unwrap();
        let root = fresh
            .load_tree(&snap.tree)
            .unwrap()
            .as_nodes()
            .cloned()
            .unwrap();
        let dir = fresh
            .load_tree(&root.nodes[0].subtree.unwrap())
            .unwrap()
            .as_nodes()
            .cloned()
            .unwrap();
        assert_eq!(fresh.load_chunk(&dir.nodes[0].content[0]).unwrap(), shared);
        assert_eq!(
            fresh.load_chunk(&dir.nodes[1].content[0]).unwrap(),
            content(4, 200_000)
        );
        // A second prune finds nothing to do.
        let again = prune_as_new_process(&backend, &quick());
        assert_eq!((again.packs_deleted, again.plan.repack.len()), (0, 0));
    }

    /// A session that read its parent's trees (so its source sends nothing of the
    /// parent's content) while the parent is forgotten and pruned.
    #[test]
    fn a_session_older_than_the_condemnation_commits_and_its_blobs_are_rescued() {
        let (backend, repo) = memory_repo();
        let old = content(1, 150_000);
        let parent = backup(&repo, &[&old]);
        drop(repo);
        let view = reopen(backend.clone());
        let info = SessionInfo {
            parent: ParentChoice::Snapshot(parent),
            ..SessionInfo::for_tests()
        };
        let session = IngestSession::start(&view, info).unwrap();
        // The source learns the parent's tree, and that the chunk need not be sent.
        let root = session
            .read_tree(&session.parent_tree().unwrap())
            .unwrap()
            .as_nodes()
            .cloned()
            .unwrap();
        let dir = session
            .read_tree(&root.nodes[0].subtree.unwrap())
            .unwrap()
            .as_nodes()
            .cloned()
            .unwrap();
        let x = dir.nodes[0].content[0];
        assert!(session.missing(&[BlobRef::data(x)]).unwrap().is_empty());
        // Meanwhile the parent is forgotten and a prune condemns its packs; the sweep
        // cannot run while the session does.
        let other = reopen(backend.clone());
        other.forget(&[parent]).unwrap();
        let first = prune_as_new_process(&backend, &quick());
        assert!(first.plan.delete.len() >= 2, "{first:#?}");
        assert_eq!(first.packs_deleted, 0);
        assert_eq!(first.packs_pending, first.plan.delete.len());
        // A session started now on the old view loads the index again: it is told
        // to send the chunk, even where the whole repository is its to build on.
        let everything = SessionInfo {
            scope: crate::ingest::DedupScope::Repository,
            ..SessionInfo::for_tests()
        };
        let late = IngestSession::start(&view, everything).unwrap();
        assert_eq!(
            late.missing(&[BlobRef::data(x)]).unwrap(),
            [BlobRef::data(x)]
        );
        drop(late);
        // The old session commits a snapshot that uses the condemned chunk.
        let (dir2, bytes) = Tree {
            nodes: vec![Node {
                name: b"kept".to_vec(),
                kind: NodeKind::File,
                size: old.len() as u64,
                content: vec![x],
                ..Default::default()
            }],
        }
        .encode_with_id();
        session.add_plain(BlobKind::Tree, &dir2.0, bytes).unwrap();
        // Beside the new directory, the parent's own, as it was: a tree that is only in
        // a condemned pack, whose chunk the sweep finds in a second pass.
        let (root2, bytes) = Tree {
            nodes: vec![
                Node {
                    name: b"d".to_vec(),
                    kind: NodeKind::Dir,
                    subtree: Some(dir2),
                    ..Default::default()
                },
                Node {
                    name: b"old".to_vec(),
                    kind: NodeKind::Dir,
                    subtree: root.nodes[0].subtree,
                    ..Default::default()
                },
            ],
        }
        .encode_with_id();
        session.add_plain(BlobKind::Tree, &root2.0, bytes).unwrap();
        let (kept, _) = session.commit(root2, Summary::default()).unwrap();
        // Until a sweep has walked it, the new snapshot is no parent to build on: its
        // trees may lead to condemned blobs.
        let child = |view: &IndexedRepository| {
            let info = SessionInfo {
                parent: ParentChoice::Snapshot(kept),
                ..SessionInfo::for_tests()
            };
            IngestSession::start(view, info).unwrap().parent().is_some()
        };
        assert!(!child(&reopen(backend.clone())));
        // The next prune sweeps: the chunk's pack is rescued, the rest deleted.
        let second = prune_as_new_process(&backend, &quick());
        assert_eq!(second.packs_pending, 0);
        // Both packs of the parent's session: its trees and its data.
        assert_eq!(second.packs_rescued, 2, "{second:#?}");
        assert_eq!(second.packs_deleted, 0, "{second:#?}");
        let report = clean(&other);
        assert_eq!(report.snapshots, 1);
        let fresh = reopen(backend);
        assert_eq!(fresh.load_chunk(&ChunkId(x.0)).unwrap(), old);
        let old_dir = fresh
            .load_tree(&root.nodes[0].subtree.unwrap())
            .unwrap()
            .as_nodes()
            .cloned()
            .unwrap();
        assert_eq!(old_dir.nodes[0].content, [x]);
        assert_eq!(fresh.snapshots().unwrap()[0].0, kept);
        assert!(child(&fresh));
    }

    #[test]
    fn a_sweep_waits_for_a_session_that_began_before_the_condemnation() {
        let (backend, repo) = memory_repo();
        let gone = backup(&repo, &[&content(3, 100_000)]);
        repo.forget(&[gone]).unwrap();
        let session = IngestSession::start(&repo, SessionInfo::for_tests()).unwrap();
        let pruner = {
            let backend = backend.clone();
            std::thread::spawn(move || {
                let run = RunOptions {
                    max_wait: Duration::from_secs(30),
                    ..quick()
                };
                prune_as_new_process(&backend, &run)
            })
        };
        // Until the session ends, the condemned packs stay.
        let deadline = Instant::now() + Duration::from_secs(20);
        while repo.condemnations().unwrap().records.is_empty() {
            assert!(Instant::now() < deadline, "no condemnation");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        let packs = backend.list(FileType::Data).unwrap().len();
        assert!(packs >= 2);
        assert!(!pruner.is_finished());
        drop(session);
        let report = pruner.join().unwrap();
        assert_eq!(report.packs_deleted, packs);
        assert_eq!(backend.list(FileType::Data).unwrap().len(), 0);
        clean(&repo);
    }
}
