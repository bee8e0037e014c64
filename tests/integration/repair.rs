//! Damaged index and snapshot files: the rest of the repository stays usable, `check`
//! names the damage, and `repair index` / `repair snapshots` make it whole (issue 14).

use haul_tests::*;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The names of the files in `dir`.
fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// Restores snapshot `id` into a new directory `name` of `env`; returns the restored
/// copy of `src` in it.
fn restore(env: &Env, id: &str, name: &str, src: &Path) -> PathBuf {
    let target = env.path(name);
    env.pbs(&["restore", id, "--target", target.to_str().unwrap()])
        .expect(0);
    target.join(src.strip_prefix("/").unwrap())
}

/// A backup of `src`: its snapshot id, and the index files it wrote.
fn backup(env: &Env, src: &Path) -> (String, BTreeSet<String>) {
    let before = names(&env.repo().join("index"));
    let id = env.backup(&[src], &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let after = names(&env.repo().join("index"));
    (id, after.difference(&before).cloned().collect())
}

/// The ids `snapshots --json` lists.
fn listed(env: &Env) -> (BTreeSet<String>, String) {
    let run = env.pbs(&["--json", "snapshots"]).expect(0);
    let ids = run
        .json()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    (ids, run.stderr)
}

#[test]
fn a_truncated_index_file_and_a_damaged_snapshot_leave_the_rest_usable_until_repaired() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    make_fixture(&src);
    // Three snapshots; each restored at once, as it is, for comparison later.
    let (first, _) = backup(&env, &src);
    let ref1 = restore(&env, &first, "ref1", &src);
    assert_same_tree(&src, &ref1);
    fs::write(src.join("second.bin"), random_bytes(40, 2 * 1024 * 1024)).unwrap();
    let (second, second_index) = backup(&env, &src);
    let ref2 = restore(&env, &second, "ref2", &src);
    assert_same_tree(&src, &ref2);
    fs::write(src.join("third.txt"), "third\n").unwrap();
    let (third, _) = backup(&env, &src);

    // The index file of the second backup, truncated (its packs hold second.bin); the
    // third snapshot's file, one byte flipped.
    assert_eq!(second_index.len(), 1, "{second_index:?}");
    let victim = second_index.into_iter().next().unwrap();
    let victim_path = env.repo().join("index").join(&victim);
    let len = fs::metadata(&victim_path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&victim_path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let bad_snapshot = env.repo().join("snapshots").join(&third);
    flip_byte(&bad_snapshot, 10);
    let bad_bytes = fs::read(&bad_snapshot).unwrap();

    // A copy of the damaged repository, for a backup while the damage is there.
    let other = Env::new();
    run_tool(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(env.repo())
            .arg(other.repo()),
        "cp",
    );

    // The other snapshots are listed; the damaged one is named on stderr.
    let (ids, stderr) = listed(&env);
    assert_eq!(ids, BTreeSet::from([first.clone(), second.clone()]));
    assert!(
        stderr.contains(&format!("snapshot file snapshots/{third} (")),
        "{stderr}"
    );
    assert!(
        stderr.contains("`haul-pbs repair snapshots` moves it aside"),
        "{stderr}"
    );
    // ... and restore, byte for byte and with their metadata, though the local index
    // cache covered the index file before it was truncated.
    assert_same_tree(&ref1, &restore(&env, &first, "out1", &src));
    let target = env.path("out2");
    let run = env
        .pbs(&["restore", &second, "--target", target.to_str().unwrap()])
        .expect(0);
    assert_same_tree(&ref2, &target.join(src.strip_prefix("/").unwrap()));
    assert!(
        run.stderr.contains(&format!("index file index/{victim} (")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("`haul-pbs repair index`"),
        "{}",
        run.stderr
    );
    // The damaged snapshot, asked for, is named with what to do.
    let out3 = env.path("out3");
    let run = env
        .pbs(&["restore", &third[..8], "--target", out3.to_str().unwrap()])
        .expect(1);
    assert!(
        run.stderr.contains(&format!(
            "haul-pbs: snapshots/{third} is corrupt: content does not match its name: it cannot be read, so nothing of it can be listed or restored; `haul-pbs repair snapshots` moves it aside"
        )),
        "{}",
        run.stderr
    );
    assert!(!out3.exists());

    // `ls` reads the others; `forget` plans without the damaged one.
    let run = env.pbs(&["ls", &second]).expect(0);
    assert!(run.stdout.contains("second.bin"), "{}", run.stdout);
    let plan = env
        .pbs(&["--json", "forget", "--keep-last", "1", "--dry-run"])
        .expect(0)
        .json();
    let planned: BTreeSet<(String, bool)> = plan
        .iter()
        .filter(|v| v["type"] == "decision")
        .map(|v| {
            (
                v["snapshot"].as_str().unwrap().to_string(),
                v["keep"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        planned,
        BTreeSet::from([(first.clone(), false), (second.clone(), true)])
    );

    // A backup still runs, on the newest readable snapshot as its parent.
    fs::write(src.join("fourth.txt"), "fourth\n").unwrap();
    let summary = other.backup(&[&src], &[]);
    assert_eq!(summary["parent"], second[..8], "{summary}");
    let target = other.path("out4");
    other
        .pbs(&["restore", "latest", "--target", target.to_str().unwrap()])
        .expect(0);
    assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));

    // Check names both damaged files.
    let run = env.pbs(&["check"]).expect(3);
    assert!(
        run.stdout.contains(&format!(
            "error: index file index/{victim} (content does not match its name) is damaged"
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!(
            "error: snapshot file snapshots/{third} (content does not match its name) cannot be read"
        )),
        "{}",
        run.stdout
    );
    let report = env.pbs(&["--json", "check"]).expect(3).json();
    let report = report
        .iter()
        .find(|v| v.get("damaged_files").is_some())
        .unwrap();
    let damaged: BTreeSet<(String, String)> = report["damaged_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["type"].as_str().unwrap().to_string(),
                d["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        damaged,
        BTreeSet::from([
            ("index file".to_string(), victim.clone()),
            ("snapshot".to_string(), third.clone())
        ])
    );

    // Dry runs change nothing.
    let index_before = names(&env.repo().join("index"));
    let dry = env
        .pbs(&["--json", "repair", "index", "--dry-run"])
        .expect(0)
        .json_of("repair-index");
    assert_eq!(dry["report"]["damaged"][0]["name"], victim.as_str());
    assert!(!dry["report"]["packs_indexed"]
        .as_array()
        .unwrap()
        .is_empty());
    env.pbs(&["repair", "snapshots", "--dry-run"]).expect(0);
    assert_eq!(names(&env.repo().join("index")), index_before);
    assert!(bad_snapshot.exists());
    assert!(!env.repo().join("damaged").exists());

    // The repairs: a new index for the packs from their headers, the damaged files
    // moved aside with their bytes.
    let run = env.pbs(&["repair", "index"]).expect(0);
    assert!(run.stdout.contains("wrote index file "), "{}", run.stdout);
    let run = env.pbs(&["repair", "snapshots"]).expect(0);
    let aside = env.repo().join("damaged/snapshots").join(&third);
    assert!(
        run.stdout.contains(&format!(
            "snapshot file snapshots/{third} (content does not match its name) is damaged: moved to {}",
            aside.display()
        )),
        "{}",
        run.stdout
    );
    assert_eq!(fs::read(&aside).unwrap(), bad_bytes);
    assert!(env.repo().join("damaged/index").join(&victim).exists());
    assert!(!victim_path.exists() && !bad_snapshot.exists());

    // Clean again, and the intact snapshots still restore.
    let run = env.pbs(&["check", "--read-data"]).expect(0);
    assert!(run.stdout.contains("no errors found"), "{}", run.stdout);
    let (ids, stderr) = listed(&env);
    assert_eq!(ids, BTreeSet::from([first.clone(), second.clone()]));
    assert!(!stderr.contains("damaged"), "{stderr}");
    assert_same_tree(&ref1, &restore(&env, &first, "again1", &src));
    assert_same_tree(&ref2, &restore(&env, &second, "again2", &src));
    // Nothing left to repair.
    let run = env.pbs(&["repair", "index"]).expect(0);
    assert!(
        run.stdout.contains("every readable pack is indexed"),
        "{}",
        run.stdout
    );
}
