//! The chunk layer: devices, their device extents, and the in-memory chunk map
//! (logical -> stripes). Maps are reference counted (`Arc`): a reader that
//! holds one keeps it valid after the remover drops it from the tree (R2).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use crate::device::BlockDevice;
use crate::format::{
    bg_type, ChunkItem, DevStats, Profile, Stripe, RAID10_STRIPE_UNIT_BYTES, SECTOR_BYTES,
    SUPER_OFFSETS, SUPER_RESERVED_BYTES,
};
use crate::util::error::{Error, Result};
use crate::util::sync::{read, write, Arc, OrderedRwLock, Ordering, Rank};

/// A contiguous logical piece and the physical location of each copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    pub logical: u64,
    pub len: u64,
    /// (devid, physical) per copy.
    pub mirrors: Vec<(u64, u64)>,
}

/// A chunk's mapping, shared by reference count.
#[derive(Debug)]
pub struct ChunkMap {
    pub item: ChunkItem,
}

impl ChunkMap {
    pub fn start(&self) -> u64 {
        self.item.logical
    }
    pub fn end(&self) -> u64 {
        self.item.logical + self.item.length
    }

    /// Split [logical, logical+len) into pieces that are contiguous on every copy.
    pub fn map(&self, logical: u64, len: u64) -> Result<Vec<Mapped>> {
        let c = &self.item;
        if logical < c.logical || logical + len > self.end() {
            return Err(Error::NoChunk { logical });
        }
        let off = logical - c.logical;
        if c.profile != Profile::Raid10 {
            let mirrors = c
                .stripes
                .iter()
                .map(|s| (s.devid, s.physical + off))
                .collect();
            return Ok(vec![Mapped {
                logical,
                len,
                mirrors,
            }]);
        }
        let unit = c.stripe_unit_bytes;
        let cols = c.stripes.len() as u64 / 2;
        let mut out = Vec::new();
        let mut pos = off;
        while pos < off + len {
            let nr = pos / unit;
            let within = pos % unit;
            let piece = (unit - within).min(off + len - pos);
            let row = nr / cols;
            let col = (nr % cols) as usize;
            let phys_off = row * unit + within;
            let mirrors = c.stripes[col * 2..col * 2 + 2]
                .iter()
                .map(|s| (s.devid, s.physical + phys_off))
                .collect();
            out.push(Mapped {
                logical: c.logical + pos,
                len: piece,
                mirrors,
            });
            pos += piece;
        }
        Ok(out)
    }

    /// The parts of [logical, +len) stored on stripe `k`: (logical, len,
    /// physical) each. Every stripe holds everything except in raid10, where
    /// a stripe holds the units of its column.
    pub fn stripe_span(&self, k: usize, logical: u64, len: u64) -> Result<Vec<(u64, u64, u64)>> {
        let c = &self.item;
        let cols = if c.profile == Profile::Raid10 {
            c.stripes.len() / 2
        } else {
            1
        };
        let mut out = Vec::new();
        for p in self.map(logical, len)? {
            let col = if cols > 1 {
                (((p.logical - c.logical) / c.stripe_unit_bytes) % cols as u64) as usize
            } else {
                0
            };
            if cols > 1 && col != k / 2 {
                continue;
            }
            let i = if cols > 1 { k % 2 } else { k };
            out.push((p.logical, p.len, p.mirrors[i].1));
        }
        Ok(out)
    }

    /// Logical address of a physical offset within stripe `stripe_idx`, if any.
    pub fn physical_to_logical(&self, stripe_idx: usize, phys_off: u64) -> Option<u64> {
        let c = &self.item;
        if phys_off >= c.stripe_bytes {
            return None;
        }
        if c.profile != Profile::Raid10 {
            return Some(c.logical + phys_off);
        }
        let unit = c.stripe_unit_bytes;
        let cols = c.stripes.len() as u64 / 2;
        let col = stripe_idx as u64 / 2;
        let row = phys_off / unit;
        Some(c.logical + (row * cols + col) * unit + phys_off % unit)
    }
}

/// The mapping tree: every chunk by logical start.
#[derive(Debug)]
pub struct MappingTree {
    maps: OrderedRwLock<Maps>,
}

#[derive(Debug, Default)]
struct Maps {
    by_start: BTreeMap<u64, Arc<ChunkMap>>,
    /// Maps replaced or removed that someone may still hold (a scrub, an
    /// I/O in flight): a devid they name must not mean another device
    /// until they are gone (device replace hands the source's devid over).
    retired: Vec<std::sync::Weak<ChunkMap>>,
}

