//! `diff SNAP1 SNAP2 [PATH]` and `find PATTERN...`: questions about the history that
//! read trees only, never file contents.
//!
//! - `diff` walks both trees side by side and skips every subtree whose id is the same
//!   in both (unchanged directories cost nothing). An entry is added (`+`), removed
//!   (`-`), of another type (`T`), changed in content (`M`: its chunks differ) or in
//!   metadata only (`U`: mode, owner, times, xattrs, link target).
//! - `find` matches names (glob patterns) in every selected snapshot, newest first.
//!   The matches found under a tree are kept by its id, so a directory shared by many
//!   snapshots is searched once.

use super::Context;
use crate::cli::{DiffArgs, FindArgs};
use crate::error::CliError;
use crate::output::{bytes, json_line};
use haul_protocol::tree::{for_each_page, Node, NodeKind};
use haul_protocol::TreeId;
use haul_repo::IndexedRepository;
use std::collections::HashMap;
use std::rc::Rc;

/// What happened to an entry between two snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Added,
    Removed,
    /// Another kind of entry under the same name.
    TypeChanged,
    /// A file whose content differs.
    Content,
    /// The same content (or none), other metadata.
    Metadata,
}

impl Change {
    /// restic's modifiers: `+`, `-`, `T`, `M`, `U`.
    pub fn modifier(self) -> char {
        match self {
            Change::Added => '+',
            Change::Removed => '-',
            Change::TypeChanged => 'T',
            Change::Content => 'M',
            Change::Metadata => 'U',
        }
    }
}

/// The totals of a diff.
#[derive(Debug, Default, serde::Serialize)]
pub struct DiffStats {
    pub files_added: u64,
    pub files_removed: u64,
    pub files_changed: u64,
    pub dirs_added: u64,
    pub dirs_removed: u64,
    pub others_added: u64,
    pub others_removed: u64,
    pub metadata_only: u64,
    pub type_changed: u64,
    /// File bytes in entries added, and in entries removed.
    pub bytes_added: u64,
    pub bytes_removed: u64,
}

impl DiffStats {
    fn count(&mut self, change: Change, node: &Node) {
        let add = change == Change::Added;
        match (change, node.kind) {
            (Change::Added | Change::Removed, NodeKind::File) => {
                *if add {
                    &mut self.files_added
                } else {
                    &mut self.files_removed
                } += 1;
                *if add {
                    &mut self.bytes_added
                } else {
                    &mut self.bytes_removed
                } += node.size;
            }
            (Change::Added | Change::Removed, NodeKind::Dir) => {
                *if add {
                    &mut self.dirs_added
                } else {
                    &mut self.dirs_removed
                } += 1;
            }
            (Change::Added | Change::Removed, _) => {
                *if add {
                    &mut self.others_added
                } else {
                    &mut self.others_removed
                } += 1;
            }
            (Change::Content, _) => self.files_changed += 1,
            (Change::Metadata, _) => self.metadata_only += 1,
            (Change::TypeChanged, _) => self.type_changed += 1,
        }
    }
}

/// Every node of a directory, across its pages.
pub(crate) fn entries(
    repo: &IndexedRepository,
    tree: Option<&TreeId>,
) -> haul_repo::Result<Vec<Node>> {
    let mut out = Vec::new();
    if let Some(id) = tree {
        for_each_page(
            repo.load_tree(id)?,
            |id| repo.load_tree(id),
            |page| {
                out.extend(page.nodes);
                Ok(())
            },
        )?;
    }
    Ok(out)
}

fn join(prefix: &str, name: &[u8]) -> String {
    format!("{prefix}/{}", String::from_utf8_lossy(name))
}

struct Differ<'a> {
    repo: &'a IndexedRepository,
    stats: DiffStats,
    report: &'a mut dyn FnMut(Change, &str, &Node),
}

