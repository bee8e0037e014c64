//! `[[notify]]`: healthchecks-style pings, JSON posts and commands at the end of each
//! run, against a local HTTP server the test starts (Python's http.server); failing
//! notifiers are logged and change nothing.

use haul_tests::{Env, KillOnDrop};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// Python's http.server, logging each request as a JSON line (method, path, headers,
/// body) to `log`; `/broken` answers 500, everything else 200.
fn http_server(env: &Env, log: &Path) -> (u16, KillOnDrop) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let script = r#"
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
log = open(sys.argv[2], "a")
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        log.write(json.dumps({"method": "POST", "path": self.path, "type": self.headers.get("Content-Type"),
                              "agent": self.headers.get("User-Agent"), "body": body}) + "\n")
        log.flush()
        self.send_response(500 if self.path == "/broken" else 200)
        self.end_headers()
        self.wfile.write(b"OK")
    def log_message(self, *a):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
    let file = env.path("server.py");
    fs::write(&file, script).unwrap();
    let child = std::process::Command::new("/usr/bin/python3")
        .arg(&file)
        .arg(port.to_string())
        .arg(log)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the HTTP server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (port, KillOnDrop(child))
}

#[test]
fn notifiers_ping_post_and_run_commands_filtered_and_a_failing_one_changes_nothing() {
    let (env, good) = Env::with_source();
    fs::write(good.join("f"), "data\n").unwrap();
    let log = env.path("requests.jsonl");
    let (port, _server) = http_server(&env, &log);
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let out = env.path("notified");
    let config = env.path("pbs.toml");
    fs::write(
        &config,
        format!(
            "[server]\nstate_dir = {state:?}\n\n\
             [[host]]\nname = \"good\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{good:?}]\n\n\
             [[host]]\nname = \"bad\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{bad:?}]\n\n\
             [[notify]]\nname = \"hc\"\nurl = \"http://127.0.0.1:{port}/ping/{{host}}\"\n\n\
             [[notify]]\nname = \"hook\"\nurl = \"http://127.0.0.1:{port}/hook\"\nformat = \"json\"\non = [\"failed\"]\n\n\
             [[notify]]\nname = \"script\"\nkinds = [\"pull\"]\n\
             command = [\"/bin/sh\", \"-c\", \"env | grep ^HAUL_ | sort > \\\"$0.$HAUL_HOST\\\"; cat > \\\"$0.$HAUL_HOST.json\\\"\", {out:?}]\n\n\
             [[notify]]\nname = \"down\"\nurl = \"http://user:pw@127.0.0.1:{dead}/secret-key\"\nhosts = [\"good\"]\n\n\
             [[notify]]\nname = \"broken\"\nurl = \"http://127.0.0.1:{port}/broken\"\nformat = \"json\"\nhosts = [\"good\"]\n\n\
             [[notify]]\nname = \"slow\"\ncommand = [\"/bin/sleep\", \"30\"]\ntimeout = \"1s\"\nhosts = [\"good\"]\n\n\
             [[notify]]\nname = \"never\"\nurl = \"http://127.0.0.1:{port}/never\"\nkinds = [\"prune\"]\n",
            state = env.path("state").display().to_string(),
            good = good.display().to_string(),
            bad = env.path("not-there").display().to_string(),
            out = out.display().to_string(),
        ),
    )
    .unwrap();
    let c = config.display().to_string();
    let t = Instant::now();
    let run = env.pbs_with(&["pull", "--all", "--config", &c], &[("HAUL_LOG", "warn")]);
    // The failed host fails the command, as without notifiers; the slow one is cut.
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    let records: Vec<serde_json::Value> = fs::read_to_string(env.path("state/runs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let status = |h: &str| records.iter().find(|r| r["host"] == h).unwrap()["status"].clone();
    assert_eq!(status("good"), "ok");
    assert_eq!(status("bad"), "failed");

    // Failing notifiers are logged by name, with why.
    for (name, why) in [
        ("down", format!("POST to http://127.0.0.1:{dead}: ")),
        ("broken", "500".to_string()),
        ("slow", "still running after 1s, killed".to_string()),
    ] {
        assert!(
            run.stderr
                .lines()
                .any(|l| l.contains(&format!("notifier={name}")) && l.contains(&why)),
            "{name}: {why} not logged:\n{}",
            run.stderr
        );
    }
    assert!(
        !run.stderr.contains('\u{1b}'),
        "colour codes in a log that is not a terminal"
    );

    // Healthchecks-style: success to the URL, failure to URL/fail, with the summary.
    let requests: Vec<serde_json::Value> = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let to = |path: &str| {
        requests
            .iter()
            .filter(|r| r["path"] == path)
            .collect::<Vec<_>>()
    };
    let ok = to("/ping/good");
    assert_eq!(ok.len(), 1, "{requests:#?}");
    assert!(
        ok[0]["body"]
            .as_str()
            .unwrap()
            .starts_with("good pull OK: 1 files"),
        "{ok:?}"
    );
    assert!(ok[0]["agent"].as_str().unwrap().starts_with("haul-pbs/"));
    let fail = to("/ping/bad/fail");
    assert_eq!(fail.len(), 1, "{requests:#?}");
    assert!(fail[0]["body"]
        .as_str()
        .unwrap()
        .contains("bad pull FAILED: backup path"));
    // The JSON hook only for the failure; the prune-only one never.
    let hook = to("/hook");
    assert_eq!(hook.len(), 1, "{requests:#?}");
    assert_eq!(hook[0]["type"], "application/json");
    let event: serde_json::Value = serde_json::from_str(hook[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(event["type"], "run");
    assert_eq!(event["host"], "bad");
    assert_eq!(event["kind"], "pull");
    assert_eq!(event["status"], "failed");
    let id = event["id"].as_str().unwrap();
    assert_eq!(
        records.iter().find(|r| r["host"] == "bad").unwrap()["id"],
        id
    );
    assert_eq!(event["url"], format!("http://127.0.0.1:9470/runs/{id}"));
    assert!(event["error"].as_str().unwrap().contains("No such file"));
    assert_eq!(to("/broken").len(), 1);
    assert!(to("/never").is_empty());

    // The command got the run in its environment and as JSON on its input.
    let env_of = |h: &str| fs::read_to_string(format!("{}.{h}", out.display())).unwrap();
    let g = env_of("good");
    assert!(
        g.contains("HAUL_HOST=good\n") && g.contains("HAUL_STATUS=ok\n"),
        "{g}"
    );
    assert!(
        g.contains("HAUL_KIND=pull\n") && g.contains("HAUL_SNAPSHOT="),
        "{g}"
    );
    let b = env_of("bad");
    assert!(
        b.contains("HAUL_STATUS=failed\n") && b.contains("HAUL_ERROR=backup path"),
        "{b}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(format!("{}.good.json", out.display())).unwrap())
            .unwrap();
    assert_eq!(j["status"], "ok");
    assert_eq!(
        j["snapshot"],
        records.iter().find(|r| r["host"] == "good").unwrap()["snapshot"]
    );
}

#[test]
fn a_notifier_that_is_neither_url_nor_command_is_refused_with_its_place() {
    let env = Env::new();
    let config = env.path("pbs.toml");
    for (text, want) in [
        (
            "[[notify]]\non = [\"failed\"]\n",
            "pbs.toml:2:1: notify[0]: give either url or command",
        ),
        (
            "[[notify]]\nurl = \"ftp://x\"\n",
            "notify[0].url: \"ftp://x\" is not an http:// or https:// URL",
        ),
        (
            "[[notify]]\nurl = \"http://x\"\nkinds = [\"pul\"]\n",
            "notify[0].kinds: \"pul\" is not a kind of run",
        ),
        (
            "[[notify]]\nurl = \"http://x\"\non = [\"bad\"]\n",
            "pbs.toml:3:7: notify[0].on[0]: unknown variant `bad`, expected one of `ok`, `warning`, `failed`",
        ),
    ] {
        fs::write(&config, text).unwrap();
        let r = env.pbs(&["config", "check", "--config", config.to_str().unwrap()]);
        assert_eq!(r.code, 2, "{text}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{text}: {}", r.stderr);
    }
}