impl Maps {
    fn retire(&mut self, old: Option<Arc<ChunkMap>>) {
        self.retired.retain(|w| w.strong_count() > 0);
        if let Some(m) = old {
            self.retired.push(Arc::downgrade(&m));
        }
    }
}

impl Default for MappingTree {
    fn default() -> Self {
        MappingTree {
            maps: OrderedRwLock::new(Rank::ChunkMaps, Maps::default()),
        }
    }
}

impl MappingTree {
    /// The chunk containing `logical`.
    pub fn lookup(&self, logical: u64) -> Option<Arc<ChunkMap>> {
        let maps = read(&self.maps);
        let (_, m) = maps.by_start.range(..=logical).next_back()?;
        (logical < m.end()).then(|| m.clone())
    }
    /// The chunk starting exactly at `start`.
    pub fn get(&self, start: u64) -> Option<Arc<ChunkMap>> {
        read(&self.maps).by_start.get(&start).cloned()
    }
    /// Map a chunk, replacing (and retiring) its previous map.
    pub fn insert(&self, item: ChunkItem) -> Arc<ChunkMap> {
        let m = Arc::new(ChunkMap { item });
        let mut maps = write(&self.maps);
        let old = maps.by_start.insert(m.start(), m.clone());
        maps.retire(old);
        m
    }
    pub fn remove(&self, start: u64) -> Option<Arc<ChunkMap>> {
        let mut maps = write(&self.maps);
        let old = maps.by_start.remove(&start);
        maps.retire(old.clone());
        old
    }
    pub fn all(&self) -> Vec<Arc<ChunkMap>> {
        read(&self.maps).by_start.values().cloned().collect()
    }
    /// Retired maps still held somewhere that have a stripe on `devid`.
    pub fn retired_on(&self, devid: u64) -> usize {
        read(&self.maps)
            .retired
            .iter()
            .filter_map(|w| w.upgrade())
            .filter(|m| m.item.stripes.iter().any(|s| s.devid == devid))
            .count()
    }
    /// First logical address after every chunk (where a new chunk goes).
    pub fn next_logical(&self) -> u64 {
        read(&self.maps)
            .by_start
            .values()
            .next_back()
            .map(|m| m.end())
            .unwrap_or(1 << 20)
    }
}

/// Live error counters of a device.
#[derive(Debug, Default)]
pub struct DevCounters {
    pub read_errs: AtomicU64,
    pub write_errs: AtomicU64,
    pub flush_errs: AtomicU64,
    pub corruption_errs: AtomicU64,
    pub generation_errs: AtomicU64,
}

impl DevCounters {
    pub fn snapshot(&self) -> DevStats {
        DevStats {
            read_errs: self.read_errs.load(Ordering::Relaxed),
            write_errs: self.write_errs.load(Ordering::Relaxed),
            flush_errs: self.flush_errs.load(Ordering::Relaxed),
            corruption_errs: self.corruption_errs.load(Ordering::Relaxed),
            generation_errs: self.generation_errs.load(Ordering::Relaxed),
        }
    }
    pub fn set(&self, s: &DevStats) {
        self.read_errs.store(s.read_errs, Ordering::Relaxed);
        self.write_errs.store(s.write_errs, Ordering::Relaxed);
        self.flush_errs.store(s.flush_errs, Ordering::Relaxed);
        self.corruption_errs
            .store(s.corruption_errs, Ordering::Relaxed);
        self.generation_errs
            .store(s.generation_errs, Ordering::Relaxed);
    }
}

/// One device of the pool.
pub struct Device {
    pub devid: u64,
    pub uuid: [u8; 16],
    pub total_bytes: u64,
    pub dev: Arc<dyn BlockDevice>,
    pub stats: DevCounters,
    /// Allocated physical ranges (device extents): physical -> length.
    pub extents: OrderedRwLock<BTreeMap<u64, u64>>,
    /// New chunks may use this device (false while it is removed or replaced).
    pub allocatable: std::sync::atomic::AtomicBool,
    /// Its superblocks are the pool's (false while it joins or leaves).
    pub supers_valid: std::sync::atomic::AtomicBool,
    /// Generation of the transaction in which this device took its devid
    /// from another (a replace's rename); 0 otherwise. A commit root older
    /// than this describes the previous holder of the devid (R10).
    pub devid_since_gen: std::sync::atomic::AtomicU64,
}

