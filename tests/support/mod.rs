//! The test harness: temporary workspaces, the `haul-pbs` binary, fixture trees with
//! every kind of file, and a comparison of two trees by bytes *and* metadata.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod ceph;

/// The directory holding the workspace's built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/integration-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} is not built: run `cargo build --workspace --bins` before the tests (scripts/test.sh does)", p.display());
    p
}

/// A scratch area with a repository path, a passphrase file and a cache dir.
pub struct Env {
    pub dir: tempfile::TempDir,
    /// `--repo` of its commands when not the local `repo` directory (object storage).
    pub location: Option<String>,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from_output(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics with the output unless the exit code is `code`.
    pub fn expect(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "exit code {} (wanted {code})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// The JSON lines of stdout.
    pub fn json(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
            .collect()
    }

    /// The one line of stdout whose "type" is `t`.
    pub fn json_of(&self, t: &str) -> serde_json::Value {
        let v: Vec<_> = self.json().into_iter().filter(|v| v["type"] == t).collect();
        assert_eq!(v.len(), 1, "one {t} line expected in:\n{}", self.stdout);
        v.into_iter().next().unwrap()
    }
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("haul-test-")
            .tempdir()
            .expect("tempdir");
        fs::write(dir.path().join("pass"), "correct horse battery staple\n").unwrap();
        Env {
            dir,
            location: None,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn repo(&self) -> PathBuf {
        self.path("repo")
    }

    /// Runs `haul-pbs` with this env's repository, passphrase file and cache.
    pub fn pbs(&self, args: &[&str]) -> Run {
        self.pbs_with(args, &[])
    }

    pub fn pbs_with(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = self.pbs_command(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Run::from_output(cmd.output().expect("run haul-pbs"))
    }

    /// The `haul-pbs` command [`Env::pbs`] runs, to start it in the background.
    pub fn pbs_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("haul-pbs"));
        match &self.location {
            Some(l) => cmd.arg("--repo").arg(l),
            None => cmd.arg("--repo").arg(self.repo()),
        };
        if !args.contains(&"--password-file") {
            cmd.arg("--password-file").arg(self.path("pass"));
        }
        cmd.arg("--cache-dir")
            .arg(self.path("cache"))
            .args(args)
            // Runs that record themselves (check, import) do it here, not in /var/lib,
            // and a configuration of the machine's (/etc/haul/pbs.toml) is not used.
            .env("HAUL_STATE_DIR", self.path("state"))
            .env("HAUL_CONFIG", "/dev/null")
            .env_remove("HAUL_REPO")
            .env_remove("HAUL_PASSWORD")
            .env_remove("HAUL_PASSWORD_FILE")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .stdin(std::process::Stdio::null());
        cmd
    }

    /// The run records of this workspace's history (`runs --json`), oldest first.
    pub fn runs(&self) -> Vec<serde_json::Value> {
        self.pbs(&["--json", "runs"])
            .expect(0)
            .json()
            .into_iter()
            .map(|v| v["run"].clone())
            .collect()
    }

    /// The largest pack file of this env's repository (a data pack: trees are few).
    pub fn largest_pack(&self) -> PathBuf {
        walk_files(&self.repo().join("data"))
            .into_iter()
            .max_by_key(|p| fs::metadata(p).unwrap().len())
            .expect("a pack")
    }

    pub fn init(&self) {
        self.pbs(&["init"]).expect(0);
    }

    /// `pull --local PATH...` with `--json`, recorded in this env's state directory;
    /// returns the run and its record.
    pub fn pull_local(&self, paths: &[&Path], extra: &[&str]) -> (Run, serde_json::Value) {
        let mut args = vec!["--json".to_string(), "pull".into()];
        for p in paths {
            args.push("--local".into());
            args.push(p.display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("--state-dir".into());
        args.push(self.path("state").display().to_string());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = self.pbs(&a);
        let record = run
            .json()
            .into_iter()
            .find(|v| v["type"] == "run")
            .unwrap_or_else(|| panic!("no run record in:\n{}\n{}", run.stdout, run.stderr))["run"]
            .clone();
        (run, record)
    }

    /// This env's repository, opened in-process with its passphrase and indexed.
    pub fn open_repo(&self) -> haul_repo::IndexedRepository {
        let backend: std::sync::Arc<dyn haul_repo::backend::Backend> =
            std::sync::Arc::new(haul_repo::backend::LocalBackend::open(&self.repo()).unwrap());
        let pass = fs::read_to_string(self.path("pass")).unwrap();
        haul_repo::Repository::open(backend, pass.trim_end().as_bytes())
            .unwrap()
            .load_index(None)
            .unwrap()
    }

    /// Backs `paths` up with `--json` and returns the summary line.
    pub fn backup(&self, paths: &[&Path], extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["--json", "backup-local"];
        let p: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        args.extend(p.iter().map(|s| s.as_str()));
        args.extend_from_slice(extra);
        self.pbs(&args).expect(0).json_of("summary")
    }

    /// `restore latest --target TARGET [--include P]...`.
    pub fn restore(&self, target: &Path, includes: &[&Path]) -> Run {
        let mut args = vec![
            "restore".to_string(),
            "latest".into(),
            "--target".into(),
            target.display().to_string(),
        ];
        for p in includes {
            args.push("--include".into());
            args.push(p.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.pbs(&args)
    }

    /// A new repository and an empty source directory `src`.
    pub fn with_source() -> (Env, PathBuf) {
        let env = Env::new();
        env.init();
        let src = env.path("src");
        fs::create_dir_all(&src).unwrap();
        (env, src)
    }

    /// A new repository and a source directory `src` holding one small file.
    pub fn with_one_file() -> (Env, PathBuf) {
        let (env, src) = Env::with_source();
        fs::write(src.join("f"), b"data").unwrap();
        (env, src)
    }

    pub fn count(&self, sub: &str) -> usize {
        walk_files(&self.repo().join(sub)).len()
    }
}

impl Default for Env {
    fn default() -> Self {
        Env::new()
    }
}

/// Every regular file below `dir`.
pub fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                out.extend(walk_files(&p));
            } else if ft.is_file() {
                out.push(p);
            }
        }
    }
    out
}

/// Runs a tool the tests depend on (`what` names it and its package); it must succeed.
/// Returns its stdout.
pub fn run_tool(cmd: &mut std::process::Command, what: &str) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} {cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs rdiff-backup with `args`; it must succeed.
pub fn rdiff_backup(args: &[&str]) {
    let mut cmd = std::process::Command::new("rdiff-backup");
    cmd.args(args);
    run_tool(&mut cmd, "rdiff-backup (apt-get install rdiff-backup)");
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let ts = libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [ts, ts].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", path.display());
}

/// A tree with every kind of entry restore must bring back: files of many sizes
/// (empty, multi-chunk), a sparse file, odd modes, xattrs, hard links, symlinks
/// (relative, absolute, dangling), a fifo, a socket, device nodes and foreign
/// ownership (as root), an empty directory, a non-UTF-8 name, nanosecond mtimes.
pub fn make_fixture(root: &Path) {
    fs::create_dir_all(root.join("dir/sub/deeper")).unwrap();
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("small.txt"), b"hello haul\n").unwrap();
    fs::write(root.join("dir/text.txt"), "line of text\n".repeat(5000)).unwrap();
    fs::write(
        root.join("dir/sub/big.bin"),
        random_bytes(1, 5 * 1024 * 1024 + 12345),
    )
    .unwrap();
    fs::write(
        root.join("dir/sub/deeper/mid.bin"),
        random_bytes(2, 700_000),
    )
    .unwrap();
    // Sparse: 8 MiB hole, then data, then another hole up to 20 MiB.
    {
        let f = fs::File::create(root.join("sparse.img")).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&random_bytes(3, 100_000), 8 * 1024 * 1024)
            .unwrap();
        f.set_len(20 * 1024 * 1024).unwrap();
    }
    // Fully allocated, with a long run of zeros (a preallocated write-ahead log): it
    // must not come back with holes.
    {
        let mut wal = random_bytes(4, 1024 * 1024);
        wal.resize(5 * 1024 * 1024, 0);
        wal.extend_from_slice(&random_bytes(5, 1024 * 1024));
        fs::write(root.join("prealloc.wal"), wal).unwrap();
    }
    // Modes.
    fs::write(root.join("setuid"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::write(root.join("private"), b"secret").unwrap();
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(root.join("dir/sub"), fs::Permissions::from_mode(0o750)).unwrap();
    // Bits a umask takes from a new file, and setgid with sticky: a restore creates a
    // file with its permission bits and must set these after.
    fs::write(root.join("shared"), b"everyone writes").unwrap();
    fs::set_permissions(root.join("shared"), fs::Permissions::from_mode(0o666)).unwrap();
    fs::write(root.join("setgid-sticky"), b"rare").unwrap();
    fs::set_permissions(
        root.join("setgid-sticky"),
        fs::Permissions::from_mode(0o3751),
    )
    .unwrap();
    // Extended attributes on a file and a directory.
    xattr::set(root.join("small.txt"), "user.haul.note", b"kept").unwrap();
    xattr::set(root.join("small.txt"), "user.haul.bin", &[0u8, 255, 7]).unwrap();
    xattr::set(root.join("dir"), "user.haul.dir", b"dir attr").unwrap();
    // Hard links: three names for one file, across directories.
    fs::write(root.join("linked-a"), b"one inode, several names").unwrap();
    fs::hard_link(root.join("linked-a"), root.join("linked-b")).unwrap();
    fs::hard_link(root.join("linked-a"), root.join("dir/linked-c")).unwrap();
    // Symlinks.
    std::os::unix::fs::symlink("small.txt", root.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling")).unwrap();
    std::os::unix::fs::symlink("../..", root.join("dir/up-link")).unwrap();
    // Non-UTF-8 name.
    fs::write(
        root.join(OsStr::from_bytes(b"caf\xe9-\xff.bin")),
        b"latin-1 name",
    )
    .unwrap();
    // Special files.
    let fifo = std::ffi::CString::new(root.join("fifo").as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    {
        let _l = std::os::unix::net::UnixListener::bind(root.join("socket")).unwrap();
    }
    if is_root() {
        let dev = |name: &str, kind: libc::mode_t, major: u32, minor: u32| {
            let c = std::ffi::CString::new(root.join(name).as_os_str().as_bytes()).unwrap();
            assert_eq!(
                unsafe { libc::mknod(c.as_ptr(), kind | 0o660, libc::makedev(major, minor)) },
                0
            );
        };
        dev("chardev", libc::S_IFCHR, 1, 3);
        dev("blockdev", libc::S_IFBLK, 7, 200);
        for (p, uid, gid) in [
            ("private", 1234, 5678),
            ("dir/sub", 4321, 8765),
            ("rel-link", 99, 98),
        ] {
            std::os::unix::fs::lchown(root.join(p), Some(uid), Some(gid)).unwrap();
        }
        // A file capability (security.capability), on a file of another owner: chown
        // clears it, so a restore that sets the owner after it loses it.
        let capable = root.join("capable");
        fs::write(&capable, b"#!/bin/sh\nexit 0\n").unwrap();
        std::os::unix::fs::lchown(&capable, Some(1000), Some(1000)).unwrap();
        run_tool(
            Command::new("setcap").arg("cap_net_raw+ep").arg(&capable),
            "setcap (Debian's libcap2-bin)",
        );
    }
    // Nanosecond mtimes, including a directory (set last, after its contents).
    set_mtime(&root.join("small.txt"), 1_600_000_000, 123_456_789);
    set_mtime(&root.join("rel-link"), 1_500_000_000, 987_654_321);
    set_mtime(&root.join("dir/sub"), 1_400_000_000, 5);
    set_mtime(&root.join("empty-dir"), 1_300_000_000, 999_999_999);
}

/// What is compared of each entry.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    pub rdev: u64,
    pub content: Option<[u8; 32]>,
    pub target: Option<Vec<u8>>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Relative paths that share one inode.
pub type LinkGroup = Vec<Vec<u8>>;

/// Every entry below `root` by relative path, plus the hard-link groups (sets of paths
/// sharing an inode).
pub fn snapshot_of(root: &Path) -> (BTreeMap<Vec<u8>, Entry>, Vec<LinkGroup>) {
    let mut entries = BTreeMap::new();
    let mut inodes: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
    fn visit(
        root: &Path,
        dir: &Path,
        out: &mut BTreeMap<Vec<u8>, Entry>,
        inodes: &mut HashMap<u64, Vec<Vec<u8>>>,
    ) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec();
            let ft = m.file_type();
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_file() {
                "file"
            } else if ft.is_dir() {
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_fifo() {
                "fifo"
            } else if ft.is_socket() {
                "socket"
            } else if ft.is_char_device() {
                "chardev"
            } else {
                "blockdev"
            };
            let xattrs = if ft.is_symlink() {
                BTreeMap::new()
            } else {
                xattr::list(&p)
                    .unwrap()
                    .map(|n| {
                        (
                            n.as_bytes().to_vec(),
                            xattr::get(&p, &n).unwrap().unwrap_or_default(),
                        )
                    })
                    .collect()
            };
            if ft.is_file() && m.nlink() > 1 {
                inodes.entry(m.ino()).or_default().push(rel.clone());
            }
            out.insert(
                rel,
                Entry {
                    kind,
                    mode: if ft.is_symlink() {
                        0
                    } else {
                        m.mode() & 0o7777
                    },
                    uid: m.uid(),
                    gid: m.gid(),
                    size: if ft.is_file() { m.size() } else { 0 },
                    mtime: (m.mtime(), m.mtime_nsec()),
                    rdev: m.rdev(),
                    content: ft
                        .is_file()
                        .then(|| *blake3::hash(&fs::read(&p).unwrap()).as_bytes()),
                    target: ft
                        .is_symlink()
                        .then(|| fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()),
                    xattrs,
                },
            );
            if ft.is_dir() {
                visit(root, &p, out, inodes);
            }
        }
    }
    visit(root, root, &mut entries, &mut inodes);
    let mut groups: Vec<LinkGroup> = inodes
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    groups.sort();
    (entries, groups)
}

/// Asserts that two trees are equal in bytes and metadata, entry by entry.
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let (a, ga) = snapshot_of(expected);
    let (b, gb) = snapshot_of(actual);
    let names_a: Vec<String> = a
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    let names_b: Vec<String> = b
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(
        names_a,
        names_b,
        "entries differ between {} and {}",
        expected.display(),
        actual.display()
    );
    for (k, ea) in &a {
        assert_eq!(
            Some(ea),
            b.get(k),
            "entry {} differs",
            String::from_utf8_lossy(k)
        );
    }
    assert_eq!(ga, gb, "hard-link groups differ");
}

/// Bytes actually allocated to a file (to see holes).
pub fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

/// Flips one byte of `path` at `offset`.
pub fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

/// Appends a line to a file (to make a change).
pub fn append(path: &Path, text: &str) {
    let mut f = fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// A private OpenSSH sshd on 127.0.0.1 with its own host key, configuration and
/// authorized_keys, whose one key may run only `haul-wrapper` with a policy of the
/// test's. Killed when dropped.
pub struct Sshd {
    pub dir: PathBuf,
    pub port: u16,
    child: std::process::Child,
}

impl Sshd {
    /// Makes in `dir` an sshd host key (`hostkey`), the pbs's key (`id_ed25519`) and a
    /// `known_hosts` that pins the host key for 127.0.0.1:`port`.
    pub fn make_keys(dir: &Path, port: u16) {
        for (name, file) in [("host", "hostkey"), ("client", "id_ed25519")] {
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                .arg(dir.join(file))
                .output()
                .expect("ssh-keygen (apt-get install openssh-client)");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let host_pub = fs::read_to_string(dir.join("hostkey.pub")).unwrap();
        let mut fields = host_pub.split_whitespace();
        let (algo, key) = (fields.next().unwrap(), fields.next().unwrap());
        fs::write(
            dir.join("known_hosts"),
            format!("[127.0.0.1]:{port} {algo} {key}\n"),
        )
        .unwrap();
    }

    /// Starts sshd under `dir` (created). `backup_roots` go into the wrapper's policy.
    pub fn start(dir: &Path, backup_roots: &[&Path]) -> Sshd {
        Sshd::start_with(dir, backup_roots, &[])
    }

    /// Like [`Sshd::start`], with restores allowed into `restore_targets`.
    pub fn start_with(dir: &Path, backup_roots: &[&Path], restore_targets: &[&Path]) -> Sshd {
        fs::create_dir_all(dir.join("sockets")).unwrap();
        fs::set_permissions(dir.join("sockets"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::create_dir_all("/run/sshd").ok();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        Sshd::make_keys(dir, port);
        let list = |paths: &[&Path]| {
            paths
                .iter()
                .map(|r| format!("{:?}", r.display().to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        fs::write(
            dir.join("wrapper.toml"),
            format!(
                "agent = {:?}\nsocket_dir = {:?}\nbackup_roots = [{}]\nrestore_targets = [{}]\n",
                bin("haul-agent").display().to_string(),
                dir.join("sockets").display().to_string(),
                list(backup_roots),
                list(restore_targets)
            ),
        )
        .unwrap();
        let client_pub = fs::read_to_string(dir.join("id_ed25519.pub")).unwrap();
        fs::write(
            dir.join("authorized_keys"),
            format!(
                "command=\"{} --policy {}\",restrict,port-forwarding {}",
                bin("haul-wrapper").display(),
                dir.join("wrapper.toml").display(),
                client_pub.trim()
            ),
        )
        .unwrap();
        fs::write(
            dir.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/hostkey\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nAllowTcpForwarding remote\nPermitListen none\n\
                 PermitOpen none\nAllowStreamLocalForwarding remote\nStreamLocalBindUnlink yes\n\
                 StreamLocalBindMask 0177\nX11Forwarding no\nAllowAgentForwarding no\nPermitTTY no\n\
                 ClientAliveInterval 30\nClientAliveCountMax 3\nLogLevel VERBOSE\n\
                 SetEnv PATH={bins}:/usr/local/bin:/usr/bin:/bin\n",
                d = dir.display(),
                // The agent is on the login PATH, as where it is installed for real:
                // a key without the forced command would find it.
                bins = bin_dir().display()
            ),
        )
        .unwrap();
        let mut sshd = Sshd {
            dir: dir.to_path_buf(),
            port,
            child: Sshd::spawn(dir),
        };
        sshd.wait_listening();
        sshd
    }

    fn spawn(dir: &Path) -> std::process::Child {
        Command::new("/usr/sbin/sshd")
            .args(["-D", "-f"])
            .arg(dir.join("sshd_config"))
            .arg("-E")
            .arg(dir.join("sshd.log"))
            .spawn()
            .expect("/usr/sbin/sshd (apt-get install openssh-server)")
    }

    fn wait_listening(&mut self) {
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("sshd did not listen on {}: {}", self.port, self.log());
    }

    /// Makes `command` the forced command of the pbs's key (no forwarding, no pty: the
    /// `restrict` of a key that only runs that command).
    pub fn force_command(&self, command: &str) {
        let client_pub = fs::read_to_string(self.dir.join("id_ed25519.pub")).unwrap();
        fs::write(
            self.dir.join("authorized_keys"),
            format!("command={command:?},restrict {}\n", client_pub.trim()),
        )
        .unwrap();
    }

    /// An sshd playing another pbs: its key's forced command is `haul-pbs receive
    /// RECEIVE_ARGS` into `repo` (opened with `pass`, its state and cache in
    /// `state`, `cache`), with `extra_env` (`NAME=value ...`) in its environment.
    pub fn receiving(
        dir: &Path,
        (repo, pass): (&Path, &Path),
        (state, cache): (&Path, &Path),
        receive_args: &str,
        extra_env: &str,
    ) -> Sshd {
        let sshd = Sshd::start(dir, &[]);
        sshd.force_command(&format!(
            "env HAUL_STATE_DIR={} HAUL_CONFIG=/dev/null {extra_env} {} --repo {} --password-file {} --cache-dir {} receive {receive_args}",
            state.display(),
            bin("haul-pbs").display(),
            repo.display(),
            pass.display(),
            cache.display(),
        ));
        sshd
    }

    /// A `[[remote]]` of a pbs configuration for the pbs behind this sshd.
    pub fn remote_config(&self, name: &str) -> String {
        format!(
            "[[remote]]\nname = {name:?}\naddress = \"127.0.0.1\"\nport = {}\nuser = {:?}\nidentity = {:?}\nknown_hosts = {:?}\n",
            self.port,
            Sshd::user(),
            self.dir.join("id_ed25519").display().to_string(),
            self.dir.join("known_hosts").display().to_string(),
        )
    }

    /// Writes `script` to `path` as an executable and makes the wrapper's policy run it
    /// instead of the agent (an attacker's program behind the forced command); returns
    /// the honest policy, to put back.
    pub fn put_in_place_of_the_agent(&self, path: &Path, script: &str) -> String {
        fs::write(path, script).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
        let policy = self.dir.join("wrapper.toml");
        let honest = fs::read_to_string(&policy).unwrap();
        let agent_line = honest.lines().next().unwrap().to_string();
        assert!(agent_line.starts_with("agent = "), "{honest}");
        let replaced = honest.replacen(
            &agent_line,
            &format!("agent = {:?}", path.display().to_string()),
            1,
        );
        fs::write(&policy, replaced).unwrap();
        honest
    }

    /// The listening sshd's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts sshd again (after it was killed) with the same keys, port and config.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Sshd::spawn(&self.dir);
        self.wait_listening();
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// Asserts that no socket in the host's socket directory accepts connections: no
    /// forward of a run is left listening.
    pub fn assert_nothing_listening(&self) {
        for e in fs::read_dir(self.dir.join("sockets")).unwrap() {
            let p = e.unwrap().path();
            assert!(
                std::os::unix::net::UnixStream::connect(&p).is_err(),
                "{} still accepts connections",
                p.display()
            );
        }
    }

    /// The user this process runs as: sshd (not run as root) admits only that one.
    pub fn user() -> String {
        let pw = unsafe { libc::getpwuid(libc::geteuid()) };
        assert!(!pw.is_null());
        unsafe { std::ffi::CStr::from_ptr((*pw).pw_name) }
            .to_string_lossy()
            .into_owned()
    }

    /// Pins a freshly made key for this sshd's address in its known_hosts (as if the
    /// host's key had changed); returns the pinned line it replaced.
    pub fn pin_another_key(&self) -> String {
        let known = self.dir.join("known_hosts");
        let pinned = fs::read_to_string(&known).unwrap();
        let other = self.dir.join("other_hostkey");
        let _ = fs::remove_file(&other);
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&other)
            .output()
            .unwrap();
        assert!(out.status.success());
        let other_pub = fs::read_to_string(other.with_extension("pub")).unwrap();
        let mut f = other_pub.split_whitespace();
        fs::write(
            &known,
            format!(
                "[127.0.0.1]:{} {} {}\n",
                self.port,
                f.next().unwrap(),
                f.next().unwrap()
            ),
        )
        .unwrap();
        pinned
    }

    /// A pbs configuration with one host `name` backing up `paths` through this sshd.
    pub fn pbs_config(&self, name: &str, paths: &[&Path]) -> PathBuf {
        let paths: Vec<String> = paths
            .iter()
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect();
        let file = self.dir.join("pbs.toml");
        fs::write(
            &file,
            format!(
                "[[host]]\nname = {name:?}\naddress = \"127.0.0.1\"\nport = {}\nuser = {:?}\n\
                 identity = {:?}\nknown_hosts = {:?}\nsocket_dir = {:?}\npaths = [{}]\n",
                self.port,
                Sshd::user(),
                self.dir.join("id_ed25519").display().to_string(),
                self.dir.join("known_hosts").display().to_string(),
                self.dir.join("sockets").display().to_string(),
                paths.join(", ")
            ),
        )
        .unwrap();
        file
    }

    /// OpenSSH's own client with the pbs's key, asking to run `command`.
    pub fn ssh_command(&self, command: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args([
            "-q",
            "-T",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-i",
        ])
        .arg(self.dir.join("id_ed25519"))
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            self.dir.join("known_hosts").display()
        ))
        .args(["-p", &self.port.to_string()])
        .arg(format!("{}@127.0.0.1", Sshd::user()))
        .arg(command);
        cmd
    }

    /// Runs OpenSSH's own client with the pbs's key: `command` is what it asks to run.
    pub fn ssh(&self, command: &str) -> Run {
        let out = self
            .ssh_command(command)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("ssh (apt-get install openssh-client)");
        Run::from_output(out)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every descendant of process `pid` (children first found, then theirs), with its
/// command name.
pub fn descendants(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        // A child belongs to the thread that started it: ask every thread.
        let mut children = String::new();
        for task in fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            children
                .push_str(&fs::read_to_string(task.path().join("children")).unwrap_or_default());
            children.push(' ');
        }
        for c in children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            let comm = fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default();
            out.push((c, comm.trim().to_string()));
            todo.push(c);
        }
    }
    out
}

/// Whether process `pid` still exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A feed (a file, or a URL) as python3-feedparser reads it: `bozo`, and per entry title, summary, id,
/// guidislink and published_parsed.
pub fn feedparser(path: &Path) -> serde_json::Value {
    let script = r#"
import json, sys, feedparser
d = feedparser.parse(sys.argv[1])
print(json.dumps({"bozo": bool(d.bozo), "title": d.feed.get("title"),
  "link": d.feed.get("link"), "updated": d.feed.get("updated"), "entries": [
    {"title": e.get("title"), "summary": e.get("summary"), "id": e.get("id"), "link": e.get("link"),
     "guidislink": e.get("guidislink"), "published_parsed": list(e.published_parsed) if e.get("published_parsed") else None}
    for e in d.entries]}))
"#;
    let mut cmd = std::process::Command::new("/usr/bin/python3");
    cmd.args(["-c", script]).arg(path);
    let out = run_tool(
        &mut cmd,
        "/usr/bin/python3 with python3-feedparser (apt-get install python3-feedparser)",
    );
    serde_json::from_slice(&out).unwrap()
}

/// `haul-pbs daemon` on `config` (with the built agent), logging to `log`.
pub fn start_daemon(env: &Env, config: &Path, log: &Path) -> KillOnDrop {
    KillOnDrop(
        std::process::Command::new(bin("haul-pbs"))
            .args(["daemon", "--grace", "5s", "--config"])
            .arg(config)
            .env("HAUL_CACHE_DIR", env.path("cache"))
            .env("HAUL_AGENT", bin("haul-agent"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// The pull records of the history in `state`, oldest first.
pub fn pull_records(state: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(state.join("runs.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "pull")
        .collect()
}

/// Waits (up to `limit`, checking every 200 ms) until `pred` holds.
pub fn wait_until(limit: std::time::Duration, what: &str, mut pred: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !pred() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A child process killed and reaped however the test ends.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback address for a daemon's status server that no other test uses.
pub fn free_listen() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// `GET path` from the HTTP server at `addr`: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// A size-limited tmpfs mounted at `path` (we run as root), unmounted when dropped.
pub struct Tmpfs {
    pub path: std::path::PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        run_tool(
            std::process::Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "tmpfs",
                ])
                .arg(path),
            "mount (as root) of a size-limited tmpfs",
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Fills the filesystem to 100% with `fill`: writes until ENOSPC.
    pub fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path.join("fill")).unwrap();
        let block = vec![0xa5u8; 64 * 1024];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", self.path.display()),
            }
        }
        assert_eq!(self.free(), 0, "{} is full", self.path.display());
    }

    /// Fills the filesystem, then gives `bytes` back.
    pub fn fill_leaving(&self, bytes: u64) {
        self.fill();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("fill"))
            .unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(bytes)).unwrap();
    }

    /// Gives back everything [`Tmpfs::fill`] took.
    pub fn unfill(&self) {
        std::fs::remove_file(self.path.join("fill")).unwrap();
    }

    pub fn free(&self) -> u64 {
        let c = std::ffi::CString::new(self.path.to_str().unwrap()).unwrap();
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

impl Drop for Tmpfs {
    /// Unmounts, retrying for at most two seconds while a process still uses it, then
    /// detaches it lazily: a test never hangs here.
    fn drop(&mut self) {
        for _ in 0..20 {
            let done = std::process::Command::new("umount")
                .arg(&self.path)
                .status()
                .is_ok_and(|s| s.success());
            if done {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}
