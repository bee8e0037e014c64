//! Ingest sessions: how new data enters a repository.
//!
//! A session is the in-process form of the ingest protocol (the HTTP server is a thin
//! adapter over it): [`IngestSession::start`] picks the parent snapshot and hands out
//! the chunker parameters; the source reads parent trees, asks which blobs are missing,
//! and adds blobs under claimed ids; [`IngestSession::commit`] writes the snapshot.
//!
//! Guarantees:
//! - Every blob is checked before it is stored: decoded, and hashed against the id it
//!   is offered under. A mismatch is refused ([`Error::IdMismatch`]), so a hostile
//!   source cannot poison deduplication.
//! - A snapshot is written only after every tree and chunk it references has been found
//!   in the repository ([`Error::MissingBlobs`] otherwise, and nothing is written).
//! - Packs are indexed as they are written (every few packs and at the end), so an
//!   abandoned or failed session leaves its data usable: the next session finds those
//!   blobs present and does not upload them again.
//! - A source sees only its own history ([`DedupScope::OwnHistory`], the default):
//!   `missing` calls a blob present only if the parent snapshot references it (as the
//!   source learns by reading the parent's trees) or this session received it, and a
//!   commit may reference nothing else ([`Error::MissingBlobs`], as for a blob nobody
//!   stored: the two are not told apart). A host sharing a
//!   repository with others can neither learn whether they store some content nor
//!   borrow their trees to read them; what it sends is still stored once.

use crate::backend::{Backend, FileType, ObjectWriter};
use crate::crypto;
use crate::error::{Error, Result};
use crate::format::ad;
use crate::format::index_file::IndexedPack;
use crate::format::pack_header::{self, PackEntry};
use crate::format::snapshot::{Snapshot, SourceKind, Summary};
use crate::index::BlobLocation;
use crate::lock::LockGuard;
use crate::repository::{IndexedRepository, MAX_TREE_BYTES};
use crate::usage::Marks;
use haul_protocol::chunker::{decode_blob_ref, encode_blob, ChunkerParams};
use haul_protocol::tree::{is_pages, NodeKind, Pages, Tree, TreeBlob, VisitError};
use haul_protocol::walk::{Sink, SinkError};
use haul_protocol::{BlobKind, BlobRef, ChunkId, PackId, SnapshotId, TreeId};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Which snapshot a new one is compared against.
#[derive(Debug, Clone)]
pub enum ParentChoice {
    /// The newest snapshot of the same host and paths, if any.
    Latest,
    /// This one.
    Snapshot(SnapshotId),
    /// None: read every file.
    None,
}

/// Packs a source's sessions wrote, shared with whoever keeps them between sessions.
pub type OwnPacks = std::sync::Arc<Mutex<HashSet<PackId>>>;

/// Which stored blobs a session's source may build on without sending them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DedupScope {
    /// What its parent snapshot references and what it sent in this session (as in
    /// Proxmox Backup Server, where a client reuses only its previous snapshot's
    /// chunks). Content another host stored is sent again over the wire (verified, and
    /// stored once).
    #[default]
    OwnHistory,
    /// Anything in the repository: for hosts that trust each other, whose common
    /// content then crosses the wire once. A host learns whether the repository holds
    /// any content it can name, and can commit trees that other hosts wrote.
    Repository,
}

/// What a committed session added to the repository.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Added {
    pub blobs: u64,
    /// Sealed and compressed, its last packs included.
    pub bytes_stored: u64,
}

/// What identifies the snapshot a session will write.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub host: String,
    pub paths: Vec<String>,
    pub tags: Vec<String>,
    pub source: SourceKind,
    pub parent: ParentChoice,
    pub scope: DedupScope,
}

/// Bytes the trees noted for `commit` may hold (see [`Received::bytes`]): past it,
/// further trees are read again at commit, however many directories a host has or
/// however much a hostile source sends.
const MAX_RECEIVED_BYTES: usize = 32 << 20;

/// A commit stops looking after this many missing blobs: the refusal says how many it
/// found and names the first.
const MAX_MISSING_REPORTED: usize = 100_000;

/// Write the index after this many packs, or this long after the last index write,
/// whichever comes first, so an interrupted session loses little.
const INDEX_EVERY_PACKS: usize = 8;
/// ... or once the packs not indexed yet hold this many blobs; and a pack holds at most
/// this many. 16 MiB of small files would be a hundred thousand blobs, and their
/// entries (48 bytes each, and as much again while the pack header or the index file
/// is written) must not add up to hundreds of MiB over eight packs.
const INDEX_EVERY_BLOBS: usize = 1 << 16;
const INDEX_EVERY: Duration = Duration::from_secs(60);

/// A pack being written: sealed blobs go straight into a new backend object and are
/// hashed on the way (a pack's name is the BLAKE3 of its bytes), so a 16 MiB pack
/// costs a 1 MiB write buffer, not 16 MiB of memory.
pub(crate) struct Packer {
    kind: BlobKind,
    out: Option<(BufWriter<Box<dyn ObjectWriter>>, blake3::Hasher)>,
    pub(crate) len: u64,
    pub(crate) entries: Vec<PackEntry>,
}

impl Packer {
    pub(crate) fn kind(&self) -> BlobKind {
        self.kind
    }

    pub(crate) fn new(kind: BlobKind) -> Self {
        Packer {
            kind,
            out: None,
            len: 0,
            entries: Vec::new(),
        }
    }

    /// Appends bytes to the pack; returns their offset.
    pub(crate) fn append(&mut self, backend: &dyn Backend, bytes: &[u8]) -> Result<u32> {
        if self.out.is_none() {
            let writer = backend.writer(FileType::Data)?;
            self.out = Some((
                BufWriter::with_capacity(1 << 20, writer),
                blake3::Hasher::new(),
            ));
        }
        let (w, h) = self.out.as_mut().expect("just opened");
        w.write_all(bytes)
            .map_err(Error::io("pack being written"))?;
        h.update(bytes);
        let offset = self.len;
        self.len += bytes.len() as u64;
        Ok(offset as u32)
    }

    /// Seals the header (the entries), appends it and its length, and makes the pack
    /// durable under its name. `None` for a pack nothing was appended to.
    pub(crate) fn finish(
        &mut self,
        key: &crypto::Key,
        backend: &dyn Backend,
    ) -> Result<Option<PackId>> {
        let Some((id, writer)) = self.seal(key, backend)? else {
            return Ok(None);
        };
        store_pack(id, writer).map(|()| Some(id))
    }

    /// Seals the header, appends it and its length, and hands back the pack's name and
    /// its writer, for [`store_pack`]. `None` for a pack nothing was appended to.
    fn seal(
        &mut self,
        key: &crypto::Key,
        backend: &dyn Backend,
    ) -> Result<Option<(PackId, Box<dyn ObjectWriter>)>> {
        if self.entries.is_empty() {
            return Ok(None);
        }
        let header = key.seal(ad::PACK_HEADER, &pack_header::encode(&self.entries));
        self.append(backend, &header)?;
        self.append(backend, &(header.len() as u32).to_le_bytes())?;
        let (writer, hasher) = self.out.take().expect("a pack with entries is open");
        let id = PackId(*hasher.finalize().as_bytes());
        let writer = writer
            .into_inner()
            .map_err(|e| Error::io(format!("pack {}", id.short()))(e.into_error()))?;
        Ok(Some((id, writer)))
    }
}

