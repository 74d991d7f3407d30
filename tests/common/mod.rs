//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use chunkvol::device::fault::{CrashMode, FaultyDevice, Rng};
use chunkvol::device::BlockDevice;
use chunkvol::format::Profile;
use chunkvol::{MkfsOptions, Pool};

/// In-memory devices for a pool.
pub fn mem_devices(n: usize, size_bytes: u64) -> Vec<Arc<FaultyDevice>> {
    (0..n)
        .map(|i| Arc::new(FaultyDevice::new(format!("/mem/dev{}", i + 1), size_bytes)))
        .collect()
}

pub fn as_block(devs: &[Arc<FaultyDevice>]) -> Vec<Arc<dyn BlockDevice>> {
    devs.iter()
        .map(|d| d.clone() as Arc<dyn BlockDevice>)
        .collect()
}

/// Devices needed by a profile.
pub fn devices_for(p: Profile) -> usize {
    match p {
        Profile::Single | Profile::Dup => 1,
        Profile::Raid1 => 2,
        Profile::Raid1c3 => 3,
        Profile::Raid10 => 4,
    }
}

pub fn mkfs_mem(p: Profile, size_bytes: u64) -> Vec<Arc<FaultyDevice>> {
    let devs = mem_devices(devices_for(p), size_bytes);
    let opts = MkfsOptions {
        data: Some(p),
        metadata: Some(if p == Profile::Single {
            Profile::Dup
        } else {
            p
        }),
        node_bytes: 4096,
        ..Default::default()
    };
    Pool::mkfs(as_block(&devs), &opts).expect("mkfs");
    devs
}

pub fn open_mem(devs: &[Arc<FaultyDevice>]) -> Pool {
    Pool::open(as_block(devs)).expect("open")
}

/// Devices as a crash now would leave them.
pub fn crash(devs: &[Arc<FaultyDevice>], mode: CrashMode, rng: &mut Rng) -> Vec<Arc<FaultyDevice>> {
    devs.iter()
        .map(|d| {
            Arc::new(FaultyDevice::from_image(
                d.path().to_path_buf(),
                d.crash_image(mode, rng),
            ))
        })
        .collect()
}

/// Deterministic pattern bytes for (seed, offset).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let mut v = vec![0u8; len];
    r.fill(&mut v);
    v
}

/// Discard `[off, off + len)` of `vol` and zero what it frees in `model`:
/// whole sectors only, as the volume does (a partial sector at either end
/// keeps its bytes).
pub fn discard_with_model(
    vol: &chunkvol::Volume,
    model: &std::sync::Mutex<Vec<u8>>,
    off: u64,
    len: u64,
) {
    let s = chunkvol::format::SECTOR_BYTES;
    vol.discard(off, len)
        .unwrap_or_else(|e| panic!("discard {off}+{len}: {e}"));
    let (a, b) = (off.div_ceil(s) * s, (off + len) / s * s);
    if b > a {
        model.lock().unwrap()[a as usize..b as usize].fill(0);
    }
}

/// Write `data` at `off` in `vol` and in `model`.
pub fn write_with_model(
    vol: &chunkvol::Volume,
    model: &std::sync::Mutex<Vec<u8>>,
    off: u64,
    data: &[u8],
) {
    vol.write_at(data, off)
        .unwrap_or_else(|e| panic!("write {off}+{}: {e}", data.len()));
    model.lock().unwrap()[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// The end of a lifecycle run, outside it: no lost byte (`vol` equals
/// `model`), no leaked empty data group after a final cleaner pass (all but
/// the last of its type are deleted), and, reopened from `devs`, `check
/// --check-data-csum` clean. Consumes `pool`.
pub fn assert_lifecycle_end(
    seed: u64,
    pool: Pool,
    vol: &chunkvol::Volume,
    model: &std::sync::Mutex<Vec<u8>>,
    devs: &[Arc<dyn BlockDevice>],
) {
    let mut all = vec![0u8; model.lock().unwrap().len()];
    vol.read_at(&mut all, 0).unwrap();
    assert!(
        all == *model.lock().unwrap(),
        "seed {seed}: volume differs from the model"
    );
    pool.flush().unwrap();
    chunkvol::engine::block_group::delete_unused_bgs(pool.fs()).unwrap();
    pool.flush().unwrap();
    let u = pool.usage();
    let empty = u
        .block_groups
        .iter()
        .filter(|b| b.bg_type == "data" && b.used_bytes == 0)
        .count();
    assert!(
        empty <= 1,
        "seed {seed}: {empty} empty data groups leaked: {:?}",
        u.block_groups
    );
    pool.close().unwrap();
    let pool = Pool::open(devs.to_vec()).expect("reopen");
    let r = chunkvol::pool::check::check(&pool, true).unwrap();
    assert!(r.ok(), "seed {seed}: check: {:#?}", r.problems);
}
