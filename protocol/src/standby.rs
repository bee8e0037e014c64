//! Standby copies (`haul-agent restore --standby`): a directory on a clone host that
//! always holds one complete snapshot, the one pushed last, brought up to the next
//! with as little sent as can be.
//!
//! Beside the standby directory `T` lives its state directory `.T.haul-standby`, which
//! only its owner may enter:
//!
//! - `record`: what `T` holds. A header names the snapshot and the inode of the
//!   directory; then, for each file in walk order, its path, the digest of its node
//!   ([`Node::restore_digest`]), its size and its chunks' lengths and ids.
//! - `chunks`: the chunks of those files sorted by id, each with the record entry of a
//!   file holding it and its offset there.
//! - `trees`: the snapshot's trees (directory listings), each with its id. A push reads
//!   the trees it already has from here (each checked against its id) and asks the
//!   source only for the others: those of the directories that changed, since a
//!   directory's tree names its subdirectories' trees.
//! - `next/`, `record.new`, `chunks.new`, `trees.new`: the version being built, while
//!   it is built.
//! - `lock`: held by the push running.
//!
//! A push (1) finishes or undoes what a push killed before it left; (2) builds `next/`:
//! a file whose digest is as recorded and whose size, mtime, mode and owner in `T` are
//! still what the snapshot says is a hard link to `T`'s (nothing read, nothing sent);
//! a changed file is written from the chunks `T` already holds (each checked against
//! its id) and only the chunks `T` lacks come from the source, each asked for as a
//! delta against the old version's chunks in its place ([`delta_bases`]); (3) syncs the
//! filesystem; (4) exchanges `T` and `next/` in one step (`renameat2` with
//! `RENAME_EXCHANGE`; a first push renames `next/` to `T`); (5) renames the new record
//! into place; (6) removes the old version. Until (4) `T` is the old version, from (4)
//! on the new one: whoever reads `T` never sees a mix. A push killed between (4) and
//! (5) is finished by the next one: `record.new` is taken when `T` is the directory it
//! names.
//!
//! Memory: the restorer's, plus the records of the files being written at once. The
//! chunk indexes stay on disk: the old one is searched through a table of where each
//! 16-bit prefix of ids starts (512 KiB), the new one is sorted in 256 parts by first
//! byte when it is large.

use crate::chunker::MAX_DELTA_BASES;
use crate::id::{ChunkId, TreeId};
use crate::meta::{self, NameCache};
use crate::restore::{
    self, io_err, BlobSource, HeldChunks, RestoreError, RestoreStats, RestoreWarning, Reuse,
    SourceError,
};
use crate::tree::{Node, TreeBlob};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

const RECORD_MAGIC: &[u8; 22] = b"haul-standby-record 2\n";
const CHUNKS_MAGIC: &[u8; 22] = b"haul-standby-chunks 1\n";
const TREES_MAGIC: &[u8; 22] = b"haul-standby-trees 1\n\n";
/// An entry of `chunks`: id, record entry offset, offset in that file, length.
const INDEX_ENTRY: usize = 32 + 8 + 8 + 4;

/// What a standby push is asked to do.
#[derive(Debug, Clone)]
pub struct StandbyOptions {
    /// The standby directory.
    pub target: PathBuf,
    /// The snapshot pushed, as the record names it.
    pub snapshot: String,
    pub threads: usize,
}

/// What a standby push took from the copy it replaced.
#[derive(Debug, Default)]
pub struct StandbyStats {
    /// Files unchanged: hard links, nothing read.
    pub files_linked: AtomicU64,
    /// Bytes of changed files read from the old copy's chunks rather than sent.
    pub bytes_local: AtomicU64,
}

/// The state directory of the standby directory `target`.
pub fn state_dir(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "standby".into());
    let mut state = std::ffi::OsString::from(".");
    state.push(name);
    state.push(".haul-standby");
    target.with_file_name(state)
}

/// Brings the standby directory `opts.target` to the snapshot of `root`, in one step
/// for whoever reads it (see the module doc). On an error `target` is as it was.
pub fn push(
    source: &dyn BlobSource,
    root: &TreeId,
    opts: &StandbyOptions,
    stats: &RestoreStats,
    standby: &StandbyStats,
) -> Result<Vec<RestoreWarning>, RestoreError> {
    let target = &opts.target;
    let state = state_dir(target);
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(&state) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(io_err(&state)(e)),
        _ => {}
    }
    let _lock = lock(&state)?;
    recover(&state, target)?;
    let now = match fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => Some(m),
        Ok(_) => return Err(RestoreError::TargetNotEmpty(target.clone())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(target)(e)),
    };
    let old = match &now {
        Some(m) => Old::open(&state, target, m.ino())?,
        None => None,
    };
    // A directory this never filled is not taken over unless it is empty: it may hold
    // what someone wants kept.
    if now.is_some() && old.is_none() && !state.join("record").exists() {
        let mut entries = fs::read_dir(target).map_err(io_err(target))?;
        if entries.next().is_some() {
            return Err(RestoreError::TargetNotEmpty(target.clone()));
        }
    }
    let next = state.join("next");
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&next)
        .map_err(io_err(&next))?;
    let trees = TreeCache::open(&state.join("trees"));
    if let Some(t) = &trees {
        source.held_trees(t.ids());
    }
    let built = build(
        source,
        root,
        opts,
        &state,
        old.as_ref(),
        trees.as_ref(),
        stats,
        standby,
    );
    let warnings = match built {
        Ok(w) => w,
        Err(e) => {
            let _ = remove_tree(&next);
            let _ = remove_tree(&state.join("sort"));
            for name in NEW_FILES {
                let _ = fs::remove_file(state.join(name));
            }
            return Err(e);
        }
    };
    drop(old);
    drop(trees);
    let mode = now
        .as_ref()
        .map_or_else(|| 0o777 & !restore::umask(), |m| m.mode() & 0o7777);
    fs::set_permissions(&next, fs::Permissions::from_mode(mode)).map_err(io_err(&next))?;
    syncfs(&next).map_err(io_err(&next))?;
    if now.is_some() {
        exchange(target, &next).map_err(io_err(target))?;
    } else {
        fs::rename(&next, target).map_err(io_err(target))?;
    }
    if let Some(parent) = target.parent() {
        sync_dir(parent).map_err(io_err(parent))?;
    }
    take_new_record(&state)?;
    if now.is_some() {
        remove_tree(&next).map_err(io_err(&next))?;
    }
    Ok(warnings)
}

