//! What a prune would do with the packs, given what the snapshots use
//! ([`crate::usage`]): a pure decision, so it is the same for `--dry-run` and for the
//! prune that carries it out, and tested without a repository.
//!
//! As restic decides it: packs that hold only unused blobs are deleted; packs that hold
//! both are repacked (their used blobs written to new packs, then the old ones deleted),
//! the most wasteful first, until the unused bytes left are within `max_unused`, and no
//! more used bytes are rewritten than `max_repack` allows; with `repack_small`, packs
//! smaller than [`SMALL_SHARE`] of the target size are combined when there are at least
//! two of them.

use crate::error::Result;
use crate::format::ad;
use crate::format::index_file::IndexedPack;
use crate::format::pack_header::PackEntry;
use crate::ingest::Packer;
use crate::repository::IndexedRepository;
use crate::usage::{Marks, PackUsage, Usage};
use haul_protocol::{BlobKind, PackId};
use std::collections::HashSet;

/// A pack below this share of the target pack size counts as small.
pub const SMALL_SHARE: f64 = 0.8;

/// How much unused data may stay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxUnused {
    /// This share of the used bytes (restic's default: 5%).
    Percent(f64),
    Bytes(u64),
    /// Only whole unused packs are deleted; nothing is repacked for its unused share.
    Unlimited,
}

