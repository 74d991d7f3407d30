//! A fault-injecting in-memory device for tests: it remembers the writes since
//! the last flush so a crash can drop all of them, a random subset, or tear
//! one; it can fail reads or writes on chosen ranges and flip bits.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::device::BlockDevice;
use crate::util::sync::{lock, Arc, Mutex};
use std::sync::atomic::{AtomicI64, Ordering};

/// How a simulated power loss treats writes that were not flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every unflushed write is lost.
    DropAll,
    /// Each unflushed write survives with probability one half.
    DropRandom,
    /// Like DropRandom, and one surviving write is cut at a random sector.
    Torn,
}

struct State {
    /// What survives a crash.
    durable: Vec<u8>,
    /// What reads see.
    current: Vec<u8>,
    /// Writes since the last flush, oldest first.
    pending: Vec<(u64, Vec<u8>)>,
    read_errors: Vec<Range<u64>>,
    write_errors: Vec<Range<u64>>,
    /// Every I/O fails (a vanished device).
    gone: bool,
    /// Writes left before a simulated power cut (shared between devices).
    power: Option<Arc<AtomicI64>>,
    writes_total: u64,
}

/// In-memory device with fault injection.
pub struct FaultyDevice {
    path: PathBuf,
    state: Mutex<State>,
    /// Scrub may read ahead on a helper thread (off unless asked: failpoint
    /// tests want each read at its place in the interleaving).
    reads_ahead: std::sync::atomic::AtomicBool,
}

/// Small deterministic PRNG (xorshift64*), so failures replay from a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, n); n > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn overlaps(ranges: &[Range<u64>], off: u64, len: u64) -> bool {
    ranges.iter().any(|r| off < r.end && r.start < off + len)
}

impl FaultyDevice {
    /// A zero-filled device.
    pub fn new(path: impl Into<PathBuf>, size_bytes: u64) -> FaultyDevice {
        // Two zeroed buffers rather than a clone: zeroed memory is only
        // backed once written, so a large idle device costs little.
        let dev = Self::from_image(path, Vec::new());
        {
            let mut st = lock(&dev.state);
            st.durable = vec![0; size_bytes as usize];
            st.current = vec![0; size_bytes as usize];
        }
        dev
    }

    /// Let scrub read this device ahead of verification, as it does a
    /// file (the stress storm, where interleavings are random anyway).
    pub fn set_reads_ahead(&self, on: bool) {
        self.reads_ahead.store(on, Ordering::Relaxed);
    }

    /// A device whose durable and current content is `image`.
    pub fn from_image(path: impl Into<PathBuf>, image: Vec<u8>) -> FaultyDevice {
        FaultyDevice {
            path: path.into(),
            state: Mutex::new(State {
                durable: image.clone(),
                current: image,
                pending: Vec::new(),
                read_errors: Vec::new(),
                write_errors: Vec::new(),
                gone: false,
                power: None,
                writes_total: 0,
            }),
            reads_ahead: Default::default(),
        }
    }

    /// The image a power loss now would leave behind.
    pub fn crash_image(&self, mode: CrashMode, rng: &mut Rng) -> Vec<u8> {
        let st = lock(&self.state);
        let mut img = st.durable.clone();
        if mode == CrashMode::DropAll {
            return img;
        }
        let survivors: Vec<usize> = (0..st.pending.len())
            .filter(|_| rng.below(2) == 0)
            .collect();
        let torn = if mode == CrashMode::Torn && !survivors.is_empty() {
            Some(survivors[rng.below(survivors.len() as u64) as usize])
        } else {
            None
        };
        for i in survivors {
            let (off, data) = &st.pending[i];
            let mut len = data.len();
            if Some(i) == torn {
                let sectors = len.div_ceil(4096) as u64;
                len = (rng.below(sectors) as usize * 4096).min(len);
            }
            img[*off as usize..*off as usize + len].copy_from_slice(&data[..len]);
        }
        img
    }

    /// Current content (what reads see).
    pub fn image(&self) -> Vec<u8> {
        lock(&self.state).current.clone()
    }

    /// Writes not yet flushed.
    pub fn pending_writes(&self) -> usize {
        lock(&self.state).pending.len()
    }

    /// Writes since creation.
    pub fn writes_total(&self) -> u64 {
        lock(&self.state).writes_total
    }

    /// Reads overlapping `r` fail with EIO.
    pub fn fail_reads(&self, r: Range<u64>) {
        lock(&self.state).read_errors.push(r);
    }

    /// Writes overlapping `r` fail with EIO.
    pub fn fail_writes(&self, r: Range<u64>) {
        lock(&self.state).write_errors.push(r);
    }

