//! Every lock, atomic and thread spawn goes through this module. Lock
//! acquisition, latch waits and spawned threads are scheduling points of
//! the deterministic scheduler ([`crate::util::sched`]) on its actor
//! threads; elsewhere they are the std primitives.
//!
//! The engine's ordered locks ([`OrderedMutex`], [`OrderedRwLock`]) carry a
//! [`Rank`]. In test builds (debug assertions on) each thread keeps the
//! ranks it holds, and taking a lock whose rank is not above every held one
//! panics: the lock order of docs/ARCHITECTURE.md ("Locks") is asserted,
//! not only written down. Release builds keep no record.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

pub use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
pub use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::sync::{LockResult, TryLockError, TryLockResult};

use super::sched;

/// Threads whose spawn, join and sleep the scheduler sees.
pub mod thread {
    pub use super::sched::{sleep, spawn, JoinHandle};
}

/// The lock order, outermost first. A thread may take a lock only while
/// every lock it holds has a lower rank ([`Rank::Rmw`] may nest in itself:
/// lower stripe index first). `Leaf` locks are taken last: nothing ranked
/// is taken while one is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rank {
    /// `FsInfo::reloc_lock`: one relocation, removal step or replace group.
    Reloc,
    /// `FsInfo::rmw_locks`: partial-sector read-modify-write stripes.
    Rmw,
    /// `FsInfo::commit_lock`: one commit at a time.
    Commit,
    /// `FsInfo::trans`: the running transaction.
    Trans,
    /// A block group's state.
    BlockGroup,
    /// `MappingTree::maps`: the chunk map.
    ChunkMaps,
    /// `Device::extents`: a device's allocated physical ranges.
    DevExtents,
    /// Short-lived bookkeeping (readers, pinned extents, the unused list).
    Leaf,
}

impl Rank {
    /// The scheduling point of taking a lock of this rank.
    fn point(self) -> &'static str {
        match self {
            Rank::Reloc => "lock:reloc",
            Rank::Rmw => "lock:rmw",
            Rank::Commit => "lock:commit",
            Rank::Trans => "lock:trans",
            Rank::BlockGroup => "lock:block_group",
            Rank::ChunkMaps => "lock:chunk_maps",
            Rank::DevExtents => "lock:dev_extents",
            Rank::Leaf => "lock:leaf",
        }
    }
}

/// Take a lock. On a scheduler actor: a scheduling point, and a taken lock
/// gives the turn away instead of blocking the OS thread (which would stop
/// the whole simulation). Poisoning is ignored: see [`lock`].
fn take<G>(
    point: &'static str,
    try_take: impl Fn() -> TryLockResult<G>,
    take_blocking: impl FnOnce() -> LockResult<G>,
) -> G {
    if !sched::in_sim() {
        return take_blocking().unwrap_or_else(|e| e.into_inner());
    }
    sched::switch_point(point);
    loop {
        match try_take() {
            Ok(g) => return g,
            Err(TryLockError::Poisoned(e)) => return e.into_inner(),
            Err(TryLockError::WouldBlock) => sched::blocked(point),
        }
    }
}

/// Wait on `cond` until `ready` holds for the value in `m`. On a scheduler
/// actor the wait gives the turn away until someone calls [`notify_all`].
pub fn wait_until<'a, T>(
    m: &'a Mutex<T>,
    cond: &Condvar,
    ready: impl Fn(&T) -> bool,
) -> MutexGuard<'a, T> {
    if sched::in_sim() {
        loop {
            let seen = sched::signals();
            let g = lock(m);
            if ready(&g) {
                return g;
            }
            drop(g);
            sched::await_signal(seen);
        }
    }
    let mut g = lock(m);
    while !ready(&g) {
        g = cond.wait(g).unwrap_or_else(|e| e.into_inner());
    }
    g
}

/// Wake every [`wait_until`] waiter on `cond` (call after changing the
/// value under its mutex).
pub fn notify_all(cond: &Condvar) {
    cond.notify_all();
    sched::signal();
}

thread_local! {
    static HELD: RefCell<Vec<Rank>> = const { RefCell::new(Vec::new()) };
}

/// Record that this thread is about to take `rank` (test builds only).
fn enter(rank: Rank) {
    if !cfg!(debug_assertions) {
        return;
    }
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        if let Some(&top) = h.iter().max() {
            let nests = top == rank && rank == Rank::Rmw;
            assert!(
                top < rank || nests,
                "lock order: taking {rank:?} while holding {:?} (docs/ARCHITECTURE.md, Locks)",
                *h
            );
        }
        h.push(rank);
    });
}

