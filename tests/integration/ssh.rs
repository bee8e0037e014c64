//! Pulls over SSH against a real OpenSSH sshd (started by the test on 127.0.0.1 with
//! its own host key and authorized_keys), through the real `haul-wrapper`.

use haul_tests::{assert_same_tree, bin, make_fixture, Env, Run, Sshd};
use std::fs;
use std::path::Path;

fn pull(env: &Env, config: &Path, host: &str) -> (Run, serde_json::Value) {
    let c = config.display().to_string();
    let state = env.path("state").display().to_string();
    let run = env.pbs(&[
        "--json",
        "pull",
        host,
        "--config",
        &c,
        "--state-dir",
        &state,
    ]);
    let record = run
        .json()
        .into_iter()
        .find(|v| v["type"] == "run")
        .unwrap_or_else(|| panic!("no run record:\n{}\n{}", run.stdout, run.stderr))["run"]
        .clone();
    (run, record)
}

#[test]
fn a_pull_over_ssh_round_trips_and_leaves_nothing_listening() {
    let (env, src) = Env::with_source();
    make_fixture(&src);
    let sshd = Sshd::start(&env.path("sshd"), &[&src]);
    let config = sshd.pbs_config("web-1", &[&src]);

    let (run, rec) = pull(&env, &config, "web-1");
    assert_eq!(
        run.code,
        0,
        "{}\n{}\nsshd log:\n{}",
        run.stdout,
        run.stderr,
        sshd.log()
    );
    assert_eq!(rec["status"], "ok");
    assert_eq!(rec["transport"], "ssh");
    assert_eq!(rec["host"], "web-1");
    let conns = rec["connections"].as_u64().unwrap();
    let most = haul_protocol::wire::MAX_CONNECTIONS as u64;
    assert!((1..=most).contains(&conns), "{conns} forwarded channels");
    assert!(rec["counters"]["files_new"].as_u64().unwrap() > 10, "{rec}");

    // The snapshot is the tree, bytes and metadata.
    let target = env.path("restored");
    env.restore(&target, &[]).expect(0);
    assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));
    let snaps = env.pbs(&["--json", "snapshots"]).expect(0).json();
    assert_eq!(snaps[0]["host"], "web-1");
    assert_eq!(snaps[0]["source"], "pull");

    // Nothing listens on the host's side any more.
    sshd.assert_nothing_listening();

    // Unchanged: nothing is read again.
    let (run, rec) = pull(&env, &config, "web-1");
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(rec["counters"]["bytes_read"], 0, "{rec}");

    // One file changed: only it is read, and the new snapshot restores as the tree is.
    haul_tests::append(&src.join("dir/text.txt"), "one more line\n");
    let (run, rec) = pull(&env, &config, "web-1");
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(rec["counters"]["files_changed"], 1, "{rec}");
    assert_eq!(
        rec["counters"]["bytes_read"].as_u64().unwrap(),
        fs::metadata(src.join("dir/text.txt")).unwrap().len()
    );
    let target = env.path("restored-2");
    env.restore(&target, &[]).expect(0);
    assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));
    env.pbs(&["check", "--read-data"]).expect(0);
}

#[test]
fn an_unknown_or_changed_host_key_fails_the_run_and_says_what_to_fix() {
    let (env, src) = Env::with_one_file();
    let sshd = Sshd::start(&env.path("sshd"), &[&src]);
    let config = sshd.pbs_config("web-1", &[&src]);
    let known = sshd.dir.join("known_hosts");
    let pinned = fs::read_to_string(&known).unwrap();

    fs::write(&known, "").unwrap();
    let (run, rec) = pull(&env, &config, "web-1");
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(rec["status"], "failed");
    let err = rec["error"].as_str().unwrap();
    assert!(err.contains("127.0.0.1"), "{err}");
    assert!(err.contains("SHA256:"), "{err}");
    assert!(err.contains(&known.display().to_string()), "{err}");
    assert!(err.contains("not pinned"), "{err}");

    // Another key pinned for the same host: a changed key.
    sshd.pin_another_key();
    let (run, rec) = pull(&env, &config, "web-1");
    assert_eq!(run.code, 1, "{}", run.stderr);
    let err = rec["error"].as_str().unwrap();
    assert!(
        err.contains("HOST KEY CHANGED") && err.contains("line 1"),
        "{err}"
    );
    assert_eq!(env.pbs(&["--json", "snapshots"]).expect(0).json().len(), 0);

    // With the right key pinned the same pull works, also as a hashed entry.
    fs::write(&known, pinned).unwrap();
    let (run, rec) = pull(&env, &config, "web-1");
    assert_eq!(run.code, 0, "{}\n{}", run.stderr, sshd.log());
    assert_eq!(rec["status"], "ok");
    let out = std::process::Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(&known)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(fs::read_to_string(&known).unwrap().starts_with("|1|"));
    let (run, rec) = pull(&env, &config, "web-1");
    assert_eq!(run.code, 0, "{}\n{}", run.stderr, sshd.log());
    assert_eq!(rec["status"], "ok");
}

