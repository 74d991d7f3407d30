//! Block groups and their lifecycle (btrfs: block-group.c). This module is
//! the only one that changes a group's counters and flags: every other
//! module goes through the methods and guards below, each of which asserts
//! what it relies on. The rules are the race catalogue's (docs/RACES.md):
//!
//! - a read-only hold ([`RoHold`]) keeps allocation out and is refused once
//!   the group is removed;
//! - a freeze ([`Freeze`], scrub) is refused once the group is removed and,
//!   while held, defers the chunk map drop of a removal (R1, R4);
//! - a scrub mark ([`ScrubMark`]) keeps the cleaner off the group; its
//!   release hands the group back (R3);
//! - removal ([`remove_block_group`]) sets `removed` before the map drop;
//! - one rule, [`BgState::may_hand_back`], decides when an empty group goes
//!   back on the cleaner's list, whoever lets go of it.
//!
//! Counters never wrap: an underflow stops a test build (debug assertions)
//! and aborts the pool in a release build, leaving the counter as it was.
//! For a live group `free + used + reserved + pinned == length`, checked
//! after every change in test builds.

use std::collections::VecDeque;

use crate::engine::free_space::RangeSet;
use crate::engine::fs_info::FsInfo;
use crate::engine::transaction::Ctx;
use crate::format::{bg_type, item, objectid, tree_id, Key, Profile};
use crate::util::error::Result;
use crate::util::sync::{lock, write, Arc, Mutex, OrderedGuard, OrderedMutex, Rank};

/// Mutable state of a block group, under its lock. Private: only this
/// module changes it.
#[derive(Debug, Default)]
struct BgState {
    /// Bytes referenced by extent items (committed or in the running transaction).
    used: u64,
    /// Bytes handed to writers whose extent items are not inserted yet.
    reserved: u64,
    /// Bytes freed but not reusable yet (waiting for commit and readers).
    pinned: u64,
    /// Allocation never happens while this is non-zero.
    ro: u32,
    /// Scrubs working on the group. The cleaner leaves it alone meanwhile
    /// (scrub hands it back, R3), but allocation goes on: scrub verifies and
    /// repairs only what its commit root holds, which stays pinned, so new
    /// extents in free space cannot collide with it. Taking btrfs's read-only
    /// mark instead would starve the allocator of metadata space.
    scrubbing: u32,
    /// Set by the remover before the chunk map is dropped.
    removed: bool,
    /// Taken by scrub while it works on the group; defers the map drop.
    frozen: u32,
    /// The remover wanted to drop the chunk map while frozen.
    map_drop_deferred: bool,
    /// Free space available to the allocator.
    free: RangeSet,
    /// Queued on the unused list.
    on_unused_list: bool,
    /// Relocation emptied the group and handed it to the cleaner, keeping
    /// its read-only mark so that nothing is allocated there meanwhile.
    relocated: bool,
    /// The group's item disagreed with its extents at open (`check` reports
    /// it): the accounting identity cannot hold, so it is not asserted, and
    /// the group is never handed to the cleaner or removed (its `used` may
    /// say empty while extents live in it).
    accounting_suspect: bool,
}

impl BgState {
    /// Read-only marks other than a finished relocation's own (which only
    /// keeps allocation out until the cleaner removes the group).
    fn foreign_ro(&self) -> u32 {
        debug_assert!(self.ro >= u32::from(self.relocated));
        self.ro - u32::from(self.relocated)
    }

    fn empty(&self) -> bool {
        self.used == 0 && self.reserved == 0
    }

    /// The one rule for handing a group back to the cleaner: it is empty,
    /// not queued, not removed, and nobody who would hand it back later
    /// holds it (a foreign read-only hold or a scrub mark; their release
    /// calls this again).
    fn may_hand_back(&self) -> bool {
        self.empty()
            && !self.on_unused_list
            && !self.removed
            && !self.accounting_suspect
            && self.foreign_ro() == 0
            && self.scrubbing == 0
    }

    /// Whether allocation may take bytes from the group.
    fn writable(&self) -> bool {
        self.ro == 0 && !self.removed
    }
}

