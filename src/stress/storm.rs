//! Everything at once on one pool (chunkvol's own fstests btrfs/071):
//! writers, trimmers and zeroers, verifying readers, flushes, a scrub loop, a
//! balance loop with random filters, the cleaner and committer, a device
//! replace loop, and snapshots, clones, deletes and diffs; in fault mode
//! also a fault injector on one device. At the end: a scrub with no errors,
//! a clean `check --check-data-csum`, and every byte of every volume,
//! snapshot and clone equal to the model, before and after a reopen.

use std::time::{Duration, Instant};

use super::model::{first_diff, VolModel};
use super::snapshots::{self, SnapModel};
use super::{Mode, StressOptions, StressReport};
use crate::data::volume::Volume;
use crate::device::fault::{FaultyDevice, Rng};
use crate::device::BlockDevice;
use crate::format::Profile;
use crate::jobs::balance::{self, BalanceArgs};
use crate::jobs::scrub::{self, ScrubOptions};
use crate::pool::{MkfsOptions, Pool};
use crate::util::sync::{lock, Arc, AtomicBool, AtomicU64, Mutex, Ordering};

/// Largest client request.
const MAX_IO_BYTES: u64 = 256 << 10;
const S: u64 = 4096;

#[derive(Default)]
pub(super) struct Counts {
    writes: AtomicU64,
    reads: AtomicU64,
    trims: AtomicU64,
    flushes: AtomicU64,
    scrubs: AtomicU64,
    balances: AtomicU64,
    groups_relocated: AtomicU64,
    replaces: AtomicU64,
    faults: AtomicU64,
    pub(super) snapshots: AtomicU64,
    pub(super) clones: AtomicU64,
    pub(super) snapshot_reads: AtomicU64,
    pub(super) snapshot_deletes: AtomicU64,
    pub(super) diffs: AtomicU64,
}

pub(super) struct Shared {
    opts: StressOptions,
    pub(super) pool: Pool,
    pub(super) vols: Vec<(Volume, VolModel)>,
    /// Live snapshots and clones with their expected content.
    pub(super) snaps: Mutex<Vec<SnapModel>>,
    stop: AtomicBool,
    deadline: Instant,
    failures: Mutex<Vec<String>>,
    pub(super) counts: Counts,
    /// Every device ever created; the members are the ones the pool lists.
    devices: Mutex<Vec<Arc<FaultyDevice>>>,
    /// Fault mode: the one device faults are injected into, by path.
    victim: Mutex<Option<String>>,
    /// Fault mode: the victim after it vanished and was replaced.
    vanished: Mutex<Option<String>>,
    /// Fault mode: the victim's error counters just before it left.
    victim_stats: Mutex<Option<crate::format::DevStats>>,
}

