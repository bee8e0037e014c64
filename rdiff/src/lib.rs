//! Reads an rdiff-backup repository (the mirror plus `rdiff-backup-data/`) read-only:
//! its sessions, the metadata of every path at every session, and every regular file's
//! content at every session, rebuilt from the mirror and the increments and checked
//! against the recorded size and SHA-1. The format notes are
//! `docs/reference/rdiff-backup-format.md`; section numbers below refer to them.
//!
//! Supported: sessions from `mirror_metadata` and `current_mirror` (also sessions that
//! changed nothing); rdiff-backup's timestamp arithmetic, cross-checked with
//! `session_statistics`; metadata snapshots with reverse diffs; `.diff[.gz]`
//! (librsync deltas, applied streaming: [`content`]), `.snapshot[.gz]`, `.missing`, `.dir`;
//! `chars_to_quote` and `special_escapes`; `long_filename_data`; extended attributes and POSIX ACLs.
//! Refused, with what to do: an interrupted session (two `current_mirror` markers; run
//! `rdiff-backup regress` on a copy), no or more than two markers.
//!
//! Memory: a file version up to [`content::INLINE_LIMIT`] is rebuilt in memory; a larger
//! one in an unnamed temporary file in `$TMPDIR`. Deltas are streamed, never held whole.

pub mod content;
pub mod meta;
pub mod names;

pub use content::Content;
use meta::Record;
use names::{IncKind, IncName, Quoting, Time};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Format(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
    /// A file whose content cannot be rebuilt, or is not what the metadata says.
    #[error("{0}")]
    Content(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A reader of `f`, un-gzipping it when it is gzip (by magic, whatever its name).
fn maybe_gz(f: std::fs::File) -> std::io::Result<Box<dyn Read>> {
    use std::io::BufRead;
    let mut r = std::io::BufReader::with_capacity(256 << 10, f);
    if r.fill_buf()?.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(r)))
    } else {
        Ok(Box::new(r))
    }
}

