//! The wrapper's policy file and `Policy::admit` (wrapper/src/policy.rs), which turns
//! `SSH_ORIGINAL_COMMAND` into the agent's arguments. The input is a policy and a
//! command separated by a NUL (without one, or when the policy is refused, the whole
//! input is a command under a fixed policy). What is admitted is rebuilt arguments:
//! quoted again and admitted again, they must come back unchanged, and the socket must
//! be in the policy's socket directory.
#![no_main]

// The wrapper is a binary crate; its policy module (pure: no I/O but `confine`) is
// compiled in here as it is.
#[allow(dead_code)]
#[path = "../../wrapper/src/policy.rs"]
mod policy;

use haul_fuzz::split_pair_input;
use libfuzzer_sys::fuzz_target;
use policy::Policy;
use std::path::Path;

const POLICY: &str = r#"
agent = "/usr/local/bin/haul-agent"
socket_dir = "/run/haul"
backup_roots = ["/srv", "/etc"]
restore_targets = ["/var/restore"]
"#;

fuzz_target!(|data: &[u8]| {
    let (policy, command) = split_pair_input(data);
    let policy = policy
        .and_then(|p| std::str::from_utf8(p).ok())
        .and_then(|p| Policy::parse(p, "wrapper.toml").ok())
        .unwrap_or_else(|| Policy::parse(POLICY, "wrapper.toml").unwrap());
    let Ok(command) = std::str::from_utf8(command) else {
        return;
    };
    let Ok(args) = policy.admit(command) else {
        return;
    };
    assert!(args[0] == "backup" || args[0] == "restore", "{args:?}");
    let socket = &args[args.iter().position(|a| a == "--socket").unwrap() + 1];
    assert_eq!(
        Path::new(socket).parent(),
        Some(policy.socket_dir.as_path())
    );
    let mut words = vec!["haul-agent"];
    words.extend(args.iter().map(String::as_str));
    let again = haul_protocol::command::join(&words);
    // Quoting can lengthen a command past the wrapper's limit (64 KiB).
    if again.len() <= 60 * 1024 {
        assert_eq!(policy.admit(&again), Ok(args));
    }
});
