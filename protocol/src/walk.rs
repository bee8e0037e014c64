//! The backup walker: walks paths, detects unchanged files against a parent snapshot,
//! chunks and names new content, and builds one tree per directory.
//!
//! It is written once and used by every source of backups: `haul-agent` (which offers
//! blobs to the pbs over the ingest protocol), `haul-pbs backup-local` (which offers
//! them to an in-process ingest session) and the rdiff-backup import. Where the blobs go
//! is the [`Sink`]'s business; the walker never sees a key or a pack.
//!
//! Concurrency: the calling thread walks directories in name order; files to read go to
//! a bounded queue served by `threads` workers, each with its own [`Chunker`]. A
//! directory's tree is finished after its subdirectories, by which time its files have
//! usually been read, so workers rarely wait at directory boundaries. Memory is bounded
//! by the queue, one chunk buffer per worker and the pending results of the directories
//! on the current path, whatever the size of the tree or the repository.

use crate::chunker::{Chunker, ChunkerParams};
use crate::id::{ChunkId, TreeId};
use crate::meta::{node_from_metadata, read_xattrs, NameCache};
use crate::tree::{Lookup, Node, NodeFlags, NodeKind, PageError, Pager, Timestamp, Tree, TreeBlob};
use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};

mod listing;
mod warm;
use listing::Listing;
use warm::{Warm, Warmer};

/// Where the walker sends what it produces. Implementations must be usable from
/// several worker threads at once.
pub trait Sink: Sync {
    /// Loads a tree of the parent snapshot, for change detection: a directory's nodes,
    /// or the pages of a large one (and then each page).
    fn load_tree(&self, id: &TreeId) -> Result<TreeBlob, SinkError>;
    /// Offers a chunk and returns its id (BLAKE3 of `plain`); the sink stores it unless
    /// the repository already has it. The sink names the chunk so that it is hashed
    /// once: an in-process repository computes the id itself, a remote sink hashes
    /// before it uploads and the server verifies the claim.
    fn offer_chunk(&self, plain: Vec<u8>) -> Result<ChunkId, SinkError>;
    /// Offers a tree in its canonical encoding and returns its id; stored unless
    /// already present.
    fn offer_tree(&self, encoded: Vec<u8>) -> Result<TreeId, SinkError>;
}

/// A sink failure. It ends the backup: without the sink nothing can be stored.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub Box<dyn std::error::Error + Send + Sync>);

impl SinkError {
    pub fn new<E: std::error::Error + Send + Sync + 'static>(e: E) -> Self {
        SinkError(Box::new(e))
    }
}

/// Why a backup could not complete.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("backup path {path}: {source}")]
    BadPath { path: PathBuf, source: io::Error },
    #[error("backup path {0} is not absolute and the working directory is unknown")]
    Relative(PathBuf),
    #[error("no backup paths given")]
    NoPaths,
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The walk stopped because another part of the backup failed first.
    #[error("backup interrupted")]
    Interrupted,
}

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub paths: Vec<PathBuf>,
    /// Glob patterns (`glob` crate syntax) matched against the full path and against the
    /// entry's name; a match excludes the entry (and everything below it).
    pub excludes: Vec<glob::Pattern>,
    /// Skip the contents of directories holding a valid `CACHEDIR.TAG`.
    pub exclude_caches: bool,
    /// Do not descend into directories on another filesystem than their backup path.
    pub one_file_system: bool,
    /// File-reading worker threads.
    pub threads: usize,
    pub chunker: ChunkerParams,
    /// The parent snapshot's root tree, for change detection.
    pub parent: Option<TreeId>,
}

/// Counters, readable from another thread while the walk runs.
#[derive(Debug, Default)]
pub struct WalkStats {
    pub files_new: AtomicU64,
    pub files_changed: AtomicU64,
    pub files_unchanged: AtomicU64,
    pub dirs: AtomicU64,
    pub others: AtomicU64,
    /// Bytes read from files.
    pub bytes_read: AtomicU64,
    /// Total size of all files in the snapshot.
    pub bytes_total: AtomicU64,
}

/// A problem with one file that does not stop the backup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Warning {
    pub path: String,
    pub message: String,
}

/// What a finished walk produced.
#[derive(Debug)]
pub struct WalkOutcome {
    pub root: TreeId,
    pub warnings: Vec<Warning>,
}

/// Patterns that exclude entries.
/// Whether an entry at `path` named `name` matches one of `patterns`: against its full
/// path, or against its name (`*` does not cross a `/`). Backups and restores exclude
/// alike.
pub fn excluded(patterns: &[glob::Pattern], path: &Path, name: &[u8]) -> bool {
    if patterns.is_empty() {
        return false;
    }
    let name = String::from_utf8_lossy(name);
    let opts = glob::MatchOptions {
        require_literal_separator: true,
        ..Default::default()
    };
    patterns
        .iter()
        .any(|p| p.matches_path_with(path, opts) || p.matches_with(&name, opts))
}

pub fn compile_excludes(patterns: &[String]) -> Result<Vec<glob::Pattern>, String> {
    patterns
        .iter()
        .map(|p| glob::Pattern::new(p).map_err(|e| format!("exclude pattern {p:?}: {e}")))
        .collect()
}

