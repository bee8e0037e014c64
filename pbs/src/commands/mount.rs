//! `mount MOUNTPOINT`: the repository as a read-only FUSE file system, to browse the
//! history with the tools one has (`ls`, `cp`, `diff`, `grep`):
//!
//! ```text
//! snapshots/<time>/...          every snapshot (the filters select), and `latest`
//! hosts/<host>/<time>/...       by host, with a `latest` link to the newest
//! tags/<tag>/<time>/...         by tag
//! ids/<short id>/...            by id
//! ```
//!
//! `<time>` is the snapshot's UTC time (`2026-12-07T10:55:27Z`), with `-2`, `-3` after
//! snapshots taken in the same second. Files show what was recorded: mode, owner,
//! times, sizes, link targets, hard-link counts, device numbers and xattrs.
//!
//! Memory stays bounded whatever is browsed: the kernel holds the inodes it uses and
//! forgets them (so does the table here); directories and decrypted chunks live in
//! caches of a fixed budget. A read fetches and decrypts only the chunks it touches;
//! when a file is read in order, the next chunks are fetched ahead by two threads. The
//! snapshot list is read again when the top folders are looked at (at most every few
//! seconds), so new snapshots appear without remounting.
//!
//! SIGINT or SIGTERM unmounts (lazily if something still uses the mount) and exits.

use super::Context;
use crate::cli::MountArgs;
use crate::error::CliError;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, LockOwner, MountOption,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyXattr, Request,
    SessionACL,
};
use haul_protocol::tree::{Node, NodeKind, Timestamp};
use haul_protocol::{BlobKind, ChunkId, SnapshotId, TreeId};
use haul_repo::format::snapshot::Snapshot;
use haul_repo::{IndexedRepository, SnapshotFilter};
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long the kernel may keep what it learnt of an entry inside a snapshot (it never
/// changes), and of the folders above them (new snapshots appear).
const SNAPSHOT_TTL: Duration = Duration::from_secs(3600);
const FOLDER_TTL: Duration = Duration::from_secs(1);
/// The snapshot list is read again at most this often.
const LIST_EVERY: Duration = Duration::from_secs(5);
/// How many chunks ahead of an in-order reader are fetched.
const READ_AHEAD: usize = 2;
/// Budget of decoded directories (estimated bytes).
const TREE_BUDGET: usize = 32 << 20;

/// One of the folders above the snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Folder {
    Snapshots,
    Hosts,
    Host(String),
    Tags,
    Tag(String),
    Ids,
}

/// A snapshot as the mount shows it.
#[derive(Debug)]
struct Listed {
    id: SnapshotId,
    /// Its directory's name: its time, unique in the list.
    name: String,
    time: SystemTime,
    host: String,
    tags: Vec<String>,
    tree: TreeId,
}

/// What an inode is.
#[derive(Debug, Clone)]
enum Entry {
    Root,
    Folder(Folder),
    /// The `latest` link of a folder of snapshots, to the newest one's name.
    Latest(String),
    /// A snapshot's directory: its root tree.
    Snapshot(Arc<Listed>),
    /// An entry inside a snapshot.
    Node(Arc<Node>),
}

impl Entry {
    fn node(&self) -> Option<&Node> {
        match self {
            Entry::Node(n) => Some(n),
            _ => None,
        }
    }
}

struct Inode {
    entry: Entry,
    /// What its number was made of, to tell a (most unlikely) clash of numbers.
    key: Key,
    parent: u64,
    /// The inode of the snapshot it is in (0 above the snapshots).
    root: u64,
    /// Lookups the kernel holds (it forgets them with `forget`).
    lookups: u64,
}

/// The snapshots the filters select, oldest first, with when they were read.
struct Listing {
    snapshots: Vec<Arc<Listed>>,
    read: Instant,
}

/// A least-recently-used map with a budget in bytes.
struct Budgeted<K: std::hash::Hash + Eq, V> {
    map: lru::LruCache<K, (V, usize)>,
    bytes: usize,
    budget: usize,
}

impl<K: std::hash::Hash + Eq, V: Clone> Budgeted<K, V> {
    fn new(budget: usize) -> Self {
        Budgeted {
            map: lru::LruCache::unbounded(),
            bytes: 0,
            budget,
        }
    }

