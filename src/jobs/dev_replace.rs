//! Device replace: copy every stripe a device holds to a new device while
//! clients keep writing, then drop the old device. Works with the old device
//! present (copies are read verified, from any good mirror) or missing (a
//! pool opened `--degraded`).
//!
//! Per data block group (R8): the group goes read-only and writers that
//! reserved space in it before finish; only then is its live content copied
//! and the chunk switched to the new stripe. Copy-on-write does the rest:
//! nothing rewrites a read-only group. Metadata groups are copied with
//! commits held off instead (only commits write tree blocks).

use std::time::Instant;

use crate::btree::Iter;
use crate::device::BlockDevice;
use crate::engine::block_group::BlockGroup;
use crate::engine::fs_info::FsInfo;
use crate::format::{item, objectid, tree_id, ExtentItem, Key, Stripe, SECTOR_BYTES};
use crate::jobs::control::{Completion, JobSlot};
use crate::jobs::relocation::wait_for_writers;
use crate::jobs::scrub::{sector_owners, ErrorKind, ErrorRecord, MAX_ERROR_RECORDS};
use crate::util::error::{Error, Result};
use std::collections::BTreeMap;

use crate::chunk::volumes::{ChunkMap, Device};
use crate::util::sync::{lock, read, write, Arc, AtomicBool, AtomicU64, Mutex, Ordering};

/// How long replace waits for chunks whose groups are gone to drop their
/// maps before it gives up naming them.
const STUCK_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

use crate::engine::transaction::{self, commit, Ctx};
use crate::format::progress::ReplaceProgress;
pub use crate::format::progress::ReplaceState as State;

/// `device replace status` output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplaceStatus {
    pub state: State,
    pub src_devid: u64,
    /// Unix seconds of the first start (0: not recorded).
    pub started_at: u64,
    pub target_devid: u64,
    pub target_path: String,
    /// Canceled or failed: the target left the pool again (what had been
    /// copied to it moved back), so it can be used anew.
    pub target_left: bool,
    pub block_groups_total: u64,
    pub block_groups_done: u64,
    pub bytes_copied: u64,
    /// This run's duration, rate and time left.
    #[serde(flatten)]
    pub pace: crate::jobs::control::Pace,
    /// Sectors with no good copy on any mirror: copied as they were (their
    /// reads keep failing), logged in `errors`.
    pub uncorrectable_errors: u64,
    /// The first [`MAX_ERROR_RECORDS`] of them, with volume and byte offset.
    pub errors: Vec<ErrorRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// A replace in progress (or just ended) in this process.
pub struct ReplaceRun {
    src_devid: u64,
    target: Arc<Device>,
    /// Unix seconds of the first start (kept across a resume).
    started_at: u64,
    /// The target's devid: the source's once the replace finished.
    target_devid: AtomicU64,
    /// A canceled or failed replace took the target out of the pool.
    target_left: AtomicBool,
    started: Instant,
    state: Mutex<State>,
    total: AtomicU64,
    done: AtomicU64,
    /// Groups an earlier run did (a resumed replace).
    done_before: u64,
    bytes: AtomicU64,
    elapsed_s: Mutex<Option<f64>>,
    cancel: AtomicBool,
    /// Stop after the current group, resumable (a signal to an offline `-B`).
    interrupt: AtomicBool,
    failure: Mutex<Option<String>>,
    uncorrectable: AtomicU64,
    errors: Mutex<Vec<ErrorRecord>>,
    finished: Completion,
    /// Target space taken up front for each chunk on the source:
    /// chunk start -> (stripe index, physical) per source stripe. New chunks
    /// may use the target meanwhile, but never the space the copies need.
    reserved: Mutex<BTreeMap<u64, Vec<(usize, u64)>>>,
}

impl ReplaceRun {
    pub fn status(&self) -> ReplaceStatus {
        let state = *lock(&self.state);
        let total = self.total.load(Ordering::Acquire);
        let done = self.done.load(Ordering::Acquire);
        let bytes = self.bytes.load(Ordering::Acquire);
        let secs = lock(&self.elapsed_s).unwrap_or(self.started.elapsed().as_secs_f64());
        ReplaceStatus {
            state,
            started_at: self.started_at,
            src_devid: self.src_devid,
            target_devid: self.target_devid.load(Ordering::Acquire),
            target_left: self.target_left.load(Ordering::Acquire),
            target_path: self.target.dev.path().display().to_string(),
            block_groups_total: total,
            block_groups_done: done,
            bytes_copied: bytes,
            pace: crate::jobs::control::Pace::of(
                secs,
                bytes,
                done.saturating_sub(self.done_before),
                total.saturating_sub(done),
                state == State::Running,
            ),
            uncorrectable_errors: self.uncorrectable.load(Ordering::Acquire),
            errors: lock(&self.errors).clone(),
            failure: lock(&self.failure).clone(),
        }
    }