/// Walks `opts.paths`, offering every new chunk and tree to `sink`, and returns the
/// snapshot's root tree. The root tree holds the full path to each backup path (as
/// restic does), so `/srv/www` is restored to `TARGET/srv/www`.
///
/// Three kinds of thread: the caller walks directories in name order and queues files;
/// `threads` workers read and chunk them; an assembler builds each directory's tree
/// once its files are read. The walker never waits for file contents, so a large file
/// does not stall the walk, and memory stays bounded by the two queues.
pub fn backup(
    sink: &dyn Sink,
    opts: &BackupOptions,
    stats: &WalkStats,
) -> Result<WalkOutcome, WalkError> {
    if opts.paths.is_empty() {
        return Err(WalkError::NoPaths);
    }
    let root = virtual_root(&opts.paths)?;
    let mut parent = match &opts.parent {
        Some(id) => Some(ParentDir::new(sink.load_tree(id)?)),
        None => None,
    };
    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(JOB_QUEUE);
    let (event_tx, event_rx) = mpsc::sync_channel::<Vec<Event>>(EVENT_QUEUE / EVENT_BATCH);
    // Owned by the workers: if they all die, the queue closes and the walker's next
    // send fails instead of blocking for ever.
    let job_rx = std::sync::Arc::new(Mutex::new(job_rx));
    let (warmer, warm_queue) = Warmer::new();
    let (readahead_tx, readahead_rx) = mpsc::sync_channel::<Vec<(PathBuf, u64)>>(JOB_QUEUE);
    let readahead = ReadAhead {
        queue: Mutex::new(readahead_rx),
        issued: AtomicU64::new(0),
        consumed: AtomicU64::new(0),
        done: Default::default(),
    };
    let warnings = Mutex::new(Vec::new());
    let threads = opts.threads.max(1);
    let root = std::thread::scope(|scope| {
        let _done = ReadAheadDone(&readahead);
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let readahead = &readahead;
            scope.spawn(move || {
                let mut chunker = Chunker::new(opts.chunker);
                loop {
                    let job = match job_rx.lock().expect("job queue").recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    };
                    let mut results = Vec::with_capacity(job.files.len());
                    for (path, node) in job.files {
                        let size = node.size;
                        let result = read_file(&path, node, &mut chunker, sink, stats);
                        readahead
                            .consumed
                            .fetch_add(ReadAhead::share(size), Relaxed);
                        let fatal = matches!(result, FileResult::Fatal(_));
                        results.push(result);
                        if fatal {
                            break;
                        }
                    }
                    let _ = job.reply.send(results);
                }
            });
        }
        for _ in 0..warm::THREADS {
            let warm_queue = &warm_queue;
            scope.spawn(move || warm::run(warm_queue));
        }
        for _ in 0..READAHEAD_THREADS {
            let readahead = &readahead;
            scope.spawn(move || readahead.run());
        }
        drop(job_rx);
        let assembler = {
            let warnings = &warnings;
            scope.spawn(move || assemble(sink, event_rx, warnings))
        };
        let mut walker = Walker {
            sink,
            opts,
            stats,
            jobs: job_tx,
            batch: None,
            warmer,
            readahead: readahead_tx,
            events: event_tx,
            outbox: Vec::with_capacity(EVENT_BATCH),
            names: NameCache::default(),
            warnings: &warnings,
        };
        let walked = walker
            .virtual_dir(Path::new("/"), &root, parent.as_mut(), None)
            .and_then(|()| walker.send_events());
        drop(walker); // closes both queues: workers and the assembler finish and exit
        let assembled = assembler.join().expect("assembler thread");
        match (assembled, walked) {
            (Ok(root), Ok(())) => Ok(root),
            // Whichever stopped first reports `Interrupted`; the other has the cause.
            (Err(WalkError::Interrupted), Err(e)) | (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        }
    })?;
    Ok(WalkOutcome {
        root,
        warnings: warnings.into_inner().expect("warnings"),
    })
}

/// Files queued for reading; each holds a path and a node, so memory stays small.
const JOB_QUEUE: usize = 256;
/// Walk events ahead of the assembler: lets the walker run past a directory whose
/// files are still being read.
const EVENT_QUEUE: usize = 8192;
/// Threads asking the kernel to read the contents of queued files ahead of the
/// workers, and how far ahead they may go (bytes asked for but not yet read by a worker).
/// A worker reading a cold small file waits for the disk one request at a time; with
/// the read-ahead its read finds the pages in memory (a cold full backup of many small
/// files is otherwise mostly that wait). Page cache, not process memory, holds them.
const READAHEAD_THREADS: usize = 2;
const READAHEAD_WINDOW: u64 = 64 * 1024 * 1024;
/// Per file at most: beyond this the kernel's own sequential read-ahead keeps up.
const READAHEAD_PER_FILE: u64 = 8 * 1024 * 1024;

/// Events travel in batches: one per entry cost two thread wake-ups per file even
/// when nothing had changed (a quarter of an unchanged backup's time).
const EVENT_BATCH: usize = 512;

/// Entries the walker takes between handing warming jobs to their threads.
const FEED_EVERY: usize = 64;

/// What the walker tells the assembler, in walk order.
enum Event {
    /// A directory's entries follow; `path` names it in warnings.
    Open { path: PathBuf },
    /// One entry of the open directory; its content is still being read if `pending`.
    Entry {
        node: Node,
        pending: Option<Pending>,
    },
    /// The open directory is complete; `node` is its own node in its parent (none for
    /// the root).
    Close { node: Option<Node> },
}

/// Entries of an open directory the assembler holds before it waits for the oldest's
/// content: past them, entries go into the directory's pages as they are settled, so a
/// directory of millions of files costs a page, not its listing.
const HOLD_ENTRIES: usize = 4096;

/// An open directory in the assembler.
struct Frame {
    path: PathBuf,
    /// Entries not settled yet, in name order.
    entries: VecDeque<(Node, Option<Pending>)>,
    /// Results of the file batch being settled.
    batch: VecDeque<FileResult>,
    pager: Pager,
}