/// [`take`] a ranked lock: the order is checked before it, and the rank
/// stays recorded only if the lock was taken (a halted simulation unwinds
/// out of `take`, and a stale rank would fail the unwinding's own locks).
fn take_ranked<G>(
    rank: Rank,
    try_take: impl Fn() -> TryLockResult<G>,
    take_blocking: impl FnOnce() -> LockResult<G>,
) -> G {
    struct Undo(Rank);
    impl Drop for Undo {
        fn drop(&mut self) {
            leave(self.0);
        }
    }
    enter(rank);
    let undo = Undo(rank);
    let g = take(rank.point(), try_take, take_blocking);
    std::mem::forget(undo);
    g
}

/// Record that this thread let go of `rank` (test builds only).
fn leave(rank: Rank) {
    if !cfg!(debug_assertions) {
        return;
    }
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        let i = h.iter().rposition(|&r| r == rank);
        debug_assert!(i.is_some(), "lock order: {rank:?} released but not held");
        if let Some(i) = i {
            h.remove(i);
        }
    });
}

/// The ranks this thread holds now (empty in release builds).
pub fn held_ranks() -> Vec<Rank> {
    HELD.with(|h| h.borrow().clone())
}

/// A mutex with a place in the lock order.
#[derive(Debug)]
pub struct OrderedMutex<T> {
    rank: Rank,
    inner: Mutex<T>,
}

impl<T> OrderedMutex<T> {
    pub const fn new(rank: Rank, value: T) -> Self {
        OrderedMutex {
            rank,
            inner: Mutex::new(value),
        }
    }

    /// The lock if it is free now, without waiting (the order is still
    /// checked, as for [`lock`]).
    pub fn try_lock_now(&self) -> Option<OrderedGuard<'_, T>> {
        enter(self.rank);
        if sched::in_sim() {
            sched::switch_point(self.rank.point());
        }
        let guard = match self.inner.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                leave(self.rank);
                return None;
            }
        };
        Some(OrderedGuard {
            guard,
            rank: self.rank,
        })
    }
}

/// A held [`OrderedMutex`].
pub struct OrderedGuard<'a, T> {
    guard: MutexGuard<'a, T>,
    rank: Rank,
}

impl<T> Deref for OrderedGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}
impl<T> DerefMut for OrderedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}
impl<T> Drop for OrderedGuard<'_, T> {
    fn drop(&mut self) {
        leave(self.rank);
    }
}

/// A reader-writer lock with a place in the lock order.
#[derive(Debug)]
pub struct OrderedRwLock<T> {
    rank: Rank,
    inner: RwLock<T>,
}

impl<T> OrderedRwLock<T> {
    pub const fn new(rank: Rank, value: T) -> Self {
        OrderedRwLock {
            rank,
            inner: RwLock::new(value),
        }
    }
}

/// A read-held [`OrderedRwLock`].
pub struct OrderedReadGuard<'a, T> {
    guard: RwLockReadGuard<'a, T>,
    rank: Rank,
}
impl<T> Deref for OrderedReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}
impl<T> Drop for OrderedReadGuard<'_, T> {
    fn drop(&mut self) {
        leave(self.rank);
    }
}

/// A write-held [`OrderedRwLock`].
pub struct OrderedWriteGuard<'a, T> {
    guard: RwLockWriteGuard<'a, T>,
    rank: Rank,
}
impl<T> Deref for OrderedWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}
impl<T> DerefMut for OrderedWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}
impl<T> Drop for OrderedWriteGuard<'_, T> {
    fn drop(&mut self) {
        leave(self.rank);
    }
}

/// Something [`lock`] can take: a plain or an ordered mutex.
pub trait Lockable {
    type Guard<'a>
    where
        Self: 'a;
    fn acquire(&self) -> Self::Guard<'_>;
}

impl<T> Lockable for Mutex<T> {
    type Guard<'a>
        = MutexGuard<'a, T>
    where
        T: 'a;
    fn acquire(&self) -> MutexGuard<'_, T> {
        take("lock", || self.try_lock(), || self.lock())
    }
}

