//! `receive`: the forced command of a key another pbs copies with (`haul-pbs copy --to
//! pbs:NAME` there). It serves the receive mode of the repository server
//! (`server::receive`) on its standard input and output, the SSH channel, until the
//! sender closes it: sessions store blobs and commit snapshots, nothing is read,
//! listed, deleted or overwritten, and the repository is the one this command names,
//! never one the sender chooses.

use super::Context;
use crate::cli::ReceiveArgs;
use crate::error::CliError;
use crate::server::{self, Server};
use std::sync::Arc;

pub fn receive(ctx: &Context, args: ReceiveArgs) -> Result<(), CliError> {
    // Standard output is the protocol's: everything this command says goes to stderr,
    // which the sender shows when the copy fails.
    let repo = ctx.open_indexed()?;
    let limits = server::conn::Limits {
        request: args.request_timeout,
        ..Default::default()
    };
    let mut server =
        Server::receiving(Arc::new(repo), args.hosts, ctx.site()?.history()).with_limits(limits);
    if args.cross_host_dedup {
        server = server.with_scope(haul_repo::ingest::DedupScope::Repository);
    }
    let rt = crate::transport::runtime()?;
    rt.block_on(server::conn::serve_connection(
        tokio::io::join(tokio::io::stdin(), tokio::io::stdout()),
        server::router(server.clone()),
        limits,
        None,
    ));
    // Not waited for: the thread reading stdin may be blocked in a read until the
    // sender closes the channel, which one that holds it open never does.
    rt.shutdown_background();
    // A session the sender did not commit ends here; what it stored is kept, and its
    // packs are remembered for the host's next copy.
    server.end_receiving();
    Ok(())
}
