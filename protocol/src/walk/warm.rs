//! Warming the inode cache ahead of the walker.
//!
//! A cold backup of many small files is mostly the walker waiting for the disk, one
//! `lstat` at a time. Threads that stat what the walker will reach soon, in parallel,
//! let its own calls find the inodes in memory. They must be ahead of the walker in
//! the order it goes: depth first, each directory's entries by name.
//!
//! - A directory's subdirectories, once listed, are warmed whole (each a job), in the
//!   order the walk takes them, before anything warmed earlier: the walk descends
//!   into them first.
//! - A directory too large to be warmed whole ahead of the walker (a single directory
//!   of millions of files has no subdirectory to be warmed by) is warmed a batch of
//!   names at a time, a batch ahead of the walker.
//!
//! Jobs wait in a bounded stack; past its bound the farthest are dropped (warming is a
//! hint: nothing is lost but time).

use std::collections::VecDeque;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

/// Threads warming the inode cache ahead of the walker.
pub(super) const THREADS: usize = 4;
/// Jobs handed to the threads at a time: few, so that what the walk needs next goes
/// first, not what was queued long ago.
const QUEUE: usize = THREADS * 2;
/// Jobs waiting at most (a path each: a few MiB).
pub(super) const PENDING: usize = 65_536;
/// Names of a large directory warmed in one job, and a directory's entries from which
/// it is warmed by such batches.
pub(super) const BATCH: usize = 1_024;

/// What a warming thread stats.
pub(super) enum Warm {
    /// Every entry of a directory (listed by the thread itself).
    Dir(PathBuf),
    /// These entries of a directory.
    Names(Arc<PathBuf>, Vec<Vec<u8>>),
}

/// The walker's side: jobs in the order it wants them warmed.
pub(super) struct Warmer {
    tx: mpsc::SyncSender<Warm>,
    pending: VecDeque<Warm>,
}

impl Warmer {
    /// The warmer and the queue its threads ([`run`]) take jobs from.
    pub(super) fn new() -> (Warmer, Mutex<mpsc::Receiver<Warm>>) {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let warmer = Warmer {
            tx,
            pending: VecDeque::new(),
        };
        (warmer, Mutex::new(rx))
    }

    /// Jobs the walk needs before anything pending, in the order it needs them.
    pub(super) fn first(&mut self, jobs: impl DoubleEndedIterator<Item = Warm>) {
        for job in jobs.rev() {
            self.pending.push_front(job);
        }
        self.pending.truncate(PENDING);
        self.feed();
    }

    /// Hands the threads what they have room for.
    pub(super) fn feed(&mut self) {
        while let Some(job) = self.pending.pop_front() {
            match self.tx.try_send(job) {
                Ok(()) => {}
                Err(mpsc::TrySendError::Full(job)) => {
                    self.pending.push_front(job);
                    return;
                }
                Err(mpsc::TrySendError::Disconnected(_)) => {
                    self.pending.clear();
                    return;
                }
            }
        }
    }
}

/// A warming thread: stats what it is given until the walker is done.
pub(super) fn run(queue: &Mutex<mpsc::Receiver<Warm>>) {
    loop {
        let job = match queue.lock().expect("warm queue").recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        match job {
            Warm::Dir(dir) => {
                if let Ok(rd) = fs::read_dir(&dir) {
                    for e in rd.flatten() {
                        // Relative to the directory (fstatat): no walk of the path.
                        let _ = e.metadata();
                    }
                }
            }
            Warm::Names(dir, names) => {
                for name in names {
                    let _ = fs::symlink_metadata(dir.join(std::ffi::OsStr::from_bytes(&name)));
                }
            }
        }
    }
}