/// A copy of a group's counters and flags, for display, policy and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BgView {
    pub used_bytes: u64,
    pub reserved_bytes: u64,
    pub pinned_bytes: u64,
    pub free_bytes: u64,
    pub ro: u32,
    pub scrubbing: u32,
    pub frozen: u32,
    pub removed: bool,
    pub relocated: bool,
    pub on_unused_list: bool,
}

/// One block group (the in-memory side of a chunk).
#[derive(Debug)]
pub struct BlockGroup {
    pub start: u64,
    pub length: u64,
    pub bg_type: u64,
    pub profile: Profile,
    /// Transaction that created the group (0: found at open). A reader of an
    /// older commit root must not take this group for the one it saw (R4).
    pub created_gen: u64,
    state: OrderedMutex<BgState>,
}

impl BlockGroup {
    /// A new, empty group: all of it is free.
    pub(crate) fn new_empty(
        start: u64,
        length: u64,
        bg_type: u64,
        profile: Profile,
        created_gen: u64,
    ) -> BlockGroup {
        let mut st = BgState::default();
        st.free.insert(start, length);
        BlockGroup::with_state(start, length, bg_type, profile, created_gen, st)
    }

    /// A group found at open: `used` from its item, free space = the group
    /// minus `allocated` (extent and tree-block ranges, sorted by start).
    pub(crate) fn open(
        start: u64,
        length: u64,
        bg_type: u64,
        profile: Profile,
        used: u64,
        allocated: &[(u64, u64)],
    ) -> BlockGroup {
        let mut st = BgState {
            used,
            ..BgState::default()
        };
        let end = start + length;
        let mut pos = start;
        for &(a, l) in allocated {
            if a > pos {
                st.free.insert(pos, a - pos);
            }
            pos = pos.max(a.saturating_add(l));
        }
        if end > pos {
            st.free.insert(pos, end - pos);
        }
        if st.free.total_bytes().checked_add(used) != Some(length) {
            tracing::warn!(
                "block group {start:#x}: item says {used} bytes used, free space says {}",
                length - st.free.total_bytes().min(length)
            );
            st.accounting_suspect = true;
        }
        BlockGroup::with_state(start, length, bg_type, profile, 0, st)
    }

    fn with_state(
        start: u64,
        length: u64,
        bg_type: u64,
        profile: Profile,
        created_gen: u64,
        st: BgState,
    ) -> BlockGroup {
        assert!(length > 0 && start.checked_add(length).is_some());
        BlockGroup {
            start,
            length,
            bg_type,
            profile,
            created_gen,
            state: OrderedMutex::new(Rank::BlockGroup, st),
        }
    }

