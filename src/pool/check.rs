//! Offline consistency check: every node, every tree's order, chunk / device
//! extent / block group agreement, extent references against their
//! referrers, used-byte accounting and, optionally, every data sector on
//! every copy. Read-only: it switches the pool's read repair off.

use std::collections::{BTreeMap, BTreeSet};

use crate::btree::{Body, Node};
use crate::chunk::volumes::Mapped;
use crate::device::read_supers;
use crate::engine::fs_info::FsInfo;
use crate::format::{
    bg_type, item, objectid, tree_id, BlockGroupItem, ChunkItem, DevExtent, ExtentItem, Key,
    MetadataItem, RootItem, RootPtr, VolumeExtent, VolumeItem, SECTOR_BYTES,
};
use crate::pool::Pool;
use crate::util::error::Result;
use crate::util::sync::{read, Arc};

/// What check found.
#[derive(Debug, Default, serde::Serialize)]
pub struct CheckReport {
    pub problems: Vec<String>,
    pub tree_blocks: u64,
    pub data_extents: u64,
    pub data_bytes: u64,
    pub sectors_verified: u64,
    pub csum_errors: u64,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

struct Walk<'a> {
    fs: &'a FsInfo,
    report: &'a mut CheckReport,
    /// addr -> (level, owner, gen, blocks and roots that point at it)
    blocks: BTreeMap<u64, (u8, u64, u64, u64)>,
    items: Vec<(u64, Key, crate::btree::Value)>,
}

impl Walk<'_> {
    fn node(&mut self, n: &Arc<Node>, tree: u64, lo: Key, hi: Option<Key>) {
        if let Some(b) = self.blocks.get_mut(&n.addr) {
            // Volume trees share blocks with their snapshots: count the
            // reference, walk the block once.
            b.3 += 1;
            if !tree_id::is_volume(tree) {
                self.report
                    .problems
                    .push(format!("tree block {:#x} is referenced twice", n.addr));
            }
            return;
        }
        self.report.tree_blocks += 1;
        self.blocks.insert(n.addr, (n.level, n.owner, n.gen, 1));
        let want = if tree == tree_id::CHUNK {
            bg_type::SYSTEM
        } else {
            bg_type::METADATA
        };
        match self.fs.block_group(n.addr) {
            Some(bg) if bg.bg_type == want => {}
            _ => self.report.problems.push(format!(
                "{} tree block {:#x} is not in a {} block group",
                tree_label(tree),
                n.addr,
                bg_type::name(want)
            )),
        }
        let in_range = |k: &Key| *k >= lo && hi.is_none_or(|h| *k < h);
        match &n.body {
            Body::Leaf(items) => {
                for (k, v) in items {
                    if !in_range(k) {
                        self.report.problems.push(format!(
                            "{} tree: key {k} in block {:#x} is outside its parent's range",
                            tree_label(tree),
                            n.addr
                        ));
                    }
                    self.items.push((tree, *k, v.clone()));
                }
            }
            Body::Internal(ch) => {
                for (i, c) in ch.iter().enumerate() {
                    if !in_range(&c.key) {
                        self.report.problems.push(format!(
                            "{} tree: child key {} in block {:#x} is outside its parent's range",
                            tree_label(tree),
                            c.key,
                            n.addr
                        ));
                    }
                    let next = ch.get(i + 1).map(|x| x.key).or(hi);
                    match self.fs.load_node(c.addr, c.gen, n.owner, n.level - 1) {
                        Ok(child) => {
                            if child.first_key() != Some(c.key) {
                                self.report.problems.push(format!(
                                    "{} tree: block {:#x} starts at {:?}, parent says {}",
                                    tree_label(tree),
                                    c.addr,
                                    child.first_key(),
                                    c.key
                                ));
                            }
                            self.node(&child, tree, c.key, next);
                        }
                        Err(e) => self.report.problems.push(format!(
                            "{} tree: cannot read block {:#x}: {e}",
                            tree_label(tree),
                            c.addr
                        )),
                    }
                }
            }
        }
    }
}

/// How problems name a tree: a volume's tree by the volume's id.
fn tree_label(tree: u64) -> String {
    if tree_id::is_volume(tree) {
        format!("volume id {tree} mapping")
    } else {
        tree_id::name(tree).to_string()
    }
}

