//! Pushes to clone hosts: a real OpenSSH sshd plays the clone (and the source host),
//! its haul-wrapper admits `haul-agent restore --standby` into its restore_targets.

use haul_tests::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A host `web-1` pulled through `sshd` from `src`, and a clone `standby` (the same
/// sshd) keeping its copy in `standby_root/web-1`; more `[[clone]]` text may follow.
fn config_with_clone(sshd: &Sshd, src: &Path, standby_root: &Path, extra: &str) -> PathBuf {
    let config = sshd.pbs_config("web-1", &[src]);
    let mut text = fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[[clone]]\nname = \"standby\"\naddress = \"127.0.0.1\"\nport = {}\nuser = {:?}\n\
         identity = {:?}\nknown_hosts = {:?}\nsocket_dir = {:?}\nstandby_dir = {:?}\n{extra}",
        sshd.port,
        Sshd::user(),
        sshd.dir.join("id_ed25519").display().to_string(),
        sshd.dir.join("known_hosts").display().to_string(),
        sshd.dir.join("sockets").display().to_string(),
        standby_root.display().to_string(),
    ));
    fs::write(&config, text).unwrap();
    config
}

/// A source (`make_source`), an sshd playing both the host and the clone, whose
/// restore_targets is `standby_root`, and the pbs's configuration with `extra` for the
/// clone.
struct Setup {
    env: Env,
    src: PathBuf,
    standby_root: PathBuf,
    sshd: Sshd,
    config: PathBuf,
}

fn setup(extra: &str) -> Setup {
    let (env, src) = Env::with_source();
    make_source(&src);
    let standby_root = env.path("standby");
    fs::create_dir_all(&standby_root).unwrap();
    let sshd = Sshd::start_with(&env.path("sshd"), &[&src], &[&standby_root]);
    let config = config_with_clone(&sshd, &src, &standby_root, extra);
    Setup {
        env,
        src,
        standby_root,
        sshd,
        config,
    }
}

fn run_record(run: &Run) -> serde_json::Value {
    run.json()
        .into_iter()
        .find(|v| v["type"] == "run")
        .unwrap_or_else(|| panic!("no run record:\n{}\n{}", run.stdout, run.stderr))["run"]
        .clone()
}

fn pbs_run(env: &Env, config: &Path, args: &[&str]) -> (Run, serde_json::Value) {
    let c = config.display().to_string();
    let state = env.path("state").display().to_string();
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    all.extend(["--config", &c, "--state-dir", &state]);
    let run = env.pbs(&all);
    let record = run_record(&run);
    (run, record)
}

