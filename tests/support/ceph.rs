//! A real distributed object store for the tests: a Ceph cluster of one monitor, three
//! OSDs and a RADOS Gateway (S3), on loopback, in a directory of the test's own, as
//! Ceph's own `vstart.sh` starts one for its CI (cephx on, OSDs on memstore, pools
//! replicated three times and writable with two). Every daemon runs in the foreground
//! as a child of the test and is killed when the cluster is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Ceph {
    dir: PathBuf,
    conf: PathBuf,
    mon: Option<Child>,
    osds: Vec<Option<Child>>,
    rgw: Option<Child>,
    /// `http://127.0.0.1:PORT` of the gateway.
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .unwrap()
        .trim()
        .to_string()
}

impl Ceph {
    /// Starts the cluster and waits until the gateway answers and a user exists.
    pub fn start(dir: &Path) -> Ceph {
        let dir = dir.to_path_buf();
        for d in ["mon", "osd", "run", "log", "rgw"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let (mon_port, rgw_port) = (free_port(), free_port());
        let fsid = uuid();
        let d = dir.display();
        let conf = dir.join("ceph.conf");
        std::fs::write(
            &conf,
            format!(
                "[global]\nfsid = {fsid}\nmon host = [v2:127.0.0.1:{mon_port}]\n\
                 auth cluster required = cephx\nauth service required = cephx\nauth client required = cephx\n\
                 auth allow insecure global id reclaim = true\n\
                 osd pool default size = 3\nosd pool default min size = 2\n\
                 osd crush chooseleaf type = 0\nosd objectstore = memstore\n\
                 memstore device bytes = 1073741824\n\
                 run dir = {d}/run\nadmin socket = {d}/run/$name.asok\nlog file = {d}/log/$name.log\n\
                 mon data = {d}/mon/$name\nosd data = {d}/osd/$name\nkeyring = {d}/keyring\n\
                 ms bind ipv4 = true\nms bind ipv6 = false\n\
                 mon osd auto mark in = true\nmon data avail warn = 1\nmon data avail crit = 0\n\
                 osd heartbeat grace = 5\nosd heartbeat interval = 1\nmon osd down out interval = 0\n\
                 rgw dns name = localhost\n\
                 [osd]\nkeyring = {d}/osd/$name/keyring\n\
                 [client.rgw]\nrgw frontends = beast endpoint=127.0.0.1:{rgw_port}\nrgw data = {d}/rgw\n"
            ),
        )
        .unwrap();
        let keyring = dir.join("keyring");
        let tool = |cmd: &mut Command, what: &str| {
            let out = cmd.output().unwrap_or_else(|e| {
                panic!("{what}: {e} (apt-get install ceph-mon ceph-osd radosgw ceph-common)")
            });
            assert!(
                out.status.success(),
                "{what}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        tool(
            Command::new("ceph-authtool")
                .arg("--create-keyring")
                .arg(&keyring)
                .args(["--gen-key", "-n", "mon.", "--cap", "mon", "allow *"]),
            "ceph-authtool",
        );
        tool(
            Command::new("ceph-authtool").arg(&keyring).args([
                "--gen-key",
                "-n",
                "client.admin",
                "--cap",
                "mon",
                "allow *",
                "--cap",
                "osd",
                "allow *",
                "--cap",
                "mgr",
                "allow *",
            ]),
            "ceph-authtool",
        );
        let monmap = dir.join("monmap");
        tool(
            Command::new("monmaptool")
                .args(["--create", "--addv", "a"])
                .arg(format!("[v2:127.0.0.1:{mon_port}]"))
                .args(["--fsid", &fsid])
                .arg(&monmap),
            "monmaptool",
        );
        tool(
            Command::new("ceph-mon")
                .arg("-c")
                .arg(&conf)
                .args(["--mkfs", "-i", "a", "--monmap"])
                .arg(&monmap)
                .arg("--keyring")
                .arg(&keyring),
            "ceph-mon --mkfs",
        );
        let mut ceph = Ceph {
            conf: conf.clone(),
            mon: None,
            osds: Vec::new(),
            rgw: None,
            endpoint: format!("http://127.0.0.1:{rgw_port}"),
            access_key: "HAULTESTACCESSKEY".into(),
            secret_key: format!("haul-test-{}", &uuid()[..8]),
            dir,
        };
        ceph.mon = Some(ceph.daemon("ceph-mon", &["-i", "a"]));
        for _ in 0..3 {
            let u = uuid();
            let id = ceph.ceph(&["osd", "new", &u]).trim().to_string();
            let osd_dir = ceph.dir.join(format!("osd/osd.{id}"));
            std::fs::create_dir_all(&osd_dir).unwrap();
            let key = ceph.ceph(&[
                "auth",
                "get-or-create",
                &format!("osd.{id}"),
                "mon",
                "allow profile osd",
                "osd",
                "allow *",
                "mgr",
                "allow profile osd",
            ]);
            std::fs::write(osd_dir.join("keyring"), key).unwrap();
            tool(
                Command::new("ceph-osd").arg("-c").arg(&conf).args([
                    "-i",
                    &id,
                    "--mkfs",
                    "--osd-uuid",
                    &u,
                ]),
                "ceph-osd --mkfs",
            );
            let osd = ceph.daemon("ceph-osd", &["-i", &id]);
            ceph.osds.push(Some(osd));
        }
        let rgw_key = ceph.ceph(&[
            "auth",
            "get-or-create",
            "client.rgw",
            "mon",
            "allow rw",
            "osd",
            "allow rwx",
        ]);
        let mut k = std::fs::read_to_string(&keyring).unwrap();
        k.push_str(&rgw_key);
        std::fs::write(&keyring, k).unwrap();
        ceph.wait_for("3 OSDs up", Duration::from_secs(60), |c| {
            c.ceph(&["osd", "stat"]).contains("3 up")
        });
        ceph.rgw = Some(ceph.daemon("radosgw", &["-n", "client.rgw"]));
        ceph.radosgw_admin(&[
            "user",
            "create",
            "--uid=haul",
            "--display-name=haul tests",
            &format!("--access-key={}", ceph.access_key),
            &format!("--secret={}", ceph.secret_key),
        ]);
        let url = ceph.endpoint.clone();
        ceph.wait_for("the gateway", Duration::from_secs(90), |_| {
            Command::new("curl")
                .args(["-sf", "-o", "/dev/null", &url])
                .status()
                .is_ok_and(|s| s.success())
        });
        ceph
    }

    fn daemon(&self, program: &str, args: &[&str]) -> Child {
        Command::new(program)
            .arg("-f")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{program}: {e} (apt-get install ceph-mon ceph-osd radosgw)")
            })
    }

