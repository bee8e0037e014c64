//! A faulty world: files that change while they are read, processes killed at the
//! moments that matter, connections cut. Every snapshot must restore, and every run
//! must be recorded for what it was.

use haul_tests::*;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The line number `i` of the growing log: each line tells where it belongs, so a
/// restored log can be checked to be a state the file had (a prefix of its last state).
fn log_line(i: u64) -> String {
    format!(
        "{i:010} {}\n",
        "appended while the backup reads it ".repeat(3)
    )
}

/// A log appended to all the time, pulled again and again: every snapshot restores,
/// with a log that is a state the file had and a size that agrees with its content;
/// `check --read-data` verifies that agreement.
#[test]
fn a_file_appended_to_during_pulls_restores_from_every_snapshot() {
    let (env, src) = Env::with_source();
    fs::write(src.join("steady.txt"), b"steady\n").unwrap();
    let log = src.join("app.log");
    let mut first = String::new();
    let mut next = 0u64;
    // 24 MiB to start with: long enough to read that appends land during every read.
    while first.len() < 24 << 20 {
        first.push_str(&log_line(next));
        next += 1;
    }
    fs::write(&log, &first).unwrap();
    drop(first);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, log) = (stop.clone(), log.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = fs::OpenOptions::new().append(true).open(&log).unwrap();
            // Bounded: at most 180 s, and at most 256 MiB of appends.
            let deadline = Instant::now() + Duration::from_secs(180);
            let mut written = 0usize;
            while !stop.load(Relaxed) && Instant::now() < deadline && written < 256 << 20 {
                let mut batch = String::new();
                for _ in 0..32 {
                    batch.push_str(&log_line(next));
                    next += 1;
                }
                f.write_all(batch.as_bytes()).unwrap();
                written += batch.len();
                std::thread::sleep(Duration::from_micros(300));
            }
        })
    };
    let mut changed_while_read = 0;
    for _ in 0..5 {
        let (run, rec) = env.pull_local(&[&src], &[]);
        assert!(
            run.code == 0 || run.code == 3,
            "{}\n{}",
            run.stdout,
            run.stderr
        );
        if rec["status"] == "warning" {
            let tail = rec["output_tail"].to_string();
            assert!(tail.contains("changed while being read"), "{rec}");
            changed_while_read += 1;
        }
    }
    stop.store(true, Relaxed);
    writer.join().unwrap();
    assert!(
        changed_while_read > 0,
        "no pull read the log while it grew: the test did not test anything"
    );

    env.pbs(&["check", "--read-data"]).expect(0);
    let last = fs::read(&log).unwrap();
    let snapshots = env.pbs(&["--json", "snapshots"]).expect(0).json();
    assert_eq!(snapshots.len(), 5, "{snapshots:?}");
    for (n, snap) in snapshots.iter().enumerate() {
        let id = snap["id"].as_str().unwrap();
        let target = env.path(&format!("out{n}"));
        let t = target.display().to_string();
        env.pbs(&["restore", id, "--target", &t]).expect(0);
        let restored = target.join(src.strip_prefix("/").unwrap());
        let got = fs::read(restored.join("app.log")).unwrap();
        assert!(got.len() >= 24 << 20, "snapshot {id}: {} bytes", got.len());
        assert!(
            last.starts_with(&got),
            "snapshot {id}: the restored log ({} bytes) is not a state the file had",
            got.len()
        );
        assert_eq!(fs::read(restored.join("steady.txt")).unwrap(), b"steady\n");
        fs::remove_dir_all(&target).unwrap();
    }
}

