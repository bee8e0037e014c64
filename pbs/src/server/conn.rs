//! The repository server's connections, wherever they come from (its Unix listener, or
//! an SSH channel a host forwarded), and the limits that keep one client from holding
//! the server: how long a request may stall, how many connections may be open, and how
//! long a stopping server waits for the ones still open.
//!
//! A source host is not trusted to behave: a request head sent a byte at a time, a body
//! that stops halfway, a connection opened and left must each end by themselves, free
//! what they held (an upload slot, the session), and never keep the server from
//! stopping.

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Time limits of a server's connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request head must arrive whole within this long, and a request body may send
    /// nothing for at most this long. An idle kept-alive connection is closed after it
    /// too (clients do not reuse connections idle for half as long, see the agent's
    /// client).
    pub request: Duration,
    /// After a shutdown is asked for, connections still open this long are closed.
    pub grace: Duration,
    /// A run whose agent prints nothing and sends nothing for this long is stopped
    /// (the agent prints its progress every second).
    pub stall: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request: Duration::from_secs(60),
            grace: Duration::from_secs(10),
            stall: Duration::from_secs(10 * 60),
        }
    }
}

/// Watches a run for stalls: the agent's output and the server's requests both count
/// as life.
pub struct Watchdog {
    limit: Duration,
    activity: Arc<Activity>,
    output: Instant,
}

impl Watchdog {
    pub fn new(server: &super::Server) -> Watchdog {
        Watchdog {
            limit: server.limits.stall,
            activity: server.activity.clone(),
            output: Instant::now(),
        }
    }

    /// The agent printed something.
    pub fn output(&mut self) {
        self.output = Instant::now();
    }

    /// When the run last showed life: the agent's output or a request.
    fn last_life(&self) -> Instant {
        self.output.max(self.activity.last())
    }

    /// How long to wait for the agent's next output before [`Watchdog::stalled`] is
    /// asked again.
    pub fn wait(&self) -> Duration {
        (self.last_life() + self.limit)
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100))
    }

    /// The error of a stalled run, once it is one.
    pub fn stalled(&self) -> Option<String> {
        (self.last_life().elapsed() >= self.limit).then(|| {
            format!(
                "the run stalled: the agent printed nothing and sent no request for {}; it was stopped (raise [server].stall_timeout or --stall-timeout if the host is just slow)",
                humantime::format_duration(self.limit)
            )
        })
    }
}

/// Connections one listener serves at once; more wait to be accepted.
pub const MAX_CONNECTIONS: usize = 64;

/// When the server last saw a request or body bytes, and how many requests it is
/// handling: a run's watchdog reads it (a long commit is work, not a stall).
#[derive(Debug)]
pub struct Activity {
    last: std::sync::Mutex<Instant>,
    handling: std::sync::atomic::AtomicUsize,
    /// Request body bytes received: what the run's record reports as received, counted
    /// here rather than taken from the agent's word.
    received: std::sync::atomic::AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            last: std::sync::Mutex::new(Instant::now()),
            handling: Default::default(),
            received: Default::default(),
        }
    }
}

impl Activity {
    pub fn touch(&self) {
        *self.last.lock().expect("activity") = Instant::now();
    }
    /// Request body bytes received so far.
    pub fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// When the server last saw something, or now while it handles a request.
    pub fn last(&self) -> Instant {
        if self.handling.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            return Instant::now();
        }
        *self.last.lock().expect("activity")
    }
}

/// Counts a request as being handled while it lives.
struct Handling(Arc<Activity>);

