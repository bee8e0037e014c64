//! A hostile client against the append-only repository server: raw HTTP/1.1 on its
//! Unix socket, trying what a compromised source host could — blobs under wrong ids,
//! commits of incomplete snapshots, deletes and overwrites, other hosts' data, path
//! tricks in ids, oversized and truncated bodies, requests without a session. Each gets
//! its documented refusal (status and machine code), nothing stored is removed or
//! changed, and afterwards a normal pull succeeds and `check --read-data` is clean.

use haul_protocol::chunker::BLOB_RAW;
use haul_protocol::tree::{Node, NodeKind, PageRef, Pages, Tree};
use haul_protocol::wire;
use haul_protocol::{ChunkId, TreeId};
use haul_tests::{bin, random_bytes, walk_files, Env};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// Blob kind bytes of the wire's refs and frame headers.
const DATA: u8 = 0;
const TREE: u8 = 1;
/// The largest encoded blob the server takes: the default chunker maximum (8 MiB) plus
/// 64 KiB of slack and one byte (see `backup_upload`).
const MAX_BLOB: u32 = 8 * 1024 * 1024 + 64 * 1024 + 1;

// ---- raw HTTP ----

/// One HTTP response as it came off the socket.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The request, for messages.
    what: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn describe(&self) -> String {
        format!(
            "{}: HTTP {} {:?}",
            self.what,
            self.status,
            String::from_utf8_lossy(&self.body[..self.body.len().min(2000)])
        )
    }

    /// Asserts a refusal: exactly `status`, and a JSON error body with exactly `code`
    /// and nothing else in it. Returns the message.
    fn refused(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "{}", self.describe());
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{}",
            self.describe()
        );
        let v: serde_json::Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{}: error body is not JSON: {e}", self.describe()));
        let obj = v.as_object().expect("an object");
        assert_eq!(
            obj.keys().collect::<Vec<_>>(),
            ["error"],
            "{}",
            self.describe()
        );
        let err = v["error"].as_object().expect("error object");
        let mut keys: Vec<_> = err.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["code", "message"], "{}", self.describe());
        assert_eq!(v["error"]["code"], code, "{}", self.describe());
        let message = v["error"]["message"].as_str().expect("message").to_string();
        assert!(!message.is_empty(), "{}", self.describe());
        message
    }

    /// Asserts a 200 and returns the JSON body.
    fn ok_json(&self) -> serde_json::Value {
        assert_eq!(self.status, 200, "{}", self.describe());
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", self.describe()))
    }

    /// Asserts a 200 and returns the octet body.
    fn ok_octets(&self) -> &[u8] {
        assert_eq!(self.status, 200, "{}", self.describe());
        assert_eq!(
            self.header("content-type"),
            Some("application/octet-stream"),
            "{}",
            self.describe()
        );
        &self.body
    }
}

fn connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    // A server that hangs fails the test instead of hanging it.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// Sends `head` (the request line and headers, without the blank line ending them;
/// `Host` and `Connection: close` are added) and then `body` in 1 MiB writes,
/// optionally shuts down the writing half, and reads the answer to EOF. A server may
/// answer before it has read all of a body it refuses and close the connection, so a
/// failed write is not an error. `None`: the connection closed without an answer.
fn exchange(sock: &Path, head: &str, body: &[u8], close_write: bool) -> Option<Reply> {
    let what = head.lines().next().unwrap_or_default().to_string();
    let mut s = connect(sock);
    let head = format!("{head}\r\nHost: haul\r\nConnection: close\r\n\r\n");
    let mut sent = s.write_all(head.as_bytes());
    if sent.is_ok() {
        for piece in body.chunks(1 << 20) {
            sent = s.write_all(piece);
            if sent.is_err() {
                break;
            }
        }
    }
    if close_write {
        let _ = s.shutdown(Shutdown::Write);
    }
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw) {
        // A reset after the answer arrived: keep what was read.
        assert!(
            e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut,
            "{what}: no answer within the timeout"
        );
    }
    if raw.is_empty() {
        return None;
    }
    Some(parse_reply(&raw, what))
}