/// What a push writes beside `next/` (see the module doc).
const NEW_FILES: [&str; 3] = ["record.new", "chunks.new", "trees.new"];

/// Builds the new version in `state/next` (made, empty) and writes its record, chunk
/// index and trees beside it.
#[allow(clippy::too_many_arguments)]
fn build(
    source: &dyn BlobSource,
    root: &TreeId,
    opts: &StandbyOptions,
    state: &Path,
    old: Option<&Old>,
    trees: Option<&TreeCache>,
    stats: &RestoreStats,
    standby: &StandbyStats,
) -> Result<Vec<RestoreWarning>, RestoreError> {
    let next = &state.join("next");
    let inode = fs::metadata(next).map_err(io_err(next))?.ino();
    let record = state.join("record.new");
    let writer = Writer::create(&record, &state.join("sort"), &opts.snapshot, inode)
        .map_err(io_err(&record))?;
    let bases = Mutex::new(std::collections::HashMap::new());
    let hook = Hook {
        old,
        bases: &bases,
        next: next.to_path_buf(),
        writer: Mutex::new(writer),
        names: Mutex::new(NameCache::default()),
        is_root: meta::is_root(),
        stats: standby,
    };
    let trees_new = state.join("trees.new");
    let local = LocalFirst {
        remote: source,
        old,
        bases: &bases,
        trees,
        new_trees: Mutex::new(
            TreeWriter::create(&trees_new, &opts.snapshot).map_err(io_err(&trees_new))?,
        ),
        stats: standby,
    };
    let warnings = restore::restore_into(
        &local,
        root,
        next,
        restore::Selection::default(),
        opts.threads.max(1),
        stats,
        Some(&hook),
    )?;
    local
        .new_trees
        .into_inner()
        .expect("tree writer")
        .finish()
        .map_err(io_err(&trees_new))?;
    let writer = hook.writer.into_inner().expect("record writer");
    let chunks = state.join("chunks.new");
    writer.finish(&chunks, inode).map_err(io_err(&record))?;
    Ok(warnings)
}

/// Holds the state directory's lock, or says another push is running.
fn lock(state: &Path) -> Result<File, RestoreError> {
    let path = state.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        let e = if e.kind() == io::ErrorKind::WouldBlock {
            io::Error::other("another push into this standby directory is running")
        } else {
            e
        };
        return Err(io_err(&path)(e));
    }
    Ok(file)
}

/// Finishes a push killed after its exchange (the new record names the directory now
/// in place), and removes what any killed push left.
fn recover(state: &Path, target: &Path) -> Result<(), RestoreError> {
    let in_place = fs::symlink_metadata(target)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| m.ino());
    let new = state.join("record.new");
    if let Some(header) = read_header(&new, RECORD_MAGIC) {
        if Some(header.1) == in_place {
            take_new_record(state)?;
        }
    }
    for name in NEW_FILES {
        let p = state.join(name);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&p)(e)),
            _ => {}
        }
    }
    for dir in ["next", "sort"] {
        let d = state.join(dir);
        match remove_tree(&d) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&d)(e)),
            _ => {}
        }
    }
    Ok(())
}

/// Renames `chunks.new`, `trees.new` and then `record.new` into place: a `chunks`
/// newer than the record names another directory and is not used (trees are checked
/// against their ids, whichever version they come from).
fn take_new_record(state: &Path) -> Result<(), RestoreError> {
    for (new, name) in [("chunks.new", "chunks"), ("trees.new", "trees")] {
        let new = state.join(new);
        if new.exists() {
            fs::rename(&new, state.join(name)).map_err(io_err(&new))?;
        }
    }
    let record = state.join("record.new");
    fs::rename(&record, state.join("record")).map_err(io_err(&record))?;
    sync_dir(state).map_err(io_err(state))
}

/// A file's header: the snapshot it names and the directory inode.
fn read_header(path: &Path, magic: &[u8; 22]) -> Option<(String, u64)> {
    let mut r = BufReader::new(File::open(path).ok()?);
    header(&mut r, magic).ok()
}

