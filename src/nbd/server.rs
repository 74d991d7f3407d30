//! Listener loop, connection lifecycle and shutdown.

use std::collections::HashMap;
use std::io::{self, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::conn::{self, ConnLimits, Stats};
use super::export::ExportProvider;
use super::handshake::{self, Outcome};
use super::stream::Stream;

/// A client idle this long in the middle of the handshake is dropped, so
/// half-open connections cannot pin connection slots. Transmission has no
/// idle limit: an idle mounted disk is normal.
pub const HANDSHAKE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// After shutdown, connections get this long to answer in-flight requests
/// before their sockets are closed under them (e.g. a client that stopped
/// reading replies).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Pause after accept() fails for lack of resources (e.g. EMFILE).
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Read buffer for request headers; large payloads bypass it.
const READ_BUFFER_BYTES: usize = 64 << 10;

/// Server tuning.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Concurrent connections; further clients are accepted and closed at once.
    pub max_connections: usize,
    /// Bytes of WRITE payload and READ reply data one connection may hold in
    /// memory; the reader stops reading requests while it is used up. A
    /// single request larger than this is still admitted when it is alone.
    pub max_in_flight_bytes_per_conn: usize,
    /// Threads executing requests of one connection in parallel.
    pub worker_threads_per_conn: usize,
    /// TLS offered (or required) through NBD_OPT_STARTTLS.
    pub tls: Option<super::tls::TlsSetup>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 64,
            max_in_flight_bytes_per_conn: 64 << 20,
            worker_threads_per_conn: 4,
            tls: None,
        }
    }
}

/// An NBD server: serves the exports of an [`ExportProvider`] on listeners.
///
/// `serve_tcp` / `serve_unix` may run concurrently (e.g. on two threads
/// sharing the server through an `Arc`); [`ShutdownHandle::shutdown`] stops
/// all of them. Shutdown is permanent.
pub struct Server {
    shared: Arc<Shared>,
}

/// Stops a [`Server`] from any thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

struct Shared {
    provider: Arc<dyn ExportProvider>,
    config: ServerConfig,
    next_id: AtomicU64,
    registry: Mutex<Registry>,
    /// Signalled when a connection ends or shutdown starts.
    changed: Condvar,
    metrics: Arc<super::metrics::Metrics>,
}

#[derive(Default)]
struct Registry {
    shutting_down: bool,
    /// A handle to each live connection's socket, for shutdown.
    conns: HashMap<u64, Box<dyn Stream>>,
    /// Each running accept loop's way out of a blocking accept().
    wakers: HashMap<u64, Box<dyn Fn() + Send>>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_shutting_down(&self) -> bool {
        self.registry().shutting_down
    }

    fn shutdown(&self) {
        let mut reg = self.registry();
        if reg.shutting_down {
            return;
        }
        reg.shutting_down = true;
        tracing::info!(connections = reg.conns.len(), "nbd server shutting down");
        // Closing the read side ends each reader at its next request while
        // in-flight requests still get their replies.
        for stream in reg.conns.values() {
            let _ = stream.shutdown_stream(Shutdown::Read);
        }
        for wake in reg.wakers.values() {
            wake();
        }
        self.changed.notify_all();
    }
}

impl ShutdownHandle {
    /// Asks every serve loop to stop accepting, lets in-flight requests
    /// finish, closes connections, and makes `serve_*` return. Idempotent.
    pub fn shutdown(&self) {
        self.shared.shutdown();
    }

    /// Whether shutdown has been requested.
    pub fn is_shutdown(&self) -> bool {
        self.shared.is_shutting_down()
    }
}

/// TCP listeners bound to a wildcard address are woken through loopback.
fn wake_address(local: SocketAddr) -> SocketAddr {
    let ip = match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, local.port())
}

type Accepted = (Box<dyn Stream>, String);

impl Server {
    /// Creates a server; nothing is served until `serve_tcp`/`serve_unix`.
    pub fn new(provider: Arc<dyn ExportProvider>, config: ServerConfig) -> Self {
        Server {
            shared: Arc::new(Shared {
                provider,
                config,
                next_id: AtomicU64::new(1),
                registry: Mutex::new(Registry::default()),
                changed: Condvar::new(),
                metrics: Arc::default(),
            }),
        }
    }

    /// Requests, bytes, errors and latency per command, and connections.
    pub fn metrics(&self) -> Arc<super::metrics::Metrics> {
        self.shared.metrics.clone()
    }

    /// A cloneable handle that stops this server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Serve on a TCP listener (already bound) until `shutdown()`; returns after in-flight requests finish.
    pub fn serve_tcp(&self, listener: TcpListener) -> io::Result<()> {
        // A non-blocking listener would make the accept loop spin.
        listener.set_nonblocking(false)?;
        let wake_to = wake_address(listener.local_addr()?);
        let wake = move || {
            let _ = TcpStream::connect_timeout(&wake_to, Duration::from_secs(1));
        };
        self.serve(Box::new(wake), || {
            let (stream, peer) = listener.accept()?;
            // Replies are written whole; don't let Nagle delay small ones.
            stream.set_nodelay(true)?;
            Ok((Box::new(stream), peer.to_string()))
        })
    }

