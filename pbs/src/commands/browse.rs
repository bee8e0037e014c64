//! `snapshots` and `ls`.

use super::Context;
use crate::cli::{LsArgs, SnapshotFilter, SnapshotsArgs};
use crate::error::CliError;
use crate::output::{bytes, json_line};
use haul_protocol::tree::{find_node, for_each_page, Node, NodeKind, TreeBlob};
use haul_repo::IndexedRepository;

impl SnapshotFilter {
    pub fn to_filter(&self) -> haul_repo::SnapshotFilter {
        haul_repo::SnapshotFilter {
            host: self.host.clone(),
            paths: self.paths.clone(),
            tags: self.tag.clone(),
        }
    }

    /// The snapshot `spec` names, with these filters: `HOST:latest` is `latest` among
    /// HOST's snapshots (as `latest --host HOST`).
    pub fn select(&self, spec: &str) -> Result<(String, haul_repo::SnapshotFilter), CliError> {
        let mut filter = self.to_filter();
        let spec = match spec.rsplit_once(':') {
            Some((host, rest)) if !host.is_empty() => {
                if filter.host.as_ref().is_some_and(|h| h != host) {
                    return Err(CliError::usage(format!(
                        "snapshot {spec:?} names host {host:?}, but --host says {:?}: give one",
                        filter.host.as_deref().unwrap_or_default()
                    )));
                }
                filter.host = Some(host.to_string());
                rest.to_string()
            }
            _ => spec.to_string(),
        };
        Ok((spec, filter))
    }
}

pub fn snapshots(ctx: &Context, args: SnapshotsArgs) -> Result<(), CliError> {
    let filter = args.filter.to_filter();
    let repo = ctx.open_for(filter.host.as_deref())?;
    let list = repo.snapshots_matching(&filter)?;
    if ctx.global.json {
        for (id, s) in &list {
            let mut v = serde_json::to_value(s).expect("snapshot serializes");
            v["id"] = serde_json::Value::String(id.to_hex());
            v["short_id"] = serde_json::Value::String(id.short());
            v["type"] = serde_json::Value::String("snapshot".into());
            json_line(&v);
        }
        return Ok(());
    }
    crate::output::table(
        &["ID", "TIME (UTC)", "HOST", "SIZE", "TAGS", "PATHS"],
        &[3],
        list.iter()
            .map(|(id, s)| {
                vec![
                    id.short(),
                    s.time.format("%Y-%m-%d %H:%M:%S").to_string(),
                    s.host.clone(),
                    bytes(s.summary.bytes_total),
                    s.tags.join(","),
                    s.paths.join(" "),
                ]
            })
            .collect(),
    );
    crate::outln!("{} snapshot(s)", list.len());
    Ok(())
}

/// Splits a snapshot path into components.
pub fn components(path: &str) -> Vec<Vec<u8>> {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(|c| c.as_bytes().to_vec())
        .collect()
}

pub fn ls(ctx: &Context, args: LsArgs) -> Result<(), CliError> {
    let (spec, filter) = args.filter.select(&args.snapshot)?;
    let (repo, _lock) = ctx.open_for_reading(filter.host.as_deref(), "ls", true)?;
    let (id, snap) = repo.find_snapshot_matching(&spec, &filter)?;
    if ctx.global.json {
        // First the snapshot, as restic's `ls --json` starts.
        json_line(&serde_json::json!({
            "type": "snapshot", "struct_type": "snapshot", "id": id.to_hex(), "short_id": id.short(),
            "time": snap.time, "host": snap.host, "paths": snap.paths, "tags": snap.tags,
            "tree": snap.tree.to_hex(),
        }));
    }
    let long = args.long;
    let start = args.path.as_deref().unwrap_or("/");
    let comps = components(start);
    // Find the node at `start`.
    let mut tree = repo.load_tree(&snap.tree)?;
    let mut prefix = String::new();
    let mut at_node: Option<Node> = None;
    for (i, c) in comps.iter().enumerate() {
        let node = find_node(&tree, c, |id| repo.load_tree(id))?
            .ok_or_else(|| CliError::usage(format!("{start} is not in snapshot {}", id.short())))?;
        prefix.push('/');
        prefix.push_str(&String::from_utf8_lossy(c));
        if i + 1 < comps.len() {
            let sub = node
                .subtree
                .ok_or_else(|| CliError::usage(format!("{prefix} is not a directory")))?;
            tree = repo.load_tree(&sub)?;
        } else {
            at_node = Some(node);
        }
    }
    match at_node {
        Some(node) if node.kind != NodeKind::Dir => print_node(ctx, long, &prefix, &node),
        Some(node) => {
            print_node(ctx, long, &prefix, &node);
            if let Some(sub) = node.subtree {
                list(
                    ctx,
                    &repo,
                    repo.load_tree(&sub)?,
                    &prefix,
                    !args.no_recursive,
                    long,
                )?;
            }
        }
        None => list(ctx, &repo, tree, "", !args.no_recursive, long)?,
    }
    Ok(())
}