fn header(r: &mut impl Read, magic: &[u8; 22]) -> io::Result<(String, u64)> {
    let mut m = [0u8; 22];
    r.read_exact(&mut m)?;
    if &m != magic {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a standby record",
        ));
    }
    let inode = read_u64(r)?;
    let len = read_u32(r)? as usize;
    if len > 256 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad snapshot name",
        ));
    }
    let mut name = vec![0u8; len];
    r.read_exact(&mut name)?;
    let name = String::from_utf8(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad snapshot name"))?;
    Ok((name, inode))
}

fn write_header(
    w: &mut impl Write,
    magic: &[u8; 22],
    snapshot: &str,
    inode: u64,
) -> io::Result<u64> {
    w.write_all(magic)?;
    w.write_all(&inode.to_le_bytes())?;
    w.write_all(&(snapshot.len() as u32).to_le_bytes())?;
    w.write_all(snapshot.as_bytes())?;
    Ok((magic.len() + 8 + 4 + snapshot.len()) as u64)
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// The order the restorer walks in: by path component, each compared by bytes (a
/// `/` sorts before any byte a name may hold).
fn walk_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let key = |c: &u8| if *c == b'/' { 0 } else { *c };
    a.iter().map(key).cmp(b.iter().map(key))
}

/// A file of the record.
struct Entry {
    path: Vec<u8>,
    digest: [u8; 32],
    size: u64,
    lens: Vec<u32>,
    ids: Vec<ChunkId>,
}

/// Longest path and most chunks an entry may have (a damaged record must not make the
/// reader allocate without bound).
const MAX_PATH: usize = 64 * 1024;
const MAX_CHUNKS: usize = 1 << 24;

fn read_entry(r: &mut impl Read) -> io::Result<Option<Entry>> {
    let mut b = [0u8; 4];
    match r.read_exact(&mut b) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    }
    let len = u32::from_le_bytes(b) as usize;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "damaged standby record");
    if len > MAX_PATH {
        return Err(bad());
    }
    let mut path = vec![0u8; len];
    r.read_exact(&mut path)?;
    let mut digest = [0u8; 32];
    r.read_exact(&mut digest)?;
    let size = read_u64(r)?;
    let n = read_u32(r)? as usize;
    if n > MAX_CHUNKS {
        return Err(bad());
    }
    let mut lens = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        lens.push(read_u32(r)?);
        let mut id = [0u8; 32];
        r.read_exact(&mut id)?;
        ids.push(ChunkId(id));
    }
    Ok(Some(Entry {
        path,
        digest,
        size,
        lens,
        ids,
    }))
}

fn entry_len(path_len: usize, chunks: usize) -> u64 {
    (4 + path_len + 32 + 8 + 4 + (4 + 32) * chunks) as u64
}

/// The version in place, as its record says.
struct Old {
    dir: PathBuf,
    /// For reading an entry's path at its offset.
    record: File,
    /// The record read in walk order, one entry ahead.
    cursor: Mutex<Cursor>,
    index: Option<ChunkIndex>,
}

struct Cursor {
    reader: BufReader<File>,
    ahead: Option<Entry>,
    /// A damaged record ends the reuse of files (not the push).
    broken: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct IndexEntry {
    id: [u8; 32],
    entry: u64,
    offset: u64,
    len: u32,
}

impl IndexEntry {
    fn encode(&self) -> [u8; INDEX_ENTRY] {
        let mut b = [0u8; INDEX_ENTRY];
        b[..32].copy_from_slice(&self.id);
        b[32..40].copy_from_slice(&self.entry.to_le_bytes());
        b[40..48].copy_from_slice(&self.offset.to_le_bytes());
        b[48..52].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> IndexEntry {
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[..32]);
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        IndexEntry {
            id,
            entry: u64_at(32),
            offset: u64_at(40),
            len: u32::from_le_bytes(b[48..52].try_into().expect("4 bytes")),
        }
    }

    fn prefix(id: &[u8; 32]) -> usize {
        usize::from(u16::from_be_bytes([id[0], id[1]]))
    }
}

/// A sorted chunk index on disk, searched through where each 16-bit prefix starts.
struct ChunkIndex {
    file: File,
    /// Where the entries begin (after the header).
    base: u64,
    /// Entry number where each prefix starts, and the count at the end.
    starts: Vec<u64>,
}

impl ChunkIndex {
    /// The index at `path` of the directory `inode`; none if it is of another, not
    /// sorted, or damaged (then nothing is taken from the old version's chunks).
    fn open(path: &Path, inode: u64) -> Option<ChunkIndex> {
        let file = File::open(path).ok()?;
        let mut r = BufReader::with_capacity(1 << 16, file.try_clone().ok()?);
        let (name, ino) = header(&mut r, CHUNKS_MAGIC).ok()?;
        if ino != inode {
            return None;
        }
        let base = (CHUNKS_MAGIC.len() + 8 + 4 + name.len()) as u64;
        let mut counts = vec![0u64; 1 << 16];
        let mut last: Option<[u8; 32]> = None;
        let mut b = [0u8; INDEX_ENTRY];
        loop {
            match r.read_exact(&mut b) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(_) => return None,
            }
            let e = IndexEntry::decode(&b);
            if last.is_some_and(|l| l >= e.id) {
                return None;
            }
            last = Some(e.id);
            counts[IndexEntry::prefix(&e.id)] += 1;
        }
        let mut starts = Vec::with_capacity((1 << 16) + 1);
        let mut at = 0;
        for c in counts {
            starts.push(at);
            at += c;
        }
        starts.push(at);
        Some(ChunkIndex { file, base, starts })
    }

