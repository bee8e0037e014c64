//! RSS 2.0 feeds of the run history (records in, XML out), written with the `rss`
//! crate: one item per run, newest first, the newest [`ITEMS`] kept. Monitors made for
//! the system haul replaces look for the status word in the newest item, so titles
//! carry it in capitals (`OK`, `WARNING`, `FAILED`) and descriptions begin with it.

use crate::error::CliError;
use crate::output::bytes;
use crate::record::{Details, RunRecord};
use askama::Template;
use rss::{ChannelBuilder, GuidBuilder, ItemBuilder};
use std::io::Write;
use std::path::Path;

/// Items a feed keeps by default: the newest runs.
pub const ITEMS: usize = 50;

/// A feed's title, link and length (`[feed]` in the configuration).
#[derive(Debug, Clone)]
pub struct FeedOptions {
    pub title: String,
    pub link: String,
    pub items: usize,
}

impl Default for FeedOptions {
    fn default() -> Self {
        FeedOptions {
            title: "haul backups".into(),
            link: "http://localhost/".into(),
            items: ITEMS,
        }
    }
}

impl FeedOptions {
    pub fn from_config(c: &haul_config::Config) -> FeedOptions {
        FeedOptions {
            title: c.feed.title.clone(),
            link: c.feed_link(),
            items: c.feed.items,
        }
    }
}

/// The feed of `records` (oldest first), for one host or all.
pub fn render(records: &[RunRecord], host: Option<&str>) -> String {
    render_with(records, host, &FeedOptions::default())
}

/// [`render`] with a title, link and length.
pub fn render_with(records: &[RunRecord], host: Option<&str>, o: &FeedOptions) -> String {
    let items: Vec<rss::Item> = records
        .iter()
        .rev()
        .filter(|r| host.is_none_or(|h| r.host == h))
        .filter(|r| worth_an_item(r))
        .take(o.items)
        .map(|r| item(r, o))
        .collect();
    let title = match host {
        Some(h) => format!("{}: {h}", o.title),
        None => format!("{}: all hosts", o.title),
    };
    let built = records
        .iter()
        .rev()
        .filter(|r| host.is_none_or(|h| r.host == h))
        .map(|r| r.end)
        .max()
        .unwrap_or_else(chrono::Utc::now);
    ChannelBuilder::default()
        .title(title)
        .link(o.link.clone())
        .last_build_date(built.to_rfc2822())
        .description("Backup runs of the haul backup server, newest first")
        .items(items)
        .build()
        .to_string()
}

/// Whether a run gets a feed item: a retention run only when it removed something.
fn worth_an_item(r: &RunRecord) -> bool {
    !matches!(
        (&r.details, r.status, &r.error),
        (Some(Details::Forget(d)), crate::record::RunStatus::Ok, None) if d.removed.is_empty()
    )
}

/// What a run did, in a few words: its error's first line, or its figures.
pub fn summary(r: &RunRecord) -> String {
    let secs = r.seconds();
    match (&r.error, &r.counters, &r.details) {
        (Some(e), _, _) => e
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(160)
            .collect(),
        (None, Some(c), _) => format!(
            "{} files, {} new, {secs:.0} s",
            group_thousands(c.files()),
            bytes(c.bytes_new)
        ),
        (None, None, Some(Details::Forget(d))) => {
            format!("{} snapshots removed, {} kept", d.removed.len(), d.kept)
        }
        (None, None, Some(Details::Import(d))) => format!(
            "{} sessions imported, {} new",
            d.sessions_imported,
            bytes(d.bytes_new)
        ),
        (None, None, Some(Details::Check(d))) => {
            format!("{} snapshots, {} packs checked", d.snapshots, d.packs)
        }
        (None, None, Some(Details::Prune(d))) => crate::output::prune_summary(d),
        (None, None, Some(Details::Push(d))) => crate::output::push_summary(d),
        (None, None, Some(Details::Copy(d))) => d.summary(),
        (None, None, Some(Details::CloneAlert(d))) => format!("clone {}", d.clone),
        (None, None, None) => format!("{secs:.0} s"),
    }
}

/// A feed item's description: HTML, the error once, the output tail without what the
/// error says again and without the agent's JSON events.
#[derive(askama::Template)]
#[template(path = "feed_item.html")]
struct ItemDescription<'a> {
    word: &'a str,
    kind: &'a str,
    host: &'a str,
    transport: &'a str,
    start: String,
    end: String,
    took: String,
    facts: Vec<(&'static str, String)>,
    error: Option<&'a str>,
    output: Vec<&'a str>,
    link: Option<String>,
}

/// The lines of a run's output tail worth showing beside its error: the last 10,
/// less the agent's JSON events and the lines that repeat the error.
fn shown_output(r: &RunRecord) -> Vec<&str> {
    let error = r
        .error
        .as_deref()
        .and_then(|e| e.lines().next())
        .unwrap_or("");
    let lines: Vec<&str> = r
        .output_tail
        .iter()
        .map(String::as_str)
        .filter(|l| {
            let text = l
                .strip_prefix("stderr: ")
                .or_else(|| l.strip_prefix("stdout: "))
                .unwrap_or(l)
                .trim();
            let json =
                text.starts_with('{') && serde_json::from_str::<serde_json::Value>(text).is_ok();
            !json && (error.is_empty() || !text.contains(error))
        })
        .collect();
    lines[lines.len().saturating_sub(10)..].to_vec()
}

