//! Free space of one block group: a set of logical ranges, merged on
//! insert. Every change asserts what it relies on (no double free, no
//! removal of bytes that are not free), because a broken free set hands the
//! same bytes to two writers.

use std::collections::BTreeMap;

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
        debug_assert!(
            start.checked_add(len).is_some(),
            "range {start:#x}+{len} wraps"
        );
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
        self.total_bytes = self
            .total_bytes
            .checked_sub(len)
            .expect("free space total below a range it held");
        true
    }

    /// Take the first range of at least `min` bytes, up to `max` bytes.
    pub fn alloc(&mut self, min: u64, max: u64) -> Option<(u64, u64)> {
        let (&s, &l) = self.ranges.iter().find(|(_, &l)| l >= min)?;
        let take = l.min(max);
        let taken = self.remove(s, take);
        debug_assert!(taken, "a range just found is wholly present");
        Some((s, take))
    }

    /// Bytes in the set.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
    /// The ranges as (start, length), in address order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &l)| (s, l))
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

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "double free"))]
    fn rangeset_refuses_a_double_free() {
        let mut r = RangeSet::default();
        r.insert(0, 10);
        r.insert(5, 1);
    }
}
