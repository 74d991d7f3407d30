//! Online scrub: reads every allocated sector of every copy, verifies it
//! against the committed checksums and tree-block headers, and rewrites a bad
//! copy from a good one.
//!
//! Scrub takes none of the cleaner's or the transaction's locks. It walks the
//! commit roots (registered as a reader, re-taken per device extent so a long
//! scrub does not hold back space reuse) and survives the block-group
//! lifecycle by the rules of docs/ARCHITECTURE.md: a group that is gone or
//! whose range was reused is skipped (R1, R4); the group is frozen so its map
//! and device extents are not reused under it (R4); the chunk map is held by
//! reference (R2); repair uses only what it already holds (R5); commits never
//! wait for scrub (R6); a failed pool stops scrub (R7); an emptied group is
//! handed back to the cleaner on release (R3); `-r` never writes (R9).
//! Scrub's own metadata lookups never rewrite what they read: a bad tree
//! block is repaired (and counted) when scrub reaches it.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::btree::{Iter, Node};
use crate::chunk::volumes::{ChunkMap, Mapped};
use crate::engine::block_group::BlockGroup;
use crate::engine::fs_info::{tree_index, CommitRoots, FsInfo, NoRepair};
use crate::engine::transaction::Ctx;
use crate::failpoint;
use crate::format::{
    item, objectid, tree_id, DevExtent, ExtentItem, Key, MetadataItem, Put, Reader, SECTOR_BYTES,
    SUPER_BYTES, SUPER_OFFSETS,
};
use crate::util::error::{Error, Result};
use crate::util::sync::{lock, thread, Arc, AtomicBool, Mutex, Ordering};

/// Bytes read per step on a non-raid10 stripe.
pub const SCRUB_UNIT_BYTES: u64 = 1 << 20;
/// Error records kept (in memory and in the pool).
pub const MAX_ERROR_RECORDS: usize = 1000;
/// Progress is written to the pool every this many bytes of a device.
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// Pause before the next unit when client I/O happened since the last one.
const YIELD_TO_CLIENTS: Duration = Duration::from_millis(2);

/// Scrub counters, per device and in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    pub bytes_scrubbed: u64,
    pub data_bytes_scrubbed: u64,
    pub tree_bytes_scrubbed: u64,
    pub read_errors: u64,
    pub csum_errors: u64,
    pub verify_errors: u64,
    pub super_errors: u64,
    pub corrected_errors: u64,
    pub uncorrectable_errors: u64,
    pub unverified_errors: u64,
    pub no_csum_sectors: u64,
    pub block_groups_skipped_removed: u64,
}

impl Counters {
    fn fields(&mut self) -> [&mut u64; 12] {
        [
            &mut self.bytes_scrubbed,
            &mut self.data_bytes_scrubbed,
            &mut self.tree_bytes_scrubbed,
            &mut self.read_errors,
            &mut self.csum_errors,
            &mut self.verify_errors,
            &mut self.super_errors,
            &mut self.corrected_errors,
            &mut self.uncorrectable_errors,
            &mut self.unverified_errors,
            &mut self.no_csum_sectors,
            &mut self.block_groups_skipped_removed,
        ]
    }
    fn add(&mut self, o: &Counters) {
        let mut o = *o;
        for (a, b) in self.fields().into_iter().zip(o.fields()) {
            *a += *b;
        }
    }
    /// Errors of any kind found.
    pub fn errors(&self) -> u64 {
        self.read_errors + self.csum_errors + self.verify_errors + self.super_errors
    }
}

/// Scrub state as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Never,
    Running,
    Paused,
    Finished,
    Canceled,
    Interrupted,
}

impl State {
    /// Name as printed and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            State::Never => "never",
            State::Running => "running",
            State::Paused => "paused",
            State::Finished => "finished",
            State::Canceled => "canceled",
            State::Interrupted => "interrupted",
        }
    }
    fn to_u8(self) -> u8 {
        self as u8
    }
    fn from_u8(v: u8) -> State {
        match v {
            1 => State::Running,
            2 => State::Paused,
            3 => State::Finished,
            4 => State::Canceled,
            5 => State::Interrupted,
            _ => State::Never,
        }
    }
}

/// One thing scrub found.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ErrorRecord {
    pub devid: u64,
    pub physical: u64,
    pub logical: u64,
    pub volume: Option<String>,
    pub lba: Option<u64>,
    pub length_bytes: u64,
    pub kind: String,
    pub repaired: bool,
}

/// How to scrub.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ScrubOptions {
    /// Report only; never write (R9).
    pub readonly: bool,
    /// Only this device.
    pub devid: Option<u64>,
    /// Read rate cap per device; None = the default that yields to clients.
    pub limit_bytes_per_s: Option<u64>,
}

/// Per-device progress.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DevProgress {
    pub devid: u64,
    pub last_physical: u64,
    pub bytes_total: u64,
    pub done: bool,
    /// Bytes verified by this run (a resumed run starts at zero).
    pub bytes_scrubbed_this_run: u64,
    #[serde(flatten)]
    pub counters: Counters,
    /// Counters as of `last_physical`: what a checkpoint saves, so a resume
    /// from there neither loses nor counts twice what came after it.
    #[serde(skip)]
    pub saved: Counters,
}

