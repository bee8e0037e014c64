//! `dump SNAP PATH`: a file of a snapshot to stdout, or a directory as a tar stream
//! (restic's `dump`, borg's `export-tar`), read chunk by chunk: nothing is written to
//! disk and memory holds one chunk at a time.
//!
//! The tar is GNU format (long names and link targets as GNU tar writes them) with a
//! POSIX extended header per entry for what the GNU header cannot hold: the mtime's
//! nanoseconds and the xattrs (`SCHILY.xattr.NAME`, as GNU tar's `--xattrs` reads
//! them). Owners go by number and by name; hard links are link entries to the first
//! name; devices and FIFOs are kept. Sockets cannot be in a tar: each is named on
//! stderr and left out.

use super::Context;
use crate::cli::DumpArgs;
use crate::error::CliError;
use haul_protocol::tree::{Node, NodeKind};
use haul_protocol::ChunkId;
use haul_repo::IndexedRepository;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use tar::{EntryType, Header};

/// A file's content, read chunk by chunk.
struct Content<'a> {
    repo: &'a IndexedRepository,
    chunks: std::slice::Iter<'a, ChunkId>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for Content<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            let Some(id) = self.chunks.next() else {
                return Ok(0);
            };
            self.buf = self
                .repo
                .load_chunk(id)
                .map_err(|e| std::io::Error::other(format!("chunk {}: {e}", id.to_hex())))?;
            self.pos = 0;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn content<'a>(repo: &'a IndexedRepository, node: &'a Node) -> Content<'a> {
    Content {
        repo,
        chunks: node.content.iter(),
        buf: Vec::new(),
        pos: 0,
    }
}

/// POSIX extended header records: `LEN key=value\n`, LEN counting the whole record.
fn pax_records(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {key}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

struct Tar<'a, W: Write> {
    repo: &'a IndexedRepository,
    out: tar::Builder<W>,
    /// The first name of each multiply-linked file, by (device, inode).
    linked: HashMap<(u64, u64), Vec<u8>>,
}