impl Shared {
    pub(super) fn running(&self) -> bool {
        !self.stop.load(Ordering::Acquire) && Instant::now() < self.deadline
    }
    pub(super) fn fail(&self, msg: String) {
        tracing::error!("stress: {msg}");
        lock(&self.failures).push(msg);
        self.stop.store(true, Ordering::Release);
    }
    pub(super) fn rng(&self, actor: u64) -> Rng {
        Rng::new(self.opts.seed ^ (actor + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
}

pub(super) fn pattern(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// A random range: sector aligned half of the time.
pub(super) fn range(rng: &mut Rng, size: u64) -> (u64, u64) {
    let max = MAX_IO_BYTES.min(size);
    if rng.below(2) == 0 {
        let off = rng.below(size / S) * S;
        let len = (1 + rng.below(max / S)) * S;
        (off, len.min(size - off))
    } else {
        let off = rng.below(size - 1);
        (off, 1 + rng.below(max.min(size - off)))
    }
}

/// Fills its own volume and trims it all, again and again, so whole block
/// groups keep being created and emptied (and deleted by the cleaner) while
/// scrub, balance and replace walk over them: the seed race's habitat.
fn churner(sh: &Shared) {
    let (vol, model) = sh.vols.last().expect("the churn volume");
    let mut rng = sh.rng(700);
    let step = 1 << 20;
    while sh.running() {
        let mut off = 0;
        while off < model.size_bytes && sh.running() {
            let n = step.min(model.size_bytes - off);
            let d = pattern(&mut rng, n as usize);
            let mut held = model.hold(off, n);
            match vol.write_at(&d, off) {
                Ok(()) => held.write(off, &d),
                Err(e) => sh.fail(format!("churn write at {off}: {e}")),
            }
            off += n;
        }
        let r = vol.flush().and_then(|_| {
            let mut held = model.hold(0, model.size_bytes);
            vol.discard(0, model.size_bytes)?;
            held.discard(0, model.size_bytes);
            Ok(())
        });
        if let Err(e) = r.and_then(|_| vol.flush()) {
            sh.fail(format!("churn trim: {e}"));
        }
        sh.counts.trims.fetch_add(1, Ordering::Relaxed);
    }
}

/// Keeps an empty data group or two around: creates one, commits, and lets
/// the cleaner (on its own clock) delete it. Scrub keeps finding groups in
/// its commit-root view that are deleted while it reaches them, which is
/// the seed race's interleaving (btrfs/071 gets it from balance and the
/// cleaner creating and deleting groups all the time).
fn prober(sh: &Shared) {
    let fs = sh.pool.fs();
    let mut rng = sh.rng(800);
    while sh.running() {
        std::thread::sleep(Duration::from_millis(10 + rng.below(40)));
        let empty = fs
            .block_group_list()
            .iter()
            .filter(|b| b.is_data() && b.used_bytes() == 0)
            .count();
        if empty >= 2 {
            continue;
        }
        let r = crate::engine::transaction::change(fs, |ctx| {
            // The new group is empty: the cleaner's to take.
            ctx.new_chunk(crate::format::bg_type::DATA)
                .map(|bg| bg.hand_back(fs))
        });
        match r {
            Ok(_) => {
                if let Err(e) = crate::engine::transaction::commit(fs) {
                    sh.fail(format!("prober commit: {e}"));
                }
            }
            Err(crate::Error::NoSpace(_)) => {}
            Err(e) => sh.fail(format!("prober: {e}")),
        }
    }
}

fn writer(sh: &Shared, id: u64) {
    let mut rng = sh.rng(100 + id);
    // The last volume belongs to the churner.
    let n = sh.vols.len() - 1;
    while sh.running() {
        let (vol, model) = &sh.vols[rng.below(n as u64) as usize];
        let (mut off, mut len) = range(&mut rng, model.size_bytes);
        let mut what = rng.below(20);
        if rng.below(40) == 0 {
            // A big trim now and then empties whole block groups, so the
            // cleaner deletes groups while scrub and balance work on them.
            len = ((2 + rng.below(7)) << 20).min(model.size_bytes);
            off = rng.below((model.size_bytes - len) / S + 1) * S;
            what = 14;
        }
        let mut held = model.hold(off, len);
        let r = match what {
            0..=13 => {
                let d = pattern(&mut rng, len as usize);
                let r = vol.write_at(&d, off);
                if r.is_ok() {
                    held.write(off, &d);
                }
                sh.counts.writes.fetch_add(1, Ordering::Relaxed);
                r
            }
            14..=16 => {
                let r = vol.discard(off, len);
                if r.is_ok() {
                    held.discard(off, len);
                }
                sh.counts.trims.fetch_add(1, Ordering::Relaxed);
                r
            }
            17..=18 => {
                let r = vol.write_zeroes(off, len);
                if r.is_ok() {
                    held.zero(off, len);
                }
                sh.counts.trims.fetch_add(1, Ordering::Relaxed);
                r
            }
            _ => {
                drop(held);
                sh.counts.flushes.fetch_add(1, Ordering::Relaxed);
                vol.flush()
            }
        };
        if let Err(e) = r {
            sh.fail(format!(
                "volume {} op {what} at {off}+{len} failed: {e}; {}",
                vol.name(),
                space_summary(&sh.pool)
            ));
        }
    }
}

/// Where the space is, for failure reports.
fn space_summary(pool: &Pool) -> String {
    let u = pool.usage();
    let devs: Vec<String> = u
        .devices
        .iter()
        .map(|d| {
            format!(
                "devid {} {}/{} MiB",
                d.devid,
                d.allocated_bytes >> 20,
                d.size_bytes >> 20
            )
        })
        .collect();
    let bgs: Vec<String> = u
        .block_groups
        .iter()
        .map(|b| {
            format!(
                "{:#x} {} {} {}/{}K{}",
                b.start,
                b.bg_type,
                b.profile,
                b.used_bytes >> 10,
                b.length >> 10,
                if b.ro { " ro" } else { "" }
            )
        })
        .collect();
    format!("devices [{}] groups [{}]", devs.join(", "), bgs.join(", "))
}

fn reader(sh: &Shared, id: u64) {
    let mut rng = sh.rng(200 + id);
    while sh.running() {
        let (vol, model) = &sh.vols[rng.below(sh.vols.len() as u64) as usize];
        let (off, len) = range(&mut rng, model.size_bytes);
        let mut held = model.hold(off, len);
        let mut got = vec![0u8; len as usize];
        let mut want = vec![0u8; len as usize];
        held.read(off, &mut want);
        if let Err(e) = vol.read_at(&mut got, off) {
            sh.fail(format!("volume {} read {off}+{len}: {e}", vol.name()));
            return;
        }
        drop(held);
        sh.counts.reads.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = first_diff(&got, &want) {
            sh.fail(format!(
                "volume {} byte {} read {:#04x}, model has {:#04x} (read {off}+{len})",
                vol.name(),
                off + i as u64,
                got[i],
                want[i]
            ));
        }
    }
}

/// Scrub errors a run may report: none, except from faults injected on the
/// victim (which must all be corrected).
fn check_scrub(sh: &Shared, st: &scrub::ScrubStatus) {
    let c = &st.counters;
    // Fault mode: a bad copy whose rewrite failed (an injected write error,
    // a vanished device) stays bad and counts as uncorrectable; the readers
    // prove no byte is lost, and the final scrubs after healing must
    // correct everything.
    if st.failure.is_some() {
        sh.fail(format!("scrub failed: {:?}", st.failure));
    } else if sh.opts.mode == Mode::Normal && c.errors() + c.uncorrectable_errors > 0 {
        let first: Vec<_> = st.errors.iter().flatten().take(4).collect();
        sh.fail(format!(
            "scrub reported errors with no fault injected: {c:?}; first: {first:?}"
        ));
    } else if sh.opts.mode == Mode::Normal && c.uncorrectable_errors > 0 {
        sh.fail(format!(
            "scrub: {} uncorrectable errors",
            c.uncorrectable_errors
        ));
    } else if sh.opts.mode == Mode::Normal && c.errors() > 0 {
        sh.fail(format!(
            "scrub reported errors with no fault injected: {c:?}"
        ));
    }
}

fn scrubber(sh: &Shared) {
    let fs = sh.pool.fs();
    while sh.running() {
        match scrub::start(fs, ScrubOptions::default()) {
            Ok(run) => {
                run.wait();
                let st = run.status(true);
                check_scrub(sh, &st);
                sh.counts.scrubs.fetch_add(1, Ordering::Relaxed);
            }
            Err(crate::Error::Busy(_)) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => sh.fail(format!("scrub start: {e}")),
        }
    }
}

/// Profiles a random conversion may pick: ones the pool can hold even while
/// a replace has one device out of allocation.
fn convertible(devices: usize) -> Vec<Profile> {
    [
        Profile::Single,
        Profile::Dup,
        Profile::Raid1,
        Profile::Raid1c3,
        Profile::Raid10,
    ]
    .into_iter()
    // One device to spare: a replace takes one out of allocation.
    .filter(|p| p.min_devices() < devices)
    .collect()
}

fn random_filters(rng: &mut Rng, convert: &[Profile]) -> String {
    let mut f = Vec::new();
    match rng.below(5) {
        0 => f.push(format!("usage={}", rng.below(101))),
        1 => {
            let a = rng.below(60);
            f.push(format!("usage={a}..{}", a + rng.below(41)));
        }
        2 => f.push(format!("vrange=0..{}", rng.below(1 << 34))),
        _ => {}
    }
    if rng.below(2) == 0 {
        f.push(format!("limit={}", 1 + rng.below(3)));
    }
    if !convert.is_empty() && rng.below(6) == 0 {
        let p = convert[rng.below(convert.len() as u64) as usize];
        f.push(format!("convert={}", p.name()));
        if rng.below(2) == 0 {
            f.push("soft".into());
        }
    }
    f.join(",")
}

fn balancer(sh: &Shared) {
    let fs = sh.pool.fs();
    let mut rng = sh.rng(300);
    // Conversions change redundancy; in fault mode every group keeps two copies.
    let convert: Vec<Profile> = if sh.opts.mode == Mode::Normal {
        convertible(sh.opts.devices)
    } else {
        Vec::new()
    };
    while sh.running() {
        std::thread::sleep(Duration::from_millis(rng.below(200)));
        let args = BalanceArgs {
            data: (rng.below(4) != 0).then(|| random_filters(&mut rng, &convert)),
            metadata: (rng.below(3) == 0).then(|| random_filters(&mut rng, &[])),
            system: None,
            full: false,
        };
        let args = if args.data.is_none() && args.metadata.is_none() {
            BalanceArgs {
                data: Some(String::new()),
                ..args
            }
        } else {
            args
        };
        match balance::start(fs, args.clone(), false) {
            Ok(run) => {
                // A long balance must not outlive the run: cancel it at the
                // deadline (relocation checks between extents).
                let mut canceled = false;
                while run.status(fs).state == balance::State::Running {
                    if !sh.running() && !canceled {
                        let _ = balance::cancel(fs);
                        canceled = true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let st = run.wait(fs);
                sh.counts.balances.fetch_add(1, Ordering::Relaxed);
                sh.counts
                    .groups_relocated
                    .fetch_add(st.block_groups_done, Ordering::Relaxed);
                if canceled && st.state == balance::State::Canceled {
                    continue;
                }
                if st.state != balance::State::Finished {
                    let nospace = st
                        .failure
                        .as_deref()
                        .is_some_and(|f| f.contains("no space"));
                    if !nospace {
                        sh.fail(format!("balance {args:?} ended {st:?}"));
                    }
                    let _ = balance::cancel(fs);
                }
            }
            Err(e) => sh.fail(format!("balance {args:?}: {e}")),
        }
    }
}

/// Commits often; runs the cleaner on its own, slower clock. Empty groups
/// therefore outlive a few commits: scrub sees them in its commit-root view
/// and the cleaner deletes them while scrub is on its way to them (the seed
/// race's interleaving).
fn housekeeper(sh: &Shared) {
    let fs = sh.pool.fs();
    let mut rng = sh.rng(400);
    let mut next_clean = Instant::now();
    while sh.running() {
        std::thread::sleep(Duration::from_millis(5 + rng.below(50)));
        if let Err(e) = crate::engine::transaction::commit(fs) {
            sh.fail(format!("commit: {e}"));
        }
        if Instant::now() >= next_clean {
            if let Err(e) = crate::engine::block_group::delete_unused_bgs(fs) {
                sh.fail(format!("cleaner: {e}"));
            }
            // Deleted snapshots and clones: dropped as serve's cleaner does.
            if let Err(e) = crate::jobs::cleaner::drop_dead_volumes(fs, &|| !sh.running()) {
                sh.fail(format!("cleaner dropping deleted volumes: {e}"));
            }
            next_clean = Instant::now() + Duration::from_millis(50 + rng.below(450));
        }
    }
}

fn replacer(sh: &Shared) {
    let fs = sh.pool.fs();
    let mut rng = sh.rng(500);
    let mut n = 0;
    while sh.running() {
        std::thread::sleep(Duration::from_millis(rng.below(500)));
        let ids: Vec<u64> = fs.devices().iter().map(|d| d.devid).collect();
        let src = ids[rng.below(ids.len() as u64) as usize];
        n += 1;
        let new = Arc::new(FaultyDevice::new(
            format!("mem-replacement-{n}"),
            sh.opts.device_bytes,
        ));
        new.set_reads_ahead(true);
        lock(&sh.devices).push(new.clone());
        match crate::jobs::dev_replace::start(fs, src, new, false) {
            Ok(run) => {
                let mut canceled = false;
                while run.status().state == crate::jobs::dev_replace::State::Running {
                    if !sh.running() && !canceled {
                        let _ = crate::jobs::dev_replace::cancel(fs);
                        canceled = true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let st = run.wait();
                if canceled && st.state == crate::jobs::dev_replace::State::Canceled {
                    forget_non_members(sh);
                    continue;
                }
                if st.state != crate::jobs::dev_replace::State::Finished {
                    let nospace = st
                        .failure
                        .as_deref()
                        .is_some_and(|f| f.contains("no space"));
                    if !nospace {
                        sh.fail(format!("replace of devid {src}: {st:?}"));
                    }
                    continue;
                }
                sh.counts.replaces.fetch_add(1, Ordering::Relaxed);
                forget_non_members(sh);
            }
            Err(crate::Error::NoSpace(_)) => {}
            Err(e) => sh.fail(format!("replace of devid {src}: {e}")),
        }
    }
}

/// Drop devices that left the pool: each holds its whole size in memory.
fn forget_non_members(sh: &Shared) {
    let members: Vec<String> = sh
        .pool
        .fs()
        .devices()
        .iter()
        .map(|d| d.dev.path().display().to_string())
        .collect();
    lock(&sh.devices).retain(|d| members.contains(&d.path().display().to_string()));
}

/// Fault mode: bit rot, read and write errors, on one device only, so every
/// byte keeps a good copy elsewhere.
fn injector(sh: &Shared) {
    let fs = sh.pool.fs();
    let mut rng = sh.rng(600);
    let vanish_at = Instant::now() + sh.opts.duration / 2;
    while sh.running() {
        if Instant::now() >= vanish_at && lock(&sh.victim).is_some() {
            vanish_and_replace(sh);
            continue;
        }
        std::thread::sleep(Duration::from_millis(50 + rng.below(300)));
        let Some(path) = lock(&sh.victim).clone() else {
            continue;
        };
        let dev = lock(&sh.devices)
            .iter()
            .find(|d| d.path().display().to_string() == path)
            .cloned();
        let Some(dev) = dev else {
            continue;
        };
        let Some(member) = fs
            .devices()
            .into_iter()
            .find(|d| d.dev.path().display().to_string() == path)
        else {
            continue;
        };
        let extents: Vec<(u64, u64)> = crate::util::sync::read(&member.extents)
            .iter()
            .map(|(&a, &b)| (a, b))
            .collect();
        if extents.is_empty() {
            continue;
        }
        let (a, l) = extents[rng.below(extents.len() as u64) as usize];
        let at = a + rng.below(l / S) * S;
        match rng.below(3) {
            0 => {
                // Bit rot in live data (so someone reads it), plus a few
                // flips anywhere on the device.
                if let Ok(ext) = sh.pool.data_extents() {
                    for _ in 0..1 + rng.below(4) {
                        if ext.is_empty() {
                            break;
                        }
                        let (start, len) = ext[rng.below(ext.len() as u64) as usize];
                        let lg = start + rng.below(len / S) * S;
                        let copies = sh.pool.sector_copies(lg).unwrap_or_default();
                        if let Some((_, phys)) =
                            copies.iter().find(|(p, _)| p.display().to_string() == path)
                        {
                            dev.flip_bit(phys + rng.below(S), rng.below(8) as u8);
                        }
                    }
                }
                for _ in 0..1 + rng.below(4) {
                    dev.flip_bit(at + rng.below(S), rng.below(8) as u8);
                }
            }
            1 => {
                dev.fail_reads(at..at + S * (1 + rng.below(64)));
                std::thread::sleep(Duration::from_millis(rng.below(200)));
                dev.heal();
            }
            _ => {
                dev.fail_writes(at..at + S * (1 + rng.below(64)));
                std::thread::sleep(Duration::from_millis(rng.below(200)));
                dev.heal();
            }
        }
        sh.counts.faults.fetch_add(1, Ordering::Relaxed);
    }
}

/// The victim disappears for good (every I/O fails); clients carry on from
/// the other copies, then a replace moves its stripes to a new device.
fn vanish_and_replace(sh: &Shared) {
    let fs = sh.pool.fs();
    let Some(path) = lock(&sh.victim).take() else {
        return;
    };
    let dev = lock(&sh.devices)
        .iter()
        .find(|d| d.path().display().to_string() == path)
        .cloned();
    let member = fs
        .devices()
        .into_iter()
        .find(|d| d.dev.path().display().to_string() == path);
    let (Some(dev), Some(member)) = (dev, member) else {
        return;
    };
    dev.vanish();
    sh.counts.faults.fetch_add(1, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    wait_for_read_error(sh, &member);
    // What the pool counted against it, before it leaves.
    *lock(&sh.victim_stats) = Some(member.stats.snapshot());
    let new = Arc::new(FaultyDevice::new("mem-after-vanish", sh.opts.device_bytes));
    new.set_reads_ahead(true);
    lock(&sh.devices).push(new.clone());
    match crate::jobs::dev_replace::start(fs, member.devid, new, true) {
        Ok(run) => {
            let st = run.status();
            if st.state != crate::jobs::dev_replace::State::Finished {
                sh.fail(format!("replace of the vanished device: {st:?}"));
            } else {
                sh.counts.replaces.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(e) => sh.fail(format!("replace of the vanished device: {e}")),
    }
    *lock(&sh.vanished) = Some(path);
}

/// Wait (bounded) until a read error is counted against the vanished
/// victim. The continuous scrub reads every copy and soon reaches it;
/// client reads use copy 0, which the victim may not hold, and the short
/// read-error windows before may have gone unread, so without this the
/// check at the end would hang on chance.
fn wait_for_read_error(sh: &Shared, victim: &crate::chunk::volumes::Device) {
    let limit = Instant::now() + Duration::from_secs(30);
    while sh.running()
        && Instant::now() < limit
        && victim.stats.read_errs.load(Ordering::Relaxed) == 0
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An actor's body.
type Actor = fn(&Shared);

/// Each volume, with the model of what it must hold.
type Vols = Vec<(Volume, VolModel)>;

/// Running actors, by thread name.
type Threads = Vec<(String, std::thread::JoinHandle<()>)>;

/// Run one storm. Returns its report, or the failures with the seed.
pub fn run(opts: &StressOptions) -> Result<StressReport, String> {
    let seed = opts.seed;
    let fail = |m: String| format!("stress seed {seed} profile {}: {m}", opts.profile.name());
    let (pool, devs, vols) = build_pool(opts).map_err(fail)?;
    crate::util::failpoint::set_chaos(if opts.chaos_us > 0 { seed | 1 } else { 0 }, opts.chaos_us);
    let started = Instant::now();
    let sh = Arc::new(Shared {
        opts: opts.clone(),
        pool: pool.clone(),
        vols,
        snaps: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        deadline: started + opts.duration,
        failures: Mutex::new(Vec::new()),
        counts: Counts::default(),
        devices: Mutex::new(devs.clone()),
        victim: Mutex::new(
            (opts.mode == Mode::Fault).then(|| devs[0].path().display().to_string()),
        ),
        vanished: Mutex::new(None),
        victim_stats: Mutex::new(None),
    });
    let threads = spawn_actors(&sh);
    watchdog(&sh, &threads).map_err(fail)?;
    for (_, t) in threads {
        if t.join().is_err() {
            sh.fail("an actor panicked".into());
        }
    }
    crate::util::failpoint::set_chaos(0, 0);
    let failures = lock(&sh.failures).clone();
    if !failures.is_empty() {
        return Err(fail(failures.join("; ")));
    }
    finish(&sh, started).map_err(fail)
}

/// The pool on fresh in-memory devices, with the client volumes and the
/// churn volume last.
fn build_pool(opts: &StressOptions) -> Result<(Pool, Vec<Arc<FaultyDevice>>, Vols), String> {
    let devs: Vec<Arc<FaultyDevice>> = (0..opts.devices)
        .map(|i| Arc::new(FaultyDevice::new(format!("mem-dev{i}"), opts.device_bytes)))
        .collect();
    // Scrub reads ahead, as on files: its reads race with everything.
    for d in &devs {
        d.set_reads_ahead(true);
    }
    let block: Vec<Arc<dyn BlockDevice>> = devs.iter().map(|d| d.clone() as _).collect();
    let meta = if opts.devices > 1 {
        Profile::Raid1
    } else {
        Profile::Dup
    };
    Pool::mkfs(
        block.clone(),
        &MkfsOptions {
            data: Some(opts.profile),
            metadata: Some(meta),
            node_bytes: 4096,
            ..Default::default()
        },
    )
    .map_err(|e| format!("mkfs: {e}"))?;
    let pool = Pool::open(block).map_err(|e| format!("open: {e}"))?;
    let mut vols = Vec::new();
    for i in 0..=opts.volumes {
        let name = if i == opts.volumes {
            "churn".to_string()
        } else {
            format!("v{i}")
        };
        let v = pool
            .create_volume(&name, opts.volume_bytes)
            .map_err(|e| format!("create volume: {e}"))?;
        vols.push((v, VolModel::new(opts.volume_bytes)));
    }
    Ok((pool, devs, vols))
}

/// One thread per actor, named for the watchdog's report.
fn spawn_actors(sh: &Arc<Shared>) -> Threads {
    let opts = &sh.opts;
    let mut threads: Threads = Vec::new();
    let mut spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
        let h = std::thread::Builder::new()
            .name(name.clone())
            .spawn(f)
            .expect("spawn a stress actor");
        threads.push((name, h));
    };
    for i in 0..opts.writers {
        let s = sh.clone();
        spawn(format!("writer{i}"), Box::new(move || writer(&s, i as u64)));
    }
    for i in 0..opts.readers {
        let s = sh.clone();
        spawn(format!("reader{i}"), Box::new(move || reader(&s, i as u64)));
    }
    let actors: [(&str, Actor); 6] = [
        ("scrubber", scrubber),
        ("balancer", balancer),
        ("housekeeper", housekeeper),
        ("churner", churner),
        ("prober", prober),
        ("snapshotter", snapshots::snapshotter),
    ];
    for (name, f) in actors {
        let s = sh.clone();
        spawn(name.into(), Box::new(move || f(&s)));
    }
    // Replace needs a device to spare for profiles that want every member.
    let can_replace = opts.devices >= 3 && opts.mode == Mode::Normal;
    if can_replace {
        let s = sh.clone();
        spawn("replacer".into(), Box::new(move || replacer(&s)));
    }
    if opts.mode == Mode::Fault {
        let s = sh.clone();
        spawn("injector".into(), Box::new(move || injector(&s)));
    }
    threads
}

/// Wait for every actor; one still running long after the deadline is a
/// deadlock, reported with what the pool's long operations are doing.
fn watchdog(sh: &Shared, threads: &Threads) -> Result<(), String> {
    let grace = Duration::from_secs(120);
    for (_, t) in threads {
        while !t.is_finished() {
            if Instant::now() > sh.deadline + grace {
                let stuck: Vec<&str> = threads
                    .iter()
                    .filter(|(_, t)| !t.is_finished())
                    .map(|(n, _)| n.as_str())
                    .collect();
                // Nothing here may take the transaction lock: it may be
                // what is stuck.
                let fs = sh.pool.fs();
                let rep = crate::jobs::dev_replace::status(fs)
                    .map(|r| format!("{r:?}"))
                    .unwrap_or_default();
                return Err(format!(
                    "deadlock: {stuck:?} still running {grace:?} after the deadline; replace {rep}; scrub_hold {}",
                    fs.scrub_hold.load(Ordering::Acquire)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

fn compare_all(sh: &Shared, pool: &Pool, when: &str) -> Result<(), String> {
    for (v, model) in &sh.vols {
        let vol = pool.volume(v.name()).map_err(|e| format!("{when}: {e}"))?;
        let mut off = 0;
        let unit = 1 << 20;
        while off < model.size_bytes {
            let n = unit.min(model.size_bytes - off);
            let mut got = vec![0u8; n as usize];
            let mut want = vec![0u8; n as usize];
            vol.read_at(&mut got, off)
                .map_err(|e| format!("{when}: read {} at {off}: {e}", v.name()))?;
            model.hold(off, n).read(off, &mut want);
            if let Some(i) = first_diff(&got, &want) {
                return Err(format!(
                    "{when}: volume {} byte {} is {:#04x}, model has {:#04x}",
                    v.name(),
                    off + i as u64,
                    got[i],
                    want[i]
                ));
            }
            off += n;
        }
    }
    for s in lock(&sh.snaps).iter() {
        snapshots::compare(pool, s, when)?;
    }
    Ok(())
}

fn finish(sh: &Shared, started: Instant) -> Result<StressReport, String> {
    let fs = sh.pool.fs();
    for d in lock(&sh.devices).iter() {
        d.heal();
    }
    // Whatever deleted snapshots the cleaner had not dropped yet: the check
    // then counts references with every drop finished.
    sh.pool
        .drop_deleted_volumes()
        .map_err(|e| format!("dropping deleted volumes: {e}"))?;
    crate::engine::transaction::commit(fs).map_err(|e| format!("final commit: {e}"))?;
    let last = final_scrubs(sh)?;
    let r = crate::pool::check::check(&sh.pool, true).map_err(|e| format!("check: {e}"))?;
    if !r.ok() {
        return Err(format!("check found problems: {:?}", r.problems));
    }
    compare_all(sh, &sh.pool, "end of run")?;
    let stats = sh.pool.device_stats();
    if sh.opts.mode == Mode::Fault {
        check_fault_counters(sh, &stats)?;
    }
    reopen_and_verify(sh)?;
    Ok(StressReport {
        seconds: started.elapsed().as_secs_f64(),
        lines: report_lines(sh, last, &stats),
    })
}

/// Fault mode: the first scrub repairs what the faults left; the next
/// must find nothing. Normal mode: the first must find nothing.
fn final_scrubs(sh: &Shared) -> Result<Option<scrub::ScrubStatus>, String> {
    let fs = sh.pool.fs();
    let passes = if sh.opts.mode == Mode::Fault { 2 } else { 1 };
    let mut last = None;
    for pass in 0..passes {
        let st = scrub::start(fs, ScrubOptions::default())
            .map_err(|e| format!("final scrub: {e}"))?
            .wait();
        let c = &st.counters;
        if st.failure.is_some() || c.uncorrectable_errors > 0 {
            return Err(format!("final scrub {pass}: {st:?}"));
        }
        if pass + 1 == passes && c.errors() > 0 {
            return Err(format!("final scrub found errors: {c:?}"));
        }
        last = Some(st);
    }
    Ok(last)
}

/// Errors were counted against the device that had the faults (which
/// vanished and left the pool), never against a healthy one.
fn check_fault_counters(sh: &Shared, stats: &[crate::pool::DeviceStats]) -> Result<(), String> {
    if lock(&sh.vanished).is_none() {
        return Err("the victim never vanished (run too short?)".into());
    }
    let v = (*lock(&sh.victim_stats)).unwrap_or_default();
    if v.read_errs == 0 || v.corruption_errs == 0 {
        return Err(format!("faults were injected but not counted: {v:?}"));
    }
    for d in stats {
        let e = d.stats.read_errs + d.stats.corruption_errs + d.stats.generation_errs;
        if e > 0 {
            return Err(format!("errors counted on a healthy device: {d:?}"));
        }
    }
    Ok(())
}

/// Reopen from what the member devices hold: the data and a clean check
/// must survive it.
fn reopen_and_verify(sh: &Shared) -> Result<(), String> {
    let fs = sh.pool.fs();
    let members: Vec<String> = fs
        .devices()
        .iter()
        .map(|d| d.dev.path().display().to_string())
        .collect();
    let devs: Vec<Arc<dyn BlockDevice>> = lock(&sh.devices)
        .iter()
        .filter(|d| members.contains(&d.path().display().to_string()))
        .map(|d| d.clone() as _)
        .collect();
    crate::engine::transaction::commit(fs).map_err(|e| format!("commit before reopen: {e}"))?;
    let again = Pool::open(devs).map_err(|e| format!("reopen: {e}"))?;
    compare_all(sh, &again, "after reopen")?;
    let r =
        crate::pool::check::check(&again, true).map_err(|e| format!("check after reopen: {e}"))?;
    if !r.ok() {
        return Err(format!("check after reopen: {:?}", r.problems));
    }
    Ok(())
}

/// The report: what the actors did, and what the error counters say.
fn report_lines(
    sh: &Shared,
    last: Option<scrub::ScrubStatus>,
    stats: &[crate::pool::DeviceStats],
) -> Vec<String> {
    let c = &sh.counts;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let scrub_final = last.map(|s| s.counters).unwrap_or_default();
    vec![
        format!(
            "writes {} reads-verified {} trims {} flushes {}",
            g(&c.writes),
            g(&c.reads),
            g(&c.trims),
            g(&c.flushes)
        ),
        format!(
            "scrubs {} balances {} (groups relocated {}) replaces {} faults injected {}",
            g(&c.scrubs),
            g(&c.balances),
            g(&c.groups_relocated),
            g(&c.replaces),
            g(&c.faults)
        ),
        format!(
            "snapshots {} clones {} deletes {} snapshot reads-verified {} diffs {}",
            g(&c.snapshots),
            g(&c.clones),
            g(&c.snapshot_deletes),
            g(&c.snapshot_reads),
            g(&c.diffs)
        ),
        match &*lock(&sh.victim_stats) {
            Some(v) => format!(
                "faulty device before it vanished: read_errs {} write_errs {} flush_errs {} corruption_errs {} generation_errs {}",
                v.read_errs, v.write_errs, v.flush_errs, v.corruption_errs, v.generation_errs
            ),
            None => "no faults injected".into(),
        },
        format!(
            "final scrub: {} bytes, {} errors; device error counters: {}",
            scrub_final.bytes_scrubbed,
            scrub_final.errors(),
            stats
                .iter()
                .map(|d| format!(
                    "{}: read {} write {} csum {}",
                    d.path, d.stats.read_errs, d.stats.write_errs, d.stats.corruption_errs
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ]
}
