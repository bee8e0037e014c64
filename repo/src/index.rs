//! The in-memory index: blob → (pack, offset, length, raw length), at 24 bytes of RAM
//! per blob, and its local cache.
//!
//! # Why 24 bytes, and why that is safe
//!
//! A full entry (32-byte id, pack, offset, length, raw length) takes 48 bytes; the
//! budget is 32. RAM holds a sorted table of [`Entry`]s keyed by the first 8 bytes of
//! the id (24 bytes each, plus 32 bytes per *pack*, and a pack holds many blobs). The
//! full ids live on disk in the local index cache, in the same order, and every hit in
//! RAM is **confirmed against the full id** with one positional read before it is
//! believed. So a truncated-key collision can never make the index answer "present"
//! for a blob it does not hold (which would silently drop data from a backup); at worst
//! several entries share a prefix and each is checked in turn. With 2^64 prefixes, even
//! 10^9 blobs give an expected number of colliding pairs of about 0.03, so the extra
//! reads cost nothing in practice.
//!
//! # The cache
//!
//! Opening a repository must not decrypt every index file on every pull. The cache file
//! (`<cache dir>/<repo id>/index.cache`, mode 0600 in a 0700 directory) holds the merged
//! table and records the names and sizes of the index files it covers. On open, if the
//! repository has new index files, only those are read and merged in; if index files
//! were removed (prune), the cache is rebuilt from all of them. The cache is a local
//! optimisation: it is checked by a BLAKE3 sum over everything RAM is loaded from, and
//! rebuilt when damaged.
//!
//! Merging or rebuilding briefly holds full entries (48 bytes each); steady state is
//! the 24-byte table.
//!
//! Blobs added since the load are kept apart, compactly ([`added`]).

use crate::backend::{Backend, FileType};
use crate::crypto::Key;
use crate::error::{DamagedFile, Error, Result};
use crate::format::index_file::{self, IndexedPack};
use crate::format::{ad, pack_header::PackEntry};
use haul_protocol::{BlobKind, BlobRef, PackId};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

mod added;
use added::Added;

/// Where a blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: PackId,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
}

impl BlobLocation {
    /// The place an in-memory entry gives: its pack a position in `packs`, then its
    /// offset, stored length and plain length.
    pub(crate) fn in_packs(
        packs: &[PackId],
        pack: u32,
        [offset, length, raw_length]: [u32; 3],
    ) -> Self {
        BlobLocation {
            pack: packs[pack as usize],
            offset,
            length,
            raw_length,
        }
    }
}

/// One blob in RAM: 24 bytes.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Entry {
    prefix: u64,
    pack: u32,
    offset: u32,
    length: u32,
    raw_length: u32,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 24);
const ENTRY_BYTES: usize = 24;

fn prefix_of(id: &[u8; 32]) -> u64 {
    u64::from_be_bytes(id[..8].try_into().expect("8 bytes"))
}

/// Bits of an id that pick its bucket in a [`Table`]'s fan-out.
const FANOUT_BITS: u32 = 16;

/// One kind's loaded entries, sorted by id, and where each bucket of ids (their first
/// [`FANOUT_BITS`] bits) starts: a look-up searches the few entries of its bucket (76 in
/// five million), a cache line or two, where a binary search over the whole table costs
/// a cache miss at each of its 22 steps. The fan-out is 256 KiB.
struct Table {
    entries: Vec<Entry>,
    /// `starts[b]` is the first entry of bucket `b`; one more than there are buckets.
    starts: Vec<u32>,
}

impl Table {
    fn new(entries: Vec<Entry>) -> Table {
        let mut starts = vec![0u32; (1 << FANOUT_BITS) + 1];
        for e in &entries {
            starts[Table::bucket(e.prefix) + 1] += 1;
        }
        for b in 1..starts.len() {
            starts[b] += starts[b - 1];
        }
        Table { entries, starts }
    }

    fn bucket(prefix: u64) -> usize {
        (prefix >> (64 - FANOUT_BITS)) as usize
    }

    /// The positions of the entries whose prefix is `prefix`.
    fn with_prefix(&self, prefix: u64) -> std::ops::Range<usize> {
        let b = Table::bucket(prefix);
        let (lo, hi) = (self.starts[b] as usize, self.starts[b + 1] as usize);
        let bucket = &self.entries[lo..hi];
        let start = bucket.partition_point(|e| e.prefix < prefix);
        let end = start + bucket[start..].partition_point(|e| e.prefix == prefix);
        lo + start..lo + end
    }

    fn bytes(&self) -> usize {
        self.entries.capacity() * ENTRY_BYTES + self.starts.capacity() * 4
    }
}

impl std::ops::Deref for Table {
    type Target = [Entry];

    fn deref(&self) -> &[Entry] {
        &self.entries
    }
}

/// A full index entry, used while building.
#[derive(Debug, Clone, Copy)]
struct FullEntry {
    id: [u8; 32],
    pack: u32,
    offset: u32,
    length: u32,
    raw_length: u32,
}

/// Where full ids are read from to confirm a hit.
struct IdStore {
    file: File,
    /// Byte offset of each kind's id column.
    data_ids: u64,
    tree_ids: u64,
}

pub struct Index {
    packs: Vec<PackId>,
    data: Table,
    tree: Table,
    ids: IdStore,
    /// Blobs stored by this process since the index was loaded.
    added: RwLock<Added>,
    /// Index files the table covers: name → size.
    covered: Files,
    /// Index files skipped because they do not verify.
    damaged: Vec<DamagedFile>,
}

