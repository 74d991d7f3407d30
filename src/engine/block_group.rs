//! Block groups: one per chunk. Used bytes, free space, and the counters that
//! make scrub, the cleaner and relocation safe together (see
//! docs/ARCHITECTURE.md): `ro` is a counter, `removed` is set before the chunk
//! map is dropped, `frozen` defers that drop, and an emptied group joins the
//! unused list.

use std::collections::BTreeMap;

use crate::format::{bg_type, Profile};
use crate::util::sync::{lock, Mutex, MutexGuard};

/// Free ranges of a logical space, merged on insert.
#[derive(Debug, Default, Clone)]
pub struct RangeSet {
    ranges: BTreeMap<u64, u64>,
    total_bytes: u64,
}

impl RangeSet {
    /// Add [start, start+len); must not overlap anything present.
    pub fn insert(&mut self, mut start: u64, mut len: u64) {
        if len == 0 {
            return;
        }
        debug_assert!(!self.overlaps(start, len), "double free {start:#x}+{len}");
        self.total_bytes += len;
        if let Some((&ps, &pl)) = self.ranges.range(..start).next_back() {
            if ps + pl == start {
                self.ranges.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(&nl) = self.ranges.get(&(start + len)) {
            self.ranges.remove(&(start + len));
            len += nl;
        }
        self.ranges.insert(start, len);
    }

    /// Whether any byte of [start, start+len) is present.
    pub fn overlaps(&self, start: u64, len: u64) -> bool {
        if let Some((&ps, &pl)) = self.ranges.range(..start + len).next_back() {
            return ps + pl > start;
        }
        false
    }

    /// Remove [start, start+len), which must be wholly present.
    pub fn remove(&mut self, start: u64, len: u64) -> bool {
        let Some((&ps, &pl)) = self.ranges.range(..=start).next_back() else {
            return false;
        };
        if ps + pl < start + len {
            return false;
        }
        self.ranges.remove(&ps);
        if start > ps {
            self.ranges.insert(ps, start - ps);
        }
        if ps + pl > start + len {
            self.ranges.insert(start + len, ps + pl - start - len);
        }
        self.total_bytes -= len;
        true
    }

    /// Take the first range of at least `min` bytes, up to `max` bytes.
    pub fn alloc(&mut self, min: u64, max: u64) -> Option<(u64, u64)> {
        let (&s, &l) = self.ranges.iter().find(|(_, &l)| l >= min)?;
        let take = l.min(max);
        self.remove(s, take);
        Some((s, take))
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &l)| (s, l))
    }
}

/// Mutable state of a block group, under its lock.
#[derive(Debug, Default)]
pub struct BgState {
    /// Bytes referenced by extent items (committed or in the running transaction).
    pub used: u64,
    /// Bytes handed to writers whose extent items are not inserted yet.
    pub reserved: u64,
    /// Bytes freed but not reusable yet (waiting for commit and readers).
    pub pinned: u64,
    /// Allocation never happens while this is non-zero.
    pub ro: u32,
    /// Scrubs working on the group. The cleaner leaves it alone meanwhile
    /// (scrub hands it back, R3), but allocation goes on: scrub verifies and
    /// repairs only what its commit root holds, which stays pinned, so new
    /// extents in free space cannot collide with it. Taking btrfs's read-only
    /// mark instead would starve the allocator of metadata space.
    pub scrubbing: u32,
    /// Set by the remover before the chunk map is dropped.
    pub removed: bool,
    /// Taken by scrub while it works on the group; defers the map drop.
    pub frozen: u32,
    /// The remover wanted to drop the chunk map while frozen.
    pub map_drop_deferred: bool,
    /// Free space available to the allocator.
    pub free: RangeSet,
    /// Queued on the unused list.
    pub on_unused_list: bool,
    /// Relocation emptied the group and handed it to the cleaner, keeping
    /// its read-only mark so that nothing is allocated there meanwhile.
    pub relocated: bool,
}

impl BgState {
    /// Read-only marks other than a finished relocation's own (which only
    /// keeps allocation out until the cleaner removes the group).
    pub fn foreign_ro(&self) -> u32 {
        self.ro - u32::from(self.relocated)
    }

    /// If the group is empty and not yet queued for the cleaner, mark it
    /// queued and return true; the caller then pushes it on the unused list
    /// (after dropping this lock).
    pub fn take_unused_slot(&mut self) -> bool {
        let q = self.used == 0 && self.reserved == 0 && !self.on_unused_list && !self.removed;
        if q {
            self.on_unused_list = true;
        }
        q
    }
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
    state: Mutex<BgState>,
}

impl BlockGroup {
    pub fn new(
        start: u64,
        length: u64,
        bg_type: u64,
        profile: Profile,
        created_gen: u64,
    ) -> BlockGroup {
        BlockGroup {
            start,
            length,
            bg_type,
            profile,
            created_gen,
            state: Mutex::new(BgState::default()),
        }
    }
    /// The group's lock. Lock order: after the transaction, before chunk maps.
    pub fn lock(&self) -> MutexGuard<'_, BgState> {
        lock(&self.state)
    }
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
    pub fn is_data(&self) -> bool {
        self.bg_type == bg_type::DATA
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rangeset_merge_and_alloc() {
        let mut r = RangeSet::default();
        r.insert(0, 10);
        r.insert(20, 10);
        r.insert(10, 10);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(0, 30)]);
        assert_eq!(r.alloc(5, 8), Some((0, 8)));
        assert!(r.remove(10, 5));
        assert_eq!(r.total_bytes(), 17);
        assert!(!r.remove(10, 1));
        assert!(r.overlaps(9, 1));
        assert!(!r.overlaps(0, 8));
        assert_eq!(r.alloc(100, 100), None);
    }
}
