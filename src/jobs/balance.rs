//! Balance: relocate the block groups that match filters, optionally
//! converting them to another profile. Progress lives in the pool (dev tree:
//! one state item and one pending item per group still to do), so a balance
//! interrupted by a crash or a restart resumes where it was.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::engine::fs_info::FsInfo;
use crate::engine::transaction::{self, commit};
use crate::format::progress::BalanceProgress as Persisted;
use crate::format::{bg_type, item, objectid, tree_id, Key, Profile};
use crate::jobs::control::{ActiveClock, Completion, JobSlot, Pace};
use crate::jobs::relocation::relocate_block_group;
use crate::util::error::{Error, Result};
use crate::util::sync::{lock, Arc, AtomicBool, AtomicU64, Mutex, Ordering};
use crate::util::time::now_s;

/// The persisted shapes live with the other on-disk codecs.
pub use crate::format::progress::{BalanceArgs, BalanceState as State};

/// Usage filter: `usage=N` (below N percent) or `usage=N..M` (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Below(u64),
    Range(u64, u64),
}

/// Parsed filters for one block-group type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    pub usage: Option<Usage>,
    pub devid: Option<u64>,
    /// Physical range [a, b) on `devid`.
    pub drange: Option<(u64, u64)>,
    /// Logical range [a, b).
    pub vrange: Option<(u64, u64)>,
    pub profiles: Option<Vec<Profile>>,
    pub convert: Option<Profile>,
    pub limit: Option<u64>,
    /// With convert: skip groups already in the target profile.
    pub soft: bool,
}

fn parse_num(s: &str, what: &str) -> Result<u64> {
    crate::util::size::parse_size(s)
        .map_err(|e| Error::Invalid(format!("balance filter {what}: '{s}': {e}")))
}

fn parse_range(v: &str, what: &str) -> Result<(u64, u64)> {
    let Some((a, b)) = v.split_once("..") else {
        return Err(Error::Invalid(format!(
            "balance filter {what}={v}: expected A..B"
        )));
    };
    let a = if a.is_empty() { 0 } else { parse_num(a, what)? };
    let b = if b.is_empty() {
        u64::MAX
    } else {
        parse_num(b, what)?
    };
    if a > b {
        return Err(Error::Invalid(format!(
            "balance filter {what}={v}: start is past the end"
        )));
    }
    Ok((a, b))
}

impl Filters {
    /// Parse a comma list such as `usage=50,limit=3` or `convert=raid1,soft`.
    pub fn parse(s: &str) -> Result<Filters> {
        let mut f = Filters::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = match part.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (part, None),
            };
            let need =
                || v.ok_or_else(|| Error::Invalid(format!("balance filter '{k}' needs a value")));
            match k {
                "usage" => {
                    let v = need()?;
                    let pct = |s: &str, empty: u64| -> Result<u64> {
                        if s.is_empty() {
                            return Ok(empty);
                        }
                        s.parse().map_err(|_| {
                            Error::Invalid(format!(
                                "balance filter usage={v}: '{s}' is not a percent \
                                 (usage=N or usage=N..M, N and M in 0..100)"
                            ))
                        })
                    };
                    let u = match v.split_once("..") {
                        Some((a, b)) => {
                            let (a, b) = (pct(a, 0)?, pct(b, 100)?);
                            if a > b {
                                return Err(Error::Invalid(format!(
                                    "balance filter usage={v}: start is past the end"
                                )));
                            }
                            Usage::Range(a, b.min(100))
                        }
                        None => Usage::Below(pct(v, 0)?),
                    };
                    let bad = match u {
                        Usage::Below(n) => n > 100,
                        Usage::Range(a, _) => a > 100,
                    };
                    if bad {
                        return Err(Error::Invalid(format!(
                            "balance filter usage={v}: percent must be 0..100"
                        )));
                    }
                    f.usage = Some(u);
                }
                "devid" => f.devid = Some(parse_num(need()?, "devid")?),
                "drange" => f.drange = Some(parse_range(need()?, "drange")?),
                "vrange" => f.vrange = Some(parse_range(need()?, "vrange")?),
                "profiles" => {
                    f.profiles = Some(
                        need()?
                            .split('|')
                            .map(|p| Profile::parse(p).map_err(Error::Invalid))
                            .collect::<Result<_>>()?,
                    )
                }
                "convert" => f.convert = Some(Profile::parse(need()?).map_err(Error::Invalid)?),
                "limit" => f.limit = Some(parse_num(need()?, "limit")?),
                "soft" => {
                    if v.is_some() {
                        return Err(Error::Invalid("balance filter 'soft' takes no value".into()));
                    }
                    f.soft = true
                }
                _ => {
                    return Err(Error::Invalid(format!(
                        "unknown balance filter '{k}' (usage, devid, drange, vrange, profiles, convert, limit, soft)"
                    )))
                }
            }
        }
        if f.drange.is_some() && f.devid.is_none() {
            return Err(Error::Invalid("balance filter drange needs devid".into()));
        }
        if f.soft && f.convert.is_none() {
            return Err(Error::Invalid("balance filter soft needs convert".into()));
        }
        Ok(f)
    }

    /// Whether the group at `start` matches (every filter but `limit`).
    fn matches(&self, fs: &FsInfo, start: u64) -> bool {
        let Some(bg) = fs.block_group(start).filter(|b| b.start == start) else {
            return false;
        };
        let Some(map) = fs.mapping.get(start) else {
            return false;
        };
        if let Some(u) = self.usage {
            let used = bg.used_bytes() as u128 * 100;
            let len = bg.length as u128;
            let ok = match u {
                Usage::Below(n) => used < n as u128 * len,
                Usage::Range(a, b) => used >= a as u128 * len && used <= b as u128 * len,
            };
            if !ok {
                return false;
            }
        }
        if let Some(d) = self.devid {
            let on_dev = map.item.stripes.iter().filter(|s| s.devid == d);
            let mut any = false;
            for s in on_dev {
                any |= match self.drange {
                    Some((a, b)) => s.physical < b && s.physical + map.item.stripe_bytes > a,
                    None => true,
                };
            }
            if !any {
                return false;
            }
        }
        if let Some((a, b)) = self.vrange {
            if !(bg.start < b && bg.end() > a) {
                return false;
            }
        }
        if let Some(p) = &self.profiles {
            if !p.contains(&bg.profile) {
                return false;
            }
        }
        if self.soft && self.convert == Some(bg.profile) {
            return false;
        }
        true
    }
}