    fn get(&mut self, k: &K) -> Option<V> {
        self.map.get(k).map(|(v, _)| v.clone())
    }

    fn put(&mut self, k: K, v: V, cost: usize) {
        if let Some((_, old)) = self.map.put(k, (v, cost)) {
            self.bytes -= old;
        }
        self.bytes += cost;
        while self.bytes > self.budget && self.map.len() > 1 {
            match self.map.pop_lru() {
                Some((_, (_, c))) => self.bytes -= c,
                None => break,
            }
        }
    }
}

type ChunkCache = Budgeted<ChunkId, Arc<Vec<u8>>>;

/// Decrypted chunks, shared by every reader; a chunk being fetched is waited for, not
/// fetched twice.
struct Chunks {
    /// The cached chunks, and those being fetched.
    state: Mutex<(ChunkCache, HashSet<ChunkId>)>,
    fetched: Condvar,
}

impl Chunks {
    fn new(budget: usize) -> Chunks {
        Chunks {
            state: Mutex::new((Budgeted::new(budget), HashSet::new())),
            fetched: Condvar::new(),
        }
    }

    /// The chunk, from the cache or by `load`.
    fn get(
        &self,
        id: &ChunkId,
        load: impl FnOnce() -> haul_repo::Result<Vec<u8>>,
    ) -> haul_repo::Result<Arc<Vec<u8>>> {
        {
            let mut s = self.state.lock().unwrap();
            loop {
                if let Some(data) = s.0.get(id) {
                    return Ok(data);
                }
                if !s.1.contains(id) {
                    break;
                }
                s = self.fetched.wait(s).unwrap();
            }
            s.1.insert(*id);
        }
        let loaded = load().map(Arc::new);
        let mut s = self.state.lock().unwrap();
        s.1.remove(id);
        if let Ok(data) = &loaded {
            let len = data.len();
            s.0.put(*id, data.clone(), len);
        }
        self.fetched.notify_all();
        loaded
    }

    /// Whether the chunk is neither cached nor being fetched.
    fn missing(&self, id: &ChunkId) -> bool {
        let s = self.state.lock().unwrap();
        !s.0.map.contains(id) && !s.1.contains(id)
    }
}

/// An open file: its chunks and where each ends.
struct Open {
    chunks: Vec<ChunkId>,
    ends: Vec<u64>,
    /// Where the last read ended: a read starting there is in order.
    next: AtomicU64,
}

struct Haul {
    repo: RwLock<Arc<IndexedRepository>>,
    filter: SnapshotFilter,
    listing: Mutex<Listing>,
    inodes: Mutex<HashMap<u64, Inode>>,
    trees: Mutex<Budgeted<TreeId, Arc<Vec<Node>>>>,
    chunks: Arc<Chunks>,
    open: Mutex<HashMap<u64, Arc<Open>>>,
    next_fh: AtomicU64,
    ahead: mpsc::Sender<(Arc<IndexedRepository>, ChunkId)>,
    /// Owner and time of the folders above the snapshots.
    uid: u32,
    gid: u32,
    mounted: SystemTime,
}

fn system_time(t: &Timestamp) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(t.nsec as u64)
    }
}

fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::File => FileType::RegularFile,
        NodeKind::Dir => FileType::Directory,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::Socket => FileType::Socket,
        NodeKind::CharDevice => FileType::CharDevice,
        NodeKind::BlockDevice => FileType::BlockDevice,
    }
}

/// What an inode number is made of: the same path always gets the same number, and
/// the names of one multiply-linked file in a snapshot share one (as they did on the
/// source).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Path { parent: u64, name: Vec<u8> },
    Link { root: u64, device: u64, inode: u64 },
}

impl Key {
    /// The key of `name` in directory `parent` (in the snapshot at inode `root`), a
    /// node of that snapshot if `node`.
    fn of(parent: u64, root: u64, name: &[u8], node: Option<&Node>) -> Key {
        match node {
            Some(n) if n.kind == NodeKind::File && n.nlink > 1 => Key::Link {
                root,
                device: n.device,
                inode: n.inode,
            },
            _ => Key::Path {
                parent,
                name: name.to_vec(),
            },
        }
    }

