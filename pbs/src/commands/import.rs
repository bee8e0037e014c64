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
use crate::record::ImportDetails;
use haul_protocol::chunker::Chunker;
use haul_protocol::tree::{find_node, Lookup, Node, NodeKind, Pager, Timestamp, Tree};
use haul_protocol::SnapshotId;
use haul_protocol::{BlobKind, ChunkId, TreeId};
use haul_rdiff::meta::{Kind, Record};
use haul_repo::format::snapshot::{SourceKind, Summary};
use haul_repo::ingest::{DedupScope, IngestSession, ParentChoice, SessionInfo};
use haul_repo::IndexedRepository;

use std::collections::HashMap;

/// The tag every imported snapshot carries.
pub const TAG: &str = "rdiff-backup";

/// `import-rdiff`, recorded as a run (kind `import`) in the history.
pub fn import_rdiff(ctx: &Context, args: ImportRdiffArgs) -> Result<(), CliError> {
    let start = chrono::Utc::now();
    let host = args.host.clone().unwrap_or_else(hostname);
    let result = import_command(ctx, &args, &host);
    let history = ctx.site()?.history();
    let details = match &result {
        Ok(d) => Ok(crate::record::Details::Import(d.clone())),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = history.record_local((&host, crate::record::RunKind::Import), start, details) {
        crate::errln!("haul-pbs: the import's run record: {e}");
    }
    result.map(|_| ())
}

fn import_command(
    ctx: &Context,
    args: &ImportRdiffArgs,
    host: &str,
) -> Result<ImportDetails, CliError> {
    let repo = ctx.open_indexed_for(Some(host))?;
    let host = host.to_string();
    let json = ctx.global.json;
    let outcome = import(&repo, &args.dir, &host, &args.path, &mut |event| {
        report(json, event)
    })?;
    let mut verified = 0;
    if let Some(newest) = &outcome.newest {
        verified = verify(&repo, &args.dir, newest)?;
        report(
            json,
            Event::Verified {
                snapshot: newest,
                files: verified,
            },
        );
    }
    report(
        json,
        Event::Done {
            outcome: &outcome,
            host: &host,
        },
    );
    Ok(ImportDetails {
        files_verified: Some(verified),
        ..details(&outcome, &args.dir)
    })
}

/// What an import's run record says of it (without its verification).
pub fn details(o: &Outcome, dir: &std::path::Path) -> ImportDetails {
    ImportDetails {
        rdiff_dir: canonical(dir),
        sessions_imported: o.imported as u64,
        sessions_skipped: o.skipped as u64,
        files_rebuilt: o.files_rebuilt,
        bytes_new: o.bytes_new,
        files_verified: None,
    }
}

/// `dir` as recorded in an import run's counters (`rdiff_dir`): what retiring a legacy
/// tree compares with the host's `legacy_rdiff_dir`.
pub fn canonical(dir: &std::path::Path) -> String {
    std::fs::canonicalize(dir)
        .unwrap_or_else(|_| dir.to_path_buf())
        .display()
        .to_string()
}

/// What an import did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub imported: usize,
    pub skipped: usize,
    /// The snapshot of the newest session (imported now or before).
    pub newest: Option<SnapshotId>,
    pub bytes_new: u64,
    pub files_rebuilt: u64,
}

/// Progress of an import, for the command's output or a run's record.
pub enum Event<'a> {
    Skipped {
        session: &'a str,
    },
    Imported {
        session: &'a str,
        snapshot: &'a SnapshotId,
        summary: &'a Summary,
    },
    Verified {
        snapshot: &'a SnapshotId,
        files: u64,
    },
    Done {
        outcome: &'a Outcome,
        host: &'a str,
    },
}

fn report(json: bool, e: Event) {
    match e {
        Event::Skipped { session } if json => {
            json_line(&serde_json::json!({"type": "skipped", "session": session, "reason": "already imported"}))
        }
        Event::Skipped { session } => crate::outln!("session {session}: already imported"),
        Event::Imported { session, snapshot, summary } if json => json_line(
            &serde_json::json!({"type": "imported", "session": session, "snapshot": snapshot.to_hex(), "summary": summary}),
        ),
        Event::Imported { session, snapshot, summary } => crate::outln!(
            "session {session} -> snapshot {}: {} files ({} rebuilt), {} new",
            &snapshot.to_hex()[..8],
            summary.files_new + summary.files_unchanged,
            summary.files_new,
            bytes(summary.data_new)
        ),
        Event::Verified { snapshot, files } if json => json_line(
            &serde_json::json!({"type": "verified", "snapshot": snapshot.to_hex(), "files": files}),
        ),
        Event::Verified { snapshot, files } => crate::outln!(
            "snapshot {} verified against the rdiff-backup mirror: {files} files, every byte and attribute",
            &snapshot.to_hex()[..8]
        ),
        Event::Done { outcome, host } if json => json_line(
            &serde_json::json!({"type": "import-summary", "imported": outcome.imported, "skipped": outcome.skipped, "host": host}),
        ),
        Event::Done { outcome, host } => crate::outln!(
            "{} sessions imported, {} already there, as host {host} (tag {TAG})",
            outcome.imported, outcome.skipped
        ),
    }
}