impl Frame {
    /// Settles the oldest entry: waits for its content if it is being read, then adds
    /// it to the directory's pages (a file that could not be read is left out).
    fn settle_one(
        &mut self,
        sink: &dyn Sink,
        warnings: &Mutex<Vec<Warning>>,
    ) -> Result<(), WalkError> {
        let Some((node, pending)) = self.entries.pop_front() else {
            return Ok(());
        };
        let node = match pending {
            None => node,
            Some(pending) => {
                // A worker that stopped early (its sink failed) sends fewer results, or
                // none: the walk is over either way.
                if let Pending::First(rx) = pending {
                    self.batch = rx.recv().map_err(|_| WalkError::Interrupted)?.into();
                }
                let file = self.path.join(std::ffi::OsStr::from_bytes(&node.name));
                match self.batch.pop_front().ok_or(WalkError::Interrupted)? {
                    FileResult::Read { node, warning } => {
                        if let Some(w) = warning {
                            push_warning(warnings, &file, w);
                        }
                        *node
                    }
                    FileResult::Skipped(msg) => {
                        push_warning(warnings, &file, msg);
                        return Ok(());
                    }
                    FileResult::Fatal(e) => return Err(e.into()),
                }
            }
        };
        self.pager.push(&node, &mut |b| sink.offer_tree(b))?;
        Ok(())
    }
}

/// Where an entry's file content will come from: files are read in batches (up to
/// [`BATCH_FILES`] small files of one directory per job), so a tree of small files
/// does not cost a queue round trip and two thread wake-ups per file.
enum Pending {
    /// The first file of a batch: the batch's results arrive here, in order.
    First(mpsc::Receiver<Vec<FileResult>>),
    /// A later file of the batch begun by the last `First` in the same directory.
    Next,
}

/// Files per batch, at most.
const BATCH_FILES: usize = 64;
/// Bytes per batch, at most (a larger file is a batch of its own).
const BATCH_BYTES: u64 = 4 * 1024 * 1024;

/// Builds trees bottom-up from the walker's events, waiting for file contents as
/// needed; returns the root tree.
fn assemble(
    sink: &dyn Sink,
    events: mpsc::Receiver<Vec<Event>>,
    warnings: &Mutex<Vec<Warning>>,
) -> Result<TreeId, WalkError> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut root = None;
    for event in events.into_iter().flatten() {
        match event {
            Event::Open { path } => stack.push(Frame {
                path,
                entries: VecDeque::new(),
                batch: VecDeque::new(),
                pager: Pager::new(),
            }),
            Event::Entry { node, pending } => {
                let frame = stack.last_mut().expect("entry inside a directory");
                frame.entries.push_back((node, pending));
                if frame.entries.len() > HOLD_ENTRIES {
                    frame.settle_one(sink, warnings)?;
                }
            }
            Event::Close { node } => {
                let mut frame = stack.pop().expect("close of an open directory");
                while !frame.entries.is_empty() {
                    frame.settle_one(sink, warnings)?;
                }
                let id = frame.pager.finish(&mut |b| sink.offer_tree(b))?;
                match node {
                    Some(mut dir) => {
                        dir.subtree = Some(id);
                        stack
                            .last_mut()
                            .expect("a directory inside a directory")
                            .entries
                            .push_back((dir, None));
                    }
                    None => root = Some(id),
                }
            }
        }
    }
    root.ok_or(WalkError::Interrupted)
}

fn push_warning(warnings: &Mutex<Vec<Warning>>, path: &Path, message: impl Into<String>) {
    let w = Warning {
        path: path.display().to_string(),
        message: message.into(),
    };
    tracing::warn!(path = %w.path, "{}", w.message);
    warnings.lock().expect("warnings").push(w);
}

/// The directory structure above the backup paths.
#[derive(Debug, Default)]
struct VirtualDir {
    children: BTreeMap<Vec<u8>, VirtualEntry>,
}

#[derive(Debug)]
enum VirtualEntry {
    /// A backup path: walked in full.
    Walk,
    /// A directory on the way to backup paths.
    Dir(VirtualDir),
}

fn virtual_root(paths: &[PathBuf]) -> Result<VirtualDir, WalkError> {
    let mut root = VirtualDir::default();
    let mut walk_root = false;
    for p in paths {
        let abs = if p.is_absolute() {
            p.clone()
        } else {
            std::env::current_dir()
                .map_err(|_| WalkError::Relative(p.clone()))?
                .join(p)
        };
        fs::symlink_metadata(&abs).map_err(|source| WalkError::BadPath {
            path: abs.clone(),
            source,
        })?;
        // Resolve symlinks above the last component, keep the last as it is.
        let canonical = |p: &Path| {
            fs::canonicalize(p).map_err(|source| WalkError::BadPath {
                path: p.to_path_buf(),
                source,
            })
        };
        // Resolve `..` and symlinks above the last component; keep the last as it is
        // (a symlink given as a backup path is backed up as a symlink).
        let resolved = match (abs.parent(), abs.file_name()) {
            (Some(parent), Some(name)) => canonical(parent)?.join(name),
            _ => canonical(&abs)?,
        };
        let comps: Vec<Vec<u8>> = resolved
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.as_bytes().to_vec()),
                _ => None,
            })
            .collect();
        if comps.is_empty() {
            walk_root = true;
            continue;
        }
        let mut dir = &mut root;
        for (i, c) in comps.iter().enumerate() {
            let last = i + 1 == comps.len();
            let entry = dir.children.entry(c.clone()).or_insert_with(|| {
                if last {
                    VirtualEntry::Walk
                } else {
                    VirtualEntry::Dir(VirtualDir::default())
                }
            });
            match entry {
                VirtualEntry::Walk => break, // an ancestor is walked in full already
                VirtualEntry::Dir(d) if last => {
                    let _ = d;
                    *entry = VirtualEntry::Walk;
                    break;
                }
                VirtualEntry::Dir(d) => dir = d,
            }
        }
    }
    if walk_root {
        let mut only = VirtualDir::default();
        only.children.insert(Vec::new(), VirtualEntry::Walk);
        return Ok(only);
    }
    Ok(root)
}

