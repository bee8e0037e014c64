//! One run pipeline: a configured host lands in the same repository and history
//! however it is pulled (`pull HOST`, `pull --all`, the daemon); commands find the
//! pbs's own repositories without extra flags; `latest` means the newest of the
//! snapshots the filters select; records say what the server verified; a failure a
//! person must fix is alerted at once and not retried.

use haul_tests::{
    assert_same_tree, bin, free_listen, http_get, pull_records, random_bytes, start_daemon, Env,
    Run, Sshd,
};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `haul-pbs ARGS` with nothing from the environment but the configuration (as
/// `$HAUL_CONFIG`, when given), the built agent, the test's cache, and a
/// `$HAUL_STATE_DIR` that nothing configured may use.
fn pbs(env: &Env, config: Option<&Path>, args: &[&str]) -> Run {
    let mut cmd = Command::new(bin("haul-pbs"));
    cmd.args(args)
        .env("HAUL_AGENT", bin("haul-agent"))
        .env("HAUL_CACHE_DIR", env.path("cache"))
        .env("HAUL_STATE_DIR", env.path("not-here"))
        .env_remove("HAUL_REPO")
        .env_remove("HAUL_PASSWORD")
        .env_remove("HAUL_PASSWORD_FILE")
        .stdin(std::process::Stdio::null());
    // Without one, an empty configuration: not the machine's /etc/haul/pbs.toml.
    cmd.env("HAUL_CONFIG", config.unwrap_or(Path::new("/dev/null")));
    Run::from_output(cmd.output().unwrap())
}

fn hosts_of(run: &Run) -> Vec<String> {
    run.json()
        .iter()
        .map(|s| s["host"].as_str().unwrap().to_string())
        .collect()
}

fn write_source(dir: &Path, seed: u64) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("data.bin"), random_bytes(seed, 300_000)).unwrap();
    fs::write(dir.join("note.txt"), format!("host {seed}\n")).unwrap();
}