fn pull(env: &Env, config: &Path) -> serde_json::Value {
    let (run, record) = pbs_run(env, config, &["pull", "web-1"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    record
}

fn push(env: &Env, config: &Path) -> (Run, serde_json::Value) {
    pbs_run(env, config, &["push", "web-1"])
}

/// The snapshot `spec` of web-1 restored by the pbs itself into `dir` (the
/// reference a standby copy must equal).
fn reference(env: &Env, config: &Path, spec: &str, dir: &Path) {
    let c = config.display().to_string();
    let state = env.path("state").display().to_string();
    let t = dir.display().to_string();
    env.pbs(&[
        "restore",
        spec,
        "--host",
        "web-1",
        "--config",
        &c,
        "--state-dir",
        &state,
        "--target",
        &t,
    ])
    .expect(0);
}

/// Whether two trees are equal in bytes and metadata (as `assert_same_tree` has it).
fn same_tree(a: &Path, b: &Path) -> bool {
    snapshot_of(a) == snapshot_of(b)
}

/// A change of about 1% of `src` (made by `make_fixture` plus `data/`): a few bytes in
/// the middle of a large file, a new file, a file removed, a file renamed, a mode
/// changed.
fn change_a_little(src: &Path) {
    use std::os::unix::fs::{FileExt, PermissionsExt};
    let big = fs::OpenOptions::new()
        .write(true)
        .open(src.join("data/large.bin"))
        .unwrap();
    big.write_all_at(b"a few changed bytes", 9 * 1024 * 1024 + 77)
        .unwrap();
    fs::write(src.join("data/new.txt"), random_bytes(40, 60_000)).unwrap();
    fs::remove_file(src.join("dir/text.txt")).unwrap();
    fs::rename(src.join("data/part-3.bin"), src.join("data/moved-3.bin")).unwrap();
    fs::set_permissions(src.join("small.txt"), fs::Permissions::from_mode(0o640)).unwrap();
}

/// `make_fixture`, plus 24 MiB of data a push can reuse: a large file and parts.
fn make_source(src: &Path) {
    make_fixture(src);
    fs::create_dir_all(src.join("data")).unwrap();
    fs::write(src.join("data/large.bin"), random_bytes(30, 16 << 20)).unwrap();
    for i in 0..8 {
        fs::write(
            src.join(format!("data/part-{i}.bin")),
            random_bytes(31 + i, 1 << 20),
        )
        .unwrap();
    }
}

#[test]
fn a_push_keeps_a_standby_copy_equal_to_each_snapshot_and_sends_only_what_changed() {
    let Setup {
        env,
        src,
        standby_root,
        sshd: _sshd,
        config,
    } = setup("");
    let copy = standby_root.join("web-1");
    let inside = |copy: &Path| copy.join(src.strip_prefix("/").unwrap());

    let first = pull(&env, &config);
    let (run, record) = push(&env, &config);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(record["kind"], "push");
    assert_eq!(record["status"], "ok", "{record}");
    assert_eq!(record["snapshot"], first["snapshot"]);
    let d = &record["details"]["push"];
    assert_eq!(d["clone"], "standby");
    assert_eq!(d["replaced"], true, "{record}");
    assert_eq!(d["files_linked"], 0, "{record}");
    assert_same_tree(&src, &inside(&copy));
    let full_sent = d["bytes_sent"].as_u64().unwrap();
    assert!(
        full_sent > 20 << 20,
        "a first push sends everything: {record}"
    );

    // About 1% changed; the new pull's bytes on the wire are what changed.
    change_a_little(&src);
    let second = pull(&env, &config);
    let pulled = second["counters"]["bytes_received"].as_u64().unwrap();
    let (run, record) = push(&env, &config);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(record["snapshot"], second["snapshot"]);
    assert_same_tree(&src, &inside(&copy));
    let d = &record["details"]["push"];
    let sent = d["bytes_sent"].as_u64().unwrap();
    assert!(
        sent <= 2 * pulled,
        "the second push sent {sent} bytes where the pull of the change took {pulled}: {record}"
    );
    assert!(sent < full_sent / 8, "{sent} of {full_sent}: {record}");
    // The large file's changed chunk went as a delta against its old one (the pull of
    // the change sent it whole): what the push sent is about the new 60 KB file and the
    // changed listings.
    assert!(d["chunks_delta"].as_u64().unwrap() >= 1, "{record}");
    assert!(
        sent < 100 << 10 && 8 * sent < pulled,
        "the second push sent {sent} bytes where the pull of the change took {pulled}: {record}"
    );
    // Unchanged files are links to the old copy's; the renamed part and the large
    // file's unchanged chunks came from the clone's own copy.
    assert!(d["files_linked"].as_u64().unwrap() > 10, "{record}");
    assert!(
        d["bytes_local"].as_u64().unwrap() >= 14 << 20,
        "the large file and the moved part are rebuilt from the clone's chunks: {record}"
    );
    // What the clone keeps beside the copy is not in it, and nothing of a build is left.
    let state = standby_root.join(".web-1.haul-standby");
    let mut left: Vec<String> = fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["chunks", "lock", "record", "trees"]);

    // The push is in the feed, as its monitors read it.
    let feed = feedparser(&env.path("state").join("feed.xml"));
    let title = feed["entries"][0]["title"].as_str().unwrap().to_string();
    let short = &second["snapshot"].as_str().unwrap()[..8];
    assert!(
        title.starts_with(&format!("standby: push OK — web-1 {short}, "))
            && title.contains(" sent"),
        "{title}"
    );

    // Nothing changed: every file is linked but the three names of the fixture's
    // multiply-linked file, made again from its chunk, and no listing is sent: the
    // clone has every tree of the snapshot.
    let (run, record) = push(&env, &config);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let d = &record["details"]["push"];
    assert_eq!(
        d["files_linked"].as_u64().unwrap() + 3,
        d["files"].as_u64().unwrap(),
        "{record}"
    );
    assert!(d["bytes_sent"].as_u64().unwrap() < 4 << 10, "{record}");
    assert_same_tree(&src, &inside(&copy));

    // The clone's trees damaged in the middle: those are asked for again, and the copy
    // is still the snapshot.
    let trees = state.join("trees");
    let len = fs::metadata(&trees).unwrap().len();
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&trees).unwrap();
        f.write_all_at(&vec![0xa5; 4096], len / 2).unwrap();
    }
    fs::write(src.join("dir/later.txt"), random_bytes(41, 30_000)).unwrap();
    pull(&env, &config);
    let (run, record) = push(&env, &config);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(record["status"], "ok", "{record}");
    assert_same_tree(&src, &inside(&copy));
}