impl<T> Lockable for OrderedMutex<T> {
    type Guard<'a>
        = OrderedGuard<'a, T>
    where
        T: 'a;
    fn acquire(&self) -> OrderedGuard<'_, T> {
        let m = &self.inner;
        OrderedGuard {
            guard: take_ranked(self.rank, || m.try_lock(), || m.lock()),
            rank: self.rank,
        }
    }
}

/// Something [`read`] and [`write`] can take.
pub trait RwLockable {
    type Read<'a>
    where
        Self: 'a;
    type Write<'a>
    where
        Self: 'a;
    fn acquire_read(&self) -> Self::Read<'_>;
    fn acquire_write(&self) -> Self::Write<'_>;
}

impl<T> RwLockable for RwLock<T> {
    type Read<'a>
        = RwLockReadGuard<'a, T>
    where
        T: 'a;
    type Write<'a>
        = RwLockWriteGuard<'a, T>
    where
        T: 'a;
    fn acquire_read(&self) -> RwLockReadGuard<'_, T> {
        take("read lock", || self.try_read(), || self.read())
    }
    fn acquire_write(&self) -> RwLockWriteGuard<'_, T> {
        take("write lock", || self.try_write(), || self.write())
    }
}

impl<T> RwLockable for OrderedRwLock<T> {
    type Read<'a>
        = OrderedReadGuard<'a, T>
    where
        T: 'a;
    type Write<'a>
        = OrderedWriteGuard<'a, T>
    where
        T: 'a;
    fn acquire_read(&self) -> OrderedReadGuard<'_, T> {
        let l = &self.inner;
        OrderedReadGuard {
            guard: take_ranked(self.rank, || l.try_read(), || l.read()),
            rank: self.rank,
        }
    }
    fn acquire_write(&self) -> OrderedWriteGuard<'_, T> {
        let l = &self.inner;
        OrderedWriteGuard {
            guard: take_ranked(self.rank, || l.try_write(), || l.write()),
            rank: self.rank,
        }
    }
}

/// Lock a mutex, treating poisoning as fatal for the pool: a panic while holding
/// engine state means the in-memory state can no longer be trusted.
pub fn lock<L: Lockable>(m: &L) -> L::Guard<'_> {
    m.acquire()
}

/// Read-lock, see [`lock`].
pub fn read<L: RwLockable>(m: &L) -> L::Read<'_> {
    m.acquire_read()
}

/// Write-lock, see [`lock`].
pub fn write<L: RwLockable>(m: &L) -> L::Write<'_> {
    m.acquire_write()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_declared_order_is_accepted() {
        let trans = OrderedMutex::new(Rank::Trans, ());
        let bg = OrderedMutex::new(Rank::BlockGroup, ());
        let maps = OrderedRwLock::new(Rank::ChunkMaps, ());
        let _t = lock(&trans);
        let _b = lock(&bg);
        let _m = read(&maps);
        if cfg!(debug_assertions) {
            assert_eq!(
                held_ranks(),
                vec![Rank::Trans, Rank::BlockGroup, Rank::ChunkMaps]
            );
        }
    }

    #[test]
    fn try_lock_now_never_waits() {
        let m = OrderedMutex::new(Rank::Commit, 1u32);
        let held = m.try_lock_now().expect("free");
        assert_eq!(*held, 1);
        std::thread::scope(|s| {
            s.spawn(|| assert!(m.try_lock_now().is_none(), "held elsewhere"));
        });
        drop(held);
        assert!(m.try_lock_now().is_some(), "free again");
    }

    #[test]
    #[cfg_attr(
        debug_assertions,
        should_panic(expected = "lock order: taking Trans while holding [BlockGroup]")
    )]
    fn a_wrong_order_fires_in_test_builds() {
        let trans = OrderedMutex::new(Rank::Trans, ());
        let bg = OrderedMutex::new(Rank::BlockGroup, ());
        let _b = lock(&bg);
        let _t = lock(&trans);
    }

    #[test]
    fn a_released_lock_leaves_the_record() {
        let trans = OrderedMutex::new(Rank::Trans, ());
        let bg = OrderedMutex::new(Rank::BlockGroup, ());
        drop(lock(&bg));
        assert!(held_ranks().is_empty());
        let t = lock(&trans);
        let b = lock(&bg);
        // Out of order drops are fine: each guard removes its own rank.
        drop(t);
        if cfg!(debug_assertions) {
            assert_eq!(held_ranks(), vec![Rank::BlockGroup]);
        }
        drop(b);
        assert!(held_ranks().is_empty());
    }
}
