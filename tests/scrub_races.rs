//! The race catalogue (docs/ARCHITECTURE.md, btrfs-model.md R1-R9), each
//! interleaving forced with failpoints. Each test names the rule it proves
//! and what goes wrong without it.

mod common;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chunkvol::device::fault::FaultyDevice;
use chunkvol::engine::block_group::delete_unused_bgs;
use chunkvol::engine::fs_info::FsInfo;
use chunkvol::engine::transaction::{commit, Ctx};
use chunkvol::format::{bg_type, Profile};
use chunkvol::jobs::scrub::{self, ScrubOptions, State};
use chunkvol::util::failpoint::{self, Action};
use chunkvol::Pool;
use common::*;

const T: Duration = Duration::from_secs(20);

/// Failpoints are process-wide: one race test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    let g = L.lock().unwrap_or_else(|e| e.into_inner());
    failpoint::reset();
    g
}

struct Setup {
    devs: Vec<Arc<FaultyDevice>>,
    pool: Pool,
}

impl Setup {
    fn fs(&self) -> &Arc<FsInfo> {
        self.pool.fs()
    }
}

fn setup() -> Setup {
    let devs = mkfs_mem(Profile::Raid1, 128 << 20);
    let pool = open_mem(&devs);
    let v = pool.create_volume("v", 64 << 20).unwrap();
    v.write_at(&pattern(1, 40 << 20), 0).unwrap();
    pool.flush().unwrap();
    Setup { devs, pool }
}

/// A new, empty data group (the last chunk), queued for the cleaner and committed.
fn empty_group(s: &Setup) -> u64 {
    let fs = s.fs();
    let start = {
        let mut st = chunkvol::util::sync::lock(&fs.trans);
        let mut ctx = Ctx::join(fs, &mut st);
        ctx.new_chunk(bg_type::DATA).unwrap().start
    };
    commit(fs).unwrap();
    let bg = fs.block_group(start).unwrap();
    assert!(bg.hand_back(fs), "an empty group goes to the cleaner");
    start
}

/// A new empty group, and a scrub of devid 1 paused at failpoint `fp` on it.
fn scrub_paused_on_empty_group(s: &Setup, fp: &str) -> (u64, Arc<scrub::ScrubRun>) {
    let x = empty_group(s);
    failpoint::set(fp, Action::PauseIf(x));
    let run = start_dev1(s, false);
    paused(fp);
    (x, run)
}

fn start_dev1(s: &Setup, readonly: bool) -> Arc<scrub::ScrubRun> {
    start_on(s.fs(), 1, readonly)
}

/// A scrub of one device.
fn start_on(fs: &Arc<FsInfo>, devid: u64, readonly: bool) -> Arc<scrub::ScrubRun> {
    scrub::start(fs, one_device(devid, readonly)).unwrap()
}

fn one_device(devid: u64, readonly: bool) -> ScrubOptions {
    ScrubOptions {
        readonly,
        devid: Some(devid),
        ..Default::default()
    }
}

fn paused(name: &str) {
    assert!(failpoint::wait_paused(name, T), "nobody reached {name}");
}

/// Corrupt copy 0 (devid 1) of one data sector; returns its logical address.
fn corrupt_one(s: &Setup) -> u64 {
    let (start, _) = s.pool.data_extents().unwrap()[0];
    let copies = s.pool.sector_copies(start).unwrap();
    let (path, phys) = &copies[0];
    let d = s
        .devs
        .iter()
        .find(|d| chunkvol::device::BlockDevice::path(d.as_ref()) == path)
        .unwrap();
    d.corrupt(*phys, &[0xEE; 4096]);
    start
}

/// R1, the seed: scrub read the group's device extent from the commit root;
/// the cleaner then deleted the group completely. Scrub must skip it quietly
/// and scrub the rest. Without the rule (a missing group or map treated as an
/// error) scrub fails with a spurious error, as btrfs did.
#[test]
fn r1_cleaner_deletes_group_after_scrub_found_its_dev_extent() {
    let _g = serial();
    let s = setup();
    let (x, run) = scrub_paused_on_empty_group(&s, "scrub::dev_extent_found");
    let pass = delete_unused_bgs(s.fs()).unwrap();
    assert_eq!(pass.deleted, 1, "{pass:?}");
    commit(s.fs()).unwrap();
    assert!(
        s.fs().mapping.get(x).is_none(),
        "map dropped: nobody froze it"
    );
    failpoint::release("scrub::dev_extent_found");
    let st = run.wait();
    assert_eq!(st.state, State::Finished, "{:?}", st.failure);
    assert_eq!(st.counters.errors(), 0);
    assert_eq!(st.counters.block_groups_skipped_removed, 1);
    assert!(
        st.counters.data_bytes_scrubbed >= 40 << 20,
        "the rest was scrubbed"
    );
}

/// R1 variant: the group is removed while scrub holds it frozen; its map
/// stays until scrub lets go, then is dropped (no leak, no error).
#[test]
fn r1_removed_while_frozen_is_quiet_and_map_dropped_on_release() {
    let _g = serial();
    let s = setup();
    let (x, run) = scrub_paused_on_empty_group(&s, "scrub::frozen");
    assert_eq!(delete_unused_bgs(s.fs()).unwrap().deleted, 1);
    assert!(
        s.fs().mapping.get(x).is_some(),
        "map drop deferred while frozen"
    );
    failpoint::release("scrub::frozen");
    let st = run.wait();
    assert_eq!(st.state, State::Finished, "{:?}", st.failure);
    assert_eq!(st.counters.errors(), 0);
    assert!(
        s.fs().mapping.get(x).is_none(),
        "unfreeze performs the deferred drop"
    );
}

/// R2: the chunk map is dropped from the mapping tree while scrub is using
/// it. Scrub holds its own reference and finishes the repair with it.
/// Without the reference (looking the map up again) the repair fails and the
/// bad copy stays bad.
#[test]
fn r2_map_dropped_while_scrub_uses_it() {
    let _g = serial();
    let s = setup();
    let logical = corrupt_one(&s);
    let x = s.fs().block_group(logical).unwrap().start;
    failpoint::set("scrub::before_repair", Action::PauseIf(x));
    let run = start_dev1(&s, false);
    paused("scrub::before_repair");
    let map = s.fs().mapping.remove(x).expect("map present");
    failpoint::release("scrub::before_repair");
    let st = run.wait();
    s.fs().mapping.insert(map.item.clone());
    assert_eq!(st.state, State::Finished, "{:?}", st.failure);
    assert_eq!(st.counters.csum_errors, 1);
    assert_eq!(st.counters.corrected_errors, 1, "repair used the held map");
    assert_eq!(st.counters.uncorrectable_errors, 0);
}

