//! The bounded queue from a connection's reader to its workers.
//!
//! A `std::sync::mpsc` receiver shared behind a mutex made every request
//! wake two threads when the workers were idle: the worker blocked in
//! `recv` holding the mutex, then, as it let go, the next worker queued on
//! the mutex. Here idle workers wait on a condvar, one is woken per request,
//! and none when every worker is busy (a notify is a system call even with
//! nobody waiting).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

struct State<T> {
    items: VecDeque<T>,
    /// Workers waiting for an item.
    idle: usize,
    /// The reader waiting for room.
    full_waiter: bool,
    closed: bool,
}

/// A bounded multi-consumer queue of jobs.
pub struct JobQueue<T> {
    cap: usize,
    state: Mutex<State<T>>,
    not_empty: Condvar,
    not_full: Condvar,
}

impl<T> JobQueue<T> {
    /// A queue holding at most `cap` items (at least one).
    pub fn new(cap: usize) -> Self {
        JobQueue {
            cap: cap.max(1),
            state: Mutex::new(State {
                items: VecDeque::new(),
                idle: 0,
                full_waiter: false,
                closed: false,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State<T>> {
        // The queue stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add an item, waiting while the queue is full; gives it back once the
    /// queue is closed.
    pub fn push(&self, item: T) -> Result<(), T> {
        let mut st = self.state();
        while st.items.len() >= self.cap && !st.closed {
            st.full_waiter = true;
            st = self.not_full.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.closed {
            return Err(item);
        }
        st.items.push_back(item);
        debug_assert!(st.items.len() <= self.cap, "queue over its bound");
        if st.idle > 0 {
            self.not_empty.notify_one();
        }
        Ok(())
    }

    /// The next item, waiting while the queue is empty; None once it is
    /// closed and drained.
    pub fn pop(&self) -> Option<T> {
        let mut st = self.state();
        loop {
            if let Some(item) = st.items.pop_front() {
                if st.full_waiter {
                    st.full_waiter = false;
                    self.not_full.notify_one();
                }
                return Some(item);
            }
            if st.closed {
                return None;
            }
            st.idle += 1;
            st = self.not_empty.wait(st).unwrap_or_else(|e| e.into_inner());
            debug_assert!(st.idle > 0);
            st.idle -= 1;
        }
    }

    /// No more items: workers drain what is queued, then `pop` gives None.
    pub fn close(&self) {
        let mut st = self.state();
        st.closed = true;
        self.not_empty.notify_all();
        self.not_full.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_item_reaches_one_worker_and_close_drains() {
        let q = JobQueue::new(4);
        let seen = AtomicUsize::new(0);
        let sum = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    while let Some(v) = q.pop() {
                        seen.fetch_add(1, Ordering::Relaxed);
                        sum.fetch_add(v, Ordering::Relaxed);
                    }
                });
            }
            for v in 1..=1000usize {
                q.push(v).expect("open queue takes items");
            }
            q.close();
        });
        assert_eq!(seen.load(Ordering::Relaxed), 1000);
        assert_eq!(sum.load(Ordering::Relaxed), 1000 * 1001 / 2);
    }

    #[test]
    fn push_waits_for_room_and_fails_once_closed() {
        let q = JobQueue::new(1);
        q.push(1).unwrap();
        std::thread::scope(|s| {
            let pusher = s.spawn(|| q.push(2));
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!pusher.is_finished(), "a full queue holds the pusher");
            assert_eq!(q.pop(), Some(1));
            assert_eq!(pusher.join().unwrap(), Ok(()));
        });
        assert_eq!(q.pop(), Some(2));
        q.close();
        assert_eq!(q.push(3), Err(3));
        assert_eq!(q.pop(), None);
    }
}
