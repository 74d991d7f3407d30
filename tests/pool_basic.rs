mod common;

use chunkvol::format::Profile;
use common::*;

#[test]
fn write_read_reopen_every_profile() {
    for p in [
        Profile::Single,
        Profile::Dup,
        Profile::Raid1,
        Profile::Raid1c3,
        Profile::Raid10,
    ] {
        let devs = mkfs_mem(p, 96 << 20);
        let pool = open_mem(&devs);
        let v = pool.create_volume("disk0", 64 << 20).unwrap();
        let data = pattern(1, 3 << 20);
        v.write_at(&data, 4096 * 3).unwrap();
        v.write_at(b"hello", 100).unwrap();
        let mut back = vec![0u8; data.len()];
        v.read_at(&mut back, 4096 * 3).unwrap();
        assert_eq!(back, data, "{p:?}");
        pool.close().unwrap();
        let pool = open_mem(&devs);
        let v = pool.volume("disk0").unwrap();
        let mut back = vec![0u8; data.len()];
        v.read_at(&mut back, 4096 * 3).unwrap();
        assert_eq!(back, data, "{p:?} after reopen");
        let mut h = [0u8; 5];
        v.read_at(&mut h, 100).unwrap();
        assert_eq!(&h, b"hello");
    }
}

/// Large raid1 writes go to both copies at once (`write_copies`). With one
/// copy's writes failing, a write still stands on the other, the failure is
/// counted against that device, scrub repairs the copy, and the repaired
/// copy alone then reads back the data. Once per side: the copy written on
/// the calling thread, and the one written on a helper thread.
#[test]
fn a_failed_copy_of_a_parallel_write_is_counted_and_repaired() {
    use chunkvol::jobs::scrub;
    for bad in 0..2usize {
        let devs = mkfs_mem(Profile::Raid1, 128 << 20);
        let pool = open_mem(&devs);
        let v = pool.create_volume("v", 32 << 20).unwrap();
        pool.flush().unwrap();
        devs[bad].fail_writes(0..u64::MAX);
        let data = pattern(9 + bad as u64, 4 << 20);
        v.write_at(&data, 0).unwrap();
        devs[bad].heal();
        pool.flush().unwrap();
        let errs: u64 = pool
            .device_stats()
            .iter()
            .filter(|d| d.devid == bad as u64 + 1)
            .map(|d| d.stats.write_errs)
            .sum();
        assert!(errs > 0, "copy {bad}: the failed writes are counted");
        let s = scrub::start(pool.fs(), scrub::ScrubOptions::default())
            .unwrap()
            .wait();
        assert!(s.counters.corrected_errors > 0, "copy {bad}: {s:?}");
        assert_eq!(s.counters.uncorrectable_errors, 0, "copy {bad}: {s:?}");
        devs[1 - bad].fail_reads(0..u64::MAX);
        let mut back = vec![0u8; data.len()];
        v.read_at(&mut back, 0).unwrap();
        assert!(back == data, "copy {bad} alone after the repair");
        devs[1 - bad].heal();
    }
}
