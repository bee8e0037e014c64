//! Backup and restore of every kind of file, compared byte for byte and metadata for
//! metadata.

use haul_tests::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

#[test]
fn every_file_kind_round_trips() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    make_fixture(&src);
    let summary = env.backup(&[&src], &["--tag", "first"]);
    assert_eq!(summary["warnings"], 0);
    assert!(summary["files_new"].as_u64().unwrap() >= 12, "{summary}");

    let target = env.path("restored");
    let run = env
        .pbs(&[
            "--json",
            "restore",
            "latest",
            "--target",
            target.to_str().unwrap(),
        ])
        .expect(0);
    let restored = target.join(src.strip_prefix("/").unwrap());
    assert_same_tree(&src, &restored);

    // The sparse file came back sparse: its 20 MiB hold 100 kB of data.
    let sparse = restored.join("sparse.img");
    assert_eq!(fs::metadata(&sparse).unwrap().len(), 20 * 1024 * 1024);
    assert!(
        allocated(&sparse) < 2 * 1024 * 1024,
        "sparse file allocated {} bytes",
        allocated(&sparse)
    );
    assert_eq!(run.json_of("summary")["warnings"], 0);
    // A fully allocated file with a long zero run came back fully allocated.
    let wal = restored.join("prealloc.wal");
    assert!(
        allocated(&wal) >= fs::metadata(&wal).unwrap().len(),
        "prealloc.wal came back with holes: {} bytes allocated",
        allocated(&wal)
    );
    // The file capability survived the owner being set (assert_same_tree compared
    // every xattr; this names the one chown clears).
    if is_root() {
        let caps = run_tool(
            std::process::Command::new("getcap").arg(restored.join("capable")),
            "getcap",
        );
        assert!(
            String::from_utf8_lossy(&caps).contains("cap_net_raw=ep"),
            "{}",
            String::from_utf8_lossy(&caps)
        );
    }
}

#[test]
fn restore_of_an_include_brings_only_that_path() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    make_fixture(&src);
    env.backup(&[&src], &[]);
    let target = env.path("part");
    let include = src.join("dir/sub");
    env.restore(&target, &[&include]).expect(0);
    let restored = target.join(src.strip_prefix("/").unwrap());
    assert_same_tree(&src.join("dir/sub"), &restored.join("dir/sub"));
    assert!(!restored.join("small.txt").exists());
    assert!(!restored.join("dir/text.txt").exists());

    // An include that is not in the snapshot is an error, and writes nothing.
    let nowhere = env.path("nowhere");
    let run = env
        .pbs(&[
            "restore",
            "latest",
            "--target",
            nowhere.to_str().unwrap(),
            "--include",
            "/no/such/path",
        ])
        .expect(2);
    assert!(
        run.stderr
            .contains("include path \"no/such/path\" is not in the snapshot"),
        "{}",
        run.stderr
    );
    assert!(!nowhere.exists());
}

#[test]
fn restore_refuses_a_non_empty_target_and_leaves_it_alone() {
    let (env, src) = Env::with_source();
    fs::write(src.join("f"), b"data").unwrap();
    env.backup(&[&src], &[]);
    let target = env.path("busy");
    fs::create_dir_all(&target).unwrap();
    fs::write(target.join("keep-me"), b"precious").unwrap();
    let run = env.restore(&target, &[]).expect(2);
    assert!(
        run.stderr.contains("exists and is not an empty directory"),
        "{}",
        run.stderr
    );
    assert_eq!(fs::read(target.join("keep-me")).unwrap(), b"precious");
    // An empty directory is fine, and keeps its own mode (the restore is staged in a
    // directory only its user can enter, swapped in when complete).
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let empty = env.path("empty-target");
    fs::create_dir_all(&empty).unwrap();
    fs::set_permissions(&empty, fs::Permissions::from_mode(0o751)).unwrap();
    env.restore(&empty, &[]).expect(0);
    assert_eq!(
        fs::read(empty.join(src.strip_prefix("/").unwrap()).join("f")).unwrap(),
        b"data"
    );
    assert_eq!(mode(&empty), 0o751);
    // A new target gets a new directory's mode under the umask (the restorer inherits
    // this process's).
    let umask = fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
        .unwrap();
    let fresh = env.path("fresh-target");
    env.restore(&fresh, &[]).expect(0);
    assert_eq!(mode(&fresh), 0o777 & !umask);
}

