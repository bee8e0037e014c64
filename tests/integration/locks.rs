//! Repository locks as the operator meets them.

use haul_repo::backend::{Backend, LocalBackend};
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
    let lock = repo.lock(true, "prune").unwrap();
    let run = env.pbs(&["backup-local", src.to_str().unwrap()]).expect(1);
    assert!(
        run.stderr
            .contains("is locked by an exclusive lock of `prune`"),
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
    let shared = repo.lock(false, "another backup").unwrap();
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
