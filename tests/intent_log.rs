//! The intent log: a flush writes one log block instead of committing, and
//! an open after a power cut replays it. Each test cuts power with every
//! unflushed write dropped, so only what the flush made durable survives.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use chunkvol::device::fault::{CrashMode, FaultyDevice, Rng};
use chunkvol::format::log::{LOG_BYTES, LOG_OFFSET};
use chunkvol::format::Profile;
use chunkvol::Pool;
use common::{crash, mkfs_mem, open_mem, pattern};

const S: usize = 4096;

fn committed(pool: &Pool) -> u64 {
    pool.fs().committed_gen.load(Ordering::Acquire)
}

/// Random 4 KiB writes and punches with a flush after each, none committed;
/// returns the model.
fn logged_writes(pool: &Pool, vol_bytes: usize, n: usize, seed: u64) -> Vec<u8> {
    let vol = pool.volume("v").unwrap();
    let mut model = vec![0u8; vol_bytes];
    let mut rng = Rng::new(seed);
    for i in 0..n {
        let at = rng.below((vol_bytes / S) as u64 - 2) as usize * S;
        if i % 5 == 4 {
            vol.discard(at as u64, 2 * S as u64).unwrap();
            model[at..at + 2 * S].fill(0);
        } else {
            let data = pattern(seed * 1000 + i as u64, S);
            vol.write_at(&data, at as u64).unwrap();
            model[at..at + S].copy_from_slice(&data);
        }
        vol.flush().unwrap();
    }
    model
}

fn fresh(p: Profile) -> (Vec<Arc<FaultyDevice>>, Pool) {
    let devs = mkfs_mem(p, 64 << 20);
    let pool = open_mem(&devs);
    pool.create_volume("v", 4 << 20).unwrap();
    pool.flush().unwrap();
    (devs, pool)
}

fn read_all(pool: &Pool, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    pool.volume("v").unwrap().read_at(&mut got, 0).unwrap();
    got
}

#[test]
fn flushed_writes_survive_a_cut_through_the_log() {
    for p in [Profile::Single, Profile::Raid1] {
        let (devs, pool) = fresh(p);
        let gen = committed(&pool);
        let model = logged_writes(&pool, 4 << 20, 40, 1);
        // The flushes wrote the log, not a commit.
        assert_eq!(committed(&pool), gen, "{p:?}: a flush committed");
        assert!(pool.fs().log_stats.blocks.load(Ordering::Relaxed) >= 40);
        let devs = crash(&devs, CrashMode::DropAll, &mut Rng::new(2));
        drop(pool);
        let pool = open_mem(&devs);
        assert_eq!(
            pool.fs().log_stats.replayed.load(Ordering::Relaxed),
            40,
            "{p:?}: every record replayed"
        );
        assert!(committed(&pool) > gen, "replay commits");
        assert_eq!(read_all(&pool, 4 << 20), model, "{p:?}: flushed data lost");
        let r = chunkvol::pool::check::check(&pool, true).unwrap();
        assert!(r.ok(), "{p:?}: {:?}", r.problems);
        // Replayed once: the next open has nothing to replay.
        pool.close().unwrap();
        let pool = open_mem(&devs);
        assert_eq!(pool.fs().log_stats.replayed.load(Ordering::Relaxed), 0);
        assert_eq!(read_all(&pool, 4 << 20), model);
    }
}

#[test]
fn a_commit_makes_the_log_stale() {
    let (devs, pool) = fresh(Profile::Single);
    let vol = pool.volume("v").unwrap();
    vol.write_at(&pattern(1, S), 0).unwrap();
    vol.flush().unwrap();
    // Overwritten and committed: replaying the old record would bring the
    // first bytes back over the second.
    vol.write_at(&pattern(2, S), 0).unwrap();
    pool.flush().unwrap();
    let devs = crash(&devs, CrashMode::DropAll, &mut Rng::new(3));
    drop(pool);
    let pool = open_mem(&devs);
    assert_eq!(pool.fs().log_stats.replayed.load(Ordering::Relaxed), 0);
    assert_eq!(read_all(&pool, S), pattern(2, S));
}