/// Run every check on an open (offline) pool.
pub fn check(pool: &Pool, check_data_csum: bool) -> Result<CheckReport> {
    let fs = &**pool.fs();
    fs.no_repair
        .store(true, crate::util::sync::Ordering::Relaxed);
    let mut report = CheckReport::default();
    for d in fs.devices() {
        match read_supers(d.dev.as_ref()) {
            // Copies may lag by a generation after a crash between copy
            // writes; the next commit rewrites them. Only invalid ones count.
            Ok(_) => {}
            Err(e) => report.problems.push(e.to_string()),
        }
    }
    let roots = read(&fs.commit_roots).clone();
    let mut w = Walk {
        fs,
        report: &mut report,
        blocks: BTreeMap::new(),
        items: Vec::new(),
    };
    for (tree, r) in roots.all() {
        w.node(r, tree, Key::MIN, None);
    }
    let Walk { blocks, items, .. } = w;
    let items = Items::decode(&items, &mut report.problems);
    check_volume_roots(&roots.volumes, &items, &mut report.problems);
    check_tree_blocks(&blocks, &items, &mut report.problems);
    check_chunks(fs, &items, &mut report.problems);
    let mut used = check_data_extents(fs, &items, &mut report);
    check_volume_extents(&items, &mut report.problems);
    check_bg_used(fs, &blocks, &items, &mut used, &mut report.problems);
    if check_data_csum {
        let names: BTreeMap<u64, String> = items
            .vols
            .iter()
            .map(|(id, v)| (*id, v.name.clone()))
            .collect();
        verify_data(fs, &items.extents, &items.csums, &names, &mut report);
    }
    Ok(report)
}

/// Every decoded item, keyed the way the cross-checks look them up.
#[derive(Default)]
struct Items {
    /// logical -> chunk
    chunks: BTreeMap<u64, ChunkItem>,
    /// (devid, physical) -> device extent
    dev_extents: BTreeMap<(u64, u64), DevExtent>,
    /// start -> (length, item)
    bg_items: BTreeMap<u64, (u64, BlockGroupItem)>,
    /// start -> (length, item)
    extents: BTreeMap<u64, (u64, ExtentItem)>,
    /// tree block addr -> (level, item)
    meta: BTreeMap<u64, (u8, MetadataItem)>,
    /// extent start -> checksums
    csums: BTreeMap<u64, crate::btree::Value>,
    /// volume id -> volume
    vols: BTreeMap<u64, VolumeItem>,
    /// (volume id, LBA) -> mapping
    ves: BTreeMap<(u64, u64), VolumeExtent>,
    /// volume id -> where its tree's root is
    root_items: BTreeMap<u64, RootPtr>,
    /// Deleted volumes whose trees are being dropped
    dead: BTreeSet<u64>,
    /// Items that belong to no tree of the current format
    misplaced: Vec<Key>,
}

impl Items {
    /// An item that does not decode is a problem, and left out.
    fn decode(items: &[(u64, Key, crate::btree::Value)], p: &mut Vec<String>) -> Items {
        let mut it = Items::default();
        macro_rules! dec {
            ($t:ty, $k:expr, $v:expr) => {
                match <$t>::decode($v) {
                    Ok(x) => x,
                    Err(e) => {
                        p.push(format!("item {}: {e}", $k));
                        continue;
                    }
                }
            };
        }
        for (tree, k, v) in items {
            match (*tree, k.ty) {
                (tree_id::CHUNK, item::CHUNK) => match ChunkItem::decode(k.offset, v) {
                    Ok(c) => {
                        it.chunks.insert(k.offset, c);
                    }
                    Err(e) => p.push(format!("item {k}: {e}")),
                },
                (tree_id::DEV, item::DEV_EXTENT) => {
                    it.dev_extents
                        .insert((k.objectid, k.offset), dec!(DevExtent, k, v));
                }
                (tree_id::EXTENT, item::BLOCK_GROUP) => {
                    it.bg_items
                        .insert(k.objectid, (k.offset, dec!(BlockGroupItem, k, v)));
                }
                (tree_id::EXTENT, item::EXTENT) => {
                    it.extents
                        .insert(k.objectid, (k.offset, dec!(ExtentItem, k, v)));
                }
                (tree_id::EXTENT, item::METADATA) => {
                    it.meta
                        .insert(k.objectid, (k.offset as u8, dec!(MetadataItem, k, v)));
                }
                (tree_id::CSUM, item::CSUM) => {
                    it.csums.insert(k.offset, v.clone());
                }
                (tree_id::VOLUME, item::VOLUME_ITEM) if k.objectid == objectid::VOLUMES => {
                    it.vols.insert(k.offset, dec!(VolumeItem, k, v));
                }
                (tree_id::VOLUME, item::DEAD_ROOT) if k.objectid == objectid::VOLUMES => {
                    it.dead.insert(k.offset);
                }
                (tree_id::VOLUME, item::ROOT_ITEM) => {
                    it.root_items.insert(k.objectid, dec!(RootItem, k, v).root);
                }
                (t, item::VOLUME_EXTENT)
                    if tree_id::is_volume(t) && k.objectid == objectid::MAPPING =>
                {
                    it.ves.insert((t, k.offset), dec!(VolumeExtent, k, v));
                }
                (t, _) if tree_id::is_volume(t) => it.misplaced.push(*k),
                (tree_id::VOLUME, item::VOLUME_EXTENT) => it.misplaced.push(*k),
                _ => {}
            }
        }
        it
    }
}