/// R3: the cleaner pops an empty group while scrub is working on it and
/// drops it from the list. Scrub must hand it back when it lets go, or the
/// group is never deleted (space leak).
#[test]
fn r3_scrub_requeues_group_the_cleaner_skipped() {
    let _g = serial();
    let s = setup();
    let (x, run) = scrub_paused_on_empty_group(&s, "scrub::group_frozen");
    let pass = delete_unused_bgs(s.fs()).unwrap();
    assert_eq!(
        pass.deleted, 0,
        "a group under scrub must be skipped: {pass:?}"
    );
    assert!(pass.skipped >= 1, "{pass:?}");
    assert!(!s.fs().unused_bgs.contains(x));
    failpoint::release("scrub::group_frozen");
    let st = run.wait();
    assert_eq!(st.counters.errors(), 0);
    assert!(s.fs().unused_bgs.contains(x), "re-queued on release");
    assert_eq!(delete_unused_bgs(s.fs()).unwrap().deleted, 1);
}

/// A new data group takes neither the logical range nor the device space of
/// the removed-but-frozen group whose map was `xmap` (R4).
fn assert_new_group_avoids(s: &Setup, xmap: &chunkvol::chunk::volumes::ChunkMap) {
    let y = {
        let mut st = chunkvol::util::sync::lock(&s.fs().trans);
        Ctx::join(s.fs(), &mut st).new_chunk(bg_type::DATA).unwrap()
    };
    assert!(
        y.start >= xmap.end(),
        "logical range of a frozen group reused"
    );
    let ymap = s.fs().mapping.get(y.start).unwrap();
    for a in &xmap.item.stripes {
        for b in &ymap.item.stripes {
            let overlap = a.devid == b.devid
                && a.physical < b.physical + ymap.item.stripe_bytes
                && b.physical < a.physical + xmap.item.stripe_bytes;
            assert!(!overlap, "device extent of a frozen group reused");
        }
    }
}

/// R4: the group is deleted while scrub is on it, and a new group is
/// allocated. The remover defers dropping the map (and the device extents)
/// while scrub has it frozen, so the new group cannot take its logical range
/// or physical space; without that, scrub would verify the new group's bytes
/// against the old group's view (false errors, or a "repair" over live data).
#[test]
fn r4_no_reuse_of_a_frozen_groups_range() {
    r4_remove_frozen_group(|s, _| {
        assert_eq!(delete_unused_bgs(s.fs()).unwrap().deleted, 1);
    });
}

/// The R4 interleaving with `remove` deleting empty group X while scrub has
/// it frozen: a new group must not take X's range, scrub must finish with no
/// errors, and X's map must be gone once scrub lets go.
fn r4_remove_frozen_group(remove: impl FnOnce(&Setup, u64)) {
    let _g = serial();
    let s = setup();
    let x = empty_group(&s);
    let xmap = s.fs().mapping.get(x).unwrap();
    failpoint::set("scrub::frozen", Action::PauseIf(x));
    let run = start_dev1(&s, false);
    paused("scrub::frozen");
    remove(&s, x);
    assert_new_group_avoids(&s, &xmap);
    failpoint::release("scrub::frozen");
    let st = run.wait();
    assert_eq!(st.counters.errors(), 0);
    assert!(s.fs().mapping.get(x).is_none(), "dropped on unfreeze");
}

/// R4, reuse detected: the group is deleted before scrub froze it and a new
/// group takes the same logical start (and likely the same device space).
/// Scrub must recognise the group as newer than its view and skip it.
#[test]
fn r4_reused_range_is_detected_and_skipped() {
    let _g = serial();
    let s = setup();
    let (x, run) = scrub_paused_on_empty_group(&s, "scrub::dev_extent_found");
    assert_eq!(delete_unused_bgs(s.fs()).unwrap().deleted, 1);
    let y = {
        let mut st = chunkvol::util::sync::lock(&s.fs().trans);
        Ctx::join(s.fs(), &mut st).new_chunk(bg_type::DATA).unwrap()
    };
    assert_eq!(y.start, x, "the new group reuses the range");
    let writes = s.devs[0].writes_total();
    failpoint::release("scrub::dev_extent_found");
    let st = run.wait();
    assert_eq!(st.counters.errors(), 0);
    assert_eq!(st.counters.block_groups_skipped_removed, 1);
    // Only the final progress commit writes; no repair touched the new group.
    assert_eq!(st.counters.corrected_errors, 0);
    assert!(s.devs[0].writes_total() >= writes);
}

/// R5: relocation deletes the group between verification and repair. The
/// repair uses the references it holds and, seeing the group removed, writes
/// nothing. Without the rule it would write into space that now belongs to
/// someone else.
#[test]
fn r5_repair_after_group_removed_writes_nothing() {
    let _g = serial();
    let s = setup();
    let logical = corrupt_one(&s);
    let bg = s.fs().block_group(logical).unwrap();
    failpoint::set("scrub::before_repair", Action::PauseIf(bg.start));
    let run = start_dev1(&s, false);
    paused("scrub::before_repair");
    {
        // What relocation does after moving the data: remove the chunk.
        let hold = bg.ro_hold(s.fs()).unwrap();
        let mut st = chunkvol::util::sync::lock(&s.fs().trans);
        let mut ctx = Ctx::join(s.fs(), &mut st);
        chunkvol::engine::block_group::remove_block_group(&mut ctx, &hold).unwrap();
    }
    let before = s.devs[0].image();
    failpoint::release("scrub::before_repair");
    let st = run.wait();
    assert_eq!(st.state, State::Finished, "{:?}", st.failure);
    assert_eq!(st.counters.corrected_errors, 0);
    let after = s.devs[0].image();
    let copies = s.pool.sector_copies(logical);
    // The group's map is gone now, so look at the bytes scrub would have written.
    assert!(copies.is_err());
    let changed = before
        .chunks(4096)
        .zip(after.chunks(4096))
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        changed <= 64,
        "only metadata commits may write, not a repair"
    );
}

