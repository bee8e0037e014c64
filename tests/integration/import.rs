//! `import-rdiff` against real rdiff-backup repositories, generated at run time by
//! `tests/fixtures/make-rdiff-fixture.sh` (Debian's rdiff-backup): every session of
//! every variant, restored from haul, must equal the fixture's manifest of that
//! session: contents, types, modes, ownership, mtimes, symlink targets, device numbers,
//! hard-link groups and user xattrs.

use haul_tests::{is_root, rdiff_backup, Env};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The fixture, built once per test process.
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("haul-rdiff-fixture-{}", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/make-rdiff-fixture.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "{} failed (it needs rdiff-backup: apt-get install rdiff-backup):\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// The fixture's manifest format (see the script's header), without the display column.
fn manifest(root: &Path) -> Vec<String> {
    let mut entries: BTreeMap<Vec<u8>, fs::Metadata> = BTreeMap::new();
    fn visit(root: &Path, dir: &Path, out: &mut BTreeMap<Vec<u8>, fs::Metadata>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            out.insert(
                p.strip_prefix(root)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
                m.clone(),
            );
            if m.is_dir() {
                visit(root, &p, out);
            }
        }
    }
    entries.insert(b".".to_vec(), fs::symlink_metadata(root).unwrap());
    visit(root, root, &mut entries);
    let mut groups: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for (p, m) in &entries {
        if m.is_file() && m.nlink() > 1 {
            groups.entry(m.ino()).or_insert_with(|| p.clone());
        }
    }
    entries
        .iter()
        .map(|(p, m)| {
            let full = if p == b"." {
                root.to_path_buf()
            } else {
                root.join(std::ffi::OsStr::from_bytes(p))
            };
            let ft = m.file_type();
            let kind = if ft.is_file() {
                "reg"
            } else if ft.is_dir() {
                "dir"
            } else if ft.is_symlink() {
                "sym"
            } else if ft.is_fifo() {
                "fifo"
            } else if ft.is_socket() {
                "sock"
            } else if ft.is_char_device() {
                "chr"
            } else {
                "blk"
            };
            let dev = ft.is_char_device() || ft.is_block_device();
            let perms = if ft.is_symlink() {
                "-".to_string()
            } else {
                format!("{:04o}", m.mode() & 0o7777)
            };
            let mtime = if ft.is_symlink() || dev {
                "-".to_string()
            } else {
                m.mtime().to_string()
            };
            let size = if ft.is_file() {
                m.len().to_string()
            } else {
                "-".to_string()
            };
            let content = if ft.is_file() {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(fs::read(&full).unwrap()))
            } else if ft.is_symlink() {
                hex::encode(fs::read_link(&full).unwrap().as_os_str().as_bytes())
            } else if dev {
                format!("{},{}", libc::major(m.rdev()), libc::minor(m.rdev()))
            } else {
                "-".to_string()
            };
            let mut xattrs: Vec<String> = if ft.is_symlink() {
                Vec::new()
            } else {
                xattr::list(&full)
                    .unwrap()
                    .map(|n| {
                        let v = xattr::get(&full, &n).unwrap().unwrap_or_default();
                        format!("{}={}", n.to_string_lossy(), hex::encode(v))
                    })
                    .collect()
            };
            xattrs.sort();
            let xattrs = if xattrs.is_empty() {
                "-".to_string()
            } else {
                xattrs.join(",")
            };
            let group = match groups.get(&m.ino()) {
                Some(first) if m.is_file() && m.nlink() > 1 => hex::encode(first),
                _ => "-".to_string(),
            };
            let path = if p == b"." {
                ".".to_string()
            } else {
                hex::encode(p)
            };
            [
                path,
                kind.into(),
                perms,
                m.uid().to_string(),
                m.gid().to_string(),
                mtime,
                size,
                content,
                xattrs,
                group,
            ]
            .join("\t")
        })
        .collect()
}

/// The expected manifest, without the display column.
fn expected(file: &Path) -> Vec<String> {
    fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| l.split('\t').take(10).collect::<Vec<_>>().join("\t"))
        .collect()
}