#[test]
fn the_forced_command_refuses_everything_but_the_agent_it_allows() {
    let (env, src) = Env::with_one_file();
    let sshd = Sshd::start(&env.path("sshd"), &[&src]);
    let sockets = sshd.dir.join("sockets");
    let cases = [
        ("cat /etc/shadow", "only haul-agent may run, not \"cat\""),
        ("sh -c id", "only haul-agent may run"),
        (
            "haul-agent backup --socket /tmp/x.sock --path /etc",
            "directly in",
        ),
        (
            &*format!(
                "haul-agent backup --socket {}/x.sock --path /etc",
                sockets.display()
            ),
            "outside the policy's backup_roots",
        ),
        (
            &*format!(
                "haul-agent backup --socket {}/x.sock --path {}; id",
                sockets.display(),
                src.display()
            ),
            "not allowed in the command",
        ),
        (
            &*format!(
                "haul-agent restore --socket {}/x.sock --snapshot latest --target /tmp/x",
                sockets.display()
            ),
            "restores are not allowed",
        ),
        (
            &*format!("haul-agent backup --socket {}/x.sock --path {}/link/passwd", sockets.display(), src.display()),
            "with symlinks resolved, outside the policy's backup_roots",
        ),
        (
            &*format!("haul-agent backup --socket {}/x.sock --path {} --path {}/../etc", sockets.display(), src.display(), src.display()),
            "without `.` or `..`",
        ),
        (
            &*format!("haul-agent backup --socket {}/x.sock --path {} --one-file-system --one-file-system", sockets.display(), src.display()),
            "given twice",
        ),
        (
            &*format!("haul-agent backup --socket {}/x.sock --path {} --exclude {}", sockets.display(), src.display(), "x".repeat(70_000)),
            "at most 65536",
        ),
        (
            "haul-agent backup --socket \"$HOME/x.sock\" --path /",
            "not allowed in the command",
        ),
    ];
    std::os::unix::fs::symlink("/etc", src.join("link")).unwrap();
    for (cmd, why) in cases {
        let r = sshd.ssh(cmd);
        assert_eq!(r.code, 126, "{cmd:?}: {}\n{}", r.stderr, sshd.log());
        assert!(
            r.stderr.contains("haul-wrapper: refused") && r.stderr.contains(why),
            "{cmd:?}: {}",
            r.stderr
        );
    }
    // The allowed command still runs (here it finds no server behind the socket).
    let r = sshd.ssh(&format!(
        "haul-agent backup --socket {}/x.sock --path {}",
        sockets.display(),
        src.display()
    ));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot reach the repository server"),
        "{}",
        r.stderr
    );
    // And a pull through the same key works.
    let config = sshd.pbs_config("web-1", &[&src]);
    let (run, rec) = pull(&env, &config, "web-1");
    assert_eq!(run.code, 0, "{}\n{}", run.stderr, sshd.log());
    assert_eq!(rec["status"], "ok");
}

/// A system user of the test's, removed with its home and group when dropped.
struct TestUser(String);

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("userdel")
            .args(["-r", &self.0])
            .output();
    }
}

/// `program --version` started by a shell running as `user` and `group` (with the
/// user's groups, or none), as a local user would start it.
fn run_as(user: &str, group: &str, groups: bool, program: &Path) -> std::process::Output {
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid", user, "--regid", group]);
    if groups {
        cmd.arg("--init-groups");
    } else {
        cmd.arg("--clear-groups");
    }
    cmd.args(["/bin/sh", "-c", "exec \"$0\" --version"])
        .arg(program)
        .output()
        .expect("setpriv (util-linux)")
}

