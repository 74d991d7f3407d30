//! A format-1 pool (tests/fixtures/v1-pool.tar.gz, made by a build before
//! per-volume trees; tests/fixtures/make-v1-pool.sh) opens, is converted to
//! per-volume trees, keeps every byte and property of every volume, and
//! passes check; a power cut at any point of the conversion loses nothing.

mod common;

use std::path::{Path, PathBuf};

use chunkvol::device::fault::{CrashMode, FaultyDevice, Rng};
use chunkvol::device::read_supers;
use chunkvol::format::INCOMPAT_VOLUME_TREES;
use chunkvol::pool::check::check;
use chunkvol::pool::Pool;
use chunkvol::util::sync::{Arc, AtomicI64};
use common::*;
use sha2::{Digest, Sha256};

const DEVICE_BYTES: u64 = 96 << 20;

/// The fixture's device images, unpacked into a fresh directory.
fn unpack(name: &str) -> (PathBuf, Vec<PathBuf>) {
    let dir =
        std::env::temp_dir().join(format!("chunkvol-migration-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-pool.tar.gz");
    let st = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(&dir)
        .status()
        .expect("tar runs");
    assert!(st.success(), "tar -xzf {}", fixture.display());
    let devs = vec![dir.join("d1.img"), dir.join("d2.img")];
    (dir, devs)
}

/// What volume "vm" holds: 8 MiB written, every third sector a hole.
fn vm_content() -> Vec<u8> {
    let mut v = vec![0u8; 64 << 20];
    for i in 0..2048usize {
        if i % 3 != 0 {
            let d = Sha256::digest(format!("chunkvol-v1-{i}").as_bytes());
            for c in v[i * 4096..(i + 1) * 4096].chunks_mut(32) {
                c.copy_from_slice(&d);
            }
        }
    }
    v
}

fn read_all(pool: &Pool, name: &str) -> Vec<u8> {
    let v = pool.volume(name).unwrap();
    let mut buf = vec![0u8; v.size_bytes().unwrap() as usize];
    v.read_at(&mut buf, 0).unwrap();
    buf
}

/// Every volume as the fixture made it, and check (with data) clean.
fn assert_fixture_content(pool: &Pool, vm: &[u8]) {
    let mut names = pool.volume_names();
    names.sort();
    assert_eq!(names, ["empty", "small", "vm"]);
    assert!(read_all(pool, "vm") == vm, "volume vm differs");
    let small: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    assert!(read_all(pool, "small") == small, "volume small differs");
    assert_eq!(read_all(pool, "empty"), vec![0u8; 16 << 20]);
    assert!(pool.volume("small").unwrap().read_only().unwrap());
    assert!(!pool.volume("vm").unwrap().read_only().unwrap());
    let blocks = pool.tree_blocks().unwrap();
    let mappings = pool
        .volume("vm")
        .unwrap()
        .block_status(0, 64 << 20)
        .unwrap();
    assert_eq!(
        mappings.iter().filter(|e| e.allocated).count(),
        683,
        "vm's allocated runs (two of every three sectors)"
    );
    let r = check(pool, true).unwrap();
    assert!(r.ok(), "check: {:?}", r.problems);
    assert!(r.sectors_verified > 0);
    // Each volume's mappings live in a tree of its own.
    let ids: Vec<u64> = ["vm", "small", "empty"]
        .iter()
        .map(|n| pool.volume(n).unwrap().id())
        .collect();
    for id in ids {
        assert!(
            blocks.iter().any(|&(_, owner, _)| owner == id),
            "volume id {id} has no tree block"
        );
    }
}

#[test]
fn a_format_1_pool_is_converted_and_keeps_every_byte() {
    let (dir, devs) = unpack("convert");
    let flags = |p: &Path| {
        let d = chunkvol::device::FileDevice::open(p).unwrap();
        read_supers(&d).unwrap()[0].incompat_flags
    };
    assert_eq!(flags(&devs[0]), 0, "the fixture is format 1");
    let vm = vm_content();
    let pool = Pool::open_paths(&devs).unwrap();
    assert_fixture_content(&pool, &vm);
    // The converted pool takes writes to every volume.
    let v = pool.volume("vm").unwrap();
    v.write_at(&pattern(9, 1 << 20), 3 << 20).unwrap();
    pool.create_volume("new", 8 << 20)
        .unwrap()
        .write_at(&pattern(10, 8192), 0)
        .unwrap();
    drop(v);
    pool.close().unwrap();
    for d in &devs {
        assert_eq!(flags(d), INCOMPAT_VOLUME_TREES, "{}", d.display());
    }
    let pool = Pool::open_paths(&devs).unwrap();
    let mut want = vm.clone();
    want[3 << 20..4 << 20].copy_from_slice(&pattern(9, 1 << 20));
    assert!(read_all(&pool, "vm") == want, "vm after reopen");
    assert_eq!(read_all(&pool, "new")[..8192], pattern(10, 8192)[..]);
    let r = check(&pool, false).unwrap();
    assert!(r.ok(), "check after reopen: {:?}", r.problems);
    pool.close().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Power is cut after `budget` writes of the conversion; what survives is
/// dropped or kept at random. The next open finishes the conversion.
#[test]
fn a_power_cut_during_conversion_loses_nothing() {
    let (dir, paths) = unpack("crash");
    let images: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    std::fs::remove_dir_all(dir).unwrap();
    let vm = vm_content();
    let fresh = || -> Vec<Arc<FaultyDevice>> {
        images
            .iter()
            .zip(&paths)
            .map(|(img, p)| {
                let d = FaultyDevice::new(p.clone(), DEVICE_BYTES);
                // Only the written parts: zero pages stay unbacked.
                for (i, c) in img.chunks(64 << 10).enumerate() {
                    if c.iter().any(|&b| b != 0) {
                        d.corrupt((i << 16) as u64, c);
                    }
                }
                Arc::new(d)
            })
            .collect()
    };
    // How many writes a whole conversion takes.
    let devs = fresh();
    let base_gen = read_supers(devs[0].as_ref()).unwrap()[0].generation;
    open_mem(&devs).close().unwrap();
    let total: u64 = devs.iter().map(|d| d.writes_total()).sum();
    assert!(total > 8, "conversion wrote {total} blocks");
    let mut rng = Rng::new(0x5eed);
    let mut converted_midway = 0;
    for step in 0..6u64 {
        let budget = 1 + (total - 1) * step / 5;
        let devs = fresh();
        let power = Arc::new(AtomicI64::new(budget as i64));
        for d in &devs {
            d.set_power_budget(power.clone());
        }
        let r = Pool::open(as_block(&devs));
        if let Ok(p) = r {
            // The whole conversion fitted the budget.
            let _ = p.close();
        }
        let mode = if step % 2 == 0 {
            CrashMode::DropAll
        } else {
            CrashMode::Torn
        };
        let after = crash(&devs, mode, &mut rng);
        let sb = &read_supers(after[0].as_ref()).unwrap()[0];
        if sb.incompat_flags == 0 && sb.generation > base_gen {
            converted_midway += 1;
        }
        let pool = open_mem(&after);
        assert_fixture_content(&pool, &vm);
        pool.close().unwrap();
    }
    assert!(converted_midway > 0, "no cut fell inside the conversion");
}
