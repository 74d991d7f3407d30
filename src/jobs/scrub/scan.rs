//! The walk: every device extent of a device, its block group (held by the
//! lifecycle rules), and the units in it, under a commit-root view that is
//! refreshed so a long scrub does not pin freed space.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::btree::Iter;
use crate::chunk::volumes::ChunkMap;
use crate::engine::block_group::BlockGroup;
use crate::engine::fs_info::{tree_index, CommitRoots, FsInfo, NoRepair};
use crate::failpoint;
use crate::format::{
    item, tree_id, DevExtent, ExtentItem, Key, MetadataItem, SUPER_BYTES, SUPER_OFFSETS,
};
use crate::util::error::Result;
use crate::util::sync::{thread, Arc, Ordering};

use super::persist::checkpoint;
use super::readahead::ReadAhead;
use super::verify::{allocs_in, scrub_unit, CsumLookup, Unit};
use super::{update, DevProgress, ErrorKind, ErrorRecord, ScrubRun, Stop, SCRUB_UNIT_BYTES};

/// Progress is written to the pool every this many bytes of a device.
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// Pause before the next unit when client I/O happened since the last one.
const YIELD_TO_CLIENTS: Duration = Duration::from_millis(2);

/// Check each superblock copy; they have no mirror to repair from here.
fn scrub_supers(fs: &FsInfo, run: &ScrubRun, devid: u64) {
    // A replace target renamed to its source's devid after this scrub
    // started stays reachable under its old devid (an alias): its
    // superblocks carry the new devid and are checked under that one.
    let Some(d) = fs.device(devid).filter(|d| d.devid == devid) else {
        return;
    };
    for &o in &SUPER_OFFSETS {
        if o + SUPER_BYTES as u64 > d.total_bytes {
            break;
        }
        let mut b = vec![0u8; SUPER_BYTES];
        let ok = d.dev.read_at(&mut b, o).is_ok()
            && crate::format::Superblock::decode(&b)
                .is_ok_and(|s| s.pool_uuid == fs.pool_uuid && s.devid == devid);
        // A device joining (superblocks not written yet) or leaving (wiped)
        // is not corrupt.
        if !d.supers_valid.load(Ordering::Acquire) {
            return;
        }
        if !ok {
            update(run, devid, |p| ErrorKind::Super.count(&mut p.counters));
            // Every commit writes every copy on every device: making the
            // next one happen rewrites this copy (never with -r, R9).
            let repaired = !run.opts.readonly
                && crate::engine::transaction::change(fs, |ctx| {
                    ctx.st.dirty = true;
                    Ok(())
                })
                .is_ok();
            if repaired {
                update(run, devid, |p| p.counters.corrected_errors += 1);
            }
            run.record(ErrorRecord {
                devid,
                physical: o,
                logical: 0,
                volume: None,
                offset_bytes: None,
                length_bytes: SUPER_BYTES as u64,
                kind: ErrorKind::Super,
                repaired,
                referrers: Vec::new(),
            });
        }
    }
}