    /// Runs the `ceph` command line tool against the cluster.
    pub fn ceph(&self, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .args(["60", "ceph", "-c"])
            .arg(&self.conf)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ceph {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn radosgw_admin(&self, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .args(["120", "radosgw-admin", "-c"])
            .arg(&self.conf)
            .args(["-n", "client.admin"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "radosgw-admin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn wait_for(&self, what: &str, limit: Duration, ok: impl Fn(&Ceph) -> bool) {
        let start = Instant::now();
        while !ok(self) {
            assert!(
                start.elapsed() < limit,
                "the Ceph cluster in {}: no {what} after {limit:?}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Makes a bucket (a signed S3 PUT, with curl) and returns the repository location
    /// `s3:ENDPOINT/bucket/prefix`.
    pub fn bucket(&self, bucket: &str, prefix: &str) -> String {
        let out = Command::new("curl")
            .args(["-s", "-w", "%{http_code}", "-X", "PUT"])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3"])
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .arg("--user")
            .arg(format!("{}:{}", self.access_key, self.secret_key))
            .arg(format!("{}/{bucket}", self.endpoint))
            .output()
            .expect("curl (apt-get install curl)");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(text.ends_with("200"), "creating bucket {bucket}: {text}");
        format!("s3:{}/{bucket}/{prefix}", self.endpoint)
    }

    /// A second user of the gateway, with its own access key: (access, secret). It
    /// owns nothing; a bucket policy gives it what it may do.
    pub fn user(&self, uid: &str) -> (String, String) {
        let access = format!("HAUL{}", uid.to_uppercase());
        let secret = format!("{uid}-{}", &uuid()[..8]);
        self.radosgw_admin(&[
            "user",
            "create",
            &format!("--uid={uid}"),
            &format!("--display-name={uid}"),
            &format!("--access-key={access}"),
            &format!("--secret={secret}"),
        ]);
        (access, secret)
    }

    /// Sets a bucket's policy (as its owner, with curl).
    pub fn put_policy(&self, bucket: &str, policy: &str) {
        let out = Command::new("curl")
            .args([
                "-s",
                "-w",
                "%{http_code}",
                "-X",
                "PUT",
                "--data-binary",
                policy,
            ])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3"])
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .arg("--user")
            .arg(format!("{}:{}", self.access_key, self.secret_key))
            .arg(format!("{}/{bucket}?policy=", self.endpoint))
            .output()
            .expect("curl (apt-get install curl)");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            text.ends_with("204") || text.ends_with("200"),
            "policy of {bucket}: {text}"
        );
    }

    /// The environment that gives a haul command the cluster's access key.
    pub fn credentials_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
        ]
    }

    /// Kills OSD `i` (of 0, 1, 2) with SIGKILL, as a node that dies.
    pub fn kill_osd(&mut self, i: usize) {
        if let Some(mut c) = self.osds[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Where the daemons log.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("log")
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        let children = self
            .rgw
            .iter_mut()
            .chain(self.osds.iter_mut().flatten())
            .chain(self.mon.iter_mut());
        for c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The bucket policy the README shows for the pulls' key (`user`): read, list and
/// write the repository at `prefix`, delete only its locks. (Written once, here, and
/// copied into the README.)
pub fn append_only_policy(bucket: &str, prefix: &str, user: &str) -> String {
    format!(
        r#"{{"Version": "2012-10-17", "Statement": [
  {{"Effect": "Allow", "Principal": {{"AWS": ["arn:aws:iam:::user/{user}"]}},
   "Action": ["s3:ListBucket"], "Resource": ["arn:aws:s3:::{bucket}"]}},
  {{"Effect": "Allow", "Principal": {{"AWS": ["arn:aws:iam:::user/{user}"]}},
   "Action": ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
   "Resource": ["arn:aws:s3:::{bucket}/{prefix}/*"]}},
  {{"Effect": "Allow", "Principal": {{"AWS": ["arn:aws:iam:::user/{user}"]}},
   "Action": ["s3:DeleteObject"], "Resource": ["arn:aws:s3:::{bucket}/{prefix}/locks/*"]}}
]}}"#
    )
}