/// Every volume has a tree, found through a ROOT_ITEM that points at the
/// root the pool opened, and every tree belongs to a volume.
fn check_volume_roots(trees: &BTreeMap<u64, Arc<Node>>, items: &Items, p: &mut Vec<String>) {
    for id in items.vols.keys() {
        if !items.root_items.contains_key(id) {
            p.push(format!("volume id {id} has no ROOT_ITEM"));
        }
    }
    for id in &items.dead {
        if items.vols.contains_key(id) || !items.root_items.contains_key(id) {
            p.push(format!(
                "DEAD_ROOT of volume id {id}, which has a VOLUME_ITEM or no ROOT_ITEM"
            ));
        }
    }
    for (id, r) in &items.root_items {
        if !items.vols.contains_key(id) && !items.dead.contains(id) {
            p.push(format!(
                "ROOT_ITEM of volume id {id} that has no VOLUME_ITEM"
            ));
        }
        match trees.get(id) {
            Some(n) if n.addr == r.addr && n.gen == r.gen && n.level == r.level => {}
            _ => p.push(format!(
                "ROOT_ITEM of volume id {id} points at {:#x} (gen {}), not at the tree's root",
                r.addr, r.gen
            )),
        }
    }
    for k in &items.misplaced {
        p.push(format!("item {k} does not belong where it is"));
    }
}

/// Tree blocks found by the walk against their extent items, both ways.
fn check_tree_blocks(
    blocks: &BTreeMap<u64, (u8, u64, u64, u64)>,
    items: &Items,
    p: &mut Vec<String>,
) {
    let meta = &items.meta;
    for (addr, &(level, owner, gen, refs)) in blocks {
        match meta.get(addr) {
            Some((l, m)) if *l == level && m.owner == owner && m.gen == gen && m.refs == refs => {}
            Some((l, m)) => p.push(format!(
                "tree block {addr:#x} (level {level} owner {owner} gen {gen}, {refs} referrers) has extent item level {l} owner {} gen {} refs {}",
                m.owner, m.gen, m.refs
            )),
            None => p.push(format!("tree block {addr:#x} has no extent item")),
        }
    }
    for addr in meta.keys() {
        if !blocks.contains_key(addr) {
            p.push(format!(
                "extent item for tree block {addr:#x} that no tree references"
            ));
        }
    }
}

/// Chunks, device extents and block group items must describe each other.
fn check_chunks(fs: &FsInfo, items: &Items, p: &mut Vec<String>) {
    let Items {
        chunks,
        dev_extents,
        bg_items,
        ..
    } = items;
    let mut matched = BTreeSet::new();
    for (logical, c) in chunks {
        match bg_items.get(logical) {
            Some((len, bi)) if *len == c.length && bi.bg_type == c.bg_type => {}
            _ => p.push(format!(
                "chunk {logical:#x} has no matching block group item"
            )),
        }
        for s in &c.stripes {
            match dev_extents.get(&(s.devid, s.physical)) {
                Some(de) if de.chunk_logical == *logical && de.length == c.stripe_bytes => {
                    matched.insert((s.devid, s.physical));
                }
                _ => p.push(format!(
                    "chunk {logical:#x}: stripe devid {} physical {:#x} has no device extent",
                    s.devid, s.physical
                )),
            }
        }
    }
    for start in bg_items.keys() {
        if !chunks.contains_key(start) {
            p.push(format!("block group {start:#x} has no chunk"));
        }
    }
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for ((devid, phys), de) in dev_extents {
        if !matched.contains(&(*devid, *phys)) {
            p.push(format!(
                "device extent devid {devid} physical {phys:#x} belongs to no chunk stripe"
            ));
        }
        let end = last.entry(*devid).or_insert(0);
        if *phys < *end {
            p.push(format!(
                "device extents overlap on devid {devid} at {phys:#x}"
            ));
        }
        *end = phys + de.length;
        if let Some(d) = fs.device(*devid) {
            if phys + de.length > d.total_bytes {
                p.push(format!(
                    "device extent devid {devid} {phys:#x} runs past the device end"
                ));
            }
        }
    }
}

