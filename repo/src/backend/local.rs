//! The local filesystem backend.
//!
//! Layout: `config`, `keys/`, `data/<2 hex>/` (packs sharded by the first two hex
//! digits), `index/`, `snapshots/`, `locks/`, `tmp/`, and `damaged/<type dir>/` for
//! objects moved aside (made when first needed). A write goes to a temporary file in
//! `tmp/` (same filesystem), is fsynced, then hard-linked to its name (which fails if
//! the name exists: write-once without a race), the temporary name is removed and the
//! directory fsynced.

use super::{check_name, Backend, FileType, ObjectWriter};
use crate::error::{Error, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub struct LocalBackend {
    root: PathBuf,
    counter: AtomicU64,
    /// Recently read objects, kept open: a restore or a tree walk reads many blobs
    /// from the same few packs, and opening the file for each blob cost more than
    /// reading it. Objects never change, so a cached descriptor stays valid.
    open_files: Mutex<Vec<(ObjectKey, Arc<File>)>>,
}

/// An object's type and name.
type ObjectKey = (FileType, String);

/// Open files kept by [`LocalBackend`].
const OPEN_FILES: usize = 32;

impl LocalBackend {
    /// Opens an existing repository directory, and removes temporary files that
    /// processes of this host left when they died (a killed backup leaves its last,
    /// unfinished pack there).
    pub fn open(root: &Path) -> Result<Self> {
        let config = root.join("config");
        match fs::metadata(&config) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(Error::NoRepository(root.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NoRepository(root.to_path_buf()))
            }
            // There may well be a repository: one this user cannot reach is not "none".
            Err(e) => {
                return Err(Error::Io {
                    what: format!("repository config {}", config.display()),
                    source: e,
                })
            }
        }
        let backend = LocalBackend::at(root);
        backend.remove_orphans();
        Ok(backend)
    }

    /// Temporary files are named `<pid>-<n>.tmp`; those of processes that no longer
    /// exist are removed. Best effort: a file of a live process (or of a pid now
    /// reused) stays.
    fn remove_orphans(&self) {
        let Ok(rd) = fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            let alive = unsafe { libc::kill(pid, 0) } == 0
                || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
            if !alive && pid != std::process::id() as i32 {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Creates the directory layout (mode 0700) for a new repository. Fails if a
    /// repository is already there.
    pub fn create(root: &Path) -> Result<Self> {
        if root.join("config").exists() {
            return Err(Error::RepositoryExists(root.to_path_buf()));
        }
        if root.exists()
            && fs::read_dir(root)
                .map_err(Error::io(root.display().to_string()))?
                .next()
                .is_some()
        {
            return Err(Error::InvalidInput(format!(
                "{} exists and is not empty: choose a new or empty directory for the repository",
                root.display()
            )));
        }
        let mut dirs = vec![root.to_path_buf()];
        for d in [
            "keys",
            "data",
            "index",
            "snapshots",
            "locks",
            "condemned",
            "epochs",
            "tmp",
        ] {
            dirs.push(root.join(d));
        }
        for i in 0..256 {
            dirs.push(root.join("data").join(format!("{i:02x}")));
        }
        for d in &dirs {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(Error::io(d.display().to_string()))?;
        }
        Ok(LocalBackend::at(root))
    }

    fn at(root: &Path) -> Self {
        LocalBackend {
            root: root.to_path_buf(),
            counter: AtomicU64::new(0),
            open_files: Mutex::new(Vec::new()),
        }
    }

    /// The object, opened for reading, from the cache of open files if it is there.
    fn open_cached(&self, t: FileType, name: &str) -> Result<Arc<File>> {
        let key = (t, name.to_string());
        {
            let mut files = self.open_files.lock().expect("open files");
            if let Some(i) = files.iter().position(|(k, _)| *k == key) {
                let entry = files.remove(i);
                let file = entry.1.clone();
                files.push(entry); // most recently used last
                return Ok(file);
            }
        }
        let path = self.path_of(t, name)?;
        let file = Arc::new(File::open(&path).map_err(|e| Self::not_found_or(t, name, e))?);
        let mut files = self.open_files.lock().expect("open files");
        if files.len() >= OPEN_FILES {
            files.remove(0);
        }
        files.push((key, file.clone()));
        Ok(file)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, t: FileType, name: &str) -> Result<PathBuf> {
        path_in(&self.root, t, name)
    }

    fn not_found_or(t: FileType, name: &str, e: io::Error) -> Error {
        if e.kind() == io::ErrorKind::NotFound {
            Error::NotFound {
                what: format!("{t} {name}"),
            }
        } else {
            Error::Io {
                what: format!("{t} {name}"),
                source: e,
            }
        }
    }
}

use std::os::unix::fs::DirBuilderExt;

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn list(&self, t: FileType) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        if t == FileType::Config {
            if let Ok(m) = fs::metadata(self.root.join("config")) {
                out.push(("config".to_string(), m.len()));
            }
            return Ok(out);
        }
        let base = self.root.join(t.dir());
        let dirs: Vec<PathBuf> = if t == FileType::Data {
            (0..256).map(|i| base.join(format!("{i:02x}"))).collect()
        } else {
            vec![base]
        };
        for dir in dirs {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(Error::Io {
                        what: dir.display().to_string(),
                        source: e,
                    })
                }
            };
            for entry in rd {
                let entry = entry.map_err(Error::io(dir.display().to_string()))?;
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                if check_name(t, &name).is_err() {
                    continue;
                }
                let len = match entry.metadata() {
                    Ok(m) => m.len(),
                    // Deleted since the directory was read (a prune): not there.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(Error::Io {
                            what: entry.path().display().to_string(),
                            source: e,
                        })
                    }
                };
                out.push((name, len));
            }
        }
        Ok(out)
    }

    fn read(&self, t: FileType, name: &str) -> Result<Vec<u8>> {
        let path = self.path_of(t, name)?;
        fs::read(&path).map_err(|e| Self::not_found_or(t, name, e))
    }

    fn read_range(&self, t: FileType, name: &str, offset: u64, length: u32) -> Result<Vec<u8>> {
        let file = self.open_cached(t, name)?;
        let mut buf = vec![0u8; length as usize];
        match file.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(buf),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Error::corrupt(
                format!("{t} {name}"),
                format!("range {offset}+{length} past its end"),
            )),
            Err(e) => Err(Error::Io {
                what: format!("{t} {name}"),
                source: e,
            }),
        }
    }

    fn write_once(&self, t: FileType, name: &str, data: &[u8]) -> Result<()> {
        let path = self.path_of(t, name)?;
        if path.exists() {
            return Err(Error::AlreadyExists {
                what: format!("{t} {name}"),
            });
        }
        let mut w = self.writer(t)?;
        w.write_all(data)
            .map_err(Error::io(format!("{t} {name}")))?;
        w.finish(name)
    }

    fn writer(&self, t: FileType) -> Result<Box<dyn ObjectWriter>> {
        let tmp = self.root.join("tmp").join(format!(
            "{}-{}.tmp",
            std::process::id(),
            self.counter.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(Error::io(tmp.display().to_string()))?;
        Ok(Box::new(LocalWriter {
            root: self.root.clone(),
            t,
            tmp,
            file: Some(file),
            written: 0,
            flushed: 0,
        }))
    }

    fn delete(&self, t: FileType, name: &str) -> Result<()> {
        let path = self.path_of(t, name)?;
        self.open_files
            .lock()
            .expect("open files")
            .retain(|(k, _)| !(k.0 == t && k.1 == name));
        fs::remove_file(&path).map_err(|e| Self::not_found_or(t, name, e))?;
        fsync_dir(path.parent().expect("objects live in a directory"))
            .map_err(Error::io(format!("{t} {name}")))
    }

    /// Renames the object into `damaged/<type dir>/` (a second copy of one name gets a
    /// `.1`, `.2`, ... suffix). A rename needs no free space.
    fn move_aside(&self, t: FileType, name: &str) -> Result<String> {
        let path = self.path_of(t, name)?;
        let what = format!("{t} {name}");
        if !path.exists() {
            return Err(Error::NotFound { what });
        }
        let dir = self.root.join("damaged").join(match t.dir() {
            "" => "config",
            d => d,
        });
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(Error::io(dir.display().to_string()))?;
        let mut dest = dir.join(name);
        for n in 1.. {
            if !dest.exists() {
                break;
            }
            dest = dir.join(format!("{name}.{n}"));
        }
        self.open_files
            .lock()
            .expect("open files")
            .retain(|(k, _)| !(k.0 == t && k.1 == name));
        fs::rename(&path, &dest).map_err(|e| Self::not_found_or(t, name, e))?;
        fsync_dir(&dir)
            .and_then(|()| fsync_dir(path.parent().expect("objects live in a directory")))
            .map_err(Error::io(what))?;
        Ok(dest.display().to_string())
    }
}

/// A temporary file in `tmp/`, linked to its name at `finish`.
/// Where an object of type `t` named `name` lives under `root`.
fn dir_in(root: &Path, t: FileType, name: &str) -> PathBuf {
    match t {
        FileType::Config => root.to_path_buf(),
        FileType::Data => root.join("data").join(&name[..2]),
        _ => root.join(t.dir()),
    }
}

fn path_in(root: &Path, t: FileType, name: &str) -> Result<PathBuf> {
    check_name(t, name)?;
    Ok(dir_in(root, t, name).join(name))
}

struct LocalWriter {
    /// The repository's root (the writer owns what it needs: see `Backend::writer`).
    root: PathBuf,
    t: FileType,
    tmp: PathBuf,
    file: Option<File>,
    written: u64,
    /// Bytes already handed to the kernel's write-back.
    flushed: u64,
}

/// Start write-back after this many new bytes.
const WRITEBACK_STEP: u64 = 4 * 1024 * 1024;

impl LocalWriter {
    /// Starts write-back of what was written since the last call, without waiting, so
    /// the `fsync` in `finish` finds little left to do and does not stall the writer
    /// (a pack is 16 MiB; waiting for all of it at the end took up to 0.2 s here).
    fn start_writeback(&mut self) {
        #[cfg(target_os = "linux")]
        if self.written - self.flushed >= WRITEBACK_STEP {
            use std::os::fd::AsRawFd;
            let fd = self.file.as_ref().expect("open until finished").as_raw_fd();
            let (off, len) = (
                self.flushed as libc::off64_t,
                (self.written - self.flushed) as libc::off64_t,
            );
            // Advisory: an error here only means the fsync will do the work.
            unsafe { libc::sync_file_range(fd, off, len, libc::SYNC_FILE_RANGE_WRITE) };
            self.flushed = self.written;
        }
    }
}

impl Write for LocalWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self
            .file
            .as_mut()
            .expect("open until finished")
            .write(buf)?;
        self.written += n as u64;
        self.start_writeback();
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for LocalWriter {
    fn finish(mut self: Box<Self>, name: &str) -> Result<()> {
        let (t, what) = (self.t, format!("{} {name}", self.t));
        let path = path_in(&self.root, t, name)?;
        let file = self.file.take().expect("finished once");
        file.sync_all().map_err(Error::io(what.clone()))?;
        drop(file);
        // A hard link fails if the name exists: write-once without a race.
        let mut linked = fs::hard_link(&self.tmp, &path);
        if matches!(&linked, Err(e) if e.kind() == io::ErrorKind::NotFound)
            && matches!(t, FileType::Condemned | FileType::Epoch)
        {
            // A repository made before prune existed has no such directory yet.
            let dir = path.parent().expect("objects live in a directory");
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .or_else(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => Ok(()),
                    _ => Err(e),
                })
                .map_err(Error::io(what.clone()))?;
            linked = fs::hard_link(&self.tmp, &path);
        }
        // Drop removes the temporary name.
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists { what })
            }
            Err(e) => return Err(Error::Io { what, source: e }),
        }
        fsync_dir(path.parent().expect("objects live in a directory")).map_err(Error::io(what))
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.tmp);
    }
}
