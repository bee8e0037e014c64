//! `prune`: space comes back, pulls go on beside it, a kill at any step loses nothing,
//! a dry run changes nothing, and the daemon prunes on its schedule.

use haul_tests::*;
use std::collections::BTreeMap;
use std::fs;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Version `n` of the source: a fixture of every kind of entry, a file rewritten each
/// time, one that grows, and one that never changes.
fn write_version(src: &Path, n: u64) {
    if n == 1 {
        fs::create_dir_all(src).unwrap();
        fs::write(src.join("log.txt"), "").unwrap();
        make_fixture(&src.join("fixture"));
        fs::write(src.join("stable.bin"), random_bytes(9_999, 600_000)).unwrap();
    }
    fs::write(src.join("changing.bin"), random_bytes(1_000 + n, 1_500_000)).unwrap();
    append(&src.join("log.txt"), &format!("version {n}\n"));
}

/// Every file of the repository with its bytes.
fn repository_files(repo: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    walk_files(repo)
        .into_iter()
        .map(|p| {
            (
                p.strip_prefix(repo).unwrap().to_path_buf(),
                fs::read(&p).unwrap(),
            )
        })
        .collect()
}

fn stored_bytes(env: &Env) -> u64 {
    walk_files(&env.repo().join("data"))
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}

