//! A pull over SSH: the pbs is a russh client. It checks the host key against a pinned
//! known_hosts file, authenticates with its key, asks the host's sshd for a Unix-socket
//! forward (`streamlocal-forward@openssh.com`) at a fresh path for this run, serves the
//! repository server's API on every channel forwarded from it, and runs the agent's
//! command, which the host's forced command (`haul-wrapper`) checks before it runs
//! anything. No `ssh`, `socat` or shell on this side.
//!
//! Around russh's limits (`docs/reference/russh-tunnel.md`):
//! - One forwarded channel whose reader stalls blocks the whole connection: the server
//!   reads every request body as it arrives (`server/api.rs`), each channel may hold
//!   [`CHANNEL_BUFFER`] unread packets, and a connection whose answers go unread is cut
//!   (`server/conn.rs`).
//! - Upload throughput is about window / 2 per round trip: the window is the host's
//!   `window_mib`.
//! - Channels the pbs did not ask for are refused, and a forwarded channel must come
//!   from this run's socket path.

use crate::error::CliError;
use crate::run::{take_lines, AgentOutput, AgentRun};
use crate::server::Server;
use haul_config::Host;
use russh::client::{self, Msg, Session};
use russh::keys::{
    check_known_hosts_path, load_secret_key, PrivateKeyWithHashAlg, PublicKeyOrCertificate,
};
use russh::{Channel, ChannelMsg, ChannelOpenFailure};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// After the exit status, the channel should close; a host that keeps it open is left
/// after this long.
const AFTER_EXIT: Duration = Duration::from_secs(10);
/// A whole run ends after this long, however far it got.
const RUN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// What serves the forwarded connections of a run: set once the connection is made
/// and the server exists. Until then nothing may be forwarded, for the agent has not
/// been started.
struct Served {
    router: axum::Router,
    /// Counts the forwarded connections, when they are a repository server's.
    server: Option<Arc<Server>>,
    /// Forwarded connections open at once: the agent needs a few; more are refused.
    open: Arc<tokio::sync::Semaphore>,
}

/// Forwarded connections one run serves at once (the agent opens at most 4). Each may
/// hold up to [`CHANNEL_BUFFER`] packets of 32 KiB its handler has not read yet: with
/// this cap, a host can make the pbs hold at most 8 × 8 MiB however it behaves.
const MAX_CHANNELS: usize = 8;

/// Packets a channel may have received and not yet been read: room for an upload
/// batch (2 MiB), so one busy channel does not stop the others' traffic, and a bound
/// on what a host that never reads its answers can make the pbs keep.
const CHANNEL_BUFFER: usize = 256;

struct Client {
    served: Arc<OnceLock<Served>>,
    /// The forwarded socket of this run on the host: the only one served.
    socket: String,
    host: String,
    port: u16,
    known_hosts: PathBuf,
    /// Why the host key was refused, for the run's error.
    key_problem: Arc<Mutex<Option<String>>>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self.key_problem.lock().expect("key problem") = Some(format!(
                "{}:{} offered a host certificate; pin its plain host key in {}",
                self.host,
                self.port,
                self.known_hosts.display()
            ));
            return Ok(false);
        };
        let fingerprint = key.fingerprint(Default::default());
        let problem = match check_known_hosts_path(&self.host, self.port, key, &self.known_hosts) {
            Ok(true) => return Ok(true),
            Ok(false) => format!(
                "host key of {}:{} is not pinned in {}: the host offered {} {fingerprint}; if that is its key, add it there (e.g. `ssh-keyscan -p {} {} >> {}`, then compare the fingerprint)",
                self.host,
                self.port,
                self.known_hosts.display(),
                key.algorithm(),
                self.port,
                self.host,
                self.known_hosts.display()
            ),
            Err(russh::keys::Error::KeyChanged { line }) => format!(
                "HOST KEY CHANGED for {}:{}: the host offered {} {fingerprint}, but line {line} of {} pins another key; if the change is expected, fix that line, else do not trust this host",
                self.host,
                self.port,
                key.algorithm(),
                self.known_hosts.display()
            ),
            Err(e) => format!(
                "cannot check the host key of {}:{} against {}: {e}",
                self.host,
                self.port,
                self.known_hosts.display()
            ),
        };
        *self.key_problem.lock().expect("key problem") = Some(problem);
        Ok(false)
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if socket_path != self.socket {
            tracing::warn!(
                "refused a forwarded channel from {socket_path:?}, not this run's socket"
            );
            return refuse(reply).await;
        }
        let Some(served) = self.served.get() else {
            tracing::warn!("refused a forwarded channel that came before the agent was started");
            return refuse(reply).await;
        };
        let Ok(slot) = served.open.clone().try_acquire_owned() else {
            tracing::warn!(
                "refused a forwarded channel: {MAX_CHANNELS} are open already (the agent needs fewer)"
            );
            return refuse(reply).await;
        };
        reply.accept().await;
        tracing::debug!("forwarded connection accepted");
        if let Some(server) = &served.server {
            server.count_connection();
        }
        let router = served.router.clone();
        let limits = served
            .server
            .as_ref()
            .map(|s| s.limits())
            .unwrap_or_default();
        tokio::spawn(async move {
            crate::server::conn::serve_connection(channel.into_stream(), router, limits, None)
                .await;
            drop(slot);
        });
        Ok(())
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse(reply).await
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: Channel<Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse(reply).await
    }

    async fn server_channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse(reply).await
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse(reply).await
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse(reply).await
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse(reply).await
    }
}

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

