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
//!
//! This file is the control (start, resume, pause, cancel, status); `scan`
//! walks devices and groups, `verify` checks a unit, `repair` rewrites a bad
//! copy, `persist` keeps progress and the error log in the pool.

mod persist;
mod readahead;
mod repair;
mod scan;
mod verify;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::btree::Iter;
use crate::engine::fs_info::{tree_index, CommitRoots, FsInfo, NoRepair};
use crate::engine::transaction::Ctx;
use crate::format::progress::SCRUB_COUNTERS;
use crate::format::{item, tree_id, DevExtent, ExtentItem, Key};
use crate::jobs::control::{ActiveClock, Completion, JobSlot};
use crate::util::error::{Error, Result};
use crate::util::sync::{lock, thread, Arc, AtomicBool, Mutex, Ordering};
use crate::util::time::now_s;

use persist::{checkpoint, clear_errors, load_errors, load_persisted, Persisted};
use scan::scrub_device;

/// Bytes read per step on a non-raid10 stripe.
pub const SCRUB_UNIT_BYTES: u64 = 1 << 20;
/// Error records kept (in memory and in the pool).
pub const MAX_ERROR_RECORDS: usize = 1000;

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
    fn fields(&mut self) -> [&mut u64; SCRUB_COUNTERS] {
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
    /// In the order of the progress item.
    fn to_array(mut self) -> [u64; SCRUB_COUNTERS] {
        self.fields().map(|f| *f)
    }
    fn from_array(a: [u64; SCRUB_COUNTERS]) -> Counters {
        let mut c = Counters::default();
        for (f, v) in c.fields().into_iter().zip(a) {
            *f = v;
        }
        c
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

/// What a record is about. Printed and serialized as the short text the
/// error log has always had, so old logs still read and scripts still match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ErrorKind {
    #[serde(rename = "data csum")]
    DataCsum,
    #[serde(rename = "data read")]
    DataRead,
    #[serde(rename = "tree csum")]
    TreeCsum,
    #[serde(rename = "tree verify")]
    TreeVerify,
    #[serde(rename = "tree read")]
    TreeRead,
    #[serde(rename = "super")]
    Super,
}

impl ErrorKind {
    /// Name as printed and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::DataCsum => "data csum",
            ErrorKind::DataRead => "data read",
            ErrorKind::TreeCsum => "tree csum",
            ErrorKind::TreeVerify => "tree verify",
            ErrorKind::TreeRead => "tree read",
            ErrorKind::Super => "super",
        }
    }
    /// Count one error of this kind.
    fn count(self, c: &mut Counters) {
        let n = match self {
            ErrorKind::DataCsum | ErrorKind::TreeCsum => &mut c.csum_errors,
            ErrorKind::DataRead | ErrorKind::TreeRead => &mut c.read_errors,
            ErrorKind::TreeVerify => &mut c.verify_errors,
            ErrorKind::Super => &mut c.super_errors,
        };
        *n += 1;
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One thing scrub found.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ErrorRecord {
    pub devid: u64,
    pub physical: u64,
    pub logical: u64,
    pub volume: Option<String>,
    /// Byte offset in `volume` of the first byte (records written before
    /// the rename say `lba`, which held the same byte offset).
    #[serde(alias = "lba")]
    pub offset_bytes: Option<u64>,
    pub length_bytes: u64,
    pub kind: ErrorKind,
    pub repaired: bool,
    /// Every volume (snapshots and clones too) whose data this is, with
    /// the byte offset in each; `volume` and `offset_bytes` name the first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub referrers: Vec<Referrer>,
}

impl ErrorRecord {
    /// ` volume NAME[, NAME...] byte offset N` for a data sector (every
    /// referrer maps it at the same offset), empty otherwise.
    pub fn owners_text(&self) -> String {
        let names: Vec<&str> = if self.referrers.is_empty() {
            self.volume.iter().map(|v| v.as_str()).collect()
        } else {
            self.referrers.iter().map(|r| r.volume.as_str()).collect()
        };
        match (names.is_empty(), self.offset_bytes) {
            (false, Some(o)) => format!(" volume {} byte offset {o}", names.join(", ")),
            _ => String::new(),
        }
    }
}

/// A volume and byte offset that map a bad sector.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Referrer {
    pub volume: String,
    pub offset_bytes: u64,
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
    /// Read around the host page cache (O_DIRECT, `read_uncached`).
    /// Off by default: the default reads through the cache and drops what
    /// it brought in (`read_drop_behind`), which spares the clients'
    /// cached data as well and was about twice as fast (bench/profile.md).
    #[serde(default)]
    pub uncached: bool,
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
    /// Devices scrubbed by this run that have left the pool since (removed):
    /// their bytes and counts are no longer in the totals.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub departed_devids: Vec<u64>,
}

