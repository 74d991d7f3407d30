//! `check` is the oracle of most tests, so each class of inconsistency it
//! claims to find is provoked here: a pool is damaged in exactly one way,
//! committed, and `check` must report exactly that (and nothing else).

mod common;

use std::collections::BTreeSet;

use chunkvol::btree::Value;
use chunkvol::engine::transaction::{commit, Ctx};
use chunkvol::format::{item, objectid, tree_id, BlockGroupItem, Key, Profile};
use chunkvol::pool::check::check;
use chunkvol::Pool;
use common::*;

const DATA_BYTES: usize = 4 << 20;

/// A single-device pool with one volume holding 4 MiB of data, flushed.
fn pool() -> Pool {
    let devs = mkfs_mem(Profile::Single, 128 << 20);
    let pool = open_mem(&devs);
    let v = pool.create_volume("v", 16 << 20).unwrap();
    v.write_at(&pattern(7, DATA_BYTES), 0).unwrap();
    pool.flush().unwrap();
    let r = check(&pool, true).unwrap();
    assert!(r.ok(), "clean before the damage: {:?}", r.problems);
    pool
}

/// Change the trees in one transaction and commit it.
fn damage(pool: &Pool, f: impl FnOnce(&mut Ctx)) {
    let fs = pool.fs();
    {
        let mut st = chunkvol::util::sync::lock(&fs.trans);
        let mut ctx = Ctx::join(fs, &mut st);
        f(&mut ctx);
    }
    commit(fs).unwrap();
}

/// Every item of one type in a tree.
fn items(ctx: &Ctx, tree: u64, ty: u8) -> Vec<(Key, Value)> {
    ctx.range(tree, Key::MIN, Key::MAX)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.ty == ty)
        .collect()
}

/// The volume mapping item that points at the extent at `logical`.
fn mapping_of(ctx: &Ctx, logical: u64) -> Key {
    items(ctx, ctx.st.volumes["v"].id, item::VOLUME_EXTENT)
        .into_iter()
        .find(|(_, v)| chunkvol::format::VolumeExtent::decode(v).unwrap().logical == logical)
        .map(|(k, _)| k)
        .expect("a mapping of the extent")
}

fn delete(ctx: &mut Ctx, tree: u64, k: &Key) {
    assert!(ctx.delete(tree, k).unwrap(), "{k} present");
}

fn problems(pool: &Pool) -> BTreeSet<String> {
    check(pool, false).unwrap().problems.into_iter().collect()
}

fn set(v: &[String]) -> BTreeSet<String> {
    v.iter().cloned().collect()
}

/// The id of volume "v".
fn volume_id(pool: &Pool) -> u64 {
    chunkvol::util::sync::lock(&pool.fs().trans).volumes["v"].id
}

/// The first data extent: (logical, length).
fn first_extent(pool: &Pool) -> (u64, u64) {
    pool.data_extents().unwrap()[0]
}

#[test]
fn a_tree_block_without_its_metadata_item() {
    let pool = pool();
    let (addr, _, level) = pool
        .tree_blocks()
        .unwrap()
        .into_iter()
        .find(|&(_, owner, _)| owner == volume_id(&pool))
        .unwrap();
    damage(&pool, |ctx| {
        delete(
            ctx,
            tree_id::EXTENT,
            &Key::new(addr, item::METADATA, level as u64),
        );
    });
    assert_eq!(
        problems(&pool),
        set(&[format!("tree block {addr:#x} has no extent item")])
    );
}

#[test]
fn a_chunk_without_its_device_extent() {
    let pool = pool();
    let (logical, _) = first_extent(&pool);
    let map = pool.fs().mapping.lookup(logical).unwrap();
    let s = map.item.stripes[0];
    damage(&pool, |ctx| {
        delete(
            ctx,
            tree_id::DEV,
            &Key::new(s.devid, item::DEV_EXTENT, s.physical),
        );
    });
    assert_eq!(
        problems(&pool),
        set(&[format!(
            "chunk {:#x}: stripe devid {} physical {:#x} has no device extent",
            map.start(),
            s.devid,
            s.physical
        )])
    );
}

#[test]
fn a_chunk_without_its_block_group_item() {
    let pool = pool();
    let (logical, _) = first_extent(&pool);
    let bg = pool.fs().block_group(logical).unwrap();
    damage(&pool, |ctx| {
        delete(
            ctx,
            tree_id::EXTENT,
            &Key::new(bg.start, item::BLOCK_GROUP, bg.length),
        );
    });
    assert_eq!(
        problems(&pool),
        set(&[format!(
            "chunk {:#x} has no matching block group item",
            bg.start
        )])
    );
}

#[test]
fn a_block_group_without_its_chunk() {
    let pool = pool();
    let (logical, _) = first_extent(&pool);
    let map = pool.fs().mapping.lookup(logical).unwrap();
    let s = map.item.stripes[0];
    damage(&pool, |ctx| {
        delete(
            ctx,
            tree_id::CHUNK,
            &Key::new(objectid::FIRST_CHUNK, item::CHUNK, map.start()),
        );
    });
    assert_eq!(
        problems(&pool),
        set(&[
            format!("block group {:#x} has no chunk", map.start()),
            format!(
                "device extent devid {} physical {:#x} belongs to no chunk stripe",
                s.devid, s.physical
            ),
        ])
    );
}