impl<W: Write> Tar<'_, W> {
    fn entry(&mut self, rel: &[u8], node: &Node) -> Result<(), CliError> {
        let io = |e: std::io::Error| {
            CliError::Io(format!("the tar of {}", String::from_utf8_lossy(rel)), e)
        };
        let path = Path::new(OsStr::from_bytes(rel));
        let mut h = Header::new_gnu();
        h.set_mode(node.mode & 0o7777);
        h.set_uid(node.uid as u64);
        h.set_gid(node.gid as u64);
        h.set_mtime(node.mtime.sec.max(0) as u64);
        if let Ok(u) = std::str::from_utf8(&node.user) {
            let _ = h.set_username(u);
        }
        if let Ok(g) = std::str::from_utf8(&node.group) {
            let _ = h.set_groupname(g);
        }
        let mut pax = vec![(
            "mtime".to_string(),
            format!("{}.{:09}", node.mtime.sec, node.mtime.nsec).into_bytes(),
        )];
        for (name, value) in &node.xattrs {
            pax.push((
                format!("SCHILY.xattr.{}", String::from_utf8_lossy(name)),
                value.clone(),
            ));
        }
        let first_name = (node.kind == NodeKind::File && node.nlink > 1)
            .then(|| self.linked.get(&(node.device, node.inode)).cloned())
            .flatten();
        if node.kind == NodeKind::Socket {
            crate::errln!(
                "haul-pbs: {} is a socket, which a tar cannot hold: left out",
                String::from_utf8_lossy(rel)
            );
            return Ok(());
        }
        let records = pax_records(&pax);
        let mut x = Header::new_ustar();
        x.set_entry_type(EntryType::XHeader);
        x.set_size(records.len() as u64);
        x.set_mode(0o644);
        x.set_path("././@PaxHeader").map_err(io)?;
        x.set_cksum();
        self.out.append(&x, &records[..]).map_err(io)?;
        match (node.kind, first_name) {
            (NodeKind::File, Some(first)) => {
                h.set_entry_type(EntryType::Link);
                h.set_size(0);
                self.out
                    .append_link(&mut h, path, Path::new(OsStr::from_bytes(&first)))
                    .map_err(io)?;
            }
            (NodeKind::File, None) => {
                if node.nlink > 1 {
                    self.linked.insert((node.device, node.inode), rel.to_vec());
                }
                h.set_entry_type(EntryType::Regular);
                h.set_size(node.size);
                self.out
                    .append_data(&mut h, path, content(self.repo, node))
                    .map_err(io)?;
            }
            (NodeKind::Dir, _) => {
                h.set_entry_type(EntryType::Directory);
                h.set_size(0);
                self.out
                    .append_data(&mut h, path, std::io::empty())
                    .map_err(io)?;
                for c in super::compare::entries(self.repo, node.subtree.as_ref())? {
                    let mut child = rel.to_vec();
                    child.push(b'/');
                    child.extend_from_slice(&c.name);
                    self.entry(&child, &c)?;
                }
            }
            (NodeKind::Symlink, _) => {
                h.set_entry_type(EntryType::Symlink);
                h.set_size(0);
                self.out
                    .append_link(&mut h, path, Path::new(OsStr::from_bytes(&node.target)))
                    .map_err(io)?;
            }
            (kind @ (NodeKind::CharDevice | NodeKind::BlockDevice | NodeKind::Fifo), _) => {
                h.set_entry_type(match kind {
                    NodeKind::CharDevice => EntryType::Char,
                    NodeKind::BlockDevice => EntryType::Block,
                    _ => EntryType::Fifo,
                });
                h.set_size(0);
                let (major, minor) = (libc::major(node.rdev), libc::minor(node.rdev));
                h.set_device_major(major).map_err(io)?;
                h.set_device_minor(minor).map_err(io)?;
                self.out
                    .append_data(&mut h, path, std::io::empty())
                    .map_err(io)?;
            }
            (NodeKind::Socket, _) => unreachable!("left out above"),
        }
        Ok(())
    }
}

pub fn dump(ctx: &Context, args: DumpArgs) -> Result<(), CliError> {
    let (spec, filter) = args.filter.select(&args.snapshot)?;
    let (repo, _lock) = ctx.open_for_reading(filter.host.as_deref(), "dump", true)?;
    let (id, snap) = repo.find_snapshot_matching(&spec, &filter)?;
    let comps = super::browse::components(&args.path);
    // The node at PATH; the snapshot's root is a directory without a node of its own.
    let node = if comps.is_empty() {
        None
    } else {
        Some(
            super::compare::node_at(&repo, &snap.tree, &comps)?.ok_or_else(|| {
                CliError::usage(format!("{} is not in snapshot {}", args.path, id.short()))
            })?,
        )
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    let io = |e: std::io::Error| CliError::Io("standard output".into(), e);
    match node {
        Some(n) if n.kind == NodeKind::File => {
            std::io::copy(&mut content(&repo, &n), &mut out).map_err(io)?;
        }
        Some(n) if n.kind == NodeKind::Dir => {
            let mut tar = Tar {
                repo: &repo,
                out: tar::Builder::new(&mut out),
                linked: HashMap::new(),
            };
            let rel: Vec<u8> = comps.join(&b'/');
            tar.entry(&rel, &n)?;
            tar.out.finish().map_err(io)?;
        }
        Some(n) => {
            return Err(CliError::usage(format!(
                "{} is a {} in snapshot {}: dump writes files and directories",
                args.path,
                n.kind.word(),
                id.short()
            )))
        }
        None => {
            // The whole snapshot: its top-level entries.
            let mut tar = Tar {
                repo: &repo,
                out: tar::Builder::new(&mut out),
                linked: HashMap::new(),
            };
            for n in super::compare::entries(&repo, Some(&snap.tree))? {
                tar.entry(&n.name.clone(), &n)?;
            }
            tar.out.finish().map_err(io)?;
        }
    }
    out.flush().map_err(io)
}
