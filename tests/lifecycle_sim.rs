//! Deterministic schedules of the block-group lifecycle
//! (chunkvol::util::sched). The actors — a writer, a prober that makes
//! empty data groups, two cleaners, a committer, a scrubber (with its
//! coordinator and per-device threads), a relocator and, in one seed of
//! four, a device replace — run one at a time;
//! the seed alone decides who runs at every failpoint, lock, sleep and
//! wait. A failing seed replays the same interleaving.
//!
//! Per seed: no false scrub error, no failed job, no deadlock, the volume
//! equals the model, no leaked empty group, `check` clean. Over the run:
//! groups deleted, groups scrub found but skipped because they were removed,
//! logical ranges reused by a new group, groups relocated and devices
//! replaced, each at least once.
//!
//! CHUNKVOL_SIM_SEEDS sets how many seeds run (default 1000); a failure
//! prints its seed, and CHUNKVOL_SIM_FIRST_SEED starts from there.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chunkvol::device::fault::{FaultyDevice, Rng};
use chunkvol::device::BlockDevice;
use chunkvol::engine::fs_info::FsInfo;
use chunkvol::engine::{block_group, transaction};
use chunkvol::format::{bg_type, Profile};
use chunkvol::jobs::relocation;
use chunkvol::jobs::scrub::{self, ScrubOptions, State};
use chunkvol::util::sched::{self, Sim, SimOptions, Step};
use common::*;

const VOL: u64 = 20 << 20;
const S: u64 = 4096;

/// What one schedule made happen.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
struct Events {
    deleted: u64,
    skipped_removed: u64,
    reused: u64,
    relocated: u64,
    replaced: u64,
    scrubs: u64,
    steps: u64,
}

impl Events {
    fn add(&mut self, o: Events) {
        self.deleted += o.deleted;
        self.skipped_removed += o.skipped_removed;
        self.reused += o.reused;
        self.relocated += o.relocated;
        self.replaced += o.replaced;
        self.scrubs += o.scrubs;
        self.steps += o.steps;
    }
}

/// Counters the actors share.
#[derive(Default)]
struct Shared {
    /// The writer is done: scrub, relocation and the prober wind down.
    stop: AtomicBool,
    /// Scrub and relocation are done too: the cleaners and the committer
    /// stop (so they still run while the last scrub holds its groups).
    quiet: AtomicBool,
    /// Scrubber and relocator still running.
    busy: AtomicU64,
    deleted: AtomicU64,
    skipped_removed: AtomicU64,
    reused: AtomicU64,
    relocated: AtomicU64,
    replaced: AtomicU64,
    scrubs: AtomicU64,
    /// Every group start an actor has seen.
    seen: Mutex<BTreeSet<u64>>,
}

fn group_starts(fs: &FsInfo) -> BTreeSet<u64> {
    chunkvol::util::sync::read(&fs.block_groups)
        .keys()
        .copied()
        .collect()
}

fn writer(seed: u64, vol: chunkvol::Volume, pool: chunkvol::Pool, model: Arc<Mutex<Vec<u8>>>) {
    let mut rng = Rng::new(seed);
    for _ in 0..14 {
        let mut off = rng.below(VOL / S) * S;
        let mut len = (1 + rng.below(3 << 20)).min(VOL - off);
        let op = rng.below(8);
        if op == 0 {
            // Everything at once (mkfs, fstrim): groups scrub is walking
            // become empty under it.
            (off, len) = (0, VOL);
        }
        if op < 3 {
            discard_with_model(&vol, &model, off, len);
        } else {
            write_with_model(&vol, &model, off, &pattern(rng.next_u64(), len as usize));
        }
        if rng.below(4) == 0 {
            pool.flush().unwrap();
        }
    }
}

/// New empty data groups for the cleaners to delete, some at a logical
/// address a deleted group had.
fn prober(seed: u64, fs: Arc<FsInfo>, sh: Arc<Shared>) {
    let mut rng = Rng::new(seed ^ 0x9e37);
    for _ in 0..4 {
        sched::sleep(Duration::from_micros(200 + rng.below(3000)));
        if sh.stop.load(Ordering::Acquire) {
            break;
        }
        let now = group_starts(&fs);
        sh.seen.lock().unwrap().extend(now.iter().copied());
        let r = transaction::change(&fs, |ctx| {
            ctx.new_chunk(bg_type::DATA).map(|bg| {
                let start = bg.start;
                bg.hand_back(&fs);
                start
            })
        });
        match r {
            Ok(start) => {
                let mut seen = sh.seen.lock().unwrap();
                if seen.contains(&start) && !now.contains(&start) {
                    sh.reused.fetch_add(1, Ordering::Relaxed);
                }
                seen.insert(start);
            }
            Err(chunkvol::Error::NoSpace(_)) => {}
            Err(e) => panic!("prober: {e}"),
        }
        transaction::commit(&fs).unwrap();
    }
}

