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
use std::sync::Arc;

/// What the agent is asked to do: its command line after `haul-agent` (the transport
/// adds `--socket`) and its run parameters (one JSON line on stdin).
#[derive(Debug, Clone)]
pub struct AgentCall {
    pub args: Vec<String>,
    pub params: Option<serde_json::Value>,
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
        progress: &(dyn Fn(&serde_json::Value) + Sync),
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