/// `scrub status` output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScrubStatus {
    pub state: State,
    pub readonly: bool,
    pub started_at: u64,
    pub duration_s: f64,
    pub bytes_total: u64,
    pub rate_bytes_per_s: u64,
    pub eta_s: Option<u64>,
    /// Bytes verified by this run alone (less than the total after a resume).
    pub bytes_scrubbed_this_run: u64,
    #[serde(flatten)]
    pub counters: Counters,
    pub devices: Vec<DevProgress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<ErrorRecord>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// A scrub in progress (or just ended) in this process.
pub struct ScrubRun {
    opts: ScrubOptions,
    started_at: u64,
    state: Mutex<State>,
    cancel: AtomicBool,
    pause: AtomicBool,
    /// Active (unpaused) time before `since`, and when the current active span began.
    active: Mutex<(Duration, Option<Instant>)>,
    devs: Mutex<BTreeMap<u64, DevProgress>>,
    errors: Mutex<Vec<ErrorRecord>>,
    failure: Mutex<Option<String>>,
    done: (Mutex<bool>, crate::util::sync::Condvar),
}

pub(crate) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ScrubRun {
    fn active_time(&self) -> Duration {
        let a = lock(&self.active);
        a.0 + a.1.map(|t| t.elapsed()).unwrap_or_default()
    }
    fn set_paused(&self, paused: bool) {
        let mut a = lock(&self.active);
        match (paused, a.1) {
            (true, Some(t)) => {
                a.0 += t.elapsed();
                a.1 = None;
            }
            (false, None) => a.1 = Some(Instant::now()),
            _ => {}
        }
    }

    /// Current status.
    pub fn status(&self, with_errors: bool) -> ScrubStatus {
        let devs: Vec<DevProgress> = lock(&self.devs).values().cloned().collect();
        let mut c = Counters::default();
        for d in &devs {
            c.add(&d.counters);
        }
        let total: u64 = devs.iter().map(|d| d.bytes_total).sum();
        let active = self.active_time().as_secs_f64();
        let rate = if active > 0.0 {
            (c.bytes_scrubbed as f64 / active) as u64
        } else {
            0
        };
        let state = *lock(&self.state);
        let eta = (state == State::Running && rate > 0)
            .then(|| total.saturating_sub(c.bytes_scrubbed) / rate);
        ScrubStatus {
            state,
            readonly: self.opts.readonly,
            started_at: self.started_at,
            duration_s: active,
            bytes_total: total,
            rate_bytes_per_s: rate,
            eta_s: eta,
            bytes_scrubbed_this_run: devs.iter().map(|d| d.bytes_scrubbed_this_run).sum(),
            counters: c,
            devices: devs,
            errors: with_errors.then(|| lock(&self.errors).clone()),
            failure: lock(&self.failure).clone(),
        }
    }

    /// Block until the scrub ends.
    pub fn wait(&self) -> ScrubStatus {
        let (m, c) = &self.done;
        let mut d = lock(m);
        while !*d {
            d = c.wait(d).unwrap_or_else(|e| e.into_inner());
        }
        drop(d);
        self.status(false)
    }

    fn record(&self, r: ErrorRecord) {
        tracing::warn!(
            "scrub: {} at devid {} physical {:#x} logical {:#x}{}{}",
            r.kind,
            r.devid,
            r.physical,
            r.logical,
            match (&r.volume, r.lba) {
                (Some(v), Some(l)) => format!(" (volume {v} LBA {l})"),
                _ => String::new(),
            },
            if r.repaired { ", repaired" } else { "" }
        );
        let mut e = lock(&self.errors);
        if e.len() < MAX_ERROR_RECORDS {
            e.push(r);
        }
    }
}

/// Why a device scan stopped early.
enum Stop {
    Canceled,
    Failed(String),
}

// ---- persistence -------------------------------------------------------

fn state_key(devid: u64) -> Key {
    Key::new(objectid::SCRUB, item::SCRUB_STATE, devid)
}

fn encode_dev(run: &ScrubRun, st: State, d: &DevProgress) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u8(st.to_u8());
    v.put_u8(run.opts.readonly as u8);
    v.put_u64(run.started_at);
    v.put_u64(run.active_time().as_millis() as u64);
    v.put_u64(d.last_physical);
    v.put_u64(d.bytes_total);
    v.put_u8(d.done as u8);
    let mut c = d.saved;
    for f in c.fields() {
        v.put_u64(*f);
    }
    v
}

struct Persisted {
    state: State,
    readonly: bool,
    started_at: u64,
    active_ms: u64,
    dev: DevProgress,
}

fn decode_dev(devid: u64, b: &[u8]) -> Option<Persisted> {
    let mut r = Reader::new(b);
    let state = State::from_u8(r.u8().ok()?);
    let readonly = r.u8().ok()? != 0;
    let started_at = r.u64().ok()?;
    let active_ms = r.u64().ok()?;
    let last_physical = r.u64().ok()?;
    let bytes_total = r.u64().ok()?;
    let done = r.u8().ok()? != 0;
    let mut counters = Counters::default();
    for f in counters.fields() {
        *f = r.u64().ok()?;
    }
    Some(Persisted {
        state,
        readonly,
        started_at,
        active_ms,
        dev: DevProgress {
            devid,
            last_physical,
            bytes_total,
            done,
            bytes_scrubbed_this_run: 0,
            counters,
            saved: counters,
        },
    })
}