#[test]
fn an_extent_without_its_volume_mapping() {
    let pool = pool();
    let (logical, len) = first_extent(&pool);
    let mut lba = 0;
    damage(&pool, |ctx| {
        let k = mapping_of(ctx, logical);
        lba = k.offset;
        let vid = ctx.st.volumes["v"].id;
        delete(ctx, vid, &k);
    });
    assert_eq!(
        problems(&pool),
        set(&[format!(
            "data extent {logical:#x}+{len}: refcount 1 but 0 mapping items point into it (1 back references)"
        )])
    );
}

#[test]
fn an_extent_without_its_checksum_item() {
    let pool = pool();
    let (logical, _) = first_extent(&pool);
    damage(&pool, |ctx| {
        delete(
            ctx,
            tree_id::CSUM,
            &Key::new(objectid::CSUM, item::CSUM, logical),
        );
    });
    assert_eq!(
        problems(&pool),
        set(&[format!("data extent {logical:#x}: no checksum item")])
    );
}

#[test]
fn a_mapping_without_its_extent() {
    let pool = pool();
    let (logical, len) = first_extent(&pool);
    let bg = pool.fs().block_group(logical).unwrap();
    let used = bg.used_bytes();
    let mut lba = 0;
    damage(&pool, |ctx| {
        delete(ctx, tree_id::EXTENT, &Key::new(logical, item::EXTENT, len));
        let k = mapping_of(ctx, logical);
        lba = k.offset;
    });
    let vid = volume_id(&pool);
    assert_eq!(
        problems(&pool),
        set(&[
            format!(
                "volume {vid} byte offset {lba}: maps logical {logical:#x}+{len} with no matching extent"
            ),
            format!("checksum item {logical:#x} belongs to no extent"),
            format!(
                "block group {:#x}: item says {used} bytes used, extents add up to {}",
                bg.start,
                used - len
            ),
        ])
    );
}

#[test]
fn used_bytes_that_disagree_with_the_extents() {
    let pool = pool();
    let (logical, _) = first_extent(&pool);
    let bg = pool.fs().block_group(logical).unwrap();
    let used = bg.used_bytes();
    damage(&pool, |ctx| {
        let k = Key::new(bg.start, item::BLOCK_GROUP, bg.length);
        let v = BlockGroupItem {
            used: used + 4096,
            bg_type: bg.bg_type,
        }
        .encode();
        ctx.insert(tree_id::EXTENT, k, v).unwrap();
    });
    assert_eq!(
        problems(&pool),
        set(&[format!(
            "block group {:#x}: item says {} bytes used, extents add up to {used}",
            bg.start,
            used + 4096
        )])
    );
}

#[test]
fn a_data_sector_with_a_bad_checksum() {
    let devs = mkfs_mem(Profile::Single, 128 << 20);
    let pool = open_mem(&devs);
    let v = pool.create_volume("v", 16 << 20).unwrap();
    v.write_at(&pattern(7, DATA_BYTES), 0).unwrap();
    pool.flush().unwrap();
    let (logical, _) = first_extent(&pool);
    let (_, phys) = pool.sector_copies(logical).unwrap()[0].clone();
    devs[0].flip_bit(phys + 100, 3);
    let r = check(&pool, true).unwrap();
    assert_eq!(r.csum_errors, 1, "{:?}", r.problems);
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    assert!(
        r.problems[0].contains(&format!("{logical:#x}")),
        "names the logical address: {:?}",
        r.problems
    );
    assert!(
        check(&pool, false).unwrap().ok(),
        "the trees themselves are intact"
    );
}

#[test]
fn a_key_outside_its_parents_range() {
    let devs = mkfs_mem(Profile::Single, 128 << 20);
    let pool = open_mem(&devs);
    let v = pool.create_volume("v", 64 << 20).unwrap();
    // 1,500 separate 4 KiB extents: a volume tree of several leaves.
    for i in 0..1500u64 {
        v.write_at(&pattern(i + 1, 4096), i * 8192).unwrap();
    }
    pool.flush().unwrap();
    let fs = pool.fs();
    let root = chunkvol::util::sync::read(&fs.commit_roots).volumes[&volume_id(&pool)].clone();
    assert!(root.level > 0, "the volume tree has more than one leaf");
    let (c, next) = (root.children()[1].clone(), root.children()[2].key);
    let leaf = fs
        .load_node(c.addr, c.gen, root.owner, root.level - 1)
        .unwrap();
    // Move the leaf's last key past the next child's first key, keep the
    // leaf sorted and its checksum right: only the parent's range says no.
    let mut bad = (*leaf).clone();
    let chunkvol::btree::Body::Leaf(items) = &mut bad.body else {
        panic!("level 0 is a leaf")
    };
    let (old, val) = items.last().cloned().unwrap();
    let moved = Key::new(next.objectid, next.ty, next.offset + 4096);
    *items.last_mut().unwrap() = (moved, val.clone());
    let buf = bad.encode(&fs.pool_uuid, fs.node_bytes, fs.csum_type);
    fs.write_logical(bad.addr, &buf).unwrap();
    fs.cache.remove(bad.addr);
    let ve = chunkvol::format::VolumeExtent::decode(&val).unwrap();
    let vid = volume_id(&pool);
    assert_eq!(
        problems(&pool),
        set(&[
            format!(
                "volume id {vid} mapping tree: key {moved} in block {:#x} is outside its parent's range",
                bad.addr
            ),
            // The mapping still points into its extent, but at another LBA
            // than every mapping into that extent must (its back reference).
            format!(
                "volume {vid} byte offset {}: maps logical {:#x}+{} of extent {:#x}+{}, whose back reference puts it at byte offset {}",
                moved.offset, ve.logical, ve.len, ve.logical, ve.len, old.offset
            ),
        ])
    );
}