    fn find(&self, id: &[u8; 32]) -> Option<IndexEntry> {
        let p = IndexEntry::prefix(id);
        let (lo, hi) = (self.starts[p], self.starts[p + 1]);
        if lo == hi {
            return None;
        }
        let mut bucket = vec![0u8; ((hi - lo) as usize) * INDEX_ENTRY];
        self.file
            .read_exact_at(&mut bucket, self.base + lo * INDEX_ENTRY as u64)
            .ok()?;
        let entries: Vec<&[u8]> = bucket.chunks_exact(INDEX_ENTRY).collect();
        entries
            .binary_search_by(|e| e[..32].cmp(&id[..]))
            .ok()
            .map(|i| IndexEntry::decode(entries[i]))
    }
}

/// Entries of a new chunk index sorted in memory at most; past that they are split by
/// first byte into 256 parts sorted one at a time (ids are uniform).
const SORT_IN_MEMORY: u64 = 1 << 19;

/// Writes the `count` entries of `spill` (in any order) to `out` sorted by id, each id
/// once, using `dir` for the parts when there are more than `in_memory`.
fn sort_spill(
    spill: &Path,
    count: u64,
    dir: &Path,
    in_memory: u64,
    out: &mut impl Write,
) -> io::Result<()> {
    let sort_part = |path: &Path, out: &mut dyn Write| -> io::Result<()> {
        let bytes = fs::read(path)?;
        let mut entries: Vec<IndexEntry> = bytes
            .chunks_exact(INDEX_ENTRY)
            .map(IndexEntry::decode)
            .collect();
        entries.sort_unstable_by_key(|e| e.id);
        entries.dedup_by(|a, b| a.id == b.id);
        for e in &entries {
            out.write_all(&e.encode())?;
        }
        Ok(())
    };
    if count <= in_memory {
        return sort_part(spill, out);
    }
    let part = |b: usize| dir.join(format!("part-{b:02x}"));
    {
        let mut parts = Vec::with_capacity(256);
        for b in 0..256 {
            parts.push(BufWriter::with_capacity(8 << 10, File::create(part(b))?));
        }
        let mut r = BufReader::with_capacity(1 << 16, File::open(spill)?);
        let mut e = [0u8; INDEX_ENTRY];
        for _ in 0..count {
            r.read_exact(&mut e)?;
            parts[usize::from(e[0])].write_all(&e)?;
        }
        for mut p in parts {
            p.flush()?;
        }
    }
    for b in 0..256 {
        sort_part(&part(b), out)?;
        fs::remove_file(part(b))?;
    }
    Ok(())
}

impl Old {
    /// The record of `target` (whose inode is `inode`), if there is one and it is of
    /// that directory.
    fn open(state: &Path, target: &Path, inode: u64) -> Result<Option<Old>, RestoreError> {
        let path = state.join("record");
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut reader = BufReader::new(file.try_clone().map_err(io_err(&path))?);
        match header(&mut reader, RECORD_MAGIC) {
            Ok((_, ino)) if ino == inode => {}
            // Not the directory in place (someone replaced it): nothing to take from it.
            _ => return Ok(None),
        }
        let index = ChunkIndex::open(&state.join("chunks"), inode);
        Ok(Some(Old {
            dir: target.to_path_buf(),
            record: file,
            cursor: Mutex::new(Cursor {
                reader,
                ahead: None,
                broken: false,
            }),
            index,
        }))
    }

    /// The entry of `rel`, reading on in walk order (paths are asked for in that
    /// order).
    fn entry(&self, rel: &[u8]) -> Option<Entry> {
        let mut c = self.cursor.lock().expect("record cursor");
        loop {
            if c.broken {
                return None;
            }
            if c.ahead.is_none() {
                match read_entry(&mut c.reader) {
                    Ok(Some(e)) => c.ahead = Some(e),
                    Ok(None) => return None,
                    Err(_) => {
                        c.broken = true;
                        return None;
                    }
                }
            }
            let ahead = c.ahead.as_ref().expect("read ahead");
            match walk_order(&ahead.path, rel) {
                std::cmp::Ordering::Less => c.ahead = None,
                std::cmp::Ordering::Equal => return c.ahead.take(),
                std::cmp::Ordering::Greater => return None,
            }
        }
    }

    fn find(&self, id: &ChunkId) -> Option<IndexEntry> {
        self.index.as_ref()?.find(&id.0)
    }

    /// The chunk `id` as the old version holds it, if it does and it still hashes to
    /// its id.
    fn read_chunk(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let e = self.find(id)?;
        let mut len = [0u8; 4];
        self.record.read_exact_at(&mut len, e.entry).ok()?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_PATH {
            return None;
        }
        let mut rel = vec![0u8; len];
        self.record.read_exact_at(&mut rel, e.entry + 4).ok()?;
        let file = File::open(self.dir.join(std::ffi::OsStr::from_bytes(&rel))).ok()?;
        let mut data = vec![0u8; e.len as usize];
        file.read_exact_at(&mut data, e.offset).ok()?;
        (ChunkId::of(&data) == *id).then_some(data)
    }
}

