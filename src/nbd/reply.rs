//! Replies on their way to the client.
//!
//! Each worker used to write its own reply under one lock: a system call,
//! and a wake-up of the client, per reply. Now a worker queues its reply,
//! and the one that finds nobody writing becomes the writer: it sends
//! everything queued in one vectored write, again and again until the
//! queue is empty. A reply may also wait, up to [`MAX_DEFERRED_REPLIES`],
//! while other quick requests are being served ([`ReplySink::busy`]): the
//! last of them to be answered sends them all. Under load one write then
//! carries several replies and the client wakes once for them; a request
//! served alone is answered at once.

use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use super::stream::Stream;

/// Replies queued per connection, at most; a worker with one more waits
/// for the writer. Also the most one vectored write carries.
pub const MAX_QUEUED_REPLIES: usize = 64;

/// Replies that may wait for requests still being served; the next one
/// is sent, with them, at once.
pub const MAX_DEFERRED_REPLIES: usize = 16;

struct State<T> {
    queued: Vec<T>,
    /// A worker is writing: it sends what is queued before it stops.
    writing: bool,
    /// Workers waiting for room in the queue.
    room_waiters: usize,
    /// Requests being served whose replies are expected soon (see
    /// [`ReplySink::busy`]).
    busy: usize,
}

/// Serialises replies onto the socket; after the first failed write every
/// reply is dropped.
pub struct ReplySink<T> {
    stream: Mutex<Box<dyn Stream>>,
    state: Mutex<State<T>>,
    room: Condvar,
    broken: AtomicBool,
}

impl<T: Deref<Target = [u8]>> ReplySink<T> {
    pub fn new(stream: Box<dyn Stream>) -> Self {
        ReplySink {
            stream: Mutex::new(stream),
            state: Mutex::new(State {
                queued: Vec::with_capacity(MAX_QUEUED_REPLIES),
                writing: false,
                room_waiters: 0,
                busy: 0,
            }),
            room: Condvar::new(),
            broken: AtomicBool::new(false),
        }
    }

    fn state(&self) -> MutexGuard<'_, State<T>> {
        // The queue stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request whose reply should come soon is being served: until it
    /// is answered (through the guard), other replies may wait for it, up
    /// to [`MAX_DEFERRED_REPLIES`], so that one write carries both. For
    /// quick requests only: a reply waits at most as long as the requests
    /// being served next to it.
    pub fn busy(&self) -> Busy<'_, T> {
        self.state().busy += 1;
        Busy { sink: self }
    }

    /// Sends `reply`, now or with the writer's next batch. Whatever it
    /// holds (a buffer, a budget permit) is released once it was written.
    pub fn send(&self, reply: T) {
        self.queue(reply, false);
    }

    fn queue(&self, reply: T, was_busy: bool) {
        let mut st = self.state();
        if was_busy {
            debug_assert!(st.busy > 0, "more busy requests answered than begun");
            st.busy -= 1;
        }
        if self.is_broken() {
            return;
        }
        while st.queued.len() >= MAX_QUEUED_REPLIES && st.writing && !self.is_broken() {
            st.room_waiters += 1;
            st = self.room.wait(st).unwrap_or_else(|e| e.into_inner());
            st.room_waiters -= 1;
        }
        st.queued.push(reply);
        debug_assert!(
            st.queued.len() <= MAX_QUEUED_REPLIES,
            "reply queue over its bound"
        );
        // Another reply is on its way and this one can wait for it: the
        // last of them to be answered sends them all.
        if st.writing || (st.busy > 0 && st.queued.len() < MAX_DEFERRED_REPLIES) {
            return;
        }
        self.write_queued(st);
    }

    /// Write everything queued, and what is queued meanwhile, as the writer.
    fn write_queued<'s>(&'s self, mut st: MutexGuard<'s, State<T>>) {
        debug_assert!(!st.writing, "two writers");
        st.writing = true;
        let mut batch = Vec::with_capacity(MAX_QUEUED_REPLIES);
        loop {
            debug_assert!(batch.is_empty());
            std::mem::swap(&mut batch, &mut st.queued);
            if batch.is_empty() {
                st.writing = false;
                return;
            }
            if st.room_waiters > 0 {
                self.room.notify_all();
            }
            drop(st);
            self.write_batch(&batch);
            batch.clear();
            st = self.state();
        }
    }

    fn write_batch(&self, batch: &[T]) {
        if self.is_broken() {
            return;
        }
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = write_all_vectored(&mut **stream, batch) {
            tracing::debug!(error = %e, "nbd reply write failed");
            self.broken.store(true, Ordering::Release);
            // Wake the reader so the connection winds down.
            let _ = stream.shutdown_stream(Shutdown::Both);
        }
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }
}

/// A request being served, from [`ReplySink::busy`]: answer it with
/// [`Busy::send`]. Dropped unanswered (a panic), it stops holding the
/// others back, and sends them if it was the last.
pub struct Busy<'s, T: Deref<Target = [u8]>> {
    sink: &'s ReplySink<T>,
}

