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
//! the next chunks of a file read in order, and the first ones of the files after it
//! in its directory, are fetched ahead by threads of their own. The
//! snapshot list is read again when the top folders are looked at (at most every few
//! seconds), so new snapshots appear without remounting.
//!
//! SIGINT or SIGTERM unmounts (lazily if something still uses the mount) and exits.

use super::Context;
use crate::cli::MountArgs;
use crate::error::CliError;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Generation, INodeNo, LockOwner, MountOption, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyXattr, Request, SessionACL,
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
const READ_AHEAD: usize = 8;
/// When a file is opened, the chunks of the files after it in its directory are
/// fetched ahead, up to this many files and bytes: a reader going through a
/// directory (`cp -r`, `tar`, `grep -r`) finds them decrypted.
const AHEAD_FILES: usize = 128;
const AHEAD_BYTES: u64 = 32 << 20;
/// Files remembered as queued ahead (not queued again).
const QUEUED_FILES: usize = 4096;
/// Threads answering the kernel (two or four measured alike, see docs/benchmarks.md).
const FUSE_THREADS: usize = 4;
/// Threads fetching chunks ahead.
const FETCHERS: usize = 8;
/// Files whose chunk lengths are kept for reads.
const OPEN_FILES: usize = 256;
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
    /// What its inode number is made of besides its directory: its name, and for a
    /// `latest` link the name it points to too, for a snapshot its id. The kernel keeps link targets
    /// (FUSE_CACHE_SYMLINKS), so a `latest` that moves on is another inode.
    fn key_name<'a>(&self, name: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        match self {
            Entry::Latest(target) => [name, b"\0", target.as_bytes()].concat().into(),
            // A name like `2026-12-07T10:55:27Z-2` may move to another snapshot (one of
            // the same second forgotten): the id makes it another inode.
            Entry::Snapshot(s) => [name, b"\0", s.id.to_hex().as_bytes()].concat().into(),
            _ => name.into(),
        }
    }

    fn node(&self) -> Option<&Node> {
        match self {
            Entry::Node(n) => Some(n),
            _ => None,
        }
    }

    fn kind(&self) -> FileType {
        match self {
            Entry::Root | Entry::Folder(_) | Entry::Snapshot(_) => FileType::Directory,
            Entry::Latest(_) => FileType::Symlink,
            Entry::Node(n) => file_type(n.kind),
        }
    }
}