fn cleaner(seed: u64, fs: Arc<FsInfo>, sh: Arc<Shared>) {
    let mut rng = Rng::new(seed ^ 0xc1ea);
    while !sh.quiet.load(Ordering::Acquire) {
        let p = block_group::delete_unused_bgs(&fs).unwrap_or_else(|e| panic!("cleaner: {e}"));
        sh.deleted.fetch_add(p.deleted as u64, Ordering::Relaxed);
        sched::sleep(Duration::from_micros(20 + rng.below(400)));
    }
}

fn committer(fs: Arc<FsInfo>, sh: Arc<Shared>) {
    while !sh.quiet.load(Ordering::Acquire) {
        transaction::commit(&fs).unwrap();
        sched::sleep(Duration::from_millis(2));
    }
}

fn scrubber(fs: Arc<FsInfo>, sh: Arc<Shared>) {
    let mut n = 0;
    while !sh.stop.load(Ordering::Acquire) || n == 0 {
        let st = match scrub::start(&fs, ScrubOptions::default()) {
            Ok(r) => r.wait(),
            Err(chunkvol::Error::Busy(_)) => {
                sched::sleep(Duration::from_micros(100));
                continue;
            }
            Err(e) => panic!("scrub start: {e}"),
        };
        assert_eq!(st.state, State::Finished, "{:?}", st.failure);
        assert_eq!(st.counters.errors(), 0, "false scrub error {st:?}");
        assert_eq!(st.counters.uncorrectable_errors, 0, "{st:?}");
        sh.skipped_removed
            .fetch_add(st.counters.block_groups_skipped_removed, Ordering::Relaxed);
        sh.scrubs.fetch_add(1, Ordering::Relaxed);
        n += 1;
    }
}

/// Relocate a data group now and then, one scrub may be walking.
fn relocator(seed: u64, fs: Arc<FsInfo>, sh: Arc<Shared>) {
    let mut rng = Rng::new(seed ^ 0x7e1);
    while !sh.stop.load(Ordering::Acquire) {
        sched::sleep(Duration::from_micros(500 + rng.below(4000)));
        let data: Vec<u64> = fs
            .block_group_list()
            .iter()
            // Empty groups are the cleaner's (relocating them would hide a
            // group the cleaner leaked).
            .filter(|b| b.is_data() && b.used_bytes() > 0)
            .map(|b| b.start)
            .collect();
        if data.is_empty() {
            continue;
        }
        let start = data[rng.below(data.len() as u64) as usize];
        match relocation::relocate_block_group(&fs, start, &|| false) {
            Ok(st) if !st.vanished => {
                sh.relocated.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) | Err(chunkvol::Error::NoSpace(_)) => {}
            Err(e) => panic!("relocation of {start:#x}: {e}"),
        }
    }
}

/// Replace devid 1 by `target` once, at a seeded moment, while everyone
/// else runs.
fn replacer(seed: u64, fs: Arc<FsInfo>, sh: Arc<Shared>, target: Arc<FaultyDevice>) {
    let mut rng = Rng::new(seed ^ 0x4e91);
    sched::sleep(Duration::from_micros(rng.below(6000)));
    let run = chunkvol::jobs::dev_replace::start(&fs, 1, target, true)
        .unwrap_or_else(|e| panic!("replace start: {e}"));
    let st = run.status();
    assert_eq!(
        st.state,
        chunkvol::jobs::dev_replace::State::Finished,
        "replace: {st:?}"
    );
    sh.replaced.fetch_add(1, Ordering::Relaxed);
}

