//! Reads of one copy's units ahead of their verification, on a thread of
//! their own (verifying a unit costs CPU the device could overlap),
//! leaving the host page cache as scrub found it: a unit no client had
//! cached is read through the cache, with the kernel's read-ahead, and
//! dropped after ("drop-behind").
//!
//! Read-ahead never crosses a view: `scan` restarts it whenever it takes a
//! new view, so every unit it verifies was read after the view it is
//! verified against was taken (what pinning guarantees is still in place).

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use crate::chunk::volumes::Device;
use crate::util::aligned::AlignedBuf;
use crate::util::sync::Arc;

/// Reader threads per device for cached reads: one, whose sequential
/// stream the kernel reads ahead of, and whose spans of the device
/// ([`UnitReader`]) must be contiguous to be dropped behind it.
const READ_AHEAD_THREADS: usize = 1;

/// Reader threads per device for `--uncached` (O_DIRECT) reads, which the
/// kernel does not read ahead of: up to this many reads in flight. Two, by
/// measurement (docs/BENCHMARKS.md, "Scrub with the kernel's read-ahead"):
/// medians 3.52 s against 4.24 s for one; four were no faster.
const UNCACHED_READ_THREADS: usize = 2;

/// How far ahead of the unit it reads a reader asks which pages the host
/// page cache holds. The kernel reads ahead of a sequential reader by up to
/// two windows of the device's `read_ahead_kb` (128 KiB by default; with
/// the 8 MiB of the VM measured, pages up to 14 MiB ahead were cached), so
/// an answer asked this far ahead is about the clients' pages, not scrub's.
/// Where read-ahead reaches further, scrub takes some of its own pages for
/// a client's: it reads those units around the cache and leaves them
/// cached, a cost and no error.
const LOOKAHEAD_BYTES: u64 = 64 << 20;

/// The largest folio the host page cache may hold a file's pages in (2 MiB
/// on x86-64), with margin. Dropping a range leaves every folio that
/// reaches outside it, so each drop reaches back this far into the range
/// dropped before (measured: dropping exactly each 1 MiB unit dropped
/// nothing on Linux 6.18, whose read-ahead caches 2 MiB folios).
const FOLIO_MAX_BYTES: u64 = 4 << 20;

/// Gaps between units are asked about in pieces of this size.
const GAP_PIECE_BYTES: u64 = 4 << 20;

/// A range of the device as a reader sees it: a unit to read, or a gap
/// between units (or after the last one) that kernel read-ahead may cache.
#[derive(Debug, Clone, Copy)]
struct Span {
    physical: u64,
    len: u64,
    /// Whether a unit (read and verified) or a gap (only dropped).
    unit: bool,
    /// The page cache held some of it when asked (None: cannot say).
    cached: Option<bool>,
}

impl Span {
    /// Pages of it only this reader brought in, to drop.
    fn ours(&self) -> bool {
        self.cached == Some(false)
    }
}

/// One unit as read: its physical offset and length, the bytes, and
/// whether the read succeeded.
pub(super) struct UnitRead {
    pub physical: u64,
    pub buf: AlignedBuf,
    pub ok: bool,
}