impl Device {
    /// A pool member on an open block device.
    pub fn new(devid: u64, uuid: [u8; 16], dev: Arc<dyn BlockDevice>) -> Device {
        Device {
            devid,
            uuid,
            total_bytes: dev.size_bytes(),
            dev,
            stats: Default::default(),
            extents: OrderedRwLock::new(Rank::DevExtents, BTreeMap::new()),
            allocatable: std::sync::atomic::AtomicBool::new(true),
            supers_valid: std::sync::atomic::AtomicBool::new(true),
            devid_since_gen: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Device {
    pub fn allocated_bytes(&self) -> u64 {
        read(&self.extents).values().sum()
    }

    /// Ranges that never hold chunk stripes: the first MiB and each superblock copy.
    fn reserved(&self) -> Vec<(u64, u64)> {
        let mut v = vec![(0, SUPER_RESERVED_BYTES)];
        for &o in &SUPER_OFFSETS[1..] {
            if o < self.total_bytes {
                v.push((o, SUPER_RESERVED_BYTES));
            }
        }
        v
    }

    /// Free holes of the device, in physical order.
    pub fn holes(&self) -> Vec<(u64, u64)> {
        let ext = read(&self.extents);
        let mut used: Vec<(u64, u64)> = ext.iter().map(|(&s, &l)| (s, l)).collect();
        used.extend(self.reserved());
        used.sort();
        let mut holes = Vec::new();
        let mut pos = 0;
        for (s, l) in used {
            if s > pos {
                holes.push((pos, s - pos));
            }
            pos = pos.max(s + l);
        }
        let end = self.total_bytes / SECTOR_BYTES * SECTOR_BYTES;
        if end > pos {
            holes.push((pos, end - pos));
        }
        holes
    }

    /// Largest hole.
    pub fn max_hole(&self) -> u64 {
        self.holes().iter().map(|h| h.1).max().unwrap_or(0)
    }

    pub(crate) fn take(&self, len: u64) -> Option<u64> {
        let (s, _) = self.holes().into_iter().find(|h| h.1 >= len)?;
        write(&self.extents).insert(s, len);
        Some(s)
    }
}

/// Largest chunk of each type, as btrfs.
pub fn max_chunk_bytes(t: u64) -> u64 {
    match t {
        bg_type::DATA => 1 << 30,
        bg_type::METADATA => 256 << 20,
        _ => 32 << 20,
    }
}

/// Smallest useful per-device stripe.
pub const MIN_STRIPE_BYTES: u64 = 1 << 20;

/// Pick devices and physical ranges for a new chunk and mark them allocated.
/// The chunk size is about a tenth of the pool, capped per type (and at
/// `cap_bytes` when not 0), so small test pools get several chunks.
pub fn alloc_chunk(
    devices: &[Arc<Device>],
    logical: u64,
    t: u64,
    profile: Profile,
    cap_bytes: u64,
) -> Result<ChunkItem> {
    let pool_bytes: u64 = devices.iter().map(|d| d.total_bytes).sum();
    let mib = 1u64 << 20;
    let max = match cap_bytes {
        0 => max_chunk_bytes(t),
        c => c.clamp(MIN_STRIPE_BYTES, max_chunk_bytes(t)),
    };
    let target = (pool_bytes / 10 / mib * mib).clamp(MIN_STRIPE_BYTES, max);
    let mut cands: Vec<(u64, Arc<Device>)> =
        devices.iter().map(|d| (d.max_hole(), d.clone())).collect();
    cands.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.devid.cmp(&b.1.devid)));
    let nospc = || {
        Error::NoSpace(format!(
            "cannot allocate a {} {} chunk: devices have too little unallocated space",
            profile.name(),
            bg_type::name(t)
        ))
    };
    let (ndev, per_dev) = match profile {
        Profile::Single => (1, 1),
        Profile::Dup => (1, 2),
        Profile::Raid1 => (2, 1),
        Profile::Raid1c3 => (3, 1),
        Profile::Raid10 => {
            let n = cands.iter().filter(|c| c.0 >= MIN_STRIPE_BYTES).count() / 2 * 2;
            (n.max(4), 1)
        }
    };
    if devices.len() < profile.min_devices() {
        return Err(Error::Invalid(format!(
            "profile {} needs {} devices, pool has {}",
            profile.name(),
            profile.min_devices(),
            devices.len()
        )));
    }
    if cands.len() < ndev {
        return Err(nospc());
    }
    let chosen = &cands[..ndev];
    let data_cols = if profile == Profile::Raid10 {
        ndev as u64 / 2
    } else {
        1
    };
    // Each device holds at least eight stripes, so small devices do not
    // end up with a few huge chunks that strand their free space.
    let per_dev_cap = chosen
        .iter()
        .map(|c| c.1.total_bytes / 8 / mib * mib)
        .min()
        .unwrap_or(0)
        .max(MIN_STRIPE_BYTES);
    let mut stripe = (target / data_cols).min(per_dev_cap).max(MIN_STRIPE_BYTES);
    let smallest = chosen.iter().map(|c| c.0 / per_dev).min().unwrap_or(0);
    stripe = stripe.min(smallest);
    let align = if profile == Profile::Raid10 {
        RAID10_STRIPE_UNIT_BYTES
    } else {
        SECTOR_BYTES
    };
    stripe = stripe / align * align;
    if stripe < MIN_STRIPE_BYTES.min(target) || stripe == 0 {
        return Err(nospc());
    }
    let mut stripes = Vec::new();
    for (_, d) in chosen {
        for _ in 0..per_dev {
            match d.take(stripe) {
                Some(p) => stripes.push(Stripe {
                    devid: d.devid,
                    physical: p,
                }),
                None => {
                    // Undo what this call took.
                    for s in &stripes {
                        if let Some(dd) = devices.iter().find(|x| x.devid == s.devid) {
                            write(&dd.extents).remove(&s.physical);
                        }
                    }
                    return Err(nospc());
                }
            }
        }
    }
    let item = ChunkItem {
        logical,
        length: stripe * data_cols,
        bg_type: t,
        profile,
        stripe_bytes: stripe,
        stripe_unit_bytes: if profile == Profile::Raid10 {
            RAID10_STRIPE_UNIT_BYTES
        } else {
            0
        },
        stripes,
    };
    item.validate()
        .map_err(|e| Error::Corrupt(format!("allocated an invalid chunk: {e}")))?;
    Ok(item)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raid1_at(logical: u64, devids: [u64; 2]) -> ChunkItem {
        ChunkItem {
            logical,
            length: 8 << 20,
            bg_type: bg_type::DATA,
            profile: Profile::Raid1,
            stripe_bytes: 8 << 20,
            stripe_unit_bytes: 0,
            stripes: devids
                .iter()
                .map(|&devid| Stripe {
                    devid,
                    physical: 1 << 20,
                })
                .collect(),
        }
    }

    /// The devid rename's wait (R10) counts only maps still held that name
    /// the device, and the list of retired maps does not grow with maps no
    /// one holds.
    #[test]
    fn retired_maps_are_counted_by_device_while_held_and_pruned_after() {
        let t = MappingTree::default();
        let held = t.insert(raid1_at(1 << 30, [1, 2]));
        t.insert(raid1_at(1 << 30, [1, 3]));
        assert_eq!(t.retired_on(2), 1, "the held map names devid 2");
        assert_eq!(t.retired_on(3), 0, "the current map is not retired");
        let other = t.insert(raid1_at(2 << 30, [1, 3]));
        t.remove(2 << 30);
        assert_eq!(t.retired_on(2), 1);
        assert_eq!(t.retired_on(3), 1, "a removed map still held");
        drop((held, other));
        assert_eq!(
            (t.retired_on(1), t.retired_on(2), t.retired_on(3)),
            (0, 0, 0)
        );
        for _ in 0..100 {
            t.insert(raid1_at(1 << 30, [1, 3]));
        }
        assert!(
            read(&t.maps).retired.len() <= 1,
            "maps no one holds are pruned: {}",
            read(&t.maps).retired.len()
        );
    }

    #[test]
    fn raid10_map_roundtrip() {
        let item = ChunkItem {
            logical: 1 << 30,
            length: 4 << 20,
            bg_type: bg_type::DATA,
            profile: Profile::Raid10,
            stripe_bytes: 2 << 20,
            stripe_unit_bytes: 64 << 10,
            stripes: (0..4)
                .map(|i| Stripe {
                    devid: i + 1,
                    physical: 1 << 20,
                })
                .collect(),
        };
        let m = ChunkMap { item };
        let pieces = m.map((1 << 30) + 60 * 1024, 200 * 1024).unwrap();
        assert_eq!(pieces.iter().map(|p| p.len).sum::<u64>(), 200 * 1024);
        for p in &pieces {
            for (i, &(devid, phys)) in p.mirrors.iter().enumerate() {
                let idx = (devid - 1) as usize;
                assert_eq!(idx / 2 * 2 + i, idx);
                let back = m.physical_to_logical(idx, phys - (1 << 20)).unwrap();
                assert_eq!(back, p.logical);
            }
        }
    }
}