    /// Remove every injected error.
    pub fn heal(&self) {
        let mut st = lock(&self.state);
        st.read_errors.clear();
        st.write_errors.clear();
        st.gone = false;
    }

    /// Share a write budget: once it runs out, every write and flush fails,
    /// as if power were cut at that moment.
    pub fn set_power_budget(&self, budget: Arc<AtomicI64>) {
        lock(&self.state).power = Some(budget);
    }

    /// Every I/O fails from now on.
    pub fn vanish(&self) {
        lock(&self.state).gone = true;
    }

    /// Flip one bit in stored (durable and current) content: bit rot.
    pub fn flip_bit(&self, offset: u64, bit: u8) {
        let mut st = lock(&self.state);
        st.current[offset as usize] ^= 1 << (bit % 8);
        st.durable[offset as usize] ^= 1 << (bit % 8);
    }

    /// Overwrite stored content directly, bypassing the pending list.
    pub fn corrupt(&self, offset: u64, data: &[u8]) {
        let mut st = lock(&self.state);
        let o = offset as usize;
        st.current[o..o + data.len()].copy_from_slice(data);
        st.durable[o..o + data.len()].copy_from_slice(data);
    }
}

fn check_range(len: usize, off: u64, n: usize) -> io::Result<usize> {
    let end = off
        .checked_add(n as u64)
        .filter(|&e| e <= len as u64)
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "past end of device"))?;
    Ok(end as usize)
}

fn write_locked(st: &mut State, buf: &[u8], offset: u64) -> io::Result<()> {
    let end = check_range(st.current.len(), offset, buf.len())?;
    if st.gone || overlaps(&st.write_errors, offset, buf.len() as u64) {
        return Err(io::Error::from_raw_os_error(5));
    }
    if let Some(p) = &st.power {
        if p.fetch_sub(1, Ordering::AcqRel) <= 0 {
            return Err(io::Error::from_raw_os_error(5));
        }
    }
    st.current[offset as usize..end].copy_from_slice(buf);
    st.pending.push((offset, buf.to_vec()));
    st.writes_total += 1;
    Ok(())
}

impl BlockDevice for FaultyDevice {
    fn path(&self) -> &Path {
        &self.path
    }
    fn size_bytes(&self) -> u64 {
        lock(&self.state).current.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = lock(&self.state);
        let end = check_range(st.current.len(), offset, buf.len())?;
        if st.gone || overlaps(&st.read_errors, offset, buf.len() as u64) {
            return Err(io::Error::from_raw_os_error(5));
        }
        buf.copy_from_slice(&st.current[offset as usize..end]);
        Ok(())
    }
    fn reads_ahead(&self) -> bool {
        self.reads_ahead.load(Ordering::Relaxed)
    }
    /// Serial while a power-cut budget is armed: the budget is shared
    /// across devices, and which copy meets the cut must replay from a seed.
    fn parallel_writes(&self) -> bool {
        lock(&self.state).power.is_none()
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        write_locked(&mut lock(&self.state), buf, offset)
    }
    /// Durable at once, and only these bytes: what O_DSYNC promises. An
    /// older unflushed write of the same bytes takes them too, so a later
    /// flush cannot bring the old bytes back.
    fn write_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = lock(&self.state);
        let st = &mut *st;
        write_locked(st, buf, offset)?;
        st.pending.pop();
        let (a, b) = (offset, offset + buf.len() as u64);
        for (off, data) in st.pending.iter_mut() {
            let (s, e) = ((*off).max(a), (*off + data.len() as u64).min(b));
            if s < e {
                data[(s - *off) as usize..(e - *off) as usize]
                    .copy_from_slice(&buf[(s - a) as usize..(e - a) as usize]);
            }
        }
        st.durable[a as usize..b as usize].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let mut st = lock(&self.state);
        if st.gone
            || st
                .power
                .as_ref()
                .is_some_and(|p| p.load(Ordering::Acquire) <= 0)
        {
            return Err(io::Error::from_raw_os_error(5));
        }
        let pending = std::mem::take(&mut st.pending);
        for (off, data) in pending {
            let o = off as usize;
            st.durable[o..o + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_drops_unflushed() {
        let d = FaultyDevice::new("/mem/a", 1 << 20);
        d.write_at(&[1; 4096], 0).unwrap();
        d.flush().unwrap();
        d.write_at(&[2; 4096], 0).unwrap();
        let mut r = Rng::new(1);
        let img = d.crash_image(CrashMode::DropAll, &mut r);
        assert_eq!(img[0], 1);
        let mut b = [0u8; 1];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(b[0], 2);
        d.fail_reads(0..10);
        assert!(d.read_at(&mut b, 5).is_err());
        assert!(d.read_at(&mut b, 4096).is_ok());
    }
}