/// Makes a sealed pack durable under its name.
fn store_pack(id: PackId, writer: Box<dyn ObjectWriter>) -> Result<()> {
    match writer.finish(&id.to_hex()) {
        // The same bytes under the same name: already stored.
        Ok(()) | Err(Error::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Packs at most in upload at once by a session on a remote backend.
const UPLOADS_IN_FLIGHT: usize = 4;

/// A session's packs being stored in the background, where storing one takes a
/// remote store's round trips and time (object storage): the threads that fill packs
/// go on meanwhile. A pack's blobs stay in flight (present to `missing`, not yet
/// readable or indexed) until its upload is done and the session takes the result
/// ([`IngestSession::reap`]); `flush` waits for every upload, so an index file and a
/// snapshot are written only after the packs they name.
struct Uploads {
    jobs: Mutex<Option<std::sync::mpsc::Sender<Upload>>>,
    state: Mutex<UploadState>,
    changed: std::sync::Condvar,
}

/// A sealed pack to store: its name, its writer, and its entries.
type Upload = (PackId, Box<dyn ObjectWriter>, Packer);

#[derive(Default)]
struct UploadState {
    /// Handed over and not done yet.
    running: usize,
    done: Vec<(PackId, Packer, Result<()>)>,
}

impl Uploads {
    /// Starts the upload threads; `None` if no thread could be started (packs are then
    /// stored by the threads that fill them).
    fn start() -> Option<std::sync::Arc<Uploads>> {
        let (tx, rx) = std::sync::mpsc::channel::<Upload>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        let uploads = std::sync::Arc::new(Uploads {
            jobs: Mutex::new(Some(tx)),
            state: Mutex::default(),
            changed: std::sync::Condvar::new(),
        });
        let mut started = 0;
        for _ in 0..UPLOADS_IN_FLIGHT {
            let (rx, me) = (rx.clone(), std::sync::Arc::downgrade(&uploads));
            let spawned = std::thread::Builder::new()
                .name("haul-pack-upload".into())
                .spawn(move || loop {
                    let job = rx.lock().expect("upload queue").recv();
                    let Ok((id, writer, packer)) = job else {
                        return;
                    };
                    // A panic is an upload that failed: `flush` must not wait for it.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        store_pack(id, writer)
                    }))
                    .unwrap_or_else(|_| {
                        Err(Error::Io {
                            what: format!("pack {}", id.short()),
                            source: std::io::Error::other("its upload failed unexpectedly"),
                        })
                    });
                    let Some(me) = me.upgrade() else { return };
                    let mut st = me.state.lock().expect("uploads");
                    st.running -= 1;
                    st.done.push((id, packer, result));
                    me.changed.notify_all();
                });
            started += spawned.is_ok() as usize;
        }
        (started > 0).then_some(uploads)
    }

    /// Hands a sealed pack to the upload threads, once fewer than
    /// [`UPLOADS_IN_FLIGHT`] are under way.
    fn push(&self, id: PackId, writer: Box<dyn ObjectWriter>, packer: Packer) {
        let mut st = self.state.lock().expect("uploads");
        while st.running >= UPLOADS_IN_FLIGHT {
            st = self.changed.wait(st).expect("uploads");
        }
        st.running += 1;
        drop(st);
        self.jobs
            .lock()
            .expect("upload queue")
            .as_ref()
            .expect("open until the session ends")
            .send((id, writer, packer))
            .expect("the upload threads end only when the queue is closed");
    }

    /// The uploads done since the last call; with `all`, after waiting for every one.
    fn take(&self, all: bool) -> Vec<(PackId, Packer, Result<()>)> {
        let mut st = self.state.lock().expect("uploads");
        while all && st.running > 0 {
            st = self.changed.wait(st).expect("uploads");
        }
        std::mem::take(&mut st.done)
    }
}

impl Drop for Uploads {
    fn drop(&mut self) {
        // The threads end once the queue is closed.
        self.jobs.lock().expect("upload queue").take();
    }
}

struct State {
    data: Packer,
    tree: Packer,
    unindexed: Vec<IndexedPack>,
    last_index: Instant,
}

/// What the source of an own-history session sent that was new to it.
#[derive(Debug, Default)]
struct SourceView {
    blobs: AtomicU64,
    plain: AtomicU64,
    /// What storing those would take (the encoded bytes and the seal).
    sealed: AtomicU64,
}

impl SourceView {
    fn add(&self, plain: usize, encoded: usize) {
        self.blobs.fetch_add(1, Relaxed);
        self.plain.fetch_add(plain as u64, Relaxed);
        self.sealed
            .fetch_add((encoded + crypto::OVERHEAD) as u64, Relaxed);
    }
}

/// The figures a source is told at its commit (see [`IngestSession::source_figures`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SourceFigures {
    pub blobs_new: u64,
    pub bytes_new: u64,
    pub bytes_stored: u64,
}

/// Counters of what a session added.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub blobs_new: AtomicU64,
    /// Plaintext bytes of new blobs.
    pub bytes_new: AtomicU64,
    /// Plaintext bytes of new chunks (file content; trees excluded).
    pub data_new: AtomicU64,
    /// Bytes added to packs (compressed and sealed).
    pub bytes_stored: AtomicU64,
}

pub struct IngestSession<'r> {
    repo: RepoRef<'r>,
    info: SessionInfo,
    parent: Option<(SnapshotId, Snapshot)>,
    /// What of the parent snapshot the source may read and build on, a bit per blob by
    /// its index position ([`crate::index::Index::locate`]): the parent's root, the
    /// subtrees of every tree read so far (known to be complete: the parent was checked
    /// when it was committed, so `commit` need not descend into them), and, in the
    /// own-history scope, their chunks.
    parent_blobs: Mutex<Marks>,
    /// Blobs the source sent in this session (verified), stored by this session or
    /// before it: its own, wherever the index points for them (another session of this
    /// process may store the same bytes first, or after it and be the place the index
    /// names). Its own packs' blobs are also its own by `packs_written`.
    sent: Mutex<Marks>,
    /// What the source is told it added: blobs new *to it* (see [`SourceView`]).
    source_view: SourceView,
    /// The packs this session wrote, and those its caller says earlier sessions of
    /// the same source wrote and never committed (see [`IngestSession::share_own_packs`]).
    packs_written: OwnPacks,
    /// The trees added in this session, each with what `commit` still has to check
    /// below it (see [`Received`]).
    received: Mutex<ReceivedTrees>,
    /// What `received` may hold, in bytes ([`MAX_RECEIVED_BYTES`]).
    received_budget: usize,
    /// Why a pack of this session could not be written, if one could not: blobs sealed
    /// into it were taken as stored, so nothing may be committed.
    pack_lost: Mutex<Option<String>>,
    state: Mutex<State>,
    /// Blobs sealed into an open pack or being sealed, or in a pack being uploaded:
    /// present, not yet readable.
    in_flight: Mutex<HashSet<BlobRef>>,
    /// Where the backend is remote: the packs being uploaded.
    uploads: Option<std::sync::Arc<Uploads>>,
    stats: IngestStats,
    started: Instant,
    finished: bool,
    /// A shared lock: a session only adds, but nothing may delete under it.
    _lock: LockGuard,
}

/// A tree as it was added: decoded once to verify it, and looked at then, so `commit`
/// need not read, decrypt and decode it again. Its chunks that the source could build
/// on then stay so: nothing is removed under the session's lock, what a source may see
/// only grows, and a chunk still being packed is written before the commit or the
/// commit is refused (`pack_lost`). Only the others are kept (a well-behaved source
/// sends a file's chunks before its tree, so few), with its subtrees, which `commit`
/// walks as it walks any tree. Past [`MAX_RECEIVED_BYTES`] of these notes, further
/// trees are not noted, and `commit` reads them again as it reads trees it did not
/// receive.
#[derive(Debug, Default)]
struct Received {
    subtrees: Vec<TreeId>,
    /// Chunks to check at commit, each with the index of its node's name in `names`.
    chunks_to_check: Vec<(ChunkId, u32)>,
    /// Names of the nodes in `chunks_to_check`, once each.
    names: Vec<Vec<u8>>,
    /// Names of directory nodes that have no subtree.
    dirs_without_subtree: Vec<Vec<u8>>,
}

