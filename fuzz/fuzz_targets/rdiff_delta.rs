//! The librsync delta applier (rdiff/src/content.rs `apply`), fed `.diff` increments of
//! the legacy repository. The input is a base and a delta (see `delta_input`). What it
//! accepts, fast_rsync (the reference the tests compare with) must apply to the same
//! result. No memory bound: copies may legitimately repeat the base many times.
#![no_main]

use haul_fuzz::split_delta_input;
use haul_rdiff::content::{apply, Content};
use libfuzzer_sys::fuzz_target;
use std::io::Read;

fuzz_target!(|data: &[u8]| {
    let Some((base, delta)) = split_delta_input(data) else {
        return;
    };
    let Ok(out) = apply(&Content::Bytes(base.to_vec()), delta) else {
        return;
    };
    let mut ours = Vec::new();
    out.reader().read_to_end(&mut ours).unwrap();
    assert_eq!(ours.len() as u64, out.len());
    let mut theirs = Vec::new();
    fast_rsync::apply(base, delta, &mut theirs).expect("fast_rsync refuses a delta we applied");
    assert_eq!(ours, theirs);
});