#[test]
fn the_printed_ssh_setup_applied_to_a_private_sshd_lets_the_pbs_pull_and_no_other_user_run_the_agent(
) {
    use std::os::unix::fs::PermissionsExt;
    let (env, src) = Env::with_source();
    // Others must reach the installed programs and the socket directory through it.
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir_all(src.join("private")).unwrap();
    fs::write(src.join("private/secret"), b"only root reads this").unwrap();
    fs::set_permissions(
        src.join("private/secret"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    fs::set_permissions(src.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    // The programs as installed on the host: copies, whose owner, mode and
    // capabilities the setup changes.
    let inst = env.path("inst");
    fs::create_dir_all(&inst).unwrap();
    fs::set_permissions(&inst, fs::Permissions::from_mode(0o755)).unwrap();
    for b in ["haul-agent", "haul-wrapper"] {
        fs::copy(bin(b), inst.join(b)).unwrap();
    }
    let (agent, wrapper) = (inst.join("haul-agent"), inst.join("haul-wrapper"));
    let user = TestUser(format!("hault{}", std::process::id()));
    let sshd_dir = env.path("sshd");
    fs::create_dir_all(&sshd_dir).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    Sshd::make_keys(&sshd_dir, port);
    let sockets = env.path("run/haul");
    let config = env.path("pbs.toml");
    fs::write(
        &config,
        format!(
            "[[host]]\nname = \"web-1\"\naddress = \"127.0.0.1\"\nport = {port}\nuser = {:?}\n\
             identity = {:?}\nknown_hosts = {:?}\nsocket_dir = {:?}\npaths = [{:?}]\n",
            user.0,
            sshd_dir.join("id_ed25519").display().to_string(),
            sshd_dir.join("known_hosts").display().to_string(),
            sockets.display().to_string(),
            src.display().to_string(),
        ),
    )
    .unwrap();
    let c = config.display().to_string();
    let etc = env.path("etc");

    // The setup as printed, run as root on the "host".
    let script = env
        .pbs(&[
            "ssh-setup",
            "web-1",
            "--config",
            &c,
            "--etc",
            etc.to_str().unwrap(),
            "--agent",
            agent.to_str().unwrap(),
            "--wrapper",
            wrapper.to_str().unwrap(),
        ])
        .expect(0)
        .stdout;
    assert!(script.contains("from=\"127.0.0.1\",command="), "{script}");
    fs::write(env.path("setup.sh"), &script).unwrap();
    let run_setup = || {
        let ran = std::process::Command::new("sh")
            .arg(env.path("setup.sh"))
            .output()
            .unwrap();
        assert!(
            ran.status.success(),
            "{}\n{}\n{script}",
            String::from_utf8_lossy(&ran.stdout),
            String::from_utf8_lossy(&ran.stderr)
        );
        assert!(String::from_utf8_lossy(&ran.stdout).contains("haul: web-1 is set up"));
    };
    run_setup();
    // Run twice, it changes nothing and adds no second key line.
    run_setup();
    let home = format!("/var/lib/{}", user.0);
    let keys = fs::read_to_string(format!("{home}/.ssh/authorized_keys")).unwrap();
    assert_eq!(keys.lines().count(), 1, "{keys}");

    // A private sshd that reads the drop-in first, and forbids forwarding to everyone
    // else: only the printed Match block lets this user forward its socket.
    let d = sshd_dir.display();
    fs::write(
        sshd_dir.join("sshd_config"),
        format!(
            "Include {}/ssh/sshd_config.d/*.conf\nPort {port}\nListenAddress 127.0.0.1\n\
             HostKey {d}/hostkey\nPidFile {d}/sshd.pid\nUsePAM no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nAllowTcpForwarding no\nAllowStreamLocalForwarding no\n\
             PermitTTY no\nLogLevel VERBOSE\n",
            etc.display()
        ),
    )
    .unwrap();
    let test = std::process::Command::new("/usr/sbin/sshd")
        .args(["-t", "-f"])
        .arg(sshd_dir.join("sshd_config"))
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "{}",
        String::from_utf8_lossy(&test.stderr)
    );
    fs::create_dir_all("/run/sshd").ok();
    struct Daemon(std::process::Child);
    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _sshd = Daemon(
        std::process::Command::new("/usr/sbin/sshd")
            .args(["-D", "-f"])
            .arg(sshd_dir.join("sshd_config"))
            .arg("-E")
            .arg(sshd_dir.join("sshd.log"))
            .spawn()
            .unwrap(),
    );
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let sshd_log = || fs::read_to_string(sshd_dir.join("sshd.log")).unwrap_or_default();

    // A socket an earlier run left behind, older than a minute: the wrapper removes it.
    let stale = sockets.join("haul-0123456789abcdef.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    {
        // As sshd leaves it: the user's.
        use std::os::unix::fs::MetadataExt;
        let owner = fs::metadata(&home).unwrap();
        std::os::unix::fs::chown(&stale, Some(owner.uid()), Some(owner.gid())).unwrap();
    }
    let touched = std::process::Command::new("touch")
        .args(["-h", "-d", "2 hours ago"])
        .arg(&stale)
        .status()
        .unwrap();
    assert!(touched.success());

    // The pull goes through, and the agent read what only root may read.
    let (run, rec) = pull(&env, &config, "web-1");
    assert_eq!(
        run.code,
        0,
        "{}\n{}\nsshd log:\n{}",
        run.stdout,
        run.stderr,
        sshd_log()
    );
    assert_eq!(rec["status"], "ok", "{rec}");
    let target = env.path("restored");
    env.restore(&target, &[]).expect(0);
    let inside = target.join(src.strip_prefix("/").unwrap());
    assert_eq!(
        fs::read(inside.join("private/secret")).unwrap(),
        b"only root reads this"
    );
    assert!(!stale.exists(), "the stale socket is still there");
    assert!(
        fs::read_dir(&sockets).unwrap().count() <= 1,
        "sockets left: {:?}",
        fs::read_dir(&sockets).unwrap().collect::<Vec<_>>()
    );

    // The dedicated user may run the agent; another unprivileged user may not.
    let mine = run_as(&user.0, &user.0, true, &agent);
    assert!(
        mine.status.success(),
        "{}",
        String::from_utf8_lossy(&mine.stderr)
    );
    let other = run_as("nobody", "nogroup", false, &agent);
    assert_eq!(other.status.code(), Some(126), "{other:?}");
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    let caps = std::process::Command::new("getcap")
        .arg(&agent)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&caps.stdout).contains("cap_dac_read_search=ep"),
        "{}",
        String::from_utf8_lossy(&caps.stdout)
    );
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(&agent).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o750));
}

