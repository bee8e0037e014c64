//! The receive mode: another pbs copies snapshots into this one's repository through
//! SSH, its key's forced command being `haul-pbs receive` (see `commands::receive`).
//! Append-only like a pull's server: sessions store blobs and commit snapshots, and
//! nothing can be read, listed, deleted or overwritten. What differs from a pull is
//! that the sender names the snapshot's host (among those the forced command allows),
//! and that a copy keeps its original's time, paths, tags and figures.
//!
//! | request | body | answer |
//! |---|---|---|
//! | `POST /v1/receive/have` | [`HaveAsk`]: snapshots of the sender | [`Have`]: the copy of each already here, if any |
//! | `POST /v1/receive/start` | [`ReceiveStart`] | [`ReceiveStarted`] |
//! | `POST /v1/backup/missing` | refs | the refs this session lacks (as in a pull) |
//! | `POST /v1/backup/upload` | frames | [`haul_protocol::wire::UploadDone`] |
//! | `POST /v1/receive/commit` | [`ReceiveCommit`] | [`ReceiveCommitted`] |
//! | `POST /v1/backup/abandon` | — | `{}` |
//!
//! `have` answers only for the snapshots asked about, and only from the snapshots of
//! their hosts: the sender learns whether its own snapshots arrived, nothing else.
//! `missing` answers in the host's own-history scope (the copy of the parent, what
//! this host's cut-short copies stored) unless the forced command says
//! `--cross-host-dedup`. A commit's time may not be in the future (past
//! [`MAX_CLOCK_AHEAD`]): a snapshot dated ahead would be the newest of its host for ever
//! after, and retention would keep it in place of real ones.

use super::api::{blocking, json_body, take_session, ApiResult, St, Whole};
use super::error::{ApiError, Code};
use super::Server;
use axum::extract::State;
use axum::Json;
use haul_protocol::{SnapshotId, TreeId};
use haul_repo::format::snapshot::{Snapshot, SourceKind, Summary};
use haul_repo::ingest::{IngestSession, OwnPacks, ParentChoice, SessionInfo};
use serde::{Deserialize, Serialize};

pub const HAVE: &str = "/v1/receive/have";
pub const START: &str = "/v1/receive/start";
pub const COMMIT: &str = "/v1/receive/commit";

/// Snapshots asked about in one `have` request at most.
pub const MAX_HAVE: usize = 256;

/// How far ahead of this machine's clock a received snapshot's time may be.
pub const MAX_CLOCK_AHEAD: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Snapshots of the sender, by their id there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HaveAsk {
    pub snapshots: Vec<(SnapshotId, Snapshot)>,
}