/// Refuses a channel the pbs never asks for (russh's default handlers accept them).
async fn refuse(reply: client::ChannelOpenHandle) -> Result<(), russh::Error> {
    reply
        .reject(ChannelOpenFailure::AdministrativelyProhibited)
        .await;
    Ok(())
}

/// Runs the agent on `host` over SSH with `args` (the socket is appended as `--socket
/// PATH`) and the JSON object `stdin` as its run parameters, serving `server` to it,
/// and returns what it did.
pub fn run_agent(
    server: Arc<Server>,
    host: &Host,
    args: Vec<String>,
    stdin: Option<serde_json::Value>,
    progress: &(dyn Fn(&serde_json::Value) + Sync),
) -> Result<AgentRun, CliError> {
    Connection::open(host)?.run_agent(server, args, stdin, progress)
}

/// An SSH connection to a host, authenticated, with a fresh socket of the host's socket
/// directory forwarded here: what a run needs before its agent starts. It can be opened
/// while the repository opens (see `pull_one`). Dropping it cancels the forward and
/// disconnects.
pub struct Connection {
    rt: tokio::runtime::Runtime,
    tunnel: Option<Tunnel>,
    name: String,
}

impl Connection {
    /// Connects to `host`, checks its host key, authenticates and asks for the forward.
    pub fn open(host: &Host) -> Result<Connection, CliError> {
        let rt = crate::run::runtime()?;
        let tunnel = rt.block_on(async {
            match tokio::time::timeout(RUN_TIMEOUT, Tunnel::open(host)).await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "no SSH session within {} h",
                    RUN_TIMEOUT.as_secs() / 3600
                )),
            }
        });
        let tunnel = tunnel.map_err(|what| CliError::Failed(format!("{}: {what}", host.name)))?;
        Ok(Connection {
            rt,
            tunnel: Some(tunnel),
            name: host.name.clone(),
        })
    }

    fn fail(&self, what: String) -> CliError {
        CliError::Failed(format!("{}: {what}", self.name))
    }

    /// Runs the agent with `args` (the socket is appended as `--socket PATH`) and the
    /// JSON object `stdin` as its run parameters, serving `server` to it, and returns
    /// what it did.
    ///
    /// The parameters always say `require_wrapper`: an agent not started by
    /// haul-wrapper (a key installed without its forced command) refuses before it
    /// reads a file.
    pub fn run_agent(
        mut self,
        server: Arc<Server>,
        mut args: Vec<String>,
        stdin: Option<serde_json::Value>,
        progress: &(dyn Fn(&serde_json::Value) + Sync),
    ) -> Result<AgentRun, CliError> {
        let mut params = stdin.unwrap_or_else(|| serde_json::json!({}));
        params["require_wrapper"] = true.into();
        if !args.iter().any(|a| a == "--params-stdin") {
            args.push("--params-stdin".into());
        }
        let stdin = Some(params.to_string());
        let tunnel = self.tunnel.take().expect("a connection runs one command");
        tunnel.serve(crate::server::router(server.clone()), Some(server.clone()));
        args.push("--socket".into());
        args.push(tunnel.socket.clone());
        let result = self.rt.block_on(async {
            let result = tokio::time::timeout(
                RUN_TIMEOUT,
                exec_agent(
                    &tunnel.session,
                    &self.name,
                    &args,
                    stdin,
                    progress,
                    crate::server::conn::Watchdog::new(&server),
                ),
            )
            .await;
            tracing::debug!("agent ended");
            tunnel.close().await;
            tracing::debug!("SSH connection closed");
            match result {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "the run took longer than {} h and was stopped",
                    RUN_TIMEOUT.as_secs() / 3600
                )),
            }
        });
        // A session the agent did not commit ends here; what it stored is kept.
        server.abandon_session();
        let mut run = result.map_err(|what| self.fail(what))?;
        run.connections = server.connections();
        Ok(run)
    }
}