/// One schedule: the actors under the simulation, then the checks.
fn one_seed(seed: u64) -> (Events, Vec<Step>) {
    let devs = mkfs_mem(Profile::Raid1, 96 << 20);
    let pool = open_mem(&devs);
    let vol = pool.create_volume("v", VOL).unwrap();
    pool.flush().unwrap();
    let fs = pool.fs().clone();
    let model = Arc::new(Mutex::new(vec![0u8; VOL as usize]));
    let sh = Arc::new(Shared::default());
    let mut opts = SimOptions::seed(seed);
    opts.max_steps = 3_000_000;
    let sim = Sim::new(opts);
    {
        let (vol, pool, model, sh) = (vol.clone(), pool.clone(), model.clone(), sh.clone());
        sim.spawn("writer", move || {
            writer(seed, vol, pool, model);
            sh.stop.store(true, Ordering::Release);
        });
    }
    let (f, s) = (fs.clone(), sh.clone());
    sim.spawn("prober", move || prober(seed, f, s));
    for (i, name) in ["cleaner-a", "cleaner-b"].into_iter().enumerate() {
        let (f, s) = (fs.clone(), sh.clone());
        sim.spawn(name, move || cleaner(seed + i as u64, f, s));
    }
    let (f, s) = (fs.clone(), sh.clone());
    sim.spawn("committer", move || committer(f, s));
    let replace = seed.is_multiple_of(4);
    sh.busy
        .store(if replace { 3 } else { 2 }, Ordering::Release);
    let done = |sh: &Shared| {
        if sh.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            sh.quiet.store(true, Ordering::Release);
        }
    };
    let (f, s) = (fs.clone(), sh.clone());
    sim.spawn("scrubber", move || {
        scrubber(f, s.clone());
        done(&s);
    });
    let (f, s) = (fs.clone(), sh.clone());
    sim.spawn("relocator", move || {
        relocator(seed, f, s.clone());
        done(&s);
    });
    if replace {
        let target = mem_devices(1, 96 << 20).remove(0);
        let (f, s) = (fs.clone(), sh.clone());
        sim.spawn("replacer", move || {
            replacer(seed, f, s.clone(), target);
            done(&s);
        });
    }
    let out = sim.run();
    if let Some(f) = &out.failure {
        let tail: Vec<String> = out
            .trace
            .iter()
            .rev()
            .take(40)
            .rev()
            .map(|s| format!("{}:{}", s.actor, s.point))
            .collect();
        panic!("seed {seed}: {f}\nlast steps: {}", tail.join(" "));
    }
    // The devices the pool has now (a replace swapped one).
    let now: Vec<Arc<dyn BlockDevice>> = fs.devices().iter().map(|d| d.dev.clone()).collect();
    assert_lifecycle_end(seed, pool, &vol, &model, &now);
    let ev = Events {
        deleted: sh.deleted.load(Ordering::Relaxed),
        skipped_removed: sh.skipped_removed.load(Ordering::Relaxed),
        reused: sh.reused.load(Ordering::Relaxed),
        relocated: sh.relocated.load(Ordering::Relaxed),
        replaced: sh.replaced.load(Ordering::Relaxed),
        scrubs: sh.scrubs.load(Ordering::Relaxed),
        steps: out.trace.len() as u64,
    };
    (ev, out.trace)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn lifecycle_schedules() {
    let n = env_u64("CHUNKVOL_SIM_SEEDS", 1000);
    let first = env_u64("CHUNKVOL_SIM_FIRST_SEED", 1);
    let t0 = Instant::now();
    let mut total = Events::default();
    for seed in first..first + n {
        total.add(one_seed(seed).0);
    }
    eprintln!(
        "ran {n} schedules in {:.1}s: {total:?}",
        t0.elapsed().as_secs_f64()
    );
    // A run in which these never happened explored nothing of the lifecycle.
    assert!(total.deleted > 0, "no group was ever deleted: {total:?}");
    assert!(
        total.skipped_removed > 0,
        "scrub never met a removed group: {total:?}"
    );
    assert!(total.reused > 0, "no logical range was reused: {total:?}");
    assert!(total.relocated > 0, "no group was relocated: {total:?}");
    assert!(total.replaced > 0, "no device was replaced: {total:?}");
}

#[test]
fn a_seed_replays_its_interleaving() {
    let seed = env_u64("CHUNKVOL_SIM_REPLAY_SEED", 44);
    let (ev_a, a) = one_seed(seed);
    let (ev_b, b) = one_seed(seed);
    assert!(a.len() > 1000, "a schedule of only {} steps", a.len());
    assert_eq!(ev_a, ev_b, "seed {seed}: different events on replay");
    if let Some(i) = (0..a.len().min(b.len())).find(|&i| a[i] != b[i]) {
        panic!(
            "seed {seed}: the replay left the trace at step {i}: {:?} then {:?}",
            a[i], b[i]
        );
    }
    assert_eq!(a.len(), b.len(), "seed {seed}: traces of different length");
    let (_, other) = one_seed(seed + 1);
    assert_ne!(a, other, "seeds {seed} and {} interleaved alike", seed + 1);
}