#[test]
fn ssh_setup_says_a_local_host_needs_none_and_names_an_unknown_one() {
    let env = Env::new();
    let config = env.path("pbs.toml");
    fs::write(
        &config,
        "[[host]]\nname = \"here\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [\"/etc\"]\n",
    )
    .unwrap();
    let c = config.display().to_string();
    let out = env
        .pbs(&["ssh-setup", "here", "--config", &c])
        .expect(0)
        .stdout;
    assert!(
        out.contains("here uses transport = \"local\"") && out.contains("No SSH setup is needed"),
        "{out}"
    );
    let r = env.pbs(&["ssh-setup", "nope", "--config", &c]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("no host or clone \"nope\""),
        "{}",
        r.stderr
    );
}

#[test]
fn a_stale_socket_is_no_obstacle_and_a_missing_agent_is_named() {
    let (env, src) = Env::with_one_file();
    let sshd = Sshd::start(&env.path("sshd"), &[&src]);
    let config = sshd.pbs_config("web-1", &[&src]);
    // A socket left by a killed run: a file nobody listens on.
    drop(
        std::os::unix::net::UnixListener::bind(sshd.dir.join("sockets/haul-0123456789abcdef.sock"))
            .unwrap(),
    );
    let (run, rec) = pull(&env, &config, "web-1");
    assert_eq!(run.code, 0, "{}\n{}", run.stderr, sshd.log());
    assert_eq!(rec["status"], "ok");

    // The policy names an agent that is not installed.
    let policy = sshd.dir.join("wrapper.toml");
    let text = fs::read_to_string(&policy).unwrap();
    let agent = haul_tests::bin("haul-agent").display().to_string();
    fs::write(&policy, text.replace(&agent, "/nonexistent/haul-agent")).unwrap();
    let (run, rec) = pull(&env, &config, "web-1");
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(rec["status"], "failed");
    let err = rec["error"].as_str().unwrap();
    assert!(
        err.contains("cannot run the agent /nonexistent/haul-agent"),
        "{err}"
    );
    assert_eq!(env.pbs(&["--json", "snapshots"]).expect(0).json().len(), 1);
}

#[test]
fn a_repository_that_does_not_open_stops_the_pull_before_the_agent_starts() {
    // The pbs connects while the repository opens; when it does not open, the
    // connection is closed unused: nothing runs on the host, nothing is left listening.
    let (env, src) = Env::with_one_file();
    let sshd = Sshd::start(&env.path("sshd"), &[&src]);
    let config = sshd.pbs_config("web-1", &[&src]);
    fs::write(env.path("wrong"), "not the passphrase\n").unwrap();
    let (c, state) = (config.display().to_string(), env.path("state"));
    let run = env
        .pbs(&[
            "--password-file",
            env.path("wrong").to_str().unwrap(),
            "pull",
            "web-1",
            "--config",
            &c,
            "--state-dir",
            state.to_str().unwrap(),
        ])
        .expect(1);
    assert!(
        run.stderr
            .contains("wrong passphrase: none of the 1 key file(s)"),
        "{}",
        run.stderr
    );
    // It did connect (and ask for the forward) while the passphrase was tried, and
    // started nothing.
    let log = sshd.log();
    assert!(log.contains("Accepted publickey"), "{log}");
    assert!(!log.contains("Starting session"), "{log}");
    sshd.assert_nothing_listening();
    // As before the connection was made first: a pull whose repository did not open is
    // no run.
    let runs = env.pbs(&["--json", "runs", "--state-dir", state.to_str().unwrap()]);
    assert_eq!(runs.expect(0).json().len(), 0);

    // The same pull with the right passphrase starts the agent and saves a snapshot.
    let (run, rec) = pull(&env, &config, "web-1");
    assert_eq!(run.code, 0, "{}\n{}", run.stderr, sshd.log());
    assert_eq!(rec["status"], "ok");
    assert!(
        sshd.log().contains("Starting session: forced-command"),
        "{}",
        sshd.log()
    );
}