impl HeldChunks for Old {
    fn read(&self, id: &ChunkId) -> Option<Vec<u8>> {
        self.read_chunk(id)
    }
}

/// For each chunk of a changed file's new version (`new`) that `lacks` says must be
/// sent, chunks of its old version (`old`) to send it as a delta against: outside what
/// changed, a file keeps its chunks; inside it, the new chunks and the old ones that
/// differ cover the same stretch of the file, more or less, so each new chunk gets the
/// old ones in its share of that stretch (a chunk that took in a neighbour whose cut
/// point the change removed gets both).
fn delta_bases(
    old: &[ChunkId],
    new: &[ChunkId],
    lacks: impl Fn(&ChunkId) -> bool,
) -> Vec<(ChunkId, Vec<ChunkId>)> {
    if old.is_empty() {
        return Vec::new();
    }
    let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let most = old.len().min(new.len()) - prefix;
    let suffix = old
        .iter()
        .rev()
        .zip(new.iter().rev())
        .take(most)
        .take_while(|(a, b)| a == b)
        .count();
    let old_mid = &old[prefix..old.len() - suffix];
    let new_mid = &new[prefix..new.len() - suffix];
    new_mid
        .iter()
        .enumerate()
        .filter(|(_, id)| lacks(id))
        .map(|(i, id)| {
            let bases = match (old_mid.len(), new_mid.len()) {
                // Only added: the old chunk where the new ones went in.
                (0, _) => vec![old[prefix.min(old.len() - 1)]],
                (m, k) => {
                    let from = i * m / k;
                    let to = ((i + 1) * m).div_ceil(k).clamp(from + 1, m);
                    old_mid[from..to.min(from + MAX_DELTA_BASES)].to_vec()
                }
            };
            (*id, bases)
        })
        .collect()
}

/// A file of the new version waiting for its writer (files are recorded in walk
/// order; writers finish in any).
struct Pending {
    rel: Vec<u8>,
    digest: [u8; 32],
    size: u64,
    content: Vec<ChunkId>,
    lens: Option<Vec<u32>>,
    gone: bool,
}

/// Writes the new version's record in walk order, and its chunk index's entries (in
/// the record's order, sorted at the end) to `sort/spill`.
struct Writer {
    out: BufWriter<File>,
    file: File,
    at: u64,
    next: u64,
    pending: BTreeMap<u64, Pending>,
    /// Where the index is sorted (under the state directory).
    sort: PathBuf,
    spill: BufWriter<File>,
    spilled: u64,
    error: Option<io::Error>,
}

impl Writer {
    fn create(path: &Path, sort: &Path, snapshot: &str, inode: u64) -> io::Result<Writer> {
        let file = OpenOptions::new().create_new(true).write(true).open(path)?;
        let mut out = BufWriter::with_capacity(1 << 16, file.try_clone()?);
        let at = write_header(&mut out, RECORD_MAGIC, snapshot, inode)?;
        fs::create_dir(sort)?;
        let spill = BufWriter::with_capacity(1 << 16, File::create(sort.join("spill"))?);
        Ok(Writer {
            out,
            file,
            at,
            next: 0,
            pending: BTreeMap::new(),
            sort: sort.to_path_buf(),
            spill,
            spilled: 0,
            error: None,
        })
    }

    fn add(&mut self, seq: u64, p: Pending) {
        self.pending.insert(seq, p);
        self.flush();
    }

    fn written(&mut self, seq: u64, lens: &[u32]) {
        if let Some(p) = self.pending.get_mut(&seq) {
            p.lens = Some(lens.to_vec());
        }
        self.flush();
    }

    fn failed(&mut self, seq: u64) {
        if let Some(p) = self.pending.get_mut(&seq) {
            p.gone = true;
        }
        self.flush();
    }

    /// Writes the entries ready in walk order.
    fn flush(&mut self) {
        while let Some(p) = self.pending.get(&self.next) {
            if !p.gone && p.lens.is_none() {
                return;
            }
            let mut p = self.pending.remove(&self.next).expect("pending");
            self.next += 1;
            if p.gone || self.error.is_some() {
                continue;
            }
            let lens = p.lens.take().expect("written");
            if lens.len() != p.content.len() {
                continue; // not a file the record can describe: never reused
            }
            if let Err(e) = self.write(&p, &lens) {
                self.error = Some(e);
            }
        }
    }

    fn write(&mut self, p: &Pending, lens: &[u32]) -> io::Result<()> {
        let entry = self.at;
        self.out.write_all(&(p.rel.len() as u32).to_le_bytes())?;
        self.out.write_all(&p.rel)?;
        self.out.write_all(&p.digest)?;
        self.out.write_all(&p.size.to_le_bytes())?;
        self.out.write_all(&(lens.len() as u32).to_le_bytes())?;
        let mut offset = 0u64;
        for (id, len) in p.content.iter().zip(lens) {
            self.out.write_all(&len.to_le_bytes())?;
            self.out.write_all(&id.0)?;
            let e = IndexEntry {
                id: id.0,
                entry,
                offset,
                len: *len,
            };
            self.spill.write_all(&e.encode())?;
            self.spilled += 1;
            offset += u64::from(*len);
        }
        self.at += entry_len(p.rel.len(), lens.len());
        Ok(())
    }