/// The trees noted for the commit, and the bytes they hold.
#[derive(Debug, Default)]
struct ReceivedTrees {
    trees: HashMap<TreeId, Received>,
    bytes: usize,
}

impl Received {
    /// What this takes in memory, with its place in the map, about.
    fn bytes(&self) -> usize {
        let names: usize = self.names.iter().map(|n| n.len() + 24).sum();
        let dirs: usize = self.dirs_without_subtree.iter().map(|n| n.len() + 24).sum();
        160 + self.subtrees.len() * 32 + self.chunks_to_check.len() * 36 + names + dirs
    }
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<zstd::bulk::Decompressor<'static>> =
        RefCell::new(zstd::bulk::Decompressor::new().expect("zstd context"));
}

fn with_compressor<T>(level: i32, f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> T) -> T {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().map(|(l, _)| *l) != Some(level) {
            *c = Some((
                level,
                zstd::bulk::Compressor::new(level).expect("zstd context"),
            ));
        }
        f(&mut c.as_mut().expect("just set").1)
    })
}

/// The repository a session writes to: borrowed (a command's own session), or shared
/// (a server's session, which outlives any one request and so owns a handle).
pub enum RepoRef<'r> {
    Borrowed(&'r IndexedRepository),
    Shared(std::sync::Arc<IndexedRepository>),
}

impl std::ops::Deref for RepoRef<'_> {
    type Target = IndexedRepository;
    fn deref(&self) -> &IndexedRepository {
        match self {
            RepoRef::Borrowed(r) => r,
            RepoRef::Shared(r) => r,
        }
    }
}

impl<'r> From<&'r IndexedRepository> for RepoRef<'r> {
    fn from(r: &'r IndexedRepository) -> Self {
        RepoRef::Borrowed(r)
    }
}

impl From<std::sync::Arc<IndexedRepository>> for RepoRef<'static> {
    fn from(r: std::sync::Arc<IndexedRepository>) -> Self {
        RepoRef::Shared(r)
    }
}

/// Whether a session may build on snapshot `id`: its root tree is indexed, and every
/// pending condemnation's mark walked it (one that did not may have condemned what it
/// uses; see `crate::prune`).
fn parent_settled(repo: &IndexedRepository, id: &SnapshotId, s: &Snapshot) -> Result<bool> {
    if !repo.index().contains(BlobKind::Tree, &s.tree.0)? {
        return Ok(false);
    }
    let records = repo.condemnations()?;
    Ok(records.damaged.is_empty() && records.records.iter().all(|r| r.header.marked.contains(id)))
}