/// Reads a list of units in order. Every unit's page-cache residency, and
/// that of the gaps read-ahead may fill, is asked once, [`LOOKAHEAD_BYTES`]
/// before it is read, so the pages scrub's own read-ahead caches are never
/// mistaken for a client's.
struct UnitReader {
    dev: Arc<Device>,
    uncached: bool,
    /// Units not yet asked about.
    todo: VecDeque<(u64, u64)>,
    /// Spans asked about, not yet read (units) or dropped (gaps).
    window: VecDeque<Span>,
    /// End of the last span asked about; None before the first.
    asked_end: Option<u64>,
    /// The contiguous range of spans passed (units read, gaps) whose pages
    /// only this reader brought in and that is not yet dropped.
    run: Option<(u64, u64)>,
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
            asked_end: None,
            run: None,
            spares,
        };
        (r, tx)
    }

    /// Ask about spans until [`LOOKAHEAD_BYTES`] past the next unit are
    /// known, or everything is.
    fn ask_ahead(&mut self) {
        loop {
            let Some(front) = self
                .window
                .front()
                .map(|s| s.physical)
                .or_else(|| self.todo.front().map(|u| u.0))
            else {
                return;
            };
            let end = self.asked_end.unwrap_or(front);
            if end >= front + LOOKAHEAD_BYTES {
                return;
            }
            let Some((physical, len)) = self.todo.pop_front() else {
                // After the last unit, read-ahead runs on past it.
                let tail = LOOKAHEAD_BYTES.min(self.dev.dev.size_bytes().saturating_sub(end));
                self.ask_gap(end, tail);
                self.asked_end = Some(end + LOOKAHEAD_BYTES);
                return;
            };
            assert!(physical >= end, "units out of order at {physical:#x}");
            if physical > end && self.asked_end.is_some() {
                self.ask_gap(end, (physical - end).min(LOOKAHEAD_BYTES));
            }
            self.ask(physical, len, true);
            self.asked_end = Some(physical + len);
        }
    }

    /// A gap is asked about in pieces, so one cached page of a client's
    /// keeps scrub's read-ahead cached around it, not in the whole gap.
    fn ask_gap(&mut self, physical: u64, len: u64) {
        let end = physical + len;
        let mut at = physical;
        while at < end {
            let n = GAP_PIECE_BYTES.min(end - at);
            self.ask(at, n, false);
            at += n;
        }
    }

    fn ask(&mut self, physical: u64, len: u64, unit: bool) {
        debug_assert!(len > 0, "an empty span at {physical:#x}");
        let cached = self.dev.dev.page_cache_holds(physical, len as usize);
        self.window.push_back(Span {
            physical,
            len,
            unit,
            cached,
        });
    }

    fn next(&mut self) -> Option<UnitRead> {
        if self.uncached {
            let (physical, len) = self.todo.pop_front()?;
            return Some(self.read(physical, len, None));
        }
        self.ask_ahead();
        loop {
            let s = self.window.pop_front()?;
            self.pass(&s);
            if !s.unit {
                // Read-ahead may still be filling it: dropped with the
                // next unit.
                self.ask_ahead();
                continue;
            }
            let r = self.read(s.physical, s.len, s.cached);
            if let Some((start, end)) = self.run {
                self.dev.dev.drop_cached(start, (end - start) as usize);
                // A folio straddling `end` is dropped next time.
                self.run = Some((start.max(end.saturating_sub(FOLIO_MAX_BYTES)), end));
            }
            return Some(r);
        }
    }

    /// Add `s` to the run of spans to drop, or end the run: a range with a
    /// client's pages in it, or a jump, is not to be dropped across.
    fn pass(&mut self, s: &Span) {
        match self.run {
            Some((start, end)) if s.ours() && end == s.physical => {
                self.run = Some((start, s.physical + s.len));
            }
            _ => {
                if let Some((start, end)) = self.run.take() {
                    self.dev.dev.drop_cached(start, (end - start) as usize);
                }
                if s.ours() {
                    self.run = Some((s.physical, s.physical + s.len));
                }
            }
        }
    }

    fn read(&self, physical: u64, len: u64, cached: Option<bool>) -> UnitRead {
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
    /// What read-ahead cached of the units and gaps never read (the scan
    /// stopped, took a new view or reached the end) leaves the cache too;
    /// pages still being read in stay (the kernel keeps locked pages).
    fn drop(&mut self) {
        while let Some(s) = self.window.pop_front() {
            self.pass(&s);
        }
        if let Some((start, end)) = self.run.take() {
            self.dev.dev.drop_cached(start, (end - start) as usize);
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
        let threads = if uncached {
            UNCACHED_READ_THREADS
        } else {
            READ_AHEAD_THREADS
        };
        let n = threads.min(units.len());
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

#[cfg(test)]
mod tests {
    //! The reader against a model of the host page cache: the kernel reads
    //! 14 MiB ahead of every buffered read in folios of 2 MiB, a drop takes
    //! only the folios wholly inside its range, and a client's pages are
    //! single 4 KiB folios. Whatever the layout, scrub must leave the
    //! clients' pages and take its own away.
    use super::*;
    use crate::device::BlockDevice;
    use crate::util::sync::{lock, Mutex};
    use std::collections::BTreeMap;
    use std::io;
    use std::path::{Path, PathBuf};

    const MIB: u64 = 1 << 20;
    const PAGE: u64 = 4096;
    const FOLIO: u64 = 2 * MIB;
    const READ_AHEAD: u64 = 14 * MIB;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Owner {
        Client,
        Scrub,
    }

    /// Cached folios: start -> (length, owner).
    struct CacheModel {
        path: PathBuf,
        size: u64,
        folios: Mutex<BTreeMap<u64, (u64, Owner)>>,
        /// Every unit read: offset and the residency it was read with.
        reads: Mutex<Vec<(u64, Option<bool>)>>,
    }

    impl CacheModel {
        fn holds(&self, offset: u64, len: u64) -> bool {
            let f = lock(&self.folios);
            f.range(..offset + len)
                .next_back()
                .is_some_and(|(&s, &(l, _))| s + l > offset)
                || f.range(offset..offset + len).next().is_some()
        }
        /// Cache every page of `[from, to)` not cached, as the kernel
        /// does: in naturally aligned folios of up to 2 MiB where no page
        /// of one is cached, else page by page.
        fn read_ahead(&self, from: u64, to: u64) {
            let to = to.min(self.size);
            let mut at = from;
            while at < to {
                let size = (1u64 << at.trailing_zeros().min(63)).clamp(PAGE, FOLIO);
                if !self.holds(at, size) {
                    lock(&self.folios).insert(at, (size, Owner::Scrub));
                } else {
                    for p in (at..at + size).step_by(PAGE as usize) {
                        if !self.holds(p, PAGE) {
                            lock(&self.folios).insert(p, (PAGE, Owner::Scrub));
                        }
                    }
                }
                at += size;
            }
        }
        fn owned(&self, owner: Owner) -> Vec<u64> {
            let f = lock(&self.folios);
            f.iter()
                .filter(|(_, &(_, o))| o == owner)
                .map(|(&s, _)| s)
                .collect()
        }
    }

    impl BlockDevice for CacheModel {
        fn path(&self) -> &Path {
            &self.path
        }
        fn size_bytes(&self) -> u64 {
            self.size
        }
        fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn page_cache_holds(&self, offset: u64, len: usize) -> Option<bool> {
            Some(self.holds(offset, len as u64))
        }
        fn drop_cached(&self, offset: u64, len: usize) {
            let end = offset + len as u64;
            let mut f = lock(&self.folios);
            let inside: Vec<u64> = f
                .range(offset..end)
                .filter(|(&s, &(l, _))| s + l <= end)
                .map(|(&s, _)| s)
                .collect();
            for s in inside {
                f.remove(&s);
            }
        }
        fn read_drop_behind(
            &self,
            buf: &mut [u8],
            offset: u64,
            cached: Option<bool>,
        ) -> io::Result<()> {
            lock(&self.reads).push((offset, cached));
            if cached == Some(false) {
                self.read_ahead(offset, offset + buf.len() as u64 + READ_AHEAD);
            }
            self.read_at(buf, offset)
        }
        fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A small deterministic generator (xorshift64).
    fn next(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// Units of 1 MiB in a few runs with gaps of up to 100 MiB, and client
    /// pages here and there (none when `clients` is 0).
    fn layout(seed: u64, clients: usize) -> (Vec<(u64, u64)>, Vec<u64>) {
        let mut x = seed;
        let mut units = Vec::new();
        let mut at = (next(&mut x) % 8) * MIB;
        for _ in 0..4 {
            for _ in 0..(1 + next(&mut x) % 40) {
                units.push((at, MIB));
                at += MIB;
            }
            at += (next(&mut x) % 100) * MIB;
        }
        let span = at + 80 * MIB;
        let pages = (0..clients)
            .map(|_| next(&mut x) % span / PAGE * PAGE)
            .collect();
        (units, pages)
    }

    fn scrub_reads(units: &[(u64, u64)], client_pages: &[u64]) -> Arc<CacheModel> {
        let (last, _) = *units.last().unwrap();
        let model = Arc::new(CacheModel {
            path: "model".into(),
            size: last + 200 * MIB,
            folios: Mutex::new(
                client_pages
                    .iter()
                    .map(|&p| (p, (PAGE, Owner::Client)))
                    .collect(),
            ),
            reads: Mutex::new(Vec::new()),
        });
        let dev = Arc::new(Device::new(1, [0; 16], model.clone()));
        let (mut reader, _spares) = UnitReader::new(dev, false, units.to_vec());
        let mut seen = Vec::new();
        while let Some(r) = reader.next() {
            assert!(r.ok);
            seen.push((r.physical, r.buf.len() as u64));
        }
        drop(reader);
        assert_eq!(seen, units, "every unit read once, in order");
        model
    }

    #[test]
    fn without_clients_nothing_stays_cached() {
        for seed in 1..40 {
            let (units, _) = layout(seed, 0);
            let m = scrub_reads(&units, &[]);
            assert_eq!(m.owned(Owner::Scrub), Vec::<u64>::new(), "seed {seed}");
            assert!(
                lock(&m.reads).iter().all(|&(_, c)| c == Some(false)),
                "seed {seed}: scrub took its own read-ahead for a client's pages"
            );
        }
    }

    #[test]
    fn client_pages_stay_and_scrub_pages_go() {
        for seed in 1..60 {
            let (units, pages) = layout(seed, 6);
            let m = scrub_reads(&units, &pages);
            let mut left = m.owned(Owner::Client);
            left.sort_unstable();
            let mut want = pages.clone();
            want.sort_unstable();
            want.dedup();
            assert_eq!(left, want, "seed {seed}: a client's page was dropped");
            // Scrub leaves its pages only where it must not drop across a
            // client's page: in the gap piece holding one, or in a folio
            // reaching into that piece.
            for s in m.owned(Owner::Scrub) {
                let reach = GAP_PIECE_BYTES + FOLIO;
                let near = pages.iter().any(|&p| s + reach > p && s < p + reach);
                assert!(
                    near,
                    "seed {seed}: scrub left {s:#x} cached, far from any client page"
                );
            }
            // A unit is read around the cache only if a client had it.
            for &(off, c) in lock(&m.reads).iter() {
                let client = pages.iter().any(|&p| p >= off && p < off + MIB);
                assert_eq!(c, Some(client), "seed {seed}: unit {off:#x}");
            }
        }
    }
}