#[test]
fn a_copy_changed_on_the_clone_is_noticed_and_replaced() {
    let Setup {
        env,
        src,
        standby_root,
        sshd: _sshd,
        config,
    } = setup("");
    let inside = standby_root
        .join("web-1")
        .join(src.strip_prefix("/").unwrap());
    pull(&env, &config);
    let (run, _) = push(&env, &config);
    assert_eq!(run.code, 0, "{}", run.stderr);
    // Someone writes into the copy, keeping size and mtime of one file (a chunk of it
    // must not be taken as the snapshot's), and replaces another.
    flip_byte(&inside.join("data/large.bin"), 3 << 20);
    set_mtime_like(&src.join("data/large.bin"), &inside.join("data/large.bin"));
    fs::write(inside.join("data/part-1.bin"), b"not what was pushed").unwrap();
    change_a_little(&src);
    pull(&env, &config);
    let (run, record) = push(&env, &config);
    assert_eq!(run.code, 0, "{}\n{record}", run.stderr);
    assert_same_tree(&src, &inside);
}

fn set_mtime_like(from: &Path, to: &Path) {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(from).unwrap();
    let c = std::ffi::CString::new(to.as_os_str().as_encoded_bytes()).unwrap();
    let ts = libc::timespec {
        tv_sec: m.mtime(),
        tv_nsec: m.mtime_nsec(),
    };
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [ts, ts].as_ptr(), 0) },
        0
    );
}

