//! Snapshots and clones through the library: content as of the snapshot,
//! clones that diverge, deletes that keep what others share and free the
//! rest, relocation of shared extents and tree blocks, and `check` with
//! exact reference counts after every step.

mod common;

use chunkvol::format::{Profile, SECTOR_BYTES};
use chunkvol::pool::check::check;
use chunkvol::Pool;
use common::*;

const VOL_BYTES: u64 = 16 << 20;

fn read_all(v: &chunkvol::Volume) -> Vec<u8> {
    let mut b = vec![0u8; v.size_bytes().unwrap() as usize];
    v.read_at(&mut b, 0).unwrap();
    b
}

fn assert_check(pool: &Pool, when: &str) {
    let r = check(pool, true).unwrap();
    assert!(r.ok(), "check {when}: {:#?}", r.problems);
}

/// Bytes used by data and metadata, as `usage` reports them.
fn used(pool: &Pool, ty: &str) -> u64 {
    pool.usage()
        .block_groups
        .iter()
        .filter(|b| b.bg_type == ty)
        .map(|b| b.used_bytes)
        .sum()
}

#[test]
fn snapshot_keeps_old_content_clone_diverges_source_delete_keeps_clone() {
    let devs = mkfs_mem(Profile::Raid1, 128 << 20);
    let pool = open_mem(&devs);
    let v = pool.create_volume("v", VOL_BYTES).unwrap();
    // Many extents, so the tree has several levels to share.
    let mut want = vec![0u8; VOL_BYTES as usize];
    for i in 0..600u64 {
        let d = pattern(i + 1, 8192);
        let at = i * 3 * 8192 % (VOL_BYTES - 8192);
        v.write_at(&d, at).unwrap();
        want[at as usize..at as usize + 8192].copy_from_slice(&d);
    }
    let snap = pool.snapshot_volume("v", "snap").unwrap();
    assert!(snap.read_only().unwrap());
    assert_check(&pool, "after the snapshot");
    let data_before = used(&pool, "data");
    // Overwrite, discard and write-zeroes the live volume.
    let mut live = want.clone();
    let d = pattern(1000, 1 << 20);
    v.write_at(&d, 1 << 20).unwrap();
    live[1 << 20..2 << 20].copy_from_slice(&d);
    v.discard(4 << 20, 2 << 20).unwrap();
    live[4 << 20..6 << 20].fill(0);
    v.write_zeroes(9 << 20, (1 << 20) + 4096).unwrap();
    live[9 << 20..(10 << 20) + 4096].fill(0);
    // A partial-sector write into a shared extent.
    v.write_at(b"tail", 3 * 8192 + 100).unwrap();
    live[3 * 8192 + 100..3 * 8192 + 104].copy_from_slice(b"tail");
    assert!(read_all(&snap) == want, "the snapshot changed");
    assert!(read_all(&v) == live, "the live volume");
    // The discarded range is still held by the snapshot: nothing came back.
    assert!(used(&pool, "data") >= data_before);
    assert!(snap.write_at(b"x", 0).is_err(), "a snapshot is read-only");
    assert_check(&pool, "after changing the source");

    let clone = pool.clone_volume("snap", "clone").unwrap();
    assert!(!clone.read_only().unwrap());
    let mut cl = want.clone();
    let d = pattern(2000, 3 * 4096);
    clone.write_at(&d, 5 * 4096).unwrap();
    cl[5 * 4096..8 * 4096].copy_from_slice(&d);
    clone.discard(12 << 20, 1 << 20).unwrap();
    cl[12 << 20..13 << 20].fill(0);
    assert!(read_all(&clone) == cl, "the clone");
    assert!(
        read_all(&snap) == want,
        "the snapshot after the clone's writes"
    );
    assert!(read_all(&v) == live, "the source after the clone's writes");

    pool.delete_volume("v").unwrap();
    pool.drop_deleted_volumes().unwrap();
    assert!(
        read_all(&clone) == cl,
        "the clone after the source's delete"
    );
    assert!(
        read_all(&snap) == want,
        "the snapshot after the source's delete"
    );
    assert_check(&pool, "after deleting the source");
    pool.close().unwrap();
    let pool = open_mem(&devs);
    assert!(
        read_all(&pool.volume("clone").unwrap()) == cl,
        "clone, reopened"
    );
    assert!(
        read_all(&pool.volume("snap").unwrap()) == want,
        "snapshot, reopened"
    );
    assert_check(&pool, "after reopen");
}

