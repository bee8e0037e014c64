//! rdiff-backup metadata (rdiff/src/meta.rs): `mirror_metadata` records, extended
//! attribute and ACL snapshots, read from the legacy repository being imported. The
//! first byte picks the parser.
#![no_main]

use haul_fuzz::bounded;
use haul_rdiff::meta;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, text)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let Ok(records) = bounded(text.len(), 64, "parse_records", || {
                meta::parse_records(text, "mirror_metadata")
            }) else {
                return;
            };
            let files = text
                .split(|b| *b == b'\n')
                .filter(|l| l.starts_with(b"File "))
                .count();
            assert_eq!(records.len(), files);
            let mut tree = meta::Tree::new();
            for r in &records {
                let _ = r.display();
            }
            meta::apply_diff(&mut tree, records);
        }
        1 => {
            if let Ok(x) = bounded(text.len(), 64, "parse_xattrs", || {
                meta::parse_xattrs(text, "extended_attributes")
            }) {
                for attrs in x.values() {
                    assert!(attrs.windows(2).all(|w| w[0].0 < w[1].0), "{attrs:?}");
                }
            }
        }
        _ => {
            if let Ok(x) = bounded(text.len(), 64, "parse_acls", || {
                meta::parse_acls(text, "access_control_lists")
            }) {
                for (_, value) in x.values().flatten() {
                    assert_eq!(value.len() % 8, 4, "{value:?}");
                }
            }
        }
    }
});