#[test]
fn a_configured_host_lands_in_its_repository_and_history_however_it_is_pulled() {
    let env = Env::new();
    let (a, b) = (env.path("src/a"), env.path("src/b"));
    write_source(&a, 1);
    write_source(&b, 2);
    let (state, repos) = (env.path("state"), env.path("repos"));
    let config = env.path("pbs.toml");
    let listen = free_listen();
    let write_config = |schedule: &str| {
        fs::write(
            &config,
            format!(
                "[server]\nstate_dir = {:?}\nrepositories_dir = {:?}\nstatus_listen = {:?}\nsocket_dir = {:?}\nschedule = {schedule:?}\n\n\
                 [[host]]\nname = \"a\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{:?}]\n\n\
                 [[host]]\nname = \"b\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{:?}]\nrepository = \"b\"\n",
                state.display().to_string(),
                repos.display().to_string(),
                listen,
                env.path("sockets").display().to_string(),
                a.display().to_string(),
                b.display().to_string(),
            ),
        )
        .unwrap();
    };
    write_config("1h");
    let c = Some(config.as_path());
    pbs(&env, c, &["pull", "a"]).expect(0);
    pbs(&env, c, &["pull", "--all"]).expect(0);
    // The daemon pulls both again, into the same repositories and history.
    write_config("2s");
    {
        let mut daemon = start_daemon(&env, &config, &env.path("daemon.log"));
        let t = Instant::now();
        loop {
            let ok = |h: &str| {
                pull_records(&state)
                    .iter()
                    .filter(|r| r["host"] == h && r["status"] == "ok")
                    .count()
            };
            if ok("a") >= 3 && ok("b") >= 2 {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the daemon did not pull: {:#?}\n{}",
                pull_records(&state),
                fs::read_to_string(env.path("daemon.log")).unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // A pull from the command line meanwhile is in the daemon's feed: it reads
        // what another process appended to the history.
        let run = pbs(&env, c, &["--json", "pull", "b"]).expect(0);
        let id = run.json_of("run")["run"]["id"]
            .as_str()
            .unwrap()
            .to_string();
        let (code, feed) = http_get(&listen, "/hosts/b/feed.xml");
        assert_eq!(code, 200);
        assert!(feed.contains(&id), "{id} not in {feed}");
        unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
        assert!(daemon.0.wait().unwrap().success());
    }
    // Two repositories, each with its generated key file; nothing anywhere else.
    for name in ["repo", "b"] {
        assert!(repos.join(name).join("config").is_file(), "{name}");
        assert!(repos.join(format!("{name}.key")).is_file(), "{name}");
    }
    assert!(!state.join("repo").exists());
    assert!(!env.path("not-here").exists());
    // Browsing finds them from the configuration alone: a's in the default
    // repository, b's in its own.
    let snaps = pbs(&env, c, &["--json", "snapshots"]).expect(0);
    let of_default = hosts_of(&snaps);
    assert!(
        of_default.len() >= 3 && of_default.iter().all(|h| h == "a"),
        "{of_default:?}"
    );
    let of_b = hosts_of(&pbs(&env, c, &["--json", "snapshots", "--host", "b"]).expect(0));
    assert!(of_b.len() >= 2 && of_b.iter().all(|h| h == "b"), "{of_b:?}");
    let target = env.path("restored-b");
    let t = target.display().to_string();
    pbs(
        &env,
        c,
        &["restore", "latest", "--host", "b", "--target", &t],
    )
    .expect(0);
    assert_same_tree(&b, &target.join(b.strip_prefix("/").unwrap()));
    // One history: every run of both hosts, however started.
    let runs = pbs(&env, c, &["--json", "runs"]).expect(0).json();
    let pulls = runs
        .iter()
        .filter(|r| r["run"]["kind"] == "pull" && r["run"]["status"] == "ok")
        .count();
    assert_eq!(pulls, pull_records(&state).len());
    assert!(pulls >= 5);
}

#[test]
fn after_a_pull_the_default_repository_is_found_without_flags() {
    let env = Env::new();
    let src = env.path("src");
    write_source(&src, 3);
    let state = env.path("state").display().to_string();
    let s = src.display().to_string();
    pbs(&env, None, &["pull", "--local", &s, "--state-dir", &state]).expect(0);
    let listed = pbs(&env, None, &["--json", "snapshots", "--state-dir", &state]).expect(0);
    assert_eq!(listed.json().len(), 1);
    // Its passphrase is 256 random bits in STATE/repo.key: a light key derivation.
    let keys = haul_tests::walk_files(&env.path("state/repo/keys"));
    assert_eq!(keys.len(), 1);
    let key: serde_json::Value = serde_json::from_slice(&fs::read(&keys[0]).unwrap()).unwrap();
    assert_eq!(key["kdf"]["m_cost"], 1024, "{key}");
    assert_eq!(
        fs::read_to_string(env.path("state/repo.key"))
            .unwrap()
            .trim()
            .len(),
        64
    );
    // $HAUL_STATE_DIR as well as --state-dir.
    let mut cmd = Command::new(bin("haul-pbs"));
    cmd.args(["--json", "snapshots"])
        .env("HAUL_STATE_DIR", &state)
        .env("HAUL_CACHE_DIR", env.path("cache"))
        .env_remove("HAUL_REPO")
        .env_remove("HAUL_PASSWORD_FILE")
        .env("HAUL_CONFIG", "/dev/null");
    assert_eq!(
        Run::from_output(cmd.output().unwrap())
            .expect(0)
            .json()
            .len(),
        1
    );
    let target = env.path("restored");
    let t = target.display().to_string();
    pbs(
        &env,
        None,
        &["restore", "latest", "--state-dir", &state, "--target", &t],
    )
    .expect(0);
    assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));
    let ls = pbs(&env, None, &["ls", "latest", "--state-dir", &state]).expect(0);
    assert!(ls.stdout.contains("note.txt"), "{}", ls.stdout);
    let runs = pbs(&env, None, &["--json", "runs", "--state-dir", &state]).expect(0);
    assert_eq!(runs.json().len(), 1);
    // The repository gone (its disk not mounted): the next pull does not start a new
    // one under it.
    let repo = env.path("state/repo");
    fs::rename(&repo, env.path("unmounted")).unwrap();
    let r = pbs(&env, None, &["pull", "--local", &s, "--state-dir", &state]).expect(1);
    assert!(
        r.stderr.contains("has saved snapshots before"),
        "{}",
        r.stderr
    );
    assert!(!repo.exists());
    fs::rename(env.path("unmounted"), &repo).unwrap();
    // Nothing there: a refusal that says how to get one.
    let empty = env.path("empty").display().to_string();
    let r = pbs(&env, None, &["snapshots", "--state-dir", &empty]).expect(2);
    assert!(r.stderr.contains("no repository at"), "{}", r.stderr);
    assert!(r.stderr.contains("--repo"), "{}", r.stderr);
}

#[test]
fn latest_is_the_newest_snapshot_the_filters_select() {
    let (env, _) = Env::with_source();
    let (a, b) = (env.path("a"), env.path("b"));
    write_source(&a, 4);
    write_source(&b, 5);
    let (sa, sb) = (a.display().to_string(), b.display().to_string());
    env.pbs(&["backup-local", &sa, "--host", "web-a", "--tag", "daily"])
        .expect(0);
    // b's is newer.
    env.pbs(&["backup-local", &sb, "--host", "web-b"]).expect(0);
    let restore = |name: &str, args: &[&str]| {
        let target = env.path(name);
        let t = target.display().to_string();
        let mut all = vec!["restore"];
        all.extend_from_slice(args);
        all.extend(["--target", &t]);
        env.pbs(&all).expect(0);
        target
    };
    // What a restic user types: A's newest, though B's is newer.
    let t = restore("r1", &["latest", "--host", "web-a"]);
    assert_same_tree(&a, &t.join(a.strip_prefix("/").unwrap()));
    let t = restore("r2", &["web-a:latest"]);
    assert_same_tree(&a, &t.join(a.strip_prefix("/").unwrap()));
    let t = restore("r3", &["latest", "--tag", "daily"]);
    assert_same_tree(&a, &t.join(a.strip_prefix("/").unwrap()));
    let t = restore("r4", &["latest", "--path", &sb]);
    assert_same_tree(&b, &t.join(b.strip_prefix("/").unwrap()));
    let t = restore("r5", &["latest"]);
    assert_same_tree(&b, &t.join(b.strip_prefix("/").unwrap()));
    // ls and snapshots take the same filters.
    let ls = env.pbs(&["ls", "latest", "--host", "web-a"]).expect(0);
    assert!(
        ls.stdout.contains(&sa) && !ls.stdout.contains(&sb),
        "{}",
        ls.stdout
    );
    let listed = env
        .pbs(&["--json", "snapshots", "--host", "web-b", "--path", &sb])
        .expect(0);
    assert_eq!(hosts_of(&listed), ["web-b"]);
    // Nothing matches, or two hosts named: refused, with what was asked.
    let t = env.path("r6").display().to_string();
    let r = env.pbs(&["restore", "latest", "--host", "web-c", "--target", &t]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("host web-c"), "{}", r.stderr);
    let r = env.pbs(&["restore", "web-b:latest", "--host", "web-a", "--target", &t]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("names host \"web-b\""), "{}", r.stderr);
    assert!(!env.path("r6").exists());
}

/// An agent that runs the real one and inflates every figure of its summary.
fn lying_agent(env: &Env) -> PathBuf {
    let path = env.path("lying-agent");
    fs::write(
        &path,
        format!(
            r#"#!/usr/bin/python3
import json, subprocess, sys
p = subprocess.Popen([{real:?}] + sys.argv[1:], stdout=subprocess.PIPE)
for line in p.stdout:
    try:
        v = json.loads(line)
    except ValueError:
        sys.stdout.buffer.write(line)
        continue
    if v.get("type") == "summary":
        for k in list(v):
            if isinstance(v[k], int):
                v[k] = 10**12
    sys.stdout.write(json.dumps(v) + "\n")
    sys.stdout.flush()
sys.exit(p.wait())
"#,
            real = bin("haul-agent").display().to_string()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn a_record_says_what_the_server_verified_not_what_the_agent_claims() {
    let (env, src) = Env::with_source();
    write_source(&src, 6);
    let agent = lying_agent(&env);
    let (run, rec) = env.pull_local(&[&src], &["--agent", &agent.display().to_string()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    // The agent did lie, on its stdout.
    let told = run
        .json()
        .into_iter()
        .find(|v| v["type"] == "agent" && v["event"]["type"] == "summary")
        .unwrap();
    assert_eq!(told["event"]["bytes_new"], 1_000_000_000_000u64);
    let snaps = env.pbs(&["--json", "snapshots"]).expect(0).json();
    assert_eq!(snaps.len(), 1);
    let verified = &snaps[0]["summary"];
    let c = &rec["counters"];
    for k in [
        "files_new",
        "files_changed",
        "files_unchanged",
        "dirs",
        "bytes_read",
        "bytes_total",
        "bytes_new",
        "data_new",
        "bytes_stored",
        "blobs_new",
        "warnings",
    ] {
        assert_eq!(c[k], verified[k], "{k}: {c} against {verified}");
    }
    assert_eq!(c["files_new"], 2);
    let received = c["bytes_received"].as_u64().unwrap();
    assert!(
        (300_000..1_000_000).contains(&received),
        "{received} bytes received"
    );
    // The feed says the same.
    let feed = fs::read_to_string(env.path("state/feed.xml")).unwrap();
    assert!(feed.contains("2 files"), "{feed}");
    assert!(
        !feed.contains("1000000000000"),
        "the agent's word in the feed: {feed}"
    );
}

/// A host whose key changed: the daemon does not try it again every time its backoff
/// runs out, it alerts at once, and takes it up again when the configuration is
/// reloaded after the fix.
#[test]
fn a_changed_host_key_is_alerted_at_once_and_not_retried() {
    let (env, src) = Env::with_one_file();
    let sshd = Sshd::start(&env.path("sshd"), &[&src]);
    let config = sshd.pbs_config("web-1", &[&src]);
    let state = env.path("state");
    let mut text = fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "schedule = \"1s\"\n\n[server]\nstate_dir = {:?}\nstatus_listen = \"{}\"\n",
        state.display().to_string(),
        free_listen()
    ));
    fs::write(&config, text).unwrap();
    let known = sshd.dir.join("known_hosts");
    let pinned = sshd.pin_another_key();
    let mut daemon = start_daemon(&env, &config, &env.path("daemon.log"));
    let records = || {
        fs::read_to_string(state.join("runs.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .collect::<Vec<_>>()
    };
    let t = Instant::now();
    while !records().iter().any(|r| r["kind"] == "alert") {
        assert!(t.elapsed() < Duration::from_secs(30), "{:#?}", records());
        std::thread::sleep(Duration::from_millis(100));
    }
    // With a 1 s schedule and backoff from 30 s, a retried failure would run again
    // within the next seconds: it does not.
    std::thread::sleep(Duration::from_secs(4));
    let r = records();
    let pulls: Vec<_> = r.iter().filter(|r| r["kind"] == "pull").collect();
    assert_eq!(pulls.len(), 1, "{r:#?}");
    assert_eq!(pulls[0]["error_kind"], "host_key");
    let alert = r.iter().find(|r| r["kind"] == "alert").unwrap();
    assert_eq!(alert["status"], "failed");
    let why = alert["error"].as_str().unwrap();
    assert!(
        why.starts_with("not retried until it is fixed: web-1: HOST KEY CHANGED"),
        "{why}"
    );
    assert!(why.contains("SIGHUP"), "{why}");
    // Fixed, and the daemon told: it pulls the host.
    fs::write(&known, pinned).unwrap();
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGHUP) };
    let t = Instant::now();
    while !pull_records(&state).iter().any(|r| r["status"] == "ok") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{:#?}\n{}",
            records(),
            fs::read_to_string(env.path("daemon.log")).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    assert!(daemon.0.wait().unwrap().success());
}
