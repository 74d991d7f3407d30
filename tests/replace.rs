//! Device replace as a user with a failing disk meets it: sectors with no
//! good copy are counted and named, not fatal; the new device takes the old
//! one's devid; a canceled replace takes the new device out again so that it
//! can be used for the next attempt.

mod common;
mod serve_harness;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chunkvol::device::fault::FaultyDevice;
use chunkvol::device::BlockDevice;
use chunkvol::format::Profile;
use chunkvol::jobs::dev_replace::{self, State};
use chunkvol::util::failpoint::{self, Action};
use chunkvol::Pool;
use serde_json::Value;
use serve_harness::{
    cmp_files, cv, cv_json, cv_ok, make_pool, offline_check, s, write_random_file, Server, TestDir,
};

const SECTOR: u64 = 4096;
const DATA_BYTES: usize = 48 << 20;

/// Failpoints are process-wide: one failpoint test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    let g = L.lock().unwrap_or_else(|e| e.into_inner());
    failpoint::reset();
    g
}

fn with_devs<'a>(head: &[&'a str], devs: &'a [PathBuf]) -> Vec<&'a str> {
    let mut v = head.to_vec();
    v.extend(devs.iter().map(|d| s(d)));
    v
}

/// Flip bytes of `len` bytes at `phys` of a device file.
fn corrupt(path: &std::path::Path, phys: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = vec![0u8; SECTOR as usize];
    f.read_exact_at(&mut b, phys).unwrap();
    for x in b.iter_mut().step_by(61) {
        *x ^= 0x5a;
    }
    f.write_all_at(&b, phys).unwrap();
}

/// Corrupt `n` data sectors on every copy; returns their logical addresses.
fn ruin_sectors(devs: &[PathBuf], n: usize) -> BTreeSet<u64> {
    let pool = Pool::open_paths(devs).unwrap();
    let ext = pool.data_extents().unwrap();
    let mut bad = BTreeSet::new();
    let mut plan = Vec::new();
    // Spread over the extents: first, middle and last.
    for i in 0..n {
        let (start, len) = ext[i * (ext.len() - 1) / (n - 1).max(1)];
        let lg = start + (len / SECTOR / 2) * SECTOR;
        bad.insert(lg);
        let copies = pool.sector_copies(lg).unwrap();
        assert_eq!(copies.len(), 2, "raid1: two copies of {lg:#x}");
        plan.extend(copies);
    }
    pool.close().unwrap();
    for (p, phys) in plan {
        corrupt(&p, phys);
    }
    bad
}

