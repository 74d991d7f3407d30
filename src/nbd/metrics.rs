//! Counters of the NBD server for the metrics endpoint: requests, bytes,
//! errors and latency per command, and connections.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use super::command::Op;
use crate::util::histogram::Histogram;

/// Command names, in the order of [`Metrics::commands`].
pub const COMMANDS: [&str; 7] = [
    "read",
    "write",
    "flush",
    "trim",
    "cache",
    "write_zeroes",
    "block_status",
];

/// One command's counters.
#[derive(Debug, Default)]
pub struct CommandMetrics {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    /// Payload bytes: read for READ, written for WRITE, ranged for the rest.
    pub bytes: AtomicU64,
    pub latency: Histogram,
}

/// The server's counters, shared by every connection.
#[derive(Debug, Default)]
pub struct Metrics {
    pub commands: [CommandMetrics; COMMANDS.len()],
    pub connections_open: AtomicI64,
    pub connections_total: AtomicU64,
}

impl Metrics {
    pub(crate) fn record(&self, op: &Op, took: Duration, failed: bool) {
        let (i, bytes) = match *op {
            Op::Read { len, .. } => (0, u64::from(len)),
            Op::Write { len, .. } => (1, u64::from(len)),
            Op::Flush => (2, 0),
            Op::Trim { len, .. } => (3, u64::from(len)),
            Op::Cache => (4, 0),
            Op::WriteZeroes { len, .. } => (5, u64::from(len)),
            Op::BlockStatus { len, .. } => (6, u64::from(len)),
        };
        let c = &self.commands[i];
        c.requests.fetch_add(1, Ordering::Relaxed);
        c.bytes.fetch_add(bytes, Ordering::Relaxed);
        if failed {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        c.latency.observe(took);
    }
}

/// Whether an encoded reply reports an error: a simple reply's error field,
/// or a structured chunk of an error type (bit 15).
pub(crate) fn reply_is_error(reply: &[u8]) -> bool {
    const SIMPLE: [u8; 4] = 0x6744_6698u32.to_be_bytes();
    const STRUCTURED: [u8; 4] = 0x668e_33efu32.to_be_bytes();
    match reply.get(..8) {
        Some(h) if h[..4] == SIMPLE => h[4..8] != [0; 4],
        Some(h) if h[..4] == STRUCTURED => h[6] & 0x80 != 0,
        _ => false,
    }
}
