//! Running a command in a session channel: its stdin line, its stdout and stderr line
//! by line, the watchdog that stops a silent one, and how it ended.

use super::client::Client;
use crate::agent::{take_lines, AgentOutput, AgentRun};
use crate::record::{ErrorKind, RunError};
use russh::client;
use russh::ChannelMsg;
use std::time::Duration;

/// After the exit status, the channel should close; a host that keeps it open is left
/// after this long.
const AFTER_EXIT: Duration = Duration::from_secs(10);

pub(super) async fn exec_agent(
    session: &client::Handle<Client>,
    host: &str,
    args: &[String],
    stdin: Option<String>,
    progress: &(dyn Fn(&haul_protocol::agent::AgentEvent) + Sync),
    watchdog: crate::server::conn::Watchdog,
) -> Result<AgentRun, RunError> {
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
        run.cut = true;
        run.error = Some(format!(
            "the connection to {host} closed during the run (the host, its sshd or the network went away)"
        ));
    }
    Ok(run)
}

/// How a command run over SSH ended.
pub(super) struct Ended {
    /// Its exit status, if the host sent one.
    pub(super) exit: Option<i32>,
    /// In words (`exit status 0`, `signal "KILL"`, `the connection closed`).
    pub(super) how: String,
    /// The connection went away before the channel closed and before any exit status.
    pub(super) cut: bool,
}

/// Runs `command` in a session channel, sends `stdin` as one line, and hands stdout
/// and stderr to the callbacks line by line, until the channel closes. Returns the
/// exit status (none when the host did not send one) and how the command ended.
pub(super) async fn exec(
    session: &client::Handle<Client>,
    command: String,
    stdin: Option<String>,
    on_stdout: &mut dyn FnMut(String),
    on_stderr: &mut dyn FnMut(String),
    mut watchdog: Option<crate::server::conn::Watchdog>,
) -> Result<Ended, RunError> {
    let cut = |what: String| RunError::new(ErrorKind::Cut, what);
    let mut channel = session
        .channel_open_session()
        .await
        .map_err(|e| cut(format!("opening a session channel: {e}")))?;
    channel
        .exec(true, command)
        .await
        .map_err(|e| cut(format!("running the agent: {e}")))?;
    tracing::debug!("command sent");
    if let Some(line) = stdin {
        channel
            .data_bytes(format!("{line}\n").into_bytes())
            .await
            .map_err(|e| cut(format!("sending run parameters: {e}")))?;
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
                        return Err(RunError::new(ErrorKind::Stalled, why));
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
