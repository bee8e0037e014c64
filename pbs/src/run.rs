//! One run of an agent against a repository server of this process: the `local`
//! transport (the agent is a child process; the server listens on a socket in a
//! private directory of this run). SSH runs come later and reuse the record.

use crate::error::CliError;
use crate::server::{self, Server};
use serde::Serialize;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Lines of agent output kept for the run record.
const TAIL_LINES: usize = 40;
/// Warnings kept whole for the report; the rest are counted. An agent (or a host
/// speaking for it) may print any number: the pbs's memory must not follow.
const KEPT_WARNINGS: usize = 100;
/// Longest line of agent output kept; longer ones are cut.
const MAX_LINE: usize = 64 * 1024;

/// What the agent did, as seen from this side.
pub struct AgentRun {
    /// The agent's exit code (`None`: killed by a signal).
    pub exit: Option<i32>,
    /// Its last `summary` event, if it printed one.
    pub summary: Option<serde_json::Value>,
    /// Its first [`KEPT_WARNINGS`] warnings.
    pub warnings: Vec<serde_json::Value>,
    /// How many warnings it printed in all.
    pub warnings_total: u64,
    /// Its `error` event's message, else the last line of its stderr.
    pub error: Option<String>,
    pub tail: Vec<String>,
    /// Connections the server accepted during the run.
    pub connections: u64,
    pub agent_peak_rss_kib: u64,
}

/// The agent binary: `--agent`/`$HAUL_AGENT`, else `haul-agent` beside this
/// executable, else on `$PATH`.
pub fn agent_binary(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Ok(exe) = std::env::current_exe() {
        let sibling = exe.with_file_name("haul-agent");
        if sibling.is_file() {
            return sibling;
        }
    }
    PathBuf::from("haul-agent")
}

/// A multi-threaded runtime for the server; blocking threads do the engine's work.
pub fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    // One thread for the I/O (SSH, HTTP, request bodies): every piece of engine work
    // runs on the blocking threads, and with a second I/O thread each SSH packet woke
    // another thread on its way to its request (about 4% slower pulls over SSH).
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(2 * cpus + 2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Io("cannot start the server runtime".into(), e))
}

/// Starts `server` on a fresh socket in a private directory (in `socket_dir`, made
/// 0700 if missing, else the temporary directory), runs `agent` with `args` (the
/// socket path is appended as `--socket PATH`) and `stdin`, relays its progress to
/// `progress`, and stops the server when the agent has exited.
pub fn run_agent(
    server: Arc<Server>,
    agent: &Path,
    args: Vec<OsString>,
    stdin: Option<String>,
    socket_dir: Option<&Path>,
    progress: &(dyn Fn(&serde_json::Value) + Sync),
) -> Result<AgentRun, CliError> {
    let rt = runtime()?;
    let mut builder = tempfile::Builder::new();
    builder.prefix("haul-run-");
    let dir = match socket_dir {
        Some(d) => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|e| {
                    CliError::Io(
                        format!("socket directory {} ([server].socket_dir)", d.display()),
                        e,
                    )
                })?;
            builder.tempdir_in(d)
        }
        None => builder.tempdir(),
    }
    .map_err(|e| CliError::Io("cannot create the run's private directory".into(), e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(|e| CliError::Io(format!("cannot restrict {}", dir.path().display()), e))?;
    }
    let socket = dir.path().join("repo.sock");
    rt.block_on(async {
        let (listener, _guard) = server::bind(&socket)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server::serve(server.clone(), listener, async {
            let _ = stop_rx.await;
        }));
        let watchdog = server::conn::Watchdog::new(&server);
        let result = drive_agent(agent, args, &socket, stdin, progress, watchdog).await;
        let _ = stop_tx.send(());
        match serving.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(CliError::Failed(format!("repository server failed: {e}"))),
        }
        let mut run = result?;
        run.connections = server.connections();
        Ok(run)
    })
}