/// Reads a whole file, un-gzipping it when it is gzip (by magic, whatever its name).
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, Error> {
    let raw = std::fs::read(path).map_err(io(path))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(io(path))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// One metadata file: a full snapshot or a reverse diff, for a session time.
#[derive(Debug, Clone)]
struct MetaFile {
    epoch: i64,
    snapshot: bool,
    path: PathBuf,
}

/// An increment on disk.
#[derive(Debug, Clone)]
struct Inc {
    epoch: i64,
    kind: IncKind,
    path: PathBuf,
}

/// A directory's increments by base name (as stored).
type Listing = HashMap<Vec<u8>, Vec<Inc>>;

/// An opened rdiff-backup repository.
pub struct Repo {
    root: PathBuf,
    data: PathBuf,
    quoting: Quoting,
    sessions: Vec<Time>,
    meta: Vec<MetaFile>,
    xattrs: HashMap<i64, PathBuf>,
    acls: HashMap<i64, PathBuf>,
    /// Increments per directory of `increments/` (or `long_filename_data`), by base name
    /// as stored (quoted), read on first use.
    listings: Mutex<HashMap<PathBuf, Listing>>,
    warnings: Vec<String>,
}

impl Repo {
    /// Opens the repository whose mirror is `root`.
    pub fn open(root: &Path) -> Result<Repo, Error> {
        let data = root.join("rdiff-backup-data");
        if !data.is_dir() {
            return Err(Error::Refused(format!(
                "{} is not an rdiff-backup repository: it has no rdiff-backup-data directory",
                root.display()
            )));
        }
        let quoting = match std::fs::read(data.join("chars_to_quote")) {
            Ok(class) => Quoting::parse(&class)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Quoting::none(),
            Err(e) => return Err(io(&data.join("chars_to_quote"))(e)),
        };
        let quoting = match std::fs::read(data.join("special_escapes")) {
            Ok(text) => quoting.with_special_escapes(&text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => quoting,
            Err(e) => return Err(io(&data.join("special_escapes"))(e)),
        };
        let mut markers = Vec::new();
        let mut meta = Vec::new();
        let mut xattrs = HashMap::new();
        let mut acls = HashMap::new();
        let mut stats: HashMap<i64, PathBuf> = HashMap::new();
        let mut error_logs = Vec::new();
        for entry in std::fs::read_dir(&data).map_err(io(&data))? {
            let entry = entry.map_err(io(&data))?;
            if entry.file_type().map_err(io(&data))?.is_dir() {
                continue;
            }
            let name = quoting.unquote(entry.file_name().as_encoded_bytes());
            let Some(inc) = names::parse_inc(&name) else {
                continue;
            };
            match (&inc.base[..], inc.kind) {
                (b"current_mirror", IncKind::Data) => markers.push(inc.time),
                (b"mirror_metadata", IncKind::Snapshot | IncKind::Diff) => meta.push(MetaFile {
                    epoch: inc.time.epoch,
                    snapshot: inc.kind == IncKind::Snapshot,
                    path: entry.path(),
                }),
                (b"extended_attributes", IncKind::Snapshot) => {
                    xattrs.insert(inc.time.epoch, entry.path());
                }
                (b"access_control_lists", IncKind::Snapshot) => {
                    acls.insert(inc.time.epoch, entry.path());
                }
                (b"session_statistics", IncKind::Data) => {
                    stats.insert(inc.time.epoch, entry.path());
                }
                (b"error_log", IncKind::Data)
                    if entry.metadata().map(|m| m.len() > 0).unwrap_or(false) =>
                {
                    error_logs.push((inc.time.raw.clone(), entry.path()));
                }
                _ => {}
            }
        }
        markers.sort_by_key(|t| t.epoch);
        let mirror = match markers.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(Error::Refused(format!(
                    "{} has no current_mirror marker: it is not a complete rdiff-backup repository",
                    data.display()
                )))
            }
            [good, failed] => {
                return Err(Error::Refused(format!(
                    "{}: the rdiff-backup session of {} was interrupted (two current_mirror markers, {} and {}); run `rdiff-backup regress` on a copy of the repository and import the copy",
                    root.display(),
                    failed.raw,
                    good.raw,
                    failed.raw
                )))
            }
            more => {
                return Err(Error::Refused(format!(
                    "{}: {} current_mirror markers; rdiff-backup leaves at most two. Repair the repository with rdiff-backup first",
                    data.display(),
                    more.len()
                )))
            }
        };
        // Sessions: metadata times and the mirror's time (§2.4).
        let mut sessions: BTreeMap<i64, Time> = BTreeMap::new();
        for m in &meta {
            let name = quoting.unquote(m.path.file_name().expect("a file").as_encoded_bytes());
            let t = names::parse_inc(&name).expect("parsed above").time;
            if let Some(other) = sessions.get(&t.epoch) {
                if other.raw != t.raw {
                    return Err(Error::Refused(format!(
                        "{}: two sessions at the same time ({} and {}): a known rdiff-backup corruption; repair it first",
                        data.display(),
                        other.raw,
                        t.raw
                    )));
                }
            }
            sessions.insert(t.epoch, t);
        }
        sessions.insert(mirror.epoch, mirror.clone());
        let mut warnings = Vec::new();
        error_logs.sort();
        for (raw, path) in error_logs {
            warnings.push(format!(
                "session {raw}: rdiff-backup logged errors ({}); the files it names may be stale or missing in that session",
                path.display()
            ));
        }
        // Cross-check with session_statistics' StartTime (§2.3).
        for (epoch, t) in &sessions {
            if let Some(p) = stats.get(epoch) {
                if let Ok(text) = std::fs::read_to_string(p) {
                    let start = text
                        .lines()
                        .find_map(|l| l.strip_prefix("StartTime "))
                        .and_then(|v| v.split(['.', ' ']).next())
                        .and_then(|v| v.parse::<i64>().ok());
                    if let Some(s) = start.filter(|s| s != epoch) {
                        warnings.push(format!(
                            "session {}: its statistics say it started at {s}, its name says {epoch}",
                            t.raw
                        ));
                    }
                }
            }
        }
        if !meta.iter().any(|m| m.snapshot && m.epoch == mirror.epoch) {
            return Err(Error::Refused(format!(
                "{}: no metadata snapshot for the mirror's session {}",
                data.display(),
                mirror.raw
            )));
        }
        meta.sort_by_key(|m| (m.epoch, !m.snapshot));
        Ok(Repo {
            root: root.to_path_buf(),
            data,
            quoting,
            sessions: sessions.into_values().collect(),
            meta,
            xattrs,
            acls,
            listings: Mutex::new(HashMap::new()),
            warnings,
        })
    }

    /// Sessions, oldest first.
    pub fn sessions(&self) -> &[Time] {
        &self.sessions
    }

    /// Problems that did not stop the reading.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The metadata at session `epoch` (§2.5): the nearest snapshot at or after it, with
    /// the reverse diffs applied down to it. Sorted in rdiff-backup's order.
    pub fn metadata_at(&self, epoch: i64) -> Result<meta::Tree, Error> {
        let base = self
            .meta
            .iter()
            .filter(|m| m.snapshot && m.epoch >= epoch)
            .min_by_key(|m| m.epoch)
            .ok_or_else(|| Error::Format(format!("no metadata snapshot at or after {epoch}")))?;
        let load = |m: &MetaFile| -> Result<Vec<Record>, Error> {
            let text = read_maybe_gz(&m.path)?;
            meta::parse_records(&text, &m.path.display().to_string())
        };
        let mut tree: meta::Tree = load(base)?
            .into_iter()
            .map(|r| (r.path.clone(), r))
            .collect();
        let mut diffs: Vec<&MetaFile> = self
            .meta
            .iter()
            .filter(|m| !m.snapshot && m.epoch >= epoch && m.epoch < base.epoch)
            .collect();
        diffs.sort_by_key(|m| std::cmp::Reverse(m.epoch));
        if epoch != base.epoch && !diffs.iter().any(|d| d.epoch == epoch) {
            return Err(Error::Format(format!("no metadata for session {epoch}")));
        }
        for d in diffs {
            meta::apply_diff(&mut tree, load(d)?);
        }
        Ok(tree)
    }

    /// Extended attributes at session `epoch`, per path: the recorded ones, and POSIX
    /// ACLs as the kernel's `system.posix_acl_*` attributes.
    pub fn xattrs_at(&self, epoch: i64) -> Result<meta::XattrTree, Error> {
        let mut out = match self.xattrs.get(&epoch) {
            Some(p) => meta::parse_xattrs(&read_maybe_gz(p)?, &p.display().to_string())?,
            None => meta::XattrTree::new(),
        };
        if let Some(p) = self.acls.get(&epoch) {
            for (path, acls) in meta::parse_acls(&read_maybe_gz(p)?, &p.display().to_string())? {
                let attrs = out.entry(path).or_default();
                // The ACL file is the authority for ACLs.
                attrs.retain(|(n, _)| !n.starts_with(b"system.posix_acl"));
                attrs.extend(acls);
                attrs.sort();
            }
        }
        Ok(out)
    }

    fn quoted_path(&self, comps: &[Vec<u8>]) -> PathBuf {
        let mut p = PathBuf::new();
        for c in comps {
            p.push(std::ffi::OsStr::from_bytes(&self.quoting.quote(c)));
        }
        p
    }

    /// The increments of `base` (stored name) in directory `dir`.
    fn increments(&self, dir: &Path, base: &[u8]) -> Result<Vec<Inc>, Error> {
        let mut listings = self.listings.lock().expect("listings");
        if !listings.contains_key(dir) {
            let mut by_base = Listing::new();
            match std::fs::read_dir(dir) {
                Ok(rd) => {
                    for e in rd {
                        let e = e.map_err(io(dir))?;
                        // A directory in increments/ is a container, never an increment.
                        if e.file_type().map_err(io(dir))?.is_dir() {
                            continue;
                        }
                        let stored = e.file_name();
                        let unq = self.quoting.unquote(stored.as_encoded_bytes());
                        if let Some(IncName {
                            base, time, kind, ..
                        }) = names::parse_inc(&unq)
                        {
                            by_base
                                .entry(self.quoting.quote(&base))
                                .or_default()
                                .push(Inc {
                                    epoch: time.epoch,
                                    kind,
                                    path: e.path(),
                                });
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(dir)(e)),
            }
            listings.insert(dir.to_path_buf(), by_base);
        }
        Ok(listings[dir].get(base).cloned().unwrap_or_default())
    }

    /// The content of the regular file `rec` at session `epoch` (§3.1), checked against
    /// the recorded size and SHA-1.
    pub fn content(&self, rec: &Record, epoch: i64) -> Result<Content, Error> {
        let shown = rec.display();
        let (name, parent) = rec
            .path
            .split_last()
            .ok_or_else(|| Error::Content("the root is not a file".into()))?;
        let long = self.data.join("long_filename_data");
        let (inc_dir, inc_base) = match (&rec.alt_mirror, &rec.alt_inc) {
            (Some(n), _) | (None, Some(n)) => (long.clone(), n.clone()),
            (None, None) => {
                let mut d = self.data.join("increments");
                d.push(self.quoted_path(parent));
                (d, self.quoting.quote(name))
            }
        };
        let mirror = match &rec.alt_mirror {
            Some(n) => long.join(std::ffi::OsStr::from_bytes(n)),
            None => self.root.join(self.quoted_path(&rec.path)),
        };
        let mut incs: Vec<Inc> = self
            .increments(&inc_dir, &inc_base)?
            .into_iter()
            .filter(|i| i.epoch >= epoch)
            .collect();
        incs.sort_by_key(|i| i.epoch);
        // The diffs from the oldest, then the first non-diff; else the mirror.
        let mut chain = Vec::new();
        let mut base = None;
        for i in incs {
            if i.kind == IncKind::Diff {
                chain.push(i);
            } else {
                base = Some(i);
                break;
            }
        }
        let mut content = match base {
            Some(Inc {
                kind: IncKind::Snapshot,
                path,
                ..
            }) => {
                let f = std::fs::File::open(&path).map_err(io(&path))?;
                Content::read_from(maybe_gz(f).map_err(io(&path))?).map_err(io(&path))?
            }
            Some(i) => {
                return Err(Error::Content(format!(
                    "{shown}: a regular file at {epoch}, but its increment {} says otherwise",
                    i.path.display()
                )))
            }
            None => {
                let f = std::fs::File::open(&mirror).map_err(io(&mirror))?;
                let len = f.metadata().map_err(io(&mirror))?.len();
                Content::of_file(f, len).map_err(io(&mirror))?
            }
        };
        for d in chain.iter().rev() {
            let f = std::fs::File::open(&d.path).map_err(io(&d.path))?;
            let delta = maybe_gz(f).map_err(io(&d.path))?;
            content = content::apply(&content, delta).map_err(|e| {
                Error::Content(format!(
                    "{shown}: increment {} does not apply: {e}",
                    d.path.display()
                ))
            })?;
        }
        if content.len() != rec.size {
            return Err(Error::Content(format!(
                "{shown} at {epoch}: rebuilt {} bytes, the metadata says {}",
                content.len(),
                rec.size
            )));
        }
        if let Some(want) = rec.sha1 {
            use sha1::Digest;
            let mut h = sha1::Sha1::new();
            let mut r = content.reader();
            let mut buf = vec![0u8; 256 << 10];
            loop {
                match r.read(&mut buf).map_err(|e| {
                    Error::Content(format!("{shown}: reading the rebuilt content: {e}"))
                })? {
                    0 => break,
                    n => h.update(&buf[..n]),
                }
            }
            let got: [u8; 20] = h.finalize().into();
            if got != want {
                return Err(Error::Content(format!(
                    "{shown} at {epoch}: the rebuilt content's SHA-1 is {}, the metadata says {}",
                    hex::encode(got),
                    hex::encode(want)
                )));
            }
        }
        Ok(content)
    }
}