    fn persisted(&self) -> ReplaceProgress {
        let s = self.status();
        ReplaceProgress {
            state: s.state,
            src_devid: s.src_devid,
            target_devid: s.target_devid,
            target_path: s.target_path,
            started_at: self.started_at,
            block_groups_total: s.block_groups_total,
            block_groups_done: s.block_groups_done,
            bytes_copied: s.bytes_copied,
            uncorrectable_errors: s.uncorrectable_errors,
            failure: s.failure,
        }
    }

    /// Count and log a sector that has no good copy.
    fn record(&self, r: ErrorRecord) {
        tracing::warn!(
            "device replace: {} at logical {:#x} (devid {} physical {:#x}{}) has no good copy; copied as it is",
            r.kind,
            r.logical,
            r.devid,
            r.physical,
            match r.owners_text() {
                t if t.is_empty() => t,
                t => format!(",{t}"),
            }
        );
        self.uncorrectable.fetch_add(1, Ordering::AcqRel);
        let mut e = lock(&self.errors);
        if e.len() < MAX_ERROR_RECORDS {
            e.push(r);
        }
    }

    /// Block until the replace ends; its final status.
    pub fn wait(&self) -> ReplaceStatus {
        self.finished.wait();
        self.status()
    }
}

/// Status of the running or last replace of this process.
/// Without one, the last replace the pool recorded ("interrupted" when it
/// was running when the process ended).
pub fn status(fs: &FsInfo) -> Option<ReplaceStatus> {
    if let Some(r) = JobSlot::<ReplaceRun>::of(fs).current() {
        return Some(r.status());
    }
    let p = load(fs)
        .inspect_err(|e| tracing::warn!("device replace record: {e}"))
        .ok()
        .flatten()?;
    Some(ReplaceStatus {
        state: match p.state {
            State::Running => State::Interrupted,
            s => s,
        },
        src_devid: p.src_devid,
        started_at: p.started_at,
        target_devid: p.target_devid,
        target_path: p.target_path,
        target_left: false,
        block_groups_total: p.block_groups_total,
        block_groups_done: p.block_groups_done,
        bytes_copied: p.bytes_copied,
        pace: Default::default(),
        uncorrectable_errors: p.uncorrectable_errors,
        errors: Vec::new(),
        failure: p.failure,
    })
}

/// Stop a running replace after the current block group; the new device
/// then leaves the pool again (see [`undo`]).
pub fn cancel(fs: &FsInfo) -> Result<()> {
    let run = JobSlot::<ReplaceRun>::of(fs).current();
    match run {
        Some(r) if *lock(&r.state) == State::Running => {
            r.cancel.store(true, Ordering::Release);
            Ok(())
        }
        _ => Err(Error::Invalid("no device replace is running".into())),
    }
}

/// Stop a running replace after the current group, keeping it for
/// `resume` (the target stays, what was switched stays switched).
pub fn interrupt(fs: &FsInfo) -> Result<()> {
    match JobSlot::<ReplaceRun>::of(fs).current() {
        Some(r) if *lock(&r.state) == State::Running => {
            r.interrupt.store(true, Ordering::Release);
            Ok(())
        }
        _ => Err(Error::Invalid("no device replace is running".into())),
    }
}

