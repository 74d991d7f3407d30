//! The cleaner: deletes block groups that became unused, after the
//! transaction that emptied them is durable. It follows the btrfs rules that
//! keep scrub safe without scrub taking the cleaner's locks: `ro++` first,
//! `removed` set before the chunk map goes, and the map (with its device
//! extents) dropped only once no scrubber has the group frozen.

use crate::engine::block_group::BlockGroup;
use crate::engine::fs_info::FsInfo;
use crate::engine::transaction::Ctx;
use crate::format::{item, objectid, tree_id, Key};
use crate::util::error::Result;
use crate::util::sync::{lock, read, write, Arc};

/// Outcome of one cleaner pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CleanerPass {
    pub deleted: usize,
    pub requeued: usize,
    pub skipped: usize,
}

/// Delete every deletable group on the unused list.
pub fn delete_unused_bgs(fs: &FsInfo) -> Result<CleanerPass> {
    let mut pass = CleanerPass::default();
    let queued: Vec<u64> = lock(&fs.unused_bgs).drain(..).collect();
    let mut requeue = Vec::new();
    let mut first_err = None;
    for start in queued {
        let Some(bg) = read(&fs.block_groups).get(&start).cloned() else {
            continue;
        };
        let same_type = fs
            .block_group_list()
            .iter()
            .filter(|b| b.bg_type == bg.bg_type)
            .count();
        {
            let mut s = bg.lock();
            s.on_unused_list = false;
            // A relocated group's own read-only mark does not hold it back,
            // nor does being the last of its type: relocation made another.
            let foreign_ro = s.foreign_ro() > 0;
            if s.removed || s.used > 0 || s.reserved > 0 || foreign_ro || s.scrubbing > 0 {
                // Whoever holds it re-queues it when it lets go (scrub, R3;
                // relocation and replace through their read-only hold), and
                // a writer that fills it again takes it off for good.
                pass.skipped += 1;
                continue;
            }
            if same_type <= 1 && !s.relocated {
                // Kept while it is the only one of its type; once another
                // exists it can go.
                s.on_unused_list = true;
                requeue.push(start);
                pass.skipped += 1;
                continue;
            }
            if s.pinned > 0 {
                // Emptied by a transaction that is not durable yet.
                s.on_unused_list = true;
                requeue.push(start);
                pass.requeued += 1;
                continue;
            }
            s.ro += 1;
        }
        crate::failpoint!("cleaner::after_ro", start);
        let r = crate::engine::transaction::change(fs, |ctx| {
            let still_empty = {
                let s = bg.lock();
                s.used == 0 && s.reserved == 0 && s.pinned == 0
            };
            if still_empty {
                remove_block_group(ctx, &bg).map(|_| true)
            } else {
                Ok(false)
            }
        });
        match r {
            Ok(true) => pass.deleted += 1,
            Ok(false) => {
                bg.lock().ro -= 1;
                pass.skipped += 1;
            }
            Err(e) => {
                // Keep it queued for a later pass (e.g. after space is freed).
                let mut s = bg.lock();
                s.ro -= 1;
                s.on_unused_list = true;
                drop(s);
                requeue.push(start);
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
    }
    lock(&fs.unused_bgs).extend(requeue);
    match first_err {
        Some(e) => Err(e),
        None => Ok(pass),
    }
}

/// Out of space: make what earlier transactions freed reusable (commit) and
/// delete empty block groups now rather than at the cleaner's next pass, so
/// their device space can hold new chunks. Returns whether anything came back.
pub fn free_space_now(fs: &FsInfo) -> Result<bool> {
    let pinned = fs.pinned_bytes() > 0;
    crate::engine::transaction::commit(fs)?;
    let deleted = delete_unused_bgs(fs)?.deleted;
    if deleted > 0 {
        crate::engine::transaction::commit(fs)?;
    }
    Ok(pinned || deleted > 0)
}

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
        let used = {
            let s = bg.lock();
            if s.ro > 0 || s.removed || s.relocated || s.used == 0 {
                continue;
            }
            s.used
        };
        if used as u128 * 100 >= threshold_percent as u128 * bg.length as u128 {
            continue;
        }
        let room: u64 = groups
            .iter()
            .filter(|o| o.start != bg.start && o.bg_type == bg.bg_type && o.profile == target)
            .map(|o| {
                let s = o.lock();
                if s.ro > 0 || s.removed {
                    0
                } else {
                    s.free.total_bytes()
                }
            })
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

/// Delete a block group's items in the running transaction and retire it in
/// memory. The group must be read-only and empty.
pub fn remove_block_group(ctx: &mut Ctx, bg: &Arc<BlockGroup>) -> Result<()> {
    let fs = ctx.fs;
    let map = fs.mapping.get(bg.start);
    if let Some(m) = &map {
        for s in &m.item.stripes {
            ctx.delete(
                tree_id::DEV,
                &Key::new(s.devid, item::DEV_EXTENT, s.physical),
            )?;
        }
    }
    ctx.delete(
        tree_id::CHUNK,
        &Key::new(objectid::FIRST_CHUNK, item::CHUNK, bg.start),
    )?;
    ctx.delete(
        tree_id::EXTENT,
        &Key::new(bg.start, item::BLOCK_GROUP, bg.length),
    )?;
    ctx.st.dirty_bgs.remove(&bg.start);
    ctx.st.pending_chunks.retain(|c| c.logical != bg.start);
    crate::failpoint!("cleaner::before_removed", bg.start);
    write(&fs.block_groups).remove(&bg.start);
    let drop_now = {
        let mut s = bg.lock();
        s.removed = true;
        if s.frozen > 0 {
            s.map_drop_deferred = true;
        }
        s.frozen == 0
    };
    crate::failpoint!("cleaner::before_map_drop", bg.start);
    if drop_now {
        drop_chunk_map(fs, bg.start);
    }
    tracing::info!(
        "deleted unused {} block group {:#x} ({} bytes)",
        crate::format::bg_type::name(bg.bg_type),
        bg.start,
        bg.length
    );
    Ok(())
}

/// Drop a removed group's chunk map and give its device extents back.
pub fn drop_chunk_map(fs: &FsInfo, start: u64) {
    if let Some(m) = fs.mapping.remove(start) {
        for s in &m.item.stripes {
            if let Some(d) = fs.device(s.devid) {
                write(&d.extents).remove(&s.physical);
            }
        }
    }
}

/// Take a freeze on a group (scrub): while frozen, its map is not dropped.
/// Returns false if the group is already removed.
pub fn freeze(bg: &BlockGroup) -> bool {
    let mut s = bg.lock();
    if s.removed {
        return false;
    }
    s.frozen += 1;
    true
}

/// Release a freeze, performing a map drop the remover deferred (R4).
pub fn unfreeze(fs: &FsInfo, bg: &BlockGroup) {
    let drop_now = {
        let mut s = bg.lock();
        s.frozen -= 1;
        let d = s.frozen == 0 && s.removed && s.map_drop_deferred;
        if d {
            s.map_drop_deferred = false;
        }
        d
    };
    if drop_now {
        drop_chunk_map(fs, bg.start);
    }
}
