//! Lists what haul reads from an rdiff-backup repository: every session, every path,
//! and every regular file rebuilt and checked. `cargo run -p haul-rdiff --example
//! rdiff_dump -- REPO`
fn main() {
    let dir = std::env::args().nth(1).expect("usage: rdiff_dump REPO");
    let repo = match haul_rdiff::Repo::open(std::path::Path::new(&dir)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    for w in repo.warnings() {
        eprintln!("warning: {w}");
    }
    let mut failed = 0;
    for t in repo.sessions() {
        let meta = repo.metadata_at(t.epoch).expect("metadata");
        let mut files = 0;
        for r in meta.values() {
            if r.kind == haul_rdiff::meta::Kind::Reg && r.sha1.is_some() {
                match repo.content(r, t.epoch) {
                    Ok(_) => files += 1,
                    Err(e) => {
                        failed += 1;
                        eprintln!("{}: {e}", t.raw);
                    }
                }
            }
        }
        println!(
            "{} {} {} paths, {files} files rebuilt",
            t.epoch,
            t.raw,
            meta.len()
        );
    }
    std::process::exit(i32::from(failed > 0));
}
