//! The restorer: writes a snapshot's trees and chunks back to a filesystem.
//!
//! It is shared by `haul-pbs restore` (reading the repository in-process) and
//! `haul-agent restore` (reading from a read-only server); where blobs come from is the
//! [`BlobSource`]'s business. Every chunk's BLAKE3 is checked before it is written.
//!
//! Safety: everything is written into a fresh staging directory beside the target and
//! renamed into place only when complete, so a failed restore leaves the target as it
//! was. Tree names are validated ([`crate::tree::valid_name`]) and entries are created
//! with `O_EXCL`/`O_NOFOLLOW` in directories the restorer itself made, so no crafted
//! tree can write outside the target through `..` or a symlink.
//!
//! Damage: a file whose chunk is missing or damaged (or whose chunks do not add up to
//! its recorded size), and a directory whose listing cannot be read, are not restored:
//! nothing is left under their names, each is reported as [`ProblemKind::NotRestored`]
//! with its reason, and everything else is restored (as restic and borg do). Only a
//! failure of the source itself (a connection gone) or of the target (a full disk)
//! ends a restore.
//!
//! Holes: a file is restored as allocated as it was. Only a file recorded as sparse
//! ([`NodeFlags::SPARSE`]) gets its long zero runs back as holes: a preallocated file
//! (a database's write-ahead log) must not come back sparse.
//!
//! Memory: one chunk per worker, plus one small record per directory (its metadata is
//! applied after its contents, so its mtime sticks).

use crate::id::{ChunkId, TreeId};
use crate::meta::{self, NameCache};
use crate::tree::{find_node, read_page, Node, NodeFlags, NodeKind, PageError, Pages, TreeBlob};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Mutex};

/// Where the restorer gets trees and chunks.
pub trait BlobSource: Sync {
    /// A directory's tree: its nodes, or the pages of a large one (and then each page).
    fn load_tree(&self, id: &TreeId) -> Result<TreeBlob, SourceError>;
    /// The plaintext of a chunk. The restorer verifies its BLAKE3.
    fn load_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, SourceError>;
    /// These chunks, of `bytes` bytes in all, will be loaded soon, in this order (a
    /// file was just queued for writing). A remote source fetches them ahead; the
    /// default does nothing.
    fn will_need(&self, _ids: &[ChunkId], _bytes: u64) {}
    /// These trees are read from elsewhere (a standby copy's own): a remote source
    /// does not fetch them ahead. The default does nothing.
    fn held_trees(&self, _ids: std::sync::Arc<std::collections::HashSet<TreeId>>) {}
    /// [`BlobSource::will_need`], each chunk with chunks the caller holds (see
    /// [`BlobSource::load_chunk_from`]) that it may come as a delta against.
    fn will_need_from(&self, ids: &[(ChunkId, Vec<ChunkId>)], bytes: u64) {
        let ids: Vec<ChunkId> = ids.iter().map(|(id, _)| *id).collect();
        self.will_need(&ids, bytes)
    }
    /// [`BlobSource::load_chunk`] of a chunk that may come as a delta against a chunk
    /// `held` has (a remote source then sends what differs).
    fn load_chunk_from(
        &self,
        id: &ChunkId,
        _held: &dyn HeldChunks,
    ) -> Result<Vec<u8>, SourceError> {
        self.load_chunk(id)
    }
}

/// Chunks the caller holds, each checked against its id when read.
pub trait HeldChunks: Sync {
    fn read(&self, id: &ChunkId) -> Option<Vec<u8>>;
}

/// What a standby push adds to the restorer's walk (see [`crate::standby`]): files it
/// can take from the copy being replaced, and the record of the new one. Files are
/// numbered in walk order; each numbered file is then either made by
/// [`Reuse::file`], or written ([`Reuse::written`]) or given up ([`Reuse::failed`])
/// by a writer.
pub(crate) trait Reuse: Sync {
    /// File `seq` (one link), about to be restored at `path`: true if this made it.
    fn file(&self, seq: u64, path: &Path, node: &Node) -> Result<bool, RestoreError>;
    /// A writer wrote file `seq`; its chunks were `lens` bytes long.
    fn written(&self, seq: u64, lens: &[u32]);
    /// File `seq` could not be restored (it is not there).
    fn failed(&self, seq: u64);
}

/// A failure of the blob source.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct SourceError {
    pub error: Box<dyn std::error::Error + Send + Sync>,
    pub scope: FailureScope,
}

/// How much a [`SourceError`] takes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureScope {
    /// This one blob cannot be had (missing, damaged): the entries that need it are
    /// not restored, the rest is.
    Blob,
    /// The source itself failed (a connection closed): the restore ends.
    Source,
}

