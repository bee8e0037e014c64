//! Fetching blobs ahead of their use, in batches, so that a walk over thousands of
//! directories or a restore of thousands of small files is not one round trip per
//! blob.
//!
//! The user hints which blobs it will need, in the order it will need them (the
//! subtrees of a tree just read; the chunks of a file just queued for writing);
//! background tasks ask the server for them many at a time (`POST .../trees` or
//! `.../chunks`, answered with frames) and keep what arrives until it is taken. What
//! is held is bounded by a byte budget: when it is spent, fetching pauses until blobs
//! are taken.
//!
//! [`Prefetcher::take`] never waits for a blob that has not been asked for yet: it
//! withdraws the hint and the caller fetches the blob itself. So a hint that is never
//! used (a directory excluded after all) cannot make anyone wait, and a consumer that
//! runs ahead of the fetcher is slowed by at most one round trip.

use crate::client::Client;
use crate::failure::Failure;
use haul_protocol::agent::ErrorCode;
use haul_protocol::wire;
use haul_protocol::{BlobKind, BlobRef};
use hyper::Method;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

/// Most refs in one batch request.
const BATCH: usize = 512;

pub struct Prefetcher {
    client: Arc<Client>,
    path: &'static str,
    kind: BlobKind,
    budget: usize,
    /// Trees only: each tree fetched ahead has its subtrees hinted as it arrives, so a
    /// walk that reads every directory finds the next level on its way, not one round
    /// trip per directory.
    expand: bool,
    st: Mutex<State>,
    arrived: Condvar,
    wake: tokio::sync::Notify,
}

impl State {
    /// Notes the hinted blobs; true if any is to be asked for.
    fn hint(&mut self, ids: impl IntoIterator<Item = [u8; 32]>) -> bool {
        let mut added = false;
        for id in ids {
            let w = self.wanted.entry(id).or_insert(0);
            *w += 1;
            if *w == 1
                && !self.ready.contains_key(&id)
                && !self.requested.contains(&id)
                && self.queued.insert(id)
            {
                self.queue.push_back(id);
                added = true;
            }
        }
        added
    }
}

#[derive(Default)]
struct State {
    /// Hinted, not yet asked for, in order of need. Entries no longer in `queued`
    /// were withdrawn and are skipped.
    queue: VecDeque<[u8; 32]>,
    queued: HashSet<[u8; 32]>,
    /// Asked for, answer pending.
    requested: HashSet<[u8; 32]>,
    /// Uses still expected per blob (a chunk may be in several files).
    wanted: HashMap<[u8; 32], usize>,
    ready: HashMap<[u8; 32], Vec<u8>>,
    bytes: usize,
    failed: Option<Failure>,
    closed: bool,
}

impl Prefetcher {
    /// Starts `tasks` fetching tasks on `rt`.
    pub fn start(
        client: Arc<Client>,
        path: &'static str,
        kind: BlobKind,
        budget: usize,
        tasks: usize,
        expand: bool,
        rt: &tokio::runtime::Handle,
    ) -> Arc<Prefetcher> {
        let p = Arc::new(Prefetcher {
            client,
            path,
            kind,
            budget,
            expand: expand && kind == BlobKind::Tree,
            st: Mutex::new(State::default()),
            arrived: Condvar::new(),
            wake: tokio::sync::Notify::new(),
        });
        for _ in 0..tasks {
            rt.spawn(p.clone().run());
        }
        p
    }

    /// These blobs will be needed, in this order.
    pub fn hint(&self, ids: impl IntoIterator<Item = [u8; 32]>) {
        let added = self.st.lock().expect("prefetch").hint(ids);
        if added {
            self.wake.notify_waiters();
        }
    }

    /// Whether a tree taken from here had its subtrees hinted already (see `expand`).
    pub fn expands(&self) -> bool {
        self.expand
    }

