//! Checksum algorithms. Every data sector and every tree block carries one.

use crate::util::error::{Error, Result};

/// Bytes reserved for a checksum in headers; shorter sums are zero-padded.
pub const CSUM_MAX_BYTES: usize = 32;

/// A checksum algorithm chosen at mkfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CsumType {
    Crc32c = 0,
    Xxhash64 = 1,
    Sha256 = 2,
    Blake3 = 3,
}

impl CsumType {
    /// Stored size of one checksum.
    pub fn size_bytes(self) -> usize {
        match self {
            CsumType::Crc32c => 4,
            CsumType::Xxhash64 => 8,
            CsumType::Sha256 | CsumType::Blake3 => 32,
        }
    }

    /// Decode from the on-disk byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => CsumType::Crc32c,
            1 => CsumType::Xxhash64,
            2 => CsumType::Sha256,
            3 => CsumType::Blake3,
            _ => return None,
        })
    }

    /// Name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CsumType::Crc32c => "crc32c",
            CsumType::Xxhash64 => "xxhash64",
            CsumType::Sha256 => "sha256",
            CsumType::Blake3 => "blake3",
        }
    }

    /// Parse a command-line name.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "crc32c" => CsumType::Crc32c,
            "xxhash64" | "xxhash" => CsumType::Xxhash64,
            "sha256" => CsumType::Sha256,
            "blake3" => CsumType::Blake3,
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown checksum '{s}' (crc32c, xxhash64, sha256, blake3)"
                )))
            }
        })
    }

    /// Compute the checksum of `data` into `out[..size_bytes()]`.
    pub fn compute_into(self, data: &[u8], out: &mut [u8]) {
        match self {
            CsumType::Crc32c => out[..4].copy_from_slice(&crc32c::crc32c(data).to_le_bytes()),
            CsumType::Xxhash64 => {
                out[..8].copy_from_slice(&xxhash_rust::xxh64::xxh64(data, 0).to_le_bytes())
            }
            CsumType::Sha256 => {
                use sha2::Digest;
                out[..32].copy_from_slice(&sha2::Sha256::digest(data));
            }
            CsumType::Blake3 => out[..32].copy_from_slice(blake3::hash(data).as_bytes()),
        }
    }

    /// Checksum of `data`, zero-padded to [`CSUM_MAX_BYTES`].
    pub fn compute(self, data: &[u8]) -> [u8; CSUM_MAX_BYTES] {
        let mut out = [0u8; CSUM_MAX_BYTES];
        self.compute_into(data, &mut out);
        out
    }

    /// Append one checksum per `sector_bytes` of `data` to `out`.
    pub fn compute_sectors(self, data: &[u8], sector_bytes: usize, out: &mut Vec<u8>) {
        let n = self.size_bytes();
        let mut tmp = [0u8; CSUM_MAX_BYTES];
        for sector in data.chunks(sector_bytes) {
            self.compute_into(sector, &mut tmp);
            out.extend_from_slice(&tmp[..n]);
        }
    }

    /// Whether `data` has the stored checksum `want` (`size_bytes()` long).
    pub fn matches(self, data: &[u8], want: &[u8]) -> bool {
        let mut tmp = [0u8; CSUM_MAX_BYTES];
        self.compute_into(data, &mut tmp);
        tmp[..self.size_bytes()] == *want
    }

    /// Whether sector `i` of `data` (sectors of `sector_bytes`) matches its
    /// checksum in `sums` (one per sector, packed).
    pub fn sector_matches(self, data: &[u8], sums: &[u8], sector_bytes: usize, i: usize) -> bool {
        let n = self.size_bytes();
        self.matches(
            &data[i * sector_bytes..(i + 1) * sector_bytes],
            &sums[i * n..(i + 1) * n],
        )
    }
}

/// Throughput of one algorithm, measured in this process (`chunkvol bench csum`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Speed {
    /// Algorithm name.
    pub algorithm: &'static str,
    /// The crate hashing one buffer of `buffer_bytes` per call.
    pub crate_buffer_bytes_per_s: f64,
    /// The crate called once per sector, as a floor any engine path pays.
    pub crate_sector_bytes_per_s: f64,
    /// The write path: `compute_sectors` appending one sum per sector.
    pub engine_compute_bytes_per_s: f64,
    /// The read and scrub path: every sector checked against stored sums.
    pub engine_verify_bytes_per_s: f64,
}

