//! `haul-agent backup`: the shared walker (`haul_protocol::walk`) feeding a
//! [`RemoteSink`], which names and compresses each blob and hands it to the uploader.
//!
//! The uploader turns the stream of blobs into batches: for each batch it asks the
//! server which ids it lacks, then uploads only those, many per request. Up to
//! [`BATCHES_IN_FLIGHT`] batches are under way at once, so the question of one batch
//! travels while another uploads and a link with latency stays busy. The blobs
//! waiting for upload hold a byte budget; when it is spent the walker's workers wait,
//! so the agent's memory does not depend on the size of the tree or of the repository.
//!
//! The budget is [`UPLOAD_BUDGET`] on a short link, and grows with the round trip
//! ([`in_flight_budget`]) up to [`MAX_UPLOAD_BUDGET`]: a blob holds its share from when
//! it is compressed until its upload is answered, two round trips later at least, so
//! a fixed budget would bound a long link's throughput to budget / (2 × RTT).

use crate::client::{Client, ClientError};
use crate::prefetch::Prefetcher;
use bytes::Bytes;
use haul_protocol::chunker::encode_blob_with;
use haul_protocol::tree::TreeBlob;
use haul_protocol::walk::{Sink, SinkError};
use haul_protocol::wire;
use haul_protocol::{BlobKind, BlobRef, ChunkId, TreeId};
use hyper::Method;
use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Batches being asked about or uploaded at once: as many as the server uploads at once.
pub const BATCHES_IN_FLIGHT: usize = wire::MAX_UPLOADS_IN_FLIGHT;
/// Encoded bytes of blobs waiting to be uploaded, at most, on a short link.
pub const UPLOAD_BUDGET: usize = 6 << 20;
/// ... and on the longest.
pub const MAX_UPLOAD_BUDGET: usize = 64 << 20;
/// The upload rate the budget is sized for: more than a server takes in, so that the
/// budget is never what bounds a run.
const LINK_RATE: f64 = 640.0 * 1048576.0;
/// A batch closes at most at this many encoded bytes, however large the budget.
const MAX_BATCH_BYTES: usize = 16 << 20;
/// Bytes of parent trees held ahead of their use.
const TREE_BUDGET: usize = 4 << 20;
/// A batch closes at this many encoded bytes (plus one blob) or blobs.
const BATCH_BYTES: usize = 2 << 20;
const BATCH_BLOBS: usize = 4096;

/// What the uploader did.
#[derive(Debug, Default)]
pub struct UploadStats {
    /// Blobs the server lacked and that were sent.
    pub blobs_sent: AtomicU64,
    /// Of those, blobs the server stored as new.
    pub blobs_stored: AtomicU64,
    /// Plaintext bytes of the blobs sent.
    pub bytes_new: AtomicU64,
    /// Bytes of upload bodies (compressed blobs and frame headers).
    pub bytes_sent: AtomicU64,
}

struct Item {
    r: BlobRef,
    plain_len: usize,
    encoded: Vec<u8>,
    _budget: OwnedSemaphorePermit,
}

pub struct RemoteSink {
    client: Arc<Client>,
    /// Parent trees, fetched ahead: the subtrees of each tree read.
    trees: Arc<Prefetcher>,
    rt: tokio::runtime::Handle,
    tx: Mutex<Option<mpsc::UnboundedSender<Item>>>,
    budget: Arc<Semaphore>,
    failure: Arc<Mutex<Option<String>>>,
    level: i32,
}

thread_local! {
    /// Each walker thread's compressor (at the run's level) and its scratch buffer.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>, Vec<u8>)>> = const { RefCell::new(None) };
}

impl RemoteSink {
    /// Starts the uploader on `rt`; [`RemoteSink::finish`] waits for it.
    pub fn start(
        client: Arc<Client>,
        rt: tokio::runtime::Handle,
        level: i32,
        stats: Arc<UploadStats>,
    ) -> (RemoteSink, tokio::task::JoinHandle<Result<(), ClientError>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(UPLOAD_BUDGET));
        let failure = Arc::new(Mutex::new(None));
        let task = rt.spawn(uploader(
            client.clone(),
            rx,
            stats,
            budget.clone(),
            failure.clone(),
        ));
        let trees = Prefetcher::start(
            client.clone(),
            "/v1/backup/trees",
            BlobKind::Tree,
            TREE_BUDGET,
            1,
            // Excluded directories are not read: only what the walker hints.
            false,
            &rt,
        );
        let sink = RemoteSink {
            client,
            trees,
            rt,
            tx: Mutex::new(Some(tx)),
            budget,
            failure,
            level,
        };
        (sink, task)
    }

    /// No more blobs: the uploader sends what it holds and ends.
    pub fn close(&self) {
        self.tx.lock().expect("sink").take();
        self.trees.close();
    }

    fn failed(&self) -> SinkError {
        let msg = self
            .failure
            .lock()
            .expect("failure")
            .clone()
            .unwrap_or_else(|| "the uploader stopped".into());
        SinkError(msg.into())
    }

    fn offer(&self, kind: BlobKind, id: [u8; 32], plain: Vec<u8>) -> Result<(), SinkError> {
        let plain_len = plain.len();
        let level = self.level;
        let encoded = COMPRESSOR
            .with(|c| {
                let mut c = c.borrow_mut();
                if c.as_ref().map(|(l, _, _)| *l) != Some(level) {
                    *c = Some((level, zstd::bulk::Compressor::new(level)?, Vec::new()));
                }
                let (_, compressor, scratch) = c.as_mut().expect("just set");
                encode_blob_with(compressor, scratch, plain)
            })
            .map_err(SinkError::new)?;
        let cost = encoded.capacity().clamp(1024, UPLOAD_BUDGET) as u32;
        let permit = match self.budget.clone().try_acquire_many_owned(cost) {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(self.failed()),
            // The budget is spent: wait for uploads to free some.
            Err(tokio::sync::TryAcquireError::NoPermits) => self
                .rt
                .block_on(self.budget.clone().acquire_many_owned(cost))
                .map_err(|_| self.failed())?,
        };
        let item = Item {
            r: BlobRef { kind, id },
            plain_len,
            encoded,
            _budget: permit,
        };
        let tx = self.tx.lock().expect("sink").clone();
        match tx {
            Some(tx) if tx.send(item).is_ok() => Ok(()),
            _ => Err(self.failed()),
        }
    }
}