impl Handling {
    fn new(activity: Arc<Activity>) -> Handling {
        activity
            .handling
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Handling(activity)
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.touch();
        self.0
            .handling
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Serves `router` on every connection `listener` accepts, [`MAX_CONNECTIONS`] at a
/// time, each under `limits`, until `shutdown`; then connections in progress get
/// `limits.grace` to finish. `accepted` is called for each connection.
pub async fn serve_listener<L>(
    mut listener: L,
    router: axum::Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    accepted: impl Fn(),
) where
    L: axum::serve::Listener,
    L::Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut open = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
            _ = &mut shutdown => break,
        };
        // `accept` waits out errors (out of file descriptors, say) by itself.
        let stream = tokio::select! {
            (stream, _) = listener.accept() => stream,
            _ = &mut shutdown => break,
        };
        accepted();
        let (app, watcher) = (router.clone(), graceful.watcher());
        open.spawn(async move {
            serve_connection(stream, app, limits, Some(watcher)).await;
            drop(slot);
        });
        // Reap the connections that ended, so the set does not grow with the run.
        while open.try_join_next().is_some() {}
    }
    drop(listener);
    let drained = async {
        graceful.shutdown().await;
        while open.join_next().await.is_some() {}
    };
    if tokio::time::timeout(limits.grace, drained).await.is_err() {
        tracing::warn!(
            "connections still open {} s after the shutdown began were closed",
            limits.grace.as_secs()
        );
    }
}

/// Serves one connection with `router` until the client closes it, a limit cuts it,
/// or `graceful` (when given) asks it to finish.
pub async fn serve_connection<I>(
    io: I,
    router: axum::Router,
    limits: Limits,
    graceful: Option<hyper_util::server::graceful::Watcher>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(WriteStall::new(io, limits.request));
    let service = hyper_util::service::TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.request)
        .serve_connection(io, service);
    let result = match graceful {
        Some(g) => g.watch(conn).await,
        None => conn.await,
    };
    if let Err(e) = result {
        tracing::debug!("connection ended: {e}");
    }
}

/// A connection whose answers cannot be written for `limit` (the client reads none)
/// fails instead of waiting: over SSH a stalled channel would otherwise hold, behind it,
/// everything the host sends on the whole connection.
struct WriteStall<I> {
    io: I,
    limit: Duration,
    blocked: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteStall<I> {
    fn new(io: I, limit: Duration) -> Self {
        WriteStall {
            io,
            limit,
            blocked: None,
        }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteStall<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> WriteStall<I> {
    /// Runs one write-side poll; a `Pending` that lasts past the limit is an error.
    fn guard<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        poll: impl FnOnce(
            std::pin::Pin<&mut I>,
            &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        match poll(std::pin::Pin::new(&mut self.io), cx) {
            std::task::Poll::Ready(r) => {
                self.blocked = None;
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending => {
                let limit = self.limit;
                let timer = self
                    .blocked
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the client read nothing for {} s", limit.as_secs()),
                    ))),
                    std::task::Poll::Pending => std::task::Poll::Pending,
                }
            }
        }
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteStall<I> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.get_mut().guard(cx, |io, cx| io.poll_write(cx, buf))
    }
    /// Vectored writes pass through: without them hyper copies every answer body into
    /// its own buffer before writing it (32 MiB more at the peak of a restore).
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.get_mut()
            .guard(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.get_mut().guard(cx, |io, cx| io.poll_flush(cx))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.get_mut().guard(cx, |io, cx| io.poll_shutdown(cx))
    }
}

/// The layer every route passes through: notes activity, and cuts a request body that
/// sends nothing for `idle` (the handler then sees the body end early and refuses it
/// as `truncated_body`).
pub async fn limit_body(
    axum::extract::State((idle, activity)): axum::extract::State<(Duration, Arc<Activity>)>,
    request: Request,
    next: Next,
) -> Response {
    activity.touch();
    let _handling = Handling::new(activity.clone());
    let (parts, body) = request.into_parts();
    let stream = futures_util::stream::unfold(
        Some((body.into_data_stream(), activity)),
        move |state| async move {
            let (mut data, activity) = state?;
            match tokio::time::timeout(idle, data.next()).await {
                Ok(Some(item)) => {
                    activity.touch();
                    if let Ok(bytes) = &item {
                        activity
                            .received
                            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    Some((item, Some((data, activity))))
                }
                Ok(None) => None,
                Err(_) => Some((
                    Err(axum::Error::new(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no body bytes for {} s", idle.as_secs()),
                    ))),
                    None,
                )),
            }
        },
    );
    next.run(Request::from_parts(parts, Body::from_stream(stream)))
        .await
}
