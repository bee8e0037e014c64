//! The run history: every run's record, appended durably to `STATE/runs.jsonl` (one
//! JSON object per line), and the RSS feeds rendered from it after every run.
//!
//! - Durability: a record is written with one `write` on a file opened for appending,
//!   then `fsync`ed. A crash mid-append can leave only the last line torn. Reading
//!   skips a line that does not parse, with a warning that names it (a torn last line
//!   is the expected case).
//! - One read per process: the records are read once and kept (shared by every clone
//!   of a [`History`]); later reads take only what other processes appended since.
//! - Bounded: when the file holds more than [`COMPACT_AT`] records, the oldest are
//!   moved to `STATE/runs-archive.jsonl` (appended, never read by the pbs) and the file
//!   is rewritten with each host's newest [`KEEP_PER_HOST`] records, plus the records
//!   later decisions rest on (a host's last verified import, its last retention that
//!   removed something). However long it runs, the file and the memory a daemon
//!   keeps for it stay below about ten thousand records (a record's output tail is
//!   bounded too, see `agent.rs`). Appends and the rewrite hold an exclusive `flock` on
//!   `STATE/runs.lock`, so a pull recorded by another process while the file is
//!   rewritten is not lost.

use crate::error::CliError;
use crate::feed;
use crate::record::{Details, RunKind, RunRecord, RunStatus, TransportKind};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Records in the history file past which it is compacted (see the module doc).
pub const COMPACT_AT: usize = 10_000;
/// Records of each host a compaction keeps.
pub const KEEP_PER_HOST: usize = 50;

#[derive(Clone)]
pub struct History {
    state: PathBuf,
    feed: feed::FeedOptions,
    cache: Arc<Mutex<Option<Cache>>>,
    /// [`COMPACT_AT`] and [`KEEP_PER_HOST`], smaller in tests.
    compaction: (usize, usize),
    /// Told of each record once it is written (`[[notify]]`).
    notifiers: crate::notify::Notifiers,
}

/// The history file as this process has read it.
#[derive(Default)]
struct Cache {
    records: Vec<RunRecord>,
    warnings: Vec<String>,
    /// Lines that are not records this version reads (torn by a crash, or written by a
    /// newer version): a compaction moves them to the archive as they are.
    unreadable: Vec<Vec<u8>>,
    /// The last line, when it is not whole yet (torn by a crash, or being written).
    torn: Option<String>,
    /// Bytes of the file read, and its inode (a compaction makes a new one).
    len: u64,
    ino: u64,
    /// The number of records past which it is compacted next.
    compact_at: usize,
}

/// One record at a time per process: runs of the daemon finish concurrently, and each
/// rewrite of the feeds must see every earlier record.
static RECORDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A run in progress, as its marker file says (`STATE/running/<id>.json`): written when
/// the run starts and removed when its record is appended, so that a run whose process
/// died (kill -9, power loss) is found and recorded as failed at the next start.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Running {
    pub id: String,
    pub host: String,
    pub kind: RunKind,
    pub transport: TransportKind,
    pub start: chrono::DateTime<chrono::Utc>,
    pub pid: u32,
    /// The snapshot the run saved, once it has: a run whose process died after this
    /// is recorded as `warning` with its (complete) snapshot, not as failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

impl History {
    pub fn new(state: PathBuf) -> History {
        History {
            state,
            feed: feed::FeedOptions::default(),
            cache: Arc::default(),
            compaction: (COMPACT_AT, KEEP_PER_HOST),
            notifiers: Default::default(),
        }
    }

    /// Compacts past `at` records, keeping `per_host` of each host.
    pub fn with_compaction(mut self, at: usize, per_host: usize) -> History {
        self.compaction = (at, per_host);
        self
    }

    /// Records a run that involves no agent (a check, an import, a forget), ending
    /// now: `ok` with its details, or `failed` with the error.
    pub fn record_local(
        &self,
        (host, kind): (&str, RunKind),
        start: chrono::DateTime<chrono::Utc>,
        result: Result<Details, String>,
    ) -> Result<(), CliError> {
        let r = RunRecord::new(
            crate::record::new_run_id(start),
            host,
            kind,
            TransportKind::Local,
            start,
        );
        let r = match result {
            Ok(details) => r.with_details(details),
            Err(e) => {
                let mut r = r;
                r.status = RunStatus::Failed;
                r.error = Some(e);
                r
            }
        };
        self.record(&r)
    }