#[test]
fn deleting_every_volume_and_snapshot_gives_the_space_back() {
    let devs = mkfs_mem(Profile::Single, 128 << 20);
    let pool = open_mem(&devs);
    pool.flush().unwrap();
    let (data0, meta0) = (used(&pool, "data"), used(&pool, "metadata"));
    let v = pool.create_volume("v", VOL_BYTES).unwrap();
    for i in 0..300u64 {
        v.write_at(&pattern(i, 4096 * 3), i * 5 * 4096).unwrap();
    }
    pool.snapshot_volume("v", "s1").unwrap();
    v.write_at(&pattern(77, 1 << 20), 0).unwrap();
    pool.clone_volume("s1", "c1").unwrap();
    let c1 = pool.volume("c1").unwrap();
    c1.write_at(&pattern(78, 1 << 20), 2 << 20).unwrap();
    pool.snapshot_volume("c1", "s2").unwrap();
    c1.discard(0, VOL_BYTES).unwrap();
    assert_check(&pool, "before the deletes");
    for name in ["s1", "v", "c1", "s2"] {
        pool.delete_volume(name).unwrap();
        assert!(pool.volume(name).is_err(), "{name} is gone at once");
        assert_check(&pool, &format!("after deleting {name}, before the drop"));
    }
    assert_eq!(pool.usage().volumes_being_deleted, 4);
    assert_eq!(pool.drop_deleted_volumes().unwrap(), 4);
    assert_eq!(pool.usage().volumes_being_deleted, 0);
    pool.flush().unwrap();
    pool.flush().unwrap();
    assert_eq!(used(&pool, "data"), data0, "data bytes");
    assert_eq!(used(&pool, "metadata"), meta0, "metadata bytes");
    assert_check(&pool, "at the end");
}

#[test]
fn snapshots_of_snapshots_to_depth_24() {
    let devs = mkfs_mem(Profile::Dup, 128 << 20);
    let pool = open_mem(&devs);
    let v = pool.create_volume("d0", 4 << 20).unwrap();
    let mut models = vec![vec![0u8; 4 << 20]];
    let mut rng = chunkvol::device::fault::Rng::new(24);
    let mut name = "d0".to_string();
    for depth in 1..=24 {
        let cur = pool.volume(&name).unwrap();
        let mut m = models.last().unwrap().clone();
        for _ in 0..8 {
            let at = rng.below(1000) * SECTOR_BYTES;
            let d = pattern(rng.next_u64(), 4096 * (1 + rng.below(6) as usize));
            cur.write_at(&d, at).unwrap();
            m[at as usize..at as usize + d.len()].copy_from_slice(&d);
        }
        *models.last_mut().unwrap() = m.clone();
        let snap = format!("s{depth}");
        pool.snapshot_volume(&name, &snap).unwrap();
        name = format!("d{depth}");
        pool.clone_volume(&snap, &name).unwrap();
        models.push(m);
    }
    drop(v);
    for (depth, m) in models.iter().enumerate() {
        let got = read_all(&pool.volume(&format!("d{depth}")).unwrap());
        assert!(got == *m, "d{depth}");
    }
    // s{depth} was taken of d{depth-1} after its last write.
    for depth in 1..=24 {
        let got = read_all(&pool.volume(&format!("s{depth}")).unwrap());
        assert!(got == models[depth - 1], "s{depth}");
    }
    assert_check(&pool, "with 49 volumes sharing");
}

#[test]
fn relocation_moves_shared_extents_and_tree_blocks_once() {
    let devs = mkfs_mem(Profile::Raid1, 192 << 20);
    let pool = open_mem(&devs);
    let v = pool.create_volume("v", VOL_BYTES).unwrap();
    let mut want = vec![0u8; VOL_BYTES as usize];
    for i in 0..400u64 {
        let d = pattern(i + 9, 3 * 4096);
        let at = i * 7 * 4096 % (VOL_BYTES - 3 * 4096);
        v.write_at(&d, at).unwrap();
        want[at as usize..at as usize + d.len()].copy_from_slice(&d);
    }
    pool.snapshot_volume("v", "s").unwrap();
    let c = pool.clone_volume("s", "c").unwrap();
    let mut live = want.clone();
    let d = pattern(5, 1 << 20);
    v.write_at(&d, 2 << 20).unwrap();
    live[2 << 20..3 << 20].copy_from_slice(&d);
    c.discard(0, 1 << 20).unwrap();
    let mut cl = want.clone();
    cl[..1 << 20].fill(0);
    pool.flush().unwrap();
    let groups: Vec<(u64, String)> = pool
        .usage()
        .block_groups
        .iter()
        .filter(|b| b.used_bytes > 0 && b.bg_type != "system")
        .map(|b| (b.start, b.bg_type.clone()))
        .collect();
    assert!(groups.iter().any(|g| g.1 == "data") && groups.iter().any(|g| g.1 == "metadata"));
    for (start, ty) in &groups {
        let st = chunkvol::jobs::relocation::relocate_block_group(pool.fs(), *start, &|| false)
            .unwrap_or_else(|e| panic!("relocating {ty} group {start:#x}: {e}"));
        assert!(!st.vanished, "{ty} group {start:#x}");
        assert_check(&pool, &format!("after relocating {ty} group {start:#x}"));
    }
    assert!(read_all(&pool.volume("s").unwrap()) == want, "snapshot");
    assert!(read_all(&v) == live, "source");
    assert!(read_all(&c) == cl, "clone");
}

