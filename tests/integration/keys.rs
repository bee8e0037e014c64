//! Passphrases and key files.

use haul_tests::*;
use std::fs;

#[test]
fn wrong_passphrase_is_refused_clearly_and_the_right_one_still_works() {
    let env = Env::new();
    env.init();
    fs::write(env.path("wrong"), "not the passphrase\n").unwrap();
    let run = env
        .pbs(&[
            "--password-file",
            env.path("wrong").to_str().unwrap(),
            "snapshots",
        ])
        .expect(1);
    assert!(
        run.stderr.contains(
            "wrong passphrase: none of the 1 key file(s) of this repository opens with it"
        ),
        "{}",
        run.stderr
    );
    env.pbs(&["snapshots"]).expect(0);
}

#[test]
fn passphrase_from_environment() {
    let env = Env::new();
    env.init();
    let mut cmd = std::process::Command::new(bin("haul-pbs"));
    let out = cmd
        .args([
            "--repo",
            env.repo().to_str().unwrap(),
            "--no-cache",
            "snapshots",
        ])
        .env("HAUL_PASSWORD", "correct horse battery staple")
        .env_remove("HAUL_PASSWORD_FILE")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No passphrase and no terminal: a clear error, not a hang.
    let out = std::process::Command::new(bin("haul-pbs"))
        .args(["--repo", env.repo().to_str().unwrap(), "snapshots"])
        .env_remove("HAUL_PASSWORD")
        .env_remove("HAUL_PASSWORD_FILE")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("use --password-file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn add_list_remove_keys_but_never_the_last() {
    let env = Env::new();
    env.init();
    let second = env.path("second");
    fs::write(&second, "another passphrase\n").unwrap();
    let added = env
        .pbs(&[
            "--json",
            "key",
            "add",
            "--new-password-file",
            second.to_str().unwrap(),
        ])
        .expect(0)
        .json_of("key-added");
    let added_id = added["id"].as_str().unwrap().to_string();
    let keys = env.pbs(&["--json", "key", "list"]).expect(0).json();
    assert_eq!(keys.len(), 2);
    let first_id = keys.iter().find(|k| k["current"] == true).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(first_id, added_id);

    // Both passphrases open the repository.
    env.pbs(&["--password-file", second.to_str().unwrap(), "snapshots"])
        .expect(0);
    // The key in use cannot remove itself.
    let run = env.pbs(&["key", "remove", &first_id[..8]]).expect(2);
    assert!(
        run.stderr
            .contains("cannot remove the key this command was opened with"),
        "{}",
        run.stderr
    );
    // The other can.
    env.pbs(&[
        "--password-file",
        second.to_str().unwrap(),
        "key",
        "remove",
        &first_id[..8],
    ])
    .expect(0);
    let run = env.pbs(&["snapshots"]).expect(1);
    assert!(run.stderr.contains("wrong passphrase"), "{}", run.stderr);
    // The last key cannot be removed, whoever asks.
    let run = env
        .pbs(&[
            "--password-file",
            second.to_str().unwrap(),
            "key",
            "remove",
            &added_id[..8],
        ])
        .expect(1);
    assert!(
        run.stderr.contains("cannot remove the last key"),
        "{}",
        run.stderr
    );
    env.pbs(&["--password-file", second.to_str().unwrap(), "snapshots"])
        .expect(0);
}

#[test]
fn init_refuses_an_existing_repository() {
    let env = Env::new();
    env.init();
    let run = env.pbs(&["init"]).expect(1);
    assert!(run.stderr.contains("already exists"), "{}", run.stderr);
    env.pbs(&["snapshots"]).expect(0);
    // Commands on a directory that is no repository say how to make one.
    let run = std::process::Command::new(bin("haul-pbs"))
        .args(["--repo", "/nonexistent/repo", "snapshots"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("haul-pbs init"));
}

#[test]
fn a_damaged_key_file_does_not_lock_out_another_key() {
    let env = Env::new();
    env.init();
    let second = env.path("second");
    fs::write(&second, "another passphrase\n").unwrap();
    env.pbs(&[
        "key",
        "add",
        "--new-password-file",
        second.to_str().unwrap(),
    ])
    .expect(0);
    // Damage the key file the repository lists first (its directory's order), and
    // open with the other key's passphrase.
    let first = fs::read_dir(env.repo().join("keys"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let name = first.file_name().unwrap().to_str().unwrap().to_string();
    let keys = env.pbs(&["--json", "key", "list"]).expect(0).json();
    let current = keys.iter().find(|k| k["current"] == true).unwrap()["id"].clone();
    let (damaged_pass, other_pass) = if current == name.as_str() {
        (env.path("pass"), second.clone())
    } else {
        (second.clone(), env.path("pass"))
    };
    let other = other_pass.to_str().unwrap();
    fs::write(&first, b"{\"version\": 1, \"crea").unwrap();

    let run = env.pbs(&["--password-file", other, "snapshots"]).expect(0);
    assert!(
        run.stderr.contains(&format!(
            "key file keys/{name} (EOF while parsing a string at line 1 column 20) is damaged and was skipped: if it is the key of this passphrase, put back a copy of it; `haul-pbs key remove {}` removes it",
            &name[..8]
        )),
        "{}",
        run.stderr
    );
    // `key list` lists it as damaged.
    let keys = env
        .pbs(&["--password-file", other, "--json", "key", "list"])
        .expect(0)
        .json();
    assert_eq!(keys.len(), 2, "{keys:?}");
    let broken = keys.iter().find(|k| k["id"] == name.as_str()).unwrap();
    assert_eq!(
        broken["damaged"],
        "EOF while parsing a string at line 1 column 20"
    );
    assert!(broken["created"].is_null() && broken["current"] == false);
    let run = env
        .pbs(&["--password-file", other, "key", "list"])
        .expect(0);
    assert!(
        run.stdout.contains(&format!("{}   DAMAGED: ", &name[..8])),
        "{}",
        run.stdout
    );
    // The damaged key's passphrase opens nothing, and the error says why.
    let run = env
        .pbs(&[
            "--password-file",
            damaged_pass.to_str().unwrap(),
            "snapshots",
        ])
        .expect(1);
    assert!(
        run.stderr.contains(&format!(
            "haul-pbs: wrong passphrase: none of the 1 key file(s) of this repository opens with it; 1 damaged key file(s) could not be tried: keys/{name} (EOF while parsing a string at line 1 column 20); if the passphrase belongs to one of them, put back a copy of that file in keys/"
        )),
        "{}",
        run.stderr
    );
    // The other key removes it; then nothing is damaged.
    env.pbs(&["--password-file", other, "key", "remove", &name[..8]])
        .expect(0);
    let run = env.pbs(&["--password-file", other, "snapshots"]).expect(0);
    assert!(!run.stderr.contains("damaged"), "{}", run.stderr);
}
