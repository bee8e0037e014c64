//! `pull --local`: the agent walks and uploads over the ingest protocol on a real Unix
//! socket; `restore --via-agent` brings snapshots back through a read-only server.

use haul_tests::{assert_same_tree, bin, feedparser, is_root, make_fixture, Env, Run};
use std::fs;

/// Connections an agent opens at most.
const MAX_CONNECTIONS: u64 = haul_protocol::wire::MAX_CONNECTIONS as u64;
use std::path::{Path, PathBuf};

fn restore_via_agent(env: &Env, target: &Path, extra: &[&str]) -> Run {
    let t = target.display().to_string();
    let mut args = vec!["--json", "restore", "latest", "--via-agent", "--target", &t];
    args.extend_from_slice(extra);
    env.pbs(&args)
}

/// `n` small files with varied sizes, spread over 100 directories.
fn many_files(root: &Path, n: usize) -> Vec<PathBuf> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let dir = root.join(format!("d{:02}", i % 100));
        if i < 100 {
            fs::create_dir_all(&dir).unwrap();
        }
        let p = dir.join(format!("f{i:05}.txt"));
        let line = format!("file {i} of the many-files tree\n");
        fs::write(&p, line.repeat(i % 37)).unwrap();
        out.push(p);
    }
    out
}

