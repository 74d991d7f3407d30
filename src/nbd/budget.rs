//! Per-connection cap on bytes held by in-flight requests.

use std::sync::{Condvar, Mutex, MutexGuard};

/// Counting semaphore over bytes. The reader acquires a request's payload
/// size before buffering it; the permit is released once the reply is sent,
/// so a connection never holds more than the cap (plus one oversized
/// request, which is admitted alone so it cannot starve).
pub struct ByteBudget {
    cap_bytes: usize,
    /// Bytes in use, and whether the reader waits for some to be freed (a
    /// notify is a system call even with nobody waiting).
    used_bytes: Mutex<(usize, bool)>,
    freed: Condvar,
}

/// Bytes reserved from a [`ByteBudget`]; returned on drop.
pub struct Permit<'a> {
    budget: &'a ByteBudget,
    bytes: usize,
}

impl ByteBudget {
    pub fn new(cap_bytes: usize) -> Self {
        ByteBudget {
            cap_bytes,
            used_bytes: Mutex::new((0, false)),
            freed: Condvar::new(),
        }
    }

    fn used(&self) -> MutexGuard<'_, (usize, bool)> {
        // The counter stays consistent even if a holder panicked.
        self.used_bytes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until `bytes` fit under the cap (or nothing else is in flight).
    pub fn acquire(&self, bytes: usize) -> Permit<'_> {
        if bytes == 0 {
            return Permit {
                budget: self,
                bytes,
            };
        }
        let mut used = self.used();
        while used.0 != 0 && used.0.saturating_add(bytes) > self.cap_bytes {
            used.1 = true;
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        used.0 += bytes;
        Permit {
            budget: self,
            bytes,
        }
    }

    /// Bytes currently reserved.
    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.used().0
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let mut used = self.budget.used();
        debug_assert!(used.0 >= self.bytes, "more bytes freed than reserved");
        used.0 -= self.bytes;
        if used.1 {
            used.1 = false;
            self.budget.freed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn blocks_until_released() {
        let b = ByteBudget::new(100);
        let p1 = b.acquire(60);
        let acquired = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let _p2 = b.acquire(60);
                acquired.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!acquired.load(Ordering::SeqCst));
            drop(p1);
        });
        assert!(acquired.load(Ordering::SeqCst));
        assert_eq!(b.in_use(), 0);
    }

    #[test]
    fn oversized_request_admitted_alone() {
        let b = ByteBudget::new(10);
        let p = b.acquire(1000);
        assert_eq!(b.in_use(), 1000);
        drop(p);
        let _small = b.acquire(0);
        assert_eq!(b.in_use(), 0);
    }
}