fn parse_reply(raw: &[u8], what: String) -> Reply {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "{what}: no end of headers in {:?}",
                String::from_utf8_lossy(raw)
            )
        });
    let head = std::str::from_utf8(&raw[..end]).expect("ASCII headers");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{what}: {status_line}");
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').expect("header line");
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let rest = &raw[end + 4..];
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body = if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)
    } else if let Some(len) = find("content-length") {
        let len: usize = len.parse().expect("content-length");
        assert!(
            rest.len() >= len,
            "{what}: body of {} bytes, {len} announced",
            rest.len()
        );
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Reply {
        status,
        headers,
        body,
        what,
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_line = std::str::from_utf8(&raw[..eol]).expect("chunk size");
        let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
            .expect("hex chunk size");
        raw = &raw[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// A request with a body of exactly `Content-Length` bytes; an answer is required.
fn req(sock: &Path, method: &str, target: &str, body: &[u8]) -> Reply {
    let head = format!(
        "{method} {target} HTTP/1.1\r\nContent-Length: {}",
        body.len()
    );
    exchange(sock, &head, body, false)
        .unwrap_or_else(|| panic!("{method} {target}: connection closed without an answer"))
}

fn get(sock: &Path, target: &str) -> Reply {
    req(sock, "GET", target, b"")
}

fn post(sock: &Path, target: &str, body: &[u8]) -> Reply {
    req(sock, "POST", target, body)
}

fn post_json(sock: &Path, target: &str, v: &serde_json::Value) -> Reply {
    post(sock, target, v.to_string().as_bytes())
}

// ---- wire bodies, by hand ----

fn blob_ref(kind: u8, id: &[u8; 32]) -> Vec<u8> {
    let mut r = vec![kind];
    r.extend_from_slice(id);
    r
}

/// One upload frame: ref, u32 LE length, the encoded bytes.
fn frame(kind: u8, id: &[u8; 32], encoded: &[u8]) -> Vec<u8> {
    let mut f = blob_ref(kind, id);
    f.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
    f.extend_from_slice(encoded);
    f
}

/// A blob in its raw transfer encoding.
fn raw(plain: &[u8]) -> Vec<u8> {
    let mut e = plain.to_vec();
    e.push(BLOB_RAW);
    e
}

fn hash(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

fn commit_body(root: &str) -> serde_json::Value {
    serde_json::json!({
        "root": root,
        "counters": {
            "files_new": 1, "files_changed": 0, "files_unchanged": 0, "dirs": 1,
            "bytes_read": 1, "bytes_total": 1, "warnings": 0,
        }
    })
}

fn start_body(host: &str, parent: &str) -> serde_json::Value {
    serde_json::json!({"host": host, "paths": ["/srv"], "tags": [], "parent": parent})
}

// ---- the server ----

/// `haul-pbs serve` as a child process; killed and reaped however the test ends.
struct Served {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Served {
    fn start(env: &Env, host: &str) -> Served {
        Served::start_with(env, &["--mode", "append-only", "--host", host])
    }

    /// `serve` with these arguments (mode and restrictions).
    fn start_with(env: &Env, serve_args: &[&str]) -> Served {
        let dir = env.path("sock");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&dir)
            .unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let socket = dir.join("pbs.sock");
        let log = env.path("serve.log");
        let child = Command::new(bin("haul-pbs"))
            .arg("--repo")
            .arg(env.repo())
            .arg("--password-file")
            .arg(env.path("pass"))
            .arg("--cache-dir")
            .arg(env.path("cache"))
            .arg("serve")
            .args(serve_args)
            .arg("--socket")
            .arg(&socket)
            .env_remove("HAUL_REPO")
            .env_remove("HAUL_PASSWORD")
            .env_remove("HAUL_PASSWORD_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn haul-pbs serve");
        let mut served = Served {
            child: Some(child),
            socket,
            log,
        };
        for _ in 0..200 {
            if let Some(status) = served.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("haul-pbs serve ended with {status}:\n{}", served.log());
            }
            if UnixStream::connect(&served.socket).is_ok() {
                return served;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "haul-pbs serve did not accept on {} within 10 s:\n{}",
            served.socket.display(),
            served.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> libc::pid_t {
        self.child.as_ref().expect("running").id() as libc::pid_t
    }

    /// SIGTERM, then waits (bounded) for the server to end.
    fn stop(mut self) -> (ExitStatus, String) {
        assert_eq!(unsafe { libc::kill(self.pid(), libc::SIGTERM) }, 0);
        let mut child = self.child.take().expect("running");
        for _ in 0..200 {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "haul-pbs serve did not end within 10 s of SIGTERM:\n{}",
            self.log()
        );
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---- the repository's files ----

/// Every file of the repository that holds data (not locks or temporaries), by
/// relative path, with the BLAKE3 of its bytes.
fn repo_files(env: &Env) -> BTreeMap<PathBuf, [u8; 32]> {
    let repo = env.repo();
    let mut files = vec![repo.join("config")];
    for sub in ["data", "index", "snapshots", "keys"] {
        files.extend(walk_files(&repo.join(sub)));
    }
    files
        .into_iter()
        .map(|p| {
            let h = hash(&std::fs::read(&p).unwrap());
            (p.strip_prefix(&repo).unwrap().to_path_buf(), h)
        })
        .collect()
}

/// Byte strings no answer may contain: windows of every stored file, and the magic of
/// a plaintext tree.
fn repo_needles(env: &Env) -> Vec<Vec<u8>> {
    let mut needles = vec![b"HTR1".to_vec()];
    for rel in repo_files(env).keys() {
        let bytes = std::fs::read(env.repo().join(rel)).unwrap();
        for at in [0, bytes.len() / 2, bytes.len().saturating_sub(24)] {
            let w = &bytes[at.min(bytes.len())..(at + 24).min(bytes.len())];
            if w.len() >= 16 {
                needles.push(w.to_vec());
            }
        }
    }
    needles
}

fn assert_leaks_nothing(r: &Reply, needles: &[Vec<u8>]) {
    for n in needles {
        assert!(
            !r.body.windows(n.len()).any(|w| w == n.as_slice()),
            "{}: the answer contains repository bytes",
            r.describe()
        );
    }
}

// ---- the test ----

#[test]
fn hostile_client_gets_documented_refusals_and_repository_stays_intact() {
    let (env, src) = Env::with_source();
    std::fs::write(src.join("a.txt"), b"hello from the source host\n").unwrap();
    std::fs::create_dir_all(src.join("dir")).unwrap();
    std::fs::write(src.join("dir/b.bin"), random_bytes(7, 300_000)).unwrap();
    let src_s = src.display().to_string();

    // Another host's snapshot: its data must stay out of web-1's reach.
    env.pbs(&["backup-local", &src_s, "--host", "other-host"])
        .expect(0);
    let snaps = env.pbs(&["--json", "snapshots"]).expect(0).json();
    assert_eq!(snaps.len(), 1);
    let other_snapshot = snaps[0]["id"].as_str().unwrap().to_string();
    let other_tree = snaps[0]["tree"].as_str().unwrap().to_string();
    assert_eq!(snaps[0]["host"], "other-host");
    // A chunk that is in the repository (a small file is one chunk).
    let known_chunk = ChunkId::of(b"hello from the source host\n");

    let before = repo_files(&env);
    let needles = repo_needles(&env);
    let snapshots_before = env.count("snapshots");

    let server = Served::start(&env, "web-1");
    let sock = server.socket.clone();
    let zero = [0u8; 32];

    // 1. No session yet: nothing but `start` is accepted.
    post(&sock, "/v1/backup/missing", &blob_ref(DATA, &zero)).refused(409, "no_session");
    post_json(&sock, "/v1/backup/commit", &commit_body(&other_tree)).refused(409, "no_session");
    post(
        &sock,
        "/v1/backup/upload",
        &frame(DATA, &hash(b"x"), &raw(b"x")),
    )
    .refused(409, "no_session");
    get(&sock, &format!("/v1/backup/tree/{other_tree}")).refused(409, "no_session");
    post(&sock, "/v1/backup/abandon", b"").refused(409, "no_session");

    // 2. Sessions: only for the server's host, never on another host's parent, one at
    // a time.
    post_json(&sock, "/v1/backup/start", &start_body("other-host", "none"))
        .refused(403, "forbidden");
    // Another host's snapshot is not found among this host's: neither usable as a
    // parent nor told apart from an id that does not exist.
    let m = post_json(
        &sock,
        "/v1/backup/start",
        &start_body("web-1", &other_snapshot),
    )
    .refused(404, "unknown_object");
    let made_up = post_json(
        &sock,
        "/v1/backup/start",
        &start_body("web-1", &"e".repeat(64)),
    )
    .refused(404, "unknown_object");
    assert_eq!(
        m.replace(&other_snapshot, "ID"),
        made_up.replace(&"e".repeat(64), "ID")
    );
    post_json(
        &sock,
        "/v1/backup/start",
        &start_body("web-1", &other_snapshot[..4]),
    )
    .refused(404, "unknown_object");
    post_json(
        &sock,
        "/v1/backup/start",
        &start_body("web-1", "../../config"),
    )
    .refused(400, "bad_request");
    post(&sock, "/v1/backup/start", b"{\"host\": \"web-1\", ").refused(400, "bad_request");
    let started = post_json(&sock, "/v1/backup/start", &start_body("web-1", "none")).ok_json();
    assert_eq!(started["parent_snapshot"], serde_json::Value::Null);
    assert_eq!(started["max_upload_body"], wire::MAX_UPLOAD_BODY);
    assert_eq!(
        started["chunker"]["max_size"].as_u64().unwrap() + 64 * 1024 + 1,
        MAX_BLOB as u64
    );
    post_json(&sock, "/v1/backup/start", &start_body("web-1", "none"))
        .refused(409, "session_active");

    // 3. Reads: another host's trees, read routes, path tricks. None of the answers
    // carries a byte of the repository.
    let reads: Vec<(String, u16, &str)> = vec![
        (format!("/v1/backup/tree/{other_tree}"), 403, "forbidden"),
        // A chunk id is no tree of the (absent) parent either.
        (
            format!("/v1/backup/tree/{}", known_chunk.to_hex()),
            403,
            "forbidden",
        ),
        (
            format!("/v1/restore/chunk/{}", known_chunk.to_hex()),
            404,
            "not_found",
        ),
        (format!("/v1/restore/tree/{other_tree}"), 404, "not_found"),
        ("/config".into(), 404, "not_found"),
        ("/keys".into(), 404, "not_found"),
        ("/v1/backup/../../config".into(), 404, "not_found"),
        ("/v1/backup/tree/../../../config".into(), 404, "not_found"),
        (
            format!("/v1/backup/tree/{other_tree}/../../../config"),
            404,
            "not_found",
        ),
        ("/v1/backup/tree/..%2f..%2fconfig".into(), 400, "bad_id"),
        (
            "/v1/backup/tree/..%2f..%2f..%2f..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd".into(),
            400,
            "bad_id",
        ),
        (format!("/v1/backup/tree/{}", "Z".repeat(64)), 400, "bad_id"),
        (
            format!("/v1/backup/tree/{}", &other_tree[..63]),
            400,
            "bad_id",
        ),
        (format!("/v1/backup/tree/{other_tree}0"), 400, "bad_id"),
        ("/v1/backup/tree/".into(), 404, "not_found"),
    ];
    for (target, status, code) in &reads {
        let r = get(&sock, target);
        r.refused(*status, code);
        assert_leaks_nothing(&r, &needles);
    }
    // A path parameter that is not UTF-8 once decoded.
    let r = get(&sock, "/v1/backup/tree/%ff%fe..%2fconfig");
    r.refused(400, "bad_id");
    assert_leaks_nothing(&r, &needles);
    // Upper-case hex is not an id either: ids have one spelling.
    get(
        &sock,
        &format!("/v1/backup/tree/{}", other_tree.to_uppercase()),
    )
    .refused(400, "bad_id");
    let r = post_json(
        &sock,
        "/v1/restore/start",
        &serde_json::json!({"snapshot": "latest"}),
    );
    r.refused(404, "not_found");
    assert_leaks_nothing(&r, &needles);

    // 4. Nothing can be deleted or overwritten: no such methods, no such routes.
    for (method, target) in [
        ("DELETE", format!("/v1/backup/tree/{other_tree}")),
        ("PUT", format!("/v1/backup/tree/{other_tree}")),
        ("PUT", "/v1/backup/upload".to_string()),
        ("DELETE", "/v1/backup/upload".to_string()),
        ("PATCH", "/v1/backup/upload".to_string()),
        ("DELETE", "/v1/backup/commit".to_string()),
        ("GET", "/v1/backup/missing".to_string()),
    ] {
        req(&sock, method, &target, b"").refused(405, "method_not_allowed");
    }
    for (method, target) in [
        ("DELETE", format!("/snapshots/{other_snapshot}")),
        ("DELETE", format!("/v1/backup/snapshot/{other_snapshot}")),
        ("PUT", "/config".to_string()),
    ] {
        req(&sock, method, &target, b"").refused(404, "not_found");
    }

    // 5. Blobs under wrong ids are refused, and nothing is stored under the claim.
    let claimed = hash(b"the bytes the id belongs to");
    let m = post(
        &sock,
        "/v1/backup/upload",
        &frame(DATA, &claimed, &raw(b"other bytes entirely")),
    )
    .refused(422, "id_mismatch");
    assert!(m.contains(&hex::encode(claimed)), "{m}");
    let still = post(&sock, "/v1/backup/missing", &blob_ref(DATA, &claimed));
    assert_eq!(still.ok_octets(), blob_ref(DATA, &claimed));
    // Overwriting a stored chunk or tree with other bytes is the same wrong claim.
    post(
        &sock,
        "/v1/backup/upload",
        &frame(DATA, &known_chunk.0, &raw(b"poison for dedup")),
    )
    .refused(422, "id_mismatch");
    let other_tree_id = TreeId(hex::decode(&other_tree).unwrap().try_into().unwrap());
    post(
        &sock,
        "/v1/backup/upload",
        &frame(TREE, &other_tree_id.0, &raw(&Tree::default().encode())),
    )
    .refused(422, "id_mismatch");
    // Another host stores this chunk: to this host it is missing all the same, so
    // nobody can learn what others store by asking.
    let theirs = blob_ref(DATA, &known_chunk.0);
    assert_eq!(
        post(&sock, "/v1/backup/missing", &theirs).ok_octets(),
        theirs
    );
    // The honest bytes of a stored chunk are taken (stored once: nothing is written)
    // and counted as new, as they are to this host: the answer does not say that
    // another host had them. Sent, the chunk is this host's too.
    let same = post(
        &sock,
        "/v1/backup/upload",
        &frame(DATA, &known_chunk.0, &raw(b"hello from the source host\n")),
    )
    .ok_json();
    assert_eq!(same, serde_json::json!({"received": 1, "stored": 1}));
    let present = post(&sock, "/v1/backup/missing", &blob_ref(DATA, &known_chunk.0));
    assert!(present.ok_octets().is_empty());
    // An unknown blob kind, and a "tree" whose entry climbs out of its directory.
    post(&sock, "/v1/backup/upload", &frame(9, &zero, &raw(b"?"))).refused(400, "bad_request");
    post(&sock, "/v1/backup/upload", &frame(DATA, &hash(b""), b"")).refused(400, "bad_request");
    // A compression bomb: small frames that would decompress to more than an upload
    // may cost the server, refused before they are decompressed.
    let zeros = vec![0u8; 8 << 20];
    let mut bomb_blob = zstd::bulk::compress(&zeros, 1).unwrap();
    bomb_blob.push(1);
    let bomb: Vec<u8> = (0..33)
        .flat_map(|_| frame(DATA, &hash(&zeros), &bomb_blob))
        .collect();
    assert!(bomb.len() < 1 << 20);
    let m = post(&sock, "/v1/backup/upload", &bomb).refused(413, "body_too_large");
    assert!(m.contains("decompress to more than"), "{m}");
    let sneaky = {
        let t = Tree {
            nodes: vec![Node {
                name: b"xx".to_vec(),
                kind: NodeKind::File,
                mode: 0o644,
                ..Default::default()
            }],
        };
        let mut bytes = t.encode();
        let at = bytes.windows(2).position(|w| w == b"xx").unwrap();
        bytes[at..at + 2].copy_from_slice(b"..");
        bytes
    };
    post(
        &sock,
        "/v1/backup/upload",
        &frame(TREE, &hash(&sneaky), &raw(&sneaky)),
    )
    .refused(400, "bad_request");

    // 6. Oversized and truncated bodies.
    let m = exchange(
        &sock,
        "POST /v1/backup/upload HTTP/1.1\r\nContent-Length: 40000000",
        b"",
        false,
    )
    .expect("an answer to an announced oversized body")
    .refused(413, "body_too_large");
    assert!(m.contains("40000000"), "{m}");
    let mut huge = blob_ref(DATA, &zero);
    huge.extend_from_slice(&(MAX_BLOB + 1).to_le_bytes());
    post(&sock, "/v1/backup/upload", &huge).refused(413, "blob_too_large");
    // The largest allowed declaration is not refused for its size: only truncated.
    let mut largest = blob_ref(DATA, &zero);
    largest.extend_from_slice(&MAX_BLOB.to_le_bytes());
    post(&sock, "/v1/backup/upload", &largest).refused(400, "truncated_body");
    let mut cut = blob_ref(DATA, &zero);
    cut.extend_from_slice(&100u32.to_le_bytes());
    cut.extend_from_slice(&[7u8; 10]);
    let m = post(&sock, "/v1/backup/upload", &cut).refused(400, "truncated_body");
    assert!(m.contains("10 of its 100 bytes"), "{m}");
    post(&sock, "/v1/backup/upload", &cut[..20]).refused(400, "truncated_body");
    // A body shorter than announced, then the client stops sending.
    let head = format!(
        "POST /v1/backup/upload HTTP/1.1\r\nContent-Length: {}",
        cut.len() + 1000
    );
    if let Some(r) = exchange(&sock, &head, &cut, true) {
        r.refused(400, "truncated_body");
    }
    // Without a Content-Length (chunked), the limit holds as the body arrives: frames
    // of 8 MiB under a wrong id, over 32 MiB in all.
    {
        let mut body = Vec::new();
        let blob = raw(&vec![0u8; 8 * 1024 * 1024]);
        let one = frame(DATA, &zero, &blob);
        let mut sent = 0u64;
        let mut piece_no = 0;
        while sent <= wire::MAX_UPLOAD_BODY + (1 << 20) {
            for piece in one.chunks(1 << 20) {
                body.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                body.extend_from_slice(piece);
                body.extend_from_slice(b"\r\n");
                sent += piece.len() as u64;
                piece_no += 1;
            }
        }
        body.extend_from_slice(b"0\r\n\r\n");
        assert!(piece_no > 32);
        let r = exchange(
            &sock,
            "POST /v1/backup/upload HTTP/1.1\r\nTransfer-Encoding: chunked",
            &body,
            false,
        )
        .expect("an answer to a chunked oversized body");
        r.refused(413, "body_too_large");
    }
    // The server is still there and the session still open.
    assert!(post(&sock, "/v1/backup/missing", b"")
        .ok_octets()
        .is_empty());
    let too_many = vec![0u8; 2_500_000];
    assert!(too_many.len() > wire::MAX_REFS_PER_REQUEST * wire::REF_LEN);
    exchange(
        &sock,
        &format!(
            "POST /v1/backup/missing HTTP/1.1\r\nContent-Length: {}",
            too_many.len()
        ),
        &too_many,
        false,
    )
    .expect("an answer to an oversized missing request")
    .refused(413, "body_too_large");
    post(&sock, "/v1/backup/missing", &[0u8; 34]).refused(400, "bad_request");
    // JSON bodies are small too.
    post(&sock, "/v1/backup/commit", &vec![b' '; 1_500_000]).refused(413, "body_too_large");
    let mut bad_kind = blob_ref(DATA, &zero);
    bad_kind[0] = 7;
    post(&sock, "/v1/backup/missing", &bad_kind).refused(400, "bad_request");

    // 7. Commits of incomplete snapshots write nothing.
    post_json(&sock, "/v1/backup/commit", &commit_body("../../../config")).refused(400, "bad_id");
    post(&sock, "/v1/backup/commit", b"{\"root\": 1}").refused(400, "bad_request");
    let never_sent = ChunkId::of(b"a chunk the client never uploads");
    let tree = Tree {
        nodes: vec![Node {
            name: b"file".to_vec(),
            kind: NodeKind::File,
            mode: 0o644,
            size: 32,
            content: vec![never_sent],
            ..Default::default()
        }],
    };
    let (tree_id, tree_bytes) = tree.encode_with_id();
    assert_eq!(tree_id.0, hash(&tree_bytes));
    let up = post(
        &sock,
        "/v1/backup/upload",
        &frame(TREE, &tree_id.0, &raw(&tree_bytes)),
    )
    .ok_json();
    assert_eq!(up, serde_json::json!({"received": 1, "stored": 1}));
    let mut both = blob_ref(TREE, &tree_id.0);
    both.extend(blob_ref(DATA, &never_sent.0));
    assert_eq!(
        post(&sock, "/v1/backup/missing", &both).ok_octets(),
        blob_ref(DATA, &never_sent.0)
    );
    let m = post_json(&sock, "/v1/backup/commit", &commit_body(&tree_id.to_hex()))
        .refused(409, "missing_blobs");
    assert!(m.contains(&never_sent.to_hex()), "{m}");
    assert_eq!(env.count("snapshots"), snapshots_before);
    // A refused commit ends the session: the client must start again.
    post(&sock, "/v1/backup/missing", &both).refused(409, "no_session");
    // Another host's data cannot be borrowed: its tree is "missing" to this host (no
    // confirmation that anyone stores it), and a commit naming it is refused with
    // `missing_blobs`, exactly as a tree nobody stored (tried just below), with what to
    // do; nothing is written.
    post_json(&sock, "/v1/backup/start", &start_body("web-1", "none")).ok_json();
    let theirs = blob_ref(TREE, &other_tree_id.0);
    assert_eq!(
        post(&sock, "/v1/backup/missing", &theirs).ok_octets(),
        theirs
    );
    let foreign = post_json(&sock, "/v1/backup/commit", &commit_body(&other_tree))
        .refused(409, "missing_blobs");
    assert!(foreign.contains(&other_tree), "{foreign}");
    assert!(foreign.contains("send them"), "{foreign}");
    // Nor wrapped in a tree of its own.
    post_json(&sock, "/v1/backup/start", &start_body("web-1", "none")).ok_json();
    let wrapper = Tree {
        nodes: vec![Node {
            name: b"borrowed".to_vec(),
            kind: NodeKind::Dir,
            mode: 0o755,
            subtree: Some(other_tree_id),
            ..Default::default()
        }],
    };
    let (wrapper_id, wrapper_bytes) = wrapper.encode_with_id();
    post(
        &sock,
        "/v1/backup/upload",
        &frame(TREE, &wrapper_id.0, &raw(&wrapper_bytes)),
    )
    .ok_json();
    post_json(
        &sock,
        "/v1/backup/commit",
        &commit_body(&wrapper_id.to_hex()),
    )
    .refused(409, "missing_blobs");
    assert_eq!(env.count("snapshots"), snapshots_before);
    // Nor as a page of a large directory's page index.
    post_json(&sock, "/v1/backup/start", &start_body("web-1", "none")).ok_json();
    let index = Pages {
        pages: vec![
            PageRef {
                first: b"a".to_vec(),
                id: other_tree_id,
            },
            PageRef {
                first: b"b".to_vec(),
                id: other_tree_id,
            },
        ],
    }
    .encode();
    let index_id = TreeId::of(&index);
    post(
        &sock,
        "/v1/backup/upload",
        &frame(TREE, &index_id.0, &raw(&index)),
    )
    .ok_json();
    let m = post_json(&sock, "/v1/backup/commit", &commit_body(&index_id.to_hex()))
        .refused(409, "missing_blobs");
    assert!(m.contains(&other_tree), "{m}");
    assert_eq!(env.count("snapshots"), snapshots_before);
    post_json(&sock, "/v1/backup/start", &start_body("web-1", "none")).ok_json();
    let unsent = TreeId::of(b"a tree the client never uploads");
    let m = post_json(&sock, "/v1/backup/commit", &commit_body(&unsent.to_hex()))
        .refused(409, "missing_blobs");
    assert!(m.contains(&unsent.to_hex()), "{m}");
    // Word for word the refusal of another host's tree.
    assert_eq!(
        m.replace(&unsent.to_hex(), "ID"),
        foreign.replace(&other_tree, "ID")
    );
    assert_eq!(env.count("snapshots"), snapshots_before);
    // A session left open when the server stops is abandoned safely.
    post_json(&sock, "/v1/backup/start", &start_body("web-1", "none")).ok_json();

    // 8. The server stops cleanly on SIGTERM and removes its socket.
    let (status, log) = server.stop();
    assert_eq!(status.code(), Some(0), "haul-pbs serve: {status}\n{log}");
    assert!(!sock.exists(), "socket {} left behind", sock.display());

    // Nothing stored was removed or changed; only packs and indexes were added.
    let after = repo_files(&env);
    for (rel, h) in &before {
        assert_eq!(
            after.get(rel),
            Some(h),
            "{} was removed or changed by the hostile client",
            rel.display()
        );
    }
    for rel in after.keys().filter(|r| !before.contains_key(*r)) {
        assert!(
            rel.starts_with("data") || rel.starts_with("index"),
            "unexpected new file {}",
            rel.display()
        );
    }
    assert_eq!(env.count("snapshots"), snapshots_before);

    // A normal pull still works, and the repository is clean.
    let state = env.path("state").display().to_string();
    let run = env
        .pbs(&[
            "--json",
            "pull",
            "--local",
            &src_s,
            "--host",
            "web-1",
            "--state-dir",
            &state,
        ])
        .expect(0)
        .json_of("run");
    assert_eq!(run["run"]["status"], "ok", "{run}");
    env.pbs(&["check", "--read-data"]).expect(0);
    let snaps = env.pbs(&["--json", "snapshots"]).expect(0).json();
    let mut hosts: Vec<&str> = snaps.iter().map(|s| s["host"].as_str().unwrap()).collect();
    hosts.sort();
    assert_eq!(hosts, ["other-host", "web-1"]);
}

fn restore_start(sock: &Path, snapshot: &str) -> Reply {
    post_json(
        sock,
        "/v1/restore/start",
        &serde_json::json!({"snapshot": snapshot}),
    )
}

/// A read-only server streams one snapshot: the one it was started for, or the first a
/// client asked for; a client cannot move to another.
#[test]
fn a_read_only_server_streams_only_its_snapshot() {
    let (env, src) = Env::with_one_file();
    let s = src.display().to_string();
    env.pbs(&["backup-local", &s, "--host", "a"]).expect(0);
    std::fs::write(src.join("g"), b"other").unwrap();
    env.pbs(&["backup-local", &s, "--host", "b"]).expect(0);
    let snaps = env.pbs(&["--json", "snapshots"]).expect(0).json();
    // A field of the snapshot of `host`.
    let of = |host: &str, key: &str| {
        snaps.iter().find(|v| v["host"] == host).unwrap()[key]
            .as_str()
            .unwrap()
            .to_string()
    };
    let id = |host: &str| of(host, "id");
    let tree = |host: &str| of(host, "tree");
    let (a, b) = (id("a"), id("b"));
    {
        let server = Served::start_with(&env, &["--mode", "read-only", "--snapshot", &a[..8]]);
        let sock = server.socket.clone();
        let start = |snap: &str| restore_start(&sock, snap);
        let m = start(&b).refused(403, "forbidden");
        assert!(m.contains(&a[..8]), "{m}");
        assert_eq!(start("latest").ok_json()["snapshot"], a.as_str());
        get(&sock, &format!("/v1/restore/tree/{}", tree("b"))).refused(403, "forbidden");
        assert!(!get(&sock, &format!("/v1/restore/tree/{}", tree("a")))
            .ok_octets()
            .is_empty());
    }
    let server = Served::start_with(&env, &["--mode", "read-only"]);
    let sock = server.socket.clone();
    let start = |snap: &str| restore_start(&sock, snap);
    start(&a).ok_json();
    start(&b).refused(409, "session_active");
    start(&a).ok_json();
    get(&sock, &format!("/v1/restore/tree/{}", tree("b"))).refused(403, "forbidden");
}

/// Every chunk of a snapshot (hex ids), read through its trees from a read-only server
/// of its own.
fn chunks_of(env: &Env, snap: &str) -> Vec<String> {
    let server = Served::start_with(env, &["--mode", "read-only", "--snapshot", snap]);
    let root = restore_start(&server.socket, snap).ok_json()["tree"]
        .as_str()
        .unwrap()
        .to_string();
    let (mut todo, mut chunks) = (vec![root], Vec::new());
    while let Some(t) = todo.pop() {
        let bytes = get(&server.socket, &format!("/v1/restore/tree/{t}"))
            .ok_octets()
            .to_vec();
        let tree = haul_protocol::tree::TreeBlob::decode(&bytes).unwrap();
        todo.extend(tree.subtrees().iter().map(|t| t.to_hex()));
        chunks.extend(tree.chunks().map(|c| c.to_hex()));
    }
    chunks
}

/// A push asks for chunks as deltas against chunks its clone holds: it gets one only
/// against chunks of a snapshot the pbs says was pushed there before (`--delta-base`);
/// any other base (another snapshot's chunk, or no base snapshot at all) gets the chunk
/// whole, and a chunk outside the snapshot pushed is refused as always.
#[test]
fn deltas_are_made_only_against_chunks_of_a_snapshot_pushed_before() {
    use haul_protocol::chunker::{decode_delta, delta_bases, BLOB_DELTA};
    use haul_protocol::ChunkId;
    let (env, src) = Env::with_source();
    let big = haul_tests::random_bytes(5, 3 << 20);
    std::fs::write(src.join("big"), &big).unwrap();
    let s = src.display().to_string();
    let ids = || -> Vec<String> {
        let snaps = env.pbs(&["--json", "snapshots"]).expect(0).json();
        snaps
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect()
    };
    env.pbs(&["backup-local", &s, "--host", "a"]).expect(0);
    let first = ids().remove(0);
    let mut changed = big.clone();
    changed[1 << 20..(1 << 20) + 16].copy_from_slice(b"sixteen changed!");
    std::fs::write(src.join("big"), &changed).unwrap();
    env.pbs(&["backup-local", &s, "--host", "a"]).expect(0);
    let second = ids().into_iter().find(|i| *i != first).unwrap();
    // A third snapshot, of another host, never pushed anywhere.
    let other = env.path("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("o"), haul_tests::random_bytes(6, 1 << 20)).unwrap();
    env.pbs(&["backup-local", &other.display().to_string(), "--host", "b"])
        .expect(0);
    let third = ids()
        .into_iter()
        .find(|i| *i != first && *i != second)
        .unwrap();
    let (first, second) = (&first, &second);
    let (old, new) = (chunks_of(&env, first), chunks_of(&env, second));
    let gone: Vec<&String> = old.iter().filter(|c| !new.contains(c)).collect();
    let came: Vec<&String> = new.iter().filter(|c| !old.contains(c)).collect();
    assert!(!gone.is_empty() && !came.is_empty(), "{old:?} {new:?}");
    let foreign = chunks_of(&env, &third);
    let id = |hex: &str| -> ChunkId { hex.parse().unwrap() };
    let ask = |chunk: &str, bases: &[&str]| {
        let mut body = Vec::new();
        let bases: Vec<ChunkId> = bases.iter().map(|b| id(b)).collect();
        haul_protocol::wire::encode_delta_ask(&mut body, &id(chunk), &bases);
        body
    };
    let one_frame = |reply: &Reply| -> Vec<u8> {
        let frames = haul_protocol::wire::decode_frames(reply.ok_octets()).unwrap();
        assert_eq!(frames.len(), 1);
        frames[0].1.to_vec()
    };

    let decode = |encoded: &[u8]| {
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        haul_protocol::chunker::decode_blob(&mut d, encoded.to_vec(), 16 << 20).unwrap()
    };
    // What the clone holds: the old chunks.
    let base: Vec<u8> = {
        let old_server = Served::start_with(&env, &["--mode", "read-only", "--snapshot", first]);
        restore_start(&old_server.socket, first).ok_json();
        gone.iter()
            .flat_map(|c| {
                decode(get(&old_server.socket, &format!("/v1/restore/chunk/{c}")).ok_octets())
            })
            .collect()
    };
    let server = Served::start_with(
        &env,
        &[
            "--mode",
            "read-only",
            "--snapshot",
            second,
            "--delta-base",
            first,
        ],
    );
    let sock = server.socket.clone();
    restore_start(&sock, second).ok_json();
    // Against the old chunks the change replaced: a delta of a few hundred bytes, which
    // those chunks decode to the new one.
    let olds: Vec<&str> = gone.iter().map(|s| s.as_str()).collect();
    let got = one_frame(&post(&sock, "/v1/restore/deltas", &ask(came[0], &olds)));
    assert_eq!(*got.last().unwrap(), BLOB_DELTA);
    assert!(got.len() < 4096, "{} bytes", got.len());
    let named: Vec<String> = delta_bases(&got)
        .unwrap()
        .iter()
        .map(|b| b.to_hex())
        .collect();
    assert_eq!(named, olds);
    let whole = decode(get(&sock, &format!("/v1/restore/chunk/{}", came[0])).ok_octets());
    assert_eq!(decode_delta(&base, &got, 16 << 20).unwrap(), whole);
    // The same ask a thousand times: the answer stops when its deltas have read their
    // share of plaintext (64 MiB), and the client asks again for the rest.
    let many = ask(came[0], &olds).repeat(1000);
    let reply = post(&sock, "/v1/restore/deltas", &many);
    let frames = haul_protocol::wire::decode_frames(reply.ok_octets()).unwrap();
    assert!(
        (1..1000).contains(&frames.len()),
        "{} frames for 1000 asks",
        frames.len()
    );
    // Against a chunk of a snapshot never pushed there: the chunk whole.
    let got = one_frame(&post(
        &sock,
        "/v1/restore/deltas",
        &ask(came[0], &[&foreign[0]]),
    ));
    assert_ne!(*got.last().unwrap(), BLOB_DELTA);
    // A chunk outside the snapshot, whatever its base: refused.
    post(&sock, "/v1/restore/deltas", &ask(&foreign[0], &olds)).refused(403, "forbidden");
    post(&sock, "/v1/restore/deltas", &[1, 2, 3]).refused(400, "bad_request");
    drop(server);

    // No snapshot named as pushed before: no delta at all.
    let server = Served::start_with(&env, &["--mode", "read-only", "--snapshot", second]);
    restore_start(&server.socket, second).ok_json();
    let got = one_frame(&post(
        &server.socket,
        "/v1/restore/deltas",
        &ask(came[0], &olds),
    ));
    assert_ne!(*got.last().unwrap(), BLOB_DELTA);
}

/// A client that reads the trees from elsewhere (a standby copy keeps its own) asks
/// for chunks of its snapshot it did not reach through the server's trees: the server
/// finds them in the snapshot's trees itself. A chunk of another snapshot of the same
/// repository stays out of reach, before and after the server read every tree.
#[test]
fn chunks_of_the_snapshot_are_served_without_its_trees_asked_for_and_no_others() {
    let (env, src) = Env::with_one_file();
    let s = src.display().to_string();
    env.pbs(&["backup-local", &s, "--host", "a"]).expect(0);
    std::fs::write(src.join("g"), b"only in the second snapshot").unwrap();
    env.pbs(&["backup-local", &s, "--host", "a"]).expect(0);
    let snaps = env.pbs(&["--json", "snapshots"]).expect(0).json();
    let ids: Vec<String> = snaps
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    let chunks_of = |snap: &str| chunks_of(&env, snap);
    // The first snapshot has fewer chunks: the second added a file.
    let mut both: Vec<(&String, Vec<String>)> = ids.iter().map(|i| (i, chunks_of(i))).collect();
    both.sort_by_key(|(_, c)| c.len());
    let [(older_id, older), (_, newer)] = &both[..] else {
        unreachable!()
    };
    let foreign: Vec<&String> = newer.iter().filter(|c| !older.contains(c)).collect();
    assert!(!foreign.is_empty() && !older.is_empty());

    let server = Served::start_with(&env, &["--mode", "read-only", "--snapshot", older_id]);
    let sock = server.socket.clone();
    restore_start(&sock, older_id).ok_json();
    let chunk = |c: &str| get(&sock, &format!("/v1/restore/chunk/{c}"));
    chunk(foreign[0]).refused(403, "forbidden");
    for c in older {
        assert!(!chunk(c).ok_octets().is_empty());
    }
    let m = chunk(foreign[0]).refused(403, "forbidden");
    assert!(m.contains("not part of the snapshot being restored"), "{m}");
    let mut body = Vec::new();
    let foreign_ref = haul_protocol::BlobRef::data(foreign[0].parse().unwrap());
    haul_protocol::wire::encode_ref(&mut body, &foreign_ref);
    post(&sock, "/v1/restore/chunks", &body).refused(403, "forbidden");
}

/// An agent (or whatever answers in its place) that prints 100,000 warnings and an
/// endless line: the pbs keeps a bounded number of them, counts the rest, and its
/// memory stays what a normal pull needs.
#[test]
fn an_agent_flooding_warnings_does_not_grow_the_pbs() {
    let (env, src) = Env::with_one_file();
    let state = env.path("state").display().to_string();
    let s = src.display().to_string();
    let normal = env
        .pbs(&["--json", "pull", "--local", &s, "--state-dir", &state])
        .expect(0);
    let normal_rss = normal.json_of("run")["run"]["pbs_peak_rss_kib"]
        .as_u64()
        .unwrap();

    let flood = env.path("flooding-agent");
    std::fs::write(
        &flood,
        "#!/usr/bin/python3\nimport sys\nw = sys.stdout.write\n\
         for i in range(100000):\n    w('{\"type\":\"warning\",\"path\":\"/f/%d\",\"message\":\"%s\"}\\n' % (i, 'm' * 300))\n\
         w('x' * (16 << 20))\nsys.stdout.flush()\nsys.exit(3)\n",
    )
    .unwrap();
    std::fs::set_permissions(&flood, std::fs::Permissions::from_mode(0o755)).unwrap();
    let a = flood.display().to_string();
    let run = env.pbs(&["pull", "--local", &s, "--state-dir", &state, "--agent", &a]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("... and 99900 more warnings"),
        "{}",
        &run.stderr[run.stderr.len().saturating_sub(2000)..]
    );
    let records = env.runs();
    let rec = records.last().unwrap();
    assert_eq!(rec["status"], "failed", "{rec}");
    let rss = rec["pbs_peak_rss_kib"].as_u64().unwrap();
    eprintln!("pbs peak: {rss} KiB under 100,000 warnings, {normal_rss} KiB for a normal pull");
    assert!(
        rss < normal_rss + 16 * 1024,
        "the pbs grew to {rss} KiB (a normal pull: {normal_rss} KiB)"
    );
    // The flood stored nothing: the repository is as it was, and pulls again.
    env.pbs(&["check", "--read-data"]).expect(0);
    env.pbs(&["pull", "--local", &s, "--state-dir", &state])
        .expect(0);
}

/// Clients that hang up in the middle of an upload body, or before reading an answer:
/// `serve` answers into closed sockets (EPIPE, once a fatal SIGPIPE) and goes on; the
/// next session on the same server commits, and the server stops cleanly.
#[test]
fn clients_that_hang_up_mid_upload_do_not_kill_the_server() {
    let (env, src) = Env::with_one_file();
    let served = Served::start(&env, "h");
    let sock = served.socket.clone();
    let started = post_json(&sock, "/v1/backup/start", &start_body("h", "none"));
    assert_eq!(started.status, 200, "{}", started.describe());
    for round in 0..8 {
        let mut s = connect(&sock);
        let head = format!(
            "POST /v1/backup/upload HTTP/1.1\r\nHost: haul\r\nContent-Length: {}\r\n\r\n",
            32 << 20
        );
        s.write_all(head.as_bytes()).unwrap();
        // Part of a frame, then gone without reading anything.
        let plain = random_bytes(700 + round, 1 << 20);
        let _ = s.write_all(&frame(DATA, &hash(&plain), &raw(&plain))[..(512 << 10)]);
        drop(s);
        // A request whose answer is never read.
        let mut s = connect(&sock);
        let _ = s.write_all(b"GET /v1/nothing-here HTTP/1.1\r\nHost: haul\r\n\r\n");
        let _ = s.shutdown(Shutdown::Both);
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut served = served;
    assert!(
        served.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the server died:\n{}",
        served.log()
    );
    // The session is still there and answers; given up, it makes way for the agent's.
    let gone = post(&sock, "/v1/backup/abandon", b"");
    assert_eq!(gone.status, 200, "{}", gone.describe());
    let out = agent_backup(&sock, "h", &src);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        served.log()
    );
    let (status, log) = served.stop();
    assert!(status.success(), "{status}: {log}");
    assert_eq!(env.pbs(&["--json", "snapshots"]).expect(0).json().len(), 1);
    env.pbs(&["check", "--read-data"]).expect(0);
}

/// Reads what the server sends on `s` until it closes the connection (or `limit`
/// passes); returns the bytes and how long it took.
fn read_until_closed(s: &mut UnixStream, limit: Duration) -> (Vec<u8>, Duration) {
    let t = std::time::Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    (raw, t.elapsed())
}

/// Clients that stall: half-sent request heads, upload bodies that stop, connections
/// left open through a SIGTERM. Each is cut at the server's request limit (2 s here),
/// the upload slots and the session come back, and the server stops within its grace.
#[test]
fn stalled_heads_bodies_and_connections_are_cut_at_their_limits() {
    let (env, src) = Env::with_one_file();
    let mut served = Served::start_with(
        &env,
        &[
            "--mode",
            "append-only",
            "--host",
            "h",
            "--request-timeout",
            "2s",
            "--grace",
            "2s",
        ],
    );
    let sock = served.socket.clone();
    // 50 heads that never end.
    let mut heads: Vec<UnixStream> = (0..50)
        .map(|_| {
            let mut s = connect(&sock);
            s.write_all(b"POST /v1/backup/missing HTTP/1.1\r\nHost: ha")
                .unwrap();
            s
        })
        .collect();
    // Meanwhile the server answers others.
    post(&sock, "/v1/backup/missing", &blob_ref(DATA, &[0; 32])).refused(409, "no_session");
    for s in &mut heads {
        let (_, took) = read_until_closed(s, Duration::from_secs(20));
        assert!(
            took < Duration::from_secs(10),
            "a stalled head stayed {took:?}"
        );
    }
    // Six uploads (more than the upload slots) whose bodies stop after a few bytes.
    let started = post_json(&sock, "/v1/backup/start", &start_body("h", "none"));
    assert_eq!(started.status, 200, "{}", started.describe());
    let t = std::time::Instant::now();
    let mut hung: Vec<UnixStream> = (0..6)
        .map(|_| {
            let mut s = connect(&sock);
            s.write_all(
                b"POST /v1/backup/upload HTTP/1.1\r\nHost: haul\r\nContent-Length: 1048576\r\n\r\nabc",
            )
            .unwrap();
            s
        })
        .collect();
    for s in &mut hung {
        let (raw, _) = read_until_closed(s, Duration::from_secs(20));
        let text = String::from_utf8_lossy(&raw);
        assert!(
            text.is_empty() || text.contains("truncated_body") || text.contains("busy"),
            "{text}"
        );
    }
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "hung uploads held {:?}",
        t.elapsed()
    );
    // The slots are free again: an upload goes through, and the session still works.
    let plain = b"after the stall".to_vec();
    let r = post(
        &sock,
        "/v1/backup/upload",
        &frame(DATA, &hash(&plain), &raw(&plain)),
    );
    assert_eq!(r.status, 200, "{}", r.describe());
    let gone = post(&sock, "/v1/backup/abandon", b"");
    assert_eq!(gone.status, 200, "{}", gone.describe());
    // An agent's backup still works on this server.
    let out = agent_backup(&sock, "h", &src);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Connections left open (mid-head and idle) do not hold a SIGTERM past the grace.
    let _stalled: Vec<UnixStream> = (0..5)
        .map(|_| {
            let mut s = connect(&sock);
            s.write_all(b"GET /v1/backup/tr").unwrap();
            s
        })
        .collect();
    let t = std::time::Instant::now();
    assert!(served.child.as_mut().unwrap().try_wait().unwrap().is_none());
    let (status, log) = served.stop();
    assert!(status.success(), "{status}: {log}");
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "stopping took {:?}",
        t.elapsed()
    );
    assert_eq!(env.pbs(&["--json", "snapshots"]).expect(0).json().len(), 1);
}

/// `haul-agent backup` of `path` for `host` into the server on `sock`.
fn agent_backup(sock: &Path, host: &str, path: &Path) -> std::process::Output {
    Command::new(bin("haul-agent"))
        .args(["backup", "--host", host, "--parent", "none", "--socket"])
        .arg(sock)
        .arg("--path")
        .arg(path)
        .output()
        .unwrap()
}

/// Peak resident memory of process `pid`, in KiB.
fn peak_rss_kib(pid: libc::pid_t) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Tree frames that do not say what they decode to, each about 10 KB and 300 MiB
/// decoded, four uploads at once: refused before they grow the server, whose peak stays
/// under 100 MiB; the session goes on.
#[test]
fn decompression_bombs_are_bounded_by_what_their_frames_were_counted_as() {
    let (env, src) = Env::with_one_file();
    let served = Served::start(&env, "h");
    let sock = served.socket.clone();
    let started = post_json(&sock, "/v1/backup/start", &start_body("h", "none"));
    assert_eq!(started.status, 200, "{}", started.describe());
    let before = peak_rss_kib(served.pid());
    // A stream-compressed frame declares no size.
    let zeros = std::io::repeat(0).take(300 << 20);
    let mut bomb = zstd::stream::encode_all(zeros, 19).unwrap();
    assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
    assert!(matches!(
        zstd::zstd_safe::get_frame_content_size(&bomb),
        Ok(None)
    ));
    bomb.push(1); // the zstd format byte
    let body = frame(TREE, &hash(b"a bomb"), &bomb);
    let answers: Vec<Reply> = std::thread::scope(|s| {
        let tasks: Vec<_> = (0..4)
            .map(|_| s.spawn(|| post(&sock, "/v1/backup/upload", &body)))
            .collect();
        tasks.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for a in &answers {
        let m = a.refused(400, "bad_request");
        assert!(m.contains("tree blob"), "{m}");
    }
    let after = peak_rss_kib(served.pid());
    eprintln!("serve peak: {before} KiB before, {after} KiB after four bombs");
    assert!(after < 100 * 1024, "the server grew to {after} KiB");
    // The session is unharmed: an agent's backup goes through after it is given up.
    post(&sock, "/v1/backup/abandon", b"");
    let out = agent_backup(&sock, "h", &src);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
