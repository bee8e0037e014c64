//! Routes and handlers: each turns one HTTP request into calls on the engine, run on
//! blocking threads (the engine does disk I/O and hashing), and its result into a
//! response. The routes of a server are those of its mode, and no others: there is no
//! route that deletes, overwrites or lists anything.

use super::error::{ApiError, Code};
use super::{receive, Mode, RestoreScope, Server};
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use haul_protocol::wire::{self, FRAME_HEADER_LEN};
use haul_protocol::{BlobKind, BlobRef, ChunkId, TreeId};
use haul_repo::format::snapshot::Summary;
use haul_repo::index::BlobLocation;
use haul_repo::ingest::{IngestSession, ParentChoice, SessionInfo};
use http_body_util::BodyExt;
use std::sync::{Arc, Mutex};

pub(super) type St = State<Arc<Server>>;
pub(super) type ApiResult<T> = Result<T, ApiError>;

pub fn router(server: Arc<Server>) -> Router {
    let r = match server.mode {
        Mode::AppendOnly => Router::new()
            .route("/v1/backup/start", post(backup_start))
            .route("/v1/backup/tree/{id}", get(backup_tree))
            .route("/v1/backup/trees", post(backup_trees).layer(refs_limit()))
            .route(
                "/v1/backup/missing",
                post(backup_missing).layer(refs_limit()),
            )
            .route("/v1/backup/upload", post(backup_upload))
            .route("/v1/backup/commit", post(backup_commit))
            .route("/v1/backup/abandon", post(backup_abandon)),
        // No route reads anything: the sender has the data, and needs nothing back.
        Mode::Receive => Router::new()
            .route(receive::HAVE, post(receive::have))
            .route(receive::START, post(receive::start))
            .route(
                "/v1/backup/missing",
                post(backup_missing).layer(refs_limit()),
            )
            .route("/v1/backup/upload", post(backup_upload))
            .route(receive::COMMIT, post(receive::commit))
            .route("/v1/backup/abandon", post(backup_abandon)),
        Mode::ReadOnly => Router::new()
            .route("/v1/restore/start", post(restore_start))
            .route("/v1/restore/tree/{id}", get(restore_tree))
            .route("/v1/restore/chunk/{id}", get(restore_chunk))
            .route("/v1/restore/trees", post(restore_trees).layer(refs_limit()))
            .route(
                "/v1/restore/chunks",
                post(restore_chunks).layer(refs_limit()),
            )
            .route(
                wire::RESTORE_DELTAS,
                post(restore_deltas).layer(refs_limit()),
            ),
    };
    r.fallback(|| async { ApiError::new(Code::NotFound, "no such API route on this server") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                Code::MethodNotAllowed,
                "method not allowed: this server never deletes or replaces anything",
            )
        })
        .layer(DefaultBodyLimit::max(1 << 20))
        .layer(axum::middleware::from_fn_with_state(
            (server.limits.request, server.activity.clone()),
            super::conn::limit_body,
        ))
        .with_state(server)
}

fn refs_limit() -> DefaultBodyLimit {
    DefaultBodyLimit::max(wire::MAX_REFS_PER_REQUEST * wire::REF_LEN)
}

/// Decodes a body of refs, all of `kind`.
fn refs_of(body: Whole, kind: BlobKind) -> ApiResult<Vec<BlobRef>> {
    let refs = wire::decode_refs(&whole(body)?).map_err(|e| ApiError::new(Code::BadRequest, e))?;
    if let Some(r) = refs.iter().find(|r| r.kind != kind) {
        return Err(ApiError::new(
            Code::BadRequest,
            format!("{r} asked for where only {kind} blobs are served"),
        ));
    }
    Ok(refs)
}