    /// The group's lock. Lock order: after the transaction, before chunk maps.
    fn lock(&self) -> OrderedGuard<'_, BgState> {
        lock(&self.state)
    }

    pub fn end(&self) -> u64 {
        self.start + self.length
    }
    pub fn is_data(&self) -> bool {
        self.bg_type == bg_type::DATA
    }

    /// A consistent copy of the counters and flags.
    pub fn view(&self) -> BgView {
        let s = self.lock();
        BgView {
            used_bytes: s.used,
            reserved_bytes: s.reserved,
            pinned_bytes: s.pinned,
            free_bytes: s.free.total_bytes(),
            ro: s.ro,
            scrubbing: s.scrubbing,
            frozen: s.frozen,
            removed: s.removed,
            relocated: s.relocated,
            on_unused_list: s.on_unused_list,
        }
    }
    pub fn used_bytes(&self) -> u64 {
        self.lock().used
    }
    pub fn reserved_bytes(&self) -> u64 {
        self.lock().reserved
    }
    pub fn is_removed(&self) -> bool {
        self.lock().removed
    }
    pub fn is_relocated(&self) -> bool {
        self.lock().relocated
    }

    /// Free bytes allocation could take now (none while read-only or removed).
    pub(crate) fn allocatable_bytes(&self) -> u64 {
        let s = self.lock();
        if s.writable() {
            s.free.total_bytes()
        } else {
            0
        }
    }

    /// Empty, with nothing pinned and not removed: a remover may delete it.
    pub(crate) fn removable(&self) -> bool {
        let s = self.lock();
        !s.removed && !s.accounting_suspect && s.empty() && s.pinned == 0
    }

    /// The accounting identity of a live group (test builds).
    fn assert_accounting(&self, s: &BgState) {
        if cfg!(debug_assertions) && !s.removed && !s.accounting_suspect {
            let sum = s.free.total_bytes() + s.used + s.reserved + s.pinned;
            assert_eq!(
                sum,
                self.length,
                "block group {:#x}: free {} + used {} + reserved {} + pinned {} != length {}",
                self.start,
                s.free.total_bytes(),
                s.used,
                s.reserved,
                s.pinned,
                self.length
            );
        }
    }

    /// Take up to `max` (at least `min`) bytes of free space. Data bytes are
    /// reserved (the writer inserts its extent item later); metadata bytes
    /// count as used at once. `None` when read-only, removed or full.
    pub(crate) fn alloc(&self, min: u64, max: u64) -> Option<(u64, u64)> {
        let mut s = self.lock();
        if !s.writable() {
            return None;
        }
        let (addr, len) = s.free.alloc(min, max)?;
        debug_assert!(addr >= self.start && addr + len <= self.end());
        if self.is_data() {
            s.reserved += len;
        } else {
            s.used += len;
        }
        self.assert_accounting(&s);
        Some((addr, len))
    }

    /// Take `n` from a counter, or abort the pool if that would wrap.
    fn take(&self, fs: &FsInfo, counter: &mut u64, n: u64, what: &str) -> bool {
        match counter.checked_sub(n) {
            Some(v) => {
                *counter = v;
                true
            }
            None => {
                let msg = format!(
                    "block group {:#x}: {what} {} is less than the {n} bytes taken from it",
                    self.start, *counter
                );
                debug_assert!(false, "{msg}");
                fs.abort(&msg);
                false
            }
        }
    }

    /// A data reservation goes back to free space unused (a failed write).
    pub(crate) fn unreserve(self: &Arc<Self>, fs: &FsInfo, logical: u64, len: u64) {
        debug_assert!(logical >= self.start && logical + len <= self.end());
        let mut s = self.lock();
        if self.take(fs, &mut s.reserved, len, "reserved") {
            s.free.insert(logical, len);
        }
        self.assert_accounting(&s);
        self.hand_back_locked(fs, s);
    }

    /// A reservation became an extent item.
    pub(crate) fn reservation_to_used(&self, fs: &FsInfo, len: u64) {
        let mut s = self.lock();
        if self.take(fs, &mut s.reserved, len, "reserved") {
            s.used += len;
        }
        self.assert_accounting(&s);
    }

    /// Bytes no longer referenced: used becomes pinned until the freeing
    /// transaction is durable and no reader sees them. False (and nothing
    /// pinned) when the group never counted them: the pool has aborted.
    #[must_use]
    pub(crate) fn free_extent(self: &Arc<Self>, fs: &FsInfo, len: u64) -> bool {
        let mut s = self.lock();
        let taken = self.take(fs, &mut s.used, len, "used");
        if taken {
            s.pinned += len;
        }
        self.assert_accounting(&s);
        self.hand_back_locked(fs, s);
        taken
    }

    /// Pinned bytes become free again (never in a removed group).
    pub(crate) fn unpin(&self, fs: &FsInfo, logical: u64, len: u64) {
        debug_assert!(logical >= self.start && logical + len <= self.end());
        let mut s = self.lock();
        if self.take(fs, &mut s.pinned, len, "pinned") && !s.removed {
            s.free.insert(logical, len);
        }
        self.assert_accounting(&s);
    }

    /// Hand the group to the cleaner if the one rule allows it.
    pub fn hand_back(self: &Arc<Self>, fs: &FsInfo) -> bool {
        self.hand_back_locked(fs, self.lock())
    }

    fn hand_back_locked(self: &Arc<Self>, fs: &FsInfo, mut s: OrderedGuard<'_, BgState>) -> bool {
        if !s.may_hand_back() {
            return false;
        }
        s.on_unused_list = true;
        drop(s);
        fs.unused_bgs.push(self.clone());
        true
    }

    /// Take a read-only hold, unless the group is already removed.
    pub fn ro_hold<'a>(self: &Arc<Self>, fs: &'a FsInfo) -> Option<RoHold<'a>> {
        let mut s = self.lock();
        if s.removed {
            return None;
        }
        s.ro += 1;
        Some(RoHold {
            fs,
            bg: self.clone(),
            keep_as_relocated: false,
        })
    }

    /// Freeze the group for scrub, unless it is already removed: while any
    /// freeze is held, a removal leaves the chunk map in place (R1, R4).
    pub fn freeze<'a>(self: &Arc<Self>, fs: &'a FsInfo) -> Option<Freeze<'a>> {
        let mut s = self.lock();
        if s.removed {
            return None;
        }
        s.frozen += 1;
        Some(Freeze {
            fs,
            bg: self.clone(),
        })
    }

    /// Mark the group as being scrubbed: the cleaner skips it until the
    /// mark drops, which hands it back (R3). Never waits for anything (R6).
    pub fn scrub_mark<'a>(self: &Arc<Self>, fs: &'a FsInfo) -> ScrubMark<'a> {
        self.lock().scrubbing += 1;
        ScrubMark {
            fs,
            bg: self.clone(),
        }
    }

    /// The cleaner's look at a queued group: takes it off the list and says
    /// what to do with it. `last_of_type`: no other group of its type exists.
    fn cleaner_verdict<'a>(self: &Arc<Self>, fs: &'a FsInfo, last_of_type: bool) -> Verdict<'a> {
        let mut s = self.lock();
        debug_assert!(
            s.on_unused_list,
            "group {:#x} drained but not queued",
            self.start
        );
        s.on_unused_list = false;
        if s.removed || !s.empty() || s.foreign_ro() > 0 || s.scrubbing > 0 {
            // Whoever holds it hands it back when it lets go, and a writer
            // that fills it again takes it off for good.
            return Verdict::Skip;
        }
        if last_of_type && !s.relocated {
            // Kept while it is the only one of its type.
            s.on_unused_list = true;
            return Verdict::Keep;
        }
        if s.pinned > 0 {
            // Emptied by a transaction that is not durable yet.
            s.on_unused_list = true;
            return Verdict::Requeue;
        }
        s.ro += 1;
        Verdict::Delete(RoHold {
            fs,
            bg: self.clone(),
            keep_as_relocated: false,
        })
    }
}