const MAGIC: &[u8; 8] = b"HAULIDX2";

/// Index files by name, with their sizes.
type Files = BTreeMap<String, u64>;

impl Index {
    /// Loads the index of `backend`, using and refreshing the cache in `cache_dir` (or a
    /// private temporary file when there is none).
    ///
    /// An index file that does not verify (damaged, truncated) is skipped and listed in
    /// [`Index::damaged`]; it is never recorded as covered by the cache, so every load
    /// meets it again until it is repaired. A cache that cannot be written (a full or
    /// read-only disk) does not fail the load: the table goes to a private temporary
    /// file instead, or to memory when even that has no room.
    ///
    /// An index file deleted between the listing and its reading (a prune replaced it)
    /// makes the load start again from a new listing, which holds its replacement.
    pub fn load(backend: &dyn Backend, key: &Key, cache_dir: Option<&Path>) -> Result<Index> {
        let mut attempt = 1;
        loop {
            match Index::load_once(backend, key, cache_dir) {
                Err(Error::NotFound { what }) if attempt < 5 => {
                    tracing::debug!("{what} went away while the index was loaded: again");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn load_once(backend: &dyn Backend, key: &Key, cache_dir: Option<&Path>) -> Result<Index> {
        let names: Files = backend.list(FileType::Index)?.into_iter().collect();
        let mut damaged = Vec::new();
        let cache_path = cache_dir.map(|d| d.join("index.cache"));
        if let Some(path) = &cache_path {
            match read_cache(path) {
                Ok(Some(index)) if index.covered == names => return Ok(index),
                // A covered file whose size changed (truncated) is not a subset: the
                // cache is rebuilt, and the damage found, not hidden.
                Ok(Some(mut index))
                    if index
                        .covered
                        .iter()
                        .all(|(n, size)| names.get(n) == Some(size)) =>
                {
                    let new: Vec<(&String, &u64)> = names
                        .iter()
                        .filter(|(n, _)| !index.covered.contains_key(*n))
                        .collect();
                    tracing::debug!(new = new.len(), "merging new index files into the cache");
                    let mut packs = index.packs.clone();
                    let mut added = (Vec::new(), Vec::new());
                    let mut covered = index.covered.clone();
                    for (name, size) in new {
                        if add_or_note(backend, key, name, &mut packs, &mut added, &mut damaged)? {
                            covered.insert(name.clone(), *size);
                        }
                    }
                    if covered.len() == index.covered.len() {
                        // Only damaged files were new: the cache stays as it is.
                        index.damaged = damaged;
                        return Ok(index);
                    }
                    sort_dedup(&mut added);
                    let merged = write_cache_file(path, |file| {
                        write_merged_cache(file, &covered, &packs, &index, &added)
                    });
                    match merged {
                        Ok(()) => {
                            drop((index, added));
                            let mut index = read_cache(path)?.ok_or_else(|| {
                                Error::corrupt(
                                    path.display().to_string(),
                                    "index cache unreadable right after writing it",
                                )
                            })?;
                            index.damaged = damaged;
                            return Ok(index);
                        }
                        Err(Error::Io { source, .. })
                            if source.kind() == std::io::ErrorKind::InvalidData =>
                        {
                            tracing::warn!(
                                "index cache {} damaged ({source}): rebuilding it",
                                path.display()
                            );
                            damaged.clear();
                        }
                        Err(e) => {
                            tracing::warn!("the index cache could not be written, so this run reads the index without it: {e}");
                            let mut full = index.full_entries()?;
                            full.0.append(&mut added.0);
                            full.1.append(&mut added.1);
                            return finish(None, &covered, packs, full, damaged);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("index cache {} unusable, rebuilding: {e}", path.display())
                }
            }
        }
        let mut packs = Vec::new();
        let mut full = (Vec::new(), Vec::new());
        let mut covered = Files::new();
        for (name, size) in &names {
            if add_or_note(backend, key, name, &mut packs, &mut full, &mut damaged)? {
                covered.insert(name.clone(), *size);
            }
        }
        finish(cache_path.as_deref(), &covered, packs, full, damaged)
    }

    /// The index files that were skipped because they do not verify.
    pub fn damaged(&self) -> &[DamagedFile] {
        &self.damaged
    }

    /// Number of blobs known (loaded plus added).
    pub fn len(&self) -> usize {
        self.data.len() + self.tree.len() + self.added.read().expect("index").len()
    }

    /// Number of blobs this process added since the table was loaded.
    pub fn added_len(&self) -> usize {
        self.added.read().expect("index").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resident bytes of the loaded table (entries plus pack ids), for the benchmark.
    pub fn table_bytes(&self) -> usize {
        self.data.bytes() + self.tree.bytes() + self.packs.capacity() * 32
    }

    /// Where blob `id` of `kind` is, if the repository holds it.
    pub fn get(&self, kind: BlobKind, id: &[u8; 32]) -> Result<Option<BlobLocation>> {
        if let Some(loc) = self.added.read().expect("index").get(kind, id) {
            return Ok(Some(loc));
        }
        Ok(self
            .table_position(kind, id)?
            .map(|(table, i)| self.location(&table[i])))
    }

    /// The loaded table of `kind` and the position of blob `id` in it, confirmed
    /// against the full id.
    fn table_position(&self, kind: BlobKind, id: &[u8; 32]) -> Result<Option<(&[Entry], usize)>> {
        let (table, column) = match kind {
            BlobKind::Data => (&self.data, self.ids.data_ids),
            BlobKind::Tree => (&self.tree, self.ids.tree_ids),
        };
        for i in table.with_prefix(prefix_of(id)) {
            let mut full = [0u8; 32];
            self.ids
                .file
                .read_exact_at(&mut full, column + (i * 32) as u64)
                .map_err(Error::io("index cache"))?;
            if full == *id {
                return Ok(Some((table, i)));
            }
        }
        Ok(None)
    }

    /// Blobs of the loaded table (not those this process added since): the slots of
    /// [`Index::slot`], data blobs first, then trees.
    pub fn table_len(&self) -> usize {
        self.data.len() + self.tree.len()
    }

    /// Where blob `id` of `kind` sits in the loaded table, for a bit per blob (see
    /// `usage.rs`); `None` if the table does not hold it. A blob stored twice has the
    /// slot of the copy the table keeps.
    pub fn slot(&self, kind: BlobKind, id: &[u8; 32]) -> Result<Option<usize>> {
        Ok(self.table_position(kind, id)?.map(|(_, i)| match kind {
            BlobKind::Data => i,
            BlobKind::Tree => self.data.len() + i,
        }))
    }

    /// Where blob `id` of `kind` is, with a number that stays its own while this index
    /// lives: its slot in the loaded table (as [`Index::slot`]), or, for a blob only
    /// this process added since, a number past the table, in the order of adding. A
    /// session keeps a bit per blob by it ([`crate::usage::Marks`]), not a set of ids.
    pub fn locate(&self, kind: BlobKind, id: &[u8; 32]) -> Result<Option<(usize, BlobLocation)>> {
        if let Some((table, i)) = self.table_position(kind, id)? {
            let slot = match kind {
                BlobKind::Data => i,
                BlobKind::Tree => self.data.len() + i,
            };
            return Ok(Some((slot, self.location(&table[i]))));
        }
        let added = self.added.read().expect("index");
        Ok(added
            .locate(kind, id)
            .map(|(n, loc)| (self.table_len() + n as usize, loc)))
    }

    fn location(&self, e: &Entry) -> BlobLocation {
        BlobLocation::in_packs(&self.packs, e.pack, [e.offset, e.length, e.raw_length])
    }

    /// The pack (a position in [`Index::table_packs`]), stored length and plain length
    /// of the blob in `slot`.
    pub fn slot_entry(&self, slot: usize) -> (u32, u32, u32) {
        let e = match slot.checked_sub(self.data.len()) {
            None => &self.data[slot],
            Some(t) => &self.tree[t],
        };
        (e.pack, e.length, e.raw_length)
    }

    /// The blob in `slot`: its kind, full id and place.
    pub fn slot_blob(&self, slot: usize) -> Result<(BlobKind, [u8; 32], BlobLocation)> {
        let (kind, table, column, i) = match slot.checked_sub(self.data.len()) {
            None => (BlobKind::Data, &self.data, self.ids.data_ids, slot),
            Some(t) => (BlobKind::Tree, &self.tree, self.ids.tree_ids, t),
        };
        let mut id = [0u8; 32];
        self.ids
            .file
            .read_exact_at(&mut id, column + (i * 32) as u64)
            .map_err(Error::io("index cache"))?;
        Ok((kind, id, self.location(&table[i])))
    }

    /// The packs the loaded table refers to.
    pub fn table_packs(&self) -> &[PackId] {
        &self.packs
    }

    pub fn contains(&self, kind: BlobKind, id: &[u8; 32]) -> Result<bool> {
        Ok(self.get(kind, id)?.is_some())
    }

    /// Every pack the index knows.
    pub fn pack_ids(&self) -> std::collections::HashSet<PackId> {
        let mut out: std::collections::HashSet<PackId> = self.packs.iter().copied().collect();
        out.extend(self.added.read().expect("index").packs().iter().copied());
        out
    }

    /// Records blobs of a pack this process has just written.
    pub fn add_pack(&self, pack: PackId, entries: &[PackEntry]) {
        let mut added = self.added.write().expect("index");
        for e in entries {
            added.insert(
                BlobRef {
                    kind: e.kind,
                    id: e.id,
                },
                BlobLocation {
                    pack,
                    offset: e.offset,
                    length: e.length,
                    raw_length: e.raw_length,
                },
            );
        }
    }

    /// Every pack the loaded table refers to, with its blobs (for `check`).
    pub fn packs(&self) -> Result<HashMap<PackId, Vec<PackEntry>>> {
        let mut out: HashMap<PackId, Vec<PackEntry>> = HashMap::new();
        let (data, tree) = self.full_entries()?;
        for (kind, list) in [(BlobKind::Data, data), (BlobKind::Tree, tree)] {
            for e in list {
                out.entry(self.packs[e.pack as usize])
                    .or_default()
                    .push(PackEntry {
                        kind,
                        id: e.id,
                        offset: e.offset,
                        length: e.length,
                        raw_length: e.raw_length,
                    });
            }
        }
        for (r, loc) in self.added.read().expect("index").entries() {
            out.entry(loc.pack).or_default().push(PackEntry {
                kind: r.kind,
                id: r.id,
                offset: loc.offset,
                length: loc.length,
                raw_length: loc.raw_length,
            });
        }
        for v in out.values_mut() {
            v.sort_by_key(|e| e.offset);
        }
        Ok(out)
    }

    fn full_entries(&self) -> Result<(Vec<FullEntry>, Vec<FullEntry>)> {
        let read = |table: &[Entry], column: u64| -> Result<Vec<FullEntry>> {
            let mut ids = vec![0u8; table.len() * 32];
            self.ids
                .file
                .read_exact_at(&mut ids, column)
                .map_err(Error::io("index cache"))?;
            Ok(table
                .iter()
                .zip(ids.chunks_exact(32))
                .map(|(e, id)| FullEntry {
                    id: id.try_into().expect("32 bytes"),
                    pack: e.pack,
                    offset: e.offset,
                    length: e.length,
                    raw_length: e.raw_length,
                })
                .collect())
        };
        Ok((
            read(&self.data, self.ids.data_ids)?,
            read(&self.tree, self.ids.tree_ids)?,
        ))
    }
}

type Full = (Vec<FullEntry>, Vec<FullEntry>);

/// Adds the entries of index file `name`; if it does not verify, notes it in
/// `damaged` instead and returns `false`.
fn add_or_note(
    backend: &dyn Backend,
    key: &Key,
    name: &str,
    packs: &mut Vec<PackId>,
    full: &mut Full,
    damaged: &mut Vec<DamagedFile>,
) -> Result<bool> {
    match add_index_file(backend, key, name, packs, full) {
        Ok(()) => Ok(true),
        Err(e @ Error::Corrupt { .. }) => {
            damaged.push(DamagedFile::new(FileType::Index, name, &e));
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Adds the entries of index file `name` (nothing when it does not verify).
fn add_index_file(
    backend: &dyn Backend,
    key: &Key,
    name: &str,
    packs: &mut Vec<PackId>,
    full: &mut Full,
) -> Result<()> {
    add_packs(packs, full, read_index_file(backend, key, name)?);
    Ok(())
}

/// The packs index file `name` lists, verified.
pub(crate) fn read_index_file(
    backend: &dyn Backend,
    key: &Key,
    name: &str,
) -> Result<Vec<IndexedPack>> {
    let what = format!("index file {name}");
    let plain =
        crate::repository::read_named(backend, key, FileType::Index, name, ad::INDEX, &what)?;
    index_file::decode(&plain).map_err(|d| Error::corrupt(&what, d))
}

/// Adds the blobs of `decoded` to the table being built.
fn add_packs(packs: &mut Vec<PackId>, full: &mut Full, decoded: Vec<IndexedPack>) {
    let mut pack_pos: HashMap<PackId, u32> = packs
        .iter()
        .enumerate()
        .map(|(i, p)| (*p, i as u32))
        .collect();
    for p in decoded {
        let idx = *pack_pos.entry(p.pack).or_insert_with(|| {
            packs.push(p.pack);
            (packs.len() - 1) as u32
        });
        for b in p.blobs {
            let e = FullEntry {
                id: b.id,
                pack: idx,
                offset: b.offset,
                length: b.length,
                raw_length: b.raw_length,
            };
            match b.kind {
                BlobKind::Data => full.0.push(e),
                BlobKind::Tree => full.1.push(e),
            }
        }
    }
}

/// Cache layout:
/// ```text
/// "HAULIDX2" names:u32 (name[32] size:u64)* packs:u32 pack[32]* data:u64 tree:u64
/// entry[24]*data entry[24]*tree  sum[32]   id[32]*data id[32]*tree
/// ```
/// `sum` is BLAKE3 of everything before it (what RAM is loaded from). Entries are sorted
/// by full id; duplicates (a blob in two packs) keep the one of the pack met first.
fn write_cache(file: File, names: &Files, packs: &[PackId], full: &Full) -> std::io::Result<()> {
    let counts = (full.0.len() as u64, full.1.len() as u64);
    write_cache_of(file, names, packs, counts, &mut |kind, f| {
        for e in [&full.0, &full.1][kind] {
            f(e)?;
        }
        Ok(())
    })
}

/// Calls `f` with each entry of one kind (0 data, 1 tree), in the cache's order.
type EachEntry<'a> =
    dyn FnMut(usize, &mut dyn FnMut(&FullEntry) -> std::io::Result<()>) -> std::io::Result<()> + 'a;

/// [`write_cache`] of `counts` entries (data, tree) that `each` gives, twice: for the
/// table, then for the ids.
fn write_cache_of(
    file: File,
    names: &Files,
    packs: &[PackId],
    counts: (u64, u64),
    each: &mut EachEntry<'_>,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut h = blake3::Hasher::new();
    let mut put = |w: &mut BufWriter<File>, b: &[u8]| -> std::io::Result<()> {
        h.update(b);
        w.write_all(b)
    };
    put(&mut w, MAGIC)?;
    put(&mut w, &(names.len() as u32).to_le_bytes())?;
    for (n, size) in names {
        let mut raw = [0u8; 32];
        hex::decode_to_slice(n, &mut raw).map_err(|_| std::io::Error::other("bad index name"))?;
        put(&mut w, &raw)?;
        put(&mut w, &size.to_le_bytes())?;
    }
    put(&mut w, &(packs.len() as u32).to_le_bytes())?;
    for p in packs {
        put(&mut w, &p.0)?;
    }
    put(&mut w, &counts.0.to_le_bytes())?;
    put(&mut w, &counts.1.to_le_bytes())?;
    for (kind, count) in [counts.0, counts.1].into_iter().enumerate() {
        let mut n = 0u64;
        each(kind, &mut |e| {
            n += 1;
            let mut b = [0u8; ENTRY_BYTES];
            b[..8].copy_from_slice(&prefix_of(&e.id).to_le_bytes());
            b[8..12].copy_from_slice(&e.pack.to_le_bytes());
            b[12..16].copy_from_slice(&e.offset.to_le_bytes());
            b[16..20].copy_from_slice(&e.length.to_le_bytes());
            b[20..24].copy_from_slice(&e.raw_length.to_le_bytes());
            put(&mut w, &b)
        })?;
        if n != count {
            // Ids in the old cache that do not match its table (they are not under its
            // checksum): it is rebuilt.
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the index cache's ids do not match its table",
            ));
        }
    }
    let sum = *h.finalize().as_bytes();
    w.write_all(&sum)?;
    for kind in 0..2 {
        each(kind, &mut |e| w.write_all(&e.id))?;
    }
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()
}

/// Writes the cache of `old`'s table merged with `new` (sorted and deduplicated, its
/// pack numbers after `old`'s): what [`write_cache`] writes from all their entries, but
/// `old`'s full ids are streamed from its cache file (twice: for the table, for the
/// ids), never held in memory; the counts are `old`'s and `new`'s less the new entries
/// `old` has already. Loading a repository of ten million
/// blobs after another process added a few then holds its table (24 bytes a blob) and
/// the new entries, not 48 bytes more per blob.
fn write_merged_cache(
    file: File,
    names: &Files,
    packs: &[PackId],
    old: &Index,
    new: &Full,
) -> std::io::Result<()> {
    let tables = [
        (&old.data, old.ids.data_ids, &new.0),
        (&old.tree, old.ids.tree_ids, &new.1),
    ];
    let mut merge = |kind: usize, f: &mut dyn FnMut(&FullEntry) -> std::io::Result<()>| {
        let (table, column, new) = tables[kind];
        merge_entries(table, &old.ids.file, column, new, f)
    };
    let mut counts = [0u64; 2];
    for (count, (kind, (table, _, new))) in counts
        .iter_mut()
        .zip([BlobKind::Data, BlobKind::Tree].into_iter().zip(tables))
    {
        let mut known = 0;
        for e in new.iter() {
            let found = old
                .table_position(kind, &e.id)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            known += found.is_some() as usize;
        }
        *count = (table.len() + new.len() - known) as u64;
    }
    write_cache_of(file, names, packs, (counts[0], counts[1]), &mut merge)
}

/// Ids read at once by [`merge_entries`] (1 MiB; a few in the tests, to cross batches).
#[cfg(not(test))]
const MERGE_BATCH: usize = 32 * 1024;
#[cfg(test)]
const MERGE_BATCH: usize = 7;

/// Calls `f` with the entries of `table` (their ids read from `file` at `column`) and
/// of `new`, in the order of their ids; an id in both is given once, from the pack
/// with the lower number, as [`sort_dedup`] keeps it.
fn merge_entries(
    table: &[Entry],
    file: &File,
    column: u64,
    new: &[FullEntry],
    f: &mut dyn FnMut(&FullEntry) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut new = new.iter().peekable();
    let mut last: Option<[u8; 32]> = None;
    let mut buf = vec![0u8; 32 * MERGE_BATCH];
    for (at, part) in table.chunks(MERGE_BATCH).enumerate() {
        let ids = &mut buf[..part.len() * 32];
        file.read_exact_at(ids, column + (at * 32 * MERGE_BATCH) as u64)?;
        for (e, id) in part.iter().zip(ids.chunks_exact(32)) {
            let id: [u8; 32] = id.try_into().expect("32 bytes");
            // The ids are not under the cache's checksum: ids out of order would make
            // a table whose search misses sound entries too. Such a cache is rebuilt.
            if prefix_of(&id) != e.prefix || last.is_some_and(|l| l >= id) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the index cache's ids do not match its table",
                ));
            }
            last = Some(id);
            let mut old = FullEntry {
                id,
                pack: e.pack,
                offset: e.offset,
                length: e.length,
                raw_length: e.raw_length,
            };
            while let Some(n) = new.next_if(|n| n.id < old.id) {
                f(n)?;
            }
            if let Some(n) = new.next_if(|n| n.id == old.id) {
                if n.pack < old.pack {
                    old = *n;
                }
            }
            f(&old)?;
        }
    }
    for n in new {
        f(n)?;
    }
    Ok(())
}

fn sort_dedup(full: &mut Full) {
    for list in [&mut full.0, &mut full.1] {
        list.sort_unstable_by_key(|e| (e.id, e.pack));
        list.dedup_by(|a, b| a.id == b.id);
    }
}

/// The loaded table, from the cache file at `path` (written first), or, when there is
/// none or it cannot be written, from a private file.
fn finish(
    path: Option<&Path>,
    covered: &Files,
    packs: Vec<PackId>,
    mut full: Full,
    damaged: Vec<DamagedFile>,
) -> Result<Index> {
    sort_dedup(&mut full);
    let mut index = match path {
        Some(path) => {
            match write_cache_file(path, |file| write_cache(file, covered, &packs, &full)) {
                Ok(()) => {
                    drop(full);
                    read_cache(path)?.ok_or_else(|| {
                        Error::corrupt(
                            path.display().to_string(),
                            "index cache unreadable right after writing it",
                        )
                    })?
                }
                // The cache is an optimisation: a full or read-only disk must not stop a
                // restore or a check (issue 14).
                Err(e) => {
                    tracing::warn!("the index cache could not be written, so this run reads the index without it: {e}");
                    private_index(covered, &packs, full)?
                }
            }
        }
        None => private_index(covered, &packs, full)?,
    };
    index.damaged = damaged;
    Ok(index)
}

/// Writes the cache file at `path` with `write` (through a temporary file, renamed into
/// place); removes the temporary file if that fails.
fn write_cache_file(path: &Path, write: impl FnOnce(File) -> std::io::Result<()>) -> Result<()> {
    let dir = path.parent().expect("cache file in a directory");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io(format!(
            "index cache directory {}",
            dir.display()
        )))?;
    let tmp: PathBuf = dir.join(format!("index.cache.tmp-{}", std::process::id()));
    let written = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(write)
        .and_then(|()| fs::rename(&tmp, path));
    written.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::Io {
            what: format!("index cache {}", path.display()),
            source: e,
        }
    })
}

/// The table in a private file: an unnamed temporary file, or, when the temporary
/// directory has no room either, an anonymous file in memory (the full ids then cost
/// 32 bytes of RAM per blob more).
fn private_index(names: &Files, packs: &[PackId], full: Full) -> Result<Index> {
    let write = |file: File| -> std::io::Result<File> {
        write_cache(file.try_clone()?, names, packs, &full)?;
        Ok(file)
    };
    let file = match tempfile::tempfile().and_then(write) {
        Ok(file) => file,
        Err(e) => {
            tracing::warn!(
                "no room for a temporary index file ({e}): the index is kept in memory for this run"
            );
            memory_file()
                .and_then(write)
                .map_err(Error::io("index file in memory"))?
        }
    };
    drop(full);
    parse_cache(file)?
        .ok_or_else(|| Error::corrupt("temporary index file", "unreadable right after writing it"))
}

/// An anonymous file in memory (`memfd_create`), which needs no disk space.
fn memory_file() -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    let fd = unsafe { libc::memfd_create(c"haul-index".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Reads a cache file; `Ok(None)` when there is none or it is damaged.
fn read_cache(path: &Path) -> Result<Option<Index>> {
    match File::open(path) {
        Ok(f) => parse_cache(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            what: path.display().to_string(),
            source: e,
        }),
    }
}

fn parse_cache(file: File) -> Result<Option<Index>> {
    let len = file.metadata().map_err(Error::io("index cache"))?.len();
    let mut reader = file.try_clone().map_err(Error::io("index cache"))?;
    // A duplicated descriptor shares the offset of the one that wrote the file.
    std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(0))
        .map_err(Error::io("index cache"))?;
    let mut r = BufReader::with_capacity(1 << 20, reader);
    let mut h = blake3::Hasher::new();
    let read = |r: &mut BufReader<File>, h: &mut blake3::Hasher, buf: &mut [u8]| -> Option<()> {
        r.read_exact(buf).ok()?;
        h.update(buf);
        Some(())
    };
    let parsed = (|| -> Option<Index> {
        let mut magic = [0u8; 8];
        read(&mut r, &mut h, &mut magic)?;
        if &magic != MAGIC {
            return None;
        }
        let mut n4 = [0u8; 4];
        read(&mut r, &mut h, &mut n4)?;
        let nnames = u32::from_le_bytes(n4) as u64;
        if nnames * 40 > len {
            return None;
        }
        let mut covered = Files::new();
        for _ in 0..nnames {
            let mut raw = [0u8; 32];
            read(&mut r, &mut h, &mut raw)?;
            let mut size = [0u8; 8];
            read(&mut r, &mut h, &mut size)?;
            covered.insert(hex::encode(raw), u64::from_le_bytes(size));
        }
        read(&mut r, &mut h, &mut n4)?;
        let npacks = u32::from_le_bytes(n4) as u64;
        if npacks * 32 > len {
            return None;
        }
        let mut packs = Vec::with_capacity(npacks as usize);
        for _ in 0..npacks {
            let mut raw = [0u8; 32];
            read(&mut r, &mut h, &mut raw)?;
            packs.push(PackId(raw));
        }
        let mut n8 = [0u8; 8];
        read(&mut r, &mut h, &mut n8)?;
        let ndata = u64::from_le_bytes(n8);
        read(&mut r, &mut h, &mut n8)?;
        let ntree = u64::from_le_bytes(n8);
        let header = 8 + 4 + nnames * 40 + 4 + npacks * 32 + 16;
        let body = (ndata + ntree).checked_mul(ENTRY_BYTES as u64 + 32)?;
        if header + body + 32 != len {
            return None;
        }
        let mut tables = Vec::with_capacity(2);
        for n in [ndata, ntree] {
            let mut t = Vec::with_capacity(n as usize);
            let mut b = [0u8; ENTRY_BYTES];
            for _ in 0..n {
                read(&mut r, &mut h, &mut b)?;
                let e = Entry {
                    prefix: u64::from_le_bytes(b[..8].try_into().ok()?),
                    pack: u32::from_le_bytes(b[8..12].try_into().ok()?),
                    offset: u32::from_le_bytes(b[12..16].try_into().ok()?),
                    length: u32::from_le_bytes(b[16..20].try_into().ok()?),
                    raw_length: u32::from_le_bytes(b[20..24].try_into().ok()?),
                };
                if e.pack as u64 >= npacks {
                    return None;
                }
                t.push(e);
            }
            tables.push(t);
        }
        let expected = *h.finalize().as_bytes();
        let mut sum = [0u8; 32];
        r.read_exact(&mut sum).ok()?;
        if sum != expected {
            return None;
        }
        let tree = tables.pop()?;
        let data = tables.pop()?;
        let data_ids = header + (ndata + ntree) * ENTRY_BYTES as u64 + 32;
        Some(Index {
            packs,
            ids: IdStore {
                file: r.into_inner(),
                data_ids,
                tree_ids: data_ids + ndata * 32,
            },
            data: Table::new(data),
            tree: Table::new(tree),
            added: RwLock::new(Added::default()),
            covered,
            damaged: Vec::new(),
        })
    })();
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;

    fn write_index(b: &MemoryBackend, key: &Key, packs: &[IndexedPack]) -> String {
        let sealed = key.seal(ad::INDEX, &index_file::encode(packs));
        let name = blake3::hash(&sealed).to_hex().to_string();
        b.write_once(FileType::Index, &name, &sealed).unwrap();
        name
    }

    fn entry(kind: BlobKind, id: [u8; 32], offset: u32) -> PackEntry {
        PackEntry {
            kind,
            id,
            offset,
            length: 100,
            raw_length: 90,
        }
    }

    #[test]
    fn confirms_full_ids_and_merges_new_index_files() {
        let b = MemoryBackend::default();
        let key = Key::random();
        let cache = tempfile::tempdir().unwrap();
        // Two ids sharing the 8-byte prefix: only the full id may match.
        let mut a = [7u8; 32];
        let mut c = [7u8; 32];
        a[31] = 1;
        c[31] = 2;
        let p1 = PackId([1; 32]);
        write_index(
            &b,
            &key,
            &[IndexedPack {
                pack: p1,
                blobs: vec![entry(BlobKind::Data, a, 0)],
            }],
        );
        let idx = Index::load(&b, &key, Some(cache.path())).unwrap();
        assert_eq!(idx.get(BlobKind::Data, &a).unwrap().unwrap().pack, p1);
        assert_eq!(
            idx.get(BlobKind::Data, &c).unwrap(),
            None,
            "a prefix match is not a hit"
        );
        assert_eq!(idx.get(BlobKind::Tree, &a).unwrap(), None);

        let p2 = PackId([2; 32]);
        write_index(
            &b,
            &key,
            &[IndexedPack {
                pack: p2,
                blobs: vec![entry(BlobKind::Data, c, 100), entry(BlobKind::Tree, a, 0)],
            }],
        );
        let idx = Index::load(&b, &key, Some(cache.path())).unwrap();
        assert_eq!(idx.get(BlobKind::Data, &c).unwrap().unwrap().offset, 100);
        assert_eq!(idx.get(BlobKind::Data, &a).unwrap().unwrap().pack, p1);
        assert_eq!(idx.get(BlobKind::Tree, &a).unwrap().unwrap().pack, p2);
        assert_eq!(idx.covered.len(), 2);

        // A damaged cache is rebuilt, not believed.
        let path = cache.path().join("index.cache");
        let mut bytes = fs::read(&path).unwrap();
        bytes[60] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let idx = Index::load(&b, &key, Some(cache.path())).unwrap();
        assert_eq!(idx.get(BlobKind::Data, &c).unwrap().unwrap().offset, 100);

        // Without a cache directory the same answers come from a private file.
        let idx = Index::load(&b, &key, None).unwrap();
        assert_eq!(idx.get(BlobKind::Tree, &a).unwrap().unwrap().pack, p2);
        assert_eq!(idx.len(), 3);
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(32))]
        /// Merging new index files into a cache streams the old ids from the cache
        /// file; what it writes is byte for byte what writing all the entries from
        /// memory writes (the same entries in the same order, the same copy kept of a
        /// blob stored twice), and every blob of every file is found.
        #[test]
        fn a_merged_cache_is_the_cache_of_all_entries(
            files in proptest::collection::vec(
                proptest::collection::vec((0u8..6, proptest::collection::vec((0u16..400, proptest::bool::ANY), 1..40)), 1..4),
                1..6,
            ),
        ) {
            let b = MemoryBackend::default();
            let key = Key::random();
            let cache = tempfile::tempdir().unwrap();
            let blob = |f: usize, n: u16, tree: bool| {
                let mut id = [0u8; 32];
                id[..2].copy_from_slice(&n.to_be_bytes());
                id[31] = f as u8; // ids of different files share their prefix only
                (if tree { BlobKind::Tree } else { BlobKind::Data }, id)
            };
            for (f, packs) in files.iter().enumerate() {
                let old = Index::load(&b, &key, Some(cache.path())).unwrap();
                let packs: Vec<IndexedPack> = packs.iter().map(|(pack, blobs)| IndexedPack {
                    pack: PackId([*pack; 32]),
                    blobs: blobs.iter().enumerate().map(|(i, (n, tree))| {
                        let (kind, id) = blob(f, *n, *tree);
                        entry(kind, id, i as u32 * 100)
                    }).collect(),
                }).collect();
                let name = write_index(&b, &key, &packs);
                let mut names = old.covered.clone();
                names.insert(name.clone(), 0);
                let mut pack_ids = old.packs.clone();
                let mut added = (Vec::new(), Vec::new());
                add_index_file(&b, &key, &name, &mut pack_ids, &mut added).unwrap();
                sort_dedup(&mut added);
                let merged = tempfile::tempfile().unwrap();
                write_merged_cache(merged.try_clone().unwrap(), &names, &pack_ids, &old, &added).unwrap();
                let mut all = old.full_entries().unwrap();
                all.0.extend_from_slice(&added.0);
                all.1.extend_from_slice(&added.1);
                sort_dedup(&mut all);
                let whole = tempfile::tempfile().unwrap();
                write_cache(whole.try_clone().unwrap(), &names, &pack_ids, &all).unwrap();
                let read = |mut file: File| {
                    let mut bytes = Vec::new();
                    std::io::Seek::rewind(&mut file).unwrap();
                    file.read_to_end(&mut bytes).unwrap();
                    bytes
                };
                proptest::prop_assert!(read(merged) == read(whole), "merged cache differs");
            }
            let idx = Index::load(&b, &key, Some(cache.path())).unwrap();
            for (f, packs) in files.iter().enumerate() {
                for (_, blobs) in packs {
                    for (n, tree) in blobs {
                        let (kind, id) = blob(f, *n, *tree);
                        proptest::prop_assert!(idx.get(kind, &id).unwrap().is_some());
                    }
                }
            }
        }
    }