/// Prints a directory's entries a page at a time: a listing of millions is never held.
fn list(
    ctx: &Context,
    repo: &IndexedRepository,
    tree: TreeBlob,
    prefix: &str,
    recursive: bool,
    long: bool,
) -> haul_repo::Result<()> {
    for_each_page(
        tree,
        |id| repo.load_tree(id),
        |page| {
            for node in &page.nodes {
                if crate::output::stdout_closed() {
                    return Ok(()); // `ls | head`: nobody reads the rest
                }
                let path = format!("{prefix}/{}", String::from_utf8_lossy(&node.name));
                print_node(ctx, long, &path, node);
                if recursive {
                    if let Some(sub) = node.subtree {
                        list(ctx, repo, repo.load_tree(&sub)?, &path, recursive, long)?;
                    }
                }
            }
            Ok(())
        },
    )
}

fn mode_string(node: &Node) -> String {
    let t = match node.kind {
        NodeKind::File => '-',
        NodeKind::Dir => 'd',
        NodeKind::Symlink => 'l',
        NodeKind::Fifo => 'p',
        NodeKind::Socket => 's',
        NodeKind::CharDevice => 'c',
        NodeKind::BlockDevice => 'b',
    };
    let mut s = String::from(t);
    // setuid, setgid and sticky show in the owner's, group's and others' x, as ls -l.
    for (shift, special, on) in [(6, 0o4000, 's'), (3, 0o2000, 's'), (0, 0o1000, 't')] {
        let bits = (node.mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (bits & 1 != 0, node.mode & special != 0) {
            (true, true) => on,
            (false, true) => on.to_ascii_uppercase(),
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// One entry: its path (restic's `ls`), with `long` as `ls -l`; with `--json` every
/// field, as restic's node lines.
fn print_node(ctx: &Context, long: bool, path: &str, node: &Node) {
    let time = |t: &haul_protocol::tree::Timestamp| {
        chrono::DateTime::from_timestamp(t.sec, t.nsec).unwrap_or_default()
    };
    let mtime = time(&node.mtime);
    if ctx.global.json {
        let name = String::from_utf8_lossy(&node.name);
        json_line(&serde_json::json!({
            "type": node.kind.word(), "struct_type": "node", "name": name, "path": path,
            "mode": node.mode, "permissions": mode_string(node), "uid": node.uid, "gid": node.gid,
            "user": String::from_utf8_lossy(&node.user), "group": String::from_utf8_lossy(&node.group),
            "size": node.size, "mtime": mtime.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            "ctime": time(&node.ctime).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            "inode": node.inode, "device_id": node.device,
            "target": (node.kind == NodeKind::Symlink).then(|| String::from_utf8_lossy(&node.target).into_owned()),
            "chunks": node.content.len(), "nlink": node.nlink,
        }));
        return;
    }
    if !long {
        crate::outln!("{path}");
        return;
    }
    let owner = |name: &[u8], id: u32| {
        if name.is_empty() {
            id.to_string()
        } else {
            String::from_utf8_lossy(name).into_owned()
        }
    };
    let mut line = format!(
        "{} {:<8} {:<8} {:>10} {} {}",
        mode_string(node),
        owner(&node.user, node.uid),
        owner(&node.group, node.gid),
        node.size,
        mtime.format("%Y-%m-%d %H:%M:%S"),
        path
    );
    if node.kind == NodeKind::Symlink {
        line.push_str(" -> ");
        line.push_str(&String::from_utf8_lossy(&node.target));
    }
    crate::outln!("{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_bits_show_as_ls_shows_them() {
        let node = |kind, mode| Node {
            kind,
            mode,
            ..Node::default()
        };
        assert_eq!(mode_string(&node(NodeKind::File, 0o4755)), "-rwsr-xr-x");
        assert_eq!(mode_string(&node(NodeKind::File, 0o2644)), "-rw-r-Sr--");
        assert_eq!(mode_string(&node(NodeKind::Dir, 0o1777)), "drwxrwxrwt");
        assert_eq!(mode_string(&node(NodeKind::Dir, 0o1770)), "drwxrwx--T");
        assert_eq!(mode_string(&node(NodeKind::File, 0o640)), "-rw-r-----");
    }
}
