//! Reference counts of data extents. An EXTENT item's `refs` counts the
//! mapping items that point into it, one per leaf block that holds one: a
//! leaf shared by a volume and its snapshots counts once, and a copy of a
//! shared leaf adds a reference for each of its items (Rodeh's lazy
//! counting, as for tree blocks). An extent whose count falls to zero is
//! freed with its checksum item.

use crate::btree;
use crate::engine::transaction::Ctx;
use crate::format::{item, objectid, tree_id, ExtentItem, Key, SECTOR_BYTES};
use crate::util::error::{Error, Result};

/// Key of the checksum item of the data extent starting at `logical`.
pub fn csum_key(logical: u64) -> Key {
    Key::new(objectid::CSUM, item::CSUM, logical)
}

impl Ctx<'_> {
    /// The EXTENT item of the data extent that holds `logical`.
    pub fn data_extent_at(&self, logical: u64) -> Result<(Key, ExtentItem)> {
        let end = Key::new(logical, item::EXTENT, u64::MAX);
        // Extents never overlap: the one holding `logical` is the last
        // extent item at or before it. Another item type there (a block
        // group item at the group's start) falls back to a scan over the
        // longest extent.
        let root = self.st.root(tree_id::EXTENT);
        let from = match btree::last_at_or_before(self.fs, &root, &end)? {
            Some(k) if k.ty == item::EXTENT => k,
            _ => Key::new(
                logical.saturating_sub(self.fs.max_extent_bytes - SECTOR_BYTES),
                item::EXTENT,
                0,
            ),
        };
        let found: Vec<(Key, btree::Value)> = self
            .range(tree_id::EXTENT, from, end)?
            .into_iter()
            .filter(|(k, _)| k.ty == item::EXTENT && k.objectid + k.offset > logical)
            .collect();
        let [(k, v)] = &found[..] else {
            return Err(self.fs.abort(&format!(
                "logical {logical:#x}: expected one data extent holding it, found {}",
                found.len()
            )));
        };
        let ei = ExtentItem::decode(v).map_err(|e| Error::Corrupt(format!("extent {k}: {e}")))?;
        Ok((*k, ei))
    }

    /// Add `delta` references to the data extent holding `logical`; at
    /// zero it is freed (pinned until the transaction is durable).
    pub fn add_data_ref(&mut self, logical: u64, delta: i64) -> Result<()> {
        let (k, mut ei) = self.data_extent_at(logical)?;
        let refs = ei.refs as i64 + delta;
        if refs < 0 {
            return Err(self.fs.abort(&format!(
                "data extent {:#x}+{}: reference count would fall to {refs}",
                k.objectid, k.offset
            )));
        }
        if refs > 0 {
            ei.refs = refs as u64;
            return self.insert(tree_id::EXTENT, k, ei.encode());
        }
        self.delete(tree_id::EXTENT, &k)?;
        self.delete(tree_id::CSUM, &csum_key(k.objectid))?;
        self.free_extent(k.objectid, k.offset);
        Ok(())
    }

    /// Apply what copied or dropped leaves queued.
    pub(crate) fn apply_data_refs(&mut self) -> Result<()> {
        while !self.st.pending_data_refs.is_empty() {
            for (logical, delta) in std::mem::take(&mut self.st.pending_data_refs) {
                self.add_data_ref(logical, delta)?;
            }
        }
        Ok(())
    }
}