impl<T: Deref<Target = [u8]>> Busy<'_, T> {
    /// Send this request's reply.
    pub fn send(self, reply: T) {
        let sink = self.sink;
        std::mem::forget(self);
        sink.queue(reply, true);
    }
}

impl<T: Deref<Target = [u8]>> Drop for Busy<'_, T> {
    fn drop(&mut self) {
        let mut st = self.sink.state();
        debug_assert!(st.busy > 0, "more busy requests answered than begun");
        st.busy -= 1;
        if st.busy == 0 && !st.writing && !st.queued.is_empty() {
            self.sink.write_queued(st);
        }
    }
}

/// Writes every byte of `bufs`, in order, in as few system calls as the
/// socket allows.
fn write_all_vectored<T: Deref<Target = [u8]>>(w: &mut dyn Stream, bufs: &[T]) -> io::Result<()> {
    let mut slices = [IoSlice::new(&[]); MAX_QUEUED_REPLIES];
    let n = bufs.len().min(MAX_QUEUED_REPLIES);
    for (s, b) in slices.iter_mut().zip(bufs) {
        *s = IoSlice::new(b);
    }
    let mut rest = &mut slices[..n];
    while !rest.is_empty() {
        match w.send_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut rest, written),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    debug_assert!(
        bufs.len() <= MAX_QUEUED_REPLIES,
        "batch over the queue's bound"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn every_reply_arrives_whole_from_many_threads() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let sink = ReplySink::<Vec<u8>>::new(Box::new(a));
        let threads = 8;
        let per_thread = 500;
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            b.read_to_end(&mut all).unwrap();
            all
        });
        std::thread::scope(|s| {
            for t in 0..threads {
                let sink = &sink;
                s.spawn(move || {
                    for i in 0..per_thread {
                        // A record: its length, then that many copies of a tag.
                        let len = 1 + (i * 7 + t * 13) % 300;
                        let mut r = vec![len as u8, (len >> 8) as u8];
                        r.extend(std::iter::repeat_n((t * per_thread + i) as u8, len));
                        // Half the threads hold others' replies back.
                        if t % 2 == 0 {
                            sink.busy().send(r);
                        } else {
                            sink.send(r);
                        }
                    }
                });
            }
        });
        assert!(sink.state().queued.is_empty(), "replies left queued");
        assert!(!sink.state().writing);
        drop(sink);
        let all = reader.join().unwrap();
        let mut seen = 0;
        let mut at = 0;
        while at < all.len() {
            let len = all[at] as usize | (all[at + 1] as usize) << 8;
            let body = &all[at + 2..at + 2 + len];
            assert!(body.iter().all(|&x| x == body[0]), "replies interleaved");
            at += 2 + len;
            seen += 1;
        }
        assert_eq!(seen, threads * per_thread);
    }

    #[test]
    fn a_failed_write_drops_later_replies() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let sink = ReplySink::<Vec<u8>>::new(Box::new(a));
        sink.send(vec![1; 10]);
        assert!(sink.is_broken());
        sink.send(vec![2; 10]);
        assert!(sink.state().queued.is_empty());
    }

    /// Bytes the peer end has received so far, without waiting.
    fn arrived(b: &mut UnixStream) -> Vec<u8> {
        b.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match b.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    #[test]
    fn a_reply_waits_for_the_request_being_served_next_to_it() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let sink = ReplySink::<Vec<u8>>::new(Box::new(a));
        let (first, second) = (sink.busy(), sink.busy());
        first.send(vec![1; 3]);
        assert!(
            arrived(&mut b).is_empty(),
            "sent before the other request was answered"
        );
        second.send(vec![2; 3]);
        assert_eq!(arrived(&mut b), [1, 1, 1, 2, 2, 2]);
        // A request answered alone goes out at once.
        sink.busy().send(vec![3]);
        assert_eq!(arrived(&mut b), [3]);
        sink.send(vec![4]);
        assert_eq!(arrived(&mut b), [4]);
    }

    #[test]
    fn an_unanswered_request_stops_holding_replies_back() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let sink = ReplySink::<Vec<u8>>::new(Box::new(a));
        let (first, second) = (sink.busy(), sink.busy());
        first.send(vec![1]);
        assert!(arrived(&mut b).is_empty());
        drop(second);
        assert_eq!(arrived(&mut b), [1]);
        assert_eq!(sink.state().busy, 0);
    }

    #[test]
    fn replies_wait_for_a_slow_request_only_up_to_the_bound() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let sink = ReplySink::<Vec<u8>>::new(Box::new(a));
        let slow = sink.busy();
        for i in 0..MAX_DEFERRED_REPLIES - 1 {
            sink.busy().send(vec![i as u8]);
        }
        assert!(arrived(&mut b).is_empty());
        sink.busy().send(vec![99]);
        assert_eq!(arrived(&mut b).len(), MAX_DEFERRED_REPLIES);
        slow.send(vec![100]);
        assert_eq!(arrived(&mut b), [100]);
    }
}
