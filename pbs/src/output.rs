//! Output: human lines or JSON lines, and a progress line that only appears on a
//! terminal.

use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::time::Duration;

/// Prints one JSON object on its own line.
pub fn json_line<T: Serialize>(value: &T) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, value);
    let _ = out.write_all(b"\n");
}

/// Bytes for people: `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A line redrawn on stderr while a long operation runs, if stderr is a terminal.
pub struct Progress {
    _ticker: Option<haul_protocol::Ticker>,
}

impl Progress {
    /// `line` is called about five times a second to produce the text.
    pub fn start(enabled: bool, line: impl Fn() -> String + Send + 'static) -> Progress {
        if !enabled || !std::io::stderr().is_terminal() {
            return Progress { _ticker: None };
        }
        eprint!("\r\x1b[K{}", line());
        let ticker = haul_protocol::Ticker::start(
            Duration::from_millis(200),
            move || eprint!("\r\x1b[K{}", line()),
            || eprint!("\r\x1b[K"),
        );
        Progress {
            _ticker: Some(ticker),
        }
    }
}
