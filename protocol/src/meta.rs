//! File metadata: reading it into a [`Node`] and applying it back on restore.
//!
//! Everything here works on the entry itself, never on what a symlink points at
//! (`lstat`, `lchown`, `utimensat(AT_SYMLINK_NOFOLLOW)`, `l*xattr`).

use crate::tree::{Node, NodeFlags, NodeKind, Timestamp};
use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::fs::Metadata;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// The node for `name` with the metadata of `meta` (from `symlink_metadata`); content,
/// symlink target, xattrs and subtree are filled in by the caller.
pub fn node_from_metadata(name: &[u8], meta: &Metadata, names: &mut NameCache) -> Node {
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        NodeKind::File
    } else if ft.is_dir() {
        NodeKind::Dir
    } else if ft.is_symlink() {
        NodeKind::Symlink
    } else if ft.is_fifo() {
        NodeKind::Fifo
    } else if ft.is_socket() {
        NodeKind::Socket
    } else if ft.is_char_device() {
        NodeKind::CharDevice
    } else {
        NodeKind::BlockDevice
    };
    Node {
        name: name.to_vec(),
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        user: names.user(meta.uid()),
        group: names.group(meta.gid()),
        size: if kind == NodeKind::File {
            meta.size()
        } else {
            0
        },
        mtime: Timestamp {
            sec: meta.mtime(),
            nsec: meta.mtime_nsec() as u32,
        },
        ctime: Timestamp {
            sec: meta.ctime(),
            nsec: meta.ctime_nsec() as u32,
        },
        inode: meta.ino(),
        device: meta.dev(),
        nlink: meta.nlink(),
        rdev: if matches!(kind, NodeKind::CharDevice | NodeKind::BlockDevice) {
            meta.rdev()
        } else {
            0
        },
        flags: if kind == NodeKind::File && is_sparse(meta) {
            NodeFlags::SPARSE
        } else {
            NodeFlags::default()
        },
        ..Default::default()
    }
}

/// Whether a file has holes: fewer bytes allocated than its size. (A file whose
/// blocks are shared or compressed by its filesystem may look so too; restoring its
/// zero runs as holes then costs nothing that matters.)
fn is_sparse(meta: &Metadata) -> bool {
    meta.blocks().saturating_mul(512) < meta.size()
}

/// Extended attributes of `path` (not following symlinks), sorted by name. A
/// filesystem without xattr support yields none.
pub fn read_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if is_unsupported(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names {
        // An attribute removed between list and get is simply gone.
        if let Some(value) = xattr::get(path, &name)? {
            out.push((name.as_bytes().to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTSUP)) || e.kind() == io::ErrorKind::Unsupported
}

/// Looks up and remembers user and group names.
#[derive(Default)]
pub struct NameCache {
    users: HashMap<u32, Vec<u8>>,
    groups: HashMap<u32, Vec<u8>>,
    user_ids: HashMap<Vec<u8>, Option<u32>>,
    group_ids: HashMap<Vec<u8>, Option<u32>>,
}

impl NameCache {
    pub fn user(&mut self, uid: u32) -> Vec<u8> {
        self.users
            .entry(uid)
            .or_insert_with(|| lookup_user(uid))
            .clone()
    }
    pub fn group(&mut self, gid: u32) -> Vec<u8> {
        self.groups
            .entry(gid)
            .or_insert_with(|| lookup_group(gid))
            .clone()
    }
    /// The local uid of a user name, if this system knows it.
    pub fn uid_of(&mut self, name: &[u8]) -> Option<u32> {
        if name.is_empty() {
            return None;
        }
        *self.user_ids.entry(name.to_vec()).or_insert_with(|| {
            let c = CString::new(name).ok()?;
            with_buffer(|buf| unsafe {
                let mut pw: libc::passwd = std::mem::zeroed();
                let mut res = std::ptr::null_mut();
                let rc =
                    libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut res);
                (rc, (!res.is_null()).then_some(pw.pw_uid))
            })
            .flatten()
        })
    }
    /// The local gid of a group name, if this system knows it.
    pub fn gid_of(&mut self, name: &[u8]) -> Option<u32> {
        if name.is_empty() {
            return None;
        }
        *self.group_ids.entry(name.to_vec()).or_insert_with(|| {
            let c = CString::new(name).ok()?;
            with_buffer(|buf| unsafe {
                let mut gr: libc::group = std::mem::zeroed();
                let mut res = std::ptr::null_mut();
                let rc =
                    libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut res);
                (rc, (!res.is_null()).then_some(gr.gr_gid))
            })
            .flatten()
        })
    }
}

