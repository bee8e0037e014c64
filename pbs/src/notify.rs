//! `[[notify]]`: at the end of each run (and alert) the history records, the notifiers
//! that select it are called, one after another, each within its timeout:
//!
//! - `url` with `format = "ping"` (healthchecks.io style): a POST of the run's summary
//!   to the URL when the run saved its work (`ok`, `warning`), to `URL/fail` when it
//!   failed;
//! - `url` with `format = "json"`: a POST of the run as a [`RunEvent`];
//! - `command`: run without a shell, the run in `HAUL_*` variables and as a
//!   [`RunEvent`] on its standard input.
//!
//! `{host}` in a URL is replaced by the run's host. A notifier that fails (refused,
//! unreachable, an HTTP error status, a non-zero exit, a timeout) is logged as a
//! warning naming it and why; the run's outcome and record are never changed.

use crate::record::{RunKind, RunRecord, RunStatus};
use haul_config::{Notify, NotifyFormat, NotifyStatus};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a JSON notifier receives: one run.
#[derive(Debug, serde::Serialize)]
pub struct RunEvent<'a> {
    /// Always `run`.
    #[serde(rename = "type")]
    pub tag: &'static str,
    pub id: &'a str,
    pub host: &'a str,
    pub kind: RunKind,
    pub status: RunStatus,
    /// The feed item's words: the error's first line, or the run's figures.
    pub summary: String,
    pub error: Option<&'a str>,
    pub start: chrono::DateTime<chrono::Utc>,
    pub end: chrono::DateTime<chrono::Utc>,
    pub snapshot: Option<&'a str>,
    /// The run's page on the status server.
    pub url: Option<String>,
}

/// The configured notifiers, and where the status server's run pages are.
#[derive(Clone, Default)]
pub struct Notifiers {
    list: Arc<Vec<Notify>>,
    link: String,
    /// The daemon's: records go to one thread that calls the notifiers, so that a slow
    /// one holds up no run and no scheduler. A command calls them itself, before it
    /// exits.
    background: Option<std::sync::mpsc::Sender<RunRecord>>,
}

fn status_of(s: RunStatus) -> NotifyStatus {
    match s {
        RunStatus::Ok => NotifyStatus::Ok,
        RunStatus::Warning => NotifyStatus::Warning,
        RunStatus::Failed => NotifyStatus::Failed,
    }
}

impl Notifiers {
    pub fn from_config(c: &haul_config::Config) -> Notifiers {
        Notifiers {
            list: Arc::new(c.notify.clone()),
            link: c.feed_link(),
            background: None,
        }
    }

