//! The SSH transport: the pbs is a russh client. It checks the host key against a
//! pinned known_hosts file, authenticates with its key, asks the host's sshd for a
//! Unix-socket forward (`streamlocal-forward@openssh.com`) at a fresh path for this
//! run, serves the repository server's API on every channel forwarded from it, and runs
//! the agent's command, which the host's forced command (`haul-wrapper`) checks before
//! it runs anything. No `ssh`, `socat` or shell on this side.
//!
//! - [`client`]: the russh handler (host key, which channels are served).
//! - [`tunnel`]: making the connection and the forward.
//! - [`exec`]: running the command and reading its output.
//! - [`receive`]: the channel of a copy to another pbs (no forward: HTTP on the
//!   channel of its `haul-pbs receive`).
//!
//! Around russh's limits (`docs/reference/russh-tunnel.md`):
//! - One forwarded channel whose reader stalls blocks the whole connection: the server
//!   reads every request body as it arrives (`server/api.rs`), each channel may hold
//!   a bounded number of unread packets (`client::CHANNEL_BUFFER`), and a connection
//!   whose answers go unread is cut (`server/conn.rs`).
//! - Upload throughput per channel is about window / 2 per round trip: the window is
//!   the host's `window_mib`; the agent uploads on several channels at once, with a
//!   budget grown with the round trip (`agent/src/backup.rs`).
//! - Channels the pbs did not ask for are refused, and a forwarded channel must come
//!   from this run's socket path.

mod client;
mod exec;
pub mod receive;
mod tunnel;

use super::{runtime, AgentCall, Transport};
use crate::agent::AgentRun;
use crate::error::CliError;
use crate::record::{ErrorKind, RunError};
use crate::server::Server;
use exec::{exec, exec_agent};
use haul_config::Host;
use haul_protocol::agent::AgentEvent;
use std::sync::Arc;
use std::time::Duration;
use tunnel::Tunnel;

/// A whole run ends after this long, however far it got.
const RUN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// An SSH connection to a host, authenticated, with a fresh socket of the host's socket
/// directory forwarded here: what a run needs before its agent starts. It can be opened
/// while the repository opens (see `pipeline::pull`). Dropping it cancels the forward and
/// disconnects.
pub struct Connection {
    rt: tokio::runtime::Runtime,
    tunnel: Option<Tunnel>,
    name: String,
}

impl Connection {
    /// Connects to `host`, checks its host key, authenticates and asks for the forward.
    pub fn open(host: &Host) -> Result<Connection, RunError> {
        let rt = runtime().map_err(|e| RunError::new(ErrorKind::Setup, e.to_string()))?;
        let tunnel = rt.block_on(async {
            match tokio::time::timeout(RUN_TIMEOUT, Tunnel::open(host)).await {
                Ok(r) => r,
                Err(_) => Err(RunError::new(
                    ErrorKind::Unreachable,
                    format!(
                        "{}: no SSH session within {} h",
                        host.name,
                        RUN_TIMEOUT.as_secs() / 3600
                    ),
                )),
            }
        })?;
        Ok(Connection {
            rt,
            tunnel: Some(tunnel),
            name: host.name.clone(),
        })
    }

    fn fail(&self, e: RunError) -> RunError {
        RunError::new(e.kind, format!("{}: {}", self.name, e.message))
    }
}

impl Transport for Connection {
    /// The parameters always say `require_wrapper`: an agent not started by
    /// haul-wrapper (a key installed without its forced command) refuses before it
    /// reads a file.
    fn run_agent(
        mut self: Box<Self>,
        server: Arc<Server>,
        call: AgentCall,
        progress: &(dyn Fn(&AgentEvent) + Sync),
    ) -> Result<AgentRun, RunError> {
        let tunnel = self.tunnel.take().expect("a connection runs one command");
        tunnel.serve(crate::server::router(server.clone()), Some(server.clone()));
        let call = call.at(&tunnel.socket).requiring_wrapper();
        let result = self.rt.block_on(async {
            let result = tokio::time::timeout(
                RUN_TIMEOUT,
                exec_agent(
                    &tunnel.session,
                    &self.name,
                    &call.args(),
                    Some(call.stdin_line()),
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
                Err(_) => Err(RunError::new(
                    ErrorKind::Stalled,
                    format!(
                        "the run took longer than {} h and was stopped",
                        RUN_TIMEOUT.as_secs() / 3600
                    ),
                )),
            }
        });
        // A session the agent did not commit ends here; what it stored is kept.
        server.abandon_session();
        let mut run = result.map_err(|e| self.fail(e))?;
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
    let mut connection = Connection::open(host).map_err(|e| CliError::Failed(e.message))?;
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
    let ended = result.map_err(|e| CliError::Failed(connection.fail(e).message))?;
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