/// Asks the kernel to read files ahead of the workers (`posix_fadvise(WILLNEED)`), in
/// the order the workers will read them, staying at most [`READAHEAD_WINDOW`] ahead.
struct ReadAhead {
    queue: Mutex<mpsc::Receiver<Vec<(PathBuf, u64)>>>,
    /// Bytes asked for so far, and bytes of the same files the workers are done with
    /// (each file counts `min(size, READAHEAD_PER_FILE)` on both sides, read or not).
    issued: AtomicU64,
    consumed: AtomicU64,
    /// Set when the walk ends, however it ends: a read-ahead thread waiting for the
    /// workers to catch up then stops instead of waiting for ever.
    done: std::sync::atomic::AtomicBool,
}

impl ReadAhead {
    fn share(size: u64) -> u64 {
        size.min(READAHEAD_PER_FILE)
    }

    fn run(&self) {
        loop {
            let files = match self.queue.lock().expect("read-ahead queue").recv() {
                Ok(files) => files,
                Err(_) => return,
            };
            for (path, size) in files {
                let len = Self::share(size);
                if len == 0 {
                    continue;
                }
                // Bounded by `done`; 2 ms naps cost nothing next to a disk read.
                while self.issued.load(Relaxed) > self.consumed.load(Relaxed) + READAHEAD_WINDOW {
                    if self.done.load(Relaxed) {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                self.issued.fetch_add(len, Relaxed);
                if let Ok(file) = open_noatime(&path) {
                    #[cfg(target_os = "linux")]
                    unsafe {
                        use std::os::fd::AsRawFd;
                        libc::posix_fadvise(
                            file.as_raw_fd(),
                            0,
                            len as libc::off_t,
                            libc::POSIX_FADV_WILLNEED,
                        );
                    }
                }
            }
        }
    }
}

/// Sets [`ReadAhead::done`] when dropped, also when the walk unwinds.
struct ReadAheadDone<'a>(&'a ReadAhead);

impl Drop for ReadAheadDone<'_> {
    fn drop(&mut self) {
        self.0.done.store(true, Relaxed);
    }
}

/// The batch of files being gathered.
struct Batch {
    files: Vec<(PathBuf, Node)>,
    bytes: u64,
    reply: mpsc::Sender<Vec<FileResult>>,
}

/// Files of one directory for one worker; results go back in the same order.
struct Job {
    files: Vec<(PathBuf, Node)>,
    reply: mpsc::Sender<Vec<FileResult>>,
}

enum FileResult {
    Read {
        node: Box<Node>,
        warning: Option<String>,
    },
    Skipped(String),
    Fatal(SinkError),
}

struct Walker<'a> {
    sink: &'a dyn Sink,
    opts: &'a BackupOptions,
    stats: &'a WalkStats,
    jobs: mpsc::SyncSender<Job>,
    batch: Option<Batch>,
    warmer: Warmer,
    readahead: mpsc::SyncSender<Vec<(PathBuf, u64)>>,
    events: mpsc::SyncSender<Vec<Event>>,
    outbox: Vec<Event>,
    names: NameCache,
    warnings: &'a Mutex<Vec<Warning>>,
}

