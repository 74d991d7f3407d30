//! Format conversion at open. Format 1 kept every volume's mappings in the
//! volume tree, keyed `(volume id, VOLUME_EXTENT, lba)`; format 2 gives each
//! volume a tree of its own (`INCOMPAT_VOLUME_TREES`), so that a snapshot
//! can share it. The conversion moves the items in batches, each a
//! transaction of its own: a crash midway leaves a pool that is still
//! format 1 with some items moved, and the next open goes on from there.

use crate::btree::{Iter, NodeLoader};
use crate::engine::fs_info::FsInfo;
use crate::engine::transaction::{change, commit, Ctx};
use crate::format::{item, mapping_key, objectid, tree_id, Key, INCOMPAT_VOLUME_TREES};
use crate::util::error::{Error, Result};
use crate::util::sync::lock;

/// Mapping items moved per transaction: bounded so that one batch's tree
/// changes fit the metadata reserve.
const BATCH_ITEMS: usize = 512;

/// Convert a format-1 pool to format 2; nothing to do on a format-2 pool.
pub(super) fn volume_trees(fs: &FsInfo) -> Result<()> {
    if lock(&fs.trans).incompat_flags & INCOMPAT_VOLUME_TREES != 0 {
        return Ok(());
    }
    tracing::info!(
        "pool {}: converting to per-volume trees (format 2); older chunkvol builds cannot open it afterwards",
        crate::format::uuid_string(&fs.pool_uuid)
    );
    change(fs, |ctx| {
        let ids: Vec<u64> = ctx.st.volumes.values().map(|v| v.id).collect();
        for id in ids {
            if !ctx.st.vol_roots.contains_key(&id) {
                ctx.create_volume_tree(id)?;
            }
        }
        Ok(())
    })?;
    let mut moved = 0u64;
    loop {
        let n = change(fs, move_batch)?;
        if n == 0 {
            break;
        }
        moved += n as u64;
        commit(fs)?;
    }
    {
        let mut st = lock(&fs.trans);
        st.incompat_flags |= INCOMPAT_VOLUME_TREES;
        st.dirty = true;
    }
    commit(fs)?;
    tracing::info!("converted: {moved} mapping items moved to their volumes' trees");
    Ok(())
}

/// Move up to [`BATCH_ITEMS`] format-1 mapping items; returns how many.
fn move_batch(ctx: &mut Ctx) -> Result<usize> {
    let root = ctx.st.root(tree_id::VOLUME);
    let mut batch = Vec::new();
    let it = Iter::new(
        ctx.fs as &dyn NodeLoader,
        &root,
        Key::new(objectid::FIRST_VOLUME, 0, 0),
        Key::MAX,
    );
    for r in it {
        let (k, v) = r?;
        if k.ty != item::VOLUME_EXTENT {
            continue;
        }
        if !ctx.st.vol_roots.contains_key(&k.objectid) {
            return Err(Error::Corrupt(format!(
                "volume tree item {k}: a mapping of volume id {} that does not exist",
                k.objectid
            )));
        }
        batch.push((k, v));
        if batch.len() == BATCH_ITEMS {
            break;
        }
    }
    for (k, v) in &batch {
        ctx.delete(tree_id::VOLUME, k)?;
        ctx.insert(k.objectid, mapping_key(k.offset), v.clone())?;
    }
    Ok(batch.len())
}
