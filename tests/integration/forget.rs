//! `forget` (by policy and by id), the retention a successful pull applies to its host,
//! and the retirement of a host's legacy rdiff-backup tree once retention has removed
//! one of its snapshots.

use haul_tests::{rdiff_backup, Env};
use std::fs;
use std::path::Path;

fn snapshots(env: &Env) -> Vec<serde_json::Value> {
    env.pbs(&["--json", "snapshots"]).expect(0).json()
}

fn ids(env: &Env) -> Vec<String> {
    snapshots(env)
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn forget_keeps_what_the_policy_keeps_removes_named_snapshots_and_refuses_without_a_rule() {
    let (env, src) = Env::with_one_file();
    for i in 0..4 {
        fs::write(src.join("f"), format!("version {i}")).unwrap();
        env.backup(&[&src], &[]);
    }
    let before = ids(&env);
    assert_eq!(before.len(), 4);

    let run = env.pbs(&["forget"]).expect(2);
    assert!(
        run.stderr
            .contains("give snapshot ids or at least one --keep-* rule"),
        "{}",
        run.stderr
    );
    let run = env
        .pbs(&["forget", "--keep-last", "2", "--dry-run"])
        .expect(0);
    assert_eq!(
        run.stdout
            .lines()
            .filter(|l| l.starts_with("would remove ") && !l.contains("snapshot(s)"))
            .count(),
        2,
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("would remove 2 snapshot(s), kept 2"),
        "{}",
        run.stdout
    );
    assert_eq!(ids(&env), before, "a dry run removes nothing");

    let run = env.pbs(&["--json", "forget", "--keep-last", "2"]).expect(0);
    let decisions = run.json();
    assert_eq!(decisions.len(), 4);
    for d in &decisions {
        let newest_two = before[2..].contains(&d["snapshot"].as_str().unwrap().to_string());
        assert_eq!(d["keep"], newest_two, "{d}");
    }
    assert_eq!(ids(&env), before[2..]);
    // The newest is still whole.
    let target = env.path("restored");
    env.restore(&target, &[]).expect(0);
    assert_eq!(
        fs::read(target.join(src.strip_prefix("/").unwrap()).join("f")).unwrap(),
        b"version 3"
    );

    // By id (a prefix), and a wrong id is refused without removing anything.
    let run = env.pbs(&["forget", "0000000000"]).expect(2);
    assert!(run.stderr.contains("snapshot 0000000000"), "{}", run.stderr);
    assert_eq!(ids(&env).len(), 2);
    // Named twice (a prefix and the whole id): removed once.
    env.pbs(&["forget", &before[2][..8], &before[2]]).expect(0);
    assert_eq!(ids(&env), before[3..]);
    env.pbs(&["check", "--read-data"]).expect(0);

    let forgets: Vec<_> = env
        .runs()
        .into_iter()
        .filter(|r| r["kind"] == "forget")
        .collect();
    // The refusal, the policy, the wrong id and the id: the dry run is not a run.
    assert_eq!(forgets.len(), 4, "{forgets:#?}");
    assert_eq!(forgets[1]["status"], "ok");
    assert_eq!(
        forgets[1]["details"]["forget"]["removed"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(forgets[2]["status"], "failed");
    assert_eq!(forgets[3]["details"]["forget"]["removed"][0], before[2]);
}

/// An rdiff-backup tree of `src` with three daily sessions, `src` changing between them.
fn rdiff_history(src: &Path, rd: &Path) {
    fs::create_dir_all(src).unwrap();
    for day in 0..3 {
        let time = 1_700_000_000 + day * 86_400;
        // Same size every day: rdiff-backup sees the change by the mtime (in seconds).
        fs::write(src.join("notes.txt"), format!("day {day}\n")).unwrap();
        fs::File::options()
            .write(true)
            .open(src.join("notes.txt"))
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(time as u64))
            .unwrap();
        fs::write(src.join(format!("file-{day}")), vec![day as u8; 5000]).unwrap();
        rdiff_backup(&[
            "--current-time",
            &time.to_string(),
            "backup",
            src.to_str().unwrap(),
            rd.to_str().unwrap(),
        ]);
    }
}

/// A `[[host]]` pulled locally from `src`, with the legacy rdiff-backup tree `rdiff`
/// and the extra lines `extra`.
fn legacy_host(name: &str, src: &Path, rdiff: &Path, extra: &str) -> String {
    format!(
        "[[host]]\nname = \"{name}\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{:?}]\nlegacy_rdiff_dir = {:?}\n{extra}",
        src.display().to_string(),
        rdiff.display().to_string()
    )
}

/// `pull HOST --config CONFIG --state-dir STATE`; it must exit 0.
fn pull(env: &Env, host: &str, config: &Path, state: &Path) -> haul_tests::Run {
    env.pbs(&[
        "pull",
        host,
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ])
    .expect(0)
}

#[test]
fn a_pull_applies_its_hosts_retention_and_then_retires_the_verified_legacy_tree() {
    let env = Env::new();
    env.init();
    // Three hosts with an rdiff-backup history each: "old" keeps 2 snapshots, so its
    // first pull (3 imported + 1 pulled) removes 2 and retires the tree; "kept" too,
    // but keeps its tree by setting; "roomy" keeps 10, so nothing is removed.
    let mut config = String::new();
    for (host, extra) in [
        ("old", "retention = { keep_last = 2 }\n"),
        (
            "kept",
            "retention = { keep_last = 2 }\nkeep_legacy_rdiff_dir = true\n",
        ),
        ("roomy", "retention = { keep_last = 10 }\n"),
    ] {
        let (src, rdiff) = (
            env.path(&format!("{host}-src")),
            env.path(&format!("{host}-rdiff")),
        );
        rdiff_history(&src, &rdiff);
        config += &legacy_host(host, &src, &rdiff, extra);
    }
    let config_file = env.path("pbs.toml");
    fs::write(&config_file, config).unwrap();
    let state = env.path("state");
    for host in ["old", "kept", "roomy"] {
        pull(&env, host, &config_file, &state);
    }
    let snaps = snapshots(&env);
    let of = |h: &str| {
        snaps
            .iter()
            .filter(|s| s["host"] == h)
            .cloned()
            .collect::<Vec<_>>()
    };
    for (host, left) in [("old", 2), ("kept", 2), ("roomy", 4)] {
        assert_eq!(of(host).len(), left, "{host}: {snaps:#?}");
    }
    // What stays of "old": the newest imported session and the pull.
    let old = of("old");
    assert_eq!(old[0]["source"], "rdiff-backup-import");
    assert!(
        old[0]["tags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "2023-11-16T22:13:20Z"),
        "{old:#?}"
    );
    assert_eq!(old[1]["source"], "local");
    assert!(!env.path("old-rdiff").exists(), "the retired tree is gone");
    assert!(
        env.path("kept-rdiff/rdiff-backup-data").is_dir(),
        "keep_legacy_rdiff_dir keeps it"
    );
    assert!(
        env.path("roomy-rdiff/rdiff-backup-data").is_dir(),
        "nothing was removed: it stays"
    );

    let runs: Vec<serde_json::Value> = fs::read_to_string(state.join("runs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let forget = |h: &str| {
        runs.iter()
            .filter(|r| r["kind"] == "forget" && r["host"] == h)
            .cloned()
            .collect::<Vec<_>>()
    };
    let old_forget = forget("old");
    assert_eq!(old_forget.len(), 1, "{runs:#?}");
    assert_eq!(old_forget[0]["status"], "ok");
    let removed =
        |r: &serde_json::Value| r["details"]["forget"]["removed"].as_array().unwrap().len();
    assert_eq!(removed(&old_forget[0]), 2);
    assert_eq!(
        old_forget[0]["details"]["forget"]["legacy_rdiff_dir_removed"],
        env.path("old-rdiff").display().to_string()
    );
    assert_eq!(removed(&forget("kept")[0]), 2);
    assert!(forget("kept")[0]["details"]["forget"]["legacy_rdiff_dir_removed"].is_null());
    assert!(forget("roomy").is_empty(), "nothing removed, no run");
    let feed = haul_tests::feedparser(&state.join("feed.xml"));
    assert!(
        feed["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["title"].as_str().unwrap().starts_with("old: forget OK")),
        "{feed:#}"
    );

    // The kept imported snapshot restores as the session was, and the repository is whole.
    let target = env.path("restored");
    env.pbs(&[
        "restore",
        old[0]["id"].as_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
    ])
    .expect(0);
    let restored = target.join(env.path("old-src").strip_prefix("/").unwrap());
    assert_eq!(
        fs::read_to_string(restored.join("notes.txt")).unwrap(),
        "day 2\n"
    );
    // rdiff-backup keeps mtimes in whole seconds: compare names, bytes and seconds.
    let src = env.path("old-src");
    let mut names: Vec<_> = fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    let mut back: Vec<_> = fs::read_dir(&restored)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    back.sort();
    assert_eq!(names, back);
    for n in names {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (src.join(&n), restored.join(&n));
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap(), "{n:?}");
        let (ma, mb) = (fs::metadata(&a).unwrap(), fs::metadata(&b).unwrap());
        assert_eq!(
            (ma.mtime(), ma.mode(), ma.uid()),
            (mb.mtime(), mb.mode(), mb.uid()),
            "{n:?}"
        );
    }
    env.pbs(&["check", "--read-data"]).expect(0);

    // A tree whose import fails (its mirror no longer matches its metadata) is never
    // retired, even when retention removes snapshots of the host.
    let broken_src = env.path("broken-src");
    let broken = env.path("broken-rdiff");
    rdiff_history(&broken_src, &broken);
    fs::write(broken.join("file-0"), b"not what the metadata says").unwrap();
    let broken_config = env.path("broken.toml");
    let keep_one = "retention = { keep_last = 1 }\n";
    fs::write(
        &broken_config,
        legacy_host("broken", &broken_src, &broken, keep_one),
    )
    .unwrap();
    for _ in 0..2 {
        let run = pull(&env, "broken", &broken_config, &state);
        assert!(
            run.stderr.contains("the pull goes on without it"),
            "{}",
            run.stderr
        );
    }
    let broken_snaps: Vec<_> = snapshots(&env)
        .into_iter()
        .filter(|s| s["host"] == "broken")
        .collect();
    assert_eq!(broken_snaps.len(), 1, "{broken_snaps:#?}");
    assert!(
        broken.join("rdiff-backup-data").is_dir(),
        "an unverified tree stays"
    );
    let runs = env.runs();
    let broken_forget: Vec<_> = runs
        .iter()
        .filter(|r| r["kind"] == "forget" && r["host"] == "broken")
        .collect();
    assert_eq!(broken_forget.len(), 1, "{runs:#?}");
    assert_eq!(
        broken_forget[0]["details"]["forget"]["removed"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A host whose rdiff-backup history came from another tree (imported by hand under
    // its name): its legacy_rdiff_dir was never imported, so it is never retired.
    let other_src = env.path("other-src");
    let other = env.path("other-rdiff");
    let elsewhere = env.path("elsewhere-rdiff");
    rdiff_history(&other_src, &other);
    rdiff_history(&env.path("elsewhere-src"), &elsewhere);
    env.pbs(&[
        "import-rdiff",
        elsewhere.to_str().unwrap(),
        "--host",
        "other",
        "--path",
        other_src.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ])
    .expect(0);
    let other_config = env.path("other.toml");
    fs::write(
        &other_config,
        legacy_host("other", &other_src, &other, keep_one),
    )
    .unwrap();
    pull(&env, "other", &other_config, &state);
    assert_eq!(
        snapshots(&env)
            .iter()
            .filter(|s| s["host"] == "other")
            .count(),
        1,
        "retention removed the imported ones"
    );
    assert!(
        other.join("rdiff-backup-data").is_dir(),
        "a tree that was never imported stays"
    );

    // The next pull of "old": one more snapshot, one more removed; no tree to retire.
    pull(&env, "old", &config_file, &state);
    let now: Vec<_> = snapshots(&env)
        .into_iter()
        .filter(|s| s["host"] == "old")
        .collect();
    assert_eq!(now.len(), 2);
    assert!(now.iter().all(|s| s["source"] == "local"));
}