/// An entry of a directory listing.
enum Child<'a> {
    /// `.` or `..`.
    Dot,
    Node(&'a Node),
    Virtual(&'a Entry),
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
    /// When the list last changed: the folders' mtime. The kernel keeps a folder's
    /// listing until its mtime moves on (there is no OPENDIR to tell it otherwise).
    changed: SystemTime,
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

/// A chunk to fetch ahead of a reader, and where to put it in the kernel's page cache:
/// inode, offset and the length the index gives it (stored only if it has that length).
struct Fetch {
    repo: Arc<IndexedRepository>,
    id: ChunkId,
    into: Option<(u64, u64, u64)>,
}

/// A file being read: its chunks and where each ends.
struct Open {
    ino: u64,
    chunks: Vec<ChunkId>,
    ends: Vec<u64>,
    /// Where the last read ended: a read starting there is in order.
    next: AtomicU64,
    /// The last chunk queued ahead.
    queued_to: std::sync::atomic::AtomicUsize,
}

struct Haul {
    repo: RwLock<Arc<IndexedRepository>>,
    filter: SnapshotFilter,
    listing: Mutex<Listing>,
    inodes: Mutex<HashMap<u64, Inode>>,
    trees: Mutex<Budgeted<TreeId, Arc<Vec<Node>>>>,
    chunks: Arc<Chunks>,
    /// The files read last, by inode.
    files: Mutex<Budgeted<u64, Arc<Open>>>,
    ahead: mpsc::Sender<Fetch>,
    /// Files already queued ahead, by inode.
    queued: Mutex<Budgeted<u64, ()>>,
    /// Owner of the folders above the snapshots.
    uid: u32,
    gid: u32,
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

/// Whether a host or tag can be a directory's name (`release/1.2` cannot: it is left
/// out of `hosts/` and `tags/`, and its snapshots stay in `snapshots/` and `ids/`).
fn fit_for_a_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && name.len() <= 255
}

/// A chunk's plain length, from the index.
fn chunk_length(repo: &IndexedRepository, id: &ChunkId) -> Result<u64, Errno> {
    match repo.index().get(BlobKind::Data, &id.0) {
        Ok(Some(loc)) => Ok(loc.raw_length as u64),
        Ok(None) => {
            tracing::error!("chunk {} is not in the index", id.to_hex());
            Err(Errno::EIO)
        }
        Err(e) => {
            tracing::error!("the index: {e}");
            Err(Errno::EIO)
        }
    }
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
            match repo.snapshots_matching(&self.filter) {
                Ok(all) => {
                    let known: HashSet<SnapshotId> = l.snapshots.iter().map(|s| s.id).collect();
                    let new = all.iter().any(|(id, _)| !known.contains(id));
                    if new {
                        match repo.reloaded() {
                            Ok(r) => *self.repo.write().unwrap() = Arc::new(r),
                            Err(e) => tracing::error!("reading the index again: {e}"),
                        }
                    }
                    // Nothing new and as many: the same snapshots.
                    if new || all.len() != l.snapshots.len() {
                        l.changed = SystemTime::now();
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

    /// Notes that the kernel looked `name` up in `parent` (it holds one more
    /// reference to its inode), and returns the inode's number.
    fn looked_up(&self, parent: u64, name: &[u8], e: Entry) -> Result<u64, Errno> {
        let root = self.root_of(parent);
        let key = Key::of(parent, root, &e.key_name(name), e.node());
        let ino = key.ino();
        let root = if matches!(e, Entry::Snapshot(_)) {
            ino
        } else {
            root
        };
        let mut inodes = self.inodes.lock().unwrap();
        let i = inodes.entry(ino).or_insert_with(|| Inode {
            entry: e.clone(),
            key: key.clone(),
            parent,
            root,
            lookups: 0,
        });
        if i.key != key {
            tracing::error!(
                "inode number {ino} of {:?} is taken by {:?}",
                String::from_utf8_lossy(name),
                i.key
            );
            return Err(Errno::EIO);
        }
        i.entry = e;
        i.lookups += 1;
        Ok(ino)
    }

    /// The entries of directory `ino` from `offset` on (`.` and `..` first), given to
    /// `add` with their index and inode number until it says the reply is full.
    fn list(
        &self,
        ino: u64,
        offset: usize,
        mut add: impl FnMut(usize, u64, &[u8], Child<'_>) -> bool,
    ) -> Result<(), Errno> {
        let e = self.entry_of(ino).ok_or(Errno::ESTALE)?;
        let (parent, root) = self
            .inodes
            .lock()
            .unwrap()
            .get(&ino)
            .map_or((ino, 0), |i| (i.parent, i.root));
        for (i, (child, name)) in [(ino, &b"."[..]), (parent, &b".."[..])]
            .into_iter()
            .enumerate()
            .skip(offset)
        {
            if add(i, child, name, Child::Dot) {
                return Ok(());
            }
        }
        // A snapshot's directories are listed from the cached tree, without a copy.
        let tree = match &e {
            Entry::Snapshot(s) => Some(Some(s.tree)),
            Entry::Node(n) if n.kind == NodeKind::Dir => Some(n.subtree),
            _ => None,
        };
        if let Some(tree) = tree {
            let dir = match tree {
                Some(t) => self.dir(&t)?,
                None => Arc::new(Vec::new()),
            };
            for (i, n) in dir.iter().enumerate().skip(offset.saturating_sub(2)) {
                let child = Key::of(ino, root, &n.name, Some(n)).ino();
                if add(i + 2, child, &n.name, Child::Node(n)) {
                    break;
                }
            }
            return Ok(());
        }
        for (i, (name, c)) in self
            .children(&e)?
            .iter()
            .enumerate()
            .skip(offset.saturating_sub(2))
        {
            let child = Key::of(ino, root, &c.key_name(name), c.node()).ino();
            if add(i + 2, child, name, Child::Virtual(c)) {
                break;
            }
        }
        Ok(())
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
                let hosts: std::collections::BTreeSet<String> = self
                    .snapshots()
                    .iter()
                    .map(|s| s.host.clone())
                    .filter(|h| fit_for_a_name(h))
                    .collect();
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
                    .filter(|t| fit_for_a_name(t))
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
        let virt = |perm: u16, size: u64, time: SystemTime| FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: 0,
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind: e.kind(),
            perm,
            nlink: if e.kind() == FileType::Directory {
                2
            } else {
                1
            },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        match e {
            Entry::Root | Entry::Folder(_) => virt(0o555, 0, self.listing.lock().unwrap().changed),
            Entry::Latest(target) => virt(
                0o777,
                target.len() as u64,
                self.listing.lock().unwrap().changed,
            ),
            Entry::Snapshot(s) => virt(0o555, 0, s.time),
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
                    kind: e.kind(),
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

    /// What reads of file `ino` need: its chunks and where each ends (from the
    /// index), kept for the files read last.
    fn file(&self, ino: u64) -> Result<Arc<Open>, Errno> {
        if let Some(f) = self.files.lock().unwrap().get(&ino) {
            return Ok(f);
        }
        let n = match self.entry_of(ino) {
            Some(Entry::Node(n)) if n.kind == NodeKind::File => n,
            Some(_) => return Err(Errno::EISDIR),
            None => return Err(Errno::ESTALE),
        };
        let repo = self.repo();
        let mut ends = Vec::with_capacity(n.content.len());
        let mut end = 0u64;
        for id in &n.content {
            end += chunk_length(&repo, id)?;
            ends.push(end);
        }
        let f = Arc::new(Open {
            ino,
            chunks: n.content.clone(),
            ends,
            next: AtomicU64::new(0),
            queued_to: Default::default(),
        });
        self.files.lock().unwrap().put(ino, f.clone(), 1);
        Ok(f)
    }

    /// Queues the chunks of the files after `ino` in its directory for fetching (see
    /// [`AHEAD_FILES`]).
    fn fetch_next_files(&self, ino: u64) {
        // The name and directory of an inode, and that directory's tree.
        let place = |ino: u64| -> Option<(Vec<u8>, u64, TreeId)> {
            let (parent, name) = match self.inodes.lock().unwrap().get(&ino) {
                Some(Inode {
                    key: Key::Path { parent, name },
                    ..
                }) => (*parent, name.clone()),
                _ => return None,
            };
            let tree = match self.entry_of(parent)? {
                Entry::Snapshot(s) => s.tree,
                Entry::Node(n) => n.subtree?,
                _ => return None,
            };
            Some((name, parent, tree))
        };
        let after = |tree: &TreeId, name: &[u8]| -> Option<(Arc<Vec<Node>>, usize)> {
            let dir = self.dir(tree).ok()?;
            let at = dir.binary_search_by(|n| n.name.as_slice().cmp(name)).ok()?;
            Some((dir, at + 1))
        };
        let repo = self.repo();
        let (mut files, mut bytes) = (0, 0);
        // Queues file `n` of the directory at inode `dir`; false when enough is.
        let mut queue = |dir: u64, root: u64, n: &Node| -> bool {
            if n.kind != NodeKind::File {
                return true;
            }
            if files >= AHEAD_FILES || bytes >= AHEAD_BYTES {
                return false;
            }
            files += 1;
            let ino = Key::of(dir, root, &n.name, Some(n)).ino();
            let mut queued = self.queued.lock().unwrap();
            if queued.get(&ino).is_some() {
                return true;
            }
            queued.put(ino, (), 1);
            drop(queued);
            let mut offset = 0;
            for id in &n.content {
                if bytes >= AHEAD_BYTES {
                    return false;
                }
                // Where the next chunk starts: its length is in the index.
                let Ok(len) = chunk_length(&repo, id) else {
                    return false;
                };
                let _ = self.ahead.send(Fetch {
                    repo: repo.clone(),
                    id: *id,
                    into: Some((ino, offset, len)),
                });
                offset += len;
                bytes += len;
            }
            true
        };
        let Some((name, parent, tree)) = place(ino) else {
            return;
        };
        let root = self.root_of(parent);
        let Some((dir, from)) = after(&tree, &name) else {
            return;
        };
        if !dir[from..].iter().all(|n| queue(parent, root, n)) {
            return;
        }
        // Then the files of the directories after this one in its parent (a reader
        // going through a tree goes there next).
        let Some((name, grandparent, tree)) = place(parent) else {
            return;
        };
        let Some((dir, from)) = after(&tree, &name) else {
            return;
        };
        for d in &dir[from..] {
            let Some(sub) = d.subtree.filter(|_| d.kind == NodeKind::Dir) else {
                continue;
            };
            let sub_ino = Key::of(grandparent, root, &d.name, Some(d)).ino();
            let Ok(sub) = self.dir(&sub) else { return };
            if !sub.iter().all(|n| queue(sub_ino, root, n)) {
                return;
            }
        }
    }

    /// The chunk at `i` of an open file, fetching the next ones ahead when `ahead`.
    fn chunk(&self, f: &Open, i: usize, ahead: bool) -> Result<Arc<Vec<u8>>, Errno> {
        let repo = self.repo();
        if ahead {
            // Each chunk is queued once (`queued_to`: the last one queued).
            let last = (i + READ_AHEAD).min(f.chunks.len() - 1);
            let from = f.queued_to.fetch_max(last, Relaxed).max(i) + 1;
            for j in from..=last {
                if self.chunks.missing(&f.chunks[j]) {
                    let _ = self.ahead.send(Fetch {
                        repo: repo.clone(),
                        id: f.chunks[j],
                        into: Some((f.ino, f.ends[j - 1], f.ends[j] - f.ends[j - 1])),
                    });
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
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // Listings always with attributes (READDIRPLUS): whoever lists a directory of
        // a snapshot mostly goes on to its entries (`ls -l`, `find`, `cp -r`), and
        // each would otherwise be a LOOKUP round trip.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS);
        // Link targets kept by the kernel: a path through `latest` costs no READLINK.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_CACHE_SYMLINKS);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent = u64::from(parent);
        let Some(pe) = self.entry_of(parent) else {
            return reply.error(Errno::ESTALE);
        };
        let e = match self.child(&pe, name.as_bytes()) {
            Ok(e) => e,
            Err(err) => return reply.error(err),
        };
        match self.looked_up(parent, name.as_bytes(), e.clone()) {
            Ok(ino) => reply.entry(&Self::ttl(&e), &self.attr(ino, &e), Generation(0)),
            Err(err) => reply.error(err),
        }
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

    // No OPEN, OPENDIR or FLUSH: the first of each answered ENOSYS, the kernel stops
    // sending them (and RELEASE) and opens every file with its page cache kept. What
    // a read needs of a file is kept by its inode (see `Haul::file`), which spares
    // three round trips to this process per file read: through FUSE they cost more
    // than reading a small file.
    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let ino = u64::from(ino);
        let f = match self.file(ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        if offset == 0 {
            self.fetch_next_files(ino);
        }
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
            let start = if i == 0 { 0 } else { f.ends[i - 1] };
            if f.ends[i] - start != data.len() as u64 {
                tracing::error!(
                    "chunk {} is {} bytes, the index says {}",
                    f.chunks[i].to_hex(),
                    data.len(),
                    f.ends[i] - start
                );
                return reply.error(Errno::EIO);
            }
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

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listed = self.list(u64::from(ino), offset as usize, |i, child, name, c| {
            let kind = match c {
                Child::Dot => FileType::Directory,
                Child::Node(n) => file_type(n.kind),
                Child::Virtual(e) => e.kind(),
            };
            reply.add(INodeNo(child), i as u64 + 1, kind, OsStr::from_bytes(name))
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// READDIR and LOOKUP in one: the kernel takes each entry (but `.` and `..`) as
    /// looked up, which spares `ls -l` and `find` a round trip per entry.
    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let ino = u64::from(ino);
        let listed = self.list(ino, offset as usize, |i, child, name, c| {
            let (e, dot) = match c {
                Child::Dot => (self.entry_of(child).unwrap_or(Entry::Root), true),
                Child::Node(n) => (Entry::Node(Arc::new(n.clone())), false),
                Child::Virtual(e) => (e.clone(), false),
            };
            // Counted before it is added: an entry whose number clashes is left out.
            if !dot && self.looked_up(ino, name, e.clone()).is_err() {
                return false;
            }
            let full = reply.add(
                INodeNo(child),
                i as u64 + 1,
                OsStr::from_bytes(name),
                &Self::ttl(&e),
                &self.attr(child, &e),
                Generation(0),
            );
            if full && !dot {
                // Not sent after all.
                fuser::Filesystem::forget(self, req, INodeNo(child), 1);
            }
            full
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
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

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread and in those it starts from now
/// on (the lock's refresher, FUSE's workers): they wait for [`wait_signal`].
fn block_signals() -> libc::sigset_t {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
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
    // Signals wait in a thread of their own (blocked in every other thread). The first
    // unmounts (or, before the mount, ends the command); a second ends the process
    // whatever still uses the mount.
    let signals = block_signals();
    let unmounter: Arc<Mutex<Option<fuser::SessionUnmounter>>> = Arc::default();
    {
        let (unmounter, at) = (unmounter.clone(), at.clone());
        std::thread::spawn(move || {
            let sig = wait_signal(&signals);
            let name = match sig {
                libc::SIGINT => "SIGINT",
                libc::SIGHUP => "SIGHUP",
                _ => "SIGTERM",
            };
            match unmounter.lock().unwrap().take() {
                Some(mut u) => {
                    tracing::info!("{name}: unmounting {}", at.display());
                    unmount(&at, &mut u);
                }
                None => {
                    crate::errln!("haul-pbs: {name} before {} was mounted", at.display());
                    std::process::exit(128 + sig);
                }
            }
            let sig = wait_signal(&signals);
            crate::errln!(
                "haul-pbs: a second signal: stopping; {} stays mounted until its last user leaves it",
                at.display()
            );
            std::process::exit(128 + sig);
        });
    }
    let filter = args.filter.to_filter();
    let (repo, _lock) = ctx.open_for_reading(filter.host.as_deref(), "mount", true)?;
    let snapshots = listed(repo.snapshots_matching(&filter)?);
    let count = snapshots.len();
    // Threads fetch chunks ahead of readers: more than the CPUs, since a fetch mostly
    // waits for the disk when the packs are not in the page cache.
    let chunks = Arc::new(Chunks::new(args.cache_mib.max(8) << 20));
    // A fetched chunk also goes into the kernel's page cache (FUSE_NOTIFY_STORE): a
    // read of it then costs no round trip to this process.
    let notifier: Arc<std::sync::OnceLock<fuser::Notifier>> = Arc::default();
    let (tx, rx) = mpsc::channel::<Fetch>();
    let rx = Arc::new(Mutex::new(rx));
    let mut fetchers = Vec::new();
    for _ in 0..FETCHERS {
        let (rx, chunks, notifier) = (rx.clone(), chunks.clone(), notifier.clone());
        fetchers.push(std::thread::spawn(move || loop {
            let next = rx.lock().unwrap().recv();
            let Ok(job) = next else { break };
            let Ok(data) = chunks.get(&job.id, || job.repo.load_chunk(&job.id)) else {
                continue;
            };
            if let (Some((ino, offset, len)), Some(n)) = (job.into, notifier.get()) {
                // Refused when the kernel has forgotten the inode: nothing lost. A
                // chunk of another length than the index says is left to the read,
                // which fails.
                if data.len() as u64 == len {
                    let _ = n.store(INodeNo(ino), offset, &data);
                }
            }
        }));
    }
    let fs = Haul {
        repo: RwLock::new(Arc::new(repo)),
        filter,
        listing: Mutex::new(Listing {
            snapshots,
            read: Instant::now(),
            changed: SystemTime::now(),
        }),
        inodes: Mutex::new(HashMap::new()),
        trees: Mutex::new(Budgeted::new(TREE_BUDGET)),
        chunks,
        files: Mutex::new(Budgeted::new(OPEN_FILES)),
        ahead: tx,
        queued: Mutex::new(Budgeted::new(QUEUED_FILES)),
        uid: unsafe { libc::getuid() },
        gid: unsafe { libc::getgid() },
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
    config.n_threads = Some(FUSE_THREADS);
    config.clone_fd = true;
    let mut session = fuser::Session::new(fs, &at, &config)
        .map_err(|e| CliError::Io(format!("mounting on {}", at.display()), e))?;
    *unmounter.lock().unwrap() = Some(session.unmount_callable());
    let _ = notifier.set(session.notifier());
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