    fn ino(&self) -> u64 {
        let mut h = blake3::Hasher::new();
        match self {
            Key::Path { parent, name } => {
                h.update(b"p");
                h.update(&parent.to_le_bytes());
                h.update(name);
            }
            Key::Link {
                root,
                device,
                inode,
            } => {
                h.update(b"l");
                for n in [root, device, inode] {
                    h.update(&n.to_le_bytes());
                }
            }
        }
        u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap()).max(2)
    }
}

/// The names of the snapshots: their UTC time, `-2`, `-3`... after those of the same
/// second.
fn listed(list: Vec<(SnapshotId, Snapshot)>) -> Vec<Arc<Listed>> {
    let mut list = list;
    list.sort_by_key(|(id, s)| (s.time, *id));
    let mut seen: HashMap<String, usize> = HashMap::new();
    list.into_iter()
        .map(|(id, s)| {
            let base = s.time.format("%Y-%m-%dT%H:%M:%SZ").to_string();
            let n = seen.entry(base.clone()).or_insert(0);
            *n += 1;
            let name = if *n == 1 { base } else { format!("{base}-{n}") };
            Arc::new(Listed {
                id,
                name,
                time: s.time.into(),
                host: s.host,
                tags: s.tags,
                tree: s.tree,
            })
        })
        .collect()
}

/// Estimated memory of a directory's nodes.
fn tree_cost(nodes: &[Node]) -> usize {
    nodes
        .iter()
        .map(|n| {
            200 + n.name.len()
                + n.target.len()
                + n.user.len()
                + n.group.len()
                + 32 * n.content.len()
                + n.xattrs
                    .iter()
                    .map(|(a, b)| a.len() + b.len() + 48)
                    .sum::<usize>()
        })
        .sum()
}

impl Haul {
    fn repo(&self) -> Arc<IndexedRepository> {
        self.repo.read().unwrap().clone()
    }

    /// The snapshot list, read again if it is older than [`LIST_EVERY`]; with new
    /// snapshots the index is read again too (their data is in new packs).
    fn snapshots(&self) -> Vec<Arc<Listed>> {
        let mut l = self.listing.lock().unwrap();
        if l.read.elapsed() >= LIST_EVERY {
            let repo = self.repo();
            match repo.snapshots() {
                Ok(all) => {
                    let all: Vec<_> = all
                        .into_iter()
                        .filter(|(_, s)| self.filter.matches(s))
                        .collect();
                    let known: HashSet<SnapshotId> = l.snapshots.iter().map(|s| s.id).collect();
                    if all.iter().any(|(id, _)| !known.contains(id)) {
                        match repo.reloaded() {
                            Ok(r) => *self.repo.write().unwrap() = Arc::new(r),
                            Err(e) => tracing::error!("reading the index again: {e}"),
                        }
                    }
                    l.snapshots = listed(all);
                }
                Err(e) => tracing::error!("reading the snapshot list again: {e}"),
            }
            l.read = Instant::now();
        }
        l.snapshots.clone()
    }

    /// A directory of a snapshot, from the cache or the repository.
    fn dir(&self, tree: &TreeId) -> Result<Arc<Vec<Node>>, Errno> {
        if let Some(d) = self.trees.lock().unwrap().get(tree) {
            return Ok(d);
        }
        let nodes = super::compare::entries(&self.repo(), Some(tree)).map_err(|e| {
            tracing::error!("directory tree {}: {e}", tree.short());
            Errno::EIO
        })?;
        let cost = tree_cost(&nodes);
        let nodes = Arc::new(nodes);
        self.trees.lock().unwrap().put(*tree, nodes.clone(), cost);
        Ok(nodes)
    }

    /// The inode of the snapshot `ino` is in, 0 above the snapshots.
    fn root_of(&self, ino: u64) -> u64 {
        self.inodes.lock().unwrap().get(&ino).map_or(0, |i| i.root)
    }

    fn entry_of(&self, ino: u64) -> Option<Entry> {
        if ino == u64::from(INodeNo::ROOT) {
            return Some(Entry::Root);
        }
        self.inodes
            .lock()
            .unwrap()
            .get(&ino)
            .map(|i| i.entry.clone())
    }

    /// The snapshots a folder holds, oldest first.
    fn in_folder(&self, f: &Folder) -> Vec<Arc<Listed>> {
        let all = self.snapshots();
        match f {
            Folder::Snapshots | Folder::Ids => all,
            Folder::Host(h) => all.into_iter().filter(|s| &s.host == h).collect(),
            Folder::Tag(t) => all.into_iter().filter(|s| s.tags.contains(t)).collect(),
            Folder::Hosts | Folder::Tags => Vec::new(),
        }
    }

