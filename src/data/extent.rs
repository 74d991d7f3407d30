//! Data extents and their checksums.
//!
//! Invariant: every volume mapping item (VOLUME_EXTENT) covers exactly one
//! extent item of the same logical range, which has exactly one checksum item
//! keyed by its start. Overwrites and discards split all three together, so
//! space comes back sector by sector and never hides in partly referenced
//! extents.

use crate::btree::{self, Node, NodeLoader};
use crate::engine::transaction::Ctx;
use crate::format::{
    item, mapping_key, objectid, tree_id, BackRef, ExtentItem, Key, VolumeExtent, SECTOR_BYTES,
};
use crate::util::error::{Error, Result};
use crate::util::sync::Arc;

/// First key of a forward scan, in a volume's tree `root`, for the
/// mappings that overlap `start`: the mapping that starts at or before it
/// (mappings never overlap, so only that one can reach into `start`), else
/// `start` itself.
pub fn mapping_scan_from(l: &dyn NodeLoader, root: &Arc<Node>, start: u64) -> Result<Key> {
    let at = mapping_key(start);
    Ok(match btree::last_at_or_before(l, root, &at)? {
        Some(k) if k.objectid == objectid::MAPPING && k.ty == item::VOLUME_EXTENT => k,
        _ => at,
    })
}

fn csum_key(logical: u64) -> Key {
    Key::new(objectid::CSUM, item::CSUM, logical)
}

/// Map [lba, +len) of a volume to freshly written data at `logical`,
/// releasing whatever the range held before.
pub fn insert_data_extent(
    ctx: &mut Ctx,
    volume_id: u64,
    lba: u64,
    logical: u64,
    len: u64,
    csums: Vec<u8>,
) -> Result<()> {
    punch(ctx, volume_id, lba, len)?;
    let gen = ctx.st.gen;
    ctx.insert(
        volume_id,
        mapping_key(lba),
        VolumeExtent { logical, len, gen }.encode(),
    )?;
    ctx.insert(
        tree_id::EXTENT,
        Key::new(logical, item::EXTENT, len),
        ExtentItem {
            refs: 1,
            gen,
            backrefs: vec![BackRef {
                volume_id,
                lba_bytes: lba,
            }],
        }
        .encode(),
    )?;
    ctx.insert(tree_id::CSUM, csum_key(logical), csums)?;
    ctx.commit_reservation(logical, len);
    Ok(())
}

/// Mapping items of a volume overlapping [start, start+len).
pub fn mappings(
    ctx: &Ctx,
    volume_id: u64,
    start: u64,
    len: u64,
) -> Result<Vec<(Key, VolumeExtent)>> {
    let from = mapping_scan_from(ctx.fs, &ctx.st.tree_root(volume_id)?, start)?;
    let items = ctx.range(volume_id, from, mapping_key(start + len - 1))?;
    let mut out = Vec::new();
    for (k, v) in items {
        let ve = VolumeExtent::decode(&v).map_err(|e| Error::Corrupt(format!("{k}: {e}")))?;
        if k.offset + ve.len > start {
            out.push((k, ve));
        }
    }
    Ok(out)
}

/// Unmap [start, start+len) of a volume (sector aligned) and free its data.
pub fn punch(ctx: &mut Ctx, volume_id: u64, start: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let end = start + len;
    for (k, ve) in mappings(ctx, volume_id, start, len)? {
        let (s, e) = (k.offset, k.offset + ve.len);
        let (os, oe) = (s.max(start), e.min(end));
        ctx.delete(volume_id, &k)?;
        if s < os {
            let head = VolumeExtent { len: os - s, ..ve };
            ctx.insert(volume_id, k, head.encode())?;
        }
        if oe < e {
            let tail = VolumeExtent {
                logical: ve.logical + (oe - s),
                len: e - oe,
                gen: ve.gen,
            };
            ctx.insert(volume_id, mapping_key(oe), tail.encode())?;
        }
        free_data_range(ctx, ve.logical + (os - s), oe - os)?;
    }
    Ok(())
}

/// Remove [logical, +len) from the extent that holds it, keeping the rest.
fn free_data_range(ctx: &mut Ctx, logical: u64, len: u64) -> Result<()> {
    let end = Key::new(logical, item::EXTENT, u64::MAX);
    // Extents never overlap: the one holding `logical` is the last extent
    // item at or before it. Another item type there (a block group item at
    // the group's start) falls back to a scan over the longest extent.
    let from = match btree::last_at_or_before(ctx.fs, &ctx.st.root(tree_id::EXTENT), &end)? {
        Some(k) if k.ty == item::EXTENT => k,
        _ => Key::new(
            logical.saturating_sub(ctx.fs.max_extent_bytes - SECTOR_BYTES),
            item::EXTENT,
            0,
        ),
    };
    let found: Vec<(Key, btree::Value)> = ctx
        .range(tree_id::EXTENT, from, end)?
        .into_iter()
        .filter(|(k, _)| k.ty == item::EXTENT && k.objectid + k.offset > logical)
        .collect();
    let [(k, v)] = &found[..] else {
        return Err(ctx.fs.abort(&format!(
            "logical {logical:#x}+{len}: expected one extent item, found {}",
            found.len()
        )));
    };
    let (es, el) = (k.objectid, k.offset);
    if logical + len > es + el {
        return Err(ctx.fs.abort(&format!(
            "logical {logical:#x}+{len} runs past extent {es:#x}+{el}"
        )));
    }
    let ei = ExtentItem::decode(v).map_err(|e| Error::Corrupt(format!("extent {k}: {e}")))?;
    let sums = ctx.get(tree_id::CSUM, &csum_key(es))?;
    ctx.delete(tree_id::EXTENT, k)?;
    if sums.is_some() {
        ctx.delete(tree_id::CSUM, &csum_key(es))?;
    }
    let cs = ctx.fs.csum_type.size_bytes();
    for (ps, pl) in [(es, logical - es), (logical + len, es + el - logical - len)] {
        if pl == 0 {
            continue;
        }
        let delta = ps - es;
        let piece = ExtentItem {
            refs: ei.refs,
            gen: ei.gen,
            backrefs: ei
                .backrefs
                .iter()
                .map(|b| BackRef {
                    volume_id: b.volume_id,
                    lba_bytes: b.lba_bytes + delta,
                })
                .collect(),
        };
        ctx.insert(
            tree_id::EXTENT,
            Key::new(ps, item::EXTENT, pl),
            piece.encode(),
        )?;
        if let Some(s) = &sums {
            let a = (delta / SECTOR_BYTES) as usize * cs;
            let b = a + (pl / SECTOR_BYTES) as usize * cs;
            if b <= s.len() {
                ctx.insert(tree_id::CSUM, csum_key(ps), s[a..b].to_vec())?;
            }
        }
    }
    ctx.free_extent(logical, len);
    Ok(())
}