    /// The blob `id` if it was fetched ahead (waiting for it if it is on its way);
    /// `None` if the caller must fetch it itself.
    pub fn take(&self, id: &[u8; 32]) -> Result<Option<Vec<u8>>, Failure> {
        let mut st = self.st.lock().expect("prefetch");
        loop {
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            if st.ready.contains_key(id) {
                let left = {
                    let w = st.wanted.get_mut(id).expect("a ready blob is wanted");
                    *w -= 1;
                    *w
                };
                if left > 0 {
                    return Ok(st.ready.get(id).cloned());
                }
                st.wanted.remove(id);
                let v = st.ready.remove(id).expect("checked");
                let was_full = st.bytes >= self.budget;
                st.bytes -= v.len();
                drop(st);
                if was_full {
                    // Fetching paused for the budget: room again.
                    self.wake.notify_waiters();
                }
                return Ok(Some(v));
            }
            if st.requested.contains(id) {
                st = self.arrived.wait(st).expect("prefetch");
                continue;
            }
            // Hinted and next in line while the fetchers have budget: it will be asked
            // for in its turn, sooner than a request of its own on a long link. (Past
            // the budget the fetchers wait for blobs to be taken: not this one.)
            if st.queued.contains(id) && st.bytes < self.budget && !st.closed {
                st = self.arrived.wait(st).expect("prefetch");
                continue;
            }
            // Not asked for yet (or never hinted): withdraw this use of the hint.
            if let Some(w) = st.wanted.get_mut(id) {
                *w -= 1;
                if *w == 0 {
                    st.wanted.remove(id);
                    st.queued.remove(id);
                }
            }
            return Ok(None);
        }
    }

    /// Stops the fetching tasks.
    pub fn close(&self) {
        self.st.lock().expect("prefetch").closed = true;
        self.wake.notify_waiters();
        self.arrived.notify_all();
    }

    /// Takes the next batch to ask for, unless the budget is spent.
    fn next_batch(&self) -> Option<Vec<[u8; 32]>> {
        let mut st = self.st.lock().expect("prefetch");
        if st.closed || st.failed.is_some() || st.bytes >= self.budget {
            return None;
        }
        let mut batch = Vec::new();
        while batch.len() < BATCH {
            let Some(id) = st.queue.pop_front() else {
                break;
            };
            if st.queued.remove(&id) {
                st.requested.insert(id);
                batch.push(id);
            }
        }
        (!batch.is_empty()).then_some(batch)
    }

    async fn run(self: Arc<Self>) {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let Some(batch) = self.next_batch() else {
                if self.st.lock().expect("prefetch").closed {
                    return;
                }
                notified.await;
                continue;
            };
            let mut body = Vec::with_capacity(batch.len() * wire::REF_LEN);
            for id in &batch {
                wire::encode_ref(
                    &mut body,
                    &BlobRef {
                        kind: self.kind,
                        id: *id,
                    },
                );
            }
            let answer = self
                .client
                .request(Method::POST, self.path, body.into())
                .await
                .map_err(Failure::from)
                .and_then(|bytes| {
                    let frames = wire::decode_frames(&bytes)
                        .map_err(|e| Failure::new(ErrorCode::Protocol, e))?
                        .into_iter()
                        .map(|(r, b)| (r.id, b.to_vec()))
                        .collect::<Vec<_>>();
                    Ok(frames)
                });
            let mut st = self.st.lock().expect("prefetch");
            let mut more = false;
            match answer {
                Ok(frames) if frames.is_empty() => {
                    st.failed = Some(Failure::new(
                        ErrorCode::Protocol,
                        format!(
                            "the server answered none of {} blobs asked for",
                            batch.len()
                        ),
                    ));
                    st.requested.clear();
                }
                Ok(frames) => {
                    for (id, bytes) in frames {
                        if st.requested.remove(&id) && st.wanted.contains_key(&id) {
                            if self.expand {
                                // Checked against its id when it is taken; one that
                                // does not decode has no subtrees to fetch.
                                if let Ok(tree) = haul_protocol::tree::TreeBlob::decode(&bytes) {
                                    more |= st.hint(tree.subtrees().into_iter().map(|t| t.0));
                                }
                            }
                            st.bytes += bytes.len();
                            st.ready.insert(id, bytes);
                        }
                    }
                    // The answer stops at a size limit: the rest goes back in front.
                    for id in batch.iter().rev() {
                        if st.requested.remove(id) && st.wanted.contains_key(id) {
                            st.queued.insert(*id);
                            st.queue.push_front(*id);
                        }
                    }
                }
                Err(e) => {
                    st.failed = Some(e.context("fetching ahead from the server"));
                    st.requested.clear();
                }
            }
            drop(st);
            self.arrived.notify_all();
            if more {
                self.wake.notify_waiters();
            }
        }
    }
}