    /// Serve on a Unix domain socket listener (already bound) until `shutdown()`.
    pub fn serve_unix(&self, listener: UnixListener) -> io::Result<()> {
        listener.set_nonblocking(false)?;
        let local = listener.local_addr()?;
        let wake = move || {
            let _ = UnixStream::connect_addr(&local);
        };
        self.serve(Box::new(wake), || {
            let (stream, peer) = listener.accept()?;
            let peer = match peer.as_pathname() {
                Some(path) => format!("unix:{}", path.display()),
                None => "unix".to_owned(),
            };
            Ok((Box::new(stream), peer))
        })
    }

    fn serve(
        &self,
        wake: Box<dyn Fn() + Send>,
        mut accept: impl FnMut() -> io::Result<Accepted>,
    ) -> io::Result<()> {
        let shared = &*self.shared;
        let loop_id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut reg = shared.registry();
            if reg.shutting_down {
                return Ok(());
            }
            reg.wakers.insert(loop_id, wake);
        }
        let result = thread::scope(|s| {
            let result = loop {
                if shared.is_shutting_down() {
                    break Ok(());
                }
                let (stream, peer) = match accept() {
                    Ok(accepted) => accepted,
                    Err(e) => match classify_accept_error(&e) {
                        AcceptError::Retry => continue,
                        AcceptError::Backoff => {
                            tracing::warn!(error = %e, "nbd accept failed; retrying");
                            thread::sleep(ACCEPT_RETRY_DELAY);
                            continue;
                        }
                        AcceptError::Fatal => {
                            tracing::error!(error = %e, "nbd accept failed; shutting down");
                            shared.shutdown();
                            break Err(e);
                        }
                    },
                };
                self.start_connection(s, stream, peer);
            };
            self.drain();
            result
        });
        shared.registry().wakers.remove(&loop_id);
        result
    }

    /// Registers and spawns a connection thread inside the serve scope.
    fn start_connection<'scope>(
        &'scope self,
        s: &'scope thread::Scope<'scope, '_>,
        stream: Box<dyn Stream>,
        peer: String,
    ) {
        let shared = &*self.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let control = match stream.try_clone_stream() {
            Ok(control) => control,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "nbd connection dropped: cannot clone socket");
                return;
            }
        };
        {
            let mut reg = shared.registry();
            if reg.shutting_down {
                return;
            }
            if reg.conns.len() >= shared.config.max_connections {
                tracing::warn!(%peer, max = shared.config.max_connections, "nbd connection refused: too many connections");
                return;
            }
            reg.conns.insert(id, control);
        }
        let spawned = thread::Builder::new()
            .name(format!("nbd-c{id}"))
            .spawn_scoped(s, move || {
                let run = AssertUnwindSafe(|| self.run_connection(id, stream, &peer));
                if catch_unwind(run).is_err() {
                    tracing::error!(%peer, "nbd connection thread panicked");
                }
                let mut reg = shared.registry();
                reg.conns.remove(&id);
                shared.changed.notify_all();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "nbd connection dropped: cannot spawn thread");
            shared.registry().conns.remove(&id);
        }
    }

    /// Waits for connections to finish after shutdown; past the grace period
    /// their sockets are shut completely so blocked writes fail.
    fn drain(&self) {
        let shared = &*self.shared;
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        let mut reg = shared.registry();
        while !reg.conns.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    connections = reg.conns.len(),
                    "nbd shutdown grace expired; closing connections"
                );
                for stream in reg.conns.values() {
                    let _ = stream.shutdown_stream(Shutdown::Both);
                }
                // The scope join that follows waits for them to notice.
                return;
            }
            reg = shared
                .changed
                .wait_timeout(reg, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Handshake then transmission for one client; logs open and close.
    fn run_connection(&self, id: u64, stream: Box<dyn Stream>, peer: &str) {
        let shared = &*self.shared;
        let mut writer = match stream.try_clone_stream() {
            Ok(w) => w,
            Err(e) => {
                tracing::info!(conn = id, %peer, export = "-", reason = %e, "nbd connection closed");
                return;
            }
        };
        let _ = stream.set_read_timeout_stream(Some(HANDSHAKE_IDLE_TIMEOUT));
        // One buffered reader for both phases, so bytes the client pipelined
        // right after NBD_OPT_GO are not lost.
        let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
        let tls = shared.config.tls.as_ref();
        let policy = handshake::TlsPolicy {
            offered: tls.is_some(),
            required: tls.is_some_and(|t| t.required),
        };
        let provider = shared.provider.as_ref();
        let mut result = handshake::negotiate(&mut reader, &mut writer, provider, policy);
        let mut pumps = None;
        if let (Ok(Err(Outcome::StartTls(resume))), Some(tls)) = (&result, tls) {
            let resume = *resume;
            // The client may send nothing between STARTTLS and its handshake.
            if !reader.buffer().is_empty() {
                tracing::info!(conn = id, %peer, reason = "data after STARTTLS", "nbd connection closed");
                return;
            }
            let (plain, p) = match super::tls::upgrade(
                reader.into_inner(),
                tls.config.clone(),
                &format!("nbd-c{id}"),
            ) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(conn = id, %peer, error = %e, "nbd TLS handshake failed");
                    return;
                }
            };
            pumps = Some(p);
            let _ = plain.set_read_timeout_stream(Some(HANDSHAKE_IDLE_TIMEOUT));
            writer = match plain.try_clone_stream() {
                Ok(w) => w,
                Err(_) => return,
            };
            reader = BufReader::with_capacity(READ_BUFFER_BYTES, plain);
            result = handshake::negotiate_after_tls(&mut reader, &mut writer, provider, resume);
        }
        let session = match result {
            Ok(Ok(session)) => session,
            Ok(Err(outcome)) => {
                let reason = match outcome {
                    Outcome::Aborted => "client aborted negotiation",
                    Outcome::Closed => "client closed during negotiation",
                    Outcome::StartTls(_) => "STARTTLS without TLS configured",
                };
                tracing::info!(conn = id, %peer, export = "-", reason, "nbd connection closed");
                return;
            }
            Err(e) => {
                tracing::info!(conn = id, %peer, export = "-", reason = %e, "nbd connection closed");
                return;
            }
        };
        let _ = reader.get_ref().set_read_timeout_stream(None);
        tracing::info!(
            conn = id,
            %peer,
            export = %session.export_name,
            size_bytes = session.size_bytes,
            structured_replies = session.structured_replies,
            "nbd connection opened"
        );
        let limits = ConnLimits {
            worker_threads: shared.config.worker_threads_per_conn,
            max_in_flight_bytes: shared.config.max_in_flight_bytes_per_conn,
        };
        let stats = Stats {
            server: shared.metrics.clone(),
            ..Default::default()
        };
        shared
            .metrics
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        let open = OpenConnection::count(&shared.metrics);
        let name = format!("nbd-c{id}");
        let end = conn::serve(&mut reader, writer, &session, limits, &stats, &name);
        drop(open);
        tracing::info!(
            conn = id,
            %peer,
            export = %session.export_name,
            reason = %end,
            requests = stats.requests.load(Ordering::Relaxed),
            bytes_read = stats.bytes_read.load(Ordering::Relaxed),
            bytes_written = stats.bytes_written.load(Ordering::Relaxed),
            server_shutdown = shared.is_shutting_down(),
            "nbd connection closed"
        );
        // Closing the plain end lets the TLS pumps send what is left and
        // close_notify; the connection stays registered (so a shutdown's
        // grace can cut the socket) until they are done.
        drop(reader);
        if let Some(p) = pumps {
            p.join();
        }
    }
}