impl Walker<'_> {
    fn warn(&mut self, path: &Path, message: impl Into<String>) {
        push_warning(self.warnings, path, message);
    }

    fn emit(&mut self, event: Event) -> Result<(), WalkError> {
        if matches!(event, Event::Close { .. } | Event::Open { .. }) {
            self.flush_batch()?;
        }
        self.outbox.push(event);
        if self.outbox.len() >= EVENT_BATCH {
            self.send_events()?;
        }
        Ok(())
    }

    fn send_events(&mut self) -> Result<(), WalkError> {
        self.flush_batch()?;
        let events = std::mem::replace(&mut self.outbox, Vec::with_capacity(EVENT_BATCH));
        // A closed queue means the assembler stopped on an error, which it reports.
        self.events.send(events).map_err(|_| WalkError::Interrupted)
    }

    fn excluded(&self, path: &Path, name: &[u8]) -> bool {
        excluded(&self.opts.excludes, path, name)
    }

    /// A directory above the backup paths (or the virtual root, when `own` is None).
    fn virtual_dir(
        &mut self,
        path: &Path,
        dir: &VirtualDir,
        mut parent: Option<&mut ParentDir>,
        own: Option<Node>,
    ) -> Result<(), WalkError> {
        // The "/" backup path: its listing is the root tree itself.
        if let Some(VirtualEntry::Walk) = dir.children.get(&Vec::new()) {
            let meta = fs::symlink_metadata("/").map_err(|source| WalkError::BadPath {
                path: "/".into(),
                source,
            })?;
            return self.listed_dir(Path::new("/"), parent, meta.dev(), None);
        }
        self.emit(Event::Open {
            path: path.to_path_buf(),
        })?;
        let sink = self.sink;
        for (name, entry) in &dir.children {
            let child = path.join(std::ffi::OsStr::from_bytes(name));
            let parent_node = parent.as_deref_mut().and_then(|p| p.find(sink, name));
            let meta = fs::symlink_metadata(&child).map_err(|source| WalkError::BadPath {
                path: child.clone(),
                source,
            })?;
            match entry {
                VirtualEntry::Walk => {
                    let device = meta.dev();
                    self.entry(&child, name, meta, parent_node, device)?
                }
                VirtualEntry::Dir(sub) => {
                    let mut node = node_from_metadata(name, &meta, &mut self.names);
                    node.xattrs = read_xattrs(&child).unwrap_or_default();
                    self.stats.dirs.fetch_add(1, Relaxed);
                    let mut parent_sub = self.parent_subtree(parent_node);
                    self.virtual_dir(&child, sub, parent_sub.as_mut(), Some(node))?;
                }
            }
        }
        self.emit(Event::Close { node: own })
    }

    /// The parent snapshot's tree for a directory, if it had one.
    fn parent_subtree(&mut self, parent_node: Option<&Node>) -> Option<ParentDir> {
        let id = parent_node
            .filter(|n| n.kind == NodeKind::Dir)
            .and_then(|n| n.subtree)?;
        match self.sink.load_tree(&id) {
            Ok(t) => Some(ParentDir::new(t)),
            Err(e) => {
                tracing::warn!(
                    "parent tree {} unreadable, files below are read again: {e}",
                    id.short()
                );
                None
            }
        }
    }

    /// A directory walked in full; `own` is its node in its parent.
    fn listed_dir(
        &mut self,
        path: &Path,
        mut parent: Option<&mut ParentDir>,
        device: u64,
        own: Option<Node>,
    ) -> Result<(), WalkError> {
        let mut names = Listing::new(None);
        let mut count = 0;
        let mut subdirs = Vec::new();
        let mut cache_tag = false;
        match fs::read_dir(path) {
            Ok(rd) => {
                for e in rd {
                    match e {
                        Ok(e) => {
                            count += 1;
                            // The directory entry's type is free (no stat): enough
                            // to have subdirectories warmed.
                            if e.file_type().is_ok_and(|t| t.is_dir())
                                && subdirs.len() < warm::PENDING
                            {
                                subdirs.push(e.path());
                            }
                            let name = e.file_name();
                            cache_tag |= name == "CACHEDIR.TAG";
                            if let Err(e) = names.push(name.as_bytes()) {
                                self.warn(
                                    path,
                                    format!("its listing is kept in memory, a temporary file for it failed: {e}"),
                                );
                            }
                        }
                        Err(e) => {
                            self.warn(path, format!("listing directory: {e}"));
                            break;
                        }
                    }
                }
            }
            Err(e) => self.warn(path, format!("cannot list directory: {e}")),
        }
        // By name, after the listing is closed: a directory handle held open while
        // the walk descends would cost a descriptor per level of depth.
        if self.opts.exclude_caches && cache_tag && is_cache_dir(path) {
            names = Listing::new(None);
            let _ = names.push(b"CACHEDIR.TAG");
        }
        subdirs.sort_unstable();
        self.warmer.first(subdirs.into_iter().map(Warm::Dir));
        self.emit(Event::Open {
            path: path.to_path_buf(),
        })?;
        let sink = self.sink;
        // A directory too large to be warmed whole ahead of the walk is warmed a batch
        // of names ahead of it.
        let by_names = (count > warm::BATCH).then(|| Arc::new(path.to_path_buf()));
        let mut sorted = names.sorted();
        let mut ahead = VecDeque::new();
        let mut since_feed = 0;
        loop {
            if let Some(dir) = &by_names {
                if ahead.len() < warm::BATCH {
                    let batch: Vec<io::Result<Vec<u8>>> =
                        sorted.by_ref().take(warm::BATCH).collect();
                    let warm: Vec<Vec<u8>> = batch
                        .iter()
                        .filter_map(|n| n.as_ref().ok().cloned())
                        .collect();
                    if !warm.is_empty() {
                        self.warmer
                            .first(std::iter::once(Warm::Names(dir.clone(), warm)));
                    }
                    ahead.extend(batch);
                }
            }
            since_feed += 1;
            if since_feed == FEED_EVERY {
                since_feed = 0;
                self.warmer.feed();
            }
            let next = match by_names {
                Some(_) => ahead.pop_front(),
                None => sorted.next(),
            };
            let Some(name) = next else { break };
            let name = match name {
                Ok(name) => name,
                Err(e) => {
                    self.warn(
                        path,
                        format!("reading back its listing from a temporary file: {e}"),
                    );
                    break;
                }
            };
            let child = path.join(std::ffi::OsStr::from_bytes(&name));
            let meta = match fs::symlink_metadata(&child) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.warn(&child, "vanished before it could be read");
                    continue;
                }
                Err(e) => {
                    self.warn(&child, format!("cannot stat: {e}"));
                    continue;
                }
            };
            let parent_node = parent.as_deref_mut().and_then(|p| p.find(sink, &name));
            self.entry(&child, &name, meta, parent_node, device)?;
        }
        self.emit(Event::Close { node: own })
    }

    /// Emits one entry: a file's content is queued for reading, a directory is walked.
    fn entry(
        &mut self,
        path: &Path,
        name: &[u8],
        meta: Metadata,
        parent_node: Option<&Node>,
        device: u64,
    ) -> Result<(), WalkError> {
        if self.excluded(path, name) {
            return Ok(());
        }
        let mut node = node_from_metadata(name, &meta, &mut self.names);
        match parent_node {
            // Setting or removing an extended attribute changes ctime, so the same
            // inode with the same ctime has the parent's attributes: no need to ask
            // (one system call per entry, a third of an unchanged backup's time).
            Some(p) if p.kind == node.kind && p.inode == node.inode && p.ctime == node.ctime => {
                node.xattrs = p.xattrs.clone()
            }
            _ => match read_xattrs(path) {
                Ok(x) => node.xattrs = x,
                Err(e) => self.warn(path, format!("cannot read extended attributes: {e}")),
            },
        }
        let mut pending = None;
        match node.kind {
            NodeKind::File => {
                self.stats.bytes_total.fetch_add(node.size, Relaxed);
                match parent_node {
                    Some(p) if unchanged(p, &node) => {
                        node.content = p.content.clone();
                        self.stats.files_unchanged.fetch_add(1, Relaxed);
                    }
                    Some(p) if p.kind == NodeKind::File => {
                        self.stats.files_changed.fetch_add(1, Relaxed);
                        pending = Some(self.queue(path, &node)?);
                    }
                    _ => {
                        self.stats.files_new.fetch_add(1, Relaxed);
                        pending = Some(self.queue(path, &node)?);
                    }
                }
            }
            NodeKind::Dir => {
                self.stats.dirs.fetch_add(1, Relaxed);
                if self.opts.one_file_system && meta.dev() != device {
                    // A mount point: recorded, not entered.
                    let id = self.sink.offer_tree(Tree::default().encode())?;
                    node.subtree = Some(id);
                } else {
                    let mut parent = self.parent_subtree(parent_node);
                    return self.listed_dir(path, parent.as_mut(), meta.dev(), Some(node));
                }
            }
            NodeKind::Symlink => {
                self.stats.others.fetch_add(1, Relaxed);
                match fs::read_link(path) {
                    Ok(t) => node.target = t.as_os_str().as_bytes().to_vec(),
                    Err(e) => {
                        self.warn(path, format!("cannot read symlink: {e}"));
                        return Ok(());
                    }
                }
            }
            _ => {
                self.stats.others.fetch_add(1, Relaxed);
            }
        }
        self.emit(Event::Entry { node, pending })
    }

    /// Adds a file to the current batch, or starts a new one.
    fn queue(&mut self, path: &Path, node: &Node) -> Result<Pending, WalkError> {
        let entry = (path.to_path_buf(), node.clone());
        if let Some(batch) = &mut self.batch {
            if batch.files.len() < BATCH_FILES && batch.bytes + node.size <= BATCH_BYTES {
                batch.bytes += node.size;
                batch.files.push(entry);
                return Ok(Pending::Next);
            }
        }
        self.flush_batch()?;
        let (tx, rx) = mpsc::channel();
        self.batch = Some(Batch {
            files: vec![entry],
            bytes: node.size,
            reply: tx,
        });
        if node.size > BATCH_BYTES {
            self.flush_batch()?;
        }
        Ok(Pending::First(rx))
    }

    /// Sends the current batch to the workers. Called before a directory closes and
    /// before the walk descends, so a batch never spans directories.
    fn flush_batch(&mut self) -> Result<(), WalkError> {
        if let Some(b) = self.batch.take() {
            // Never waits: when the read-ahead is behind, these files are read cold.
            let _ = self
                .readahead
                .try_send(b.files.iter().map(|(p, n)| (p.clone(), n.size)).collect());
            let job = Job {
                files: b.files,
                reply: b.reply,
            };
            self.jobs.send(job).map_err(|_| WalkError::Interrupted)?;
        }
        Ok(())
    }
}