/// Bytes of stripes `devid` holds.
fn stripe_bytes_on(fs: &FsInfo, devid: u64) -> u64 {
    fs.mapping
        .all()
        .iter()
        .flat_map(|m| {
            m.item
                .stripes
                .iter()
                .filter(|s| s.devid == devid)
                .map(|_| m.item.stripe_bytes)
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Start replacing `src` by `new_dev`.
pub fn start(
    fs: &Arc<FsInfo>,
    src: u64,
    new_dev: Arc<dyn BlockDevice>,
    wait: bool,
) -> Result<Arc<ReplaceRun>> {
    fs.check_abort()?;
    let slot = JobSlot::<ReplaceRun>::of(fs);
    let slot = slot.hold();
    refuse_if_running(&slot)?;
    if load(fs)?.is_some_and(|p| matches!(p.state, State::Running | State::Interrupted)) {
        return Err(Error::Busy(
            "an interrupted device replace exists; `device replace resume` it first".into(),
        ));
    }
    if fs.member(src).is_none() && !read(&fs.missing).contains_key(&src) {
        return Err(Error::Invalid(format!("no device with devid {src}")));
    }
    let need = stripe_bytes_on(fs, src);
    // The first MiB and superblock copies are never allocated.
    let size = new_dev.size_bytes();
    let supers_in = crate::format::SUPER_OFFSETS
        .iter()
        .filter(|&&o| o < size)
        .count() as u64;
    let usable = size.saturating_sub(crate::format::SUPER_RESERVED_BYTES * supers_in);
    if usable < need {
        return Err(Error::Device {
            path: new_dev.path().into(),
            msg: format!(
                "{} bytes is smaller than the {need} bytes devid {src} holds",
                new_dev.size_bytes()
            ),
        });
    }
    let devid = crate::jobs::devices::add_with(fs, new_dev, false)?;
    let target = fs
        .device(devid)
        .ok_or_else(|| Error::Invalid(format!("devid {devid} vanished after add")))?;
    let total = crate::jobs::devices::chunks_on(fs, src).len() as u64;
    let from = ReplaceProgress {
        state: State::Running,
        src_devid: src,
        target_devid: devid,
        target_path: target.dev.path().display().to_string(),
        started_at: crate::util::time::now_s(),
        block_groups_total: total,
        block_groups_done: 0,
        bytes_copied: 0,
        uncorrectable_errors: 0,
        failure: None,
    };
    let run = match begin(fs, target, &from) {
        Ok(r) => r,
        Err(e) => {
            // Nothing was copied: the new device leaves again.
            if let Err(e2) = crate::jobs::devices::remove(fs, devid) {
                tracing::warn!("device replace: devid {devid} stays in the pool: {e2}");
            }
            return Err(e);
        }
    };
    launch(fs, slot, run, wait)
}

/// One replace at a time in a pool.
fn refuse_if_running(slot: &Option<Arc<ReplaceRun>>) -> Result<()> {
    if slot
        .as_ref()
        .is_some_and(|r| *lock(&r.state) == State::Running)
    {
        return Err(Error::Busy("a device replace is already running".into()));
    }
    Ok(())
}

/// Continue the replace a crash or a restart interrupted: the groups
/// switched before it stay switched, the rest are copied.
pub fn resume(fs: &Arc<FsInfo>, wait: bool) -> Result<Arc<ReplaceRun>> {
    fs.check_abort()?;
    let slot = JobSlot::<ReplaceRun>::of(fs);
    let slot = slot.hold();
    refuse_if_running(&slot)?;
    let Some(p) = load(fs)? else {
        return Err(Error::Invalid(
            "there is no device replace to resume".into(),
        ));
    };
    if !matches!(p.state, State::Running | State::Interrupted) {
        return Err(Error::Invalid(format!(
            "the last device replace is {}; nothing to resume",
            p.state.name()
        )));
    }
    let mut p = p;
    let left = crate::jobs::devices::chunks_on(fs, p.src_devid).len() as u64;
    let src_gone =
        fs.device(p.src_devid).is_none() && !read(&fs.missing).contains_key(&p.src_devid);
    if src_gone && left == 0 {
        // The crash came after the source left: only the record was behind.
        p.state = State::Finished;
        p.block_groups_done = p.block_groups_total;
        save(fs, &p)?;
        commit(fs)?;
        return Err(Error::Invalid(format!(
            "the replace of devid {} had finished; nothing to resume",
            p.src_devid
        )));
    }
    // What committed is what counts: the record may lag a group behind.
    p.block_groups_total = p.block_groups_total.max(p.block_groups_done + left);
    p.block_groups_done = p.block_groups_total - left;
    let Some(target) = fs.member(p.target_devid) else {
        // Nothing can continue it: record it failed, so that a new
        // replace may start.
        let why = format!(
            "the replace target devid {} ({}) is not in the pool",
            p.target_devid, p.target_path
        );
        p.state = State::Failed;
        p.failure = Some(why.clone());
        save(fs, &p)?;
        commit(fs)?;
        if let Some(r) = slot.as_ref() {
            *lock(&r.state) = State::Failed;
            *lock(&r.failure) = Some(why.clone());
        }
        return Err(Error::Invalid(format!(
            "{why}; the interrupted replace is marked failed, start a new one"
        )));
    };
    tracing::info!(
        "resuming the replace of devid {} by devid {}: {} of {} block groups were done",
        p.src_devid,
        p.target_devid,
        p.block_groups_done,
        p.block_groups_total
    );
    let run = begin(fs, target, &p)?;
    launch(fs, slot, run, wait)
}

/// Take the target space, switch allocation from the source to the target,
/// and persist the run.
fn begin(fs: &FsInfo, target: Arc<Device>, from: &ReplaceProgress) -> Result<Arc<ReplaceRun>> {
    let src = from.src_devid;
    crate::failpoint!("replace::before_reserve", src);
    let reserved = reserve_target(fs, src, &target);
    // The copies' space is taken: new chunks may use the rest of the
    // target, and from now on avoid the old device. The target opens
    // first, so a pool never has fewer allocatable devices than before
    // (the source closing first failed raid1 allocations on two devices
    // meanwhile); a chunk the source got in between is moved by `drive`.
    target.allocatable.store(true, Ordering::Release);
    let reserved = reserved?;
    if let Some(d) = fs.member(src) {
        d.allocatable.store(false, Ordering::Release);
    }
    let run = Arc::new(ReplaceRun {
        src_devid: src,
        target_devid: AtomicU64::new(target.devid),
        target_left: AtomicBool::new(false),
        target,
        started: Instant::now(),
        started_at: from.started_at,
        state: Mutex::new(State::Running),
        total: AtomicU64::new(from.block_groups_total),
        done: AtomicU64::new(from.block_groups_done),
        done_before: from.block_groups_done,
        bytes: AtomicU64::new(0),
        elapsed_s: Mutex::new(None),
        cancel: AtomicBool::new(false),
        interrupt: AtomicBool::new(false),
        failure: Mutex::new(None),
        uncorrectable: AtomicU64::new(from.uncorrectable_errors),
        errors: Mutex::new(Vec::new()),
        finished: Completion::default(),
        reserved: Mutex::new(reserved),
    });
    if let Err(e) = save(fs, &run.persisted()).and_then(|()| commit(fs).map(|_| ())) {
        // Not started after all: allocation and target space as before.
        if let Some(d) = fs.member(src) {
            d.allocatable.store(true, Ordering::Release);
        }
        let left = std::mem::take(&mut *lock(&run.reserved));
        release(&run.target, left.values().flatten());
        return Err(e);
    }
    Ok(run)
}

/// Publish the run and drive it (here, or in a thread).
fn launch(
    fs: &Arc<FsInfo>,
    mut slot: crate::util::sync::MutexGuard<'_, Option<Arc<ReplaceRun>>>,
    run: Arc<ReplaceRun>,
    wait: bool,
) -> Result<Arc<ReplaceRun>> {
    *slot = Some(run.clone());
    drop(slot);
    tracing::info!(
        "replacing devid {} by devid {} ({})",
        run.src_devid,
        run.target.devid,
        run.target.dev.path().display()
    );
    if wait {
        drive(fs, &run);
    } else {
        let (f, r) = (fs.clone(), run.clone());
        crate::util::sched::spawn(move || drive(&f, &r));
    }
    Ok(run)
}

fn state_key() -> Key {
    Key::new(objectid::REPLACE, item::REPLACE_STATE, 0)
}

/// The last replace as the pool keeps it.
fn load(fs: &FsInfo) -> Result<Option<ReplaceProgress>> {
    let st = lock(&fs.trans);
    let Some(v) = crate::btree::get(fs, &st.root(tree_id::DEV), &state_key())? else {
        return Ok(None);
    };
    ReplaceProgress::decode(&v)
        .map(Some)
        .map_err(|e| Error::Corrupt(format!("device replace state item: {e}")))
}

fn save_in(ctx: &mut Ctx, p: &ReplaceProgress) -> Result<()> {
    let v = p
        .encode()
        .map_err(|e| Error::Corrupt(format!("device replace state: {e}")))?;
    ctx.insert(tree_id::DEV, state_key(), v).map(|_| ())
}

/// Record `p` with the next commit.
fn save(fs: &FsInfo, p: &ReplaceProgress) -> Result<()> {
    transaction::change(fs, |ctx| save_in(ctx, p))
}

/// Take the target space for the stripes of one chunk on `src`.
fn reserve_chunk(fs: &FsInfo, start: u64, src: u64, target: &Device) -> Result<Vec<(usize, u64)>> {
    let Some(m) = fs.mapping.get(start) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (k, st) in m.item.stripes.iter().enumerate() {
        if st.devid != src {
            continue;
        }
        match target.take(m.item.stripe_bytes) {
            Some(p) => out.push((k, p)),
            None => {
                release(target, out.iter());
                return Err(Error::NoSpace(format!(
                    "{}: no room for the stripes of chunk {start:#x}",
                    target.dev.path().display()
                )));
            }
        }
    }
    Ok(out)
}

/// Take the target space for every stripe the source holds.
fn reserve_target(
    fs: &FsInfo,
    src: u64,
    target: &Device,
) -> Result<BTreeMap<u64, Vec<(usize, u64)>>> {
    let mut out: BTreeMap<u64, Vec<(usize, u64)>> = BTreeMap::new();
    for m in fs.mapping.all() {
        for (k, st) in m.item.stripes.iter().enumerate() {
            if st.devid != src {
                continue;
            }
            match target.take(m.item.stripe_bytes) {
                Some(p) => out.entry(m.start()).or_default().push((k, p)),
                None => {
                    release(target, out.values().flatten());
                    return Err(Error::NoSpace(format!(
                        "{}: too small to hold the stripes of devid {src}",
                        target.dev.path().display()
                    )));
                }
            }
        }
    }
    Ok(out)
}

fn release<'a>(target: &Device, taken: impl Iterator<Item = &'a (usize, u64)>) {
    let mut ext = write(&target.extents);
    for (_, p) in taken {
        ext.remove(p);
    }
}

/// Ends the run if its driver panics, so that `-B` waiters do not hang.
struct EndOnPanic<'a>(&'a ReplaceRun);

impl Drop for EndOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            *lock(&self.0.failure) = Some("device replace panicked: a bug, see the log".into());
            *lock(&self.0.state) = State::Failed;
            self.0.finished.finish();
        }
    }
}