/// (inode, ctime) of every regular file below `root` with one link, by path.
fn file_identities(root: &std::path::Path) -> std::collections::BTreeMap<PathBuf, (u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    walk_files(root)
        .into_iter()
        .filter_map(|p| {
            let m = fs::symlink_metadata(&p).unwrap();
            (m.is_file() && m.nlink() == 1).then(|| (p, (m.ino(), m.ctime(), m.ctime_nsec())))
        })
        .collect()
}

#[test]
fn restore_over_a_directory_rewrites_only_what_differs() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    make_fixture(&src);
    let snap = env.backup(&[&src], &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let target = env.path("target");
    env.restore(&target, &[]).expect(0);
    let restored = target.join(src.strip_prefix("/").unwrap());
    let before = file_identities(&target);
    // The target drifts: content, mode, a deleted file, a changed link, a directory
    // where a file was, and a file of its own.
    fs::write(restored.join("dir/text.txt"), "edited\n").unwrap();
    fs::set_permissions(restored.join("shared"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(restored.join("dir/sub/deeper/mid.bin")).unwrap();
    fs::remove_file(restored.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("elsewhere", restored.join("rel-link")).unwrap();
    fs::remove_file(restored.join("empty")).unwrap();
    fs::create_dir(restored.join("empty")).unwrap();
    fs::write(restored.join("empty/inside"), "x").unwrap();
    fs::write(restored.join("mine.txt"), "not in the snapshot").unwrap();
    let drifted: Vec<PathBuf> = ["dir/text.txt", "shared", "dir/sub/deeper/mid.bin", "empty"]
        .iter()
        .map(|p| restored.join(p))
        .collect();

    // Without --overwrite the directory is refused, and the message says what to add.
    let run = env.restore(&target, &[]).expect(2);
    assert!(
        run.stderr.contains("--overwrite if-changed"),
        "{}",
        run.stderr
    );

    // if-changed: the snapshot is back, the directory's own file stays, and every
    // file that did not drift is the same inode, never written (its ctime unchanged).
    let overwrite = |mode: &str| {
        env.pbs(&[
            "--json",
            "restore",
            &snap,
            "--target",
            target.to_str().unwrap(),
            "--overwrite",
            mode,
        ])
    };
    let summary = overwrite("if-changed").expect(0).json_of("summary");
    assert_eq!(
        fs::read(restored.join("mine.txt")).unwrap(),
        b"not in the snapshot"
    );
    fs::remove_file(restored.join("mine.txt")).unwrap();
    assert_same_tree(&src, &restored);
    let after = file_identities(&target);
    let mut kept = 0;
    for (path, id) in &before {
        if drifted.contains(path) {
            continue;
        }
        assert_eq!(after.get(path), Some(id), "{} was touched", path.display());
        kept += 1;
    }
    assert_eq!(kept, before.len() - drifted.len());
    assert_eq!(summary["unchanged"], kept, "{summary}");
    // What drifted was written again.
    assert_ne!(
        after[&restored.join("dir/text.txt")],
        before[&restored.join("dir/text.txt")]
    );
    assert_eq!(
        fs::read_dir(env.path(""))
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("haul-staging"))
            .count(),
        0
    );

    // never: what exists stays as it is (even when it differs); what is missing comes back.
    fs::write(restored.join("small.txt"), "mine now").unwrap();
    fs::remove_file(restored.join("dir/sub/big.bin")).unwrap();
    overwrite("never").expect(0);
    assert_eq!(fs::read(restored.join("small.txt")).unwrap(), b"mine now");
    assert_eq!(
        fs::read(restored.join("dir/sub/big.bin")).unwrap(),
        fs::read(src.join("dir/sub/big.bin")).unwrap()
    );

    // A directory of the target swapped for a link to elsewhere: the restore puts the
    // directory back and writes nothing through the link.
    let elsewhere = env.path("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    fs::write(elsewhere.join("text.txt"), "not the target's").unwrap();
    fs::rename(restored.join("dir"), env.path("dir-moved")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, restored.join("dir")).unwrap();
    overwrite("if-changed").expect(0);
    assert_eq!(
        fs::read(elsewhere.join("text.txt")).unwrap(),
        b"not the target's"
    );
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 1);
    assert!(fs::symlink_metadata(restored.join("dir")).unwrap().is_dir());

    // always: every file is written again, and the tree is the snapshot's.
    let before = file_identities(&target);
    overwrite("always").expect(0);
    assert_same_tree(&src, &restored);
    let after = file_identities(&target);
    for (path, (ino, ..)) in &before {
        assert_ne!(
            after[path].0,
            *ino,
            "{} was not written again",
            path.display()
        );
    }

    // Not through an agent yet: refused by name.
    let run = env
        .pbs(&[
            "restore",
            &snap,
            "--target",
            target.to_str().unwrap(),
            "--overwrite",
            "always",
            "--via-agent",
        ])
        .expect(2);
    assert!(run.stderr.contains("--via-agent"), "{}", run.stderr);
}

#[test]
fn unchanged_files_are_not_read_again_and_changes_are_seen() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    make_fixture(&src);
    let first = env.backup(&[&src], &[]);
    let second = env.backup(&[&src], &[]);
    assert_eq!(second["bytes_read"], 0, "{second}");
    assert_eq!(second["files_new"], 0);
    assert_eq!(second["files_changed"], 0);
    assert_eq!(second["files_unchanged"], first["files_new"]);
    assert_eq!(
        second["parent"],
        serde_json::Value::String(first["snapshot"].as_str().unwrap()[..8].to_string())
    );

    append(&src.join("dir/text.txt"), "one more line\n");
    fs::write(src.join("new-file"), b"brand new").unwrap();
    let third = env.backup(&[&src], &[]);
    assert_eq!(third["files_changed"], 1, "{third}");
    assert_eq!(third["files_new"], 1);
    let target = env.path("restored");
    env.restore(&target, &[]).expect(0);
    assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));

    // The first snapshot still restores to the first state.
    let snaps = env.pbs(&["--json", "snapshots"]).expect(0).json();
    assert_eq!(snaps.len(), 3);
    let old = env.path("old");
    env.pbs(&[
        "restore",
        snaps[0]["short_id"].as_str().unwrap(),
        "--target",
        old.to_str().unwrap(),
    ])
    .expect(0);
    let old_src = old.join(src.strip_prefix("/").unwrap());
    assert!(!old_src.join("new-file").exists());
    assert_eq!(
        fs::read(old_src.join("dir/text.txt")).unwrap(),
        "line of text\n".repeat(5000).as_bytes()
    );
}