/// R6: scrub holds a group (marked as scrubbed) while a commit runs, and the other way
/// round: neither waits for the other, so there is no deadlock.
#[test]
fn r6_commit_never_waits_for_scrub() {
    let _g = serial();
    let s = setup();
    let x = s
        .fs()
        .block_group(s.pool.data_extents().unwrap()[0].0)
        .unwrap()
        .start;
    failpoint::set("scrub::group_frozen", Action::PauseIf(x));
    let run = start_dev1(&s, false);
    paused("scrub::group_frozen");
    let (fs, v) = (s.fs().clone(), s.pool.volume("v").unwrap());
    let h = std::thread::spawn(move || {
        v.write_at(&pattern(5, 1 << 20), 50 << 20).unwrap();
        commit(&fs).unwrap();
    });
    let t0 = std::time::Instant::now();
    while !h.is_finished() {
        assert!(t0.elapsed() < T, "commit deadlocked behind a paused scrub");
        std::thread::sleep(Duration::from_millis(10));
    }
    h.join().unwrap();
    failpoint::release("scrub::group_frozen");
    assert_eq!(run.wait().state, State::Finished);

    // A commit stuck in its write-out does not stop scrub either.
    failpoint::reset();
    let gen = chunkvol::engine::transaction::running_gen(s.fs());
    failpoint::set("transaction::before_io", Action::PauseIf(gen));
    let v = s.pool.volume("v").unwrap();
    v.write_at(&pattern(6, 1 << 20), 52 << 20).unwrap();
    let fs = s.fs().clone();
    let h = std::thread::spawn(move || commit(&fs).unwrap());
    paused("transaction::before_io");
    // Scrub's start commits first, but never behind a running commit.
    let fs = s.fs().clone();
    let sc = std::thread::spawn(move || {
        let opts = one_device(1, false);
        scrub::start(&fs, opts)
            .map(|r| r.wait())
            .map_err(|e| e.to_string())
    });
    let t0 = std::time::Instant::now();
    while !sc.is_finished() {
        assert!(t0.elapsed() < T, "scrub waited behind a stuck commit");
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = sc.join().unwrap().unwrap();
    assert_eq!(
        st.state,
        State::Finished,
        "scrub finished while a commit was stuck"
    );
    failpoint::release("transaction::before_io");
    h.join().unwrap();
}

/// R7: the pool fails (transaction abort) while scrub is paused: scrub stops
/// with an error instead of waiting forever.
#[test]
fn r7_aborted_pool_stops_scrub() {
    let _g = serial();
    let s = setup();
    let x = s
        .fs()
        .block_group(s.pool.data_extents().unwrap()[0].0)
        .unwrap()
        .start;
    failpoint::set("scrub::unit", Action::PauseIf(x));
    let run = start_dev1(&s, false);
    paused("scrub::unit");
    scrub::pause(s.fs()).unwrap();
    let _ = s.fs().abort("test: transaction aborted");
    failpoint::release("scrub::unit");
    let (tx, rx) = std::sync::mpsc::channel();
    let r2 = run.clone();
    std::thread::spawn(move || tx.send(r2.wait()).unwrap());
    let st = rx
        .recv_timeout(T)
        .expect("scrub hung after the pool failed");
    assert_eq!(st.state, State::Interrupted);
    assert!(st.failure.unwrap().contains("pool failed"));
}

/// R9: read-only scrub reports corruption and writes nothing at all.
#[test]
fn r9_readonly_scrub_writes_nothing() {
    let _g = serial();
    let s = setup();
    corrupt_one(&s);
    let before: Vec<u64> = s.devs.iter().map(|d| d.writes_total()).collect();
    let st = start_dev1(&s, true).wait();
    assert_eq!(st.counters.csum_errors, 1);
    assert_eq!(st.counters.corrected_errors, 0);
    let after: Vec<u64> = s.devs.iter().map(|d| d.writes_total()).collect();
    assert_eq!(before, after, "read-only scrub wrote to a device");
    // And a normal scrub then repairs it.
    let st = start_dev1(&s, false).wait();
    assert_eq!(st.counters.corrected_errors, 1);
    let st = start_dev1(&s, false).wait();
    assert_eq!(st.counters.errors(), 0);
}

// ---------------------------------------------------------------------------
// The same rules with relocation (balance) and device replace as the actors.

use chunkvol::jobs::relocation::relocate_block_group;

fn never() -> bool {
    false
}

/// The volume still holds what `setup` wrote, and the pool checks clean.
fn assert_setup_data_intact(s: &Setup) {
    let v = s.pool.volume("v").unwrap();
    let mut buf = vec![0u8; 40 << 20];
    v.read_at(&mut buf, 0).unwrap();
    assert!(buf == pattern(1, 40 << 20), "data survived relocation");
    let r = chunkvol::pool::check::check(&s.pool, true).unwrap();
    assert!(r.ok(), "{r:?}");
}

/// Commit and run the cleaner until the group at `x` is gone.
fn wait_removed(fs: &Arc<FsInfo>, x: u64) {
    let end = std::time::Instant::now() + T;
    while fs.block_group(x).is_some_and(|b| b.start == x) {
        assert!(
            std::time::Instant::now() < end,
            "group {x:#x} never removed"
        );
        commit(fs).unwrap();
        delete_unused_bgs(fs).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// R2 with relocation: scrub holds group X's map and is about to repair a bad
/// sector when relocation moves every extent out of X. Relocation must not
/// remove X (and drop its map) while scrub still sees its extents; scrub's
/// repair completes with the map it holds, and X goes once scrub lets go.
#[test]
fn r2_relocation_empties_group_while_scrub_repairs_in_it() {
    let _g = serial();
    let s = setup();
    let logical = corrupt_one(&s);
    let x = s.fs().block_group(logical).unwrap().start;
    failpoint::set("scrub::before_repair", Action::PauseIf(x));
    let run = start_dev1(&s, false);
    paused("scrub::before_repair");
    failpoint::set("relocation::before_remove", Action::PauseIf(x));
    let fs = s.fs().clone();
    let h = std::thread::spawn(move || relocate_block_group(&fs, x, &never));
    paused("relocation::before_remove");
    let bg = s.fs().block_group(x).unwrap();
    assert_eq!(bg.used_bytes(), 0, "every extent moved out");
    assert!(
        s.fs().mapping.get(x).is_some(),
        "map kept while scrub uses it"
    );
    failpoint::release("relocation::before_remove");
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !bg.is_removed(),
        "removed while a scrub still reads the old extents"
    );
    failpoint::release("scrub::before_repair");
    let st = run.wait();
    let stats = h.join().unwrap().unwrap();
    assert_eq!(st.state, State::Finished, "{:?}", st.failure);
    assert_eq!(st.counters.csum_errors, 1);
    assert_eq!(st.counters.corrected_errors, 1);
    assert_eq!(st.counters.uncorrectable_errors, 0);
    assert!(stats.bytes_relocated > 0);
    wait_removed(s.fs(), x);
    assert_setup_data_intact(&s);
}

/// R4 with relocation: relocation removes a group scrub has frozen. The map
/// and device extents stay until scrub lets go, so a new group cannot take
/// the range; scrub then finishes with no errors.
#[test]
fn r4_relocation_removes_frozen_group_without_reuse() {
    r4_remove_frozen_group(|s, x| {
        let stats = relocate_block_group(s.fs(), x, &never).unwrap();
        assert!(stats.removed, "{stats:?}");
        assert!(
            s.fs().mapping.get(x).is_some(),
            "map drop deferred while frozen"
        );
    });
}

/// R5 with relocation: balance wants group X gone while scrub is between
/// verifying a bad sector and repairing it. Relocation cannot remove X
/// until scrub is done with it (its view pins the old extents); the repair
/// lands in X, which still owns that space, and X is removed afterwards.
/// Data stays intact and the pool checks clean.
#[test]
fn r5_relocation_waits_out_a_pending_repair() {
    let _g = serial();
    let s = setup();
    let logical = corrupt_one(&s);
    let x = s.fs().block_group(logical).unwrap().start;
    failpoint::set("scrub::before_repair", Action::PauseIf(x));
    let run = start_dev1(&s, false);
    paused("scrub::before_repair");
    // Relocation runs to completion: it hands X to the cleaner because the
    // scrub's view still pins X's old extents.
    let stats = relocate_block_group(s.fs(), x, &never).unwrap();
    assert!(!stats.removed, "removed under a pending repair: {stats:?}");
    let bg = s.fs().block_group(x).unwrap();
    assert!(
        bg.view().relocated && bg.view().ro > 0,
        "handed off read-only"
    );
    assert!(!bg.is_removed());
    assert_eq!(
        delete_unused_bgs(s.fs()).unwrap().deleted,
        0,
        "cleaner waits too"
    );
    failpoint::release("scrub::before_repair");
    let st = run.wait();
    assert_eq!(st.state, State::Finished, "{:?}", st.failure);
    assert_eq!(st.counters.uncorrectable_errors, 0);
    wait_removed(s.fs(), x);
    assert_setup_data_intact(&s);
}

/// R7 with relocation: relocation holds scrub still around its critical
/// section when the transaction aborts. Scrub must stop at once (the pool
/// failed) instead of waiting for a hold that is never released.
#[test]
fn r7_abort_while_relocation_holds_scrub() {
    let _g = serial();
    let s = setup();
    let y = s
        .fs()
        .block_group(s.pool.data_extents().unwrap()[0].0)
        .unwrap()
        .start;
    let x = empty_group(&s);
    failpoint::set("scrub::unit", Action::PauseIf(y));
    let run = start_dev1(&s, false);
    paused("scrub::unit");
    failpoint::set("cleaner::before_removed", Action::PauseIf(x));
    let fs = s.fs().clone();
    let h = std::thread::spawn(move || relocate_block_group(&fs, x, &never));
    paused("cleaner::before_removed");
    assert!(s.fs().scrub_hold.load(std::sync::atomic::Ordering::Acquire) > 0);
    failpoint::release("scrub::unit");
    let _ = s.fs().abort("test: transaction aborted under relocation");
    let (tx, rx) = std::sync::mpsc::channel();
    let r2 = run.clone();
    std::thread::spawn(move || tx.send(r2.wait()).unwrap());
    let st = rx
        .recv_timeout(T)
        .expect("scrub hung on relocation's hold after the pool failed");
    assert_eq!(st.state, State::Interrupted);
    failpoint::release("cleaner::before_removed");
    assert!(h.join().unwrap().is_err(), "relocation reports the abort");
}

/// R8: device replace copies group X while a writer that reserved space in X
/// before it went read-only still holds X's old map. Replace must wait for
/// that writer; otherwise the copy misses the write and the new device holds
/// stale data (found by opening the pool with only the new device's mirror).
#[test]
fn r8_replace_waits_for_in_flight_writer() {
    let _g = serial();
    let s = setup();
    let fs = s.fs().clone();
    // The data group the next allocation uses: the first with free space.
    let x = fs
        .block_group_list()
        .into_iter()
        .find(|b| b.is_data() && b.view().free_bytes >= 64 << 10)
        .expect("a data group with room")
        .start;
    failpoint::set("write_logical::mapped", Action::PauseIf(x));
    let v = s.pool.volume("v").unwrap();
    let data = pattern(8, 64 << 10);
    let writer = {
        let (v, d) = (v.clone(), data.clone());
        std::thread::spawn(move || v.write_at(&d, 50 << 20))
    };
    paused("write_logical::mapped");
    failpoint::set("replace::before_copy", Action::PauseIf(x));
    let newdev = Arc::new(FaultyDevice::new("mem-new", 128 << 20));
    let replacer = {
        let (f, n) = (fs.clone(), newdev.clone());
        std::thread::spawn(move || {
            chunkvol::jobs::dev_replace::start(&f, 1, n, true).map(|r| r.status())
        })
    };
    assert!(
        !failpoint::wait_paused("replace::before_copy", Duration::from_millis(800)),
        "replace copied group {x:#x} while a writer was still in flight"
    );
    failpoint::release("write_logical::mapped");
    writer.join().unwrap().unwrap();
    paused("replace::before_copy");
    failpoint::release("replace::before_copy");
    let st = replacer.join().unwrap().unwrap();
    assert_eq!(
        st.state,
        chunkvol::jobs::dev_replace::State::Finished,
        "{st:?}"
    );
    v.flush().unwrap();
    // Only the new device and devid 2 remain; drop devid 2 too and read
    // everything from the new device alone.
    let Setup { devs, pool } = s;
    drop(v);
    pool.close().unwrap();
    let only_new: Vec<Arc<dyn chunkvol::device::BlockDevice>> = vec![newdev.clone()];
    let p = Pool::open_with_options(
        only_new,
        chunkvol::pool::OpenOptions {
            repair: false,
            degraded: true,
        },
    )
    .unwrap();
    let v = p.volume("v").unwrap();
    let mut got = vec![0u8; 64 << 10];
    v.read_at(&mut got, 50 << 20).unwrap();
    assert!(got == data, "the new device misses the in-flight write");
    let mut all = vec![0u8; 40 << 20];
    v.read_at(&mut all, 0).unwrap();
    assert!(all == pattern(1, 40 << 20));
    drop(devs);
}

/// The seed's exact window, first guard (RACES.md, R1): scrub has looked
/// the group up (`scrub::group_found`), the cleaner deletes it completely
/// (items, group tree, `removed`, chunk map) and scrub goes on. The freeze
/// is refused, so scrub skips the group with no error. Without the refusal
/// scrub freezes a removed group and only the missing-map skip saves it;
/// with that skip gone too (the seed's bug) scrub fails with "has no chunk
/// map".
#[test]
fn seed_window_group_deleted_between_lookup_and_freeze() {
    let _g = serial();
    let s = setup();
    let (x, run) = scrub_paused_on_empty_group(&s, "scrub::group_found");
    let refused = failpoint::hits("scrub::freeze_refused");
    let pass = delete_unused_bgs(s.fs()).unwrap();
    assert_eq!(pass.deleted, 1, "{pass:?}");
    commit(s.fs()).unwrap();
    assert!(s.fs().mapping.get(x).is_none(), "deleted completely");
    failpoint::release("scrub::group_found");
    let st = run.wait();
    assert_eq!(st.state, State::Finished, "scrub failed: {:?}", st.failure);
    assert_eq!(st.counters.errors(), 0);
    assert_eq!(st.counters.block_groups_skipped_removed, 1);
    assert_eq!(
        failpoint::hits("scrub::freeze_refused"),
        refused + 1,
        "the freeze of the removed group was refused"
    );
}

/// The seed's window, second guard: scrub has frozen the group and waits
/// before its map lookup (`scrub::before_map_lookup`) while relocation
/// removes it (the cleaner stays off a group scrub marks, R3). The freeze defers the map drop (R4), so the lookup finds the
/// map, scrub goes on without error, and the map is dropped when scrub lets
/// go. Without the deferral the map is gone at the lookup.
#[test]
fn seed_window_group_removed_after_freeze_keeps_its_map() {
    let _g = serial();
    let s = setup();
    let (x, run) = scrub_paused_on_empty_group(&s, "scrub::before_map_lookup");
    let stats = relocate_block_group(s.fs(), x, &never).unwrap();
    assert!(stats.removed, "{stats:?}");
    assert!(
        s.fs().mapping.get(x).is_some(),
        "a frozen group keeps its map"
    );
    failpoint::release("scrub::before_map_lookup");
    let st = run.wait();
    assert_eq!(st.state, State::Finished, "scrub failed: {:?}", st.failure);
    assert_eq!(st.counters.errors(), 0);
    assert_eq!(st.counters.block_groups_skipped_removed, 1);
    assert!(
        s.fs().mapping.get(x).is_none(),
        "the last freeze drops the deferred map"
    );
}

/// The seed's window, the missing-map skip on its own: scrub has frozen the
/// group and waits before its map lookup; the group is removed and its map
/// dropped regardless (what a remover ignoring the freeze would do). A
/// missing map of a removed group is a quiet skip, not an error.
#[test]
fn seed_window_missing_map_of_a_removed_group_is_a_skip() {
    let _g = serial();
    let s = setup();
    let (x, run) = scrub_paused_on_empty_group(&s, "scrub::before_map_lookup");
    assert!(relocate_block_group(s.fs(), x, &never).unwrap().removed);
    assert!(s.fs().mapping.remove(x).is_some(), "deferred map");
    failpoint::release("scrub::before_map_lookup");
    let st = run.wait();
    assert_eq!(st.state, State::Finished, "scrub failed: {:?}", st.failure);
    assert_eq!(st.counters.errors(), 0);
    assert_eq!(st.counters.block_groups_skipped_removed, 1);
}

/// The LBA (in volume "v") that maps the extent at `logical`.
fn lba_of(s: &Setup, logical: u64) -> u64 {
    let fs = s.fs();
    let mut st = chunkvol::util::sync::lock(&fs.trans);
    let ctx = Ctx::join(fs, &mut st);
    let items = ctx
        .range(
            ctx.st.volumes["v"].id,
            chunkvol::format::Key::MIN,
            chunkvol::format::Key::MAX,
        )
        .unwrap();
    items
        .into_iter()
        .filter(|(k, _)| k.ty == chunkvol::format::item::VOLUME_EXTENT)
        .find(|(_, v)| chunkvol::format::VolumeExtent::decode(v).unwrap().logical == logical)
        .map(|(k, _)| k.offset)
        .expect("a mapping of the extent")
}

/// Relocation has copied an extent and not yet switched it
/// (`relocation::extent_copied`) when a client overwrites part of it
/// (unaligned) and discards another part. The switch must move only what
/// is still live: the client's new bytes and its hole win, the rest of the
/// extent keeps its data at the new place, and `check` is clean.
#[test]
fn relocation_copy_then_switch_races_an_overwrite_and_a_discard() {
    let _g = serial();
    let s = setup();
    let (e_start, e_len) = s.pool.data_extents().unwrap()[0];
    assert!(e_len >= 256 << 10, "a long extent: {e_len}");
    let x = s.fs().block_group(e_start).unwrap().start;
    let lba = lba_of(&s, e_start);
    failpoint::set("relocation::extent_copied", Action::PauseIf(e_start));
    let fs = s.fs().clone();
    let h = std::thread::spawn(move || relocate_block_group(&fs, x, &never));
    paused("relocation::extent_copied");
    let v = s.pool.volume("v").unwrap();
    let mut model = pattern(1, 40 << 20);
    let new = pattern(9, (64 << 10) + 123);
    let at = lba + 8192 + 7;
    v.write_at(&new, at).unwrap();
    model[at as usize..at as usize + new.len()].copy_from_slice(&new);
    let hole = lba + e_len - (64 << 10);
    v.discard(hole, 64 << 10).unwrap();
    model[hole as usize..(hole + (64 << 10)) as usize].fill(0);
    failpoint::release("relocation::extent_copied");
    let stats = h.join().unwrap().unwrap();
    assert!(stats.extents >= 1, "{stats:?}");
    wait_removed(s.fs(), x);
    let mut got = vec![0u8; 40 << 20];
    v.read_at(&mut got, 0).unwrap();
    assert!(
        got == model,
        "relocation lost a client's overwrite or discard"
    );
    let r = chunkvol::pool::check::check(&s.pool, true).unwrap();
    assert!(r.ok(), "{r:?}");
}

/// A writer reserved space in group X and wrote its data, but has not
/// inserted its extent yet (`volume::data_written`), when relocation of X
/// starts. Relocation takes its read-only hold and then waits for the
/// writer: it moves nothing until the reservation became an extent, and
/// then moves that extent too (R8's rule, with relocation as the actor).
#[test]
fn relocation_waits_for_a_writer_that_reserved_before_its_read_only_mark() {
    let _g = serial();
    let s = setup();
    failpoint::set("volume::data_written", Action::Pause);
    let pool_fs = s.fs().clone();
    let data = pattern(5, 64 << 10);
    let writer = {
        let v = s.pool.volume("v").unwrap();
        let data = data.clone();
        std::thread::spawn(move || v.write_at(&data, 50 << 20))
    };
    paused("volume::data_written");
    let x = pool_fs
        .block_group_list()
        .into_iter()
        .find(|b| b.reserved_bytes() > 0)
        .expect("the writer's group")
        .start;
    let copied = failpoint::hits("relocation::extent_copied");
    let fs = s.fs().clone();
    let h = std::thread::spawn(move || relocate_block_group(&fs, x, &never));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!h.is_finished(), "relocation went on under a reservation");
    assert!(
        s.fs().block_group(x).unwrap().view().ro > 0,
        "read-only hold taken"
    );
    assert_eq!(
        failpoint::hits("relocation::extent_copied"),
        copied,
        "relocation moved an extent while a writer still held a reservation"
    );
    failpoint::release("volume::data_written");
    writer.join().unwrap().unwrap();
    let stats = h.join().unwrap().unwrap();
    assert!(stats.removed, "{stats:?}");
    let v = s.pool.volume("v").unwrap();
    let mut got = vec![0u8; 64 << 10];
    v.read_at(&mut got, 50 << 20).unwrap();
    assert!(got == data, "the writer's data moved with the group");
    assert_setup_data_intact(&s);
}

/// The cleaner leaves alone a data group that device replace holds
/// read-only: replace has copied empty group X and is about to switch its
/// chunk to the new device (`replace::before_switch`) when the cleaner
/// pops X. Deleting it there would let the switch write a chunk item for a
/// group that is gone. The cleaner must skip X (a foreign read-only hold);
/// the hold's release hands X back, and the next pass deletes it.
#[test]
fn cleaner_leaves_a_group_replace_holds_read_only() {
    let _g = serial();
    let s = setup();
    let fs = s.fs().clone();
    let x = empty_group(&s);
    failpoint::set("replace::before_switch", Action::PauseIf(x));
    let newdev = Arc::new(FaultyDevice::new("mem-new", 128 << 20));
    let replacer = {
        let (f, n) = (fs.clone(), newdev.clone());
        std::thread::spawn(move || {
            chunkvol::jobs::dev_replace::start(&f, 1, n, true).map(|r| r.status())
        })
    };
    paused("replace::before_switch");
    let pass = delete_unused_bgs(&fs).unwrap();
    assert_eq!(pass.deleted, 0, "deleted a group replace holds: {pass:?}");
    assert!(pass.skipped >= 1, "{pass:?}");
    assert!(!fs.unused_bgs.contains(x), "skipped and left to its holder");
    assert!(fs.mapping.get(x).is_some());
    failpoint::release("replace::before_switch");
    let st = replacer.join().unwrap().unwrap();
    assert_eq!(
        st.state,
        chunkvol::jobs::dev_replace::State::Finished,
        "{st:?}"
    );
    assert!(fs.unused_bgs.contains(x), "handed back when replace let go");
    assert_eq!(delete_unused_bgs(&fs).unwrap().deleted, 1);
    commit(&fs).unwrap();
    assert_setup_data_intact(&s);
}

/// Nothing is allocated in a group while anyone holds it read-only: the
/// mark is what keeps relocation's and replace's copies complete. A write
/// made while group X (the one allocation would pick) is held lands in
/// another group, and X's counters do not move.
#[test]
fn no_allocation_in_a_read_only_group() {
    let _g = serial();
    let s = setup();
    let fs = s.fs().clone();
    let bg = fs
        .block_group_list()
        .into_iter()
        .find(|b| b.is_data() && b.view().free_bytes >= 64 << 10)
        .expect("a data group with room");
    let before = bg.view();
    let hold = bg.ro_hold(&fs).expect("not removed");
    let v = s.pool.volume("v").unwrap();
    let data = pattern(3, 64 << 10);
    v.write_at(&data, 50 << 20).unwrap();
    let after = bg.view();
    assert_eq!(
        after.used_bytes, before.used_bytes,
        "allocated in a read-only group"
    );
    assert_eq!(after.free_bytes, before.free_bytes);
    assert_eq!(after.reserved_bytes, 0);
    drop(hold);
    assert_eq!(bg.view().ro, before.ro, "the hold's release lowers ro");
    let mut got = vec![0u8; 64 << 10];
    v.read_at(&mut got, 50 << 20).unwrap();
    assert!(got == data);
}

/// Found by the deterministic scheduler (tests/lifecycle_sim.rs): a group
/// queued for the cleaner is removed by relocation instead, and a new group
/// takes its logical address before the cleaner's next pass. The cleaner
/// must judge the group that was queued (gone: skip it), not whatever group
/// now starts there. With the queue keyed by address, the cleaner took the
/// new group off a list it was never on ("drained but not queued").
#[test]
fn cleaner_judges_the_queued_group_not_a_new_one_at_its_address() {
    let _g = serial();
    let s = setup();
    let fs = s.fs();
    let x = empty_group(&s);
    assert!(fs.unused_bgs.contains(x));
    assert!(!fs.unused_bgs.is_empty());
    let st = chunkvol::jobs::relocation::relocate_block_group(fs, x, &never).unwrap();
    assert!(st.removed, "relocation removes the empty group: {st:?}");
    assert!(fs.block_group(x).is_none());
    // The next chunk goes where the removed last chunk was.
    let y = {
        let mut st = chunkvol::util::sync::lock(&fs.trans);
        let mut ctx = Ctx::join(fs, &mut st);
        ctx.new_chunk(bg_type::DATA).unwrap().start
    };
    commit(fs).unwrap();
    assert_eq!(y, x, "the new group reuses the removed group's address");
    let pass = delete_unused_bgs(fs).unwrap();
    assert_eq!(pass.deleted, 0, "{pass:?}");
    assert!(
        fs.block_group(y).is_some(),
        "the new group, never queued, is not the cleaner's"
    );
    assert!(!fs.unused_bgs.contains(y));
    // Queued now, it is the cleaner's.
    assert!(fs.block_group(y).unwrap().hand_back(fs));
    assert_eq!(delete_unused_bgs(fs).unwrap().deleted, 1);
    assert!(fs.unused_bgs.is_empty(), "{:?}", fs.unused_bgs.list());
    assert_setup_data_intact(&s);
}

/// Found by the deterministic scheduler (tests/lifecycle_sim.rs, seed 336):
/// a new chunk allocated while `device replace` starts. The replace took the
/// source device out of allocation before the target came in, so a raid1
/// pool of two devices had one allocatable device for that moment and a
/// new chunk failed ("profile raid1 needs 2 devices, pool has 1"): a false
/// error to a client whose write needed a chunk. The target now opens
/// before the source closes, and a chunk the source gets in between moves
/// with the rest.
#[test]
fn a_chunk_allocated_while_replace_starts_succeeds_and_moves() {
    let _g = serial();
    let s = setup();
    let fs = s.fs().clone();
    failpoint::set("replace::before_reserve", Action::Pause);
    let newdev = Arc::new(FaultyDevice::new("mem-new", 128 << 20));
    let replacer = {
        let (f, n) = (fs.clone(), newdev.clone());
        std::thread::spawn(move || {
            chunkvol::jobs::dev_replace::start(&f, 1, n, true).map(|r| r.status())
        })
    };
    paused("replace::before_reserve");
    let x = chunkvol::engine::transaction::change(&fs, |ctx| {
        ctx.new_chunk(bg_type::DATA).map(|bg| bg.start)
    })
    .expect("a new raid1 chunk while replace starts");
    commit(&fs).unwrap();
    failpoint::release("replace::before_reserve");
    let st = replacer.join().unwrap().unwrap();
    assert_eq!(
        st.state,
        chunkvol::jobs::dev_replace::State::Finished,
        "{st:?}"
    );
    // The new device took devid 1; the old one left.
    assert_eq!(st.target_devid, 1, "{st:?}");
    let map = fs.mapping.get(x).expect("the new chunk's map");
    let paths: Vec<String> = map
        .item
        .stripes
        .iter()
        .map(|st| {
            fs.device(st.devid)
                .unwrap()
                .dev
                .path()
                .display()
                .to_string()
        })
        .collect();
    assert!(
        !paths.iter().any(|p| p == "/mem/dev1"),
        "chunk {x:#x} stays on the replaced device: {paths:?}"
    );
    assert!(paths.iter().any(|p| p == "mem-new"), "{paths:?}");
    assert_setup_data_intact(&s);
}

/// The data chunks on `devid` that hold data: (physical start on it,
/// logical start), by physical start; at least one.
fn used_data_chunks_on(fs: &FsInfo, devid: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = chunkvol::jobs::devices::chunks_on(fs, devid)
        .into_iter()
        .filter(|&c| {
            fs.block_group(c)
                .is_some_and(|b| b.is_data() && b.used_bytes() > 0)
        })
        .map(|c| {
            let m = fs.mapping.get(c).unwrap();
            let st = m.item.stripes.iter().find(|st| st.devid == devid).unwrap();
            (st.physical, c)
        })
        .collect();
    v.sort_unstable();
    assert!(!v.is_empty(), "no data chunk on devid {devid}");
    v
}

/// Device replace hands the source's devid to the new device when it ends.
/// A scrub of the source that still holds a chunk map taken before the
/// switch (its stripe names devid 2 at the old device's physical offset)
/// must go on reading the old device: the rename waits until no one holds
/// such a map. Without the wait, the scrub reads the new device at the old
/// offset (here made to fail) and reports a false read error.
#[test]
fn replace_renames_the_devid_only_after_old_maps_are_let_go() {
    let _g = serial();
    let s = setup();
    let fs = s.fs().clone();
    // The source's last data extent: what the scrub holds when the replace ends.
    let (phys, x) = *used_data_chunks_on(&fs, 2).last().unwrap();
    let len = fs.mapping.get(x).unwrap().item.stripe_bytes;
    failpoint::set("scrub::unit", Action::PauseIf(x));
    let run = start_on(&fs, 2, true);
    paused("scrub::unit");
    let newdev = Arc::new(FaultyDevice::new("mem-new", 128 << 20));
    let replace = chunkvol::jobs::dev_replace::start(&fs, 2, newdev.clone(), false).unwrap();
    let end = std::time::Instant::now() + T;
    while failpoint::hits("devices::take_over") == 0 {
        assert!(
            std::time::Instant::now() < end,
            "the replace never finished copying"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    // Whatever reads the new device where the old one held the extent fails.
    newdev.fail_reads(phys..phys + len);
    failpoint::release("scrub::unit");
    let sc = run.wait();
    let st = replace.wait();
    newdev.heal();
    assert_eq!(sc.state, State::Finished, "{sc:?}");
    assert_eq!(sc.counters.errors(), 0, "false errors: {:?}", sc.errors);
    assert_eq!(
        st.state,
        chunkvol::jobs::dev_replace::State::Finished,
        "{st:?}"
    );
    assert_eq!(st.target_devid, 2, "the new device took devid 2: {st:?}");
    assert_eq!(
        fs.device(2).unwrap().dev.path().display().to_string(),
        "mem-new"
    );
    assert_setup_data_intact(&s);
}

/// R10 from the view's side, found by the deterministic scheduler
/// (tests/lifecycle_sim.rs, seed 12 once scrub commits at its start): scrub
/// found a device extent of devid 2 in its commit-root view, then the whole
/// replace ran, and the new device, now devid 2, holds the group at the same
/// physical offset. The map scrub then takes names "devid 2 at P" again, but
/// the view's extents are the old device's (blocks freed before the copy are
/// not on the new device): false errors, and a repair written over the new
/// device. Scrub now skips an extent whose view predates the devid's rename.
#[test]
fn scrub_skips_an_extent_found_under_a_devid_renamed_since_its_view() {
    let _g = serial();
    let s = setup();
    let fs = s.fs().clone();
    let (phys, x) = used_data_chunks_on(&fs, 2)[0];
    let len = fs.mapping.get(x).unwrap().item.stripe_bytes;
    failpoint::set("scrub::group_found", Action::PauseIf(x));
    let run = start_on(&fs, 2, true);
    paused("scrub::group_found");
    let newdev = Arc::new(FaultyDevice::new("mem-new", 128 << 20));
    let st = chunkvol::jobs::dev_replace::start(&fs, 2, newdev.clone(), false)
        .unwrap()
        .wait();
    assert_eq!(st.target_devid, 2, "the new device took devid 2: {st:?}");
    let m = fs.mapping.get(x).unwrap();
    assert!(
        m.item
            .stripes
            .iter()
            .any(|st| st.devid == 2 && st.physical == phys),
        "the window needs the new device to hold x at the old offset: {:?}",
        m.item.stripes
    );
    drop(m);
    // Reading the new device where the view's (old) extent was must not happen.
    newdev.fail_reads(phys..phys + len);
    failpoint::release("scrub::group_found");
    let sc = run.wait();
    newdev.heal();
    assert_eq!(sc.state, State::Finished, "{sc:?}");
    assert_eq!(sc.counters.errors(), 0, "false errors: {:?}", sc.errors);
    assert!(
        failpoint::hits("scrub::devid_renamed_since_view") >= 1,
        "the extent was not skipped by the rename rule: {sc:?}"
    );
    assert_setup_data_intact(&s);
}

/// Found by the deterministic scheduler (tests/lifecycle_sim.rs, seed 644):
/// a group switched to the replace target, then deleted by the cleaner while
/// a scrub's freeze defers its map drop (R4), when the replace ends and the
/// target takes the source's devid. The rename walked every map, the
/// deleted group's too, and wrote its chunk item back: a chunk with no block
/// group and no device extents. The rename now skips removed groups.
#[test]
fn replace_rename_does_not_resurrect_a_group_removed_under_a_freeze() {
    let _g = serial();
    let s = setup();
    let fs = s.fs().clone();
    let x = empty_group(&s);
    failpoint::set("scrub::frozen", Action::PauseIf(x));
    let run = start_dev1(&s, true);
    paused("scrub::frozen");
    failpoint::set("devices::take_over", Action::Pause);
    let newdev = Arc::new(FaultyDevice::new("mem-new", 128 << 20));
    let replace = chunkvol::jobs::dev_replace::start(&fs, 2, newdev, false).unwrap();
    paused("devices::take_over");
    let map = fs.mapping.get(x).expect("x is mapped");
    assert!(
        map.item.stripes.iter().all(|st| st.devid != 2),
        "x was switched to the target: {:?}",
        map.item.stripes
    );
    drop(map);
    // The cleaner deletes x; the frozen scrub keeps its map for now.
    let pass = delete_unused_bgs(&fs).unwrap();
    assert_eq!(pass.deleted, 1, "{pass:?}");
    assert!(
        fs.mapping.get(x).is_some(),
        "map drop deferred by the freeze"
    );
    failpoint::release("devices::take_over");
    let st = replace.wait();
    assert_eq!(
        st.state,
        chunkvol::jobs::dev_replace::State::Finished,
        "{st:?}"
    );
    assert_eq!(st.target_devid, 2, "{st:?}");
    failpoint::release("scrub::frozen");
    let sc = run.wait();
    assert_eq!(sc.counters.errors(), 0, "{sc:?}");
    assert!(fs.mapping.get(x).is_none(), "the deferred drop ran");
    commit(&fs).unwrap();
    assert_setup_data_intact(&s);
}

/// A scrub that listed the devices before a replace ended checks the
/// target's superblocks under the target's old devid after the target took
/// the source's devid: those superblocks now say devid 2, and were reported
/// as corrupt ("super_errors: 2", found by the stress storm). The old devid
/// is an alias, and its superblocks are checked under the new one.
#[test]
fn scrub_skips_superblocks_of_a_devid_renamed_under_it() {
    let _g = serial();
    let s = setup();
    let fs = s.fs().clone();
    failpoint::set("devices::take_over", Action::Pause);
    let newdev = Arc::new(FaultyDevice::new("mem-new", 128 << 20));
    let replace = chunkvol::jobs::dev_replace::start(&fs, 2, newdev, false).unwrap();
    paused("devices::take_over");
    let t = replace.status().target_devid;
    assert_eq!(t, 3);
    failpoint::set("scrub::before_supers", Action::PauseIf(t));
    let run = scrub::start(&fs, ScrubOptions::default()).unwrap();
    paused("scrub::before_supers");
    failpoint::release("devices::take_over");
    let st = replace.wait();
    assert_eq!(st.target_devid, 2, "{st:?}");
    failpoint::release("scrub::before_supers");
    let sc = run.wait();
    assert_eq!(sc.state, State::Finished, "{sc:?}");
    assert_eq!(sc.counters.errors(), 0, "false errors: {:?}", sc.errors);
    assert_setup_data_intact(&s);
}

/// The seed's race with a snapshot (issue 14): scrub has found a data group
/// whose every extent only a deleted snapshot still references, and waits
/// there (`scrub::group_found`, the seed's window) while the cleaner drops
/// the snapshot, freeing all of them, and runs its group pass. Scrub's view
/// keeps the freed extents pinned, so the group cannot go while scrub may
/// still read it: scrub finishes with no error, and the group is deleted
/// once scrub lets go. Both devices are scrubbed, each copy on its own.
#[test]
fn seed_window_with_a_dead_snapshot_dropped_by_the_cleaner() {
    let _g = serial();
    let s = setup();
    let fs = s.fs();
    let (first, _) = s.pool.data_extents().unwrap()[0];
    let g = fs.block_group(first).unwrap().start;
    s.pool.snapshot_volume("v", "snap").unwrap();
    // The volume moves on: its old extents stay only for the snapshot.
    let v = s.pool.volume("v").unwrap();
    let want = pattern(2, 40 << 20);
    v.write_at(&want, 0).unwrap();
    s.pool.flush().unwrap();
    assert!(fs.block_group(g).unwrap().used_bytes() > 0);
    failpoint::set("scrub::group_found", Action::PauseIf(g));
    let run = scrub::start(fs, ScrubOptions::default()).unwrap();
    paused("scrub::group_found");
    s.pool.delete_volume("snap").unwrap();
    assert_eq!(s.pool.drop_deleted_volumes().unwrap(), 1);
    commit(fs).unwrap();
    assert_eq!(
        fs.block_group(g).unwrap().used_bytes(),
        0,
        "every extent freed"
    );
    delete_unused_bgs(fs).unwrap();
    commit(fs).unwrap();
    assert!(
        fs.mapping.get(g).is_some(),
        "deleted while scrub may read it"
    );
    failpoint::release("scrub::group_found");
    let st = run.wait();
    assert_eq!(st.state, State::Finished, "scrub failed: {:?}", st.failure);
    assert_eq!(st.counters.errors(), 0, "{st:?}");
    // Once scrub let go, the cleaner takes the empty group.
    commit(fs).unwrap();
    delete_unused_bgs(fs).unwrap();
    commit(fs).unwrap();
    assert!(
        fs.mapping.get(g).is_none(),
        "the empty group was not deleted"
    );
    let mut back = vec![0u8; 40 << 20];
    v.read_at(&mut back, 0).unwrap();
    assert!(back == want, "the volume");
    let r = chunkvol::pool::check::check(&s.pool, true).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
}

/// Scrub's read-ahead never crosses a view: units read ahead under one view
/// are read again after scrub moves to a newer one. Here scrub is paused at
/// the first unit of the last data group, 2 MiB are written into the free
/// room after the volume's data (in that group) and committed, and the view
/// is old enough to be replaced when scrub goes on: the new units must be
/// read and verified under the new view, with no error. Without the restart
/// (`scrub_copy` keeping its first `ReadAhead`), the reader has no read for
/// the new units and the scan stops out of step.
#[test]
fn read_ahead_restarts_with_each_new_view() {
    let _g = serial();
    let s = setup();
    for d in &s.devs {
        d.set_reads_ahead(true);
    }
    let fs = s.fs();
    let extents = s.pool.data_extents().unwrap();
    let &(last, last_len) = extents.iter().max().unwrap();
    let bg = fs.block_group(last).unwrap();
    let room = bg.start + bg.length - (last + last_len);
    assert!(
        room >= 4 << 20,
        "no room after the data in its group: {room}"
    );
    failpoint::set("scrub::unit", Action::PauseIf(bg.start));
    let run = start_dev1(&s, false);
    paused("scrub::unit");
    let v = s.pool.volume("v").unwrap();
    let more = pattern(9, 2 << 20);
    v.write_at(&more, 40 << 20).unwrap();
    s.pool.flush().unwrap();
    let new = s.pool.data_extents().unwrap();
    let &(added, _) = new.iter().max().unwrap();
    assert!(
        added > last && added < bg.start + bg.length,
        "the new extent {added:#x} is not in group {:#x}",
        bg.start
    );
    // Older than the refresh period: scrub takes a new view at its next unit.
    std::thread::sleep(Duration::from_millis(1100));
    failpoint::release("scrub::unit");
    let st = run.wait();
    assert_eq!(st.state, State::Finished, "scrub failed: {:?}", st.failure);
    assert_eq!(st.counters.errors(), 0, "{st:?}");
    let mut back = vec![0u8; 2 << 20];
    v.read_at(&mut back, 40 << 20).unwrap();
    assert!(back == more, "the new data");
}
