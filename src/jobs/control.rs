//! Job control shared by scrub, balance and device replace: one slot per
//! kind of job in an open pool (the running or last finished run), and the
//! completion latch that `-B` waiters block on. The slots live in the pool's
//! extension map ([`FsInfo::extension`]), so the transaction core keeps
//! them without naming the jobs above it.

use std::time::{Duration, Instant};

use crate::engine::fs_info::FsInfo;
use crate::util::sync::{lock, notify_all, wait_until, Arc, Condvar, Mutex, MutexGuard};

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
