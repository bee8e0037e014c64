//! Where things are in a TOML text, so that every error names the line, the column
//! and the key path (`host[2].schedule`): the path of a position (for the TOML
//! parser's own errors, which carry a span) and the position of a path (for the
//! checks made after parsing).

use toml::de::{DeTable, DeValue};

/// One step of a key path.
#[derive(Debug, Clone, Copy)]
pub enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// Renders a key path: `host[2].schedule`.
pub fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// 1-based line and column of byte offset `at`.
pub fn line_col(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The byte offset of the value at `path`; where the path ends early (a key that is
/// missing), of the deepest part that exists.
pub fn offset_of(text: &str, path: &[Seg]) -> Option<usize> {
    let doc = DeTable::parse(text).ok()?;
    let mut table: Option<&DeTable> = Some(doc.get_ref());
    let mut value: Option<&DeValue> = None;
    let mut at = None;
    for seg in path {
        match (*seg, table, value) {
            (Seg::Key(k), Some(t), _) => {
                let Some((key, v)) = t.iter().find(|(key, _)| key.get_ref().as_ref() == k) else {
                    break;
                };
                // The key of a `[[table]]` or `[table]` has no useful value span.
                at = Some(
                    if matches!(v.get_ref(), DeValue::Table(_) | DeValue::Array(_)) {
                        key.span().start
                    } else {
                        v.span().start
                    },
                );
                value = Some(v.get_ref());
                table = match v.get_ref() {
                    DeValue::Table(t) => Some(t),
                    _ => None,
                };
            }
            (Seg::Index(i), _, Some(DeValue::Array(a))) => {
                let Some(item) = a.get(i) else { break };
                if let DeValue::Table(t) = item.get_ref() {
                    // A `[[host]]` item: its first key is the best place to point at.
                    at = t
                        .iter()
                        .map(|(k, _)| k.span().start)
                        .min()
                        .or(Some(item.span().start));
                    table = Some(t);
                } else {
                    at = Some(item.span().start);
                    table = None;
                }
                value = Some(item.get_ref());
            }
            _ => break,
        }
    }
    at
}

/// The key path at byte offset `at` (where the TOML parser found a problem).
pub fn path_at(text: &str, at: usize) -> Option<String> {
    let doc = DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    in_table(doc.get_ref(), at, &mut path);
    (!path.is_empty()).then(|| path.join(""))
}

/// Descends into the key of `t` whose key, value or contents hold `at`. (The span of a
/// `[table]` or `[[table]]` value covers only its header, so contents are searched.)
fn in_table(t: &DeTable, at: usize, path: &mut Vec<String>) -> bool {
    for (k, v) in t.iter() {
        if k.span().contains(&at) || v.span().contains(&at) || holds(v.get_ref(), at) {
            let dot = if path.is_empty() { "" } else { "." };
            path.push(format!("{dot}{}", k.get_ref()));
            in_value(v.get_ref(), at, path);
            return true;
        }
    }
    false
}

/// Whether `at` falls on a key or value inside `v`.
fn holds(v: &DeValue, at: usize) -> bool {
    match v {
        DeValue::Table(t) => t.iter().any(|(k, v)| {
            k.span().contains(&at) || v.span().contains(&at) || holds(v.get_ref(), at)
        }),
        DeValue::Array(a) => a
            .iter()
            .any(|i| i.span().contains(&at) || holds(i.get_ref(), at)),
        _ => false,
    }
}

fn in_value(v: &DeValue, at: usize, path: &mut Vec<String>) {
    match v {
        DeValue::Table(t) => {
            in_table(t, at, path);
        }
        DeValue::Array(a) => {
            if let Some((i, item)) = a
                .iter()
                .enumerate()
                .find(|(_, i)| i.span().contains(&at) || holds(i.get_ref(), at))
            {
                path.push(format!("[{i}]"));
                in_value(item.get_ref(), at, path);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "[server]\nmax_concurrent = 2\n\n[[host]]\nname = \"a\"\npaths = [\"/srv\"]\n\n[[host]]\nname = \"b\"\nschedule = \"every 5 min\"\n";

    #[test]
    fn paths_and_positions_find_each_other() {
        let at = offset_of(
            DOC,
            &[Seg::Key("host"), Seg::Index(1), Seg::Key("schedule")],
        )
        .unwrap();
        assert_eq!(line_col(DOC, at), (10, 12));
        assert_eq!(path_at(DOC, at).unwrap(), "host[1].schedule");
        let at = offset_of(DOC, &[Seg::Key("server"), Seg::Key("max_concurrent")]).unwrap();
        assert_eq!(line_col(DOC, at), (2, 18));
        assert_eq!(path_at(DOC, at).unwrap(), "server.max_concurrent");
        // A missing key points at its table.
        let at = offset_of(DOC, &[Seg::Key("host"), Seg::Index(1), Seg::Key("paths")]).unwrap();
        assert_eq!(line_col(DOC, at).0, 9);
        assert_eq!(
            render(&[Seg::Key("host"), Seg::Index(1), Seg::Key("paths")]),
            "host[1].paths"
        );
    }
}