#[test]
fn scrub_names_every_volume_that_maps_a_bad_shared_sector() {
    use chunkvol::jobs::scrub::{self, ScrubOptions};
    let devs = mkfs_mem(Profile::Raid1, 128 << 20);
    let pool = open_mem(&devs);
    let v = pool.create_volume("v", VOL_BYTES).unwrap();
    v.write_at(&pattern(3, 64 << 10), 1 << 20).unwrap();
    pool.snapshot_volume("v", "s").unwrap();
    pool.clone_volume("s", "c").unwrap();
    // v overwrites its copy of the first sector: only s and c map the old.
    v.write_at(&pattern(4, 4096), 1 << 20).unwrap();
    pool.flush().unwrap();
    let extent = pool.data_extents().unwrap();
    let (logical, _) = extent
        .iter()
        .copied()
        .find(|&(_, l)| l == 64 << 10)
        .expect("the shared 64 KiB extent");
    // Both copies of its first two sectors rot.
    for (path, phys) in pool.sector_copies(logical).unwrap() {
        let d = devs
            .iter()
            .find(|d| chunkvol::device::BlockDevice::path(&***d) == path)
            .unwrap();
        d.corrupt(phys, &[0x5a; 8192]);
    }
    let run = scrub::start(pool.fs(), ScrubOptions::default()).unwrap();
    let st = run.wait();
    // Two sectors, each bad on both copies (each device counts its own).
    assert_eq!(st.counters.uncorrectable_errors, 4, "{st:?}");
    let errs = scrub::status(pool.fs(), true).unwrap().errors.unwrap();
    let mut named: Vec<(u64, Vec<String>, u64)> = errs
        .iter()
        .filter(|e| e.devid == 1)
        .map(|e| {
            let mut n: Vec<String> = e.referrers.iter().map(|r| r.volume.clone()).collect();
            n.sort();
            (e.logical, n, e.offset_bytes.unwrap())
        })
        .collect();
    named.sort();
    assert_eq!(
        named,
        vec![
            (logical, vec!["c".into(), "s".into()], 1 << 20),
            (
                logical + 4096,
                vec!["c".into(), "s".into(), "v".into()],
                (1 << 20) + 4096
            ),
        ]
    );
    assert!(
        errs[0].owners_text().contains(" byte offset "),
        "{:?}",
        errs[0]
    );
}