async fn drive_agent(
    agent: &Path,
    mut args: Vec<OsString>,
    socket: &Path,
    stdin: Option<String>,
    progress: &(dyn Fn(&serde_json::Value) + Sync),
    mut watchdog: server::conn::Watchdog,
) -> Result<AgentRun, CliError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    args.push("--socket".into());
    args.push(socket.into());
    let mut child = tokio::process::Command::new(agent)
        .args(&args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            CliError::Io(
                format!(
                    "cannot start the agent {} (install haul-agent beside haul-pbs or give --agent)",
                    agent.display()
                ),
                e,
            )
        })?;
    let mut input = child.stdin.take().expect("piped");
    if let Some(line) = stdin {
        let _ = input.write_all(line.as_bytes()).await;
        let _ = input.write_all(b"\n").await;
    }
    drop(input);
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    // Only the last lines of stderr matter (the tail and the error): bounded.
    let err_task = tokio::spawn(async move {
        let (mut buf, mut data) = (Vec::new(), vec![0u8; 16 * 1024]);
        let mut last: VecDeque<String> = VecDeque::new();
        while let Ok(n @ 1..) = stderr.read(&mut data).await {
            for line in take_lines(&mut buf, &data[..n]) {
                if last.len() == TAIL_LINES {
                    last.pop_front();
                }
                last.push_back(line);
            }
        }
        if !buf.is_empty() {
            last.push_back(String::from_utf8_lossy(&buf).into_owned());
        }
        last
    });
    let mut out = AgentOutput::default();
    let (mut buf, mut data) = (Vec::new(), vec![0u8; 64 * 1024]);
    loop {
        match tokio::time::timeout(watchdog.wait(), stdout.read(&mut data)).await {
            Ok(Ok(n @ 1..)) => {
                watchdog.output();
                for line in take_lines(&mut buf, &data[..n]) {
                    out.stdout_line(&line, progress);
                }
            }
            Ok(_) => break,
            Err(_) => {
                if let Some(why) = watchdog.stalled() {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    return Err(CliError::Failed(why));
                }
            }
        }
    }
    if !buf.is_empty() {
        out.stdout_line(&String::from_utf8_lossy(&buf), progress);
    }
    let status = child
        .wait()
        .await
        .map_err(|e| CliError::Io("waiting for the agent".into(), e))?;
    for l in err_task.await.unwrap_or_default() {
        out.stderr_line(&l);
    }
    Ok(out.finish(status.code(), &status.to_string()))
}

/// Collects what an agent prints (JSON events on stdout, lines on stderr), however it
/// runs: as a child process or over SSH.
#[derive(Default)]
pub struct AgentOutput {
    summary: Option<serde_json::Value>,
    warnings: Vec<serde_json::Value>,
    warnings_total: u64,
    error: Option<String>,
    tail: VecDeque<String>,
    last_stderr: Option<String>,
}

impl AgentOutput {
    fn keep(&mut self, line: String) {
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// One line of the agent's stdout; events other than progress are kept for the
    /// record, and every event is handed to `progress`.
    pub fn stdout_line(&mut self, line: &str, progress: &(dyn Fn(&serde_json::Value) + Sync)) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            self.keep(line.to_string());
            return;
        };
        match v.get("type").and_then(|t| t.as_str()) {
            Some("progress") => {}
            Some("summary") => self.summary = Some(v.clone()),
            Some("warning") => {
                self.warnings_total += 1;
                if self.warnings.len() < KEPT_WARNINGS {
                    self.warnings.push(v.clone());
                }
            }
            Some("error") => {
                self.error = v.get("message").and_then(|m| m.as_str()).map(String::from)
            }
            _ => {}
        }
        if v.get("type").and_then(|t| t.as_str()) != Some("progress") {
            self.keep(line.to_string());
        }
        progress(&v);
    }

    pub fn stderr_line(&mut self, line: &str) {
        tracing::debug!("agent: {line}");
        self.keep(format!("stderr: {line}"));
        self.last_stderr = Some(line.to_string());
    }

    /// The agent ended with `exit` (`None`: no exit status; `how` says what happened).
    pub fn finish(self, exit: Option<i32>, how: &str) -> AgentRun {
        let failed = !matches!(exit, Some(0) | Some(3));
        let error = self.error.or_else(|| {
            failed.then(|| {
                self.last_stderr
                    .clone()
                    .unwrap_or_else(|| format!("the agent ended with {how}"))
            })
        });
        AgentRun {
            exit,
            agent_peak_rss_kib: self
                .summary
                .as_ref()
                .and_then(|s| s["peak_rss_kib"].as_u64())
                .unwrap_or(0),
            summary: self.summary,
            warnings: self.warnings,
            warnings_total: self.warnings_total,
            error,
            tail: self.tail.into_iter().collect(),
            connections: 0,
        }
    }
}

