//! A deterministic scheduler for tests (tests/lifecycle_sim.rs).
//!
//! A [`Sim`] runs registered *actor* threads one at a time. An actor gives
//! the turn away only at a scheduling point: every failpoint, every lock
//! taken through [`crate::util::sync`], every [`sleep`], every wait on a
//! [`crate::util::sync::wait_until`] latch and every [`JoinHandle::join`].
//! Which actor runs next is drawn from the seed, so one seed is one
//! interleaving, and running it again replays it step for step (the trace
//! of `(actor, point)` pairs is the same).
//!
//! At a failpoint the running actor may also *stall*: it is passed over for
//! a seeded number of steps while any other actor can run, as a thread
//! descheduled at the worst moment would be. A race window between two
//! failpoints (the seed's: a group looked up, then frozen) needs exactly
//! that: one actor stopped inside it while another runs a whole operation.
//!
//! Time is virtual inside a simulation: [`now`] is the simulation's clock,
//! which moves one microsecond per step and jumps to the earliest sleeper
//! when every actor sleeps, so the engine's deadlines and polling loops
//! behave as they would in real time, without waiting for it.
//!
//! A lock that is taken is never waited on inside the OS: the actor retries
//! after another actor has made a step. When no actor can make a step and
//! none sleeps, that is a deadlock, reported with where each actor stands.
//!
//! Threads that are not actors (every thread outside a simulation) see none
//! of this: the checks cost one relaxed load.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Simulations running in this process (a fast "none" check).
static SIMS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static ME: RefCell<Option<(Arc<Sim>, usize)>> = const { RefCell::new(None) };
}

/// The simulation and actor id of this thread, if it is an actor.
fn me() -> Option<(Arc<Sim>, usize)> {
    if SIMS.load(Ordering::Relaxed) == 0 {
        return None;
    }
    ME.with(|m| m.borrow().clone())
}

/// True on an actor thread of a running simulation.
pub fn in_sim() -> bool {
    me().is_some()
}

/// One step of a simulation: which actor passed which scheduling point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub actor: u16,
    pub point: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// May run.
    Ready,
    /// Waits for something another actor does (a lock): may retry once
    /// the progress counter reaches `retry_at`, which backs off with each
    /// failed retry so that a long-held lock does not fill the trace with
    /// retries; or, when nobody else can run, once any actor made a step
    /// after `progress` (the counter when it blocked).
    Blocked {
        progress: u64,
        retry_at: u64,
    },
    /// Sleeps until the clock reaches `until_us`.
    Sleeping {
        until_us: u64,
    },
    /// Joins an actor: may run once it is done.
    Joining {
        actor: usize,
    },
    /// Waits on a latch: may look again once [`signal`] was called after
    /// `signals` (the count when it looked).
    Awaiting {
        signals: u64,
    },
    Done,
}

struct Actor {
    name: String,
    status: Status,
    at: &'static str,
    children: usize,
    /// Passed over until the clock reaches this, while others can run.
    stalled_until_us: u64,
    /// Failed retries in a row (the backoff of [`Status::Blocked`]).
    retries: u32,
    /// Signalled when this actor gets the turn (one wake per switch, not a
    /// wake of every actor).
    turn: Arc<Condvar>,
}

/// Limits of one simulation.
#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    /// The seed: it alone chooses the interleaving.
    pub seed: u64,
    /// A run longer than this many steps is reported as a livelock.
    pub max_steps: u64,
    /// Real time a single step may take before the run is reported as hung
    /// outside the scheduler (an OS-level wait the scheduler cannot see).
    pub step_timeout: Duration,
}

impl SimOptions {
    /// Defaults for `seed`.
    pub fn seed(seed: u64) -> SimOptions {
        SimOptions {
            seed,
            max_steps: 5_000_000,
            step_timeout: Duration::from_secs(30),
        }
    }
}

struct State {
    rng: u64,
    /// Percent chance that the running actor keeps the turn at a point.
    stay_pct: u64,
    /// Percent chance that an actor stalls at a failpoint.
    stall_pct: u64,
    actors: Vec<Actor>,
    running: Option<usize>,
    clock_us: u64,
    progress: u64,
    signals: u64,
    trace: Vec<Step>,
    started: bool,
    halted: Option<String>,
    /// The actor whose unwinding halted the run (its message comes when it
    /// finishes).
    halted_by: Option<usize>,
    max_steps: u64,
}

