//! Replies on their way to the client.
//!
//! Each worker used to write its own reply under one lock: a system call,
//! and a wake-up of the client, per reply. Now a worker queues its reply,
//! and the one that finds nobody writing becomes the writer: it sends
//! everything queued in one vectored write, again and again until the
//! queue is empty. Under load one write carries several replies, and the
//! client wakes once for them; alone, a reply goes out at once as before.

use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use super::stream::Stream;

/// Replies queued per connection, at most; a worker with one more waits
/// for the writer. Also the most one vectored write carries.
pub const MAX_QUEUED_REPLIES: usize = 64;

struct State<T> {
    queued: Vec<T>,
    /// A worker is writing: it sends what is queued before it stops.
    writing: bool,
    /// Workers waiting for room in the queue.
    room_waiters: usize,
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
            }),
            room: Condvar::new(),
            broken: AtomicBool::new(false),
        }
    }

    fn state(&self) -> MutexGuard<'_, State<T>> {
        // The queue stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `reply`, now or with the writer's next batch. Whatever it
    /// holds (a buffer, a budget permit) is released once it was written.
    pub fn send(&self, reply: T) {
        if self.is_broken() {
            return;
        }
        let mut st = self.state();
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
        if st.writing {
            return;
        }
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
                        sink.send(r);
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
}