/// The parent snapshot's listing of a directory. A page of it that cannot be read
/// counts as empty: its files are read again.
struct ParentDir(Lookup);

impl ParentDir {
    fn new(blob: TreeBlob) -> Self {
        ParentDir(Lookup::new(blob))
    }

    fn find(&mut self, sink: &dyn Sink, name: &[u8]) -> Option<&Node> {
        self.0
            .find(name, |id| sink.load_tree(id))
            .unwrap_or_else(|e| {
                tracing::warn!(
                    "a page of a parent tree is unreadable, its files are read again: {e}"
                );
                None
            })
    }
}

impl From<PageError> for SinkError {
    fn from(e: PageError) -> Self {
        SinkError::new(e)
    }
}

/// A file is not read again when its type, size, mtime, ctime and inode match the
/// parent, unless the parent's copy was read while the file changed (its metadata then
/// describes a state the content may not be).
fn unchanged(parent: &Node, now: &Node) -> bool {
    parent.kind == NodeKind::File
        && !parent.flags.contains(NodeFlags::CHANGED_WHILE_READ)
        && parent.size == now.size
        && parent.mtime == now.mtime
        && parent.ctime == now.ctime
        && parent.inode == now.inode
}

fn is_cache_dir(dir: &Path) -> bool {
    const SIGNATURE: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55";
    let mut buf = [0u8; 43];
    match File::open(dir.join("CACHEDIR.TAG")) {
        Ok(mut f) => io::Read::read_exact(&mut f, &mut buf).is_ok() && buf == SIGNATURE,
        Err(_) => false,
    }
}

const READ_ATTEMPTS: usize = 3;

