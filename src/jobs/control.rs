//! Job control shared by scrub, balance and device replace: one slot per
//! kind of job in an open pool (the running or last finished run), and the
//! completion latch that `-B` waiters block on. The slots live in the pool's
//! extension map ([`FsInfo::extension`]), so the transaction core keeps
//! them without naming the jobs above it.

use std::time::{Duration, Instant};

use crate::engine::fs_info::FsInfo;
use crate::util::sync::{
    lock, notify_all, wait_until, Arc, AtomicU64, Condvar, Mutex, MutexGuard, Ordering,
};

/// The run of one kind of job in an open pool.
pub struct JobSlot<R>(Mutex<Option<Arc<R>>>);

impl<R> Default for JobSlot<R> {
    fn default() -> Self {
        JobSlot(Mutex::new(None))
    }
}

impl<R: Send + Sync + 'static> JobSlot<R> {
    /// The pool's slot for jobs of type `R`.
    pub fn of(fs: &FsInfo) -> Arc<JobSlot<R>> {
        fs.extension::<JobSlot<R>>()
    }

    /// The running or last finished run, if any ran in this process.
    pub fn current(&self) -> Option<Arc<R>> {
        lock(&self.0).clone()
    }

    /// Hold the slot while deciding whether a new run may start.
    pub fn hold(&self) -> MutexGuard<'_, Option<Arc<R>>> {
        lock(&self.0)
    }
}

/// Set once when a run ends; waiters block until then.
#[derive(Default)]
pub struct Completion {
    done: Mutex<bool>,
    cond: Condvar,
}

impl Completion {
    /// Mark the run ended and wake every waiter.
    pub fn finish(&self) {
        *lock(&self.done) = true;
        notify_all(&self.cond);
    }

    /// Block until [`finish`](Self::finish).
    pub fn wait(&self) {
        drop(wait_until(&self.done, &self.cond, |d| *d));
    }
}

/// Time a run spent working, paused spans excluded (for rates and ETAs).
#[derive(Debug, Default)]
pub struct ActiveClock(Mutex<(Duration, Option<Instant>)>);

impl ActiveClock {
    /// A clock that starts running now.
    pub fn running() -> Self {
        ActiveClock::running_after(Duration::ZERO)
    }

    /// A clock that starts running now, `prior` already counted (a
    /// resumed run).
    pub fn running_after(prior: Duration) -> Self {
        ActiveClock(Mutex::new((prior, Some(Instant::now()))))
    }

    /// Active time so far.
    pub fn active(&self) -> Duration {
        let a = lock(&self.0);
        a.0 + a.1.map(|t| t.elapsed()).unwrap_or_default()
    }

    /// Stop (paused) or restart (resumed) the clock; idempotent.
    pub fn set_paused(&self, paused: bool) {
        let mut a = lock(&self.0);
        match (paused, a.1) {
            (true, Some(t)) => {
                a.0 += t.elapsed();
                a.1 = None;
            }
            (false, None) => a.1 = Some(Instant::now()),
            _ => {}
        }
    }
}

/// How fast a run goes and how long it has left, from what it did since it
/// started: `bytes` moved and `units_done` units (block groups, bytes) of
/// work, with `units_left` to go, in `active_s` seconds (paused time
/// excluded by the caller's clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Pace {
    pub duration_s: f64,
    pub rate_bytes_per_s: u64,
    /// None until the run has done some work, and once it stopped.
    pub eta_s: Option<u64>,
}

impl Pace {
    /// The pace of a run (see the type); `running` false gives no ETA.
    pub fn of(active_s: f64, bytes: u64, units_done: u64, units_left: u64, running: bool) -> Pace {
        let rate = if active_s > 0.0 {
            (bytes as f64 / active_s) as u64
        } else {
            0
        };
        let eta = (running && units_done > 0)
            .then(|| (active_s * units_left as f64 / units_done as f64).ceil() as u64);
        Pace {
            duration_s: active_s,
            rate_bytes_per_s: rate,
            eta_s: eta,
        }
    }
}

