//! `haul-pbs daemon` under a real supervisord: schedules, concurrency, clean stops,
//! restarts, a kill -9 in the middle of a run, and the status server read by parsers
//! nobody here wrote (python3-feedparser, prometheus_client).

use haul_tests::{bin, feedparser, http_get, run_tool, wait_until, Env, Sshd};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A supervisord of the test's, with one program: the daemon. Killed when dropped.
struct Supervisor {
    conf: PathBuf,
    child: Child,
}

impl Supervisor {
    fn start(dir: &Path, daemon: &str, env: &[(&str, String)]) -> Supervisor {
        let d = dir.display();
        let environment: Vec<String> = env.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        let conf = dir.join("supervisord.conf");
        fs::write(
            &conf,
            format!(
                "[unix_http_server]\nfile={d}/supervisor.sock\n\n\
                 [supervisord]\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\nnodaemon=true\nchildlogdir={d}\n\n\
                 [rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
                 [supervisorctl]\nserverurl=unix://{d}/supervisor.sock\n\n\
                 [program:haul]\ncommand={daemon}\nenvironment={}\nautostart=true\nautorestart=unexpected\nstartsecs=1\n\
                 stopsignal=TERM\nstopwaitsecs=60\nstdout_logfile={d}/haul.out\nstderr_logfile={d}/haul.err\n",
                environment.join(",")
            ),
        )
        .unwrap();
        // It logs to its logfile (read by the test), and to stdout in the foreground.
        let child = Command::new("supervisord")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("supervisord (apt-get install supervisor)");
        let s = Supervisor { conf, child };
        s.wait_for("RUNNING", Duration::from_secs(30));
        s
    }

    fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new("supervisorctl")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .expect("supervisorctl");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    fn wait_for(&self, state: &str, limit: Duration) {
        let t = Instant::now();
        while t.elapsed() < limit {
            if self.ctl(&["status", "haul"]).contains(state) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "haul did not reach {state}: {}",
            self.ctl(&["status", "haul"])
        );
    }

