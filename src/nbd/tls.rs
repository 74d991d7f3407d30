//! TLS for NBD (`NBD_OPT_STARTTLS`), with rustls.
//!
//! After the TLS handshake on the client's socket, the connection code goes
//! on with one end of a Unix socket pair, unchanged: two pump threads carry
//! bytes between the pair and the TLS session. One decrypts what the client
//! sends; the other encrypts what the server replies. They share the rustls
//! session under a mutex, and the socket writes under a second one (taken
//! before the first is let go, so TLS records leave in order). A reply being
//! written to a slow client never holds up reading its next request.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig as RustlsConfig, ServerConnection};

use super::stream::Stream;

/// Bytes moved per pump step.
const PUMP_BUFFER_BYTES: usize = 64 << 10;

/// How a server offers TLS.
#[derive(Clone)]
pub struct TlsSetup {
    pub config: Arc<RustlsConfig>,
    /// FORCEDTLS: every option but STARTTLS and ABORT waits for TLS.
    pub required: bool,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration from PEM files: the certificate chain, its key,
/// and, when given, the CA that client certificates must chain to (clients
/// without one are then refused).
pub fn load_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<RustlsConfig, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("{}: cannot read certificates: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: cannot read the private key: {e}", key.display()))?;
    let builder = RustlsConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("{}: cannot read the CA: {e}", ca.display()))?
            {
                let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("{}: unusable CA certificate: {e}", ca.display()))?;
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(v)
        }
    };
    builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "{}: the key does not fit the certificate: {e}",
            cert.display()
        )
    })
}

/// The TLS session and the socket its records go out on.
struct Session {
    tls: Mutex<ServerConnection>,
    out: Mutex<Box<dyn Stream>>,
}

impl Session {
    fn tls(&self) -> MutexGuard<'_, ServerConnection> {
        self.tls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the records the session has ready and sends them, holding the
    /// socket before the session is let go so records leave in order.
    fn send(&self, mut tls: MutexGuard<'_, ServerConnection>) -> io::Result<()> {
        let mut records = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut records)?;
        }
        if records.is_empty() {
            return Ok(());
        }
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        drop(tls);
        out.write_all(&records)?;
        out.flush()
    }
}

/// The two pump threads of a TLS connection. Joined when the connection
/// ends, so that its last replies reach the client (or the server's grace
/// shutdown of the socket ends the wait) before the connection counts as
/// gone.
pub struct Pumps(Vec<thread::JoinHandle<()>>);

impl Pumps {
    pub fn join(self) {
        for h in self.0 {
            let _ = h.join();
        }
    }
}

/// Completes the TLS handshake on `raw` and returns the plain end the NBD
/// code goes on with, and its pumps. `name` names the pump threads.
pub fn upgrade(
    mut raw: Box<dyn Stream>,
    config: Arc<RustlsConfig>,
    name: &str,
) -> io::Result<(Box<dyn Stream>, Pumps)> {
    let mut tls = ServerConnection::new(config).map_err(io::Error::other)?;
    while tls.is_handshaking() {
        tls.complete_io(&mut raw)?;
    }
    // The handshake's idle limit now applies to the plain end (the caller
    // sets it there); the pump must wait for the client indefinitely.
    raw.set_read_timeout_stream(None)?;
    let (mut inner, outer) = UnixStream::pair()?;
    // The client's first options may have come with its last handshake
    // record: hand them over before the pumps start.
    let mut early = Vec::new();
    match tls.reader().read_to_end(&mut early) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    inner.write_all(&early)?;
    let session = Arc::new(Session {
        tls: Mutex::new(tls),
        out: Mutex::new(raw.try_clone_stream()?),
    });
    let (s, inner_w) = (session.clone(), inner.try_clone()?);
    let shut = raw.try_clone_stream()?;
    let input = thread::Builder::new()
        .name(format!("{name}-tls-in"))
        .spawn(move || from_client(raw, &s, inner_w))?;
    let output = thread::Builder::new()
        .name(format!("{name}-tls-out"))
        .spawn(move || to_client(inner, &session));
    match output {
        Ok(output) => Ok((Box::new(outer), Pumps(vec![input, output]))),
        Err(e) => {
            // Unblock the reader pump so that it ends.
            let _ = shut.shutdown_stream(Shutdown::Both);
            let _ = input.join();
            Err(e)
        }
    }
}

/// Decrypts what the client sends into the plain end; ends on EOF, a socket
/// error or a TLS error, closing the plain end so the connection ends too.
fn from_client(mut raw: Box<dyn Stream>, s: &Session, mut plain: UnixStream) {
    let mut buf = vec![0u8; PUMP_BUFFER_BYTES];
    let mut clear = vec![0u8; PUMP_BUFFER_BYTES];
    'pump: loop {
        let n = match raw.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut got = Vec::new();
        let mut closed = false;
        let mut tls = s.tls();
        let mut rd = &buf[..n];
        while !rd.is_empty() {
            if tls.read_tls(&mut rd).is_err() {
                break 'pump;
            }
            if let Err(e) = tls.process_new_packets() {
                tracing::info!("nbd TLS session failed: {e}");
                let _ = s.send(tls); // the alert
                break 'pump;
            }
            loop {
                match tls.reader().read(&mut clear) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(k) => got.extend_from_slice(&clear[..k]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => break 'pump,
                }
            }
        }
        if s.send(tls).is_err() || plain.write_all(&got).is_err() || closed {
            break;
        }
    }
    let _ = plain.shutdown(Shutdown::Write);
}

/// Encrypts what the server writes to the plain end; on its EOF sends
/// close_notify and closes the socket.
fn to_client(mut plain: UnixStream, s: &Session) {
    let mut buf = vec![0u8; PUMP_BUFFER_BYTES];
    'pump: loop {
        let n = match plain.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut off = 0;
        while off < n {
            let mut tls = s.tls();
            match tls.writer().write(&buf[off..n]) {
                Ok(k) => off += k,
                Err(_) => break 'pump,
            }
            if s.send(tls).is_err() {
                break 'pump;
            }
        }
    }
    let mut tls = s.tls();
    tls.send_close_notify();
    let _ = s.send(tls);
    let out = s.out.lock().unwrap_or_else(|p| p.into_inner());
    let _ = out.shutdown_stream(Shutdown::Both);
    let _ = plain.shutdown(Shutdown::Both);
}
