//! A real distributed object store for the tests: the Ceph cluster of
//! `scripts/ceph-cluster.sh` (one monitor, three OSDs, a RADOS Gateway for S3, on
//! loopback) in a directory of the test's own, its daemons killed when it is dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Ceph {
    dir: PathBuf,
    /// `http://127.0.0.1:PORT` of the gateway.
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-cluster.sh")
}

impl Ceph {
    /// Starts the cluster (`scripts/ceph-cluster.sh start`) and waits until the
    /// gateway answers and its user exists.
    pub fn start(dir: &Path) -> Ceph {
        let mut ceph = Ceph {
            dir: dir.to_path_buf(),
            endpoint: String::new(),
            access_key: String::new(),
            secret_key: String::new(),
        };
        // Dropped on a failed start too: what did start is stopped.
        let out = ceph.script(&["start"]);
        for line in out.lines() {
            match line.split_once('=') {
                Some(("ENDPOINT", v)) => ceph.endpoint = v.to_string(),
                Some(("AWS_ACCESS_KEY_ID", v)) => ceph.access_key = v.to_string(),
                Some(("AWS_SECRET_ACCESS_KEY", v)) => ceph.secret_key = v.to_string(),
                _ => {}
            }
        }
        assert!(
            !ceph.endpoint.is_empty(),
            "ceph-cluster.sh start said: {out}"
        );
        ceph
    }

    fn script(&self, args: &[&str]) -> String {
        let (cmd, rest) = args.split_first().unwrap();
        let out = Command::new(script())
            .arg(cmd)
            .arg(&self.dir)
            .args(rest)
            .output()
            .expect("scripts/ceph-cluster.sh");
        assert!(
            out.status.success(),
            "ceph-cluster.sh {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the `ceph` command line tool against the cluster.
    pub fn ceph(&self, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .args(["60", "ceph", "-c"])
            .arg(self.dir.join("ceph.conf"))
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

    /// Makes a bucket and returns the repository location `s3:ENDPOINT/bucket/prefix`.
    pub fn bucket(&self, bucket: &str, prefix: &str) -> String {
        self.script(&["bucket", bucket]);
        format!("s3:{}/{bucket}/{prefix}", self.endpoint)
    }

    /// A second user of the gateway, with its own access key: (access, secret). It
    /// owns nothing; a bucket policy gives it what it may do.
    pub fn user(&self, uid: &str) -> (String, String) {
        let out = self.script(&["user", uid]);
        let (k, s) = out.trim().split_once(' ').expect("KEY SECRET");
        (k.to_string(), s.to_string())
    }

    /// Sets a bucket's policy (as its owner).
    pub fn put_policy(&self, bucket: &str, policy: &str) {
        let file = self.dir.join(format!("policy-{bucket}.json"));
        std::fs::write(&file, policy).unwrap();
        self.script(&["policy", bucket, file.to_str().unwrap()]);
    }

    /// The file of `NAME=value` lines (mode 0600) holding the endpoint and the
    /// cluster's access key, as `scripts/ceph-cluster.sh start` wrote it.
    pub fn credentials_file(&self) -> PathBuf {
        self.dir.join("s3.env")
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
        self.script(&["kill-osd", &i.to_string()]);
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).status();
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