    /// The ids of a cache are not under its checksum: a merge that meets one out of
    /// place rebuilds the cache instead of writing a table whose search would miss
    /// sound entries.
    #[test]
    fn a_merge_that_meets_a_damaged_id_rebuilds_the_cache() {
        let b = MemoryBackend::default();
        let key = Key::random();
        let cache = tempfile::tempdir().unwrap();
        let ids: Vec<[u8; 32]> = (1..=20u8).map(|n| [n; 32]).collect();
        let blobs = |range: std::ops::Range<usize>| {
            range
                .map(|i| entry(BlobKind::Data, ids[i], i as u32 * 100))
                .collect::<Vec<_>>()
        };
        let pack = |n: u8, blobs| IndexedPack {
            pack: PackId([n; 32]),
            blobs,
        };
        write_index(&b, &key, &[pack(1, blobs(0..10))]);
        Index::load(&b, &key, Some(cache.path())).unwrap();
        // The first id's prefix, in the id column at the end of the file.
        let path = cache.path().join("index.cache");
        let mut bytes = fs::read(&path).unwrap();
        let first_id = bytes.len() - 10 * 32;
        bytes[first_id] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        write_index(&b, &key, &[pack(2, blobs(10..20))]);
        let idx = Index::load(&b, &key, Some(cache.path())).unwrap();
        for id in &ids {
            assert!(idx.get(BlobKind::Data, id).unwrap().is_some());
        }
        assert!(idx.damaged().is_empty());
        // And the rebuilt cache is sound: loaded as it is, it answers the same.
        let idx = Index::load(&b, &key, Some(cache.path())).unwrap();
        assert_eq!(idx.len(), 20);
        assert!(idx.get(BlobKind::Data, &ids[0]).unwrap().is_some());
    }

