//! Output: human lines or JSON lines, and a progress line that only appears on a
//! terminal.
//!
//! SIGPIPE stays ignored in `haul-pbs` (Rust's default): a process that holds a run, a
//! lock or a socket must never die of it, whether an agent it writes to died or a
//! client it answers hung up. So nothing here may panic when stdout or stderr is gone,
//! as `println!` does: [`outln!`](crate::outln) and [`errln!`](crate::errln) drop what
//! cannot be written. When the reader of stdout has gone (`haul-pbs ls latest | head`),
//! [`stdout_closed`] turns true and listings stop early; the command still ends as it
//! would have (its runs recorded, its locks released), quietly.
//!
//! Global state: [`STDOUT_CLOSED`] is process-wide because stdout is.

use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

/// Set once a write to stdout failed: its reader went away, or (see
/// [`STDOUT_ERROR`]) the write itself failed.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// The first error writing stdout other than its reader going away (a full disk under
/// `haul-pbs ls > file`): the command ends with it, not as if all was written.
static STDOUT_ERROR: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Whether stdout's reader has gone away: a listing may stop.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Relaxed)
}

/// The first failed write to stdout that was not its reader going away.
pub fn stdout_error() -> Option<String> {
    STDOUT_ERROR
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

fn failed_write(e: std::io::Error) {
    STDOUT_CLOSED.store(true, Relaxed);
    if e.kind() != std::io::ErrorKind::BrokenPipe {
        STDOUT_ERROR
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| format!("writing to standard output: {e}"));
    }
}

/// Set by the daemon: every line goes through the logger (`tracing`), so that its
/// log (`--log-json` or not) holds nothing else.
static LOGGED: AtomicBool = AtomicBool::new(false);

/// From now on, [`outln!`](crate::outln), [`errln!`](crate::errln) and [`json_line`]
/// write through the logger (info, warn and info), not to stdout and stderr.
pub fn to_the_logger() {
    LOGGED.store(true, Relaxed);
}

/// Writes `args` and a newline to stdout; a failed write is noted, never fatal.
pub fn write_out(args: std::fmt::Arguments<'_>) {
    if LOGGED.load(Relaxed) {
        tracing::info!("{args}");
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        failed_write(e);
    }
}

/// Writes `bytes` to stdout as they are; a failed write is noted, never fatal.
pub fn write_bytes(bytes: &[u8]) {
    if let Err(e) = std::io::stdout().lock().write_all(bytes) {
        failed_write(e);
    }
}

/// Writes `args` to stderr (with a newline if `newline`); a failed write is dropped.
pub fn write_err(args: std::fmt::Arguments<'_>, newline: bool) {
    if LOGGED.load(Relaxed) {
        tracing::warn!("{args}");
        return;
    }
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args);
    if newline {
        let _ = err.write_all(b"\n");
    }
}

/// `println!` that cannot panic or kill: see the module doc.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => { $crate::output::write_out(format_args!($($arg)*)) };
}

/// `eprintln!` that cannot panic or kill: see the module doc.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => { $crate::output::write_err(format_args!($($arg)*), true) };
}