impl<'r> IngestSession<'r> {
    /// Starts a session and resolves its parent snapshot.
    pub fn start(repo: impl Into<RepoRef<'r>>, info: SessionInfo) -> Result<IngestSession<'r>> {
        let repo = repo.into();
        let parent = match &info.parent {
            ParentChoice::None => None,
            ParentChoice::Snapshot(id) => Some((*id, repo.load_snapshot(id)?)),
            ParentChoice::Latest => {
                let mut paths = info.paths.clone();
                paths.sort();
                repo.snapshots()?.into_iter().rev().find(|(_, s)| {
                    let mut p = s.paths.clone();
                    p.sort();
                    s.host == info.host && p == paths
                })
            }
        };
        let mut lock = repo.lock(crate::lock::LockKind::Shared, "backup")?;
        lock.refresh_in_background();
        // Looked at once the lock is visible, so that a prune's sweep either waits
        // for this session or finished before this look and is seen by it: a view
        // that predates a condemnation is never answered from (see `crate::prune`).
        let repo = if repo.is_current()? {
            repo
        } else {
            tracing::info!("a prune condemned packs since the index was loaded: loading it again");
            RepoRef::Shared(std::sync::Arc::new(repo.reloaded()?))
        };
        // A parent committed while a prune ran may use blobs of condemned packs until
        // the prune's sweep takes them back; its trees are then not built on (a
        // session trusts its parent's trees without looking below them), and the
        // pull reads everything.
        let parent = match parent {
            // Forgotten since it was chosen, and maybe pruned: gone.
            Some((id, _)) if !repo.has_snapshot(&id)? => {
                tracing::warn!(
                    "parent snapshot {} was forgotten as the pull started: every file is read again",
                    id.short()
                );
                None
            }
            Some((id, s)) if !parent_settled(&repo, &id, &s)? => {
                tracing::warn!(
                    "parent snapshot {} was committed while a prune ran and is not settled yet: every file is read again",
                    id.short()
                );
                None
            }
            p => p,
        };
        // Packs an interrupted session wrote after its last index file: indexed now,
        // so their data is not uploaded again.
        let recovered = repo.index_orphan_packs()?;
        if recovered > 0 {
            tracing::info!(
                packs = recovered,
                "indexed packs left by an interrupted backup"
            );
        }
        let mut parent_blobs = Marks::default();
        if let Some((_, s)) = &parent {
            if let Some((at, _)) = repo.index().locate(BlobKind::Tree, &s.tree.0)? {
                parent_blobs.set(at);
            }
        }
        let uploads = repo.backend().is_remote().then(Uploads::start).flatten();
        Ok(IngestSession {
            repo,
            info,
            parent,
            parent_blobs: Mutex::new(parent_blobs),
            sent: Mutex::new(Marks::default()),
            source_view: SourceView::default(),
            packs_written: OwnPacks::default(),
            received: Mutex::default(),
            received_budget: MAX_RECEIVED_BYTES,
            pack_lost: Mutex::new(None),
            state: Mutex::new(State {
                data: Packer::new(BlobKind::Data),
                tree: Packer::new(BlobKind::Tree),
                unindexed: Vec::new(),
                last_index: Instant::now(),
            }),
            in_flight: Mutex::new(HashSet::new()),
            uploads,
            stats: IngestStats::default(),
            started: Instant::now(),
            finished: false,
            _lock: lock,
        })
    }

    /// Shares the record of the packs this source's sessions wrote: `own` holds those
    /// of earlier sessions that never committed (a pull cut short), whose blobs this
    /// session then counts as the source's own, so a resumed pull does not send them
    /// again; the packs this session writes are added to it. Call it before the
    /// session stores anything. Only the caller (the pbs) keeps `own`: a source cannot
    /// add to it.
    pub fn share_own_packs(&mut self, own: OwnPacks) {
        let mine = std::mem::replace(&mut self.packs_written, own);
        let mine = mine.lock().expect("packs written").clone();
        self.packs_written
            .lock()
            .expect("packs written")
            .extend(mine);
    }

    /// The chunker parameters the source must use.
    pub fn chunker_params(&self) -> ChunkerParams {
        self.repo.config().chunker
    }

    /// What the session was started with.
    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// The parent snapshot, if one was chosen.
    pub fn parent(&self) -> Option<&(SnapshotId, Snapshot)> {
        self.parent.as_ref()
    }

    /// The parent snapshot's root tree.
    pub fn parent_tree(&self) -> Option<TreeId> {
        self.parent.as_ref().map(|(_, s)| s.tree)
    }

    pub fn stats(&self) -> &IngestStats {
        &self.stats
    }

    /// Reads a tree of the parent snapshot, for change detection. Append-only means
    /// a source reads nothing else: any other tree is refused.
    pub fn read_tree(&self, id: &TreeId) -> Result<TreeBlob> {
        let index = self.repo.index();
        let at = index.locate(BlobKind::Tree, &id.0)?;
        if !at.is_some_and(|(at, _)| self.parent_blobs.lock().expect("parent").get(at)) {
            return Err(Error::AppendOnly {
                action: "read",
                what: format!("tree {id}, which is not part of the parent snapshot"),
            });
        }
        let tree = self.repo.load_tree(id)?;
        // Located before the lock is taken: each look-up may read the index cache.
        let mut found = Vec::new();
        for sub in tree.subtrees() {
            found.extend(index.locate(BlobKind::Tree, &sub.0)?.map(|(at, _)| at));
        }
        if self.info.scope == DedupScope::OwnHistory {
            for c in tree.chunks() {
                found.extend(index.locate(BlobKind::Data, &c.0)?.map(|(at, _)| at));
            }
        }
        let mut parent = self.parent_blobs.lock().expect("parent");
        for at in found {
            parent.set(at);
        }
        Ok(tree)
    }

    /// Which of `blobs` the source must send: those the repository lacks, and, in its
    /// own-history scope, those it has only from others.
    pub fn missing(&self, blobs: &[BlobRef]) -> Result<Vec<BlobRef>> {
        let mut out = Vec::new();
        for b in blobs {
            if !self.usable(b)? {
                out.push(*b);
            }
        }
        Ok(out)
    }

    /// Whether the source may build on `b` without sending it: it is stored (or being
    /// stored by this session) and, in the own-history scope, the source's own (see
    /// [`DedupScope`]).
    fn usable(&self, b: &BlobRef) -> Result<bool> {
        Ok(self.usable_at(b, self.repo.index().locate(b.kind, &b.id)?))
    }

    /// [`IngestSession::usable`] for a blob the index has `at` (its position and place).
    fn usable_at(&self, b: &BlobRef, at: Option<(usize, BlobLocation)>) -> bool {
        if self.in_flight.lock().expect("in flight").contains(b) {
            return true;
        }
        let Some((at, loc)) = at else {
            return false;
        };
        self.info.scope == DedupScope::Repository
            || self.parent_blobs.lock().expect("parent").get(at)
            || self.sent.lock().expect("sent").get(at)
            || self
                .packs_written
                .lock()
                .expect("packs written")
                .contains(&loc.pack)
    }

    /// The source sent `b` (verified): from now on it is its own. Returns whether it
    /// was new to the source (not stored, or not visible to it before). A blob not
    /// stored yet becomes its own as this session stores it (see `store`).
    /// (Nothing to note in the whole repository's scope: there the source is told what
    /// the repository lacked, and `false` is returned without a look-up.)
    fn note_sent(&self, b: BlobRef) -> Result<bool> {
        if self.info.scope == DedupScope::Repository {
            return Ok(false);
        }
        let at = self.repo.index().locate(b.kind, &b.id)?;
        Ok(self.note_sent_at(b, at))
    }

    /// [`IngestSession::note_sent`] of a blob the index has `at`.
    fn note_sent_at(&self, b: BlobRef, at: Option<(usize, BlobLocation)>) -> bool {
        if self.info.scope == DedupScope::Repository {
            return false;
        }
        let new_to_source = !self.usable_at(&b, at);
        if let Some((at, _)) = at {
            self.sent.lock().expect("sent").set(at);
        }
        new_to_source
    }

    /// What the source may be told this session added: in the own-history scope, the
    /// blobs that were new to it, whether or not the repository had them (telling it
    /// which were stored already would tell it what other hosts store).
    pub fn source_figures(&self) -> SourceFigures {
        if self.info.scope == DedupScope::Repository {
            return SourceFigures {
                blobs_new: self.stats.blobs_new.load(Relaxed),
                bytes_new: self.stats.bytes_new.load(Relaxed),
                bytes_stored: self.stats.bytes_stored.load(Relaxed),
            };
        }
        SourceFigures {
            blobs_new: self.source_view.blobs.load(Relaxed),
            bytes_new: self.source_view.plain.load(Relaxed),
            bytes_stored: self.source_view.sealed.load(Relaxed),
        }
    }

    /// Adds a blob in its transfer encoding (format byte, then zstd frame or raw bytes)
    /// under the id the source claims. The blob is decoded and hashed; a mismatch is
    /// refused. Returns whether it was new.
    pub fn add_encoded(
        &self,
        kind: BlobKind,
        claimed: &[u8; 32],
        encoded: Vec<u8>,
    ) -> Result<bool> {
        // A frame that does not say what it decodes to may decode to one chunk's worth
        // at most: that is what an upload's budget counted it as (a 9 KB tree frame
        // must not become hundreds of MiB of memory). A larger tree declares its size,
        // and the budget counts that.
        let limit = match haul_protocol::chunker::declared_plain_len(&encoded) {
            Some(_) => self.limit(kind),
            None => self
                .limit(kind)
                .min(self.repo.config().chunker.max_size as usize),
        };
        let plain_len = {
            let plain = DECOMPRESSOR
                .with(|d| decode_blob_ref(&mut d.borrow_mut(), &encoded, limit))
                .map_err(|e| {
                    Error::InvalidInput(format!("{kind} blob {}: {e}", hex::encode(claimed)))
                })?;
            self.verify(kind, claimed, &plain)?;
            plain.len()
        };
        let new_to_source = self.note_sent(BlobRef { kind, id: *claimed })?;
        if new_to_source {
            self.source_view.add(plain_len, encoded.len());
        }
        let stored = self.store(kind, claimed, plain_len, encoded)?;
        Ok(match self.info.scope {
            DedupScope::Repository => stored,
            DedupScope::OwnHistory => new_to_source,
        })
    }

    /// Adds a blob as plaintext under the id its source claims (which is checked);
    /// the engine compresses. Returns whether it was new.
    pub fn add_plain(&self, kind: BlobKind, claimed: &[u8; 32], plain: Vec<u8>) -> Result<bool> {
        self.verify(kind, claimed, &plain)?;
        self.add_trusted(kind, claimed, plain)
    }

    /// Adds a blob as plaintext and returns its id, computed here (sources in the same
    /// process, which need not hash the data themselves).
    pub fn add_new(&self, kind: BlobKind, plain: Vec<u8>) -> Result<[u8; 32]> {
        let id = *blake3::hash(&plain).as_bytes();
        if kind == BlobKind::Tree {
            self.verify(kind, &id, &plain)?;
        }
        self.add_trusted(kind, &id, plain)?;
        Ok(id)
    }

    /// Stores `plain` under `id`, which the caller has verified.
    fn add_trusted(&self, kind: BlobKind, id: &[u8; 32], plain: Vec<u8>) -> Result<bool> {
        if plain.len() > self.limit(kind) {
            return Err(Error::InvalidInput(format!(
                "{kind} blob of {} bytes exceeds the limit",
                plain.len()
            )));
        }
        let claimed = id;
        let b = BlobRef { kind, id: *claimed };
        let at = self.repo.index().locate(kind, claimed)?;
        self.note_sent_at(b, at);
        if at.is_some() || self.in_flight.lock().expect("in flight").contains(&b) {
            return Ok(false); // stored, or being stored
        }
        let plain_len = plain.len();
        let level = self.repo.config().compression_level;
        let encoded =
            with_compressor(level, |c| encode_blob(c, plain)).map_err(Error::io("zstd"))?;
        self.store(kind, claimed, plain_len, encoded)
    }

    fn limit(&self, kind: BlobKind) -> usize {
        match kind {
            BlobKind::Data => self.repo.config().chunker.max_size as usize,
            BlobKind::Tree => MAX_TREE_BYTES,
        }
    }

    /// Checks that `plain` hashes to `claimed` and, for a tree, that it decodes; notes
    /// what the tree refers to for `commit`.
    fn verify(&self, kind: BlobKind, claimed: &[u8; 32], plain: &[u8]) -> Result<()> {
        let actual = blake3::hash(plain);
        if actual.as_bytes() != claimed {
            return Err(Error::IdMismatch {
                kind,
                claimed: hex::encode(claimed),
                actual: actual.to_hex().to_string(),
            });
        }
        if kind == BlobKind::Tree {
            self.receive_tree(TreeId(*claimed), plain)?;
        }
        Ok(())
    }

    /// Notes what a verified tree refers to (see [`Received`]). Noting a tree whose
    /// storing then fails is harmless: `commit` checks that every tree it reaches is
    /// in the index before it looks at its children.
    ///
    /// The tree is checked node by node, never held whole; what is kept of it is a
    /// chunk id per chunk to check and each name once, less than its bytes.
    fn receive_tree(&self, id: TreeId, plain: &[u8]) -> Result<()> {
        if self
            .received
            .lock()
            .expect("received trees")
            .trees
            .contains_key(&id)
        {
            return Ok(()); // the same bytes (they hash to its id): valid
        }
        let mut r = Received::default();
        if is_pages(plain) {
            // A large directory's page index: its pages are walked as subtrees are.
            let pages = Pages::decode(plain)
                .map_err(|d| Error::InvalidInput(format!("tree {}: {d}", hex::encode(id.0))))?;
            r.subtrees = pages.pages.into_iter().map(|p| p.id).collect();
            return self.note_received(id, r);
        }
        Tree::for_each_node(plain, |node| {
            match node.subtree {
                Some(sub) => r.subtrees.push(sub),
                None if node.kind == NodeKind::Dir => {
                    r.dirs_without_subtree.push(node.name.clone())
                }
                None => {}
            }
            let mut named = false;
            for c in &node.content {
                if !self.usable(&BlobRef::data(*c))? {
                    if !named {
                        r.names.push(node.name.clone());
                        named = true;
                    }
                    r.chunks_to_check.push((*c, (r.names.len() - 1) as u32));
                }
            }
            Ok(())
        })
        .map_err(|e| match e {
            VisitError::Decode(d) => {
                Error::InvalidInput(format!("tree {}: {d}", hex::encode(id.0)))
            }
            VisitError::Visitor(e) => e,
        })?;
        self.note_received(id, r)
    }

    fn note_received(&self, id: TreeId, r: Received) -> Result<()> {
        let bytes = r.bytes();
        let mut received = self.received.lock().expect("received trees");
        if received.bytes + bytes > self.received_budget {
            return Ok(()); // read again at commit
        }
        received.bytes += bytes;
        received.trees.insert(id, r);
        Ok(())
    }

    fn store(
        &self,
        kind: BlobKind,
        id: &[u8; 32],
        plain_len: usize,
        encoded: Vec<u8>,
    ) -> Result<bool> {
        let blob = BlobRef { kind, id: *id };
        if let Some((at, _)) = self.repo.index().locate(kind, id)? {
            // Stored meanwhile by another session: the source sent it, so it is its own.
            if self.info.scope == DedupScope::OwnHistory {
                self.sent.lock().expect("sent").set(at);
            }
            return Ok(false);
        }
        if !self.in_flight.lock().expect("in flight").insert(blob) {
            return Ok(false);
        }
        let sealed = self.repo.data_key().seal_vec(&ad::blob(kind, id), encoded);
        self.stats.blobs_new.fetch_add(1, Relaxed);
        self.stats.bytes_new.fetch_add(plain_len as u64, Relaxed);
        if kind == BlobKind::Data {
            self.stats.data_new.fetch_add(plain_len as u64, Relaxed);
        }
        self.stats
            .bytes_stored
            .fetch_add(sealed.len() as u64, Relaxed);
        let full = {
            let mut st = self.state.lock().expect("ingest state");
            let packer = match kind {
                BlobKind::Data => &mut st.data,
                BlobKind::Tree => &mut st.tree,
            };
            let offset = match packer.append(self.repo.backend().as_ref(), &sealed) {
                Ok(offset) => offset,
                Err(e) => {
                    // Part of the blob may be in the file: the pack's offsets and hash
                    // no longer describe it. Drop the whole pack (its temporary file
                    // goes with it) and forget its blobs, so they are stored again if
                    // offered again; the commit is refused.
                    self.lose_pack(&e);
                    let broken = std::mem::replace(packer, Packer::new(kind));
                    self.in_flight.lock().expect("in flight").remove(&blob);
                    self.out_of_flight(&broken.entries);
                    return Err(e);
                }
            };
            packer.entries.push(PackEntry {
                kind,
                id: *id,
                offset,
                length: sealed.len() as u32,
                raw_length: plain_len as u32,
            });
            if packer.len >= self.repo.config().pack_size as u64
                || packer.entries.len() >= INDEX_EVERY_BLOBS
            {
                Some(std::mem::replace(packer, Packer::new(kind)))
            } else {
                None
            }
        };
        drop(sealed);
        if let Some(packer) = full {
            self.write_pack(packer)?;
        }
        Ok(true)
    }

    /// Appends the sealed header, finishes the pack under its name (in the background
    /// where the backend is remote), and makes its blobs known.
    fn write_pack(&self, mut packer: Packer) -> Result<()> {
        let sealed = packer
            .seal(self.repo.data_key(), self.repo.backend().as_ref())
            .inspect_err(|e| {
                // Its blobs are not stored: `missing` must say so again.
                self.lose_pack(e);
                self.out_of_flight(&packer.entries);
            })?;
        let Some((id, writer)) = sealed else {
            return Ok(());
        };
        match &self.uploads {
            Some(uploads) => {
                uploads.push(id, writer, packer);
                self.reap(false)
            }
            None => {
                let result = store_pack(id, writer);
                self.packed(id, packer, result)
            }
        }
    }

    /// Takes the results of the background uploads done (with `all`, of every one,
    /// after waiting for them); the first failure is returned.
    fn reap(&self, all: bool) -> Result<()> {
        let Some(uploads) = &self.uploads else {
            return Ok(());
        };
        let mut first = Ok(());
        for (id, packer, result) in uploads.take(all) {
            let r = self.packed(id, packer, result);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// What follows a pack's storing: on success its blobs are made known and the
    /// index is written when due; on failure the session can commit nothing.
    fn packed(&self, id: PackId, packer: Packer, stored: Result<()>) -> Result<()> {
        if let Err(e) = stored {
            // Its blobs are not stored: `missing` must say so again.
            self.lose_pack(&e);
            self.out_of_flight(&packer.entries);
            return Err(e);
        }
        let index = self.repo.index();
        index.add_pack(id, &packer.entries);
        self.packs_written.lock().expect("packs written").insert(id);
        if self.info.scope == DedupScope::OwnHistory {
            // The source's own wherever the index points for them later: another
            // session of this process may store the same bytes after this one, and
            // the index then names its pack.
            let mut own = Vec::with_capacity(packer.entries.len());
            for e in &packer.entries {
                own.extend(index.locate(e.kind, &e.id)?.map(|(at, _)| at));
            }
            let mut sent = self.sent.lock().expect("sent");
            for at in own {
                sent.set(at);
            }
        }
        self.out_of_flight(&packer.entries);
        tracing::debug!(pack = %id.short(), kind = %packer.kind, blobs = packer.entries.len(), "pack written");
        let due = {
            let mut st = self.state.lock().expect("ingest state");
            st.unindexed.push(IndexedPack {
                pack: id,
                blobs: packer.entries,
            });
            let blobs: usize = st.unindexed.iter().map(|p| p.blobs.len()).sum();
            st.unindexed.len() >= INDEX_EVERY_PACKS
                || blobs >= INDEX_EVERY_BLOBS
                || st.last_index.elapsed() >= INDEX_EVERY
        };
        if due {
            self.write_index()?;
        }
        Ok(())
    }

    /// Takes the blobs of a pack out of the in-flight set: written, or lost with it.
    fn out_of_flight(&self, entries: &[PackEntry]) {
        let mut in_flight = self.in_flight.lock().expect("in flight");
        for e in entries {
            in_flight.remove(&BlobRef {
                kind: e.kind,
                id: e.id,
            });
        }
    }

    /// Notes that a pack's blobs, taken as stored, are not: the commit is refused.
    fn lose_pack(&self, e: &Error) {
        self.pack_lost
            .lock()
            .expect("pack lost")
            .get_or_insert_with(|| e.to_string());
    }

    fn write_index(&self) -> Result<()> {
        let packs = {
            let mut st = self.state.lock().expect("ingest state");
            st.last_index = Instant::now();
            std::mem::take(&mut st.unindexed)
        };
        if packs.is_empty() {
            return Ok(());
        }
        let result = self.write_index_file(&packs);
        if result.is_err() {
            // Keep them for the next attempt (the final flush), or their packs
            // would stay on disk with no index pointing at them.
            let mut st = self.state.lock().expect("ingest state");
            let mut packs = packs;
            packs.append(&mut st.unindexed);
            st.unindexed = packs;
        }
        result
    }

    fn write_index_file(&self, packs: &[IndexedPack]) -> Result<()> {
        self.repo.write_index_file(packs).map(|_| ())
    }

    /// Writes the open packs and the index of everything written so far.
    pub fn flush(&self) -> Result<()> {
        let (data, tree) = {
            let mut st = self.state.lock().expect("ingest state");
            (
                std::mem::replace(&mut st.data, Packer::new(BlobKind::Data)),
                std::mem::replace(&mut st.tree, Packer::new(BlobKind::Tree)),
            )
        };
        let written = self.write_pack(data).and(self.write_pack(tree));
        // Every upload is waited for, whatever failed: the index names only what they
        // stored.
        let uploaded = self.reap(true);
        written?;
        uploaded?;
        self.write_index()
    }

    /// Checks that the tree `root` and everything below it is stored, then writes the
    /// snapshot. On any missing blob nothing is written.
    pub fn commit(self, root: TreeId, summary: Summary) -> Result<(SnapshotId, Snapshot)> {
        self.commit_at(root, summary, chrono::Utc::now())
    }

    /// [`IngestSession::commit`] with the snapshot's time given: an import keeps the
    /// time of the backup it imports.
    pub fn commit_at(
        mut self,
        root: TreeId,
        mut summary: Summary,
        time: chrono::DateTime<chrono::Utc>,
    ) -> Result<(SnapshotId, Snapshot)> {
        self.settle(&root)?;
        summary.blobs_new = self.stats.blobs_new.load(Relaxed);
        summary.bytes_new = self.stats.bytes_new.load(Relaxed);
        summary.data_new = self.stats.data_new.load(Relaxed);
        summary.bytes_stored = self.stats.bytes_stored.load(Relaxed);
        summary.duration_ms = self.started.elapsed().as_millis() as u64;
        let snapshot = Snapshot {
            time,
            host: self.info.host.clone(),
            paths: self.info.paths.clone(),
            tags: self.info.tags.clone(),
            tree: root,
            parent: self.parent.as_ref().map(|(id, _)| *id),
            source: self.info.source,
            summary,
            original: None,
        };
        let id = self.repo.save_snapshot(&snapshot)?;
        self.finished = true;
        Ok((id, snapshot))
    }

    /// Writes `snapshot` as it is (a copy from another repository keeps its time,
    /// paths, tags and figures) once everything below its root is stored, as
    /// [`IngestSession::commit`] does. Also returns what the session added: its blobs
    /// and bytes stored (sealed and compressed), its last packs included.
    pub fn commit_snapshot(
        mut self,
        snapshot: Snapshot,
    ) -> Result<((SnapshotId, Snapshot), Added)> {
        self.settle(&snapshot.tree)?;
        let id = self.repo.save_snapshot(&snapshot)?;
        self.finished = true;
        let added = Added {
            blobs: self.stats.blobs_new.load(Relaxed),
            bytes_stored: self.stats.bytes_stored.load(Relaxed),
        };
        Ok(((id, snapshot), added))
    }

    /// Before a snapshot is written: the open packs and the index are written, every
    /// blob below `root` is stored, and the session's lock is fresh (a prune's sweep
    /// waits for it; see `crate::prune`).
    fn settle(&mut self, root: &TreeId) -> Result<()> {
        self.flush()?;
        tracing::debug!("commit: open packs and the index written");
        self.check_complete(root)?;
        self._lock.ensure_fresh("backup session")?;
        tracing::debug!("commit: everything below the root tree is stored");
        Ok(())
    }

    /// Ends the session without a snapshot; what was stored stays usable.
    pub fn abandon(mut self) -> Result<()> {
        self.finished = true;
        self.flush()
    }

    /// Walks the snapshot's trees from `root`: every tree and chunk must be indexed,
    /// and, in the own-history scope, the source's own (see [`DedupScope`]). Trees of
    /// the parent are complete (it was checked when it was committed); trees added in
    /// this session are looked at as they were noted when they arrived; any other tree
    /// (already in the repository, from another snapshot or an interrupted session) is
    /// read and looked at here if the scope lets the source build on it, and refused
    /// otherwise.
    fn check_complete(&self, root: &TreeId) -> Result<()> {
        if let Some(detail) = self.pack_lost.lock().expect("pack lost").clone() {
            return Err(Error::PackLost { detail });
        }
        let index = self.repo.index();
        let received = self.received.lock().expect("received trees");
        // Trees walked and chunks checked, by index position (the kinds' positions
        // never meet): a bit per blob.
        let mut seen = Marks::default();
        let mut missing = Missing::default();
        let mut stack = vec![*root];
        // A blob that is stored but not the source's to use is missing to it, with the
        // same refusal as one nobody stored: the answer must not tell it apart.
        let check_chunk = |c: &ChunkId, name: &[u8], seen: &mut Marks, missing: &mut Missing| {
            let b = BlobRef::data(*c);
            let at = index.locate(BlobKind::Data, &c.0)?;
            if at.is_some_and(|(at, _)| !seen.set(at)) {
                return Ok(());
            }
            if !self.usable_at(&b, at) {
                missing.note(b, || {
                    format!("chunk {c} of {}", String::from_utf8_lossy(name))
                });
            }
            Ok::<(), Error>(())
        };
        let no_subtree =
            |name: &[u8]| format!("subtree of directory {}", String::from_utf8_lossy(name));
        while let Some(id) = stack.pop() {
            if missing.full() {
                break;
            }
            let b = BlobRef::tree(id);
            let at = index.locate(BlobKind::Tree, &id.0)?;
            if let Some((at, _)) = at {
                if !seen.set(at) || self.parent_blobs.lock().expect("parent").get(at) {
                    continue; // walked already, or the parent's: complete
                }
            }
            if !self.usable_at(&b, at) {
                missing.note(b, || format!("tree {id}"));
                continue;
            }
            if let Some(r) = received.trees.get(&id) {
                stack.extend(&r.subtrees);
                for n in &r.dirs_without_subtree {
                    missing.note_each(|| no_subtree(n));
                }
                for (c, node) in &r.chunks_to_check {
                    check_chunk(c, &r.names[*node as usize], &mut seen, &mut missing)?;
                }
                continue;
            }
            // Stored and the source's to use, but not looked at in this session: from
            // another snapshot (the whole repository's scope), sent by one of its own
            // pulls that was cut short, or past what the session notes. Read and
            // looked at here.
            let tree = match self.repo.load_tree(&id)? {
                TreeBlob::Nodes(t) => t,
                TreeBlob::Pages(p) => {
                    stack.extend(p.pages.iter().map(|p| p.id));
                    continue;
                }
            };
            for node in &tree.nodes {
                if let Some(sub) = node.subtree {
                    stack.push(sub);
                } else if node.kind == NodeKind::Dir {
                    missing.note_each(|| no_subtree(&node.name));
                }
                for c in &node.content {
                    check_chunk(c, &node.name, &mut seen, &mut missing)?;
                }
            }
        }
        match missing.first {
            Some(first) => Err(Error::MissingBlobs {
                count: missing.count,
                first,
            }),
            None => Ok(()),
        }
    }
}

/// What a commit found missing: how many, and the first, each blob counted once (up to
/// [`MAX_MISSING_REPORTED`]: past it the walk stops).
#[derive(Default)]
struct Missing {
    count: usize,
    first: Option<String>,
    blobs: HashSet<BlobRef>,
}

impl Missing {
    fn note(&mut self, b: BlobRef, what: impl FnOnce() -> String) {
        if !self.full() && self.blobs.insert(b) {
            self.note_each(what);
        }
    }

    fn note_each(&mut self, what: impl FnOnce() -> String) {
        self.count = (self.count + 1).min(MAX_MISSING_REPORTED);
        if self.first.is_none() {
            self.first = Some(what());
        }
    }

    fn full(&self) -> bool {
        self.count >= MAX_MISSING_REPORTED
    }
}

impl Drop for IngestSession<'_> {
    fn drop(&mut self) {
        if !self.finished {
            // Keep what was uploaded: the next session will not need to send it again.
            if let Err(e) = self.flush() {
                tracing::warn!("abandoned ingest session could not save its last packs: {e}");
            }
        }
    }
}

/// In-process sources (`backup-local`, the rdiff-backup import) feed a session directly.
impl Sink for IngestSession<'_> {
    fn load_tree(&self, id: &TreeId) -> Result<TreeBlob, SinkError> {
        self.read_tree(id).map_err(SinkError::new)
    }
    fn offer_chunk(&self, plain: Vec<u8>) -> Result<ChunkId, SinkError> {
        self.add_new(BlobKind::Data, plain)
            .map(ChunkId)
            .map_err(SinkError::new)
    }
    fn offer_tree(&self, encoded: Vec<u8>) -> Result<TreeId, SinkError> {
        self.add_new(BlobKind::Tree, encoded)
            .map(TreeId)
            .map_err(SinkError::new)
    }
}

#[allow(unused)]
fn _assert_send_sync() {
    fn is_sync<T: Sync>() {}
    is_sync::<IngestSession<'static>>();
    let _ = crypto::OVERHEAD;
    let _ = PackId::of;
}

#[cfg(test)]
impl SessionInfo {
    /// A local backup of `/srv` by host `h`, without a parent: what engine tests store.
    pub(crate) fn for_tests() -> SessionInfo {
        SessionInfo {
            host: "h".into(),
            paths: vec!["/srv".into()],
            tags: vec![],
            source: SourceKind::Local,
            parent: ParentChoice::None,
            scope: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::crypto::KdfParams;
    use crate::format::config::RepoConfig;
    use crate::Repository;
    use haul_protocol::tree::Node;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// Memory storage whose pack writes fail while `full` is set, like a full disk;
    /// with `remote`, it passes for a remote store, and the storing of a pack under its
    /// name fails while `refuse` is set.
    #[derive(Default)]
    struct Flaky {
        inner: MemoryBackend,
        full: Arc<AtomicBool>,
        remote: bool,
        refuse: Arc<AtomicBool>,
    }

    struct FlakyWriter<'a> {
        inner: Box<dyn ObjectWriter + 'a>,
        full: Arc<AtomicBool>,
        refuse: Arc<AtomicBool>,
    }

    impl Write for FlakyWriter<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.full.load(Relaxed) {
                // A short write, then the error: part of the blob is in the file.
                let n = self.inner.write(&buf[..buf.len() / 2])?;
                let _ = n;
                return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
            }
            self.inner.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl ObjectWriter for FlakyWriter<'_> {
        fn finish(self: Box<Self>, name: &str) -> Result<()> {
            if self.refuse.load(Relaxed) {
                return Err(Error::Io {
                    what: format!("pack {name}"),
                    source: std::io::Error::other("503 Slow Down"),
                });
            }
            self.inner.finish(name)
        }
    }

