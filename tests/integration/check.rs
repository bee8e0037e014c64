//! `check`: clean repositories pass; damage is found and named down to the file.

use haul_protocol::tree::find_node;
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
    let pack = env.largest_pack();
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
    assert_eq!(checks[2]["details"]["check"]["read_data"], true);
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
        let (run, warnings) = restore_with_problems(&env, &t, via_agent);
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
    use haul_repo::format::snapshot::{SourceKind, Summary};
    use haul_repo::ingest::{IngestSession, ParentChoice, SessionInfo};
    let env = Env::new();
    env.init();
    {
        let repo = env.open_repo();
        let s = IngestSession::start(
            &repo,
            SessionInfo {
                host: "h".into(),
                paths: vec!["/x".into()],
                tags: vec![],
                source: SourceKind::Pull,
                parent: ParentChoice::None,
                scope: Default::default(),
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

/// `restore latest --target T` (through the agent if `via_agent`) that must exit 3;
/// the run and the problems it named (the agent's relayed ones too).
fn restore_with_problems(
    env: &Env,
    target: &str,
    via_agent: bool,
) -> (Run, Vec<serde_json::Value>) {
    let mut args = vec!["--json", "restore", "latest", "--target", target];
    if via_agent {
        args.push("--via-agent");
    }
    let run = env.pbs(&args).expect(3);
    let problems = run
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
    (run, problems)
}

#[test]
fn missing_pack_is_an_error_naming_the_affected_files() {
    let (env, src) = Env::with_source();
    fs::write(src.join("gone.bin"), random_bytes(31, 1024 * 1024)).unwrap();
    env.backup(&[&src], &[]);
    let pack = env.largest_pack();
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

/// Where the latest snapshot stores the tree of directory `path`, or the first chunk
/// of file `path` (a path that was backed up): its pack file and the blob's offset.
fn blob_location(env: &Env, path: &std::path::Path) -> (std::path::PathBuf, u64) {
    use haul_protocol::BlobKind;
    let repo = env.open_repo();
    let (_, snap) = repo.find_snapshot("latest").unwrap();
    let mut tree = repo.load_tree(&snap.tree).unwrap();
    let comps: Vec<_> = path.components().skip(1).collect();
    let mut found = None;
    for (i, comp) in comps.iter().enumerate() {
        let name = comp.as_os_str().as_encoded_bytes();
        let node = find_node(&tree, name, |id| repo.load_tree(id))
            .unwrap()
            .unwrap();
        if i + 1 == comps.len() {
            found = Some(match node.subtree {
                Some(t) => (BlobKind::Tree, t.0),
                None => (BlobKind::Data, node.content[0].0),
            });
        } else {
            tree = repo.load_tree(&node.subtree.unwrap()).unwrap();
        }
    }
    let (kind, id) = found.unwrap();
    let loc = repo.index().get(kind, &id).unwrap().unwrap();
    let pack = walk_files(&env.repo().join("data"))
        .into_iter()
        .find(|p| p.file_name().unwrap().to_string_lossy() == loc.pack.to_hex())
        .unwrap();
    (pack, loc.offset as u64)
}

/// A file with three names whose data is damaged: none of its names is left behind,
/// each is named, the rest is restored.
#[test]
fn a_damaged_file_with_hard_links_leaves_none_of_its_names() {
    let (env, src) = Env::with_source();
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("linked-a"), random_bytes(41, 200_000)).unwrap();
    fs::hard_link(src.join("linked-a"), src.join("linked-b")).unwrap();
    fs::hard_link(src.join("linked-a"), src.join("sub/linked-c")).unwrap();
    fs::write(src.join("sub/other.txt"), "other\n").unwrap();
    // Many files between the first name and the last, so the walk reaches the last
    // long after a worker found the first one damaged.
    fs::create_dir_all(src.join("m")).unwrap();
    for i in 0..2000 {
        fs::write(src.join(format!("m/{i:04}")), format!("{i}\n")).unwrap();
    }
    env.backup(&[&src], &[]);
    let (pack, offset) = blob_location(&env, &src.join("linked-a"));
    flip_byte(&pack, offset + 100);
    let target = env.path("out");
    let t = target.display().to_string();
    let run = env
        .pbs(&["--json", "restore", "latest", "--target", &t])
        .expect(3);
    let restored = target.join(src.strip_prefix("/").unwrap());
    let mut named: Vec<String> = run
        .json()
        .into_iter()
        .filter(|v| v["type"] == "warning")
        .map(|v| v["path"].as_str().unwrap().to_string())
        .collect();
    named.sort();
    let expected: Vec<String> = ["linked-a", "linked-b", "sub/linked-c"]
        .iter()
        .map(|n| restored.join(n).display().to_string())
        .collect();
    assert_eq!(named, expected, "{}", run.stdout);
    for n in ["linked-a", "linked-b", "sub/linked-c"] {
        assert!(!restored.join(n).exists(), "{n} was left behind");
    }
    assert_eq!(
        fs::read(restored.join("sub/other.txt")).unwrap(),
        b"other\n"
    );
}

/// A directory whose listing (its tree) is damaged: a restore leaves it out entirely,
/// names it, restores everything else, and exits 3, in-process and through the agent.
#[test]
fn a_damaged_directory_listing_leaves_out_that_directory_only() {
    let (env, src) = Env::with_source();
    fs::create_dir_all(src.join("hit")).unwrap();
    fs::create_dir_all(src.join("spared/deeper")).unwrap();
    fs::write(src.join("hit/x.txt"), "x\n".repeat(100)).unwrap();
    fs::write(src.join("hit/y.bin"), random_bytes(40, 100_000)).unwrap();
    fs::write(src.join("spared/deeper/z.txt"), "z\n".repeat(100)).unwrap();
    fs::write(src.join("top.txt"), "top\n").unwrap();
    env.backup(&[&src], &[]);
    let (pack, offset) = blob_location(&env, &src.join("hit"));
    flip_byte(&pack, offset + 20);
    let run = env.pbs(&["check"]).expect(3);
    assert!(run.stdout.contains("affects snapshot"), "{}", run.stdout);
    for via_agent in [false, true] {
        let target = env.path(if via_agent { "out-agent" } else { "out" });
        let t = target.display().to_string();
        let (run, warnings) = restore_with_problems(&env, &t, via_agent);
        let restored = target.join(src.strip_prefix("/").unwrap());
        assert_eq!(warnings.len(), 1, "{}\n{}", run.stdout, run.stderr);
        assert_eq!(
            warnings[0]["path"],
            restored.join("hit").display().to_string()
        );
        assert_eq!(warnings[0]["kind"], "not_restored");
        assert!(
            warnings[0]["message"]
                .as_str()
                .unwrap()
                .starts_with("its listing cannot be read"),
            "{}",
            warnings[0]
        );
        assert!(!restored.join("hit").exists());
        assert_eq!(fs::read(restored.join("top.txt")).unwrap(), b"top\n");
        assert_same_tree(&src.join("spared"), &restored.join("spared"));
    }
}

/// `check` says how much of the repository no snapshot uses: nothing while every
/// snapshot is kept, the forgotten data once one is forgotten.
#[test]
fn check_reports_the_unused_share_left_by_forgotten_snapshots() {
    let (env, src) = Env::with_source();
    let s = src.display().to_string();
    fs::write(src.join("kept"), random_bytes(1, 300_000)).unwrap();
    fs::write(src.join("file"), random_bytes(2, 1_000_000)).unwrap();
    env.pbs(&["backup-local", &s]).expect(0);
    let unused = |env: &Env| {
        let r = env.pbs(&["--json", "check"]).expect(0);
        r.json()
            .into_iter()
            .find(|v| v["unused"].is_object())
            .unwrap()["unused"]
            .clone()
    };
    let before = unused(&env);
    assert_eq!(before["bytes"], 0, "{before}");
    assert_eq!(before["packs"], 0, "{before}");
    fs::write(src.join("file"), random_bytes(3, 1_000_000)).unwrap();
    env.pbs(&["backup-local", &s]).expect(0);
    let first = env.pbs(&["--json", "snapshots"]).expect(0).json()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    env.pbs(&["forget", &first]).expect(0);
    let after = unused(&env);
    let bytes = after["bytes"].as_u64().unwrap();
    // The first version of `file` (incompressible) and the first snapshot's tree.
    assert!((1_000_000..1_100_000).contains(&bytes), "{after}");
    assert!(after["blobs"].as_u64().unwrap() >= 2, "{after}");
    // Each backup wrote its own data pack: the first one's holds only the old file.
    assert_eq!(after["packs"], 1, "{after}");
    let total = after["total_bytes"].as_u64().unwrap();
    assert!(total > 2_300_000, "{after}");
    let text = env.pbs(&["check"]).expect(0).stdout;
    assert!(
        text.contains("unused: ") && text.contains("1 packs hold only unused blobs"),
        "{text}"
    );
}

#[test]
fn subset_checks_find_damage_only_in_their_part_and_together_read_every_pack_once() {
    let (env, src) = Env::with_source();
    // Several sessions, several packs.
    for i in 0..6 {
        fs::write(
            src.join(format!("f{i}.bin")),
            random_bytes(100 + i, 1 << 20),
        )
        .unwrap();
        env.backup(&[&src], &[]);
    }
    let report = |args: &[&str], code: i32| {
        let mut all = vec!["--json", "check"];
        all.extend(args);
        env.pbs(&all).expect(code).json_of("check")
    };
    let packs = report(&[], 0)["packs"].as_u64().unwrap();
    assert!(packs >= 6, "{packs} packs");
    let pack = env.largest_pack();
    flip_byte(&pack, 1000);

    // Parts 1 to 3: disjoint, every pack read once, the damage found by one part only.
    let (mut read, mut found) = (0, 0);
    for n in 1..=3 {
        let part = format!("{n}/3");
        let run = env.pbs(&["--json", "check", "--read-data-subset", &part]);
        assert!(run.code == 0 || run.code == 3, "{part}: {}", run.stderr);
        let r = run.json_of("check");
        read += r["packs_read"].as_u64().unwrap();
        if run.code == 3 {
            found += 1;
            assert!(
                r["errors"]
                    .to_string()
                    .contains(&pack.file_name().unwrap().to_string_lossy()[..8]),
                "{r}"
            );
        }
    }
    assert_eq!(read, packs);
    assert_eq!(found, 1);
    // All of them, as a share; none, when the time is up at once.
    assert_eq!(
        report(&["--read-data-subset", "100%"], 3)["packs_read"],
        packs
    );
    let r = report(&["--read-data-subset", "100%", "--max-duration", "0s"], 0);
    assert_eq!(
        (r["packs_read"].as_u64(), r["packs_left_unread"].as_u64()),
        (Some(0), Some(packs))
    );
    let runs = env.runs();
    let last = runs.iter().rev().find(|r| r["kind"] == "check").unwrap();
    assert_eq!(last["details"]["check"]["packs_read"], 0);
    for bad in ["0/3", "4/3", "x", "0%", "150%"] {
        let r = env.pbs(&["check", "--read-data-subset", bad]);
        assert_eq!(r.code, 2, "{bad}: {}", r.stderr);
        assert!(
            r.stderr.contains("subset")
                || r.stderr.contains("N <= M")
                || r.stderr.contains("percentage"),
            "{bad}: {}",
            r.stderr
        );
    }
}
