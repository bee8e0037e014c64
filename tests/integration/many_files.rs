//! Hosts with many files: the pbs's memory stays flat as the number of files grows.
//!
//! The pbs runs with its data segment capped (`RLIMIT_DATA`, as `ulimit -d` sets it:
//! the heap and every private writable mapping, which is where anything kept per file
//! or per blob would live). A pbs that kept sets of every blob id of a pull, as it did
//! before, needs well over the cap for this tree, and is killed by its allocator.

use haul_tests::{assert_same_tree, bin, Env, Run};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Files in the tree.
const FILES: usize = 200_000;
/// Files a directory holds.
const PER_DIR: usize = 500;
/// The cap on the pbs's data segment. With these 200,000 files the pbs needs between
/// 40 and 48 MiB of it (its index grows by 56 bytes per new blob, 11 MiB here; thread
/// stacks and buffers are most of the rest); before its per-session sets were bounded
/// it needed between 96 and 112 MiB (measured on this tree with the debug build).
const CAP_MIB: u64 = 56;

/// 200,000 files of 40 to 295 bytes, each different, 500 to a directory.
fn generate(root: &Path) {
    for d in 0..FILES / PER_DIR {
        let dir = root.join(format!("d{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..PER_DIR {
            let n = d * PER_DIR + f;
            let body = format!("file {n} of the many-file tree\n").repeat(1 + n % 8);
            fs::write(dir.join(format!("f{f:03}")), body).unwrap();
        }
    }
}

/// `haul-pbs ARGS` on the repository the pbs manages in `state` (created by the first
/// pull, its key a generated secret), its data segment capped at [`CAP_MIB`] (the soft
/// limit: the agent it starts, through a script that lifts it, is not capped).
fn capped(env: &Env, args: &[&str]) -> Run {
    let agent = env.path("agent.sh");
    if !agent.exists() {
        let script = format!(
            "#!/bin/sh\nulimit -d unlimited\nexec {} \"$@\"\n",
            bin("haul-agent").display()
        );
        fs::write(&agent, script).unwrap();
        fs::set_permissions(&agent, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut cmd = Command::new(bin("haul-pbs"));
    cmd.arg("--state-dir")
        .arg(env.path("state"))
        .args(args)
        .env("HAUL_CONFIG", "/dev/null")
        .env("HAUL_CACHE_DIR", env.path("cache"))
        .env("HAUL_AGENT", &agent)
        .stdin(std::process::Stdio::null());
    let cap = CAP_MIB << 20;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: cap,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Run::from_output(cmd.output().expect("run haul-pbs"))
}

/// `haul-pbs restore latest --via-agent ARGS --target TARGET`, capped; it must succeed.
fn restore_via_agent(env: &Env, target: &Path, args: &[&str]) {
    let target = target.display().to_string();
    let mut all = vec!["restore", "latest", "--via-agent", "--target", &target];
    all.extend_from_slice(args);
    let restore = capped(env, &all);
    assert_eq!(restore.code, 0, "{}\n{}", restore.stdout, restore.stderr);
}

#[test]
fn a_pull_of_200000_files_fits_in_a_capped_pbs_and_restores() {
    let env = Env::new();
    let src = env.path("src");
    generate(&src);
    let local = src.display().to_string();
    let pull = || {
        let run = capped(&env, &["--json", "pull", "--local", &local]);
        assert_eq!(
            run.code, 0,
            "a pull under a {CAP_MIB} MiB data cap failed:\n{}\n{}",
            run.stdout, run.stderr
        );
        run.json_of("run")["run"].clone()
    };
    let full = pull();
    assert_eq!(full["status"], "ok", "{full}");
    assert_eq!(full["counters"]["files_new"], FILES as u64, "{full}");
    // Unchanged: every file is found in the parent, nothing is read again.
    let again = pull();
    assert_eq!(
        again["counters"]["files_unchanged"], FILES as u64,
        "{again}"
    );
    assert_eq!(again["counters"]["files_new"], 0, "{again}");

    // `ls` streams the listing: every file, under the same cap.
    let ls = capped(&env, &["ls", "--long", "latest"]).expect(0);
    let listed = ls.stdout.lines().filter(|l| l.starts_with('-')).count();
    assert_eq!(listed, FILES, "files listed");

    // A restore through the agent (the read-only server keeps a bit per blob of the
    // snapshot it may stream, not sets of ids), compared in bytes and metadata.
    let target = env.path("restored");
    restore_via_agent(&env, &target, &[]);
    assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));

    // A check of the whole repository, data included, under the cap too.
    capped(&env, &["check", "--read-data"]).expect(0);
}

/// Files in the one large directory: paged (more than `PAGE_MAX`, 16,384, nodes).
const FLAT: usize = 60_000;

/// Tree bytes a pull stored: what it added less file content.
fn tree_bytes(run: &serde_json::Value) -> u64 {
    run["counters"]["bytes_new"].as_u64().unwrap() - run["counters"]["data_new"].as_u64().unwrap()
}

#[test]
fn a_directory_of_60000_files_is_stored_in_pages_and_a_change_writes_few_of_them() {
    let env = Env::new();
    let src = env.path("src");
    let flat = src.join("flat");
    fs::create_dir_all(&flat).unwrap();
    for n in 0..FLAT {
        fs::write(flat.join(format!("m{n:05}")), format!("mail {n}\n")).unwrap();
    }
    let local = src.display().to_string();
    let pull = || {
        let run = capped(&env, &["--json", "pull", "--local", &local]);
        assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
        run.json_of("run")["run"].clone()
    };
    let full = pull();
    assert_eq!(full["counters"]["files_new"], FLAT as u64, "{full}");

    // One file changed, one added before all the others: one page each, not every
    // page after the insertion, plus the index and the directories above.
    fs::write(flat.join("m31000"), "changed\n").unwrap();
    fs::write(flat.join("a-new"), "new\n").unwrap();
    let again = pull();
    assert_eq!(
        again["counters"]["files_unchanged"],
        FLAT as u64 - 1,
        "{again}"
    );
    assert_eq!(again["counters"]["files_changed"], 1, "{again}");
    assert_eq!(again["counters"]["files_new"], 1, "{again}");
    // New: two chunks, two pages, and the trees of the directories from the root
    // down to this one (its own is its page index).
    let trees = flat.components().count() as u64;
    assert_eq!(again["counters"]["blobs_new"], 2 + 2 + trees, "{again}");
    assert!(
        tree_bytes(&again) * 2 < tree_bytes(&full),
        "a change to two entries stored {} bytes of trees, the whole listing {}",
        tree_bytes(&again),
        tree_bytes(&full)
    );

    // `ls` walks every page in order.
    let ls = capped(
        &env,
        &[
            "ls",
            "--long",
            "latest",
            "--no-recursive",
            &flat.display().to_string(),
        ],
    )
    .expect(0);
    let listed: Vec<&str> = ls.stdout.lines().filter(|l| l.starts_with('-')).collect();
    assert_eq!(listed.len(), FLAT + 1);
    assert!(listed[0].ends_with("/flat/a-new"), "{}", listed[0]);
    assert!(listed[FLAT].ends_with("/flat/m59999"), "{}", listed[FLAT]);

    // Restored whole through the agent, bytes and metadata compared.
    let target = env.path("restored");
    restore_via_agent(&env, &target, &[]);
    assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));

    // One file of the directory, reached through the one page that holds it.
    let one = env.path("one");
    let path = flat.join("m31000").display().to_string();
    restore_via_agent(&env, &one, &["--include", &path]);
    let got = one.join(flat.strip_prefix("/").unwrap());
    assert_eq!(fs::read_dir(&got).unwrap().count(), 1);
    assert_eq!(fs::read(got.join("m31000")).unwrap(), b"changed\n");

    capped(&env, &["check", "--read-data"]).expect(0);
}
