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

/// Waits until `n` packs more than `before` are in `tgt`'s repository (the copy
/// `child` is under way), then kills the copy with SIGKILL.
fn kill_when_packs_arrive(mut child: std::process::Child, tgt: &Env, before: usize, n: usize) {
    let packs = || walk_files(&tgt.repo().join("data")).len();
    let start = Instant::now();
    while packs() < before + n {
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
    let child = env
        .pbs_command(&["copy", "--to", &to, "--to-password-file", &pass])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    kill_when_packs_arrive(child, &tgt, before, 3);
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
        let sshd = haul_tests::Sshd::receiving(
            &env.path("sshd"),
            (&tgt.repo(), &tgt.path("pass")),
            (&tgt.path("state"), &tgt.path("cache")),
            receive_args,
            extra_env,
        );
        let cfg = env.path("pbs.toml");
        fs::write(&cfg, sshd.remote_config("offsite")).unwrap();
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
    let child = other
        .copy_command(&env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    kill_when_packs_arrive(child, &tgt, before, 2);
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

/// Speaks HTTP by hand to the receiving pbs, as a sender that holds the key would:
/// `requests` are sent on one channel through OpenSSH's client (the last one should
/// say `Connection: close`); returns everything that came back.
fn by_hand(other: &OtherPbs, requests: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut child = other
        .sshd
        .ssh_command("anything: the forced command runs")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(requests).unwrap();
    stdin.flush().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    drop(stdin);
    child.wait().unwrap();
    out
}

fn request(method: &str, path: &str, body: &[u8], close: bool) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n{}\r\n",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[test]
fn the_receiving_pbs_refuses_reads_deletes_forgeries_other_hosts_and_future_times() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    make_fixture(&src);
    env.pull_local(&[&src], &[]).0.expect(0);
    let orig = snapshots(&env);
    let host = orig[0]["host"].as_str().unwrap().to_string();
    let tgt = target();
    let other = OtherPbs::start(&env, &tgt, &format!("--host {host}"), "");
    let check_answers = |requests: Vec<u8>, expected: &[(&str, &str)]| {
        let out = by_hand(&other, &requests);
        let answers: Vec<&str> = out.split("HTTP/1.1 ").skip(1).collect();
        assert_eq!(answers.len(), expected.len(), "{out}");
        for (answer, (status, words)) in answers.iter().zip(expected) {
            assert!(
                answer.starts_with(status) && answer.contains(words),
                "wanted {status} with {words:?}, got: {answer}"
            );
        }
    };

    // Nothing can be deleted, listed or read: those routes do not exist.
    let id = "ab".repeat(32);
    let mut r = request("DELETE", "/v1/backup/upload", b"", false);
    r.extend(request(
        "GET",
        &format!("/v1/restore/tree/{id}"),
        b"",
        false,
    ));
    r.extend(request("GET", &format!("/v1/backup/tree/{id}"), b"", false));
    let mut one_ref = vec![1u8];
    one_ref.extend_from_slice(&[0xab; 32]);
    r.extend(request("POST", "/v1/backup/trees", &one_ref, false));
    r.extend(request("PUT", "/v1/receive/commit", b"{}", true));
    check_answers(
        r,
        &[
            ("405", "\"code\":\"method_not_allowed\""),
            ("404", "\"code\":\"not_found\""),
            ("404", "\"code\":\"not_found\""),
            ("404", "\"code\":\"not_found\""),
            ("405", "never deletes or replaces anything"),
        ],
    );

    // Another host than the forced command allows: neither a session nor a question.
    let start = |h: &str| {
        serde_json::json!({"host": h, "paths": ["/srv"], "tags": [], "parent_original": null})
            .to_string()
            .into_bytes()
    };
    let mut foreign = orig[0].clone();
    foreign["host"] = "intruder".into();
    let ask = serde_json::json!({"snapshots": [[orig[0]["id"], foreign]]}).to_string();
    let mut r = request("POST", "/v1/receive/start", &start("intruder"), false);
    r.extend(request("POST", "/v1/receive/have", ask.as_bytes(), true));
    check_answers(
        r,
        &[
            (
                "403",
                &format!(r#"receives snapshots of \"{host}\" only, not of \"intruder\""#),
            ),
            ("403", "\"code\":\"forbidden\""),
        ],
    );

    // In a session of the allowed host: a blob that does not hash to its id (an
    // attempt to put other content under an id) and a snapshot dated ahead of the
    // receiving pbs's clock are refused; so is a snapshot whose data never came.
    let mut frame = vec![0u8];
    frame.extend_from_slice(&[0x11; 32]);
    let content = b"not what the id says\0";
    frame.extend_from_slice(&(content.len() as u32).to_le_bytes());
    frame.extend_from_slice(content);
    let commit = |time: &str| {
        serde_json::json!({
            "time": time, "tree": orig[0]["tree"], "source": "pull",
            "summary": orig[0]["summary"], "original": orig[0]["id"],
        })
        .to_string()
        .into_bytes()
    };
    let mut r = request("POST", "/v1/receive/start", &start(&host), false);
    r.extend(request("POST", "/v1/backup/upload", &frame, false));
    r.extend(request(
        "POST",
        "/v1/receive/commit",
        &commit("2099-01-01T00:00:00Z"),
        false,
    ));
    r.extend(request(
        "POST",
        "/v1/receive/commit",
        &commit("2020-01-01T00:00:00Z"),
        true,
    ));
    check_answers(
        r,
        &[
            ("200", "\"max_upload_body\""),
            ("422", "\"code\":\"id_mismatch\""),
            ("403", "ahead of this pbs's clock"),
            ("409", "\"code\":\"missing_blobs\""),
        ],
    );
    assert!(snapshots(&tgt).is_empty(), "nothing was committed");

    // The honest sender, through the same forced command, still gets through.
    let run = other.copy(&env, &[]).expect(0);
    assert_eq!(run.json_of("copy-summary")["copied"], 1);
    let copies = snapshots(&tgt);
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0]["original"], orig[0]["id"]);
    let a = restore(&env, orig[0]["id"].as_str().unwrap(), "a");
    let b = restore(&tgt, copies[0]["id"].as_str().unwrap(), "b");
    assert_same_tree(&a, &b);
    tgt.pbs(&["check", "--read-data"]).expect(0);

    // A receiving side that cannot open its repository (the wrong passphrase there):
    // the copy fails, naming how the command ended and what it said.
    fs::write(tgt.path("wrong"), "not the passphrase\n").unwrap();
    let broken = haul_tests::Sshd::receiving(
        &env.path("sshd-broken"),
        (&tgt.repo(), &tgt.path("wrong")),
        (&tgt.path("state"), &tgt.path("cache")),
        "",
        "",
    );
    fs::write(&other.cfg, broken.remote_config("offsite")).unwrap();
    let run = other.copy(&env, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("the command ended with exit status")
            && run.stderr.contains("wrong passphrase"),
        "{}",
        run.stderr
    );
}