impl SourceError {
    /// The source failed: nothing more can be read from it.
    pub fn new<E: std::error::Error + Send + Sync + 'static>(e: E) -> Self {
        SourceError {
            error: Box::new(e),
            scope: FailureScope::Source,
        }
    }
    /// One blob is missing or damaged; others can still be read.
    pub fn blob<E: std::error::Error + Send + Sync + 'static>(e: E) -> Self {
        SourceError {
            error: Box::new(e),
            scope: FailureScope::Blob,
        }
    }
}

/// A page not what its index says is a damaged blob: the entries it should hold are
/// not restored, the rest is.
impl From<PageError> for SourceError {
    fn from(e: PageError) -> Self {
        SourceError::blob(e)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("restore target {0} exists and is not an empty directory; choose a new or empty one, or restore into it with --overwrite if-changed (or always, or never)")]
    TargetNotEmpty(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("chunk {id} of {path} is corrupt: its content hashes to {actual}")]
    ChunkMismatch {
        id: ChunkId,
        actual: ChunkId,
        path: PathBuf,
    },
    #[error("{path}: restored {actual} bytes but the snapshot records {expected}")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("include path {0:?} is not in the snapshot")]
    IncludeNotFound(String),
    #[error(transparent)]
    Source(#[from] SourceError),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writer threads when none are asked for: four per CPU, 4 to 16. A restoring thread
/// spends most of its time in the kernel (allocating page cache, ext4's block and
/// inode work, metadata calls), not computing, so more threads than CPUs keep the
/// CPUs busy. Measured on 2 CPUs, 1 GiB of `gen_dataset.py` data, caches dropped:
/// 8 threads restore in 4.6-5.0 s through the agent against 5.4-6.6 s with 2, and in
/// 3.5-4.0 s in-process against 4.5 s; the agent's peak RSS grows from 58 to 63 MiB.
pub fn default_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    (4 * cpus).clamp(4, 16)
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub target: PathBuf,
    /// Paths inside the snapshot (like `/srv/www` or `srv/www/index.html`); when not
    /// empty, only these and what lies below them are restored (with their parents).
    pub includes: Vec<String>,
    /// Glob patterns (as a backup's `--exclude`): entries whose path inside the
    /// snapshot, or whose name, matches one are not restored, nor what is below them.
    pub excludes: Vec<glob::Pattern>,
    pub threads: usize,
    /// Into a directory that is not empty: what to overwrite (see
    /// [`crate::in_place`]). `None` refuses such a target.
    pub overwrite: Option<crate::in_place::Overwrite>,
}

#[derive(Debug, Default)]
pub struct RestoreStats {
    pub files: AtomicU64,
    pub dirs: AtomicU64,
    pub others: AtomicU64,
    pub bytes: AtomicU64,
    /// Files of a restore into a non-empty directory left as they were (counted in
    /// `files` too).
    pub kept: AtomicU64,
}

/// A problem that did not stop the restore.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreWarning {
    pub path: String,
    pub kind: ProblemKind,
    pub message: String,
}

/// What a [`RestoreWarning`] means for its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// Nothing was restored under this name (damaged data, a device node without root).
    NotRestored,
}

impl RestoreError {
    /// Whether this error concerns one entry only (its data is damaged or missing),
    /// so that the restore can go on without it.
    fn is_entry_only(&self) -> bool {
        match self {
            RestoreError::ChunkMismatch { .. } | RestoreError::SizeMismatch { .. } => true,
            RestoreError::Source(e) => e.scope == FailureScope::Blob,
            _ => false,
        }
    }
}

fn not_restored(path: &Path, message: impl std::fmt::Display) -> RestoreWarning {
    RestoreWarning {
        path: path.display().to_string(),
        kind: ProblemKind::NotRestored,
        message: message.to_string(),
    }
}