#[test]
fn a_pull_of_20000_files_round_trips_through_the_agent_and_rereads_only_changes() {
    let (env, src) = Env::with_source();
    make_fixture(&src.join("kinds"));
    let files = many_files(&src.join("many"), 20_000);

    let (run, rec) = env.pull_local(&[&src], &[]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(rec["status"], "ok");
    let c = &rec["counters"];
    assert!(c["files_new"].as_u64().unwrap() > 20_000, "{c}");
    assert_eq!(c["warnings"], 0);
    // Few, kept-alive connections, whatever the number of files.
    let conns = rec["connections"].as_u64().unwrap();
    assert!(
        (1..=MAX_CONNECTIONS).contains(&conns),
        "server accepted {conns} connections"
    );
    assert!(rec["snapshot"].as_str().unwrap().len() == 64);

    let target = env.path("restored");
    let r = restore_via_agent(&env, &target, &[]).expect(0);
    let summary = r.json_of("summary");
    assert!(
        summary["connections"].as_u64().unwrap() <= MAX_CONNECTIONS,
        "{summary}"
    );
    assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));

    // Nothing changed: no file content is read.
    let (run, rec) = env.pull_local(&[&src], &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let c = &rec["counters"];
    assert_eq!(c["bytes_read"], 0, "{c}");
    assert_eq!(c["files_new"], 0);
    assert_eq!(c["files_changed"], 0);

    // 1% of the files change: only they are read.
    let mut changed_bytes = 0;
    for p in files.iter().step_by(100) {
        haul_tests::append(p, "a change\n");
        changed_bytes += fs::metadata(p).unwrap().len();
    }
    let (run, rec) = env.pull_local(&[&src], &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let c = &rec["counters"];
    assert_eq!(c["files_changed"], 200, "{c}");
    assert_eq!(c["files_new"], 0, "{c}");
    assert_eq!(c["bytes_read"], changed_bytes, "{c}");

    let target2 = env.path("restored-2");
    restore_via_agent(&env, &target2, &[]).expect(0);
    assert_same_tree(&src, &target2.join(src.strip_prefix("/").unwrap()));
    env.pbs(&["check", "--read-data"]).expect(0);
}

#[test]
fn restore_via_agent_honours_includes_and_refuses_a_non_empty_target() {
    let (env, src) = Env::with_source();
    make_fixture(&src);
    let (run, _) = env.pull_local(&[&src], &["--tag", "t1"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let target = env.path("part");
    let inc = src.join("dir/sub").display().to_string();
    restore_via_agent(&env, &target, &["--include", &inc]).expect(0);
    let rel = src.strip_prefix("/").unwrap();
    assert_same_tree(&src.join("dir/sub"), &target.join(rel).join("dir/sub"));
    assert!(!target.join(rel).join("small.txt").exists());

    let r = restore_via_agent(&env, &target, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("is not an empty directory"),
        "{}",
        r.stderr
    );
}

#[test]
fn the_first_pull_without_a_repository_creates_one_with_a_private_key_file() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), b"first").unwrap();
    let state = env.path("state");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin("haul-pbs"))
            .args(args)
            .env("HAUL_STATE_DIR", &state)
            .env("HAUL_CACHE_DIR", env.path("cache"))
            .env_remove("HAUL_REPO")
            .env_remove("HAUL_PASSWORD")
            .env_remove("HAUL_PASSWORD_FILE")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let s = src.display().to_string();
    let (code, out, err) = run(&["pull", "--local", &s]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let key = state.join("repo.key");
    assert!(err.contains(&key.display().to_string()), "{err}");
    assert!(err.contains("keep a copy"), "{err}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(state.join("repo/config").is_file());
    assert_eq!(run_lines(&state), 1);

    // Later runs open it without a prompt (stdin is /dev/null) and say nothing of keys.
    fs::write(src.join("b"), b"second").unwrap();
    let (code, out, err) = run(&["pull", "--local", &s]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(!err.contains("keep a copy"), "{err}");
    assert!(out.contains("1 new, 0 changed, 1 unchanged"), "{out}");
    assert_eq!(run_lines(&state), 2);
}

#[test]
fn a_failed_pull_is_recorded_and_leaves_the_repository_intact() {
    let (env, src) = Env::with_one_file();
    env.pull_local(&[&src], &[]).0.expect(0);
    let (run, rec) = env.pull_local(&[&env.path("does-not-exist")], &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(rec["status"], "failed");
    let err = rec["error"].as_str().unwrap();
    assert!(err.contains("does-not-exist"), "{err}");
    assert!(
        run.stderr.contains("existing snapshots are untouched"),
        "{}",
        run.stderr
    );
    assert_eq!(env.pbs(&["--json", "snapshots"]).expect(0).json().len(), 1);
    // (The check is a run too: recorded elsewhere, so that only the pulls are here.)
    let checks = env.path("check-state").display().to_string();
    env.pbs(&["check", "--read-data", "--state-dir", &checks])
        .expect(0);
    assert_eq!(run_lines(&env.path("state")), 2);

    // The history lists both, and the feeds carry them, newest first, read by a
    // parser nobody here wrote.
    let s = env.path("state").display().to_string();
    let listed = env.pbs(&["runs", "--state-dir", &s]).expect(0).stdout;
    assert!(
        listed.contains(" ok ") && listed.contains(" failed ") && listed.contains("2 run(s)"),
        "{listed}"
    );
    let last = env
        .pbs(&["--json", "runs", "--last", "1", "--state-dir", &s])
        .expect(0)
        .json();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0]["run"]["status"], "failed");
    let feed = feedparser(&env.path("state/feed.xml"));
    assert_eq!(feed["bozo"], false, "{feed}");
    let entries = feed["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{feed}");
    let newest = &entries[0];
    assert!(
        newest["title"]
            .as_str()
            .unwrap()
            .contains(": pull FAILED — "),
        "{newest}"
    );
    assert!(
        newest["summary"]
            .as_str()
            .unwrap()
            .starts_with("<p><b>FAILED</b> — pull of "),
        "{newest}"
    );
    assert!(
        newest["summary"]
            .as_str()
            .unwrap()
            .contains("does-not-exist"),
        "{newest}"
    );
    assert_eq!(newest["id"], last[0]["run"]["id"]);
    assert_eq!(newest["guidislink"], false);
    assert!(newest["published_parsed"].is_array(), "{newest}");
    assert!(
        entries[1]["title"]
            .as_str()
            .unwrap()
            .contains(": pull OK — "),
        "{feed}"
    );
    let host = rec["host"].as_str().unwrap();
    let host_feed = feedparser(&env.path("state/hosts").join(host).join("feed.xml"));
    assert_eq!(host_feed["entries"].as_array().unwrap().len(), 2);
}

/// A file rewritten all the time while the agent reads it is flagged, and a file the
/// agent cannot read is named; the run ends as `warning` with a consistent snapshot.
#[test]
fn unreadable_and_changing_files_give_a_warning_run_naming_them() {
    let (env, src) = Env::with_source();
    fs::write(src.join("steady.txt"), b"steady content\n").unwrap();
    let busy = src.join("busy.bin");
    fs::write(&busy, haul_tests::random_bytes(7, 48 << 20)).unwrap();
    let secret = src.join("secret.txt");
    fs::write(&secret, b"no one may read this\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();

    // Root reads anything: run the whole pull as an unprivileged user then.
    let unprivileged = is_root();
    if unprivileged {
        // The binaries may live where that user cannot go (a checkout under /root):
        // run copies of them from the test's directory.
        fs::create_dir_all(env.path("bin")).unwrap();
        for b in ["haul-pbs", "haul-agent"] {
            fs::copy(bin(b), env.path("bin").join(b)).unwrap();
        }
        chown_tree(env.dir.path(), 65534, 65534);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, busy) = (stop.clone(), busy.clone());
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let f = fs::OpenOptions::new().write(true).open(&busy).unwrap();
            let mut i = 0u64;
            // Bounded: at most 120 s of rewriting.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && std::time::Instant::now() < deadline
            {
                f.write_all_at(&i.to_le_bytes(), (i * 4096) % (48 << 20))
                    .unwrap();
                i += 1;
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    };
    let run = pull_as(&env, &src, unprivileged);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(run.code, 3, "{}\n{}", run.stdout, run.stderr);
    let rec = run.json().into_iter().find(|v| v["type"] == "run").unwrap()["run"].clone();
    assert_eq!(rec["status"], "warning");
    assert_eq!(rec["counters"]["warnings"], 2, "{rec}");
    let tail = rec["output_tail"].to_string();
    assert!(
        tail.contains("secret.txt") && tail.contains("Permission denied"),
        "{tail}"
    );
    assert!(
        tail.contains("busy.bin") && tail.contains("changed while being read"),
        "{tail}"
    );
    let warned: Vec<String> = run
        .json()
        .into_iter()
        .filter(|v| v["type"] == "agent" && v["event"]["type"] == "warning")
        .map(|v| v["event"]["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(warned.len(), 2, "{}", run.stdout);
    assert!(
        warned.iter().any(|p| p.ends_with("/secret.txt")),
        "{warned:?}"
    );
    assert!(
        warned.iter().any(|p| p.ends_with("/busy.bin")),
        "{warned:?}"
    );

    // The snapshot is complete and consistent: the steady file restores as it was.
    let snaps = env.pbs(&["--json", "snapshots"]).expect(0).json();
    assert_eq!(snaps.len(), 1);
    env.pbs(&["check", "--read-data"]).expect(0);
    let target = env.path("out");
    env.restore(&target, &[]).expect(0);
    let rel = target.join(src.strip_prefix("/").unwrap());
    assert_eq!(
        fs::read(rel.join("steady.txt")).unwrap(),
        b"steady content\n"
    );
    assert!(!rel.join("secret.txt").exists());
}

fn pull_as(env: &Env, src: &Path, unprivileged: bool) -> Run {
    let mut cmd = if unprivileged {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
        c.arg(env.path("bin/haul-pbs"));
        c
    } else {
        std::process::Command::new(bin("haul-pbs"))
    };
    cmd.arg("--repo")
        .arg(env.repo())
        .arg("--password-file")
        .arg(env.path("pass"))
        .arg("--cache-dir")
        .arg(env.path("cache"))
        .args(["--json", "pull", "--local"])
        .arg(src)
        .arg("--state-dir")
        .arg(env.path("state"))
        .env("HOME", env.dir.path())
        .env("TMPDIR", env.dir.path())
        .stdin(std::process::Stdio::null());
    let out = cmd.output().expect("run haul-pbs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn chown_tree(root: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(root, Some(uid), Some(gid)).unwrap();
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            chown_tree(&p, uid, gid);
        } else {
            std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).unwrap();
        }
    }
}

/// Lines of the run history.
fn run_lines(state: &Path) -> usize {
    fs::read_to_string(state.join("runs.jsonl"))
        .unwrap()
        .lines()
        .count()
}

#[test]
fn config_check_names_problems_and_pull_all_pulls_every_host() {
    let (env, src) = Env::with_source();
    let (a, b) = (src.join("a"), src.join("b"));
    for d in [&a, &b] {
        fs::create_dir_all(d).unwrap();
        fs::write(d.join("f"), d.display().to_string()).unwrap();
    }
    let config = env.path("pbs.toml");
    let host = |name: &str, path: &Path| {
        format!(
            "[[host]]\nname = {name:?}\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{:?}]\n",
            path.display().to_string()
        )
    };
    let c = config.display().to_string();
    fs::write(
        &config,
        format!(
            "{}{}[[host]]\nname = \"far\"\naddress = \"192.0.2.1\"\npaths = [\"/srv\"]\nidentity = \"/nonexistent/key\"\n",
            host("alpha", &a),
            host("beta", &b)
        ),
    )
    .unwrap();
    let r = env.pbs(&["config", "check", "--config", &c]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(
        r.stderr
            .contains("host[2].identity: /nonexistent/key cannot be read"),
        "{}",
        r.stderr
    );

    fs::write(
        &config,
        format!("{}{}", host("alpha", &a), host("beta", &b)),
    )
    .unwrap();
    let out = env
        .pbs(&["config", "check", "--config", &c])
        .expect(0)
        .stdout;
    assert!(
        out.contains("2 host(s): alpha (local), beta (local)"),
        "{out}"
    );

    let s = env.path("state").display().to_string();
    env.pbs(&["pull", "--all", "--config", &c, "--state-dir", &s])
        .expect(0);
    let snaps = env.pbs(&["--json", "snapshots"]).expect(0).json();
    let mut hosts: Vec<&str> = snaps.iter().map(|v| v["host"].as_str().unwrap()).collect();
    hosts.sort();
    assert_eq!(hosts, ["alpha", "beta"]);

    // One host failing does not stop the others; the exit code says it failed.
    fs::remove_dir_all(&a).unwrap();
    let r = env.pbs(&["pull", "--all", "--config", &c, "--state-dir", &s]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("pulls of alpha failed"), "{}", r.stderr);
    let runs = env
        .pbs(&["--json", "runs", "--state-dir", &s])
        .expect(0)
        .json();
    let last: Vec<(String, String)> = runs[2..]
        .iter()
        .map(|v| {
            (
                v["run"]["host"].as_str().unwrap().into(),
                v["run"]["status"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        last,
        [
            ("alpha".into(), "failed".into()),
            ("beta".into(), "ok".into())
        ]
    );
}