impl Drop for Connection {
    /// A connection dropped unused (the run failed before its agent could start) leaves
    /// nothing listening on the host.
    fn drop(&mut self) {
        if let Some(tunnel) = self.tunnel.take() {
            self.rt.block_on(tunnel.close());
        }
    }
}

/// Runs `command(socket)` on `host` with this run's socket forwarded to `router`, and
/// returns its exit status and output. For measuring the tunnel (see
/// `examples/tunnel_bench.rs`): the pbs itself only ever runs the agent.
pub fn run_command(
    host: &Host,
    router: axum::Router,
    command: impl FnOnce(&str) -> String,
) -> Result<CommandOutput, CliError> {
    let mut connection = Connection::open(host)?;
    let tunnel = connection.tunnel.take().expect("just opened");
    tunnel.serve(router, None);
    let mut out = CommandOutput::default();
    let result = connection.rt.block_on(async {
        let result = exec(
            &tunnel.session,
            command(&tunnel.socket),
            None,
            &mut |line| out.stdout.push(line),
            &mut |line| out.stderr.push(line),
            None,
        )
        .await;
        tunnel.close().await;
        result
    });
    let ended = result.map_err(|what| connection.fail(what))?;
    (out.exit, out.how) = (ended.exit, ended.how);
    Ok(out)
}

