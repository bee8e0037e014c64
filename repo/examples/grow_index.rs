//! Benchmark helper: adds synthetic entries to a repository's index, to see what a
//! large index costs the processes of a pull (`bench/index_growth.sh`). The entries
//! point at packs that do not exist: use a throwaway repository (`check` reports them).
//!
//! Run: `cargo run --release -p haul-repo --example grow_index REPO PASSFILE COUNT [SEED]`.

use haul_protocol::{BlobKind, PackId};
use haul_repo::backend::LocalBackend;
use haul_repo::format::index_file::IndexedPack;
use haul_repo::format::pack_header::PackEntry;
use haul_repo::Repository;
use std::sync::Arc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: grow_index REPO PASSFILE COUNT [SEED]");
        std::process::exit(2);
    }
    let count: u64 = args[3].parse().expect("COUNT is a number");
    let seed: u64 = args
        .get(4)
        .map(|s| s.parse().expect("SEED is a number"))
        .unwrap_or(0);
    let pass = std::fs::read(&args[2]).expect("readable passphrase file");
    let pass = pass.strip_suffix(b"\n").unwrap_or(&pass);
    let backend = Arc::new(LocalBackend::open(std::path::Path::new(&args[1])).expect("repository"));
    let repo = Repository::open(backend, pass)
        .expect("repository opens")
        .load_index(None)
        .expect("index loads");
    let id_of = |n: u64| *blake3::hash(&[seed.to_le_bytes(), n.to_le_bytes()].concat()).as_bytes();
    // 16 blobs per pack (1 MiB chunks in 16 MiB packs), 50,000 entries per index file.
    let (per_pack, per_file) = (16u64, 50_000u64);
    let mut i = 0u64;
    while i < count {
        let end = (i + per_file).min(count);
        let mut packs = Vec::new();
        while i < end {
            let blobs: Vec<PackEntry> = (0..per_pack.min(end - i))
                .map(|k| PackEntry {
                    kind: BlobKind::Data,
                    id: id_of(i + k),
                    offset: (k * 1_050_000) as u32,
                    length: 1_050_000,
                    raw_length: 1_048_576,
                })
                .collect();
            packs.push(IndexedPack {
                pack: PackId(id_of(u64::MAX - i)),
                blobs,
            });
            i += per_pack.min(end - i);
        }
        repo.write_index_file(&packs).expect("index file written");
    }
    println!("added {count} synthetic index entries");
}