fn snapshots(env: &Env) -> Vec<serde_json::Value> {
    env.pbs(&["--json", "snapshots"]).expect(0).json()
}

#[test]
fn every_session_of_every_variant_equals_its_manifest_and_reimport_adds_nothing() {
    assert!(
        is_root(),
        "the import tests compare ownership and device nodes: run them as root"
    );
    let fx = fixture();
    let env = Env::new();
    env.init();
    for variant in [
        "repo",
        "repo-quoted",
        "repo-nocompress",
        "repo-tz-newfoundland",
        "repo-regressed",
    ] {
        let dir = fx.join(variant);
        let run = env
            .pbs(&[
                "import-rdiff",
                dir.to_str().unwrap(),
                "--host",
                variant,
                "--path",
                "/srv/legacy",
            ])
            .expect(0);
        let sessions =
            fs::read_to_string(fx.join("expected").join(variant).join("sessions.txt")).unwrap();
        let sessions: Vec<(i64, String)> = sessions
            .lines()
            .map(|l| {
                let (e, t) = l.split_once('\t').unwrap();
                (e.parse().unwrap(), t.to_string())
            })
            .collect();
        assert!(
            run.stdout
                .contains(&format!("{} sessions imported", sessions.len())),
            "{}",
            run.stdout
        );
        let snaps = snapshots(&env);
        for (epoch, raw) in &sessions {
            // By time: the tag keeps the timestring as rdiff-backup wrote it, which can
            // differ from sessions.txt's (compatible `-` separators, the -04:30 quirk).
            let snap = snaps
                .iter()
                .find(|s| {
                    s["host"] == variant
                        && s["time"]
                            .as_str()
                            .unwrap()
                            .parse::<chrono::DateTime<chrono::Utc>>()
                            .unwrap()
                            .timestamp()
                            == *epoch
                })
                .unwrap_or_else(|| panic!("{variant}: no snapshot for session {raw}"));
            assert!(snap["tags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t == "rdiff-backup"));
            let target = env.path(&format!("restored/{variant}/{epoch}"));
            env.pbs(&[
                "restore",
                snap["id"].as_str().unwrap(),
                "--target",
                target.to_str().unwrap(),
            ])
            .expect(0);
            let got = manifest(&target.join("srv/legacy"));
            let want = expected(
                &fx.join("expected")
                    .join(variant)
                    .join(format!("{epoch}.manifest")),
            );
            if got != want {
                let only_got: Vec<_> = got.iter().filter(|l| !want.contains(l)).collect();
                let only_want: Vec<_> = want.iter().filter(|l| !got.contains(l)).collect();
                panic!("{variant} session {raw}:\nonly in haul's restore:\n{only_got:#?}\nonly in the manifest:\n{only_want:#?}");
            }
        }
    }
    // Again: nothing new.
    let before = snapshots(&env).len();
    let run = env
        .pbs(&[
            "import-rdiff",
            fx.join("repo").to_str().unwrap(),
            "--host",
            "repo",
            "--path",
            "/srv/legacy",
        ])
        .expect(0);
    assert!(
        run.stdout.contains("0 sessions imported, 5 already there"),
        "{}",
        run.stdout
    );
    assert_eq!(snapshots(&env).len(), before);
    env.pbs(&["check", "--read-data"]).expect(0);
    // Each import is a run in the history, with what it did.
    let runs = env.runs();
    let imports: Vec<_> = runs.iter().filter(|r| r["kind"] == "import").collect();
    assert_eq!(imports.len(), 6, "{runs:#?}");
    assert!(imports.iter().all(|r| r["status"] == "ok"));
    assert_eq!(imports[0]["details"]["import"]["sessions_imported"], 5);
    assert_eq!(imports[5]["details"]["import"]["sessions_skipped"], 5);
    assert!(
        imports[5]["details"]["import"]["files_verified"]
            .as_u64()
            .unwrap()
            > 0
    );
}

/// A repository with `chars_to_quote` and `special_escapes` (rdiff-backup keeps an
/// existing `special_escapes`, so the test writes one after the first session, as a
/// repository once made on a FAT disk has), and a file larger than what the import
/// rebuilds in memory, rewritten in part between sessions: every session imported must
/// equal rdiff-backup's own `restore --at` of it.
#[test]
fn special_escapes_and_large_files_import_as_rdiff_backup_restores_them() {
    let env = Env::new();
    env.init();
    let src = env.path("escapes-src");
    let rd = env.path("escapes-rdiff");
    fs::create_dir_all(&src).unwrap();
    let t0: i64 = 1_700_000_000;
    let times = [t0, t0 + 86_400, t0 + 2 * 86_400];
    let backup = |t: i64| {
        rdiff_backup(&[
            "--chars-to-quote",
            "A-Z",
            "--current-time",
            &t.to_string(),
            "backup",
            src.to_str().unwrap(),
            rd.to_str().unwrap(),
        ])
    };
    // Larger than haul_rdiff::content::INLINE_LIMIT (16 MiB).
    let mut big = haul_tests::random_bytes(1, 20 << 20);
    fs::write(src.join("Big"), &big).unwrap();
    fs::write(src.join("Plain"), b"plain").unwrap();
    backup(times[0]);
    fs::write(
        rd.join("rdiff-backup-data/special_escapes"),
        "escape_dos_devices\nescape_trailing_spaces\n",
    )
    .unwrap();
    for (name, body) in [
        ("trail ", "a trailing space"),
        ("dot.", "a trailing dot"),
        ("aux.txt", "a DOS device with an extension"),
        ("Con", "quoted before the device check"),
    ] {
        fs::write(src.join(name), body).unwrap();
    }
    fs::create_dir(src.join("nul.d")).unwrap();
    fs::write(src.join("nul.d/lpt3"), "in a device-named directory").unwrap();
    big[8 << 20..12 << 20].copy_from_slice(&haul_tests::random_bytes(2, 4 << 20));
    fs::write(src.join("Big"), &big).unwrap();
    backup(times[1]);
    big.extend_from_slice(&haul_tests::random_bytes(3, 1 << 20));
    big[1 << 20..2 << 20].copy_from_slice(&haul_tests::random_bytes(4, 1 << 20));
    fs::write(src.join("Big"), &big).unwrap();
    fs::write(src.join("trail "), "changed").unwrap();
    fs::write(src.join("dot."), "changed too").unwrap();
    fs::remove_file(src.join("Plain")).unwrap();
    backup(times[2]);
    // The escapes are in force: these are the names on disk.
    for stored in [
        "trail;032",
        "dot;046",
        ";097ux.txt",
        ";067on",
        ";110ul.d/;108pt3",
    ] {
        assert!(rd.join(stored).exists(), "{stored} missing from the mirror");
    }
    let run = env
        .pbs(&[
            "import-rdiff",
            rd.to_str().unwrap(),
            "--host",
            "escapes",
            "--path",
            "/srv/escapes",
        ])
        .expect(0);
    assert!(run.stdout.contains("3 sessions imported"), "{}", run.stdout);
    let snaps = snapshots(&env);
    for t in times {
        let snap = snaps
            .iter()
            .find(|s| {
                s["time"]
                    .as_str()
                    .unwrap()
                    .parse::<chrono::DateTime<chrono::Utc>>()
                    .unwrap()
                    .timestamp()
                    == t
            })
            .unwrap_or_else(|| panic!("no snapshot for {t}"));
        let ours = env.path(&format!("escapes-haul/{t}"));
        env.pbs(&[
            "restore",
            snap["id"].as_str().unwrap(),
            "--target",
            ours.to_str().unwrap(),
        ])
        .expect(0);
        let theirs = env.path(&format!("escapes-rdiff-restore/{t}"));
        fs::create_dir_all(theirs.parent().unwrap()).unwrap();
        rdiff_backup(&[
            "restore",
            "--at",
            &t.to_string(),
            rd.to_str().unwrap(),
            theirs.to_str().unwrap(),
        ]);
        let got = manifest(&ours.join("srv/escapes"));
        let want = manifest(&theirs);
        assert_eq!(got, want, "session {t}");
        assert!(
            got.iter().any(|l| l.starts_with(&hex::encode("trail "))) == (t != times[0]),
            "{got:#?}"
        );
    }
}

#[test]
fn an_interrupted_repository_is_refused_with_what_to_do() {
    let fx = fixture();
    let env = Env::new();
    env.init();
    for variant in ["repo-interrupted", "repo-interrupted-late"] {
        let run = env
            .pbs(&[
                "import-rdiff",
                fx.join(variant).to_str().unwrap(),
                "--host",
                variant,
            ])
            .expect(2);
        assert!(
            run.stderr
                .contains("was interrupted (two current_mirror markers")
                && run.stderr.contains(
                    "run `rdiff-backup regress` on a copy of the repository and import the copy"
                ),
            "{}",
            run.stderr
        );
    }
    assert!(snapshots(&env).is_empty());
    // Not an rdiff-backup repository at all.
    let run = env
        .pbs(&["import-rdiff", env.path("").to_str().unwrap()])
        .expect(2);
    assert!(
        run.stderr.contains("is not an rdiff-backup repository"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_first_pull_imports_the_hosts_rdiff_backup_history_verifies_it_and_uses_it_as_parent() {
    let fx = fixture();
    let (env, src) = Env::with_source();
    // The host's data as the rdiff-backup mirror has it.
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(fx.join("repo/."))
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    fs::remove_dir_all(src.join("rdiff-backup-data")).unwrap();
    let config = env.path("pbs.toml");
    fs::write(
        &config,
        format!(
            "[[host]]\nname = \"legacy\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{:?}]\nlegacy_rdiff_dir = {:?}\n",
            src.display().to_string(),
            fx.join("repo").display().to_string()
        ),
    )
    .unwrap();
    let state = env.path("state");
    let pull = || {
        env.pbs(&[
            "--json",
            "pull",
            "legacy",
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ])
    };
    let run = pull();
    // The fixture holds files only root can read back as they were; a warning is fine.
    assert!(
        run.code == 0 || run.code == 3,
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    let snaps = snapshots(&env);
    let imported: Vec<_> = snaps
        .iter()
        .filter(|s| s["source"] == "rdiff-backup-import")
        .collect();
    assert_eq!(imported.len(), 5, "{snaps:#?}");
    assert!(imported
        .iter()
        .all(|s| s["host"] == "legacy" && s["paths"][0] == src.to_str().unwrap()));
    let newest = imported
        .iter()
        .max_by_key(|s| s["time"].as_str().unwrap().to_string())
        .unwrap();
    let pulled: Vec<_> = snaps.iter().filter(|s| s["source"] == "local").collect();
    assert_eq!(pulled.len(), 1);
    assert_eq!(
        pulled[0]["parent"], newest["id"],
        "the pull's parent is the newest imported snapshot"
    );
    // The import is a run of its own, verified, in the history and the feed.
    let runs: Vec<serde_json::Value> = fs::read_to_string(state.join("runs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let import = runs
        .iter()
        .find(|r| r["kind"] == "import")
        .expect("an import run");
    assert_eq!(import["status"], "ok", "{import}");
    assert_eq!(import["details"]["import"]["sessions_imported"], 5);
    assert!(
        import["details"]["import"]["files_verified"]
            .as_u64()
            .unwrap()
            >= 30,
        "{import}"
    );
    let feed = haul_tests::feedparser(&state.join("feed.xml"));
    assert!(feed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["title"]
            .as_str()
            .unwrap()
            .starts_with("legacy: import OK")));

    // The next pull imports nothing again.
    let run = pull();
    assert!(run.code == 0 || run.code == 3, "{}", run.stderr);
    let snaps = snapshots(&env);
    assert_eq!(
        snaps
            .iter()
            .filter(|s| s["source"] == "rdiff-backup-import")
            .count(),
        5
    );
    assert_eq!(snaps.iter().filter(|s| s["source"] == "local").count(), 2);
}
