//! `copy --to`: snapshots into another repository with keys of its own.

use std::fs;
use std::time::{Duration, Instant};

use haul_tests::{assert_same_tree, make_fixture, random_bytes, walk_files, Env};

/// A second repository, made with a passphrase of its own.
fn target() -> Env {
    let t = Env::new();
    fs::write(t.path("pass"), "another passphrase, another key\n").unwrap();
    t.init();
    t
}

fn copy_to(env: &Env, target: &Env, extra: &[&str]) -> haul_tests::Run {
    let to = target.repo().display().to_string();
    let pass = target.path("pass").display().to_string();
    let mut args = vec!["--json", "copy", "--to", &to, "--to-password-file", &pass];
    args.extend_from_slice(extra);
    env.pbs(&args)
}

fn snapshots(env: &Env) -> Vec<serde_json::Value> {
    env.pbs(&["--json", "snapshots"])
        .expect(0)
        .json()
        .into_iter()
        .filter(|v| v["type"] == "snapshot")
        .collect()
}

/// Restores snapshot `id` of `env` into a new directory and returns it.
fn restore(env: &Env, id: &str, name: &str) -> std::path::PathBuf {
    let target = env.path(name);
    env.pbs(&["restore", id, "--target", target.to_str().unwrap()])
        .expect(0);
    target
}

#[test]
fn a_copy_restores_byte_for_byte_skips_what_is_there_and_resumes_after_kill_9() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    make_fixture(&src);
    env.pull_local(&[&src], &["--tag", "first"]).0.expect(0);
    fs::write(src.join("dir/text.txt"), "changed\n").unwrap();
    fs::write(src.join("new.bin"), random_bytes(3, 3 << 20)).unwrap();
    env.pull_local(&[&src], &[]).0.expect(0);
    let tgt = target();

    // Everything, oldest first: each copy equals its original, with the same time,
    // host, paths, tags and root tree, and records where it came from.
    let run = copy_to(&env, &tgt, &[]).expect(0);
    let summary = run.json_of("copy-summary");
    assert_eq!(
        (summary["copied"].as_u64(), summary["skipped"].as_u64()),
        (Some(2), Some(0))
    );
    let (orig, copies) = (snapshots(&env), snapshots(&tgt));
    assert_eq!(copies.len(), 2);
    for (o, c) in orig.iter().zip(&copies) {
        for field in ["time", "host", "paths", "tags", "tree"] {
            assert_eq!(o[field], c[field], "{field}: {o:#} {c:#}");
        }
        assert_eq!(c["original"], o["id"]);
        let a = restore(
            &env,
            o["id"].as_str().unwrap(),
            &format!("from-source-{}", &o["id"].as_str().unwrap()[..8]),
        );
        let b = restore(
            &tgt,
            c["id"].as_str().unwrap(),
            &format!("from-copy-{}", &c["id"].as_str().unwrap()[..8]),
        );
        assert_same_tree(&a, &b);
    }
    // The second copy's parent is the first copy.
    assert_eq!(copies[1]["parent"], copies[0]["id"]);
    tgt.pbs(&["check", "--read-data"]).expect(0);
    // The target's own key opens it; the source's passphrase does not.
    let wrong = tgt.pbs(&[
        "--password-file",
        env.path("pass").to_str().unwrap(),
        "snapshots",
    ]);
    assert_ne!(wrong.code, 0);

    // Again: nothing to do, nothing sent.
    let run = copy_to(&env, &tgt, &[]).expect(0);
    let summary = run.json_of("copy-summary");
    assert_eq!(summary["copied"], 0);
    assert_eq!(summary["skipped"], 2);
    assert_eq!(summary["bytes_copied"], 0);
    assert_eq!(snapshots(&tgt).len(), 2);

    // A third snapshot with 96 MiB of new data; its copy is killed with SIGKILL once
    // some of it arrived, and run again: it sends only what did not arrive.
    fs::write(src.join("big.bin"), random_bytes(11, 96 << 20)).unwrap();
    env.pull_local(&[&src], &[]).0.expect(0);
    let packs = |e: &Env| walk_files(&e.repo().join("data")).len();
    let before = packs(&tgt);
    let to = tgt.repo().display().to_string();
    let pass = tgt.path("pass").display().to_string();
    let mut child = env
        .pbs_command(&["copy", "--to", &to, "--to-password-file", &pass])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while packs(&tgt) < before + 3 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the copy ended before it was killed"
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no pack arrived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        snapshots(&tgt).len(),
        2,
        "no snapshot is written before its data"
    );
    let arrived = packs(&tgt) - before;
    let run = copy_to(&env, &tgt, &[]).expect(0);
    let summary = run.json_of("copy-summary");
    assert_eq!(summary["copied"], 1);
    assert_eq!(summary["skipped"], 2);
    let sent = summary["bytes_copied"].as_u64().unwrap();
    assert!(
        sent < (96 << 20) - (arrived as u64 - 1) * (15 << 20),
        "{arrived} packs had arrived, yet {sent} bytes were sent again"
    );
    let copies = snapshots(&tgt);
    assert_eq!(copies.len(), 3);
    let orig = snapshots(&env);
    let a = restore(&env, orig[2]["id"].as_str().unwrap(), "third-source");
    let b = restore(&tgt, copies[2]["id"].as_str().unwrap(), "third-copy");
    assert_same_tree(&a, &b);
    tgt.pbs(&["check", "--read-data"]).expect(0);

    // By host and by id; a target that is the source, or that does not exist, is
    // refused by name.
    let tgt2 = target();
    let first = orig[0]["id"].as_str().unwrap();
    let run = copy_to(&env, &tgt2, &["--snapshot", &first[..8]]).expect(0);
    assert_eq!(run.json_of("copy-summary")["copied"], 1);
    assert_eq!(snapshots(&tgt2)[0]["original"], first);
    let same = env.repo().display().to_string();
    let run = env.pbs(&[
        "copy",
        "--to",
        &same,
        "--to-password-file",
        env.path("pass").to_str().unwrap(),
    ]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("the repository copied from"),
        "{}",
        run.stderr
    );
    let nowhere = env.path("nowhere").display().to_string();
    let run = env.pbs(&["copy", "--to", &nowhere, "--to-password-file", &pass]);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains("no haul repository at") && run.stderr.contains("nowhere"),
        "{}",
        run.stderr
    );
}