    /// Ends the record and writes the chunk index to `chunks`, both synced.
    fn finish(mut self, chunks: &Path, inode: u64) -> io::Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if !self.pending.is_empty() {
            return Err(io::Error::other(format!(
                "{} files were neither written nor given up",
                self.pending.len()
            )));
        }
        self.out.flush()?;
        drop(self.out);
        self.file.sync_all()?;
        self.spill.flush()?;
        drop(self.spill);
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(chunks)?;
        let mut out = BufWriter::with_capacity(1 << 16, file.try_clone()?);
        write_header(&mut out, CHUNKS_MAGIC, "", inode)?;
        let spill = self.sort.join("spill");
        sort_spill(&spill, self.spilled, &self.sort, SORT_IN_MEMORY, &mut out)?;
        out.flush()?;
        drop(out);
        file.sync_all()?;
        remove_tree(&self.sort)
    }
}

/// The restorer's [`Reuse`] for a standby push.
struct Hook<'a> {
    old: Option<&'a Old>,
    /// Chunks of changed files the old version lacks, each with chunks of the file's
    /// old version to ask for it as a delta against (taken by [`LocalFirst`]).
    bases: &'a Mutex<std::collections::HashMap<ChunkId, Vec<ChunkId>>>,
    /// The directory being built.
    next: PathBuf,
    writer: Mutex<Writer>,
    names: Mutex<NameCache>,
    is_root: bool,
    stats: &'a StandbyStats,
}

impl Hook<'_> {
    /// Whether the old version's file at `path` is still what the restorer made of
    /// `node` (nobody wrote, moved, chmod'ed or linked it since).
    fn untouched(&self, path: &Path, node: &Node) -> bool {
        let Ok(m) = fs::symlink_metadata(path) else {
            return false;
        };
        m.is_file()
            && m.len() == node.size
            && m.mtime() == node.mtime.sec
            && m.mtime_nsec() == i64::from(node.mtime.nsec)
            && m.mode() & 0o7777 == node.mode
            && m.nlink() == 1
            && (!self.is_root || meta::has_owner(&m, node, &mut self.names.lock().expect("names")))
    }
}

impl Reuse for Hook<'_> {
    fn file(&self, seq: u64, path: &Path, node: &Node) -> Result<bool, RestoreError> {
        let rel = path
            .strip_prefix(&self.next)
            .expect("files are restored below the directory built")
            .as_os_str()
            .as_bytes();
        let digest = node.restore_digest();
        let mut lens = None;
        if let Some(old) = self.old {
            if let Some(e) = old.entry(rel) {
                let from = old.dir.join(std::ffi::OsStr::from_bytes(rel));
                if e.digest == digest
                    && e.size == node.size
                    && e.lens.len() == node.content.len()
                    && self.untouched(&from, node)
                {
                    match fs::hard_link(&from, path) {
                        Ok(()) => lens = Some(e.lens),
                        // Too many links, another filesystem: written instead.
                        Err(err)
                            if matches!(err.raw_os_error(), Some(libc::EMLINK | libc::EXDEV)) => {}
                        Err(err) => return Err(io_err(path)(err)),
                    }
                }
                if lens.is_none() {
                    let pairs = delta_bases(&e.ids, &node.content, |id| old.find(id).is_none());
                    if !pairs.is_empty() {
                        self.bases.lock().expect("bases").extend(pairs);
                    }
                }
            }
        }
        let linked = lens.is_some();
        self.writer.lock().expect("record writer").add(
            seq,
            Pending {
                rel: rel.to_vec(),
                digest,
                size: node.size,
                content: node.content.clone(),
                lens,
                gone: false,
            },
        );
        if linked {
            self.stats.files_linked.fetch_add(1, Relaxed);
        }
        Ok(linked)
    }

    fn written(&self, seq: u64, lens: &[u32]) {
        self.writer
            .lock()
            .expect("record writer")
            .written(seq, lens);
    }

    fn failed(&self, seq: u64) {
        self.writer.lock().expect("record writer").failed(seq);
    }
}

/// Trees and chunks from the old version where it has them (checked against their
/// ids), else from the source; every tree of the new version is kept for the next.
struct LocalFirst<'a> {
    remote: &'a dyn BlobSource,
    old: Option<&'a Old>,
    bases: &'a Mutex<std::collections::HashMap<ChunkId, Vec<ChunkId>>>,
    trees: Option<&'a TreeCache>,
    new_trees: Mutex<TreeWriter>,
    stats: &'a StandbyStats,
}