/// A deterministic simulation: build it, [`Sim::spawn`] the actors, then
/// [`Sim::run`].
pub struct Sim {
    st: Mutex<State>,
    cv: Condvar,
    base: Instant,
    step_timeout: Duration,
}

/// What a finished simulation did.
#[derive(Debug)]
pub struct Outcome {
    /// Every step, in order.
    pub trace: Vec<Step>,
    /// Virtual time at the end.
    pub clock: Duration,
    /// The first failure: an actor's panic, a deadlock, a livelock or a
    /// hang outside the scheduler.
    pub failure: Option<String>,
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn relock<'a>(m: &'a Mutex<State>) -> MutexGuard<'a, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const HALTED: &str = "simulation halted";

impl Sim {
    /// A simulation with no actors yet.
    pub fn new(opts: SimOptions) -> Arc<Sim> {
        let mut rng = opts.seed ^ 0x5EED;
        // How sticky the schedule is varies by seed: some seeds switch at
        // almost every point, others let an actor run long stretches.
        let stay_pct = [30, 70, 90, 97][(splitmix(&mut rng) % 4) as usize];
        let stall_pct = [0, 3, 10, 30][(splitmix(&mut rng) % 4) as usize];
        Arc::new(Sim {
            st: Mutex::new(State {
                rng,
                stay_pct,
                stall_pct,
                actors: Vec::new(),
                running: None,
                clock_us: 0,
                progress: 0,
                signals: 0,
                trace: Vec::new(),
                started: false,
                halted: None,
                halted_by: None,
                max_steps: opts.max_steps,
            }),
            cv: Condvar::new(),
            base: Instant::now(),
            step_timeout: opts.step_timeout,
        })
    }