fn snapshot_ids(env: &Env) -> Vec<String> {
    env.pbs(&["--json", "snapshots"])
        .expect(0)
        .json()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

/// `check --read-data --json`: its report, which must be clean.
fn check_clean(env: &Env) -> serde_json::Value {
    let run = env.pbs(&["--json", "check", "--read-data"]);
    let report = run
        .json()
        .into_iter()
        .find(|v| v["unused"].is_object())
        .unwrap_or_else(|| panic!("no check report:\n{}\n{}", run.stdout, run.stderr));
    assert_eq!(run.code, 0, "{report:#}\n{}", run.stderr);
    assert_eq!(report["errors"], serde_json::json!([]), "{report:#}");
    report
}

/// Restores the newest snapshot and compares it with `src`, bytes and metadata.
fn restores_as(env: &Env, src: &Path) {
    let target = env.path(&format!("restore-{}", rand_suffix()));
    env.restore(&target, &[]).expect(0);
    assert_same_tree(src, &target.join(src.strip_prefix("/").unwrap()));
    fs::remove_dir_all(&target).unwrap();
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}

fn prune_json(run: &Run) -> serde_json::Value {
    run.json_of("prune")
}

#[test]
fn forget_and_prune_give_back_what_only_the_forgotten_snapshots_held() {
    let (env, src) = Env::with_source();
    for n in 1..=5 {
        write_version(&src, n);
        env.backup(&[&src], &[]);
    }
    let ids = snapshot_ids(&env);
    env.pbs(&["forget", "--keep-last", "1"]).expect(0);
    assert_eq!(snapshot_ids(&env), ids[4..]);
    // What only the forgotten snapshots held: four versions of changing.bin.
    let unused = check_clean(&env)["unused"]["bytes"].as_u64().unwrap();
    assert!(unused > 4 * 1_400_000, "{unused}");
    let before = stored_bytes(&env);

    // A dry run writes nothing and decides what the prune then does.
    let files = repository_files(&env.repo());
    let dry = env.pbs(&["--json", "prune", "--dry-run"]).expect(0);
    assert_eq!(
        repository_files(&env.repo()),
        files,
        "a dry run changed files"
    );
    let text = env.pbs(&["prune", "--dry-run"]).expect(0).stdout;
    assert!(text.contains("would be deleted"), "{text}");
    assert_eq!(
        repository_files(&env.repo()),
        files,
        "a dry run changed files"
    );

    let run = env.pbs(&["--json", "prune"]).expect(0);
    let report = prune_json(&run);
    assert_eq!(
        report["report"]["plan"],
        prune_json(&dry)["report"]["plan"],
        "the dry run's plan is the prune's"
    );
    let after = stored_bytes(&env);
    assert!(
        (before - after) as f64 >= 0.8 * unused as f64,
        "freed {} of {unused} unused bytes",
        before - after
    );
    assert_eq!(report["bytes_freed"], before - after);
    assert_eq!(report["report"]["packs_pending"], 0);
    assert!(report["report"]["packs_deleted"].as_u64().unwrap() > 0);
    // Nothing is left of the prune's bookkeeping but its epoch marker.
    assert_eq!(env.count("condemned"), 0);
    assert_eq!(env.count("epochs"), 1);
    assert_eq!(env.count("locks"), 0);

    let report = check_clean(&env);
    assert_eq!(report["snapshots"], 1);
    assert!(
        report["unused"]["bytes"].as_u64().unwrap() * 20 <= after,
        "{report:#}"
    );
    restores_as(&env, &src);
    // The run is in the history; a second prune has nothing to do.
    let runs = env.runs();
    let last = runs.iter().rev().find(|r| r["kind"] == "prune").unwrap();
    assert_eq!(last["status"], "ok");
    assert_eq!(last["details"]["prune"]["bytes_freed"], before - after);
    let text = env.pbs(&["prune"]).expect(0).stdout;
    assert!(
        text.contains("0 B freed, 0 packs deleted, 0 repacked"),
        "{text}"
    );
    // Later backups still deduplicate against what stayed.
    let summary = env.backup(&[&src], &[]);
    assert_eq!(summary["data_new"], 0, "{summary}");
}

/// A pull whose parent is forgotten and pruned while it runs (its source was told the
/// parent's chunks exist, so it does not send them), and a prune that starts first.
#[test]
fn pulls_and_prunes_run_together_and_every_snapshot_stays_whole() {
    let (env, src) = Env::with_source();
    write_version(&src, 1);
    env.pull_local(&[&src], &[]).0.expect(0);
    let state = env.path("state").display().to_string();
    let s = src.display().to_string();
    let mut rescued = 0;
    for round in 0..6u64 {
        write_version(&src, round + 2);
        fs::write(src.join("big.bin"), random_bytes(2_000 + round, 8 << 20)).unwrap();
        let old = snapshot_ids(&env);
        // Random delays, both orders.
        let delay = Duration::from_millis(random_bytes(round, 1)[0] as u64 * 2);
        let mut pull = env.pbs_command(&["pull", "--local", &s, "--state-dir", &state]);
        // Storage made slow (a debug build's fault hook), so that a pull lasts
        // seconds: the forget and prune that follow it overlap it.
        pull.env("HAUL_FAULT_STORE_DELAY_MS", "300");
        let mut forget = vec!["forget".to_string()];
        forget.extend(old);
        let forget: Vec<&str> = forget.iter().map(String::as_str).collect();
        let prune = env.pbs_command(&["--json", "prune", "--max-wait", "5m"]);
        let spawn = |mut cmd: std::process::Command| {
            std::thread::spawn(move || Run::from_output(cmd.output().unwrap()))
        };
        let pull_first = round % 2 == 0;
        let (pull, prune) = if pull_first {
            let pull = spawn(pull);
            std::thread::sleep(delay);
            env.pbs(&forget).expect(0);
            (pull, spawn(prune))
        } else {
            env.pbs(&forget).expect(0);
            let prune = spawn(prune);
            std::thread::sleep(delay);
            (spawn(pull), prune)
        };
        let (pull, prune) = (pull.join().unwrap(), prune.join().unwrap());
        assert_eq!(pull.code, 0, "round {round}: pull\n{}", pull.stderr);
        assert_eq!(prune.code, 0, "round {round}: prune\n{}", prune.stderr);
        let report = &prune_json(&prune)["report"];
        assert_eq!(report["packs_pending"], 0, "round {round}: {report:#}");
        if pull_first {
            rescued += report["packs_rescued"].as_u64().unwrap();
        }
        assert_eq!(snapshot_ids(&env).len(), 1, "round {round}");
        restores_as(&env, &src);
    }
    // The pulls that started first built on their forgotten parents' data, which the
    // prune condemned and then gave back to them.
    assert!(rescued > 0, "no prune overlapped a pull");
    check_clean(&env);
    // A last prune with nothing running leaves only what the snapshot uses.
    env.pbs(&["prune", "--max-unused", "0%"]).expect(0);
    assert_eq!(env.count("condemned"), 0);
    let report = check_clean(&env);
    assert_eq!(report["unused"]["bytes"], 0, "{report:#}");
    assert_eq!(report["warnings"], serde_json::json!([]), "{report:#}");
    restores_as(&env, &src);
}

/// The steps a debug build's prune can pause at (`haul_repo::prune::Step`).
const STEPS: [&str; 10] = [
    "listed",
    "marked",
    "repacking",
    "repacked",
    "condemned",
    "index-deleting",
    "epoch",
    "rescued",
    "pack-deleting",
    "swept",
];

/// `prune` started in the background, once it says it paused at `step` (and goes on
/// when the file `resume` appears, if given).
fn prune_paused_at(env: &Env, step: &str, resume: Option<&Path>) -> KillOnDrop {
    let mut cmd = env.pbs_command(&["prune"]);
    cmd.env("HAUL_PRUNE_PAUSE_AT", step)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if let Some(r) = resume {
        cmd.env("HAUL_PRUNE_RESUME", r);
    }
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let wanted = format!("haul: prune paused at step {step}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line == wanted => return child,
            Ok(line) => seen.push(line),
            Err(e) => panic!("step {step}: no pause ({e}); stderr: {seen:#?}"),
        }
    }
}