/// Operations tracked at once; more run untracked (no progress bar).
pub const MAX_TASKS: usize = 64;

/// A long operation that is not a resumable job (device remove, volume
/// import and export), tracked so that `-B`-style progress can be shown
/// for it online and offline.
struct Task {
    kind: &'static str,
    subject: String,
    total_bytes: AtomicU64,
    done_bytes: AtomicU64,
    clock: ActiveClock,
}

/// One tracked operation, as the `progress` request reports it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TaskStatus {
    /// `remove`, `import` or `export`.
    pub kind: String,
    /// What it acts on: a devid or a volume name.
    pub subject: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    #[serde(flatten)]
    pub pace: Pace,
}

/// The pool's tracked operations.
#[derive(Default)]
pub struct Tasks(Mutex<Vec<Arc<Task>>>);

/// Tracks one operation until dropped.
pub struct TaskGuard {
    tasks: Arc<Tasks>,
    task: Option<Arc<Task>>,
}

impl TaskGuard {
    /// `bytes` more are done.
    pub fn advance(&self, bytes: u64) {
        if let Some(t) = &self.task {
            t.done_bytes.fetch_add(bytes, Ordering::AcqRel);
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            let mut list = lock(&self.tasks.0);
            let before = list.len();
            list.retain(|x| !Arc::ptr_eq(x, &t));
            debug_assert_eq!(list.len() + 1, before, "task tracked once");
        }
    }
}

/// Track an operation of `kind` on `subject` with `total_bytes` to do.
pub fn begin_task(fs: &FsInfo, kind: &'static str, subject: String, total_bytes: u64) -> TaskGuard {
    let tasks = fs.extension::<Tasks>();
    let mut list = lock(&tasks.0);
    let task = (list.len() < MAX_TASKS).then(|| {
        let t = Arc::new(Task {
            kind,
            subject,
            total_bytes: AtomicU64::new(total_bytes),
            done_bytes: AtomicU64::new(0),
            clock: ActiveClock::running(),
        });
        list.push(t.clone());
        t
    });
    drop(list);
    TaskGuard { tasks, task }
}

/// The operations running now.
pub fn tasks(fs: &FsInfo) -> Vec<TaskStatus> {
    let tasks = fs.extension::<Tasks>();
    let list = lock(&tasks.0);
    list.iter()
        .map(|t| {
            let total = t.total_bytes.load(Ordering::Acquire);
            let done = t.done_bytes.load(Ordering::Acquire).min(total);
            TaskStatus {
                kind: t.kind.to_string(),
                subject: t.subject.clone(),
                done_bytes: done,
                total_bytes: total,
                pace: Pace::of(
                    t.clock.active().as_secs_f64(),
                    done,
                    done,
                    total - done,
                    true,
                ),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_wakes_a_waiter() {
        let c = Arc::new(Completion::default());
        let w = {
            let c = c.clone();
            std::thread::spawn(move || c.wait())
        };
        c.finish();
        w.join().unwrap();
        c.wait();
    }

    #[test]
    fn pace_extrapolates_from_the_work_done() {
        let p = Pace::of(10.0, 100 << 20, 2, 6, true);
        assert_eq!(p.rate_bytes_per_s, 10 << 20);
        assert_eq!(p.eta_s, Some(30));
        assert_eq!(Pace::of(10.0, 0, 0, 6, true).eta_s, None);
        assert_eq!(Pace::of(10.0, 5, 2, 6, false).eta_s, None);
        assert_eq!(Pace::of(0.0, 5, 0, 6, true).rate_bytes_per_s, 0);
    }

    #[test]
    fn a_paused_clock_does_not_move() {
        let c = ActiveClock::running();
        c.set_paused(true);
        let a = c.active();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(c.active(), a);
        c.set_paused(false);
        std::thread::sleep(Duration::from_millis(5));
        assert!(c.active() > a);
    }
}