impl Differ<'_> {
    fn note(&mut self, change: Change, path: &str, node: &Node) {
        self.stats.count(change, node);
        (self.report)(change, path, node);
    }

    /// `node` and everything below it, all added or all removed.
    fn whole(&mut self, change: Change, path: &str, node: &Node) -> haul_repo::Result<()> {
        self.note(change, path, node);
        for child in entries(self.repo, node.subtree.as_ref())? {
            self.whole(change, &join(path, &child.name), &child)?;
        }
        Ok(())
    }

    fn dirs(
        &mut self,
        a: Option<&TreeId>,
        b: Option<&TreeId>,
        prefix: &str,
    ) -> haul_repo::Result<()> {
        if a == b {
            return Ok(());
        }
        let (old, new) = (entries(self.repo, a)?, entries(self.repo, b)?);
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new.len() {
            let order = match (old.get(i), new.get(j)) {
                (Some(x), Some(y)) => x.name.cmp(&y.name),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match order {
                std::cmp::Ordering::Less => {
                    self.whole(Change::Removed, &join(prefix, &old[i].name), &old[i])?;
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    self.whole(Change::Added, &join(prefix, &new[j].name), &new[j])?;
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    self.pair(&old[i], &new[j], &join(prefix, &new[j].name))?;
                    i += 1;
                    j += 1;
                }
            }
        }
        Ok(())
    }

    fn pair(&mut self, x: &Node, y: &Node, path: &str) -> haul_repo::Result<()> {
        if x.kind != y.kind {
            self.note(Change::TypeChanged, path, y);
            // What was below the old entry is gone, what is below the new one is new.
            for c in entries(self.repo, x.subtree.as_ref())? {
                self.whole(Change::Removed, &join(path, &c.name), &c)?;
            }
            for c in entries(self.repo, y.subtree.as_ref())? {
                self.whole(Change::Added, &join(path, &c.name), &c)?;
            }
            return Ok(());
        }
        if x.kind == NodeKind::File && (x.content != y.content || x.size != y.size) {
            self.note(Change::Content, path, y);
        } else if x.restore_digest() != y.restore_digest() {
            self.note(Change::Metadata, path, y);
        }
        if x.kind == NodeKind::Dir {
            self.dirs(x.subtree.as_ref(), y.subtree.as_ref(), path)?;
        }
        Ok(())
    }
}

/// The tree at `path` in the tree `root` (none if it is not there or not a directory).
fn subtree_at(
    repo: &IndexedRepository,
    root: &TreeId,
    path: &str,
) -> Result<Option<TreeId>, CliError> {
    let comps = super::browse::components(path);
    if comps.is_empty() {
        return Ok(Some(*root));
    }
    Ok(node_at(repo, root, &comps)?
        .filter(|n| n.kind == NodeKind::Dir)
        .and_then(|n| n.subtree))
}

/// The node named by `comps` (at least one name) below the tree `root`: none if a name
/// on the way is missing or not a directory.
pub(crate) fn node_at(
    repo: &IndexedRepository,
    root: &TreeId,
    comps: &[Vec<u8>],
) -> Result<Option<Node>, CliError> {
    let mut tree = *root;
    let mut node = None;
    for (i, c) in comps.iter().enumerate() {
        let Some(found) =
            haul_protocol::tree::find_node(&repo.load_tree(&tree)?, c, |t| repo.load_tree(t))?
        else {
            return Ok(None);
        };
        if i + 1 < comps.len() {
            match found.subtree.filter(|_| found.kind == NodeKind::Dir) {
                Some(t) => tree = t,
                None => return Ok(None),
            }
        }
        node = Some(found);
    }
    Ok(node)
}

pub fn diff(ctx: &Context, args: DiffArgs) -> Result<(), CliError> {
    let (repo, _lock) = ctx.open_for_reading(None, "diff", true)?;
    let (id_a, a) = repo.find_snapshot(&args.first)?;
    let (id_b, b) = repo.find_snapshot(&args.second)?;
    let prefix = args.path.as_deref().map(|p| {
        let c = super::browse::components(p);
        c.iter()
            .map(|c| format!("/{}", String::from_utf8_lossy(c)))
            .collect::<String>()
    });
    let (ta, tb) = match &prefix {
        Some(p) => (
            subtree_at(&repo, &a.tree, p)?,
            subtree_at(&repo, &b.tree, p)?,
        ),
        None => (Some(a.tree), Some(b.tree)),
    };
    if !ctx.global.json {
        crate::outln!(
            "comparing snapshot {} ({}) to {} ({}):",
            id_a.short(),
            a.time.format("%Y-%m-%d %H:%M:%S"),
            id_b.short(),
            b.time.format("%Y-%m-%d %H:%M:%S")
        );
    }
    let json = ctx.global.json;
    let mut report = |change: Change, path: &str, node: &Node| {
        if crate::output::stdout_closed() {
            return;
        }
        let shown = if node.kind == NodeKind::Dir {
            format!("{path}/")
        } else {
            path.to_string()
        };
        if json {
            json_line(&serde_json::json!({
                "type": "change", "path": path, "modifier": change.modifier().to_string(),
                "change": change, "kind": node.kind.word(), "size": node.size,
            }));
        } else {
            crate::outln!("{}    {shown}", change.modifier());
        }
    };
    let mut d = Differ {
        repo: &repo,
        stats: DiffStats::default(),
        report: &mut report,
    };
    d.dirs(ta.as_ref(), tb.as_ref(), prefix.as_deref().unwrap_or(""))?;
    let s = d.stats;
    if json {
        crate::output::typed_line("statistics", &s);
    } else {
        crate::outln!(
            "\nFiles: {} new, {} removed, {} changed\nDirs: {} new, {} removed\nOthers: {} new, {} removed\nMetadata only: {}, type changed: {}\nAdded: {}\nRemoved: {}",
            s.files_added,
            s.files_removed,
            s.files_changed,
            s.dirs_added,
            s.dirs_removed,
            s.others_added,
            s.others_removed,
            s.metadata_only,
            s.type_changed,
            bytes(s.bytes_added),
            bytes(s.bytes_removed)
        );
    }
    Ok(())
}