/// Restores the tree `root` into `opts.target`.
pub fn restore(
    source: &dyn BlobSource,
    root: &TreeId,
    opts: &RestoreOptions,
    stats: &RestoreStats,
) -> Result<Vec<RestoreWarning>, RestoreError> {
    let target = &opts.target;
    // The mode the target ends with: an empty target's own, else what a new directory
    // gets under this process's umask.
    let mut final_mode = None;
    let target_existed = match fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => {
            final_mode = Some(m.permissions().mode() & 0o7777);
            if fs::read_dir(target)
                .map_err(io_err(target))?
                .next()
                .is_some()
            {
                return match opts.overwrite {
                    Some(mode) => restore_in_place(source, root, opts, mode, stats),
                    None => Err(RestoreError::TargetNotEmpty(target.clone())),
                };
            }
            true
        }
        Ok(_) => return Err(RestoreError::TargetNotEmpty(target.clone())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => {
            return Err(RestoreError::Io {
                path: target.clone(),
                source: e,
            })
        }
    };
    let includes = checked_includes(source, root, opts)?;
    let staging = staging_path(target);
    // A target in a directory that does not exist yet: made, as restic does.
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    // Only this user can enter the staging directory until the restore is complete: a
    // restored directory may be writable by others (a snapshot of /tmp), and nobody
    // must be able to swap a directory below it for a symlink while files are being
    // written by path (as root, they could then land anywhere).
    let result = staged(source, root, &staging, &includes, opts, stats, None);
    match result {
        Ok(warnings) => {
            let warnings = renamed(warnings, &staging, target);
            let mode = final_mode.unwrap_or_else(|| 0o777 & !umask());
            fs::set_permissions(&staging, fs::Permissions::from_mode(mode))
                .map_err(io_err(&staging))?;
            if target_existed {
                fs::remove_dir(target).map_err(io_err(target))?;
            }
            fs::rename(&staging, target).map_err(io_err(target))?;
            Ok(warnings)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

/// The include paths split into names, each checked to name something in the
/// snapshot (before any work).
fn checked_includes(
    source: &dyn BlobSource,
    root: &TreeId,
    opts: &RestoreOptions,
) -> Result<Vec<Vec<Vec<u8>>>, RestoreError> {
    let includes: Vec<Vec<Vec<u8>>> = opts
        .includes
        .iter()
        .map(|p| {
            p.split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .map(|c| c.as_bytes().to_vec())
                .collect()
        })
        .collect();
    // Every include must name something in the snapshot: checked before any work.
    if !includes.is_empty() {
        let root_tree = source.load_tree(root)?;
        for inc in &includes {
            if !include_exists(source, &root_tree, inc)? {
                return Err(RestoreError::IncludeNotFound(
                    inc.iter()
                        .map(|c| String::from_utf8_lossy(c))
                        .collect::<Vec<_>>()
                        .join("/"),
                ));
            }
        }
    }
    Ok(includes)
}

/// Problems noted under the staging directory's name, named under the target's.
fn renamed(
    mut warnings: Vec<RestoreWarning>,
    staging: &Path,
    target: &Path,
) -> Vec<RestoreWarning> {
    let staged = staging.display().to_string();
    for w in &mut warnings {
        if let Some(rest) = w.path.strip_prefix(&staged) {
            w.path = format!("{}{rest}", target.display());
        }
    }
    warnings
}

/// Makes the staging directory, which only this user can enter until the restore is
/// complete (see [`restore`]), and restores into it what `opts` selects.
fn staged(
    source: &dyn BlobSource,
    root: &TreeId,
    staging: &Path,
    includes: &[Vec<Vec<u8>>],
    opts: &RestoreOptions,
    stats: &RestoreStats,
    reuse: Option<&dyn Reuse>,
) -> Result<Vec<RestoreWarning>, RestoreError> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(staging)
        .map_err(io_err(staging))?;
    restore_into(
        source,
        root,
        staging,
        Selection {
            includes,
            excludes: &opts.excludes,
        },
        opts.threads.max(1),
        stats,
        reuse,
    )
}

/// A restore into the non-empty directory `opts.target` (see [`crate::in_place`]).
fn restore_in_place(
    source: &dyn BlobSource,
    root: &TreeId,
    opts: &RestoreOptions,
    mode: crate::in_place::Overwrite,
    stats: &RestoreStats,
) -> Result<Vec<RestoreWarning>, RestoreError> {
    let includes = checked_includes(source, root, opts)?;
    let target = &opts.target;
    // Inside the target: every rename of the merge stays on its filesystem.
    let area = target.join(format!(".haul-restore-{}", std::process::id()));
    let (staging, trash) = (area.join("new"), area.join("old"));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&area)
        .map_err(io_err(&area))?;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&trash)
        .map_err(io_err(&trash))?;
    let is_root = meta::is_root();
    let keep = crate::in_place::Keep {
        staging: &staging,
        target,
        mode,
        stats,
        is_root,
        names: Mutex::new(NameCache::default()),
        last_dir: Mutex::new(None),
    };
    let reuse = (mode != crate::in_place::Overwrite::Always).then_some(&keep as &dyn Reuse);
    let result =
        staged(source, root, &staging, &includes, opts, stats, reuse).and_then(|warnings| {
            crate::in_place::merge(&staging, target, &trash, &area, mode, is_root)?;
            Ok(renamed(warnings, &staging, target))
        });
    // What was not moved, and the entries replaced.
    crate::standby::open_up(&area);
    if let Err(e) = fs::remove_dir_all(&area) {
        tracing::warn!("removing {}: {e}", area.display());
    }
    result
}