impl ScrubStatus {
    /// Keep only the pool's current members in the totals: a device that
    /// was removed after it was scrubbed no longer counts.
    fn follow_members(mut self, members: &[u64]) -> ScrubStatus {
        let (kept, gone): (Vec<DevProgress>, Vec<DevProgress>) = std::mem::take(&mut self.devices)
            .into_iter()
            .partition(|d| members.contains(&d.devid));
        if gone.is_empty() {
            self.devices = kept;
            return self;
        }
        self.departed_devids = gone.iter().map(|d| d.devid).collect();
        // Their bytes leave the totals; the errors found on them stay (the
        // error log still names them, and what had no good copy still has
        // none after the device left).
        for d in &gone {
            let c = &mut self.counters;
            c.bytes_scrubbed -= d.counters.bytes_scrubbed;
            c.data_bytes_scrubbed -= d.counters.data_bytes_scrubbed;
            c.tree_bytes_scrubbed -= d.counters.tree_bytes_scrubbed;
        }
        self.bytes_total = kept.iter().map(|d| d.bytes_total).sum();
        self.bytes_scrubbed_this_run = kept.iter().map(|d| d.bytes_scrubbed_this_run).sum();
        if self.eta_s.is_some() && self.rate_bytes_per_s > 0 {
            let left = self
                .bytes_total
                .saturating_sub(self.counters.bytes_scrubbed);
            self.eta_s = Some(left.div_ceil(self.rate_bytes_per_s));
        }
        self.devices = kept;
        self
    }
}

/// A scrub in progress (or just ended) in this process.
pub struct ScrubRun {
    opts: ScrubOptions,
    started_at: u64,
    state: Mutex<State>,
    cancel: AtomicBool,
    pause: AtomicBool,
    /// Time spent scanning, pauses excluded.
    active: ActiveClock,
    devs: Mutex<BTreeMap<u64, DevProgress>>,
    errors: Mutex<Vec<ErrorRecord>>,
    failure: Mutex<Option<String>>,
    done: Completion,
}

impl ScrubRun {
    /// Current status.
    pub fn status(&self, with_errors: bool) -> ScrubStatus {
        let devs: Vec<DevProgress> = lock(&self.devs).values().cloned().collect();
        let mut c = Counters::default();
        for d in &devs {
            c.add(&d.counters);
        }
        let total: u64 = devs.iter().map(|d| d.bytes_total).sum();
        let active = self.active.active().as_secs_f64();
        let rate = if active > 0.0 {
            (c.bytes_scrubbed as f64 / active) as u64
        } else {
            0
        };
        let state = *lock(&self.state);
        let eta = (state == State::Running && rate > 0)
            .then(|| total.saturating_sub(c.bytes_scrubbed).div_ceil(rate));
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
            departed_devids: Vec::new(),
        }
    }

    /// Block until the scrub ends.
    pub fn wait(&self) -> ScrubStatus {
        self.done.wait();
        self.status(false)
    }

    fn record(&self, r: ErrorRecord) {
        tracing::warn!(
            "scrub: {} at devid {} physical {:#x} logical {:#x}{}{}",
            r.kind,
            r.devid,
            r.physical,
            r.logical,
            r.owners_text(),
            if r.repaired { ", repaired" } else { "" }
        );
        let mut e = lock(&self.errors);
        if e.len() < MAX_ERROR_RECORDS {
            e.push(r);
        }
    }
}

/// Which volumes map the data sector at `logical`, `delta` bytes into
/// extent `ei`, and at which byte offset: every live volume whose tree maps
/// that offset to this sector (a mapping into an extent sits at the offset
/// its back reference gives). Scrub and device replace name them in their
/// logs. Falls back to the back reference's volume when no live tree maps
/// it (the sector was freed meanwhile).
pub(crate) fn sector_owners(
    fs: &FsInfo,
    ei: &ExtentItem,
    delta: u64,
    logical: u64,
) -> (Option<String>, Option<u64>, Vec<Referrer>) {
    let Some(b) = ei.backrefs.first() else {
        return (None, None, Vec::new());
    };
    let lba = b.lba_bytes + delta;
    let (trees, names, _guard) = {
        let st = lock(&fs.trans);
        let names: std::collections::BTreeMap<u64, String> =
            st.volumes.iter().map(|(n, v)| (v.id, n.clone())).collect();
        (st.vol_roots.clone(), names, fs.register_reader(st.gen))
    };
    let mut referrers = Vec::new();
    for (id, root) in &trees {
        if maps_sector(fs, root, lba, logical).unwrap_or(false) {
            if let Some(n) = names.get(id) {
                referrers.push(Referrer {
                    volume: n.clone(),
                    offset_bytes: lba,
                });
            }
        }
    }
    let first = referrers
        .first()
        .map(|r| r.volume.clone())
        .or_else(|| names.get(&b.volume_id).cloned());
    (first, Some(lba), referrers)
}