/// Write progress into the running transaction (durable at the next commit).
fn checkpoint(fs: &FsInfo, run: &ScrubRun) {
    if run.opts.readonly {
        // -r writes nothing at all, progress included (R9).
        return;
    }
    let st = *lock(&run.state);
    let devs: Vec<DevProgress> = lock(&run.devs).values().cloned().collect();
    let errors = lock(&run.errors).clone();
    let mut t = lock(&fs.trans);
    let r = Ctx::begin(fs, &mut t).and_then(|mut ctx| {
        for d in &devs {
            ctx.insert(tree_id::DEV, state_key(d.devid), encode_dev(run, st, d))?;
        }
        for (i, e) in errors.iter().enumerate() {
            let k = Key::new(objectid::SCRUB, item::SCRUB_ERROR, i as u64);
            if ctx.get(tree_id::DEV, &k)?.is_none() {
                let v = serde_json::to_vec(e).unwrap_or_default();
                ctx.insert(tree_id::DEV, k, v)?;
            }
        }
        Ok(())
    });
    if let Err(e) = r {
        tracing::warn!("scrub: cannot record progress: {e}");
    }
}

fn load_persisted(fs: &FsInfo) -> Result<Vec<Persisted>> {
    let root = lock(&fs.trans).root(tree_id::DEV);
    let mut out = Vec::new();
    for r in Iter::new(fs, &root, state_key(0), state_key(u64::MAX)) {
        let (k, v) = r?;
        if let Some(p) = decode_dev(k.offset, &v) {
            out.push(p);
        }
    }
    Ok(out)
}

fn load_errors(fs: &FsInfo) -> Result<Vec<ErrorRecord>> {
    let root = lock(&fs.trans).root(tree_id::DEV);
    let mut out = Vec::new();
    let (a, b) = (
        Key::new(objectid::SCRUB, item::SCRUB_ERROR, 0),
        Key::new(objectid::SCRUB, item::SCRUB_ERROR, u64::MAX),
    );
    for r in Iter::new(fs, &root, a, b) {
        let (_, v) = r?;
        if let Ok(e) = serde_json::from_slice(&v) {
            out.push(e);
        }
    }
    Ok(out)
}

fn clear_errors(ctx: &mut Ctx) -> Result<()> {
    let ks: Vec<Key> = ctx
        .range(
            tree_id::DEV,
            Key::new(objectid::SCRUB, item::SCRUB_ERROR, 0),
            Key::new(objectid::SCRUB, item::SCRUB_ERROR, u64::MAX),
        )?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for k in ks {
        ctx.delete(tree_id::DEV, &k)?;
    }
    Ok(())
}

// ---- control -----------------------------------------------------------

fn current(fs: &FsInfo) -> Option<Arc<ScrubRun>> {
    lock(&fs.scrub).clone()
}

fn is_active(run: &ScrubRun) -> bool {
    matches!(*lock(&run.state), State::Running | State::Paused)
}

/// Status of the current or last scrub (from the pool if none ran here).
pub fn status(fs: &FsInfo, with_errors: bool) -> Result<ScrubStatus> {
    if let Some(run) = current(fs) {
        return Ok(run.status(with_errors));
    }
    let p = load_persisted(fs)?;
    let Some(first) = p.first() else {
        return Ok(ScrubStatus {
            state: State::Never,
            readonly: false,
            started_at: 0,
            duration_s: 0.0,
            bytes_total: 0,
            rate_bytes_per_s: 0,
            eta_s: None,
            bytes_scrubbed_this_run: 0,
            counters: Counters::default(),
            devices: Vec::new(),
            errors: with_errors.then(Vec::new),
            failure: None,
        });
    };
    let mut c = Counters::default();
    for d in &p {
        c.add(&d.dev.counters);
    }
    let state = match first.state {
        // It was running when the process that ran it stopped.
        State::Running | State::Paused => State::Interrupted,
        s => s,
    };
    let secs = first.active_ms as f64 / 1000.0;
    Ok(ScrubStatus {
        state,
        readonly: first.readonly,
        started_at: first.started_at,
        duration_s: secs,
        bytes_total: p.iter().map(|d| d.dev.bytes_total).sum(),
        rate_bytes_per_s: if secs > 0.0 {
            (c.bytes_scrubbed as f64 / secs) as u64
        } else {
            0
        },
        eta_s: None,
        bytes_scrubbed_this_run: 0,
        counters: c,
        devices: p.iter().map(|d| d.dev.clone()).collect(),
        errors: if with_errors {
            Some(load_errors(fs)?)
        } else {
            None
        },
        failure: None,
    })
}

/// Bytes of allocated data and metadata on `devid`, per its device extents.
fn device_total(fs: &FsInfo, roots: &CommitRoots, devid: u64) -> Result<u64> {
    let mut total = 0;
    for r in Iter::new(
        &NoRepair(fs),
        &roots.roots[tree_index(tree_id::DEV)],
        Key::new(devid, item::DEV_EXTENT, 0),
        Key::new(devid, item::DEV_EXTENT, u64::MAX),
    ) {
        let (_, v) = r?;
        let Ok(de) = DevExtent::decode(&v) else {
            continue;
        };
        if let Some(bg) = fs.block_group(de.chunk_logical) {
            let used = bg.used_bytes();
            total += (used as u128 * de.length as u128 / bg.length.max(1) as u128) as u64;
        }
    }
    Ok(total)
}