fn drive(fs: &FsInfo, run: &ReplaceRun) {
    let _end = EndOnPanic(run);
    let end = match drive_inner(fs, run) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("device replace of devid {} failed: {e}", run.src_devid);
            *lock(&run.failure) = Some(e.to_string());
            State::Failed
        }
    };
    // Space kept for groups that went away (or were not reached).
    let left = std::mem::take(&mut *lock(&run.reserved));
    release(&run.target, left.values().flatten());
    *lock(&run.elapsed_s) = Some(run.started.elapsed().as_secs_f64());
    if end != State::Finished {
        if let Some(d) = fs.device(run.src_devid) {
            d.allocatable.store(true, Ordering::Release);
        }
        // Not running any more, whatever happens to the target next.
        *lock(&run.state) = end;
        persist_end(fs, run);
        if end != State::Interrupted {
            undo(fs, run);
            persist_end(fs, run);
        }
    }
    *lock(&run.state) = end;
    run.finished.finish();
}

/// Record how a run ended (best effort: the pool may have failed).
fn persist_end(fs: &FsInfo, run: &ReplaceRun) {
    if let Err(e) = save(fs, &run.persisted()).and_then(|()| commit(fs).map(|_| ())) {
        tracing::warn!("device replace: cannot record its end: {e}");
    }
}

