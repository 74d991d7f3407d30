//! Reads of one copy's units ahead of their verification, so that a device
//! has several scrub reads in flight (direct reads get no kernel
//! read-ahead, and verifying a unit costs CPU the device could overlap).
//!
//! Read-ahead never crosses a view: `scan` restarts it whenever it takes a
//! new view, so every unit it verifies was read after the view it is
//! verified against was taken (what pinning guarantees is still in place).

use std::sync::mpsc::{sync_channel, Receiver};

use crate::chunk::volumes::Device;
use crate::util::aligned::AlignedBuf;
use crate::util::sync::Arc;

/// Reader threads per device: up to this many reads in flight, and as many
/// more unit buffers waiting to be verified. One, by measurement
/// (docs/BENCHMARKS.md, "Scrub read-ahead"): it halves a cached scrub's
/// time; three were slower than one.
pub(super) const READ_AHEAD_THREADS: usize = 1;

/// One unit as read: its physical offset and length, the bytes, and
/// whether the read succeeded.
pub(super) struct UnitRead {
    pub physical: u64,
    pub buf: AlignedBuf,
    pub ok: bool,
}

/// The units `(physical, len)` still to read, in order.
pub(super) struct ReadAhead {
    dev: Arc<Device>,
    uncached: bool,
    /// Inline mode: what is left to read, read when asked.
    pending: std::collections::VecDeque<(u64, u64)>,
    /// Threaded mode: reader `i` reads units `i`, `i + n`, …; taken in turn.
    readers: Vec<Receiver<UnitRead>>,
    next: usize,
}

fn read_unit(dev: &Device, uncached: bool, (physical, len): (u64, u64)) -> UnitRead {
    let mut buf = AlignedBuf::default();
    buf.resize(len as usize);
    let r = if uncached {
        dev.dev.read_uncached(&mut buf, physical)
    } else {
        dev.dev.read_at(&mut buf, physical)
    };
    UnitRead {
        physical,
        buf,
        ok: r.is_ok(),
    }
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
            dev: dev.clone(),
            uncached,
            pending: Default::default(),
            readers: Vec::new(),
            next: 0,
        };
        if !threaded {
            ra.pending = units.into();
            return ra;
        }
        let n = READ_AHEAD_THREADS.min(units.len());
        for i in 0..n {
            let (tx, rx) = sync_channel(1);
            let mine: Vec<(u64, u64)> = units.iter().copied().skip(i).step_by(n).collect();
            let dev = dev.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("scrub-read-{}", dev.devid))
                .spawn_scoped(scope, move || {
                    for u in mine {
                        // The scan stopped or moved on: stop reading.
                        if tx.send(read_unit(&dev, uncached, u)).is_err() {
                            return;
                        }
                    }
                });
            if spawned.is_err() {
                // No thread: read everything inline instead.
                ra.readers.clear();
                ra.pending = units.into();
                return ra;
            }
            ra.readers.push(rx);
        }
        ra
    }

    /// The next unit, which must be at `physical`.
    pub(super) fn next(&mut self, physical: u64) -> UnitRead {
        let r = if self.readers.is_empty() {
            let u = self.pending.pop_front().expect("a unit left to read");
            read_unit(&self.dev, self.uncached, u)
        } else {
            let i = self.next % self.readers.len();
            self.next += 1;
            self.readers[i]
                .recv()
                .expect("a reader thread delivers every unit")
        };
        assert_eq!(r.physical, physical, "read-ahead out of step with the scan");
        r
    }
}
