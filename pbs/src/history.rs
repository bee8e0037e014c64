//! The run history: every run's record, appended durably to `STATE/runs.jsonl` (one
//! JSON object per line), and the RSS feeds rendered from it after every run.
//!
//! Durability: a record is written with one `write` on a file opened for appending,
//! then `fsync`ed. A crash mid-append can leave only the last line torn; earlier lines
//! are never rewritten. Reading skips a line that does not parse, with a warning that
//! names it (a torn last line is the expected case).

use crate::error::CliError;
use crate::feed;
use crate::run::RunRecord;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub struct History {
    state: PathBuf,
    feed: feed::FeedOptions,
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
    pub kind: String,
    pub transport: String,
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
        }
    }

    /// The history of `state` (default: [`haul_config::default_state_dir`]).
    pub fn of(state: Option<&Path>) -> History {
        History::new(
            state
                .map(Path::to_path_buf)
                .unwrap_or_else(haul_config::default_state_dir),
        )
    }

    /// Records a run that involves no agent (a check, an import), ending now: `ok`
    /// with its counters, or `failed` with the error (and the counters it has).
    pub fn record_local(
        &self,
        (host, kind): (&str, &str),
        start: chrono::DateTime<chrono::Utc>,
        counters: Option<serde_json::Value>,
        error: Option<String>,
    ) -> Result<(), CliError> {
        let status = if error.is_some() { "failed" } else { "ok" };
        let mut r = RunRecord::bare(
            crate::run::new_run_id(start),
            host,
            (kind, "local"),
            start,
            status,
            String::new(),
        );
        r.error = error;
        r.counters = counters;
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
                let record = match &run.snapshot {
                    Some(snap) => {
                        let mut r = crate::run::RunRecord::bare(
                            run.id.clone(),
                            &run.host,
                            (&run.kind, &run.transport),
                            run.start,
                            "warning",
                            format!("snapshot {} was saved and is complete, then {why}; the run's figures are lost", &snap[..8.min(snap.len())]),
                        );
                        r.snapshot = Some(snap.clone());
                        r
                    }
                    None => crate::run::RunRecord::bare(
                        run.id.clone(),
                        &run.host,
                        (&run.kind, &run.transport),
                        run.start,
                        "failed",
                        why,
                    ),
                };
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
    pub fn record(&self, record: &RunRecord) -> Result<(), CliError> {
        let _one = RECORDING.lock().unwrap_or_else(|p| p.into_inner());
        self.append(record)?;
        let _ = std::fs::remove_file(self.running_dir().join(format!("{}.json", record.id)));
        let (all, _) = self.read()?;
        feed::write_atomically(
            &self.feed_path(),
            &feed::render_with(&all, None, &self.feed),
        )?;
        feed::write_atomically(
            &self.host_feed_path(&record.host),
            &feed::render_with(&all, Some(&record.host), &self.feed),
        )
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
        let path = self.log_path();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((vec![], vec![])),
            Err(e) => return Err(CliError::Io(format!("run history {}", path.display()), e)),
        };
        let mut records = Vec::new();
        let mut warnings = Vec::new();
        for (n, line) in text.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<RunRecord>(line) {
                Ok(r) => records.push(r),
                Err(e) => warnings.push(format!(
                    "{} line {}: skipped, not a whole record ({e}); a run was interrupted while it was recorded",
                    path.display(),
                    n + 1
                )),
            }
        }
        Ok((records, warnings))
    }
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

    pub(crate) fn record(id: &str, host: &str, status: &str) -> RunRecord {
        RunRecord {
            id: id.into(),
            host: host.into(),
            kind: "pull".into(),
            transport: "local".into(),
            start: chrono::Utc::now(),
            end: chrono::Utc::now(),
            status: status.into(),
            snapshot: None,
            counters: None,
            connections: 1,
            agent_peak_rss_kib: 0,
            pbs_peak_rss_kib: 0,
            output_tail: vec!["<b>&".into()],
            error: None,
        }
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_the_next_record_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path().to_path_buf());
        h.record(&record("r1", "a", "ok")).unwrap();
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
        h.record(&record("r3", "b", "failed")).unwrap();
        let (records, warnings) = h.read().unwrap();
        let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["r1", "r3"]);
        assert_eq!(warnings.len(), 1);
        assert!(h.feed_path().is_file() && h.host_feed_path("b").is_file());
    }
}