/// The filters of each block-group type a balance touches.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub by_type: BTreeMap<u64, Filters>,
}

impl Plan {
    /// Parse and check arguments against the pool, changing nothing.
    pub fn new(fs: &FsInfo, args: &BalanceArgs) -> Result<Plan> {
        let mut by_type = BTreeMap::new();
        let any = args.data.is_some() || args.metadata.is_some() || args.system.is_some();
        if !any && !args.full {
            return Err(Error::Invalid(
                "balance needs filters (-d, -m, -s) or --full to relocate every block group".into(),
            ));
        }
        for (t, f) in [
            (bg_type::DATA, &args.data),
            (bg_type::METADATA, &args.metadata),
            (bg_type::SYSTEM, &args.system),
        ] {
            match f {
                Some(s) => {
                    by_type.insert(t, Filters::parse(s)?);
                }
                None if !any => {
                    by_type.insert(t, Filters::default());
                }
                None => {}
            }
        }
        // System groups share the metadata profile: a metadata conversion
        // takes them along.
        let mconv = by_type.get(&bg_type::METADATA).and_then(|f| f.convert);
        let sconv = by_type.get(&bg_type::SYSTEM).and_then(|f| f.convert);
        match (mconv, sconv) {
            (Some(m), Some(s)) if m != s => {
                return Err(Error::Invalid(format!(
                    "metadata and system share one profile: convert={} and convert={} differ",
                    m.name(),
                    s.name()
                )))
            }
            (Some(m), None) => {
                let f = by_type.entry(bg_type::SYSTEM).or_default();
                f.convert = Some(m);
                f.soft = true;
            }
            (None, Some(_)) => {
                return Err(Error::Invalid(
                    "system groups use the metadata profile: convert them with -m convert=P".into(),
                ))
            }
            _ => {}
        }
        let ndev = fs.alloc_devices().len();
        for f in by_type.values() {
            if let Some(p) = f.convert {
                if ndev < p.min_devices() {
                    return Err(Error::Invalid(format!(
                        "cannot convert to {}: it needs {} devices, the pool has {ndev}",
                        p.name(),
                        p.min_devices()
                    )));
                }
            }
            if let Some(d) = f.devid {
                if fs.device(d).is_none() && !crate::util::sync::read(&fs.missing).contains_key(&d)
                {
                    return Err(Error::Invalid(format!(
                        "balance filter devid={d}: no such device"
                    )));
                }
            }
        }
        Ok(Plan { by_type })
    }

