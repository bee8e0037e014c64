//! `check`: is every snapshot whole, and is every stored byte what it should be?
//!
//! Structure (always): every index entry's pack exists and its header lists the same
//! blobs at the same places; every snapshot's trees and chunks are in the index, and
//! every file's recorded size is what its chunks add up to. With
//! `read_data`: every pack is read, its name checked against its BLAKE3, and every blob
//! opened, decompressed and re-hashed. Each damaged or missing blob is reported with
//! the snapshots and file paths it affects, so an operator knows what is at risk.
//! Index and snapshot files that cannot be read are errors too, named with what to do
//! (`haul-pbs repair index` / `repair snapshots`); the check goes on without them.

use crate::backend::FileType;
use crate::error::{DamagedFile, Error, Result};
use crate::format::pack_header::PackEntry;
use crate::repository::{decode_blob, IndexedRepository, SnapshotList, MAX_TREE_BYTES};
use crate::usage::{Marks, Usage};
use haul_protocol::tree::{NodeKind, TreeBlob};
use haul_protocol::{BlobKind, BlobRef, PackId, SnapshotId, TreeId};
use std::collections::{BTreeSet, HashMap, HashSet};

#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    pub read_data: bool,
    /// With `read_data`: read only these packs whole (the others' headers are checked).
    pub subset: Option<Subset>,
    /// With `read_data`: past this moment no more packs are read whole (their headers
    /// are still checked); the report says how many were read.
    pub deadline: Option<std::time::Instant>,
    /// Check only these snapshot files (by name): those listed before the index was
    /// loaded, while backups may go on. A snapshot committed later may use blobs of
    /// packs indexed after that load; the next check takes it.
    pub only_snapshots: Option<HashSet<String>>,
}

/// A part of the packs a check reads whole.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Subset {
    /// Part `n` of `m` (1-based): a pack belongs to exactly one part, by its id, so
    /// parts 1 to m together read every pack once.
    Part { n: u32, m: u32 },
    /// About this percentage of the packs, drawn at random for each check.
    Percent(f64),
}

impl std::fmt::Display for Subset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subset::Part { n, m } => write!(f, "{n}/{m}"),
            Subset::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Subset {
    /// `N/M` or `P%`.
    pub fn parse(text: &str) -> std::result::Result<Subset, String> {
        let bad = || {
            format!("{text:?} is not a subset: give N/M (part N of M, like 2/7) or P% (like 10%)")
        };
        if let Some(p) = text.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!("{text:?}: the percentage is from above 0 to 100"));
            }
            return Ok(Subset::Percent(p));
        }
        let (n, m) = text.split_once('/').ok_or_else(bad)?;
        let (n, m): (u32, u32) = (
            n.trim().parse().map_err(|_| bad())?,
            m.trim().parse().map_err(|_| bad())?,
        );
        if m == 0 || n == 0 || n > m {
            return Err(format!("{text:?}: part N of M needs 1 <= N <= M"));
        }
        Ok(Subset::Part { n, m })
    }

    /// Whether `pack` is in this part; `seed` draws the random share.
    pub fn holds(&self, pack: &PackId, seed: &[u8; 32]) -> bool {
        match *self {
            Subset::Part { n, m } => {
                let at = u64::from_le_bytes(pack.0[..8].try_into().expect("8 bytes"));
                at % m as u64 == (n - 1) as u64
            }
            Subset::Percent(p) => {
                let h = blake3::keyed_hash(seed, &pack.0);
                let draw = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
                (draw as f64 / u64::MAX as f64) * 100.0 < p
            }
        }
    }
}

/// A file or directory a damaged blob makes unrestorable.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Affected {
    pub snapshot: String,
    pub path: String,
}

/// A blob that is missing or damaged.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Damage {
    pub pack: Option<String>,
    pub blob: String,
    pub kind: String,
    pub reason: String,
    pub affected: Vec<Affected>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct CheckReport {
    pub snapshots: usize,
    pub packs: usize,
    /// Packs read whole (all of them with `read_data` and no subset).
    pub packs_read: usize,
    /// Packs of the subset not read because the time was up.
    pub packs_left_unread: usize,
    pub blobs: usize,
    pub trees_checked: usize,
    pub bytes_read: u64,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub damaged: Vec<Damage>,
    /// Index and snapshot files that cannot be read.
    pub damaged_files: Vec<DamagedFile>,
    /// What the snapshots do not use of what the index holds (data of forgotten
    /// snapshots, copies stored twice).
    pub unused: Unused,
}

/// The unused share of a repository (see `crate::usage`).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unused {
    pub blobs: u64,
    /// Stored bytes of those blobs.
    pub bytes: u64,
    /// Stored bytes of every indexed blob.
    pub total_bytes: u64,
    /// Packs holding only unused blobs.
    pub packs: usize,
    /// Packs holding used and unused blobs.
    pub packs_partly: usize,
}