/// Imports every session of the rdiff-backup repository `dir` not yet imported for
/// `host`, oldest first, as snapshots of `path`.
pub fn import(
    repo: &IndexedRepository,
    dir: &std::path::Path,
    host: &str,
    path: &str,
    events: &mut dyn FnMut(Event),
) -> Result<Outcome, CliError> {
    let rd = open(dir)?;
    for w in rd.warnings() {
        crate::errln!("warning: {}: {w}", dir.display());
    }
    if !path.starts_with('/') {
        return Err(CliError::usage(format!(
            "--path {path}: give the absolute path the rdiff-backup tree was a backup of"
        )));
    }
    let comps: Vec<Vec<u8>> = std::path::Path::new(path)
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n.as_encoded_bytes().to_vec()),
            _ => None,
        })
        .collect();
    let done: HashMap<String, SnapshotId> = repo
        .snapshots()?
        .into_iter()
        .filter(|(_, s)| s.host == host && s.tags.iter().any(|t| t == TAG))
        .flat_map(|(id, s)| s.tags.into_iter().map(move |t| (t, id)))
        .collect();
    let mut contents = Contents {
        rd: &rd,
        chunker: Chunker::new(repo.config().chunker),
        stored: HashMap::new(),
    };
    let mut outcome = Outcome::default();
    for t in rd.sessions() {
        if let Some(id) = done.get(&t.raw) {
            outcome.skipped += 1;
            outcome.newest = Some(*id);
            events(Event::Skipped { session: &t.raw });
            continue;
        }
        let time = chrono::DateTime::from_timestamp(t.epoch, 0)
            .ok_or_else(|| CliError::Failed(format!("session {}: time out of range", t.raw)))?;
        let fail = |e: haul_rdiff::Error| CliError::Failed(format!("session {}: {e}", t.raw));
        let meta = rd.metadata_at(t.epoch).map_err(fail)?;
        let xattrs = rd.xattrs_at(t.epoch).map_err(fail)?;
        let session = IngestSession::start(
            repo,
            SessionInfo {
                host: host.to_string(),
                paths: vec![path.to_string()],
                tags: vec![TAG.to_string(), t.raw.clone()],
                source: SourceKind::RdiffBackupImport,
                parent: ParentChoice::None,
                // The pbs reads the tree itself: nothing to keep from it.
                scope: DedupScope::Repository,
            },
        )?;
        let mut summary = Summary::default();
        let built = build(
            &mut contents,
            &session,
            &meta,
            &xattrs,
            t.epoch,
            &mut summary,
        )
        .and_then(|root| wrap(&session, root, &comps));
        let root = match built {
            Ok(r) => r,
            Err(e) => {
                let _ = session.abandon();
                return Err(e);
            }
        };
        let (id, snap) = session.commit_at(root, summary, time)?;
        outcome.imported += 1;
        outcome.newest = Some(id);
        outcome.bytes_new += snap.summary.data_new;
        outcome.files_rebuilt += snap.summary.files_new;
        events(Event::Imported {
            session: &t.raw,
            snapshot: &id,
            summary: &snap.summary,
        });
    }
    Ok(outcome)
}

fn open(dir: &std::path::Path) -> Result<haul_rdiff::Repo, CliError> {
    haul_rdiff::Repo::open(dir).map_err(|e| match e {
        haul_rdiff::Error::Refused(m) => CliError::usage(m),
        other => CliError::Failed(format!("{}: {other}", dir.display())),
    })
}

