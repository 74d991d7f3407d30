//! Crash mode of the stress harness (src/stress/crash.rs): 2,000 power cuts
//! over five profiles. Each drops the unflushed writes (all, a random
//! subset, or with a torn write), a third of them inside a commit, after
//! random writes, discards, write-zeroes, flushes, relocations, cleaner
//! passes, snapshots, clones and deletes (some cut inside their commit); the
//! reopened pool must check clean, every sector must hold what was flushed
//! or a later version, and every snapshot and clone must be whole, or gone
//! only if the cut caught its making (or its delete before a commit).
//! Flushes write the intent log, so many reopens replay it.
//!
//! CHUNKVOL_CRASH_POINTS sets the points per profile (default 400).

use chunkvol::format::Profile;
use chunkvol::stress::crash::campaign;

fn points() -> u64 {
    std::env::var("CHUNKVOL_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

fn run(p: Profile, seed: u64) {
    let s = campaign(p, seed, points()).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{p:?}: {s:?}");
    assert_eq!(s.points, points());
    assert!(s.relocations > 0 && s.cut_in_commit > 0, "{s:?}");
    assert!(s.snapshots > 0 && s.clones > 0 && s.deletes > 0, "{s:?}");
    // Flushes went through the intent log, and cuts left logs to replay.
    assert!(s.log_blocks > 0 && s.log_replays > 0, "{s:?}");
}

#[test]
fn crash_raid1() {
    run(Profile::Raid1, 1);
}
#[test]
fn crash_single() {
    run(Profile::Single, 2);
}
#[test]
fn crash_dup() {
    run(Profile::Dup, 3);
}
#[test]
fn crash_raid10() {
    run(Profile::Raid10, 4);
}
#[test]
fn crash_raid1c3() {
    run(Profile::Raid1c3, 5);
}