    /// Every entry of a folder above the snapshots, in order: (name, what it is).
    fn children(&self, e: &Entry) -> Result<Vec<(Vec<u8>, Entry)>, Errno> {
        let named = |n: &str, e: Entry| (n.as_bytes().to_vec(), e);
        Ok(match e {
            Entry::Root => vec![
                named("hosts", Entry::Folder(Folder::Hosts)),
                named("ids", Entry::Folder(Folder::Ids)),
                named("snapshots", Entry::Folder(Folder::Snapshots)),
                named("tags", Entry::Folder(Folder::Tags)),
            ],
            Entry::Folder(Folder::Hosts) => {
                let hosts: std::collections::BTreeSet<String> =
                    self.snapshots().iter().map(|s| s.host.clone()).collect();
                hosts
                    .into_iter()
                    .map(|h| named(&h.clone(), Entry::Folder(Folder::Host(h))))
                    .collect()
            }
            Entry::Folder(Folder::Tags) => {
                let tags: std::collections::BTreeSet<String> = self
                    .snapshots()
                    .iter()
                    .flat_map(|s| s.tags.iter().cloned())
                    .collect();
                tags.into_iter()
                    .map(|t| named(&t.clone(), Entry::Folder(Folder::Tag(t))))
                    .collect()
            }
            Entry::Folder(Folder::Ids) => self
                .in_folder(&Folder::Ids)
                .into_iter()
                .map(|s| named(&s.id.short(), Entry::Snapshot(s)))
                .collect(),
            Entry::Folder(f) => {
                let list = self.in_folder(f);
                let mut out: Vec<(Vec<u8>, Entry)> = list
                    .iter()
                    .map(|s| named(&s.name, Entry::Snapshot(s.clone())))
                    .collect();
                if let Some(newest) = list.last() {
                    out.push(named("latest", Entry::Latest(newest.name.clone())));
                }
                out
            }
            // Snapshots' directories are read from their trees.
            Entry::Snapshot(_) | Entry::Node(_) | Entry::Latest(_) => return Err(Errno::ENOTDIR),
        })
    }

    /// The entry `name` of directory `e`.
    fn child(&self, e: &Entry, name: &[u8]) -> Result<Entry, Errno> {
        let in_tree = |tree: &TreeId| -> Result<Entry, Errno> {
            let dir = self.dir(tree)?;
            dir.binary_search_by(|n| n.name.as_slice().cmp(name))
                .map(|i| Entry::Node(Arc::new(dir[i].clone())))
                .map_err(|_| Errno::ENOENT)
        };
        match e {
            Entry::Snapshot(s) => in_tree(&s.tree),
            Entry::Node(n) => match (&n.kind, &n.subtree) {
                (NodeKind::Dir, Some(t)) => in_tree(t),
                (NodeKind::Dir, None) => Err(Errno::ENOENT),
                _ => Err(Errno::ENOTDIR),
            },
            _ => self
                .children(e)?
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, e)| e)
                .ok_or(Errno::ENOENT),
        }
    }

    fn attr(&self, ino: u64, e: &Entry) -> FileAttr {
        let virt = |kind: FileType, perm: u16, size: u64, time: SystemTime| FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: 0,
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        match e {
            Entry::Root | Entry::Folder(_) => virt(FileType::Directory, 0o555, 0, self.mounted),
            Entry::Latest(target) => {
                virt(FileType::Symlink, 0o777, target.len() as u64, self.mounted)
            }
            Entry::Snapshot(s) => virt(FileType::Directory, 0o555, 0, s.time),
            Entry::Node(n) => {
                let size = match n.kind {
                    NodeKind::File => n.size,
                    NodeKind::Symlink => n.target.len() as u64,
                    _ => 0,
                };
                FileAttr {
                    ino: INodeNo(ino),
                    size,
                    blocks: size.div_ceil(512),
                    atime: system_time(&n.mtime),
                    mtime: system_time(&n.mtime),
                    ctime: system_time(&n.ctime),
                    crtime: system_time(&n.mtime),
                    kind: file_type(n.kind),
                    perm: (n.mode & 0o7777) as u16,
                    nlink: n.nlink.clamp(1, u32::MAX as u64) as u32,
                    uid: n.uid,
                    gid: n.gid,
                    rdev: n.rdev as u32,
                    blksize: 4096,
                    flags: 0,
                }
            }
        }
    }

    fn ttl(e: &Entry) -> Duration {
        match e {
            Entry::Node(_) => SNAPSHOT_TTL,
            _ => FOLDER_TTL,
        }
    }

    /// The chunk at `i` of an open file, fetching the next ones ahead when `ahead`.
    fn chunk(&self, f: &Open, i: usize, ahead: bool) -> Result<Arc<Vec<u8>>, Errno> {
        let repo = self.repo();
        if ahead {
            let tx = &self.ahead;
            for id in f.chunks.iter().skip(i + 1).take(READ_AHEAD) {
                if self.chunks.missing(id) {
                    let _ = tx.send((repo.clone(), *id));
                }
            }
        }
        let id = &f.chunks[i];
        self.chunks.get(id, || repo.load_chunk(id)).map_err(|e| {
            tracing::error!("chunk {}: {e}", id.to_hex());
            Errno::EIO
        })
    }
}

