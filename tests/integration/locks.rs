//! Repository locks as the operator meets them.

use haul_repo::backend::{Backend, LocalBackend};
use haul_repo::lock::LockKind;
use haul_repo::Repository;
use haul_tests::*;
use std::sync::Arc;

fn open(env: &Env) -> Repository {
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::open(&env.repo()).unwrap());
    Repository::open(backend, b"correct horse battery staple").unwrap()
}

#[test]
fn an_exclusive_lock_stops_a_backup_with_a_clear_message_and_nothing_written() {
    let (env, src) = Env::with_one_file();
    let repo = open(&env);
    let lock = repo.lock(LockKind::Exclusive, "repair index").unwrap();
    let run = env.pbs(&["backup-local", src.to_str().unwrap()]).expect(1);
    assert!(
        run.stderr
            .contains("is locked by an exclusive lock of `repair index`"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("haul-pbs unlock"), "{}", run.stderr);
    assert_eq!(env.count("snapshots"), 0);
    assert_eq!(env.count("data"), 0);
    // A live lock is not stale: plain unlock keeps it, --all removes it.
    let run = env.pbs(&["--json", "unlock"]).expect(0);
    assert_eq!(run.json_of("unlock")["removed"], 0);
    assert_eq!(env.count("locks"), 1);
    env.pbs(&["unlock", "--all"]).expect(0);
    assert_eq!(env.count("locks"), 0);
    std::mem::forget(lock); // its file is gone already
                            // The backup now runs, and leaves no lock behind.
    env.backup(&[&src], &[]);
    assert_eq!(env.count("locks"), 0);
    assert_eq!(env.count("snapshots"), 1);
}

#[test]
fn shared_locks_let_backups_and_checks_run_together() {
    let (env, src) = Env::with_one_file();
    let repo = open(&env);
    let shared = repo.lock(LockKind::Shared, "another backup").unwrap();
    env.backup(&[&src], &[]);
    env.pbs(&["check"]).expect(0);
    // But key removal, which deletes, waits for them.
    let run = env.pbs(&["key", "remove", "0000"]).expect(1);
    assert!(
        run.stderr.contains("a shared lock of `another backup`"),
        "{}",
        run.stderr
    );
    drop(shared);
    assert_eq!(env.count("locks"), 0);
}

#[test]
fn a_full_disk_still_lists_restores_and_checks_and_a_backup_says_the_disk_is_full() {
    use std::os::unix::fs::symlink;
    let env = Env::new();
    // The repository and the index cache on a small disk of their own.
    let disk = Tmpfs::mount(&env.path("disk"), "32m");
    for d in ["repo", "cache"] {
        std::fs::create_dir(disk.path.join(d)).unwrap();
        symlink(disk.path.join(d), env.path(d)).unwrap();
    }
    env.init();
    let src = env.path("src");
    make_fixture(&src);
    env.backup(&[&src], &[]);
    std::fs::write(src.join("later.txt"), "after the first backup\n").unwrap();
    let second = env.backup(&[&src], &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    // No cache yet: reading must write one, on the full disk.
    std::fs::remove_dir_all(disk.path.join("cache")).unwrap();
    std::fs::create_dir(disk.path.join("cache")).unwrap();
    disk.fill();

    let ids = |env: &Env| -> Vec<String> {
        env.pbs(&["--json", "snapshots"])
            .expect(0)
            .json()
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect()
    };
    let before = ids(&env);
    assert_eq!(before.len(), 2);
    assert_eq!(before[1], second);
    let target = env.path("out");
    let run = env.restore(&target, &[]).expect(0);
    assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));
    assert!(
        run.stderr
            .contains("restore goes on without a lock: cannot write a lock in repository"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(
            "the index cache could not be written, so this run reads the index without it"
        ),
        "{}",
        run.stderr
    );
    for args in [&["check"][..], &["check", "--read-data"]] {
        let run = env.pbs(args).expect(0);
        assert!(run.stdout.contains("no errors found"), "{}", run.stdout);
    }

    // A backup cannot: it says the disk is full, and changes nothing.
    std::fs::write(src.join("new.txt"), "while the disk is full\n").unwrap();
    let run = env.pbs(&["backup-local", src.to_str().unwrap()]).expect(1);
    let last = run.stderr.lines().last().unwrap();
    assert!(
        last.starts_with(&format!(
            "haul-pbs: cannot write a lock in repository {}: lock ",
            env.repo().display()
        )) && last.ends_with(": No space left on device (os error 28) (the disk is full: nothing stored before was changed; free some space on it before anything is written there again)"),
        "{}",
        run.stderr
    );
    assert_eq!(ids(&env), before);
    assert_eq!(env.count("locks"), 0);
    assert_eq!(env.count("tmp"), 0);
    assert_eq!(disk.free(), 0);

    // With room again, the backup runs.
    std::fs::remove_file(disk.path.join("fill")).unwrap();
    env.backup(&[&src], &[]);
    assert_eq!(ids(&env).len(), 3);
    let target = env.path("after");
    env.restore(&target, &[]).expect(0);
    assert_same_tree(&src, &target.join(src.strip_prefix("/").unwrap()));
}

#[test]
fn no_lock_is_refused_by_commands_that_write_and_lets_readers_past_locks() {
    let (env, src) = Env::with_one_file();
    env.backup(&[&src], &[]);
    for (args, name) in [
        (vec!["backup-local", src.to_str().unwrap()], "backup-local"),
        (vec!["forget", "--keep-last", "1"], "forget"),
        (vec!["repair", "snapshots"], "repair snapshots"),
    ] {
        let mut all = vec!["--no-lock"];
        all.extend(args);
        let run = env.pbs(&all).expect(2);
        assert_eq!(
            run.stderr,
            format!("haul-pbs: --no-lock is only for commands that read the repository (snapshots, ls, restore, check, key list, repair --dry-run): `{name}` changes it and must hold a lock; run it without --no-lock\n")
        );
    }
    assert_eq!(env.count("snapshots"), 1);

    // Under an exclusive lock a restore waits; with --no-lock it reads, and leaves no lock.
    let repo = open(&env);
    let lock = repo.lock(LockKind::Exclusive, "repair index").unwrap();
    let target = env.path("out");
    let run = env.restore(&target, &[]).expect(1);
    assert!(
        run.stderr
            .contains("is locked by an exclusive lock of `repair index`"),
        "{}",
        run.stderr
    );
    let run = env
        .pbs(&[
            "--no-lock",
            "restore",
            "latest",
            "--target",
            target.to_str().unwrap(),
        ])
        .expect(0);
    assert!(run.stderr.is_empty(), "{}", run.stderr);
    assert_eq!(
        std::fs::read(target.join(src.strip_prefix("/").unwrap()).join("f")).unwrap(),
        b"data"
    );
    env.pbs(&["--no-lock", "check"]).expect(0);
    env.pbs(&["--no-lock", "repair", "index", "--dry-run"])
        .expect(0);
    assert_eq!(env.count("locks"), 1, "only the exclusive lock");
    drop(lock);
    assert_eq!(env.count("locks"), 0);
}