#[test]
fn excludes_and_listing() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(src.join("cache")).unwrap();
    fs::create_dir_all(src.join("keep")).unwrap();
    fs::write(src.join("keep/a.txt"), b"a").unwrap();
    fs::write(src.join("keep/b.log"), b"b").unwrap();
    fs::write(
        src.join("cache/CACHEDIR.TAG"),
        b"Signature: 8a477f597d28d172789f06886806bc55\n",
    )
    .unwrap();
    fs::write(src.join("cache/blob"), b"cached").unwrap();
    env.backup(&[&src], &["--exclude", "*.log", "--exclude-caches"]);
    let ls = env
        .pbs(&["--json", "ls", "latest", src.to_str().unwrap()])
        .expect(0)
        .json();
    let base = src.display().to_string();
    // The snapshot first, then a line per entry, as restic's `ls --json`.
    assert_eq!(ls[0]["struct_type"], "snapshot", "{:?}", ls[0]);
    let paths: Vec<String> = ls[1..]
        .iter()
        .map(|v| {
            assert_eq!(v["struct_type"], "node", "{v}");
            v["path"].as_str().unwrap().to_string()
        })
        .collect();
    // Without --json, the paths alone; with --long, as `ls -l`.
    let short = env.pbs(&["ls", "latest", src.to_str().unwrap()]).expect(0);
    assert_eq!(short.stdout.lines().collect::<Vec<_>>(), paths);
    let long = env
        .pbs(&["ls", "-l", "latest", &format!("{base}/keep/a.txt")])
        .expect(0);
    assert!(
        long.stdout.starts_with("-rw-r--r-- ")
            && long
                .stdout
                .trim_end()
                .ends_with(&format!("{base}/keep/a.txt")),
        "{}",
        long.stdout
    );
    assert!(paths.contains(&format!("{base}/keep/a.txt")), "{paths:?}");
    assert!(!paths.contains(&format!("{base}/keep/b.log")), "{paths:?}");
    assert!(
        paths.contains(&format!("{base}/cache/CACHEDIR.TAG")),
        "{paths:?}"
    );
    assert!(!paths.contains(&format!("{base}/cache/blob")), "{paths:?}");
    let file = ls
        .iter()
        .find(|v| v["path"] == format!("{base}/keep/a.txt"))
        .unwrap();
    assert_eq!(file["type"], "file");
    assert_eq!(file["size"], 1);
    // A bad pattern is a usage error naming the pattern.
    let run = env
        .pbs(&[
            "backup-local",
            src.to_str().unwrap(),
            "--exclude",
            "[unclosed",
        ])
        .expect(2);
    assert!(
        run.stderr.contains("exclude pattern \"[unclosed\""),
        "{}",
        run.stderr
    );
    // A missing path too, and no snapshot is written.
    let run = env.pbs(&["backup-local", "/no/such/dir"]).expect(2);
    assert!(run.stderr.contains("/no/such/dir"), "{}", run.stderr);
    assert_eq!(env.pbs(&["--json", "snapshots"]).expect(0).json().len(), 1);
}

