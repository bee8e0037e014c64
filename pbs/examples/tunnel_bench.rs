//! Measures the raw throughput of the pbs's SSH tunnel (bench/tunnel.sh drives it).
//!
//! ```text
//! tunnel_bench russh --config PBS.toml HOST --upload FILE     curl -T FILE on HOST into a
//!                                                            russh reverse forward
//! tunnel_bench russh --config PBS.toml HOST --download BYTES  curl on HOST fetches BYTES
//! tunnel_bench serve SOCKET                                   the same HTTP endpoints on a
//!                                                            local Unix socket, for OpenSSH's
//!                                                            `ssh -R`; exits after one transfer
//! ```
//!
//! Both modes serve the same two endpoints with the same axum + hyper stack as the
//! pbs's repository server: `PUT /sink` reads the body and answers
//! `{"bytes":N,"seconds":S}` (S from the first body byte to the last), `GET /source/N`
//! sends N bytes. The `russh` mode prints that answer (what curl printed on the host);
//! the host's sshd, its key and its `curl` are the same for both clients.

use axum::body::Body;
use axum::extract::Path;
use axum::routing::{get, put};
use axum::Router;
use http_body_util::BodyExt;
use std::time::Instant;

const USAGE: &str = "usage: tunnel_bench russh --config FILE HOST (--upload FILE | --download BYTES)\n       tunnel_bench serve SOCKET";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let code = match words.as_slice() {
        ["russh", "--config", config, host, how, what] => russh(config, host, how, what),
        ["serve", socket] => serve(socket),
        _ => Err(USAGE.to_string()),
    };
    if let Err(e) = code {
        eprintln!("tunnel_bench: {e}");
        std::process::exit(2);
    }
}

/// The endpoints.
fn router() -> Router {
    Router::new()
        .route(
            "/sink",
            put(|body: Body| async move {
                let mut body = body.into_data_stream();
                let mut bytes = 0u64;
                let mut first = None;
                while let Some(chunk) = body.frame().await {
                    let Ok(frame) = chunk else { break };
                    if let Ok(data) = frame.into_data() {
                        first.get_or_insert_with(Instant::now);
                        bytes += data.len() as u64;
                    }
                }
                let seconds = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
                format!("{{\"bytes\":{bytes},\"seconds\":{seconds:.3}}}\n")
            }),
        )
        .route(
            "/source/{n}",
            get(|Path(n): Path<u64>| async move {
                // 1 MiB of incompressible bytes, sent again and again.
                let block = bytes::Bytes::from(
                    (0..1u32 << 20)
                        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                        .collect::<Vec<u8>>(),
                );
                let size = block.len() as u64;
                let stream = futures_util::stream::iter((0..n.div_ceil(size)).map(move |i| {
                    let len = (n - i * size).min(size) as usize;
                    Ok::<_, std::io::Error>(block.slice(..len))
                }));
                Body::from_stream(stream)
            }),
        )
}

fn russh(config: &str, host: &str, how: &str, what: &str) -> Result<(), String> {
    let config = haul_config::Config::load(std::path::Path::new(config)).map_err(|e| e.0)?;
    let host = config
        .host(host)
        .ok_or_else(|| format!("no host {host:?} in the config"))?;
    let command = |socket: &str| {
        match how {
        "--upload" => format!(
            "curl -sS --fail -T {what} --unix-socket {socket} http://pbs/sink"
        ),
        _ => format!(
            "curl -sS --fail -o /dev/null -w '{{\"bytes\":%{{size_download}},\"seconds\":%{{time_total}}}}\\n' --unix-socket {socket} http://pbs/source/{what}"
        ),
    }
    };
    if !matches!(how, "--upload" | "--download") {
        return Err(USAGE.into());
    }
    let out = haul_pbs::transport::ssh::run_command(host, router(), command)
        .map_err(|e| e.to_string())?;
    for line in &out.stdout {
        println!("{line}");
    }
    if out.exit != Some(0) {
        return Err(format!(
            "curl on the host: {}: {}",
            out.how,
            out.stderr.join("\n")
        ));
    }
    Ok(())
}

fn serve(socket: &str) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let _ = std::fs::remove_file(socket);
        let listener =
            tokio::net::UnixListener::bind(socket).map_err(|e| format!("{socket}: {e}"))?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        // Until SIGTERM: bench/tunnel.sh stops it when the transfer is over.
        tokio::select! {
            r = axum::serve(listener, router()) => r.map_err(|e| e.to_string())?,
            _ = term.recv() => {}
        }
        let _ = std::fs::remove_file(socket);
        println!("{{\"cpu_s\":{:.3}}}", cpu_seconds());
        Ok(())
    })
}

/// User and system CPU time of this process so far.
fn cpu_seconds() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}
