//! Failpoints: named places where a test can pause a thread to force an
//! interleaving (see tests/scrub_races.rs). Always compiled: an unarmed
//! failpoint costs one relaxed atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

/// What an armed failpoint does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Block every thread that reaches it until [`release`].
    Pause,
    /// Block only when the failpoint's argument equals this value.
    PauseIf(u64),
}

#[derive(Default)]
struct Registry {
    actions: HashMap<String, Action>,
    hits: HashMap<String, u64>,
    paused: HashMap<String, u64>,
}

static ARMED: AtomicBool = AtomicBool::new(false);

/// Schedule perturbation: every failpoint reached sleeps or yields by a
/// seeded choice, so each seed drives the threads through a different
/// interleaving of the lifecycle steps (the explorer's scheduler).
static CHAOS_SEED: AtomicU64 = AtomicU64::new(0);
static CHAOS_STEP: AtomicU64 = AtomicU64::new(0);
static CHAOS_MAX_US: AtomicU64 = AtomicU64::new(0);

/// Perturb every failpoint with seed `seed` (0 turns chaos off).
pub fn set_chaos(seed: u64, max_delay_us: u64) {
    CHAOS_SEED.store(seed, Ordering::Release);
    CHAOS_STEP.store(0, Ordering::Release);
    CHAOS_MAX_US.store(max_delay_us, Ordering::Release);
    if seed != 0 {
        ARMED.store(true, Ordering::Release);
    }
}

fn chaos(name: &str) {
    let seed = CHAOS_SEED.load(Ordering::Relaxed);
    if seed == 0 {
        return;
    }
    let step = CHAOS_STEP.fetch_add(1, Ordering::Relaxed);
    let mut x = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (name.len() as u64) << 32;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    match x % 4 {
        0 => {}
        1 => std::thread::yield_now(),
        _ => {
            // Steps of the block-group lifecycle (scrub, cleaner,
            // relocation) get ten times longer: their windows are where the
            // catalogue's races live, and the hot I/O paths stay fast.
            let lifecycle = ["scrub::", "cleaner::", "relocation::"]
                .iter()
                .any(|p| name.starts_with(p));
            let max = CHAOS_MAX_US.load(Ordering::Relaxed).max(1) * if lifecycle { 10 } else { 1 };
            std::thread::sleep(Duration::from_micros((x >> 8) % max));
        }
    }
}

fn reg() -> &'static (Mutex<Registry>, Condvar) {
    static R: OnceLock<(Mutex<Registry>, Condvar)> = OnceLock::new();
    R.get_or_init(Default::default)
}

fn guard() -> std::sync::MutexGuard<'static, Registry> {
    reg().0.lock().unwrap_or_else(|e| e.into_inner())
}

/// Arm a failpoint.
pub fn set(name: &str, a: Action) {
    ARMED.store(true, Ordering::Release);
    guard().actions.insert(name.into(), a);
}

/// Disarm and wake anyone paused there.
pub fn release(name: &str) {
    guard().actions.remove(name);
    reg().1.notify_all();
}

/// Disarm everything and forget all counts.
pub fn reset() {
    let mut g = guard();
    g.actions.clear();
    g.hits.clear();
    g.paused.clear();
    reg().1.notify_all();
}

/// Times `name` was reached.
pub fn hits(name: &str) -> u64 {
    guard().hits.get(name).copied().unwrap_or(0)
}

/// Wait until a thread is paused at `name`; false after `timeout`.
pub fn wait_paused(name: &str, timeout: Duration) -> bool {
    let end = std::time::Instant::now() + timeout;
    let (_, c) = reg();
    let mut g = guard();
    while g.paused.get(name).copied().unwrap_or(0) == 0 {
        let now = std::time::Instant::now();
        if now >= end {
            return false;
        }
        g = c
            .wait_timeout(g, end - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    true
}

/// Called at the failpoint: a scheduling point for the deterministic
/// scheduler, then whatever a test armed here.
pub fn hit(name: &'static str, arg: u64) {
    super::sched::point(name);
    if !ARMED.load(Ordering::Relaxed) {
        return;
    }
    chaos(name);
    let (_, c) = reg();
    let mut g = guard();
    *g.hits.entry(name.into()).or_insert(0) += 1;
    let stop = |g: &Registry| match g.actions.get(name) {
        Some(Action::Pause) => true,
        Some(Action::PauseIf(v)) => *v == arg,
        None => false,
    };
    if stop(&g) {
        *g.paused.entry(name.into()).or_insert(0) += 1;
        c.notify_all();
        while stop(&g) {
            g = c.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        *g.paused.entry(name.into()).or_insert(1) -= 1;
    }
    c.notify_all();
}

/// Mark a failpoint, optionally with an argument tests can match on.
#[macro_export]
macro_rules! failpoint {
    ($name:expr) => {
        $crate::util::failpoint::hit($name, 0)
    };
    ($name:expr, $arg:expr) => {
        $crate::util::failpoint::hit($name, $arg)
    };
}