fn include_exists(
    source: &dyn BlobSource,
    root: &TreeBlob,
    path: &[Vec<u8>],
) -> Result<bool, RestoreError> {
    let mut tree = root.clone();
    for (i, comp) in path.iter().enumerate() {
        let Some(node) = find_node(&tree, comp, |id| source.load_tree(id))? else {
            return Ok(false);
        };
        if i + 1 == path.len() {
            return Ok(true);
        }
        match node.subtree {
            Some(id) => tree = source.load_tree(&id)?,
            None => return Ok(false),
        }
    }
    Ok(true)
}

/// This process's umask, read without changing it (Linux 4.7+); 022 when unknown.
pub(crate) fn umask() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

fn staging_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "restore".into());
    let mut staged = name;
    staged.push(format!(".haul-staging-{}", std::process::id()));
    target.with_file_name(staged)
}

/// Files queued for each writer, and the files of one directory given to a writer in
/// a row (see [`Lanes`]). Deep enough that a source fetching chunks ahead (see
/// [`BlobSource::will_need`]) sees far enough to batch many small files per request;
/// a job is a path and a node, not file contents.
const LANE_FILES: usize = 2048;
/// Bytes of content given to a writer in a row at most. Writers take their files in
/// parallel, so a source fetching chunks in the walk's order must hold about this much
/// per writer ahead of them (the agent holds 16 MiB: eight writers of 2 MiB).
const LANE_BYTES: u64 = 2 << 20;

/// The writers' queues, one each. A directory's files go to one writer (up to
/// [`LANE_FILES`] files or [`LANE_BYTES`] in a row), the next directory's to the next
/// writer: writers creating files in one directory at once wait on its lock, spinning,
/// and a tenth of the CPU of a restore of many small files went to that.
struct Lanes {
    queues: Vec<mpsc::SyncSender<FileJob>>,
    at: usize,
    /// The directory of the last file sent, and how many of its files and bytes went
    /// in a row.
    dir: PathBuf,
    run: usize,
    run_bytes: u64,
}

impl Lanes {
    /// Queues `job`; false if its writer is gone.
    fn send(&mut self, job: FileJob) -> bool {
        let dir = job.path.parent().unwrap_or(Path::new(""));
        if dir != self.dir || self.run == LANE_FILES || self.run_bytes >= LANE_BYTES {
            self.at = (self.at + 1) % self.queues.len();
            self.run = 0;
            self.run_bytes = 0;
            if dir != self.dir {
                self.dir = dir.to_path_buf();
            }
        }
        self.run += 1;
        self.run_bytes += job.node.size;
        self.queues[self.at].send(job).is_ok()
    }
}

struct FileJob {
    /// Its number for [`Reuse`], if a standby push numbers files.
    seq: Option<u64>,
    path: PathBuf,
    /// Already created (files with several links must exist before their other
    /// names are linked); otherwise the worker creates it, so file creation, the
    /// slowest part of a restore of many small files, runs in parallel.
    file: Option<File>,
    node: Node,
}

/// Creates the file of `node` with its permission bits, less the umask and any
/// setuid, setgid or sticky bit (set after its owner, which clears them): nobody else
/// can enter the staging directory, and a file whose mode needs no more saves a
/// `fchmod`, which writes the inode again.
fn create_file(path: &Path, node: &Node) -> Result<File, RestoreError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(node.mode & 0o777)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err(path))
}

struct Restorer<'a> {
    source: &'a dyn BlobSource,
    stats: &'a RestoreStats,
    jobs: Option<Lanes>,
    names: NameCache,
    is_root: bool,
    /// (device, inode) of multiply-linked files → the first path restored.
    links: HashMap<(u64, u64), PathBuf>,
    /// Directories whose metadata is applied after their contents.
    dirs: Vec<(PathBuf, Node)>,
    /// The other names of a multiply-linked file, by its first name: removed with it
    /// if its content cannot be restored.
    other_links: HashMap<PathBuf, Vec<PathBuf>>,
    warnings: Vec<RestoreWarning>,
    reuse: Option<&'a dyn Reuse>,
    /// The next file's number for `reuse`.
    seq: u64,
    /// Entries not to restore, and the directory the snapshot's root is restored
    /// into (an entry's path in the snapshot is its path below it).
    excludes: &'a [glob::Pattern],
    root: PathBuf,
}

/// What of a snapshot a restore writes: with includes, only those paths (split into
/// names) and what is below them; never an entry an exclude matches.
#[derive(Clone, Copy, Default)]
pub(crate) struct Selection<'a> {
    pub includes: &'a [Vec<Vec<u8>>],
    pub excludes: &'a [glob::Pattern],
}