    /// Feeds with this title, link and length.
    pub fn with_feed(mut self, feed: feed::FeedOptions) -> History {
        self.feed = feed;
        self
    }

    /// The state directory this history lives in.
    pub fn state(&self) -> &Path {
        &self.state
    }

    /// Where the packs of a host's uncommitted sessions are kept between runs.
    fn own_packs_path(&self, host: &str) -> PathBuf {
        self.state
            .join("resume")
            .join(format!("{}.packs", blake3::hash(host.as_bytes()).to_hex()))
    }

    /// The packs `host`'s earlier pulls wrote and never committed (a pull cut short):
    /// its next pull counts their blobs as its own and does not send them again.
    pub fn own_packs(&self, host: &str) -> haul_repo::ingest::OwnPacks {
        let packs = std::fs::read_to_string(self.own_packs_path(host))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse::<haul_protocol::PackId>().ok())
            .collect();
        std::sync::Arc::new(std::sync::Mutex::new(packs))
    }

    /// After a pull: forgets the packs once a snapshot holds what they hold, keeps
    /// them (with the new ones) for the next pull otherwise.
    pub fn settle_own_packs(
        &self,
        host: &str,
        own: &haul_repo::ingest::OwnPacks,
        committed: bool,
    ) -> Result<(), CliError> {
        let path = self.own_packs_path(host);
        let packs = own.lock().expect("own packs");
        if committed || packs.is_empty() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CliError::Io(
                    format!("pull resume record {}", path.display()),
                    e,
                )),
                _ => Ok(()),
            };
        }
        let mut text: Vec<String> = packs.iter().map(|p| p.to_hex()).collect();
        text.sort();
        let dir = path.parent().expect("in resume/");
        std::fs::create_dir_all(dir)
            .map_err(|e| CliError::Io(format!("pull resume records {}", dir.display()), e))?;
        feed::write_atomically(&path, &(text.join("\n") + "\n"))
    }

    fn running_dir(&self) -> PathBuf {
        self.state.join("running")
    }

    /// Notes that a run has started (see [`Running`]).
    pub fn begin(&self, run: &Running) -> Result<(), CliError> {
        let dir = self.running_dir();
        let text = serde_json::to_string(run).expect("a marker serializes");
        std::fs::create_dir_all(&dir)
            .map_err(|e| CliError::Io(format!("run markers {}", dir.display()), e))?;
        feed::write_atomically(&dir.join(format!("{}.json", run.id)), &text)
    }

    /// The runs that were started and not recorded, each with whether its process is
    /// still alive.
    pub fn in_flight(&self) -> Vec<(Running, bool)> {
        let Ok(entries) = std::fs::read_dir(self.running_dir()) else {
            return Vec::new();
        };
        let mut runs: Vec<(Running, bool)> = entries
            .flatten()
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|t| serde_json::from_slice::<Running>(&t).ok())
            .map(|r| {
                let alive = std::path::Path::new(&format!("/proc/{}", r.pid)).exists()
                    && r.pid != std::process::id();
                (r, alive)
            })
            .collect();
        runs.sort_by_key(|a| a.0.start);
        runs
    }

    /// Records every started run whose process is gone (or, with `mine`, every one of
    /// this process) as failed with `why`; returns how many.
    pub fn recover(&self, mine: bool, why: &str) -> Result<usize, CliError> {
        let mut n = 0;
        for (run, alive) in self.in_flight() {
            let ours = run.pid == std::process::id();
            if (mine && ours) || (!ours && !alive) {
                let why = why.replace("{pid}", &run.pid.to_string());
                let mut record = RunRecord::new(
                    run.id.clone(),
                    &run.host,
                    run.kind,
                    run.transport,
                    run.start,
                );
                record.error_kind = Some(crate::record::ErrorKind::Interrupted);
                match &run.snapshot {
                    Some(snap) => {
                        record.status = RunStatus::Warning;
                        record.error = Some(format!("snapshot {} was saved and is complete, then {why}; the run's figures are lost", &snap[..8.min(snap.len())]));
                        record.snapshot = Some(snap.clone());
                    }
                    None => {
                        record.status = RunStatus::Failed;
                        record.error = Some(why);
                    }
                }
                self.record(&record)?;
                n += 1;
            }
        }
        Ok(n)
    }

    pub fn log_path(&self) -> PathBuf {
        self.state.join("runs.jsonl")
    }

    /// The all-hosts feed.
    pub fn feed_path(&self) -> PathBuf {
        self.state.join("feed.xml")
    }

    /// A host's feed.
    pub fn host_feed_path(&self, host: &str) -> PathBuf {
        self.state.join("hosts").join(host).join("feed.xml")
    }

    /// Appends `record` durably, removes its run's marker, then rewrites the feeds
    /// (all hosts, and its host's).
    /// Then tells the notifiers, outside every lock (they may take their time).
    pub fn record(&self, record: &RunRecord) -> Result<(), CliError> {
        self.write_record(record)?;
        self.notifiers.notify(record);
        Ok(())
    }

    /// The notifiers told of each record.
    pub fn with_notifiers(mut self, notifiers: crate::notify::Notifiers) -> History {
        self.notifiers = notifiers;
        self
    }

    fn write_record(&self, record: &RunRecord) -> Result<(), CliError> {
        let _one = RECORDING.lock().unwrap_or_else(|p| p.into_inner());
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        // The feeds too are written under the file lock: two processes recording at
        // once cannot leave the older feed in place.
        let _file = self.file_lock()?;
        self.refresh(&mut cache)?;
        self.append(record)?;
        // Read back what was appended (and anything before it that another process
        // appended, or a torn line it completed).
        self.refresh(&mut cache)?;
        let c = cache.as_mut().expect("refreshed");
        if c.records.len() > c.compact_at {
            self.compact(c)?;
        }
        let _ = std::fs::remove_file(self.running_dir().join(format!("{}.json", record.id)));
        let all = &cache.as_ref().expect("refreshed").records;
        feed::write_atomically(&self.feed_path(), &feed::render_with(all, None, &self.feed))?;
        feed::write_atomically(
            &self.host_feed_path(&record.host),
            &feed::render_with(all, Some(&record.host), &self.feed),
        )
    }

    /// An exclusive lock on the history file, for an append or a rewrite.
    fn file_lock(&self) -> Result<std::fs::File, CliError> {
        use std::os::fd::AsRawFd;
        let path = self.state.join("runs.lock");
        let err = |e| CliError::Io(format!("run history lock {}", path.display()), e);
        std::fs::create_dir_all(&self.state).map_err(err)?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(err)?;
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(f)
    }

    fn append(&self, record: &RunRecord) -> Result<(), CliError> {
        let path = self.log_path();
        let err = |e| CliError::Io(format!("run history {}", path.display()), e);
        std::fs::create_dir_all(&self.state).map_err(err)?;
        let mut line = serde_json::to_vec(record).expect("a record serializes");
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(err)?;
        // A torn line left by a crash: start on a fresh line, so this record is whole.
        let len = f.metadata().map_err(err)?.len();
        if len > 0 && !ends_with_newline(&path, len) {
            line.insert(0, b'\n');
        }
        f.write_all(&line).map_err(err)?;
        f.sync_all().map_err(err)
    }

    /// Every record, oldest first, and a warning for each line that was skipped.
    pub fn read(&self) -> Result<(Vec<RunRecord>, Vec<String>), CliError> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh(&mut cache)?;
        let c = cache.as_ref().expect("refreshed");
        let mut warnings = c.warnings.clone();
        warnings.extend(c.torn.clone());
        Ok((c.records.clone(), warnings))
    }

    /// Calls `f` with every record, oldest first, without copying them.
    pub fn with_records<T>(&self, f: impl FnOnce(&[RunRecord]) -> T) -> Result<T, CliError> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh(&mut cache)?;
        Ok(f(&cache.as_ref().expect("refreshed").records))
    }

    /// Brings the cache up to the file: all of it the first time (or after another
    /// process compacted it), else what was appended since.
    fn refresh(&self, cache: &mut Option<Cache>) -> Result<(), CliError> {
        let path = self.log_path();
        let err = |e| CliError::Io(format!("run history {}", path.display()), e);
        // Size and identity from the file as opened: a compaction that renames a new
        // file into place cannot come between the look and the read.
        let file = match std::fs::File::open(&path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(err(e)),
        };
        let meta = file
            .as_ref()
            .map(|f| f.metadata())
            .transpose()
            .map_err(err)?;
        let (size, ino) = meta.map_or((0, 0), |m| (m.len(), m.ino() ^ (m.dev() << 48)));
        let c = cache.get_or_insert_with(|| Cache {
            compact_at: self.compaction.0,
            ..Default::default()
        });
        if c.ino != ino || size < c.len {
            *c = Cache {
                compact_at: self.compaction.0,
                ..Default::default()
            };
            c.ino = ino;
        }
        c.torn = None;
        if size == c.len {
            return Ok(());
        }
        use std::io::{Read, Seek};
        let mut f = file.expect("a size above 0 is a file");
        f.seek(std::io::SeekFrom::Start(c.len)).map_err(err)?;
        let mut text = Vec::new();
        f.take(size - c.len).read_to_end(&mut text).map_err(err)?;
        // Only whole lines: a line still being written is read next time.
        let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let first_line = c.records.len() + c.warnings.len();
        for (n, line) in text[..whole].split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<RunRecord>(line) {
                Ok(r) => c.records.push(r),
                Err(e) => {
                    c.warnings.push(format!(
                        "{} line {}: skipped, not a whole record ({e}); a run was interrupted while it was recorded",
                        path.display(),
                        first_line + n + 1
                    ));
                    c.unreadable.push(line.to_vec());
                }
            }
        }
        c.len += whole as u64;
        if whole < text.len() {
            c.torn = Some(format!(
                "{} line {}: skipped, not a whole record; a run was interrupted while it was recorded",
                path.display(),
                c.records.len() + c.warnings.len() + 1
            ));
        }
        Ok(())
    }

    /// After this process appended: the file's size and inode as read.
    fn note_read(&self, c: &mut Cache) -> Result<(), CliError> {
        let path = self.log_path();
        let m = std::fs::metadata(&path)
            .map_err(|e| CliError::Io(format!("run history {}", path.display()), e))?;
        c.len = m.len();
        c.ino = m.ino() ^ (m.dev() << 48);
        Ok(())
    }

    /// Moves the records compaction does not keep to the archive and rewrites the
    /// history file with the rest (see the module doc). Called with the file locked.
    fn compact(&self, c: &mut Cache) -> Result<(), CliError> {
        let keep = keep_after_compaction(&c.records, self.compaction.1.max(self.feed.items));
        let (kept, gone): (Vec<_>, Vec<_>) =
            c.records.drain(..).zip(keep).partition(|(_, keep)| *keep);
        let lines = |rs: &[(RunRecord, bool)]| {
            let mut out = Vec::new();
            for (r, _) in rs {
                out.extend(serde_json::to_vec(r).expect("a record serializes"));
                out.push(b'\n');
            }
            out
        };
        let archive = self.state.join("runs-archive.jsonl");
        let err = |p: &Path, e| CliError::Io(format!("run history {}", p.display()), e);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&archive)
            .map_err(|e| err(&archive, e))?;
        let mut archived = lines(&gone);
        for line in c.unreadable.drain(..) {
            archived.extend(line);
            archived.push(b'\n');
        }
        f.write_all(&archived)
            .and_then(|()| f.sync_all())
            .map_err(|e| err(&archive, e))?;
        // Then the shorter file, in one rename: a crash before it leaves the old file
        // (and the archive holding some of its records twice), never a torn one.
        let text = String::from_utf8(lines(&kept)).expect("JSON is UTF-8");
        feed::write_atomically(&self.log_path(), &text)?;
        c.records = kept.into_iter().map(|(r, _)| r).collect();
        c.warnings.clear();
        c.unreadable.clear();
        self.note_read(c)?;
        c.compact_at = self.compaction.0.max(2 * c.records.len());
        tracing::info!(
            kept = c.records.len(),
            archived = gone.len(),
            "run history compacted into {}",
            archive.display()
        );
        Ok(())
    }
}

