//! rdiff-backup names (rdiff/src/names.rs): session timestrings, increment names, and
//! the `chars_to_quote` / `special_escapes` quoting. The first byte picks the parser.
//! A parsed increment name must be its parts joined again; a name quoted and unquoted
//! must come back as it was.
#![no_main]

use haul_fuzz::split_pair_input;
use haul_rdiff::names::{parse_inc, parse_time, IncKind, Quoting};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Some(t) = std::str::from_utf8(rest).ok().and_then(parse_time) {
                assert_eq!(t.raw.as_bytes(), rest);
                // Years 1901 to 2099, give or take a day of offset.
                assert!((-2_200_000_000..4_200_000_000).contains(&t.epoch), "{t:?}");
            }
        }
        1 => {
            if let Some(n) = parse_inc(rest) {
                let kind = match n.kind {
                    IncKind::Snapshot => "snapshot",
                    IncKind::Diff => "diff",
                    IncKind::Missing => "missing",
                    IncKind::Dir => "dir",
                    IncKind::Data => "data",
                };
                let mut name = n.base.clone();
                name.extend_from_slice(format!(".{}.{kind}", n.time.raw).as_bytes());
                if n.gz {
                    name.extend_from_slice(b".gz");
                }
                assert_eq!(name, rest);
            }
        }
        _ => {
            // chars_to_quote NUL special_escapes NUL name
            let (class, rest) = split_pair_input(rest);
            let (escapes, name) = split_pair_input(rest);
            let Ok(q) = Quoting::parse(class.unwrap_or(b"A-Z")) else {
                return;
            };
            let Ok(q) = q.with_special_escapes(escapes.unwrap_or(b"")) else {
                return;
            };
            let _ = q.unquote(name);
            assert_eq!(q.unquote(&q.quote(name)), name);
        }
    }
});
