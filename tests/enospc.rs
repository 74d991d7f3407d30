//! A full pool: writes fail with a clear ENOSPC, nothing already stored is
//! lost, the pool is not aborted, and freeing space makes writes work again.

mod common;

use chunkvol::format::Profile;
use common::*;

#[test]
fn full_pool_fails_cleanly_and_recovers() {
    let devs = mkfs_mem(Profile::Single, 64 << 20);
    let pool = open_mem(&devs);
    let vol = pool.create_volume("big", 1 << 30).unwrap();
    let chunk = 1 << 20;
    let mut written = 0u64;
    let err = loop {
        match vol.write_at(&pattern(written, chunk), written) {
            Ok(()) => written += chunk as u64,
            Err(e) => break e,
        }
        assert!(written < 1 << 30, "a 64 MiB pool took 1 GiB");
    };
    let msg = err.to_string();
    assert!(matches!(err, chunkvol::Error::NoSpace(_)), "{err:?}");
    assert!(msg.contains("no space left"), "{msg}");
    assert_eq!(err.to_io().raw_os_error(), Some(28), "NBD sees ENOSPC");
    assert!(!pool.fs().is_aborted(), "ENOSPC must not fail the pool");
    assert!(written >= 16 << 20, "only {written} bytes fit");
    // Everything written before the error reads back, also after reopen.
    pool.flush().unwrap();
    for i in (0..written).step_by(chunk) {
        let mut b = vec![0u8; chunk];
        vol.read_at(&mut b, i).unwrap();
        assert!(b == pattern(i, chunk), "data at {i} lost");
    }
    pool.close().unwrap();
    let pool = open_mem(&devs);
    let r = chunkvol::pool::check::check(&pool, true).unwrap();
    assert!(r.ok(), "{:#?}", r.problems);
    // Freeing space makes room again.
    let vol = pool.volume("big").unwrap();
    vol.discard(0, written / 2).unwrap();
    pool.flush().unwrap();
    vol.write_at(&pattern(7, 4 << 20), 0).unwrap();
    let mut b = vec![0u8; 4 << 20];
    vol.read_at(&mut b, 0).unwrap();
    assert!(b == pattern(7, 4 << 20));
    // Creating a volume still works (metadata has its reserve).
    pool.create_volume("small", 1 << 20).unwrap();
    pool.close().unwrap();
    let pool = open_mem(&devs);
    assert!(chunkvol::pool::check::check(&pool, true).unwrap().ok());
}