enum AcceptError {
    /// The failed connection is gone; accept the next one.
    Retry,
    /// Out of resources; wait a little.
    Backoff,
    /// The listener itself is unusable.
    Fatal,
}

fn classify_accept_error(e: &io::Error) -> AcceptError {
    const ENOMEM: i32 = 12;
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    const ENOBUFS: i32 = 105;
    // Network errors of the new socket that Linux reports through accept().
    const EPROTO: i32 = 71;
    const ENETDOWN: i32 = 100;
    const ENETUNREACH: i32 = 101;
    const ETIMEDOUT: i32 = 110;
    const EHOSTDOWN: i32 = 112;
    const EHOSTUNREACH: i32 = 113;
    match e.kind() {
        io::ErrorKind::Interrupted
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::WouldBlock => AcceptError::Retry,
        _ => match e.raw_os_error() {
            Some(ENOMEM | ENFILE | EMFILE | ENOBUFS) => AcceptError::Backoff,
            Some(EPROTO | ENETDOWN | ENETUNREACH | ETIMEDOUT | EHOSTDOWN | EHOSTUNREACH) => {
                AcceptError::Retry
            }
            _ => AcceptError::Fatal,
        },
    }
}

/// Counts an open connection in the metrics until dropped (also when the
/// connection's thread unwinds).
struct OpenConnection<'a>(&'a super::metrics::Metrics);

impl<'a> OpenConnection<'a> {
    fn count(m: &'a super::metrics::Metrics) -> Self {
        m.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(m)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_thread_safe() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Server>();
        assert_send_sync::<ShutdownHandle>();
    }

    #[test]
    fn wake_address_maps_wildcards_to_loopback() {
        let a: SocketAddr = "0.0.0.0:10809".parse().unwrap();
        assert_eq!(wake_address(a), "127.0.0.1:10809".parse().unwrap());
        let b: SocketAddr = "[::]:1".parse().unwrap();
        assert_eq!(wake_address(b), "[::1]:1".parse().unwrap());
        let c: SocketAddr = "10.1.2.3:5".parse().unwrap();
        assert_eq!(wake_address(c), c);
    }

    #[test]
    fn accept_errors() {
        let e = |c| classify_accept_error(&io::Error::from_raw_os_error(c));
        assert!(matches!(e(24), AcceptError::Backoff));
        assert!(matches!(e(103), AcceptError::Retry)); // ECONNABORTED
        assert!(matches!(e(9), AcceptError::Fatal)); // EBADF
    }
}
