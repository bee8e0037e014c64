//! The repository server: the ingest protocol (`haul_protocol::wire`) over HTTP/1.1 on
//! a Unix socket, as a thin adapter over the engine's sessions.
//!
//! - [`Mode::AppendOnly`]: one backup session at a time (start, parent trees, which are
//!   missing, upload, commit); nothing can be read but the parent's trees, nothing
//!   deleted or overwritten.
//! - [`Mode::Receive`]: copies from another pbs ([`receive`]): sessions as append-only,
//!   for the hosts the forced command allows, keeping the originals' times.
//! - [`Mode::ReadOnly`]: one snapshot is streamed out; only trees and chunks reachable
//!   from it can be read.
//!
//! The socket lives in a directory only its owner can enter (0700) and is itself 0600;
//! [`bind`] refuses to start over a live socket and replaces a stale one, and the
//! returned guard removes the socket when the server ends.

mod api;
pub mod conn;
pub mod error;
pub mod receive;

use crate::error::CliError;
use haul_protocol::{BlobKind, BlobRef, SnapshotId, TreeId};
use haul_repo::format::snapshot::{Snapshot, SourceKind};
use haul_repo::ingest::{DedupScope, IngestSession, OwnPacks};
use haul_repo::usage::Marks;
use haul_repo::IndexedRepository;
use std::collections::HashSet;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    AppendOnly,
    ReadOnly,
    Receive,
}

/// Most upload requests handled at once; more are refused with `busy`. With the
/// largest body this bounds what the server holds of uploads in memory.
pub use haul_protocol::wire::MAX_UPLOADS_IN_FLIGHT;

/// A backup session with no request for this long is abandoned when a new one
/// starts, so a long-running server is not blocked for ever by a client that died.
pub const SESSION_IDLE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// What one server serves, and what it has done.
/// See [`Server::on_commit`].
pub type CommitHook = Box<dyn Fn(&SnapshotId) + Send + Sync>;

pub struct Server {
    repo: Arc<IndexedRepository>,
    mode: Mode,
    /// When set, sessions may only be for this host (a pull knows whom it pulls).
    host: Option<String>,
    source: SourceKind,
    session: Mutex<Option<Arc<IngestSession<'static>>>>,
    /// When the session was last used: one idle for [`SESSION_IDLE`] is abandoned
    /// when another client starts (its agent died without saying so).
    session_used: Mutex<std::time::Instant>,
    committed: Mutex<Option<(SnapshotId, Snapshot)>>,
    /// Called when a session's snapshot is saved, before the agent is answered.
    on_commit: Option<CommitHook>,
    restore: Mutex<Option<RestoreScope>>,
    /// Held by whoever reads unread trees for a blob out of reach (one at a time).
    widening: Mutex<()>,
    /// Snapshots pushed to a clone before: their chunks may be the bases of deltas
    /// (`POST /v1/restore/deltas`), and the scope of those bases once a restore starts.
    bases: Vec<SnapshotId>,
    base: Mutex<Option<RestoreScope>>,
    /// Chunks sent as deltas.
    deltas: AtomicU64,
    /// The one snapshot a read-only server may stream, when the pbs chose it (a
    /// restore onto a host: the agent there must not pick another).
    pinned: Option<SnapshotId>,
    connections: AtomicU64,
    /// Bytes of trees and chunks a read-only server sent (response bodies).
    sent: AtomicU64,
    /// Time limits of its connections.
    limits: conn::Limits,
    /// What a backup session's source may build on without sending it.
    scope: DedupScope,
    /// The packs this host's uncommitted sessions wrote (see
    /// `IngestSession::share_own_packs`).
    own_packs: Option<OwnPacks>,
    /// When it last saw a request or body bytes.
    activity: Arc<conn::Activity>,
    uploads: Arc<tokio::sync::Semaphore>,
    /// Verification work running at once (one per CPU).
    verifiers: Arc<tokio::sync::Semaphore>,
    /// What a server in [`Mode::Receive`] keeps besides its session.
    receiving: Option<receive::Receiving>,
}

/// What a restore session may read: the snapshot's trees and the chunks they name,
/// learnt as its trees are read (so nothing else in the repository can be asked for),
/// a bit per blob by its index position, however many files the snapshot has.
///
/// A client may read some trees from elsewhere (a standby copy keeps the trees of the
/// snapshot it holds) and ask for what they name without having asked for them. So a
/// blob not reached yet is looked for by reading, here, the trees reached and not read
/// yet (`unread`), until it is found or none is left: the scope is the same, only
/// learnt by the server itself.
struct RestoreScope {
    snapshot: SnapshotId,
    reached: Marks,
    /// Trees whose names are in the scope (by index position).
    read: Marks,
    /// Trees reached and perhaps not read yet, with their index positions: at most one
    /// entry per tree of the snapshot.
    unread: Vec<(TreeId, usize)>,
    /// Blobs its trees name that the index lacks (a damaged repository): asking for
    /// one says it is not found, not that it is out of scope.
    absent: HashSet<BlobRef>,
}