impl Sink for RemoteSink {
    fn load_tree(&self, id: &TreeId) -> Result<TreeBlob, SinkError> {
        let bytes = match self.trees.take(&id.0).map_err(SinkError::new)? {
            Some(b) => b,
            None => {
                let path = format!("/v1/backup/tree/{}", id.to_hex());
                self.rt
                    .block_on(self.client.request(Method::GET, &path, Bytes::new()))
                    .map_err(SinkError::new)?
                    .to_vec()
            }
        };
        if blake3::hash(&bytes).as_bytes() != &id.0 {
            return Err(SinkError(
                format!(
                    "parent tree {} from the server does not hash to its id",
                    id.short()
                )
                .into(),
            ));
        }
        let tree = TreeBlob::decode(&bytes).map_err(SinkError::new)?;
        // The walker compares each subdirectory (or page) next: fetch them ahead.
        self.trees.hint(tree.subtrees().into_iter().map(|t| t.0), 0);
        Ok(tree)
    }

    fn offer_chunk(&self, plain: Vec<u8>) -> Result<ChunkId, SinkError> {
        let id = *blake3::hash(&plain).as_bytes();
        self.offer(BlobKind::Data, id, plain)?;
        Ok(ChunkId(id))
    }

    fn offer_tree(&self, encoded: Vec<u8>) -> Result<TreeId, SinkError> {
        let id = *blake3::hash(&encoded).as_bytes();
        self.offer(BlobKind::Tree, id, encoded)?;
        Ok(TreeId(id))
    }
}

async fn uploader(
    client: Arc<Client>,
    mut rx: mpsc::UnboundedReceiver<Item>,
    stats: Arc<UploadStats>,
    budget: Arc<Semaphore>,
    failure: Arc<Mutex<Option<String>>>,
) -> Result<(), ClientError> {
    let result = batches(client, &mut rx, stats, &budget).await;
    if let Err(e) = &result {
        *failure.lock().expect("failure") = Some(format!("upload failed: {e}"));
        // Wake walker threads waiting for budget: they fail instead of waiting.
        budget.close();
        rx.close();
    }
    result
}

/// Blobs of this run asked about lately, so that content met twice close together is
/// asked about and sent once: two generations of at most [`RECENT`] each, so memory
/// stays flat however many files a run has (a set of every blob of a run of ten million
/// files would take hundreds of MiB). A blob met again later is asked about again, and
/// the server, which knows what this run sent, does not ask for it.
#[derive(Default)]
struct Recent {
    current: HashSet<BlobRef>,
    previous: HashSet<BlobRef>,
}

const RECENT: usize = 1 << 15;

impl Recent {
    /// Notes `r`; `false` if it was asked about lately.
    fn insert(&mut self, r: BlobRef) -> bool {
        if self.previous.contains(&r) || !self.current.insert(r) {
            return false;
        }
        if self.current.len() >= RECENT {
            self.previous = std::mem::take(&mut self.current);
        }
        true
    }
}

/// The bytes to keep in flight on a link of round trip `rtt` (the upload budget; what a
/// restore holds ahead): what it carries at [`LINK_RATE`] in two round trips (a
/// batch's question and its upload), within [`UPLOAD_BUDGET`]..=[`MAX_UPLOAD_BUDGET`].
pub fn in_flight_budget(rtt: std::time::Duration) -> usize {
    ((2.0 * rtt.as_secs_f64() * LINK_RATE) as usize).clamp(UPLOAD_BUDGET, MAX_UPLOAD_BUDGET)
}