/// Another pbs behind a real sshd: its key's forced command is `haul-pbs receive` into
/// `tgt`'s repository (with `receive_args`), and `cfg` names it `[[remote]] offsite`.
struct OtherPbs {
    sshd: haul_tests::Sshd,
    cfg: std::path::PathBuf,
}

impl OtherPbs {
    fn start(env: &Env, tgt: &Env, receive_args: &str, extra_env: &str) -> OtherPbs {
        let sshd = haul_tests::Sshd::start(&env.path("sshd"), &[]);
        let pbs = haul_tests::bin("haul-pbs");
        sshd.force_command(&format!(
            "env HAUL_STATE_DIR={} HAUL_CONFIG=/dev/null {extra_env} {} --repo {} --password-file {} --cache-dir {} receive {receive_args}",
            tgt.path("state").display(),
            pbs.display(),
            tgt.repo().display(),
            tgt.path("pass").display(),
            tgt.path("cache").display(),
        ));
        let cfg = env.path("pbs.toml");
        fs::write(
            &cfg,
            format!(
                "[[remote]]\nname = \"offsite\"\naddress = \"127.0.0.1\"\nport = {}\nuser = {:?}\nidentity = {:?}\nknown_hosts = {:?}\n",
                sshd.port,
                haul_tests::Sshd::user(),
                sshd.dir.join("id_ed25519").display().to_string(),
                sshd.dir.join("known_hosts").display().to_string(),
            ),
        )
        .unwrap();
        OtherPbs { sshd, cfg }
    }

    fn copy(&self, env: &Env, extra: &[&str]) -> haul_tests::Run {
        let mut args = vec![
            "--config",
            self.cfg.to_str().unwrap(),
            "--json",
            "copy",
            "--to",
            "pbs:offsite",
        ];
        args.extend_from_slice(extra);
        env.pbs(&args)
    }

    fn copy_command(&self, env: &Env) -> std::process::Command {
        env.pbs_command(&[
            "--config",
            self.cfg.to_str().unwrap(),
            "copy",
            "--to",
            "pbs:offsite",
        ])
    }
}

