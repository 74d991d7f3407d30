//! FLUSH ordering: a flush waits for the writes received before it.

use std::collections::BTreeSet;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Tracks write-type requests of one connection by arrival order so FLUSH
/// can wait for exactly those received before it. Later writes do not delay
/// it, which keeps a busy connection from starving its flushes.
#[derive(Default)]
pub struct WriteOrder {
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    pending: BTreeSet<u64>,
    /// Flushes blocked in `wait_for`. A completing write wakes them only
    /// when there are some: a condvar notify is a system call even with
    /// nobody waiting, and it was half the futex calls of a 4 KiB
    /// random-write load (bench/profile.md).
    waiters: usize,
}

/// One write in progress; completes (possibly releasing a flush) on drop.
pub struct WriteTicket<'a> {
    order: &'a WriteOrder,
    seq: u64,
}

impl WriteOrder {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a write in arrival order (call from the reader thread).
    pub fn begin_write(&self) -> WriteTicket<'_> {
        let mut st = self.state();
        let seq = st.next_seq;
        st.next_seq += 1;
        st.pending.insert(seq);
        WriteTicket { order: self, seq }
    }

    /// Marks the point a flush must wait for (call from the reader thread).
    pub fn barrier(&self) -> u64 {
        self.state().next_seq
    }

    /// Blocks until every write registered before `barrier` has completed.
    pub fn wait_for(&self, barrier: u64) {
        let mut st = self.state();
        while st.pending.first().is_some_and(|&seq| seq < barrier) {
            st.waiters += 1;
            st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
            debug_assert!(st.waiters > 0);
            st.waiters -= 1;
        }
    }
}

impl Drop for WriteTicket<'_> {
    fn drop(&mut self) {
        let mut st = self.order.state();
        let removed = st.pending.remove(&self.seq);
        debug_assert!(removed, "write {} completed twice", self.seq);
        if st.waiters > 0 {
            self.order.done.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn flush_waits_only_for_earlier_writes() {
        let order = WriteOrder::default();
        let early = order.begin_write();
        let barrier = order.barrier();
        let late = order.begin_write();
        let flushed = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                order.wait_for(barrier);
                flushed.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!flushed.load(Ordering::SeqCst));
            drop(early);
        });
        assert!(flushed.load(Ordering::SeqCst));
        drop(late);
        order.wait_for(order.barrier());
    }
}