/// Start a scrub of every device (or one); returns at once.
pub fn start(fs: &Arc<FsInfo>, opts: ScrubOptions) -> Result<Arc<ScrubRun>> {
    launch(fs, opts, None)
}

/// Continue the last interrupted or canceled scrub from its checkpoint, or
/// un-pause a paused one.
pub fn resume(fs: &Arc<FsInfo>) -> Result<Arc<ScrubRun>> {
    if let Some(run) = current(fs) {
        {
            let mut st = lock(&run.state);
            if *st == State::Paused {
                run.pause.store(false, Ordering::Release);
                *st = State::Running;
                run.set_paused(false);
                drop(st);
                return Ok(run);
            }
        }
        if is_active(&run) {
            return Err(Error::Busy("scrub is already running".into()));
        }
    }
    let p = load_persisted(fs)?;
    let Some(first) = p.first() else {
        return Err(Error::Invalid("no scrub to resume".into()));
    };
    if first.state == State::Finished {
        return Err(Error::Invalid(
            "the last scrub finished; start a new one".into(),
        ));
    }
    let opts = ScrubOptions {
        readonly: first.readonly,
        devid: None,
        limit_bytes_per_s: None,
    };
    launch(fs, opts, Some(p))
}

fn launch(
    fs: &Arc<FsInfo>,
    opts: ScrubOptions,
    from: Option<Vec<Persisted>>,
) -> Result<Arc<ScrubRun>> {
    fs.check_abort()?;
    let mut slot = lock(&fs.scrub);
    if slot.as_ref().is_some_and(|r| is_active(r)) {
        return Err(Error::Busy("scrub is already running".into()));
    }
    let devids: Vec<u64> = fs.devices().iter().map(|d| d.devid).collect();
    if let Some(d) = opts.devid {
        if !devids.contains(&d) {
            return Err(Error::Invalid(format!("no device with devid {d}")));
        }
    }
    let (roots, _g) = fs.commit_snapshot();
    let mut devs = BTreeMap::new();
    let mut started_at = now_s();
    let mut active = Duration::ZERO;
    for &devid in &devids {
        if opts.devid.is_some_and(|d| d != devid) {
            continue;
        }
        let prev = from
            .as_ref()
            .and_then(|p| p.iter().find(|x| x.dev.devid == devid));
        let mut d = match prev {
            Some(p) => {
                started_at = p.started_at;
                active = Duration::from_millis(p.active_ms);
                p.dev.clone()
            }
            None if from.is_some() => continue,
            None => DevProgress {
                devid,
                ..Default::default()
            },
        };
        if prev.is_none() {
            d.bytes_total = device_total(fs, &roots, devid)?;
        }
        devs.insert(devid, d);
    }
    let run = Arc::new(ScrubRun {
        opts,
        started_at,
        state: Mutex::new(State::Running),
        cancel: AtomicBool::new(false),
        pause: AtomicBool::new(false),
        active: Mutex::new((active, Some(Instant::now()))),
        devs: Mutex::new(devs),
        errors: Mutex::new(Vec::new()),
        failure: Mutex::new(None),
        done: (Mutex::new(false), crate::util::sync::Condvar::new()),
    });
    if from.is_none() && !run.opts.readonly {
        let mut t = lock(&fs.trans);
        if let Ok(mut ctx) = Ctx::begin(fs, &mut t) {
            clear_errors(&mut ctx)?;
        }
    } else if from.is_some() {
        *lock(&run.errors) = load_errors(fs)?;
    }
    *slot = Some(run.clone());
    drop(slot);
    checkpoint(fs, &run);
    let (fs2, run2) = (fs.clone(), run.clone());
    thread::spawn(move || coordinate(fs2, run2));
    Ok(run)
}

fn coordinate(fs: Arc<FsInfo>, run: Arc<ScrubRun>) {
    let ids: Vec<u64> = lock(&run.devs)
        .values()
        .filter(|d| !d.done)
        .map(|d| d.devid)
        .collect();
    let handles: Vec<_> = ids
        .into_iter()
        .map(|devid| {
            let (f, r) = (fs.clone(), run.clone());
            thread::spawn(move || scrub_device(&f, &r, devid))
        })
        .collect();
    let mut failed = None;
    let mut canceled = false;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(Stop::Canceled)) => canceled = true,
            Ok(Err(Stop::Failed(m))) => failed = Some(m),
            Err(_) => failed = Some("scrub thread panicked".into()),
        }
    }
    let end = if failed.is_some() {
        State::Interrupted
    } else if canceled {
        State::Canceled
    } else {
        State::Finished
    };
    run.set_paused(true);
    *lock(&run.state) = end;
    *lock(&run.failure) = failed.clone();
    if !fs.is_aborted() {
        checkpoint(&fs, &run);
    }
    // Waiters learn the outcome before the final commit: scrub never waits
    // on a commit to report (a stuck commit must not hang `scrub -B`).
    {
        let (m, c) = &run.done;
        *lock(m) = true;
        c.notify_all();
    }
    if !fs.is_aborted() && !run.opts.readonly {
        if let Err(e) = crate::engine::transaction::commit(&fs) {
            tracing::warn!("scrub: final commit: {e}");
        }
    }
    let s = run.status(false);
    tracing::info!(
        "scrub {:?}: {} bytes scrubbed, {} errors, {} corrected, {} uncorrectable{}",
        end,
        s.counters.bytes_scrubbed,
        s.counters.errors(),
        s.counters.corrected_errors,
        s.counters.uncorrectable_errors,
        failed.map(|f| format!(" ({f})")).unwrap_or_default()
    );
}

