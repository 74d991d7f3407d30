//! Relocation: empty one block group by moving every live extent elsewhere,
//! then remove it as the cleaner does. Balance, device removal and automatic
//! reclaim are built on it.
//!
//! The group is read-only throughout (`ro++`), so nothing new lands in it and
//! freed space in it is never reused: its old bytes stay readable until the
//! group is removed, which makes the copy-then-switch below safe against
//! concurrent client writes and discards.
//! - Data: each extent is read (verified against its checksums, repaired
//!   from a mirror if needed) and written to a fresh extent outside the
//!   group; then, under the transaction lock, whatever pieces of it are still
//!   live have their volume mappings, extent items and checksum items switched
//!   to the new address. Pieces a client freed meanwhile are simply not moved.
//! - Metadata and system: every tree node inside the group is copied-on-write
//!   to a new address in one transaction (parents follow by path copying).
//!
//! Removal waits until what the moves freed is no longer pinned (committed,
//! and no reader of an older view left). If that takes long (a scrub holds a
//! view), the group is handed to the cleaner still read-only (`relocated`).

use std::time::Duration;

use crate::btree::{self, Iter};
use crate::engine::block_group::{remove_block_group, BlockGroup};
use crate::engine::fs_info::FsInfo;
use crate::engine::transaction::{self, commit, Ctx};
use crate::format::{item, tree_id, ExtentItem, Key, VolumeExtent};
use crate::util::error::{Error, Result};
use crate::util::sync::{lock, Ordering};

/// Extents listed per pass over a data group.
const DATA_BATCH_EXTENTS: usize = 256;
/// How long removal waits for pinned bytes before handing off to the cleaner.
const REMOVE_WAIT: Duration = Duration::from_secs(2);

/// What relocating one group did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelocStats {
    /// Bytes of live extents copied out of the group.
    pub bytes_relocated: u64,
    pub extents: u64,
    pub tree_blocks: u64,
    /// The group is gone (false: handed to the cleaner, or it vanished).
    pub removed: bool,
    /// The group did not exist (any more) when relocation began.
    pub vanished: bool,
}

/// Why relocation stopped early: a caller's stop request.
pub fn stopped() -> Error {
    Error::Busy("relocation stopped on request".into())
}

/// Keeps scrub between units while held (btrfs pauses scrub around
/// relocation's critical section). Scrub still stops at once if the pool
/// fails, so an abort under the hold cannot deadlock (R7).
pub struct ScrubHold<'a>(&'a FsInfo);

impl<'a> ScrubHold<'a> {
    pub fn new(fs: &'a FsInfo) -> Self {
        fs.scrub_hold.fetch_add(1, Ordering::AcqRel);
        ScrubHold(fs)
    }
}

