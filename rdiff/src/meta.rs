//! `mirror_metadata` records and extended-attribute snapshots (`rdiff-backup-format.md`
//! §2.5, §2.6). Records are bytes; names are never decoded.

use crate::Error;
use std::collections::BTreeMap;

/// What a path was at a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Reg,
    Dir,
    Sym,
    Fifo,
    Sock,
    /// A device: `c` or `b`, major, minor.
    Dev(u8, u32, u32),
    /// Only in diffs: the path did not exist at that time.
    Absent,
}

/// One `File` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Components of the path below the mirror root; empty for the root (`.`).
    pub path: Vec<Vec<u8>>,
    pub kind: Kind,
    pub size: u64,
    pub sha1: Option<[u8; 20]>,
    /// Seconds; none for symlinks and devices.
    pub mtime: Option<i64>,
    pub uid: u32,
    pub gid: u32,
    /// Names, none when rdiff-backup recorded `:` or `None`.
    pub uname: Option<Vec<u8>>,
    pub gname: Option<Vec<u8>>,
    /// Mode bits including setuid/setgid/sticky.
    pub perms: u32,
    pub target: Option<Vec<u8>>,
    pub nlink: u64,
    pub inode: u64,
    pub devloc: u64,
    /// Long names: where the mirror data or the increments live in `long_filename_data`.
    pub alt_mirror: Option<Vec<u8>>,
    pub alt_inc: Option<Vec<u8>>,
}

impl Record {
    fn new(path: Vec<Vec<u8>>) -> Record {
        Record {
            path,
            kind: Kind::Absent,
            size: 0,
            sha1: None,
            mtime: None,
            uid: 0,
            gid: 0,
            uname: None,
            gname: None,
            perms: 0,
            target: None,
            nlink: 1,
            inode: 0,
            devloc: 0,
            alt_mirror: None,
            alt_inc: None,
        }
    }

    /// The path as rdiff-backup shows it (`.` for the root).
    pub fn display(&self) -> String {
        if self.path.is_empty() {
            ".".into()
        } else {
            String::from_utf8_lossy(&self.path.join(&b'/')).into_owned()
        }
    }
}

/// `\n` and `\\` in `File` and `SymData` values.
fn unquote_meta(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'\\' && i + 1 < v.len() {
            match v[i + 1] {
                b'n' => out.push(b'\n'),
                b'\\' => out.push(b'\\'),
                other => {
                    out.push(b'\\');
                    out.push(other);
                }
            }
            i += 2;
        } else {
            out.push(v[i]);
            i += 1;
        }
    }
    out
}

fn split_path(p: &[u8]) -> Vec<Vec<u8>> {
    if p == b"." {
        return Vec::new();
    }
    p.split(|b| *b == b'/').map(<[u8]>::to_vec).collect()
}

fn num<T: std::str::FromStr>(v: &[u8], what: &str, path: &[u8]) -> Result<T, Error> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            Error::Format(format!(
                "metadata of {}: {what} {:?} is not a number",
                String::from_utf8_lossy(path),
                String::from_utf8_lossy(v)
            ))
        })
}