/// Which records a compaction keeps: each host's newest `per_host`, and for each
/// host its newest verified import and newest retention that removed something (the
/// retirement of a legacy rdiff-backup tree rests on them).
fn keep_after_compaction(records: &[RunRecord], per_host: usize) -> Vec<bool> {
    let mut keep = vec![false; records.len()];
    let mut seen: std::collections::HashMap<(&str, u8), usize> = Default::default();
    for (i, r) in records.iter().enumerate().rev() {
        let n = seen.entry((&r.host, 0)).or_default();
        *n += 1;
        keep[i] |= *n <= per_host;
        let decision = match (&r.details, r.status) {
            (Some(Details::Import(d)), RunStatus::Ok) if d.files_verified.is_some() => Some(1),
            (Some(Details::Forget(d)), RunStatus::Ok) if !d.removed.is_empty() => Some(2),
            _ => None,
        };
        if let Some(k) = decision {
            let n = seen.entry((&r.host, k)).or_default();
            *n += 1;
            keep[i] |= *n == 1;
        }
    }
    keep
}

fn ends_with_newline(path: &Path, len: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut last = [0u8];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut last, len - 1))
        .map(|()| last[0] == b'\n')
        .unwrap_or(false)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record(id: &str, host: &str, status: RunStatus) -> RunRecord {
        let mut r = RunRecord::new(
            id.into(),
            host,
            RunKind::Pull,
            TransportKind::Local,
            chrono::Utc::now(),
        );
        r.status = status;
        r.output_tail = vec!["<b>&".into()];
        r
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_the_next_record_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path().to_path_buf());
        h.record(&record("r1", "a", RunStatus::Ok)).unwrap();
        // A crash in the middle of the next append.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(h.log_path())
            .unwrap();
        f.write_all(b"{\"id\":\"r2\",\"host\":\"a\",\"ki").unwrap();
        let (records, warnings) = h.read().unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("line 2: skipped"), "{warnings:?}");
        h.record(&record("r3", "b", RunStatus::Failed)).unwrap();
        let (records, warnings) = h.read().unwrap();
        let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["r1", "r3"]);
        assert_eq!(warnings.len(), 1);
        assert!(h.feed_path().is_file() && h.host_feed_path("b").is_file());
    }

    #[test]
    fn a_long_history_is_compacted_into_the_archive_keeping_what_decisions_need() {
        use crate::record::{ForgetDetails, ImportDetails};
        let dir = tempfile::tempdir().unwrap();
        let feed = feed::FeedOptions {
            items: 3,
            ..Default::default()
        };
        let h = History::new(dir.path().to_path_buf())
            .with_feed(feed.clone())
            .with_compaction(20, 4);
        // Another process's view of the same history, read before the compaction.
        let other = History::new(dir.path().to_path_buf());
        let mut import = record("import-a", "a", RunStatus::Ok);
        import.kind = RunKind::Import;
        import.details = Some(Details::Import(ImportDetails {
            files_verified: Some(3),
            ..Default::default()
        }));
        h.record(&import).unwrap();
        let mut forget = record("forget-a", "a", RunStatus::Ok);
        forget.kind = RunKind::Forget;
        forget.details = Some(Details::Forget(ForgetDetails {
            removed: vec!["x".into()],
            ..Default::default()
        }));
        h.record(&forget).unwrap();
        assert_eq!(other.read().unwrap().0.len(), 2);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(h.log_path())
            .unwrap();
        f.write_all(b"{\"kind\":\"from-the-future\"}\n").unwrap();
        for i in 0..19 {
            let host = if i % 2 == 0 { "a" } else { "b" };
            h.record(&record(&format!("r{i:02}"), host, RunStatus::Ok))
                .unwrap();
        }
        let (kept, warnings) = h.read().unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let ids: Vec<&str> = kept.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            ["import-a", "forget-a", "r11", "r12", "r13", "r14", "r15", "r16", "r17", "r18"]
        );
        let archived = std::fs::read_to_string(dir.path().join("runs-archive.jsonl")).unwrap();
        assert_eq!(archived.lines().count(), 12);
        // A line of a newer version, unreadable here, is archived as it was.
        assert!(
            archived.contains(r#"{"kind":"from-the-future"}"#),
            "{archived}"
        );
        // The other process sees the rewritten file, and its next record is kept.
        assert_eq!(other.read().unwrap().0.len(), 10);
        other
            .record(&record("late", "c", RunStatus::Failed))
            .unwrap();
        assert_eq!(h.read().unwrap().0.last().unwrap().id, "late");
        assert_eq!(h.read().unwrap().0.len(), 11);
    }
}
