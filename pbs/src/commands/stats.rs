//! `stats [SNAP...] [--mode restore-size|raw-data]`: how big the selected snapshots
//! are (restic's `stats`), from their trees and the index, reading no content.
//!
//! - `restore-size`: what a restore of each would write, added up (files, bytes).
//! - `raw-data`: the distinct blobs they use, once each: their count, plain size and
//!   stored size, the packs that hold them, and the ratios that follow: deduplication
//!   (restore size / plain size of the distinct chunks) and compression (plain /
//!   stored).

use super::Context;
use crate::cli::{StatsArgs, StatsMode};
use crate::error::CliError;
use crate::output::bytes;
use haul_protocol::tree::{for_each_page, NodeKind};
use haul_protocol::{BlobKind, TreeId};
use haul_repo::IndexedRepository;
use std::collections::{HashMap, HashSet};

/// The figures `stats` prints.
#[derive(Debug, Default, serde::Serialize)]
pub struct Stats {
    pub snapshots: u64,
    /// Files (and their bytes) a restore of each snapshot would write, added up.
    pub files: u64,
    pub restore_size: u64,
    /// Distinct blobs (chunks and trees) the snapshots use, once each.
    pub blobs: u64,
    pub chunks: u64,
    pub trees: u64,
    /// Their plain size and their size in the packs (compressed, encrypted).
    pub raw_size: u64,
    pub stored_size: u64,
    /// Packs holding at least one of them.
    pub packs: u64,
    /// restore_size / plain size of the distinct chunks.
    pub dedup_ratio: f64,
    /// raw_size / stored_size.
    pub compression_ratio: f64,
}

struct Walk<'a> {
    repo: &'a IndexedRepository,
    raw: bool,
    /// The files and file bytes below each tree walked, by its id: a tree shared by
    /// snapshots (or directories) is read once and counted each time.
    sizes: HashMap<TreeId, (u64, u64)>,
    trees: HashSet<TreeId>,
    chunks: HashSet<haul_protocol::ChunkId>,
    packs: HashSet<haul_protocol::PackId>,
    stats: Stats,
    chunk_bytes: u64,
}

impl Walk<'_> {
    fn blob(&mut self, kind: BlobKind, id: &[u8; 32]) -> Result<(), CliError> {
        let loc = self.repo.index().get(kind, id)?.ok_or_else(|| {
            CliError::Failed(format!(
                "blob {} is not in the index: run `haul-pbs check`",
                hex::encode(id)
            ))
        })?;
        self.stats.raw_size += loc.raw_length as u64;
        self.stats.stored_size += loc.length as u64;
        if kind == BlobKind::Data {
            self.chunk_bytes += loc.raw_length as u64;
        }
        self.packs.insert(loc.pack);
        Ok(())
    }

    /// The files and file bytes below `id`; in raw-data mode, its blobs are noted once.
    fn tree(&mut self, id: &TreeId) -> Result<(u64, u64), CliError> {
        if let Some(s) = self.sizes.get(id) {
            return Ok(*s);
        }
        if self.raw && self.trees.insert(*id) {
            self.blob(BlobKind::Tree, &id.0)?;
        }
        let mut subtrees = Vec::new();
        let mut chunks = Vec::new();
        let (mut files, mut size) = (0, 0);
        let blob = self.repo.load_tree(id)?;
        if self.raw {
            if let haul_protocol::tree::TreeBlob::Pages(p) = &blob {
                for page in &p.pages {
                    if self.trees.insert(page.id) {
                        self.blob(BlobKind::Tree, &page.id.0)?;
                    }
                }
            }
        }
        for_each_page(
            blob,
            |t| self.repo.load_tree(t),
            |page| {
                for n in page.nodes {
                    if n.kind == NodeKind::File {
                        files += 1;
                        size += n.size;
                        chunks.extend(n.content);
                    }
                    if let Some(s) = n.subtree {
                        subtrees.push(s);
                    }
                }
                Ok::<(), haul_repo::Error>(())
            },
        )?;
        if self.raw {
            for c in chunks {
                if self.chunks.insert(c) {
                    self.blob(BlobKind::Data, &c.0)?;
                }
            }
        }
        for s in subtrees {
            let (f, b) = self.tree(&s)?;
            files += f;
            size += b;
        }
        self.sizes.insert(*id, (files, size));
        Ok((files, size))
    }
}

pub fn stats(ctx: &Context, args: StatsArgs) -> Result<(), CliError> {
    let filter = args.filter.to_filter();
    let (repo, _lock) = ctx.open_for_reading(filter.host.as_deref(), "stats", true)?;
    let selected: Vec<_> = if args.snapshots.is_empty() {
        repo.snapshots_matching(&filter)?
    } else {
        args.snapshots
            .iter()
            .map(|spec| repo.find_snapshot_matching(spec, &filter))
            .collect::<Result<_, _>>()?
    };
    let raw = args.mode == StatsMode::RawData;
    let mut w = Walk {
        repo: &repo,
        raw,
        sizes: HashMap::new(),
        trees: HashSet::new(),
        chunks: HashSet::new(),
        packs: HashSet::new(),
        stats: Stats::default(),
        chunk_bytes: 0,
    };
    for (_, snap) in &selected {
        let (files, size) = w.tree(&snap.tree)?;
        w.stats.files += files;
        w.stats.restore_size += size;
    }
    let mut s = w.stats;
    s.snapshots = selected.len() as u64;
    if raw {
        s.chunks = w.chunks.len() as u64;
        s.trees = w.trees.len() as u64;
        s.blobs = s.chunks + s.trees;
        s.packs = w.packs.len() as u64;
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        s.dedup_ratio = ratio(s.restore_size, w.chunk_bytes);
        s.compression_ratio = ratio(s.raw_size, s.stored_size);
    }
    if ctx.global.json {
        crate::output::typed_line("stats", &s);
        return Ok(());
    }
    crate::outln!("snapshots: {}", s.snapshots);
    crate::outln!(
        "restore size: {} in {} files",
        bytes(s.restore_size),
        s.files
    );
    if raw {
        crate::outln!(
            "distinct blobs: {} ({} chunks, {} trees) in {} packs",
            s.blobs,
            s.chunks,
            s.trees,
            s.packs
        );
        crate::outln!(
            "raw data: {} plain, {} stored",
            bytes(s.raw_size),
            bytes(s.stored_size)
        );
        crate::outln!(
            "deduplication: {:.2}x, compression: {:.2}x",
            s.dedup_ratio,
            s.compression_ratio
        );
    }
    Ok(())
}