/// What the user typed wrong exits 2 (bad usage or input), names the thing, and says
/// what to do; the same command with the right input works.
#[test]
fn bad_input_exits_2_naming_the_thing() {
    let (env, src) = Env::with_one_file();
    env.backup(&[&src], &[]);
    let out = env.path("out");
    let o = out.display().to_string();
    let s = src.display().to_string();
    let nope = src.join("nope").display().to_string();
    for (args, says) in [
        (
            vec!["restore", "abcd", "--target", &o],
            "snapshot abcd not found: `haul-pbs snapshots` lists them",
        ),
        (
            vec!["restore", "latest", "--target", &o, "--include", &nope],
            "is not in the snapshot",
        ),
        (
            vec!["restore", "latest", "--target", &s],
            "exists and is not an empty directory; choose a new or empty one",
        ),
        (
            vec!["key", "remove", "ffff"],
            "key ffff not found: `haul-pbs key list` shows the keys",
        ),
        (vec!["snapshots", "--host", "x"], ""),
    ] {
        let run = env.pbs(&args);
        if says.is_empty() {
            assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
            continue;
        }
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(says), "{args:?}: {}", run.stderr);
        assert!(!out.exists(), "{args:?} wrote something");
    }
    env.restore(&out, &[]).expect(0);
}