/// Ask a running scrub to stop; progress is kept for `resume`.
pub fn cancel(fs: &FsInfo) -> Result<()> {
    let run = current(fs)
        .filter(|r| is_active(r))
        .ok_or_else(|| Error::Invalid("no scrub is running".into()))?;
    run.cancel.store(true, Ordering::Release);
    run.pause.store(false, Ordering::Release);
    Ok(())
}

/// Pause a running scrub.
pub fn pause(fs: &FsInfo) -> Result<()> {
    let run = current(fs).ok_or_else(|| Error::Invalid("no scrub is running".into()))?;
    // Check and change under one lock: the coordinator may be ending the run.
    let mut st = lock(&run.state);
    if *st != State::Running {
        return Err(Error::Invalid("no scrub is running".into()));
    }
    run.pause.store(true, Ordering::Release);
    *st = State::Paused;
    run.set_paused(true);
    Ok(())
}

// ---- the scan ----------------------------------------------------------

fn update<R>(run: &ScrubRun, devid: u64, f: impl FnOnce(&mut DevProgress) -> R) -> R {
    let mut d = lock(&run.devs);
    let p = d.entry(devid).or_insert_with(|| DevProgress {
        devid,
        ..Default::default()
    });
    f(p)
}

fn scrub_supers(fs: &FsInfo, run: &ScrubRun, devid: u64) {
    let Some(d) = fs.device(devid) else {
        return;
    };
    for &o in &SUPER_OFFSETS {
        if o + SUPER_BYTES as u64 > d.total_bytes {
            break;
        }
        let mut b = vec![0u8; SUPER_BYTES];
        let ok = d.dev.read_at(&mut b, o).is_ok()
            && crate::format::Superblock::decode(&b)
                .is_ok_and(|s| s.pool_uuid == fs.pool_uuid && s.devid == devid);
        // A device joining (superblocks not written yet) or leaving (wiped)
        // is not corrupt.
        if !d.supers_valid.load(Ordering::Acquire) {
            return;
        }
        if !ok {
            update(run, devid, |p| p.counters.super_errors += 1);
            run.record(ErrorRecord {
                devid,
                physical: o,
                logical: 0,
                volume: None,
                lba: None,
                length_bytes: SUPER_BYTES as u64,
                kind: "super".into(),
                repaired: false,
            });
        }
    }
}

