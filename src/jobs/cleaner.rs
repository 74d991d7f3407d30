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
