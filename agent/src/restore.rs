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
    AgentEvent, AgentProgress, AgentSummary, ErrorCode, ImportOutcome, RestoreCommand,
    RestoreParams, RestoreProgress, RestoreSummary, StandbySummary, WarningEvent,
};
use haul_protocol::chunker::{decode_blob, decode_delta, delta_bases};
use haul_protocol::restore::{
    self, BlobSource, HeldChunks, RestoreOptions, RestoreStats, SourceError,
};
use haul_protocol::standby::{self, StandbyOptions, StandbyStats};
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
/// Tasks fetching chunks ahead, each on its own connection: all the connections but
/// one for trees and one for a blob a writer asks for itself. Each asks for about
/// 2 MiB at a time (see `prefetch`), so a long link has many answers on their way.
const CHUNK_FETCHERS: usize = crate::client::MAX_CONNECTIONS - 2;

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
        let (bytes, ahead) = match self.trees.take(&id.0).map_err(SourceError::new)? {
            // An empty frame: the server could not read it; asked alone for the reason.
            Some(b) if !b.is_empty() => (b, true),
            _ => (
                self.get(format!("/v1/restore/tree/{}", id.to_hex()))?
                    .to_vec(),
                false,
            ),
        };
        if blake3::hash(&bytes).as_bytes() != &id.0 {
            return Err(SourceError::blob(Bad(format!(
                "tree {} from the server does not hash to its id",
                id.short()
            ))));
        }
        let tree = TreeBlob::decode(&bytes).map_err(SourceError::blob)?;
        // The restorer descends into every subdirectory (or page) next: fetch them ahead
        // (the prefetcher did so for a tree it fetched, when it expands).
        if !(ahead && self.trees.expands()) {
            self.trees.hint(tree.subtrees().into_iter().map(|t| t.0), 0);
        }
        Ok(tree)
    }

    /// Decodes the chunk; the restorer checks its BLAKE3 before writing it.
    fn load_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, SourceError> {
        self.load_chunk_from(id, &NothingHeld)
    }

    /// A chunk fetched ahead may have come as a delta against a chunk `held` has: it is
    /// decoded with that one. One whose base is gone (changed on the clone since) is
    /// asked for again whole.
    fn load_chunk_from(&self, id: &ChunkId, held: &dyn HeldChunks) -> Result<Vec<u8>, SourceError> {
        let whole = || -> Result<Vec<u8>, SourceError> {
            Ok(self
                .get(format!("/v1/restore/chunk/{}", id.to_hex()))?
                .to_vec())
        };
        let mut encoded = match self.chunks.take(&id.0).map_err(SourceError::new)? {
            Some(b) if !b.is_empty() => b,
            _ => whole()?,
        };
        if let Some(bases) = delta_bases(&encoded) {
            let mut base = Vec::new();
            let all = bases.iter().all(|b| match held.read(b) {
                Some(plain) => {
                    base.extend_from_slice(&plain);
                    true
                }
                None => false,
            });
            let plain = all
                .then(|| decode_delta(&base, &encoded, self.max_chunk).ok())
                .flatten();
            match plain {
                Some(p) => return Ok(p),
                None => encoded = whole()?,
            }
        }
        DECOMPRESSOR
            .with(|d| decode_blob(&mut d.borrow_mut(), encoded, self.max_chunk))
            .map_err(|e| SourceError::blob(Bad(format!("chunk {}: {e}", id.short()))))
    }

    fn will_need_from(&self, ids: &[(ChunkId, Vec<ChunkId>)], bytes: u64) {
        let each = (bytes / ids.len().max(1) as u64).min(u32::MAX as u64) as u32;
        self.chunks.hint_from(ids.iter().cloned(), each);
    }

    fn held_trees(&self, ids: Arc<std::collections::HashSet<TreeId>>) {
        self.trees.held(ids);
    }

    fn will_need(&self, ids: &[ChunkId], bytes: u64) {
        let ids: Vec<(ChunkId, Vec<ChunkId>)> = ids.iter().map(|id| (*id, Vec::new())).collect();
        self.will_need_from(&ids, bytes);
    }
}

/// Holds no chunk: a delta has nothing to be decoded with.
struct NothingHeld;