impl Unused {
    pub fn of(usage: &crate::usage::Usage) -> Unused {
        Unused {
            blobs: usage.unused_blobs(),
            bytes: usage.unused_bytes(),
            total_bytes: usage.used_bytes() + usage.unused_bytes(),
            packs: usage.packs_unused(),
            packs_partly: usage.packs_partly_used(),
        }
    }

    /// The unused share of the stored bytes, in percent.
    pub fn percent(&self) -> f64 {
        if self.total_bytes == 0 {
            0.0
        } else {
            self.bytes as f64 * 100.0 / self.total_bytes as f64
        }
    }
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && self.damaged.is_empty()
    }
}

/// Progress callback: (packs done, packs total).
pub type Progress<'a> = &'a (dyn Fn(usize, usize) + Sync);

pub fn check(
    repo: &IndexedRepository,
    opts: &CheckOptions,
    progress: Progress<'_>,
) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    for d in repo.index().damaged() {
        report.errors.push(format!(
            "index file {d} is damaged; the packs it listed were indexed from their own headers for this check: `haul-pbs repair index` writes a new index and moves the damaged file aside"
        ));
        report.damaged_files.push(d.clone());
    }
    let mut bad: HashMap<BlobRef, (Option<PackId>, String)> = HashMap::new();
    let indexed = repo.index().packs()?;
    let on_disk: HashMap<String, u64> = repo.backend().list(FileType::Data)?.into_iter().collect();
    report.packs = indexed.len();
    report.blobs = indexed.values().map(|v| v.len()).sum();

    // Packs against the index.
    let mut done = 0;
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).expect("OS random numbers");
    let mut packs: Vec<(&PackId, &Vec<PackEntry>)> = indexed.iter().collect();
    packs.sort_by_key(|(id, _)| **id);
    for (pack, entries) in packs {
        done += 1;
        progress(done, indexed.len());
        let Some(&size) = on_disk.get(&pack.to_hex()) else {
            report.errors.push(format!(
                "pack {} is in the index but missing from data/",
                pack
            ));
            for e in entries {
                bad.insert(
                    BlobRef {
                        kind: e.kind,
                        id: e.id,
                    },
                    (Some(*pack), "its pack is missing".into()),
                );
            }
            continue;
        };
        let chosen = opts.subset.is_none_or(|s| s.holds(pack, &seed));
        let in_time = opts.deadline.is_none_or(|d| std::time::Instant::now() < d);
        if opts.read_data && chosen && !in_time {
            report.packs_left_unread += 1;
        }
        if opts.read_data && chosen && in_time {
            report.packs_read += 1;
            check_pack_data(repo, pack, size, entries, &mut report, &mut bad)?;
            continue;
        }
        match repo.read_pack_header(pack, size) {
            Ok(header) => compare_header(pack, &header, entries, &mut report, &mut bad),
            Err(e) => {
                report
                    .errors
                    .push(format!("pack {pack}: header unreadable: {e}"));
                for e in entries {
                    bad.insert(
                        BlobRef {
                            kind: e.kind,
                            id: e.id,
                        },
                        (Some(*pack), "its pack header is damaged".into()),
                    );
                }
            }
        }
    }
    let indexed_names: HashSet<String> = indexed.keys().map(|p| p.to_hex()).collect();
    let condemnations = repo.condemnations()?;
    for d in &condemnations.damaged {
        report.warnings.push(format!(
            "condemnation record {d} cannot be read: the packs it names are not deleted; remove it to let the next prune decide again"
        ));
    }
    let condemned: HashSet<String> = condemnations.packs().iter().map(|p| p.to_hex()).collect();
    let mut unindexed: Vec<(&String, &u64)> = on_disk
        .iter()
        .filter(|(name, _)| !indexed_names.contains(*name))
        .collect();
    unindexed.sort();
    for (name, size) in unindexed {
        report.warnings.push(if condemned.contains(name) {
            format!("pack {name} ({size} bytes) was condemned by a prune and is reclaimable: the prune's sweep, or the next prune, deletes it")
        } else {
            format!("pack {name} ({size} bytes) is in no index, left by an interrupted backup or prune: reclaimable; the next backup indexes it, and a prune then deletes what no snapshot uses")
        });
    }

    // Snapshots against the index.
    let SnapshotList {
        snapshots,
        damaged: damaged_snapshots,
    } = repo.read_snapshots()?;
    let snapshots: Vec<_> = match &opts.only_snapshots {
        Some(names) => snapshots
            .into_iter()
            .filter(|(id, _)| names.contains(&id.to_hex()))
            .collect(),
        None => snapshots,
    };
    for d in damaged_snapshots {
        report.errors.push(format!(
            "snapshot file {d} cannot be read, so nothing of that snapshot can be restored: `haul-pbs repair snapshots` moves it aside"
        ));
        report.damaged_files.push(d);
    }
    report.snapshots = snapshots.len();
    // A tree's mark says it was looked at (see `crate::usage`).
    let mut marks = Marks::new(repo.index().table_len());
    let mut seen_chunks: HashSet<[u8; 32]> = HashSet::new();
    for (_, snap) in &snapshots {
        let mut stack = vec![snap.tree];
        while let Some(id) = stack.pop() {
            let r = BlobRef::tree(id);
            if bad.contains_key(&r) {
                continue;
            }
            let tree = match repo.index().slot(BlobKind::Tree, &id.0)? {
                None => {
                    bad.insert(r, (None, "not in the index".into()));
                    continue;
                }
                Some(slot) if !marks.set(slot) => continue,
                Some(_) => match repo.load_tree(&id) {
                    Ok(t) => t,
                    Err(e) => {
                        bad.insert(r, (None, format!("unreadable: {e}")));
                        continue;
                    }
                },
            };
            report.trees_checked += 1;
            let tree = match tree {
                TreeBlob::Nodes(t) => t,
                TreeBlob::Pages(p) => {
                    stack.extend(p.pages.iter().map(|p| p.id));
                    continue;
                }
            };
            let mut disagree = Vec::new();
            for node in &tree.nodes {
                if let Some(sub) = node.subtree {
                    stack.push(sub);
                }
                // What the chunks hold, as far as the index knows them.
                let mut held = Some(0u64);
                for c in &node.content {
                    match repo.index().slot(BlobKind::Data, &c.0)? {
                        Some(slot) => {
                            marks.set(slot);
                            let (_, _, raw_length) = repo.index().slot_entry(slot);
                            held = held.map(|h| h + raw_length as u64);
                        }
                        None => {
                            held = None;
                            if seen_chunks.insert(c.0) {
                                bad.entry(BlobRef::data(*c))
                                    .or_insert((None, "not in the index".into()));
                            }
                        }
                    }
                }
                match held {
                    Some(h) if node.kind == NodeKind::File && h != node.size => {
                        disagree.push(format!(
                            "file {:?} records {} bytes but its chunks hold {h}",
                            String::from_utf8_lossy(&node.name),
                            node.size
                        ))
                    }
                    _ => {}
                }
            }
            // A file whose size and content disagree cannot be restored as recorded.
            if !disagree.is_empty() {
                bad.insert(r, (None, disagree.join("; ")));
            }
        }
    }

    report.unused = Unused::of(&Usage::of(repo.index(), &marks));

    if !bad.is_empty() {
        report.damaged = locate(repo, &snapshots, bad)?;
        for d in &report.damaged {
            report.errors.push(format!(
                "{} blob {} ({}): affects {} path(s)",
                d.kind,
                &d.blob[..16],
                d.reason,
                d.affected.len()
            ));
        }
    }
    Ok(report)
}

