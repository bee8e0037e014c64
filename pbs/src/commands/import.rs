//! `import-rdiff`: every session of an rdiff-backup repository becomes a snapshot with
//! the session's time, tagged `rdiff-backup` and with the session's original
//! timestring. Sessions are imported oldest first, in-process, through the engine's
//! ingest sessions; content is rebuilt by `haul-rdiff` and checked against the
//! recorded SHA-1 before it is stored. A file whose content was already stored (same
//! SHA-1 and size) is not rebuilt again, so N sessions cost about the distinct file
//! versions. Sessions already imported for the host (same tags) are skipped, so the
//! import can be run again, or resumed after a failure.

use super::{hostname, Context};
use crate::cli::ImportRdiffArgs;
use crate::error::CliError;
use crate::output::{bytes, json_line};
use haul_protocol::chunker::Chunker;
use haul_protocol::tree::{Node, NodeKind, Timestamp, Tree};
use haul_protocol::{BlobKind, ChunkId, TreeId};
use haul_rdiff::meta::{Kind, Record};
use haul_repo::format::snapshot::{SourceKind, Summary};
use haul_repo::ingest::{IngestSession, ParentChoice, SessionInfo};

use std::collections::{HashMap, HashSet};

/// The tag every imported snapshot carries.
pub const TAG: &str = "rdiff-backup";

pub fn import_rdiff(ctx: &Context, args: ImportRdiffArgs) -> Result<(), CliError> {
    let rd = haul_rdiff::Repo::open(&args.dir).map_err(|e| match e {
        haul_rdiff::Error::Refused(m) => CliError::usage(m),
        other => CliError::Failed(format!("{}: {other}", args.dir.display())),
    })?;
    for w in rd.warnings() {
        eprintln!("warning: {}: {w}", args.dir.display());
    }
    let path = args.path.clone();
    let comps: Vec<Vec<u8>> = std::path::Path::new(&path)
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n.as_encoded_bytes().to_vec()),
            _ => None,
        })
        .collect();
    if !path.starts_with('/') {
        return Err(CliError::usage(format!(
            "--path {path}: give the absolute path the rdiff-backup tree was a backup of"
        )));
    }
    let repo = ctx.open_indexed()?;
    let host = args.host.clone().unwrap_or_else(hostname);
    let done: HashSet<String> = repo
        .snapshots()?
        .into_iter()
        .filter(|(_, s)| s.host == host && s.tags.iter().any(|t| t == TAG))
        .flat_map(|(_, s)| s.tags)
        .collect();
    let mut cache: HashMap<([u8; 20], u64), Vec<ChunkId>> = HashMap::new();
    let mut chunker = Chunker::new(repo.config().chunker);
    let (mut imported, mut skipped) = (0, 0);
    for t in rd.sessions() {
        if done.contains(&t.raw) {
            skipped += 1;
            if ctx.global.json {
                json_line(
                    &serde_json::json!({"type": "skipped", "session": t.raw, "reason": "already imported"}),
                );
            } else {
                println!("session {}: already imported", t.raw);
            }
            continue;
        }
        let time = chrono::DateTime::from_timestamp(t.epoch, 0)
            .ok_or_else(|| CliError::Failed(format!("session {}: time out of range", t.raw)))?;
        let fail = |e: haul_rdiff::Error| CliError::Failed(format!("session {}: {e}", t.raw));
        let meta = rd.metadata_at(t.epoch).map_err(fail)?;
        let xattrs = rd.xattrs_at(t.epoch).map_err(fail)?;
        let session = IngestSession::start(
            &repo,
            SessionInfo {
                host: host.clone(),
                paths: vec![path.clone()],
                tags: vec![TAG.to_string(), t.raw.clone()],
                source: SourceKind::RdiffBackupImport,
                parent: ParentChoice::None,
            },
        )?;
        let mut summary = Summary::default();
        let built = build(
            &rd,
            &session,
            &mut chunker,
            &meta,
            &xattrs,
            t.epoch,
            &mut cache,
            &mut summary,
        );
        let root_dir = match built {
            Ok(r) => r,
            Err(e) => {
                let _ = session.abandon();
                return Err(e);
            }
        };
        let root = wrap(&session, root_dir, &comps)?;
        let (id, snap) = session.commit_at(root, summary, time)?;
        imported += 1;
        if ctx.global.json {
            json_line(
                &serde_json::json!({"type": "imported", "session": t.raw, "snapshot": id.to_hex(), "time": snap.time, "summary": snap.summary}),
            );
        } else {
            println!(
                "session {} -> snapshot {}: {} files, {} new",
                t.raw,
                &id.to_hex()[..8],
                snap.summary.files_new + snap.summary.files_unchanged,
                bytes(snap.summary.data_new)
            );
        }
    }
    if ctx.global.json {
        json_line(
            &serde_json::json!({"type": "import-summary", "imported": imported, "skipped": skipped, "host": host}),
        );
    } else {
        println!(
            "{imported} sessions imported, {skipped} already there, as host {host} (tag {TAG})"
        );
    }
    Ok(())
}