#[test]
fn a_key_without_the_forced_command_gets_no_shell_and_no_backup() {
    let (env, src) = Env::with_one_file();
    let sshd = Sshd::start(&env.path("sshd"), &[&src]);
    // Paths that a shell would run as commands, were the pbs to hand them to one.
    let mark = env.path("pwned");
    let tricks = [
        format!("{}/$(touch {})", src.display(), mark.display()),
        format!("{}/`touch {}`", src.display(), mark.display()),
        format!("{};touch {}", src.display(), mark.display()),
    ];
    let mut paths: Vec<&Path> = vec![&src];
    paths.extend(tricks.iter().map(Path::new));
    let config = sshd.pbs_config("web-1", &paths);
    let keys = sshd.dir.join("authorized_keys");
    let line = fs::read_to_string(&keys).unwrap();
    let forced = &line[..line.find("restrict").unwrap()];
    assert!(forced.starts_with("command="), "{line}");
    fs::write(&keys, line.replacen(forced, "", 1)).unwrap();

    let (run, rec) = pull(&env, &config, "web-1");
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(rec["status"], "failed");
    let err = rec["error"].as_str().unwrap();
    assert!(
        err.contains("not started by haul-wrapper")
            && err.contains("no forced command")
            && err.contains("haul-pbs ssh-setup"),
        "{err}"
    );
    assert!(!mark.exists(), "a shell ran a word of the command");
    assert!(env
        .pbs(&["--json", "snapshots"])
        .expect(0)
        .json()
        .is_empty());
    // The pbs asked only to run the agent: no shell, no terminal.
    let log = sshd.log();
    assert!(log.contains("Starting session: command"), "{log}");
    assert!(!log.contains("Starting session: shell"), "{log}");

    // The same key with its forced command back: the wrapper admits the run (the trick
    // paths are refused as outside the policy, so back up only the real one).
    fs::write(&keys, &line).unwrap();
    let config = sshd.pbs_config("web-1", &[&src]);
    let (run, rec) = pull(&env, &config, "web-1");
    assert_eq!(run.code, 0, "{}\n{}", run.stderr, sshd.log());
    assert_eq!(rec["status"], "ok");
    assert!(!mark.exists());
}

