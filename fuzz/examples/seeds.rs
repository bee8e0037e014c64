//! Writes seed inputs for every fuzz target into `fuzz/corpus/<target>/`: valid
//! encodings made by the code that writes them in production, so that the fuzzer
//! starts from the formats' real shapes instead of discovering magic numbers.
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```

use haul_fuzz::{delta_input, pack_header_input, pair_input};
use haul_protocol::chunker::encode_blob;
use haul_protocol::tree::{Node, NodeKind, Timestamp, Tree};
use haul_protocol::wire::{encode_frame_header, encode_ref};
use haul_protocol::BlobKind;
use haul_protocol::{BlobRef, ChunkId, PackId, SnapshotId, TreeId};
use haul_repo::crypto::KdfParams;
use haul_repo::format::config::RepoConfig;
use haul_repo::format::index_file::{self, IndexedPack};
use haul_repo::format::key_file::KeyFile;
use haul_repo::format::lock_file::LockFile;
use haul_repo::format::pack_header::{self, PackEntry};
use haul_repo::format::snapshot::{Snapshot, SourceKind, Summary};
use std::path::Path;

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut written = 0;
    let mut seed = |target: &str, bytes: Vec<u8>| {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        let name = fnv1a(&bytes);
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        written += 1;
    };

    for tree in trees() {
        seed("tree_decode", tree.encode());
    }
    // A large directory's page index.
    let pages = haul_protocol::tree::Pages {
        pages: (0..3u8)
            .map(|i| haul_protocol::tree::PageRef {
                first: vec![b'a' + i; 1 + i as usize],
                id: haul_protocol::TreeId([i; 32]),
            })
            .collect(),
    };
    seed("tree_decode", pages.encode());

    let mut c = zstd::bulk::Compressor::new(1).unwrap();
    for plain in [
        Vec::new(),
        b"hello".to_vec(),
        b"abcabcabcabcabcabcabcabcabcabcabcabc".repeat(20),
        vec![0u8; 5000],
        (0..=255u8).collect(),
    ] {
        seed("blob_decode", encode_blob(&mut c, plain).unwrap());
    }

    let entries = |n: u32| -> Vec<PackEntry> {
        (0..n)
            .map(|i| PackEntry {
                kind: if i % 3 == 0 {
                    BlobKind::Tree
                } else {
                    BlobKind::Data
                },
                id: ChunkId::of(&i.to_le_bytes()).0,
                offset: i * 100,
                length: 100,
                raw_length: 60 + i,
            })
            .collect()
    };
    for n in [0, 1, 3] {
        seed(
            "pack_header",
            pack_header_input(u64::from(n) * 100, &pack_header::encode(&entries(n))),
        );
    }
    seed("index_file", index_file::encode(&[]));
    seed(
        "index_file",
        index_file::encode(&[
            IndexedPack {
                pack: PackId::of(b"p1"),
                blobs: entries(2),
            },
            IndexedPack {
                pack: PackId::of(b"p2"),
                blobs: entries(1),
            },
        ]),
    );

    let time = "2026-11-01T12:00:00Z".parse().unwrap();
    let snapshot = Snapshot {
        time,
        host: "web-1".into(),
        paths: vec!["/srv".into(), "/etc".into()],
        tags: vec!["nightly".into()],
        tree: TreeId::of(b"root"),
        parent: Some(SnapshotId::of(b"parent")),
        source: SourceKind::Pull,
        summary: Summary {
            files_new: 3,
            bytes_read: 12345,
            ..Summary::default()
        },
        original: None,
    };
    seed("snapshot", serde_json::to_vec(&snapshot).unwrap());
    seed(
        "snapshot",
        serde_json::to_vec_pretty(&Snapshot {
            parent: None,
            tags: vec![],
            source: SourceKind::RdiffBackupImport,
            ..snapshot
        })
        .unwrap(),
    );

    let key = KeyFile {
        version: 1,
        created: time,
        hostname: "pbs".into(),
        username: "root".into(),
        kdf: KdfParams::default(),
        salt: hex::encode([7u8; 16]),
        sealed_master: hex::encode([9u8; 72]),
    };
    seed("key_file", serde_json::to_vec_pretty(&key).unwrap());

    seed(
        "repo_config",
        serde_json::to_vec(&RepoConfig::new(3)).unwrap(),
    );
    let lock = LockFile {
        exclusive: false,
        prune: false,
        holder: "0f".repeat(16),
        pid_ns: 4026531836,
        boot_id: "5f1b2c3d-0000-4000-8000-000000000000".into(),
        time,
        hostname: "pbs".into(),
        pid: 4242,
        purpose: "backup-local".into(),
    };
    seed("repo_config", serde_json::to_vec(&lock).unwrap());

    let commands = [
        "haul-agent backup --socket /run/haul/r1.sock --params-stdin --path /srv/www --path '/etc/my dir' --exclude '*.tmp' --one-file-system --exclude-caches",
        "haul-agent restore --socket /run/haul/r2.sock --params-stdin --snapshot 0a1b2c3d --target /var/restore/web --include /srv --threads 4",
        "haul-agent restore --socket /run/haul/r2.sock --snapshot latest --target '/var/restore/it'\\''s'",
    ];
    for cmd in commands {
        seed("command_split", cmd.as_bytes().to_vec());
        seed("wrapper_policy", cmd.as_bytes().to_vec());
    }
    seed(
        "wrapper_policy",
        pair_input(
            include_bytes!("../../examples/wrapper.toml"),
            b"haul-agent backup --socket /run/haul/a.sock --path /etc/ssh",
        ),
    );

    seed(
        "pbs_config",
        include_bytes!("../../examples/pbs.toml").to_vec(),
    );
    seed(
        "pbs_config",
        b"[server]\nstate_dir = \"/srv/haul\"\nmax_concurrent = 3\nalert_window = \"30h\"\n\
          retention = { keep_daily = 7, keep_weekly = 4 }\n[feed]\ntitle = \"backups\"\n\
          [[host]]\nname = \"a\"\naddress = \"x\"\npaths = [\"/srv\"]\nschedule = \"0 */6 * * *\"\n\
          [[host]]\nname = \"b\"\naddress = \"y\"\npaths = [\"/srv\"]\nrepository = \"b\"\nalert_window = \"2h\"\nschedule = \"1h 30m\"\n\
          [[clone]]\nname = \"off-site\"\naddress = \"z\"\nrepository = \"/backup/haul\"\nhosts = [\"a\"]\n"
            .to_vec(),
    );

    let records: &[u8] = b"File .\n  Type dir\n  ModTime 1711623600\n  Uid 0\n  Uname root\n  Gid 0\n  Gname root\n  Permissions 493\n\
File dir/hardlink-c\n  Type reg\n  Size 20\n  NumHardLinks 3\n  Inode 10275319\n  DeviceLoc 65024\n  SHA1Digest 5c8bff62f4401ea2e4e2b4ca972bff665ec65060\n  ModTime -315619200\n  Uid 1234\n  Uname :\n  Gid 0\n  Gname root\n  Permissions 2541\n\
File odd\\nname\n  Type sym\n  SymData odd\\ntarget\\\\x\n  Uid 0\n  Gid 0\n  Permissions 511\n  AlternateMirrorName 1\n\
File cdev\n  Type dev\n  DeviceNum c 1 3\n  Uid 0\n  Gid 0\n  Permissions 420\n\
File gone\n  Type None\n";
    seed("rdiff_meta", [b"\x00", records].concat());
    seed(
        "rdiff_meta",
        [
            &b"\x01"[..],
            b"# file: xattr.txt\nuser.comment=0sc2Vjb25kIHZhbHVl\nuser.binary=0sAP8Q\nuser.hex=0x00ff\n# file: odd\\040name\nuser.a=\"b\"\nuser.empty\n",
        ]
        .concat(),
    );
    seed(
        "rdiff_meta",
        [
            &b"\x02"[..],
            b"# file: acl.txt\nuser::rw-\nuser:1234:r--\ngroup::r--\ngroup:5678:rw-\nmask::rw-\nother::r--\ndefault:user::rwx\ndefault:group::r-x\ndefault:other::---\n# file: plain\nuser::rw-\ngroup::r--\nother::r--\n",
        ]
        .concat(),
    );

    for t in [
        "2024-03-29T12:00:00+01:00",
        "2024-01-02T13-00-00+01-00",
        "2024-01-01T00:00:00Z",
    ] {
        seed("rdiff_names", [b"\x00", t.as_bytes()].concat());
    }
    for n in [
        &b"big.bin.2024-03-29T12:00:00+01:00.diff.gz"[..],
        b"looks.2024-01-01T00:00:00+01:00.missing.2024-03-29T12:00:00+01:00.diff.gz",
        b"new.txt.2024-03-29T12:00:00+01:00.missing",
        b"d.2024-03-29T12:00:00Z.dir",
    ] {
        seed("rdiff_names", [b"\x01", n].concat());
    }
    seed(
        "rdiff_names",
        [
            &b"\x02"[..],
            &pair_input(
                b"A-Z:\\\\\\073",
                &pair_input(
                    b"escape_dos_devices\nescape_trailing_spaces\n",
                    b"Con.TXT ;0a ",
                ),
            ),
        ]
        .concat(),
    );

    let base: Vec<u8> = b"the quick brown fox jumps over the lazy dog ".repeat(8);
    let mut new = base.clone();
    new.splice(40..40, b"INSERTED".iter().copied());
    new.extend_from_slice(&base[..50]);
    let sig = fast_rsync::Signature::calculate(
        &base,
        fast_rsync::SignatureOptions {
            block_size: 16,
            crypto_hash_size: 8,
        },
    );
    let mut delta = Vec::new();
    fast_rsync::diff(&sig.index(), &new, &mut delta).unwrap();
    seed("rdiff_delta", delta_input(&base, &delta));
    seed(
        "rdiff_delta",
        delta_input(
            b"0123456789",
            b"\x72\x73\x02\x36\x02hi\x45\x02\x03\x41\x01x\x00",
        ),
    );

    let refs = [
        BlobRef::data(ChunkId::of(b"a")),
        BlobRef::tree(TreeId::of(b"b")),
    ];
    let mut body = vec![0u8];
    for r in &refs {
        encode_ref(&mut body, r);
    }
    seed("wire_frames", body);
    let mut body = vec![1u8];
    for (r, bytes) in refs.iter().zip([&b"hello"[..], b""]) {
        encode_frame_header(&mut body, r, bytes.len() as u32);
        body.extend_from_slice(bytes);
    }
    seed("wire_frames", body);

    println!("wrote {written} seeds under {}", corpus.display());
}

/// Trees with every field and kind in use.
fn trees() -> Vec<Tree> {
    let file = Node {
        name: b"file.txt".to_vec(),
        kind: NodeKind::File,
        mode: 0o644,
        uid: 1000,
        gid: 1000,
        user: b"alice".to_vec(),
        group: b"users".to_vec(),
        size: 12345,
        mtime: Timestamp {
            sec: 1_700_000_000,
            nsec: 123_456_789,
        },
        ctime: Timestamp { sec: -5, nsec: 0 },
        inode: 42,
        device: 2049,
        nlink: 1,
        xattrs: vec![
            (b"user.a".to_vec(), b"1".to_vec()),
            (b"user.b".to_vec(), Vec::new()),
        ],
        content: vec![ChunkId::of(b"c1"), ChunkId::of(b"c2")],
        ..Node::default()
    };
    let dir = Node {
        name: b"sub".to_vec(),
        kind: NodeKind::Dir,
        mode: 0o755,
        subtree: Some(TreeId::of(b"sub")),
        ..Node::default()
    };
    let link = Node {
        name: vec![0xff, b'x'],
        kind: NodeKind::Symlink,
        target: b"../elsewhere".to_vec(),
        ..Node::default()
    };
    let dev = Node {
        name: b"tty".to_vec(),
        kind: NodeKind::CharDevice,
        rdev: 0x0501,
        ..Node::default()
    };
    let mut all = Tree {
        nodes: vec![file.clone(), dir, link, dev],
    };
    all.sort();
    vec![Tree::default(), Tree { nodes: vec![file] }, all]
}

/// A short, stable name for a seed: FNV-1a of its bytes.
fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}