/// A snapshot committed after the prune listed the snapshots, built on one that is
/// forgotten meanwhile: the prune walks it in its sweep and keeps what it uses.
#[test]
fn a_snapshot_committed_while_a_prune_starts_is_kept_whole() {
    let (env, src) = Env::with_source();
    write_version(&src, 1);
    env.pull_local(&[&src], &[]).0.expect(0);
    let first = snapshot_ids(&env);
    write_version(&src, 2);
    let resume = env.path("resume");
    let mut prune = prune_paused_at(&env, "listed", Some(&resume));
    env.pull_local(&[&src], &[]).0.expect(0);
    env.pbs(&["forget", &first[0]]).expect(0);
    fs::write(&resume, "").unwrap();
    assert!(prune.0.wait().unwrap().success());
    assert_eq!(env.count("condemned"), 0);
    check_clean(&env);
    restores_as(&env, &src);
    // The next prune reclaims what only the forgotten snapshot used.
    env.pbs(&["prune"]).expect(0);
    let report = check_clean(&env);
    assert_eq!(report["unused"]["packs"], 0, "{report:#}");
    restores_as(&env, &src);
}

#[test]
fn a_prune_killed_at_any_step_loses_nothing_and_the_next_one_finishes() {
    // A repository where a prune both deletes and repacks: three versions, the
    // first two forgotten (the first one's packs also hold what the third uses).
    let (template, src) = Env::with_source();
    for n in 1..=3 {
        write_version(&src, n);
        template.backup(&[&src], &[]);
    }
    let ids = snapshot_ids(&template);
    template.pbs(&["forget", &ids[0], &ids[1]]).expect(0);
    let plan = prune_json(&template.pbs(&["--json", "prune", "--dry-run"]).expect(0));
    let plan = &plan["report"]["plan"];
    assert!(
        !plan["delete"].as_array().unwrap().is_empty()
            && !plan["repack"].as_array().unwrap().is_empty(),
        "{plan:#}"
    );
    let before = stored_bytes(&template);
    let unused = check_clean(&template)["unused"]["bytes"].as_u64().unwrap();
    assert!(unused > 2_000_000, "{unused}");
    for step in STEPS {
        let env = Env::new();
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(template.repo())
            .arg(env.repo())
            .status()
            .unwrap();
        assert!(copied.success());
        // Killed (-9) and reaped once paused at the step.
        drop(prune_paused_at(&env, step, None));
        // Consistent as it is: clean, every snapshot restores.
        let report = check_clean(&env);
        assert_eq!(report["snapshots"], 1, "step {step}");
        restores_as(&env, &src);
        // The next prune finishes the work.
        env.pbs(&["prune"]).expect(0);
        assert_eq!(env.count("condemned"), 0, "step {step}");
        let report = check_clean(&env);
        assert_eq!(
            report["warnings"],
            serde_json::json!([]),
            "step {step}: {report:#}"
        );
        assert_eq!(report["unused"]["packs"], 0, "step {step}: {report:#}");
        let after = stored_bytes(&env);
        assert!(
            (before - after) as f64 >= 0.8 * unused as f64,
            "step {step}: {after} of {before}, {unused} unused: {report:#}"
        );
        restores_as(&env, &src);
    }
}

