//! Fetching blobs ahead of their use, in batches, so that a walk over thousands of
//! directories or a restore of thousands of small files is not one round trip per
//! blob.
//!
//! The user hints which blobs it will need, in the order it will need them (the
//! subtrees of a tree just read; the chunks of a file just queued for writing);
//! background tasks ask the server for them many at a time (`POST .../trees` or
//! `.../chunks`, answered with frames) and keep what arrives until it is taken. What
//! is held is bounded by a byte budget: when it is spent, fetching pauses until blobs
//! are taken. On a link with a long round trip the budget grows (to what arrives in
//! two round trips at a high rate, see [`Prefetcher::budget`]): fetching that paused
//! takes a round trip to deliver again.
//!
//! [`Prefetcher::take`] never waits for a blob that has not been asked for yet: it
//! withdraws the hint and the caller fetches the blob itself. So a hint that is never
//! used (a directory excluded after all) cannot make anyone wait, and a consumer that
//! runs ahead of the fetcher is slowed by at most one round trip.

use crate::client::Client;
use crate::failure::Failure;
use haul_protocol::agent::ErrorCode;
use haul_protocol::wire;
use haul_protocol::{BlobKind, BlobRef, ChunkId, TreeId};
use hyper::Method;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

/// The blobs of an answer, by id.
type Frames = Vec<([u8; 32], Vec<u8>)>;

/// Most refs in one batch request.
const BATCH: usize = 512;
/// A batch request closes at about this many bytes of hinted blobs. A whole answer
/// arrives before any of its blobs can be used, and a channel over SSH moves about its
/// window (2 MiB from OpenSSH's sshd) per round trip: requests of about that size, several
/// at once on their own connections, keep a long link busy and the blobs flowing in the
/// order they are needed.
const BATCH_BYTES: usize = 2 << 20;

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
    /// Notes the hinted blobs, of about `each` bytes each; true if any is to be asked
    /// for.
    fn hint(&mut self, ids: impl IntoIterator<Item = [u8; 32]>, each: u32) -> bool {
        let mut added = false;
        for id in ids {
            if self.held.as_ref().is_some_and(|h| h.contains(&TreeId(id))) {
                continue;
            }
            let w = self.wanted.entry(id).or_insert(0);
            *w += 1;
            if *w == 1
                && !self.ready.contains_key(&id)
                && !self.requested.contains_key(&id)
                && self.queued.insert(id)
            {
                self.queue.push_back((id, each));
                added = true;
            }
        }
        added
    }

    /// Takes the answer to `batch`: the blobs that came are ready (a tree's subtrees
    /// hinted if `expand`), those it left out (it stops at a size limit) go back in
    /// front of the queue. True if more is to be asked for.
    fn answered(
        &mut self,
        batch: &[[u8; 32]],
        answer: Result<Frames, Failure>,
        expand: bool,
    ) -> bool {
        let mut more = false;
        match answer {
            Ok(frames) if frames.is_empty() => {
                self.failed = Some(Failure::new(
                    ErrorCode::Protocol,
                    format!(
                        "the server answered none of {} blobs asked for",
                        batch.len()
                    ),
                ));
                self.requested.clear();
            }
            Ok(frames) => {
                for (id, bytes) in frames {
                    self.bases.remove(&id);
                    if self.requested.remove(&id).is_some() && self.wanted.contains_key(&id) {
                        if expand {
                            // Checked against its id when it is taken; one that does not
                            // decode has no subtrees to fetch.
                            if let Ok(tree) = haul_protocol::tree::TreeBlob::decode(&bytes) {
                                more |= self.hint(tree.subtrees().into_iter().map(|t| t.0), 0);
                            }
                        }
                        self.bytes += bytes.len();
                        self.ready.insert(id, bytes);
                    }
                }
                for id in batch.iter().rev() {
                    if let Some(each) = self.requested.remove(id) {
                        if self.wanted.contains_key(id) {
                            self.queued.insert(*id);
                            self.queue.push_front((*id, each));
                        }
                    }
                }
            }
            Err(e) => {
                self.failed = Some(e.context("fetching ahead from the server"));
                self.requested.clear();
            }
        }
        more
    }
}

#[derive(Default)]
struct State {
    /// Hinted, not yet asked for, in order of need. Entries no longer in `queued`
    /// were withdrawn and are skipped.
    queue: VecDeque<([u8; 32], u32)>,
    queued: HashSet<[u8; 32]>,
    /// Asked for, answer pending, with the size hinted.
    requested: HashMap<[u8; 32], u32>,
    /// Uses still expected per blob (a chunk may be in several files).
    wanted: HashMap<[u8; 32], usize>,
    ready: HashMap<[u8; 32], Vec<u8>>,
    bytes: usize,
    failed: Option<Failure>,
    closed: bool,
    /// Trees read from elsewhere: never hinted (see [`Prefetcher::held`]).
    held: Option<Arc<HashSet<TreeId>>>,
    /// The chunk each hinted one may come as a delta against, until it came
    /// ([`Prefetcher::hint_from`]).
    bases: HashMap<[u8; 32], Vec<ChunkId>>,
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

    /// These blobs, of about `each` bytes each (0: unknown), will be needed, in this
    /// order.
    pub fn hint(&self, ids: impl IntoIterator<Item = [u8; 32]>, each: u32) {
        let added = self.st.lock().expect("prefetch").hint(ids, each);
        if added {
            self.wake.notify_waiters();
        }
    }