#[test]
fn a_copy_to_another_pbs_over_ssh_restores_byte_for_byte_and_resumes_after_kill_9() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    make_fixture(&src);
    env.pull_local(&[&src], &["--tag", "first"]).0.expect(0);
    fs::write(src.join("dir/text.txt"), "changed again\n").unwrap();
    fs::write(src.join("new.bin"), random_bytes(5, 2 << 20)).unwrap();
    env.pull_local(&[&src], &[]).0.expect(0);
    let tgt = target();
    // Storing on the receiving side is slowed down (test builds only), so that the
    // copy below can be killed half-way.
    let other = OtherPbs::start(&env, &tgt, "", "HAUL_FAULT_STORE_DELAY_MS=150");

    let run = other.copy(&env, &[]).expect(0);
    let summary = run.json_of("copy-summary");
    assert_eq!(
        (summary["copied"].as_u64(), summary["skipped"].as_u64()),
        (Some(2), Some(0)),
        "{}",
        run.stdout
    );
    // The second builds on the first's copy: only what changed crosses the link.
    let each: Vec<_> = run
        .json()
        .into_iter()
        .filter(|v| v["type"] == "copy")
        .collect();
    let second = &each[1]["report"];
    assert!(
        second["bytes_copied"].as_u64().unwrap() < (2 << 20) + (256 << 10)
            && second["blobs_present"].as_u64().unwrap() > 0,
        "{second}"
    );
    let (orig, copies) = (snapshots(&env), snapshots(&tgt));
    assert_eq!(copies.len(), 2);
    for (o, c) in orig.iter().zip(&copies) {
        for field in ["time", "host", "paths", "tags", "tree", "summary"] {
            assert_eq!(o[field], c[field], "{field}: {o:#} {c:#}");
        }
        assert_eq!(c["original"], o["id"]);
        let a = restore(
            &env,
            o["id"].as_str().unwrap(),
            &format!("s-{}", &o["id"].as_str().unwrap()[..8]),
        );
        let b = restore(
            &tgt,
            c["id"].as_str().unwrap(),
            &format!("c-{}", &c["id"].as_str().unwrap()[..8]),
        );
        assert_same_tree(&a, &b);
    }
    assert_eq!(copies[1]["parent"], copies[0]["id"]);
    tgt.pbs(&["check", "--read-data"]).expect(0);

    // Again: both are there, nothing is sent.
    let run = other.copy(&env, &[]).expect(0);
    let summary = run.json_of("copy-summary");
    assert_eq!(
        (summary["copied"].as_u64(), summary["skipped"].as_u64()),
        (Some(0), Some(2))
    );
    assert_eq!(summary["bytes_copied"], 0);

    // 64 MiB of new data; the copy is killed with SIGKILL once some of it arrived, and
    // run again: it sends only what did not arrive.
    fs::write(src.join("big.bin"), random_bytes(12, 64 << 20)).unwrap();
    env.pull_local(&[&src], &[]).0.expect(0);
    let packs = |e: &Env| walk_files(&e.repo().join("data")).len();
    let before = packs(&tgt);
    let before_bytes: u64 = walk_files(&tgt.repo().join("data"))
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    let mut child = other
        .copy_command(&env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while packs(&tgt) < before + 2 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the copy ended before it was killed"
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no pack arrived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        snapshots(&tgt).len(),
        2,
        "no snapshot is written before its data"
    );
    // The receiving command notices its sender is gone, and ends.
    haul_tests::wait_until(
        Duration::from_secs(30),
        "the receiving command to end",
        || {
            !haul_tests::descendants(other.sshd.pid())
                .iter()
                .any(|(_, cmd)| cmd.contains("receive"))
        },
    );
    // What arrived (the packs the receiving side wrote, the last one when it ended)
    // is not sent again.
    let arrived: u64 = walk_files(&tgt.repo().join("data"))
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum::<u64>()
        - before_bytes;
    assert!(arrived > 16 << 20, "only {arrived} bytes had arrived");
    let run = other.copy(&env, &[]).expect(0);
    let summary = run.json_of("copy-summary");
    assert_eq!(
        (summary["copied"].as_u64(), summary["skipped"].as_u64()),
        (Some(1), Some(2))
    );
    let sent = summary["bytes_copied"].as_u64().unwrap();
    assert!(
        sent < (64 << 20) - arrived + (4 << 20),
        "{arrived} bytes had arrived, yet {sent} bytes were sent again"
    );
    let copies = snapshots(&tgt);
    assert_eq!(copies.len(), 3);
    let orig = snapshots(&env);
    let a = restore(&env, orig[2]["id"].as_str().unwrap(), "third-source");
    let b = restore(&tgt, copies[2]["id"].as_str().unwrap(), "third-copy");
    assert_same_tree(&a, &b);
    tgt.pbs(&["check", "--read-data"]).expect(0);

    // A remote the configuration does not name is refused by name.
    let run = env.pbs(&[
        "--config",
        other.cfg.to_str().unwrap(),
        "copy",
        "--to",
        "pbs:elsewhere",
    ]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("no [[remote]] named \"elsewhere\""),
        "{}",
        run.stderr
    );
}
