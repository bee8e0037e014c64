//! The channel a copy to another pbs goes through: an SSH session to it whose command
//! (the forced command of the key, `haul-pbs receive`) serves the receive mode of the
//! repository server on its standard input and output. This side speaks HTTP/1.1 on
//! the channel, one request at a time; what the command writes on stderr, and how it
//! ended, are kept to say why the copy failed if the channel closes early.

use super::tunnel::Session;
use crate::record::{ErrorKind, RunError};
use bytes::Bytes;
use haul_config::Host;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use russh::ChannelMsg;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The command asked for; the key's forced command runs instead, whatever it is.
const COMMAND: &str = "haul-pbs receive";
/// Lines of the command's stderr kept for an error.
const STDERR_LINES: usize = 20;
/// Bytes of the command's output held between the channel and the HTTP client.
const PIPE: usize = 1 << 20;

/// What the receiving command said on stderr and how it ended.
#[derive(Default)]
struct Remote {
    stderr: VecDeque<String>,
    partial: Vec<u8>,
    ended: Option<String>,
}

/// An HTTP connection to a `haul-pbs receive` over SSH.
pub struct ReceiveChannel {
    rt: tokio::runtime::Runtime,
    session: Option<russh::client::Handle<super::client::Client>>,
    sender: Mutex<Option<SendRequest<Full<Bytes>>>>,
    remote: Arc<Mutex<Remote>>,
    pump: Option<tokio::task::JoinHandle<()>>,
    name: String,
}

/// An answer: its status and whole body.
pub struct Answer {
    pub status: hyper::StatusCode,
    pub body: Bytes,
}

impl ReceiveChannel {
    /// Connects to `host`, checks its key, authenticates and starts the command.
    pub fn open(host: &Host) -> Result<ReceiveChannel, RunError> {
        let rt = super::runtime().map_err(|e| RunError::new(ErrorKind::Setup, e.to_string()))?;
        let remote = Arc::new(Mutex::new(Remote::default()));
        let fail = |kind, what: String| RunError::new(kind, format!("{}: {what}", host.name));
        let (session, sender, pump) = rt.block_on(async {
            // No socket is forwarded: every channel the host opens is refused.
            let session = Session::open(host, String::new()).await?;
            session.quick_acks.store(false, Ordering::Relaxed);
            let handle = session.handle;
            let channel = handle
                .channel_open_session()
                .await
                .map_err(|e| fail(ErrorKind::Cut, format!("opening a session channel: {e}")))?;
            channel
                .exec(true, COMMAND)
                .await
                .map_err(|e| fail(ErrorKind::Cut, format!("starting `{COMMAND}`: {e}")))?;
            let (read, write) = channel.split();
            let (to_client, from_remote) = tokio::io::duplex(PIPE);
            let pump = tokio::spawn(pump(read, to_client, remote.clone()));
            let io =
                hyper_util::rt::TokioIo::new(tokio::io::join(from_remote, write.make_writer()));
            let (sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| fail(ErrorKind::Cut, format!("HTTP on the channel: {e}")))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!("connection to the receiving pbs: {e}");
                }
            });
            Ok::<_, RunError>((handle, sender, pump))
        })?;
        Ok(ReceiveChannel {
            rt,
            session: Some(session),
            sender: Mutex::new(Some(sender)),
            remote,
            pump: Some(pump),
            name: host.name.clone(),
        })
    }

    /// Sends `body` to `path` (a POST) and reads the whole answer. A connection that
    /// fails says why the receiving command ended, with the last lines it wrote.
    pub fn post(&self, path: &str, body: Bytes) -> Result<Answer, String> {
        let mut slot = self.sender.lock().expect("sender");
        let Some(sender) = slot.as_mut() else {
            return Err(self.ended("the connection was closed by an earlier failure"));
        };
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, "haul-receive")
            .header(hyper::header::CONTENT_LENGTH, body.len())
            .body(Full::new(body))
            .expect("a valid request");
        let result = self.rt.block_on(async {
            sender.ready().await?;
            let answer = sender.send_request(request).await?;
            let status = answer.status();
            let body = answer.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>(Answer { status, body })
        });
        result.map_err(|e| {
            slot.take();
            self.ended(&e.to_string())
        })
    }

    /// Why the channel failed: `what`, and how the command ended and its last words,
    /// once they arrived (waited for a little).
    fn ended(&self, what: &str) -> String {
        for _ in 0..40 {
            if self.remote.lock().expect("remote").ended.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let r = self.remote.lock().expect("remote");
        let mut lines: Vec<String> = r.stderr.iter().cloned().collect();
        if !r.partial.is_empty() {
            lines.push(String::from_utf8_lossy(&r.partial).into_owned());
        }
        let said = if lines.is_empty() {
            String::new()
        } else {
            format!("; it said: {}", lines.join(" / "))
        };
        format!(
            "{}: the connection to `haul-pbs receive` there failed ({what}); the command ended with {}{said}",
            self.name,
            r.ended.as_deref().unwrap_or("no exit status yet"),
        )
    }

    /// Ends the command (its input closes) and the SSH session.
    pub fn close(mut self) {
        self.sender.lock().expect("sender").take();
        let pump = self.pump.take();
        let session = self.session.take();
        self.rt.block_on(async {
            if let Some(pump) = pump {
                let _ = tokio::time::timeout(Duration::from_secs(10), pump).await;
            }
            if let Some(s) = session {
                let _ = s
                    .disconnect(russh::Disconnect::ByApplication, "copy finished", "en")
                    .await;
            }
        });
    }
}

/// Moves what the command writes on stdout to the HTTP client, and keeps its stderr
/// and how it ended, until the channel closes.
async fn pump(
    mut read: russh::ChannelReadHalf,
    mut to_client: tokio::io::DuplexStream,
    remote: Arc<Mutex<Remote>>,
) {
    while let Some(msg) = read.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                // A client that is gone is ignored: reading goes on, for the exit status.
                let _ = to_client.write_all(&data).await;
            }
            ChannelMsg::ExtendedData { data, ext: 1 } => {
                let mut r = remote.lock().expect("remote");
                r.partial.extend_from_slice(&data);
                while let Some(nl) = r.partial.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = r.partial.drain(..=nl).collect();
                    let line = String::from_utf8_lossy(&line).trim_end().to_string();
                    if r.stderr.len() == STDERR_LINES {
                        r.stderr.pop_front();
                    }
                    r.stderr.push_back(line);
                }
                r.partial.truncate(4096);
            }
            ChannelMsg::ExitStatus { exit_status } => {
                remote.lock().expect("remote").ended = Some(format!("exit status {exit_status}"));
            }
            ChannelMsg::ExitSignal { signal_name, .. } => {
                remote.lock().expect("remote").ended = Some(format!("signal {signal_name:?}"));
            }
            ChannelMsg::Eof => {
                let _ = to_client.shutdown().await;
            }
            _ => {}
        }
    }
    let _ = to_client.shutdown().await;
    remote
        .lock()
        .expect("remote")
        .ended
        .get_or_insert_with(|| "the channel closed".into());
}
