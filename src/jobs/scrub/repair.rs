//! Rewriting a bad copy from a good mirror, with only what scrub holds.

use crate::chunk::volumes::{ChunkMap, Mapped};
use crate::engine::fs_info::FsInfo;
use crate::failpoint;
use crate::util::sync::Ordering;

use super::scan::DevScan;
use super::verify::Unit;

/// Find a good copy of [logical, +len) on another mirror and write it over
/// this device's copy. Uses only the map it holds (R5); never writes in
/// read-only mode (R9). Returns whether the bad copy was rewritten.
pub(super) fn repair(
    scan: &DevScan,
    u: &Unit,
    logical: u64,
    len: u64,
    good: &dyn Fn(&[u8]) -> bool,
) -> bool {
    let (fs, run, map, idx, devid) = (scan.fs, scan.run, u.map, u.idx, scan.devid);
    failpoint!("scrub::before_repair", map.start());
    let Ok(pieces) = map.map(logical, len) else {
        scan.update(|p| p.counters.uncorrectable_errors += 1);
        return false;
    };
    let stripe = map.item.stripes[idx];
    let mut buf = vec![0u8; len as usize];
    // The piece list has one entry for these sizes; find our copy in it.
    let p: &Mapped = &pieces[0];
    let ours = p.mirrors.iter().position(|&(d, ph)| {
        d == stripe.devid && ph >= stripe.physical && ph < stripe.physical + map.item.stripe_bytes
    });
    for m in 0..p.mirrors.len() {
        if Some(m) == ours {
            continue;
        }
        if fs.read_copy(p, m, &mut buf).is_err() || !good(&buf) {
            continue;
        }
        if run.opts.readonly {
            // A good copy exists; -r reports it and writes nothing.
            return false;
        }
        let Some(o) = ours else {
            break;
        };
        if bg_gone(fs, map) {
            return false;
        }
        match fs.write_copy(p, o, &buf) {
            Ok(()) => {
                scan.update(|x| x.counters.corrected_errors += 1);
                if let Some(d) = fs.device(devid) {
                    d.stats.corruption_errs.fetch_add(1, Ordering::Relaxed);
                    fs.dev_stats_dirty.store(true, Ordering::Release);
                }
                return true;
            }
            Err(e) => {
                tracing::warn!("scrub: repair write failed: {e}");
                break;
            }
        }
    }
    scan.update(|x| x.counters.uncorrectable_errors += 1);
    false
}

fn bg_gone(fs: &FsInfo, map: &ChunkMap) -> bool {
    fs.block_group_at(map.start())
        .is_none_or(|b| b.is_removed())
}
