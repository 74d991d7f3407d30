//! The reference model the stress harness checks every byte against: what
//! each volume must read back. Regions of the model double as locks, so a
//! client operation and its model update happen as one step and readers
//! never see a torn pair.

use crate::util::sync::{lock, Mutex, MutexGuard};

/// Bytes per model region (and lock).
pub const REGION_BYTES: u64 = 1 << 20;
/// Sector size the engine frees at (discard frees whole sectors only).
const S: u64 = 4096;

/// One volume's expected content.
pub struct VolModel {
    pub size_bytes: u64,
    regions: Vec<Mutex<Vec<u8>>>,
}

/// Regions of [off, off+len) held locked, in order.
pub struct Held<'a> {
    first: u64,
    guards: Vec<MutexGuard<'a, Vec<u8>>>,
}

impl VolModel {
    pub fn new(size_bytes: u64) -> VolModel {
        let n = size_bytes.div_ceil(REGION_BYTES);
        VolModel {
            size_bytes,
            regions: (0..n)
                .map(|i| {
                    let len = REGION_BYTES.min(size_bytes - i * REGION_BYTES);
                    Mutex::new(vec![0u8; len as usize])
                })
                .collect(),
        }
    }

    /// Lock the regions covering [off, off+len) (len > 0), lowest first so
    /// that two operations never wait on each other in a cycle.
    pub fn hold(&self, off: u64, len: u64) -> Held<'_> {
        assert!(len > 0 && off + len <= self.size_bytes, "range {off}+{len}");
        let a = off / REGION_BYTES;
        let b = (off + len - 1) / REGION_BYTES;
        Held {
            first: a,
            guards: (a..=b).map(|i| lock(&self.regions[i as usize])).collect(),
        }
    }
}

impl Held<'_> {
    fn each(&mut self, off: u64, len: u64, mut f: impl FnMut(&mut [u8], usize)) {
        let mut pos = off;
        while pos < off + len {
            let r = pos / REGION_BYTES;
            let g = &mut self.guards[(r - self.first) as usize];
            let within = (pos % REGION_BYTES) as usize;
            let n = ((off + len - pos) as usize).min(g.len() - within);
            f(&mut g[within..within + n], (pos - off) as usize);
            pos += n as u64;
        }
    }

    /// The model now holds `data` at `off`.
    pub fn write(&mut self, off: u64, data: &[u8]) {
        self.each(off, data.len() as u64, |dst, at| {
            dst.copy_from_slice(&data[at..at + dst.len()])
        });
    }

    /// Whole sectors inside [off, off+len) read as zeroes (discard).
    pub fn discard(&mut self, off: u64, len: u64) {
        let a = off.div_ceil(S) * S;
        let b = (off + len) / S * S;
        if b > a {
            self.zero(a, b - a);
        }
    }

    /// [off, off+len) reads as zeroes (write-zeroes).
    pub fn zero(&mut self, off: u64, len: u64) {
        self.each(off, len, |dst, _| dst.fill(0));
    }

    /// The expected bytes at `off`.
    pub fn read(&mut self, off: u64, out: &mut [u8]) {
        self.each(off, out.len() as u64, |src, at| {
            out[at..at + src.len()].copy_from_slice(src)
        });
    }
}

/// First differing byte of two equal-length slices.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_spans_regions() {
        let m = VolModel::new(3 * REGION_BYTES + 4096);
        let data: Vec<u8> = (0..REGION_BYTES + 10).map(|i| i as u8).collect();
        let off = REGION_BYTES - 5;
        m.hold(off, data.len() as u64).write(off, &data);
        let mut back = vec![0u8; data.len()];
        m.hold(off, data.len() as u64).read(off, &mut back);
        assert_eq!(back, data);
        m.hold(off, 8192).discard(off, 8192);
        let mut z = vec![1u8; 8192];
        m.hold(off, 8192).read(off, &mut z);
        // Only the whole sector inside the range is zeroed.
        assert!(z[5..5 + 4096].iter().all(|&b| b == 0));
        assert_eq!(&z[..5], &data[..5]);
        assert_eq!(&z[5 + 4096..], &data[5 + 4096..8192]);
        assert_eq!(first_diff(&[1, 2, 3], &[1, 2, 4]), Some(2));
    }
}