/// Reads and chunks one file. A file that changes while it is read is read again; one
/// that keeps changing is stored as last read, with a warning.
///
/// "Changed" compares the `fstat` after reading with the state before it: the walker's
/// `lstat` for the first attempt (which also catches a file replaced between the two),
/// the previous attempt's `fstat` after that.
fn read_file(
    path: &Path,
    expected: Node,
    chunker: &mut Chunker,
    sink: &dyn Sink,
    stats: &WalkStats,
) -> FileResult {
    let mut before = (
        expected.inode,
        expected.size,
        expected.mtime,
        expected.ctime,
    );
    for attempt in 0..READ_ATTEMPTS {
        let file = match open_for_backup(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return FileResult::Skipped("vanished before it could be read".into())
            }
            Err(e) => return FileResult::Skipped(format!("cannot open: {e}")),
        };
        // Sized from st_size, which any user controls: capped.
        let mut content = Vec::with_capacity((before.1 / (1 << 20) + 1).min(1024) as usize);
        let mut sink_error = None;
        let read = chunker.chunk(&file, |plain| match sink.offer_chunk(plain) {
            Ok(id) => {
                content.push(id);
                Ok(())
            }
            Err(e) => {
                sink_error = Some(e);
                Err(io::Error::other("sink failed"))
            }
        });
        if let Some(e) = sink_error {
            return FileResult::Fatal(e);
        }
        let read = match read {
            Ok(n) => n,
            Err(e) => return FileResult::Skipped(format!("read error: {e}")),
        };
        stats.bytes_read.fetch_add(read, Relaxed);
        let after = match file.metadata() {
            Ok(m) if m.is_file() => m,
            Ok(_) => {
                return FileResult::Skipped("was replaced by something other than a file".into())
            }
            Err(e) => return FileResult::Skipped(format!("cannot stat: {e}")),
        };
        let now = (
            after.ino(),
            after.len(),
            Timestamp {
                sec: after.mtime(),
                nsec: after.mtime_nsec() as u32,
            },
            Timestamp {
                sec: after.ctime(),
                nsec: after.ctime_nsec() as u32,
            },
        );
        if after.ino() != expected.inode || after.dev() != expected.device {
            // Not the file the walker saw (renamed over, or a directory above it was
            // swapped): its metadata is unknown here, so it waits for the next backup.
            return FileResult::Skipped(
                "was replaced while the backup ran; it is left for the next backup".into(),
            );
        }
        let stable = read == after.len() && now == before;
        if stable || attempt + 1 == READ_ATTEMPTS {
            let mut node = expected;
            (node.inode, node.mtime, node.ctime) = (now.0, now.2, now.3);
            // The size is what was read, whatever the file's length is now: content,
            // chunks and size must agree, or the snapshot cannot be restored.
            node.size = read;
            node.content = content;
            let warning = (!stable).then(|| {
                node.flags.insert(NodeFlags::CHANGED_WHILE_READ);
                format!("changed while being read {READ_ATTEMPTS} times; stored as last read ({read} bytes), which may mix two states of the file; the next backup reads it again")
            });
            return FileResult::Read {
                node: Box::new(node),
                warning,
            };
        }
        before = now;
    }
    unreachable!("the last attempt returns")
}