/// What the cleaner does with a group it took off the list.
enum Verdict<'a> {
    Skip,
    Keep,
    Requeue,
    Delete(RoHold<'a>),
}

/// A read-only hold (`ro += 1`): no allocation in the group while held.
/// Relocation, device replace and the cleaner take one before they empty or
/// remove a group. Dropping it hands an empty group back to the cleaner.
pub struct RoHold<'a> {
    fs: &'a FsInfo,
    bg: Arc<BlockGroup>,
    /// Relocation's hand-off: the mark stays, as `relocated`.
    keep_as_relocated: bool,
}

impl RoHold<'_> {
    pub fn group(&self) -> &Arc<BlockGroup> {
        &self.bg
    }

    /// Relocation emptied the group but a reader still sees its extents:
    /// keep the read-only mark (nothing is allocated there) and let the
    /// cleaner remove it later.
    pub fn into_relocated(mut self) {
        self.keep_as_relocated = true;
    }
}

impl Drop for RoHold<'_> {
    fn drop(&mut self) {
        let mut s = self.bg.lock();
        assert!(
            s.ro > 0,
            "group {:#x}: read-only hold underflow",
            self.bg.start
        );
        if self.keep_as_relocated && !s.relocated {
            s.relocated = true;
        } else {
            // Also a second relocation of a group already handed off: its
            // first mark stays and this one goes.
            s.ro -= 1;
        }
        self.bg.hand_back_locked(self.fs, s);
    }
}

/// Scrub's freeze of a group; dropping it performs a deferred map drop.
pub struct Freeze<'a> {
    fs: &'a FsInfo,
    bg: Arc<BlockGroup>,
}

