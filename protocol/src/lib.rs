//! What the haul agent and the haul repository agree on.
//!
//! The agent on a source host must never link crypto or pack code (a compromised
//! source host holds no key), yet it and the repository must agree byte for byte on
//! ids, trees and chunk boundaries. This crate is that agreement, plus the two pieces
//! of filesystem work both sides do:
//!
//! - [`id`]: BLAKE3 ids as newtypes.
//! - [`tree`]: the canonical directory encoding.
//! - [`chunker`]: FastCDC chunking and per-chunk zstd encoding.
//! - [`walk`]: the backup walker with change detection, feeding a [`walk::Sink`].
//! - [`restore`]: the restorer, fed by a [`restore::BlobSource`].
//! - [`standby`]: standby copies a clone host keeps, replaced in one step push after push.
//! - [`meta`]: reading and applying file metadata.
//! - [`wire`]: the HTTP protocol between the agent and the repository server.
//! - [`agent`]: the agent's command line, run parameters, output events and exit
//!   codes, which the pbs, the agent and the wrapper share.
//! - [`command`]: the quoting of a command line into an SSH exec request.

pub mod agent;
pub mod chunker;
pub mod command;
pub mod id;
pub mod in_place;
pub mod meta;
pub mod restore;
pub mod standby;
pub mod tree;
pub mod walk;

pub use id::{BlobKind, BlobRef, ChunkId, PackId, SnapshotId, TreeId};
pub mod wire;

/// This machine's host name (what a snapshot records by default).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// This process's peak resident memory in KiB, as both sides report it in run records:
/// `VmHWM`, the high-water mark of this program's own memory. (`getrusage`'s
/// `ru_maxrss` would include the memory of the process that started this one, up to
/// the `exec`.)
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Calls a function at a fixed period on a thread of its own, until dropped. Dropping
/// it stops the thread at once: a process at its end does not wait out the period (a
/// progress thread that slept its 200 ms before it looked at a stop flag held every
/// backup up by 100 ms on average, between its last upload and its commit).
pub struct Ticker {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    /// Calls `tick` every `period`, then `last` once when dropped.
    pub fn start(
        period: std::time::Duration,
        mut tick: impl FnMut() + Send + 'static,
        last: impl FnOnce() + Send + 'static,
    ) -> Ticker {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // Nothing is ever sent: the channel closes when the ticker is dropped.
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(period)
            {
                tick();
            }
            last();
        });
        Ticker {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn a_ticker_ticks_and_stops_at_once_when_dropped() {
        let (ticks, lasts) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let (t, l) = (ticks.clone(), lasts.clone());
        let ticker = Ticker::start(
            Duration::from_millis(20),
            move || {
                t.fetch_add(1, Relaxed);
            },
            move || {
                l.fetch_add(1, Relaxed);
            },
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while ticks.load(Relaxed) < 3 {
            assert!(Instant::now() < deadline, "no ticks");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(ticker);
        assert_eq!(lasts.load(Relaxed), 1);

        // With a period far longer than the test, the drop does not wait for it.
        let started = Instant::now();
        drop(Ticker::start(Duration::from_secs(3600), || {}, || {}));
        assert!(started.elapsed() < Duration::from_secs(60));
    }
}
