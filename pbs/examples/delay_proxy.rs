//! A TCP proxy that delays every byte by a fixed time in each direction, for measuring
//! pulls and pushes over a long link on a kernel without `tc netem` (bench/push.sh).
//! Nothing else is changed: bytes are forwarded as they came, as fast as they came, only
//! later (a link of that latency and unlimited bandwidth). The round-trip time it adds
//! is twice the delay.
//!
//! usage: delay_proxy LISTEN TARGET DELAY_MS
//!        (e.g. `delay_proxy 127.0.0.1:2222 127.0.0.1:22 25`: 50 ms round trips)

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, target, delay] = args.as_slice() else {
        eprintln!("usage: delay_proxy LISTEN TARGET DELAY_MS");
        std::process::exit(2);
    };
    let delay = Duration::from_millis(delay.parse().unwrap_or_else(|_| {
        eprintln!("delay_proxy: DELAY_MS {delay:?} is not a number of milliseconds");
        std::process::exit(2);
    }));
    let listener = TcpListener::bind(listen).await.unwrap_or_else(|e| {
        eprintln!("delay_proxy: cannot listen on {listen}: {e}");
        std::process::exit(1);
    });
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        let target = target.clone();
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(&target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::join!(pipe(ri, wo, delay), pipe(ro, wi, delay));
        });
    }
}

/// Forwards what `from` reads to `to`, each piece `delay` after it was read.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
