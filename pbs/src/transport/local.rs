//! The local transport: the agent is a child process of this pbs, and the server
//! listens on a socket in a private directory of the run (0700, removed after it).

use super::{runtime, AgentCall, Transport};
use crate::agent::{take_lines, AgentOutput, AgentRun, TAIL_LINES};
use crate::record::{ErrorKind, RunError};
use crate::server::{self, Server};
use haul_protocol::agent::AgentEvent;
use std::collections::VecDeque;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An agent binary to run here.
pub struct Child {
    pub agent: PathBuf,
    pub socket_dir: Option<PathBuf>,
}

impl Transport for Child {
    fn run_agent(
        self: Box<Self>,
        server: Arc<Server>,
        call: AgentCall,
        progress: &(dyn Fn(&AgentEvent) + Sync),
    ) -> Result<AgentRun, RunError> {
        let run = run_agent(
            server.clone(),
            &self.agent,
            call,
            self.socket_dir.as_deref(),
            progress,
        );
        // A session the agent did not commit ends here; what it stored is kept.
        server.abandon_session();
        run
    }
}

/// Starts `server` on a fresh socket in a private directory (in `socket_dir`, made
/// 0700 if missing, else the temporary directory), runs `agent` as `call` says (with
/// that socket), relays its events to
/// `progress`, and stops the server when the agent has exited.
fn run_agent(
    server: Arc<Server>,
    agent: &Path,
    call: AgentCall,
    socket_dir: Option<&Path>,
    progress: &(dyn Fn(&AgentEvent) + Sync),
) -> Result<AgentRun, RunError> {
    let rt = runtime().map_err(|e| RunError::new(ErrorKind::Agent, e.to_string()))?;
    let mut builder = tempfile::Builder::new();
    builder.prefix("haul-run-");
    let dir = match socket_dir {
        Some(d) => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|e| {
                    io_error(
                        format!("socket directory {} ([server].socket_dir)", d.display()),
                        e,
                    )
                })?;
            builder.tempdir_in(d)
        }
        None => builder.tempdir(),
    }
    .map_err(|e| io_error("cannot create the run's private directory".into(), e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io_error(format!("cannot restrict {}", dir.path().display()), e))?;
    }
    let socket = dir.path().join("repo.sock");
    let Some(socket_text) = socket.to_str() else {
        return Err(RunError::new(
            ErrorKind::Setup,
            format!(
                "the run's socket {} is not UTF-8: choose a [server].socket_dir whose path is",
                socket.display()
            ),
        ));
    };
    let call = call.at(socket_text);
    rt.block_on(async {
        let (listener, _guard) =
            server::bind(&socket).map_err(|e| RunError::new(ErrorKind::Agent, e.to_string()))?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server::serve(server.clone(), listener, async {
            let _ = stop_rx.await;
        }));
        let watchdog = server::conn::Watchdog::new(&server);
        let result = drive_agent(agent, &call, progress, watchdog).await;
        let _ = stop_tx.send(());
        match serving.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(RunError::new(ErrorKind::Repository, e.to_string())),
            Err(e) => {
                return Err(RunError::new(
                    ErrorKind::Repository,
                    format!("repository server failed: {e}"),
                ))
            }
        }
        let mut run = result?;
        run.connections = server.connections();
        Ok(run)
    })
}

async fn drive_agent(
    agent: &Path,
    call: &AgentCall,
    progress: &(dyn Fn(&AgentEvent) + Sync),
    mut watchdog: server::conn::Watchdog,
) -> Result<AgentRun, RunError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut child = tokio::process::Command::new(agent)
        .args(call.args())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            io_error(
                format!(
                    "cannot start the agent {} (install haul-agent beside haul-pbs or give --agent)",
                    agent.display()
                ),
                e,
            )
        })?;
    let mut input = child.stdin.take().expect("piped");
    let _ = input
        .write_all(format!("{}\n", call.stdin_line()).as_bytes())
        .await;
    drop(input);
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    // Only the last lines of stderr matter (the tail and the error): bounded.
    let err_task = tokio::spawn(async move {
        let (mut buf, mut data) = (Vec::new(), vec![0u8; 16 * 1024]);
        let mut last: VecDeque<String> = VecDeque::new();
        while let Ok(n @ 1..) = stderr.read(&mut data).await {
            for line in take_lines(&mut buf, &data[..n]) {
                if last.len() == TAIL_LINES {
                    last.pop_front();
                }
                last.push_back(line);
            }
        }
        if !buf.is_empty() {
            last.push_back(String::from_utf8_lossy(&buf).into_owned());
        }
        last
    });
    let mut out = AgentOutput::default();
    let (mut buf, mut data) = (Vec::new(), vec![0u8; 64 * 1024]);
    loop {
        match tokio::time::timeout(watchdog.wait(), stdout.read(&mut data)).await {
            Ok(Ok(n @ 1..)) => {
                watchdog.output();
                for line in take_lines(&mut buf, &data[..n]) {
                    out.stdout_line(&line, progress);
                }
            }
            Ok(_) => break,
            Err(_) => {
                if let Some(why) = watchdog.stalled() {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    return Err(RunError::new(ErrorKind::Stalled, why));
                }
            }
        }
    }
    if !buf.is_empty() {
        out.stdout_line(&String::from_utf8_lossy(&buf), progress);
    }
    let status = child
        .wait()
        .await
        .map_err(|e| RunError::new(ErrorKind::Agent, format!("waiting for the agent: {e}")))?;
    for l in err_task.await.unwrap_or_default() {
        out.stderr_line(&l);
    }
    Ok(out.finish(status.code(), &status.to_string()))
}

/// An operating-system error on `what`: a setup to fix (a missing binary, a permission)
/// or a passing shortage (memory, processes, descriptors, space) worth a retry.
fn io_error(what: String, e: std::io::Error) -> RunError {
    use std::io::ErrorKind as K;
    let kind = match e.kind() {
        K::NotFound | K::PermissionDenied | K::InvalidInput | K::NotADirectory => ErrorKind::Setup,
        _ => ErrorKind::Agent,
    };
    RunError::new(kind, format!("{what}: {e}"))
}