    /// These notifiers, called from a thread of their own (see `background`).
    pub fn in_background(mut self) -> Notifiers {
        if self.list.is_empty() {
            return self;
        }
        let (tx, rx) = std::sync::mpsc::channel::<RunRecord>();
        let worker = Notifiers {
            background: None,
            ..self.clone()
        };
        std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || {
                for r in rx {
                    worker.notify(&r);
                }
            })
            .expect("a thread for the notifiers");
        self.background = Some(tx);
        self
    }

    /// Calls every notifier that selects `r` (or hands `r` to the notifiers' thread);
    /// failures are logged, not returned.
    pub fn notify(&self, r: &RunRecord) {
        if let Some(tx) = &self.background {
            let _ = tx.send(r.clone());
            return;
        }
        for (i, n) in self.list.iter().enumerate() {
            if !n.selects(&r.host, r.kind.word(), status_of(r.status)) {
                continue;
            }
            let name = n.name.clone().unwrap_or_else(|| format!("notify[{i}]"));
            match self.call(n, r) {
                Ok(()) => tracing::debug!(notifier = %name, run = %r.id, "notified"),
                Err(why) => tracing::warn!(
                    notifier = %name,
                    run = %r.id,
                    "notifier failed (the run is not affected): {why}"
                ),
            }
        }
    }

    fn event<'a>(&self, r: &'a RunRecord) -> RunEvent<'a> {
        RunEvent {
            tag: "run",
            id: &r.id,
            host: &r.host,
            kind: r.kind,
            status: r.status,
            summary: crate::feed::summary(r),
            error: r.error.as_deref(),
            start: r.start,
            end: r.end,
            snapshot: r.snapshot.as_deref(),
            url: (!self.link.is_empty())
                .then(|| format!("{}/runs/{}", self.link.trim_end_matches('/'), r.id)),
        }
    }

    fn call(&self, n: &Notify, r: &RunRecord) -> Result<(), String> {
        let event = self.event(r);
        match &n.url {
            Some(url) => {
                let url = url.replace("{host}", &r.host);
                // Errors name the server, never the whole URL: its path or user part
                // is often the secret (a ping key, a token).
                let server = server_of(&url);
                let agent = http_agent(n.timeout);
                let sent = match n.format {
                    NotifyFormat::Ping => {
                        let url = if r.status.saved() {
                            url
                        } else {
                            format!("{}/fail", url.trim_end_matches('/'))
                        };
                        agent
                            .post(&url)
                            .header("Content-Type", "text/plain; charset=utf-8")
                            .send(format!(
                                "{} {} {}: {}",
                                r.host,
                                r.kind,
                                r.status.shout(),
                                event.summary
                            ))
                            .map_err(|e| format!("POST to {server}: {e}"))
                    }
                    NotifyFormat::Json => agent
                        .post(&url)
                        .header("Content-Type", "application/json")
                        .send(serde_json::to_vec(&event).expect("an event serializes"))
                        .map_err(|e| format!("POST to {server}: {e}")),
                };
                sent.map(|_| ())
            }
            None => run_command(&n.command, &event, n.timeout),
        }
    }
}

/// `scheme://host:port` of `url`, without its user part or path.
fn server_of(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}")
}

/// An HTTP client for one call: rustls with aws-lc (as russh uses), the system's
/// roots, `timeout` for the whole call.
fn http_agent(timeout: Duration) -> ureq::Agent {
    use ureq::tls::{RootCerts, TlsConfig, TlsProvider};
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::PlatformVerifier)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .build();
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .tls_config(tls)
        .user_agent(concat!("haul-pbs/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent()
}

/// Runs `command` with the event in its environment and on its standard input; an
/// error if it cannot start, exits non-zero or outlives `timeout` (it is killed).
fn run_command(command: &[String], e: &RunEvent<'_>, timeout: Duration) -> Result<(), String> {
    let shown = command.join(" ");
    let mut child = std::process::Command::new(&command[0])
        .args(&command[1..])
        // Nothing of the pbs's environment (a passphrase in $HAUL_PASSWORD) reaches it.
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .env("HAUL_RUN_ID", e.id)
        .env("HAUL_HOST", e.host)
        .env("HAUL_KIND", e.kind.word())
        .env("HAUL_STATUS", e.status.word())
        .env("HAUL_SUMMARY", &e.summary)
        .env("HAUL_ERROR", e.error.unwrap_or(""))
        .env("HAUL_SNAPSHOT", e.snapshot.unwrap_or(""))
        .env("HAUL_RUN_URL", e.url.as_deref().unwrap_or(""))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|err| format!("{shown}: cannot start: {err}"))?;
    let json = serde_json::to_vec(e).expect("an event serializes");
    if let Some(mut stdin) = child.stdin.take() {
        // From a thread: a command that does not read its input neither blocks this
        // one past its timeout nor is an error.
        std::thread::spawn(move || {
            let _ = stdin.write_all(&json);
        });
    }
    let mut stderr = child.stderr.take().expect("piped");
    let (text_tx, text_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        let _ = text_tx.send(text);
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{shown}: still running after {timeout:?}, killed"));
            }
            Err(err) => return Err(format!("{shown}: {err}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    // What it printed, unless a process it left behind still holds its stderr.
    let text = text_rx
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let tail: String = text
        .trim()
        .chars()
        .rev()
        .take(300)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(format!("{shown}: {status}: {tail}"))
}