    impl Backend for Flaky {
        fn location(&self) -> String {
            "flaky".into()
        }
        fn is_remote(&self) -> bool {
            self.remote
        }
        fn list(&self, t: FileType) -> Result<Vec<(String, u64)>> {
            self.inner.list(t)
        }
        fn read(&self, t: FileType, name: &str) -> Result<Vec<u8>> {
            self.inner.read(t, name)
        }
        fn read_range(&self, t: FileType, name: &str, offset: u64, length: u32) -> Result<Vec<u8>> {
            self.inner.read_range(t, name, offset, length)
        }
        fn write_once(&self, t: FileType, name: &str, data: &[u8]) -> Result<()> {
            self.inner.write_once(t, name, data)
        }
        fn delete(&self, t: FileType, name: &str) -> Result<()> {
            self.inner.delete(t, name)
        }
        fn move_aside(&self, t: FileType, name: &str) -> Result<String> {
            self.inner.move_aside(t, name)
        }
        fn writer(&self, t: FileType) -> Result<Box<dyn ObjectWriter>> {
            Ok(Box::new(FlakyWriter {
                inner: self.inner.writer(t)?,
                full: self.full.clone(),
                refuse: self.refuse.clone(),
            }))
        }
    }

    /// 2 MB of incompressible bytes: larger than the pack's write buffer, so each
    /// one reaches the (failing) writer directly.
    fn chunk(seed: u8) -> Vec<u8> {
        let mut out = vec![0u8; 2_000_000];
        blake3::Hasher::new()
            .update(&[seed])
            .finalize_xof()
            .fill(&mut out);
        out
    }