#[test]
fn a_push_killed_at_any_moment_leaves_one_whole_snapshot_and_the_next_completes() {
    let Setup {
        env,
        src,
        standby_root,
        sshd,
        config,
    } = setup("");
    let copy = standby_root.join("web-1");
    let rel = src.strip_prefix("/").unwrap();
    pull(&env, &config);
    let (run, _) = push(&env, &config);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let ref_a = env.path("ref-a");
    reference(&env, &config, "latest", &ref_a);
    change_a_little(&src);
    pull(&env, &config);
    let ref_b = env.path("ref-b");
    reference(&env, &config, "latest", &ref_b);
    let (a, b) = (ref_a.join(rel), ref_b.join(rel));

    // Kill the clone's agent (kill -9), or cut the pbs's connection by killing the pbs,
    // at moments spread over the push; the copy is A or B, whole, every time.
    let c = config.display().to_string();
    let state = env.path("state").display().to_string();
    let mut seen_b = false;
    for round in 0..8u64 {
        let mut child = env
            .pbs_command(&["push", "web-1", "--config", &c, "--state-dir", &state])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let wait = Duration::from_millis(40 + round * 60);
        std::thread::sleep(wait);
        if round % 2 == 0 {
            for (pid, name) in descendants(sshd.pid()) {
                if name == "haul-agent" {
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        } else {
            let _ = child.kill();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the push did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The agent on the clone ends once its connection is gone.
        let deadline = Instant::now() + Duration::from_secs(30);
        while descendants(sshd.pid())
            .iter()
            .any(|(_, n)| n == "haul-agent")
        {
            assert!(Instant::now() < deadline, "the clone's agent did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
        let now = snapshot_of(&copy.join(rel));
        let is_b = now == snapshot_of(&b);
        assert!(
            is_b || now == snapshot_of(&a),
            "round {round}: the standby copy is neither snapshot"
        );
        seen_b |= is_b;
        if is_b {
            break; // a later push has nothing left to do
        }
    }
    let (run, record) = push(&env, &config);
    assert_eq!(run.code, 0, "{}\n{record}", run.stderr);
    assert!(same_tree(&b, &copy.join(rel)));
    let _ = seen_b;
}

#[test]
fn the_import_command_runs_after_a_complete_push_only_and_its_failure_fails_the_run() {
    let Setup {
        env,
        src,
        standby_root,
        sshd,
        config,
    } = setup("import = true\n");
    let script = env.path("import.sh");
    let log = env.path("imported.log");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"importing $HAUL_SNAPSHOT from $HAUL_STANDBY_DIR in $(pwd)\" >> {log}\n\
             ls {rel} >/dev/null || exit 3\necho imported\n[ -e {fail} ] && {{ echo 'import broke' >&2; exit 7; }}\nexit 0\n",
            log = log.display(),
            rel = src.strip_prefix("/").unwrap().join("data/large.bin").display(),
            fail = env.path("fail").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let policy = sshd.dir.join("wrapper.toml");
    let mut text = fs::read_to_string(&policy).unwrap();
    text.push_str(&format!(
        "import_command = [{:?}]\n",
        script.display().to_string()
    ));
    fs::write(&policy, text).unwrap();

    let first = pull(&env, &config);
    let (run, record) = push(&env, &config);
    assert_eq!(run.code, 0, "{}\n{record}", run.stderr);
    let import = &record["details"]["push"]["import"];
    assert_eq!(import["exit"], 0, "{record}");
    assert_eq!(import["tail"], serde_json::json!(["imported"]), "{record}");
    let copy = standby_root.join("web-1");
    let logged = fs::read_to_string(&log).unwrap();
    assert_eq!(
        logged.trim(),
        format!(
            "importing {} from {} in {}",
            first["snapshot"].as_str().unwrap(),
            copy.display(),
            copy.display()
        )
    );

    // A failing import: the copy is replaced, the run FAILED with its output.
    fs::write(env.path("fail"), b"").unwrap();
    change_a_little(&src);
    let second = pull(&env, &config);
    let (run, record) = push(&env, &config);
    assert_eq!(run.code, 1, "{}\n{record}", run.stderr);
    assert_eq!(record["status"], "failed", "{record}");
    let error = record["error"].as_str().unwrap();
    assert!(
        error.contains("exited with code 7") && error.contains("import broke"),
        "{error}"
    );
    assert_eq!(record["details"]["push"]["replaced"], true);
    assert_same_tree(&src, &copy.join(src.strip_prefix("/").unwrap()));
    let feed = feedparser(&env.path("state").join("feed.xml"));
    let title = feed["entries"][0]["title"].as_str().unwrap();
    assert!(
        title.starts_with("standby: push FAILED — web-1 "),
        "{title}"
    );
    let _ = second;

    // A push that fails before the swap never runs the import command.
    fs::remove_file(env.path("fail")).unwrap();
    let before = fs::read_to_string(&log).unwrap();
    // (A policy the wrapper cannot read refuses everything.)
    let text = fs::read_to_string(&policy).unwrap();
    fs::write(&policy, format!("{text}not_a_key = 1\n")).unwrap();
    let (run, record) = push(&env, &config);
    assert_ne!(run.code, 0, "{record}");
    assert_eq!(fs::read_to_string(&log).unwrap(), before);
}

#[test]
fn pushes_go_only_where_the_policy_and_the_configuration_allow() {
    let (env, src) = Env::with_source();
    make_fixture(&src);
    let standby_root = env.path("standby");
    let elsewhere = env.path("elsewhere");
    fs::create_dir_all(&standby_root).unwrap();
    fs::create_dir_all(&elsewhere).unwrap();
    let sshd = Sshd::start_with(&env.path("sshd"), &[&src], &[&standby_root]);

    // A clone whose standby_dir is outside the clone's restore_targets: refused there.
    let config = config_with_clone(&sshd, &src, &elsewhere, "");
    pull(&env, &config);
    let (run, record) = push(&env, &config);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(record["status"], "failed");
    assert_eq!(record["error_kind"], "refused", "{record}");
    let error = record["error"].as_str().unwrap();
    assert!(
        error.contains("outside the policy's restore_targets"),
        "{error}"
    );
    assert!(error.contains("the standby copy is as it was"), "{error}");
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);

    // A host the clone does not receive: never pushed there.
    let config = config_with_clone(&sshd, &src, &standby_root, "hosts = []\n");
    let mut text = fs::read_to_string(&config).unwrap();
    text = text.replace("hosts = []\n", "");
    text.push_str("hosts = [\"web-2\"]\n");
    text.push_str(&format!(
        "\n[[host]]\nname = \"web-2\"\naddress = \"127.0.0.1\"\npaths = [{:?}]\n",
        src.display().to_string()
    ));
    fs::write(&config, &text).unwrap();
    let c = config.display().to_string();
    let state = env.path("state").display().to_string();
    let r = env.pbs(&["push", "web-1", "--config", &c, "--state-dir", &state]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("no [[clone]] in"), "{}", r.stderr);
    let r = env.pbs(&[
        "push",
        "web-1",
        "--clone",
        "standby",
        "--config",
        &c,
        "--state-dir",
        &state,
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("does not receive host \"web-1\""),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read_dir(&standby_root).unwrap().count(), 0);

    // The pbs cannot choose the clone's import command, nor put a copy at the root of
    // restore_targets (its state would be outside).
    for (command, why) in [
        (
            format!(
                "haul-agent restore --socket {}/x.sock --snapshot latest --target {}/web-1 --standby --import --import-command /bin/sh",
                sshd.dir.join("sockets").display(),
                standby_root.display()
            ),
            "--import-command is not an allowed argument",
        ),
        (
            format!(
                "haul-agent restore --socket {}/x.sock --snapshot latest --target {} --standby",
                sshd.dir.join("sockets").display(),
                standby_root.display()
            ),
            "is a restore_targets directory itself",
        ),
    ] {
        let r = sshd.ssh(&command);
        assert_eq!(r.code, 126, "{command}: {}", r.stderr);
        assert!(r.stderr.contains(why), "{}", r.stderr);
    }
}

#[test]
fn a_full_disk_on_the_clone_fails_the_push_clearly_and_keeps_the_previous_copy() {
    let (env, src) = Env::with_source();
    make_source(&src);
    let disk = Tmpfs::mount(&env.path("clone-disk"), "72m");
    let standby_root = disk.path.join("standby");
    fs::create_dir_all(&standby_root).unwrap();
    let sshd = Sshd::start_with(&env.path("sshd"), &[&src], &[&standby_root]);
    let config = config_with_clone(&sshd, &src, &standby_root, "");
    let inside = standby_root
        .join("web-1")
        .join(src.strip_prefix("/").unwrap());
    pull(&env, &config);
    let (run, _) = push(&env, &config);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let ref_a = env.path("ref-a");
    reference(&env, &config, "latest", &ref_a);
    let a = ref_a.join(src.strip_prefix("/").unwrap());

    // The large file changes: rebuilding it needs 16 MiB the clone no longer has.
    change_a_little(&src);
    pull(&env, &config);
    disk.fill_leaving(4 << 20);
    let (run, record) = push(&env, &config);
    assert_eq!(run.code, 1, "{}\n{record}", run.stderr);
    assert_eq!(record["status"], "failed");
    let error = record["error"].as_str().unwrap();
    assert!(
        error.contains("No space left on device")
            && error.contains("the standby copy is as it was"),
        "{error}"
    );
    assert_eq!(record["details"]["push"]["replaced"], false);
    assert_same_tree(&a, &inside);
    // Nothing of the failed build is left to take the space.
    let state = standby_root.join(".web-1.haul-standby");
    assert!(!state.join("next").exists());

    disk.unfill();
    let (run, record) = push(&env, &config);
    assert_eq!(run.code, 0, "{}\n{record}", run.stderr);
    assert_same_tree(&src, &inside);
}

#[test]
fn ssh_setup_and_config_check_cover_clones() {
    let (env, src) = Env::with_one_file();
    let standby_root = env.path("standby");
    fs::create_dir_all(&standby_root).unwrap();
    let sshd = Sshd::start_with(&env.path("sshd"), &[&src], &[&standby_root]);
    let config = config_with_clone(&sshd, &src, &standby_root, "import = true\n");
    let c = config.display().to_string();
    let out = env
        .pbs(&["ssh-setup", "standby", "--config", &c])
        .expect(0)
        .stdout;
    let public = fs::read_to_string(sshd.dir.join("id_ed25519.pub")).unwrap();
    let key_material = public.split_whitespace().nth(1).unwrap();
    for want in [
        "backup_roots = []".to_string(),
        format!(
            "restore_targets = [{:?}]",
            standby_root.display().to_string()
        ),
        "import_command = [\"/usr/local/sbin/import-standby\"]".into(),
        format!("socket_dir = \"{}\"", sshd.dir.join("sockets").display()),
        // As root: no Match block, which would bind every root login.
        "# 6. sshd: no Match block for root".into(),
    ] {
        assert!(out.contains(&want), "{want:?} missing from:\n{out}");
    }
    let line = out.lines().find(|l| l.starts_with("from=")).unwrap();
    assert!(
        line.contains(key_material) && line.contains(",restrict,port-forwarding "),
        "{line}"
    );
    // As root (this clone's user), only root may run the agent; a dedicated user's
    // agent gets the powers a restore as any owner needs, for that user only.
    assert!(out.contains("chmod 0700 "), "{out}");
    let dedicated = fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("user = {:?}", Sshd::user()), "user = \"haul\"");
    fs::write(env.path("dedicated.toml"), dedicated).unwrap();
    let d = env.path("dedicated.toml").display().to_string();
    let out_dedicated = env
        .pbs(&["ssh-setup", "standby", "--config", &d])
        .expect(0)
        .stdout;
    assert!(
        out_dedicated.contains("caps=cap_chown,cap_dac_override,cap_dac_read_search,cap_fowner,cap_fsetid,cap_mknod+ep\n")
            && out_dedicated.contains("setcap \"$caps\" ")
            && out_dedicated.contains("chown root:\"$user\" ")
            && out_dedicated.contains("chmod 0750 ")
            && out_dedicated.contains("Match User haul\n    AllowTcpForwarding remote"),
        "{out_dedicated}"
    );
    // The policy it prints is one the wrapper takes, and admits the push it is for.
    let policy: String = out
        .lines()
        .skip_while(|l| !l.starts_with("agent = "))
        .take_while(|l| *l != "HAUL_EOF")
        .collect::<Vec<_>>()
        .join("\n");
    let file = env.path("printed-wrapper.toml");
    fs::write(&file, format!("{policy}\n")).unwrap();
    let checked = std::process::Command::new(bin("haul-wrapper"))
        .args(["--policy", file.to_str().unwrap(), "--check"])
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    let r = env.pbs(&["config", "check", "--config", &c]).expect(0);
    assert!(
        r.stdout.contains("clone standby (127.0.0.1:"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("standby copies of web-1"), "{}", r.stdout);
    let r = env.pbs(&["ssh-setup", "nope", "--config", &c]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("no host or clone \"nope\""),
        "{}",
        r.stderr
    );
}

/// A clone that runs an attacker's program in place of the agent, speaking to the
/// push's server through the tunnel: it gets the snapshot being pushed and nothing
/// else (not another snapshot, not a chunk of one, no delta against a chunk of a
/// snapshot never pushed to it), and the honest push after it completes.
#[test]
fn a_hostile_clone_reads_nothing_but_the_snapshot_pushed() {
    let Setup {
        env,
        src,
        standby_root,
        sshd,
        config,
    } = setup("");
    let secret = b"an old secret, deleted before the second pull".to_vec();
    fs::write(src.join("secret.txt"), &secret).unwrap();
    let first = pull(&env, &config)["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    fs::remove_file(src.join("secret.txt")).unwrap();
    let fresh = b"what the second snapshot added".to_vec();
    fs::write(src.join("fresh.txt"), &fresh).unwrap();
    let second = pull(&env, &config)["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    // Small files are one chunk each, named by the BLAKE3 of their bytes.
    let (secret_id, fresh_id) = (
        haul_protocol::ChunkId::of(&secret).to_hex(),
        haul_protocol::ChunkId::of(&fresh).to_hex(),
    );

    let out = env.path("hostile.json");
    let script = format!(
        r#"#!/usr/bin/python3
import json, socket, sys
args = sys.argv[1:]
sock = args[args.index("--socket") + 1]
def req(method, path, body=b""):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall(("%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (method, path, len(body))).encode() + body)
    data = b""
    while True:
        c = s.recv(65536)
        if not c:
            break
        data += c
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body
r = {{}}
r["other_snapshot"] = req("POST", "/v1/restore/start", json.dumps({{"snapshot": "{first}"}}).encode())[0]
r["latest"] = req("POST", "/v1/restore/start", b'{{"snapshot": "latest"}}')[0]
r["old_chunk"] = req("GET", "/v1/restore/chunk/{secret_id}")[0]
r["old_chunks"] = req("POST", "/v1/restore/chunks", bytes([0]) + bytes.fromhex("{secret_id}"))[0]
st, body = req("POST", "/v1/restore/deltas", bytes([0]) + bytes.fromhex("{fresh_id}") + bytes([1]) + bytes.fromhex("{secret_id}"))
r["delta"] = st
r["delta_format"] = body[-1] if body else None
json.dump(r, open("{out}", "w"))
sys.exit(3)
"#,
        out = out.display()
    );
    let honest = sshd.put_in_place_of_the_agent(&env.path("hostile-agent"), &script);
    let (run, record) = push(&env, &config);
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(record["status"], "failed", "{record}");
    let got: serde_json::Value = serde_json::from_slice(&fs::read(&out).unwrap()).unwrap();
    assert_eq!(got["other_snapshot"], 403, "{got}");
    assert_eq!(got["latest"], 200, "{got}");
    assert_eq!(got["old_chunk"], 403, "{got}");
    assert_eq!(got["old_chunks"], 403, "{got}");
    // The chunk it may have, whole: the chunk of a snapshot never pushed to it is no
    // base (a delta against it would tell what it holds).
    assert_eq!(got["delta"], 200, "{got}");
    assert_ne!(
        got["delta_format"],
        haul_protocol::chunker::BLOB_DELTA,
        "{got}"
    );
    assert!(!standby_root.join("web-1").exists());

    fs::write(sshd.dir.join("wrapper.toml"), honest).unwrap();
    let (run, record) = push(&env, &config);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(record["snapshot"], second.as_str());
    assert_same_tree(
        &src,
        &standby_root
            .join("web-1")
            .join(src.strip_prefix("/").unwrap()),
    );
}