    #[test]
    fn a_damaged_index_file_is_skipped_never_cached_and_never_hidden() {
        let b = MemoryBackend::default();
        let key = Key::random();
        let cache = tempfile::tempdir().unwrap();
        let (a, c) = ([1u8; 32], [2u8; 32]);
        let good = write_index(
            &b,
            &key,
            &[IndexedPack {
                pack: PackId([1; 32]),
                blobs: vec![entry(BlobKind::Data, a, 0)],
            }],
        );
        let other = write_index(
            &b,
            &key,
            &[IndexedPack {
                pack: PackId([2; 32]),
                blobs: vec![entry(BlobKind::Data, c, 0)],
            }],
        );
        // Cached while sound, then truncated: the cache must not hide it.
        Index::load(&b, &key, Some(cache.path())).unwrap();
        let mut bytes = b.read(FileType::Index, &other).unwrap();
        bytes.truncate(bytes.len() - 5);
        b.delete(FileType::Index, &other).unwrap();
        b.write_once(FileType::Index, &other, &bytes).unwrap();
        for _ in 0..2 {
            let idx = Index::load(&b, &key, Some(cache.path())).unwrap();
            assert_eq!(idx.damaged().len(), 1);
            assert_eq!(idx.damaged()[0].name, other);
            assert!(idx.covered.contains_key(&good));
            assert!(!idx.covered.contains_key(&other), "damage is never covered");
            assert!(idx.get(BlobKind::Data, &a).unwrap().is_some());
            assert!(idx.get(BlobKind::Data, &c).unwrap().is_none());
        }
        let cached = read_cache(&cache.path().join("index.cache"))
            .unwrap()
            .unwrap();
        assert_eq!(cached.covered.keys().collect::<Vec<_>>(), vec![&good]);

        // A cache that cannot be written (here its directory is a file) fails nothing.
        let blocked = cache.path().join("blocked");
        fs::write(&blocked, b"not a directory").unwrap();
        let idx = Index::load(&b, &key, Some(&blocked)).unwrap();
        assert!(idx.get(BlobKind::Data, &a).unwrap().is_some());
        assert_eq!(idx.damaged().len(), 1);
    }
}
