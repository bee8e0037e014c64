//! `check`: clean repositories pass; damage is found and named down to the file.

use haul_tests::*;
use std::fs;

#[test]
fn flipped_byte_in_a_pack_is_found_with_the_file_named() {
    let (env, src) = Env::with_source();
    fs::write(src.join("victim.bin"), random_bytes(30, 3 * 1024 * 1024)).unwrap();
    fs::write(src.join("bystander.txt"), "fine\n".repeat(1000)).unwrap();
    env.backup(&[&src], &[]);
    env.backup(&[&src], &["--force", "--tag", "second"]);
    env.pbs(&["check", "--read-data"]).expect(0);

    // The data pack is the largest file under data/.
    let pack = walk_files(&env.repo().join("data"))
        .into_iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    flip_byte(&pack, 1000);

    // The structure is intact, so a plain check passes ...
    env.pbs(&["check"]).expect(0);
    // ... and reading the data finds the damage, in both snapshots.
    let run = env.pbs(&["check", "--read-data"]).expect(3);
    // Every check is a run in the history: the last one FAILED, with the error.
    let runs = env.runs();
    let checks: Vec<_> = runs.iter().filter(|r| r["kind"] == "check").collect();
    assert_eq!(checks.len(), 3, "{runs:#?}");
    assert_eq!(checks[0]["status"], "ok");
    assert_eq!(checks[2]["status"], "failed");
    assert!(
        checks[2]["error"]
            .as_str()
            .unwrap()
            .starts_with("check found "),
        "{runs:#?}"
    );
    assert_eq!(checks[2]["counters"]["read_data"], true);
    let victim = src.join("victim.bin").display().to_string();
    assert!(
        run.stdout.contains(&format!("file {victim}")),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("bystander"), "{}", run.stdout);
    let report = env
        .pbs(&["--json", "check", "--read-data"])
        .expect(3)
        .json();
    let report = report.iter().find(|v| v.get("damaged").is_some()).unwrap();
    let damaged = report["damaged"].as_array().unwrap();
    assert_eq!(damaged.len(), 1, "{report}");
    assert_eq!(
        damaged[0]["affected"].as_array().unwrap().len(),
        2,
        "one path in each of two snapshots: {report}"
    );

    // A restore brings back everything but the damaged file, names it, and exits 3;
    // nothing of it is left under its name. In-process and through the agent alike.
    for via_agent in [false, true] {
        let target = env.path(if via_agent { "out-agent" } else { "out" });
        let t = target.display().to_string();
        let mut args = vec!["--json", "restore", "latest", "--target", &t];
        if via_agent {
            args.push("--via-agent");
        }
        let run = env.pbs(&args).expect(3);
        let warnings: Vec<serde_json::Value> = run
            .json()
            .into_iter()
            .map(|v| {
                if v["type"] == "agent" {
                    v["event"].clone()
                } else {
                    v
                }
            })
            .filter(|v| v["type"] == "warning")
            .collect();
        assert_eq!(warnings.len(), 1, "{}\n{}", run.stdout, run.stderr);
        let restored = target.join(src.strip_prefix("/").unwrap());
        assert_eq!(
            warnings[0]["path"],
            restored.join("victim.bin").display().to_string()
        );
        assert_eq!(warnings[0]["kind"], "not_restored");
        let why = warnings[0]["message"].as_str().unwrap();
        assert!(
            why.contains("authentication failed") || why.contains("corrupt"),
            "{why}"
        );
        assert!(
            run.stderr.contains("1 entries could not be restored"),
            "{}",
            run.stderr
        );
        assert!(!restored.join("victim.bin").exists());
        fs::remove_file(src.join("victim.bin")).unwrap();
        assert_same_tree(&src, &restored);
        fs::write(src.join("victim.bin"), random_bytes(30, 3 * 1024 * 1024)).unwrap();
    }
}

/// A snapshot whose file records more bytes than its chunks hold (as a file that grew
/// while it was read once produced): check names it, restore skips it and exits 3.
#[test]
fn a_file_whose_size_disagrees_with_its_chunks_is_named_by_check_and_restore() {
    use haul_protocol::tree::{Node, NodeKind, Tree};
    use haul_protocol::{BlobKind, ChunkId};
    use haul_repo::backend::{Backend, LocalBackend};
    use haul_repo::format::snapshot::{SourceKind, Summary};
    use haul_repo::ingest::{IngestSession, ParentChoice, SessionInfo};
    use std::sync::Arc;
    let env = Env::new();
    env.init();
    {
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::open(&env.repo()).unwrap());
        let pass = fs::read_to_string(env.path("pass")).unwrap();
        let repo = haul_repo::Repository::open(backend, pass.trim_end().as_bytes())
            .unwrap()
            .load_index(None)
            .unwrap();
        let s = IngestSession::start(
            &repo,
            SessionInfo {
                host: "h".into(),
                paths: vec!["/x".into()],
                tags: vec![],
                source: SourceKind::Pull,
                parent: ParentChoice::None,
            },
        )
        .unwrap();
        let mut nodes = Vec::new();
        for (name, text, claimed) in [
            ("grown.log", "log line\n", 9000u64),
            ("ok.txt", "fine\n", 5),
        ] {
            let plain = text.as_bytes().repeat(claimed as usize / text.len());
            let id = ChunkId::of(&plain);
            s.add_plain(BlobKind::Data, &id.0, plain).unwrap();
            nodes.push(Node {
                name: name.into(),
                kind: NodeKind::File,
                mode: 0o644,
                size: claimed + u64::from(name == "grown.log") * 777,
                content: vec![id],
                ..Default::default()
            });
        }
        let (tid, bytes) = Tree { nodes }.encode_with_id();
        s.add_plain(BlobKind::Tree, &tid.0, bytes).unwrap();
        s.commit(tid, Summary::default()).unwrap();
    }
    let run = env.pbs(&["check"]).expect(3);
    assert!(
        run.stdout
            .contains("file \"grown.log\" records 9777 bytes but its chunks hold 9000"),
        "{}",
        run.stdout
    );
    let target = env.path("out");
    let run = env.restore(&target, &[]).expect(3);
    assert!(
        run.stderr
            .contains("grown.log: restored 9000 bytes but the snapshot records 9777"),
        "{}",
        run.stderr
    );
    assert!(!target.join("grown.log").exists());
    assert_eq!(fs::read(target.join("ok.txt")).unwrap(), b"fine\n");
}

#[test]
fn missing_pack_is_an_error_naming_the_affected_files() {
    let (env, src) = Env::with_source();
    fs::write(src.join("gone.bin"), random_bytes(31, 1024 * 1024)).unwrap();
    env.backup(&[&src], &[]);
    let pack = walk_files(&env.repo().join("data"))
        .into_iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    fs::remove_file(&pack).unwrap();
    let run = env.pbs(&["check"]).expect(3);
    assert!(
        run.stdout
            .contains("is in the index but missing from data/"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains(&format!("file {}", src.join("gone.bin").display())),
        "{}",
        run.stdout
    );
}
