//! Data extents and their checksums.
//!
//! Invariant: every volume mapping item (VOLUME_EXTENT) points into exactly
//! one extent item, which has exactly one checksum item keyed by its start
//! and counts the leaf items that point into it. An extent no snapshot
//! shares is covered exactly by its one mapping: overwrites and discards
//! split mapping, extent and checksums together, so space comes back sector
//! by sector. A shared extent stays whole until its last reference goes.

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

use crate::engine::data_refs::csum_key;

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
    let gen = ctx.st.gen;
    let new = VolumeExtent { logical, len, gen }.encode();
    let old = mappings(ctx, volume_id, lba, len)?;
    match old[..] {
        // An overwrite of exactly what one mapping covered (a random
        // overwrite of a block): the new item replaces the old in place,
        // which also copies a shared leaf first, so the count that
        // `release_whole` reads is this tree's view.
        [(k, ve)] if k.offset == lba && ve.len == len => {
            ctx.insert(volume_id, mapping_key(lba), new)?;
            release_whole(ctx, &ve)?;
        }
        _ => {
            punch_found(ctx, volume_id, (lba, len), old)?;
            ctx.insert(volume_id, mapping_key(lba), new)?;
        }
    }
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

/// Unmap [start, start+len) of a volume (sector aligned) and release its
/// data. An extent only this mapping references is cut exactly, so space
/// comes back sector by sector; a shared one (a snapshot's) stays whole and
/// the pieces of the mapping that remain point into it (bookends).
pub fn punch(ctx: &mut Ctx, volume_id: u64, start: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let found = mappings(ctx, volume_id, start, len)?;
    punch_found(ctx, volume_id, (start, len), found)
}

/// [`punch`], given the mappings that overlap the range.
fn punch_found(
    ctx: &mut Ctx,
    volume_id: u64,
    (start, len): (u64, u64),
    found: Vec<(Key, VolumeExtent)>,
) -> Result<()> {
    let end = start + len;
    for (k, ve) in found {
        let (s, e) = (k.offset, k.offset + ve.len);
        let (os, oe) = (s.max(start), e.min(end));
        // Deleting copies a shared leaf first: its items then hold
        // references of their own, so the count below is this tree's view.
        ctx.delete(volume_id, &k)?;
        let mut pieces = Vec::new();
        if s < os {
            pieces.push((k, VolumeExtent { len: os - s, ..ve }));
        }
        if oe < e {
            let tail = VolumeExtent {
                logical: ve.logical + (oe - s),
                len: e - oe,
                gen: ve.gen,
            };
            pieces.push((mapping_key(oe), tail));
        }
        for (pk, pv) in &pieces {
            ctx.insert(volume_id, *pk, pv.encode())?;
        }
        let (ek, ei) = ctx.data_extent_at(ve.logical)?;
        if ei.refs == 1 {
            let keep: Vec<(u64, u64)> = pieces.iter().map(|(_, p)| (p.logical, p.len)).collect();
            trim_extent(ctx, ek, &ei, &keep)?;
        } else {
            ctx.add_data_ref(ve.logical, pieces.len() as i64 - 1)?;
        }
    }
    Ok(())
}

/// Release the data of a mapping item that was just removed whole (no
/// piece of it stays mapped). The usual case, an extent only this item
/// referenced and that it covered exactly, is found by its exact key and
/// freed without the general search.
fn release_whole(ctx: &mut Ctx, ve: &VolumeExtent) -> Result<()> {
    let ek = Key::new(ve.logical, item::EXTENT, ve.len);
    if let Some(v) = ctx.get(tree_id::EXTENT, &ek)? {
        let ei = ExtentItem::decode(&v).map_err(|e| Error::Corrupt(format!("extent {ek}: {e}")))?;
        if ei.refs == 1 {
            let had_extent = ctx.delete_expected(tree_id::EXTENT, &ek)?;
            debug_assert!(
                had_extent,
                "extent {ek} vanished between a get and a delete"
            );
            // Every extent has its checksum item (the invariant above).
            ctx.delete_expected(tree_id::CSUM, &csum_key(ve.logical))?;
            ctx.free_extent(ve.logical, ve.len);
            return Ok(());
        }
    }
    let (ek, ei) = ctx.data_extent_at(ve.logical)?;
    if ei.refs == 1 {
        trim_extent(ctx, ek, &ei, &[])
    } else {
        ctx.add_data_ref(ve.logical, -1)
    }
}

