//! The control socket of a running server: one JSON [`Op`] per line in, one
//! JSON [`OpOutput`] per line back.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::pool::Pool;
use crate::service::ops::{self, Op, OpOutput};
use crate::util::sync::{thread, Arc, AtomicBool, Ordering};

/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: u64 = 64 << 10;

/// Send one command to the server at `socket`.
pub fn request(socket: &Path, op: &Op) -> std::io::Result<OpOutput> {
    request_within(socket, op, None)
}

/// [`request`], giving up when the server does not answer within
/// `timeout` (a progress bar's poll must not hang its command).
pub fn request_within(
    socket: &Path,
    op: &Op,
    timeout: Option<std::time::Duration>,
) -> std::io::Result<OpOutput> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot reach chunkvol serve at {}: {e}", socket.display()),
        )
    })?;
    s.set_read_timeout(timeout)?;
    s.set_write_timeout(timeout)?;
    let mut line = serde_json::to_string(op).map_err(std::io::Error::other)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut resp = String::new();
    BufReader::new(s).read_line(&mut resp)?;
    serde_json::from_str(&resp).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad reply from server: {e}"),
        )
    })
}

fn handle(pool: &Pool, stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(30)));
    let mut reader = BufReader::new((&stream).take(MAX_REQUEST_BYTES));
    let mut line = String::new();
    let out = match reader.read_line(&mut line) {
        Ok(_) => match serde_json::from_str::<Op>(&line) {
            Ok(op) => ops::run(pool, &op),
            Err(e) => OpOutput {
                stderr: format!("error: malformed control request: {e}\n"),
                exit: 2,
                ..Default::default()
            },
        },
        Err(e) => OpOutput {
            stderr: format!("error: reading control request: {e}\n"),
            exit: 2,
            ..Default::default()
        },
    };
    let mut w = &stream;
    if let Ok(mut s) = serde_json::to_string(&out) {
        s.push('\n');
        let _ = w.write_all(s.as_bytes());
    }
}

/// Commands act with the server's privileges (import and export open
/// files): only the server's own user and root may use them, whatever the
/// socket file's mode. Returns why a peer is refused.
fn refuse_peer(s: &UnixStream) -> Option<String> {
    let me = rustix::process::geteuid();
    match rustix::net::sockopt::socket_peercred(s) {
        Ok(c) if c.uid == me || c.uid.is_root() => None,
        Ok(c) => Some(format!(
            "uid {} (pid {}): only uid {} or root may use the control socket",
            c.uid.as_raw(),
            c.pid.as_raw_nonzero(),
            me.as_raw()
        )),
        Err(e) => Some(format!("cannot read the peer's credentials: {e}")),
    }
}

/// Serve control requests until `stop` is set.
pub fn serve(pool: Pool, listener: UnixListener, stop: Arc<AtomicBool>) {
    listener.set_nonblocking(true).ok();
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).ok();
                if let Some(why) = refuse_peer(&s) {
                    tracing::warn!("control socket: refused a connection from {why}");
                    let out = OpOutput {
                        stderr: format!("error: permission denied: {why}\n"),
                        exit: 1,
                        ..Default::default()
                    };
                    if let Ok(mut line) = serde_json::to_string(&out) {
                        line.push('\n');
                        let _ = (&s).write_all(line.as_bytes());
                    }
                    continue;
                }
                let p = pool.clone();
                thread::spawn(move || handle(&p, s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}