impl Drop for Freeze<'_> {
    fn drop(&mut self) {
        let drop_now = {
            let mut s = self.bg.lock();
            assert!(s.frozen > 0, "group {:#x}: freeze underflow", self.bg.start);
            s.frozen -= 1;
            let d = s.frozen == 0 && s.removed && s.map_drop_deferred;
            if d {
                s.map_drop_deferred = false;
            }
            d
        };
        if drop_now {
            drop_chunk_map(self.fs, &self.bg);
        }
    }
}

/// Scrub's mark on a group; dropping it hands an empty group back (R3).
pub struct ScrubMark<'a> {
    fs: &'a FsInfo,
    bg: Arc<BlockGroup>,
}

impl Drop for ScrubMark<'_> {
    fn drop(&mut self) {
        let mut s = self.bg.lock();
        assert!(
            s.scrubbing > 0,
            "group {:#x}: scrub mark underflow",
            self.bg.start
        );
        s.scrubbing -= 1;
        self.bg.hand_back_locked(self.fs, s);
    }
}

/// The cleaner's queue of groups that became empty. Bounded by the number
/// of groups: a group is on it at most once (`on_unused_list`). It holds
/// the groups themselves, not their addresses: a group removed while queued
/// (by relocation) and a new group at the same logical address are two
/// groups, and the cleaner must judge the one that was queued.
#[derive(Debug)]
pub struct UnusedList(OrderedMutex<VecDeque<Arc<BlockGroup>>>);

impl Default for UnusedList {
    fn default() -> Self {
        UnusedList(OrderedMutex::new(Rank::Leaf, VecDeque::new()))
    }
}

impl UnusedList {
    fn push(&self, bg: Arc<BlockGroup>) {
        lock(&self.0).push_back(bg);
    }
    fn drain(&self) -> Vec<Arc<BlockGroup>> {
        lock(&self.0).drain(..).collect()
    }
    /// Whether a group starting at `start` is queued.
    pub fn contains(&self, start: u64) -> bool {
        lock(&self.0).iter().any(|b| b.start == start)
    }
    pub fn is_empty(&self) -> bool {
        lock(&self.0).is_empty()
    }
    /// The queued groups, oldest first.
    pub fn list(&self) -> Vec<u64> {
        lock(&self.0).iter().map(|b| b.start).collect()
    }
}

/// Outcome of one cleaner pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CleanerPass {
    pub deleted: usize,
    pub requeued: usize,
    pub skipped: usize,
}

/// Delete every deletable group on the unused list (btrfs's
/// delete_unused_bgs): `ro++` first, then, in a transaction, re-check that
/// it is still empty and remove it.
pub fn delete_unused_bgs(fs: &FsInfo) -> Result<CleanerPass> {
    let mut pass = CleanerPass::default();
    let mut requeue = Vec::new();
    let mut first_err = None;
    for bg in fs.unused_bgs.drain() {
        let start = bg.start;
        let last_of_type = fs
            .block_group_list()
            .iter()
            .filter(|b| b.bg_type == bg.bg_type)
            .count()
            <= 1;
        let hold = match bg.cleaner_verdict(fs, last_of_type) {
            Verdict::Skip => {
                pass.skipped += 1;
                continue;
            }
            Verdict::Keep => {
                pass.skipped += 1;
                requeue.push(bg.clone());
                continue;
            }
            Verdict::Requeue => {
                pass.requeued += 1;
                requeue.push(bg.clone());
                continue;
            }
            Verdict::Delete(hold) => hold,
        };
        crate::failpoint!("cleaner::after_ro", start);
        let r = crate::engine::transaction::change(fs, |ctx| {
            if bg.removable() {
                remove_block_group(ctx, &hold).map(|_| true)
            } else {
                Ok(false)
            }
        });
        match r {
            Ok(true) => pass.deleted += 1,
            Ok(false) => pass.skipped += 1,
            Err(e) => {
                // Dropping the hold hands it back for a later pass.
                pass.skipped += 1;
                first_err.get_or_insert(e);
            }
        }
        drop(hold);
    }
    for bg in requeue {
        fs.unused_bgs.push(bg);
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(pass),
    }
}