/// Prints one JSON object on its own line.
pub fn json_line<T: Serialize>(value: &T) {
    if LOGGED.load(Relaxed) {
        let line = serde_json::to_string(value).unwrap_or_default();
        tracing::info!(json = %line, "event");
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = serde_json::to_writer(&mut out, value)
        .map_err(std::io::Error::from)
        .and_then(|()| out.write_all(b"\n"))
    {
        failed_write(e);
    }
}

/// Prints `value` (an object) as one JSON line with `"type": tag` added.
pub fn typed_line<T: Serialize>(tag: &str, value: &T) {
    let mut v = serde_json::to_value(value).expect("a value of ours serializes");
    if let Some(o) = v.as_object_mut() {
        o.insert("type".into(), serde_json::Value::String(tag.into()));
    }
    json_line(&v);
}

/// Bytes for people, in binary units: `87 B`, `1.5 GiB` (the `bytesize` crate).
pub fn bytes(n: u64) -> String {
    bytesize::ByteSize::b(n).display().iec().to_string()
}

/// A table for people: a header and rows, columns aligned, numbers (the columns named
/// in `right`) to the right, no borders (the `comfy-table` crate). Printed line by line.
pub fn table(header: &[&str], right: &[usize], rows: Vec<Vec<String>>) {
    use comfy_table::{CellAlignment, Table};
    let mut t = Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_header(header.iter().copied());
    for r in rows {
        t.add_row(r);
    }
    for col in t.column_iter_mut() {
        col.set_padding((0, 2));
    }
    for &c in right {
        if let Some(col) = t.column_mut(c) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    for line in t.lines() {
        write_out(format_args!("{}", line.trim_end()));
    }
}

/// What a progress line shows: words, and how far it is (with a total, a bar with the
/// percentage, the rate and the time left).
pub struct Shown {
    pub text: String,
    pub done: u64,
    pub total: Option<u64>,
    /// `done` and `total` are bytes (else a count).
    pub bytes: bool,
}

/// A progress line on stderr while a long operation runs, drawn by `indicatif` if
/// stderr is a terminal (nothing otherwise), cleared when dropped.
pub struct Progress {
    _ticker: Option<haul_protocol::Ticker>,
}

impl Progress {
    /// `shown` is called about five times a second.
    pub fn start(enabled: bool, shown: impl Fn() -> Shown + Send + 'static) -> Progress {
        use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
        if !enabled || !std::io::stderr().is_terminal() || LOGGED.load(Relaxed) {
            return Progress { _ticker: None };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        let style = |template: &str| {
            ProgressStyle::with_template(template).expect("a valid progress template")
        };
        let (with_bytes, with_count, open_bytes, open_count) = (
            style("{msg} [{bar:24}] {percent:>3}% {binary_bytes_per_sec} ETA {eta}"),
            style("{msg} [{bar:24}] {percent:>3}% {per_sec} ETA {eta}"),
            style("{spinner} {msg} {binary_bytes_per_sec}"),
            style("{spinner} {msg}"),
        );
        let update = move |bar: &ProgressBar| {
            let s = shown();
            let style = match (s.total.is_some(), s.bytes) {
                (true, true) => &with_bytes,
                (true, false) => &with_count,
                (false, true) => &open_bytes,
                (false, false) => &open_count,
            };
            bar.set_style(style.clone());
            if let Some(t) = s.total {
                bar.set_length(t);
            }
            bar.set_position(s.done);
            bar.set_message(s.text);
        };
        update(&bar);
        let (b, end) = (bar.clone(), bar);
        let ticker = haul_protocol::Ticker::start(
            Duration::from_millis(200),
            move || {
                update(&b);
                b.tick();
            },
            move || end.finish_and_clear(),
        );
        Progress {
            _ticker: Some(ticker),
        }
    }
}

/// A prune in a line: `2.1 GiB freed, 14 packs deleted, 9 repacked`.
/// A push in a few words: `1,203 files changed, 54 MiB sent, import OK`.
pub fn push_summary(d: &crate::record::PushDetails) -> String {
    let mut s = format!(
        "{} files changed, {} sent",
        crate::feed::group_thousands(d.files_changed()),
        bytes(d.bytes_sent)
    );
    if let Some(i) = &d.import {
        s.push_str(if i.succeeded() {
            ", import OK"
        } else {
            ", import FAILED"
        });
    }
    s
}

pub fn prune_summary(d: &crate::record::PruneDetails) -> String {
    let mut s = format!(
        "{} freed, {} packs deleted, {} repacked",
        bytes(d.bytes_freed),
        d.packs_deleted,
        d.packs_repacked
    );
    if d.packs_pending > 0 {
        s.push_str(&format!(
            ", {} left for the next prune while older pulls run",
            d.packs_pending
        ));
    }
    s
}