/// A match of `find`, relative to the tree it was found in.
#[derive(Clone)]
struct Found {
    path: String,
    kind: NodeKind,
    size: u64,
    mtime: haul_protocol::tree::Timestamp,
}

struct Finder<'a> {
    repo: &'a IndexedRepository,
    patterns: Vec<glob::Pattern>,
    /// The matches under each tree searched, by its id.
    memo: HashMap<TreeId, Rc<Vec<Found>>>,
}

impl Finder<'_> {
    fn under(&mut self, tree: &TreeId) -> haul_repo::Result<Rc<Vec<Found>>> {
        if let Some(m) = self.memo.get(tree) {
            return Ok(m.clone());
        }
        let mut found = Vec::new();
        for node in entries(self.repo, Some(tree))? {
            let name = String::from_utf8_lossy(&node.name).into_owned();
            if self.patterns.iter().any(|p| p.matches(&name)) {
                found.push(Found {
                    path: format!("/{name}"),
                    kind: node.kind,
                    size: node.size,
                    mtime: node.mtime,
                });
            }
            if let Some(sub) = node.subtree {
                for f in self.under(&sub)?.iter() {
                    found.push(Found {
                        path: format!("/{name}{}", f.path),
                        ..f.clone()
                    });
                }
            }
        }
        let found = Rc::new(found);
        self.memo.insert(*tree, found.clone());
        Ok(found)
    }
}

pub fn find(ctx: &Context, args: FindArgs) -> Result<(), CliError> {
    let patterns = args
        .patterns
        .iter()
        .map(|p| {
            glob::Pattern::new(p).map_err(|e| {
                CliError::usage(format!("pattern {p:?}: {e} (a glob such as '*.conf')"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let filter = args.filter.to_filter();
    let (repo, _lock) = ctx.open_for_reading(filter.host.as_deref(), "find", true)?;
    let mut snapshots = repo.snapshots_matching(&filter)?;
    snapshots.reverse();
    if let Some(n) = args.newest {
        snapshots.truncate(n);
    }
    let mut finder = Finder {
        repo: &repo,
        patterns,
        memo: HashMap::new(),
    };
    let mut total = 0;
    for (id, snap) in &snapshots {
        let found = finder.under(&snap.tree)?;
        if found.is_empty() {
            continue;
        }
        total += found.len();
        if !ctx.global.json {
            crate::outln!(
                "found in snapshot {} of {} from {}:",
                id.short(),
                snap.host,
                snap.time.format("%Y-%m-%d %H:%M:%S")
            );
        }
        for f in found.iter() {
            let mtime =
                chrono::DateTime::from_timestamp(f.mtime.sec, f.mtime.nsec).unwrap_or_default();
            let path = &f.path;
            if ctx.global.json {
                json_line(&serde_json::json!({
                    "type": "match", "snapshot": id.to_hex(), "host": snap.host,
                    "time": snap.time, "path": path, "kind": f.kind.word(), "size": f.size,
                    "mtime": mtime.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
                }));
            } else {
                crate::outln!(
                    "  {:>10}  {}  {path}",
                    bytes(f.size),
                    mtime.format("%Y-%m-%d %H:%M:%S")
                );
            }
        }
    }
    if !ctx.global.json {
        crate::outln!(
            "{total} match(es) in {} snapshot(s) searched",
            snapshots.len()
        );
    }
    Ok(())
}
