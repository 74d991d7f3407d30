//! Reads of one copy's units ahead of their verification, so that a device
//! has several scrub reads in flight (direct reads get no kernel
//! read-ahead, and verifying a unit costs CPU the device could overlap),
//! leaving the host page cache as scrub found it.
//!
//! Read-ahead never crosses a view: `scan` restarts it whenever it takes a
//! new view, so every unit it verifies was read after the view it is
//! verified against was taken (what pinning guarantees is still in place).

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use crate::chunk::volumes::Device;
use crate::util::aligned::AlignedBuf;
use crate::util::sync::Arc;

/// Reader threads per device: up to this many reads in flight, and as many
/// more unit buffers waiting to be verified. One, by measurement
/// (docs/BENCHMARKS.md, "Scrub read-ahead"): it halves a cached scrub's
/// time; three were slower than one.
pub(super) const READ_AHEAD_THREADS: usize = 1;

/// Units a reader asks the kernel to read ahead of the one it reads
/// (`prefetch`), on devices with a page cache; each is dropped from the
/// cache once read. Scrub's own descriptor has the kernel's read-ahead
/// off, so without this each unit would wait for the device in turn.
const PREFETCH_UNITS: usize = 8;

/// One unit as read: its physical offset and length, the bytes, and
/// whether the read succeeded.
pub(super) struct UnitRead {
    pub physical: u64,
    pub buf: AlignedBuf,
    pub ok: bool,
}

/// Reads a list of units in order. Each unit's page-cache residency is
/// asked once, before any prefetch of it, so the prefetches and reads of
/// scrub are never mistaken for a client's cached pages.
struct UnitReader {
    dev: Arc<Device>,
    uncached: bool,
    /// Units not yet asked about.
    todo: VecDeque<(u64, u64)>,
    /// Units asked about (and prefetched when not cached), not yet read,
    /// with the answer; at most `PREFETCH_UNITS + 1`.
    window: VecDeque<((u64, u64), Option<bool>)>,
    /// Buffers the scan is done with, reused before allocating.
    spares: Receiver<AlignedBuf>,
}

/// Buffers in flight back to a reader, at most; more are freed.
const SPARE_BUFS: usize = 2;

impl UnitReader {
    /// The reader and the sender its spare buffers come back through.
    fn new(
        dev: Arc<Device>,
        uncached: bool,
        units: Vec<(u64, u64)>,
    ) -> (UnitReader, SyncSender<AlignedBuf>) {
        let (tx, spares) = sync_channel(SPARE_BUFS);
        let r = UnitReader {
            dev,
            uncached,
            todo: units.into(),
            window: VecDeque::new(),
            spares,
        };
        (r, tx)
    }

    fn next(&mut self) -> Option<UnitRead> {
        if self.uncached {
            let u = self.todo.pop_front()?;
            return Some(self.read(u, None));
        }
        while self.window.len() <= PREFETCH_UNITS {
            let Some((physical, len)) = self.todo.pop_front() else {
                break;
            };
            let cached = self.dev.dev.page_cache_holds(physical, len as usize);
            if cached == Some(false) {
                self.dev.dev.prefetch(physical, len as usize);
            }
            self.window.push_back(((physical, len), cached));
        }
        let (u, cached) = self.window.pop_front()?;
        Some(self.read(u, cached))
    }

    fn read(&self, (physical, len): (u64, u64), cached: Option<bool>) -> UnitRead {
        let mut buf = self.spares.try_recv().unwrap_or_default();
        buf.resize(len as usize);
        let r = if self.uncached {
            self.dev.dev.read_uncached(&mut buf, physical)
        } else {
            self.dev.dev.read_drop_behind(&mut buf, physical, cached)
        };
        UnitRead {
            physical,
            buf,
            ok: r.is_ok(),
        }
    }
}

impl Drop for UnitReader {
    /// Units prefetched and never read (the scan stopped or took a new
    /// view) leave the cache too.
    fn drop(&mut self) {
        for &((physical, len), cached) in &self.window {
            if cached == Some(false) {
                self.dev.dev.drop_cached(physical, len as usize);
            }
        }
    }
}

/// The units `(physical, len)` still to read, in order.
pub(super) struct ReadAhead {
    /// Inline mode: the reader, read when asked.
    inline: Option<UnitReader>,
    /// Threaded mode: reader `i` reads units `i`, `i + n`, …; taken in turn.
    readers: Vec<Receiver<UnitRead>>,
    /// Where reader `i`'s spent buffers go back.
    spares: Vec<SyncSender<AlignedBuf>>,
    next: usize,
}

impl ReadAhead {
    /// Start reading `units` on `scope`'s threads when the device gains from
    /// it and no simulation is running; otherwise each is read when asked.
    pub(super) fn start<'s>(
        scope: &'s std::thread::Scope<'s, '_>,
        dev: Arc<Device>,
        uncached: bool,
        units: Vec<(u64, u64)>,
    ) -> ReadAhead {
        let threaded = dev.dev.reads_ahead() && !crate::util::sched::in_sim() && units.len() > 1;
        let mut ra = ReadAhead {
            inline: None,
            readers: Vec::new(),
            spares: Vec::new(),
            next: 0,
        };
        if !threaded {
            let (reader, spares) = UnitReader::new(dev, uncached, units);
            ra.inline = Some(reader);
            ra.spares.push(spares);
            return ra;
        }
        let n = READ_AHEAD_THREADS.min(units.len());
        for i in 0..n {
            let (tx, rx) = sync_channel(1);
            let mine: Vec<(u64, u64)> = units.iter().copied().skip(i).step_by(n).collect();
            let (mut reader, spares) = UnitReader::new(dev.clone(), uncached, mine);
            let spawned = std::thread::Builder::new()
                .name(format!("scrub-read-{}", dev.devid))
                .spawn_scoped(scope, move || {
                    while let Some(r) = reader.next() {
                        // The scan stopped or moved on: stop reading.
                        if tx.send(r).is_err() {
                            return;
                        }
                    }
                });
            if spawned.is_err() {
                // No thread: read everything inline instead.
                let (reader, spares) = UnitReader::new(dev, uncached, units);
                ra.readers.clear();
                ra.inline = Some(reader);
                ra.spares = vec![spares];
                return ra;
            }
            ra.readers.push(rx);
            ra.spares.push(spares);
        }
        ra
    }

    /// A buffer the scan is done with, for the reader of the unit taken
    /// last (dropped when it has enough, or has stopped).
    pub(super) fn give_back(&self, buf: AlignedBuf) {
        let i = self.next.saturating_sub(1) % self.spares.len();
        let _ = self.spares[i].try_send(buf);
    }

    /// The next unit, which must be at `physical`.
    pub(super) fn next(&mut self, physical: u64) -> UnitRead {
        let r = match &mut self.inline {
            Some(reader) => reader.next().expect("a unit left to read"),
            None => {
                let i = self.next % self.readers.len();
                self.next += 1;
                self.readers[i]
                    .recv()
                    .expect("a reader thread delivers every unit")
            }
        };
        assert_eq!(r.physical, physical, "read-ahead out of step with the scan");
        r
    }
}
