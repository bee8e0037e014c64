//! `haul-agent restore`: the shared restorer (`haul_protocol::restore`) fed by a
//! read-only repository server, with trees and chunks fetched ahead in batches
//! ([`Prefetcher`]). Every tree and chunk is checked against its BLAKE3 id before it
//! is used; the restorer writes into a staging directory beside the target
//! and renames it into place only when everything is written.

use crate::client::{Client, ClientError};
use crate::prefetch::Prefetcher;
use crate::{event, runtime, Failure, Outcome, Progress};
use bytes::Bytes;
use haul_protocol::agent::{
    AgentEvent, AgentProgress, AgentSummary, ErrorCode, RestoreCommand, RestoreParams,
    RestoreProgress, RestoreSummary, WarningEvent,
};
use haul_protocol::chunker::decode_blob;
use haul_protocol::restore::{self, BlobSource, RestoreOptions, RestoreStats, SourceError};
use haul_protocol::tree::TreeBlob;
use haul_protocol::wire;
use haul_protocol::{BlobKind, ChunkId, TreeId};
use hyper::Method;
use std::cell::RefCell;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

struct RemoteSource {
    client: Arc<Client>,
    rt: tokio::runtime::Handle,
    max_chunk: usize,
    trees: Arc<Prefetcher>,
    chunks: Arc<Prefetcher>,
}

/// Bytes of trees and of chunks held ahead of their use. The restorer's writers take
/// their files in parallel, each up to 2 MiB of content in a row (see
/// `haul_protocol::restore`): the chunk budget covers eight of them.
const TREE_BUDGET: usize = 4 << 20;
const CHUNK_BUDGET: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Bad(String);

thread_local! {
    static DECOMPRESSOR: RefCell<zstd::bulk::Decompressor<'static>> =
        RefCell::new(zstd::bulk::Decompressor::new().expect("zstd context"));
}

impl RemoteSource {
    /// Fetches one blob. The server's refusal to give it (it is missing or damaged in
    /// the repository) concerns that blob only; a broken connection ends the restore.
    fn get(&self, path: String) -> Result<Bytes, SourceError> {
        self.rt
            .block_on(self.client.request(Method::GET, &path, Bytes::new()))
            .map_err(|e| match &e {
                // The repository lacks it or holds it damaged: that blob only. Any other
                // refusal (the server's disk failing, say) ends the restore rather than
                // leave it hollow.
                ClientError::Api { code, .. }
                    if matches!(code.as_str(), "repository_corrupt" | "unknown_object") =>
                {
                    SourceError::blob(e)
                }
                _ => SourceError::new(e),
            })
    }
}

impl BlobSource for RemoteSource {
    fn load_tree(&self, id: &TreeId) -> Result<TreeBlob, SourceError> {
        let bytes = match self.trees.take(&id.0).map_err(SourceError::new)? {
            // An empty frame: the server could not read it; asked alone for the reason.
            Some(b) if !b.is_empty() => b,
            _ => self
                .get(format!("/v1/restore/tree/{}", id.to_hex()))?
                .to_vec(),
        };
        if blake3::hash(&bytes).as_bytes() != &id.0 {
            return Err(SourceError::blob(Bad(format!(
                "tree {} from the server does not hash to its id",
                id.short()
            ))));
        }
        let tree = TreeBlob::decode(&bytes).map_err(SourceError::blob)?;
        // The restorer descends into every subdirectory (or page) next: fetch them ahead.
        self.trees.hint(tree.subtrees().into_iter().map(|t| t.0));
        Ok(tree)
    }

    /// Decodes the chunk; the restorer checks its BLAKE3 before writing it.
    fn load_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, SourceError> {
        let encoded = match self.chunks.take(&id.0).map_err(SourceError::new)? {
            Some(b) if !b.is_empty() => b,
            _ => self
                .get(format!("/v1/restore/chunk/{}", id.to_hex()))?
                .to_vec(),
        };
        DECOMPRESSOR
            .with(|d| decode_blob(&mut d.borrow_mut(), encoded, self.max_chunk))
            .map_err(|e| SourceError::blob(Bad(format!("chunk {}: {e}", id.short()))))
    }

    fn will_need(&self, ids: &[ChunkId]) {
        self.chunks.hint(ids.iter().map(|c| c.0));
    }
}

/// Restores `a.snapshot` into `a.target`.
pub fn run(a: RestoreCommand) -> Result<Outcome, Failure> {
    let started = Instant::now();
    if a.params_stdin {
        crate::read_params::<RestoreParams>()?;
    }
    let target = std::path::absolute(&a.target)
        .map_err(|e| Failure::usage(format!("restore target {}: {e}", a.target)))?;
    let rt = runtime()?;
    let client = Arc::new(Client::new(a.socket.into()));
    let snap: wire::RestoreStarted = rt
        .block_on(client.post_json(
            "/v1/restore/start",
            &wire::RestoreStart {
                snapshot: a.snapshot.to_string(),
            },
        ))
        .map_err(Failure::from)?;
    let root: TreeId = snap.tree.parse().map_err(|e| {
        Failure::new(
            ErrorCode::Protocol,
            format!("server sent a bad tree id: {e}"),
        )
    })?;
    let source = RemoteSource {
        client: client.clone(),
        rt: rt.handle().clone(),
        max_chunk: snap.max_chunk as usize,
        trees: Prefetcher::start(
            client.clone(),
            "/v1/restore/trees",
            BlobKind::Tree,
            TREE_BUDGET,
            1,
            rt.handle(),
        ),
        chunks: Prefetcher::start(
            client.clone(),
            "/v1/restore/chunks",
            BlobKind::Data,
            CHUNK_BUDGET,
            2,
            rt.handle(),
        ),
    };
    let opts = RestoreOptions {
        target: target.clone(),
        includes: a.includes,
        threads: a
            .threads
            .map_or_else(restore::default_threads, |t| t as usize)
            .max(1),
    };
    let stats = Arc::new(RestoreStats::default());
    let warnings = {
        let (s, s2) = (stats.clone(), stats.clone());
        let _progress = Progress::start(
            move || {
                AgentProgress::Restore(RestoreProgress {
                    files: s.files.load(Relaxed),
                    bytes: s.bytes.load(Relaxed),
                })
            },
            move || {
                format!(
                    "{} files, {} MiB",
                    s2.files.load(Relaxed),
                    s2.bytes.load(Relaxed) >> 20
                )
            },
        );
        let result = restore::restore(&source, &root, &opts, &stats);
        source.trees.close();
        source.chunks.close();
        result.map_err(Failure::from)?
    };
    for w in &warnings {
        event(&AgentEvent::Warning(WarningEvent {
            path: w.path.clone(),
            kind: Some(w.kind),
            message: w.message.clone(),
        }));
        eprintln!("warning: {}: {}", w.path, w.message);
    }
    event(&AgentEvent::Summary(AgentSummary::Restore(
        RestoreSummary {
            snapshot: snap.snapshot,
            target: target.display().to_string(),
            files: stats.files.load(Relaxed),
            dirs: stats.dirs.load(Relaxed),
            others: stats.others.load(Relaxed),
            bytes: stats.bytes.load(Relaxed),
            warnings: warnings.len() as u64,
            connections: client.connections_opened(),
            peak_rss_kib: haul_protocol::peak_rss_kib(),
            duration_ms: started.elapsed().as_millis() as u64,
        },
    )));
    Ok(if warnings.is_empty() {
        Outcome::Ok
    } else {
        Outcome::Warnings
    })
}
