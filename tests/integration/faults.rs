//! A faulty world: files that change while they are read, processes killed at the
//! moments that matter, connections cut. Every snapshot must restore, and every run
//! must be recorded for what it was.

use haul_tests::*;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `pull --local PATH` with `--json`; returns the run and its record.
fn pull_local(env: &Env, src: &Path) -> (Run, serde_json::Value) {
    let s = src.display().to_string();
    let state = env.path("state").display().to_string();
    let run = env.pbs(&["--json", "pull", "--local", &s, "--state-dir", &state]);
    let record = run
        .json()
        .into_iter()
        .find(|v| v["type"] == "run")
        .unwrap_or_else(|| panic!("no run record in:\n{}\n{}", run.stdout, run.stderr))["run"]
        .clone();
    (run, record)
}

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
        let (run, rec) = pull_local(&env, &src);
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