/// For each snapshot asked about, in order, the id of its copy here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Have {
    pub copies: Vec<Option<SnapshotId>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceiveStart {
    pub host: String,
    pub paths: Vec<String>,
    pub tags: Vec<String>,
    /// The original (first) id of the snapshot's parent: its copy here, if there is
    /// one, is the session's parent; else the newest snapshot of the host and paths.
    pub parent_original: Option<SnapshotId>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceiveStarted {
    /// The snapshot here that the copy builds on.
    pub parent: Option<SnapshotId>,
    /// Largest upload body this server accepts.
    pub max_upload_body: u64,
}

/// What the copy keeps of its original; host, paths and tags are the session's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceiveCommit {
    pub time: chrono::DateTime<chrono::Utc>,
    pub tree: TreeId,
    pub source: SourceKind,
    pub summary: Summary,
    /// The original's id in the repository it was first taken into.
    pub original: SnapshotId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceiveCommitted {
    pub snapshot: SnapshotId,
    /// Bytes this session added to the repository (sealed and compressed).
    pub bytes_stored: u64,
    pub blobs_new: u64,
}

/// What a receiving server keeps besides the session: which hosts it takes, and where
/// each host's cut-short copies' packs are remembered.
pub struct Receiving {
    /// The hosts whose snapshots may be received (empty: any).
    pub hosts: Vec<String>,
    pub history: crate::history::History,
    /// The running session's host and its packs of cut-short copies.
    pub own: std::sync::Mutex<Option<(String, OwnPacks)>>,
    /// The repository's snapshots as this connection knows them: listed once, with
    /// the copies it commits added (a copy of many snapshots lists them once, not once
    /// per snapshot).
    pub known: std::sync::Mutex<Option<Vec<(SnapshotId, Snapshot)>>>,
}

impl Receiving {
    /// Calls `f` with the repository's snapshots (see `known`).
    fn snapshots<T>(
        &self,
        repo: &haul_repo::IndexedRepository,
        f: impl FnOnce(&[(SnapshotId, Snapshot)]) -> T,
    ) -> haul_repo::Result<T> {
        let mut known = self.known.lock().expect("snapshots");
        if known.is_none() {
            *known = Some(repo.snapshots()?);
        }
        Ok(f(known.as_deref().expect("listed")))
    }

    /// The resume record of `host`'s copies (apart from its pulls').
    fn key(host: &str) -> String {
        format!("receive {host}")
    }

    /// After a session: forgets the packs of a host once a snapshot holds them, keeps
    /// them for the next copy otherwise.
    pub fn settle(&self, committed: bool) {
        let own = self.own.lock().expect("own packs").take();
        if let Some((host, own)) = own {
            tracing::debug!(
                %host,
                committed,
                packs = own.lock().expect("own packs").len(),
                "settling the packs of the host's copies"
            );
            if let Err(e) = self
                .history
                .settle_own_packs(&Receiving::key(&host), &own, committed)
            {
                tracing::warn!("{e}");
            }
        }
    }
}

fn receiving(s: &Server) -> &Receiving {
    s.receiving.as_ref().expect("a receiving server")
}

fn check_host(s: &Server, host: &str) -> ApiResult<()> {
    let hosts = &receiving(s).hosts;
    if hosts.is_empty() || hosts.iter().any(|h| h == host) {
        return Ok(());
    }
    Err(ApiError::new(
        Code::Forbidden,
        format!(
            "this pbs receives snapshots of {} only, not of {host:?}",
            hosts
                .iter()
                .map(|h| format!("{h:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

pub(super) async fn have(State(s): St, body: Whole) -> ApiResult<Json<Have>> {
    let ask: HaveAsk = json_body(body)?;
    if ask.snapshots.len() > MAX_HAVE {
        return Err(ApiError::new(
            Code::BadRequest,
            format!("at most {MAX_HAVE} snapshots may be asked about at once"),
        ));
    }
    for (_, snap) in &ask.snapshots {
        check_host(&s, &snap.host)?;
    }
    let server = s.clone();
    let copies = blocking(move || {
        Ok(receiving(&server).snapshots(&server.repo, |here| {
            ask.snapshots
                .iter()
                .map(|(id, snap)| {
                    let same_host = here.iter().filter(|(_, t)| t.host == snap.host);
                    haul_repo::copy::copy_in(same_host, id, snap)
                })
                .collect()
        })?)
    })
    .await?;
    Ok(Json(Have { copies }))
}

pub(super) async fn start(State(s): St, body: Whole) -> ApiResult<Json<ReceiveStarted>> {
    let req: ReceiveStart = json_body(body)?;
    check_host(&s, &req.host)?;
    s.check_no_session()?;
    let server = s.clone();
    let session = blocking(move || {
        let repo = server.repo.clone();
        let parent = match req.parent_original {
            Some(p) => receiving(&server).snapshots(&repo, |here| {
                here.iter()
                    .find(|(_, t)| t.host == req.host && t.original == Some(p))
                    .map(|(id, _)| ParentChoice::Snapshot(*id))
            })?,
            None => None,
        }
        .unwrap_or(ParentChoice::Latest);
        let own = receiving(&server)
            .history
            .own_packs(&Receiving::key(&req.host));
        let host = req.host.clone();
        let mut session = IngestSession::start(
            repo,
            SessionInfo {
                host: req.host,
                paths: req.paths,
                tags: req.tags,
                source: SourceKind::Pull,
                parent,
                scope: server.scope,
            },
        )?;
        session.share_own_packs(own.clone());
        adopt_parent(&session)?;
        Ok((session, host, own))
    })
    .await?;
    let (session, host, own) = session;
    let started = ReceiveStarted {
        parent: session.parent().map(|(id, _)| *id),
        max_upload_body: haul_protocol::wire::MAX_UPLOAD_BODY,
    };
    s.check_no_session()?;
    // A session left by a sender that went away is settled as cut short.
    receiving(&s).settle(false);
    *receiving(&s).own.lock().expect("own packs") = Some((host, own));
    *s.session.lock().expect("session") = Some(std::sync::Arc::new(session));
    *s.session_used.lock().expect("session time") = std::time::Instant::now();
    Ok(Json(started))
}

/// Makes everything the session's parent holds the copy's to build on, as a pull's
/// agent does by reading the parent's trees: the sender is not told to send again what
/// the copy of the previous snapshot has.
fn adopt_parent(session: &IngestSession<'_>) -> haul_repo::Result<()> {
    let Some(root) = session.parent_tree() else {
        return Ok(());
    };
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root];
    while let Some(id) = stack.pop() {
        if seen.insert(id) {
            stack.extend(session.read_tree(&id)?.subtrees());
        }
    }
    Ok(())
}

pub(super) async fn commit(State(s): St, body: Whole) -> ApiResult<Json<ReceiveCommitted>> {
    let req: ReceiveCommit = json_body(body)?;
    let ahead = req.time - chrono::Utc::now();
    if ahead > chrono::Duration::from_std(MAX_CLOCK_AHEAD).expect("small") {
        // The session stays open: what it stored is kept when the sender abandons it.
        return Err(ApiError::new(
            Code::Forbidden,
            format!(
                "the snapshot's time {} is {} ahead of this pbs's clock: refused (a snapshot dated in the future would outrank every real one in retention); set the sending pbs's clock right",
                req.time.to_rfc3339(),
                humantime::format_duration(std::time::Duration::from_secs(
                    ahead.num_seconds().max(0) as u64
                ))
            ),
        ));
    }
    let session = take_session(&s)?;
    let server = s.clone();
    let result = blocking(move || {
        let info = session.info().clone();
        let snapshot = Snapshot {
            time: req.time,
            host: info.host,
            paths: info.paths,
            tags: info.tags,
            tree: req.tree,
            parent: session.parent().map(|(id, _)| *id),
            source: req.source,
            summary: req.summary,
            original: Some(req.original),
        };
        let (committed, added) = session.commit_snapshot(snapshot)?;
        tracing::info!(snapshot = %committed.0.short(), host = %committed.1.host, "copy received");
        server.committed_now(&committed);
        if let Some(known) = receiving(&server).known.lock().expect("snapshots").as_mut() {
            known.push(committed.clone());
        }
        Ok(ReceiveCommitted {
            snapshot: committed.0,
            bytes_stored: added.bytes_stored,
            blobs_new: added.blobs,
        })
    })
    .await;
    receiving(&s).settle(result.is_ok());
    Ok(Json(result?))
}
