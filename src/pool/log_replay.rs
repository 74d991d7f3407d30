//! Replay of the intent log at open: the client writes and punches that
//! flushes made durable after the last commit are done again, in their
//! order, on the committed trees, and committed. Replay is idempotent: a
//! crash before its commit replays the same log from the same trees.

use crate::data::volume::Volume;
use crate::engine::fs_info::FsInfo;
use crate::engine::tree_log;
use crate::format::log::LogRecord;
use crate::util::error::{Error, Result};
use crate::util::sync::{lock, Arc, Ordering};

/// Replay the log that follows the durable generation, if any; returns the
/// records replayed.
pub fn replay(fs: &Arc<FsInfo>) -> Result<u64> {
    let blocks = tree_log::read(fs);
    if blocks.is_empty() {
        return Ok(0);
    }
    let gen = fs.committed_gen.load(Ordering::Acquire);
    let mut n = 0u64;
    for b in &blocks {
        for r in &b.records {
            apply(fs, r).map_err(|e| {
                Error::Corrupt(format!(
                    "intent log after generation {gen}, block {}: {e}",
                    b.seq
                ))
            })?;
            n += 1;
        }
    }
    crate::engine::transaction::commit(fs)?;
    fs.log_stats.replayed.fetch_add(n, Ordering::Relaxed);
    tracing::info!(
        "replayed {n} intent log records ({} blocks) after generation {gen}",
        blocks.len()
    );
    Ok(n)
}

fn apply(fs: &Arc<FsInfo>, r: &LogRecord) -> Result<()> {
    let id = r.volume();
    // The log carries no volume changes (they commit), so each record's
    // volume is in the committed trees, writable and large enough.
    let name = {
        let st = lock(&fs.trans);
        let found = st.volumes.iter().find(|(_, v)| v.id == id);
        found.map(|(name, _)| name.clone()).ok_or_else(|| {
            let (off, len) = r.range_bytes();
            Error::Corrupt(format!(
                "record for bytes {off}..{} of volume id {id}, which the pool does not hold",
                off.saturating_add(len)
            ))
        })?
    };
    let vol = Volume::new(fs.clone(), id, &name);
    match r {
        LogRecord::Write {
            offset_bytes, data, ..
        } => vol.write_at(data, *offset_bytes),
        LogRecord::Punch {
            offset_bytes,
            len_bytes,
            ..
        } => vol.discard(*offset_bytes, *len_bytes),
    }
}
