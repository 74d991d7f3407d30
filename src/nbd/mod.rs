//! NBD (Network Block Device) protocol server.
//!
//! Implements the fixed-newstyle handshake (`NBD_OPT_EXPORT_NAME`, `ABORT`,
//! `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//! `SET_META_CONTEXT` with `base:allocation`; `STARTTLS` with rustls when
//! [`ServerConfig::tls`] is set, refused otherwise) and the
//! transmission phase (`READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM`, `CACHE`,
//! `WRITE_ZEROES`, `BLOCK_STATUS`) with simple or structured replies, over
//! TCP or Unix sockets, using only std threads.
//!
//! Threading: one thread per connection reads requests and hands them to a
//! small per-connection worker pool, so requests are pipelined and replies
//! may complete out of order. Per-connection memory is bounded by
//! [`ServerConfig::max_in_flight_bytes_per_conn`].
//!
//! Entry points: implement [`Export`] and [`ExportProvider`], then
//! [`Server::new`] and [`Server::serve_tcp`] / [`Server::serve_unix`].
//! [`proto`] exposes the wire decoders (e.g. [`parse_request`]) for fuzzing.

mod budget;
mod command;
mod conn;
mod errno;
mod export;
mod handshake;
mod io_util;
mod metrics;
mod ordering;
mod payload;
pub mod proto;
mod queue;
mod reply;
mod server;
mod stream;
mod tls;

pub use errno::nbd_error_from_io;
pub use export::{Export, ExportProvider};
pub use metrics::{CommandMetrics, Metrics, COMMANDS};
pub use proto::{parse_request, ProtoError, Request};
pub use server::{Server, ServerConfig, ShutdownHandle};
pub use tls::{load_config as load_tls_config, TlsSetup};