impl BlobSource for LocalFirst<'_> {
    fn load_tree(&self, id: &TreeId) -> Result<TreeBlob, SourceError> {
        if let Some((bytes, tree)) = self.trees.and_then(|t| t.read(id)) {
            self.new_trees.lock().expect("tree writer").add(id, &bytes);
            return Ok(tree);
        }
        let tree = self.remote.load_tree(id)?;
        // Kept as the source encodes it: what hashes to its id.
        let bytes = tree.encode();
        if blake3::hash(&bytes).as_bytes() == &id.0 {
            self.new_trees.lock().expect("tree writer").add(id, &bytes);
        }
        Ok(tree)
    }

    fn load_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, SourceError> {
        match self.old {
            Some(old) => {
                if let Some(data) = old.read_chunk(id) {
                    self.stats.bytes_local.fetch_add(data.len() as u64, Relaxed);
                    return Ok(data);
                }
                self.remote.load_chunk_from(id, old)
            }
            None => self.remote.load_chunk(id),
        }
    }

    fn will_need(&self, ids: &[ChunkId], bytes: u64) {
        match self.old {
            None => self.remote.will_need(ids, bytes),
            Some(old) => {
                let mut bases = self.bases.lock().expect("bases");
                let lacking: Vec<(ChunkId, Vec<ChunkId>)> = ids
                    .iter()
                    .filter(|id| old.find(id).is_none())
                    .map(|id| (*id, bases.remove(id).unwrap_or_default()))
                    .collect();
                drop(bases);
                if !lacking.is_empty() {
                    let share = bytes / ids.len() as u64 * lacking.len() as u64;
                    self.remote.will_need_from(&lacking, share);
                }
            }
        }
    }
}

/// The trees of the version in place (`trees`): where each is in the file.
struct TreeCache {
    file: File,
    at: std::collections::HashMap<[u8; 32], (u64, u32)>,
}

/// Largest tree kept (a page of a large directory is far smaller).
const MAX_TREE: u32 = 64 << 20;

impl TreeCache {
    /// The trees in `path`, as far as it can be read; `None` if there are none.
    fn open(path: &Path) -> Option<TreeCache> {
        let file = File::open(path).ok()?;
        let mut r = BufReader::with_capacity(1 << 16, file.try_clone().ok()?);
        let mut at = std::collections::HashMap::new();
        let mut offset = {
            let (name, _) = header(&mut r, TREES_MAGIC).ok()?;
            (TREES_MAGIC.len() + 8 + 4 + name.len()) as u64
        };
        // Entries: id, length, the tree's bytes. A damaged tail ends the reading; a tree
        // damaged in place fails its check when read, and is asked for instead.
        loop {
            let mut id = [0u8; 32];
            if r.read_exact(&mut id).is_err() {
                break;
            }
            let Ok(len) = read_u32(&mut r) else { break };
            if len > MAX_TREE || r.seek_relative(len as i64).is_err() {
                break;
            }
            at.insert(id, (offset + 36, len));
            offset += 36 + len as u64;
        }
        (!at.is_empty()).then_some(TreeCache { file, at })
    }

    /// The ids of the trees held.
    fn ids(&self) -> std::sync::Arc<std::collections::HashSet<TreeId>> {
        std::sync::Arc::new(self.at.keys().map(|id| TreeId(*id)).collect())
    }

    /// The tree `id` and its bytes, if held and they hash to `id` and decode.
    fn read(&self, id: &TreeId) -> Option<(Vec<u8>, TreeBlob)> {
        let &(offset, len) = self.at.get(&id.0)?;
        let mut bytes = vec![0u8; len as usize];
        self.file.read_exact_at(&mut bytes, offset).ok()?;
        if blake3::hash(&bytes).as_bytes() != &id.0 {
            return None;
        }
        let tree = TreeBlob::decode(&bytes).ok()?;
        Some((bytes, tree))
    }
}

/// Writes `trees.new`: each tree of the new version once.
struct TreeWriter {
    out: BufWriter<File>,
    written: std::collections::HashSet<[u8; 32]>,
    error: Option<io::Error>,
}

impl TreeWriter {
    fn create(path: &Path, snapshot: &str) -> io::Result<TreeWriter> {
        let file = OpenOptions::new().create_new(true).write(true).open(path)?;
        let mut out = BufWriter::with_capacity(1 << 16, file);
        write_header(&mut out, TREES_MAGIC, snapshot, 0)?;
        Ok(TreeWriter {
            out,
            written: Default::default(),
            error: None,
        })
    }

    fn add(&mut self, id: &TreeId, bytes: &[u8]) {
        if self.error.is_some() || bytes.len() > MAX_TREE as usize || !self.written.insert(id.0) {
            return;
        }
        let r = (|| {
            self.out.write_all(&id.0)?;
            self.out.write_all(&(bytes.len() as u32).to_le_bytes())?;
            self.out.write_all(bytes)
        })();
        if let Err(e) = r {
            self.error = Some(e);
        }
    }

    fn finish(mut self) -> io::Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.out.flush()?;
        self.out.get_ref().sync_all()
    }
}

/// Exchanges two directories in one step.
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    let (a, b) = (meta::cpath(a)?, meta::cpath(b)?);
    let done = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes everything of the filesystem holding `dir` to disk.
