//! The pbs's side of an SSH connection as russh sees it: the host key checked against
//! the pinned known_hosts, and every channel the host opens refused except the
//! forwarded connections of this run's socket, which are served once the run has a
//! server (see [`Served`]).

use crate::server::Server;
use russh::client::{self, Msg, Session};
use russh::keys::{check_known_hosts_path, PublicKeyOrCertificate};
use russh::{Channel, ChannelOpenFailure};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

/// What serves the forwarded connections of a run: set once the connection is made
/// and the server exists. Until then nothing may be forwarded, for the agent has not
/// been started.
pub(super) struct Served {
    pub(super) router: axum::Router,
    /// Counts the forwarded connections, when they are a repository server's.
    pub(super) server: Option<Arc<Server>>,
    /// Forwarded connections open at once: the agent needs a few; more are refused.
    pub(super) open: Arc<tokio::sync::Semaphore>,
}

/// Forwarded connections one run serves at once: the agent's
/// [`wire::MAX_CONNECTIONS`](haul_protocol::wire::MAX_CONNECTIONS), and room for some
/// it closed while their close is on its way. Each may hold up to [`CHANNEL_BUFFER`]
/// packets of 32 KiB its handler has not read yet: with this cap, a host can make the
/// pbs hold at most 12 × 8 MiB however it behaves.
pub(super) const MAX_CHANNELS: usize = haul_protocol::wire::MAX_CONNECTIONS + 4;

/// Packets a channel may have received and not yet been read: room for an upload
/// batch (2 MiB), so one busy channel does not stop the others' traffic, and a bound
/// on what a host that never reads its answers can make the pbs keep.
pub(super) const CHANNEL_BUFFER: usize = 256;

pub(super) struct Client {
    pub(super) served: Arc<OnceLock<Served>>,
    /// The forwarded socket of this run on the host: the only one served.
    pub(super) socket: String,
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) known_hosts: PathBuf,
    /// Why the host key was refused, for the run's error.
    pub(super) key_problem: Arc<Mutex<Option<String>>>,
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

/// Refuses a channel the pbs never asks for (russh's default handlers accept them).
async fn refuse(reply: client::ChannelOpenHandle) -> Result<(), russh::Error> {
    reply
        .reject(ChannelOpenFailure::AdministrativelyProhibited)
        .await;
    Ok(())
}
