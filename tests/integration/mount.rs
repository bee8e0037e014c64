//! `mount`: the repository through the real kernel FUSE (fuse3), browsed with the
//! file system calls every tool uses, compared with restores of the same snapshots.

use haul_tests::*;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A `haul-pbs mount` in the background, unmounted and stopped however the test ends.
struct Mounted {
    child: std::process::Child,
    at: PathBuf,
}

/// Whether `at` is a mount point (in this process's mount table).
fn is_mounted(at: &Path) -> bool {
    let at = at.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(at.as_str()))
}

impl Mounted {
    fn start(env: &Env, at: &Path, extra: &[&str]) -> Mounted {
        fs::create_dir_all(at).unwrap();
        let mut args = vec!["mount", at.to_str().unwrap()];
        args.extend_from_slice(extra);
        let child = env
            .pbs_command(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(fs::File::create(env.path("mount.log")).unwrap())
            .spawn()
            .unwrap();
        let mut m = Mounted {
            child,
            at: at.to_path_buf(),
        };
        wait_until(Duration::from_secs(30), "the mount", || {
            if let Ok(Some(status)) = m.child.try_wait() {
                panic!(
                    "mount exited with {status}: {}",
                    fs::read_to_string(env.path("mount.log")).unwrap()
                );
            }
            is_mounted(&m.at)
        });
        m
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.at) {
            let _ = std::process::Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.at)
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The snapshots of `env`'s repository: (short id, time name unknown), oldest first.
fn snapshot_ids(env: &Env) -> Vec<String> {
    env.pbs(&["--json", "snapshots"])
        .expect(0)
        .json()
        .into_iter()
        .filter(|v| v["type"] == "snapshot")
        .map(|v| v["id"].as_str().unwrap()[..8].to_string())
        .collect()
}

#[test]
fn every_snapshot_through_the_mount_equals_its_restore_and_sigterm_unmounts() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    make_fixture(&src);
    // A large file, to read in order and at random offsets.
    let large = random_bytes(7, 24 * 1024 * 1024 + 4321);
    fs::write(src.join("large.bin"), &large).unwrap();
    env.backup(&[&src], &["--tag", "first"]);
    fs::write(src.join("dir/text.txt"), "changed\n").unwrap();
    fs::remove_file(src.join("linked-b")).unwrap();
    fs::write(src.join("added"), "added later\n").unwrap();
    env.backup(&[&src], &["--tag", "second"]);
    let ids = snapshot_ids(&env);
    assert_eq!(ids.len(), 2);

    let mnt = env.path("mnt");
    let m = Mounted::start(&env, &mnt, &[]);
    let rel = src.strip_prefix("/").unwrap();

    // The folders: every snapshot by time, by host, by tag and by id, with `latest`.
    let mut times: Vec<String> = fs::read_dir(mnt.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    times.sort();
    assert_eq!(times.len(), 3, "{times:?}");
    assert_eq!(times[2], "latest");
    assert_eq!(
        fs::read_link(mnt.join("snapshots/latest")).unwrap(),
        Path::new(&times[1])
    );
    let host = fs::read_dir(mnt.join("hosts"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect::<Vec<_>>();
    assert_eq!(host.len(), 1);
    let by_host = mnt.join("hosts").join(&host[0]);
    assert_eq!(
        fs::read_link(by_host.join("latest")).unwrap(),
        Path::new(&times[1])
    );
    assert!(mnt.join("tags/first").join(&times[0]).is_dir());
    assert!(!mnt.join("tags/first").join(&times[1]).exists());
    assert!(mnt.join("tags/second").join(&times[1]).is_dir());

    // Each snapshot, walked through the mount, equals its restore: names, kinds,
    // modes, owners, sizes, nanosecond mtimes, device numbers, link targets, xattrs,
    // contents and hard links.
    for (i, id) in ids.iter().enumerate() {
        let target = env.path(&format!("restored-{i}"));
        env.pbs(&["restore", id, "--target", target.to_str().unwrap()])
            .expect(0);
        assert_same_tree(&target.join(rel), &mnt.join("ids").join(id).join(rel));
        assert_same_tree(
            &target.join(rel),
            &mnt.join("snapshots").join(&times[i]).join(rel),
        );
    }
    // The second snapshot: the changed file and the one hard link fewer.
    let second = mnt.join("snapshots/latest").join(rel);
    assert_eq!(fs::read(second.join("dir/text.txt")).unwrap(), b"changed\n");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(second.join("linked-a")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(second.join("linked-a")).unwrap().ino(),
        fs::metadata(second.join("dir/linked-c")).unwrap().ino()
    );

    // The large file in order, and at random offsets and lengths (within chunks,
    // across them, past the end).
    let through = second.join("large.bin");
    assert_eq!(fs::read(&through).unwrap(), large);
    let f = fs::File::open(&through).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..300 {
        let at = next() % (large.len() as u64 + 1000);
        let len = (next() % (3 << 20)) as usize;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match f.read_at(&mut buf[got..], at + got as u64).unwrap() {
                0 => break,
                n => got += n,
            }
        }
        let from = (at as usize).min(large.len());
        let to = (at as usize + len).min(large.len());
        assert_eq!(&buf[..got], &large[from..to], "at {at}, {len} bytes");
    }
    drop(f);

    // Read-only: nothing is written, created or removed.
    let err = fs::OpenOptions::new()
        .write(true)
        .open(second.join("small.txt"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = fs::write(second.join("new"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert_eq!(
        fs::remove_file(second.join("small.txt"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );

    // A snapshot taken while mounted appears (and reads) without remounting.
    fs::write(src.join("third"), "taken while mounted\n").unwrap();
    env.backup(&[&src], &[]);
    let third = snapshot_ids(&env).pop().unwrap();
    wait_until(Duration::from_secs(30), "the new snapshot", || {
        mnt.join("ids").join(&third).is_dir()
    });
    // ... and in the listings the kernel keeps (their mtime moved on).
    wait_until(Duration::from_secs(30), "the new snapshot listed", || {
        fs::read_dir(mnt.join("ids"))
            .unwrap()
            .any(|e| e.unwrap().file_name() == third.as_str())
    });
    assert_eq!(fs::read_dir(mnt.join("snapshots")).unwrap().count(), 4);
    assert_eq!(
        fs::read(mnt.join("ids").join(&third).join(rel).join("third")).unwrap(),
        b"taken while mounted\n"
    );
    // `latest` moves on to it (the kernel keeps link targets: a moved link is a new
    // inode).
    wait_until(Duration::from_secs(30), "latest to move on", || {
        fs::read(mnt.join("snapshots/latest").join(rel).join("third")).is_ok()
    });
    assert_eq!(
        fs::read(by_host.join("latest").join(rel).join("third")).unwrap(),
        b"taken while mounted\n"
    );

    // SIGTERM unmounts and ends the process, with nothing left behind.
    let pid = m.pid();
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let mut m = m;
    let status = {
        let mut status = None;
        wait_until(Duration::from_secs(20), "the mount to end", || {
            status = m.child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    };
    assert!(
        status.success(),
        "{status}: {}",
        fs::read_to_string(env.path("mount.log")).unwrap()
    );
    assert!(!is_mounted(&mnt));
    assert!(!alive(pid));
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), 0);
}

#[test]
fn a_mount_point_that_is_missing_or_a_file_is_named_and_nothing_is_mounted() {
    let (env, src) = Env::with_one_file();
    env.backup(&[&src], &[]);
    let missing = env.path("not-there");
    let run = env.pbs(&["mount", missing.to_str().unwrap()]).expect(1);
    assert!(
        run.stderr.contains(&format!(
            "mount point {} (create it first)",
            missing.display()
        )),
        "{}",
        run.stderr
    );
    let file = env.path("a-file");
    fs::write(&file, "x").unwrap();
    let run = env.pbs(&["mount", file.to_str().unwrap()]).expect(2);
    assert!(run.stderr.contains("is not a directory"), "{}", run.stderr);
    assert!(!is_mounted(&file) && !is_mounted(&missing));
    // The same repository mounts on a directory, filtered to one host that has none.
    let mnt = env.path("mnt");
    let _m = Mounted::start(&env, &mnt, &["--host", "nobody"]);
    assert_eq!(fs::read_dir(mnt.join("snapshots")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(mnt.join("hosts")).unwrap().count(), 0);
}

#[test]
fn a_damaged_chunk_reads_as_an_error_naming_it_and_the_other_files_read() {
    let (env, src) = Env::with_source();
    fs::write(src.join("victim.bin"), random_bytes(30, 3 * 1024 * 1024)).unwrap();
    let fine = "fine\n".repeat(1000);
    fs::write(src.join("bystander.txt"), &fine).unwrap();
    env.backup(&[&src], &[]);
    // The data pack is the largest file under data/; its start is the victim's.
    let pack = env.largest_pack();
    flip_byte(&pack, 1000);

    let mnt = env.path("mnt");
    let m = Mounted::start(&env, &mnt, &[]);
    let dir = mnt
        .join("snapshots/latest")
        .join(src.strip_prefix("/").unwrap());
    // The bystander first: reading it fetches the victim ahead, which must not put
    // anything of it in the kernel's cache.
    assert_eq!(
        fs::read(dir.join("bystander.txt")).unwrap(),
        fine.as_bytes()
    );
    let err = fs::read(dir.join("victim.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Its metadata still reads, and the log names the damaged chunk.
    assert_eq!(
        fs::metadata(dir.join("victim.bin")).unwrap().len(),
        3 * 1024 * 1024
    );
    drop(m);
    let log = fs::read_to_string(env.path("mount.log")).unwrap();
    assert!(log.contains("chunk ") && log.contains("ERROR"), "{log}");
}