/// A canceled or failed replace takes the target out of the pool again
/// (moving back what was switched to it), so that the same device can be
/// used for the next attempt. When that is not possible (the pool cannot do
/// without it, or failed) the target stays a member and the failure says so.
fn undo(fs: &FsInfo, run: &ReplaceRun) {
    let t = run.target.devid;
    match crate::jobs::devices::remove(fs, t) {
        Ok(()) => run.target_left.store(true, Ordering::Release),
        Err(e) => {
            tracing::warn!("device replace: the new device devid {t} stays in the pool: {e}");
            let mut f = lock(&run.failure);
            let note = format!("the new device stays in the pool as devid {t}: {e}");
            *f = Some(match f.take() {
                Some(was) => format!("{was}; {note}"),
                None => note,
            });
        }
    }
}

fn drive_inner(fs: &FsInfo, run: &ReplaceRun) -> Result<State> {
    let mut stuck_since: Option<Instant> = None;
    loop {
        let todo = crate::jobs::devices::chunks_on(fs, run.src_devid);
        if todo.is_empty() {
            break;
        }
        // A chunk whose group is gone but whose map is still there (a
        // scrub holds it frozen) comes back until the map drops: wait for
        // that rather than spin, and say which chunks if it never ends.
        if stuck_since.is_some_and(|t| crate::util::sched::since(t) > STUCK_LIMIT) {
            return Err(Error::Busy(format!(
                "chunks {todo:x?} stay on devid {} although their block groups are gone",
                run.src_devid
            )));
        }
        let before = todo.clone();
        for start in todo {
            if run.cancel.load(Ordering::Acquire) {
                return Ok(State::Canceled);
            }
            if run.interrupt.load(Ordering::Acquire) {
                return Ok(State::Interrupted);
            }
            // A chunk whose allocation raced with the start of the replace
            // gets its target space now.
            let reserved = lock(&run.reserved).remove(&start);
            let slots = match reserved {
                Some(s) => s,
                None => reserve_chunk(fs, start, run.src_devid, &run.target)?,
            };
            let n = match replace_group(fs, run, start, &slots) {
                Ok(n) => n,
                Err(e) => {
                    release(&run.target, slots.iter());
                    return Err(e);
                }
            };
            run.bytes.fetch_add(n, Ordering::AcqRel);
            if !crate::jobs::devices::chunks_on(fs, run.src_devid).contains(&start) {
                run.done.fetch_add(1, Ordering::AcqRel);
            }
            // Committed with the switch: a resume after a crash starts
            // after this group (one commit per group of hundreds of MiB).
            save(fs, &run.persisted())?;
            commit(fs)?;
        }
        if crate::jobs::devices::chunks_on(fs, run.src_devid) == before {
            stuck_since.get_or_insert_with(crate::util::sched::now);
            crate::util::sched::sleep(std::time::Duration::from_millis(20));
        } else {
            stuck_since = None;
        }
    }
    // Space kept for groups that went away, before the target is renamed.
    let left = std::mem::take(&mut *lock(&run.reserved));
    release(&run.target, left.values().flatten());
    let mut fin = run.persisted();
    fin.state = State::Finished;
    fin.block_groups_done = fin.block_groups_total.max(fin.block_groups_done);
    fin.target_devid = run.src_devid;
    // The rename and the finished state commit together: a crash never
    // leaves a "running" item that names the renamed target as the source.
    let record = |ctx: &mut Ctx| save_in(ctx, &fin);
    if crate::jobs::devices::take_over(fs, run.src_devid, &run.target, &record)? {
        run.target_devid.store(run.src_devid, Ordering::Release);
    } else {
        // The source is gone: finished whatever happens to the record (a
        // failure here must not send `drive` to `undo` the target).
        fin.target_devid = run.target.devid;
        if let Err(e) = save(fs, &fin).and_then(|()| commit(fs).map(|_| ())) {
            tracing::warn!("device replace finished; cannot record it: {e}");
        }
    }
    tracing::info!(
        "replaced devid {} by {}",
        run.src_devid,
        run.target.dev.path().display()
    );
    Ok(State::Finished)
}