/// Power is cut at points through the background drop of a deleted volume
/// that shares blocks with a snapshot; after each cut the pool opens with
/// the deletion pending, finishes it, and every byte of the snapshot and
/// every count is right.
#[test]
fn a_power_cut_during_a_background_delete_resumes_it() {
    use chunkvol::device::fault::{CrashMode, Rng};
    use chunkvol::util::sync::{Arc, AtomicI64};
    let devs = mkfs_mem(Profile::Dup, 160 << 20);
    let pool = open_mem(&devs);
    pool.flush().unwrap();
    let (data0, meta0) = (used(&pool, "data"), used(&pool, "metadata"));
    let v = pool.create_volume("v", 64 << 20).unwrap();
    for i in 0..3000u64 {
        v.write_at(&pattern(i, 4096), i * 2 * 4096).unwrap();
    }
    let s = pool.snapshot_volume("v", "s").unwrap();
    let want = read_all(&s);
    for i in 0..1000u64 {
        v.write_at(&pattern(i + 5000, 4096), i * 6 * 4096 + 4096)
            .unwrap();
    }
    drop((v, s));
    pool.delete_volume("v").unwrap();
    pool.close().unwrap();
    let base = crash(&devs, CrashMode::DropAll, &mut Rng::new(1));
    // How many writes the whole drop takes.
    let probe = crash(&base, CrashMode::DropAll, &mut Rng::new(1));
    let pool = open_mem(&probe);
    let before: u64 = probe.iter().map(|d| d.writes_total()).sum();
    assert_eq!(pool.drop_deleted_volumes().unwrap(), 1);
    let total: u64 = probe.iter().map(|d| d.writes_total()).sum::<u64>() - before;
    drop(pool);
    assert!(
        total > 20,
        "the drop took {total} writes: too few to cut inside"
    );
    let mut rng = Rng::new(7);
    for step in 1..6u64 {
        let devs = crash(&base, CrashMode::DropAll, &mut Rng::new(1));
        let pool = open_mem(&devs);
        let power = Arc::new(AtomicI64::new((total * step / 6) as i64));
        for d in &devs {
            d.set_power_budget(power.clone());
        }
        assert!(
            pool.drop_deleted_volumes().is_err(),
            "cut {step}: the drop finished"
        );
        drop(pool);
        let after = crash(&devs, CrashMode::Torn, &mut rng);
        let pool = open_mem(&after);
        assert_eq!(pool.usage().volumes_being_deleted, 1, "cut {step}");
        assert_check(&pool, &format!("after cut {step}, drop pending"));
        assert_eq!(pool.drop_deleted_volumes().unwrap(), 1);
        assert!(
            read_all(&pool.volume("s").unwrap()) == want,
            "cut {step}: snapshot"
        );
        pool.delete_volume("s").unwrap();
        pool.drop_deleted_volumes().unwrap();
        pool.flush().unwrap();
        pool.flush().unwrap();
        assert_eq!(used(&pool, "data"), data0, "cut {step}: data bytes");
        assert_eq!(used(&pool, "metadata"), meta0, "cut {step}: metadata bytes");
        assert_check(&pool, &format!("after cut {step}, all dropped"));
    }
}

/// `volume diff` against a model of which data each sector maps: random
/// aligned writes, discards and write-zeroes before and after a snapshot,
/// on a volume and on a clone; the diff lists exactly the sectors whose
/// mapping changed, and only reads what changed.
#[test]
fn volume_diff_matches_a_model_of_changed_sectors() {
    let devs = mkfs_mem(Profile::Single, 192 << 20);
    let pool = open_mem(&devs);
    let sectors = 4096usize; // 16 MiB
    let v = pool.create_volume("v", sectors as u64 * 4096).unwrap();
    let mut rng = chunkvol::device::fault::Rng::new(0x14);
    // Which write (op number) each sector maps, or None for a hole.
    let mut model: Vec<Option<u64>> = vec![None; sectors];
    let mut op = 0u64;
    let mut step = |vol: &chunkvol::Volume,
                    m: &mut Vec<Option<u64>>,
                    rng: &mut chunkvol::device::fault::Rng| {
        op += 1;
        let a = rng.below(sectors as u64 - 1);
        let n = 1 + rng.below(64.min(sectors as u64 - a));
        let (off, len) = (a * 4096, n * 4096);
        match rng.below(4) {
            0 => {
                vol.discard(off, len).unwrap();
                m[a as usize..(a + n) as usize].fill(None);
            }
            1 => {
                vol.write_zeroes(off, len).unwrap();
                m[a as usize..(a + n) as usize].fill(None);
            }
            _ => {
                vol.write_at(&pattern(op, len as usize), off).unwrap();
                m[a as usize..(a + n) as usize].fill(Some(op));
            }
        }
    };
    for _ in 0..400 {
        step(&v, &mut model, &mut rng);
    }
    pool.snapshot_volume("v", "s").unwrap();
    let at_snap = model.clone();
    let want = |a: &[Option<u64>], b: &[Option<u64>]| -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for i in 0..sectors {
            if a[i] != b[i] {
                let o = i as u64 * 4096;
                match out.last_mut() {
                    Some((s, l)) if *s + *l == o => *l += 4096,
                    _ => out.push((o, 4096)),
                }
            }
        }
        out
    };
    assert_eq!(pool.volume_diff("s", "v").unwrap(), vec![]);
    for round in 0..4 {
        for _ in 0..30 {
            step(&v, &mut model, &mut rng);
        }
        // Rewriting a hole with zeroes changes nothing.
        assert_eq!(
            pool.volume_diff("s", "v").unwrap(),
            want(&at_snap, &model),
            "round {round}"
        );
        assert_eq!(
            pool.volume_diff("v", "s").unwrap(),
            want(&model, &at_snap),
            "round {round}, reversed"
        );
    }
    // A clone of the snapshot against the snapshot.
    let c = pool.clone_volume("s", "c").unwrap();
    let mut cm = at_snap.clone();
    for _ in 0..50 {
        step(&c, &mut cm, &mut rng);
    }
    assert_eq!(pool.volume_diff("s", "c").unwrap(), want(&at_snap, &cm));
    pool.flush().unwrap();
    assert_eq!(
        pool.volume_diff("s", "c").unwrap(),
        want(&at_snap, &cm),
        "after a commit"
    );
}