/// Between units: cancel, pause, pool failure (R7).
fn checkpoint_wait(fs: &FsInfo, run: &ScrubRun) -> Result<(), Stop> {
    loop {
        if run.cancel.load(Ordering::Acquire) {
            return Err(Stop::Canceled);
        }
        if fs.is_aborted() {
            return Err(Stop::Failed("the pool failed; scrub stopped".into()));
        }
        if !run.pause.load(Ordering::Acquire) && fs.scrub_hold.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn scrub_device(fs: &FsInfo, run: &ScrubRun, devid: u64) -> Result<(), Stop> {
    let resume_at = update(run, devid, |p| p.last_physical);
    if resume_at == 0 {
        scrub_supers(fs, run, devid);
    }
    let mut pos = resume_at;
    let mut pacer = Pacer::new(run.opts.limit_bytes_per_s, fs);
    loop {
        checkpoint_wait(fs, run)?;
        // A fresh snapshot per device extent: a long scrub must not hold
        // back the reuse of everything freed since it started.
        let mut snap = fs.commit_snapshot();
        let roots = snap.0.clone();
        let next = Iter::new(
            &NoRepair(fs),
            &roots.roots[tree_index(tree_id::DEV)],
            Key::new(devid, item::DEV_EXTENT, 0),
            Key::new(devid, item::DEV_EXTENT, u64::MAX),
        )
        .map(|r| {
            let (k, v) = r?;
            let d = DevExtent::decode(&v)
                .map_err(|e| crate::Error::Corrupt(format!("dev extent {k}: {e}")))?;
            Ok::<_, crate::Error>((k.offset, d))
        })
        .find(|r| r.as_ref().map_or(true, |(phys, d)| phys + d.length > pos));
        // An unreadable dev tree ends this device's scrub as a failure, not
        // as "nothing left to scrub".
        let Some((phys, de)) = next
            .transpose()
            .map_err(|e| Stop::Failed(format!("devid {devid}: reading the dev tree: {e}")))?
        else {
            break;
        };
        failpoint!("scrub::dev_extent_found", de.chunk_logical);
        let from = pos.max(phys) - phys;
        scrub_dev_extent(fs, run, devid, phys, de, from, &mut snap, &mut pacer)?;
        drop(snap);
        pos = phys + de.length;
        update(run, devid, |p| {
            p.last_physical = pos;
            p.saved = p.counters;
        });
        checkpoint(fs, run);
    }
    update(run, devid, |p| p.done = true);
    Ok(())
}

struct Pacer {
    limit: Option<u64>,
    start: Instant,
    bytes: u64,
    fg_seen: u64,
}

impl Pacer {
    fn new(limit: Option<u64>, fs: &FsInfo) -> Pacer {
        Pacer {
            limit,
            start: Instant::now(),
            bytes: 0,
            fg_seen: fs.client_ops.load(Ordering::Relaxed),
        }
    }
    fn pace(&mut self, fs: &FsInfo, bytes: u64) {
        self.bytes += bytes;
        match self.limit {
            Some(l) if l > 0 => {
                let due = Duration::from_secs_f64(self.bytes as f64 / l as f64);
                let el = self.start.elapsed();
                if due > el {
                    thread::sleep(due - el);
                }
            }
            _ => {
                // Default: give way to clients whenever they were active.
                let now = fs.client_ops.load(Ordering::Relaxed);
                if now != self.fg_seen {
                    self.fg_seen = now;
                    thread::sleep(YIELD_TO_CLIENTS);
                }
            }
        }
    }
}

/// What occupies a logical range in the commit root.
#[derive(Debug, Clone)]
enum Alloc {
    Data {
        start: u64,
        len: u64,
        ei: ExtentItem,
    },
    Tree {
        addr: u64,
        meta: MetadataItem,
        level: u8,
    },
}

impl Alloc {
    fn range(&self, node_bytes: u64) -> (u64, u64) {
        match self {
            Alloc::Data { start, len, .. } => (*start, *len),
            Alloc::Tree { addr, .. } => (*addr, node_bytes),
        }
    }
}

fn allocations(fs: &FsInfo, roots: &CommitRoots, bg: &BlockGroup) -> Result<Vec<Alloc>> {
    let mut out = Vec::new();
    for r in Iter::new(
        &NoRepair(fs),
        &roots.roots[tree_index(tree_id::EXTENT)],
        Key::new(bg.start, 0, 0),
        Key::new(bg.end() - 1, u8::MAX, u64::MAX),
    ) {
        let (k, v) = r?;
        match k.ty {
            item::EXTENT => {
                if let Ok(ei) = ExtentItem::decode(&v) {
                    out.push(Alloc::Data {
                        start: k.objectid,
                        len: k.offset,
                        ei,
                    });
                }
            }
            item::METADATA => {
                if let Ok(meta) = MetadataItem::decode(&v) {
                    out.push(Alloc::Tree {
                        addr: k.objectid,
                        meta,
                        level: k.offset as u8,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn scrub_dev_extent<'f>(
    fs: &'f FsInfo,
    run: &ScrubRun,
    devid: u64,
    phys: u64,
    de: DevExtent,
    from: u64,
    snap: &mut Snapshot<'f>,
    pacer: &mut Pacer,
) -> Result<(), Stop> {
    let skip = |why: &str| {
        tracing::debug!("scrub: devid {devid} physical {phys:#x}: {why}; skipped");
        update(run, devid, |p| p.counters.block_groups_skipped_removed += 1);
        Ok(())
    };
    let Some(bg) = fs.block_group(de.chunk_logical) else {
        return skip("block group is gone");
    };
    failpoint!("scrub::group_found", bg.start);
    if bg.start != de.chunk_logical || bg.created_gen > snap.0.gen {
        // Deleted, and its range reused by a newer group (R4).
        return skip("range reused by a newer block group");
    }
    let Some(freeze) = bg.freeze(fs) else {
        return skip("block group was removed");
    };
    failpoint!("scrub::frozen", bg.start);
    // Mark the group as being scrubbed (the cleaner skips it). Taking the
    // mark never waits for a commit, so there is nothing to deadlock with (R6).
    let mark = bg.scrub_mark(fs);
    failpoint!("scrub::group_frozen", bg.start);
    let r = scrub_group(fs, run, devid, phys, de, from, snap, &bg, pacer);
    failpoint!("scrub::before_release", bg.start);
    // The cleaner skipped it while scrub held it: the mark's release hands
    // it back (R3); the freeze's release drops a deferred map (R4).
    drop(mark);
    drop(freeze);
    r
}

#[allow(clippy::too_many_arguments)]
fn scrub_group<'f>(
    fs: &'f FsInfo,
    run: &ScrubRun,
    devid: u64,
    phys: u64,
    de: DevExtent,
    from: u64,
    snap: &mut Snapshot<'f>,
    bg: &Arc<BlockGroup>,
    pacer: &mut Pacer,
) -> Result<(), Stop> {
    failpoint!("scrub::before_map_lookup", bg.start);
    let Some(map) = fs.mapping.get(bg.start) else {
        if bg.is_removed() {
            // Deleted under us: not an error (R1, the seed).
            update(run, devid, |p| p.counters.block_groups_skipped_removed += 1);
            return Ok(());
        }
        return Err(Stop::Failed(format!(
            "block group {:#x} has no chunk map",
            bg.start
        )));
    };
    if map.start() != bg.start || map.item.stripe_bytes < de.length {
        update(run, devid, |p| p.counters.block_groups_skipped_removed += 1);
        return Ok(());
    }
    let mut allocs = allocations(fs, &snap.0, bg).map_err(|e| Stop::Failed(e.to_string()))?;
    let mut taken = Instant::now();
    let idxs: Vec<usize> = map
        .item
        .stripes
        .iter()
        .enumerate()
        .filter(|(_, s)| s.devid == devid && s.physical == phys)
        .map(|(i, _)| i)
        .collect();
    let unit = if map.item.stripe_unit_bytes > 0 {
        map.item.stripe_unit_bytes
    } else {
        SCRUB_UNIT_BYTES
    };
    let mut csums: HashMap<u64, CsumLookup> = HashMap::new();
    let mut buf = vec![0u8; unit as usize];
    for idx in idxs {
        let mut off = from / unit * unit;
        while off < de.length {
            checkpoint_wait(fs, run)?;
            failpoint!("scrub::unit", bg.start);
            if bg.is_removed() {
                // The group went away mid-way: stop quietly.
                update(run, devid, |p| p.counters.block_groups_skipped_removed += 1);
                return Ok(());
            }
            if taken.elapsed() >= SNAPSHOT_REFRESH {
                // A newer view only fits the map scrub holds if the chunk
                // was not switched meanwhile (device replace): extents
                // written since went to the new stripes, not this one.
                let same = fs
                    .mapping
                    .get(bg.start)
                    .is_some_and(|m| Arc::ptr_eq(&m, &map));
                if !same {
                    update(run, devid, |p| p.counters.block_groups_skipped_removed += 1);
                    return Ok(());
                }
                // A view held for long keeps everything freed since pinned
                // (writers would run out of space under a slow scrub): move
                // to the newest commit. The group is frozen, so its map and
                // range stay; extents freed meanwhile just drop out.
                *snap = fs.commit_snapshot();
                allocs = allocations(fs, &snap.0, bg).map_err(|e| Stop::Failed(e.to_string()))?;
                csums.clear();
                taken = Instant::now();
            }
            let len = unit.min(de.length - off);
            let Some(logical) = map.physical_to_logical(idx, off) else {
                break;
            };
            let n = scrub_unit(
                fs,
                run,
                &map,
                idx,
                devid,
                phys + off,
                logical,
                &mut buf[..len as usize],
                &allocs,
                &snap.0,
                &mut csums,
            );
            pacer.pace(fs, n);
            off += len;
            if off.is_multiple_of(CHECKPOINT_BYTES) {
                update(run, devid, |p| {
                    p.last_physical = phys + off;
                    p.saved = p.counters;
                });
                checkpoint(fs, run);
            }
        }
    }
    Ok(())
}

/// A commit-root view and the reader registration that keeps it valid.
type Snapshot<'a> = (CommitRoots, crate::engine::fs_info::ReadGuard<'a>);

/// How long scrub works from one commit-root view before taking a newer one.
const SNAPSHOT_REFRESH: Duration = Duration::from_secs(1);

/// A data extent's checksum item as scrub found it.
#[derive(Clone)]
enum CsumLookup {
    Found(Vec<u8>),
    Missing,
    Unreadable,
}

fn csum_item(fs: &FsInfo, roots: &CommitRoots, start: u64) -> CsumLookup {
    match crate::btree::get(
        &NoRepair(fs),
        &roots.roots[tree_index(tree_id::CSUM)],
        &Key::new(objectid::CSUM, item::CSUM, start),
    ) {
        Ok(Some(v)) => CsumLookup::Found(v),
        Ok(None) => CsumLookup::Missing,
        Err(e) => {
            tracing::warn!("scrub: checksums of extent {start:#x} unreadable: {e}");
            CsumLookup::Unreadable
        }
    }
}

/// Verify one unit; returns the bytes of data and metadata it covered.
#[allow(clippy::too_many_arguments)]
fn scrub_unit(
    fs: &FsInfo,
    run: &ScrubRun,
    map: &Arc<ChunkMap>,
    idx: usize,
    devid: u64,
    physical: u64,
    logical: u64,
    buf: &mut [u8],
    allocs: &[Alloc],
    roots: &CommitRoots,
    csums: &mut HashMap<u64, CsumLookup>,
) -> u64 {
    let nb = fs.node_bytes as u64;
    let end = logical + buf.len() as u64;
    let first = allocs.partition_point(|a| {
        let (s, l) = a.range(nb);
        s + l <= logical
    });
    let here: Vec<&Alloc> = allocs[first..]
        .iter()
        .take_while(|a| a.range(nb).0 < end)
        .collect();
    if here.is_empty() {
        return 0;
    }
    let Some(dev) = fs.device(devid) else {
        return 0;
    };
    let read_ok = dev.dev.read_at(buf, physical).is_ok();
    let cs = fs.csum_type.size_bytes();
    let s = SECTOR_BYTES;
    let mut covered = 0;
    for a in here {
        let (astart, alen) = a.range(nb);
        let (os, oe) = (astart.max(logical), (astart + alen).min(end));
        match a {
            Alloc::Data { start, ei, .. } => {
                let sums = csums
                    .entry(*start)
                    .or_insert_with(|| csum_item(fs, roots, *start))
                    .clone();
                covered += oe - os;
                update(run, devid, |p| {
                    p.counters.bytes_scrubbed += oe - os;
                    p.counters.data_bytes_scrubbed += oe - os;
                    p.bytes_scrubbed_this_run += oe - os;
                });
                let sums = match sums {
                    CsumLookup::Found(x) if x.len() as u64 >= alen / s * cs as u64 => x,
                    CsumLookup::Unreadable => {
                        // The checksums exist but their tree block cannot be
                        // read: these sectors are not verified (counted, not
                        // passed off as checksum-less).
                        update(run, devid, |p| {
                            p.counters.unverified_errors += (oe - os) / s
                        });
                        continue;
                    }
                    _ => {
                        update(run, devid, |p| p.counters.no_csum_sectors += (oe - os) / s);
                        continue;
                    }
                };
                let mut sec = os;
                while sec < oe {
                    let i = ((sec - *start) / s) as usize;
                    let b = (sec - logical) as usize;
                    let want = &sums[i * cs..(i + 1) * cs];
                    let good = read_ok && fs.csum_type.matches(&buf[b..b + s as usize], want);
                    if !good {
                        let kind = if read_ok { "data csum" } else { "data read" };
                        update(run, devid, |p| {
                            if read_ok {
                                p.counters.csum_errors += 1
                            } else {
                                p.counters.read_errors += 1
                            }
                        });
                        let fixed = repair(fs, run, map, idx, devid, sec, s, &|b| {
                            fs.csum_type.matches(b, want)
                        });
                        let (vol, lba) = who(fs, ei, sec - *start);
                        run.record(ErrorRecord {
                            devid,
                            physical: physical + (sec - logical),
                            logical: sec,
                            volume: vol,
                            lba,
                            length_bytes: s,
                            kind: kind.into(),
                            repaired: fixed,
                        });
                    }
                    sec += s;
                }
            }
            Alloc::Tree { addr, meta, level } => {
                covered += nb;
                update(run, devid, |p| {
                    p.counters.bytes_scrubbed += nb;
                    p.counters.tree_bytes_scrubbed += nb;
                    p.bytes_scrubbed_this_run += nb;
                });
                if *addr < logical || addr + nb > end {
                    continue;
                }
                let b = (addr - logical) as usize;
                let check = |bytes: &[u8]| -> Result<(), &'static str> {
                    let n = Node::decode(bytes, *addr, &fs.pool_uuid, fs.csum_type)
                        .map_err(|_| "tree csum")?;
                    if n.gen != meta.gen || n.owner != meta.owner || n.level != *level {
                        return Err("tree verify");
                    }
                    Ok(())
                };
                let verdict = if read_ok {
                    check(&buf[b..b + nb as usize])
                } else {
                    Err("tree read")
                };
                if let Err(kind) = verdict {
                    update(run, devid, |p| match kind {
                        "tree csum" => p.counters.csum_errors += 1,
                        "tree verify" => p.counters.verify_errors += 1,
                        _ => p.counters.read_errors += 1,
                    });
                    let fixed = repair(fs, run, map, idx, devid, *addr, nb, &|x| check(x).is_ok());
                    run.record(ErrorRecord {
                        devid,
                        physical: physical + (addr - logical),
                        logical: *addr,
                        volume: None,
                        lba: None,
                        length_bytes: nb,
                        kind: kind.into(),
                        repaired: fixed,
                    });
                }
            }
        }
    }
    covered
}

/// Which volume and LBA a data sector belongs to.
fn who(fs: &FsInfo, ei: &ExtentItem, delta: u64) -> (Option<String>, Option<u64>) {
    let Some(b) = ei.backrefs.first() else {
        return (None, None);
    };
    let name = lock(&fs.trans)
        .volumes
        .iter()
        .find(|(_, v)| v.id == b.volume_id)
        .map(|(n, _)| n.clone());
    (name, Some(b.lba_bytes + delta))
}

/// Find a good copy of [logical, +len) on another mirror and write it over
/// this device's copy. Uses only the map it holds (R5); never writes in
/// read-only mode (R9). Returns whether the bad copy was rewritten.
#[allow(clippy::too_many_arguments)]
fn repair(
    fs: &FsInfo,
    run: &ScrubRun,
    map: &Arc<ChunkMap>,
    idx: usize,
    devid: u64,
    logical: u64,
    len: u64,
    good: &dyn Fn(&[u8]) -> bool,
) -> bool {
    failpoint!("scrub::before_repair", map.start());
    let Ok(pieces) = map.map(logical, len) else {
        update(run, devid, |p| p.counters.uncorrectable_errors += 1);
        return false;
    };
    let stripe = map.item.stripes[idx];
    let mut buf = vec![0u8; len as usize];
    // The piece list has one entry for these sizes; find our copy in it.
    let p: &Mapped = &pieces[0];
    let ours = p.mirrors.iter().position(|&(d, ph)| {
        d == stripe.devid && ph >= stripe.physical && ph < stripe.physical + map.item.stripe_bytes
    });
    for m in 0..p.mirrors.len() {
        if Some(m) == ours {
            continue;
        }
        if fs.read_copy(p, m, &mut buf).is_err() || !good(&buf) {
            continue;
        }
        if run.opts.readonly {
            // A good copy exists; -r reports it and writes nothing.
            return false;
        }
        let Some(o) = ours else {
            break;
        };
        if bg_gone(fs, map) {
            return false;
        }
        match fs.write_copy(p, o, &buf) {
            Ok(()) => {
                update(run, devid, |x| x.counters.corrected_errors += 1);
                if let Some(d) = fs.device(devid) {
                    d.stats.corruption_errs.fetch_add(1, Ordering::Relaxed);
                    fs.dev_stats_dirty.store(true, Ordering::Release);
                }
                return true;
            }
            Err(e) => {
                tracing::warn!("scrub: repair write failed: {e}");
                break;
            }
        }
    }
    update(run, devid, |x| x.counters.uncorrectable_errors += 1);
    false
}

fn bg_gone(fs: &FsInfo, map: &ChunkMap) -> bool {
    fs.block_group_at(map.start())
        .is_none_or(|b| b.is_removed())
}