/// What the root of the rdiff-backup tree became: its node (its own metadata) and
/// its tree.
struct RootDir {
    node: Node,
    tree: TreeId,
}

/// Stores the trees of one session bottom-up and returns the root.
#[allow(clippy::too_many_arguments)]
fn build(
    rd: &haul_rdiff::Repo,
    session: &IngestSession,
    chunker: &mut Chunker,
    meta: &haul_rdiff::meta::Tree,
    xattrs: &haul_rdiff::meta::XattrTree,
    epoch: i64,
    cache: &mut HashMap<([u8; 20], u64), Vec<ChunkId>>,
    summary: &mut Summary,
) -> Result<RootDir, CliError> {
    // Hard-link groups of this session: the content of a member without a SHA-1 is
    // the first member's.
    let mut group_sha: HashMap<(u64, u64), [u8; 20]> = HashMap::new();
    for rec in meta.values() {
        if let (Kind::Reg, true, Some(sha)) = (rec.kind, rec.nlink > 1, rec.sha1) {
            group_sha.entry((rec.devloc, rec.inode)).or_insert(sha);
        }
    }
    let mut children: HashMap<Vec<Vec<u8>>, Vec<Node>> = HashMap::new();
    let mut root = None;
    // Reverse order: everything below a directory comes before it.
    for rec in meta.values().rev() {
        let mut node = node_of(rec, xattrs);
        match rec.kind {
            Kind::Reg => {
                // A later member of a hard-link group has no SHA-1 of its own.
                let group = (rec.nlink > 1).then_some((rec.devloc, rec.inode));
                let sha = rec
                    .sha1
                    .or_else(|| group.and_then(|g| group_sha.get(&g).copied()));
                node.content = match sha {
                    Some(sha) if cache.contains_key(&(sha, rec.size)) => {
                        summary.files_unchanged += 1;
                        cache[&(sha, rec.size)].clone()
                    }
                    sha => {
                        let mut checked = rec.clone();
                        checked.sha1 = sha;
                        let content = rd
                            .content(&checked, epoch)
                            .map_err(|e| CliError::Failed(format!("rdiff-backup import: {e}")))?;
                        summary.bytes_read += content.len() as u64;
                        summary.files_new += 1;
                        let ids = store(session, chunker, &content)?;
                        if let Some(sha) = sha {
                            cache.insert((sha, rec.size), ids.clone());
                        }
                        ids
                    }
                };
                summary.bytes_total += rec.size;
            }
            Kind::Dir => {
                let mut nodes = children.remove(&rec.path).unwrap_or_default();
                nodes.sort_by(|a, b| a.name.cmp(&b.name));
                let tree = Tree { nodes };
                node.subtree = Some(TreeId(session.add_new(BlobKind::Tree, tree.encode())?));
                summary.dirs += 1;
            }
            _ => {}
        }
        match rec.path.split_last() {
            Some((_, parent)) => children.entry(parent.to_vec()).or_default().push(node),
            None => {
                let tree = node.subtree.ok_or_else(|| {
                    CliError::Failed("rdiff-backup import: the root is not a directory".into())
                })?;
                root = Some(RootDir { node, tree });
            }
        }
    }
    root.ok_or_else(|| {
        CliError::Failed("rdiff-backup import: the metadata has no root (`File .`)".into())
    })
}