/// A repository this user may not read is named as such, with its path: not reported as
/// "no repository" (which would invite `init` over it).
#[test]
fn an_unreadable_repository_is_named_not_called_missing() {
    if !is_root() {
        return; // needs another user to be refused
    }
    let (env, src) = Env::with_one_file();
    env.backup(&[&src], &[]);
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(env.repo(), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // The binary may live where that user cannot go (a checkout under /root).
    let pbs = env.path("haul-pbs");
    fs::copy(bin("haul-pbs"), &pbs).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&pbs)
        .arg("--repo")
        .arg(env.repo())
        .arg("snapshots")
        .env("HAUL_PASSWORD", "irrelevant")
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "repository config {}: Permission denied",
            env.repo().join("config").display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("no haul repository"), "{stderr}");
    // Its owner still reads it.
    env.pbs(&["snapshots"]).expect(0);
}

/// A listing whose reader goes away ends quietly (exit 0); one whose output cannot be
/// written (a full disk) fails and says so, instead of passing for complete.
#[test]
fn output_that_cannot_be_written_fails_the_command_and_a_gone_reader_does_not() {
    let (env, src) = Env::with_one_file();
    for i in 0..3000 {
        fs::write(src.join(format!("f{i}")), "x").unwrap();
    }
    env.backup(&[&src], &[]);
    let full = env
        .pbs_command(&["ls", "latest"])
        .stdout(fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_eq!(full.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&full.stderr)
            .contains("writing to standard output: No space left on device"),
        "{}",
        String::from_utf8_lossy(&full.stderr)
    );
    let mut ls = env
        .pbs_command(&["ls", "latest"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    std::io::Read::read_exact(ls.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(ls.stdout.take());
    let status = ls.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn every_json_line_of_every_command_is_an_object_with_a_type() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    make_fixture(&src);
    env.backup(&[&src], &[]);
    env.backup(&[&src], &[]);
    let target = env.path("restored").display().to_string();
    let commands: Vec<Vec<&str>> = vec![
        vec!["snapshots"],
        vec!["ls", "latest"],
        vec!["key", "list"],
        vec!["check"],
        vec!["runs"],
        vec!["restore", "latest", "--target", &target],
        vec!["forget", "--keep-last", "1", "--dry-run"],
        vec!["prune", "--dry-run"],
        vec!["snapshots", "--host", "no-such-host"],
    ];
    for args in commands {
        let mut all = vec!["--json"];
        all.extend(&args);
        let run = env.pbs(&all).expect(0);
        for line in run.stdout.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{args:?}: {e}: {line:?}"));
            assert!(v["type"].is_string(), "{args:?}: no type in {line}");
        }
    }
    // A failure too is one typed object.
    let run = env.pbs(&["--json", "restore", "nope", "--target", &target]);
    assert_ne!(run.code, 0);
    let last: serde_json::Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "error");
}

#[test]
fn a_terminal_gets_a_progress_bar_with_percent_rate_and_eta_and_a_pipe_does_not() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("big.bin"), random_bytes(3, 64 << 20)).unwrap();
    env.backup(&[&src], &[]);
    // On a terminal (util-linux's `script` gives the command one).
    let target = env.path("on-a-terminal");
    let cmd = env.pbs_command(&["restore", "latest", "--target", target.to_str().unwrap()]);
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy().replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ");
    let mut script = std::process::Command::new("script");
    script.args(["-qefc", &line, "/dev/null"]);
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => script.env(k, v),
            None => script.env_remove(k),
        };
    }
    let shell = script
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script (util-linux)");
    let shown = String::from_utf8_lossy(&shell.stdout);
    assert!(shell.status.success(), "{shown}");
    assert!(
        shown.contains("% ") && shown.contains("ETA") && shown.contains("B/s"),
        "{shown}"
    );
    // Through a pipe: no bar, no escape codes.
    let piped = env
        .pbs(&[
            "restore",
            "latest",
            "--target",
            env.path("piped").to_str().unwrap(),
        ])
        .expect(0);
    assert!(
        !piped.stderr.contains("ETA") && !piped.stderr.contains('\u{1b}'),
        "{}",
        piped.stderr
    );
}
