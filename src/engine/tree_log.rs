//! The intent log: a cheap flush. A commit writes every changed tree node,
//! flushes, writes the superblocks and flushes again; a client that flushes
//! after each write (a database in a VM) pays that each time. Instead, the
//! client writes and punches of the running transaction are kept, with
//! their bytes, and a flush writes them as one log block with O_DSYNC
//! ([`crate::format::log`] has the layout). The next commit makes the log
//! stale; an open replays it (see `pool`), then commits.
//!
//! Rules:
//! - Records are appended under the transaction lock, in the same hold as
//!   the tree change they describe, so the log's order is the trees' order.
//! - Only the commit lock's holder writes the log, so no commit runs while
//!   a block is written, and a block always follows the generation that is
//!   durable ([`LogRing::generation`]).
//! - A change the log does not carry (a volume created, resized, made
//!   read-only or deleted) or records that outgrow the area make the next
//!   flush a commit.

use crate::engine::fs_info::FsInfo;
use crate::format::log::{
    block_bytes_for, LogBlock, LogRecord, LOG_BYTES, LOG_HEADER_BYTES, LOG_OFFSET,
};
use crate::util::error::{Error, Result};
use crate::util::sync::{lock, Ordering};

/// Most record bytes kept for one block: past it the next flush commits.
pub const PENDING_MAX_BYTES: usize = LOG_BYTES as usize - LOG_HEADER_BYTES;

/// Client changes of the running transaction not yet in the log (held in
/// the transaction state).
#[derive(Debug, Default)]
pub struct LogPending {
    records: Vec<LogRecord>,
    bytes: usize,
    /// The next flush must commit.
    needs_commit: bool,
}

impl LogPending {
    /// Whether a record of `bytes` would be kept: if not, the next flush
    /// commits, and the caller need not build it.
    pub fn wants(&mut self, bytes: usize) -> bool {
        if !self.needs_commit && self.bytes + bytes > PENDING_MAX_BYTES {
            self.force_commit();
        }
        !self.needs_commit
    }

    /// Keep a record (after [`wants`](Self::wants) said yes).
    pub fn record(&mut self, r: LogRecord) {
        assert!(!self.needs_commit, "log record kept after the log gave up");
        self.bytes += r.encoded_bytes();
        debug_assert!(
            self.bytes <= PENDING_MAX_BYTES,
            "log pending past its bound"
        );
        self.records.push(r);
    }

    /// Something the log cannot carry changed: the next flush commits.
    pub fn force_commit(&mut self) {
        self.needs_commit = true;
        self.records = Vec::new();
        self.bytes = 0;
    }

    /// The commit covers everything kept so far.
    pub(crate) fn reset(&mut self) {
        *self = LogPending::default();
    }
}

/// Where the next log block goes. Held inside the commit lock: only its
/// holder writes the log, and a commit resets it.
#[derive(Debug)]
pub struct LogRing {
    /// The durable generation the blocks follow.
    pub generation: u64,
    /// Place of the next block in the chain.
    pub seq: u64,
    /// Bytes of the area used.
    pub used_bytes: u64,
}

impl LogRing {
    pub fn new(committed_gen: u64) -> LogRing {
        LogRing {
            generation: committed_gen,
            seq: 0,
            used_bytes: 0,
        }
    }

    /// Generation `gen` is durable: its log starts empty.
    pub(crate) fn reset(&mut self, gen: u64) {
        assert!(gen >= self.generation, "log reset back to generation {gen}");
        *self = LogRing::new(gen);
    }
}