/// Chunks and stores a file's content.
fn store(
    session: &IngestSession,
    chunker: &mut Chunker,
    content: &[u8],
) -> Result<Vec<ChunkId>, CliError> {
    let mut ids = Vec::new();
    let mut failed = None;
    chunker
        .chunk(content, |chunk| {
            match session.add_new(BlobKind::Data, chunk) {
                Ok(id) => {
                    ids.push(ChunkId(id));
                    Ok(())
                }
                Err(e) => {
                    failed = Some(e);
                    Err(std::io::Error::other("store failed"))
                }
            }
        })
        .map_err(|e| CliError::Failed(format!("rdiff-backup import: {e}")))?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    Ok(ids)
}

/// The snapshot's root tree for a backup of `path`: for `/`, the tree's own listing;
/// else the path's directories down to the tree, which takes the last name and the
/// mirror root's metadata (the directories above it take that metadata too: the
/// rdiff-backup tree does not record them).
fn wrap(session: &IngestSession, root: RootDir, comps: &[Vec<u8>]) -> Result<TreeId, CliError> {
    let Some((last, above)) = comps.split_last() else {
        return Ok(root.tree);
    };
    let mut node = root.node;
    node.name = last.clone();
    let mut tree = Tree { nodes: vec![node] };
    for name in above.iter().rev() {
        let id = TreeId(session.add_new(BlobKind::Tree, tree.encode())?);
        let mut dir = tree.nodes[0].clone();
        dir.name = name.clone();
        dir.content = Vec::new();
        dir.subtree = Some(id);
        tree = Tree { nodes: vec![dir] };
    }
    Ok(TreeId(session.add_new(BlobKind::Tree, tree.encode())?))
}

fn node_of(rec: &Record, xattrs: &haul_rdiff::meta::XattrTree) -> Node {
    let kind = match rec.kind {
        Kind::Reg | Kind::Absent => NodeKind::File,
        Kind::Dir => NodeKind::Dir,
        Kind::Sym => NodeKind::Symlink,
        Kind::Fifo => NodeKind::Fifo,
        Kind::Sock => NodeKind::Socket,
        Kind::Dev(b'b', ..) => NodeKind::BlockDevice,
        Kind::Dev(..) => NodeKind::CharDevice,
    };
    let rdev = match rec.kind {
        Kind::Dev(_, major, minor) => libc::makedev(major, minor),
        _ => 0,
    };
    let mtime = Timestamp {
        sec: rec.mtime.unwrap_or(0),
        nsec: 0,
    };
    Node {
        name: rec.path.last().cloned().unwrap_or_default(),
        kind,
        mode: rec.perms & 0o7777,
        uid: rec.uid,
        gid: rec.gid,
        user: rec.uname.clone().unwrap_or_default(),
        group: rec.gname.clone().unwrap_or_default(),
        size: if rec.kind == Kind::Reg { rec.size } else { 0 },
        mtime,
        ctime: mtime,
        inode: rec.inode,
        device: rec.devloc,
        nlink: rec.nlink,
        rdev,
        target: rec.target.clone().unwrap_or_default(),
        xattrs: xattrs.get(&rec.path).cloned().unwrap_or_default(),
        content: Vec::new(),
        subtree: None,
    }
}