    #[test]
    fn a_session_whose_lock_was_lost_commits_nothing() {
        let repo = Repository::init(
            Arc::new(MemoryBackend::default()),
            b"pw",
            KdfParams::TESTS,
            RepoConfig::new(3),
        )
        .unwrap()
        .load_index(None)
        .unwrap();
        let session = IngestSession::start(&repo, SessionInfo::for_tests()).unwrap();
        let (root, bytes) = Tree { nodes: vec![] }.encode_with_id();
        session.add_plain(BlobKind::Tree, &root.0, bytes).unwrap();
        session._lock.age_for_tests(Duration::from_secs(40 * 60));
        let err = session.commit(root, Summary::default()).unwrap_err();
        assert!(matches!(err, Error::LockLost { .. }), "{err}");
        assert!(repo.snapshots().unwrap().is_empty());
    }

    /// A new repository on `backend`, with a cheap key derivation.
    fn repository_on(backend: Arc<Flaky>) -> IndexedRepository {
        let kdf = KdfParams {
            m_cost: 64,
            t_cost: 1,
            p_cost: 1,
        };
        Repository::init(backend, b"pw", kdf, RepoConfig::new(3))
            .unwrap()
            .load_index(None)
            .unwrap()
    }

    #[test]
    fn a_failed_pack_write_never_leaves_blobs_claimed_present() {
        let flaky = Arc::new(Flaky::default());
        let full = flaky.full.clone();
        let repo = repository_on(flaky);
        let info = SessionInfo {
            host: "h".into(),
            paths: vec!["/".into()],
            tags: vec![],
            source: SourceKind::Pull,
            parent: ParentChoice::None,
            scope: DedupScope::OwnHistory,
        };
        let s = IngestSession::start(&repo, info.clone()).unwrap();
        let before = s.add_new(BlobKind::Data, chunk(1)).unwrap();
        // A tree naming it while it is still being packed takes it as stored.
        let (root, tree) = files_tree(&[ChunkId(before)]).encode_with_id();
        s.add_plain(BlobKind::Tree, &root.0, tree.clone()).unwrap();
        full.store(true, Relaxed);
        let err = s.add_new(BlobKind::Data, chunk(2)).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        full.store(false, Relaxed);
        // The disk has room again: later blobs go to a new, sound pack.
        let after = s.add_new(BlobKind::Data, chunk(3)).unwrap();
        // The blob stored before the failure went down with its pack, and is known
        // to be missing (so it would be stored again), not claimed present.
        assert_eq!(
            s.missing(&[BlobRef {
                kind: BlobKind::Data,
                id: before
            }])
            .unwrap()
            .len(),
            1
        );
        let again = s.add_new(BlobKind::Data, chunk(1)).unwrap();
        assert_eq!(again, before);
        s.flush().unwrap();
        for (id, seed) in [(before, 1), (after, 3)] {
            assert_eq!(repo.load_blob(BlobKind::Data, &id).unwrap(), chunk(seed));
        }
        // Its pack was lost after the tree was noted: the commit is refused, though the
        // chunk came back, since the tree's look at it no longer holds.
        let err = s.commit(root, Summary::default()).unwrap_err();
        assert!(matches!(err, Error::PackLost { .. }), "{err}");
        assert!(err.to_string().contains("run the backup again"), "{err}");
        assert!(repo.snapshots().unwrap().is_empty());
        // The next session commits the same tree.
        let s = IngestSession::start(&repo, info).unwrap();
        s.add_new(BlobKind::Data, chunk(1)).unwrap();
        s.add_plain(BlobKind::Tree, &root.0, tree).unwrap();
        s.commit(root, Summary::default()).unwrap();
        assert_eq!(repo.snapshots().unwrap().len(), 1);
    }