/// Parses a metadata file's records.
pub fn parse_records(text: &[u8], file: &str) -> Result<Vec<Record>, Error> {
    let mut out: Vec<Record> = Vec::new();
    for line in text.split(|b| *b == b'\n') {
        if line.is_empty() {
            continue;
        }
        if let Some(p) = line.strip_prefix(b"File ") {
            out.push(Record::new(split_path(&unquote_meta(p))));
            continue;
        }
        let trimmed = line.trim_ascii_start();
        let Some(space) = trimmed.iter().position(|b| *b == b' ') else {
            return Err(Error::Format(format!(
                "{file}: a line without a value: {:?}",
                String::from_utf8_lossy(line)
            )));
        };
        let (field, value) = (&trimmed[..space], &trimmed[space + 1..]);
        let Some(r) = out.last_mut() else {
            return Err(Error::Format(format!(
                "{file}: a field before the first `File` line"
            )));
        };
        let path = r.path.join(&b'/');
        match field {
            b"Type" => {
                r.kind = match value {
                    b"reg" => Kind::Reg,
                    b"dir" => Kind::Dir,
                    b"sym" => Kind::Sym,
                    b"fifo" => Kind::Fifo,
                    b"sock" => Kind::Sock,
                    b"dev" => Kind::Dev(0, 0, 0),
                    b"None" => Kind::Absent,
                    other => {
                        return Err(Error::Format(format!(
                            "{file}: {}: unknown type {:?}",
                            String::from_utf8_lossy(&path),
                            String::from_utf8_lossy(other)
                        )))
                    }
                }
            }
            b"Size" => r.size = num(value, "Size", &path)?,
            b"SHA1Digest" => {
                let mut d = [0u8; 20];
                hex::decode_to_slice(value, &mut d).map_err(|_| {
                    Error::Format(format!(
                        "{file}: {}: bad SHA1Digest",
                        String::from_utf8_lossy(&path)
                    ))
                })?;
                r.sha1 = Some(d);
            }
            b"ModTime" => r.mtime = Some(num(value, "ModTime", &path)?),
            b"Uid" => r.uid = num(value, "Uid", &path)?,
            b"Gid" => r.gid = num(value, "Gid", &path)?,
            b"Uname" => r.uname = (value != b":" && value != b"None").then(|| value.to_vec()),
            b"Gname" => r.gname = (value != b":" && value != b"None").then(|| value.to_vec()),
            b"Permissions" => r.perms = num(value, "Permissions", &path)?,
            b"SymData" => r.target = Some(unquote_meta(value)),
            b"NumHardLinks" => r.nlink = num(value, "NumHardLinks", &path)?,
            b"Inode" => r.inode = num(value, "Inode", &path)?,
            b"DeviceLoc" => r.devloc = num(value, "DeviceLoc", &path)?,
            b"DeviceNum" => {
                let f: Vec<&[u8]> = value.split(|b| *b == b' ').collect();
                if f.len() != 3 || !matches!(f[0], b"c" | b"b") {
                    return Err(Error::Format(format!(
                        "{file}: {}: bad DeviceNum {:?}",
                        String::from_utf8_lossy(&path),
                        String::from_utf8_lossy(value)
                    )));
                }
                r.kind = Kind::Dev(
                    f[0][0],
                    num(f[1], "major", &path)?,
                    num(f[2], "minor", &path)?,
                );
            }
            b"AlternateMirrorName" => r.alt_mirror = Some(value.to_vec()),
            b"AlternateIncrementName" => r.alt_inc = Some(value.to_vec()),
            // ResourceFork, CarbonFile (macOS) and fields of later versions.
            _ => {}
        }
    }
    Ok(out)
}

/// Records keyed by their path components (rdiff-backup's order).
pub type Tree = BTreeMap<Vec<Vec<u8>>, Record>;

/// Extended attributes (name, value), sorted by name.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Extended attributes per path (components).
pub type XattrTree = BTreeMap<Vec<Vec<u8>>, Xattrs>;

/// Applies a reverse diff: its records replace the newer ones; `Type None` removes.
pub fn apply_diff(tree: &mut Tree, diff: Vec<Record>) {
    for r in diff {
        if r.kind == Kind::Absent {
            tree.remove(&r.path);
        } else {
            tree.insert(r.path.clone(), r);
        }
    }
}

/// `\NNN` (octal) in names of the EA and ACL files.
fn unquote_octal(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'\\'
            && i + 4 <= v.len()
            && v[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let s = std::str::from_utf8(&v[i + 1..i + 4]).expect("digits");
            out.push((u32::from_str_radix(s, 8).expect("octal") & 0xff) as u8);
            i += 4;
        } else {
            out.push(v[i]);
            i += 1;
        }
    }
    out
}