/// The address of a run's page on the status server, under the feed's link.
fn run_link(o: &FeedOptions, id: &str) -> Option<String> {
    (!o.link.is_empty()).then(|| format!("{}/runs/{id}", o.link.trim_end_matches('/')))
}

fn item(r: &RunRecord, o: &FeedOptions) -> rss::Item {
    let secs = r.seconds();
    let what = summary(r);
    let title = match &r.details {
        // Said from the clone's side: `off-site: push OK — web-1 8c1f2e3a, …`.
        Some(Details::Push(d)) => format!(
            "{}: {} {} — {} {}, {what}",
            d.clone,
            r.kind,
            r.status.shout(),
            r.host,
            r.short_snapshot()
        ),
        _ => format!("{}: {} {} — {what}", r.host, r.kind, r.status.shout()),
    };
    let link = run_link(o, &r.id);
    let description = ItemDescription {
        word: r.status.shout(),
        kind: r.kind.word(),
        host: &r.host,
        transport: r.transport.word(),
        start: crate::daemon::page::when(r.start),
        end: crate::daemon::page::when(r.end),
        took: format!("{secs:.1} s"),
        // Kind, transport and times are said above.
        facts: crate::daemon::page::run_facts(r)
            .into_iter()
            .filter(|(k, _)| !["Run", "Kind", "Transport", "Started", "Ended", "Took"].contains(k))
            .collect(),
        error: r.error.as_deref(),
        output: shown_output(r),
        link: link.clone(),
    }
    .render()
    .expect("the feed item template renders");
    ItemBuilder::default()
        .title(title)
        .link(link)
        .description(description)
        .guid(
            GuidBuilder::default()
                .value(r.id.clone())
                .permalink(false)
                .build(),
        )
        .pub_date(r.end.to_rfc2822())
        .build()
}

pub fn group_thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Writes `text` to `path` atomically: a temporary file beside it, fsync, rename.
pub fn write_atomically(path: &Path, text: &str) -> Result<(), CliError> {
    let dir = path.parent().expect("a feed path has a directory");
    let err = |e| CliError::Io(format!("feed {}", path.display()), e);
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
    tmp.write_all(text.as_bytes()).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_that_looks_like_markup_survives_the_round_trip() {
        let mut r = crate::history::tests::record("r1", "web-1", crate::record::RunStatus::Warning);
        r.output_tail = vec!["<b>&amp;</b> ]]> done".into()];
        r.error = Some("a ]]> b".into());
        let xml = render(std::slice::from_ref(&r), None);
        let ch = rss::Channel::read_from(xml.as_bytes()).unwrap();
        let item = &ch.items()[0];
        assert!(item
            .title()
            .unwrap()
            .starts_with("web-1: pull WARNING — a ]]> b"));
        let d = item.description().unwrap();
        assert!(d.starts_with("<p><b>WARNING</b> — pull of web-1"), "{d}");
        // The output is text in the HTML, escaped; the error is said once.
        assert!(
            d.contains("<pre>&#60;b&#62;&#38;amp;&#60;/b&#62; ]]&#62; done\n</pre>"),
            "{d}"
        );
        assert_eq!(d.matches("a ]]&#62; b").count(), 1, "{d}");
        assert_eq!(item.link(), Some("http://localhost/runs/r1"));
        assert_eq!(item.guid().unwrap().value(), "r1");
        assert!(!item.guid().unwrap().is_permalink());
    }

    #[test]
    fn a_retention_run_is_an_item_only_when_it_removed_something_and_json_is_not_shown() {
        use crate::record::{Details, ForgetDetails, RunKind, RunStatus};
        let forget = |id: &str, removed: Vec<String>| {
            let mut r = crate::history::tests::record(id, "web-1", RunStatus::Ok);
            r.kind = RunKind::Forget;
            r.counters = None;
            r.details = Some(Details::Forget(ForgetDetails {
                removed,
                kept: 5,
                ..Default::default()
            }));
            r
        };
        let mut failed = crate::history::tests::record("p1", "web-1", RunStatus::Failed);
        failed.error = Some("agent exited with status 2".into());
        failed.output_tail = vec![
            r#"stdout: {"type":"progress","files":3}"#.into(),
            "stderr: haul-agent: cannot read /x".into(),
            "stderr: agent exited with status 2".into(),
        ];
        let records = [
            failed,
            forget("f1", vec![]),
            forget("f2", vec!["aa".into(), "bb".into()]),
        ];
        let ch = rss::Channel::read_from(render(&records, None).as_bytes()).unwrap();
        let titles: Vec<&str> = ch.items().iter().map(|i| i.title().unwrap()).collect();
        assert_eq!(titles.len(), 2, "{titles:?}");
        assert_eq!(titles[0], "web-1: forget OK — 2 snapshots removed, 5 kept");
        let d = ch.items()[1].description().unwrap();
        assert!(
            d.contains("<pre>stderr: haul-agent: cannot read /x\n</pre>"),
            "{d}"
        );
        assert_eq!(d.matches("agent exited with status 2").count(), 1, "{d}");
        assert!(!d.contains("progress"), "{d}");
        assert_eq!(
            ch.last_build_date(),
            Some(records[2].end.to_rfc2822().as_str())
        );
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(group_thousands(1203), "1,203");
        assert_eq!(group_thousands(12), "12");
        assert_eq!(group_thousands(1_000_000), "1,000,000");
    }
}