    /// Groups to relocate now, in logical order, honouring `limit`.
    pub fn select(&self, fs: &FsInfo) -> Vec<u64> {
        let mut taken: BTreeMap<u64, u64> = BTreeMap::new();
        let mut out = Vec::new();
        for bg in fs.block_group_list() {
            let Some(f) = self.by_type.get(&bg.bg_type) else {
                continue;
            };
            if bg.is_relocated() || !f.matches(fs, bg.start) {
                continue;
            }
            let n = taken.entry(bg.bg_type).or_default();
            if f.limit.is_some_and(|l| *n >= l) {
                continue;
            }
            *n += 1;
            out.push(bg.start);
        }
        out
    }

    fn still_matches(&self, fs: &FsInfo, start: u64) -> bool {
        let Some(bg) = fs.block_group(start).filter(|b| b.start == start) else {
            return false;
        };
        self.by_type
            .get(&bg.bg_type)
            .is_some_and(|f| f.matches(fs, start))
    }
}

/// `balance status` output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BalanceStatus {
    pub state: State,
    pub started_at: u64,
    pub block_groups_total: u64,
    pub block_groups_done: u64,
    pub block_groups_left: u64,
    pub bytes_relocated: u64,
    /// This run's duration, rate and time left (zero for a run of an
    /// earlier process).
    #[serde(flatten)]
    pub pace: Pace,
    pub args: Option<BalanceArgs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// A balance in progress (or just ended) in this process.
pub struct BalanceRun {
    args: BalanceArgs,
    started_at: u64,
    state: Mutex<State>,
    total: AtomicU64,
    done: AtomicU64,
    bytes: AtomicU64,
    pause: AtomicBool,
    cancel: AtomicBool,
    failure: Mutex<Option<String>>,
    finished: Completion,
    /// This run's working time; stopped when it ends.
    clock: ActiveClock,
    /// Groups and bytes done before this run (a resumed balance).
    done_before: u64,
    bytes_before: u64,
}

impl BalanceRun {
    fn new(args: BalanceArgs, started_at: u64, done_before: u64, bytes_before: u64) -> Self {
        BalanceRun {
            args,
            started_at,
            state: Mutex::new(State::Running),
            total: AtomicU64::new(0),
            done: AtomicU64::new(done_before),
            bytes: AtomicU64::new(bytes_before),
            pause: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            failure: Mutex::new(None),
            finished: Completion::default(),
            clock: ActiveClock::running(),
            done_before,
            bytes_before,
        }
    }

    pub fn status(&self, fs: &FsInfo) -> BalanceStatus {
        let total = self.total.load(Ordering::Acquire);
        let state = *lock(&self.state);
        let done = self.done.load(Ordering::Acquire);
        let bytes = self.bytes.load(Ordering::Acquire);
        let left = pending(fs).map(|p| p.len() as u64).unwrap_or(0);
        BalanceStatus {
            state,
            started_at: self.started_at,
            block_groups_total: total,
            block_groups_done: done,
            block_groups_left: left,
            bytes_relocated: bytes,
            pace: Pace::of(
                self.clock.active().as_secs_f64(),
                bytes.saturating_sub(self.bytes_before),
                done.saturating_sub(self.done_before),
                left,
                state == State::Running,
            ),
            args: Some(self.args.clone()),
            failure: lock(&self.failure).clone(),
        }
    }

    /// Block until the run ends; its final status.
    pub fn wait(&self, fs: &FsInfo) -> BalanceStatus {
        self.finished.wait();
        self.status(fs)
    }

    fn persisted(&self) -> Persisted {
        Persisted {
            args: self.args.clone(),
            state: *lock(&self.state),
            started_at: self.started_at,
            block_groups_total: self.total.load(Ordering::Acquire),
            block_groups_done: self.done.load(Ordering::Acquire),
            bytes_relocated: self.bytes.load(Ordering::Acquire),
            failure: lock(&self.failure).clone(),
        }
    }

    fn is_active(&self) -> bool {
        matches!(*lock(&self.state), State::Running)
    }
}

fn state_key() -> Key {
    Key::new(objectid::BALANCE, item::BALANCE_STATE, 0)
}
fn pending_key(start: u64) -> Key {
    Key::new(objectid::BALANCE, item::BALANCE_PENDING, start)
}

fn load(fs: &FsInfo) -> Result<Option<Persisted>> {
    let st = lock(&fs.trans);
    let Some(v) = crate::btree::get(fs, &st.root(tree_id::DEV), &state_key())? else {
        return Ok(None);
    };
    Persisted::decode(&v)
        .map(Some)
        .map_err(|e| Error::Corrupt(format!("balance state item: {e}")))
}

