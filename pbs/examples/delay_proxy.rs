//! A TCP proxy that delays every byte by a fixed time in each direction, for measuring
//! pulls and pushes over a long link on a kernel without `tc netem` (bench/push.sh).
//! Nothing else is changed: bytes are forwarded as they came, as fast as they came, only
//! later (a link of that latency and unlimited bandwidth). The round-trip time it adds
//! is twice the delay.
//!
//! A link costs the machines at its ends no CPU, and this proxy runs on the same cores
//! as what it measures, so it moves the bytes without copying them: each direction
//! `splice`s what the socket received into a pipe (the kernel keeps the pages), notes
//! when each piece came, and a second thread `splice`s each piece from the pipe into
//! the other socket once its time is due. The pipe holds what is in flight (up to 64
//! MiB; /proc/sys/fs/pipe-max-size must allow it, as bench/push.sh sets it).
//!
//! usage: delay_proxy LISTEN TARGET DELAY_MS
//!        (e.g. `delay_proxy 127.0.0.1:2222 127.0.0.1:22 25`: 50 ms round trips)

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bytes one `splice` from a socket may move.
const PIECE: usize = 1 << 20;
/// The pipe's size asked for first (halved until the kernel accepts it).
const IN_FLIGHT: libc::c_int = 64 << 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, target, delay] = args.as_slice() else {
        eprintln!("usage: delay_proxy LISTEN TARGET DELAY_MS");
        std::process::exit(2);
    };
    let delay = Duration::from_millis(delay.parse().unwrap_or_else(|_| {
        eprintln!("delay_proxy: DELAY_MS {delay:?} is not a number of milliseconds");
        std::process::exit(2);
    }));
    let listener = TcpListener::bind(listen).unwrap_or_else(|e| {
        eprintln!("delay_proxy: cannot listen on {listen}: {e}");
        std::process::exit(1);
    });
    for inbound in listener.incoming() {
        let Ok(inbound) = inbound else { continue };
        let Ok(outbound) = TcpStream::connect(target) else {
            continue;
        };
        let _ = inbound.set_nodelay(true);
        let _ = outbound.set_nodelay(true);
        for (from, to) in [
            (inbound.try_clone(), outbound.try_clone()),
            (outbound.try_clone(), inbound.try_clone()),
        ] {
            let (Ok(from), Ok(to)) = (from, to) else {
                continue;
            };
            std::thread::spawn(move || {
                if let Err(e) = forward(&from, &to, delay) {
                    eprintln!("delay_proxy: {e}");
                }
                let _ = to.shutdown(Shutdown::Write);
            });
        }
    }
}

/// Forwards what `from` receives to `to`, each piece `delay` after it came, until
/// `from` ends or `to` fails.
fn forward(from: &TcpStream, to: &TcpStream, delay: Duration) -> io::Result<()> {
    let (pipe_r, pipe_w) = pipe()?;
    let mut size = IN_FLIGHT;
    while size > 4096 && unsafe { libc::fcntl(pipe_w.as_raw_fd(), libc::F_SETPIPE_SZ, size) } < 0 {
        size /= 2;
    }
    if size < IN_FLIGHT && !delay.is_zero() {
        let mib = size as f64 / (1 << 20) as f64;
        eprintln!(
            "delay_proxy: the pipe holds only {mib} MiB, which caps a direction at {:.0} MiB/s at this delay: raise /proc/sys/fs/pipe-max-size to {IN_FLIGHT}",
            mib / delay.as_secs_f64()
        );
    }
    let (tx, rx) = mpsc::channel::<(Instant, usize)>();
    // Nothing blocks inside `splice`: a blocked splice holds the pipe's lock, and the
    // other side's splice would wait for it.
    from.set_nonblocking(true)?;
    to.set_nonblocking(true)?;
    let to_fd = to.as_raw_fd();
    let writer = std::thread::spawn(move || -> io::Result<()> {
        for (due, mut left) in rx {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            while left > 0 {
                match splice(pipe_r.as_raw_fd(), to_fd, left)? {
                    Some(0) => return Err(io::Error::other("the pipe ended early")),
                    Some(n) => left -= n,
                    // The socket's buffer is full.
                    None => wait(to_fd, libc::POLLOUT)?,
                }
            }
        }
        Ok(())
    });
    let from_fd = from.as_raw_fd();
    loop {
        wait(from_fd, libc::POLLIN)?;
        match splice(from_fd, pipe_w.as_raw_fd(), PIECE)? {
            Some(0) => break,
            Some(n) => {
                if tx.send((Instant::now() + delay, n)).is_err() {
                    break;
                }
            }
            // The pipe is full (or the data was not there after all).
            None => wait(pipe_w.as_raw_fd(), libc::POLLOUT)?,
        }
    }
    drop(tx);
    writer.join().unwrap_or(Ok(()))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Moves up to `len` bytes from `from` to `to` in the kernel, without blocking: `Some(0)`
/// at the end of `from`, `None` when it would block.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<Option<usize>> {
    loop {
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// Waits until `fd` is ready for `events`.
fn wait(fd: RawFd, events: libc::c_short) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        if unsafe { libc::poll(&mut p, 1, -1) } >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
