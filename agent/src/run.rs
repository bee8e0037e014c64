//! One backup run of the agent, start to commit.

use crate::backup::{RemoteSink, UploadStats};
use crate::client::Client;
use crate::{event, runtime, Failure, Outcome, Progress};
use haul_protocol::agent::{
    AgentEvent, AgentProgress, AgentSummary, BackupCommand, BackupParams, BackupProgress,
    BackupSummary, ErrorCode, Parent, WarningEvent,
};
use haul_protocol::walk::{self, BackupOptions, WalkStats};
use haul_protocol::wire;
use haul_protocol::TreeId;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

/// Backs up `a.paths`; run parameters on stdin fill in what the command line leaves
/// out (over SSH, the wrapper admits no `--host`, `--tag` or `--parent`).
pub fn backup(a: BackupCommand) -> Result<Outcome, Failure> {
    let started = Instant::now();
    let params: BackupParams = if a.params_stdin {
        crate::read_params()?
    } else {
        BackupParams::default()
    };
    let excludes = walk::compile_excludes(&a.excludes).map_err(Failure::usage)?;
    let mut paths = Vec::new();
    for p in &a.paths {
        let abs =
            std::path::absolute(p).map_err(|e| Failure::usage(format!("backup path {p}: {e}")))?;
        std::fs::symlink_metadata(&abs).map_err(|e| {
            Failure::new(
                ErrorCode::Source,
                format!("backup path {}: {e}", abs.display()),
            )
        })?;
        paths.push(abs);
    }
    let start = wire::BackupStart {
        host: a
            .host
            .or(params.host)
            .unwrap_or_else(haul_protocol::hostname),
        paths: paths.iter().map(|p| p.display().to_string()).collect(),
        tags: if a.tags.is_empty() {
            params.tags
        } else {
            a.tags
        },
        parent: a
            .parent
            .or(params.parent)
            .unwrap_or(Parent::Latest)
            .to_string(),
    };
    let rt = runtime()?;
    let client = Arc::new(Client::new(a.socket.into()));
    let started_session: wire::BackupStarted = rt
        .block_on(client.post_json("/v1/backup/start", &start))
        .map_err(Failure::from)?;
    let parent = match &started_session.parent_tree {
        Some(t) => Some(t.parse::<TreeId>().map_err(|e| {
            Failure::new(
                ErrorCode::Protocol,
                format!("server sent a bad parent tree id: {e}"),
            )
        })?),
        None => None,
    };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let opts = BackupOptions {
        paths,
        excludes,
        exclude_caches: a.exclude_caches,
        one_file_system: a.one_file_system,
        // One reader per CPU: the walker's read-ahead threads keep the disk busy, so
        // a reader seldom waits for it, and each reader costs a chunk buffer of up to
        // the maximum chunk size. Measured on 2 CPUs, cold 1 GiB pull, alternating:
        // 2 readers 4.9-5.8 s and 47-60 MiB peak, 3 readers 4.7-6.0 s and 58-67 MiB.
        threads: a.threads.map_or(cpus.max(2), |t| t as usize).max(1),
        chunker: started_session.chunker,
        parent,
    };
    let walk_stats = Arc::new(WalkStats::default());
    let up = Arc::new(UploadStats::default());
    let (sink, uploader) = RemoteSink::start(
        client.clone(),
        rt.handle().clone(),
        started_session.compression_level,
        up.clone(),
    );
    let outcome = {
        let (w, u) = (walk_stats.clone(), up.clone());
        let (w2, u2) = (walk_stats.clone(), up.clone());
        let _progress = Progress::start(
            move || {
                AgentProgress::Backup(BackupProgress {
                    files: w.files_new.load(Relaxed)
                        + w.files_changed.load(Relaxed)
                        + w.files_unchanged.load(Relaxed),
                    dirs: w.dirs.load(Relaxed),
                    bytes_read: w.bytes_read.load(Relaxed),
                    bytes_sent: u.bytes_sent.load(Relaxed),
                })
            },
            move || {
                format!(
                    "{} files, {} MiB read, {} MiB sent",
                    w2.files_new.load(Relaxed)
                        + w2.files_changed.load(Relaxed)
                        + w2.files_unchanged.load(Relaxed),
                    w2.bytes_read.load(Relaxed) >> 20,
                    u2.bytes_sent.load(Relaxed) >> 20
                )
            },
        );
        let outcome = walk::backup(&sink, &opts, &walk_stats);
        sink.close();
        let uploaded = rt.block_on(uploader);
        match (outcome, uploaded) {
            (Ok(o), Ok(Ok(()))) => Ok(o),
            // The uploader's own error says more than the walker's "upload failed".
            (_, Ok(Err(e))) => Err(Failure::from(e)),
            (Err(e), _) => Err(Failure::from(e)),
            (_, Err(e)) => Err(Failure::new(
                ErrorCode::Internal,
                format!("uploader failed: {e}"),
            )),
        }
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(f) => {
            // Keep what was sent: the next run will not send it again.
            let _ = rt.block_on(client.request(
                hyper::Method::POST,
                "/v1/backup/abandon",
                bytes::Bytes::new(),
            ));
            return Err(f);
        }
    };
    for w in &outcome.warnings {
        event(&AgentEvent::Warning(WarningEvent {
            path: w.path.clone(),
            kind: None,
            message: w.message.clone(),
        }));
        eprintln!("warning: {}: {}", w.path, w.message);
    }
    let counters = wire::RunCounters {
        files_new: walk_stats.files_new.load(Relaxed),
        files_changed: walk_stats.files_changed.load(Relaxed),
        files_unchanged: walk_stats.files_unchanged.load(Relaxed),
        dirs: walk_stats.dirs.load(Relaxed),
        bytes_read: walk_stats.bytes_read.load(Relaxed),
        bytes_total: walk_stats.bytes_total.load(Relaxed),
        warnings: outcome.warnings.len() as u64,
    };
    let committed: wire::Committed = rt
        .block_on(client.post_json(
            "/v1/backup/commit",
            &wire::Commit {
                root: outcome.root.to_hex(),
                counters: counters.clone(),
            },
        ))
        .map_err(Failure::from)?;
    event(&AgentEvent::Summary(AgentSummary::Backup(BackupSummary {
        snapshot: committed.snapshot,
        parent: started_session.parent_snapshot,
        counters,
        bytes_new: up.bytes_new.load(Relaxed),
        bytes_sent: up.bytes_sent.load(Relaxed),
        blobs_sent: up.blobs_sent.load(Relaxed),
        bytes_stored: committed.bytes_stored,
        connections: client.connections_opened(),
        peak_rss_kib: haul_protocol::peak_rss_kib(),
        duration_ms: started.elapsed().as_millis() as u64,
    })));
    Ok(if outcome.warnings.is_empty() {
        Outcome::Ok
    } else {
        Outcome::Warnings
    })
}