/// Calls a `get*_r` function with a buffer that grows on ERANGE.
fn with_buffer<T>(mut f: impl FnMut(&mut Vec<libc::c_char>) -> (libc::c_int, T)) -> Option<T> {
    let mut buf = vec![0 as libc::c_char; 1024];
    for _ in 0..8 {
        let (rc, v) = f(&mut buf);
        if rc == libc::ERANGE {
            let n = buf.len() * 4;
            buf.resize(n, 0);
            continue;
        }
        return (rc == 0).then_some(v);
    }
    None
}

fn lookup_user(uid: u32) -> Vec<u8> {
    with_buffer(|buf| unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut res = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut res);
        let name = (!res.is_null()).then(|| CStr::from_ptr(pw.pw_name).to_bytes().to_vec());
        (rc, name)
    })
    .flatten()
    .unwrap_or_default()
}

fn lookup_group(gid: u32) -> Vec<u8> {
    with_buffer(|buf| unsafe {
        let mut gr: libc::group = std::mem::zeroed();
        let mut res = std::ptr::null_mut();
        let rc = libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr(), buf.len(), &mut res);
        let name = (!res.is_null()).then(|| CStr::from_ptr(gr.gr_name).to_bytes().to_vec());
        (rc, name)
    })
    .flatten()
    .unwrap_or_default()
}

pub(crate) fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// What metadata is applied to: an entry by its path (never following a symlink), or
/// a file this process has open, which saves a lookup of its path per call (a restore
/// of a million small files makes four million of them).
#[derive(Clone, Copy)]
pub enum Target<'a> {
    Path(&'a Path),
    File(&'a std::fs::File),
}

/// Sets owner (by name where this system knows the name, else by number), not following
/// symlinks.
pub fn apply_owner(to: Target, node: &Node, names: &mut NameCache) -> io::Result<()> {
    let (uid, gid) = owner_of(node, names);
    match to {
        Target::Path(path) => std::os::unix::fs::lchown(path, Some(uid), Some(gid)),
        Target::File(file) => std::os::unix::fs::fchown(file, Some(uid), Some(gid)),
    }
}

/// The owner [`apply_owner`] gives: the user and group by name where this system
/// knows them, else by number.
fn owner_of(node: &Node, names: &mut NameCache) -> (u32, u32) {
    (
        names.uid_of(&node.user).unwrap_or(node.uid),
        names.gid_of(&node.group).unwrap_or(node.gid),
    )
}

/// Whether a file with metadata `now` already has the owner [`apply_owner`] would give.
pub fn has_owner(now: &Metadata, node: &Node, names: &mut NameCache) -> bool {
    owner_of(node, names) == (now.uid(), now.gid())
}

/// Sets permission bits. Symlinks have none to set on Linux.
pub fn apply_mode(to: Target, node: &Node) -> io::Result<()> {
    if node.kind == NodeKind::Symlink {
        return Ok(());
    }
    let mode = node.mode as libc::mode_t;
    let done = match to {
        Target::Path(path) => unsafe { libc::chmod(cpath(path)?.as_ptr(), mode) },
        Target::File(file) => unsafe { libc::fchmod(file.as_raw_fd(), mode) },
    };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets mtime to the nanosecond (atime to the same), not following symlinks.
pub fn apply_mtime(to: Target, node: &Node) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: node.mtime.sec as libc::time_t,
        tv_nsec: node.mtime.nsec as _,
    };
    let times = [ts, ts];
    let done = match to {
        Target::Path(path) => unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                cpath(path)?.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        },
        Target::File(file) => unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) },
    };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets extended attributes, not following symlinks.
pub fn apply_xattrs(to: Target, node: &Node) -> io::Result<()> {
    for (name, value) in &node.xattrs {
        let name = OsStr::from_bytes(name);
        match to {
            Target::Path(path) => xattr::set(path, name, value)?,
            Target::File(file) => xattr::FileExt::set_xattr(file, name, value)?,
        }
    }
    Ok(())
}

/// Creates a fifo, socket placeholder or device node.
pub fn make_special(path: &Path, node: &Node) -> io::Result<()> {
    let kind_bits = match node.kind {
        NodeKind::Fifo => libc::S_IFIFO,
        NodeKind::Socket => libc::S_IFSOCK,
        NodeKind::CharDevice => libc::S_IFCHR,
        NodeKind::BlockDevice => libc::S_IFBLK,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a special file",
            ))
        }
    };
    let c = cpath(path)?;
    let mode = kind_bits | (node.mode & 0o777) as libc::mode_t;
    if unsafe { libc::mknod(c.as_ptr(), mode, node.rdev as libc::dev_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this process may set ownership and create device nodes.
pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}