fn syncfs(dir: &Path) -> io::Result<()> {
    let d = File::open(dir)?;
    if unsafe { libc::syncfs(d.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes a directory tree, also one whose directories were made unwritable (a
/// snapshot's read-only directories, restored as they were).
fn remove_tree(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            open_up(dir);
            fs::remove_dir_all(dir)
        }
        other => other,
    }
}

/// Makes every directory below `dir` (and it) writable and searchable by its owner.
pub(crate) fn open_up(dir: &Path) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                open_up(&e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: u64, seed: u64) -> Vec<IndexEntry> {
        (0..n)
            .map(|i| {
                // Every third id repeats an earlier one: a chunk in several files.
                let k = if i % 3 == 2 { i / 2 } else { i };
                let id = *blake3::hash(&(k ^ seed).to_le_bytes()).as_bytes();
                IndexEntry {
                    id,
                    entry: i * 100,
                    offset: i * 7,
                    len: (i % 1000) as u32,
                }
            })
            .collect()
    }

    /// The index as sorting in memory makes it: by id, each id at its first entry.
    fn expected(all: &[IndexEntry]) -> Vec<IndexEntry> {
        let mut e = all.to_vec();
        e.sort_by_key(|e| e.id); // stable: the first of equal ids stays first
        e.dedup_by(|a, b| a.id == b.id);
        e
    }

    #[test]
    fn a_large_index_is_sorted_in_parts_as_a_small_one_is_in_memory_and_found_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let all = entries(5000, 7);
        let spill = dir.path().join("spill");
        let mut bytes = Vec::new();
        for e in &all {
            bytes.extend_from_slice(&e.encode());
        }
        fs::write(&spill, &bytes).unwrap();
        let want = expected(&all);
        for in_memory in [u64::MAX, 10] {
            let mut out = Vec::new();
            sort_spill(&spill, all.len() as u64, dir.path(), in_memory, &mut out).unwrap();
            let got: Vec<IndexEntry> = out
                .chunks_exact(INDEX_ENTRY)
                .map(IndexEntry::decode)
                .collect();
            // Which of two equal ids is kept may differ between the two ways; the ids
            // and their count may not.
            let ids = |v: &[IndexEntry]| v.iter().map(|e| e.id).collect::<Vec<_>>();
            assert_eq!(ids(&got), ids(&want), "in memory up to {in_memory}");
            assert_eq!(
                fs::read_dir(dir.path()).unwrap().count(),
                1,
                "parts left behind"
            );
        }

        // Written with its header, it is found by id through the prefix table.
        let file = dir.path().join("chunks");
        let mut out = Vec::new();
        write_header(&mut out, CHUNKS_MAGIC, "", 42).unwrap();
        for e in &want {
            out.extend_from_slice(&e.encode());
        }
        fs::write(&file, &out).unwrap();
        let index = ChunkIndex::open(&file, 42).unwrap();
        for e in &want {
            assert_eq!(index.find(&e.id), Some(*e));
        }
        for k in 0..50u64 {
            let absent = *blake3::hash(format!("absent {k}").as_bytes()).as_bytes();
            assert_eq!(index.find(&absent), None);
        }
        // Of another directory, or out of order: not used.
        assert!(ChunkIndex::open(&file, 43).is_none());
        let (a, b) = (INDEX_ENTRY * 3, INDEX_ENTRY * 4);
        let base = out.len() - want.len() * INDEX_ENTRY;
        let mut swapped = out.clone();
        swapped[base + a..base + b].copy_from_slice(&out[base + b..base + b + INDEX_ENTRY]);
        swapped[base + b..base + b + INDEX_ENTRY].copy_from_slice(&out[base + a..base + b]);
        fs::write(&file, &swapped).unwrap();
        assert!(ChunkIndex::open(&file, 42).is_none());
    }

    #[test]
    fn a_changed_chunk_is_sent_against_the_old_ones_in_its_place() {
        let c = |n: u8| ChunkId([n; 32]);
        let all = |_: &ChunkId| true;
        // Changed in place: each new chunk against the old one it replaced.
        let old = [c(1), c(2), c(3), c(4)];
        assert_eq!(
            delta_bases(&old, &[c(1), c(20), c(30), c(4)], all),
            [(c(20), vec![c(2)]), (c(30), vec![c(3)])]
        );
        // A cut point gone: the merged chunk against both it replaced.
        assert_eq!(
            delta_bases(&old, &[c(1), c(23), c(4)], all),
            [(c(23), vec![c(2), c(3)])]
        );
        // A chunk split in two: each half against the old whole.
        assert_eq!(
            delta_bases(&old, &[c(1), c(2), c(31), c(32), c(4)], all),
            [(c(31), vec![c(3)]), (c(32), vec![c(3)])]
        );
        // Only added: against the old chunk where it went in; a new file has no base.
        assert_eq!(
            delta_bases(&old, &[c(1), c(2), c(9), c(3), c(4)], all),
            [(c(9), vec![c(3)])]
        );
        assert!(delta_bases(&[], &[c(9)], all).is_empty());
        // Only what must be sent; never more than a delta takes.
        assert_eq!(
            delta_bases(&old, &[c(1), c(20), c(30), c(4)], |id| *id != c(20)),
            [(c(30), vec![c(3)])]
        );
        let many: Vec<ChunkId> = (10..30).map(c).collect();
        let got = delta_bases(&many, &[c(99)], all);
        assert_eq!(got[0].1.len(), MAX_DELTA_BASES);
    }

    #[test]
    fn the_walk_order_is_by_component() {
        use std::cmp::Ordering::*;
        assert_eq!(walk_order(b"a/x", b"a b"), Less);
        assert_eq!(walk_order(b"a/x", b"a.txt"), Less);
        assert_eq!(walk_order(b"a", b"a/x"), Less);
        assert_eq!(walk_order(b"b", b"a/z"), Greater);
        assert_eq!(walk_order(b"d/f", b"d/f"), Equal);
    }
}