#[test]
fn volume_changes_and_a_full_log_commit_instead() {
    let (devs, pool) = fresh(Profile::Single);
    // A volume made after the last commit: the log names volumes by id, so
    // its flush must commit.
    let w = pool.create_volume("w", 1 << 20).unwrap();
    let gen = committed(&pool);
    w.write_at(&pattern(5, S), 0).unwrap();
    w.flush().unwrap();
    assert!(
        committed(&pool) > gen,
        "a flush after a volume change commits"
    );
    // Grown since the last commit: a write past the old end must not be
    // left to a replay that checks it against the committed size.
    pool.resize_volume("w", 2 << 20).unwrap();
    let gen = committed(&pool);
    w.write_at(&pattern(7, S), (1 << 20) + S as u64).unwrap();
    w.flush().unwrap();
    assert!(committed(&pool) > gen, "a flush after a resize commits");
    // More than the log area holds: the flush commits.
    let vol = pool.volume("v").unwrap();
    let big = pattern(6, (LOG_BYTES as usize) + S);
    let gen = committed(&pool);
    vol.write_at(&big, 0).unwrap();
    vol.flush().unwrap();
    assert!(committed(&pool) > gen, "records past the log area commit");
    // Small flushes until the area is full: one of them commits.
    let gen = committed(&pool);
    let full_before = pool.fs().log_stats.full.load(Ordering::Relaxed);
    for i in 0..(LOG_BYTES as usize / (2 * S) + 2) {
        vol.write_at(&pattern(100 + i as u64, S), (i * S) as u64)
            .unwrap();
        vol.flush().unwrap();
    }
    assert!(pool.fs().log_stats.full.load(Ordering::Relaxed) > full_before);
    assert!(committed(&pool) > gen);
    let mut model = big.clone();
    for i in 0..(LOG_BYTES as usize / (2 * S) + 2) {
        model[i * S..(i + 1) * S].copy_from_slice(&pattern(100 + i as u64, S));
    }
    let devs = crash(&devs, CrashMode::DropAll, &mut Rng::new(4));
    drop(pool);
    let pool = open_mem(&devs);
    let mut got = vec![0u8; model.len()];
    pool.volume("v").unwrap().read_at(&mut got, 0).unwrap();
    assert!(got == model, "flushed data lost across a full log");
    let mut got = vec![0u8; S];
    pool.volume("w").unwrap().read_at(&mut got, 0).unwrap();
    assert_eq!(got, pattern(5, S));
    pool.volume("w")
        .unwrap()
        .read_at(&mut got, (1 << 20) + S as u64)
        .unwrap();
    assert_eq!(got, pattern(7, S));
}

#[test]
fn a_torn_or_lost_block_ends_the_chain_and_a_mirror_carries_it() {
    let (devs, pool) = fresh(Profile::Raid1);
    let model = logged_writes(&pool, 4 << 20, 10, 7);
    let devs = crash(&devs, CrashMode::DropAll, &mut Rng::new(5));
    drop(pool);
    // Device 1 lost its log: device 2's copy replays all of it.
    devs[0].corrupt(LOG_OFFSET, &vec![0u8; LOG_BYTES as usize]);
    let pool = open_mem(&devs);
    assert_eq!(pool.fs().log_stats.replayed.load(Ordering::Relaxed), 10);
    assert_eq!(read_all(&pool, 4 << 20), model);
    drop(pool);

    // A torn last block (both copies): the flushes before it replay, and
    // the torn one is dropped whole.
    let (devs, pool) = fresh(Profile::Single);
    let vol = pool.volume("v").unwrap();
    vol.write_at(&pattern(1, S), 0).unwrap();
    vol.flush().unwrap();
    vol.write_at(&pattern(2, S), S as u64).unwrap();
    vol.flush().unwrap();
    let devs = crash(&devs, CrashMode::DropAll, &mut Rng::new(6));
    drop(pool);
    // Each block here is two sectors; the second block starts at +8 KiB.
    devs[0].corrupt(LOG_OFFSET + 2 * S as u64 + S as u64, &[0u8; S]);
    let pool = open_mem(&devs);
    assert_eq!(pool.fs().log_stats.replayed.load(Ordering::Relaxed), 1);
    let mut got = vec![0u8; 2 * S];
    pool.volume("v").unwrap().read_at(&mut got, 0).unwrap();
    assert_eq!(&got[..S], &pattern(1, S)[..]);
    assert_eq!(&got[S..], &[0u8; S][..], "a torn block must not replay");
}

#[test]
fn check_and_dump_leave_the_log_alone() {
    let (devs, pool) = fresh(Profile::Single);
    let model = logged_writes(&pool, 4 << 20, 5, 9);
    let devs = crash(&devs, CrashMode::DropAll, &mut Rng::new(7));
    drop(pool);
    // An open that must not change the devices does not replay.
    let ro = Pool::open_with(common::as_block(&devs), false).unwrap();
    assert_eq!(ro.fs().log_stats.replayed.load(Ordering::Relaxed), 0);
    drop(ro);
    let pool = open_mem(&devs);
    assert_eq!(pool.fs().log_stats.replayed.load(Ordering::Relaxed), 5);
    assert_eq!(read_all(&pool, 4 << 20), model);
}