/// What a command run by [`run_command`] did.
#[derive(Debug, Default)]
pub struct CommandOutput {
    pub exit: Option<i32>,
    /// How it ended, in words (`exit status 0`, `signal "KILL"`, ...).
    pub how: String,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

/// An authenticated SSH session to a host with a fresh socket of its socket directory
/// forwarded here.
struct Tunnel {
    session: client::Handle<Client>,
    socket: String,
    served: Arc<OnceLock<Served>>,
    /// Cleared when the session is set up (see [`QuickAcks`]).
    quick_acks: Arc<AtomicBool>,
}

impl Tunnel {
    /// Connects, checks the host key, authenticates and asks for the forward; errors
    /// are sentences about the host (the caller prefixes its name).
    async fn open(host: &Host) -> Result<Tunnel, String> {
        let mut id = [0u8; 8];
        getrandom::getrandom(&mut id).expect("OS random numbers");
        let socket = host
            .socket_dir
            .join(format!("haul-{}.sock", hex::encode(id)))
            .display()
            .to_string();
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
                return Err(format!(
                    "no SSH connection to {}:{} within {} s",
                    host.address,
                    host.port,
                    CONNECT_TIMEOUT.as_secs()
                ))
            }
            Ok(Err(e)) => {
                if let Some(p) = key_problem.lock().expect("key problem").take() {
                    return Err(p);
                }
                return Err(format!(
                    "SSH connection to {}:{}: {e}",
                    host.address, host.port
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
                    .map_err(|e| format!("identity passphrase file {}: {e}", f.display()))?
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
            format!("identity {}: {e}{hint}", host.identity.display())
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
            .map_err(|e| format!("authentication: {e}"))?;
        if !auth.success() {
            return Err(format!(
                "{}@{}:{} refused the key {}: install its line in authorized_keys there (`haul-pbs ssh-setup {}` prints it)",
                host.user,
                host.address,
                host.port,
                host.identity.display(),
                host.name
            ));
        }
        tracing::debug!(host = %host.name, user = %host.user, "authenticated");
        if let Err(e) = session.streamlocal_forward(socket.clone()).await {
            return Err(format!(
                "the host refused to forward {socket} ({e}): its sshd needs `AllowTcpForwarding remote`, `AllowStreamLocalForwarding remote`, `StreamLocalBindUnlink yes`, the key needs `port-forwarding` in authorized_keys, and {} must exist and be writable by {}",
                host.socket_dir.display(),
                host.user
            ));
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
    fn serve(&self, router: axum::Router, server: Option<Arc<Server>>) {
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
    async fn close(self) {
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

async fn exec_agent(
    session: &client::Handle<Client>,
    host: &str,
    args: &[String],
    stdin: Option<String>,
    progress: &(dyn Fn(&serde_json::Value) + Sync),
    watchdog: crate::server::conn::Watchdog,
) -> Result<AgentRun, String> {
    let mut words = vec!["haul-agent"];
    words.extend(args.iter().map(String::as_str));
    let command = haul_protocol::command::join(&words);
    let out = std::cell::RefCell::new(AgentOutput::default());
    let ended = exec(
        session,
        command,
        stdin,
        &mut |line| out.borrow_mut().stdout_line(&line, progress),
        &mut |line| out.borrow_mut().stderr_line(&line),
        Some(watchdog),
    )
    .await?;
    let mut run = out.into_inner().finish(ended.exit, &ended.how);
    if ended.cut {
        // Whatever the wrapper or the agent printed last is not why the run ended.
        run.error = Some(format!(
            "the connection to {host} closed during the run (the host, its sshd or the network went away)"
        ));
    }
    Ok(run)
}

/// How a command run over SSH ended.
struct Ended {
    /// Its exit status, if the host sent one.
    exit: Option<i32>,
    /// In words (`exit status 0`, `signal "KILL"`, `the connection closed`).
    how: String,
    /// The connection went away before the channel closed and before any exit status.
    cut: bool,
}

/// Runs `command` in a session channel, sends `stdin` as one line, and hands stdout
/// and stderr to the callbacks line by line, until the channel closes. Returns the
/// exit status (none when the host did not send one) and how the command ended.
async fn exec(
    session: &client::Handle<Client>,
    command: String,
    stdin: Option<String>,
    on_stdout: &mut dyn FnMut(String),
    on_stderr: &mut dyn FnMut(String),
    mut watchdog: Option<crate::server::conn::Watchdog>,
) -> Result<Ended, String> {
    let mut channel = session
        .channel_open_session()
        .await
        .map_err(|e| format!("opening a session channel: {e}"))?;
    channel
        .exec(true, command)
        .await
        .map_err(|e| format!("running the agent: {e}"))?;
    tracing::debug!("command sent");
    if let Some(line) = stdin {
        channel
            .data_bytes(format!("{line}\n").into_bytes())
            .await
            .map_err(|e| format!("sending run parameters: {e}"))?;
    }
    let _ = channel.eof().await;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut exit = None;
    let mut how = "no exit status".to_string();
    let mut cut = true;
    // Until the channel closes: the exit status may come after end-of-output. Once it
    // has come, a host that keeps the channel open is not waited for long.
    loop {
        let msg = if exit.is_some() {
            match tokio::time::timeout(AFTER_EXIT, channel.wait()).await {
                Ok(m) => m,
                Err(_) => break,
            }
        } else if let Some(w) = &watchdog {
            match tokio::time::timeout(w.wait(), channel.wait()).await {
                Ok(m) => m,
                Err(_) => match w.stalled() {
                    // Closing the channel ends the command on the host (sshd hangs up).
                    Some(why) => {
                        let _ = channel.close().await;
                        return Err(why);
                    }
                    None => continue,
                },
            }
        } else {
            channel.wait().await
        };
        if let Some(w) = &mut watchdog {
            w.output();
        }
        let Some(msg) = msg else {
            if cut {
                how = "no exit status (the connection closed)".to_string();
            }
            break;
        };
        match msg {
            ChannelMsg::Data { data } => {
                for line in take_lines(&mut stdout, &data) {
                    on_stdout(line);
                }
            }
            ChannelMsg::ExtendedData { data, ext: 1 } => {
                for line in take_lines(&mut stderr, &data) {
                    on_stderr(line);
                }
            }
            ChannelMsg::ExitStatus { exit_status } => {
                cut = false;
                exit = Some(exit_status as i32);
                how = format!("exit status {exit_status}");
            }
            ChannelMsg::ExitSignal { signal_name, .. } => {
                cut = false;
                how = format!("signal {signal_name:?}");
            }
            ChannelMsg::Close => {
                cut = false;
                break;
            }
            _ => {}
        }
    }
    for rest in [stdout, stderr] {
        if !rest.is_empty() {
            on_stderr(String::from_utf8_lossy(&rest).into_owned());
        }
    }
    Ok(Ended { exit, how, cut })
}