/// Opens a file to back it up: without following a symlink, without blocking if it
/// has been replaced by a fifo, without updating its atime where allowed, and with
/// sequential read-ahead.
fn open_for_backup(path: &Path) -> io::Result<File> {
    let file = open_noatime(path)?;
    #[cfg(target_os = "linux")]
    unsafe {
        use std::os::fd::AsRawFd;
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
    Ok(file)
}

fn open_noatime(path: &Path) -> io::Result<File> {
    let noatime = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    match noatime {
        // O_NOATIME is only allowed to the file's owner (or root).
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;

    /// Keeps blobs in memory; fails once `fail_after` chunks were offered.
    struct MemSink {
        blobs: Mutex<HashMap<[u8; 32], Vec<u8>>>,
        chunks: AtomicUsize,
        fail_after: usize,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("disk full on the test sink")]
    struct Full;

    impl Sink for MemSink {
        fn load_tree(&self, id: &TreeId) -> Result<TreeBlob, SinkError> {
            let blobs = self.blobs.lock().unwrap();
            Ok(TreeBlob::decode(&blobs[&id.0]).unwrap())
        }
        fn offer_chunk(&self, plain: Vec<u8>) -> Result<ChunkId, SinkError> {
            if self.chunks.fetch_add(1, Relaxed) >= self.fail_after {
                return Err(SinkError::new(Full));
            }
            let id = ChunkId::of(&plain);
            self.blobs.lock().unwrap().insert(id.0, plain);
            Ok(id)
        }
        fn offer_tree(&self, encoded: Vec<u8>) -> Result<TreeId, SinkError> {
            let id = TreeId::of(&encoded);
            self.blobs.lock().unwrap().insert(id.0, encoded);
            Ok(id)
        }
    }

    fn sink(fail_after: usize) -> MemSink {
        MemSink {
            blobs: Mutex::new(HashMap::new()),
            chunks: AtomicUsize::new(0),
            fail_after,
        }
    }

    fn opts(path: &Path) -> BackupOptions {
        BackupOptions {
            paths: vec![path.to_path_buf()],
            excludes: vec![],
            exclude_caches: false,
            one_file_system: false,
            threads: 3,
            chunker: ChunkerParams {
                min_size: 64,
                avg_size: 256,
                max_size: 1024,
                seed: 1,
            },
            parent: None,
        }
    }

    /// A tree of 20 directories with 100 small files each (many batches) and a few
    /// larger files (batches of their own).
    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for d in 0..20 {
            let sub = dir.path().join(format!("d{d:02}"));
            fs::create_dir(&sub).unwrap();
            for f in 0..100 {
                fs::write(
                    sub.join(format!("f{f:03}")),
                    format!("{d}/{f}").repeat(f + 1),
                )
                .unwrap();
            }
        }
        fs::write(dir.path().join("big"), vec![7u8; 5 * 1024 * 1024]).unwrap();
        dir
    }

    /// The tree under `id` as (path, content) pairs.
    fn files(sink: &MemSink, id: TreeId, prefix: &str, out: &mut Vec<(String, Vec<u8>)>) {
        for n in sink
            .load_tree(&id)
            .unwrap()
            .as_nodes()
            .unwrap()
            .nodes
            .clone()
        {
            let path = format!("{prefix}/{}", String::from_utf8_lossy(&n.name));
            match n.subtree {
                Some(sub) => files(sink, sub, &path, out),
                None => {
                    let blobs = sink.blobs.lock().unwrap();
                    out.push((
                        path,
                        n.content.iter().flat_map(|c| blobs[&c.0].clone()).collect(),
                    ));
                }
            }
        }
    }

    #[test]
    fn walks_every_file_in_order_with_its_content() {
        let dir = fixture();
        let s = sink(usize::MAX);
        let stats = WalkStats::default();
        let out = backup(&s, &opts(dir.path()), &stats).unwrap();
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        let mut got = Vec::new();
        files(&s, out.root, "", &mut got);
        let base = dir.path().display().to_string();
        let mut expected: Vec<(String, Vec<u8>)> =
            vec![(format!("{base}/big"), vec![7u8; 5 * 1024 * 1024])];
        for d in 0..20 {
            for f in 0..100 {
                expected.push((
                    format!("{base}/d{d:02}/f{f:03}"),
                    format!("{d}/{f}").repeat(f + 1).into_bytes(),
                ));
            }
        }
        expected.sort();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "walked files differ from the fixture");
        assert_eq!(stats.files_new.load(Relaxed), 2001);
    }

    #[test]
    fn a_file_replaced_after_the_walker_saw_it_is_skipped_not_mislabelled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"old").unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        let seen = crate::meta::node_from_metadata(b"f", &meta, &mut NameCache::default());
        // Renamed over by another file after the walker's lstat.
        let tmp = dir.path().join("f.new");
        fs::write(&tmp, b"new content").unwrap();
        fs::rename(&tmp, &path).unwrap();
        let s = sink(usize::MAX);
        let mut chunker = Chunker::new(opts(dir.path()).chunker);
        match read_file(&path, seen.clone(), &mut chunker, &s, &WalkStats::default()) {
            FileResult::Skipped(msg) => {
                assert!(msg.contains("was replaced while the backup ran"), "{msg}")
            }
            _ => panic!("a replaced file must be skipped"),
        }
        // The same file, unchanged since the lstat, is read.
        let meta = fs::symlink_metadata(&path).unwrap();
        let seen = crate::meta::node_from_metadata(b"f", &meta, &mut NameCache::default());
        match read_file(&path, seen.clone(), &mut chunker, &s, &WalkStats::default()) {
            FileResult::Read { node, warning } => {
                assert!(warning.is_none());
                assert_eq!(node.size, 11);
            }
            _ => panic!("an unchanged file must be read"),
        }
    }

    #[test]
    fn dot_dot_in_a_backup_path_is_resolved() {
        let dir = fixture();
        let s = sink(usize::MAX);
        let odd = dir.path().join("d03").join("..").join("d04");
        let out = backup(&s, &opts(&odd), &WalkStats::default()).unwrap();
        let mut got = Vec::new();
        files(&s, out.root, "", &mut got);
        assert_eq!(got.len(), 100);
        let want = format!("{}/d04/f000", dir.path().canonicalize().unwrap().display());
        assert_eq!(got[0].0, want);
    }

    #[test]
    fn a_failing_sink_stops_the_walk_with_its_own_error() {
        let dir = fixture();
        for fail_after in [0, 10, 500] {
            let s = sink(fail_after);
            let err = backup(&s, &opts(dir.path()), &WalkStats::default()).unwrap_err();
            assert_eq!(
                err.to_string(),
                "disk full on the test sink",
                "after {fail_after} chunks"
            );
        }
    }

    /// A directory of more files than a page holds: written in pages, read back whole,
    /// and walked again against its paged parent, where one changed file and one added
    /// before all the others write two pages and the index again.
    #[test]
    fn a_large_directory_is_walked_in_pages_against_a_paged_parent() {
        let dir = tempfile::tempdir().unwrap();
        let n = 2 * crate::tree::PAGE_MAX + 1000;
        for i in 0..n {
            fs::write(dir.path().join(format!("m{i:06}")), format!("{i}")).unwrap();
        }
        let s = sink(usize::MAX);
        let stats = WalkStats::default();
        let first = backup(&s, &opts(dir.path()), &stats).unwrap().root;
        let mut out = Vec::new();
        let path = dir.path().display().to_string();
        let top = find_dir(&s, first, &path);
        let TreeBlob::Pages(pages) = s.load_tree(&top).unwrap() else {
            panic!("not paged")
        };
        assert!(pages.pages.len() >= 3, "{pages:?}");
        files_paged(&s, top, "", &mut out);
        assert_eq!(out.len(), n);
        let before: std::collections::HashSet<[u8; 32]> =
            s.blobs.lock().unwrap().keys().copied().collect();

        fs::write(dir.path().join("m020000"), "changed").unwrap();
        fs::write(dir.path().join("a-new"), "new").unwrap();
        let stats = WalkStats::default();
        let mut o = opts(dir.path());
        o.parent = Some(first);
        backup(&s, &o, &stats).unwrap();
        assert_eq!(stats.files_unchanged.load(Relaxed), n as u64 - 1);
        let new_trees = s
            .blobs
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, b)| !before.contains(*k) && crate::tree::TreeBlob::decode(b).is_ok())
            .count();
        // Two pages, and the trees of the directory (its index) and of those above it.
        assert_eq!(new_trees, 2 + dir.path().components().count());
    }

    fn find_dir(sink: &MemSink, root: TreeId, path: &str) -> TreeId {
        let mut id = root;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            let t = sink.load_tree(&id).unwrap();
            id = t
                .as_nodes()
                .unwrap()
                .find(c.as_bytes())
                .unwrap()
                .subtree
                .unwrap();
        }
        id
    }

    fn files_paged(sink: &MemSink, id: TreeId, prefix: &str, out: &mut Vec<String>) {
        crate::tree::for_each_page(
            sink.load_tree(&id).unwrap(),
            |id| Ok::<_, SinkError>(sink.load_tree(id).unwrap()),
            |page| {
                for n in page.nodes {
                    out.push(format!("{prefix}/{}", String::from_utf8_lossy(&n.name)));
                }
                Ok(())
            },
        )
        .unwrap();
    }
}
