//! What an agent printed and how it ended, however it ran (a child process, a command
//! over SSH): its events on stdout, the tail of its output, its exit — bounded, for an
//! agent (or a host speaking for it) may print anything.

use haul_protocol::agent::{
    AgentEvent, AgentExit, AgentSummary, ErrorCode, ErrorEvent, WarningEvent,
};
use std::collections::VecDeque;

/// Lines of agent output kept for the run record.
pub(crate) const TAIL_LINES: usize = 20;
/// Longest line of the tail kept in a record: records stay in the daemon's memory and
/// in every feed, whatever a host prints.
const TAIL_LINE: usize = 300;
/// Warnings kept whole for the report; the rest are counted. An agent (or a host
/// speaking for it) may print any number: the pbs's memory must not follow.
const KEPT_WARNINGS: usize = 100;
/// Longest line of agent output kept; longer ones are cut.
const MAX_LINE: usize = 64 * 1024;

/// What the agent did, as seen from this side.
pub struct AgentRun {
    /// The exit code (`None`: killed by a signal): the agent's, or over SSH the
    /// wrapper's when it did not start the agent (`WrapperExit`).
    pub exit: Option<i32>,
    /// Its last `summary` event, if it printed one: the agent's own account.
    pub summary: Option<AgentSummary>,
    /// Its first [`KEPT_WARNINGS`] warnings.
    pub warnings: Vec<WarningEvent>,
    /// How many warnings it printed in all.
    pub warnings_total: u64,
    /// Its `error` event's message, else the last line of its stderr.
    pub error: Option<String>,
    /// Its `error` event's code, if it printed one.
    pub error_code: Option<ErrorCode>,
    pub tail: Vec<String>,
    /// Connections the server accepted during the run.
    pub connections: u64,
    pub agent_peak_rss_kib: u64,
    /// The connection to its host went away before it ended.
    pub cut: bool,
}

/// Collects what an agent prints (JSON events on stdout, lines on stderr), however it
/// runs: as a child process or over SSH.
#[derive(Default)]
pub struct AgentOutput {
    summary: Option<AgentSummary>,
    warnings: Vec<WarningEvent>,
    warnings_total: u64,
    error: Option<ErrorEvent>,
    tail: VecDeque<String>,
    last_stderr: Option<String>,
}

impl AgentOutput {
    fn keep(&mut self, line: String) {
        let line = crate::pipeline::cut_to(line, TAIL_LINE);
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// One line of the agent's stdout: an event is noted (a summary, a warning, an
    /// error) and handed to `progress`; any other line is kept in the tail. Events are
    /// not kept in the tail: the record has what they say, from the server where it
    /// counts, and the agent's words stay out of feeds.
    pub fn stdout_line(&mut self, line: &str, progress: &(dyn Fn(&AgentEvent) + Sync)) {
        let Ok(event) = AgentEvent::from_line(line) else {
            self.keep(line.to_string());
            return;
        };
        match &event {
            AgentEvent::Progress(_) => {}
            AgentEvent::Summary(s) => self.summary = Some(s.clone()),
            AgentEvent::Warning(w) => {
                self.warnings_total += 1;
                if self.warnings.len() < KEPT_WARNINGS {
                    self.warnings.push(w.clone());
                }
            }
            AgentEvent::Error(e) => self.error = Some(e.clone()),
        }
        progress(&event);
    }

    pub fn stderr_line(&mut self, line: &str) {
        tracing::debug!("agent: {line}");
        self.keep(format!("stderr: {line}"));
        self.last_stderr = Some(line.to_string());
    }

    /// The agent ended with `exit` (`None`: no exit status; `how` says what happened).
    pub fn finish(self, exit: Option<i32>, how: &str) -> AgentRun {
        let succeeded = exit
            .and_then(AgentExit::from_code)
            .is_some_and(AgentExit::succeeded);
        let error_code = self.error.as_ref().map(|e| e.code);
        let error = self.error.map(|e| e.message).or_else(|| {
            (!succeeded).then(|| {
                self.last_stderr
                    .clone()
                    .unwrap_or_else(|| format!("the agent ended with {how}"))
            })
        });
        AgentRun {
            exit,
            agent_peak_rss_kib: match &self.summary {
                Some(AgentSummary::Backup(s)) => s.peak_rss_kib,
                Some(AgentSummary::Restore(s)) => s.peak_rss_kib,
                None => 0,
            },
            summary: self.summary,
            warnings: self.warnings,
            warnings_total: self.warnings_total,
            error,
            error_code,
            tail: self.tail.into_iter().collect(),
            connections: 0,
            cut: false,
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
        assert_eq!(run.warnings[0].path, "/f0");
    }

    #[test]
    fn the_tail_a_record_keeps_is_bounded_however_much_a_host_prints() {
        let mut out = AgentOutput::default();
        for i in 0..100 {
            out.stderr_line(&format!("{i} {}", "é".repeat(10_000)));
        }
        out.stdout_line("not an event", &|_| {});
        let run = out.finish(Some(1), "exit status 1");
        assert_eq!(run.tail.len(), TAIL_LINES);
        assert_eq!(run.tail.last().unwrap(), "not an event");
        assert!(
            run.tail[0].starts_with("stderr: 81 "),
            "{}",
            &run.tail[0][..20]
        );
        assert!(run.tail.iter().all(|l| l.len() <= TAIL_LINE + 3));
    }
}
