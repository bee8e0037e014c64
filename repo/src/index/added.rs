//! The blobs a process stored since its index was loaded, compactly: a full pull of a
//! host with millions of files adds millions of them, and a hash map of full ids and
//! locations cost about 150 bytes each. Here an entry takes 56 bytes (its full id, its
//! kind, its place with the pack as a number, and its number in the order of adding) in
//! one sorted vector, and the newest
//! few in a small map that is merged into the vector (in place, from its end) once it
//! holds a sixteenth as many: a look-up is a hash probe and a binary search, and each
//! entry is moved about sixteen times in all.
//!
//! An id added twice (two sessions of one process stored the same bytes) keeps its
//! newest place and its first number: the number stays the blob's while the index
//! lives, so a session can keep a bit per blob by it (see `Index::locate`).

use crate::index::BlobLocation;
use haul_protocol::{BlobKind, BlobRef, PackId};
use std::collections::HashMap;

/// The map of newest entries is merged once it holds this many, or a sixteenth of the
/// sorted ones if that is more.
const TAIL: usize = 1024;

type Key = (u8, [u8; 32]);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Entry {
    id: [u8; 32],
    kind: u8,
    pack: u32,
    offset: u32,
    length: u32,
    raw_length: u32,
    /// How many distinct ids were added before this one.
    seq: u32,
}

impl Entry {
    fn key(&self) -> Key {
        (self.kind, self.id)
    }
}

#[derive(Default)]
pub(crate) struct Added {
    packs: Vec<PackId>,
    pack_pos: HashMap<PackId, u32>,
    /// Sorted by key, without repeats.
    sorted: Vec<Entry>,
    /// The newest entries.
    tail: HashMap<Key, Entry>,
    /// Distinct ids added.
    added: u32,
}

impl Added {
    pub fn insert(&mut self, b: BlobRef, loc: BlobLocation) {
        let pack = *self.pack_pos.entry(loc.pack).or_insert_with(|| {
            self.packs.push(loc.pack);
            (self.packs.len() - 1) as u32
        });
        let key = (b.kind.code(), b.id);
        let seq = match self.entry(&key) {
            Some(old) => old.seq,
            None => {
                self.added += 1;
                self.added - 1
            }
        };
        let e = Entry {
            id: b.id,
            kind: b.kind.code(),
            pack,
            offset: loc.offset,
            length: loc.length,
            raw_length: loc.raw_length,
            seq,
        };
        self.tail.insert(key, e);
        if self.tail.len() >= TAIL.max(self.sorted.len() / 16) {
            self.merge_tail();
        }
    }

    /// Moves the map's entries into the sorted vector: those already there replace
    /// theirs; the others are merged in from the end, so the vector grows once and
    /// nothing is copied twice.
    fn merge_tail(&mut self) {
        let mut new: Vec<Entry> = Vec::with_capacity(self.tail.len());
        for (key, e) in self.tail.drain() {
            match self.sorted.binary_search_by_key(&key, Entry::key) {
                Ok(i) => self.sorted[i] = e,
                Err(_) => new.push(e),
            }
        }
        new.sort_unstable_by_key(Entry::key);
        let old = self.sorted.len();
        self.sorted.reserve_exact(new.len());
        self.sorted.resize(old + new.len(), Entry::default());
        let (mut i, mut j, mut k) = (old, new.len(), self.sorted.len());
        while j > 0 {
            k -= 1;
            if i > 0 && self.sorted[i - 1].key() > new[j - 1].key() {
                self.sorted[k] = self.sorted[i - 1];
                i -= 1;
            } else {
                self.sorted[k] = new[j - 1];
                j -= 1;
            }
        }
        self.tail.shrink_to(TAIL);
    }

    fn entry(&self, key: &Key) -> Option<&Entry> {
        self.tail.get(key).or_else(|| {
            self.sorted
                .binary_search_by_key(key, Entry::key)
                .ok()
                .map(|i| &self.sorted[i])
        })
    }

    pub fn get(&self, kind: BlobKind, id: &[u8; 32]) -> Option<BlobLocation> {
        self.locate(kind, id).map(|(_, loc)| loc)
    }

    /// The blob's number in the order of adding (its first adding), and its place.
    pub fn locate(&self, kind: BlobKind, id: &[u8; 32]) -> Option<(u32, BlobLocation)> {
        let e = self.entry(&(kind.code(), *id))?;
        Some((e.seq, self.location(e)))
    }

    fn location(&self, e: &Entry) -> BlobLocation {
        BlobLocation::in_packs(&self.packs, e.pack, [e.offset, e.length, e.raw_length])
    }

    /// Entries held (an id added twice may count twice until the map is merged).
    pub fn len(&self) -> usize {
        self.tail.len() + self.sorted.len()
    }

    /// The packs of the entries.
    pub fn packs(&self) -> &[PackId] {
        &self.packs
    }

    /// Every entry with its place, each id once (its newest place).
    pub fn entries(&self) -> Vec<(BlobRef, BlobLocation)> {
        let newest = self.tail.values();
        let older = self
            .sorted
            .iter()
            .filter(|e| !self.tail.contains_key(&e.key()));
        newest
            .chain(older)
            .map(|e| {
                let kind = BlobKind::from_code(e.kind).expect("kinds stored are valid");
                (BlobRef { kind, id: e.id }, self.location(e))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn loc(pack: u8, offset: u32) -> BlobLocation {
        BlobLocation {
            pack: PackId([pack; 32]),
            offset,
            length: offset + 1,
            raw_length: offset + 2,
        }
    }

    proptest! {
        /// The same answers as a hash map of full ids, the newest place winning, over
        /// enough inserts to merge runs many times.
        #[test]
        fn answers_as_a_map_does(
            ops in proptest::collection::vec((0u16..3000, any::<bool>(), 0u8..8, any::<u32>()), 0..4000),
            probes in proptest::collection::vec((0u16..3500, any::<bool>()), 0..200),
        ) {
            let id = |n: u16| { let mut i = [0u8; 32]; i[..2].copy_from_slice(&n.to_be_bytes()); i[31] = 7; i };
            let kind = |t: bool| if t { BlobKind::Tree } else { BlobKind::Data };
            let mut added = Added::default();
            let mut model: HashMap<BlobRef, BlobLocation> = HashMap::new();
            let mut numbers: HashMap<BlobRef, u32> = HashMap::new();
            for (n, t, pack, offset) in ops {
                let b = BlobRef { kind: kind(t), id: id(n) };
                added.insert(b, loc(pack, offset));
                model.insert(b, loc(pack, offset));
                let next = numbers.len() as u32;
                numbers.entry(b).or_insert(next);
            }
            for (n, t) in probes {
                let b = BlobRef { kind: kind(t), id: id(n) };
                prop_assert_eq!(added.get(kind(t), &id(n)), model.get(&b).copied());
                prop_assert_eq!(added.locate(kind(t), &id(n)).map(|(n, _)| n), numbers.get(&b).copied());
            }
            let mut entries = added.entries();
            entries.sort_by_key(|(b, _)| (b.kind.code(), b.id));
            let mut expected: Vec<_> = model.into_iter().collect();
            expected.sort_by_key(|(b, _)| (b.kind.code(), b.id));
            prop_assert_eq!(entries, expected);
            prop_assert!(added.sorted.windows(2).all(|w| w[0].key() < w[1].key()));
        }
    }

    #[test]
    fn an_entry_takes_56_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 56);
    }
}