    /// On a remote store packs are stored in the background: a pack whose upload
    /// fails is lost like one whose write failed (its blobs missing again, the commit
    /// refused), and the packs uploaded are indexed and readable after `flush`.
    #[test]
    fn a_pack_whose_background_upload_fails_is_lost_and_claims_nothing() {
        let flaky = Arc::new(Flaky {
            remote: true,
            ..Default::default()
        });
        let refuse = flaky.refuse.clone();
        let repo = repository_on(flaky);
        let info = SessionInfo::for_tests();
        let s = IngestSession::start(&repo, info.clone()).unwrap();
        assert!(
            s.uploads.is_some(),
            "a remote store's packs go up in the background"
        );
        let stored = s.add_new(BlobKind::Data, chunk(1)).unwrap();
        s.flush().unwrap();
        assert_eq!(repo.load_blob(BlobKind::Data, &stored).unwrap(), chunk(1));
        let lost = s.add_new(BlobKind::Data, chunk(2)).unwrap();
        let (root, tree) = files_tree(&[ChunkId(stored), ChunkId(lost)]).encode_with_id();
        s.add_plain(BlobKind::Tree, &root.0, tree.clone()).unwrap();
        refuse.store(true, Relaxed);
        let err = s.flush().unwrap_err();
        assert!(err.to_string().contains("503 Slow Down"), "{err}");
        refuse.store(false, Relaxed);
        let missing = |s: &IngestSession, id| {
            s.missing(&[BlobRef {
                kind: BlobKind::Data,
                id,
            }])
            .unwrap()
            .len()
        };
        assert_eq!(
            missing(&s, lost),
            1,
            "a blob of the lost pack is missing again"
        );
        assert_eq!(missing(&s, stored), 0);
        assert!(repo.load_blob(BlobKind::Data, &lost).is_err());
        let err = s.commit(root, Summary::default()).unwrap_err();
        assert!(matches!(err, Error::PackLost { .. }), "{err}");
        assert!(repo.snapshots().unwrap().is_empty());
        // The next session stores it again and commits (its source sends both: a
        // source builds on what it sent).
        let s = IngestSession::start(&repo, info).unwrap();
        s.add_new(BlobKind::Data, chunk(1)).unwrap();
        s.add_new(BlobKind::Data, chunk(2)).unwrap();
        s.add_plain(BlobKind::Tree, &root.0, tree).unwrap();
        s.commit(root, Summary::default()).unwrap();
        assert_eq!(repo.load_blob(BlobKind::Data, &lost).unwrap(), chunk(2));
    }