/// A live extent of a group: where, how long, and (data) its extent item,
/// which names the volume and byte offset of a bad sector.
struct Live {
    logical: u64,
    len: u64,
    tree_block: bool,
    item: Option<ExtentItem>,
}

fn live_extents(fs: &FsInfo, start: u64, end: u64) -> Result<Vec<Live>> {
    let st = lock(&fs.trans);
    let mut out = Vec::new();
    for r in Iter::new(
        fs,
        &st.root(tree_id::EXTENT),
        Key::new(start, item::EXTENT, 0),
        Key::new(end - 1, item::METADATA, u64::MAX),
    ) {
        let (k, v) = r?;
        let (len, tree_block) = match k.ty {
            item::EXTENT => (k.offset, false),
            item::METADATA => (fs.node_bytes as u64, true),
            _ => continue,
        };
        if k.objectid < start || k.objectid.checked_add(len).is_none_or(|e| e > end) {
            return Err(Error::Corrupt(format!(
                "extent item {k} does not fit block group {start:#x}..{end:#x}"
            )));
        }
        out.push(Live {
            logical: k.objectid,
            len,
            tree_block,
            item: (!tree_block).then(|| ExtentItem::decode(&v).ok()).flatten(),
        });
    }
    Ok(out)
}

/// The checksums of a live data extent (None: stored without).
fn extent_sums(fs: &FsInfo, x: &Live) -> Result<Option<Vec<u8>>> {
    let sums = {
        let st = lock(&fs.trans);
        crate::btree::get(
            fs,
            &st.root(tree_id::CSUM),
            &Key::new(objectid::CSUM, item::CSUM, x.logical),
        )?
    };
    let cs = fs.csum_type.size_bytes() as u64;
    Ok(sums.filter(|s| s.len() as u64 >= x.len / SECTOR_BYTES * cs))
}

