//! The cleaner's policy: which groups to give back and when. Deleting an
//! unused group is the lifecycle's own mechanism
//! ([`crate::engine::block_group::delete_unused_bgs`]); this module adds
//! automatic reclaim, which relocates a nearly empty group so that the
//! cleaner can delete it.

use crate::engine::fs_info::FsInfo;
use crate::util::error::Result;
use crate::util::sync::lock;

/// Automatic reclaim (btrfs's bg_reclaim_threshold): relocate the emptiest
/// data or metadata group whose usage is below `threshold_percent`, if its
/// live bytes fit in the free space of the other groups of its type, so that
/// reclaim never grows the pool. Returns the group relocated.
pub fn reclaim_pass(fs: &FsInfo, threshold_percent: u64) -> Result<Option<u64>> {
    if threshold_percent == 0 {
        return Ok(None);
    }
    let (data_p, meta_p) = {
        let st = lock(&fs.trans);
        (st.data_profile, st.metadata_profile)
    };
    let groups = fs.block_group_list();
    let mut best: Option<(u128, u64)> = None;
    for bg in &groups {
        if bg.bg_type == crate::format::bg_type::SYSTEM {
            continue;
        }
        let target = if bg.is_data() { data_p } else { meta_p };
        let v = bg.view();
        if v.ro > 0 || v.removed || v.relocated || v.used_bytes == 0 {
            continue;
        }
        let used = v.used_bytes;
        if used as u128 * 100 >= threshold_percent as u128 * bg.length as u128 {
            continue;
        }
        let room: u64 = groups
            .iter()
            .filter(|o| o.start != bg.start && o.bg_type == bg.bg_type && o.profile == target)
            .map(|o| o.allocatable_bytes())
            .sum();
        if room < used + used / 8 {
            continue;
        }
        let ratio = used as u128 * 1_000_000 / bg.length as u128;
        if best.is_none_or(|(r, _)| ratio < r) {
            best = Some((ratio, bg.start));
        }
    }
    let Some((_, start)) = best else {
        return Ok(None);
    };
    tracing::info!("reclaim: relocating block group {start:#x} (below {threshold_percent}% used)");
    crate::jobs::relocation::relocate_block_group(fs, start, &|| fs.is_aborted())?;
    Ok(Some(start))
}

/// Blocks one drop step frees or lets go: small enough for the global
/// metadata reserve, so deleting works on a full pool.
const DROP_STEP_BLOCKS: u64 = 64;
/// Drop steps between commits: each commit makes the progress durable.
const DROP_STEPS_PER_COMMIT: u32 = 64;

/// Drop the trees of deleted volumes, each step a transaction of its own
/// (the tree that is left stays valid, so a crash resumes from the last
/// commit), until none is left or `stop` says so. Returns how many were
/// finished.
pub fn drop_dead_volumes(fs: &FsInfo, stop: &dyn Fn() -> bool) -> Result<u64> {
    let mut finished = 0;
    loop {
        let Some(id) = lock(&fs.trans).dead_volumes.first().copied() else {
            return Ok(finished);
        };
        let mut steps = 0;
        loop {
            if stop() {
                crate::engine::transaction::commit(fs)?;
                return Ok(finished);
            }
            let done = crate::engine::transaction::change_freeing(fs, |ctx| {
                ctx.drop_dead_step(id, DROP_STEP_BLOCKS)
            })?;
            crate::failpoint!("cleaner::drop_step", id);
            steps += 1;
            if done || steps % DROP_STEPS_PER_COMMIT == 0 {
                crate::engine::transaction::commit(fs)?;
            }
            if done {
                tracing::info!("cleaner: deleted volume id {id} dropped");
                finished += 1;
                break;
            }
        }
    }
}
