//! Making the connection: TCP with a read buffer and quick acknowledgements while
//! the session is set up, the SSH handshake, authentication with the host's identity,
//! and the forward of a fresh socket in the host's socket directory.

use super::client::{Client, Served, CHANNEL_BUFFER, MAX_CHANNELS};
use crate::record::{ErrorKind, RunError};
use crate::server::Server;
use haul_config::Host;
use russh::client;
use russh::keys::{load_secret_key, PrivateKeyWithHashAlg};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Bytes read from the SSH connection at once.
const READ_BUFFER: usize = 256 * 1024;

/// Connects to `addr` and starts the SSH session. russh reads each packet with two
/// reads of the socket (its length, then the rest); through a buffer most packets
/// cost no system call at all. The socket acknowledges at once while `quick_acks` is
/// set (see [`QuickAcks`]).
async fn connect(
    config: Arc<client::Config>,
    addr: (&str, u16),
    handler: Client,
    quick_acks: Arc<AtomicBool>,
) -> Result<client::Handle<Client>, russh::Error> {
    let socket = tokio::net::TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    let socket = QuickAcks {
        socket,
        on: quick_acks,
    };
    let socket = tokio::io::BufReader::with_capacity(READ_BUFFER, socket);
    client::connect_stream(config, socket, handler).await
}

/// The SSH connection's socket, which sets `TCP_QUICKACK` after each read while `on`:
/// while the session is set up. sshd sends its small messages with Nagle's algorithm
/// (it sets `TCP_NODELAY` only for interactive sessions), so its answer to the forward
/// waited for our acknowledgement of the message before it (the host keys it announces
/// after authentication), which Linux delays by 40 ms when it has nothing to send back:
/// 40 ms of every run's start. Bulk transfers are acknowledged promptly anyway.
struct QuickAcks {
    socket: tokio::net::TcpStream,
    on: Arc<AtomicBool>,
}

impl tokio::io::AsyncRead for QuickAcks {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let read = std::pin::Pin::new(&mut this.socket).poll_read(cx, buf);
        if read.is_ready() && this.on.load(Ordering::Relaxed) {
            use std::os::fd::AsRawFd;
            let one: libc::c_int = 1;
            // Best effort: without it the session only starts later.
            unsafe {
                libc::setsockopt(
                    this.socket.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_QUICKACK,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        read
    }
}

impl tokio::io::AsyncWrite for QuickAcks {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().socket).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().socket).poll_shutdown(cx)
    }
}

/// An authenticated SSH session to a host with a fresh socket of its socket directory
/// forwarded here.
pub(super) struct Tunnel {
    pub(super) session: client::Handle<Client>,
    pub(super) socket: String,
    served: Arc<OnceLock<Served>>,
    /// Cleared when the session is set up (see [`QuickAcks`]).
    quick_acks: Arc<AtomicBool>,
}

/// An authenticated SSH session to a host.
pub(super) struct Session {
    pub(super) handle: client::Handle<Client>,
    /// What serves the channels forwarded from `socket` (see [`Client`]).
    served: Arc<OnceLock<Served>>,
    /// Cleared when the session is set up (see [`QuickAcks`]).
    pub(super) quick_acks: Arc<AtomicBool>,
}