/// Whether the volume tree at `root` maps byte offset `lba` to `logical`.
fn maps_sector(
    fs: &FsInfo,
    root: &Arc<crate::btree::Node>,
    lba: u64,
    logical: u64,
) -> Result<bool> {
    let k = crate::data::extent::mapping_scan_from(fs, root, lba)?;
    if k.offset > lba {
        return Ok(false);
    }
    let Some(v) = crate::btree::get(fs, root, &k)? else {
        return Ok(false);
    };
    let ve =
        crate::format::VolumeExtent::decode(&v).map_err(|e| Error::Corrupt(format!("{k}: {e}")))?;
    Ok(k.offset + ve.len > lba && ve.logical + (lba - k.offset) == logical)
}

/// Why a device scan stopped early.
enum Stop {
    Canceled,
    Failed(String),
}

// ---- control -----------------------------------------------------------

fn current(fs: &FsInfo) -> Option<Arc<ScrubRun>> {
    JobSlot::<ScrubRun>::of(fs).current()
}

fn is_active(run: &ScrubRun) -> bool {
    matches!(*lock(&run.state), State::Running | State::Paused)
}

/// Status of the current or last scrub (from the pool if none ran here).
pub fn status(fs: &FsInfo, with_errors: bool) -> Result<ScrubStatus> {
    let members: Vec<u64> = fs.devices().iter().map(|d| d.devid).collect();
    Ok(status_of_any_run(fs, with_errors)?.follow_members(&members))
}

fn status_of_any_run(fs: &FsInfo, with_errors: bool) -> Result<ScrubStatus> {
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
            departed_devids: Vec::new(),
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
        departed_devids: Vec::new(),
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
                run.active.set_paused(false);
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
        uncached: false,
    };
    launch(fs, opts, Some(p))
}

fn launch(
    fs: &Arc<FsInfo>,
    opts: ScrubOptions,
    from: Option<Vec<Persisted>>,
) -> Result<Arc<ScrubRun>> {
    fs.check_abort()?;
    // Scrub reads the last commit: commit first, so that what clients wrote
    // before the start is scrubbed too and the total is what it will read.
    // Never behind a commit already running, which may be stuck (R6); and
    // never for `-r`, which writes nothing (R9).
    let commit = if opts.readonly {
        Some(Ok(0))
    } else {
        crate::engine::transaction::commit_unless_running(fs)
    };
    match commit {
        Some(Ok(_)) => {}
        Some(Err(e)) => {
            tracing::warn!("scrub: cannot commit before starting ({e}); scrubbing the last commit")
        }
        None => tracing::info!("scrub: a commit is running; scrubbing the last commit"),
    }
    let slot = JobSlot::<ScrubRun>::of(fs);
    let mut slot = slot.hold();
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
        active: ActiveClock::running_after(active),
        devs: Mutex::new(devs),
        errors: Mutex::new(Vec::new()),
        failure: Mutex::new(None),
        done: Completion::default(),
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
    run.active.set_paused(true);
    *lock(&run.state) = end;
    *lock(&run.failure) = failed.clone();
    if !fs.is_aborted() {
        checkpoint(&fs, &run);
    }
    // Waiters learn the outcome before the final commit: scrub never waits
    // on a commit to report (a stuck commit must not hang `scrub -B`).
    {
        run.done.finish();
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
    run.active.set_paused(true);
    Ok(())
}

fn update<R>(run: &ScrubRun, devid: u64, f: impl FnOnce(&mut DevProgress) -> R) -> R {
    let mut d = lock(&run.devs);
    let p = d.entry(devid).or_insert_with(|| DevProgress {
        devid,
        ..Default::default()
    });
    f(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_saved_with_lba_reads_as_offset_bytes() {
        let old = r#"{"devid":1,"physical":4096,"logical":8192,"volume":"v",
            "lba":12288,"length_bytes":4096,"kind":"data csum","repaired":false}"#;
        let r: ErrorRecord = serde_json::from_str(old).unwrap();
        assert_eq!(r.offset_bytes, Some(12288));
        let now = serde_json::to_value(&r).unwrap();
        assert_eq!(now["offset_bytes"], 12288);
        assert!(now.get("lba").is_none());
    }

    #[test]
    fn error_kinds_keep_their_text() {
        use ErrorKind::*;
        for (k, s) in [
            (DataCsum, "data csum"),
            (DataRead, "data read"),
            (TreeCsum, "tree csum"),
            (TreeVerify, "tree verify"),
            (TreeRead, "tree read"),
            (Super, "super"),
        ] {
            assert_eq!(k.to_string(), s);
            let j = serde_json::to_string(&k).unwrap();
            assert_eq!(j, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<ErrorKind>(&j).unwrap(), k);
        }
    }

    #[test]
    fn counters_round_trip_in_item_order() {
        let mut c = Counters::default();
        for (i, f) in c.fields().into_iter().enumerate() {
            *f = i as u64 + 1;
        }
        let a = c.to_array();
        assert_eq!(a[0], c.bytes_scrubbed);
        assert_eq!(a[11], c.block_groups_skipped_removed);
        assert_eq!(Counters::from_array(a), c);
    }
}
