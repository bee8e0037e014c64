//! `command::split` (protocol/src/command.rs): the agent's command line as the forced
//! command receives it. Whatever it accepts, `join` must quote back to the same words.
#![no_main]

use haul_protocol::command::{join, split};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(words) = split(text) {
        let refs: Vec<&str> = words.iter().map(String::as_str).collect();
        assert_eq!(split(&join(&refs)).as_ref(), Ok(&words));
    }
});
