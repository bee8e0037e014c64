//! RSS 2.0 feeds of the run history (records in, XML out), written with the `rss`
//! crate: one item per run, newest first, the newest [`ITEMS`] kept. Monitors made for
//! the system haul replaces look for the status word in the newest item, so titles
//! carry it in capitals (`OK`, `WARNING`, `FAILED`) and descriptions begin with it.

use crate::error::CliError;
use crate::output::bytes;
use crate::record::{Details, RunRecord};
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
        .take(o.items)
        .map(item)
        .collect();
    let title = match host {
        Some(h) => format!("{}: {h}", o.title),
        None => format!("{}: all hosts", o.title),
    };
    ChannelBuilder::default()
        .title(title)
        .link(o.link.clone())
        .description("Backup runs of the haul backup server, newest first")
        .items(items)
        .build()
        .to_string()
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
        (None, None, Some(Details::CloneAlert(d))) => format!("clone {}", d.clone),
        (None, None, None) => format!("{secs:.0} s"),
    }
}

fn item(r: &RunRecord) -> rss::Item {
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
    let mut description = format!(
        "{} — {} of {} ({}), {} to {}, {secs:.1} s.\n",
        r.status.shout(),
        r.kind,
        r.host,
        r.transport.word(),
        r.start.to_rfc3339(),
        r.end.to_rfc3339()
    );
    if let Some(c) = &r.counters {
        description.push_str(&format!(
            "Files: {} new, {} changed, {} unchanged; {} read, {} new, {} received; {} warnings.\n",
            c.files_new,
            c.files_changed,
            c.files_unchanged,
            bytes(c.bytes_read),
            bytes(c.bytes_new),
            bytes(c.bytes_received),
            c.warnings
        ));
    }
    if let Some(s) = &r.snapshot {
        description.push_str(&format!("Snapshot: {s}\n"));
    }
    if let Some(e) = &r.error {
        description.push_str(&format!("Error: {e}\n"));
    }
    if !r.output_tail.is_empty() {
        description.push_str("Output:\n");
        for l in r.output_tail.iter().rev().take(10).rev() {
            description.push_str(l);
            description.push('\n');
        }
    }
    ItemBuilder::default()
        .title(title)
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
        assert!(d.starts_with("WARNING"), "{d}");
        assert!(d.contains("<b>&amp;</b> ]]> done"), "{d}");
        assert_eq!(item.guid().unwrap().value(), "r1");
        assert!(!item.guid().unwrap().is_permalink());
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(group_thousands(1203), "1,203");
        assert_eq!(group_thousands(12), "12");
        assert_eq!(group_thousands(1_000_000), "1,000,000");
    }
}