async fn batches(
    client: Arc<Client>,
    rx: &mut mpsc::UnboundedReceiver<Item>,
    stats: Arc<UploadStats>,
    budget: &Semaphore,
) -> Result<(), ClientError> {
    let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let mut seen = Recent::default();
    let mut granted = UPLOAD_BUDGET;
    loop {
        // The round trip is known after the first small request, and may shorten as
        // more are timed (their time includes the server's work).
        if let Some(rtt) = client.round_trip() {
            let want = in_flight_budget(rtt);
            if want > granted {
                budget.add_permits(want - granted);
                granted = want;
            } else if want < granted {
                granted -= budget.forget_permits(granted - want);
            }
        }
        // Batches in flight share the budget.
        let batch_bytes = (granted / BATCHES_IN_FLIGHT).clamp(BATCH_BYTES, MAX_BATCH_BYTES);
        // Wait for a free slot first: meanwhile blobs gather into a larger batch.
        let slot = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        while let Some(r) = tasks.try_join_next() {
            r.expect("batch task")?;
        }
        let Some(first) = rx.recv().await else { break };
        let mut batch = Vec::new();
        let (mut bytes, mut plain) = (0, 0u64);
        let mut next = Some(first);
        while let Some(item) = next.take() {
            if seen.insert(item.r) {
                bytes += item.encoded.len();
                plain += item.plain_len as u64;
                batch.push(item);
            }
            // The server takes at most MAX_UPLOAD_PLAIN per request; a blob is at most
            // one chunk.
            if bytes >= batch_bytes
                || batch.len() >= BATCH_BLOBS
                || plain >= wire::MAX_UPLOAD_PLAIN / 2
            {
                break;
            }
            next = rx.try_recv().ok();
        }
        if batch.is_empty() {
            continue;
        }
        let (client, stats) = (client.clone(), stats.clone());
        tasks.spawn(async move {
            let _slot = slot;
            send_batch(&client, batch, &stats).await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("batch task")?;
    }
    Ok(())
}

/// Asks which blobs of `batch` the server lacks and uploads those in one request.
async fn send_batch(
    client: &Client,
    batch: Vec<Item>,
    stats: &UploadStats,
) -> Result<(), ClientError> {
    let mut query = Vec::with_capacity(batch.len() * wire::REF_LEN);
    for item in &batch {
        wire::encode_ref(&mut query, &item.r);
    }
    let answer = client
        .request(Method::POST, "/v1/backup/missing", query.into())
        .await?;
    let missing: HashSet<BlobRef> = wire::decode_refs(&answer)
        .map_err(|detail| ClientError::Protocol {
            what: "POST /v1/backup/missing".into(),
            detail,
        })?
        .into_iter()
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // Sized exactly: a body grown by doubling would hold up to twice its bytes.
    let size: usize = batch
        .iter()
        .filter(|i| missing.contains(&i.r))
        .map(|i| wire::FRAME_HEADER_LEN + i.encoded.len())
        .sum();
    let mut body = Vec::with_capacity(size);
    let mut plain = 0u64;
    let mut sent = 0u64;
    for item in batch {
        if !missing.contains(&item.r) {
            continue;
        }
        wire::encode_frame_header(&mut body, &item.r, item.encoded.len() as u32);
        body.extend_from_slice(&item.encoded);
        plain += item.plain_len as u64;
        sent += 1;
    }
    let len = body.len() as u64;
    let done: wire::UploadDone = {
        let bytes = client
            .request(Method::POST, "/v1/backup/upload", body.into())
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            what: "POST /v1/backup/upload".into(),
            detail: e.to_string(),
        })?
    };
    stats.blobs_sent.fetch_add(sent, Relaxed);
    stats.blobs_stored.fetch_add(done.stored, Relaxed);
    stats.bytes_new.fetch_add(plain, Relaxed);
    stats.bytes_sent.fetch_add(len, Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_flight_budget_covers_two_round_trips_within_its_bounds() {
        use std::time::Duration;
        assert_eq!(in_flight_budget(Duration::from_micros(150)), UPLOAD_BUDGET);
        assert_eq!(in_flight_budget(Duration::from_secs(3)), MAX_UPLOAD_BUDGET);
        let at_20ms = in_flight_budget(Duration::from_millis(20));
        assert!(
            at_20ms > UPLOAD_BUDGET && at_20ms < MAX_UPLOAD_BUDGET,
            "{at_20ms}"
        );
        assert_eq!(at_20ms, (0.04 * LINK_RATE) as usize);
    }

    #[test]
    fn blobs_met_lately_are_asked_about_once_and_the_memory_stays_bounded() {
        let blob = |n: usize| {
            let mut id = [7u8; 32];
            id[..8].copy_from_slice(&(n as u64).to_le_bytes());
            BlobRef::data(ChunkId(id))
        };
        let mut recent = Recent::default();
        for n in 0..RECENT * 5 {
            assert!(recent.insert(blob(n)), "{n} is new");
            assert!(!recent.insert(blob(n)), "{n} was just asked about");
            assert!(recent.current.len() + recent.previous.len() <= 2 * RECENT);
        }
        // The last generation is still known; the first, long ago, is asked again.
        assert!(!recent.insert(blob(RECENT * 4)));
        assert!(recent.insert(blob(0)));
    }
}