    fn pid(&self) -> i32 {
        self.ctl(&["pid", "haul"]).trim().parse().unwrap()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.ctl(&["shutdown"]);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `config` written to the environment's `pbs.toml`, and `haul-pbs daemon` on it under
/// a supervisord of the test's, with the built agent, a cache of the test's and `env`.
fn supervised_daemon(env: &Env, config: &str, extra: &[(&str, String)]) -> (PathBuf, Supervisor) {
    let config_file = env.path("pbs.toml");
    fs::write(&config_file, config).unwrap();
    let daemon = format!(
        "{} daemon --config {} --grace 30s",
        bin("haul-pbs").display(),
        config_file.display()
    );
    let sup_dir = env.path("supervisor");
    fs::create_dir_all(&sup_dir).unwrap();
    let mut vars = vec![
        ("HAUL_AGENT", bin("haul-agent").display().to_string()),
        ("HAUL_CACHE_DIR", env.path("cache").display().to_string()),
    ];
    vars.extend(extra.iter().cloned());
    let sup = Supervisor::start(&sup_dir, &daemon, &vars);
    (config_file, sup)
}

/// The daemon's metrics as prometheus_client parses them: family → [labels, value].
fn metrics_of(port: u16) -> serde_json::Value {
    let mut python = std::process::Command::new("/usr/bin/python3");
    python
        .arg("-c")
        .arg(
            "import sys, json, urllib.request\n\
             from prometheus_client.parser import text_string_to_metric_families\n\
             text = urllib.request.urlopen(sys.argv[1]).read().decode()\n\
             out = {}\n\
             for f in text_string_to_metric_families(text):\n\
             \x20   for s in f.samples:\n\
             \x20       out.setdefault(f.name, []).append([s.labels, s.value])\n\
             print(json.dumps(out))",
        )
        .arg(format!("http://127.0.0.1:{port}/metrics"));
    let metrics = run_tool(&mut python, "python3-prometheus-client");
    serde_json::from_slice(&metrics).unwrap()
}

/// `promtool check metrics`: the scraped text is valid and follows Prometheus' naming
/// conventions (it prints what it objects to and exits non-zero).
fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The example alert rules are valid, and each fires on the series that should raise
/// it and not on healthy ones (`promtool test rules`, on series written for it).
#[test]
fn the_example_alert_rules_are_valid_and_fire_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rules = root.join("examples/alerts.yml");
    let out = run_tool(
        Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(&rules),
        "promtool (apt-get install prometheus)",
    );
    assert!(
        String::from_utf8_lossy(&out).contains("SUCCESS: 8 rules found"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let out = run_tool(
        Command::new("promtool")
            .args(["test", "rules", "alerts_test.yml"])
            .current_dir(root.join("tests/fixtures")),
        "promtool test rules",
    );
    assert!(String::from_utf8_lossy(&out).contains("SUCCESS"));
}

fn get(port: u16, path: &str) -> (u16, String) {
    http_get(&format!("127.0.0.1:{port}"), path)
}

fn records(state: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(state.join("runs.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn time(v: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    v.as_str().unwrap().parse().unwrap()
}

/// Waits (at most `limit`) until `pred` holds for the records.
fn wait_records(
    state: &Path,
    limit: Duration,
    pred: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let t = Instant::now();
    loop {
        let r = records(state);
        if pred(&r) {
            return r;
        }
        assert!(t.elapsed() < limit, "timed out; records so far: {r:#?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn pulls_of<'a>(
    r: &'a [serde_json::Value],
    host: &'a str,
) -> impl Iterator<Item = &'a serde_json::Value> {
    r.iter()
        .filter(move |v| v["host"] == host && v["kind"] == "pull")
}

#[test]
fn the_daemon_under_supervisord_pulls_on_schedule_stops_cleanly_and_survives_kill_9() {
    let env = Env::new();
    // Three hosts with the agent run here, and one over SSH through a private sshd.
    let hosts = ["h1", "h2", "h3", "ssh1"];
    for h in hosts {
        let d = env.path(&format!("src/{h}"));
        fs::create_dir_all(&d).unwrap();
        for i in 0..20 {
            fs::write(
                d.join(format!("f{i}")),
                format!("{h} file {i}\n").repeat(100),
            )
            .unwrap();
        }
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let state = env.path("state");
    let mut config = format!(
        "[server]\nstate_dir = {:?}\nstatus_listen = \"127.0.0.1:{port}\"\nmax_concurrent = 2\n\n[feed]\ntitle = \"test backups\"\n",
        state.display().to_string()
    );
    for h in &hosts[..3] {
        config.push_str(&format!(
            "\n[[host]]\nname = \"{h}\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{:?}]\nschedule = \"4s\"\n",
            env.path(&format!("src/{h}")).display().to_string()
        ));
    }
    let ssh_src = env.path("src/ssh1");
    let sshd = Sshd::start(&env.path("sshd"), &[&ssh_src]);
    let ssh_host = fs::read_to_string(sshd.pbs_config("ssh1", &[&ssh_src])).unwrap();
    config.push_str(&format!("\n{ssh_host}schedule = \"4s\"\n"));
    let (config_file, sup) = supervised_daemon(
        &env,
        &config,
        // Each pull stores slowly (a debug-build fault hook), so runs overlap and a stop
        // or a kill finds one running.
        &[("HAUL_FAULT_STORE_DELAY_MS", "1500".into())],
    );

    // Each host is pulled again and again on its schedule.
    let r = wait_records(&state, Duration::from_secs(120), |r| {
        hosts
            .iter()
            .all(|h| pulls_of(r, h).filter(|v| v["status"] == "ok").count() >= 2)
    });
    for h in hosts {
        let mut runs: Vec<_> = pulls_of(&r, h).collect();
        runs.sort_by_key(|v| time(&v["start"]));
        for w in runs.windows(2) {
            // Never two runs of one host at once, and the interval between them.
            assert!(
                time(&w[1]["start"]) >= time(&w[0]["end"]),
                "{h} overlapped: {w:#?}"
            );
            assert!(
                time(&w[1]["start"]) - time(&w[0]["start"]) >= chrono::Duration::milliseconds(3900),
                "{h} ran early: {w:#?}"
            );
        }
    }
    // At most max_concurrent (2) at any moment.
    let all: Vec<_> = r.iter().filter(|v| v["kind"] == "pull").collect();
    for a in &all {
        let t = time(&a["start"]);
        let at_once = all
            .iter()
            .filter(|b| time(&b["start"]) <= t && time(&b["end"]) > t)
            .count();
        assert!(at_once <= 2, "{at_once} runs at {t}");
    }

    // The status server: feeds for feedparser, metrics for prometheus_client.
    let feed = feedparser(Path::new(&format!("http://127.0.0.1:{port}/feed.xml")));
    assert_eq!(feed["bozo"], false, "{feed}");
    assert_eq!(feed["title"], "test backups: all hosts");
    let entries = feed["entries"].as_array().unwrap();
    assert!(entries.len() >= 6, "{feed}");
    let newest = records(&state);
    let ids: Vec<&str> = entries.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert!(newest
        .iter()
        .rev()
        .take(3)
        .all(|r| ids.contains(&r["id"].as_str().unwrap())));
    assert!(
        entries[0]["title"].as_str().unwrap().contains(" OK — "),
        "{feed}"
    );
    // The channel links the status page and says when it was built; each item links
    // its run's page, which the status server serves.
    assert_eq!(feed["link"], format!("http://127.0.0.1:{port}/"));
    assert!(feed["updated"].is_string(), "{feed}");
    let link = entries[0]["link"].as_str().unwrap();
    assert_eq!(
        link,
        format!(
            "http://127.0.0.1:{port}/runs/{}",
            entries[0]["id"].as_str().unwrap()
        )
    );
    let (code, page) = get(
        port,
        link.strip_prefix(&format!("http://127.0.0.1:{port}"))
            .unwrap(),
    );
    assert_eq!(code, 200);
    assert!(page.contains(entries[0]["id"].as_str().unwrap()), "{page}");
    let h1 = feedparser(Path::new(&format!(
        "http://127.0.0.1:{port}/hosts/h1/feed.xml"
    )));
    assert_eq!(h1["bozo"], false);
    assert!(h1["entries"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["title"].as_str().unwrap().starts_with("h1: pull")));
    assert_eq!(get(port, "/hosts/nobody/feed.xml").0, 404);
    let (code, status) = get(port, "/status.json");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["hosts"].as_array().unwrap().len(), 4);
    assert_eq!(status["max_concurrent"], 2);
    assert!(status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .all(|h| h["stale"] == false && h["last_success"].is_string()));
    let metrics = metrics_of(port);
    for family in [
        "haul_host_last_success_timestamp_seconds",
        "haul_host_last_run_status",
        "haul_host_last_run_duration_seconds",
        "haul_host_last_run_new_bytes",
        "haul_host_snapshots",
        "haul_host_next_run_timestamp_seconds",
        "haul_host_consecutive_failures",
        "haul_host_stale",
    ] {
        let samples = metrics[family]
            .as_array()
            .unwrap_or_else(|| panic!("{family}: {metrics}"));
        for h in hosts {
            assert!(
                samples.iter().any(|s| s[0]["host"] == h),
                "{family} lacks {h}"
            );
        }
    }
    let last_success = metrics["haul_host_last_success_timestamp_seconds"]
        .as_array()
        .unwrap();
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        last_success
            .iter()
            .all(|s| (now - s[1].as_f64().unwrap()).abs() < 300.0),
        "{metrics}"
    );

    // Runs counted by host, kind and status; the repository's own figures.
    let sample = |family: &str, labels: &[(&str, &str)]| -> f64 {
        metrics[family]
            .as_array()
            .unwrap_or_else(|| panic!("{family}: {metrics}"))
            .iter()
            .find(|s| labels.iter().all(|(k, v)| s[0][*k] == *v))
            .unwrap_or_else(|| panic!("{family} {labels:?}: {metrics}"))[1]
            .as_f64()
            .unwrap()
    };
    for h in hosts {
        let ok_runs = sample(
            "haul_runs",
            &[("host", h), ("kind", "pull"), ("status", "ok")],
        );
        assert!(ok_runs >= 2.0, "{h}: {ok_runs} ok pulls counted");
        assert!(sample("haul_host_snapshots", &[("host", h)]) >= 2.0);
    }
    assert_eq!(sample("haul_repository_up", &[("repository", "repo")]), 1.0);
    assert!(sample("haul_repository_stored_bytes", &[("repository", "repo")]) > 0.0);
    assert!(
        sample(
            "haul_repository_filesystem_avail_bytes",
            &[("repository", "repo")]
        ) > 0.0
    );
    let (_, text) = get(port, "/metrics");
    assert!(text.contains("haul_build_info{version=\""), "{text}");
    promtool_check_metrics(&text);

    // A stop while a pull runs ends it within the grace period, with that pull recorded.
    let running_dir = state.join("running");
    let in_flight = fresh_run(&running_dir);
    let t = Instant::now();
    let out = sup.ctl(&["stop", "haul"]);
    assert!(out.contains("stopped"), "{out}");
    assert!(
        t.elapsed() < Duration::from_secs(35),
        "stop took {:?}",
        t.elapsed()
    );
    let log = fs::read_to_string(env.path("supervisor").join("supervisord.log")).unwrap();
    assert!(log.contains("stopped: haul (exit status 0)"), "{log}");
    let err = fs::read_to_string(env.path("supervisor").join("haul.err")).unwrap();
    assert!(
        err.contains("waiting for running pulls") && err.contains("daemon stopped"),
        "{err}"
    );
    let left: Vec<_> = fs::read_dir(&running_dir)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "runs left unrecorded: {left:?}");
    let rec = records(&state)
        .into_iter()
        .find(|v| v["id"] == in_flight.as_str());
    assert_eq!(
        rec.as_ref().map(|r| r["status"].clone()),
        Some("ok".into()),
        "{rec:?}"
    );

    // A restart with every host overdue and no cap in the way (4 at once allowed):
    // they start one after another, a stagger apart, not all at once.
    fs::write(
        &config_file,
        config.replace("max_concurrent = 2", "max_concurrent = 4"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(4500));
    let restarted = chrono::Utc::now();
    assert!(sup.ctl(&["start", "haul"]).contains("started"));
    let r = wait_records(&state, Duration::from_secs(60), |r| {
        r.iter()
            .filter(|v| v["kind"] == "pull" && time(&v["start"]) > restarted)
            .count()
            >= 4
    });
    let mut starts: Vec<_> = r
        .iter()
        .filter(|v| v["kind"] == "pull" && time(&v["start"]) > restarted)
        .map(|v| time(&v["start"]))
        .collect();
    starts.sort();
    // Host k is due a second after host k-1 (the first may start late, as the daemon
    // comes up, so its gap to the second can be shorter).
    let spread = starts[1..4]
        .windows(2)
        .all(|w| w[1] - w[0] >= chrono::Duration::milliseconds(800));
    assert!(
        spread && starts[3] - starts[0] >= chrono::Duration::milliseconds(1800),
        "hosts started at once after the restart: {starts:?}"
    );

    // kill -9 in the middle of a run: the next start records it as interrupted.
    let id = fresh_run(&running_dir);
    let pid = sup.pid();
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    // supervisord starts it again (the exit was unexpected).
    let r = wait_records(&state, Duration::from_secs(60), |r| {
        r.iter().any(|v| v["id"] == id.as_str())
    });
    let rec = r.iter().find(|v| v["id"] == id.as_str()).unwrap();
    assert_eq!(rec["status"], "failed", "{rec}");
    assert!(
        rec["error"].as_str().unwrap().contains("interrupted"),
        "{rec}"
    );
    sup.wait_for("RUNNING", Duration::from_secs(30));
    assert_ne!(sup.pid(), pid);
    // And the daemon goes on pulling after it.
    let after = chrono::Utc::now();
    wait_records(&state, Duration::from_secs(60), |r| {
        r.iter()
            .any(|v| v["kind"] == "pull" && v["status"] == "ok" && time(&v["start"]) > after)
    });
    let feed = feedparser(&state.join("feed.xml"));
    assert_eq!(feed["bozo"], false);
}

/// The daemon as a plain child process; SIGKILLed if the test ends early.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_json(port: u16) -> serde_json::Value {
    let (code, body) = get(port, "/status.json");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn a_stale_host_gets_one_alert_per_window_and_sighup_reloads_only_a_valid_config() {
    let env = Env::new();
    let good = env.path("src/good");
    fs::create_dir_all(&good).unwrap();
    fs::write(good.join("f"), "data").unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let state = env.path("state");
    let base = format!(
        "[server]\nstate_dir = {:?}\nstatus_listen = \"127.0.0.1:{port}\"\nsocket_dir = {:?}\n\n\
         [[host]]\nname = \"good\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{:?}]\nschedule = \"5s\"\n\n\
         [[host]]\nname = \"bad\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [\"/nonexistent/haul-test\"]\nschedule = \"2s\"\nalert_window = \"3s\"\n",
        state.display().to_string(),
        env.path("sockets").display().to_string(),
        good.display().to_string()
    );
    let config = env.path("pbs.toml");
    fs::write(&config, &base).unwrap();
    let log = env.path("daemon.log");
    let daemon = Daemon(
        Command::new(bin("haul-pbs"))
            .args(["daemon", "--grace", "10s", "--config"])
            .arg(&config)
            .env("HAUL_AGENT", bin("haul-agent"))
            .env("HAUL_CACHE_DIR", env.path("cache"))
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = daemon.0.id() as i32;

    // The bad host fails on a path that is not there (a mount may come back: retried);
    // after its 3 s window it is stale, and alerted once per window.
    let r = wait_records(&state, Duration::from_secs(60), |r| {
        r.iter().filter(|v| v["kind"] == "alert").count() >= 2
    });
    let alerts: Vec<_> = r.iter().filter(|v| v["kind"] == "alert").collect();
    assert!(
        alerts
            .iter()
            .all(|a| a["host"] == "bad" && a["status"] == "warning"),
        "{alerts:#?}"
    );
    let gap = time(&alerts[1]["end"]) - time(&alerts[0]["end"]);
    assert!(
        gap >= chrono::Duration::milliseconds(2900),
        "alerts {gap} apart: {alerts:#?}"
    );
    assert!(
        alerts[0]["error"]
            .as_str()
            .unwrap()
            .starts_with("no successful backup"),
        "{alerts:#?}"
    );
    let failed = r
        .iter()
        .filter(|v| v["host"] == "bad" && v["kind"] == "pull")
        .collect::<Vec<_>>();
    assert!(
        failed
            .iter()
            .all(|v| v["status"] == "failed" && v["error_kind"] == "source"),
        "{failed:#?}"
    );
    assert!(r.iter().any(|v| v["host"] == "good" && v["status"] == "ok"));
    let status = status_json(port);
    let host = |s: &serde_json::Value, n: &str| {
        s["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(host(&status, "bad")["stale"], true, "{status}");
    assert!(host(&status, "bad")["held"].is_null(), "{status}");
    // Runs put their sockets in [server].socket_dir: made private, cleaned after each run.
    use std::os::unix::fs::PermissionsExt;
    let sockets = fs::metadata(env.path("sockets")).unwrap();
    assert_eq!(sockets.permissions().mode() & 0o777, 0o700);
    assert_eq!(host(&status, "good")["stale"], false, "{status}");
    assert!(
        host(&status, "bad")["consecutive_failures"]
            .as_u64()
            .unwrap()
            >= 1
    );
    let (_, metrics) = get(port, "/metrics");
    assert!(
        metrics.contains("haul_host_stale{host=\"bad\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("haul_host_stale{host=\"good\"} 0"),
        "{metrics}"
    );
    let feed = feedparser(Path::new(&format!(
        "http://127.0.0.1:{port}/hosts/bad/feed.xml"
    )));
    assert_eq!(feed["bozo"], false);
    let titles: Vec<&str> = feed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["title"].as_str().unwrap())
        .collect();
    assert!(
        titles
            .iter()
            .any(|t| t.starts_with("bad: alert WARNING — no successful backup")),
        "{titles:?}"
    );
    assert!(
        titles.iter().any(|t| t.starts_with("bad: pull FAILED — ")),
        "{titles:?}"
    );
    assert!(feed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["published_parsed"].is_array()));

    // SIGHUP with a broken file: logged, the old configuration stays.
    fs::write(&config, "[[host]\nname = \"x\"\n").unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_until(
        Duration::from_secs(20),
        "the reload error in the log",
        || {
            fs::read_to_string(&log)
                .unwrap()
                .contains("the configuration is invalid, the old one stays in use")
        },
    );
    assert_eq!(status_json(port)["hosts"].as_array().unwrap().len(), 2);
    // A valid one with a third host: taken.
    let third = env.path("src/third");
    fs::create_dir_all(&third).unwrap();
    fs::write(third.join("g"), "more").unwrap();
    fs::write(
        &config,
        format!(
            "{base}\n[[host]]\nname = \"third\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{:?}]\nschedule = \"5s\"\n",
            third.display().to_string()
        ),
    )
    .unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    wait_until(
        Duration::from_secs(20),
        "the third host to be pulled",
        || {
            records(&state)
                .iter()
                .any(|v| v["host"] == "third" && v["status"] == "ok")
        },
    );
    assert_eq!(status_json(port)["hosts"].as_array().unwrap().len(), 3);

    // SIGTERM: a clean exit.
    let mut daemon = daemon;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let mut code = None;
    wait_until(Duration::from_secs(30), "the daemon to exit", || {
        code = daemon.0.try_wait().unwrap();
        code.is_some()
    });
    assert!(
        code.unwrap().success(),
        "{:?}\n{}",
        code,
        fs::read_to_string(&log).unwrap()
    );
}

/// Waits (at most 30 s) for a pull that started less than 0.4 s ago, and returns its
/// run id: runs here take at least the 1.5 s storage delay, so it is still running.
fn fresh_run(running_dir: &Path) -> String {
    let t = Instant::now();
    loop {
        let fresh = fs::read_dir(running_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .find(|p| {
                fs::read_to_string(p)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .is_some_and(|v| {
                        chrono::Utc::now() - time(&v["start"]) < chrono::Duration::milliseconds(400)
                    })
            });
        if let Some(m) = fresh {
            return m.file_stem().unwrap().to_string_lossy().into_owned();
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no run in flight");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_daemon_pushes_each_saved_pull_to_its_clones_and_alerts_for_a_clone_that_is_down() {
    let env = Env::new();
    let src = env.path("src/web-1");
    fs::create_dir_all(src.join("docs")).unwrap();
    for i in 0..30 {
        fs::write(
            src.join("docs").join(format!("page-{i}.html")),
            format!("<p>page {i}</p>\n").repeat(200),
        )
        .unwrap();
    }
    let standby = env.path("standby");
    fs::create_dir_all(&standby).unwrap();
    let sshd = Sshd::start_with(&env.path("sshd"), &[], &[&standby]);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // Nothing listens there: the clone is down.
    let down_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let state = env.path("state");
    let key = |k: &str| sshd.dir.join(k).display().to_string();
    let clone = |name: &str, port: u16, extra: &str| {
        format!(
            "\n[[clone]]\nname = \"{name}\"\naddress = \"127.0.0.1\"\nport = {port}\nuser = {:?}\n\
             identity = {:?}\nknown_hosts = {:?}\nsocket_dir = {:?}\nstandby_dir = {:?}\n{extra}",
            Sshd::user(),
            key("id_ed25519"),
            key("known_hosts"),
            key("sockets"),
            standby.join(name).display().to_string(),
        )
    };
    let mut config = format!(
        "[server]\nstate_dir = {:?}\nstatus_listen = \"127.0.0.1:{port}\"\n\n\
         [[host]]\nname = \"web-1\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{:?}]\nschedule = \"5s\"\n",
        state.display().to_string(),
        src.display().to_string()
    );
    config.push_str(&clone("near", sshd.port, ""));
    config.push_str(&clone("far", sshd.port, ""));
    config.push_str(&clone("down", down_port, "alert_window = \"1s\"\n"));
    let (_, _sup) = supervised_daemon(&env, &config, &[]);

    // The pull, then a push to each clone; the one that is down fails, and alerts
    // once its window has passed.
    let r = wait_records(&state, Duration::from_secs(120), |r| {
        r.iter().filter(|v| v["kind"] == "push").count() >= 3
            && r.iter().any(|v| v["kind"] == "alert")
    });
    let pull = r.iter().find(|v| v["kind"] == "pull").unwrap();
    assert_eq!(pull["status"], "ok", "{pull}");
    let push_to = |name: &str| {
        r.iter()
            .find(|v| v["kind"] == "push" && v["details"]["push"]["clone"] == name)
            .unwrap_or_else(|| panic!("no push to {name}: {r:#?}"))
    };
    for name in ["near", "far"] {
        let p = push_to(name);
        assert_eq!(p["status"], "ok", "{p}");
        assert_eq!(p["snapshot"], pull["snapshot"]);
        let copy = standby.join(name).join("web-1");
        haul_tests::assert_same_tree(&src, &copy.join(src.strip_prefix("/").unwrap()));
    }
    let down = push_to("down");
    assert_eq!(down["status"], "failed", "{down}");
    assert_eq!(down["error_kind"], "unreachable", "{down}");
    let alert = r.iter().find(|v| v["kind"] == "alert").unwrap();
    assert_eq!(alert["host"], "web-1");
    assert_eq!(alert["details"]["clone_alert"]["clone"], "down", "{alert}");
    let message = alert["error"].as_str().unwrap();
    assert!(
        message.starts_with("clone down: no successful push of web-1 since the daemon started"),
        "{message}"
    );

    // What monitors read: the push items, by a feed parser nobody here wrote.
    let feed = feedparser(&state.join("feed.xml"));
    assert_eq!(feed["bozo"], false);
    let titles: Vec<&str> = feed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["title"].as_str().unwrap())
        .collect();
    let short = &pull["snapshot"].as_str().unwrap()[..8];
    for name in ["near", "far"] {
        let want = format!("{name}: push OK — web-1 {short}, ");
        assert!(
            titles.iter().any(|t| t.starts_with(&want)),
            "{want} in {titles:#?}"
        );
    }
    assert!(
        titles
            .iter()
            .any(|t| t.starts_with(&format!("down: push FAILED — web-1 {short}, "))),
        "{titles:#?}"
    );

    // The status document and the metrics say which copy is stale.
    let status = status_json(port);
    let copies = status["clones"].as_array().unwrap();
    assert_eq!(copies.len(), 3, "{status}");
    for c in copies {
        assert_eq!(c["host"], "web-1");
        let down = c["clone"] == "down";
        assert_eq!(c["stale"], down, "{c}");
        assert_eq!(
            c["last_push"]["status"],
            if down { "failed" } else { "ok" },
            "{c}"
        );
    }
    let metrics = metrics_of(port);
    let stale = metrics["haul_clone_stale"].as_array().unwrap();
    for (clone, want) in [("near", 0.0), ("far", 0.0), ("down", 1.0)] {
        let sample = stale
            .iter()
            .find(|s| s[0]["clone"] == clone && s[0]["host"] == "web-1")
            .unwrap_or_else(|| panic!("no haul_clone_stale for {clone}: {metrics}"));
        assert_eq!(sample[1], want, "{clone}");
    }
    assert!(
        metrics["haul_clone_last_push_sent_bytes"].is_array(),
        "{metrics}"
    );
    // The status page, as Chromium renders it, lists each copy, the stale one first.
    let dom = chromium(
        &env.path("chromium"),
        &["--dump-dom", &format!("http://127.0.0.1:{port}/")],
    );
    let at = |clone: &str, word: &str| {
        dom.find(&format!(
            r#"data-clone="{clone}" data-host="web-1" data-status="{word}""#
        ))
        .unwrap_or_else(|| panic!("no {word} row for {clone}: {dom}"))
    };
    let down = at("down", "STALE");
    assert!(down < at("near", "OK") && down < at("far", "OK"), "{dom}");
}

/// Headless Chromium (Debian's `chromium`) with a profile of its own, as root needs it
/// (no sandbox); returns what it printed.
fn chromium(profile: &Path, args: &[&str]) -> String {
    let out = run_tool(
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args),
        "chromium (apt-get install chromium)",
    );
    String::from_utf8(out).unwrap()
}

/// The targets of a page's links, in order.
fn hrefs(dom: &str) -> Vec<String> {
    dom.split("href=\"")
        .skip(1)
        .filter_map(|s| s.split_once('"').map(|(h, _)| h.replace("&amp;", "&")))
        .collect()
}

#[test]
fn the_status_pages_render_in_chromium_and_every_link_resolves() {
    let env = Env::new();
    let good = env.path("src/good");
    fs::create_dir_all(&good).unwrap();
    for i in 0..5 {
        fs::write(good.join(format!("f{i}")), format!("file {i}\n").repeat(50)).unwrap();
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let state = env.path("state");
    let config = format!(
        "[server]\nstate_dir = {:?}\nstatus_listen = \"127.0.0.1:{port}\"\ncheck_schedule = \"2s\"\ncheck_read_data_period = \"6s\"\n\n[feed]\ntitle = \"fleet <&> backups\"\n\
         \n[[host]]\nname = \"good\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{:?}]\nschedule = \"3s\"\n\
         \n[[host]]\nname = \"bad\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{:?}]\nschedule = \"3s\"\n\
         \n[[notify]]\non = [\"failed\"]\ncommand = [\"/bin/sh\", \"-c\", \"echo $HAUL_HOST $HAUL_STATUS >> \\\"$0\\\"\", {:?}]\n",
        state.display().to_string(),
        good.display().to_string(),
        env.path("src/not-there").display().to_string(),
        env.path("notified").display().to_string(),
    );
    let (_config, _sup) = supervised_daemon(&env, &config, &[("HAUL_LOG_JSON", "true".into())]);
    wait_records(&state, Duration::from_secs(60), |r| {
        pulls_of(r, "good").filter(|v| v["status"] == "ok").count() >= 2
            && pulls_of(r, "bad").any(|v| v["status"] == "failed")
    });
    // With --log-json the daemon's log is JSON lines only, even what its runs say (the
    // repository its first pull created), and nothing goes to stdout.
    let sup_dir = env.path("supervisor");
    let log = fs::read_to_string(sup_dir.join("haul.err")).unwrap();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}\n{log}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    assert!(log.contains("created repository"), "{log}");
    // Scheduled checks read the packs a third at a time (a 6 s period, every 2 s), in
    // turn, each a run in the history and the feed.
    let r = wait_records(&state, Duration::from_secs(60), |r| {
        r.iter().filter(|v| v["kind"] == "check").count() >= 4
    });
    let checks: Vec<&serde_json::Value> = r.iter().filter(|v| v["kind"] == "check").collect();
    let parts: Vec<&str> = checks
        .iter()
        .map(|c| c["details"]["check"]["subset"].as_str().unwrap())
        .collect();
    assert_eq!(parts[..4], ["1/3", "2/3", "3/3", "1/3"], "{checks:#?}");
    assert!(checks.iter().all(|c| c["status"] == "ok"), "{checks:#?}");
    // Which packs a part holds is exact (see
    // `check::subset_checks_find_damage_only_in_their_part_...`); here every pull adds a pack (the metadata of the source's parents, like /tmp,
    // changes under other tests), so each check sees a different set and reads only
    // a share of what it sees.
    for c in &checks {
        let c = &c["details"]["check"];
        assert!(
            c["packs_read"].as_u64().unwrap() <= c["packs"].as_u64().unwrap(),
            "{c}"
        );
    }
    // The metrics say when the repository was last checked, and that it is sound.
    let metrics = metrics_of(port);
    let repo_sample = |family: &str| -> f64 {
        metrics[family]
            .as_array()
            .and_then(|a| a.iter().find(|s| s[0]["repository"] == "repo"))
            .unwrap_or_else(|| panic!("{family}: {metrics}"))[1]
            .as_f64()
            .unwrap()
    };
    let checked = repo_sample("haul_repository_last_check_timestamp_seconds");
    assert!(
        (chrono::Utc::now().timestamp() as f64 - checked).abs() < 120.0,
        "{metrics}"
    );
    assert_eq!(repo_sample("haul_repository_check_errors"), 0.0);
    // The daemon's notifier (called from a thread of its own) was told of the failures.
    wait_until(Duration::from_secs(20), "the notifier", || {
        fs::read_to_string(env.path("notified")).is_ok_and(|t| t.starts_with("bad failed\n"))
    });
    assert_eq!(fs::read_to_string(sup_dir.join("haul.out")).unwrap(), "");
    let bad_run = pulls_of(&r, "bad").next().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let profile = env.path("chromium");
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");

    // The overview: both hosts with their status words, the failing one first; the
    // title escaped, not taken for markup; times with their zone. Both hosts are pulled
    // every 3 s, so a row may say RUNNING: load the page again until neither does.
    let mut dom = String::new();
    for _ in 0..20 {
        dom = chromium(&profile, &["--dump-dom", &url("/")]);
        if !dom.contains(r#"data-status="RUNNING""#) {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        dom.contains("<h1>fleet &lt;&amp;&gt; backups</h1>"),
        "{dom}"
    );
    let bad_at = dom
        .find(r#"data-host="bad" data-status="FAILED""#)
        .unwrap_or_else(|| panic!("no FAILED row for bad: {dom}"));
    let good_at = dom
        .find(r#"data-host="good" data-status="OK""#)
        .unwrap_or_else(|| panic!("no OK row for good: {dom}"));
    assert!(bad_at < good_at, "the failing host is listed first: {dom}");
    assert!(dom.contains(" UTC"), "{dom}");
    assert!(dom.contains(r#"<tr class="repository" data-repository="repo">"#));

    // Every link of the pages, followed from the overview, resolves.
    let mut seen = std::collections::HashSet::new();
    let mut queue = vec!["/".to_string()];
    while let Some(p) = queue.pop() {
        if !seen.insert(p.clone()) || seen.len() > 80 {
            continue;
        }
        let (code, body) = get(port, &p);
        assert_eq!(code, 200, "{p}: {body}");
        if p == "/" || p.starts_with("/hosts/") && !p.ends_with(".xml") {
            let dom = chromium(&profile, &["--dump-dom", &url(&p)]);
            for h in hrefs(&dom) {
                assert!(h.starts_with('/'), "{p} links outside: {h}");
                queue.push(h);
            }
        }
    }
    for p in [
        "/hosts/good",
        "/hosts/bad",
        &format!("/runs/{bad_run}"),
        "/feed.xml",
    ] {
        assert!(seen.contains(p), "{p} is not linked: {seen:?}");
    }

    // A host's page: its runs and its snapshots.
    let dom = chromium(&profile, &["--dump-dom", &url("/hosts/good")]);
    assert!(
        dom.matches(r#"<tr class="run" data-status="OK">"#).count() >= 2,
        "{dom}"
    );
    assert!(
        dom.matches(r#"<tr class="snapshot">"#).count() >= 2,
        "{dom}"
    );
    // A failed run's page: its status, its error and the agent's output.
    let dom = chromium(&profile, &["--dump-dom", &url(&format!("/runs/{bad_run}"))]);
    assert!(dom.contains(r#"id="status">FAILED<"#), "{dom}");
    let error = dom
        .split(r#"<p class="error" id="error">"#)
        .nth(1)
        .expect("the error");
    assert!(error.starts_with("backup path ") && error.contains("No such file or directory"));
    assert!(
        dom.contains(r#"<pre id="output">stderr: haul-agent: backup path"#),
        "{dom}"
    );
    assert_eq!(get(port, "/runs/nothing").0, 404);
    assert_eq!(get(port, "/hosts/nobody").0, 404);

    // A screenshot of the overview, kept as the test's artifact.
    let shot = haul_tests::bin_dir().join("test-artifacts/status-page.png");
    fs::create_dir_all(shot.parent().unwrap()).unwrap();
    let _ = fs::remove_file(&shot);
    chromium(
        &profile,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,720",
            "--hide-scrollbars",
            &url("/"),
        ],
    );
    let png = fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{}",
        png.len()
    );
}

/// A network namespace of the test's own with a non-loopback address (on its `lo`),
/// deleted when dropped: a server bound there is reachable from this test only.
struct Netns {
    name: String,
    addr: &'static str,
}

impl Netns {
    fn new() -> Netns {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!(
            "haul-t{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let addr = "10.250.0.1";
        let ip = |args: &[&str]| {
            run_tool(
                Command::new("ip").args(args),
                "ip (apt-get install iproute2)",
            );
        };
        ip(&["netns", "add", &name]);
        let ns = Netns { name, addr };
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            "lo",
        ]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// `GET path` with an optional `Authorization` header, from inside the
    /// namespace: (status, headers, body).
    fn get(&self, port: u16, path: &str, auth: Option<&str>) -> (u16, String, String) {
        let ns = fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        let (addr, path, auth) = (self.addr, path.to_string(), auth.map(String::from));
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            use std::os::fd::AsRawFd;
            // This thread alone enters the namespace.
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let mut s = std::net::TcpStream::connect((addr, port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
            )
            .unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            (
                head[9..12].parse().unwrap(),
                head.to_string(),
                body.to_string(),
            )
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn a_status_server_off_loopback_requires_credentials() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "data\n").unwrap();
    let ns = Netns::new();
    let port = 9470;
    let state = env.path("state");
    let config = |creds: &str| {
        format!(
            "[server]\nstate_dir = {:?}\nstatus_listen = \"{}:{port}\"\n{creds}\
             \n[[host]]\nname = \"web-1\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{:?}]\nschedule = \"1h\"\n",
            state.display().to_string(),
            ns.addr,
            src.display().to_string(),
        )
    };
    let file = env.path("pbs.toml");
    // Without credentials, such a configuration is refused, saying what to do.
    fs::write(&file, config("")).unwrap();
    let check = env.pbs(&["--config", file.to_str().unwrap(), "config", "check"]);
    assert_ne!(check.code, 0);
    assert!(
        check.stderr.contains(&format!(
            "server.status_listen: {}:{port} is not a loopback address: set [server].status_credentials",
            ns.addr
        )),
        "{}",
        check.stderr
    );

    // Credentials made by the pbs: a user with a password, and a token.
    let user = env.pbs_with(
        &["status-credentials", "alice"],
        &[("HAUL_STATUS_PASSWORD", "correct horse")],
    );
    assert_eq!(user.code, 0, "{}", user.stderr);
    assert!(
        user.stdout.starts_with("alice:$argon2id$"),
        "{}",
        user.stdout
    );
    let token = env.pbs(&["status-credentials", "--token"]);
    assert_eq!(token.code, 0, "{}", token.stderr);
    assert!(
        token.stdout.starts_with("bearer:blake3:"),
        "{}",
        token.stdout
    );
    let secret = token.stderr.trim().rsplit(' ').next().unwrap().to_string();
    assert_eq!(secret.len(), 64, "{}", token.stderr);
    assert!(
        !token.stdout.contains(&secret),
        "the token itself is not stored"
    );
    let creds = env.path("status-credentials");
    fs::write(&creds, format!("{}{}", user.stdout, token.stdout)).unwrap();
    fs::write(
        &file,
        config(&format!(
            "status_credentials = {:?}\n",
            creds.display().to_string()
        )),
    )
    .unwrap();
    let check = env.pbs(&["--config", file.to_str().unwrap(), "config", "check"]);
    assert_eq!(check.code, 0, "{}", check.stderr);

    // systemd's readiness protocol: a datagram socket named in $NOTIFY_SOCKET.
    let notify_path = env.path("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut daemon = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(bin("haul-pbs"))
        .arg("--config")
        .arg(&file)
        .arg("daemon")
        .env("HAUL_AGENT", bin("haul-agent"))
        .env("HAUL_CACHE_DIR", env.path("cache"))
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(env.path("daemon.err")).unwrap())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut daemon);
    // Ready once the status server listens, as Type=notify units expect.
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 on $NOTIFY_SOCKET");
    assert_eq!(&buf[..n], b"READY=1\n");
    let log = fs::read_to_string(env.path("daemon.err")).unwrap_or_default();
    assert!(log.contains("status server listening"), "{log}");

    // No credentials, wrong ones, a token used as a password: 401 with a challenge.
    for auth in [
        None,
        Some(basic("alice", "wrong")),
        Some(basic("bob", "correct horse")),
        Some(basic("bearer", &secret)),
        Some("Bearer 0000".to_string()),
    ] {
        for path in ["/", "/metrics", "/feed.xml", "/status.json", "/hosts/web-1"] {
            let (code, head, body) = ns.get(port, path, auth.as_deref());
            assert_eq!(code, 401, "{path} with {auth:?}: {body}");
            assert!(
                head.contains("www-authenticate: Basic realm=\"haul\""),
                "{head}"
            );
            assert!(!body.contains("web-1"), "{body}");
        }
    }
    // The user's password, and the token, let them in.
    let (code, _, body) = ns.get(port, "/", Some(&basic("alice", "correct horse")));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#"data-host="web-1""#), "{body}");
    let (code, _, body) = ns.get(port, "/metrics", Some(&format!("Bearer {secret}")));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("haul_host_stale{host=\"web-1\"}"), "{body}");
}

/// An HTTP Basic `Authorization` value.
fn basic(user: &str, pass: &str) -> String {
    use base64ct::Encoding;
    format!(
        "Basic {}",
        base64ct::Base64::encode_string(format!("{user}:{pass}").as_bytes())
    )
}

/// `[[copy]]`: the daemon copies a host's snapshots into another repository (with a
/// key of its own) on schedule, each copy a run of the host in the history and the
/// feed; a copy whose target is not there fails, recorded, and the other goes on.
#[test]
fn the_daemon_copies_each_host_into_another_repository_on_schedule() {
    let env = Env::new();
    let src = env.path("src/web");
    fs::create_dir_all(&src).unwrap();
    for i in 0..20 {
        fs::write(
            src.join(format!("f{i}")),
            haul_tests::random_bytes(i, 40_000),
        )
        .unwrap();
    }
    // The off-site repository: made beforehand, with a passphrase of its own.
    let offsite = env.path("offsite");
    let pass = env.path("offsite.pass");
    fs::write(&pass, "the off-site passphrase\n").unwrap();
    let offsite_pbs = |args: &[&str]| {
        let out = Command::new(bin("haul-pbs"))
            .arg("--repo")
            .arg(&offsite)
            .arg("--password-file")
            .arg(&pass)
            .args(args)
            .env("HAUL_CONFIG", "/dev/null")
            .env("HAUL_STATE_DIR", env.path("offsite-state"))
            .output()
            .unwrap();
        haul_tests::Run::from_output(out)
    };
    offsite_pbs(&["init"]).expect(0);
    // And another pbs, behind a real sshd, receiving into a repository of its own.
    let far = Env::new();
    far.init();
    let far_sshd = haul_tests::Sshd::receiving(
        &env.path("sshd"),
        (&far.repo(), &far.path("pass")),
        (&far.path("state"), &far.path("cache")),
        "--host web",
        "",
    );
    let state = env.path("state");
    let config = format!(
        "[server]\nstate_dir = {state:?}\n\n\
         [[host]]\nname = \"web\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{src:?}]\nschedule = \"2s\"\n\n\
         [[copy]]\nname = \"offsite\"\nto = {offsite:?}\npassword_file = {pass:?}\nschedule = \"2s\"\n\n\
         [[copy]]\nname = \"far\"\nto = \"pbs:far\"\nschedule = \"2s\"\n\n\
         [[copy]]\nname = \"gone\"\nto = {:?}\npassword_file = {pass:?}\nschedule = \"1h\"\n\n{}",
        env.path("not-there").display().to_string(),
        far_sshd.remote_config("far"),
    );
    let (_config, _sup) = supervised_daemon(&env, &config, &[]);
    let copies_of = |r: &[serde_json::Value], job: &str| -> Vec<serde_json::Value> {
        r.iter()
            .filter(|v| {
                v["kind"] == "copy"
                    && (v["details"]["copy"]["copy"] == job
                        || v["error"]
                            .as_str()
                            .is_some_and(|e| e.starts_with(&format!("copy {job}: "))))
            })
            .cloned()
            .collect()
    };
    let r = wait_records(&state, Duration::from_secs(90), |r| {
        pulls_of(r, "web").filter(|v| v["status"] == "ok").count() >= 2
            && copies_of(r, "offsite")
                .iter()
                .filter(|c| {
                    c["status"] == "ok" && c["details"]["copy"]["copied"].as_u64() > Some(0)
                })
                .count()
                >= 2
            && copies_of(r, "far")
                .iter()
                .any(|c| c["status"] == "ok" && c["details"]["copy"]["copied"].as_u64() > Some(0))
            && !copies_of(r, "gone").is_empty()
    });
    // The other pbs got the host's snapshots over SSH, each with its original's tree.
    let far_copies: Vec<serde_json::Value> = far
        .pbs(&["--json", "snapshots"])
        .expect(0)
        .json()
        .into_iter()
        .filter(|v| v["type"] == "snapshot")
        .collect();
    assert!(!far_copies.is_empty());
    assert!(far_copies
        .iter()
        .all(|c| c["host"] == "web" && c["original"].is_string()));
    let newest = far_copies.last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let restored = env.path("far-restored");
    far.pbs(&["restore", &newest, "--target", restored.to_str().unwrap()])
        .expect(0);
    haul_tests::assert_same_tree(&src, &restored.join(src.strip_prefix("/").unwrap()));
    far.pbs(&["check", "--read-data"]).expect(0);
    let ok = copies_of(&r, "offsite");
    assert!(
        ok.iter().all(|c| c["host"] == "web" && c["status"] == "ok"),
        "{ok:#?}"
    );
    let gone = &copies_of(&r, "gone")[0];
    assert_eq!(gone["status"], "failed");
    assert!(
        gone["error"]
            .as_str()
            .unwrap()
            .contains("no haul repository at"),
        "{gone:#}"
    );
    // Every copied snapshot is one of the host's, by its original id; the newest
    // restores to the source.
    let copies: Vec<serde_json::Value> = offsite_pbs(&["--json", "snapshots"])
        .expect(0)
        .json()
        .into_iter()
        .filter(|v| v["type"] == "snapshot")
        .collect();
    assert!(copies.len() >= 2, "{copies:#?}");
    // The daemon goes on pulling and copying (a pull's snapshot can be copied just
    // before the pull is recorded): the records are read until they name them all.
    let originals = || -> Vec<String> {
        pulls_of(&haul_tests::pull_records(&state), "web")
            .filter_map(|p| p["snapshot"].as_str().map(String::from))
            .collect()
    };
    let known = |original: &str| {
        originals()
            .iter()
            .any(|o| original.starts_with(o.as_str()) || o.starts_with(original))
    };
    for c in &copies {
        assert_eq!(c["host"], "web");
        let original = c["original"].as_str().unwrap();
        let what = format!("a pull of web recorded as having made {original}");
        haul_tests::wait_until(Duration::from_secs(30), &what, || known(original));
    }
    let target = env.path("restored");
    offsite_pbs(&["restore", "latest", "--target", target.to_str().unwrap()]).expect(0);
    haul_tests::assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));
    // The feed tells of the copies.
    let feed = fs::read_to_string(state.join("feed.xml")).unwrap();
    assert!(feed.contains("snapshot(s) copied to offsite"), "{feed}");
}
