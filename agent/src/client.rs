//! HTTP/1.1 client of the pbs's repository server, over a Unix socket.
//!
//! A fixed pool of at most [`MAX_CONNECTIONS`] kept-alive hyper connections serves
//! every request of a run, however many files it has (restic once ran out of ports by
//! opening a connection per request). A request waits for a free connection; a
//! connection opens only when none is idle and fewer than the maximum exist. Every
//! response body is read to its end before the connection is reused. A connection idle
//! for [`wire::CLIENT_IDLE_REUSE`] is not reused: the server closes idle ones, and one
//! it is closing must not be handed a request.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use haul_protocol::wire;

pub use wire::MAX_CONNECTIONS;

/// A request and its answer of at most this many bytes in all time the round trip.
const SMALL_EXCHANGE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the repository server at {socket}: {source}")]
    Connect {
        socket: String,
        source: std::io::Error,
    },
    #[error("repository server connection: {0}")]
    Http(#[from] hyper::Error),
    /// The server refused, with its machine code and message.
    #[error("server refused {what} ({code}): {message}")]
    Api {
        what: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer to {what}: {detail}")]
    Protocol { what: String, detail: String },
}

pub struct Client {
    socket: PathBuf,
    /// Idle connections, with when each was last used.
    idle: Mutex<Vec<(SendRequest<Full<Bytes>>, Instant)>>,
    slots: tokio::sync::Semaphore,
    opened: AtomicU64,
    /// The shortest small exchange so far, in microseconds (see [`Client::round_trip`]).
    rtt_us: AtomicU64,
}

impl Client {
    pub fn new(socket: PathBuf) -> Client {
        Client {
            socket,
            idle: Mutex::new(Vec::new()),
            slots: tokio::sync::Semaphore::new(MAX_CONNECTIONS),
            opened: AtomicU64::new(0),
            rtt_us: AtomicU64::new(u64::MAX),
        }
    }

    /// About the round-trip time to the server: the shortest time a small request
    /// took to be answered (server work included), once one was.
    pub fn round_trip(&self) -> Option<Duration> {
        let us = self.rtt_us.load(Relaxed);
        (us != u64::MAX).then(|| Duration::from_micros(us))
    }

    /// Connections opened so far.
    pub fn connections_opened(&self) -> u64 {
        self.opened.load(Relaxed)
    }

    async fn connection(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        loop {
            let idle = self.idle.lock().expect("pool").pop();
            match idle {
                Some((mut s, used)) => {
                    if used.elapsed() < wire::CLIENT_IDLE_REUSE && s.ready().await.is_ok() {
                        return Ok(s);
                    }
                    // Closed by the server meanwhile, or soon to be: drop it, try the next.
                }
                None => break,
            }
        }
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: self.socket.display().to_string(),
                source,
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.opened.fetch_add(1, Relaxed);
        Ok(sender)
    }

    /// Sends one request and reads the whole answer. A refusal becomes
    /// [`ClientError::Api`] with the server's code and message.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Bytes, ClientError> {
        let _slot = self.slots.acquire().await.expect("never closed");
        let mut sender = self.connection().await?;
        let sent_bytes = body.len();
        let started = Instant::now();
        let req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, "haul-pbs")
            .header(hyper::header::CONTENT_LENGTH, body.len())
            .body(Full::new(body))
            .expect("valid request");
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if sent_bytes + bytes.len() <= SMALL_EXCHANGE {
            let us = started.elapsed().as_micros().min(u64::MAX as u128 - 1) as u64;
            self.rtt_us.fetch_min(us, Relaxed);
        }
        self.idle
            .lock()
            .expect("pool")
            .push((sender, Instant::now()));
        if status != StatusCode::OK {
            let what = format!("{method} {path}");
            return Err(
                match serde_json::from_slice::<haul_protocol::wire::ErrorBody>(&bytes) {
                    Ok(e) => ClientError::Api {
                        what,
                        status: status.as_u16(),
                        code: e.error.code,
                        message: e.error.message,
                    },
                    Err(_) => ClientError::Protocol {
                        what,
                        detail: format!(
                            "status {status}, body {:?}",
                            String::from_utf8_lossy(&bytes)
                        ),
                    },
                },
            );
        }
        Ok(bytes)
    }

    /// POSTs `body` as JSON and decodes a JSON answer.
    pub async fn post_json<Q: serde::Serialize, A: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &Q,
    ) -> Result<A, ClientError> {
        let body = serde_json::to_vec(body).expect("serializable");
        let bytes = self.request(Method::POST, path, body.into()).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            what: format!("POST {path}"),
            detail: e.to_string(),
        })
    }
}