/// Appends `data` to `buf` and returns the complete lines, removing them from it. A
/// line longer than [`MAX_LINE`] is cut there (an agent or a host cannot make the pbs
/// buffer output without end).
pub(crate) fn take_lines(buf: &mut Vec<u8>, data: &[u8]) -> Vec<String> {
    buf.extend_from_slice(data);
    let mut lines = Vec::new();
    loop {
        match buf.iter().position(|b| *b == b'\n') {
            Some(end) if end <= MAX_LINE => {
                lines.push(String::from_utf8_lossy(&buf[..end]).into_owned());
                buf.drain(..=end);
            }
            _ if buf.len() > MAX_LINE => {
                lines.push(String::from_utf8_lossy(&buf[..MAX_LINE]).into_owned());
                buf.drain(..MAX_LINE);
            }
            _ => return lines,
        }
    }
}

/// A run, as recorded in the run history (`history.rs`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub host: String,
    /// `pull`, `restore`, ...
    pub kind: String,
    /// `ssh` or `local`.
    pub transport: String,
    pub start: chrono::DateTime<chrono::Utc>,
    pub end: chrono::DateTime<chrono::Utc>,
    /// `ok`, `warning` or `failed`.
    pub status: String,
    pub snapshot: Option<String>,
    pub counters: Option<serde_json::Value>,
    pub connections: u64,
    pub agent_peak_rss_kib: u64,
    pub pbs_peak_rss_kib: u64,
    pub output_tail: Vec<String>,
    pub error: Option<String>,
}

impl RunRecord {
    /// A run without the agent's figures, ending now: one that failed before or without
    /// its agent, one whose process died, or an alert. `kind`, `transport` and
    /// `status` as in the fields.
    pub fn bare(
        id: String,
        host: &str,
        (kind, transport): (&str, &str),
        start: chrono::DateTime<chrono::Utc>,
        status: &str,
        error: String,
    ) -> RunRecord {
        RunRecord {
            id,
            host: host.into(),
            kind: kind.into(),
            transport: transport.into(),
            start,
            end: chrono::Utc::now(),
            status: status.into(),
            snapshot: None,
            counters: None,
            connections: 0,
            agent_peak_rss_kib: 0,
            pbs_peak_rss_kib: haul_protocol::peak_rss_kib(),
            output_tail: Vec::new(),
            error: Some(error),
        }
    }
}

/// A run id: sortable by time, unique.
pub fn new_run_id(now: chrono::DateTime<chrono::Utc>) -> String {
    let mut r = [0u8; 4];
    getrandom::getrandom(&mut r).expect("OS random numbers");
    format!("{}-{}", now.format("%Y%m%dT%H%M%SZ"), hex::encode(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_across_packets_and_cut_when_endless() {
        let mut buf = Vec::new();
        assert!(take_lines(&mut buf, b"{\"a\"").is_empty());
        assert_eq!(take_lines(&mut buf, b":1}\nnext"), ["{\"a\":1}"]);
        assert_eq!(take_lines(&mut buf, b"\n"), ["next"]);
        let endless = vec![b'x'; MAX_LINE * 2 + 10];
        let lines = take_lines(&mut buf, &endless);
        assert_eq!(lines.len(), 2);
        assert!(buf.len() <= MAX_LINE);
    }

    #[test]
    fn warnings_past_the_kept_ones_are_counted_not_kept() {
        let mut out = AgentOutput::default();
        for i in 0..KEPT_WARNINGS + 50 {
            out.stdout_line(
                &format!(r#"{{"type":"warning","path":"/f{i}","message":"m"}}"#),
                &|_| {},
            );
        }
        let run = out.finish(Some(3), "exit status 3");
        assert_eq!(run.warnings.len(), KEPT_WARNINGS);
        assert_eq!(run.warnings_total, KEPT_WARNINGS as u64 + 50);
        assert_eq!(run.warnings[0]["path"], "/f0");
    }
}