/// Groups a persisted balance still has to do.
fn pending(fs: &FsInfo) -> Result<Vec<u64>> {
    let st = lock(&fs.trans);
    crate::btree::Iter::new(
        fs,
        &st.root(tree_id::DEV),
        pending_key(0),
        pending_key(u64::MAX),
    )
    .map(|r| r.map(|(k, _)| k.offset))
    .collect()
}

fn save(fs: &FsInfo, p: &Persisted) -> Result<()> {
    let v = p
        .encode()
        .map_err(|e| Error::Corrupt(format!("balance state: {e}")))?;
    transaction::change(fs, |ctx| ctx.insert(tree_id::DEV, state_key(), v.clone()))
}

fn active(fs: &FsInfo) -> Option<Arc<BalanceRun>> {
    JobSlot::<BalanceRun>::of(fs)
        .current()
        .filter(|r| r.is_active())
}

/// Start a balance. Online callers get it running in a thread; `wait`
/// blocks until it ends (offline commands always wait).
pub fn start(fs: &Arc<FsInfo>, args: BalanceArgs, wait: bool) -> Result<Arc<BalanceRun>> {
    fs.check_abort()?;
    let slot = JobSlot::<BalanceRun>::of(fs);
    let mut slot = slot.hold();
    if slot.as_ref().is_some_and(|r| r.is_active()) {
        return Err(Error::Busy("a balance is already running".into()));
    }
    if let Some(p) = load(fs)? {
        if matches!(p.state, State::Paused | State::Interrupted | State::Running)
            && !pending(fs)?.is_empty()
        {
            return Err(Error::Busy(format!(
                "a {} balance exists; `balance resume` or `balance cancel` it first",
                if p.state == State::Paused {
                    "paused"
                } else {
                    "interrupted"
                }
            )));
        }
    }
    let plan = Plan::new(fs, &args)?;
    let run = Arc::new(BalanceRun::new(args, now_s(), 0, 0));
    // Convert first: the moves must allocate in the target profile.
    let chosen = transaction::change(fs, |ctx| {
        if let Some(p) = plan.by_type.get(&bg_type::DATA).and_then(|f| f.convert) {
            ctx.st.data_profile = p;
        }
        if let Some(p) = plan.by_type.get(&bg_type::METADATA).and_then(|f| f.convert) {
            ctx.st.metadata_profile = p;
        }
        ctx.st.dirty = true;
        let chosen = plan.select(ctx.fs);
        for &s in &chosen {
            ctx.insert(tree_id::DEV, pending_key(s), Vec::new())?;
        }
        Ok(chosen)
    })?;
    run.total.store(chosen.len() as u64, Ordering::Release);
    save(fs, &run.persisted())?;
    commit(fs)?;
    tracing::info!("balance started: {} block groups", chosen.len());
    *slot = Some(run.clone());
    drop(slot);
    launch(fs, run.clone(), plan, wait);
    Ok(run)
}

/// Continue a paused or interrupted balance.
pub fn resume(fs: &Arc<FsInfo>, wait: bool) -> Result<Arc<BalanceRun>> {
    fs.check_abort()?;
    let slot = JobSlot::<BalanceRun>::of(fs);
    let mut slot = slot.hold();
    if let Some(r) = slot.as_ref() {
        if r.is_active() {
            return Err(Error::Busy("a balance is already running".into()));
        }
    }
    let Some(p) = load(fs)? else {
        return Err(Error::Invalid("there is no balance to resume".into()));
    };
    if matches!(p.state, State::Finished | State::Canceled) || pending(fs)?.is_empty() {
        return Err(Error::Invalid(format!(
            "the last balance is {}; nothing to resume",
            p.state.name()
        )));
    }
    let plan = Plan::new(fs, &p.args)?;
    let run = BalanceRun::new(p.args, p.started_at, p.block_groups_done, p.bytes_relocated);
    run.total.store(p.block_groups_total, Ordering::Release);
    let run = Arc::new(run);
    save(fs, &run.persisted())?;
    *slot = Some(run.clone());
    drop(slot);
    launch(fs, run.clone(), plan, wait);
    Ok(run)
}

fn launch(fs: &Arc<FsInfo>, run: Arc<BalanceRun>, plan: Plan, wait: bool) {
    if wait {
        drive(fs, &run, &plan);
    } else {
        let f = fs.clone();
        crate::util::sched::spawn(move || drive(&f, &run, &plan));
    }
}

/// Ask a running balance to stop after the current step; `resume` continues.
pub fn pause(fs: &FsInfo) -> Result<()> {
    let run = active(fs).ok_or_else(|| Error::Invalid("no balance is running".into()))?;
    run.pause.store(true, Ordering::Release);
    Ok(())
}

