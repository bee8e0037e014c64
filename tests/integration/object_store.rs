//! Repositories on object storage: a real Ceph cluster (three OSDs, replicated three
//! times, RADOS Gateway for S3) started by the test, never a mock.

use std::os::unix::fs::PermissionsExt;

use haul_repo::backend::{contract, Backend, FileType, S3Backend, S3Credentials, S3Location};
use haul_repo::Error;
use haul_tests::ceph::Ceph;
use haul_tests::Env;

fn location(s: &str) -> S3Location {
    S3Location::parse(s).expect("an s3: location").unwrap()
}

#[test]
fn the_s3_backend_keeps_the_backend_contract_on_a_ceph_cluster() {
    let env = Env::new();
    let ceph = Ceph::start(&env.path("ceph"));
    let creds = S3Credentials {
        access_key_id: ceph.access_key.clone(),
        secret_access_key: ceph.secret_key.clone(),
        region: "us-east-1".into(),
    };
    let loc = location(&ceph.bucket("contract", "some/repo"));
    let b = S3Backend::create(&loc, &creds).unwrap();
    contract::conformance(&b);

    // Pack reads go through windows kept in memory: ranges that straddle windows, in
    // any order, read the object's bytes; past its end is an error, not short bytes.
    {
        use haul_repo::backend::FileType;
        let pack: Vec<u8> = (0..10u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let name = "ab".repeat(32);
        let mut w = b.writer(FileType::Data).unwrap();
        std::io::Write::write_all(&mut w, &pack).unwrap();
        w.finish(&name).unwrap();
        let mib = 1u64 << 20;
        for (offset, length) in [
            (4 * mib - 100, 200u32),
            (mib, (7 * mib) as u32),
            (8 * mib - 1, 1),
            (3 * mib, (mib + 1) as u32),
            (10 * mib - 5, 5),
            (0, (10 * mib) as u32),
            (9 * mib, 17),
        ] {
            let got = b.read_range(FileType::Data, &name, offset, length).unwrap();
            assert!(
                got == pack[offset as usize..(offset + length as u64) as usize],
                "range {offset}+{length}"
            );
        }
        let e = b
            .read_range(FileType::Data, &name, 10 * mib - 5, 6)
            .unwrap_err();
        assert!(e.to_string().contains("past its end"), "{e}");
    }
    assert_eq!(
        b.location(),
        format!("{}/contract/some/repo", ceph.endpoint).replacen("http", "s3:http", 1)
    );

    // A repository's config makes it one: open finds it, create refuses it; a prefix
    // holding other objects is not taken for a new repository; a missing one is named.
    b.write_once(haul_repo::backend::FileType::Config, "config", b"c")
        .or_else(|e| match e {
            Error::AlreadyExists { .. } => Ok(()),
            e => Err(e),
        })
        .unwrap();
    S3Backend::open(&loc, &creds).unwrap();
    assert!(matches!(
        S3Backend::create(&loc, &creds),
        Err(Error::RepositoryExists(_))
    ));
    let parent = location(&ceph.bucket("contract2", "a"));
    let inner = S3Backend::create(&parent.join("b"), &creds).unwrap();
    inner
        .write_once(haul_repo::backend::FileType::Config, "config", b"c")
        .unwrap();
    let e = S3Backend::create(&parent, &creds)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("is not empty"), "{e}");
    let e = S3Backend::open(
        &location(&format!("s3:{}/contract/elsewhere", ceph.endpoint)),
        &creds,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("no haul repository at s3:") && e.contains("/contract/elsewhere"),
        "{e}"
    );

    // A wrong secret is refused by the store, and the error names where.
    let wrong = S3Credentials {
        secret_access_key: "wrong".into(),
        ..creds.clone()
    };
    let e = S3Backend::open(&loc, &wrong).err().unwrap().to_string();
    assert!(e.contains("/contract/some/repo"), "{e}");

    // Credentials from a file, which must be private.
    let file = env.path("s3.env");
    std::fs::write(
        &file,
        format!(
            "# the pbs's key\nAWS_ACCESS_KEY_ID={}\nexport AWS_SECRET_ACCESS_KEY=\"{}\"\n",
            ceph.access_key, ceph.secret_key
        ),
    )
    .unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = S3Credentials::from_file(&file).unwrap_err().to_string();
    assert!(
        e.contains("readable by others") && e.contains("chmod 600"),
        "{e}"
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    S3Backend::open(&loc, &S3Credentials::from_file(&file).unwrap()).unwrap();
}

/// Pull, restore, check --read-data, forget and prune on the object store, with one of
/// the three OSDs killed in the middle of a pull: the pull completes on the two left
/// (the pools are written with two of three), and the repository checks clean.
#[test]
fn pull_restore_check_forget_and_prune_on_ceph_with_an_osd_killed_mid_pull() {
    let mut env = Env::new();
    let mut ceph = Ceph::start(&env.path("ceph"));
    env.location = Some(ceph.bucket("fleet", "pbs/web-1"));
    let creds = ceph.credentials_env();
    let creds: Vec<(&str, &str)> = creds.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let pbs = |args: &[&str]| env.pbs_with(args, &creds);

    // Without credentials: refused, saying what is missing and where it may come from.
    let run = env.pbs(&["init"]).expect(2);
    assert!(
        run.stderr.contains("AWS_ACCESS_KEY_ID") && run.stderr.contains("s3_credentials_file"),
        "{}",
        run.stderr
    );
    let run = pbs(&["--json", "init"]).expect(0);
    let loc = env.location.clone().unwrap();
    assert_eq!(run.json_of("init")["repository"], loc.as_str());

    let src = env.path("src");
    haul_tests::make_fixture(&src);
    let (_, first) = env_pull(&env, &src, &creds);
    assert_eq!(first["status"], "ok", "{first:#}");
    let target = env.path("restored-1");
    pbs(&["restore", "latest", "--target", target.to_str().unwrap()]).expect(0);
    haul_tests::assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));
    // The tree packs were read whole once and are kept in the local cache.
    let cached = haul_tests::walk_files(&env.path("cache"));
    assert!(
        cached
            .iter()
            .any(|p| p.parent().is_some_and(|d| d.ends_with("packs"))),
        "{cached:?}"
    );

    // Pulls need no right to delete: the bucket policy of the README gives the pulls'
    // key reading, listing and writing, and deleting only of locks (a run removes its
    // own). Everything below until the forget runs with that key.
    let (puller_key, puller_secret) = ceph.user("puller");
    ceph.put_policy(
        "fleet",
        &haul_tests::ceph::append_only_policy("fleet", "pbs/web-1", "puller"),
    );
    let puller = [
        ("AWS_ACCESS_KEY_ID", puller_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", puller_secret.as_str()),
    ];
    let pulls_key = S3Credentials {
        access_key_id: puller_key.clone(),
        secret_access_key: puller_secret.clone(),
        region: "us-east-1".into(),
    };
    let guarded = S3Backend::open(&location(&loc), &pulls_key).unwrap();
    let snapshot = guarded.list(FileType::Snapshot).unwrap()[0].0.clone();
    let e = guarded
        .delete(FileType::Snapshot, &snapshot)
        .unwrap_err()
        .to_string();
    assert!(e.contains("AccessDenied") || e.contains("403"), "{e}");
    assert_eq!(guarded.list(FileType::Snapshot).unwrap().len(), 1);

    // A second pull with 160 MiB of new data (about 7 s here); one OSD is killed while
    // it runs.
    std::fs::write(src.join("big.bin"), haul_tests::random_bytes(7, 160 << 20)).unwrap();
    let mut pull = env.pbs_command(&[
        "--json",
        "pull",
        "--local",
        src.to_str().unwrap(),
        "--state-dir",
        env.path("state").to_str().unwrap(),
    ]);
    for (k, v) in &puller {
        pull.env(k, v);
    }
    let mut child = pull
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    ceph.kill_osd(1);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the pull ended before the OSD was killed: the test proves nothing"
    );
    let out = child.wait_with_output().unwrap();
    let run = haul_tests::Run::from_output(out).expect(0);
    let second = run.json().into_iter().find(|v| v["type"] == "run").unwrap()["run"].clone();
    assert_eq!(second["status"], "ok", "{second:#}");
    eprintln!(
        "the pull with an OSD killed ran from {} to {}",
        second["start"], second["end"]
    );
    assert!(ceph.ceph(&["osd", "stat"]).contains("2 up"));

    let check = pbs(&["--json", "check", "--read-data"]).expect(0);
    assert_eq!(check.json_of("check")["errors"], serde_json::json!([]));
    let target = env.path("restored-2");
    pbs(&["restore", "latest", "--target", target.to_str().unwrap()]).expect(0);
    haul_tests::assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));

    // Forget the first snapshot and prune what only it used.
    std::fs::remove_file(src.join("big.bin")).unwrap();
    let (_, third) = env_pull(&env, &src, &puller);
    assert_eq!(third["status"], "ok");
    // With the pulls' key a forget is refused by the store; with the owner's it runs.
    let run = env.pbs_with(&["forget", "--keep-last", "1"], &puller);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains("AccessDenied") || run.stderr.contains("403"),
        "{}",
        run.stderr
    );
    assert_eq!(
        pbs(&["--json", "snapshots"])
            .expect(0)
            .json()
            .iter()
            .filter(|v| v["type"] == "snapshot")
            .count(),
        3
    );
    pbs(&["forget", "--keep-last", "1"]).expect(0);
    let prune = pbs(&["--json", "prune", "--max-unused", "0"]).expect(0);
    let p = prune.json_of("prune");
    assert!(p["report"]["packs_deleted"].as_u64().unwrap() >= 1, "{p:#}");
    let snaps = pbs(&["--json", "snapshots"]).expect(0).json();
    assert_eq!(snaps.iter().filter(|v| v["type"] == "snapshot").count(), 1);
    pbs(&["check", "--read-data"]).expect(0);
    let target = env.path("restored-3");
    pbs(&["restore", "latest", "--target", target.to_str().unwrap()]).expect(0);
    haul_tests::assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));

    // A copy into another repository on the store, with its own key: it restores the
    // same tree, and checks clean.
    let mut copy = Env::new();
    std::fs::write(copy.path("pass"), "the copy's own passphrase\n").unwrap();
    copy.location = Some(format!("s3:{}/fleet/copies/web-1", ceph.endpoint));
    copy.pbs_with(&["init"], &creds).expect(0);
    let run = pbs(&[
        "--json",
        "copy",
        "--to",
        copy.location.as_deref().unwrap(),
        "--to-password-file",
        copy.path("pass").to_str().unwrap(),
    ])
    .expect(0);
    assert_eq!(run.json_of("copy-summary")["copied"], 1);
    let target = copy.path("restored-copy");
    copy.pbs_with(
        &["restore", "latest", "--target", target.to_str().unwrap()],
        &creds,
    )
    .expect(0);
    haul_tests::assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));
    copy.pbs_with(&["check", "--read-data"], &creds).expect(0);

    // The configuration's repositories on object storage: a host's first pull creates
    // its repository there (its key in the state directory), with the access key from
    // the file the configuration names.
    let state = env.path("state-2");
    let key_file = ceph.credentials_file();
    let config = env.path("pbs.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nstate_dir = {state:?}\nrepositories_dir = \"s3:{}/fleet/configured\"\ns3_credentials_file = {key_file:?}\n\n\
             [[host]]\nname = \"web-1\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{src:?}]\n",
            ceph.endpoint
        ),
    )
    .unwrap();
    let configured = |args: &[&str]| {
        let out = std::process::Command::new(haul_tests::bin("haul-pbs"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("HAUL_REPO")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .output()
            .unwrap();
        haul_tests::Run::from_output(out)
    };
    configured(&["config", "check"]).expect(0);
    for _ in 0..2 {
        let run = configured(&["--json", "pull", "web-1"]).expect(0);
        assert_eq!(run.json_of("run")["run"]["status"], "ok", "{}", run.stderr);
    }
    assert!(state.join("repo.key").exists());
    let snaps = configured(&["--json", "snapshots", "--host", "web-1"]).expect(0);
    assert_eq!(
        snaps
            .json()
            .iter()
            .filter(|v| v["type"] == "snapshot")
            .count(),
        2
    );
    configured(&["check"]).expect(0);
    // A location that is not one is refused by name.
    std::fs::write(
        &config,
        "[server]\nrepositories_dir = \"s3:ftp://host/bucket\"\n",
    )
    .unwrap();
    let run = configured(&["snapshots"]).expect(2);
    assert!(
        run.stderr.contains("[server].repositories_dir") && run.stderr.contains("s3:https://HOST"),
        "{}",
        run.stderr
    );
}

fn env_pull(
    env: &Env,
    src: &std::path::Path,
    creds: &[(&str, &str)],
) -> (haul_tests::Run, serde_json::Value) {
    let run = env
        .pbs_with(
            &[
                "--json",
                "pull",
                "--local",
                src.to_str().unwrap(),
                "--state-dir",
                env.path("state").to_str().unwrap(),
            ],
            creds,
        )
        .expect(0);
    let record = run.json().into_iter().find(|v| v["type"] == "run").unwrap()["run"].clone();
    (run, record)
}
