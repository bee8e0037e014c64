//! How a run reaches its agent. The run pipeline (`pipeline.rs`) asks for a transport
//! for its source, serves its repository server through it, and gets back what the
//! agent did; it never knows whether the agent is a child process here ([`local`]) or a
//! command on a host behind SSH ([`ssh`]).

pub mod local;
pub mod ssh;

use crate::agent::AgentRun;
use crate::error::CliError;
use crate::record::{RunError, TransportKind};
use crate::server::Server;
use haul_protocol::agent::{
    AgentCommand, AgentEvent, BackupCommand, BackupParams, RestoreCommand, RestoreParams, RunParams,
};
use std::sync::Arc;

/// What the agent is asked to do: its command line (the transport sets the socket) and
/// its run parameters, one JSON line on its stdin.
#[derive(Debug, Clone)]
pub struct AgentCall {
    command: AgentCommand,
    params: Params,
}

#[derive(Debug, Clone)]
enum Params {
    Backup(BackupParams),
    Restore(RestoreParams),
}

impl AgentCall {
    pub fn backup(mut command: BackupCommand, params: BackupParams) -> AgentCall {
        command.params_stdin = true;
        AgentCall {
            command: AgentCommand::Backup(command),
            params: Params::Backup(params),
        }
    }

    pub fn restore(mut command: RestoreCommand, params: RestoreParams) -> AgentCall {
        command.params_stdin = true;
        AgentCall {
            command: AgentCommand::Restore(command),
            params: Params::Restore(params),
        }
    }

    /// The command with the server's socket.
    fn at(mut self, socket: &str) -> AgentCall {
        match &mut self.command {
            AgentCommand::Backup(c) => c.socket = socket.to_string(),
            AgentCommand::Restore(c) => c.socket = socket.to_string(),
        }
        self
    }

    /// Over SSH: the agent refuses to run unless haul-wrapper started it (a key
    /// installed without its forced command would otherwise run anything it is given).
    fn requiring_wrapper(mut self) -> AgentCall {
        match &mut self.params {
            Params::Backup(p) => p.require_wrapper = true,
            Params::Restore(p) => p.require_wrapper = true,
        }
        self
    }

    /// The words after `haul-agent`.
    fn args(&self) -> Vec<String> {
        self.command.to_args()
    }

    /// The run parameters' line, without its newline.
    fn stdin_line(&self) -> String {
        match &self.params {
            Params::Backup(p) => p.to_line(),
            Params::Restore(p) => p.to_line(),
        }
    }
}

/// Where a run's agent runs.
#[derive(Debug, Clone)]
pub enum Source {
    /// A configured host, over SSH.
    Ssh(Box<haul_config::Host>),
    /// A child process of this pbs.
    Local {
        agent: std::path::PathBuf,
        /// Where the run's private socket directory goes (default: the temporary
        /// directory).
        socket_dir: Option<std::path::PathBuf>,
    },
}

impl Source {
    pub fn kind(&self) -> TransportKind {
        match self {
            Source::Ssh(_) => TransportKind::Ssh,
            Source::Local { .. } => TransportKind::Local,
        }
    }

    /// What a snapshot taken through this source records as its source.
    pub fn snapshot_source(&self) -> haul_repo::format::snapshot::SourceKind {
        match self {
            Source::Ssh(_) => haul_repo::format::snapshot::SourceKind::Pull,
            Source::Local { .. } => haul_repo::format::snapshot::SourceKind::Local,
        }
    }

    /// Gets ready to run an agent: for SSH, connects, checks the host key,
    /// authenticates and asks for the forward (nothing runs on the host yet).
    pub fn connect(&self) -> Result<Box<dyn Transport>, RunError> {
        Ok(match self {
            Source::Ssh(host) => Box::new(ssh::Connection::open(host)?),
            Source::Local { agent, socket_dir } => Box::new(local::Child {
                agent: agent.clone(),
                socket_dir: socket_dir.clone(),
            }),
        })
    }
}

/// A way to run one agent against a server of this process.
pub trait Transport: Send {
    /// Runs the agent as `call` says, serves `server` to it until it ends, hands each
    /// of its stdout events to `progress`, and says what it did. The server's session
    /// has ended when this returns (committed or abandoned).
    fn run_agent(
        self: Box<Self>,
        server: Arc<Server>,
        call: AgentCall,
        progress: &(dyn Fn(&AgentEvent) + Sync),
    ) -> Result<AgentRun, RunError>;
}

/// A multi-threaded runtime for the server; blocking threads do the engine's work.
pub fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    // One thread for the I/O (SSH, HTTP, request bodies): every piece of engine work
    // runs on the blocking threads, and with a second I/O thread each SSH packet woke
    // another thread on its way to its request (about 4% slower pulls over SSH).
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(2 * cpus + 2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Io("cannot start the server runtime".into(), e))
}
