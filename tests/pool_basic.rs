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