/// Extended attributes per path (components), from an `extended_attributes` snapshot:
/// `# file: NAME` then `attr=0s<base64>` (or `0x<hex>`, or `"text"`) lines.
pub fn parse_xattrs(text: &[u8], file: &str) -> Result<XattrTree, Error> {
    let mut out = XattrTree::new();
    let mut current: Option<Vec<Vec<u8>>> = None;
    for line in text.split(|b| *b == b'\n') {
        if line.is_empty() {
            continue;
        }
        if let Some(p) = line.strip_prefix(b"# file: ") {
            let path = split_path(&unquote_octal(p));
            out.entry(path.clone()).or_default();
            current = Some(path);
            continue;
        }
        let Some(path) = &current else {
            return Err(Error::Format(format!(
                "{file}: an attribute before the first `# file:` line"
            )));
        };
        let Some(eq) = line.iter().position(|b| *b == b'=') else {
            // An attribute without a value.
            out.get_mut(path)
                .expect("entry")
                .push((unquote_octal(line), Vec::new()));
            continue;
        };
        let (name, value) = (unquote_octal(&line[..eq]), &line[eq + 1..]);
        let value = if let Some(b64) = value.strip_prefix(b"0s") {
            <base64ct::Base64 as base64ct::Encoding>::decode_vec(
                std::str::from_utf8(b64).unwrap_or("!"),
            )
            .map_err(|_| {
                Error::Format(format!(
                    "{file}: attribute {} has a bad base64 value",
                    String::from_utf8_lossy(&name)
                ))
            })?
        } else if let Some(h) = value.strip_prefix(b"0x") {
            hex::decode(h).map_err(|_| {
                Error::Format(format!(
                    "{file}: attribute {} has a bad hex value",
                    String::from_utf8_lossy(&name)
                ))
            })?
        } else if value.len() >= 2 && value[0] == b'"' && value[value.len() - 1] == b'"' {
            unquote_octal(&value[1..value.len() - 1])
        } else {
            unquote_octal(value)
        };
        out.get_mut(path).expect("entry").push((name, value));
    }
    for attrs in out.values_mut() {
        attrs.sort();
        attrs.dedup_by(|a, b| a.0 == b.0);
    }
    Ok(out)
}

/// ACL entries (tag, permissions, id) per path.
type AclTree = BTreeMap<Vec<Vec<u8>>, Vec<(u16, u16, u32)>>;

/// POSIX ACLs per path from an `access_control_lists` snapshot (getfacl's text form,
/// `default:` lines for a directory's default ACL), as the extended attributes the
/// kernel stores them in: `system.posix_acl_access` and `system.posix_acl_default`.
/// An access ACL of only the owner, group and other entries is the mode itself and
/// gives no attribute. Named users and groups must be numeric or resolve here.
pub fn parse_acls(text: &[u8], file: &str) -> Result<XattrTree, Error> {
    let mut access = AclTree::new();
    let mut default = AclTree::new();
    let mut current: Option<Vec<Vec<u8>>> = None;
    for line in text.split(|b| *b == b'\n') {
        if line.is_empty() {
            continue;
        }
        if let Some(p) = line.strip_prefix(b"# file: ") {
            current = Some(split_path(&unquote_octal(p)));
            continue;
        }
        if line.starts_with(b"#") {
            continue;
        }
        let Some(path) = &current else {
            return Err(Error::Format(format!(
                "{file}: an ACL entry before the first `# file:` line"
            )));
        };
        let bad = || {
            Error::Format(format!(
                "{file}: bad ACL entry {:?}",
                String::from_utf8_lossy(line)
            ))
        };
        let (line, into) = match line.strip_prefix(b"default:") {
            Some(rest) => (rest, &mut default),
            None => (line, &mut access),
        };
        let f: Vec<&[u8]> = line.split(|b| *b == b':').collect();
        if f.len() != 3 || f[2].len() != 3 {
            return Err(bad());
        }
        let perm = (u16::from(f[2][0] == b'r') << 2)
            | (u16::from(f[2][1] == b'w') << 1)
            | u16::from(f[2][2] == b'x');
        let who = unquote_octal(f[1]);
        let (tag, id) = match (f[0], who.is_empty()) {
            (b"user", true) => (0x01, u32::MAX),
            (b"user", false) => (0x02, principal(&who, true).ok_or_else(bad)?),
            (b"group", true) => (0x04, u32::MAX),
            (b"group", false) => (0x08, principal(&who, false).ok_or_else(bad)?),
            (b"mask", _) => (0x10, u32::MAX),
            (b"other", _) => (0x20, u32::MAX),
            _ => return Err(bad()),
        };
        into.entry(path.clone()).or_default().push((tag, perm, id));
    }
    let mut out = XattrTree::new();
    for (name, acls) in [
        (&b"system.posix_acl_access"[..], access),
        (&b"system.posix_acl_default"[..], default),
    ] {
        for (path, mut entries) in acls {
            let minimal = entries
                .iter()
                .all(|(t, _, _)| matches!(t, 0x01 | 0x04 | 0x20));
            if name == b"system.posix_acl_access" && minimal {
                continue;
            }
            entries.sort_by_key(|(t, _, id)| (*t, *id));
            let mut v = 2u32.to_le_bytes().to_vec();
            for (tag, perm, id) in entries {
                v.extend_from_slice(&tag.to_le_bytes());
                v.extend_from_slice(&perm.to_le_bytes());
                v.extend_from_slice(&id.to_le_bytes());
            }
            out.entry(path).or_default().push((name.to_vec(), v));
        }
    }
    for attrs in out.values_mut() {
        attrs.sort();
    }
    Ok(out)
}

