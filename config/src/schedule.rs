//! When the daemon runs a host: an interval with jitter (`"6h"`) or a cron expression
//! (`"0 */6 * * *"`, in the server's local time); and durations such as alert windows.

use chrono::{DateTime, Local, Utc};
use std::str::FromStr;
use std::time::Duration;

/// A host's schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Every so long after the previous run started, plus a jitter of up to a tenth of
    /// the interval (at most 15 minutes), so that hosts with the same interval spread.
    Every(Duration),
    /// At the times a five-field cron expression names (minute hour day month weekday).
    Cron {
        expression: String,
        schedule: Box<cron::Schedule>,
    },
}

/// The longest jitter added to an interval.
const MAX_JITTER: Duration = Duration::from_secs(15 * 60);

impl Schedule {
    /// Parses `"30m"`, `"6h"`, `"1d"` (also `"1h 30m"`) or a five-field cron expression.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let text = text.trim();
        if let Ok(d) = parse_duration(text) {
            if d < Duration::from_secs(1) {
                return Err(format!("{text:?} is shorter than a second"));
            }
            return Ok(Schedule::Every(d));
        }
        let fields = text.split_whitespace().count();
        if fields == 5 {
            // The cron crate wants seconds first.
            match cron::Schedule::from_str(&format!("0 {text}")) {
                Ok(s) => {
                    return Ok(Schedule::Cron {
                        expression: text.to_string(),
                        schedule: Box::new(s),
                    })
                }
                Err(e) => return Err(format!("{text:?} is not a valid cron expression: {e}")),
            }
        }
        Err(format!(
            "{text:?} is not a schedule; use an interval like \"30m\" or \"6h\", or a cron expression like \"0 */6 * * *\""
        ))
    }

    /// The next start after a run that started at `last` (none: the host has never
    /// run). `jitter` is from 0 to 1 (a random draw, or a host's fixed one).
    pub fn next_after(
        &self,
        last: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        jitter: f64,
    ) -> DateTime<Utc> {
        match self {
            Schedule::Every(every) => {
                let spread = (*every / 10)
                    .min(MAX_JITTER)
                    .mul_f64(jitter.clamp(0.0, 1.0));
                // Saturating: an interval parsed from the configuration may be too long
                // to add to a date (`"584542046090y"`), which means never, not a panic.
                let next = match last {
                    Some(last) => {
                        last.checked_add_signed(chrono_duration(every.saturating_add(spread)))
                    }
                    // Never run: soon, spread over the jitter so a fleet does not start at once.
                    None => now.checked_add_signed(chrono_duration(spread)),
                };
                next.unwrap_or(DateTime::<Utc>::MAX_UTC)
            }
            Schedule::Cron { schedule, .. } => {
                let from = last.unwrap_or(now).max(now - chrono::Duration::seconds(1));
                schedule
                    .after(&from.with_timezone(&Local))
                    .next()
                    .map(|t| t.with_timezone(&Utc))
                    // An expression that never fires again (a past year): never.
                    .unwrap_or(DateTime::<Utc>::MAX_UTC)
            }
        }
    }

    /// The longest expected gap between two runs (for the default alert window).
    pub fn period(&self) -> Duration {
        match self {
            Schedule::Every(d) => *d,
            Schedule::Cron { schedule, .. } => {
                let mut times = schedule.upcoming(Utc).take(2);
                match (times.next(), times.next()) {
                    (Some(a), Some(b)) => (b - a).to_std().unwrap_or(Duration::from_secs(86_400)),
                    _ => Duration::from_secs(86_400),
                }
            }
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Every(d) => write!(f, "every {}", humantime::format_duration(*d)),
            Schedule::Cron { expression, .. } => write!(f, "cron {expression}"),
        }
    }
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// Parses a duration: `"26h"`, `"30m"`, `"1d"`, `"1h 30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|_| format!("{text:?} is not a duration; use e.g. \"30m\", \"26h\" or \"7d\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn intervals_and_cron_expressions_parse_and_anything_else_is_named() {
        assert!(
            matches!(Schedule::parse("6h"), Ok(Schedule::Every(d)) if d == Duration::from_secs(6 * 3600))
        );
        assert!(
            matches!(Schedule::parse("1h 30m"), Ok(Schedule::Every(d)) if d == Duration::from_secs(5400))
        );
        assert!(matches!(
            Schedule::parse("0 */6 * * *"),
            Ok(Schedule::Cron { .. })
        ));
        let e = Schedule::parse("every 5 min").unwrap_err();
        assert_eq!(
            e,
            "\"every 5 min\" is not a schedule; use an interval like \"30m\" or \"6h\", or a cron expression like \"0 */6 * * *\""
        );
        assert!(Schedule::parse("61 * * * *")
            .unwrap_err()
            .contains("not a valid cron expression"));
        assert!(Schedule::parse("0s")
            .unwrap_err()
            .contains("shorter than a second"));
    }

    #[test]
    fn the_next_run_follows_the_last_one_with_bounded_jitter() {
        let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 12, 0, 0).unwrap();
        let s = Schedule::parse("6h").unwrap();
        assert_eq!(
            s.next_after(Some(t0), t0, 0.0),
            t0 + chrono::Duration::hours(6)
        );
        // A tenth of 6 h is 36 min, capped at 15.
        assert_eq!(
            s.next_after(Some(t0), t0, 1.0),
            t0 + chrono::Duration::hours(6) + chrono::Duration::minutes(15)
        );
        let s = Schedule::parse("30m").unwrap();
        assert_eq!(
            s.next_after(Some(t0), t0, 1.0),
            t0 + chrono::Duration::minutes(33)
        );
        // Never run: within the jitter from now.
        assert!(s.next_after(None, t0, 0.5) <= t0 + chrono::Duration::minutes(3));
    }

    /// Found by the configuration's robustness test (`hostile_configurations_...` in
    /// lib.rs): an interval that parses but is too long to add to a date panicked
    /// (`Duration` overflow, or `DateTime` overflow) when the daemon computed the next run.
    #[test]
    fn an_interval_too_long_to_add_to_a_date_means_never() {
        let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 12, 0, 0).unwrap();
        for text in ["18446744073709551615s", "584542046090y", "300000y"] {
            let s = Schedule::parse(text).unwrap();
            assert_eq!(
                s.next_after(Some(t0), t0, 1.0),
                DateTime::<Utc>::MAX_UTC,
                "{text}"
            );
            assert!(s.next_after(None, t0, 1.0) <= t0 + chrono::Duration::minutes(15));
        }
    }

    #[test]
    fn cron_fires_at_the_next_matching_minute() {
        let s = Schedule::parse("*/10 * * * *").unwrap();
        let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 12, 3, 0).unwrap();
        assert_eq!(
            s.next_after(None, t0, 0.0),
            Utc.with_ymd_and_hms(2026, 11, 1, 12, 10, 0).unwrap()
        );
        assert_eq!(s.period(), Duration::from_secs(600));
    }
}