/// Answers a batch read: frames of `load(ref)` for the refs in order, stopping once
/// [`wire::MAX_FRAMES_RESPONSE`] bytes are reached (the client asks for the rest).
fn frames(
    refs: &[BlobRef],
    mut load: impl FnMut(&BlobRef) -> ApiResult<Vec<u8>>,
) -> ApiResult<Vec<u8>> {
    let mut out = Vec::new();
    for r in refs {
        if out.len() >= wire::MAX_FRAMES_RESPONSE {
            break;
        }
        let bytes = load(r)?;
        wire::encode_frame_header(&mut out, r, bytes.len() as u32);
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

/// Runs engine work on a blocking thread.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(Code::Internal, format!("worker failed: {e}")))?
}

/// An id from the URL path; axum's own refusal (e.g. bytes that are not UTF-8)
/// becomes `bad_id` too.
type IdPath = Result<Path<String>, PathRejection>;

fn path_id(p: IdPath) -> ApiResult<[u8; 32]> {
    match p {
        Ok(Path(s)) => parse_id(&s),
        Err(e) => Err(ApiError::new(
            Code::BadId,
            format!(
                "not an id: {}; ids are 64 lowercase hex digits",
                e.body_text()
            ),
        )),
    }
}

fn parse_id(s: &str) -> ApiResult<[u8; 32]> {
    let mut id = [0u8; 32];
    let lower_hex = s
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if s.len() != 64 || !lower_hex || hex::decode_to_slice(s, &mut id).is_err() {
        return Err(ApiError::new(
            Code::BadId,
            format!(
                "{:?} is not an id: ids are 64 lowercase hex digits",
                s.chars().take(80).collect::<String>()
            ),
        ));
    }
    Ok(id)
}

fn octets(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
}

/// A whole small body (JSON or a list of refs); axum's own refusals (too large,
/// truncated) become API errors with their machine code.
pub(super) type Whole = Result<Bytes, BytesRejection>;

fn whole(body: Whole) -> ApiResult<Bytes> {
    body.map_err(|e| {
        let code = if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            Code::BodyTooLarge
        } else {
            Code::TruncatedBody
        };
        ApiError::new(code, format!("request body: {}", e.body_text()))
    })
}

pub(super) fn json_body<T: serde::de::DeserializeOwned>(body: Whole) -> ApiResult<T> {
    serde_json::from_slice(&whole(body)?)
        .map_err(|e| ApiError::new(Code::BadRequest, format!("request body: {e}")))
}

impl Server {
    fn current_session(&self) -> ApiResult<Arc<IngestSession<'static>>> {
        let session = self
            .session
            .lock()
            .expect("session")
            .clone()
            .ok_or_else(|| {
                ApiError::new(
                    Code::NoSession,
                    "no backup session: POST /v1/backup/start first",
                )
            })?;
        *self.session_used.lock().expect("session time") = std::time::Instant::now();
        Ok(session)
    }

    /// Refuses a new session while one is in use; abandons one left idle.
    pub(super) fn check_no_session(&self) -> ApiResult<()> {
        let mut slot = self.session.lock().expect("session");
        if slot.is_none() {
            return Ok(());
        }
        let idle = self.session_used.lock().expect("session time").elapsed();
        let unused = slot.as_ref().is_some_and(|a| Arc::strong_count(a) == 1);
        if idle >= super::SESSION_IDLE && unused {
            tracing::warn!(
                "abandoning a backup session idle for {} s (its client is gone)",
                idle.as_secs()
            );
            slot.take();
            return Ok(());
        }
        Err(ApiError::new(
            Code::SessionActive,
            "a backup session is already running on this server",
        ))
    }

    fn check_host(&self, host: &str) -> ApiResult<()> {
        match &self.host {
            Some(h) if h != host => Err(ApiError::new(
                Code::Forbidden,
                format!("this server takes backups of host {h:?} only, not {host:?}"),
            )),
            _ => Ok(()),
        }
    }
}

// ---- append-only ----

async fn backup_start(State(s): St, body: Whole) -> ApiResult<Json<wire::BackupStarted>> {
    let req: wire::BackupStart = json_body(body)?;
    s.check_host(&req.host)?;
    s.check_no_session()?;
    let server = s.clone();
    let session = blocking(move || {
        let repo = server.repo.clone();
        let parent = match req.parent.as_str() {
            "latest" => ParentChoice::Latest,
            "none" => ParentChoice::None,
            // Resolved among this host's snapshots only: other hosts' ids are
            // neither usable nor discoverable through this server.
            spec => ParentChoice::Snapshot(repo.find_snapshot_of(spec, Some(&req.host))?.0),
        };
        let info = SessionInfo {
            host: req.host,
            paths: req.paths,
            tags: req.tags,
            source: server.source,
            parent,
            scope: server.scope,
        };
        let mut session = IngestSession::start(repo, info)?;
        if let Some(own) = &server.own_packs {
            session.share_own_packs(own.clone());
        }
        Ok(session)
    })
    .await?;
    let started = wire::BackupStarted {
        chunker: session.chunker_params(),
        compression_level: s.repo.config().compression_level,
        parent_snapshot: session.parent().map(|(id, _)| id.to_hex()),
        parent_tree: session.parent_tree().map(|t| t.to_hex()),
        max_upload_body: wire::MAX_UPLOAD_BODY,
    };
    s.check_no_session()?;
    tracing::debug!(parent = ?started.parent_snapshot, "backup session started");
    *s.session.lock().expect("session") = Some(Arc::new(session));
    *s.session_used.lock().expect("session time") = std::time::Instant::now();
    Ok(Json(started))
}