impl Drop for ScrubHold<'_> {
    fn drop(&mut self) {
        self.0.scrub_hold.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Relocate the group starting at `start`. `stop` is polled between extents;
/// when it returns true the group is left as it is (partly moved, fully
/// consistent) and [`stopped`] is returned.
pub fn relocate_block_group(
    fs: &FsInfo,
    start: u64,
    stop: &dyn Fn() -> bool,
) -> Result<RelocStats> {
    let _serial = lock(&fs.reloc_lock);
    fs.check_abort()?;
    let mut stats = RelocStats::default();
    let Some(bg) = fs.block_group_at(start) else {
        stats.vanished = true;
        return Ok(stats);
    };
    if !bg.is_data() {
        room_elsewhere(fs, &bg)?;
    }
    let Some(hold) = bg.ro_hold(fs) else {
        stats.vanished = true;
        return Ok(stats);
    };
    crate::failpoint!("relocation::after_ro", start);
    wait_for_writers(fs, &bg, stop)?;
    if bg.is_data() {
        move_data(fs, &bg, stop, &mut stats)?;
    } else {
        move_tree_blocks(fs, &bg, &mut stats)?;
    }
    commit(fs)?;
    let used = bg.used_bytes();
    if used != 0 {
        return Err(fs.abort(&format!(
            "relocation of block group {start:#x}: {used} bytes still used after moving every extent"
        )));
    }
    crate::failpoint!("relocation::before_remove", start);
    let deadline = crate::util::sched::now() + REMOVE_WAIT;
    loop {
        let removed = {
            let _scrub = ScrubHold::new(fs);
            transaction::change(fs, |ctx| {
                let empty = bg.removable();
                if empty {
                    remove_block_group(ctx, &hold)?;
                }
                Ok(empty)
            })?
        };
        if removed {
            drop(hold);
            stats.removed = true;
            commit(fs)?;
            break;
        }
        if crate::util::sched::now() >= deadline {
            // A long reader (scrub) still sees the old extents: let the
            // cleaner delete the group once it lets go.
            hold.into_relocated();
            tracing::info!("relocated block group {start:#x}; the cleaner removes it");
            break;
        }
        if fs.pinned_bytes() > 0 {
            commit(fs)?;
        }
        crate::util::sched::sleep(Duration::from_millis(5));
    }
    tracing::info!(
        "relocated block group {start:#x}: {} extents, {} tree blocks, {} bytes",
        stats.extents,
        stats.tree_blocks,
        stats.bytes_relocated
    );
    Ok(stats)
}

/// Tree blocks of a read-only metadata group go elsewhere, and every commit
/// needs some: make sure another group has room (or fail before anything
/// changes) instead of running out in the middle of a commit.
fn room_elsewhere(fs: &FsInfo, bg: &BlockGroup) -> Result<()> {
    let need = 2 * transaction::META_RESERVE_NODES * fs.node_bytes as u64 + bg.used_bytes();
    transaction::change(fs, |ctx| {
        if ctx.free_of_type_except(bg.bg_type, bg.start) < need {
            ctx.new_chunk(bg.bg_type).map_err(|e| match e {
                Error::NoSpace(m) => Error::NoSpace(format!(
                    "no room to move the tree blocks of block group {:#x} elsewhere: {m}",
                    bg.start
                )),
                e => e,
            })?;
        }
        Ok(())
    })
}

/// Writers that reserved space in the group before it went read-only finish
/// first: their data is about to become an extent we must move.
pub(crate) fn wait_for_writers(
    fs: &FsInfo,
    bg: &BlockGroup,
    stop: &dyn Fn() -> bool,
) -> Result<()> {
    while bg.reserved_bytes() > 0 {
        fs.check_abort()?;
        if stop() {
            return Err(stopped());
        }
        crate::util::sched::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// A data extent as listed from the live extent tree.
struct Listed {
    start: u64,
    len: u64,
    sums: Option<Vec<u8>>,
}

use crate::engine::data_refs::csum_key;

fn list_data(fs: &FsInfo, bg: &BlockGroup) -> Result<Vec<Listed>> {
    let st = lock(&fs.trans);
    let mut out = Vec::new();
    let it = Iter::new(
        fs,
        &st.root(tree_id::EXTENT),
        Key::new(bg.start, item::EXTENT, 0),
        Key::new(bg.end() - 1, item::EXTENT, u64::MAX),
    );
    for r in it {
        let (k, _) = r?;
        if k.ty != item::EXTENT {
            continue;
        }
        if k.offset == 0
            || k.objectid
                .checked_add(k.offset)
                .is_none_or(|e| e > bg.end())
        {
            return Err(Error::Corrupt(format!(
                "extent item {k} does not fit block group {:#x}+{}",
                bg.start, bg.length
            )));
        }
        let sums = btree::get(fs, &st.root(tree_id::CSUM), &csum_key(k.objectid))?;
        out.push(Listed {
            start: k.objectid,
            len: k.offset,
            sums,
        });
        if out.len() >= DATA_BATCH_EXTENTS {
            break;
        }
    }
    Ok(out)
}

fn move_data(
    fs: &FsInfo,
    bg: &BlockGroup,
    stop: &dyn Fn() -> bool,
    stats: &mut RelocStats,
) -> Result<()> {
    loop {
        let batch = list_data(fs, bg)?;
        if batch.is_empty() {
            return Ok(());
        }
        for x in batch {
            if stop() {
                return Err(stopped());
            }
            fs.check_abort()?;
            stats.bytes_relocated += move_extent(fs, bg, &x)?;
            stats.extents += 1;
        }
    }
}

/// Copy one extent out of the group and switch its live pieces over.
/// Returns the bytes switched.
fn move_extent(fs: &FsInfo, bg: &BlockGroup, x: &Listed) -> Result<u64> {
    let cs = fs.csum_type.size_bytes();
    let sums = x
        .sums
        .as_deref()
        .filter(|s| s.len() as u64 >= x.len / crate::format::SECTOR_BYTES * cs as u64);
    let mut buf = vec![0u8; x.len as usize];
    let bg_start = bg.start;
    fs.read_data(x.start, &mut buf, sums, &|lg, l| Error::Corrupt(format!(
        "relocation of block group {bg_start:#x}: logical {lg:#x}+{l} has no good copy on any mirror"
    )))?;
    let alloc = || {
        transaction::change(fs, |ctx| {
            ctx.alloc_extent(crate::format::bg_type::DATA, x.len, x.len)
        })
    };
    let (new, _) = match alloc() {
        Err(Error::NoSpace(_)) if crate::engine::block_group::free_space_now(fs)? => alloc()?,
        r => r?,
    };
    crate::failpoint!("relocation::extent_copied", x.start);
    let r = fs
        .write_logical(new, &buf)
        .and_then(|_| transaction::change(fs, |ctx| switch_extent(ctx, x, new)));
    match r {
        Ok(moved) => Ok(moved),
        Err(e) => {
            if !fs.is_aborted() {
                let mut st = lock(&fs.trans);
                Ctx::join(fs, &mut st).unreserve(new, x.len);
            }
            Err(e)
        }
    }
}

/// Point every live piece of the old extent at its copy at `new`; give back
/// the parts of the copy nothing references any more.
fn switch_extent(ctx: &mut Ctx, x: &Listed, new: u64) -> Result<u64> {
    let old_end = x.start + x.len;
    let pieces: Vec<(Key, crate::btree::Value)> = ctx
        .range(
            tree_id::EXTENT,
            Key::new(x.start, item::EXTENT, 0),
            Key::new(old_end - 1, item::EXTENT, u64::MAX),
        )?
        .into_iter()
        .filter(|(k, _)| k.ty == item::EXTENT)
        .collect();
    let mut used = Vec::new();
    for (k, v) in pieces {
        let (ps, pl) = (k.objectid, k.offset);
        if ps + pl > old_end {
            return Err(ctx.fs.abort(&format!(
                "relocation: extent {k} grew past the extent {:#x}+{} it was cut from",
                x.start, x.len
            )));
        }
        let nps = new + (ps - x.start);
        let ei = ExtentItem::decode(&v).map_err(|e| Error::Corrupt(format!("extent {k}: {e}")))?;
        // The copy starts with no references; each mapping moved over
        // takes one from the old extent, which is freed at zero.
        let copy = ExtentItem {
            refs: 0,
            ..ei.clone()
        };
        ctx.insert(
            tree_id::EXTENT,
            Key::new(nps, item::EXTENT, pl),
            copy.encode(),
        )?;
        if let Some(s) = ctx.get(tree_id::CSUM, &csum_key(ps))? {
            ctx.insert(tree_id::CSUM, csum_key(nps), s)?;
        }
        ctx.commit_reservation(nps, pl);
        for b in &ei.backrefs {
            repoint_mappings(ctx, (ps, pl), nps, b.lba_bytes)?;
        }
        if ctx.get(tree_id::EXTENT, &k)?.is_some() {
            return Err(ctx.fs.abort(&format!(
                "relocation: extent {k} is still referenced after every volume was searched"
            )));
        }
        used.push((nps, pl));
    }
    // Whatever of the copy is not referenced goes back to free space.
    let mut pos = new;
    let mut moved = 0;
    for (s, l) in used {
        if s > pos {
            ctx.unreserve(pos, s - pos);
        }
        pos = s + l;
        moved += l;
    }
    if new + x.len > pos {
        ctx.unreserve(pos, new + x.len - pos);
    }
    crate::failpoint!("relocation::switched", x.start);
    Ok(moved)
}

/// Point every mapping, in every volume's tree, that maps into the extent
/// `(ps, pl)` at the same place in its copy at `nps`. A mapping into an
/// extent always sits at the same distance from it (`logical - lba` never
/// changes: snapshots share keys, splits keep it), so each tree is looked
/// up only at the LBAs `lba` (the extent's start) to `lba + pl`.
fn repoint_mappings(ctx: &mut Ctx, (ps, pl): (u64, u64), nps: u64, lba: u64) -> Result<()> {
    let volumes: Vec<u64> = ctx.st.vol_roots.keys().copied().collect();
    for vid in volumes {
        let found = crate::data::extent::mappings(ctx, vid, lba, pl)?;
        for (mk, ve) in found {
            if ve.logical < ps || ve.logical + ve.len > ps + pl {
                continue;
            }
            let moved = VolumeExtent {
                logical: nps + (ve.logical - ps),
                ..ve
            };
            ctx.insert(vid, mk, moved.encode())?;
            ctx.add_data_ref(moved.logical, 1)?;
            ctx.add_data_ref(ve.logical, -1)?;
        }
    }
    Ok(())
}

fn move_tree_blocks(fs: &FsInfo, bg: &BlockGroup, stats: &mut RelocStats) -> Result<()> {
    // Nodes allocated in the group before it went read-only are written by
    // this commit; from here on nothing new lands in it.
    commit(fs)?;
    let (start, end) = (bg.start, bg.end());
    for _round in 0..3 {
        let moved = transaction::change(fs, |ctx| {
            let mut n = 0;
            let volumes: Vec<u64> = ctx.st.vol_roots.keys().copied().collect();
            for t in tree_id::ALL.into_iter().chain(volumes) {
                n += ctx.with_tree(t, |c, root| btree::relocate(c, root, start, end))?;
            }
            Ok(n)
        })?;
        stats.tree_blocks += moved;
        stats.bytes_relocated += moved * fs.node_bytes as u64;
        // Commit so the extent-tree items of the moves are applied.
        commit(fs)?;
        if bg.used_bytes() == 0 {
            return Ok(());
        }
    }
    Ok(())
}