/// Data extents against their referrers (volume mappings, checksum items);
/// returns the bytes they use per block group.
fn check_data_extents(fs: &FsInfo, items: &Items, report: &mut CheckReport) -> BTreeMap<u64, u64> {
    let Items {
        extents,
        csums,
        ves,
        ..
    } = items;
    let p = &mut report.problems;
    let cs = fs.csum_type.size_bytes() as u64;
    let mut prev_end = 0;
    // Mapping items per extent, each leaf once (a shared leaf counts once).
    let mut refs: BTreeMap<u64, u64> = BTreeMap::new();
    for ve in ves.values() {
        if let Some((&s, _)) = extent_holding(extents, ve) {
            *refs.entry(s).or_default() += 1;
        }
    }
    let mut used: BTreeMap<u64, u64> = BTreeMap::new();
    for (&start, (len, ei)) in extents {
        report.data_extents += 1;
        report.data_bytes += len;
        if start < prev_end {
            p.push(format!("data extent {start:#x} overlaps the previous one"));
        }
        prev_end = start + len;
        match fs.block_group(start) {
            Some(bg) if bg.bg_type == bg_type::DATA && start + len <= bg.end() => {
                *used.entry(bg.start).or_default() += len;
            }
            _ => p.push(format!(
                "data extent {start:#x}+{len} is not inside a data block group"
            )),
        }
        let referrers = refs.get(&start).copied().unwrap_or(0);
        if ei.refs != referrers || ei.backrefs.len() != 1 {
            p.push(format!(
                "data extent {start:#x}+{len}: refcount {} but {referrers} mapping items point into it ({} back references)",
                ei.refs,
                ei.backrefs.len()
            ));
        }
        match csums.get(&start) {
            Some(s) if s.len() as u64 == len / SECTOR_BYTES * cs => {}
            Some(_) => p.push(format!(
                "data extent {start:#x}: checksum item has the wrong length"
            )),
            None => p.push(format!("data extent {start:#x}: no checksum item")),
        }
    }
    for start in csums.keys() {
        if !extents.contains_key(start) {
            p.push(format!("checksum item {start:#x} belongs to no extent"));
        }
    }
    used
}

/// The extent a mapping points into, if one holds all of it.
fn extent_holding<'a>(
    extents: &'a BTreeMap<u64, (u64, ExtentItem)>,
    ve: &VolumeExtent,
) -> Option<(&'a u64, &'a (u64, ExtentItem))> {
    extents
        .range(..=ve.logical)
        .next_back()
        .filter(|(&s, (len, _))| ve.logical + ve.len <= s + len)
}

/// Volume mappings must point into an extent, at the distance its back
/// reference gives (`logical - lba` is the same for every mapping into
/// an extent: `relocation` relies on it to find them), and stay inside
/// their volume.
fn check_volume_extents(items: &Items, p: &mut Vec<String>) {
    let Items {
        extents, vols, ves, ..
    } = items;
    for ((vid, lba), ve) in ves {
        match extent_holding(extents, ve) {
            Some((&s, (_, ei)))
                if ei
                    .backrefs
                    .iter()
                    .any(|b| b.lba_bytes + (ve.logical - s) == *lba) => {}
            Some((&s, (len, ei))) => p.push(format!(
                "volume {vid} byte offset {lba}: maps logical {:#x}+{} of extent {s:#x}+{len}, whose back reference puts it at byte offset {}",
                ve.logical,
                ve.len,
                ei.backrefs.first().map_or(0, |b| b.lba_bytes + (ve.logical - s))
            )),
            None => p.push(format!(
                "volume {vid} byte offset {lba}: maps logical {:#x}+{} with no matching extent",
                ve.logical, ve.len
            )),
        }
        match vols.get(vid) {
            None if items.dead.contains(vid) => {}
            Some(v) if lba + ve.len <= v.size_bytes => {}
            Some(v) => p.push(format!(
                "volume {} bytes {lba}+{} are past its end",
                v.name, ve.len
            )),
            None => p.push(format!("volume id {vid} has mappings but no volume item")),
        }
    }
}