/// Checks the snapshot of the newest session against the rdiff-backup mirror, file by
/// file: every path of its metadata is in the snapshot with the same type, mode,
/// owner, mtime, target and device, and every regular file's bytes, read back from
/// the repository, equal the mirror's. Returns the number of files compared.
pub fn verify(
    repo: &IndexedRepository,
    dir: &std::path::Path,
    snapshot: &SnapshotId,
) -> Result<u64, CliError> {
    let rd = open(dir)?;
    let newest = rd
        .sessions()
        .last()
        .expect("a repository has a session")
        .clone();
    let meta = rd
        .metadata_at(newest.epoch)
        .map_err(|e| CliError::Failed(format!("{}: {e}", dir.display())))?;
    let snap = repo.load_snapshot(snapshot)?;
    // The tree of the rdiff-backup root: below the snapshot's path.
    let mut tree = repo.load_tree(&snap.tree)?;
    let path = snap.paths.first().cloned().unwrap_or_else(|| "/".into());
    for comp in std::path::Path::new(&path).components() {
        if let std::path::Component::Normal(n) = comp {
            let sub = find_node(&tree, n.as_encoded_bytes(), |id| repo.load_tree(id))?
                .and_then(|n| n.subtree)
                .ok_or_else(|| {
                    CliError::Failed(format!("snapshot {}: no {path} in it", snapshot.to_hex()))
                })?;
            tree = repo.load_tree(&sub)?;
        }
    }
    let mismatch = |rec: &Record, what: String| {
        CliError::Failed(format!(
            "verification of snapshot {} against the rdiff-backup mirror failed: {}: {what}; the import is incomplete, the rdiff-backup tree is left as it is",
            &snapshot.to_hex()[..8],
            rec.display()
        ))
    };
    let mut trees: HashMap<Vec<Vec<u8>>, Lookup> = HashMap::new();
    trees.insert(Vec::new(), Lookup::new(tree));
    let mut files = 0;
    for rec in meta.values() {
        let Some((name, parent)) = rec.path.split_last() else {
            continue;
        };
        let node = match trees.get_mut(parent) {
            Some(t) => t.find(name, |id| repo.load_tree(id))?.cloned(),
            None => None,
        }
        .ok_or_else(|| mismatch(rec, "missing from the snapshot".into()))?;
        let want = node_of(rec, &Default::default());
        let same = node.kind == want.kind
            && node.mode == want.mode
            && node.uid == want.uid
            && node.gid == want.gid
            && node.mtime == want.mtime
            && node.size == want.size
            && node.target == want.target
            && node.rdev == want.rdev;
        if !same {
            return Err(mismatch(
                rec,
                format!("the snapshot has {node:?}, the metadata says {want:?}"),
            ));
        }
        match rec.kind {
            Kind::Dir => {
                let sub = node
                    .subtree
                    .ok_or_else(|| mismatch(rec, "a directory without a tree".into()))?;
                trees.insert(rec.path.clone(), Lookup::new(repo.load_tree(&sub)?));
            }
            Kind::Reg => {
                let mirror = rd
                    .content(rec, newest.epoch)
                    .map_err(|e| mismatch(rec, e.to_string()))?;
                if !same_bytes(repo, &node.content, mirror.reader())? {
                    return Err(mismatch(
                        rec,
                        "its bytes in the repository differ from the mirror's".into(),
                    ));
                }
                files += 1;
            }
            _ => {}
        }
    }
    Ok(files)
}

/// Whether the chunks `ids`, read back from the repository, are exactly the bytes of
/// `want`, compared a chunk at a time.
fn same_bytes(
    repo: &IndexedRepository,
    ids: &[ChunkId],
    mut want: impl std::io::Read,
) -> Result<bool, CliError> {
    let mut buf = Vec::new();
    for c in ids {
        let chunk = repo.load_chunk(c)?;
        buf.resize(chunk.len(), 0);
        match want.read_exact(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => {
                return Err(CliError::Failed(format!(
                    "reading the mirror's content: {e}"
                )))
            }
            Ok(()) if buf != *chunk => return Ok(false),
            Ok(()) => {}
        }
    }
    let more = want
        .read(&mut [0u8; 1])
        .map_err(|e| CliError::Failed(format!("reading the mirror's content: {e}")))?;
    Ok(more == 0)
}

/// What the root of the rdiff-backup tree became: its node (its own metadata) and
/// its tree.
struct RootDir {
    node: Node,
    tree: TreeId,
}

/// File contents across the sessions of one import: each distinct version (by SHA-1
/// and size) is rebuilt and stored once.
struct Contents<'a> {
    rd: &'a haul_rdiff::Repo,
    chunker: Chunker,
    stored: HashMap<([u8; 20], u64), Vec<ChunkId>>,
}

impl Contents<'_> {
    /// The chunks of `rec` at `epoch`, whose content must have SHA-1 `sha` (when known).
    fn chunks(
        &mut self,
        session: &IngestSession,
        rec: &Record,
        sha: Option<[u8; 20]>,
        epoch: i64,
        summary: &mut Summary,
    ) -> Result<Vec<ChunkId>, CliError> {
        if let Some(ids) = sha.and_then(|sha| self.stored.get(&(sha, rec.size))) {
            summary.files_unchanged += 1;
            return Ok(ids.clone());
        }
        let mut checked = rec.clone();
        checked.sha1 = sha;
        let content = self
            .rd
            .content(&checked, epoch)
            .map_err(|e| CliError::Failed(format!("rdiff-backup import: {e}")))?;
        summary.bytes_read += content.len();
        summary.files_new += 1;
        let ids = store(session, &mut self.chunker, content.reader())?;
        if let Some(sha) = sha {
            self.stored.insert((sha, rec.size), ids.clone());
        }
        Ok(ids)
    }
}

/// Stores the trees of one session bottom-up and returns the root.
fn build(
    contents: &mut Contents,
    session: &IngestSession,
    meta: &haul_rdiff::meta::Tree,
    xattrs: &haul_rdiff::meta::XattrTree,
    epoch: i64,
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
                node.content = contents.chunks(session, rec, sha, epoch, summary)?;
                summary.bytes_total += rec.size;
            }
            Kind::Dir => {
                let mut nodes = children.remove(&rec.path).unwrap_or_default();
                nodes.sort_by(|a, b| a.name.cmp(&b.name));
                let mut offer = |b| session.add_new(BlobKind::Tree, b).map(TreeId);
                node.subtree = Some(Pager::write(&nodes, &mut offer)?);
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
    content: impl std::io::Read,
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
        // rdiff-backup does not record holes: restored fully allocated.
        flags: Default::default(),
    }
}