/// Measure every algorithm on `buffer_bytes` of pseudo-random data, each
/// path for about `per_path` (the fastest of three rounds counts).
pub fn measure_speeds(
    buffer_bytes: usize,
    sector_bytes: usize,
    per_path: std::time::Duration,
) -> Vec<Speed> {
    use std::hint::black_box;
    use std::time::Instant;
    let mut data = vec![0u8; buffer_bytes];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    // Bytes per second of `f`, each call processing `buffer_bytes`.
    let rate = |f: &mut dyn FnMut()| {
        let mut best = 0f64;
        for _ in 0..3 {
            let t = Instant::now();
            let mut calls = 0u64;
            while t.elapsed() < per_path / 3 {
                f();
                calls += 1;
            }
            best = best.max((calls * buffer_bytes as u64) as f64 / t.elapsed().as_secs_f64());
        }
        best
    };
    let all = [
        CsumType::Crc32c,
        CsumType::Xxhash64,
        CsumType::Sha256,
        CsumType::Blake3,
    ];
    all.iter()
        .map(|&t| {
            let raw = |d: &[u8]| -> u64 {
                match t {
                    CsumType::Crc32c => crc32c::crc32c(d) as u64,
                    CsumType::Xxhash64 => xxhash_rust::xxh64::xxh64(d, 0),
                    CsumType::Sha256 => {
                        use sha2::Digest;
                        sha2::Sha256::digest(d)[0] as u64
                    }
                    CsumType::Blake3 => blake3::hash(d).as_bytes()[0] as u64,
                }
            };
            let mut sums = Vec::with_capacity(buffer_bytes / sector_bytes * t.size_bytes());
            t.compute_sectors(&data, sector_bytes, &mut sums);
            let sectors = buffer_bytes / sector_bytes;
            Speed {
                algorithm: t.name(),
                crate_buffer_bytes_per_s: rate(&mut || {
                    black_box(raw(black_box(&data)));
                }),
                crate_sector_bytes_per_s: rate(&mut || {
                    for s in data.chunks(sector_bytes) {
                        black_box(raw(black_box(s)));
                    }
                }),
                engine_compute_bytes_per_s: rate(&mut || {
                    let mut out = Vec::with_capacity(sums.len());
                    t.compute_sectors(black_box(&data), sector_bytes, &mut out);
                    black_box(out);
                }),
                engine_verify_bytes_per_s: rate(&mut || {
                    let ok = (0..sectors)
                        .all(|i| t.sector_matches(black_box(&data), &sums, sector_bytes, i));
                    assert!(ok, "{}: a sum computed here did not match", t.name());
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_and_sizes() {
        assert_eq!(
            &CsumType::Crc32c.compute(b"123456789")[..4],
            &0xe306_9283u32.to_le_bytes()
        );
        for t in [
            CsumType::Crc32c,
            CsumType::Xxhash64,
            CsumType::Sha256,
            CsumType::Blake3,
        ] {
            assert_eq!(CsumType::from_u8(t as u8), Some(t));
            assert_eq!(CsumType::parse(t.name()).unwrap(), t);
            let a = t.compute(&[0u8; 4096]);
            let b = t.compute(&[1u8; 4096]);
            assert_ne!(a, b, "{}", t.name());
            assert!(a[t.size_bytes()..].iter().all(|&x| x == 0));
        }
        assert!(CsumType::parse("md5").is_err());
    }

    #[test]
    fn sector_matches_finds_the_flipped_sector() {
        for t in [
            CsumType::Crc32c,
            CsumType::Xxhash64,
            CsumType::Sha256,
            CsumType::Blake3,
        ] {
            let mut data: Vec<u8> = (0..4 * 512).map(|i| (i * 7 % 251) as u8).collect();
            let mut sums = Vec::new();
            t.compute_sectors(&data, 512, &mut sums);
            assert_eq!(sums.len(), 4 * t.size_bytes());
            data[2 * 512 + 100] ^= 1;
            let bad: Vec<usize> = (0..4)
                .filter(|&i| !t.sector_matches(&data, &sums, 512, i))
                .collect();
            assert_eq!(bad, vec![2], "{}", t.name());
        }
    }
}