/// A user or group id: numeric, or a name known to this machine.
fn principal(who: &[u8], user: bool) -> Option<u32> {
    if let Some(n) = std::str::from_utf8(who).ok().and_then(|s| s.parse().ok()) {
        return Some(n);
    }
    let name = std::ffi::CString::new(who).ok()?;
    unsafe {
        if user {
            let pw = libc::getpwnam(name.as_ptr());
            (!pw.is_null()).then(|| (*pw).pw_uid)
        } else {
            let gr = libc::getgrnam(name.as_ptr());
            (!gr.is_null()).then(|| (*gr).gr_gid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The metadata formats' fields and escapes, for the mutations to insert.
    const TOKENS: &[&[u8]] = &[
        b"\n",
        b"File ",
        b"  Type ",
        b"reg",
        b"dev",
        b"  DeviceNum ",
        b"c 1 3",
        b"  Size ",
        b"  SHA1Digest ",
        b"-99999999999999999999",
        b"\\",
        b"\\n",
        b"# file: ",
        b"=0s",
        b"=0x",
        b"\\101",
        b"\\777",
        b"default:",
        b"user:",
        b"::",
        b"rwx",
        b"\0",
    ];

    /// Valid `mirror_metadata`, `extended_attributes` and `access_control_lists` texts.
    const TEXTS: &[&[u8]] = &[
            b"File .\n  Type dir\n  ModTime 1711623600\n  Uid 0\n  Uname root\n  Gid 0\n  Gname root\n  Permissions 493\nFile dir/f\n  Type reg\n  Size 20\n  NumHardLinks 3\n  Inode 10275319\n  DeviceLoc 65024\n  SHA1Digest 5c8bff62f4401ea2e4e2b4ca972bff665ec65060\n  ModTime -315619200\n  Uid 1234\n  Uname :\n  Gid 0\n  Gname root\n  Permissions 2541\n",
            b"File odd\\nname\n  Type sym\n  SymData odd\\ntarget\\\\x\n  Uid 0\n  Gid 0\n  Permissions 511\nFile cdev\n  Type dev\n  DeviceNum c 1 3\nFile gone\n  Type None\n",
            b"# file: xattr.txt\nuser.comment=0sc2Vjb25kIHZhbHVl\nuser.binary=0sAP8Q\nuser.hex=0x00ff\n# file: odd\\040name\nuser.a=\"b\"\nuser.empty\n",
            b"# file: acl.txt\nuser::rw-\nuser:1234:r--\ngroup::r--\ngroup:5678:rw-\nmask::rw-\nother::r--\ndefault:user::rwx\ndefault:other::---\n",
    ];

    fn arb_text() -> impl Strategy<Value = Vec<u8>> {
        proptest::sample::select(TEXTS).prop_map(<[u8]>::to_vec)
    }

    proptest! {
        /// The stable counterpart of the `rdiff_meta` fuzz target (docs/fuzzing.md).
        #[test]
        fn hostile_metadata_is_refused_or_parsed_consistently(
            text in haul_mutate::inputs_with(arb_text(), 200, TOKENS),
        ) {
            if let Ok(records) = parse_records(&text, "mirror_metadata") {
                let files = text.split(|b| *b == b'\n').filter(|l| l.starts_with(b"File ")).count();
                prop_assert_eq!(records.len(), files);
                let mut tree = Tree::new();
                apply_diff(&mut tree, records);
            }
            if let Ok(x) = parse_xattrs(&text, "extended_attributes") {
                for attrs in x.values() {
                    prop_assert!(attrs.windows(2).all(|w| w[0].0 < w[1].0), "{:?}", attrs);
                }
            }
            if let Ok(x) = parse_acls(&text, "access_control_lists") {
                for (_, value) in x.values().flatten() {
                    prop_assert_eq!(value.len() % 8, 4);
                }
            }
        }
    }

    #[test]
    fn records_parse_with_their_odd_fields() {
        let text = b"File .\n  Type dir\n  ModTime 1711623600\n  Uid 0\n  Uname root\n  Gid 0\n  Gname root\n  Permissions 493\n\
File dir/hardlink-c\n  Type reg\n  Size 20\n  NumHardLinks 3\n  Inode 10275319\n  DeviceLoc 65024\n  SHA1Digest 5c8bff62f4401ea2e4e2b4ca972bff665ec65060\n  ModTime -315619200\n  Uid 1234\n  Uname :\n  Gid 0\n  Gname root\n  Permissions 2541\n\
File odd\\nname\n  Type sym\n  SymData odd\\ntarget\\\\x\n  Uid 0\n  Gid 0\n  Permissions 511\n\
File cdev\n  Type dev\n  DeviceNum c 1 3\n  Uid 0\n  Gid 0\n  Permissions 420\n\
File gone\n  Type None\n";
        let r = parse_records(text, "t").unwrap();
        assert_eq!(r.len(), 5);
        assert!(r[0].path.is_empty());
        assert_eq!(r[0].perms, 0o755);
        assert_eq!(r[1].path, vec![b"dir".to_vec(), b"hardlink-c".to_vec()]);
        assert_eq!(
            (r[1].nlink, r[1].inode, r[1].devloc, r[1].mtime),
            (3, 10275319, 65024, Some(-315619200))
        );
        assert_eq!((r[1].perms, r[1].uname.as_ref()), (0o4755, None));
        assert_eq!(r[2].path, vec![b"odd\nname".to_vec()]);
        assert_eq!(r[2].target.as_deref(), Some(&b"odd\ntarget\\x"[..]));
        assert_eq!(r[3].kind, Kind::Dev(b'c', 1, 3));
        assert_eq!(r[4].kind, Kind::Absent);
    }

    #[test]
    fn acls_become_the_kernels_binary_form() {
        let x = parse_acls(b"# file: acl.txt\nuser::rw-\nuser:1234:r--\ngroup::r--\ngroup:5678:rw-\nmask::rw-\nother::r--\n# file: plain\nuser::rw-\ngroup::r--\nother::r--\n", "t").unwrap();
        assert_eq!(
            hex::encode(&x[&vec![b"acl.txt".to_vec()]][0].1),
            "0200000001000600ffffffff02000400d204000004000400ffffffff080006002e16000010000600ffffffff20000400ffffffff"
        );
        assert!(!x.contains_key(&vec![b"plain".to_vec()]));
    }

    #[test]
    fn xattrs_parse() {
        let x = parse_xattrs(b"# file: xattr.txt\nuser.comment=0sc2Vjb25kIHZhbHVl\nuser.binary=0sAP8Q\n# file: odd\\040name\nuser.a=\"b\"\n", "t").unwrap();
        let a = &x[&vec![b"xattr.txt".to_vec()]];
        assert_eq!(a[0], (b"user.binary".to_vec(), vec![0x00, 0xff, 0x10]));
        assert_eq!(a[1], (b"user.comment".to_vec(), b"second value".to_vec()));
        assert_eq!(x[&vec![b"odd name".to_vec()]][0].1, b"b");
    }
}