    /// Add an actor named `name` running `f`; it first runs once the
    /// scheduler picks it.
    pub fn spawn<F, T>(self: &Arc<Self>, name: &str, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let id = {
            let mut st = relock(&self.st);
            st.actors.push(Actor {
                name: name.to_string(),
                status: Status::Ready,
                at: "spawn",
                children: 0,
                stalled_until_us: 0,
                retries: 0,
                turn: Arc::new(Condvar::new()),
            });
            st.actors.len() - 1
        };
        let sim = self.clone();
        let inner = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || sim.actor_main(id, f))
            .unwrap_or_else(|e| panic!("simulation: cannot spawn actor {name}: {e}"));
        JoinHandle {
            inner,
            actor: Some((self.clone(), id)),
        }
    }

    fn actor_main<F: FnOnce() -> T, T>(self: Arc<Self>, id: usize, f: F) -> T {
        ME.with(|m| *m.borrow_mut() = Some((self.clone(), id)));
        // The first wait is inside the catch too: a run halted before this
        // actor ever ran still ends with it done.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(self.wait_turn(id, relock(&self.st)));
            f()
        }));
        let failure = r.as_ref().err().map(|p| panic_text(p.as_ref()));
        self.finish(id, failure);
        ME.with(|m| *m.borrow_mut() = None);
        r.unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// Run every actor to its end (or to the first failure).
    pub fn run(self: &Arc<Self>) -> Outcome {
        SIMS.fetch_add(1, Ordering::AcqRel);
        let mut st = relock(&self.st);
        st.started = true;
        self.hand_over(&mut st, None);
        let mut seen = (st.trace.len(), Instant::now());
        while !st.actors.iter().all(|a| a.status == Status::Done) {
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if st.trace.len() != seen.0 {
                seen = (st.trace.len(), Instant::now());
            } else if seen.1.elapsed() > self.step_timeout {
                // An actor waits outside the scheduler (or a halted run
                // does not wind down): report it, with the trace so far,
                // and let every actor unwind.
                let why = format!(
                    "{}hung outside the scheduler for {:?}: {}",
                    st.halted
                        .as_deref()
                        .map(|h| format!("{h}; then "))
                        .unwrap_or_default(),
                    self.step_timeout,
                    describe(&st)
                );
                st.halted = Some(why.clone());
                self.hand_over(&mut st, None);
                SIMS.fetch_sub(1, Ordering::AcqRel);
                return Outcome {
                    trace: std::mem::take(&mut st.trace),
                    clock: Duration::from_micros(st.clock_us),
                    failure: Some(why),
                };
            }
        }
        SIMS.fetch_sub(1, Ordering::AcqRel);
        Outcome {
            trace: std::mem::take(&mut st.trace),
            clock: Duration::from_micros(st.clock_us),
            failure: st.halted.clone(),
        }
    }

    /// Pick the next actor and give it the turn (`prev` just stepped).
    fn hand_over(&self, st: &mut State, prev: Option<usize>) {
        st.running = None;
        match self.pick(st, prev) {
            Some(next) => {
                st.running = Some(next);
                if prev != Some(next) {
                    st.actors[next].turn.notify_one();
                }
            }
            None => {
                // Halted, deadlocked or all done: everyone looks again.
                for a in &st.actors {
                    a.turn.notify_one();
                }
                self.cv.notify_all();
            }
        }
    }

    /// The next actor, or None when the run is over.
    fn pick(&self, st: &mut State, prev: Option<usize>) -> Option<usize> {
        if st.halted.is_some() {
            return None;
        }
        loop {
            let can_run: Vec<usize> = (0..st.actors.len())
                .filter(|&i| match st.actors[i].status {
                    Status::Ready => true,
                    Status::Blocked { retry_at, .. } => retry_at <= st.progress,
                    Status::Sleeping { until_us } => until_us <= st.clock_us,
                    Status::Joining { actor } => st.actors[actor].status == Status::Done,
                    Status::Awaiting { signals } => signals < st.signals,
                    Status::Done => false,
                })
                .collect();
            let (ready, stalled): (Vec<usize>, Vec<usize>) = can_run
                .iter()
                .partition(|&&i| st.actors[i].stalled_until_us <= st.clock_us);
            // Stalled actors run only when nobody else can, not even after
            // the clock moves to the next sleeper.
            let sleeper = st.actors.iter().any(
                |a| matches!(a.status, Status::Sleeping { until_us } if until_us > st.clock_us),
            );
            let ready = if !ready.is_empty() || sleeper {
                ready
            } else if !stalled.is_empty() {
                stalled
            } else {
                // Nobody else can run: a backed-off retry goes now.
                (0..st.actors.len())
                    .filter(|&i| {
                        matches!(st.actors[i].status,
                            Status::Blocked { progress, .. } if progress < st.progress)
                    })
                    .collect()
            };
            if !ready.is_empty() {
                let stay = prev.filter(|p| ready.contains(p));
                let roll = splitmix(&mut st.rng);
                return Some(match stay {
                    Some(p) if roll % 100 < st.stay_pct => p,
                    _ => ready[(roll >> 8) as usize % ready.len()],
                });
            }
            let wake = st
                .actors
                .iter()
                .filter_map(|a| match a.status {
                    Status::Sleeping { until_us } if until_us > st.clock_us => Some(until_us),
                    _ => None,
                })
                .min();
            match wake {
                Some(t) => st.clock_us = t,
                None => {
                    if !st.actors.iter().all(|a| a.status == Status::Done) {
                        st.halted = Some(format!("deadlock: {}", describe(st)));
                    }
                    return None;
                }
            }
        }
    }

    /// Block the calling actor's thread until it has the turn.
    fn wait_turn<'a>(&'a self, id: usize, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        loop {
            if st.halted.is_some() && !std::thread::panicking() {
                drop(st);
                panic!("{HALTED}");
            }
            if st.started && st.running == Some(id) {
                st.actors[id].status = Status::Ready;
                return st;
            }
            let turn = st.actors[id].turn.clone();
            st = turn.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The running actor `id` reached `point` and becomes `status`.
    fn step(&self, id: usize, status: Status, point: &'static str) {
        let mut st = relock(&self.st);
        if std::thread::panicking() {
            // Unwinding: the run is over. Halt it so that every actor
            // unwinds too and lets go of what it holds (the unwinding one
            // may need a lock a parked actor has); no more switching.
            if st.halted.is_none() {
                st.halted = Some(format!("actor {} panicked", st.actors[id].name));
                st.halted_by = Some(id);
                self.hand_over(&mut st, None);
            }
            return;
        }
        if st.halted.is_some() {
            drop(st);
            panic!("{HALTED}");
        }
        debug_assert_eq!(st.running, Some(id), "a step by an actor without the turn");
        st.actors[id].status = status;
        st.actors[id].at = point;
        if matches!(status, Status::Blocked { .. }) {
            st.actors[id].retries += 1;
        } else {
            st.actors[id].retries = 0;
            st.progress += 1;
        }
        st.trace.push(Step {
            actor: id as u16,
            point,
        });
        st.clock_us += 1;
        if st.trace.len() as u64 > st.max_steps {
            st.halted = Some(format!(
                "no end after {} steps (livelock?): {}",
                st.max_steps,
                describe(&st)
            ));
        }
        self.hand_over(&mut st, Some(id));
        drop(self.wait_turn(id, st));
    }

    fn finish(&self, id: usize, failure: Option<String>) {
        let mut st = relock(&self.st);
        st.actors[id].status = Status::Done;
        st.progress += 1;
        if let Some(f) = failure {
            // The first panic's message, also when its unwinding halted
            // the run before it got here.
            let first = st.halted.is_none() || st.halted_by == Some(id);
            if first && f != HALTED {
                st.halted = Some(format!("actor {}: {f}", st.actors[id].name));
                st.halted_by = None;
                self.hand_over(&mut st, None);
            }
        }
        if st.running == Some(id) {
            self.hand_over(&mut st, Some(id));
        }
        self.cv.notify_all();
    }

    fn is_done(&self, id: usize) -> bool {
        relock(&self.st).actors[id].status == Status::Done
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_micros(relock(&self.st).clock_us)
    }
}