impl Session {
    /// Connects, checks the host key and authenticates. Channels forwarded from
    /// `socket` will be served once [`Tunnel::serve`] says how; every other channel
    /// the host opens is refused.
    pub(super) async fn open(host: &Host, socket: String) -> Result<Session, RunError> {
        let fail = |kind, what: String| RunError::new(kind, format!("{}: {what}", host.name));
        // AES-GCM costs about a third less CPU than chacha20-poly1305 where the CPU has AES
        // instructions (measured); the first of these the server also offers is used (RFC 4253:
        // the client's order decides).
        let preferred = russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(&[
                russh::cipher::AES_256_GCM,
                russh::cipher::AES_128_GCM,
                russh::cipher::CHACHA20_POLY1305,
            ]),
            ..Default::default()
        };
        let config = Arc::new(client::Config {
            window_size: host.window_mib << 20,
            channel_buffer_size: CHANNEL_BUFFER,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            preferred,
            ..Default::default()
        });
        let key_problem = Arc::new(Mutex::new(None));
        let served = Arc::new(OnceLock::new());
        let handler = Client {
            served: served.clone(),
            socket: socket.clone(),
            host: host.address.clone(),
            port: host.port,
            known_hosts: host.known_hosts.clone(),
            key_problem: key_problem.clone(),
        };
        let addr = (host.address.as_str(), host.port);
        let quick_acks = Arc::new(AtomicBool::new(true));
        let connecting = connect(config, addr, handler, quick_acks.clone());
        let mut session = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Err(_) => {
                return Err(fail(
                    ErrorKind::Unreachable,
                    format!(
                        "no SSH connection to {}:{} within {} s",
                        host.address,
                        host.port,
                        CONNECT_TIMEOUT.as_secs()
                    ),
                ))
            }
            Ok(Err(e)) => {
                if let Some(p) = key_problem.lock().expect("key problem").take() {
                    return Err(fail(ErrorKind::HostKey, p));
                }
                return Err(fail(
                    ErrorKind::Unreachable,
                    format!("SSH connection to {}:{}: {e}", host.address, host.port),
                ));
            }
            Ok(Ok(s)) => {
                tracing::debug!(host = %host.name, "SSH connection made, host key checked");
                s
            }
        };
        let passphrase = match &host.identity_passphrase_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| {
                        fail(
                            ErrorKind::Setup,
                            format!("identity passphrase file {}: {e}", f.display()),
                        )
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            ),
            None => None,
        };
        let key = load_secret_key(&host.identity, passphrase.as_deref()).map_err(|e| {
            let hint = match (&e, &host.identity_passphrase_file) {
                (russh::keys::Error::KeyIsEncrypted, None) => {
                    " (it is encrypted: give identity_passphrase_file)".to_string()
                }
                (_, Some(f)) => format!(
                    " (is the passphrase in {} the one of this key?)",
                    f.display()
                ),
                _ => String::new(),
            };
            fail(
                ErrorKind::Setup,
                format!("identity {}: {e}{hint}", host.identity.display()),
            )
        })?;
        let hash = session
            .best_supported_rsa_hash()
            .await
            .ok()
            .flatten()
            .flatten();
        let auth = session
            .authenticate_publickey(
                host.user.clone(),
                PrivateKeyWithHashAlg::new(Arc::new(key), hash),
            )
            .await
            .map_err(|e| fail(ErrorKind::Unreachable, format!("authentication: {e}")))?;
        if !auth.success() {
            return Err(fail(ErrorKind::Authentication, format!(
                "{}@{}:{} refused the key {}: install its line in authorized_keys there (`haul-pbs ssh-setup {}` prints it)",
                host.user,
                host.address,
                host.port,
                host.identity.display(),
                host.name
            )));
        }
        tracing::debug!(host = %host.name, user = %host.user, "authenticated");
        Ok(Session {
            handle: session,
            served,
            quick_acks,
        })
    }
}

impl Tunnel {
    /// Connects, checks the host key, authenticates and asks for the forward; errors
    /// are sentences about the host (the caller prefixes its name).
    pub(super) async fn open(host: &Host) -> Result<Tunnel, RunError> {
        let fail = |kind, what: String| RunError::new(kind, format!("{}: {what}", host.name));
        let mut id = [0u8; 8];
        getrandom::getrandom(&mut id).expect("OS random numbers");
        let socket = host
            .socket_dir
            .join(format!("haul-{}.sock", hex::encode(id)))
            .display()
            .to_string();
        let Session {
            handle: session,
            served,
            quick_acks,
        } = Session::open(host, socket.clone()).await?;
        if let Err(e) = session.streamlocal_forward(socket.clone()).await {
            // Refused by the host's sshd: its setup. Anything else: the connection.
            let kind = match e {
                russh::Error::RequestDenied => ErrorKind::Setup,
                _ => ErrorKind::Cut,
            };
            return Err(fail(kind, format!(
                "the host refused to forward {socket} ({e}): its sshd needs `AllowTcpForwarding remote`, `AllowStreamLocalForwarding remote`, `StreamLocalBindUnlink yes`, the key needs `port-forwarding` in authorized_keys, and {} must exist and be writable by {}",
                host.socket_dir.display(),
                host.user
            )));
        }
        tracing::debug!(%socket, "forwarded");
        Ok(Tunnel {
            session,
            socket,
            served,
            quick_acks,
        })
    }

    /// From now on, forwarded connections are served by `router`.
    pub(super) fn serve(&self, router: axum::Router, server: Option<Arc<Server>>) {
        self.quick_acks.store(false, Ordering::Relaxed);
        let open = Arc::new(tokio::sync::Semaphore::new(MAX_CHANNELS));
        if self
            .served
            .set(Served {
                router,
                server,
                open,
            })
            .is_err()
        {
            unreachable!("a tunnel serves one run");
        }
    }

    /// Stops the forward, so nothing is left listening, and disconnects.
    pub(super) async fn close(self) {
        let _ = self
            .session
            .cancel_streamlocal_forward(self.socket.clone())
            .await;
        let _ = self
            .session
            .disconnect(russh::Disconnect::ByApplication, "run finished", "en")
            .await;
    }
}
