//! Superblocks: a corrupted primary copy (on one device, or on every one)
//! opens from a backup and scrub reports and rewrites it; a member whose
//! superblock is generations behind the pool's is reported, counted and not
//! trusted.

mod common;

use std::sync::Arc;

use chunkvol::device::fault::FaultyDevice;
use chunkvol::device::read_supers;
use chunkvol::format::{Profile, SUPER_BYTES, SUPER_OFFSETS};
use chunkvol::jobs::scrub::{self, ErrorKind, ScrubOptions};
use chunkvol::Pool;
use common::*;

const DATA_BYTES: usize = 24 << 20;

/// raid1 on two 256 MiB devices (primary and first backup copy on each),
/// with data written and committed.
fn pool_with_data() -> Vec<Arc<FaultyDevice>> {
    let devs = mkfs_mem(Profile::Raid1, 256 << 20);
    let pool = open_mem(&devs);
    let v = pool.create_volume("v", 64 << 20).unwrap();
    v.write_at(&pattern(3, DATA_BYTES), 0).unwrap();
    pool.close().unwrap();
    devs
}

fn copies_per_device(d: &FaultyDevice) -> usize {
    let size = chunkvol::device::BlockDevice::size_bytes(d);
    SUPER_OFFSETS
        .iter()
        .filter(|&&o| o + SUPER_BYTES as u64 <= size)
        .count()
}

fn assert_data(pool: &Pool) {
    let mut b = vec![0u8; DATA_BYTES];
    pool.volume("v").unwrap().read_at(&mut b, 0).unwrap();
    assert!(b == pattern(3, DATA_BYTES), "data changed");
}

/// Corrupt the primary copy on `which` devices; open, scrub, close; every
/// copy is valid again.
fn primary_corrupted_on(which: &[usize]) {
    let devs = pool_with_data();
    for &i in which {
        devs[i].corrupt(SUPER_OFFSETS[0], &[0xA5; 4096]);
        assert_eq!(
            read_supers(devs[i].as_ref()).unwrap().len(),
            copies_per_device(&devs[i]) - 1,
            "the primary of device {i} is bad"
        );
    }
    let pool = open_mem(&devs);
    assert_data(&pool);
    let st = scrub::start(pool.fs(), ScrubOptions::default())
        .unwrap()
        .wait();
    assert_eq!(st.counters.super_errors, which.len() as u64, "{st:?}");
    assert_eq!(st.counters.uncorrectable_errors, 0, "{st:?}");
    let errs = scrub::status(pool.fs(), true).unwrap().errors.unwrap();
    for &i in which {
        let devid = i as u64 + 1;
        assert!(
            errs.iter().any(|e| e.kind == ErrorKind::Super
                && e.devid == devid
                && e.physical == SUPER_OFFSETS[0]
                && e.repaired),
            "devid {devid}'s primary superblock not logged as rewritten: {errs:?}"
        );
    }
    pool.close().unwrap();
    for d in &devs {
        let sbs = read_supers(d.as_ref()).unwrap();
        assert_eq!(sbs.len(), copies_per_device(d), "every copy valid again");
        assert!(sbs.iter().all(|s| s.generation == sbs[0].generation));
    }
    let pool = open_mem(&devs);
    assert_data(&pool);
    let r = chunkvol::pool::check::check(&pool, true).unwrap();
    assert!(r.ok(), "{:#?}", r.problems);
}

#[test]
fn primary_superblock_corrupted_on_one_device() {
    primary_corrupted_on(&[0]);
}

#[test]
fn primary_superblock_corrupted_on_every_device() {
    primary_corrupted_on(&[0, 1]);
}

/// A device that missed commits (its superblock copies put back as they
/// were several commits ago): the pool opens from the newest superblock,
/// reports the stale member as a generation error, reads the data right,
/// and rewrites the stale superblocks at its next commit.
#[test]
fn a_stale_superblock_is_reported_not_trusted() {
    let devs = pool_with_data();
    let old: Vec<(u64, Vec<u8>)> = SUPER_OFFSETS
        .iter()
        .filter(|&&o| o + SUPER_BYTES as u64 <= 256 << 20)
        .map(|&o| {
            (
                o,
                devs[1].image()[o as usize..o as usize + SUPER_BYTES].to_vec(),
            )
        })
        .collect();
    let old_gen = read_supers(devs[1].as_ref()).unwrap()[0].generation;
    {
        let pool = open_mem(&devs);
        let v = pool.volume("v").unwrap();
        for i in 0..3u64 {
            v.write_at(&pattern(10 + i, 1 << 20), (40 << 20) + i * (1 << 20))
                .unwrap();
            pool.flush().unwrap();
        }
        pool.close().unwrap();
    }
    let new_gen = read_supers(devs[0].as_ref()).unwrap()[0].generation;
    assert!(new_gen >= old_gen + 3, "{old_gen} -> {new_gen}");
    for (o, b) in &old {
        devs[1].corrupt(*o, b);
    }
    assert_eq!(
        read_supers(devs[1].as_ref()).unwrap()[0].generation,
        old_gen
    );
    let pool = open_mem(&devs);
    assert_eq!(
        pool.fs()
            .committed_gen
            .load(std::sync::atomic::Ordering::Acquire),
        new_gen,
        "the pool opens from the newest superblock"
    );
    let stats = pool.device_stats();
    let gen_errs: Vec<u64> = stats.iter().map(|d| d.stats.generation_errs).collect();
    assert_eq!(
        gen_errs,
        vec![0, 1],
        "the stale member is counted: {stats:?}"
    );
    assert_data(&pool);
    let mut b = vec![0u8; 1 << 20];
    pool.volume("v")
        .unwrap()
        .read_at(&mut b, (40 << 20) + (2 << 20))
        .unwrap();
    assert!(b == pattern(12, 1 << 20), "the last commit's data");
    pool.flush().unwrap();
    pool.close().unwrap();
    let sbs = read_supers(devs[1].as_ref()).unwrap();
    assert!(
        sbs.iter().all(|s| s.generation > new_gen),
        "rewritten: {:?}",
        sbs.iter().map(|s| s.generation).collect::<Vec<_>>()
    );
}
