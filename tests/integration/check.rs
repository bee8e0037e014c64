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

    // Restoring the damaged file fails and says which; the bystander still restores.
    let target = env.path("out");
    let run = env.restore(&target, &[]).expect(1);
    assert!(
        run.stderr.contains("authentication failed") || run.stderr.contains("corrupt"),
        "{}",
        run.stderr
    );
    assert!(
        !target.exists(),
        "a failed restore leaves no half-written target"
    );
    let target = env.path("out2");
    let bystander = src.join("bystander.txt");
    env.restore(&target, &[&bystander]).expect(0);
    assert_eq!(
        fs::read(target.join(bystander.strip_prefix("/").unwrap())).unwrap(),
        "fine\n".repeat(1000).as_bytes()
    );
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