/// Read the verified content of `len` bytes at `logical`.
fn read_verified(fs: &FsInfo, logical: u64, buf: &mut [u8], sums: Option<&[u8]>) -> Result<()> {
    fs.read_data(logical, buf, sums, &|lg, l| {
        Error::Corrupt(format!(
            "device replace: logical {lg:#x}+{l} has no good copy on any mirror"
        ))
    })
}

/// Copy one group's stripes on `src` to `dst` (at the physical offsets
/// reserved in `slots`) and switch the chunk over. Returns the bytes copied.
/// When the group is gone or no longer on `src`, its slots are released.
fn replace_group(fs: &FsInfo, run: &ReplaceRun, start: u64, slots: &[(usize, u64)]) -> Result<u64> {
    let (src, dst) = (run.src_devid, &run.target);
    let _serial = lock(&fs.reloc_lock);
    let gone = || {
        release(dst, slots.iter());
        Ok(0)
    };
    let Some(bg) = fs.block_group_at(start) else {
        return gone();
    };
    // Data: read-only, and writers that reserved space here finish first
    // (R8). Tree blocks are only ever written by commits: with commits held
    // off, what the group holds on disk stays as it is, and blocks allocated
    // in it meanwhile are written after the switch, through the new map. No
    // read-only mark, so metadata needs no room elsewhere (a degraded pool
    // being healed may have none).
    let (hold, commits) = if bg.is_data() {
        let Some(h) = bg.ro_hold(fs) else {
            return gone();
        };
        wait_for_writers(fs, &bg, &|| false)?;
        (Some(h), None)
    } else {
        (None, Some(lock(&fs.commit_lock)))
    };
    crate::failpoint!("replace::before_copy", start);
    let Some(map) = fs.mapping.get(start) else {
        return gone();
    };
    let idxs: Vec<usize> = slots.iter().map(|&(k, _)| k).collect();
    if idxs
        .iter()
        .any(|&k| map.item.stripes.get(k).is_none_or(|s| s.devid != src))
    {
        return gone();
    }
    let mut item = map.item.clone();
    for &(k, p) in slots {
        item.stripes[k] = Stripe {
            devid: dst.devid,
            physical: p,
        };
    }
    let mv = GroupMove {
        run,
        start,
        src,
        dst,
        map,
        new_map: ChunkMap { item },
        idxs,
    };
    let r = mv.copy_and_switch(fs, &bg);
    drop(commits);
    drop(hold);
    match r {
        Ok(None) => gone(),
        Ok(Some(n)) => Ok(n),
        Err(e) => Err(e),
    }
}

/// One group's switch to the new device: the chunk as mapped before and
/// after, and which of its stripes move where.
struct GroupMove<'a> {
    /// Where sectors with no good copy are counted and logged.
    run: &'a ReplaceRun,
    start: u64,
    src: u64,
    dst: &'a Arc<Device>,
    /// The chunk as mapped when the copy began.
    map: Arc<ChunkMap>,
    /// The chunk with the moving stripes on `dst`.
    new_map: ChunkMap,
    /// Indexes of the moving stripes.
    idxs: Vec<usize>,
}

