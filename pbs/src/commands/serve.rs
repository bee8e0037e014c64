//! `serve`: the repository server as a long-running process (for supervisord or
//! systemd), until SIGTERM or SIGINT.

use super::Context;
use crate::cli::{ServeArgs, ServeMode};
use crate::error::CliError;
use crate::server::{self, Mode, Server};

pub fn serve(ctx: &Context, args: ServeArgs) -> Result<(), CliError> {
    let repo = ctx.open_indexed()?;
    let mode = match args.mode {
        ServeMode::AppendOnly => Mode::AppendOnly,
        ServeMode::ReadOnly => Mode::ReadOnly,
    };
    let pinned = match &args.snapshot {
        Some(_) if mode == Mode::AppendOnly => {
            return Err(CliError::usage(
                "--snapshot goes with --mode read-only: an append-only server takes backups",
            ))
        }
        Some(spec) => Some(repo.find_snapshot(spec)?.0),
        None => None,
    };
    if !args.delta_bases.is_empty() && mode == Mode::AppendOnly {
        return Err(CliError::usage(
            "--delta-base goes with --mode read-only: deltas are sent, never received",
        ));
    }
    let bases = args
        .delta_bases
        .iter()
        .map(|spec| Ok(repo.find_snapshot(spec)?.0))
        .collect::<Result<Vec<_>, CliError>>()?;
    let mut server = Server::new(std::sync::Arc::new(repo), mode, args.host.clone()).with_limits(
        server::conn::Limits {
            request: args.request_timeout,
            grace: args.grace,
            ..Default::default()
        },
    );
    if let Some(id) = pinned {
        server = server.pinned_to(id);
    }
    if !bases.is_empty() {
        server = server.with_bases(bases);
    }
    if args.cross_host_dedup {
        server = server.with_scope(haul_repo::ingest::DedupScope::Repository);
    }
    let rt = crate::transport::runtime()?;
    rt.block_on(async {
        let (listener, _guard) = server::bind(&args.socket)?;
        crate::errln!(
            "haul-pbs: serving {} ({}) on {}",
            ctx.site()?.existing_repository(None)?.location,
            match mode {
                Mode::AppendOnly | Mode::Receive => "append-only",
                Mode::ReadOnly => "read-only",
            },
            args.socket.display()
        );
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("signal handler");
            let mut int = signal(SignalKind::interrupt()).expect("signal handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutting down: no new connections; requests in progress finish");
        };
        server::serve(server, listener, shutdown).await
    })
}
