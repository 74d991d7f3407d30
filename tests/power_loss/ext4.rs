//! ext4 on the export (nbdfuse + loop) through power cuts: the kernel's own
//! journal commits become NBD flushes and FUA writes, so every file it
//! fsynced must come back, and e2fsck must be clean once the journal is
//! replayed.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use chunkvol::device::fault::Rng;

use crate::cutfs::CutFs;
use crate::serve_harness::{
    cv, fill_random, require_tools, run, run_ok, s, tool, KernelDisk, Server, TestDir, CMD_TIMEOUT,
};

const CUTS: u64 = 12;

/// Files written and fsynced in one round: name -> content seed and length.
type Synced = BTreeMap<String, (u64, usize)>;

fn file_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    let mut st = seed;
    fill_random(&mut b, &mut st);
    b
}

/// Writes files until told to stop or the disk fails; returns the fsynced ones.
fn workload(root: PathBuf, round: u64, seed: u64, stop: Arc<AtomicBool>) -> Synced {
    let mut rng = Rng::new(seed);
    let mut synced = Synced::new();
    let dir = root.join(format!("r{round}"));
    if fs::create_dir(&dir).is_err() {
        return synced;
    }
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let name = format!("r{round}/f{i:05}");
        let len = 1 + rng.below(256 << 10) as usize;
        let fseed = rng.next_u64();
        let sync = rng.below(2) == 0;
        let ok = (|| -> std::io::Result<()> {
            let mut f = File::create(root.join(&name))?;
            f.write_all(&file_bytes(fseed, len))?;
            if sync {
                f.sync_all()?;
                File::open(&dir)?.sync_all()?;
            }
            Ok(())
        })();
        match ok {
            Ok(()) if sync => {
                synced.insert(name, (fseed, len));
            }
            Ok(()) => {}
            Err(_) => break, // the server is gone
        }
        i += 1;
    }
    synced
}

/// Copies the export out, replays its journal, and requires a clean e2fsck
/// and every fsynced file intact.
/// Returns whether the journal needed a replay.
fn fsck_and_compare(dir: &TestDir, srv: &Server, synced: &Synced, cut: u64) -> bool {
    let img = dir.join("ext4.img");
    let _ = fs::remove_file(&img);
    run_ok(
        Command::new(tool("nbdcopy")).args([&srv.uri("disk0"), s(&img)]),
        CMD_TIMEOUT,
    );
    let replay = run(
        Command::new(tool("e2fsck")).args(["-E", "journal_only", "-y", s(&img)]),
        CMD_TIMEOUT,
    );
    assert!(
        replay.code <= 1,
        "journal replay after cut {cut}:\n{}",
        replay.text()
    );
    let o = run(
        Command::new(tool("e2fsck")).args(["-fn", s(&img)]),
        CMD_TIMEOUT,
    );
    assert_eq!(
        o.code,
        0,
        "e2fsck after cut {cut} and journal replay:\n{}",
        o.text()
    );
    let out = dir.join("rdump");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).unwrap();
    run_ok(
        Command::new(tool("debugfs")).args(["-R", &format!("rdump / {}", s(&out)), s(&img)]),
        CMD_TIMEOUT,
    );
    let mut lost = Vec::new();
    for (name, (seed, len)) in synced {
        match fs::read(out.join(name)) {
            Ok(b) if b == file_bytes(*seed, *len) => {}
            Ok(b) => lost.push(format!("{name}: {} bytes, differs", b.len())),
            Err(e) => lost.push(format!("{name}: {e}")),
        }
    }
    assert!(
        lost.is_empty(),
        "after cut {cut}, {} of {} fsynced files are lost or wrong:\n{}",
        lost.len(),
        synced.len(),
        lost[..lost.len().min(20)].join("\n")
    );
    replay.text().contains("recovering journal")
}

fn mount_ext4(dir: &TestDir, srv: &Server, fresh: bool) -> KernelDisk {
    let mut kd = KernelDisk::attach(dir, &srv.uri("disk0"));
    if fresh {
        run_ok(
            Command::new(tool("mkfs.ext4")).args(["-q", kd.dev()]),
            CMD_TIMEOUT,
        );
    }
    kd.mount();
    kd
}

#[test]
fn ext4_on_the_export_is_fsck_clean_after_power_cuts() {
    require_tools(&[
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "debugfs",
        "mount",
        "umount",
        "fusermount3",
        "nbdcopy",
    ]);
    let dir = TestDir::new("powercut-ext4");
    let fs = CutFs::mount(&dir.join("cutfs"), &dir.join("backing"));
    let devs: Vec<PathBuf> = (0..2).map(|i| fs.path(&format!("d{i}.img"))).collect();
    crate::serve_harness::make_pool_on(&devs, "192M", "128M");
    let mut rng = Rng::new(0xe474_0001);
    let mut srv = Server::start(&dir, &devs, 1);
    let mut kd = mount_ext4(&dir, &srv, true);
    let mut synced = Synced::new();
    let (mut replays, mut jobs) = (0, 0);
    for cut in 0..CUTS {
        let stop = Arc::new(AtomicBool::new(false));
        let (root, seed, st) = (kd.fs.clone(), rng.next_u64(), stop.clone());
        let h = thread::spawn(move || workload(root, cut, seed, st));
        jobs += crate::maybe_start_jobs(&srv, &mut rng);
        thread::sleep(Duration::from_millis(300 + rng.below(1500)));
        srv.kill9();
        stop.store(true, Ordering::Relaxed);
        synced.extend(h.join().expect("workload thread"));
        kd.detach(false);
        drop(kd);
        let keep = if rng.below(2) == 0 {
            0
        } else {
            rng.below(1001)
        };
        fs.fs.cut(keep, &mut || rng.next_u64());
        let o = cv(&[
            &["check", "--check-data-csum"][..],
            &devs.iter().map(|d| s(d)).collect::<Vec<_>>(),
        ]
        .concat());
        assert!(o.code == 0, "chunkvol check after cut {cut}:\n{}", o.text());
        srv.launch();
        replays += u64::from(fsck_and_compare(&dir, &srv, &synced, cut));
        kd = mount_ext4(&dir, &srv, false);
    }
    kd.detach(true);
    srv.stop();
    eprintln!(
        "ext4: {CUTS} cuts, {replays} needed a journal replay, {jobs} jobs started, \
         {} fsynced files verified, cutfs {:?}",
        synced.len(),
        fs.fs.stats()
    );
    assert!(synced.len() as u64 > CUTS, "too few files were fsynced");
    // A cut that never lands inside a journal transaction proves little.
    assert!(replays > 0, "no cut left ext4's journal to replay");
}