#[test]
fn rsa_ecdsa_and_passphrase_protected_identities_work_and_a_wrong_passphrase_is_named() {
    let (env, src) = Env::with_one_file();
    let sshd = Sshd::start(&env.path("sshd"), &[&src]);
    let config = sshd.pbs_config("web-1", &[&src]);
    let keys = sshd.dir.join("authorized_keys");
    let line = fs::read_to_string(&keys).unwrap();
    let options = &line[..line.find(" ssh-ed25519 ").unwrap()];
    let ed25519 = sshd.dir.join("id_ed25519").display().to_string();
    fs::write(sshd.dir.join("phrase"), "correct horse\n").unwrap();
    fs::write(sshd.dir.join("wrong-phrase"), "battery staple\n").unwrap();
    let kinds: [(&str, &[&str], &str, &str); 3] = [
        ("rsa", &["-t", "rsa", "-b", "3072", "-N", ""], "", "RSA"),
        (
            "ecdsa",
            &["-t", "ecdsa", "-b", "256", "-N", ""],
            "",
            "ECDSA",
        ),
        (
            "ed25519-pass",
            &["-t", "ed25519", "-N", "correct horse"],
            "phrase",
            "ED25519",
        ),
    ];
    let mut expected_snapshots = 0;
    for (name, args, phrase, label) in kinds {
        let key = sshd.dir.join(format!("id_{name}"));
        let out = std::process::Command::new("ssh-keygen")
            .arg("-q")
            .args(args)
            .arg("-C")
            .arg(name)
            .arg("-f")
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let public = fs::read_to_string(key.with_extension("pub")).unwrap();
        haul_tests::append(&keys, &format!("\n{options} {}", public.trim()));
        let mut text = fs::read_to_string(&config)
            .unwrap()
            .replace(&ed25519, &key.display().to_string());
        if !phrase.is_empty() {
            text = text.replace(
                "[[host]]\n",
                &format!(
                    "[[host]]\nidentity_passphrase_file = {:?}\n",
                    sshd.dir.join(phrase).display().to_string()
                ),
            );
        }
        let this = sshd.dir.join(format!("pbs-{name}.toml"));
        fs::write(&this, &text).unwrap();
        let (run, rec) = pull(&env, &this, "web-1");
        assert_eq!(run.code, 0, "{name}: {}\n{}", run.stderr, sshd.log());
        assert_eq!(rec["status"], "ok", "{name}");
        expected_snapshots += 1;
        // sshd says which key it took: `... ssh2: RSA SHA256:<fingerprint>`.
        let fingerprint = std::process::Command::new("ssh-keygen")
            .arg("-lf")
            .arg(key.with_extension("pub"))
            .output()
            .unwrap();
        let fingerprint = String::from_utf8_lossy(&fingerprint.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string();
        assert!(
            sshd.log().contains(&format!("ssh2: {label} {fingerprint}")),
            "{name}: {}",
            sshd.log()
        );
        if !phrase.is_empty() {
            // The wrong passphrase: the run fails naming the identity, nothing is sent.
            fs::write(&this, text.replace("/phrase\"", "/wrong-phrase\"")).unwrap();
            let (run, rec) = pull(&env, &this, "web-1");
            assert_eq!(run.code, 1, "{}", run.stdout);
            let err = rec["error"].as_str().unwrap();
            assert!(
                err.contains(&format!("identity {}", key.display()))
                    && err.contains("wrong-phrase the one of this key"),
                "{err}"
            );
        }
    }
    let snaps = env.pbs(&["--json", "snapshots"]).expect(0).json();
    assert_eq!(snaps.len(), expected_snapshots);
}

/// One request through the host's end of the tunnel; returns how long the answer took.
fn probe(socket: &Path) -> Option<std::time::Duration> {
    use std::io::{Read, Write};
    let started = std::time::Instant::now();
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    s.write_all(b"GET /v1/probe HTTP/1.1\r\nHost: pbs\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    if answer.is_empty() {
        return None; // the forward is gone: the run ended
    }
    assert!(
        answer.starts_with("HTTP/1.1 404") && answer.contains("\"not_found\""),
        "{answer}"
    );
    Some(started.elapsed())
}

#[test]
fn a_slow_upload_does_not_freeze_the_other_traffic_of_the_connection() {
    let (env, src) = Env::with_source();
    for i in 0..4 {
        fs::write(
            src.join(format!("r{i}.bin")),
            haul_tests::random_bytes(i, 2 << 20),
        )
        .unwrap();
    }
    let sshd = Sshd::start(&env.path("sshd"), &[&src]);
    let config = sshd.pbs_config("web-1", &[&src]);
    let sockets = sshd.dir.join("sockets");
    // Storing each group of blobs takes 2 s, as on a very slow disk: the uploads wait
    // for it, and the request bodies, other requests and the agent's output must not.
    const DELAY_MS: u64 = 2000;
    let done = std::sync::atomic::AtomicBool::new(false);
    let ((run, took), latencies) = std::thread::scope(|s| {
        let pull = s.spawn(|| {
            let c = config.display().to_string();
            let state = env.path("state").display().to_string();
            let started = std::time::Instant::now();
            let run = env.pbs_with(
                &[
                    "--json",
                    "pull",
                    "web-1",
                    "--config",
                    &c,
                    "--state-dir",
                    &state,
                ],
                &[("HAUL_FAULT_STORE_DELAY_MS", &DELAY_MS.to_string())],
            );
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            (run, started.elapsed())
        });
        let mut latencies = Vec::new();
        let mut socket = None;
        for _ in 0..600 {
            if done.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            socket = socket.or_else(|| {
                fs::read_dir(&sockets)
                    .unwrap()
                    .flatten()
                    .map(|e| e.path())
                    .find(|p| p.extension().is_some_and(|e| e == "sock"))
            });
            if let Some(latency) = socket.as_deref().and_then(probe) {
                latencies.push(latency);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        (pull.join().unwrap(), latencies)
    });
    assert_eq!(
        run.code,
        0,
        "{}\n{}\n{}",
        run.stdout,
        run.stderr,
        sshd.log()
    );
    let rec = &run.json().into_iter().find(|v| v["type"] == "run").unwrap()["run"];
    assert_eq!(rec["status"], "ok", "{rec}");
    assert!(
        took.as_millis() > 2 * DELAY_MS as u128,
        "the slow storage was not slow: {took:?}"
    );
    // Requests were answered all through the run, each well within one storage delay.
    assert!(latencies.len() >= 5, "{latencies:?}");
    let worst = latencies.iter().max().unwrap();
    assert!(
        worst.as_millis() < (DELAY_MS / 2) as u128,
        "a request waited {worst:?} behind a slow upload: {latencies:?}"
    );
    // And what was stored is the data.
    let target = env.path("restored");
    env.restore(&target, &[]).expect(0);
    assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));
}

#[test]
fn a_restore_onto_a_host_goes_through_a_read_only_tunnel() {
    let (env, src) = Env::with_source();
    make_fixture(&src);
    let restores = env.path("restores");
    fs::create_dir_all(&restores).unwrap();
    let sshd = Sshd::start_with(&env.path("sshd"), &[&src], &[&restores]);
    let config = sshd.pbs_config("web-1", &[&src]);
    let (run, _) = pull(&env, &config, "web-1");
    assert_eq!(run.code, 0, "{}", run.stderr);

    let c = config.display().to_string();
    let target = restores.join("web-1");
    let t = target.display().to_string();
    let r = env
        .pbs(&[
            "--json",
            "restore",
            "latest",
            "--host",
            "web-1",
            "--to-host",
            "web-1",
            "--config",
            &c,
            "--target",
            &t,
        ])
        .expect(0);
    let summary = r.json_of("summary");
    assert!(summary["connections"].as_u64().unwrap() >= 1, "{summary}");
    assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));

    // Outside the policy's restore_targets: refused by the host's wrapper, nothing written.
    let outside = env.path("elsewhere").display().to_string();
    let r = env.pbs(&[
        "restore",
        "latest",
        "--to-host",
        "web-1",
        "--config",
        &c,
        "--target",
        &outside,
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("outside the policy's restore_targets"),
        "{}",
        r.stderr
    );
    assert!(!env.path("elsewhere").exists());
}