/// Between units: cancel, pause, pool failure (R7).
fn checkpoint_wait(fs: &FsInfo, run: &ScrubRun) -> Result<(), Stop> {
    loop {
        if run.cancel.load(Ordering::Acquire) {
            return Err(Stop::Canceled);
        }
        if fs.is_aborted() {
            return Err(Stop::Failed("the pool failed; scrub stopped".into()));
        }
        if !run.pause.load(Ordering::Acquire) && fs.scrub_hold.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Scrub one device from its resume point: superblocks first (on a fresh
/// start), then each device extent in physical order.
pub(super) fn scrub_device(fs: &FsInfo, run: &ScrubRun, devid: u64) -> Result<(), Stop> {
    let resume_at = update(run, devid, |p| p.last_physical);
    if resume_at == 0 {
        failpoint!("scrub::before_supers", devid);
        scrub_supers(fs, run, devid);
    }
    let mut pos = resume_at;
    let mut pacer = Pacer::new(run.opts.limit_bytes_per_s, fs);
    loop {
        checkpoint_wait(fs, run)?;
        // A fresh snapshot per device extent: a long scrub must not hold
        // back the reuse of everything freed since it started.
        let snap = fs.commit_snapshot();
        let Some((phys, de)) = next_dev_extent(fs, &snap.0, devid, pos)? else {
            break;
        };
        failpoint!("scrub::dev_extent_found", de.chunk_logical);
        let mut scan = DevScan {
            fs,
            run,
            devid,
            phys,
            de,
            from: pos.max(phys) - phys,
            snap,
            pacer,
            csums: HashMap::new(),
            buf: Default::default(),
        };
        let r = scrub_dev_extent(&mut scan);
        pacer = scan.finish();
        r?;
        pos = phys + de.length;
        update(run, devid, |p| {
            p.last_physical = pos;
            p.saved = p.counters;
        });
        checkpoint(fs, run);
    }
    update(run, devid, |p| p.done = true);
    Ok(())
}

/// The first device extent of `devid` that ends past `pos`, with its
/// physical start.
fn next_dev_extent(
    fs: &FsInfo,
    roots: &CommitRoots,
    devid: u64,
    pos: u64,
) -> Result<Option<(u64, DevExtent)>, Stop> {
    let next = Iter::new(
        &NoRepair(fs),
        &roots.roots[tree_index(tree_id::DEV)],
        Key::new(devid, item::DEV_EXTENT, 0),
        Key::new(devid, item::DEV_EXTENT, u64::MAX),
    )
    .map(|r| {
        let (k, v) = r?;
        let d = DevExtent::decode(&v)
            .map_err(|e| crate::Error::Corrupt(format!("dev extent {k}: {e}")))?;
        Ok::<_, crate::Error>((k.offset, d))
    })
    .find(|r| r.as_ref().map_or(true, |(phys, d)| phys + d.length > pos));
    // An unreadable dev tree ends this device's scrub as a failure, not
    // as "nothing left to scrub".
    next.transpose()
        .map_err(|e| Stop::Failed(format!("devid {devid}: reading the dev tree: {e}")))
}

/// One device extent being scrubbed, and everything the steps under it
/// need: passed by `&mut` rather than as a long parameter list. Built per
/// device extent, so its commit-root view (and the reader registration that
/// pins freed space) never outlives the extent.
pub(super) struct DevScan<'f> {
    pub(super) fs: &'f FsInfo,
    pub(super) run: &'f ScrubRun,
    pub(super) devid: u64,
    /// Physical start of the device extent.
    phys: u64,
    de: DevExtent,
    /// Offset in the extent to start at (past a resume point).
    from: u64,
    /// The view scrub verifies against; refreshed while a group is scrubbed.
    pub(super) snap: Snapshot<'f>,
    /// Carried from extent to extent: the rate is per device.
    pacer: Pacer,
    /// Checksum items found in `snap`, by data extent start.
    pub(super) csums: HashMap<u64, CsumLookup>,
    /// The unit being verified, as read (aligned, so that reads into it can
    /// bypass the page cache).
    pub(super) buf: crate::util::aligned::AlignedBuf,
}

impl DevScan<'_> {
    /// Change this device's progress.
    pub(super) fn update<R>(&self, f: impl FnOnce(&mut DevProgress) -> R) -> R {
        update(self.run, self.devid, f)
    }
    fn skipped(&self) {
        self.update(|p| p.counters.block_groups_skipped_removed += 1);
    }
    /// End of the extent: the view is released, the pacer goes on.
    fn finish(self) -> Pacer {
        self.pacer
    }
}

/// Keeps scrub's reads to the rate asked for, or out of clients' way.
struct Pacer {
    limit: Option<u64>,
    start: Instant,
    bytes: u64,
    fg_seen: u64,
}

impl Pacer {
    fn new(limit: Option<u64>, fs: &FsInfo) -> Pacer {
        Pacer {
            limit,
            start: crate::util::sched::now(),
            bytes: 0,
            fg_seen: fs.client_ops.load(Ordering::Relaxed),
        }
    }
    fn pace(&mut self, fs: &FsInfo, bytes: u64) {
        self.bytes += bytes;
        match self.limit {
            Some(l) if l > 0 => {
                let due = Duration::from_secs_f64(self.bytes as f64 / l as f64);
                let el = crate::util::sched::since(self.start);
                if due > el {
                    thread::sleep(due - el);
                }
            }
            _ => {
                // Default: give way to clients whenever they were active.
                let now = fs.client_ops.load(Ordering::Relaxed);
                if now != self.fg_seen {
                    self.fg_seen = now;
                    thread::sleep(YIELD_TO_CLIENTS);
                }
            }
        }
    }
}

/// What occupies a logical range in the commit root.
#[derive(Debug, Clone)]
pub(super) enum Alloc {
    Data {
        start: u64,
        len: u64,
        ei: ExtentItem,
    },
    Tree {
        addr: u64,
        meta: MetadataItem,
        level: u8,
    },
}

impl Alloc {
    pub(super) fn range(&self, node_bytes: u64) -> (u64, u64) {
        match self {
            Alloc::Data { start, len, .. } => (*start, *len),
            Alloc::Tree { addr, .. } => (*addr, node_bytes),
        }
    }
}

/// Data extents and tree blocks of the group in `roots`, by address.
fn allocations(fs: &FsInfo, roots: &CommitRoots, bg: &BlockGroup) -> Result<Vec<Alloc>> {
    let mut out = Vec::new();
    for r in Iter::new(
        &NoRepair(fs),
        &roots.roots[tree_index(tree_id::EXTENT)],
        Key::new(bg.start, 0, 0),
        Key::new(bg.end() - 1, u8::MAX, u64::MAX),
    ) {
        let (k, v) = r?;
        match k.ty {
            item::EXTENT => {
                if let Ok(ei) = ExtentItem::decode(&v) {
                    out.push(Alloc::Data {
                        start: k.objectid,
                        len: k.offset,
                        ei,
                    });
                }
            }
            item::METADATA => {
                if let Ok(meta) = MetadataItem::decode(&v) {
                    out.push(Alloc::Tree {
                        addr: k.objectid,
                        meta,
                        level: k.offset as u8,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Hold the extent's block group by the lifecycle rules while its units
/// are scrubbed, then hand it back.
fn scrub_dev_extent(scan: &mut DevScan) -> Result<(), Stop> {
    let (fs, devid, phys, de) = (scan.fs, scan.devid, scan.phys, scan.de);
    let skip = |why: &str| {
        tracing::debug!("scrub: devid {devid} physical {phys:#x}: {why}; skipped");
        scan.skipped();
        Ok(())
    };
    let Some(bg) = fs.block_group(de.chunk_logical) else {
        return skip("block group is gone");
    };
    failpoint!("scrub::group_found", bg.start);
    if bg.start != de.chunk_logical || bg.created_gen > scan.snap.0.gen {
        // Deleted, and its range reused by a newer group (R4).
        return skip("range reused by a newer block group");
    }
    let Some(freeze) = bg.freeze(fs) else {
        failpoint!("scrub::freeze_refused", bg.start);
        return skip("block group was removed");
    };
    failpoint!("scrub::frozen", bg.start);
    // Mark the group as being scrubbed (the cleaner skips it). Taking the
    // mark never waits for a commit, so there is nothing to deadlock with (R6).
    let mark = bg.scrub_mark(fs);
    failpoint!("scrub::group_frozen", bg.start);
    let r = scrub_group(scan, &bg);
    failpoint!("scrub::before_release", bg.start);
    // The cleaner skipped it while scrub held it: the mark's release hands
    // it back (R3); the freeze's release drops a deferred map (R4).
    drop(mark);
    drop(freeze);
    r
}

/// The chunk map scrub holds for a frozen group, and what occupies the
/// group in the current view.
struct GroupView {
    map: Arc<ChunkMap>,
    allocs: Vec<Alloc>,
    /// When the view was taken.
    taken: Instant,
}

/// Scrub every copy of the extent this device holds, unit by unit.
fn scrub_group(scan: &mut DevScan, bg: &Arc<BlockGroup>) -> Result<(), Stop> {
    let Some(map) = group_map(scan, bg)? else {
        return Ok(());
    };
    // The view found this extent under the devid; if a replace handed the
    // devid to its new device since, the extent was the old device's and
    // the map now names the new one (R10, the view side): skip it. Checked
    // after the map is taken: a rename after that leaves the map naming
    // the new device's own devid, so no stripe below matches.
    let renamed_since = scan.fs.member(scan.devid).is_some_and(|d| {
        d.devid_since_gen.load(std::sync::atomic::Ordering::Acquire) > scan.snap.0.gen
    });
    if renamed_since {
        failpoint!("scrub::devid_renamed_since_view", bg.start);
        scan.skipped();
        return Ok(());
    }
    let fs = scan.fs;
    let allocs = allocations(fs, &scan.snap.0, bg).map_err(|e| Stop::Failed(e.to_string()))?;
    let mut view = GroupView {
        map,
        allocs,
        taken: crate::util::sched::now(),
    };
    let map = view.map.clone();
    let idxs: Vec<usize> = map
        .item
        .stripes
        .iter()
        .enumerate()
        .filter(|(_, s)| s.devid == scan.devid && s.physical == scan.phys)
        .map(|(i, _)| i)
        .collect();
    let Some(dev) = fs.device(scan.devid) else {
        return Ok(());
    };
    scan.csums.clear();
    std::thread::scope(|scope| {
        for idx in idxs {
            let copy = Copy {
                bg,
                idx,
                dev: &dev,
                scope,
            };
            if !scrub_copy(scan, &copy, &mut view)? {
                scan.skipped();
                return Ok(());
            }
        }
        Ok(())
    })
}

/// One copy of a frozen group on this device, and where its reads run.
struct Copy<'a, 's, 'e> {
    bg: &'a Arc<BlockGroup>,
    /// Its stripe in the map scrub holds.
    idx: usize,
    dev: &'a Arc<crate::chunk::volumes::Device>,
    scope: &'s std::thread::Scope<'s, 'e>,
}

/// Size of the units a group's copy is verified in.
fn unit_bytes(map: &ChunkMap) -> u64 {
    if map.item.stripe_unit_bytes > 0 {
        map.item.stripe_unit_bytes
    } else {
        SCRUB_UNIT_BYTES
    }
}

/// The units `(physical, len)` of copy `idx` from offset `from` on that
/// hold something in the view (the others are not read).
fn units_to_read(
    scan: &DevScan,
    map: &ChunkMap,
    idx: usize,
    from: u64,
    allocs: &[Alloc],
) -> Vec<(u64, u64)> {
    let (unit, nb) = (unit_bytes(map), scan.fs.node_bytes as u64);
    let mut out = Vec::new();
    let mut off = from;
    while off < scan.de.length {
        let len = unit.min(scan.de.length - off);
        let Some(logical) = map.physical_to_logical(idx, off) else {
            break;
        };
        if !allocs_in(allocs, nb, logical, logical + len).is_empty() {
            out.push((scan.phys + off, len));
        }
        off += len;
    }
    out
}

/// Verify one copy unit by unit, its reads running ahead (restarted with
/// each new view). False when the group went away or the view no longer
/// fits the map (the group is skipped).
fn scrub_copy(scan: &mut DevScan, c: &Copy, view: &mut GroupView) -> Result<bool, Stop> {
    let (fs, run, phys, de) = (scan.fs, scan.run, scan.phys, scan.de);
    let map = view.map.clone();
    let unit = unit_bytes(&map);
    let nb = fs.node_bytes as u64;
    let uncached = run.opts.uncached;
    let mut off = scan.from / unit * unit;
    let reads = |scan: &DevScan, off: u64, allocs: &[Alloc]| {
        let units = units_to_read(scan, &map, c.idx, off, allocs);
        ReadAhead::start(c.scope, c.dev.clone(), uncached, units)
    };
    let mut ahead = reads(scan, off, &view.allocs);
    while off < de.length {
        checkpoint_wait(fs, run)?;
        failpoint!("scrub::unit", c.bg.start);
        if c.bg.is_removed() {
            // The group went away mid-way: stop quietly.
            return Ok(false);
        }
        if crate::util::sched::since(view.taken) >= SNAPSHOT_REFRESH {
            match refresh_view(scan, c.bg, view)? {
                Refresh::Gone => return Ok(false),
                Refresh::Newest => {}
                // Reads made before the new view do not count for it.
                Refresh::Moved => ahead = reads(scan, off, &view.allocs),
            }
        }
        let len = unit.min(de.length - off);
        let Some(logical) = map.physical_to_logical(c.idx, off) else {
            break;
        };
        let u = Unit {
            map: &map,
            idx: c.idx,
            physical: phys + off,
            logical,
            len,
        };
        let n = if allocs_in(&view.allocs, nb, logical, logical + len).is_empty() {
            0
        } else {
            let read = ahead.next(u.physical);
            // The last unit's buffer goes back to the reader: a fresh one
            // per unit would be zeroed, 10 % of a scrub's CPU.
            ahead.give_back(std::mem::take(&mut scan.buf));
            scrub_unit(scan, &u, &view.allocs, read)
        };
        scan.pacer.pace(fs, n);
        off += len;
        if off.is_multiple_of(CHECKPOINT_BYTES) {
            scan.update(|p| {
                p.last_physical = phys + off;
                p.saved = p.counters;
            });
            checkpoint(fs, run);
        }
    }
    Ok(true)
}

/// The chunk map of a frozen group, held for the whole group (R2); None
/// (counted as skipped) when the group went away or no longer fits the
/// device extent.
fn group_map(scan: &DevScan, bg: &Arc<BlockGroup>) -> Result<Option<Arc<ChunkMap>>, Stop> {
    let fs = scan.fs;
    failpoint!("scrub::before_map_lookup", bg.start);
    let Some(map) = fs.mapping.get(bg.start) else {
        if bg.is_removed() {
            // Deleted under us: not an error (R1, the seed).
            scan.skipped();
            return Ok(None);
        }
        return Err(Stop::Failed(format!(
            "block group {:#x} has no chunk map",
            bg.start
        )));
    };
    // `get` is by start, so the map is the group's chunk; a dev extent
    // longer than its stripes would be a corrupt dev tree.
    debug_assert_eq!(map.start(), bg.start);
    if map.item.stripe_bytes < scan.de.length {
        scan.skipped();
        return Ok(None);
    }
    Ok(Some(map))
}

/// What [`refresh_view`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refresh {
    /// The map scrub holds no longer fits: the group is skipped.
    Gone,
    /// No commit since the view was taken: it is still the newest and
    /// holds nothing back, so the reads ahead of it stay valid.
    Newest,
    /// The view moved to a newer commit: reads made before it do not count.
    Moved,
}

/// Move to the newest commit, if there is a newer one than the view's.
fn refresh_view(
    scan: &mut DevScan,
    bg: &Arc<BlockGroup>,
    view: &mut GroupView,
) -> Result<Refresh, Stop> {
    let fs = scan.fs;
    // A newer view only fits the map scrub holds if the chunk
    // was not switched meanwhile (device replace): extents
    // written since went to the new stripes, not this one.
    let same = fs
        .mapping
        .get(bg.start)
        .is_some_and(|m| Arc::ptr_eq(&m, &view.map));
    if !same {
        return Ok(Refresh::Gone);
    }
    // Restarting the reads costs the reads in flight (and, cached, the
    // pages read ahead): an idle pool keeps its view.
    if fs.committed_gen.load(Ordering::Acquire) == scan.snap.0.gen {
        view.taken = crate::util::sched::now();
        return Ok(Refresh::Newest);
    }
    // A view held for long keeps everything freed since pinned
    // (writers would run out of space under a slow scrub): move
    // to the newest commit. The group is frozen, so its map and
    // range stay; extents freed meanwhile just drop out.
    scan.snap = fs.commit_snapshot();
    view.allocs = allocations(fs, &scan.snap.0, bg).map_err(|e| Stop::Failed(e.to_string()))?;
    scan.csums.clear();
    view.taken = crate::util::sched::now();
    Ok(Refresh::Moved)
}

/// A commit-root view and the reader registration that keeps it valid.
type Snapshot<'a> = (CommitRoots, crate::engine::fs_info::ReadGuard<'a>);

/// How long scrub works from one commit-root view before taking a newer one.
const SNAPSHOT_REFRESH: Duration = Duration::from_secs(1);