/// raid1 with sectors bad on both copies: `device replace -B` finishes with
/// exit 3, names each bad sector's volume and LBA, the new device takes the
/// source's devid, the source leaves; reads of the bad LBAs fail and every
/// other byte reads back.
#[test]
fn replace_finishes_past_sectors_with_no_good_copy() {
    let dir = TestDir::new("replace-bad");
    let devs = make_pool(&dir, "256M", "128M");
    let input = dir.join("in.bin");
    std::fs::write(&input, common::pattern(11, DATA_BYTES)).unwrap();
    cv_ok(&with_devs(&["volume", "import", "disk0", s(&input)], &devs));
    let bad = ruin_sectors(&devs, 3);
    let new = dir.join("c.img");
    std::fs::File::create(&new)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let o = cv(&with_devs(
        &[
            "device",
            "replace",
            "start",
            s(&devs[1]),
            s(&new),
            "-B",
            "--json",
        ],
        &devs,
    ));
    assert_eq!(o.code, 3, "uncorrectable sectors: exit 3\n{}", o.text());
    let st: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(st["state"], "finished", "{st}");
    assert_eq!(st["uncorrectable_errors"], bad.len() as u64, "{st}");
    assert_eq!(st["src_devid"], 2, "{st}");
    assert_eq!(st["target_devid"], 2, "the new device takes devid 2: {st}");
    let log = st["errors"].as_array().expect("errors");
    let logged: BTreeSet<u64> = log.iter().map(|e| e["logical"].as_u64().unwrap()).collect();
    assert_eq!(logged, bad, "{st}");
    let mut lbas = BTreeSet::new();
    for e in log {
        assert_eq!(e["volume"], "disk0", "{e}");
        assert_eq!(e["repaired"], false, "{e}");
        lbas.insert(e["offset_bytes"].as_u64().expect("offset_bytes"));
    }
    // The text form names them too.
    let members = vec![devs[0].clone(), new.clone()];
    let u = cv_json(&with_devs(&["usage", "--json"], &members));
    let ids: Vec<(u64, String)> = u["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["devid"].as_u64().unwrap(),
                d["path"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        ids,
        vec![(1, s(&devs[0]).to_string()), (2, s(&new).to_string())],
        "{u}"
    );
    assert!(
        !chunkvol::pool::is_pool_device(&devs[1]),
        "the old device no longer looks like a member"
    );
    let o = offline_check(&members, false);
    assert!(o.stdout.contains("no problems found"), "{}", o.text());
    // Reads: the bad LBAs fail, everything else is the data.
    let pool = Pool::open_paths(&members).unwrap();
    let vol = pool.volume("disk0").unwrap();
    let want = common::pattern(11, DATA_BYTES);
    let mut buf = vec![0u8; SECTOR as usize];
    for lba in (0..DATA_BYTES as u64).step_by(SECTOR as usize) {
        let r = vol.read_at(&mut buf, lba);
        if lbas.contains(&lba) {
            assert!(r.is_err(), "LBA {lba} has no good copy, yet read back");
        } else {
            r.unwrap_or_else(|e| panic!("LBA {lba}: {e}"));
            let i = lba as usize;
            assert!(buf == want[i..i + SECTOR as usize], "LBA {lba} differs");
        }
    }
}

/// A replace of devid 2, paused before copying the middle one of its
/// chunks (some groups switched, some not), in a raid1 pool of two 192 MiB
/// devices holding 100 MiB of `pattern(seed)` in volume "v".
struct Paused {
    devs: Vec<std::sync::Arc<FaultyDevice>>,
    pool: Pool,
    data: Vec<u8>,
    new: std::sync::Arc<FaultyDevice>,
    run: std::sync::Arc<dev_replace::ReplaceRun>,
}

/// [`Paused`], the new device called `name`.
fn replace_paused_in_the_middle(seed: u64, name: &str) -> Paused {
    let devs = common::mkfs_mem(Profile::Raid1, 192 << 20);
    let pool = common::open_mem(&devs);
    let vol = pool.create_volume("v", 128 << 20).unwrap();
    let data = common::pattern(seed, 100 << 20);
    vol.write_at(&data, 0).unwrap();
    pool.flush().unwrap();
    let fs = pool.fs();
    let chunks = chunkvol::jobs::devices::chunks_on(fs, 2);
    assert!(chunks.len() >= 3, "several chunks on devid 2: {chunks:x?}");
    let middle = chunks[chunks.len() / 2];
    let new = std::sync::Arc::new(FaultyDevice::new(name, 192 << 20));
    failpoint::set("replace::before_copy", Action::PauseIf(middle));
    let run = dev_replace::start(fs, 2, new.clone(), false).unwrap();
    assert!(
        failpoint::wait_paused("replace::before_copy", Duration::from_secs(30)),
        "the replace never reached the middle chunk"
    );
    Paused {
        devs,
        pool,
        data,
        new,
        run,
    }
}

/// A replace canceled after some groups were switched to the new device:
/// they move back, the new device leaves the pool, and a second replace
/// onto the same device finishes, the new device taking the source's devid.
#[test]
fn canceled_replace_takes_the_new_device_out_and_it_can_be_reused() {
    let _g = serial();
    // Cancel takes effect after the current group: pause in the middle.
    let Paused {
        devs,
        pool,
        data,
        new,
        run,
    } = replace_paused_in_the_middle(5, "/mem/new");
    let fs = pool.fs();
    let vol = pool.volume("v").unwrap();
    let moved = chunkvol::jobs::devices::chunks_on(fs, 3);
    assert!(
        !moved.is_empty(),
        "some chunks were switched before the cancel"
    );
    dev_replace::cancel(fs).unwrap();
    failpoint::release("replace::before_copy");
    let st = run.wait();
    assert_eq!(st.state, State::Canceled, "{st:?}");
    assert!(st.target_left, "{st:?}");
    let ids: Vec<u64> = fs.devices().iter().map(|d| d.devid).collect();
    assert_eq!(ids, vec![1, 2], "the new device left");
    assert!(chunkvol::device::read_supers(new.as_ref()).is_err());
    let mut back = vec![0u8; data.len()];
    vol.read_at(&mut back, 0).unwrap();
    assert!(back == data, "data changed by the canceled replace");

    // The same device again, to the end.
    let run = dev_replace::start(fs, 2, new.clone(), true).unwrap();
    let st = run.wait();
    assert_eq!(st.state, State::Finished, "{st:?}");
    assert_eq!(st.target_devid, 2, "{st:?}");
    let members: Vec<(u64, String)> = fs
        .devices()
        .iter()
        .map(|d| (d.devid, d.dev.path().display().to_string()))
        .collect();
    assert_eq!(
        members,
        vec![(1, "/mem/dev1".to_string()), (2, "/mem/new".to_string())]
    );
    vol.write_at(&common::pattern(6, 1 << 20), 0).unwrap();
    pool.close().unwrap();
    let pool = Pool::open(vec![
        devs[0].clone() as std::sync::Arc<dyn BlockDevice>,
        new.clone(),
    ])
    .unwrap();
    let r = chunkvol::pool::check::check(&pool, true).unwrap();
    assert!(r.ok(), "{:#?}", r.problems);
    let vol = pool.volume("v").unwrap();
    vol.read_at(&mut back, 0).unwrap();
    assert!(back[..1 << 20] == common::pattern(6, 1 << 20)[..]);
    assert!(back[1 << 20..] == data[1 << 20..]);
}

fn replace_status(srv: &Server) -> Value {
    cv_json(&[
        "device",
        "replace",
        "status",
        "--json",
        "--socket",
        srv.sock(),
    ])
}

/// kill -9 in the middle of a replace of 1 GiB of data: the restarted
/// server continues it on its own, without copying again the groups that
/// were switched before the crash, and the data is identical.
#[test]
fn replace_interrupted_by_a_crash_resumes_where_it_stopped() {
    let dir = TestDir::new("replace-crash");
    let devs = make_pool(&dir, "1536M", "1100M");
    let input = dir.join("in.bin");
    let data_bytes: u64 = 1 << 30;
    write_random_file(&input, data_bytes, 77);
    cv_ok(&with_devs(&["volume", "import", "disk0", s(&input)], &devs));
    let new = dir.join("c.img");
    std::fs::File::create(&new)
        .unwrap()
        .set_len(1536 << 20)
        .unwrap();
    let mut srv = Server::start(&dir, &devs, 1);
    cv_ok(&[
        "device",
        "replace",
        "start",
        s(&devs[1]),
        s(&new),
        "--socket",
        srv.sock(),
    ]);
    let end = std::time::Instant::now() + Duration::from_secs(300);
    let before = loop {
        let st = replace_status(&srv);
        assert_eq!(st["state"], "running", "finished before the crash: {st}");
        // Past the first data group (each is 1536 MiB x 2 / 10).
        if st["bytes_copied"].as_u64().unwrap() >= 400 << 20 {
            break st;
        }
        assert!(std::time::Instant::now() < end, "no group copied: {st}");
        std::thread::sleep(Duration::from_millis(20));
    };
    srv.kill9();
    let total = before["block_groups_total"].as_u64().unwrap();
    assert!(total >= 3, "several groups to copy: {before}");
    // The restarted server is given every member, the new device too.
    srv.devs.push(new.clone());
    srv.launch();
    let after = loop {
        let st = replace_status(&srv);
        if st["state"] != "running" {
            break st;
        }
        assert!(
            std::time::Instant::now() < end,
            "the resumed replace never ended: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(after["state"], "finished", "{after}\n{}", srv.log_tail());
    assert_eq!(
        after["block_groups_done"], after["block_groups_total"],
        "{after}"
    );
    assert_eq!(after["target_devid"], 2, "{after}");
    let copied = after["bytes_copied"].as_u64().unwrap();
    // At least one full data group was done before the crash.
    assert!(
        copied + (250 << 20) <= data_bytes,
        "the resumed replace copied {copied} bytes: groups were copied again\nbefore {before}\nafter {after}"
    );
    assert!(
        srv.log_tail()
            .contains("resumed the interrupted device replace"),
        "{}",
        srv.log_tail()
    );
    srv.stop();
    let members = vec![devs[0].clone(), new.clone()];
    let o = offline_check(&members, true);
    assert!(o.stdout.contains("no problems found"), "{}", o.text());
    let out = dir.join("out.bin");
    cv_ok(&with_devs(
        &["volume", "export", "disk0", s(&out)],
        &members,
    ));
    let f = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
    f.set_len(data_bytes).unwrap();
    cmp_files(&input, &out);
}

/// A pool of one device (data single, metadata dup) replaced by another:
/// every chunk lies wholly on the source, so the rename must rewrite chunks
/// none of whose stripes stay behind. The new device alone then opens it.
#[test]
fn replace_of_a_one_device_pool() {
    let _g = serial();
    let devs = common::mkfs_mem(Profile::Single, 128 << 20);
    let pool = common::open_mem(&devs);
    let vol = pool.create_volume("v", 64 << 20).unwrap();
    let data = common::pattern(21, 40 << 20);
    vol.write_at(&data, 0).unwrap();
    pool.flush().unwrap();
    let new = std::sync::Arc::new(FaultyDevice::new("/mem/new", 128 << 20));
    let st = dev_replace::start(pool.fs(), 1, new.clone(), true)
        .unwrap()
        .wait();
    assert_eq!(st.state, State::Finished, "{st:?}");
    assert_eq!(st.target_devid, 1, "{st:?}");
    pool.close().unwrap();
    let pool = Pool::open(vec![new as std::sync::Arc<dyn BlockDevice>]).unwrap();
    let r = chunkvol::pool::check::check(&pool, true).unwrap();
    assert!(r.ok(), "{:#?}", r.problems);
    let mut back = vec![0u8; data.len()];
    pool.volume("v").unwrap().read_at(&mut back, 0).unwrap();
    assert!(back == data);
}

/// Power lost inside the commit that renames the target: the other member
/// has the new superblocks, the target still carries its old devid in its
/// superblocks, and the replaced source's were never wiped. Opening with all
/// three works: the tree's device uuids say which device is devid 2, and the
/// old source is left out.
#[test]
fn open_after_a_crash_inside_the_rename_commit() {
    let _g = serial();
    let devs = common::mkfs_mem(Profile::Raid1, 128 << 20);
    let pool = common::open_mem(&devs);
    let vol = pool.create_volume("v", 64 << 20).unwrap();
    let data = common::pattern(33, 40 << 20);
    vol.write_at(&data, 0).unwrap();
    pool.flush().unwrap();
    let new = std::sync::Arc::new(FaultyDevice::new("/mem/new", 128 << 20));
    failpoint::set("devices::take_over", Action::Pause);
    let run = dev_replace::start(pool.fs(), 2, new.clone(), false).unwrap();
    assert!(failpoint::wait_paused(
        "devices::take_over",
        Duration::from_secs(30)
    ));
    let supers = |d: &FaultyDevice| -> Vec<(u64, Vec<u8>)> {
        let img = d.image();
        chunkvol::format::SUPER_OFFSETS
            .iter()
            .filter(|&&o| o as usize + 4096 <= img.len())
            .map(|&o| (o, img[o as usize..o as usize + 4096].to_vec()))
            .collect()
    };
    let (old_target, old_source) = (supers(&new), supers(&devs[1]));
    failpoint::release("devices::take_over");
    assert_eq!(run.wait().target_devid, 2);
    pool.close().unwrap();
    for (o, b) in &old_target {
        new.corrupt(*o, b);
    }
    for (o, b) in &old_source {
        devs[1].corrupt(*o, b);
    }
    assert_eq!(
        chunkvol::device::read_supers(new.as_ref()).unwrap()[0].devid,
        3
    );
    let pool = Pool::open(vec![
        devs[0].clone() as std::sync::Arc<dyn BlockDevice>,
        devs[1].clone(),
        new.clone(),
    ])
    .expect("opens after a crash inside the rename commit");
    let members: Vec<(u64, String)> = pool
        .fs()
        .devices()
        .iter()
        .map(|d| (d.devid, d.dev.path().display().to_string()))
        .collect();
    assert_eq!(
        members,
        vec![(1, "/mem/dev1".to_string()), (2, "/mem/new".to_string())]
    );
    let r = chunkvol::pool::check::check(&pool, true).unwrap();
    assert!(r.ok(), "{:#?}", r.problems);
    let mut back = vec![0u8; data.len()];
    pool.volume("v").unwrap().read_at(&mut back, 0).unwrap();
    assert!(back == data);
    pool.close().unwrap();
    assert_eq!(
        chunkvol::device::read_supers(new.as_ref()).unwrap()[0].devid,
        2
    );
}

/// An interrupted replace whose target was then removed cannot go on:
/// `resume` says so and records it failed, and a new replace may start
/// (the record no longer blocks it).
#[test]
fn an_interrupted_replace_without_its_target_does_not_block_a_new_one() {
    let _g = serial();
    let Paused {
        pool, data, run, ..
    } = replace_paused_in_the_middle(8, "/mem/first");
    let fs = pool.fs();
    let vol = pool.volume("v").unwrap();
    dev_replace::interrupt(fs).unwrap();
    failpoint::release("replace::before_copy");
    assert_eq!(run.wait().state, State::Interrupted);
    chunkvol::jobs::devices::remove(fs, 3).unwrap();
    let e = dev_replace::resume(fs, true).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("marked failed"), "{e}");
    assert_eq!(dev_replace::status(fs).unwrap().state, State::Failed);
    let second = std::sync::Arc::new(FaultyDevice::new("/mem/second", 192 << 20));
    let st = dev_replace::start(fs, 2, second, true).unwrap().wait();
    assert_eq!(st.state, State::Finished, "{st:?}");
    assert_eq!(st.target_devid, 2);
    let mut back = vec![0u8; data.len()];
    vol.read_at(&mut back, 0).unwrap();
    assert!(back == data);
}
