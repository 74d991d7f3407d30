//! Discarding everything gives the space back: data used bytes drop to zero,
//! emptied data block groups join the unused list, and the cleaner deletes
//! them (keeping the last one of its type) once the emptying commit is durable.

mod common;

use chunkvol::format::Profile;
use common::*;

#[test]
fn discard_all_empties_block_groups_and_cleaner_deletes_them() {
    let devs = mkfs_mem(Profile::Raid1, 256 << 20);
    let pool = open_mem(&devs);
    let vol = pool.create_volume("v", 512 << 20).unwrap();
    let chunk = 8 << 20;
    for i in 0..20u64 {
        vol.write_at(&pattern(i, chunk), i * chunk as u64).unwrap();
    }
    pool.flush().unwrap();
    let u = pool.usage();
    let data_bgs: Vec<u64> = u
        .block_groups
        .iter()
        .filter(|b| b.bg_type == "data")
        .map(|b| b.start)
        .collect();
    assert!(
        data_bgs.len() >= 3,
        "want several data groups, got {}",
        data_bgs.len()
    );
    let meta_used: u64 = u
        .block_groups
        .iter()
        .filter(|b| b.bg_type != "data")
        .map(|b| b.used_bytes * 2)
        .sum();
    assert!(u.used_bytes > meta_used + (160 << 20) * 2 - 1);

    vol.discard(0, 512 << 20).unwrap();
    pool.flush().unwrap();
    let u = pool.usage();
    for b in u.block_groups.iter().filter(|b| b.bg_type == "data") {
        assert_eq!(b.used_bytes, 0, "data group {:#x} still used", b.start);
    }
    let meta_used: u64 = u
        .block_groups
        .iter()
        .filter(|b| b.bg_type != "data")
        .map(|b| b.used_bytes * 2)
        .sum();
    assert_eq!(u.used_bytes, meta_used, "used bytes are the metadata alone");
    for s in &data_bgs {
        assert!(
            u.unused_block_groups.contains(s),
            "{s:#x} not on the unused list"
        );
    }
    let before = u.allocated_bytes;
    let pass = chunkvol::engine::block_group::delete_unused_bgs(pool.fs()).unwrap();
    assert_eq!(pass.deleted, data_bgs.len() - 1, "{pass:?}");
    // The last data group is kept (and counted as skipped), nothing waits.
    assert_eq!((pass.skipped, pass.requeued), (1, 0), "{pass:?}");
    pool.flush().unwrap();
    let after = pool.usage();
    let left = after
        .block_groups
        .iter()
        .filter(|b| b.bg_type == "data")
        .count();
    assert_eq!(left, 1, "the last data group stays");
    assert!(after.allocated_bytes < before, "allocated bytes must drop");
    pool.close().unwrap();
    let pool = open_mem(&devs);
    let r = chunkvol::pool::check::check(&pool, true).unwrap();
    assert!(r.ok(), "{:#?}", r.problems);
    assert_eq!(pool.usage().allocated_bytes, after.allocated_bytes);
    // The space is reusable: writing again works and reads back.
    let vol = pool.volume("v").unwrap();
    let d = pattern(99, 100 << 20);
    vol.write_at(&d, 0).unwrap();
    let mut b = vec![0u8; d.len()];
    vol.read_at(&mut b, 0).unwrap();
    assert!(b == d);
}

#[test]
fn cleaner_waits_for_the_emptying_commit() {
    let devs = mkfs_mem(Profile::Single, 128 << 20);
    let pool = open_mem(&devs);
    let vol = pool.create_volume("v", 128 << 20).unwrap();
    vol.write_at(&pattern(1, 40 << 20), 0).unwrap();
    pool.flush().unwrap();
    vol.discard(0, 40 << 20).unwrap();
    // Not committed yet: the freed space is pinned, nothing may be deleted.
    let pass = chunkvol::engine::block_group::delete_unused_bgs(pool.fs()).unwrap();
    assert_eq!(pass.deleted, 0, "{pass:?}");
    assert!(pass.requeued >= 1, "emptied but pinned: re-queued {pass:?}");
    pool.flush().unwrap();
    let pass = chunkvol::engine::block_group::delete_unused_bgs(pool.fs()).unwrap();
    assert!(pass.deleted >= 1, "{pass:?}");
    pool.flush().unwrap();
    let r = chunkvol::pool::check::check(&pool, false).unwrap();
    assert!(r.ok(), "{:#?}", r.problems);
}