fn compare_header(
    pack: &PackId,
    header: &[PackEntry],
    entries: &[PackEntry],
    report: &mut CheckReport,
    bad: &mut HashMap<BlobRef, (Option<PackId>, String)>,
) {
    let in_header: HashMap<([u8; 32], BlobKind), &PackEntry> =
        header.iter().map(|e| ((e.id, e.kind), e)).collect();
    for e in entries {
        match in_header.get(&(e.id, e.kind)) {
            Some(h) if h.offset == e.offset && h.length == e.length => {}
            Some(_) => {
                report.errors.push(format!(
                    "pack {pack}: blob {} at a different place than the index says",
                    hex::encode(e.id)
                ));
                bad.insert(
                    BlobRef {
                        kind: e.kind,
                        id: e.id,
                    },
                    (Some(*pack), "index and pack header disagree".into()),
                );
            }
            None => {
                report.errors.push(format!(
                    "pack {pack}: blob {} listed in the index is not in the pack",
                    hex::encode(e.id)
                ));
                bad.insert(
                    BlobRef {
                        kind: e.kind,
                        id: e.id,
                    },
                    (Some(*pack), "not in its pack".into()),
                );
            }
        }
    }
}

fn check_pack_data(
    repo: &IndexedRepository,
    pack: &PackId,
    size: u64,
    entries: &[PackEntry],
    report: &mut CheckReport,
    bad: &mut HashMap<BlobRef, (Option<PackId>, String)>,
) -> Result<()> {
    let bytes = repo.backend().read(FileType::Data, &pack.to_hex())?;
    report.bytes_read += bytes.len() as u64;
    if PackId::of(&bytes) != *pack {
        report.errors.push(format!(
            "pack {pack}: content does not match its name (damaged on disk)"
        ));
    }
    match repo.read_pack_header(pack, size) {
        Ok(header) => compare_header(pack, &header, entries, report, bad),
        Err(e) => report
            .errors
            .push(format!("pack {pack}: header unreadable: {e}")),
    }
    let max = repo.config().chunker.max_size as usize;
    for e in entries {
        let r = BlobRef {
            kind: e.kind,
            id: e.id,
        };
        let end = e.offset as usize + e.length as usize;
        let Some(sealed) = bytes.get(e.offset as usize..end) else {
            bad.insert(r, (Some(*pack), "beyond the end of its pack".into()));
            continue;
        };
        let limit = if e.kind == BlobKind::Data {
            max
        } else {
            MAX_TREE_BYTES
        };
        let what = format!("{} blob {}", e.kind, hex::encode(&e.id[..8]));
        match decode_blob(
            repo.data_key(),
            e.kind,
            &e.id,
            sealed.to_vec(),
            limit,
            &what,
        ) {
            Ok(plain) if e.kind == BlobKind::Tree => {
                if let Err(err) = TreeBlob::decode(&plain) {
                    bad.insert(r, (Some(*pack), format!("tree does not parse: {err}")));
                }
            }
            Ok(_) => {}
            Err(Error::Corrupt { detail, .. }) => {
                bad.insert(r, (Some(*pack), detail));
            }
            Err(other) => return Err(other),
        }
    }
    Ok(())
}

