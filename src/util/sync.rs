//! Every lock, atomic and thread spawn goes through this module so that an
//! interleaving explorer (shuttle) can replace them under a feature flag later.

pub use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
pub use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
pub use std::thread;

/// Lock a mutex, treating poisoning as fatal for the pool: a panic while holding
/// engine state means the in-memory state can no longer be trusted.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read-lock, see [`lock`].
pub fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-lock, see [`lock`].
pub fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}