/// Stop a running balance, or forget a paused or interrupted one.
pub fn cancel(fs: &FsInfo) -> Result<()> {
    if let Some(run) = active(fs) {
        run.cancel.store(true, Ordering::Release);
        return Ok(());
    }
    match load(fs)? {
        Some(mut p) if matches!(p.state, State::Paused | State::Interrupted | State::Running) => {
            p.state = State::Canceled;
            clear_pending(fs)?;
            save(fs, &p)?;
            commit(fs)?;
            Ok(())
        }
        _ => Err(Error::Invalid("no balance is running or paused".into())),
    }
}

fn clear_pending(fs: &FsInfo) -> Result<()> {
    let left = pending(fs)?;
    transaction::change(fs, |ctx| {
        for &s in &left {
            ctx.delete(tree_id::DEV, &pending_key(s))?;
        }
        Ok(())
    })
}

/// Status of the running or last balance.
pub fn status(fs: &FsInfo) -> Result<BalanceStatus> {
    if let Some(r) = JobSlot::<BalanceRun>::of(fs).current() {
        return Ok(r.status(fs));
    }
    Ok(match load(fs)? {
        None => BalanceStatus {
            state: State::Never,
            started_at: 0,
            block_groups_total: 0,
            block_groups_done: 0,
            block_groups_left: 0,
            bytes_relocated: 0,
            pace: Pace::default(),
            args: None,
            failure: None,
        },
        Some(p) => BalanceStatus {
            // Saved as running: the process that ran it is gone.
            state: if p.state == State::Running {
                State::Interrupted
            } else {
                p.state
            },
            started_at: p.started_at,
            block_groups_total: p.block_groups_total,
            block_groups_done: p.block_groups_done,
            block_groups_left: pending(fs)?.len() as u64,
            bytes_relocated: p.bytes_relocated,
            pace: Pace::default(),
            args: Some(p.args),
            failure: p.failure,
        },
    })
}

fn drive(fs: &FsInfo, run: &BalanceRun, plan: &Plan) {
    let end = match drive_inner(fs, run, plan) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("balance stopped: {e}");
            *lock(&run.failure) = Some(match &e {
                Error::NoSpace(_) => format!("{e}; free space and run `balance resume`"),
                _ => e.to_string(),
            });
            State::Interrupted
        }
    };
    run.clock.set_paused(true);
    *lock(&run.state) = end;
    if !fs.is_aborted() {
        let r = (|| {
            if end == State::Canceled {
                clear_pending(fs)?;
            }
            save(fs, &run.persisted())?;
            commit(fs).map(|_| ())
        })();
        if let Err(e) = r {
            tracing::warn!("balance: saving the final state: {e}");
        }
    }
    tracing::info!(
        "balance {}: {} of {} block groups, {} bytes relocated",
        end.name(),
        run.done.load(Ordering::Acquire),
        run.total.load(Ordering::Acquire),
        run.bytes.load(Ordering::Acquire)
    );
    run.finished.finish();
}

fn drive_inner(fs: &FsInfo, run: &BalanceRun, plan: &Plan) -> Result<State> {
    let stop = || {
        run.pause.load(Ordering::Acquire) || run.cancel.load(Ordering::Acquire) || fs.is_aborted()
    };
    for start in pending(fs)? {
        if run.cancel.load(Ordering::Acquire) {
            return Ok(State::Canceled);
        }
        if run.pause.load(Ordering::Acquire) {
            return Ok(State::Paused);
        }
        crate::failpoint!("balance::before_group", start);
        if plan.still_matches(fs, start) {
            match relocate_block_group(fs, start, &stop) {
                Ok(s) => {
                    run.bytes.fetch_add(s.bytes_relocated, Ordering::AcqRel);
                }
                Err(Error::Busy(_)) if stop() && !fs.is_aborted() => {
                    return Ok(if run.cancel.load(Ordering::Acquire) {
                        State::Canceled
                    } else {
                        State::Paused
                    });
                }
                Err(e) => return Err(e),
            }
        }
        run.done.fetch_add(1, Ordering::AcqRel);
        let p = run.persisted();
        transaction::change(fs, |ctx| {
            ctx.delete(tree_id::DEV, &pending_key(start))?;
            Ok(())
        })?;
        save(fs, &p)?;
    }
    // Give relocated groups the cleaner could not take yet a chance now.
    for _ in 0..50 {
        commit(fs)?;
        crate::engine::block_group::delete_unused_bgs(fs)?;
        let waiting = fs.block_group_list().iter().any(|b| b.is_relocated());
        if !waiting {
            break;
        }
        crate::util::sched::sleep(Duration::from_millis(100));
    }
    Ok(State::Finished)
}
