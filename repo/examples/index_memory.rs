//! Benchmark: resident memory of the index per blob.
//!
//! Writes 1,000,000 synthetic entries (16 blobs per pack, as 1 MiB chunks in 16 MiB
//! packs give) as sealed index files into a local repository directory, loads them
//! once (which builds the local cache), then loads the cache in a fresh child process
//! and reports that process's resident-memory growth per entry, next to the table's
//! own size, and what a prune's mark phase and plan add (`haul_repo::usage`,
//! `haul_repo::prune`). Then, in another fresh process, what N blobs added by the
//! process itself cost (a pull storing N new blobs keeps them beside the table until
//! the index is loaded again). Run:
//! `cargo run --release -p haul-repo --example index_memory [N]`.

use haul_protocol::{BlobKind, PackId};
use haul_repo::backend::{Backend, FileType, LocalBackend};
use haul_repo::crypto::Key;
use haul_repo::format::index_file::{encode, IndexedPack};
use haul_repo::format::pack_header::PackEntry;
use haul_repo::index::Index;
use haul_repo::prune::{plan, MaxUnused, PruneOptions};
use haul_repo::usage::{Marks, Usage};
use std::path::Path;
use std::time::Instant;

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn id_of(n: u64) -> [u8; 32] {
    *blake3::hash(&n.to_le_bytes()).as_bytes()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--added") {
        return added(
            Path::new(&args[2]),
            Path::new(&args[3]),
            &args[4],
            args[5].parse().unwrap(),
        );
    }
    if args.get(1).map(String::as_str) == Some("--child") {
        return child(
            Path::new(&args[2]),
            Path::new(&args[3]),
            &args[4],
            args[5].parse().unwrap(),
        );
    }
    let n: u64 = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let backend = LocalBackend::create(&dir.path().join("repo")).unwrap();
    backend
        .write_once(FileType::Config, "config", b"placeholder")
        .unwrap();
    let key = Key::random();
    // Index files of 50,000 entries, like a large backup's.
    let per_pack = 16u64;
    let per_file = 50_000u64;
    let mut i = 0u64;
    let mut pack_no = 0u64;
    while i < n {
        let mut packs = Vec::new();
        let end = (i + per_file).min(n);
        while i < end {
            let blobs: Vec<PackEntry> = (0..per_pack.min(end - i))
                .map(|k| PackEntry {
                    kind: if (i + k).is_multiple_of(50) {
                        BlobKind::Tree
                    } else {
                        BlobKind::Data
                    },
                    id: id_of(i + k),
                    offset: (k * 1_050_000) as u32,
                    length: 1_050_000,
                    raw_length: 1_048_576,
                })
                .collect();
            i += blobs.len() as u64;
            packs.push(IndexedPack {
                pack: PackId::of(&pack_no.to_le_bytes()),
                blobs,
            });
            pack_no += 1;
        }
        let sealed = key.seal(b"haul index v1", &encode(&packs));
        backend
            .write_once(FileType::Index, &blake3::hash(&sealed).to_hex(), &sealed)
            .unwrap();
    }
    let cache = dir.path().join("cache");
    let t = Instant::now();
    let index = Index::load(&backend, &key, Some(&cache)).unwrap();
    let build = t.elapsed();
    assert_eq!(index.len() as u64, n);
    drop(index);
    let key_hex = hex::encode(key.to_bytes());
    let run = |mode: &str| {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                mode,
                dir.path().join("repo").to_str().unwrap(),
                cache.to_str().unwrap(),
                &key_hex,
                &n.to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    println!("entries               {n}");
    println!("packs                 {pack_no}");
    println!(
        "first load (decrypt {} index files, build cache): {:.2} s",
        n.div_ceil(per_file),
        build.as_secs_f64()
    );
    print!("{}", run("--child"));
    print!("{}", run("--added"));
}

