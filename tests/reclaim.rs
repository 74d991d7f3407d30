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

/// Relocating the only metadata group of a pool with no unallocated space
/// left is refused up front with ENOSPC naming the group: its tree blocks
/// have nowhere to go, and finding that out halfway through moving them
/// would abort the pool. The pool stays writable and its data intact.
#[test]
fn metadata_relocation_in_a_full_pool_is_refused_before_it_starts() {
    let devs = mkfs_mem(Profile::Single, 96 << 20);
    let pool = open_mem(&devs);
    let vol = pool.create_volume("v", 256 << 20).unwrap();
    let chunk = 1 << 20;
    let mut written = 0u64;
    while vol
        .write_at(&pattern(written, chunk), written * chunk as u64)
        .is_ok()
    {
        written += 1;
    }
    assert!(written > 8, "only {written} MiB fit");
    pool.flush().unwrap();
    let u = pool.usage();
    assert!(
        u.unallocated_bytes < 64 << 20,
        "the pool must be full: {} bytes unallocated",
        u.unallocated_bytes
    );
    let meta: Vec<u64> = u
        .block_groups
        .iter()
        .filter(|b| b.bg_type == "metadata")
        .map(|b| b.start)
        .collect();
    assert_eq!(meta.len(), 1, "one metadata group: {meta:?}");
    let err = chunkvol::jobs::relocation::relocate_block_group(pool.fs(), meta[0], &|| false)
        .expect_err("no room for the tree blocks");
    let msg = err.to_string();
    assert!(
        msg.contains("no room to move the tree blocks") && msg.contains(&format!("{:#x}", meta[0])),
        "{msg}"
    );
    assert_eq!(err.to_io().raw_os_error(), Some(28), "ENOSPC: {msg}");
    assert!(
        !pool.fs().is_aborted(),
        "a refused relocation must not abort the pool"
    );
    // Nothing was lost, and the pool still takes writes and commits.
    for i in 0..written.min(4) {
        let mut b = vec![0u8; chunk];
        vol.read_at(&mut b, i * chunk as u64).unwrap();
        assert!(b == pattern(i, chunk), "MiB {i} changed");
    }
    // Copy-on-write: an overwrite needs free space, so free some first.
    vol.discard(0, 4 * chunk as u64).unwrap();
    pool.flush().unwrap();
    vol.write_at(&pattern(7, chunk), 0).unwrap();
    pool.flush().unwrap();
    pool.close().unwrap();
    let pool = open_mem(&devs);
    let r = chunkvol::pool::check::check(&pool, true).unwrap();
    assert!(r.ok(), "{:#?}", r.problems);
}