async fn backup_tree(State(s): St, id: IdPath) -> ApiResult<Response> {
    let id = TreeId(path_id(id)?);
    let session = s.current_session()?;
    let bytes = blocking(move || Ok(session.read_tree(&id)?.encode())).await?;
    Ok(octets(bytes))
}

async fn backup_trees(State(s): St, body: Whole) -> ApiResult<Response> {
    let refs = refs_of(body, BlobKind::Tree)?;
    let session = s.current_session()?;
    let out =
        blocking(move || frames(&refs, |r| Ok(session.read_tree(&TreeId(r.id))?.encode()))).await?;
    Ok(octets(out))
}

async fn backup_missing(State(s): St, body: Whole) -> ApiResult<Response> {
    let refs = wire::decode_refs(&whole(body)?).map_err(|e| ApiError::new(Code::BadRequest, e))?;
    let session = s.current_session()?;
    let missing = blocking(move || Ok(session.missing(&refs)?)).await?;
    let mut out = Vec::with_capacity(missing.len() * wire::REF_LEN);
    for r in &missing {
        wire::encode_ref(&mut out, r);
    }
    Ok(octets(out))
}

/// Reads the frames of an upload as they arrive and hands each complete one to a
/// verifying thread at once: the body is always read at the speed it comes (over SSH
/// an unread channel would stall the whole connection), and memory is bounded by the
/// body limit, not by how far verification lags.
async fn backup_upload(
    State(s): St,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<wire::UploadDone>> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > wire::MAX_UPLOAD_BODY {
            return Err(too_large(len));
        }
    }
    let _permit = s.uploads.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            Code::Busy,
            format!(
                "{} uploads are already running: wait for one to finish",
                super::MAX_UPLOADS_IN_FLIGHT
            ),
        )
    })?;
    let session = s.current_session()?;
    let mut reader = FrameReader::new(s.repo.config().chunker.max_size as u64 + 64 * 1024 + 1);
    let mut body = body;
    let mut total: u64 = 0;
    let mut tasks = tokio::task::JoinSet::new();
    let mut done = wire::UploadDone::default();
    let mut failed: Option<ApiError> = None;
    let mut group: Vec<(BlobRef, Vec<u8>)> = Vec::new();
    let mut group_bytes = 0usize;
    let mut plain: u64 = 0;
    let max_chunk = s.repo.config().chunker.max_size as u64;
    let reap = |r: Result<Result<u64, ApiError>, tokio::task::JoinError>,
                done: &mut wire::UploadDone,
                failed: &mut Option<ApiError>| match r {
        Ok(Ok(new)) => done.stored += new,
        Ok(Err(e)) => {
            failed.get_or_insert(e);
        }
        Err(e) => {
            failed.get_or_insert(ApiError::new(
                Code::Internal,
                format!("verifier failed: {e}"),
            ));
        }
    };
    loop {
        let frame = body.frame().await;
        let end = frame.is_none();
        if let Some(frame) = frame {
            let frame = frame.map_err(|e| {
                ApiError::new(Code::TruncatedBody, format!("upload body ended early: {e}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            total += data.len() as u64;
            if total > wire::MAX_UPLOAD_BODY {
                return Err(too_large(total));
            }
            let before = group.len();
            reader.feed(&data, &mut group)?;
            done.received += (group.len() - before) as u64;
            for (r, b) in &group[before..] {
                group_bytes += b.len();
                // Verifying costs what the blobs decompress to: bounded per request,
                // so a compression bomb cannot buy unbounded work with a small body.
                // (A blob that does not declare its size counts as a whole chunk;
                // one that is no blob at all is refused by its verification.)
                plain += haul_protocol::chunker::declared_plain_len(b).unwrap_or(max_chunk);
                if plain > wire::MAX_UPLOAD_PLAIN {
                    return Err(ApiError::new(
                        Code::BodyTooLarge,
                        format!(
                            "the blobs of this upload (up to {r}) decompress to more than {} bytes: send fewer per request",
                            wire::MAX_UPLOAD_PLAIN
                        ),
                    ));
                }
            }
        } else {
            reader.finish()?;
        }
        // Verify and store in groups, each on a blocking thread, while the body keeps
        // being read: a group per blob would cost a thread wake-up per small file.
        if !group.is_empty() && (end || group_bytes >= VERIFY_GROUP_BYTES || group.len() >= 256) {
            while let Some(r) = tasks.try_join_next() {
                reap(r, &mut done, &mut failed);
            }
            let blobs = std::mem::take(&mut group);
            group_bytes = 0;
            if failed.is_none() {
                let session = session.clone();
                let slots = s.verifiers.clone();
                // The wait for a verifier happens in its own task, never in the loop
                // that reads the body; and verifiers are fewer than blocking threads,
                // so other requests (`missing`, parent trees) still find one.
                tasks.spawn(async move {
                    let _slot = slots.acquire_owned().await.expect("never closed");
                    tokio::task::spawn_blocking(move || {
                        slow_storage_fault();
                        let mut stored = 0;
                        for (r, encoded) in blobs {
                            stored += session.add_encoded(r.kind, &r.id, encoded)? as u64;
                        }
                        Ok(stored)
                    })
                    .await
                    .unwrap_or_else(|e| {
                        Err(ApiError::new(
                            Code::Internal,
                            format!("verifier failed: {e}"),
                        ))
                    })
                });
            }
        }
        if end {
            break;
        }
    }
    while let Some(r) = tasks.join_next().await {
        reap(r, &mut done, &mut failed);
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(Json(done)),
    }
}

/// Test builds only: `HAUL_FAULT_STORE_DELAY_MS=N` makes storing each group of an
/// upload take N ms longer, as a slow disk would, so that tests can show that a slow
/// upload stalls neither its request body nor the other traffic of the connection.
/// Release builds ignore it.
fn slow_storage_fault() {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("HAUL_FAULT_STORE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms.min(60_000)));
    }
}

/// Blobs are handed to a verifying thread in groups of about this many bytes.
const VERIFY_GROUP_BYTES: usize = 1 << 20;

/// Splits an upload body into frames as its bytes arrive, copying each blob once, into
/// a buffer with room for its seal.
struct FrameReader {
    max_blob: u64,
    header: Vec<u8>,
    current: Option<(BlobRef, Vec<u8>, usize)>,
}

impl FrameReader {
    fn new(max_blob: u64) -> Self {
        FrameReader {
            max_blob,
            header: Vec::with_capacity(FRAME_HEADER_LEN),
            current: None,
        }
    }

    /// Consumes `data`, appending every frame it completes to `out`.
    fn feed(&mut self, mut data: &[u8], out: &mut Vec<(BlobRef, Vec<u8>)>) -> ApiResult<()> {
        while !data.is_empty() {
            if let Some((_, buf, len)) = &mut self.current {
                let take = (*len - buf.len()).min(data.len());
                buf.extend_from_slice(&data[..take]);
                data = &data[take..];
            } else {
                let take = (FRAME_HEADER_LEN - self.header.len()).min(data.len());
                self.header.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.header.len() < FRAME_HEADER_LEN {
                    break;
                }
                let h: &[u8; FRAME_HEADER_LEN] = self.header[..].try_into().expect("full header");
                let (r, len) =
                    wire::decode_frame_header(h).map_err(|e| ApiError::new(Code::BadRequest, e))?;
                self.header.clear();
                if len as u64 > self.max_blob {
                    return Err(ApiError::new(
                        Code::BlobTooLarge,
                        format!("{r} of {len} encoded bytes is larger than any chunk may be"),
                    ));
                }
                let len = len as usize;
                self.current = Some((r, Vec::with_capacity(len + SEAL_ROOM), len));
            }
            if let Some((_, buf, len)) = &self.current {
                if buf.len() == *len {
                    let (r, buf, _) = self.current.take().expect("checked");
                    out.push((r, buf));
                }
            }
        }
        Ok(())
    }

    /// The body ended: refuses a frame left incomplete.
    fn finish(&self) -> ApiResult<()> {
        if let Some((r, buf, len)) = &self.current {
            return Err(ApiError::new(
                Code::TruncatedBody,
                format!(
                    "upload body ends inside the frame of {r}: {} of its {len} bytes arrived",
                    buf.len()
                ),
            ));
        }
        if !self.header.is_empty() {
            return Err(ApiError::new(
                Code::TruncatedBody,
                format!(
                    "upload body ends inside a frame header ({} of {FRAME_HEADER_LEN} bytes)",
                    self.header.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Room a blob's buffer keeps for sealing in place (nonce and tag).
const SEAL_ROOM: usize = 64;

fn too_large(len: u64) -> ApiError {
    ApiError::new(
        Code::BodyTooLarge,
        format!(
            "upload body of {len} bytes exceeds the limit of {} bytes: send fewer blobs per request",
            wire::MAX_UPLOAD_BODY
        ),
    )
}

/// Takes the session out for good (commit or abandon). Refused while uploads still
/// hold it: their blobs must be in before the completeness check.
pub(super) fn take_session(s: &Server) -> ApiResult<IngestSession<'static>> {
    let mut slot = s.session.lock().expect("session");
    let arc = slot.take().ok_or_else(|| {
        ApiError::new(
            Code::NoSession,
            "no backup session: POST /v1/backup/start first",
        )
    })?;
    match Arc::try_unwrap(arc) {
        Ok(session) => Ok(session),
        Err(arc) => {
            *slot = Some(arc);
            Err(ApiError::new(
                Code::Busy,
                "uploads of this session are still running: commit after they finish",
            ))
        }
    }
}

async fn backup_commit(State(s): St, body: Whole) -> ApiResult<Json<wire::Committed>> {
    let req: wire::Commit = json_body(body)?;
    let root = TreeId(parse_id(&req.root)?);
    let session = take_session(&s)?;
    tracing::debug!("commit asked");
    let server = s.clone();
    let (id, snap, told) = blocking(move || {
        // What the source may be told, taken before the session is consumed: in its
        // own-history scope, what was new to it, not what the repository lacked.
        let told = session.source_figures();
        let c = req.counters;
        let summary = Summary {
            files_new: c.files_new,
            files_changed: c.files_changed,
            files_unchanged: c.files_unchanged,
            dirs: c.dirs,
            bytes_read: c.bytes_read,
            bytes_total: c.bytes_total,
            warnings: c.warnings,
            ..Default::default()
        };
        let committed = session.commit(root, summary)?;
        tracing::debug!(snapshot = %committed.0.short(), "snapshot saved");
        server.committed_now(&committed);
        Ok((committed.0, committed.1, told))
    })
    .await?;
    Ok(Json(wire::Committed {
        snapshot: id.to_hex(),
        time: snap.time.to_rfc3339(),
        bytes_new: told.bytes_new,
        bytes_stored: told.bytes_stored,
        blobs_new: told.blobs_new,
    }))
}

async fn backup_abandon(State(s): St) -> ApiResult<Json<serde_json::Value>> {
    let session = take_session(&s)?;
    blocking(move || Ok(session.abandon()?)).await?;
    if let Some(r) = &s.receiving {
        r.settle(false);
    }
    Ok(Json(serde_json::json!({})))
}

// ---- read-only ----

async fn restore_start(State(s): St, body: Whole) -> ApiResult<Json<wire::RestoreStarted>> {
    let req: wire::RestoreStart = json_body(body)?;
    let server = s.clone();
    let (id, snap) = blocking(move || {
        let found = server
            .repo
            .find_snapshot_of(&req.snapshot, server.host.as_deref());
        match server.pinned {
            // The pbs chose the snapshot: the client may name it (or ask for
            // "latest"), but gets that one or nothing.
            Some(pinned) => {
                if req.snapshot != "latest" && !pinned.to_hex().starts_with(&req.snapshot) {
                    return Err(ApiError::new(
                        Code::Forbidden,
                        format!("this server streams snapshot {} only", pinned.short()),
                    ));
                }
                Ok((pinned, server.repo.load_snapshot(&pinned)?))
            }
            None => Ok(found?),
        }
    })
    .await?;
    s.check_host(&snap.host)?;
    let root = BlobRef::tree(snap.tree);
    let root_at = s.position(&root)?;
    let started = {
        let mut scope = s.restore.lock().expect("restore scope");
        match scope.as_ref() {
            // One snapshot per server: a second start may not move the scope.
            Some(existing) if existing.snapshot != id => {
                return Err(ApiError::new(
                    Code::SessionActive,
                    format!(
                        "a restore of snapshot {} is running on this server",
                        existing.snapshot.short()
                    ),
                ))
            }
            Some(_) => false,
            None => {
                let mut new = RestoreScope::new(id);
                new.add(root, root_at);
                *scope = Some(new);
                true
            }
        }
    };
    if started && !s.bases.is_empty() {
        let server = s.clone();
        let base = blocking(move || server.base_scope()).await?;
        *s.base.lock().expect("base scope") = Some(base);
    }
    Ok(Json(wire::RestoreStarted {
        snapshot: id.to_hex(),
        tree: snap.tree.to_hex(),
        host: snap.host,
        paths: snap.paths,
        time: snap.time.to_rfc3339(),
        max_chunk: s.repo.config().chunker.max_size,
    }))
}

fn no_restore() -> ApiError {
    ApiError::new(
        Code::NoSession,
        "no restore session: POST /v1/restore/start first",
    )
}

async fn restore_tree(State(s): St, id: IdPath) -> ApiResult<Response> {
    let id = TreeId(path_id(id)?);
    let server = s.clone();
    let tree = blocking(move || server.restore_load_tree(&id)).await?;
    Ok(octets(s.sending(tree.encode())))
}

async fn restore_chunk(State(s): St, id: IdPath) -> ApiResult<Response> {
    let id = ChunkId(path_id(id)?);
    let b = BlobRef::data(id);
    let server = s.clone();
    let bytes = blocking(move || {
        let at = server.in_scope(&b)?;
        server.load_in_scope(&b, at)
    })
    .await?;
    Ok(octets(s.sending(bytes)))
}

impl Server {
    /// Where the index has `r`: its position (see `Index::locate`) and place.
    fn locate(&self, r: &BlobRef) -> ApiResult<Option<(usize, BlobLocation)>> {
        Ok(self.repo.index().locate(r.kind, &r.id)?)
    }

    fn position(&self, r: &BlobRef) -> ApiResult<Option<usize>> {
        Ok(self.locate(r)?.map(|(at, _)| at))
    }

    /// Checks that a restore session may read `r`, reading the snapshot's unread trees
    /// for it if it is not reached yet (see `RestoreScope`); where the index has it, if
    /// it does. Blocks: call it off the async workers.
    fn in_scope(&self, r: &BlobRef) -> ApiResult<Option<BlobLocation>> {
        if self.restore.lock().expect("restore scope").is_none() {
            return Err(no_restore());
        }
        let found = self.locate(r)?;
        if self.reach(&self.restore, r, found.map(|(at, _)| at))? {
            Ok(found.map(|(_, loc)| loc))
        } else {
            Err(ApiError::new(
                Code::Forbidden,
                format!("{r} is not part of the snapshot being restored"),
            ))
        }
    }

    /// Whether `r` (found `at` in the index) is in `scope`, reading the scope's unread
    /// trees for it if it is not reached yet. False without a scope.
    fn reach(
        &self,
        scope: &Mutex<Option<RestoreScope>>,
        r: &BlobRef,
        at: Option<usize>,
    ) -> ApiResult<bool> {
        let reached = || {
            let scope = scope.lock().expect("restore scope");
            scope.as_ref().is_some_and(|s| s.contains(r, at))
        };
        if reached() {
            return Ok(true);
        }
        let _one = self.widening.lock().expect("widening");
        loop {
            if reached() {
                return Ok(true);
            }
            let next = scope
                .lock()
                .expect("restore scope")
                .as_mut()
                .and_then(|s| s.unread.pop());
            let Some((tree, at)) = next else {
                return Ok(false);
            };
            let read = scope
                .lock()
                .expect("restore scope")
                .as_ref()
                .is_some_and(|s| s.read.get(at));
            if !read {
                self.read_into_scope(scope, &tree)?;
            }
        }
    }

    /// The scope of the chunks a client may name as bases: the trees of the snapshots
    /// pushed to it before (those still in the repository).
    fn base_scope(&self) -> ApiResult<RestoreScope> {
        let mut scope = RestoreScope::new(self.bases[0]);
        for id in &self.bases {
            let Ok(snap) = self.repo.load_snapshot(id) else {
                continue; // forgotten since: nothing of it is a base
            };
            let root = BlobRef::tree(snap.tree);
            scope.add(root, self.position(&root)?);
        }
        Ok(scope)
    }

    /// Reads `tree` (in `scope`) and widens the scope to what it names. (A page index
    /// names its pages.)
    fn read_into_scope(
        &self,
        scope: &Mutex<Option<RestoreScope>>,
        id: &TreeId,
    ) -> ApiResult<haul_protocol::tree::TreeBlob> {
        let tree = self.repo.load_tree(id)?;
        // Located before the lock is taken: each look-up may read the index cache.
        let own = self.position(&BlobRef::tree(*id))?;
        let mut named = Vec::new();
        let trees = tree.subtrees().into_iter().map(BlobRef::tree);
        for b in trees.chain(tree.chunks().map(|c| BlobRef::data(*c))) {
            named.push((b, self.position(&b)?));
        }
        let mut scope = scope.lock().expect("restore scope");
        if let Some(scope) = scope.as_mut() {
            if let Some(at) = own {
                scope.read.set(at);
            }
            for (b, at) in named {
                scope.add(b, at);
            }
        }
        Ok(tree)
    }

    /// The stored (encoded) bytes of `r`, which [`Server::in_scope`] found `at`.
    fn load_in_scope(&self, r: &BlobRef, at: Option<BlobLocation>) -> ApiResult<Vec<u8>> {
        Ok(match at {
            Some(loc) => self.repo.load_encoded_at(r.kind, &r.id, &loc)?,
            None => self.repo.load_encoded(r.kind, &r.id)?, // says what is missing
        })
    }

    /// Loads a tree of the snapshot being restored and widens the scope to what it names.
    fn restore_load_tree(&self, id: &TreeId) -> ApiResult<haul_protocol::tree::TreeBlob> {
        self.in_scope(&BlobRef::tree(*id))?;
        self.read_into_scope(&self.restore, id)
    }
}

async fn restore_trees(State(s): St, body: Whole) -> ApiResult<Response> {
    let refs = refs_of(body, BlobKind::Tree)?;
    let server = s.clone();
    let out = blocking(move || {
        frames(&refs, |r| {
            damaged_as_empty(server.restore_load_tree(&TreeId(r.id)).map(|t| t.encode()))
        })
    })
    .await?;
    Ok(octets(s.sending(out)))
}

/// In a restore's batch read, a blob that cannot be read (missing, damaged) is an
/// empty frame, so that one damaged blob does not fail the whole batch: the client
/// asks for it alone and gets the reason (no stored blob encodes to zero bytes).
fn damaged_as_empty(loaded: ApiResult<Vec<u8>>) -> ApiResult<Vec<u8>> {
    match loaded {
        // Not `internal` (an I/O error of the repository's disk): that fails the restore
        // rather than leave it hollow.
        Err(e) if matches!(e.code, Code::RepositoryCorrupt | Code::UnknownObject) => Ok(Vec::new()),
        other => other,
    }
}

async fn restore_chunks(State(s): St, body: Whole) -> ApiResult<Response> {
    let refs = refs_of(body, BlobKind::Data)?;
    let server = s.clone();
    let out = blocking(move || {
        let mut found = Vec::with_capacity(refs.len());
        for r in &refs {
            found.push(server.in_scope(r)?);
        }
        let mut at = found.into_iter();
        frames(&refs, |r| {
            damaged_as_empty(server.load_in_scope(r, at.next().flatten()))
        })
    })
    .await?;
    Ok(octets(s.sending(out)))
}

/// Chunks for a push, each in its transfer encoding or, when its ask names bases the
/// client may build on (chunks of a snapshot pushed to it before, see
/// `Server::with_bases`) and the delta is smaller, as a delta against those. Each chunk
/// must be in the snapshot being pushed; a base out of reach is ignored (the client's
/// copy may be older or newer than the pbs knows), never an error.
async fn restore_deltas(State(s): St, body: Whole) -> ApiResult<Response> {
    let asks =
        wire::decode_delta_asks(&whole(body)?).map_err(|e| ApiError::new(Code::BadRequest, e))?;
    let server = s.clone();
    let out = blocking(move || {
        let mut found = Vec::with_capacity(asks.len());
        for (chunk, _) in &asks {
            found.push(server.in_scope(&BlobRef::data(*chunk))?);
        }
        // Like `frames`, and also stops once the deltas made read MAX_DELTA_WORK bytes
        // of plaintext: small deltas must not let one request make the server read and
        // compress without end.
        let mut out = Vec::new();
        let mut work = 0usize;
        for ((chunk, bases), at) in asks.iter().zip(found) {
            if out.len() >= wire::MAX_FRAMES_RESPONSE || work >= MAX_DELTA_WORK {
                break;
            }
            let r = BlobRef::data(*chunk);
            let stored = damaged_as_empty(server.load_in_scope(&r, at))?;
            let bytes = if bases.is_empty() || stored.is_empty() {
                stored
            } else {
                server.as_delta(chunk, bases, stored, &mut work)?
            };
            wire::encode_frame_header(&mut out, &r, bytes.len() as u32);
            out.extend_from_slice(&bytes);
        }
        Ok(out)
    })
    .await?;
    Ok(octets(s.sending(out)))
}

impl Server {
    /// `chunk` (whose transfer encoding is `stored`) as a delta against `bases`, if the
    /// client may build on each of them and the delta is smaller; else `stored`. Adds
    /// the plaintext it read to `work`.
    fn as_delta(
        &self,
        chunk: &ChunkId,
        bases: &[ChunkId],
        stored: Vec<u8>,
        work: &mut usize,
    ) -> ApiResult<Vec<u8>> {
        let mut old = Vec::new();
        for base in bases {
            let b = BlobRef::data(*base);
            if !self.reach(&self.base, &b, self.position(&b)?)? {
                return Ok(stored);
            }
            match self.repo.load_chunk(base) {
                Ok(plain) => old.extend_from_slice(&plain),
                Err(_) => return Ok(stored),
            }
        }
        // The chunk itself is `stored` (read and opened already).
        let Ok(plain) = self.repo.decode_chunk(chunk, stored.clone()) else {
            return Ok(stored);
        };
        *work += old.len() + plain.len();
        match haul_protocol::chunker::encode_delta(bases, &old, &plain, DELTA_LEVEL) {
            Ok(delta) if delta.len() < stored.len() => {
                self.deltas
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(delta)
            }
            _ => Ok(stored),
        }
    }
}

/// Plaintext one `deltas` answer reads to make its deltas, about: past it the answer
/// stops (the client asks for the rest).
const MAX_DELTA_WORK: usize = 64 << 20;

/// The zstd level of deltas: they are made for each push, and what they carry is the
/// few bytes that changed.
const DELTA_LEVEL: i32 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use haul_protocol::ChunkId;

    fn body(blobs: &[Vec<u8>]) -> (Vec<u8>, Vec<(BlobRef, Vec<u8>)>) {
        let mut out = Vec::new();
        let mut want = Vec::new();
        for b in blobs {
            let r = BlobRef::data(ChunkId::of(b));
            wire::encode_frame_header(&mut out, &r, b.len() as u32);
            out.extend_from_slice(b);
            want.push((r, b.clone()));
        }
        (out, want)
    }

    #[test]
    fn frames_come_out_whole_however_the_body_is_split() {
        let blobs = vec![
            vec![1u8; 5],
            (0..70_000u32).map(|i| i as u8).collect(),
            vec![9],
        ];
        let (bytes, want) = body(&blobs);
        for step in [1, 7, FRAME_HEADER_LEN, 4096, bytes.len()] {
            let mut r = FrameReader::new(1 << 20);
            let mut got = Vec::new();
            for piece in bytes.chunks(step) {
                r.feed(piece, &mut got).unwrap();
            }
            r.finish().unwrap();
            assert_eq!(got, want, "step {step}");
        }
    }

    #[test]
    fn cut_and_oversized_frames_are_refused() {
        let (bytes, _) = body(&[vec![7u8; 100]]);
        let mut r = FrameReader::new(1 << 20);
        r.feed(&bytes[..50], &mut Vec::new()).unwrap();
        let e = r.finish().unwrap_err();
        assert_eq!(e.code, Code::TruncatedBody);
        assert!(e.message.contains("13 of its 100 bytes"), "{}", e.message);
        let mut r = FrameReader::new(1 << 20);
        r.feed(&bytes[..10], &mut Vec::new()).unwrap();
        assert_eq!(r.finish().unwrap_err().code, Code::TruncatedBody);
        let mut r = FrameReader::new(99);
        let e = r.feed(&bytes, &mut Vec::new()).unwrap_err();
        assert_eq!(e.code, Code::BlobTooLarge);
    }
}