/// Adds `n` more blobs to a loaded index, as a pull of `n` small files would (a pack of
/// 65,536 at a time), and reports the growth of resident memory and of its peak.
fn added(repo: &Path, cache: &Path, key_hex: &str, n: u64) {
    let mut raw = [0u8; 32];
    hex::decode_to_slice(key_hex, &mut raw).unwrap();
    let backend = LocalBackend::open(repo).unwrap();
    let index = Index::load(&backend, &Key::from_bytes(raw), Some(cache)).unwrap();
    let (rss0, hwm0) = (status_kib("VmRSS:"), status_kib("VmHWM:"));
    // The peak below is over the loaded index only if adding set a new one.
    let mut i = 0u64;
    while i < n {
        let blobs: Vec<PackEntry> = (i..(i + 65_536).min(n))
            .map(|k| PackEntry {
                kind: BlobKind::Data,
                id: id_of(u64::MAX - k),
                offset: ((k - i) * 1_000) as u32,
                length: 1_000,
                raw_length: 1_500,
            })
            .collect();
        i += blobs.len() as u64;
        index.add_pack(PackId::of(&i.to_le_bytes()), &blobs);
    }
    assert_eq!(index.added_len() as u64, n);
    let rss1 = status_kib("VmRSS:");
    let hwm1 = status_kib("VmHWM:");
    println!(
        "{n} blobs added by the process: resident {:.1} bytes each, peak {:.1} bytes each over the loaded index",
        (rss1 - rss0) as f64 * 1024.0 / n as f64,
        (hwm1 - rss0) as f64 * 1024.0 / n as f64
    );
    assert!(hwm1 > hwm0, "adding {n} blobs set no new peak: add more");
}

fn child(repo: &Path, cache: &Path, key_hex: &str, n: u64) {
    let mut raw = [0u8; 32];
    hex::decode_to_slice(key_hex, &mut raw).unwrap();
    let key = Key::from_bytes(raw);
    let backend = LocalBackend::open(repo).unwrap();
    let rss0 = status_kib("VmRSS:");
    let t = Instant::now();
    let index = Index::load(&backend, &key, Some(cache)).unwrap();
    let load = t.elapsed();
    let rss1 = status_kib("VmRSS:");
    assert_eq!(index.len() as u64, n);
    // Every id is found, and ids not stored are not.
    let t = Instant::now();
    let probes = 100_000u64;
    for k in 0..probes {
        let j = k * (n / probes);
        let kind = if j.is_multiple_of(50) {
            BlobKind::Tree
        } else {
            BlobKind::Data
        };
        assert!(index.get(kind, &id_of(j)).unwrap().is_some());
        assert!(index.get(BlobKind::Data, &id_of(n + k)).unwrap().is_none());
    }
    let lookups = t.elapsed();
    println!("cached load: {:.3} s", load.as_secs_f64());
    println!(
        "table bytes per entry (entries + pack ids): {:.1}",
        index.table_bytes() as f64 / n as f64
    );
    println!(
        "resident bytes per entry (VmRSS growth of a fresh process): {:.1}",
        (rss1 - rss0) as f64 * 1024.0 / n as f64
    );
    println!(
        "lookups: {:.2} us each (hit confirmed against the full id on disk, plus a miss)",
        lookups.as_secs_f64() * 1e6 / (2 * probes) as f64
    );
    // What a prune's mark phase adds over the index: a bit per blob, and the usage of
    // each pack (every other blob marked, as if half the data were forgotten).
    let rss2 = status_kib("VmRSS:");
    let mut marks = Marks::new(index.table_len());
    for slot in (0..index.table_len()).step_by(2) {
        marks.set(slot);
    }
    let usage = Usage::of(&index, &marks);
    let rss3 = status_kib("VmRSS:");
    assert_eq!(usage.unused_blobs(), n / 2);
    println!(
        "mark phase: {:.2} resident bytes per entry over the index ({} packs)",
        (rss3 - rss2) as f64 * 1024.0 / n as f64,
        usage.packs.len()
    );
    // The plan and the set of condemned packs (every pack is partly used here, so
    // the decision covers them all), which a prune holds until its sweep.
    let plan = plan(
        &usage,
        &PruneOptions {
            max_unused: MaxUnused::Bytes(0),
            pack_size: 16 << 20,
            ..Default::default()
        },
    );
    let condemned: std::collections::HashSet<PackId> =
        plan.delete.iter().chain(&plan.repack).copied().collect();
    let rss4 = status_kib("VmRSS:");
    assert_eq!(condemned.len() + plan.keep, usage.packs.len());
    println!(
        "mark, plan and condemned set: {:.2} resident bytes per entry over the index",
        (rss4 - rss2) as f64 * 1024.0 / n as f64
    );
    println!(
        "peak resident (VmHWM) of this process: {} MiB, of which the index table {} MiB",
        status_kib("VmHWM:") / 1024,
        index.table_bytes() >> 20
    );
}