/// Out of space: make what earlier transactions freed reusable (commit) and
/// delete empty block groups now rather than at the cleaner's next pass, so
/// their device space can hold new chunks. Returns whether anything came back.
pub(crate) fn free_space_now(fs: &FsInfo) -> Result<bool> {
    let pinned = fs.pinned_bytes() > 0;
    crate::engine::transaction::commit(fs)?;
    let deleted = delete_unused_bgs(fs)?.deleted;
    if deleted > 0 {
        crate::engine::transaction::commit(fs)?;
    }
    Ok(pinned || deleted > 0)
}

/// Removed groups remembered for display (the dashboard's map).
pub const RECENTLY_REMOVED_MAX: usize = 64;

/// A block group that was removed, as the dashboard shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RemovedGroup {
    pub start: u64,
    pub length: u64,
    #[serde(rename = "type")]
    pub bg_type: &'static str,
    pub profile: &'static str,
    /// Unix seconds.
    pub removed_at: u64,
}

/// The last [`RECENTLY_REMOVED_MAX`] groups removed in this process,
/// oldest first. Display only: nothing decides anything from it.
#[derive(Default)]
pub struct RecentlyRemoved(Mutex<VecDeque<RemovedGroup>>);

impl RecentlyRemoved {
    fn push(&self, g: RemovedGroup) {
        let mut q = lock(&self.0);
        if q.len() == RECENTLY_REMOVED_MAX {
            q.pop_front();
        }
        q.push_back(g);
        debug_assert!(q.len() <= RECENTLY_REMOVED_MAX);
    }

    /// A copy, oldest first.
    pub fn list(&self) -> Vec<RemovedGroup> {
        lock(&self.0).iter().cloned().collect()
    }
}

/// Delete a block group's items in the running transaction and retire it in
/// memory. The caller's read-only hold proves nothing allocates there; the
/// caller checked [`BlockGroup::removable`] in the same transaction (the
/// R5 test removes a group under scrub on purpose, so emptiness is the
/// caller's rule, not asserted here). `removed` is set before the chunk map
/// goes, and the map drop waits for the last freeze (R1, R4).
pub fn remove_block_group(ctx: &mut Ctx, hold: &RoHold) -> Result<()> {
    let fs = ctx.fs;
    let bg = hold.group();
    if bg.is_removed() {
        let msg = format!("block group {:#x} removed twice", bg.start);
        debug_assert!(false, "{msg}");
        return Err(fs.abort(&msg));
    }
    if let Some(m) = fs.mapping.get(bg.start) {
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
    ctx.forget_group(bg.start);
    crate::failpoint!("cleaner::before_removed", bg.start);
    write(&fs.block_groups).remove(&bg.start);
    let drop_now = {
        let mut s = bg.lock();
        debug_assert!(s.ro > 0, "removal without a read-only hold");
        s.removed = true;
        s.map_drop_deferred = s.frozen > 0;
        s.frozen == 0
    };
    crate::failpoint!("cleaner::before_map_drop", bg.start);
    if drop_now {
        drop_chunk_map(fs, bg);
    }
    fs.extension::<RecentlyRemoved>().push(RemovedGroup {
        start: bg.start,
        length: bg.length,
        bg_type: bg_type::name(bg.bg_type),
        profile: bg.profile.name(),
        removed_at: crate::util::time::now_s(),
    });
    tracing::info!(
        "deleted unused {} block group {:#x} ({} bytes)",
        bg_type::name(bg.bg_type),
        bg.start,
        bg.length
    );
    Ok(())
}

/// Drop a removed group's chunk map and give its device extents back.
fn drop_chunk_map(fs: &FsInfo, bg: &BlockGroup) {
    {
        // R4: a frozen group's map and device ranges are scrub's until the
        // last freeze goes; a new chunk must not take them before.
        let s = bg.lock();
        assert!(
            s.removed && s.frozen == 0,
            "group {:#x}: chunk map dropped while removed={} and {} freezes hold it",
            bg.start,
            s.removed,
            s.frozen
        );
    }
    if let Some(m) = fs.mapping.remove(bg.start) {
        for s in &m.item.stripes {
            if let Some(d) = fs.device(s.devid) {
                write(&d.extents).remove(&s.physical);
            }
        }
    }
}