impl fuser::Filesystem for Haul {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent = u64::from(parent);
        let Some(pe) = self.entry_of(parent) else {
            return reply.error(Errno::ESTALE);
        };
        let e = match self.child(&pe, name.as_bytes()) {
            Ok(e) => e,
            Err(err) => return reply.error(err),
        };
        let root = self.root_of(parent);
        let key = Key::of(parent, root, name.as_bytes(), e.node());
        let ino = key.ino();
        let root = if matches!(e, Entry::Snapshot(_)) {
            ino
        } else {
            root
        };
        {
            let mut inodes = self.inodes.lock().unwrap();
            let i = inodes.entry(ino).or_insert_with(|| Inode {
                entry: e.clone(),
                key: key.clone(),
                parent,
                root,
                lookups: 0,
            });
            if i.key != key {
                tracing::error!("inode number {ino} of {name:?} is taken by {:?}", i.key);
                return reply.error(Errno::EIO);
            }
            i.entry = e.clone();
            i.lookups += 1;
        }
        reply.entry(&Self::ttl(&e), &self.attr(ino, &e), Generation(0));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut inodes = self.inodes.lock().unwrap();
        if let Some(i) = inodes.get_mut(&u64::from(ino)) {
            i.lookups = i.lookups.saturating_sub(nlookup);
            if i.lookups == 0 {
                inodes.remove(&u64::from(ino));
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ino = u64::from(ino);
        match self.entry_of(ino) {
            Some(e) => reply.attr(&Self::ttl(&e), &self.attr(ino, &e)),
            None => reply.error(Errno::ESTALE),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.entry_of(u64::from(ino)) {
            Some(Entry::Latest(target)) => reply.data(target.as_bytes()),
            Some(Entry::Node(n)) if n.kind == NodeKind::Symlink => reply.data(&n.target),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ESTALE),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let n = match self.entry_of(u64::from(ino)) {
            Some(Entry::Node(n)) if n.kind == NodeKind::File => n,
            Some(_) => return reply.error(Errno::EISDIR),
            None => return reply.error(Errno::ESTALE),
        };
        let repo = self.repo();
        let mut ends = Vec::with_capacity(n.content.len());
        let mut end = 0u64;
        for id in &n.content {
            match repo.index().get(BlobKind::Data, &id.0) {
                Ok(Some(loc)) => end += loc.raw_length as u64,
                Ok(None) => {
                    tracing::error!(
                        "chunk {} of {:?} is not in the index",
                        id.to_hex(),
                        String::from_utf8_lossy(&n.name)
                    );
                    return reply.error(Errno::EIO);
                }
                Err(e) => {
                    tracing::error!("the index: {e}");
                    return reply.error(Errno::EIO);
                }
            }
            ends.push(end);
        }
        let fh = self.next_fh.fetch_add(1, Relaxed);
        self.open.lock().unwrap().insert(
            fh,
            Arc::new(Open {
                chunks: n.content.clone(),
                ends,
                next: AtomicU64::new(0),
            }),
        );
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = self.open.lock().unwrap().get(&u64::from(fh)).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let in_order = f.next.swap(offset + size as u64, Relaxed) == offset;
        let mut out = Vec::with_capacity(size as usize);
        let mut at = offset;
        let end = offset.saturating_add(size as u64);
        // The first chunk ending after `at`.
        let mut i = f.ends.partition_point(|&e| e <= at);
        while at < end && i < f.chunks.len() {
            let data = match self.chunk(&f, i, in_order) {
                Ok(d) => d,
                Err(e) => return reply.error(e),
            };
            let start = f.ends[i] - data.len() as u64;
            let from = (at - start) as usize;
            let to = ((end - start) as usize).min(data.len());
            if from >= to {
                break;
            }
            out.extend_from_slice(&data[from..to]);
            at = start + to as u64;
            i += 1;
        }
        reply.data(&out);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        self.open.lock().unwrap().remove(&u64::from(fh));
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let ino = u64::from(ino);
        let Some(e) = self.entry_of(ino) else {
            return reply.error(Errno::ESTALE);
        };
        let (parent, root) = self
            .inodes
            .lock()
            .unwrap()
            .get(&ino)
            .map_or((ino, 0), |i| (i.parent, i.root));
        let mut out = |i: usize, child: u64, kind: FileType, name: &[u8]| {
            reply.add(INodeNo(child), i as u64 + 1, kind, OsStr::from_bytes(name))
        };
        let offset = offset as usize;
        for (i, (child, name)) in [(ino, &b"."[..]), (parent, &b".."[..])]
            .into_iter()
            .enumerate()
            .skip(offset)
        {
            if out(i, child, FileType::Directory, name) {
                return reply.ok();
            }
        }
        // A snapshot's directories are listed from the cached tree, without a copy.
        let tree = match &e {
            Entry::Snapshot(s) => Some(Some(s.tree)),
            Entry::Node(n) if n.kind == NodeKind::Dir => Some(n.subtree),
            _ => None,
        };
        if let Some(tree) = tree {
            let dir = match tree.map(|t| self.dir(&t)) {
                Some(Ok(d)) => d,
                Some(Err(err)) => return reply.error(err),
                None => Arc::new(Vec::new()),
            };
            for (i, n) in dir.iter().enumerate().skip(offset.saturating_sub(2)) {
                let child = Key::of(ino, root, &n.name, Some(n)).ino();
                if out(i + 2, child, file_type(n.kind), &n.name) {
                    break;
                }
            }
            return reply.ok();
        }
        let children = match self.children(&e) {
            Ok(c) => c,
            Err(err) => return reply.error(err),
        };
        for (i, (name, c)) in children.iter().enumerate().skip(offset.saturating_sub(2)) {
            let child = Key::of(ino, root, name, c.node()).ino();
            if out(i + 2, child, self.attr(0, c).kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(Entry::Node(n)) = self.entry_of(u64::from(ino)) else {
            return reply.error(Errno::NO_XATTR);
        };
        match n.xattrs.iter().find(|(k, _)| k == name.as_bytes()) {
            None => reply.error(Errno::NO_XATTR),
            Some((_, v)) => xattr_reply(v, size, reply),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let mut names = Vec::new();
        if let Some(Entry::Node(n)) = self.entry_of(u64::from(ino)) {
            for (k, _) in &n.xattrs {
                names.extend_from_slice(k);
                names.push(0);
            }
        }
        xattr_reply(&names, size, reply)
    }

    fn access(
        &self,
        _req: &Request,
        _ino: INodeNo,
        mask: fuser::AccessFlags,
        reply: fuser::ReplyEmpty,
    ) {
        if mask.contains(fuser::AccessFlags::W_OK) {
            reply.error(Errno::EROFS)
        } else {
            reply.ok()
        }
    }
}

/// The answer to an xattr request of `size` bytes: the length when asked with 0,
/// ERANGE when it does not fit.
fn xattr_reply(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32)
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(value)
    }
}

/// Blocks SIGINT and SIGTERM in this thread and in those it starts from now on (the
/// lock's refresher, FUSE's workers): they wait for [`wait_signal`].
fn block_signals() -> libc::sigset_t {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits for a signal of `set` (blocked by [`block_signals`]) and returns it.
fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// Unmounts `at`: at once if nothing uses it, else lazily (it goes when its last
/// user does).
fn unmount(at: &Path, session: &mut fuser::SessionUnmounter) {
    if let Err(e) = session.unmount() {
        tracing::warn!("unmounting {}: {e}; detaching it instead", at.display());
        let detached = std::process::Command::new("fusermount3")
            .args(["-u", "-z", "--"])
            .arg(at)
            .status();
        if !detached.is_ok_and(|s| s.success()) {
            tracing::error!(
                "{} is still mounted: unmount it with `fusermount3 -u -z {}`",
                at.display(),
                at.display()
            );
        }
    }
}

pub fn mount(ctx: &Context, args: MountArgs) -> Result<(), CliError> {
    let at = std::path::absolute(&args.mountpoint)
        .map_err(|e| CliError::Io(format!("mount point {}", args.mountpoint.display()), e))?;
    match std::fs::metadata(&at) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(CliError::usage(format!(
                "mount point {} is not a directory",
                at.display()
            )))
        }
        Err(e) => {
            return Err(CliError::Io(
                format!("mount point {} (create it first)", at.display()),
                e,
            ))
        }
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(CliError::Failed(
            "/dev/fuse does not exist: load the fuse module (modprobe fuse) and install fuse3"
                .into(),
        ));
    }
    let signals = block_signals();
    let filter = args.filter.to_filter();
    let (repo, _lock) = ctx.open_for_reading(filter.host.as_deref(), "mount", true)?;
    let snapshots = listed(
        repo.snapshots()?
            .into_iter()
            .filter(|(_, s)| filter.matches(s))
            .collect(),
    );
    let count = snapshots.len();
    // Two threads fetch chunks ahead of in-order readers.
    let chunks = Arc::new(Chunks::new(args.cache_mib.max(8) << 20));
    let (tx, rx) = mpsc::channel::<(Arc<IndexedRepository>, ChunkId)>();
    let rx = Arc::new(Mutex::new(rx));
    let mut fetchers = Vec::new();
    for _ in 0..2 {
        let (rx, chunks) = (rx.clone(), chunks.clone());
        fetchers.push(std::thread::spawn(move || loop {
            let next = rx.lock().unwrap().recv();
            let Ok((repo, id)) = next else { break };
            if chunks.missing(&id) {
                let _ = chunks.get(&id, || repo.load_chunk(&id));
            }
        }));
    }
    let fs = Haul {
        repo: RwLock::new(Arc::new(repo)),
        filter,
        listing: Mutex::new(Listing {
            snapshots,
            read: Instant::now(),
        }),
        inodes: Mutex::new(HashMap::new()),
        trees: Mutex::new(Budgeted::new(TREE_BUDGET)),
        chunks,
        open: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
        ahead: tx,
        uid: unsafe { libc::getuid() },
        gid: unsafe { libc::getgid() },
        mounted: SystemTime::now(),
    };
    let mut options = vec![
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::FSName("haul".into()),
        MountOption::Subtype("haul".into()),
    ];
    if !args.no_default_permissions {
        options.push(MountOption::DefaultPermissions);
    }
    let mut config = fuser::Config::default();
    config.mount_options = options;
    config.acl = if args.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(4);
    config.clone_fd = true;
    // Signals wait in a thread of their own (blocked in every other thread).
    let (signals_tx, signals_rx) = mpsc::channel::<fuser::SessionUnmounter>();
    let where_ = at.clone();
    std::thread::spawn(move || {
        let sig = wait_signal(&signals);
        tracing::info!(
            "{}: unmounting {}",
            if sig == libc::SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            },
            where_.display()
        );
        if let Ok(mut u) = signals_rx.recv() {
            unmount(&where_, &mut u);
        }
    });
    let mut session = fuser::Session::new(fs, &at, &config)
        .map_err(|e| CliError::Io(format!("mounting on {}", at.display()), e))?;
    let _ = signals_tx.send(session.unmount_callable());
    crate::outln!(
        "{} mounted: {count} snapshot(s) in snapshots/, hosts/, tags/ and ids/; unmount with Ctrl-C, SIGTERM or `fusermount3 -u {}`",
        at.display(),
        at.display()
    );
    let ran = session.run();
    drop(fetchers);
    ran.map_err(|e| CliError::Io(format!("the mount on {}", at.display()), e))?;
    crate::outln!("{} unmounted", at.display());
    Ok(())
}
