//! Deduplication: the same data twice adds no packs; shifted data shares most chunks.

use haul_tests::*;
use std::fs;

#[test]
fn same_data_twice_adds_no_data_packs() {
    let env = Env::new();
    env.init();
    let a = env.path("a");
    fs::create_dir_all(&a).unwrap();
    fs::write(a.join("one.bin"), random_bytes(10, 3 * 1024 * 1024)).unwrap();
    fs::write(a.join("two.bin"), random_bytes(11, 2 * 1024 * 1024)).unwrap();
    let first = env.backup(&[&a], &[]);
    assert!(first["bytes_new"].as_u64().unwrap() >= 5 * 1024 * 1024);
    let packs = env.count("data");

    // Read everything again (no parent): no content is stored again. (A tree may be:
    // tests running in parallel change /tmp, an ancestor of the backup path.)
    let again = env.backup(&[&a], &["--force"]);
    assert_eq!(again["bytes_read"], 5 * 1024 * 1024, "{again}");
    assert_eq!(again["data_new"], 0, "{again}");
    assert!(again["bytes_new"].as_u64().unwrap() < 4096, "{again}");
    assert!(
        env.count("data") <= packs + 1,
        "at most one new pack, of trees"
    );

    // The same content under other names, in another directory: no new data either.
    let b = env.path("b");
    fs::create_dir_all(&b).unwrap();
    fs::copy(a.join("one.bin"), b.join("copy-of-one")).unwrap();
    fs::copy(a.join("two.bin"), b.join("copy-of-two")).unwrap();
    let copies = env.backup(&[&b], &[]);
    assert_eq!(copies["bytes_read"], 5 * 1024 * 1024);
    assert_eq!(copies["data_new"], 0, "{copies}");
    // Only the new trees are new.
    assert!(copies["bytes_new"].as_u64().unwrap() < 4096, "{copies}");
}

#[test]
fn shifted_file_shares_most_chunks() {
    let (env, dir) = Env::with_source();
    let data = random_bytes(20, 16 * 1024 * 1024);
    fs::write(dir.join("orig.bin"), &data).unwrap();
    env.backup(&[&dir], &[]);
    let mut shifted = b"a few bytes in front".to_vec();
    shifted.extend_from_slice(&data);
    fs::write(dir.join("shifted.bin"), &shifted).unwrap();
    let s = env.backup(&[&dir], &[]);
    assert_eq!(s["bytes_read"].as_u64().unwrap(), shifted.len() as u64);
    let new = s["bytes_new"].as_u64().unwrap();
    // Only the first chunk differs (at most the 8 MiB maximum, usually about 1 MiB).
    assert!(
        new < 6 * 1024 * 1024,
        "shifting by 20 bytes stored {new} new bytes of 16 MiB"
    );
}

#[test]
fn compressible_data_is_stored_compressed() {
    let (env, dir) = Env::with_source();
    fs::write(
        dir.join("text"),
        "the same words again and again\n".repeat(200_000),
    )
    .unwrap();
    let s = env.backup(&[&dir], &[]);
    let stored = s["bytes_stored"].as_u64().unwrap();
    assert!(
        stored < 200_000,
        "6 MB of repetitive text stored as {stored} bytes"
    );
}

/// Hosts sharing a repository each see only their own history: a second host with the
/// same data sends it all (stored once all the same), and only a repository named in
/// `[server].cross_host_dedup` lets a host build on what others stored.
#[test]
fn a_host_sends_what_others_stored_unless_the_repository_trusts_its_hosts() {
    let env = Env::new();
    let data = env.path("data");
    fs::create_dir_all(&data).unwrap();
    for i in 0..4 {
        fs::write(
            data.join(format!("f{i}.bin")),
            random_bytes(60 + i, 2 << 20),
        )
        .unwrap();
    }
    let state = env.path("state");
    let config = env.path("pbs.toml");
    let write_config = |trusting: bool| {
        let mut text = format!("[server]\nstate_dir = {:?}\n", state.display().to_string());
        if trusting {
            text.push_str("cross_host_dedup = [\"repo\"]\n");
        }
        for h in ["a", "b", "c"] {
            text.push_str(&format!(
                "\n[[host]]\nname = \"{h}\"\naddress = \"localhost\"\ntransport = \"local\"\npaths = [{:?}]\n",
                data.display().to_string()
            ));
        }
        fs::write(&config, text).unwrap();
    };
    let pull = |host: &str| -> serde_json::Value {
        let c = config.display().to_string();
        let out = std::process::Command::new(bin("haul-pbs"))
            .args(["--json", "pull", host, "--config", &c])
            .env("HAUL_AGENT", bin("haul-agent"))
            .env("HAUL_CACHE_DIR", env.path("cache"))
            // [server].state_dir says where the state is, whatever this says.
            .env("HAUL_STATE_DIR", env.path("elsewhere"))
            .env_remove("HAUL_REPO")
            .env_remove("HAUL_PASSWORD_FILE")
            .output()
            .unwrap();
        let run = Run::from_output(out).expect(0);
        run.json_of("run")["run"]["counters"].clone()
    };
    write_config(false);
    let a = pull("a");
    let b = pull("b");
    let sent = |c: &serde_json::Value| c["bytes_received"].as_u64().unwrap();
    assert!(sent(&a) >= 8 << 20, "{a}");
    // b sent everything again (and was told it was all new: nothing says a had it);
    // the repository stored only its trees, as the run's record says.
    assert!(sent(&b) >= 8 << 20, "{b}");
    assert!(b["bytes_stored"].as_u64().unwrap() < 64 << 10, "{b}");
    assert!(!env.path("elsewhere").exists());
    // The configuration says where the repository is: no --repo, no passphrase.
    let snaps = Run::from_output(
        std::process::Command::new(bin("haul-pbs"))
            .args([
                "--json",
                "snapshots",
                "--config",
                &config.display().to_string(),
            ])
            .env("HAUL_CACHE_DIR", env.path("cache"))
            .env_remove("HAUL_REPO")
            .env_remove("HAUL_PASSWORD_FILE")
            .output()
            .unwrap(),
    )
    .expect(0)
    .json();
    let of_b = snaps.iter().find(|s| s["host"] == "b").unwrap();
    assert!(
        of_b["summary"]["bytes_stored"].as_u64().unwrap() < 64 << 10,
        "{of_b}"
    );
    // b's next pull builds on its own snapshot: nothing is sent.
    fs::write(data.join("new.txt"), "one more file\n").unwrap();
    let b2 = pull("b");
    assert!(sent(&b2) < 64 << 10, "{b2}");
    // Trusting hosts: c sends only what nobody stored.
    write_config(true);
    let c = pull("c");
    assert!(sent(&c) < 64 << 10, "{c}");
    eprintln!(
        "a new host whose data another host stored: {} bytes sent alone, {} with cross_host_dedup",
        sent(&b),
        sent(&c)
    );
}
