//! One backup run of the agent, start to commit.

use crate::backup::{RemoteSink, UploadStats};
use crate::client::Client;
use crate::{event, runtime, BackupArgs, Failure, Outcome, Progress};
use haul_protocol::walk::{self, BackupOptions, WalkStats};
use haul_protocol::wire;
use haul_protocol::TreeId;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

/// Run parameters that may come on stdin (over SSH the command line is fixed by the
/// wrapper's policy; these are not security-relevant: the server decides what a run
/// may read and write).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    host: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    parent: Option<String>,
    /// Refuse to run unless started by haul-wrapper (see [`crate::read_params`]).
    #[serde(default)]
    require_wrapper: bool,
}

impl crate::RequiresWrapper for Params {
    fn requires_wrapper(&self) -> bool {
        self.require_wrapper
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

pub fn backup(a: BackupArgs) -> Result<Outcome, Failure> {
    let started = Instant::now();
    let params: Params = if a.params_stdin {
        crate::read_params()?
    } else {
        Params::default()
    };
    let excludes = walk::compile_excludes(&a.exclude).map_err(Failure::usage)?;
    let mut paths = Vec::new();
    for p in &a.paths {
        let abs = std::path::absolute(p)
            .map_err(|e| Failure::usage(format!("backup path {}: {e}", p.display())))?;
        std::fs::symlink_metadata(&abs)
            .map_err(|e| Failure::usage(format!("backup path {}: {e}", abs.display())))?;
        paths.push(abs);
    }
    let start = wire::BackupStart {
        host: a.host.or(params.host).unwrap_or_else(hostname),
        paths: paths.iter().map(|p| p.display().to_string()).collect(),
        tags: if a.tag.is_empty() { params.tags } else { a.tag },
        parent: a
            .parent
            .or(params.parent)
            .unwrap_or_else(|| "latest".into()),
    };
    let rt = runtime()?;
    let client = Arc::new(Client::new(a.socket.clone()));
    let started_session: wire::BackupStarted = rt
        .block_on(client.post_json("/v1/backup/start", &start))
        .map_err(Failure::run)?;
    let parent = match &started_session.parent_tree {
        Some(t) => Some(
            t.parse::<TreeId>()
                .map_err(|e| Failure::run(format!("server sent a bad parent tree id: {e}")))?,
        ),
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
        threads: a.threads.unwrap_or(cpus.max(2)).max(1),
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
                serde_json::json!({"type": "progress",
                    "files": w.files_new.load(Relaxed) + w.files_changed.load(Relaxed) + w.files_unchanged.load(Relaxed),
                    "dirs": w.dirs.load(Relaxed), "bytes_read": w.bytes_read.load(Relaxed),
                    "bytes_sent": u.bytes_sent.load(Relaxed)})
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
            (_, Ok(Err(e))) => Err(Failure::run(e)),
            (Err(e), _) => Err(Failure::run(e)),
            (_, Err(e)) => Err(Failure::run(format!("uploader failed: {e}"))),
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
        event(&serde_json::json!({"type": "warning", "path": w.path, "message": w.message}));
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
        .map_err(Failure::run)?;
    event(&serde_json::json!({
        "type": "summary",
        "snapshot": committed.snapshot,
        "parent": started_session.parent_snapshot,
        "files_new": counters.files_new,
        "files_changed": counters.files_changed,
        "files_unchanged": counters.files_unchanged,
        "dirs": counters.dirs,
        "bytes_read": counters.bytes_read,
        "bytes_total": counters.bytes_total,
        "bytes_new": up.bytes_new.load(Relaxed),
        "bytes_sent": up.bytes_sent.load(Relaxed),
        "blobs_sent": up.blobs_sent.load(Relaxed),
        "bytes_stored": committed.bytes_stored,
        "warnings": counters.warnings,
        "connections": client.connections_opened(),
        "peak_rss_kib": haul_protocol::peak_rss_kib(),
        "duration_ms": started.elapsed().as_millis() as u64,
    }));
    Ok(if outcome.warnings.is_empty() {
        Outcome::Ok
    } else {
        Outcome::Warnings
    })
}