/// Restores the tree `root` into the directory `staging`, which exists and is empty.
pub(crate) fn restore_into(
    source: &dyn BlobSource,
    root: &TreeId,
    staging: &Path,
    select: Selection<'_>,
    threads: usize,
    stats: &RestoreStats,
    reuse: Option<&dyn Reuse>,
) -> Result<Vec<RestoreWarning>, RestoreError> {
    let worker_error: Mutex<Option<RestoreError>> = Mutex::new(None);
    // Files the workers could not restore (removed), with why.
    let failed: Mutex<Vec<(PathBuf, RestoreError)>> = Mutex::new(Vec::new());
    let is_root = meta::is_root();
    let outcome = std::thread::scope(|scope| {
        let mut queues = Vec::with_capacity(threads);
        for _ in 0..threads {
            // Owned by its worker, so that the queue closes if it stops.
            let (tx, rx) = mpsc::sync_channel::<FileJob>(LANE_FILES);
            queues.push(tx);
            let (worker_error, failed) = (&worker_error, &failed);
            scope.spawn(move || {
                let mut names = NameCache::default();
                let mut lens = Vec::new();
                loop {
                    let job = match rx.recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    if worker_error.lock().expect("error slot").is_some() {
                        continue; // drain the queue after a failure
                    }
                    lens.clear();
                    let written = write_file(source, &job, stats, &mut names, is_root, &mut lens);
                    if let (Some(r), Some(seq)) = (reuse, job.seq) {
                        match &written {
                            Ok(()) => r.written(seq, &lens),
                            Err(_) => r.failed(seq),
                        }
                    }
                    match written {
                        Ok(()) => {}
                        // Removed once every worker and the walk are done: the walk may
                        // still make other names of this file from this one.
                        Err(e) if e.is_entry_only() => {
                            failed.lock().expect("failed").push((job.path, e))
                        }
                        Err(e) => {
                            worker_error.lock().expect("error slot").get_or_insert(e);
                        }
                    }
                }
            });
        }
        let mut r = Restorer {
            source,
            stats,
            jobs: Some(Lanes {
                queues,
                at: 0,
                dir: PathBuf::new(),
                run: 0,
                run_bytes: 0,
            }),
            names: NameCache::default(),
            is_root,
            links: HashMap::new(),
            dirs: Vec::new(),
            other_links: HashMap::new(),
            warnings: Vec::new(),
            reuse,
            seq: 0,
            excludes: select.excludes,
            root: staging.to_path_buf(),
        };
        let walked = source
            .load_tree(root)
            .map_err(RestoreError::from)
            .and_then(|tree| {
                let filter: Vec<&[Vec<u8>]> =
                    select.includes.iter().map(|v| v.as_slice()).collect();
                r.dir(staging, tree, &filter)
            });
        r.jobs = None; // workers finish the queue and exit
        (walked, r.dirs, r.warnings, r.names, r.other_links)
    });
    // The scope has joined every worker here.
    let (walked, dirs, mut warnings, mut names, mut other_links) = outcome;
    walked?;
    if let Some(e) = worker_error.into_inner().expect("error slot") {
        return Err(e);
    }
    let mut failed = failed.into_inner().expect("failed");
    failed.sort_by(|a, b| a.0.cmp(&b.0));
    // Nothing half-written stays under a name.
    for (path, e) in failed {
        fs::remove_file(&path).map_err(io_err(&path))?;
        for other in other_links.remove(&path).unwrap_or_default() {
            fs::remove_file(&other).map_err(io_err(&other))?;
            let why = format!(
                "a hard link to {}, which could not be restored",
                path.display()
            );
            warnings.push(not_restored(&other, why));
        }
        warnings.push(not_restored(&path, e));
    }
    // `dirs` is in post-order (a directory after everything below it): children
    // before parents, so a parent's restrictive mode cannot lock us out of a child.
    for (path, node) in &dirs {
        apply_metadata(path, None, node, &mut names, is_root)?;
    }
    Ok(warnings)
}