    /// [`Prefetcher::hint`], each chunk with one the caller holds that it may come as
    /// a delta against (asked for from [`wire::RESTORE_DELTAS`]).
    pub fn hint_from(&self, ids: impl IntoIterator<Item = (ChunkId, Vec<ChunkId>)>, each: u32) {
        let mut st = self.st.lock().expect("prefetch");
        let mut plain = Vec::new();
        for (id, bases) in ids {
            if !bases.is_empty() {
                st.bases.insert(id.0, bases);
            }
            plain.push(id.0);
        }
        let added = st.hint(plain, each);
        drop(st);
        if added {
            self.wake.notify_waiters();
        }
    }

    /// These blobs are read from elsewhere (a standby copy's own trees): hints of them
    /// are ignored, so that neither the user nor the expansion of a fetched tree asks
    /// for them.
    pub fn held(&self, ids: Arc<HashSet<TreeId>>) {
        self.st.lock().expect("prefetch").held = Some(ids);
    }

    /// Bytes held ahead at most: the budget given, or on a long link what arrives in two
    /// round trips at the rate the agent's upload budget is sized for (64 MiB at most).
    fn budget(&self) -> usize {
        match self.client.round_trip() {
            Some(rtt) => self.budget.max(crate::backup::in_flight_budget(rtt)),
            None => self.budget,
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
                let was_full = st.bytes >= self.budget();
                st.bytes -= v.len();
                drop(st);
                if was_full {
                    // Fetching paused for the budget: room again.
                    self.wake.notify_waiters();
                }
                return Ok(Some(v));
            }
            if st.requested.contains_key(id) {
                st = self.arrived.wait(st).expect("prefetch");
                continue;
            }
            // Hinted and next in line while the fetchers have budget: it will be asked
            // for in its turn, sooner than a request of its own on a long link. (Past
            // the budget the fetchers wait for blobs to be taken: not this one.)
            if st.queued.contains(id) && st.bytes < self.budget() && !st.closed {
                st = self.arrived.wait(st).expect("prefetch");
                continue;
            }
            // Not asked for yet (or never hinted): withdraw this use of the hint.
            if let Some(w) = st.wanted.get_mut(id) {
                *w -= 1;
                if *w == 0 {
                    st.wanted.remove(id);
                    st.queued.remove(id);
                    st.bases.remove(id);
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

    /// Takes the next batch to ask for, unless the budget is spent: each blob with the
    /// base it may come as a delta against.
    fn next_batch(&self) -> Option<Vec<([u8; 32], Vec<ChunkId>)>> {
        let mut st = self.st.lock().expect("prefetch");
        if st.closed || st.failed.is_some() || st.bytes >= self.budget() {
            return None;
        }
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        while batch.len() < BATCH && bytes < BATCH_BYTES {
            let Some((id, each)) = st.queue.pop_front() else {
                break;
            };
            if st.queued.remove(&id) {
                st.requested.insert(id, each);
                let bases = st.bases.get(&id).cloned().unwrap_or_default();
                batch.push((id, bases));
                bytes += each as usize;
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
            let mut body = Vec::with_capacity(batch.len() * 2 * wire::REF_LEN);
            for (id, bases) in &batch {
                if self.path == wire::RESTORE_DELTAS {
                    wire::encode_delta_ask(&mut body, &ChunkId(*id), bases);
                } else {
                    wire::encode_ref(
                        &mut body,
                        &BlobRef {
                            kind: self.kind,
                            id: *id,
                        },
                    );
                }
            }
            let batch: Vec<[u8; 32]> = batch.into_iter().map(|(id, _)| id).collect();
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
            let more = self
                .st
                .lock()
                .expect("prefetch")
                .answered(&batch, answer, self.expand);
            self.arrived.notify_all();
            if more {
                self.wake.notify_waiters();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefetcher() -> Prefetcher {
        Prefetcher {
            client: Arc::new(Client::new("/nonexistent".into())),
            path: "/v1/restore/chunks",
            kind: BlobKind::Data,
            budget: 16 << 20,
            expand: false,
            st: Mutex::new(State::default()),
            arrived: Condvar::new(),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn ids(batch: Option<Vec<([u8; 32], Vec<ChunkId>)>>) -> Option<Vec<[u8; 32]>> {
        batch.map(|b| b.into_iter().map(|(id, _)| id).collect())
    }

    fn id(n: u32) -> [u8; 32] {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&n.to_le_bytes());
        id
    }

    #[test]
    fn a_batch_closes_at_its_byte_size_or_its_count() {
        let p = prefetcher();
        // Chunks of 1 MiB: two to a request, in the order hinted.
        p.hint((0..5).map(id), 1 << 20);
        assert_eq!(ids(p.next_batch()), Some(vec![id(0), id(1)]));
        assert_eq!(ids(p.next_batch()), Some(vec![id(2), id(3)]));
        // Small ones and those of unknown size: by count.
        p.hint((10..2000).map(id), 100);
        let b = ids(p.next_batch()).expect("a batch");
        assert_eq!(b.len(), BATCH);
        assert_eq!(b[0], id(4));
        p.hint((3000..3600).map(id), 0);
        while let Some(b) = p.next_batch() {
            assert!(b.len() <= BATCH);
        }
    }

    #[test]
    fn what_an_answer_left_out_is_asked_for_again_first_with_its_size() {
        let p = prefetcher();
        p.hint((0..4).map(id), 1 << 20);
        let b = ids(p.next_batch()).expect("a batch");
        assert_eq!(b, vec![id(0), id(1)]);
        // The answer held only the first (a size limit): the second goes back in front.
        let more =
            p.st.lock()
                .unwrap()
                .answered(&b, Ok(vec![(id(0), vec![0; 10])]), false);
        assert!(!more);
        assert_eq!(ids(p.next_batch()), Some(vec![id(1), id(2)]));
        assert_eq!(p.take(&id(0)).unwrap(), Some(vec![0; 10]));
    }
}