#[test]
fn the_daemon_prunes_on_schedule_after_retention_removed_snapshots() {
    let env = Env::new();
    let src = env.path("src");
    write_version(&src, 1);
    let (state, repos) = (env.path("state"), env.path("repos"));
    let config = env.path("pbs.toml");
    fs::write(
        &config,
        format!(
            "[server]\nstate_dir = {:?}\nrepositories_dir = {:?}\nstatus_listen = {:?}\nsocket_dir = {:?}\n\
             schedule = \"1s\"\nprune_schedule = \"1s\"\n\n\
             [[host]]\nname = \"web\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{:?}]\n\
             retention = {{ keep_last = 1 }}\n",
            state.display().to_string(),
            repos.display().to_string(),
            free_listen(),
            env.path("sockets").display().to_string(),
            src.display().to_string(),
        ),
    )
    .unwrap();
    // Version 1 pulled by hand, version 2 by the daemon: its retention then removes
    // the only snapshot that held version 1's data.
    let cfg = config.display().to_string();
    let pbs = |args: &[&str]| {
        Run::from_output(
            std::process::Command::new(bin("haul-pbs"))
                .arg("--config")
                .arg(&cfg)
                .args(args)
                .env("HAUL_CACHE_DIR", env.path("cache"))
                .env("HAUL_AGENT", bin("haul-agent"))
                .output()
                .unwrap(),
        )
    };
    pbs(&["pull", "web"]).expect(0);
    write_version(&src, 2);
    let log = env.path("daemon.log");
    let mut daemon = start_daemon(&env, &config, &log);
    let records = || -> Vec<serde_json::Value> {
        fs::read_to_string(state.join("runs.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let t = Instant::now();
    let prune = loop {
        let runs = records();
        if let Some(p) = runs.iter().find(|r| r["kind"] == "prune") {
            break p.clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "no prune: {runs:#?}\n{}",
            fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    assert!(daemon.0.wait().unwrap().success());
    assert_eq!(prune["status"], "ok", "{prune:#}");
    assert_eq!(prune["host"], "repository");
    let details = &prune["details"]["prune"];
    assert_eq!(
        details["repository"],
        repos.join("repo").display().to_string()
    );
    assert!(
        details["bytes_freed"].as_u64().unwrap() > 1_000_000,
        "{details:#}\n{:#?}\n{}\n{}",
        records(),
        pbs(&["--json", "check"]).stdout,
        fs::read_to_string(&log).unwrap()
    );
    // A forget run came first: the prune waited for something to reclaim.
    let runs = records();
    let forget = runs.iter().position(|r| r["kind"] == "forget").unwrap();
    let pruned = runs.iter().position(|r| r["kind"] == "prune").unwrap();
    assert!(forget < pruned);
    // In the feed, as feedparser reads it.
    let feed = feedparser(&state.join("feed.xml"));
    assert_eq!(feed["bozo"], false);
    let title = feed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["title"].as_str())
        .find(|t| t.starts_with("repository: prune OK — "))
        .unwrap_or_else(|| panic!("{feed:#}"))
        .to_string();
    assert!(
        title.contains(" freed, ")
            && title.contains(" packs deleted, ")
            && title.ends_with(" repacked"),
        "{title}"
    );
    // The repository is clean, and its newest snapshot restores.
    pbs(&["check", "--read-data"]).expect(0);
    let target = env.path("restored");
    pbs(&["restore", "latest", "--target", target.to_str().unwrap()]).expect(0);
    assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));
}

#[test]
fn a_full_disk_fails_the_prune_cleanly_and_loses_nothing() {
    use std::os::unix::fs::symlink;
    let env = Env::new();
    // The repository and the index cache on a small disk of their own.
    let disk = Tmpfs::mount(&env.path("disk"), "64m");
    for d in ["repo", "cache"] {
        fs::create_dir(disk.path.join(d)).unwrap();
        symlink(disk.path.join(d), env.path(d)).unwrap();
    }
    env.init();
    let src = env.path("src");
    for n in 1..=3 {
        write_version(&src, n);
        env.backup(&[&src], &[]);
    }
    let ids = snapshot_ids(&env);
    env.pbs(&["forget", &ids[0], &ids[1]]).expect(0);
    let before = repository_files(&env.repo());
    // Room for a lock and an index file, not for the repacked copies.
    disk.fill_leaving(256 * 1024);
    let run = env.pbs(&["prune"]);
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("No space left on device"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("the disk is full"), "{}", run.stderr);
    // Nothing the snapshots use is gone; what the failed prune left is reclaimable.
    for (path, bytes) in &before {
        if !path.starts_with("locks") {
            assert_eq!(
                fs::read(env.repo().join(path)).ok().as_ref(),
                Some(bytes),
                "{path:?}"
            );
        }
    }
    assert_eq!(env.count("condemned"), 0);
    let report = check_clean(&env);
    assert_eq!(report["snapshots"], 1);
    restores_as(&env, &src);
    let failed = env
        .runs()
        .into_iter()
        .rev()
        .find(|r| r["kind"] == "prune")
        .unwrap();
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{failed:#}"
    );
    // With room again, the prune does its work.
    disk.unfill();
    env.pbs(&["prune"]).expect(0);
    let report = check_clean(&env);
    assert_eq!(report["unused"]["packs"], 0, "{report:#}");
    restores_as(&env, &src);
}