impl Default for MaxUnused {
    fn default() -> Self {
        MaxUnused::Percent(5.0)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PruneOptions {
    pub max_unused: MaxUnused,
    /// At most this many used bytes rewritten (none: no limit).
    pub max_repack: Option<u64>,
    pub repack_small: bool,
    /// The repository's target pack size.
    pub pack_size: u64,
}

/// The decision, and what it comes to.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrunePlan {
    pub delete: Vec<PackId>,
    pub repack: Vec<PackId>,
    /// Packs left as they are.
    pub keep: usize,
    /// Stored bytes of blobs, before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Used bytes written again into new packs.
    pub bytes_repacked: u64,
    /// Unused bytes left in kept packs.
    pub unused_after: u64,
}

impl PrunePlan {
    pub fn bytes_freed(&self) -> u64 {
        self.bytes_before - self.bytes_after
    }
}

pub fn plan(usage: &Usage, opts: &PruneOptions) -> PrunePlan {
    let size = |p: &PackUsage| p.used_bytes + p.unused_bytes;
    let bytes_before: u64 = usage.packs.iter().map(size).sum();
    let used: u64 = usage.used_bytes();
    let limit = match opts.max_unused {
        MaxUnused::Percent(p) => (used as f64 * p.max(0.0) / 100.0) as u64,
        MaxUnused::Bytes(b) => b,
        MaxUnused::Unlimited => u64::MAX,
    };
    let budget = opts.max_repack.unwrap_or(u64::MAX);
    let mut out = PrunePlan {
        bytes_before,
        ..Default::default()
    };
    let mut partly: Vec<&PackUsage> = Vec::new();
    let mut small: Vec<&PackUsage> = Vec::new();
    for p in &usage.packs {
        if p.used_blobs == 0 {
            out.delete.push(p.pack);
        } else if p.unused_blobs > 0 {
            partly.push(p);
        } else if opts.repack_small && (size(p) as f64) < opts.pack_size as f64 * SMALL_SHARE {
            small.push(p);
        }
    }
    // The most unused per used byte first: the most space for the least rewriting.
    partly.sort_by(|a, b| {
        (b.unused_bytes as u128 * a.used_bytes as u128)
            .cmp(&(a.unused_bytes as u128 * b.used_bytes as u128))
            .then(a.pack.cmp(&b.pack))
    });
    let mut unused_left: u64 = partly.iter().map(|p| p.unused_bytes).sum();
    let mut repacked: Vec<&PackUsage> = Vec::new();
    for p in partly {
        if unused_left <= limit || out.bytes_repacked + p.used_bytes > budget {
            continue;
        }
        unused_left -= p.unused_bytes;
        out.bytes_repacked += p.used_bytes;
        repacked.push(p);
    }
    // Small packs are worth combining only with each other (or with what is repacked
    // anyway): one small pack alone would only be copied.
    if small.len() >= 2 || (!small.is_empty() && !repacked.is_empty()) {
        small.sort_by_key(|p| (size(p), p.pack));
        for p in small {
            if out.bytes_repacked + p.used_bytes > budget {
                break;
            }
            out.bytes_repacked += p.used_bytes;
            repacked.push(p);
        }
    }
    out.repack = repacked.iter().map(|p| p.pack).collect();
    out.repack.sort();
    out.delete.sort();
    out.keep = usage.packs.len() - out.delete.len() - out.repack.len();
    out.unused_after = unused_left;
    let freed: u64 = usage
        .packs
        .iter()
        .filter(|p| p.used_blobs == 0)
        .map(size)
        .sum::<u64>()
        + repacked.iter().map(|p| p.unused_bytes).sum::<u64>();
    out.bytes_after = bytes_before - freed;
    out
}

/// Writes the used blobs of `packs` (those `marks` marks) into new packs, data and
/// trees apart, and one index file for the new packs; returns them. A sealed blob's
/// associated data is only its kind and id, so its sealed bytes are copied as they
/// are, after opening them: a blob that does not open fails the repack, and nothing
/// of a damaged pack is copied on. The old packs stay: the index lists both copies
/// until the old ones are condemned and swept.
pub fn repack(
    repo: &IndexedRepository,
    packs: &[PackId],
    marks: &Marks,
) -> Result<Vec<IndexedPack>> {
    let index = repo.index();
    let wanted: HashSet<u32> = index
        .table_packs()
        .iter()
        .enumerate()
        .filter(|(_, p)| packs.contains(p))
        .map(|(i, _)| i as u32)
        .collect();
    let mut slots: Vec<usize> = (0..index.table_len())
        .filter(|s| marks.get(*s) && wanted.contains(&index.slot_entry(*s).0))
        .collect();
    // Pack by pack, front to back.
    let mut blobs = Vec::with_capacity(slots.len());
    for s in slots.drain(..) {
        blobs.push(index.slot_blob(s)?);
    }
    blobs.sort_by_key(|(_, _, loc)| (loc.pack, loc.offset));
    let (key, backend) = (repo.data_key(), repo.backend().as_ref());
    let pack_size = repo.config().pack_size as u64;
    let mut written = Vec::new();
    let mut packers = [Packer::new(BlobKind::Data), Packer::new(BlobKind::Tree)];
    for (kind, id, loc) in blobs {
        let (sealed, what) = repo.read_sealed(kind, &id, &loc)?;
        key.open(&ad::blob(kind, &id), &sealed, &what)?;
        let packer = &mut packers[(kind == BlobKind::Tree) as usize];
        let offset = packer.append(backend, &sealed)?;
        packer.entries.push(PackEntry {
            kind,
            id,
            offset,
            length: loc.length,
            raw_length: loc.raw_length,
        });
        if packer.len >= pack_size {
            written.extend(finish(packer, repo)?);
        }
        if written.len() == 1 {
            super::pause_at(super::Step::Repacking);
        }
    }
    for packer in &mut packers {
        written.extend(finish(packer, repo)?);
        if written.len() == 1 {
            super::pause_at(super::Step::Repacking);
        }
    }
    if !written.is_empty() {
        repo.write_index_file(&written)?;
    }
    Ok(written)
}

/// Finishes `packer`'s pack and starts a new one of the same kind.
fn finish(packer: &mut Packer, repo: &IndexedRepository) -> Result<Option<IndexedPack>> {
    let mut done = std::mem::replace(packer, Packer::new(packer.kind()));
    Ok(done
        .finish(repo.data_key(), repo.backend().as_ref())?
        .map(|pack| IndexedPack {
            pack,
            blobs: std::mem::take(&mut done.entries),
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn pack(n: u8, used: u64, unused: u64) -> PackUsage {
        PackUsage {
            pack: PackId::of(&[n]),
            used_blobs: (used > 0) as u32 * 10,
            unused_blobs: (unused > 0) as u32 * 10,
            used_bytes: used,
            unused_bytes: unused,
        }
    }

    fn opts(max_unused: MaxUnused) -> PruneOptions {
        PruneOptions {
            max_unused,
            max_repack: None,
            repack_small: false,
            pack_size: 16 * MIB,
        }
    }

    fn id(n: u8) -> PackId {
        PackId::of(&[n])
    }

    #[test]
    fn unused_packs_go_and_the_most_wasteful_are_repacked_down_to_the_limit() {
        let usage = Usage {
            packs: vec![
                pack(1, 0, 16 * MIB),       // only unused: deleted
                pack(2, 15 * MIB, MIB),     // 1/15 unused
                pack(3, 8 * MIB, 8 * MIB),  // half unused
                pack(4, 16 * MIB, 0),       // all used: kept
                pack(5, 12 * MIB, 4 * MIB), // 1/3 unused
            ],
        };
        // 5% of 51 MiB used is 2.55 MiB: repack 3 (8 MiB unused), then 5 (4 MiB), and
        // 2's 1 MiB may stay.
        let p = plan(&usage, &opts(MaxUnused::Percent(5.0)));
        assert_eq!(p.delete, [id(1)]);
        let mut repack = vec![id(3), id(5)];
        repack.sort();
        assert_eq!(p.repack, repack);
        assert_eq!(p.keep, 2);
        assert_eq!(p.bytes_repacked, 20 * MIB);
        assert_eq!(p.unused_after, MIB);
        assert_eq!(p.bytes_freed(), 28 * MIB);
        assert_eq!(p.bytes_before - p.bytes_after, 28 * MIB);
        // Nothing tolerated: 2 as well.
        let p = plan(&usage, &opts(MaxUnused::Bytes(0)));
        assert_eq!(p.repack.len(), 3);
        assert_eq!(p.unused_after, 0);
        // Everything tolerated: only the whole unused pack goes.
        let p = plan(&usage, &opts(MaxUnused::Unlimited));
        assert_eq!((p.delete.len(), p.repack.len()), (1, 0));
        assert_eq!(p.bytes_freed(), 16 * MIB);
        // A repack budget of 10 MiB: 3 fits, 5 does not, 2 does not either.
        let p = plan(
            &usage,
            &PruneOptions {
                max_repack: Some(10 * MIB),
                ..opts(MaxUnused::Bytes(0))
            },
        );
        assert_eq!(p.repack, [id(3)]);
        assert_eq!(p.unused_after, 5 * MIB);
    }

    #[test]
    fn small_packs_are_combined_only_when_there_are_two() {
        let one = Usage {
            packs: vec![pack(1, MIB, 0), pack(2, 16 * MIB, 0)],
        };
        let small = PruneOptions {
            repack_small: true,
            ..opts(MaxUnused::default())
        };
        assert!(plan(&one, &small).repack.is_empty());
        let two = Usage {
            packs: vec![pack(1, MIB, 0), pack(2, 16 * MIB, 0), pack(3, 2 * MIB, 0)],
        };
        let p = plan(&two, &small);
        let mut both = vec![id(1), id(3)];
        both.sort();
        assert_eq!(p.repack, both);
        assert_eq!(p.bytes_freed(), 0);
        assert!(plan(&two, &opts(MaxUnused::default())).repack.is_empty());
    }

    #[test]
    fn an_empty_or_clean_repository_needs_nothing() {
        let p = plan(&Usage::default(), &opts(MaxUnused::default()));
        assert_eq!(p, PrunePlan::default());
        let clean = Usage {
            packs: vec![pack(1, 16 * MIB, 0)],
        };
        let p = plan(&clean, &opts(MaxUnused::Bytes(0)));
        assert_eq!((p.delete.len(), p.repack.len(), p.keep), (0, 0, 1));
    }

    proptest::proptest! {
        #[test]
        fn every_pack_is_decided_once_and_the_figures_add_up(
            packs in proptest::collection::vec((0u64..20, 0u64..20), 0..40),
            percent in 0.0f64..50.0,
            budget in proptest::option::of(0u64..200),
            repack_small: bool,
        ) {
            let usage = Usage {
                packs: packs
                    .iter()
                    .enumerate()
                    .filter(|(_, (u, n))| u + n > 0)
                    .map(|(i, (u, n))| pack(i as u8, u * MIB, n * MIB))
                    .collect(),
            };
            let o = PruneOptions {
                max_unused: MaxUnused::Percent(percent),
                max_repack: budget.map(|b| b * MIB),
                repack_small,
                pack_size: 16 * MIB,
            };
            let p = plan(&usage, &o);
            proptest::prop_assert_eq!(p.delete.len() + p.repack.len() + p.keep, usage.packs.len());
            proptest::prop_assert!(p.delete.iter().all(|d| !p.repack.contains(d)));
            proptest::prop_assert!(p.bytes_repacked <= budget.map_or(u64::MAX, |b| b * MIB));
            proptest::prop_assert_eq!(p.bytes_before, usage.used_bytes() + usage.unused_bytes());
            // Every used byte stays; every whole unused pack goes.
            proptest::prop_assert!(p.bytes_after >= usage.used_bytes());
            proptest::prop_assert_eq!(p.delete.len(), usage.packs_unused());
            // Within the limit, unless the budget stopped the repacking.
            let limit = (usage.used_bytes() as f64 * percent / 100.0) as u64;
            proptest::prop_assert!(p.unused_after <= limit || budget.is_some());
            proptest::prop_assert_eq!(p.bytes_after, p.bytes_before - p.bytes_freed());
        }
    }

    /// A repository of three snapshots of two files each (one shared by all), the
    /// first forgotten, seen by a new process.
    fn forgotten_first() -> IndexedRepository {
        use crate::usage::tests::{backup, memory_repo, reopen};
        let (backend, repo) = memory_repo();
        let shared = vec![9u8; 40_000];
        let snapshots: Vec<_> = (0..3u8)
            .map(|n| {
                let own: Vec<u8> = (0..60_000u32).map(|i| (i as u8) ^ n).collect();
                backup(&repo, &[&shared, &own])
            })
            .collect();
        repo.forget(&snapshots[..1]).unwrap();
        drop(repo);
        reopen(backend)
    }

    #[test]
    fn a_repack_copies_exactly_the_used_blobs_and_they_read_back() {
        let repo = forgotten_first();
        let marks = crate::usage::mark_snapshots(&repo).unwrap();
        let usage = Usage::of(repo.index(), &marks);
        let p = plan(&usage, &opts(MaxUnused::Bytes(0)));
        // The first session's packs hold the shared chunk (used) and its own (not).
        assert!(!p.repack.is_empty(), "{usage:#?}");
        let written = repack(&repo, &p.repack, &marks).unwrap();
        let copied: Vec<PackEntry> = written.iter().flat_map(|w| w.blobs.clone()).collect();
        let used_in_repacked: u64 = usage
            .packs
            .iter()
            .filter(|u| p.repack.contains(&u.pack))
            .map(|u| u.used_blobs as u64)
            .sum();
        assert_eq!(copied.len() as u64, used_in_repacked);
        // Every copy reads back as the blob it is, from its new pack.
        for w in &written {
            for e in &w.blobs {
                let loc = crate::index::BlobLocation {
                    pack: w.pack,
                    offset: e.offset,
                    length: e.length,
                    raw_length: e.raw_length,
                };
                let plain = repo.load_blob_at(e.kind, &e.id, &loc).unwrap();
                assert_eq!(plain, repo.load_blob(e.kind, &e.id).unwrap());
            }
        }
        // A new process finds the new index file: a check is clean, and every
        // snapshot's blobs are still there.
        let reopened = crate::usage::tests::reopen(repo.backend().clone());
        let report = crate::check::check(
            &reopened,
            &crate::check::CheckOptions {
                read_data: true,
                ..Default::default()
            },
            &|_, _| {},
        )
        .unwrap();
        assert!(report.ok(), "{:?}", report.errors);
        assert_eq!(report.snapshots, 2);
    }
}