/// Replace an extent only one mapping referenced by the ranges of it that
/// mapping's pieces `keep` (logical, length), each an extent with its own
/// checksums; free the rest.
fn trim_extent(ctx: &mut Ctx, k: Key, ei: &ExtentItem, keep: &[(u64, u64)]) -> Result<()> {
    let (es, el) = (k.objectid, k.offset);
    let sums = ctx.get(tree_id::CSUM, &csum_key(es))?;
    ctx.delete(tree_id::EXTENT, &k)?;
    if sums.is_some() {
        ctx.delete(tree_id::CSUM, &csum_key(es))?;
    }
    let cs = ctx.fs.csum_type.size_bytes();
    let mut pos = es;
    for &(ps, pl) in keep {
        if ps < pos || ps + pl > es + el {
            return Err(ctx.fs.abort(&format!(
                "extent {es:#x}+{el}: piece {ps:#x}+{pl} is outside it or out of order"
            )));
        }
        if ps > pos {
            ctx.free_extent(pos, ps - pos);
        }
        pos = ps + pl;
        let delta = ps - es;
        let piece = ExtentItem {
            refs: 1,
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
    if es + el > pos {
        ctx.free_extent(pos, es + el - pos);
    }
    Ok(())
}

/// Checksums of [logical, +len) of a data extent, from the checksum item
/// of the extent that holds `mapped` (where the mapping that covers the
/// range points: the extent's start unless a snapshot shares the extent,
/// so one exact lookup usually finds it). None when the item is missing or
/// too short.
pub fn sums_for(
    l: &dyn NodeLoader,
    csum_root: &Arc<Node>,
    cs: usize,
    mapped: u64,
    (logical, len): (u64, u64),
) -> Result<Option<Vec<u8>>> {
    let (k, sums) = match btree::get(l, csum_root, &csum_key(mapped))? {
        Some(s) => (csum_key(mapped), s),
        None => {
            // A mapping into the middle of a shared extent.
            let Some(k) = btree::last_at_or_before(l, csum_root, &csum_key(mapped))?
                .filter(|k| k.objectid == objectid::CSUM && k.ty == item::CSUM)
            else {
                return Ok(None);
            };
            match btree::get(l, csum_root, &k)? {
                Some(s) => (k, s),
                None => return Ok(None),
            }
        }
    };
    if logical < k.offset {
        return Ok(None);
    }
    let a = ((logical - k.offset) / SECTOR_BYTES) as usize * cs;
    let b = a + (len / SECTOR_BYTES) as usize * cs;
    Ok((b <= sums.len()).then(|| sums[a..b].to_vec()))
}

/// LBA ranges `(offset, length)` where two volume trees map differently
/// (one maps a range the other does not, or to other data). Blocks both
/// trees share are not read (`btree::diff`), so the cost grows with the
/// changes since they diverged.
pub fn diff_mappings(l: &dyn NodeLoader, a: &Arc<Node>, b: &Arc<Node>) -> Result<Vec<(u64, u64)>> {
    let (da, db) = btree::diff(l, a, b)?;
    let runs = |items: Vec<(Key, btree::Value)>| -> Result<Vec<(u64, VolumeExtent)>> {
        items
            .into_iter()
            .filter(|(k, _)| k.objectid == objectid::MAPPING && k.ty == item::VOLUME_EXTENT)
            .map(|(k, v)| {
                VolumeExtent::decode(&v)
                    .map(|ve| (k.offset, ve))
                    .map_err(|e| Error::Corrupt(format!("{k}: {e}")))
            })
            .collect()
    };
    let (ra, rb) = (runs(da)?, runs(db)?);
    let mut cuts: Vec<u64> = ra
        .iter()
        .chain(rb.iter())
        .flat_map(|(lba, ve)| [*lba, lba + ve.len])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    // Where each side maps byte `p` (None: a hole, or a shared mapping).
    let at = |runs: &[(u64, VolumeExtent)], p: u64| {
        let i = runs.partition_point(|(lba, _)| *lba <= p);
        i.checked_sub(1)
            .map(|i| &runs[i])
            .filter(|(lba, ve)| p < lba + ve.len)
            .map(|(lba, ve)| ve.logical + (p - lba))
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    for w in cuts.windows(2) {
        let (p, q) = (w[0], w[1]);
        if at(&ra, p) == at(&rb, p) {
            continue;
        }
        match out.last_mut() {
            Some((o, len)) if *o + *len == p => *len += q - p,
            _ => out.push((p, q - p)),
        }
    }
    Ok(out)
}

/// Bytes of data that only this volume's tree references (what deleting it
/// would give back: ZFS's `used`, btrfs's exclusive), from committed roots
/// `vol_root` and `extent_root`. A subtree shared with a snapshot or clone
/// is not entered; in the rest, an extent counts when no other mapping
/// item points into it.
pub fn exclusive_bytes(
    l: &dyn NodeLoader,
    vol_root: &Arc<Node>,
    extent_root: &Arc<Node>,
) -> Result<u64> {
    let refs = |addr: u64, level: u8| -> Result<u64> {
        let k = Key::new(addr, item::METADATA, level as u64);
        let v = btree::get(l, extent_root, &k)?
            .ok_or_else(|| Error::Corrupt(format!("tree block {addr:#x} has no extent item")))?;
        Ok(crate::format::MetadataItem::decode(&v)
            .map_err(|e| Error::Corrupt(format!("{k}: {e}")))?
            .refs)
    };
    let mut total = 0;
    let mut counted = std::collections::BTreeSet::new();
    let mut stack = vec![vol_root.clone()];
    while let Some(n) = stack.pop() {
        if refs(n.addr, n.level)? > 1 {
            continue;
        }
        for c in n.children() {
            stack.push(l.load(c, n.owner, n.level - 1)?);
        }
        for (k, v) in n.leaf_items() {
            let ve = VolumeExtent::decode(v).map_err(|e| Error::Corrupt(format!("{k}: {e}")))?;
            let end = Key::new(ve.logical, item::EXTENT, u64::MAX);
            let Some(ek) = btree::last_at_or_before(l, extent_root, &end)?
                .filter(|ek| ek.ty == item::EXTENT && ek.objectid + ek.offset > ve.logical)
            else {
                continue;
            };
            let Some(ev) = btree::get(l, extent_root, &ek)? else {
                continue;
            };
            let ei = ExtentItem::decode(&ev).map_err(|e| Error::Corrupt(format!("{ek}: {e}")))?;
            if ei.refs == 1 && counted.insert(ek.objectid) {
                total += ek.offset;
            }
        }
    }
    Ok(total)
}