/// `volume list` accounting: referenced (allocated) and exclusive bytes of
/// a volume, its snapshot and a clone; the overcommit figures of `usage`.
#[test]
fn referenced_and_exclusive_bytes() {
    let devs = mkfs_mem(Profile::Single, 128 << 20);
    let pool = open_mem(&devs);
    let v = pool.create_volume("v", 8 << 20).unwrap();
    v.write_at(&pattern(1, 4 << 20), 0).unwrap();
    pool.flush().unwrap();
    let list = |pool: &Pool| -> Vec<(String, u64, u64)> {
        pool.list_volumes()
            .unwrap()
            .into_iter()
            .map(|v| (v.name, v.allocated_bytes, v.exclusive_bytes))
            .collect()
    };
    assert_eq!(list(&pool), [("v".into(), 4 << 20, 4 << 20)]);
    pool.snapshot_volume("v", "s").unwrap();
    // Everything is shared: nothing is either's alone.
    assert_eq!(
        list(&pool),
        [("s".into(), 4 << 20, 0), ("v".into(), 4 << 20, 0)]
    );
    v.write_at(&pattern(2, 1 << 20), 0).unwrap();
    pool.clone_volume("s", "c").unwrap();
    pool.volume("c").unwrap().discard(3 << 20, 1 << 20).unwrap();
    pool.flush().unwrap();
    let l = list(&pool);
    // v: its new MiB; s: nothing alone (c and v share the rest with it);
    // c: nothing alone. Referenced: what each maps.
    assert_eq!(
        l,
        [
            ("c".into(), 3 << 20, 0),
            ("s".into(), 4 << 20, 0),
            ("v".into(), 4 << 20, 1 << 20)
        ],
        "{l:?}"
    );
    let u = pool.usage();
    // Writable: v and c, 8 MiB each, plus the 5 MiB in use.
    assert_eq!(u.data_worst_case_bytes, (5 << 20) + (16 << 20));
    assert!(u.data_capacity_bytes > u.data_worst_case_bytes, "{u:?}");
    pool.create_volume("huge", 1 << 40).unwrap();
    let u = pool.usage();
    assert!(u.data_worst_case_bytes > u.data_capacity_bytes, "{u:?}");
}

/// Device replace under a volume, its snapshot and a clone sharing their
/// extents and tree blocks: every byte of each stays, counts stay exact.
#[test]
fn replace_keeps_every_snapshot_and_clone() {
    use chunkvol::device::fault::FaultyDevice;
    use chunkvol::device::BlockDevice;
    use chunkvol::jobs::dev_replace::{self, State};
    use chunkvol::util::sync::Arc;
    let devs = mkfs_mem(Profile::Raid1, 128 << 20);
    let pool = open_mem(&devs);
    let v = pool.create_volume("v", VOL_BYTES).unwrap();
    v.write_at(&pattern(31, 6 << 20), 0).unwrap();
    pool.snapshot_volume("v", "s").unwrap();
    v.write_at(&pattern(32, 1 << 20), 2 << 20).unwrap();
    let c = pool.clone_volume("s", "c").unwrap();
    c.discard(0, 1 << 20).unwrap();
    let want: Vec<(String, Vec<u8>)> = ["v", "s", "c"]
        .iter()
        .map(|n| (n.to_string(), read_all(&pool.volume(n).unwrap())))
        .collect();
    let new: Arc<dyn BlockDevice> = Arc::new(FaultyDevice::new("/mem/new", 128 << 20));
    let run = dev_replace::start(pool.fs(), 2, new.clone(), true).unwrap();
    let st = run.wait();
    assert_eq!(st.state, State::Finished, "{st:?}");
    for (n, w) in &want {
        assert!(
            read_all(&pool.volume(n).unwrap()) == *w,
            "{n} after the replace"
        );
    }
    pool.close().unwrap();
    let pool = Pool::open(vec![devs[0].clone() as Arc<dyn BlockDevice>, new]).unwrap();
    for (n, w) in &want {
        assert!(
            read_all(&pool.volume(n).unwrap()) == *w,
            "{n} reopened on the new device"
        );
    }
    assert_check(&pool, "after the replace");
}