/// Make every acknowledged client write and punch durable: one log block
/// if the log can carry them, else a commit. Returns the durable
/// generation (a logged flush leaves it where it was).
pub fn sync(fs: &FsInfo) -> Result<u64> {
    if !fs.intent_log.load(Ordering::Relaxed) {
        return crate::engine::transaction::flush(fs);
    }
    let mut ring = lock(&fs.commit_lock);
    fs.check_abort()?;
    let committed = fs.committed_gen.load(Ordering::Acquire);
    assert_eq!(
        ring.generation, committed,
        "log ring behind the durable generation"
    );
    let records = {
        let mut st = lock(&fs.trans);
        if st.log.needs_commit {
            None
        } else {
            Some(std::mem::take(&mut st.log).records)
        }
    };
    let Some(records) = records else {
        return crate::engine::transaction::commit_locked(fs, ring);
    };
    if records.is_empty() {
        // Every record of this transaction is in the log already.
        return Ok(committed);
    }
    let bytes: usize = records.iter().map(|r| r.encoded_bytes()).sum();
    if ring.used_bytes + block_bytes_for(bytes) as u64 > LOG_BYTES {
        fs.log_stats.full.fetch_add(1, Ordering::Relaxed);
        return crate::engine::transaction::commit_locked(fs, ring);
    }
    let block = LogBlock {
        generation: ring.generation,
        seq: ring.seq,
        records,
    };
    let buf = block.encode(&fs.pool_uuid, fs.csum_type);
    crate::failpoint!("tree_log::before_write", ring.seq);
    match write_block(fs, LOG_OFFSET + ring.used_bytes, &buf) {
        Ok(()) => {
            ring.seq += 1;
            ring.used_bytes += buf.len() as u64;
            fs.log_stats.blocks.fetch_add(1, Ordering::Relaxed);
            fs.log_stats
                .bytes
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            Ok(committed)
        }
        // The records are in the running transaction: a commit carries them.
        Err(e) => {
            tracing::warn!("intent log write failed, committing instead: {e}");
            crate::engine::transaction::commit_locked(fs, ring)
        }
    }
}

/// Write a block to every present device at once, durable before it
/// returns. All must take it: a flush acknowledged from one device of a mirrored pool
/// would not survive that device's loss.
fn write_block(fs: &FsInfo, physical: u64, buf: &[u8]) -> Result<()> {
    let devs = fs.devices();
    let done = crate::util::fan_out::each(&devs, fs.fan_out(&devs), "log-writer", |d| {
        d.dev.write_durable(buf, physical)
    });
    for (d, r) in devs.iter().zip(done) {
        r.map_err(|e| {
            d.stats.write_errs.fetch_add(1, Ordering::Relaxed);
            fs.dev_stats_dirty.store(true, Ordering::Release);
            Error::DeviceIo {
                path: d.dev.path().into(),
                op: "intent log write",
                physical,
                len: buf.len() as u64,
                source: e,
            }
        })?;
    }
    Ok(())
}

/// Counters of the intent log, for metrics and tests.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Blocks written (flushes that did not commit).
    pub blocks: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
    /// Flushes that committed because the area was full.
    pub full: std::sync::atomic::AtomicU64,
    /// Records replayed at open.
    pub replayed: std::sync::atomic::AtomicU64,
}

/// The log that follows the durable generation: the longest valid chain on
/// any present device (each block went to all of them; one may hold a
/// block the others missed when a flush failed).
pub fn read(fs: &FsInfo) -> Vec<LogBlock> {
    let gen = fs.committed_gen.load(Ordering::Acquire);
    let mut best: Vec<LogBlock> = Vec::new();
    for d in fs.devices() {
        let chain = read_chain(fs, &*d.dev, gen);
        if chain.len() > best.len() {
            best = chain;
        }
    }
    best
}

/// The chain on one device; it ends at the first block that is not the
/// next one of generation `gen` (stale, torn, unreadable or absent).
fn read_chain(fs: &FsInfo, dev: &dyn crate::device::BlockDevice, gen: u64) -> Vec<LogBlock> {
    let mut out = Vec::new();
    let mut used = 0u64;
    while used + LOG_HEADER_BYTES as u64 <= LOG_BYTES {
        let at = LOG_OFFSET + used;
        let mut header = [0u8; LOG_HEADER_BYTES];
        if dev.read_at(&mut header, at).is_err() {
            break;
        }
        let seq = out.len() as u64;
        let Ok(len) = LogBlock::peek_len(&header, &fs.pool_uuid, gen, seq) else {
            break;
        };
        if used + len as u64 > LOG_BYTES {
            break;
        }
        let mut buf = vec![0u8; len];
        if dev.read_at(&mut buf, at).is_err() {
            break;
        }
        match LogBlock::decode(&buf, &fs.pool_uuid, fs.csum_type) {
            Ok(b) => out.push(b),
            Err(e) => {
                tracing::debug!("{}: log ends at block {seq}: {e}", dev.path().display());
                break;
            }
        }
        used += len as u64;
    }
    out
}