impl RestoreScope {
    fn new(snapshot: SnapshotId) -> RestoreScope {
        RestoreScope {
            snapshot,
            reached: Marks::default(),
            read: Marks::default(),
            unread: Vec::new(),
            absent: HashSet::new(),
        }
    }

    /// Adds `b`, found `at` its index position (or not found).
    fn add(&mut self, b: BlobRef, at: Option<usize>) {
        match at {
            Some(at) => {
                if self.reached.set(at) && b.kind == BlobKind::Tree {
                    self.unread.push((TreeId(b.id), at));
                }
            }
            None => {
                self.absent.insert(b);
            }
        }
    }

    fn contains(&self, b: &BlobRef, at: Option<usize>) -> bool {
        match at {
            Some(at) => self.reached.get(at),
            None => self.absent.contains(b),
        }
    }
}

impl Server {
    /// A server for `repo`. A process opens a repository once and serves all its runs
    /// from it (the daemon and `pull --all` share one per repository: see
    /// `crate::repos`): one repository's memory per process, not one per run.
    pub fn new(repo: Arc<IndexedRepository>, mode: Mode, host: Option<String>) -> Arc<Server> {
        Arc::new(Server {
            repo,
            mode,
            host,
            source: SourceKind::Pull,
            session: Mutex::new(None),
            session_used: Mutex::new(std::time::Instant::now()),
            committed: Mutex::new(None),
            on_commit: None,
            restore: Mutex::new(None),
            widening: Mutex::new(()),
            bases: Vec::new(),
            base: Mutex::new(None),
            deltas: AtomicU64::new(0),
            pinned: None,
            connections: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            limits: conn::Limits::default(),
            scope: DedupScope::default(),
            own_packs: None,
            activity: Arc::default(),
            uploads: Arc::new(tokio::sync::Semaphore::new(MAX_UPLOADS_IN_FLIGHT)),
            verifiers: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2),
            )),
            receiving: None,
        })
    }

    /// A server for copies from another pbs ([`Mode::Receive`]): snapshots of `hosts`
    /// (empty: any), the packs of each host's cut-short copies remembered in `history`.
    pub fn receiving(
        repo: Arc<IndexedRepository>,
        hosts: Vec<String>,
        history: crate::history::History,
    ) -> Arc<Server> {
        Server::new(repo, Mode::Receive, None).configured(|s| {
            s.receiving = Some(receive::Receiving {
                hosts,
                history,
                own: Mutex::new(None),
                known: Mutex::new(None),
            })
        })
    }

    /// Bytes of trees and chunks this server sent to restores.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Chunks this server sent as deltas against a chunk of an earlier push.
    pub fn deltas_sent(&self) -> u64 {
        self.deltas.load(Relaxed)
    }

    /// Counts a restore response's body.
    pub(crate) fn sending(&self, bytes: Vec<u8>) -> Vec<u8> {
        self.sent
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        bytes
    }

    /// Request body bytes this server received.
    pub fn bytes_received(&self) -> u64 {
        self.activity.received()
    }

    /// Changes a setting of a server nobody serves with yet (the builder methods below).
    fn configured(self: Arc<Self>, set: impl FnOnce(&mut Server)) -> Arc<Self> {
        let mut s = Arc::try_unwrap(self).unwrap_or_else(|_| panic!("configured before use"));
        set(&mut s);
        Arc::new(s)
    }

    /// Other time limits than the defaults (see [`conn::Limits`]).
    pub fn with_limits(self: Arc<Self>, limits: conn::Limits) -> Arc<Self> {
        self.configured(|s| s.limits = limits)
    }

    /// Lets sessions build on everything in the repository, not only on their own
    /// host's history (see [`DedupScope`]).
    pub fn with_scope(self: Arc<Self>, scope: DedupScope) -> Arc<Self> {
        self.configured(|s| s.scope = scope)
    }

    /// Sessions count the blobs of `own` (packs earlier sessions of the host wrote and
    /// never committed) as the host's own, and add the packs they write to it.
    pub fn with_own_packs(self: Arc<Self>, own: OwnPacks) -> Arc<Self> {
        self.configured(|s| s.own_packs = Some(own))
    }

    pub fn limits(&self) -> conn::Limits {
        self.limits
    }

    /// Restricts a read-only server to one snapshot.
    pub fn pinned_to(self: Arc<Self>, snapshot: SnapshotId) -> Arc<Self> {
        self.configured(|s| s.pinned = Some(snapshot))
    }

    /// Lets a client name chunks of these snapshots (pushed to it before, so it was
    /// allowed to read them) as the bases of deltas.
    pub fn with_bases(self: Arc<Self>, snapshots: Vec<SnapshotId>) -> Arc<Self> {
        self.configured(|s| s.bases = snapshots)
    }

    /// Calls `hook` with each snapshot a session of this server saves (a run notes it
    /// in its marker, so that a pbs killed between the commit and the run's record is
    /// later recorded as having saved it).
    pub fn on_commit(self: Arc<Self>, hook: CommitHook) -> Arc<Self> {
        self.configured(|s| s.on_commit = Some(hook))
    }

    pub(crate) fn committed_now(&self, committed: &(SnapshotId, Snapshot)) {
        *self.committed.lock().expect("committed") = Some(committed.clone());
        if let Some(hook) = &self.on_commit {
            hook(&committed.0);
        }
    }

    pub fn with_source(self: Arc<Self>, source: SourceKind) -> Arc<Self> {
        self.configured(|s| s.source = source)
    }

    /// Counts a connection that did not come through the listener (a channel
    /// forwarded over SSH).
    pub fn count_connection(&self) {
        self.connections.fetch_add(1, Relaxed);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Relaxed)
    }

    /// The snapshot the last session committed, if one did.
    pub fn committed(&self) -> Option<(SnapshotId, Snapshot)> {
        self.committed.lock().expect("committed").clone()
    }

    /// Ends a session that did not commit; what it stored stays usable.
    pub fn abandon_session(&self) {
        let session = self.session.lock().expect("session").take();
        if let Some(s) = session {
            // Dropping the last reference flushes its packs and index.
            drop(s);
        }
    }

    /// Ends a receiving server's session that was not committed (its sender went
    /// away): waits (a bounded time) for the verifications of its last upload, which
    /// hold it, writes its last packs, and only then notes the packs it wrote for the
    /// host's next copy. Called outside the runtime.
    pub fn end_receiving(&self) {
        let mut slot = self.session.lock().expect("session").take();
        for _ in 0..1200 {
            match slot.map(Arc::try_unwrap) {
                None => break,
                Some(Ok(session)) => {
                    if let Err(e) = session.abandon() {
                        tracing::warn!("ending the session: {e}");
                    }
                    break;
                }
                Some(Err(shared)) => {
                    slot = Some(shared);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
        if let Some(r) = &self.receiving {
            r.settle(false);
        }
    }
}

/// The API's routes for `server`, to serve on any connection.
pub fn router(server: Arc<Server>) -> axum::Router {
    api::router(server)
}

/// Removes the socket file when the server ends, however it ends.
pub struct SocketGuard {
    pub path: PathBuf,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds a Unix socket at `path`, in a private directory, for the owner only. Must be
/// called inside a tokio runtime.
pub fn bind(path: &Path) -> Result<(tokio::net::UnixListener, SocketGuard), CliError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match std::fs::metadata(dir) {
        Ok(m) => {
            if !m.is_dir() {
                return Err(CliError::usage(format!(
                    "socket directory {} is not a directory",
                    dir.display()
                )));
            }
            if m.mode() & 0o077 != 0 || m.uid() != unsafe { libc::geteuid() } {
                return Err(CliError::usage(format!(
                    "socket directory {} must belong to this user and be private (mode 0700, it is {:o}): chmod 700 it or choose another",
                    dir.display(),
                    m.mode() & 0o7777
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    CliError::Io(
                        format!("cannot create socket directory {}", dir.display()),
                        e,
                    )
                })?;
        }
        Err(e) => {
            return Err(CliError::Io(
                format!("socket directory {}", dir.display()),
                e,
            ))
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(CliError::usage(format!(
                    "a server is already listening on {}: stop it or choose another socket",
                    path.display()
                )));
            }
            // Nobody answers: a stale socket of a server that died.
            std::fs::remove_file(path).map_err(|e| {
                CliError::Io(format!("cannot remove stale socket {}", path.display()), e)
            })?;
        }
        Ok(_) => {
            return Err(CliError::usage(format!(
                "{} exists and is not a socket: refusing to replace it",
                path.display()
            )))
        }
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| CliError::Io(format!("cannot listen on {}", path.display()), e))?;
    let guard = SocketGuard {
        path: path.to_path_buf(),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| CliError::Io(format!("cannot restrict {}", path.display()), e))?;
    Ok((listener, guard))
}

/// Serves `server` on `socket` until `shutdown` resolves; then stops accepting, lets
/// requests in progress finish for the grace period of its [`conn::Limits`], closes
/// what is still open, and returns. At most [`conn::MAX_CONNECTIONS`] connections are
/// served at once. A session that did not commit is abandoned safely (its packs and
/// index are kept).
pub async fn serve(
    server: Arc<Server>,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), CliError> {
    let app = api::router(server.clone());
    let counted = server.clone();
    conn::serve_listener(listener, app, server.limits, shutdown, move || {
        counted.count_connection()
    })
    .await;
    server.abandon_session();
    Ok(())
}