/// Finds the snapshot paths that depend on each bad blob.
fn locate(
    repo: &IndexedRepository,
    snapshots: &[(SnapshotId, crate::format::snapshot::Snapshot)],
    bad: HashMap<BlobRef, (Option<PackId>, String)>,
) -> Result<Vec<Damage>> {
    let mut affected: HashMap<BlobRef, BTreeSet<Affected>> = HashMap::new();
    // Trees known to hold no bad blob anywhere below, to skip them on later snapshots.
    let mut clean: HashSet<TreeId> = HashSet::new();
    for (sid, snap) in snapshots {
        let root = BlobRef::tree(snap.tree);
        if bad.contains_key(&root) {
            affected.entry(root).or_default().insert(Affected {
                snapshot: sid.short(),
                path: "/".into(),
            });
            continue;
        }
        walk(
            repo,
            &sid.short(),
            snap.tree,
            "",
            &bad,
            &mut clean,
            &mut affected,
        )?;
    }
    let mut out: Vec<Damage> = bad
        .into_iter()
        .map(|(r, (pack, reason))| Damage {
            pack: pack.map(|p| p.to_hex()),
            blob: r.to_hex(),
            kind: r.kind.to_string(),
            reason,
            affected: affected
                .remove(&r)
                .map(|s| s.into_iter().collect())
                .unwrap_or_default(),
        })
        .collect();
    out.sort_by(|a, b| a.blob.cmp(&b.blob));
    Ok(out)
}

/// Returns whether anything below `id` is bad.
fn walk(
    repo: &IndexedRepository,
    snapshot: &str,
    id: TreeId,
    path: &str,
    bad: &HashMap<BlobRef, (Option<PackId>, String)>,
    clean: &mut HashSet<TreeId>,
    affected: &mut HashMap<BlobRef, BTreeSet<Affected>>,
) -> Result<bool> {
    if clean.contains(&id) {
        return Ok(false);
    }
    // What the tree refers to, each under the path it stands for; a page's entries
    // stand under the directory's path, as its own would.
    let mut refs: Vec<(BlobRef, String)> = Vec::new();
    match repo.load_tree(&id) {
        Ok(TreeBlob::Pages(p)) => refs.extend(
            p.pages
                .iter()
                .map(|p| (BlobRef::tree(p.id), path.to_string())),
        ),
        Ok(TreeBlob::Nodes(t)) => {
            for node in &t.nodes {
                let child = format!("{path}/{}", String::from_utf8_lossy(&node.name));
                refs.extend(
                    node.content
                        .iter()
                        .map(|c| (BlobRef::data(*c), child.clone())),
                );
                refs.extend(node.subtree.map(|sub| (BlobRef::tree(sub), child)));
            }
        }
        Err(_) => return Ok(true),
    }
    let mut any = false;
    for (r, at) in refs {
        if bad.contains_key(&r) {
            affected.entry(r).or_default().insert(Affected {
                snapshot: snapshot.into(),
                path: at,
            });
            any = true;
        } else if r.kind == BlobKind::Tree
            && walk(repo, snapshot, TreeId(r.id), &at, bad, clean, affected)?
        {
            any = true;
        }
    }
    if !any {
        clean.insert(id);
    }
    Ok(any)
}