/// Sixteen pulls, each with its agent killed (SIGKILL) at another moment, from its
/// start to the end of its upload: the pbs never dies (of SIGPIPE or anything else),
/// records every run, and leaves a repository that checks clean and pulls again.
#[test]
fn pulls_whose_agent_is_killed_at_random_moments_are_each_recorded() {
    let (env, src) = Env::with_source();
    for i in 0..12u64 {
        fs::write(
            src.join(format!("big{i}.bin")),
            random_bytes(100 + i, 3 << 20),
        )
        .unwrap();
    }
    fs::create_dir_all(src.join("small")).unwrap();
    for i in 0..400 {
        fs::write(
            src.join(format!("small/{i}.txt")),
            format!("{i}\n").repeat(i),
        )
        .unwrap();
    }
    let state = env.path("state");
    let runs = || {
        fs::read_to_string(state.join("runs.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let mut killed = 0;
    for i in 0..16u64 {
        // New content each time, so that every pull has something to read and send.
        for f in 0..12u64 {
            fs::write(
                src.join(format!("big{f}.bin")),
                random_bytes(1000 * i + f, 3 << 20),
            )
            .unwrap();
        }
        // Spread over the pull: at once, then every 15 ms up to 225 ms. Storing is
        // slowed (a debug build's fault hook: 20 ms per megabyte) so that the pull
        // lasts about a second however fast the machine is, and most kills land
        // before its end.
        let delay = Duration::from_millis((i * 7 % 16) * 15);
        let (s, st) = (src.display().to_string(), state.display().to_string());
        let mut pbs = env
            .pbs_command(&["--json", "pull", "--local", &s, "--state-dir", &st])
            .env("HAUL_FAULT_STORE_DELAY_MS", "20")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let agent = loop {
            if let Some((pid, _)) = descendants(pbs.id())
                .into_iter()
                .find(|(_, name)| name == "haul-agent")
            {
                break Some(pid);
            }
            if pbs.try_wait().unwrap().is_some() || started.elapsed() > Duration::from_secs(20) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if let Some(pid) = agent {
            std::thread::sleep(delay);
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let out = pbs.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            None,
            "pull {i}: the pbs died of a signal: {stderr}"
        );
        let code = out.status.code().unwrap();
        // 3: killed right after it committed; the snapshot is complete.
        assert!(code <= 1 || code == 3, "pull {i}: exit {code}: {stderr}");
        let records = runs();
        assert_eq!(records.len() as u64, i + 1, "pull {i}: {stderr}");
        let last = records.last().unwrap();
        if code == 1 {
            killed += 1;
            assert_eq!(last["status"], "failed", "{last}");
            assert!(
                last["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{last}"
            );
        } else if code == 3 {
            assert_eq!(last["status"], "warning", "{last}");
            assert!(last["snapshot"].is_string(), "{last}");
            assert!(
                stderr.contains("the snapshot is complete, but the agent ended abnormally"),
                "{stderr}"
            );
        } else {
            assert_eq!(last["status"], "ok", "{last}");
        }
    }
    assert!(killed >= 8, "only {killed} pulls were cut by the kill");
    // Nothing is left half-done: the repository checks clean, and a pull completes.
    env.pbs(&["check", "--read-data"]).expect(0);
    let (run, rec) = env.pull_local(&[&src], &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(rec["status"], "ok");
    assert_eq!(
        fs::read_dir(state.join("running"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "a run marker was left behind"
    );
}

/// A daemon whose local agent fails at once, run after run, keeps running and records
/// each failure with the agent's own words.
#[test]
fn a_daemon_whose_agents_all_fail_at_start_keeps_running_and_records_each() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "data").unwrap();
    let agent = env.path("failing-agent");
    fs::write(
        &agent,
        "#!/bin/sh\nexec 0<&-\necho 'haul-agent: cannot start: test agent refuses' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&agent, fs::Permissions::from_mode(0o755)).unwrap();
    let state = env.path("state");
    let config = daemon_config(
        &env,
        "failing",
        &src,
        &format!("agent = {:?}\n", agent.display().to_string()),
    );
    let log = env.path("daemon.log");
    let mut guard = start_daemon(&env, &config, &log);
    let daemon = &mut guard.0;
    let records = || pull_records(&state);
    let t = Instant::now();
    while records().len() < 5 {
        let exited = daemon.try_wait().unwrap();
        if exited.is_some() || t.elapsed() > Duration::from_secs(120) {
            let _ = daemon.kill();
            let _ = daemon.wait();
            panic!(
                "the daemon ended ({exited:?}) or recorded too few runs: {:?}\n{}",
                records(),
                fs::read_to_string(&log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon died");
    for r in records() {
        assert_eq!(r["status"], "failed", "{r}");
        assert_eq!(
            r["error"], "haul-agent: cannot start: test agent refuses",
            "{r}"
        );
    }
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = daemon.kill();
            panic!("the daemon did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
}

/// A pbs killed (SIGKILL) after its snapshot was saved and before the run was recorded:
/// the next daemon records that run as a `warning` with its complete snapshot, not as
/// failed.
#[test]
fn a_pull_killed_right_after_its_snapshot_was_saved_is_recorded_with_it() {
    let (env, src) = Env::with_source();
    let state = env.path("state");
    let mut caught = None;
    // The window between the commit and the record is short: tried a few times.
    for attempt in 0..8u64 {
        fs::write(src.join("data.bin"), random_bytes(500 + attempt, 8 << 20)).unwrap();
        let before = env.count("snapshots");
        let (s, st) = (src.display().to_string(), state.display().to_string());
        let mut pbs = env
            .pbs_command(&["pull", "--local", &s, "--state-dir", &st])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // The run's marker names the snapshot once it is saved, before the agent is
        // told: kill the pbs the moment it does.
        let marker_of = || -> Option<(std::path::PathBuf, serde_json::Value)> {
            fs::read_dir(state.join("running"))
                .ok()?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .find_map(|p| {
                    let v: serde_json::Value = serde_json::from_slice(&fs::read(&p).ok()?).ok()?;
                    v["snapshot"].is_string().then_some((p, v))
                })
        };
        let t = Instant::now();
        let mut seen = None;
        while pbs.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(60) {
            if let Some(m) = marker_of() {
                seen = Some(m);
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = pbs.kill();
        let _ = pbs.wait();
        let markers: Vec<_> = fs::read_dir(state.join("running"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        if let Some((path, marker)) = seen {
            if path.exists() && env.count("snapshots") > before {
                caught = Some(marker);
                break;
            }
        }
        eprintln!(
            "attempt {attempt}: snapshots {before} -> {}, markers {markers:?}",
            env.count("snapshots")
        );
        // Recorded before the kill, or killed before the marker was updated: again.
        for m in markers {
            fs::remove_file(m).unwrap();
        }
    }
    let marker = caught.expect("never killed between the commit and the record in 8 tries");

    let config = env.path("pbs.toml");
    fs::write(
        &config,
        format!(
            "[server]\nstate_dir = {:?}\nstatus_listen = \"{}\"\n\n[[host]]\nname = \"other\"\naddress = \"localhost\"\n\
             transport = \"local\"\npaths = [{:?}]\nschedule = \"1h\"\n",
            state.display().to_string(),
            free_listen(),
            src.display().to_string(),
        ),
    )
    .unwrap();
    let mut guard = KillOnDrop(
        std::process::Command::new(bin("haul-pbs"))
            .args(["daemon", "--config"])
            .arg(&config)
            .env("HAUL_CACHE_DIR", env.path("cache"))
            .env("HAUL_AGENT", bin("haul-agent"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let daemon = &mut guard.0;
    let recorded = || {
        fs::read_to_string(state.join("runs.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| r["id"] == marker["id"])
    };
    let t = Instant::now();
    let record = loop {
        if let Some(r) = recorded() {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the run was never recorded"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
    assert_eq!(record["status"], "warning", "{record}");
    assert_eq!(record["snapshot"], marker["snapshot"], "{record}");
    assert!(
        record["error"]
            .as_str()
            .unwrap()
            .contains("was saved and is complete, then interrupted"),
        "{record}"
    );
    // And it is: the snapshot checks clean and restores the file.
    env.pbs(&["check", "--read-data"]).expect(0);
    let id = marker["snapshot"].as_str().unwrap();
    let target = env.path("out");
    let t = target.display().to_string();
    env.pbs(&["restore", id, "--target", &t]).expect(0);
    assert_eq!(
        fs::read(target.join(src.strip_prefix("/").unwrap()).join("data.bin")).unwrap(),
        fs::read(src.join("data.bin")).unwrap()
    );
}

/// An agent that starts and then neither prints nor sends anything: the run is stopped
/// at its stall limit with a clear error, recorded as failed, and nothing is left
/// running.
#[test]
fn a_silent_agent_is_stopped_at_the_stall_limit() {
    let (env, src) = Env::with_source();
    fs::write(src.join("f"), "data").unwrap();
    let agent = env.path("silent-agent");
    let pid_file = env.path("agent.pid");
    fs::write(
        &agent,
        format!(
            "#!/bin/sh\necho $$ > {}\nexec sleep 600\n",
            pid_file.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&agent, fs::Permissions::from_mode(0o755)).unwrap();
    let (s, a) = (src.display().to_string(), agent.display().to_string());
    let state = env.path("state").display().to_string();
    let t = Instant::now();
    let run = env.pbs(&[
        "pull",
        "--local",
        &s,
        "--state-dir",
        &state,
        "--agent",
        &a,
        "--stall-timeout",
        "2s",
    ]);
    let took = t.elapsed();
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(
        run.stderr
            .contains("the run stalled: the agent printed nothing and sent no request for 2s"),
        "{}",
        run.stderr
    );
    let rec = env.runs().pop().unwrap();
    assert_eq!(rec["status"], "failed", "{rec}");
    assert!(
        rec["error"].as_str().unwrap().contains("the run stalled"),
        "{rec}"
    );
    // The agent was stopped with the run.
    let pid: u32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!alive(pid), "the silent agent {pid} is still running");
    // A real agent, with the same limit, is never silent that long.
    let run = env.pbs(&[
        "pull",
        "--local",
        &s,
        "--state-dir",
        &state,
        "--stall-timeout",
        "2s",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

/// The daemon's pulls whose agents are killed in the middle of their uploads: the
/// daemon keeps running, records each as failed, and pulls the host when it is let be.
#[test]
fn a_daemon_survives_its_agents_killed_mid_upload() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let state = env.path("state");
    let config = daemon_config(&env, "victim", &src, "");
    let mut daemon = start_daemon(&env, &config, &env.path("daemon.log"));
    let daemon = &mut daemon.0;
    let pulls = || pull_records(&state);
    let t = Instant::now();
    let mut killed = 0;
    let mut round = 0u64;
    while killed < 3 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "only {killed} agents killed"
        );
        assert!(daemon.try_wait().unwrap().is_none(), "the daemon died");
        // New content each round, so every pull has data to send.
        for i in 0..8u64 {
            fs::write(
                src.join(format!("f{i}.bin")),
                random_bytes(9000 + round * 10 + i, 4 << 20),
            )
            .unwrap();
        }
        round += 1;
        // Wait for the next agent, let it upload a little, kill it.
        let agent = loop {
            if let Some((pid, _)) = descendants(daemon.id())
                .into_iter()
                .find(|(_, name)| name == "haul-agent")
            {
                break pid;
            }
            assert!(t.elapsed() < Duration::from_secs(120), "no agent started");
            std::thread::sleep(Duration::from_millis(2));
        };
        std::thread::sleep(Duration::from_millis(60));
        if unsafe { libc::kill(agent as i32, libc::SIGKILL) } == 0 {
            killed += 1;
        }
        // Wait until that run is recorded.
        let before = pulls().len();
        while pulls().len() == before {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "the run was never recorded"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let records = pulls();
    assert!(
        records.iter().filter(|r| r["status"] == "failed").count() >= 1,
        "{records:#?}"
    );
    // Let be, it pulls the host.
    let t = Instant::now();
    while !pulls().iter().any(|r| r["status"] == "ok") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no pull succeeded after the kills"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon died");
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let status = daemon.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// A configuration with one host `name` backing up `src` through a local agent every
/// second (plus `host_extra` lines), its state in the env's `state`.
fn daemon_config(env: &Env, name: &str, src: &Path, host_extra: &str) -> std::path::PathBuf {
    let config = env.path("pbs.toml");
    fs::write(
        &config,
        format!(
            "[server]\nstate_dir = {:?}\nstatus_listen = \"{}\"\nsocket_dir = {:?}\n\n\
             [[host]]\nname = {name:?}\naddress = \"localhost\"\ntransport = \"local\"\n\
             paths = [{:?}]\nschedule = \"1s\"\n{host_extra}",
            env.path("state").display().to_string(),
            free_listen(),
            env.path("sockets").display().to_string(),
            src.display().to_string(),
        ),
    )
    .unwrap();
    config
}