impl Restorer<'_> {
    /// A directory's entries: its tree's, or those of each of its pages (only the pages
    /// an include can reach into, if there are includes).
    fn dir(
        &mut self,
        path: &Path,
        tree: TreeBlob,
        includes: &[&[Vec<u8>]],
    ) -> Result<(), RestoreError> {
        let pages = match tree {
            TreeBlob::Nodes(t) => return self.nodes(path, &t.nodes, includes),
            TreeBlob::Pages(p) => p,
        };
        let mut wanted: Vec<usize> = if includes.is_empty() {
            (0..pages.pages.len()).collect()
        } else {
            includes
                .iter()
                .filter_map(|inc| pages.page_for(inc.first()?))
                .collect()
        };
        // Includes come in no order; a page listed twice would be restored twice.
        wanted.sort_unstable();
        wanted.dedup();
        for at in wanted {
            match self.page(&pages, at) {
                Ok(nodes) => self.nodes(path, &nodes, includes)?,
                Err(e) if e.scope == FailureScope::Blob => {
                    let page = &pages.pages[at];
                    let to = match pages.pages.get(at + 1) {
                        Some(next) => format!("before {}", String::from_utf8_lossy(&next.first)),
                        None => "the last".into(),
                    };
                    self.warnings.push(not_restored(
                        path,
                        format!(
                            "its entries from {} to {to} are in a page of its listing that cannot be read: {e}",
                            String::from_utf8_lossy(&page.first)
                        ),
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Page `at` of a paged directory, checked against its index.
    fn page(&self, pages: &Pages, at: usize) -> Result<Vec<Node>, SourceError> {
        Ok(read_page(pages, at, |id| self.source.load_tree(id))?.nodes)
    }

    fn nodes(
        &mut self,
        path: &Path,
        nodes: &[Node],
        includes: &[&[Vec<u8>]],
    ) -> Result<(), RestoreError> {
        for node in nodes {
            // Which include paths reach into this node?
            let below: Vec<&[Vec<u8>]> = if includes.is_empty() {
                Vec::new()
            } else {
                let matching: Vec<&[Vec<u8>]> = includes
                    .iter()
                    .filter(|inc| inc.first() == Some(&node.name))
                    .map(|inc| &inc[1..])
                    .collect();
                if matching.is_empty() {
                    continue;
                }
                // An include that ends here restores the whole node.
                if matching.iter().any(|rest| rest.is_empty()) {
                    Vec::new()
                } else {
                    matching
                }
            };
            let child = path.join(OsStr::from_bytes(&node.name));
            if !self.excludes.is_empty() {
                let inside = Path::new("/").join(child.strip_prefix(&self.root).unwrap_or(&child));
                if crate::walk::excluded(self.excludes, &inside, &node.name) {
                    continue;
                }
            }
            self.node(&child, node, &below)?;
        }
        Ok(())
    }

    fn node(
        &mut self,
        path: &Path,
        node: &Node,
        includes: &[&[Vec<u8>]],
    ) -> Result<(), RestoreError> {
        match node.kind {
            NodeKind::Dir => {
                let sub = match node.subtree.as_ref().map(|id| self.source.load_tree(id)) {
                    None => None,
                    Some(Ok(sub)) => Some(sub),
                    Some(Err(e)) if e.scope == FailureScope::Blob => {
                        // Its entries are unknown: an empty directory would say it
                        // had none, so it is not made at all.
                        self.warnings.push(not_restored(
                            path,
                            format!("its listing cannot be read: {e}"),
                        ));
                        return Ok(());
                    }
                    Some(Err(e)) => return Err(e.into()),
                };
                fs::create_dir(path).map_err(io_err(path))?;
                self.stats.dirs.fetch_add(1, Relaxed);
                if let Some(sub) = sub {
                    self.dir(path, sub, includes)?;
                }
                self.dirs.push((path.to_path_buf(), node.clone()));
                // Apply at the end; the list is one small record per directory.
                return Ok(());
            }
            NodeKind::File => {
                let mut file = None;
                if node.nlink > 1 {
                    if let Some(first) = self.links.get(&(node.device, node.inode)) {
                        fs::hard_link(first, path).map_err(io_err(path))?;
                        self.other_links
                            .entry(first.clone())
                            .or_default()
                            .push(path.to_path_buf());
                        self.stats.files.fetch_add(1, Relaxed);
                        return Ok(());
                    }
                    self.links
                        .insert((node.device, node.inode), path.to_path_buf());
                    file = Some(create_file(path, node)?);
                }
                let mut seq = None;
                if let Some(reuse) = self.reuse.filter(|_| file.is_none()) {
                    seq = Some(self.seq);
                    self.seq += 1;
                    if reuse.file(self.seq - 1, path, node)? {
                        self.stats.files.fetch_add(1, Relaxed);
                        return Ok(());
                    }
                }
                self.source.will_need(&node.content, node.size);
                let job = FileJob {
                    seq,
                    path: path.to_path_buf(),
                    file,
                    node: node.clone(),
                };
                if !self.jobs.as_mut().expect("queue open").send(job) {
                    // The worker is gone (it failed): its error is reported.
                    return Err(RestoreError::Io {
                        path: path.to_path_buf(),
                        source: io::Error::other("restore workers stopped"),
                    });
                }
                return Ok(());
            }
            NodeKind::Symlink => {
                std::os::unix::fs::symlink(OsStr::from_bytes(&node.target), path)
                    .map_err(io_err(path))?;
            }
            NodeKind::CharDevice | NodeKind::BlockDevice if !self.is_root => {
                self.warnings
                    .push(not_restored(path, "a device node: creating it needs root"));
                return Ok(());
            }
            _ => meta::make_special(path, node).map_err(io_err(path))?,
        }
        self.stats.others.fetch_add(1, Relaxed);
        apply_metadata(path, None, node, &mut self.names, self.is_root)
    }
}

/// Applies owner, xattrs, mode and mtime, in the order that keeps each one: chown
/// clears setuid bits and file capabilities (`security.capability`), so the owner comes
/// before both; the mode after the xattrs, whose ACL it may adjust; mtime last. A file
/// that was just written is given its open descriptor and what it has now (`file`),
/// saving four lookups of its path, and the owner and mode calls when they would
/// change nothing (each writes the inode: a tenth of a restore of many small files).
fn apply_metadata(
    path: &Path,
    file: Option<(&File, &fs::Metadata)>,
    node: &Node,
    names: &mut NameCache,
    is_root: bool,
) -> Result<(), RestoreError> {
    let to = match file {
        Some((file, _)) => meta::Target::File(file),
        None => meta::Target::Path(path),
    };
    let now = file.map(|(_, now)| now);
    if is_root && !now.is_some_and(|now| meta::has_owner(now, node, names)) {
        meta::apply_owner(to, node, names).map_err(io_err(path))?;
    }
    if node.kind != NodeKind::Symlink || is_root {
        // user.* xattrs cannot be set on symlinks; trusted.*/security.* need root.
        meta::apply_xattrs(to, node).map_err(io_err(path))?;
    }
    let mode_kept =
        now.is_some_and(|now| node.xattrs.is_empty() && now.mode() & 0o7777 == node.mode);
    if !mode_kept {
        meta::apply_mode(to, node).map_err(io_err(path))?;
    }
    meta::apply_mtime(to, node).map_err(io_err(path))?;
    Ok(())
}

/// Blocks of zeros this large or larger are skipped, leaving a hole.
const HOLE_BLOCK: usize = 64 * 1024;

/// Writes the file of `job`, noting its chunks' lengths in `lens`.
fn write_file(
    source: &dyn BlobSource,
    job: &FileJob,
    stats: &RestoreStats,
    names: &mut NameCache,
    is_root: bool,
    lens: &mut Vec<u32>,
) -> Result<(), RestoreError> {
    let path = &job.path;
    let created;
    let file = match &job.file {
        Some(f) => f,
        None => {
            created = create_file(path, &job.node)?;
            &created
        }
    };
    let sparse = job.node.flags.contains(NodeFlags::SPARSE);
    let mut offset = 0u64;
    // The end of the last bytes written: the file (created empty) is this long.
    let mut written = 0u64;
    for id in &job.node.content {
        let data = source.load_chunk(id)?;
        let actual = ChunkId::of(&data);
        if actual != *id {
            return Err(RestoreError::ChunkMismatch {
                id: *id,
                actual,
                path: path.clone(),
            });
        }
        if !sparse {
            file.write_all_at(&data, offset).map_err(io_err(path))?;
            written = offset + data.len() as u64;
        } else if let Some(end) = write_sparse(file, &data, offset).map_err(io_err(path))? {
            written = end;
        }
        offset += data.len() as u64;
        lens.push(data.len() as u32);
        stats.bytes.fetch_add(data.len() as u64, Relaxed);
    }
    if offset != job.node.size {
        return Err(RestoreError::SizeMismatch {
            path: path.clone(),
            expected: job.node.size,
            actual: offset,
        });
    }
    // Only a file ending in a hole needs its length set (ftruncate is not free: it
    // takes the inode's locks and a journal entry).
    if written != offset {
        file.set_len(offset).map_err(io_err(path))?;
    }
    let now = file.metadata().map_err(io_err(path))?;
    apply_metadata(path, Some((file, &now)), &job.node, names, is_root)?;
    stats.files.fetch_add(1, Relaxed);
    Ok(())
}

/// Writes `data` at `offset`, skipping aligned all-zero blocks so they stay holes.
/// Returns the end of the last write, if anything was written.
fn write_sparse(file: &File, data: &[u8], offset: u64) -> io::Result<Option<u64>> {
    let mut end_written = None;
    let mut start = 0;
    while start < data.len() {
        let end = (start + HOLE_BLOCK).min(data.len());
        let block = &data[start..end];
        if block.len() == HOLE_BLOCK && block.iter().all(|&b| b == 0) {
            start = end;
            continue;
        }
        // Coalesce consecutive non-zero blocks into one write.
        let mut stop = end;
        while stop < data.len() {
            let next = (stop + HOLE_BLOCK).min(data.len());
            let b = &data[stop..next];
            if b.len() == HOLE_BLOCK && b.iter().all(|&x| x == 0) {
                break;
            }
            stop = next;
        }
        file.write_all_at(&data[start..stop], offset + start as u64)?;
        end_written = Some(offset + stop as u64);
        start = stop;
    }
    Ok(end_written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{Pager, Tree, PAGE_MAX};
    use std::collections::HashMap;

    /// Trees and chunks in memory; a blob in `lost` is missing.
    #[derive(Default)]
    struct MemSource {
        blobs: HashMap<[u8; 32], Vec<u8>>,
        lost: Vec<[u8; 32]>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("blob {0} is missing")]
    struct Lost(String);

    impl MemSource {
        fn get(&self, id: &[u8; 32]) -> Result<&Vec<u8>, SourceError> {
            match self.blobs.get(id) {
                Some(b) if !self.lost.contains(id) => Ok(b),
                _ => Err(SourceError::blob(Lost(hex::encode(&id[..4])))),
            }
        }
    }

    impl BlobSource for MemSource {
        fn load_tree(&self, id: &TreeId) -> Result<TreeBlob, SourceError> {
            TreeBlob::decode(self.get(&id.0)?).map_err(SourceError::blob)
        }
        fn load_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, SourceError> {
            self.get(&id.0).cloned()
        }
    }

    /// A snapshot of one directory `big` of `n` one-chunk files, paged.
    fn paged_snapshot(n: usize) -> (MemSource, TreeId, Vec<Node>) {
        let mut trees = HashMap::new();
        let mut chunks = HashMap::new();
        let mut offer = |b: Vec<u8>| {
            let id = TreeId::of(&b);
            trees.insert(id.0, b);
            Ok::<_, SourceError>(id)
        };
        let mut files = Vec::new();
        let mut pager = Pager::new();
        for i in 0..n {
            let body = format!("file {i}\n").into_bytes();
            let chunk = ChunkId::of(&body);
            let node = Node {
                name: format!("f{i:06}").into_bytes(),
                mode: 0o640,
                size: body.len() as u64,
                nlink: 1,
                content: vec![chunk],
                ..Default::default()
            };
            pager.push(&node, &mut offer).unwrap();
            files.push(node);
            chunks.insert(chunk.0, body);
        }
        let big = pager.finish(&mut offer).unwrap();
        let dir = Node {
            name: b"big".to_vec(),
            kind: NodeKind::Dir,
            mode: 0o755,
            subtree: Some(big),
            ..Default::default()
        };
        let root = offer(Tree { nodes: vec![dir] }.encode()).unwrap();
        trees.extend(chunks);
        let src = MemSource {
            blobs: trees,
            lost: Vec::new(),
        };
        (src, root, files)
    }

    fn run(
        src: &MemSource,
        root: &TreeId,
        target: &Path,
        includes: &[&str],
    ) -> Vec<RestoreWarning> {
        let opts = RestoreOptions {
            overwrite: None,
            target: target.to_path_buf(),
            includes: includes.iter().map(|s| s.to_string()).collect(),
            excludes: Vec::new(),
            threads: 2,
        };
        restore(src, root, &opts, &RestoreStats::default()).unwrap()
    }

    #[test]
    fn a_paged_directory_restores_whole_and_an_unreadable_page_loses_only_its_entries() {
        let (mut src, root, files) = paged_snapshot(3 * PAGE_MAX);
        let dir = tempfile::tempdir().unwrap();
        let whole = dir.path().join("whole");
        assert!(run(&src, &root, &whole, &[]).is_empty());
        for f in &files {
            let body = fs::read(whole.join("big").join(OsStr::from_bytes(&f.name))).unwrap();
            assert_eq!(body.len() as u64, f.size);
        }
        assert_eq!(
            fs::read_dir(whole.join("big")).unwrap().count(),
            files.len()
        );

        // One file, found through the one page that can hold it.
        let one = dir.path().join("one");
        assert!(run(&src, &root, &one, &["big/f040000"]).is_empty());
        let names: Vec<_> = fs::read_dir(one.join("big"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f040000"]);

        // The second page lost: its entries are reported, the others restored.
        let TreeBlob::Pages(pages) = src
            .load_tree(&src.load_tree(&root).unwrap().subtrees()[0])
            .unwrap()
        else {
            panic!("not paged")
        };
        src.lost.push(pages.pages[1].id.0);
        let part = dir.path().join("part");
        let warnings = run(&src, &root, &part, &[]);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let first = String::from_utf8_lossy(&pages.pages[1].first).into_owned();
        let next = String::from_utf8_lossy(&pages.pages[2].first).into_owned();
        assert!(
            warnings[0].message.starts_with(&format!("its entries from {first} to before {next} are in a page of its listing that cannot be read")),
            "{warnings:?}"
        );
        assert_eq!(warnings[0].path, part.join("big").display().to_string());
        let restored = fs::read_dir(part.join("big")).unwrap().count();
        let lost = files
            .iter()
            .filter(|f| f.name >= pages.pages[1].first && f.name < pages.pages[2].first)
            .count();
        assert_eq!(restored, files.len() - lost);
        assert!(!part.join("big").join(&first).exists());
        assert!(part.join("big").join(&next).exists());
    }
}