/// sshd killed while a pull runs: the run fails clearly, writes no snapshot, leaves
/// nothing running on either side, and the next pull succeeds.
#[test]
fn sshd_killed_mid_pull_fails_the_run_and_the_next_pull_succeeds() {
    let (env, src) = Env::with_source();
    for i in 0..64 {
        fs::write(
            src.join(format!("f{i}")),
            haul_tests::random_bytes(i, 3 << 20),
        )
        .unwrap();
    }
    let mut sshd = Sshd::start(&env.path("sshd"), &[&src]);
    let config = sshd.pbs_config("web-1", &[&src]);
    let state = env.path("state");
    let mut pull_cmd = std::process::Command::new(haul_tests::bin("haul-pbs"));
    pull_cmd
        .arg("--repo")
        .arg(env.repo())
        .arg("--password-file")
        .arg(env.path("pass"))
        .args(["--json", "pull", "web-1", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = pull_cmd.spawn().unwrap();

    // Wait (bounded) until the agent runs on the "host", then kill every sshd process.
    let mut agents = Vec::new();
    for _ in 0..400 {
        agents = haul_tests::descendants(sshd.pid())
            .into_iter()
            .filter(|(_, comm)| comm == "haul-agent")
            .map(|(p, _)| p)
            .collect();
        if !agents.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(
        !agents.is_empty(),
        "the agent never started: {}",
        sshd.log()
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    for (p, comm) in haul_tests::descendants(sshd.pid()) {
        if comm == "sshd" {
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
    }
    unsafe { libc::kill(sshd.pid() as i32, libc::SIGKILL) };

    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let rec: serde_json::Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["type"] == "run")
        .expect("a run record")["run"]
        .clone();
    assert_eq!(rec["status"], "failed");
    // The reason is the cut, not the last line the wrapper happened to log.
    let cut = "the connection to web-1 closed during the run";
    assert!(rec["error"].as_str().unwrap().starts_with(cut), "{rec}");
    assert!(stderr.contains("pull of web-1 failed"), "{stderr}");
    assert!(stderr.contains(cut), "{stderr}");
    assert!(stderr.contains("no snapshot was written"), "{stderr}");
    assert_eq!(env.pbs(&["--json", "snapshots"]).expect(0).json().len(), 0);
    // The agent on the host side ends by itself (bounded wait).
    for _ in 0..400 {
        if agents.iter().all(|p| !haul_tests::alive(*p)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        agents.iter().all(|p| !haul_tests::alive(*p)),
        "an agent is still running"
    );
    sshd.restart();
    let c = config.display().to_string();
    let s = state.display().to_string();
    let r = env
        .pbs(&["--json", "pull", "web-1", "--config", &c, "--state-dir", &s])
        .expect(0);
    let rec = r.json_of("run")["run"].clone();
    assert_eq!(rec["status"], "ok");
    env.pbs(&["check", "--read-data"]).expect(0);
}

/// A host whose forced command accepts the run and then says and sends nothing (an
/// attacker's program in place of the agent): the run is stopped at its stall limit,
/// recorded as failed with why, and the next honest pull succeeds.
#[test]
fn a_host_that_never_answers_is_cut_at_the_stall_limit() {
    let (env, src) = Env::with_one_file();
    let sshd = Sshd::start(&env.path("sshd"), &[&src]);
    let config = sshd.pbs_config("web-1", &[&src]);
    let silent = env.path("silent-agent");
    let honest = sshd.put_in_place_of_the_agent(&silent, "#!/bin/sh\nexec sleep 600\n");
    let (c, s) = (
        config.display().to_string(),
        env.path("state").display().to_string(),
    );
    let (stderr, rec) = pull_fails_within(&env, &config, ("--stall-timeout", "3s"), 20);
    assert!(stderr.contains("the run stalled"), "{stderr}");
    assert!(
        rec["error"].as_str().unwrap().contains("the run stalled"),
        "{rec}"
    );
    sshd.assert_nothing_listening();
    fs::write(sshd.dir.join("wrapper.toml"), honest).unwrap();
    env.pbs(&[
        "pull",
        "web-1",
        "--config",
        &c,
        "--state-dir",
        &s,
        "--stall-timeout",
        "3s",
    ])
    .expect(0);
}

/// An attacker's program in place of the agent opens 16 connections through the
/// forwarded socket and sends pipelined requests on each without ever reading an
/// answer: at most 8 are served, what each may hold is bounded, the stalled ones are
/// cut at the request limit, the pbs's memory stays near a normal pull's, and the run
/// ends by itself with its failure recorded.
#[test]
fn sixteen_unread_channels_do_not_grow_the_pbs() {
    let (env, src) = Env::with_one_file();
    let sshd = Sshd::start(&env.path("sshd"), &[&src]);
    let config = sshd.pbs_config("web-1", &[&src]);
    let (c, state) = (config.display().to_string(), env.path("state"));
    let s = state.display().to_string();
    let normal = env
        .pbs(&["--json", "pull", "web-1", "--config", &c, "--state-dir", &s])
        .expect(0);
    let normal_rss = normal.json_of("run")["run"]["pbs_peak_rss_kib"]
        .as_u64()
        .unwrap();

    let flood = env.path("unread-channels");
    let honest = sshd.put_in_place_of_the_agent(
        &flood,
        r#"#!/usr/bin/python3
import socket, sys, time
path = sys.argv[sys.argv.index("--socket") + 1]
request = b"POST /v1/backup/missing HTTP/1.1\r\nHost: h\r\nContent-Length: 33\r\n\r\n" + b"\0" * 33
burst = request * 4000
conns = []
for _ in range(16):
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    c.setblocking(False)
    conns.append(c)
deadline = time.time() + 10
sent = 0
while time.time() < deadline:
    for c in conns:
        try:
            sent += c.send(burst)
        except OSError:
            pass
    time.sleep(0.005)
print("sent %d bytes, read none" % sent, file=sys.stderr)
sys.exit(1)
"#,
    );
    let t = std::time::Instant::now();
    let (_, rec) = pull_fails_within(&env, &config, ("--request-timeout", "3s"), 60);
    let rss = rec["pbs_peak_rss_kib"].as_u64().unwrap();
    eprintln!(
        "pbs peak: {rss} KiB under 16 unread channels, {normal_rss} KiB for a normal pull, {:?}",
        t.elapsed()
    );
    assert!(
        rss < normal_rss + 80 * 1024,
        "the pbs grew to {rss} KiB (a normal pull: {normal_rss} KiB)"
    );
    sshd.assert_nothing_listening();
    fs::write(sshd.dir.join("wrapper.toml"), honest).unwrap();
    let (c, s) = (
        config.display().to_string(),
        env.path("state").display().to_string(),
    );
    env.pbs(&["pull", "web-1", "--config", &c, "--state-dir", &s])
        .expect(0);
}

/// `pull web-1` with a time limit (`--request-timeout 2s`, `--stall-timeout 3s`): it
/// fails (exit 1) within `limit_s` seconds and records a failed run; its stderr and
/// that record are returned.
fn pull_fails_within(
    env: &Env,
    config: &Path,
    (flag, value): (&str, &str),
    limit_s: u64,
) -> (String, serde_json::Value) {
    let c = config.display().to_string();
    let s = env.path("state").display().to_string();
    let t = std::time::Instant::now();
    let run = env.pbs(&[
        "pull",
        "web-1",
        "--config",
        &c,
        "--state-dir",
        &s,
        flag,
        value,
    ]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(limit_s),
        "{:?}",
        t.elapsed()
    );
    let rec = env.runs().pop().unwrap();
    assert_eq!(rec["status"], "failed", "{rec}");
    (run.stderr, rec)
}

/// An attacker's program behind a real sshd that sends half a request head on one
/// forwarded connection and half a body on another, then waits: the pbs cuts both at
/// its request limit (the program sees them closed), and the run is recorded with the
/// program's own last words.
#[test]
fn stalled_heads_and_bodies_through_the_tunnel_are_cut_at_the_request_limit() {
    let (env, src) = Env::with_one_file();
    let sshd = Sshd::start(&env.path("sshd"), &[&src]);
    let config = sshd.pbs_config("web-1", &[&src]);
    let staller = env.path("staller");
    let honest = sshd.put_in_place_of_the_agent(
        &staller,
        r#"#!/usr/bin/python3
import socket, sys, time
path = sys.argv[sys.argv.index("--socket") + 1]
head = socket.socket(socket.AF_UNIX); head.connect(path)
head.sendall(b"POST /v1/backup/missing HTTP/1.1\r\nHost: h")
body = socket.socket(socket.AF_UNIX); body.connect(path)
body.sendall(b"POST /v1/backup/missing HTTP/1.1\r\nHost: h\r\nContent-Length: 330\r\n\r\n" + b"\0" * 33)
start = time.time()
cut = {}
for name, s in (("head", head), ("body", body)):
    s.settimeout(max(0.1, 30 - (time.time() - start)))
    try:
        while s.recv(4096):
            pass
        cut[name] = time.time() - start
    except socket.timeout:
        pass
print("stalled head cut after %.0f s, stalled body cut after %.0f s"
      % (cut.get("head", -1), cut.get("body", -1)), file=sys.stderr)
sys.exit(1)
"#,
    );
    let (_, rec) = pull_fails_within(&env, &config, ("--request-timeout", "2s"), 25);
    let said = rec["error"].as_str().unwrap();
    let secs = |what: &str| -> i64 {
        let at = said.find(what).unwrap_or_else(|| panic!("{rec}")) + what.len();
        said[at..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    for what in ["stalled head cut after ", "stalled body cut after "] {
        let cut = secs(what);
        assert!((1..=6).contains(&cut), "{what}{cut} s: {rec}");
    }
    sshd.assert_nothing_listening();
    fs::write(sshd.dir.join("wrapper.toml"), honest).unwrap();
    let (c, s) = (
        config.display().to_string(),
        env.path("state").display().to_string(),
    );
    env.pbs(&["pull", "web-1", "--config", &c, "--state-dir", &s])
        .expect(0);
}