/// Each block group item's used bytes must equal its data extents plus the
/// tree blocks inside it.
fn check_bg_used(
    fs: &FsInfo,
    blocks: &BTreeMap<u64, (u8, u64, u64, u64)>,
    items: &Items,
    used: &mut BTreeMap<u64, u64>,
    p: &mut Vec<String>,
) {
    for addr in blocks.keys() {
        if let Some(bg) = fs.block_group(*addr) {
            *used.entry(bg.start).or_default() += fs.node_bytes as u64;
        }
    }
    for (start, (_, bi)) in &items.bg_items {
        let actual = used.get(start).copied().unwrap_or(0);
        if bi.used != actual {
            p.push(format!(
                "block group {start:#x}: item says {} bytes used, extents add up to {actual}",
                bi.used
            ));
        }
    }
}

fn verify_data(
    fs: &FsInfo,
    extents: &BTreeMap<u64, (u64, ExtentItem)>,
    csums: &BTreeMap<u64, crate::btree::Value>,
    names: &BTreeMap<u64, String>,
    report: &mut CheckReport,
) {
    let cs = fs.csum_type.size_bytes();
    let s = SECTOR_BYTES as usize;
    for (&start, (len, ei)) in extents {
        let Some(sums) = csums.get(&start) else {
            continue;
        };
        // A checksum item of the wrong length is reported above; skip it here.
        if sums.len() as u64 != len / SECTOR_BYTES * cs as u64 || len % SECTOR_BYTES != 0 {
            continue;
        }
        let Some(map) = fs.mapping.lookup(start) else {
            continue;
        };
        let Ok(pieces) = map.map(start, *len) else {
            continue;
        };
        for piece in &pieces {
            for m in 0..piece.mirrors.len() {
                let mut buf = vec![0u8; piece.len as usize];
                let read_ok = fs.read_copy(piece, m, &mut buf).is_ok();
                for i in 0..buf.len() / s {
                    report.sectors_verified += 1;
                    let off = piece.logical - start + (i * s) as u64;
                    let idx = (off / SECTOR_BYTES) as usize;
                    let good = read_ok
                        && fs
                            .csum_type
                            .matches(&buf[i * s..(i + 1) * s], &sums[idx * cs..(idx + 1) * cs]);
                    if !good {
                        report.csum_errors += 1;
                        let bad = BadSector {
                            piece,
                            mirror: m,
                            sector: i,
                            start,
                            off,
                            ei,
                            read_ok,
                        };
                        report.problems.push(bad.describe(fs, names));
                    }
                }
            }
        }
    }
}

/// A sector copy that failed verification, with what it takes to name the
/// device, the physical place and the volume data it belongs to.
struct BadSector<'a> {
    piece: &'a Mapped,
    /// Index into `piece.mirrors`.
    mirror: usize,
    /// Sector index within the piece.
    sector: usize,
    /// Start of the data extent.
    start: u64,
    /// Byte offset of the sector within the extent.
    off: u64,
    ei: &'a ExtentItem,
    /// False when the read failed, rather than the checksum.
    read_ok: bool,
}

impl BadSector<'_> {
    fn describe(&self, fs: &FsInfo, names: &BTreeMap<u64, String>) -> String {
        let BadSector {
            piece,
            mirror: m,
            sector: i,
            start,
            off,
            ei,
            read_ok,
        } = *self;
        let (devid, phys) = piece.mirrors[m];
        let path = fs
            .device(devid)
            .map(|d| d.dev.path().display().to_string())
            .unwrap_or_else(|| format!("devid {devid}"));
        let who = ei
            .backrefs
            .first()
            .map(|b| {
                format!(
                    "volume {} byte offset {}",
                    names
                        .get(&b.volume_id)
                        .cloned()
                        .unwrap_or_else(|| b.volume_id.to_string()),
                    b.lba_bytes + off
                )
            })
            .unwrap_or_default();
        format!(
            "data {} at {path} physical {:#x}, logical {:#x}, {who}",
            if read_ok {
                "checksum mismatch"
            } else {
                "read error"
            },
            phys + (i as u64) * SECTOR_BYTES,
            start + off
        )
    }
}