impl HeldChunks for NothingHeld {
    fn read(&self, _id: &ChunkId) -> Option<Vec<u8>> {
        None
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
    if a.standby && !(a.includes.is_empty() && a.excludes.is_empty()) {
        return Err(Failure::usage(
            "--include and --exclude cannot be given with --standby: a standby copy is the whole snapshot",
        ));
    }
    let excludes = haul_protocol::walk::compile_excludes(&a.excludes).map_err(Failure::usage)?;
    if (a.import || !a.import_command.is_empty()) && !a.standby {
        return Err(Failure::usage(
            "--import and --import-command go with --standby only",
        ));
    }
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
            // Every tree is read, unless includes pick some.
            a.includes.is_empty(),
            rt.handle(),
        ),
        chunks: Prefetcher::start(
            client.clone(),
            // A standby copy's chunks may come as deltas against those of its old copy.
            if a.standby {
                wire::RESTORE_DELTAS
            } else {
                "/v1/restore/chunks"
            },
            BlobKind::Data,
            CHUNK_BUDGET,
            CHUNK_FETCHERS,
            false,
            rt.handle(),
        ),
    };
    let opts = RestoreOptions {
        overwrite: None,
        target: target.clone(),
        includes: a.includes,
        excludes,
        threads: a
            .threads
            .map_or_else(restore::default_threads, |t| t as usize)
            .max(1),
    };
    let stats = Arc::new(RestoreStats::default());
    let standby_stats = StandbyStats::default();
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
        let result = if a.standby {
            let opts = StandbyOptions {
                target: opts.target.clone(),
                snapshot: snap.snapshot.clone(),
                threads: opts.threads,
            };
            standby::push(&source, &root, &opts, &stats, &standby_stats)
        } else {
            restore::restore(&source, &root, &opts, &stats)
        };
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
    // The copy is replaced: the import command may run (the clone's policy chose it).
    let import = (a.standby && a.import && !a.import_command.is_empty())
        .then(|| run_import(&a.import_command, &target, &snap.snapshot));
    let import_failed = import.as_ref().is_some_and(|i| !i.succeeded());
    let standby = a.standby.then(|| StandbySummary {
        files_linked: standby_stats.files_linked.load(Relaxed),
        bytes_local: standby_stats.bytes_local.load(Relaxed),
        import: import.clone(),
    });
    event(&AgentEvent::Summary(AgentSummary::Restore(
        RestoreSummary {
            snapshot: snap.snapshot.clone(),
            target: target.display().to_string(),
            files: stats.files.load(Relaxed),
            dirs: stats.dirs.load(Relaxed),
            others: stats.others.load(Relaxed),
            bytes: stats.bytes.load(Relaxed),
            warnings: warnings.len() as u64,
            connections: client.connections_opened(),
            peak_rss_kib: haul_protocol::peak_rss_kib(),
            duration_ms: started.elapsed().as_millis() as u64,
            standby,
        },
    )));
    if let Some(i) = import.filter(|_| import_failed) {
        let how = match (i.exit, &i.error) {
            (_, Some(e)) => format!("could not start: {e}"),
            (Some(code), None) => format!("exited with code {code}"),
            (None, None) => "was killed by a signal".into(),
        };
        let last = i
            .tail
            .last()
            .map(|l| format!(" (last line: {l})"))
            .unwrap_or_default();
        return Err(Failure::new(
            ErrorCode::Import,
            format!(
                "the standby copy {} holds snapshot {}, but the import command {:?} {how}{last}",
                target.display(),
                snap.snapshot,
                i.command.join(" ")
            ),
        ));
    }
    Ok(if warnings.is_empty() {
        Outcome::Ok
    } else {
        Outcome::Warnings
    })
}

/// Lines of the import command's output kept for the run record.
const IMPORT_TAIL: usize = 20;

/// Runs the clone's import command in the standby directory, with `HAUL_STANDBY_DIR`
/// and `HAUL_SNAPSHOT` set, and keeps the end of what it printed.
fn run_import(command: &[String], dir: &std::path::Path, snapshot: &str) -> ImportOutcome {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let started = Instant::now();
    let mut outcome = ImportOutcome {
        command: command.to_vec(),
        ..ImportOutcome::default()
    };
    let (read, write) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => {
            outcome.error = Some(e.to_string());
            return outcome;
        }
    };
    let child = write.try_clone().and_then(|w2| {
        Command::new(&command[0])
            .args(&command[1..])
            .current_dir(dir)
            .env("HAUL_STANDBY_DIR", dir)
            .env("HAUL_SNAPSHOT", snapshot)
            .stdin(Stdio::null())
            .stdout(write)
            .stderr(w2)
            .spawn()
    });
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            outcome.error = Some(format!("{}: {e}", command[0]));
            return outcome;
        }
    };
    let mut tail = std::collections::VecDeque::new();
    for line in BufReader::new(read).split(b'\n').map_while(Result::ok) {
        if tail.len() == IMPORT_TAIL {
            tail.pop_front();
        }
        let mut line = String::from_utf8_lossy(&line).into_owned();
        if line.len() > 1024 {
            let mut end = 1024;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        tail.push_back(line);
    }
    outcome.exit = child.wait().ok().and_then(|s| s.code());
    outcome.tail = tail.into();
    outcome.duration_ms = started.elapsed().as_millis() as u64;
    outcome
}
