//! `diff` and `find`: what changed between two snapshots, and where a name exists in
//! the history, read from the trees alone.

use haul_tests::*;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;

/// `--json diff A B [PATH]`: each path below `under` with its modifier, and the totals.
fn diff(env: &Env, args: &[&str], under: &str) -> (BTreeMap<String, String>, serde_json::Value) {
    let mut all = vec!["--json", "diff"];
    all.extend(args);
    let lines = env.pbs(&all).expect(0).json();
    let changes = lines
        .iter()
        .filter(|v| v["type"] == "change")
        .filter_map(|v| {
            let p = v["path"].as_str().unwrap();
            p.strip_prefix(under).map(|rest| {
                (
                    rest.to_string(),
                    v["modifier"].as_str().unwrap().to_string(),
                )
            })
        })
        .collect();
    let stats = lines
        .iter()
        .find(|v| v["type"] == "statistics")
        .expect("the totals")
        .clone();
    (changes, stats)
}

#[test]
fn diff_names_every_kind_of_change_and_skips_what_did_not_change() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(src.join("same/deep")).unwrap();
    fs::write(src.join("same/deep/kept"), "kept\n").unwrap();
    fs::write(src.join("keep.txt"), "keep\n").unwrap();
    fs::write(src.join("change.txt"), "before\n").unwrap();
    fs::write(src.join("meta.txt"), "meta\n").unwrap();
    fs::write(src.join("gone.txt"), "gone, 17 bytes.\n").unwrap();
    fs::write(src.join("flip"), "a file, then a directory\n").unwrap();
    let first = env.backup(&[&src], &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();

    fs::write(src.join("change.txt"), "after, longer\n").unwrap();
    fs::set_permissions(src.join("meta.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(src.join("gone.txt")).unwrap();
    fs::remove_file(src.join("flip")).unwrap();
    fs::create_dir(src.join("flip")).unwrap();
    fs::write(src.join("flip/inner"), "inner\n").unwrap();
    fs::write(src.join("new.txt"), "new\n").unwrap();
    fs::create_dir(src.join("newdir")).unwrap();
    fs::write(src.join("newdir/x"), "x\n").unwrap();
    let second = env.backup(&[&src], &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();

    let under = src.display().to_string();
    let (changes, stats) = diff(&env, &[&first, &second], &under);
    let want: BTreeMap<String, String> = [
        ("", "U"), // the directory itself: its mtime
        ("/change.txt", "M"),
        ("/meta.txt", "U"),
        ("/gone.txt", "-"),
        ("/flip", "T"),
        ("/flip/inner", "+"),
        ("/new.txt", "+"),
        ("/newdir", "+"),
        ("/newdir/x", "+"),
    ]
    .into_iter()
    .map(|(p, m)| (p.to_string(), m.to_string()))
    .collect();
    assert_eq!(changes, want);
    assert_eq!(stats["files_added"], 3, "{stats}");
    assert_eq!(stats["files_removed"], 1);
    assert_eq!(stats["files_changed"], 1);
    assert_eq!(stats["dirs_added"], 1);
    assert_eq!(stats["type_changed"], 1);
    assert_eq!(stats["bytes_removed"], 16);
    // The other way round, what was added is removed.
    let (back, _) = diff(&env, &[&second, &first], &under);
    assert_eq!(back["/newdir/x"], "-");
    assert_eq!(back["/gone.txt"], "+");
    assert_eq!(back["/change.txt"], "M");
    // Below a path only, and nothing between a snapshot and itself.
    let newdir = format!("{under}/newdir");
    let (only, _) = diff(&env, &[&first, &second, &newdir], &under);
    assert_eq!(only.keys().collect::<Vec<_>>(), ["/newdir/x"]);
    let (none, stats) = diff(&env, &[&second, &second], "");
    assert!(none.is_empty() && stats["files_changed"] == 0, "{none:?}");
    // The human form, with restic's modifiers.
    let text = env.pbs(&["diff", &first, &second]).expect(0).stdout;
    assert!(
        text.contains(&format!("M    {under}/change.txt\n")),
        "{text}"
    );
    assert!(text.contains(&format!("+    {under}/newdir/\n")), "{text}");
    assert!(
        text.contains("Files: 3 new, 1 removed, 1 changed"),
        "{text}"
    );
    // A snapshot that is not there is named.
    let r = env.pbs(&["diff", &first, "ffffffff"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("ffffffff"), "{}", r.stderr);
}

#[test]
fn find_lists_every_snapshot_holding_a_matching_name_newest_first() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(src.join("etc/deep")).unwrap();
    // In a directory that never changes: found in every snapshot all the same.
    fs::write(src.join("etc/deep/x.conf"), "x = 1\n").unwrap();
    fs::write(src.join("a.conf"), "a = 1\n").unwrap();
    let mut ids = Vec::new();
    ids.push(
        env.backup(&[&src], &[])["snapshot"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    fs::write(src.join("a.conf"), "a = 22\n").unwrap();
    ids.push(
        env.backup(&[&src], &[])["snapshot"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    fs::remove_file(src.join("a.conf")).unwrap();
    fs::write(src.join("b.conf"), "b = 333\n").unwrap();
    ids.push(
        env.backup(&[&src], &[])["snapshot"]
            .as_str()
            .unwrap()
            .to_string(),
    );

    let under = src.display().to_string();
    let found = |args: &[&str]| -> Vec<(String, String, u64)> {
        let mut all = vec!["--json", "find"];
        all.extend(args);
        env.pbs(&all)
            .expect(0)
            .json()
            .into_iter()
            .filter(|v| v["type"] == "match")
            .map(|v| {
                (
                    v["snapshot"].as_str().unwrap().to_string(),
                    v["path"]
                        .as_str()
                        .unwrap()
                        .strip_prefix(&under)
                        .unwrap()
                        .to_string(),
                    v["size"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let m = |i: usize, p: &str, size: u64| (ids[i].clone(), p.to_string(), size);
    assert_eq!(
        found(&["*.conf"]),
        [
            m(2, "/b.conf", 8),
            m(2, "/etc/deep/x.conf", 6),
            m(1, "/a.conf", 7),
            m(1, "/etc/deep/x.conf", 6),
            m(0, "/a.conf", 6),
            m(0, "/etc/deep/x.conf", 6),
        ]
    );
    assert_eq!(
        found(&["a.*", "b.*", "--newest", "1"]),
        [m(2, "/b.conf", 8)]
    );
    assert_eq!(found(&["deep"]).len(), 3);
    assert!(found(&["*.nothing"]).is_empty());
    let text = env.pbs(&["find", "b.conf"]).expect(0).stdout;
    assert!(text.contains(&format!("{under}/b.conf")), "{text}");
    assert!(
        text.contains("1 match(es) in 3 snapshot(s) searched"),
        "{text}"
    );
    let r = env.pbs(&["find", "[oops"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("pattern \"[oops\""), "{}", r.stderr);
}

/// `haul-pbs dump` with these arguments: its raw stdout, and its stderr.
fn dump(env: &Env, args: &[&str]) -> (Vec<u8>, String) {
    let mut all = vec!["dump"];
    all.extend(args);
    let out = env.pbs_command(&all).output().unwrap();
    assert!(
        out.status.success(),
        "dump {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn dump_writes_a_file_as_it_is_and_a_directory_as_a_tar_gnu_tar_extracts_to_the_restore() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    make_fixture(&src);
    env.backup(&[&src], &[]);
    let restored = env.path("restored");
    env.restore(&restored, &[]).expect(0);
    let rel = src.strip_prefix("/").unwrap();

    // A file: its bytes.
    let file = src.join("small.txt");
    assert_eq!(
        dump(&env, &["latest", file.to_str().unwrap()]).0,
        fs::read(&file).unwrap()
    );

    // A directory: a tar that GNU tar extracts to what the restore wrote, bytes and
    // metadata (owners by number, modes, nanosecond mtimes, xattrs, hard links,
    // symlinks, devices, FIFOs).
    let (tar, said) = dump(&env, &["latest", src.to_str().unwrap()]);
    // A socket cannot be in a tar: it is named, and left out.
    assert!(
        said.contains("/socket is a socket, which a tar cannot hold"),
        "{said}"
    );
    fs::remove_file(restored.join(rel).join("socket")).unwrap();
    let extracted = env.path("extracted");
    fs::create_dir_all(&extracted).unwrap();
    let mut child = std::process::Command::new("tar")
        .args([
            "-x",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--same-owner",
            "--same-permissions",
            "-f",
            "-",
            "-C",
        ])
        .arg(&extracted)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("GNU tar");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&tar).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&restored.join(rel), &extracted.join(rel));

    // Anything else is named.
    let r = env.pbs(&["dump", "latest", &format!("{}/rel-link", src.display())]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("is a symlink"), "{}", r.stderr);
    let r = env.pbs(&["dump", "latest", "/no/such/path"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("/no/such/path is not in snapshot"),
        "{}",
        r.stderr
    );
}

#[test]
fn stats_adds_up_restores_and_counts_distinct_data_as_check_does() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    fs::create_dir_all(src.join("copy")).unwrap();
    let random = random_bytes(7, 3 << 20);
    fs::write(src.join("a.bin"), &random).unwrap();
    fs::write(src.join("copy/a.bin"), &random).unwrap();
    let text = "the same line, again and again\n".repeat(40_000);
    fs::write(src.join("text.txt"), &text).unwrap();
    env.backup(&[&src], &[]);
    env.backup(&[&src], &[]);
    let size = (2 * random.len() + text.len()) as u64;

    let stats = |args: &[&str]| {
        let mut all = vec!["--json", "stats"];
        all.extend(args);
        env.pbs(&all).expect(0).json_of("stats")
    };
    // Two snapshots of three files each, every one counted.
    let r = stats(&[]);
    assert_eq!(r["snapshots"], 2);
    assert_eq!(r["files"], 6);
    assert_eq!(r["restore_size"], 2 * size);
    let one = stats(&["latest"]);
    assert_eq!(
        (one["files"].as_u64(), one["restore_size"].as_u64()),
        (Some(3), Some(size))
    );

    // The distinct data: the random file once, the text compressed.
    let raw = stats(&["--mode", "raw-data"]);
    let dedup = raw["dedup_ratio"].as_f64().unwrap();
    assert!(dedup > 3.0, "{raw}");
    assert!(raw["compression_ratio"].as_f64().unwrap() > 1.2, "{raw}");
    assert!(raw["raw_size"].as_u64().unwrap() < size, "{raw}");
    // As check counts them: every blob and every pack is used by these snapshots.
    let check = env.pbs(&["--json", "check"]).expect(0).json_of("check");
    assert_eq!(raw["blobs"], check["blobs"], "{raw} {check}");
    assert_eq!(raw["packs"], check["packs"], "{raw} {check}");
    let packs: u64 = walk_files(&env.repo().join("data"))
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert!(raw["stored_size"].as_u64().unwrap() <= packs, "{raw}");
    let text = env.pbs(&["stats", "--mode", "raw-data"]).expect(0).stdout;
    assert!(
        text.contains("deduplication: ") && text.contains("x, compression: "),
        "{text}"
    );
}

#[test]
fn restore_exclude_leaves_out_matching_names_and_paths_and_keeps_the_rest_whole() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    make_fixture(&src);
    env.backup(&[&src], &[]);
    let (all, some) = (env.path("all"), env.path("some"));
    env.restore(&all, &[]).expect(0);
    let sub = format!("{}/dir/sub", src.display());
    env.pbs(&[
        "restore",
        "latest",
        "--target",
        some.to_str().unwrap(),
        "--exclude",
        "*.bin",
        "--exclude",
        &sub,
    ])
    .expect(0);
    let rel = src.strip_prefix("/").unwrap();
    let files = |root: &std::path::Path| -> Vec<String> {
        let base = root.join(rel);
        let mut v: Vec<String> = walk_files(&base)
            .iter()
            .map(|p| p.strip_prefix(&base).unwrap().display().to_string())
            .collect();
        v.sort();
        v
    };
    let want: Vec<String> = files(&all)
        .into_iter()
        .filter(|p| !p.ends_with(".bin") && !p.starts_with("dir/sub"))
        .collect();
    assert!(files(&all).len() > want.len() + 2);
    assert_eq!(files(&some), want);
    assert!(!some.join(rel).join("dir/sub").exists());
    assert!(some.join(rel).join("dir").is_dir());
    for f in &want {
        let (a, b) = (all.join(rel).join(f), some.join(rel).join(f));
        if fs::symlink_metadata(&a).unwrap().is_file() {
            assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap(), "{f}");
        }
    }
    // Through the agent (as onto a host): the same entries.
    let agent = env.path("through-agent");
    env.pbs(&[
        "restore",
        "latest",
        "--target",
        agent.to_str().unwrap(),
        "--via-agent",
        "--exclude",
        "*.bin",
        "--exclude",
        &sub,
    ])
    .expect(0);
    assert_eq!(files(&agent), want);
    assert_same_tree(&some.join(rel), &agent.join(rel));
    // A pattern that is no glob is refused before anything starts.
    let r = env.pbs(&[
        "restore",
        "latest",
        "--target",
        env.path("x").to_str().unwrap(),
        "--via-agent",
        "--exclude",
        "[",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("\"[\""), "{}", r.stderr);
    assert!(!env.path("x").exists());
}
