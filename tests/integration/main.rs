//! haul's integration tests: one binary, one module per area. Put a new test in the
//! module of the area it covers; add a module here when a new area arrives (ingest
//! server, SSH pull, daemon and feed, rdiff-backup import).
//!
//! These tests run the real `haul-pbs` binary on real files in temporary directories;
//! build the binaries first (`cargo build --workspace --bins`, as scripts/test.sh does).

mod check;
mod compare;
mod copy;
mod daemon;
mod dedup;
mod faults;
mod forget;
mod hostile;
mod import;
mod ingest;
mod keys;
mod locks;
mod many_files;
mod mount;
mod notify;
mod object_store;
mod pipeline;
mod prune;
mod pull;
mod push;
mod repair;
mod roundtrip;
mod ssh;