impl GroupMove<'_> {
    /// Copy, then switch the chunk in one transaction. `None`: the group
    /// was deleted meanwhile, so there is nothing to replace.
    fn copy_and_switch(&self, fs: &FsInfo, bg: &BlockGroup) -> Result<Option<u64>> {
        let Some(copied) = self.copy(fs, bg)? else {
            return Ok(None);
        };
        crate::failpoint!("replace::before_switch", self.start);
        let mut st = lock(&fs.trans);
        let mut ctx = crate::engine::transaction::Ctx::begin(fs, &mut st)?;
        // A metadata group is not read-only during its copy: the cleaner
        // may have deleted it meanwhile (it removes under this same lock, so
        // the check cannot race). Switching it would resurrect its chunk.
        if bg.is_removed() {
            return Ok(None);
        }
        self.switch(&mut ctx)?;
        Ok(Some(copied))
    }

    /// Write every live extent's verified content to the moving stripes.
    /// Returns the bytes copied.
    fn copy(&self, fs: &FsInfo, bg: &BlockGroup) -> Result<Option<u64>> {
        let mut copied = 0;
        for x in live_extents(fs, bg.start, bg.end())? {
            let buf = match self.read_live(fs, &x) {
                Ok(b) => b,
                // Deleted under the copy (metadata groups are not held
                // read-only): nothing left to replace.
                Err(_) if bg.is_removed() => return Ok(None),
                Err(e) => return Err(e),
            };
            for &k in &self.idxs {
                for (lg, len, phys) in self.new_map.stripe_span(k, x.logical, x.len)? {
                    let off = (lg - x.logical) as usize;
                    self.dst
                        .dev
                        .write_at(&buf[off..off + len as usize], phys)
                        .map_err(|e| Error::DeviceIo {
                            path: self.dst.dev.path().into(),
                            op: "replace write",
                            physical: phys,
                            len,
                            source: e,
                        })?;
                }
            }
            copied += x.len;
        }
        Ok(Some(copied))
    }

    /// The content of one live extent, verified. A data sector with no
    /// good copy on any mirror does not stop the replace (the disk being
    /// replaced is often failing): it is copied as a mirror holds it, so
    /// that reads of it keep failing their checksum rather than return
    /// other bytes, and counted and logged with its volume and byte offset. A tree
    /// block with no good copy fails the replace.
    fn read_live(&self, fs: &FsInfo, x: &Live) -> Result<Vec<u8>> {
        if x.tree_block {
            let n = fs.read_node(x.logical, None)?;
            return Ok(n.encode(&fs.pool_uuid, fs.node_bytes, fs.csum_type));
        }
        let sums = extent_sums(fs, x)?;
        let mut buf = vec![0u8; x.len as usize];
        match read_verified(fs, x.logical, &mut buf, sums.as_deref()) {
            Err(Error::Corrupt(_)) => {}
            r => return r.map(|()| buf),
        }
        let sector = SECTOR_BYTES as usize;
        let cs = fs.csum_type.size_bytes();
        for (i, dst) in buf.chunks_mut(sector).enumerate() {
            let lg = x.logical + (i * sector) as u64;
            let sum = sums.as_deref().map(|s| &s[i * cs..(i + 1) * cs]);
            match read_verified(fs, lg, dst, sum) {
                Ok(()) => {}
                Err(Error::Corrupt(_)) => self.salvage_sector(fs, x, lg, dst),
                Err(e) => return Err(e),
            }
        }
        Ok(buf)
    }

    /// Fill `dst` with a sector that has no good copy as the first
    /// readable mirror holds it (zeros if none reads), and log it.
    fn salvage_sector(&self, fs: &FsInfo, x: &Live, logical: u64, dst: &mut [u8]) {
        let piece = self
            .map
            .map(logical, SECTOR_BYTES)
            .ok()
            .and_then(|mut p| p.pop());
        let mirrors = piece.as_ref().map_or(0, |p| p.mirrors.len());
        let readable = piece
            .as_ref()
            .is_some_and(|p| (0..mirrors).any(|m| fs.read_copy(p, m, dst).is_ok()));
        if !readable {
            dst.fill(0);
        }
        let physical = piece
            .as_ref()
            .and_then(|p| p.mirrors.iter().find(|&&(d, _)| d == self.src))
            .map_or(0, |&(_, ph)| ph);
        let (volume, lba, referrers) = x.item.as_ref().map_or((None, None, Vec::new()), |ei| {
            sector_owners(fs, ei, logical - x.logical, logical)
        });
        self.run.record(ErrorRecord {
            devid: self.src,
            physical,
            logical,
            volume,
            offset_bytes: lba,
            length_bytes: SECTOR_BYTES,
            kind: if readable {
                ErrorKind::DataCsum
            } else {
                ErrorKind::DataRead
            },
            repaired: false,
            referrers,
        });
    }

    /// Point the chunk item, the device extents and the mapping at `dst`.
    fn switch(&self, ctx: &mut crate::engine::transaction::Ctx) -> Result<()> {
        crate::jobs::devices::restripe_chunk(ctx, &self.map.item, self.new_map.item.clone())?;
        if let Some(s) = ctx.fs.device(self.src) {
            for &k in &self.idxs {
                write(&s.extents).remove(&self.map.item.stripes[k].physical);
            }
        }
        ctx.st.dirty = true;
        Ok(())
    }
}