fn describe(st: &State) -> String {
    let each: Vec<String> = st
        .actors
        .iter()
        .filter(|a| a.status != Status::Done)
        .map(|a| format!("{} {:?} at {}", a.name, a.status, a.at))
        .collect();
    format!("step {}, {}", st.trace.len(), each.join("; "))
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// A failpoint as a scheduling point: the turn may pass to another actor,
/// and the actor may stall here.
pub fn point(name: &'static str) {
    if let Some((sim, id)) = me() {
        {
            let mut st = relock(&sim.st);
            let roll = splitmix(&mut st.rng);
            if roll % 100 < st.stall_pct {
                let stall_us = 1u64 << ((roll >> 8) % 13);
                st.actors[id].stalled_until_us = st.clock_us + stall_us;
            }
        }
        sim.step(id, Status::Ready, name);
    }
}

/// A scheduling point where nothing stalls (taking a lock, a spawn).
pub fn switch_point(name: &'static str) {
    if let Some((sim, id)) = me() {
        sim.step(id, Status::Ready, name);
    }
}

/// The caller cannot go on until another actor acts (a lock is taken, a
/// latch is not set): give the turn away and come back after some other
/// actor made a step. Outside a simulation: yield the thread.
pub fn blocked(name: &'static str) {
    match me() {
        Some((sim, id)) => {
            let (progress, retries) = {
                let st = relock(&sim.st);
                (st.progress, st.actors[id].retries)
            };
            let retry_at = progress + (1 << retries.min(8));
            sim.step(id, Status::Blocked { progress, retry_at }, name);
        }
        None => std::thread::yield_now(),
    }
}

/// The latch count for [`await_signal`]: read it before looking at the
/// latch's condition.
pub fn signals() -> u64 {
    me().map(|(sim, _)| relock(&sim.st).signals).unwrap_or(0)
}

/// A latch changed (a condition variable was notified): actors waiting in
/// [`await_signal`] look again.
pub fn signal() {
    if let Some((sim, _)) = me() {
        relock(&sim.st).signals += 1;
    }
}

/// Wait for a [`signal`] after `seen` (from [`signals`]): the latch's
/// condition did not hold. Outside a simulation: yield the thread.
pub fn await_signal(seen: u64) {
    match me() {
        Some((sim, id)) => sim.step(id, Status::Awaiting { signals: seen }, "wait"),
        None => std::thread::yield_now(),
    }
}

/// Sleep: virtual in a simulation, real outside.
pub fn sleep(d: Duration) {
    match me() {
        Some((sim, id)) => {
            let until_us = relock(&sim.st).clock_us + d.as_micros().max(1) as u64;
            sim.step(id, Status::Sleeping { until_us }, "sleep");
        }
        None => std::thread::sleep(d),
    }
}

/// The monotonic clock: virtual in a simulation, real outside.
pub fn now() -> Instant {
    match me() {
        Some((sim, _)) => sim.now(),
        None => Instant::now(),
    }
}

/// Time since `t` on the clock of [`now`].
pub fn since(t: Instant) -> Duration {
    now().saturating_duration_since(t)
}

/// A thread handle whose [`join`](JoinHandle::join) is a scheduling point.
pub struct JoinHandle<T> {
    inner: std::thread::JoinHandle<T>,
    actor: Option<(Arc<Sim>, usize)>,
}

impl<T> JoinHandle<T> {
    /// Wait for the thread to end (in a simulation, by giving the turn
    /// away until the actor is done).
    pub fn join(self) -> std::thread::Result<T> {
        if let (Some((sim, actor)), Some((me_sim, me))) = (&self.actor, me()) {
            if Arc::ptr_eq(sim, &me_sim) && !sim.is_done(*actor) {
                sim.step(me, Status::Joining { actor: *actor }, "join");
            }
        }
        self.inner.join()
    }

    /// True once the thread ended.
    pub fn is_finished(&self) -> bool {
        match &self.actor {
            Some((sim, id)) => sim.is_done(*id),
            None => self.inner.is_finished(),
        }
    }
}

/// Spawn a thread; from an actor, the new thread is an actor of the same
/// simulation, named after its parent.
pub fn spawn<F, T>(f: F) -> JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match me() {
        Some((sim, id)) => {
            let name = {
                let mut st = relock(&sim.st);
                st.actors[id].children += 1;
                format!("{}.{}", st.actors[id].name, st.actors[id].children)
            };
            let h = sim.spawn(&name, f);
            switch_point("spawn");
            h
        }
        None => JoinHandle {
            inner: std::thread::spawn(f),
            actor: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn counting_run(seed: u64) -> Outcome {
        let sim = Sim::new(SimOptions::seed(seed));
        let shared = Arc::new(Mutex::new(Vec::new()));
        for a in 0..3u64 {
            let s = shared.clone();
            sim.spawn(&format!("a{a}"), move || {
                for i in 0..20 {
                    point("step");
                    s.lock().unwrap().push(a * 100 + i);
                    if i % 7 == 0 {
                        sleep(Duration::from_micros(50));
                    }
                }
            });
        }
        sim.run()
    }

    #[test]
    fn one_seed_replays_the_same_trace() {
        let a = counting_run(7);
        let b = counting_run(7);
        assert!(a.failure.is_none(), "{:?}", a.failure);
        assert_eq!(a.trace, b.trace);
        assert!(a.trace.len() >= 60);
        let differ = (8..20).any(|s| counting_run(s).trace != a.trace);
        assert!(differ, "every seed gave the same interleaving");
    }

    #[test]
    fn only_one_actor_runs_at_a_time() {
        let sim = Sim::new(SimOptions::seed(3));
        let inside = Arc::new(AtomicU64::new(0));
        for a in 0..4 {
            let inside = inside.clone();
            sim.spawn(&format!("a{a}"), move || {
                for _ in 0..50 {
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                    std::thread::sleep(Duration::from_micros(10));
                    inside.fetch_sub(1, Ordering::SeqCst);
                    point("p");
                }
            });
        }
        let o = sim.run();
        assert!(o.failure.is_none(), "{:?}", o.failure);
    }

    #[test]
    fn a_lock_cycle_is_reported_as_a_deadlock() {
        use crate::util::sync::{lock, Mutex as M};
        for seed in 0..20 {
            let sim = Sim::new(SimOptions::seed(seed));
            let (x, y) = (Arc::new(M::new(())), Arc::new(M::new(())));
            for flip in [false, true] {
                let (x, y) = (x.clone(), y.clone());
                sim.spawn(if flip { "yx" } else { "xy" }, move || {
                    let (a, b) = if flip { (&y, &x) } else { (&x, &y) };
                    let _a = lock(a.as_ref());
                    point("between");
                    let _b = lock(b.as_ref());
                });
            }
            let o = sim.run();
            if let Some(f) = o.failure {
                assert!(f.starts_with("deadlock"), "{f}");
                assert!(f.contains("xy") && f.contains("yx"), "{f}");
                return;
            }
        }
        panic!("no seed of 20 interleaved the two lock orders into a deadlock");
    }

    #[test]
    fn a_panicking_actor_fails_the_run() {
        let sim = Sim::new(SimOptions::seed(1));
        sim.spawn("ok", || {
            for _ in 0..10 {
                point("p");
            }
        });
        sim.spawn("bad", || {
            point("p");
            panic!("boom");
        });
        let o = sim.run();
        let f = o.failure.expect("the panic is the run's failure");
        assert!(f.contains("actor bad: boom"), "{f}");
    }

    #[test]
    fn a_failure_before_an_actor_ever_ran_still_ends_the_run() {
        for seed in 0..20 {
            let sim = Sim::new(SimOptions::seed(seed));
            sim.spawn("bad", || panic!("boom"));
            for a in 0..3 {
                sim.spawn(&format!("idle{a}"), || {
                    for _ in 0..5 {
                        point("p");
                    }
                });
            }
            let f = sim.run().failure.expect("the panic fails the run");
            assert!(f.contains("actor bad: boom"), "seed {seed}: {f}");
        }
    }

    /// Unwinding that needs a lock a parked actor holds: the halt makes
    /// the holder unwind and let go, and a ranked lock the holder was
    /// waiting for when the halt came leaves no stale rank behind (which
    /// would fail the lock-order check inside its own unwinding).
    #[test]
    fn unwinding_gets_the_locks_parked_actors_hold() {
        use crate::util::sync::{lock, OrderedMutex, Rank};
        struct TakesOnDrop(Arc<OrderedMutex<()>>);
        impl Drop for TakesOnDrop {
            fn drop(&mut self) {
                drop(lock(self.0.as_ref()));
            }
        }
        for seed in 0..30 {
            let sim = Sim::new(SimOptions::seed(seed));
            let group = Arc::new(OrderedMutex::new(Rank::BlockGroup, ()));
            let leaf = Arc::new(OrderedMutex::new(Rank::Leaf, ()));
            let (g, l) = (group.clone(), leaf.clone());
            sim.spawn("holder", move || {
                let _g = lock(g.as_ref());
                for _ in 0..20 {
                    point("holding");
                }
            });
            let (g, l2) = (group.clone(), l.clone());
            sim.spawn("waiter", move || {
                let _t = TakesOnDrop(g.clone());
                let _l = lock(l2.as_ref());
                for _ in 0..20 {
                    point("waiting");
                }
            });
            let (g, l3) = (group.clone(), l.clone());
            sim.spawn("bad", move || {
                let _t = TakesOnDrop(g);
                let _l = lock(l3.as_ref());
                point("before");
                panic!("boom");
            });
            let o = sim.run();
            let f = o.failure.expect("the panic fails the run");
            assert!(f.contains("actor bad: boom"), "seed {seed}: {f}");
        }
    }

    #[test]
    fn sleeping_actors_advance_virtual_time_only() {
        let sim = Sim::new(SimOptions::seed(5));
        sim.spawn("sleeper", || sleep(Duration::from_secs(3600)));
        let t = Instant::now();
        let o = sim.run();
        assert!(o.failure.is_none());
        assert!(o.clock >= Duration::from_secs(3600));
        assert!(t.elapsed() < Duration::from_secs(60));
    }

    #[test]
    fn children_are_actors_and_join_is_a_point() {
        let sim = Sim::new(SimOptions::seed(9));
        let n = Arc::new(AtomicU64::new(0));
        let n2 = n.clone();
        sim.spawn("parent", move || {
            let hs: Vec<_> = (0..3)
                .map(|_| {
                    let n = n2.clone();
                    spawn(move || {
                        point("child");
                        n.fetch_add(1, Ordering::SeqCst);
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            assert_eq!(n2.load(Ordering::SeqCst), 3);
        });
        let o = sim.run();
        assert!(o.failure.is_none(), "{:?}", o.failure);
        assert_eq!(n.load(Ordering::SeqCst), 3);
        assert!(o.trace.iter().any(|s| s.point == "child" && s.actor > 0));
    }
}