    /// Two sessions of one process store the same chunk, each in its own pack; the
    /// index then names the pack written last. The other session's source still
    /// built on its own copy: its commit stands.
    #[test]
    fn a_chunk_two_sessions_stored_stays_each_sources_own() {
        let (_, repo) = crate::usage::tests::memory_repo();
        let info = |host: &str| SessionInfo {
            host: host.into(),
            ..SessionInfo::for_tests()
        };
        let a = IngestSession::start(&repo, info("a")).unwrap();
        let b = IngestSession::start(&repo, info("b")).unwrap();
        let x = chunk(9);
        let id = ChunkId::of(&x);
        assert!(a.add_plain(BlobKind::Data, &id.0, x.clone()).unwrap());
        assert!(b.add_plain(BlobKind::Data, &id.0, x.clone()).unwrap());
        a.flush().unwrap();
        b.flush().unwrap();
        let (tree, bytes) = files_tree(&[id]).encode_with_id();
        for s in [&a, &b] {
            assert!(s.missing(&[BlobRef::data(id)]).unwrap().is_empty());
            s.add_plain(BlobKind::Tree, &tree.0, bytes.clone()).unwrap();
        }
        a.commit(tree, Summary::default()).unwrap();
        b.commit(tree, Summary::default()).unwrap();
        assert_eq!(repo.snapshots().unwrap().len(), 2);
    }

    /// A directory of files, each one chunk.
    fn files_tree(chunks: &[ChunkId]) -> Tree {
        let nodes = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| Node {
                name: format!("f{i}").into_bytes(),
                kind: NodeKind::File,
                content: vec![*c],
                ..Default::default()
            })
            .collect();
        Tree { nodes }
    }

    /// Trees whose chunks come later are noted for the commit up to a budget; past it,
    /// the commit reads them again, and finds what is missing there just the same.
    #[test]
    fn trees_past_the_budget_of_notes_are_read_again_at_commit() {
        let (_, repo) = crate::usage::tests::memory_repo();
        let chunks: Vec<Vec<u8>> = (1..=4).map(chunk).collect();
        let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
        let (d1, d1_bytes) = files_tree(&ids[..2]).encode_with_id();
        let (d2, d2_bytes) = files_tree(&ids[2..]).encode_with_id();
        let dir = |name: &str, t| Node {
            name: name.into(),
            kind: NodeKind::Dir,
            subtree: Some(t),
            ..Default::default()
        };
        let (root, root_bytes) = Tree {
            nodes: vec![dir("a", d1), dir("b", d2)],
        }
        .encode_with_id();
        for complete in [false, true] {
            let mut s = IngestSession::start(&repo, SessionInfo::for_tests()).unwrap();
            // Room for the notes of d1 (284 bytes: two chunks to check, two names),
            // not for d2's or the root's after it.
            s.received_budget = 400;
            for (id, bytes) in [(d1, &d1_bytes), (d2, &d2_bytes), (root, &root_bytes)] {
                s.add_plain(BlobKind::Tree, &id.0, bytes.clone()).unwrap();
            }
            assert_eq!(
                s.received.lock().unwrap().trees.len(),
                1,
                "d2 and root past the budget"
            );
            let sent = if complete { 4 } else { 3 };
            for c in &chunks[..sent] {
                s.add_plain(BlobKind::Data, &ChunkId::of(c).0, c.clone())
                    .unwrap();
            }
            match s.commit(root, Summary::default()) {
                Ok((_, snap)) => {
                    assert!(complete);
                    assert_eq!(snap.tree, root);
                }
                Err(Error::MissingBlobs { count, first }) => {
                    assert!(!complete);
                    assert_eq!(count, 1);
                    assert!(
                        first.contains(&ids[3].to_hex()) && first.contains("f1"),
                        "{first}"
                    );
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(repo.snapshots().unwrap().len(), 1);
    }
}
