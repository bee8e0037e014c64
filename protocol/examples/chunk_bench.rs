//! Benchmark (not a test): chunks the given files with the repository's default
//! parameters, as the agent's readers do, and prints the bytes, chunks and seconds of
//! CPU spent. Run it twice on the same files: the second run reads from the page cache.
//!
//! usage: cargo run --release -p haul-protocol --example chunk_bench -- FILE...

use haul_protocol::chunker::{Chunker, ChunkerParams};
use std::time::Instant;

fn main() -> std::io::Result<()> {
    let files: Vec<String> = std::env::args().skip(1).collect();
    let mut chunker = Chunker::new(ChunkerParams::with_seed(7));
    let (mut bytes, mut chunks) = (0u64, 0u64);
    let start = Instant::now();
    for f in &files {
        bytes += chunker.chunk(std::fs::File::open(f)?, |c| {
            chunks += 1;
            std::hint::black_box(c);
            Ok(())
        })?;
    }
    let s = start.elapsed().as_secs_f64();
    println!(
        "{} files, {:.0} MiB, {chunks} chunks, {s:.3} s, {:.0} MiB/s",
        files.len(),
        bytes as f64 / 1048576.0,
        bytes as f64 / 1048576.0 / s
    );
    Ok(())
}
